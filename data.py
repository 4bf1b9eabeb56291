"""Data for Pose-RFT: the synthetic PoseWorld, the conversation format, real data sets, pose pictures.

The paper trains and evaluates on four kinds of data (Sec. 4.1): text-pose pairs (PoseScript),
image-pose pairs (Human3.6M, 3DPW, ...), image-text-pose triples (BEDLAM-Script) and VQA
(LLaVA-Instruct). None of them can be downloaded where this project is built, and students want to see
the method work in minutes on a CPU, so this file also holds PoseWorld (README.md, "PoseWorld"), a procedural world
with the same one-to-many structure as the real tasks:

- a caption names only a few posecodes, so many poses fit it (text-to-pose);
- an image is a perspective projection, depth is lost, so several 3D poses fit it (image-to-pose);
- VQA about the pictured pose keeps a text task beside the pose tasks.

It is the training and evaluation world of the `tiny` preset, and its semantic checker
(`check_posecodes`) is exact: a caption only mentions codes that hold with a margin for its own pose.

Sections, top-down:
1. Archetypes and the pose sampler (joint-limited noise around ~14 archetypal poses)
2. Posecodes (after PoseScript, Delmas et al. 2022) and the exact semantic checker
3. Captions from posecodes
4. Cameras, projection and images of the posed skeleton
5. VQA about the pictured pose
6. The PoseWorld data set (t2p / i2p / vqa samples, splits, on-disk cache)
7. The conversation format (LLaVA v1), tokenisation with labels on the answer, image preprocessing for
   both encoders (CLIP and the HMR2.0 ViT), collation, sharded loading under torchrun, `build_datasets`,
   `TaskMixture` (RFT's prompts from the real sets in a stated task mix)
File formats, not in the paper:
8. Pictures: a zlib-only PNG writer and `render_poses` (grids of skeletons, Fig. 5 and the README)
9. Real images and the real data sets of Sec. 4.1: PoseScript, 3DPW, Human3.6M, LLaVA-Instruct-150k
   (BEDLAM-Script: see the note at the end of the file)

Frames: PoseWorld poses are made in the SMPL body frame (y up, the body faces +z, its left is +x) with
the identity global orientation. Cameras follow OpenCV (x right, y down, z forward), as HMR2.0 does,
and the image-to-pose target is the pose in the camera frame: global_orient_cam = R_cam @ global_orient.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import smpl

# The answer template of the pose tasks: the pose head reads the hidden state at POSE_TOKEN.
POSE_TOKEN = "<POSE>"
POSE_ANSWER = f"The SMPL pose of this person is {POSE_TOKEN}."

J_ = smpl.JOINT_INDEX  # short alias, used to name joints in the tables below


# ====================================================================================================
# 1. Archetypes and the pose sampler
#
# A joint rotation is written as three angles in degrees, (x, y, z), composed as R = Ry(y) Rz(z) Rx(x)
# in the joint's local frame (at rest every SMPL joint frame is aligned with the body frame). With this
# order x is applied first, which for the arms is the twist about the bone (the T-pose arm lies along
# x), z then raises or lowers the arm in the frontal plane and y swings it forward or back; for the legs
# x is flexion, z abduction. Angles make joint limits a box, which is easy to read and to clamp.
# Signs on the body's left: elbow flexion is -y (the forearm comes forward), knee flexion +x (the shank
# goes back), hip flexion -x, spine flexion +x, shoulder raise +z, shoulder forward -y.
# Mirroring left/right (reflection x -> -x) swaps the sides and negates the y and z angles.


def _both(name: str, x: float, y: float, z: float) -> dict:
    """The same rotation on the left joint and, mirrored, on the right one."""
    return {f"left_{name}": (x, y, z), f"right_{name}": (x, -y, -z)}


_ARMS_DOWN = {**_both("shoulder", 0, 0, -82), **_both("elbow", 0, -10, 0)}


@dataclass(frozen=True)
class Archetype:
    name: str
    description: str  # finishes "The person is ...": the VQA answer to "What is the person doing?"
    angles: dict  # joint name -> (x, y, z) degrees; joints left out are at 0


ARCHETYPES = (
    Archetype("standing", "standing with the arms down", {**_ARMS_DOWN}),
    Archetype("arms_up", "raising both arms", {**_both("shoulder", 0, 0, 80), **_both("collar", 0, 0, 15),
                                               **_both("elbow", 0, -5, 0)}),
    Archetype("t_pose", "standing in a T-pose", {}),
    Archetype("squat", "squatting", {**_both("hip", -105, 20, 0), **_both("knee", 120, 0, 0),
                                     **_both("ankle", -20, 0, 0), "spine1": (20, 0, 0), "spine2": (10, 0, 0),
                                     "spine3": (10, 0, 0), **_both("shoulder", 0, -85, 5)}),
    Archetype("lunge", "lunging forward", {**_ARMS_DOWN, "left_hip": (-85, 0, 5), "left_knee": (85, 0, 0),
                                           "right_hip": (25, 0, -5), "right_knee": (40, 0, 0),
                                           "right_ankle": (20, 0, 0)}),
    Archetype("sitting", "sitting", {**_both("hip", -90, 5, 0), **_both("knee", 90, 0, 0),
                                     **_both("shoulder", 0, -70, -55), **_both("elbow", 0, -40, 0)}),
    Archetype("kneeling", "kneeling", {**_ARMS_DOWN, **_both("knee", 90, 0, 0), **_both("ankle", 30, 0, 0)}),
    Archetype("kicking", "kicking", {"left_hip": (-80, 0, 0), "left_knee": (15, 0, 0), "right_knee": (10, 0, 0),
                                     "spine1": (-8, 0, 0), **_both("shoulder", 0, 0, -35),
                                     **_both("elbow", 0, -20, 0)}),
    Archetype("bending", "bending forward", {"spine1": (40, 0, 0), "spine2": (30, 0, 0), "spine3": (25, 0, 0),
                                             **_both("hip", -25, 0, 0), **_both("shoulder", 0, -90, -15)}),
    Archetype("reaching", "reaching forward", {"left_shoulder": (0, -70, 40), "left_collar": (0, -10, 10),
                                               "right_shoulder": (0, 0, 75), "right_elbow": (0, 10, 0),
                                               "spine1": (10, 0, 0), "spine2": (0, -10, 0)}),
    Archetype("waving", "waving", {"left_shoulder": (-90, 0, 15), "left_elbow": (0, -100, 0),
                                   "right_shoulder": (0, 0, 75), "right_elbow": (0, 10, 0)}),
    Archetype("arms_crossed", "standing with the arms crossed",
              {**_both("shoulder", 0, -105, -30), **_both("elbow", 0, -75, 0)}),
    Archetype("balancing", "balancing on one leg", {"left_hip": (-60, 0, 10), "left_knee": (100, 0, 0),
                                                    **_both("shoulder", 0, 0, -30)}),
    Archetype("hands_on_hips", "standing with the hands on the hips",
              {**_both("shoulder", 75, -10, -60), **_both("elbow", 0, -75, 0)}),
)
ARCHETYPE_INDEX = {a.name: i for i, a in enumerate(ARCHETYPES)}

# Box limits per joint and axis, in degrees, for the centre and the LEFT joints; the right ones are the
# mirror (x kept, y and z negated and swapped). The hinge joints get almost no freedom off their axis,
# and their flexion range has one sign only: elbows and knees bend the anatomical way and no further.
_LIMITS = {  # name: ((x_lo, x_hi), (y_lo, y_hi), (z_lo, z_hi))
    "pelvis": ((0, 0), (0, 0), (0, 0)),  # canonical global orientation
    "left_hip": ((-125, 30), (-35, 35), (-25, 60)),
    "spine1": ((-15, 40), (-20, 20), (-15, 15)),
    "left_knee": ((0, 150), (-5, 5), (-3, 3)),
    "spine2": ((-15, 40), (-20, 20), (-15, 15)),
    "left_ankle": ((-30, 45), (-15, 15), (-15, 15)),
    "spine3": ((-15, 40), (-20, 20), (-15, 15)),
    "left_foot": ((-10, 30), (-5, 5), (-5, 5)),
    "neck": ((-30, 40), (-45, 45), (-25, 25)),
    "left_collar": ((-10, 10), (-15, 15), (-10, 25)),
    "head": ((-20, 25), (-20, 20), (-15, 15)),
    "left_shoulder": ((-90, 90), (-110, 45), (-90, 100)),
    "left_elbow": ((-40, 40), (-150, 0), (-5, 5)),
    "left_wrist": ((-40, 40), (-30, 30), (-70, 60)),
    "left_hand": ((-10, 10), (-10, 10), (-10, 10)),
}
# Noise around the archetype, standard deviation per joint and axis, degrees (same naming as _LIMITS).
_NOISE = {
    "pelvis": (0, 0, 0), "left_hip": (8, 6, 5), "spine1": (5, 5, 4), "left_knee": (8, 2, 1),
    "spine2": (5, 5, 4), "left_ankle": (6, 4, 4), "spine3": (5, 5, 4), "left_foot": (4, 2, 2),
    "neck": (10, 10, 6), "left_collar": (3, 4, 4), "head": (5, 6, 4), "left_shoulder": (10, 10, 10),
    "left_elbow": (10, 10, 2), "left_wrist": (10, 8, 12), "left_hand": (3, 3, 3),
}

# MIRROR[k] is the joint that k becomes under the left/right reflection.
MIRROR = [J_[n.replace("left_", "right_") if n.startswith("left_") else n.replace("right_", "left_")]
          for n in smpl.JOINT_NAMES]


def _mirror_angles(angles: torch.Tensor) -> torch.Tensor:
    """Angles (..., 24, 3) of the mirrored pose: sides swapped, y and z negated (see the section note)."""
    sign = torch.tensor([1.0, -1.0, -1.0], dtype=angles.dtype)
    return angles[..., MIRROR, :] * sign  # (..., 24, 3)


def _joint_table(table: dict) -> torch.Tensor:
    """Expand a table of centre and left joints to all 24 joints (right = mirror of left)."""
    rows = []
    for name in smpl.JOINT_NAMES:
        rows.append(table[name.replace("right_", "left_")])
    return torch.tensor(rows, dtype=torch.float32)  # (24, 3) or (24, 3, 2)


_LIMIT_LEFT = _joint_table(_LIMITS)  # (24, 3, 2) as if every side joint were a left one
_IS_RIGHT = torch.tensor([n.startswith("right_") for n in smpl.JOINT_NAMES])
# Mirroring a box [lo, hi] on the y and z axes gives [-hi, -lo].
_LIMIT_MIRRORED = _LIMIT_LEFT.clone()  # (24, 3, 2)
_LIMIT_MIRRORED[:, 1:] = -_LIMIT_LEFT[:, 1:].flip(-1)
JOINT_LIMITS = torch.where(_IS_RIGHT[:, None, None], _LIMIT_MIRRORED, _LIMIT_LEFT)  # (24, 3, 2) degrees
NOISE_STD = _joint_table(_NOISE)  # (24, 3) degrees (a std has no sign, so no mirroring needed)


def _archetype_angles() -> torch.Tensor:
    table = torch.zeros(len(ARCHETYPES), 24, 3)
    for a, archetype in enumerate(ARCHETYPES):
        for name, xyz in archetype.angles.items():
            table[a, J_[name]] = torch.tensor(xyz, dtype=torch.float32)
    return table  # (A, 24, 3) degrees


ARCHETYPE_ANGLES = _archetype_angles()  # (A, 24, 3)


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """R = Ry(y) Rz(z) Rx(x) from angles (..., 3) = (x, y, z) in degrees. -> (..., 3, 3)"""
    c, s = torch.cos(torch.deg2rad(angles)).unbind(-1), torch.sin(torch.deg2rad(angles)).unbind(-1)
    one, zero = torch.ones_like(angles[..., 0]), torch.zeros_like(angles[..., 0])

    def matrix(*entries):
        return torch.stack(entries, -1).unflatten(-1, (3, 3))  # (..., 3, 3)

    Rx = matrix(one, zero, zero, zero, c[0], -s[0], zero, s[0], c[0])
    Ry = matrix(c[1], zero, s[1], zero, one, zero, -s[1], zero, c[1])
    Rz = matrix(c[2], -s[2], zero, s[2], c[2], zero, zero, zero, one)
    return Ry @ Rz @ Rx  # (..., 3, 3)


def sample_poses(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n PoseWorld poses: an archetype, mirrored with probability 1/2, plus Gaussian noise per joint
    angle, clamped to the joint limits. Global orientation is the identity (upright, facing +z).

    Returns pose (n, 24, 3) float32 axis-angle and archetype ids (n,) long. Deterministic given the
    generator's state."""
    ids = torch.randint(len(ARCHETYPES), (n,), generator=generator)  # (n,)
    base = ARCHETYPE_ANGLES[ids]  # (n, 24, 3)
    mirror = torch.rand(n, generator=generator) < 0.5  # (n,) both sides of one-sided poses occur
    base = torch.where(mirror[:, None, None], _mirror_angles(base), base)  # (n, 24, 3)
    noise = torch.randn(n, 24, 3, generator=generator) * NOISE_STD  # (n, 24, 3)
    angles = torch.clamp(base + noise, JOINT_LIMITS[..., 0], JOINT_LIMITS[..., 1])  # (n, 24, 3)
    pose = smpl.matrix_to_axis_angle(euler_to_matrix(angles))  # (n, 24, 3)
    return pose, ids


# ====================================================================================================
# 2. Posecodes and the semantic checker
#
# PoseScript (Delmas et al. 2022) describes a pose by "posecodes": a few measurable quantities (joint
# angles, relative heights, distances) each cut into named bins. Here each family gives one scalar
# value per pose and a list of boundaries (constants, or reference joint heights plus offsets); its
# category is 1 + the index of the highest boundary the value exceeds (0 below them all). For
# increasing boundaries that is the usual binning. The margin of a family is the distance from the
# value to its nearest boundary: captions mention a code only when its margin is at least min_margin,
# so a small change of pose cannot flip it, and the checker stays fair.
#
# Codes are measured in the body frame: the joints are first rotated so that the pelvis has the
# identity orientation (`body_frame_joints`), so they are a function of the 23 body rotations alone and
# the same for the canonical, the camera-frame or any generated global orientation.

_REST = smpl.pose_joints(torch.zeros(1, 24, 3))[0].double()  # (24, 3) rest joints of the built-in skeleton
_PELVIS_CHILDREN = [J_["left_hip"], J_["right_hip"], J_["spine1"]]


def body_frame_joints(joints: torch.Tensor) -> torch.Tensor:
    """Joints (B, 24, 3) -> the same joints with the pelvis at the origin and its rotation undone.

    The hips and spine1 hang rigidly off the pelvis, so its rotation R0 is the rotation that best maps
    their rest offsets onto the posed ones (Kabsch: SVD of the 3x3 cross-covariance, with the
    determinant fixed to +1). Exact for the built-in skeleton, close for other body shapes."""
    if joints.dim() != 3 or joints.shape[1:] != (24, 3):
        raise ValueError(f"expected SMPL joints (B, 24, 3); got {tuple(joints.shape)}")
    J = joints.double()
    P_rest = (_REST[_PELVIS_CHILDREN] - _REST[0])  # (3, 3) rows are offsets
    P = J[:, _PELVIS_CHILDREN] - J[:, :1]  # (B, 3, 3)
    H = P_rest.T @ P  # (B, 3, 3) sum of p_rest p^T
    U, _, Vh = torch.linalg.svd(H)
    d = torch.linalg.det(Vh.mT @ U.mT).sign()  # (B,) -1 would be a reflection
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))  # (B, 3, 3)
    R0 = Vh.mT @ D @ U.mT  # (B, 3, 3) maps rest offsets to posed ones
    return ((J - J[:, :1]) @ R0).to(joints.dtype)  # (B, 24, 3) = R0^T (J - J_pelvis)


def _joint(J: torch.Tensor, name: str) -> torch.Tensor:
    return J[:, J_[name]]  # (B, 3)


def _interior_angle(J: torch.Tensor, a: str, b: str, c: str) -> torch.Tensor:
    """Angle at joint b between the bones to a and to c, degrees (180 = straight limb). -> (B,)"""
    u = _joint(J, a) - _joint(J, b)  # (B, 3)
    v = _joint(J, c) - _joint(J, b)  # (B, 3)
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)).clamp_min(1e-9)  # (B,)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def _pitch(v: torch.Tensor) -> torch.Tensor:
    """Forward tilt from vertical of vectors (B, 3), degrees, positive towards +z (the front)."""
    return torch.rad2deg(torch.atan2(v[:, 2], v[:, 1]))


def _roll(v: torch.Tensor) -> torch.Tensor:
    """Sideways tilt from vertical of vectors (B, 3), degrees, positive towards +x (the body's left)."""
    return torch.rad2deg(torch.atan2(v[:, 0], v[:, 1]))


def _head_up(J: torch.Tensor) -> torch.Tensor:
    """Forward tilt of the neck -> head bone relative to the upper spine (spine3 -> neck), degrees."""
    return _pitch(_joint(J, "head") - _joint(J, "neck")) - _pitch(_joint(J, "neck") - _joint(J, "spine3"))


# The rest skeleton is not perfectly vertical (the head joint sits forward of the neck), so the leans
# are measured from its rest values: 0 is the rest posture.
_REST_BATCH = _REST[None].float()  # (1, 24, 3)
_TORSO_REST = _joint(_REST_BATCH, "neck") - _joint(_REST_BATCH, "pelvis")  # (1, 3)
_TORSO_PITCH_REST, _TORSO_ROLL_REST = float(_pitch(_TORSO_REST)), float(_roll(_TORSO_REST))
_HEAD_PITCH_REST = float(_head_up(_REST_BATCH))


def _torso_pitch(J):
    return _pitch(_joint(J, "neck") - _joint(J, "pelvis")) - _TORSO_PITCH_REST  # (B,)


def _torso_roll(J):
    return _roll(_joint(J, "neck") - _joint(J, "pelvis")) - _TORSO_ROLL_REST  # (B,)


def _head_pitch(J):
    return _head_up(J) - _HEAD_PITCH_REST  # (B,)


def _hand_refs(side: str):
    """Boundaries of the hand height: pelvis, shoulder -/+ 8 cm, head + 10 cm (their y). (B, 4)"""
    def refs(J):
        pelvis, shoulder, head = (_joint(J, n)[:, 1] for n in ("pelvis", f"{side}_shoulder", "head"))
        return torch.stack([pelvis, shoulder, shoulder, head], -1)  # (B, 4); HAND_HEIGHT offsets added
    return refs


@dataclass(frozen=True)
class PosecodeFamily:
    """One posecode family: measure(J) (B,) is compared with boundaries (B, T) = thresholds (T,) plus,
    if given, references(J) (B, T). categories has T + 1 names, lowest value first. `measures` says in
    words what the value is (and, for hand heights, what the boundaries are)."""
    name: str
    categories: tuple
    thresholds: tuple
    unit: str
    min_margin: float  # a caption mentions the code only if |value - nearest boundary| >= min_margin
    measures: str
    measure: Callable
    references: Callable | None = None
    template: str = ""  # key of the caption templates (the family name for unsided families)
    side: str | None = None  # "left" / "right" for the sided families, filled into the templates


_BEND = ("completely bent", "bent at a right angle", "partly bent", "straight")
_BEND_DEG = (70.0, 110.0, 150.0)  # interior angle boundaries, 180 = straight
_HAND_HEIGHT = ("below the hips", "at torso height", "at shoulder height", "at head height", "above the head")
_HAND_HEIGHT_OFFSETS = (0.0, -0.08, 0.08, 0.10)  # metres added to (pelvis, shoulder, shoulder, head)


def _sided(side: str) -> list:
    """The families measured once per side. Lateral values are signed so that + points away from the
    midline on that side, which makes the left and right families mirror images of each other."""
    s = 1.0 if side == "left" else -1.0
    return [
        PosecodeFamily(f"{side}_elbow",
                       _BEND,
                       _BEND_DEG, "deg", 8.0,
                       "angle shoulder-elbow-wrist",
                       lambda J: _interior_angle(J, f"{side}_shoulder", f"{side}_elbow", f"{side}_wrist"),
                       template="elbow", side=side),
        PosecodeFamily(f"{side}_knee",
                       _BEND,
                       _BEND_DEG, "deg", 8.0,
                       "angle hip-knee-ankle",
                       lambda J: _interior_angle(J, f"{side}_hip", f"{side}_knee", f"{side}_ankle"),
                       template="knee", side=side),
        PosecodeFamily(f"{side}_hand_height",
                       _HAND_HEIGHT,
                       _HAND_HEIGHT_OFFSETS, "m", 0.04,
                       "height of the wrist; boundaries: pelvis, shoulder - 0.08, shoulder + 0.08, head + 0.10",
                       lambda J: _joint(J, f"{side}_wrist")[:, 1],
                       references=_hand_refs(side), template="hand_height", side=side),
        PosecodeFamily(f"{side}_hand_side",
                       ("across the body", "near the body", "out to the side"),
                       (0.0, 0.45), "m", 0.04,
                       "sideways distance of the wrist from the midline, + towards its own side",
                       lambda J: s * (_joint(J, f"{side}_wrist")[:, 0] - _joint(J, "pelvis")[:, 0]),
                       template="hand_side", side=side),
        PosecodeFamily(f"{side}_hand_forward",
                       ("behind the body", "level with the body", "in front of the body"),
                       (-0.12, 0.30), "m", 0.04,
                       "wrist depth relative to the pelvis, + in front",
                       lambda J: _joint(J, f"{side}_wrist")[:, 2] - _joint(J, "pelvis")[:, 2],
                       template="hand_forward", side=side),
    ]


POSECODES = tuple(
    _sided("left") + _sided("right") + [
        PosecodeFamily("hands_distance",
                       ("close together", "apart", "wide apart"),
                       (0.25, 0.80), "m", 0.05,
                       "distance between the wrists",
                       lambda J: (_joint(J, "left_wrist") - _joint(J, "right_wrist")).norm(dim=-1),
                       template="hands_distance"),
        PosecodeFamily("feet_distance",
                       ("together", "apart", "wide apart"),
                       (0.25, 0.60), "m", 0.04,
                       "distance between the ankles",
                       lambda J: (_joint(J, "left_ankle") - _joint(J, "right_ankle")).norm(dim=-1),
                       template="feet_distance"),
        PosecodeFamily("raised_foot",
                       ("right foot raised", "feet level", "left foot raised"),
                       (-0.15, 0.15), "m", 0.04,
                       "height of the left ankle minus the right one",
                       lambda J: _joint(J, "left_ankle")[:, 1] - _joint(J, "right_ankle")[:, 1],
                       template="raised_foot"),
        PosecodeFamily("foot_forward",
                       ("right foot in front", "feet side by side", "left foot in front"),
                       (-0.25, 0.25), "m", 0.04,
                       "depth of the left ankle minus the right one, + in front",
                       lambda J: _joint(J, "left_ankle")[:, 2] - _joint(J, "right_ankle")[:, 2],
                       template="foot_forward"),
        PosecodeFamily("hips_height",
                       ("at knee level", "lowered", "high"),
                       (0.15, 0.35), "m", 0.04,
                       "height of the pelvis above the mean of the knees",
                       lambda J: _joint(J, "pelvis")[:, 1] - (_joint(J, "left_knee")[:, 1]
                                                             + _joint(J, "right_knee")[:, 1]) / 2,
                       template="hips_height"),
        PosecodeFamily("torso_pitch",
                       ("leaning backward", "upright", "leaning forward", "bent far forward"),
                       (-12.0, 15.0, 50.0), "deg", 5.0,
                       "forward lean of pelvis->neck from the rest posture",
                       _torso_pitch,
                       template="torso_pitch"),
        PosecodeFamily("torso_roll",
                       ("leaning right", "upright", "leaning left"),
                       (-10.0, 10.0), "deg", 4.0,
                       "sideways lean of pelvis->neck, + to the left",
                       _torso_roll,
                       template="torso_roll"),
        PosecodeFamily("head_pitch",
                       ("tilted back", "level", "bowed forward"),
                       (-15.0, 15.0), "deg", 5.0,
                       "forward tilt of neck->head against the upper spine",
                       _head_pitch,
                       template="head_pitch"),
    ])
POSECODE_INDEX = {f.name: k for k, f in enumerate(POSECODES)}
K = len(POSECODES)  # number of posecode families
C = max(len(f.categories) for f in POSECODES)  # categories of the widest family
# The body region of each family (by its template key), for eval.py's per-family and per-region accuracy.
# A new family needs a region here, or importing this module fails (KeyError).
BODY_REGIONS = ("arms_and_hands", "legs_and_feet", "torso_and_head")
_TEMPLATE_REGION = {"elbow": 0, "hand_height": 0, "hand_side": 0, "hand_forward": 0, "hands_distance": 0,
                    "knee": 1, "feet_distance": 1, "raised_foot": 1, "foot_forward": 1, "hips_height": 1,
                    "torso_pitch": 2, "torso_roll": 2, "head_pitch": 2}
POSECODE_REGION = {f.name: BODY_REGIONS[_TEMPLATE_REGION[f.template]] for f in POSECODES}  # family -> region


def _values_and_boundaries(joints: torch.Tensor) -> list:
    """[(value (B,), boundaries (B, T_k))] per family, measured in the body frame."""
    J = body_frame_joints(joints).float()  # (B, 24, 3)
    out = []
    for f in POSECODES:
        value = f.measure(J)  # (B,)
        bounds = torch.tensor(f.thresholds, dtype=value.dtype).expand(value.shape[0], -1)  # (B, T)
        if f.references is not None:
            bounds = bounds + f.references(J)  # (B, T)
        out.append((value, bounds))
    return out


def posecode_values(joints: torch.Tensor) -> torch.Tensor:
    """The measured value of every family, in its unit (deg or m). (B, 24, 3) -> (B, K)"""
    return torch.stack([v for v, _ in _values_and_boundaries(joints)], -1)  # (B, K)


def posecodes_and_margins(joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Category index (B, K) long and margin (B, K) float (distance to the nearest boundary, in the
    family's unit) for joints (B, 24, 3) in any global orientation."""
    codes, margins = [], []
    for value, bounds in _values_and_boundaries(joints):
        above = value[:, None] > bounds  # (B, T)
        rank = torch.arange(1, bounds.shape[1] + 1)  # (T,)
        codes.append((above * rank).amax(-1))  # (B,) 1 + highest boundary exceeded, 0 if none
        margins.append((value[:, None] - bounds).abs().amin(-1))  # (B,)
    return torch.stack(codes, -1), torch.stack(margins, -1)  # (B, K), (B, K)


def posecodes(joints: torch.Tensor) -> torch.Tensor:
    """PoseScript-style posecodes: one category index per family of POSECODES. (B, 24, 3) -> (B, K) long"""
    return posecodes_and_margins(joints)[0]


def posecode_margins(joints: torch.Tensor) -> torch.Tensor:
    """Distance of each family's value to its nearest category boundary. (B, 24, 3) -> (B, K)"""
    return posecodes_and_margins(joints)[1]


def unambiguous_posecodes(joints: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the codes far enough from a boundary to be mentioned in a caption."""
    min_margin = torch.tensor([f.min_margin for f in POSECODES])  # (K,)
    return posecode_margins(joints) >= min_margin


def check_posecodes(joints: torch.Tensor, codes: torch.Tensor, mentioned: torch.Tensor) -> torch.Tensor:
    """PoseWorld's exact semantic check: the share of the mentioned codes that `joints` satisfy.

    joints (B, 24, 3) of the poses to check (generated ones, any global orientation); codes (B, K) the
    reference categories; mentioned (B, K) bool, the codes the caption names. Returns (B,) in [0, 1];
    1 for a row that mentions nothing (there is nothing to violate)."""
    if codes.shape != mentioned.shape or codes.dim() != 2 or codes.shape[1] != K or codes.shape[0] != joints.shape[0]:
        raise ValueError(f"check_posecodes: expected joints (B, 24, 3), codes and mentioned (B, {K}); got "
                         f"{tuple(joints.shape)}, {tuple(codes.shape)}, {tuple(mentioned.shape)}")
    hit = (posecodes(joints) == codes) & mentioned  # (B, K)
    n = mentioned.sum(-1)  # (B,)
    return torch.where(n > 0, hit.sum(-1) / n.clamp_min(1), torch.ones_like(n, dtype=torch.float32))


def twin_poses(pose: torch.Tensor, codes: torch.Tensor, mentioned: torch.Tensor, generator: torch.Generator,
               noise: float = 0.15, tries: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for a retriever (not in the paper): for each pose, a twin close to it that breaks at
    least one of the codes its caption names.

    pose (B, 24, 3) axis-angle with a canonical root; codes, mentioned (B, K) of its caption. A twin
    adds N(0, s^2) radians to every body joint's axis-angle (the root kept), with s = noise at the
    first try and 1.5 times more at each retry, for the rows whose twin still satisfies the caption.
    Returns the twins' joints (B, 24, 3) and broken (B,) bool: False for the rare rows where every try
    satisfied the caption (their twin is then the last try's pose)."""
    twins = torch.empty(pose.shape[0], 24, 3)
    broken = torch.zeros(pose.shape[0], dtype=torch.bool)
    for t in range(tries):
        rows = torch.nonzero(~broken).flatten()  # (r,) still without a twin that breaks the caption
        if len(rows) == 0:
            break
        p = pose[rows].clone()  # (r, 24, 3)
        p[:, 1:] += noise * 1.5 ** t * torch.randn(p[:, 1:].shape, generator=generator)
        joints = smpl.pose_joints(p)  # (r, 24, 3)
        twins[rows] = joints
        broken[rows] = check_posecodes(joints, codes[rows], mentioned[rows]) < 1
    return twins, broken


# ====================================================================================================
# 3. Captions
#
# One sentence per mentioned code. Placeholders: {S} a subject opening a sentence, {P} a possessive
# opening a sentence, {p} a possessive inside one, {side} / {other} the family's side and the other.

SUBJECTS = ("The person", "Someone", "This person", "The figure")
POSSESSIVES = ("The", "Their", "The person's")

_BEND_WORDS = [  # elbow (arm) and knee (leg) share the wording: LIMB and JOINT are filled in below
    ["{S} has {p} {side} JOINT completely bent.", "{P} {side} LIMB is tightly folded at the JOINT.",
     "{P} {side} JOINT is fully bent."],
    ["{P} {side} JOINT is bent at a right angle.", "{S} bends {p} {side} LIMB to about ninety degrees.",
     "{P} {side} LIMB makes a right angle at the JOINT."],
    ["{P} {side} JOINT is partly bent.", "{S} has {p} {side} LIMB somewhat bent.",
     "{P} {side} LIMB is bent a little at the JOINT."],
    ["{P} {side} LIMB is straight.", "{S} keeps {p} {side} LIMB straight.", "{P} {side} JOINT is fully extended."],
]


def _bend_templates(limb: str, joint: str) -> list:
    return [[t.replace("LIMB", limb).replace("JOINT", joint) for t in row] for row in _BEND_WORDS]


CAPTION_TEMPLATES = {  # family template key -> one list of sentences per category
    "elbow": _bend_templates("arm", "elbow"),
    "knee": _bend_templates("leg", "knee"),
    "hand_height": [
        ["{P} {side} hand is below the hips.", "{S} holds {p} {side} hand lower than the hips.",
         "{P} {side} hand hangs below hip level."],
        ["{P} {side} hand is at the height of the torso.",
         "{S} holds {p} {side} hand between the hips and the shoulders.",
         "{P} {side} hand is at waist or chest height."],
        ["{P} {side} hand is at shoulder height.", "{S} holds {p} {side} hand level with the shoulders.",
         "{P} {side} hand is raised to shoulder level."],
        ["{P} {side} hand is at the height of the head.", "{S} raises {p} {side} hand to head level.",
         "{P} {side} hand is up near head height."],
        ["{P} {side} hand is above the head.", "{S} raises {p} {side} hand over the head.",
         "{P} {side} hand is held up higher than the head."],
    ],
    "hand_side": [
        ["{P} {side} hand crosses over to the {other} side of the body.",
         "{S} reaches across the body with {p} {side} hand.",
         "{P} {side} hand is past the middle of the body, on the {other} side."],
        ["{P} {side} hand stays close to the body.", "{S} keeps {p} {side} hand near the body, on the {side} side.",
         "{P} {side} hand is not far out from the body."],
        ["{P} {side} arm is stretched out to the side.", "{S} holds {p} {side} hand far out to the {side}.",
         "{P} {side} hand is out to the side, away from the body."],
    ],
    "hand_forward": [
        ["{P} {side} hand is behind the body.", "{S} holds {p} {side} hand behind the back.",
         "{P} {side} hand is further back than the body."],
        ["{P} {side} hand is in line with the body.",
         "{S} keeps {p} {side} hand level with the torso, not in front of it.",
         "{P} {side} hand is beside the body, neither in front nor behind."],
        ["{P} {side} hand is in front of the body.", "{S} reaches forward with {p} {side} hand.",
         "{P} {side} hand is held out in front."],
    ],
    "hands_distance": [
        ["The hands are close together.", "{S} holds {p} hands near each other.", "{P} two hands are almost touching."],
        ["The hands are apart.", "{S} holds {p} hands a moderate distance apart.",
         "{P} hands are apart but not far from each other."],
        ["The hands are wide apart.", "{S} spreads {p} hands far apart.", "{P} hands are far from each other."],
    ],
    "feet_distance": [
        ["The feet are together.", "{S} keeps {p} feet close together.", "{P} feet are next to each other."],
        ["The feet are apart.", "{S} has {p} feet about shoulder width apart.", "{P} feet are a little apart."],
        ["The feet are wide apart.", "{S} has {p} feet spread far apart.", "{P} feet are far from each other."],
    ],
    "raised_foot": [
        ["{P} right foot is higher than the left foot.", "{S} raises {p} right foot.",
         "{P} right foot is lifted above the left one."],
        ["Both feet are at the same height.", "{S} keeps both feet at the same level.", "Neither foot is raised."],
        ["{P} left foot is higher than the right foot.", "{S} raises {p} left foot.",
         "{P} left foot is lifted above the right one."],
    ],
    "foot_forward": [
        ["{P} right foot is in front of the left foot.", "{S} has {p} right foot forward.",
         "{P} right foot is ahead of the left one."],
        ["The feet are side by side.", "Neither foot is in front of the other.", "{S} keeps {p} feet side by side."],
        ["{P} left foot is in front of the right foot.", "{S} has {p} left foot forward.",
         "{P} left foot is ahead of the right one."],
    ],
    "hips_height": [
        ["The hips are down at the level of the knees.", "{S} has {p} hips as low as the knees.",
         "{P} hips are lowered to knee height."],
        ["The hips are lowered part of the way to the knees.", "{S} has {p} hips partway down.",
         "{P} hips are somewhat lowered."],
        ["The hips are high above the knees.", "{S} keeps {p} hips well above the knees.",
         "{P} hips are far above the knees."],
    ],
    "torso_pitch": [
        ["{S} is leaning backward.", "{P} torso leans back.", "{S} bends the upper body backward."],
        ["{S} holds the torso upright.", "{P} back is upright.",
         "{P} upper body is upright, not leaning forward or back."],
        ["{S} is leaning forward.", "{P} torso leans forward.", "{S} bends a little forward."],
        ["{S} is bent far forward.", "{P} upper body is bent forward a lot.", "{S} bends over strongly."],
    ],
    "torso_roll": [
        ["{S} leans to the right.", "{P} torso tilts toward the right side.",
         "{P} upper body is bent sideways to the right."],
        ["{P} torso is not tilted to either side.", "{S} keeps the upper body from leaning sideways.",
         "{S} does not lean to the left or right."],
        ["{S} leans to the left.", "{P} torso tilts toward the left side.",
         "{P} upper body is bent sideways to the left."],
    ],
    "head_pitch": [
        ["{S} tilts the head back.", "{P} head is tilted backward.",
         "{S} is looking upward with the head tipped back."],
        ["{P} head is held level.", "{P} head is neither bowed nor tilted back.", "{S} keeps the head level."],
        ["{S} bows the head.", "{P} head is bent forward.", "{S} is looking down with the head bowed."],
    ],
}


def code_sentence(k: int, category: int, rng: random.Random) -> str:
    """One English sentence stating that family k is in `category`, with a random template and opening."""
    f = POSECODES[k]
    template = rng.choice(CAPTION_TEMPLATES[f.template][category])
    other = {"left": "right", "right": "left"}.get(f.side)
    return template.format(S=rng.choice(SUBJECTS), P=rng.choice(POSSESSIVES), p="their", side=f.side, other=other)


@functools.lru_cache(maxsize=1)
def _code_frequencies() -> list:
    """How often each (family, category) occurs, from a fixed reference sample of 2048 poses: K lists."""
    pose, _ = sample_poses(2048, torch.Generator().manual_seed(12345))
    codes = posecodes(smpl.pose_joints(pose))  # (2048, K)
    return [(torch.bincount(codes[:, k], minlength=C).float() / len(codes)).tolist() for k in range(K)]


def make_caption(codes: torch.Tensor, margins: torch.Tensor, rng: random.Random) -> tuple[str, torch.Tensor]:
    """A caption for one pose: 2-4 of its unambiguous codes, each as one sentence, in random order.

    codes (K,) long, margins (K,) (posecodes_and_margins). Rarer categories are picked more often
    (weight 1/sqrt(frequency)): "the left foot is raised" tells more about a pose than "the head is
    level". Returns the caption and mentioned (K,) bool."""
    ratio = margins / torch.tensor([f.min_margin for f in POSECODES])  # (K,) >= 1: unambiguous
    candidates = torch.nonzero(ratio >= 1).flatten().tolist()
    if not candidates:  # practically never: every code near a boundary; use the clearest one
        candidates = [int(ratio.argmax())]
    codes = codes.tolist()
    freq = _code_frequencies()
    weights = [max(freq[k][codes[k]], 1e-3) ** -0.5 for k in candidates]
    n = min(rng.randint(2, 4), len(candidates))
    chosen = []
    for _ in range(n):
        i = rng.choices(range(len(candidates)), weights)[0]
        chosen.append(candidates.pop(i))
        weights.pop(i)
    mentioned = torch.zeros(K, dtype=torch.bool)
    mentioned[chosen] = True
    return " ".join(code_sentence(k, codes[k], rng) for k in chosen), mentioned


def _plain(sentence: str) -> str:
    return " ".join(sentence.lower().replace(".", " ").split())  # case, spacing and the full stop ignored


@functools.lru_cache(maxsize=1)
def _sentence_table() -> dict:
    """Every sentence code_sentence can write, as _plain text -> (family k, category). A sentence two
    codes could write would make captions ambiguous: refused here, so the tests catch a new template."""
    table = {}
    for k, f in enumerate(POSECODES):
        other = {"left": "right", "right": "left"}.get(f.side)
        for category, templates in enumerate(CAPTION_TEMPLATES[f.template]):
            for template in templates:
                for S in SUBJECTS:
                    for P in POSSESSIVES:
                        s = _plain(template.format(S=S, P=P, p="their", side=f.side, other=other))
                        if table.setdefault(s, (k, category)) != (k, category):
                            raise ValueError(f"the caption templates are ambiguous: {s!r} is written for "
                                             f"{POSECODES[table[s][0]].name} and for {f.name}")
    return table


def parse_caption(text: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The caption templates inverted: (codes (K,) long, mentioned (K,) bool) of a caption whose every
    sentence is one that make_caption could write (any subject, possessive, letter case or spacing), so
    that check_posecodes can score a pose against a caption typed by hand; None for any other caption
    (outside PoseWorld's vocabulary). A caption naming one family twice with different categories is a
    ValueError: no pose satisfies it."""
    table = _sentence_table()
    sentences = [s for s in text.split(".") if s.strip()]  # every template is one sentence ending in "."
    if not sentences or any(_plain(s) not in table for s in sentences):
        return None
    codes, mentioned = torch.zeros(K, dtype=torch.long), torch.zeros(K, dtype=torch.bool)
    for s in sentences:
        k, category = table[_plain(s)]
        if mentioned[k] and codes[k] != category:
            raise ValueError(f"the caption says two things of {POSECODES[k].name}: "
                             f"{POSECODES[k].categories[int(codes[k])]!r} and {POSECODES[k].categories[category]!r}")
        codes[k], mentioned[k] = category, True
    return codes, mentioned


# ====================================================================================================
# 4. Cameras, projection and images
#
# A camera is a dict of batched tensors: R (B, 3, 3) and t (B, 3) map world (SMPL body frame) points to
# the OpenCV camera frame, X_cam = R X + t; focal (B,) in pixels; principal (B, 2) in pixels, where
# pixel (u, v) = (column, row) has its centre at integer coordinates. `transl` (B, 3) is the
# translation that puts the camera-frame pose (global_orient_cam = R @ global_orient, pelvis at its
# rest location, what smpl.pose_joints gives) where the camera sees it: X_cam = joints_cam + transl.

def project(points: torch.Tensor, camera: dict) -> torch.Tensor:
    """Pinhole projection of world points (B, N, 3) -> pixels (B, N, 2): u = f X/Z + cx, v = f Y/Z + cy."""
    return _project_with_depth(points, camera)[0]


def _project_with_depth(points: torch.Tensor, camera: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"project expects points (B, N, 3); got {tuple(points.shape)}")
    X = points @ camera["R"].mT + camera["t"][:, None]  # (B, N, 3) camera frame
    Z = X[..., 2].clamp_min(1e-6)  # (B, N) points behind the camera do not occur in PoseWorld
    uv = camera["focal"][:, None, None] * X[..., :2] / Z[..., None] + camera["principal"][:, None]  # (B, N, 2)
    return uv, Z


def _look_at(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rows (right, down, forward) of an OpenCV camera at eye (B, 3) looking at target (B, 3). -> (B, 3, 3)"""
    forward = torch.nn.functional.normalize(target - eye, dim=-1)  # (B, 3)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype).expand_as(forward)
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)  # (B, 3)
    down = torch.cross(forward, right, dim=-1)  # (B, 3) so that right x down = forward
    return torch.stack([right, down, forward], dim=-2)  # (B, 3, 3)


def _head_centre(joints: torch.Tensor) -> torch.Tensor:
    """Centre of the drawn head disc: one neck->head length beyond the head joint. (B, 24, 3) -> (B, 3)"""
    head, neck = joints[:, J_["head"]], joints[:, J_["neck"]]
    return head + (head - neck)


def sample_cameras(joints: torch.Tensor, generator: torch.Generator, image_size: int = 64) -> dict:
    """A random perspective camera per pose that frames the whole body like a person crop.

    Azimuth within +-60 deg of the front, elevation -5..20 deg, roll +-5 deg, distance 3..5 m, looking
    at the centre of the body's bounding box; the focal length makes the body's larger projected extent
    fill 70-85 % of the image, and the principal point centres it, with a few pixels of jitter."""
    B = joints.shape[0]

    def rand(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(B, generator=generator, dtype=torch.float64)  # (B,) uniform

    az, el, roll = torch.deg2rad(rand(-60, 60)), torch.deg2rad(rand(-5, 20)), torch.deg2rad(rand(-5, 5))  # (B,)
    dist, fill = rand(3.0, 5.0), rand(0.70, 0.85)  # (B,)
    jitter = (torch.rand(B, 2, generator=generator, dtype=torch.float64) - 0.5) * 0.06 * image_size  # (B, 2)
    P = torch.cat([joints.double(), _head_centre(joints.double())[:, None]], 1)  # (B, 25, 3)
    target = (P.amin(1) + P.amax(1)) / 2  # (B, 3) bounding-box centre
    direction = torch.stack([torch.sin(az) * torch.cos(el), torch.sin(el), torch.cos(az) * torch.cos(el)], -1)  # (B, 3)
    eye = target + dist[:, None] * direction  # (B, 3)
    c, s, zero, one = (torch.cos(roll), torch.sin(roll),
                       torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64))
    R_roll = torch.stack([c, -s, zero,
                          s, c, zero,
                          zero, zero, one], -1).view(B, 3, 3)  # (B, 3, 3) about the optical axis
    R = R_roll @ _look_at(eye, target)  # (B, 3, 3)
    t = -(R @ eye[:, :, None])[..., 0]  # (B, 3)
    X = P @ R.mT + t[:, None]  # (B, 25, 3)
    xy = X[..., :2] / X[..., 2:]  # (B, 25, 2) normalised image coordinates
    lo, hi = xy.amin(1), xy.amax(1)  # (B, 2)
    focal = fill * image_size / (hi - lo).amax(-1)  # (B,)
    principal = (image_size - 1) / 2 - focal[:, None] * (lo + hi) / 2 + jitter  # (B, 2)
    J0 = _REST[0].expand(B, 3)  # (B, 3) where smpl.pose_joints puts the pelvis
    transl = (R @ J0[:, :, None])[..., 0] + t - J0  # (B, 3)
    cam = {"R": R, "t": t, "focal": focal, "principal": principal, "transl": transl}
    return {k: v.float() for k, v in cam.items()}


# Drawing: 23 bones plus a head disc. A primitive is a capsule (a segment with a radius); the disc is a
# segment of length zero. Colours: left limbs warm, right limbs cool, arms and legs in two shades each,
# trunk and head light, so the left/right question is answerable from a picture.
_SEGMENTS = [(p, k) for p, k in smpl.BONES] + [(24, 24)]  # index 24 = the head centre


def _segment_style(child: int) -> tuple[tuple, float]:
    """(RGB colour, radius in metres) of the primitive whose far end is `child`."""
    if child == 24:
        return (255, 225, 110), 0.10  # head disc
    name = smpl.JOINT_NAMES[child]
    arm = any(w in name for w in ("collar", "shoulder", "elbow", "wrist", "hand"))
    if name.startswith("left_"):
        return ((255, 70, 60) if arm else (255, 160, 40)), 0.04
    if name.startswith("right_"):
        return ((60, 120, 255) if arm else (40, 220, 230)), 0.04
    return (235, 235, 235), 0.055  # spine, neck


SEGMENT_COLOURS = torch.tensor([_segment_style(k)[0] for _, k in _SEGMENTS], dtype=torch.uint8)  # (S, 3)
SEGMENT_RADII = torch.tensor([_segment_style(k)[1] for _, k in _SEGMENTS])  # (S,) metres


def _rasterize(ends: torch.Tensor, depth: torch.Tensor, radius: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Index of the nearest primitive covering each pixel (a z-buffer), -1 where none does.

    ends (B, S, 2, 2) segment end points in pixels (u, v); depth (B, S, 2) at the ends; radius (B, S)
    pixels. A pixel is covered when its centre is within `radius` of the segment; its depth is
    interpolated linearly along the segment in the image, enough to order bones. Each primitive is
    tested only on the pixels of its own bounding box (a limb covers a few dozen pixels of thousands):
    the boxes are enumerated as one flat list of (primitive, pixel) pairs, then the nearest primitive
    wins each pixel: scatter-min of depth, and among equal depths (two bones meeting at a joint) the
    lower primitive index. -> (B, H, W) long"""
    B, S = radius.shape
    r = radius.reshape(-1)  # (B*S,)
    a, e = ends[..., 0, :].reshape(-1, 2), (ends[..., 1, :] - ends[..., 0, :]).reshape(-1, 2)  # (B*S, 2) start, vector
    lo = (torch.minimum(a, a + e) - r[:, None]).ceil().clamp_min(0)  # (B*S, 2) first pixel (u, v) of each box
    hi = torch.minimum((torch.maximum(a, a + e) + r[:, None]).floor(), torch.tensor([W - 1.0, H - 1.0]))  # (B*S, 2)
    size = (hi - lo + 1).clamp_min(0).long()  # (B*S, 2) box width and height (0 when off the image)
    count = size[:, 0] * size[:, 1]  # (B*S,)
    owner = torch.repeat_interleave(torch.arange(B * S), count)  # (M,) the primitive of each pair
    k = torch.arange(len(owner)) - (torch.cumsum(count, 0) - count)[owner]  # (M,) position inside the box
    pu = lo[owner, 0] + (k % size[owner, 0])  # (M,) pixel centre
    pv = lo[owner, 1] + torch.div(k, size[owner, 0], rounding_mode="floor")  # (M,)
    au, av, eu, ev = a[owner, 0], a[owner, 1], e[owner, 0], e[owner, 1]  # (M,) each
    s = (((pu - au) * eu + (pv - av) * ev) / (eu * eu + ev * ev).clamp_min(1e-9)).clamp(0.0, 1.0)  # (M,)
    ex, ey = pu - au - s * eu, pv - av - s * ev  # (M,) offset from the closest point of the segment
    covered = ex * ex + ey * ey <= r[owner] ** 2  # (M,)
    d = depth.reshape(-1, 2)[owner]  # (M, 2)
    z = (d[:, 0] + s * (d[:, 1] - d[:, 0]))[covered]  # (C,) depth of the covered pairs
    pixel = ((torch.div(owner, S, rounding_mode="floor") * H + pv.long()) * W + pu.long())[covered]  # (C,) flat
    prim = (owner % S)[covered]  # (C,)
    zbuf = torch.full((B * H * W,), float("inf"), dtype=z.dtype).scatter_reduce(0, pixel, z, "amin")  # (B*H*W,)
    front = z == zbuf[pixel]  # (C,) the nearest primitive(s) at each pixel
    index = torch.full((B * H * W,), S, dtype=torch.long).scatter_reduce(0, pixel[front], prim[front], "amin")
    return torch.where(index == S, -1, index).view(B, H, W)  # (B, H, W)


def _paint(index: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Primitive indices (B, H, W) over backgrounds (B, 3, H, W) uint8 -> images (B, 3, H, W) uint8."""
    colour = SEGMENT_COLOURS[index.clamp_min(0)].permute(0, 3, 1, 2)  # (B, 3, H, W)
    return torch.where((index >= 0)[:, None], colour, background)


def render_images(joints: torch.Tensor, camera: dict, image_size: int = 64, generator: torch.Generator | None = None,
                  chunk: int = 512) -> torch.Tensor:
    """RGB images (B, 3, S, S) uint8 of posed skeletons (B, 24, 3) seen by `camera` (perspective).

    Line widths follow perspective (radius_px = focal * radius_m / depth). The background is a dark
    random colour per image plus uniform pixel noise of 0..12, always darker (max channel <= 81) than any
    bone colour. Rendered in chunks of `chunk` images to bound memory."""
    if joints.dim() != 3 or joints.shape[1:] != (24, 3):
        raise ValueError(f"render_images expects joints (B, 24, 3); got {tuple(joints.shape)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    for i in range(0, joints.shape[0], chunk):
        J = joints[i:i + chunk].float()  # (C, 24, 3)
        cam = {k: v[i:i + chunk] for k, v in camera.items()}
        C = J.shape[0]
        P = torch.cat([J, _head_centre(J)[:, None]], 1)  # (C, 25, 3)
        uv, Z = _project_with_depth(P, cam)  # (C, 25, 2), (C, 25)
        a, b = [k for k, _ in _SEGMENTS], [k for _, k in _SEGMENTS]
        ends = torch.stack([uv[:, a], uv[:, b]], 2)  # (C, S, 2, 2)
        depth = torch.stack([Z[:, a], Z[:, b]], 2)  # (C, S, 2)
        radius = cam["focal"][:, None] * SEGMENT_RADII / depth.mean(-1)  # (C, S) pixels
        index = _rasterize(ends, depth, radius, image_size, image_size)  # (C, H, W)
        base = torch.randint(10, 70, (C, 3, 1, 1), generator=generator, dtype=torch.uint8)  # (C, 3, 1, 1)
        noise = torch.randint(0, 13, (C, 3, image_size, image_size), generator=generator, dtype=torch.uint8)
        background = base + noise  # (C, 3, H, W) uint8, at most 81: no overflow
        out.append(_paint(index, background))
    return torch.cat(out) if out else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)


# ====================================================================================================
# 5. VQA about the pictured pose
#
# Each question kind applies to a pose only when its answer is unambiguous (the codes it reads are
# beyond their margin, or the two sides differ by at least 25 degrees), so the reference is right.

def _ask_hand_above_head(codes, eligible, values, archetype, rng):
    side = rng.choice(("left", "right"))
    k = POSECODE_INDEX[f"{side}_hand_height"]
    if not eligible[k]:
        return None
    q = rng.choice([f"Is the person's {side} hand above their head?", f"Is the {side} hand raised above the head?",
                    f"Is the {side} hand higher than the head?"])
    if codes[k] == len(_HAND_HEIGHT) - 1:
        a = rng.choice([f"Yes, the {side} hand is above the head.", "Yes, it is."])
    else:
        a = rng.choice([f"No, the {side} hand is not above the head.", "No, it is lower than the head."])
    return q, a


def _ask_more_bent(joint: str):
    def ask(codes, eligible, values, archetype, rng):
        left, right = values[POSECODE_INDEX[f"left_{joint}"]], values[POSECODE_INDEX[f"right_{joint}"]]
        if abs(left - right) < 25.0:  # interior angles; the smaller one is the more bent joint
            return None
        side = "left" if left < right else "right"
        q = rng.choice([f"Which {joint} is more bent?", f"Which of the {joint}s is bent more?",
                        f"Which {joint} is bent further, the left or the right?"])
        a = rng.choice([f"The {side} {joint}.", f"The {side} {joint} is more bent.", f"The {side} one."])
        return q, a
    return ask


def _ask_arm_bend(codes, eligible, values, archetype, rng):
    side = rng.choice(("left", "right"))
    k = POSECODE_INDEX[f"{side}_elbow"]
    if not eligible[k]:
        return None
    q = rng.choice([f"Is the {side} arm straight or bent?", f"How bent is the person's {side} elbow?",
                    f"Describe the {side} arm."])
    category = _BEND[codes[k]]
    a = rng.choice([f"The {side} arm is {category}.", f"It is {category}."])
    return q, a


def _ask_distance(family: str, noun: str):
    def ask(codes, eligible, values, archetype, rng):
        k = POSECODE_INDEX[family]
        if not eligible[k]:
            return None
        q = rng.choice([f"Are the {noun} together or apart?", f"How far apart are the {noun}?",
                        f"Are the person's {noun} close together?"])
        category = POSECODES[k].categories[codes[k]]
        return q, rng.choice([f"The {noun} are {category}.", f"They are {category}."])
    return ask


def _ask_torso(codes, eligible, values, archetype, rng):
    k = POSECODE_INDEX["torso_pitch"]
    if not eligible[k]:
        return None
    q = rng.choice(["Is the person leaning forward or backward?", "How is the upper body held?",
                    "Is the torso upright or leaning?"])
    category = POSECODES[k].categories[codes[k]]
    return q, rng.choice([f"The torso is {category}.", f"The person is {category}."])


def _ask_raised_foot(codes, eligible, values, archetype, rng):
    k = POSECODE_INDEX["raised_foot"]
    if not eligible[k]:
        return None
    q = rng.choice(["Is one foot raised higher than the other?", "Which foot is raised?",
                    "Are both feet at the same height?"])
    a = [rng.choice(["The right foot is raised.", "The right foot is higher than the left."]),
         rng.choice(["Neither, both feet are at the same height.", "The feet are at the same height."]),
         rng.choice(["The left foot is raised.", "The left foot is higher than the right."])][codes[k]]
    return q, a


def _ask_activity(codes, eligible, values, archetype, rng):
    description = ARCHETYPES[archetype].description
    q = rng.choice(["What is the person doing?", "What pose is the person in?", "Describe the pose in a few words."])
    return q, rng.choice([f"The person is {description}.", f"{description[0].upper()}{description[1:]}."])


VQA_KINDS = {
    "hand_above_head": _ask_hand_above_head,
    "knee_more_bent": _ask_more_bent("knee"),
    "elbow_more_bent": _ask_more_bent("elbow"),
    "arm_bend": _ask_arm_bend,
    "feet_distance": _ask_distance("feet_distance", "feet"),
    "hands_distance": _ask_distance("hands_distance", "hands"),
    "torso_lean": _ask_torso,
    "raised_foot": _ask_raised_foot,
    "activity": _ask_activity,
}


def make_vqa(codes: torch.Tensor, eligible: torch.Tensor, values: torch.Tensor, archetype: int,
             rng: random.Random) -> tuple[str, str, str]:
    """A (kind, question, short answer) about one pose, the kind drawn among those that apply to it
    ("activity" always does)."""
    codes_, eligible_, values_ = codes.tolist(), eligible.tolist(), values.tolist()
    asked = [(kind, ask(codes_, eligible_, values_, archetype, rng)) for kind, ask in VQA_KINDS.items()]
    kind, (question, answer) = rng.choice([(kind, qa) for kind, qa in asked if qa is not None])
    return kind, question, answer


# ====================================================================================================
# 6. The PoseWorld data set

TASKS = ("t2p", "i2p", "vqa")
DEFAULT_SIZES = {"train": 8000, "val": 500, "test": 1000}
POSEWORLD_VERSION = 1  # bump when the generator changes: cached files of another version are rebuilt

T2P_PROMPTS = ("Generate the SMPL pose described: {caption}",
               "Give the SMPL pose of a person matching this description: {caption}",
               "{caption} What is the SMPL pose of this person?")
I2P_PROMPTS = ("Estimate the SMPL pose of the person in this image.",
               "What is the 3D pose of the person in the picture? Answer with the SMPL pose.",
               "Give the SMPL pose of this person.")


def _stream_seed(seed: int, split: str) -> int:
    """An independent generator seed per (seed, split), stable across Python runs (no hash())."""
    digest = hashlib.sha256(f"poseworld/{seed}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _assign_tasks(n: int, tasks: tuple, mix: tuple, generator: torch.Generator) -> torch.Tensor:
    """Task ids (n,) into TASKS with exact proportions `mix` (largest remainders), in random order."""
    w = torch.tensor(mix, dtype=torch.float64) / sum(mix)  # (T,)
    counts = torch.floor(w * n).long()  # (T,)
    remainder = w * n - counts
    for i in torch.argsort(remainder, descending=True)[: n - int(counts.sum())]:
        counts[i] += 1
    ids = torch.cat([torch.full((int(c),), TASKS.index(t)) for t, c in zip(tasks, counts)])  # (n,)
    return ids[torch.randperm(n, generator=generator)]


def build_poseworld(split: str, size: int, seed: int, image_size: int, tasks: tuple, mix: tuple) -> dict:
    """Generate one split: all its tensors and texts (see PoseWorld for the fields)."""
    g = torch.Generator().manual_seed(_stream_seed(seed, split))
    pose_body, archetype = sample_poses(size, g)  # (N, 24, 3), (N,)
    joints_body = smpl.pose_joints(pose_body)  # (N, 24, 3)
    codes, margins = posecodes_and_margins(joints_body)  # (N, K), (N, K)
    eligible = margins >= torch.tensor([f.min_margin for f in POSECODES])  # (N, K)
    values = posecode_values(joints_body)  # (N, K)
    task_id = _assign_tasks(size, tasks, mix, g)  # (N,)
    cameras = sample_cameras(joints_body, g, image_size)
    # Image-to-pose target in the camera frame (HMR2.0): global_orient_cam = R_cam @ global_orient_body.
    root_cam = smpl.matrix_to_axis_angle(cameras["R"].double() @ smpl.axis_angle_to_matrix(pose_body[:, 0].double()))
    pose_cam = torch.cat([root_cam.float()[:, None], pose_body[:, 1:]], 1)  # (N, 24, 3)
    joints_cam = smpl.pose_joints(pose_cam)  # (N, 24, 3)
    needs_image = any(t in tasks for t in ("i2p", "vqa"))
    images = render_images(joints_body, cameras, image_size, g) if needs_image else None  # (N, 3, H, W)

    rng = random.Random(int(torch.randint(2**62, (1,), generator=g)))
    questions, answers, captions, qkinds = [], [], [], []
    mentioned = torch.zeros(size, K, dtype=torch.bool)
    for i in range(size):
        task = TASKS[task_id[i]]
        caption, kind = "", ""
        if task == "t2p":
            caption, mentioned[i] = make_caption(codes[i], margins[i], rng)
            question, answer = rng.choice(T2P_PROMPTS).format(caption=caption), POSE_ANSWER
        elif task == "i2p":
            question, answer = rng.choice(I2P_PROMPTS), POSE_ANSWER
        else:
            kind, question, answer = make_vqa(codes[i], eligible[i], values[i], int(archetype[i]), rng)
        questions.append(question)
        answers.append(answer)
        captions.append(caption)
        qkinds.append(kind)
    image_task = (task_id != TASKS.index("t2p"))[:, None, None]  # (N, 1, 1)
    return {
        "version": POSEWORLD_VERSION, "split": split, "size": size, "seed": seed, "image_size": image_size,
        "tasks": list(tasks), "mix": list(mix),
        "task_id": task_id, "archetype": archetype,
        "pose_body": pose_body, "joints_body": joints_body,
        "poses": torch.where(image_task, pose_cam, pose_body),
        "joints": torch.where(image_task, joints_cam, joints_body),
        "codes": codes, "margins": margins, "mentioned": mentioned, "images": images, "cameras": cameras,
        "questions": questions, "answers": answers, "captions": captions, "vqa_kinds": qkinds,
    }


class PoseWorld(torch.utils.data.Dataset):
    """PoseWorld samples of three tasks: t2p (caption -> pose), i2p (image -> pose), vqa (image + question
    -> short answer). Deterministic from (seed, split); splits use independent generator streams.

    Sample dict (`ds[i]`):
      index int; task "t2p" | "i2p" | "vqa"; question str (the user's text, no template, no image token);
      answer str (POSE_ANSWER for pose tasks, the short reference answer for vqa);
      has_pose bool (the answer holds POSE_TOKEN, i.e. there is a pose target: t2p and i2p);
      image uint8 (3, H, W), None for t2p;
      pose (24, 3) float32 axis-angle: body frame (identity root) for t2p, camera frame for i2p and vqa
        (kept for vqa too, as the pose of the pictured person, though no answer asks for it);
      pose_body (24, 3) the same pose with the canonical root; joints (24, 3) metres, of `pose`;
      codes (K,) long posecodes; mentioned (K,) bool, the caption's codes for t2p, all False otherwise;
      caption str ("" unless t2p); vqa_kind str ("" unless vqa); archetype int (index into ARCHETYPES);
      camera dict of R (3, 3), t (3,), focal (), principal (2,), transl (3,) (see section 4), None for t2p.

    Whole-split tensors, for batched evaluation: poses, pose_body, joints, joints_body (N, 24, 3);
    codes (N, K); margins (N, K); mentioned (N, K); images (N, 3, H, W) uint8 (every sample has one,
    also t2p; None if no image task was asked for); cameras (dict of (N, ...)); task_id (N,) into TASKS;
    archetype (N,); and the lists questions, answers, captions, vqa_kinds. `task_indices(task)` gives
    the rows of one task.
    """

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, image_size: int = 64,
                 tasks: tuple = TASKS, mix: tuple | None = None, cache_dir: str | None = ".cache/poseworld"):
        if split not in DEFAULT_SIZES:
            raise ValueError(f"split must be one of {tuple(DEFAULT_SIZES)}; got {split!r}")
        tasks = tuple(tasks)
        if not tasks or any(t not in TASKS for t in tasks) or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct names from {TASKS}; got {tasks}")
        mix = tuple(float(w) for w in (mix if mix is not None else [1.0] * len(tasks)))
        if len(mix) != len(tasks) or any(w < 0 for w in mix) or sum(mix) <= 0:
            raise ValueError(f"mix must give one non-negative weight per task {tasks}; got {mix}")
        size = DEFAULT_SIZES[split] if size is None else int(size)
        if size <= 0 or image_size < 8:
            raise ValueError(f"size must be > 0 and image_size >= 8; got size={size}, image_size={image_size}")
        args = (split, size, seed, image_size, tasks, mix)
        self.data = self._load_or_build(args, cache_dir)
        for key, value in self.data.items():
            setattr(self, key, value)

    @staticmethod
    def _load_or_build(args: tuple, cache_dir: str | None) -> dict:
        if cache_dir is None:
            return build_poseworld(*args)
        split, size, seed, image_size, tasks, mix = args
        tag = hashlib.sha256(repr((tasks, mix)).encode()).hexdigest()[:8]
        path = os.path.join(cache_dir, f"poseworld-v{POSEWORLD_VERSION}-{split}-n{size}-seed{seed}"
                                       f"-img{image_size}-{tag}.pt")
        if os.path.exists(path):
            try:
                data = torch.load(path, weights_only=True)
                if not isinstance(data, dict):
                    problem = f"it holds a {type(data).__name__}, not a PoseWorld split"
                elif data.get("version") == POSEWORLD_VERSION and (data["split"], data["size"], data["seed"],
                                                                     data["image_size"]) == args[:4]:
                    return data
                else:
                    problem = (f"it was written by PoseWorld version {data.get('version')} (this is version "
                               f"{POSEWORLD_VERSION}) or for other settings")
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
                problem = f"it cannot be read ({type(err).__name__}: {err})"
            print(f"PoseWorld: the cache file {path} is not usable ({problem}); regenerating it.")
        data = build_poseworld(*args)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"  # a unique name per process: ranks under torchrun may race
        torch.save(data, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
        return data

    def __len__(self) -> int:
        return self.size

    def task_indices(self, task: str) -> torch.Tensor:
        """Indices (n,) of the samples of one task."""
        return torch.nonzero(self.task_id == TASKS.index(task)).flatten()

    def __getitem__(self, i: int) -> dict:
        if not -self.size <= i < self.size:
            raise IndexError(f"PoseWorld {self.split} has {self.size} samples; index {i}")
        i = i % self.size
        task = TASKS[self.task_id[i]]
        pictured = task != "t2p"
        return {
            "index": i, "task": task, "question": self.questions[i], "answer": self.answers[i],
            "has_pose": task != "vqa",
            "image": self.images[i] if pictured else None,
            "pose": self.poses[i], "pose_body": self.pose_body[i], "joints": self.joints[i],
            "codes": self.codes[i], "mentioned": self.mentioned[i],
            "caption": self.captions[i], "vqa_kind": self.vqa_kinds[i], "archetype": int(self.archetype[i]),
            "camera": {k: v[i] for k, v in self.cameras.items()} if pictured else None,
        }


# ====================================================================================================
# 7. The conversation format (LLaVA v1), tokenisation, image preprocessing, collation, loading


# ----------------------------------------------------------------------------------------------------
# Conversation format (LLaVA v1)

# LLaVA-1.5 was fine-tuned with `--version v1`, i.e. `conv_vicuna_v1`, whose system prompt says "user";
# the similar `conv_llava_v1` ("human") is not the one the released checkpoints saw.
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100  # label value that F.cross_entropy(ignore_index=-100) skips

# The user's words for the pose tasks of the real data sets (Sec. 4.1).
POSESCRIPT_QUESTION = "Generate the SMPL pose of the person described as follows: {caption}"
IMAGE_POSE_QUESTION = "What is the SMPL pose of the person in this image?"


def build_prompt(question: str, has_image: bool, system: str = LLAVA_SYSTEM) -> str:
    """The LLaVA v1 prompt up to the assistant's turn:

        "{system} USER: <image>\\n{question} ASSISTANT:"

    system="" leaves the system line out ("USER: ... ASSISTANT:"): the tiny preset's template
    (train_sft.py --system_line; the policy's config.system_prompt says which a checkpoint was trained on).

    conv_vicuna_v1 uses sep=" " after the system prompt and after the user turn, sep2="</s>" after the
    assistant turn, and an open turn is the role followed by ":" alone. The answer is appended as
    " " + answer and closed by the eos token (encode_sample). Without an image the "<image>\\n" is left out.
    """
    if IMAGE_TOKEN in question:
        raise ValueError(f"the question must not contain {IMAGE_TOKEN!r} (build_prompt adds it): {question!r}")
    user = f"{IMAGE_TOKEN}\n{question}" if has_image else question
    return f"{system} USER: {user} ASSISTANT:" if system else f"USER: {user} ASSISTANT:"


# ----------------------------------------------------------------------------------------------------
# Tokenisation
#
# The tokenizer is duck-typed: encode(text, add_bos=False) -> list[int] (added tokens such as "<image>"
# and "<POSE>" written in the text become their single ids), decode(ids), bos_id, eos_id, pad_id (may be
# None), token_to_id(token).


def _expand_image_token(ids: list[int], image_id: int, n_image_tokens: int, has_image: bool) -> list[int]:
    """Replace the single image token by n_image_tokens copies; the model overwrites them in place with
    the visual features (CLIP tokens then pose-ViT tokens, Appendix A)."""
    count = ids.count(image_id)
    if count != (1 if has_image else 0):
        raise ValueError(f"expected {1 if has_image else 0} {IMAGE_TOKEN} token in the prompt, found {count}; "
                         f"is {IMAGE_TOKEN!r} an added token of the tokenizer?")
    if not has_image:
        return ids
    k = ids.index(image_id)
    return ids[:k] + [image_id] * n_image_tokens + ids[k + 1:]


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def encode_prompt(question: str, has_image: bool, tokenizer, n_image_tokens: int,
                  system: str = LLAVA_SYSTEM) -> torch.Tensor:
    """[bos] + tokens of build_prompt(), the image token expanded. What the policy is conditioned on when
    it generates (RFT sampling, evaluation). -> (T,) long"""
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    ids = _expand_image_token(tokenizer.encode(build_prompt(question, has_image, system)), image_id,
                              n_image_tokens, has_image)
    return torch.tensor(_bos(tokenizer) + ids, dtype=torch.long)  # (T,)


def encode_sample(sample: dict, tokenizer, n_image_tokens: int,
                  system: str = LLAVA_SYSTEM) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of one training conversation; the loss is on the answer only.

    input_ids = [bos] + prompt + answer + [eos], labels = IGNORE_INDEX on [bos] + prompt, the token ids on
    answer + [eos] (labels[t] is the target at position t; the model shifts by one, as Hugging Face does).

    The answer boundary. In the whole conversation the answer follows "ASSISTANT:" after a space. A Llama
    BPE marks a word's leading space inside the word's first piece ("ASSISTANT: The" -> ":", "▁The"), so
    encoding " " + answer on its own would give an extra "▁" piece, and encoding answer on its own relies
    on the tokenizer prepending "▁" to its input (Llama does, other BPEs do not). Instead the answer's ids
    are the tail of encode(prompt + " " + answer) after encode(prompt): exactly the ids the tokenizer
    gives the whole conversation, and the prompt part is exactly what the policy sees at generation time.
    A tokenizer that merges across the boundary would break this; that is checked.
    """
    has_image = sample["image"] is not None
    prompt = build_prompt(sample["question"], has_image, system)
    prompt_ids = tokenizer.encode(prompt)
    full_ids = tokenizer.encode(prompt + " " + sample["answer"])
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the tokenizer merges the end of the prompt with the answer, so the label boundary "
                         f"is not a token boundary (prompt ends {prompt[-20:]!r}, answer {sample['answer'][:20]!r})")
    answer_ids = full_ids[len(prompt_ids):] + [tokenizer.eos_id]  # eos closes the turn (sep2 = "</s>")
    prompt_ids = _bos(tokenizer) + _expand_image_token(prompt_ids, tokenizer.token_to_id(IMAGE_TOKEN),
                                                       n_image_tokens, has_image)
    input_ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)  # (T,)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer_ids, dtype=torch.long)  # (T,)
    return input_ids, labels


# ----------------------------------------------------------------------------------------------------
# Image preprocessing for the two encoders (Appendix A: CLIP + pose-aware ViT)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as in CLIPImageProcessor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # HMR2.0 (cfg.MODEL.IMAGE_MEAN / IMAGE_STD)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def _resize_uint8(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize as Pillow does for uint8 images: antialiased filter, result rounded to 0..255 (kept float)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images.float()
    x = F.interpolate(images.float(), size=size, mode=mode, align_corners=False, antialias=True)  # (N, 3, h, w)
    return x.round().clamp(0, 255)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    return (x / 255.0 - mean) / std  # (N, 3, H, W)


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIPImageProcessor in torch: the shortest side resized to `size` (bicubic, the long side to
    int(size * long / short)), the centre size x size crop (top = (h - size) // 2), scaled to [0, 1] and
    normalised with the OpenAI CLIP mean/std. (N, 3, H, W) uint8 -> (N, 3, size, size) float32.

    torch's antialiased bicubic is Pillow's filter (a = -0.5), so results match Pillow up to rounding.
    LLaVA-1.5 itself first pads images to a square with the mean colour (`image_aspect_ratio pad`); for
    the square person crops of the pose tasks the two agree.
    """
    _check_images(images)
    H, W = images.shape[-2:]
    if H <= W:
        new_h, new_w = size, int(size * W / H)
    else:
        new_h, new_w = int(size * H / W), size
    x = _resize_uint8(images, (new_h, new_w), "bicubic")  # (N, 3, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top:top + size, left:left + size]  # (N, 3, size, size)
    return _normalize(x, CLIP_MEAN, CLIP_STD)


def pose_vit_preprocess(images: torch.Tensor, size: tuple[int, int] = (256, 192)) -> torch.Tensor:
    """HMR2.0's input: the person crop resized to a square H x H (bilinear, as its cv2.warpAffine crop,
    antialiased as its Gaussian blur before downsampling), normalised with the ImageNet mean/std, then the
    central W columns: HMR2.0 builds 256 x 256 patches and feeds `x[:, :, :, 32:-32]` (256 x 192) to its ViT.
    Other sizes (the tiny preset) keep the same rule. (N, 3, h, w) uint8 -> (N, 3, H, W) float32.
    The crop should be square (crop_box gives one); a non-square image is stretched. With HMR2.0's crop of a
    person box (hmr2_crop_side), the W kept columns span the box's width.
    """
    _check_images(images)
    H, W = size
    if W > H:
        raise ValueError(f"pose ViT input must be at most as wide as high, got size={size}")
    x = _normalize(_resize_uint8(images, (H, H), "bilinear"), IMAGENET_MEAN, IMAGENET_STD)  # (N, 3, H, H)
    left = (H - W) // 2
    return x[:, :, :, left:left + W]  # (N, 3, H, W)


# ----------------------------------------------------------------------------------------------------
# Collation


def collate(samples: list[dict], tokenizer, n_image_tokens: int, clip_size: int,
            pose_size: tuple[int, int], for_generation: bool = False, system: str = LLAVA_SYSTEM) -> dict:
    """Batch sample dicts for the policy.

    Text. Training (SFT): input_ids / attention_mask / labels, right-padded, labels IGNORE_INDEX on the
    prompt and the padding. Generation (RFT sampling, evaluation): the prompt only, LEFT-padded so every
    row's last prompt token sits in the last column and new tokens are appended in step; no labels.
    Padding uses tokenizer.pad_id, or eos when it has none (Llama ships without a pad token), or 0; the
    padded positions are masked out by attention_mask either way.

    Images. clip_pixels (n_img, 3, S, S) and pose_pixels (n_img, 3, H, W) hold the preprocessed images of
    the samples that have one, in batch order; image_index (n_img,) says which rows they belong to.

    Ground truth. pose (B, 24, 3) and joints (B, 24, 3) float32, zeros where absent (None, or the sample's
    own has_pose / has_joints is False), with has_pose / has_joints (B,) bool. Every other sample key
    (task, question, answer, caption, ...) becomes a list under the same name, None where a sample lacks it.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    pad_id = 0 if pad_id is None else pad_id
    B = len(samples)

    if for_generation:
        rows = [encode_prompt(s["question"], s["image"] is not None, tokenizer, n_image_tokens, system)
                for s in samples]
    else:
        rows, label_rows = zip(*[encode_sample(s, tokenizer, n_image_tokens, system) for s in samples])
    T = max(len(r) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    for b, ids in enumerate(rows):
        cols = slice(T - len(ids), T) if for_generation else slice(0, len(ids))  # left vs right padding
        input_ids[b, cols] = ids
        attention_mask[b, cols] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not for_generation:
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for b, row in enumerate(label_rows):
            labels[b, :len(row)] = row
        batch["labels"] = labels

    image_index = [b for b, s in enumerate(samples) if s["image"] is not None]
    images = [samples[b]["image"][None] for b in image_index]  # each (1, 3, H, W); sizes may differ
    batch["image_index"] = torch.tensor(image_index, dtype=torch.long)  # (n_img,)
    batch["clip_pixels"] = torch.cat([clip_preprocess(im, clip_size) for im in images]) if images \
        else torch.zeros(0, 3, clip_size, clip_size)  # (n_img, 3, S, S)
    batch["pose_pixels"] = torch.cat([pose_vit_preprocess(im, pose_size) for im in images]) if images \
        else torch.zeros(0, 3, *pose_size)  # (n_img, 3, H, W)

    for key in ("pose", "joints"):
        # a sample may say has_pose=False while still carrying a pose (PoseWorld keeps the pictured pose of
        # its VQA samples); the flag wins, so no pose loss or reward is computed there
        has = torch.tensor([bool(s.get(f"has_{key}", True)) and s.get(key) is not None for s in samples])  # (B,)
        value = torch.zeros(B, smpl.NUM_JOINTS, 3)  # (B, 24, 3)
        for b in torch.nonzero(has).flatten().tolist():
            value[b] = torch.as_tensor(samples[b][key], dtype=torch.float32).reshape(smpl.NUM_JOINTS, 3)
        batch[key], batch[f"has_{key}"] = value, has

    other_keys = sorted({k for s in samples for k in s} - {"image", "pose", "joints", "has_pose", "has_joints"})
    for key in other_keys:
        batch[key] = [s.get(key) for s in samples]
    return batch


# ----------------------------------------------------------------------------------------------------
# Distributed loading (torchrun): each rank its own slice of every global batch


class ShardedBatchSampler(torch.utils.data.Sampler):
    """An endless stream of per-rank batches of indices, resumable at any step.

    Epoch e visits the data in a permutation seeded by seed + e, the same on every rank (no communication
    needed). Step k of the whole run takes global batch j = k mod steps_per_epoch of epoch
    k // steps_per_epoch, i.e. batch_size * world_size consecutive indices of that permutation, and rank r
    keeps its r-th block of batch_size. So the ranks' batches are disjoint, together they cover the epoch,
    and the stream from start_step=k is exactly the uninterrupted stream's from step k (the RFT loop
    resumes "with the same data position").

    drop_last=True drops the incomplete global batch at the end of an epoch; drop_last=False completes it
    with indices from the start of the same permutation, so every rank still gets a full batch and all
    ranks take the same number of steps (DDP needs that); those few samples are seen twice that epoch.
    The stream never ends: the training loop decides how many steps to take.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, start_step: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.shuffle, self.start_step = seed, shuffle, start_step
        self.global_batch = batch_size * world_size
        steps = num_samples // self.global_batch if drop_last else math.ceil(num_samples / self.global_batch)
        if steps == 0:
            raise ValueError(f"{num_samples} samples do not fill one global batch of {batch_size} x "
                             f"{world_size} ranks; use a smaller batch or drop_last=False")
        self.steps_per_epoch = steps
        self._epoch, self._order = None, None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's visiting order, padded by wrapping to steps_per_epoch whole global batches."""
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=g)  # (n,)
            else:
                order = torch.arange(self.num_samples)  # (n,)
            need = self.steps_per_epoch * self.global_batch
            self._order = order.repeat(math.ceil(need / self.num_samples))[:need]  # (need,)
            self._epoch = epoch
        return self._order

    def batch_at(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.steps_per_epoch)
        start = j * self.global_batch + self.rank * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size].tolist()

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1


def _as_list(samples):
    return samples


def make_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                shuffle: bool = True, drop_last: bool = True, start_step: int = 0, collate_fn=None,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's shard (ShardedBatchSampler); batch_size is per rank. collate_fn is
    usually functools.partial(collate, tokenizer=..., n_image_tokens=..., clip_size=..., pose_size=...);
    without one the loader yields lists of sample dicts. num_workers=0 keeps everything in the training
    process (PoseWorld is in memory); raise it for real images."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, rank, world_size, seed, shuffle, drop_last, start_step)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_fn if collate_fn is not None else _as_list)


def collate_fn(tokenizer, policy, for_generation=False):
    """`collate` with the encoders' input sizes, the number of image tokens and the prompt's system line
    of this policy (model.PoseLLaVA, or its PoseLLaVAConfig: eval.py --ask collates before it loads the
    weights), for make_loader or a list of samples."""
    c = getattr(policy, "config", policy)
    return functools.partial(collate, tokenizer=tokenizer, n_image_tokens=c.n_image_tokens,
                             clip_size=c.clip_size, pose_size=c.pose_size, for_generation=for_generation,
                             system=prompt_system(c))


def prompt_system(config) -> str:
    """The system line of a policy's prompts: its config's system_prompt, where None (the paper's
    template, and every checkpoint saved before the field existed) means LLaVA v1's."""
    return LLAVA_SYSTEM if config.system_prompt is None else config.system_prompt


def to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors on device (lists of strings stay as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def parse_task_mix(spec: str) -> tuple:
    """"t2p:2,i2p:2,vqa:1" -> the weights of TASKS in order, (2.0, 2.0, 1.0); a task left out gets 0."""
    weights = dict.fromkeys(TASKS, 0.0)
    for item in filter(None, (x.strip() for x in spec.split(","))):
        task, _, w = item.partition(":")
        if task not in weights:
            raise SystemExit(f"--task_mix: unknown task {task!r} in {spec!r}; tasks are {', '.join(TASKS)}")
        try:
            weights[task] = float(w)
        except ValueError:
            raise SystemExit(f"--task_mix: {item!r} is not task:weight") from None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise SystemExit(f"--task_mix={spec!r}: weights must be >= 0, with at least one > 0")
    return tuple(weights[t] for t in TASKS)


def build_datasets(cfg, split: str, mix: tuple | None = None):
    """PoseWorld, or a concatenation of the real data sets named in cfg.data (Sec. 4.1). cfg: a training
    script's config (its data fields: data, seed, poseworld_size, image_size and the real sets' paths).
    mix: PoseWorld's task weights for the train split (parse_task_mix; None = thirds): the same poses."""
    names = [n.strip() for n in cfg.data.split(",") if n.strip()]
    sets = []
    for name in names:
        if name == "poseworld":
            size = cfg.poseworld_size if split == "train" else None
            sets.append(PoseWorld(split, size=size, seed=cfg.seed, image_size=cfg.image_size,
                                  mix=mix if split == "train" else None))
        elif name == "posescript":
            sets.append(PoseScript(cfg.posescript_root, cfg.amass_root, split=split))
        elif name == "h36m":
            sets.append(Human36M(cfg.h36m_npz, cfg.h36m_images, images=True))
        elif name == "llava_instruct":
            sets.append(LLaVAInstruct(cfg.llava_instruct_json, cfg.coco_images, images=True))
        else:
            raise SystemExit(f"unknown data set {name!r} in --data; choose from poseworld, posescript, "
                             f"h36m, llava_instruct")
    return sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)


def dataset_parts(dataset) -> list:
    """The data sets build_datasets joined: the parts of a ConcatDataset, or [dataset]."""
    return list(dataset.datasets) if isinstance(dataset, torch.utils.data.ConcatDataset) else [dataset]


class TaskMixture(torch.utils.data.Dataset):
    """Prompts from several single-task data sets (PoseScript t2p, Human3.6M i2p, LLaVA-Instruct vqa) in a
    stated task mix: RFT's counterpart on real data of PoseWorld's `mix`.

    mix: one weight per task of TASKS (parse_task_mix). Of the `size` rows (by default as many
    as the sets hold together) each task gets exactly its share (largest remainders, as _assign_tasks);
    a task's share is split among its sets by their sizes, and each set gives its rows in a random order
    of its own samples, starting a new order when its share is larger than the set. A set whose task has
    weight 0 is left out; a weighted task with no set is an error. The rows are a pure function of
    (sets, mix, size, seed): make_loader's ShardedBatchSampler shuffles, shards and resumes them (its
    start_step) as it does any data set. counts: {task: rows}. Each set needs a `task` attribute.
    """

    def __init__(self, sets: list, mix: tuple, size: int | None = None, seed: int = 0):
        if len(mix) != len(TASKS) or any(w < 0 for w in mix):
            raise ValueError(f"mix must give one non-negative weight per task {TASKS}; got {mix}")
        weight = dict(zip(TASKS, (float(w) for w in mix)))
        for ds in sets:
            if getattr(ds, "task", None) not in TASKS:
                raise ValueError(f"TaskMixture: {type(ds).__name__} has no single task (a `task` attribute in "
                                 f"{TASKS}); PoseWorld mixes its tasks itself (its `mix`)")
        self.sets = [ds for ds in sets if weight[ds.task] > 0 and len(ds) > 0]
        tasks = [t for t in TASKS if weight[t] > 0]
        missing = [t for t in tasks if not any(ds.task == t for ds in self.sets)]
        if missing or not self.sets:
            raise ValueError(f"TaskMixture: the mix {dict(weight)} weighs task(s) {missing or tasks} that no "
                             f"given data set has (sets: {[type(ds).__name__ for ds in sets]})")
        size = sum(len(ds) for ds in self.sets) if size is None else int(size)
        g = torch.Generator().manual_seed(seed)
        per_task = _largest_remainders(size, [weight[t] for t in tasks])  # (T,) rows of each task
        parts = []
        for task, n_task in zip(tasks, per_task.tolist()):
            members = [k for k, ds in enumerate(self.sets) if ds.task == task]
            per_set = _largest_remainders(n_task, [len(self.sets[k]) for k in members])  # (S,)
            for k, n in zip(members, per_set.tolist()):
                n_k = len(self.sets[k])
                passes = [torch.randperm(n_k, generator=g) for _ in range(math.ceil(n / n_k))]
                items = torch.cat(passes)[:n] if passes else torch.zeros(0, dtype=torch.long)  # (n,)
                parts.append(torch.stack([torch.full_like(items, k), items], 1))  # (n, 2) (set, item)
        self.index = torch.cat(parts)  # (size, 2), grouped by set: the sampler shuffles
        self.counts = {t: int(c) for t, c in zip(tasks, per_task)}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        k, j = self.index[i].tolist()
        return self.sets[k][j]


def _largest_remainders(n: int, weights: list) -> torch.Tensor:
    """n split into integer counts (len(weights),) proportional to weights, summing to n."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)  # (T,)
    counts = torch.floor(w * n).long()  # (T,)
    for i in torch.argsort(w * n - counts, descending=True, stable=True)[: n - int(counts.sum())]:
        counts[i] += 1
    return counts


# ====================================================================================================
# File formats: not in the paper
#
# Pictures (a zlib-only PNG writer with a bitmap font, `render_poses`), real images, and the readers of
# the real data sets of Sec. 4.1 (PoseScript, 3DPW, Human3.6M, LLaVA-Instruct-150k).
# ----------------------------------------------------------------------------------------------------
# 8. Pictures: a PNG writer and grids of skeletons


def write_png(path: str, rgb) -> None:
    """Write an 8-bit RGB image (H, W, 3) uint8 (numpy array or tensor) as a PNG, with zlib only.

    PNG = signature, then chunks (length, type, data, CRC-32 of type + data): IHDR (size, bit depth 8,
    colour type 2 = RGB), IDAT (zlib stream of the rows, each prefixed by filter type 0), IEND.
    Written to a temporary name, then renamed: a reader never sees half a file."""
    image = torch.as_tensor(rgb).cpu()
    if image.dim() != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"write_png expects uint8 RGB (H, W, 3); got {image.dtype} {tuple(image.shape)}")
    H, W, _ = image.shape
    rows = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), image.reshape(H, 3 * W)], 1)  # (H, 1 + 3W)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.contiguous().numpy().tobytes(), 6)) + chunk(b"IEND", b""))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: str) -> torch.Tensor:
    """Decode a PNG with zlib only (load_image uses it when Pillow is missing). -> uint8 (3, H, W), RGB.

    Reads the usual files: grey, grey + alpha, RGB, RGBA (8 or 16 bits) and palette (8 bits), not
    interlaced. As Pillow's convert("RGB"): grey is repeated, alpha dropped; 16 bits keep the high byte.
    Each row is un-filtered by the filter byte it starts with (PNG spec 9.2: None, Sub, Up, Average,
    Paeth), each byte from the byte bpp to its left (a), above (b) and above-left (c)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path} is not a PNG file")
    pos, header, palette, idat = 8, None, None, []
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        chunk = raw[pos + 8:pos + 8 + length]
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"PLTE":
            palette = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, 3)  # (n, 3)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError(f"{path}: a damaged PNG (no IHDR or IDAT chunk)")
    W, H, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    depths = (8,) if colour == 3 else (8, 16)
    if channels is None or interlace or depth not in depths or (colour == 3 and palette is None):
        raise ValueError(f"{path}: a PNG of colour type {colour}, {depth} bits{', interlaced' if interlace else ''} "
                         "is not read without Pillow (pip install pillow)")
    bpp = channels * depth // 8  # bytes per pixel
    try:
        stream = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as e:
        raise ValueError(f"{path}: a damaged PNG ({e})") from None
    if stream.size != H * (1 + W * bpp):
        raise ValueError(f"{path}: a damaged PNG ({stream.size} bytes of pixels for {W} x {H})")
    rows = stream.reshape(H, 1 + W * bpp)  # (H, 1 + W bpp): filter byte, then the row
    out = np.zeros((H, W * bpp), dtype=np.int32)  # (H, W bpp)
    prev = np.zeros(W * bpp, dtype=np.int32)  # the row above the first is zeros
    for y in range(H):
        kind, x = rows[y, 0], rows[y, 1:].astype(np.int32)  # (W bpp,)
        if kind == 0:
            row = x
        elif kind == 1:  # Sub: a running sum along each byte lane
            row = x.reshape(W, bpp).cumsum(0).reshape(-1) % 256
        elif kind == 2:  # Up
            row = (x + prev) % 256
        elif kind in (3, 4):  # Average, Paeth: each pixel needs the one decoded before it
            row = np.zeros_like(x)
            left = np.zeros(bpp, dtype=np.int32)
            for i in range(0, W * bpp, bpp):
                b, c = prev[i:i + bpp], prev[i - bpp:i] if i else np.zeros(bpp, dtype=np.int32)
                if kind == 3:
                    predict = (left + b) // 2
                else:
                    p = left + b - c
                    pa, pb, pc = np.abs(p - left), np.abs(p - b), np.abs(p - c)
                    predict = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, b, c))
                left = row[i:i + bpp] = (x[i:i + bpp] + predict) % 256
        else:
            raise ValueError(f"{path}: a damaged PNG (filter type {kind} in row {y})")
        out[y], prev = row, row
    pixels = out.astype(np.uint8).reshape(H, W, bpp)  # (H, W, bpp)
    if depth == 16:
        pixels = pixels[:, :, 0::2]  # (H, W, channels) the high (first) byte of each sample
    if colour == 3:
        pixels = palette[pixels[:, :, 0]]  # (H, W, 3)
    elif colour in (0, 4):
        pixels = pixels[:, :, :1].repeat(3, axis=2)  # (H, W, 3) grey repeated, alpha dropped
    else:
        pixels = pixels[:, :, :3]  # (H, W, 3) alpha dropped
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()  # (3, H, W)


# A 3x5 bitmap font (rows top to bottom, 3 bits each) for panel titles; lower case is drawn as upper.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    " ": "000000000000000", ".": "000000000000010", ",": "000000000010100", "-": "000000111000000",
    "+": "000010111010000", ":": "000010000010000", "=": "000111000111000", "/": "001001010100100",
    "(": "010100100100010", ")": "010001001001010", "%": "101001010100101", "_": "000000000000111",
    "?": "111001010000010", "'": "010010000000000",
}


def _fit(text: str, n: int) -> str:
    """text cut to n characters, ending in '..' when cut (a caption shortened to its row's width)."""
    return text if len(text) <= n else text[:max(0, n - 2)].rstrip() + ".."


def _draw_text(canvas: torch.Tensor, text: str, row: int, col: int, scale: int = 1) -> None:
    """Draw text in light grey on canvas (3, H, W) uint8 at (row, col), clipped; unknown characters
    are drawn as '?'."""
    H, W = canvas.shape[1:]
    for n, ch in enumerate(text.upper()):
        bits = torch.tensor([int(b) for b in _FONT.get(ch, _FONT["?"])], dtype=torch.bool).view(5, 3)  # (5, 3)
        glyph = bits.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # (5s, 3s)
        r0, c0 = row, col + n * 4 * scale
        h, w = min(glyph.shape[0], H - r0), min(glyph.shape[1], W - c0)
        if h <= 0 or w <= 0:
            break
        region = canvas[:, r0:r0 + h, c0:c0 + w]  # (3, h, w) a view
        region[:, glyph[:h, :w]] = 220


# Orthographic views: rows of the matrix map body-frame points to (u right, v down, depth away).
VIEWS = {
    "front": [[1, 0, 0], [0, -1, 0], [0, 0, -1]],  # seen from the front: the body's left on the image right
    "side": [[0, 0, -1], [0, -1, 0], [-1, 0, 0]],  # seen from the body's left: its front on the image left
    "back": [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
    "top": [[1, 0, 0], [0, 0, 1], [0, -1, 0]],  # seen from above: the front at the bottom
}


def render_poses(joints, path: str, views=("front", "side"), titles=None, size: int = 128, cols: int | None = None,
                 extent: float = 2.3, row_labels=None, footers=None) -> torch.Tensor:
    """Write a PNG grid of skeletons, one cell per pose, and in each cell one size x size panel per view.

    joints: (N, 24, 3) tensor or a list of (24, 3), in the body frame (use pose_body for camera-frame
    poses); titles: N strings drawn in each cell's corner with a 3x5 font (optional); cols: cells per
    row (default ceil(sqrt(N))); extent: metres across a panel (the same scale in every panel, so
    poses can be compared); row_labels: one string per row of cells, drawn in a band above the row and
    shortened to its width (optional); footers: N strings drawn along each cell's bottom edge (optional).
    Orthographic views, the colours of the PoseWorld images. Used for the training-progress figure (Fig. 5)
    and the README. Returns the image (3, H, W) uint8."""
    J = (torch.stack([torch.as_tensor(j) for j in joints]) if isinstance(joints, (list, tuple))
         else torch.as_tensor(joints))
    if J.dim() != 3 or J.shape[1:] != (24, 3) or J.shape[0] == 0:
        raise ValueError(f"render_poses expects joints (N, 24, 3) with N >= 1; got {tuple(J.shape)}")
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"views must be names from {tuple(VIEWS)}; got {views}")
    for name, texts in (("titles", titles), ("footers", footers)):
        if texts is not None and len(texts) != J.shape[0]:
            raise ValueError(f"{name} must give one string per pose ({J.shape[0]}); got {len(texts)}")
    N, V = J.shape[0], len(views)
    cols = cols or math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels must give one string per row of cells ({rows}); got {len(row_labels)}")
    J = J.detach().cpu().float()
    P = torch.cat([J, _head_centre(J)[:, None]], 1)  # (N, 25, 3)
    a, b = [k for k, _ in _SEGMENTS], [k for _, k in _SEGMENTS]
    canvas = torch.full((3, rows * size, cols * V * size), 40, dtype=torch.uint8)
    scale = size / extent  # pixels per metre
    for v, view in enumerate(views):
        X = P @ torch.tensor(VIEWS[view], dtype=torch.float32).T  # (N, 25, 3) view coordinates
        centre = (X[..., :2].amin(1) + X[..., :2].amax(1)) / 2  # (N, 2) centre each skeleton in its panel
        uv = (X[..., :2] - centre[:, None]) * scale + (size - 1) / 2  # (N, 25, 2)
        ends = torch.stack([uv[:, a], uv[:, b]], 2)  # (N, S, 2, 2)
        depth = torch.stack([X[:, a, 2], X[:, b, 2]], 2)  # (N, S, 2)
        radius = (SEGMENT_RADII * scale).clamp_min(1.0).expand(N, -1)  # (N, S)
        panels = _paint(_rasterize(ends, depth, radius, size, size),
                        torch.full((N, 3, size, size), 40, dtype=torch.uint8))  # (N, 3, size, size)
        for i in range(N):
            r, c = divmod(i, cols)
            canvas[:, r * size:(r + 1) * size, (c * V + v) * size:(c * V + v + 1) * size] = panels[i]
    canvas[:, ::size, :] = 90  # thin grid lines between cells and panels
    canvas[:, :, ::size] = 90
    s = max(1, size // 64)  # font scale: 5 px letters are unreadable on a 128 px panel
    for i, title in enumerate(titles or []):
        r, c = divmod(i, cols)
        _draw_text(canvas, str(title), r * size + 3, c * V * size + 3, scale=s)
    for i, footer in enumerate(footers or []):
        r, c = divmod(i, cols)
        _draw_text(canvas, _fit(str(footer), (V * size - 6) // (4 * s)), (r + 1) * size - 8 * s, c * V * size + 3,
                   scale=s)
    if row_labels is not None:  # a darker band above each row of cells holds its label
        strips = []
        for r, label in enumerate(row_labels):
            band = torch.full((3, 9 * s, canvas.shape[2]), 20, dtype=torch.uint8)  # (3, 9s, W)
            _draw_text(band, _fit(str(label), (canvas.shape[2] - 6) // (4 * s)), 2 * s, 3, scale=s)
            strips += [band, canvas[:, r * size:(r + 1) * size]]
        canvas = torch.cat(strips, 1)  # (3, rows * (size + 9s), W)
    write_png(path, canvas.permute(1, 2, 0))
    return canvas


# ----------------------------------------------------------------------------------------------------
# 9. Real images and the real data sets of Sec. 4.1
#
# Real images


def load_image(path: str) -> torch.Tensor:
    """Decode an image file with Pillow, or a PNG with read_png when Pillow is missing. -> uint8 (3, H, W), RGB."""
    try:
        from PIL import Image
    except ImportError as e:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read(8) == PNG_SIGNATURE:
                    return read_png(path)
        raise ImportError(f"{path}: reading images other than PNG needs Pillow: pip install pillow "
                          "(PNG files, PoseWorld and the annotation-only loaders do not need it)") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def crop_box(image: torch.Tensor, center, box_size: float, out_size: int) -> torch.Tensor:
    """The square box of side box_size pixels centred at center = (x, y), zero outside the image (as
    HMR2.0's constant border), resized to out_size x out_size. (3, H, W) uint8 -> (3, out, out) uint8."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image (3, H, W), got {tuple(image.shape)}")
    side = max(1, int(round(box_size)))
    x0, y0 = int(round(center[0] - side / 2)), int(round(center[1] - side / 2))
    H, W = image.shape[1:]
    out = torch.zeros(3, side, side, dtype=image.dtype)  # (3, side, side)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, W), min(y0 + side, H)
    if sx1 > sx0 and sy1 > sy0:
        out[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[:, sy0:sy1, sx0:sx1]
    return _resize_uint8(out[None], (out_size, out_size), "bilinear")[0].to(torch.uint8)  # (3, out, out)


# HMR2.0's ViT sees a 192 x 256 (width x height) window: 4D-Humans sets MODEL.BBOX_SHAPE = [192, 256] for
# the ViT backbone (hmr2/models/__init__.py) and expands every person box to that aspect before cropping.
POSE_VIT_BOX_ASPECT = (192, 256)


def hmr2_crop_side(width: float, height: float, aspect=POSE_VIT_BOX_ASPECT) -> float:
    """The side of the square crop HMR2.0 takes around a person box of width x height pixels.

    4D-Humans (hmr2/datasets/utils.py, expand_to_aspect_ratio; used by image_dataset.py and
    vitdet_dataset.py as `expand_to_aspect_ratio(scale * 200, BBOX_SHAPE).max()`) grows the box, never
    shrinks it, to the aspect w:h = 192:256 and crops the square of its longer side: max(height,
    width * 256 / 192). For a square box of side s that is 4/3 s, and the central 192 of the 256 columns
    that its ViT reads (pose_vit_preprocess) then span exactly the box's width. Cropping the box side
    itself would frame the person 4/3 larger than HMR2.0 was trained on and cut wide poses.
    """
    w_t, h_t = aspect
    return max(float(height), float(width) * h_t / w_t)


def box_from_keypoints(keypoints: np.ndarray, scale_factor: float = 1.2):
    """(center (x, y), side) of the square box around 2D keypoints (K, 3) = (x, y, confidence), keeping
    those with confidence > 0, enlarged by scale_factor (SPIN's 3DPW preprocessing uses 1.2).
    None when no keypoint is confident."""
    kp = keypoints[keypoints[:, 2] > 0, :2]
    if len(kp) == 0:
        return None
    lo, hi = kp.min(0), kp.max(0)
    return ((lo + hi) / 2).tolist(), float(scale_factor * (hi - lo).max())


# ----------------------------------------------------------------------------------------------------
# File helpers: every failure names the file and what was expected


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from e


def _load_npz(path: str, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """The named arrays of an .npz file (missing optional ones left out), refusing pickled objects
    (allow_pickle=False). Only the named arrays are read, so unrelated keys never matter."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not an .npz archive")
        with z:
            missing = [k for k in required if k not in z.files]
            if missing:
                raise KeyError(f"missing arrays {missing}; expected {what} with {list(required)}, found {z.files}")
            return {k: z[k] for k in (*required, *optional) if k in z.files}
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from e
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: cannot read as .npz ({e}); expected {what}") from e


def _check_shape(array: np.ndarray, shape: tuple, name: str, path: str) -> None:
    """shape may hold None for 'any size'."""
    if array.ndim != len(shape) or any(s is not None and a != s for a, s in zip(array.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{path}: {name} has shape {array.shape}, expected {want}")


def load_numpy_pickle(path: str, what: str):
    """Load a pickle that holds only numpy arrays and Python containers, without running any code: the
    project's one restricted unpickler (smpl.load_pickle) with numpy's globals alone, which also refuses
    object arrays and pickles too deep or too large for their size. encoding='latin1' reads Python-2
    pickles (the 3DPW release): their str become str, and numpy accepts latin-1 strings as raw array data."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return smpl.load_pickle(path, allow=("numpy",))
    except smpl.PickleFileError as e:
        raise ValueError(f"{path}: cannot load {what} ({e.problem})") from None


def _rotate_global_orient(R: torch.Tensor, global_orient: torch.Tensor) -> torch.Tensor:
    """axis-angle of R @ R(global_orient). (3, 3), (3,) -> (3,)"""
    return smpl.matrix_to_axis_angle(R @ smpl.axis_angle_to_matrix(global_orient))  # (3,)


# ----------------------------------------------------------------------------------------------------
# PoseScript (Delmas et al. 2022): text-pose pairs on AMASS (Sec. 4.1, "Text-Pose Data")

POSESCRIPT_H2 = "posescript_human_6293.json"  # human-written captions (PoseScript-H2, the test set of Table 2)
POSESCRIPT_A2 = "posescript_auto_100k.json"  # automatic captions (PoseScript-A2)


def posescript_normalize_orient(global_orient: torch.Tensor) -> torch.Tensor:
    """PoseScript's orientation normalisation (text2pose/utils.py get_pose_data_from_file): write the
    global rotation as Euler angles R = Rz(tz) Ry(ty) Rx(tx) with
        tx = atan2(R21, R22), ty = atan2(-R20, sqrt(R21^2 + R22^2)), tz = atan2(R10, R00),
    and set tz = 0. AMASS is z-up, so this removes the body's heading about the vertical axis: every pose
    faces the same way, while its tilt (lying, bending) is kept. (..., 3) -> (..., 3)"""
    R = smpl.axis_angle_to_matrix(global_orient)  # (..., 3, 3)
    tx = torch.atan2(R[..., 2, 1], R[..., 2, 2])  # (...,)
    ty = torch.atan2(-R[..., 2, 0], torch.sqrt(R[..., 2, 1] ** 2 + R[..., 2, 2] ** 2))  # (...,)
    zero = torch.zeros_like(tx)
    Rx = smpl.axis_angle_to_matrix(torch.stack([tx, zero, zero], -1))  # (..., 3, 3)
    Ry = smpl.axis_angle_to_matrix(torch.stack([zero, ty, zero], -1))  # (..., 3, 3)
    return smpl.matrix_to_axis_angle(Ry @ Rx)  # (..., 3)


def smplh_to_smpl_pose(smplh_pose: np.ndarray) -> torch.Tensor:
    """SMPL-H (or SMPL-X) axis-angle, global orient first, (>= 66,) -> SMPL (24, 3).

    The first 22 joints (pelvis .. wrists) of SMPL-H are SMPL's first 22, in the same order. SMPL's joints
    22 and 23 (left and right hand) have no SMPL-H counterpart (SMPL-H replaces them by 30 finger joints):
    they are set to zero rotation, the flat hand, which moves only the hand vertices."""
    pose = torch.zeros(smpl.NUM_JOINTS, 3)  # (24, 3)
    pose[:22] = torch.as_tensor(np.asarray(smplh_pose[:66], dtype=np.float32)).view(22, 3)
    return pose


class PoseScript(torch.utils.data.Dataset):
    """PoseScript text-to-pose samples, one per (pose, caption).

    Files of the V2 release (posescript_release_v2.zip), under `root`:
        ids_2_dataset_sequence_and_frame_index_100k.json  {"<pose id>": ["AMASS", "<npz path under the
                                                           AMASS root>", <frame index>]}
        {train,val,test}_ids_100k.json                      [<pose id>, ...]
        posescript_human_6293.json (H2), posescript_auto_100k.json (A2)
                                                           {"<pose id>": ["caption", ...]} (a single string
                                                           is accepted too, as the official loader does)
    and the AMASS SMPL-H sequences under `amass_root`: .npz with poses (T, 156) axis-angle (global orient,
    21 body, 30 finger joints), trans (T, 3), betas (16,), gender, mocap_framerate (only poses is read).

    The pose is normalised as PoseScript does (posescript_normalize_orient) and so stays in AMASS's
    z-up world, as the PoseScript retrieval model expects it; SMPL's hand joints are zero
    (smplh_to_smpl_pose). No betas: SMPL-H shape coefficients do not transfer to SMPL, and PoseScript
    itself describes poses on the mean body. All poses are read once at construction (100k x 24 x 3
    floats), so a broken file shows up immediately.
    """
    task = "t2p"  # every sample's task (TaskMixture draws the sets by it)

    def __init__(self, root: str, amass_root: str, split: str = "train", caption_files=(POSESCRIPT_H2,),
                 id_map_file: str = "ids_2_dataset_sequence_and_frame_index_100k.json",
                 split_file: str = "{split}_ids_100k.json"):
        id_map_path = os.path.join(root, id_map_file)
        id_map = _read_json(id_map_path, "the PoseScript pose-id -> [dataset, sequence, frame] mapping")
        split_path = os.path.join(root, split_file.format(split=split))
        split_ids = _read_json(split_path, f"the PoseScript {split} split (a list of pose ids)")
        if not isinstance(split_ids, list) or not all(isinstance(i, int) for i in split_ids):
            raise ValueError(f"{split_path}: expected a JSON list of integer pose ids")
        in_split = set(split_ids)

        captions = {}  # pose id -> list of captions, in file order
        for name in caption_files:
            path = os.path.join(root, name)
            data = _read_json(path, "PoseScript captions {pose id: [caption, ...]}")
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a JSON object {{pose id: [caption, ...]}}")
            for key, texts in data.items():
                texts = [texts] if isinstance(texts, str) else texts
                if not key.isdigit() or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    raise ValueError(f"{path}: entry {key!r} is not 'pose id: [caption, ...]'")
                if int(key) in in_split:
                    captions.setdefault(int(key), []).extend(texts)

        # one row per pose with a caption, in split order; poses read sequence file by sequence file
        pose_ids = [i for i in split_ids if captions.get(i)]
        by_file = {}
        for pid in pose_ids:
            ref = id_map.get(str(pid))
            if not (isinstance(ref, list) and len(ref) == 3 and isinstance(ref[1], str) and isinstance(ref[2], int)):
                raise ValueError(f"{id_map_path}: pose id {pid} should map to [\"AMASS\", \"<sequence .npz>\", "
                                 f"<frame index>], got {ref!r}")
            if ref[0] != "AMASS":
                raise ValueError(f"{id_map_path}: pose id {pid} comes from {ref[0]!r}; only AMASS is supported")
            by_file.setdefault(ref[1], []).append((pid, ref[2]))
        self.row = {pid: r for r, pid in enumerate(pose_ids)}
        self.poses = torch.zeros(len(pose_ids), smpl.NUM_JOINTS, 3)  # (P, 24, 3)
        for rel_path, frames in by_file.items():
            path = os.path.join(amass_root, rel_path)
            seq = _load_npz(path, "an AMASS SMPL-H sequence", ("poses",))["poses"]
            if seq.ndim != 2 or seq.shape[1] < 66 or seq.shape[1] % 3:
                raise ValueError(f"{path}: poses has shape {seq.shape}, expected (T, 156) SMPL-H axis-angle")
            for pid, frame in frames:
                if not 0 <= frame < len(seq):
                    raise ValueError(f"{path}: pose id {pid} asks for frame {frame}, the sequence has {len(seq)}")
                pose = smplh_to_smpl_pose(seq[frame])  # (24, 3)
                pose[0] = posescript_normalize_orient(pose[0])
                self.poses[self.row[pid]] = pose
        self.items = [(pid, c) for pid in pose_ids for c in captions[pid]]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        pid, caption = self.items[i]
        return {"task": "t2p", "question": POSESCRIPT_QUESTION.format(caption=caption), "answer": POSE_ANSWER,
                "image": None, "pose": self.poses[self.row[pid]].clone(), "joints": None,
                "caption": caption, "pose_id": pid}


# ----------------------------------------------------------------------------------------------------
# 3DPW (von Marcard et al. 2018): image-to-pose evaluation (Sec. 4.1, Table 1)

THREEDPW_KEYS = ("sequence", "poses", "betas", "trans", "genders", "cam_poses", "cam_intrinsics",
                 "campose_valid", "poses2d")


class ThreeDPW(torch.utils.data.Dataset):
    """3DPW image-to-pose samples, one per valid (actor, frame).

    Files: <root>/sequenceFiles/{train,validation,test}/<sequence>.pkl, Python-2 pickles (read with
    encoding latin1, and here without running any code: load_numpy_pickle) of a dict with, per sequence of
    T image frames and A actors: sequence (str), poses [A x (T, 72)] SMPL axis-angle in the world frame,
    betas [A x (10,)], trans [A x (T, 3)], genders [A x 'm'|'f'], cam_poses (T, 4, 4) world-to-camera
    extrinsics, cam_intrinsics (3, 3), campose_valid [A x (T,)], poses2d [A x (T, 3, 18)] (x, y,
    confidence of 18 COCO keypoints), jointPositions [A x (T, 72)] world SMPL joints, plus 60 Hz copies,
    img_frame_ids, v_template_clothed, texture maps (unused). Images: <root>/imageFiles/<sequence>/
    image_%05d.jpg, frame t of the 30 Hz arrays is image t.

    As in the evaluation code (SPIN pw3d.py): only frames with campose_valid; the pose is put in the
    camera frame by rotating its global orient, R_root <- R_cam @ R_root with R_cam = cam_poses[t, :3, :3];
    the person box is the square around the confident poses2d keypoints, enlarged 1.2x. joints are
    jointPositions in the camera frame (R_cam @ J + t_cam); trans stays in the world frame (see cam_pose).
    With images=True the image is HMR2.0's crop around the box (hmr2_crop_side: 4/3 of its side) at
    image_size x image_size (needs Pillow); with images=False image is None and image_path tells where it is.
    """
    task = "i2p"

    def __init__(self, root: str, split: str = "test", images: bool = False, image_size: int = 256):
        folder = os.path.join(root, "sequenceFiles", split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"3DPW sequence folder not found: {folder} (expected "
                                    "<root>/sequenceFiles/{train,validation,test}/*.pkl)")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".pkl"))
        if not files:
            raise FileNotFoundError(f"no .pkl sequence files in {folder}")
        self.root, self.images, self.image_size = root, images, image_size
        self.sequences, self.items = [], []
        for name in files:
            path = os.path.join(folder, name)
            seq = self._read_sequence(path)
            s = len(self.sequences)
            self.sequences.append(seq)
            for actor, valid in enumerate(seq["campose_valid"]):
                self.items += [(s, actor, t) for t in np.flatnonzero(valid).tolist()]

    @staticmethod
    def _read_sequence(path: str) -> dict:
        data = load_numpy_pickle(path, "a 3DPW sequence file")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
        missing = [k for k in THREEDPW_KEYS if k not in data]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; a 3DPW sequence file has {list(THREEDPW_KEYS)}")
        cam_poses = np.asarray(data["cam_poses"], dtype=np.float64)
        T = len(cam_poses)
        _check_shape(cam_poses, (T, 4, 4), "cam_poses", path)
        _check_shape(np.asarray(data["cam_intrinsics"]), (3, 3), "cam_intrinsics", path)
        A = len(data["poses"])
        per_actor = {"poses": (T, 72), "trans": (T, 3), "campose_valid": (T,), "poses2d": (T, 3, None)}
        if "jointPositions" in data:
            per_actor["jointPositions"] = (T, 72)
        for key, shape in per_actor.items():
            if len(data[key]) != A:
                raise ValueError(f"{path}: {key} has {len(data[key])} actors, poses has {A}")
            for a in range(A):
                _check_shape(np.asarray(data[key][a]), shape, f"{key}[{a}]", path)
        if len(data["betas"]) != A or len(data["genders"]) != A:
            raise ValueError(f"{path}: betas / genders should list {A} actors")
        return {"sequence": str(data["sequence"]), "cam_poses": cam_poses,
                "cam_intrinsics": np.asarray(data["cam_intrinsics"], dtype=np.float64),
                "poses": [np.asarray(p, dtype=np.float64) for p in data["poses"]],
                "betas": [np.asarray(b, dtype=np.float64).reshape(-1)[:10] for b in data["betas"]],
                "trans": [np.asarray(t, dtype=np.float64) for t in data["trans"]],
                "genders": [str(g) for g in data["genders"]],
                "campose_valid": [np.asarray(v).astype(bool) for v in data["campose_valid"]],
                "poses2d": [np.asarray(k, dtype=np.float64) for k in data["poses2d"]],
                "joints": [np.asarray(j, dtype=np.float64) for j in data["jointPositions"]]
                if "jointPositions" in data else None}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        s, actor, t = self.items[i]
        seq = self.sequences[s]
        cam_pose = torch.as_tensor(seq["cam_poses"][t], dtype=torch.float32)  # (4, 4)
        R_cam, t_cam = cam_pose[:3, :3], cam_pose[:3, 3]  # (3, 3), (3,)
        pose = torch.as_tensor(seq["poses"][actor][t], dtype=torch.float32).view(smpl.NUM_JOINTS, 3)  # (24, 3)
        pose[0] = _rotate_global_orient(R_cam, pose[0])
        joints = None
        if seq["joints"] is not None:
            J = torch.as_tensor(seq["joints"][actor][t], dtype=torch.float32).view(smpl.NUM_JOINTS, 3)  # (24, 3)
            joints = J @ R_cam.T + t_cam  # (24, 3) camera frame
        box = box_from_keypoints(seq["poses2d"][actor][t].T)  # poses2d is (3, 18): rows x, y, confidence
        image_path = os.path.join(self.root, "imageFiles", seq["sequence"], f"image_{t:05d}.jpg")
        image = None
        if self.images:
            image = load_image(image_path)  # (3, H, W)
            if box is not None:  # HMR2.0's crop: the square box grown to the 192:256 aspect (hmr2_crop_side)
                image = crop_box(image, box[0], hmr2_crop_side(box[1], box[1]), self.image_size)  # (3, S, S)
        return {"task": "i2p", "question": IMAGE_POSE_QUESTION, "answer": POSE_ANSWER, "image": image,
                "pose": pose, "joints": joints,
                "betas": torch.as_tensor(seq["betas"][actor], dtype=torch.float32),
                "trans": torch.as_tensor(seq["trans"][actor][t], dtype=torch.float32),
                "gender": seq["genders"][actor], "cam_pose": cam_pose,
                "cam_intrinsics": torch.as_tensor(seq["cam_intrinsics"], dtype=torch.float32),
                "box": box, "image_path": image_path, "sequence": seq["sequence"], "actor": actor, "frame": t}


# ----------------------------------------------------------------------------------------------------
# Human3.6M in the preprocessed .npz of SPIN / ProHMR / HMR2.0 evaluation (Sec. 4.1, Table 1)

# The 14 joints the Human3.6M MPJPE / PA-MPJPE are computed on (SPIN constants.py J24_TO_J14), as indices
# into SPIN's 24-joint set and equally into ProHMR/HMR2.0's 19 "extra" keypoints (its first 19): the 12 limb
# joints and the neck of LSP, then SPIN's joint 18, H3.6M's head (H3.6M has no LSP head top, joint 13).
# Joint 14 of both sets is the pelvis.
H36M_J14 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18]
H36M_J14_NAMES = ["right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "right_wrist",
                  "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist", "neck", "head"]


class Human36M(torch.utils.data.Dataset):
    """Human3.6M image-to-pose samples from an evaluation .npz, in either public layout:

    SPIN (h36m_valid_protocol1.npz, h36m_valid_protocol2.npz; datasets/preprocess/h36m.py):
        imgname (N,) str, center (N, 2) px, scale (N,) with box side = 200 * scale px,
        S (N, 24, 4): SPIN's 24 joints (x, y, z in metres, root-centred; confidence), H3.6M's 17 placed at
        their SPIN indices; training files also have part (N, 24, 3), pose (N, 72), shape (N, 10).
    ProHMR / HMR2.0 (h36m_val_p2.npz; ProHMR preprocess_h36m.py, image_dataset.py):
        imgname, center, scale with box side = scale px (the loader divides by 200, the crop multiplies
        back), extra_keypoints_2d (N, 19, 3), extra_keypoints_3d (N, 19, 4): the first 19 of SPIN's set;
        optional body_pose (N, 72) + has_body_pose, betas (N, 10) + has_betas.
    scale may also be stored (N, 1) or (N, 2) (its max is the side), center (N, 1, 2).

    The samples give what the metric needs: joints14 (14, 3) metres, H36M_J14 of the file's joints (names
    in H36M_J14_NAMES; a prediction's are H3.6M-regressor joints [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13,
    8, 10], SPIN's H36M_TO_J14), pelvis (3,) (SPIN's and HMR2.0's evaluations align on this pelvis joint,
    not on the mid-hip; the files are root-centred, so it is zero), and pose / betas when the
    file has SMPL fits (the public validation files do not: pose is None then). Images are
    <image_root>/<imgname>, cropped as HMR2.0 crops the box (hmr2_crop_side: 4/3 of its side) at image_size
    with images=True (needs Pillow); box stays the person box of the file.
    """
    task = "i2p"

    def __init__(self, npz_path: str, image_root: str, images: bool = False, image_size: int = 256):
        data = _load_npz(npz_path, "a Human3.6M evaluation file", ("imgname", "center", "scale"),
                         ("S", "extra_keypoints_3d", "pose", "shape", "has_smpl", "body_pose", "has_body_pose",
                          "betas"))
        N = len(data["imgname"])
        if "S" in data:
            kp3d, box_side = data["S"], 200.0 * data["scale"].reshape(N, -1).max(-1)  # SPIN layout
            _check_shape(kp3d, (N, 24, 4), "S", npz_path)
        elif "extra_keypoints_3d" in data:
            kp3d, box_side = data["extra_keypoints_3d"], data["scale"].reshape(N, -1).max(-1)  # ProHMR / HMR2.0
            _check_shape(kp3d, (N, 19, 4), "extra_keypoints_3d", npz_path)
        else:
            raise ValueError(f"{npz_path}: no 3D joints; expected 'S' (SPIN layout) or 'extra_keypoints_3d' "
                             f"(ProHMR / HMR2.0 layout), found {sorted(data)}")
        self.center = data["center"].reshape(N, 2).astype(np.float64)  # (N, 2)
        self.box_side = box_side.astype(np.float64)  # (N,)
        self.joints14 = torch.as_tensor(kp3d[:, H36M_J14, :3], dtype=torch.float32)  # (N, 14, 3)
        self.pelvis = torch.as_tensor(kp3d[:, 14, :3], dtype=torch.float32)  # (N, 3)
        self.pose, self.betas = None, None
        if "pose" in data:  # SPIN training layout
            self.pose, self.betas, has = data["pose"], data.get("shape"), data.get("has_smpl", np.ones(N))
        elif "body_pose" in data:  # ProHMR / HMR2.0 layout
            self.pose, self.betas, has = data["body_pose"], data.get("betas"), data.get("has_body_pose", np.ones(N))
        if self.pose is not None:
            _check_shape(self.pose, (N, 72), "pose", npz_path)
            self.has_pose = np.asarray(has).reshape(N) > 0
        self.imgname = [x.decode() if isinstance(x, bytes) else str(x) for x in data["imgname"].tolist()]
        self.image_root, self.images, self.image_size = image_root, images, image_size

    def __len__(self):
        return len(self.imgname)

    def __getitem__(self, i):
        pose = betas = None
        if self.pose is not None and self.has_pose[i]:
            pose = torch.as_tensor(self.pose[i], dtype=torch.float32).view(smpl.NUM_JOINTS, 3)  # (24, 3)
            if self.betas is not None:
                betas = torch.as_tensor(self.betas[i], dtype=torch.float32)  # (10,)
        image_path = os.path.join(self.image_root, self.imgname[i])
        center, side = self.center[i].tolist(), float(self.box_side[i])
        crop_side = hmr2_crop_side(side, side)  # HMR2.0's crop: the square box grown to the 192:256 aspect
        image = crop_box(load_image(image_path), center, crop_side, self.image_size) if self.images else None
        return {"task": "i2p", "question": IMAGE_POSE_QUESTION, "answer": POSE_ANSWER, "image": image,
                "pose": pose, "joints": None, "betas": betas, "joints14": self.joints14[i].clone(),
                "pelvis": self.pelvis[i].clone(), "box": (center, side), "image_path": image_path}


# ----------------------------------------------------------------------------------------------------
# LLaVA-Instruct-150k (Liu et al. 2023): VQA that keeps the text ability (Sec. 4.1, "VQA Data")


class LLaVAInstruct(torch.utils.data.Dataset):
    """llava_instruct_150k.json: a list of {"id", "image": "<COCO train2017 file name>", "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}.

    One sample per conversation, made of its FIRST exchange: the image is about that question, and our
    template has one user turn. The later turns are kept as `turns` [(question, answer), ...] but not
    trained on (a multi-turn template would be needed). The "<image>" marker (first or last in the first
    question) is removed, build_prompt puts it back. Images are <image_root>/<image> (COCO train2017),
    decoded with images=True (needs Pillow); image_path is always given.
    """
    task = "vqa"

    def __init__(self, json_path: str, image_root: str, images: bool = False):
        data = _read_json(json_path, "LLaVA-Instruct conversations (a list of {id, image, conversations})")
        if not isinstance(data, list):
            raise ValueError(f"{json_path}: expected a JSON list of conversations")
        self.entries = []
        for n, entry in enumerate(data):
            turns = entry.get("conversations") if isinstance(entry, dict) else None
            ok = (isinstance(turns, list) and len(turns) >= 2 and len(turns) % 2 == 0
                  and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)
                  and all(t.get("from") == ("human" if k % 2 == 0 else "gpt") for k, t in enumerate(turns))
                  and isinstance(entry.get("image"), str))
            if not ok:
                raise ValueError(f"{json_path}: entry {n} is not {{id, image, conversations: [human, gpt, ...]}}")
            pairs = [(turns[k]["value"].replace(IMAGE_TOKEN, "").strip(), turns[k + 1]["value"])
                     for k in range(0, len(turns), 2)]
            self.entries.append((str(entry.get("id", n)), entry["image"], pairs))
        self.image_root, self.images = image_root, images

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        entry_id, image_name, pairs = self.entries[i]
        image_path = os.path.join(self.image_root, image_name)
        return {"task": "vqa", "question": pairs[0][0], "answer": pairs[0][1],
                "image": load_image(image_path) if self.images else None, "pose": None, "joints": None,
                "turns": pairs[1:], "id": entry_id, "image_path": image_path}


# ----------------------------------------------------------------------------------------------------
# BEDLAM-Script (PoseEmbroider, Delmas et al. 2024): NO LOADER, its file format is not established.
#
# What the public sources say (naver/poseembroider at 753dab0: README.md, src/poseembroider/config.py,
# datasets/bedlam.py, datasets/bedlam_script.py, datasets/process_bedlam/do.sh, step2.py, step5.py):
# - BEDLAM-Script is not distributed. Users download BEDLAM (images, csv, SMPL-X neutral ground-truth
#   animation files) and run a 7-step pipeline (~35 h) that writes private pickle caches under
#   BEDLAM_PROCESSED_DIR; step 1 is BEDLAM's df_full_body.py patched by a sed script, not in the repo.
# - The caches it reads: bedlam_{training,validation}_try.pkl = {image path: [per-human dict with
#   smplx_global_orient, smplx_body_pose, smplx_left/right_hand_pose (axis-angle), smplx_shape (11,),
#   smplx_tight_bbox, smplx_transl, smplx_root_cam, smplx_pose2d (127, 2), smplx_pose3d (127, 3), ...]};
#   imgpaths_bedlam_to_selected_human_index_{split}_try.pkl = {image path: [human indices], "criteria": ...};
#   farther_sample_{split}_{N}_try.pt (torch.load; [1] = the selected data ids);
#   bedlam_{split}_3caps_fs{N}_try.pkl = the 3 automatic captions per selected pose.
# - What is missing: a released file or a documented schema. The caption cache is described in step5.py's
#   docstring as {image path: [[captions of human 1], ...]} while the code that writes it builds
#   {pose index: [3 captions]} and bedlam.py reads it by pose index; the data ids depend on the farther
#   sampling run and on "criteria" chosen in step 3. A loader written against these internal caches
#   could not be checked against any real file, so none is provided. (If written later: SMPL-X's first
#   22 joints are SMPL's, as for SMPL-H, and bedlam.py rotates the global orient by +90 deg about x to
#   match AMASS's z-up frame.)
