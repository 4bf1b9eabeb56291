"""The `llava-1.5-7b` preset end to end, on small files in the real formats: a llava-hf folder in the hub's
key layout (sharded safetensors, hub-style config.json, a Llama byte-fallback tokenizer.json with <image>
and <pad> appended as llava-hf does), an HMR2.0 Lightning checkpoint, and an SMPL .npz. train_sft.py,
train_rft.py and eval.py run on them exactly as a practitioner runs them on the real 7B files; only the
sizes differ (the preset reads them from the files). CPU, a few steps: the plumbing, not the learning."""
import dataclasses
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
    train_sft.main(["--preset=llava-1.5-7b", *paths(files), "--data=poseworld", "--dtype=float32",
                    "--activation_checkpointing=false", f"--out_dir={sft}", "--max_steps=3", "--batch_size=4",
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

    train_rft.main(["--preset=llava-1.5-7b", *paths(files), "--data=poseworld", "--dtype=float32",
                    "--activation_checkpointing=false", f"--sft_dir={sft}", f"--out_dir={rft}", "--max_steps=2",
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
    cfg = train_rft.apply_overrides(train_rft.RFTConfig(), ["--preset=llava-1.5-7b", f"--sft_dir={sft}",
                                                            "--activation_checkpointing=true",
                                                            *paths(files)])
    assert train_rft.load_policy(cfg, torch.device("cpu"))[0].llava.language_model.model.gradient_checkpointing
    train_rft.main(["--preset=llava-1.5-7b", *paths(files), "--data=poseworld", f"--sft_dir={sft}",
                    f"--out_dir={tmp_path / 'bf16'}",
                    "--max_steps=1", "--G=2", "--batch_size=2", "--max_new_tokens=10", "--eval=false",
                    "--num_threads=1", "--dtype=bfloat16", "--activation_checkpointing=true"])
    row = json.loads(open(tmp_path / "bf16" / "metrics.jsonl").readline())
    assert np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"]), row

    refused = subprocess.run([sys.executable, "eval.py", f"--ckpt={rft}", *paths(files)], cwd=ROOT,
                             capture_output=True, text=True)  # a 7B checkpoint, no real test set named
    assert refused.returncode == 1 and "--pw3d_root" in refused.stderr and "--data=poseworld" in refused.stderr
    out = subprocess.run([sys.executable, "eval.py", f"--ckpt={rft}", "--data=poseworld", "--limit=24",
                          f"--out_dir={tmp_path / 'ev'}",
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


# ----------------------------------------------------------------------------------------------------
# Each preset owns its recipe (model.resolve_config, the scripts' RECIPES)


@pytest.mark.parametrize("script", [train_sft, train_rft])
def test_every_setting_is_in_the_7b_recipe_or_preset_free(script):
    """A setting added to a config without a 7B value would carry the tiny world's value into 7B runs."""
    config = script.SFTConfig if script is train_sft else script.RFTConfig
    names = {f.name for f in dataclasses.fields(config)}
    recipe = script.RECIPES["llava-1.5-7b"]
    assert set(recipe) <= names and not set(recipe) & script.PRESET_FREE
    assert names - set(recipe) - script.PRESET_FREE == set()
    for name, (value, source) in recipe.items():
        assert type(value) is type(getattr(config(), name)) or isinstance(getattr(config(), name), float), name
        assert source.startswith(("paper: ", "choice")), (name, source)


def test_the_7b_preset_alone_gives_the_papers_recipe():
    rft, src = M.resolve_config(train_rft.RFTConfig(), ["--preset=llava-1.5-7b"], train_rft.RECIPES)
    assert (rft.batch_size, rft.lr, rft.max_steps, rft.beta1, rft.beta2, rft.min_lr_ratio) == (16, 1e-6, 1000, 0.9, 0.95, 0)
    assert rft.beta_i2p == rft.beta == 0.04 and rft.pose_samples == 1 and rft.gradient_at_mean == 0
    assert (rft.pose_kl, rft.G, rft.clip_eps, rft.algo) == ("k3", 8, 0.2, "hygrpo")
    assert rft.data == "posescript,h36m,llava_instruct" and rft.max_new_tokens >= 128
    assert rft.sft_dir != train_rft.RFTConfig().sft_dir and rft.out_dir != train_rft.RFTConfig().out_dir
    assert src["lr"] == "paper: Table 4" and src["seed"] == "default"
    assert [row[0] for row in M.departures(rft, "rft")] == ["text reward's embedder"]  # without --bge_path
    rft.bge_path = "/models/bge-m3"
    assert M.departures(rft, "rft") == []
    sft, _ = M.resolve_config(train_sft.SFTConfig(), ["--preset=llava-1.5-7b"], train_sft.RECIPES)
    assert (sft.batch_size, sft.lr, sft.max_steps, sft.beta1, sft.beta2) == (80, 3e-4, 10000, 0.9, 0.95)
    # a flag still overrides the recipe, and says so
    rft, src = M.resolve_config(train_rft.RFTConfig(), ["--lr=2e-6", "--preset=llava-1.5-7b"], train_rft.RECIPES)
    assert rft.lr == 2e-6 and src["lr"] == "flag" and rft.max_steps == 1000
    # the tiny preset is the dataclass's defaults, untouched
    tiny, src = M.resolve_config(train_rft.RFTConfig(), [], train_rft.RECIPES)
    assert tiny == train_rft.RFTConfig() and set(src.values()) == {"default"}
    assert "pose samples per answer" in [row[0] for row in M.departures(tiny, "rft")]


def test_the_global_batch_is_split_over_processes():
    assert M.batch_split(80, 10, 8) == (10, 1) and M.batch_split(80, 10, 1) == (10, 8)
    assert M.batch_split(16, 0, 2) == (8, 1) and M.batch_split(16, 32, 1) == (16, 1)
    with pytest.raises(SystemExit, match="does not divide among 3"):
        M.batch_split(16, 2, 3)
    with pytest.raises(SystemExit, match="--micro_batch=3"):
        M.batch_split(16, 3, 2)


@pytest.mark.parametrize("script", [train_sft, train_rft])
def test_the_7b_preset_without_real_data_is_one_error_before_any_weights(script, monkeypatch, tmp_path):
    def no(*args, **kwargs):
        raise AssertionError("weights or data were read before the check")
    for name in ("load_checkpoint", "load_llava", "load_pose_encoder"):
        monkeypatch.setattr(M, name, no)
    monkeypatch.setattr(M.PoseLLaVA, "from_preset", no)
    monkeypatch.setattr(data, "build_datasets", no)
    monkeypatch.setattr(data, "PoseWorld", no)
    with pytest.raises(SystemExit) as e:
        script.main(["--preset=llava-1.5-7b", f"--out_dir={tmp_path}"])
    message = str(e.value)
    for flag in ("--llava_path", "--pose_encoder_path", "--smpl_path", "--posescript_root", "--h36m_npz",
                 "--llava_instruct_json", "--data=poseworld"):
        assert flag in message, (flag, message)
    with pytest.raises(SystemExit, match="not found: --llava_path=/no/such"):
        script.main(["--preset=llava-1.5-7b", "--llava_path=/no/such", f"--out_dir={tmp_path}"])


def test_an_sft_checkpoint_of_another_preset_is_refused(tmp_path):
    """ensure_sft reads the SFT run's config before any weights; a tiny SFT model is never taken for 7B."""
    folder = tmp_path / "sft" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"extra": {"stage": "sft", "step": 5, "finished": True,
                                                              "config": {"preset": "tiny", "max_steps": 5}}}))
    cfg = train_rft.RFTConfig(preset="llava-1.5-7b", sft_dir=str(tmp_path / "sft"))
    with pytest.raises(SystemExit, match="made with --preset=tiny, but this run has --preset=llava-1.5-7b"):
        train_rft.ensure_sft(cfg)
    train_rft.ensure_sft(train_rft.RFTConfig(sft_dir=str(tmp_path / "sft")))  # the same preset: taken


def test_the_readme_carries_the_departures_table():
    """The one departures table: model.DEPARTURES, each preset's value from its own recipe. The README's
    copy is regenerated with the command in train_rft.departures_markdown's docstring."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert train_rft.departures_markdown() in readme
