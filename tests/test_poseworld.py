"""PoseWorld (data.py sections 1-7): sampler, posecodes and checker, captions, images, VQA, splits,
cache, PNG pictures. References are independent where one exists: scipy rotations and numpy for the
geometry, a hand-written pinhole model, a hand-written PNG parser."""
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import data
import smpl

IDX = smpl.JOINT_INDEX
PK = data.POSECODE_INDEX


def small_world(split="train", seed=0, size=60, **kw):
    return data.PoseWorld(split, size=size, seed=seed, cache_dir=None, **kw)


@pytest.fixture(scope="module")
def world():
    return small_world(size=90)


def euler_pose(angles: dict) -> torch.Tensor:
    """A (1, 24, 3) axis-angle pose from {joint name: (x, y, z) degrees}, R = Ry Rz Rx, via scipy."""
    pose = np.zeros((1, 24, 3))
    for name, (x, y, z) in angles.items():
        # scipy's intrinsic "YZX" applies Ry, then Rz about the new z, then Rx: the matrix Ry Rz Rx.
        pose[0, IDX[name]] = Rotation.from_euler("YZX", [y, z, x], degrees=True).as_rotvec()
    return torch.tensor(pose, dtype=torch.float32)


def joints_of(pose):
    return smpl.pose_joints(pose)


# ---- determinism, splits, cache ------------------------------------------------------------------------

def test_same_seed_same_world_other_seed_other_world():
    """Catches hidden global RNG use (torch.manual_seed, random) or unordered iteration in the generator."""
    torch.manual_seed(123)  # a different global state must not matter
    a = small_world(seed=0, size=40)
    torch.manual_seed(456)
    b = small_world(seed=0, size=40)
    c = small_world(seed=1, size=40)
    for key in ("poses", "pose_body", "joints", "codes", "mentioned", "images", "task_id"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    for key in ("R", "t", "focal", "principal", "transl"):
        assert torch.equal(a.cameras[key], b.cameras[key]), key
    assert a.questions == b.questions and a.answers == b.answers and a.captions == b.captions
    assert not torch.equal(a.pose_body, c.pose_body)
    assert a.questions != c.questions
    assert not torch.equal(a.images, c.images)


def test_splits_are_disjoint():
    """Catches splits drawn from one generator stream (the same poses in train and test)."""
    worlds = {s: small_world(s, size=40) for s in ("train", "val", "test")}
    for s1, s2 in (("train", "val"), ("train", "test"), ("val", "test")):
        p1, p2 = worlds[s1].pose_body.flatten(1), worlds[s2].pose_body.flatten(1)  # (n, 72)
        same = (p1[:, None] == p2[None]).all(-1)  # (n1, n2)
        assert not same.any(), (s1, s2)
        assert torch.cdist(p1, p2).min() > 1e-3


def test_cache_is_written_atomically_reused_and_rebuilt_when_broken(tmp_path, capsys):
    """Catches a cache that is not reused, not keyed by its arguments, or that crashes on a corrupt or
    old file instead of regenerating it."""
    a = data.PoseWorld("val", size=12, seed=3, cache_dir=str(tmp_path))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind
    path = files[0]
    b = data.PoseWorld("val", size=12, seed=3, cache_dir=str(tmp_path))
    assert torch.equal(a.images, b.images) and a.questions == b.questions
    assert "regenerating" not in capsys.readouterr().out

    path.write_bytes(b"not a torch file")
    c = data.PoseWorld("val", size=12, seed=3, cache_dir=str(tmp_path))
    assert "regenerating" in capsys.readouterr().out
    assert torch.equal(a.poses, c.poses) and a.answers == c.answers

    old = torch.load(path, weights_only=True)
    old["version"] = data.POSEWORLD_VERSION - 1
    torch.save(old, path)
    d = data.PoseWorld("val", size=12, seed=3, cache_dir=str(tmp_path))
    assert "regenerating" in capsys.readouterr().out
    assert torch.equal(a.codes, d.codes)
    assert torch.load(path, weights_only=True)["version"] == data.POSEWORLD_VERSION

    data.PoseWorld("val", size=12, seed=4, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2  # another seed is another file


def test_task_mix_and_bad_arguments():
    """Catches mix weights being ignored and silent acceptance of unknown splits or tasks."""
    w = small_world(size=40, tasks=("t2p", "vqa"), mix=(3, 1))
    assert len(w.task_indices("t2p")) == 30 and len(w.task_indices("vqa")) == 10
    assert len(w.task_indices("i2p")) == 0
    with pytest.raises(ValueError, match="split"):
        data.PoseWorld("dev", size=4, cache_dir=None)
    with pytest.raises(ValueError, match="tasks"):
        data.PoseWorld("train", size=4, tasks=("t2m",), cache_dir=None)


# ---- sample dicts ----------------------------------------------------------------------------------------

def test_sample_fields_per_task(world):
    """Catches a wrong answer template, an image token or template leaking into the question, an
    image given to text-to-pose, and an image-to-pose target left in the body frame."""
    for task in data.TASKS:
        i = int(world.task_indices(task)[0])
        s = world[i]
        assert s["task"] == task and s["index"] == i
        assert "<image>" not in s["question"] and "USER" not in s["question"]
        assert s["pose"].shape == (24, 3) and s["pose"].dtype == torch.float32
        assert s["joints"].shape == (24, 3) and s["codes"].shape == (data.K,)
        assert s["mentioned"].dtype == torch.bool
        if task == "t2p":
            assert s["image"] is None and s["camera"] is None and s["has_pose"]
            assert s["answer"] == data.POSE_ANSWER == "The SMPL pose of this person is <POSE>."
            assert s["caption"] and s["caption"] in s["question"] and s["mentioned"].any()
            assert torch.equal(s["pose"], s["pose_body"])
        else:
            assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.uint8
            assert not s["mentioned"].any() and s["caption"] == ""
            R = s["camera"]["R"].double()
            root = smpl.axis_angle_to_matrix(s["pose"][0].double())
            root_body = smpl.axis_angle_to_matrix(s["pose_body"][0].double())
            assert torch.allclose(root, R @ root_body, atol=1e-5)  # global_orient_cam = R_cam @ global_orient
            assert torch.allclose(s["joints"], joints_of(s["pose"][None])[0], atol=1e-5)
        if task == "i2p":
            assert s["answer"] == data.POSE_ANSWER and s["has_pose"]
        if task == "vqa":
            assert not s["has_pose"] and data.POSE_TOKEN not in s["answer"] and s["vqa_kind"] in data.VQA_KINDS


# ---- posecodes and the checker -----------------------------------------------------------------------

def template_regex(template: str, side) -> str:
    """A regex for the sentences one caption template can produce."""
    alt = lambda words: "(?:" + "|".join(re.escape(w) for w in words) + ")"  # noqa: E731
    other = {"left": "right", "right": "left"}.get(side)
    out = re.escape(template)
    for key, value in (("S", alt(data.SUBJECTS)), ("P", alt(data.POSSESSIVES)), ("p", "their"),
                       ("side", str(side)), ("other", str(other))):
        out = out.replace(re.escape("{" + key + "}"), value)
    return out


def test_every_caption_holds_for_its_own_pose_and_names_its_codes(world):
    """Catches captions that mention codes the pose does not have (a wrong checker or wrong margins),
    sentences written for another code or side, and captions with the wrong number of codes."""
    rows = world.task_indices("t2p")
    assert len(rows) >= 20
    joints = joints_of(world.poses[rows])  # recomputed from the stored pose
    assert torch.equal(data.check_posecodes(joints, world.codes[rows], world.mentioned[rows]), torch.ones(len(rows)))
    margins = data.posecode_margins(joints)
    min_margin = torch.tensor([f.min_margin for f in data.POSECODES])
    assert (margins >= min_margin)[world.mentioned[rows]].all()
    for r in rows.tolist():
        mentioned = torch.nonzero(world.mentioned[r]).flatten().tolist()
        assert 2 <= len(mentioned) <= 4
        sentences = re.findall(r"[^.]+\.", world.captions[r])
        assert len(sentences) == len(mentioned), world.captions[r]
        for sentence in sentences:
            sentence = sentence.strip()
            matches = []
            for k in mentioned:
                f = data.POSECODES[k]
                templates = data.CAPTION_TEMPLATES[f.template][int(world.codes[r, k])]
                if any(re.fullmatch(template_regex(t, f.side), sentence) for t in templates):
                    matches.append(k)
            assert len(matches) == 1, (sentence, [data.POSECODES[k].name for k in mentioned])


def test_checker_is_not_trivially_one(world):
    """Catches a checker that ignores the joints it is given (always 1)."""
    rows = world.task_indices("t2p")
    others = joints_of(world.poses[rows.roll(1)])  # each caption checked against another sample's pose
    score = data.check_posecodes(others, world.codes[rows], world.mentioned[rows])
    assert (score < 1).float().mean() > 0.4
    assert score.mean() < 0.8


def test_twins_break_a_caption_code_and_stay_near_the_pose(world):
    """data.twin_poses, the retrievers' hard negatives: each twin violates at least one code its caption
    names (the checker says < 1) and stays near its pose (joint-angle noise, not another archetype).
    Catches twins that satisfy the caption (false negatives), twins checked against the wrong caption,
    and noise so large that a twin is just another pose."""
    rows = world.task_indices("t2p")
    pose, codes, mentioned = world.pose_body[rows], world.codes[rows], world.mentioned[rows]
    twins, broken = data.twin_poses(pose, codes, mentioned, torch.Generator().manual_seed(0))
    assert twins.shape == (len(rows), 24, 3) and broken.float().mean() > 0.9
    score = data.check_posecodes(twins, codes, mentioned)  # (n,)
    assert torch.equal(score < 1, broken)
    own = data.check_posecodes(world.joints_body[rows], codes, mentioned)
    assert torch.equal(own, torch.ones_like(own))  # the caption's own pose satisfies it
    near = (twins - world.joints_body[rows]).norm(dim=-1).mean(-1)  # (n,) metres, mean joint distance
    far = (world.joints_body[rows.roll(1)] - world.joints_body[rows]).norm(dim=-1).mean(-1)  # another pose
    assert near.median() < 0.8 * far.median(), (near.median(), far.median())  # ~0.17 m against ~0.25 m


def test_posecodes_of_hand_made_poses():
    """Catches swapped left/right, wrong bin order, and wrong reference joints: T-pose, arms up, one arm
    raised, a squat, each checked against what the pose obviously is."""
    names = lambda codes: {f.name: f.categories[c] for f, c in zip(data.POSECODES, codes.tolist())}  # noqa: E731
    tpose = names(data.posecodes(joints_of(torch.zeros(1, 24, 3)))[0])
    assert tpose["left_elbow"] == tpose["right_elbow"] == "straight"
    assert tpose["left_hand_height"] == tpose["right_hand_height"] == "at shoulder height"
    assert tpose["left_hand_side"] == tpose["right_hand_side"] == "out to the side"
    assert tpose["hands_distance"] == "wide apart" and tpose["hips_height"] == "high"
    assert tpose["torso_pitch"] == "upright" and tpose["feet_distance"] == "together"

    up = names(data.posecodes(joints_of(euler_pose({"left_shoulder": (0, 0, 85), "right_shoulder": (0, 0, -85)})))[0])
    assert up["left_hand_height"] == up["right_hand_height"] == "above the head"
    assert up["hands_distance"] == "apart"  # straight up, the hands are a shoulder width apart

    # Only the LEFT arm up: SMPL's left is the body's left (+x), so only the left code may change.
    one = names(data.posecodes(joints_of(euler_pose({"left_shoulder": (0, 0, 85), "right_shoulder": (0, 0, 85)})))[0])
    assert one["left_hand_height"] == "above the head" and one["right_hand_height"] == "below the hips"

    squat = names(data.posecodes(joints_of(euler_pose({
        "left_hip": (-110, 0, 0), "right_hip": (-110, 0, 0), "left_knee": (125, 0, 0), "right_knee": (125, 0, 0)})))[0])
    assert squat["left_knee"] == squat["right_knee"] == "completely bent"
    assert squat["hips_height"] == "at knee level"

    lean = names(data.posecodes(joints_of(euler_pose({"spine1": (15, 0, 0), "spine2": (15, 0, 0)})))[0])
    assert lean["torso_pitch"] == "leaning forward"
    lean = names(data.posecodes(joints_of(euler_pose({"spine1": (40, 0, 0), "spine2": (40, 0, 0),
                                                      "spine3": (30, 0, 0)})))[0])
    assert lean["torso_pitch"] == "bent far forward"
    lean = names(data.posecodes(joints_of(euler_pose({"spine1": (-15, 0, 0), "spine2": (-15, 0, 0)})))[0])
    assert lean["torso_pitch"] == "leaning backward"
    lean = names(data.posecodes(joints_of(euler_pose({"spine1": (0, 0, -15), "spine2": (0, 0, -10)})))[0])
    assert lean["torso_roll"] == "leaning left"  # -z on the spine turns +y towards +x, the body's left


@pytest.mark.parametrize("side", ["left", "right"])
def test_elbow_bins_around_each_boundary(side):
    """Catches an off-by-one bin, a flexion angle measured from the wrong joints, or degrees vs radians:
    the elbow is bent by a known rotation and the expected bin is computed with scipy and numpy."""
    sign = -1 if side == "left" else 1  # flexion is -y on the left, +y on the right
    rest = joints_of(torch.zeros(1, 24, 3))[0].double().numpy()
    shoulder, elbow, wrist = (rest[IDX[f"{side}_{n}"]] for n in ("shoulder", "elbow", "wrist"))
    u0, v0 = shoulder - elbow, wrist - elbow
    rest_angle = np.degrees(np.arccos(u0 @ v0 / np.linalg.norm(u0) / np.linalg.norm(v0)))  # ~172: not quite straight
    thetas = [rest_angle - b + d for b in data._BEND_DEG for d in (-3.0, 3.0)]  # just either side of each boundary
    for theta in thetas + [0.0, 145.0]:
        R = Rotation.from_euler("y", sign * theta, degrees=True).as_matrix()
        u, v = shoulder - elbow, R @ (wrist - elbow)
        angle = np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
        expected = int(np.searchsorted(data._BEND_DEG, angle))
        pose = euler_pose({f"{side}_elbow": (0, sign * theta, 0)})
        code = data.posecodes(joints_of(pose))[0, PK[f"{side}_elbow"]]
        assert code == expected, (theta, angle)
        value = data.posecode_values(joints_of(pose))[0, PK[f"{side}_elbow"]]
        assert abs(float(value) - angle) < 1e-3


def test_posecodes_do_not_depend_on_global_orientation():
    """Catches codes measured in the world or camera frame: rotating the whole body (what the
    image-to-pose target does) must not change them."""
    pose, _ = data.sample_poses(64, torch.Generator().manual_seed(5))
    turned = pose.clone()
    turned[:, 0] = torch.tensor(Rotation.random(64, random_state=0).as_rotvec(), dtype=torch.float32)
    a, b = joints_of(pose), joints_of(turned) + torch.tensor([0.3, -1.0, 4.0])
    assert torch.allclose(data.posecode_values(a), data.posecode_values(b), atol=1e-3)


# ---- the sampler -----------------------------------------------------------------------------------------

def signed_flexion(joints, transforms, parent, joint, child, axis, sign):
    """Signed bend angle (deg) at `joint` about its hinge axis (column `axis` of the parent's global
    rotation, which is where the local rotation's axis points), positive = anatomical flexion."""
    upper = joints[:, joint] - joints[:, parent]
    lower = joints[:, child] - joints[:, joint]
    hinge = transforms[:, parent, :3, axis]
    cross = torch.cross(upper, lower, dim=-1)
    return sign * torch.rad2deg(torch.atan2((cross * hinge).sum(-1), (upper * lower).sum(-1)))


def test_sampled_poses_respect_joint_limits():
    """Catches hyperextended elbows and knees (limits with the wrong sign, or mirrored without
    negating): in the posed skeleton every knee bends backwards and every elbow forwards."""
    pose, ids = data.sample_poses(3000, torch.Generator().manual_seed(7))
    assert pose.shape == (3000, 24, 3) and pose.dtype == torch.float32
    assert torch.equal(pose[:, 0], torch.zeros(3000, 3))  # canonical global orientation
    assert set(ids.tolist()) == set(range(len(data.ARCHETYPES)))
    out = smpl.SMPL()(pose[:, 1:], pose[:, 0])
    J, T = out.joints, out.transforms
    rest_J, rest_T = (lambda o: (o.joints, o.transforms))(smpl.SMPL()(torch.zeros(1, 23, 3)))
    for side, s in (("left", 1), ("right", -1)):
        knee = (IDX[f"{side}_hip"], IDX[f"{side}_knee"], IDX[f"{side}_ankle"], 0, 1)  # knee flexion +x both sides
        elbow = (IDX[f"{side}_shoulder"], IDX[f"{side}_elbow"], IDX[f"{side}_wrist"], 1, -s)  # -y left, +y right
        for args in (knee, elbow):
            bend = signed_flexion(J, T, *args) - signed_flexion(rest_J, rest_T, *args)  # relative to rest
            assert bend.min() > -3.0, (side, args)  # off-axis noise of a few degrees only
            assert bend.max() < 152.0
            assert (bend > 45).float().mean() > 0.1  # the test is not vacuous: many joints are bent


# ---- images and cameras ---------------------------------------------------------------------------------

def test_project_is_the_pinhole_model():
    """Catches a transposed R, a missing t, or u/v swapped in the projection."""
    R = Rotation.from_euler("xyz", [10, 30, -5], degrees=True).as_matrix()
    t = np.array([0.1, -0.2, 4.0])
    X = np.array([[0.3, 0.5, -0.2], [-0.4, -0.9, 0.1]])
    Xc = X @ R.T + t
    expected = np.stack([100 * Xc[:, 0] / Xc[:, 2] + 31.5, 100 * Xc[:, 1] / Xc[:, 2] + 30.0], -1)
    cam = {"R": torch.tensor(R)[None], "t": torch.tensor(t)[None], "focal": torch.tensor([100.0], dtype=torch.float64),
           "principal": torch.tensor([[31.5, 30.0]], dtype=torch.float64)}
    assert np.allclose(data.project(torch.tensor(X)[None], cam)[0].numpy(), expected, atol=1e-9)


def segment_distance(p, a, b):
    """Distance from pixels p (P, 2) to segments a -> b (S, 2) in numpy. -> (P, S)"""
    ab = b - a
    t = np.clip(((p[:, None] - a[None]) * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(p[:, None] - (a[None] + t[..., None] * ab[None]), axis=-1)


def test_rendering_puts_joints_where_the_camera_says():
    """Catches an image flipped or transposed against the camera, a renderer ignoring the principal
    point or focal length, and bones drawn where there are none."""
    g = torch.Generator().manual_seed(11)
    pose, _ = data.sample_poses(6, g)
    J = joints_of(pose)
    cam = data.sample_cameras(J, g, 64)
    images = data.render_images(J, cam, 64, g)
    palette = {tuple(c) for c in data.SEGMENT_COLOURS.tolist()}
    grid = np.stack(np.meshgrid(np.arange(64), np.arange(64), indexing="xy"), -1).reshape(-1, 2)  # (u, v) per pixel
    for i in range(6):
        R, t = cam["R"][i].double().numpy(), cam["t"][i].double().numpy()
        f, c = float(cam["focal"][i]), cam["principal"][i].double().numpy()
        P = np.concatenate([J[i].double().numpy(), data._head_centre(J[i:i + 1].double())[0].numpy()[None]])  # (25, 3)
        Xc = P @ R.T + t
        uv = f * Xc[:, :2] / Xc[:, 2:] + c  # the hand-written pinhole model
        img = images[i].permute(1, 2, 0).numpy()  # (H, W, 3)
        inside = 0
        for u, v in np.round(uv[:24]).astype(int):
            if 0 <= u < 64 and 0 <= v < 64:
                inside += 1
                assert tuple(img[v, u]) in palette, (i, u, v)
        assert inside >= 20  # the body is framed
        seg = np.array(data._SEGMENTS)
        dist = segment_distance(grid.astype(float), uv[seg[:, 0]], uv[seg[:, 1]]).min(-1)  # (P,)
        far_radius = f * 0.10 / Xc[:, 2].min() + 1.0  # the largest drawn radius (the head), plus a pixel
        far = img.reshape(-1, 3)[dist > far_radius]
        assert len(far) > 1000 and far.max() <= 81  # background only
        near = img.reshape(-1, 3)[dist < 0.5]
        assert (near.max(-1) >= 200).all()  # every bone's centre line is painted


def test_nearer_bones_cover_farther_ones():
    """Catches a painter's order or z-buffer reversed: a forearm across the belly is seen in front of the
    spine from the front camera and behind it from the back camera."""
    pose = euler_pose({"left_shoulder": (-30, -90, -80), "left_elbow": (0, -90, 0), "right_shoulder": (0, 0, 80)})
    J = joints_of(pose)[0].double()
    elbow, wrist = J[IDX["left_elbow"]], J[IDX["left_wrist"]]
    s = elbow[0] / (elbow[0] - wrist[0])
    P = elbow + s * (wrist - elbow)  # where the forearm crosses the body's midline x = 0
    assert P[2] > J[IDX["spine2"], 2] + 0.05  # in front of the spine
    colours = {}
    for view, sign in (("front", 1.0), ("back", -1.0)):
        eye = torch.tensor([0.0, float(P[1]), 4.0 * sign], dtype=torch.float64)
        R = torch.diag(torch.tensor([sign, -1.0, -sign], dtype=torch.float64))  # rows: right, down, forward
        cam = {"R": R[None], "t": -(R @ eye)[None], "focal": torch.tensor([300.0], dtype=torch.float64),
               "principal": torch.tensor([[31.5, 31.5]], dtype=torch.float64)}
        cam = {k: v.float() for k, v in cam.items()}
        u, v = data.project(P[None, None].float(), cam)[0, 0].round().long().tolist()
        colours[view] = tuple(data.render_images(J[None].float(), cam, 64)[0, :, v, u].tolist())
    left_arm = tuple(data.SEGMENT_COLOURS[[k for k, (_, c) in enumerate(data._SEGMENTS)
                                           if c == IDX["left_wrist"]][0]].tolist())
    spine = tuple(data.SEGMENT_COLOURS[[k for k, (_, c) in enumerate(data._SEGMENTS)
                                        if c == IDX["spine2"]][0]].tolist())
    assert colours["front"] == left_arm and colours["back"] == spine


def test_image_to_pose_target_is_in_the_camera_frame(world):
    """Catches a camera-frame pose that does not match its image: the camera-frame joints plus the
    stored translation, seen by an identity camera, land where the body-frame joints do."""
    rows = world.task_indices("i2p")
    cam = {k: v[rows] for k, v in world.cameras.items()}
    n = len(rows)
    identity = {"R": torch.eye(3).expand(n, 3, 3), "t": torch.zeros(n, 3), "focal": cam["focal"],
                "principal": cam["principal"]}
    a = data.project(world.joints[rows] + cam["transl"][:, None], identity)
    b = data.project(world.joints_body[rows], cam)
    assert torch.allclose(a, b, atol=1e-3)


# ---- VQA -----------------------------------------------------------------------------------------------------

def test_vqa_answers_follow_the_pose(world):
    """Catches VQA answers built from another sample or the wrong side."""
    w = small_world(size=150, tasks=("vqa",))
    values = data.posecode_values(w.joints)
    kinds = set()
    for i in range(len(w)):
        s = w[i]
        kind, q, a = s["vqa_kind"], s["question"], s["answer"]
        kinds.add(kind)
        if kind == "activity":
            assert data.ARCHETYPES[s["archetype"]].description.lower() in a.lower()
        elif kind == "hand_above_head":
            side = "left" if "left" in q else "right"
            above = s["codes"][PK[f"{side}_hand_height"]] == len(data._HAND_HEIGHT) - 1
            assert a.startswith("Yes") == bool(above)
        elif kind in ("knee_more_bent", "elbow_more_bent"):
            joint = kind.split("_")[0]
            more = "left" if values[i, PK[f"left_{joint}"]] < values[i, PK[f"right_{joint}"]] else "right"
            assert more in a and ({"left", "right"} - {more}).pop() not in a
        elif kind == "feet_distance":
            assert a.endswith(data.POSECODES[PK["feet_distance"]].categories[s["codes"][PK["feet_distance"]]] + ".")
    assert len(kinds) >= 6  # the question kinds vary


# ---- pictures ------------------------------------------------------------------------------------------------

def read_png(path):
    """A minimal PNG reader (8-bit RGB, filter 0 rows, as write_png writes): checks every CRC."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind, body = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    W, H, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 2, 0, 0, 0)
    rows = np.frombuffer(zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT")),
                         np.uint8).reshape(H, 1 + 3 * W)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(H, W, 3)


def test_write_png_round_trip(tmp_path):
    """Catches a wrong CRC, row filter byte, width/height order or channel order in the PNG writer."""
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    data.write_png(str(path), rgb)
    assert np.array_equal(read_png(path), rgb)
    data.write_png(str(path), torch.tensor(rgb))  # tensors too, and overwriting
    assert np.array_equal(read_png(path), rgb)
    with pytest.raises(ValueError, match="uint8"):
        data.write_png(str(tmp_path / "y.png"), rgb.astype(np.float32))


def test_render_poses_grid(tmp_path):
    """Catches a wrong grid layout or views left blank in the figure writer."""
    pose, _ = data.sample_poses(5, torch.Generator().manual_seed(2))
    J = joints_of(pose)
    path = tmp_path / "grid.png"
    canvas = data.render_poses(J, str(path),
                               views=("front", "side"),
                               titles=[f"step {i}" for i in range(5)],
                               size=48,
                               cols=3)
    img = read_png(path)
    assert img.shape == (2 * 48, 3 * 2 * 48, 3)
    assert np.array_equal(img, canvas.permute(1, 2, 0).numpy())
    palette = data.SEGMENT_COLOURS.numpy()
    for i in range(5):
        r, c = divmod(i, 3)
        for v in range(2):
            panel = img[r * 48:(r + 1) * 48, (c * 2 + v) * 48:(c * 2 + v + 1) * 48].reshape(-1, 3)
            assert (panel[:, None] == palette[None]).all(-1).any(-1).sum() > 30  # a skeleton is drawn
    last = img[48:, 2 * 2 * 48:].reshape(-1, 3)  # the sixth cell is empty
    assert not (last[:, None] == palette[None]).all(-1).any()
    data.render_poses([J[0], J[1]], str(tmp_path / "list.png"), views=("front", "side", "top"), size=32)
    assert read_png(tmp_path / "list.png").shape == (32, 2 * 3 * 32, 3)
