"""eval.py beyond the metric functions: `evaluate` on PoseWorld, the real-data image-to-pose path, and
the before/after table."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as E
import model as M
import rewards
import smpl
from test_data_formats import threedpw_sequence, write_threedpw


class ExactEmbedder:
    """A text embedder for tests: identical texts get identical unit vectors, different texts differ."""

    def embed(self, texts):
        g = [torch.Generator().manual_seed(abs(hash(t)) % (2 ** 31)) for t in texts]
        return torch.nn.functional.normalize(torch.stack([torch.randn(16, generator=x) for x in g]), dim=-1)


@pytest.fixture(scope="module")
def world():
    return data.PoseWorld("test", size=96, seed=3, cache_dir=None)


@pytest.fixture(scope="module")
def tokenizer(world):
    return M.Tokenizer.train_bpe(list(world.questions) + list(world.answers) + [data.LLAVA_SYSTEM], 400)


def test_evaluate_scores_an_oracle_perfectly(world, tokenizer, monkeypatch):
    """A policy that answers with the reference text and the ground-truth pose must get 0 mm, 100%
    posecode accuracy, 100% format and exact VQA; the rest pose must not. Catches comparing poses in
    different frames (camera vs body), joints from the wrong body model, the wrong samples' ground
    truth, or a format/VQA rate computed over the wrong rows."""
    retriever = rewards.PoseTextRetriever(rewards.RetrieverConfig(vocab_size=tokenizer.vocab_size,
                                          tokenizer_fingerprint=rewards.tokenizer_fingerprint(tokenizer)), tokenizer)
    oracle = {"on": True}

    def answers(policy, samples, tok, device, max_new_tokens=32):
        pose = torch.stack([s["pose"] for s in samples])  # (n, 24, 3) camera frame for i2p, as the policy sees it
        mu = smpl.matrix_to_rot6d(smpl.axis_angle_to_matrix(pose)).flatten(1)  # (n, 144)
        if not oracle["on"]:
            mu = torch.tensor([1.0, 0, 0, 0, 1, 0]).repeat(len(samples), 24)  # the rest pose
        return [s["answer"] for s in samples], mu, torch.ones(len(samples), dtype=torch.bool)

    monkeypatch.setattr(E, "_mean_poses", answers)
    r = E.evaluate(None, tokenizer, world, smpl.SMPL(), {"eval": retriever}, ExactEmbedder(), progress=False)
    assert r["n"] == 96 and r["i2p_n"] + r["t2p_n"] + r["vqa_n"] == 96
    assert r["i2p_mpjpe_mm"] < 1e-3 and r["i2p_pa_mpjpe_mm"] < 1e-3
    assert r["t2p_posecode_acc"] == pytest.approx(100.0)
    assert r["format_rate"] == 100.0 and r["vqa_exact"] == 100.0 and r["vqa_text_sim"] == pytest.approx(100.0)
    assert {"t2p_full_eval_t2p@5", "t2p_full_eval_p2t@20"} <= set(r)
    oracle["on"] = False
    r = E.evaluate(None, tokenizer, world, smpl.SMPL(), {"eval": retriever}, ExactEmbedder(), progress=False)
    assert r["i2p_mpjpe_mm"] > 50 and r["t2p_posecode_acc"] < 95


def _write_frames(root, T=5, size=(1000, 1000)):
    folder = os.path.join(root, "imageFiles", "courtyard_fixture_00")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for t in range(T):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"image_{t:05d}.jpg"))


def _random_smpl_npz(path, seed=0):
    """A random model file in the official .npz layout (the numbers do not matter here, the path does)."""
    rng = np.random.default_rng(seed)
    V = 6890
    J = rng.random((24, V)) * (rng.random((24, V)) < 0.01)
    W = rng.random((V, 24)) ** 4
    np.savez(path, v_template=rng.normal(size=(V, 3)) * 0.3, shapedirs=rng.normal(size=(V, 3, 10)) * 0.02,
             posedirs=rng.normal(size=(V, 3, 207)) * 0.02, J_regressor=J / J.sum(1, keepdims=True),
             weights=W / W.sum(1, keepdims=True), f=rng.integers(0, V, (13776, 3)).astype(np.uint32),
             kintree_table=np.stack([np.array([4294967295] + smpl.PARENTS[1:]), np.arange(24)]).astype(np.uint32))


def test_real_image_to_pose_on_a_3dpw_fixture(tmp_path, tokenizer):
    """The 3DPW test path end to end: Python-2 pickles, JPEG frames decoded and cropped, both encoders'
    preprocessing, the policy, then MPJPE / PA-MPJPE under both protocols: 24 SMPL joints with the
    built-in skeleton, 14 LSP joints through an official-layout SMPL mesh and an H3.6M regressor."""
    root, _ = write_threedpw(tmp_path, threedpw_sequence())
    _write_frames(root)
    dataset = data.ThreeDPW(root, "test", images=True)
    policy = M.PoseLLaVA.from_preset("tiny", tokenizer=tokenizer).eval()
    r = E.evaluate_real_i2p(policy, tokenizer, dataset, smpl.SMPL(), "3dpw", progress=False)
    assert r["3dpw_n"] == 6 and "24 SMPL joints" in r["3dpw_protocol"] and "APPROXIMATE" in r["3dpw_protocol"]
    assert "3dpw_mpjpe_mm" not in r  # never under the published protocol's key
    assert np.isfinite(r["3dpw_approx_mpjpe_mm"]) and 0 < r["3dpw_approx_pa_mpjpe_mm"] <= r["3dpw_approx_mpjpe_mm"] + 1e-6
    _random_smpl_npz(tmp_path / "SMPL_NEUTRAL.npz")
    reg = np.random.default_rng(1).random((17, 6890))
    np.save(tmp_path / "J_regressor_h36m.npy", reg / reg.sum(1, keepdims=True))
    body = smpl.SMPL.from_file(str(tmp_path / "SMPL_NEUTRAL.npz"),
                               extra_regressors={"h36m": str(tmp_path / "J_regressor_h36m.npy")})
    r = E.evaluate_real_i2p(policy, tokenizer, dataset, body, "3dpw", progress=False)
    assert "14 LSP joints" in r["3dpw_protocol"] and np.isfinite(r["3dpw_approx_mpjpe_mm"])
    assert "APPROXIMATE" in r["3dpw_protocol"] and "3dpw_mpjpe_mm" not in r  # no gendered models given
    with pytest.raises(SystemExit, match="J_regressor_h36m"):
        E.evaluate_real_i2p(policy, tokenizer, dataset, smpl.SMPL(), "h36m", progress=False)


def _fixed_prediction(monkeypatch, seed=5):
    """eval._mean_poses replaced by a fixed random pose per sample (rot6d), so the expected errors can be
    computed by hand from the same meshes."""
    def answers(policy, samples, tok, device, max_new_tokens=32):
        g = torch.Generator().manual_seed(seed)
        aa = 0.4 * torch.randn(len(samples), 24, 3, generator=g)  # (n, 24, 3)
        mu = smpl.matrix_to_rot6d(smpl.axis_angle_to_matrix(aa)).flatten(1)  # (n, 144)
        return ["x"] * len(samples), mu, torch.ones(len(samples), dtype=torch.bool)
    monkeypatch.setattr(E, "_mean_poses", answers)
    return answers


def _lsp14_by_hand(j17):
    """SPIN eval.py, run_evaluation: keypoints[:, H36M_TO_J14] - keypoints[:, [0]] (the H3.6M pelvis)."""
    return j17[:, [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]] - j17[:, [0]]


def test_3dpw_ground_truth_is_gendered_and_pelvis_aligned(tmp_path, tokenizer, monkeypatch):
    """The published 3DPW protocol (SPIN eval.py): the prediction through the neutral SMPL with betas 0, each
    actor's ground truth through the MALE or FEMALE model with its betas, both skeletons centred on the
    H3.6M-regressor pelvis (joint 0, not one of the 14). The expected MPJPE is computed here by hand from
    the same meshes. Catches ground truth through the neutral model, genders swapped, and the mid-hip
    re-alignment of the 14 joints; and the published keys must appear only with the gendered models."""
    root, _ = write_threedpw(tmp_path, threedpw_sequence())
    dataset = data.ThreeDPW(root, "test")  # actor 0 is 'm', actor 1 'f'
    answers = _fixed_prediction(monkeypatch)
    rng = np.random.default_rng(1)
    reg = rng.random((17, 6890)) * (rng.random((17, 6890)) < 0.01)  # sparse, as the real one: joints differ
    np.save(tmp_path / "h36m.npy", reg / reg.sum(1, keepdims=True))
    regs = {"h36m": str(tmp_path / "h36m.npy")}
    models = {}
    for seed, name in ((0, "neutral"), (1, "m"), (2, "f")):
        _random_smpl_npz(tmp_path / f"{name}.npz", seed=seed)
        models[name] = smpl.SMPL.from_file(str(tmp_path / f"{name}.npz"), extra_regressors=regs).double()
    samples = [dataset[i] for i in range(len(dataset))]
    _, mu, _ = answers(None, samples, None, "cpu")
    R = smpl.rot6d_to_matrix(mu.view(-1, 24, 6)).double()  # (n, 24, 3, 3)
    pred = _lsp14_by_hand(models["neutral"](R[:, 1:], R[:, 0]).extra["h36m"])  # (n, 14, 3)
    gt = torch.stack([_lsp14_by_hand(models[s["gender"]](s["pose"][None, 1:].double(), s["pose"][None, 0].double(),
                                                          betas=s["betas"][None].double()).extra["h36m"])[0]
                      for s in samples])  # (n, 14, 3)
    expected = 1000 * (pred - gt).norm(dim=-1).mean().item()
    expected_pa = 1000 * E.pa_mpjpe(pred, gt).mean().item()
    single = {k: smpl.SMPL.from_file(str(tmp_path / f"{k}.npz"), extra_regressors=regs) for k in ("neutral", "m", "f")}
    r = E.evaluate_real_i2p(torch.nn.Module(), tokenizer, dataset, single["neutral"], "3dpw", progress=False,
                            gt_body_models={"m": single["m"], "f": single["f"]})
    assert "SPIN / HMR2.0 protocol" in r["3dpw_protocol"] and "3dpw_approx_mpjpe_mm" not in r
    assert r["3dpw_mpjpe_mm"] == pytest.approx(expected, rel=1e-4)
    assert r["3dpw_pa_mpjpe_mm"] == pytest.approx(expected_pa, rel=1e-4)
    # without the gendered models: another number, and only under the APPROXIMATE keys
    r = E.evaluate_real_i2p(torch.nn.Module(), tokenizer, dataset, single["neutral"], "3dpw", progress=False)
    assert "3dpw_mpjpe_mm" not in r and abs(r["3dpw_approx_mpjpe_mm"] - expected) > 1.0
    with pytest.raises(ValueError, match="gt_body_models"):
        E.evaluate_real_i2p(torch.nn.Module(), tokenizer, dataset, single["neutral"], "3dpw", progress=False,
                            gt_body_models={"m": single["m"]})


def test_human36m_errors_align_on_the_h36m_pelvis(tmp_path, tokenizer, monkeypatch):
    """Human3.6M (SPIN eval.py; HMR2.0's Evaluator, pelvis_ind): the prediction's 14 joints minus ITS H3.6M
    pelvis against the file's 14 joints minus the file's pelvis. The file here holds the prediction's own
    14 joints centred on their mid-hip instead: with the published alignment every joint is off by
    (mid-hip - pelvis) of the prediction, computed by hand; a mid-hip re-alignment would report 0."""
    _random_smpl_npz(tmp_path / "neutral.npz")
    reg = np.random.default_rng(1).random((17, 6890))
    np.save(tmp_path / "h36m.npy", reg / reg.sum(1, keepdims=True))
    body = smpl.SMPL.from_file(str(tmp_path / "neutral.npz"), extra_regressors={"h36m": str(tmp_path / "h36m.npy")})
    answers = _fixed_prediction(monkeypatch)
    N = 3
    _, mu, _ = answers(None, [None] * N, None, "cpu")
    R = smpl.rot6d_to_matrix(mu.view(-1, 24, 6))  # (N, 24, 3, 3)
    j17 = body(R[:, 1:], R[:, 0]).extra["h36m"]  # (N, 17, 3)
    j14 = j17[:, [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]]  # (N, 14, 3)
    mid_hip = j14[:, [2, 3]].mean(1, keepdim=True)  # (N, 1, 3)
    S = np.zeros((N, 24, 4))
    S[:, data.H36M_J14, :3] = (j14 - mid_hip).numpy()
    np.savez(tmp_path / "h36m.npz", imgname=np.array([f"{i}.jpg" for i in range(N)]), center=np.zeros((N, 2)),
             scale=np.ones(N), S=S)
    r = E.evaluate_real_i2p(torch.nn.Module(), tokenizer, data.Human36M(str(tmp_path / "h36m.npz"), "."), body, "h36m",
                            progress=False)
    expected = 1000 * (mid_hip - j17[:, [0]]).norm(dim=-1).mean().item()
    assert expected > 1.0 and r["h36m_mpjpe_mm"] == pytest.approx(expected, rel=1e-4)
    assert r["h36m_pa_mpjpe_mm"] < 1e-3 and "H3.6M-pelvis aligned" in r["h36m_protocol"]


def test_comparison_table_is_honest():
    """A regression must read as one: lower-is-better errors that rise are 'worse', recalls that fall
    are 'worse', mixed recalls are 'mixed'; the answers' spread is only 'lower' or 'higher'."""
    before = {"i2p_mpjpe_mm": 100.0, "t2p_posecode_acc": 60.0, "i2p_spread_mm": 120.0,
              **{f"t2p_full_eval_{d}@{k}": 10.0 for d in ("t2p", "p2t") for k in (5, 10, 20)}}
    after = dict(before, i2p_mpjpe_mm=110.0, t2p_posecode_acc=70.0, i2p_spread_mm=110.0, **{"t2p_full_eval_t2p@5": 5.0,
                                                                       "t2p_full_eval_t2p@10": 12.0})
    table = E.format_comparison(before, after)
    row = lambda label: next(line for line in table.splitlines() if line.startswith(f"| {label}"))  # noqa: E731
    assert row("Image-to-pose MPJPE").endswith("(worse) |")
    assert row("Text-to-pose posecode").endswith("(better) |")
    assert row("Image-to-pose answers' spread").endswith("(lower) |")  # neither better nor worse
    assert row("Text-to-pose R^T2P @5/10/20, full retrieval, eval").endswith("(mixed) |")
    assert row("Text-to-pose R^P2T @5/10/20, full retrieval, eval").endswith("(same) |")


def test_evaluate_refuses_a_model_with_nonfinite_weights(world, tokenizer):
    """A diverged model (NaN weights) must be an error naming the tensors, not a table: its NaN poses fail
    the format check and become the rest pose, so it used to score like a weak but healthy model."""
    policy = M.PoseLLaVA.from_preset("tiny", tokenizer=tokenizer)
    with torch.no_grad():
        policy.pose_head.to_mu.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite .*pose_head"):
        E.evaluate(policy, tokenizer, world, smpl.SMPL(), {}, ExactEmbedder(), limit=6, progress=False)


def test_evaluate_reports_mean_pose_baselines_and_per_item_values(world, tokenizer, monkeypatch):
    """The trivial baselines are the scores of always answering the average training pose, and the
    per-item values let two evaluations be paired. Catches a baseline computed from the test poses or
    from one task's poses for the other, per-item lists that do not average to the reported metric,
    and a policy that answers the average pose scoring differently from the baseline."""
    train = data.PoseWorld("train", size=300, seed=3, cache_dir=None)
    poses = {task: train.poses[train.task_indices(task)] for task in ("i2p", "t2p")}
    avg = {task: E.mean_pose(p) for task, p in poses.items()}  # (144,) each

    def answers(policy, samples, tok, device, max_new_tokens=32):  # always the average pose of its task
        mu = torch.stack([avg["i2p" if s["task"] == "i2p" else "t2p"] for s in samples])  # (n, 144)
        return [s["answer"] for s in samples], mu, torch.ones(len(samples), dtype=torch.bool)

    monkeypatch.setattr(E, "_mean_poses", answers)
    retriever = rewards.PoseTextRetriever(rewards.RetrieverConfig(vocab_size=tokenizer.vocab_size,
                                          tokenizer_fingerprint=rewards.tokenizer_fingerprint(tokenizer)), tokenizer)
    r = E.evaluate(None, tokenizer, world, smpl.SMPL(), {"eval": retriever}, ExactEmbedder(), progress=False,
                   baseline_poses=poses)
    assert r["i2p_mean_pose_mpjpe_mm"] == pytest.approx(r["i2p_mpjpe_mm"], rel=1e-5)
    assert r["t2p_mean_pose_posecode_acc"] == pytest.approx(r["t2p_posecode_acc"], rel=1e-5)
    assert 100 < r["i2p_mean_pose_mpjpe_mm"] < 400  # a constant answer is far off, but not absurd
    assert r["i2p_spread_mm"] < 1e-3 < 10 < r["i2p_gt_spread_mm"]  # one answer for every image: no spread
    items = r["items"]
    assert len(items["i2p_mpjpe_mm"]) == r["i2p_n"] and len(items["t2p_posecode_acc"]) == r["t2p_n"]
    for key in ("i2p_mpjpe_mm", "t2p_posecode_acc", "t2p_full_eval_t2p@10", "vqa_text_sim"):
        assert sum(items[key]) / len(items[key]) == pytest.approx(r[key])
    swapped = dict(poses, i2p=poses["t2p"])  # body-frame poses as the camera-frame baseline: must differ
    r2 = E.evaluate(None, tokenizer, world, smpl.SMPL(), {"eval": retriever}, ExactEmbedder(), progress=False,
                    baseline_poses=swapped)
    assert abs(r2["i2p_mean_pose_mpjpe_mm"] - r["i2p_mean_pose_mpjpe_mm"]) > 1


def test_spread_by_hand():
    """spread: each pose's pelvis-aligned MPJPE against the set's mean. Two poses that differ only in joint
    5, by 0.1 m, each lie 0.05 m from the mean at that joint: 0.05 / 24 each. A shift of a whole pose (the
    pelvis with it) changes nothing; one pose, or identical poses, have spread 0."""
    a = torch.randn(24, 3)
    b = a.clone()
    b[5, 0] += 0.1
    torch.testing.assert_close(E.spread(torch.stack([a, b])), torch.full((2,), 0.05 / 24))
    torch.testing.assert_close(E.spread(torch.stack([a, b + 3.0])), torch.full((2,), 0.05 / 24))
    assert E.spread(torch.stack([a, a, a])).abs().max() < 1e-6 and E.spread(a[None]).item() == 0


def test_mean_pose_is_the_rotation_average():
    """mean_pose of identical poses is that pose; of a turn about z and its inverse (per joint), the
    identity. Catches averaging axis-angle vectors of another parametrisation or dropping the
    Gram-Schmidt step (a non-rotation)."""
    g = torch.Generator().manual_seed(0)
    p = 0.5 * torch.randn(1, 24, 3, generator=g)
    six = E.mean_pose(p.expand(5, 24, 3))
    assert torch.allclose(smpl.rot6d_to_matrix(six.view(24, 6)), smpl.axis_angle_to_matrix(p[0]), atol=1e-5)
    about_z = p * torch.tensor([0.0, 0.0, 1.0])  # (1, 24, 3) each joint turned about z by its own angle
    both = E.mean_pose(torch.cat([about_z, -about_z]))  # mean of R_z(a), R_z(-a): diag(cos a, cos a, 1)
    assert torch.allclose(both, smpl.matrix_to_rot6d(torch.eye(3).expand(24, 3, 3)).flatten(), atol=1e-5)


def test_comparison_table_gives_paired_standard_errors():
    """With per-item values, each change carries its paired standard error, and a change within twice
    that error reads "within noise", not better or worse. Catches an unpaired error and a verdict that
    ignores the noise."""
    before = {"t2p_posecode_acc": 50.0, "i2p_mpjpe_mm": 100.0,
              "items": {"t2p_posecode_acc": [40.0, 50.0, 60.0, 50.0], "i2p_mpjpe_mm": [90.0, 110.0, 95.0, 105.0]}}
    after = {"t2p_posecode_acc": 51.0, "i2p_mpjpe_mm": 90.0,
             "items": {"t2p_posecode_acc": [40.0, 54.0, 60.0, 50.0], "i2p_mpjpe_mm": [80.0, 100.0, 85.0, 95.0]}}
    table = E.format_comparison(before, after)
    row = lambda label: next(line for line in table.splitlines() if line.startswith(f"| {label}"))  # noqa: E731
    assert "+1.0 (1.0) (within noise)" in row("Text-to-pose posecode")  # differences 0, 4, 0, 0: s.e. 1
    assert "-10.0 (0.0) (better)" in row("Image-to-pose MPJPE")


def test_paper_tables_by_hand(tmp_path):
    """`python eval.py --table=3|6`: each row's mean over seeds (s.e.), the change from the row above as the
    mean (s.e.) of per-seed differences, * beyond twice its s.e.; mRecall is the mean of R@5/10/20 of the
    sampled protocol, eval retriever. Checked by hand. Catches an unpaired difference, the wrong recall
    keys, and rows of different seed counts."""
    import json

    def write(name, mpjpe, recalls):
        r = {"i2p_mpjpe_mm": mpjpe, "i2p_pa_mpjpe_mm": 100.0, "t2p_posecode_acc": 50.0}
        for k, v in zip((5, 10, 20), recalls):
            r[f"t2p_sampled_eval_t2p@{k}"] = v
            r[f"t2p_sampled_eval_p2t@{k}"] = v
        path = tmp_path / f"{name}.json"
        json.dump(r, open(path, "w"))
        return str(path)
    det = [write(f"det{s}", m, (10.0, 20.0, 30.0)) for s, m in enumerate((200.0, 210.0, 190.0))]
    rft = [write(f"rft{s}", m, (13.0, 23.0, 33.0)) for s, m in enumerate((199.0, 206.0, 192.0))]
    table = E.main(["--table=3", "Baseline=" + ",".join(det), "RFT=" + ",".join(rft)])
    base = next(line for line in table.splitlines() if line.startswith("| Baseline"))
    after = next(line for line in table.splitlines() if line.startswith("| RFT"))
    assert "| 200.0 (5.8) |" in base and "| 20.0 (0.0) |" in base  # s.e. of 200, 210, 190 = 10 / sqrt(3)
    # MPJPE differences -1, -4, +2: mean -1, s.e. sqrt(9 / 3) = 1.7; mRecall +3 on every seed: s.e. 0, marked
    assert "199.0 (4.0), -1.0 (1.7) |" in after and "23.0 (0.0), +3.0 (0.0)*" in after
    with pytest.raises(SystemExit, match="same seeds"):
        E.main(["--table=3", "a=" + ",".join(det), "b=" + rft[0]])
    with pytest.raises(SystemExit, match="tables are"):
        E.main(["--table=4", "a=" + det[0]])


def test_compare_runs_aggregates_seeds(tmp_path):
    """`python eval.py --compare` gives each seed's paired gain, the mean gain over seeds with its
    standard error, and with two groups the per-seed difference of gains. Checked by hand."""
    import json

    def run(name, gain):
        folder = tmp_path / name
        folder.mkdir()
        b = {"t2p_posecode_acc": 60.0, "items": {"t2p_posecode_acc": [60.0, 60.0]}}
        a = {"t2p_posecode_acc": 60.0 + gain, "items": {"t2p_posecode_acc": [60.0 + gain, 60.0 + gain]}}
        json.dump(b, open(folder / "eval_before.json", "w"))
        json.dump(a, open(folder / "eval_after.json", "w"))
        return str(folder)
    hy = [run(f"hy{s}", g) for s, g in enumerate((3.0, 5.0, 4.0))]
    gr = [run(f"gr{s}", g) for s, g in enumerate((1.0, 1.0, 1.0))]
    table = E.main(["--compare", "hygrpo=" + ",".join(hy), "grpo=" + ",".join(gr)])
    row = next(line for line in table.splitlines() if line.startswith("| posecode"))
    assert "60.00 -> 64.00, +4.00 (0.58) [+3.00 (0.00), +5.00 (0.00), +4.00 (0.00)]" in row  # s.e. = 1/sqrt(3)
    assert row.rstrip(" |").endswith("-3.00 (0.58)")  # grpo - hygrpo gains: -2, -4, -3
    with pytest.raises(SystemExit, match="eval_before.json"):
        E.main(["--compare", f"x={tmp_path}"])


def test_posecode_families_by_hand():
    """Two samples whose captions mention the left elbow and the left knee: the rest pose (elbow straight)
    and the same pose with the left elbow turned 90 degrees (bent at a right angle), both against the
    rest pose's codes, the second with its knee code set to "completely bent". Expected by hand: sample
    0 satisfies both, sample 1 neither; the arms region holds the elbow, the legs region the knee, the
    torso region nothing; an unmentioned family that holds counts nowhere. Catches counting unmentioned
    codes, a wrong region map, and rows that do not add up to check_posecodes."""
    pose = torch.zeros(2, 24, 3)
    pose[1, data.J_["left_elbow"]] = torch.tensor([0.0, torch.pi / 2, 0.0])
    joints = smpl.pose_joints(pose)  # (2, 24, 3)
    elbow, knee = data.POSECODE_INDEX["left_elbow"], data.POSECODE_INDEX["left_knee"]
    codes = data.posecodes(joints[:1]).expand(2, -1).clone()  # (2, K) the rest pose's codes
    assert codes[0, elbow] == 3 and data.posecodes(joints)[1, elbow] == 1  # straight; bent at a right angle
    codes[1, knee] = 0  # "completely bent": the straight knee fails it
    mentioned = torch.zeros(2, data.K, dtype=torch.bool)
    mentioned[:, [elbow, knee]] = True
    hits, mentions = E.posecode_families(joints, codes, mentioned)  # (2, K + 3) each
    col = {key.split("/")[1]: c for c, (key, _) in enumerate(E.POSECODE_GROUPS)}
    assert hits.shape == mentions.shape == (2, data.K + 3)
    assert hits[:, col["left_elbow"]].tolist() == [1, 0] and hits[:, col["left_knee"]].tolist() == [1, 0]
    assert mentions[:, col["left_elbow"]].tolist() == [1, 1] and mentions[:, col["right_elbow"]].tolist() == [0, 0]
    assert hits[:, col["right_elbow"]].tolist() == [0, 0]  # holds (straight) but is not mentioned
    assert hits[:, col["arms_and_hands"]].tolist() == [1, 0] and mentions[:, col["arms_and_hands"]].tolist() == [1, 1]
    assert hits[:, col["legs_and_feet"]].tolist() == [1, 0] and mentions[:, col["legs_and_feet"]].tolist() == [1, 1]
    assert mentions[:, col["torso_and_head"]].tolist() == [0, 0]
    share = hits[:, :data.K].sum(1) / mentions[:, :data.K].sum(1)  # (2,)
    torch.testing.assert_close(share, data.check_posecodes(joints, codes, mentioned))
    assert set(data.POSECODE_REGION) == {f.name for f in data.POSECODES}
    assert data.POSECODE_REGION["hips_height"] == "legs_and_feet"
    assert data.POSECODE_REGION["head_pitch"] == "torso_and_head"


def test_evaluate_reports_posecode_families_and_informative_mentions(world, tokenizer, monkeypatch):
    """A policy that answers the ground truth on even test items and the average training pose on odd
    ones. Per family and region, its accuracy, the average pose's, the informative mentions (those the
    average pose fails) and its accuracy on them must equal what this test counts directly from the
    codes. Catches informative mentions taken from the model's misses instead of the average pose's, a
    per-item mean instead of the pooled share, regions that are not the sum of their families, and
    per-item lists that do not average to the reported value."""
    train = data.PoseWorld("train", size=300, seed=3, cache_dir=None)
    poses = {task: train.poses[train.task_indices(task)] for task in ("i2p", "t2p")}
    avg = {task: E.mean_pose(p) for task, p in poses.items()}  # (144,) each

    def answers(policy, samples, tok, device, max_new_tokens=32):  # one batch: j is the test index
        mu = [smpl.matrix_to_rot6d(smpl.axis_angle_to_matrix(s["pose"])).flatten() if j % 2 == 0
              else avg["i2p" if s["task"] == "i2p" else "t2p"] for j, s in enumerate(samples)]
        return [s["answer"] for s in samples], torch.stack(mu), torch.ones(len(samples), dtype=torch.bool)

    monkeypatch.setattr(E, "_mean_poses", answers)
    r = E.evaluate(None, tokenizer, world, smpl.SMPL(), {}, ExactEmbedder(), progress=False, batch_size=len(world),
                   baseline_poses=poses)
    t2p = [i for i in range(len(world)) if data.TASKS[int(world.task_id[i])] == "t2p"]
    oracle = torch.tensor([i % 2 == 0 for i in t2p])[:, None]  # (m, 1)
    mentioned, codes = world.mentioned[t2p], world.codes[t2p]  # (m, K) each
    base_ok = data.posecodes(smpl.pose_joints(avg["t2p"][None])) == codes  # (m, K) the average pose's codes
    groups = {f.name: [k] for k, f in enumerate(data.POSECODES)}
    groups.update({reg: [k for k, f in enumerate(data.POSECODES) if data.POSECODE_REGION[f.name] == reg]
                   for reg in data.BODY_REGIONS})
    checked = 0
    for key, _ in E.POSECODE_GROUPS:
        m, info = mentioned[:, groups[key.split("/")[1]]], (mentioned & ~base_ok)[:, groups[key.split("/")[1]]]
        ok, b_ok, o = (oracle | base_ok)[:, groups[key.split("/")[1]]], base_ok[:, groups[key.split("/")[1]]], oracle
        assert r[f"{key}/n"] == int(m.sum()) and r[f"{key}/informative_n"] == int(info.sum())
        if m.sum() == 0:
            assert r[f"{key}/acc"] != r[f"{key}/acc"]  # nan: nothing to score
            continue
        assert r[f"{key}/acc"] == pytest.approx(100 * (m & ok).sum().item() / m.sum().item())
        assert r[f"{key}/mean_pose_acc"] == pytest.approx(100 * (m & b_ok).sum().item() / m.sum().item())
        for name in ("acc", "informative_acc"):
            values = r["items"][f"{key}/{name}"]
            assert len(values) == 0 or sum(values) / len(values) == pytest.approx(r[f"{key}/{name}"])
        if info.sum():
            assert r[f"{key}/informative_acc"] == pytest.approx(100 * (info & o).sum().item() / info.sum().item())
            checked += 1
    assert checked >= 5  # enough groups with informative mentions to mean something
    assert sum(r[f"t2p_family/{f.name}/n"] for f in data.POSECODES) == int(mentioned.sum())


def _family_results(acc_items, info_items, mean_pose_acc=25.0):
    """An evaluation's posecode keys for the left elbow and the arms region, with these per-item values."""
    r = {"t2p_posecode_acc": 50.0, "items": {"t2p_posecode_acc": [50.0, 50.0]}}
    for key in ("t2p_family/left_elbow", "t2p_region/arms_and_hands"):
        r.update({f"{key}/n": len(acc_items), f"{key}/mean_pose_acc": mean_pose_acc,
                  f"{key}/acc": sum(acc_items) / len(acc_items), f"{key}/informative_n": len(info_items),
                  f"{key}/informative_acc": sum(info_items) / len(info_items)})
        r["items"].update({f"{key}/acc": acc_items, f"{key}/informative_acc": info_items})
    return r


def test_comparison_table_shows_posecode_families():
    """format_comparison adds one line per family and region below the existing table: mentions, the
    average pose's accuracy, before, after, the change with its paired s.e. (by hand: differences 0, 100,
    0, 0 have mean 25 and s.e. 25), and the same for the informative mentions; a single evaluation gets
    the short form; results without these keys get no block. Catches an unpaired error, the columns
    out of order, and old results breaking the table."""
    before = _family_results([100.0, 0.0, 100.0, 0.0], [0.0, 100.0, 0.0])
    after = _family_results([100.0, 100.0, 100.0, 0.0], [100.0, 100.0, 0.0])
    table = E.format_comparison(before, after)
    lines = table.splitlines()
    assert lines.index("| left elbow | 4 | 25.0 | 50.0 | 75.0 | +25.0 (25.0) | 3 | 33.3 | 66.7 | +33.3 (33.3) |") > \
        next(i for i, line in enumerate(lines) if line.startswith("| Text-to-pose posecode accuracy"))
    assert "| **arms and hands** | 4 | 25.0 | 50.0 | 75.0 |" in table
    assert "| left elbow | 4 | 25.0 | 50.0 | 3 | 33.3 |" in E.format_comparison(before)
    old = {"t2p_posecode_acc": 50.0}
    assert "family / region" not in E.format_comparison(old, dict(old, t2p_posecode_acc=60.0))
    assert "Text-to-pose posecode accuracy" in E.format_comparison(old, after)  # mixed old and new: no block
    assert "family / region" not in E.format_comparison(old, after)


def test_compare_runs_gives_family_rows_and_names_what_old_runs_lack(tmp_path):
    """--compare gives per-family and per-region rows (mean over seeds of each seed's paired gain); a
    group whose eval jsons predate them still compares and a line names the rows it lacks; a group of one
    run shows its paired s.e. over the test items instead of nan. Catches a KeyError on old runs, a
    silent gap, and a nan where a standard error exists."""
    import json

    def run(name, before, after):
        folder = tmp_path / name
        folder.mkdir()
        json.dump(before, open(folder / "eval_before.json", "w"))
        json.dump(after, open(folder / "eval_after.json", "w"))
        return str(folder)
    b = _family_results([100.0, 0.0, 100.0, 0.0], [0.0, 100.0, 0.0])
    new = [run("new0", b, _family_results([100.0, 100.0, 100.0, 0.0], [100.0, 100.0, 0.0])),  # +25
           run("new1", b, _family_results([100.0, 100.0, 100.0, 100.0], [100.0, 100.0, 100.0]))]  # +50
    old = {"t2p_posecode_acc": 50.0, "items": {"t2p_posecode_acc": [40.0, 60.0]}}
    old_run = run("old0", old, {"t2p_posecode_acc": 55.0, "items": {"t2p_posecode_acc": [40.0, 70.0]}})
    table = E.main(["--compare", "new=" + ",".join(new), f"old={old_run}"])
    row = lambda label: next(line for line in table.splitlines() if line.startswith(f"| {label}"))  # noqa: E731
    elbow = row("posecode accuracy, left elbow (%; 4 mentions, avg pose 25.0)")
    assert "50.00 -> 87.50, +37.50 (12.50) [+25.00 (25.00), +50.00 (28.87)]" in elbow  # s.e. of 25, 50: 12.5
    assert elbow.endswith("] |  |")  # old has no cell (groups of 1 and 2 runs: no difference of gains)
    # informative gains +33.3 and +66.7: mean 50, s.e. 16.7
    assert "33.33 -> 83.33, +50.00 (16.67)" in row("  informative mentions, left elbow (%; 3)")
    assert row("posecode accuracy, arms and hands")
    note = table.splitlines()[-1]
    assert "old: posecode accuracy per family and per body region" in note and "new: posecode" not in note
    # one run: its paired s.e. over the items (differences 0, 10: s.e. 5), not nan
    assert "50.00 -> 55.00, +5.00 (5.00 over items) [+5.00 (5.00)]" in row("posecode accuracy (%)")
    alone = E.main(["--compare", f"old={old_run}"])
    assert "posecode accuracy, left elbow" not in alone and "per family and per body region" in alone.splitlines()[-1]
