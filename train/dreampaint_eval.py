"""DreamPaint on the miniature: learn held-out products, insert them into new scenes, measure.

    python -m train.dreampaint_eval --base embedded --out runs/dreampaint_eval \\
        [--insertion-weights runs/insertion/dreampainter_stage1.safetensors] [--scenes 60] [--train-steps 3000]
    python -m train.dreampaint_eval --base DIR --out OUT --smoke      # a few seconds: that it all runs

For each held-out product of train.synthetic (shapes and patterns the base never saw: a striped star
vase, a dotted lamp, a checkered diamond jar):

1. its 4 catalog views (write_catalog: backdrop, scale and place vary) train a product file with
   train.dreampaint (masked DreamBooth, no prior preservation), and again with prior preservation (the
   paper's ablation), and, given an insertion branch, once more on that model;
2. it is inserted into --scenes new scenes (held_out_scene: the training scenes' kind, the product's
   true silhouette known), each with an insertion mask of one of 6 kinds (rectangle, ellipse or
   object-shaped x tight or loose margin, in turn), in these settings, the same seed for all:
   * ``class_noun``: "a vase on ...", no product LoRA (what the base knows of the class);
   * ``product``: "a sks vase on ...", with the product LoRA (training-free known-region sampler);
   * ``branch``: the same with the insertion control branch (when --insertion-weights is given);
   * ``paste``: catalog view 0's cut-out pasted into the mask's box (the naive baseline);
   * ``prior``: the product trained with prior preservation;
   * ``vae_ceiling``: the true scene through the VAE and back inside the mask (what the VAE can draw at
     all: every generated setting is below it);
   * ``too_large``: the product LoRA with an ill-fitting mask (a rectangle 0.9 x the product's size
     beyond it on every side, clipped to leave a frame of TOO_LARGE_FRAME px of the photo: a large
     product's rectangle would otherwise cover the whole image, which insert refuses);
3. measured on the result (train.metrics): ``iou``, the product-coloured pixels in the mask (either
   of its two colours, metrics.ColorShapeSegmenter) against the true silhouette; ``colour``, the share
   of the true silhouette drawn in the product's colours; ``both_colours``, whether both colours are
   there (each on >= 10% of the silhouette's area); ``pattern``, metrics.pattern_match of the drawn
   product (or, if too small, the true silhouette) against the product's pattern; ``context_exact``,
   every pixel outside the mask is the context's; ``seam``, metrics.seam_error across the mask's edge
   against the true scene. Paired differences on the same scenes (metrics.paired_difference, 95%
   bootstrap intervals): product vs class noun, product vs paste, branch vs product, prior vs
   product, too_large vs product.

Writes OUT/report.json (settings, training reports, every row, means, paired intervals),
OUT/table.md and OUT/samples.png (per product, rows of: context with mask | class noun | product |
[branch] | paste | VAE ceiling | truth). The products' files and run folders stay in OUT/<product>/ (a rerun
resumes or reuses them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreampainter_core.fileio import atomic_write_text
from dreampainter_core.images import mask_overlay
from dreampainter_core.options import ControlOptions, SamplingOptions
from dreampainter_core.product_lora import load_product_lora

from .dreampaint import DreamPaintSettings, _resolve_base, load_catalog, train_product
from .insertion_masks import MASK_SHAPES, insertion_hole
from .metrics import ColorShapeSegmenter, paired_difference, pattern_match, seam_error, shade_distance
from .synthetic import HELD_OUT_PRODUCTS, PALETTE, held_out_prompt, held_out_scene, write_catalog
from .validation import _pil, save_grid

__all__ = ["MASK_KINDS", "TOO_LARGE_MARGIN", "measure", "paste_cutout", "evaluate_products", "main"]

MASK_MARGINS = {"tight": 0.06, "loose": 0.2}
MASK_KINDS = [(shape, size) for size in MASK_MARGINS for shape in MASK_SHAPES]
TOO_LARGE_MARGIN = 0.9
TOO_LARGE_FRAME = 8  # px of context always kept around the too-large mask (a token's half side)
METRICS = ("iou", "colour", "both_colours", "pattern", "context_exact", "seam")
COMPARISONS = (("class_noun", "product"), ("paste", "product"), ("product", "branch"), ("product", "prior"),
               ("product", "too_large"))
SHEET_ROWS = 3  # scenes per product in the sample sheet


def vae_ceiling(pipe, context: np.ndarray, truth: np.ndarray, hole: np.ndarray) -> torch.Tensor:
    """The true scene through the model's VAE and back inside the hole, the context outside: the most any
    insertion can draw, since a sampler draws only what its VAE decodes."""
    with torch.no_grad():
        decoded = pipe.decode(pipe.encode_image(torch.from_numpy(truth)[None])).float().clamp(0, 1)[0]
    inside = torch.from_numpy(hole)[..., None]
    return torch.where(inside, decoded, torch.from_numpy(context))


def _inside_frame(hole: np.ndarray, frame: int) -> np.ndarray:
    """``hole`` without its outer ``frame`` px on every side (what stays is the context insert keeps)."""
    inner = np.zeros_like(hole)
    inner[frame:-frame, frame:-frame] = True
    return hole & inner


def _product_pixels(image: np.ndarray, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pixels of either product colour, [pixels near each colour]) of an image [H, W, 3] 0..1."""
    colours = HELD_OUT_PRODUCTS[name]["colors"]
    each = [ColorShapeSegmenter(PALETTE[c])(image[None])[0].numpy() > 0.5 for c in colours]
    return each[0] | each[1], each


def measure(image: torch.Tensor, context: np.ndarray, truth: np.ndarray, silhouette: np.ndarray, hole: np.ndarray,
            name: str) -> dict:
    """The module docstring's measures of one result [H, W, 3] (0..1) against the scene's truth."""
    img = image.detach().float().cpu().numpy()
    drawn, each = _product_pixels(img, name)
    drawn &= hole
    union = (drawn | silhouette).sum()
    area = max(1, int(silhouette.sum()))
    px = img[silhouette]
    near = [shade_distance(px, np.asarray(PALETTE[c], np.float64) / 255.0) < 0.1
            for c in HELD_OUT_PRODUCTS[name]["colors"]]
    region = drawn if drawn.sum() >= 64 else silhouette
    pattern = pattern_match(img, region, HELD_OUT_PRODUCTS[name]["pattern"]).match
    return {
        "iou": float((drawn & silhouette).sum() / union) if union else 0.0,
        "colour": float((near[0] | near[1]).mean()) if px.size else 0.0,
        "both_colours": bool(all((e & hole).sum() >= 0.1 * area for e in each)),
        "pattern": pattern,
        "context_exact": bool(np.array_equal(img[~hole], context.astype(np.float32)[~hole])),
        "seam": float(seam_error(img, truth, hole)),
    }


def paste_cutout(context: np.ndarray, hole: np.ndarray, cutout: np.ndarray, cutout_mask: np.ndarray) -> torch.Tensor:
    """The naive baseline: the catalog cut-out scaled to fit the mask's box (aspect kept), centred and
    standing on the box's bottom, pasted over the context where it lies inside the mask."""
    ys, xs = np.nonzero(cutout_mask)
    crop = cutout[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    crop_mask = cutout_mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    hy, hx = np.nonzero(hole)
    box_w, box_h = hx.max() + 1 - hx.min(), hy.max() + 1 - hy.min()
    scale = min(box_w / crop.shape[1], box_h / crop.shape[0])
    w, h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    pic = np.asarray(Image.fromarray((crop * 255).round().astype(np.uint8)).resize((w, h), Image.LANCZOS)) / 255.0
    m = np.asarray(Image.fromarray(crop_mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    out = context.copy()
    x0, y0 = hx.min() + (box_w - w) // 2, hy.max() + 1 - h
    region = out[y0:y0 + h, x0:x0 + w]
    where = m & hole[y0:y0 + h, x0:x0 + w]
    region[where] = pic[where]
    return torch.from_numpy(out).float()


def _summary(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        cell = {"n": len(mine)}
        for m in METRICS:
            values = [float(r[m]) for r in mine if r[m] is not None and not (isinstance(r[m], float) and math.isnan(r[m]))]
            cell[m] = float(np.mean(values)) if values else None
        out[setting] = cell
    return out


def _paired(rows: list[dict]) -> dict:
    """Paired differences (b - a) of each comparison over the (product, scene) pairs both settings have."""
    by = {(r["product"], r["scene"], r["setting"]): r for r in rows}
    keys = sorted({(r["product"], r["scene"]) for r in rows})
    out = {}
    for a, b in COMPARISONS:
        pairs = [(by[k + (a,)], by[k + (b,)]) for k in keys if k + (a,) in by and k + (b,) in by]
        if pairs:
            out[f"{b} - {a}"] = {m: paired_difference([x[m] for x, _ in pairs], [y[m] for _, y in pairs])
                                 for m in METRICS if m != "context_exact"}
    return out


def _table(summary: dict, paired: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| setting | n | shape IoU | colour | both colours | pattern | context exact | seam error ↓ |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, c in summary.items():
        lines.append(f"| {setting} | {c['n']} | " + " | ".join(fmt(c[m]) for m in METRICS) + " |")
    lines += ["", "| paired (same scenes) | shape IoU | colour | both colours | pattern | seam error |",
              "|---|---|---|---|---|---|"]
    for name, cells in paired.items():
        def cell(m):
            d = cells.get(m)
            return "-" if d is None else f"{d['mean_difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
        lines.append(f"| {name} | " + " | ".join(cell(m) for m in ("iou", "colour", "both_colours", "pattern", "seam"))
                     + " |")
    return "\n".join(lines) + "\n"


def _train(pipe, catalog, settings, folder: Path, name: str, base_name: str, echo) -> tuple[object, dict]:
    """A product file in `folder` (reused when it is there, its run folder resumed otherwise)."""
    out = folder / f"{name}.safetensors"
    if out.is_file():
        return load_product_lora(out), json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    product, report = train_product(pipe, catalog, settings, out, run_dir=folder / f"{name}.run", base_model=base_name,
                                    echo=echo)
    atomic_write_text(folder / f"{name}.json", json.dumps(report, indent=1) + "\n")
    return product, report


def evaluate_products(pipe, out: Path, *, products, scenes: int, settings: DreamPaintSettings, sampling: SamplingOptions,
                      size: int, branch_pipe=None, seed: int = 0, base_name: str = "", echo=print) -> dict:
    """Train, insert and measure (the module docstring); returns the report."""
    rows, sheets, trained = [], [], {}
    for name in products:
        folder = out / name
        catalog_dir = write_catalog(name, folder / "catalog", seed=seed, size=size)
        catalog = load_catalog(catalog_dir, size, echo=echo)
        noun = HELD_OUT_PRODUCTS[name]["class_noun"]
        base = dataclasses.replace(settings, class_noun=noun)
        product, report = _train(pipe, catalog, base, folder, "product", base_name, echo)
        prior, prior_report = _train(pipe, catalog, dataclasses.replace(base, prior_preservation=True), folder,
                                     "product_prior", base_name, echo)
        trained[name] = {"product": report, "prior": prior_report}
        branch_product = None
        if branch_pipe is not None:
            branch_product, trained[name]["branch"] = _train(branch_pipe, catalog, base, folder, "product_branch",
                                                             base_name, echo)
        cut_image, cut_mask = catalog[0].image.numpy(), catalog[0].mask
        t0 = time.perf_counter()
        for index in range(scenes):
            scene, rendered, _ = held_out_scene(name, seed, index, size)
            context = rendered["reference"].astype(np.float32) / 255.0
            truth = rendered["image"].astype(np.float32) / 255.0
            silhouette = rendered["mask"]
            shape, margin = MASK_KINDS[index % len(MASK_KINDS)]
            hole = insertion_hole(silhouette, shape, MASK_MARGINS[margin])
            too_large = _inside_frame(insertion_hole(silhouette, "rectangle", TOO_LARGE_MARGIN), TOO_LARGE_FRAME)
            run = dict(sampling=dataclasses.replace(sampling, seed=seed * 100_000 + index),
                       control=ControlOptions(mode="training_free"))
            with_id, class_only = held_out_prompt(scene, base.identifier), held_out_prompt(scene)
            ctx = torch.from_numpy(context)[None]
            results = {
                "class_noun": (pipe.insert(class_only, ctx, hole[None], **run)[0], hole),
                "product": (pipe.insert(with_id, ctx, hole[None], product, **run)[0], hole),
                "paste": (paste_cutout(context, hole, cut_image, cut_mask), hole),
                "prior": (pipe.insert(with_id, ctx, hole[None], prior, **run)[0], hole),
                "too_large": (pipe.insert(with_id, ctx, too_large[None], product, **run)[0], too_large),
                "vae_ceiling": (vae_ceiling(pipe, context, truth, hole), hole),
            }
            if branch_pipe is not None:
                results["branch"] = (branch_pipe.insert(with_id, ctx, hole[None], branch_product,
                                                        sampling=run["sampling"])[0], hole)
            for setting, (image, mask) in results.items():
                rows.append({"product": name, "scene": index, "mask_shape": shape, "mask_size": margin,
                             "setting": setting, **measure(image, context, truth, silhouette, mask, name)})
            if index < SHEET_ROWS:
                order = (["class_noun", "product"] + (["branch"] if branch_pipe is not None else [])
                         + ["paste", "vae_ceiling"])
                sheets.append([_pil(mask_overlay(torch.from_numpy(hole).float(), ctx)[0])]
                              + [_pil(results[k][0]) for k in order] + [_pil(torch.from_numpy(truth))])
        echo(f"[{name}] {scenes} scenes inserted and measured in {time.perf_counter() - t0:.0f} s")
    summary, paired = _summary(rows), _paired(rows)
    report = {"products": list(products), "scenes_per_product": scenes, "size": size,
              "sampling": {"steps": sampling.steps, "guidance": sampling.guidance_scale},
              "training": dataclasses.asdict(settings), "trained": trained,
              "mask_kinds": [f"{s} {m}" for s, m in MASK_KINDS], "too_large_margin": TOO_LARGE_MARGIN,
              "too_large_frame": TOO_LARGE_FRAME,
              "summary": summary, "paired": paired, "rows": rows}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=float) + "\n")
    atomic_write_text(out / "table.md", _table(summary, paired))
    save_grid(sheets, out / "samples.png", cell=max(64, size))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.dreampaint_eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="embedded", help="CogView4-architecture diffusers folder or 'embedded'")
    p.add_argument("--weights", default=None, help="DreamPainter file (default: the embedded one with --base embedded; "
                                                   "'none' = the base alone)")
    p.add_argument("--insertion-weights", default=None, help="an insertion branch (train.stage1 data.mask_policy="
                                                             "insertion) for the 'branch' setting")
    p.add_argument("--out", required=True)
    p.add_argument("--products", default=",".join(HELD_OUT_PRODUCTS))
    p.add_argument("--scenes", type=int, default=60, help="insertion scenes per product (>= 50 for the table)")
    # The miniature's product settings (train.dreampaint's defaults are CogView4-6B's): at 400 steps, lr 1e-4,
    # rank 16 the loss stayed at 0.45 and nothing of the product showed even on its own catalog views.
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3, help="the product LoRA's learning rate")
    p.add_argument("--rank", type=int, default=32, help="the product LoRA's rank")
    p.add_argument("--sample-steps", type=int, default=None, help="default: the embedded model's (20), else 28")
    p.add_argument("--guidance", type=float, default=None, help="default: the embedded model's (1.5), else 3.5")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learn-token", action="store_true", help="also learn the identifier's embedding")
    p.add_argument("--smoke", action="store_true", help="one product, 3 scenes, 2 steps each: that it all runs")
    a = p.parse_args(argv)
    from dreampainter_core.pipeline import DreamPainterPipeline

    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    base, embedded_weights, base_name = _resolve_base(a.base)
    weights = embedded_weights if a.weights is None else (None if a.weights == "none" else a.weights)
    measured = {}
    if a.base == "embedded":
        from dreampainter_core.embedded import embedded_model

        measured = embedded_model().sampling()
    steps = a.sample_steps or int(measured.get("steps", 28))
    guidance = a.guidance if a.guidance is not None else float(measured.get("guidance", 3.5))
    products = [s.strip() for s in a.products.split(",") if s.strip()]
    unknown = [s for s in products if s not in HELD_OUT_PRODUCTS]
    if unknown:
        print(f"error: unknown held-out product(s) {unknown}; known: {', '.join(HELD_OUT_PRODUCTS)}", file=sys.stderr)
        return 2
    settings = DreamPaintSettings(class_noun="-", steps=a.train_steps, resolution=a.size, learn_token=a.learn_token,
                                  lr=a.lr, rank=a.rank, seed=a.seed, prior_guidance=guidance, prior_steps=steps)
    scenes = a.scenes
    if a.smoke:
        products, scenes, steps = products[:1], 3, 2
        settings = dataclasses.replace(settings, steps=2, rank=2, prior_images=1, prior_steps=1, checkpoint_every=0,
                                       log_every=1)
    pipe = DreamPainterPipeline.from_pretrained(base, dreampainter_weights=weights)
    branch_pipe = None
    if a.insertion_weights:
        branch_pipe = DreamPainterPipeline.from_pretrained(base, dreampainter_weights=a.insertion_weights)
    t0 = time.perf_counter()
    report = evaluate_products(pipe, Path(a.out), products=products, scenes=scenes, settings=settings,
                               sampling=SamplingOptions(steps=steps, guidance_scale=guidance), size=a.size,
                               branch_pipe=branch_pipe, seed=a.seed, base_name=base_name, echo=echo)
    echo(f"done in {time.perf_counter() - t0:.0f} s: {Path(a.out) / 'report.json'}")
    print(_table(report["summary"], report["paired"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
