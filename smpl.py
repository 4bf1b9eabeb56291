"""SMPL body model: rotations, the kinematic tree, forward kinematics, linear blend skinning, and the
official model files.

Every reward and metric of the paper goes through here: the pose action p (Sec. 3.1, Eq. 2) is a set
of 24 joint rotations, and the spatial reward (Eq. 7) and MPJPE compare the 3D joints that SMPL makes
of them.

Two ways to get a body model:

    body = SMPL()                                   # built-in skeleton: joints only, no files needed
    body = SMPL.from_file("SMPL_NEUTRAL.pkl")       # the official model: joints and the 6890-vertex mesh
    out = body(body_pose, global_orient, betas, transl)   # out.joints (B, 24, 3), out.vertices (B, 6890, 3)
    out = body(body_pose, return_vertices=False)    # joints only: the fast path RFT uses for its N candidate poses

The official SMPL files are licensed and not shipped: register (free) at https://smpl.is.tue.mpg.de and
download "SMPL for Python" (basicmodel_{neutral,f,m}_lbs_10_207_0_v1.x.x.pkl, often renamed
SMPL_NEUTRAL.pkl etc.); the neutral model of SMPLify (basicModel_neutral_lbs_10_207_0_v1.0.0.pkl) works
too. Both the original `.pkl` and the `.npz` layout smplx reads (keys v_template, shapedirs, posedirs,
J_regressor, weights, kintree_table, f) are accepted. The `.pkl` is a Python 2 pickle whose arrays are
partly chumpy objects and whose J_regressor is a scipy.sparse matrix; it is read here WITHOUT chumpy or
scipy, by an unpickler that only builds numpy arrays and inert stand-ins for those classes and refuses
every other class, so a model file cannot run code. Extra joint regressors (J_regressor_h36m.npy of
SPIN, SMPL_to_J19.pkl of HMR2.0) come with those projects' data.

Conventions:
- Units are metres.
- A pose is 24 rotations: index 0 is the global orientation of the pelvis, 1..23 the body joints in
  SMPL order (JOINT_NAMES). Rotations are local (relative to the parent joint).
- rot6d is the continuous 6-D representation of Zhou et al. 2019: the first two *columns* of the
  rotation matrix, column 0 then column 1 (x[..., :3] = R[..., :, 0], x[..., 3:] = R[..., :, 1]).
  (HMR2.0 reshapes to (3, 2) instead, i.e. interleaved; convert with `x.view(-1,3,2)` if you ever
  load its head.)
- All functions are batched over any leading shape, differentiable, and work in float32 and float64.
"""
from __future__ import annotations

import collections
import functools
import os
import pickle
import types
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Rotations


def _skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix [v]_x such that [v]_x @ u = v x u. (..., 3) -> (..., 3, 3)"""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).unflatten(-1, (3, 3))  # (..., 3, 3)


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, R = I + A(t) K + B(t) K^2 with K = [aa]_x and t = |aa|.

    A = sin(t)/t and B = (1-cos(t))/t^2 are replaced by their Taylor series near t = 0, so the result
    and its gradient are exact and finite at and around the zero rotation. (..., 3) -> (..., 3, 3)
    """
    if aa.shape[-1] != 3:
        raise ValueError(f"axis_angle_to_matrix expects (..., 3), got {tuple(aa.shape)}")
    t2 = (aa * aa).sum(-1)  # (...,) squared angle
    small = t2 < 1e-6
    t2_safe = torch.where(small, torch.ones_like(t2), t2)  # keeps the unused branch's gradient finite
    t = t2_safe.sqrt()
    A = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)  # (...,)
    B = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(t)) / t2_safe)  # (...,)
    K = _skew(aa)  # (..., 3, 3)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(K.shape)
    return eye + A[..., None, None] * K + B[..., None, None] * (K @ K)  # (..., 3, 3)


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix to unit quaternion (w, x, y, z) with w >= 0. (..., 3, 3) -> (..., 4)

    Shepperd's method: of the four algebraically equal formulas, use the one whose pivot
    (4w^2, 4x^2, 4y^2 or 4z^2) is largest, so we never divide by a number near zero (this is what
    keeps angles near pi accurate).
    """
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"expected rotation matrices (..., 3, 3), got {tuple(R.shape)}")
    m = R.flatten(-2)  # (..., 9)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    pivots = torch.stack([1 + m00 + m11 + m22,   # 4 w^2
                          1 + m00 - m11 - m22,   # 4 x^2
                          1 - m00 + m11 - m22,   # 4 y^2
                          1 - m00 - m11 + m22],  # 4 z^2
                         dim=-1)  # (..., 4)
    # row k is (4 q_k) * (w, x, y, z)
    cands = torch.stack([
        torch.stack([pivots[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, pivots[..., 1], m10 + m01, m02 + m20], -1),
        torch.stack([m02 - m20, m10 + m01, pivots[..., 2], m21 + m12], -1),
        torch.stack([m10 - m01, m02 + m20, m21 + m12, pivots[..., 3]], -1),
    ], dim=-2)  # (..., 4, 4)
    best = pivots.argmax(-1)  # (...,)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)  # (..., 4)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)  # (..., 4), w >= 0


def quaternion_to_axis_angle(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternion (w, x, y, z) to axis-angle with angle in [0, pi]. (..., 4) -> (..., 3)

    angle = 2 atan2(|v|, w), axis-angle = v * angle / |v|; near |v| = 0 the factor angle/|v| is
    replaced by its series 2/w (1 - |v|^2 / (3 w^2)).
    """
    q = torch.where(q[..., :1] < 0, -q, q)
    w, v = q[..., 0], q[..., 1:]  # (...,), (..., 3)
    n2 = (v * v).sum(-1)  # (...,)
    small = n2 < 1e-10
    n = torch.where(small, torch.ones_like(n2), n2).sqrt()
    w_safe = torch.where(small, torch.ones_like(w), w)
    factor = torch.where(small, 2 / w_safe * (1 - n2 / (3 * w_safe * w_safe)), 2 * torch.atan2(n, w) / n)
    return v * factor[..., None]  # (..., 3)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 3), angle in [0, pi]. Goes through the quaternion for stability near pi."""
    return quaternion_to_axis_angle(matrix_to_quaternion(R))


def rot6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the two 3-vectors of the 6-D representation (Zhou et al. 2019). (..., 6) -> (..., 3, 3)

    b1 = a1/|a1|, b2 = (a2 - (b1.a2) b1)/|.|, b3 = b1 x b2; R = [b1 b2 b3] as columns. Any 6 numbers
    (except the degenerate a1 || a2) map to a proper rotation, which is why the pose head predicts them.
    """
    if x.shape[-1] != 6:
        raise ValueError(f"rot6d_to_matrix expects (..., 6), got {tuple(x.shape)}")
    a1, a2 = x[..., :3], x[..., 3:]  # (..., 3) each
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)  # (..., 3, 3), columns b1 b2 b3


def matrix_to_rot6d(R: torch.Tensor) -> torch.Tensor:
    """The first two columns, column 0 then column 1. (..., 3, 3) -> (..., 6)"""
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_rot6d expects (..., 3, 3), got {tuple(R.shape)}")
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)  # (..., 6)


# ----------------------------------------------------------------------------------------------------
# The SMPL kinematic tree

NUM_JOINTS = 24  # global orient + 23 body joints
NUM_BODY_JOINTS = 23

JOINT_NAMES = [
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck",
    "left_collar", "right_collar", "head", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
]
JOINT_INDEX = {name: i for i, name in enumerate(JOINT_NAMES)}

# PARENTS[k] is the parent of joint k; -1 for the root. Parents always come before children, so one
# pass in index order visits every parent before its children.
PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]

# The bones (parent, child), handy for drawing.
BONES = [(p, k) for k, p in enumerate(PARENTS) if p >= 0]

# Rest joints of the neutral body at mean shape (betas = 0), zero pose, in metres, SMPL's own frame
# (y up, z forward, the body's left on +x). Rounded to 0.1 mm. Joints 0-21 are the published neutral
# skeleton; the hands (22, 23), which SMPL places about 8 cm past the wrists, are the wrists moved
# 0.3 of the forearm further along it. These are close to, not equal to, J_regressor @ v_template of
# the licensed model file: use SMPL.from_file for exact numbers.
_REST_0_21 = [
    [-0.0018, -0.2233, 0.0282], [0.0677, -0.3147, 0.0214], [-0.0695, -0.3139, 0.0239],
    [-0.0043, -0.1144, 0.0015], [0.1020, -0.6899, 0.0169], [-0.1078, -0.6964, 0.0150],
    [0.0012, 0.0208, 0.0026], [0.0884, -1.0879, -0.0268], [-0.0920, -1.0948, -0.0273],
    [0.0026, 0.0737, 0.0280], [0.1148, -1.1437, 0.0925], [-0.1174, -1.1430, 0.0961],
    [-0.0002, 0.2876, -0.0148], [0.0815, 0.1955, -0.0061], [-0.0791, 0.1926, -0.0106],
    [0.0050, 0.3526, 0.0365], [0.1724, 0.2260, -0.0149], [-0.1752, 0.2251, -0.0197],
    [0.4320, 0.2132, -0.0424], [-0.4289, 0.2118, -0.0411], [0.6813, 0.2222, -0.0435],
    [-0.6842, 0.2196, -0.0467],
]


def _builtin_rest_joints() -> torch.Tensor:
    J = torch.tensor(_REST_0_21, dtype=torch.float64)  # (22, 3)
    hands = J[20:22] + 0.3 * (J[20:22] - J[18:20])  # (2, 3) wrists + 0.3 forearm
    return torch.cat([J, hands], 0)  # (24, 3)


@functools.lru_cache(maxsize=None)
def _tree_levels(parents: tuple) -> tuple:
    """Group the joints by depth in the tree, so forward kinematics does one batched matmul per level
    (9 levels for SMPL) instead of one per joint (23): fewer, larger ops.

    Returns (order, level_sizes, parent_slots, inverse): `order` lists the joints level by level;
    parent_slots[d] gives, for each joint of level d, the position of its parent inside level d-1;
    `inverse` puts level order back into joint order.
    """
    if not parents or parents[0] != -1 or any(not 0 <= p < k for k, p in enumerate(parents) if k > 0):
        raise ValueError(f"parents must start with -1 and list each joint's parent before it; got {list(parents)}")
    depth = [0]
    for p in parents[1:]:
        depth.append(depth[p] + 1)
    levels = [[k for k in range(len(parents)) if depth[k] == d] for d in range(max(depth) + 1)]
    order = [k for level in levels for k in level]
    parent_slots = [None] + [[levels[d - 1].index(parents[k]) for k in levels[d]] for d in range(1, len(levels))]
    inverse = [order.index(k) for k in range(len(parents))]
    return order, [len(level) for level in levels], parent_slots, inverse


def forward_kinematics(rot_mats: torch.Tensor, rest_joints: torch.Tensor, parents=PARENTS):
    """Posed joints and global transforms from local joint rotations and rest joints.

    rot_mats:    (..., J, 3, 3) local rotations, joint 0 = global orient.
    rest_joints: (..., J, 3) or (J, 3) joint locations in the rest (zero) pose.
    Returns joints (..., J, 3) and transforms (..., J, 4, 4), where transforms[..., k] maps the
    rest-pose frame of joint k into the world: x_world = R_k (x_rest - J_rest_k) + J_posed_k, i.e.
    transforms[..., k, :3, :3] = R_k (the global rotation) and transforms[..., k, :3, 3] = J_posed_k.

    Each joint k has a local rigid transform L_k = [rot_k | J_rest_k - J_rest_parent(k)] (the root's
    translation is J_rest_0), and the global one chains down the tree: G_k = G_parent(k) @ L_k
    (the SMPL paper's Eq. 4; smplx's batch_rigid_transform). So R_k = R_parent @ rot_k and every bone
    keeps its rest length: J_posed_k = J_posed_parent + R_parent (J_rest_k - J_rest_parent).
    """
    J = len(parents)
    if rot_mats.shape[-3:] != (J, 3, 3):
        raise ValueError(f"forward_kinematics: rot_mats must be (..., {J}, 3, 3), got {tuple(rot_mats.shape)}")
    if rest_joints.shape[-2:] != (J, 3):
        raise ValueError(f"forward_kinematics: rest_joints must be (..., {J}, 3), got {tuple(rest_joints.shape)}")
    order, level_sizes, parent_slots, inverse = _tree_levels(tuple(parents))
    batch = torch.broadcast_shapes(rot_mats.shape[:-3], rest_joints.shape[:-2])
    rest = rest_joints.to(rot_mats.dtype).expand(*batch, J, 3)  # (..., J, 3)
    rot = rot_mats.expand(*batch, J, 3, 3)  # (..., J, 3, 3)
    parent_rest = torch.cat([torch.zeros_like(rest[..., :1, :]),
                             rest[..., list(parents[1:]), :]], dim=-2)  # (..., J, 3)
    bone = rest - parent_rest  # (..., J, 3) rest-pose bone vectors; the root's is J_rest_0 itself
    L = torch.cat([rot, bone[..., None]], dim=-1)  # (..., J, 3, 4) local transforms [rot_k | bone_k]
    last_row = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=L.dtype, device=L.device).expand(*batch, J, 1, 4)
    L = torch.cat([L, last_row], dim=-2)[..., order, :, :]  # (..., J, 4, 4) homogeneous, level order
    G_levels = [L[..., :1, :, :]]  # list of (..., n_d, 4, 4); level 0 is the root alone: G_0 = L_0
    start = 1
    for d in range(1, len(level_sizes)):
        L_d = L[..., start:start + level_sizes[d], :, :]  # (..., n_d, 4, 4)
        G_levels.append(G_levels[-1][..., parent_slots[d], :, :] @ L_d)  # (..., n_d, 4, 4) G_parent @ L_k
        start += level_sizes[d]
    G = torch.cat(G_levels, dim=-3)[..., inverse, :, :]  # (..., J, 4, 4) back in joint order
    return G[..., :3, 3], G  # (..., J, 3), (..., J, 4, 4)


# ----------------------------------------------------------------------------------------------------
# Linear blend skinning (SMPL paper Sec. 2; the step numbers follow smplx's lbs)


def pose_feature(rot_mats: torch.Tensor) -> torch.Tensor:
    """The pose blend shape input of the SMPL paper (Eq. 9): R_k - I for the 23 body joints k = 1..23,
    flattened row-major, so that the rest pose gives zero. (B, 24, 3, 3) -> (B, 207)"""
    eye = torch.eye(3, dtype=rot_mats.dtype, device=rot_mats.device)
    return (rot_mats[:, 1:] - eye).flatten(1)  # (B, 207)


def skinning_transforms(transforms: torch.Tensor, rest_joints: torch.Tensor) -> torch.Tensor:
    """The transforms that skinning applies to rest-pose vertices: G_k with the rest location of joint
    k removed first, i.e. x -> R_k (x - J_rest_k) + J_posed_k (the G'_k of the SMPL paper, Eq. 3).
    (B, J, 4, 4), (B, J, 3) -> (B, J, 3, 4)"""
    R, t = transforms[..., :3, :3], transforms[..., :3, 3]  # (B, J, 3, 3), (B, J, 3)
    t_rel = t - (R @ rest_joints[..., None])[..., 0]  # (B, J, 3)
    return torch.cat([R, t_rel[..., None]], dim=-1)  # (B, J, 3, 4)


def linear_blend_skinning(v_posed: torch.Tensor, A: torch.Tensor, lbs_weights: torch.Tensor) -> torch.Tensor:
    """Each vertex moves by the weighted sum of its joints' transforms (SMPL paper Eq. 2):
    T_v = sum_k w_vk A_k, v' = T_v [v; 1].

    v_posed (B, V, 3), A (B, J, 3, 4), lbs_weights (V, J) -> (B, V, 3). T is formed with one matmul
    against the (V, J) weights, never as a (B, V, J) copy of them.
    """
    B, J = A.shape[:2]
    T = torch.matmul(lbs_weights, A.reshape(B, J, 12)).view(B, -1, 3, 4)  # (B, V, 3, 4)
    return torch.einsum("bvij,bvj->bvi", T[..., :3], v_posed) + T[..., 3]  # (B, V, 3)


def lbs(rot_mats, betas, v_template, shapedirs, posedirs, J_template, J_shapedirs, lbs_weights):
    """SMPL: vertices, joints and global joint transforms from pose and shape (SMPL paper Eq. 1-10).

    rot_mats (B, 24, 3, 3); betas (B, S) or None; v_template (V, 3); shapedirs (S, 3V) and
    posedirs (207, 3V), each blend shape flattened (v, xyz) so one matmul applies all of them;
    J_template (24, 3) and J_shapedirs (S, 72), the joint regressor already applied to the template and
    to the shape blend shapes; lbs_weights (V, 24).
    Returns vertices (B, V, 3), joints (B, 24, 3), transforms (B, 24, 4, 4).
    """
    B, V = rot_mats.shape[0], v_template.shape[0]
    # 1. Shape blend shapes (SMPL paper, Eq. 8): v_shaped = T_bar + B_S(beta) = v_template + shapedirs . betas
    v_shaped = v_template.reshape(1, 3 * V).expand(B, -1)  # (B, 3V)
    if betas is not None:
        v_shaped = torch.addmm(v_shaped, betas, shapedirs)  # (B, 3V)
    # 2. Rest joints: J(beta) = J_regressor v_shaped. The regressor is linear, so it was applied to
    #    v_template and shapedirs once at load time; here it costs a (B, S) x (S, 72) matmul.
    J_rest = rest_joints_from_betas(betas, J_template, J_shapedirs, B)  # (B, 24, 3)
    # 3. Pose blend shapes (SMPL paper, Eq. 9): v_posed = v_shaped + B_P(theta) = v_shaped + posedirs . (R_k - I)
    v_posed = torch.addmm(v_shaped, pose_feature(rot_mats), posedirs).view(B, V, 3)  # (B, V, 3)
    # 4. Global joint transforms down the kinematic tree
    joints, transforms = forward_kinematics(rot_mats, J_rest)  # (B, 24, 3), (B, 24, 4, 4)
    # 5. Skinning
    A = skinning_transforms(transforms, J_rest)  # (B, 24, 3, 4)
    vertices = linear_blend_skinning(v_posed, A, lbs_weights)  # (B, V, 3)
    return vertices, joints, transforms


def rest_joints_from_betas(betas, J_template, J_shapedirs, batch: int) -> torch.Tensor:
    """J(beta) = J_regressor (v_template + shapedirs . betas) = J_template + J_shapedirs . betas, the rest
    joints of body shape beta (SMPL paper Eq. 10), without touching the vertices. -> (B, 24, 3)"""
    if betas is None:
        return J_template.expand(batch, -1, -1)  # (B, 24, 3)
    return torch.addmm(J_template.reshape(1, -1), betas, J_shapedirs).view(batch, -1, 3)  # (B, 24, 3)


# ----------------------------------------------------------------------------------------------------
# The body model


class SMPLOutput:
    """What SMPL.forward returns: joints (B, 24, 3); vertices (B, V, 3), or None for the built-in
    skeleton and for return_vertices=False; transforms (B, 24, 4, 4), the global joint transforms
    before transl; extra, the extra joint sets by name, each (B, K, 3), regressed from the vertices."""

    def __init__(self, joints, vertices=None, transforms=None, extra=None):
        self.joints = joints
        self.vertices = vertices
        self.transforms = transforms
        self.extra = extra or {}


def _as_rotmats(x: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Accept axis-angle (B, n, 3) / (B, 3n) or rotation matrices (B, n, 3, 3); return (B, n, 3, 3)."""
    if x.dim() == 2 and x.shape[1] == 3 * n:
        x = x.reshape(x.shape[0], n, 3)
    if n == 1 and x.dim() == 3 and x.shape[1:] == (3, 3):  # global_orient as (B, 3, 3)
        return x[:, None]
    if x.dim() == 3 and x.shape[1:] == (n, 3):
        return axis_angle_to_matrix(x)
    if x.dim() == 4 and x.shape[1:] == (n, 3, 3):
        return x
    shapes = f"(B, {n}, 3), (B, {3 * n}) or (B, {n}, 3, 3)" if n > 1 else "(B, 3), (B, 1, 3) or (B, 3, 3)"
    raise ValueError(f"{name} must be {shapes}; got {tuple(x.shape)}")


_CPU_LBS_CHUNK = 64  # bodies per skinning chunk on CPU (see SMPL.forward)


class SMPL(torch.nn.Module):
    """SMPL (Loper et al. 2015).

    `SMPL()` is the built-in skeleton (rest joints of the neutral body, no mesh, no shape space),
    enough for joints, rewards and metrics without the licensed files. `SMPL.from_file(path)` is the
    official model: shape and pose blend shapes, skinning, the 6890-vertex mesh.

    Attributes: has_mesh, num_betas (0 for the skeleton), faces ((F, 3) long tensor, or None),
    extra_regressor_names. Buffers follow `.to(device / dtype)`; for a float64 model call
    `.to(torch.float64)`. They are not saved in state_dict: the licensed data stay out of checkpoints.
    """

    def __init__(self, rest_joints: torch.Tensor | None = None, *, model: dict | None = None,
                 num_betas: int = 10, extra_regressors: dict | None = None):
        """rest_joints: (24, 3) for a skeleton other than the built-in one. model: the arrays of an
        official model file (see load_model_file); extra_regressors: {name: (K, V) array or file}."""
        super().__init__()
        self.has_mesh = model is not None
        self.extra_regressor_names = []
        if model is None:
            if extra_regressors:
                raise ValueError("extra joint regressors map mesh vertices to joints, and the built-in "
                                 "skeleton has no mesh: load the official model with "
                                 "SMPL.from_file(path, extra_regressors=...)")
            J = _builtin_rest_joints() if rest_joints is None else torch.as_tensor(rest_joints, dtype=torch.float64)
            if J.shape != (NUM_JOINTS, 3):
                raise ValueError(f"rest_joints must be ({NUM_JOINTS}, 3); got {tuple(J.shape)}")
            self.num_betas = 0
            self.register_buffer("J_template", J.float(), persistent=False)  # (24, 3)
            self.register_buffer("faces", None, persistent=False)
            return
        if rest_joints is not None:
            raise ValueError("pass either rest_joints (a skeleton) or model (an official model), not both")
        S = model["shapedirs"].shape[-1]
        if not 0 < num_betas <= S:
            raise ValueError(f"num_betas must be in 1..{S} (the model has {S} shape components); got {num_betas}")
        self.num_betas = num_betas
        V = model["v_template"].shape[0]
        v_template = np.asarray(model["v_template"], np.float64)  # (V, 3)
        shapedirs = np.asarray(model["shapedirs"], np.float64)[:, :, :num_betas]  # (V, 3, S)
        posedirs = np.asarray(model["posedirs"], np.float64)  # (V, 3, 207)
        J_regressor = np.asarray(model["J_regressor"], np.float64)  # (24, V)
        # The joint regressor is linear, so J(beta) = J_regressor v_template + (J_regressor shapedirs) beta:
        # precompute both terms (in float64) and the joints-only path never touches the vertices.
        J_template = J_regressor @ v_template  # (24, 3)
        J_shapedirs = np.einsum("jv,vcs->sjc", J_regressor, shapedirs).reshape(num_betas, 3 * NUM_JOINTS)  # (S, 72)

        def buffer(name, array, dtype=torch.float32):
            self.register_buffer(name, torch.as_tensor(np.ascontiguousarray(array)).to(dtype), persistent=False)

        buffer("J_template", J_template)  # (24, 3)
        buffer("J_shapedirs", J_shapedirs)  # (S, 72)
        buffer("v_template", v_template)  # (V, 3)
        buffer("shapedirs", shapedirs.reshape(3 * V, num_betas).T)  # (S, 3V), rows are blend shapes
        buffer("posedirs", posedirs.reshape(3 * V, -1).T)  # (207, 3V)
        buffer("lbs_weights", model["weights"])  # (V, 24)
        buffer("faces", model["f"], torch.long)  # (F, 3)
        for name, source in (extra_regressors or {}).items():
            if not (isinstance(name, str) and name.isidentifier()):
                raise ValueError(f"extra regressor names must be identifiers (they name buffers); got {name!r}")
            buffer(f"J_regressor_{name}", load_regressor(source, V))  # (K, V)
            self.extra_regressor_names.append(name)

    @classmethod
    def from_file(cls, path, num_betas: int = 10, extra_regressors: dict | None = None) -> "SMPL":
        """The official model from a .pkl (read without chumpy) or .npz file; uses the first num_betas
        shape components (files have 10 or 300). extra_regressors: {name: path or (K, V) array}, e.g.
        {"h36m": "J_regressor_h36m.npy"} gives out.extra["h36m"] (B, 17, 3)."""
        return cls(model=load_model_file(path), num_betas=num_betas, extra_regressors=extra_regressors)

    def _check_betas(self, betas: torch.Tensor | None, batch: int) -> None:
        if betas is None:
            return
        if not self.has_mesh:
            raise ValueError("the built-in skeleton has no shape space: pass betas=None, or load "
                             "the official model with SMPL.from_file(path)")
        if betas.shape != (batch, self.num_betas):
            raise ValueError(f"betas must be ({batch}, {self.num_betas}) (B, num_betas); got {tuple(betas.shape)}")

    def rest_joints(self, betas: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Rest joints J(beta) (B, 24, 3); betas (B, num_betas) or None for the mean shape."""
        self._check_betas(betas, batch)
        if betas is None:
            return self.J_template.expand(batch, -1, -1)  # (B, 24, 3)
        return rest_joints_from_betas(betas, self.J_template.to(betas.dtype), self.J_shapedirs.to(betas.dtype), batch)

    def forward(self, body_pose, global_orient=None, betas=None, transl=None,
                return_vertices: bool = True) -> SMPLOutput:
        """body_pose: (B, 23, 3) / (B, 69) axis-angle or (B, 23, 3, 3); global_orient: (B, 3) or
        (B, 3, 3), identity if None; betas: (B, num_betas), mean shape if None; transl: (B, 3) added
        to every joint and vertex. return_vertices=False skips the mesh (and the extra joint sets,
        which need it): only forward kinematics on J(beta), what the rewards need.
        Computes in the dtype of body_pose; the mesh path needs the model in that dtype too."""
        body = _as_rotmats(body_pose, NUM_BODY_JOINTS, "body_pose")  # (B, 23, 3, 3)
        B, dtype = body.shape[0], body.dtype
        if global_orient is None:
            root = torch.eye(3, dtype=dtype, device=body.device).expand(B, 1, 3, 3)
        else:
            root = _as_rotmats(global_orient, 1, "global_orient").to(dtype)  # (B, 1, 3, 3)
        if root.shape[0] != B:
            raise ValueError(f"global_orient has batch {root.shape[0]}, body_pose has {B}")
        if transl is not None and transl.shape != (B, 3):
            raise ValueError(f"transl must be ({B}, 3); got {tuple(transl.shape)}")
        R = torch.cat([root, body], dim=1)  # (B, 24, 3, 3)
        if betas is not None:
            betas = betas.to(dtype)
        vertices, extra = None, {}
        if self.has_mesh and return_vertices:
            if self.v_template.dtype != dtype:
                raise ValueError(f"the model holds {self.v_template.dtype} buffers and the pose is {dtype}: "
                                 f"call .to({dtype}) on the model, or pass {self.v_template.dtype} inputs")
            self._check_betas(betas, B)
            # On CPU, skin in chunks of bodies: a (B, V, 12) temporary at B = 512 is 170 MB, and
            # allocations that large are mapped fresh (and page-faulted) on every call, while chunk-sized
            # ones (< 32 MB, glibc's mmap threshold) are reused. About 1.4x faster; same numbers.
            chunk = _CPU_LBS_CHUNK if R.device.type == "cpu" else B
            parts = [lbs(R[i:i + chunk], None if betas is None else betas[i:i + chunk], self.v_template,
                         self.shapedirs, self.posedirs, self.J_template, self.J_shapedirs, self.lbs_weights)
                     for i in range(0, B, chunk)]
            vertices, joints, transforms = (torch.cat(tensors) for tensors in zip(*parts))
        else:
            joints, transforms = forward_kinematics(
                R, self.rest_joints(betas, B).to(dtype))  # (B, 24, 3), (B, 24, 4, 4)
        if transl is not None:
            joints = joints + transl[:, None].to(dtype)  # (B, 24, 3)
            if vertices is not None:
                vertices = vertices + transl[:, None].to(dtype)  # (B, V, 3)
        if vertices is not None:
            for name in self.extra_regressor_names:
                extra[name] = torch.matmul(getattr(self, f"J_regressor_{name}"), vertices)  # (B, K, 3)
        return SMPLOutput(joints=joints, vertices=vertices, transforms=transforms, extra=extra)


def pose_joints(pose: torch.Tensor, body: SMPL | None = None) -> torch.Tensor:
    """The 24 joints of a batch of poses, joints only (no mesh, no translation: the pelvis stays at its
    rest location whatever the global orientation). -> (B, 24, 3) metres.

    pose, told apart by its shape:
      (B, 24, 3)     axis-angle, as the data sets store a pose;
      (B, 144)       the pose head's rot6d numbers (model.py: joint-major, each joint's column 0 then
                     column 1), made rotations by Gram-Schmidt (rot6d_to_matrix);
      (B, 24, 3, 3)  rotation matrices.
    body: an SMPL (the official model, or a skeleton); None = the built-in skeleton, on the CPU, which
    PoseWorld is made with."""
    if pose.dim() == 2 and pose.shape[1] == NUM_JOINTS * 6:
        R = rot6d_to_matrix(pose.reshape(pose.shape[0], NUM_JOINTS, 6))  # (B, 24, 3, 3)
    elif pose.dim() == 3 and pose.shape[1:] == (NUM_JOINTS, 3):
        R = pose  # (B, 24, 3) axis-angle: SMPL.forward turns it into matrices
    elif pose.dim() == 4 and pose.shape[1:] == (NUM_JOINTS, 3, 3):
        R = pose  # (B, 24, 3, 3)
    else:
        raise ValueError(f"pose_joints expects axis-angle poses (B, 24, 3), rot6d poses (B, 144) or rotation "
                         f"matrices (B, 24, 3, 3); got {tuple(pose.shape)}")
    body = _builtin_skeleton() if body is None else body
    return body(R[:, 1:], global_orient=R[:, 0], return_vertices=False).joints  # (B, 24, 3)


@functools.lru_cache(maxsize=1)
def _builtin_skeleton() -> SMPL:
    return SMPL()


def build_body_model(smpl_path: str, device) -> SMPL:
    """The official SMPL file when given, else the built-in skeleton (PoseWorld is made with it)."""
    body = SMPL.from_file(smpl_path) if smpl_path else SMPL()
    return body.to(device)


# ----------------------------------------------------------------------------------------------------
# Extra joint sets for evaluation

# SPIN (Kolotouros et al. 2019, eval.py / constants.py), also used by later work on 3DPW: the 17
# Human3.6M joints come from the posed mesh through J_regressor_h36m.npy; the 14 LSP joints are these
# rows of it, and both prediction and ground truth are centred on H36M joint 0 (the pelvis) first.
# LSP order: right ankle, right knee, right hip, left hip, left knee, left ankle, right wrist,
# right elbow, right shoulder, left shoulder, left elbow, left wrist, neck, head (top).
H36M_TO_LSP14 = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]
H36M_PELVIS = 0

# HMR2.0 (4D-Humans) regresses 19 joints with SMPL_to_J19.pkl (the first 19 of SPIN's 24 "ground
# truth" joints: the 12 limb joints in LSP order, neck (LSP), top of head (LSP), pelvis (MPII),
# thorax (MPII), spine, jaw and head (H36M)) and appends them to 25 OpenPose joints. Its 3DPW evaluation
# centres on keypoint 39 = row 14, the MPII pelvis (Evaluator(pelvis_ind=39)), and keeps keypoints
# 25-37 and 43: rows 0-12 and 18, the H36M head standing in for the LSP head top as in SPIN's J24_TO_J14.
J19_TO_LSP14 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18]
J19_PELVIS = 14


def lsp14_from_h36m(joints_h36m: torch.Tensor) -> torch.Tensor:
    """The 14 evaluation joints of SPIN's 3DPW / Human3.6M protocol, pelvis-centred, from the 17
    joints of J_regressor_h36m. (..., 17, 3) -> (..., 14, 3)"""
    if joints_h36m.shape[-2:] != (17, 3):
        raise ValueError(f"lsp14_from_h36m expects (..., 17, 3) H36M joints, got {tuple(joints_h36m.shape)}")
    return joints_h36m[..., H36M_TO_LSP14, :] - joints_h36m[..., H36M_PELVIS:H36M_PELVIS + 1, :]  # (..., 14, 3)


def lsp14_from_j19(joints_j19: torch.Tensor) -> torch.Tensor:
    """The 14 evaluation joints as HMR2.0 picks them from its 19 extra joints (SMPL_to_J19.pkl),
    pelvis-centred. (..., 19, 3) -> (..., 14, 3)"""
    if joints_j19.shape[-2:] != (19, 3):
        raise ValueError(f"lsp14_from_j19 expects (..., 19, 3) joints of SMPL_to_J19, got {tuple(joints_j19.shape)}")
    return joints_j19[..., J19_TO_LSP14, :] - joints_j19[..., J19_PELVIS:J19_PELVIS + 1, :]  # (..., 14, 3)


# ====================================================================================================
# File formats: not in the paper
#
# The official SMPL files are Python 2 pickles of chumpy objects and scipy.sparse matrices; HMR2.0's
# checkpoint (model.py) and 3DPW's sequences (data.py) are pickles too. All of them are read here,
# by one restricted unpickler that builds only arrays, plain containers and inert stand-ins.
# ----------------------------------------------------------------------------------------------------
# Reading the official model files without chumpy, scipy, or trusting the pickle

_HOW_TO_RUN_WITHOUT = (
    "To run without the licensed files use SMPL() (the built-in skeleton: joints only, no mesh). "
    "The official SMPL model files come from https://smpl.is.tue.mpg.de (free registration required).")

# Arrays a model file must hold. V is the number of vertices (6890 for SMPL), S of shape components.
_MODEL_KEYS = {
    "v_template": "(V, 3) template mesh",
    "shapedirs": "(V, 3, S) shape blend shapes",
    "posedirs": "(V, 3, 207) pose blend shapes",
    "J_regressor": "(24, V) joint regressor",
    "weights": "(V, 24) skinning weights",
    "kintree_table": "(2, 24) kinematic tree (parents, joint ids)",
    "f": "(F, 3) triangle faces",
}


class ModelFileError(ValueError):
    """A model or regressor file that is missing a key, has the wrong shapes, or is not the expected format."""


def _file_error(path, problem: str, hint: str = _HOW_TO_RUN_WITHOUT) -> ModelFileError:
    return ModelFileError(f"{path}: {problem}. {hint}")


_NO_REGRESSOR_HINT = "Leave extra_regressors out to run without it."


class _ChumpyStandIn:
    """Takes the place of a pickled chumpy object (chumpy.ch.Ch, chumpy.reordering.Select, ...): keeps
    its class path and pickled state, runs nothing. A Ch pickles as its __dict__ minus caches, whose
    'x' holds the array; a Select as {'a': <Ch>, 'idxs': ..., 'preferred_shape': ...}."""
    chumpy_class = "chumpy"

    def __setstate__(self, state):
        self.state = state


class _SparseStandIn:
    """Takes the place of a pickled scipy.sparse csc/csr matrix. scipy pickles it as its __dict__:
    data, indices, indptr and the shape ('_shape'; plain 'shape' in old scipy)."""
    layout = None  # "csc" or "csr", set by the subclasses below

    def __setstate__(self, state):
        self.state = state


class _CscStandIn(_SparseStandIn):
    layout = "csc"


class _CsrStandIn(_SparseStandIn):
    layout = "csr"


@functools.lru_cache(maxsize=None)
def _chumpy_stand_in(module: str, name: str) -> type:
    return type(f"chumpy_{name}", (_ChumpyStandIn,), {"chumpy_class": f"{module}.{name}"})


def _reconstructor(cls, base, state):
    """copy_reg._reconstructor, as protocol 0/1 pickles of plain classes call it, limited to our stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, (_ChumpyStandIn, _SparseStandIn)) and base is object
            and state is None):
        raise UnsafePickleError(f"refusing copy_reg._reconstructor({cls!r}, {base!r}, {state!r})")
    return object.__new__(cls)


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as Python 3 protocol-2 pickles use it for bytes; only the latin-1 round trip."""
    if not isinstance(text, str) or not isinstance(encoding, str) or \
            encoding.lower().replace("-", "") != "latin1":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# ----------------------------------------------------------------------------------------------------
# One restricted unpickler for every pickle the project reads (SMPL and regressor files here, 3DPW's
# sequence files in data.py, HMR2.0's Lightning checkpoint in model.py), so a fix lands once. Three
# defences, each because a plain or merely name-restricted unpickler was beaten by it:
# 1. Globals: only what _PICKLE_ALLOW_LIST names, and of that only the groups the caller allows.
# 2. Object arrays: numpy's ndarray.__setstate__ copies raw bytes into the array. If the dtype holds
#    Python objects, those bytes become pointers, and reading them crashes the interpreter (SIGSEGV). A
#    forged dtype state clears the flag behind dtype.hasobject, so the dtype's type codes are checked
#    (kind "O", in every field and subarray) when the dtype is built and again before an array's bytes
#    are read.
# 3. Size and depth: the memo lets a 20 kB pickle refer to one list millions of times, which np.asarray
#    then expands to hundreds of MB, and an object may contain itself. After loading, the object tree is
#    walked as a tree (shared objects counted at each use) and refused past MAX_PICKLE_DEPTH levels or
#    past a size proportional to the file's (_size_limit).

MAX_PICKLE_DEPTH = 100  # real files nest under 20 levels (HMR2.0's OmegaConf config is the deepest)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global we do not build, holds an object array, or is too deep or too large."""


class PickleFileError(ValueError):
    """A pickle file that was refused or could not be read; the message names the file."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _dtype_holds_objects(dt: np.dtype) -> bool:
    """Whether a dtype is, or contains in a field or subarray, Python objects. Reads the type codes
    (kind "O"), never dtype.hasobject, which is a flag the pickled dtype state sets."""
    if dt.kind == "O":
        return True
    if dt.subdtype is not None and _dtype_holds_objects(dt.subdtype[0]):
        return True
    return any(_dtype_holds_objects(field[0]) for field in (dt.fields or {}).values())


def _refuse_object_dtype(dt):
    if not isinstance(dt, np.dtype):
        raise UnsafePickleError(f"refusing an array whose dtype is a {type(dt).__name__}, not a numpy dtype")
    if _dtype_holds_objects(dt) or dt.hasobject:
        raise UnsafePickleError(f"refusing an array of dtype {dt!r}: it holds Python objects, which a pickle "
                                f"may forge from raw bytes (numeric arrays only)")
    return dt


def _checked_dtype(spec, align=False, copy=False):
    """numpy.dtype(spec, align, copy) as a pickle calls it, refusing object types before the dtype's
    pickled state (which may forge its flags) is applied."""
    if not isinstance(spec, (str, bytes)):
        raise UnsafePickleError(f"refusing numpy.dtype({type(spec).__name__}): only type strings")
    return _refuse_object_dtype(np.dtype(spec, bool(align), bool(copy)))


class _PickledArray(np.ndarray):
    """What a pickled array is built as, so that its state is checked before numpy reads any bytes:
    (version, shape, dtype, is_fortran, raw data), or the same without the version. The tree walk of
    _checked_tree turns each into a plain ndarray view."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("refusing an array state that is not numpy's")
        _refuse_object_dtype(state[-3])
        super().__setstate__(state)


class _NdarrayToken:
    """Stands for numpy.ndarray in a pickle: _reconstruct takes it as its first argument. Not callable,
    so the pickle cannot call ndarray(shape) itself to allocate an array of any size."""


def _checked_reconstruct(subtype, shape, dtype_spec):
    """numpy's _reconstruct(ndarray, (0,), b'b'), the first step of unpickling an array: an empty array
    that the next BUILD fills (with our checks, _PickledArray.__setstate__)."""
    if subtype is not _NdarrayToken or shape != (0,):
        raise UnsafePickleError(f"refusing numpy _reconstruct({subtype!r}, {shape!r}): only plain ndarrays")
    _refuse_object_dtype(np.dtype(dtype_spec) if isinstance(dtype_spec, (str, bytes)) else dtype_spec)
    return _np_multiarray._reconstruct(_PickledArray, shape, dtype_spec)


def _checked_scalar(dtype, data=None):
    """A numpy scalar (numpy.core.multiarray.scalar) of a numeric dtype."""
    _refuse_object_dtype(dtype)
    return _np_multiarray.scalar(dtype, data) if data is not None else _np_multiarray.scalar(dtype)


def _checked_frombuffer(buf, dtype, shape, order):
    """A protocol-5 array (numpy.core.numeric._frombuffer) of a numeric dtype."""
    _refuse_object_dtype(dtype)
    return _np_numeric._frombuffer(buf, dtype, shape, order)


class _InertConfig(dict):
    """Stands in for a pickled configuration object (OmegaConf's DictConfig, ListConfig and nodes, yacs'
    CfgNode, typing.Any, as in HMR2.0's Lightning checkpoint): keeps the items, arguments and state the
    pickle gives it as plain data and runs none of the original class's code."""
    pickled_class = "?"

    def __init__(self, *args):  # a REDUCE opcode calls the class
        super().__init__()
        self.args = args

    def __setstate__(self, state):  # a BUILD opcode
        self.state = state


@functools.lru_cache(maxsize=None)
def _inert_config_class(module, name):
    return type(name, (_InertConfig,), {"pickled_class": f"{module}.{name}"})


try:  # numpy >= 2 (also importable from numpy 1.26)
    from numpy._core import multiarray as _np_multiarray, numeric as _np_numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray, numeric as _np_numeric

# The one allow-list: (module, name) -> (group, what it becomes). Each caller names the groups its files
# need: SMPL files numpy + chumpy + scipy.sparse + builtins, 3DPW numpy, HMR2.0 builtins + torch + config.
# Python 2 module names (__builtin__, copy_reg) are mapped to Python 3's before the lookup.
_PICKLE_ALLOW_LIST = {}
for _core in ("numpy.core", "numpy._core"):  # files from numpy 1 name numpy.core, numpy 2 numpy._core
    _PICKLE_ALLOW_LIST[(f"{_core}.multiarray", "_reconstruct")] = ("numpy", _checked_reconstruct)  # ndarray
    _PICKLE_ALLOW_LIST[(f"{_core}.multiarray", "scalar")] = ("numpy", _checked_scalar)  # numpy scalars
    _PICKLE_ALLOW_LIST[(f"{_core}.numeric", "_frombuffer")] = ("numpy", _checked_frombuffer)  # protocol 5
_PICKLE_ALLOW_LIST.update({
    ("numpy", "ndarray"): ("numpy", _NdarrayToken),
    ("numpy", "dtype"): ("numpy", _checked_dtype),
    ("_codecs", "encode"): ("numpy", _latin1_encode),  # how Python 3 protocol-2 pickles write bytes
    ("copyreg", "_reconstructor"): ("chumpy", _reconstructor),  # how Python 2 pickled the chumpy objects
    ("builtins", "object"): ("chumpy", object),
    ("torch._utils", "_rebuild_tensor_v2"): ("torch", torch._utils._rebuild_tensor_v2),  # every torch.save tensor
    ("torch._utils", "_rebuild_parameter"): ("torch", torch._utils._rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): ("torch", torch._utils._rebuild_parameter_with_state),
    ("torch", "Size"): ("torch", torch.Size),
    ("torch", "device"): ("torch", torch.device),
    ("collections", "OrderedDict"): ("torch", collections.OrderedDict),  # state_dict() and tensor hooks
    ("collections", "defaultdict"): ("config", collections.defaultdict),  # OmegaConf's resolver cache
})
for _t in (dict, list, tuple, set, frozenset, int, float, complex, str, bool):
    _PICKLE_ALLOW_LIST[("builtins", _t.__name__)] = ("builtins", _t)
_PICKLE_ALLOW_LIST[("builtins", "long")] = ("builtins", int)  # Python 2's name
for _module in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse"):
    _PICKLE_ALLOW_LIST[(_module, "csc_matrix")] = ("scipy.sparse", _CscStandIn)
for _module in ("scipy.sparse.csr", "scipy.sparse._csr", "scipy.sparse"):
    _PICKLE_ALLOW_LIST[(_module, "csr_matrix")] = ("scipy.sparse", _CsrStandIn)
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _allowed_global(module: str, name: str):
    """(group, object) for a global a project pickle may name, or None. chumpy classes become inert
    stand-ins (_ChumpyStandIn), config classes (OmegaConf, yacs, typing) _InertConfig stand-ins, torch
    dtypes themselves."""
    module = _PY2_MODULES.get(module, module)
    package = module.split(".")[0]
    if package == "chumpy":
        return "chumpy", _chumpy_stand_in(module, name)
    if package in ("omegaconf", "yacs", "typing"):
        return "config", _inert_config_class(module, name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return "torch", getattr(torch, name)
    return _PICKLE_ALLOW_LIST.get((module, name))


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only the globals of _PICKLE_ALLOW_LIST in the groups `allow` names (a subclass may set
    `allow` instead, as torch.load subclasses the unpickler it is given): any other class or function
    (os.system, builtins.eval, a model class, ...) is refused before it can be called. Arrays come out
    as _PickledArray until _checked_tree walks the result; use load_pickle, or call _checked_tree."""
    allow: tuple = ("numpy",)

    def __init__(self, file, *args, allow: tuple | None = None, **kwargs):
        super().__init__(file, *args, **kwargs)
        if allow is not None:
            self.allow = tuple(allow)

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        found = _allowed_global(module, name)
        if found is None or found[0] not in self.allow:
            raise UnsafePickleError(f"refusing to load {module}.{name}: this file may only hold "
                                    f"{', '.join(self.allow)} data")
        return found[1]


def restricted_pickle_module(allow: tuple):
    """RestrictedUnpickler, limited to the groups in `allow`, in the shape torch.load takes as its
    pickle_module: torch subclasses the module's `Unpickler` (so the groups are a class attribute, not an
    argument) and calls its `load` for files in the old format. What torch.load returns still needs
    _checked_tree for depth and size."""
    Unpickler = type("RestrictedUnpickler", (RestrictedUnpickler,), {"allow": tuple(allow)})
    return types.SimpleNamespace(__name__="restricted_pickle", Unpickler=Unpickler,
                                 load=lambda file, **kwargs: Unpickler(file, **kwargs).load())


def _size_limit(file_size: int) -> int:
    """The most units (one per object, plus one per 8 bytes of array data) a file of file_size bytes may
    unpickle to. Every object costs at least one byte of pickle and every array byte one byte, so a tree
    without sharing stays under file_size; twice that plus a margin leaves room for the few shared
    arrays of real files (chumpy expressions)."""
    return 2 * file_size + 100_000


def _checked_tree(root, path, file_size: int, max_depth: int = MAX_PICKLE_DEPTH):
    """Walk what a RestrictedUnpickler built, as a tree: refuse it when deeper than max_depth (an object
    that contains itself is infinitely deep) or larger than _size_limit(file_size) (the memo blow-up),
    and turn every _PickledArray into a plain ndarray. Stops at the first limit, so it costs at most
    the limit's worth of steps. Returns the checked object."""
    limit, units = _size_limit(file_size), 0

    def visit(x, depth):
        nonlocal units
        if depth > max_depth:
            raise PickleFileError(path, f"the pickle nests deeper than {max_depth} levels (or an object "
                                        f"contains itself); refused")
        units += 1 + (x.nbytes // 8 if isinstance(x, np.ndarray) else 0)
        if units > limit:
            raise PickleFileError(path, f"the pickle unpacks to more than {limit:,} objects and array words "
                                        f"from {file_size:,} bytes (shared references repeated); refused")
        if isinstance(x, _PickledArray):
            return x.view(np.ndarray)
        if isinstance(x, dict):  # dict, OrderedDict, defaultdict, _InertConfig
            for key in list(x):
                visit(key, depth + 1)
                x[key] = visit(x[key], depth + 1)
        elif isinstance(x, list):
            x[:] = [visit(v, depth + 1) for v in x]
        elif isinstance(x, tuple):
            items = [visit(v, depth + 1) for v in x]
            x = x if all(a is b for a, b in zip(items, x)) else type(x)(items)
        elif isinstance(x, (set, frozenset)):
            for v in x:
                visit(v, depth + 1)
        if isinstance(x, (_ChumpyStandIn, _SparseStandIn, _InertConfig)):
            for attr in ("args", "state"):
                if attr in vars(x):
                    setattr(x, attr, visit(getattr(x, attr), depth + 1))
        return x

    return visit(root, 0)


def load_pickle(path, allow: tuple, max_depth: int = MAX_PICKLE_DEPTH):
    """Read a pickle file with RestrictedUnpickler (only the globals of the groups in `allow`), then
    check its depth, size and arrays (_checked_tree). latin1 is how Python 3 must decode the byte strings
    of a Python 2 pickle for numpy to rebuild its arrays from them. Any problem is a PickleFileError
    naming the file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            obj = RestrictedUnpickler(f, allow=allow, encoding="latin1").load()
        except UnsafePickleError as e:
            raise PickleFileError(path, f"unsafe or unexpected content in the pickle ({e})") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                MemoryError, RecursionError) as e:
            raise PickleFileError(path, f"not a readable pickle ({type(e).__name__}: {e})") from None
    return _checked_tree(obj, path, os.path.getsize(path), max_depth)


def _load_pickle(path, hint: str = _HOW_TO_RUN_WITHOUT):
    """An SMPL model or regressor pickle: numpy arrays, chumpy objects, scipy.sparse matrices."""
    try:
        return load_pickle(path, allow=("numpy", "chumpy", "scipy.sparse", "builtins"))
    except PickleFileError as e:
        raise _file_error(path, e.problem, hint) from None


def _to_numpy(value, key: str, path) -> np.ndarray:
    """A pickled value as a plain numpy array: evaluates the chumpy nodes the SMPL/MANO files use
    (Ch, Select) and densifies sparse matrices."""
    if isinstance(value, _ChumpyStandIn):
        state = value.state if isinstance(getattr(value, "state", None), dict) else {}
        kind = value.chumpy_class.rsplit(".", 1)[-1]
        if kind == "Ch" and "x" in state:
            return _to_numpy(state["x"], key, path)
        if kind == "Select" and "a" in state and "idxs" in state:
            array = _to_numpy(state["a"], key, path).ravel()[np.asarray(state["idxs"])]
            return array.reshape(state["preferred_shape"]) if "preferred_shape" in state else array
        raise _file_error(path, f"'{key}' is a {value.chumpy_class} object, of which only Ch and Select "
                                f"are understood")
    if isinstance(value, _SparseStandIn):
        return _densify(value, key, path)
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    raise _file_error(path, f"'{key}' should be a numeric array, found {type(value).__name__}")


def _densify(value: _SparseStandIn, key: str, path) -> np.ndarray:
    """Compressed sparse column (csc) / row (csr) -> dense: entries indptr[j]:indptr[j+1] of data and
    indices belong to column j (csc) or row j (csr). Repeated entries add up, as in scipy."""
    state = getattr(value, "state", None) or {}
    shape = state.get("_shape", state.get("shape"))
    try:
        data, indices, indptr = (np.asarray(state[k]) for k in ("data", "indices", "indptr"))
        n_rows, n_cols = (int(n) for n in shape)
        major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))  # column (csc) or row (csr) of each entry
        dense = np.zeros((n_rows, n_cols), dtype=np.float64)
        rows, cols = (indices, major) if value.layout == "csc" else (major, indices)
        np.add.at(dense, (rows, cols), data)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise _file_error(path, f"'{key}' is a malformed {value.layout} sparse matrix ({e})") from None
    return dense


def load_model_file(path) -> dict:
    """The arrays of an official SMPL model file (.pkl or .npz) as float64 / int64 numpy arrays, keyed as
    in the file: v_template, shapedirs, posedirs, J_regressor (dense), weights, kintree_table, f.
    Checks that the keys are there and the shapes agree (see _MODEL_KEYS)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: SMPL model file not found (expected an official .pkl or .npz "
                                f"model file). {_HOW_TO_RUN_WITHOUT}")
    if zipfile.is_zipfile(path):  # .npz files are zip archives
        try:
            with np.load(path, allow_pickle=False) as npz:
                raw = {key: npz[key] for key in npz.files if key in _MODEL_KEYS}
        except (ValueError, OSError, zipfile.BadZipFile) as e:  # e.g. an object array, which needs pickle
            raise _file_error(path, f"not a plain .npz of numeric arrays ({e})") from None
    else:
        raw = _load_pickle(path)
        if not isinstance(raw, dict):
            raise _file_error(path, f"the pickle holds a {type(raw).__name__}, expected the dict of an SMPL model")
    missing = [key for key in _MODEL_KEYS if key not in raw]
    if missing:
        expected = "; ".join(f"{k} {v}" for k, v in _MODEL_KEYS.items())
        raise _file_error(path, f"missing {missing} (found {sorted(map(str, raw))}); "
                                f"an SMPL model file holds {expected}")
    arrays = {key: _to_numpy(raw[key], key, path) for key in _MODEL_KEYS}
    _check_model_arrays(arrays, path)
    return {key: arrays[key].astype(np.int64 if key in ("kintree_table", "f") else np.float64) for key in _MODEL_KEYS}


def _check_model_arrays(a: dict, path) -> None:
    V = a["v_template"].shape[0]
    expected = {"v_template": (V, 3), "posedirs": (V, 3, 9 * NUM_BODY_JOINTS), "J_regressor": (NUM_JOINTS, V),
                "weights": (V, NUM_JOINTS), "kintree_table": (2, NUM_JOINTS)}
    for key, shape in expected.items():
        if a[key].shape != shape:
            raise _file_error(path, f"'{key}' has shape {a[key].shape}, expected {shape} ({_MODEL_KEYS[key]})")
    if a["shapedirs"].ndim != 3 or a["shapedirs"].shape[:2] != (V, 3):
        raise _file_error(path, f"'shapedirs' has shape {a['shapedirs'].shape}, expected ({V}, 3, S)")
    if a["f"].ndim != 2 or a["f"].shape[1] != 3:
        raise _file_error(path, f"'f' has shape {a['f'].shape}, expected (F, 3) triangles")
    # kintree_table[0] holds each joint's parent id (the root's is -1 or 2^32 - 1), [1] the joint ids.
    ids = a["kintree_table"][1].astype(np.int64)
    parents = a["kintree_table"][0, 1:].astype(np.int64)
    if not np.array_equal(ids, np.arange(NUM_JOINTS)) or not np.array_equal(parents, PARENTS[1:]):
        raise _file_error(path, f"kintree_table {a['kintree_table'].tolist()} is not the SMPL kinematic tree "
                                f"(parents {PARENTS}); SMPL-H / SMPL-X files are not supported")


def load_regressor(source, num_vertices: int) -> np.ndarray:
    """A joint regressor (K, V) from an array or a .npy / .pkl / .npz file (J_regressor_h36m.npy,
    J_regressor_extra.npy, SMPL_to_J19.pkl, ...). Pickles go through the same restricted unpickler."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        name, array = "regressor", np.asarray(source.detach().cpu() if torch.is_tensor(source) else source)
    else:
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: joint regressor file not found (expected a ({{K}}, {num_vertices}) "
                                    f"array in .npy or .pkl, e.g. J_regressor_h36m.npy from SPIN's data). "
                                    f"{_NO_REGRESSOR_HINT}")
        if name.endswith(".npy") or zipfile.is_zipfile(name):
            try:
                array = np.load(name, allow_pickle=False)
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise _file_error(name, f"not a plain .npy / .npz array ({e})", _NO_REGRESSOR_HINT) from None
            if isinstance(array, np.lib.npyio.NpzFile):
                with array as npz:
                    if len(npz.files) != 1:
                        raise _file_error(name, f"a regressor .npz must hold one array, found {npz.files}",
                                          _NO_REGRESSOR_HINT)
                    array = npz[npz.files[0]]
        else:
            array = _to_numpy(_load_pickle(name, _NO_REGRESSOR_HINT), "regressor", name)
    if array.ndim != 2 or array.shape[1] != num_vertices or array.dtype == object:
        raise _file_error(name, f"a joint regressor must be a (K, {num_vertices}) array, found {array.shape}",
                          _NO_REGRESSOR_HINT)
    return array.astype(np.float64)
