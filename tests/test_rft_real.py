"""RFT on real data end to end (issue 25, item 4): train_sft.py then train_rft.py with the
`llava-1.5-7b` preset on small files in the real formats (the llava-hf folder, HMR2.0 checkpoint and SMPL
file of test_real_preset.py; PoseScript/AMASS, Human3.6M and LLaVA-Instruct in the layouts of
test_data_formats.py). The prompts must come from the real sets in the --task_mix, each reward must get
its real reference, the before/after evaluation must run the real test protocols it is given (and say
which it skipped), and a stopped run must resume exactly. CPU, a few steps: the plumbing, not the learning."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import model as M
import rewards
import smpl
import train_rft
import train_sft
from test_data_formats import h36m_arrays, threedpw_sequence, write_posescript, write_threedpw
from test_eval import _write_frames
from test_real_preset import files, paths  # noqa: F401  (files is a fixture)

N_TRAIN, N_VAL, N_TEST = 24, 4, 36  # PoseScript poses per split; the sampled protocol needs >= 32 test captions
WORDS = ["squats", "raises the left arm", "raises the right arm", "kneels", "leans forward", "kicks",
         "stands straight", "sits down", "bends the knees", "reaches up"]
VQA = [("What is on the table?", "A red cup and a plate of bread."),
       ("How many people are there?", "There are two people walking a dog along a long sandy beach while "
                                      "the sun sets behind the hills and the waves roll in slowly."),
       ("What colour is the bus?", "White and red."),
       ("Where is the cat?", "On the windowsill, next to a plant."),
       ("What is the man holding?", "An umbrella."),
       ("Is it raining?", "No, it is sunny.")]


def _jpeg(path, seed, size=(128, 128)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """PoseScript (train / val / test captions on AMASS sequences), a Human3.6M training file with SMPL fits
    and a test file without (the public protocol file), J_regressor_h36m.npy, LLaVA-Instruct with COCO
    images: the data flags of both scripts."""
    root = tmp_path_factory.mktemp("real_data")
    g = np.random.default_rng(0)
    n = N_TRAIN + N_VAL + N_TEST
    seqs = {"CMU/01/01_01_poses.npz": 0.4 * g.standard_normal((n - 20, 156)),
            "BMLmovi/Subject_1_F_MoSh/Subject_1_F_1_poses.npz": 0.4 * g.standard_normal((20, 156))}
    ps_root, amass = write_posescript(root, seqs)  # the AMASS files; the release's JSON files made larger below
    cmu, bml = list(seqs)
    id_map = {str(i): ["AMASS", cmu, i] if i < n - 20 else ["AMASS", bml, i - (n - 20)] for i in range(n)}
    captions = {str(i): [f"The person {WORDS[i % 10]} and {WORDS[(3 * i + 1) % 10]}."] for i in range(n)}
    for i in range(N_TRAIN):
        captions[str(i)].append(f"Someone {WORDS[(i + 5) % 10]}.")
    release = {"ids_2_dataset_sequence_and_frame_index_100k.json": id_map,
               "train_ids_100k.json": list(range(N_TRAIN)), "val_ids_100k.json": list(range(N_TRAIN, N_TRAIN + N_VAL)),
               "test_ids_100k.json": list(range(N_TRAIN + N_VAL, n)), data.POSESCRIPT_H2: captions}
    for name, content in release.items():
        with open(os.path.join(ps_root, name), "w") as f:
            json.dump(content, f)

    h36m_images = str(root / "h36m")
    train = h36m_arrays(8)
    train.update(center=np.full((8, 2), 64.0), scale=np.full(8, 0.5), pose=0.3 * g.standard_normal((8, 72)),
                 shape=np.zeros((8, 10)), has_smpl=np.ones(8))
    np.savez(root / "h36m_train.npz", **train)
    test = {**h36m_arrays(6), "center": np.full((6, 2), 64.0), "scale": np.full(6, 0.5)}  # no SMPL fits
    np.savez(root / "h36m_valid_protocol2.npz", **test)
    for k, name in enumerate(sorted(set(train["imgname"].tolist()) | set(test["imgname"].tolist()))):
        _jpeg(os.path.join(h36m_images, name), k)
    reg = g.random((17, 6890))
    np.save(root / "J_regressor_h36m.npy", reg / reg.sum(1, keepdims=True))

    coco = str(root / "coco")
    conversations = [{"id": f"{k:012d}", "image": f"{k:012d}.jpg", "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]} for k, (q, a) in enumerate(VQA)]
    for k in range(len(VQA)):
        _jpeg(os.path.join(coco, f"{k:012d}.jpg"), 100 + k)
    with open(root / "llava_instruct_150k.json", "w") as f:
        json.dump(conversations, f)
    flags = ["--data=posescript,h36m,llava_instruct", f"--posescript_root={ps_root}", f"--amass_root={amass}",
             f"--h36m_npz={root / 'h36m_train.npz'}", f"--h36m_images={h36m_images}",
             f"--llava_instruct_json={root / 'llava_instruct_150k.json'}", f"--coco_images={coco}"]
    pw3d_root, _ = write_threedpw(root, threedpw_sequence())
    _write_frames(pw3d_root, size=(400, 400))
    return {"flags": flags, "h36m_test": str(root / "h36m_valid_protocol2.npz"), "pw3d": pw3d_root,
            "regressor": str(root / "J_regressor_h36m.npy"), "posescript": (ps_root, amass), "root": root}


# the evaluation fields train_rft reads with getattr until RFTConfig has them (the lead adds them)
EVAL_FIELDS = ("h36m_test_npz", "h36m_regressor", "pw3d_root", "smpl_male_path", "smpl_female_path")


@pytest.fixture(scope="module")
def sft_dir(files, real_data, tmp_path_factory):  # noqa: F811
    """A few SFT steps of the 7B-shaped preset on the three real sets; its retrievers learn PoseScript's
    train captions."""
    out = tmp_path_factory.mktemp("sft_real")
    train_sft.main(["--preset=llava-1.5-7b", *paths(files), *real_data["flags"], f"--out_dir={out}",
                    "--max_steps=3", "--batch_size=4", "--retriever_steps=3", "--retriever_batch=16",
                    "--warmup_steps=1", "--dtype=float32", "--num_threads=1"])
    return str(out)


def rft_flags(files, real_data, sft_dir, out_dir):  # noqa: F811
    return ["--preset=llava-1.5-7b", *paths(files), *real_data["flags"], f"--sft_dir={sft_dir}",
            f"--out_dir={out_dir}", "--task_mix=t2p:1,i2p:1,vqa:1", "--G=2", "--batch_size=4",
            "--max_new_tokens=10", "--warmup_steps=1", "--pose_samples=1", "--dtype=float32", "--num_threads=1",
            "--save_every=2"]


def test_task_mixture_draws_by_task_deterministically(real_data):
    """Catches a mix that maps weights to the wrong sets, is not exact, differs between two builds with one
    seed (a resumed run would see other prompts), or accepts PoseWorld (which mixes its tasks itself)."""
    ps_root, amass = real_data["posescript"]
    root = real_data["root"]
    sets = [data.PoseScript(ps_root, amass, "train"), data.LLaVAInstruct(str(root / "llava_instruct_150k.json"), "."),
            data.Human36M(str(root / "h36m_train.npz"), ".")]
    mix = data.TaskMixture(sets, (6.0, 2.0, 1.0), size=90, seed=3)
    assert mix.counts == {"t2p": 60, "i2p": 20, "vqa": 10} and len(mix) == 90
    tasks = [mix[i]["task"] for i in range(len(mix))]
    assert tasks.count("t2p") == 60 and tasks.count("i2p") == 20 and tasks.count("vqa") == 10
    assert torch.equal(mix.index, data.TaskMixture(sets, (6.0, 2.0, 1.0), size=90, seed=3).index)
    t2p_items = mix.index[mix.index[:, 0] == 0, 1]  # 60 draws of 48 captions: every caption once, then 12 again
    assert len(set(t2p_items[:48].tolist())) == 48
    no_vqa = data.TaskMixture(sets, (1.0, 1.0, 0.0), seed=0)
    assert no_vqa.counts == {"t2p": 28, "i2p": 28} and all(not isinstance(s, data.LLaVAInstruct) for s in no_vqa.sets)
    once = data.TaskMixture(sets, (48.0, 8.0, 6.0))  # train_rft's empty --task_mix: weights = the sets' sizes
    assert sorted(map(tuple, once.index.tolist())) == [(k, j) for k, ds in enumerate(sets) for j in range(len(ds))]
    with pytest.raises(ValueError, match="no given data set has"):
        data.TaskMixture(sets[:1], (1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="PoseWorld mixes its tasks itself"):
        data.TaskMixture([data.PoseWorld("val", size=10, cache_dir=None)], (1.0, 1.0, 1.0))
    # resumable: the stream from step k is the uninterrupted stream's from step k
    whole = iter(data.make_loader(mix, 4, seed=1))
    batches = [next(whole) for _ in range(30)]  # more than an epoch (22 steps)
    resumed = iter(data.make_loader(mix, 4, seed=1, start_step=25))
    assert [s["question"] for s in next(resumed)] == [s["question"] for s in batches[25]]


@pytest.mark.slow
def test_rft_on_real_data_end_to_end(files, real_data, sft_dir, tmp_path, monkeypatch):  # noqa: F811
    """Catches RFT prompts that do not come from the real sets in the mix, a reward given a wrong or empty
    reference (the PoseScript caption, the Human3.6M SMPL fit's joints, the LLaVA answer), a before/after
    evaluation that is still PoseWorld's or does not say what it skipped, and a gallery without real captions."""
    seen = []
    compute = rewards.compute_rewards

    def recording(c, ctx, weights):
        seen.append(c)
        return compute(c, ctx, weights)
    monkeypatch.setattr(rewards, "compute_rewards", recording)
    out = tmp_path / "rft"
    train_rft.main(rft_flags(files, real_data, sft_dir, out) + [
        "--max_steps=3", "--gallery_every=3", f"--h36m_test_npz={real_data['h36m_test']}",
        f"--h36m_regressor={real_data['regressor']}", f"--pw3d_root={real_data['pw3d']}"])

    def joined(name):  # one field of every step's candidates, in order
        parts = [getattr(s, name) for s in seen]
        return [x for part in parts for x in part] if isinstance(parts[0], list) else torch.cat(parts)
    c = rewards.Candidates(**{f.name: joined(f.name) for f in dataclasses.fields(rewards.Candidates)
                              if getattr(seen[0], f.name) is not None})
    assert {"t2p", "i2p", "vqa"} <= set(c.task), c.task
    ps_root, amass = real_data["posescript"]
    train_captions = {data.PoseScript(ps_root, amass, "train")[i]["caption"] for i in range(48)}
    t2p = [i for i, t in enumerate(c.task) if t == "t2p"]
    assert all(c.caption[i] in train_captions and c.caption[i] in c.question[i] for i in t2p)
    i2p = torch.tensor([t == "i2p" for t in c.task])
    vqa = [i for i, t in enumerate(c.task) if t == "vqa"]
    assert c.has_gt[i2p].all() and not c.has_gt[vqa].any()  # (t2p has one too; no reward reads it)
    h36m = data.Human36M(str(real_data["root"] / "h36m_train.npz"), ".")
    body = smpl.build_body_model(files["smpl"], "cpu")
    fits = torch.stack([h36m[i]["pose"] for i in range(len(h36m))])  # (8, 24, 3) the SMPL fits
    fits = smpl.pose_joints(M.pose_to_rot6d(fits), body)  # (8, 24, 3) their joints
    for J in c.gt_joints[i2p]:  # each image's reference is one of the SMPL fits' joints
        assert (J - fits).flatten(1).abs().amax(1).min() < 1e-4
    assert all(c.ref_answer[i] in [a for _, a in VQA] for i in vqa)
    # every reward scores its candidates against those references once they have a pose
    posed = dataclasses.replace(c, valid=torch.ones_like(c.valid))
    ctx = rewards.RewardContext(
        retriever=rewards.PoseTextRetriever.load(os.path.join(sft_dir, "retriever_reward")),
        embedder=rewards.MeanPoolEmbedder(lambda ids, mask: torch.nn.functional.one_hot(ids, 4096).float(),
                                          M.Tokenizer.from_file(os.path.join(files["llava"], "tokenizer.json"))))
    _, _, per = compute(posed, ctx, {"joint": 1, "semantic": 1, "format": 1, "text": 1})
    assert (per["joint"][i2p] > 0).all() and (per["joint"][~i2p] == 0).all()
    assert (per["semantic"][t2p].abs() > 0).all() and torch.isfinite(per["text"][vqa]).all()

    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert any(np.isfinite(r["reward/text/vqa"]) for r in rows)
    for name in ("eval_before.json", "eval_after.json"):
        result = json.load(open(out / name))
        assert result["protocols"] == ["h36m", "3dpw", "posescript"] and result["protocols_skipped"] == []
        assert result["h36m_n"] == 6 and np.isfinite(result["h36m_mpjpe_mm"]) and "14 LSP" in result["h36m_protocol"]
        assert result["3dpw_n"] == 6 and np.isfinite(result["3dpw_approx_mpjpe_mm"])  # no gendered SMPL given
        assert result["posescript_n"] == N_TEST and 0 <= result["posescript_full_t2p@5"] <= 100
        assert 0 <= result["posescript_sampled_p2t@10"] <= 100
        assert len(result["items"]["posescript_full_t2p@5"]) == N_TEST  # per caption: paired standard errors
        assert "i2p_mpjpe_mm" not in result and "t2p_posecode_acc" not in result  # no PoseWorld
    table = (out / "results.md").read_text()
    assert "real test sets (h36m, 3dpw, posescript)" in table and "Human3.6M MPJPE" in table
    assert "PoseScript test R^T2P" in table and "3DPW MPJPE (mm), APPROXIMATE" in table and "Not evaluated" not in table
    assert (out / "gallery.png").stat().st_size > 0


@pytest.mark.slow
def test_rft_on_real_data_resumes_exactly(files, real_data, sft_dir, tmp_path):  # noqa: F811
    """A real-data run stopped after 2 of 4 steps and resumed ends with the losses and weights of an
    uninterrupted one: catches a prompt mix that is not a pure function of the seed or a data position
    lost on resume."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--max_steps=4", "--eval=false", "--gallery_every=1000", "--lr=1e-3"]  # lr: the weights move
    train_rft.main(rft_flags(files, real_data, sft_dir, a) + common)
    train_rft.main(rft_flags(files, real_data, sft_dir, b) + common + ["--stop_after=2"])
    train_rft.main(rft_flags(files, real_data, sft_dir, b) + common + ["--resume=true"])
    rows_a = [json.loads(line) for line in open(a / "metrics.jsonl")]
    rows_b = [json.loads(line) for line in open(b / "metrics.jsonl")]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["R_d"] for r in rows_a] == [r["R_d"] for r in rows_b] and len({r["loss"] for r in rows_a}) > 1
    ta, tb = (load_file(str(run / "checkpoint" / "model.safetensors")) for run in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_real_evaluator_says_what_it_skips(files, real_data, sft_dir, capsys):  # noqa: F811
    """Without the test files, each protocol is named as skipped with the flag it needs (the Human3.6M
    TRAINING file is never evaluated on), and no evaluator is made when none can run. Catches a silent
    before/after table on fewer protocols than the user expects."""
    flags = ["--preset=llava-1.5-7b", *paths(files), f"--sft_dir={sft_dir}", *real_data["flags"],
             "--data=h36m,llava_instruct"]
    cfg = train_rft.apply_overrides(train_rft.RFTConfig(), flags)
    assert train_rft.make_real_evaluator(cfg, None, smpl.SMPL(), torch.device("cpu")) is None
    said = capsys.readouterr().out
    assert "on: nothing; skipped: Human3.6M (no --h36m_test_npz); 3DPW (no --pw3d_root); PoseScript text-to-pose " \
           "(posescript not in --data)" in said
    cfg.h36m_test_npz, cfg.smpl_path = real_data["h36m_test"], ""
    assert train_rft.make_real_evaluator(cfg, None, smpl.SMPL(), torch.device("cpu")) is None
    assert "Human3.6M (its 14-joint protocol needs --smpl_path and --h36m_regressor)" in capsys.readouterr().out
