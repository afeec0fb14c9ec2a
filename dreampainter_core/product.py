"""Product placement on the canvas, paste-back of the exact product pixels, seam colour match.

Layouts follow ComfyUI: IMAGE float32 [B, H, W, 3] in 0..1, MASK float32 [B, H, W], 1 = product.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import torch

from . import masks
from .errors import InputError
from .images import as_image_batch, as_mask_batch, check_product_and_mask

__all__ = ["PLACEMENTS", "SOURCE_MARGIN", "place_product", "paste_back", "match_color"]

PLACEMENTS = ("keep", "center")

# place_product(return_source=True): how far (in canvas pixels) the photo's real pixels reach
# past the product in "center" mode. Covers paste_back feathers up to this radius.
SOURCE_MARGIN = 32


# ----------------------------------------------------------------------------- helpers


def _whole_number(value, what: str, minimum: int) -> int:
    if not masks._is_whole(value) or value < minimum:
        raise InputError(f"{what}: expected a whole number of pixels >= {minimum}, got {value!r}.")
    return int(value)


def normalize_box_ratio(box_ratio) -> tuple[float, float]:
    """(height ratio, width ratio), each in (0, 1]; InputError otherwise."""
    try:
        rh, rw = (float(v) for v in box_ratio)
    except (TypeError, ValueError):
        raise InputError(f"box_ratio: expected two numbers (height ratio, width ratio), got {box_ratio!r}.") from None
    if not (0.0 < rh <= 1.0 and 0.0 < rw <= 1.0):
        raise InputError(f"box_ratio: both ratios must be in (0, 1], got ({rh}, {rw}); the paper uses (0.6, 0.6).")
    return rh, rw


def _fill_color(fill, device) -> torch.Tensor:
    """fill as a [3] tensor: one gray level or an (r, g, b) triple, all in 0..1."""
    values = [fill] * 3 if isinstance(fill, numbers.Real) and not isinstance(fill, bool) else fill
    try:
        rgb = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"fill: expected a gray level or an (r, g, b) triple in 0..1, got {fill!r}.") from None
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        raise InputError(f"fill: expected a gray level or an (r, g, b) triple in 0..1, got {fill!r}.")
    return torch.tensor(rgb, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class _Axis:
    """One axis of a placement: source pixels [start, stop) are scaled to `size` canvas pixels
    starting at canvas pixel `offset`. In pixel-edge coordinates, canvas position c maps to
    source position start + (c - offset) * ratio; everything placed (product, mask, source
    photo) is resampled through this one map, so they line up to the sub-pixel.
    """

    start: int
    stop: int
    size: int
    offset: int

    @property
    def ratio(self) -> Fraction:
        """Source pixels per canvas pixel (exact)."""
        return Fraction(self.stop - self.start, self.size)

    def widened(self, canvas_px: int, limit: int) -> tuple[int, int]:
        """The source interval grown by enough pixels to cover canvas_px canvas pixels on each
        side, clipped to the photo [0, limit)."""
        margin = math.ceil(canvas_px * self.ratio)
        return max(0, self.start - margin), min(limit, self.stop + margin)

    def covered(self, lo: int, hi: int, length: int) -> tuple[int, int]:
        """Canvas pixels [first, stop) whose centres map into source [lo, hi], clipped to the canvas."""
        half = Fraction(1, 2)
        first = math.ceil(self.offset + (lo - self.start) / self.ratio - half)
        last = math.floor(self.offset + (hi - self.start) / self.ratio - half)
        return max(first, 0), min(last + 1, length)

    def taps(self, first: int, stop: int, lo: int, hi: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Resampling taps for canvas pixels [first, stop) from source pixels [lo, hi).

        The filter of F.interpolate(mode="bilinear", antialias=True, align_corners=False):
        a triangle as wide as max(ratio, 1) source pixels around each canvas pixel's centre,
        truncated to [lo, hi) and renormalized. Returns (index [n, k] into the source slice
        [lo, hi), weights [n, k] float32); at ratio 1 on whole pixels it is the identity.
        """
        ratio = float(self.ratio)
        support = max(ratio, 1.0)
        centre = self.start + (torch.arange(first, stop, dtype=torch.float64) + 0.5 - self.offset) * ratio
        j = torch.floor(centre - support + 0.5).to(torch.int64).unsqueeze(1) + torch.arange(math.ceil(2 * support) + 1)
        weight = (1.0 - ((j + 0.5 - centre.unsqueeze(1)) / support).abs()).clamp_min(0.0)
        weight = torch.where((j >= lo) & (j < hi), weight, torch.zeros(()))
        weight = weight / weight.sum(dim=1, keepdim=True)  # > 0: every centre lies in [lo, hi]
        used = weight.ne(0).any(dim=0)  # drop tap columns that are zero for every pixel
        index = (j[:, used].clamp(lo, hi - 1) - lo).to(device)
        return index, weight[:, used].to(device=device, dtype=torch.float32)


def _resample_axis(x: torch.Tensor, dim: int, axis: _Axis, out: tuple[int, int], src: tuple[int, int]) -> torch.Tensor:
    """Resample x [B, H, W, C] (holding source pixels src = [lo, hi) along dim, 1 or 2) to the
    canvas pixels out = [first, stop) of `axis`: out[i] = sum_k weight[i, k] * x[index[i, k]]."""
    (first, stop), (lo, hi) = out, src
    if axis.size == axis.stop - axis.start:  # scale 1 on whole pixels: a plain (bit-exact) slice
        return x.narrow(dim, first - axis.offset + axis.start - lo, stop - first)
    index, weight = axis.taps(first, stop, lo, hi, x.device)
    shape = [1, 1, 1, 1]
    shape[dim] = -1
    result = None
    for k in range(index.shape[1]):
        term = x.index_select(dim, index[:, k]) * weight[:, k].view(shape)
        result = term if result is None else result.add_(term)
    return result


def _render(image: torch.Tensor, ay: _Axis, ax: _Axis, rows: tuple[int, int], cols: tuple[int, int],
            height: int, width: int):
    """Resample source rows x cols of image [B, h, w, C] through the placement (ay, ax).

    Returns (pixels, (top, bottom), (left, right)): pixels go at canvas [top:bottom, left:right],
    the canvas pixels whose centres fall inside the source rectangle.
    """
    out_rows, out_cols = ay.covered(*rows, height), ax.covered(*cols, width)
    x = image[:, rows[0] : rows[1], cols[0] : cols[1]]
    # The filter is separable, so the order is free: take the one with the smaller intermediate.
    if (out_rows[1] - out_rows[0]) * x.shape[2] <= x.shape[1] * (out_cols[1] - out_cols[0]):
        x = _resample_axis(_resample_axis(x, 1, ay, out_rows, rows), 2, ax, out_cols, cols)
    else:
        x = _resample_axis(_resample_axis(x, 2, ax, out_cols, cols), 1, ay, out_rows, rows)
    return x, out_rows, out_cols


def _layouts(binary: torch.Tensor, placement: str, width: int, height: int, box_ratio) -> list:
    """The placement geometry, computed once: [(batch items, row axis, column axis)].

    "keep" is one layout for the whole batch (the whole photo); "center" one per item (its
    mask bounding box).
    """
    batch, src_h, src_w = binary.shape
    if placement == "keep":
        scale = min(width / src_w, height / src_h)
        new_w = min(width, max(1, round(src_w * scale)))
        new_h = min(height, max(1, round(src_h * scale)))
        ay = _Axis(0, src_h, new_h, (height - new_h) // 2)
        ax = _Axis(0, src_w, new_w, (width - new_w) // 2)
        return [(slice(None), ay, ax)]
    box_h, box_w = box_ratio[0] * height, box_ratio[1] * width
    layouts = []
    for i in range(batch):
        rows = torch.nonzero(binary[i].any(dim=1)).flatten()
        cols = torch.nonzero(binary[i].any(dim=0)).flatten()
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        crop_h, crop_w = y1 - y0, x1 - x0
        scale = min(box_h / crop_h, box_w / crop_w)
        # floor (with slack for float error) keeps the product inside the box.
        new_h = max(1, math.floor(crop_h * scale + 1e-6))
        new_w = max(1, math.floor(crop_w * scale + 1e-6))
        ay = _Axis(y0, y1, new_h, (height - new_h) // 2)
        ax = _Axis(x0, x1, new_w, (width - new_w) // 2)
        layouts.append((slice(i, i + 1), ay, ax))
    return layouts


def _require_product_left(mask: torch.Tensor, width: int, height: int) -> None:
    for i, count in enumerate((mask > 0.5).flatten(1).sum(dim=1).tolist()):
        if count == 0:
            raise InputError(
                f"mask for image {i} is empty after resizing to {width}x{height}: the product is too "
                "small to survive the resize; use a larger canvas or placement='center'."
            )


def _match_batches(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Broadcast batch size 1 to the common batch size, or raise."""
    sizes = {t.shape[0] for t in tensors.values()}
    batch = max(sizes)
    if sizes - {1, batch}:
        listing = ", ".join(f"{name}: {t.shape[0]}" for name, t in tensors.items())
        raise InputError(f"batch sizes do not match ({listing}); give equal batches or a batch of 1.")
    return [t.expand(batch, *t.shape[1:]) if t.shape[0] != batch else t for t in tensors.values()]


def _composite_inputs(generated, foreground, mask, source=None):
    """Converted, size-checked and batch-matched [generated, foreground, mask] (+ source if given)."""
    generated = as_image_batch(generated, "generated")
    tensors = {
        "generated": generated,
        "foreground": as_image_batch(foreground, "foreground").to(generated.device),
        "mask": as_mask_batch(mask, "mask").to(generated.device),
    }
    if source is not None:
        tensors["source"] = as_image_batch(source, "source").to(generated.device)
    sizes = {name: tuple(t.shape[1:3]) for name, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{name} {w}x{h}" for name, (h, w) in sizes.items())
        raise InputError(
            f"image sizes differ ({listing}, WxH); {', '.join(sizes)} must have the same "
            "size: generate at the size of the placed product, or resize before compositing."
        )
    return _match_batches(tensors)


# ----------------------------------------------------------------------------- public API


def place_product(product, mask, width, height, placement="keep", box_ratio=(0.6, 0.6), fill=1.0,
                  return_source=False, return_matte=False):
    """Put the product on a width x height canvas: (foreground [B, height, width, 3], mask [B, height, width]),
    plus source [B, height, width, 3] when return_source is True.

    placement:
      "keep"   the product photo is the canvas. At the same size nothing is resampled
               (product pixels unchanged). Otherwise the photo is scaled uniformly to fit
               inside the canvas ("contain") and centred; the margins are background.
      "center" the paper's evaluation protocol: each item's mask bounding box is cropped,
               scaled uniformly (up or down) to fit inside a box of box_ratio[0] * height
               by box_ratio[1] * width, and pasted centred on the canvas.
    In both, every pixel outside the returned mask is set to `fill` (a gray level or an
    (r, g, b) triple; white by default, the e-commerce convention: the model sees the
    product on blank). Images are resampled with antialiased bilinear filtering (the filter
    of F.interpolate(antialias=True); mask-premultiplied, so no old background bleeds into
    the product's edge); the mask with the same filter, then thresholded at 0.5, so the
    returned mask is binary.

    source: the product photo itself placed with the same geometry (same scale and
    sub-pixel offset per item), neither premultiplied nor filled: around the product it
    holds the photo's real pixels (the product's anti-aliased edge that a tight mask cut
    off), for paste_back(..., source=source) to blend instead of `fill`. "keep": the whole
    photo (equal to it at the same size), margins `fill`. "center": the bounding box plus
    at least SOURCE_MARGIN canvas pixels of photo around it (as far as the photo reaches),
    `fill` beyond. On the mask it equals `foreground` exactly.

    matte (return_matte): the mask as given (soft, e.g. an auto mask's alpha), placed with the
    source geometry, [B, height, width] in 0..1: for paste_back(..., matte=matte), which
    composites the soft edge with its backdrop colour removed. Returned last.
    Inputs are anything check_product_and_mask accepts.
    """
    product, mask = check_product_and_mask(product, mask)
    width = _whole_number(width, "width", 1)
    height = _whole_number(height, "height", 1)
    if placement not in PLACEMENTS:
        raise InputError(f"placement: expected one of {', '.join(PLACEMENTS)}, got {placement!r}.")
    box = normalize_box_ratio(box_ratio)
    fill_rgb = _fill_color(fill, product.device)
    binary = masks.binarize(mask)
    batch, src_h, src_w = binary.shape

    canvas = fill_rgb.expand(batch, height, width, 3).clone()
    canvas_mask = torch.zeros(batch, height, width, dtype=torch.float32, device=product.device)
    source = canvas.clone() if return_source or return_matte else None
    matte = torch.zeros_like(canvas_mask) if return_matte else None
    soft = mask.clamp(0.0, 1.0).unsqueeze(-1)
    # colour premultiplied by the mask, and the mask: resampled together, divided back below.
    planes = torch.cat([product * binary.unsqueeze(-1), binary.unsqueeze(-1)], dim=-1)

    for items, ay, ax in _layouts(binary, placement, width, height, box):
        placed, (top, bottom), (left, right) = _render(
            planes[items], ay, ax, (ay.start, ay.stop), (ax.start, ax.stop), height, width
        )
        coverage = placed[..., 3:]
        colour = (placed[..., :3] / coverage.clamp_min(1e-6)).clamp(0.0, 1.0)
        canvas[items, top:bottom, left:right] = colour
        canvas_mask[items, top:bottom, left:right] = (coverage[..., 0] > 0.5).to(torch.float32)
        if source is not None:
            planes_in = product[items] if matte is None else torch.cat([product[items], soft[items]], dim=-1)
            photo, (top, bottom), (left, right) = _render(
                planes_in, ay, ax, ay.widened(SOURCE_MARGIN, src_h), ax.widened(SOURCE_MARGIN, src_w),
                height, width,
            )
            source[items, top:bottom, left:right] = photo[..., :3].clamp(0.0, 1.0)
            if matte is not None:
                matte[items, top:bottom, left:right] = photo[..., 3].clamp(0.0, 1.0)

    _require_product_left(canvas_mask, width, height)
    on_product = canvas_mask.unsqueeze(-1) > 0.5
    foreground = torch.where(on_product, canvas, fill_rgb)
    out = [foreground, canvas_mask]
    if return_source:
        out.append(torch.where(on_product, foreground, source))
    if return_matte:
        out.append(matte)
    return tuple(out)


def paste_back(generated, foreground, mask, feather=0, source=None, matte=None):
    """Composite the exact product over the generated image: [B, H, W, 3].

    alpha = masks.feather(mask, feather); out = alpha * surround + (1 - alpha) * generated,
    where surround is `source` when given (place_product(..., return_source=True): the
    photo's real pixels around the product, so the feather ramp blends the product's true
    edge into the generated image) and `foreground` otherwise (outside the mask that is the
    fill colour, which shows as a halo of that colour). Wherever the binarized mask is 1 the
    output is `foreground` bit for bit. A batch of 1 in any input is broadcast to the others'.

    matte (a soft mask [B, H, W] in 0..1, e.g. place_product(..., return_matte=True) of an auto
    mask's alpha): colour decontamination. The soft edge is composited as
    out = matte * F + (1 - matte) * generated, F the surround's foreground colour under the matte
    (edges.estimate_foreground), so the old backdrop mixed into edge pixels does not come along
    as a light fringe; the matte replaces the feather. Where the matte is 1 on the mask the
    output is `foreground` bit for bit.
    """
    generated, foreground, mask, *rest = _composite_inputs(generated, foreground, mask, source)
    surround = rest[0] if rest else foreground
    if matte is not None:
        from .edges import estimate_foreground

        matte = as_mask_batch(matte, "matte").to(generated.device)
        if tuple(matte.shape[1:]) != tuple(mask.shape[1:]):
            raise InputError(f"matte is {matte.shape[2]}x{matte.shape[1]} but the mask is {mask.shape[2]}x{mask.shape[1]} "
                             "(WxH); give the soft mask at the canvas size (place_product(..., return_matte=True))")
        matte = _match_batches({"generated": generated, "matte": matte})[1].clamp(0.0, 1.0)
        a = matte.unsqueeze(-1)
        blended = a * estimate_foreground(surround, matte) + (1.0 - a) * generated
        exact = (masks.binarize(mask).unsqueeze(-1) > 0.5) & (a >= 1.0)
        return torch.where(exact, foreground, blended).contiguous()
    alpha = masks.feather(mask, feather).unsqueeze(-1)
    blended = alpha * surround + (1.0 - alpha) * generated
    # torch.where makes bit-identity a guarantee rather than a property of float rounding.
    return torch.where(masks.binarize(mask).unsqueeze(-1) > 0.5, foreground, blended).contiguous()


def match_color(generated, foreground, mask, ring=8):
    """Seam colour match: pull the generated image's colours near the product towards the
    real product's, so the pasted product does not sit on a visibly shifted surround.

    Per item and channel, an affine map (mean and std) is fitted on the inner edge ring
    (mask pixels within `ring` px of the background) that takes the generated image's
    version of the product edge to the real product edge in `foreground`. It is applied
    to the generated image with weight 1 on the mask, fading linearly to 0 at `ring` px
    outside it (masks.feather), so distant background is untouched. The std ratio is
    limited to 0.5..2 against noisy fits. ring 0 returns `generated` (clamped to 0..1).
    """
    generated, foreground, mask = _composite_inputs(generated, foreground, mask)
    ring = _whole_number(ring, "ring", 0)
    out = generated.clone()
    if ring == 0:
        return out.clamp(0.0, 1.0)
    binary = masks.binarize(mask)
    edge_ring = (binary - masks.erode(binary, 2 * ring + 1)) > 0.5
    weight = masks.feather(binary, ring).unsqueeze(-1)
    eps = 1e-3
    for i in range(out.shape[0]):
        if int(edge_ring[i].sum()) < 2:
            continue  # too few pixels to fit an affine map
        gen_edge, fg_edge = generated[i][edge_ring[i]], foreground[i][edge_ring[i]]
        gen_mean, fg_mean = gen_edge.mean(dim=0), fg_edge.mean(dim=0)
        scale = ((fg_edge.std(dim=0) + eps) / (gen_edge.std(dim=0) + eps)).clamp(0.5, 2.0)
        corrected = (generated[i] - gen_mean) * scale + fg_mean
        out[i] = generated[i] + weight[i] * (corrected - generated[i])
    return out.clamp(0.0, 1.0)
