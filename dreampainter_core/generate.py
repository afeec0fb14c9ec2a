"""Command line: paint new backgrounds behind products.

Real use (CogView4-6B + a DreamPainter file)::

    python -m dreampainter_core.generate --base /models/CogView4-6B --weights dreampainter.safetensors \
        --product bottle.png --mask bottle_mask.png --prompt "on a marble table, soft light" --out out.png

With no ``--base`` it runs the demo on the embedded model (dreampainter_core.embedded: the
miniature DreamPainter trained by ``python -m train.miniature``, 128x128 synthetic product
scenes, shipped in the pack): a held-out product photo gets a new background from an English
prompt, the same prompt in Chinese, and the prompt plus a background reference image. It writes
the images and a side-by-side sheet to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DreamPainterError
from .fileio import atomic_path

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def save_image_atomic(image: torch.Tensor, path: Path) -> Path:
    """[H, W, 3] 0..1 -> PNG, written to a temporary file first so a crash leaves no half file."""
    array = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def load_image(path: str) -> torch.Tensor:
    from .images import as_image_batch

    return as_image_batch(Image.open(path), name=str(path))[0]


def load_mask(path: str) -> torch.Tensor:
    from .images import as_mask_batch

    return as_mask_batch(Image.open(path), name=str(path))[0]


DEFAULT_GUIDANCE = 3.5  # CogView4's own default, for real models


def run_demo(out_dir: Path, steps: int | None, seed: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
             models_dir: Path | None = None, guidance: float | None = None,
             reference_guidance: float | None = None) -> list[Path]:
    """T2I (English and Chinese prompt) and TR2I on the embedded miniature model; returns the files written.
    steps / guidance / reference_guidance default to the settings the model was evaluated at (its
    miniature.json), which also gives lora_scale and shield_product."""
    from .embedded import embedded_model
    from .pipeline import DreamPainterPipeline

    model = embedded_model(models_dir)
    spec = model.demo_spec()
    measured = model.sampling()
    steps = steps or int(measured.get("steps", 20))
    guidance = guidance if guidance is not None else float(measured.get("guidance", DEFAULT_GUIDANCE))
    if reference_guidance is None and "reference_guidance" in measured:
        reference_guidance = float(measured["reference_guidance"])
    lora_scale = float(measured.get("lora_scale", 1.0))
    shield_product = bool(measured.get("shield_product", False))
    pipe = DreamPainterPipeline.from_pretrained(model.base, dreampainter_weights=model.weights, dtype=dtype,
                                                device=device)
    product = load_image(str(model.demo / spec["product"]))
    mask = load_mask(str(model.demo / spec["mask"]))
    reference = load_image(str(model.demo / spec["reference"]))
    runs = (("t2i", spec["prompt"], None), ("t2i_zh", spec["prompt_zh"], None), ("tr2i", spec["prompt"], reference))
    written = [save_image_atomic(product, out_dir / "demo_product.png"),
               save_image_atomic(reference, out_dir / "demo_reference.png")]
    cells = [product, reference]
    for name, prompt, ref in runs:
        image = pipe(prompt, product, mask, reference=ref, steps=steps, guidance_scale=guidance, seed=seed,
                     placement="keep", reference_guidance=reference_guidance if ref is not None else None,
                     lora_scale=lora_scale, shield_product=shield_product)[0]
        written.append(save_image_atomic(image, out_dir / f"demo_{name}.png"))
        cells.append(image)
        print(f"{name}: {prompt}" + ("  (+ reference image)" if ref is not None else ""))
    sheet = torch.cat([c.float() for c in cells], dim=1)  # product | reference | t2i | t2i_zh | tr2i
    sheet = sheet.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)  # 2x, pixels kept sharp
    written.append(save_image_atomic(sheet, out_dir / "demo_sheet.png"))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreampainter_core.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="CogView4 diffusers folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/)")
    parser.add_argument("--weights", help="DreamPainter .safetensors (stage 1 or 2)")
    parser.add_argument("--product", help="product photo (PNG/JPG)")
    parser.add_argument("--mask", help="product mask, white = product (default: the product's alpha channel)")
    parser.add_argument("--reference", help="background reference image (a stage-2 file, or --mode training_free)")
    parser.add_argument("--prompt", default="", help="background prompt, Chinese or English")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--out", default="dreampainter.png", help="output PNG (a batch writes name_0.png, name_1.png, ...)")
    parser.add_argument("--out-dir", default="demo_out", help="where the demo writes its images")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None,
                        help=f"classifier-free guidance (default {DEFAULT_GUIDANCE}; the demo: what the embedded "
                             f"model was evaluated at)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--attention-scale", type=float, default=1.0)
    parser.add_argument("--shield-product", action="store_true",
                        help="with a stage-2 model and --reference: the product's tokens do not attend to the reference")
    parser.add_argument("--reference-guidance", type=float, default=None,
                        help="guidance towards the reference, separate from --cfg (default: = --cfg, the reference "
                             "left out of the negative pass; 1 = in both passes, follows it least; other values "
                             "cost a 3rd model pass per step)")
    parser.add_argument("--guidance-end", type=float, default=1.0,
                        help="fraction of the steps, from the first, that use --cfg (default 1 = all; lower is faster)")
    parser.add_argument("--mask-guidance", action="store_true")
    parser.add_argument("--mode", choices=("auto", "dreampainter", "training_free"), default="auto",
                        help="how the product is held: auto (the control branch when --weights has one, else "
                             "training_free: the product's latent kept on its own noised path; the public base alone)")
    parser.add_argument("--harmonize", type=float, default=0.2,
                        help="training_free: share of the last steps that run free (edges, contact shadow)")
    parser.add_argument("--region-dilate", type=int, default=0, help="training_free: px the held region grows")
    parser.add_argument("--region-feather", type=int, default=0, help="training_free: px of soft edge outside it")
    parser.add_argument("--training-free-reference", choices=("init", "in_context"), default="init",
                        help="training_free with --reference: start from the product over the reference (init), "
                             "or the reference beside the canvas as extra tokens (in_context, experimental)")
    parser.add_argument("--reference-strength", type=float, default=0.8,
                        help="training_free_reference init: like denoise, lower keeps more of the reference")
    parser.add_argument("--placement", choices=("keep", "center"), default="keep")
    parser.add_argument("--no-paste-back", action="store_true")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    try:
        start = time.time()
        if not args.base:
            paths = run_demo(Path(args.out_dir), steps=args.steps, seed=args.seed, dtype=DTYPES[args.dtype],
                             device=args.device, guidance=args.cfg, reference_guidance=args.reference_guidance)
            print(f"demo (embedded miniature model, {time.time() - start:.1f} s): " + ", ".join(str(p) for p in paths))
            return 0
        from .options import ControlOptions, OutputOptions, ReferenceOptions, SamplingOptions
        from .pipeline import DreamPainterPipeline, check_prompt

        if not args.product:
            parser.error("--product is required with --base")
        product_image = Image.open(args.product)
        product = load_image(args.product)
        if args.mask:
            mask = load_mask(args.mask)
        elif product_image.mode in ("RGBA", "LA"):
            mask = torch.from_numpy(np.asarray(product_image.getchannel("A"), dtype=np.float32) / 255.0)
        else:
            parser.error("--mask is required when the product image has no alpha channel")
        options = dict(  # built (and checked) before the model loads
            sampling=SamplingOptions(steps=args.steps or 50, seed=args.seed, guidance_end=args.guidance_end,
                                     guidance_scale=DEFAULT_GUIDANCE if args.cfg is None else args.cfg),
            reference=ReferenceOptions(image=load_image(args.reference) if args.reference else None,
                                       lora_scale=args.lora_scale, attention_scale=args.attention_scale,
                                       guidance=args.reference_guidance, strength=args.reference_strength,
                                       training_free_method=args.training_free_reference,
                                       shield_product=args.shield_product),
            control=ControlOptions(mode=args.mode, mask_guidance=args.mask_guidance, harmonize=args.harmonize,
                                   region_dilate=args.region_dilate, region_feather=args.region_feather),
            output=OutputOptions(placement=args.placement, paste_back=not args.no_paste_back),
        )
        check_prompt(args.prompt, "--prompt")  # before the model loads, like the options above
        check_prompt(args.negative_prompt, "--negative-prompt")
        pipe = DreamPainterPipeline.from_pretrained(
            args.base, dreampainter_weights=args.weights, dtype=DTYPES[args.dtype], device=args.device,
            allow_fp16=args.dtype == "fp16",
        )
        request = pipe.prepare(product, mask, width=args.width, height=args.height, batch_size=args.batch, **options)
        result = pipe.run(args.prompt, request, args.negative_prompt)
        images = result.images
        out = Path(args.out)
        paths = [save_image_atomic(images[0], out)] if len(images) == 1 else [
            save_image_atomic(img, out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")) for i, img in enumerate(images)
        ]
        print(f"wrote {', '.join(map(str, paths))} in {time.time() - start:.1f} s (mode {result.mode})")
        return 0
    except DreamPainterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
