"""GPU check, for the day a GPU is lent (not collected by pytest, never run by CI). Three parts, each one
summary line, then a compact table (also written to $OUT/gpu_check.md when $OUT is set):

  tiny  the main job in bfloat16 with fewer steps (`train_rft.py --dtype=bfloat16`, SFT trained first):
        wall time, the GPU memory nvidia-smi saw, the before/after table (results.md);
  7b    a llava-1.5-7b-shaped policy with random weights (LLaMA-7B width, CLIP ViT-L/14-336 and HMR2.0's
        ViT-H at full depth, the LLM cut to a few layers) in bfloat16 with activation checkpointing and
        LoRA: a few SFT steps (train_sft.sft_loss) and HyGRPO steps (train_rft.hygrpo_step, the paper's
        settings), at two LLM depths; step time and peak memory extrapolated to 32 layers, beside the
        estimate for the 7B in docs/experiments.md;
  ddp   `torchrun --standalone --nproc_per_node=1 train_rft.py --max_steps=2` on the GPU, and one NCCL
        all_reduce (torchrun with one process makes no process group: model.setup_distributed starts
        one, NCCL on GPU, only for 2 or more processes).

The whole check is sized for about 5 minutes on one H100. Run it with the device tool:
    PYTHONUNBUFFERED=1 python tests/gpu_check.py --parts=tiny,7b,ddp
    python tests/gpu_check.py --parts=7b --steps=5      # one part; more timed steps
On a machine without CUDA it says so and exits 0. `python tests/gpu_check.py --dry_cpu` runs part 7b on
the CPU with tiny widths for 1 step, to check the script itself (a minute with OMP_NUM_THREADS=1).

Random weights: the sampled answers are 24 random tokens that seldom hold <POSE>, so every answer differs
(docs/experiments.md's "U = 128" rows) and the pose terms are mostly empty; the timings are the shapes', not a real
run's. The prompts come from PoseWorld tokenised by its own small BPE (llava-hf's tokenizer cannot be
downloaded here), so the text is shorter than Llama's tokenizer would make it; the 768 image tokens of an
image prompt are the same.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402
import rewards  # noqa: E402
import smpl  # noqa: E402
import train_rft  # noqa: E402
import train_sft  # noqa: E402

GiB = 2 ** 30
# HyGRPO with the paper's settings, as in train_rft.py's docstring command (one GPU takes all 16 prompts)
PAPER_RFT = dict(preset="llava-1.5-7b", G=8, pose_samples=1, max_new_tokens=24, lr=1e-6, beta=0.04, beta_i2p=0.04,
                 gradient_at_mean=0.0, pose_kl="k3", inner_epochs=1, temperature=1.0, top_p=1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="tiny,7b,ddp",
                   help="comma-separated: tiny, 7b, ddp (run as tiny, ddp, 7b: ddp reuses tiny's SFT model)")
    p.add_argument("--steps", type=int, default=3, help="7b: SFT and RFT steps per depth; the first is warm-up")
    p.add_argument("--llm_layers", default="2,4", help="7b: the two LLM depths the 32-layer figures come from")
    p.add_argument("--sft_batch", type=int, default=10, help="7b: SFT samples a step (the 7B command's per GPU)")
    p.add_argument("--rft_batch", type=int, default=16, help="7b: RFT prompts a step (the one-GPU estimate in docs/experiments.md)")
    p.add_argument("--tiny_sft_steps", type=int, default=600, help="tiny: SFT max_steps (the main job's: 2400)")
    p.add_argument("--tiny_rft_steps", type=int, default=100, help="tiny: RFT max_steps (the main job's: 300)")
    p.add_argument("--tiny_timeout", type=int, default=240, help="tiny: seconds before the run is stopped")
    p.add_argument("--ddp_timeout", type=int, default=150, help="ddp: seconds before the run is stopped")
    p.add_argument("--work_dir", default="", help="where runs write; empty = a new temporary folder")
    p.add_argument("--dry_cpu", action="store_true", help="part 7b only, on the CPU, tiny widths, 1 step")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Part tiny: the main job in bfloat16


def gpu_memory_used_mib():
    """Memory in use on GPU 0 by every process, as nvidia-smi reports it (MiB), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.split()[0])
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        return None


def run_logged(cmd, log_path, timeout):
    """Run cmd in the repo root with its output in log_path, sampling nvidia-smi twice a second.
    Returns (exit code or None on timeout, seconds, peak MiB above the memory in use before it started)."""
    base = gpu_memory_used_mib()
    peak = base
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None and time.time() - t0 < timeout:
            used = gpu_memory_used_mib()
            if used is not None and peak is not None:
                peak = max(peak, used)
            time.sleep(0.5)
        timed_out = proc.poll() is None
        if timed_out:
            proc.kill()
        code = None if timed_out else proc.wait()
    seconds = time.time() - t0
    return code, seconds, (None if base is None else peak - base)


def log_tail(path, n=25):
    """The last n lines of a log, tqdm's carriage-return updates folded to their last state."""
    lines = [line.rsplit("\r", 1)[-1] for line in open(path, errors="replace").read().splitlines()]
    return "\n".join(lines[-n:])


def step_seconds(metrics_path, keys):
    """Mean over the rows of metrics.jsonl (the first left out: warm-up) of the sum of `keys`, or NaN."""
    if not os.path.exists(metrics_path):
        return float("nan")
    rows = [json.loads(line) for line in open(metrics_path)][1:]
    return sum(sum(r.get(k, 0.0) for k in keys) for r in rows) / len(rows) if rows else float("nan")


def part_tiny(args, work, logs):
    """The main job with fewer steps: SFT (tokenizer, retrievers, pose-ViT pretraining, SFT), the
    evaluation before, RFT, the evaluation after and the before/after table."""
    sft_dir, rft_dir = os.path.join(work, "tiny-sft"), os.path.join(work, "tiny-rft")
    cmd = [sys.executable, "train_rft.py", "--dtype=bfloat16", f"--sft_dir={sft_dir}", f"--out_dir={rft_dir}",
           f"--sft_overrides=max_steps={args.tiny_sft_steps}", f"--max_steps={args.tiny_rft_steps}"]
    print(" ".join(cmd[1:]), flush=True)
    log = os.path.join(logs, "tiny.log")
    code, seconds, peak_mib = run_logged(cmd, log, args.tiny_timeout)
    results = os.path.join(rft_dir, "results.md")
    if code != 0 or not os.path.exists(results):
        print(log_tail(log))
        why = "timed out" if code is None else f"exit {code}"
        return {"ok": False, "seconds": seconds, "line": f"tiny: FAILED ({why} after {seconds:.0f} s); log {log}"}
    table = open(results).read()
    print(table)
    with open(os.path.join(logs, "tiny_results.md"), "w") as f:  # beside the log, in $OUT when set
        f.write(table)
    sft_step = step_seconds(os.path.join(sft_dir, "metrics.jsonl"), ["dt"])
    rft_step = step_seconds(os.path.join(rft_dir, "metrics.jsonl"), ["t_sample", "t_score", "t_update"])
    peak = "n/a" if peak_mib is None else f"{peak_mib / 1024:.2f} GiB"
    line = (f"tiny: OK in {seconds:.0f} s ({args.tiny_sft_steps} SFT + {args.tiny_rft_steps} RFT steps, bf16): "
            f"SFT {1000 * sft_step:.0f} ms a step, RFT {rft_step:.2f} s a step, peak GPU memory {peak} (nvidia-smi)")
    return {"ok": True, "seconds": seconds, "line": line, "sft_dir": sft_dir}


# ----------------------------------------------------------------------------------------------------
# Part 7b: a llava-1.5-7b-shaped policy with random weights and a few LLM layers


def shaped_config(tokenizer, llm_layers, small=False):
    """The llava-1.5-7b preset's config (LLaVA-1.5-7B's LLaMA and CLIP ViT-L/14-336, HMR2.0's ViT-H) with
    the LLM cut to llm_layers layers and the token ids of `tokenizer` (the vocabulary keeps its 32064
    rows). small=True (--dry_cpu) shrinks every width and both encoders."""
    base = M.LlavaConfig.from_dict(M.LLAVA_15_7B_CONFIG)
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    text = dataclasses.replace(base.text_config, num_hidden_layers=llm_layers, **ids)
    vision, pose_vit = base.vision_config, M.PoseViTConfig()
    if small:
        text = dataclasses.replace(text, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=16)
        vision = M.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=56, patch_size=14)
        pose_vit = M.PoseViTConfig(image_size=(64, 48), hidden_size=64, num_hidden_layers=2, num_attention_heads=1)
    llava = dataclasses.replace(base, text_config=text, vision_config=vision,
                                image_token_index=tokenizer.token_to_id(M.IMAGE_TOKEN), pad_token_id=tokenizer.pad_id)
    return M.PoseLLaVAConfig(preset="llava-1.5-7b", llava=llava, pose_vit=pose_vit,
                             pose_token_id=tokenizer.token_to_id(M.POSE_TOKEN), head_hidden=64 if small else 1024)


def build_shaped(config, device, dtype):
    """PoseLLaVA as model.build_pose_llava builds the 7B from files: the base (LLaVA, f_b) in `dtype`, the
    new parts and LoRA in float32; here the base has random weights (N(0, 0.02), Llava's init)."""
    with torch.device(device):
        llava = M.Llava(config.llava).to(dtype)
        f_b = M.PoseViT(config.pose_vit).to(dtype)
        return M.PoseLLaVA(config, llava=llava, pose_encoder=f_b)


def rft_config(small):
    """train_rft.RFTConfig with PAPER_RFT set (fields another version lacks are skipped, with a note)."""
    cfg = train_rft.RFTConfig()
    for key, value in PAPER_RFT.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
        else:
            print(f"  (RFTConfig has no {key!r}: left at this version's default)")
    if small:
        cfg.G, cfg.max_new_tokens = 2, 8
    return cfg


class Meter:
    """Seconds a step (mean after the first, the warm-up) and peak memory of one phase."""

    def __init__(self, device):
        self.device, self.times = device, []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def time(self, fn):
        t0 = time.time()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.time() - t0)
        return out

    @property
    def step_s(self):
        timed = self.times[1:] or self.times
        return sum(timed) / len(timed)

    @property
    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / GiB if self.device.type == "cuda" else float("nan")


def allocated_gib(device):
    return torch.cuda.memory_allocated() / GiB if device.type == "cuda" else float("nan")


def measure_depth(llm_layers, args, device, small):
    """SFT then RFT steps of one shaped policy; returns its figures (seconds a step, GiB)."""
    gc.collect()  # the last depth's policy is gone before this one is built
    torch.manual_seed(0)
    world = data.PoseWorld("train", size=max(64, args.steps * max(args.sft_batch, args.rft_batch)), seed=0,
                           cache_dir=None)
    tokenizer = M.Tokenizer.train_bpe(train_sft.poseworld_texts(world), 1024)
    policy = build_shaped(shaped_config(tokenizer, llm_layers, small), device, torch.bfloat16)
    policy.llava.language_model.model.gradient_checkpointing = True  # --activation_checkpointing=true
    body_model = smpl.build_body_model("", device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    fig = {"layers": llm_layers, "params_m": sum(p.numel() for p in policy.parameters()) / 1e6,
           "weights_gib": allocated_gib(device)}

    # SFT (train_sft.main's step): LoRA, W_a, W_b, the pose head, the <POSE> rows train
    sft_cfg = train_sft.SFTConfig(preset="llava-1.5-7b")
    params = [p for p in policy.parameters() if p.requires_grad]
    fig["trained_m"] = sum(p.numel() for p in params) / 1e6
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), fused=True)
    collate = data.collate_fn(tokenizer, policy)
    meter = Meter(device)
    policy.train()
    for step in range(args.steps):
        batch = data.to_device(collate([world[(step * args.sft_batch + i) % world.size]
                                        for i in range(args.sft_batch)]), device)

        def sft_step():
            with autocast:
                loss, _ = train_sft.sft_loss(policy, body_model, batch, sft_cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
            M.check_finite_update(loss.item(), grad_norm, sft_cfg, step)
            opt.step()
        meter.time(sft_step)
    fig["sft_s"], fig["sft_peak_gib"] = meter.step_s, meter.peak_gib
    del opt
    policy.zero_grad(set_to_none=True)

    # RFT (train_rft.main's setup and step): pi_ref = a frozen copy of the trained tensors
    cfg = rft_config(small)
    cfg.out_dir = os.path.join(args.work_dir, "7b-rft")  # named in check_finite_update's message only
    policy.set_trainable("rft")
    policy.freeze_reference()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=True)
    retriever = rewards.PoseTextRetriever(rewards.RetrieverConfig(
        vocab_size=tokenizer.vocab_size, tokenizer_fingerprint=rewards.tokenizer_fingerprint(tokenizer)),
        tokenizer).to(device).eval()  # untrained: the semantic reward's cost, not its values
    embedder = rewards.MeanPoolEmbedder(M.reference_hidden_states(policy), tokenizer, device=device)
    ctx = rewards.RewardContext(retriever=retriever, embedder=embedder)
    weights = rewards.parse_weights(cfg.rewards)
    generator = torch.Generator(device=device).manual_seed(0)
    collate = data.collate_fn(tokenizer, policy, True)
    meter, parts = Meter(device), []
    for step in range(args.steps):
        samples = [world[(step * args.rft_batch + i) % world.size] for i in range(args.rft_batch)]
        batch = data.to_device(collate(samples), device)

        def rft_step():
            with autocast:
                return train_rft.hygrpo_step(policy, opt, params, [batch], cfg, ctx, weights, body_model, tokenizer,
                                             generator, 1)
        parts.append(meter.time(rft_step))
    fig["rft_s"], fig["rft_peak_gib"] = meter.step_s, meter.peak_gib
    timed = parts[1:] or parts
    for key in ("t_sample", "t_score", "t_update"):
        fig[key] = sum(m[key] for m in timed) / len(timed)
    fig["G"] = cfg.G
    fig["image_prompts"] = f"{sum(s['image'] is not None for s in samples)}/{len(samples)}"
    opt.zero_grad(set_to_none=True)
    fig["resident_gib"] = allocated_gib(device)  # weights, pi_ref's copy, AdamW's moments
    del policy, opt, ctx, embedder, params, parts, batch
    return fig


def extrapolate(a, b, key, layers=32):
    """The straight line through depths a and b, read at `layers`: each LLM layer adds the same."""
    slope = (b[key] - a[key]) / (b["layers"] - a["layers"])
    return a[key] + slope * (layers - a["layers"])


def readme_estimate_rows():
    """The rows of the llava-1.5-7b RFT estimate (weights, peak, compute a step) as docs/experiments.md
    writes them (the README quotes its summary)."""
    want = ("| weights, trained tensors", "| update, U = 128", "| peak", "| compute a step")
    with open(os.path.join(ROOT, "docs", "experiments.md"), encoding="utf-8") as f:
        return [line.rstrip() for line in f if line.startswith(want)]


def part_7b(args, device, small=False):
    depths = [int(x) for x in args.llm_layers.split(",")]
    if len(depths) != 2 or depths[0] >= depths[1]:
        raise SystemExit(f"--llm_layers={args.llm_layers!r}: give two depths, the smaller first")
    t0 = time.time()
    figs = []
    for layers in depths:
        fig = measure_depth(layers, args, device, small)
        figs.append(fig)
        print(f"  LLM {layers} layers: {fig['params_m']:.0f}M parameters ({fig['trained_m']:.1f}M trained), weights "
              f"{fig['weights_gib']:.2f} GiB; SFT {fig['sft_s']:.3f} s a step, peak {fig['sft_peak_gib']:.2f} GiB; "
              f"RFT {fig['rft_s']:.3f} s a step (sample {fig['t_sample']:.3f}, score {fig['t_score']:.3f}, update "
              f"{fig['t_update']:.3f}), peak {fig['rft_peak_gib']:.2f} GiB, resident {fig['resident_gib']:.2f} GiB; "
              f"{fig['image_prompts']} prompts with an image", flush=True)
    a, b = figs
    preset = ""
    if not small:  # the same shapes as the preset itself, built weightless
        n = sum(p.numel() for p in M.PoseLLaVA.from_preset("llava-1.5-7b", device="meta").parameters())
        preset = f" (the llava-1.5-7b preset on `meta`: {n / 1e6:.0f}M)"
    at32 = {k: extrapolate(a, b, k) for k in ("params_m", "sft_s", "sft_peak_gib", "rft_s", "rft_peak_gib",
                                              "resident_gib", "t_sample", "t_score", "t_update")}
    print(f"  extrapolated to 32 LLM layers: {at32['params_m']:.0f}M parameters{preset}; SFT ({args.sft_batch} "
          f"samples) {at32['sft_s']:.2f} s a step, peak {at32['sft_peak_gib']:.1f} GiB; RFT ({args.rft_batch} prompts "
          f"x {fig['G']} answers) {at32['rft_s']:.2f} s a step (sample {at32['t_sample']:.2f}, score "
          f"{at32['t_score']:.2f}, update {at32['t_update']:.2f}), peak {at32['rft_peak_gib']:.1f} GiB, "
          f"resident {at32['resident_gib']:.1f} GiB")
    print("  docs/experiments.md's estimate for the 7B (one 80 GB GPU, 16 prompts | eight GPUs, 2 prompts each):")
    for row in readme_estimate_rows() or ["  (not found in docs/experiments.md)"]:
        print("    " + row)
    line = (f"7b: OK in {time.time() - t0:.0f} s (LLM {depths[0]} and {depths[1]} layers, {args.steps} steps each"
            f"{', CPU dry run' if small else ''}): at 32 layers SFT {at32['sft_s']:.2f} s / "
            f"{at32['sft_peak_gib']:.1f} GiB, RFT {at32['rft_s']:.2f} s / {at32['rft_peak_gib']:.1f} GiB "
            f"(docs/experiments.md's estimate is printed above)")
    return {"ok": all(math.isfinite(v) for v in (at32["sft_s"], at32["rft_s"])), "seconds": time.time() - t0,
            "line": line}


# ----------------------------------------------------------------------------------------------------
# Part ddp: torchrun and NCCL


def nccl_all_reduce(work):
    """One NCCL all_reduce in a process group of one, in this process: NCCL loads and runs on this GPU."""
    import torch.distributed as dist
    dist.init_process_group("nccl", init_method=f"file://{os.path.join(work, 'nccl_store')}", rank=0, world_size=1)
    try:
        x = torch.arange(4, dtype=torch.float32, device="cuda")  # (4,)
        dist.all_reduce(x)
        torch.cuda.synchronize()
        version = torch.cuda.nccl.version()  # (major, minor, patch); an int in older torch
        version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        return torch.equal(x.cpu(), torch.arange(4, dtype=torch.float32)), version
    finally:
        dist.destroy_process_group()


def part_ddp(args, work, logs, sft_dir=None):
    """train_rft.py under torchrun, one process, 2 RFT steps in bf16, from part tiny's SFT model when it
    ran (else a short tiny SFT first)."""
    t0 = time.time()
    out = os.path.join(work, "ddp-rft")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train_rft.py",
           "--max_steps=2", "--dtype=bfloat16", f"--out_dir={out}"]
    if sft_dir:
        cmd.append(f"--sft_dir={sft_dir}")
    else:
        cmd += [f"--sft_dir={os.path.join(work, 'ddp-sft')}",
                "--sft_overrides=max_steps=50;pretrain_steps=50;retriever_steps=20;retriever_pairs=2000"]
    print("torchrun " + " ".join(cmd[3:]), flush=True)
    log = os.path.join(logs, "ddp.log")
    code, seconds, _ = run_logged(cmd, log, args.ddp_timeout)
    path = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    ran = code == 0 and len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if not ran:
        print(log_tail(log))
    same, version = nccl_all_reduce(work)
    line = (f"ddp: {'OK' if ran and same else 'FAILED'} in {time.time() - t0:.0f} s: torchrun (1 process) "
            f"{'exit 0, 2 finite steps' if ran else f'exit {code}, {len(rows)} steps; log {log}'}; "
            f"NCCL {version} all_reduce {'ok' if same else 'WRONG'}")
    return {"ok": ran and same, "seconds": time.time() - t0, "line": line}


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.dry_cpu:
        args.parts, args.steps, args.sft_batch, args.rft_batch, args.llm_layers = "7b", 1, 4, 2, "1,2"
    elif not torch.cuda.is_available():
        print("gpu_check.py needs CUDA (torch.cuda.is_available() is False): nothing run. "
              "On a CPU, --dry_cpu checks part 7b at tiny widths.")
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"tiny", "7b", "ddp"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from tiny, 7b, ddp")
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    logs = os.environ.get("OUT") or args.work_dir
    os.makedirs(logs, exist_ok=True)
    device = torch.device("cpu" if args.dry_cpu else "cuda")
    where = "CPU (dry run)" if args.dry_cpu else torch.cuda.get_device_name(0)
    print(f"gpu_check on {where}, torch {torch.__version__}; runs in {args.work_dir}", flush=True)

    results, sft_dir = {}, None
    for name in ("tiny", "ddp", "7b"):  # ddp reuses tiny's SFT model
        if name not in parts:
            continue
        print(f"\n== {name}", flush=True)
        try:
            if name == "tiny":
                results[name] = part_tiny(args, args.work_dir, logs)
                sft_dir = results[name].get("sft_dir")
            elif name == "ddp":
                results[name] = part_ddp(args, args.work_dir, logs, sft_dir)
            else:
                results[name] = part_7b(args, device, small=args.dry_cpu)
        except (Exception, SystemExit) as e:  # one part's failure must not hide the others' results
            results[name] = {"ok": False, "seconds": float("nan"), "line": f"{name}: FAILED: {type(e).__name__}: {e}"}
        print(results[name]["line"], flush=True)

    table = [f"# gpu_check on {where}, torch {torch.__version__}", "", "| part | ok | seconds | summary |",
             "| --- | --- | --- | --- |"]
    table += [f"| {n} | {'yes' if r['ok'] else 'NO'} | {r['seconds']:.0f} | {r['line'].split(': ', 1)[1]} |"
              for n, r in results.items()]
    print("\n" + "\n".join(table))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.md"), "w") as f:
            f.write("\n".join(table) + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
