"""The rewards of Sec. 3.3 (Eq. 7-10), the registry, compute_rewards, and the text-pose retriever.

References: hand-computed numbers, eval.mpjpe (an independent MPJPE), the retriever's own two
encoders run one text at a time (no padding), PoseWorld's exact posecodes, and eval.recall_at_k.
The BGE-M3 embedder has its own tests (test_bge.py).
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data
import eval as E
import rewards
import smpl
from model import Tokenizer
from rewards import (Candidates, MeanPoolEmbedder, PoseTextRetriever, RetrieverConfig, RewardContext,
                     compute_rewards, format_reward, joint_reward, parse_weights, register_reward)

POSE_ANSWER = data.POSE_ANSWER


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    """A small text-to-pose PoseWorld split: captions and body-frame joints."""
    return data.PoseWorld("val", size=48, seed=1, tasks=("t2p",), cache_dir=None)


@pytest.fixture(scope="module")
def tok(world):
    texts = list(world.captions) + [POSE_ANSWER, "Yes, the left hand is above the head.", "No.", "squatting"]
    return Tokenizer.train_bpe(texts, 400)


@pytest.fixture(scope="module")
def retriever(tok):
    """An untrained retriever: the reward plumbing does not depend on what it has learned."""
    torch.manual_seed(0)
    cfg = RetrieverConfig(tok.vocab_size, rewards.tokenizer_fingerprint(tok))
    return PoseTextRetriever(cfg, tok).eval()


class TokenTable:
    """A stand-in for the reference model's hidden_states: a fixed random vector per token id, plus
    a record of the masks it was given."""

    def __init__(self, vocab_size: int, d: int = 16):
        self.table = torch.randn(vocab_size, d, generator=torch.Generator().manual_seed(7))
        self.masks = []

    def __call__(self, input_ids, attention_mask):
        self.masks.append(attention_mask)
        return self.table[input_ids]  # (B, T, d)


def candidates(task, text, valid, joints, gt_joints=None, has_gt=None, caption=None, ref_answer=None):
    N = len(task)
    return Candidates(
        task=list(task), text=list(text), valid=torch.as_tensor(valid, dtype=torch.bool),
        pose=torch.eye(3).expand(N, 24, 3, 3).clone(), joints=joints,
        gt_joints=joints.clone() if gt_joints is None else gt_joints,
        has_gt=torch.as_tensor([t == "i2p" for t in task] if has_gt is None else has_gt, dtype=torch.bool),
        question=["q"] * N,
        caption=list(caption) if caption is not None else [None] * N,
        ref_answer=list(ref_answer) if ref_answer is not None else
        [POSE_ANSWER if t != "vqa" else "yes" for t in task])


@pytest.fixture
def scratch_reward():
    """Registers test-local rewards and removes them afterwards, so REWARDS stays as the module made it."""
    added = []

    def register(name, kind, tasks, fn):
        register_reward(name, kind=kind, tasks=tasks)(fn)
        added.append(name)
    yield register
    for name in added:
        rewards.REWARDS.pop(name, None)


# --- Eq. 7: joint reward --------------------------------------------------------------------------------


def test_joint_reward_by_hand_floor_and_root_translation():
    """Eq. 7 = 1 / mean per-joint error in metres, root-aligned, floored. Catches: a sum instead of a
    mean over joints, a squared distance, no root alignment, a missing or wrong floor."""
    gt = torch.randn(3, 24, 3, generator=torch.Generator().manual_seed(0)) * 0.3
    pred = gt.clone()
    pred[0, 5] += torch.tensor([0.48, 0.0, 0.0])  # one joint 48 cm off: mean error 2 cm
    pred[1, 1:] += torch.tensor([0.03, 0.04, 0.0])  # every non-root joint 5 cm off
    r = joint_reward(pred, gt)
    assert r[0].item() == pytest.approx(1 / 0.02, rel=1e-5)
    assert r[1].item() == pytest.approx(1 / (23 * 0.05 / 24), rel=1e-5)
    assert r[2].item() == pytest.approx(1 / rewards.JOINT_FLOOR)  # perfect pose: 100, not inf
    assert rewards.JOINT_FLOOR == 0.01
    assert joint_reward(pred, gt, floor=0.05)[0].item() == pytest.approx(20.0)  # 2 cm < floor
    # a translation common to all joints of either skeleton does not count
    shifted = joint_reward(pred + torch.tensor([1.0, -2.0, 3.0]), gt - torch.tensor([0.5, 0.0, 0.2]))
    torch.testing.assert_close(shifted, r, rtol=1e-5, atol=0)
    # parity with eval.mpjpe (root-aligned) on random skeletons
    p, g = torch.randn(2, 5, 24, 3)
    torch.testing.assert_close(joint_reward(p, g), 1 / E.mpjpe(p, g))
    with pytest.raises(ValueError, match="same shape"):
        joint_reward(p, g[:, :23])


def test_joint_reward_never_nan():
    """NaN or absurd joints give the worst reward (0), never NaN or inf."""
    gt = torch.zeros(4, 24, 3)
    pred = torch.zeros(4, 24, 3)
    pred[0, 3, 0] = float("nan")
    pred[1, 3, 0] = float("inf")
    pred[2] = 1e30 * torch.randn(24, 3)  # the squared distance overflows float32
    r = joint_reward(pred, gt)
    assert torch.isfinite(r).all()
    assert r[:3].tolist() == [0.0, 0.0, 0.0]
    assert r[3].item() == pytest.approx(100.0)


# --- Eq. 9: format reward -------------------------------------------------------------------------------


FORMAT_CASES = [
    ("The SMPL pose of this person is <POSE>.", 1.0),  # the template
    ("The SMPL pose of this person is <POSE> .", 1.0),  # what the Llama tokenizer decodes it to
    ("  The  SMPL pose of\tthis person is<POSE>.\n", 1.0),  # whitespace is free
    ("The SMPL pose of this person is .", 0.0),  # no <POSE>
    ("The SMPL pose of this person is <POSE><POSE>.", 0.0),  # two
    ("The SMPL pose of this person is <POSE>. <POSE>", 0.0),
    ("the smpl pose of this person is <POSE>.", 0.0),  # case
    ("The SMPL pose of this person is <POSE>", 0.0),  # no full stop
    ("Sure! The SMPL pose of this person is <POSE>.", 0.0),  # chatter before
    ("The SMPL pose of this person is <POSE>. Hope it helps", 0.0),  # chatter after
    ("The SMPL pose of this person is <POSE>.</s>", 0.0),  # the caller strips the EOS, not the reward
    ("The SMPL pose of this person is <POSE.", 0.0),
    ("<POSE>", 0.0),
    ("", 0.0),
    ("\x00\ufffd ## <POS E> ...", 0.0),
]


@pytest.mark.parametrize("text,expected", FORMAT_CASES)
def test_format_reward_battery(text, expected):
    """Eq. 9 by regular expression: strict on words, case, punctuation and exactly one <POSE>; lenient on
    whitespace. Catches a search() instead of a full match, a missing escape of '.', and a regex that
    refuses the tokenizer's own rendering of the template."""
    assert format_reward([text]).tolist() == [expected]


def test_format_reward_accepts_the_tokenizer_round_trip(tok):
    """The answer SFT teaches, after encode + decode with the project tokenizer, still scores 1."""
    decoded = tok.decode(tok.encode(POSE_ANSWER))
    assert format_reward([decoded]).item() == 1.0


def test_template_must_hold_one_pose_token():
    for bad in ("The pose is.", "The pose is <POSE> and <POSE>."):
        with pytest.raises(ValueError, match="exactly one"):
            rewards._template_regex(bad)


# --- adversarial candidates through compute_rewards ---------------------------------------------------


def test_rewards_finite_on_adversarial_candidates(retriever, tok, world):
    """Every reward, through compute_rewards, stays finite whatever the candidate: no pose with NaN in
    its slot, a 'valid' pose with NaN or 1e30 joints, empty and garbage text. Broken poses get the
    worst value of their reward (joint 0, semantic -1); invalid ones get 0 from continuous rewards."""
    J = world.joints[:9].clone()  # (9, 24, 3)
    task = ["i2p", "i2p", "i2p", "t2p", "t2p", "t2p", "t2p", "vqa", "vqa"]
    valid = [True, True, False, True, True, False, True, False, False]
    J[1, 4] = float("nan")  # valid i2p with NaN joints
    J[2] = float("nan")  # invalid i2p: the slot holds NaN
    J[4] = 1e30  # valid t2p with absurd joints
    J[4, 0] = 0.0
    J[5] = float("nan")  # invalid t2p
    J[6, 7] = float("nan")  # valid t2p with NaN joints
    gt = world.joints[:9].clone()
    text = [POSE_ANSWER, "", "<POSE><POSE>", POSE_ANSWER, "\x00\x01 ### ", "", "x", "", "\ufffd" * 50]
    caption = [None, None, None] + list(world.captions[3:7]) + [None, None]
    c = candidates(task, text, valid, J, gt_joints=gt, caption=caption,
                   ref_answer=[POSE_ANSWER] * 7 + ["yes", "the left arm"])
    ctx = RewardContext(retriever=retriever, embedder=MeanPoolEmbedder(TokenTable(tok.vocab_size), tok))
    R_d, R_c, per = compute_rewards(c, ctx, parse_weights(rewards.DEFAULT_WEIGHTS))
    assert set(per) == {"joint", "semantic", "format", "text"}
    for name, r in [("R_d", R_d), ("R_c", R_c), *per.items()]:
        assert r.shape == (9,) and r.dtype == torch.float32, name
        assert torch.isfinite(r).all(), name
    assert per["joint"].tolist()[:3] == [pytest.approx(100.0), 0.0, 0.0]
    assert per["semantic"][4:7].tolist() == [-1.0, 0.0, -1.0]
    assert -1.0 <= per["semantic"][3].item() <= 1.0
    assert per["format"].tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 0]
    assert (R_c[~c.valid] == 0).all()
    assert per["text"][7].item() == 0.0  # empty answer: zero embedding, cosine 0


# --- the registry -------------------------------------------------------------------------------------


def test_registered_reward_enters_compute_rewards(scratch_reward, world, tok):
    """A reward added with the decorator is used: a continuous one moves R_c, and only on its tasks'
    valid candidates; a discrete one moves R_d only on its tasks; each gets only its own candidates;
    weight 0 means it is never called. Catches a registry that compute_rewards ignores, rewards
    leaking into other tasks or the other kind, and a weight-0 reward still being computed."""
    calls = {"pose_bonus": 0, "vqa_bonus": 0}

    def pose_bonus(c, ctx):
        calls["pose_bonus"] += 1
        assert set(c.task) == {"t2p"} and c.valid.all()  # only what it declared, and only with a pose
        return torch.full((len(c),), 2.0)

    def vqa_bonus(c, ctx):
        calls["vqa_bonus"] += 1
        assert set(c.task) == {"vqa"}
        return torch.tensor([float(len(t)) for t in c.text])

    scratch_reward("pose_bonus", "continuous", ("t2p",), pose_bonus)
    scratch_reward("vqa_bonus", "discrete", ("vqa",), vqa_bonus)
    task = ["t2p", "t2p", "i2p", "vqa", "vqa"]
    c = candidates(task, [POSE_ANSWER, "oops", POSE_ANSWER, "abc", "a"], [True, False, True, False, False],
                   world.joints[:5])
    ctx = RewardContext()
    R_d0, R_c0, per0 = compute_rewards(c, ctx, {"format": 1.0, "joint": 1.0})
    R_d, R_c, per = compute_rewards(c, ctx, {"format": 1.0, "joint": 1.0, "pose_bonus": 0.5, "vqa_bonus": 2.0})
    torch.testing.assert_close(R_c - R_c0, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(R_d - R_d0, torch.tensor([0.0, 0.0, 0.0, 6.0, 2.0]))
    assert per["pose_bonus"].tolist() == [2.0, 0.0, 0.0, 0.0, 0.0]
    assert calls == {"pose_bonus": 1, "vqa_bonus": 1}
    # logging means: over the candidates each reward scored (a continuous one: only those with a pose)
    means = rewards.reward_means(c, per)
    assert means["pose_bonus/t2p"] == 2.0 and means["vqa_bonus/vqa"] == 2.0
    assert means["format/t2p"] == 0.5 and means["format/i2p"] == 1.0
    assert "joint/i2p" in means and "joint/t2p" not in means

    _, _, per = compute_rewards(c, ctx, {"format": 1.0, "pose_bonus": 0.0, "vqa_bonus": 0})
    assert calls == {"pose_bonus": 1, "vqa_bonus": 1}  # weight 0: not even called
    assert set(per) == {"format"}
    # a student's reward that returns NaN or inf is turned into 0, not passed on to the advantages
    scratch_reward("broken", "discrete", ("vqa",), lambda c, ctx: torch.tensor([math.nan, math.inf]))
    R_d, _, per = compute_rewards(c, ctx, {"broken": 1.0})
    assert R_d.tolist() == [0.0] * 5 and per["broken"].tolist() == [0.0] * 5
    # no candidate of its tasks: not called either, and it scores 0
    only_i2p = candidates(["i2p"], [POSE_ANSWER], [True], world.joints[:1])
    _, R_c, per = compute_rewards(only_i2p, ctx, {"pose_bonus": 1.0})
    assert calls["pose_bonus"] == 1 and R_c.tolist() == [0.0] and per["pose_bonus"].tolist() == [0.0]


def test_registry_errors(scratch_reward, world):
    """Clear errors: unknown names (listing the registered ones), bad kind / task, a duplicate name, a
    reward returning the wrong shape, and malformed --rewards strings."""
    c = candidates(["t2p"], [POSE_ANSWER], [True], world.joints[:1])
    with pytest.raises(ValueError, match=r"unknown reward.*'nope'.*registered rewards.*'format'"):
        compute_rewards(c, RewardContext(), {"nope": 1.0})
    with pytest.raises(ValueError, match="kind"):
        register_reward("x", kind="pose", tasks=("t2p",))
    with pytest.raises(ValueError, match="tasks"):
        register_reward("x", kind="discrete", tasks=("t2m",))
    with pytest.raises(ValueError, match="already registered"):
        register_reward("format", kind="discrete", tasks=("t2p",))(lambda c, ctx: None)
    scratch_reward("bad_shape", "discrete", ("t2p",), lambda c, ctx: torch.zeros(len(c), 2))
    with pytest.raises(ValueError, match=r"must return a \(1,\) tensor"):
        compute_rewards(c, RewardContext(), {"bad_shape": 1.0})
    with pytest.raises(ValueError, match="needs a text-pose retriever"):
        compute_rewards(candidates(["t2p"], [POSE_ANSWER], [True], world.joints[:1], caption=["x"]),
                        RewardContext(), {"semantic": 1.0})

    assert parse_weights(" joint:1, semantic:0.5 ,format:0,text:2") == {
        "joint": 1.0, "semantic": 0.5, "format": 0.0, "text": 2.0}
    for spec, message in [("", "no rewards"), ("joint", "name:weight"), ("joint:", "name:weight"),
                          ("joint:x", "not a number"), ("joint:nan", "not finite"),
                          ("joint:1,joint:2", "twice"), ("jiont:1", "unknown reward 'jiont'")]:
        with pytest.raises(ValueError, match=message):
            parse_weights(spec)


# --- Eq. 8: semantic reward -----------------------------------------------------------------------------


def test_semantic_reward_is_the_cosine_of_the_two_encoders(retriever, world):
    """R_semantic = cos(phi_t(caption), phi_p(joints)), checked against the encoders run one text at a
    time on the raw token ids (no padding, no batching, no caption de-duplication). Catches padding
    leaking into phi_t, captions matched to the wrong rows, and a missing normalisation; phi_p must
    ignore the global orientation."""
    n = 6
    caption = [world.captions[0]] * 3 + list(world.captions[1:4])  # G = 3 candidates share a caption
    J = world.joints[:n]
    c = candidates(["t2p"] * n, [POSE_ANSWER] * n, [True] * n, J, caption=caption)
    _, R_c, per = compute_rewards(c, RewardContext(retriever=retriever), {"semantic": 1.0})
    expected = []
    with torch.no_grad():
        for i in range(n):
            ids = torch.tensor([retriever.tokenizer.encode(caption[i])])  # (1, T) no padding
            t = retriever.text_features(ids, torch.ones_like(ids, dtype=torch.bool))[0]  # (d,)
            p = retriever.pose_features(J[i:i + 1])[0]  # (d,)
            expected.append(float(F.cosine_similarity(t, p, dim=0)))
    torch.testing.assert_close(per["semantic"], torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(R_c, per["semantic"])
    # a random global rotation of the generated pose leaves the reward unchanged
    R = smpl.axis_angle_to_matrix(torch.randn(n, 3))  # (n, 3, 3)
    J_rot = (J - J[:, :1]) @ R.mT + J[:, :1]  # (n, 24, 3)
    rotated = rewards.semantic_reward(retriever, caption, J_rot)
    torch.testing.assert_close(rotated, per["semantic"], atol=1e-4, rtol=0)


# --- Eq. 10: text reward with the mean-pooling stand-in -----------------------------------------------


def test_text_reward_mean_pool_embedder(tok):
    """MeanPoolEmbedder = L2-normalised mean of the hidden states of the text's tokens, BOS left out,
    padding left out; identical texts give 1. Catches pooling over padding or over the BOS, a missing
    normalisation, and rows of a batch swapped."""
    table = TokenTable(tok.vocab_size)
    emb = MeanPoolEmbedder(table, tok, batch_size=3)
    texts = ["yes", "The left hand is above the head.", "no", "squatting with the arms up", ""]
    e = emb.embed(texts)
    for i, text in enumerate(texts[:4]):
        ids = tok.encode(text)  # the text's tokens, no BOS
        expected = F.normalize(table.table[ids].mean(0), dim=0)
        torch.testing.assert_close(e[i], expected)
    assert e[4].abs().sum() == 0  # nothing to pool
    assert all(m[:, 0].all() for m in table.masks)  # the BOS is fed, as the model saw it in training
    sim = rewards.text_similarity(emb, texts, texts)
    torch.testing.assert_close(sim[:4], torch.ones(4))
    assert sim[4] == 0.0
    assert rewards.text_similarity(emb, ["yes"], ["The left hand is above the head."]).item() < 0.99

    c = candidates(["vqa", "vqa", "t2p"], ["yes", "no", POSE_ANSWER], [False, False, True],
                   torch.zeros(3, 24, 3), ref_answer=["yes", "yes", POSE_ANSWER])
    R_d, _, per = compute_rewards(c, RewardContext(embedder=emb), {"text": 1.0})
    torch.testing.assert_close(R_d[:2], rewards.text_similarity(emb, ["yes", "no"], ["yes", "yes"]))
    assert R_d[0].item() == pytest.approx(1.0) and R_d[2].item() == 0.0

    with pytest.raises(ValueError, match=r"\(B, T, d\)"):
        MeanPoolEmbedder(lambda ids, mask: torch.zeros(ids.shape[0], 4), tok).embed(["yes"])


def test_text_similarity_embeds_each_text_once(tok):
    """A VQA prompt's G x pose_samples candidates repeat a few answers and one reference: each distinct text is
    embedded once, and every pair still gets the cosine of its own two texts (rows not mixed up)."""
    seen = []

    class Counting(MeanPoolEmbedder):
        def embed(self, texts):
            seen.extend(texts)
            return super().embed(texts)

    emb = Counting(TokenTable(tok.vocab_size), tok)
    preds = ["yes", "no", "yes", "squatting", "no", "yes"]
    refs = ["no", "no", "no", "yes", "yes", "no"]
    sim = rewards.text_similarity(emb, preds, refs)  # (6,)
    assert sorted(seen) == ["no", "squatting", "yes"]
    e = dict(zip(["yes", "no", "squatting"], emb.embed(["yes", "no", "squatting"])))
    torch.testing.assert_close(sim, torch.stack([e[p] @ e[r] for p, r in zip(preds, refs)]))


# --- the retriever: data helpers, save / load, learning -------------------------------------------------


def test_split_halves_disjoint_and_complete():
    """The reward and evaluation retrievers must never share a caption (Table 6's cross check)."""
    a, b = rewards.split_halves(101, seed=3)
    assert len(a) == 51 and len(b) == 50
    assert set(a.tolist()).isdisjoint(b.tolist()) and set(a.tolist()) | set(b.tolist()) == set(range(101))
    assert torch.equal(a, rewards.split_halves(101, seed=3)[0])
    assert not torch.equal(a, rewards.split_halves(101, seed=4)[0])


def test_mirror_augmentation_swaps_sides(world):
    """The left-right flip of the training augmentation: a mirrored pose's left-side posecodes are the
    original's right-side ones, side-free codes are unchanged, and the text swaps left and right.
    Catches a flip of the wrong axis or a missing swap of the joints."""
    J = world.joints_body  # (N, 24, 3)
    Jm = rewards.mirror_joints(J)
    flip = torch.tensor([-1.0, 1.0, 1.0])
    torch.testing.assert_close(Jm[:, smpl.JOINT_INDEX["left_wrist"]] * flip,
                               data.body_frame_joints(J)[:, smpl.JOINT_INDEX["right_wrist"]])
    k = data.POSECODE_INDEX
    pairs = [(f"left_{f}", f"right_{f}") for f in ("elbow", "knee", "hand_height")]
    pairs += [(f, f) for f in ("hands_distance", "feet_distance", "hips_height", "torso_pitch")]
    codes, codes_m = data.posecodes(J), data.posecodes(Jm)  # (N, K)
    sure = data.unambiguous_posecodes(J)  # (N, K) far from a boundary: the 1 cm skeleton asymmetry cannot flip them
    for a, b in pairs + [(b, a) for a, b in pairs]:
        rows = sure[:, k[a]]
        assert torch.equal(codes_m[rows, k[b]], codes[rows, k[a]]), (a, b)
    assert rewards.mirror_text("Their left knee is right of the Right hand.") == \
        "Their right knee is left of the Left hand."


def test_text_features_by_length_equals_one_padded_batch(retriever, world):
    """train_retriever runs each batch's texts in runs of similar length (text_features_by_length): the
    features and their gradients must equal text_features on the whole batch padded to its longest text,
    row for row. Catches rows put back in the wrong order, a run cut shorter than its longest text, and
    padding that leaks into a text's features."""
    texts = [world.captions[i] for i in range(20)] + ["", "left"]  # very short ones too
    ids, mask = retriever.tokenize(texts)  # (22, T) padded to the longest
    assert len(set(mask.sum(1).tolist())) > 4  # lengths that differ, so the runs are cut differently
    grads = []
    for f in (lambda: retriever.text_features(ids, mask), lambda: retriever.text_features_by_length(ids, mask, 4)):
        retriever.zero_grad(set_to_none=True)
        e = f()  # (22, d)
        (e * torch.arange(e.numel()).view_as(e).float().sin()).sum().backward()  # a different weight per entry
        grads.append((e.detach(), [p.grad.clone() for p in retriever.parameters() if p.grad is not None]))
    (e0, g0), (e1, g1) = grads
    torch.testing.assert_close(e1, e0, atol=1e-6, rtol=1e-5)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    retriever.zero_grad(set_to_none=True)


def test_retriever_save_load_round_trip_and_mismatches(retriever, tok, world, tmp_path):
    """save / load keeps every weight (identical embeddings) and reads the folder's tokenizer; a config
    that does not fit the weights, another tokenizer, or a missing file fail with errors that say so."""
    path = str(tmp_path / "retriever_reward")
    retriever.save(path, train_info={"note": "untrained"})
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    for loaded in (PoseTextRetriever.load(path), PoseTextRetriever.load(path, tokenizer=tok)):
        assert torch.equal(loaded.encode_text(world.captions[:10]), retriever.encode_text(world.captions[:10]))
        assert torch.equal(loaded.encode_pose(world.joints[:10]), retriever.encode_pose(world.joints[:10]))

    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    assert saved["train"] == {"note": "untrained"}
    saved["config"]["d_embed"] = 32
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(saved, f)
    wrong_shape = r"does not match.*shapes.*text_proj\.weight: file \(64, 64\) vs config \(32, 64\)"
    with pytest.raises(ValueError, match=wrong_shape):
        PoseTextRetriever.load(path)
    saved["config"]["d_embed"] = 64
    saved["config"]["extra"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        PoseTextRetriever.load(path)

    other = Tokenizer.train_bpe(["completely different text"], tok.vocab_size)
    retriever.save(path)
    with pytest.raises(ValueError, match="another tokenizer"):
        PoseTextRetriever.load(path, tokenizer=other)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        PoseTextRetriever.load(path)


@pytest.fixture
def one_thread():
    """Train on one thread: on a CPU shared with other jobs, two OpenMP threads that wait on each other
    at every small matmul made training ten times slower here. The setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_retriever_learns_on_poseworld(one_thread):
    """After a short contrastive training on 4000 PoseWorld train captions, full retrieval among 200
    held-out val pairs finds the right partner in the top 10 far above chance (10/200 = 5%). PoseWorld
    captions name ~3 posecodes, so many poses fit one: even an oracle that knows the posecodes gets
    R@10 = 56% on this val set. Catches a broken loss (e.g. labels not on the diagonal), encoders that
    ignore their input, or a pose encoder that overfits without learning the text."""
    train = data.PoseWorld("train", size=4000, seed=0, tasks=("t2p",), cache_dir=None)
    val = data.PoseWorld("val", size=200, seed=0, tasks=("t2p",), cache_dir=None)
    tok = Tokenizer.train_bpe(train.captions, 1000)
    model = rewards.train_retriever(train.joints, train.captions, tok, steps=300, batch_size=128,
                                    lr=1e-3, seed=0, progress=False)
    recall = E.recall_at_k(model.encode_text(val.captions), model.encode_pose(val.joints))
    print(f"retriever: {model.train_info}, val recall {recall}")
    assert recall["t2p@10"] > 30.0 and recall["p2t@10"] > 30.0, recall
    assert math.isfinite(model.train_info["final_loss"]) and model.train_info["final_loss"] < math.log(128)


def test_contrastive_loss_with_hard_negatives_by_hand():
    """rewards.contrastive_loss: the symmetric InfoNCE, and with extra_poses the twins join the candidates
    of the text-to-pose side only. Two pairs and one twin each, numbers worked out by hand:
    text 0 = (1, 0), text 1 = (0, 1); pose 0 = (1, 0), pose 1 = (0, 1); twins (0.6, 0.8) and (0.8, 0.6);
    scale 2. Logits text->pose: [[2, 0 | 1.2, 1.6], [0, 2 | 1.6, 1.2]]. Catches twins left out, twins
    added to the pose-to-text side, or a wrong target."""
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tw = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    s = torch.tensor(2.0)
    plain = -2 + math.log(math.exp(2) + math.exp(0))  # each row and column: target logit 2, other 0
    assert abs(rewards.contrastive_loss(t, p, s).item() - plain) < 1e-6
    t2p = -2 + math.log(math.exp(2) + math.exp(0) + math.exp(1.2) + math.exp(1.6))
    expected = 0.5 * (t2p + plain)
    assert abs(rewards.contrastive_loss(t, p, s, extra_poses=tw).item() - expected) < 1e-6


@pytest.mark.slow
def test_hard_negatives_teach_the_retriever_to_rank_a_pose_above_its_twin(one_thread):
    """A retriever trained with twins (data.twin_poses) as hard negatives prefers a held-out caption's own
    pose to a twin that breaks one of its codes more often than the same retriever trained without them:
    what the semantic reward needs to rank a policy's samples. Catches hard negatives that never reach
    the loss (the two runs would be identical) or that are mirrored apart from their pose."""
    train = data.PoseWorld("train", size=3000, seed=0, tasks=("t2p",), cache_dir=None)
    val = data.PoseWorld("val", size=300, seed=0, tasks=("t2p",), cache_dir=None)
    tok = Tokenizer.train_bpe(train.captions, 1000)
    g = torch.Generator().manual_seed(1)
    twins, _ = data.twin_poses(train.pose_body, train.codes, train.mentioned, g)
    val_twins, broken = data.twin_poses(val.pose_body, val.codes, val.mentioned, g)
    wins = {}
    for name, hard in (("plain", None), ("hard", twins)):
        model = rewards.train_retriever(train.joints_body, train.captions, tok, steps=200, batch_size=128,
                                        lr=1e-3, seed=0, progress=False, hard_negatives=hard)
        text = model.encode_text(val.captions)  # (n, d)
        own = (text * model.encode_pose(val.joints_body)).sum(-1)  # (n,) cosine with the caption's pose
        twin = (text * model.encode_pose(val_twins)).sum(-1)  # (n,) with its twin
        wins[name] = (own > twin)[broken].float().mean().item()
    print(f"share of val captions whose own pose beats its twin: {wins}")
    assert wins["hard"] > wins["plain"] + 0.05, wins


# --- the oracle diagnostic (not in the paper) -----------------------------------------------------------


def test_oracle_reward_is_the_exact_posecode_check(world):
    """`oracle` scores a text-to-pose candidate by the share of its caption's posecodes the pose
    satisfies. Catches: codes or mentioned not carried through compute_rewards / Candidates.select (a
    caption's own pose must score 1, another caption's pose less), a broken pose scoring above 0, and
    the reward reading a field other than the prompt's codes."""
    n = 8
    J = world.joints_body[:n]  # (n, 24, 3) each caption's own pose
    other = world.joints_body[n:2 * n]  # (n, 24, 3) poses of other captions
    joints = torch.cat([J, other, J[:1] * float("nan")])  # (2n + 1, 24, 3)
    codes = torch.cat([world.codes[:n]] * 2 + [world.codes[:1]])  # (2n + 1, K)
    mentioned = torch.cat([world.mentioned[:n]] * 2 + [world.mentioned[:1]])  # (2n + 1, K)
    c = candidates(["t2p"] * (2 * n + 1), [POSE_ANSWER] * (2 * n + 1), [True] * (2 * n + 1), joints,
                   caption=list(world.captions[:n]) * 2 + [world.captions[0]])
    c.codes, c.mentioned = codes, mentioned
    _, R_c, per = compute_rewards(c, RewardContext(), {"oracle": 1.0})
    expected = data.check_posecodes(other, world.codes[:n], world.mentioned[:n])  # (n,)
    assert torch.equal(R_c[:n], torch.ones(n))
    assert torch.allclose(R_c[n:2 * n], expected)
    assert expected.mean() < 0.9  # the check discriminates: other poses miss some codes
    assert R_c[-1] == 0
    assert "oracle" not in parse_weights(rewards.DEFAULT_WEIGHTS)  # a diagnostic, not one of the paper's
    with pytest.raises(ValueError, match="oracle"):  # data without posecodes: a clear error
        compute_rewards(candidates(["t2p"], [POSE_ANSWER], [True], J[:1], caption=["x"]), RewardContext(),
                        {"oracle": 1.0})


def test_registering_again_replaces_the_same_reward():
    """A notebook cell that defines and registers a reward, run twice (the second time edited), replaces
    the first registration; another function under a taken name is still refused. Catches the registry
    refusing a re-run cell, or silently letting a different reward take over a name."""
    def cell():
        @register_reward("rerun_me", kind="continuous", tasks=("t2p",))
        def r_rerun_me(c, ctx):
            return torch.zeros(len(c))
        return r_rerun_me

    try:
        first, second = cell(), cell()
        assert rewards.REWARDS["rerun_me"].fn is second and first is not second
        with pytest.raises(ValueError, match="already registered"):
            register_reward("rerun_me", kind="continuous", tasks=("t2p",))(lambda c, ctx: torch.zeros(len(c)))
    finally:
        rewards.REWARDS.pop("rerun_me", None)


def test_candidate_fields_are_checked_by_their_declaration():
    """Candidates checks every field from its declaration alone (lists: one entry per candidate; tensors:
    per_candidate's shape and dtype; optional ones may be None), so a new field needs no check of its own.
    Catches a wrong row count, a wrong trailing shape or dtype slipping through."""
    N = 2
    ok = dict(task=["t2p"] * N, text=["a"] * N, valid=torch.ones(N, dtype=torch.bool), pose=torch.zeros(N, 24, 3, 3),
              joints=torch.zeros(N, 24, 3), gt_joints=torch.zeros(N, 24, 3), has_gt=torch.zeros(N, dtype=torch.bool),
              question=["q"] * N, caption=[None] * N, ref_answer=["r"] * N)
    assert len(Candidates(**ok)) == N
    assert Candidates(**ok, codes=torch.zeros(N, 5, dtype=torch.long)).codes.shape == (N, 5)
    for bad, match in [({"question": ["q"]}, "question has 1 entries"),
                       ({"joints": torch.zeros(N, 23, 3)}, r"joints must have shape \(N=2, 24, 3\)"),
                       ({"valid": torch.ones(N)}, "valid must be a torch.bool tensor"),
                       ({"codes": torch.zeros(N + 1, 5)}, r"codes must have shape \(N=2, K\)")]:
        with pytest.raises(ValueError, match=match):
            Candidates(**{**ok, **bad})
