#!/usr/bin/env python
"""Benchmark attention modulation: time and peak memory vs plain SDPA and the naive formula.

    python bench/attention.py [--tokens 2048 4096 8192] [--heads 8] [--head-dim 64]
                              [--device cpu|cuda] [--dtype float32|bfloat16|float16]

Variants (forward pass, no autograd, the inference case):
  sdpa          plain F.scaled_dot_product_attention over all tokens: the baseline (ratio 1.00)
  ours          modulated_attention(scale=S), the paper's formula (not renormalised)
  ours_renorm   modulated_attention(scale=S, renormalize=True)
  naive         naive_modulated_attention: materialised N x N softmax and S, fp32 inside
  naive_renorm  the same, renormalised

Tokens: ~80 % group A (text + target image), ~20 % group B (reference), as for a 1024^2
target + 512^2 reference in CogView4 (16 px per token side: VAE /8, patch 2; 4096 + 1024
image tokens + the text).

Time: median (and min) of --repeats runs after --warmup runs, all variants in this process,
taking turns within each repeat (load drift on a shared machine hits all alike).
Peak memory, the extra memory a call needs above its inputs:
  cuda: torch.cuda.max_memory_allocated() minus memory_allocated() before the call (same process).
  cpu:  each (variant, tokens) runs once in a fresh subprocess: the peak resident set size
        during the call (VmHWM from /proc/self/status, reset to the current RSS just before
        the call via /proc/self/clear_refs) minus the RSS just before it, once the inputs
        exist and the variant has run once at a tiny size (so thread pools and kernel set-up
        are in the baseline). ru_maxrss is only the fallback: after fork + exec it starts at
        the parent's peak, so in this script it would read ~0. Counts touched pages, so the
        output tensor is included, for every variant alike.
The naive variants are skipped, with a note, when their estimated peak (two
[B, heads, N, N] fp32 tensors + the [N, N] S) exceeds --max-naive-gb.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dreampainter_core.attention import modulated_attention, naive_modulated_attention  # noqa: E402

VARIANTS = ["sdpa", "ours", "ours_renorm", "naive", "naive_renorm"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PX_PER_TOKEN = 16  # CogView4: VAE downsamples by 8, the transformer patchifies 2 x 2
GIB = 1024**3
MIB = 1024**2


def make_call(variant: str, q, k, v, split: int, scale: float):
    if variant == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if variant in ("ours", "ours_renorm"):
        renorm = variant == "ours_renorm"
        return lambda: modulated_attention(q, k, v, split, scale, renormalize=renorm)
    if variant in ("naive", "naive_renorm"):
        renorm = variant == "naive_renorm"
        return lambda: naive_modulated_attention(q, k, v, split, scale, renormalize=renorm)
    raise ValueError(variant)


def make_inputs(args, n_tokens: int):
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, n_tokens, args.head_dim)
    return [torch.randn(shape, device=args.device, dtype=dtype) for _ in range(3)]


def split_for(n_tokens: int, ref_frac: float) -> int:
    return n_tokens - round(n_tokens * ref_frac)


def naive_estimate_bytes(args, n_tokens: int) -> int:
    itemsize = torch.empty((), dtype=torch.promote_types(DTYPES[args.dtype], torch.float32)).element_size()
    return (2 * args.batch * args.heads + 1) * n_tokens * n_tokens * itemsize


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device: str, warmup: int, repeats: int) -> dict:
    """Median and min seconds per variant. Variants take turns within each repeat, so a
    shared machine's load drifting over time hits them all alike (fairer ratios)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def cuda_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def cpu_peak_bytes_subprocess(args, variant: str, n_tokens: int) -> int:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--_child-mem", variant,
        "--tokens", str(n_tokens), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
        "--batch", str(args.batch), "--dtype", args.dtype, "--scale", str(args.scale),
        "--ref-frac", str(args.ref_frac), "--threads", str(torch.get_num_threads()),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory child for {variant} @ {n_tokens} failed:\n{res.stderr[-2000:]}")
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    if rec["method"] != "VmHWM":
        print(f"  note: {variant} @ {n_tokens}: /proc/self/clear_refs not writable, fell back to "
              "ru_maxrss (may read low if the parent process's peak was higher)")
    return rec["peak_extra_bytes"]


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_measure_memory(args) -> None:
    """Fresh process: how far one call of one variant raises the peak RSS (CPU)."""
    n = args.tokens[0]
    split = split_for(n, args.ref_frac)
    with torch.no_grad():
        # Tiny warm-up of the same code path so one-time set-up is part of the baseline.
        tiny = make_inputs(args, 64)
        make_call(args._child_mem, *tiny, split_for(64, args.ref_frac), args.scale)()
        del tiny
        q, k, v = make_inputs(args, n)
        fn = make_call(args._child_mem, q, k, v, split, args.scale)
        if _reset_peak_rss():
            # Not ru_maxrss alone: after fork + exec it starts at the *parent's* peak RSS
            # (Linux carries the old mm's high-water mark over exec), hiding the child's peak.
            method = "VmHWM"
            before = _read_status_kib("VmRSS")
            out = fn()
            after = _read_status_kib("VmHWM")
        else:
            method = "ru_maxrss"
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = fn()
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    print(json.dumps({"peak_extra_bytes": (after - before) * 1024, "method": method}))  # KiB -> bytes


def fmt_time(sec: float) -> str:
    return f"{sec * 1e3:9.1f}"


def fmt_mem(b: float) -> str:
    return f"{b / MIB:10.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--scale", type=float, default=0.5, help="attention modulation scale (default 0.5)")
    ap.add_argument("--ref-frac", type=float, default=0.2, help="share of tokens in group B (reference)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-naive-gb", type=float, default=8.0, help="skip naive above this estimated peak")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="time only")
    ap.add_argument("--_child-mem", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child_mem:
        child_measure_memory(args)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch.cuda.is_available() is False")

    on_cuda = args.device.startswith("cuda")
    dev_name = torch.cuda.get_device_name(args.device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    mem_method = (
        "torch.cuda.max_memory_allocated - allocated before (same process)"
        if on_cuda
        else "peak RSS (VmHWM, reset before the call) minus RSS with inputs, fresh subprocess per cell"
    )
    print(f"torch {torch.__version__} | device {args.device} ({dev_name}) | dtype {args.dtype}")
    print(
        f"B={args.batch} heads={args.heads} head_dim={args.head_dim} | modulation scale={args.scale} | "
        f"time: median (min) of {args.repeats} interleaved runs after {args.warmup} warm-up, forward, no grad"
    )
    print(f"peak memory: {mem_method}")
    print("ratios: vs plain SDPA over all tokens (no modulation) at the same token count")
    print(
        f"resolution: {PX_PER_TOKEN} px per token side (CogView4: VAE /8, patch 2); a 1024^2 target + "
        f"512^2 reference is 4096 + 1024 image tokens + the text, ~{1 - args.ref_frac:.0%} / {args.ref_frac:.0%}\n"
    )

    for n in args.tokens:
        split = split_for(n, args.ref_frac)
        n_ref = n - split
        print(
            f"N = {n} tokens: group A (text+target) {split}, group B (reference) {n_ref} | "
            f"as images: A ~{PX_PER_TOKEN * math.sqrt(split):.0f}^2 px (text ignored), "
            f"B ~{PX_PER_TOKEN * math.sqrt(n_ref):.0f}^2 px"
        )
        q, k, v = make_inputs(args, n)
        rows, fns = {}, {}
        for variant in VARIANTS:
            if variant.startswith("naive"):
                est = naive_estimate_bytes(args, n)
                if est > args.max_naive_gb * GIB:
                    rows[variant] = f"skipped: estimated peak {est / GIB:.1f} GiB > --max-naive-gb {args.max_naive_gb:g}"
                    continue
            fns[variant] = make_call(variant, q, k, v, split, args.scale)
        with torch.no_grad():
            timings = time_interleaved(fns, args.device, args.warmup, args.repeats)
            for variant, fn in fns.items():
                if args.no_memory:
                    peak = float("nan")
                elif on_cuda:
                    peak = cuda_peak_bytes(fn)
                else:
                    peak = cpu_peak_bytes_subprocess(args, variant, n)
                rows[variant] = (*timings[variant], peak)
        del q, k, v

        base_t, base_best, base_m = rows["sdpa"]
        print(
            f"  {'variant':<13}{'median ms':>10}{'x SDPA':>8}{'min ms':>10}{'x SDPA':>8}"
            f"{'peak MiB':>11}{'x SDPA':>8}"
        )
        for variant in VARIANTS:
            r = rows[variant]
            if isinstance(r, str):
                print(f"  {variant:<13}{r}")
                continue
            med, best, peak = r
            m_ratio = peak / base_m if base_m > 0 else float("nan")
            print(
                f"  {variant:<13}{fmt_time(med)}{med / base_t:8.2f} {fmt_time(best)}{best / base_best:8.2f}"
                f"{fmt_mem(peak)}{m_ratio:8.2f}"
            )
        est = naive_estimate_bytes(args, n)
        print(f"  (naive estimated peak: {est / MIB:.0f} MiB)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
