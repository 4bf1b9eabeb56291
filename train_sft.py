"""Stage 1: supervised fine-tuning of the pose-specific MLLM (Sec. 4.1; Table 4, left column).

In order, this script
1. (tiny preset) trains the BPE tokenizer on PoseWorld text;
2. trains two text-pose retrieval models (rewards.py) on DISJOINT halves of the training captions: the
   "reward" retriever gives the semantic reward of Eq. 8 during RFT, the "eval" retriever only ever
   evaluates (the cross-retriever check of Table 6, and the honest answer to "RFT optimised the
   evaluator");
3. (tiny preset) pretrains the pose ViT f_b to read the SMPL pose from a PoseWorld image on its own
   (pretrain_pose_encoder): a stand-in for the pretrained HMR2.0 the paper starts from, not a stage of
   the paper (--pretrain_steps=0 leaves it out);
4. trains the policy pi_theta(a, p | q) (Eq. 1) with cross-entropy on the answer tokens plus the pose
   loss: the Gaussian negative log-likelihood of the ground-truth pose under N(mu, Sigma) (Eq. 2) and a
   joint-position loss through SMPL, and (tiny preset, not in the paper) an auxiliary posecode loss on h
   at <POSE> (posecode_loss). `--deterministic_head=True` trains the mean only (the "Baseline" row of
   Table 3) with the same losses (the NLL then has a fixed std, i.e. it is a scaled MSE);
5. (tiny preset, not in the paper) refits the pose head alone on the frozen policy's h at <POSE>
   (refit_pose_head; --head_steps=0 leaves it out).

Launch:
    python train_sft.py                                   # tiny preset on PoseWorld, CPU, a few minutes
    python train_sft.py --max_steps=100 --out_dir=out/quick
    torchrun --standalone --nproc_per_node=8 train_sft.py --preset=llava-1.5-7b --out_dir=out/llava-1.5-7b-sft $MODELS $DATA
        # the paper's recipe on the real data: $MODELS and $DATA as README.md ('Using the real weights') sets
        # them; the same line is there, and tests/test_readme_commands.py runs it

Everything a run writes goes under --out_dir: checkpoint/ (model.safetensors, config.json, tokenizer.json
and train_state.pt with the optimiser, RNG and step for --resume, replaced as a whole at each save),
retriever_reward/ and retriever_eval/, and metrics.jsonl. The run plumbing (config overrides, distributed
setup, schedule, metrics, --resume state) is model.py's last section, shared with train_rft.py so both
stages behave the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval as E
import hygrpo
import model as M
import rewards
import smpl
from model import (append_jsonl, apply_overrides, average_gradients, check_config, check_finite_update,
                   load_optimizer_state, load_train_state, lr_at, print0, recover_run, restore_rng_states,
                   rng_states, setup_distributed, trim_metrics)


@dataclass
class SFTConfig:
    preset: str = "tiny"             # "tiny" (PoseWorld, from scratch, CPU) or "llava-1.5-7b" (real weights)
    out_dir: str = "out/tiny-sft"    # everything this run writes
    resume: bool = False             # continue from out_dir/checkpoint (weights, optimiser, RNG, step)
    seed: int = 0
    device: str = "auto"             # "auto" = cuda:LOCAL_RANK if available, else cpu
    dtype: str = "float32"           # "bfloat16" autocast on GPU for the 7B preset
    activation_checkpointing: bool = False  # recompute the LLM's layers in backward: less memory, slower
    # data
    data: str = "poseworld"          # "poseworld" (the tiny world), or real sets: "posescript,h36m,llava_instruct"
    poseworld_size: int = 6000       # training samples of PoseWorld (t2p / i2p / vqa mixed)
    task_mix: str = "t2p:4,i2p:1,vqa:1"  # more t2p than thirds (""), not so many that i2p slips (docs/experiments.md)
    image_size: int = 64             # PoseWorld image side in pixels
    posescript_root: str = ""        # real data paths (README, 'Using the real weights')
    amass_root: str = ""
    h36m_npz: str = ""
    h36m_images: str = ""
    llava_instruct_json: str = ""
    coco_images: str = ""
    # real weights (llava-1.5-7b preset)
    llava_path: str = ""             # llava-hf/llava-1.5-7b-hf folder (config.json, safetensors, tokenizer.json)
    pose_encoder_path: str = ""      # HMR2.0 checkpoint (4D-Humans), or a safetensors of its backbone
    smpl_path: str = ""              # official SMPL model file; empty = the built-in skeleton
    # optimisation (the tiny preset's; llava-1.5-7b takes RECIPES' below, Table 4's where it states them)
    batch_size: int = 16             # GLOBAL samples per optimiser step (Table 4's batch), over all processes
    micro_batch: int = 0             # samples per process per forward pass; 0 = its whole share (no accumulation)
    max_steps: int = 2400            # tiny, after pretrain_steps; 3000 did better but cost time (docs/experiments.md)
    lr: float = 5e-4                 # tiny trains from scratch; 2e-3 collapsed to one constant pose
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9               # Adam betas (0.9, 0.95) as in Table 4
    beta2: float = 0.95
    grad_clip: float = 1.0
    # losses
    ce_weight: float = 1.0           # cross-entropy on the answer tokens
    nll_weight: float = 0.005        # Gaussian NLL of the GT pose (summed over 144 dims, so scaled down)
    nll_beta: float = 0.0            # 1 = beta-NLL (pose_nll; not in the paper): an exercise
    joint_weight: float = 20.0       # mean per-joint position error through SMPL, metres
    posecode_weight: float = 5.0     # auxiliary posecode_loss: teaches h at <POSE> which side (docs/experiments.md)
    deterministic_head: bool = False  # Table 3 "Baseline": mean-only pose head
    system_line: bool = False        # LLaVA v1's system line in every prompt; tiny: none, 23 of 85 tokens a row (docs/experiments.md)
    # then the pose head alone on the frozen policy's h at <POSE> (refit_pose_head); 0 = none
    head_steps: int = 3000           # the head fit h before h carried the codes; refit, it reads them (docs/experiments.md)
    head_lr: float = 5e-4            # constant: SFT's lr has decayed by the time h carries the codes
    tiny_sizes: str = ""             # tiny model sizes, e.g. "llm_hidden=192,llm_layers=6" (model._tiny_config)
    # the tokenizer (tiny) and the two retrievers
    vocab_size: int = 1024           # the tiny BPE's cap: shorter samples in tokens than at 768 (docs/experiments.md)
    retriever_pairs: int = 40000     # t2p-only PoseWorld captions in two halves; 8000 ranked worse (docs/experiments.md)
    retriever_steps: int = 600       # 800 ranked a little better but cost the main job time (docs/experiments.md)
    retriever_batch: int = 256
    retriever_lr: float = 1e-3
    # PoseWorld: each pair's twin (a nearby pose that breaks one of its caption's codes) as a hard negative
    retriever_hard_negatives: bool = True  # ranks a caption's poses more as the checker does (docs/experiments.md)
    # tiny only (llava-1.5-7b's f_b IS the pretrained HMR2.0): the pose ViT f_b first learns image -> SMPL
    # pose alone (pretrain_pose_encoder), a stand-in for HMR2.0's pretraining (README, 'Departures'); 0 = none
    pretrain_steps: int = 1000       # pays on both tasks at a small cost in time (docs/experiments.md)
    pretrain_images: int = 20000     # PoseWorld image-to-pose pairs of the train split, drawn with seed + 5
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3        # the best of 1e-3, 3e-3, 6e-3 (docs/experiments.md)
    # bookkeeping
    log_every: int = 25
    save_every: int = 200
    stop_after: int = 0              # stop after this many steps of this invocation (saved; --resume goes on)
    num_threads: int = 0             # torch CPU threads; 0 = torch's default


# The llava-1.5-7b preset's recipe, {setting: (value, where it comes from)}: it replaces SFTConfig's tiny
# defaults before the command line's flags. Every setting is here but those in PRESET_FREE, so no value
# tuned for the tiny world reaches a 7B run unless a flag asks for it (tests/test_real_preset.py).
RECIPES = {"llava-1.5-7b": {
    "out_dir": ("out/llava-1.5-7b-sft", "choice: the preset's own folder"),
    "dtype": ("bfloat16", "choice: a 7B model does not train in float32 on a 40 GB A100"),
    "activation_checkpointing": (True, "choice: fits 10 samples a GPU"),
    "data": ("posescript,h36m,llava_instruct", "paper: Sec. 4.1, the sets with a loader here"),
    "batch_size": (80, "paper: Table 4 (global)"),
    "micro_batch": (10, "choice: 10 a GPU; 8 GPUs in one pass, fewer accumulate"),
    "max_steps": (10000, "paper: Table 4"),
    "lr": (3e-4, "paper: Table 4"),
    "min_lr_ratio": (0.0, "paper: Table 4, cosine (to 0)"),
    "warmup_steps": (300, "choice: 3% of the steps, LLaVA-1.5's warm-up ratio"),
    "weight_decay": (0.0, "choice: LLaVA-1.5's"),
    "beta1": (0.9, "paper: Table 4"),
    "beta2": (0.95, "paper: Table 4"),
    "grad_clip": (1.0, "choice: LLaVA-1.5's"),
    "ce_weight": (1.0, "choice: not stated"),
    "nll_weight": (0.005, "choice: not stated; the NLL sums 144 numbers (as tiny)"),
    "nll_beta": (0.0, "paper: Eq. 2, the plain likelihood"),
    "joint_weight": (20.0, "choice: not stated; a metric target for the mean (as tiny)"),
    "deterministic_head": (False, "paper: Eq. 2, the Gaussian head"),
    "system_line": (True, "paper: LLaVA-1.5's v1 template, the one its weights were tuned on"),
    "posecode_weight": (0.0, "paper: no auxiliary loss"),
    "head_steps": (0, "paper: one SFT stage"),
    "head_lr": (5e-4, "choice: unused at head_steps=0"),
    "task_mix": ("", "choice: the real sets as they come (PoseWorld only)"),
    "retriever_steps": (5000, "choice: not stated; PoseScript's retrieval model is trained by its authors"),
    "retriever_batch": (256, "choice: not stated"),
    "retriever_lr": (2e-4, "choice: not stated"),
    "retriever_hard_negatives": (False, "choice: PoseScript's captions carry no codes to break"),
    "save_every": (500, "choice: a 7B step is slow"),
}}
# Settings no preset changes: run bookkeeping, paths, and what only PoseWorld or the tiny model reads.
PRESET_FREE = {"preset", "resume", "seed", "device", "poseworld_size", "image_size", "posescript_root",
               "amass_root", "h36m_npz", "h36m_images", "llava_instruct_json", "coco_images", "llava_path",
               "pose_encoder_path", "smpl_path", "tiny_sizes", "vocab_size", "retriever_pairs", "pretrain_steps",
               "pretrain_images", "pretrain_batch", "pretrain_lr", "log_every", "stop_after", "num_threads"}


# ----------------------------------------------------------------------------------------------------
# The three stages


def poseworld_texts(ds, system=data.LLAVA_SYSTEM):
    """Every text the tiny tokenizer must cover: the conversation template, questions, answers."""
    texts = [data.build_prompt(q, has_image=False, system=system) for q in ds.questions[:64]]
    return texts + list(ds.questions) + list(ds.answers) + list(ds.captions)


def train_tokenizer(cfg, train_set):
    """Tiny preset: a BPE vocabulary learned from PoseWorld text (llava-1.5-7b uses llava-hf's)."""
    texts = poseworld_texts(train_set, data.LLAVA_SYSTEM if cfg.system_line else "")
    return M.Tokenizer.train_bpe(texts, cfg.vocab_size)


def retriever_pairs(cfg, device):
    """(joints (n, 24, 3) in the body frame, captions) for the retrievers: PoseScript's training captions
    when it is among the data sets, else a text-to-pose-only PoseWorld set of the train split (the
    policy's mixed set holds a few thousand captions, and a retriever trained on so few memorises them)."""
    if "posescript" in cfg.data:
        ds = data.PoseScript(cfg.posescript_root, cfg.amass_root, split="train")
        pose = ds.poses[[ds.row[pid] for pid, _ in ds.items]]  # (n, 24, 3) axis-angle, one row per caption
        body = smpl.build_body_model(cfg.smpl_path, "cpu")
        joints = body(pose[:, 1:], global_orient=pose[:, 0], return_vertices=False).joints  # (n, 24, 3)
        return data.body_frame_joints(joints), [caption for _, caption in ds.items]
    pairs = retriever_world(cfg)
    return pairs.joints_body, list(pairs.captions)  # body frame: the retriever sees pose, not view


def retriever_world(cfg):
    """The text-to-pose-only PoseWorld train set the retrievers learn from (cached on disk): one
    definition, so retriever_pairs' pairs and retriever_twins' twins stay row for row the same."""
    return data.PoseWorld("train", size=cfg.retriever_pairs, seed=cfg.seed, image_size=cfg.image_size,
                          tasks=("t2p",))


def retriever_twins(cfg):
    """Hard negatives for retriever_pairs' PoseWorld pairs (--retriever_hard_negatives): for each pair, a
    pose near its own that breaks one of its caption's codes (data.twin_poses), joints (n, 24, 3); None
    when off or for PoseScript (whose captions carry no codes to break)."""
    if not cfg.retriever_hard_negatives or "posescript" in cfg.data:
        return None
    pairs = retriever_world(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    twins, broken = data.twin_poses(pairs.pose_body, pairs.codes, pairs.mentioned, g)  # (n, 24, 3), (n,)
    print0(f"hard negatives: {broken.float().mean().item():.1%} of the twins break a code of their caption")
    return twins


def train_retrievers(cfg, tokenizer, device):
    """Two PoseScript-style retrievers on DISJOINT halves of the captions (Table 6's cross check): the
    "reward" one gives the semantic reward of RFT (Eq. 8), the "eval" one only evaluates."""
    joints, captions = retriever_pairs(cfg, device)
    twins = retriever_twins(cfg)  # (n, 24, 3) or None
    half_a, half_b = rewards.split_halves(len(captions), cfg.seed)
    val = data.PoseWorld("val", seed=cfg.seed, image_size=cfg.image_size) if "poseworld" in cfg.data else None
    out = {}
    for name, idx, seed in (("reward", half_a, cfg.seed + 1), ("eval", half_b, cfg.seed + 2)):
        print0(f"retriever '{name}': {len(idx)} pose-caption pairs")
        out[name] = rewards.train_retriever(joints[idx], [captions[i] for i in idx], tokenizer,
                                            steps=cfg.retriever_steps, batch_size=cfg.retriever_batch,
                                            lr=cfg.retriever_lr, seed=seed, device=device,
                                            hard_negatives=None if twins is None else twins[idx])
        if val is not None:  # how far its cosine ranks poses as the exact checker does (eval.py)
            rho = E.perturbed_agreement(out[name], val)
            out[name].train_info["checker_agreement"] = round(rho, 4)
            print0(f"retriever '{name}': rank agreement with the posecode checker {rho:.3f} (Spearman, "
                   f"8 perturbed poses per val caption)")
        save_folder_atomically(os.path.join(cfg.out_dir, f"retriever_{name}"), out[name].save)
    return out


def retrievers_saved(out_dir):
    """Both retriever folders are whole (written by save_folder_atomically, config.json last)."""
    return all(os.path.isfile(os.path.join(out_dir, f"retriever_{name}", "config.json")) for name in ("reward", "eval"))


def save_folder_atomically(path, write):
    """write(folder) into path + ".tmp", then rename it to path: a killed run leaves the old folder or
    none, never half a folder that later runs would take for a whole one."""
    tmp = path + ".tmp"
    for stale in (tmp, path):
        if os.path.exists(stale):
            shutil.rmtree(stale)
    write(tmp)
    os.replace(tmp, path)


def pretrain_pose_encoder(policy, body_model, cfg, device):
    """Tiny preset: train the pose ViT f_b to read the SMPL pose from a PoseWorld image on its own, before
    SFT. The paper's f_b is HMR2.0, pretrained for exactly this on millions of images; the tiny f_b starts
    from random weights, and in SFT it learns from a few hundred image-to-pose answers only, through
    the LLM. This stage is the stand-in for that pretraining (not a stage of the paper).

    A regression head (a mean-only GaussianPoseHead on the mean of f_b's tokens) is trained with f_b on
    the mean per-joint error through SMPL (SFT's joint term), then thrown away: SFT keeps f_b's weights.
    Its own PoseWorld set (train split, seed + 5) and its own RNG leave the rest of SFT as without it.
    Returns the last 50 steps' mean joint error in metres."""
    world = data.PoseWorld("train", size=cfg.pretrain_images, seed=cfg.seed + 5, image_size=cfg.image_size,
                           tasks=("i2p",))
    f_b = policy.pose_encoder
    pose_size = policy.config.pose_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 5)
        head = M.GaussianPoseHead(f_b.config.hidden_size, policy.config.head_hidden,
                                  deterministic=True).to(device)  # drawn on the CPU: no GPU RNG used
        g = torch.Generator().manual_seed(cfg.seed + 5)
        params = list(f_b.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=True)
        f_b.train()
        errors = []
        for step in tqdm(range(cfg.pretrain_steps), desc="pretrain f_b", leave=False):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.pretrain_steps, cfg.pretrain_lr, cfg.warmup_steps, cfg.min_lr_ratio)
            idx = torch.randint(world.size, (cfg.pretrain_batch,), generator=g)  # (B,)
            pixels = data.pose_vit_preprocess(world.images[idx], pose_size).to(device)  # (B, 3, H, W)
            mu = head(f_b(pixels).mean(1)).mu  # (B, 144) from the mean of f_b's tokens
            J_pred = smpl.pose_joints(mu, body_model)  # (B, 24, 3)
            J_gt = smpl.pose_joints(world.poses[idx].to(device), body_model)  # (B, 24, 3)
            loss = (J_pred - J_gt).norm(dim=-1).mean()  # mean per-joint error, metres
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            # model.check_finite_update's test, with this stage's flag (there is no checkpoint yet to keep)
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
                raise SystemExit(f"pose ViT pretraining, step {step + 1}: the loss ({loss.item()}) or the gradient "
                                 f"norm ({grad_norm}) is not finite; lower --pretrain_lr (now {cfg.pretrain_lr})")
            opt.step()
            errors.append(loss.item())
    if dist.is_initialized():  # every rank computed the same f_b; on a GPU, take rank 0's bits
        for p in f_b.parameters():
            dist.broadcast(p.data, 0)
    error = sum(errors[-50:]) / len(errors[-50:])
    print0(f"pose ViT pretrained for {cfg.pretrain_steps} steps on {world.size} PoseWorld images: "
           f"joint error {1000 * error:.0f} mm (last 50 steps)")
    return error


def pose_nll(p, mu, log_std, beta=0.0, log_std_ref=0.0):
    """-log N(p; mu, diag(std^2)) of the GT pose under the head's Gaussian (Eq. 2), summed over the 144
    numbers and averaged over the rows. (n, 144) x 3 -> ().

    beta > 0 is beta-NLL (Seitzer et al., ICLR 2022; not in the paper): each number's term is weighed by
    the constant sg((std / std_ref)^(2 beta)). Plain NLL (beta = 0) pulls mu by (p - mu) / std^2, so the
    numbers the head already predicts well (small std) take the gradient and the hard ones starve;
    beta = 1 pulls every number's mu by (p - mu) / std_ref^2, like the mean-only head's fixed-std loss,
    while std still goes to the same fixed point, the residual's spread."""
    nll = -hygrpo.gaussian_log_prob(p[..., None], mu[..., None], log_std[..., None])  # (n, 144) one per number
    if beta:
        nll = nll * torch.exp(2 * beta * (log_std.detach() - log_std_ref))  # (n, 144)
    return nll.sum(-1).mean()


def posecode_loss(head, h, codes, mentioned):
    """Cross-entropy of a linear classifier on h at <POSE> (n, d) for each posecode the caption names
    (codes, mentioned (n, K)): not in the paper, the tiny preset's auxiliary SFT loss (README,
    'Departures'). With the Gaussian and joint losses alone, the tiny LLM's h at <POSE> learned that a foot
    is raised but not which one (a linear probe told left from right at chance), so its answers kept the
    feet level, as the average pose of a left/right-symmetric world does. Naming each code forces h to
    carry it; the classifier is thrown away after SFT. Returns () (0 when nothing is mentioned)."""
    logits = head(h).view(len(h), data.K, data.C)  # (n, K, C)
    sizes = torch.tensor([len(f.categories) for f in data.POSECODES], device=h.device)  # (K,)
    logits = logits.masked_fill(torch.arange(data.C, device=h.device) >= sizes[:, None], -1e9)  # (n, K, C)
    if not mentioned.any():
        return logits.sum() * 0
    return F.cross_entropy(logits[mentioned].float(), codes[mentioned])


def pose_losses(mu, log_std, p_gt, body_model, cfg, log_std_init):
    """SFT's two pose terms for the head's Gaussian (mu, log_std (n, 144)) and the GT pose p_gt (n, 144)
    rot6d: Eq. 2's negative log-likelihood, and the mean per-joint error (metres) through SMPL.
    Returns (nll, joint), each ()."""
    nll = pose_nll(p_gt, mu, log_std, cfg.nll_beta, log_std_init)  # Eq. 2's likelihood
    J_pred = smpl.pose_joints(mu, body_model)  # (n, 24, 3)
    J_gt = smpl.pose_joints(p_gt, body_model)  # (n, 24, 3) the GT joints of the same body model
    return nll, (J_pred - J_gt).norm(dim=-1).mean()


def make_posecode_head(policy, cfg):
    """posecode_loss's classifier (d -> K x categories), drawn from its own RNG so the policy's weights and
    the rest of the run's random numbers are those of a run without it; None when its weight is 0."""
    if not cfg.posecode_weight:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 7)
        head = nn.Linear(policy.config.llava.text_config.hidden_size, data.K * data.C)
    return head.to(next(policy.parameters()).device)


def sft_loss(policy, body_model, batch, cfg, posecode_head=None):
    """Cross-entropy on the answer tokens + Gaussian NLL of the GT pose (Eq. 2) + SMPL joint error, and
    with posecode_head the auxiliary posecode loss of the text-to-pose rows that carry PoseWorld's codes.

    Returns (loss, parts) where parts holds the terms as floats for logging."""
    answer = batch["labels"] != data.IGNORE_INDEX  # (B, T) read <POSE> in the answer only
    predicts_answer = F.pad(answer[:, 1:], (0, 1))  # (B, T) position t predicts token t + 1, an answer token
    out = policy(batch["input_ids"], batch["attention_mask"], batch.get("clip_pixels"),
                 batch.get("pose_pixels"), answer_mask=answer, logits_at=predicts_answer)
    targets = batch["labels"][:, 1:][predicts_answer[:, :-1]]  # (n,) the answer tokens, row-major
    ce = F.cross_entropy(out.logits.float(), targets)  # out.logits (n, V): only where an answer token is next
    rows = batch["has_pose"] & out.found  # (B,) pose tasks whose answer holds <POSE>
    zero = ce.new_zeros(())
    if rows.any():
        p_gt = M.pose_to_rot6d(batch["pose"][rows])  # (n, 144) the GT pose as the head's rot6d numbers
        mu, log_std = out.pose.mu[rows], out.pose.log_std[rows]  # (n, 144) each
        nll, joint = pose_losses(mu, log_std, p_gt, body_model, cfg, policy.pose_head.log_std_init)
    else:
        nll, joint = zero, zero
    loss = cfg.ce_weight * ce + cfg.nll_weight * nll + cfg.joint_weight * joint
    parts = {"ce": ce.item(), "nll": nll.item(), "joint_m": joint.item()}
    if posecode_head is not None and isinstance(batch.get("codes"), list):
        t2p = torch.tensor([t == "t2p" and c is not None for t, c in zip(batch["task"], batch["codes"])],
                           device=out.found.device) & out.found  # (B,)
        if t2p.any():
            rows = t2p.nonzero().flatten()  # (n,)
            h = out.hidden_states[rows, out.pose_position[rows]]  # (n, d) h at <POSE>, as the pose head reads it
            codes = torch.stack([batch["codes"][i] for i in rows.tolist()]).to(h.device)  # (n, K)
            mentioned = torch.stack([batch["mentioned"][i] for i in rows.tolist()]).to(h.device)  # (n, K)
            aux = posecode_loss(posecode_head, h, codes, mentioned)
        else:
            aux = zero
        loss = loss + cfg.posecode_weight * aux
        parts["posecode"] = aux.item()
    return loss, parts


@torch.no_grad()
def pose_head_inputs(policy, dataset, tokenizer, device, batch_size=64, master=True):
    """What the pose head reads and is trained towards, for every pose-task sample of `dataset`: h at
    <POSE> (n, d), the policy's last hidden state there with the answer teacher-forced (as sft_loss reads
    it), and the GT pose (n, 144) as rot6d. The policy is not changed."""
    collate = data.collate_fn(tokenizer, policy)
    was_training = policy.training
    policy.eval()
    hs, poses = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="h at <POSE>", disable=not master,
                      dynamic_ncols=True, leave=False):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        samples = [s for s in samples if s["has_pose"]]
        if not samples:
            continue
        batch = data.to_device(collate(samples), device)
        answer = batch["labels"] != data.IGNORE_INDEX  # (B, T)
        out = policy(batch["input_ids"], batch["attention_mask"], batch.get("clip_pixels"),
                     batch.get("pose_pixels"), answer_mask=answer, logits_at=torch.zeros_like(answer))
        rows = out.found.nonzero().flatten()  # (n,) answers that hold <POSE>
        hs.append(out.hidden_states[rows, out.pose_position[rows]].float())  # (n, d)
        poses.append(M.pose_to_rot6d(batch["pose"][rows]))  # (n, 144)
    policy.train(was_training)
    if not hs:
        raise SystemExit("--head_steps: the training data hold no pose answers to refit the pose head on")
    return torch.cat(hs), torch.cat(poses)


def refit_pose_head(policy, body_model, dataset, tokenizer, cfg, device, master=True):
    """Tiny preset, after SFT's max_steps (not in the paper; README, 'Departures'): train the pose head
    alone for cfg.head_steps steps at the constant cfg.head_lr, on the frozen policy's h at <POSE> for the
    training set's pose answers, with SFT's pose losses (pose_losses). Why: the head learns its map from h
    early, while h does not yet carry every code of the caption (the posecode loss teaches h the sides
    late, when the lr has decayed); refit on the final h, it reads them. The LLM and the encoders are
    untouched; every rank computes the same head (the same data and seed)."""
    h, p_gt = pose_head_inputs(policy, dataset, tokenizer, device, master=master)  # (n, d), (n, 144)
    head = policy.pose_head
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    generator = torch.Generator(device=h.device).manual_seed(cfg.seed + 11)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    head.train()
    for k in tqdm(range(cfg.head_steps), desc=f"pose head on {len(h)} h", disable=not master,
                  dynamic_ncols=True):
        idx = torch.randint(len(h), (cfg.batch_size,), generator=generator, device=h.device)  # (b,)
        pose = head(h[idx])
        nll, joint = pose_losses(pose.mu, pose.log_std, p_gt[idx], body_model, cfg, head.log_std_init)
        loss = cfg.nll_weight * nll + cfg.joint_weight * joint
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite_update(loss.item(), 0.0, cfg, cfg.max_steps + k)
        opt.step()
        if master and ((k + 1) % cfg.log_every == 0 or k + 1 == cfg.head_steps):
            # the step count goes on after SFT's, so --resume's trim_metrics drops a torn refit's rows
            append_jsonl(metrics_path, {"step": cfg.max_steps + k + 1, "head_step": k + 1, "loss": loss.item(),
                                        "nll": nll.item(), "joint_m": joint.item()})
    print0(f"pose head refit for {cfg.head_steps} steps on the frozen policy's h at <POSE> ({len(h)} pose "
           f"answers): joint error {1000 * joint.item():.0f} mm (last step)")


def accumulate_sft_gradients(policy, body_model, batches, cfg, autocast=contextlib.nullcontext(), posecode_head=None):
    """Backward of the mean of sft_loss over this rank's micro-batches: the gradient of one pass over
    them all when they weigh alike, as DDP's mean over ranks is (one GPU with 8 micro-batches and eight
    GPUs with one each take the same step). Returns (loss, parts), averaged the same way, as floats."""
    total, parts = 0.0, {}
    for batch in batches:
        with autocast:
            loss, micro_parts = sft_loss(policy, body_model, batch, cfg, posecode_head)
        (loss / len(batches)).backward()
        total += loss.item() / len(batches)
        for k, v in micro_parts.items():
            parts[k] = parts.get(k, 0.0) + v / len(batches)
    return total, parts


def parse_sizes(spec):
    """"llm_hidden=192,llm_layers=6" -> {"llm_hidden": 192, "llm_layers": 6}; "a=64x48" gives a tuple."""
    sizes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        try:
            sizes[key.strip()] = tuple(int(v) for v in value.split("x")) if "x" in value else int(value)
        except ValueError:
            raise SystemExit(f"--tiny_sizes: {item!r} is not name=integer (or name=HxW)") from None
    return sizes


def system_prompt(cfg):
    """The policy config's system_prompt for --system_line: None = LLaVA v1's line, "" = none."""
    return None if cfg.system_line else ""


def build_policy(cfg, tokenizer, device):
    """The pose-specific MLLM of the preset (model.py), set up for the SFT stage."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32  # the frozen base; trained stay fp32
    if cfg.preset == "tiny":
        policy = M.PoseLLaVA.from_preset("tiny", tokenizer=tokenizer, device=device,
                                         deterministic=cfg.deterministic_head, system_prompt=system_prompt(cfg),
                                         **parse_sizes(cfg.tiny_sizes))
    else:
        policy = M.PoseLLaVA.from_preset(cfg.preset, tokenizer=tokenizer, device=device, dtype=dtype,
                                         llava_path=cfg.llava_path or None,
                                         pose_encoder_path=cfg.pose_encoder_path or None,
                                         smpl_path=cfg.smpl_path or None, deterministic=cfg.deterministic_head,
                                         system_prompt=system_prompt(cfg))
    policy.set_trainable("sft")
    policy.llava.language_model.model.gradient_checkpointing = cfg.activation_checkpointing
    return policy


def main(argv=None, cfg=None):
    sources = None
    if cfg is None:
        cfg, sources = M.resolve_config(SFTConfig(), sys.argv[1:] if argv is None else argv, RECIPES)
    cfg = check_config(cfg)
    M.check_preset_inputs(cfg, "train_sft.py")
    rank, world_size, device = setup_distributed(cfg.device)
    micro, accum = M.batch_split(cfg.batch_size, cfg.micro_batch, world_size)
    master = rank == 0
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    os.makedirs(cfg.out_dir, exist_ok=True)
    recover_run(cfg.out_dir)
    if world_size > 1:
        dist.barrier()  # the checkpoint is whole before any rank reads it
    print0(f"train_sft.py on {world_size} x {device}, preset {cfg.preset}: {cfg.batch_size} samples a step = "
           f"{world_size} x {micro} x {accum} accumulated\n" + M.format_config(cfg, sources))
    print0(M.format_departures(M.departures(cfg, "sft")))

    train_set = data.build_datasets(cfg, "train", mix=data.parse_task_mix(cfg.task_mix) if cfg.task_mix else None)
    if cfg.resume:  # the run's own vocabulary
        tokenizer = M.Tokenizer.from_file(os.path.join(cfg.out_dir, M.CHECKPOINT_DIR, "tokenizer.json"))
    elif cfg.preset == "tiny":
        tokenizer = train_tokenizer(cfg, train_set)
    else:
        tokenizer = M.Tokenizer.from_file(os.path.join(cfg.llava_path, "tokenizer.json"))
    has_captions = "poseworld" in cfg.data or "posescript" in cfg.data
    if master and has_captions and not retrievers_saved(cfg.out_dir):
        train_retrievers(cfg, tokenizer, device)
    elif not has_captions:
        print0("no text-pose captions in --data: no retrievers trained, so RFT's semantic reward (Eq. 8) needs "
               "--rewards=semantic:0 or retrievers from another SFT run in this --out_dir")
    policy = build_policy(cfg, tokenizer, device)
    body_model = smpl.build_body_model(cfg.smpl_path, device)
    if cfg.pretrain_steps and cfg.preset == "tiny" and not cfg.resume:  # a resumed run's checkpoint has f_b
        pretrain_pose_encoder(policy, body_model, cfg, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    print0(f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, "
           f"{sum(p.numel() for p in params) / 1e6:.2f}M trained")
    posecode_head = make_posecode_head(policy, cfg)  # SFT only: not part of the policy or its checkpoint
    if posecode_head is not None:
        params = params + list(posecode_head.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # fused: one op for all tensors (on the CPU one pass over each) instead of ~10 small ops per tensor.
    # The same update (2.4e-7 after 200 steps); 3.1 against 8.1 ms a step for the tiny policy's 151 tensors
    # (tests/benchmark.py adamw)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    step, head_done = 0, False
    if cfg.resume:
        state = load_train_state(cfg.out_dir)
        M.check_same_preset(json.load(open(os.path.join(cfg.out_dir, M.CHECKPOINT_DIR, "config.json")))
                            .get("extra", {}).get("config"), cfg, f"the checkpoint in {cfg.out_dir}")
        saved = M.load_checkpoint(cfg.out_dir, llava_path=cfg.llava_path or None,
                                  pose_encoder_path=cfg.pose_encoder_path or None, device=device)[0]
        if data.prompt_system(saved.config) != data.prompt_system(policy.config):  # the run's own, as its vocabulary
            trained_with = data.prompt_system(saved.config) == data.LLAVA_SYSTEM
            raise SystemExit(f"the SFT run in {cfg.out_dir} was trained {'with' if trained_with else 'without'} "
                             f"LLaVA's system line: resume it with --system_line={str(trained_with).lower()}")
        policy.load_state_dict(saved.state_dict())
        if posecode_head is not None:
            posecode_head.load_state_dict(state["posecode_head"])
        load_optimizer_state(opt, state["optimizer"])
        restore_rng_states(state, rank, world_size)
        step = state["step"]
        head_done = state.get("head_done", False)
        if master:
            trim_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), step)
        print0(f"resumed at step {step}")

    loader = iter(data.make_loader(train_set, micro, rank, world_size, seed=cfg.seed, start_step=step * accum,
                                   collate_fn=data.collate_fn(tokenizer, policy)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", disable=not master, dynamic_ncols=True)
    policy.train()
    last = min(cfg.max_steps, step + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    while step < last:
        t0 = time.time()
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        batches = [data.to_device(next(loader), device) for _ in range(accum)]  # this rank's share of the batch
        total, parts = accumulate_sft_gradients(policy, body_model, batches, cfg, autocast, posecode_head)
        average_gradients(params, world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        check_finite_update(total, grad_norm, cfg, step)
        opt.step()
        step += 1
        parts = {"step": step, "lr": lr, "loss": total, **parts, "grad_norm": grad_norm,
                 "dt": time.time() - t0}
        if master:
            append_jsonl(metrics_path, parts)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                bar.set_postfix(ce=f"{parts['ce']:.3f}", joint_mm=f"{1000 * parts['joint_m']:.0f}",
                                nll=f"{parts['nll']:.0f}")
        if step % cfg.save_every == 0 or step == last:
            rng = rng_states(world_size)  # every rank takes part; rank 0 saves
            if master:
                save(policy, tokenizer, opt, step, cfg, rng, sources, posecode_head, head_done)
    bar.close()
    if step >= cfg.max_steps and cfg.head_steps and not head_done:
        refit_pose_head(policy, body_model, train_set, tokenizer, cfg, device, master)
        head_done = True
        rng = rng_states(world_size)
        if master:
            save(policy, tokenizer, opt, step, cfg, rng, sources, posecode_head, head_done)
    if world_size > 1:
        dist.barrier()
    if step < cfg.max_steps:
        print0(f"stopped after step {step} of {cfg.max_steps} (--stop_after); continue with --resume=true")
    else:
        print0(f"SFT done: {cfg.out_dir}")
    return policy, tokenizer


def save(policy, tokenizer, opt, step, cfg, rng=None, sources=None, posecode_head=None, head_done=False):
    """out_dir/checkpoint: the policy and what --resume needs (optimiser, every rank's RNG, step, whether
    the pose head was refit), in one atomic swap; `finished` records whether the run reached max_steps and
    its pose-head refit (train_rft.py checks it)."""
    rng = rng or rng_states(1)
    finished = step >= cfg.max_steps and (head_done or not cfg.head_steps)
    M.save_checkpoint(policy, tokenizer, os.path.join(cfg.out_dir, M.CHECKPOINT_DIR),
                      extra={"stage": "sft", "step": step, "finished": finished,
                             "config": dataclasses.asdict(cfg), "sources": sources or {}},
                      train_state={"optimizer": opt.state_dict(), "torch_rng": rng[0]["torch_rng"],
                                   "rng_per_rank": rng, "step": step, "head_done": head_done,
                                   **({"posecode_head": posecode_head.state_dict()} if posecode_head else {})})


if __name__ == "__main__":
    main()
