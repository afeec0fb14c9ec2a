"""Turn user images and masks into checked tensors in ComfyUI's layout.

IMAGE: float32 [B, H, W, 3] in 0..1. MASK: float32 [B, H, W] in 0..1, 1 = product.
Every problem raises InputError naming the input, what was expected and what to do,
before any model work starts.

Accepted: torch tensors and numpy arrays of bool (masks), uint8 (0..255), uint16 (0..65535),
other integers (masks: 0/1 labels only), float16/bfloat16/float32/float64 (0..1); PIL images of
every mode Pillow converts ("1", L, LA, La, P, PA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, HSV, I,
I;16*, F; LAB masks by lightness). Anything else is refused with what was received.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

try:  # Pillow is a dependency, but keep tensor-only callers working without it.
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

__all__ = ["REFERENCE_POLICIES", "as_image_batch", "as_mask_batch", "check_product_and_mask", "reference_canvas",
           "resize_cover"]

# Values this far outside 0..1 are treated as rounding noise and clamped.
_RANGE_TOLERANCE = 1e-3


def _is_pil(x) -> bool:
    return _PILImage is not None and isinstance(x, _PILImage.Image)


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":
            raise InputError(f"{name}: got a tensor on the meta device, which holds no values; pass real data.")
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise InputError(f"{name}: expected a numeric array, got dtype {x.dtype}.")
        # np.array copies: from_numpy would share (and warn about) read-only memory; it also takes
        # only native byte order.
        x = np.array(x, dtype=x.dtype.newbyteorder("="), copy=True)
        try:
            return torch.from_numpy(x)
        except TypeError:  # e.g. float128, which torch has no type for
            raise InputError(f"{name}: numpy dtype {x.dtype} has no torch equivalent; convert it to float32 "
                             "(0..1) or uint8 (0..255).") from None
    raise InputError(
        f"{name}: expected a PIL image, numpy array or torch tensor, got {type(x).__name__}."
    )


def _to_unit_float(t: torch.Tensor, name: str, kind: str) -> torch.Tensor:
    """float32 in 0..1 from a float tensor; rejects NaN/inf and out-of-range values."""
    if t.is_complex():
        raise InputError(f"{name}: expected real values, got a complex tensor.")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise InputError(
            f"{name}: contains NaN or infinite values; expected a {kind} with values in 0..1. "
            "Check the step that produced it (e.g. a decode or a division by zero)."
        )
    low, high = float(t.min()), float(t.max())
    if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
        raise InputError(
            f"{name}: float values must lie in 0..1, got {low:.4g}..{high:.4g}; "
            f"if your {kind} is 0..255, divide by 255."
        )
    return t.clamp(0.0, 1.0)


def _check_not_empty(shape, name: str, layout: str) -> None:
    if any(s == 0 for s in shape):
        raise InputError(f"{name}: is empty (shape {list(shape)}, layout {layout}); give at least a 1x1 image.")


# ----------------------------------------------------------------------------- images


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Premultiplied alpha: Pillow converts these to the other modes only through their plain-alpha twin.
_UNPREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def _pil_convert(img, mode: str, name: str):
    try:
        return img.convert(mode)
    except (ValueError, OSError) as exc:
        raise InputError(f"{name}: this Pillow cannot convert a PIL image of mode {img.mode!r} to {mode!r} ({exc}); "
                         "convert it to RGB (an image) or L (a mask) first.") from None


def _pil_int_levels(img, name: str) -> tuple[np.ndarray, float]:
    """A mode "I" (32-bit integer) picture: its levels and their full scale, 255 or 65535 (16-bit
    PNGs open as "I" in older Pillows)."""
    levels = np.asarray(img, dtype=np.int64)
    low, high = (int(levels.min()), int(levels.max())) if levels.size else (0, 0)
    if low < 0 or high > 65535:
        raise InputError(f"{name}: a PIL image of mode 'I' with values {low}..{high}; expected levels 0..255 or "
                         "0..65535. Rescale it and convert it to L or I;16.")
    return levels, (65535.0 if high > 255 else 255.0)


def _pil_to_image_array(img, name: str) -> np.ndarray:
    if img.mode in _UNPREMULTIPLIED:
        img = _pil_convert(img, _UNPREMULTIPLIED[img.mode], name)
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale: convert("RGB") would clip it to 255.
        gray = np.asarray(img, dtype=np.float32) / 65535.0
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode == "F":
        return np.repeat(np.asarray(img, dtype=np.float32)[..., None], 3, axis=-1)
    if img.mode == "I":
        levels, scale = _pil_int_levels(img, name)
        if scale > 255:
            return np.repeat((levels.astype(np.float32) / 65535.0)[..., None], 3, axis=-1)
    if img.mode == "LAB":
        raise InputError(f"{name}: a PIL image of mode 'LAB' (CIELAB), which Pillow does not convert to RGB by itself; "
                         "convert it with PIL.ImageCms (a LAB -> sRGB transform) first.")
    # RGBA/LA/P: alpha dropped (the mask says what the product is), palette expanded.
    return np.asarray(_pil_convert(img, "RGB", name))


def as_image_batch(x, name: str = "product") -> torch.Tensor:
    """A PIL image, numpy array or tensor -> float32 [B, H, W, 3] in 0..1 (ComfyUI IMAGE).

    Arrays/tensors: [H, W, C] or [B, H, W, C] with C = 3, or 4 (alpha dropped); uint8 is
    divided by 255, uint16 by 65535, floats must already be 0..1; bool and other integer types
    are refused (their scale is ambiguous). The device of a tensor is kept.
    """
    t = _to_tensor(_pil_to_image_array(x, name) if _is_pil(x) else x, name)
    expected = "[H, W, 3] or [B, H, W, 3] (channels last, RGB)"
    given = list(t.shape)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise InputError(f"{name}: expected an image of shape {expected}, got {given}.")
    if t.shape[-1] not in (3, 4):
        hint = (
            " It looks channels-first: permute it to [B, H, W, C]."
            if t.shape[1] in (3, 4)
            else " For a grayscale image, repeat it to 3 channels."
        )
        raise InputError(f"{name}: expected an image of shape {expected}, got {given}.{hint}")
    _check_not_empty(t.shape, name, "[B, H, W, C]")
    t = t[..., :3]

    if t.dtype == torch.uint8:
        t = t.to(torch.float32) / 255.0
    elif t.dtype == torch.uint16:
        t = t.to(torch.float32) / 65535.0
    elif t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex()):
        raise InputError(
            f"{name}: expected uint8 (0..255), uint16 (0..65535) or float (0..1) pixel values, got "
            f"{str(t.dtype).replace('torch.', '')}, whose scale is ambiguous; convert it to uint8 or divide by its "
            "full-scale value to get floats in 0..1."
        )
    else:
        t = _to_unit_float(t, name, "image")
    return t.contiguous()


# ----------------------------------------------------------------------------- masks


def _level_mask_to_unit(t: torch.Tensor, full_scale: float) -> torch.Tensor:
    # 0/1-valued uint8/uint16 masks (common for segmentation PNGs) are labels, not levels: read
    # as 0..255 they would be all background and fail as "empty".
    t = t.to(torch.float32)
    if float(t.max()) <= 1:
        return t
    return t / full_scale


def _pil_to_mask_tensor(img, name: str) -> torch.Tensor:
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in _UNPREMULTIPLIED:
        img = _pil_convert(img, _UNPREMULTIPLIED[img.mode], name)
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        # A fully opaque alpha carries no mask: then the picture itself is the mask.
        if alpha.min() < 255:
            return _level_mask_to_unit(torch.from_numpy(alpha.copy()), 255.0)
        img = img.convert("L")
    if img.mode in _SIXTEEN_BIT_MODES:
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 65535.0)
    if img.mode == "I":
        levels, scale = _pil_int_levels(img, name)
        return torch.from_numpy(levels.astype(np.float32) / scale)
    if img.mode == "F":
        return torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    if img.mode == "LAB":
        img = img.getchannel("L")  # lightness: Pillow has no LAB -> L conversion
    if img.mode != "L":
        img = _pil_convert(img, "L", name)  # "1", RGB, CMYK, ...: luminance
    return _level_mask_to_unit(torch.from_numpy(np.asarray(img).copy()), 255.0)


def _image_like(shape) -> str:
    """A hint when a mask's shape looks like a channels-last picture, else ""."""
    channels, rest = shape[-1], shape[:-1]
    if channels not in (1, 3, 4) or min(rest[-2:]) <= 4:  # [B, H, W] masks 1-4 px wide are taken as masks
        return ""
    if channels == 1:
        return " It looks like an image [..., H, W, 1] (one channel), not a mask: drop the last axis (mask[..., 0])."
    kind = "RGB" if channels == 3 else "RGBA"
    return (f" It looks like an image [..., H, W, {channels}] ({kind}), not a mask: pass one channel (e.g. the alpha "
            "or mask[..., 0]) or convert it to grayscale.")


def as_mask_batch(x, name: str = "mask") -> torch.Tensor:
    """A PIL image, numpy array or tensor -> float32 [B, H, W] in 0..1, 1 = product.

    PIL: "L"/"1" as is, RGBA/LA/PA/RGBa/La alpha (when not fully opaque, else luminance), I;16
    and I by their full scale, RGB and others by luminance. Arrays/tensors: [H, W], [B, H, W] or
    [B, 1, H, W]; bool; uint8 (0..255) and uint16 (0..65535), each read as 0/1 labels when the
    maximum is 1; other integers must be 0/1; floats 0..1. A [H, W, 3] array (a picture) is
    refused as such.
    """
    t = _pil_to_mask_tensor(x, name) if _is_pil(x) else _to_tensor(x, name)
    expected = "[H, W], [B, H, W] or [B, 1, H, W]"
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    elif t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or _image_like(t.shape):
        hint = _image_like(t.shape) if t.ndim in (3, 4) else ""
        raise InputError(f"{name}: expected a mask of shape {expected}, got {list(t.shape)}.{hint}")
    _check_not_empty(t.shape, name, "[B, H, W]")

    if t.dtype == torch.bool:
        t = t.to(torch.float32)
    elif t.dtype == torch.uint8:
        t = _level_mask_to_unit(t, 255.0)
    elif t.dtype == torch.uint16:
        t = _level_mask_to_unit(t, 65535.0)
    elif not (t.is_floating_point() or t.is_complex()):
        values = t if t.is_signed() else t.to(torch.float64)  # uint32/uint64 have no min/max
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 1:
            raise InputError(
                f"{name}: integer masks of dtype {str(t.dtype).replace('torch.', '')} must hold only 0 and 1, got "
                f"values {low}..{high}; for a label map pick the product with (labels == product_id), "
                "for a 0..255 mask convert it to uint8."
            )
        t = t.to(torch.float32)
    else:
        t = _to_unit_float(t, name, "mask")
    return t.contiguous()


def check_product_and_mask(product, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert and cross-check a product image and its mask (1 = product).

    Returns (product [B, H, W, 3], mask [B, H, W]) on the product's device, with a batch of
    1 broadcast to the other's batch size. Raises InputError when the sizes differ, the
    batch sizes cannot be matched, or an item's mask (thresholded at 0.5) is empty or
    covers the whole image.
    """
    product = as_image_batch(product, "product")
    mask = as_mask_batch(mask, "mask").to(product.device)

    (pb, ph, pw), (mb, mh, mw) = product.shape[:3], mask.shape
    if (ph, pw) != (mh, mw):
        raise InputError(
            f"mask size {mw}x{mh} (WxH) does not match product image size {pw}x{ph}; "
            "resize the mask to the product image, or use the product-prep step to produce both."
        )
    if pb != mb:
        if pb == 1:
            product = product.expand(mb, -1, -1, -1).contiguous()
        elif mb == 1:
            mask = mask.expand(pb, -1, -1).contiguous()
        else:
            raise InputError(
                f"product batch has {pb} images but mask batch has {mb} masks; "
                "give one mask per image, or a single mask for all of them."
            )

    product_pixels = (mask > 0.5).flatten(1).sum(dim=1)
    for i, count in enumerate(product_pixels.tolist()):
        if count == 0:
            raise InputError(
                f"mask for image {i} is empty: nothing marks the product; 1 = product, "
                "0 = background to generate. Check that the mask is not inverted or all black."
            )
        if count == ph * pw:
            raise InputError(
                f"mask for image {i} covers the whole image: there is no background left to "
                "generate. 1 = product, 0 = background; if your mask marks the background, invert it."
            )
    return product, mask


def resize_cover(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, H, W, 3] -> [B, height, width, 3]: resize to cover (antialiased bilinear), centre crop.

    The one place a reference is brought to its canvas: the pipeline, the Reference Encode
    node and the evaluation metrics all call this, so they see the same pixels.
    """
    if tuple(images.shape[1:3]) == (height, width):
        return images  # already its canvas (e.g. from the Reference node): no second resize
    x = images.permute(0, 3, 1, 2)
    scale = max(width / x.shape[-1], height / x.shape[-2])
    new_h, new_w = max(height, round(x.shape[-2] * scale)), max(width, round(x.shape[-1] * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[:, :, top : top + height, left : left + width].clamp(0, 1).permute(0, 2, 3, 1)


REFERENCE_POLICIES = ("crop", "pad", "stretch", "keep_aspect")


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H, W, 3] -> [B, height, width, 3], antialiased bilinear (no crop: the aspect may change)."""
    if tuple(x.shape[1:3]) == (height, width):
        return x
    y = F.interpolate(x.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y.clamp(0, 1).permute(0, 2, 3, 1)


def reference_canvas(image, resolution: int, policy: str = "crop", multiple: int = 16) -> torch.Tensor:
    """A reference on the canvas the model sees: ``resolution`` px square, or for keep_aspect
    the longer side, each side a multiple of ``multiple`` (VAE x patch: whole tokens).

    crop: resize to cover, centre crop (what the pipeline does with a raw reference);
    pad: fit inside, pad with white; stretch: squash to the square; keep_aspect: no crop.
    """
    image = as_image_batch(image, "reference")
    if policy not in REFERENCE_POLICIES:
        raise InputError(f"reference policy must be one of {REFERENCE_POLICIES}, got {policy!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < multiple \
            or resolution % multiple:
        raise InputError(f"reference resolution {resolution} must be a positive multiple of {multiple} px")
    h, w = image.shape[1:3]
    if policy == "crop":
        return resize_cover(image, resolution, resolution)
    if policy == "stretch":
        return _resize(image, resolution, resolution)
    if policy == "pad":
        scale = min(resolution / w, resolution / h)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        canvas = torch.ones(image.shape[0], resolution, resolution, 3, dtype=image.dtype)
        top, left = (resolution - nh) // 2, (resolution - nw) // 2
        canvas[:, top:top + nh, left:left + nw] = _resize(image, nh, nw)
        return canvas
    scale = resolution / max(h, w)  # keep_aspect
    nh = max(multiple, round(h * scale / multiple) * multiple)
    nw = max(multiple, round(w * scale / multiple) * multiple)
    return _resize(image, nh, nw)


def mask_overlay(mask: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
    """The kept product tinted green over the image (or the mask alone, grey): Mask Refine's preview and the batch's contact sheets."""
    mask = as_mask_batch(mask, "mask")
    if image is None:
        return mask.unsqueeze(-1).expand(*mask.shape, 3).contiguous()
    image = as_image_batch(image, "image")
    if tuple(image.shape[1:3]) != tuple(mask.shape[1:3]):
        raise InputError(f"mask size {mask.shape[2]}x{mask.shape[1]} does not match image size "
                         f"{image.shape[2]}x{image.shape[1]} (WxH); connect the image the mask belongs to.")
    batch = max(image.shape[0], mask.shape[0])
    image, m = image.expand(batch, -1, -1, -1), mask.expand(batch, -1, -1).unsqueeze(-1)
    green = torch.tensor([0.1, 0.9, 0.2]).to(image)
    edge = (F.max_pool2d(m.permute(0, 3, 1, 2), 3, 1, 1) - (-F.max_pool2d(-m.permute(0, 3, 1, 2), 3, 1, 1)))
    edge = (edge.permute(0, 2, 3, 1) > 0.25).to(image.dtype)
    out = image * (1 - 0.45 * m) + green * 0.45 * m
    return (out * (1 - edge) + green * edge).clamp(0, 1)
