"""Stage 2: reinforcement fine-tuning with HyGRPO (Algorithm 1; Sec. 3.2-3.3; Table 4, right column).

Per step (Algorithm 1, lines 5-9):
    a batch of prompts q  ->  G candidates (a_i, p_i) each from the current policy (model.sample_policy)
    ->  rewards from the registry (rewards.compute_rewards): R_d scores the text a_i, R_c the pose p_i
    ->  group-relative advantages F_hat (from R_d) and Delta_hat (from R_c, valid candidates only), Eq. 16
    ->  the HyGRPO loss, the negative of Eq. 6 (hygrpo.hygrpo_loss)  ->  an AdamW step.
The old policy of the ratios is the sampling policy (the parameters before this step's update); the
reference policy of the KL term is the SFT model: a frozen copy of every tensor RFT trains (7B: LoRA,
W_a, W_b, the pose head, the <POSE> rows; tiny: the LLM and those heads) swapped in over the shared
frozen base (model.PoseLLaVA.reference; the paper writes both as pi_ref; see hygrpo.py's notes).

The main job, `python train_rft.py` with no arguments on a fresh clone: trains the tiny SFT model if
there is none yet (train_sft.py), evaluates it, runs RFT on PoseWorld, evaluates again and prints the
before/after table (also written to out/tiny-rft/results.md). It took 7.5 to 8.9 minutes on a 2-core CPU,
alone, for seeds 0, 1 and 2 (the machine's speed varies from hour to hour; README).

Launch:
    python train_rft.py                                    # the main job (tiny preset, CPU)
    python train_rft.py --algo=grpo --out_dir=out/grpo     # discrete-only GRPO baseline (Fig. 4)
    python train_rft.py --rewards=joint:1,semantic:1,format:0,text:1   # an ablation of Table 5
    torchrun --standalone --nproc_per_node=2 train_rft.py  # two processes (gloo on CPU)
    torchrun --standalone --nproc_per_node=8 train_rft.py --preset=llava-1.5-7b --sft_dir=out/7b-sft \
        --llava_path=/models/llava-1.5-7b-hf --pose_encoder_path=/models/hmr2.ckpt \
        --smpl_path=/models/SMPL_NEUTRAL.pkl --bge_path=/models/bge-m3 --lr=1e-6 --batch_size=2 \
        --max_steps=1000 --dtype=bfloat16 --beta=0.04 --beta_i2p=0.04 --joint_pathwise=0 --pose_kl=k3 \
        --pose_samples=1  # the paper's
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
import train_sft  # only to run stage 1 when pi_init is missing (ensure_sft)
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
    activation_checkpointing: bool = False  # recompute the LLM's layers in backward: less memory, ~30% slower
    # HyGRPO (Eq. 6)
    algo: str = "hygrpo"              # "grpo" = discrete-only baseline of Fig. 4 (no pose-policy gradient)
    rewards: str = "joint:1,semantic:1,format:1,text:1"  # name:weight; weight 0 removes a reward (Table 5)
    reward_retriever: str = "reward"  # the semantic reward's retriever; "eval" breaks Table 6's check (exercise)
    G: int = 8                        # candidates per prompt
    pose_samples: int = 32            # M poses per answer (not in the paper, note 16): 256 poses a prompt, cheap;
    # with beta_i2p 1.0, 3 seeds: +0.7 (s.e. 0.2) posecode points, +2.1 (0.3) recall over 8, the same MPJPE (README)
    batch_size: int = 16              # prompts per rank per step (Table 4: 16 in all); tiny: 8 was too few (README)
    task_mix: str = "t2p:6,i2p:2,vqa:1"  # PoseWorld RFT prompts; "" = SFT's thirds: too few t2p (README)
    max_steps: int = 300              # tiny: 300 x 16 prompts; at 150 x 8 no metric moved beyond noise (README)
    inner_epochs: int = 1             # policy updates per sampled batch (the old policy stays the sampler)
    clip_eps: float = 0.2             # epsilon of the clipped ratios
    # inner_epochs = 1: the policy that is scored IS the sampler, every ratio is exactly 1, and clip_eps
    # never acts (only the ratios' gradients matter; hygrpo.py notes 1, 15). Clipping needs >= 2.
    beta: float = 0.05                # KL to pi_ref; tiny, 3 seeds of the earlier SFT: posecode +2.8 at 0.05, +1.9 at 0.1
    # (README); from today's SFT with one beta, 8 poses, 3 seeds: +3.2 at 0.05, +1.5 at 0.1 (MPJPE +1.7, +1.4 mm)
    beta_i2p: float = 1.0             # the pose KL's weight on image-to-pose prompts (hygrpo.py note 18; not in
    # the paper: --beta_i2p=--beta is its one beta); tiny, 3 seeds: MPJPE +0.3 mm against +1.7, posecode +3.2 both
    joint_pathwise: float = 3.0       # the joint reward's gradient at the mean (hygrpo.py note 19; not in the
    # paper: 0 is the paper); 3 seeds, 800-step retrievers: MPJPE -0.33 mm against +0.27 without, posecode +3.4
    # against +4.0; with 600-step ones -0.29 mm and +3.1, and in the final code's draw -0.78 mm and +3.5 (README)
    pose_kl: str = "exact"            # pose KL: closed form ("exact", note 12), or GRPO's "k3" at the sample
    temperature: float = 1.0          # sampling temperature of the text policy
    top_p: float = 1.0
    max_new_tokens: int = 24
    # optimisation (Table 4, right column, for llava-1.5-7b: lr 1e-6, 1000 steps, cosine, AdamW)
    lr: float = 1e-4                  # tiny; held by the exact KL (with k3 at beta 0.04 it random-walked: README)
    # one beta, 8 poses, 3 seeds: 1e-5 kept image-to-pose (+0.5 mm against +1.7) for posecode +1.2 against +3.2
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


# ----------------------------------------------------------------------------------------------------
# One HyGRPO step


def pose_scored(valid, tasks):
    """(N,) bool: the set V of Eq. 6, the candidates with a pose whose TASK has a continuous reward (any
    registered one, whatever its weight, so Table 5's zero-weight ablation keeps V). A VQA answer that
    happens to emit <POSE> is not a "valid continuous output" of its task: no reward scores its pose, so
    it stays out of V, out of J_c's 1/V and out of the pose KL (hygrpo.py, note 13)."""
    pose_tasks = {t for r in rewards.REWARDS.values() if r.kind == "continuous" for t in r.tasks}
    return valid & torch.tensor([t in pose_tasks for t in tasks], dtype=torch.bool, device=valid.device)  # (N,)


def global_normalisers(N, V, world_size, device):
    """(N_norm, V_norm) for hygrpo_loss: the number of answers and of poses in V summed over ranks, divided
    by the world size. Each rank divides its sums by them, and average_gradients divides by the world size
    again, so the update is the gradient of one batch holding every rank's candidates, normalised by the
    GLOBAL N and V: a rank that drew few valid poses does not weigh them more (hygrpo.py, note 3)."""
    if world_size == 1:
        return float(N), float(V)
    counts = torch.tensor([float(N), float(V)], dtype=torch.float64, device=device)  # (2,)
    dist.all_reduce(counts)
    return counts[0].item() / world_size, counts[1].item() / world_size


def pose_kl_weights(tasks, cfg, device):
    """(N,) the weight of each candidate's pose KL: --beta_i2p on image-to-pose prompts, --beta elsewhere
    (hygrpo.py note 18). None when the two are equal: Eq. 6's one beta."""
    if cfg.beta_i2p == cfg.beta:
        return None
    return torch.tensor([cfg.beta_i2p if t == "i2p" else cfg.beta for t in tasks], device=device)  # (N,)


def pathwise_on(cfg, weights):
    """Whether the loss carries the joint reward's gradient at the mean (hygrpo.py note 19): HyGRPO only,
    with a joint reward in the run."""
    return bool(cfg.joint_pathwise) and cfg.algo == "hygrpo" and weights.get("joint", 0) > 0


def joint_pathwise(pose, cands, R_c, in_V, G, w_joint, body_model, ctx, V_norm, pose_samples=1):
    """hygrpo.py note 19: the deterministic policy gradient of the joint reward (Eq. 7) at each Gaussian's
    mean. Returns (J_path, R_joint at the means). J_path is (1/V) sum over V of Delta_hat_i with, on the
    candidates the joint reward scores, the gradient of w_joint R_joint(mu_i(theta)) / std of its group
    (pose: the current Gaussians; the group's mean and std of Eq. 16 held). Its value is the sum of the
    advantages (~0); only its gradient acts. The second is the mean of R_joint(mu) over those answers (NaN
    without any), for the log. An answer's pose_samples consecutive rows share one mean, whose reward is
    computed once."""
    joint = rewards.REWARDS["joint"]
    rows = in_V & cands.has_gt & torch.tensor([t in joint.tasks for t in cands.task], device=in_V.device)  # (N,)
    if not rows.any():
        return pose.mu.new_zeros(()), float("nan")
    idx = rows.nonzero().flatten()  # (n,) whole answers: an answer's pose draws are all in V or all out
    first = idx[::pose_samples]  # (n / M,) the first draw of each answer
    with torch.autocast(pose.mu.device.type, enabled=False):  # SMPL's chain of rotations in float32
        J = smpl.pose_joints(pose.mu[first].float(), body_model)  # (n / M, 24, 3)
    r = rewards.joint_reward(J, cands.gt_joints[first], ctx.joint_floor)  # (n / M,)
    r_rows = r.repeat_interleave(pose_samples)  # (n,) each draw of an answer, at its mean
    R = R_c.detach().index_add(0, idx, w_joint * (r_rows - r_rows.detach()))  # (N,) R_c's values, R_joint(mu)'s grad
    J_path = hygrpo.group_advantages(R, valid=in_V, G=G, hold_stats=True)[in_V].sum() / V_norm  # ()
    return J_path, r.mean().item()


def hygrpo_step(policy, opt, params, batch, cfg, ctx, weights, body_model, tokenizer, generator, world_size):
    """Algorithm 1, lines 6-9, for one batch. Returns the metrics of the step (floats)."""
    timings = {}
    t0 = time.time()
    # line 6: G outputs {a_i, p_i} ~ pi_theta(. | q) for each q (G x pose_samples poses, note 16)
    policy.eval()  # no dropout while sampling
    rollout = M.sample_policy(policy, batch, cfg.G, cfg.max_new_tokens, cfg.temperature, cfg.top_p, generator,
                              pose_samples=cfg.pose_samples)
    G = rollout.G  # candidates per prompt: cfg.G answers x cfg.pose_samples poses each
    timings["t_sample"] = time.time() - t0

    # line 7: rewards; R_d scores the text a_i, R_c the pose p_i
    t0 = time.time()
    cands = rewards.candidates_of(rollout, batch, tokenizer, body_model, G)
    R_d, R_c, per_reward = rewards.compute_rewards(cands, ctx, weights)  # (N,), (N,), {name: (N,)}
    # line 8: group-relative advantages, Eq. 16, over each prompt's G candidates
    F_hat = hygrpo.group_advantages(R_d, G=G)  # (N,) every candidate has a text answer
    in_V = pose_scored(rollout.valid, cands.task)  # (N,) poses of pose tasks (note 13)
    Delta_hat = hygrpo.group_advantages(R_c, valid=in_V, G=G)  # (N,) 0 outside V
    beta_c = pose_kl_weights(cands.task, cfg, rollout.valid.device)  # (N,) beta, or beta_i2p (note 18)
    N_norm, V_norm = global_normalisers(len(in_V), int(in_V.sum()), world_size, rollout.valid.device)
    with torch.no_grad(), policy.reference():  # pi_ref = pi_init: frozen copies of every RFT-trained tensor
        ref = M.policy_logprobs(policy, rollout)  # (N, Tn) logprobs, (N,) pose_logprobs, (N, 144) Gaussians
    timings["t_score"] = time.time() - t0

    # line 9: maximise Eq. 6 (minimise its negative), inner_epochs times on the same samples
    t0 = time.time()
    policy.train()
    old_logp = old_pose_logp = None
    for _ in range(cfg.inner_epochs):
        cur = M.policy_logprobs(policy, rollout)  # with gradients
        logp, pose_logp = cur.logprobs, cur.pose_logprobs  # (N, Tn), (N,)
        if old_logp is None:  # the old policy is the sampler: the parameters before any update
            old_logp, old_pose_logp = logp.detach(), pose_logp.detach()
        exact_kl = hygrpo.gaussian_kl(cur.pose.mu, cur.pose.log_std, ref.pose.mu, ref.pose.log_std)  # (N,)
        loss, stats = hygrpo.hygrpo_loss(logp, old_logp, ref.logprobs, rollout.mask, F_hat, pose_logp,
                                         old_pose_logp, ref.pose_logprobs, Delta_hat, in_V,
                                         clip_eps=cfg.clip_eps, beta=cfg.beta,
                                         discrete_only=cfg.algo == "grpo",
                                         pose_kl=exact_kl if cfg.pose_kl == "exact" else None,
                                         N_norm=N_norm, V_norm=V_norm, beta_c=beta_c)
        if pathwise_on(cfg, weights):  # note 19
            J_path, stats["joint_at_mean"] = joint_pathwise(cur.pose, cands, R_c, in_V, G, weights["joint"],
                                                            body_model, ctx, V_norm, rollout.pose_samples)
            loss = loss - cfg.joint_pathwise * J_path
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params, world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        check_finite_update(loss.item(), grad_norm, cfg)
        opt.step()
    timings["t_update"] = time.time() - t0

    def valid_mean(x):  # mean over the candidates in V (poses of pose tasks); 0 when there are none
        return x.detach()[in_V].mean().item() if in_V.any() else 0.0

    metrics = {**stats, "kl_c_exact": valid_mean(exact_kl),  # beside kl_c, whichever KL the loss used
               "grad_norm": grad_norm, **timings, "R_d": R_d.mean().item(), "R_c": valid_mean(R_c),
               "F_hat_abs": F_hat.abs().mean().item(), "Delta_hat_abs": Delta_hat.abs().mean().item(),
               "log_std": valid_mean(rollout.log_std)}
    metrics["agree_semantic_checker"] = semantic_checker_agreement(cands, per_reward, G)
    means = rewards.reward_means(cands, per_reward)  # {"name/task": mean over the candidates it scored}
    for name in sorted(n for n, w in weights.items() if w > 0):  # the same keys on every rank (all_reduce)
        for task in rewards.REWARDS[name].tasks:
            metrics[f"reward/{name}/{task}"] = means.get(f"{name}/{task}", float("nan"))  # NaN: no such prompt
    return metrics


def parse_task_mix(spec):
    """"t2p:2,i2p:2,vqa:1" -> the weights of data.TASKS in order, (2.0, 2.0, 1.0); a task left out gets 0."""
    weights = dict.fromkeys(data.TASKS, 0.0)
    for item in filter(None, (x.strip() for x in spec.split(","))):
        task, _, w = item.partition(":")
        if task not in weights:
            raise SystemExit(f"--task_mix: unknown task {task!r} in {spec!r}; tasks are {', '.join(data.TASKS)}")
        try:
            weights[task] = float(w)
        except ValueError:
            raise SystemExit(f"--task_mix: {item!r} is not task:weight") from None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise SystemExit(f"--task_mix={spec!r}: weights must be >= 0, with at least one > 0")
    return tuple(weights[t] for t in data.TASKS)


def semantic_checker_agreement(cands, per_reward, G):
    """How well the semantic reward (Eq. 8) ranks each text-to-pose prompt's G candidates the way
    PoseWorld's exact checker does: Spearman's rank correlation within the group, averaged over the
    groups (eval.group_rank_correlation). NaN without the semantic reward, posecodes, or a t2p group
    whose G candidates all have a pose."""
    if "semantic" not in per_reward or cands.codes is None:
        return float("nan")
    t2p = torch.tensor([t == "t2p" for t in cands.task[::G]])  # (P,) one task per prompt
    full = t2p & cands.valid.view(-1, G).all(1).cpu()  # (P,)
    rows = full.repeat_interleave(G)  # (N,)
    if not rows.any():
        return float("nan")
    check = data.check_posecodes(cands.joints[rows].detach().cpu(), cands.codes[rows].cpu(),
                                 cands.mentioned[rows].cpu())  # (n,)
    rho, _ = E.group_rank_correlation(per_reward["semantic"][rows].cpu(), check, G)
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
        if run_finished(extra) or cfg.allow_unfinished_sft:
            return
        saved = extra.get("config") or {}
        if cfg.preset != "tiny":
            raise SystemExit(f"the SFT run in {cfg.sft_dir} stopped at step {extra.get('step')} of "
                             f"{saved.get('max_steps')}: finish it with `train_sft.py --out_dir={cfg.sft_dir} "
                             f"--resume=true` and the options it was started with, or pass "
                             f"--allow_unfinished_sft=true to start RFT from it anyway")
        print0(f"the SFT run in {cfg.sft_dir} stopped at step {extra.get('step')} of {saved.get('max_steps')}: "
               f"resuming it first (train_sft.py --resume=true)")
        fields = {f.name for f in dataclasses.fields(train_sft.SFTConfig)}
        sft_cfg = train_sft.SFTConfig(**{k: v for k, v in saved.items() if k in fields})
        sft_cfg.resume, sft_cfg.stop_after, sft_cfg.out_dir = True, 0, cfg.sft_dir
        train_sft.main(cfg=sft_cfg)
        return
    if cfg.preset != "tiny":
        raise SystemExit(f"no SFT checkpoint in {cfg.sft_dir}: run train_sft.py --preset={cfg.preset} first")
    print0(f"no SFT checkpoint in {cfg.sft_dir}: training the tiny one first (train_sft.py)")
    sft_cfg = train_sft.SFTConfig(out_dir=cfg.sft_dir, seed=cfg.seed, device=cfg.device,
                                  poseworld_size=cfg.poseworld_size, image_size=cfg.image_size,
                                  num_threads=cfg.num_threads)
    for item in filter(None, cfg.sft_overrides.split(";")):  # e.g. "max_steps=100;lr=1e-3"
        apply_overrides(sft_cfg, ["--" + item.strip()])
    train_sft.main(cfg=sft_cfg)


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
    cfg = check_config(apply_overrides(RFTConfig(), sys.argv[1:] if argv is None else argv))
    if cfg.algo not in ("hygrpo", "grpo"):
        raise SystemExit(f"--algo must be hygrpo or grpo, got {cfg.algo!r}")
    if cfg.reward_retriever not in ("reward", "eval"):
        raise SystemExit(f"--reward_retriever must be reward or eval, got {cfg.reward_retriever!r}")
    if cfg.pose_kl not in ("k3", "exact"):
        raise SystemExit(f"--pose_kl must be k3 or exact, got {cfg.pose_kl!r}")
    weights = rewards.parse_weights(cfg.rewards)
    rank, world_size, device = setup_distributed(cfg.device)
    if cfg.beta_i2p != cfg.beta and cfg.algo == "hygrpo":
        print0(f"the pose KL weighs {cfg.beta_i2p} on image-to-pose prompts and {cfg.beta} elsewhere (--beta_i2p, "
               f"not in the paper: hygrpo.py note 18); --beta_i2p={cfg.beta} gives Eq. 6's one beta")
    if pathwise_on(cfg, weights):
        print0(f"the joint reward's gradient at the mean pose is added with weight {cfg.joint_pathwise} "
               f"(--joint_pathwise, not in the paper: hygrpo.py note 19); --joint_pathwise=0 is Eq. 6 alone")
    master = rank == 0
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.time()
    if master:
        ensure_sft(cfg)
    if world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's SFT
    torch.manual_seed(cfg.seed)  # identical fresh LoRA on every rank
    os.makedirs(cfg.out_dir, exist_ok=True)
    recover_run(cfg.out_dir)
    if world_size > 1:
        dist.barrier()  # the checkpoint is whole before any rank reads it
    print0(f"train_rft.py on {world_size} x {device}\n" + json.dumps(dataclasses.asdict(cfg), indent=1))

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
                                   mix=parse_task_mix(cfg.task_mix))
    loader = iter(data.make_loader(train_set, cfg.batch_size, rank, world_size, seed=cfg.seed + 1,
                                   start_step=step, collate_fn=data.collate_fn(tokenizer, policy, True)))
    evaluator = None
    if master and cfg.eval and cfg.data == "poseworld":
        evaluator = make_evaluator(cfg, tokenizer, body_model, ctx, sft_set, device)
    elif master and cfg.eval:
        print0("--eval: the before/after table is PoseWorld's; evaluate real data with eval.py --ckpt=... "
               "(3DPW, Human3.6M)")
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
        batch = data.to_device(next(loader), device)
        with autocast:
            metrics = hygrpo_step(policy, opt, params, batch, cfg, ctx, weights, body_model, tokenizer,
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
                save(cfg, policy, tokenizer, opt, generator, step, rng)
    bar.close()
    if world_size > 1:
        dist.barrier()
    if step < cfg.max_steps:
        print0(f"stopped after step {step} of {cfg.max_steps} (--stop_after); continue with --resume=true")
    elif evaluator is not None:
        before = json.load(open(os.path.join(cfg.out_dir, "eval_before.json")))
        after = evaluator(policy, "after RFT")
        table = E.format_comparison(before, after, title=f"PoseWorld test, {cfg.algo}, {step} steps, "
                                                         f"rewards {cfg.rewards}")
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


def save(cfg, policy, tokenizer, opt, generator, step, rng=None):
    """out_dir/checkpoint: the policy (with its pi_ref copy) and the optimiser, every rank's RNG states and
    the step, swapped in atomically as one folder: a killed run loses at most the steps since the last save."""
    rng = rng or rng_states(1, generator)
    M.save_checkpoint(policy, tokenizer, os.path.join(cfg.out_dir, M.CHECKPOINT_DIR),
                      extra={"stage": "rft", "step": step, "finished": step >= cfg.max_steps,
                             "config": dataclasses.asdict(cfg)},
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


class Gallery:
    """Fig. 5 for this run: the mean pose for a few fixed text prompts at successive RFT steps, one row per
    prompt (its caption, shortened, above the row), the ground truth first ("GT"), then one column per step."""

    def __init__(self, cfg, train_set, tokenizer, body_model, device, n=4):
        val = data.PoseWorld("val", seed=cfg.seed, image_size=cfg.image_size)
        idx = val.task_indices("t2p")[:n]
        self.samples = [val[int(i)] for i in idx]
        self.path = os.path.join(cfg.out_dir, "gallery.png")
        self.tokenizer, self.body_model, self.device = tokenizer, body_model, device
        self.columns, self.steps = [], []  # one (n, 24, 3) per gallery step, and the step

    @torch.no_grad()
    def add(self, policy, step):
        policy.eval()
        batch = data.to_device(data.collate_fn(self.tokenizer, policy, True)(self.samples), self.device)
        rollout = M.sample_policy(policy, batch, 1, 24, temperature=0.0)  # greedy text, mean pose
        self.columns.append(smpl.pose_joints(rollout.mu, self.body_model).cpu())  # (n, 24, 3)
        self.steps.append(step)
        gt = torch.stack([s["joints"] for s in self.samples])  # (n, 24, 3)
        grid = torch.stack([gt] + self.columns, dim=1).flatten(0, 1)  # (n * (1 + steps), 24, 3)
        heads = ["GT"] + [f"step {k}" for k in self.steps]  # every cell names its column: no looking up
        data.render_poses(grid, self.path, views=("front", "side"), cols=1 + len(self.columns),
                          titles=heads * len(self.samples), row_labels=[s["caption"] for s in self.samples])


def write_reward_curves(metrics_path, svg_path):
    """Fig. 4 for this run: a panel per reward and task, each step and its running mean
    (eval.reward_curves_svg), written atomically so a reader never sees half a figure."""
    title = f"reward per RFT step, {os.path.dirname(metrics_path) or '.'}"
    E.write_svg(E.reward_curves_svg(E.read_metrics(metrics_path), title=title), svg_path)


if __name__ == "__main__":
    main()
