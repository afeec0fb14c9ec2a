"""Aspect-ratio buckets and the image/reference geometry used for training.

Stage 1 trains at 800x800 and 1024x1024 (paper, training details); product photos come in
many shapes, so each base size gets a set of aspect-ratio buckets of about the same area,
sides divisible by 32 (VAE /8 x patch 2, with room for the 2x2 token grid). A batch holds
one bucket so the tensors stack. Stage 2 references are "randomly resized and cropped
(512x512, 800x800)" and "randomly shifted spatially": random_reference_crop + random_shift.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_RATIOS",
    "make_buckets",
    "assign_bucket",
    "resize_crop_to_bucket",
    "random_reference_crop",
    "random_shift",
]

DEFAULT_RATIOS = ("1:1", "3:4", "4:3", "2:3", "3:2", "9:16", "16:9")


def _ratio(r) -> float:
    if isinstance(r, str):
        a, sep, b = r.partition(":")
        if not sep:
            return float(r)
        return float(a) / float(b)
    if isinstance(r, (tuple, list)):
        return float(r[0]) / float(r[1])
    return float(r)


def _fit(base: float, ratio: float, step: int, max_pixels: int | None) -> tuple[int, int]:
    """Best (w, h) multiple of `step` for a width/height ratio and area base^2."""
    # Solve the landscape form and transpose, so 2:3 and 3:2 are exact mirrors.
    flip = ratio < 1.0
    r = 1.0 / ratio if flip else ratio
    target = base * base
    if max_pixels is not None:
        target = min(target, float(max_pixels))
    w0, h0 = math.sqrt(target * r), math.sqrt(target / r)
    best = None
    for w in range(max(step, (int(w0) // step - 2) * step), (int(w0) // step + 3) * step + 1, step):
        for h in range(max(step, (int(h0) // step - 2) * step), (int(h0) // step + 3) * step + 1, step):
            if max_pixels is not None and w * h > max_pixels:
                continue
            # Aspect error weighs double: a wrong shape crops the product, a few % of area does not.
            score = 2.0 * abs(math.log(w / h / r)) + abs(math.log(w * h / target))
            if best is None or score < best[0]:
                best = (score, w, h)
    if best is None:
        raise ValueError(f"no {step}-aligned bucket for ratio {ratio:.3f} fits max_pixels={max_pixels}")
    _, w, h = best
    return (h, w) if flip else (w, h)


def make_buckets(
    base_sizes: Iterable[int] = (800, 1024),
    step: int = 32,
    ratios: Iterable = DEFAULT_RATIOS,
    max_pixels: int | None = None,
) -> list[tuple[int, int]]:
    """(width, height) buckets, sides divisible by `step`, area close to base^2 for each base.

    ratios: "w:h" strings, (w, h) pairs or floats (width / height). max_pixels caps the
    area (e.g. for memory); a bucket above it is refitted at the capped area.
    Sorted by area then aspect, duplicates removed.
    """
    out = set()
    for base in base_sizes:
        for r in ratios:
            out.add(_fit(float(base), _ratio(r), int(step), max_pixels))
    return sorted(out, key=lambda wh: (wh[0] * wh[1], wh[0] / wh[1]))


def assign_bucket(
    w: int, h: int, buckets: Sequence[tuple[int, int]], aspect_tol: float = 0.03
) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (log scale), then the closest area.

    Buckets whose aspect is within `aspect_tol` (log units) of the best count as the same
    shape: rounding to 32 makes e.g. 3:4 at 800 and at 1024 differ slightly, and the
    area should decide between them, not that rounding noise.
    """
    if not buckets:
        raise ValueError("no buckets given")
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {w}x{h} is empty")
    a = math.log(w / h)
    errs = [abs(math.log(bw / bh) - a) for bw, bh in buckets]
    best = min(errs)
    same_shape = [b for b, e in zip(buckets, errs) if e <= best + aspect_tol]
    area = math.log(w * h)
    return min(same_shape, key=lambda b: (abs(math.log(b[0] * b[1]) - area), b))


def _as_mask_image(mask) -> Image.Image:
    if isinstance(mask, Image.Image):
        return mask if mask.mode == "L" else mask.convert("L")
    a = np.asarray(mask)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    return Image.fromarray(a.astype(np.uint8))


def resize_crop_to_bucket(
    image: Image.Image,
    mask=None,
    bucket: tuple[int, int] = (1024, 1024),
    keep_mask: bool = True,
) -> tuple[Image.Image, Image.Image | None]:
    """Scale to cover the bucket, then crop to it. Returns (RGB image, L mask in {0, 255}).

    The crop is centred, but with keep_mask it is shifted (as little as possible) to keep
    the whole product inside when it fits, so a product near an edge is not cut away.
    The mask is resampled with the same geometry (area-weighted) and re-thresholded at 50%,
    which keeps it binary and avoids the aliasing of plain nearest-neighbour.
    """
    bw, bh = bucket
    W, H = image.size
    scale = max(bw / W, bh / H)
    nw, nh = max(bw, round(W * scale)), max(bh, round(H * scale))
    img = image.convert("RGB").resize((nw, nh), Image.LANCZOS) if (nw, nh) != (W, H) else image.convert("RGB")
    m = None
    if mask is not None:
        m = _as_mask_image(mask)
        if m.size != (W, H):
            raise ValueError(f"mask size {m.size[0]}x{m.size[1]} differs from image {W}x{H}")
        if (nw, nh) != (W, H):
            m = m.resize((nw, nh), Image.BILINEAR)
        m = m.point(lambda v: 255 if v >= 128 else 0)
    x0, y0 = (nw - bw) // 2, (nh - bh) // 2
    if keep_mask and m is not None:
        box = m.getbbox()
        if box is not None:
            l, t, r, b = box
            if r - l <= bw:
                x0 = min(max(x0, r - bw), l)
            if b - t <= bh:
                y0 = min(max(y0, b - bh), t)
            x0, y0 = min(max(x0, 0), nw - bw), min(max(y0, 0), nh - bh)
    crop = (x0, y0, x0 + bw, y0 + bh)
    return img.crop(crop), (m.crop(crop) if m is not None else None)


def random_reference_crop(
    image: Image.Image,
    sizes: Sequence[int] = (512, 800),
    rng: np.random.Generator | None = None,
    scale: tuple[float, float] = (0.5, 1.0),
) -> Image.Image:
    """Random square crop resized to a size drawn from `sizes` (paper: 512 or 800).

    The crop covers a fraction in `scale` of the largest centred square's area, at a random
    position: the reference then never lines up pixel for pixel with the target, so the
    model learns to take its look, not to copy it.
    """
    rng = np.random.default_rng() if rng is None else rng
    size = int(sizes[int(rng.integers(len(sizes)))])
    W, H = image.size
    side = min(W, H) * math.sqrt(rng.uniform(scale[0], scale[1]))
    side = max(1, min(min(W, H), int(round(side))))
    x = int(rng.integers(0, W - side + 1))
    y = int(rng.integers(0, H - side + 1))
    return image.convert("RGB").crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS)


def random_shift(
    image: Image.Image,
    max_frac: float = 0.1,
    rng: np.random.Generator | None = None,
    mode: str = "reflect",
    return_offset: bool = False,
):
    """Shift the content by up to max_frac of each side, padding the gap ("reflect" or "edge").

    Same size out as in. Padding (rather than black) keeps the shift from teaching the model
    that references have borders. With return_offset, returns (image, (dx, dy)) in pixels.
    """
    if mode not in ("reflect", "edge", "symmetric"):
        raise ValueError(f"mode must be reflect, edge or symmetric, got {mode!r}")
    rng = np.random.default_rng() if rng is None else rng
    max_frac = min(max(float(max_frac), 0.0), 0.5)
    a = np.asarray(image.convert("RGB"))
    H, W = a.shape[:2]
    dx = int(round(rng.uniform(-max_frac, max_frac) * W))
    dy = int(round(rng.uniform(-max_frac, max_frac) * H))
    if dx == 0 and dy == 0:
        out = Image.fromarray(a.copy())
    else:
        pad = ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0))
        p = np.pad(a, pad, mode=mode)
        y0, x0 = max(-dy, 0), max(-dx, 0)
        out = Image.fromarray(np.ascontiguousarray(p[y0 : y0 + H, x0 : x0 + W]))
    return (out, (dx, dy)) if return_offset else out
