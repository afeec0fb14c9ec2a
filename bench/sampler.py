"""Per-step cost of DreamPainterPipeline vs diffusers' CogView4Pipeline on one medium random model.

    python bench/sampler.py [--layers 8] [--heads 8] [--head-dim 64] [--size 512] [--control-blocks 2]
                            [--reference-size 256] [--device cpu|cuda] [--dtype fp32|bf16] [--repeats 3]

Both pipelines share the same transformer weights, tiny text encoder and tiny VAE. Only
the denoising loop is timed: diffusers' pipeline gets precomputed prompt embeddings and
returns latents; ours runs ``DreamPainterPipeline.sample`` on precomputed conditioning.
One step (CFG: two transformer calls + the Euler update) = loop time / steps. Variants
take turns within each repeat; the median and the minimum over repeats are printed (the
minimum is the least disturbed by other load on a shared machine).

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

from dreampainter_core.options import ControlOptions, ReferenceOptions, SamplingOptions  # noqa: E402
from dreampainter_core.pipeline import SMALL_MODEL_SIZES, DreamPainterPipeline  # noqa: E402
from train.tiny import build_tiny_components  # noqa: E402
from dreampainter_core.transformer import DreamPainterConfig, DreamPainterTransformer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run, steps, device):
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    return (time.perf_counter() - start) / steps


def per_step_seconds(variants, steps, repeats, device):
    """(median, min) seconds per step of each variant; variants take turns in each repeat."""
    for _, run in variants:
        run(1)  # warm-up
    samples = {name: [] for name, _ in variants}
    for _ in range(repeats):
        for name, run in variants:
            samples[name].append(timed(run, steps, device))
    return [(name, statistics.median(samples[name]), min(samples[name])) for name, _ in variants]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--control-blocks", type=int, default=2)
    parser.add_argument("--reference-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
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

    with torch.no_grad():
        embeds = ours.encode_prompt([prompt])
        negative = ours.encode_prompt([""])
        request = ours.prepare_inputs(product, mask, reference, steps=1)
        foreground, canvas_mask = request.product, request.mask
        control = ours.prepare_control(foreground, canvas_mask)
        ref_latents = ours.encode_reference(request.reference.image, args.reference_size)
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))

    def run_stock(steps):
        stock(prompt_embeds=embeds, negative_prompt_embeds=negative, height=size, width=size,
              num_inference_steps=steps, guidance_scale=3.5, latents=noise.clone(), output_type="latent")

    def runner(pipe, with_control=True, reference=False, merge_lora=None, guidance_end=1.0, known=None,
               in_context=None, **reference_options):
        def run(steps):
            pipe.sample(noise, embeds, negative, height=size, width=size,
                        sampling=SamplingOptions(steps=steps, guidance_scale=3.5, guidance_end=guidance_end),
                        reference=ReferenceOptions(**reference_options), merge_lora=merge_lora,
                        control_latents=control if with_control else None,
                        reference_latents=ref_latents if reference else None, known=known,
                        reference_trajectory=None if in_context is None else (in_context, torch.randn_like(in_context)))
        return run

    with torch.no_grad():
        known = plain.known_region(foreground, canvas_mask, ControlOptions())  # training-free: the product held
        in_context = {side: plain.encode_reference(reference[None], side) for side in (size // 2, size)}

    variants = [
        ("diffusers CogView4Pipeline (baseline)", run_stock),
        ("ours, base only (no DreamPainter weights)", runner(plain, with_control=False)),
        ("ours, control branch, lora_scale=0", runner(ours, lora_scale=0.0)),
        ("ours, control branch + LoRA (merged)", runner(ours)),
        ("ours, control branch + LoRA (unmerged)", runner(ours, merge_lora=False)),
        ("ours, control branch + LoRA, guidance_end=0.6", runner(ours, guidance_end=0.6)),
        (f"ours, + {args.reference_size}px reference", runner(ours, reference=True)),
        ("ours, + reference, attention_scale=0.5", runner(ours, reference=True, attention_scale=0.5)),
        ("training-free (base only, product held)", runner(plain, with_control=False, known=known)),
        *[(f"training-free + in-context {side}px reference", runner(plain, with_control=False, known=known,
                                                                    in_context=in_context[side]))
          for side in in_context],
    ]
    tokens = (size // 16) ** 2
    print(f"model: {args.layers} blocks, {args.heads} heads x {args.head_dim}, {size}x{size} -> {tokens} image tokens; "
          f"control branch {args.control_blocks} blocks (share {args.control_blocks / args.layers:.0%}); "
          f"reference {args.reference_size}px -> {(args.reference_size // 16) ** 2} tokens; device {device}, {args.dtype}, "
          f"threads {torch.get_num_threads()}")
    with torch.no_grad():
        results = per_step_seconds(variants, args.steps, args.repeats, device)
    _, base_median, base_min = results[0]
    print(f"{'variant':<48} {'median s/step':>13} {'ratio':>7} {'min s/step':>11} {'ratio':>7}")
    for name, median, minimum in results:
        print(f"{name:<48} {median:13.4f} {median / base_median:7.3f} {minimum:11.4f} {minimum / base_min:7.3f}")
    budget = 1 + args.control_blocks / args.layers + 0.05
    print(f"goal without reference: ratio <= {budget:.3f} (1 + control share + 5%)")


if __name__ == "__main__":
    main()
