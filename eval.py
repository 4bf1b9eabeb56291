"""Evaluation: the paper's metrics (Sec. 4.1, "Metrics"; Tables 1, 2, 6).

Image-to-pose: MPJPE and PA-MPJPE, the mean Euclidean distance between predicted and ground-truth 3D
joints without and with Procrustes alignment (Table 1). Text-to-pose: Recall@K, K = 5, 10, 20, in
both directions, text-to-pose (R^T2P) and pose-to-text (R^P2T), under the two protocols of Table 2.

Figures: the reward curves of one run or of several runs over seeds (Fig. 4, Table 5) as plain SVG, one
panel per reward and task (`reward_curves_svg`, `comparison_svg`; `python eval.py --compare ... --figure=f.svg`).

The metric functions are pure functions over tensors and come first; then the evaluation of a policy,
the tables and the command line; the SVG figures last, under "File formats: not in the paper". Units:
joints in metres in, errors in metres out; printed tables multiply by 1000 for millimetres. Recalls are
in percent.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence
from xml.sax.saxutils import escape

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
import rewards
import smpl

# ----------------------------------------------------------------------------------------------------
# Image-to-pose: MPJPE and PA-MPJPE


def _check_joints(pred: torch.Tensor, gt: torch.Tensor, fn: str):
    if pred.dim() != 3 or pred.shape[-1] != 3 or pred.shape != gt.shape:
        raise ValueError(f"{fn} expects pred and gt of the same shape (B, J, 3), "
                         f"got {tuple(pred.shape)} and {tuple(gt.shape)}")


def mpjpe(pred: torch.Tensor, gt: torch.Tensor, root: int | Sequence[int] | None = 0) -> torch.Tensor:
    """Mean per-joint position error of each sample. (B, J, 3), (B, J, 3) -> (B,), input units.

    Root alignment: the standard 3DPW / Human3.6M protocols subtract the root joint from both skeletons
    before measuring, so a global translation error does not count. `root` is the joint index to
    align (default 0, the SMPL pelvis), or a sequence of indices whose mean is the root (e.g. (2, 3),
    the mid-hip of the 14 LSP joints, which the original HMR's evaluation used), or None for no
    alignment (errors in absolute camera space). The 14-joint protocol of SPIN and HMR2.0 subtracts a
    pelvis that is NOT one of the 14 joints (H3.6M regressor joint 0; see evaluate_real_i2p): centre
    the joints on it first (smpl.lsp14_from_h36m does) and pass root=None.
    """
    _check_joints(pred, gt, "mpjpe")
    if root is not None:
        idx = [root] if isinstance(root, int) else list(root)
        pred = pred - pred[:, idx].mean(1, keepdim=True)  # (B, J, 3)
        gt = gt - gt[:, idx].mean(1, keepdim=True)  # (B, J, 3)
    return (pred - gt).norm(dim=-1).mean(-1)  # (B,)


def procrustes_align(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Similarity Procrustes (Umeyama 1991): the s R pred + t closest to gt, per sample. (B, J, 3) -> (B, J, 3)

    With centred point sets X (pred) and Y (gt) and the 3x3 cross-covariance Sigma = Y^T X = U D V^T:
    R = U S V^T with S = diag(1, 1, sign(det U det V)), so R is a proper rotation (det +1) even when
    the best orthogonal map would be a reflection; s = tr(D S) / |X|^2; t = mean(gt) - s R mean(pred).
    Computed in float64 and returned in the input dtype. A prediction whose joints all coincide has
    no scale to fit: s = 0 and every joint lands on the centroid of gt.
    """
    _check_joints(pred, gt, "procrustes_align")
    X0, Y0 = pred.double(), gt.double()  # (B, J, 3)
    mu_x, mu_y = X0.mean(1, keepdim=True), Y0.mean(1, keepdim=True)  # (B, 1, 3)
    X, Y = X0 - mu_x, Y0 - mu_y  # (B, J, 3)
    Sigma = Y.transpose(1, 2) @ X  # (B, 3, 3) sum_j y_j x_j^T
    U, D, Vh = torch.linalg.svd(Sigma)  # (B, 3, 3), (B, 3), (B, 3, 3)
    sign = torch.sign(torch.det(U) * torch.det(Vh))  # (B,) -1 where the fit would reflect
    S = torch.ones_like(D)  # (B, 3)
    S[:, 2] = torch.where(sign < 0, -1.0, 1.0)
    R = U @ (S[:, :, None] * Vh)  # (B, 3, 3) U diag(S) V^T
    var_x = (X * X).sum((1, 2))  # (B,)
    s = (D * S).sum(-1) / var_x.clamp(min=1e-300)  # (B,) zero when var_x = 0, since then D = 0
    aligned = s[:, None, None] * X @ R.transpose(1, 2) + mu_y  # (B, J, 3)
    return aligned.to(pred.dtype)


def pa_mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """MPJPE after similarity Procrustes alignment (scale, rotation, translation) of pred onto gt.
    (B, J, 3), (B, J, 3) -> (B,), input units. No root alignment is needed: Procrustes fits the
    translation."""
    return mpjpe(procrustes_align(pred, gt), gt, root=None)  # (B,)


def spread(joints: torch.Tensor) -> torch.Tensor:
    """How far each pose of a set lies from the set's average: the MPJPE (pelvis-aligned) of each pose
    against the mean of the pelvis-aligned poses. (B, J, 3) -> (B,), input units. For a model's answers
    to B images it says how much the answers depend on the image: 0 when it answers one pose for all."""
    _check_joints(joints, joints, "spread")
    rel = joints - joints[:, :1]  # (B, J, 3) pelvis-aligned
    return mpjpe(rel, rel.mean(0, keepdim=True).expand_as(rel), root=None)  # (B,)


# ----------------------------------------------------------------------------------------------------
# Text-to-pose: Recall@K under the two protocols of Table 2


def _similarity(text_emb: torch.Tensor, pose_emb: torch.Tensor, fn: str) -> torch.Tensor:
    """Cosine similarity of every text with every pose. (N, d), (N, d) -> (N, N), row = text."""
    if text_emb.dim() != 2 or text_emb.shape != pose_emb.shape:
        raise ValueError(f"{fn} expects text_emb and pose_emb of the same shape (N, d), row i of each "
                         f"a matching pair; got {tuple(text_emb.shape)} and {tuple(pose_emb.shape)}")
    for name, e in (("text_emb", text_emb), ("pose_emb", pose_emb)):
        if not torch.isfinite(e).all():
            raise ValueError(f"{fn}: {name} holds NaN or inf")
        # a zero vector has no direction: its cosine with everything is 0, a meaningless tie
        if (e.norm(dim=-1) == 0).any():
            raise ValueError(f"{fn}: {name} has an all-zero row, which has no direction to compare")
    t = F.normalize(text_emb.double(), dim=-1)  # (N, d)
    p = F.normalize(pose_emb.double(), dim=-1)  # (N, d)
    return t @ p.T  # (N, N)


def _recall_hits(rank_t2p: torch.Tensor, rank_p2t: torch.Tensor, ks) -> dict:
    """Per query, 100 if its ground truth ranks within the top k, else 0: {"t2p@k": (N,), "p2t@k": (N,)}."""
    out = {}
    for k in ks:
        out[f"t2p@{k}"] = 100.0 * (rank_t2p <= k).double()
        out[f"p2t@{k}"] = 100.0 * (rank_p2t <= k).double()
    return out


def _recalls(rank_t2p: torch.Tensor, rank_p2t: torch.Tensor, ks) -> dict:
    """Percent of queries whose ground truth ranks within the top k, for each k and both directions."""
    return {key: float(hits.mean()) for key, hits in _recall_hits(rank_t2p, rank_p2t, ks).items()}


def recall_at_k(text_emb: torch.Tensor, pose_emb: torch.Tensor, ks: Sequence[int] = (5, 10, 20),
                per_query: bool = False) -> dict:
    """Recall@K with full retrieval, the protocol of PoseScript (Delmas et al., 2022) and of the left
    half of Table 2: each query is ranked against ALL N candidates of the other modality.

    text_emb, pose_emb: (N, d), row i of each a matching pair. Similarity: cosine on L2-normalised
    embeddings. Rank of a query's ground truth = 1 + the number of OTHER candidates scoring at least as
    high, so ties count against the query (a pessimistic convention). This matters for generated poses:
    a collapsed policy that gives every caption the same pose makes all candidates tie, and must score
    at chance or below, not 100%. Returns {"t2p@5": ..., "p2t@5": ..., ...} in percent; with
    per_query=True, each query's hit (100 or 0) instead, (N,) tensors, for paired standard errors.
    A K that is not below N gives NaN: every ground truth is then within the top K, and 100% would
    measure nothing.
    """
    S = _similarity(text_emb, pose_emb, "recall_at_k")  # (N, N) S[i, j] = cos(text i, pose j)
    gt = S.diagonal()  # (N,)
    rank_t2p = (S >= gt[:, None]).sum(1)  # (N,) text i ranks the N poses; counts itself, so >= 1
    rank_p2t = (S >= gt[None, :]).sum(0)  # (N,) pose j ranks the N texts (column j)
    out = (_recall_hits if per_query else _recalls)(rank_t2p, rank_p2t, ks)
    too_few = lambda key: int(key.split("@")[1]) >= S.shape[0]  # noqa: E731
    return {key: (v * float("nan") if too_few(key) else v) for key, v in out.items()}


def recall_at_k_sampled(text_emb: torch.Tensor, pose_emb: torch.Tensor, ks: Sequence[int] = (5, 10, 20),
                        n_candidates: int = 32, repeats: int = 10,
                        generator: torch.Generator | None = None, per_query: bool = False) -> dict:
    """Recall@K with random sampling, the protocol of the right half of Table 2, which ChatPose
    (Feng et al., 2024) and UniPose (Li et al., 2025c) report: each query is ranked against its
    ground truth plus n_candidates - 1 = 31 other candidates drawn at random, and the recalls are
    averaged over `repeats` = 10 draws. (32 candidates and 10 repetitions are this project's reading
    of that protocol; we could not check the numbers against the ChatPose / UniPose texts here.)

    The draw, which fixes the numbers for a given generator: for each repetition, one
    torch.rand((N, N), generator=generator) matrix with its diagonal set above 1; row i's
    n_candidates - 1 smallest entries are query i's distractors (a uniform random subset of the
    other N - 1 indices, without repetition). The same index set serves text i (ranking poses) and
    pose i (ranking texts). Ranks and ties as in `recall_at_k`. Memory: one N x N matrix.
    Returns {"t2p@5": ..., "p2t@5": ..., ...} in percent; with per_query=True, each query's hit rate
    over the repeats, (N,) tensors.
    """
    S = _similarity(text_emb, pose_emb, "recall_at_k_sampled")  # (N, N)
    N = S.shape[0]
    if not 2 <= n_candidates <= N:
        raise ValueError(f"recall_at_k_sampled needs 2 <= n_candidates <= N, got n_candidates="
                         f"{n_candidates} for N={N} pairs; lower n_candidates or use recall_at_k")
    gt = S.diagonal()  # (N,)
    rows = torch.arange(N)[:, None]  # (N, 1)
    totals = {}
    for _ in range(repeats):
        keys = torch.rand((N, N), generator=generator)  # (N, N)
        keys.fill_diagonal_(2.0)  # never pick the ground truth as a distractor
        others = keys.topk(n_candidates - 1, dim=1, largest=False).indices  # (N, n-1)
        rank_t2p = (S[rows, others] >= gt[:, None]).sum(1) + 1  # (N,) S[i, others[i]]: poses for text i
        rank_p2t = (S[others, rows] >= gt[:, None]).sum(1) + 1  # (N,) S[others[j], j]: texts for pose j
        for key, value in _recall_hits(rank_t2p, rank_p2t, ks).items():
            totals[key] = totals.get(key, 0.0) + value / repeats  # (N,)
    return totals if per_query else {key: float(hits.mean()) for key, hits in totals.items()}


# ----------------------------------------------------------------------------------------------------
# Statistics for honest tables: paired standard errors and rank agreement


def paired_change(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """Mean change and its standard error over the SAME test items, (n,) x2 -> (mean, se).

    se = std(after - before) / sqrt(n) with the sample std: the pairing removes the spread between
    items, which is much larger than the effect of one training stage (an unpaired error would hide it)."""
    if before.shape != after.shape or before.dim() != 1:
        raise ValueError(f"paired_change expects two (n,) tensors of per-item values, got "
                         f"{tuple(before.shape)} and {tuple(after.shape)}")
    d = (after.double() - before.double())  # (n,)
    se = d.std(unbiased=True).item() / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return d.mean().item(), se


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..G of each row (P, G), ties sharing their average rank (Spearman's convention)."""
    less = (x[:, None, :] < x[:, :, None]).sum(-1).double()  # (P, G) how many are smaller
    equal = (x[:, None, :] == x[:, :, None]).sum(-1).double()  # (P, G) how many tie, itself included
    return less + (equal + 1) / 2  # (P, G)


def group_rank_correlation(a: torch.Tensor, b: torch.Tensor, G: int) -> tuple[float, int]:
    """Spearman's rank correlation between two scores of the same candidates within each group of G
    (one prompt's candidates), averaged over the groups where both scores vary. (N,) x2 -> (mean, groups).

    This is how well one reward ranks a prompt's candidates the way another does: HyGRPO only ever uses
    a reward through its ranks and gaps inside a group (Eq. 16), so this, not a global correlation, says
    whether optimising the learned semantic reward (Eq. 8) improves what the exact checker measures.
    Returns (nan, 0) when no group has variation in both."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() % G:
        raise ValueError(f"group_rank_correlation expects two (P * G,) tensors with G={G}, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _average_ranks(a.view(-1, G).double()), _average_ranks(b.view(-1, G).double())  # (P, G)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)  # (P, G)
    denom = (ra.square().sum(1) * rb.square().sum(1)).sqrt()  # (P,)
    varies = denom > 0  # (P,)
    if not varies.any():
        return float("nan"), 0
    rho = (ra * rb).sum(1)[varies] / denom[varies]  # (p,)
    return rho.mean().item(), int(varies.sum())


# ----------------------------------------------------------------------------------------------------
# Evaluating a policy (the tables of Sec. 4.2, for PoseWorld and, when given, 3DPW / Human3.6M)
#
# The policy answers every prompt greedily (temperature 0) and its pose is the MEAN of the Gaussian
# head (Eq. 2): evaluation measures the policy's best guess, not one random draw. A pose-task answer
# without <POSE> has no pose; it counts in the format rate, and its pose is taken as the rest pose (all
# identity rotations), so a model cannot improve MPJPE by refusing to answer.


def _mean_poses(policy, samples, tokenizer, device, max_new_tokens=32):
    """Greedy answers and mean poses for a list of sample dicts: (texts, mu (n, 144), valid (n,))."""
    policy.eval()
    batch = data.to_device(data.collate_fn(tokenizer, policy, True)(samples), device)
    rollout = M.sample_policy(policy, batch, 1, max_new_tokens, temperature=0.0)
    texts = M.answer_texts(rollout, tokenizer)  # (n,)
    rest = torch.tensor([1.0, 0, 0, 0, 1, 0], device=device).repeat(24)  # (144,) identity rotations
    mu = torch.where(rollout.valid[:, None], rollout.mu, rest)  # (n, 144)
    return texts, mu, rollout.valid


def mean_pose(poses: torch.Tensor) -> torch.Tensor:
    """The average pose of a set, as the head's rot6d numbers: the mean of each joint's rot6d over the
    set, made a rotation again by Gram-Schmidt (model.py's rot6d convention). (n, 24, 3) axis-angle
    -> (144,). What a model that ignores its input would best answer: the trivial baseline."""
    six = M.pose_to_rot6d(poses.double()).mean(0).view(24, 6)  # (24, 6) each joint's mean rot6d
    return smpl.matrix_to_rot6d(smpl.rot6d_to_matrix(six)).flatten().float()  # (144,) a rotation again


@torch.no_grad()
def refuse_nonfinite_weights(policy):
    """A model with NaN or infinite weights is an error, not a row of ordinary figures: its NaN poses
    would fail the format check, become the rest pose, and score like a weak but healthy model."""
    if not isinstance(policy, torch.nn.Module):  # a stand-in (tests) has no weights to check
        return
    bad = [name for name, t in policy.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"the model's weights are not finite (NaN or inf) in {len(bad)} tensors, e.g. "
                         f"{', '.join(bad[:3])}: it cannot be evaluated (was it saved from a diverged run?)")


def evaluate(policy, tokenizer, dataset, body_model, retrievers: dict, embedder, limit: int | None = None,
             batch_size: int = 64, device="cpu", progress: bool = True, seed: int = 0,
             baseline_poses: dict | None = None, agreement_prompts: int = 0, G: int = 8) -> dict:
    """All metrics of a policy on a PoseWorld split (the first `limit` samples; all of them by default).

    retrievers: {"eval": ..., "reward": ...} text-pose retrieval models (rewards.PoseTextRetriever); the
    "eval" one never gave a reward (trained on the other half of the captions), so it is the honest judge.
    embedder: the text embedder of the text reward (Eq. 10), reused for the VQA answer similarity.
    baseline_poses: {"i2p": (n, 24, 3), "t2p": (n, 24, 3)} training poses (axis-angle) of each task; their
    average pose (mean_pose) is scored like an answer, as `i2p_mean_pose_mpjpe_mm` and
    `t2p_mean_pose_posecode_acc`: the trivial baselines a policy must beat. Image-to-pose also gives
    `i2p_spread_mm` (spread: how much the answers depend on the image) and the ground truth's,
    `i2p_gt_spread_mm`.
    agreement_prompts: for this many text-to-pose prompts, G poses are SAMPLED from the policy (as RFT
    does) and each retriever's cosine is compared with the exact posecode check by the rank correlation
    within each prompt's G (group_rank_correlation): `t2p_agree_{name}`, how far the semantic reward
    (Eq. 8) points where the checker does. 0 (the default) skips it.
    Returns a flat dict of floats (errors in mm, recalls and rates in percent) plus sample counts, and
    "items": {metric: per-item values (list)} so two evaluations of the same items can be paired
    (paired_change, format_comparison).
    """
    refuse_nonfinite_weights(policy)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    idx = list(range(n))
    texts, mus, valids = [], [], []
    for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, leave=False):
        samples = [dataset[i] for i in idx[start:start + batch_size]]
        t, mu, v = _mean_poses(policy, samples, tokenizer, device)
        texts += t
        mus.append(mu)
        valids.append(v)
    mu, valid = torch.cat(mus), torch.cat(valids)  # (n, 144), (n,)
    joints = smpl.pose_joints(mu, body_model).cpu()  # (n, 24, 3)
    task = [data.TASKS[int(t)] for t in dataset.task_id[:n]]
    out = {"n": n}
    items = {}
    pose_rows = [i for i in idx if task[i] in ("t2p", "i2p")]
    fmt = rewards.format_reward([texts[i] for i in pose_rows]) if pose_rows else torch.zeros(0)  # (m,)
    out["format_rate"] = 100 * fmt.mean().item() if pose_rows else float("nan")
    items["format_rate"] = (100 * fmt).tolist()

    def baseline_joints(name, m):  # (m, 24, 3) the average training pose of a task, m times
        six = mean_pose(baseline_poses[name]).to(device).expand(m, 144)  # (m, 144)
        return smpl.pose_joints(six, body_model).cpu()

    # image-to-pose: MPJPE / PA-MPJPE against the ground truth of the same (built-in) body model
    i2p = [i for i in idx if task[i] == "i2p"]
    if i2p:
        gt = dataset.joints[i2p]  # (m, 24, 3) camera frame, like the prediction
        out["i2p_n"] = len(i2p)
        items["i2p_mpjpe_mm"] = (1000 * mpjpe(joints[i2p], gt)).tolist()
        items["i2p_pa_mpjpe_mm"] = (1000 * pa_mpjpe(joints[i2p], gt)).tolist()
        if baseline_poses is not None:
            out["i2p_mean_pose_mpjpe_mm"] = 1000 * mpjpe(baseline_joints("i2p", len(i2p)), gt).mean().item()
        # how much the answers depend on the image (0 = one pose for every image); the ground truth's for scale
        items["i2p_spread_mm"] = (1000 * spread(joints[i2p])).tolist()
        out["i2p_gt_spread_mm"] = 1000 * spread(gt).mean().item()

    # text-to-pose: R@K of (caption, generated pose) pairs under both protocols, both retrievers, and
    # PoseWorld's exact posecode accuracy (no learned model involved)
    t2p = [i for i in idx if task[i] == "t2p"]
    if t2p:
        captions = [dataset.captions[i] for i in t2p]
        body = data.body_frame_joints(joints[t2p])  # (m, 24, 3) the retrievers see pose, not view
        out["t2p_n"] = len(t2p)
        for name, retriever in retrievers.items():
            text_emb = retriever.encode_text(captions).cpu()  # (m, d)
            pose_emb = retriever.encode_pose(body).cpu()  # (m, d)
            for k, v in recall_at_k(text_emb, pose_emb, per_query=True).items():
                items[f"t2p_full_{name}_{k}"] = v.tolist()
            if len(t2p) >= 32:  # the protocol draws 31 distractors per query
                g = torch.Generator().manual_seed(seed)
                for k, v in recall_at_k_sampled(text_emb, pose_emb, generator=g, per_query=True).items():
                    items[f"t2p_sampled_{name}_{k}"] = v.tolist()
        acc = data.check_posecodes(joints[t2p], dataset.codes[t2p], dataset.mentioned[t2p])  # (m,)
        items["t2p_posecode_acc"] = (100 * acc).tolist()
        if baseline_poses is not None:
            base = data.check_posecodes(baseline_joints("t2p", len(t2p)), dataset.codes[t2p],
                                        dataset.mentioned[t2p])  # (m,)
            out["t2p_mean_pose_posecode_acc"] = 100 * base.mean().item()
        if agreement_prompts > 0:
            out.update(_agreement(policy, tokenizer, dataset, t2p[:agreement_prompts], body_model, retrievers,
                                  G, device, seed))

    # VQA: the text reward's similarity (Eq. 10) between the answer and the reference, and exact match
    vqa = [i for i in idx if task[i] == "vqa"]
    if vqa:
        preds, refs = [texts[i] for i in vqa], [dataset.answers[i] for i in vqa]
        out["vqa_n"] = len(vqa)
        items["vqa_text_sim"] = (100 * rewards.text_similarity(embedder, preds, refs)).tolist()
        items["vqa_exact"] = [100.0 * (p.strip() == r.strip()) for p, r in zip(preds, refs)]
    for key, values in items.items():
        out[key] = sum(values) / len(values) if values else float("nan")
    out["items"] = items
    return out


def perturbed_agreement(retriever, dataset, n_prompts: int = 200, G: int = 8, noise: float = 0.15,
                        seed: int = 0) -> float:
    """The retriever-checker rank agreement without a policy: for the first n_prompts text-to-pose
    captions of a PoseWorld split, G poses made by adding N(0, noise^2) radians to each body joint's
    axis-angle of the caption's own pose (the root kept), ranked by the retriever's cosine (Eq. 8) and by
    the exact check; group_rank_correlation of the two. train_sft.py logs it for both retrievers, so
    the semantic reward's quality is known before any RFT. -> Spearman's rho (float)."""
    rows = dataset.task_indices("t2p")[:n_prompts]  # (P,)
    g = torch.Generator().manual_seed(seed)
    pose = dataset.pose_body[rows].repeat_interleave(G, 0).clone()  # (P*G, 24, 3)
    pose[:, 1:] += noise * torch.randn(pose[:, 1:].shape, generator=g)
    return checker_agreement(retriever, dataset, rows, smpl.pose_joints(pose), G)


def checker_agreement(retriever, dataset, rows, joints, G: int) -> float:
    """Spearman's rho within each prompt's G poses between the retriever's cosine (Eq. 8) and PoseWorld's
    exact posecode check, averaged over prompts. rows (P,) t2p indices into the PoseWorld dataset,
    joints (P*G, 24, 3) the poses, prompt-major. -> float"""
    check = data.check_posecodes(joints, dataset.codes[rows].repeat_interleave(G, 0),
                                 dataset.mentioned[rows].repeat_interleave(G, 0))  # (P*G,)
    captions = [dataset.captions[i] for i in torch.as_tensor(rows).tolist() for _ in range(G)]
    cos = rewards.semantic_reward(retriever, captions, joints)  # (P*G,)
    return group_rank_correlation(cos, check, G)[0]


def _agreement(policy, tokenizer, dataset, rows, body_model, retrievers, G, device, seed) -> dict:
    """Rank agreement between each retriever's cosine and the exact posecode check over G sampled poses
    per text-to-pose prompt (see `evaluate`)."""
    samples = [dataset[i] for i in rows]
    batch = data.to_device(data.collate_fn(tokenizer, policy, True)(samples), device)
    g = torch.Generator(device=device).manual_seed(seed)
    rollout = M.sample_policy(policy, batch, G, 24, temperature=1.0, generator=g)  # N = len(rows) * G
    joints = smpl.pose_joints(rollout.pose, body_model).cpu()  # (N, 24, 3)
    return {f"t2p_agree_{name}": checker_agreement(retriever, dataset, rows, joints, G)
            for name, retriever in retrievers.items()}


def _has_h36m(body_model) -> bool:
    return body_model is not None and body_model.has_mesh and "h36m" in getattr(body_model, "extra_regressor_names", ())


def _gendered_h36m17(gt_body_models, pose, betas, genders):
    """The 17 H3.6M-regressor joints of the ground-truth meshes, each actor through the SMPL model of its
    gender (3DPW's `genders`, 'm' / 'f'). pose (b, 24, 3), betas (b, 10) -> (b, 17, 3)"""
    out = None
    for g, body in gt_body_models.items():
        rows = [i for i, x in enumerate(genders) if str(x)[:1].lower() == g]
        if not rows:
            continue
        idx = torch.tensor(rows, device=pose.device)  # (r,)
        j = body(pose[idx, 1:], pose[idx, 0], betas=betas[idx]).extra["h36m"]  # (r, 17, 3)
        out = j.new_zeros(pose.shape[0], 17, 3) if out is None else out  # (b, 17, 3)
        out[idx] = j
    unknown = sorted({str(x) for x in genders if str(x)[:1].lower() not in gt_body_models})
    if unknown:
        raise ValueError(f"3DPW genders {unknown}: no SMPL model for them (expected 'm' / 'f')")
    return out


@torch.no_grad()
def evaluate_real_i2p(policy, tokenizer, dataset, body_model, name: str, limit: int | None = None,
                      batch_size: int = 32, device="cpu", progress: bool = True,
                      gt_body_models: dict | None = None) -> dict:
    """MPJPE / PA-MPJPE on a real image-to-pose test set (3DPW or Human3.6M from data.py).

    The published protocol (SPIN eval.py, run_evaluation; 4D-Humans hmr2/utils/pose_utils.py, Evaluator
    with PELVIS_IND 39 and the 14-joint KEYPOINT_LIST of hmr2/configs/datasets_eval.yaml): the 17 joints
    of J_regressor_h36m on each mesh, both skeletons centred on their own H3.6M pelvis (regressor joint 0:
    SPIN's `pred_pelvis` / `gt_pelvis`), then the 14 LSP joints measured (smpl.lsp14_from_h36m). The
    pelvis is not one of the 14, so this is NOT the mid-hip alignment of the original HMR. Human3.6M's
    ground truth is the file's 14 joints minus the file's pelvis (zero in the public, root-centred files).

    body_model: the NEUTRAL SMPL (with the "h36m" extra regressor) for the prediction; our pose head
    predicts the pose only, so the predicted mesh uses the mean shape (betas = 0).
    gt_body_models: {"m": male SMPL, "f": female SMPL}, each with the "h36m" regressor. 3DPW's ground
    truth is each actor's mesh under the SMPL model of its gender (SPIN builds it with smpl_male /
    smpl_female); only with them are the 3DPW numbers those of the published protocol (keys
    3dpw_mpjpe_mm, ...). Without them the ground truth goes through the neutral model, and the numbers are
    reported under 3dpw_approx_* with "APPROXIMATE" in the protocol string, never under the published keys.
    Without any mesh, 3DPW falls back to the 24 SMPL joints aligned on the pelvis (also approximate).
    """
    policy.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    use14 = _has_h36m(body_model)
    if name == "h36m" and not use14:
        raise SystemExit("Human3.6M evaluation needs the 14 H3.6M-regressor joints: pass --smpl_path and "
                         "--h36m_regressor (J_regressor_h36m.npy)")
    gendered = (use14 and gt_body_models is not None and set(gt_body_models) == {"m", "f"}
                and all(_has_h36m(b) for b in gt_body_models.values()))
    if gt_body_models is not None and not gendered:
        raise ValueError("gt_body_models must be {'m': male SMPL, 'f': female SMPL}, each loaded with the h36m "
                         "regressor, beside a neutral body_model that has it too")
    errs, pa_errs = [], []
    for start in tqdm(range(0, n, batch_size), desc=f"eval {name}", disable=not progress, leave=False):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        _, mu, _ = _mean_poses(policy, samples, tokenizer, device)
        R = smpl.rot6d_to_matrix(mu.view(-1, 24, 6))  # (b, 24, 3, 3)
        if use14:
            # pelvis-centred by lsp14_from_h36m (SPIN: pred_keypoints_3d - pred_pelvis), so root=None below
            pred = smpl.lsp14_from_h36m(body_model(R[:, 1:], R[:, 0]).extra["h36m"])  # (b, 14, 3)
            if "joints14" in samples[0]:  # Human3.6M: the file's joints, centred on the file's pelvis
                gt = torch.stack([s["joints14"] - s["pelvis"] for s in samples]).to(pred)  # (b, 14, 3)
            else:  # 3DPW: the GT mesh of the GT pose and shape, gendered when the models are given
                pose = torch.stack([s["pose"] for s in samples]).to(device)  # (b, 24, 3)
                betas = torch.stack([s["betas"] for s in samples]).to(device)  # (b, 10)
                if gendered:
                    gt17 = _gendered_h36m17(gt_body_models, pose, betas, [s["gender"] for s in samples])
                else:
                    gt17 = body_model(pose[:, 1:], pose[:, 0], betas=betas).extra["h36m"]  # (b, 17, 3)
                gt = smpl.lsp14_from_h36m(gt17)  # (b, 14, 3)
            root = None
        else:
            pred = body_model(R[:, 1:], R[:, 0], return_vertices=False).joints  # (b, 24, 3)
            gt = torch.stack([s["joints"] for s in samples]).to(pred)  # (b, 24, 3)
            root = 0
        errs.append(mpjpe(pred.cpu(), gt.cpu(), root=root))
        pa_errs.append(pa_mpjpe(pred.cpu(), gt.cpu()))
    if not use14:
        protocol = "APPROXIMATE: 24 SMPL joints, pelvis aligned (no SMPL mesh given; not the published protocol)"
    elif name == "3dpw" and not gendered:
        protocol = ("APPROXIMATE: 14 LSP joints (H3.6M regressor), H3.6M-pelvis aligned, ground truth through "
                    "the NEUTRAL SMPL (the published protocol needs the male and female models)")
    else:
        protocol = "14 LSP joints (H3.6M regressor), H3.6M-pelvis aligned (SPIN / HMR2.0 protocol)"
    key = name if protocol.startswith("14 LSP") else f"{name}_approx"  # approximate numbers never pose as published
    return {f"{name}_n": n, f"{key}_mpjpe_mm": 1000 * torch.cat(errs).mean().item(),
            f"{key}_pa_mpjpe_mm": 1000 * torch.cat(pa_errs).mean().item(), f"{name}_protocol": protocol}


# ----------------------------------------------------------------------------------------------------
# Tables

# (key, label, True if lower is better, None if neither); recall keys are filled in for each protocol and retriever
_ROWS = [("i2p_mpjpe_mm", "Image-to-pose MPJPE (mm)", True),
         ("i2p_pa_mpjpe_mm", "Image-to-pose PA-MPJPE (mm)", True),
         ("i2p_spread_mm", "Image-to-pose answers' spread (mm; the ground truth's is below)", None),
         ("3dpw_mpjpe_mm", "3DPW MPJPE (mm)", True), ("3dpw_pa_mpjpe_mm", "3DPW PA-MPJPE (mm)", True),
         ("3dpw_approx_mpjpe_mm", "3DPW MPJPE (mm), APPROXIMATE: not the published protocol", True),
         ("3dpw_approx_pa_mpjpe_mm", "3DPW PA-MPJPE (mm), APPROXIMATE: not the published protocol", True),
         ("h36m_mpjpe_mm", "Human3.6M MPJPE (mm)", True), ("h36m_pa_mpjpe_mm", "Human3.6M PA-MPJPE (mm)", True)]
for _proto in ("full", "sampled"):
    for _ret in ("eval", "reward"):
        for _dir in ("t2p", "p2t"):
            _ROWS.append((f"t2p_{_proto}_{_ret}_{_dir}@", f"Text-to-pose R^{_dir.upper()} @5/10/20, "
                          f"{_proto} retrieval, {_ret} retriever", False))
_ROWS += [("t2p_posecode_acc", "Text-to-pose posecode accuracy (%)", False),
          ("t2p_agree_reward", "Rank agreement of the reward retriever with the checker (Spearman x100)", False),
          ("t2p_agree_eval", "Rank agreement of the eval retriever with the checker (Spearman x100)", False),
          ("vqa_text_sim", "VQA answer similarity (text reward's E, x100)", False),
          ("vqa_exact", "VQA exact answers (%)", False),
          ("format_rate", "Format rate, pose tasks (%)", False)]


_BASELINES = [("i2p_mean_pose_mpjpe_mm", "Image-to-pose MPJPE of always answering the average training pose (mm)"),
              ("i2p_gt_spread_mm", "Image-to-pose spread of the ground-truth poses (mm)"),
              ("t2p_mean_pose_posecode_acc", "Posecode accuracy of always answering the average training pose (%)")]
_SCALE = {"t2p_agree_reward": 100.0, "t2p_agree_eval": 100.0}  # shown x100 like the other columns


def _cell(results, key):
    keys = [f"{key}{k}" for k in (5, 10, 20)] if key.endswith("@") else [key]
    vals = [results.get(k) for k in keys]
    if any(v is None for v in vals):
        return None, keys
    return [_SCALE.get(k, 1.0) * v for k, v in zip(keys, vals)], keys


def _change(before: dict, after: dict, key: str, scale: float) -> tuple[float, float | None]:
    """(after - before, its paired standard error or None): paired over the test items when both
    evaluations carry the per-item values of the same items, else the plain difference."""
    b, a = (before.get("items") or {}).get(key), (after.get("items") or {}).get(key)
    if b is not None and a is not None and len(a) == len(b) > 1:
        mean, se = paired_change(torch.tensor(b), torch.tensor(a))
        return mean * scale, se * scale
    return (after[key] - before[key]) * scale, None


def format_comparison(before: dict, after: dict | None = None, title: str = "") -> str:
    """A Markdown table of the metrics, in the order of the paper's tables; with `after`, the change with
    its paired standard error over the same test items, and a verdict: "better" / "worse" only when
    the change exceeds twice its standard error, else "within noise" (an honest table: a regression is
    marked as such, and so is a change that noise alone could make). A row without per-item values
    (no standard error) gets the plain verdict. A row that is neither better higher nor lower (the
    image-to-pose answers' spread: less than the ground truth's is too little image dependence, more is
    noise) reads "higher" / "lower". The trivial baselines and the ground truth's spread follow."""
    head = "| metric | before | after | change (paired s.e.) |\n| --- | --- | --- | --- |" if after else \
        "| metric | value |\n| --- | --- |"
    lines = [f"**{title}**\n" if title else "", head]
    fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    for key, label, lower_better in _ROWS:
        b, keys = _cell(before, key)
        if b is None:
            continue
        if after is None:
            lines.append(f"| {label} | {fmt(b)} |")
            continue
        a, _ = _cell(after, key)
        if a is None:
            continue
        cells, verdicts = [], []
        for k in keys:
            d, se = _change(before, after, k, _SCALE.get(k, 1.0))
            cells.append(f"{d:+.1f}" + (f" ({se:.1f})" if se is not None else ""))
            if abs(d) < 0.05:
                verdicts.append("same")
            elif se is not None and abs(d) <= 2 * se:
                verdicts.append("within noise")
            else:
                verdicts.append(("lower" if d < 0 else "higher") if lower_better is None
                                else "better" if (d < 0) == lower_better else "worse")
        verdict = verdicts[0] if len(set(verdicts)) == 1 else "mixed"
        lines.append(f"| {label} | {fmt(b)} | {fmt(a)} | {' / '.join(cells)} ({verdict}) |")
    for key, label in _BASELINES:
        if key in before:
            lines.append(f"| {label} | {before[key]:.1f} |" + (" | |" if after is not None else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Several runs: the gain of RFT per seed, its mean and standard error over seeds (python eval.py --compare)

COMPARE_KEYS = [("t2p_posecode_acc", "posecode accuracy (%)", False),
                ("t2p_sampled_eval_t2p@10", "R^T2P@10 sampled, eval retriever (%)", False),
                ("t2p_sampled_reward_t2p@10", "R^T2P@10 sampled, reward retriever (%)", False),
                ("i2p_mpjpe_mm", "image-to-pose MPJPE (mm)", True),
                ("i2p_pa_mpjpe_mm", "image-to-pose PA-MPJPE (mm)", True),
                ("i2p_spread_mm", "image-to-pose answers' spread (mm)", None),
                ("t2p_agree_reward", "reward retriever-checker agreement (Spearman)", False),
                ("vqa_text_sim", "VQA answer similarity (x100)", False),
                ("format_rate", "format rate (%)", False)]


def _mean_se(xs: list) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of a list of numbers; se is nan for one number."""
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), (t.std(unbiased=True).item() / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


def compare_runs(groups: dict) -> str:
    """A Markdown table of RFT runs, one group of runs (one per seed) per column: for each metric, the
    mean over seeds before and after, the mean gain with its standard error over seeds, and each seed's
    paired gain with its standard error over the test items. With two groups run on the same seeds (in
    the same order), a last column gives the per-seed difference of their gains, mean +- s.e.

    groups: {label: [run folder, ...]}; each folder holds eval_before.json and eval_after.json."""
    loaded = {}
    for label, runs in groups.items():
        loaded[label] = []
        for run in runs:
            pair = []
            for name in ("eval_before.json", "eval_after.json"):
                path = os.path.join(run, name)
                if not os.path.isfile(path):
                    raise SystemExit(f"--compare: {path} not found (a finished train_rft.py run writes it)")
                with open(path) as f:
                    pair.append(json.load(f))
            loaded[label].append(pair)
    labels = list(loaded)
    two = len(labels) == 2 and len(loaded[labels[0]]) == len(loaded[labels[1]])
    head = "| metric | " + " | ".join(f"{g}: before -> after, gain (s.e. over seeds) [per seed]" for g in labels)
    head += (f" | {labels[1]} - {labels[0]} gain |" if two else " |")
    lines = [head, "|" + " --- |" * (len(labels) + 1 + two)]
    for key, label, lower_better in COMPARE_KEYS:
        cells, gains = [], {}
        for g in labels:
            runs = loaded[g]
            if not all(key in b and key in a for b, a in runs):
                cells.append("")
                continue
            per_seed = [_change(b, a, key, 1.0) for b, a in runs]  # (gain, paired s.e. or None)
            gains[g] = [d for d, _ in per_seed]
            mb, _ = _mean_se([b[key] for b, _ in runs])
            ma, _ = _mean_se([a[key] for _, a in runs])
            mg, sg = _mean_se(gains[g])
            seeds = ", ".join(f"{d:+.2f}" + (f" ({se:.2f})" if se is not None else "") for d, se in per_seed)
            cells.append(f"{mb:.2f} -> {ma:.2f}, {mg:+.2f} ({sg:.2f}) [{seeds}]")
        row = f"| {label} | " + " | ".join(cells)
        if two:
            if all(g in gains for g in labels):
                md, sd = _mean_se([y - x for x, y in zip(gains[labels[0]], gains[labels[1]])])
                row += f" | {md:+.2f} ({sd:.2f})"
            else:
                row += " | "
        lines.append(row + " |")
    return "\n".join(lines)


def _mrecall(protocol: str, retriever: str, direction: str):
    """mRecall (Table 3): the mean of R@5, R@10 and R@20 of one protocol, retriever and direction."""
    keys = [f"t2p_{protocol}_{retriever}_{direction}@{k}" for k in (5, 10, 20)]
    return lambda r: sum(r[k] for k in keys) / 3 if all(k in r for k in keys) else None


def _key(key: str):
    return lambda r: r.get(key)


# The paper's tables on PoseWorld: columns (header, value of one eval.json, lower is better). mRecall is the
# mean of R@5/10/20 under the random-sampling protocol (each caption against 31 others), eval retriever.
PAPER_TABLES = {
    "3": [("MPJPE (mm)", _key("i2p_mpjpe_mm"), True), ("PA-MPJPE (mm)", _key("i2p_pa_mpjpe_mm"), True),
          ("posecode accuracy (%)", _key("t2p_posecode_acc"), False),
          ("mRecall T2P (%)", _mrecall("sampled", "eval", "t2p"), False),
          ("mRecall P2T (%)", _mrecall("sampled", "eval", "p2t"), False)],
    "6": [("R^T2P@10, reward retriever (%)", _key("t2p_sampled_reward_t2p@10"), False),
          ("R^T2P@10, eval retriever (%)", _key("t2p_sampled_eval_t2p@10"), False),
          ("mRecall T2P, reward retriever (%)", _mrecall("sampled", "reward", "t2p"), False),
          ("mRecall T2P, eval retriever (%)", _mrecall("sampled", "eval", "t2p"), False),
          ("posecode accuracy (%)", _key("t2p_posecode_acc"), False)],
}


def _eval_json(path: str) -> dict:
    """An evaluation's numbers: a JSON file (eval.json, eval_before.json, eval_after.json) or a folder
    holding eval.json."""
    file = os.path.join(path, "eval.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"--table: {file} not found (eval.py --ckpt writes eval.json; train_rft.py writes "
                         f"eval_before.json and eval_after.json)")
    with open(file) as f:
        return json.load(f)


def paper_table(which: str, groups: dict) -> str:
    """Table 3 or Table 6 of the paper on PoseWorld, one row per group of evaluations (one per seed, the
    same seeds in the same order in every group): each metric's mean over the seeds with its standard
    error, and from the second row on, the change from the row above, mean of the per-seed differences
    (s.e.); marked * when it exceeds twice its standard error.

    which: "3" or "6"; groups: {row label: [eval json or folder, ...]}."""
    if which not in PAPER_TABLES:
        raise SystemExit(f"--table={which}: the tables are {', '.join(PAPER_TABLES)}")
    columns = PAPER_TABLES[which]
    rows = {label: [_eval_json(p) for p in paths] for label, paths in groups.items()}
    sizes = {len(v) for v in rows.values()}
    if len(sizes) != 1:
        raise SystemExit(f"--table: every row needs the same seeds in the same order; got {sizes} runs per row")
    lines = ["| | " + " | ".join(name for name, _, _ in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    previous = None
    for label, results in rows.items():
        cells = []
        for c, (name, value, lower_better) in enumerate(columns):
            xs = [value(r) for r in results]
            if any(x is None for x in xs):
                cells.append("")
                continue
            m, se = _mean_se(xs)
            cell = f"{m:.1f}" + (f" ({se:.1f})" if len(xs) > 1 else "")
            if previous is not None and all(value(r) is not None for r in previous):
                d, sd = _mean_se([x - value(r) for x, r in zip(xs, previous)])
                beyond = len(xs) > 1 and abs(d) > 2 * sd
                cell += f", {d:+.1f}" + (f" ({sd:.1f})" if len(xs) > 1 else "") + ("*" if beyond else "")
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        previous = results
    n = sizes.pop()
    lines.append(f"\nMean over {n} seed(s) (standard error over seeds); from the second row, the change from the "
                 f"row above, mean (s.e.) of the per-seed differences, * where it exceeds twice its s.e.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line: python eval.py --ckpt=out/tiny-rft


def main(argv=None):
    """Evaluate a checkpoint: PoseWorld test (image-to-pose, text-to-pose with both retrievers under both
    protocols, posecode accuracy, VQA, format), plus 3DPW / Human3.6M test when their paths are given.
    Prints the table and writes eval.json and eval.md next to the checkpoint (or to --out_dir)."""

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("--table"):  # python eval.py --table=3 LABEL=a0.json,a1.json LABEL=...
        which = argv[0].partition("=")[2]
        groups = {}
        for spec in argv[1:]:
            label, _, paths = spec.partition("=")
            if not paths or spec.startswith("--"):
                raise SystemExit("usage: python eval.py --table=3|6 ROW=eval_seed0.json,eval_seed1.json,... ROW2=...")
            groups[label] = [p for p in paths.split(",") if p]
        if not groups:
            raise SystemExit("usage: python eval.py --table=3|6 ROW=eval_seed0.json,eval_seed1.json,... ROW2=...")
        table = paper_table(which, groups)
        print(table)
        return table
    if argv and argv[0] == "--compare":  # python eval.py --compare LABEL=out/a0,out/a1 LABEL=... [--figure=f.svg]
        groups, figure = {}, None
        for spec in argv[1:]:
            if spec.startswith("--figure="):
                figure = spec[len("--figure="):]
            elif not spec.startswith("--"):
                label, _, runs = spec.rpartition("=")
                groups[label or spec] = [r for r in runs.split(",") if r]
            else:
                groups = {}  # an unknown option: print the usage
                break
        if not groups or figure == "":
            raise SystemExit("usage: python eval.py --compare NAME=run_seed0,run_seed1,run_seed2 [NAME2=...] "
                             "[--figure=reward_curves.svg]")
        if figure:  # Fig. 4 / Table 5: the reward curves of the groups overlaid, from each run's metrics.jsonl
            paths = {label: [os.path.join(run, "metrics.jsonl") for run in runs] for label, runs in groups.items()}
            missing = [p for ps in paths.values() for p in ps if not os.path.isfile(p)]
            if missing:
                raise SystemExit(f"--figure: {missing[0]} not found (train_rft.py writes it in its out_dir)")
            write_svg(comparison_svg(paths), figure)
            print(f"wrote {figure}")
        table = compare_runs(groups)
        print(table)
        return table
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint folder written by train_sft.py / train_rft.py")
    p.add_argument("--retrievers", default="", help="folder holding retriever_eval/ and retriever_reward/ "
                   "(default: the checkpoint's SFT folder)")
    p.add_argument("--limit", type=int, default=None, help="first N test samples (default: all)")
    p.add_argument("--agreement_prompts", type=int, default=96, help="test captions whose G sampled poses "
                   "measure the retriever-checker rank agreement (0: skip)")
    p.add_argument("--split", default="test")
    p.add_argument("--out_dir", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--llava_path", default="")
    p.add_argument("--pose_encoder_path", default="")
    p.add_argument("--smpl_path", default="", help="official NEUTRAL SMPL file, for the prediction (needed for "
                   "3DPW/H36M protocols)")
    p.add_argument("--smpl_male_path", default="", help="official MALE SMPL file, for 3DPW's ground truth")
    p.add_argument("--smpl_female_path", default="", help="official FEMALE SMPL file, for 3DPW's ground truth")
    p.add_argument("--h36m_regressor", default="", help="J_regressor_h36m.npy for the 14-joint protocol")
    p.add_argument("--bge_path", default="", help="BAAI/bge-m3 folder for the VQA similarity")
    p.add_argument("--pw3d_root", default="", help="3DPW root (sequenceFiles/, imageFiles/)")
    p.add_argument("--h36m_npz", default="")
    p.add_argument("--h36m_images", default="")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        raise SystemExit(f"--limit={args.limit}: a positive number of test samples, or leave it out for all")
    if args.ckpt.startswith("--") or not os.path.isdir(args.ckpt):
        raise SystemExit(f"--ckpt: no checkpoint folder at {args.ckpt!r}")
    device = torch.device(args.device)
    policy, tokenizer, extra = M.load_checkpoint(args.ckpt, llava_path=args.llava_path or None,
                                                 pose_encoder_path=args.pose_encoder_path or None, device=device)
    cfg = (extra or {}).get("config", {})
    ret_dir = args.retrievers or (args.ckpt if os.path.isdir(os.path.join(args.ckpt, "retriever_eval"))
                                  else cfg.get("sft_dir", ""))
    retrievers = {name: rewards.PoseTextRetriever.load(os.path.join(ret_dir, f"retriever_{name}"), device=device)
                  for name in ("eval", "reward")}
    extra_regs = {"h36m": args.h36m_regressor} if args.h36m_regressor else None
    body_model = (smpl.SMPL.from_file(args.smpl_path, extra_regressors=extra_regs) if args.smpl_path
                  else smpl.SMPL()).to(device)
    if args.bge_path:
        embedder = rewards.BGEM3TextEmbedder(args.bge_path, device=device)
    else:  # the built-in stand-in for BGE-M3: the SFT model's mean-pooled hidden states (pi_ref in RFT)
        policy.requires_grad_(False)  # evaluation trains nothing
        if policy._reference is None:  # an SFT checkpoint: it is its own reference
            policy.freeze_reference()
        embedder = rewards.MeanPoolEmbedder(M.reference_hidden_states(policy), tokenizer, device=device)
    world = data.PoseWorld(args.split, seed=cfg.get("seed", 0), image_size=cfg.get("image_size", 64))
    train = data.PoseWorld("train", size=cfg.get("poseworld_size", 6000), seed=cfg.get("seed", 0),
                           image_size=cfg.get("image_size", 64))
    baseline_poses = {task: train.poses[train.task_indices(task)] for task in ("i2p", "t2p")}
    # PoseWorld is made with the built-in skeleton: measure it with the same body (data.py's note)
    results = evaluate(policy, tokenizer, world, smpl.SMPL().to(device), retrievers, embedder,
                       limit=args.limit, device=device, baseline_poses=baseline_poses,
                       agreement_prompts=args.agreement_prompts, G=cfg.get("G", 8))
    if args.pw3d_root:
        gt_models = None
        if args.smpl_male_path and args.smpl_female_path and extra_regs:
            gt_models = {g: smpl.SMPL.from_file(path, extra_regressors=extra_regs).to(device)
                         for g, path in (("m", args.smpl_male_path), ("f", args.smpl_female_path))}
        else:
            print("3DPW: without --smpl_male_path, --smpl_female_path and --h36m_regressor the ground truth is "
                  "not the published protocol's; the numbers are reported as APPROXIMATE (3dpw_approx_*)")
        results.update(evaluate_real_i2p(policy, tokenizer, data.ThreeDPW(args.pw3d_root, "test", images=True),
                                         body_model, "3dpw", args.limit, device=device, gt_body_models=gt_models))
    if args.h36m_npz:
        results.update(evaluate_real_i2p(policy, tokenizer,
                                         data.Human36M(args.h36m_npz, args.h36m_images, images=True),
                                         body_model, "h36m", args.limit, device=device))
    table = format_comparison(results, title=f"{args.ckpt} on PoseWorld {args.split}")
    out_dir = args.out_dir or args.ckpt
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return results


# ====================================================================================================
# File formats: not in the paper
#
# metrics.jsonl read back, and the reward curves written as plain SVG.
# ----------------------------------------------------------------------------------------------------
# Figures: reward curves (Fig. 4) as plain SVG, one panel per reward and task; no plotting library at run time

CURVE_SCALARS = ("kl_d", "kl_c_exact")  # besides reward/<name>/<task>: the two KL terms, when logged
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
PANEL_W, PANEL_H, PAD_L, PAD_R, PAD_T, PAD_B = 250, 170, 48, 12, 22, 38  # pixels


def read_metrics(path: str) -> list:
    """The rows of a metrics.jsonl, in step order (json reads the NaN that marks a step without that task)."""
    with open(path) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["step"])


def curve_keys(rows: list) -> list:
    """The panels' keys: every reward/<name>/<task> in the rows, then CURVE_SCALARS that are present."""
    keys = {k for r in rows for k in r}
    return sorted(k for k in keys if k.startswith("reward/")) + [k for k in CURVE_SCALARS if k in keys]


def running_mean(rows: list, key: str, window: int) -> tuple[list, list, list]:
    """(steps, raw, mean): the finite values of key and, at the same steps, the mean of the finite values
    of the last `window` rows. NaN (no prompt of that task in the step) is left out, never counted as 0."""
    vals = [r.get(key, float("nan")) for r in rows]
    ok = [v is not None and math.isfinite(v) for v in vals]
    steps, raw, mean = [], [], []
    for j, r in enumerate(rows):
        if not ok[j]:
            continue
        win = [v for v, o in zip(vals[max(0, j - window + 1):j + 1], ok[max(0, j - window + 1):j + 1]) if o]
        steps.append(r["step"])
        raw.append(vals[j])
        mean.append(sum(win) / len(win))
    return steps, raw, mean


def nice_ticks(lo: float, hi: float, n: int = 4) -> list:
    """About n round ticks (1, 2 or 5 x 10^k apart) whose first and last bracket [lo, hi]: the axis then
    spans the ticks, so no value falls outside its labelled range."""
    if not hi - lo > 1e-12 * max(1.0, abs(lo)):  # one value: widen so the axis has a length
        lo, hi = lo - max(abs(lo) * 0.1, 0.5), hi + max(abs(hi) * 0.1, 0.5)
    raw = (hi - lo) / n
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _fmt(t: float, ticks: list) -> str:
    """A tick label with as many decimals as the tick spacing needs (0.05 apart: 2; 20 apart: 0)."""
    d = max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9))
    return f"{t:.{d}f}"


def _panel(x0: float, y0: float, title: str, series: list) -> list:
    """One panel's SVG elements. series: dicts with steps, ys, colour, kind ("raw", "mean", "spread")
    and, for "spread", lo and hi. Axes span the round ticks of all values, the spread included."""
    xs = [s for d in series for s in d["steps"]]
    ys = [y for d in series for y in d.get("lo", []) + d.get("hi", []) + d["ys"]]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    w, h = PANEL_W - PAD_L - PAD_R, PANEL_H - PAD_T - PAD_B
    X = lambda s: x0 + PAD_L + w * (s - xt[0]) / (xt[-1] - xt[0])  # noqa: E731
    Y = lambda y: y0 + PAD_T + h * (yt[-1] - y) / (yt[-1] - yt[0])  # noqa: E731
    line = lambda st, vs: "M" + " L".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in zip(st, vs))  # noqa: E731
    left, bottom = X(xt[0]), Y(yt[0])
    out = [f'<g class="panel"><text class="title" x="{x0 + PAD_L}" y="{y0 + 14}" font-weight="bold">{title}</text>',
           f'<path class="axis" d="M{left:.1f},{Y(yt[-1]):.1f} V{bottom:.1f} H{X(xt[-1]):.1f}" stroke="black" '
           'fill="none"/>']
    for t in xt:
        out.append(f'<line class="xtick" x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{bottom:.1f}" y2="{bottom + 4:.1f}" '
                   f'stroke="black"/><text class="xtick" x="{X(t):.1f}" y="{bottom + 15:.1f}" '
                   f'text-anchor="middle">{_fmt(t, xt)}</text>')
    for t in yt:
        out.append(f'<line class="ytick" x1="{left - 4:.1f}" x2="{left:.1f}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" '
                   f'stroke="black"/><text class="ytick" x="{left - 6:.1f}" y="{Y(t) + 4:.1f}" '
                   f'text-anchor="end">{_fmt(t, yt)}</text>')
    out.append(f'<text class="xlabel" x="{x0 + PAD_L + w / 2:.1f}" y="{y0 + PANEL_H - 6:.1f}" '
               'text-anchor="middle">RFT step</text>')
    for d in series:  # the bands first, under every line: along hi, back along lo
        if d["kind"] == "spread":
            back = line(d["steps"][::-1], d["lo"][::-1])[1:]
            out.append(f'<path class="spread" d="{line(d["steps"], d["hi"])} L{back} Z" fill="{d["colour"]}" '
                       'fill-opacity="0.2" stroke="none"/>')
    for kind, style in (("raw", 'stroke-opacity="0.3"'), ("mean", 'stroke-width="2"')):  # the means on top
        out += [f'<path class="{kind}" d="{line(d["steps"], d["ys"])}" fill="none" stroke="{d["colour"]}" {style}/>'
                for d in series if d["kind"] == kind]
    return out + ["</g>"]


def _figure(title: str, panels: list, legend: list) -> str:
    """Panels in a grid of up to 3 columns under a header holding the title and the legend, wrapped to the
    figure's width (outside every data area). panels: (title, series); legend: (colour, text, kind)."""
    cols = min(3, max(1, len(panels)))
    W, x, y = cols * PANEL_W, 8, 26
    marks = ['<g class="legend">']
    for colour, text, kind in legend:
        width = 30 + 6.5 * len(text)  # about 6.5 px per character at 11 px
        if x > 8 and x + width > W:
            x, y = 8, y + 16
        if kind == "spread":
            mark = f'<rect x="{x}" y="{y}" width="18" height="10" fill="{colour}" fill-opacity="0.2"/>'
        else:
            mark = (f'<line x1="{x}" x2="{x + 18}" y1="{y + 5}" y2="{y + 5}" stroke="{colour}" '
                    + ('stroke-width="2"/>' if kind == "mean" else 'stroke-opacity="0.3"/>'))
        marks.append(mark + f'<text x="{x + 22}" y="{y + 9}">{escape(text)}</text>')
        x += width
    head, rows = y + 20, math.ceil(len(panels) / cols)  # the panels start below the legend
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{head + rows * PANEL_H}" '
           'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="8" y="16" font-size="13">{escape(title)}</text>'] + marks + ["</g>"]
    for i, (name, series) in enumerate(panels):
        r, c = divmod(i, cols)
        out += _panel(c * PANEL_W, head + r * PANEL_H, escape(name), series)
    return "\n".join(out + ["</svg>"])


def _panel_title(key: str) -> str:  # "reward/semantic/t2p" -> "semantic reward, t2p"
    parts = key.split("/")
    return f"{parts[1]} reward, {parts[2]}" if parts[0] == "reward" and len(parts) == 3 else key


def reward_curves_svg(rows: list, title: str = "reward per RFT step") -> str:
    """Fig. 4 for one run: a panel per reward and task (and per CURVE_SCALARS key), the value of each step
    drawn faintly and its running mean over ~10% of the steps solid."""
    window = max(1, round(0.1 * len(rows)))
    panels = []
    for key in curve_keys(rows):
        steps, raw, mean = running_mean(rows, key, window)
        if steps:  # a task never sampled has no panel
            panels.append((_panel_title(key), [dict(steps=steps, ys=raw, colour=COLOURS[0], kind="raw"),
                                               dict(steps=steps, ys=mean, colour=COLOURS[0], kind="mean")]))
    return _figure(title, panels, [(COLOURS[0], "each step", "raw"),
                                   (COLOURS[0], f"running mean of {window} steps", "mean")])


def comparison_svg(groups: dict, title: str = "reward per RFT step, mean over seeds") -> str:
    """Fig. 4 / Table 5 runs overlaid: groups {label: [metrics.jsonl path, one per seed]}. In each reward's
    panel, one line per label (the mean over its seeds of the running means) and the min-max of the seeds
    shaded, at the steps where every seed has a value (a seed stopped early, or without that task's prompt
    in a step, would otherwise make the mean jump)."""
    if not groups or not all(groups.values()):
        raise ValueError(f"comparison_svg: every label needs at least one metrics.jsonl; got {groups}")
    runs = {label: [read_metrics(p) for p in paths] for label, paths in groups.items()}
    window = max(1, round(0.1 * max(len(rows) for seeds in runs.values() for rows in seeds)))
    keys = sorted({k for seeds in runs.values() for rows in seeds for k in curve_keys(rows)},
                  key=lambda k: (not k.startswith("reward/"), k))
    panels = []
    for key in keys:
        series = []
        for i, (label, seeds) in enumerate(runs.items()):
            means = []  # per seed {step: running mean}
            for rows in seeds:
                steps, _, mean = running_mean(rows, key, window)
                means.append(dict(zip(steps, mean)))
            steps = sorted(set.intersection(*(set(m) for m in means)))
            if not steps:
                continue
            per_step = [[m[s] for m in means] for s in steps]
            colour = COLOURS[i % len(COLOURS)]
            if len(seeds) > 1:
                series.append(dict(steps=steps, ys=[], lo=[min(v) for v in per_step], hi=[max(v) for v in per_step],
                                   colour=colour, kind="spread"))
            series.append(dict(steps=steps, ys=[sum(v) / len(v) for v in per_step], colour=colour, kind="mean"))
        if series:
            panels.append((_panel_title(key), series))
    legend = [(COLOURS[i % len(COLOURS)], f"{label} ({len(seeds)} seed{'s' * (len(seeds) > 1)})", "mean")
              for i, (label, seeds) in enumerate(runs.items())]
    if any(len(seeds) > 1 for seeds in runs.values()):
        legend.append(("#000000", "shaded: min-max over seeds", "spread"))
    legend.append(("#000000", f"lines: running mean of {window} steps", "mean"))
    return _figure(title, panels, legend)


def write_svg(svg: str, path: str) -> None:
    """Write atomically (tmp file, then rename): a reader, or a run killed mid-write, never sees half a figure."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(svg)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
