"""Rewards of Pose-RFT (Sec. 3.3, Eq. 7-10), the registry students extend, and the models they need.

Sec. 3.3 scores every sampled answer (a_i, p_i) of a group with hand-made rewards: spatial location
(Eq. 7), semantic alignment with a text-pose retrieval model (Eq. 8), answer format (Eq. 9), and
text-embedding similarity to the reference answer (Eq. 10). Each reward scores either the text a_i
(discrete, summed into R_d) or the pose p_i (continuous, summed into R_c), for some tasks only.
HyGRPO (hygrpo.py) turns R_d and R_c into the two group-relative advantages F_hat and Delta_hat
(Eq. 15-16). train_rft.py calls `compute_rewards` once per step.

Adding a reward (a class exercise, README "Class exercises") is one decorated function; it gets only
the candidates of its tasks (and, for a continuous reward, only those with a pose), and returns one
number per candidate:

    @register_reward("upright", kind="continuous", tasks=("t2p",))
    def r_upright(c: Candidates, ctx: RewardContext) -> torch.Tensor:
        '''Reward poses whose head is above the pelvis (a plausibility prior).'''
        head_height = c.joints[:, smpl.JOINT_INDEX["head"], 1] - c.joints[:, 0, 1]  # (n,) metres, y is up
        return head_height.clamp(-1, 1)  # (n,)

then `python train_rft.py --rewards=joint:1,semantic:1,format:1,text:1,upright:0.5`. A weight of 0 (or
leaving the name out) removes a reward without computing it: the ablation of Table 5. Running the cell
again (in a notebook) replaces the reward; another function under a taken name is an error.

The file, top-down:
- the registry (`REWARDS`, `register_reward`);
- `Candidates`, what the RFT loop hands to the rewards (built by `candidates_of` from a rollout), and
  `RewardContext`, the shared resources;
- the four rewards of Sec. 3.3: `joint` (Eq. 7), `semantic` (Eq. 8), `format` (Eq. 9), `text` (Eq. 10);
- `compute_rewards` (R_d and R_c of one step), `parse_weights`, `reward_means`;
- diagnostics and class exercises (`oracle`, `limits`, `symmetry`): not in the paper;
- what the rewards need: the text embedder E of Eq. 10 (`MeanPoolEmbedder`, the stand-in without --bge_path)
  and the text-pose retrieval model phi_t, phi_p of Eq. 8 (after PoseScript, Delmas et al. 2022):
  `PoseTextRetriever`, its contrastive training `train_retriever`, and `split_halves`, which gives the two
  disjoint training halves of the reward retriever and the evaluation retriever (Table 6);
- file formats, not in the paper: BGE-M3, the paper's E, an XLM-RoBERTa encoder with a SentencePiece
  Unigram tokenizer, written out so that the real `BAAI/bge-m3` files load from a local folder without
  `transformers` (`BGEM3TextEmbedder`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import pickle
import re
import struct
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import model as M
import smpl

# ====================================================================================================
# The rewards of Sec. 3.3 and their registry
# ====================================================================================================

POSE_TEMPLATE = data.POSE_ANSWER  # "The SMPL pose of this person is <POSE>."
TASKS = data.TASKS  # ("t2p", "i2p", "vqa")
JOINT_FLOOR = 0.01  # metres: the joint reward is 1 / max(error, 1 cm), so at most 100 (Eq. 7)
MAX_BODY_EXTENT = 10.0  # metres: no joint of a real body lies this far from its pelvis


# ----------------------------------------------------------------------------------------------------
# The registry: one decorated function adds a reward
#
# Each reward declares its kind, which decides whether it enters R_d (scores the text a_i, "discrete")
# or R_c (scores the pose p_i, "continuous"), and its tasks. compute_rewards hands it only the
# candidates of those tasks, and a continuous reward only those with a pose (valid), so the function
# never sees a missing pose. It returns (n,) numbers; compute_rewards replaces any NaN or inf by 0.
#
# Scale: HyGRPO normalises R_d and R_c within each group (Eq. 16), and a group shares one prompt, so
# one task. Where a task has one reward of a kind (the paper's setting: joint for i2p, semantic for
# t2p, format for both, text for vqa) its weight and scale cancel out. Weights matter, relative to
# each other, once two rewards of one kind score the same task.


@dataclass(frozen=True)
class Reward:
    name: str
    kind: str  # "discrete" (enters R_d) or "continuous" (enters R_c)
    tasks: tuple[str, ...]  # the tasks whose candidates it scores
    fn: Callable[[Candidates, RewardContext], torch.Tensor]  # (c: n candidates, ctx) -> (n,)
    differentiable: bool = False  # continuous, and differentiable in c.joints: RFT may add its gradient at
    #                               the Gaussian's mean (train_rft.py --gradient_at_mean)


REWARDS: dict[str, Reward] = {}
KINDS = ("discrete", "continuous")


def _qualified(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def register_reward(name: str, kind: str, tasks: Sequence[str], differentiable: bool = False):
    """Decorator: add `fn(c: Candidates, ctx: RewardContext) -> (n,) tensor` to REWARDS under `name`.
    differentiable=True (continuous rewards only) says fn is differentiable in c.joints, so RFT adds its
    gradient at each Gaussian's mean (train_rft.py --gradient_at_mean) with its --rewards weight.

    Registering a name again with a function of the same name (a notebook cell run twice, an edited
    reward re-run) replaces the entry; a different function under a name already taken is an error."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"reward name {name!r}: use letters, digits and '_' (it is typed in --rewards)")
    if kind not in KINDS:
        raise ValueError(f"reward {name!r}: kind must be one of {KINDS}, got {kind!r}")
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"reward {name!r}: tasks must be a non-empty subset of {TASKS}, got {tasks}")
    if differentiable and kind != "continuous":
        raise ValueError(f"reward {name!r}: only a continuous reward can be differentiable in the pose")

    def decorate(fn):
        if name in REWARDS and _qualified(REWARDS[name].fn) != _qualified(fn):
            raise ValueError(f"a reward named {name!r} is already registered ({REWARDS[name].fn.__name__}); "
                             f"pick another name, or `del rewards.REWARDS[{name!r}]` first")
        REWARDS[name] = Reward(name, kind, tasks, fn, differentiable)
        return fn
    return decorate


# ----------------------------------------------------------------------------------------------------
# Candidates and context: what the RFT loop hands to the rewards
#
# One RFT step samples G answers for each of B prompts, each answer with pose_samples poses: group_size =
# G x pose_samples candidates a prompt, N = B x group_size in all (an answer's pose draws are consecutive
# rows sharing its text), each a text a_i and, when the text holds <POSE>, a pose p_i. The loop decodes
# the texts, turns the poses into SMPL joints, and packs everything, row i = candidate i, into a
# `Candidates`. Shared resources (models, settings) go into a `RewardContext`, built once before training.

def per_candidate(*shape, dtype: torch.dtype | None = None, optional: bool = False):
    """A tensor field of Candidates, one row per candidate: shape (N, *shape), "K" for any size; dtype,
    when given, is checked too. optional: the field may be None (a data set that lacks it)."""
    meta = {"shape": shape, "dtype": dtype}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


@dataclass
class Candidates:
    """N = prompts x G x pose_samples sampled candidates (a_i, p_i) and what the rewards compare them with.

    task        list[str] (N,)  "t2p" | "i2p" | "vqa", the task of the candidate's prompt
    text        list[str] (N,)  the decoded answer a_i, special tokens kept (so "<POSE>" shows), up to
                                and WITHOUT the end-of-sequence token
    valid       (N,) bool       a_i emitted <POSE>, so a pose exists: the set V of Eq. 6
    pose        (N, 24, 3, 3)   rotation matrices of p_i (0 = global orient); anything finite or not
                                where invalid
    joints      (N, 24, 3)      SMPL joints of p_i in metres, computed by the caller, in the SAME frame
                                as gt_joints: PoseWorld's convention is the built-in skeleton with no
                                translation (pelvis at its rest location), the global orientation in
                                the body frame for t2p and in the camera frame for i2p (data.py)
    gt_joints   (N, 24, 3)      ground-truth joints in that frame, where has_gt
    has_gt      (N,) bool       gt_joints holds a ground truth (i2p; t2p poses have one too, but
                                the text-to-pose task has many right answers and no reward uses it)
    question    list[str] (N,)  the user's question q
    caption     list[str|None]  the description inside q for t2p (what phi_t encodes, Eq. 8), else None
    ref_answer  list[str] (N,)  the reference answer: POSE_TEMPLATE for pose tasks, the short answer for vqa
    codes       (N, K) long     PoseWorld only (else None): the posecodes of the prompt's reference pose
    mentioned   (N, K) bool     PoseWorld only (else None): the codes its caption names (data.py); only
                                the `oracle` diagnostic reads these two, no reward of the paper does

    To give the rewards a new field: declare it here (a list, or a tensor with `per_candidate(...)`),
    and fill it in `candidates_of` just below. The checks of __post_init__ and `select` go over the
    fields by themselves.
    """
    task: list[str]
    text: list[str]
    valid: torch.Tensor = per_candidate(dtype=torch.bool)
    pose: torch.Tensor = per_candidate(24, 3, 3)
    joints: torch.Tensor = per_candidate(24, 3)
    gt_joints: torch.Tensor = per_candidate(24, 3)
    has_gt: torch.Tensor = per_candidate(dtype=torch.bool)
    question: list[str]
    caption: list[str | None]
    ref_answer: list[str]
    codes: torch.Tensor | None = per_candidate("K", optional=True)
    mentioned: torch.Tensor | None = per_candidate("K", optional=True)

    def __post_init__(self):
        N = len(self.task)
        for f in fields(self):
            value = getattr(self, f.name)
            if "shape" not in f.metadata:  # a list: one entry per candidate
                if len(value) != N:
                    raise ValueError(f"Candidates: {f.name} has {len(value)} entries, task has {N}")
                continue
            if value is None and f.default is None:
                continue
            want = (N, *f.metadata["shape"])
            if value.dim() != len(want) or any(w != "K" and s != w for s, w in zip(value.shape, want)):
                shape = "(" + ", ".join(f"N={N}" if i == 0 else str(w) for i, w in enumerate(want)) + ")"
                raise ValueError(f"Candidates: {f.name} must have shape {shape} for N={N} candidates, "
                                 f"got {tuple(value.shape)}")
            if f.metadata["dtype"] is not None and value.dtype != f.metadata["dtype"]:
                raise ValueError(f"Candidates: {f.name} must be a {f.metadata['dtype']} tensor, got {value.dtype}")
        unknown = sorted(set(self.task) - set(TASKS))
        if unknown:
            raise ValueError(f"Candidates: unknown task(s) {unknown}; tasks are {TASKS}")

    def __len__(self) -> int:
        return len(self.task)

    def select(self, index: torch.Tensor) -> "Candidates":
        """The candidates at `index` (n,) long, as a new Candidates of n rows (every field, lists and
        tensors alike; a field that is None stays None)."""
        rows = index.tolist()

        def pick(value):
            if value is None:
                return None
            if isinstance(value, torch.Tensor):
                return value[index.to(value.device)]
            return [value[i] for i in rows]
        return Candidates(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})


def candidates_of(rollout, batch, tokenizer, body_model, group_size) -> Candidates:
    """What the rewards see of the N = B x group_size candidates of a rollout (model.sample_policy) for a
    collated batch, group_size being the rollout's candidates per prompt (G answers x pose_samples): the
    decoded answers, the poses as matrices and SMPL joints, and per prompt, repeated for its group_size
    candidates, the task, question, caption, reference answer, ground-truth joints (of the same body model
    as the prediction) and PoseWorld's posecodes when the data set has them."""
    N = rollout.tokens.shape[0]
    R = smpl.rot6d_to_matrix(rollout.pose.view(N, 24, 6))  # (N, 24, 3, 3)
    joints = smpl.pose_joints(rollout.pose, body_model)  # (N, 24, 3)
    has_gt = batch["has_pose"].repeat_interleave(group_size)  # (N,)
    gt_joints = smpl.pose_joints(M.pose_to_rot6d(batch["pose"]), body_model)  # (B, 24, 3) same body model
    gt_joints = gt_joints.repeat_interleave(group_size, dim=0)  # (N, 24, 3) once per prompt, then repeated
    rep = lambda xs: [x for x in xs for _ in range(group_size)]  # noqa: E731  per prompt -> per candidate
    codes = {}  # PoseWorld's reference posecodes and the caption's codes, for the `oracle` diagnostic
    if isinstance(batch.get("codes"), list) and all(torch.is_tensor(x) for x in batch["codes"]):
        codes = {"codes": torch.stack(batch["codes"]).repeat_interleave(group_size, dim=0),  # (N, K)
                 "mentioned": torch.stack(batch["mentioned"]).repeat_interleave(group_size, dim=0)}  # (N, K)
    return Candidates(task=rep(batch["task"]), text=M.answer_texts(rollout, tokenizer), valid=rollout.valid,
                      pose=R, joints=joints, gt_joints=gt_joints, has_gt=has_gt, question=rep(batch["question"]),
                      caption=rep(batch.get("caption") or [None] * len(batch["task"])),
                      ref_answer=rep(batch["answer"]), **codes)


@dataclass
class RewardContext:
    """Resources the rewards share, built once before RFT. A reward whose resource is None fails
    with a clear error the first time it has candidates to score, unless its weight is 0."""
    retriever: "PoseTextRetriever | None" = None  # phi_t, phi_p of Eq. 8 (with its own tokenizer): the
    #   REWARD retriever. The evaluation retriever, trained on the other half of the captions, must
    #   never be put here (see split_halves).
    embedder: TextEmbedder | None = None  # E of Eq. 10: BGEM3TextEmbedder or MeanPoolEmbedder
    joint_floor: float = JOINT_FLOOR  # metres, the smallest error the joint reward divides by


def _need(resource, what: str, reward: str):
    if resource is None:
        raise ValueError(f"the {reward!r} reward needs {what}, but the RewardContext has none. Provide "
                         f"it, or give the reward weight 0 to leave it out.")
    return resource


# ----------------------------------------------------------------------------------------------------
# The four rewards of Sec. 3.3 (Eq. 7-10)
#
# Each is a plain function over tensors or strings, plus its registered wrapper. A broken candidate
# (NaN or absurd joints, empty or garbage text) gets the lowest value its reward can take, never NaN.


def joint_reward(pred_joints: torch.Tensor, gt_joints: torch.Tensor, floor: float = JOINT_FLOOR
                 ) -> torch.Tensor:
    """Spatial location reward, Eq. 7: R_joint = 1 / ||J_pred - J_gt||, per candidate. (B, J, 3) x2 -> (B,)

    ||J_pred - J_gt|| is read as the text around Eq. 7 says, the mean joint position error: the mean
    over joints of the Euclidean distance, in metres, after aligning the root (the pelvis, joint 0) of
    both skeletons as MPJPE does (eval.mpjpe), so a common translation does not count; the global
    orientation does. The error is floored at `floor` (1 cm by default), so a perfect pose scores
    1 / floor = 100 rather than infinity, and a non-finite error (NaN joints) scores 0, the worst.
    """
    if pred_joints.dim() != 3 or pred_joints.shape[-1] != 3 or pred_joints.shape != gt_joints.shape:
        raise ValueError(f"joint_reward expects pred_joints and gt_joints of the same shape (B, J, 3), "
                         f"got {tuple(pred_joints.shape)} and {tuple(gt_joints.shape)}")
    if not floor > 0:
        raise ValueError(f"joint_reward: floor must be > 0 metres, got {floor}")
    pred = pred_joints.float() - pred_joints[:, :1].float()  # (B, J, 3) root-relative
    gt = gt_joints.float() - gt_joints[:, :1].float()  # (B, J, 3)
    err = (pred - gt).norm(dim=-1).mean(-1)  # (B,) metres
    r = 1.0 / err.clamp_min(floor)  # (B,) in (0, 1 / floor]
    return torch.where(torch.isfinite(err), r, torch.zeros_like(r))  # (B,)


def semantic_reward(retriever: "PoseTextRetriever", captions: Sequence[str], joints: torch.Tensor
                    ) -> torch.Tensor:
    """Semantic alignment reward, Eq. 8: R_semantic = cos(phi_t(q), phi_p(p)). (N,) texts, (N, 24, 3) -> (N,)

    phi_t encodes the description the prompt q carries (the caption), phi_p the generated pose through
    its joints. Both embeddings have unit norm, so the cosine is their dot product, in [-1, 1]. A pose
    with non-finite joints, or a joint more than MAX_BODY_EXTENT from the pelvis (no body built from
    rotations reaches that), scores -1, the lowest cosine, and is not encoded.
    """
    if len(captions) != joints.shape[0]:
        raise ValueError(f"semantic_reward: {len(captions)} captions for {joints.shape[0]} poses")
    root_rel = joints - joints[:, :1]  # (N, 24, 3)
    ok = torch.isfinite(joints).all(-1).all(-1) & (root_rel.norm(dim=-1) < MAX_BODY_EXTENT).all(-1)  # (N,)
    safe = torch.where(ok[:, None, None], joints, torch.zeros_like(joints))  # (N, 24, 3)
    unique = list(dict.fromkeys(captions))  # a prompt's candidates share one caption: encode it once
    text_emb = retriever.encode_text(unique)  # (U, d)
    rows = torch.tensor([unique.index(t) for t in captions], device=text_emb.device)  # (N,)
    pose_emb = retriever.encode_pose(safe)  # (N, d)
    cos = (text_emb[rows] * pose_emb.to(text_emb.device)).sum(-1).clamp(-1.0, 1.0).to(joints.device)  # (N,)
    return torch.where(ok & torch.isfinite(cos), cos, torch.full_like(cos, -1.0))  # (N,)


def _template_regex(template: str) -> re.Pattern:
    """The format check of Eq. 9 for an answer template with one POSE_TOKEN.

    Strict about the words, their case, the punctuation, a single <POSE>, and nothing before or after.
    Lenient about whitespace: any run of whitespace where the template has a space, optional whitespace
    on either side of <POSE> and at both ends. Why: the Llama tokenizer (legacy format) puts a "▁"
    before the text that follows a special token, so the ideal answer decodes as "... is <POSE> ." and
    a character-exact regex would refuse the very answer SFT taught.
    """
    if template.count(data.POSE_TOKEN) != 1:
        raise ValueError(f"answer template {template!r} must contain exactly one {data.POSE_TOKEN}")
    before, after = template.split(data.POSE_TOKEN)
    words = lambda s: r"\s+".join(re.escape(w) for w in s.split())  # noqa: E731
    return re.compile(rf"\s*{words(before)}\s*{re.escape(data.POSE_TOKEN)}\s*{words(after)}\s*")


FORMAT_REGEX = _template_regex(POSE_TEMPLATE)


def format_reward(texts: Sequence[str]) -> torch.Tensor:
    """Format reward, Eq. 9: 1 if the answer matches the pose template (FORMAT_REGEX), else 0. (N,)"""
    return torch.tensor([float(FORMAT_REGEX.fullmatch(t) is not None) for t in texts])  # (N,)


@register_reward("joint", kind="continuous", tasks=("i2p",), differentiable=True)
def r_joint(c: Candidates, ctx: RewardContext) -> torch.Tensor:
    """Eq. 7 on the image-to-pose candidates: 1 / root-aligned mean joint error (0 without ground truth)."""
    r = joint_reward(c.joints, c.gt_joints, ctx.joint_floor)  # (n,)
    return torch.where(c.has_gt.to(r.device), r, torch.zeros_like(r))  # (n,)


@register_reward("semantic", kind="continuous", tasks=("t2p",))
def r_semantic(c: Candidates, ctx: RewardContext) -> torch.Tensor:
    """Eq. 8 on the text-to-pose candidates, with the reward retriever of the context."""
    retriever = _need(ctx.retriever, "a text-pose retriever (ctx.retriever, see train_retriever)", "semantic")
    if any(caption is None for caption in c.caption):
        raise ValueError("the 'semantic' reward needs the caption of every text-to-pose candidate "
                         "(Candidates.caption), got None")
    return semantic_reward(retriever, c.caption, c.joints)  # (n,)


@register_reward("format", kind="discrete", tasks=("t2p", "i2p"))
def r_format(c: Candidates, ctx: RewardContext) -> torch.Tensor:
    """Eq. 9 on the pose-task answers: does a_i follow 'The SMPL pose of this person is <POSE>.'?"""
    return format_reward(c.text).to(c.valid.device)  # (n,)


@register_reward("text", kind="discrete", tasks=("vqa",))
def r_text(c: Candidates, ctx: RewardContext) -> torch.Tensor:
    """Eq. 10 on the VQA answers: cos(E(a_pred), E(a_gt)) with the context's text embedder."""
    embedder = _need(ctx.embedder, "a text embedder (ctx.embedder: BGEM3TextEmbedder or MeanPoolEmbedder)",
                     "text")
    return text_similarity(embedder, c.text, c.ref_answer)  # (n,)


# ----------------------------------------------------------------------------------------------------
# Computing the rewards of one RFT step (Algorithm 1, line 7)


def _scored(c: Candidates, reward: Reward) -> torch.Tensor:
    """(N,) bool: the candidates a reward scores (its tasks; for a continuous one, with a pose)."""
    mask = torch.tensor([t in reward.tasks for t in c.task], dtype=torch.bool, device=c.valid.device)  # (N,)
    return mask & c.valid if reward.kind == "continuous" else mask


def compute_rewards(c: Candidates, ctx: RewardContext, weights: dict[str, float]
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The rewards of one RFT step (Algorithm 1, line 7): R_d and R_c of Eq. 16, and each reward alone.

    R_d = sum over discrete rewards of weight x reward, R_c the same over continuous ones. A reward is
    0 for the candidates it does not score (other tasks; no pose, for a continuous one). A name with
    weight 0, or not in `weights`, is not computed at all. Returns R_d (N,), R_c (N,), and
    {name: (N,)} of the unweighted rewards that were computed, all float32 on c.valid's device.
    """
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; registered rewards: {sorted(REWARDS)}")
    N, device = len(c), c.valid.device
    R = {kind: torch.zeros(N, device=device) for kind in KINDS}  # (N,) each
    per_reward = {}
    for name, w in weights.items():
        if not math.isfinite(float(w)):
            raise ValueError(f"reward weight {name}={w} is not a finite number")
        if w == 0:
            continue  # Table 5's ablation: the reward is not even computed
        reward = REWARDS[name]
        scored = _scored(c, reward)  # (N,)
        r = torch.zeros(N, device=device)  # (N,)
        index = torch.nonzero(scored).flatten()  # (n,)
        if len(index) > 0:
            r_sub = reward.fn(c.select(index), ctx)  # (n,)
            if not isinstance(r_sub, torch.Tensor) or tuple(r_sub.shape) != (len(index),):
                got = tuple(r_sub.shape) if isinstance(r_sub, torch.Tensor) else type(r_sub).__name__
                raise ValueError(f"reward {name!r} must return a ({len(index)},) tensor, one number per "
                                 f"candidate it was given; got {got}")
            r_sub = torch.nan_to_num(r_sub.detach().float().to(device), nan=0.0, posinf=0.0, neginf=0.0)
            r[index] = r_sub
        per_reward[name] = r
        R[reward.kind] += float(w) * r
    return R["discrete"], R["continuous"], per_reward


def parse_weights(spec: str) -> dict[str, float]:
    """'joint:1,semantic:1,format:1,text:1' -> {'joint': 1.0, ...}, for --rewards on the command line.

    Spaces around names and numbers are allowed. Errors name the faulty item: a missing ':', a number
    that does not parse or is not finite, a name given twice, an unregistered name.
    """
    weights = {}
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError(f"no rewards in {spec!r}; expected name:weight pairs separated by commas, "
                         f"e.g. 'joint:1,semantic:1,format:1,text:1' (registered: {sorted(REWARDS)})")
    for item in items:
        name, sep, value = (part.strip() for part in item.partition(":"))
        if not sep or not name or not value:
            raise ValueError(f"reward weight {item!r} in {spec!r} is not of the form name:weight")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"reward weight {item!r}: {value!r} is not a number") from None
        if not math.isfinite(w):
            raise ValueError(f"reward weight {item!r} is not finite")
        if name in weights:
            raise ValueError(f"reward {name!r} is given twice in {spec!r}")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; registered rewards: {sorted(REWARDS)}")
        weights[name] = w
    return weights


def reward_means(c: Candidates, per_reward: dict[str, torch.Tensor]) -> dict[str, float]:
    """For logging: {"name/task": mean} of each computed reward over the candidates it scored, per
    task (a continuous reward's mean is over the candidates with a pose); tasks with none are left out."""
    out = {}
    for name, r in per_reward.items():
        scored = _scored(c, REWARDS[name])  # (N,)
        for task in REWARDS[name].tasks:
            rows = scored & torch.tensor([t == task for t in c.task], dtype=torch.bool, device=scored.device)  # (N,)
            if rows.any():
                out[f"{name}/{task}"] = float(r[rows].mean())
    return out


DEFAULT_WEIGHTS = "joint:1,semantic:1,format:1,text:1"  # the paper's four rewards (it gives no weights)


# ----------------------------------------------------------------------------------------------------
# Diagnostics and class exercises: not in the paper


# A diagnostic, NOT part of the paper: PoseWorld's exact checker as the text-to-pose reward. It is the
# upper bound a learned semantic reward (Eq. 8) can reach, and shows whether RFT itself works when the
# reward is right. Try `--rewards=joint:1,oracle:1,format:1,text:1` (class exercise in the README).
@register_reward("oracle", kind="continuous", tasks=("t2p",))
def r_oracle(c: Candidates, ctx: RewardContext) -> torch.Tensor:
    """The share of the caption's posecodes that p_i satisfies (data.check_posecodes), in [0, 1]."""
    codes = _need(c.codes, "the prompts' posecodes (Candidates.codes: PoseWorld only)", "oracle")
    mentioned = _need(c.mentioned, "the caption's codes (Candidates.mentioned: PoseWorld only)", "oracle")
    joints = c.joints.detach().float().cpu()  # (n, 24, 3)
    ok = torch.isfinite(joints).all(-1).all(-1)  # (n,) a broken pose scores 0, the lowest
    safe = torch.where(ok[:, None, None], joints, torch.zeros_like(joints))  # (n, 24, 3)
    acc = data.check_posecodes(safe, codes.cpu(), mentioned.cpu())  # (n,)
    return torch.where(ok, acc, torch.zeros_like(acc)).to(c.valid.device)  # (n,)


# Class exercises (README, "Class exercises"): rewards a student adds, kept here so that they stay
# runnable (tests/test_exercises.py runs each for a few RFT steps). Not in the paper, not in the defaults.


def joint_angles(R: torch.Tensor) -> torch.Tensor:
    """The (x, y, z) angles in degrees of rotations R = Ry(y) Rz(z) Rx(x), PoseWorld's joint-angle
    convention (data.euler_to_matrix, which this inverts for |z| < 90 degrees). (..., 3, 3) -> (..., 3)"""
    z = torch.asin(R[..., 1, 0].clamp(-1.0, 1.0))  # R[1, 0] = sin z
    y = torch.atan2(-R[..., 2, 0], R[..., 0, 0])  # R[2, 0] = -sin y cos z, R[0, 0] = cos y cos z
    x = torch.atan2(-R[..., 1, 2], R[..., 1, 1])  # R[1, 2] = -cos z sin x, R[1, 1] = cos z cos x
    return torch.rad2deg(torch.stack([x, y, z], -1))  # (..., 3)


@register_reward("limits", kind="continuous", tasks=("t2p", "i2p"))
def r_limits(c: Candidates, ctx: RewardContext) -> torch.Tensor:
    """Exercise 3, a plausibility prior: minus the degrees by which the 23 body joints leave PoseWorld's
    joint limits (data.JOINT_LIMITS), summed, per 100 degrees. 0 for a pose within every limit. Caveat
    worth a class discussion: at z = +-90 degrees (an arm straight out to the side) Euler angles lose a
    degree of freedom (gimbal lock), x and y are then not defined one by one, and a legal pose can read
    as outside its limits."""
    angles = joint_angles(c.pose[:, 1:].float())  # (n, 23, 3) degrees
    limits = data.JOINT_LIMITS[1:].to(angles.device)  # (23, 3, 2) low, high
    outside = (limits[..., 0] - angles).clamp(min=0) + (angles - limits[..., 1]).clamp(min=0)  # (n, 23, 3)
    return -outside.sum((1, 2)) / 100  # (n,)


@register_reward("symmetry", kind="continuous", tasks=("t2p",))
def r_symmetry(c: Candidates, ctx: RewardContext) -> torch.Tensor:
    """Exercise 2, a reward to hack: minus the mean distance (metres) between the body and its left-right
    mirror image. A policy can raise it by giving every caption a symmetric pose, whatever the caption
    says about one side: watch the posecode accuracy of one-sided captions fall while it rises."""
    J = body_frame(c.joints)  # (n, 24, 3)
    return -(J - mirror_joints(J)).norm(dim=-1).mean(-1)  # (n,)


# ----------------------------------------------------------------------------------------------------
# What the rewards need (1): the text embedder E of the text reward (Eq. 10)
#
# R_text = cos(E(a_pred), E(a_gt)). Any object with `embed(list[str]) -> (n, d)` L2-normalised rows
# can be E (the `TextEmbedder` protocol). `BGEM3TextEmbedder` (under "File formats", at the end) is the
# paper's choice: the BGE-M3 dense embedding, i.e. the CLS hidden state of the last XLM-RoBERTa layer,
# L2-normalised. `MeanPoolEmbedder` is the stand-in used without --bge_path, which needs no download.


class TextEmbedder(Protocol):
    """The E of Eq. 10: maps n texts to an (n, d) tensor of L2-normalised rows."""

    def embed(self, texts: list[str]) -> torch.Tensor: ...


def text_similarity(embedder: TextEmbedder, preds: Sequence[str], refs: Sequence[str]) -> torch.Tensor:
    """Eq. 10: R_text = cos(E(a_pred), E(a_gt)) for each pair, (n,) in [-1, 1].

    Predictions and references go through the embedder in one call, each distinct text once: a VQA
    prompt's G x pose_samples candidates (note 9 of hygrpo.py) repeat G answers and one reference. Empty
    strings are fine (they still get <s></s>); a zero or non-finite embedding gives 0 rather than NaN.
    """
    if len(preds) != len(refs):
        raise ValueError(f"text_similarity needs as many predictions as references, got "
                         f"{len(preds)} and {len(refs)}")
    n = len(preds)
    if n == 0:
        return torch.zeros(0)
    texts = list(preds) + list(refs)  # (2n,)
    unique = list(dict.fromkeys(texts))  # (U,) in order of first appearance
    where = {t: i for i, t in enumerate(unique)}
    e = embedder.embed(unique).float()  # (U, d)
    e = F.normalize(torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0), dim=-1)  # (U, d)
    e = e[torch.tensor([where[t] for t in texts], device=e.device)]  # (2n, d)
    return (e[:n] * e[n:]).sum(-1).clamp(-1.0, 1.0)  # (n,)


class MeanPoolEmbedder:
    """The tiny preset's E for Eq. 10: mean-pooled last-layer hidden states of a frozen model.

    A STAND-IN FOR BGE-M3, used because nothing can be downloaded for the tiny preset. train_rft.py
    passes the reference policy (the policy with its LoRA adapters off) as `hidden_states`. The reward
    then says how close the reference model places the answer to the reference answer in its own
    hidden space. That is a much weaker judge than BGE-M3, a retrieval model trained to put texts of
    the same meaning together: a small language model's mean hidden state mostly tracks shared words
    and length, so "yes" and "no" may well look alike to it. It still does the job the text reward has in
    the paper, keeping the answers of the VQA task near their SFT form, but read its numbers as a
    sanity signal, not as semantic similarity.

    hidden_states(input_ids (B, T), attention_mask (B, T)) -> (B, T, d): the last-layer states of a
    right-padded batch (1 = real token). With add_bos the tokenizer's BOS is put in front of every text,
    as the language model saw it in training, but left out of the mean: in a causal model its state is
    the same for every text, and pooling it would pull all embeddings together. Each text is cut to
    max_length tokens (BOS included). An empty text has no token to pool: its embedding is the zero
    vector, so its cosine with anything is 0 (see `text_similarity`).
    """

    def __init__(self, hidden_states: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokenizer,
                 max_length: int = 128, batch_size: int = 64, add_bos: bool = True,
                 device: str | torch.device = "cpu"):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a BOS and one token), got {max_length}")
        self.hidden_states, self.tokenizer = hidden_states, tokenizer
        self.max_length, self.batch_size, self.add_bos = max_length, batch_size, add_bos
        self.device = torch.device(device)
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = 0 if pad is None else pad  # padded positions are masked, any id will do

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(n,) texts -> (n, d) float32 on the CPU, rows of unit norm (or zero for an empty text)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            encoded = [self.tokenizer.encode(t, add_bos=self.add_bos)[:self.max_length]
                       for t in texts[i:i + self.batch_size]]
            T = max(1, max(len(e) for e in encoded))
            ids = torch.full((len(encoded), T), self.pad_id, dtype=torch.long)  # (b, T)
            mask = torch.zeros(len(encoded), T, dtype=torch.long)  # (b, T)
            for b, e in enumerate(encoded):
                ids[b, :len(e)] = torch.tensor(e, dtype=torch.long)
                mask[b, :len(e)] = 1
            h = self.hidden_states(ids.to(self.device), mask.to(self.device)).float().cpu()  # (b, T, d)
            if h.dim() != 3 or h.shape[:2] != ids.shape:
                raise ValueError(f"hidden_states must return (B, T, d) for input_ids {tuple(ids.shape)}, "
                                 f"got {tuple(h.shape)}")
            pooled = mask.clone().float()  # (b, T) the positions that enter the mean
            if self.add_bos:
                pooled[:, 0] = 0.0
            e = (h * pooled[..., None]).sum(1) / pooled.sum(1, keepdim=True).clamp_min(1.0)  # (b, d)
            out.append(F.normalize(e, dim=-1))  # (b, d)
        if not out:
            return torch.zeros(0, 0)
        return torch.cat(out)  # (n, d)


# ----------------------------------------------------------------------------------------------------
# What the rewards need (2): the text-pose retrieval model phi_t, phi_p of Eq. 8 (after PoseScript,
# Delmas et al. 2022)
#
# PoseScript's retrieval model puts a VPoser-style MLP pose encoder and a bi-GRU text encoder over GloVe
# word vectors into one L2-normalised space (d = 512), trained with a symmetric contrastive loss whose
# temperature is learned (initial logit scale 10). Here, sized for PoseWorld on a CPU:
# - phi_p: an MLP over the 24 joints in the body frame (pelvis at the origin, pelvis rotation undone,
#   `body_frame`). The global orientation is removed because captions never describe it
#   and PoseWorld's posecodes are measured in that same frame; so the reward does not care which way
#   a generated body faces.
# - phi_t: a small pre-LN transformer over the project Tokenizer's ids (word vectors learned from
#   scratch: there is no GloVe here), with a learned start token so an empty text still has one
#   position, mean-pooled over the real positions.
# - loss: InfoNCE in both directions (text -> pose and pose -> text) over the batch, logit scale
#   exp(log_scale) learned, clamped to at most 100 as in CLIP (and at least 1).
#
# Two retrievers are trained, on the two disjoint halves of the training captions that `split_halves`
# gives: the reward retriever (RewardContext.retriever) and the evaluation retriever (eval.py). RFT
# never sees the evaluation retriever, so a gain it shows is not one RFT found by exploiting the
# quirks of the reward model. (Both share architecture and data source, so blind spots they have in
# common can still be exploited: this is a weaker check than the paper's PoseEmbroider evaluator.)


def body_frame(joints: torch.Tensor) -> torch.Tensor:
    """data.body_frame_joints (pelvis at the origin, its rotation undone), in float32 on the device of
    `joints`. It runs on the CPU, where data.py keeps the rest skeleton it fits against: a small SVD
    per pose. (B, 24, 3) -> (B, 24, 3)"""
    return data.body_frame_joints(joints.detach().float().cpu()).to(joints.device)  # (B, 24, 3)


@dataclass
class RetrieverConfig:
    """Shapes of a PoseTextRetriever; saved as JSON beside its weights."""
    vocab_size: int  # the tokenizer's (ids must be smaller)
    tokenizer_fingerprint: str  # hash of the tokenizer's vocabulary, checked when loading
    d_embed: int = 64  # the shared space
    d_model: int = 64  # text transformer width
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    max_tokens: int = 96  # text positions, the start token included; longer texts are cut
    d_pose_hidden: int = 256  # pose MLP width


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of every token string by id, so a retriever is never run with another tokenizer
    (ids would silently mean other words). Merges are not hashed: the vocabulary of a BPE lists every
    merged token in merge order, so two BPEs with one vocabulary by id have the same merges."""
    tokens = "\n".join(repr(tokenizer.id_to_token(i)) for i in range(tokenizer.vocab_size))
    return hashlib.sha256(tokens.encode("utf-8")).hexdigest()[:16]


class PoseTextRetriever(nn.Module):
    """phi_t (texts) and phi_p (SMPL joints) into one L2-normalised space of dimension d_embed (Eq. 8)."""

    def __init__(self, cfg: RetrieverConfig, tokenizer):
        super().__init__()
        if tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the retriever config "
                             f"{cfg.vocab_size}")
        self.cfg, self.tokenizer = cfg, tokenizer
        # phi_t
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.start = nn.Parameter(torch.zeros(cfg.d_model))  # learned start token at position 0
        self.pos_emb = nn.Embedding(cfg.max_tokens, cfg.d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(cfg.n_layers))
        self.ln_text = nn.LayerNorm(cfg.d_model)
        self.text_proj = nn.Linear(cfg.d_model, cfg.d_embed)
        # phi_p
        self.pose_mlp = nn.Sequential(
            nn.Linear(24 * 3, cfg.d_pose_hidden), nn.LayerNorm(cfg.d_pose_hidden), nn.GELU(),
            nn.Linear(cfg.d_pose_hidden, cfg.d_pose_hidden), nn.LayerNorm(cfg.d_pose_hidden), nn.GELU(),
            nn.Linear(cfg.d_pose_hidden, cfg.d_embed))
        # the contrastive temperature, as a log logit scale: PoseScript starts it at 10
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        nn.init.normal_(self.start, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.start.device

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, math.log(100.0)).exp()  # () in [1, 100]

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (B, T) and mask (B, T) bool, T <= max_tokens - 1 (the start token comes on top)."""
        encoded = [self.tokenizer.encode(t)[:self.cfg.max_tokens - 1] for t in texts]
        T = max([1] + [len(e) for e in encoded])
        ids = torch.zeros(len(encoded), T, dtype=torch.long)  # (B, T) padding id 0, masked anyway
        mask = torch.zeros(len(encoded), T, dtype=torch.bool)  # (B, T)
        for b, e in enumerate(encoded):
            ids[b, :len(e)] = torch.tensor(e, dtype=torch.long)
            mask[b, :len(e)] = True
        if ids.numel() and int(ids.max()) >= self.cfg.vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside the retriever's vocabulary of "
                             f"{self.cfg.vocab_size}")
        return ids, mask

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """phi_t: ids (B, T) long, mask (B, T) bool (True = real token) -> (B, d_embed), unit rows."""
        B, T = ids.shape
        x = torch.cat([self.start.expand(B, 1, -1), self.tok_emb(ids)], 1)  # (B, 1 + T, d_model)
        x = x + self.pos_emb.weight[:T + 1]  # (B, 1 + T, d_model)
        real = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=ids.device), mask], 1)  # (B, 1 + T)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=~real)  # (B, 1 + T, d_model)
        x = self.ln_text(x)  # (B, 1 + T, d_model)
        pooled = (x * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # (B, d_model) mean of real positions
        return F.normalize(self.text_proj(pooled), dim=-1)  # (B, d_embed)

    def text_features_by_length(self, ids: torch.Tensor, mask: torch.Tensor, groups: int = 4) -> torch.Tensor:
        """phi_t (Eq. 8), as text_features, for a batch in `groups` runs of rows sorted by length, each cut
        to its own longest text: the same features (a text reads only its own positions), with less padding.
        A batch of 256 PoseWorld captions averages 25 tokens but is padded to its longest, about 54; in 4
        runs a retriever's training step took 90 against 115 ms (tests/benchmark.py retriever).
        (B, T), (B, T) -> (B, d_embed)"""
        if len(ids) == 0:
            return self.text_features(ids, mask)
        lengths = mask.sum(1)  # (B,)
        order = lengths.argsort()  # (B,) shortest first
        runs = order.chunk(groups)  # at most `groups` runs (fewer when B < groups), none empty
        longest = torch.stack([lengths[rows].max() for rows in runs]).tolist()  # one read from the device
        parts = []
        for rows, T in zip(runs, longest):
            T = max(1, T)
            parts.append(self.text_features(ids[rows, :T], mask[rows, :T]))  # (b, d_embed)
        return torch.cat(parts)[order.argsort()]  # (B, d_embed) back in the batch's order

    def pose_features(self, joints: torch.Tensor) -> torch.Tensor:
        """phi_p: SMPL joints (B, 24, 3) metres, any global orientation -> (B, d_embed), unit rows."""
        return self.body_pose_features(body_frame(joints).to(self.device))  # (B, d_embed)

    def body_pose_features(self, J_body: torch.Tensor) -> torch.Tensor:
        """phi_p of joints already in the body frame (see `body_frame`). (B, 24, 3) -> (B, d_embed)"""
        return F.normalize(self.pose_mlp(J_body.flatten(1)), dim=-1)  # (B, d_embed)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """phi_t of texts, no gradient, batched. (n,) -> (n, d_embed) on the retriever's device."""
        out = [torch.zeros(0, self.cfg.d_embed, device=self.device)]
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[i:i + batch_size])  # (b, T)
            out.append(self.text_features(ids.to(self.device), mask.to(self.device)))  # (b, d_embed)
        return torch.cat(out)  # (n, d_embed)

    @torch.no_grad()
    def encode_pose(self, joints: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """phi_p of joints, no gradient, batched. (n, 24, 3) -> (n, d_embed) on the retriever's device."""
        if joints.dim() != 3 or joints.shape[1:] != (24, 3):
            raise ValueError(f"encode_pose expects SMPL joints (n, 24, 3), got {tuple(joints.shape)}")
        if not torch.isfinite(joints).all():
            raise ValueError("encode_pose: the joints hold NaN or inf (the semantic reward screens these "
                             "out before encoding; do the same)")
        out = [torch.zeros(0, self.cfg.d_embed, device=self.device)]
        for i in range(0, joints.shape[0], batch_size):
            out.append(self.pose_features(joints[i:i + batch_size].to(self.device)))  # (b, d_embed)
        return torch.cat(out)  # (n, d_embed)

    # --- saving and loading: a folder with the weights, the config and the tokenizer ---

    FILES = {"weights": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}

    def save(self, path: str, train_info: dict | None = None) -> None:
        """Write the folder `path`: model.safetensors, config.json (the RetrieverConfig and `train_info`,
        by default what train_retriever recorded) and tokenizer.json (so the folder is self-contained).
        Each file is written to a temporary name and renamed over the target, so a reader never sees
        half a file; config.json comes last."""
        os.makedirs(path, exist_ok=True)

        def atomic(name: str, write: Callable[[str], None]) -> None:
            target = os.path.join(path, name)
            tmp = f"{target}.tmp{os.getpid()}"
            write(tmp)
            os.replace(tmp, target)

        atomic(self.FILES["tokenizer"], self.tokenizer.save)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic(self.FILES["weights"], lambda p: save_file(state, p))
        info = {"config": asdict(self.cfg), "train": train_info or getattr(self, "train_info", {})}

        def write_config(p: str) -> None:
            with open(p, "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2)
        atomic(self.FILES["config"], write_config)

    @classmethod
    def load(cls, path: str, tokenizer=None, device: str | torch.device = "cpu") -> "PoseTextRetriever":
        """Read a folder written by `save`. tokenizer: the one the retriever was trained with; by default
        the folder's tokenizer.json, read with model.Tokenizer.

        Checks, each with an error that says what differs: the config's fields, the tokenizer (vocabulary
        size and fingerprint), and every weight's name and shape against what the config builds."""
        files = {k: os.path.join(path, name) for k, name in cls.FILES.items()}
        needed = ("config", "weights") + (("tokenizer",) if tokenizer is None else ())
        for key in needed:
            if not os.path.isfile(files[key]):
                raise FileNotFoundError(f"retriever file not found: {files[key]} (its {key}). Expected a folder "
                                        f"written by PoseTextRetriever.save; train_sft.py trains and saves "
                                        f"the retrievers (rewards.train_retriever).")
        try:
            with open(files["config"], encoding="utf-8") as f:
                raw = json.load(f).get("config", {})
            if not isinstance(raw, dict):
                raise ValueError(f"'config' is a {type(raw).__name__}, not a dict")
        except (ValueError, AttributeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{files['config']}: not a retriever config.json ({type(e).__name__}: {e}); "
                             f"retrain the retrievers (delete the folder and rerun train_sft.py)") from None
        names = {fd.name for fd in fields(RetrieverConfig)}
        if set(raw) != names:
            raise ValueError(f"{files['config']}: config fields differ from RetrieverConfig: unknown "
                             f"{sorted(set(raw) - names)}, missing {sorted(names - set(raw))}")
        cfg = RetrieverConfig(**raw)
        if tokenizer is None:
            tokenizer = M.Tokenizer.from_file(files["tokenizer"])
        fingerprint = tokenizer_fingerprint(tokenizer)
        if tokenizer.vocab_size != cfg.vocab_size or fingerprint != cfg.tokenizer_fingerprint:
            raise ValueError(f"{files['config']}: the retriever was trained with another tokenizer (vocab "
                             f"{cfg.vocab_size}, fingerprint {cfg.tokenizer_fingerprint}); the one given has "
                             f"vocab {tokenizer.vocab_size}, fingerprint {fingerprint}. Pass the tokenizer "
                             f"of the same run, or none to use the folder's tokenizer.json.")
        retriever = cls(cfg, tokenizer)
        try:
            state = load_file(files["weights"])
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{files['weights']}: not a readable safetensors file ({e}); retrain the "
                             f"retrievers (delete the folder and rerun train_sft.py)") from None
        expected = {k: tuple(v.shape) for k, v in retriever.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            wrong = [f"{k}: file {found[k]} vs config {expected[k]}" for k in sorted(set(found) & set(expected))
                     if found[k] != expected[k]]
            raise ValueError(f"{files['weights']} does not match {files['config']}: missing "
                             f"{sorted(set(expected) - set(found))}, unexpected "
                             f"{sorted(set(found) - set(expected))}, shapes {wrong}")
        retriever.load_state_dict(state)
        return retriever.to(device).eval()


def contrastive_loss(text_emb: torch.Tensor, pose_emb: torch.Tensor, scale: torch.Tensor,
                     extra_poses: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of B matching pairs (row i of each). (B, d), (B, d), () -> ()

    logits[i, j] = scale * cos(text i, pose j); each text must pick out its pose among the B poses,
    and each pose its text among the B texts; the loss is the mean of the two cross-entropies.
    extra_poses (E, d), optional: poses that match no text (hard negatives), added to the candidates
    of the text-to-pose cross-entropy only."""
    logits = scale * text_emb @ pose_emb.T  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    t2p = logits if extra_poses is None else torch.cat([logits, scale * text_emb @ extra_poses.T], 1)  # (B, B + E)
    return 0.5 * (F.cross_entropy(t2p, target) + F.cross_entropy(logits.T, target))


_MIRROR = [smpl.JOINT_NAMES.index(n.replace("left_", "@").replace("right_", "left_").replace("@", "right_"))
           for n in smpl.JOINT_NAMES]  # joint index of the other side (pelvis, spine, head map to themselves)
_SIDE_WORDS = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}


def mirror_text(text: str) -> str:
    """The description of the mirrored pose: swap the words left and right."""
    return re.sub(r"\b(left|right|Left|Right)\b", lambda m: _SIDE_WORDS[m.group(1)], text)


def mirror_joints(joints: torch.Tensor) -> torch.Tensor:
    """The left-right mirror image of a body, in its body frame. (B, 24, 3) -> (B, 24, 3)

    In the body frame x points to the body's left: negate x and swap each left joint with its right one.
    The built-in skeleton is symmetric only to 1 cm, so phi_p, which re-canonicalises what it is given,
    sees the mirrored body turned by about 2.6 degrees: harmless noise for an augmentation."""
    J = body_frame(joints)  # (B, 24, 3)
    return J[:, _MIRROR] * torch.tensor([-1.0, 1.0, 1.0], dtype=J.dtype, device=J.device)  # (B, 24, 3)


def train_retriever(joints: torch.Tensor, texts: Sequence[str], tokenizer, steps: int = 400,
                    batch_size: int = 128, lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
                    progress: bool = True, flip_lr: bool = True, cfg: RetrieverConfig | None = None,
                    hard_negatives: torch.Tensor | None = None) -> PoseTextRetriever:
    """Train a PoseTextRetriever on pairs (joints[i], texts[i]) with the contrastive loss.

    joints (N, 24, 3) metres; texts N captions. AdamW (weight decay 0.01) with a linear warm-up over
    the first 5% of steps and a cosine decay to 0; batches are drawn without repetition within an epoch
    (a pair twice in one batch would be its own negative). flip_lr: each pair of a batch is replaced,
    with probability 1/2, by its mirror image, the pose mirrored left-right and "left" and "right"
    swapped in the text (PoseScript's --apply_LR_augmentation); on PoseWorld's few thousand captions
    this halves the over-fitting of the pose encoder. `seed` fixes the initial weights and the batches,
    leaving the caller's random state alone. cfg overrides the default sizes (vocab_size and the
    fingerprint are taken from the tokenizer). Returns the model in eval mode on `device`, with
    `train_info` (settings, final loss, seconds) set for `save`.

    hard_negatives (N, 24, 3), optional (not in PoseScript): for each pair, a pose close to its pose that
    breaks at least one of the codes its caption names (data.twin_poses). Each text must then pick out
    its pose among the batch's B poses AND their B twins (the text-to-pose cross-entropy runs over 2B
    poses; the pose-to-text one is unchanged). In-batch negatives are mostly other archetypes, easy to
    tell apart; a twin differs from the true pose in a detail the caption states, which is what the
    semantic reward must rank among a policy's samples.
    """
    N = len(texts)
    if joints.dim() != 3 or joints.shape != (N, 24, 3):
        raise ValueError(f"train_retriever expects joints (N, 24, 3) for N={N} texts, got {tuple(joints.shape)}")
    if not torch.isfinite(joints).all():
        raise ValueError("train_retriever: the joints hold NaN or inf")
    if hard_negatives is not None and (hard_negatives.shape != joints.shape or not torch.isfinite(hard_negatives).all()):
        raise ValueError(f"train_retriever: hard_negatives must be finite joints shaped like joints "
                         f"{tuple(joints.shape)}, got {tuple(hard_negatives.shape)}")
    if not 2 <= batch_size <= N:
        raise ValueError(f"batch_size must be in [2, N={N}] (a contrastive batch needs negatives), got {batch_size}")
    base = cfg or RetrieverConfig(vocab_size=0, tokenizer_fingerprint="")
    cfg = RetrieverConfig(**{**asdict(base), "vocab_size": tokenizer.vocab_size,
                             "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)})
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PoseTextRetriever(cfg, tokenizer).to(device)
    g = torch.Generator().manual_seed(seed)

    # Rows 0..N-1 are the pairs, rows N..2N-1 their mirror images. The joints are put in the body
    # frame once (phi_p would do it at every step), the texts tokenised once; each batch's texts run in
    # runs of similar length (text_features_by_length).
    J_body = body_frame(torch.cat([joints, mirror_joints(joints)] if flip_lr else [joints]))  # (2N or N, 24, 3)
    J_body = J_body.to(device)
    J_twin = None  # (2N or N, 24, 3) row i: the twin of row i's pose (mirrored with it)
    if hard_negatives is not None:
        twins = hard_negatives.to(joints.dtype)
        J_twin = body_frame(torch.cat([twins, mirror_joints(twins)] if flip_lr else [twins])).to(device)
    ids, mask = model.tokenize(list(texts) + ([mirror_text(t) for t in texts] if flip_lr else []))  # (2N or N, T)
    ids, mask = ids.to(device), mask.to(device)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)  # as in train_sft.py
    warmup = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    order, pos, loss_value = torch.randperm(N, generator=g), 0, float("nan")
    start = time.time()
    bar = tqdm(range(steps), desc="retriever", disable=not progress, leave=False)
    for _ in bar:
        if pos + batch_size > N:  # a new epoch
            order, pos = torch.randperm(N, generator=g), 0
        batch = order[pos:pos + batch_size]  # (B,)
        pos += batch_size
        if flip_lr:
            batch = batch + N * (torch.rand(batch_size, generator=g) < 0.5)  # (B,) half of them mirrored
        batch = batch.to(device)
        text_emb = model.text_features_by_length(ids[batch], mask[batch])  # (B, d)
        pose_emb = model.body_pose_features(J_body[batch])  # (B, d)
        twin_emb = None if J_twin is None else model.body_pose_features(J_twin[batch])  # (B, d)
        loss = contrastive_loss(text_emb, pose_emb, model.logit_scale(), extra_poses=twin_emb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", scale=f"{model.logit_scale().item():.1f}")
    model.train_info = {"pairs": N, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                        "flip_lr": flip_lr, "hard_negatives": hard_negatives is not None, "final_loss": loss_value, "seconds": round(time.time() - start, 1)}
    return model.eval()


def split_halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of range(n), (ceil(n/2),) and (floor(n/2),) long, each sorted.

    For the cross-retriever check (Table 6): train_sft.py trains the reward retriever on the captions
    of one half and the evaluation retriever, with another seed, on the other. The paper's evaluator
    differs from its reward model in data and framework (PoseEmbroider vs PoseScript); here only in
    its captions (the other half) and its initialisation. That separates what RFT learned about the
    text from the quirks of one retriever; it cannot catch blind spots the two share."""
    if n < 2:
        raise ValueError(f"split_halves needs at least 2 items, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    half = (n + 1) // 2
    return perm[:half].sort().values, perm[half:].sort().values


# ====================================================================================================
# File formats: not in the paper
#
# BGE-M3, the paper's text embedder E, read from a local BAAI/bge-m3 folder without `transformers`:
# Unicode grapheme clusters, SentencePiece's precompiled charsmap, the Unigram tokenizer of its
# tokenizer.json, and the XLM-RoBERTa encoder. The sparse and ColBERT heads of BGE-M3
# (sparse_linear.pt, colbert_linear.pt) are not needed for the dense score.
#
# Files read from the `BAAI/bge-m3` folder: config.json, tokenizer.json, and model.safetensors or
# pytorch_model.bin.

BGE_M3_MAX_LENGTH = 8192  # the longest input BGE-M3 was trained for (8194 positions - padding_idx - 1)

# Characters Rust's `char::is_whitespace` accepts (Unicode White_Space). Python's str.isspace differs
# (it also accepts U+001C..U+001F), and `tokenizers` is the reference here.
_WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
               "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def _missing_file_error(path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"BGE-M3 file not found: {path} ({what}). Point the text reward at a local copy of the "
        f"BAAI/bge-m3 folder (config.json, tokenizer.json, model.safetensors or pytorch_model.bin), "
        f"or leave the text reward on its built-in default embedder, which needs no download.")


# --- Grapheme clusters, for the Precompiled normaliser -----------------------------------------------
# `tokenizers` applies the SentencePiece charsmap per extended grapheme cluster (Unicode UAX #29, via
# the unicode-segmentation crate). The stdlib has no cluster data, so the rules are rebuilt from
# unicodedata: CR LF, controls, Hangul syllables, prepend marks, regional-indicator pairs, and
# extend / spacing marks (categories Mn, Me, Mc, ZWJ, ZWNJ, Other_Grapheme_Extend, emoji
# modifiers). Not rebuilt: emoji ZWJ sequences (GB11) and the Indic conjunct rule (GB9c). Both only
# make clusters of 6 bytes or more, which the normaliser treats character by character anyway; the
# Unicode version of Python's unicodedata may also lag the crate's for new characters.

_OTHER_GRAPHEME_EXTEND = {0x09BE, 0x09D7, 0x0B3E, 0x0B57, 0x0BBE, 0x0BD7, 0x0CC2, 0x0CD5, 0x0CD6,
                          0x0D3E, 0x0D57, 0x0DCF, 0x0DDF, 0x1B35, 0x200C, 0x302E, 0x302F, 0xFF9E,
                          0xFF9F, 0x1133E, 0x11357, 0x114B0, 0x114BD, 0x115AF, 0x11930, 0x1D165,
                          *range(0x1D16E, 0x1D173), *range(0xE0020, 0xE0080)}
_PREPEND = {*range(0x0600, 0x0606), 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x0D4E, 0x110BD, 0x110CD,
            0x111C2, 0x111C3, 0x1193F, 0x11941, 0x11A3A, *range(0x11A84, 0x11A8A), 0x11D46, 0x11F02}


def _grapheme_class(ch: str) -> str:
    cp = ord(ch)
    if ch in "\r\n":
        return ch
    if cp in _PREPEND:
        return "Prepend"
    if cp == 0x200D:
        return "ZWJ"
    cat = unicodedata.category(ch)
    if cat in ("Mn", "Me") or cp in _OTHER_GRAPHEME_EXTEND or 0x1F3FB <= cp <= 0x1F3FF:
        return "Extend"
    if cat in ("Cc", "Zl", "Zp", "Cf"):
        return "Control"
    if cat == "Mc" or cp in (0x0E33, 0x0EB3):
        return "SpacingMark"
    if 0x1F1E6 <= cp <= 0x1F1FF:
        return "RI"
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return "L"
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return "V"
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return "T"
    if 0xAC00 <= cp <= 0xD7A3:
        return "LV" if (cp - 0xAC00) % 28 == 0 else "LVT"
    return "Other"


def _graphemes(text: str) -> list[str]:
    """Split text into extended grapheme clusters (UAX #29, approximated as described above)."""
    clusters: list[str] = []
    prev = None
    n_ri = 0  # regional indicators at the end of the current cluster, which pair up as flags
    for ch in text:
        cls = _grapheme_class(ch)
        if prev is None:
            join = False
        elif prev == "\r" and cls == "\n":
            join = True  # GB3
        elif prev in ("Control", "\r", "\n") or cls in ("Control", "\r", "\n"):
            join = False  # GB4, GB5
        elif prev == "L" and cls in ("L", "V", "LV", "LVT"):
            join = True  # GB6
        elif prev in ("LV", "V") and cls in ("V", "T"):
            join = True  # GB7
        elif prev in ("LVT", "T") and cls == "T":
            join = True  # GB8
        elif cls in ("Extend", "ZWJ", "SpacingMark") or prev == "Prepend":
            join = True  # GB9, GB9a, GB9b
        elif prev == "RI" and cls == "RI":
            join = n_ri % 2 == 1  # GB12, GB13
        else:
            join = False
        if join:
            clusters[-1] += ch
        else:
            clusters.append(ch)
            n_ri = 0
        n_ri = n_ri + 1 if cls == "RI" else 0
        prev = cls
    return clusters


class PrecompiledCharsmap:
    """SentencePiece's `precompiled_charsmap` normaliser (for BGE-M3: nmt_nfkc), read exactly.

    Format: a little-endian uint32 giving the byte size of a darts-clone double-array trie, the
    trie's uint32 units, then a pool of NUL-terminated replacement strings; a key's value is the
    offset of its replacement in the pool. Each unit packs a label (low 8 bits), a has-leaf flag (bit
    8), and an offset to its children (bits 10-31, shifted left by 8 more when bit 9 is set); leaf
    units hold the value in bits 0-30 with bit 31 set, so they never match a label.

    Normalisation follows `tokenizers` (spm_precompiled) rather than sentencepiece's own C++: a
    grapheme cluster shorter than 6 bytes is replaced whole by the replacement of the *shortest* key
    that prefixes it; otherwise, and when no key matches, each character is replaced on its own.
    """

    def __init__(self, blob: bytes):
        if len(blob) < 4:
            raise ValueError(f"precompiled_charsmap too short ({len(blob)} bytes); expected a uint32 "
                             f"trie size, the trie, and the replacement strings")
        (trie_size,) = struct.unpack_from("<I", blob, 0)
        if trie_size % 4 or 4 + trie_size > len(blob):
            raise ValueError(f"precompiled_charsmap truncated or corrupt: trie of {trie_size} bytes "
                             f"in a blob of {len(blob)} bytes")
        self.units = struct.unpack_from(f"<{trie_size // 4}I", blob, 4)
        self.pool = blob[4 + trie_size:]

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def transform(self, chunk: str) -> str | None:
        """Replacement of the shortest key prefixing `chunk`, or None if no key does."""
        units = self.units
        pos = self._offset(units[0]) if units else 0
        for c in chunk.encode("utf-8"):
            if c == 0:  # keys never contain NUL; darts-clone stops there
                return None
            pos ^= c
            if pos >= len(units) or (units[pos] & ((1 << 31) | 0xFF)) != c:
                return None
            unit = units[pos]
            pos ^= self._offset(unit)
            if (unit >> 8) & 1 and pos < len(units):
                start = units[pos] & ((1 << 31) - 1)
                end = self.pool.find(b"\0", start)
                return self.pool[start:end if end >= 0 else len(self.pool)].decode("utf-8")
        return None

    def __call__(self, text: str) -> str:
        out = []
        for cluster in _graphemes(text):
            if len(cluster.encode("utf-8")) < 6:
                whole = self.transform(cluster)
                if whole is not None:
                    out.append(whole)
                    continue
            for ch in cluster:
                rep = self.transform(ch)
                out.append(ch if rep is None else rep)
        return "".join(out)


# --- The tokenizer (tokenizer.json: normaliser, Metaspace, Unigram, template) -------------------------


class UnigramTokenizer:
    """BGE-M3's (XLM-R's) tokenizer, read from a Hugging Face `tokenizer.json` of a Unigram model.

    The pipeline of `tokenizers`, step by step:
    1. added tokens (<s>, </s>, <pad>, <unk>, <mask>) are cut out of the raw text first, with their
       lstrip / rstrip whitespace, and become their own ids;
    2. every other piece is normalised (Precompiled nmt_nfkc charsmap, then whitespace handling:
       Replace " {2,}" and / or Strip, depending on the converter version that wrote the file);
    3. pre-tokenised by Metaspace: spaces become "▁", a "▁" is prepended, the text splits before
       each "▁" (or the legacy WhitespaceSplit + Metaspace);
    4. each word is segmented by Viterbi over the piece log-probabilities (`_viterbi`);
    5. the template adds <s> ... </s>, after truncation to max_length.
    Known difference: an added token marked "normalized": true is matched in the raw text rather
    than in the normalised text (XLM-R's special tokens are all normalized: false).
    """

    UNK_PENALTY = 10.0  # an unknown character scores min(log-prob) - 10, as in tokenizers and spm

    def __init__(self, spec: dict, source: str = "tokenizer.json"):
        model = spec.get("model") or {}
        if model.get("type") != "Unigram":
            raise ValueError(f"{source}: expected a Unigram model (BGE-M3 / XLM-R), got "
                             f"{model.get('type')!r}")
        if model.get("byte_fallback"):
            raise ValueError(f"{source}: byte_fallback Unigram models are not supported")
        vocab = model["vocab"]  # [[piece, log_prob], ...], index = id
        if model.get("unk_id") is None:
            raise ValueError(f"{source}: the Unigram model has no unk_id")
        self.unk_id = int(model["unk_id"])
        # Later duplicates win, like the HashMap of tokenizers.
        self.pieces = {piece: (i, float(score)) for i, (piece, score) in enumerate(vocab)}
        self.max_piece_len = max(len(piece) for piece, _ in vocab)
        self.unk_score = min(float(score) for _, score in vocab) - self.UNK_PENALTY
        self.pad_id = self.pieces["<pad>"][0] if "<pad>" in self.pieces else 1

        self.added = {}  # content -> id
        patterns = []
        for tok in sorted(M.added_tokens(spec, source), key=lambda t: -len(t["content"])):
            self.added[tok["content"]] = int(tok["id"])
            ws = f"[{re.escape(_WHITESPACE)}]*"
            patterns.append((ws if tok.get("lstrip") else "") + f"({re.escape(tok['content'])})"
                            + (ws if tok.get("rstrip") else ""))
        self.added_re = re.compile("|".join(patterns)) if patterns else None

        self.normalizers = self._read_normalizer(spec.get("normalizer"), source)
        self.pre_tokenizers = self._read_pre_tokenizer(spec.get("pre_tokenizer"), source)
        self.prefix_ids, self.suffix_ids = self._read_post_processor(spec.get("post_processor"),
                                                                     source)

    @classmethod
    def from_file(cls, path: str) -> "UnigramTokenizer":
        missing = _missing_file_error(path, "the Hugging Face tokenizer of BGE-M3")
        return cls(M.read_tokenizer_json(path, missing), source=path)

    # reading the JSON components

    @staticmethod
    def _read_normalizer(spec: dict | None, source: str) -> list:
        steps = []
        for part in M.tokenizer_components(spec, "normalizers"):
            kind = part["type"]
            if kind == "Precompiled":
                charsmap = part.get("precompiled_charsmap")
                steps += [PrecompiledCharsmap(base64.b64decode(charsmap))] if charsmap else []
            elif kind == "Replace":
                pattern = part["pattern"]
                # Rust-regex syntax; the patterns the converters write (" {2,}") mean the same in `re`.
                regex = re.compile(pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"]))
                steps.append(lambda s, r=regex, c=part["content"]: r.sub(c, s))
            elif kind == "Strip":
                if part.get("strip_left", False):
                    steps.append(lambda s: s.lstrip(_WHITESPACE))
                if part.get("strip_right", False):
                    steps.append(lambda s: s.rstrip(_WHITESPACE))
            elif kind in ("NFC", "NFD", "NFKC", "NFKD"):
                steps.append(lambda s, form=kind: unicodedata.normalize(form, s))
            else:
                raise ValueError(f"{source}: normalizer {kind!r} is not supported (BGE-M3 uses Precompiled, "
                                 f"Replace and Strip)")
        return steps

    @staticmethod
    def _read_pre_tokenizer(spec: dict | None, source: str) -> list[tuple[str, dict]]:
        steps = []
        for part in M.tokenizer_components(spec, "pretokenizers"):
            if part["type"] == "WhitespaceSplit":
                steps.append(("whitespace", {}))
            elif part["type"] == "Metaspace":
                replacement, scheme, split = M.metaspace_options(part)
                steps.append(("metaspace", {"replacement": replacement, "prepend": scheme, "split": split}))
            else:
                raise ValueError(f"{source}: pre_tokenizer {part['type']!r} is not supported (BGE-M3 uses "
                                 f"Metaspace)")
        return steps

    @staticmethod
    def _read_post_processor(spec: dict | None, source: str) -> tuple[list[int], list[int]]:
        if spec is None:
            return [], []
        if spec["type"] == "RobertaProcessing":
            return [int(spec["cls"][1])], [int(spec["sep"][1])]
        if spec["type"] == "TemplateProcessing":
            prefix, suffix, seen_a = [], [], False
            for item in spec["single"]:
                if "Sequence" in item:
                    seen_a = True
                else:
                    ids = spec["special_tokens"][item["SpecialToken"]["id"]]["ids"]
                    (suffix if seen_a else prefix).extend(int(i) for i in ids)
            return prefix, suffix
        raise ValueError(f"{source}: post_processor {spec['type']!r} is not supported (BGE-M3 uses "
                         f"TemplateProcessing <s> $A </s>)")

    # the pipeline

    def _pre_tokenize(self, text: str, at_start: bool) -> list[str]:
        words = [text]
        for kind, opt in self.pre_tokenizers:
            if kind == "whitespace":
                words = [w for word in words for w in re.split(f"[{re.escape(_WHITESPACE)}]+", word) if w]
                continue
            rep, out = opt["replacement"], []
            for k, word in enumerate(words):
                word = word.replace(" ", rep)
                # "first": only the piece that starts the original text gets the prefix.
                prepend = opt["prepend"] == "always" or (opt["prepend"] == "first" and at_start and k == 0)
                if word and prepend and not word.startswith(rep):
                    word = rep + word
                if opt["split"]:  # split before every replacement character, keeping it
                    out.extend(piece for piece in re.split(f"(?={re.escape(rep)})", word) if piece)
                elif word:
                    out.append(word)
            words = out
        return words

    def _viterbi(self, word: str) -> list[int]:
        """Most probable segmentation of one word: max over segmentations of the sum of log-probs.

        Mirrors `tokenizers`' Unigram.encode_optimized: positions are visited left to right and a
        node only replaces a strictly better one (so ties keep the earliest start). A character that
        no one-character piece covers gets an <unk> edge scored min(log-prob) - 10, and runs of
        <unk> are fused into one token.
        """
        n = len(word)
        score = [0.0] + [-math.inf] * n  # best log-prob of word[:j]
        start = [-1] * (n + 1)  # where the last piece of that best path starts
        for i in range(n):
            single = False
            for j in range(i + 1, min(n, i + self.max_piece_len) + 1):
                hit = self.pieces.get(word[i:j])
                if hit is None:
                    continue
                cand = score[i] + hit[1]
                if start[j] < 0 or cand > score[j]:
                    score[j], start[j] = cand, i
                single = single or j == i + 1
            if not single:
                cand = score[i] + self.unk_score
                if start[i + 1] < 0 or cand > score[i + 1]:
                    score[i + 1], start[i + 1] = cand, i
        pieces, j = [], n
        while j > 0:
            i = start[j]
            piece = word[i:j]
            is_unk = self.pieces.get(piece, (self.unk_id,))[0] == self.unk_id
            if is_unk and pieces and pieces[-1][1]:
                pieces[-1] = (piece + pieces[-1][0], True)  # fuse consecutive unknowns
            else:
                pieces.append((piece, is_unk))
            j = i
        return [self.pieces.get(piece, (self.unk_id,))[0] for piece, _ in reversed(pieces)]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of one text, <s> and </s> included, truncated to max_length ids in all."""
        ids, pos = [], 0
        matches = list(self.added_re.finditer(text)) if self.added_re else []
        for m in matches + [None]:
            end = m.start() if m else len(text)
            if end > pos:
                segment = text[pos:end]
                for normalize in self.normalizers:
                    segment = normalize(segment)
                for word in self._pre_tokenize(segment, at_start=pos == 0):
                    ids.extend(self._viterbi(word))
            if m:
                ids.append(self.added[next(g for g in m.groups() if g is not None)])
                pos = m.end()
        if max_length is not None:
            room = max_length - len(self.prefix_ids) - len(self.suffix_ids)
            if room < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the "
                                 f"{len(self.prefix_ids) + len(self.suffix_ids)} special tokens")
            ids = ids[:room]
        return self.prefix_ids + ids + self.suffix_ids

    def batch(self, texts: Sequence[str], max_length: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask of a batch: (B, T) long each."""
        encoded = [self.encode(t, max_length) for t in texts]
        T = max((len(e) for e in encoded), default=0)
        ids = torch.full((len(encoded), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(encoded), T, dtype=torch.long)  # (B, T)
        for b, e in enumerate(encoded):
            ids[b, :len(e)] = torch.tensor(e, dtype=torch.long)
            mask[b, :len(e)] = 1
        return ids, mask


# --- The encoder (XLM-RoBERTa, as BGE-M3 uses it) ----------------------------------------------------


@dataclass
class XLMRobertaConfig:
    """The fields of a Hugging Face XLM-RoBERTa config.json that the encoder needs (BGE-M3 values)."""
    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 8194
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    @classmethod
    def from_json(cls, path: str) -> "XLMRobertaConfig":
        if not os.path.isfile(path):
            raise _missing_file_error(path, "the XLM-RoBERTa config of BGE-M3")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r}, expected 'gelu' (exact erf)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type="
                             f"{raw['position_embedding_type']!r}, expected 'absolute'")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class XLMRobertaBlock(nn.Module):
    """One post-LayerNorm encoder block (BERT / RoBERTa): x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: XLMRobertaConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.n_head = cfg.num_attention_heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln_attn = nn.LayerNorm(d, eps=eps)
        self.fc_in = nn.Linear(d, cfg.intermediate_size)
        self.fc_out = nn.Linear(cfg.intermediate_size, d)
        self.ln_mlp = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d); keep: (B, 1, 1, T) bool, False on padding keys."""
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.n_head, d // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.n_head, d // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v(x).view(B, T, self.n_head, d // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, nh, T, hs)
        a = a.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        x = self.ln_attn(x + self.proj(a))  # (B, T, d)
        h = F.gelu(self.fc_in(x))  # (B, T, ff), exact erf GELU as in the checkpoint's "gelu"
        return self.ln_mlp(x + self.fc_out(h))  # (B, T, d)


# Hugging Face XLMRobertaModel parameter names -> ours (per block: "encoder.layer.N.<name>").
_HF_EMBEDDING_KEYS = {"embeddings.word_embeddings": "tok_emb", "embeddings.position_embeddings": "pos_emb",
                      "embeddings.token_type_embeddings": "type_emb", "embeddings.LayerNorm": "emb_ln"}
_HF_BLOCK_KEYS = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
                  "attention.output.dense": "proj", "attention.output.LayerNorm": "ln_attn",
                  "intermediate.dense": "fc_in", "output.dense": "fc_out", "output.LayerNorm": "ln_mlp"}
# In the checkpoint but unused by the dense embedding: the pooler (BGE-M3 pools the CLS state without
# it), a masked-LM head, and the position_ids buffer that older transformers versions saved.
_HF_UNUSED_PREFIXES = ("pooler.", "lm_head.", "embeddings.position_ids")


def _our_key(hf_key: str) -> str | None:
    """Our parameter name for a Hugging Face key (a 'roberta.' prefix allowed); None if unused; '' if
    unknown."""
    key = hf_key.removeprefix("roberta.")
    if key.startswith(_HF_UNUSED_PREFIXES):
        return None
    module, _, leaf = key.rpartition(".")
    if module in _HF_EMBEDDING_KEYS:
        return f"{_HF_EMBEDDING_KEYS[module]}.{leaf}"
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
    if m and m.group(2) in _HF_BLOCK_KEYS:
        return f"blocks.{m.group(1)}.{_HF_BLOCK_KEYS[m.group(2)]}.{leaf}"
    return ""


def _hf_key(our_key: str) -> str:
    """The Hugging Face name of one of our parameters (for error messages)."""
    module, _, leaf = our_key.rpartition(".")
    for hf, ours in _HF_EMBEDDING_KEYS.items():
        if module == ours:
            return f"{hf}.{leaf}"
    _, i, name = module.split(".")
    hf = next(hf for hf, ours in _HF_BLOCK_KEYS.items() if ours == name)
    return f"encoder.layer.{i}.{hf}.{leaf}"


class BGEM3(nn.Module):
    """The XLM-RoBERTa encoder of BGE-M3 and its dense embedding (the E of Eq. 10).

    Embeddings: word + absolute position + token type (always type 0), then LayerNorm; RoBERTa
    numbers positions from padding_idx + 1 and gives padding the padding position, i.e.
    position_ids = cumsum(mask) * mask + padding_idx with mask = (input_ids != pad). Then post-LN
    blocks. Dropout is left out: the encoder is only ever run frozen, in eval mode.
    """

    def __init__(self, cfg: XLMRobertaConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_position_embeddings, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(XLMRobertaBlock(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Last-layer hidden states. input_ids, attention_mask: (B, T) -> (B, T, d)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        pad = self.cfg.pad_token_id
        if T + pad >= self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than the "
                             f"{self.cfg.max_position_embeddings - pad - 1} positions of the model")
        if attention_mask is None:
            attention_mask = (input_ids != pad).long()  # (B, T)
        not_pad = (input_ids != pad).long()  # (B, T)
        position_ids = torch.cumsum(not_pad, dim=1) * not_pad + pad  # (B, T)
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids) + self.type_emb.weight[0]  # (B, T, d)
        x = self.emb_ln(x)  # (B, T, d)
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, keep)  # (B, T, d)
        return x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """BGE-M3's dense embedding: the first (CLS, <s>) token's last hidden state, L2-normalised.
        (B, T) -> (B, d)"""
        return F.normalize(self(input_ids, attention_mask)[:, 0], dim=-1)  # (B, d)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "BGEM3":
        """Load a BAAI/bge-m3 folder: config.json and model.safetensors (preferred) or
        pytorch_model.bin (read with weights_only=True, so pickled code is refused). Keys may carry
        a 'roberta.' prefix; the pooler is ignored."""
        cfg = XLMRobertaConfig.from_json(os.path.join(path, "config.json"))
        st_path, bin_path = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st_path):
            from safetensors.torch import load_file
            source, hf_state = st_path, load_file(st_path)
        elif os.path.isfile(bin_path):
            try:
                source, hf_state = bin_path, torch.load(bin_path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(f"{bin_path}: refused to load, it holds more than tensors (pickled "
                                 f"code?). Convert it to model.safetensors. ({err})") from err
        else:
            raise _missing_file_error(st_path, "the encoder weights; pytorch_model.bin is also accepted")

        state, unknown = {}, []
        for hf_key, tensor in hf_state.items():
            key = _our_key(hf_key)
            if key == "":
                unknown.append(hf_key)
            elif key is not None:
                state[key] = tensor.to(dtype)
        with torch.device("meta"):
            model = cls(cfg)
        missing = sorted(_hf_key(k) for k in set(model.state_dict()) - set(state))
        if unknown or missing:
            raise ValueError(f"{source} does not match an XLM-RoBERTa encoder of config.json: unknown "
                             f"keys {unknown[:10]}{' ...' if len(unknown) > 10 else ''}, missing "
                             f"keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        model.load_state_dict(state, assign=True)  # shapes are checked here
        return model.eval().requires_grad_(False)


class BGEM3TextEmbedder:
    """BGE-M3 dense embeddings of texts, from a local BAAI/bge-m3 folder (the paper's E).

    max_length caps each text at that many tokens (BGE-M3 accepts up to 8192); rewarded answers are
    short, so the default of 512 only bounds the cost of a runaway generation.
    """

    def __init__(self, path: str, max_length: int = 512, batch_size: int = 32,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if not 3 <= max_length <= BGE_M3_MAX_LENGTH:
            raise ValueError(f"max_length must be in [3, {BGE_M3_MAX_LENGTH}], got {max_length}")
        self.tokenizer = UnigramTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.model = BGEM3.from_pretrained(path, dtype=dtype).to(device)
        self.max_length, self.batch_size, self.device = max_length, batch_size, torch.device(device)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(n,) texts -> (n, d) float32, rows of unit norm."""
        out = [torch.zeros(0, self.model.cfg.hidden_size)]
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenizer.batch(texts[i:i + self.batch_size], self.max_length)  # (b, T)
            e = self.model.embed(ids.to(self.device), mask.to(self.device))  # (b, d)
            out.append(e.float().cpu())
        return torch.cat(out)  # (n, d)
