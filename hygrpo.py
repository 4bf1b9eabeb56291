"""HyGRPO as pure functions: group-relative advantages (Eq. 16), the Gaussian pose policy's
log-densities and KL, and the HyGRPO objective (Sec. 3.2, Eq. 3-6; Appendix B, Eq. 12-21). The policy
factorises as pi_d(a|q) pi_c(p|q,a) (Eq. 1 = 12), the ratio as r_d r_c (Eq. 4 = 14) and the advantage as
F_hat + Delta_hat (Eq. 5 = 15); since E_p[r_c] = 1 (Eq. 17-18) the surrogate splits into J_d + J_c
(Eq. 19), each clipped on its own (Eq. 21). No loop lives here: train_rft.py samples, scores and calls
`group_advantages` and `hygrpo_loss`, which returns a loss to MINIMISE, the negative of Eq. 6.

Loss-level choices. Everything else a preset sets (pose samples per answer, the KL weights' values, the
schedule, what trains, the task mix, ...) is a row of the departures table (model.DEPARTURES; README).
1. Ratio to the old policy, KL to the reference: Eq. 4 and 6 write both against pi_ref; as in PPO and
   GRPO the ratio is to the sampler (`old_logp`), the KL to the frozen SFT model (`ref_logp`).
2. Token-level discrete ratio (GRPO): r_d is clipped per token, averaged over each answer's tokens, then
   over the N candidates; Eq. 4's sequence-level product vanishes or explodes on long answers.
3. The continuous term uses r_c alone (Eq. 20 holds r_d constant): the answer tokens see only F_hat,
   the pose density only Delta_hat.
4. V (Eq. 6) holds the candidates with a pose on a task that a registered continuous reward scores
   (train_rft.pose_scored): a stray <POSE> in a VQA answer gets no J_c and no pose KL.
5. Normalisation: the discrete sums divide by N and the continuous ones by V, pooled over the batch, not
   per prompt (Eq. 6 when every prompt has the same V). Under accumulation and data parallelism both
   are global counts (N_norm, V_norm), so no rank or micro-batch weighs its few poses more. V = 0: 0.
6. KL: Eq. 6's one D_KL, split by the chain rule into a token part (k3 per token, averaged like J_d, so
   not the exact sequence KL) and a pose part over V: k3 at the sampled pose (GRPO's; hygrpo_loss's
   default and the 7B preset's) or, through `pose_kl=`, the closed-form gaussian_kl (tiny: --pose_kl=exact).
7. Pose KL weights: `beta_c=` gives each candidate's pose KL its own weight in place of beta
   (train_rft.py --beta_i2p on image-to-pose prompts); beta_c = beta everywhere is Eq. 6.
8. Diagonal covariance: pi_c is N(mu, diag(sigma^2)) over D = 144 rot6d numbers, not Eq. 2's full
   Sigma: O(D) densities and KLs, as in continuous PPO; joints correlate only through mu.
9. Advantages (Eq. 16): (r - mean) / (std + 1e-6), sample std (Bessel), over a group's valid members;
   fewer than two distinct valid rewards give exact zeros. A group is a prompt's group_size candidates (G
   answers x pose_samples; = G with one pose an answer, as in Eq. 16), so F_hat's std runs over an
   answer's copies (F_hat sqrt((8/7) / (256/255)) = 1.067x larger at 8 x 32 than 8 x 1).
10. An extra gradient term, not in Eq. 6: train_rft.py adds the gradient of each reward registered as
   differentiable (the joint reward) at the Gaussian's mean, divided by its group's std
   (group_advantages(..., hold_stats=True)) and weighted by --gradient_at_mean: a deterministic policy
   gradient with the reward as its own critic. 0 is Eq. 6.
11. All policies are scored at the text's sampling temperature (as TRL and verl do), not with top-p.
   With one update per batch every ratio is 1 in value and the clip never acts: only gradients matter.
12. Log-ratios are clamped at +-20 before exp() (k3's from above only), so one wild sample freezes its
   term instead of turning the loss into inf or NaN.
13. One clip epsilon for both terms; the paper gives neither epsilon nor beta. hygrpo_loss's defaults
   are GRPO's (0.2, 0.04); a run's values are in train_rft.py's RFTConfig and RECIPES.
14. `discrete_only=True` is plain GRPO, Fig. 4's baseline: no J_c and no pose KL.
"""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)
# Log-ratios are clamped to +-20 before exp(): e^20 is far outside any clip range, and float32's exp
# overflows near 88, where 0 * inf in the backward pass would turn the whole gradient into NaN.
MAX_LOG_RATIO = 20.0


# ----------------------------------------------------------------------------------------------------
# Group-relative advantages (Eq. 16)


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None, group_size: int | None = None,
                     eps: float = 1e-6, hold_stats: bool = False) -> torch.Tensor:
    """Eq. 16: normalise each reward within its group, a prompt's group_size candidates (note 9),
    (r - mean) / (std + eps).

    Layout: `rewards` is either (P, group_size), one row per prompt, or flat (N,) with N = P * group_size,
    a prompt's candidates consecutive, in which case group_size must be given. The result has the shape
    of `rewards`. `valid` (same shape, bool; None = all valid) selects the members that enter the mean
    and the sample std; invalid members get 0 and may hold any value, NaN included. A group with
    fewer than two distinct valid rewards gives zeros (there is nothing to prefer).

    hold_stats=True (note 10): the group's mean and std are taken as constants, so rewards that carry
    a gradient give advantages whose gradient is d rewards / (std + eps) for the valid members of groups
    whose rewards differ (0 elsewhere); the values are the same.
    """
    if rewards.dim() == 1:
        if group_size is None:
            raise ValueError("flat rewards (N,) need group_size, the number of candidates per prompt; "
                             "or pass them as (num_prompts, group_size)")
        if group_size < 1 or rewards.shape[0] % group_size != 0:
            raise ValueError(f"flat rewards of length {rewards.shape[0]} cannot be split into groups of "
                             f"group_size={group_size}")
        r = rewards.view(-1, group_size)  # (P, group_size)
    elif rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"rewards {tuple(rewards.shape)} are (num_prompts, group_size) but "
                             f"group_size={group_size} was given")
        r = rewards  # (P, group_size)
    else:
        raise ValueError(f"rewards must be (num_prompts, group_size) or flat (N,), got {tuple(rewards.shape)}")
    if valid is None:
        v = torch.ones_like(r, dtype=torch.bool)  # (P, group_size)
    else:
        if valid.shape != rewards.shape:
            raise ValueError(f"valid {tuple(valid.shape)} must have the shape of rewards {tuple(rewards.shape)}")
        v = valid.reshape(r.shape).bool()  # (P, group_size)
    if not torch.isfinite(r[v]).all():
        raise ValueError("a valid candidate has a NaN or infinite reward; rewards must be finite "
                         "(mark candidates without a score invalid instead)")

    # float64 throughout: in float32, rewards near 1e6 that differ by 0.06 lose their differences to
    # round-off, and rewards of 1e20 square to inf in the variance and give all-zero advantages
    out_dtype = r.dtype
    r = r.double()  # (P, group_size)
    r0 = torch.where(v, r, torch.zeros_like(r))  # (P, group_size) invalid slots may hold NaN: zero them first
    rs = r0.detach() if hold_stats else r0  # (P, group_size) what the mean and std are taken of
    n = v.sum(-1, keepdim=True)  # (P, 1) valid members per group
    mean = rs.sum(-1, keepdim=True) / n.clamp(min=1)  # (P, 1)
    dev = torch.where(v, rs - mean, torch.zeros_like(r))  # (P, group_size)
    var = (dev * dev).sum(-1, keepdim=True) / (n - 1).clamp(min=1)  # (P, 1) sample variance
    std = var.sqrt()  # (P, 1)
    if hold_stats:
        dev = torch.where(v, r0 - mean, torch.zeros_like(r))  # (P, group_size) the same values, r0's gradient
    # "all valid rewards equal" tested exactly, so round-off in mean/std never becomes (1e-17 / eps)
    hi = torch.where(v, rs, torch.full_like(r, -math.inf)).amax(-1, keepdim=True)  # (P, 1)
    lo = torch.where(v, rs, torch.full_like(r, math.inf)).amin(-1, keepdim=True)  # (P, 1)
    spread = hi > lo  # (P, 1) false for 0 or 1 valid members, or all equal
    adv = torch.where(v & spread, dev / (std + eps), torch.zeros_like(r))  # (P, group_size)
    return adv.to(out_dtype).reshape(rewards.shape)


# ----------------------------------------------------------------------------------------------------
# The Gaussian pose policy (Eq. 2, with a diagonal covariance; see note 8 of the module docstring)


def _f32(*xs):
    """bf16 / fp16 tensors upcast to float32 (float32 and float64 kept): a sum of 144 log-density terms
    in bf16 is off by whole nats, so the densities and KLs below are never computed in half precision."""
    return [x.float() if x.dtype in (torch.bfloat16, torch.float16) else x for x in xs]


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, diag(exp(2 log_std))), summed over the last dim, at least in float32. (..., D) -> (...)"""
    x, mu, log_std = _f32(x, mu, log_std)
    z = (x - mu) * torch.exp(-log_std)  # (..., D)
    return (-0.5 * z * z - log_std - 0.5 * LOG_2PI).sum(-1)  # (...,)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian, sum_d (log_std_d + 0.5 log(2 pi e)). (..., D) -> (...)"""
    (log_std,) = _f32(log_std)
    return (log_std + 0.5 * (LOG_2PI + 1.0)).sum(-1)  # (...,)


def gaussian_kl(mu_p: torch.Tensor, log_std_p: torch.Tensor,
                mu_q: torch.Tensor, log_std_q: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(p || q) between diagonal Gaussians, summed over the last dim. (..., D) -> (...)

    The loss's pose KL with --pose_kl=exact (the tiny preset's; note 6), and logged as kl_c_exact beside
    the sampled k3 otherwise. At least float32, like the log-densities.
    """
    mu_p, log_std_p, mu_q, log_std_q = _f32(mu_p, log_std_p, mu_q, log_std_q)
    var_ratio = torch.exp(2 * (log_std_p - log_std_q))  # (..., D) sigma_p^2 / sigma_q^2
    z = (mu_p - mu_q) * torch.exp(-log_std_q)  # (..., D)
    return (0.5 * (var_ratio + z * z - 1) - (log_std_p - log_std_q)).sum(-1)  # (...,)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: float = MAX_LOG_RATIO) -> torch.Tensor:
    """The k3 estimator of KL(pi_theta || pi_ref) at a sample: exp(ref - logp) - (ref - logp) - 1.

    Elementwise; unbiased when the sample comes from pi_theta, and never negative. The log-ratio
    ref - logp is clamped from ABOVE only, at max_log_ratio (note 12): only d > 0 can overflow exp(),
    so one wild sample cannot make an inf or NaN loss. Below, k3 = e^d - d - 1 is about -d - 1 and
    stays exact, with gradient dk3/dlogp = 1 - e^d -> 1: the further the policy's log-density at its
    own sample rises above the reference's, the harder the KL pulls back. (A lower clamp at -20 would
    freeze the KL at e^-20 + 19, gradient 0, once d < -20: a small mean shift summed over 144 dimensions.)
    """
    d = (ref_logp - logp).clamp(max=max_log_ratio)  # (...)
    return torch.exp(d) - d - 1  # (...)


# ----------------------------------------------------------------------------------------------------
# The HyGRPO objective (Eq. 6 / Eq. 21)


def _clipped_surrogate(ratio, adv, clip_eps):
    """PPO's min(r A, clip(r, 1-eps, 1+eps) A) and where the clip is the active branch."""
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (...)
    clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))  # (...)
    return surr, clipped


def hygrpo_loss(logp, old_logp, ref_logp, mask, adv_d,
                pose_logp, old_pose_logp, ref_pose_logp, adv_c, valid,
                clip_eps: float = 0.2, beta: float = 0.04, discrete_only: bool = False, pose_kl=None,
                N_norm: float | None = None, V_norm: float | None = None, beta_c=None):
    """The negative of the HyGRPO objective, Eq. 6, with the choices of the module docstring.

    logp, old_logp, ref_logp: (N, T) per-token log-probs of the N sampled answers under the current,
        old (sampling) and reference policies; only `logp` carries gradient.
    mask: (N, T) bool (or 0/1), the answer tokens o_i; other positions may hold any value.
    adv_d: (N,) discrete advantages F_hat.
    pose_logp, old_pose_logp, ref_pose_logp: (N,) log-densities of the sampled poses.
    adv_c: (N,) continuous advantages Delta_hat.
    valid: (N,) bool, the candidates with a pose (the set V). The pose tensors and adv_c of invalid
        candidates may hold anything, NaN or inf included: they are replaced (torch.where, never a
        multiplication by 0) before any arithmetic, so neither the loss nor its gradient sees them.
        This protects the loss and the gradient on `pose_logp` itself. It cannot protect the graph
        upstream: if the caller computed an invalid slot's log-density from a NaN pose, autograd
        multiplies the zero gradient by NaN there. Compute log-densities of invalid candidates at a
        harmless point (e.g. the detached mean) or leave them out of the graph.
    discrete_only: plain GRPO (Fig. 4's baseline), the continuous surrogate and its KL dropped.
    pose_kl: optional (N,) per-candidate KL(pi_theta(p|q,a) || pi_ref(p|q,a)) to use for the pose part of
        the KL in place of the k3 estimate at the sampled pose (note 6): e.g. gaussian_kl of the two
        heads' Gaussians, exact and never clamped. It must carry the gradient; invalid slots are ignored.
    beta_c: optional (N,) weight of each candidate's pose KL in place of beta (note 7); the text KL keeps
        beta. None = beta for every candidate, Eq. 6. stats["kl_c"] stays the unweighted mean.
    N_norm, V_norm: the divisors of the discrete and continuous sums (and of their KLs); default N and this
        batch's V. Under data parallelism, where gradients are averaged over ranks, pass the GLOBAL counts
        divided by the world size (train_rft.global_normalisers all-reduces them), so that the averaged
        gradient is that of one batch holding every rank's candidates (note 5). V_norm = 0 (no valid pose
        anywhere) gives a zero continuous term.

    Returns (loss, stats); stats holds python floats: the loss and its parts, the KL of each part,
    the clip fractions, the mean ratios and V/N.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (N, T) per-token log-probs, got {tuple(logp.shape)}")
    N, T = logp.shape
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if x.shape != (N, T):
            raise ValueError(f"{name} must be (N, T) = {(N, T)} like logp, got {tuple(x.shape)}")
    for name, x in (("adv_d", adv_d), ("pose_logp", pose_logp), ("old_pose_logp", old_pose_logp),
                    ("ref_pose_logp", ref_pose_logp), ("adv_c", adv_c), ("valid", valid)):
        if x.shape != (N,):
            raise ValueError(f"{name} must be (N,) = ({N},), one value per candidate, got {tuple(x.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")

    # ---- discrete term: per-token clipped ratios to the old policy, mean over tokens, then over N
    m = mask != 0  # (N, T)
    zeros = torch.zeros_like(logp)  # (N, T)
    logp_m = torch.where(m, logp, zeros)  # (N, T) padding may be -inf; keep it out of exp()
    old_m = torch.where(m, old_logp, zeros)  # (N, T)
    ref_m = torch.where(m, ref_logp, zeros)  # (N, T)
    n_tok = m.sum(-1).clamp(min=1).to(logp.dtype)  # (N,) |o_i|
    r_d = torch.exp((logp_m - old_m.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (N, T)
    surr_d, clip_d = _clipped_surrogate(r_d, adv_d.detach()[:, None], clip_eps)  # (N, T), (N, T)
    N_div = N if N_norm is None else N_norm
    N_div = N_div if N_div > 0 else 1
    J_d = (torch.where(m, surr_d, zeros).sum(-1) / n_tok).sum() / N_div  # () the mean over N by default
    kl_d = (torch.where(m, kl_k3(logp_m, ref_m.detach()), zeros).sum(-1) / n_tok).sum() / N_div  # ()

    # ---- continuous term: clipped r_c over the V valid candidates (Eq. 20: r_d held constant)
    zc = torch.zeros_like(pose_logp)  # (N,)
    pl = torch.where(valid, pose_logp, zc)  # (N,) NaN in invalid slots gets zero gradient, not NaN
    old_pl = torch.where(valid, old_pose_logp, zc).detach()  # (N,)
    ref_pl = torch.where(valid, ref_pose_logp, zc).detach()  # (N,)
    A_c = torch.where(valid, adv_c, zc).detach()  # (N,)
    V = int(valid.sum())
    V_div = V if V_norm is None else V_norm  # note 5: the batch's V, or the global V / world size
    V_div = V_div if V_div > 0 else 1  # V = 0: the sums are 0, so is the term
    r_c = torch.exp((pl - old_pl).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (N,)
    surr_c, clip_c = _clipped_surrogate(r_c, A_c, clip_eps)  # (N,), (N,)
    J_c = torch.where(valid, surr_c, zc).sum() / V_div  # () zero when V = 0
    if pose_kl is not None and pose_kl.shape != (N,):
        raise ValueError(f"pose_kl must be (N,) = ({N},), one value per candidate, got {tuple(pose_kl.shape)}")
    # k3 at the sampled poses, or the given (exact) KL, note 6
    kl_per_c = torch.where(valid, kl_k3(pl, ref_pl) if pose_kl is None else pose_kl, zc)  # (N,)
    kl_c = kl_per_c.sum() / V_div  # ()
    if beta_c is None:
        beta_kl_c = beta * kl_c  # () Eq. 6: one beta
    else:  # note 7: each candidate's pose KL weighed by its own beta_c
        if beta_c.shape != (N,) or not torch.isfinite(beta_c).all() or (beta_c < 0).any():
            raise ValueError(f"beta_c must be (N,) = ({N},) finite weights >= 0, got {tuple(beta_c.shape)}")
        beta_kl_c = (beta_c.to(kl_per_c.dtype) * kl_per_c).sum() / V_div  # ()

    if discrete_only:
        loss = -(J_d - beta * kl_d)
    else:
        loss = -(J_d + J_c - beta * kl_d - beta_kl_c)

    with torch.no_grad():
        n_all = max(int(m.sum()), 1)
        stats = {
            "loss": float(loss),
            "loss_d": float(-J_d),
            "loss_c": float(-J_c),
            "kl_d": float(kl_d),
            "kl_c": float(kl_c),
            "clip_frac_d": float((clip_d & m).sum()) / n_all,
            "clip_frac_c": float((clip_c & valid).sum()) / V_div,  # averaged over ranks: the global fraction
            "ratio_d": float(torch.where(m, r_d, zeros).sum()) / n_all,
            "ratio_c": float(torch.where(valid, r_c, zc).sum()) / V_div,
            "V_over_N": V / max(N, 1),
        }
    return loss, stats
