"""HyGRPO as pure functions: group-relative advantages (Eq. 16), the Gaussian pose policy's
log-densities and KL, and the HyGRPO objective (Sec. 3.2, Eq. 3-6; derived in Appendix B, Eq. 12-21:
the policy factorises as pi_d(a|q) pi_c(p|q,a) (Eq. 12 = Eq. 1), the ratio splits into r_d r_c (Eq. 4 =
Eq. 14), and the advantage into F_hat + Delta_hat (Eq. 5 = Eq. 15); since E_p[r_c] = 1 (Eq. 17-18) the
surrogate of Eq. 3 / Eq. 13 separates into J_d + J_c (Eq. 19), each clipped on its own (Eq. 21).

No training loop lives here; train_rft.py samples the candidates, scores them, and calls
`group_advantages` and `hygrpo_loss`.

Where this code departs from the paper, or chooses where the paper leaves a choice:

1. Two different "reference" policies. Eq. 4 and Eq. 14 write the importance ratio as
   pi_theta / pi_ref, and Eq. 6 the KL as D_KL(pi_theta || pi_ref). Here, as in PPO and GRPO, the
   ratio is to the OLD policy (the one that sampled the candidates, `old_logp`) and the KL is to the
   REFERENCE policy (the frozen starting model, `ref_logp`). With one update per sampling step the
   old policy equals the current one, the ratio is 1 in value, and only its gradient matters.
2. The discrete ratio is per token, r_d = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t), clipped
   per token, averaged over the |o_i| answer tokens of each answer and then over the N answers of the
   batch (as in GRPO / DeepSeekMath). Eq. 4's sequence-level ratio pi_theta(a|q) / pi_old(a|q) is a
   product over tokens that vanishes or explodes for long answers. Averaging over all N = prompts x G
   answers equals the mean over prompts of Eq. 6's (1/G) sum, since every prompt has G candidates.
   An answer with no token under the mask adds 0 but still counts in N.
3. The continuous term's 1/V pools the valid candidates of the whole batch: V is the number of valid
   candidates over all prompts, not per prompt. This equals Eq. 6 when every prompt has the same V;
   otherwise prompts with more valid poses weigh more. V = 0 gives a zero term, not NaN. Under data
   parallelism "the whole batch" is every rank's: the loss divides by the global N and V (all-reduced,
   over the world size: N_norm / V_norm), so a rank that drew few valid poses does not weigh them more.
4. The continuous term uses only r_c = pi_theta(p|q,a) / pi_old(p|q,a): Eq. 20 treats r_d as a
   constant for the continuous branch, so J_c of Eq. 19 loses its r_d factor. Each head gets its own
   advantage (Eq. 5 / 15, and Eq. 17-18, where F_hat leaves the inner expectation because E_p[r_c] = 1):
   the answer tokens see only F_hat, the pose density only Delta_hat (the shared backbone receives both
   gradients).
5. KL: the k3 estimator (Schulman's "Approximating KL divergence", as in GRPO),
   k3 = exp(ref - logp) - (ref - logp) - 1, per token and per pose sample. The samples come from the
   old policy, not pi_theta, so the estimate is slightly off-policy, as in GRPO. Eq. 6 writes
   -beta D_KL once, outside both sums; Eq. 21 puts it inside the 1/V sum. We follow Eq. 6 and split
   the KL of the joint policy by the chain rule, KL(pi(a, p)) = KL(pi(a)) + E_a[KL(pi(p|a))]:
   the discrete KL is averaged exactly like the discrete term (per token, mean over each answer's
   tokens, then over N), the continuous KL over the V valid candidates, and the loss carries
   -beta (KL_d + KL_c). Because the discrete part is a per-token mean rather than a sum over the
   answer's tokens, this is not the exact joint KL: the discrete part is down-weighted by |o_i|.
6. The pose policy is a diagonal Gaussian (one log-std per dimension) rather than Eq. 2's full
   covariance Sigma_theta: its log-density and KL cost O(D) instead of a D x D Cholesky per sample
   (D = 144 rot6d numbers), and it is what continuous PPO policies use. Correlations between joints
   are then carried only by the mean.
7. Advantages (Eq. 16): (r - mean) / (std + eps) with the SAMPLE std (Bessel's correction,
   unbiased=True), torch.std's default, which TRL's GRPO trainer and the scripts derived from it
   use, and eps = 1e-6. Only valid members enter the mean and std; invalid members get 0. A group with
   fewer than two distinct valid rewards (all equal, a single valid member, none) gives exact zeros,
   not round-off divided by eps. The training loop passes valid=None for F_hat (every answer has a
   text reward) and the valid-pose mask for Delta_hat (a candidate without a pose has no R_c).
8. One clip epsilon for both terms (Eq. 6 uses one), default 0.2 (PPO's), and beta = 0.04 by default
   (DeepSeekMath's GRPO setting); the paper gives neither value.
9. `discrete_only=True` is the plain-GRPO baseline of Fig. 4: the continuous surrogate and its KL are
   left out of the loss, so the pose head gets no policy gradient (its stats are still reported).
10. Log-ratios to the old policy (in r_d and r_c) are clamped to +-20 before exp(), as verl does for
   its ratios. Inside that range nothing changes; outside it the term is frozen (zero gradient)
   instead of overflowing float32 into inf and then NaN. A sample whose ratio passes e^20 = 5e8 is
   far outside the clip range; with a negative advantage the unclipped PPO term would still push on
   it, and here it does not. In k3 the log-ratio d = ref - logp is clamped from above only: only
   d > 0 can overflow exp(), and for d < 0 k3 = e^d - d - 1 is finite and nearly linear. (An earlier
   version clamped both sides; the lower clamp froze the pose KL at 19 with zero gradient once the
   policy's log-density at its own sample exceeded the reference's by 20 nats, which a 144-d
   Gaussian with std 0.07 reaches after a mean shift of a few degrees.)
11. The functions return a loss to MINIMISE: the negative of Eq. 6.
12. An option beyond the paper: `pose_kl=` replaces the pose part of the KL by a value the caller
   computes, meant for the closed-form KL between the current and reference Gaussians (gaussian_kl;
   train_rft.py --pose_kl=exact). k3 at one sample of a 144-d Gaussian is a noisy estimate; the
   closed form has no sampling noise. k3 stays the default, as GRPO has it.
13. V for tasks without a continuous reward. Eq. 6 calls V "the candidates that include a valid pose
   output" and App. B "the candidates with valid continuous outputs": the pose is the continuous action
   of the pose tasks. A VQA answer that happens to emit <POSE> has no reward for its pose (its Delta_hat
   is 0), so counting it would only dilute J_c and pull its meaningless pose toward pi_ref through the KL.
   V therefore holds the candidates with a pose on a task that some registered continuous reward scores
   (train_rft.pose_scored; whatever the reward's weight, so a zero-weight ablation of Table 5 keeps V);
   such a stray pose gets no policy gradient and no pose KL (its text still gets F_hat and the token KL).
14. The learning-rate schedules (model.lr_at, both stages) start with a linear warm-up
   (warmup_steps) and decay by cosine to a floor of lr * min_lr_ratio rather than to 0. Table 4 says
   only "cosine"; neither the warm-up nor the floor is in the paper.
15. The old policy of the ratios is scored at the text's sampling temperature, and so are the current
   and reference policies (model.token_logprobs): the sampler is softmax(logits / T), as TRL and verl
   score GRPO. The top-p truncation is not scored. With inner_epochs = 1 (the default) every ratio is
   exactly 1 in value and clipping never acts (note 1): clip_eps matters only from a second inner epoch.
16. An option beyond the paper, for the small-sample regime of the tiny preset: train_rft.py
   --pose_samples=M draws M poses p_i1..p_iM from each answer's Gaussian (model.sample_policy), so a
   prompt has G x M candidates (a_i, p_ij) and Delta_hat (Eq. 16) compares the prompt's G x M poses.
   The estimate of the continuous gradient stays unbiased (the pose is drawn from pi_c(p | q, a_i) as
   before) and its variance falls about M-fold; the text is generated and scored once per answer, so
   the cost of a step hardly grows. Each copy of an answer gets the same F_hat, so the discrete term
   and its KL are unchanged (each answer counted M times in N). M = 1 is the paper's estimator.
17. Outside this file, the tiny preset departs from the paper's training in two more places, each said
   where it is set: its pose ViT f_b is pretrained on PoseWorld images before SFT
   (train_sft.pretrain_pose_encoder, a stand-in for the pretrained HMR2.0), and its RFT trains the whole
   tiny LLM, not LoRA alone (model.PoseLLaVA.trained_names). The 7B preset does neither.
18. An option beyond the paper: `beta_c=` gives each candidate's pose KL its own weight in place of
   Eq. 6's one beta (the text KL keeps beta). train_rft.py --beta_i2p weighs the image-to-pose prompts'
   pose KL so. In the tiny preset the joint reward's gradient estimate from a prompt's 64 or 256 poses is
   mostly noise, while the text-to-pose updates of the shared LLM and pose head move the image-to-pose
   answers; a heavier closed-form KL on those prompts pulls their Gaussians back to pi_ref's (README,
   "Holding image-to-pose"). With beta_c = beta everywhere this is Eq. 6.
19. An option beyond the paper: the deterministic policy gradient of the joint reward. Eq. 7's R_joint
   is a differentiable function of the pose, so beside J_c's likelihood-ratio estimate the loss can
   carry its gradient at the Gaussian's mean, (dR/dp)(mu) dmu/dtheta: the deterministic policy gradient
   (Silver et al., ICML 2014) with the reward itself in place of a learned critic. Each candidate's term
   is divided by its group's std like Delta_hat (group_advantages(..., hold_stats=True), the group's mean
   and std of Eq. 16 held constant). train_rft.py --joint_pathwise=lambda adds lambda (1/V) sum_i of it over
   the candidates the joint reward scores; 0 is the paper. It enters through the means (the shared
   layers beneath them also move the log-stds). It acts where the answer is judged: the evaluation
   reads the mean. The std it divides by is that of the SAMPLED poses' rewards, so the term weighs
   more as sigma shrinks, and depends on M (note 16). The reparameterised gradient at the sampled poses,
   mu + sigma e, would be the unbiased pathwise estimate of the expected reward's gradient (the one J_c's
   likelihood ratio estimates), but in the tiny preset it raised the samples' reward by shrinking sigma
   and by moving the means to where the noise costs less, and the means' error rose (README,
   "Improving image-to-pose").
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


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None, G: int | None = None,
                     eps: float = 1e-6, hold_stats: bool = False) -> torch.Tensor:
    """Eq. 16: normalise each reward within its group of G candidates, (r - mean) / (std + eps).

    Layout: `rewards` is either (P, G), one row per prompt, or flat (N,) with N = P * G, the G
    candidates of a prompt consecutive, in which case G must be given. The result has the shape of
    `rewards`. `valid` (same shape, bool; None = all valid) selects the members that enter the mean
    and the sample std; invalid members get 0 and may hold any value, NaN included. A group with
    fewer than two distinct valid rewards gives zeros (there is nothing to prefer).

    hold_stats=True (note 19): the group's mean and std are taken as constants, so rewards that carry
    a gradient give advantages whose gradient is d rewards / (std + eps) for the valid members of groups
    whose rewards differ (0 elsewhere); the values are the same.
    """
    if rewards.dim() == 1:
        if G is None:
            raise ValueError("flat rewards (N,) need G, the number of candidates per prompt; "
                             "or pass them as (num_prompts, G)")
        if G < 1 or rewards.shape[0] % G != 0:
            raise ValueError(f"flat rewards of length {rewards.shape[0]} cannot be split into groups of G={G}")
        r = rewards.view(-1, G)  # (P, G)
    elif rewards.dim() == 2:
        if G is not None and G != rewards.shape[1]:
            raise ValueError(f"rewards {tuple(rewards.shape)} are (num_prompts, G) but G={G} was given")
        r = rewards  # (P, G)
    else:
        raise ValueError(f"rewards must be (num_prompts, G) or flat (N,), got {tuple(rewards.shape)}")
    if valid is None:
        v = torch.ones_like(r, dtype=torch.bool)  # (P, G)
    else:
        if valid.shape != rewards.shape:
            raise ValueError(f"valid {tuple(valid.shape)} must have the shape of rewards {tuple(rewards.shape)}")
        v = valid.reshape(r.shape).bool()  # (P, G)
    if not torch.isfinite(r[v]).all():
        raise ValueError("a valid candidate has a NaN or infinite reward; rewards must be finite "
                         "(mark candidates without a score invalid instead)")

    # float64 throughout: in float32, rewards near 1e6 that differ by 0.06 lose their differences to
    # round-off, and rewards of 1e20 square to inf in the variance and give all-zero advantages
    out_dtype = r.dtype
    r = r.double()  # (P, G)
    r0 = torch.where(v, r, torch.zeros_like(r))  # (P, G) invalid slots may hold NaN: zero them first
    rs = r0.detach() if hold_stats else r0  # (P, G) what the mean and std are taken of
    n = v.sum(-1, keepdim=True)  # (P, 1) valid members per group
    mean = rs.sum(-1, keepdim=True) / n.clamp(min=1)  # (P, 1)
    dev = torch.where(v, rs - mean, torch.zeros_like(r))  # (P, G)
    var = (dev * dev).sum(-1, keepdim=True) / (n - 1).clamp(min=1)  # (P, 1) sample variance
    std = var.sqrt()  # (P, 1)
    if hold_stats:
        dev = torch.where(v, r0 - mean, torch.zeros_like(r))  # (P, G) the same values, r0's gradient
    # "all valid rewards equal" tested exactly, so round-off in mean/std never becomes (1e-17 / eps)
    hi = torch.where(v, rs, torch.full_like(r, -math.inf)).amax(-1, keepdim=True)  # (P, 1)
    lo = torch.where(v, rs, torch.full_like(r, math.inf)).amin(-1, keepdim=True)  # (P, 1)
    spread = hi > lo  # (P, 1) false for 0 or 1 valid members, or all equal
    adv = torch.where(v & spread, dev / (std + eps), torch.zeros_like(r))  # (P, G)
    return adv.to(out_dtype).reshape(rewards.shape)


# ----------------------------------------------------------------------------------------------------
# The Gaussian pose policy (Eq. 2, with a diagonal covariance; see note 6 above)


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

    For diagnostics (the exact pose KL to the reference); the loss uses the sampled k3 estimate,
    which needs only log-densities. At least float32, like the log-densities.
    """
    mu_p, log_std_p, mu_q, log_std_q = _f32(mu_p, log_std_p, mu_q, log_std_q)
    var_ratio = torch.exp(2 * (log_std_p - log_std_q))  # (..., D) sigma_p^2 / sigma_q^2
    z = (mu_p - mu_q) * torch.exp(-log_std_q)  # (..., D)
    return (0.5 * (var_ratio + z * z - 1) - (log_std_p - log_std_q)).sum(-1)  # (...,)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: float = MAX_LOG_RATIO) -> torch.Tensor:
    """The k3 estimator of KL(pi_theta || pi_ref) at a sample: exp(ref - logp) - (ref - logp) - 1.

    Elementwise; unbiased when the sample comes from pi_theta, and never negative. The log-ratio
    ref - logp is clamped from ABOVE only, at max_log_ratio (note 10): only d > 0 can overflow exp(),
    so one wild sample cannot make an inf or NaN loss. Below, k3 = e^d - d - 1 is about -d - 1 and
    stays exact, with gradient dk3/dlogp = 1 - e^d -> 1: the further the policy's log-density at its
    own sample rises above the reference's, the harder the KL pulls back. (A lower clamp at -20 froze
    the pose KL at 19, gradient 0, after a mean shift of a few degrees in 144 dimensions.)
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
        the KL in place of the k3 estimate at the sampled pose (note 12): e.g. gaussian_kl of the two
        heads' Gaussians, exact and never clamped. It must carry the gradient; invalid slots are ignored.
    beta_c: optional (N,) weight of each candidate's pose KL in place of beta (note 18); the text KL keeps
        beta. None = beta for every candidate, Eq. 6. stats["kl_c"] stays the unweighted mean.
    N_norm, V_norm: the divisors of the discrete and continuous sums (and of their KLs); default N and this
        batch's V. Under data parallelism, where gradients are averaged over ranks, pass the GLOBAL counts
        divided by the world size (train_rft.global_normalisers all-reduces them), so that the averaged
        gradient is that of one batch holding every rank's candidates (note 3). V_norm = 0 (no valid pose
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
    V_div = V if V_norm is None else V_norm  # note 3: the batch's V, or the global V / world size
    V_div = V_div if V_div > 0 else 1  # V = 0: the sums are 0, so is the term
    r_c = torch.exp((pl - old_pl).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (N,)
    surr_c, clip_c = _clipped_surrogate(r_c, A_c, clip_eps)  # (N,), (N,)
    J_c = torch.where(valid, surr_c, zc).sum() / V_div  # () zero when V = 0
    if pose_kl is not None and pose_kl.shape != (N,):
        raise ValueError(f"pose_kl must be (N,) = ({N},), one value per candidate, got {tuple(pose_kl.shape)}")
    # k3 at the sampled poses, or the given (exact) KL, note 12
    kl_per_c = torch.where(valid, kl_k3(pl, ref_pl) if pose_kl is None else pose_kl, zc)  # (N,)
    kl_c = kl_per_c.sum() / V_div  # ()
    if beta_c is None:
        beta_kl_c = beta * kl_c  # () Eq. 6: one beta
    else:  # note 18: each candidate's pose KL weighed by its own beta_c
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
