"""smpl.py: rotations (against scipy), forward kinematics (hand-computed), the body model (against
smplx on a random model file in the official layout), the restricted .pkl loader, and error messages."""
import math
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
import smplx
import torch
from scipy.spatial.transform import Rotation

import data
import smpl

try:  # the function numpy arrays pickle through; Python 2 era files name it numpy.core.multiarray
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

TOL = {torch.float32: 5e-6, torch.float64: 1e-12}


# ----------------------------------------------------------------------------------------------------
# Rotations


def _edge_rotvecs() -> np.ndarray:
    """Angles where formulas break (0, tiny, pi) about axes where Shepperd's pivot changes
    (x, y, z dominant, and ties between them)."""
    axes = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1],
                     [1, -1, 1], [1, -2, 0.5], [0.3, 0.2, -0.9], [1, 1e-4, 0]], dtype=np.float64)
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.array([0.0, 1e-8, 1e-4, 0.5, np.pi / 2, np.pi - 1e-3, np.pi - 1e-7, np.pi])
    return (axes[:, None, :] * angles[None, :, None]).reshape(-1, 3)


def _random_rotvecs(n, seed) -> np.ndarray:
    return Rotation.random(n, random_state=seed).as_rotvec()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_axis_angle_to_matrix_matches_scipy(dtype):
    """Catches a wrong Rodrigues formula or sign convention, and a small-angle branch that is off."""
    aa = np.concatenate([_random_rotvecs(4000, 0), _edge_rotvecs(), np.random.default_rng(0).normal(size=(500, 3)) * 4])
    R = smpl.axis_angle_to_matrix(torch.tensor(aa, dtype=dtype))
    assert R.dtype == dtype
    ref = torch.from_numpy(Rotation.from_rotvec(aa).as_matrix())
    torch.testing.assert_close(R.double(), ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_to_axis_angle_matches_scipy(dtype):
    """Catches a wrong quaternion pivot (errors near pi), a lost sign, and inaccuracy near zero."""
    aa_in = np.concatenate([_random_rotvecs(4000, 1), _edge_rotvecs()])
    R = Rotation.from_rotvec(aa_in).as_matrix()
    aa = smpl.matrix_to_axis_angle(torch.tensor(R, dtype=dtype)).double()
    ref = torch.from_numpy(Rotation.from_matrix(R).as_rotvec())
    angle = ref.norm(dim=-1)
    # At (and, in float32, numerically at) pi the axis sign is arbitrary: +pi n and -pi n are the same rotation.
    ambiguous = angle > (math.pi - 1e-8 if dtype == torch.float64 else math.pi - 1e-3)
    err = (aa - ref).norm(dim=-1)
    err_flipped = (aa + ref).norm(dim=-1)
    err = torch.where(ambiguous, torch.minimum(err, err_flipped), err)
    assert err.max() < TOL[dtype], err.max()
    assert (aa.norm(dim=-1) <= math.pi + 1e-6).all()
    # and exactly: near zero the result keeps full relative precision (no 1 - cos cancellation)
    tiny = torch.from_numpy(np.isclose(np.linalg.norm(aa_in, axis=1), 1e-8, rtol=1e-6, atol=0))
    assert tiny.sum() == 12
    torch.testing.assert_close(aa[tiny], ref[tiny], atol=1e-15 if dtype == torch.float64 else 1e-12, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_to_quaternion_matches_scipy(dtype):
    """Catches a quaternion with the wrong component order or not in the w >= 0 half (scipy's canonical
    form; at w = 0 exactly, i.e. angle pi, either sign is right)."""
    aa = np.concatenate([_random_rotvecs(4000, 3), _edge_rotvecs()])
    R = Rotation.from_rotvec(aa).as_matrix()
    q = smpl.matrix_to_quaternion(torch.tensor(R, dtype=dtype)).double()
    ref = torch.from_numpy(Rotation.from_matrix(R).as_quat(canonical=True)[:, [3, 0, 1, 2]])  # (w, x, y, z)
    at_pi = ref[:, 0] < 1e-6
    assert (q[:, 0] >= 0).all()
    torch.testing.assert_close(q[~at_pi], ref[~at_pi], atol=TOL[dtype], rtol=0)
    err_pi = torch.minimum((q - ref).norm(dim=-1), (q + ref).norm(dim=-1))[at_pi]
    assert err_pi.max() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_round_trips_and_rot6d(dtype):
    """Catches rot6d taking rows instead of columns, a Gram-Schmidt that differs from Zhou et al.
    (checked against QR, an independent orthonormalisation), and round trips that lose rotations."""
    R = torch.tensor(Rotation.random(2000, random_state=2).as_matrix(), dtype=dtype)
    x = smpl.matrix_to_rot6d(R)
    torch.testing.assert_close(x[..., :3], R[..., :, 0])
    torch.testing.assert_close(x[..., 3:], R[..., :, 1])
    torch.testing.assert_close(smpl.rot6d_to_matrix(x), R, atol=TOL[dtype] * 10, rtol=0)
    torch.testing.assert_close(smpl.axis_angle_to_matrix(smpl.matrix_to_axis_angle(R)), R, atol=TOL[dtype] * 10, rtol=0)
    # any 6 numbers: Gram-Schmidt of the two columns = QR of the 3x2 matrix with a positive diagonal
    y = torch.randn(2000, 6, dtype=dtype)
    Q, Rq = torch.linalg.qr(torch.stack([y[:, :3], y[:, 3:]], dim=-1))  # (N, 3, 2)
    Q = Q * torch.sign(torch.diagonal(Rq, dim1=-2, dim2=-1))[:, None, :]
    M = smpl.rot6d_to_matrix(y)
    torch.testing.assert_close(M[..., :2], Q, atol=TOL[dtype] * 50, rtol=0)
    torch.testing.assert_close(torch.linalg.det(M), torch.ones(2000, dtype=dtype), atol=TOL[dtype] * 10, rtol=0)


def test_rotations_any_leading_shape():
    """Catches code that assumes a (B, 3) or (B, J, 3) input."""
    aa = torch.randn(2, 3, 5, 3, dtype=torch.float64)
    R = smpl.axis_angle_to_matrix(aa)
    assert R.shape == (2, 3, 5, 3, 3)
    torch.testing.assert_close(R.reshape(-1, 3, 3), smpl.axis_angle_to_matrix(aa.reshape(-1, 3)))
    torch.testing.assert_close(smpl.matrix_to_axis_angle(R).reshape(-1, 3),
                               smpl.matrix_to_axis_angle(R.reshape(-1, 3, 3)))
    assert smpl.matrix_to_rot6d(R).shape == (2, 3, 5, 6)
    torch.testing.assert_close(smpl.rot6d_to_matrix(smpl.matrix_to_rot6d(R)), R)
    assert smpl.matrix_to_quaternion(R).shape == (2, 3, 5, 4)


def test_rotation_gradients_finite_at_zero_and_near_pi():
    """Catches NaN gradients from sqrt/atan2 at the zero rotation or at pi (they would poison a whole
    training step), and wrong gradients of either small-angle series (gradcheck)."""
    for aa in ([0.0, 0.0, 0.0], [1e-8, -2e-8, 0.0], [0.0, 0.0, math.pi - 1e-3], [1.0, 2.0, -0.5]):
        x = torch.tensor(aa, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(smpl.axis_angle_to_matrix, (x,))
    for aa in ([0.0, 0.0, 0.0], [1e-7, 0.0, 0.0], [0.0, math.pi - 1e-3, 0.0], [0.7, -0.2, 0.4]):
        R = smpl.axis_angle_to_matrix(torch.tensor(aa, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(smpl.matrix_to_axis_angle, (R,))
    for dtype in (torch.float32, torch.float64):
        for aa in ([0.0, 0.0, 0.0], [0.0, 0.0, math.pi], [math.pi, 0, 0]):
            x = torch.tensor(aa, dtype=dtype, requires_grad=True)
            smpl.matrix_to_axis_angle(smpl.axis_angle_to_matrix(x)).sum().backward()
            assert torch.isfinite(x.grad).all()
            y = torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=dtype, requires_grad=True)
            smpl.rot6d_to_matrix(y).sum().backward()
            assert torch.isfinite(y.grad).all()


# ----------------------------------------------------------------------------------------------------
# Forward kinematics


def _rz(deg):
    return torch.from_numpy(Rotation.from_euler("z", deg, degrees=True).as_matrix())


def test_forward_kinematics_hand_computed():
    """A 5-joint tree whose answer is worked out by hand: the chain 0-1-2-3 and joint 4 off the root,
    so the level-by-level order (0, 1, 4, 2, 3) is not its own inverse. Catches a mixed-up joint order,
    rotations composed on the wrong side (child @ parent), and bones that do not keep their length."""
    parents = [-1, 0, 1, 2, 0]
    rest = torch.tensor([[1.0, 0, 0], [2, 0, 0], [3, 0, 0], [4, 0, 0], [1, 1, 0]], dtype=torch.float64)
    rot = torch.stack([_rz(90), _rz(90), _rz(-90), _rz(0), _rz(0)])[None]  # (1, 5, 3, 3)
    joints, G = smpl.forward_kinematics(rot, rest, parents)
    # The root stays at (1,0,0) and turns 90 deg, so bone 0->1 (1,0,0) points along +y; joint 1 adds
    # 90 deg (180 in all): bone 1->2 points along -x; joint 2 takes 90 back: bone 2->3 along +y;
    # bone 0->4 (0,1,0) turns with the root to -x.
    expected = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 2, 0], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(joints[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(G[0, :, :3, 3], expected)
    for k, deg in enumerate([90, 180, 90, 90, 90]):
        torch.testing.assert_close(G[0, k, :3, :3], _rz(deg), atol=1e-12, rtol=0)
    torch.testing.assert_close(G[0, :, 3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(5, 4))
    # zero pose: joints stay at rest, for any leading shape
    joints, _ = smpl.forward_kinematics(torch.eye(3, dtype=torch.float64).expand(2, 3, 5, 3, 3), rest, parents)
    torch.testing.assert_close(joints, rest.expand(2, 3, 5, 3))


# ----------------------------------------------------------------------------------------------------
# Model files in the official layouts


NUM_SHAPE = 12  # more than the 10 betas used: the loader must take the first num_betas


def _as_float32_values(a):
    """smplx reads every array through float32 (smplx.utils.to_np), so the random model uses values
    float32 represents exactly: both sides then see the same numbers, also in float64."""
    return a.astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def model_arrays():
    """A random SMPL model in the official layout: 6890 vertices, a sparse J_regressor with rows
    summing to 1, skinning weights with rows summing to 1, the SMPL tree."""
    rng = np.random.default_rng(0)
    V = 6890
    J_regressor = rng.random((24, V)) * (rng.random((24, V)) < 0.01)
    J_regressor /= J_regressor.sum(1, keepdims=True)
    weights = rng.random((V, 24)) ** 4  # a few dominant joints per vertex, like the real weights
    weights /= weights.sum(1, keepdims=True)
    return {
        "v_template": _as_float32_values(rng.normal(size=(V, 3)) * 0.3),
        "shapedirs": _as_float32_values(rng.normal(size=(V, 3, NUM_SHAPE)) * 0.02),
        "posedirs": _as_float32_values(rng.normal(size=(V, 3, 207)) * 0.02),
        "J_regressor": _as_float32_values(J_regressor),
        "weights": _as_float32_values(weights),
        "kintree_table": np.stack([np.array([4294967295] + smpl.PARENTS[1:]), np.arange(24)]).astype(np.uint32),
        "f": rng.integers(0, V, size=(13776, 3)).astype(np.uint32),
    }


class FakeCh:
    """Pickles as chumpy.ch.Ch does: chumpy's __getstate__ is the instance __dict__ minus its caches."""

    def __init__(self, x):
        self.__dict__.update(x=x, _dirty_vars={"x"}, _itr=None, _depends_on_deps={}, _make_dense=False,
                             _make_sparse=False)


class FakeSelect:
    """Pickles as chumpy.reordering.Select: a.r.ravel()[idxs].reshape(preferred_shape)."""

    def __init__(self, a, idxs, preferred_shape):
        self.__dict__.update(a=a, idxs=idxs, preferred_shape=preferred_shape, _dirty_vars=set(), _itr=None,
                             _depends_on_deps={}, _make_dense=False, _make_sparse=False)


class Py2Pickler(pickle._Pickler):
    """Writes a pickle the way Python 2 did for the SMPL files: byte strings (and str) as BINSTRING,
    numpy under numpy.core.multiarray, the scipy matrix under scipy.sparse.csc, and our stand-ins under
    chumpy's class paths. (Naming the classes here does what registering stand-in modules in
    sys.modules would, without touching interpreter state.)"""
    dispatch = dict(pickle._Pickler.dispatch)
    py2_names = {_np_reconstruct: b"numpy.core.multiarray\n_reconstruct\n",
                 scipy.sparse.csc_matrix: b"scipy.sparse.csc\ncsc_matrix\n",
                 FakeCh: b"chumpy.ch\nCh\n", FakeSelect: b"chumpy.reordering\nSelect\n"}

    def _save_py2_string(self, raw: bytes):
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)

    def save_bytes(self, obj):
        self._save_py2_string(obj)
        self.memoize(obj)

    def save_str(self, obj):
        self._save_py2_string(obj.encode("latin1"))
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str

    def save_global(self, obj, name=None):
        if obj in self.py2_names:
            self.write(pickle.GLOBAL + self.py2_names[obj])
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _original_layout(a: dict) -> dict:
    """The dict of basicModel_*_lbs_10_207_0_v1.x.pkl: chumpy arrays, a csc J_regressor, extra keys."""
    V = a["v_template"].shape[0]
    perm = np.random.default_rng(1).permutation(3 * V)  # Select must apply idxs, not just reshape
    scrambled = np.empty(3 * V)
    scrambled[perm] = a["v_template"].ravel()
    return {
        "J_regressor_prior": scipy.sparse.csc_matrix(a["J_regressor"]),
        "f": a["f"],
        "J_regressor": scipy.sparse.csc_matrix(a["J_regressor"]),
        "kintree_table": a["kintree_table"],
        "J": a["J_regressor"] @ a["v_template"],
        "weights_prior": a["weights"],
        "weights": FakeCh(a["weights"]),
        "vert_sym_idxs": np.arange(V),
        "posedirs": FakeCh(a["posedirs"]),
        "pose_training_info": {"num_poses": 1786, "name": "lrotmin"},
        "bs_style": "lbs",
        "v_template": FakeSelect(FakeCh(scrambled), perm, (V, 3)),
        "shapedirs": FakeCh(a["shapedirs"]),
        "bs_type": "lrotmin",
    }


@pytest.fixture(scope="module")
def model_files(model_arrays, tmp_path_factory):
    root = tmp_path_factory.mktemp("smpl_model")
    files = {"npz": root / "SMPL_NEUTRAL.npz", "clean_pkl": root / "SMPL_NEUTRAL.pkl"}
    np.savez(files["npz"], **model_arrays)
    with open(files["clean_pkl"], "wb") as f:  # what smplx's clean_ch.py leaves: plain arrays, protocol 5
        pickle.dump({**model_arrays, "J_regressor": scipy.sparse.csc_matrix(model_arrays["J_regressor"])}, f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    for protocol in (1, 2):
        files[f"py2_pkl_{protocol}"] = root / f"basicmodel_neutral_lbs_10_207_0_v1.0.0_p{protocol}.pkl"
        with open(files[f"py2_pkl_{protocol}"], "wb") as f:
            Py2Pickler(f, protocol=protocol).dump(_original_layout(model_arrays))
    regressors = np.random.default_rng(2).random((17 + 19, 6890))
    regressors /= regressors.sum(1, keepdims=True)
    files["h36m"], files["j19"] = root / "J_regressor_h36m.npy", root / "SMPL_to_J19.pkl"
    np.save(files["h36m"], regressors[:17])
    with open(files["j19"], "wb") as f:
        pickle.dump(regressors[17:], f)
    return files


def _random_inputs(B, num_betas=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {"body_pose": torch.randn(B, 69, generator=g, dtype=dtype) * 0.8,
            "global_orient": torch.randn(B, 3, generator=g, dtype=dtype),
            "betas": torch.randn(B, num_betas, generator=g, dtype=dtype) * 2,
            "transl": torch.randn(B, 3, generator=g, dtype=dtype)}


@pytest.fixture(scope="module")
def ours(model_files):
    return smpl.SMPL.from_file(model_files["npz"], extra_regressors={"h36m": model_files["h36m"],
                                                                    "j19": model_files["j19"]}).to(torch.float64)


@pytest.fixture(scope="module")
def reference(model_files):
    """smplx's SMPL reading the cleaned .pkl itself (its SMPL class reads pickles, not .npz)."""
    return smplx.SMPL(model_path=str(model_files["clean_pkl"]), num_betas=10, dtype=torch.float64)


def test_from_file_matches_smplx(ours, reference, monkeypatch):
    """Catches any error in the blend shapes, pose feature order, joint regression, skinning or transl,
    by comparing joints and vertices with smplx in float64 on random poses and shapes. Chunks of 4
    make the CPU chunking split 6 bodies unevenly (4 + 2)."""
    monkeypatch.setattr(smpl, "_CPU_LBS_CHUNK", 4)
    x = _random_inputs(6)
    out = ours(**x)
    ref = reference(**x)
    assert ours.has_mesh and ours.num_betas == 10 and out.vertices.dtype == torch.float64
    torch.testing.assert_close(out.joints, ref.joints[:, :24], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.vertices, ref.vertices, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.faces, reference.faces_tensor)


def test_pose_blend_shapes_matter(model_arrays, ours):
    """Guards the parity test above: at its poses, dropping the pose blend shapes moves the vertices by
    far more than its tolerance, so a model that ignored posedirs could not pass it."""
    x = _random_inputs(6)
    no_posedirs = smpl.SMPL(model={**model_arrays, "posedirs": np.zeros_like(model_arrays["posedirs"])}).double()
    assert (no_posedirs(**x).vertices - ours(**x).vertices).abs().max() > 1e-2


def test_joints_only_path_matches_and_never_touches_vertices(ours):
    """Catches a joints-only path that drifts from the full model (wrong precomputed J_regressor terms),
    or that secretly still goes through the 6890 vertices (it must work with the vertex data gone)."""
    x = _random_inputs(5, seed=1)
    full = ours(**x)
    blind = smpl.SMPL.__new__(smpl.SMPL)
    torch.nn.Module.__init__(blind)
    blind.has_mesh, blind.num_betas, blind.extra_regressor_names = True, 10, []
    blind.register_buffer("J_template", ours.J_template)
    blind.register_buffer("J_shapedirs", ours.J_shapedirs)
    for name in ("v_template", "shapedirs", "posedirs", "lbs_weights"):
        blind.register_buffer(name, torch.full_like(getattr(ours, name), float("nan")))
    fast = blind(**x, return_vertices=False)
    assert fast.vertices is None and fast.extra == {}
    torch.testing.assert_close(fast.joints, full.joints, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast.transforms, full.transforms, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["py2_pkl_1", "py2_pkl_2", "clean_pkl"])
def test_pkl_loads_like_npz(model_files, name):
    """Catches a loader that cannot read the original Python 2 pickle (chumpy Ch / Select objects, a
    scipy csc J_regressor, latin1 byte strings, protocols 1 and 2) or reads it differently from the .npz."""
    ref = smpl.load_model_file(model_files["npz"])
    got = smpl.load_model_file(model_files[name])
    assert set(got) == set(ref)
    for key in ref:  # bit-identical arrays, so SMPL.from_file builds the same model from either file
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_more_shape_components_than_betas(model_arrays):
    """Catches slicing shapedirs on the wrong axis when the file has more components (300 in v1.1)
    than num_betas: the extra components must act exactly as further betas."""
    m10 = smpl.SMPL(model=model_arrays).double()
    m12 = smpl.SMPL(model=model_arrays, num_betas=NUM_SHAPE).double()
    assert (m10.num_betas, m12.num_betas) == (10, NUM_SHAPE)
    x = _random_inputs(2, num_betas=NUM_SHAPE, seed=3)
    padded = {**x, "betas": torch.cat([x["betas"][:, :10], torch.zeros(2, NUM_SHAPE - 10, dtype=torch.float64)], 1)}
    torch.testing.assert_close(m12(**padded).vertices, m10(**{**x, "betas": x["betas"][:, :10]}).vertices)
    assert (m12(**x).joints - m12(**padded).joints).abs().max() > 1e-4
    with pytest.raises(ValueError, match="num_betas must be in 1..12"):
        smpl.SMPL(model=model_arrays, num_betas=300)


def test_extra_regressors_and_lsp14(ours, reference, model_files):
    """Catches extra joints regressed from the wrong vertices (unposed, or before transl), and an
    LSP-14 selection that differs from SPIN's H36M_TO_J14 or forgets to centre on the pelvis."""
    x = _random_inputs(4, seed=4)
    out = ours(**x)
    vertices = reference(**x).vertices
    h36m = torch.from_numpy(np.load(model_files["h36m"]))
    torch.testing.assert_close(out.extra["h36m"], torch.einsum("kv,bvc->bkc", h36m, vertices), atol=1e-5, rtol=0)
    with open(model_files["j19"], "rb") as f:
        j19_regressor = torch.from_numpy(pickle.load(f))
    torch.testing.assert_close(out.extra["j19"], torch.einsum("kv,bvc->bkc", j19_regressor, vertices),
                               atol=1e-5, rtol=0)
    assert ours(**x, return_vertices=False).extra == {}
    # SPIN constants.py: H36M_TO_J17 = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10, 0, 7, 9], J14 = first 14
    j17 = torch.arange(17 * 3, dtype=torch.float64).view(1, 17, 3) ** 1.5
    lsp = smpl.lsp14_from_h36m(j17)
    assert lsp.shape == (1, 14, 3)
    torch.testing.assert_close(lsp[0, 0], j17[0, 6] - j17[0, 0])
    torch.testing.assert_close(lsp[0, 13], j17[0, 10] - j17[0, 0])
    j19 = torch.arange(19 * 3, dtype=torch.float64).view(1, 19, 3) ** 1.5
    torch.testing.assert_close(smpl.lsp14_from_j19(j19)[0, 13], j19[0, 18] - j19[0, 14])


def test_gradients_flow_to_pose_orient_betas(ours):
    """Catches a detach (or a numpy round trip) anywhere between the parameters and the joints, on both
    the joints-only path the rewards use and the full mesh path."""
    for return_vertices in (False, True):
        x = {k: v.clone().requires_grad_() for k, v in _random_inputs(3, seed=5).items()}
        ours(**x, return_vertices=return_vertices).joints.square().sum().backward()
        for name in ("body_pose", "global_orient", "betas", "transl"):
            g = x[name].grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (name, return_vertices)


def test_builtin_skeleton_runs_without_files():
    """Catches the no-file path breaking: joints only, float32 and float64, the rest pose at zero."""
    body = smpl.SMPL()
    assert not body.has_mesh and body.num_betas == 0 and body.faces is None
    out = body(torch.zeros(2, 23, 3, dtype=torch.float64))
    assert out.vertices is None and out.joints.dtype == torch.float64
    torch.testing.assert_close(out.joints[0], body.J_template.double())
    out32 = body(torch.zeros(2, 69), torch.eye(3).expand(2, 3, 3), transl=torch.ones(2, 3))
    torch.testing.assert_close(out32.joints[1], body.J_template + 1)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_shape_errors_name_expected_shapes(ours):
    """Catches silent broadcasting of wrong shapes and errors that do not say what was expected."""
    body = smpl.SMPL()
    x = _random_inputs(2)
    with pytest.raises(ValueError, match=r"\(B, 23, 3\), \(B, 69\) or \(B, 23, 3, 3\)"):
        body(torch.zeros(2, 22, 3))
    with pytest.raises(ValueError, match=r"global_orient must be \(B, 3\)"):
        body(torch.zeros(2, 69), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"transl must be \(2, 3\)"):
        body(torch.zeros(2, 69), transl=torch.zeros(3))
    with pytest.raises(ValueError, match="no shape space"):
        body(torch.zeros(2, 69), betas=torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"betas must be \(2, 10\)"):
        ours(x["body_pose"], betas=torch.zeros(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="call .to"):
        ours(x["body_pose"].float())
    with pytest.raises(ValueError, match="no mesh"):
        smpl.SMPL(extra_regressors={"h36m": "J_regressor_h36m.npy"})
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        smpl.rot6d_to_matrix(torch.zeros(4, 9))
    with pytest.raises(ValueError, match=r"rot_mats must be \(\.\.\., 24, 3, 3\)"):
        smpl.forward_kinematics(torch.zeros(2, 23, 3, 3), torch.zeros(24, 3))


def test_missing_and_malformed_files(model_arrays, tmp_path):
    """Catches file errors that do not name the file, what was expected, and how to run without it."""
    how = r"SMPL\(\).*smpl\.is\.tue\.mpg\.de"
    with pytest.raises(FileNotFoundError, match=rf"nowhere\.pkl.*{how}"):
        smpl.SMPL.from_file(tmp_path / "nowhere.pkl")
    incomplete = {k: v for k, v in model_arrays.items() if k != "posedirs"}
    np.savez(tmp_path / "incomplete.npz", **incomplete)
    with pytest.raises(smpl.ModelFileError, match=rf"incomplete\.npz: missing \['posedirs'\].*{how}"):
        smpl.SMPL.from_file(tmp_path / "incomplete.npz")
    np.savez(tmp_path / "bad_shape.npz", **{**model_arrays, "weights": model_arrays["weights"][:, :23]})
    with pytest.raises(smpl.ModelFileError,
                       match=r"bad_shape\.npz: 'weights' has shape \(6890, 23\), expected \(6890, 24\)"):
        smpl.SMPL.from_file(tmp_path / "bad_shape.npz")
    tree = model_arrays["kintree_table"].copy()
    tree[0, 5] = 3
    np.savez(tmp_path / "other_tree.npz", **{**model_arrays, "kintree_table": tree})
    with pytest.raises(smpl.ModelFileError, match="not the SMPL kinematic tree"):
        smpl.SMPL.from_file(tmp_path / "other_tree.npz")
    (tmp_path / "notes.pkl").write_text("this is not a model file")
    with pytest.raises(smpl.ModelFileError, match=rf"notes\.pkl: not a readable pickle.*{how}"):
        smpl.SMPL.from_file(tmp_path / "notes.pkl")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(smpl.ModelFileError, match="holds a list, expected the dict"):
        smpl.SMPL.from_file(tmp_path / "list.pkl")
    with pytest.raises(FileNotFoundError, match="J_regressor_h36m.npy.*Leave extra_regressors out"):
        smpl.SMPL(model=model_arrays, extra_regressors={"h36m": tmp_path / "J_regressor_h36m.npy"})
    np.save(tmp_path / "wrong.npy", np.zeros((17, 100)))
    with pytest.raises(smpl.ModelFileError, match=r"wrong\.npy.*\(K, 6890\).*\(17, 100\)"):
        smpl.SMPL(model=model_arrays, extra_regressors={"h36m": tmp_path / "wrong.npy"})


class _RunsCode:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def test_pickle_that_runs_code_is_refused(tmp_path):
    """Catches a loader that trusts the pickle: files whose unpickling would call os.system or
    builtins.eval / exec must be refused, and the payload must not have run."""
    marker = tmp_path / "payload_ran"
    payloads = [(os.system, f"touch {marker}"), (eval, f"open({str(marker)!r}, 'w').close()"),
                (exec, f"open({str(marker)!r}, 'w').close()")]
    for i, (func, arg) in enumerate(payloads):
        path = tmp_path / f"evil{i}.pkl"
        path.write_bytes(pickle.dumps({"v_template": _RunsCode(func, arg)}, protocol=2))
        with pytest.raises(smpl.ModelFileError, match=rf"evil{i}\.pkl: unsafe.*refusing to load"):
            smpl.load_model_file(path)
        with pytest.raises(smpl.ModelFileError, match="refusing to load"):
            smpl.load_regressor(path, 6890)
        assert not marker.exists()
    # sanity: the same payload does run under plain pickle, so the test above can fail
    pickle.loads(pickle.dumps(_RunsCode(eval, f"open({str(marker)!r}, 'w').close()")))
    assert marker.exists()


class _ForgedDtype:
    """Pickles as numpy.dtype(spec) whose state clears the flags, so dtype.hasobject says False even for
    an object dtype: the forgery that made ndarray.__setstate__ read raw bytes as object pointers."""

    def __init__(self, spec, fields=None):
        self.spec, self.fields = spec, fields

    def __reduce__(self):
        if self.fields:  # a structured dtype: names, fields, item size and alignment in the state
            return (np.dtype, (self.spec, False, True), (3, "|", None, tuple(self.fields), self.fields, 8, 1, 0))
        return (np.dtype, (self.spec, False, True), (3, "|", None, None, None, -1, -1, 0))


class _ForgedArray:
    def __init__(self, dtype, raw):
        self.dtype, self.raw = dtype, raw

    def __reduce__(self):
        return (_np_reconstruct, (np.ndarray, (0,), b"b"), (1, (len(self.raw) // 24, 3), self.dtype, False, self.raw))


_LOAD_HOSTILE = """
import sys
sys.path.insert(0, sys.argv[1])
import data, smpl
for path in sys.argv[2:]:
    try:
        smpl.load_model_file(path)  # reads every array as float64
        print("LOADED", path)
    except ValueError as e:
        print("REFUSED", e)
    try:
        seq = data.load_numpy_pickle(path, "a 3DPW sequence file")
        print("LOADED", path, repr(seq["poses"][0]))  # what any use of the values does
    except ValueError as e:
        print("REFUSED", e)
"""


def _two_vertex_model_but_v_template():
    """A model file of 2 vertices, valid but for the v_template a test adds, so the loader reaches it."""
    V = 2
    return {"shapedirs": np.zeros((V, 3, 1)), "posedirs": np.zeros((V, 3, 207)), "J_regressor": np.zeros((24, V)),
            "weights": np.zeros((V, 24)), "kintree_table": np.stack([np.array(smpl.PARENTS), np.arange(24)]),
            "f": np.zeros((1, 3), dtype=np.int64)}


def test_forged_object_dtype_is_refused_not_a_crash(tmp_path):
    """A pickled array whose dtype is (or has a field of) Python objects, with the dtype's flags forged so
    that dtype.hasobject reads False: both the SMPL loader and the 3DPW loader must refuse it with an error
    naming the file. Before the fix, numpy read the raw bytes as object pointers and the interpreter died
    with SIGSEGV, so the loads run in a subprocess: a crash fails this test instead of killing pytest."""
    raw = b"\x41" * 48  # (2, 3) "pointers" to address 0x4141414141414141
    forged = {"object": _ForgedArray(_ForgedDtype("O8"), raw),
              "object_field": _ForgedArray(_ForgedDtype("V8", {"a": (_ForgedDtype("O8"), 0)}), raw)}
    model = _two_vertex_model_but_v_template()
    paths = []
    for name, array in forged.items():
        path = tmp_path / f"forged_{name}.pkl"
        path.write_bytes(pickle.dumps({**model, "v_template": array, "poses": [array]}, protocol=2))
        paths.append(str(path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _LOAD_HOSTILE, root, *paths], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"the loader crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("REFUSED") for line in lines), proc.stdout
    for path in paths:
        assert sum(path in line and "Python objects" in line for line in lines) == 2, proc.stdout


def _py2_pickle(obj, path):
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def test_self_referential_and_memo_blowup_pickles_are_refused(tmp_path):
    """Catches a RecursionError from a chumpy object that contains itself, and a 20 kB pickle that shares
    one list through the memo so np.asarray expands it to hundreds of MB: both must be clear errors
    naming the file, found before any array is built from them."""
    loop = FakeCh(None)
    loop.x = loop  # a Ch whose value is itself
    _py2_pickle({**_two_vertex_model_but_v_template(), "v_template": loop}, tmp_path / "loop.pkl")
    with pytest.raises(smpl.ModelFileError, match=r"loop\.pkl: the pickle nests deeper than 100 levels"):
        smpl.load_model_file(tmp_path / "loop.pkl")

    row = list(range(1000))
    rows = [row] * 1000  # memo: one list, referred to 1000 times (2 bytes each)
    bomb = tmp_path / "bomb.pkl"  # v_template: a Select whose idxs hold 40M indices, 320 MB as int64
    _py2_pickle({**_two_vertex_model_but_v_template(),
                 "v_template": FakeSelect(FakeCh(np.zeros(3)), [rows] * 40, (2, 3))}, bomb)
    assert bomb.stat().st_size < 20_000
    with pytest.raises(smpl.ModelFileError, match=r"bomb\.pkl: the pickle unpacks to more than"):
        smpl.load_model_file(bomb)
    plain = tmp_path / "plain_bomb.pkl"
    plain.write_bytes(pickle.dumps({"poses": [rows] * 40}, protocol=2))
    with pytest.raises(ValueError, match=r"plain_bomb\.pkl: cannot load .*unpacks to more than"):
        data.load_numpy_pickle(str(plain), "a 3DPW sequence file")


def test_one_unpickler_each_caller_narrows(tmp_path):
    """One allow-list for the SMPL, 3DPW and HMR2.0 readers: each allows only its own groups. Catches a
    reader that accepts globals another reader needs (3DPW reading chumpy objects, an HMR2.0 checkpoint
    reading numpy arrays) and an allowed global that refuses Python 2's module names."""
    arrays = tmp_path / "arrays.pkl"
    arrays.write_bytes(pickle.dumps({"x": np.arange(3.0), "s": {1, 2}}, protocol=2))
    assert np.array_equal(smpl.load_pickle(arrays, allow=("numpy", "builtins"))["x"], np.arange(3.0))
    assert type(smpl.load_pickle(arrays, allow=("numpy", "builtins"))["x"]) is np.ndarray
    with pytest.raises(smpl.PickleFileError, match=r"arrays\.pkl: .*refusing to load builtins\.set"):
        smpl.load_pickle(arrays, allow=("numpy",))
    with pytest.raises(smpl.PickleFileError, match="refusing to load numpy"):
        smpl.load_pickle(arrays, allow=("builtins", "torch", "config"))
    ch = tmp_path / "ch.pkl"
    _py2_pickle({"v_template": FakeCh(1)}, ch)
    assert smpl.load_pickle(ch, allow=("chumpy", "builtins"))["v_template"].state["x"] == 1
    with pytest.raises(ValueError, match="refusing to load chumpy.ch.Ch"):
        data.load_numpy_pickle(str(ch), "a 3DPW sequence file")
