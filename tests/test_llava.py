"""LLaVA-1.5 in model.py against transformers' LlavaForConditionalGeneration, checkpoint loading in the
layouts found in the wild, and the KV-cache sampler the RFT loop relies on. Tiny configs, CPU only."""
import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import (CLIPVisionConfig, Llava, LlamaConfig, LlavaConfig, LoRALinear, RMSNorm, apply_lora,
                   checkpoint_key_to_name, load_llava, lora_disabled, merge_lora, sample_next, token_logprobs)

IMAGE = 99  # image token id of the tiny config
# A tiny llava written the way the hub's llava-1.5-7b-hf config.json is: fields left out take defaults.
HUB_STYLE_TINY = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": IMAGE,
    "model_type": "llava", "pad_token_id": 0, "projector_hidden_act": "gelu",
    "text_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 100},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 32, "image_size": 28, "intermediate_size": 64, "model_type": "clip_vision_model",
                      "num_attention_heads": 4, "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 768,
                      "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 100,
}
# The content of llava-hf/llava-1.5-7b-hf's config.json.
HUB_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
LLAVA_7B_PARAMETERS = 7_063_427_072  # what transformers builds from HUB_7B


def hf_to_hub(name):
    """transformers 5's in-memory parameter name -> the key in the hub's llava-1.5-7b-hf safetensors."""
    for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(name)


def randomize_(model, std=0.15):
    """Weights large enough that logits are O(1) and sampling is far from uniform, so a wrong op shows up
    well above the tolerances (the default init, std 0.02, makes every logit ~0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, std)
            if re.search(r"norm.*weight$", name):
                p.add_(1.0)
    return model


def prompt_batch():
    """Two prompts with one image each; the second is 3 tokens shorter and left-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, IMAGE, (2, 14), generator=g)  # (2, 14)
    ids[0, 5:9] = IMAGE
    ids[1, 6:10] = IMAGE
    mask = torch.ones(2, 14, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    pixels = torch.randn(2, 3, 28, 28, generator=g)  # (2, 3, 28, 28)
    return ids, mask, pixels


def write_checkpoint(folder, tensors, config, shards=1):
    """safetensors file(s) plus config.json; with shards > 1, an index json as the hub writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random tiny transformers LLaVA, built from the hub-style config, saved in four layouts."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llava")
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(HUB_STYLE_TINY))
    hf = randomize_(hf.float()).eval()  # the config's torch_dtype float16 would make half of it fp16
    hf.save_pretrained(root / "save_pretrained")
    saved = load_file(str(root / "save_pretrained" / "model.safetensors"))
    hub = {hf_to_hub(name): t.clone() for name, t in hf.state_dict().items()}
    model_dot = {name: t.clone() for name, t in hf.state_dict().items()}  # a raw transformers state_dict
    paths = {
        "save_pretrained": root / "save_pretrained",
        "hub": write_checkpoint(root / "hub", hub, HUB_STYLE_TINY),
        "hub_sharded": write_checkpoint(root / "hub_sharded", hub, HUB_STYLE_TINY, shards=3),
        "state_dict": write_checkpoint(root / "state_dict", model_dot, HUB_STYLE_TINY),
    }
    return hf, paths, hub, sorted(saved)


@pytest.fixture(scope="module")
def tiny(checkpoints):
    """Our model loaded from the hub layout (the same weights as the transformers model)."""
    return load_llava(checkpoints[1]["hub"]).eval()


# ---- parity with transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["save_pretrained", "hub", "hub_sharded", "state_dict"])
def test_logits_and_greedy_tokens_match_transformers(checkpoints, layout):
    """Logits with images in a left-padded batch, and greedy generation, equal transformers' for every
    checkpoint layout. Catches any wrong op (rotary layout, GQA head grouping, CLIP feature layer, quick
    GELU, projector, image-token placement, padding positions) and any wrong key rename."""
    hf, paths, _, _ = checkpoints
    ours = load_llava(paths[layout]).eval()
    ids, mask, pixels = prompt_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' forward does not derive them from the mask
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, pixels, mask)
    real = mask.bool()
    assert expected.abs().max() > 1.0  # logits big enough for the tolerance to mean something
    torch.testing.assert_close(out.logits[real], expected[real], atol=1e-4, rtol=0)

    hf_tokens = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, do_sample=False,
                            max_new_tokens=6, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    ours_tokens = ours.generate(ids, pixels, mask, max_new_tokens=6, temperature=0).tokens
    assert hf_tokens.shape == (2, 6)
    assert torch.equal(ours_tokens, hf_tokens)


def test_save_pretrained_layout_is_ours(checkpoints, tiny):
    """transformers' save_pretrained writes exactly our parameter names, so our own checkpoints need no
    renaming. Catches a module renamed in model.py (which would also break LoRA-by-name and loading)."""
    assert checkpoints[3] == sorted(tiny.state_dict())


@pytest.mark.parametrize("layer, strategy", [(-2, "full"), (-1, "default"), (1, "default")])
def test_image_features_match_transformers(checkpoints, tiny, layer, strategy):
    """Projected CLIP features for other feature layers and the 'full' strategy (class token kept).
    Catches an off-by-one in counting hidden states or a class token dropped in the wrong place."""
    hf = checkpoints[0]
    pixels = prompt_batch()[2]
    tiny.config.vision_feature_layer, tiny.config.vision_feature_select_strategy = layer, strategy
    try:
        with torch.no_grad():
            ours = tiny.image_features(pixels)
            expected = torch.stack(hf.model.get_image_features(  # a list of (L, d), one per image
                pixels, vision_feature_layer=layer, vision_feature_select_strategy=strategy).pooler_output)
    finally:
        tiny.config.vision_feature_layer, tiny.config.vision_feature_select_strategy = -2, "default"
    assert ours.shape == (2, 5 if strategy == "full" else 4, 64)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# ---- configs -----------------------------------------------------------------------------------------


def assert_same_config(ours, theirs):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(ours.text_config, f) == getattr(theirs.text_config, f), f
    assert ours.text_config.rope_theta == theirs.text_config.rope_parameters["rope_theta"]
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "image_size", "patch_size", "layer_norm_eps"):
        assert getattr(ours.vision_config, f) == getattr(theirs.vision_config, f), f
    for f in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
              "multimodal_projector_bias"):
        assert getattr(ours, f) == getattr(theirs, f), f


@pytest.mark.parametrize("d", [HUB_7B, HUB_STYLE_TINY, {}, {"vision_config": {}, "text_config": {"rope_theta": 5e5}}],
                         ids=["hub-7b", "hub-style-tiny", "empty", "partial"])
def test_config_defaults_match_transformers(d):
    """Fields a config.json leaves out take transformers' defaults (LLaVA's CLIP-L/336 when vision_config
    is absent, plain CLIP's when it is a partial dict; Llama's for the text model), and to_dict() reads
    back to the same config in both libraries. Catches a wrong default such as rms_norm_eps 1e-6 vs 1e-5."""
    ours = LlavaConfig.from_dict(d)
    assert_same_config(ours, transformers.LlavaConfig.from_dict(d))
    assert LlavaConfig.from_dict(ours.to_dict()) == ours
    assert_same_config(ours, transformers.LlavaConfig.from_dict(ours.to_dict()))


def test_hub_7b_config_values():
    """The facts of llava-1.5-7b-hf the rest of the project relies on."""
    c = LlavaConfig.from_dict(HUB_7B)
    assert (c.text_config.vocab_size, c.text_config.rms_norm_eps, c.text_config.rope_theta) == (32064, 1e-5, 1e4)
    assert (c.image_token_index, c.pad_token_id, c.num_image_tokens) == (32000, 32001, 576)
    assert (c.vision_feature_layer, c.vision_feature_select_strategy) == (-2, "default")


def test_llava_7b_builds_on_meta_with_hub_shapes(tmp_path):
    """The llava-1.5-7b preset builds from config.json alone on the meta device, with exactly the
    parameter names (after the hub -> ours rename) and shapes of transformers' model, 7.06 B in all.
    Catches a missing bias, a wrong MLP width or vocabulary, or an unused module that is not in the hub."""
    (tmp_path / "config.json").write_text(json.dumps(HUB_7B))
    ours = load_llava(tmp_path, dtype=torch.float16, device="meta")
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(HUB_7B))
    hub_shapes = {checkpoint_key_to_name(hf_to_hub(n)): tuple(p.shape) for n, p in hf.state_dict().items()}
    assert {n: tuple(p.shape) for n, p in ours.state_dict().items()} == hub_shapes
    total = sum(p.numel() for p in ours.parameters())
    print(f"llava-1.5-7b: {total:,} parameters")
    assert total == sum(p.numel() for p in hf.parameters()) == LLAVA_7B_PARAMETERS
    assert all(p.is_meta and p.dtype == torch.float16 for p in ours.parameters())


# ---- loading errors ----------------------------------------------------------------------------------


def test_bad_checkpoints_name_the_keys(checkpoints, tmp_path):
    """Missing keys, unknown keys and shape mismatches are errors naming the keys (first few and a count).
    Catches a loader that silently leaves random weights in place or drops extra tensors."""
    hub = checkpoints[2]
    dropped = sorted(k for k in hub if ".layers.1." in k and k.startswith("language_model"))
    missing = {k: v for k, v in hub.items() if k not in dropped}
    with pytest.raises(ValueError, match=rf"{len(dropped)} missing keys: language_model\.model\.layers\.1\..* and "
                                         rf"{len(dropped) - 5} more"):
        load_llava(write_checkpoint(tmp_path / "missing", missing, HUB_STYLE_TINY))
    extra = dict(hub, **{"vision_tower.vision_model.head.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"1 unknown checkpoint keys: vision_tower\.vision_model\.head\.weight"):
        load_llava(write_checkpoint(tmp_path / "unknown", extra, HUB_STYLE_TINY))
    wrong = dict(hub, **{"multi_modal_projector.linear_1.weight": torch.zeros(64, 33)})
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.weight \(64, 33\) vs model \(64, 32\)"):
        load_llava(write_checkpoint(tmp_path / "wrong", wrong, HUB_STYLE_TINY, shards=2))


def test_missing_files_are_named(checkpoints, tmp_path):
    """A folder without config.json or without weights fails with the path in the message."""
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llava(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HUB_STYLE_TINY))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_llava(tmp_path)
    assert load_llava(tmp_path, device="meta").language_model.lm_head.weight.is_meta  # meta reads no weights


def test_image_token_count_mismatch_is_an_error(tiny):
    """A prompt whose image-token count differs from the number of features is a ValueError with both
    numbers, not a silent misalignment of the image."""
    ids, mask, pixels = prompt_batch()
    ids[0, 9] = IMAGE
    with pytest.raises(ValueError, match="9 image tokens .* 8 image features"):
        tiny(ids, pixels, mask)


# ---- generation --------------------------------------------------------------------------------------


def full_forward(model, ids, mask, pixels, gen):
    """The no-cache reference: one forward over prompt + generated tokens."""
    all_ids = torch.cat([ids, gen.tokens], dim=1)  # (B, T0 + Tn)
    all_mask = torch.cat([mask, torch.ones_like(gen.tokens)], dim=1)  # generated pads were fed too
    with torch.no_grad():
        return model(all_ids, pixels, all_mask)


def test_kv_cache_steps_equal_full_forward(tiny):
    """Each step's logits with the KV cache equal a full re-forward's logits at that position. Catches a
    cache written at the wrong slot, a wrong decode position or mask."""
    ids, mask, pixels = prompt_batch()
    gen = tiny.generate(ids, pixels, mask, max_new_tokens=7, temperature=1.0, top_p=0.9, output_logits=True,
                        generator=torch.Generator().manual_seed(0))
    full = full_forward(tiny, ids, mask, pixels, gen).logits  # (B, T0 + Tn, V)
    T0 = ids.shape[1]
    torch.testing.assert_close(gen.logits, full[:, T0 - 1:T0 - 1 + gen.tokens.shape[1]], atol=1e-4, rtol=0)


def test_left_padding_gives_the_unpadded_tokens(tiny):
    """A left-padded row generates what it generates alone without padding (positions counted from its
    first real token, padding masked). Catches positions counted from the padded start."""
    ids, mask, pixels = prompt_batch()
    batch = tiny.generate(ids, pixels, mask, max_new_tokens=6, temperature=0)
    alone = tiny.generate(ids[1:, 3:], pixels[1:], max_new_tokens=6, temperature=0)
    assert torch.equal(batch.tokens[1], alone.tokens[0])
    torch.testing.assert_close(batch.logprobs[1], alone.logprobs[0], atol=1e-5, rtol=0)


def test_shared_prefill_equals_repeated_prompts(tiny):
    """num_return_sequences = G prefills each prompt once and repeats its KV cache and last hidden state G
    times; that must sample what the prompts repeated G times sample with the same generator, draw for
    draw: equal tokens, masks and captures, and logprobs, logits and captured hidden states equal up to
    float rounding, rows prompt-major (b*G+g). Left-padded prompts of two lengths, stop and capture tokens
    on. Catches a cache or key mask repeated in the wrong order (.repeat for .repeat_interleave) or not at all."""
    ids, mask, pixels = prompt_batch()
    G = 3
    rep = lambda t: t.repeat_interleave(G, dim=0)  # noqa: E731  (2, ...) -> (2G, ...)

    def run(ids, pixels, mask, **options):
        return tiny.generate(ids, pixels, mask, max_new_tokens=8, temperature=1.0, top_p=0.9, output_logits=True,
                             generator=torch.Generator().manual_seed(4), **options)

    free = run(rep(ids), rep(pixels), rep(mask)).tokens  # (2G, 8)
    capture, stop = int(free[0, 2]), int(free[G, 4])  # so that some rows capture and some stop early
    repeated = run(rep(ids), rep(pixels), rep(mask), stop_token_ids=[stop], capture_token_id=capture)
    shared = run(ids, pixels, mask, stop_token_ids=[stop], capture_token_id=capture, num_return_sequences=G)
    assert shared.tokens.shape == repeated.tokens.shape and shared.tokens.shape[0] == 2 * G
    assert shared.captured.any() and not shared.mask.all()  # both paths are exercised
    assert not torch.equal(shared.tokens[:G], shared.tokens[:1].expand(G, -1))  # a prompt's G answers differ
    for field in ("tokens", "mask", "captured"):
        assert torch.equal(getattr(shared, field), getattr(repeated, field)), field
    for field in ("logprobs", "logits", "captured_hidden"):
        torch.testing.assert_close(getattr(shared, field), getattr(repeated, field), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        tiny.generate(ids, pixels, mask, max_new_tokens=2, num_return_sequences=0)


def test_stop_tokens_end_rows(tiny):
    """A row stops after its stop token: the stop token is kept and masked in, later slots hold pad with
    mask False and logprob 0, other rows go on; generation ends once every row has stopped."""
    ids, mask, pixels = prompt_batch()
    free = tiny.generate(ids, pixels, mask, max_new_tokens=6, temperature=0).tokens  # (2, 6)
    stop = int(free[0, 2])
    gen = tiny.generate(ids, pixels, mask, max_new_tokens=6, temperature=0, stop_token_ids=[stop],
                        pad_token_id=-1)
    for row in range(2):
        hits = (free[row] == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 6  # tokens up to and including the stop token
        assert torch.equal(gen.tokens[row, :end], free[row, :end])
        assert gen.mask[row, :end].all() and not gen.mask[row, end:].any()
        assert (gen.tokens[row, end:] == -1).all() and (gen.logprobs[row, end:] == 0).all()
    both = tiny.generate(ids, pixels, mask, max_new_tokens=6, temperature=0,
                         stop_token_ids=[int(free[0, 1]), int(free[1, 1])])
    assert both.tokens.shape[1] <= 2


def test_logprobs_and_captured_hidden_equal_full_forward(tiny):
    """logprobs are log_softmax of the logits at the SAMPLING temperature (0.7 here; no top-p) at each
    sampled token, as the teacher-forced token_logprobs(..., 0.7) gives; captured_hidden is the full
    forward's last hidden state at the capture token's own position, also when it is the very last token
    generated (the extra forward). Catches logprobs of another policy than the one that sampled (e.g. at
    temperature 1) and a hidden state off by one position."""
    ids, mask, pixels = prompt_batch()
    T0 = ids.shape[1]

    def run(n, capture=None):
        return tiny.generate(ids, pixels, mask, max_new_tokens=n, temperature=0.7, top_p=0.8,
                             capture_token_id=capture, generator=torch.Generator().manual_seed(3))

    first = run(8)
    assert torch.equal(run(8).tokens, first.tokens)  # a seeded generator reproduces the samples
    capture = int(first.tokens[0, 4])
    k = int((first.tokens[0] == capture).nonzero()[0])  # first occurrence in row 0
    for n in (8, k + 1):  # k + 1: the capture token is the last token generated
        gen = run(n, capture)
        full = full_forward(tiny, ids, mask, pixels, gen)
        expected = token_logprobs(full.logits[:, T0 - 1:-1], gen.tokens, temperature=0.7)  # (B, Tn)
        torch.testing.assert_close(gen.logprobs[gen.mask], expected[gen.mask], atol=1e-4, rtol=0)
        assert gen.captured[0]
        torch.testing.assert_close(gen.captured_hidden[0], full.hidden_states[0, T0 + k], atol=1e-5, rtol=0)
        hits = (gen.tokens[1] == capture).nonzero()
        assert bool(gen.captured[1]) == (len(hits) > 0)
        if len(hits):
            torch.testing.assert_close(gen.captured_hidden[1], full.hidden_states[1, T0 + int(hits[0])],
                                       atol=1e-5, rtol=0)


def test_token_logprobs_is_log_softmax():
    """The teacher-forcing helper equals log_softmax + gather in float64, also for bf16 logits."""
    logits = torch.randn(2, 5, 11) * 4
    targets = torch.randint(0, 11, (2, 5))
    expected = logits.double().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(token_logprobs(logits.bfloat16(), targets).double(), expected, atol=0.1, rtol=0)


@pytest.mark.parametrize("max_rejections", [4, 0])
def test_top_p_sampling_follows_the_nucleus(max_rejections):
    """Sampled frequencies match the renormalised top-p nucleus of softmax(logits / T), both through
    rejection and through the sorted fallback (max_rejections=0). Catches a nucleus one token too small or
    large, or a temperature applied twice."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, top_p, n = 0.8, 0.75, 40000
    p = (logits / temperature).softmax(-1)
    mass_before = p.cumsum(-1) - p
    nucleus = torch.where(mass_before < top_p, p, torch.zeros(()))
    nucleus = nucleus / nucleus.sum()
    tokens = sample_next(logits.expand(n, -1), temperature, top_p, torch.Generator().manual_seed(0), max_rejections)
    freq = torch.bincount(tokens, minlength=6).float() / n
    assert (nucleus[3:] == 0).all() and (freq[3:] == 0).all()  # tokens 3..5 lie outside this nucleus
    torch.testing.assert_close(freq, nucleus, atol=0.01, rtol=0)
    assert torch.equal(sample_next(logits[None], 0.0, top_p), torch.tensor([0]))


# ---- precision and memory options --------------------------------------------------------------------


def test_bf16_load_and_autocast_stay_close(checkpoints, tiny):
    """load_llava(dtype=bfloat16) and float32 weights under bf16 autocast both run (forward and a KV-cache
    generate) and stay close to float32 logits. Catches a dtype clash (e.g. a float32 cache or rotary
    table meeting bf16 keys) and a norm computed in bf16 far from float32."""
    ids, mask, pixels = prompt_batch()
    with torch.no_grad():
        reference = tiny(ids, pixels, mask).logits
        bf16 = load_llava(checkpoints[1]["hub"], dtype=torch.bfloat16).eval()
        assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
        logits_bf16 = bf16(ids, pixels, mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_autocast = tiny(ids, pixels, mask).logits
            gen = tiny.generate(ids, pixels, mask, max_new_tokens=3, temperature=0, capture_token_id=5)
    real = mask.bool()
    scale = reference[real].abs().max()
    for logits in (logits_bf16, logits_autocast):
        assert logits.dtype == torch.bfloat16
        assert (logits[real].float() - reference[real]).abs().max() < 0.1 * scale
    assert gen.tokens.shape == (2, 3)
    assert bf16.generate(ids, pixels, mask, max_new_tokens=2, temperature=0).tokens.shape == (2, 2)


def test_rmsnorm_survives_fp16_activations():
    """RMSNorm of fp16 activations in the hundreds (as in a 7B residual stream) matches a float64
    reference: the mean square is taken in float32. Squared in fp16 it overflows (300^2 > 65504) to 0."""
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = torch.randn(3, 64) * 400  # (3, 64)
    expected = norm.weight.double() * x.double() * (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
    out = norm.half()(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


def test_activation_checkpointing_keeps_loss_and_grads(checkpoints):
    """With gradient_checkpointing on, layers are recomputed in the backward pass and every gradient is
    unchanged. Catches a flag that does nothing, or a checkpointed layer that drops an argument."""
    ids, mask, pixels = prompt_batch()
    grads, calls = [], []
    for flag in (False, True):
        model = load_llava(checkpoints[1]["hub"]).train()
        model.language_model.model.gradient_checkpointing = flag
        runs, layer = [], model.language_model.model.layers[0]
        forward = layer.forward  # count calls (module hooks do not fire when checkpoint recomputes)
        layer.forward = lambda *args: (runs.append(1), forward(*args))[1]
        out = model(ids, pixels, mask)
        loss = -token_logprobs(out.logits[:, :-1], ids[:, 1:].clamp(max=98))[mask[:, 1:].bool()].mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        calls.append(len(runs))
    assert calls == [1, 2]  # with checkpointing the layer is run again in the backward pass
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_tiny_model_builds_without_a_checkpoint():
    """Llava(config) builds with small random weights (the tiny preset trains from scratch)."""
    config = LlavaConfig(text_config=LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2),
                         vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=14, patch_size=7),
                         image_token_index=49)
    model = Llava(config)
    assert config.num_image_tokens == 4
    ids = torch.tensor([[1, 49, 49, 49, 49, 7]])
    out = model(ids, torch.randn(1, 3, 14, 14))
    assert out.logits.shape == (1, 6, 50) and out.hidden_states.shape == (1, 6, 32)
    assert model.language_model.lm_head.weight.std() < 0.05


# ---- LoRA on the real decoder ------------------------------------------------------------------------


def test_lora_on_llava_init_merge_and_reference(checkpoints):
    """LoRA on the loaded LLaVA's q/k/v/o: the output equals the base at init, adapters-off equals the
    base after training moved the adapters, merging reproduces the adapted output, and only the adapters
    require grad. Catches LoRA wrapping the wrong layers (CLIP also has q/k/v_proj), a broken
    `lora_disabled` (which would silently make RFT's KL term zero) or a wrong merge scale."""
    model = load_llava(checkpoints[1]["hub"]).eval()
    ids, mask, pixels = prompt_batch()
    base = model(ids, pixels, mask).logits  # (2, 14, V)
    model.requires_grad_(False)
    wrapped = apply_lora(model.language_model, r=4, alpha=8.0)
    assert len(wrapped) == 4 * len(model.language_model.model.layers)
    assert not any("vision_tower" in n for n, p in model.named_parameters() if p.requires_grad)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert torch.allclose(model(ids, pixels, mask).logits, base, atol=1e-6)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    adapted = model(ids, pixels, mask).logits
    assert (adapted - base).abs().max() > 1e-3
    with lora_disabled(model):
        assert torch.allclose(model(ids, pixels, mask).logits, base, atol=1e-6)
    assert torch.allclose(model(ids, pixels, mask).logits, adapted)  # adapters back on
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(ids, pixels, mask).logits, adapted, atol=1e-5)
