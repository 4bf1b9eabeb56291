"""eval.py metrics: MPJPE, PA-MPJPE (against scipy) and Recall@K under both protocols."""
import math

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.transform import Rotation

import eval as E
from eval import mpjpe, pa_mpjpe, procrustes_align, recall_at_k, recall_at_k_sampled


# ---- MPJPE / PA-MPJPE --------------------------------------------------------------------------------


def test_mpjpe_by_hand():
    """Catches a sum in place of a mean, a squared error, or a wrong root alignment."""
    gt = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    pred = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.3], [0.0, 2.0, -0.4]]])
    assert torch.allclose(mpjpe(pred, gt), torch.tensor([(0 + 0.3 + 0.4) / 3]))
    # a global shift counts only without root alignment
    shifted = pred + torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(mpjpe(shifted, gt), torch.tensor([(0 + 0.3 + 0.4) / 3]))
    assert torch.allclose(mpjpe(shifted, gt, root=None), torch.tensor([(1.0 + 1.3 + 0.6) / 3]))
    # root = the mean of joints 1 and 2: pred's root moves by (0, 0, -0.05) relative to gt's
    expected = (np.linalg.norm([0, 0, 0.05]) + 0.35 + 0.35) / 3
    assert torch.allclose(mpjpe(pred, gt, root=(1, 2)), torch.tensor([expected], dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\(B, J, 3\)"):
        mpjpe(pred[0], gt[0])


def _scipy_pa_mpjpe(pred, gt, proper):
    """Independent similarity Procrustes: the rotation from scipy (orthogonal_procrustes, which may
    reflect, or Rotation.align_vectors, which is always a proper rotation), then the best scale."""
    X, Y = pred - pred.mean(0), gt - gt.mean(0)
    if proper:
        R = Rotation.align_vectors(Y, X)[0].as_matrix()  # min sum |y - R x|^2, det R = +1
        XR = X @ R.T
    else:
        Q, _ = orthogonal_procrustes(X, Y)  # min |X Q - Y|, Q orthogonal
        XR = X @ Q
    s = (XR * Y).sum() / (X * X).sum()
    return np.linalg.norm(s * XR - Y, axis=-1).mean()


def test_pa_mpjpe_matches_scipy():
    """Catches a missing scale or translation, R applied transposed, or a wrong scale formula."""
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(6, 24, 3)) * 0.3
    pred = gt + rng.normal(size=gt.shape) * 0.05  # near gt: the best orthogonal map is a rotation
    ours = pa_mpjpe(torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
    ref = np.array([_scipy_pa_mpjpe(p, g, proper=False) for p, g in zip(pred, gt)])
    ref_proper = np.array([_scipy_pa_mpjpe(p, g, proper=True) for p, g in zip(pred, gt)])
    assert np.allclose(ours, ref, atol=1e-10) and np.allclose(ours, ref_proper, atol=1e-10)
    assert (ours < mpjpe(torch.from_numpy(pred), torch.from_numpy(gt), root=None).numpy()).all()


def test_pa_mpjpe_never_reflects():
    """Catches a missing det(+1) fix: on a mirrored prediction the best orthogonal map is a reflection,
    which would undo the mirror and report a near-zero error."""
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(4, 24, 3)) * 0.3
    pred = gt * np.array([-1.0, 1.0, 1.0]) + rng.normal(size=gt.shape) * 0.01  # mirror image
    ours = pa_mpjpe(torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
    ref_proper = np.array([_scipy_pa_mpjpe(p, g, proper=True) for p, g in zip(pred, gt)])
    ref_reflect = np.array([_scipy_pa_mpjpe(p, g, proper=False) for p, g in zip(pred, gt)])
    assert np.allclose(ours, ref_proper, atol=1e-10)
    assert (ours > 5 * ref_reflect).all()  # the reflection would fit far better: we must not use it


@pytest.mark.parametrize("mirrored", [False, True])
def test_pa_mpjpe_invariant_to_similarity_transform(mirrored):
    """Catches an alignment that is not a full similarity fit: a random scale, rotation and
    translation of the prediction must leave PA-MPJPE unchanged, and an exact copy must give 0."""
    g = torch.Generator().manual_seed(3)
    gt = torch.randn(5, 24, 3, generator=g, dtype=torch.float64) * 0.3
    pred = gt + torch.randn(gt.shape, generator=g, dtype=torch.float64) * 0.05
    if mirrored:  # the reflection-prone case: the cross-covariance has a negative determinant
        pred = pred * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    R = torch.from_numpy(Rotation.random(5, random_state=4).as_matrix())  # (5, 3, 3)
    s = torch.rand(5, 1, 1, generator=g, dtype=torch.float64) * 3 + 0.2
    t = torch.randn(5, 1, 3, generator=g, dtype=torch.float64)
    moved = s * pred @ R.transpose(1, 2) + t
    assert torch.allclose(pa_mpjpe(moved, gt), pa_mpjpe(pred, gt), atol=1e-12)
    assert torch.allclose(pa_mpjpe(s * gt @ R.transpose(1, 2) + t, gt), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.det(R), torch.ones(5, dtype=torch.float64))


def test_pa_mpjpe_float32_and_degenerate_prediction():
    """Catches float32 inputs losing accuracy or dtype, and NaN from a prediction with no spread."""
    gt = torch.randn(2, 24, 3)
    aligned = procrustes_align(gt * 2 + 1, gt)
    assert aligned.dtype == torch.float32 and torch.allclose(aligned, gt, atol=1e-5)
    collapsed = torch.zeros(1, 24, 3)
    err = pa_mpjpe(collapsed, gt[:1])
    assert torch.isfinite(err).all()
    assert torch.allclose(err, (gt[0] - gt[0].mean(0)).norm(dim=-1).mean()[None])


# ---- Recall@K ---------------------------------------------------------------------------------------------


def _unit(angles):
    """2-D unit vectors at the given angles (degrees). (N,) -> (N, 2)"""
    a = torch.tensor(angles, dtype=torch.float64) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], -1)


def test_recall_at_k_hand_built_ranks():
    """Catches transposing the two directions, ties broken in the ground truth's favour (a collapsed
    policy giving every caption the same pose would then score 100%), or missing L2 normalisation."""
    # texts at 0, 90, 180, 270 degrees; poses at 0, 0, 180, 225 degrees (pose 1 is scaled by 5:
    # only its direction may count). rank = the number of candidates scoring >= the ground truth.
    # (built from exact components, so the ties below are exact in floating point)
    text = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float64)
    pose = torch.tensor([[1.0, 0], [5, 0], [-1, 0], [-1, -1]], dtype=torch.float64)
    # S = cos(text_i - pose_j):
    #   text 0: [1, 1, -1, -.71]      gt 1, one tie (pose 1)           -> rank 2
    #   text 1: [0, 0, 0, -.71]       gt 0, two ties                   -> rank 3
    #   text 2: [-1, -1, 1, .71]      gt 1                             -> rank 1
    #   text 3: [0, 0, 0, .71]        gt .71                           -> rank 1
    #   pose 0: column [1, 0, -1, 0]  gt 1                             -> rank 1
    #   pose 1: column [1, 0, -1, 0]  gt 0, text 0 higher, texts 1, 3 tie -> rank 3
    #   pose 2: column [-1, 0, 1, 0]  gt 1                             -> rank 1
    #   pose 3: column [-.71, -.71, .71, .71]  gt .71, one tie (text 2)  -> rank 2
    r = recall_at_k(text, pose, ks=(1, 2, 3))
    assert r == pytest.approx({"t2p@1": 50.0, "p2t@1": 50.0, "t2p@2": 75.0, "p2t@2": 75.0,
                               "t2p@3": 100.0, "p2t@3": 100.0})
    # move text 3 to 200 degrees: pose 2 (180) beats its gt (225) -> its t2p rank becomes 2
    moved = torch.cat([text[:3], _unit([200])])  # (4, 2)
    r = recall_at_k(moved, pose, ks=(1, 2))
    assert r["t2p@1"] == pytest.approx(25.0) and r["t2p@2"] == pytest.approx(75.0)
    # a collapsed policy: every caption gets the same pose. Text queries tie with all N poses (0%);
    # every pose ranks the texts in the same order, so pose-to-text is exactly chance, k / N.
    same = _unit([30, 30, 30, 30])
    assert recall_at_k(text, same, ks=(1, 3)) == pytest.approx({"t2p@1": 0.0, "t2p@3": 0.0,
                                                                 "p2t@1": 25.0, "p2t@3": 75.0})
    with pytest.raises(ValueError, match="all-zero"):
        recall_at_k(text, pose * 0)


def test_recall_at_k_against_brute_force():
    """Catches an off-by-one in ranks or K, on random embeddings with many different ranks."""
    g = torch.Generator().manual_seed(5)
    text, pose = torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g)
    ours = recall_at_k(text, pose, ks=(1, 5, 10, 20))
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    p = torch.nn.functional.normalize(pose.double(), dim=-1)
    S = (t @ p.T).tolist()
    for k in (1, 5, 10, 20):
        t2p = sum(sorted(S[i], reverse=True).index(S[i][i]) < k for i in range(60)) / 60 * 100
        col = [[S[i][j] for i in range(60)] for j in range(60)]
        p2t = sum(sorted(col[j], reverse=True).index(col[j][j]) < k for j in range(60)) / 60 * 100
        assert ours[f"t2p@{k}"] == pytest.approx(t2p) and ours[f"p2t@{k}"] == pytest.approx(p2t)


def test_recall_sampled_is_perfect_when_pairs_dominate():
    """Catches the ground truth missing from its own candidate list, or being drawn as a distractor."""
    g = torch.Generator().manual_seed(6)
    text = torch.randn(100, 16, generator=g)
    pose = text + 0.01 * torch.randn(100, 16, generator=g)
    r = recall_at_k_sampled(text, pose, ks=(1, 5), generator=torch.Generator().manual_seed(0))
    assert all(v == pytest.approx(100.0) for v in r.values())


def test_recall_sampled_matches_brute_force_loop():
    """Catches mixing up the two directions' candidate indices (S[i, others] vs S[others, i]),
    wrong averaging over repetitions, or a sample of the wrong size."""
    g = torch.Generator().manual_seed(7)
    N, n, repeats, ks = 40, 8, 3, (1, 3, 5)
    text, pose = torch.randn(N, 6, generator=g), torch.randn(N, 6, generator=g)
    ours = recall_at_k_sampled(text, pose, ks=ks, n_candidates=n, repeats=repeats,
                               generator=torch.Generator().manual_seed(11))
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    p = torch.nn.functional.normalize(pose.double(), dim=-1)
    gen = torch.Generator().manual_seed(11)  # the documented draw, replayed
    hits = {f"{d}@{k}": 0 for d in ("t2p", "p2t") for k in ks}
    for _ in range(repeats):
        keys = torch.rand((N, N), generator=gen)
        for i in range(N):
            others = [j for j in sorted(range(N), key=lambda j: keys[i, j].item()) if j != i][:n - 1]
            assert len(set(others)) == n - 1
            gt_t2p = float(t[i] @ p[i])
            rank_t2p = 1 + sum(float(t[i] @ p[j]) > gt_t2p for j in others)
            rank_p2t = 1 + sum(float(t[j] @ p[i]) > gt_t2p for j in others)
            for k in ks:
                hits[f"t2p@{k}"] += rank_t2p <= k
                hits[f"p2t@{k}"] += rank_p2t <= k
    for key, h in hits.items():
        assert ours[key] == pytest.approx(100.0 * h / (N * repeats))
    with pytest.raises(ValueError, match="n_candidates"):
        recall_at_k_sampled(text, pose, n_candidates=N + 1)


# --- statistics for honest tables --------------------------------------------------------------------


def test_paired_change_by_hand():
    """Mean and standard error of the per-item differences. Catches an unpaired error (the spread of
    the items, not of the differences) and a population std instead of the sample std."""
    before = torch.tensor([10.0, 50.0, 90.0, 130.0])
    after = before + torch.tensor([1.0, 3.0, 1.0, 3.0])
    mean, se = E.paired_change(before, after)
    assert mean == pytest.approx(2.0)
    assert se == pytest.approx(math.sqrt(4 / 3) / 2)  # sample std of (1, 3, 1, 3) is sqrt(4/3); n = 4
    with pytest.raises(ValueError, match="per-item"):
        E.paired_change(before, after[:3])


def test_group_rank_correlation_matches_scipy_with_ties():
    """Spearman's rho within each group of group_size candidates, averaged over groups, against
    scipy.stats.spearmanr (average ranks for ties). Catches ranking over the whole batch instead of per
    group, ties ranked arbitrarily, and groups without variation counted as 0 instead of skipped."""
    from scipy.stats import spearmanr
    g = torch.Generator().manual_seed(0)
    group_size, P = 8, 6
    a = torch.randint(0, 4, (P * group_size,), generator=g).float()  # many ties, like the checker's fractions
    b = torch.randn(P * group_size, generator=g) + 0.5 * a
    a[:group_size] = 1.0  # group 0: the checker cannot tell its candidates apart -> skipped
    rho, groups = E.group_rank_correlation(a, b, group_size)
    rows_of = lambda i: slice(i * group_size, (i + 1) * group_size)  # noqa: E731  group i's rows
    ref = [spearmanr(a[rows_of(i)].numpy(), b[rows_of(i)].numpy()).statistic for i in range(1, P)]
    assert groups == P - 1
    assert rho == pytest.approx(sum(ref) / len(ref), abs=1e-9)
    assert E.group_rank_correlation(b, b, group_size)[0] == pytest.approx(1.0)
    assert E.group_rank_correlation(b, -b, group_size)[0] == pytest.approx(-1.0)


def test_recall_at_k_is_nan_when_k_covers_every_item():
    """With N <= K items every ground truth is within the top K, so recall would print 100% for any
    model: it must be NaN (no measurement) instead, while K < N keeps its value."""
    g = torch.Generator().manual_seed(1)
    text, pose = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    r = recall_at_k(text, pose, ks=(1, 5, 10))
    assert math.isnan(r["t2p@5"]) and math.isnan(r["p2t@10"])
    assert 0 <= r["t2p@1"] <= 100
