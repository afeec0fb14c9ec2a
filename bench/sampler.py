"""Per-step cost of DreamPainterPipeline vs diffusers' CogView4Pipeline on one medium random model.

    python bench/sampler.py [--layers 8] [--heads 8] [--head-dim 64] [--size 512] [--control-blocks 2]
                            [--reference-size 256] [--device cpu|cuda] [--dtype fp32|bf16] [--repeats 3]

Both pipelines share the same transformer weights, tiny text encoder and tiny VAE. One
denoising step (CFG: two transformer calls + the Euler update) is measured as the time
difference between runs with ``--steps-long`` and ``--steps-short`` steps divided by the
step difference, so prompt encoding, VAE work and setup cancel out. Median of repeats.

Goal (issue 2): without a reference, our step costs at most the control branch's share of
the blocks (control_blocks / layers) plus 5% over the stock pipeline's step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import CogView4Pipeline, CogView4Transformer2DModel  # noqa: E402

from dreampainter_core.pipeline import SMALL_MODEL_SIZES, DreamPainterPipeline  # noqa: E402
from dreampainter_core.tiny import build_tiny_components  # noqa: E402
from dreampainter_core.transformer import DreamPainterConfig, DreamPainterTransformer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run, steps, device):
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    return time.perf_counter() - start


def per_step_seconds(variants, steps_short, steps_long, repeats, device):
    """Median per-step time of each variant. Variants take turns within every repeat, so
    a change in machine load hits all of them alike (this machine may be shared)."""
    for _, run in variants:
        run(1)  # warm-up
    samples = {name: [] for name, _ in variants}
    for _ in range(repeats):
        for name, run in variants:
            short = timed(run, steps_short, device)
            long = timed(run, steps_long, device)
            samples[name].append((long - short) / (steps_long - steps_short))
    return [(name, statistics.median(samples[name])) for name, _ in variants]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--control-blocks", type=int, default=2)
    parser.add_argument("--reference-size", type=int, default=256)
    parser.add_argument("--steps-short", type=int, default=1)
    parser.add_argument("--steps-long", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives steadier ratios on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    parts = build_tiny_components(seed=0)
    text_dim = parts["text_encoder"].config.hidden_size
    torch.manual_seed(0)
    base = CogView4Transformer2DModel(
        num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        text_embed_dim=text_dim, time_embed_dim=512, condition_dim=256,
    ).eval()
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)
    base.to(device=device, dtype=dtype)
    vae = parts["vae"].to(device=device, dtype=dtype)
    text_encoder = parts["text_encoder"].to(device=device, dtype=dtype)

    stock = CogView4Pipeline(parts["tokenizer"], text_encoder, vae, base, parts["scheduler"])
    stock.set_progress_bar_config(disable=True)
    plain = DreamPainterPipeline(parts["tokenizer"], text_encoder, vae, DreamPainterTransformer(base, with_control=False),
                                 parts["scheduler"], size_rule=SMALL_MODEL_SIZES)
    config = DreamPainterConfig(control_blocks=args.control_blocks, lora_rank=16)
    # A copy: LoRA wraps the base's linears, and the stock pipeline must run the untouched base.
    dreampainter = DreamPainterTransformer(copy.deepcopy(base), config)
    with torch.no_grad():
        for gate in dreampainter.control.gates:
            gate.weight.normal_(std=0.01)
    ours = DreamPainterPipeline(parts["tokenizer"], text_encoder, vae, dreampainter, parts["scheduler"], size_rule=SMALL_MODEL_SIZES)

    size = args.size
    product = torch.rand(size, size, 3)
    mask = torch.zeros(size, size)
    mask[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 1
    reference = torch.rand(args.reference_size, args.reference_size, 3)
    prompt = "a red bottle on a white marble table"
    common = dict(guidance_scale=3.5, seed=0, paste_back=False)

    def run_stock(steps):
        stock(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
              generator=torch.Generator("cpu").manual_seed(0), output_type="latent")

    def runner(pipe, **extra):
        return lambda steps: pipe(prompt, product, mask, steps=steps, **common, **extra)

    variants = [
        ("diffusers CogView4Pipeline (baseline)", run_stock),
        ("ours, base only (no DreamPainter weights)", runner(plain)),
        ("ours, control branch, lora_scale=0", runner(ours, lora_scale=0.0)),
        ("ours, control branch + LoRA", runner(ours)),
        (f"ours, + {args.reference_size}px reference", runner(ours, reference=reference, reference_size=args.reference_size)),
        (f"ours, + reference, attention_scale=0.5", runner(ours, reference=reference, reference_size=args.reference_size, attention_scale=0.5)),
    ]
    tokens = (size // 16) ** 2
    print(f"model: {args.layers} blocks, {args.heads} heads x {args.head_dim}, {size}x{size} -> {tokens} image tokens; "
          f"control branch {args.control_blocks} blocks (share {args.control_blocks / args.layers:.0%}); "
          f"reference {args.reference_size}px -> {(args.reference_size // 16) ** 2} tokens; device {device}, {args.dtype}, "
          f"threads {torch.get_num_threads()}")
    with torch.no_grad():
        results = per_step_seconds(variants, args.steps_short, args.steps_long, args.repeats, device)
    baseline = results[0][1]
    print(f"{'variant':<48} {'s/step':>9} {'ratio':>7}")
    for name, seconds in results:
        print(f"{name:<48} {seconds:9.4f} {seconds / baseline:7.3f}")
    budget = 1 + args.control_blocks / args.layers + 0.05
    print(f"goal without reference: ratio <= {budget:.3f} (1 + control share + 5%)")


if __name__ == "__main__":
    main()
