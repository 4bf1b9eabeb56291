"""The Pose-RFT model: the policy pi_theta(a, p | q) of Sec. 3.1, built on LLaVA-1.5 written out in plain PyTorch.

Pose-RFT builds on LLaVA-1.5-7B (Sec. 4.1, "Implementation Details"): a CLIP ViT-L/14-336 image encoder
f_a, a 2-layer GELU projector W_a into the word-embedding space of a Vicuna-7B (Llama-2) decoder, and that
decoder; to which it adds a pose-aware encoder f_b with its projector W_b and a Gaussian pose head. This
file reads top-down in the paper's order:

The policy (Sec. 3.1, Appendix A)
1. `PoseLLaVA`  the whole policy pi(a, p | q) of Eq. 1: CLIP tokens W_a v_a and pose-ViT tokens W_b v_b
                fused at the token level (Eq. 11, `PoseLLaVA.project`), the `<POSE>` rows, LoRA, and the
                reference policy pi_ref;
2. pose head    `GaussianPoseHead` and `PoseGaussian`: the continuous policy pi(p | q, a) of Eq. 2, a
                diagonal Gaussian over 24 x rot6d read at the `<POSE>` token;
3. RFT          `sample_policy` (G answers per prompt, Algorithm 1 line 6), `policy_logprobs` (the
                teacher-forced scores the HyGRPO loss needs), `answer_texts`;
4. config       `PoseLLaVAConfig`, the presets `tiny` / `llava-1.5-7b`, the trainable `<POSE>` rows.

What it is built from (in the order of the forward pass)
5. Llama        RMSNorm, rotary embeddings (Hugging Face's half-split layout), grouped-query attention
                with a preallocated KV cache, SwiGLU MLP, untied lm_head;
6. CLIP ViT     the vision tower as LLaVA uses it (features of the second-to-last layer) and the projector;
7. `Llava`      image features written into the image-token slots of the prompt, `forward` for training
                and scoring, `generate` for batched sampling (what the RFT loop spends its time in);
8. LoRA         `LoRALinear`, `apply_lora`, `merge_lora`, `lora_disabled`: the 7B preset trains the adapters;
9. pose ViT     `PoseViT`, the pose-aware encoder f_b (HMR2.0's ViT-H backbone, ViTPose layout).

File formats: not in the paper
10-11.          llava-hf's config.json (`LlamaConfig`, `CLIPVisionConfig`, `LlavaConfig`) and safetensors
                (`load_llava`, hub and transformers layouts);
12. `Tokenizer` the Llama byte-fallback BPE of llava-hf's `tokenizer.json`, and a small BPE trainer for
                the tiny preset (same file format);
13.             `load_pose_encoder` for HMR2.0's Lightning checkpoint, read without running pickled code;
14. checkpoints `save_checkpoint` / `load_checkpoint`: safetensors + JSON, only what was trained.

Run plumbing: not in the paper (shared by train_sft.py and train_rft.py): `--key=value`
overrides and config checks, torchrun setup, print0, the learning-rate schedule, gradient averaging,
metrics.jsonl and the --resume state.

Module and parameter names follow Hugging Face (`language_model.model.layers.0.self_attn.q_proj`, ...), so
our `state_dict()` is exactly what transformers' `save_pretrained` writes for LLaVA, loading any other
layout is a prefix rename, and LoRA can wrap the attention's `nn.Linear` children by name.
"""
from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import pickle
import re
import shutil
import typing
import zipfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

import hygrpo
import smpl

# ====================================================================================================
# The Pose-RFT policy (Sec. 3.1, Appendix A; Algorithm 1, line 6)
# ----------------------------------------------------------------------------------------------------
# 1. PoseLLaVA: the policy pi_theta(a, p | q) = pi_theta(a | q) pi_theta(p | q, a) of Eq. 1

IMAGE_TOKEN = "<image>"  # the same strings as data.IMAGE_TOKEN / data.POSE_TOKEN
POSE_TOKEN = "<POSE>"
PRESETS = ("tiny", "llava-1.5-7b")


@dataclass
class PoseLLaVAOutput:
    logits: torch.Tensor          # (B, T, V): logits[:, t] scores the token at t + 1
    hidden_states: torch.Tensor   # (B, T, d): last layer, after the final norm
    pose: PoseGaussian            # (B, 144) mu and log_std at each row's <POSE>; meaningless where not found
    found: torch.Tensor           # (B,) bool: the row has a <POSE> (in its answer, if answer_mask was given)
    pose_position: torch.Tensor   # (B,) long: the column of that first <POSE> (0 where none)


def _requires_grad(module):
    return any(p.requires_grad for p in module.parameters())


class PoseLLaVA(nn.Module):
    """The pose-specific MLLM of Sec. 3.1: pi_theta(a, p | q) = pi_theta(a | q) pi_theta(p | q, a) (Eq. 1;
    Eq. 12 writes the same as pi_d(a | q) pi_c(p | q, a)).

    The state: each image enters the prompt as L_a CLIP tokens W_a f_a(x) followed by L_b pose tokens
    W_b f_b(x) (Appendix A, Eq. 11), in the slots of its L_a + L_b `<image>` tokens. The discrete policy
    pi(a | q) is the LLM's next-token distribution; the continuous policy pi(p | q, a) is the Gaussian pose
    head on the last hidden state at the `<POSE>` token of the answer a (computed with `<POSE>` as the input
    token, as Llava.generate captures it).

    Parts: `llava` (f_a = llava.vision_tower, W_a = llava.multi_modal_projector, the Llama decoder with LoRA
    on its attention and the `<POSE>` rows spliced into embed_tokens / lm_head), `pose_encoder` (f_b),
    `pose_projector` (W_b), `pose_head`. Pass `llava` / `pose_encoder` to use loaded (pretrained) ones;
    otherwise they are built from the config with random weights (the tiny preset). The trained tensors
    are kept in float32 whatever the dtype of the frozen base: AdamW steps of lr 1e-6 (Table 4) on bf16
    weights would round to nothing.
    """

    def __init__(self, config, llava=None, pose_encoder=None):
        super().__init__()
        self.config = config
        for name, given, want in (("llava", llava, config.llava), ("pose_encoder", pose_encoder, config.pose_vit)):
            if given is not None and given.config.to_dict() != want.to_dict():
                raise ValueError(f"the given {name} was built from another config than PoseLLaVAConfig.{name}: "
                                 + "; ".join(_config_differences(given.config.to_dict(), want.to_dict())))
        self.llava = llava if llava is not None else Llava(config.llava)
        self.pose_encoder = pose_encoder if pose_encoder is not None else PoseViT(config.pose_vit)  # f_b
        device = self.llava.language_model.lm_head.weight.device
        d, d_b = config.llava.text_config.hidden_size, config.pose_vit.hidden_size
        # Eq. 11. W_a is LLaVA-1.5's pretrained 2-layer GELU projector (llava.multi_modal_projector): the
        # paper writes W_a as a linear map, but replacing LLaVA's trained MLP by a fresh linear layer would
        # throw away its CLIP-to-language alignment, which the paper builds on (Sec. 3.1). W_b is new:
        # HMR2.0's features have never been aligned to the LLM.
        self.pose_projector = nn.Linear(d_b, d, device=device)  # W_b
        with torch.no_grad():
            nn.init.normal_(self.pose_projector.weight, std=0.02)
            nn.init.zeros_(self.pose_projector.bias)
        self.pose_head = GaussianPoseHead(d, config.head_hidden, config.log_std_min, config.log_std_max,
                                          config.log_std_init, config.deterministic, device=device)
        self._splice_pose_token()
        apply_lora(self.llava.language_model, config.lora_targets, config.lora_r, config.lora_alpha,
                   config.lora_dropout)
        trained = set(self.trained_names("rft"))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in trained:
                    p.data = p.data.float()
        self._reference = None  # name -> frozen copy, set by freeze_reference()
        self.set_trainable("sft")

    @classmethod
    def from_preset(cls, name="tiny", tokenizer=None, device="cpu", dtype=torch.float32, **overrides):
        """build_pose_llava(PoseLLaVAConfig.from_preset(name, tokenizer, **overrides), device, dtype)."""
        return build_pose_llava(PoseLLaVAConfig.from_preset(name, tokenizer, **overrides), device, dtype)

    def _splice_pose_token(self):
        """Give `<POSE>` its own trainable rows in embed_tokens and lm_head, growing both tables first when
        the tokenizer's id lies beyond them."""
        lm, pose_id = self.llava.language_model, self.config.pose_token_id
        embed, head = lm.model.embed_tokens, lm.lm_head
        if pose_id >= embed.num_embeddings:
            embed, head = _grow_vocabulary(embed, head, pose_id + 1)
        lm.model.embed_tokens = EmbeddingWithNewToken(embed, pose_id)
        lm.lm_head = LMHeadWithNewToken(head, pose_id)

    @property
    def n_image_tokens(self):
        return self.config.n_image_tokens

    # --- the state: token-level fusion of the two encoders (Appendix A, Eq. 11)

    def encode_images(self, clip_pixels, pose_pixels):
        """v_a = f_a(x) (CLIP, LLaVA's feature layer) and v_b = f_b(x) (pose ViT) of the same n images,
        each preprocessed for its encoder (data.clip_preprocess / data.pose_vit_preprocess).
        -> v_a (n, L_a, d_a), v_b (n, L_b, d_b). A frozen encoder runs without building a graph."""
        if pose_pixels is None or clip_pixels.shape[0] != pose_pixels.shape[0]:
            shape = None if pose_pixels is None else tuple(pose_pixels.shape)
            raise ValueError(f"clip_pixels {tuple(clip_pixels.shape)} and pose_pixels {shape} must hold the same "
                             "images, each preprocessed for its encoder")
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and _requires_grad(self.llava.vision_tower)):
            v_a = self.llava.vision_features(clip_pixels)  # (n, L_a, d_a)
        with torch.set_grad_enabled(grad and _requires_grad(self.pose_encoder)):
            v_b = self.pose_encoder(pose_pixels)  # (n, L_b, d_b)
        return v_a, v_b

    def project(self, v_a, v_b):
        """Eq. 11 and the token-level fusion: cat([W_a v_a, W_b v_b], dim=1) -> (n, L_a + L_b, d).

        UniPose instead concatenates v_a and v_b along the channels and applies one projection
        W in R^{(d_a + d_b) x d}. That pairs CLIP's patch i with the pose ViT's patch i, but the two
        encoders see different crops and resolutions (CLIP a 336 x 336 square, HMR2.0 the central 256 x 192
        of its crop), so the pairs do not cover the same pixels. Projecting each sequence on its own and
        giving the LLM both as separate tokens avoids that misalignment and keeps each encoder's
        representation intact (Appendix A).
        """
        W_a, W_b = self.llava.multi_modal_projector, self.pose_projector
        v_a_proj = W_a(v_a.to(W_a.linear_1.weight.dtype))  # (n, L_a, d) v'_a
        v_b_proj = W_b(v_b.to(W_b.weight.dtype))  # (n, L_b, d) v'_b
        return torch.cat([v_a_proj, v_b_proj], dim=1)  # (n, L_a + L_b, d)

    def visual_tokens(self, clip_pixels, pose_pixels):
        """The visual tokens of n images, (n, L_a + L_b, d): what fills their `<image>` slots."""
        return self.project(*self.encode_images(clip_pixels, pose_pixels))  # (n, L_a + L_b, d)

    def embed(self, input_ids, visual=None):
        """Word embeddings of input_ids (B, T) with the `<image>` slots filled by `visual` (n, L_a + L_b, d),
        in reading order. -> (B, T, d)"""
        n_slots = int((input_ids == self.config.llava.image_token_index).sum())
        n_images = 0 if visual is None else visual.shape[0]
        if n_slots != n_images * self.n_image_tokens:
            raise ValueError(f"the prompts hold {n_slots} image tokens for {n_images} images; each image needs "
                             f"{self.n_image_tokens} = {self.config.llava.num_image_tokens} CLIP + "
                             f"{self.config.pose_vit.num_tokens} pose tokens (collate with n_image_tokens="
                             f"{self.n_image_tokens})")
        return self.llava.embed(input_ids, visual)  # (B, T, d)

    # --- the policy

    def pose_positions(self, input_ids, answer_mask=None):
        """The column of each row's first `<POSE>` (within answer_mask, if given) and whether there is one.
        input_ids (B, T) -> position (B,) long, 0 where none; found (B,) bool."""
        is_pose = input_ids == self.config.pose_token_id  # (B, T)
        if answer_mask is not None:
            is_pose = is_pose & answer_mask.bool()
        return is_pose.int().argmax(-1), is_pose.any(-1)  # (B,), (B,) argmax: the first maximum

    def forward(self, input_ids, attention_mask=None, clip_pixels=None, pose_pixels=None, answer_mask=None,
                logits_at=None):
        """Teacher-forced pass (SFT, evaluation): logits of every position and the pose Gaussian at the
        first `<POSE>` of each row.

        input_ids (B, T) with n * (L_a + L_b) image tokens, attention_mask (B, T) (1 = real token),
        clip_pixels (n, 3, S, S) and pose_pixels (n, 3, H, W) for the n images in reading order (None when
        no row has an image); answer_mask (B, T) bool marks the answer tokens (SFT: labels != -100), so a
        `<POSE>` written in a prompt is not read; logits_at (B, T) bool computes the logits at those
        positions only, (n, V) (Llava.forward). Returns a PoseLLaVAOutput.
        """
        visual = None
        if clip_pixels is not None and clip_pixels.shape[0] > 0:
            visual = self.visual_tokens(clip_pixels, pose_pixels)  # (n, L_a + L_b, d)
        x = self.embed(input_ids, visual)  # (B, T, d)
        out = self.llava(inputs_embeds=x, attention_mask=attention_mask, logits_at=logits_at)
        position, found = self.pose_positions(input_ids, answer_mask)  # (B,), (B,)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # (B,)
        h_pose = out.hidden_states[rows, position]  # (B, d)
        return PoseLLaVAOutput(logits=out.logits, hidden_states=out.hidden_states, pose=self.pose_head(h_pose),
                               found=found, pose_position=position)

    # --- what trains in each stage

    def trained_names(self, stage):
        """Names of the parameters trained in `stage` ("sft" or "rft"), following Sec. 4.1.

        llava-1.5-7b, both stages: LoRA adapters, W_a, W_b, the pose head and the two `<POSE>` rows; the
        encoders f_a, f_b and the LLM's own weights stay frozen.
        tiny SFT: everything (no pretrained weights exist) except the LoRA adapters, which would only
        duplicate the full weights; they stay at B = 0, so the SFT model is the plain network.
        tiny RFT: the same, less the encoders f_a, f_b (a rollout stores their features, policy_logprobs):
        the whole 4-layer LLM, W_a, W_b and the head. Not the paper's setting (adapters on
        a frozen 7B LLM; README, 'Departures'): a 7B LLM brings general features the adapters can
        recombine; the tiny one, trained from scratch on SFT's objective, must change its own.
        """
        if stage not in ("sft", "rft"):
            raise ValueError(f"stage={stage!r}; expected 'sft' or 'rft'")
        names = [n for n, _ in self.named_parameters()]
        is_lora = [n.endswith((".lora_A", ".lora_B")) for n in names]
        if self.config.preset == "tiny":
            encoders = ("llava.vision_tower.", "pose_encoder.")
            return [n for n, lora in zip(names, is_lora)
                    if not lora and (stage == "sft" or not n.startswith(encoders))]
        heads = ("llava.multi_modal_projector.", "pose_projector.", "pose_head.")
        return [n for n, lora in zip(names, is_lora) if lora or n.startswith(heads) or n.endswith(".new_row")]

    def set_trainable(self, stage):
        """requires_grad on exactly the parameters of trained_names(stage); returns how many numbers train."""
        trained = set(self.trained_names(stage))
        for name, p in self.named_parameters():
            p.requires_grad_(name in trained)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # --- the reference policy pi_ref

    @torch.no_grad()
    def freeze_reference(self):
        """Copy the RFT-trained tensors (trained_names("rft"); 7B: LoRA adapters, W_a, W_b, pose head,
        <POSE> rows; tiny: also its LLM) as pi_ref = pi_init (Algorithm 1, line 3). Call it at the start
        of RFT, after moving the model to its device. The 7B base is never copied."""
        trained = set(self.trained_names("rft"))
        self._reference = {n: p.detach().clone() for n, p in self.named_parameters() if n in trained}

    @contextlib.contextmanager
    def reference(self):
        """Inside this block the model IS the reference policy pi_ref: the frozen base with the copies
        taken by freeze_reference() in place of the trained tensors.

        pi_ref is sometimes described as "LoRA adapters off plus a frozen copy of the small heads". With the
        fresh adapters (B = 0) RFT starts from in the tiny preset, a copy of the adapters IS "off". When SFT
        already trained the adapters (the 7B preset trains LoRA in both stages), switching them off would
        make pi_ref the base LLaVA instead of the SFT model, and merging them into bf16 weights would round
        much of them away; a copy of them keeps pi_ref = the SFT model exactly. The swap replaces the
        Parameter objects (no in-place writes), so graphs built outside the block stay valid.
        """
        if self._reference is None:
            raise ValueError("no reference policy yet: call freeze_reference() at the start of RFT")
        outside = [n for n, p in self.named_parameters() if p.requires_grad and n not in self._reference]
        if outside:
            raise ValueError("parameters outside the reference copy are being trained, so pi_ref would drift "
                             "with them: " + _name_keys("names", outside) + " (use set_trainable('rft'))")
        swapped = []
        try:
            for name, frozen in self._reference.items():
                module_name, _, attr = name.rpartition(".")
                module = self.get_submodule(module_name)
                live = module._parameters[attr]
                swapped.append((module, attr, live))
                module._parameters[attr] = nn.Parameter(frozen.to(live.device), requires_grad=False)
            yield self
        finally:
            for module, attr, live in reversed(swapped):
                module._parameters[attr] = live


def build_pose_llava(config, device="cpu", dtype=torch.float32):
    """The PoseLLaVA of a config.

    tiny: random weights, float32, trained from scratch. llava-1.5-7b: on device="meta" a weightless model
    for shape and size checks; otherwise LLaVA-1.5-7B from config.llava_path (load_llava) and HMR2.0's
    backbone from config.pose_encoder_path, both in `dtype`, plus the new parts (W_b, pose head, <POSE> rows,
    LoRA) in float32. The SMPL file (config.smpl_path) is for the rewards and losses, not read here.
    """
    if config.preset == "tiny" or str(device) == "meta":
        with torch.device(device):
            return PoseLLaVA(config)
    missing = [name for name in ("llava_path", "pose_encoder_path") if getattr(config, name) is None]
    if missing:
        raise ValueError(f"the {config.preset} preset loads pretrained weights; set {missing} (llava_path: a "
                         f"llava-hf/llava-1.5-7b-hf folder; pose_encoder_path: HMR2.0's checkpoint). {_HMR2_HINT}")
    differences = _config_differences(read_llava_config(config.llava_path).to_dict(), config.llava.to_dict())
    if differences:  # before reading gigabytes of weights
        raise ValueError(f"{config.llava_path} holds another LLaVA than this config describes (file vs config): "
                         + "; ".join(differences))
    llava = load_llava(config.llava_path, dtype, device)
    f_b = load_pose_encoder(config.pose_encoder_path, config.pose_vit, dtype, device)
    return PoseLLaVA(config, llava=llava, pose_encoder=f_b)


# ----------------------------------------------------------------------------------------------------
# 2. The Gaussian pose head: the continuous policy pi_theta(p | q, a) of Eq. 2
#
# The pose action p is 24 joint rotations (SMPL: global orient + 23 body joints) in the 6-D representation
# of Zhou et al. (the first two columns of each rotation matrix, column 0 then column 1; smpl.py), so
# D = 24 x 6 = 144 numbers. Any 6 numbers map to a proper rotation by Gram-Schmidt, so a Gaussian over
# them is a valid policy over poses.
#
# The covariance is DIAGONAL (one log-std per dimension), not Eq. 2's full Sigma_theta: a full covariance
# over 144 dimensions would need 144 * 145 / 2 = 10440 outputs and a Cholesky factor per sample, while
# what the paper's policy needs, sampling, log-densities for the ratio r_c and an entropy, are O(D) sums
# over independent dimensions (as in continuous PPO policies). Correlations between joints are then
# carried only by the mean (hygrpo.py's note 8).

POSE_DIM = smpl.NUM_JOINTS * 6  # D = 144


def pose_to_matrices(p):
    """rot6d pose (B, 144) -> rotation matrices (B, 24, 3, 3), by Gram-Schmidt (smpl.rot6d_to_matrix)."""
    return smpl.rot6d_to_matrix(p.reshape(*p.shape[:-1], smpl.NUM_JOINTS, 6))  # (B, 24, 3, 3)


def pose_to_rot6d(axis_angle):
    """An SMPL pose in axis-angle (B, 24, 3), as data.py gives it -> the head's rot6d layout (B, 144):
    joint-major, each joint's column 0 then column 1. The SFT target of the pose head."""
    R = smpl.axis_angle_to_matrix(axis_angle)  # (B, 24, 3, 3)
    return smpl.matrix_to_rot6d(R).flatten(-2)  # (B, 144)


@dataclass
class PoseGaussian:
    """pi_theta(p | q, a) = N(p; mu, diag(exp(log_std)^2)) for a batch of B states (Eq. 2, diagonal)."""
    mu: torch.Tensor       # (B, 144) rot6d mean
    log_std: torch.Tensor  # (B, 144)

    def sample(self, generator=None):
        """p = mu + std * eps, eps ~ N(0, I). -> (B, 144)"""
        eps = torch.randn(self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)  # (B, 144)
        return self.mu + torch.exp(self.log_std) * eps  # (B, 144)

    def log_prob(self, p):
        """log pi_theta(p | q, a), summed over the 144 dimensions. p (B, 144) -> (B,)"""
        return hygrpo.gaussian_log_prob(p, self.mu, self.log_std)  # (B,)

    def entropy(self):
        """Closed-form entropy of the diagonal Gaussian. -> (B,)"""
        return hygrpo.gaussian_entropy(self.log_std)  # (B,)


class GaussianPoseHead(nn.Module):
    """The continuous pose head of Eq. 2: an MLP on the last-layer hidden state at the `<POSE>` token
    -> (mu, log_std) over 24 x rot6d.

    Initialisation: the mean layer has zero weights and the identity rotation [1,0,0, 0,1,0] per joint
    as its bias, so the untrained head predicts the rest pose for every input (its first update moves
    only that layer, like LoRA's zero B). log_std = log_std_min + (log_std_max - log_std_min) *
    sigmoid(raw): smooth and bounded. The default range [-5, 0]: rot6d entries lie in [-1, 1], so a std
    above 1 (log_std 0) spreads samples over every rotation and says nothing; the floor std = e^-5 ~ 0.007
    keeps the ratio r_c = pi_theta / pi_old finite when a sample sits many stds from a shifted mean, and
    keeps some exploration alive in RFT. The raw output starts at log_std = log_std_init.

    deterministic=True is the "Baseline" row of Table 3 (no distributional modelling): the head predicts
    the mean only and log_std is the constant log_std_init. Its negative log-likelihood is then a scaled
    MSE, 0.5 * |p - mu|^2 / sigma^2 + const, and sampling (if RFT is run on it) explores with that
    fixed std.
    """

    def __init__(self, d, hidden, log_std_min=-5.0, log_std_max=0.0, log_std_init=-1.0, deterministic=False,
                 device=None):
        super().__init__()
        if not log_std_min < log_std_init < log_std_max:
            raise ValueError(f"need log_std_min < log_std_init < log_std_max, got {log_std_min}, "
                             f"{log_std_init}, {log_std_max}")
        self.log_std_min, self.log_std_max, self.log_std_init = log_std_min, log_std_max, log_std_init
        self.deterministic = deterministic
        self.fc1 = nn.Linear(d, hidden, device=device)
        self.fc2 = nn.Linear(hidden, hidden, device=device)
        self.to_mu = nn.Linear(hidden, POSE_DIM, device=device)
        self.to_log_std = None if deterministic else nn.Linear(hidden, POSE_DIM, device=device)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            identity = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=device)  # (6,) rot6d of I
            nn.init.zeros_(self.to_mu.weight)
            self.to_mu.bias.copy_(identity.repeat(smpl.NUM_JOINTS))  # (144,)
            if self.to_log_std is not None:
                fraction = (log_std_init - log_std_min) / (log_std_max - log_std_min)
                nn.init.zeros_(self.to_log_std.weight)
                nn.init.constant_(self.to_log_std.bias, math.log(fraction / (1 - fraction)))  # sigmoid^-1

    def forward(self, h):
        """h (B, d), the hidden state at each row's `<POSE>` -> PoseGaussian with mu, log_std (B, 144),
        float32 whatever the autocast: under bf16 autocast the layers would give mu and log_std with 8
        significant bits, and the 144-d log-density built from them would be off by whole nats (r_c, the
        pose KL and Delta_hat's gradient with it). The head's weights are float32 (trained tensors are)."""
        device_type = h.device.type if h.device.type in ("cpu", "cuda") else "cpu"
        with torch.autocast(device_type, enabled=False):
            z = F.gelu(self.fc2(F.gelu(self.fc1(h.to(self.fc1.weight.dtype)))))  # (B, hidden)
            mu = self.to_mu(z)  # (B, 144)
            if self.deterministic:
                log_std = torch.full_like(mu, self.log_std_init)  # (B, 144)
            else:
                span = self.log_std_max - self.log_std_min
                log_std = self.log_std_min + span * torch.sigmoid(self.to_log_std(z))  # (B, 144)
        return PoseGaussian(mu=mu, log_std=log_std)


# ----------------------------------------------------------------------------------------------------
# 3. Policy sampling and scoring for RFT (Eq. 1; Algorithm 1, line 6)


@dataclass
class Rollout:
    """The candidates (a_i, p_i) ~ pi_theta(. | q) of a batch of prompts, group_size per prompt (G answers x
    pose_samples poses each; = G with one pose an answer, as in the paper), N = prompts x group_size,
    prompt-major: candidate i = b * group_size + k belongs to prompt b. Log-probs are those of the sampling
    policy (pi_old of hygrpo.py)."""
    group_size: int               # candidates per prompt, the group of Eq. 16: G answers x pose_samples
    prompt_ids: torch.Tensor      # (N, T0) long, left-padded prompts, each repeated group_size times
    prompt_mask: torch.Tensor     # (N, T0) bool
    tokens: torch.Tensor          # (N, Tn) long: the answer a_i; pad after the stop token
    mask: torch.Tensor            # (N, Tn) bool: generated tokens up to and including the stop token
    logprobs: torch.Tensor        # (N, Tn) float32: log pi_old(a_t | q, a_<t) at `temperature`; 0 where masked
    pose: torch.Tensor            # (N, 144) rot6d: p_i ~ N(mu_i, sigma_i); the mean where invalid
    pose_logprobs: torch.Tensor   # (N,) log pi_old(p_i | q, a_i); 0 where invalid
    mu: torch.Tensor              # (N, 144)
    log_std: torch.Tensor         # (N, 144)
    valid: torch.Tensor           # (N,) bool: the answer emitted <POSE>, so it has a pose (the set V of Eq. 6)
    v_a: torch.Tensor | None      # (n_img, L_a, d_a) frozen CLIP features of the prompts' images, once each
    v_b: torch.Tensor | None      # (n_img, L_b, d_b) frozen pose-ViT features
    temperature: float = 1.0      # the text's sampling temperature; every log-prob of the answer is taken at it
    pose_samples: int = 1         # poses drawn per answer; an answer's pose_samples rows are consecutive


@torch.no_grad()
def sample_policy(model, batch, G, max_new_tokens, temperature=1.0, top_p=1.0, generator=None, pose_samples=1):
    """Sample G hybrid answers per prompt: text a_i by Llava.generate (KV cache, stopping at eos), and for
    every answer that emitted `<POSE>`, a pose p_i from the Gaussian head at that token (Eq. 1, 2).

    pose_samples > 1 (not in the paper; hygrpo.py note 9): each answer's pose is drawn pose_samples times
    from its Gaussian, so a prompt has G x pose_samples candidates (a_i, p_ij), an answer's draws in
    consecutive rows. The text is generated, and later scored, once per answer; only the cheap pose draws
    are repeated. The returned Rollout has group_size = G x pose_samples candidates per prompt.

    batch: data.collate(..., for_generation=True) output (input_ids / attention_mask left-padded,
    clip_pixels, pose_pixels). The frozen encoders run once per image, and the LLM's prefill once per prompt
    (generate's num_return_sequences repeats its KV cache G times). Sampling uses temperature / top_p for
    the text; the recorded log-probs are at that temperature (the sampling policy, see Llava.generate), and
    policy_logprobs scores at it too.
    Put the model in eval() if it has dropout.
    Returns a Rollout.
    """
    if G < 1:
        raise ValueError(f"G={G}; need at least one answer per prompt")
    cfg = model.config
    v_a = v_b = visual = None
    if batch["clip_pixels"].shape[0] > 0:
        v_a, v_b = model.encode_images(batch["clip_pixels"], batch["pose_pixels"])  # (n, L_a, d_a), (n, L_b, d_b)
        visual = model.project(v_a, v_b)  # (n, L_a + L_b, d)
    x = model.embed(batch["input_ids"], visual)  # (B, T0, d) each prompt once
    eos = cfg.llava.text_config.eos_token_id
    gen = model.llava.generate(inputs_embeds=x, attention_mask=batch["attention_mask"].bool(),
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               stop_token_ids=() if eos is None else (eos,), pad_token_id=cfg.llava.pad_token_id,
                               capture_token_id=cfg.pose_token_id, generator=generator,
                               num_return_sequences=G)  # (A, ...) rows, the A = B*G answers prompt-major
    prompt_ids = batch["input_ids"].repeat_interleave(G, dim=0)  # (A, T0)
    prompt_mask = batch["attention_mask"].bool().repeat_interleave(G, dim=0)  # (A, T0)
    pose_samples = int(pose_samples)
    if pose_samples < 1:
        raise ValueError(f"pose_samples={pose_samples}; need at least one pose per answer")
    rep = lambda t: t.repeat_interleave(pose_samples, dim=0)  # noqa: E731  (A, ...) -> (N, ...), N = A*pose_samples
    dist = model.pose_head(rep(gen.captured_hidden))  # (N, 144) each
    valid = rep(gen.captured)  # (N,)
    pose = torch.where(valid[:, None], dist.sample(generator), dist.mu)  # (N, 144)
    pose_logprobs = torch.where(valid, dist.log_prob(pose), torch.zeros_like(dist.mu[:, 0]))  # (N,)
    return Rollout(group_size=G * pose_samples, prompt_ids=rep(prompt_ids), prompt_mask=rep(prompt_mask),
                   tokens=rep(gen.tokens), mask=rep(gen.mask), logprobs=rep(gen.logprobs), pose=pose,
                   pose_logprobs=pose_logprobs, mu=dist.mu, log_std=dist.log_std, valid=valid, v_a=v_a, v_b=v_b,
                   temperature=temperature, pose_samples=pose_samples)


class PolicyScores(typing.NamedTuple):
    """What policy_logprobs returns."""
    logprobs: torch.Tensor       # (N, Tn) log pi(a_t | q, a_<t) of the rollout's tokens; 0 where masked
    pose_logprobs: torch.Tensor  # (N,) log pi(p_i | q, a_i) of the rollout's poses; 0 where invalid
    pose: PoseGaussian           # (N, 144) mu, log_std of pi(p | q, a_i); an invalid row reads some other token


def policy_logprobs(model, rollout):
    """Score a rollout under the model's CURRENT parameters, with gradients (teacher forcing): the
    per-token log-probs of the sampled answers and the log-densities of the sampled poses, read at the
    first generated `<POSE>` of each answer, the tokens at the rollout's sampling temperature (the old,
    current and reference policies are all tempered alike). Under `model.reference()` it scores pi_ref. With the
    parameters that sampled the rollout it reproduces rollout.logprobs / pose_logprobs (up to float
    rounding). Returns PolicyScores (logprobs, pose_logprobs, pose: the Gaussians themselves).

    The prompt's visual tokens are rebuilt from the stored encoder features with the current W_a, W_b;
    the encoders themselves must be frozen (they are in RFT), since their features were stored without
    a graph.
    """
    if torch.is_grad_enabled() and (_requires_grad(model.llava.vision_tower) or _requires_grad(model.pose_encoder)):
        raise ValueError("policy_logprobs reuses the rollout's stored encoder features, so f_a and f_b must be "
                         "frozen (model.set_trainable('rft'))")
    pose_samples = rollout.pose_samples  # each answer appears pose_samples times in a row
    G = rollout.group_size // pose_samples  # answers per prompt
    T0, Tn = rollout.prompt_ids.shape[1], rollout.tokens.shape[1]
    tokens, mask = rollout.tokens[::pose_samples], rollout.mask[::pose_samples]  # (A, Tn) the answers
    # A prompt's G answers are often the same text (the pose template): run each distinct (prompt, answer)
    # through the LLM once and share its scores. The result is the same as scoring every row; the
    # gradient of a shared row is the sum over its copies, as it would be.
    prompt_of = torch.arange(tokens.shape[0], device=tokens.device) // G  # (A,) the answer's prompt b
    key = torch.cat([prompt_of[:, None], torch.where(mask, tokens, -1)], dim=1)  # (A, 1 + Tn)
    distinct, copy_of = torch.unique(key, dim=0, return_inverse=True)  # (U, 1 + Tn), (A,) sorted by prompt
    first_copy = torch.full((distinct.shape[0],), tokens.shape[0], dtype=torch.long, device=tokens.device)
    first_copy = first_copy.scatter_reduce(0, copy_of, torch.arange(tokens.shape[0], device=tokens.device),
                                           reduce="amin")  # (U,) one answer row per distinct pair
    rows = first_copy * pose_samples  # (U,) their rows in the rollout
    prompt_ids, prompt_mask = rollout.prompt_ids[rows], rollout.prompt_mask[rows]  # (U, T0)
    tokens_u, mask_u = rollout.tokens[rows], rollout.mask[rows]  # (U, Tn)
    visual = None
    if rollout.v_a is not None:
        first_rows = rollout.prompt_ids[::rollout.group_size]  # (B, T0) each prompt once
        has_image = (first_rows == model.config.llava.image_token_index).any(-1)  # (B,)
        image_of = torch.cumsum(has_image.long(), 0) - 1  # (B,) index into the rollout's images
        b = prompt_of[first_copy]  # (U,) prompt of each distinct pair, in order
        visual = model.project(rollout.v_a, rollout.v_b)[image_of[b[has_image[b]]]]  # (u_img, L_a + L_b, d)
    decoder, lm_head = model.llava.language_model.model, model.llava.language_model.lm_head
    # The generated tokens are embedded as words, even a sampled <image> id, as generate fed them.
    x = torch.cat([model.embed(prompt_ids, visual), decoder.embed_tokens(tokens_u)], dim=1)  # (U, T, d)
    key_mask = torch.cat([prompt_mask.bool(), mask_u.bool()], dim=1)  # (U, T)
    positions, attn_mask = positions_and_mask(key_mask, T0 + Tn)  # (U, T), (U, 1, T, T)
    h = decoder(x, positions, attn_mask)  # (U, T, d)
    logits = lm_head(h[:, T0 - 1:T0 + Tn - 1])  # (U, Tn, V): position t scores the token at t + 1
    logprobs = token_logprobs(logits, tokens_u, rollout.temperature).masked_fill(~mask_u.bool(), 0.0)  # (U, Tn)
    back = copy_of.repeat_interleave(pose_samples)  # (N,) each candidate's distinct pair
    logprobs = logprobs[back]  # (N, Tn) every copy of an answer scores alike
    first, found = model.pose_positions(tokens_u, mask_u)  # (U,), (U,)
    if not torch.equal(found[back], rollout.valid):
        raise ValueError("rollout.valid does not match the <POSE> tokens in rollout.tokens")
    pose_hidden = h[torch.arange(h.shape[0], device=h.device), T0 + first]  # (U, d) at each first <POSE>
    dist = model.pose_head(pose_hidden[back])  # (N, 144) each
    pose_logprobs = torch.where(rollout.valid, dist.log_prob(rollout.pose), torch.zeros_like(dist.mu[:, 0]))  # (N,)
    return PolicyScores(logprobs=logprobs, pose_logprobs=pose_logprobs, pose=dist)


def answer_texts(rollout, tokenizer):
    """The text a_i of every candidate of a rollout: its generated tokens up to, not including, </s>,
    decoded once per answer and shared by the answer's pose draws. -> list of N strings."""
    N, pose_samples = rollout.tokens.shape[0], rollout.pose_samples
    keep = rollout.mask & (rollout.tokens != tokenizer.eos_id)  # (N, Tn) the answer without </s>
    texts = [tokenizer.decode(rollout.tokens[i][keep[i]].tolist())
             for i in range(0, N, pose_samples)]  # one per answer
    return [t for t in texts for _ in range(pose_samples)]  # (N,) an answer's pose draws share its text


def reference_hidden_states(policy):
    """hidden_states(input_ids, attention_mask) of the frozen reference policy's decoder, for the text
    embedder stand-in (rewards.MeanPoolEmbedder): text only, no gradients. Every id is embedded as a
    word, as generation fed it (a garbage answer may contain the <image> id, which has no image here)."""
    decoder = policy.llava.language_model.model

    def hidden_states(input_ids, attention_mask):
        with torch.no_grad(), policy.reference():
            x = decoder.embed_tokens(input_ids)  # (B, T, d)
            positions, mask = positions_and_mask(attention_mask, input_ids.shape[1])  # (B, T), (B, 1, T, T)
            return decoder(x, positions, mask)  # (B, T, d) last layer, after the final norm
    return hidden_states


# ----------------------------------------------------------------------------------------------------
# 4. The policy's config and presets, and the <POSE> rows of the frozen LLM

# The config.json of llava-hf/llava-1.5-7b-hf (fields left out take transformers' defaults, see LlavaConfig).
LLAVA_15_7B_CONFIG = {
    "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "text_config": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14},
}


@dataclass
class PoseLLaVAConfig:
    """Everything that shapes the policy; stored with every checkpoint. Build one with `from_preset`.

    preset "tiny" trains from scratch on PoseWorld (no pretrained weights exist for it, so SFT trains
    everything); "llava-1.5-7b" is the paper's setting (Sec. 4.1): LLaVA-1.5-7B + HMR2.0's ViT-H, the
    encoders frozen, W_a, W_b, the pose head, the <POSE> rows and LoRA on the LLM trained.
    """
    preset: str
    llava: LlavaConfig                  # f_a (CLIP), W_a (LLaVA's projector) and the Llama decoder
    pose_vit: PoseViTConfig             # f_b
    pose_token_id: int                  # the id of <POSE> in the tokenizer (32002 for llava-hf's)
    head_hidden: int = 1024             # width of the pose head's MLP
    deterministic: bool = False         # True: Table 3's "Baseline", a mean-only pose head
    log_std_min: float = -5.0           # bounds of the pose head's log-std (see GaussianPoseHead)
    log_std_max: float = 0.0
    log_std_init: float = -1.0          # starting log-std; the fixed one when deterministic
    lora_r: int = 8                     # LoRA on the LLM's attention projections
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    llava_path: str | None = None       # llava-1.5-7b: llava-hf/llava-1.5-7b-hf folder (safetensors)
    pose_encoder_path: str | None = None  # llava-1.5-7b: HMR2.0 checkpoint (.ckpt) or backbone .safetensors
    smpl_path: str | None = None        # the SMPL model file the rewards and losses use (not read here)
    system_prompt: str | None = None    # the prompts' system line (data.build_prompt); None: LLaVA v1's, "": none

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}; expected one of {PRESETS}")
        self.lora_targets = tuple(self.lora_targets)

    @property
    def clip_size(self):
        """Side of the square CLIP input (data.collate's clip_size)."""
        return self.llava.vision_config.image_size

    @property
    def pose_size(self):
        """(H, W) of the pose-ViT input (data.collate's pose_size)."""
        return self.pose_vit.image_size

    @property
    def n_image_tokens(self):
        """Image tokens per image in a prompt: L_a CLIP tokens then L_b pose tokens (576 + 192 for 7B)."""
        return self.llava.num_image_tokens + self.pose_vit.num_tokens

    @classmethod
    def from_preset(cls, name="tiny", tokenizer=None, **overrides):
        """The `tiny` or `llava-1.5-7b` config. The token ids come from `tokenizer` (required for tiny,
        whose vocabulary is a BPE trained on PoseWorld; optional for 7B, whose llava-hf ids are known);
        `<POSE>` is added to the tokenizer if it lacks it. Overrides: any field, and for tiny the sizes
        of `_tiny_config`. llava-1.5-7b reads its sizes from the files when their paths are given:
        llava_path/config.json (read_llava_config) and the shapes in pose_encoder_path (read_pose_vit_config;
        `pose_vit={...}` sets what shapes cannot tell, such as the number of heads)."""
        if name == "tiny":
            if tokenizer is None:
                raise ValueError("the tiny preset takes its vocabulary from a tokenizer "
                                 "(Tokenizer.train_bpe on PoseWorld text); pass tokenizer=")
            return _tiny_config(tokenizer, **overrides)
        if name == "llava-1.5-7b":
            # The sizes come from the files the user has (so LLaVA-1.5-13B, or a smaller test model, works
            # unchanged); without them, the published 7B / ViT-H ones (the weightless `meta` dry run).
            llava_path, pose_path = overrides.get("llava_path"), overrides.get("pose_encoder_path")
            llava = read_llava_config(llava_path) if llava_path else LlavaConfig.from_dict(LLAVA_15_7B_CONFIG)
            pose_vit = overrides.pop("pose_vit", None) or {}  # a PoseViTConfig, or fields to set
            if not isinstance(pose_vit, PoseViTConfig):
                pose_vit = read_pose_vit_config(pose_path, **pose_vit) if pose_path else PoseViTConfig(**pose_vit)
            config = cls(preset=name, llava=llava, pose_vit=pose_vit, pose_token_id=32002, **overrides)
            if tokenizer is not None:
                ids = _token_ids(tokenizer)
                if ids["image"] != config.llava.image_token_index:
                    raise ValueError(f"the tokenizer's {IMAGE_TOKEN} is {ids['image']}, LLaVA-1.5's is "
                                     f"{config.llava.image_token_index}: use llava-hf's tokenizer.json")
                config.pose_token_id = ids["pose"]
            return config
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")

    @classmethod
    def from_dict(cls, d):
        kwargs = _known_fields(cls, d)
        kwargs["llava"] = LlavaConfig.from_dict(d["llava"])
        kwargs["pose_vit"] = PoseViTConfig.from_dict(d["pose_vit"])
        return cls(**kwargs)

    def to_dict(self):
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(llava=self.llava.to_dict(), pose_vit=self.pose_vit.to_dict(), lora_targets=list(self.lora_targets))
        return d


def _token_ids(tokenizer):
    """The special-token ids the model needs, adding <POSE> to the tokenizer when it is missing."""
    image = tokenizer.token_to_id(IMAGE_TOKEN)
    if image is None:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")
    pose = tokenizer.add_special_tokens([POSE_TOKEN])[0]
    return {"image": image, "pose": pose, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
            "pad": tokenizer.pad_id}


def _tiny_config(tokenizer, llm_hidden=128, llm_layers=4, llm_heads=4, llm_kv_heads=2, llm_mlp=344,
                 clip_image_size=64, clip_patch_size=16, clip_hidden=96, clip_layers=3, clip_heads=4,
                 pose_image_size=(64, 48), pose_hidden=96, pose_layers=3, pose_heads=4, head_hidden=256,
                 **fields_):
    """The tiny preset, sized for a 2-core CPU: a 4-layer Llama of width 128, a CLIP tower on 64 x 64
    images (4 x 4 = 16 tokens, of which LLaVA's second-to-last layer is read) and a pose ViT on 64 x 48
    crops (patch 16, padding 2: 4 x 3 = 12 tokens), both of width 96. Every size is an argument."""
    ids = _token_ids(tokenizer)
    vocab_size = max(tokenizer.vocab_size, ids["pose"] + 1, ids["image"] + 1)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=llm_hidden, intermediate_size=llm_mlp,
                       num_hidden_layers=llm_layers, num_attention_heads=llm_heads, num_key_value_heads=llm_kv_heads,
                       max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=ids["bos"],
                       eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    vision = CLIPVisionConfig(hidden_size=clip_hidden, intermediate_size=4 * clip_hidden, num_hidden_layers=clip_layers,
                              num_attention_heads=clip_heads, image_size=clip_image_size, patch_size=clip_patch_size)
    llava = LlavaConfig(text_config=text, vision_config=vision, image_token_index=ids["image"], pad_token_id=ids["pad"])
    pose_vit = PoseViTConfig(image_size=pose_image_size, hidden_size=pose_hidden, num_hidden_layers=pose_layers,
                             num_attention_heads=pose_heads)
    return PoseLLaVAConfig(preset="tiny", llava=llava, pose_vit=pose_vit, pose_token_id=ids["pose"],
                           head_hidden=head_hidden, **fields_)


def _flatten(d, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _config_differences(have, want):
    """'field: have vs want' for each field of the (possibly partial) dict `want` that `have` sets
    differently. Fields ending in _path say where weights are, not what the network is: not compared."""
    have, want = _flatten(have), _flatten(want)
    return [f"{k}: {have.get(k, '<absent>')!r} vs {v!r}" for k, v in sorted(want.items())
            if not k.endswith("_path") and have.get(k, "<absent>") != v]


class EmbeddingWithNewToken(nn.Embedding):
    """embed_tokens whose row for one new token (`<POSE>`) is a separate Parameter, `new_row`.

    Why: in the 7B preset the LLM is frozen except LoRA, yet the model has to learn to READ `<POSE>`. A
    separate (d,) parameter spliced in at that id trains just that row; training the whole table with its
    other rows' gradients masked would still hand all 32k rows to the optimizer (weight decay, moments)
    and to the checkpoint. The base table keeps its key (`embed_tokens.weight`), so a base checkpoint
    loads as before; its own row at the new id is simply never read.
    """

    def __init__(self, base, token_id):
        super().__init__(base.num_embeddings, base.embedding_dim, device="meta")
        self.weight = base.weight  # (V, d), the frozen table
        self.token_id = token_id
        self.new_row = nn.Parameter(_mean_of_other_rows(base.weight, token_id))  # (d,)

    def forward(self, ids):
        x = F.embedding(ids, self.weight)  # (B, T, d)
        return torch.where((ids == self.token_id)[..., None], self.new_row.to(x.dtype), x)  # (B, T, d)

    def extra_repr(self):
        return f"{super().extra_repr()}, new token {self.token_id}"


class LMHeadWithNewToken(nn.Linear):
    """lm_head whose output row for one new token (`<POSE>`) is a separate Parameter, `new_row`, so that
    the frozen model can learn to EMIT `<POSE>` (see EmbeddingWithNewToken for why a separate row)."""

    def __init__(self, base, token_id):
        if base.bias is not None:
            raise ValueError("LMHeadWithNewToken expects Llama's bias-free lm_head")
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # (V, d), frozen
        self.token_id = token_id
        self.new_row = nn.Parameter(_mean_of_other_rows(base.weight, token_id))  # (d,)

    def forward(self, h):
        logits = F.linear(h, self.weight)  # (..., V)
        new_logit = F.linear(h, self.new_row.to(h.dtype)[None])  # (..., 1)
        i = self.token_id
        return torch.cat([logits[..., :i], new_logit, logits[..., i + 1:]], dim=-1)  # (..., V)

    def extra_repr(self):
        return f"{super().extra_repr()}, new token {self.token_id}"


@torch.no_grad()
def _mean_of_other_rows(weight, token_id):
    """The mean of every row but `token_id`, in float32: the usual start for a new token's embedding and
    output rows (Hewitt 2021). A random row would have the wrong scale; the mean sits among the real words,
    and as an output row it gives the new token the average logit, so adding it barely changes the model's
    distribution over the old tokens (and the new token starts neither certain nor impossible)."""
    V = weight.shape[0]
    total = weight.sum(0, dtype=torch.float32)  # (d,)
    if token_id < V:
        total = total - weight[token_id].float()
        V = V - 1
    return total / V  # (d,)


@torch.no_grad()
def _grow_vocabulary(embed, lm_head, n_rows):
    """embed_tokens and lm_head with n_rows rows: the old rows copied, the new ones the mean of the old
    (for ids the tokenizer gives beyond the table; llava-hf's 32064 rows already cover <POSE> = 32002)."""
    V, d = embed.weight.shape
    like = dict(device=embed.weight.device, dtype=embed.weight.dtype)
    new_embed = nn.Embedding(n_rows, d, **like)
    new_head = nn.Linear(d, n_rows, bias=False, **like)
    for new, old in ((new_embed, embed), (new_head, lm_head)):
        new.weight[:V] = old.weight
        new.weight[V:] = old.weight.float().mean(0).to(old.weight.dtype)
    return new_embed, new_head


# ====================================================================================================
# What the policy is built from: LLaVA-1.5 (Llama decoder, CLIP ViT, projector), LoRA, the pose ViT
#
# Written out in plain PyTorch with Hugging Face's module names, in the order of the forward pass.
# ----------------------------------------------------------------------------------------------------
# 5. The Llama decoder


class RMSNorm(nn.Module):
    """x / rms(x) * weight. The mean square is taken in float32 even under bf16/fp16 (as Llama does):
    squaring half-precision activations loses too much."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., d)
        return self.weight * x32.to(x.dtype)  # (..., d)


def rotary_cos_sin(positions, head_dim, theta):
    """cos and sin of the rotary angles position * theta^(-2i / head_dim), in float32.

    positions (B, T) -> cos, sin (B, 1, T, head_dim): the head_dim/2 frequencies are written twice,
    [f_0 .. f_{k-1}, f_0 .. f_{k-1}], because Hugging Face's Llama weights rotate the two HALVES of each
    head against each other (rotate_half) rather than interleaved pairs as in Meta's original code.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim  # (hs/2,)
    inv_freq = 1.0 / theta ** exponents  # (hs/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate queries or keys x (B, h, T, hs) by the angles whose cos/sin are given (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, hs/2) each
    rotated_half = torch.cat([-x2, x1], dim=-1)  # (B, h, T, hs)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)  # (B, h, T, hs)


def attention(q, k, v, mask):
    """Scaled dot-product attention with grouped-query heads.

    q (B, h, Tq, hs); k, v (B, kvh, Tk, hs) with h a multiple of kvh; mask (B, 1, Tq, Tk) bool, True where
    a query may attend. Query head i reads key/value head i // (h // kvh), as in Hugging Face's repeat_kv.
    Instead of copying the keys and values h // kvh times, the query heads that share one key/value head
    are stacked along the query axis, so the (possibly cached) keys and values are used in place.
    SDPA's fused kernels accumulate the softmax in float32 under bf16/fp16 autocast.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        q = rearrange(q, "B (kvh g) Tq hs -> B kvh (g Tq) hs", g=group)  # (B, kvh, group*Tq, hs)
        mask = mask.repeat(1, 1, group, 1)  # (B, 1, group*Tq, Tk)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, kvh, group*Tq, hs)
    return rearrange(y, "B kvh (g Tq) hs -> B (kvh g) Tq hs", g=group)  # (B, h, Tq, hs)


class KVCache:
    """Keys and values of every decoder layer for one batch being generated, preallocated to `max_len`.

    Each layer's buffers, (B, kvh, max_len, hs), are allocated at its first write, so they take the dtype
    of the keys (bf16 under autocast). `length` counts the positions filled; the decoder advances it after
    all its layers have written.
    """

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0
        self.k, self.v = {}, {}

    def update(self, layer, k, v):
        """Write k, v (B, kvh, T, hs) at positions [length, length + T) of `layer`; return the keys and
        values of positions [0, length + T), each (B, kvh, length + T, hs)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing {start}..{end}")
        if layer not in self.k:
            B, kvh, _, hs = k.shape
            self.k[layer] = k.new_empty(B, kvh, self.max_len, hs)  # (B, kvh, max_len, hs)
            self.v[layer] = v.new_empty(B, kvh, self.max_len, hs)  # (B, kvh, max_len, hs)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_interleave(self, n):
        """Repeat every row n times in place, row b becoming rows b*n .. b*n+n-1: after a prefill shared by
        n samples of each prompt (Llava.generate's num_return_sequences)."""
        for store in (self.k, self.v):
            for layer, buffer in store.items():
                store[layer] = buffer.repeat_interleave(n, dim=0)  # (B*n, kvh, max_len, hs)


class LlamaAttention(nn.Module):
    """Causal self-attention with rotary positions, grouped-query heads and an optional KV cache."""

    def __init__(self, config, layer_idx):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, mask, cache=None):
        q = rearrange(self.q_proj(x), "B T (h hs) -> B h T hs", hs=self.head_dim)  # (B, h, T, hs)
        k = rearrange(self.k_proj(x), "B T (kvh hs) -> B kvh T hs", hs=self.head_dim)  # (B, kvh, T, hs)
        v = rearrange(self.v_proj(x), "B T (kvh hs) -> B kvh T hs", hs=self.head_dim)  # (B, kvh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, kvh, S, hs), S = cached + T
        y = attention(q, k, v, mask)  # (B, h, T, hs)
        return self.o_proj(rearrange(y, "B h T hs -> B T (h hs)"))  # (B, T, d)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)  # (B, T, d)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, d)


def positions_and_mask(attention_mask, T):
    """Rotary positions and the attention mask for the last T of the S tokens in `attention_mask`.

    attention_mask (B, S): 1 for real tokens, 0 for padding (left padding in generation, right padding in
    training); the first S - T tokens are already in the KV cache. Returns
      positions (B, T): counted from each row's first real token (a left-padded row starts at 0, as in
                        transformers' generate); padding gets position 0;
      mask (B, 1, T, S) bool: query i may see key j if j is a real token at or before i. A padding query
                        also sees itself, so no row of the softmax is empty (its output is never used).
    """
    S = attention_mask.shape[1]
    real = attention_mask.bool()  # (B, S)
    positions = (real.long().cumsum(-1)[:, S - T:] - 1).clamp(min=0)  # (B, T)
    q_idx = torch.arange(S - T, S, device=real.device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=real.device)[None, :]  # (1, S)
    mask = (k_idx <= q_idx) & (real[:, None, None, :] | (k_idx == q_idx))  # (B, 1, T, S)
    return positions, mask


class LlamaModel(nn.Module):
    """Token embeddings, the decoder layers and the final RMSNorm.

    Set `gradient_checkpointing = True` to recompute each layer's activations in the backward pass instead
    of storing them (training only; it trades ~30% more compute for far less memory at 7B).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, positions, mask, cache=None):
        """inputs_embeds (B, T, d), positions (B, T), mask (B, 1, T, S) -> last hidden states (B, T, d),
        after the final norm. With a cache, the T new positions are appended to it."""
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)  # (B, 1, T, hs)
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)  # (B, T, d)
            else:
                x = layer(x, cos, sin, mask, cache)  # (B, T, d)
        if cache is not None:
            cache.length += inputs_embeds.shape[1]
        return self.norm(x)  # (B, T, d)


class LlamaForCausalLM(nn.Module):
    """Holds the decoder (`model`) and the untied output projection (`lm_head`) under the names of the
    checkpoint (`language_model.model.*`, `language_model.lm_head.*`). `Llava` calls the two parts itself,
    because generation needs the logits of the last position only."""

    def __init__(self, config):
        super().__init__()
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ----------------------------------------------------------------------------------------------------
# 6. The CLIP vision tower and the projector


class CLIPEmbeddings(nn.Module):
    """Class token + non-overlapping patches (a strided conv without bias) + learned position embeddings."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, s, s)
        patches = rearrange(patches, "N D s1 s2 -> N (s1 s2) D")  # (N, P, D), row-major over the patch grid
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (N, 1, D)
        x = torch.cat([cls, patches], dim=1)  # (N, 1+P, D)
        return x + self.position_embedding.weight  # (N, 1+P, D)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head self-attention over the image tokens."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.n_head = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x):
        q, k, v = (rearrange(p(x), "N L (nh hs) -> N nh L hs", nh=self.n_head)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (N, nh, L, hs) each
        y = F.scaled_dot_product_attention(q, k, v)  # (N, nh, L, hs)
        return self.out_proj(rearrange(y, "N nh L hs -> N L (nh hs)"))  # (N, L, D)


class CLIPMLP(nn.Module):
    """fc2(quick_gelu(fc1(x))), with CLIP's quick GELU x * sigmoid(1.702 x)."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        h = self.fc1(x)  # (N, L, D_ff)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # (N, L, D)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))  # (N, L, D)
        return x + self.mlp(self.layer_norm2(x))  # (N, L, D)


class CLIPVisionTower(nn.Module):
    """CLIP's ViT image encoder f_a, as LLaVA reads it: the hidden states of one inner layer.

    `pre_layrnorm` is the real (misspelt) checkpoint name. `post_layernorm`, and with the default
    feature layer -2 also the last encoder layer, are in the checkpoint and loaded, but LLaVA never uses them.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # unused by LLaVA

    def forward(self, pixel_values, feature_layer=-2):
        """pixel_values (N, C, H, W) -> hidden states (N, 1+P, D) of `feature_layer`, counted as in
        transformers' `hidden_states`: 0 is the embeddings after pre_layrnorm, i the output of layer i, -1
        the last layer, -2 the second-to-last. Layers after the requested one are not run."""
        n_layers = len(self.encoder["layers"])
        k = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
        if not 0 <= k <= n_layers:
            raise ValueError(f"vision_feature_layer={feature_layer} is outside a {n_layers}-layer tower")
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (N, 1+P, D)
        for layer in self.encoder["layers"][:k]:
            x = layer(x)  # (N, 1+P, D)
        return x


class LlavaProjector(nn.Module):
    """The 2-layer GELU MLP ('mlp2x_gelu') of LLaVA-1.5 that maps CLIP features to the LLM width: the W_a
    of Appendix A (Eq. 11), which writes it as a single linear map."""

    def __init__(self, vision_dim, text_dim, bias=True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, v):
        return self.linear_2(F.gelu(self.linear_1(v)))  # (N, L, d)


# ----------------------------------------------------------------------------------------------------
# 7. The multimodal model


@dataclass
class LlavaOutput:
    logits: torch.Tensor         # (B, T, V): logits[:, t] scores the token at t + 1
    hidden_states: torch.Tensor  # (B, T, d): the last layer's output after the final norm


@dataclass
class Generation:
    """What `Llava.generate` returns; Tn <= max_new_tokens (it stops early once every row has stopped)."""
    tokens: torch.Tensor    # (B, Tn) long: sampled tokens; pad after a row's stop token
    logprobs: torch.Tensor  # (B, Tn) float32: log pi(token) = log_softmax(logits / temperature); 0 where masked
    mask: torch.Tensor      # (B, Tn) bool: True for generated tokens up to and including the stop token
    captured_hidden: torch.Tensor | None = None  # (B, d): hidden state at the first generated capture token
    captured: torch.Tensor | None = None         # (B,) bool: whether the row generated the capture token
    logits: torch.Tensor | None = None           # (B, Tn, V) float32 raw logits, with output_logits=True


def draw_from(probs, generator=None):
    """One index per row with probability probs[b, i] (rows need not sum to 1), by inverting the
    cumulative distribution: a cumsum and a binary search, several times cheaper than torch.multinomial
    on CPU. probs (B, V) -> (B,) long."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * cdf[:, -1:]  # (B, 1)
    # right=True skips zero-probability entries (flat steps of the cdf); the clamp guards u == total.
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[1] - 1)  # (B,)


def sample_next(logits, temperature, top_p, generator=None, max_rejections=4):
    """One token per row from softmax(logits / temperature) restricted to its top-p nucleus, or the argmax
    when temperature == 0. logits (B, V) -> (B,) long.

    The nucleus holds token j if the tokens more likely than j carry less than top_p of the probability
    (so the most likely token is always in it). Sorting the vocabulary every step, as the usual top-p code
    does, dominates the cost of a small model's step on CPU, so the nucleus is sampled by rejection: draw
    j from the full distribution and keep it if j is in the nucleus, which takes one pass over the row.
    The kept draws follow the renormalised nucleus exactly, and each draw is kept with probability
    >= top_p. Rows still rejected after `max_rejections` draws (rare unless top_p is small) are sampled
    from their sorted nucleus instead.
    """
    if temperature == 0:
        return logits.argmax(-1)  # (B,)
    probs = (logits / temperature).softmax(-1)  # (B, V)
    if top_p >= 1.0:
        return draw_from(probs, generator)  # (B,)
    token = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)  # (B,)
    todo = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)  # (B,)
    for _ in range(max_rejections):
        draw = draw_from(probs, generator)  # (B,)
        p_draw = probs.gather(-1, draw[:, None])  # (B, 1)
        in_nucleus = (probs * (probs > p_draw)).sum(-1) < top_p  # (B,) mass of the more likely tokens
        token = torch.where(todo & in_nucleus, draw, token)  # (B,)
        todo = todo & ~in_nucleus
        if not bool(todo.any()):
            return token
    rows = todo.nonzero()[:, 0]  # (R,)
    sorted_probs, order = probs[rows].sort(-1, descending=True)  # (R, V) each
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (R, V)
    rank = draw_from(sorted_probs.masked_fill(mass_before >= top_p, 0.0), generator)  # (R,)
    token[rows] = order.gather(-1, rank[:, None])[:, 0]
    return token


def scoring_temperature(temperature):
    """The temperature log-probs are taken at: the sampling temperature, or 1 for greedy decoding (0)."""
    return temperature if temperature > 0 else 1.0


def token_logprobs(logits, targets, temperature=1.0):
    """log pi(target) under the logits (teacher forcing): log_softmax(logits / temperature)[target], in
    float32.

    logits (B, T, V) and targets (B, T) must already be aligned: logits[:, t] scores targets[:, t]. For a
    model output that means `token_logprobs(out.logits[:, :-1], input_ids[:, 1:])`. These are the
    log pi_theta(a_t) of the token-level ratio in the RFT objective, at the temperature the answers were
    sampled at: the policy that sampled is softmax(logits / T), so the old, current and reference
    log-probs are all scored at T (as TRL's GRPOTrainer does in _get_per_token_logps, `logits /
    self.temperature`, and verl's dp_actor in _forward_micro_batch, `logits.div_(temperature)`). Top-p
    truncation is not scored, as in both.
    """
    logits = logits.float() / scoring_temperature(temperature)  # (B, T, V)
    picked = logits.gather(-1, targets[..., None])[..., 0]  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)


class Llava(nn.Module):
    """LLaVA-1.5 (the backbone of Sec. 4.1): CLIP features of the image, projected into the word-embedding
    space, stand in for the `<image>` tokens of the prompt; the Llama decoder reads the whole sequence."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision_config)
        self.multi_modal_projector = LlavaProjector(config.vision_config.hidden_size,
                                                    config.text_config.hidden_size,
                                                    config.multimodal_projector_bias)
        self.language_model = LlamaForCausalLM(config.text_config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        """N(0, 0.02) weights and zero biases, as transformers initialises Llama and LLaVA. Only matters
        when training from scratch (the tiny preset); checkpoints overwrite it."""
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, CLIPEmbeddings):
            nn.init.normal_(module.class_embedding, std=0.02)

    def vision_features(self, pixel_values):
        """v_a = f_a(x) of Appendix A: CLIP features of `vision_feature_layer`, class token dropped for the
        'default' strategy. pixel_values (N, C, H, W), CLIP-normalised -> (N, L, D_v)."""
        v = self.config.vision_config
        expected = (v.num_channels, v.image_size, v.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (N, {expected[0]}, "
                             f"{expected[1]}, {expected[2]})")
        v_a = self.vision_tower(pixel_values, self.config.vision_feature_layer)  # (N, 1+P, D_v)
        if self.config.vision_feature_select_strategy == "default":
            v_a = v_a[:, 1:]  # (N, P, D_v)
        return v_a

    def image_features(self, pixel_values):
        """W_a v_a: the projected CLIP features that fill the image-token slots, (N, L, d)."""
        return self.multi_modal_projector(self.vision_features(pixel_values))  # (N, L, d)

    def embed(self, input_ids, image_features=None):
        """Word embeddings of input_ids (B, T), with the image-token positions replaced, in reading order
        (row by row, left to right), by the rows of image_features (n_images, L, d): the prompt must hold
        exactly n_images * L image tokens. Any feature sequence works (e.g. [W_a v_a; W_b v_b] of Eq. 11).
        Returns inputs_embeds (B, T, d)."""
        is_image = input_ids == self.config.image_token_index  # (B, T)
        # The image token id may lie outside the vocabulary; its embedding is overwritten anyway.
        x = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, d)
        n_tokens = int(is_image.sum())
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            shape = None if image_features is None else tuple(image_features.shape)
            raise ValueError(f"the prompt holds {n_tokens} image tokens (id {self.config.image_token_index}) "
                             f"but there are {n_features} image features (image_features shape {shape}); the prompt "
                             f"needs one image token per feature ({self.config.num_image_tokens} per CLIP image)")
        if n_tokens:
            x = x.masked_scatter(is_image[..., None], image_features.to(x.dtype))  # (B, T, d)
        return x

    def _inputs_embeds(self, input_ids, pixel_values, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if pixel_values is not None:
                raise ValueError("pixel_values go with input_ids; with inputs_embeds, embed the images first "
                                 "(Llava.embed)")
            return inputs_embeds
        features = None if pixel_values is None else self.image_features(pixel_values)  # (N, L, d)
        return self.embed(input_ids, features)  # (B, T, d)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, inputs_embeds=None, logits_at=None):
        """Logits and last hidden states of a whole sequence (training, scoring).

        input_ids (B, T) with image tokens and pixel_values (N, C, H, W), or inputs_embeds (B, T, d) from
        `embed`; attention_mask (B, T), 1 = real token, 0 = padding (left or right), default all real.
        logits_at (B, T) bool: the LM head runs only at these positions and logits is (n, V), in row-major
        order; SFT needs the answer's positions only, and the head over the prompt's (32000 x 4096 a
        position for 7B) would be wasted work and memory. Default: every position, logits (B, T, V).
        """
        x = self._inputs_embeds(input_ids, pixel_values, inputs_embeds)  # (B, T, d)
        B, T, _ = x.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        positions, mask = positions_and_mask(attention_mask, T)  # (B, T), (B, 1, T, T)
        h = self.language_model.model(x, positions, mask)  # (B, T, d)
        if logits_at is not None:
            if tuple(logits_at.shape) != (B, T):
                raise ValueError(f"logits_at has shape {tuple(logits_at.shape)}; expected (B, T) = {(B, T)}")
            return LlavaOutput(logits=self.language_model.lm_head(h[logits_at.bool()]), hidden_states=h)  # (n, V)
        return LlavaOutput(logits=self.language_model.lm_head(h), hidden_states=h)  # (B, T, V)

    # no_grad rather than inference_mode: the sampled tokens are fed back into a training forward, and
    # inference tensors cannot be saved for backward.
    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, inputs_embeds=None, *,
                 max_new_tokens=64, temperature=1.0, top_p=1.0, stop_token_ids=(), pad_token_id=None,
                 capture_token_id=None, generator=None, output_logits=False, num_return_sequences=1):
        """Sample up to max_new_tokens per row with a KV cache (the rollout step of Algorithm 1).

        Prompts are LEFT-padded (attention_mask zeros on the left) so that every row's next token sits in
        the same cache slot; positions count from each row's first real token. Each step samples from
        softmax(logits / temperature) within the top-p nucleus (greedy when temperature == 0). A row stops
        after it emits one of stop_token_ids; afterwards it emits pad_token_id (default: config.pad_token_id,
        else 0) with mask False and logprob 0. Call model.eval() first if the model has dropout.

        `logprobs` are log pi(token) = log_softmax(logits / temperature) at the sampled token, the policy
        that sampled it (temperature 1 when greedy), without the top-p truncation: the RFT ratio needs
        log pi_old of the sampled action, which the teacher-forced `token_logprobs(..., temperature)`
        recomputes the same way.

        With capture_token_id (e.g. the `<POSE>` token), `captured_hidden` is the last hidden state (after
        the final norm) AT the first generated occurrence of that token, i.e. computed with that token as
        the input, as LISA/ChatPose read their [SEG] token; one extra forward is run if it is the last token.

        num_return_sequences = G > 1 samples G answers per prompt: the inputs are the B0 distinct prompts,
        the prefill runs once on them, and its KV cache and last hidden state are then repeated to B = B0*G
        rows, row b*G+g being prompt b's g-th answer. The result equals generating from the prompts repeated
        G times (repeat_interleave), with the same draws from `generator` (up to float rounding), without
        paying G times for the prefill. Returns a `Generation` with B rows.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; expected at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature}, top_p={top_p}; expected temperature >= 0, 0 < top_p <= 1")
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences={num_return_sequences}; expected at least 1")
        x = self._inputs_embeds(input_ids, pixel_values, inputs_embeds)  # (B0, T0, d) the distinct prompts
        B0, T0, _ = x.shape
        device = x.device
        if attention_mask is None:
            attention_mask = torch.ones(B0, T0, dtype=torch.bool, device=device)
        if not attention_mask[:, -1].all():
            raise ValueError("generate needs LEFT padding: attention_mask has a 0 in its last column")
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        pad = 0 if pad is None else pad
        stop_ids = torch.tensor(sorted({stop_token_ids} if isinstance(stop_token_ids, int) else set(stop_token_ids)),
                                dtype=torch.long, device=device)  # (n_stop,)
        decoder, lm_head = self.language_model.model, self.language_model.lm_head

        # Prefill: the whole prompt in one pass, once per distinct prompt; only its last position is needed.
        cache = KVCache(T0 + max_new_tokens)
        positions, mask = positions_and_mask(attention_mask, T0)  # (B0, T0), (B0, 1, T0, T0)
        h = decoder(x, positions, mask, cache)[:, -1]  # (B0, d)
        # Then each prompt's G answers share it: row b becomes rows b*G .. b*G+G-1.
        G = num_return_sequences
        if G > 1:
            cache.repeat_interleave(G)
            h = h.repeat_interleave(G, dim=0)  # (B, d), B = B0*G
        B = B0 * G
        key_mask = torch.ones(B, T0 + max_new_tokens, dtype=torch.bool, device=device)  # (B, T0 + N)
        key_mask[:, :T0] = attention_mask.bool().repeat_interleave(G, dim=0)  # (B, T0)
        tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)  # (B, N)
        logprobs = torch.zeros(B, max_new_tokens, device=device)  # (B, N)
        gen_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # (B, N)
        step_logits = [] if output_logits else None
        done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        captured = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        captured_hidden = x.new_zeros(B, x.shape[-1]) if capture_token_id is not None else None  # (B, d)
        for i in range(max_new_tokens):
            logits = lm_head(h).float()  # (B, V)
            if output_logits:
                step_logits.append(logits)
            token = sample_next(logits, temperature, top_p, generator)  # (B,)
            scored = logits / scoring_temperature(temperature)  # (B, V) the sampling policy's logits
            logp = scored.gather(-1, token[:, None])[:, 0] - torch.logsumexp(scored, dim=-1)  # (B,)
            live = ~done  # (B,) rows still generating
            token = token.masked_fill(done, pad)  # (B,)
            tokens[:, i], logprobs[:, i], gen_mask[:, i] = token, logp.masked_fill(done, 0.0), live
            done = done | torch.isin(token, stop_ids)  # (B,)
            hit = None
            if capture_token_id is not None:
                hit = live & ~captured & (token == capture_token_id)  # (B,)
            last = i == max_new_tokens - 1 or bool(done.all())
            if last and (hit is None or not bool(hit.any())):
                break
            # Feed the sampled tokens: this computes the next logits and the hidden state AT them.
            positions, mask = positions_and_mask(key_mask[:, :T0 + i + 1], 1)  # (B, 1), (B, 1, 1, T0+i+1)
            # Rows that had already stopped feed token 0, a valid id whatever pad is; their outputs are masked.
            embeds = decoder.embed_tokens(token.masked_fill(~live, 0))[:, None]  # (B, 1, d)
            h = decoder(embeds, positions, mask, cache)[:, 0]  # (B, d)
            if hit is not None:
                captured_hidden = torch.where(hit[:, None], h.to(captured_hidden.dtype), captured_hidden)
                captured = captured | hit
            if last:
                break
        n = i + 1
        return Generation(tokens=tokens[:, :n], logprobs=logprobs[:, :n], mask=gen_mask[:, :n],
                          captured_hidden=captured_hidden,
                          captured=captured if capture_token_id is not None else None,
                          logits=torch.stack(step_logits, dim=1) if output_logits else None)


# ----------------------------------------------------------------------------------------------------
# 8. LoRA (Hu et al. 2022)
#
# Design: LoRALinear *is* an nn.Linear (a subclass) that adopts the wrapped layer's own weight and bias
# Parameters. So the state-dict keys of the base stay `...q_proj.weight` / `...q_proj.bias`: a base
# checkpoint loads into a wrapped model (load_state_dict(strict=False) then reports only the lora_A /
# lora_B keys as missing), and a merged model has exactly the base's keys. Keeping the base as a child
# module instead would rename its keys to `...q_proj.base.weight` and need load/save hooks to undo that.


class LoRALinear(nn.Linear):
    """h = W0 x + b + (alpha / r) * B A dropout(x)   (LoRA, Hu et al. 2022, Eq. 3 and Sec. 4.1)

    W0 (d_out, d_in) and b are the frozen base; A (r, d_in) starts like nn.Linear's default
    (Kaiming-uniform, as the paper's code and peft do) and B (d_out, r) at zero, so at init the layer
    equals its base exactly. A and B take the base's device and dtype; the adapter runs in the input's
    dtype. With `disabled` set (see lora_disabled) the layer is just its base.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        if not isinstance(base, nn.Linear) or isinstance(base, LoRALinear):
            raise ValueError(f"LoRALinear wraps a plain nn.Linear, got {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        # built on the meta device: the base's own Parameters replace these at once, nothing is copied
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # (d_out, d_in)
        self.bias = base.bias  # (d_out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., d_out)
        if self.disabled:
            return y
        Ax = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return y + self.scale * F.linear(Ax, self.lora_B.to(x.dtype))  # (..., d_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child_name, new)


def apply_lora(module: nn.Module, targets=("q_proj", "k_proj", "v_proj", "o_proj"), r: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets` (at any depth) in a LoRALinear.

    Returns the dotted names of the wrapped layers. In those layers only lora_A / lora_B require grad
    afterwards; every other parameter of `module` keeps its requires_grad. To train only the adapters
    (the paper's LLM setting), call module.requires_grad_(False) first and re-enable what else should
    train (e.g. the projectors and the pose head). Pass the language model, not the whole LLaVA: the
    CLIP tower's attention also names its layers q_proj / k_proj / v_proj.
    """
    found = [(name, m) for name, m in module.named_modules()
             if name and name.rpartition(".")[2] in targets and isinstance(m, nn.Linear)]
    wrapped_already = [name for name, m in found if isinstance(m, LoRALinear)]
    if wrapped_already:
        raise ValueError(f"apply_lora: {wrapped_already[:4]} already carry LoRA; merge_lora first")
    if not found:
        linear_names = sorted({n.rpartition(".")[2] for n, m in module.named_modules()
                               if isinstance(m, nn.Linear)})
        raise ValueError(f"apply_lora: no nn.Linear named one of {tuple(targets)} in {type(module).__name__}; "
                         f"its linear layers are named {linear_names[:12]}")
    for name, linear in found:
        _replace_submodule(module, name, LoRALinear(linear, r=r, alpha=alpha, dropout=dropout))
    return [name for name, _ in found]


@torch.no_grad()
def merge_lora(module: nn.Module) -> list[str]:
    """Fold each adapter into its base, W0 <- W0 + (alpha / r) B A, and put a plain nn.Linear back.

    The merged model has no LoRA modules, the base's state-dict keys, and the same outputs (up to
    rounding in the weight dtype). The merged weights stay frozen (requires_grad False). Returns the
    merged layer names.
    """
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, LoRALinear)]
    if any(name == "" for name, _ in layers):
        raise ValueError("merge_lora: pass the module that contains the LoRALinear, not the layer itself")
    for name, lora in layers:
        delta = lora.scale * (lora.lora_B.float() @ lora.lora_A.float())  # (d_out, d_in), summed in fp32
        lora.weight.add_(delta.to(lora.weight.dtype))
        plain = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        plain.weight, plain.bias = lora.weight, lora.bias
        _replace_submodule(module, name, plain)
    return [name for name, _ in layers]


@contextlib.contextmanager
def lora_disabled(module: nn.Module):
    """Inside this block every LoRALinear in `module` acts as its frozen base: the reference policy
    pi_ref of RFT without a second copy of the weights. Raises if `module` has no LoRA layer, since a
    "reference" identical to the policy would silently make the KL term zero."""
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("lora_disabled: the module has no LoRA layers "
                         "(apply_lora first; a merged model has none)")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield module
    finally:
        for m, state in zip(layers, before):
            m.disabled = state


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed as in module.state_dict() (`<layer>.lora_A`, `<layer>.lora_B`),
    so module.load_state_dict(sd, strict=False) puts them back into a model wrapped the same way."""
    sd = {}
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            prefix = f"{name}." if name else ""
            sd[prefix + "lora_A"] = m.lora_A.detach()  # (r, d_in)
            sd[prefix + "lora_B"] = m.lora_B.detach()  # (d_out, r)
    return sd


# ----------------------------------------------------------------------------------------------------
# 9. The pose-aware encoder f_b: HMR2.0's ViT-H backbone (Appendix A)
#
# HMR2.0 (Goel et al. 2023, 4D-Humans `hmr2/models/backbones/vit.py`) uses the ViTPose layout of a plain
# ViT: a patch-16 convolution WITH padding 2 (so 256 x 192 pixels give a 16 x 12 grid), no class token,
# pre-norm blocks with a fused qkv projection, exact GELU, LayerNorm eps 1e-6 and a final `last_norm`.
# Module and parameter names are those of its checkpoint with the `backbone.` prefix removed.


@dataclass
class PoseViTConfig:
    """The pose-aware ViT f_b. Defaults are HMR2.0's ViT-H (`vit(cfg)` in 4D-Humans): 256 x 192 input,
    patch 16, padding 2, width 1280, depth 32, 16 heads, MLP ratio 4, qkv with bias."""
    image_size: tuple = (256, 192)   # (H, W): HMR2.0 feeds the central 192 columns of its 256 x 256 crop
    patch_size: int = 16
    patch_padding: int = 2           # ViTPose: padding = 4 + 2 * (ratio // 2 - 1), with ratio = 1
    hidden_size: int = 1280          # d_b
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    def __post_init__(self):
        self.image_size = tuple(int(s) for s in self.image_size)
        if len(self.image_size) != 2:
            raise ValueError(f"PoseViTConfig.image_size={self.image_size}; expected (H, W)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        # pos_embed has (H // p) * (W // p) patch rows and is added without interpolation, so the padded
        # convolution must give exactly that grid (it does for 256 x 192 and for the tiny 64 x 48).
        H, W = self.image_size
        if self.grid != (H // self.patch_size, W // self.patch_size):
            raise ValueError(f"image_size={self.image_size}, patch_size={self.patch_size}, padding="
                             f"{self.patch_padding} give a {self.grid} patch grid but pos_embed has "
                             f"{(H // self.patch_size, W // self.patch_size)}; pick sizes where they agree")

    @property
    def grid(self):
        """(Hp, Wp), the patch grid the padded convolution produces."""
        p, pad = self.patch_size, self.patch_padding
        return tuple((s + 2 * pad - p) // p + 1 for s in self.image_size)

    @property
    def num_tokens(self):
        """L_b, the number of pose tokens per image: 16 x 12 = 192 for HMR2.0."""
        Hp, Wp = self.grid
        return Hp * Wp

    @classmethod
    def from_dict(cls, d):
        return cls(**_known_fields(cls, d))

    def to_dict(self):
        return {**asdict(self), "image_size": list(self.image_size)}


class PatchEmbed(nn.Module):
    """16 x 16 patches of the image zero-padded by 2 pixels on each side (ViTPose's PatchEmbed: kernel 16,
    stride 16, padding 2), so the grid starts 2 pixels before the image and 256 x 192 gives 16 x 12."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.proj = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, padding=c.patch_padding)

    def forward(self, pixels):
        x = self.proj(pixels.to(self.proj.weight.dtype))  # (N, D, Hp, Wp)
        return rearrange(x, "N D Hp Wp -> N (Hp Wp) D")  # (N, Hp*Wp, D), row-major over the grid


class PoseViTAttention(nn.Module):
    """Bidirectional multi-head attention with one fused qkv projection (scale head_dim^-0.5)."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(D, 3 * D, bias=True)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        # the fused output is laid out [q | k | v], each split into heads
        qkv = rearrange(self.qkv(x), "N L (qkv nh hs) -> qkv N nh L hs", qkv=3, nh=self.n_head)  # (3, N, nh, L, hs)
        q, k, v = qkv  # (N, nh, L, hs) each
        y = F.scaled_dot_product_attention(q, k, v)  # (N, nh, L, hs)
        return self.proj(rearrange(y, "N nh L hs -> N L (nh hs)"))  # (N, L, D)


class PoseViTMLP(nn.Module):
    """fc2(gelu(fc1(x))) with the exact (erf) GELU of nn.GELU."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.fc1 = nn.Linear(D, config.mlp_ratio * D)
        self.fc2 = nn.Linear(config.mlp_ratio * D, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # (N, L, D)


class PoseViTBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + mlp(norm2(x)). (Drop-path is training-only.)"""

    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = PoseViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PoseViTMLP(config)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))  # (N, L, D)
        return x + self.mlp(self.norm2(x))  # (N, L, D)


class PoseViT(nn.Module):
    """f_b of Appendix A: v_b = f_b(x), one token per patch of the HMR2.0-style person crop."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        H, W = config.image_size
        n_patches = (H // config.patch_size) * (W // config.patch_size)
        self.patch_embed = PatchEmbed(config)
        # One row more than there are patches: ViTPose keeps the position table of its class-token
        # pretraining although it has no class token, and adds that extra row to every patch (forward).
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, config.hidden_size))  # (1, P+1, D)
        self.blocks = nn.ModuleList(PoseViTBlock(config) for _ in range(config.num_hidden_layers))
        self.last_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(module):
        """N(0, 0.02) weights and zero biases (the tiny preset trains from scratch; HMR2.0's file overwrites it)."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, pixels):
        """pixels (N, 3, H, W), ImageNet-normalised (data.pose_vit_preprocess) -> v_b (N, L_b, d_b), the
        Hp x Wp grid flattened row-major, after last_norm."""
        c = self.config
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (c.num_channels, *c.image_size):
            raise ValueError(f"pose ViT pixels have shape {tuple(pixels.shape)}; expected (N, {c.num_channels}, "
                             f"{c.image_size[0]}, {c.image_size[1]})")
        x = self.patch_embed(pixels)  # (N, L_b, D)
        x = x + self.pos_embed[:, 1:] + self.pos_embed[:, :1]  # (N, L_b, D)
        for block in self.blocks:
            x = block(x)  # (N, L_b, D)
        return self.last_norm(x)  # (N, L_b, D)


# ====================================================================================================
# File formats: not in the paper
#
# Hugging Face configs and llava-hf safetensors, the Llama BPE tokenizer.json, HMR2.0's Lightning
# checkpoint (read without running pickled code), and this project's own checkpoints.
# ----------------------------------------------------------------------------------------------------
# 10. Hugging Face configs (config.json of llava-hf)


def _known_fields(cls, d):
    """The entries of the dict `d` that are fields of the dataclass `cls` (the rest is bookkeeping such as
    `architectures`, `torch_dtype` or initialisation settings, which do not change the network)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class LlamaConfig:
    """The Llama decoder. Defaults are transformers' `LlamaConfig` defaults (Llama-2-7B sizes); note that
    llava-1.5's Vicuna uses rms_norm_eps=1e-5 and a vocabulary of 32064, both set in its config.json."""
    vocab_size: int = 32000
    hidden_size: int = 4096                # d, the width of the residual stream
    intermediate_size: int = 11008         # SwiGLU hidden width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: one key/value head per query head (no GQA)
    head_dim: int | None = None            # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048    # the context the model was trained for; not enforced
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d):
        """Read a transformers `text_config` dict (old `rope_theta` or new `rope_parameters` spelling)."""
        rope = d.get("rope_parameters") or {}
        if d.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise ValueError(f"text_config asks for RoPE scaling ({d.get('rope_scaling') or rope}); "
                             "only plain RoPE (LLaVA-1.5's) is implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text_config hidden_act={d['hidden_act']!r}; Llama's SwiGLU needs 'silu'")
        if d.get("tie_word_embeddings", False):
            raise ValueError("text_config ties lm_head to embed_tokens; LLaVA-1.5 keeps them separate")
        kwargs = _known_fields(cls, d)
        kwargs["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", cls.rope_theta)))
        return cls(**kwargs)

    def to_dict(self):
        """A `text_config` dict that this class and transformers both read back to the same network."""
        d = asdict(self)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        return {"model_type": "llama", "hidden_act": "silu", "tie_word_embeddings": False, **d}


@dataclass
class CLIPVisionConfig:
    """The CLIP ViT. Defaults are transformers' `CLIPVisionConfig` defaults (ViT-B/32); LLaVA-1.5 uses
    ViT-L/14 at 336 px (see `LlavaConfig.vision_config`)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d):
        """Read a transformers `vision_config` dict."""
        if d.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"vision_config hidden_act={d['hidden_act']!r}; CLIP uses 'quick_gelu'")
        for key in ("image_size", "patch_size"):
            if isinstance(d.get(key), (list, tuple)):
                raise ValueError(f"vision_config {key}={d[key]}: only square images and patches are supported")
        return cls(**_known_fields(cls, d))

    def to_dict(self):
        return {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", **asdict(self)}


def _clip_vit_l14_336():
    """LLaVA-1.5's vision tower, what transformers' LlavaConfig builds when `vision_config` is absent."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)


@dataclass
class LlavaConfig:
    """LLaVA-1.5: a CLIP vision tower, a 2-layer GELU projector and a Llama decoder.

    Defaults are transformers' `LlavaConfig` defaults. As in transformers, a missing `vision_config` gives
    CLIP ViT-L/14-336 but a `vision_config` dict with missing fields fills them with plain CLIP defaults,
    and a missing `text_config` (or field of it) takes the Llama defaults. The hub's llava-1.5-7b-hf
    config.json names the fields that differ, so it reads as the real 7B model.
    """
    text_config: LlamaConfig = field(default_factory=LlamaConfig)
    vision_config: CLIPVisionConfig = field(default_factory=_clip_vit_l14_336)
    image_token_index: int = 32000           # the `<image>` token; each one is replaced by one visual feature
    vision_feature_layer: int = -2           # second-to-last CLIP layer (LLaVA-1.5, Sec. 4.1 backbone)
    vision_feature_select_strategy: str = "default"  # 'default': drop the class token; 'full': keep it
    multimodal_projector_bias: bool = True
    pad_token_id: int | None = None          # the hub checkpoint uses 32001; generate() pads with it

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}; "
                             "expected 'default' or 'full'")
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer={self.vision_feature_layer!r}: only a single layer index "
                             "is supported (LLaVA-1.5 uses -2)")

    @property
    def num_image_tokens(self):
        """Visual features per image, hence `<image>` tokens per image in a prompt: 576 for 336 px, patch 14."""
        v = self.vision_config
        n_patches = (v.image_size // v.patch_size) ** 2
        return n_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @classmethod
    def from_dict(cls, d):
        """Read a llava-hf `config.json` (already parsed)."""
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"projector_hidden_act={d['projector_hidden_act']!r}; LLaVA-1.5 uses 'gelu'")
        if d.get("tie_word_embeddings", False):
            raise ValueError("config ties lm_head to embed_tokens; LLaVA-1.5 keeps them separate")
        kwargs = _known_fields(cls, d)
        kwargs["text_config"] = LlamaConfig.from_dict(d.get("text_config") or {})
        if d.get("vision_config") is not None:
            kwargs["vision_config"] = CLIPVisionConfig.from_dict(d["vision_config"])
        else:
            kwargs.pop("vision_config", None)
        return cls(**kwargs)

    def to_dict(self):
        """A llava-hf style `config.json` dict (readable by `from_dict` and by transformers)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["text_config"] = self.text_config.to_dict()
        d["vision_config"] = self.vision_config.to_dict()
        return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                "projector_hidden_act": "gelu", "tie_word_embeddings": False, **d}


# ----------------------------------------------------------------------------------------------------
# 11. Loading llava-hf checkpoints

# Checkpoint key prefix -> our prefix. Our names are what transformers' save_pretrained writes for LLaVA
# (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`, `multi_modal_projector.*`,
# checked with transformers 5.x); the hub's llava-1.5-7b-hf nests the vision tower one level deeper, and
# a raw state_dict() of transformers >= 4.52 puts everything under `model.` except `lm_head`.
_KEY_RENAMES = (
    ("vision_tower.vision_model.", "vision_tower."),                 # hub checkpoint
    ("model.vision_tower.vision_model.", "vision_tower."),           # transformers 4.52+ state_dict
    ("model.vision_tower.", "vision_tower."),                        # transformers 5 state_dict
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
_LLAVA_PREFIXES = ("vision_tower.", "multi_modal_projector.", "language_model.")


def checkpoint_key_to_name(key):
    """Our parameter name for a checkpoint key in any of the layouts above (unchanged if none applies)."""
    for old, new in _KEY_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _weight_files(path):
    """The safetensors files of a checkpoint folder: the shards named by model.safetensors.index.json, or
    the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} is listed in {index} but does not exist; download every shard")
        return files
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json "
                            "(a llava-hf checkpoint in safetensors format)")


def _name_keys(problem, keys, limit=5):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {problem}: {', '.join(keys[:limit])}{more}"


def load_llava_weights(model, path, dtype=torch.float32, device="cpu"):
    """Fill the LLaVA parameters of `model` (a `Llava` or a subclass, possibly on the meta device) from the
    safetensors checkpoint in folder `path`, shard by shard.

    Every checkpoint key must name a parameter of the model with the same shape, and every parameter
    under vision_tower., multi_modal_projector. and language_model. must be in the checkpoint; otherwise
    a ValueError names the keys, before any weight is read. Tensors are read one at a time and assigned
    into the model (load_state_dict(assign=True)), so the peak memory stays near one copy of the weights
    plus one shard's worth of mapped file pages. Parameters outside those prefixes are left untouched.
    """
    path = Path(path)
    files = _weight_files(path)
    params = model.state_dict()
    names, source = {}, {}  # checkpoint key -> our name, and back
    unknown, mismatched, duplicated = [], [], []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = checkpoint_key_to_name(key)
                if name not in params:
                    unknown.append(key)
                    continue
                if name in source:
                    duplicated.append(f"{key} and {source[name]}")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(params[name].shape):
                    mismatched.append(f"{key} {shape} vs model {tuple(params[name].shape)}")
                names[key], source[name] = name, key
    missing = [n for n in params if n.startswith(_LLAVA_PREFIXES) and n not in source]
    problems = [_name_keys(what, keys) for what, keys in
                (("unknown checkpoint keys", unknown), ("missing keys", missing),
                 ("shape mismatches", mismatched), ("keys naming the same parameter", duplicated))
                if keys]
    if problems:
        raise ValueError(f"checkpoint {path} does not fit the model built from its config.json: "
                         + "; ".join(problems))
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            shard = {names[key]: f.get_tensor(key).to(dtype) for key in f.keys()}
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    return model


def read_llava_config(path):
    """The LlavaConfig of a llava-hf checkpoint folder, from its config.json (missing fields: defaults)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a llava-hf checkpoint folder with "
                                "config.json and model.safetensors (or model.safetensors.index.json)")
    try:
        return LlavaConfig.from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a llava-hf config.json ({type(e).__name__}: {e})") from None


def load_llava(path, dtype=torch.float32, device="cpu"):
    """Build LLaVA-1.5 from a llava-hf checkpoint folder: config.json plus model.safetensors or a sharded
    model.safetensors.index.json, in the hub layout or the one transformers' save_pretrained writes.

    The model is built on the meta device (no memory), then each parameter is materialised from the file
    in `dtype` on `device`. device="meta" reads config.json only: a weightless model for shape and memory
    checks (the `llava-1.5-7b` preset's dry run).
    """
    path = Path(path)
    config = read_llava_config(path)
    with torch.device("meta"):
        model = Llava(config)
    if str(device) == "meta":
        return model.to(dtype)
    load_llava_weights(model, path, dtype, device)
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise ValueError(f"checkpoint {path} left parameters unfilled: " + _name_keys("keys", left))
    return model


# ----------------------------------------------------------------------------------------------------
# 12. The tokenizer: Llama byte-fallback BPE in the Hugging Face tokenizer.json format
#
# The pipeline of `tokenizers`, which we mirror step by step so ids agree with it exactly:
#   1. added tokens (<s>, <image>, <POSE>, ...) found literally in the text are split out first;
#   2. every remaining segment is normalized. Llama files come in two variants:
#        legacy (llava-hf):  normalizer Prepend("▁") + Replace(" " -> "▁"), no pre-tokenizer, so each
#                            segment, even the one right after "<image>", gets its own leading "▁";
#        newer:              no normalizer, pre-tokenizer Metaspace(prepend_scheme="first"): spaces become
#                            "▁" and only the segment at the very start of the text gets a leading "▁";
#   3. BPE over each word: start from characters (a character missing from the vocab becomes its UTF-8
#      bytes <0xNN>), then repeatedly merge the adjacent pair with the lowest merge rank;
#   4. decoding reverses it: "▁" -> " ", runs of <0xNN> fused back into UTF-8, one leading space dropped.

# The reader core both tokenizers share (this Llama BPE and rewards.UnigramTokenizer, BGE-M3's): the file,
# the "Sequence" nesting of its components, the Metaspace options, and the added tokens.


def read_tokenizer_json(path: str, missing: FileNotFoundError) -> dict:
    """The whole `tokenizer.json` at path as a dict; `missing` is raised when there is no such file (each
    caller says where the file should come from), a ValueError naming the file when it is not JSON."""
    if not os.path.isfile(path):
        raise missing
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a Hugging Face tokenizer.json") from None


def tokenizer_components(spec: dict | None, key: str) -> list[dict]:
    """The leaf components of a normalizer / pre_tokenizer / decoder entry: a "Sequence" lists its parts
    under `key` ("normalizers", "pretokenizers", "decoders"), and may nest; None gives []."""
    if spec is None:
        return []
    if spec["type"] == "Sequence":
        return [leaf for part in spec[key] for leaf in tokenizer_components(part, key)]
    return [spec]


def metaspace_options(spec: dict) -> tuple[str, str, bool]:
    """(replacement, prepend_scheme, split) of a Metaspace pre-tokenizer. Files written before
    tokenizers 0.14 say add_prefix_space (true meant "always") instead of prepend_scheme."""
    scheme = spec.get("prepend_scheme") or ("always" if spec.get("add_prefix_space", True) else "never")
    return spec.get("replacement", SPIECE), scheme, spec.get("split", True)


def added_tokens(spec: dict, source: str) -> list[dict]:
    """The added_tokens entries (<s>, </s>, <image>, <POSE>, ...), refusing single_word ones, which
    neither tokenizer here matches as `tokenizers` would."""
    tokens = spec.get("added_tokens") or []
    for tok in tokens:
        if tok.get("single_word"):
            raise ValueError(f"{source}: added token {tok['content']!r} has single_word=true, not supported")
    return tokens


SPIECE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_token(b: int) -> str:
    return f"<0x{b:02X}>"


def _cut_before(segment: str, rep: str) -> list[str]:
    """The words of a segment, cut before each `rep` ("▁"), which stays attached to the word it starts:
    "x▁a▁▁b" -> "x", "▁a", "▁", "▁b"."""
    r = re.escape(rep)
    return re.findall(f"{r}[^{r}]*|[^{r}]+", segment)


class Tokenizer:
    """Hand-written reader/writer of a Llama byte-fallback BPE `tokenizer.json`.

    Encode and decode give the same ids and strings as Hugging Face `tokenizers` on the files it writes
    for Llama (tested on both the legacy and the Metaspace variant). Supported pieces of the format:
    normalizer Prepend / Replace (string patterns); pre-tokenizer Metaspace; model BPE with byte_fallback,
    fuse_unk, ignore_merges, merges as "a b" strings or [a, b] pairs; decoder Replace / ByteFallback /
    Fuse / Strip. Anything else is refused at load time rather than silently mis-tokenized.

    bos/eos/pad are looked up by their Llama names "<s>", "</s>", "<pad>" (tokenizer.json itself does not
    say which token is which; tokenizer_config.json does, and for Llama these are the names).
    """

    def __init__(self, spec: dict, source: str = "<dict>"):
        self.spec = spec  # the whole tokenizer.json; save() writes it back with any new added tokens
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{source}: expected a BPE model (Llama tokenizer.json), got {model.get('type')!r}")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) is not None:
                raise ValueError(f"{source}: BPE option {key}={model[key]!r} is not supported (Llama uses null)")
        self.vocab: dict[str, int] = dict(model["vocab"])  # the BPE model's own tokens -> ids
        self.byte_fallback = bool(model.get("byte_fallback", False))
        self.fuse_unk = bool(model.get("fuse_unk", False))
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self._unk_token = model.get("unk_token")
        if self._unk_token is not None and self._unk_token not in self.vocab:
            raise ValueError(f"{source}: unk_token {self._unk_token!r} is not in the vocab")

        # (left id, right id) -> (rank, merged id); a lower rank is merged first
        self.merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, merge in enumerate(model.get("merges", [])):
            pair = merge.split(" ") if isinstance(merge, str) else merge
            if len(pair) != 2 or any(t not in self.vocab for t in pair) or pair[0] + pair[1] not in self.vocab:
                raise ValueError(f"{source}: merge #{rank} {merge!r} is not two vocab tokens whose "
                                 f"concatenation is also in the vocab")
            self.merges[(self.vocab[pair[0]], self.vocab[pair[1]])] = (rank, self.vocab[pair[0] + pair[1]])
        self._model_token = {i: t for t, i in self.vocab.items()}
        # When no merge takes a right-hand symbol containing "▁" (true of train_bpe's vocabularies, whose
        # merges stay inside a word), BPE over a whole segment gives the same ids as BPE over its words
        # cut before each "▁": merges never cross a cut. Then words, not whole texts, are BPE'd and cached;
        # the retrievers' 40,000 distinct captions share a few hundred words (24x faster: benchmark.py tokenize).
        self._cut_words = (not self.ignore_merges and SPIECE in self.vocab
                           and all(SPIECE not in self._model_token[b] for _, b in self.merges))

        self._normalizer = self._parse_normalizer(spec.get("normalizer"), source)
        self._metaspace = self._parse_pre_tokenizer(spec.get("pre_tokenizer"), source)
        self._decoder = self._parse_decoder(spec.get("decoder"), source)
        for tok in added_tokens(spec, source):
            if self.vocab.get(tok["content"], tok["id"]) != tok["id"]:  # `tokenizers` would renumber it
                raise ValueError(f"{source}: added token {tok['content']!r} has id {tok['id']} but the vocab "
                                 f"gives it {self.vocab[tok['content']]}")
        self._refresh_added()
        self._cache: dict[str, list[int]] = {}  # word -> BPE ids; prompts repeat the same words

    # --- reading the pieces of tokenizer.json ---

    @staticmethod
    def _parse_normalizer(spec, source):
        """Returns a list of ("prepend", s) / ("replace", old, new) steps."""
        steps = []
        for part in tokenizer_components(spec, "normalizers"):
            if part["type"] == "Prepend":
                steps.append(("prepend", part["prepend"]))
            elif part["type"] == "Replace" and "String" in part["pattern"]:
                steps.append(("replace", part["pattern"]["String"], part["content"]))
            else:
                raise ValueError(f"{source}: normalizer {part} not supported (Llama uses Prepend + Replace)")
        return steps

    @staticmethod
    def _parse_pre_tokenizer(spec, source):
        """Returns None, or (replacement, prepend_scheme, split) of a Metaspace pre-tokenizer."""
        if spec is None:
            return None
        if spec["type"] != "Metaspace":
            raise ValueError(f"{source}: pre_tokenizer {spec['type']!r} not supported (Llama: none or Metaspace)")
        return metaspace_options(spec)

    @staticmethod
    def _parse_decoder(spec, source):
        if spec is None:
            return None
        parts = tokenizer_components(spec, "decoders")
        for part in parts:
            ok = part["type"] in ("ByteFallback", "Fuse", "Strip") or (
                part["type"] == "Replace" and "String" in part["pattern"])
            if not ok:
                raise ValueError(f"{source}: decoder {part} not supported "
                                 f"(Llama: Replace, ByteFallback, Fuse, Strip)")
        return parts

    def _refresh_added(self):
        """Index the added tokens and build the regexes that find them in text.

        As in `tokenizers`, tokens with normalized=false are matched in the raw text, tokens with
        normalized=true in the normalized segments (and their own text is normalized first). Longest
        alternatives first, so the regex finds the leftmost-longest match like Aho-Corasick does.
        """
        added = sorted(self.spec.get("added_tokens", []), key=lambda t: t["id"])
        self.spec["added_tokens"] = added
        self._added_id = {t["content"]: t["id"] for t in added}
        # a normalized token is known by its normalized text ("knee" -> "▁knee"), in decode too, as in
        # `tokenizers`
        self._added_token = {t["id"]: self._normalize(t["content"]) if t.get("normalized") else t["content"]
                             for t in added}
        self._special_ids = {t["id"] for t in added if t.get("special")}
        self._raw_added = {t["content"]: t for t in added if not t.get("normalized")}
        self._norm_added = {self._normalize(t["content"]): t for t in added if t.get("normalized")}
        self._raw_re, self._norm_re = (
            re.compile("|".join(re.escape(c) for c in sorted(table, key=len, reverse=True))) if table else None
            for table in (self._raw_added, self._norm_added))

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        missing = FileNotFoundError(f"tokenizer file {path} not found: expected a Hugging Face tokenizer.json "
                                    f"(the one in llava-hf/llava-1.5-7b-hf, or one written by Tokenizer.save)")
        return cls(read_tokenizer_json(path, missing), source=path)

    def save(self, path: str) -> None:
        """Write tokenizer.json in the Hugging Face format (`tokenizers.Tokenizer.from_file` reads it)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.spec, f, ensure_ascii=False, indent=2)

    # --- vocabulary ---

    def token_to_id(self, token: str) -> int | None:
        return self._added_id.get(token, self.vocab.get(token))

    def id_to_token(self, i: int) -> str | None:
        return self._added_token.get(i, self._model_token.get(i))

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens, added tokens included (32002 for llava-hf)."""
        return len(self.vocab.keys() | self._added_id.keys())

    bos_id = property(lambda self: self.token_to_id("<s>"))
    eos_id = property(lambda self: self.token_to_id("</s>"))
    pad_id = property(lambda self: self.token_to_id("<pad>"))
    unk_id = property(lambda self: None if self._unk_token is None else self.token_to_id(self._unk_token))

    def add_special_tokens(self, tokens) -> list[int]:
        """Add tokens (e.g. ["<image>", "<POSE>"]) that encode() always keeps whole; returns their ids.

        A token already known keeps its id; a new one gets the next free id, as in `tokenizers`. Remember
        to grow the model's embedding table to `vocab_size` after adding new ones.
        """
        ids = []
        for token in tokens:
            i = self.token_to_id(token)
            if token not in self._added_id:
                if i is None:
                    i = max([*self.vocab.values(), *self._added_id.values()], default=-1) + 1
                self.spec.setdefault("added_tokens", []).append(
                    {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True})
                self._refresh_added()  # the next new token's id counts this one
            ids.append(i)
        return ids

    # --- encoding ---

    def _normalize(self, text: str) -> str:
        for step in self._normalizer:
            if step[0] == "prepend":
                text = step[1] + text if text else text  # `tokenizers` leaves an empty segment empty
            else:
                text = text.replace(step[1], step[2])
        return text

    def _split_added(self, text: str, pattern, table) -> list[tuple[str | int, int]]:
        """Cut text around added tokens: a list of (segment, start) and (token id, start), in order.

        lstrip / rstrip tokens swallow the whitespace beside them, as in `tokenizers`.
        """
        pieces, pos = [], 0
        while pattern is not None and (m := pattern.search(text, pos)):
            token = table[m.group()]
            start, end = m.start(), m.end()
            while token.get("lstrip") and start > pos and text[start - 1].isspace():
                start -= 1
            while token.get("rstrip") and end < len(text) and text[end].isspace():
                end += 1
            if start > pos:
                pieces.append((text[pos:start], pos))
            pieces.append((token["id"], start))
            pos = end
        if pos < len(text):
            pieces.append((text[pos:], pos))
        return pieces

    def _pre_tokenize(self, segment: str, at_text_start: bool) -> list[str]:
        """Normalized segment -> the words BPE runs on (the whole segment when there is no pre-tokenizer)."""
        if self._metaspace is None:
            if self._cut_words:  # the same ids as one BPE word (see __init__)
                return _cut_before(segment, SPIECE)
            return [segment] if segment else []
        rep, scheme, split = self._metaspace
        segment = segment.replace(" ", rep)
        if (scheme == "always" or (scheme == "first" and at_text_start)) and not segment.startswith(rep):
            segment = rep + segment
        if not split:
            return [segment] if segment else []
        return _cut_before(segment, rep)

    def _initial_symbols(self, word: str) -> list[int]:
        """One id per character; a character outside the vocab becomes its UTF-8 bytes <0xNN>, or <unk>."""
        ids, last_was_unk = [], False
        for ch in word:
            if ch in self.vocab:
                ids.append(self.vocab[ch])
                last_was_unk = False
                continue
            if self.byte_fallback:
                byte_ids = [self.vocab.get(_byte_token(b)) for b in ch.encode("utf-8")]
                if None not in byte_ids:
                    ids.extend(byte_ids)
                    continue
            if self._unk_token is None:
                raise ValueError(f"character {ch!r} is not in the vocab and the tokenizer has no unk_token")
            if not (self.fuse_unk and last_was_unk):  # fuse_unk: a run of unknown characters is one <unk>
                ids.append(self.vocab[self._unk_token])
            last_was_unk = True
        return ids

    def _bpe(self, ids: list[int]) -> list[int]:
        """Apply merges lowest rank first (ties: leftmost first), as `tokenizers` does.

        Symbols sit in a linked list and candidate pairs in a heap keyed by (rank, position), so a long
        word costs O(n log n) instead of rescanning all pairs after every merge. A heap entry whose pair
        has changed since it was pushed is stale and skipped.
        """
        n = len(ids)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap = [(self.merges[p][0], i) for i, p in enumerate(zip(ids, ids[1:])) if p in self.merges]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or self.merges.get((ids[i], ids[j]), (None,))[0] != rank:
                continue
            ids[i] = self.merges[(ids[i], ids[j])][1]  # the left symbol becomes the merged token
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for left in (prv[i], i):  # the two pairs the new symbol is part of
                if left >= 0 and nxt[left] < n and (ids[left], ids[nxt[left]]) in self.merges:
                    heapq.heappush(heap, (self.merges[(ids[left], ids[nxt[left]])][0], left))
        return [t for t, a in zip(ids, alive) if a]

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            if self.ignore_merges and word in self.vocab:
                ids = [self.vocab[word]]
            else:
                ids = self._bpe(self._initial_symbols(word))
            if len(self._cache) >= 200_000:  # bound the memory of a long run on varied text
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Text -> token ids. No special tokens are added unless add_bos; added tokens written in the
        text ("<image>", "<POSE>", "</s>") become their single ids."""
        ids = [self.bos_id] if add_bos else []
        if add_bos and ids[0] is None:
            raise ValueError("add_bos=True but the tokenizer has no '<s>' token")
        for segment, start in self._split_added(text, self._raw_re, self._raw_added):
            if isinstance(segment, int):
                ids.append(segment)
                continue
            normalized = self._normalize(segment)
            for piece, sub_start in self._split_added(normalized, self._norm_re, self._norm_added):
                if isinstance(piece, int):
                    ids.append(piece)
                    continue
                for word in self._pre_tokenize(piece, at_text_start=start == 0 and sub_start == 0):
                    ids.extend(self._encode_word(word))
        return ids

    # --- decoding ---

    def decode(self, ids, skip_special: bool = False) -> str:
        """Token ids -> text. Ids that name no token are skipped (as `tokenizers` does), so ids from the
        padded rows of an embedding table decode to nothing. Invalid UTF-8 in a run of byte tokens turns
        every byte of the run into U+FFFD, again as `tokenizers` does."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        tokens = [self.id_to_token(i) for i in ids if not (skip_special and i in self._special_ids)]
        tokens = [t for t in tokens if t is not None]
        if self._decoder is None:
            return " ".join(tokens)
        for step in self._decoder:
            if step["type"] == "Replace":
                tokens = [t.replace(step["pattern"]["String"], step["content"]) for t in tokens]
            elif step["type"] == "ByteFallback":
                tokens = self._fuse_bytes(tokens)
            elif step["type"] == "Fuse":
                tokens = ["".join(tokens)]
            else:  # Strip: drop up to `start` leading and `stop` trailing copies of `content`, per token
                tokens = [self._strip(t, step["content"], step["start"], step["stop"]) for t in tokens]
        return "".join(tokens)

    @staticmethod
    def _fuse_bytes(tokens: list[str]) -> list[str]:
        """The ByteFallback decoder: each run of <0xNN> tokens becomes the UTF-8 text it spells."""
        out, run = [], []
        for token in tokens + [None]:  # None flushes the last run
            m = _BYTE_TOKEN.fullmatch(token) if token is not None else None
            if m:
                run.append(int(m.group(1), 16))
                continue
            if run:
                try:
                    out.append(bytes(run).decode("utf-8"))
                except UnicodeDecodeError:
                    out.extend("\ufffd" * len(run))
                run = []
            if token is not None:
                out.append(token)
        return out

    @staticmethod
    def _strip(token: str, char: str, start: int, stop: int) -> str:
        lo = 0
        while lo < min(start, len(token)) and token[lo] == char:
            lo += 1
        hi = len(token)
        while len(token) - hi < stop and hi > lo and token[hi - 1] == char:
            hi -= 1
        return token[lo:hi]

    # --- training (tiny preset) ---

    @classmethod
    def train_bpe(cls, texts, vocab_size: int,
                  special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<image>", "<POSE>")) -> "Tokenizer":
        """Learn a byte-fallback BPE in the llava-hf format (legacy normalizer, no pre-tokenizer).

        Vocab = special tokens, the 256 byte tokens <0x00>..<0xFF> (so any text can be encoded), the
        characters of the corpus (most frequent first), then one token per merge. Pairs are counted
        inside "▁"-prefixed words, so no merge ever spans two words; that is why encoding a whole
        segment as one BPE word (what `tokenizers` does with this format) gives the same result as
        word by word. Each step merges the most frequent pair (ties: the smallest pair in string
        order); pair counts are updated only for the words that contain the merged pair.
        """
        specials = list(dict.fromkeys(special_tokens))
        special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        word_counts: Counter[str] = Counter()
        for text in texts:
            for segment in (special_re.split(text) if specials else [text]):
                if segment:
                    word_counts.update(re.findall(f"{SPIECE}[^{SPIECE}]*", SPIECE + segment.replace(" ", SPIECE)))

        char_counts: Counter[str] = Counter()
        for word, count in word_counts.items():
            for ch in word:
                char_counts[ch] += count
        alphabet = sorted(char_counts, key=lambda ch: (-char_counts[ch], ch))
        vocab: dict[str, int] = {}
        for token in specials + [_byte_token(b) for b in range(256)] + alphabet:
            vocab.setdefault(token, len(vocab))
        if len(vocab) > vocab_size:
            raise ValueError(f"vocab_size={vocab_size} is too small: the special tokens, 256 byte tokens and "
                             f"{len(alphabet)} corpus characters already make {len(vocab)}")

        words = [list(w) for w in word_counts]  # current symbols of each distinct word
        freqs = list(word_counts.values())
        pair_count: Counter[tuple[str, str]] = Counter()
        pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)  # may hold stale word indices
        for w, (symbols, freq) in enumerate(zip(words, freqs)):
            for pair in zip(symbols, symbols[1:]):
                pair_count[pair] += freq
                pair_words[pair].add(w)
        heap = [(-c, pair) for pair, c in pair_count.items()]
        heapq.heapify(heap)
        merges = []
        while len(vocab) < vocab_size and heap:
            neg_count, pair = heapq.heappop(heap)
            if -neg_count != pair_count[pair] or pair_count[pair] <= 0:
                continue  # stale entry: the count changed since it was pushed
            a, b = pair
            merges.append(f"{a} {b}")  # llava-hf's form; read by every `tokenizers` version. No token has a space
            vocab.setdefault(a + b, len(vocab))  # a + b may already exist, reached by another merge path
            touched = set()
            for w in pair_words.pop(pair):
                symbols, freq = words[w], freqs[w]
                for p in zip(symbols, symbols[1:]):
                    pair_count[p] -= freq
                    touched.add(p)
                merged, i = [], 0
                while i < len(symbols):
                    if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                        merged.append(a + b)
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                words[w] = merged
                for p in zip(merged, merged[1:]):
                    pair_count[p] += freq
                    pair_words[p].add(w)
                    touched.add(p)
            for p in touched:
                if pair_count[p] > 0 and p != pair:
                    heapq.heappush(heap, (-pair_count[p], p))

        bos = "<s>" if "<s>" in vocab else None
        seq_a, seq_b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
        spec = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for t in specials],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPIECE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE}]},
            "pre_tokenizer": None,
            "post_processor": None if bos is None else {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, seq_a],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, seq_a,
                         {"SpecialToken": {"id": bos, "type_id": 1}}, seq_b],
                "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPIECE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>" if "<unk>" in vocab else None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": True, "vocab": vocab, "merges": merges},
        }
        return cls(spec, source="train_bpe")


# ----------------------------------------------------------------------------------------------------
# 13. Reading HMR2.0's checkpoint without running pickled code
#
# HMR2.0 is released as a PyTorch Lightning checkpoint (`logs/train/multiruns/hmr2/0/checkpoints/
# epoch=35-step=1000000.ckpt` in 4D-Humans' hmr2_data.tar.gz): a pickled dict whose `state_dict` holds the
# weights (backbone.*, smpl_head.*, discriminator.*, smpl.* buffers) next to `hyper_parameters`, where
# Lightning's save_hyperparameters() stored the training config. 4D-Humans trains with Hydra, so that
# config is an OmegaConf DictConfig (its pickle names omegaconf.dictconfig.DictConfig,
# omegaconf.base.ContainerMetadata, omegaconf.nodes.AnyNode, typing.Any, collections.defaultdict, ...);
# HMR2's own code types it as a yacs CfgNode. torch.load(weights_only=True) refuses both, and plain
# torch.load would import and run whatever the pickle names. So the fallback below is an unpickler that
# builds tensors and plain containers, turns the config classes into inert stand-ins, and refuses the rest.

_HMR2_HINT = ("The pose-aware encoder f_b is HMR2.0's ViT-H backbone (4D-Humans, Goel et al. 2023): get its "
              "released model with 4D-Humans' download script (hmr2_data.tar.gz holds logs/train/multiruns/hmr2/"
              "0/checkpoints/epoch=35-step=1000000.ckpt) and pass that file, or a .safetensors file of its "
              "backbone.* tensors.")


# torch.load's pickle_module: the project's one restricted unpickler (smpl.RestrictedUnpickler) narrowed to
# what a Lightning checkpoint holds: tensors (torch's own rebuild functions; torch.load handles the
# storages), plain containers and scalars, torch dtypes, and inert stand-ins for config objects. Any other
# global (os.system, builtins.exec, a model class, numpy arrays, ...) is refused before it can be called.
_RESTRICTED_PICKLE = smpl.restricted_pickle_module(allow=("builtins", "torch", "config"))


def _checked_checkpoint(state, path, size):
    """What torch.load built, checked for depth and size like every pickle the project reads."""
    try:
        return smpl._checked_tree(state, path, size)
    except smpl.PickleFileError as e:
        raise ValueError(f"{e}. {_HMR2_HINT}") from None


def _torch_load_safely(path):
    """torch.load without executing pickled code: weights_only first (torch's hardened unpickler), then, if
    it refused a class, our unpickler that also reads config objects as inert data and refuses the rest.
    Files in torch's zip format are memory-mapped: tensors are read from disk when used, so reading the
    config of a 2.5 GB HMR2.0 checkpoint costs little, and loading it holds no second copy."""
    mmap = zipfile.is_zipfile(path)
    try:
        return _checked_checkpoint(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), path,
                                   os.path.getsize(path))
    except pickle.UnpicklingError:
        pass  # most likely the pickled training config; retried below
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}). "
                         f"{_HMR2_HINT}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE, mmap=mmap)
    except smpl.UnsafePickleError as e:
        raise ValueError(
            f"{path}: {e}. A pose-encoder checkpoint may hold tensors and plain config data only; loading "
            f"this object would run code from the file, so it was not loaded. If you trust the file, "
            f"extract the backbone once, in a separate Python: sd = torch.load(path, weights_only=False)"
            f"['state_dict']; safetensors.torch.save_file({{k: v for k, v in sd.items() if "
            f"k.startswith('backbone.')}}, 'hmr2_backbone.safetensors'), and pass that file.") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}). "
                         f"{_HMR2_HINT}") from None
    return _checked_checkpoint(state, path, os.path.getsize(path))  # depth and size, like every pickle


def read_pose_encoder_state(path):
    """The backbone tensors of an HMR2.0 checkpoint, keyed by PoseViT parameter names (`backbone.` removed).

    Accepts the Lightning checkpoint (a dict with `state_dict`; keys outside `backbone.` are ignored) or a
    plain state dict, pickled or in a .safetensors file, with or without the `backbone.` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HMR2.0 checkpoint {path} not found. {_HMR2_HINT}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}). {_HMR2_HINT}") from None
    else:
        state = _torch_load_safely(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # Lightning (and ViTPose) checkpoints
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict. {_HMR2_HINT}")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path}: entries that are not tensors: {not_tensors[:5]}. {_HMR2_HINT}")
    return state


# ViT widths -> heads of the backbones ViTPose / HMR2.0 release (B, L, H); other widths get 64-wide heads.
_VIT_HEADS = {768: 12, 1024: 16, 1280: 16}


def pose_vit_config_from_state(state, **overrides):
    """The PoseViTConfig that a backbone state dict (read_pose_encoder_state) was trained with, read from
    its shapes: width and patch size from patch_embed.proj.weight (D, C, p, p), depth from the blocks, MLP
    ratio from fc1, the patch grid from pos_embed (1, Hp*Wp + 1, D) taken as HMR2.0's 4:3 (H:W) crop.
    What shapes cannot tell comes from `overrides` or HMR2.0's values: the heads (_VIT_HEADS), the padding
    (2), the layer-norm eps; `overrides` also wins over anything read."""
    try:
        D, C, p, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        ratio = state["blocks.0.mlp.fc1.weight"].shape[0] // D
        n_patches = state["pos_embed"].shape[1] - 1
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not a ViTPose / HMR2.0 backbone state dict ({type(e).__name__}: {e}); expected "
                         f"patch_embed.proj.weight, pos_embed and blocks.N.* tensors") from None
    read = dict(hidden_size=D, num_channels=C, patch_size=p, num_hidden_layers=depth, mlp_ratio=ratio,
                num_attention_heads=_VIT_HEADS.get(D, max(1, D // 64)))
    Wp = math.isqrt(n_patches * 3 // 4)
    if "image_size" not in overrides:
        if Wp * (4 * Wp // 3) != n_patches or (4 * Wp) % 3:
            raise ValueError(f"pos_embed holds {n_patches} patch positions, not a 4:3 grid like HMR2.0's 16 x 12; "
                             f"pass pose_vit={{'image_size': (H, W)}}")
        read["image_size"] = (4 * Wp // 3 * p, Wp * p)
    return PoseViTConfig(**{**read, **overrides})


def read_pose_vit_config(path, **overrides):
    """pose_vit_config_from_state of the backbone in an HMR2.0 checkpoint file."""
    try:
        return pose_vit_config_from_state(read_pose_encoder_state(path), **overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_pose_encoder(path, config=None, dtype=torch.float32, device="cpu"):
    """Build f_b (PoseViT, HMR2.0's ViT-H unless `config` says otherwise) and fill it from `path`
    (see read_pose_encoder_state). Every backbone tensor must name a parameter of the same shape and every
    parameter must be there; otherwise a ValueError names the keys."""
    config = PoseViTConfig() if config is None else config
    state = read_pose_encoder_state(path)
    with torch.device("meta"):
        f_b = PoseViT(config)
    params = f_b.state_dict()
    unknown = [k for k in state if k not in params]
    missing = [k for k in params if k not in state]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
                  for k in params if k in state and state[k].shape != params[k].shape]
    problems = [_name_keys(what, keys) for what, keys in (("unknown backbone keys", unknown),
                                                          ("missing backbone keys", missing),
                                                          ("shape mismatches", mismatched)) if keys]
    if problems:
        raise ValueError(f"pose encoder checkpoint {path} does not fit PoseViT({config}): " + "; ".join(problems))
    f_b.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return f_b


# ----------------------------------------------------------------------------------------------------
# 14. Checkpoints of a run: model.safetensors + config.json + tokenizer.json
#
# Only what was trained is written: the whole model for tiny (it has no base weights anywhere else), the
# trained_names("rft") set for llava-1.5-7b (LoRA, W_a, W_b, pose head, <POSE> rows: tens of megabytes),
# whose base is rebuilt from the LLaVA and HMR2.0 files. The reference copy of freeze_reference(), when
# taken, is written too (`reference.<name>`), so a resumed RFT run keeps the same pi_ref.

CHECKPOINT_FORMAT = "pose-rft-checkpoint"


def _saved_names(model):
    if model.config.preset == "tiny":
        return list(model.state_dict())
    return model.trained_names("rft")


CHECKPOINT_DIR = "checkpoint"  # a run folder out/<run>/ keeps its checkpoint in out/<run>/checkpoint/


def checkpoint_dir(path):
    """The checkpoint folder of `path`: `path` itself if it holds config.json, else `path`/checkpoint
    (so a run folder and its checkpoint folder are both accepted wherever a checkpoint is asked for)."""
    path = Path(path)
    return path if (path / "config.json").is_file() or not (path / CHECKPOINT_DIR).is_dir() else path / CHECKPOINT_DIR


def _swap_folders(out_dir):
    """The two temporary folders of save_checkpoint's swap, named after the checkpoint (not the process),
    so that a later run finds what a killed one left: the new checkpoint being written, the old one
    being replaced."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.tmp", out_dir.parent / f".{out_dir.name}.old"


def recover_checkpoint(out_dir):
    """Finish or roll back a checkpoint swap that a killed run left half-done; call before reading or
    writing out_dir. The swap writes everything into `tmp`, then renames out_dir -> old, tmp -> out_dir,
    and deletes old. So: out_dir present -> any tmp is an unfinished write and any old a leftover, both
    deleted; out_dir missing but old present -> killed between the renames: tmp is complete (it was
    finished before the first rename) and becomes out_dir, else old goes back. Returns what it did."""
    out_dir = Path(out_dir)
    tmp, old = _swap_folders(out_dir)
    if out_dir.exists():
        done = [f.name for f in (tmp, old) if f.exists()]
        for f in (tmp, old):
            if f.exists():
                shutil.rmtree(f)
        return f"removed {', '.join(done)}" if done else ""
    if old.exists() and tmp.exists():
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
        return f"finished the swap: {tmp.name} -> {out_dir.name}"
    if old.exists():
        os.replace(old, out_dir)
        return f"rolled back the swap: {old.name} -> {out_dir.name}"
    if tmp.exists():  # a first save that never reached its rename: not known to be complete
        shutil.rmtree(tmp)
        return f"removed {tmp.name}"
    return ""


def save_checkpoint(model, tokenizer, out_dir, extra=None, train_state=None):
    """Write the checkpoint folder `out_dir` (a run writes out/<run>/checkpoint) atomically: everything
    goes into a temporary folder beside it, which then replaces `out_dir` by rename, so a reader sees the
    old checkpoint or the whole new one. `extra`: JSON-serialisable data to keep with it (step, training
    config). `train_state`: what --resume needs beyond the weights (optimiser, RNG, step), torch-saved as
    train_state.pt inside the same folder, so weights and state always belong to the same step. Only this
    folder is replaced: the rest of the run folder (metrics, figures, retrievers) is never touched.
    Returns the folder's Path."""
    out_dir = Path(out_dir)
    meta = {"format": CHECKPOINT_FORMAT, "version": 1, "config": model.config.to_dict(),
            "tensors": "all" if model.config.preset == "tiny" else "trained", "extra": extra}
    try:
        meta_json = json.dumps(meta, indent=2)
    except TypeError as e:
        raise ValueError(f"extra must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None
    state = model.state_dict()
    tensors = {name: state[name].detach().cpu().contiguous() for name in _saved_names(model)}
    if model._reference is not None:
        tensors.update({f"reference.{n}": t.detach().cpu().contiguous() for n, t in model._reference.items()})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _swap_folders(out_dir)
    recover_checkpoint(out_dir)  # a swap a killed run left half-done: finished or rolled back first
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(meta_json)
    tokenizer.save(str(tmp / "tokenizer.json"))
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    if out_dir.exists():  # two renames: between them the checkpoint sits at `old`, never half-written
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def _check_checkpoint_tokenizer(tokenizer, config, path):
    """A checkpoint's tokenizer.json must hold <POSE> under the id the model reads it at, and no id the
    embedding table lacks: otherwise generation never finds a pose, or indexes past the table."""
    pose = tokenizer.token_to_id(POSE_TOKEN)
    if pose != config.pose_token_id:
        raise ValueError(f"{path}: {POSE_TOKEN} is {'missing' if pose is None else f'id {pose}'}, but the "
                         f"model reads the pose at id {config.pose_token_id}; use the tokenizer.json saved "
                         f"with these weights")
    rows = config.llava.text_config.vocab_size
    if tokenizer.vocab_size > max(rows, config.pose_token_id + 1):
        raise ValueError(f"{path}: the vocabulary has {tokenizer.vocab_size} tokens but the weights have "
                         f"{rows} embedding rows; use the tokenizer.json saved with these weights")


def load_checkpoint(path, llava_path=None, pose_encoder_path=None, device="cpu", dtype=torch.float32, expect=None):
    """Rebuild a model saved by save_checkpoint -> (model, tokenizer, extra).

    tiny: the model is built from the stored config and every tensor comes from the file. llava-1.5-7b:
    the base is rebuilt from the LLaVA and HMR2.0 files (llava_path / pose_encoder_path, default: the
    paths stored in the config), in `dtype`, then the trained tensors are loaded. `expect`: a
    PoseLLaVAConfig, or a (partial) dict in its to_dict() layout, that the stored config must match
    (paths excepted). Any difference, a missing or unexpected tensor, or a shape that does not fit is a
    ValueError naming them. The model comes back with set_trainable("rft") if the checkpoint holds a
    reference copy (it comes from RFT), else set_trainable("sft"); call set_trainable to pick another stage.
    """
    path = checkpoint_dir(path)
    files = {name: path / name for name in ("config.json", "model.safetensors", "tokenizer.json")}
    for f in files.values():
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: a checkpoint folder written by save_checkpoint holds "
                                    "config.json, model.safetensors and tokenizer.json")
    try:
        meta = json.loads(files["config.json"].read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
        config = PoseLLaVAConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{files['config.json']} is not a Pose-RFT checkpoint config ({type(e).__name__}: {e}); "
                         "expected the config.json save_checkpoint writes") from None
    if expect is not None:
        want = expect.to_dict() if isinstance(expect, PoseLLaVAConfig) else expect
        differences = _config_differences(config.to_dict(), want)
        if differences:
            raise ValueError(f"checkpoint {path} was saved with another config than the one asked for "
                             "(checkpoint vs asked): " + "; ".join(differences))
    if llava_path is not None:
        config.llava_path = str(llava_path)
    if pose_encoder_path is not None:
        config.pose_encoder_path = str(pose_encoder_path)
    tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
    _check_checkpoint_tokenizer(tokenizer, config, files["tokenizer.json"])

    if config.preset == "tiny":
        with torch.device("meta"):  # every tensor comes from the file
            model = PoseLLaVA(config)
    else:
        model = build_pose_llava(config, device, dtype)
    try:
        with safe_open(str(files["model.safetensors"]), framework="pt") as f:
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{files['model.safetensors']} is not a readable safetensors file ({e})") from None
    reference = {k[len("reference."):]: stored.pop(k) for k in list(stored) if k.startswith("reference.")}
    params = model.state_dict()
    expected = _saved_names(model)
    problems = []
    for what, tensors, names in (("tensors", stored, expected), ("reference tensors", reference,
                                                                  model.trained_names("rft") if reference else [])):
        missing = [n for n in names if n not in tensors]
        unexpected = [n for n in tensors if n not in names]
        mismatched = [f"{n} {tuple(tensors[n].shape)} vs model {tuple(params[n].shape)}"
                      for n in names if n in tensors and tensors[n].shape != params[n].shape]
        problems += [_name_keys(f"{kind} {what}", keys) for kind, keys in
                     (("missing", missing), ("unexpected", unexpected), ("shape mismatches of", mismatched)) if keys]
    problems += [f"{n} holds {t.dtype} where the model has {params[n].dtype} (no silent cast of integers)"
                 for n, t in list(stored.items()) + list(reference.items())
                 if n in params and params[n].is_floating_point() and not t.is_floating_point()]
    if problems:
        raise ValueError(f"checkpoint {path} does not fit the model its config.json describes: " + "; ".join(problems))
    # tiny: the meta model's parameters are replaced by the file's (assign); 7B: copied into the built ones
    model.load_state_dict({n: t.to(device=device, dtype=params[n].dtype) for n, t in stored.items()},
                          strict=config.preset == "tiny", assign=config.preset == "tiny")
    if reference:
        model._reference = {n: t.to(device=device, dtype=params[n].dtype) for n, t in reference.items()}
    model.set_trainable("rft" if reference else "sft")
    return model, tokenizer, meta.get("extra")


# ====================================================================================================
# Run plumbing: not in the paper
#
# What both training scripts (and eval.py) share around the method: `--key=value` overrides and the
# checks of a config, torchrun's distributed setup, print0, the learning-rate schedule, gradient and
# metric averaging over ranks, metrics.jsonl, and the run folder's train_state (optimiser, every rank's
# RNG, step) for --resume. It lives here, not inline in each script as nanoGPT does, because two scripts
# need every line of it and would otherwise drift apart; and here rather than in data.py because half of
# it is about the checkpoint folder this file writes (recover_run, load_train_state, run_finished).


# Spellings of --dtype: what each means. float16 is refused rather than run in float32: it needs loss
# scaling, which these scripts do not do.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
# Counts that must be at least 1 (0 would divide by zero, never save, or train nothing), where present.
POSITIVE_FIELDS = ("max_steps", "batch_size", "save_every", "log_every", "gallery_every", "inner_epochs",
                   "pose_samples",
                   "poseworld_size", "image_size", "vocab_size", "retriever_pairs",
                   "retriever_steps", "retriever_batch", "pretrain_images", "pretrain_batch")


def check_config(cfg):
    """Validate a config once, at the top of a script (SFTConfig or train_rft.RFTConfig), so a bad setting
    is one message naming the flag and what it allows, not a deep traceback, a silent fp32 run or a
    wrong result. Normalises --dtype's aliases in place. Returns cfg."""
    problems = []
    for f in fields(cfg):  # a config built in Python (main(cfg=...)) is not typed by the parser
        value, want = getattr(cfg, f.name), type(f.default)
        if type(value) is not want and not (want is float and type(value) is int):
            problems.append(f"--{f.name}={value!r} must be a {want.__name__}")
    if problems:
        raise SystemExit("bad settings:\n  " + "\n  ".join(problems))
    if cfg.dtype.lower() in DTYPES:
        cfg.dtype = DTYPES[cfg.dtype.lower()]
    else:
        problems.append(f"--dtype={cfg.dtype!r}: allowed {', '.join(DTYPES)} (float16 is not supported: "
                        f"it needs loss scaling; use bfloat16)")
    if cfg.preset not in PRESETS:
        problems.append(f"--preset={cfg.preset!r}: allowed {', '.join(PRESETS)}")
    for name in POSITIVE_FIELDS:
        if hasattr(cfg, name) and getattr(cfg, name) < 1:
            problems.append(f"--{name}={getattr(cfg, name)}: must be at least 1")
    if getattr(cfg, "eval_size", 0) < 0:
        problems.append(f"--eval_size={cfg.eval_size}: 0 (the whole test split) or a number of test samples")
    if getattr(cfg, "agreement_prompts", 0) < 0:
        problems.append(f"--agreement_prompts={cfg.agreement_prompts}: 0 (skip) or a number of test captions")
    if getattr(cfg, "pretrain_steps", 0) < 0:
        problems.append(f"--pretrain_steps={cfg.pretrain_steps}: 0 (no pretraining of the tiny pose ViT) or a "
                        f"number of steps")
    if cfg.stop_after < 0:
        problems.append(f"--stop_after={cfg.stop_after}: 0 (run to --max_steps) or a number of steps")
    if hasattr(cfg, "G") and cfg.G < 2:
        problems.append(f"--G={cfg.G}: at least 2 answers per prompt (Eq. 16 compares each with its group; "
                        f"with 1 every text advantage F_hat is 0)")
    if hasattr(cfg, "temperature") and not cfg.temperature > 0:
        problems.append(f"--temperature={cfg.temperature}: must be > 0 in RFT (0 is greedy decoding: the G "
                        f"answers coincide and the sampling policy has no log-probabilities)")
    if hasattr(cfg, "clip_eps") and not cfg.clip_eps >= 0:
        problems.append(f"--clip_eps={cfg.clip_eps}: must be >= 0 (the ratio is clipped to [1 - eps, 1 + eps])")
    for name in ("beta", "beta_i2p", "gradient_at_mean"):  # weights of terms of the RFT loss
        if hasattr(cfg, name) and not 0 <= getattr(cfg, name) < math.inf:
            problems.append(f"--{name}={getattr(cfg, name)}: a loss weight must be finite and >= 0")
    if hasattr(cfg, "top_p") and not 0 < cfg.top_p <= 1:
        problems.append(f"--top_p={cfg.top_p}: must be in (0, 1]")
    if problems:
        raise SystemExit("bad settings:\n  " + "\n  ".join(problems))
    return cfg


def config_help(cfg) -> str:
    """What `--help` prints: each setting as `--key=default`, with the comment beside it in the config
    class's source (the one line of why), in the class's order."""
    import inspect
    try:
        source = inspect.getsource(type(cfg))
    except (OSError, TypeError):  # no source file (e.g. a frozen build): names and defaults alone
        source = ""
    comments = {}
    for line in source.splitlines():
        m = re.match(r"^\s+(\w+)\s*:[^=]+=.*?\s#\s?(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    flags = [f"--{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)]
    width = min(40, max(len(x) for x in flags))
    lines = [f"{type(cfg).__name__}: every setting, `--key=value`; the defaults are the tiny preset's "
             f"(--preset=llava-1.5-7b replaces them with the script's RECIPES)"]
    lines += [f"  {flag:<{width}}  {comments.get(f.name, '')}".rstrip() for flag, f in zip(flags, fields(cfg))]
    return "\n".join(lines)


def parse_overrides(cfg, argv) -> dict:
    """nanoGPT-style `--key=value` flags -> {key: value}, each typed by the config field's default.
    `--help` (or -h) prints config_help and exits."""
    kinds = {f.name: type(getattr(cfg, f.name)) for f in fields(cfg)}
    flags = {}
    for arg in argv:
        if arg in ("--help", "-h"):
            print(config_help(cfg))
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"bad argument {arg!r}: use --key=value (keys: {', '.join(kinds)})")
        key, value = arg[2:].split("=", 1)
        if key not in kinds:
            raise SystemExit(f"unknown option --{key}; options: {', '.join(kinds)}")
        t = kinds[key]
        if t is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise SystemExit(f"--{key} takes true/false, got {value!r}")
            flags[key] = value.lower() in ("1", "true", "yes")
        else:
            try:
                flags[key] = t(value)
            except ValueError:
                raise SystemExit(f"--{key} takes a {t.__name__}, got {value!r}") from None
    return flags


def apply_overrides(cfg, argv):
    """Set the `--key=value` flags on cfg as they are (no preset recipe: see resolve_config)."""
    for key, value in parse_overrides(cfg, argv).items():
        setattr(cfg, key, value)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Presets own their recipes
#
# A config dataclass's defaults are the tiny preset's recipe. `--preset=llava-1.5-7b` replaces every
# setting that preset's recipe names (the paper's value where the paper states one, a cited choice where
# it is silent) before the command line's flags, so no value tuned for the tiny world reaches a 7B run
# unless a flag asks for it. Each script lists the settings no preset changes (PRESET_FREE); a test
# checks that every other setting is in the 7B recipe.


def resolve_config(cfg, argv, recipes):
    """A run's config in three layers: cfg's defaults (the tiny preset), then recipes[preset] ({field:
    (value, source)}) for the preset the command line names, then the command line's flags.
    Returns (cfg, sources): where each setting came from, "flag", the recipe's source ("paper: Table 4",
    "choice: ...") or "default" (the tiny preset's value, or a setting no preset changes)."""
    flags = parse_overrides(cfg, argv)
    preset = flags.get("preset", cfg.preset)
    if preset not in PRESETS:
        raise SystemExit(f"--preset={preset!r}: allowed {', '.join(PRESETS)}")
    sources = {f.name: "default" for f in fields(cfg)}
    for key, (value, source) in recipes.get(preset, {}).items():
        setattr(cfg, key, value)
        sources[key] = source
    for key, value in flags.items():
        setattr(cfg, key, value)
        sources[key] = "flag"
    return cfg, sources


def format_config(cfg, sources=None) -> str:
    """The start-up print of a config: one setting a line, with where its value came from."""
    sources = sources or {}
    width = max(len(f.name) for f in fields(cfg))
    lines = []
    for f in fields(cfg):
        value = json.dumps(getattr(cfg, f.name))
        source = sources.get(f.name, "default")
        lines.append(f"  {f.name:<{width}} = {value:<24}" + ("" if source == "default" else f"  [{source}]"))
    return "\n".join(lines)


def batch_split(batch_size, micro_batch, world_size):
    """Table 4's batch is global: (samples per rank per forward pass, accumulation steps) that make one
    optimiser step see batch_size samples on any world size. micro_batch 0 = the whole per-rank share
    in one pass. A world size that does not divide the batch (or a micro-batch that does not divide a
    rank's share) is refused, so one GPU and eight train the same recipe."""
    if batch_size % world_size:
        raise SystemExit(f"--batch_size={batch_size} (global) does not divide among {world_size} processes; "
                         f"choose a world size that divides it, or another --batch_size")
    share = batch_size // world_size
    micro = min(micro_batch or share, share)  # a micro-batch larger than the share: one pass
    if share % micro:
        raise SystemExit(f"--micro_batch={micro_batch} does not divide each process's share of the batch "
                         f"({batch_size} / {world_size} = {share})")
    return micro, share // micro


REAL_DATA_PATHS = {"posescript": ("posescript_root", "amass_root"), "h36m": ("h36m_npz", "h36m_images"),
                   "llava_instruct": ("llava_instruct_json", "coco_images")}


def check_preset_inputs(cfg, script):
    """Before any weights are read: the 7B preset needs its model files and real data. PoseWorld with the
    7B preset (a smoke test) only when --data=poseworld was asked for by name; a missing path is one
    message naming every flag it needs."""
    if cfg.preset == "tiny":
        return
    names = [n.strip() for n in cfg.data.split(",") if n.strip()]
    needed = ["llava_path", "pose_encoder_path", "smpl_path"] + [f for n in names for f in REAL_DATA_PATHS.get(n, ())]
    missing = [f"--{f}" for f in needed if not getattr(cfg, f)]
    gone = [f"--{f}={getattr(cfg, f)}" for f in needed if getattr(cfg, f) and not os.path.exists(getattr(cfg, f))]
    if missing or gone:
        raise SystemExit(
            f"{script} --preset={cfg.preset} trains on real data (--data={cfg.data}) with real model files:\n"
            + (f"  missing: {' '.join(missing)}\n" if missing else "")
            + (f"  not found: {' '.join(gone)}\n" if gone else "")
            + "  (a smoke test on the synthetic world instead: --data=poseworld; the README lists the files)")
    if names == ["poseworld"]:
        print0(f"--preset={cfg.preset} on PoseWorld, as asked (--data=poseworld): a smoke test, not the paper's data")


def check_same_preset(saved_config, cfg, where):
    """A checkpoint made with another preset than --preset is refused with both names (the tiny SFT model
    is never taken for a 7B run, or the other way round)."""
    saved = (saved_config or {}).get("preset")
    if saved is not None and saved != cfg.preset:
        raise SystemExit(f"{where} was made with --preset={saved}, but this run has --preset={cfg.preset}: "
                         f"point it at a checkpoint of the {cfg.preset} preset (or pass --preset={saved})")


# ----------------------------------------------------------------------------------------------------
# The departures table: the single source of where a run departs from the paper
#
# One row a setting. `value(cfg)` reads the run's config (an SFTConfig for stage "sft", an RFTConfig for
# "rft") and returns what the run does there, or None where it follows the paper. The README's table is
# generated from these rows (tests/test_real_preset.py checks it), each run prints the rows of its own
# config at start and at the foot of results.md, and the code's comments point here.


@dataclass(frozen=True)
class Departure:
    stage: str                         # "sft" or "rft": which script's config value() reads
    setting: str
    paper: str                         # the paper's value, or "not stated"
    value: typing.Callable             # cfg -> str, or None where the run follows the paper
    why: str
    measured: str = ""                 # what it buys, over seeds 0-2 where measured (docs/experiments.md)


def _tiny(text):
    return lambda cfg: text if cfg.preset == "tiny" else None


def _budget(paper, unit=""):
    """A stage's batch, lr and steps where they are not Table 4's `paper` (batch, lr, steps)."""
    return lambda c: (None if (c.batch_size, c.lr, c.max_steps) == paper
                      else f"{c.batch_size}{unit}, {c.lr:g}, {c.max_steps}")


def _schedule(c):
    return f"floor {c.min_lr_ratio:g} x lr, {c.warmup_steps} warm-up steps" if c.min_lr_ratio else None


def _data_sets(cfg):
    names = [n.strip() for n in cfg.data.split(",") if n.strip()]
    if "poseworld" in names:
        return "PoseWorld (synthetic, built in)"
    return ", ".join(names) + " (no MPI-INF-3DHP, COCO, MPII, BEDLAM-Script)"


DEPARTURES = [
    Departure("sft", "model", "LLaVA-1.5-7B + HMR2.0 ViT-H, pretrained", _tiny("1.9M-parameter Llama / CLIP / pose ViT from scratch, own BPE"),
              "no weights can be downloaded here, and a 2-core CPU must run both stages in minutes"),
    Departure("sft", "training data", "PoseScript, H3.6M, MPI-INF-3DHP, COCO, MPII, BEDLAM-Script, LLaVA-Instruct",
              _data_sets, "no data set can be downloaded here; BEDLAM-Script has no public file format"),
    Departure("sft", "pose-ViT pretraining", "HMR2.0's (millions of images)",
              lambda c: f"{c.pretrain_steps} steps on PoseWorld images" if c.preset == "tiny" and c.pretrain_steps else None,
              "stand-in for HMR2.0's pretraining; without it f_b learns from SFT's few image-to-pose answers alone",
              "seeds 0, 1 (3000 SFT steps): image-to-pose 187.7 -> 155.3 and 185.7 -> 168.5 mm"),
    Departure("sft", "trained in SFT", "LoRA, W_a, W_b, pose head (CLIP and pose ViT frozen)",
              _tiny("everything (LLM, CLIP, pose ViT too)"), "a model trained from scratch has no frozen base to keep"),
    Departure("sft", "SFT batch, lr, steps", "80, 3e-4, 10000 (Table 4)",
              _budget((80, 3e-4, 10000)), "sized to the tiny world and a 2-core CPU"),
    Departure("sft", "SFT schedule", "cosine (floor, warm-up not stated)", _schedule,
              "a floor keeps the last steps of a short run learning"),
    Departure("sft", "SFT losses", "Eq. 2's likelihood (weights not stated)",
              lambda c: f"CE {c.ce_weight:g} + NLL {c.nll_weight:g} + joint {c.joint_weight:g}"
              + (f", beta-NLL {c.nll_beta:g}" if c.nll_beta else "") + (", mean-only head" if c.deterministic_head else ""),
              "the NLL sums 144 numbers; the SMPL joint term gives the mean a metric target"),
    Departure("sft", "SFT task mix", "not stated",
              lambda c: c.task_mix if c.task_mix and "poseworld" in c.data else None,
              "text-to-pose needs more answers than the other two tasks to follow every part of a caption",
              "with the posecode loss, 3 seeds (2c72398): 83.2% after RFT against 74.3-75.3%; t2p:8 cost image-to-pose"),
    Departure("sft", "prompt template", "LLaVA-1.5's v1: system line, USER: ..., ASSISTANT:",
              lambda c: None if c.system_line else "no system line: USER: ..., ASSISTANT:",
              "a model trained from scratch learns nothing from a constant line, and it was 23 of a row's 85 tokens",
              "SFT step 114 -> 86 ms (tests/benchmark.py sft); 3 seeds, RFT at lr 1e-4: its gain +1.04 -> +2.38"),
    Departure("sft", "posecode loss (auxiliary)", "none",
              lambda c: f"weight {c.posecode_weight:g}" if c.posecode_weight else None,
              "without it h at <POSE> knew that a foot was raised but not which, and the legs stayed average",
              "seed 0 SFT, thirds: 72.0 -> 75.7%; with the t2p:4 mix 80.6% (docs/experiments.md, section 2)"),
    Departure("sft", "pose-head refit", "none: one SFT stage",
              lambda c: f"then {c.head_steps} steps of the pose head alone on the frozen LLM, lr {c.head_lr:g}"
              if c.head_steps else None,
              "the head fit h before h carried every code; refit on the final h, it reads the feet",
              "3 seeds, after SFT: posecode 81.2 -> 86.5%, raised foot 0 -> 37% of informative mentions"),
    Departure("sft", "retrievers", "PoseScript's retrieval model (training not stated)",
              lambda c: "two, on disjoint caption halves" + (", PoseWorld twins as hard negatives"
                                                             if c.retriever_hard_negatives and "poseworld" in c.data else ""),
              "the eval retriever never shaped the reward (Table 6's check); twins teach the codes",
              "hard negatives: checker agreement 0.245 -> 0.311 (seed 0); RFT posecode gain +0.48 -> +1.11 (3 seeds)"),
    Departure("rft", "trained in RFT", "LoRA, W_a, W_b, pose head, <POSE> rows (Sec. 4.1)",
              _tiny("also the whole LLM (no LoRA)"), "the tiny LLM was trained from scratch in SFT; its adapters would be fresh"),
    Departure("rft", "RFT batch, lr, steps", "16 prompts, 1e-6, 1000 (Table 4)",
              _budget((16, 1e-6, 1000), " prompts"),
              "sized for 300 steps of a from-scratch model; the paper's 1e-6 was not run",
              "3 seeds, RFT's posecode gain: 2e-4 +2.83 (0.63), 1e-4 +2.38 (0.46), 3e-4 +2.55 (0.81) (section 1)"),
    Departure("rft", "RFT schedule", "cosine (floor, warm-up not stated)", _schedule,
              "as SFT"),
    Departure("rft", "RFT task mix", "not stated (7B preset: the three tasks alike)",
              lambda c: c.task_mix if c.preset == "tiny" and c.task_mix else None,
              "thirds give too few text-to-pose prompts for the semantic reward"),
    Departure("rft", "pose samples per answer", "1 (Eq. 6)",
              lambda c: f"{c.pose_samples} (G x {c.pose_samples} poses a prompt)" if c.pose_samples > 1 else None,
              "poses are cheap to draw once the answer is decoded; more of them steady Delta_hat",
              "32 against 8: posecode +0.7 (0.2), recall +2.1 (0.3), same MPJPE"),
    Departure("rft", "pose KL", "one beta, estimator not stated (GRPO: k3)",
              lambda c: ", ".join(x for x in ("closed form (exact)" if c.pose_kl == "exact" else "",
                                               f"beta {c.beta_i2p:g} on image-to-pose prompts, {c.beta:g} elsewhere"
                                               if c.beta_i2p != c.beta else "") if x) or None,
              "k3 at one sample random-walked; image-to-pose drifted under the text prompts' beta",
              "beta_i2p 1.0: image-to-pose MPJPE +0.3 mm against +1.7, posecode +3.2 both"),
    Departure("rft", "reward gradient at the mean", "none (Eq. 6 alone)",
              lambda c: f"weight {c.gradient_at_mean:g}" if c.gradient_at_mean and c.algo == "hygrpo" else None,
              "the likelihood-ratio term alone let image-to-pose drift",
              "MPJPE -0.33 mm against +0.27 without; posecode +3.4 against +4.0"),
    Departure("rft", "text reward's embedder", "BGE-M3 (Eq. 10)",
              lambda c: None if c.bge_path else "mean-pooled hidden states of the frozen reference LLM",
              "no BGE-M3 files here (pass --bge_path to use them)"),
]


def departures(cfg, stage):
    """[(setting, paper, this run's value, why, measured)] where cfg departs from the paper."""
    return [(d.setting, d.paper, v, d.why, d.measured) for d in DEPARTURES
            if d.stage == stage and (v := d.value(cfg)) is not None]


def format_departures(rows, title="where this run departs from the paper") -> str:
    """A compact table of departures(...) rows for the start-up print and the foot of results.md."""
    if not rows:
        return f"{title}: nowhere (the paper's recipe)"
    lines = [f"{title} (README, 'Departures'):", "| setting | paper | this run | why |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {p} | {v} | {w} |" for s, p, v, w, _ in rows]
    return "\n".join(lines)


def setup_distributed(device_name="auto"):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python` run is rank 0 of 1.
    Returns (rank, world_size, device). gloo on CPU, NCCL on GPU."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_name == "auto":
        device_name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def lr_at(step, max_steps, lr, warmup_steps, min_lr_ratio):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (Table 4: cosine schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def all_reduce_mean_(tensors, world_size):
    """Average tensors (gradients, metrics) over ranks in place, as one flat buffer."""
    if world_size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])  # (total,)
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(params, world_size):
    """Data parallelism by hand: after backward on its own shard, each rank averages the gradients of the
    trained parameters, so every rank takes the same optimiser step and the replicas stay identical."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_mean_(grads, world_size)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def check_finite_update(loss, grad_norm, cfg, step=None):
    """Stop before a step with a NaN or infinite loss or gradient is applied: one such step turns every
    weight into NaN, and the next save would replace the last good checkpoint with it. The check runs
    after the gradient all-reduce, so under torchrun every rank sees the same norm and stops together."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        where = "this step" if step is None else f"step {step + 1}"
        raise SystemExit(f"{where}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; "
                         f"stopped before applying it. The last good checkpoint is kept in "
                         f"{os.path.join(cfg.out_dir, CHECKPOINT_DIR)}; lower --lr, or check the settings "
                         f"(e.g. a NaN weight such as --beta)")


def recover_run(out_dir):
    """On start (rank 0): finish or roll back a checkpoint swap a killed run left half-done."""
    if int(os.environ.get("RANK", 0)) == 0:
        done = recover_checkpoint(os.path.join(out_dir, CHECKPOINT_DIR))
        if done:
            print0(f"{out_dir}: a save was interrupted; {done}")


def trim_metrics(path, step):
    """On --resume: keep the metrics rows up to the saved step (the rows after it are logged again) and
    drop a torn last line (a power cut mid-write), rewriting the file atomically."""
    if not os.path.exists(path):
        return
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn line: what it held is logged again after the resume
            if isinstance(row, dict) and row.get("step", 0) <= step:
                rows.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(rows)
    os.replace(tmp, path)


def rng_states(world_size, generator=None):
    """Every rank's RNG states, torch's and the sampling generator's, in rank order (all ranks call this;
    rank 0 saves the list): each rank draws its own numbers, so a resume that handed every rank rank 0's
    state would differ from the uninterrupted run."""
    mine = {"torch_rng": torch.get_rng_state()}
    if generator is not None:
        mine["generator"] = generator.get_state()
    if world_size == 1:
        return [mine]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, mine)
    return states


def restore_rng_states(state, rank, world_size, generator=None):
    """This rank's RNG states from a train_state (rng_states' list; older checkpoints hold rank 0's only)."""
    per_rank = state.get("rng_per_rank") or [{"torch_rng": state["torch_rng"], "generator": state.get("generator")}]
    if len(per_rank) != world_size:
        print0(f"--resume: the checkpoint holds the RNG states of {len(per_rank)} ranks, this run has "
               f"{world_size}; the random numbers will not repeat those of an uninterrupted run")
    mine = per_rank[rank % len(per_rank)]
    torch.set_rng_state(mine["torch_rng"])
    if generator is not None and mine.get("generator") is not None:
        generator.set_state(mine["generator"])


def run_finished(extra):
    """Whether the run that saved a checkpoint (its config.json `extra`) reached its max_steps.
    Checkpoints from before the flag was recorded say it through their step and config."""
    extra = extra or {}
    if "finished" in extra:
        return bool(extra["finished"])
    return extra.get("step", 0) >= (extra.get("config") or {}).get("max_steps", 0)


def load_optimizer_state(opt, saved: dict) -> None:
    """opt.load_state_dict(saved), keeping this optimiser's `fused` setting. torch takes each group's
    settings from the saved state, so a checkpoint of an unfused AdamW (this code before fused=True) would
    resume unfused; with the flag set first, the step counters also go where the fused kernel wants them."""
    groups = [{**group, "fused": opt.defaults.get("fused")} for group in saved["param_groups"]]
    opt.load_state_dict({**saved, "param_groups": groups})


def load_train_state(out_dir):
    """The optimiser / RNG / step state saved with the run's last checkpoint, or a clear error."""
    path = os.path.join(out_dir, CHECKPOINT_DIR, "train_state.pt")
    if not os.path.exists(path):
        raise SystemExit(f"--resume: no {path}; start without --resume, or point --out_dir at a run "
                         f"that saved a checkpoint")
    # our own file, but still: weights_only keeps a tampered file from running code
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise SystemExit(f"--resume: {path} is not readable ({type(e).__name__}: {e}); it is empty or "
                         f"damaged. Start without --resume, or restore the file") from None
