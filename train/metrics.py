"""Evaluation metrics: object consistency (the paper's), product fidelity, scene adherence, CLIP.

Pure numpy / torch (no ComfyUI). Images are [H, W, 3] or [B, H, W, 3], float in 0..1
(torch or numpy) or uint8 0..255 (numpy); masks and regions are [H, W] or [B, H, W]
(bool, or float thresholded at 0.5). A single image gives a float, a batch a numpy array
(one value per item), unless said otherwise.

Definitions (the evaluation report repeats them):

- object_consistency (DreamPainter, section 5.1): ``1 - Σ(M_gen ∉ M_gt) / Σ M_gt``.
- masked_psnr: PSNR over the product pixels only (inf when identical).
- color_match / background_color_match / table_color_match: the region's per-channel
  10%-trimmed mean colour, classified as the nearest palette colour (CIELAB distance); a match
  when it is the expected name.
- pattern_match: the region's pattern classified from variance / gradient features.
- reference_similarity: histogram intersection of joint RGB histograms (8 bins per
  channel) of the generated image and the reference over a region; 1 = same colours.
- reference_pixel_similarity: 1 - RMSE (0..1 units) over the region, pixel-aligned.
- palette_fit: image-quality proxy for palette-drawn scenes (see its docstring).
- paired_difference: mean of b - a over the items both have, with a percentile-bootstrap
  confidence interval (seeded, so a report is reproducible) and the share of items where
  either is ahead: "is the reference's gain real on these scenes, or noise?".
- ClipScorer: CLIP-T = cos(image, prompt); CLIP-I = cos(image, reference with the product
  composited on it), raw cosines of the projected embeddings (not x100, not clipped).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from dreampainter_core.auto_mask import DEFAULT_MODEL as REMBG_DEFAULT_MODEL
from dreampainter_core.auto_mask import rembg_masker, require_rembg
from dreampainter_core.errors import InputError, MissingDependencyError
from dreampainter_core.images import resize_cover

__all__ = [
    "MissingDependencyError",
    "object_consistency",
    "mask_agreement",
    "Segmenter",
    "ColorShapeSegmenter",
    "PRODUCT_RULE_SHADE",
    "PRODUCT_RULE_TOLERANCE",
    "shade_distance",
    "RembgSegmenter",
    "masked_psnr",
    "masked_max_abs_error",
    "region_color",
    "srgb_to_lab",
    "nearest_palette_color",
    "ColorMatch",
    "color_match",
    "background_color_match",
    "table_color_match",
    "tone_match",
    "PatternMatch",
    "PATTERN_CLASSES",
    "pattern_features",
    "classify_pattern",
    "pattern_match",
    "reference_similarity",
    "reference_pixel_similarity",
    "palette_fit",
    "grid_energy",
    "grid_excess",
    "wall_unevenness",
    "wall_tone_mix",
    "GRID_PERIOD",
    "top_surface_iou",
    "composite",
    "paired_difference",
    "mean_interval",
    "ClipScorer",
    "write_tiny_clip",
]


# ----------------------------------------------------------------------------- conversion


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy() if x.dtype != torch.bool else x.detach().cpu().numpy()
    return np.asarray(x)


def _batch_of(x, name: str, pil_mode: str, item_ndim: int, layouts: str) -> tuple[np.ndarray, bool]:
    """A PIL image (converted to `pil_mode`), array or tensor -> (array with a batch axis, single)."""
    if hasattr(x, "convert") and hasattr(x, "size") and not isinstance(x, (np.ndarray, torch.Tensor)):
        x = np.asarray(x.convert(pil_mode))  # a PIL image
    a = _np(x)
    if a.ndim == item_ndim:
        return a[None], True
    if a.ndim == item_ndim + 1:
        return a, False
    raise InputError(f"{name}: expected {layouts}, got shape {list(a.shape)}")


def _images(x, name: str = "image") -> tuple[np.ndarray, bool]:
    """-> (float64 [B, H, W, 3] in 0..1, whether the input was a single image)."""
    a, single = _batch_of(x, name, "RGB", 3, "[H, W, 3] or [B, H, W, 3]")
    if a.shape[-1] != 3:
        raise InputError(f"{name}: expected 3 colour channels last, got shape {list(a.shape)}")
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    else:
        a = a.astype(np.float64)
        if a.size and (a.min() < -1e-3 or a.max() > 1.0 + 1e-3):
            raise InputError(f"{name}: float values must lie in 0..1 (got {a.min():.3g}..{a.max():.3g}); "
                             "pass uint8 arrays for 0..255 data")
    return np.clip(a, 0.0, 1.0), single


def _masks(x, name: str = "mask") -> tuple[np.ndarray, bool]:
    """-> (bool [B, H, W], single). uint8 (and PIL, as "L") is thresholded at 128, floats at 0.5."""
    a, single = _batch_of(x, name, "L", 2, "[H, W] or [B, H, W]")
    if a.dtype == np.bool_:
        return a, single
    if a.dtype == np.uint8:
        return a >= 128, single
    return a.astype(np.float64) > 0.5, single


def _out(values: np.ndarray, single: bool):
    return float(values[0]) if single else values


def _same_hw(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape[1:3] != b.shape[1:3]:
        raise InputError(f"{name_a} is {a.shape[2]}x{a.shape[1]} but {name_b} is {b.shape[2]}x{b.shape[1]} (WxH); "
                         "they must be the same size")


def _one_image_and_region(image, region, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [H, W, 3] in 0..1, bool [H, W]) of one image and one region of its size."""
    x, single = _images(image, "image")
    r, _ = _masks(region, "region")
    if not single or r.shape[0] != 1:
        raise InputError(f"{caller} takes one image and one region")
    _same_hw("image", x, "region", r)
    return x[0], r[0]


def _batch(*arrays: np.ndarray) -> list[np.ndarray]:
    n = max(a.shape[0] for a in arrays)
    out = []
    for a in arrays:
        if a.shape[0] not in (1, n):
            raise InputError(f"batch sizes differ ({[x.shape[0] for x in arrays]}); give equal batches or 1")
        out.append(np.broadcast_to(a, (n,) + a.shape[1:]) if a.shape[0] != n else a)
    return out


# ----------------------------------------------------------------------------- object consistency


def object_consistency(generated_mask, input_mask):
    """The paper's Object Consistency (DreamPainter, section 5.1, quoted):

        "we utilize GroundDINO and SAM for product detection and segmentation, we develop a
        formula to measure shape consistency: 1 - Σ(M_gen ∉ M_gt) / Σ(M_gt). A value closer to
        1 indicates that the product can be accurately blended on the generated background
        without artifacts."

    Here: ``1 - |M_gen ∩ ¬M_gt| / |M_gt|``, where M_gen is the product segmented from the
    generated image (any Segmenter) and M_gt the input mask: the pixels segmented as product
    that lie OUTSIDE the input mask, as a fraction of the input mask's area, subtracted from
    1. Exactly as written, so: it is 1 whenever nothing product-like appears outside the
    mask, even if part of the product is missing inside it (see mask_agreement's `recall`
    for that), and it is NOT clipped: it goes below 0 when the outside pixels outnumber the
    product's area. Masks: bool, or float/uint8 thresholded at 0.5/128. An empty input mask
    raises InputError (the ratio is undefined).
    """
    gen, single_g = _masks(generated_mask, "generated_mask")
    gt, single_t = _masks(input_mask, "input_mask")
    _same_hw("generated_mask", gen, "input_mask", gt)
    gen, gt = _batch(gen, gt)
    area = gt.reshape(gt.shape[0], -1).sum(axis=1)
    if (area == 0).any():
        raise InputError("input_mask is empty for item(s) "
                         f"{np.nonzero(area == 0)[0].tolist()}: object consistency divides by its area")
    outside = (gen & ~gt).reshape(gen.shape[0], -1).sum(axis=1)
    return _out(1.0 - outside / area, single_g and single_t)


def mask_agreement(generated_mask, input_mask) -> dict[str, Any]:
    """Diagnostics beside object_consistency: {"iou", "recall" (fraction of the input mask
    segmented as product), "extra" (outside pixels / input area, i.e. 1 - consistency)}."""
    gen, single_g = _masks(generated_mask, "generated_mask")
    gt, single_t = _masks(input_mask, "input_mask")
    _same_hw("generated_mask", gen, "input_mask", gt)
    gen, gt = _batch(gen, gt)
    flat_g, flat_t = gen.reshape(gen.shape[0], -1), gt.reshape(gt.shape[0], -1)
    inter = (flat_g & flat_t).sum(1)
    union = (flat_g | flat_t).sum(1)
    area = np.maximum(flat_t.sum(1), 1)
    single = single_g and single_t
    return {
        "iou": _out(np.where(union > 0, inter / np.maximum(union, 1), 1.0), single),
        "recall": _out(inter / area, single),
        "extra": _out((flat_g & ~flat_t).sum(1) / area, single),
    }


# ----------------------------------------------------------------------------- segmenters


@runtime_checkable
class Segmenter(Protocol):
    """Finds the product in generated images: (images [B, H, W, 3] 0..1) -> masks [B, H, W] float 0/1."""

    def __call__(self, images) -> torch.Tensor: ...


#: The colour segmenter's rule (ColorShapeSegmenter's defaults; train.synthetic keeps every scene
#: colour away from a product's line under it): a pixel is product when it lies within
#: PRODUCT_RULE_TOLERANCE (0..1 RGB units) of the shading line {k * product_rgb : k in PRODUCT_RULE_SHADE}.
PRODUCT_RULE_SHADE = (0.62, 1.15)
PRODUCT_RULE_TOLERANCE = 0.1


def shade_distance(pixels: np.ndarray, rgb: np.ndarray, shade: tuple[float, float] = PRODUCT_RULE_SHADE) -> np.ndarray:
    """Distance of colours [..., 3] (0..1) to the segment {k * rgb : shade[0] <= k <= shade[1]} (rgb 0..1)."""
    denom = max(float(rgb @ rgb), 1e-12)
    k = np.clip(pixels @ rgb / denom, shade[0], shade[1])
    return np.linalg.norm(pixels - k[..., None] * rgb, axis=-1)


class ColorShapeSegmenter:
    """Product segmentation for synthetic scenes, where the product colour is known.

    A pixel is product when its colour lies within `tolerance` (Euclidean, 0..1 RGB units)
    of the product colour's shading line {k * product_rgb : shade[0] <= k <= shade[1]}
    (the renderer shades products by multiplying their colour with k in 0.72..1.08). Then,
    in order: holes are filled if `fill_holes` (off by default: a cup handle's hole is
    background, and object consistency only counts pixels outside the mask), components
    smaller than `min_area` pixels are dropped (default 0.05% of the image, at least 4 px:
    speckle), and if `keep_largest` is an int only that many largest components are kept
    (default None: all, so a duplicated product counts against object consistency, as a
    detector would).

    product_rgb: the colour in 0..255, one (r, g, b) for the whole batch or one per item.
    """

    def __init__(self, product_rgb, tolerance: float = PRODUCT_RULE_TOLERANCE,
                 shade: tuple[float, float] = PRODUCT_RULE_SHADE,
                 fill_holes: bool = False, min_area: int | None = None, keep_largest: int | None = None):
        rgb = np.asarray(product_rgb, np.float64)
        if rgb.ndim == 1:
            rgb = rgb[None]
        if rgb.ndim != 2 or rgb.shape[1] != 3 or (rgb < 0).any() or (rgb > 255).any():
            raise InputError(f"product_rgb: expected (r, g, b) in 0..255 or a list of them, got {product_rgb!r}")
        if not tolerance > 0:
            raise InputError(f"tolerance must be > 0, got {tolerance!r}")
        self.rgb = rgb / 255.0
        self.tolerance = float(tolerance)
        self.shade = (float(shade[0]), float(shade[1]))
        self.fill_holes = bool(fill_holes)
        self.min_area = min_area
        self.keep_largest = keep_largest

    def __call__(self, images) -> torch.Tensor:
        from dreampainter_core import masks as mask_ops

        x, _ = _images(images, "images")
        rgb = self.rgb
        if rgb.shape[0] not in (1, x.shape[0]):
            raise InputError(f"ColorShapeSegmenter has {rgb.shape[0]} product colours for {x.shape[0]} images")
        out = np.zeros(x.shape[:3], bool)
        for i in range(x.shape[0]):
            c = rgb[i if rgb.shape[0] > 1 else 0]
            out[i] = shade_distance(x[i], c, self.shade) <= self.tolerance
        h, w = x.shape[1:3]
        min_area = self.min_area if self.min_area is not None else max(4, round(0.0005 * h * w))
        result = np.zeros(out.shape, np.float32)
        for i in range(out.shape[0]):
            ys, xs = np.nonzero(out[i])
            if ys.size == 0:
                continue
            # The component operations run on the bounding box of the candidate pixels (fast).
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            m = torch.from_numpy(out[i, y0:y1, x0:x1].astype(np.float32))
            if self.fill_holes:
                m = mask_ops.fill_holes(m)
            if min_area > 1:
                m = mask_ops.remove_small_components(m, min_area)
            if self.keep_largest is not None and bool(m.any()):
                labels = mask_ops.connected_components(m)
                areas = torch.bincount(labels.reshape(-1))
                areas[0] = 0
                order = torch.argsort(areas, descending=True)[: int(self.keep_largest)]
                order = order[areas[order] > 0]
                m = torch.isin(labels, order).to(torch.float32)
            result[i, y0:y1, x0:x1] = m.numpy()
        return torch.from_numpy(result)


class RembgSegmenter:
    """Salient-object segmentation with U²-Net through rembg (dreampainter_core.auto_mask), for
    real product photos.

    model: a rembg model name ("u2netp", the small U²-Net, by default; "u2net", "isnet-general-use"...).
    The alpha matte is thresholded at `threshold`. Raises MissingDependencyError naming what
    to install when rembg (or its onnxruntime) is missing; the model is loaded on first use.
    """

    def __init__(self, model: str = REMBG_DEFAULT_MODEL, threshold: float = 0.5):
        require_rembg("RembgSegmenter", model)
        self.model = model
        self.threshold = float(threshold)

    def __call__(self, images) -> torch.Tensor:
        from PIL import Image

        x, _ = _images(images, "images")
        masker = rembg_masker(self.model, "RembgSegmenter")
        out = np.zeros(x.shape[:3], np.float32)
        for i in range(x.shape[0]):
            pil = Image.fromarray(np.round(x[i] * 255).astype(np.uint8))
            out[i] = (masker.alpha(pil).astype(np.float32) / 255.0) >= self.threshold
        return torch.from_numpy(out)


# ----------------------------------------------------------------------------- product fidelity


def _pair_and_mask(a, b, mask, names: tuple[str, str] = ("a", "b")):
    """Two images and a mask of one size -> (x, y, m batched alike, whether all three were single)."""
    x, sa = _images(a, names[0])
    y, sb = _images(b, names[1])
    m, sm = _masks(mask, "mask")
    _same_hw(names[0], x, names[1], y)
    _same_hw(names[0], x, "mask", m)
    x, y, m = _batch(x, y, m)
    return x, y, m, sa and sb and sm


def _masked_errors(a, b, mask):
    x, y, m, single = _pair_and_mask(a, b, mask)
    if not m.reshape(m.shape[0], -1).any(axis=1).all():
        raise InputError("mask is empty for some item: nothing to compare")
    return x, y, m, single


def masked_psnr(a, b, mask, max_val: float = 1.0):
    """PSNR (dB) between a and b over the mask's pixels (all 3 channels): 10 log10(max² / MSE).
    Identical pixels give inf. Images in 0..1 (uint8 arrays are divided by 255)."""
    x, y, m, single = _masked_errors(a, b, mask)
    vals = []
    for i in range(x.shape[0]):
        mse = float(((x[i] - y[i])[m[i]] ** 2).mean())
        vals.append(math.inf if mse == 0.0 else 10.0 * math.log10(max_val**2 / mse))
    return _out(np.array(vals), single)


def masked_max_abs_error(a, b, mask):
    """Largest |a - b| (0..1 units) over the mask's pixels; 0 means the product pixels are exact."""
    x, y, m, single = _masked_errors(a, b, mask)
    return _out(np.array([float(np.abs(x[i] - y[i])[m[i]].max()) for i in range(x.shape[0])]), single)


def _gradient_magnitude(x: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> [H, W]: RGB forward-difference gradient magnitude (the last row/column repeat)."""
    dx = np.diff(x, axis=1, append=x[:, -1:])
    dy = np.diff(x, axis=0, append=x[-1:])
    return np.sqrt((dx**2 + dy**2).sum(-1))


def edge_band(mask: np.ndarray, width: int) -> np.ndarray:
    """[H, W] bool -> the pixels within `width` of the mask's boundary, on both sides
    (dilated minus eroded, square structuring element)."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = 2 * width + 1
    dilated = F.max_pool2d(m, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-m, k, stride=1, padding=width)
    return ((dilated - eroded)[0, 0] > 0.5).numpy()


def seam_error(image, truth, mask, width: int = 3):
    """How far the colour gradient across the product edge is from the ground truth's: the mean, over
    the band of pixels within `width` of the mask boundary, of | |grad image| - |grad truth| | (0..1 RGB
    units per pixel). A pasted product on a background that does not meet it (a halo, a missing
    contact shadow, a hard colour step) scores high; 0 means the edge looks like the real photo's."""
    x, y, m, single = _pair_and_mask(image, truth, mask, ("image", "truth"))
    vals = []
    for i in range(x.shape[0]):
        band = edge_band(m[i], width)
        if not band.any():
            raise InputError("mask has no edge (empty or the whole image): no seam to measure")
        vals.append(float(np.abs(_gradient_magnitude(x[i]) - _gradient_magnitude(y[i]))[band].mean()))
    return _out(np.array(vals), single)


# ----------------------------------------------------------------------------- colour adherence


def _palette_array(palette: Mapping[str, Sequence[int]]) -> tuple[list[str], np.ndarray]:
    names = list(palette)
    if not names:
        raise InputError("palette is empty")
    return names, np.array([palette[n] for n in names], np.float64) / 255.0


REGION_TRIM = 0.1  # region_color drops this fraction of the darkest and of the brightest values per channel


def region_color(image, region, trim: float = REGION_TRIM, brightest: float | None = None) -> np.ndarray | None:
    """Trimmed mean colour (0..255 floats) of one image [H, W, 3] over region [H, W]: per
    channel, the mean of the values left after dropping the lowest and highest `trim`
    fraction (robust to stray pixels, and for a two-colour pattern it lies between the
    two, where a median would jump to whichever is more common). brightest: first keep
    only that fraction of the region's pixels with the highest luminance (a surface part
    of which lies in shadow). None if the region is empty."""
    img, reg = _one_image_and_region(image, region, "region_color")
    px = img[reg]
    if brightest is not None and px.shape[0]:
        if not 0.0 < brightest <= 1.0:
            raise InputError(f"brightest must be in (0, 1], got {brightest!r}")
        lum = px @ np.array([0.299, 0.587, 0.114])
        keep = max(1, int(math.ceil(brightest * px.shape[0])))
        px = px[np.argsort(-lum, kind="stable")[:keep]]
    n = px.shape[0]
    if n == 0:
        return None
    srt = np.sort(px, axis=0)
    cut = int(n * trim)
    kept = srt[cut : n - cut] if n - 2 * cut > 0 else srt
    return kept.mean(axis=0) * 255.0


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB (0..255, [..., 3]) -> CIELAB (D65 white), the space palette colours are compared in."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124564, 0.2126729, 0.0193339],
                          [0.3575761, 0.7151522, 0.1191920],
                          [0.1804375, 0.0721750, 0.9503041]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def nearest_palette_color(rgb, palette: Mapping[str, Sequence[int]]) -> tuple[str, float]:
    """(name, CIE76 ΔE) of the palette colour nearest to rgb (0..255), compared in CIELAB:
    a darker or lighter version of a neutral colour stays neutral (dark grey is "black",
    not "brown", as plain RGB distance would say)."""
    names = list(palette)
    if not names:
        raise InputError("palette is empty")
    lab = srgb_to_lab(np.array([palette[n] for n in names], np.float64))
    d = np.linalg.norm(lab - srgb_to_lab(np.asarray(rgb, np.float64))[None], axis=1)
    i = int(np.argmin(d))
    return names[i], float(d[i])


@dataclass
class ColorMatch:
    match: bool | None  # None: the region was empty (not measurable)
    predicted: str | None  # nearest palette name (None without a palette)
    expected: str | None
    measured_rgb: list[float] | None  # 0..255
    distance: float | None  # measured vs expected colour, 0..1 RGB units

    def to_json(self) -> dict[str, Any]:
        return {"match": self.match, "predicted": self.predicted, "expected": self.expected,
                "measured_rgb": self.measured_rgb, "distance": self.distance}


def color_match(image, region, expected_rgb=None, palette: Mapping[str, Sequence[int]] | None = None,
                expected_name: str | None = None, max_distance: float = 0.2,
                brightest: float | None = None) -> ColorMatch:
    """Does the region's colour follow the prompt?

    The region's colour is measured (region_color: per-channel 10%-trimmed mean, of the
    `brightest` fraction of its pixels when given). With a palette, it is classified as
    the nearest palette colour (CIELAB) and matches when that is `expected_name` (default: the
    palette name whose colour is `expected_rgb`). Without one, it matches when it lies
    within `max_distance` (0..1 RGB units) of `expected_rgb`.
    """
    measured = region_color(image, region, brightest=brightest)
    if expected_name is None and palette is not None and expected_rgb is not None:
        for n, c in palette.items():
            if tuple(int(v) for v in c) == tuple(int(round(float(v))) for v in expected_rgb):
                expected_name = n
                break
    if expected_rgb is None and palette is not None and expected_name is not None:
        expected_rgb = palette[expected_name]
    if measured is None:
        return ColorMatch(None, None, expected_name, None, None)
    dist = None if expected_rgb is None else float(np.linalg.norm(measured - np.asarray(expected_rgb, np.float64)) / 255.0)
    if palette is not None:
        predicted, _ = nearest_palette_color(measured, palette)
        if expected_name is None:
            raise InputError("color_match with a palette needs expected_name or an expected_rgb from the palette")
        match = predicted == expected_name
    else:
        if expected_rgb is None:
            raise InputError("color_match needs expected_rgb (or a palette and expected_name)")
        predicted, match = None, dist <= max_distance
    return ColorMatch(bool(match), predicted, expected_name, [round(float(v), 2) for v in measured],
                      None if dist is None else round(dist, 5))


def background_color_match(image, region, expected_rgb=None, palette=None, expected_name=None, **kw) -> ColorMatch:
    """color_match on the background (wall) region: the prompt's background colour."""
    return color_match(image, region, expected_rgb, palette, expected_name, **kw)


def table_color_match(image, region, expected_rgb=None, palette=None, expected_name=None, **kw) -> ColorMatch:
    """color_match on the display stand's top surface: the prompt's table colour."""
    return color_match(image, region, expected_rgb, palette, expected_name, **kw)


def tone_match(image, region, candidates: Mapping[str, Sequence[float]], expected: str) -> ColorMatch:
    """Which of several shades of one colour is the region? The region's colour
    (region_color) is matched to the nearest candidate (CIELAB; candidates: name -> 0..255
    colour as region_color measures it on each shade's ground truth); a match when that is
    `expected`. For synthetic scenes the candidates are the wall's tones (light / plain /
    deep), which the prompt never names: only a reference can tell them apart."""
    if expected not in candidates:
        raise InputError(f"expected tone {expected!r} is not among the candidates {list(candidates)}")
    measured = region_color(image, region)
    if measured is None:
        return ColorMatch(None, None, expected, None, None)
    names = list(candidates)
    lab = srgb_to_lab(np.array([candidates[n] for n in names], np.float64))
    d = np.linalg.norm(lab - srgb_to_lab(measured)[None], axis=1)
    predicted = names[int(np.argmin(d))]
    dist = float(np.linalg.norm(measured - np.asarray(candidates[expected], np.float64)) / 255.0)
    return ColorMatch(predicted == expected, predicted, expected, [round(float(v), 2) for v in measured], round(dist, 5))


# ----------------------------------------------------------------------------- pattern adherence

PATTERN_CLASSES = ("plain", "stripes", "dots", "checker", "gradient")
# Thresholds of classify_pattern (luminance 0..1), set on the synthetic renderer's patterns.
PLAIN_MAX_STD = 0.015  # below: flat
GRADIENT_MAX_ROUGHNESS = 0.3  # RMS pixel-to-pixel step / std below: smooth (a glow / gradient)
NOISE_MIN_ROUGHNESS = 1.25  # above: unstructured pixel noise (read as plain), not a pattern
STRIPES_MAX_ISOTROPY = 0.2  # min/max of horizontal vs vertical step energy below: stripes
CHECKER_MIN_MINORITY = 0.42  # share of the less common level above: checker (else dots)


def pattern_features(image, region) -> dict[str, float] | None:
    """Variance features of the luminance over a region (None if under 64 pixels).

    std: luminance standard deviation. roughness: RMS difference between horizontally and
    vertically neighbouring region pixels (pixels k = round(size / 128) apart, at least 1,
    so the features do not depend on the resolution), over std (~0 for smooth gradients, ~1 for hard
    patterns, ~1.4 for noise). isotropy: min/max of the horizontal and vertical step
    energies (~0 for stripes, ~1 for dots / checkers). minority: share of pixels on the
    less common side of the midpoint between the 5th and 95th luminance percentiles
    (~0.5 for checkers, ~0.1-0.37 for dots).
    """
    img, reg = _one_image_and_region(image, region, "pattern_features")
    lum = img @ np.array([0.299, 0.587, 0.114])
    m = reg
    if m.sum() < 64:
        return None
    vals = lum[m]
    std = float(vals.std())
    k = max(1, round(min(m.shape) / 128))  # step between compared pixels: same features at any size
    mh = m[:, k:] & m[:, :-k]
    mv = m[k:, :] & m[:-k, :]
    dh = (lum[:, k:] - lum[:, :-k])[mh]
    dv = (lum[k:, :] - lum[:-k, :])[mv]
    eh = float((dh**2).mean()) if dh.size else 0.0
    ev = float((dv**2).mean()) if dv.size else 0.0
    rough = math.sqrt((eh + ev) / 2.0) / max(std, 1e-9)
    iso = min(eh, ev) / max(eh, ev, 1e-12)
    lo, hi = np.percentile(vals, [5, 95])
    above = float((vals > (lo + hi) / 2).mean())
    return {"std": std, "roughness": rough, "isotropy": iso, "minority": min(above, 1.0 - above)}


def classify_pattern(image, region) -> tuple[str | None, dict[str, float] | None]:
    """(pattern class, features) of one image over a region; (None, None) if too small.

    plain if std < PLAIN_MAX_STD; else gradient if roughness < GRADIENT_MAX_ROUGHNESS; else
    plain if roughness > NOISE_MIN_ROUGHNESS (neighbouring pixels uncorrelated: noise on a
    flat wall, not a drawn pattern); else stripes if isotropy < STRIPES_MAX_ISOTROPY; else
    checker if minority >= CHECKER_MIN_MINORITY; else dots.
    """
    f = pattern_features(image, region)
    if f is None:
        return None, None
    if f["std"] < PLAIN_MAX_STD:
        return "plain", f
    if f["roughness"] < GRADIENT_MAX_ROUGHNESS:
        return "gradient", f
    if f["roughness"] > NOISE_MIN_ROUGHNESS:
        return "plain", f
    if f["isotropy"] < STRIPES_MAX_ISOTROPY:
        return "stripes", f
    return ("checker" if f["minority"] >= CHECKER_MIN_MINORITY else "dots"), f


@dataclass
class PatternMatch:
    match: bool | None
    predicted: str | None
    expected: str
    features: dict[str, float] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return {"match": self.match, "predicted": self.predicted, "expected": self.expected,
                "features": None if self.features is None else {k: round(v, 5) for k, v in self.features.items()}}


def pattern_match(image, region, expected: str) -> PatternMatch:
    """Is the region's pattern the expected class (one of PATTERN_CLASSES)?"""
    if expected not in PATTERN_CLASSES:
        raise InputError(f"expected pattern must be one of {PATTERN_CLASSES}, got {expected!r}")
    predicted, f = classify_pattern(image, region)
    return PatternMatch(None if predicted is None else predicted == expected, predicted, expected, f)


# ----------------------------------------------------------------------------- reference similarity


def _region_pair(generated, reference, region):
    x, sx = _images(generated, "generated")
    y, _ = _images(reference, "reference")
    if y.shape[1:3] != x.shape[1:3]:  # bring the reference to the generated size (cover + centre crop)
        y = resize_cover(torch.from_numpy(y).float(), x.shape[2], x.shape[1]).double().numpy()
    if region is None:
        r, sr = np.ones(x.shape[:3], bool), True
    else:
        r, sr = _masks(region, "region")
        _same_hw("generated", x, "region", r)
    x, y, r = _batch(x, y, r)
    return x, y, r, sx


def reference_similarity(generated, reference, region=None, bins: int = 8):
    """Colour-distribution similarity to the reference: Σ_b min(p_b, q_b) over the joint RGB
    histograms p (generated) and q (reference) with `bins` bins per channel, each normalised
    to sum 1, computed over `region` (default: the whole image; pass the background away
    from the product). 1 = identical colour distributions, 0 = disjoint. Insensitive to
    where things are (a shifted pattern scores the same), like the paper's references,
    which are shifted and cropped. The reference is resized (cover + centre crop) to the
    generated size first. NaN for an empty region."""
    x, y, r, single = _region_pair(generated, reference, region)
    vals = []
    for i in range(x.shape[0]):
        px, py = x[i][r[i]], y[i][r[i]]
        if px.shape[0] == 0:
            vals.append(math.nan)
            continue
        qx = np.minimum((px * bins).astype(np.int64), bins - 1)
        qy = np.minimum((py * bins).astype(np.int64), bins - 1)
        hx = np.bincount((qx[:, 0] * bins + qx[:, 1]) * bins + qx[:, 2], minlength=bins**3) / px.shape[0]
        hy = np.bincount((qy[:, 0] * bins + qy[:, 1]) * bins + qy[:, 2], minlength=bins**3) / py.shape[0]
        vals.append(float(np.minimum(hx, hy).sum()))
    return _out(np.array(vals), single)


def reference_pixel_similarity(generated, reference, region=None):
    """1 - RMSE (0..1 units, all channels) between generated and reference over `region`:
    pixel-aligned (1 = identical, 0 = maximally different). NaN for an empty region."""
    x, y, r, single = _region_pair(generated, reference, region)
    vals = []
    for i in range(x.shape[0]):
        d = (x[i] - y[i])[r[i]]
        vals.append(math.nan if d.size == 0 else 1.0 - math.sqrt(float((d**2).mean())))
    return _out(np.array(vals), single)


# ----------------------------------------------------------------------------- artifacts

#: CogView4's token pitch in pixels (VAE 8x times patch 2): a period of 16 folds both the VAE's
#: 8 px grid and the DiT's 16 px patch grid.
GRID_PERIOD = 16


#: Off-grid periods for grid_excess: near 16 (so broadband unevenness folds into them about as much)
#: and sharing no harmonic with the 8 / 16 px grid.
GRID_CONTROL_PERIODS = (14, 15, 17, 18)


def _luminance(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114])


def _fold_variance(lum: np.ndarray, region: np.ndarray, period: int, min_per_phase: int) -> float | None:
    """Variance of the region's luminance means per phase (y mod period, x mod period); None when a
    phase has under `min_per_phase` pixels."""
    h, w = lum.shape
    phase = (np.arange(h)[:, None] % period) * period + (np.arange(w)[None, :] % period)
    counts = np.bincount(phase[region], minlength=period * period)
    if counts.min() < min_per_phase:
        return None
    means = np.bincount(phase[region], weights=lum[region], minlength=period * period) / counts
    return float(means.var())


def _masked_blur(values: np.ndarray, region: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of `values` over `region` only (normalised convolution: pixels outside the region
    do not bleed in)."""
    radius = max(1, int(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()

    def separable(a):
        a = np.apply_along_axis(np.convolve, 0, a, kernel, mode="same")
        return np.apply_along_axis(np.convolve, 1, a, kernel, mode="same")

    weight = region.astype(np.float64)
    return separable(values * weight) / np.maximum(separable(weight), 1e-9)


def grid_energy(image, region, period: int = GRID_PERIOD, min_per_phase: int = 4) -> float | None:
    """How much of a region's luminance repeats with the latent / patch grid: the luminance is
    folded modulo `period` in both axes (a phase is (y mod p, x mod p), aligned with the grid,
    which starts at pixel 0), each phase averaged over the region, and the variance of those
    phase means returned (luminance 0..1 units squared). A flat wall scores 0 however it is
    lit; a checkerboard-like artifact tied to the token grid scores its power; noise not tied
    to the grid averages out (its share falls with the number of pixels per phase). Measure it
    on walls that are plain in the ground truth. None when a phase has under `min_per_phase`
    pixels.

    Blotchy, uneven walls score here too: broadband unevenness folds into any period (it scores
    about the same at 15 or 17 px). `grid_excess` keeps only the part tied to the grid."""
    img, reg = _one_image_and_region(image, region, "grid_energy")
    return _fold_variance(_luminance(img), reg, period, min_per_phase)


def grid_excess(image, region, period: int = GRID_PERIOD, controls: Sequence[int] = GRID_CONTROL_PERIODS,
                highpass_sigma: float = 4.0, min_per_phase: int = 4) -> float | None:
    """The grid-tied part of `grid_energy`: the fold variance at the grid's period minus its mean at
    off-grid `controls` periods, on the region's luminance high-passed (minus its masked Gaussian blur
    of `highpass_sigma` px: slow blotches, which fold into every period, would make the difference
    noisy). A grid on the 8 / 16 px lattice scores about its (high-passed) power; unevenness that is
    not tied to the grid scores about 0 on average (either sign on one image); a flat wall 0. None
    when a phase has under `min_per_phase` pixels."""
    img, reg = _one_image_and_region(image, region, "grid_excess")
    if not controls or period in controls:
        raise InputError(f"grid_excess: controls {list(controls)} must be non-empty periods other than {period}")
    lum = _luminance(img)
    lum = lum - _masked_blur(lum, reg, highpass_sigma)
    on = _fold_variance(lum, reg, period, min_per_phase)
    off = [_fold_variance(lum, reg, p, min_per_phase) for p in controls]
    if on is None or any(v is None for v in off):
        return None
    return on - float(np.mean(off))


def wall_unevenness(image, truth, region) -> float | None:
    """Standard deviation of the luminance difference image - truth over `region`, after removing its
    mean (0..1 units): 0 when the image is the truth up to an even change of brightness; blotches,
    casts that vary across the wall, and grid lines all raise it. None for an empty region."""
    img, reg = _one_image_and_region(image, region, "wall_unevenness")
    tru, _ = _one_image_and_region(truth, region, "wall_unevenness")
    d = (_luminance(img) - _luminance(tru))[reg]
    return None if d.size == 0 else float(d.std())


def wall_tone_mix(image, region, tones: Mapping[str, Sequence[float]], blur_sigma: float = 3.0) -> float | None:
    """How much of a plain wall is drawn in a tone other than its main one: each region pixel's colour,
    blurred over the region (`blur_sigma` px, so noise and a grid do not count), goes to the nearest of
    `tones` (name -> 0..255 RGB: the shades the wall's named colour may take, e.g.
    synthetic.wall_tone_colours; CIELAB); returns 1 - the largest share. 0 for a wall in one tone
    (right or wrong); 0.5 for two tones half and half. A model that must pick a tone no input names
    and mixes them scores high here, and its blotches score in grid_energy and wall_unevenness too.
    None for an empty region or fewer than two tones."""
    img, reg = _one_image_and_region(image, region, "wall_tone_mix")
    if len(tones) < 2 or not reg.any():
        return None
    blurred = np.stack([_masked_blur(img[..., c], reg, blur_sigma) for c in range(3)], axis=-1)
    lab = srgb_to_lab(np.array([tones[n] for n in tones], np.float64))
    nearest = np.argmin(np.linalg.norm(srgb_to_lab(blurred[reg] * 255.0)[:, None, :] - lab[None], axis=2), axis=1)
    return float(1.0 - np.bincount(nearest, minlength=len(lab)).max() / nearest.size)


#: What train.evaluate and train.grid_probe measure on a wall that is plain in the ground truth.
PLAIN_WALL_MEASURES = ("grid_energy", "grid_excess", "wall_unevenness")


def plain_wall_measures(image, truth, region) -> dict[str, float | None]:
    """PLAIN_WALL_MEASURES of `image` on `region`, a wall that is plain in `truth`."""
    return {"grid_energy": grid_energy(image, region), "grid_excess": grid_excess(image, region),
            "wall_unevenness": wall_unevenness(image, truth, region)}


def top_surface_iou(image, truth_region, domain, colours: Mapping[str, Sequence[float]],
                    surface: str | Sequence[str]) -> float | None:
    """IoU of the pixels drawn in the `surface` colour(s) with where the ground truth has that
    surface, within `domain` (e.g. a box around a stand's top, minus the product and its shadow).
    Each domain pixel goes to the nearest of `colours` (name -> 0..255 RGB, the scene's own
    surfaces: stand top, stand front, wall, ...; CIELAB); `surface` names one or more of them.
    None for an empty union."""
    x, single = _images(image, "image")
    t, _ = _masks(truth_region, "truth_region")
    d, _ = _masks(domain, "domain")
    if not single:
        raise InputError("top_surface_iou takes one image")
    _same_hw("image", x, "truth_region", t)
    _same_hw("image", x, "domain", d)
    wanted = [surface] if isinstance(surface, str) else list(surface)
    missing = [n for n in wanted if n not in colours]
    if missing:
        raise InputError(f"surface {missing} not among the colours {list(colours)}")
    names = list(colours)
    lab = srgb_to_lab(np.array([colours[n] for n in names], np.float64))
    dom = d[0]
    px = srgb_to_lab(x[0][dom] * 255.0)
    nearest = np.argmin(np.linalg.norm(px[:, None, :] - lab[None], axis=2), axis=1)
    drawn = np.zeros_like(dom)
    drawn[dom] = np.isin(nearest, [names.index(n) for n in wanted])
    true = t[0] & dom
    union = int((drawn | true).sum())
    return None if union == 0 else float((drawn & true).sum() / union)


# ----------------------------------------------------------------------------- image-quality proxy


def palette_fit(image, palette: Mapping[str, Sequence[int]], region=None, tolerance: float = 0.1,
                shade: tuple[float, float] = (0.4, 1.25), tint: float = 0.35):
    """Image-quality proxy for palette-drawn scenes (not IR / PickScore): how much of the
    image is made of colours a synthetic scene can contain.

    Per pixel, d = distance (0..1 RGB units) to the nearest "palette line": for each palette
    colour c, the shades {k c : k in shade} (shadows, shading, darker pattern tints) and the
    tints {c + t (1 - c) : 0 <= t <= tint} (lighter pattern tints, glows). Score = mean over
    the region of max(0, 1 - d / tolerance): 1 when every pixel is a clean scene colour,
    lower for noise, washed-out or off-palette colours and broad blur between areas.
    Ground-truth synthetic scenes score about 0.92-1 (mean ~0.99).
    """
    x, single = _images(image, "image")
    if region is None:
        r = np.ones(x.shape[:3], bool)
    else:
        r, _ = _masks(region, "region")
        _same_hw("image", x, "region", r)
    x, r = _batch(x, r)
    _, cols = _palette_array(palette)
    vals = []
    for i in range(x.shape[0]):
        px = x[i][r[i]]
        if px.shape[0] == 0:
            vals.append(math.nan)
            continue
        best = np.full(px.shape[0], np.inf)
        for c in cols:
            best = np.minimum(best, shade_distance(px, c, shade))
            # tint segment from c to c + tint (1 - c)
            direction = tint * (1.0 - c)
            dd = max(float(direction @ direction), 1e-12)
            t = np.clip((px - c) @ direction / dd, 0.0, 1.0)
            best = np.minimum(best, np.linalg.norm(px - (c + t[:, None] * direction), axis=1))
        vals.append(float(np.clip(1.0 - best / tolerance, 0.0, 1.0).mean()))
    return _out(np.array(vals), single)


# ----------------------------------------------------------------------------- comparing two runs


def paired_difference(a: Sequence[float | bool | None], b: Sequence[float | bool | None], *,
                      confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """Paired comparison of two runs on the same items (``a[i]`` and ``b[i]`` from item i).

    Items where either value is None or NaN are left out; booleans count as 0/1. Returns None
    when no item has both, else ``{"n", "mean_difference" (b - a), "ci": [low, high]`` (a
    percentile bootstrap over items, ``confidence`` level, fixed ``seed``), ``"b_ahead",
    "a_ahead"`` (shares of items where b > a, a > b)}``. The interval is what makes "clearly
    higher" a measured claim: it excludes 0 only when the gain is larger than the spread
    between items would produce by chance.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs one value per item in both runs, got {len(a)} and {len(b)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")
    d = np.array([float(y) - float(x) for x, y in zip(a, b) if _usable(x) and _usable(y)], np.float64)
    if d.size == 0:
        return None
    low, high = _bootstrap_interval(d, confidence, resamples, seed)
    return {"n": int(d.size), "mean_difference": float(d.mean()), "ci": [low, high],
            "confidence": confidence, "b_ahead": float((d > 0).mean()), "a_ahead": float((d < 0).mean())}


def _usable(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _bootstrap_interval(values: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """The percentile-bootstrap interval of the mean of `values` (resampled over items, seeded)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float | bool | None], *, confidence: float = 0.95, resamples: int = 2000,
                  seed: int = 0) -> dict[str, Any] | None:
    """The mean of one run's values over items (None / NaN left out, booleans as 0/1: a rate) with its
    percentile-bootstrap interval, as paired_difference draws it: ``{"n", "mean", "ci": [low, high],
    "confidence"}``; None without a usable value."""
    if not 0.0 < confidence < 1.0 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1, got {confidence!r}, {resamples!r}")
    v = np.array([float(x) for x in values if _usable(x)], np.float64)
    if v.size == 0:
        return None
    low, high = _bootstrap_interval(v, confidence, resamples, seed)
    return {"n": int(v.size), "mean": float(v.mean()), "ci": [low, high], "confidence": confidence}


# ----------------------------------------------------------------------------- CLIP


def composite(product, mask, background) -> torch.Tensor:
    """The product (where mask) over the background resized (cover + centre crop) to the
    product's size: [B, H, W, 3] float 0..1 (the paper's CLIP-I composite)."""
    x, _ = _images(product, "product")
    m, _ = _masks(mask, "mask")
    y, _ = _images(background, "background")
    _same_hw("product", x, "mask", m)
    if y.shape[1:3] != x.shape[1:3]:
        y = resize_cover(torch.from_numpy(y).float(), x.shape[2], x.shape[1]).double().numpy()
    x, m, y = _batch(x, m, y)
    return torch.from_numpy(np.where(m[..., None], x, y).astype(np.float32))


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """CLIP-T and CLIP-I from a local CLIP folder (transformers' CLIPModel; no network).

    model_path: a folder saved with save_pretrained (config.json + weights) holding the
    tokenizer too (needed for CLIP-T only). Preprocessing follows CLIPImageProcessor:
    shortest side resized to the vision tower's image_size (bicubic, antialiased), centre
    crop, normalised with the folder's preprocessor_config.json mean/std when present,
    else OpenAI CLIP's. Scores are raw cosines of the projected, L2-normalised embeddings.
    """

    def __init__(self, model_path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        try:
            from transformers import CLIPModel
        except ImportError as e:  # pragma: no cover - transformers is a dependency
            raise MissingDependencyError(f"ClipScorer needs transformers ({e}): pip install transformers") from None
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise InputError(f"CLIP model folder {path} has no config.json (save one with CLIPModel.save_pretrained)")
        self.path = path
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(self.device, dtype).eval()
        self.dtype = dtype
        vcfg = self.model.config.vision_config
        self.image_size = int(vcfg.image_size)
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        crop = self.image_size
        pp = path / "preprocessor_config.json"
        if pp.is_file():
            cfg = json.loads(pp.read_text(encoding="utf-8"))
            self.mean = tuple(cfg.get("image_mean", self.mean))
            self.std = tuple(cfg.get("image_std", self.std))
            cs = cfg.get("crop_size")
            crop = int(cs.get("height", crop) if isinstance(cs, dict) else (cs or crop))
        self.crop = crop
        self._tokenizer = None
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            except (OSError, ValueError) as e:
                raise InputError(f"CLIP folder {self.path} has no usable tokenizer ({e}); CLIP-T needs one "
                                 "(save it next to the model with tokenizer.save_pretrained)") from None
        return self._tokenizer

    def preprocess(self, images) -> torch.Tensor:
        x, _ = _images(images, "images")
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        h, w = t.shape[-2:]
        scale = self.image_size / min(h, w)
        nh, nw = max(self.crop, round(h * scale)), max(self.crop, round(w * scale))
        t = F.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        t = t[:, :, top : top + self.crop, left : left + self.crop]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((t - mean) / std).to(self.device, self.dtype)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 4 returns the projected tensor; 5 a model output with it in pooler_output.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        f = self._features(self.model.get_image_features(pixel_values=self.preprocess(images)))
        return F.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str] | None = None, input_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of prompts (tokenised here), or of pre-tokenised input_ids."""
        if input_ids is None:
            if prompts is None:
                raise InputError("text_embeds needs prompts or input_ids")
            enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            input_ids, attention_mask = enc["input_ids"], enc.get("attention_mask")
        kwargs = {"input_ids": input_ids.to(self.device)}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        f = self._features(self.model.get_text_features(**kwargs))
        return F.normalize(f.float(), dim=-1)

    def clip_t(self, images, prompts: Sequence[str] | str | None = None, **token_kw) -> np.ndarray:
        """CLIP-T per image: cos(image, its prompt). One prompt or one per image."""
        img = self.image_embeds(images)
        if isinstance(prompts, str):
            prompts = [prompts]
        txt = self.text_embeds(prompts, **token_kw)
        if txt.shape[0] == 1:
            txt = txt.expand(img.shape[0], -1)
        if txt.shape[0] != img.shape[0]:
            raise InputError(f"{txt.shape[0]} prompts for {img.shape[0]} images; give 1 or one per image")
        return (img * txt).sum(-1).cpu().numpy()

    def clip_i(self, images, references) -> np.ndarray:
        """cos(image, reference) per image (references: 1 or one per image, any size)."""
        a = self.image_embeds(images)
        b = self.image_embeds(references)
        if b.shape[0] == 1:
            b = b.expand(a.shape[0], -1)
        return (a * b).sum(-1).cpu().numpy()

    def clip_i_composited(self, images, reference, product, mask) -> np.ndarray:
        """The paper's CLIP-I: cos(generated image, reference with the product composited on it)."""
        return self.clip_i(images, composite(product, mask, reference))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: byte -> printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_clip(out_dir, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIP folder (model + byte-level BPE tokenizer + preprocessor config),
    built offline, to exercise ClipScorer's code path (tests, CI). Scores are meaningless.

    The tokenizer's vocabulary is the 256 byte-level characters, each also with the "</w>"
    end-of-word suffix, plus <|startoftext|> / <|endoftext|>, and no merges: every word is
    spelled out character by character, any text (Chinese too) tokenises without [UNK].
    """
    import inspect

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    tok_dir = out / ".tokenizer_src"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    params = inspect.signature(CLIPTokenizer.__init__).parameters
    if "vocab_file" in params:  # transformers 4
        tok = CLIPTokenizer(vocab_file=str(tok_dir / "vocab.json"), merges_file=str(tok_dir / "merges.txt"))
    else:  # transformers 5
        tok = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}, indent=2), encoding="utf-8")
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out
