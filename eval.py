"""Evaluation: the paper's metrics (Sec. 4.1, "Metrics"; Tables 1, 2, 6).

Image-to-pose: MPJPE and PA-MPJPE, the mean Euclidean distance between predicted and ground-truth 3D
joints without and with Procrustes alignment (Table 1). Text-to-pose: Recall@K, K = 5, 10, 20, in
both directions, text-to-pose (R^T2P) and pose-to-text (R^P2T), under the two protocols of Table 2.

The metric functions are pure functions over tensors and come first. Units: joints in metres in,
errors in metres out; printed tables multiply by 1000 for millimetres. Recalls are in percent.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

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
    align (default 0, the SMPL pelvis), or a sequence of indices whose mean is the root (for the
    14-joint LSP set of the 3DPW / H36M evaluations this is (2, 3), the mid-hip, as in HMR's and
    SPIN's evaluation code), or None for no alignment (errors in absolute camera space).
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


def _recalls(rank_t2p: torch.Tensor, rank_p2t: torch.Tensor, ks) -> dict:
    """Percent of queries whose ground truth ranks within the top k, for each k and both directions."""
    out = {}
    for k in ks:
        out[f"t2p@{k}"] = 100.0 * float((rank_t2p <= k).double().mean())
        out[f"p2t@{k}"] = 100.0 * float((rank_p2t <= k).double().mean())
    return out


def recall_at_k(text_emb: torch.Tensor, pose_emb: torch.Tensor, ks: Sequence[int] = (5, 10, 20)) -> dict:
    """Recall@K with full retrieval, the protocol of PoseScript (Delmas et al., 2022) and of the left
    half of Table 2: each query is ranked against ALL N candidates of the other modality.

    text_emb, pose_emb: (N, d), row i of each a matching pair. Similarity: cosine on L2-normalised
    embeddings. Rank of a query's ground truth = 1 + the number of OTHER candidates scoring at least as
    high, so ties count against the query (a pessimistic convention). This matters for generated poses:
    a collapsed policy that gives every caption the same pose makes all candidates tie, and must score
    at chance or below, not 100%. Returns {"t2p@5": ..., "p2t@5": ..., ...} in percent. A K that is not
    below N gives NaN: every ground truth is then within the top K, and 100% would measure nothing.
    """
    S = _similarity(text_emb, pose_emb, "recall_at_k")  # (N, N) S[i, j] = cos(text i, pose j)
    gt = S.diagonal()  # (N,)
    rank_t2p = (S >= gt[:, None]).sum(1)  # (N,) text i ranks the N poses; counts itself, so >= 1
    rank_p2t = (S >= gt[None, :]).sum(0)  # (N,) pose j ranks the N texts (column j)
    out = _recalls(rank_t2p, rank_p2t, ks)
    return {key: (float("nan") if int(key.split("@")[1]) >= S.shape[0] else v) for key, v in out.items()}


def recall_at_k_sampled(text_emb: torch.Tensor, pose_emb: torch.Tensor, ks: Sequence[int] = (5, 10, 20),
                        n_candidates: int = 32, repeats: int = 10,
                        generator: torch.Generator | None = None) -> dict:
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
    Returns {"t2p@5": ..., "p2t@5": ..., ...} in percent.
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
        for key, value in _recalls(rank_t2p, rank_p2t, ks).items():
            totals[key] = totals.get(key, 0.0) + value / repeats
    return totals


# ----------------------------------------------------------------------------------------------------
# Evaluating a policy (the tables of Sec. 4.2, for PoseWorld and, when given, 3DPW / Human3.6M)
#
# The policy answers every prompt greedily (temperature 0) and its pose is the MEAN of the Gaussian
# head (Eq. 2): evaluation measures the policy's best guess, not one random draw. A pose-task answer
# without <POSE> has no pose; it counts in the format rate, and its pose is taken as the rest pose (all
# identity rotations), so a model cannot improve MPJPE by refusing to answer.


def _mean_poses(policy, samples, tokenizer, device, max_new_tokens=32):
    """Greedy answers and mean poses for a list of sample dicts: (texts, mu (n, 144), valid (n,))."""
    import model as M
    import train_sft
    policy.eval()
    batch = train_sft.to_device(train_sft.collate_fn(tokenizer, policy, True)(samples), device)
    rollout = M.sample_policy(policy, batch, 1, max_new_tokens, temperature=0.0)
    keep = rollout.mask & (rollout.tokens != tokenizer.eos_id)  # (n, Tn)
    texts = [tokenizer.decode(rollout.tokens[i][keep[i]].tolist()) for i in range(len(samples))]
    rest = torch.tensor([1.0, 0, 0, 0, 1, 0], device=device).repeat(24)  # (144,) identity rotations
    mu = torch.where(rollout.valid[:, None], rollout.mu, rest)  # (n, 144)
    return texts, mu, rollout.valid


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
             batch_size: int = 64, device="cpu", progress: bool = True, seed: int = 0) -> dict:
    """All metrics of a policy on a PoseWorld split (the first `limit` samples, a third per task).

    retrievers: {"eval": ..., "reward": ...} text-pose retrieval models (rewards.PoseTextRetriever); the
    "eval" one never gave a reward (trained on the other half of the captions), so it is the honest judge.
    embedder: the text embedder of the text reward (Eq. 10), reused for the VQA answer similarity.
    Returns a flat dict of floats (errors in mm, recalls and rates in percent) plus sample counts.
    """
    import data
    import rewards
    import train_sft
    from tqdm import tqdm
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
    joints = train_sft.pose_joints(body_model, mu).cpu()  # (n, 24, 3)
    task = [data.TASKS[int(t)] for t in dataset.task_id[:n]]
    out = {"n": n}
    pose_rows = [i for i in idx if task[i] in ("t2p", "i2p")]
    fmt = rewards.format_reward([texts[i] for i in pose_rows]) if pose_rows else torch.zeros(0)  # (m,)
    out["format_rate"] = 100 * fmt.mean().item() if pose_rows else float("nan")

    # image-to-pose: MPJPE / PA-MPJPE against the ground truth of the same (built-in) body model
    i2p = [i for i in idx if task[i] == "i2p"]
    if i2p:
        gt = dataset.joints[i2p]  # (m, 24, 3) camera frame, like the prediction
        out["i2p_n"] = len(i2p)
        out["i2p_mpjpe_mm"] = 1000 * mpjpe(joints[i2p], gt).mean().item()
        out["i2p_pa_mpjpe_mm"] = 1000 * pa_mpjpe(joints[i2p], gt).mean().item()

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
            for k, v in recall_at_k(text_emb, pose_emb).items():
                out[f"t2p_full_{name}_{k}"] = v
            if len(t2p) >= 32:  # the protocol draws 31 distractors per query
                g = torch.Generator().manual_seed(seed)
                for k, v in recall_at_k_sampled(text_emb, pose_emb, generator=g).items():
                    out[f"t2p_sampled_{name}_{k}"] = v
        acc = data.check_posecodes(joints[t2p], dataset.codes[t2p], dataset.mentioned[t2p])  # (m,)
        out["t2p_posecode_acc"] = 100 * acc.mean().item()

    # VQA: the text reward's similarity (Eq. 10) between the answer and the reference, and exact match
    vqa = [i for i in idx if task[i] == "vqa"]
    if vqa:
        preds, refs = [texts[i] for i in vqa], [dataset.answers[i] for i in vqa]
        out["vqa_n"] = len(vqa)
        out["vqa_text_sim"] = 100 * rewards.text_similarity(embedder, preds, refs).mean().item()
        out["vqa_exact"] = 100 * sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(vqa)
    return out


@torch.no_grad()
def evaluate_real_i2p(policy, tokenizer, dataset, body_model, name: str, limit: int | None = None,
                      batch_size: int = 32, device="cpu", progress: bool = True) -> dict:
    """MPJPE / PA-MPJPE on a real image-to-pose test set (3DPW or Human3.6M from data.py).

    With an official SMPL file loaded with the H3.6M regressor (SMPL.from_file(..., extra_regressors=
    {"h36m": ...})) the errors follow SPIN / HMR2.0: the 14 LSP joints regressed from the meshes, aligned
    on the mid-hip. Without it, 3DPW falls back to the 24 SMPL joints aligned on the pelvis (not
    comparable with published numbers; said in the output's "protocol"). Our pose head predicts the
    pose only, so the predicted mesh uses the mean shape (betas = 0)."""
    import smpl
    from tqdm import tqdm
    policy.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    use14 = body_model.has_mesh and "h36m" in getattr(body_model, "extra_regressor_names", ())
    if name == "h36m" and not use14:
        raise SystemExit("Human3.6M evaluation needs the 14 H3.6M-regressor joints: pass --smpl_path and "
                         "--h36m_regressor (J_regressor_h36m.npy)")
    errs, pa_errs = [], []
    for start in tqdm(range(0, n, batch_size), desc=f"eval {name}", disable=not progress, leave=False):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        _, mu, _ = _mean_poses(policy, samples, tokenizer, device)
        R = smpl.rot6d_to_matrix(mu.view(-1, 24, 6))  # (b, 24, 3, 3)
        if use14:
            pred = smpl.lsp14_from_h36m(body_model(R[:, 1:], R[:, 0]).extra["h36m"])  # (b, 14, 3)
            if "joints14" in samples[0]:
                gt = torch.stack([s["joints14"] for s in samples]).to(pred)  # (b, 14, 3)
            else:  # 3DPW: the GT mesh of the GT pose and shape
                pose = torch.stack([s["pose"] for s in samples]).to(device)  # (b, 24, 3)
                betas = torch.stack([s["betas"] for s in samples]).to(device)  # (b, 10)
                gt = smpl.lsp14_from_h36m(body_model(pose[:, 1:], pose[:, 0], betas=betas).extra["h36m"])
            root = (2, 3)
        else:
            pred = body_model(R[:, 1:], R[:, 0], return_vertices=False).joints  # (b, 24, 3)
            gt = torch.stack([s["joints"] for s in samples]).to(pred)  # (b, 24, 3)
            root = 0
        errs.append(mpjpe(pred.cpu(), gt.cpu(), root=root))
        pa_errs.append(pa_mpjpe(pred.cpu(), gt.cpu()))
    return {f"{name}_n": n, f"{name}_mpjpe_mm": 1000 * torch.cat(errs).mean().item(),
            f"{name}_pa_mpjpe_mm": 1000 * torch.cat(pa_errs).mean().item(),
            f"{name}_protocol": "14 LSP joints (H3.6M regressor), mid-hip aligned" if use14
            else "24 SMPL joints, pelvis aligned (no SMPL mesh given)"}


# ----------------------------------------------------------------------------------------------------
# Tables

# (key, label, True if lower is better); recall keys are filled in for each protocol and retriever
_ROWS = [("i2p_mpjpe_mm", "Image-to-pose MPJPE (mm)", True),
         ("i2p_pa_mpjpe_mm", "Image-to-pose PA-MPJPE (mm)", True),
         ("3dpw_mpjpe_mm", "3DPW MPJPE (mm)", True), ("3dpw_pa_mpjpe_mm", "3DPW PA-MPJPE (mm)", True),
         ("h36m_mpjpe_mm", "Human3.6M MPJPE (mm)", True), ("h36m_pa_mpjpe_mm", "Human3.6M PA-MPJPE (mm)", True)]
for _proto in ("full", "sampled"):
    for _ret in ("eval", "reward"):
        for _dir in ("t2p", "p2t"):
            _ROWS.append((f"t2p_{_proto}_{_ret}_{_dir}@", f"Text-to-pose R^{_dir.upper()} @5/10/20, "
                          f"{_proto} retrieval, {_ret} retriever", False))
_ROWS += [("t2p_posecode_acc", "Text-to-pose posecode accuracy (%)", False),
          ("vqa_text_sim", "VQA answer similarity (text reward's E, x100)", False),
          ("vqa_exact", "VQA exact answers (%)", False),
          ("format_rate", "Format rate, pose tasks (%)", False)]


def _cell(results, key):
    if key.endswith("@"):
        vals = [results.get(f"{key}{k}") for k in (5, 10, 20)]
        return None if any(v is None for v in vals) else vals
    v = results.get(key)
    return None if v is None else [v]


def format_comparison(before: dict, after: dict | None = None, title: str = "") -> str:
    """A Markdown table of the metrics, in the order of the paper's tables; with `after`, the change and
    whether it is an improvement (an honest table: a regression is marked as such)."""
    head = "| metric | before | after | change |\n| --- | --- | --- | --- |" if after else \
        "| metric | value |\n| --- | --- |"
    lines = [f"**{title}**\n" if title else "", head]
    for key, label, lower_better in _ROWS:
        b = _cell(before, key)
        if b is None:
            continue
        fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
        if after is None:
            lines.append(f"| {label} | {fmt(b)} |")
            continue
        a = _cell(after, key)
        if a is None:
            continue
        deltas = [y - x for x, y in zip(b, a)]
        better = [(d < 0) if lower_better else (d > 0) for d in deltas]
        verdict = "better" if all(better) else "worse" if not any(better) and any(deltas) else "mixed"
        if all(abs(d) < 0.05 for d in deltas):
            verdict = "same"
        lines.append(f"| {label} | {fmt(b)} | {fmt(a)} | {' / '.join(f'{d:+.1f}' for d in deltas)} ({verdict}) |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line: python eval.py --ckpt=out/tiny-rft


def main(argv=None):
    """Evaluate a checkpoint: PoseWorld test (image-to-pose, text-to-pose with both retrievers under both
    protocols, posecode accuracy, VQA, format), plus 3DPW / Human3.6M test when their paths are given.
    Prints the table and writes eval.json and eval.md next to the checkpoint (or to --out_dir)."""
    import argparse
    import json
    import os

    import data
    import model as M
    import rewards
    import smpl
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint folder written by train_sft.py / train_rft.py")
    p.add_argument("--retrievers", default="", help="folder holding retriever_eval/ and retriever_reward/ "
                   "(default: the checkpoint's SFT folder)")
    p.add_argument("--limit", type=int, default=None, help="first N test samples (default: all)")
    p.add_argument("--split", default="test")
    p.add_argument("--out_dir", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--llava_path", default="")
    p.add_argument("--pose_encoder_path", default="")
    p.add_argument("--smpl_path", default="", help="official SMPL file (needed for 3DPW/H36M protocols)")
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
        from train_rft import reference_hidden_states
        embedder = rewards.MeanPoolEmbedder(reference_hidden_states(policy), tokenizer, device=device)
    world = data.PoseWorld(args.split, seed=cfg.get("seed", 0), image_size=cfg.get("image_size", 64))
    # PoseWorld is made with the built-in skeleton: measure it with the same body (data.py's note)
    results = evaluate(policy, tokenizer, world, smpl.SMPL().to(device), retrievers, embedder,
                       limit=args.limit, device=device)
    if args.pw3d_root:
        results.update(evaluate_real_i2p(policy, tokenizer, data.ThreeDPW(args.pw3d_root, "test", images=True),
                                         body_model, "3dpw", args.limit, device=device))
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


if __name__ == "__main__":
    main()
