"""Tokenizer parity with Hugging Face `tokenizers`, and LoRA invariants (issue 3).

The tokenizer files are built here (nothing is downloaded): a Llama-style byte-fallback BPE trained
with `tokenizers` and laid out like llava-hf's tokenizer.json, its newer Metaspace variant, a tiny
hand-written file, and our own trained BPE. The LoRA tests use a toy attention module whose linear
layers carry the Llama names.
"""
import copy
import json
import random
import re
from collections import Counter

import pytest
import torch
import torch.nn as nn

import tokenizers  # the reference implementation (test-only dependency)
from tokenizers import decoders, models, normalizers, processors, trainers

from model import (SPIECE, LoRALinear, Tokenizer, apply_lora, lora_disabled, lora_state_dict,
                              merge_lora)

# ----------------------------------------------------------------------------------------------------
# Tokenizer fixtures

_WORDS = ("the person is standing with arms raised left right knee bent squatting lunge forward leaning "
          "back sitting kicking reaching hand above head 90 degrees elbow wrist shoulder").split()


def _sentences(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
        if rng.random() < 0.2:
            s = s.replace(" ", "  ", 1)  # whitespace runs, so "▁▁" merges get learned
        if rng.random() < 0.1:
            s += "\n"
        out.append(s.capitalize() + rng.choice([".", "!", "?", ",", ""]))
    return out


BATTERY = [
    "Hello world", "hello", " leading space", "trailing space ", "  two leading spaces", "a  b   c    d",
    "tabs\tand\nnewlines\n\n", "\n", " ", "   ", "", "digits 0123456789 and 3.14159, 42!",
    "café naïve résumé Ünïcödé", "emoji 😀🎉 end", "中文字符 mixed", "literal ▁ underline▁",
    "the person is standing", "The person is squatting with  arms raised.",
    "<image>\nDescribe the pose.",
    "USER: <image>\nWhat is he doing? ASSISTANT: The SMPL pose of this person is <POSE>.",
    "<POSE>", "<image><POSE>", "text<image>", "<image> text", "a <POSE> b", "<s>hello</s>", "x</s>", "<pad><pad>",
]


def _hf_llama_spec():
    """A tokenizer.json laid out like llava-hf's: <unk> <s> </s>, 256 byte tokens, learned merges,
    legacy Prepend + Replace normalizer, Llama decoder, <s> post-processor, <image>=V and <pad>=V+1."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE), normalizers.Replace(" ", SPIECE)])
    hf.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    hf.train_from_iterator(_sentences(400, seed=0),
                           trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(hf.to_str())
    # Llama's id layout: the three specials, then <0x00>..<0xFF>, then everything learned
    learned = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])][3:]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    spec["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    spec["model"]["merges"] = [f"{a} {b}" for a, b in spec["model"]["merges"]]  # the older "a b" form
    for tok in spec["added_tokens"]:
        tok["id"] = spec["model"]["vocab"][tok["content"]]
    for i, content in enumerate(["<image>", "<pad>"]):
        spec["added_tokens"].append({"id": len(tokens) + i, "content": content, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    return spec


@pytest.fixture(scope="module")
def llama_spec():
    return _hf_llama_spec()


def _metaspace_variant(spec, split=False, scheme="first"):
    """The layout current transformers writes for Llama: no normalizer, Metaspace pre-tokenizer."""
    spec = copy.deepcopy(spec)
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPIECE, "prepend_scheme": scheme, "split": split}
    spec["model"]["merges"] = [m.split(" ") for m in spec["model"]["merges"]]  # the newer pair form
    return spec


def _load_both(spec, tmp_path, name="tokenizer.json"):
    path = tmp_path / name
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return Tokenizer.from_file(str(path)), tokenizers.Tokenizer.from_file(str(path))


def _assert_parity(ours, hf, texts):
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_bos=True) == hf.encode(text).ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        with_specials = hf.encode(text).ids
        assert ours.decode(with_specials, skip_special=True) == hf.decode(with_specials, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------
# Tokenizer tests


@pytest.mark.parametrize("variant", ["legacy", "metaspace_first", "metaspace_first_split", "metaspace_always"])
def test_encode_decode_parity_with_tokenizers(llama_spec, tmp_path, variant):
    """Ours and `tokenizers` give the same ids and strings on byte fallback, leading spaces, whitespace runs,
    unicode, digits, the empty string and added tokens anywhere, for both Llama file layouts. Catches wrong
    merge order, a "▁" prefixed where HF does not (or vice versa) around "<image>", broken byte fallback."""
    spec = {"legacy": llama_spec,
            "metaspace_first": _metaspace_variant(llama_spec),
            "metaspace_first_split": _metaspace_variant(llama_spec, split=True),
            "metaspace_always": _metaspace_variant(llama_spec, split=True, scheme="always")}[variant]
    ours, hf = _load_both(spec, tmp_path)
    new = ["<image>", "<POSE>", "<extra_1>", "<POSE>"]  # known, new, new in one call, repeated
    hf.add_special_tokens(new)
    assert ours.add_special_tokens(new) == [hf.token_to_id(t) for t in new]
    assert len(set(ours.add_special_tokens(new))) == 3
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    _assert_parity(ours, hf, BATTERY + _sentences(50, seed=1))


def test_llava_layout_facts(llama_spec, tmp_path):
    """Pins the llava-hf conventions the rest of the code relies on: ids of <unk>/<s>/</s>/<image>/<pad>,
    <0x0A> byte fallback for characters outside the vocab, "▁" on the segment after "<image>" (legacy
    normalizer runs per segment), and add_special_tokens keeping existing ids."""
    ours, hf = _load_both(llama_spec, tmp_path)
    assert (ours.unk_id, ours.bos_id, ours.eos_id) == (0, 1, 2)
    V = len(llama_spec["model"]["vocab"])
    assert (ours.token_to_id("<image>"), ours.pad_id, ours.vocab_size) == (V, V + 1, V + 2)
    assert ours.add_special_tokens(["<image>", "<POSE>", "<image>"]) == [V, V + 2, V]
    assert ours.id_to_token(V + 2) == "<POSE>"
    assert [ours.id_to_token(i) for i in ours.encode("😀")][1:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    after_image = ours.encode("<image>\nhi")
    assert after_image[0] == V and ours.id_to_token(after_image[1]).startswith(SPIECE)
    assert ours.encode("") == [] and ours.encode("", add_bos=True) == [1]


def test_decode_invalid_utf8_and_unknown_ids(llama_spec, tmp_path):
    """Byte-token runs that are not valid UTF-8 decode to one U+FFFD per byte, exactly as `tokenizers`;
    ids past the vocabulary (padded embedding rows) are skipped rather than crashing generation."""
    ours, hf = _load_both(llama_spec, tmp_path)
    b = lambda x: ours.token_to_id(f"<0x{x:02X}>")  # noqa: E731
    a = ours.encode("a")
    for ids in ([b(0xE4), b(0xBD)], [b(0xFF)], a + [b(0xE4), b(0xBD), b(0xA0)] + a, [b(0xE4)] + a + [b(0x80)],
                [b(0xC3), b(0xA9), b(0xFF)], [b(0x20), b(0x20)] + a):
        assert ours.decode(ids) == hf.decode(ids), ids
    assert ours.decode(a + [10**6]) == hf.decode(a + [10**6]) == "a"


def test_added_token_options(llama_spec, tmp_path):
    """lstrip/rstrip added tokens and a normalized (non-special) added token behave as in `tokenizers`
    (a normalized token is matched in the normalized text, where the legacy normalizer prefixed "▁")."""
    spec = copy.deepcopy(llama_spec)
    vocab, next_id = spec["model"]["vocab"], len(spec["model"]["vocab"]) + 2
    assert "knee" in vocab  # an added token that is also a model token keeps the model's id
    for content, lstrip, rstrip, normalized in [("<L>", True, False, False), ("<R>", False, True, False),
                                                ("<L>!", False, False, False), ("knee", False, False, True),
                                                ("arms up", False, False, True)]:
        if content not in vocab:  # new ids are consecutive; `tokenizers` would renumber them otherwise
            vocab_id, next_id = next_id, next_id + 1
        spec["added_tokens"].append({"id": vocab.get(content, vocab_id), "content": content, "single_word": False,
                                     "lstrip": lstrip, "rstrip": rstrip, "normalized": normalized,
                                     "special": not normalized})
    ours, hf = _load_both(spec, tmp_path)
    texts = ["a  <L>  b", "<L>x", "a <L>! b", "<L>!<L>", "a <R>   b", "x<R>", "knee bent", "left knee, right knee",
             "arms up", "both arms up", "a<L><R>b", "kneeknee"]
    _assert_parity(ours, hf, texts)
    knee, arms_up = ours.token_to_id("knee"), ours.token_to_id("arms up")
    assert [ours.id_to_token(i) for i in (knee, arms_up)] == [hf.id_to_token(i) for i in (knee, arms_up)]


def test_hand_written_metaspace_file(tmp_path):
    """A minimal hand-written file in the Metaspace style with pair-form merges: ids checked by hand
    (merge ranks, not merge-result length, decide) and against `tokenizers`."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t in [SPIECE, "h", "e", "l", "o", "w", "r", "d", "ll", SPIECE + "h", "he", SPIECE + "he", "llo",
              SPIECE + "hello", "wo", "rd", SPIECE + "wo", "ld", "or", "wor", SPIECE + "wor",
              "a", "b", "c", "bc", "ab", "bcd", "abc"]:
        vocab[t] = len(vocab)
    merges = [["l", "l"], [SPIECE, "h"], ["h", "e"], [SPIECE + "h", "e"], ["ll", "o"], [SPIECE + "he", "llo"],
              ["w", "o"], ["o", "r"], [SPIECE, "wo"], ["r", "d"], ["l", "d"],
              ["b", "c"], ["a", "b"], ["bc", "d"], ["a", "bc"]]
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>"])],
            "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": SPIECE, "prepend_scheme": "first", "split": False},
            "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                        {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence",
                        "decoders": [{"type": "Replace", "pattern": {"String": SPIECE}, "content": " "},
                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                      "vocab": vocab, "merges": merges}}
    ours, hf = _load_both(spec, tmp_path)
    toks = lambda text: [ours.id_to_token(i) for i in ours.encode(text)]  # noqa: E731
    assert toks("hello world") == [SPIECE + "hello", SPIECE + "wo", "r", "ld"]  # "o r" loses to "w o"
    assert toks("x") == [SPIECE, "<0x78>"]
    # "b c" merges first; the queued "a b" is then stale and must not merge "a bc" ahead of "bc d"
    assert toks("abcd") == [SPIECE, "a", "bcd"]
    _assert_parity(ours, hf, ["hello world", "x", "hello  world", "", "héllo", "worldhello", "abcd", "abc abcd"])
    spec["model"]["ignore_merges"] = True  # (Llama 3 style) a word that is itself a token skips the merges
    ours, hf = _load_both(spec, tmp_path, "ignore_merges.json")
    assert toks("wor") == [SPIECE + "wor"] and toks("wor wor") == [SPIECE + "wo", "r", SPIECE + "wo", "r"]
    _assert_parity(ours, hf, ["wor", "hello", "abcd"])
    spec["model"]["ignore_merges"] = False
    spec["model"]["byte_fallback"] = False  # then unknown characters become <unk>, a run of them one <unk>
    ours, hf = _load_both(spec, tmp_path, "no_fallback.json")
    assert toks("héé x") == [SPIECE + "h", "<unk>", SPIECE, "<unk>"] and ours.unk_id == 0
    _assert_parity(ours, hf, ["héé x", "éhé", "xx"])


def test_save_roundtrip_is_readable_by_tokenizers(llama_spec, tmp_path):
    """save() after add_special_tokens writes a file `tokenizers` reads with the same ids; catches a broken
    added_tokens list or a file layout HF rejects."""
    ours, _ = _load_both(llama_spec, tmp_path)
    pose_id = ours.add_special_tokens(["<POSE>"])[0]
    ours.save(str(tmp_path / "saved.json"))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "saved.json"))
    again = Tokenizer.from_file(str(tmp_path / "saved.json"))
    assert hf.token_to_id("<POSE>") == again.token_to_id("<POSE>") == pose_id
    _assert_parity(again, hf, BATTERY)


def test_trained_bpe_loads_in_tokenizers_and_encodes_identically(tmp_path):
    """Our trainer writes a llava-hf style file that `tokenizers` loads and encodes exactly as we do on
    held-out text (so no learned merge spans two words), and decode(encode(x)) == x for ASCII text."""
    ours = Tokenizer.train_bpe(_sentences(3000, seed=2), vocab_size=500)
    assert ours.vocab_size == 500
    assert [ours.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>", "<POSE>")] == list(range(6))
    assert ours.token_to_id("<0x00>") == 6 and ours.token_to_id("<0xFF>") == 261
    ours.save(str(tmp_path / "tiny.json"))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tiny.json"))
    held_out = _sentences(200, seed=3)
    _assert_parity(ours, hf, held_out + BATTERY)
    for text in held_out + ["Mixed CASE, digits 123; punctuation: (ok)  double  spaces", " x", "tab\there"]:
        assert ours.decode(ours.encode(text)) == text
    assert len(ours.encode(held_out[0])) < len(held_out[0]) / 2  # merges were actually learned
    # deterministic: the same corpus gives the same merges
    again = Tokenizer.train_bpe(_sentences(3000, seed=2), vocab_size=500)
    assert again.spec["model"]["merges"] == ours.spec["model"]["merges"]


def test_word_cut_only_where_merges_allow_it(llama_spec, tmp_path):
    """Cutting a segment into words before each "▁" (so the word cache serves repeated words) must give
    the ids of one whole-segment BPE. Our trainer's merges never take a right symbol with "▁", so it cuts
    and matches the uncut encoding; a file with a "▁▁" merge (learned from whitespace runs) must not cut,
    since there a cut would split "▁▁" apart."""
    ours = Tokenizer.train_bpe(_sentences(3000, seed=2), vocab_size=500)
    assert ours._cut_words
    texts = BATTERY + _sentences(200, seed=4) + ["a  b", "  x  y  ", "▁▁lead", "end▁▁"]
    cut = [ours.encode(t, add_bos=True) for t in texts]
    ours._cut_words, ours._cache = False, {}
    assert [ours.encode(t, add_bos=True) for t in texts] == cut
    legacy, _ = _load_both(llama_spec, tmp_path)
    assert any(SPIECE in m.split(" ")[1] for m in legacy.spec["model"]["merges"])  # a "▁▁"-like merge
    assert not legacy._cut_words


def test_trainer_matches_naive_recount():
    """The incremental pair-count update learns exactly the merges of the textbook loop that recounts every
    pair after each merge (same tie rule: most frequent, then smallest pair). Catches a missed count update."""
    texts = _sentences(300, seed=4)
    ours = Tokenizer.train_bpe(texts, vocab_size=380)
    # words are "▁"-prefixed pieces: "A  b" -> "▁A", "▁", "▁b"
    words = Counter(tuple(w) for t in texts
                    for w in re.findall(f"{SPIECE}[^{SPIECE}]*", SPIECE + t.replace(" ", SPIECE)))
    vocab = set(ours.spec["model"]["vocab"]) - {m.replace(" ", "") for m in ours.spec["model"]["merges"]}
    merges = []
    while len(vocab) < 380:
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{a} {b}")
        vocab.add(a + b)
        new_words = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    assert ours.spec["model"]["merges"] == merges


def test_bad_files_give_clear_errors(tmp_path):
    """Missing, non-JSON and unsupported files name the file and what was expected."""
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.from_file(str(tmp_path / "bad.json"))
    (tmp_path / "wp.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="BPE"):
        Tokenizer.from_file(str(tmp_path / "wp.json"))
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)


# ----------------------------------------------------------------------------------------------------
# LoRA tests


class _Attention(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d)  # not a target: must stay untouched

    def forward(self, x):  # (B, T, d)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  (B, h, T, d/h)
        y = nn.functional.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                                       split(self.v_proj(x)), is_causal=True)  # (B, h, T, d/h)
        x = x + self.o_proj(y.transpose(1, 2).flatten(2))  # (B, T, d)
        return x + self.up(x)[..., : x.shape[-1]]  # (B, T, d)


def _toy():
    return nn.Sequential(_Attention(), _Attention())


def _train_adapters(model, x, steps=5, lr=0.5):
    """Plain gradient descent on what requires grad (torch.optim would cost a 4 s import of torch._dynamo)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        loss = (model(x) - 1).pow(2).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g


def test_lora_init_grad_and_names():
    """At init the wrapped model equals the base exactly (B = 0); only lora_A/lora_B of the wrapped layers
    train; base state-dict keys are unchanged so a base checkpoint still loads. Catches a nonzero B init, a
    base weight left trainable, or renamed keys (q_proj.base.weight)."""
    model, x = _toy(), torch.randn(2, 5, 16)
    base = copy.deepcopy(model)
    base_keys = set(model.state_dict())
    names = apply_lora(model, r=4, alpha=8)
    assert names == [f"{i}.{p}_proj" for i in range(2) for p in "qkvo"]
    assert torch.equal(model(x), base(x))
    wrapped_params = {f"{n}.{p}": t for n in names for p, t in model.get_submodule(n).named_parameters()}
    assert {k for k, t in wrapped_params.items() if t.requires_grad} == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    assert all(p.requires_grad for n, p in model.named_parameters() if ".up." in n)  # caller decides
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == set(lora_state_dict(model))
    assert base_keys <= set(model.state_dict())
    assert model[0].q_proj.lora_A.abs().sum() > 0 and model[0].q_proj.lora_B.abs().sum() == 0


def test_lora_train_disable_merge():
    """After a few steps (B != 0) the output moves; lora_disabled gives the untouched base (the RFT
    reference policy) and restores the adapters after; merging gives the same output with plain
    nn.Linear and base keys; lora_state_dict restores a trained adapter into a fresh wrap."""
    model, x = _toy(), torch.randn(2, 5, 16)
    base = copy.deepcopy(model)
    model.requires_grad_(False)  # the paper's setting: only the adapters train
    apply_lora(model, r=4, alpha=8)
    _train_adapters(model, x)
    trained = model(x).detach()
    assert (trained - base(x)).abs().max() > 1e-3
    with lora_disabled(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), trained)

    fresh = copy.deepcopy(base)
    apply_lora(fresh, r=4, alpha=8)
    fresh.load_state_dict(lora_state_dict(model), strict=False)
    assert torch.equal(fresh(x), trained)

    merged_names = merge_lora(model)
    assert len(merged_names) == 8 and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in merged_names)
    assert set(model.state_dict()) == set(base.state_dict())
    assert (model(x) - trained).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="no LoRA"):
        with lora_disabled(model):
            pass


def test_lora_scale_dtype_and_errors():
    """The adapter adds exactly (alpha/r) B A x (checked by hand), A/B follow the base dtype, and bad
    targets or double wrapping are clear errors."""
    lin = nn.Linear(6, 3).double()
    lora = LoRALinear(lin, r=2, alpha=5.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = x @ lin.weight.T + lin.bias + 2.5 * x @ lora.lora_A.T @ lora.lora_B.T  # (4, 3)
    assert (lora(x) - expected).abs().max() <= 1e-12
    assert lora.weight is lin.weight  # adopted, not copied

    half = nn.Sequential(_Attention()).to(torch.bfloat16)
    apply_lora(half)
    assert half[0].q_proj.lora_A.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="already carry LoRA"):
        apply_lora(half)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(_toy(), targets=("gate_proj",))
