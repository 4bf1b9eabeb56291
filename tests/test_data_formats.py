"""Conversation format, tokenisation, collation, image preprocessing, sharded loading and the real-data
loaders (data.py). The loaders read small files that these tests
write in the exact layout of the public releases, and must reject broken ones."""
import io
import json
import os
import pickle
import re
import struct
import sys

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import data as D

ANSWER = D.POSE_ANSWER

# ----------------------------------------------------------------------------------------------------
# Tokenizers


class TinyTokenizer:
    """Word-level stand-in with the interface of model.Tokenizer and the Llama conventions that matter
    here: a leading space is the "▁" at the start of the next piece, "▁" is prepended to the text (the
    dummy prefix), added tokens stay whole. New pieces get new ids on first sight."""
    ADDED = ("<image>", "<POSE>", "</s>")

    def __init__(self, with_pad=True):
        self.vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<image>", "<POSE>"])}
        self.pad_id = self._id("<pad>") if with_pad else None
        self.bos_id, self.eos_id = 1, 2

    def _id(self, piece):
        return self.vocab.setdefault(piece, len(self.vocab))

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text, add_bos=False):
        ids = [self.bos_id] if add_bos else []
        for k, part in enumerate(re.split("(<image>|<POSE>|</s>)", text)):
            if part in self.ADDED:
                ids.append(self.vocab[part])
            elif part:
                norm = ("▁" if k == 0 else "") + part.replace(" ", "▁")
                ids += [self._id(p) for p in re.findall(r"▁?[A-Za-z0-9']+|▁?[^A-Za-z0-9'▁]|▁", norm)]
        return ids

    def decode(self, ids):
        inv = {i: t for t, i in self.vocab.items()}
        text = "".join(inv[int(i)] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def llama_style_bpe(layout):
    """A real byte-pair encoder from the `tokenizers` library with Llama's space rule, trained on
    conversation text, wrapped in the duck-typed interface. Trained with whole-word pre-tokens, so like
    the Llama vocabulary no piece has "▁" inside. layout "legacy" is the tokenizer.json that llava-hf ships
    (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer), "metaspace" the newer one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    corpus = [D.build_prompt(q, img) + " " + a + "</s>"
              for q in ["What is the pose?", "Describe the image.", "Is the person sitting?"]
              for img in (True, False) for a in [ANSWER, "Yes, the person is sitting on a chair."]] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<image>", "<POSE>"])
    tk.train_from_iterator(corpus, trainer)
    if layout == "legacy":
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.pre_tokenizer = None
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])

    class HFTokenizer:
        bos_id, eos_id, pad_id = tk.token_to_id("<s>"), tk.token_to_id("</s>"), None

        def encode(self, text, add_bos=False):
            return ([self.bos_id] if add_bos else []) + tk.encode(text, add_special_tokens=False).ids

        def decode(self, ids):
            return tk.decode(list(ids), skip_special_tokens=False)

        def token_to_id(self, token):
            return tk.token_to_id(token)

    return HFTokenizer(), tk


def sample(task="t2p", question="Make a squat.", answer=ANSWER, image=None, pose=None, **extra):
    return {"task": task, "question": question, "answer": answer, "image": image, "pose": pose,
            "joints": None, **extra}


# ----------------------------------------------------------------------------------------------------
# Conversation format and tokenisation


def test_build_prompt_is_llava_v1():
    """The exact LLaVA-1.5 (conv_vicuna_v1) string; catches a wrong system prompt, separator or image line."""
    expected = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? "
                "ASSISTANT:")
    assert D.build_prompt("What is this?", has_image=True) == expected
    assert D.build_prompt("What is this?", has_image=False) == expected.replace("<image>\n", "")
    with pytest.raises(ValueError, match="must not contain"):
        D.build_prompt("<image>\nWhat is this?", has_image=True)


def test_the_system_line_follows_the_policy_config():
    """The tiny preset's prompts leave LLaVA's system line out, the 7B recipe's keep it, and a checkpoint
    saved before the choice existed reads as LLaVA's. Catches a policy trained on one template and
    sampled or evaluated on the other (collate_fn must take it from the policy's config), and the
    tokenizer and the prompt disagreeing on it."""
    import model as M
    import train_sft
    assert D.build_prompt("What is this?", True, system="") == "USER: <image>\nWhat is this? ASSISTANT:"
    world = D.PoseWorld("val", size=30, seed=5, cache_dir=None)
    tok = M.Tokenizer.train_bpe(train_sft.poseworld_texts(world, ""), 400)
    tiny = train_sft.build_policy(train_sft.SFTConfig(), tok, "cpu")
    saved = M.PoseLLaVAConfig.from_dict(tiny.config.to_dict())
    assert tiny.config.system_prompt == "" and D.prompt_system(saved) == ""
    old = tiny.config.to_dict()
    del old["system_prompt"]
    assert D.prompt_system(M.PoseLLaVAConfig.from_dict(old)) == D.LLAVA_SYSTEM
    sft, _ = M.resolve_config(train_sft.SFTConfig(), ["--preset=llava-1.5-7b"], train_sft.RECIPES)
    assert train_sft.system_prompt(sft) is None  # the paper's template
    samples = [world[i] for i in range(4)]
    for generation in (False, True):
        batch = D.collate_fn(tok, tiny, generation)(samples)
        with_line = D.collate(samples, tok, tiny.n_image_tokens, tiny.config.clip_size, tiny.config.pose_size,
                              generation, system=D.LLAVA_SYSTEM)
        real = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        assert real[0] == tok.bos_id and tok.decode(real[1:]).lstrip().startswith("USER:")
        line = len(tok.encode(D.LLAVA_SYSTEM + " USER:")) - len(tok.encode("USER:"))
        assert (with_line["attention_mask"].sum(1) - batch["attention_mask"].sum(1)).tolist() == [line] * 4


def test_collated_labels_only_on_answer_and_eos():
    """Loss only on the answer: catches labels on the prompt, on the image tokens or on padding, a missing
    eos label, a miscounted image expansion, rows that are not right-padded, and a pose used where the
    sample says has_pose=False."""
    tok, n_img = TinyTokenizer(), 7
    img = torch.randint(0, 256, (3, 20, 16), dtype=torch.uint8)
    batch_samples = [sample(),
                     sample("i2p", "What is the pose of this person?", image=img, pose=torch.zeros(24, 3)),
                     sample("vqa", "Is it sunny today?", "Yes, it is sunny.", image=img,
                            pose=torch.ones(24, 3), has_pose=False)]  # a pose kept but flagged absent
    batch = D.collate(batch_samples, tok, n_img, clip_size=8, pose_size=(8, 6))
    image_id = tok.token_to_id("<image>")
    for b, s in enumerate(batch_samples):
        ids, labels, mask = batch["input_ids"][b], batch["labels"][b], batch["attention_mask"][b]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == tok.pad_id).all() and (labels[n:] == D.IGNORE_INDEX).all()
        assert int((ids == image_id).sum()) == (n_img if s["image"] is not None else 0)
        trained = labels != D.IGNORE_INDEX
        k = int(trained.nonzero()[0])  # first trained position; everything after it up to n is trained
        assert trained[k:n].all() and not trained[:k].any()
        assert torch.equal(labels[k:n], ids[k:n])
        assert ids[n - 1] == tok.eos_id
        assert tok.decode(ids[k:n - 1].tolist()) == s["answer"]
        assert tok.decode(ids[1:k].tolist()).endswith("ASSISTANT:")
    assert batch["image_index"].tolist() == [1, 2]
    assert batch["clip_pixels"].shape == (2, 3, 8, 8) and batch["pose_pixels"].shape == (2, 3, 8, 6)
    assert batch["has_pose"].tolist() == [False, True, False] and batch["pose"].shape == (3, 24, 3)
    assert (batch["pose"][2] == 0).all()
    assert batch["task"] == ["t2p", "i2p", "vqa"] and batch["answer"][2] == "Yes, it is sunny."


@pytest.mark.parametrize("layout", ["legacy", "metaspace"])
def test_answer_boundary_matches_whole_conversation_in_llama_bpe(layout):
    """With a real Llama-style BPE, prompt + answer ids equal the tokenisation of the whole LLaVA
    conversation, the answer starts with a "▁word" piece, and the prompt ids are what generation sees.
    Catches encoding " " + answer on its own, which in llava-hf's (legacy) layout adds a stray "▁" token
    (asserted below); in the metaspace layout both ways happen to agree."""
    tok, tk = llama_style_bpe(layout)
    n_img = 5
    s = sample("i2p", "What is the pose?", image=torch.zeros(3, 8, 8, dtype=torch.uint8))
    ids, labels = D.encode_sample(s, tok, n_img)
    prompt = D.build_prompt(s["question"], True)
    whole = tok.encode(prompt + " " + ANSWER + "</s>")
    k = whole.index(tok.token_to_id("<image>"))
    whole = [tok.bos_id] + whole[:k] + whole[k:k + 1] * n_img + whole[k + 1:]
    assert ids.tolist() == whole
    first = int((labels != D.IGNORE_INDEX).nonzero()[0])
    assert tk.id_to_token(int(ids[first])) == "▁The"
    assert torch.equal(ids[:first], D.encode_prompt(s["question"], True, tok, n_img))
    if layout == "legacy":  # the pitfall this construction avoids
        assert tok.encode(prompt) + tok.encode(" " + ANSWER) != tok.encode(prompt + " " + ANSWER)


def test_generation_batch_is_left_padded_prompt_only():
    """RFT sampling appends tokens at the right: catches right padding, an answer leaking into the prompt,
    and a prompt that differs from the training prompt."""
    tok = TinyTokenizer(with_pad=False)  # no pad token: eos pads
    samples = [sample(question="Sit."), sample(question="Raise both arms above the head, please.")]
    batch = D.collate(samples, tok, 3, clip_size=8, pose_size=(8, 6), for_generation=True)
    assert "labels" not in batch
    for b, s in enumerate(samples):
        prompt = D.encode_prompt(s["question"], False, tok, 3)
        n = len(prompt)
        assert torch.equal(batch["input_ids"][b, -n:], prompt)
        assert batch["attention_mask"][b, -n:].all() and not batch["attention_mask"][b, :-n].any()
        assert (batch["input_ids"][b, :-n] == tok.eos_id).all()
        train_ids, _ = D.encode_sample(s, tok, 3)
        assert torch.equal(train_ids[:n], prompt)
    assert batch["clip_pixels"].shape == (0, 3, 8, 8) and batch["image_index"].numel() == 0


# ----------------------------------------------------------------------------------------------------
# Image preprocessing


def test_clip_preprocess_constant_image_and_centre_crop():
    """Catches a wrong CLIP mean/std, a missing 1/255, an off-centre crop, and a resize that is not
    shortest-side (a constant image stays constant through the antialiased bicubic resize)."""
    colour = torch.tensor([200, 100, 30], dtype=torch.uint8)
    img = colour.view(1, 3, 1, 1).expand(2, 3, 40, 60).contiguous()
    out = D.clip_preprocess(img, 16)
    assert out.shape == (2, 3, 16, 16)
    mean, std = torch.tensor(D.CLIP_MEAN), torch.tensor(D.CLIP_STD)
    expected = (colour.float() / 255 - mean) / std
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-6)
    assert D.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and D.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    # short side already 8: no resize; a 14-wide image keeps columns (14 - 8) // 2 = 3 .. 10
    cols = torch.arange(14, dtype=torch.uint8).view(1, 1, 1, 14).expand(1, 3, 8, 14).contiguous()
    out = D.clip_preprocess(cols, 8)
    assert torch.allclose((out * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 255,
                          torch.arange(3, 11).float().expand(1, 3, 8, 8), atol=1e-4)


def test_pose_vit_preprocess_imagenet_and_central_columns():
    """HMR2.0 feeds x[..., 32:-32] of a 256 x 256 ImageNet-normalised crop: catches wrong statistics, a
    crop taken on the wrong axis or off-centre, and the tiny size rule."""
    mean, std = torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1)
    cols = torch.arange(256).view(1, 1, 1, 256).expand(1, 3, 256, 256).to(torch.uint8)
    out = D.pose_vit_preprocess(cols)
    assert out.shape == (1, 3, 256, 192)
    assert torch.allclose(out, ((torch.arange(256).float() / 255).view(1, 1, 1, 256) - mean)[..., 32:-32] / std,
                          atol=1e-5)
    out = D.pose_vit_preprocess(cols[..., :64, :64], (64, 48))  # tiny preset: central 48 of 64 columns
    assert torch.allclose(out, ((torch.arange(64).float() / 255).view(1, 1, 1, 64) - mean)[..., 8:56] / std,
                          atol=1e-5)


def test_crop_box_centres_the_box_and_pads_with_zeros():
    """Catches a box off by half its size and a crop that wraps instead of padding."""
    img = torch.full((3, 30, 40), 50, dtype=torch.uint8)
    img[:, 12, 33] = 255
    crop = D.crop_box(img, (33, 12), 20, 20)  # box x 23..42, y 2..21; columns 40..42 are outside
    assert crop.shape == (3, 20, 20)
    assert (crop[:, 10, 10] == 255).all()
    assert (crop[:, :, 17:] == 0).all() and (crop[:, :, :17] > 0).all()


def test_hmr2_crop_expands_the_box_to_192_by_256(tmp_path, monkeypatch):
    """4D-Humans expands the person box to w:h = 192:256 before its 256 x 256 crop and the central column cut
    (hmr2/datasets/utils.py expand_to_aspect_ratio). A 30 px square box centred at (60, 50) is therefore
    cropped 40 x 40 (x 40..79, y 30..69), and the pose ViT's central 30 of 40 columns are the box's own
    x 45..74, computed here by hand on an image whose every pixel is distinct. Catches cropping the box
    side itself (people framed 4/3 too large, wide poses cut) in the Human3.6M loader (training and
    evaluation) and in the rule for non-square boxes."""
    assert D.hmr2_crop_side(30, 30) == 40 and D.hmr2_crop_side(30, 60) == 60 and D.hmr2_crop_side(60, 30) == 80
    ys, xs = torch.meshgrid(torch.arange(100), torch.arange(120), indexing="ij")
    img = torch.stack([(xs + 2 * ys) % 256, (3 * xs + ys) % 256, (xs * ys) % 256]).to(torch.uint8)  # (3, 100, 120)
    monkeypatch.setattr(D, "load_image", lambda path: img.clone())
    a = h36m_arrays(1)
    np.savez(tmp_path / "one.npz", imgname=a["imgname"], center=np.array([[60.0, 50.0]]), scale=np.array([30 / 200]),
             S=a["S"])
    s = D.Human36M(str(tmp_path / "one.npz"), "/data", images=True, image_size=40)[0]
    assert s["box"][1] == pytest.approx(30)  # the person box itself is reported unchanged
    assert torch.equal(s["image"], img[:, 30:70, 40:80])
    mean, std = torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1)
    seen = D.pose_vit_preprocess(s["image"][None], (40, 30))  # (1, 3, 40, 30)
    assert torch.allclose(seen, (img[None, :, 30:70, 45:75].float() / 255 - mean) / std, atol=1e-5)


def test_load_image_without_pillow_says_how_to_install(monkeypatch):
    """Pillow is optional: its absence must give an actionable message, not a bare ImportError."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        D.load_image("any.jpg")


# ----------------------------------------------------------------------------------------------------
# Sharded loading


def test_shards_are_disjoint_and_cover_each_epoch():
    """Catches ranks drawing different permutations (overlap) or the same slice (duplicates)."""
    n, B, W = 24, 3, 2
    ranks = [D.ShardedBatchSampler(n, B, r, W, seed=5) for r in range(W)]
    assert ranks[0].steps_per_epoch == 4
    for epoch in range(2):
        seen = [i for s in ranks for step in range(epoch * 4, epoch * 4 + 4) for i in s.batch_at(step)]
        assert sorted(seen) == list(range(n))
    assert ranks[0].batch_at(0) != ranks[0].batch_at(4)  # a new permutation each epoch
    short = [D.ShardedBatchSampler(10, 3, r, 2, drop_last=False) for r in range(2)]  # 2 steps of 6
    batches = [s.batch_at(k) for s in short for k in range(2)]
    assert all(len(b) == 3 for b in batches) and set(sum(batches, [])) == set(range(10))


def test_resume_yields_the_uninterrupted_stream():
    """The RFT loop resumes at a step: catches a resumed loader restarting its epoch or reseeding."""
    data = list(range(17))
    full = [b for _, b in zip(range(12), D.make_loader(data, 4, rank=1, world_size=2, seed=3))]
    resumed = [b for _, b in zip(range(5), D.make_loader(data, 4, rank=1, world_size=2, seed=3, start_step=7))]
    assert resumed == full[7:12]  # 2 steps per epoch: crosses several epochs
    assert full[0] != full[2]


# ----------------------------------------------------------------------------------------------------
# PoseScript


def write_posescript(tmp_path, seqs):
    root, amass = tmp_path / "posescript_release_v2", tmp_path / "amass"
    root.mkdir()
    for rel, poses in seqs.items():
        (amass / rel).parent.mkdir(parents=True, exist_ok=True)
        np.savez(amass / rel, poses=poses, trans=np.zeros((len(poses), 3)), betas=np.zeros(16),
                 gender=np.array("male"), mocap_framerate=np.array(120.0), dmpls=np.zeros((len(poses), 8)))
    cmu, bml = list(seqs)
    id_map = {"0": ["AMASS", cmu, 3], "1": ["AMASS", cmu, 7], "2": ["AMASS", bml, 0], "3": ["AMASS", bml, 1]}
    files = {"ids_2_dataset_sequence_and_frame_index_100k.json": id_map,
             "train_ids_100k.json": [0, 1, 2], "val_ids_100k.json": [3], "test_ids_100k.json": [],
             D.POSESCRIPT_H2: {"0": ["The person squats.", "Knees bent."], "2": "Arms up."},
             D.POSESCRIPT_A2: {str(i): [f"auto {i} {k}" for k in range(3)] for i in range(4)}}
    for name, content in files.items():
        (root / name).write_text(json.dumps(content))
    return str(root), str(amass)


def posescript_seqs():
    g = np.random.default_rng(0)
    return {"CMU/01/01_01_poses.npz": g.uniform(-1, 1, (10, 156)),
            "BMLmovi/Subject_1_F_MoSh/Subject_1_F_1_poses.npz": g.uniform(-1, 1, (4, 156))}


def test_posescript_reads_release_files(tmp_path):
    """Catches wrong caption/split/mapping handling, a shifted SMPL-H -> SMPL joint copy, non-zero hands,
    and a global-orient normalisation that differs from PoseScript's (checked against scipy's ZYX Euler)."""
    seqs = posescript_seqs()
    root, amass = write_posescript(tmp_path, seqs)
    ds = D.PoseScript(root, amass, "train")
    assert len(ds) == 3 and [ds[i]["caption"] for i in range(3)] == ["The person squats.", "Knees bent.", "Arms up."]
    s = ds[0]
    raw = seqs["CMU/01/01_01_poses.npz"][3]
    assert s["task"] == "t2p" and s["answer"] == ANSWER and s["image"] is None and "The person squats." in s["question"]
    assert torch.allclose(s["pose"][1:22], torch.tensor(raw[3:66], dtype=torch.float32).view(21, 3))
    assert (s["pose"][22:] == 0).all()
    _, ty, tx = Rotation.from_rotvec(raw[:3]).as_euler("ZYX")
    expected = Rotation.from_euler("ZYX", [0, ty, tx]).as_matrix()
    got = Rotation.from_rotvec(s["pose"][0].double().numpy()).as_matrix()
    assert np.allclose(got, expected, atol=1e-5)
    assert len(D.PoseScript(root, amass, "train", caption_files=(D.POSESCRIPT_A2,))) == 9
    assert D.PoseScript(root, amass, "val", caption_files=(D.POSESCRIPT_A2,))[0]["pose_id"] == 3


def test_posescript_normalisation_removes_heading_only():
    """A pose turned about the vertical (z, AMASS) axis normalises to the same orientation; a tilt about
    x is kept. Catches normalising about the wrong axis."""
    aa = torch.tensor([1.3, 0.2, -0.4], dtype=torch.float64)
    turned = torch.tensor((Rotation.from_euler("z", 2.0) * Rotation.from_rotvec(aa.numpy())).as_rotvec())
    a, b = D.posescript_normalize_orient(aa), D.posescript_normalize_orient(turned)
    assert torch.allclose(a, b, atol=1e-8)
    tilt = torch.tensor([0.7, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(D.posescript_normalize_orient(tilt), tilt, atol=1e-10)


def test_posescript_rejects_broken_files(tmp_path):
    """Each broken input names the file and what was expected."""
    seqs = posescript_seqs()
    root, amass = write_posescript(tmp_path, seqs)
    cmu = os.path.join(amass, "CMU/01/01_01_poses.npz")
    np.savez(cmu, trans=np.zeros((10, 3)))  # no poses
    with pytest.raises(ValueError, match=r"01_01_poses.npz: missing arrays \['poses'\]"):
        D.PoseScript(root, amass)
    np.savez(cmu, poses=np.zeros((2, 156)))  # frame 3 requested
    with pytest.raises(ValueError, match="asks for frame 3, the sequence has 2"):
        D.PoseScript(root, amass)
    with open(cmu, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="01_01_poses.npz: cannot read as .npz"):
        D.PoseScript(root, amass)
    os.remove(cmu)
    with pytest.raises(FileNotFoundError, match="01_01_poses.npz"):
        D.PoseScript(root, amass)
    (tmp_path / "posescript_release_v2" / D.POSESCRIPT_H2).write_text('{"0": ["unterminated')
    with pytest.raises(ValueError, match="posescript_human_6293.json: not valid JSON"):
        D.PoseScript(root, amass)
    with pytest.raises(FileNotFoundError, match="missing_ids_100k.json"):
        D.PoseScript(root, amass, split="missing")


# ----------------------------------------------------------------------------------------------------
# 3DPW


try:
    from numpy._core.multiarray import _reconstruct as np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as np_reconstruct


class Py2StylePickler(pickle._Pickler):
    """Writes what the Python-2 3DPW release holds: every string as a byte string (BINSTRING), numpy
    arrays rebuilt by numpy.core.multiarray._reconstruct (the numpy-1 name)."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is np_reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def threedpw_sequence(T=5):
    g = np.random.default_rng(1)
    cam_poses = np.tile(np.eye(4), (T, 1, 1))
    cam_poses[:, :3, :3] = Rotation.random(T, random_state=2).as_matrix()
    cam_poses[:, :3, 3] = g.normal(size=(T, 3))
    poses2d = g.uniform(100, 900, (T, 3, 18))
    poses2d[:, 2] = 1.0
    poses2d[:, 2, :5] = 0.0  # unconfident keypoints are ignored by the box
    poses2d[:, 0, 0] = 5000.0
    actor = lambda: {"poses": g.uniform(-0.5, 0.5, (T, 72)), "trans": g.normal(size=(T, 3)),
                     "joints": g.normal(size=(T, 72)), "betas": g.normal(size=10)}
    a0, a1 = actor(), actor()
    return {"sequence": "courtyard_fixture_00", "betas": [a0["betas"], a1["betas"]],
            "poses": [a0["poses"], a1["poses"]], "trans": [a0["trans"], a1["trans"]],
            "poses_60Hz": [np.repeat(a0["poses"], 2, 0), np.repeat(a1["poses"], 2, 0)],
            "trans_60Hz": [np.repeat(a0["trans"], 2, 0), np.repeat(a1["trans"], 2, 0)],
            "betas_clothed": [a0["betas"], a1["betas"]], "v_template_clothed": [np.zeros((6890, 3))] * 2,
            "genders": ["m", "f"], "texture_maps": [np.zeros((4, 4, 3), np.uint8)] * 2,
            "poses2d": [poses2d, poses2d.copy()], "jointPositions": [a0["joints"], a1["joints"]],
            "img_frame_ids": np.arange(0, 2 * T, 2), "cam_poses": cam_poses,
            "campose_valid": [np.array([1, 1, 0, 1, 1]), np.array([0, 1, 1, 0, 0])],
            "cam_intrinsics": np.array([[1961.0, 0, 540], [0, 1969.0, 960], [0, 0, 1]])}


def write_threedpw(tmp_path, seq, name="courtyard_fixture_00.pkl"):
    folder = tmp_path / "3DPW" / "sequenceFiles" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(seq)
    (folder / name).write_bytes(buf.getvalue())
    return str(tmp_path / "3DPW"), folder / name


def test_threedpw_reads_python2_pickles_in_camera_frame(tmp_path):
    """Catches using invalid frames, leaving the global orient in the world frame (3DPW evaluation rotates
    it by the camera), joints not moved to the camera, and a box that counts unconfident keypoints."""
    seq = threedpw_sequence()
    root, _ = write_threedpw(tmp_path, seq)
    ds = D.ThreeDPW(root, "test")
    assert [(s, a, t) for s, a, t in ds.items] == [(0, 0, 0), (0, 0, 1), (0, 0, 3), (0, 0, 4), (0, 1, 1), (0, 1, 2)]
    s = ds[5]  # actor 1, frame 2
    R, t = seq["cam_poses"][2][:3, :3], seq["cam_poses"][2][:3, 3]
    raw = seq["poses"][1][2]
    expected = Rotation.from_matrix(R) * Rotation.from_rotvec(raw[:3])
    assert np.allclose(Rotation.from_rotvec(s["pose"][0].double().numpy()).as_matrix(), expected.as_matrix(), atol=1e-5)
    assert torch.allclose(s["pose"][1:], torch.tensor(raw[3:], dtype=torch.float32).view(23, 3))
    J = seq["jointPositions"][1][2].reshape(24, 3)
    assert np.allclose(s["joints"].numpy(), J @ R.T + t, atol=1e-5)
    kp = seq["poses2d"][1][2][:2, 5:]
    lo, hi = kp.min(1), kp.max(1)
    assert np.allclose(s["box"][0], (lo + hi) / 2) and np.isclose(s["box"][1], 1.2 * (hi - lo).max())
    assert s["gender"] == "f" and s["task"] == "i2p" and s["answer"] == ANSWER and s["image"] is None
    assert s["image_path"].endswith(os.path.join("imageFiles", "courtyard_fixture_00", "image_00002.jpg"))


def test_threedpw_refuses_code_in_pickles(tmp_path):
    """A pickle can run code while loading. Shows the payload runs under plain pickle.load, then that the
    loader refuses it without running it."""
    ran_plain, ran_loader = tmp_path / "ran_plain", tmp_path / "ran_loader"

    class Payload:
        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return (open, (str(self.target), "w"))

    pickle.loads(pickle.dumps({"poses": Payload(ran_plain)}, protocol=2))
    assert ran_plain.exists()  # the payload is live
    seq = threedpw_sequence()
    seq["poses"] = Payload(ran_loader)
    root, path = write_threedpw(tmp_path, seq)
    path.write_bytes(pickle.dumps(seq, protocol=2))
    with pytest.raises(ValueError, match=r"courtyard_fixture_00.pkl: cannot load .*refusing to load"):
        D.ThreeDPW(root, "test")
    assert not ran_loader.exists()


def test_threedpw_rejects_broken_files(tmp_path):
    """Missing keys, truncated files, wrong shapes and a missing folder are errors naming the file."""
    seq = threedpw_sequence()
    del seq["campose_valid"]
    root, path = write_threedpw(tmp_path, seq)
    with pytest.raises(ValueError, match=r"courtyard_fixture_00.pkl: missing keys \['campose_valid'\]"):
        D.ThreeDPW(root, "test")
    seq = threedpw_sequence()
    _, path = write_threedpw(tmp_path, seq)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match="courtyard_fixture_00.pkl: cannot load a 3DPW sequence file"):
        D.ThreeDPW(root, "test")
    seq["cam_poses"] = seq["cam_poses"][:, :3]
    write_threedpw(tmp_path, seq)
    with pytest.raises(ValueError, match=r"cam_poses has shape \(5, 3, 4\), expected \(5, 4, 4\)"):
        D.ThreeDPW(root, "test")
    with pytest.raises(FileNotFoundError, match="sequenceFiles/validation"):
        D.ThreeDPW(root, "validation")


# ----------------------------------------------------------------------------------------------------
# Human3.6M


def h36m_arrays(N=3):
    g = np.random.default_rng(3)
    global_idx = [14, 3, 4, 5, 2, 1, 0, 16, 12, 17, 18, 9, 10, 11, 8, 7, 6]  # SPIN's placement of H3.6M's 17
    S = np.zeros((N, 24, 4))
    S17 = g.normal(scale=0.3, size=(N, 17, 3))
    S17 -= S17[:, :1]  # root-centred
    S[:, global_idx, :3], S[:, global_idx, 3] = S17, 1
    imgname = np.array([f"images/S9_Directions_1.54138969_{5 * i + 1:06d}.jpg" for i in range(N)])
    return {"imgname": imgname, "center": g.uniform(300, 700, (N, 2)), "scale": g.uniform(1, 3, N), "S": S}


def test_human36m_reads_spin_and_hmr2_layouts(tmp_path, monkeypatch):
    """Catches taking the wrong 14 joints (SPIN's J24_TO_J14 ends with joint 18, not 13), the pelvis from
    the wrong index, mixing up the two layouts' box conventions (200 * scale vs scale pixels), and an
    off-centre person crop."""
    a = h36m_arrays()
    np.savez(tmp_path / "h36m_valid_protocol2.npz", **a)
    ds = D.Human36M(str(tmp_path / "h36m_valid_protocol2.npz"), "/data/h36m")
    s = ds[1]
    spin_j24_to_j14 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18]  # SPIN constants.py: head is H3.6M's, 18
    assert torch.allclose(s["joints14"], torch.tensor(a["S"][1, spin_j24_to_j14, :3], dtype=torch.float32))
    assert (s["joints14"][-1] != 0).all()  # joint 13 (LSP head top) is empty in H3.6M files
    assert (s["pelvis"] == 0).all() and s["pose"] is None and s["task"] == "i2p"
    assert np.isclose(s["box"][1], 200 * a["scale"][1])
    assert s["image_path"] == os.path.join("/data/h36m", str(a["imgname"][1]))

    n = len(a["imgname"])
    np.savez(tmp_path / "h36m_val_p2.npz", imgname=a["imgname"], center=a["center"][:, None],
             scale=200 * a["scale"][:, None], extra_keypoints_2d=np.zeros((n, 19, 3)),
             extra_keypoints_3d=a["S"][:, :19], body_pose=np.ones((n, 72)), has_body_pose=np.array([1, 0, 1]),
             betas=np.zeros((n, 10)), has_betas=np.ones(n))
    hmr2 = D.Human36M(str(tmp_path / "h36m_val_p2.npz"), "/data/h36m")
    moved = {**a, "S": a["S"] + np.array([0.1, 0.2, 0.3, 0.0]) * a["S"][..., 3:]}  # pelvis (14) moves off 0
    np.savez(tmp_path / "moved.npz", **moved)
    assert torch.allclose(D.Human36M(str(tmp_path / "moved.npz"), ".")[0]["pelvis"], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(hmr2[1]["joints14"], s["joints14"]) and np.isclose(hmr2[1]["box"][1], s["box"][1])
    assert hmr2[0]["pose"].shape == (24, 3) and hmr2[1]["pose"] is None

    def fake_image(path):  # 120 x 100 image, one bright pixel at the box centre of sample 0
        img = torch.full((3, 100, 120), 40, dtype=torch.uint8)
        img[:, 40, 50] = 255
        return img
    monkeypatch.setattr(D, "load_image", fake_image)
    np.savez(tmp_path / "one.npz", imgname=a["imgname"][:1], center=np.array([[50.0, 40.0]]),
             scale=np.array([24 / 200]), S=a["S"][:1])  # a 24 px box is cropped 32 px wide (HMR2.0's 4/3)
    crop = D.Human36M(str(tmp_path / "one.npz"), "/data", images=True, image_size=32)[0]["image"]
    assert crop.shape == (3, 32, 32) and (crop[:, 16, 16] == 255).all() and (crop[:, 15, 16] == 40).all()


def test_human36m_rejects_broken_files(tmp_path):
    """No 3D joints, a wrong joint count, a missing key and a truncated file are errors naming the file."""
    a = h36m_arrays()
    path = tmp_path / "h36m.npz"
    np.savez(path, **{k: v for k, v in a.items() if k != "S"})
    with pytest.raises(ValueError, match=r"h36m.npz: no 3D joints; expected 'S'"):
        D.Human36M(str(path), ".")
    np.savez(path, **{**a, "S": a["S"][:, :17]})
    with pytest.raises(ValueError, match=r"S has shape \(3, 17, 4\), expected \(3, 24, 4\)"):
        D.Human36M(str(path), ".")
    np.savez(path, **{k: v for k, v in a.items() if k != "center"})
    with pytest.raises(ValueError, match=r"missing arrays \['center'\]"):
        D.Human36M(str(path), ".")
    np.savez(path, **a)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="h36m.npz: cannot read as .npz"):
        D.Human36M(str(path), ".")


# ----------------------------------------------------------------------------------------------------
# LLaVA-Instruct-150k


def test_llava_instruct_first_turn(tmp_path):
    """Catches leaving the <image> marker in the question (build_prompt adds its own) and taking a later
    turn; broken conversations are errors naming the file and the entry."""
    data = [{"id": "000000033471", "image": "000000033471.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
            {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
                {"from": "human", "value": "Where is the cat positioned?\n<image>"},
                {"from": "gpt", "value": "On the windowsill."}]}]
    path = tmp_path / "llava_instruct_150k.json"
    path.write_text(json.dumps(data))
    ds = D.LLaVAInstruct(str(path), "/coco/train2017")
    s, t = ds[0], ds[1]
    assert s["task"] == "vqa" and s["question"] == "What are the colors of the bus in the image?"
    assert s["answer"] == "The bus in the image is white and red." and len(s["turns"]) == 1
    assert t["question"] == "Where is the cat positioned?" and t["image_path"] == "/coco/train2017/000000052846.jpg"
    data[1]["conversations"] = data[1]["conversations"][::-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="llava_instruct_150k.json: entry 1 is not"):
        D.LLaVAInstruct(str(path), ".")
    path.write_text(json.dumps(data)[:-10])
    with pytest.raises(ValueError, match="llava_instruct_150k.json: not valid JSON"):
        D.LLaVAInstruct(str(path), ".")


def test_collate_with_the_project_tokenizer_on_poseworld():
    """The real pipeline of the tiny preset: model.Tokenizer trained on PoseWorld text, PoseWorld samples
    of all three tasks. Labels hold exactly the answer's tokens plus </s> (the tail of the whole
    conversation's encoding), image rows hold n_image_tokens image tokens, text rows none. Catches a
    label boundary shifted by the Llama "▁" prefix rule or images counted on the wrong rows."""
    from model import Tokenizer
    world = D.PoseWorld("val", size=30, seed=5, cache_dir=None)
    tok = Tokenizer.train_bpe(list(world.questions) + list(world.answers) + [D.LLAVA_SYSTEM], 400)
    samples = [world[i] for i in range(12)]
    n_img = 28
    batch = D.collate(samples, tok, n_img, clip_size=64, pose_size=(64, 48))
    image_id = tok.token_to_id(D.IMAGE_TOKEN)
    for b, s in enumerate(samples):
        prompt = D.build_prompt(s["question"], s["image"] is not None)
        whole = tok.encode(prompt + " " + s["answer"], add_bos=True)
        answer_ids = whole[len(tok.encode(prompt, add_bos=True)):] + [tok.eos_id]
        labelled = batch["input_ids"][b][batch["labels"][b] != D.IGNORE_INDEX].tolist()
        assert labelled == answer_ids, s["task"]
        assert int((batch["input_ids"][b] == image_id).sum()) == (n_img if s["image"] is not None else 0)
    assert batch["clip_pixels"].shape[0] == sum(s["image"] is not None for s in samples)
