"""Stage 2: reinforcement fine-tuning with HyGRPO (Algorithm 1; Sec. 3.2-3.3; Table 4, right column).

Per step (Algorithm 1, lines 5-9):
    a batch of prompts q  ->  G answers a_i each, pose_samples poses p_i an answer (model.sample_policy)
    ->  rewards from the registry (rewards.compute_rewards): R_d scores the text a_i, R_c the pose p_i
    ->  group-relative advantages F_hat (from R_d) and Delta_hat (from R_c, the candidates in V only), Eq. 16
    ->  the HyGRPO loss, the negative of Eq. 6 (hygrpo.hygrpo_loss)  ->  an AdamW step.
The old policy of the ratios is the sampling policy (the parameters before this step's update); the
reference policy of the KL term is the SFT model: a frozen copy of every tensor RFT trains (7B: LoRA,
W_a, W_b, the pose head, the <POSE> rows; tiny: the LLM and those heads) swapped in over the shared
frozen base (model.PoseLLaVA.reference; the paper writes both as pi_ref; see hygrpo.py's notes).

The main job, `python train_rft.py` with no arguments on a fresh clone: trains the tiny SFT model if
there is none yet (train_sft.py), evaluates it, runs RFT on PoseWorld, evaluates again and prints the
before/after table (also written to out/tiny-rft/results.md), in about nine minutes on a 2-core CPU
(README.md gives the timings).

Launch:
    python train_rft.py                                    # the main job (tiny preset, CPU)
    python train_rft.py --algo=grpo --out_dir=out/grpo     # discrete-only GRPO baseline (Fig. 4)
    python train_rft.py --rewards=joint:1,semantic:1,format:0,text:1   # an ablation of Table 5
    torchrun --standalone --nproc_per_node=2 train_rft.py  # two processes (gloo on CPU)
    torchrun --standalone --nproc_per_node=8 train_rft.py --preset=llava-1.5-7b --sft_dir=out/llava-1.5-7b-sft --out_dir=out/llava-1.5-7b-rft $MODELS $DATA $TESTS --bge_path=/models/bge-m3
        # the paper's recipe on the real data: $MODELS, $DATA and $TESTS as README.md ('Using the real
        # weights') sets them; the same line is there, and tests/test_readme_commands.py runs it
A run killed mid-way continues with `--resume=true` (same out_dir) from its last checkpoint, with the
same step, optimiser, schedule, RNG and data position.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as E
import hygrpo
import model as M
import rewards
import smpl
import train_sft  # stage 1 when pi_init is missing (ensure_sft); its SFTConfig and RECIPES for the departures
from model import (append_jsonl, apply_overrides, average_gradients, check_config, check_finite_update,
                   load_optimizer_state, load_train_state, lr_at, print0, recover_run, restore_rng_states,
                   rng_states, run_finished, setup_distributed, trim_metrics)


@dataclass
class RFTConfig:
    preset: str = "tiny"              # "tiny" or "llava-1.5-7b"
    sft_dir: str = "out/tiny-sft"     # the SFT checkpoint pi_init; for tiny it is trained first if missing
    sft_overrides: str = ""           # train_sft.py options for that first SFT run: "max_steps=100;lr=1e-3"
    out_dir: str = "out/tiny-rft"     # everything this run writes
    resume: bool = False              # continue from out_dir's last checkpoint
    seed: int = 0
    device: str = "auto"              # "auto" = cuda:LOCAL_RANK if available, else cpu
    dtype: str = "float32"            # "bfloat16": autocast on GPU
    activation_checkpointing: bool = False  # recompute the LLM's layers in backward: less memory, slower
    # HyGRPO (Eq. 6)
    algo: str = "hygrpo"              # "grpo" = discrete-only baseline of Fig. 4 (no pose-policy gradient)
    rewards: str = "joint:1,semantic:1,format:1,text:1"  # name:weight; weight 0 removes a reward (Table 5)
    reward_retriever: str = "reward"  # the semantic reward's retriever; "eval" breaks Table 6's check (exercise)
    G: int = 8                        # answers per prompt
    pose_samples: int = 32            # poses per answer (not in the paper): cheap, 32 beat 8 (docs/experiments.md)
    batch_size: int = 16              # GLOBAL prompts a step, all processes (Table 4's); 8 too few (docs/experiments.md)
    micro_batch: int = 0              # prompts per process per sampling pass; 0 = its whole share (no accumulation)
    task_mix: str = "t2p:6,i2p:2,vqa:1"  # "" = thirds (real data: each sample once): too few t2p (docs/experiments.md)
    max_steps: int = 300              # tiny: enough t2p prompts to move, in the main job's time (docs/experiments.md)
    inner_epochs: int = 1             # policy updates per sampled batch (the old policy stays the sampler)
    clip_eps: float = 0.2             # epsilon of the clipped ratios
    # inner_epochs = 1: the policy that is scored IS the sampler, every ratio is exactly 1, and clip_eps
    # never acts (only the ratios' gradients matter; hygrpo.py notes 1, 11). Clipping needs >= 2.
    beta: float = 0.05                # KL to pi_ref; tiny: more of the posecode gain than at 0.1 (docs/experiments.md)
    beta_i2p: float = 1.0             # i2p prompts' pose KL weight (hygrpo.py note 7): holds MPJPE (docs/experiments.md)
    gradient_at_mean: float = 3.0     # hygrpo.py note 10 (0: Eq. 6): helps i2p; 10 cost t2p gain (docs/experiments.md)
    pose_kl: str = "exact"            # closed form (note 6); GRPO's "k3" drifted from pi_ref (docs/experiments.md)
    temperature: float = 1.0          # sampling temperature of the text policy
    top_p: float = 1.0
    max_new_tokens: int = 24
    # optimisation (the tiny preset's; llava-1.5-7b takes RECIPES' below, Table 4's where it states them)
    lr: float = 2e-4                  # tiny: 1e-4 gained less, 3e-4 no more; the paper's 1e-6 not run (docs/experiments.md)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # data (PoseWorld must match the SFT run's; real sets as in train_sft.py)
    data: str = "poseworld"
    poseworld_size: int = 6000
    image_size: int = 64
    posescript_root: str = ""
    amass_root: str = ""
    h36m_npz: str = ""
    h36m_images: str = ""
    llava_instruct_json: str = ""
    coco_images: str = ""
    # real test protocols of the before/after evaluation (each skipped, and said so, when its path is empty)
    h36m_test_npz: str = ""           # Human3.6M TEST file (--h36m_npz is the training one, never evaluated on)
    h36m_regressor: str = ""          # J_regressor_h36m.npy for the 14-joint protocol
    pw3d_root: str = ""               # 3DPW root (sequenceFiles/, imageFiles/)
    smpl_male_path: str = ""          # SMPL male / female files for 3DPW's ground truth (else reported as approximate)
    smpl_female_path: str = ""
    # real weights
    llava_path: str = ""
    pose_encoder_path: str = ""
    smpl_path: str = ""
    bge_path: str = ""                # BAAI/bge-m3 folder for the text reward; empty = built-in stand-in
    # evaluation, figures, checkpoints
    eval: bool = True                 # evaluate pi_init before and the policy after, print the table
    eval_size: int = 0                # PoseWorld test samples in the before/after table; 0 = the whole split
    agreement_prompts: int = 96       # test captions whose G sampled poses measure retriever-checker agreement
    save_every: int = 25
    stop_after: int = 0               # stop after this many steps of this invocation (saved; --resume goes on)
    allow_unfinished_sft: bool = False  # start from an SFT run that stopped before its max_steps (else refused)
    gallery_every: int = 25           # a pose gallery and the reward curves every N steps
    num_threads: int = 0


# The llava-1.5-7b preset's recipe, {setting: (value, where it comes from)}: it replaces RFTConfig's tiny
# defaults before the command line's flags. Every setting is here but those in PRESET_FREE, so no value
# tuned for the tiny world reaches a 7B run unless a flag asks for it (tests/test_real_preset.py).
# Sec. 4.1: "Reinforcement fine-tuning follows the settings of Visual-RFT and VLM-R1", which run GRPO as
# DeepSeekMath defines it (beta = 0.04, the k3 KL estimator, epsilon = 0.2, one update per batch), with
# VLM-R1's G = 8 answers a prompt.
RECIPES = {"llava-1.5-7b": {
    "sft_dir": ("out/llava-1.5-7b-sft", "choice: train_sft.py's 7B folder"),
    "out_dir": ("out/llava-1.5-7b-rft", "choice: the preset's own folder"),
    "dtype": ("bfloat16", "choice: a 7B model does not train in float32 on an 80 GB A800"),
    "activation_checkpointing": (True, "choice: memory for G answers a prompt"),
    "rewards": ("joint:1,semantic:1,format:1,text:1", "paper: Sec. 3.3's four rewards (weights not stated)"),
    "G": (8, "choice: not stated; VLM-R1's 8 generations a prompt"),
    "pose_samples": (1, "paper: Eq. 6, one pose an answer"),
    "batch_size": (16, "paper: Table 4 (global), read as prompts (Algorithm 1's batch), 8 answers each"),
    "micro_batch": (2, "choice: 2 prompts (16 answers) a GPU; 8 GPUs in one pass, fewer accumulate"),
    "task_mix": ("t2p:1,i2p:1,vqa:1", "choice: not stated; the three tasks alike"),
    "max_steps": (1000, "paper: Table 4"),
    "inner_epochs": (1, "choice: not stated; GRPO's one update per batch"),
    "clip_eps": (0.2, "choice: not stated; GRPO's (DeepSeekMath) epsilon"),
    "beta": (0.04, "choice: not stated; GRPO's (DeepSeekMath) beta"),
    "beta_i2p": (0.04, "paper: Eq. 6's one beta"),
    "gradient_at_mean": (0.0, "paper: Eq. 6 alone"),
    "pose_kl": ("k3", "choice: not stated; GRPO's k3 estimator"),
    "temperature": (1.0, "choice: not stated; VLM-R1's"),
    "top_p": (1.0, "choice: not stated; no nucleus cut"),
    "max_new_tokens": (256, "choice: room for a LLaVA-Instruct answer"),
    "lr": (1e-6, "paper: Table 4"),
    "min_lr_ratio": (0.0, "paper: Table 4, cosine (to 0)"),
    "warmup_steps": (0, "choice: not stated; none"),
    "weight_decay": (0.0, "choice: not stated"),
    "beta1": (0.9, "paper: Table 4"),
    "beta2": (0.95, "paper: Table 4"),
    "grad_clip": (1.0, "choice: not stated"),
    "data": ("posescript,h36m,llava_instruct", "paper: Sec. 4.1, the sets with a loader here"),
    "save_every": (50, "choice: a 7B step is slow"),
    "gallery_every": (50, "choice"),
}}
# Settings no preset changes: run bookkeeping, paths, baselines and what only PoseWorld reads.
PRESET_FREE = {"preset", "sft_overrides", "resume", "seed", "device", "algo", "reward_retriever", "poseworld_size",
               "image_size", "posescript_root", "amass_root", "h36m_npz", "h36m_images", "llava_instruct_json",
               "coco_images", "h36m_test_npz", "h36m_regressor", "pw3d_root", "smpl_male_path", "smpl_female_path",
               "llava_path", "pose_encoder_path", "smpl_path", "bge_path", "eval", "eval_size",
               "agreement_prompts", "stop_after", "allow_unfinished_sft", "num_threads"}


# ----------------------------------------------------------------------------------------------------
# One HyGRPO step


def pose_scored(valid, tasks):
    """(N,) bool: the set V of Eq. 6, the candidates with a pose whose TASK has a continuous reward (any
    registered one, whatever its weight, so Table 5's zero-weight ablation keeps V). A VQA answer that
    happens to emit <POSE> is not a "valid continuous output" of its task: no reward scores its pose, so
    it stays out of V, out of J_c's 1/V and out of the pose KL (hygrpo.py, note 4)."""
    pose_tasks = {t for r in rewards.REWARDS.values() if r.kind == "continuous" for t in r.tasks}
    return valid & torch.tensor([t in pose_tasks for t in tasks], dtype=torch.bool, device=valid.device)  # (N,)


def global_normalisers(N, V, world_size, device):
    """(N_norm, V_norm) for hygrpo_loss: the number of candidates and of those in V summed over ranks, divided
    by the world size. Each rank divides its sums by them, and average_gradients divides by the world size
    again, so the update is the gradient of one batch holding every rank's candidates, normalised by the
    GLOBAL N and V: a rank that drew few valid poses does not weigh them more (hygrpo.py, note 5)."""
    if world_size == 1:
        return float(N), float(V)
    counts = torch.tensor([float(N), float(V)], dtype=torch.float64, device=device)  # (2,)
    dist.all_reduce(counts)
    return counts[0].item() / world_size, counts[1].item() / world_size


def pose_kl_weights(tasks, cfg, device):
    """(N,) the weight of each candidate's pose KL: --beta_i2p on image-to-pose prompts, --beta elsewhere
    (hygrpo.py note 7). None when the two are equal: Eq. 6's one beta."""
    if cfg.beta_i2p == cfg.beta:
        return None
    return torch.tensor([cfg.beta_i2p if t == "i2p" else cfg.beta for t in tasks], device=device)  # (N,)


def differentiable_rewards(cfg, weights):
    """{name: weight} of the rewards whose gradient at the mean the loss carries (hygrpo.py note 10):
    every registered reward that declares itself differentiable in the pose, with a --rewards weight > 0,
    when --gradient_at_mean > 0 and the algorithm is HyGRPO. Empty: Eq. 6 alone."""
    if not cfg.gradient_at_mean or cfg.algo != "hygrpo":
        return {}
    return {name: w for name, w in weights.items() if w > 0 and rewards.REWARDS[name].differentiable}


def gradient_at_mean(pose, cands, R_c, in_V, group_size, weights, body_model, ctx, V_norm, pose_samples=1):
    """hygrpo.py note 10: the deterministic policy gradient of each differentiable reward at each
    Gaussian's mean. Returns (J_path, {name: the reward's mean at the means}). J_path is (1/V) sum over V of
    Delta_hat_i with, on the candidates each reward scores, the gradient of w R(mu_i(theta)) / std of its
    group (pose: the current Gaussians; the group's mean and std of Eq. 16 held). Its value is the sum of
    the advantages (~0); only its gradient acts. The means (NaN without candidates) are for the log. An
    answer's pose_samples consecutive rows share one mean, whose reward is computed once, by the reward's
    own registered function on the candidates with their joints at the mean."""
    R, means = R_c.detach(), {}
    for name, w in weights.items():
        reward = rewards.REWARDS[name]
        rows = in_V & cands.has_gt & torch.tensor([t in reward.tasks for t in cands.task], device=in_V.device)  # (N,)
        if not rows.any():
            means[name] = float("nan")
            continue
        idx = rows.nonzero().flatten()  # (n,) whole answers: an answer's pose draws are all in V or all out
        first = idx[::pose_samples]  # (n / pose_samples,) the first draw of each answer
        with torch.autocast(pose.mu.device.type, enabled=False):  # SMPL's chain of rotations in float32
            J = smpl.pose_joints(pose.mu[first].float(), body_model)  # (n / pose_samples, 24, 3)
        r = reward.fn(dataclasses.replace(cands.select(first), joints=J), ctx)  # (n / pose_samples,)
        r_rows = r.repeat_interleave(pose_samples)  # (n,) each draw of an answer, at its mean
        R = R.index_add(0, idx, w * (r_rows - r_rows.detach()))  # (N,) R_c's values, w R(mu)'s gradient
        means[name] = r.mean().item()
    if all(m != m for m in means.values()):  # no candidate any of them scores (V may be 0): no term
        return pose.mu.new_zeros(()), means
    adv = hygrpo.group_advantages(R, valid=in_V, group_size=group_size, hold_stats=True)  # (N,)
    J_path = adv[in_V].sum() / V_norm  # ()
    return J_path, means


def score_batch(policy, batch, cfg, ctx, weights, body_model, tokenizer, generator):
    """Algorithm 1, lines 6-8, for one micro-batch of prompts: G answers each, with cfg.pose_samples poses
    an answer (note 9), their rewards, the group-relative advantages (Eq. 16) and pi_ref's scores.
    Returns a dict of what the update needs."""
    t0 = time.time()
    # line 6: G outputs {a_i, p_i} ~ pi_theta(. | q) for each q (G x pose_samples poses, note 9)
    policy.eval()  # no dropout while sampling
    rollout = M.sample_policy(policy, batch, cfg.G, cfg.max_new_tokens, cfg.temperature, cfg.top_p, generator,
                              pose_samples=cfg.pose_samples)
    group_size = rollout.group_size  # candidates per prompt: cfg.G answers x cfg.pose_samples poses each
    t_sample = time.time() - t0

    # line 7: rewards; R_d scores the text a_i, R_c the pose p_i
    t0 = time.time()
    cands = rewards.candidates_of(rollout, batch, tokenizer, body_model, group_size)
    R_d, R_c, per_reward = rewards.compute_rewards(cands, ctx, weights)  # (N,), (N,), {name: (N,)}
    # line 8: group-relative advantages, Eq. 16, over each prompt's group_size candidates
    F_hat = hygrpo.group_advantages(R_d, group_size=group_size)  # (N,) every candidate has a text answer
    in_V = pose_scored(rollout.valid, cands.task)  # (N,) poses of pose tasks (note 4)
    Delta_hat = hygrpo.group_advantages(R_c, valid=in_V, group_size=group_size)  # (N,) 0 outside V
    beta_c = pose_kl_weights(cands.task, cfg, rollout.valid.device)  # (N,) beta, or beta_i2p (note 7)
    with torch.no_grad(), policy.reference():  # pi_ref = pi_init: frozen copies of every RFT-trained tensor
        ref = M.policy_logprobs(policy, rollout)  # (N, Tn) logprobs, (N,) pose_logprobs, (N, 144) Gaussians
    return dict(rollout=rollout, group_size=group_size, cands=cands, R_d=R_d, R_c=R_c, per_reward=per_reward,
                F_hat=F_hat, in_V=in_V, Delta_hat=Delta_hat, beta_c=beta_c, ref=ref, t_sample=t_sample,
                t_score=time.time() - t0)


def hygrpo_step(policy, opt, params, batches, cfg, ctx, weights, body_model, tokenizer, generator, world_size):
    """Algorithm 1, lines 6-9, for one step: `batches` are this rank's micro-batches of prompts (one,
    unless the global batch is accumulated: model.batch_split). Every micro-batch is sampled and scored
    before the first update, so each is scored by the same old policy. Returns the step's metrics."""
    at_mean = differentiable_rewards(cfg, weights)  # {name: weight} of note 10's term; {} = Eq. 6 alone
    parts = [score_batch(policy, batch, cfg, ctx, weights, body_model, tokenizer, generator) for batch in batches]
    device = parts[0]["in_V"].device
    N_norm, V_norm = global_normalisers(sum(len(p["in_V"]) for p in parts), sum(int(p["in_V"].sum()) for p in parts),
                                        world_size, device)

    # line 9: maximise Eq. 6 (minimise its negative), inner_epochs times on the same samples
    t0 = time.time()
    policy.train()
    for _ in range(cfg.inner_epochs):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for p in parts:
            rollout, ref, in_V = p["rollout"], p["ref"], p["in_V"]
            cur = M.policy_logprobs(policy, rollout)  # with gradients
            logp, pose_logp = cur.logprobs, cur.pose_logprobs  # (N, Tn), (N,)
            if "old_logp" not in p:  # the old policy is the sampler: the parameters before any update
                p["old_logp"], p["old_pose_logp"] = logp.detach(), pose_logp.detach()
            exact_kl = hygrpo.gaussian_kl(cur.pose.mu, cur.pose.log_std, ref.pose.mu, ref.pose.log_std)  # (N,)
            loss, stats = hygrpo.hygrpo_loss(logp, p["old_logp"], ref.logprobs, rollout.mask, p["F_hat"], pose_logp,
                                             p["old_pose_logp"], ref.pose_logprobs, p["Delta_hat"], in_V,
                                             clip_eps=cfg.clip_eps, beta=cfg.beta,
                                             discrete_only=cfg.algo == "grpo",
                                             pose_kl=exact_kl if cfg.pose_kl == "exact" else None,
                                             N_norm=N_norm, V_norm=V_norm, beta_c=p["beta_c"])
            if at_mean:  # note 10
                J_path, means = gradient_at_mean(cur.pose, p["cands"], p["R_c"], in_V, p["group_size"], at_mean,
                                                 body_model, ctx, V_norm, rollout.pose_samples)
                stats.update({f"{name}_at_mean": v for name, v in means.items()})
                loss = loss - cfg.gradient_at_mean * J_path
            loss.backward()  # each micro-batch's sums are already divided by the global N and V
            total += loss.item()
            p["stats"], p["exact_kl"] = stats, exact_kl
        average_gradients(params, world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        check_finite_update(total, grad_norm, cfg)
        opt.step()
    t_update = time.time() - t0
    metrics = [part_metrics(p, weights) for p in parts]
    # the loss's terms are divided by the whole batch's N and V already: they add up over micro-batches;
    # everything else (reward means, per-token fractions, timings) is averaged over micro-batches (a timing
    # is a micro-batch's, not the step's sum)
    metrics = {k: (sum if k in SUMMED_STATS else nan_mean)([m[k] for m in metrics]) for k in metrics[0]}
    return {**metrics, "grad_norm": grad_norm, "t_update": t_update}


SUMMED_STATS = ("loss", "loss_d", "loss_c", "kl_d", "kl_c", "clip_frac_c", "ratio_c")


def nan_mean(xs):
    """The mean of the finite numbers among xs (a micro-batch without a task's prompt says NaN); NaN if none."""
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def part_metrics(p, weights):
    """One micro-batch's metrics (floats): the loss's stats, the rewards' means per task, timings."""
    in_V = p["in_V"]

    def valid_mean(x):  # mean over the candidates in V (poses of pose tasks); 0 when there are none
        return x.detach()[in_V].mean().item() if in_V.any() else 0.0

    metrics = {**p["stats"], "kl_c_exact": valid_mean(p["exact_kl"]),  # beside kl_c, whichever KL the loss used
               "t_sample": p["t_sample"], "t_score": p["t_score"], "R_d": p["R_d"].mean().item(),
               "R_c": valid_mean(p["R_c"]), "F_hat_abs": p["F_hat"].abs().mean().item(),
               "Delta_hat_abs": p["Delta_hat"].abs().mean().item(), "log_std": valid_mean(p["rollout"].log_std)}
    metrics["agree_semantic_checker"] = semantic_checker_agreement(p["cands"], p["per_reward"], p["group_size"])
    means = rewards.reward_means(p["cands"], p["per_reward"])  # {"name/task": mean over the candidates it scored}
    for name in sorted(n for n, w in weights.items() if w > 0):  # the same keys on every rank (all_reduce)
        for task in rewards.REWARDS[name].tasks:
            metrics[f"reward/{name}/{task}"] = means.get(f"{name}/{task}", float("nan"))  # NaN: no such prompt
    return metrics


def semantic_checker_agreement(cands, per_reward, group_size):
    """How well the semantic reward (Eq. 8) ranks each text-to-pose prompt's group_size candidates the way
    PoseWorld's exact checker does: Spearman's rank correlation within the group, averaged over the
    groups (eval.group_rank_correlation). NaN without the semantic reward, posecodes, or a t2p group
    whose candidates all have a pose."""
    if "semantic" not in per_reward or cands.codes is None:
        return float("nan")
    t2p = torch.tensor([t == "t2p" for t in cands.task[::group_size]])  # (P,) one task per prompt
    full = t2p & cands.valid.view(-1, group_size).all(1).cpu()  # (P,)
    rows = full.repeat_interleave(group_size)  # (N,)
    if not rows.any():
        return float("nan")
    check = data.check_posecodes(cands.joints[rows].detach().cpu(), cands.codes[rows].cpu(),
                                 cands.mentioned[rows].cpu())  # (n,)
    rho, _ = E.group_rank_correlation(per_reward["semantic"][rows].cpu(), check, group_size)
    return rho


def reduce_metrics(metrics, world_size, device):
    """Average every metric over ranks (NaN-aware: a rank whose batch had no prompt of a task says NaN)."""
    if world_size == 1:
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)  # (K,)
    seen = (~vals.isnan()).double()  # (K,)
    both = torch.cat([torch.nan_to_num(vals), seen])  # (2K,)
    dist.all_reduce(both)
    mean = both[:len(keys)] / both[len(keys):].clamp(min=1)
    return {k: (mean[i].item() if both[len(keys) + i] > 0 else float("nan")) for i, k in enumerate(keys)}


# ----------------------------------------------------------------------------------------------------
# Setup


def saved_sft_config(saved):
    """An SFT run's SFTConfig from the config dict its checkpoint saved (keys it does not know dropped).
    A run saved before --system_line existed was trained with LLaVA's system line."""
    fields = {f.name for f in dataclasses.fields(train_sft.SFTConfig)}
    return train_sft.SFTConfig(**{k: v for k, v in {"system_line": True, **saved}.items() if k in fields})


def apply_sft_overrides(sft_cfg, overrides):
    """--sft_overrides, e.g. "max_steps=100;lr=1e-3", set on sft_cfg as train_sft.py's own flags."""
    for item in filter(None, overrides.split(";")):
        apply_overrides(sft_cfg, ["--" + item.strip()])
    return sft_cfg


def check_sft_overrides(cfg, saved):
    """--sft_overrides only shapes an SFT run this command trains: refuse ones that differ from the saved
    config of the SFT run already in --sft_dir (they would be silently ignored)."""
    if not cfg.sft_overrides or not saved:
        return
    wanted = apply_sft_overrides(saved_sft_config(saved), cfg.sft_overrides)
    differ = [f"{k}={getattr(wanted, k)!r} (saved: {saved[k]!r})" for k in sorted(saved)
              if hasattr(wanted, k) and getattr(wanted, k) != saved[k]]
    if differ:
        raise SystemExit(f"--sft_overrides={cfg.sft_overrides!r} would change the SFT run already in "
                         f"{cfg.sft_dir}: {', '.join(differ)}. Give the new SFT model its own --sft_dir")


def ensure_sft(cfg):
    """The main job on a fresh clone: no SFT checkpoint yet -> train the tiny one (train_sft.py). An SFT
    run that stopped before its max_steps (killed, or --stop_after) is not pi_init: the tiny main job
    resumes it with its own saved config; otherwise RFT refuses it, with the command that finishes it,
    unless --allow_unfinished_sft=true."""
    recover_run(cfg.sft_dir)
    config_path = os.path.join(M.checkpoint_dir(cfg.sft_dir), "config.json")
    if os.path.exists(config_path):
        try:
            extra = json.load(open(config_path)).get("extra") or {}
        except (ValueError, AttributeError) as e:
            raise SystemExit(f"{config_path}: not a checkpoint config ({type(e).__name__}: {e})") from None
        saved = extra.get("config") or {}
        M.check_same_preset(extra.get("config"), cfg, f"the SFT checkpoint in {cfg.sft_dir}")
        check_sft_overrides(cfg, saved)
        if run_finished(extra) or cfg.allow_unfinished_sft:
            return
        if cfg.preset != "tiny":
            raise SystemExit(f"the SFT run in {cfg.sft_dir} stopped at step {extra.get('step')} of "
                             f"{saved.get('max_steps')}: finish it with `train_sft.py --out_dir={cfg.sft_dir} "
                             f"--resume=true` and the options it was started with, or pass "
                             f"--allow_unfinished_sft=true to start RFT from it anyway")
        print0(f"the SFT run in {cfg.sft_dir} stopped at step {extra.get('step')} of {saved.get('max_steps')}: "
               f"resuming it first (train_sft.py --resume=true)")
        sft_cfg = saved_sft_config(saved)
        sft_cfg.resume, sft_cfg.stop_after, sft_cfg.out_dir = True, 0, cfg.sft_dir
        train_sft.main(cfg=sft_cfg)
        return
    if cfg.preset != "tiny":
        raise SystemExit(f"no SFT checkpoint in {cfg.sft_dir}: run train_sft.py --preset={cfg.preset} first")
    print0(f"no SFT checkpoint in {cfg.sft_dir}: training the tiny one first (train_sft.py)")
    sft_cfg = train_sft.SFTConfig(out_dir=cfg.sft_dir, seed=cfg.seed, device=cfg.device,
                                  poseworld_size=cfg.poseworld_size, image_size=cfg.image_size,
                                  num_threads=cfg.num_threads)
    train_sft.main(cfg=apply_sft_overrides(sft_cfg, cfg.sft_overrides))


def load_policy(cfg, device):
    """pi_init from the SFT checkpoint, set up for RFT (Algorithm 1, line 3: pi_theta <- pi_init, pi_ref
    <- pi_init): the tensors of trained_names("rft") train (7B: LoRA, W_a, W_b, pose head, <POSE> rows;
    tiny: also the whole LLM), and pi_ref is a frozen copy of exactly those tensors over the shared
    frozen base (model.PoseLLaVA.reference). A resumed run reloads its own checkpoint, which carries
    that copy."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    source = cfg.out_dir if cfg.resume else cfg.sft_dir
    policy, tokenizer, extra = M.load_checkpoint(source, llava_path=cfg.llava_path or None,
                                                 pose_encoder_path=cfg.pose_encoder_path or None,
                                                 device=device, dtype=dtype)
    M.check_same_preset((extra or {}).get("config"), cfg, f"the checkpoint in {source}")
    policy.set_trainable("rft")
    policy.llava.language_model.model.gradient_checkpointing = cfg.activation_checkpointing
    if not cfg.resume:
        policy.freeze_reference()
    return policy, tokenizer


def reward_context(cfg, weights, policy, tokenizer, device):
    """The shared resources of the rewards: the reward retriever (never the eval one), the text embedder."""
    retriever = None
    if weights.get("semantic", 0) > 0:
        retriever = rewards.PoseTextRetriever.load(os.path.join(cfg.sft_dir, f"retriever_{cfg.reward_retriever}"),
                                                   device=device)
    if cfg.bge_path:
        embedder = rewards.BGEM3TextEmbedder(cfg.bge_path, device=device)
    else:  # the stand-in for BGE-M3: mean-pooled hidden states of the frozen reference model
        embedder = rewards.MeanPoolEmbedder(M.reference_hidden_states(policy), tokenizer, device=device)
    return rewards.RewardContext(retriever=retriever, embedder=embedder)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg.startswith("--joint_pathwise=") for arg in argv):
        raise SystemExit("--joint_pathwise is now --gradient_at_mean: the gradient at the mean of every reward "
                         "registered as differentiable (joint), each with its --rewards weight")
    cfg, sources = M.resolve_config(RFTConfig(), argv, RECIPES)
    cfg = check_config(cfg)
    if cfg.algo not in ("hygrpo", "grpo"):
        raise SystemExit(f"--algo must be hygrpo or grpo, got {cfg.algo!r}")
    if cfg.reward_retriever not in ("reward", "eval"):
        raise SystemExit(f"--reward_retriever must be reward or eval, got {cfg.reward_retriever!r}")
    if cfg.pose_kl not in ("k3", "exact"):
        raise SystemExit(f"--pose_kl must be k3 or exact, got {cfg.pose_kl!r}")
    weights = rewards.parse_weights(cfg.rewards)
    M.check_preset_inputs(cfg, "train_rft.py")
    rank, world_size, device = setup_distributed(cfg.device)
    micro, accum = M.batch_split(cfg.batch_size, cfg.micro_batch, world_size)
    master = rank == 0
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.time()
    if master:
        ensure_sft(cfg)
    if world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's SFT
    torch.manual_seed(cfg.seed)  # the same random numbers on every rank (the weights come from the checkpoint)
    os.makedirs(cfg.out_dir, exist_ok=True)
    recover_run(cfg.out_dir)
    if world_size > 1:
        dist.barrier()  # the checkpoint is whole before any rank reads it
    print0(f"train_rft.py on {world_size} x {device}, preset {cfg.preset}: {cfg.batch_size} prompts a step = "
           f"{world_size} x {micro} x {accum} accumulated, {cfg.G} answers x {cfg.pose_samples} poses each\n"
           + M.format_config(cfg, sources))
    print0(M.format_departures(M.departures(cfg, "rft")))

    policy, tokenizer = load_policy(cfg, device)
    body_model = smpl.build_body_model(cfg.smpl_path, device)
    ctx = reward_context(cfg, weights, policy, tokenizer, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    print0(f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, "
           f"{sum(p.numel() for p in params) / 1e6:.3f}M trained in RFT")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=True)  # as in train_sft.py
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)  # own samples per rank
    step = 0
    if cfg.resume:
        step = resume(cfg, opt, generator, rank, world_size)

    train_set = sft_set = data.build_datasets(cfg, "train")  # the SFT run's data (the same data fields)
    if cfg.task_mix and cfg.data == "poseworld":  # the same poses, their tasks drawn in other proportions
        train_set = data.PoseWorld("train", size=cfg.poseworld_size, seed=cfg.seed, image_size=cfg.image_size,
                                   mix=data.parse_task_mix(cfg.task_mix))
    elif cfg.data != "poseworld":  # the real sets (PoseScript t2p, Human3.6M i2p, LLaVA-Instruct vqa), drawn by task
        sets = data.dataset_parts(sft_set)
        mix = data.parse_task_mix(cfg.task_mix) if cfg.task_mix else tuple(  # "": each sample once an epoch
            float(sum(len(s) for s in sets if getattr(s, "task", None) == t)) for t in data.TASKS)
        train_set = data.TaskMixture(sets, mix, seed=cfg.seed)
        print0(f"RFT prompts, --task_mix={cfg.task_mix or '(empty: every sample once)'}: " + ", ".join(
            f"{t} {c} from {'+'.join(type(s).__name__ for s in train_set.sets if s.task == t)}"
            for t, c in train_set.counts.items()) + f" per epoch of {len(train_set)}")
    if master and cfg.data != "poseworld":
        check_answer_lengths(data.dataset_parts(sft_set), tokenizer, cfg.max_new_tokens)
    loader = iter(data.make_loader(train_set, micro, rank, world_size, seed=cfg.seed + 1, start_step=step * accum,
                                   collate_fn=data.collate_fn(tokenizer, policy, True)))
    evaluator = None
    if master and cfg.eval and cfg.data == "poseworld":
        evaluator = make_evaluator(cfg, tokenizer, body_model, ctx, sft_set, device)
    elif master and cfg.eval:  # the real test protocols whose files are given
        evaluator = make_real_evaluator(cfg, tokenizer, body_model, device)
    if evaluator is not None and step == 0:
        before = evaluator(policy, "before RFT (SFT model)")
        with open(os.path.join(cfg.out_dir, "eval_before.json"), "w") as f:
            json.dump(before, f, indent=1)
    gallery = Gallery(cfg, train_set, tokenizer, body_model, device) if master else None

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"rft ({cfg.algo})", disable=not master, dynamic_ncols=True)
    last = min(cfg.max_steps, step + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    while step < last:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = [data.to_device(next(loader), device) for _ in range(accum)]  # the global batch, per rank
        with autocast:
            metrics = hygrpo_step(policy, opt, params, batches, cfg, ctx, weights, body_model, tokenizer,
                                  generator, world_size)
        metrics = reduce_metrics(metrics, world_size, device)
        step += 1
        if master:
            append_jsonl(metrics_path, {"step": step, "lr": lr, **metrics})
            bar.update(1)
            bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in metrics.items()
                             if k.startswith("reward/") and v == v})  # skip NaN: no prompt of that task
            if step % cfg.gallery_every == 0 or step == cfg.max_steps:
                gallery.add(policy, step)
                write_reward_curves(metrics_path, os.path.join(cfg.out_dir, "reward_curves.svg"))
        if step % cfg.save_every == 0 or step == last:
            rng = rng_states(world_size, generator)  # every rank takes part; rank 0 saves
            if master:
                save(cfg, policy, tokenizer, opt, generator, step, rng, sources)
    bar.close()
    if world_size > 1:
        dist.barrier()
    if step < cfg.max_steps:
        print0(f"stopped after step {step} of {cfg.max_steps} (--stop_after); continue with --resume=true")
    elif evaluator is not None:
        before = json.load(open(os.path.join(cfg.out_dir, "eval_before.json")))
        after = evaluator(policy, "after RFT")
        where = "PoseWorld test" if cfg.data == "poseworld" else f"real test sets ({', '.join(after['protocols'])})"
        table = E.format_comparison(before, after, title=f"{where}, {cfg.algo}, {step} steps, rewards {cfg.rewards}")
        if after.get("protocols_skipped"):
            table += "\n\nNot evaluated: " + "; ".join(after["protocols_skipped"]) + "."
        table += "\n\n" + departures_foot(cfg)  # under the table, not lost above the progress bars
        with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(cfg.out_dir, "eval_after.json"), "w") as f:
            json.dump(after, f, indent=1)
        print0("\n" + table)
    print0(f"done in {(time.time() - t_start) / 60:.1f} min; outputs in {cfg.out_dir}")
    if world_size > 1:
        dist.destroy_process_group()
    return policy


# ----------------------------------------------------------------------------------------------------
# Checkpoints, evaluation, figures


def save(cfg, policy, tokenizer, opt, generator, step, rng=None, sources=None):
    """out_dir/checkpoint: the policy (with its pi_ref copy) and the optimiser, every rank's RNG states and
    the step, swapped in atomically as one folder: a killed run loses at most the steps since the last save."""
    rng = rng or rng_states(1, generator)
    M.save_checkpoint(policy, tokenizer, os.path.join(cfg.out_dir, M.CHECKPOINT_DIR),
                      extra={"stage": "rft", "step": step, "finished": step >= cfg.max_steps,
                             "config": dataclasses.asdict(cfg), "sources": sources or {}},
                      train_state={"optimizer": opt.state_dict(), "torch_rng": rng[0]["torch_rng"],
                                   "generator": rng[0]["generator"], "rng_per_rank": rng, "step": step})


def resume(cfg, opt, generator, rank=0, world_size=1):
    """The optimiser, this rank's RNG states and the step of the last save (the policy itself came from
    the same checkpoint); metrics.jsonl is cut back to that step."""
    state = load_train_state(cfg.out_dir)
    load_optimizer_state(opt, state["optimizer"])
    restore_rng_states(state, rank, world_size, generator)
    if rank == 0:
        trim_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), state["step"])
    print0(f"resumed {cfg.out_dir} at step {state['step']}")
    return state["step"]


def departures_foot(cfg):
    """The departures of this RFT run and of the SFT run it started from (README, 'Departures')."""
    text = M.format_departures(M.departures(cfg, "rft"), "where this RFT run departs from the paper")
    path = os.path.join(M.checkpoint_dir(cfg.sft_dir), "config.json")
    saved = (json.load(open(path)).get("extra") or {}).get("config") if os.path.exists(path) else None
    if saved:
        text += "\n\n" + M.format_departures(M.departures(saved_sft_config(saved), "sft"), "and its SFT run")
    return text


def departures_markdown():
    """The README's departures table: every row of model.DEPARTURES, with the value of each preset's own
    recipe ("= paper" where it follows the paper). Regenerate the README's copy with
    `python -c "import train_rft; print(train_rft.departures_markdown())"`."""
    configs = {preset: {"sft": M.resolve_config(train_sft.SFTConfig(), [f"--preset={preset}"], train_sft.RECIPES)[0],
                        "rft": M.resolve_config(RFTConfig(), [f"--preset={preset}"], RECIPES)[0]}
               for preset in M.PRESETS}
    lines = ["| setting | paper | " + " | ".join(f"`{p}`" for p in M.PRESETS) + " | why | measured |",
             "| --- " * (4 + len(M.PRESETS)) + "|"]
    for d in M.DEPARTURES:
        values = [d.value(configs[p][d.stage]) for p in M.PRESETS]
        lines.append(f"| {d.setting} | {d.paper} | " + " | ".join(v or "= paper" for v in values)
                     + f" | {d.why} | {d.measured} |")
    return "\n".join(lines)


def make_evaluator(cfg, tokenizer, body_model, ctx, train_set, device):
    """Evaluation on the PoseWorld test split with both retrievers (eval.py), the trivial baselines from
    the SFT run's training poses (train_set), and the retriever-checker agreement on sampled candidates."""
    test_set = data.PoseWorld("test", seed=cfg.seed, image_size=cfg.image_size)
    load = lambda name: rewards.PoseTextRetriever.load(os.path.join(cfg.sft_dir, f"retriever_{name}"),  # noqa: E731
                                                       device=device)
    retrievers = {"eval": load("eval"), "reward": load("reward")}
    baseline_poses = {task: train_set.poses[train_set.task_indices(task)] for task in ("i2p", "t2p")}
    limit = cfg.eval_size or None  # 0: the whole split

    def evaluator(policy, label):
        print0(f"evaluating {label} on {min(limit or len(test_set), len(test_set))} PoseWorld test samples")
        return E.evaluate(policy, tokenizer, test_set, body_model, retrievers, ctx.embedder, limit=limit,
                          device=device, baseline_poses=baseline_poses, agreement_prompts=cfg.agreement_prompts,
                          G=cfg.G)
    return evaluator


def make_real_evaluator(cfg, tokenizer, body_model, device):
    """The before/after evaluation on the real test protocols whose files the config names (Sec. 4.1):
    Human3.6M's test file (Table 1: MPJPE / PA-MPJPE on the 14 LSP joints, which needs the SMPL file and
    the H3.6M regressor), 3DPW's test split (Table 1), and PoseScript's test split (Table 2: R@K of the
    generated poses under both protocols, judged by the SFT run's evaluation retriever, which learnt from
    PoseScript's train captions and never gave a reward). Says which protocols run and which are
    skipped, and why; each result holds them as "protocols" and "protocols_skipped". None when none runs.
    --h36m_npz is the Human3.6M TRAINING file (SFT's and RFT's i2p prompts): it is never evaluated on."""
    limit = cfg.eval_size or None
    runs, skipped = {}, []
    regressor = cfg.h36m_regressor  # J_regressor_h36m.npy, for the 14-joint protocol
    eval_body = None
    if cfg.smpl_path and regressor:
        eval_body = smpl.SMPL.from_file(cfg.smpl_path, extra_regressors={"h36m": regressor}).to(device)
    h36m_test = cfg.h36m_test_npz
    if not h36m_test:
        skipped.append("Human3.6M (no --h36m_test_npz)")
    elif eval_body is None:
        skipped.append("Human3.6M (its 14-joint protocol needs --smpl_path and --h36m_regressor)")
    else:
        h36m = data.Human36M(h36m_test, cfg.h36m_images, images=True)
        runs["h36m"] = lambda policy: E.evaluate_real_i2p(policy, tokenizer, h36m, eval_body, "h36m", limit,
                                                          device=device, progress=False)
    pw3d_root = cfg.pw3d_root
    if not pw3d_root:
        skipped.append("3DPW (no --pw3d_root)")
    else:
        gt_models = None  # without the gendered models evaluate_real_i2p reports 3dpw_approx_* (and says so)
        male, female = cfg.smpl_male_path, cfg.smpl_female_path
        if eval_body is not None and male and female:
            gt_models = {g: smpl.SMPL.from_file(path, extra_regressors={"h36m": regressor}).to(device)
                         for g, path in (("m", male), ("f", female))}
        pw3d = data.ThreeDPW(pw3d_root, "test", images=True)
        body = eval_body if eval_body is not None else body_model  # no regressor: the approximate protocol
        runs["3dpw"] = lambda policy: E.evaluate_real_i2p(policy, tokenizer, pw3d, body, "3dpw", limit, device=device,
                                                          progress=False, gt_body_models=gt_models)
    with open(os.path.join(M.checkpoint_dir(cfg.sft_dir), "config.json")) as f:
        sft_config = json.load(f)["extra"]["config"]
    if "posescript" not in cfg.data:
        skipped.append("PoseScript text-to-pose (posescript not in --data)")
    elif "posescript" not in sft_config.get("data", ""):
        skipped.append(f"PoseScript text-to-pose (the retrievers of {cfg.sft_dir} did not learn PoseScript's captions)")
    else:
        posescript = data.PoseScript(cfg.posescript_root, cfg.amass_root, split="test")
        retriever = rewards.PoseTextRetriever.load(os.path.join(cfg.sft_dir, "retriever_eval"), device=device)
        runs["posescript"] = lambda policy: E.evaluate_real_t2p(policy, tokenizer, posescript, body_model, retriever,
                                                                limit, device=device, progress=False, seed=cfg.seed)
    print0(f"evaluation before and after RFT on: {', '.join(runs) or 'nothing'}"
           + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
    if not runs:
        return None

    def evaluator(policy, label):
        E.refuse_nonfinite_weights(policy)
        out = {"protocols": list(runs), "protocols_skipped": skipped, "items": {}}
        for name, run in runs.items():
            print0(f"evaluating {label} on the {name} test protocol")
            result = run(policy)
            out["items"].update(result.pop("items", {}))
            out.update(result)
        return out
    return evaluator


def check_answer_lengths(sets, tokenizer, max_new_tokens, n=2000):
    """Print how many of the VQA sets' reference answers (the first n of each) --max_new_tokens cuts: a
    sampled answer stops there, and the text reward (Eq. 10) would compare a cut answer with a whole one."""
    answers = [pairs[0][1] for ds in sets if isinstance(ds, data.LLaVAInstruct) for _, _, pairs in ds.entries[:n]]
    if not answers:
        return
    lengths = sorted(len(tokenizer.encode(a)) + 1 for a in answers)  # + </s>
    cut = sum(k > max_new_tokens for k in lengths)
    if cut:
        print0(f"--max_new_tokens={max_new_tokens} cuts {cut} of {len(lengths)} LLaVA-Instruct reference answers "
               f"(median {lengths[len(lengths) // 2]} tokens, longest {lengths[-1]}, with </s>)")


class Gallery:
    """Fig. 5 for this run: the mean pose for a few fixed text prompts at successive RFT steps, one row per
    prompt (its caption, shortened, above the row), the ground truth first ("GT"), then one column per step.
    The prompts: PoseWorld's val captions, or on real data PoseScript's (its val split, else its test
    split), drawn in the body frame (their heading and tilt undone, as the retrievers see them). Real data
    without PoseScript has no captions: no gallery."""

    # PoseWorld's rows: a kick, a lunge, a bow and a raised arm, each the first val caption of its archetype
    # that names a code of the family it shows (so legs, feet, torso and arms are all asked about)
    SHOWN = (("kicking", "raised_foot"), ("lunge", "left_knee"), ("bending", "torso_pitch"),
             ("arms_up", "left_hand_height"))

    def __init__(self, cfg, train_set, tokenizer, body_model, device, n=4):
        self.frame = None  # PoseWorld's text-to-pose poses are in the body frame already
        if cfg.data == "poseworld":
            val = data.PoseWorld("val", seed=cfg.seed, image_size=cfg.image_size)
            self.samples = poseworld_gallery_samples(val, self.SHOWN[:n])
        elif "posescript" in cfg.data:
            val = data.PoseScript(cfg.posescript_root, cfg.amass_root, split="val")
            val = val if len(val) else data.PoseScript(cfg.posescript_root, cfg.amass_root, split="test")
            self.samples, self.frame = [val[i] for i in range(min(n, len(val)))], data.body_frame_joints
        else:
            self.samples = []
        if not self.samples:
            print0("no text-to-pose captions to draw (posescript not in --data, or no val / test captions): "
                   "no gallery")
        self.path = os.path.join(cfg.out_dir, "gallery.png")
        self.tokenizer, self.body_model, self.device = tokenizer, body_model, device
        self.columns, self.steps = [], []  # one (n, 24, 3) per gallery step, and the step

    @torch.no_grad()
    def add(self, policy, step):
        if not self.samples:
            return
        policy.eval()
        batch = data.to_device(data.collate_fn(self.tokenizer, policy, True)(self.samples), self.device)
        rollout = M.sample_policy(policy, batch, 1, 24, temperature=0.0)  # greedy text, mean pose
        self.columns.append(self.in_frame(smpl.pose_joints(rollout.mu, self.body_model)))  # (n, 24, 3)
        self.steps.append(step)
        if self.samples[0]["joints"] is not None:  # PoseWorld
            gt = torch.stack([s["joints"] for s in self.samples])  # (n, 24, 3)
        else:  # PoseScript gives the pose: its joints through the run's body model
            pose = torch.stack([s["pose"] for s in self.samples]).to(self.device)  # (n, 24, 3)
            gt = self.in_frame(smpl.pose_joints(M.pose_to_rot6d(pose), self.body_model))  # (n, 24, 3)
        grid = torch.stack([gt] + self.columns, dim=1).flatten(0, 1)  # (n * (1 + steps), 24, 3)
        heads = ["GT"] + [f"step {k}" for k in self.steps]  # every cell names its column: no looking up
        footers = None
        if self.samples[0].get("codes") is not None:  # PoseWorld: which of the caption's codes each answer meets
            footers = [code_marks(J, s) for s, row in zip(self.samples, grid.view(len(self.samples), -1, 24, 3))
                       for J in row]
        data.render_poses(grid, self.path, views=("front", "side"), cols=1 + len(self.columns),
                          titles=heads * len(self.samples), row_labels=[s["caption"] for s in self.samples],
                          footers=footers)

    def in_frame(self, joints):
        """(n, 24, 3) joints on the CPU, in the frame the figure draws."""
        joints = joints.detach().float().cpu()
        return joints if self.frame is None else self.frame(joints)


def poseworld_gallery_samples(world, shown):
    """For each (archetype, family) of `shown`, the first text-to-pose sample of `world` of that archetype
    whose caption names a code of that family (else of the archetype, else any text-to-pose sample)."""
    t2p = [int(i) for i in world.task_indices("t2p")]
    names = [a.name for a in data.ARCHETYPES]
    out = []
    for archetype, family in shown:
        k, f = names.index(archetype), data.POSECODE_INDEX[family]
        rows = [i for i in t2p if int(world.archetype[i]) == k and i not in out]
        named = [i for i in rows if world.mentioned[i, f]]
        out.append((named or rows or [i for i in t2p if i not in out])[0])
    return [world[i] for i in out]


# short names of the posecode families for the gallery's marks (the 3x5 font has no ticks): + met, - missed
CODE_ABBREV = {"left_elbow": "LE", "right_elbow": "RE", "left_knee": "LK", "right_knee": "RK",
               "left_hand_height": "LHH", "right_hand_height": "RHH", "left_hand_side": "LHS",
               "right_hand_side": "RHS", "left_hand_forward": "LHF", "right_hand_forward": "RHF",
               "hands_distance": "HD", "feet_distance": "FD", "raised_foot": "RF", "foot_forward": "FF",
               "hips_height": "HH", "torso_pitch": "TP", "torso_roll": "TR", "head_pitch": "HP"}


def code_marks(joints, sample):
    """"LK+ FD- RF+": each code the caption names, and whether the pose (24, 3) meets it (data.posecodes)."""
    got = data.posecodes(joints[None])[0]  # (K,)
    return " ".join(f"{CODE_ABBREV[f.name]}{'+' if got[k] == sample['codes'][k] else '-'}"
                    for k, f in enumerate(data.POSECODES) if sample["mentioned"][k])


def write_reward_curves(metrics_path, svg_path):
    """Fig. 4 for this run: a panel per reward and task, each step and its running mean
    (eval.reward_curves_svg), written atomically so a reader never sees half a figure."""
    title = f"reward per RFT step, {os.path.dirname(metrics_path) or '.'}"
    E.write_svg(E.reward_curves_svg(E.read_metrics(metrics_path), title=title), svg_path)


if __name__ == "__main__":
    main()
