"""The `llava-1.5-7b` preset end to end, on small files in the real formats: a llava-hf folder in the hub's
key layout (sharded safetensors, hub-style config.json, a Llama byte-fallback tokenizer.json with <image>
and <pad> appended as llava-hf does), an HMR2.0 Lightning checkpoint, and an SMPL .npz. train_sft.py,
train_rft.py and eval.py run on them exactly as a practitioner runs them on the real 7B files; only the
sizes differ (the preset reads them from the files). CPU, a few steps: the plumbing, not the learning."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import data
import model as M
import smpl
import train_rft
import train_sft
from test_llava import hf_to_hub, randomize_, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSE_VIT = M.PoseViTConfig(image_size=(64, 48), hidden_size=64, num_hidden_layers=2, num_attention_heads=1)


def llava_hub_config(vocab, image, pad):
    """A small llava-hf config.json in the hub's style (fields left out take transformers' defaults)."""
    return {
        "architectures": ["LlavaForConditionalGeneration"], "image_token_index": image, "model_type": "llava",
        "pad_token_id": pad, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
                        "rms_norm_eps": 1e-05, "vocab_size": vocab},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "image_size": 56,
                          "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3,
                          "patch_size": 14, "projection_dim": 32},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": vocab,
    }


def smpl_arrays():
    """An SMPL model in the official .npz layout whose body is the built-in skeleton: every vertex belongs
    to one joint (skinning weight 1), scattered 2 cm around that joint's rest position, and J_regressor
    averages each joint's vertices."""
    V = 6890
    rng = np.random.default_rng(0)
    owner = np.arange(V) % 24
    rest = smpl.SMPL().J_template.double().numpy()  # (24, 3)
    v_template = rest[owner] + 0.02 * rng.standard_normal((V, 3))
    onehot = np.eye(24)[owner]  # (V, 24)
    return {"v_template": v_template, "shapedirs": 0.01 * rng.standard_normal((V, 3, 10)),
            "posedirs": 0.001 * rng.standard_normal((V, 3, 207)), "J_regressor": (onehot / onehot.sum(0)).T,
            "weights": onehot, "kintree_table": np.stack([np.array([2 ** 32 - 1] + smpl.PARENTS[1:]),
                                                          np.arange(24)]).astype(np.uint32),
            "f": rng.integers(0, V, (13776, 3)).astype(np.uint32)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """llava/ (hub layout, 2 shards, tokenizer.json), hmr2.ckpt (Lightning), SMPL_NEUTRAL.npz."""
    root = tmp_path_factory.mktemp("real_files")
    world = data.PoseWorld("train", size=120, cache_dir=None)
    tok = M.Tokenizer.train_bpe(train_sft.poseworld_texts(world), 500, special_tokens=("<unk>", "<s>", "</s>"))
    image, pad = tok.add_special_tokens(["<image>", "<pad>"])  # appended after the BPE, as llava-hf has them
    config = llava_hub_config(tok.vocab_size + 6, image, pad)  # rows to spare, like llava-hf's 32064
    torch.manual_seed(0)
    hf = randomize_(transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(config)).float(),
                    std=0.05)
    hub = {hf_to_hub(name): t.clone() for name, t in hf.state_dict().items()}
    llava = write_checkpoint(root / "llava", hub, config, shards=2)
    tok.save(str(llava / "tokenizer.json"))

    f_b = M.PoseViT(POSE_VIT)
    state = {f"backbone.{k}": v for k, v in f_b.state_dict().items()}
    state["smpl_head.decpose.weight"] = torch.randn(138, 8)  # other HMR2.0 parts: ignored by the loader
    torch.save({"epoch": 35, "global_step": 1000000, "state_dict": state, "hyper_parameters": {"lr": 1e-5}},
               root / "hmr2.ckpt")
    np.savez(root / "SMPL_NEUTRAL.npz", **smpl_arrays())
    return {"llava": str(llava), "hmr2": str(root / "hmr2.ckpt"), "smpl": str(root / "SMPL_NEUTRAL.npz"),
            "hub": hub, "backbone": f_b.state_dict(), "root": root}


def paths(files):
    return [f"--llava_path={files['llava']}", f"--pose_encoder_path={files['hmr2']}", f"--smpl_path={files['smpl']}"]


def test_preset_reads_its_sizes_from_the_files(files):
    config = M.PoseLLaVAConfig.from_preset("llava-1.5-7b", llava_path=files["llava"],
                                           pose_encoder_path=files["hmr2"])
    hub = json.load(open(os.path.join(files["llava"], "config.json")))
    assert config.llava.to_dict() == M.LlavaConfig.from_dict(hub).to_dict()
    assert config.llava.text_config.hidden_size == 64 and config.llava.vision_config.image_size == 56
    assert config.pose_vit.to_dict() == POSE_VIT.to_dict()
    # HMR2.0's ViT-H, read back from its shapes alone (a meta model: no memory)
    with torch.device("meta"):
        vit_h = M.PoseViT(M.PoseViTConfig()).state_dict()
    assert M.pose_vit_config_from_state(vit_h).to_dict() == M.PoseViTConfig().to_dict()
    with pytest.raises(ValueError, match="4:3"):
        M.pose_vit_config_from_state({**vit_h, "pos_embed": torch.zeros(1, 101, 1280, device="meta")})
    with pytest.raises(ValueError, match="not a ViTPose"):
        M.pose_vit_config_from_state({"pos_embed": torch.zeros(1, 13, 64)})


@pytest.mark.slow
def test_sft_rft_eval_on_real_format_files(files, tmp_path):
    """train_sft.py -> train_rft.py -> eval.py with --preset=llava-1.5-7b: the frozen base comes from the
    files unchanged, checkpoints hold only the trained tensors (plus pi_ref's copy after RFT), and a
    checkpoint refuses a LLaVA folder of another size with a message naming the difference."""
    sft, rft = tmp_path / "sft", tmp_path / "rft"
    train_sft.main(["--preset=llava-1.5-7b", *paths(files), f"--out_dir={sft}", "--max_steps=3", "--batch_size=4",
                    "--poseworld_size=60", "--retriever_pairs=80", "--retriever_steps=3", "--retriever_batch=16",
                    "--warmup_steps=1", "--num_threads=1"])
    policy, _, extra = M.load_checkpoint(sft, llava_path=files["llava"], pose_encoder_path=files["hmr2"])
    assert extra["stage"] == "sft" and extra["step"] == 3
    stored = load_file(str(sft / "checkpoint" / "model.safetensors"))
    assert set(stored) == set(policy.trained_names("rft"))
    assert torch.count_nonzero(stored["pose_projector.weight"]) > 0
    lora_b = [n for n in stored if n.endswith("lora_B")]
    assert lora_b and all(torch.count_nonzero(stored[n]) > 0 for n in lora_b)  # LoRA B starts at 0: it trained
    # the frozen base is the files' weights, bit for bit
    params = dict(policy.named_parameters())
    assert torch.equal(params["llava.language_model.model.layers.1.mlp.down_proj.weight"],
                       files["hub"]["language_model.model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(params["llava.vision_tower.encoder.layers.0.self_attn.q_proj.weight"],
                       files["hub"]["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(params["pose_encoder.blocks.1.mlp.fc1.weight"], files["backbone"]["blocks.1.mlp.fc1.weight"])

    train_rft.main(["--preset=llava-1.5-7b", *paths(files), f"--sft_dir={sft}", f"--out_dir={rft}", "--max_steps=2",
                    "--G=2", "--batch_size=2", "--max_new_tokens=10", "--eval=false", "--gallery_every=1",
                    "--num_threads=1"])
    rows = [json.loads(line) for line in open(rft / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert (rft / "gallery.png").stat().st_size > 0 and (rft / "reward_curves.svg").stat().st_size > 0
    after = load_file(str(rft / "checkpoint" / "model.safetensors"))
    reference = {n[len("reference."):]: t for n, t in after.items() if n.startswith("reference.")}
    assert set(reference) == set(stored) and set(after) == set(stored) | {f"reference.{n}" for n in stored}
    assert all(torch.equal(reference[n], stored[n]) for n in stored)  # pi_ref = pi_init, the SFT model

    # bf16 as on the GPU (frozen base in bfloat16, trained tensors float32, autocast), with activation
    # checkpointing: runs on CPU too
    cfg = train_rft.apply_overrides(train_rft.RFTConfig(), [f"--sft_dir={sft}", "--activation_checkpointing=true",
                                                            *paths(files)])
    assert train_rft.load_policy(cfg, torch.device("cpu"))[0].llava.language_model.model.gradient_checkpointing
    train_rft.main(["--preset=llava-1.5-7b", *paths(files), f"--sft_dir={sft}", f"--out_dir={tmp_path / 'bf16'}",
                    "--max_steps=1", "--G=2", "--batch_size=2", "--max_new_tokens=10", "--eval=false",
                    "--num_threads=1", "--dtype=bfloat16", "--activation_checkpointing=true"])
    row = json.loads(open(tmp_path / "bf16" / "metrics.jsonl").readline())
    assert np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"]), row

    out = subprocess.run([sys.executable, "eval.py", f"--ckpt={rft}", "--limit=24", f"--out_dir={tmp_path / 'ev'}",
                          *paths(files)], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.load(open(tmp_path / "ev" / "eval.json"))
    assert result["i2p_n"] > 0 and np.isfinite(result["i2p_mpjpe_mm"]), result
    assert 0 <= result["t2p_posecode_acc"] <= 100, result

    other = json.load(open(os.path.join(files["llava"], "config.json")))
    other["text_config"]["num_hidden_layers"] = 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        M.load_checkpoint(sft, llava_path=tmp_path / "other", pose_encoder_path=files["hmr2"])
