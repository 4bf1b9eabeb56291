"""Evaluation: the paper's metrics (Sec. 4.1, "Metrics"; Tables 1, 2, 6), and PoseWorld's posecode accuracy
per family and body region (not in the paper; its exact checker).

Image-to-pose: MPJPE and PA-MPJPE, the mean Euclidean distance between predicted and ground-truth 3D
joints without and with Procrustes alignment (Table 1). Text-to-pose: Recall@K, K = 5, 10, 20, in
both directions, text-to-pose (R^T2P) and pose-to-text (R^P2T), under the two protocols of Table 2.

Figures: the reward curves of one run or of several runs over seeds (Fig. 4, Table 5) as plain SVG, one
panel per reward and task (`reward_curves_svg`, `comparison_svg`; `python eval.py --compare ... --figure=f.svg`).

The metric functions are pure functions over tensors and come first; then the evaluation of a policy,
the tables, the command line and --ask; the SVG figures last, under "File formats: not in the paper". Units:
joints in metres in, errors in metres out; printed tables multiply by 1000 for millimetres. Recalls are
in percent.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np
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
    """Ranks 1..group_size of each row (P, group_size), ties sharing their average rank (Spearman's convention)."""
    less = (x[:, None, :] < x[:, :, None]).sum(-1).double()  # (P, group_size) how many are smaller
    equal = (x[:, None, :] == x[:, :, None]).sum(-1).double()  # (P, group_size) how many tie, itself included
    return less + (equal + 1) / 2  # (P, group_size)


def group_rank_correlation(a: torch.Tensor, b: torch.Tensor, group_size: int) -> tuple[float, int]:
    """Spearman's rank correlation between two scores of the same candidates within each group of group_size
    (one prompt's candidates), averaged over the groups where both scores vary. (N,) x2 -> (mean, groups).

    This is how well one reward ranks a prompt's candidates the way another does: HyGRPO only ever uses
    a reward through its ranks and gaps inside a group (Eq. 16), so this, not a global correlation, says
    whether optimising the learned semantic reward (Eq. 8) improves what the exact checker measures.
    Returns (nan, 0) when no group has variation in both."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() % group_size:
        raise ValueError(f"group_rank_correlation expects two (P * group_size,) tensors with "
                         f"group_size={group_size}, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra = _average_ranks(a.view(-1, group_size).double())  # (P, group_size)
    rb = _average_ranks(b.view(-1, group_size).double())  # (P, group_size)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)  # (P, group_size)
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
    agreement_prompts: for this many text-to-pose prompts, G answers, one pose each, are SAMPLED from the
    policy (as RFT does) and each retriever's cosine is compared with the exact posecode check by the rank
    correlation within each prompt's G poses (group_rank_correlation): `t2p_agree_{name}`, how far the
    semantic reward (Eq. 8) points where the checker does. 0 (the default) skips it.
    Returns a flat dict of floats (errors in mm, recalls and rates in percent) plus sample counts, and
    "items": {metric: per-item values (list)} so two evaluations of the same items can be paired
    (paired_change, format_comparison). The posecode accuracy per family and body region (t2p_family/...,
    t2p_region/...) is listed above POSECODE_GROUPS.
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
        codes, mentioned = dataset.codes[t2p], dataset.mentioned[t2p]  # (m, K) each
        acc = data.check_posecodes(joints[t2p], codes, mentioned)  # (m,)
        items["t2p_posecode_acc"] = (100 * acc).tolist()
        # per family and body region (POSECODE_GROUPS): accuracy over the group's mentions, pooled
        hits, mentions = posecode_families(joints[t2p], codes, mentioned)  # (m, K + R) each
        for (key, _), h, n in zip(POSECODE_GROUPS, hits.T, mentions.T):
            out[f"{key}/n"] = int(n.sum())
            items[f"{key}/acc"] = _pooled_items(h, n)
        if baseline_poses is not None:
            base_joints = baseline_joints("t2p", len(t2p))  # (m, 24, 3)
            base = data.check_posecodes(base_joints, codes, mentioned)  # (m,)
            out["t2p_mean_pose_posecode_acc"] = 100 * base.mean().item()
            # informative mentions: those the average pose fails, what the model must take from the text
            base_hits, _ = posecode_families(base_joints, codes, mentioned)  # (m, K + R)
            informative = mentioned & (base_hits[:, :data.K] == 0)  # (m, K)
            info_hits, info_n = posecode_families(joints[t2p], codes, informative)  # (m, K + R) each
            for (key, _), hb, n, h, ni in zip(POSECODE_GROUPS, base_hits.T, mentions.T, info_hits.T, info_n.T):
                out[f"{key}/mean_pose_acc"] = 100 * hb.sum().item() / n.sum().item() if n.sum() else float("nan")
                out[f"{key}/informative_n"] = int(ni.sum())
                items[f"{key}/informative_acc"] = _pooled_items(h, ni)
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


# Posecode accuracy per family and per body region. evaluate's keys, for each group of POSECODE_GROUPS
# (t2p_family/<family of data.POSECODES> and t2p_region/<region of data.BODY_REGIONS>):
#   <group>/n                 the test captions' mentions of the group's codes
#   <group>/acc               the policy's accuracy (%) over those mentions, pooled (hits / mentions)
#   <group>/mean_pose_acc     the same for the average training pose (with baseline_poses)
#   <group>/informative_n     the informative mentions: those the average pose fails (with baseline_poses)
#   <group>/informative_acc   the policy's accuracy (%) on them: what it took from the text beyond the prior
# acc and informative_acc also have per-item lists in "items" (_pooled_items), for paired standard errors.
POSECODE_GROUPS = ([(f"t2p_family/{f.name}", f.name.replace("_", " ")) for f in data.POSECODES]
                   + [(f"t2p_region/{r}", r.replace("_", " ")) for r in data.BODY_REGIONS])  # (key, label)


def posecode_families(joints: torch.Tensor, codes: torch.Tensor, mentioned: torch.Tensor) -> tuple:
    """The mentioned codes that `joints` satisfy, per sample, by family and by body region: (hits,
    mentions), each (B, K + R) long counts, columns in POSECODE_GROUPS' order (the K families of
    data.POSECODES, then the R regions of data.BODY_REGIONS, each the sum of its families). joints
    (B, 24, 3), codes (B, K), mentioned (B, K) bool as for data.check_posecodes, whose share is a row's
    hits / mentions over the K family columns."""
    if codes.shape != mentioned.shape or codes.shape != (joints.shape[0], data.K):
        raise ValueError(f"posecode_families: expected joints (B, 24, 3), codes and mentioned (B, {data.K}); "
                         f"got {tuple(joints.shape)}, {tuple(codes.shape)}, {tuple(mentioned.shape)}")
    hit = (data.posecodes(joints) == codes) & mentioned  # (B, K)
    region = torch.tensor([[data.POSECODE_REGION[f.name] == r for r in data.BODY_REGIONS]
                           for f in data.POSECODES]).long()  # (K, R) one-hot
    both = torch.stack([hit, mentioned]).long()  # (2, B, K)
    both = torch.cat([both, both @ region], -1)  # (2, B, K + R)
    return both[0], both[1]


def _pooled_items(hits: torch.Tensor, mentions: torch.Tensor) -> list:
    """Per-item values of a pooled accuracy, for the items with mentions: 100 * hits_i / (mean mentions
    per such item), so their mean is 100 * sum(hits) / sum(mentions) and paired_change over two
    evaluations of the same items gives the change of that pooled accuracy with its s.e. (m,) x2 -> list."""
    rows = mentions > 0  # (m,)
    return (100.0 * hits[rows].double() * rows.sum() / mentions.sum()).tolist()


def perturbed_agreement(retriever, dataset, n_prompts: int = 200, group_size: int = 8, noise: float = 0.15,
                        seed: int = 0) -> float:
    """The retriever-checker rank agreement without a policy: for the first n_prompts text-to-pose
    captions of a PoseWorld split, group_size poses made by adding N(0, noise^2) radians to each body joint's
    axis-angle of the caption's own pose (the root kept), ranked by the retriever's cosine (Eq. 8) and by
    the exact check; group_rank_correlation of the two. train_sft.py logs it for both retrievers, so
    the semantic reward's quality is known before any RFT. -> Spearman's rho (float)."""
    rows = dataset.task_indices("t2p")[:n_prompts]  # (P,)
    g = torch.Generator().manual_seed(seed)
    pose = dataset.pose_body[rows].repeat_interleave(group_size, 0).clone()  # (P*group_size, 24, 3)
    pose[:, 1:] += noise * torch.randn(pose[:, 1:].shape, generator=g)
    return checker_agreement(retriever, dataset, rows, smpl.pose_joints(pose), group_size)


def checker_agreement(retriever, dataset, rows, joints, group_size: int) -> float:
    """Spearman's rho within each prompt's group_size poses between the retriever's cosine (Eq. 8) and
    PoseWorld's exact posecode check, averaged over prompts. rows (P,) t2p indices into the PoseWorld
    dataset, joints (P*group_size, 24, 3) the poses, prompt-major. -> float"""
    check = data.check_posecodes(joints, dataset.codes[rows].repeat_interleave(group_size, 0),
                                 dataset.mentioned[rows].repeat_interleave(group_size, 0))  # (P*group_size,)
    captions = [dataset.captions[i] for i in torch.as_tensor(rows).tolist() for _ in range(group_size)]
    cos = rewards.semantic_reward(retriever, captions, joints)  # (P*group_size,)
    return group_rank_correlation(cos, check, group_size)[0]


def _agreement(policy, tokenizer, dataset, rows, body_model, retrievers, G, device, seed) -> dict:
    """Rank agreement between each retriever's cosine and the exact posecode check over G sampled answers,
    one pose each, per text-to-pose prompt (see `evaluate`)."""
    samples = [dataset[i] for i in rows]
    batch = data.to_device(data.collate_fn(tokenizer, policy, True)(samples), device)
    g = torch.Generator(device=device).manual_seed(seed)
    rollout = M.sample_policy(policy, batch, G, 24, temperature=1.0, generator=g)  # N = len(rows) * G
    joints = smpl.pose_joints(rollout.pose, body_model).cpu()  # (N, 24, 3)
    return {f"t2p_agree_{name}": checker_agreement(retriever, dataset, rows, joints, rollout.group_size)
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


@torch.no_grad()
def evaluate_real_t2p(policy, tokenizer, dataset, body_model, retriever, limit: int | None = None,
                      batch_size: int = 32, device="cpu", progress: bool = True, seed: int = 0,
                      name: str = "posescript") -> dict:
    """Table 2 on a real text-to-pose test set (PoseScript's test split, data.PoseScript).

    The policy answers each caption greedily with its mean pose (as `evaluate`; no <POSE>: the rest
    pose), and the retriever, the EVALUATION one that train_sft.py trained on PoseScript's train
    captions (never a reward), ranks the captions against the generated poses: Recall@K in both
    directions under full retrieval (recall_at_k) and, with at least 32 captions, random sampling
    (recall_at_k_sampled, generator seeded by `seed`). The retriever sees each pose in the body frame
    (its pose_features), as it was trained. For scale, the same full-retrieval recalls of the ground-truth
    poses: what a perfect generator would score with this retriever.
    Keys: {name}_n, {name}_format_rate, {name}_{full|sampled}_{t2p|p2t}@{5,10,20}, {name}_gt_full_...,
    and "items" {key: per-caption values} for paired standard errors (format_comparison)."""
    policy.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    texts, mus, captions, gt_pose = [], [], [], []
    for start in tqdm(range(0, n, batch_size), desc=f"eval {name}", disable=not progress, leave=False):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        t, mu, _ = _mean_poses(policy, samples, tokenizer, device)
        texts += t
        mus.append(mu)
        captions += [s["caption"] for s in samples]
        gt_pose += [s["pose"] for s in samples]
    joints = smpl.pose_joints(torch.cat(mus), body_model)  # (n, 24, 3)
    gt_joints = smpl.pose_joints(M.pose_to_rot6d(torch.stack(gt_pose).to(device)), body_model)  # (n, 24, 3)
    text_emb = retriever.encode_text(captions).cpu()  # (n, d)
    pose_emb = retriever.encode_pose(joints).cpu()  # (n, d)
    items = {f"{name}_format_rate": (100 * rewards.format_reward(texts)).tolist()}
    for k, v in recall_at_k(text_emb, pose_emb, per_query=True).items():
        items[f"{name}_full_{k}"] = v.tolist()
    if n >= 32:  # the sampled protocol draws 31 distractors per query
        g = torch.Generator().manual_seed(seed)
        for k, v in recall_at_k_sampled(text_emb, pose_emb, generator=g, per_query=True).items():
            items[f"{name}_sampled_{k}"] = v.tolist()
    out = {f"{name}_n": n}
    gt_emb = retriever.encode_pose(gt_joints).cpu()  # (n, d)
    out.update({f"{name}_gt_full_{k}": v for k, v in recall_at_k(text_emb, gt_emb).items()})
    out.update({key: sum(v) / len(v) if v else float("nan") for key, v in items.items()})
    out["items"] = items
    return out


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
# real text-to-pose, PoseScript's test split (evaluate_real_t2p, eval retriever), Table 2's two protocols
_ROWS += [(f"posescript_{_proto}_{_dir}@", f"PoseScript test R^{_dir.upper()} @5/10/20, {_proto} retrieval", False)
          for _proto in ("full", "sampled") for _dir in ("t2p", "p2t")]
_ROWS += [("posescript_gt_full_t2p@", "PoseScript test R^T2P @5/10/20 of the ground-truth poses (scale)", None),
          ("posescript_format_rate", "Format rate, PoseScript test (%)", False)]


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
    return "\n".join(lines + _posecode_block(before, after))


def _posecode_block(before: dict, after: dict | None) -> list:
    """format_comparison's lines for the posecode accuracy per family and region (POSECODE_GROUPS): one
    line per group; none for results that predate these keys."""
    groups = [(key, label) for key, label in POSECODE_GROUPS
              if f"{key}/acc" in before and (after is None or f"{key}/acc" in after)]
    if not groups:
        return []
    num = lambda r, k: "" if r.get(k) is None or math.isnan(r[k]) else f"{r[k]:.1f}"  # noqa: E731

    def change(key):  # "+d (s.e.)", * beyond twice the paired s.e.
        d, se = _change(before, after, key, 1.0)
        if math.isnan(d):
            return ""
        return f"{d:+.1f}" + (f" ({se:.1f})" + "*" * (abs(d) > 2 * se) if se is not None else "")
    lines = ["", "Posecode accuracy (%) per family and body region over its mentions; avg pose: the average "
             "training pose's; informative: the mentions the average pose fails (what the model took from the "
             "text)" + ("; * a change beyond twice its paired s.e" if after else "") + ".", ""]
    if after is None:
        lines += ["| family / region | mentions | avg pose | accuracy | informative | accuracy |",
                  "| --- | --- | --- | --- | --- | --- |"]
    else:
        lines += ["| family / region | mentions | avg pose | before | after | change (s.e.) | informative | "
                  "before | after | change (s.e.) |", "|" + " --- |" * 10]
    for key, label in groups:
        label = label if key.startswith("t2p_family/") else f"**{label}**"
        cells = [label, str(before.get(f"{key}/n", "")), num(before, f"{key}/mean_pose_acc")]
        info = f"{key}/informative_acc" in before and (after is None or f"{key}/informative_acc" in after)
        if after is None:
            cells += [num(before, f"{key}/acc"), str(before.get(f"{key}/informative_n", "")),
                      num(before, f"{key}/informative_acc")]
        else:
            cells += [num(before, f"{key}/acc"), num(after, f"{key}/acc"), change(f"{key}/acc"),
                      str(before.get(f"{key}/informative_n", ""))]
            cells += ([num(before, f"{key}/informative_acc"), num(after, f"{key}/informative_acc"),
                       change(f"{key}/informative_acc")] if info else ["", "", ""])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
    paired gain with its standard error over the test items (a group of one run shows that paired s.e.,
    marked "over items"). With two groups run on the same seeds (in the same order), a last column gives
    the per-seed difference of their gains, mean +- s.e. Then the posecode accuracy per family and body
    region (POSECODE_GROUPS) and on its informative mentions, each run's a pooled proportion over the
    mentions, its label giving the mean mention count and the average pose's accuracy over all runs.
    A last line names the rows that a group's eval jsons lack (runs evaluated before the rows existed).

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
    evals = [r for pairs in loaded.values() for pair in pairs for r in pair]

    def mean(key):  # over every evaluation that has it, or None
        xs = [r[key] for r in evals if key in r and not math.isnan(r[key])]
        return sum(xs) / len(xs) if xs else None
    rows = list(COMPARE_KEYS)
    for key, name in POSECODE_GROUPS:
        n, base, n_info = mean(f"{key}/n"), mean(f"{key}/mean_pose_acc"), mean(f"{key}/informative_n")
        if n:  # a group no caption mentions has no accuracy
            rows.append((f"{key}/acc", f"posecode accuracy, {name} (%; {n:.0f} mentions"
                         + (f", avg pose {base:.1f}" if base is not None else "") + ")", False))
        if n_info:
            rows.append((f"{key}/informative_acc", f"  informative mentions, {name} (%; {n_info:.0f})", False))
    lacking = {g: [] for g in labels}
    family_rows = "posecode accuracy per family and per body region"
    for g in labels:  # runs evaluated before these rows existed have none of their keys
        if not all(any(k.startswith("t2p_family/") for k in r) for pair in loaded[g] for r in pair):
            lacking[g].append(family_rows)
    for key, label, lower_better in rows:
        cells, gains = [], {}
        for g in labels:
            runs = loaded[g]
            if not all(key in b and key in a for b, a in runs):
                cells.append("")
                if not key.startswith(("t2p_family/", "t2p_region/")):
                    lacking[g].append(label.strip())
                continue
            per_seed = [_change(b, a, key, 1.0) for b, a in runs]  # (gain, paired s.e. or None)
            gains[g] = [d for d, _ in per_seed]
            mb, _ = _mean_se([b[key] for b, _ in runs])
            ma, _ = _mean_se([a[key] for _, a in runs])
            mg, sg = _mean_se(gains[g])
            spread = f"{sg:.2f}" if len(runs) > 1 or per_seed[0][1] is None else f"{per_seed[0][1]:.2f} over items"
            seeds = ", ".join(f"{d:+.2f}" + (f" ({se:.2f})" if se is not None else "") for d, se in per_seed)
            cells.append(f"{mb:.2f} -> {ma:.2f}, {mg:+.2f} ({spread}) [{seeds}]")
        row = f"| {label} | " + " | ".join(cells)
        if two:
            if all(g in gains for g in labels):
                md, sd = _mean_se([y - x for x, y in zip(gains[labels[0]], gains[labels[1]])])
                row += f" | {md:+.2f} ({sd:.2f})"
            else:
                row += " | "
        lines.append(row + " |")
    notes = [f"{g}: {', '.join(what)}" for g, what in lacking.items() if what]
    if notes:
        lines += ["", "Rows lacking from the eval jsons (runs evaluated before eval.py reported them, or "
                  "without that task): " + "; ".join(notes) + "."]
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
    """Score a checkpoint: on PoseWorld's split (a tiny checkpoint, or --data=poseworld: image-to-pose,
    text-to-pose with both retrievers under both protocols, posecode accuracy per family, VQA, format) and
    on the real test sets whose paths are given (3DPW, Human3.6M, PoseScript). Prints the table and writes
    eval.json and eval.md next to the checkpoint (or to --out_dir). Other modes:
      python eval.py --compare NAME=run_s0,run_s1,run_s2 [NAME2=...] [--figure=curves.svg]  (gains over seeds)
      python eval.py --table=3|6 ROW=eval_s0.json,eval_s1.json [ROW2=...]  (the paper's Table 3 or 6)
      python eval.py --ckpt=out/tiny-rft --ask="a caption" | --image=photo.png [--question="..."]"""

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
    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--data", default="", help="poseworld: score PoseWorld's --split (the tiny preset's default); "
                   "a llava-1.5-7b checkpoint is scored on the real protocols whose paths are given")
    p.add_argument("--pw3d_root", default="", help="3DPW root (sequenceFiles/, imageFiles/): Table 1")
    p.add_argument("--h36m_npz", default="", help="Human3.6M TEST file (SPIN / HMR2.0 layout): Table 1")
    p.add_argument("--h36m_images", default="")
    p.add_argument("--posescript_root", default="", help="PoseScript release folder: Table 2 on its test split")
    p.add_argument("--amass_root", default="", help="AMASS folder the PoseScript ids point into")
    # asking the model one thing of one's own instead of scoring a split (section "Ask the model")
    p.add_argument("--ask", default=None, help="text-to-pose: a caption, wrapped in the prompt the model was "
                   "trained with")
    p.add_argument("--image", default="", help="image-to-pose: a picture (PNG; other formats need Pillow)")
    p.add_argument("--question", default=None, help="free text, with or without --image; the answer has a pose "
                   "when the model writes <POSE>")
    p.add_argument("--bbox", default="", help="x,y,w,h: the person's box in --image, pixels (llava-1.5-7b; "
                   "default: the whole image)")
    p.add_argument("--samples", type=int, default=1, help="answers to draw (1: greedy text, the pose head's mean)")
    p.add_argument("--temperature", type=float, default=None, help="text sampling temperature (default: 0 for "
                   "one answer, 1 for --samples > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=64, help="the longest answer, in tokens")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        raise SystemExit(f"--limit={args.limit}: a positive number of test samples, or leave it out for all")
    if args.ckpt.startswith("--") or not os.path.isdir(args.ckpt):
        raise SystemExit(f"--ckpt: no checkpoint folder at {args.ckpt!r}")
    if args.ask is not None or args.image or args.question is not None:
        return ask(args)
    real = [flag for flag, path in (("--pw3d_root", args.pw3d_root), ("--h36m_npz", args.h36m_npz),
                                    ("--posescript_root", args.posescript_root)) if path]
    preset = checkpoint_preset(args.ckpt)
    if args.data not in ("", "poseworld"):
        raise SystemExit(f"--data={args.data!r}: poseworld, or leave it out and give the real test sets' paths")
    on_poseworld = args.data == "poseworld" or (preset == "tiny" and not args.data)
    if preset != "tiny" and not on_poseworld and not real:
        raise SystemExit(f"{args.ckpt} is a {preset} checkpoint: give the real test sets to score it on "
                         f"(--pw3d_root, --h36m_npz with --h36m_images, --posescript_root with --amass_root), "
                         f"or --data=poseworld for a smoke test on the synthetic world")
    if args.posescript_root and not args.amass_root:
        raise SystemExit("--posescript_root needs --amass_root (PoseScript's poses are AMASS sequences)")
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
    results = {}
    if on_poseworld:
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
    if args.posescript_root:  # Table 2 with the evaluation retriever, which learned PoseScript's train captions
        results.update(evaluate_real_t2p(policy, tokenizer, data.PoseScript(args.posescript_root, args.amass_root,
                                                                            split="test"),
                                         body_model, retrievers["eval"], args.limit, device=device))
    where = ", ".join(([f"PoseWorld {args.split}"] if on_poseworld else []) + [r[2:].split("_")[0] for r in real])
    table = format_comparison(results, title=f"{args.ckpt} on {where}")
    out_dir = args.out_dir or args.ckpt
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return results


def checkpoint_preset(ckpt):
    """The preset a checkpoint folder was trained with (its config.json), read before any weights."""
    path = os.path.join(M.checkpoint_dir(ckpt), "config.json")
    try:
        meta = json.load(open(path))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--ckpt: {path} is not a checkpoint config ({type(e).__name__}: {e})") from None
    config = (meta.get("extra") or {}).get("config") or {}
    return config.get("preset") or (meta.get("config") or {}).get("preset", "tiny")


# ====================================================================================================
# Ask the model: a caption, a picture or a question of one's own (not in the paper)
#
#   python eval.py --ckpt=out/tiny-rft --ask="The right foot is lifted above the left one."
#   python eval.py --ckpt=out/tiny-rft --image=photo.png [--question="Is the person sitting?"]
#   python eval.py --ckpt=out/tiny-rft --ask="..." --samples=8 [--temperature=1 --seed=0]
#
# The caption or picture goes into the prompt the model was trained with. One answer is greedy and its
# pose the Gaussian's mean, as evaluate() takes them; --samples=N draws N answers at --temperature and
# their poses from the Gaussian, to show the spread of the policy. Everything is checked and computed
# before anything is written: answer.png, answer.json and answer.npz under --out_dir (default <ckpt>/ask).

ASK_CROP = 256  # side of the person crop of the real loaders (ThreeDPW / Human36M image_size)
# the camera frame (OpenCV: y down, z forward) to render_poses' body frame (y up, facing +z), so that its
# "front" view is what the camera saw and its "side" view the depth the picture lost
CAMERA_TO_VIEW = torch.diag(torch.tensor([1.0, -1.0, -1.0]))  # (3, 3)


def ask_task(args) -> str:
    """"t2p" (--ask), "i2p" (--image alone) or "question" (--question, with or without --image), after
    the checks that need no model: a bad flag is one message before anything is loaded or written."""
    if args.ask is not None and (args.image or args.question is not None):
        raise SystemExit("--ask is a caption to turn into a pose; --image asks for the pose in a picture and "
                         "--question is free text: give --ask alone, or --image and/or --question")
    for name, what in (("ask", "caption"), ("question", "question")):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise SystemExit(f"--{name} is empty: give the {what} to ask")
    if args.image and not os.path.isfile(args.image):
        raise SystemExit(f"--image: no file at {args.image!r}")
    if args.bbox and not args.image:
        raise SystemExit("--bbox is the person's box in --image: give --image too")
    if args.samples < 1 or args.max_new_tokens < 1:
        raise SystemExit(f"--samples={args.samples}, --max_new_tokens={args.max_new_tokens}: both at least 1")
    if args.temperature is not None and not 0 <= args.temperature < math.inf:
        raise SystemExit(f"--temperature={args.temperature}: 0 (greedy text) or more")
    return "t2p" if args.ask is not None else "question" if args.question is not None else "i2p"


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """--bbox="x,y,w,h" in pixels (top-left corner, width, height) -> 4 floats."""
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--bbox={text!r}: give x,y,w,h in pixels, e.g. --bbox=120,40,200,380") from None
    if not (w > 0 and h > 0):
        raise SystemExit(f"--bbox={text!r}: the width and height must be positive")
    return x, y, w, h


def ask_prompt(task: str, text: str, sets: str) -> str:
    """The user's words in a prompt the checkpoint was trained with: PoseScript's or Human3.6M's
    question when its training data (`sets`, the --data of train_sft.py) held that set, else PoseWorld's
    first template."""
    if task == "t2p":
        template = data.POSESCRIPT_QUESTION if "posescript" in sets else data.T2P_PROMPTS[0]
        return template.format(caption=text.strip())
    if task == "i2p":
        return data.IMAGE_POSE_QUESTION if "h36m" in sets else data.I2P_PROMPTS[0]
    return text.strip()


def ask_image(path: str, preset: str, image_size: int, bbox: str) -> tuple[torch.Tensor, str]:
    """The picture cut as the model's training images were -> (uint8 (3, S, S), a line saying how).

    llava-1.5-7b: HMR2.0 reads a person crop, so the loaders' rule: the person box (--bbox, else the whole
    image) grown to the 192:256 aspect (data.hmr2_crop_side), its square cut out with zeros outside the
    image (data.crop_box), ASK_CROP pixels. tiny: trained on whole PoseWorld renders, so the whole image,
    padded to a square and resized to their image_size. Grey and RGBA files are read as RGB."""
    try:
        image = data.load_image(path)  # (3, H, W)
    except ImportError:
        raise SystemExit(f"--image: {path} is not a PNG, and reading other formats needs Pillow: "
                         "pip install pillow") from None
    except (OSError, ValueError) as e:  # Pillow's UnidentifiedImageError is an OSError
        raise SystemExit(f"--image: {path} is not an image that can be read ({e})") from None
    H, W = image.shape[1:]
    if preset == "tiny":
        if bbox:
            raise SystemExit("--bbox: the tiny preset was trained on whole PoseWorld renders, not person crops; "
                             "leave --bbox out")
        crop = data.crop_box(image, (W / 2, H / 2), max(H, W), image_size)  # (3, S, S)
        return crop, (f"the whole {W} x {H} image, padded to a square and resized to {image_size} x {image_size} "
                      "like PoseWorld's renders")
    x, y, w, h = parse_bbox(bbox) if bbox else (0.0, 0.0, float(W), float(H))
    if x < 0 or y < 0 or x + w > W or y + h > H:
        raise SystemExit(f"--bbox={bbox}: the box (x {x:g} to {x + w:g}, y {y:g} to {y + h:g}) is not inside the "
                         f"{W} x {H} image")
    side = data.hmr2_crop_side(w, h)
    crop = data.crop_box(image, (x + w / 2, y + h / 2), side, ASK_CROP)  # (3, ASK_CROP, ASK_CROP)
    box = (f"the person box {x:g},{y:g},{w:g},{h:g}" if bbox else
           f"no --bbox: the whole {W} x {H} image as the person box")
    return crop, f"{box}, grown to 192:256 and cut as HMR2.0 crops (a {side:.0f}-pixel square, resized to {ASK_CROP})"


@torch.no_grad()
def ask_policy(policy, tokenizer, batch, n: int, temperature: float, draw: bool, pose_request: bool,
               max_new_tokens: int, generator) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n answers to the one prompt of `batch` -> (texts, poses (n, 144) rot6d, has_pose (n,), forced (n,)).

    A pose is the Gaussian's mean, or a draw from it when `draw`. An answer without <POSE> has no pose
    (outside V, Eq. 6); when a pose was asked for (pose_request), the head is still read, at a <POSE>
    appended to the answer, and the row is marked forced: what the head says, not what the policy did."""
    policy.eval()
    rollout = M.sample_policy(policy, batch, n, max_new_tokens, temperature=temperature, generator=generator)
    pose = (rollout.pose if draw else rollout.mu).clone()  # (n, 144)
    forced = ~rollout.valid & pose_request  # (n,)
    pose_id = torch.tensor([policy.config.pose_token_id], device=pose.device)  # (1,)
    for i in torch.nonzero(forced).flatten().tolist():
        answer = rollout.tokens[i][rollout.mask[i] & (rollout.tokens[i] != tokenizer.eos_id)]  # (t,) no </s>
        ids = torch.cat([batch["input_ids"][0], answer, pose_id])[None]  # (1, T) one prompt: no padding
        at_pose = torch.zeros_like(ids, dtype=torch.bool)  # (1, T)
        at_pose[0, -1] = True  # read the appended <POSE> only
        dist = policy(ids, torch.ones_like(ids), batch["clip_pixels"], batch["pose_pixels"], answer_mask=at_pose).pose
        pose[i] = (dist.sample(generator) if draw else dist.mu)[0]  # (144,)
    return M.answer_texts(rollout, tokenizer), pose, rollout.valid | forced, forced


def caption_posecodes(caption: str, joints: torch.Tensor) -> tuple[list | None, str]:
    """The posecodes a caption names (data.parse_caption) and, for each pose, whether it has them.
    joints (n, 24, 3) of the built-in skeleton, which PoseWorld's checker measures. -> (one list of
    {"family", "asked", "answer", "satisfied"} per pose, or None outside PoseWorld's vocabulary; a line)."""
    try:
        parsed = data.parse_caption(caption)
    except ValueError as e:
        return None, f"{e}: no posecode check"
    if parsed is None:
        return None, ("the caption is outside PoseWorld's vocabulary (not every sentence is one of its caption "
                      "templates): no posecode check")
    codes, mentioned = parsed  # (K,), (K,)
    n = joints.shape[0]
    share = data.check_posecodes(joints, codes.expand(n, -1), mentioned.expand(n, -1))  # (n,)
    got = data.posecodes(joints)  # (n, K)
    named = torch.nonzero(mentioned).flatten().tolist()
    rows = [[{"family": data.POSECODES[k].name, "asked": data.POSECODES[k].categories[int(codes[k])],
              "answer": data.POSECODES[k].categories[int(got[i, k])], "satisfied": bool(got[i, k] == codes[k])}
             for k in named] for i in range(n)]
    said = (f"the answer satisfies {sum(r['satisfied'] for r in rows[0])}" if n == 1 else
            f"the answers satisfy {100 * share.mean().item():.0f}% of them on average")
    return rows, (f"the caption names {len(named)} posecodes (PoseWorld's templates inverted); {said} "
                  "(data.check_posecodes)")


def ask_picture(path: str, joints: torch.Tensor, titles: list, caption: str,
                image: torch.Tensor | None) -> torch.Tensor:
    """answer.png: each pose in front and side views (data.render_poses), the picture the model saw on the
    left, the caption or question wrapped in a band above. joints (n, 24, 3) in the body frame.
    Returns the picture (3, H, W) uint8."""
    size, s = 128, 2  # panel side (render_poses' default) and font scale
    canvas = data.render_poses(joints, path, views=("front", "side"), titles=titles, size=size,
                               cols=min(len(joints), 4))  # (3, H, W)
    if image is not None:
        seen = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                             antialias=True)  # (1, 3, size, size)
        column = torch.full((3, canvas.shape[1], size), 40, dtype=torch.uint8)  # (3, H, size)
        column[:, :size] = seen[0].round().clamp(0, 255).to(torch.uint8)
        canvas = torch.cat([column, canvas], 2)  # (3, H, size + W)
    lines = textwrap.wrap(caption, (canvas.shape[2] - 6) // (4 * s))  # the bitmap font is 4 s pixels a letter
    if lines:
        band = torch.full((3, 7 * s * len(lines) + 3 * s, canvas.shape[2]), 20, dtype=torch.uint8)  # (3, h, W)
        for r, line in enumerate(lines):
            data._draw_text(band, line, 2 * s + 7 * s * r, 3, scale=s)
        canvas = torch.cat([band, canvas], 1)  # (3, h + H, W)
    data.write_png(path, canvas.permute(1, 2, 0))
    return canvas


def _write_atomic(path: str, write) -> None:
    """write(f) into a temporary file, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def ask(args) -> dict:
    """Answer one caption (--ask), picture (--image) or question (--question) with text and a pose; print
    the answer and write answer.png, answer.json and answer.npz. Returns answer.json's record."""
    task = ask_task(args)
    meta_path = M.checkpoint_dir(args.ckpt) / "config.json"
    tok_path = M.checkpoint_dir(args.ckpt) / "tokenizer.json"
    if not (meta_path.is_file() and tok_path.is_file()):
        raise SystemExit(f"--ckpt: {args.ckpt} holds no checkpoint (config.json, tokenizer.json, model.safetensors "
                         "written by train_sft.py / train_rft.py)")
    try:  # config and tokenizer first: the prompt is checked before the (7B: minutes of) loading
        meta = json.loads(meta_path.read_text())
        config = M.PoseLLaVAConfig.from_dict(meta["config"])
        tokenizer = M.Tokenizer.from_file(str(tok_path))
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--ckpt: {meta_path} is not a Pose-RFT checkpoint ({type(e).__name__}: {e})") from None
    train_cfg = (meta.get("extra") or {}).get("config", {})
    image, image_note = None, ""
    if args.image:
        image, image_note = ask_image(args.image, config.preset, train_cfg.get("image_size", 64), args.bbox)
    text = args.ask if task == "t2p" else args.question or ""
    prompt = ask_prompt(task, text, train_cfg.get("data", "poseworld"))
    batch = data.collate_fn(tokenizer, config, for_generation=True)([{"question": prompt, "image": image}])
    context = config.llava.text_config.max_position_embeddings
    if batch["input_ids"].shape[1] + args.max_new_tokens > context:
        what = "caption" if task == "t2p" else "question"
        raise SystemExit(f"the prompt is {batch['input_ids'].shape[1]} tokens and the answer may take "
                         f"--max_new_tokens={args.max_new_tokens}: more than the model's context of {context} "
                         f"tokens; shorten the {what}")

    device = torch.device(args.device)
    try:
        policy, tokenizer, extra = M.load_checkpoint(args.ckpt, llava_path=args.llava_path or None,
                                                     pose_encoder_path=args.pose_encoder_path or None, device=device)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"--ckpt: {e}") from None
    refuse_nonfinite_weights(policy)
    n = args.samples
    temperature = args.temperature if args.temperature is not None else (1.0 if n > 1 else 0.0)
    draw = n > 1 or temperature > 0  # else greedy: the most likely text and the Gaussian's mean
    generator = torch.Generator(device=device).manual_seed(args.seed)
    texts, pose6d, has_pose, forced = ask_policy(policy, tokenizer, data.to_device(batch, device), n, temperature,
                                                 draw, task != "question", args.max_new_tokens, generator)
    # SMPL axis-angle (global orientation first), and the joints of exactly those numbers
    aa = smpl.matrix_to_axis_angle(smpl.rot6d_to_matrix(pose6d.cpu().double().view(n, 24, 6))).float()  # (n, 24, 3)
    body = smpl.build_body_model(args.smpl_path, "cpu")
    joints = smpl.pose_joints(aa, body)  # (n, 24, 3) metres
    has_pose, forced = has_pose.cpu(), forced.cpu()  # (n,), (n,)
    codes, codes_note = caption_posecodes(args.ask, smpl.pose_joints(aa)) if task == "t2p" else (None, "")

    extra = extra or {}
    print(f"checkpoint: {args.ckpt} ({config.preset}, {extra.get('stage', '?')} step {extra.get('step', '?')})")
    print(f"prompt: {prompt}")
    if image_note:
        print(f"image: {image_note}")
    print("greedy: the most likely answer and the pose head's mean" if not draw else
          f"{n} answer(s) drawn at temperature {temperature:g}, poses drawn from the head's Gaussian "
          f"(seed {args.seed})")
    answers = []
    for i in range(n):
        hits = sum(c["satisfied"] for c in codes[i]) if codes else 0
        print(f"answer{f' {i + 1}' if n > 1 else ''}: {texts[i]}"
              + (f"   [{hits}/{len(codes[i])} posecodes]" if codes and n > 1 else ""))
        answers.append({"answer": texts[i], "pose": aa[i].tolist() if has_pose[i] else None,
                        "joints": joints[i].tolist() if has_pose[i] else None, "forced": bool(forced[i])})
        if codes:
            answers[-1]["posecodes"] = codes[i]
    if forced.any():
        print(f"{int(forced.sum())} of {n} answer(s) have no <POSE> (an undertrained model, or --max_new_tokens too "
              "short): their pose is the head's, read at a <POSE> appended to the answer (\"forced\": true)")
    if not has_pose.any():
        print("no <POSE> in the answer: it carries no pose, so there is nothing to draw")
    if codes_note:
        print(codes_note)
    if codes and n == 1:
        for c in codes[0]:
            print(f"  {c['family']}: asked {c['asked']!r}, answer {c['answer']!r}: {'yes' if c['satisfied'] else 'NO'}")

    frame = ("camera: the image's frame (OpenCV: x right, y down, z forward)" if image is not None else
             "body: y up, facing +z, the body's left +x")
    record = {"checkpoint": str(args.ckpt), "task": task, "prompt": prompt, "caption": args.ask,
              "question": args.question, "image": args.image or None, "image_crop": image_note or None,
              "samples": n, "temperature": temperature, "greedy": not draw, "seed": args.seed,
              "pose_format": "SMPL axis-angle (24, 3) in radians, global orientation first, SMPL joint order",
              "frame": frame, "joints_from": args.smpl_path or "smpl.py's built-in skeleton (smpl.SMPL())",
              "posecodes_note": codes_note or None}
    record.update(answers[0] if n == 1 else {"answers": answers})
    titles = [f"{i + 1 if n > 1 else 'answer'}{' forced' if forced[i] else ''}"
              + (f" {sum(c['satisfied'] for c in codes[i])}/{len(codes[i])} codes" if codes else "") for i in range(n)]
    write_answer(args.out_dir or os.path.join(args.ckpt, "ask"), record, aa, joints, has_pose, forced, titles,
                 args.ask or args.question or "", image)
    return record


def write_answer(out_dir: str, record: dict, aa: torch.Tensor, joints: torch.Tensor, has_pose: torch.Tensor,
                 forced: torch.Tensor, titles: list, text: str, image: torch.Tensor | None) -> None:
    """answer.json (record), and for the answers with a pose answer.npz and answer.png (ask_picture, the
    text above, the image on the left). aa, joints (n, 24, 3) in the camera frame when there is an image;
    has_pose, forced (n,). Each file is written whole or not at all; an answer without any pose removes a
    previous answer's picture and arrays, which would otherwise pass for its own."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"answer.{k}") for k in ("png", "json", "npz")}
    rows = torch.nonzero(has_pose).flatten().tolist()
    if rows:
        view = joints[rows] @ CAMERA_TO_VIEW.T if image is not None else joints[rows]  # (r, 24, 3) body frame
        ask_picture(paths["png"], view, [titles[i] for i in rows], text, image)
        nan = torch.full_like(aa, float("nan"))  # (n, 24, 3) where an answer has no pose
        arrays = {"pose": torch.where(has_pose[:, None, None], aa, nan).numpy(),
                  "joints": torch.where(has_pose[:, None, None], joints, nan).numpy(),
                  "forced": forced.numpy(), "has_pose": has_pose.numpy()}
        if len(has_pose) == 1:  # one answer: the shapes of answer.json, (24, 3)
            arrays = {k: v[0] for k, v in arrays.items()}
        _write_atomic(paths["npz"], lambda f: np.savez(f, **arrays))
    else:
        for k in ("png", "npz"):
            if os.path.exists(paths[k]):
                os.remove(paths[k])
    _write_atomic(paths["json"], lambda f: f.write(json.dumps(record, indent=1).encode()))
    shown = ["front and side views of each pose"] + (["the picture the model saw on the left"] if image is not None
                                                     else []) + (["the text asked above"] if text else [])
    print(f"wrote {paths['json']}" + (f", {paths['npz']} and {paths['png']} ({', '.join(shown)})" if rows else ""))


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
