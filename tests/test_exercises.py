"""The README's class exercises stay runnable: each exercise's reward or flag runs a few RFT steps of a
very small tiny-preset model, and the exercise rewards are checked by hand. These test that the code
of an exercise works after a change elsewhere, not what a student should find (the README has that)."""
import json
import math
import os

import pytest
import torch

import data
import rewards
import train_rft
import train_sft
from rewards import Candidates, RewardContext, compute_rewards

SMALL = ["--poseworld_size=120", "--G=2", "--batch_size=4", "--max_new_tokens=12", "--eval=false",
         "--gallery_every=1000", "--save_every=2", "--max_steps=2", "--num_threads=1", "--pose_samples=2"]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    # enough steps at a high rate that the answers follow the template, so there are poses to reward
    cfg = train_sft.SFTConfig(out_dir=str(out), head_steps=20, max_steps=60, batch_size=8, lr=3e-3, poseworld_size=120,
                              retriever_pairs=120, retriever_steps=2, retriever_batch=32, vocab_size=400,
                              pretrain_steps=3, pretrain_images=64, pretrain_batch=8,
                              save_every=60, warmup_steps=2, num_threads=1)
    train_sft.main(cfg=cfg)
    return str(out)


def run_exercise(sft_dir, tmp_path, *flags):
    """A 2-step RFT run with the exercise's flags; returns its metrics.jsonl rows."""
    out = str(tmp_path / "rft")
    train_rft.main(SMALL + [f"--sft_dir={sft_dir}", f"--out_dir={out}", *flags])
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def finite_somewhere(rows, key):
    values = [r[key] for r in rows if key in r]
    return len(values) == len(rows) and any(math.isfinite(v) for v in values)


def test_joint_angles_invert_poseworld_angles():
    """rewards.joint_angles undoes data.euler_to_matrix (R = Ry Rz Rx): catches a wrong order or sign."""
    g = torch.Generator().manual_seed(0)
    u = lambda bound: torch.empty(50).uniform_(-bound, bound, generator=g)  # noqa: E731
    angles = torch.stack([u(170), u(170), u(85)], -1)  # (50, 3) degrees, |z| < 90 (no gimbal lock)
    assert torch.allclose(rewards.joint_angles(data.euler_to_matrix(angles)), angles, atol=1e-3)


def _candidates(pose):
    """Candidates for t2p poses given as axis-angle (n, 24, 3) in the body frame."""
    import smpl
    n = pose.shape[0]
    J = smpl.pose_joints(pose)
    return Candidates(task=["t2p"] * n, text=[data.POSE_ANSWER] * n, valid=torch.ones(n, dtype=torch.bool),
                      pose=smpl.axis_angle_to_matrix(pose), joints=J, gt_joints=J,
                      has_gt=torch.zeros(n, dtype=torch.bool), question=["q"] * n, caption=["c"] * n,
                      ref_answer=[data.POSE_ANSWER] * n)


def test_exercise_rewards_by_hand():
    """`limits` is 0 for PoseWorld poses (made within the limits) and negative for a knee bent the wrong
    way; `symmetry` is 0 for the rest pose and negative for one raised arm. Catches a reward of the
    wrong sign (RFT would then push towards implausible or lopsided poses without saying so)."""
    world = data.PoseWorld("val", size=40, seed=0, tasks=("t2p",), cache_dir=None)
    inside = compute_rewards(_candidates(world.pose_body), RewardContext(), {"limits": 1.0})[1]
    assert (inside.abs() < 1e-3).float().mean() >= 0.9  # all but gimbal-locked arms (r_limits' caveat)
    bad = torch.zeros(1, 24, 3)
    knee = data.J_["left_knee"]
    bad[0, knee] = torch.deg2rad(torch.tensor([-90.0, 0.0, 0.0]))  # hyper-extended: far outside the knee's range
    assert compute_rewards(_candidates(bad), RewardContext(), {"limits": 1.0})[1][0] < -0.3
    rest, arm = torch.zeros(1, 24, 3), torch.zeros(1, 24, 3)
    arm[0, 16] = torch.tensor([0.0, 0.0, -1.4])  # one shoulder turned: an arm up on one side only
    sym = compute_rewards(_candidates(torch.cat([rest, arm])), RewardContext(), {"symmetry": 1.0})[1]
    assert abs(sym[0]) < 0.02 and sym[1] < sym[0] - 0.02


@pytest.mark.slow
def test_exercise_plausibility_reward_runs(sft_dir, tmp_path):
    """Exercise 3: `limits` beside the paper's rewards, on both pose tasks."""
    rows = run_exercise(sft_dir, tmp_path, "--rewards=joint:1,semantic:1,format:1,text:1,limits:0.5")
    assert finite_somewhere(rows, "reward/limits/t2p") or finite_somewhere(rows, "reward/limits/i2p")


@pytest.mark.slow
def test_exercise_symmetry_reward_runs(sft_dir, tmp_path):
    """Exercise 2 (reward hacking): `symmetry` in place of the semantic reward."""
    rows = run_exercise(sft_dir, tmp_path, "--rewards=joint:1,symmetry:1,format:1,text:1", "--task_mix=t2p:1")
    assert finite_somewhere(rows, "reward/symmetry/t2p")
    assert all(r["reward/symmetry/t2p"] <= 0 for r in rows)


@pytest.mark.slow
def test_exercise_format_off_at_high_temperature_runs(sft_dir, tmp_path):
    """Exercise 1: the format reward removed, sampling at temperature 1.5 (format still logged by eval)."""
    rows = run_exercise(sft_dir, tmp_path, "--rewards=joint:1,semantic:1,format:0,text:1", "--temperature=1.5")
    assert not any(k.startswith("reward/format/") for r in rows for k in r)


@pytest.mark.slow
def test_exercise_eval_retriever_as_reward_runs(sft_dir, tmp_path, monkeypatch):
    """Exercise 4: --reward_retriever=eval loads retriever_eval as the semantic reward's model."""
    loaded = []
    original = rewards.PoseTextRetriever.load
    def spy(cls, path, *args, **kwargs):
        loaded.append(os.path.basename(path))
        return original(path, *args, **kwargs)
    monkeypatch.setattr(rewards.PoseTextRetriever, "load", classmethod(spy))
    rows = run_exercise(sft_dir, tmp_path, "--reward_retriever=eval", "--task_mix=t2p:1")
    assert loaded[0] == "retriever_eval" and finite_somewhere(rows, "reward/semantic/t2p")
    with pytest.raises(SystemExit, match="reward_retriever"):
        train_rft.main(SMALL + [f"--sft_dir={sft_dir}", f"--out_dir={tmp_path / 'x'}", "--reward_retriever=other"])


@pytest.mark.slow
def test_exercise_grpo_runs(sft_dir, tmp_path):
    """Exercise 5: --algo=grpo (Fig. 4's baseline) runs its steps with a finite loss (hygrpo_loss's
    discrete_only term itself is checked in tests/test_hygrpo.py)."""
    rows = run_exercise(sft_dir, tmp_path, "--algo=grpo")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
def test_exercise_kl_estimator_runs(sft_dir, tmp_path):
    """Exercise 6: GRPO's k3 pose KL at one beta 0.04 instead of the default closed form; the loss's kl_c
    is then k3, and the closed form is still logged beside it."""
    rows = run_exercise(sft_dir, tmp_path, "--pose_kl=k3", "--beta=0.04", "--beta_i2p=0.04")
    assert all(math.isfinite(r["kl_c"]) and math.isfinite(r["kl_c_exact"]) for r in rows)


@pytest.mark.slow
def test_exercise_oracle_reward_runs(sft_dir, tmp_path):
    """Exercise 7: the exact checker as the text-to-pose reward, and the logged agreement is NaN without
    the semantic reward (nothing to compare)."""
    rows = run_exercise(sft_dir, tmp_path, "--rewards=joint:1,oracle:1,format:1,text:1", "--task_mix=t2p:1")
    assert finite_somewhere(rows, "reward/oracle/t2p")
    assert all(0 <= r["reward/oracle/t2p"] <= 1 for r in rows)


@pytest.mark.slow
def test_exercise_beta_nll_sft_runs(tmp_path):
    """Exercise 9: the main job with its SFT trained by beta-NLL (--sft_overrides=nll_beta=1); the SFT
    checkpoint records the setting, and RFT runs from it."""
    sft = tmp_path / "sft"
    overrides = "nll_beta=1;max_steps=4;head_steps=20;batch_size=4;retriever_pairs=120;retriever_steps=2;retriever_batch=32;vocab_size=400;pretrain_steps=3;pretrain_images=64;pretrain_batch=8"
    rows = run_exercise(str(sft), tmp_path, f"--sft_overrides={overrides}")
    saved = json.load(open(sft / "checkpoint" / "config.json"))["extra"]["config"]
    assert saved["nll_beta"] == 1.0 and saved["max_steps"] == 4
    assert len(rows) == 2


@pytest.mark.slow
def test_exercise_likelihood_ratio_alone_runs(sft_dir, tmp_path):
    """Exercise 10: the default adds the joint reward's gradient at the mean, and logs the joint reward of
    the image-to-pose answers' means it scored (joint_at_mean, as Eq. 7's 1 / error); --gradient_at_mean=0
    leaves it out, the paper's Eq. 6 alone."""
    default = run_exercise(sft_dir, tmp_path / "default", "--task_mix=i2p:1")
    assert finite_somewhere(default, "joint_at_mean")
    assert all(r["joint_at_mean"] > 0 for r in default if math.isfinite(r["joint_at_mean"]))
    alone = run_exercise(sft_dir, tmp_path / "alone", "--task_mix=i2p:1", "--gradient_at_mean=0")
    assert not any("joint_at_mean" in r for r in alone)
