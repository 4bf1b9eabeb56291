"""The pose-specific MLLM of model.py (sections 8-12): the pose-aware ViT and its checkpoint loader, the
Gaussian pose head (Eq. 2), PoseLLaVA (Eq. 1, Eq. 11), RFT sampling/scoring, checkpoints. CPU, small
configs; PoseWorld batches collated by data.py with a BPE trained on PoseWorld text."""
import contextlib
import dataclasses
import json
import math
import pickle
import sys
import types
import typing
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import stats
from scipy.spatial.transform import Rotation

import data
from model import (EmbeddingWithNewToken, GaussianPoseHead, LMHeadWithNewToken, Llava, PoseGaussian, PoseLLaVA,
                   PoseLLaVAConfig, PoseViT, PoseViTConfig, Tokenizer, build_pose_llava, load_checkpoint,
                   load_pose_encoder, policy_logprobs, pose_to_matrices, pose_to_rot6d, sample_policy,
                   save_checkpoint)

# A model smaller than the tiny preset, same structure: 32 x 32 CLIP input (4 tokens, patch 16), 32 x 32
# pose-ViT input (2 x 2 = 4 tokens with patch 16, padding 2).
SMALL = dict(llm_hidden=64, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_mlp=128, clip_image_size=32,
             clip_hidden=32, clip_layers=2, clip_heads=2, pose_image_size=(32, 32), pose_hidden=32, pose_layers=2,
             pose_heads=2, head_hidden=32)
IDENTITY_6D = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]).repeat(24)  # (144,) rot6d of the rest pose


@pytest.fixture(scope="module")
def world():
    return data.PoseWorld("val", size=24, cache_dir=None)


@pytest.fixture(scope="module")
def tokenizer(world):
    texts = [data.build_prompt(s["question"], s["image"] is not None) + " " + s["answer"] for s in world]
    return Tokenizer.train_bpe(texts, 400)


def small_config(tokenizer, preset="tiny", **fields):
    """The SMALL sizes; preset="llava-1.5-7b" gives the 7B preset's structure and training rules."""
    config = PoseLLaVAConfig.from_preset("tiny", tokenizer, **SMALL, **fields)
    return dataclasses.replace(config, preset=preset)


def randomize_(model, std=0.1):
    """Weights far from their init (zero LoRA B, zero head layers), so every path carries signal."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, std)
            if "norm" in name and name.endswith(".weight"):
                p.add_(1.0)
    return model


def batch_of(world, tokenizer, config, indices, for_generation=False):
    return data.collate([world[i] for i in indices], tokenizer, config.n_image_tokens, config.clip_size,
                        config.pose_size, for_generation=for_generation)


def sft_loss(model, batch):
    """Next-token cross-entropy on the answers plus the pose negative log-likelihood."""
    out = model(batch["input_ids"], batch["attention_mask"], batch["clip_pixels"], batch["pose_pixels"],
                answer_mask=batch["labels"] != -100)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    has = out.found & batch["has_pose"]
    nll = -out.pose.log_prob(pose_to_rot6d(batch["pose"]))[has].mean()
    return ce + nll


def outputs_equal(a, b):
    return all(torch.equal(x, y) for x, y in ((a.logits, b.logits), (a.pose.mu, b.pose.mu),
                                                (a.pose.log_std, b.pose.log_std)))


# ----------------------------------------------------------------------------------------------------
# PoseLLaVA on PoseWorld


def test_tiny_forward_on_a_poseworld_batch(world, tokenizer):
    """The tiny preset reads a real collated batch: catches a wrong image-token count, the pose tokens put
    before the CLIP tokens or into the wrong image's slots, reading the hidden state at the wrong column
    (the <POSE> must be the first one of the answer) and a pose head that does not start at the rest pose."""
    model = PoseLLaVA.from_preset("tiny", tokenizer)
    config = model.config
    assert model.n_image_tokens == 16 + 12  # 4 x 4 CLIP patches + 4 x 3 pose-ViT patches
    batch = batch_of(world, tokenizer, config, range(8))
    out = model(batch["input_ids"], batch["attention_mask"], batch["clip_pixels"], batch["pose_pixels"],
                answer_mask=batch["labels"] != -100)
    B, T = batch["input_ids"].shape
    assert out.logits.shape == (B, T, config.llava.text_config.vocab_size)
    assert out.found.tolist() == batch["has_pose"].tolist()  # t2p and i2p answers hold <POSE>, vqa ones do not
    for b in range(B):
        ids = batch["input_ids"][b].tolist()
        if out.found[b]:
            assert out.pose_position[b] == ids.index(config.pose_token_id)
    # a <POSE> written in the prompt is not the answer's: with answer_mask the answer's first one is read
    ids = batch["input_ids"].clone()
    ids[:, 3] = config.pose_token_id
    assert model.pose_positions(ids)[0].tolist() == [3] * B
    assert torch.equal(model.pose_positions(ids, batch["labels"] != -100)[0], out.pose_position)
    assert torch.equal(out.pose.mu, IDENTITY_6D.expand(B, -1))  # untrained head: the rest pose
    assert torch.allclose(out.pose.log_std, torch.full((B, 144), config.log_std_init), atol=1e-6)

    # Token-level fusion (Eq. 11): image k's slots hold W_a f_a(x_k) (LLaVA's own CLIP path), then W_b f_b(x_k).
    x = model.embed(batch["input_ids"], model.visual_tokens(batch["clip_pixels"], batch["pose_pixels"]))
    slots = x[batch["input_ids"] == config.llava.image_token_index].view(-1, config.n_image_tokens, x.shape[-1])
    clip_tokens = model.llava.image_features(batch["clip_pixels"])  # (n, 16, d)
    pose_tokens = model.pose_projector(model.pose_encoder(batch["pose_pixels"]))  # (n, 12, d)
    assert torch.allclose(slots, torch.cat([clip_tokens, pose_tokens], dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="28 = 16 CLIP"):
        model.embed(batch["input_ids"][:, 1:], None)


# ----------------------------------------------------------------------------------------------------
# The Gaussian pose head (Eq. 2)


def test_pose_gaussian_matches_scipy_and_rotations_are_proper():
    """log_prob and entropy against scipy's normal; sample statistics (catches a variance used as a std);
    the rot6d layout against scipy's rotations (catches rows written as columns, or joints interleaved)."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(4, 144, generator=g, dtype=torch.float64)
    log_std = -3 * torch.rand(4, 144, generator=g, dtype=torch.float64)
    dist = PoseGaussian(mu, log_std)
    p = dist.sample(torch.Generator().manual_seed(5))
    assert torch.equal(p, dist.sample(torch.Generator().manual_seed(5)))
    std = log_std.exp().numpy()
    np.testing.assert_allclose(dist.log_prob(p).numpy(), stats.norm.logpdf(p.numpy(), mu.numpy(), std).sum(-1),
                               rtol=1e-10)
    np.testing.assert_allclose(dist.entropy().numpy(), stats.norm.entropy(scale=std).sum(-1), rtol=1e-10)

    many = PoseGaussian(mu[:1].expand(20000, -1), log_std[:1].expand(20000, -1)).sample(g)  # (20000, 144)
    assert torch.allclose(many.mean(0), mu[0], atol=5 * float(log_std[0].exp().max()) / math.sqrt(20000))
    assert torch.allclose(many.std(0), log_std[0].exp(), rtol=0.05)

    axis_angle = torch.randn(3, 24, 3, generator=g, dtype=torch.float64)
    R = pose_to_matrices(pose_to_rot6d(axis_angle))  # (3, 24, 3, 3)
    reference = Rotation.from_rotvec(axis_angle.reshape(-1, 3).numpy()).as_matrix().reshape(3, 24, 3, 3)
    np.testing.assert_allclose(R.numpy(), reference, atol=1e-12)
    R = pose_to_matrices(p)  # any 144 numbers give proper rotations
    assert torch.allclose(R.transpose(-1, -2) @ R, torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-10)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4, 24, dtype=R.dtype), atol=1e-10)


def test_head_init_log_std_bounds_and_deterministic_switch():
    """The head starts at the rest pose with log_std_init; log_std never leaves [min, max] however large
    the raw output; deterministic=True has no log-std layer and makes the NLL a scaled MSE."""
    h = 100 * torch.randn(5, 16)
    head = GaussianPoseHead(16, 32)
    dist = head(h)
    assert torch.equal(dist.mu, IDENTITY_6D.expand(5, -1))
    assert torch.allclose(dist.log_std, torch.full((5, 144), -1.0), atol=1e-6)
    with torch.no_grad():
        for layer in (head.fc1, head.fc2, head.to_log_std):
            layer.weight.normal_(0, 10.0)
    log_std = head(h).log_std.detach()
    assert -5.0 <= float(log_std.min()) < -4.9 and -0.1 < float(log_std.max()) <= 0.0

    det = GaussianPoseHead(16, 32, log_std_init=-2.0, deterministic=True)
    assert det.to_log_std is None
    with torch.no_grad():
        det.to_mu.weight.normal_(0, 0.1)
    d = det(h)
    assert torch.equal(d.log_std, torch.full((5, 144), -2.0))
    p1, p2 = torch.randn(5, 144), torch.randn(5, 144)
    mse_gap = 0.5 * (((p1 - d.mu) ** 2).sum(-1) - ((p2 - d.mu) ** 2).sum(-1)) / math.exp(-2.0) ** 2
    assert torch.allclose(-d.log_prob(p1) + d.log_prob(p2), mse_gap, rtol=1e-4)
    with pytest.raises(ValueError, match="log_std_min < log_std_init"):
        GaussianPoseHead(16, 32, log_std_init=0.5)


def test_pose_log_probs_are_float32_under_bf16_autocast():
    """The 7B recipe runs under bf16 autocast. The head's mean and log-std, the 144-d Gaussian
    log-density and the KLs must still be float32: the same weights and hidden states give the same
    log-probs with and without autocast, to float32 precision. In bf16 they would be off by whole nats
    (measured: log p 164.0 instead of 164.54), corrupting r_c and the pose KL."""
    import hygrpo
    g = torch.Generator().manual_seed(0)
    head = GaussianPoseHead(64, 128)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    h = torch.randn(6, 64, generator=g)  # (6, 64) float32 hidden states
    ref = head(h)
    p = ref.sample(torch.Generator().manual_seed(1))  # (6, 144)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(h)
        assert out.mu.dtype == torch.float32 and out.log_std.dtype == torch.float32
        lp = out.log_prob(p)  # (6,)
        kl = hygrpo.gaussian_kl(out.mu, out.log_std, ref.mu + 0.002, ref.log_std)  # (6,)
    assert lp.dtype == torch.float32 and lp.abs().min() > 10  # large enough for bf16 to lose whole nats
    assert torch.allclose(lp, ref.log_prob(p), rtol=1e-6, atol=1e-5)
    assert torch.allclose(kl, hygrpo.gaussian_kl(ref.mu, ref.log_std, ref.mu + 0.002, ref.log_std), rtol=1e-5)
    # half-precision inputs are upcast before the sums, so a 0.002 mean shift still shows
    mu16, ls16, p16 = ref.mu.detach().bfloat16(), ref.log_std.detach().bfloat16(), p.bfloat16()
    lp16 = hygrpo.gaussian_log_prob(p16, mu16, ls16)
    assert lp16.dtype == torch.float32
    assert torch.allclose(lp16, hygrpo.gaussian_log_prob(p16.float(), mu16.float(), ls16.float()), rtol=1e-6)
    # the k3 KL of the loss then sees float32 log-probs (token_logprobs is float32 too)
    k3 = hygrpo.kl_k3(lp, ref.log_prob(p).detach() + 0.01)
    assert k3.dtype == torch.float32 and torch.allclose(k3, torch.full_like(k3, math.exp(0.01) - 1.01), rtol=2e-2)


# ----------------------------------------------------------------------------------------------------
# What trains in which stage


def expected_trained(name, preset, stage):
    """Sec. 4.1, written independently of PoseLLaVA.trained_names."""
    lora = name.endswith(("lora_A", "lora_B"))
    if preset == "tiny" and stage == "sft":
        return not lora
    if preset == "tiny":  # RFT: the whole LLM and the heads, not the encoders f_a, f_b (README)
        return not lora and not name.startswith(("llava.vision_tower.", "pose_encoder."))
    return lora or name.endswith("new_row") or name.split(".")[0] in ("pose_projector", "pose_head") \
        or name.startswith("llava.multi_modal_projector")


@pytest.mark.parametrize("preset, stage", [("tiny", "sft"), ("tiny", "rft"), ("llava-1.5-7b", "sft"),
                                           ("llava-1.5-7b", "rft")])
def test_frozen_parts_get_no_gradient(world, tokenizer, preset, stage):
    """After a backward pass, every trained tensor has a nonzero gradient and every frozen one none: catches
    a frozen encoder or LLM weight that trains (or a forgotten trained part, e.g. W_a or the <POSE> rows)."""
    config = small_config(tokenizer, preset)
    model = randomize_(PoseLLaVA(config))
    n_trained = model.set_trainable(stage)
    assert n_trained == sum(p.numel() for n, p in model.named_parameters() if expected_trained(n, preset, stage))
    sft_loss(model, batch_of(world, tokenizer, config, range(8))).backward()
    # LLaVA reads CLIP's second-to-last layer: the last layer and post_layernorm never see a gradient
    unused = ("llava.vision_tower.encoder.layers.1.", "llava.vision_tower.post_layernorm.")
    for name, p in model.named_parameters():
        if not expected_trained(name, preset, stage):
            assert p.grad is None, name
        elif not name.startswith(unused):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pose_rows_train_while_the_vocabulary_stays(world, tokenizer):
    """7B-style RFT step with weight decay: the <POSE> rows of embed_tokens and lm_head move, the frozen
    32k-row tables (here 400) do not change at all, and the spliced rows are what the model reads."""
    config = small_config(tokenizer, "llava-1.5-7b")
    model = randomize_(PoseLLaVA(config))
    model.set_trainable("rft")
    lm = model.llava.language_model
    assert isinstance(lm.model.embed_tokens, EmbeddingWithNewToken) and isinstance(lm.lm_head, LMHeadWithNewToken)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    sft_loss(model, batch_of(world, tokenizer, config, range(8))).backward()
    opt.step()
    after = dict(model.named_parameters())
    for table in ("llava.language_model.model.embed_tokens", "llava.language_model.lm_head"):
        assert torch.equal(after[f"{table}.weight"], before[f"{table}.weight"]), table
        assert not torch.equal(after[f"{table}.new_row"], before[f"{table}.new_row"]), table
    pose_id = config.pose_token_id
    ids = torch.tensor([[3, pose_id, 7]])
    assert torch.equal(lm.model.embed_tokens(ids)[0, 1], lm.model.embed_tokens.new_row)
    assert torch.equal(lm.model.embed_tokens(ids)[0, 0], lm.model.embed_tokens.weight[3])
    h = torch.randn(2, config.llava.text_config.hidden_size)
    logits = lm.lm_head(h)
    assert torch.allclose(logits[:, pose_id], h @ lm.lm_head.new_row, atol=1e-6)
    assert torch.allclose(logits[:, :pose_id], h @ lm.lm_head.weight[:pose_id].T, atol=1e-6)


def test_pose_rows_start_at_the_mean_and_grow_the_table(tokenizer):
    """The <POSE> rows start at the mean of the OTHER rows; an id past the table (a tokenizer with exactly
    as many tokens as rows) grows embed_tokens and lm_head, keeping the old rows."""
    config = small_config(tokenizer)
    V, pose_id = config.llava.text_config.vocab_size, config.pose_token_id
    torch.manual_seed(1)
    base = Llava(config.llava)
    torch.manual_seed(1)
    lm = PoseLLaVA(config).llava.language_model
    others = torch.cat([base.language_model.model.embed_tokens.weight[:pose_id],
                        base.language_model.model.embed_tokens.weight[pose_id + 1:]])
    assert torch.allclose(lm.model.embed_tokens.new_row, others.mean(0), atol=1e-7)
    torch.manual_seed(1)
    base = Llava(config.llava)
    torch.manual_seed(1)
    model = PoseLLaVA(dataclasses.replace(config, pose_token_id=V))
    lm = model.llava.language_model
    for new, old in ((lm.model.embed_tokens, base.language_model.model.embed_tokens),
                     (lm.lm_head, base.language_model.lm_head)):
        assert new.weight.shape[0] == V + 1
        assert torch.equal(new.weight[:V], old.weight)
        assert torch.allclose(new.new_row, old.weight.mean(0), atol=1e-6)
        assert torch.allclose(new.weight[V], old.weight.mean(0), atol=1e-6)
    assert lm.lm_head(torch.randn(1, config.llava.text_config.hidden_size)).shape == (1, V + 1)


# ----------------------------------------------------------------------------------------------------
# The pose-aware encoder f_b and HMR2.0's checkpoint


def vitpose_reference(sd, x, heads, eps=1e-6):
    """HMR2.0's ViT forward (4D-Humans hmr2/models/backbones/vit.py) transcribed with explicit ops."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16, padding=2)
    B, C = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:] + sd["pos_embed"][:, :1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(x, (C,), w["norm1.weight"], w["norm1.bias"], eps)
        qkv = ((y @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]).reshape(B, -1, 3, heads, C // heads)
               .permute(2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + (attn @ v).transpose(1, 2).reshape(B, -1, C) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        y = F.layer_norm(x, (C,), w["norm2.weight"], w["norm2.bias"], eps)
        y = F.gelu(y @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]) @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
        x = x + y
    return F.layer_norm(x, (C,), sd["last_norm.weight"], sd["last_norm.bias"], eps)


POSE_VIT_SMALL = PoseViTConfig(image_size=(64, 48), hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def test_pose_vit_matches_hmr2_forward():
    """Our PoseViT against the transcribed HMR2.0 forward: catches a missing padding, a pos_embed without
    its extra row added, a qkv split in the wrong order, tanh-GELU or LayerNorm eps 1e-5."""
    assert PoseViTConfig().grid == (16, 12) and PoseViTConfig().num_tokens == 192
    assert POSE_VIT_SMALL.grid == (4, 3)
    x = torch.randn(3, 3, 64, 48)
    for std in (0.2, 1e-5):  # 1e-5: activations so small that LayerNorm's eps dominates their variance
        f_b = randomize_(PoseViT(POSE_VIT_SMALL), std=std)
        expected = vitpose_reference(f_b.state_dict(), x, heads=4)
        assert torch.allclose(f_b(x), expected, atol=1e-5), std
    with pytest.raises(ValueError, match=r"expected \(N, 3, 64, 48\)"):
        f_b(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="patch grid"):
        PoseViTConfig(image_size=(60, 48))


@contextlib.contextmanager
def fake_config_modules():
    """Stand-ins for omegaconf and yacs, present only while the checkpoint is WRITTEN: the loader must
    read the file without importing them (they are not installed here either)."""
    classes = {("omegaconf.dictconfig", "DictConfig"): (), ("omegaconf.base", "ContainerMetadata"): (),
               ("omegaconf.nodes", "AnyNode"): (), ("yacs.config", "CfgNode"): (dict,)}
    modules = {}
    for (module, name), bases in classes.items():
        for parent in [module.rsplit(".", 1)[0], module]:
            modules.setdefault(parent, types.ModuleType(parent))
        setattr(modules[module], name, type(name, bases, {"__module__": module}))
    assert not set(modules) & set(sys.modules)
    sys.modules.update(modules)
    try:
        yield {name: getattr(modules[module], name) for module, name in classes}
    finally:
        for name in modules:
            del sys.modules[name]


def lightning_checkpoint(f_b, config_objects):
    """HMR2.0's Lightning layout: backbone.* next to the other heads, the training config in hyper_parameters."""
    state = {f"backbone.{k}": v for k, v in f_b.state_dict().items()}
    state.update({"smpl_head.decpose.weight": torch.randn(138, 8), "discriminator.D_conv1.weight": torch.randn(4, 1),
                  "smpl.J_regressor": torch.randn(24, 10), "initialized": torch.tensor(True)})
    return {"epoch": 35, "global_step": 1000000, "pytorch-lightning_version": "2.0.1", "state_dict": state,
            "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 35}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5),
                                                               "dirpath": "logs/train/checkpoints"}},
            "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": config_objects}


def test_load_pose_encoder_reads_hmr2_lightning_checkpoint(tmp_path):
    """A file in HMR2.0's layout whose hyper_parameters hold an OmegaConf DictConfig (what 4D-Humans' Hydra
    training stores) and a yacs CfgNode: weights_only=True refuses it, our loader reads the backbone and
    ignores everything else; the encoder then computes exactly what the saved one did."""
    f_b = randomize_(PoseViT(POSE_VIT_SMALL), std=0.2)
    path = tmp_path / "epoch=35-step=1000000.ckpt"
    with fake_config_modules() as cls:
        meta = cls["ContainerMetadata"]()
        meta.__dict__.update(ref_type=typing.Any, object_type=dict, key_type=typing.Any,
                             resolver_cache=defaultdict(dict), flags={})
        node = cls["AnyNode"]()
        node.__dict__.update(_val=256, _parent=None)
        cfg = cls["DictConfig"]()
        cfg.__dict__.update(_metadata=meta, _parent=None, _content={"IMAGE_SIZE": node})
        yacs_cfg = cls["CfgNode"](MODEL=cls["CfgNode"](IMAGE_SIZE=256, BBOX_SHAPE=[192, 256]))
        yacs_cfg.__dict__["__immutable__"] = True
        torch.save(lightning_checkpoint(f_b, {"cfg": cfg, "yacs_cfg": yacs_cfg}), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    loaded = load_pose_encoder(path, POSE_VIT_SMALL)
    assert loaded.state_dict().keys() == f_b.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in f_b.state_dict().items())
    x = torch.randn(2, 3, 64, 48)
    assert torch.equal(loaded(x), f_b(x))


class Payload:
    """Unpickling this runs code: it writes the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_load_pose_encoder_refuses_pickled_code(tmp_path):
    """A checkpoint that would run code when unpickled is refused, and the code does not run; the payload
    is live (plain torch.load does run it), so the test can fail."""
    marker = tmp_path / "payload_ran"
    f_b = PoseViT(POSE_VIT_SMALL)
    path = tmp_path / "evil.ckpt"
    torch.save(lightning_checkpoint(f_b, {"cfg": Payload(marker)}), path)
    with pytest.raises(ValueError, match="refusing to load builtins.exec"):
        load_pose_encoder(path, POSE_VIT_SMALL)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the loader must never do
    assert marker.exists()


def test_load_pose_encoder_safetensors_and_bad_keys(tmp_path):
    """A backbone safetensors file (with or without `backbone.`) loads; missing, unknown and misshapen keys
    are errors naming them; a missing file names 4D-Humans; an unreadable file is a clear error."""
    f_b = randomize_(PoseViT(POSE_VIT_SMALL))
    sd = f_b.state_dict()
    x = torch.randn(1, 3, 64, 48)
    for prefix in ("backbone.", ""):
        save_file({prefix + k: v for k, v in sd.items()}, str(tmp_path / "b.safetensors"))
        assert torch.equal(load_pose_encoder(tmp_path / "b.safetensors", POSE_VIT_SMALL)(x), f_b(x))
    cases = {"missing backbone keys: last_norm.weight": {k: v for k, v in sd.items() if k != "last_norm.weight"},
             "unknown backbone keys: cls_token": {**sd, "cls_token": torch.zeros(1, 1, 32)},
             r"shape mismatches: pos_embed \(1, 12, 32\)": {**sd, "pos_embed": torch.zeros(1, 12, 32)}}
    for message, state in cases.items():
        save_file({f"backbone.{k}": v for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_pose_encoder(tmp_path / "bad.safetensors", POSE_VIT_SMALL)
    with pytest.raises(FileNotFoundError, match="4D-Humans"):
        load_pose_encoder(tmp_path / "absent.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_pose_encoder(tmp_path / "garbage.ckpt")


# ----------------------------------------------------------------------------------------------------
# The 7B preset


def test_7b_preset_builds_on_meta_with_the_expected_size():
    """Parameter counts derived by hand from the architectures: LLaVA-1.5-7B (7,063,427,072, as transformers
    builds it, see test_llava), HMR2.0's ViT-H, W_b, the head, the <POSE> rows and rank-8 LoRA on q, k, v, o."""
    config = PoseLLaVAConfig.from_preset("llava-1.5-7b")
    text, llava = config.llava.text_config, config.llava  # the values of llava-1.5-7b-hf's config.json
    assert (text.rms_norm_eps, text.rope_theta, text.max_position_embeddings) == (1e-5, 10000.0, 4096)
    assert (llava.image_token_index, llava.pad_token_id, llava.vision_feature_layer) == (32000, 32001, -2)
    assert config.pose_token_id == 32002  # the next id after llava-hf's 32002 tokens
    model = build_pose_llava(config, device="meta")
    assert all(p.is_meta for p in model.parameters())
    V, d, f, L = 32064, 4096, 11008, 32
    llama = 2 * V * d + L * (4 * d * d + 3 * d * f + 2 * d) + d
    D, F_, Lc, P = 1024, 4096, 24, (336 // 14) ** 2
    clip = D + 3 * 14 * 14 * D + (P + 1) * D + 2 * D + Lc * (4 * (D * D + D) + 2 * D * F_ + F_ + D + 4 * D) + 2 * D
    W_a = D * d + d + d * d + d
    assert llama + clip + W_a == 7_063_427_072
    Db = 1280
    vit_h = 3 * 16 * 16 * Db + Db + (192 + 1) * Db + 32 * (4 * Db + 3 * Db * Db + 3 * Db + Db * Db + Db
                                                             + 2 * 4 * Db * Db + 4 * Db + Db) + 2 * Db
    assert vit_h == 630_912_000
    W_b = Db * d + d
    h = config.head_hidden
    head = d * h + h + h * h + h + 2 * (h * 144 + 144)
    rows = 2 * d
    lora = L * 4 * 8 * (d + d)
    assert sum(p.numel() for p in model.parameters()) == llama + clip + W_a + vit_h + W_b + head + rows + lora
    trained = lora + W_a + W_b + head + rows
    assert model.set_trainable("sft") == model.set_trainable("rft") == trained == 40_163_616
    assert model.n_image_tokens == 576 + 192
    with pytest.raises(ValueError, match="llava_path"):
        build_pose_llava(config)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def test_tiny_checkpoint_round_trip(world, tokenizer, tmp_path):
    """save -> load gives bit-identical outputs for the policy and for pi_ref, the same tokenizer and
    extra; the write is atomic (no temporary folder left, overwriting works)."""
    config = small_config(tokenizer)
    model = randomize_(PoseLLaVA(config))
    model.set_trainable("rft")
    model.freeze_reference()
    randomize_(model)  # the policy moves away from its reference
    out_dir = tmp_path / "run" / "step_000010"
    save_checkpoint(model, tokenizer, out_dir, extra={"step": 10, "lr": 3e-4})
    save_checkpoint(model, tokenizer, out_dir, extra={"step": 10, "lr": 3e-4})  # over an existing one
    assert [p.name for p in out_dir.parent.iterdir()] == ["step_000010"]
    stored = load_file(str(out_dir / "model.safetensors"))
    assert {k for k in stored if not k.startswith("reference.")} == set(model.state_dict())
    loaded, tok, extra = load_checkpoint(out_dir, expect=config)
    assert extra == {"step": 10, "lr": 3e-4}
    text = world[3]["question"]
    assert tok.encode(text) == tokenizer.encode(text)
    batch = batch_of(world, tokenizer, config, range(6))
    args = (batch["input_ids"], batch["attention_mask"], batch["clip_pixels"], batch["pose_pixels"])
    with torch.no_grad():
        assert outputs_equal(model(*args), loaded(*args))
        with model.reference(), loaded.reference():
            assert outputs_equal(model(*args), loaded(*args))


def test_checkpoint_errors_are_clear(world, tokenizer, tmp_path):
    """A config other than the one asked for, tensors that do not fit the stored config, missing or
    malformed files and non-JSON extra are errors that say what differs."""
    config = small_config(tokenizer)
    path = save_checkpoint(PoseLLaVA(config), tokenizer, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="hidden_size: 64 vs 128"):
        load_checkpoint(path, expect={"llava": {"text_config": {"hidden_size": 128}}})
    with pytest.raises(ValueError, match="lora_r: 8 vs 4"):
        load_checkpoint(path, expect=dataclasses.replace(config, lora_r=4))
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["pose_vit"]["hidden_size"] = 64
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shape mismatches of tensors: .*pose_encoder.* \(32,\) vs model \(64,\)"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Pose-RFT checkpoint config"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(PoseLLaVA(config), tokenizer, tmp_path / "other", extra={"t": torch.zeros(1)})


def test_7b_style_checkpoint_holds_only_trained_tensors(world, tokenizer, tmp_path):
    """With the 7B preset's rules, a run's checkpoint holds LoRA, W_a, W_b, the head and the <POSE> rows
    only; loading rebuilds the base from the LLaVA folder and the HMR2.0 file and gives identical outputs."""
    config = small_config(tokenizer, "llava-1.5-7b")
    llava = randomize_(Llava(config.llava))
    (tmp_path / "llava").mkdir()
    save_file(llava.state_dict(), str(tmp_path / "llava" / "model.safetensors"))
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config.llava.to_dict()))
    f_b = randomize_(PoseViT(config.pose_vit))
    save_file({f"backbone.{k}": v for k, v in f_b.state_dict().items()}, str(tmp_path / "hmr2.safetensors"))
    config = dataclasses.replace(config, llava_path=str(tmp_path / "llava"),
                                 pose_encoder_path=str(tmp_path / "hmr2.safetensors"))
    model = build_pose_llava(config)
    assert torch.equal(model.llava.vision_tower.pre_layrnorm.weight, llava.vision_tower.pre_layrnorm.weight)
    assert torch.equal(model.pose_encoder.pos_embed, f_b.pos_embed)
    model.set_trainable("rft")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    path = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    stored = load_file(str(path / "model.safetensors"))
    assert set(stored) == set(model.trained_names("rft"))
    assert sum(t.numel() for t in stored.values()) < 0.2 * sum(p.numel() for p in model.parameters())
    loaded, _, _ = load_checkpoint(path)
    batch = batch_of(world, tokenizer, config, range(6))
    args = (batch["input_ids"], batch["attention_mask"], batch["clip_pixels"], batch["pose_pixels"])
    with torch.no_grad():
        assert outputs_equal(model(*args), loaded(*args))


# ----------------------------------------------------------------------------------------------------
# RFT: sampling, scoring, the reference policy


def pose_prone_model(tokenizer):
    """A random small model whose <POSE> logit is high enough that about half the answers emit one."""
    config = small_config(tokenizer)
    model = randomize_(PoseLLaVA(config))
    lm = model.llava.language_model
    with torch.no_grad():
        lm.lm_head.new_row.copy_(lm.lm_head.weight.mean(0) + lm.model.norm.weight)
    model.set_trainable("rft")
    return config, model


def test_sample_policy_agrees_with_policy_logprobs(world, tokenizer):
    """G answers per prompt, one pose each: the sampling-time log-probs of tokens and poses equal the teacher-forced
    ones at unchanged parameters (a wrong hidden-state column or a shifted logit would differ); V holds
    exactly the answers with a <POSE>; invalid candidates carry the mean and log-prob 0; pose log-probs
    equal scipy's density; the encoders ran once per image, not per candidate."""
    config, model = pose_prone_model(tokenizer)
    G = 4
    batch = batch_of(world, tokenizer, config, [0, 2, 3], for_generation=True)  # vqa, i2p, t2p: 2 images
    rollout = sample_policy(model, batch, G=G, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    N = 3 * G
    assert rollout.tokens.shape[0] == N and rollout.v_a.shape[0] == 2 and rollout.v_b.shape[0] == 2
    assert torch.equal(rollout.prompt_ids, batch["input_ids"].repeat_interleave(G, 0))
    has_pose = torch.tensor([config.pose_token_id in t[m].tolist() for t, m in zip(rollout.tokens, rollout.mask)])
    assert torch.equal(rollout.valid, has_pose)
    assert 0 < int(rollout.valid.sum()) < N  # both kinds present, so both are checked
    invalid = ~rollout.valid
    assert torch.equal(rollout.pose[invalid], rollout.mu[invalid])
    assert torch.equal(rollout.pose_logprobs[invalid], torch.zeros(int(invalid.sum())))
    valid = rollout.valid
    expected = stats.norm.logpdf(rollout.pose[valid].double().numpy(), rollout.mu[valid].double().numpy(),
                                 rollout.log_std[valid].double().exp().numpy()).sum(-1)
    np.testing.assert_allclose(rollout.pose_logprobs[valid].numpy(), expected, rtol=1e-5)

    scores = policy_logprobs(model, rollout)
    assert torch.allclose(scores.logprobs, rollout.logprobs, atol=1e-4)
    assert torch.allclose(scores.pose_logprobs, rollout.pose_logprobs, atol=1e-4, rtol=1e-5)
    assert torch.equal(scores.logprobs[~rollout.mask], torch.zeros(int((~rollout.mask).sum())))


def test_sample_policy_prefills_each_prompt_once(world, tokenizer):
    """sample_policy runs the LLM's prefill on the B distinct prompts, not on B*G repeated rows, and its
    rollout equals the one sampled, with the same generator, from the prompts repeated G times (the
    shared KV cache changes the cost, not the samples): equal tokens, masks and V, and log-probs, Gaussians
    and poses equal up to float rounding. Catches a prompt's answers given another prompt's cache."""
    config, model = pose_prone_model(tokenizer)
    G, eos = 4, config.llava.text_config.eos_token_id
    batch = batch_of(world, tokenizer, config, [0, 2, 3], for_generation=True)  # vqa, i2p, t2p: 2 images
    decoder = model.llava.language_model.model
    seen = []
    hook = decoder.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))
    rollout = sample_policy(model, batch, G=G, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    hook.remove()
    assert seen[0] == (3, batch["input_ids"].shape[1]) and seen[1] == (3 * G, 1)  # prefill on B rows, decode on B*G
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the repeated path by hand: every prompt embedded and prefilled G times
        rep = lambda t: t.repeat_interleave(G, dim=0)  # noqa: E731
        visual = rep(model.project(*model.encode_images(batch["clip_pixels"], batch["pose_pixels"])))
        gen = model.llava.generate(inputs_embeds=model.embed(rep(batch["input_ids"]), visual),
                                   attention_mask=rep(batch["attention_mask"]).bool(), max_new_tokens=6,
                                   stop_token_ids=() if eos is None else (eos,), pad_token_id=config.llava.pad_token_id,
                                   capture_token_id=config.pose_token_id, generator=g)
        dist = model.pose_head(gen.captured_hidden)
        pose = torch.where(gen.captured[:, None], dist.sample(g), dist.mu)  # (N, 144)
    assert 0 < int(rollout.valid.sum()) < 3 * G
    assert torch.equal(rollout.tokens, gen.tokens) and torch.equal(rollout.mask, gen.mask)
    assert torch.equal(rollout.valid, gen.captured)
    assert torch.equal(rollout.prompt_ids, rep(batch["input_ids"]))
    assert torch.equal(rollout.prompt_mask, rep(batch["attention_mask"]).bool())
    for ours, theirs in ((rollout.logprobs, gen.logprobs), (rollout.mu, dist.mu), (rollout.log_std, dist.log_std),
                         (rollout.pose, pose)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_pose_samples_draw_several_poses_per_answer(world, tokenizer):
    """pose_samples: each of the G answers of a prompt gets pose_samples poses from its own Gaussian,
    group_size = G x pose_samples candidates per prompt. The copies share the answer, its log-probs and its
    Gaussian; their poses differ; and scoring the rollout (which runs the decoder once per answer) equals
    scoring the same candidates written out one by one with pose_samples = 1. Catches copies misaligned
    with their answer (a pose scored under another answer's Gaussian) and a decoder pass that mixes rows."""
    config, model = pose_prone_model(tokenizer)
    G, pose_samples = 3, 4
    batch = batch_of(world, tokenizer, config, [0, 2, 3], for_generation=True)
    rollout = sample_policy(model, batch, G=G, max_new_tokens=6, generator=torch.Generator().manual_seed(1),
                            pose_samples=pose_samples)
    N = 3 * G * pose_samples
    assert rollout.group_size == G * pose_samples and rollout.pose_samples == pose_samples
    assert rollout.pose.shape == (N, 144)
    answers = rollout.tokens.view(3 * G, pose_samples, -1)  # (answers, pose_samples, Tn)
    assert torch.equal(answers, answers[:, :1].expand_as(answers))  # copies share the text
    mu = rollout.mu.view(3 * G, pose_samples, 144)  # (answers, pose_samples, 144)
    assert torch.equal(mu, mu[:, :1].expand_as(mu))
    v = rollout.valid.view(3 * G, pose_samples)[:, 0]  # (answers,)
    assert v.any() and (rollout.pose.view(3 * G, pose_samples, 144)[v].std(1) > 0).all()  # the poses differ
    scores = policy_logprobs(model, rollout)
    assert torch.allclose(scores.logprobs, rollout.logprobs, atol=1e-4)
    assert torch.allclose(scores.pose_logprobs, rollout.pose_logprobs, atol=1e-4, rtol=1e-5)
    flat = dataclasses.replace(rollout, pose_samples=1)  # the same N candidates, each scored on its own
    one_by_one = policy_logprobs(model, flat)
    assert torch.allclose(scores.logprobs, one_by_one.logprobs, atol=1e-5)
    assert torch.allclose(scores.pose_logprobs, one_by_one.pose_logprobs, atol=1e-4, rtol=1e-5)


def test_identical_answers_are_scored_once(world, tokenizer):
    """At a low temperature a prompt's G answers coincide; policy_logprobs then runs the LLM once per
    distinct (prompt, answer) and shares the scores. The shared scores must still equal what the sampler
    recorded row by row (tokens and poses), and the gradient must equal that of scoring every row on its
    own. Catches a distinct pair mapped back to the wrong rows, an image given to the wrong prompt, and a
    shared row counted once in the gradient instead of once per copy."""
    config, model = pose_prone_model(tokenizer)
    batch = batch_of(world, tokenizer, config, [0, 2, 3], for_generation=True)  # vqa, i2p, t2p: 2 images
    rollout = sample_policy(model, batch, G=4, max_new_tokens=6, temperature=0.05,
                            generator=torch.Generator().manual_seed(3), pose_samples=2)
    seen = []
    hook = model.llava.language_model.model.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    scores = policy_logprobs(model, rollout)
    hook.remove()
    assert seen[0] < rollout.tokens.shape[0] // 2  # fewer sequences than answers: duplicates were shared
    m = rollout.mask
    assert torch.allclose(scores.logprobs[m], rollout.logprobs[m], atol=1e-4)
    assert torch.allclose(scores.pose_logprobs, rollout.pose_logprobs, atol=1e-4, rtol=1e-5)
    # the gradient of a sum over candidates: shared scoring vs each answer alone (rollouts of one row)
    weights = torch.randn(rollout.tokens.shape[0], generator=torch.Generator().manual_seed(0))  # (N,)
    params = [p for p in model.parameters() if p.requires_grad]
    shared = torch.autograd.grad((scores.pose_logprobs * weights).sum() + (scores.logprobs.sum(-1) * weights).sum(),
                                 params, allow_unused=True)
    per_row = [torch.zeros_like(p) for p in params]
    images = torch.cumsum((batch["input_ids"] == config.llava.image_token_index).any(-1).long(), 0) - 1  # (B,)
    for i in range(rollout.tokens.shape[0]):
        b = i // rollout.group_size
        has_image = bool((rollout.prompt_ids[i] == config.llava.image_token_index).any())
        one = dataclasses.replace(
            rollout, group_size=1, pose_samples=1, prompt_ids=rollout.prompt_ids[i:i + 1],
            prompt_mask=rollout.prompt_mask[i:i + 1],
            tokens=rollout.tokens[i:i + 1], mask=rollout.mask[i:i + 1], logprobs=rollout.logprobs[i:i + 1],
            pose=rollout.pose[i:i + 1], pose_logprobs=rollout.pose_logprobs[i:i + 1], mu=rollout.mu[i:i + 1],
            log_std=rollout.log_std[i:i + 1], valid=rollout.valid[i:i + 1],
            v_a=rollout.v_a[images[b]:images[b] + 1] if has_image else None,
            v_b=rollout.v_b[images[b]:images[b] + 1] if has_image else None)
        s1 = policy_logprobs(model, one)
        g = torch.autograd.grad(weights[i] * (s1.pose_logprobs.sum() + s1.logprobs.sum()), params, allow_unused=True)
        per_row = [a + (torch.zeros_like(a) if x is None else x) for a, x in zip(per_row, g)]
    for a, b in zip(shared, per_row):
        assert torch.allclose(torch.zeros_like(b) if a is None else a, b, atol=1e-4, rtol=1e-3)


def test_sampler_and_scorer_are_the_same_policy_at_temperature_07(world, tokenizer):
    """Answers sampled at temperature 0.7 come from softmax(logits / 0.7); the ratio's old policy and the
    KL's current and reference policies must be that same tempered policy (TRL's and verl's GRPO score at
    the sampling temperature). The sampler's recorded log-probs equal policy_logprobs' at unchanged
    parameters, and pi_ref (right after freeze_reference) scores them the same; both differ from the
    temperature-1 log-probs. Catches scoring at temperature 1 while sampling at another."""
    config, model = pose_prone_model(tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.zero_()  # fresh adapters, so that pi_ref = the current policy
    model.freeze_reference()
    batch = batch_of(world, tokenizer, config, [0, 2, 3], for_generation=True)
    rollout = sample_policy(model, batch, G=3, max_new_tokens=6, temperature=0.7,
                            generator=torch.Generator().manual_seed(0))
    assert rollout.temperature == 0.7
    cur = policy_logprobs(model, rollout)
    with model.reference():
        ref = policy_logprobs(model, rollout)
    m = rollout.mask
    assert torch.allclose(cur.logprobs[m], rollout.logprobs[m], atol=1e-4)
    assert torch.allclose(ref.logprobs[m], rollout.logprobs[m], atol=1e-4)
    at_one = policy_logprobs(model, dataclasses.replace(rollout, temperature=1.0))
    assert (at_one.logprobs[m] - rollout.logprobs[m]).abs().max() > 1e-2


def test_reference_policy_is_the_frozen_start(world, tokenizer):
    """pi_ref equals the policy right after freeze_reference() (fresh adapters), still equals the starting
    scores after an RFT step that moved the policy, and refuses to run when parameters outside its copy
    are trained; policy_logprobs refuses trainable encoders."""
    config = small_config(tokenizer)
    model = randomize_(PoseLLaVA(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.zero_()  # fresh adapters, as RFT starts from
    lm = model.llava.language_model
    with torch.no_grad():
        lm.lm_head.new_row.copy_(lm.lm_head.weight.mean(0) + lm.model.norm.weight)
    with pytest.raises(ValueError, match="freeze_reference"):
        with model.reference():
            pass
    model.set_trainable("rft")
    model.freeze_reference()
    batch = batch_of(world, tokenizer, config, [1, 3], for_generation=True)
    rollout = sample_policy(model, batch, G=3, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert rollout.valid.any()
    start = policy_logprobs(model, rollout)
    with model.reference():
        ref = policy_logprobs(model, rollout)
    # equal up to kernel choice (CPU kernels differ in the last bit when no input requires grad)
    assert torch.allclose(ref.logprobs, start.logprobs, atol=1e-5)
    assert torch.allclose(ref.pose_logprobs, start.pose_logprobs, atol=1e-5, rtol=1e-6)

    live = [id(p) for p in model.parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    (-(start.logprobs.sum() + start.pose_logprobs.sum())).backward()
    opt.step()
    assert [id(p) for p in model.parameters()] == live  # the swap put the live parameters back
    with torch.no_grad():
        moved = policy_logprobs(model, rollout)
        with model.reference():
            ref = policy_logprobs(model, rollout)
    assert (moved.logprobs - start.logprobs).abs().max() > 1e-3
    assert (moved.pose_logprobs - start.pose_logprobs)[rollout.valid].abs().max() > 1e-3
    assert torch.allclose(ref.logprobs, start.logprobs, atol=1e-5)
    assert torch.allclose(ref.pose_logprobs, start.pose_logprobs, atol=1e-5, rtol=1e-6)

    model.set_trainable("sft")  # tiny SFT trains the whole network, which the reference copy does not hold
    with pytest.raises(ValueError, match="outside the reference copy"):
        with model.reference():
            pass
    with pytest.raises(ValueError, match="must be frozen"):
        policy_logprobs(model, rollout)


def test_logits_at_scores_only_the_asked_positions_and_sft_loss_matches_every_position(world, tokenizer):
    """Llava.forward(logits_at=) runs the LM head at the masked positions only, in row-major order; and
    train_sft.sft_loss, which asks for the answer's positions, gives the cross-entropy of the full logits
    with ignore_index (the reference sft_loss above) and the same gradients."""
    import smpl
    import train_sft
    torch.manual_seed(0)
    model = randomize_(PoseLLaVA(small_config(tokenizer)))
    batch = batch_of(world, tokenizer, model.config, range(8))
    args = (batch["input_ids"], batch["attention_mask"], batch["clip_pixels"], batch["pose_pixels"])
    at = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(1)) < 0.3  # (B, T)
    full = model(*args).logits  # (B, T, V)
    part = model(*args, logits_at=at).logits  # (n, V)
    assert part.shape == (int(at.sum()), full.shape[-1])
    torch.testing.assert_close(part, full[at], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits_at has shape"):
        model(*args, logits_at=at[:, 1:])
    # SFT's cross-entropy: the answer positions only against every position with ignore_index
    cfg = train_sft.SFTConfig(ce_weight=1.0, nll_weight=0.0, joint_weight=0.0)
    loss, parts = train_sft.sft_loss(model, smpl.build_body_model("", "cpu"), batch, cfg)
    out = model(*args, answer_mask=batch["labels"] != -100)
    ref = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(loss, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    for p, a, b in zip(params, g_ours, g_ref):  # the pose terms, weighed 0, give zeros where ref gives None
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-4, atol=1e-6)
