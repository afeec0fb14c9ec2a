"""The backdrop fringe at paste-back, with and without colour decontamination, against ground truth.

    python -m train.fringe_eval [--scenes 80] [--size 256] [--docs docs/batch]

Catalog shots with a known fringe: each synthetic product is drawn at 4x and box-averaged, which
gives its true soft matte a and true colour F; the shot is I = a F + (1 - a) B on a studio
backdrop B (white, or light grey on every other scene). It is pasted over a dark new background G
(the scene's wall, darkened), whose true composite is a F + (1 - a) G:
- plain: what paste-back did before (the matte thresholded at 0.5, the photo's pixels on it, a
  1 px ramp of the photo's surround);
- decontaminated: product.paste_back(..., matte=a) (edges.estimate_foreground).
Fringe energy: the mean squared error against the true composite over the edge band (0 < a < 1,
grown by 1 px), and the mean excess lightness there (how much lighter than the truth). Paired per
scene, with a 95% interval of the mean difference, under three conditions, from kind to harsh:
- ideal: a flat backdrop and the true matte;
- studio: a backdrop with a lighting gradient (0.82..1.0 across the shot) and sensor noise
  (sigma 0.01), true matte;
- estimated matte: the studio shot, and the matte a matting model would give: the true one
  box-blurred by 1 px and shifted 1 px (too soft, slightly off).
Writes DOCS/fringe.json and a zoomed crop DOCS/fringe_crop.png (plain | decontaminated | truth; top row studio,
bottom row estimated matte).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreampainter_core import masks
from dreampainter_core.product import paste_back

SUPERSAMPLE = 4


CONDITIONS = ("ideal", "studio", "estimated_matte")


def catalog_shot(seed: int, index: int, size: int, condition: str = "ideal"):
    """(true matte a [H, W], true colour F [H, W, 3], shot I, dark background G, matte given to
    paste-back [H, W]), floats 0..1."""
    from train.synthetic import make_scene

    scene, rendered, _ = make_scene(seed, index, size * SUPERSAMPLE)
    big_mask = rendered["mask"].astype(np.float64)
    big_image = rendered["image"].astype(np.float64) / 255.0
    pool = lambda x: x.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, *x.shape[2:]).mean(axis=(1, 3))  # noqa: E731
    alpha = pool(big_mask)
    colour = pool(big_image * big_mask[..., None]) / np.maximum(alpha[..., None], 1e-9)
    backdrop = np.full((size, size, 1), 1.0 if index % 2 == 0 else 0.92)
    rng = np.random.default_rng([seed, index])
    if condition != "ideal":
        ramp = np.linspace(0.82, 1.0, size)
        backdrop = (ramp[:, None] if index % 2 else ramp[None, :])[..., None] * np.ones((size, size, 1))
    shot = alpha[..., None] * colour + (1 - alpha[..., None]) * backdrop
    if condition != "ideal":
        shot = np.clip(shot + rng.normal(0, 0.01, shot.shape), 0, 1)
    wall = pool(rendered["reference"].astype(np.float64) / 255.0)
    dark = 0.25 * wall
    as_t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).float()  # noqa: E731
    given = as_t(alpha)
    if condition == "estimated_matte":
        from dreampainter_core.edges import box_blur

        given = box_blur(given[None, ..., None], 1)[0, ..., 0].float()
        given = torch.roll(given, shifts=(1, 1), dims=(0, 1))
    return as_t(alpha), as_t(colour), as_t(shot), as_t(dark), given


def composites(alpha, colour, shot, dark, given):
    a = alpha[None]
    hard = (given[None] > 0.5).float()
    truth = a[..., None] * colour[None] + (1 - a[..., None]) * dark[None]
    plain = paste_back(dark[None], shot[None], hard, feather=1, source=shot[None])
    clean = paste_back(dark[None], shot[None], hard, source=shot[None], matte=given[None])
    return truth[0], plain[0], clean[0]


def band_of(alpha):
    soft = ((alpha > 0) & (alpha < 1)).float()
    return masks.dilate(soft[None], 3)[0] > 0.5


def measures(out, truth, band):
    lightness = lambda x: x.mean(dim=-1)  # noqa: E731
    return {"fringe_mse": float(((out - truth)[band] ** 2).mean()),
            "excess_lightness": float((lightness(out) - lightness(truth))[band].clamp_min(0).mean())}


def interval(values):
    v = np.asarray(values, dtype=np.float64)
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": round(float(v.mean()), 6), "ci95": [round(float(v.mean() - half), 6), round(float(v.mean() + half), 6)]}


def crop_figure(alpha, truth, plain, clean, zoom=6, side=40) -> Image.Image:
    band = band_of(alpha)
    ys, xs = torch.nonzero(band, as_tuple=True)
    y, x = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    y0 = min(max(0, y - side // 2), alpha.shape[0] - side)
    x0 = min(max(0, x - side // 2), alpha.shape[1] - side)
    tiles = []
    for img in (plain, clean, truth):
        tile = (img[y0:y0 + side, x0:x0 + side].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        tiles.append(Image.fromarray(tile).resize((side * zoom, side * zoom), Image.NEAREST))
    gap = 8
    fig = Image.new("RGB", (3 * side * zoom + 2 * gap, side * zoom), (255, 255, 255))
    for i, tile in enumerate(tiles):
        fig.paste(tile, (i * (side * zoom + gap), 0))
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=80)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--docs", default=None)
    a = p.parse_args(argv)
    summary, rows, figures = {"scenes": a.scenes, "size": a.size}, [], {}
    for condition in CONDITIONS:
        cond_rows = []
        for i in range(a.scenes):
            alpha, colour, shot, dark, given = catalog_shot(a.seed, i, a.size, condition)
            truth, plain, clean = composites(alpha, colour, shot, dark, given)
            band = band_of(alpha)
            full = (given >= 1.0) & (alpha >= 1.0)
            cond_rows.append({"condition": condition, "scene": i, "band_pixels": int(band.sum()),
                              "plain": measures(plain, truth, band),
                              "decontaminated": measures(clean, truth, band),
                              "product_exact": bool(torch.equal(clean[full], shot[full]))})
            if condition != "ideal" and condition not in figures and i % 2 == 0 and int(band.sum()) > 200:
                figures[condition] = crop_figure(alpha, truth, plain, clean)
        part = {"all_full_matte_pixels_exact": all(r["product_exact"] for r in cond_rows)}
        for key in ("fringe_mse", "excess_lightness"):
            plain_v = [r["plain"][key] for r in cond_rows]
            clean_v = [r["decontaminated"][key] for r in cond_rows]
            part[key] = {"plain": interval(plain_v), "decontaminated": interval(clean_v),
                         "difference": interval([c - p for c, p in zip(clean_v, plain_v)]),
                         "ratio_of_means": round(float(np.mean(clean_v) / np.mean(plain_v)), 4),
                         "scenes_better": sum(c < p for c, p in zip(clean_v, plain_v))}
        summary[condition] = part
        rows += cond_rows
    print(json.dumps(summary, indent=1))
    if a.docs:
        docs = Path(a.docs)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "fringe.json").write_text(json.dumps({"summary": summary, "scenes": rows}, indent=1) + "\n")
        if figures:  # one row per condition: studio (true matte), then estimated matte
            rows_img = list(figures.values())
            sheet = Image.new("RGB", (rows_img[0].width, sum(r.height for r in rows_img) + 8 * (len(rows_img) - 1)), (255, 255, 255))
            for k, row in enumerate(rows_img):
                sheet.paste(row, (0, k * (row.height + 8)))
            sheet.save(docs / "fringe_crop.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
