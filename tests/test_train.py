"""train_sft.py / train_rft.py: distributed data parallelism, resuming, and the main job end to end.

These run the real scripts on a very small tiny-preset model (a few training steps), so they test the
plumbing (gradient averaging, checkpoint state, RNG and data position), not the learning."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import hygrpo
import model as M
import smpl
import train_rft
import train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --task_mix=: SFT's equal task thirds, so that a few steps of 2 prompts meet VQA prompts, whose text
# reward gives these barely trained models (no <POSE> yet) a gradient at all
SMALL = ["--poseworld_size=120", "--G=2", "--batch_size=2", "--max_new_tokens=12", "--eval=false",
         "--gallery_every=1000", "--save_every=2", "--task_mix="]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A tiny SFT run of a few steps (tokenizer, both retrievers, policy): pi_init for the RFT tests."""
    out = tmp_path_factory.mktemp("sft")
    cfg = train_sft.SFTConfig(out_dir=str(out), head_steps=20, max_steps=6, batch_size=4, poseworld_size=120, retriever_pairs=120,
                              retriever_steps=4, retriever_batch=32, vocab_size=400, save_every=3,
                              pretrain_steps=3, pretrain_images=64, pretrain_batch=8, warmup_steps=2,
                              num_threads=1)
    train_sft.main(cfg=cfg)
    return str(out)


def _trained_tensors(run_dir):
    return load_file(os.path.join(run_dir, "checkpoint", "model.safetensors"))


def test_rft_resume_equals_uninterrupted_run(sft_dir, tmp_path):
    """A run stopped after 2 of 4 steps and resumed ends with exactly the parameters (and losses) of an
    uninterrupted run: catches a resume that loses the optimiser state, the sampling generator's or
    torch's RNG state, the data position, or the schedule."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = SMALL + [f"--sft_dir={sft_dir}", "--max_steps=4", "--num_threads=1"]
    train_rft.main(common + [f"--out_dir={a}"])
    train_rft.main(common + [f"--out_dir={b}", "--stop_after=2"])
    assert json.load(open(os.path.join(b, "checkpoint", "config.json")))["extra"]["step"] == 2
    train_rft.main(common + [f"--out_dir={b}", "--resume=true"])
    ta, tb = _trained_tensors(a), _trained_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    rows_a = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    rows_b = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    # and RFT did train what the tiny preset trains: the LLM's own weights moved, the encoders and the
    # LoRA adapters (they would duplicate the full weights) did not
    sft = load_file(os.path.join(sft_dir, "checkpoint", "model.safetensors"))
    moved = {n for n in sft if not torch.equal(ta[n], sft[n])}
    assert any(n.startswith("llava.language_model.") and n.endswith("q_proj.weight") for n in moved)
    assert not any(n.startswith(("llava.vision_tower.", "pose_encoder.")) or "lora_" in n for n in moved)


@pytest.mark.parametrize("micro_batch", [0, 2])
def test_sft_resume_equals_uninterrupted_run(tmp_path, micro_batch):
    """The same for stage 1: optimiser, RNG, data position and schedule survive a stop, also when each step
    accumulates micro-batches (the data position is then steps x passes)."""
    def cfg(out, **kw):
        return train_sft.SFTConfig(out_dir=str(out), head_steps=20, max_steps=4, batch_size=4, micro_batch=micro_batch,
                                   poseworld_size=120,
                                   retriever_pairs=120, retriever_steps=2, retriever_batch=32, vocab_size=400,
                                   pretrain_steps=3, pretrain_images=64, pretrain_batch=8,
                                   save_every=2, warmup_steps=2, num_threads=1, **kw)
    train_sft.main(cfg=cfg(tmp_path / "a"))
    train_sft.main(cfg=cfg(tmp_path / "b", stop_after=2))
    train_sft.main(cfg=cfg(tmp_path / "b", resume=True))
    ta, tb = _trained_tensors(tmp_path / "a"), _trained_tensors(tmp_path / "b")
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


def test_pose_head_refit_trains_the_head_alone_and_resumes(tmp_path, monkeypatch):
    """The refit after SFT (train_sft.refit_pose_head) moves the pose head and nothing else, lowers the
    pose loss on the h it was fit to, and a run killed during it is not `finished` and redoes it on
    --resume, ending with an uninterrupted run's weights. Catches a refit that trains the LLM too, a
    checkpoint that reads finished before its refit, or a resume that skips or repeats it."""
    def cfg(out, **kw):
        return train_sft.SFTConfig(**{**dict(out_dir=str(out), max_steps=4, batch_size=4, poseworld_size=120,
                                             retriever_pairs=120, retriever_steps=2, retriever_batch=32,
                                             vocab_size=400, pretrain_steps=3, pretrain_images=64, pretrain_batch=8,
                                             save_every=2, warmup_steps=2, num_threads=1, head_steps=30,
                                             head_lr=3e-3, log_every=10), **kw})
    train_sft.main(cfg=cfg(tmp_path / "none", head_steps=0))
    train_sft.main(cfg=cfg(tmp_path / "a"))
    before, after = _trained_tensors(tmp_path / "none"), _trained_tensors(tmp_path / "a")
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and all(n.startswith("pose_head.") for n in moved), sorted(moved)[:5]

    def pose_loss(run):  # SFT's pose loss of the run's head on every training pose answer's h
        policy, tokenizer, _ = M.load_checkpoint(str(run))
        c = cfg(run)
        h, p_gt = train_sft.pose_head_inputs(policy, data.build_datasets(c, "train", mix=data.parse_task_mix(c.task_mix)),
                                             tokenizer, torch.device("cpu"))
        with torch.no_grad():
            pose = policy.pose_head(h)
            nll, joint = train_sft.pose_losses(pose.mu, pose.log_std, p_gt, smpl.SMPL(), c, policy.pose_head.log_std_init)
        return c.nll_weight * nll + c.joint_weight * joint
    assert pose_loss(tmp_path / "a") < pose_loss(tmp_path / "none")

    refit = train_sft.refit_pose_head
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_sft, "refit_pose_head", killed)
    with pytest.raises(KeyboardInterrupt):
        train_sft.main(cfg=cfg(tmp_path / "b"))
    extra = json.load(open(tmp_path / "b" / "checkpoint" / "config.json"))["extra"]
    assert extra["step"] == 4 and not extra["finished"]
    monkeypatch.setattr(train_sft, "refit_pose_head", refit)
    train_sft.main(cfg=cfg(tmp_path / "b", resume=True))
    assert json.load(open(tmp_path / "b" / "checkpoint" / "config.json"))["extra"]["finished"]
    tb = _trained_tensors(tmp_path / "b")
    assert all(torch.equal(after[n], tb[n]) for n in after)
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["head_step"] for r in rows if "head_step" in r] == [10, 20, 30]
    train_sft.main(cfg=cfg(tmp_path / "b", resume=True))  # finished: nothing is refit again
    assert all(torch.equal(tb[n], t) for n, t in _trained_tensors(tmp_path / "b").items())


def test_sft_overrides_that_would_be_ignored_are_refused(sft_dir):
    """--sft_overrides shapes only an SFT run the command trains: with a finished run already in --sft_dir,
    overrides equal to its saved config pass and different ones are refused, naming the setting (they
    used to be ignored without a word)."""
    saved = json.load(open(os.path.join(sft_dir, "checkpoint", "config.json")))["extra"]["config"]
    train_rft.check_sft_overrides(train_rft.RFTConfig(sft_dir=sft_dir, sft_overrides="max_steps=6"), saved)
    with pytest.raises(SystemExit, match="max_steps=300"):
        train_rft.check_sft_overrides(train_rft.RFTConfig(sft_dir=sft_dir, sft_overrides="max_steps=300"), saved)


def test_torchrun_two_ranks_stay_identical(sft_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank samples its own prompts, gradients are averaged, and
    after 2 steps both ranks hold identical parameters that differ from pi_init. Catches a missing or
    wrong gradient all-reduce, ranks seeded differently at initialisation, or rank 0 alone stepping."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "ddp_probe.py"), *SMALL, f"--sft_dir={sft_dir}", f"--out_dir={out}",
           "--max_steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    p0 = torch.load(out / "params_rank0.pt")
    p1 = torch.load(out / "params_rank1.pt")
    assert p0.keys() == p1.keys() and len(p0) > 0
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    sft = load_file(os.path.join(sft_dir, "checkpoint", "model.safetensors"))
    assert any(not torch.equal(p0[n], sft[n]) for n in p0 if n in sft)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]  # rank 0 alone logs
    assert [r["step"] for r in rows] == [1, 2]


def test_two_ranks_normalise_by_global_counts(tmp_path):
    """torchrun with 2 CPU processes (gloo): the ranks split one batch of HyGRPO candidates, rank 0 drawing
    1 valid pose and rank 1 four, and normalise by the all-reduced N and V (train_rft.global_normalisers).
    Their averaged gradient must equal the gradient of the whole batch in one process. Catches a rank
    dividing by its own V (rank 0's single pose would weigh four times the others')."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "hygrpo_ddp_probe.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    grads = torch.load(tmp_path / "grads.pt")
    assert grads["whole"].abs().max() > 1e-3
    torch.testing.assert_close(grads["ddp"], grads["whole"], rtol=1e-12, atol=1e-12)


def test_pose_set_leaves_out_tasks_without_a_continuous_reward():
    """V (Eq. 6) holds the candidates with a pose on a task whose pose some continuous reward scores: a VQA
    answer that emits <POSE> is not in V (it would dilute J_c and enter the pose KL unrewarded)."""
    valid = torch.tensor([True, True, True, False])
    assert train_rft.pose_scored(valid, ["t2p", "i2p", "vqa", "t2p"]).tolist() == [True, True, False, False]


def test_pose_kl_weights_by_task():
    """--beta_i2p weighs the image-to-pose candidates' pose KL, --beta the others' (hygrpo.py note 7);
    equal weights give None, Eq. 6's one beta."""
    cfg = train_rft.RFTConfig(beta=0.05, beta_i2p=1.0)
    w = train_rft.pose_kl_weights(["t2p", "i2p", "vqa", "i2p"], cfg, "cpu")
    assert w.tolist() == pytest.approx([0.05, 1.0, 0.05, 1.0])
    assert train_rft.pose_kl_weights(["t2p", "i2p"], train_rft.RFTConfig(beta=0.2, beta_i2p=0.2), "cpu") is None


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path):
    """`python train_rft.py` on a fresh folder, with reduced step counts: trains the SFT model (there is
    none), evaluates before, runs RFT, evaluates after, prints the table and writes every artefact; then
    `python eval.py --ckpt=...` evaluates the result."""
    sft = ("max_steps=8;head_steps=20;batch_size=4;poseworld_size=150;retriever_pairs=150;retriever_steps=3;retriever_batch=32;"
           "vocab_size=400;pretrain_steps=3;pretrain_images=64;pretrain_batch=8")
    cmd = [sys.executable, os.path.join(ROOT, "train_rft.py"), f"--sft_overrides={sft}", "--poseworld_size=150",
           "--max_steps=3", "--G=2", "--batch_size=2", "--max_new_tokens=12", "--eval_size=90",
           "--gallery_every=2", "--save_every=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| metric | before | after | change (paired s.e.) |" in proc.stdout
    assert "Image-to-pose MPJPE (mm)" in proc.stdout and "Format rate" in proc.stdout
    run = tmp_path / "out" / "tiny-rft"
    for name in ("results.md", "eval_before.json", "eval_after.json", "metrics.jsonl", "gallery.png",
                 "reward_curves.svg", "checkpoint/model.safetensors", "checkpoint/train_state.pt"):
        assert (run / name).exists(), name
    assert (tmp_path / "out" / "tiny-sft" / "retriever_eval" / "model.safetensors").exists()
    assert open(run / "gallery.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(open(run / "metrics.jsonl").readlines()) == 3
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--ckpt={run}", "--limit=60"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(run / "eval.json"))
    assert results["n"] == 60 and 0 <= results["format_rate"] <= 100


def test_retrievers_train_on_posescript_captions(tmp_path):
    """With real data, the retrievers learn from PoseScript's captions: one pair per caption, the pose's
    SMPL joints in the body frame (its heading and pelvis removed), so the 7B run's semantic reward has a
    retriever. Catches pairing a caption with another pose or feeding world-frame joints."""
    import data
    import smpl
    from test_data_formats import posescript_seqs, write_posescript
    root, amass = write_posescript(tmp_path, posescript_seqs())
    cfg = train_sft.SFTConfig(data="posescript", posescript_root=root, amass_root=amass)
    joints, captions = train_sft.retriever_pairs(cfg, "cpu")
    ds = data.PoseScript(root, amass, split="train")
    assert captions == [ds[i]["caption"] for i in range(len(ds))]
    pose = torch.stack([ds[i]["pose"] for i in range(len(ds))])  # (n, 24, 3)
    expected = data.body_frame_joints(smpl.SMPL()(pose[:, 1:], global_orient=pose[:, 0]).joints)
    assert torch.allclose(joints, expected, atol=1e-6)
    assert joints[:, 0].abs().max() < 1e-6  # pelvis at the origin


def test_rft_exact_pose_kl(sft_dir, tmp_path):
    """--pose_kl=exact puts the closed-form Gaussian KL (logged as kl_c_exact every step) into the loss as
    the pose KL; a large lr moves the policy off pi_ref so the KL is not trivially zero."""
    prone = tmp_path / "sft"  # the few-step SFT model seldom says <POSE>: raise its output row's logit
    shutil.copytree(sft_dir, prone)
    tensors = _trained_tensors(prone)
    lm = "llava.language_model."
    tensors[lm + "lm_head.new_row"] = tensors[lm + "lm_head.weight"].mean(0) + 3 * tensors[lm + "model.norm.weight"]
    save_file(tensors, str(prone / "checkpoint" / "model.safetensors"))
    out = str(tmp_path / "exact")
    train_rft.main(SMALL + [f"--sft_dir={prone}", f"--out_dir={out}", "--max_steps=4", "--num_threads=1",
                            "--pose_kl=exact", "--lr=1e-2", "--warmup_steps=1", "--G=4"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    moved = [r for r in rows if r["V_over_N"] > 0 and r["kl_c_exact"] > 0]
    assert moved, rows
    for r in moved:
        assert r["kl_c"] == pytest.approx(r["kl_c_exact"], rel=1e-4)
    with pytest.raises(SystemExit, match="--pose_kl"):
        train_rft.main([f"--sft_dir={sft_dir}", f"--out_dir={out}", "--pose_kl=k2"])


def test_nonfinite_step_stops_and_keeps_last_good_checkpoint(sft_dir, tmp_path, monkeypatch):
    """A NaN loss (a HyGRPO loss made NaN in RFT, --joint_weight=nan in SFT) must stop the run with a clear
    error before the step is applied, leaving the last good checkpoint as it was. Catches training on with
    NaN weights and a save that overwrites the good checkpoint with them."""
    out = str(tmp_path / "rft")
    common = SMALL + [f"--sft_dir={sft_dir}", f"--out_dir={out}", "--max_steps=4", "--num_threads=1"]
    train_rft.main(common + ["--stop_after=2"])
    good = _trained_tensors(out)
    loss_fn = hygrpo.hygrpo_loss  # (--beta=nan is refused up front by check_config)

    def nan_loss(*args, **kwargs):
        loss, stats = loss_fn(*args, **kwargs)
        return loss * math.nan, stats
    monkeypatch.setattr(hygrpo, "hygrpo_loss", nan_loss)
    with pytest.raises(SystemExit, match="not finite; stopped before applying it"):
        train_rft.main(common + ["--resume=true"])
    monkeypatch.undo()
    kept = _trained_tensors(out)
    assert all(torch.equal(good[n], kept[n]) for n in good)
    assert json.load(open(os.path.join(out, "checkpoint", "config.json")))["extra"]["step"] == 2

    sft = tmp_path / "sft"
    cfg = dict(out_dir=str(sft), head_steps=20, max_steps=4, batch_size=4, poseworld_size=120, retriever_pairs=120,
               retriever_steps=2, retriever_batch=32, vocab_size=400, save_every=2, warmup_steps=2, num_threads=1,
               pretrain_steps=3, pretrain_images=64, pretrain_batch=8)
    train_sft.main(cfg=train_sft.SFTConfig(**cfg, stop_after=2))
    good = _trained_tensors(sft)
    with pytest.raises(SystemExit, match="step 3: the loss .* not finite"):
        train_sft.main(cfg=train_sft.SFTConfig(**cfg, resume=True, joint_weight=float("nan")))
    kept = _trained_tensors(sft)
    assert all(torch.equal(good[n], kept[n]) and torch.isfinite(kept[n]).all() for n in good)


def test_bad_settings_are_one_clear_error():
    """Each setting that used to be silent, a deep traceback or a wrong result is refused once, at the
    top, naming the flag: float16 (ran in float32), zero counts (division by zero, never saving), G=1 (all
    advantages 0), greedy RFT, a negative clip, an unknown preset (reported a missing tokenizer.json),
    numbers given as strings; and bf16 is read as bfloat16."""
    rft, sft = train_rft.RFTConfig, train_sft.SFTConfig
    assert train_sft.check_config(rft(dtype="bf16")).dtype == "bfloat16"
    assert train_sft.check_config(sft(dtype="fp32")).dtype == "float32"
    bad = [(rft(dtype="float16"), "--dtype='float16'.*bfloat16"), (rft(max_steps=0), "--max_steps=0"),
           (sft(max_steps=-3), "--max_steps=-3"), (rft(batch_size=0), "--batch_size=0"), (rft(G=1), "--G=1"),
           (rft(temperature=0.0), "--temperature=0.0"), (rft(clip_eps=-0.1), "--clip_eps=-0.1"),
           (rft(inner_epochs=0), "--inner_epochs=0"), (rft(save_every=0), "--save_every=0"),
           (sft(log_every=0), "--log_every=0"), (rft(gallery_every=0), "--gallery_every=0"),
           (sft(preset="unknown"), "--preset='unknown'.*tiny, llava-1.5-7b"),
           (sft(poseworld_size="120"), "--poseworld_size='120' must be a int"),
           (sft(pretrain_steps=-1), "--pretrain_steps=-1"), (sft(pretrain_batch=0), "--pretrain_batch=0"),
           (rft(beta=-0.1), "--beta=-0.1: a loss weight"), (rft(beta_i2p=float("inf")), "--beta_i2p=inf"),
           (rft(gradient_at_mean=float("nan")), "--gradient_at_mean=nan"),
           (rft(gradient_at_mean=-1.0), "--gradient_at_mean=-1")]
    for cfg, message in bad:
        with pytest.raises(SystemExit, match=message):
            train_sft.check_config(cfg)
    # and the scripts check before doing anything else
    with pytest.raises(SystemExit, match="--preset='unknown'"):
        train_rft.main(["--preset=unknown", "--sft_dir=/nonexistent"])
    with pytest.raises(SystemExit, match="--batch_size=0"):
        train_sft.main(["--batch_size=0", "--out_dir=/nonexistent/sft"])
    import eval as E
    with pytest.raises(SystemExit, match="--limit=0"):
        E.main(["--ckpt=/nonexistent", "--limit=0"])


def test_damaged_files_are_errors_naming_them(sft_dir, tmp_path):
    """A checkpoint whose tokenizer.json lacks <POSE> or has more tokens than the weights have rows, integer
    weights where the model has floats (used to be cast silently), a corrupt retriever config.json or
    safetensors, and an empty train_state.pt: each an error naming the file."""
    import model as M
    import rewards
    run = tmp_path / "run"
    shutil.copytree(sft_dir, run)
    tok_path = run / "checkpoint" / "tokenizer.json"
    text = tok_path.read_text()
    spec = json.loads(text)
    tok_path.write_text(text.replace('"<POSE>"', '"<PSE>"'))  # the token renamed: the file has no <POSE>
    with pytest.raises(ValueError, match=r"tokenizer\.json: <POSE> is missing"):
        M.load_checkpoint(run)
    more = dict(spec, added_tokens=spec["added_tokens"] + [
        {**spec["added_tokens"][-1], "id": 5000 + i, "content": f"<extra{i}>"} for i in range(3)])
    json.dump(more, open(tok_path, "w"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: the vocabulary has .* embedding rows"):
        M.load_checkpoint(run)
    json.dump(spec, open(tok_path, "w"))
    tensors = _trained_tensors(run)
    name = next(n for n in tensors if n.endswith("pose_head.fc1.weight"))
    tensors[name] = tensors[name].round().to(torch.int32)
    save_file(tensors, str(run / "checkpoint" / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name} holds torch.int32 where the model has torch.float32"):
        M.load_checkpoint(run)

    folder = run / "retriever_eval"
    (folder / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"retriever_eval/model\.safetensors: not a readable safetensors"):
        rewards.PoseTextRetriever.load(str(folder))
    (folder / "config.json").write_text('{"config": {"vocab_')
    with pytest.raises(ValueError, match=r"retriever_eval/config\.json: not a retriever config\.json"):
        rewards.PoseTextRetriever.load(str(folder))
    (run / "checkpoint" / "train_state.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"checkpoint/train_state\.pt is not readable"):
        train_sft.load_train_state(str(run))


def test_kill_between_checkpoint_renames_is_recovered(sft_dir, tmp_path):
    """A kill between the two renames of the checkpoint swap leaves no checkpoint/, only the temporary
    folders. The next start must finish the swap (new data complete) or roll it back (only the old data),
    and --resume then goes on; a metrics.jsonl with rows after the save and a torn last line (power cut)
    is cut back to the saved step. Catches per-process temporary names, a resume that fails, and rows
    logged twice or a crash on the torn line."""
    import model as M
    out = tmp_path / "run"
    common = SMALL + [f"--sft_dir={sft_dir}", f"--out_dir={out}", "--max_steps=4", "--num_threads=1"]
    train_rft.main(common + ["--stop_after=2"])
    ckpt, tmp, old = out / "checkpoint", out / ".checkpoint.tmp", out / ".checkpoint.old"
    shutil.copytree(ckpt, tmp)  # the new checkpoint, complete
    os.replace(ckpt, old)  # killed here: between the renames
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5}\n{"step": 4, "lo')  # a row after the save, then a torn line
    train_rft.main(common + ["--resume=true"])
    assert not tmp.exists() and not old.exists()
    assert json.load(open(ckpt / "config.json"))["extra"]["step"] == 4
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] != 0.5
    # rolled back: only the old checkpoint survived the kill
    os.replace(ckpt, old)
    assert "rolled back" in M.recover_checkpoint(ckpt)
    assert (ckpt / "model.safetensors").exists() and not old.exists()


def test_unfinished_sft_is_resumed_or_refused(tmp_path):
    """An SFT run stopped before its max_steps is recorded as unfinished: RFT refuses it with the command
    that finishes it (unless --allow_unfinished_sft=true), and the tiny main job resumes it first. A
    retriever folder left half-written is retrained, not skipped. Catches RFT starting from a half-trained
    pi_init without a word, and a half retriever folder taken for a whole one."""
    sft = tmp_path / "sft"
    cfg = dict(out_dir=str(sft), head_steps=20, max_steps=4, batch_size=4, poseworld_size=120, retriever_pairs=120,
               retriever_steps=2, retriever_batch=32, vocab_size=400, save_every=2, warmup_steps=2, num_threads=1,
               pretrain_steps=3, pretrain_images=64, pretrain_batch=8)
    train_sft.main(cfg=train_sft.SFTConfig(**cfg, stop_after=2))
    extra = json.load(open(sft / "checkpoint" / "config.json"))["extra"]
    assert extra["finished"] is False and extra["step"] == 2
    # resumed on the other prompt template: refused, not trained on a second template
    with pytest.raises(SystemExit, match="trained without LLaVA's system line: resume it with --system_line=false"):
        train_sft.main(cfg=train_sft.SFTConfig(**cfg, resume=True, system_line=True))
    # a run saved before --system_line existed had the line (so ensure_sft resumes it with it)
    assert train_rft.saved_sft_config({k: v for k, v in extra["config"].items() if k != "system_line"}).system_line
    assert not train_rft.saved_sft_config(extra["config"]).system_line
    os.remove(sft / "retriever_eval" / "config.json")  # as a kill during the old, non-atomic save left it
    # a 7B run is never resumed for the user: its SFT run's config says llava-1.5-7b (ensure_sft reads only that)
    meta_path = sft / "checkpoint" / "config.json"
    meta = json.load(open(meta_path))
    saved = json.dumps(meta)
    meta["extra"]["config"]["preset"] = "llava-1.5-7b"
    meta_path.write_text(json.dumps(meta))
    big = train_rft.RFTConfig(preset="llava-1.5-7b", sft_dir=str(sft))
    with pytest.raises(SystemExit, match=rf"stopped at step 2 of 4: finish it with .*--out_dir={sft} --resume=true"):
        train_rft.ensure_sft(big)
    big.allow_unfinished_sft = True
    train_rft.ensure_sft(big)  # told otherwise: goes on
    meta_path.write_text(saved)
    train_rft.main(SMALL + [f"--sft_dir={sft}", f"--out_dir={tmp_path / 'rft'}", "--max_steps=1",
                            "--num_threads=1", "--eval=true", "--eval_size=30"])
    extra = json.load(open(sft / "checkpoint" / "config.json"))["extra"]
    assert extra["finished"] is True and extra["step"] == 4
    assert (sft / "retriever_eval" / "config.json").exists()
    rows = [json.loads(line) for line in open(sft / "metrics.jsonl")]
    assert [r["step"] for r in rows if "head_step" not in r] == [1, 2, 3, 4]
    assert [r["head_step"] for r in rows if "head_step" in r] == [20]  # then the pose-head refit, once


def test_torchrun_two_ranks_resume_equals_uninterrupted_run(sft_dir, tmp_path):
    """Under torchrun each rank samples with its own generator. A 2-rank run stopped after 2 of 4 steps and
    resumed must end with exactly the parameters of an uninterrupted 2-rank run (CPU, gloo). Catches a
    resume that gives every rank rank 0's RNG states (measured: 1.8e-5 apart after 4 steps)."""
    def run(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "ddp_probe.py"), *SMALL, f"--sft_dir={sft_dir}", f"--out_dir={out}",
               "--max_steps=4", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = tmp_path / "a", tmp_path / "b"
    run(a)
    run(b, "--stop_after=2")
    run(b, "--resume=true")
    pa, pb = torch.load(a / "params_rank1.pt"), torch.load(b / "params_rank1.pt")
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    rows_a = [json.loads(line) for line in open(a / "metrics.jsonl")]
    rows_b = [json.loads(line) for line in open(b / "metrics.jsonl")]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_beta_nll_weighs_each_number_by_its_detached_std():
    """train_sft.pose_nll: beta = 0 is Eq. 2's NLL; beta = 1 pulls mu like an MSE at std_ref whatever the
    head's std, and leaves std's fixed point (std^2 = the squared residual) where the NLL has it."""
    import math
    import hygrpo
    g = torch.Generator().manual_seed(0)
    p, mu0 = torch.randn(3, 144, generator=g), torch.randn(3, 144, generator=g)
    log_std = (torch.rand(3, 144, generator=g) * 4 - 5).requires_grad_()
    plain = train_sft.pose_nll(p, mu0, log_std)
    assert torch.allclose(plain, -hygrpo.gaussian_log_prob(p, mu0, log_std).mean())
    grads = []
    for ls in (log_std.detach(), log_std.detach() - 1.0):  # two different stds: the same pull on mu
        mu = mu0.clone().requires_grad_()
        train_sft.pose_nll(p, mu, ls, beta=1.0, log_std_ref=-1.0).backward()
        grads.append(mu.grad)
    expected = (mu0 - p) / math.exp(-2.0) / 3  # (mu - p) / std_ref^2, averaged over the 3 rows
    assert torch.allclose(grads[0], expected, atol=1e-5) and torch.allclose(grads[1], expected, atol=1e-5)
    # one number by hand: p - mu = 0.3, std = 0.2, std_ref = 0.4, beta = 0.5: weight (0.2/0.4)^1 = 0.5
    one = train_sft.pose_nll(torch.tensor([[0.3]]), torch.zeros(1, 1), torch.tensor([[math.log(0.2)]]),
                             beta=0.5, log_std_ref=math.log(0.4))
    assert one.item() == pytest.approx(0.5 * (0.5 * 1.5 ** 2 + math.log(0.2) + 0.5 * math.log(2 * math.pi)), rel=1e-5)
    # the std's fixed point: zero gradient where std = |p - mu|, as with the plain NLL
    ls = torch.full((1, 144), math.log(0.3), requires_grad=True)
    train_sft.pose_nll(torch.full((1, 144), 0.3), torch.zeros(1, 144), ls, beta=1.0, log_std_ref=-1.0).backward()
    assert ls.grad.abs().max() < 1e-5


def test_pose_encoder_pretraining_stops_on_a_nonfinite_step():
    """An absurd rate (1e38) blows the weights up in the first update, so the second step's loss is not
    finite: pretraining stops there, naming --pretrain_lr, and SFT never starts from broken weights."""
    import data
    import smpl
    cfg = train_sft.SFTConfig(vocab_size=400, poseworld_size=120, pretrain_steps=3, pretrain_images=64,
                              pretrain_batch=8, pretrain_lr=1e38)
    tokenizer = train_sft.train_tokenizer(cfg, data.build_datasets(cfg, "train"))
    policy = train_sft.build_policy(cfg, tokenizer, torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"pose ViT pretraining, step 2: .* not finite; lower --pretrain_lr"):
        train_sft.pretrain_pose_encoder(policy, smpl.build_body_model("", "cpu"), cfg, "cpu")


@pytest.mark.slow
def test_pose_encoder_pretraining_learns_and_changes_only_f_b():
    """train_sft.pretrain_pose_encoder at its default budget (the tiny preset's stand-in for HMR2.0's
    pretraining): its joint error ends well below always answering the images' average pose (0.65 of it;
    with the poses paired to the wrong images, 0.93), it changes the pose ViT f_b and nothing else of the
    policy (the regression head is thrown away), and it leaves the global RNG as it found it (SFT after it
    draws what it would draw without it). Catches training another module, a head left in the policy,
    images not paired with their poses, and an RNG side effect. (Smaller budgets only memorise.)"""
    import data
    import smpl
    from model import pose_to_rot6d
    cfg = train_sft.SFTConfig(vocab_size=400, poseworld_size=120)
    tokenizer = train_sft.train_tokenizer(cfg, data.build_datasets(cfg, "train"))
    policy = train_sft.build_policy(cfg, tokenizer, torch.device("cpu"))
    body = smpl.build_body_model("", "cpu")
    before = {n: p.clone() for n, p in policy.state_dict().items()}
    rng = torch.get_rng_state()
    error = train_sft.pretrain_pose_encoder(policy, body, cfg, "cpu")
    assert torch.equal(torch.get_rng_state(), rng)
    after = policy.state_dict()
    assert after.keys() == before.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.startswith("pose_encoder.")}
    # the same images' error when always answering their average pose (in rot6d, as the head would)
    world = data.PoseWorld("train", size=cfg.pretrain_images, seed=cfg.seed + 5, tasks=("i2p",))
    J_gt = smpl.pose_joints(world.poses, body)  # (n, 24, 3)
    mean = pose_to_rot6d(world.poses).mean(0, keepdim=True)  # (1, 144)
    average = (smpl.pose_joints(mean, body) - J_gt).norm(dim=-1).mean().item()
    assert error < 0.8 * average, (error, average)


def _pathwise_setup(G, seed=0):
    """Candidates for train_rft.gradient_at_mean: two image-to-pose groups of G answers, one pose each (the
    first group's first candidate without a pose; other ground truths, so other reward spreads) and a
    text-to-pose group, their Gaussians' means random rot6d poses, their rewards those of samples."""
    import model as M
    import rewards
    import smpl
    g = torch.Generator().manual_seed(seed)
    tasks = ["i2p"] * (2 * G) + ["t2p"] * G
    N = len(tasks)
    mu = M.pose_to_rot6d(0.3 * torch.randn(N, 24, 3, generator=g))  # (N, 144)
    noise = torch.tensor([0.05] * G + [0.15] * G + [0.05] * G)[:, None]  # (N, 1) the groups' spreads differ
    sampled = mu + noise * torch.randn(N, 144, generator=g)  # (N, 144) the poses the rewards scored
    gt = smpl.pose_joints(0.3 * torch.randn(3, 24, 3, generator=g)).repeat_interleave(G, 0)  # (N, 24, 3)
    valid = torch.ones(N, dtype=torch.bool)
    valid[0] = False
    has_gt = torch.ones(N, dtype=torch.bool)  # text-to-pose poses have a ground truth too, unscored by R_joint
    i2p = torch.tensor([t == "i2p" for t in tasks])
    R_c = torch.where(i2p, rewards.joint_reward(smpl.pose_joints(sampled), gt), torch.rand(N, generator=g))
    cands = rewards.Candidates(task=tasks, text=[""] * N, valid=valid, pose=torch.zeros(N, 24, 3, 3),
                               joints=smpl.pose_joints(sampled), gt_joints=gt, has_gt=has_gt, question=[""] * N,
                               caption=[None] * N, ref_answer=[""] * N)
    return mu, cands, R_c, valid


def test_gradient_at_mean_finite_differences():
    """hygrpo.py note 10: the value is the advantages' sum (0 in each group), and the gradient on the means
    is the finite-difference derivative of (1/V) sum_i R_joint(mu_i) / (std_g + eps) over the image-to-pose
    candidates with a pose, std_g the sampler's std of their group, held; the text-to-pose group, the
    candidate without a pose, and the log-stds get none. With two pose draws per answer the reward is taken
    once, at the answer's first row, with the same gradient. Catches the groups' stats not held or mixed,
    the reward taken elsewhere than at the mean, the wrong candidates scored, or the draws misaligned."""
    import rewards
    import smpl
    G = 6
    mu0, cands, R_c, valid = _pathwise_setup(G)
    mu = mu0.clone().requires_grad_(True)
    log_std = torch.full_like(mu0, -3.0).requires_grad_(True)
    V = float(valid.sum())
    J, means = train_rft.gradient_at_mean(SimpleNamespace(mu=mu, log_std=log_std), cands, R_c, valid, G,
                                          {"joint": 2.0}, None, rewards.RewardContext(), V)
    r_mean = means["joint"]
    assert abs(J.item()) < 1e-5
    scored = torch.arange(1, 2 * G)  # the image-to-pose candidates with a pose
    R_mu = rewards.joint_reward(smpl.pose_joints(mu0[scored]), cands.gt_joints[scored])
    assert r_mean == pytest.approx(R_mu.mean().item(), rel=1e-5)
    J.backward()
    assert mu.grad[2 * G:].abs().max() == 0 and mu.grad[0].abs().max() == 0
    assert log_std.grad is None  # the means only: sigma is left to the likelihood ratio and the KL
    std = torch.stack([R_c[1:G].double().std(), R_c[G:2 * G].double().std()])  # the sampler's group stds, held
    assert abs(std[0] - std[1]) > 0.1 * std.min()  # two different weights, so mixing the groups shows

    def f(m):  # the surrogate's part that varies, written out: w_joint R_joint(mu_i) / (std_g + eps) / V
        r = rewards.joint_reward(smpl.pose_joints(m[scored]), cands.gt_joints[scored]).double()
        return (2.0 * r / (std[scored // G] + 1e-6)).sum().item() / V

    h = 1e-2
    for i, k in [(1, 0), (2, 17), (4, 25), (7, 99), (10, 40)]:  # joints 0, 2, 4, 16, 6: each has children
        plus, minus = mu0.clone(), mu0.clone()
        plus[i, k] += h
        minus[i, k] -= h
        fd = (f(plus) - f(minus)) / (2 * h)
        assert abs(fd) > 1e-3, (i, k)  # a coordinate that moves the reward: the check is not empty
        assert mu.grad[i, k].item() == pytest.approx(fd, rel=0.05, abs=1e-3), (i, k)
    # two pose draws per answer (pose_samples=2): rows 2i, 2i + 1 share answer i's mean and ground truth;
    # the reward is computed at the first row and counts for both, so the first row takes the answer's
    # whole gradient (the second none) and, the groups' stds changed by the duplicates aside, equals it
    mu2 = mu0.repeat_interleave(2, 0).clone().requires_grad_(True)
    cands2 = cands.select(torch.arange(len(cands.task)).repeat_interleave(2))
    R_c2 = R_c.repeat_interleave(2)
    J2, _ = train_rft.gradient_at_mean(SimpleNamespace(mu=mu2, log_std=log_std), cands2, R_c2,
                                       valid.repeat_interleave(2), 2 * G, {"joint": 2.0}, None,  # group_size 2G
                                       rewards.RewardContext(), 2 * V, pose_samples=2)
    J2.backward()
    assert mu2.grad[1::2].abs().max() == 0
    std2 = torch.stack([R_c2[2:2 * G].double().std(), R_c2[2 * G:4 * G].double().std()])
    rescale = (std2 / std).repeat_interleave(G)[:, None]  # (2G, 1) per group
    g2 = mu2.grad[0::2][:2 * G] * rescale  # (2G, 144) the image-to-pose answers
    assert torch.allclose(g2.float(), mu.grad[:2 * G], rtol=1e-4, atol=1e-6)


def test_gradient_at_mean_step_lowers_the_means_error():
    """A small step along J_path's gradient moves every scored mean's joints toward the ground truth: catches
    a sign error in gradient_at_mean (hygrpo_step subtracts lambda J_path from the loss, so J_path must grow as
    the error falls; test_hygrpo_step_ascends_the_pathwise_term runs that line)."""
    import rewards
    import smpl
    G = 6
    mu0, cands, R_c, valid = _pathwise_setup(G, seed=1)
    mu = mu0.clone().requires_grad_(True)
    J, _ = train_rft.gradient_at_mean(SimpleNamespace(mu=mu, log_std=torch.zeros_like(mu0)), cands, R_c, valid, G,
                                      {"joint": 1.0}, None, rewards.RewardContext(), float(valid.sum()))
    J.backward()
    stepped = mu0 + 1e-3 * mu.grad / mu.grad.abs().max()  # (N, 144) gradient ascent on J_path

    def error(m):  # (2G - 1,) root-aligned mean joint error of the scored means, metres
        return 1 / rewards.joint_reward(smpl.pose_joints(m[1:2 * G]), cands.gt_joints[1:2 * G])

    assert (error(stepped) < error(mu0)).all()


def test_hygrpo_step_ascends_the_pathwise_term(sft_dir, tmp_path, monkeypatch):
    """hygrpo_step's `loss - lambda * J_path` (note 10): with J_path replaced by <d, w> for one trained tensor
    w, one plain SGD step (lr 1, no clipping) from the same state and the same rollouts moves w by exactly
    lambda * d more at lambda = 3 than at lambda = 0, i.e. the step ascends J_path. Catches `+`, a missing
    factor lambda, and the term not reaching the loss."""
    import data
    import rewards
    import smpl
    cpu = torch.device("cpu")
    cfg = train_rft.RFTConfig(sft_dir=sft_dir, out_dir=str(tmp_path / "rft"), poseworld_size=120, G=2,
                              batch_size=2, max_new_tokens=12, task_mix="", grad_clip=1e9, inner_epochs=1)
    policy, tokenizer = train_rft.load_policy(cfg, cpu)
    weights = rewards.parse_weights(cfg.rewards)
    ctx = train_rft.reward_context(cfg, weights, policy, tokenizer, cpu)
    body = smpl.build_body_model("", cpu)
    params = [p for p in policy.parameters() if p.requires_grad]
    w = params[len(params) // 2]
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(train_rft, "gradient_at_mean", lambda *args, **kwargs: ((w * d).sum(), {}))
    train_set = data.PoseWorld("train", size=cfg.poseworld_size, seed=cfg.seed, image_size=cfg.image_size)
    batch = data.collate_fn(tokenizer, policy, True)([train_set[i] for i in range(cfg.batch_size)])
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    moved = {}
    for lam in (0.0, 3.0):
        policy.load_state_dict(start)
        cfg.gradient_at_mean = lam
        opt = torch.optim.SGD(params, lr=1.0)
        train_rft.hygrpo_step(policy, opt, params, [batch], cfg, ctx, weights, body, tokenizer,
                              torch.Generator().manual_seed(1), 1)
        moved[lam] = w.detach() - start[next(k for k, v in policy.named_parameters() if v is w)]
    torch.testing.assert_close(moved[3.0] - moved[0.0], 3.0 * d, atol=1e-5, rtol=1e-5)


def test_resume_keeps_fused_adamw_from_an_unfused_checkpoint():
    """model.load_optimizer_state: an optimiser state saved by an unfused AdamW (this code before fused=True)
    resumes into the fused one still fused, with its moments, and the next step equals the unfused
    optimiser's to float rounding. Catches plain opt.load_state_dict, which takes fused=None from the file."""
    import model as M
    w0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    grads = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    old = torch.nn.Parameter(w0.clone())
    unfused = torch.optim.AdamW([old], lr=0.1, foreach=False)
    old.grad = grads[0]
    unfused.step()
    saved = copy.deepcopy(unfused.state_dict())  # as read from a file: no tensor shared with `unfused`
    new = torch.nn.Parameter(old.detach().clone())
    fused = torch.optim.AdamW([new], lr=0.1, fused=True)
    M.load_optimizer_state(fused, saved)
    assert fused.param_groups[0]["fused"] is True
    old.grad, new.grad = grads[1], grads[1].clone()
    unfused.step()
    fused.step()
    torch.testing.assert_close(new.detach(), old.detach(), atol=1e-6, rtol=1e-6)


def test_sft_accumulation_takes_the_mean_of_the_micro_batches(sft_dir):
    """train_sft.accumulate_sft_gradients over two micro-batches leaves the gradient of the mean of their
    two losses (what DDP's mean over two ranks gives), and reports that mean. Catches a loss not divided
    by the number of passes (the gradient of the sum), or gradients zeroed between passes."""
    import data
    import model as M
    import smpl
    policy, tokenizer, _ = M.load_checkpoint(sft_dir)
    policy.set_trainable("sft")
    world = data.PoseWorld("val", size=None, seed=0, image_size=64)
    collate = data.collate_fn(tokenizer, policy)
    batches = [collate([world[i] for i in idx]) for idx in ((0, 1, 2), (3, 4, 5))]
    cfg, body = train_sft.SFTConfig(), smpl.SMPL()
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.zero_grad()
    losses = [train_sft.sft_loss(policy, body, b, cfg)[0] for b in batches]
    ((losses[0] + losses[1]) / 2).backward()
    grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad.clone()  # noqa: E731
    want = [grad(p) for p in params]
    assert any(g.abs().max() > 0 for g in want)
    policy.zero_grad()
    total, parts = train_sft.accumulate_sft_gradients(policy, body, batches, cfg)
    assert total == pytest.approx((losses[0].item() + losses[1].item()) / 2, rel=1e-6)
    assert set(parts) == {"ce", "nll", "joint_m"}
    for p, g in zip(params, want):
        torch.testing.assert_close(grad(p), g, rtol=1e-5, atol=1e-7)


def test_rft_accumulated_batch_normalises_by_the_whole_batch(sft_dir, tmp_path, monkeypatch):
    """With --micro_batch, a step samples every micro-batch first and divides the loss by the candidates of
    the whole global batch (N = prompts x G x pose samples), not by one micro-batch's."""
    seen, losses = [], []
    real, real_loss = train_rft.global_normalisers, hygrpo.hygrpo_loss
    monkeypatch.setattr(train_rft, "global_normalisers", lambda N, V, *a: seen.append(N) or real(N, V, *a))

    def loss_of_part(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        losses.append(out[1]["loss"])
        return out
    monkeypatch.setattr(hygrpo, "hygrpo_loss", loss_of_part)
    train_rft.main(SMALL + [f"--sft_dir={sft_dir}", f"--out_dir={tmp_path / 'r'}", "--max_steps=2",
                            "--batch_size=4", "--micro_batch=2", "--pose_samples=3", "--num_threads=1",
                            "--gradient_at_mean=0"])
    assert seen == [4 * 2 * 3] * 2
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # each part's loss is already divided by the whole batch's N and V: the step's loss is their sum
    assert [r["loss"] for r in rows] == pytest.approx([losses[0] + losses[1], losses[2] + losses[3]], rel=1e-6)


def test_posecode_loss_scores_only_the_mentioned_codes():
    """train_sft.posecode_loss: the cross-entropy of each mentioned code under a linear classifier, with the
    categories a family does not have masked out. Checked against a hand-built classifier: it is log(C_k)
    for uniform logits over a family's C_k categories, changes when a mentioned code changes and not when an
    unmentioned one does. Catches a loss over every code, or over categories a family does not have."""
    import data
    C = max(len(f.categories) for f in data.POSECODES)
    head = torch.nn.Linear(4, data.K * C)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)  # uniform logits
    h = torch.randn(2, 4)
    codes = torch.zeros(2, data.K, dtype=torch.long)
    mentioned = torch.zeros(2, data.K, dtype=torch.bool)
    k_bend, k_feet = data.POSECODE_INDEX["left_elbow"], data.POSECODE_INDEX["feet_distance"]  # 4 and 3 categories
    mentioned[0, k_bend] = mentioned[1, k_feet] = True
    want = (math.log(4) + math.log(3)) / 2
    assert train_sft.posecode_loss(head, h, codes, mentioned).item() == pytest.approx(want, rel=1e-6)
    other = codes.clone()
    other[0, data.POSECODE_INDEX["torso_roll"]] = 2  # not mentioned: no effect
    assert train_sft.posecode_loss(head, h, other, mentioned).item() == pytest.approx(want, rel=1e-6)
    with torch.no_grad():  # favour category 1 of the left elbow: its code 0 costs more, its code 1 less
        head.bias.view(data.K, C)[k_bend, 1] = 2.0
    worse = train_sft.posecode_loss(head, h, codes, mentioned).item()
    codes[0, k_bend] = 1
    better = train_sft.posecode_loss(head, h, codes, mentioned).item()
    assert better < want < worse
    assert train_sft.posecode_loss(head, h, codes, torch.zeros_like(mentioned)).item() == 0


def test_gradient_at_mean_goes_through_the_registry():
    """The term behind --gradient_at_mean takes each reward registered differentiable with its weight: for
    the joint reward it equals the term written with rewards.joint_reward directly (the numbers of the
    commit before the registry), a student's differentiable reward gets it on its own task, and the old
    flag --joint_pathwise is one line naming the new one. Catches a registered function not used (an edited
    r_joint would not change the term) and a differentiable reward left out."""
    import rewards
    import smpl
    G = 6
    mu0, cands, R_c, valid = _pathwise_setup(G, seed=2)
    V = float(valid.sum())
    mu = mu0.clone().requires_grad_(True)
    J, _ = train_rft.gradient_at_mean(SimpleNamespace(mu=mu, log_std=None), cands, R_c, valid, G, {"joint": 3.0},
                                      None, rewards.RewardContext(), V)
    J.backward()
    mu_old = mu0.clone().requires_grad_(True)  # the term as written before the registry, joint only
    idx = torch.arange(1, 2 * G)
    r = rewards.joint_reward(smpl.pose_joints(mu_old[idx]), cands.gt_joints[idx])
    R = R_c.detach().index_add(0, idx, 3.0 * (r - r.detach()))
    (train_rft.hygrpo.group_advantages(R, valid=valid, group_size=G, hold_stats=True)[valid].sum() / V).backward()
    assert torch.equal(mu.grad, mu_old.grad)

    @rewards.register_reward("test_height", kind="continuous", tasks=("t2p",), differentiable=True)
    def r_height(c, ctx):  # the head's height above the pelvis, metres
        return c.joints[:, smpl.JOINT_INDEX["head"], 1] - c.joints[:, 0, 1]
    try:
        cfg = train_rft.RFTConfig()
        assert train_rft.differentiable_rewards(cfg, {"joint": 1.0, "test_height": 0.5, "semantic": 1.0}) == \
            {"joint": 1.0, "test_height": 0.5}
        mu = mu0.clone().requires_grad_(True)
        J, means = train_rft.gradient_at_mean(SimpleNamespace(mu=mu, log_std=None), cands, R_c, valid, G,
                                              {"test_height": 0.5}, None, rewards.RewardContext(), V)
        J.backward()
        assert mu.grad[:2 * G].abs().max() == 0 and mu.grad[2 * G:].abs().max() > 0  # its t2p group only
        assert set(means) == {"test_height"}
    finally:
        del rewards.REWARDS["test_height"]
    cfg.gradient_at_mean = 0.0
    assert train_rft.differentiable_rewards(cfg, {"joint": 1.0}) == {}
    with pytest.raises(SystemExit, match="--joint_pathwise is now --gradient_at_mean"):
        train_rft.main(["--joint_pathwise=0"])


def test_help_lists_every_setting_with_its_reason(capsys):
    """`--help` (issue 27: every setting discoverable): each script prints every setting of its config as
    --key=default beside the comment in its source, and exits 0 before any work. Catches a setting left
    out of the help, or --help taken for a bad argument."""
    import dataclasses
    for script, cls in ((train_sft, train_sft.SFTConfig), (train_rft, train_rft.RFTConfig)):
        with pytest.raises(SystemExit) as stop:
            script.main(["--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        for f in dataclasses.fields(cls):
            assert f"--{f.name}=" in out, f.name
    with pytest.raises(SystemExit):
        train_sft.main(["--help"])
    line = next(x for x in capsys.readouterr().out.splitlines() if "--head_steps=" in x)
    assert "--head_steps=3000" in line and "the head fit h before h carried the codes" in line
