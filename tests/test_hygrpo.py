"""hygrpo.py: advantages (Eq. 16), Gaussian helpers, the HyGRPO loss (Eq. 6) and a hybrid bandit."""
import math

import pytest
import torch

from hygrpo import (gaussian_entropy, gaussian_kl, gaussian_log_prob, group_advantages, hygrpo_loss,
                    kl_k3)

NAN = float("nan")


# ---- group_advantages (Eq. 16) ---------------------------------------------------------------------


def test_group_advantages_hand_computed():
    """Catches a population std where the sample std is documented, mixing groups, or a wrong layout."""
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                            [0.0, 0.0, 1.0, 1.0]])
    # group 1: mean 2.5, sample std sqrt(5/3) = 1.2909944; group 2: mean 0.5, sample std sqrt(1/3)
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5],
                             [-0.5, -0.5, 0.5, 0.5]])
    expected /= torch.tensor([[1.2909944 + 1e-6], [0.5773503 + 1e-6]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv, expected, atol=1e-6)
    # the flat layout with group_size gives the same numbers, in the same order
    assert torch.allclose(group_advantages(rewards.flatten(), group_size=4), expected.flatten(), atol=1e-6)


def test_group_advantages_hold_stats_gradient_hand_computed():
    """hold_stats=True (note 10): the same values, and the gradient d r / (std + eps) with the group's mean
    and std held; without it the full derivative makes each group's advantages sum to 0 for any rewards,
    so their sum has no gradient at all. Catches the stats not held, or held in the values too."""
    r = torch.tensor([[1.0, 2.0, 4.0, 9.0], [3.0, 3.0, 3.0, 3.0]], requires_grad=True)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    held = group_advantages(r, valid, hold_stats=True)
    assert torch.equal(held.detach(), group_advantages(r.detach(), valid))
    held.sum().backward()
    std = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)  # sample std of {1, 2, 4}
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]) / (std + 1e-6)  # (2, 4)
    assert torch.allclose(r.grad, expected, atol=1e-6)  # invalid member and spread-less group: 0
    r0 = r.detach()[:1].clone().requires_grad_(True)  # (the spread-less group's sqrt(0) has no derivative)
    group_advantages(r0, valid[:1]).sum().backward()
    assert r0.grad.abs().max() < 1e-6


def test_group_advantages_degenerate_groups_and_invalid_members():
    """Catches NaN from 0/0 (equal rewards, one valid member, none), round-off / eps noise in equal
    groups, and invalid members (holding NaN) leaking into the mean and std."""
    # 8 x 0.3 in float32: the computed mean differs from 0.3 by 3e-8, which (r - mean) / (std + eps)
    # would blow up to about 0.03
    assert torch.equal(group_advantages(torch.full((1, 8), 0.3)), torch.zeros(1, 8))
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.1],      # equal
                            [1.0, NAN, 3.0, 5.0],      # one invalid member holding NaN
                            [7.0, NAN, NAN, 2.0],      # a single valid member
                            [NAN, NAN, NAN, NAN]])     # no valid member
    valid = torch.tensor([[True, True, True, True],
                          [True, False, True, True],
                          [True, False, False, False],
                          [False, False, False, False]])
    adv = group_advantages(rewards, valid)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[0], torch.zeros(4))
    # among the valid {1, 3, 5}: mean 3, sample std 2
    assert torch.allclose(adv[1], torch.tensor([-1.0, 0.0, 0.0, 1.0]) * 2 / (2 + 1e-6), atol=1e-6)
    assert torch.equal(adv[2], torch.zeros(4))
    assert torch.equal(adv[3], torch.zeros(4))


def test_group_advantages_large_rewards_in_float64():
    """Eq. 16 is computed in float64 and cast back: catches float32 round-off in the group mean (rewards
    near 1e6 that differ by 1/16 came out wrong) and overflow of the squared deviations (rewards of 1e20
    gave all-zero advantages)."""
    base = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # (1, 4) mean 1.5, sample std sqrt(5/3)
    expected = (base - 1.5) / (5 / 3) ** 0.5  # (1, 4)
    near = (1e6 + base / 16).float()  # exactly representable in float32 (spacing 1/16 at 1e6)
    adv = group_advantages(near)
    assert adv.dtype == torch.float32
    assert torch.allclose(adv, expected, atol=1e-4), adv
    huge = torch.tensor([[1e20, -1e20, 1e20, -1e20]])  # (1, 4) float32
    assert torch.allclose(group_advantages(huge), torch.tensor([[1.0, -1.0, 1.0, -1.0]]) * (3 / 4) ** 0.5,
                          atol=1e-5)


def test_group_advantages_rejects_bad_input():
    """Catches silently normalising across prompts, or a NaN reward of a valid member going through."""
    with pytest.raises(ValueError, match="need group_size"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="groups of group_size"):
        group_advantages(torch.zeros(7), group_size=4)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, NAN]]))


# ---- Gaussian helpers --------------------------------------------------------------------------------


def test_gaussian_helpers_match_torch_distributions():
    """Catches a missing log(2 pi) or log-std term, a sum over the wrong dim, or a KL with p and q swapped."""
    g = torch.Generator().manual_seed(1)
    mu_p, mu_q, x = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    ls_p, ls_q = (0.5 * torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    p = torch.distributions.Normal(mu_p, ls_p.exp())
    q = torch.distributions.Normal(mu_q, ls_q.exp())
    assert torch.allclose(gaussian_log_prob(x, mu_p, ls_p), p.log_prob(x).sum(-1), atol=1e-12)
    assert torch.allclose(gaussian_entropy(ls_p), p.entropy().sum(-1), atol=1e-12)
    assert torch.allclose(gaussian_kl(mu_p, ls_p, mu_q, ls_q),
                          torch.distributions.kl_divergence(p, q).sum(-1), atol=1e-12)


def test_kl_k3_by_hand_and_unbiased():
    """Catches a sign flip in the k3 formula (it would go negative) and checks it estimates the closed
    form KL when the samples come from pi_theta."""
    assert torch.allclose(kl_k3(torch.tensor(-1.0), torch.tensor(-1.0 + math.log(2))),
                          torch.tensor(2 - math.log(2) - 1))
    g = torch.Generator().manual_seed(2)
    mu_p, ls_p = torch.tensor([0.3, -0.2]), torch.tensor([0.1, -0.3])
    mu_q, ls_q = torch.tensor([0.0, 0.1]), torch.tensor([0.0, 0.0])
    x = mu_p + ls_p.exp() * torch.randn(200_000, 2, generator=g)
    k3 = kl_k3(gaussian_log_prob(x, mu_p, ls_p), gaussian_log_prob(x, mu_q, ls_q))
    assert (k3 >= 0).all()
    assert abs(k3.mean() - gaussian_kl(mu_p, ls_p, mu_q, ls_q)) < 5e-3


def test_kl_k3_keeps_pulling_when_the_policy_outgrows_the_reference():
    """Catches a lower clamp on d = ref - logp. Only d > 0 can overflow exp(); when the policy's
    log-density at its own sample exceeds the reference's by more than 20 nats (d < -20, reached after a
    mean shift of a few degrees in 144 dimensions), k3 must stay exact, e^d - d - 1, with gradient
    dk3/dlogp = 1 - e^d, not freeze at 19 with zero gradient."""
    logp = torch.tensor([30.0, 200.0, 5.0], requires_grad=True)
    ref = torch.tensor([0.0, 0.0, 5.0 + 100.0])  # d = -30, -200, +100
    k3 = kl_k3(logp, ref)
    d = torch.tensor([-30.0, -200.0])
    assert torch.allclose(k3[:2], d.exp() - d - 1)  # 29 and 199, not 19 and 19
    assert torch.isfinite(k3).all()  # d = +100 is clamped at 20: e^20 - 21, no overflow
    assert torch.allclose(k3[2], torch.tensor(math.exp(20.0) - 21.0))
    k3.sum().backward()
    assert torch.allclose(logp.grad[:2], 1 - d.exp())  # ~1: the KL pulls the policy back
    assert logp.grad[2] == 0  # frozen above the clamp


# ---- hygrpo_loss (Eq. 6) -------------------------------------------------------------------------------


def _batch():
    """N = 3 answers with 4, 2 and 3 tokens; candidate 1 has no pose and NaN in its pose slots;
    padding holds NaN (current) and -inf (old, ref)."""
    mask = torch.tensor([[1, 1, 1, 1],
                         [1, 1, 0, 0],
                         [1, 1, 1, 0]], dtype=torch.bool)
    logp = torch.tensor([[-1.0, -0.5, -2.0, -0.1],
                         [-0.3, -1.2, NAN, NAN],
                         [-0.7, -0.2, -1.5, NAN]], requires_grad=True)
    pad = torch.full((3, 4), -math.inf)
    old_logp = torch.where(mask, logp.detach(), pad)
    pose_logp = torch.tensor([-3.0, NAN, -4.0], requires_grad=True)
    old_pose_logp = torch.tensor([-3.0, NAN, -4.0])
    valid = torch.tensor([True, False, True])
    adv_d = torch.tensor([0.5, -1.0, 2.0])
    adv_c = torch.tensor([1.5, NAN, -0.7])
    return logp, old_logp, mask, adv_d, pose_logp, old_pose_logp, adv_c, valid


def test_loss_value_and_gradients_at_old_equals_current():
    """Catches a wrong normalisation (1/N over answers, 1/|o_i| over tokens, 1/V over valid poses), a
    sign error (the loss is -Eq. 6), and invalid candidates or padding (NaN) reaching the loss or grads."""
    logp, old_logp, mask, adv_d, pose_logp, old_pose_logp, adv_c, valid = _batch()
    loss, stats = hygrpo_loss(logp, old_logp, old_logp, mask, adv_d,
                              pose_logp, old_pose_logp, old_pose_logp, adv_c, valid, beta=0.0)
    N, V = 3, 2
    lengths = torch.tensor([4.0, 2.0, 3.0])
    # ratios are 1: J_d = mean_i F_i, J_c = sum_valid Delta_i / V
    assert torch.allclose(loss, -(adv_d.mean() + (1.5 - 0.7) / V))
    loss.backward()
    expected_tok = torch.where(mask, (-adv_d / (N * lengths))[:, None].expand(3, 4), torch.zeros(3, 4))
    assert torch.allclose(logp.grad, expected_tok)
    assert torch.allclose(pose_logp.grad, torch.tensor([-1.5 / V, 0.0, 0.7 / V]))
    assert stats["V_over_N"] == pytest.approx(2 / 3)
    assert stats["ratio_d"] == pytest.approx(1.0) and stats["ratio_c"] == pytest.approx(1.0)
    assert stats["clip_frac_d"] == 0.0 and stats["clip_frac_c"] == 0.0


def test_clipped_samples_get_no_gradient_in_the_clipped_direction():
    """Catches a max in place of PPO's min, clipping the wrong side, or clipping the advantage."""
    log15, log05 = math.log(1.5), math.log(0.5)
    # four one-token answers with ratios 1.5, 1.5, 0.5, 0.5 and advantages +1, -1, -1, +1
    old = torch.zeros(4, 1)
    logp = torch.tensor([[log15], [log15], [log05], [log05]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    pose_logp = torch.tensor([log15, log15, log05, log05], requires_grad=True)
    valid = torch.ones(4, dtype=torch.bool)
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, stats = hygrpo_loss(logp, old, old, mask, adv, pose_logp, torch.zeros(4), torch.zeros(4),
                              adv, valid, clip_eps=0.2, beta=0.0)
    loss.backward()
    # d(-r A / 4)/d logp = -A r / 4 where the unclipped branch is the min, else 0
    expected = torch.tensor([0.0, 1.5 / 4, 0.0, -0.5 / 4])
    assert torch.allclose(logp.grad[:, 0], expected)
    assert torch.allclose(pose_logp.grad, expected)
    # value: min(1.5, 1.2), min(-1.5, -1.2), min(-0.5, -0.8), min(0.5, 0.8)
    J = (1.2 - 1.5 - 0.8 + 0.5) / 4
    assert torch.allclose(loss, torch.tensor(-2 * J))
    assert stats["clip_frac_d"] == 0.5 and stats["clip_frac_c"] == 0.5


def test_kl_term_value_and_gradient():
    """Catches a missing or mis-signed beta term, the KL measured to the old instead of the reference
    policy, or the two KL parts normalised differently from the documented choice."""
    logp, old_logp, mask, _, pose_logp, old_pose_logp, _, valid = _batch()
    ref_logp = torch.where(mask, logp.detach() - 0.3, torch.full((3, 4), -math.inf))
    ref_logp[0, 1] += 0.8  # one token more likely under the reference
    ref_pose_logp = torch.tensor([-2.5, NAN, -4.6])
    zero = torch.zeros(3)
    beta = 0.1
    loss, stats = hygrpo_loss(logp, old_logp, ref_logp, mask, zero, pose_logp, old_pose_logp,
                              ref_pose_logp, zero, valid, beta=beta)
    # by hand: d = ref - logp, k3 = e^d - d - 1, dk3/dlogp = 1 - e^d
    d_tok = torch.where(mask, ref_logp - logp.detach(), torch.zeros(3, 4))
    k3_tok = torch.where(mask, d_tok.exp() - d_tok - 1, torch.zeros(3, 4))
    lengths = torch.tensor([4.0, 2.0, 3.0])
    kl_d = (k3_tok.sum(-1) / lengths).mean()
    d_pose = torch.tensor([-2.5 + 3.0, -4.6 + 4.0])
    kl_c = (d_pose.exp() - d_pose - 1).mean()
    assert torch.allclose(loss, beta * (kl_d + kl_c))
    assert stats["kl_d"] == pytest.approx(float(kl_d)) and stats["kl_c"] == pytest.approx(float(kl_c))
    loss.backward()
    g_tok = torch.where(mask, beta * (1 - d_tok.exp()) / (3 * lengths[:, None]), torch.zeros(3, 4))
    assert torch.allclose(logp.grad, g_tok)
    g_pose = beta * (1 - d_pose.exp()) / 2
    assert torch.allclose(pose_logp.grad, torch.tensor([g_pose[0], 0.0, g_pose[1]]))


def test_discrete_only_is_plain_grpo():
    """Catches the GRPO baseline still training the pose head, or changing the discrete term."""
    logp, old_logp, mask, adv_d, pose_logp, old_pose_logp, adv_c, valid = _batch()
    args = (logp, old_logp, old_logp, mask, adv_d, pose_logp, old_pose_logp, old_pose_logp, adv_c, valid)
    loss_grpo, _ = hygrpo_loss(*args, beta=0.04, discrete_only=True)
    g_tok, g_pose = torch.autograd.grad(loss_grpo, (logp, pose_logp), allow_unused=True)
    assert g_pose is None or torch.equal(g_pose, torch.zeros(3))
    loss_hy, stats = hygrpo_loss(*args, beta=0.04)
    g_tok_hy, = torch.autograd.grad(loss_hy, logp)
    assert torch.allclose(g_tok, g_tok_hy)
    assert torch.allclose(loss_grpo, loss_hy - stats["loss_c"])  # KL_c is 0 here: old = ref


def test_no_valid_pose_gives_zero_continuous_term():
    """Catches 0/0 = NaN when V = 0, and NaN pose values leaking through a multiplication by 0."""
    logp, old_logp, mask, adv_d, pose_logp, _, _, _ = _batch()
    garbage = torch.tensor([NAN, math.inf, -math.inf])
    pose_logp = garbage.clone().requires_grad_()
    loss, stats = hygrpo_loss(logp, old_logp, old_logp, mask, adv_d, pose_logp, garbage, garbage,
                              garbage, torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and stats["loss_c"] == 0.0 and stats["V_over_N"] == 0.0
    assert torch.equal(pose_logp.grad, torch.zeros(3))
    assert torch.isfinite(logp.grad).all()


def test_huge_ratio_stays_finite():
    """Catches exp() of a large log-ratio overflowing float32 into inf, then NaN in the backward pass."""
    logp = torch.tensor([[100.0]], requires_grad=True)
    pose_logp = torch.tensor([100.0], requires_grad=True)
    z = torch.zeros(1)
    # positive advantages: the clipped branch wins, and 0 * exp(100) = 0 * inf would be NaN
    loss, _ = hygrpo_loss(logp, torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                          torch.ones(1), pose_logp, z, z, torch.ones(1), torch.ones(1, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and torch.isfinite(pose_logp.grad).all()


def test_loss_rejects_bad_shapes():
    """Catches (N, T) / (N,) mix-ups being broadcast silently."""
    logp, old_logp, mask, adv_d, pose_logp, old_pose_logp, adv_c, valid = _batch()
    with pytest.raises(ValueError, match="adv_d"):
        hygrpo_loss(logp, old_logp, old_logp, mask, adv_d[:, None], pose_logp, old_pose_logp,
                    old_pose_logp, adv_c, valid)
    with pytest.raises(ValueError, match="valid must be a bool"):
        hygrpo_loss(logp, old_logp, old_logp, mask, adv_d, pose_logp, old_pose_logp,
                    old_pose_logp, adv_c, valid.float())


# ---- a hybrid bandit -----------------------------------------------------------------------------------

P_STAR = torch.tensor([1.5, -1.0])  # the best pose, 1.8 away from the initial mean


def _run_bandit(discrete_only, steps=200, G=16, inner=4, seed=0):
    """Algorithm 1 on a one-prompt bandit. Discrete action: one of 3 arms (arm 0 is right, R_d = 1;
    arm 2 emits no pose, so it is invalid). Continuous action: p ~ N(mu, diag(sigma^2)) in 2-D with
    R_c = -|p - p*|^2. Each sampling step is followed by `inner` Adam updates on the same samples, so
    the ratios move off 1 and clipping acts. beta = 0: a KL pull toward the start would move the
    optimum away from p*."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(3, requires_grad=True)
    mu = torch.zeros(2, requires_grad=True)
    log_std = torch.zeros(2, requires_grad=True)
    # the logits get a larger step so that their ratios, too, leave the clip range
    opt = torch.optim.Adam([{"params": [logits], "lr": 0.1}, {"params": [mu, log_std], "lr": 0.02}])
    max_clip = [0.0, 0.0]
    for _ in range(steps):
        with torch.no_grad():
            arm = torch.multinomial(torch.softmax(logits, -1), G, replacement=True, generator=g)  # (G,)
            valid = arm != 2  # (G,)
            p = mu + log_std.exp() * torch.randn(G, 2, generator=g)  # (G, 2)
            p = torch.where(valid[:, None], p, torch.full_like(p, NAN))  # no pose: garbage for the reward
            R_d = (arm == 0).float()  # (G,)
            R_c = -((p - P_STAR) ** 2).sum(-1)  # (G,) NaN where invalid
            F_hat = group_advantages(R_d, group_size=G)  # (G,) one pose an answer: the group is the G answers
            Delta_hat = group_advantages(R_c, valid, group_size=G)  # (G,)
            p_lp = torch.where(valid[:, None], p, mu.expand_as(p))  # log-density at a harmless point
            old_logp = torch.log_softmax(logits, -1)[arm][:, None]  # (G, 1)
            old_pose_logp = gaussian_log_prob(p_lp, mu, log_std)  # (G,)
        for _ in range(inner):
            logp = torch.log_softmax(logits, -1)[arm][:, None]  # (G, 1)
            pose_logp = gaussian_log_prob(p_lp, mu, log_std)  # (G,)
            loss, stats = hygrpo_loss(logp, old_logp, old_logp, torch.ones_like(logp, dtype=torch.bool),
                                      F_hat, pose_logp, old_pose_logp, old_pose_logp, Delta_hat, valid,
                                      beta=0.0, discrete_only=discrete_only)
            opt.zero_grad()
            loss.backward()
            opt.step()
            max_clip = [max(max_clip[0], stats["clip_frac_d"]), max(max_clip[1], stats["clip_frac_c"])]
    return torch.softmax(logits, -1).detach(), mu.detach(), log_std.detach(), max_clip


def test_bandit_hygrpo_reaches_optimum_grpo_leaves_pose_alone():
    """Catches a continuous term that does not train the pose (wrong sign, F_hat in place of
    Delta_hat, NaN from invalid candidates), and a GRPO baseline that touches the pose head."""
    probs, mu, _, max_clip = _run_bandit(discrete_only=False)
    assert probs[0] > 0.99
    assert (mu - P_STAR).norm() < 0.05, mu
    assert max_clip[0] > 0 and max_clip[1] > 0  # the inner updates did make clipping act, both parts

    probs, mu, log_std, _ = _run_bandit(discrete_only=True)
    assert probs[0] > 0.99
    assert torch.equal(mu, torch.zeros(2)) and torch.equal(log_std, torch.zeros(2))


def test_per_candidate_pose_kl_weights():
    """beta_c (note 7, train_rft.py --beta_i2p) weighs each candidate's pose KL by hand-computed
    numbers, leaves the text KL at beta and stats["kl_c"] unweighted; beta_c = beta everywhere is Eq. 6's
    loss and gradients; a bad weight is refused. Catches beta_c ignored, applied to the text KL, or
    reaching the invalid candidate (whose KL is NaN)."""
    logp, old_logp, mask, _, pose_logp, old_pose_logp, _, valid = _batch()
    ref_logp = torch.where(mask, logp.detach() - 0.3, torch.full((3, 4), -math.inf))  # a text KL too
    ref_pose_logp = torch.tensor([-2.5, NAN, -4.6])
    zero, beta = torch.zeros(3), 0.1

    def run(beta_c, kl_values=(0.3, NAN, 1.1)):
        pose_kl = torch.tensor(kl_values, requires_grad=True)
        lp = logp.detach().clone().requires_grad_(True)
        loss, stats = hygrpo_loss(lp, old_logp, ref_logp, mask, zero, pose_logp, old_pose_logp, ref_pose_logp,
                                  zero, valid, beta=beta, pose_kl=pose_kl, beta_c=beta_c)
        loss.backward()
        return loss, stats, pose_kl.grad, lp.grad

    loss0, stats0, g_kl0, g_tok0 = run(None)
    loss1, stats1, g_kl1, g_tok1 = run(torch.tensor([2.0, 5.0, 0.5]))
    text_part = loss0 - beta * (0.3 + 1.1) / 2  # beta * kl_d, the same in both
    assert torch.allclose(loss1, text_part + (2.0 * 0.3 + 0.5 * 1.1) / 2)
    assert torch.allclose(g_kl1, torch.tensor([2.0 / 2, 0.0, 0.5 / 2]))  # weight / V, none on the invalid one
    assert torch.equal(g_tok1, g_tok0)  # the text KL keeps beta
    assert stats1["kl_c"] == pytest.approx(0.7) and stats1["kl_d"] == pytest.approx(stats0["kl_d"])
    loss2, _, g_kl2, g_tok2 = run(torch.full((3,), beta))
    assert torch.allclose(loss2, loss0) and torch.allclose(g_kl2, g_kl0) and torch.equal(g_tok2, g_tok0)
    for bad in (torch.ones(2), torch.tensor([1.0, -1.0, 1.0]), torch.tensor([1.0, NAN, 1.0])):
        with pytest.raises(ValueError, match="beta_c must be"):
            run(bad)


def test_given_pose_kl_replaces_k3():
    """pose_kl= (the exact Gaussian KL of train_rft.py --pose_kl=exact) is averaged over the V valid
    candidates in place of k3, with gradient beta / V on each valid entry and none on the invalid one
    (which holds NaN) or, through the KL, on the pose log-densities."""
    logp, old_logp, mask, _, pose_logp, old_pose_logp, _, valid = _batch()
    ref_pose_logp = torch.tensor([-2.5, NAN, -4.6])
    pose_kl = torch.tensor([0.3, NAN, 1.1], requires_grad=True)
    zero, beta = torch.zeros(3), 0.1
    loss, stats = hygrpo_loss(logp, old_logp, old_logp, mask, zero, pose_logp, old_pose_logp,
                              ref_pose_logp, zero, valid, beta=beta, pose_kl=pose_kl)
    assert torch.allclose(loss, torch.tensor(beta * (0.3 + 1.1) / 2))  # kl_d = 0: ref = old = current
    assert stats["kl_c"] == pytest.approx(0.7)
    loss.backward()
    assert torch.allclose(pose_kl.grad, torch.tensor([beta / 2, 0.0, beta / 2]))
    assert torch.equal(pose_logp.grad, torch.zeros(3))
    with pytest.raises(ValueError, match="pose_kl must be"):
        hygrpo_loss(logp, old_logp, old_logp, mask, zero, pose_logp, old_pose_logp, ref_pose_logp, zero, valid,
                    pose_kl=torch.zeros(2))
