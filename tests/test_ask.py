"""eval.py --ask / --image / --question: a caption, picture or question of one's own answered with text and
a pose, on a tiny checkpoint trained here for a few steps and on the small real-format 7B files; plus the
two data.py helpers it needs, the caption templates inverted (parse_caption) and the zlib-only PNG reader."""
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as E
import model as M
import smpl
import train_sft
from test_real_preset import files  # noqa: F401  (the fixture: small llava-hf, HMR2.0 and SMPL files)

CAPTION = "The right foot is lifted above the left one. Someone raises their left hand over the head."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny SFT run of 90 steps: enough to answer with the pose template and its <POSE> (not to pose well)."""
    out = tmp_path_factory.mktemp("ask_sft")
    cfg = train_sft.SFTConfig(out_dir=str(out), head_steps=20, max_steps=90, batch_size=4, poseworld_size=240,
                              task_mix="", posecode_weight=0.0,  # the quick recipe that writes <POSE> in 90 steps
                              retriever_pairs=120,
                              retriever_steps=2, retriever_batch=32, vocab_size=400, save_every=1000,
                              pretrain_steps=0, warmup_steps=2, lr=2e-3, num_threads=1)
    train_sft.main(cfg=cfg)
    return str(out)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A PoseWorld render of an image-to-pose sample, as a PNG, and its sample."""
    world = data.PoseWorld("val", size=40, cache_dir=None)
    sample = world[int(world.task_indices("i2p")[0])]
    path = str(tmp_path_factory.mktemp("photo") / "photo.png")
    data.write_png(path, sample["image"].permute(1, 2, 0))
    return path, sample


def ask(ckpt, out, *flags):
    return E.main([f"--ckpt={ckpt}", f"--out_dir={out}", *flags])


def read_answer(out, body=None):
    """answer.json and answer.npz, checked against each other, the pose reproducing the joints through
    smpl.py (`body`: the SMPL the joints were made with; None = the built-in skeleton)."""
    record = json.load(open(out / "answer.json"))
    arrays = np.load(out / "answer.npz")
    answers = record.get("answers", [record])
    for i, a in enumerate(answers):
        if a["pose"] is None:
            continue
        pose, joints = torch.tensor(a["pose"]), torch.tensor(a["joints"])  # (24, 3), (24, 3)
        assert pose.shape == (24, 3) and joints.shape == (24, 3)
        assert torch.allclose(smpl.pose_joints(pose[None], body)[0], joints, atol=1e-5)
        row = (lambda k: arrays[k]) if "answers" not in record else (lambda k: arrays[k][i])
        assert np.allclose(row("pose"), a["pose"]) and np.allclose(row("joints"), a["joints"])
        assert bool(row("forced")) == a["forced"]
    return record


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    return struct.unpack(">II", head[16:24])  # IHDR: width, height


def test_caption_answers_with_a_pose_and_the_posecodes_it_names(ckpt, tmp_path, capsys):
    """--ask: the PoseWorld text-to-pose prompt, a pose from the model's own <POSE>, the caption's posecodes
    read back from the templates and checked on the answer's joints; the picture carries the caption. A
    caption in other words says it is outside the vocabulary. Catches a prompt other than the trained one,
    a pose that does not give its joints, or a posecode check against the wrong codes."""
    out = tmp_path / "t2p"
    record = ask(ckpt, out, f"--ask={CAPTION}")
    printed = capsys.readouterr().out
    assert record["prompt"] == data.T2P_PROMPTS[0].format(caption=CAPTION) and record["task"] == "t2p"
    assert "<POSE>" in record["answer"] and record["forced"] is False and record["greedy"] is True
    assert read_answer(out) == record
    asked = {c["family"]: c["asked"] for c in record["posecodes"]}
    assert asked == {"raised_foot": "right foot raised", "left_hand_height": "above the head"}
    got = data.posecodes(torch.tensor([record["joints"]]))[0]  # (K,)
    for c in record["posecodes"]:
        k = data.POSECODE_INDEX[c["family"]]
        assert c["answer"] == data.POSECODES[k].categories[int(got[k])]
        assert c["satisfied"] == (c["answer"] == c["asked"])
    assert "posecodes" in printed and record["answer"] in printed
    width, height = png_size(out / "answer.png")
    assert width == 256 and height > 128  # front + side panels, the caption's band above

    record = ask(ckpt, tmp_path / "other", "--ask=A person dancing happily in the rain.")
    assert "outside PoseWorld's vocabulary" in record["posecodes_note"] and "posecodes" not in record
    assert record["pose"] is not None


def test_image_to_pose_from_a_png_without_pillow(ckpt, photo, tmp_path, monkeypatch):
    """--image: the image-to-pose prompt, the tiny preset's whole-image resize (a PoseWorld render passes
    unchanged), a camera-frame pose, the picture beside the poses. The same answer with Pillow hidden:
    PNG needs no extra package."""
    path, _ = photo
    record = ask(ckpt, tmp_path / "i2p", f"--image={path}")
    assert record["task"] == "i2p" and record["prompt"] == data.I2P_PROMPTS[0]
    assert record["frame"].startswith("camera") and "whole 64 x 64 image" in record["image_crop"]
    assert read_answer(tmp_path / "i2p") == record
    assert png_size(tmp_path / "i2p" / "answer.png") == (128 + 256, 128)  # the image, front, side
    monkeypatch.setitem(sys.modules, "PIL", None)
    again = ask(ckpt, tmp_path / "no_pillow", f"--image={path}")
    assert again["pose"] == record["pose"]


def test_tiny_image_is_padded_square_and_resized(photo):
    """A non-square grey photo for the tiny preset: read as RGB, padded to the square of its longer side
    (zeros, as crop_box pads), resized to PoseWorld's image size, so the person keeps its proportions."""
    _, sample = photo
    img = sample["image"][:, :, 8:56]  # (3, 64, 48)
    path = os.path.join(os.path.dirname(photo[0]), "narrow.png")
    Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L").save(path)
    crop, note = E.ask_image(path, "tiny", 64, "")
    assert crop.shape == (3, 64, 64) and crop.dtype == torch.uint8 and "48 x 64" in note
    assert (crop[:, :, :8] == 0).all() and (crop[:, :, -8:] == 0).all()  # the padding, left and right
    assert torch.equal(crop[0], crop[1]) and torch.equal(crop[1], crop[2])  # grey read as RGB


def test_free_question_has_a_pose_only_when_the_model_writes_pose(ckpt, photo, tmp_path):
    """--question is free text: the pose comes from the model's own <POSE>, never forced. An answer cut
    short before <POSE> has no pose, no picture and no arrays (and a previous answer's are removed)."""
    path, _ = photo
    record = ask(ckpt, tmp_path / "q", f"--image={path}", "--question=Is the person sitting?")
    assert record["task"] == "question" and record["prompt"] == "Is the person sitting?"
    assert record["forced"] is False and (record["pose"] is not None) == ("<POSE>" in record["answer"])
    read_answer(tmp_path / "q")
    record = ask(ckpt, tmp_path / "q", "--question=Is the person sitting?", "--max_new_tokens=3")
    assert "<POSE>" not in record["answer"] and record["pose"] is None and record["forced"] is False
    assert sorted(os.listdir(tmp_path / "q")) == ["answer.json"]


def test_samples_draw_n_answers_into_one_picture(ckpt, tmp_path):
    """--samples=N: N answers drawn at --temperature, poses drawn from the Gaussian (they differ), one
    picture with all of them; the same --seed gives the same answers."""
    flags = [f"--ask={CAPTION}", "--samples=4", "--temperature=0.7", "--seed=3"]
    record = ask(ckpt, tmp_path / "a", *flags)
    assert record["greedy"] is False and record["temperature"] == 0.7 and len(record["answers"]) == 4
    read_answer(tmp_path / "a")
    poses = [torch.tensor(a["pose"]) for a in record["answers"] if a["pose"] is not None]
    assert len(poses) >= 2 and not torch.allclose(poses[0], poses[1])
    assert all(len(a["posecodes"]) == 2 for a in record["answers"])
    assert np.load(tmp_path / "a" / "answer.npz")["pose"].shape == (4, 24, 3)
    assert png_size(tmp_path / "a" / "answer.png")[0] == len(poses) * 256
    assert ask(ckpt, tmp_path / "b", *flags)["answers"] == record["answers"]


def test_pose_request_without_pose_token_is_forced(ckpt, tmp_path, capsys):
    """An answer without <POSE> (here cut at 3 tokens) to a pose request says so and still gives the head's
    pose, read at a <POSE> appended to the answer, marked forced: the mean of the head on exactly that
    sequence. Catches reading the head at the wrong position or returning the rest pose."""
    record = ask(ckpt, tmp_path, f"--ask={CAPTION}", "--max_new_tokens=3")
    assert "<POSE>" not in record["answer"] and record["forced"] is True
    assert "forced" in capsys.readouterr().out
    read_answer(tmp_path)
    policy, tokenizer, _ = M.load_checkpoint(ckpt)
    batch = data.collate_fn(tokenizer, policy, True)([{"question": record["prompt"], "image": None}])
    ids = torch.tensor([batch["input_ids"][0].tolist() + tokenizer.encode(" " + record["answer"])[-3:]
                        + [policy.config.pose_token_id]])  # (1, T) prompt, the 3 answer tokens, <POSE>
    with torch.no_grad():
        mu = policy(ids, torch.ones_like(ids)).pose.mu  # (1, 144) at the last <POSE>: the only one
    want = smpl.matrix_to_axis_angle(smpl.rot6d_to_matrix(mu.double().view(1, 24, 6))).float()[0]  # (24, 3)
    assert torch.allclose(torch.tensor(record["pose"]), want, atol=1e-4)


def test_bad_input_is_one_clear_error_and_writes_nothing(ckpt, photo, tmp_path):
    """Each mistake is one SystemExit naming it, before anything is written under --out_dir."""
    path, _ = photo
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    out = tmp_path / "out"
    cases = [([f"--ckpt={tmp_path / 'missing'}", "--ask=The feet are apart."], "no checkpoint"),
             ([f"--ckpt={tmp_path}", "--ask=The feet are apart."], "holds no checkpoint"),
             ([f"--ckpt={ckpt}", "--ask=  "], "empty"),
             ([f"--ckpt={ckpt}", "--ask=" + "The feet are apart. " * 400], "context"),
             ([f"--ckpt={ckpt}", "--ask=The feet are apart.", f"--image={path}"], "--ask alone"),
             ([f"--ckpt={ckpt}", f"--image={not_image}"], "not an image"),
             ([f"--ckpt={ckpt}", f"--image={tmp_path / 'nothing.png'}"], "no file"),
             ([f"--ckpt={ckpt}", f"--image={path}", "--bbox=0,0,10,10"], "tiny preset"),
             ([f"--ckpt={ckpt}", "--ask=The feet are apart.", "--samples=0"], "at least 1")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            E.main([*argv, f"--out_dir={out}"])
        assert not out.exists(), argv


@pytest.fixture(scope="module")
def real_ckpt(files, tmp_path_factory):  # noqa: F811  (files is the imported fixture)
    """An untrained llava-1.5-7b-preset checkpoint on the small real-format files: the trained tensors
    only, the base read back from the files."""
    tokenizer = M.Tokenizer.from_file(os.path.join(files["llava"], "tokenizer.json"))
    policy = M.PoseLLaVA.from_preset("llava-1.5-7b", tokenizer=tokenizer, llava_path=files["llava"],
                                     pose_encoder_path=files["hmr2"])
    out = tmp_path_factory.mktemp("real_ckpt") / "checkpoint"
    M.save_checkpoint(policy, tokenizer, out, extra={"stage": "sft", "step": 0, "config": {"data": "posescript,h36m"}})
    return str(out)


def test_real_preset_photo_with_a_person_box(real_ckpt, files, tmp_path):  # noqa: F811
    """The 7B preset on a photo: the person box grown to 192:256 and cut as the real loaders cut it
    (hmr2_crop_side, crop_box), the real sets' image-to-pose question, joints through the given SMPL file;
    without --bbox the whole image is the box, and says so; a box outside the image is refused."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)  # (H, W, 3)
    path = str(tmp_path / "photo.png")
    data.write_png(path, photo)
    crop, note = E.ask_image(path, "llava-1.5-7b", 64, "50,10,40,100")
    want = data.crop_box(torch.from_numpy(photo).permute(2, 0, 1), (70, 60), data.hmr2_crop_side(40, 100), E.ASK_CROP)
    assert torch.equal(crop, want) and "50,10,40,100" in note
    assert "whole 200 x 120 image" in E.ask_image(path, "llava-1.5-7b", 64, "")[1]

    paths = [f"--llava_path={files['llava']}", f"--pose_encoder_path={files['hmr2']}", f"--smpl_path={files['smpl']}"]
    out = tmp_path / "ask"
    record = ask(real_ckpt, out, f"--image={path}", "--bbox=50,10,40,100", "--max_new_tokens=8", *paths)
    assert record["prompt"] == data.IMAGE_POSE_QUESTION and record["image_crop"] == note
    assert record["pose"] is not None and record["joints_from"] == files["smpl"]
    read_answer(out, smpl.SMPL.from_file(files["smpl"]))
    assert (out / "answer.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="not inside the 200 x 120 image"):
        ask(real_ckpt, tmp_path / "bad", f"--image={path}", "--bbox=180,10,40,100", *paths)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------------
# data.py: the caption templates inverted, and the PNG reader


def test_parse_caption_inverts_every_poseworld_caption():
    """Every caption PoseWorld writes parses back to exactly the codes it names (so a student's caption
    in the same words is checked like a test caption); other wording is None, a contradiction an error.
    Also catches a new template that two codes could write (the table refuses it)."""
    world = data.PoseWorld("val", size=300, cache_dir=None)
    rows = world.task_indices("t2p").tolist()
    assert len(rows) > 50
    for i in rows:
        codes, mentioned = data.parse_caption(world.captions[i])
        assert torch.equal(mentioned, world.mentioned[i]) and torch.equal(codes[mentioned], world.codes[i][mentioned])
    codes, mentioned = data.parse_caption("  the RIGHT foot is lifted above the left one.someone raises their "
                                          "left hand over the head  ")
    assert mentioned.sum() == 2 and codes[data.POSECODE_INDEX["raised_foot"]] == 0
    assert data.parse_caption("The person is dancing.") is None and data.parse_caption("") is None
    assert data.parse_caption("The feet are together. Is the person sitting?") is None
    with pytest.raises(ValueError, match="feet_distance"):
        data.parse_caption("The feet are together. The feet are wide apart.")


def _png(path, pixels, colour, depth=8, filters=(0,), palette=None):
    """A PNG written by hand, each row filtered with filters[row % len] (PNG spec 9.2): the Average and
    Paeth filters that write_png never uses and Pillow rarely does."""
    H, W = pixels.shape[:2]
    bpp = pixels.size // (H * W) * depth // 8
    raw = pixels.astype(">u2").tobytes() if depth == 16 else pixels.astype(np.uint8).tobytes()
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(H, W * bpp).astype(np.int32)
    stream, prev = b"", np.zeros(W * bpp, dtype=np.int32)
    for y in range(H):
        kind, x = filters[y % len(filters)], rows[y]
        a = np.concatenate([np.zeros(bpp, dtype=np.int32), x[:-bpp]])
        c = np.concatenate([np.zeros(bpp, dtype=np.int32), prev[:-bpp]])
        p = a + prev - c
        paeth = np.where((abs(p - a) <= abs(p - prev)) & (abs(p - a) <= abs(p - c)), a,
                         np.where(abs(p - prev) <= abs(p - c), prev, c))
        predict = [0, a, prev, (a + prev) // 2, paeth][kind]
        stream += bytes([kind]) + ((x - predict) % 256).astype(np.uint8).tobytes()
        prev = x

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = data.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, depth, colour, 0, 0, 0))
    if palette is not None:
        png += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    with open(path, "wb") as f:
        f.write(png + chunk(b"IDAT", zlib.compress(stream)) + chunk(b"IEND", b""))


def test_read_png_decodes_every_filter_and_colour_type(tmp_path):
    """read_png against the pixels written: the five row filters, grey, grey + alpha, RGB, RGBA,
    palette, 16 bits; and against Pillow on files Pillow writes. A non-PNG is a ValueError."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (9, 7, 4))
    rgba[:, :3] = 77  # flat columns, where the predictors matter
    path = str(tmp_path / "t.png")
    cases = [(rgba[..., :3], 2, rgba[..., :3]), (rgba, 6, rgba[..., :3]), (rgba[..., :1], 0, rgba[..., [0, 0, 0]]),
             (rgba[..., :2], 4, rgba[..., [0, 0, 0]])]
    for pixels, colour, want in cases:
        _png(path, pixels, colour, filters=(0, 1, 2, 3, 4))
        assert np.array_equal(data.read_png(path).permute(1, 2, 0).numpy(), want), colour
    wide = rgba.astype(np.int64) * 256 + 3  # 16 bits: the high byte is the 8-bit value
    _png(path, wide, 6, depth=16, filters=(4, 3, 1))
    assert np.array_equal(data.read_png(path).permute(1, 2, 0).numpy(), rgba[..., :3])
    palette = rng.integers(0, 256, (5, 3))
    index = rng.integers(0, 5, (9, 7, 1))
    _png(path, index, 3, filters=(3, 4), palette=palette)
    assert np.array_equal(data.read_png(path).permute(1, 2, 0).numpy(), palette[index[..., 0]])

    picture = np.zeros((40, 60, 3), dtype=np.uint8)
    picture[..., 0] = np.arange(60) * 4
    picture[..., 1] = np.arange(40)[:, None] * 6
    picture[10:20, 10:50] = rng.integers(0, 256, (10, 40, 3))
    for mode in ("RGB", "RGBA", "L", "LA", "P"):
        Image.fromarray(picture).convert(mode).save(path)
        with Image.open(path) as im:
            want = np.asarray(im.convert("RGB"))
        assert np.array_equal(data.read_png(path).permute(1, 2, 0).numpy(), want), mode
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ValueError, match="not a PNG"):
        data.read_png(str(tmp_path / "x.png"))
