"""Benchmarks (not collected by pytest). Prints figures side by side in one run; never asserts speed.

    python tests/benchmark.py            # everything
    python tests/benchmark.py smpl       # one section (see the names in BENCHES)

Timings on shared machines are noisy: compare the ratios printed within one run.
"""
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BENCHES = {}


def bench(name):
    """Register a benchmark section under `name`."""
    def register(fn):
        BENCHES[name] = fn
        return fn
    return register


def timeit(fn, repeat=5, warmup=1):
    """Best wall time of `repeat` calls, in seconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- sections ---------------------------------------------------------------------------------------
# (each section is a function decorated with @bench("name") that prints its own table)


@bench("smpl")
def bench_smpl(B=512):
    """SMPL forward on CPU, float32, batch B: smplx vs ours with vertices, and our joints-only path
    (what the rewards call for the batch x G x pose_samples poses of every RFT step). Both read the same
    random model file in the official layout, so no licensed data is needed."""
    import pickle
    import tempfile

    import numpy as np
    import smplx
    import torch

    import smpl

    rng = np.random.default_rng(0)
    V = 6890
    weights = rng.random((V, 24)) ** 4
    J_regressor = rng.random((24, V)) * (rng.random((24, V)) < 0.01)
    model = {"v_template": rng.normal(size=(V, 3)) * 0.3, "shapedirs": rng.normal(size=(V, 3, 10)) * 0.02,
             "posedirs": rng.normal(size=(V, 3, 207)) * 0.02,
             "J_regressor": J_regressor / J_regressor.sum(1, keepdims=True),
             "weights": weights / weights.sum(1, keepdims=True), "f": rng.integers(0, V, size=(13776, 3)),
             "kintree_table": np.stack([np.array([-1] + smpl.PARENTS[1:]), np.arange(24)])}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "SMPL_NEUTRAL.pkl")
        with open(path, "wb") as f:
            pickle.dump(model, f)
        ours = smpl.SMPL.from_file(path)
        theirs = smplx.SMPL(model_path=path)
    g = torch.Generator().manual_seed(0)
    body_pose, global_orient = torch.randn(B, 69, generator=g) * 0.5, torch.randn(B, 3, generator=g)
    betas, transl = torch.randn(B, 10, generator=g), torch.randn(B, 3, generator=g)
    default_threads = torch.get_num_threads()
    with torch.no_grad():
        err = (ours(body_pose, global_orient, betas, transl).vertices
               - theirs(body_pose=body_pose, global_orient=global_orient, betas=betas, transl=transl).vertices)
        print(f"batch {B}, float32, CPU, best wall time of several runs; max vertex difference to smplx "
              f"{err.abs().max().item():.1e} m")
        # On a shared, oversubscribed machine extra threads can make both slower: show 1 thread too.
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            t_smplx = timeit(lambda: theirs(body_pose=body_pose, global_orient=global_orient, betas=betas,
                                            transl=transl), repeat=3)
            t_ours = timeit(lambda: ours(body_pose, global_orient, betas, transl), repeat=3)
            t_joints = timeit(lambda: ours(body_pose, global_orient, betas, transl, return_vertices=False), repeat=20)
            print(f"  {threads} thread(s)")
            print(f"    {'smplx SMPL, with vertices':32s} {t_smplx * 1e3:8.1f} ms")
            print(f"    {'ours, with vertices':32s} {t_ours * 1e3:8.1f} ms   "
                  f"{t_smplx / t_ours:4.1f}x faster than smplx")
            print(f"    {'ours, joints only':32s} {t_joints * 1e3:8.1f} ms   "
                  f"{t_ours / t_joints:4.0f}x faster than ours with vertices, "
                  f"{t_smplx / t_joints:.0f}x than smplx")
    torch.set_num_threads(default_threads)


@bench("generate")
def bench_generate(B=64, prompt_len=32, new_tokens=64, rounds=2):
    """Sampling throughput (new tokens/s) of model.Llava.generate against transformers' generate on the
    same weights and settings: a small LLaVA (Llama d=256, 4 layers, vocab 32000), batch B, a random
    prompt of prompt_len tokens without images, new_tokens tokens at temperature 1 with top-p 0.9, no stop
    token, float32 on CPU. The two alternate for `rounds` rounds and the best of each is kept, so that a
    burst of load from other jobs hits both alike. Then the peak memory of load_llava on a sharded
    checkpoint, measured in a fresh process, against the checkpoint's size on disk."""
    import glob
    import subprocess
    import tempfile

    import torch
    import transformers

    from model import CLIPVisionConfig, LlamaConfig, LlavaConfig, load_llava

    config = LlavaConfig(
        text_config=LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                num_attention_heads=4, rms_norm_eps=1e-5),
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        image_token_index=31999, pad_token_id=0)
    torch.manual_seed(0)
    theirs = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(config.to_dict())).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp, max_shard_size="20MB")
        ours = load_llava(tmp).eval()
        shards = glob.glob(os.path.join(tmp, "*.safetensors"))
        on_disk = sum(os.path.getsize(f) for f in shards)
        # VmRSS before loading vs the peak (VmHWM) after, in a process that has done nothing else.
        probe = (f"import sys; sys.path.insert(0, {ROOT!r}); from model import load_llava\n"
                 "def status(key): return int(next(l for l in open('/proc/self/status')"
                 " if l.startswith(key)).split()[1])\n"
                 f"before = status('VmRSS:'); model = load_llava({tmp!r}); print(status('VmHWM:') - before)")
        peak_kib = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 31999, (B, prompt_len), generator=g)  # (B, T0)
    attention_mask = torch.ones(B, prompt_len, dtype=torch.long)  # (B, T0)

    def run_theirs():
        out = theirs.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                              top_p=0.9, top_k=0, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        assert out.shape == (B, prompt_len + new_tokens)

    def run_ours():
        out = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, temperature=1.0,
                            top_p=0.9, generator=g)
        assert out.tokens.shape == (B, new_tokens)

    times = {"theirs": float("inf"), "ours": float("inf")}
    with torch.no_grad():
        for _ in range(rounds):
            times["theirs"] = min(times["theirs"], timeit(run_theirs, repeat=1, warmup=0))
            times["ours"] = min(times["ours"], timeit(run_ours, repeat=1, warmup=0))
    n = B * new_tokens
    print(f"batch {B}, prompt {prompt_len}, {new_tokens} new tokens, temperature 1, top-p 0.9, float32, CPU, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"best of {rounds} alternating runs")
    print(f"  {'transformers generate':24s} {n / times['theirs']:8.1f} new tokens/s")
    print(f"  {'model.Llava.generate':24s} {n / times['ours']:8.1f} new tokens/s   "
          f"{times['theirs'] / times['ours']:.2f}x transformers (goal >= 1.5x)")
    print(f"  load_llava, {len(shards)} shards, {on_disk / 2**20:.1f} MiB on disk: peak RSS increase "
          f"{peak_kib / 1024:.1f} MiB = {peak_kib * 1024 / on_disk:.2f}x the checkpoint size")



@bench("prefill")
def bench_prefill(B=16, G=8, new_tokens=24, rounds=3):
    """The rollout's text sampling on the tiny preset (random weights, so no row stops early): B prompts
    x G answers, new_tokens tokens at temperature 1, as train_rft samples them. sample_policy prefills each
    prompt once and repeats its KV cache G times (Llava.generate's num_return_sequences); the old path
    embedded and prefilled every prompt G times. Both run alternately for `rounds` rounds, best of each
    kept, and must give the same tokens from the same seed."""
    import torch

    import data
    import model as M
    import train_sft

    world = data.PoseWorld("val", size=max(B, 64), cache_dir=None)
    tokenizer = M.Tokenizer.train_bpe(train_sft.poseworld_texts(world), train_sft.SFTConfig.vocab_size)
    torch.manual_seed(0)
    policy = M.PoseLLaVA.from_preset("tiny", tokenizer).eval()
    batch = data.collate_fn(tokenizer, policy, for_generation=True)([world[i] for i in range(B)])
    cfg, eos = policy.config, policy.config.llava.text_config.eos_token_id

    def shared():
        return M.sample_policy(policy, batch, G, new_tokens, generator=torch.Generator().manual_seed(0))

    def repeated():  # what sample_policy did before: the prompts repeated G times, then generate on B*G rows
        rep = lambda t: t.repeat_interleave(G, dim=0)  # noqa: E731
        visual = None
        if batch["clip_pixels"].shape[0] > 0:
            visual = rep(policy.project(*policy.encode_images(batch["clip_pixels"], batch["pose_pixels"])))
        x = policy.embed(rep(batch["input_ids"]), visual)  # (B*G, T0, d)
        g = torch.Generator().manual_seed(0)
        gen = policy.llava.generate(inputs_embeds=x, attention_mask=rep(batch["attention_mask"]).bool(),
                                    max_new_tokens=new_tokens, stop_token_ids=() if eos is None else (eos,),
                                    pad_token_id=cfg.llava.pad_token_id, capture_token_id=cfg.pose_token_id,
                                    generator=g)
        dist = policy.pose_head(gen.captured_hidden)  # the pose draws too, as sample_policy makes them
        torch.where(gen.captured[:, None], dist.sample(g), dist.mu)  # (B*G, 144)
        return gen

    times = {"repeated": float("inf"), "shared": float("inf")}
    with torch.no_grad():
        same = torch.equal(shared().tokens, repeated().tokens)
        for _ in range(rounds):
            times["repeated"] = min(times["repeated"], timeit(repeated, repeat=1, warmup=0))
            times["shared"] = min(times["shared"], timeit(shared, repeat=1, warmup=0))
    T0 = batch["input_ids"].shape[1]
    print(f"tiny preset (random weights), {B} prompts x G {G}, prompt {T0} tokens (image tokens included), "
          f"{new_tokens} new tokens, float32, CPU, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}; best of {rounds} alternating runs; same tokens both ways: {same}")
    print(f"  {'prompts repeated G times':32s} {times['repeated']:7.3f} s")
    print(f"  {'prefill shared (sample_policy)':32s} {times['shared']:7.3f} s   "
          f"{times['repeated'] / times['shared']:.2f}x faster")


@bench("tokenize")
def bench_tokenize(n=10000):
    """The tiny BPE (train_sft.train_tokenizer on PoseWorld's train split) encoding n of the retrievers'
    captions, each time with an empty word cache: the whole segment as one BPE word (what `tokenizers`
    does with the llava-hf layout) against word by word, cut before each "▁" (Tokenizer._cut_words, valid
    because no learned merge crosses a word). Prints both and whether the ids are the same."""
    import data
    import train_sft
    cfg = train_sft.SFTConfig()
    tok = train_sft.train_tokenizer(cfg, data.PoseWorld("train", size=cfg.poseworld_size, seed=0))
    captions = list(train_sft.retriever_world(cfg).captions)[:n]
    ids, times = {}, {}
    for cut in (False, True):
        tok._cut_words, tok._cache = cut, {}
        t0 = time.perf_counter()
        ids[cut] = [tok.encode(c, add_bos=True) for c in captions]
        times[cut] = time.perf_counter() - t0
    print(f"tiny BPE ({tok.vocab_size} tokens), {len(captions)} retriever captions, load average "
          f"{os.getloadavg()[0]:.1f}; same ids both ways: {ids[False] == ids[True]}")
    print(f"  {'whole segment':16s} {times[False]:7.2f} s")
    print(f"  {'word by word':16s} {times[True]:7.2f} s   {times[False] / times[True]:.1f}x faster")


@bench("adamw")
def bench_adamw(steps=50):
    """One AdamW step over the tiny policy's trained tensors (train_sft.py's two groups, 151 tensors, 2.0M
    numbers): the per-tensor loop (torch's CPU default), foreach, and fused (what the training scripts
    use). Gradients are fixed random tensors; prints ms a step and how far each ends from the loop."""
    import torch

    import data
    import train_sft
    cfg = train_sft.SFTConfig()
    tok = train_sft.train_tokenizer(cfg, data.PoseWorld("train", size=cfg.poseworld_size, seed=0))
    ends, times = {}, {}
    for kind in ("loop", "foreach", "fused"):
        torch.manual_seed(0)
        params = [p for p in train_sft.build_policy(cfg, tok, "cpu").parameters() if p.requires_grad]
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                                 {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                **{"loop": dict(foreach=False), "foreach": dict(foreach=True),
                                   "fused": dict(fused=True)}[kind])
        times[kind] = timeit(lambda: [opt.step() for _ in range(steps)], repeat=3) / steps
        ends[kind] = torch.cat([p.detach().flatten() for p in params])
    print(f"AdamW on {len(params)} tensors ({sum(p.numel() for p in params) / 1e6:.1f}M numbers), "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    for kind in times:
        print(f"  {kind:8s} {1000 * times[kind]:6.2f} ms a step   {times['loop'] / times[kind]:4.1f}x the loop's speed"
              f"   max |difference| from the loop after {4 * steps} steps {(ends[kind] - ends['loop']).abs().max():.1e}")


@bench("retriever")
def bench_retriever(steps=40):
    """train_retriever's step at the main job's settings (batch 256 of 20,000 PoseWorld captions with
    their twins): each batch's texts padded to the batch's longest (text_features) against runs of
    similar length (text_features_by_length, what train_retriever does). Prints seconds a step and the
    final losses, which should agree."""
    import data
    import rewards
    import train_sft
    cfg = train_sft.SFTConfig()
    tok = train_sft.train_tokenizer(cfg, data.PoseWorld("train", size=cfg.poseworld_size, seed=0))
    pairs = train_sft.retriever_world(cfg)
    n = cfg.retriever_pairs // 2
    joints, captions, twins = pairs.joints_body[:n], list(pairs.captions)[:n], train_sft.retriever_twins(cfg)[:n]
    runs = rewards.PoseTextRetriever.text_features_by_length

    def padded(self, ids, mask, groups=4):  # the whole batch cut to its longest text
        T = max(1, int(mask.sum(1).max()))
        return self.text_features(ids[:, :T], mask[:, :T])

    results = {}
    try:
        for name, f in (("padded", padded), ("runs", runs)):
            rewards.PoseTextRetriever.text_features_by_length = f
            model = rewards.train_retriever(joints, captions, tok, steps=steps, batch_size=cfg.retriever_batch,
                                            progress=False, hard_negatives=twins)
            # train_info["seconds"] times the training loop alone
            results[name] = (model.train_info["seconds"] / steps, model.train_info["final_loss"])
    finally:
        rewards.PoseTextRetriever.text_features_by_length = runs
    print(f"retriever, batch {cfg.retriever_batch} (+ twins), load average {os.getloadavg()[0]:.1f}")
    for name, (t, loss) in results.items():
        print(f"  {name:8s} {1000 * t:6.1f} ms a step   {results['padded'][0] / t:4.2f}x   loss after "
              f"{steps} steps {loss:.6f}")


@bench("rft")
def bench_rft(steps=10):
    """One HyGRPO step of the tiny preset on CPU (train_rft.hygrpo_step with the main job's defaults):
    seconds per step split into sampling, scoring (rewards and reference log-probs) and updating,
    candidates (G x pose_samples poses per prompt) per second, and the process's peak memory. Uses the
    SFT checkpoint in $RFT_BENCH_SFT (e.g. out/tiny-sft of a main job) or trains a small one first."""
    import resource
    import tempfile

    import torch

    import data
    import rewards
    import smpl
    import train_rft
    import train_sft

    sft_dir = os.environ.get("RFT_BENCH_SFT", "")
    tmp = tempfile.mkdtemp()
    if not sft_dir:  # a small SFT whose answers follow the template, so there are poses to score
        sft_dir = os.path.join(tmp, "sft")
        train_sft.main(cfg=train_sft.SFTConfig(out_dir=sft_dir, max_steps=60, batch_size=8, lr=3e-3,
                                               retriever_steps=20, save_every=60, pretrain_steps=20))
    cfg = train_rft.RFTConfig(sft_dir=sft_dir, out_dir=os.path.join(tmp, "rft"), eval=False)
    device = torch.device("cpu")
    policy, tokenizer = train_rft.load_policy(cfg, device)
    weights = rewards.parse_weights(cfg.rewards)
    ctx = train_rft.reward_context(cfg, weights, policy, tokenizer, device)
    body = smpl.build_body_model("", device)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=True)  # as train_rft.py
    train_set = data.PoseWorld("train", size=cfg.poseworld_size, seed=cfg.seed, image_size=cfg.image_size,
                               mix=data.parse_task_mix(cfg.task_mix))  # the main job's RFT prompts
    loader = iter(data.make_loader(train_set, cfg.batch_size, seed=1,
                                   collate_fn=data.collate_fn(tokenizer, policy, True)))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        batch = next(loader)
        rows.append(train_rft.hygrpo_step(policy, opt, params, [batch], cfg, ctx, weights, body, tokenizer,
                                          generator, 1))
    rows = rows[1:]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    total = mean("t_sample") + mean("t_score") + mean("t_update")
    n = cfg.batch_size * cfg.G * cfg.pose_samples
    print(f"tiny preset, batch {cfg.batch_size} prompts x G {cfg.G} answers x {cfg.pose_samples} poses = {n} "
          f"candidates a step, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
          f"mean of {steps} steps")
    for k in ("t_sample", "t_score", "t_update"):
        print(f"  {k[2:]:8s} {mean(k):6.3f} s  ({100 * mean(k) / total:4.1f}%)")
    print(f"  step     {total:6.3f} s: {n / total:7.1f} candidates/s, {cfg.batch_size * cfg.G / total:6.1f} answers/s")
    print(f"  peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


@bench("sft")
def bench_sft(steps=20, batch=16):
    """One SFT step of the tiny preset (train_sft.sft_loss, backward, fused AdamW) on a batch of the main
    job's size: its achieved GFLOP/s (forward + backward FLOPs counted by torch.utils.flop_counter) beside
    a plain float32 matmul's on the same machine in the same run, and where the batch's tokens go
    (padding to the longest sample, the conversation template, image tokens on text-only samples). The
    same samples with LLaVA's system line (the paper's template, --system_line=true) are timed in
    alternation with the tiny default, so the two step times compare within one run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import data
    import smpl
    import train_sft
    cfg = train_sft.SFTConfig()
    world = data.PoseWorld("train", size=cfg.poseworld_size, seed=0)
    tok = train_sft.train_tokenizer(cfg, world)
    torch.manual_seed(0)
    policy = train_sft.build_policy(cfg, tok, "cpu")
    body = smpl.build_body_model("", "cpu")
    cfg_line = dataclasses.replace(cfg, system_line=True)  # the paper's template, its own tokenizer and policy
    tok_line = train_sft.train_tokenizer(cfg_line, world)
    policy_line = train_sft.build_policy(cfg_line, tok_line, "cpu")
    opt, opt_line = (torch.optim.AdamW([q for q in p.parameters() if q.requires_grad], lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), fused=True) for p in (policy, policy_line))
    loader = iter(data.make_loader(world, batch, seed=0))  # lists of samples
    samples = [next(loader) for _ in range(steps)]
    batches = [data.collate_fn(tok, policy)(s) for s in samples]  # the tiny template: no system line
    with_line = [data.collate_fn(tok_line, policy_line)(s) for s in samples]

    def step(b, p=policy, o=opt):
        loss, _ = train_sft.sft_loss(p, body, b, cfg)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    def mean_step(bs, p=policy, o=opt):
        t0 = time.perf_counter()
        for b in bs:
            step(b, p, o)
        return (time.perf_counter() - t0) / len(bs)

    with FlopCounterMode(display=False) as counter:
        loss, _ = train_sft.sft_loss(policy, body, batches[0], cfg)
        loss.backward()
    flops = counter.get_total_flops()
    step(batches[0])  # warm-up
    step(with_line[0], policy_line, opt_line)
    times, times_line = [], []
    for _ in range(2):  # alternate, so that a drift of the machine's speed hits both
        times.append(mean_step(batches))
        times_line.append(mean_step(with_line, policy_line, opt_line))
    dt, dt_line = min(times), min(times_line)
    n = 512
    a, w = torch.randn(4 * n, n), torch.randn(n, n)
    mm = timeit(lambda: a @ w, repeat=20, warmup=3)

    def tokens(bs):  # (tokens a row incl. padding, real tokens of all batches)
        return (sum(b["attention_mask"].shape[1] for b in bs) / len(bs),
                sum(b["attention_mask"].sum().item() for b in bs))
    T, real = tokens(batches)
    T_line, _ = tokens(with_line)
    with_image = sum(len(b["image_index"]) for b in batches) / (steps * batch)
    print(f"tiny SFT step, batch {batch}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
          f"best of 2 means of {steps} steps")
    print(f"  step           {1000 * dt:7.1f} ms, {flops / 1e9:6.2f} GFLOP (forward + backward of the first batch)")
    print(f"  achieved       {flops / dt / 1e9:7.2f} GFLOP/s")
    print(f"  plain matmul   {2 * 4 * n * n * n / mm / 1e9:7.2f} GFLOP/s ({4 * n}x{n} @ {n}x{n}, float32)")
    print(f"  ratio          {flops / dt / (2 * 4 * n * n * n / mm):7.3f}")
    print(f"  tokens         {T:.0f} a row on average (the longest sample of its batch), "
          f"{real / (T * batch * steps):.1%} of them real, the rest padding")
    template = len(data.encode_prompt("", False, tok, policy.n_image_tokens, data.prompt_system(policy.config)))
    print(f"  template       {template} tokens of prompt around the question, in every row")
    print(f"  images         {policy.n_image_tokens} tokens a row with an image; {with_image:.0%} of the rows have one")
    print(f"  system line    LLaVA's (--system_line=true, its own tokenizer) on the same samples: "
          f"{1000 * dt_line:.1f} ms a step, {T_line:.0f} tokens a row; without it (tiny) {dt / dt_line:.2f}x the time")
    print(f"  samples/s      {batch / dt:7.1f} tiny, {batch / dt_line:.1f} with the system line (the same "
          f"questions and answers)")


if __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        if name not in BENCHES:
            sys.exit(f"unknown benchmark {name!r}; choose from {sorted(BENCHES)}")
        print(f"== {name}")
        BENCHES[name]()
