"""Product placement on the canvas, paste-back of the exact product pixels, seam colour match.

Layouts follow ComfyUI: IMAGE float32 [B, H, W, 3] in 0..1, MASK float32 [B, H, W], 1 = product.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import masks
from .errors import InputError
from .images import as_image_batch, as_mask_batch, check_product_and_mask

__all__ = ["PLACEMENTS", "place_product", "paste_back", "match_color"]

PLACEMENTS = ("keep", "center")


# ----------------------------------------------------------------------------- helpers


def _whole_number(value, what: str, minimum: int) -> int:
    if not masks._is_whole(value) or value < minimum:
        raise InputError(f"{what}: expected a whole number of pixels >= {minimum}, got {value!r}.")
    return int(value)


def _box_ratio(box_ratio) -> tuple[float, float]:
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


def _resize_product(image: torch.Tensor, mask: torch.Tensor, height: int, width: int):
    """Resize [B, h, w, 3] + binary [B, h, w] to (height, width); mask re-binarized at 0.5.

    Colours are resized premultiplied by the mask and divided back, so the product's edge
    pixels keep the product colour instead of bleeding in the old background.
    """
    if image.shape[1:3] == (height, width):
        return image, mask  # no resampling: product pixels stay bit-identical
    chw = image.permute(0, 3, 1, 2)
    m = mask.unsqueeze(1)
    resample = dict(size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    premultiplied = F.interpolate(chw * m, **resample)
    coverage = F.interpolate(m, **resample)
    colour = (premultiplied / coverage.clamp_min(1e-6)).clamp(0.0, 1.0)
    return colour.permute(0, 2, 3, 1), (coverage[:, 0] > 0.5).to(torch.float32)


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


def _composite_inputs(generated, foreground, mask):
    generated = as_image_batch(generated, "generated")
    foreground = as_image_batch(foreground, "foreground").to(generated.device)
    mask = as_mask_batch(mask, "mask").to(generated.device)
    sizes = {
        "generated": tuple(generated.shape[1:3]),
        "foreground": tuple(foreground.shape[1:3]),
        "mask": tuple(mask.shape[1:3]),
    }
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{name} {w}x{h}" for name, (h, w) in sizes.items())
        raise InputError(
            f"image sizes differ ({listing}, WxH); generated, foreground and mask must have the same "
            "size: generate at the size of the placed product, or resize before compositing."
        )
    return _match_batches({"generated": generated, "foreground": foreground, "mask": mask})


# ----------------------------------------------------------------------------- public API


def place_product(product, mask, width, height, placement="keep", box_ratio=(0.6, 0.6), fill=1.0):
    """Put the product on a width x height canvas: (foreground [B, height, width, 3], mask [B, height, width]).

    placement:
      "keep"   the product photo is the canvas. At the same size nothing is resampled
               (product pixels unchanged). Otherwise the photo is scaled uniformly to fit
               inside the canvas ("contain") and centred; the margins are background.
      "center" the paper's evaluation protocol: each item's mask bounding box is cropped,
               scaled uniformly (up or down) to fit inside a box of box_ratio[0] * height
               by box_ratio[1] * width, and pasted centred on the canvas.
    In both, every pixel outside the returned mask is set to `fill` (a gray level or an
    (r, g, b) triple; white by default, the e-commerce convention: the model sees the
    product on blank). Images are resampled with antialiased bilinear filtering (mask-
    premultiplied, so no old background bleeds into the product's edge); the mask with
    the same filter, then thresholded at 0.5, so the returned mask is binary.
    Inputs are anything check_product_and_mask accepts.
    """
    product, mask = check_product_and_mask(product, mask)
    width = _whole_number(width, "width", 1)
    height = _whole_number(height, "height", 1)
    if placement not in PLACEMENTS:
        raise InputError(f"placement: expected one of {', '.join(PLACEMENTS)}, got {placement!r}.")
    box_h_ratio, box_w_ratio = _box_ratio(box_ratio)
    fill_rgb = _fill_color(fill, product.device)
    binary = masks.binarize(mask)
    batch, src_h, src_w = binary.shape

    canvas = fill_rgb.expand(batch, height, width, 3).clone()
    canvas_mask = torch.zeros(batch, height, width, dtype=torch.float32, device=product.device)

    if placement == "keep":
        scale = min(width / src_w, height / src_h)
        new_w = min(width, max(1, round(src_w * scale)))
        new_h = min(height, max(1, round(src_h * scale)))
        image, new_mask = _resize_product(product, binary, new_h, new_w)
        top, left = (height - new_h) // 2, (width - new_w) // 2
        canvas[:, top : top + new_h, left : left + new_w] = image
        canvas_mask[:, top : top + new_h, left : left + new_w] = new_mask
    else:
        box_h, box_w = box_h_ratio * height, box_w_ratio * width
        for i in range(batch):
            rows = torch.nonzero(binary[i].any(dim=1)).flatten()
            cols = torch.nonzero(binary[i].any(dim=0)).flatten()
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            crop_h, crop_w = y1 - y0, x1 - x0
            scale = min(box_h / crop_h, box_w / crop_w)
            # floor (with slack for float error) keeps the product inside the box.
            new_h = max(1, math.floor(crop_h * scale + 1e-6))
            new_w = max(1, math.floor(crop_w * scale + 1e-6))
            image, new_mask = _resize_product(
                product[i : i + 1, y0:y1, x0:x1], binary[i : i + 1, y0:y1, x0:x1], new_h, new_w
            )
            top, left = (height - new_h) // 2, (width - new_w) // 2
            canvas[i, top : top + new_h, left : left + new_w] = image[0]
            canvas_mask[i, top : top + new_h, left : left + new_w] = new_mask[0]

    _require_product_left(canvas_mask, width, height)
    foreground = torch.where(canvas_mask.unsqueeze(-1) > 0.5, canvas, fill_rgb)
    return foreground, canvas_mask


def paste_back(generated, foreground, mask, feather=0):
    """Composite the exact product over the generated image: [B, H, W, 3].

    alpha = masks.feather(mask, feather); out = alpha * foreground + (1 - alpha) * generated,
    and wherever the binarized mask is 1 the output is `foreground` bit for bit.
    A batch of 1 in any input is broadcast to the others' batch size.
    """
    generated, foreground, mask = _composite_inputs(generated, foreground, mask)
    alpha = masks.feather(mask, feather).unsqueeze(-1)
    blended = alpha * foreground + (1.0 - alpha) * generated
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
