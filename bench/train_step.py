#!/usr/bin/env python
"""Benchmark one DreamPainter training step: time and peak memory, stage 1 and 2, per memory option.

    python bench/train_step.py                                   # tiny model, CPU, 64 px
    python bench/train_step.py --preset full --device cuda --size 1024 --ref-size 512 --dtype bf16
    python bench/train_step.py --preset full --device cuda --optimizers adamw adamw8bit

What one step is: the trainer's own TrainingModule forward (flow-matching loss, train/flow.py,
exactly as train/trainer.py builds it) on a batch of cached conditioning (random latents,
text embeddings and [Z_f, Z_m]; the encoders are not part of a step when the cache is on),
backward, gradient clipping and the optimizer step. Stage 1 trains the control branch (base
frozen); stage 2 trains LoRA (rank --lora-rank on all block linears; base and branch frozen)
with a reference of --ref-size pixels in every sample (the costlier half of the 50/50 mix).

Presets: ``tiny`` = train.tiny's 4-block model (random weights); ``full`` =
CogView4-6B's transformer config (28 blocks, 4096 wide) with random weights, built directly
on the device (nothing is downloaded or read). Frozen weights are stored in --dtype; trained
parameters, gradients and AdamW state in fp32; with --dtype bf16 the step runs under bf16
autocast (as train.mixed_precision=bf16).

Time: median of --steps steps after --warmup steps. Memory:
  cuda: torch.cuda.max_memory_allocated() during the step (everything: weights, optimizer
        state, activations), and the static part (allocated before the step, after warmup).
  cpu:  the static part = bytes of parameters + gradients + optimizer state; the step's
        transient peak = the largest running sum of tensor allocations minus frees during one
        step, from the PyTorch profiler (each op's self_cpu_memory_usage and the free events,
        in time order; allocator level, no Python/library overhead; the gradients, freed by
        zero_grad at the start of the step, are re-allocated inside it and so count in both
        parts); total = static + transient.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreampainter_core.transformer import DreamPainterConfig, DreamPainterTransformer  # noqa: E402
from train import flow  # noqa: E402
from train.distributed import clip_grad_norm  # noqa: E402
from train.trainer import TrainingModule  # noqa: E402

FULL_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=28, attention_head_dim=128, num_attention_heads=32,
    text_embed_dim=4096, time_embed_dim=512, condition_dim=256, pos_embed_max_size=128, sample_size=128,
    rope_axes_dim=(256, 256),
)


def build_base(preset: str, device, dtype):
    from diffusers import CogView4Transformer2DModel

    if preset == "tiny":
        from train.tiny import build_tiny_components

        base = build_tiny_components(0)["transformer"]
        return base.to(device=device, dtype=dtype)
    with torch.device("meta"):
        base = CogView4Transformer2DModel(**FULL_CONFIG)
    base = base.to_empty(device=device).to(dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        for b in base.buffers():
            b.zero_()
    base.requires_grad_(False)
    return base


def make_model(preset, stage, device, dtype, control_blocks, lora_rank, checkpointing):
    base = build_base(preset, device, dtype)
    torch.manual_seed(0)
    n_blocks = base.config.num_layers
    cfg = DreamPainterConfig(control_blocks=min(control_blocks, n_blocks), lora_rank=0)
    model = DreamPainterTransformer(base, cfg)
    model.requires_grad_(False)
    if stage == 1:
        model.control.float().requires_grad_(True)
    else:
        with torch.no_grad():
            for gate in model.control.gates:  # a trained-looking branch: non-zero gates
                gate.weight.normal_(0, 0.01)
        model.config.lora_rank, model.config.lora_alpha = lora_rank, float(lora_rank)
        model.add_lora()
        for n, p in model.base.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
                p.requires_grad_(True)
    model.gradient_checkpointing = checkpointing
    model.train()
    return model


def make_batch(model, batch, size, ref_size, text_len, stage, device, scheduler):
    g = torch.Generator().manual_seed(1)
    h = w = size // 8
    x0 = torch.randn(batch, 16, h, w, generator=g)
    noise = torch.randn(batch, 16, h, w, generator=g)
    control = torch.cat([torch.randn(batch, 16, h, w, generator=g), (torch.rand(batch, 1, h, w, generator=g) > 0.5).float()], 1)
    seq = h * w // 4
    s = torch.full((batch,), 0.6)
    sigma = flow.shift_sigma(scheduler, s, flow.mu_for(scheduler, seq))
    x_t, target = flow.flow_pair(x0, noise, sigma)
    dtype = model.dtype
    text = torch.randn(batch, text_len, model.base.config.text_embed_dim, generator=g)
    ref = None
    if stage == 2:
        ref = torch.randn(batch, 16, ref_size // 8, ref_size // 8, generator=g).to(device)
    size_t = torch.tensor([[size, size]], dtype=dtype, device=device).repeat(batch, 1)
    return [{
        "x_t": x_t.to(device=device, dtype=dtype), "text": text.to(device=device, dtype=dtype),
        "timestep": (s * 1000).to(device), "size": size_t, "crop": torch.zeros_like(size_t),
        "control": control.to(device), "reference": ref, "target": target.to(device),
    }]


def make_optimizer(params, name):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def optimizer_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def cpu_transient_peak(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op's own (exclusive) allocations minus frees, and the "[memory]" free events, in time order.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def run_case(args, stage, checkpointing, optim_name, device):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dreampainter_core.loading import COGVIEW4_SCHEDULER_CONFIG

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = make_model(args.preset, stage, device, dtype, args.control_blocks, args.lora_rank, checkpointing)
    module = TrainingModule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim_name)
    groups = make_batch(model, args.batch, args.size, args.ref_size, args.text_len, stage, device,
                        FlowMatchEulerDiscreteScheduler(**COGVIEW4_SCHEDULER_CONFIG))
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
                else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            per = module(groups)
        per.mean().backward()
        clip_grad_norm(params, 1.0)
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    n_train = sum(p.numel() for p in params)
    if device.type == "cuda":
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated()
        transient = peak - static
    else:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        grads = sum(p.numel() * p.element_size() for p in params)  # fp32, same layout as the params
        static = weights + grads + optimizer_bytes(opt)
        transient = cpu_transient_peak(step)
        peak = static + transient
    del model, module, opt, groups
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"stage": stage, "ckpt": checkpointing, "optim": optim_name, "trainable": n_train,
            "median_s": statistics.median(times), "min_s": min(times), "static": static, "transient": transient, "peak": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="frozen weights; default fp32 tiny / bf16 full")
    p.add_argument("--size", type=int, default=None, help="target side in px; default 64 tiny / 1024 full")
    p.add_argument("--ref-size", type=int, default=None, help="reference side in px (stage 2); default 32 tiny / 512 full")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=None, help="text tokens; default 16 tiny / 128 full")
    p.add_argument("--control-blocks", type=int, default=None, help="default 2 tiny / 6 full")
    p.add_argument("--lora-rank", type=int, default=None, help="default 4 tiny / 256 full")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    p.add_argument("--optimizers", nargs="+", default=["adamw"], choices=("adamw", "adamw8bit"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    tiny = a.preset == "tiny"
    a.dtype = a.dtype or ("fp32" if tiny else "bf16")
    a.size = a.size or (64 if tiny else 1024)
    a.ref_size = a.ref_size or (32 if tiny else 512)
    a.text_len = a.text_len or (16 if tiny else 128)
    a.control_blocks = a.control_blocks or (2 if tiny else 6)
    a.lora_rank = a.lora_rank or (4 if tiny else 256)
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device = torch.device(a.device)
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    print(f"# preset={a.preset} device={device} dtype={a.dtype} size={a.size} ref={a.ref_size} batch={a.batch} "
          f"text={a.text_len} control_blocks={a.control_blocks} lora_rank={a.lora_rank} threads={torch.get_num_threads()}"
          + (f" gpu={torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    header = f"{'stage':>5} {'ckpt':>4} {'optim':>9} {'trainable':>13} {'step s (med)':>12} {'min s':>8} " \
             f"{'static MiB':>11} {'transient MiB':>13} {'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    mib = 2**20
    for stage in a.stages:
        for ck in ckpts:
            for opt in a.optimizers:
                try:
                    r = run_case(a, stage, ck, opt, device)
                except (ImportError, torch.cuda.OutOfMemoryError) as e:
                    print(f"{stage:>5} {('on' if ck else 'off'):>4} {opt:>9}  skipped: {type(e).__name__}: {str(e)[:80]}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                print(f"{r['stage']:>5} {('on' if r['ckpt'] else 'off'):>4} {r['optim']:>9} {r['trainable']:>13,} "
                      f"{r['median_s']:>12.4f} {r['min_s']:>8.4f} {r['static'] / mib:>11.1f} {r['transient'] / mib:>13.1f} "
                      f"{r['peak'] / mib:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
