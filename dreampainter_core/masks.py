"""Product-mask operations in pure torch: morphology, hole filling, components, feathering.

Convention: 1 = product (kept), 0 = background (generated). Every function takes a mask of
shape [H, W] or [B, H, W] (float in 0..1, bool, or 0/1 integers; any device) and returns the
same rank as float32 in 0..1, except `connected_components` (int64 labels) and
`mask_to_token_grid` ([B, tokens]). Other values (NaN, 0..255 levels) are refused: convert
such masks with dreampainter_core.images.as_mask_batch.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .errors import InputError
from .images import _check_not_empty, _to_unit_float

__all__ = [
    "binarize",
    "dilate",
    "erode",
    "fill_holes",
    "connected_components",
    "remove_small_components",
    "feather",
    "refine_mask",
    "mask_to_token_grid",
]


# ----------------------------------------------------------------------------- helpers


def _to_batch(mask, name: str = "mask") -> tuple[torch.Tensor, bool]:
    """Return ([B, H, W] float32, whether a batch axis was added)."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(
            f"{name}: expected a torch tensor of shape [H, W] or [B, H, W], got {type(mask).__name__}; "
            "convert it with dreampainter_core.images.as_mask_batch first."
        )
    if mask.ndim not in (2, 3):
        raise InputError(
            f"{name}: expected shape [H, W] or [B, H, W], got {list(mask.shape)}; "
            "squeeze channel axes or convert it with dreampainter_core.images.as_mask_batch."
        )
    added = mask.ndim == 2
    batch = mask.unsqueeze(0) if added else mask
    _check_not_empty(batch.shape, name, "[B, H, W]")
    if batch.is_floating_point() or batch.is_complex():
        return _to_unit_float(batch, name, "mask"), added  # finite, in 0..1 (rounding noise clamped)
    batch = batch.to(torch.float32)  # bool, or integers that must be 0/1 labels
    low, high = float(batch.min()), float(batch.max())
    if low < 0 or high > 1:
        raise InputError(f"{name}: an integer mask must hold only 0 and 1, got values {low:g}..{high:g}; convert a "
                         "0..255 mask or a label map with dreampainter_core.images.as_mask_batch first.")
    return batch, added


def _restore(batch: torch.Tensor, added: bool) -> torch.Tensor:
    return batch[0] if added else batch


def _is_whole(value) -> bool:
    """int, numpy int, or a float with no fractional part (bool excluded)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer())


def _count(value, what: str) -> int:
    """A non-negative whole number (kernel size, radius, area) from an int or integral float."""
    if not _is_whole(value):
        raise InputError(f"{what}: expected a whole number, got {value!r}.")
    if value < 0:
        raise InputError(f"{what}: expected 0 or more, got {value!r}.")
    return int(value)


def _odd_kernel(k, what: str) -> int:
    if not _is_whole(k):
        raise InputError(f"{what}: expected a whole-number kernel size, got {k!r}.")
    k = int(k)
    # Even sizes have no centre pixel; round up so the operation stays symmetric.
    return k + 1 if k > 1 and k % 2 == 0 else k


def _max_filter(batch: torch.Tensor, k: int) -> torch.Tensor:
    """k x k square max filter on [B, H, W]; max_pool pads with -inf so nothing wraps in."""
    r = k // 2
    x = batch.unsqueeze(1)
    # Separable (k x 1 then 1 x k): O(k) per pixel instead of O(k^2), same result.
    x = F.max_pool2d(x, (k, 1), stride=1, padding=(r, 0))
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, r))
    return x.squeeze(1)


def _max3(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over a pixel and its two neighbours along `dim` (-1 or -2), 0 outside; any dtype
    with values >= 0. Slices beat max_pool2d here and also work on int64 labels."""
    pad = (1, 1) if dim == -1 else (0, 0, 1, 1)
    padded = F.pad(x, pad)
    n = x.shape[dim]
    out = torch.maximum(padded.narrow(dim, 0, n), padded.narrow(dim, 2, n))
    return torch.maximum(out, x, out=out)


def _neighbour_max(x: torch.Tensor, connectivity: int) -> torch.Tensor:
    """3x3 max (8-connectivity) or cross max (4-connectivity) on [B, H, W]."""
    if connectivity == 8:
        return _max3(_max3(x, -1), -2)
    return torch.maximum(_max3(x, -1), _max3(x, -2))


def _run_ids(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the horizontal and vertical runs of `region` ([B, H, W] bool), flat, 0 outside it.

    Spreading a value over a whole run in one step (where a 3x3 dilation moves one pixel
    per iteration) is what keeps hole filling and labelling fast on 1024x1024 masks.
    """

    def row_ids(r: torch.Tensor) -> torch.Tensor:
        starts = r.clone()
        starts[..., 1:] &= ~r[..., :-1]
        return torch.cumsum(starts.reshape(-1), 0) * r.reshape(-1)

    rows = row_ids(region)
    transposed = region.transpose(-1, -2).contiguous()
    cols = row_ids(transposed).view_as(transposed).transpose(-1, -2).reshape(-1)
    return rows, cols


def _spread_over_runs(values: torch.Tensor, run_ids: torch.Tensor) -> torch.Tensor:
    """Every pixel gets the max of its run. `values` must be 0 outside the region: those
    pixels all share slot 0, which then stays 0."""
    # Sized by pixel count rather than run count: avoids a device sync to read the count.
    run_max = torch.zeros(run_ids.numel() + 1, dtype=values.dtype, device=values.device)
    run_max.scatter_reduce_(0, run_ids, values.reshape(-1), reduce="amax", include_self=True)
    return run_max[run_ids].view_as(values)


# ----------------------------------------------------------------------------- public API


def binarize(mask, threshold: float = 0.5) -> torch.Tensor:
    """1.0 where mask > threshold, else 0.0."""
    batch, added = _to_batch(mask)
    return _restore((batch > threshold).to(torch.float32), added)


def dilate(mask, k) -> torch.Tensor:
    """Grow the mask with a k x k square (k <= 1: unchanged; even k rounded up to odd)."""
    batch, added = _to_batch(mask)
    k = _odd_kernel(k, "dilate kernel")
    if k <= 1:
        return _restore(batch.clone(), added)
    return _restore(_max_filter(batch, k), added)


def erode(mask, k) -> torch.Tensor:
    """Shrink the mask with a k x k square (k <= 1: unchanged; even k rounded up to odd).

    Outside the image counts as "no information" rather than background, so a product
    touching the image border is not eaten from that side.
    """
    batch, added = _to_batch(mask)
    k = _odd_kernel(k, "erode kernel")
    if k <= 1:
        return _restore(batch.clone(), added)
    return _restore(-_max_filter(-batch, k), added)


def fill_holes(mask) -> torch.Tensor:
    """Binary mask with every background region not 4-connected to the image border set to 1.

    Geodesic reconstruction of the background from the border pixels: propagate the
    "reached from the border" flag inside the background until it stops changing.
    """
    batch, added = _to_batch(mask)
    background = batch <= 0.5
    seed = torch.zeros_like(background)
    seed[:, 0, :] = background[:, 0, :]
    seed[:, -1, :] = background[:, -1, :]
    seed[:, :, 0] |= background[:, :, 0]
    seed[:, :, -1] |= background[:, :, -1]

    row_runs, col_runs = _run_ids(background)
    reached = seed.to(torch.uint8)
    reached_count = int(reached.sum())
    while True:
        reached = _spread_over_runs(_spread_over_runs(reached, row_runs), col_runs)
        # Values only ever grow, so an unchanged count means nothing changed.
        new_count = int(reached.sum())
        if new_count == reached_count:
            break
        reached_count = new_count
    return _restore((reached == 0).to(torch.float32), added)


def connected_components(mask, connectivity: int = 8) -> torch.Tensor:
    """Label the product components: int64, 0 = background, 1..n per batch item.

    Every product pixel starts with a unique id; the largest id spreads over whole
    row/column runs (4-neighbour links), a 3x3 max (diagonal links, 8-connectivity only)
    and pointer jumping, until a full pass changes nothing.
    """
    if connectivity not in (4, 8):
        raise InputError(f"connectivity: expected 4 or 8, got {connectivity!r}.")
    batch, added = _to_batch(mask)
    b, h, w = batch.shape
    foreground = batch > 0.5
    ids = torch.arange(1, h * w + 1, dtype=torch.int64, device=batch.device).view(1, h, w)
    labels = torch.where(foreground, ids, torch.zeros((), dtype=torch.int64, device=batch.device))
    zero = torch.zeros((), dtype=torch.int64, device=batch.device)

    row_runs, col_runs = _run_ids(foreground)
    label_sum = int(labels.sum())
    while True:
        labels = _spread_over_runs(_spread_over_runs(labels, row_runs), col_runs)
        if connectivity == 8:
            # Runs only link 4-neighbours; the 3x3 max adds the diagonal links.
            labels = torch.where(foreground, _neighbour_max(labels, 8), zero)
        # A label is the id of a pixel in the same component, so that pixel's label is too.
        flat = labels.view(b, h * w)
        jumped = torch.gather(flat, 1, (flat - 1).clamp_min(0))
        labels = torch.where(foreground.view(b, h * w), torch.maximum(flat, jumped), zero).view(b, h, w)
        new_sum = int(labels.sum())
        if new_sum == label_sum:
            break
        label_sum = new_sum

    # Renumber each item to 1..n (a component's label is the id of its last pixel).
    flat = labels.view(b, h * w)
    is_last_pixel = (flat == ids.view(1, h * w)) & foreground.view(b, h * w)
    number = torch.cumsum(is_last_pixel, dim=1)
    out = torch.gather(number, 1, (flat - 1).clamp_min(0))
    out = torch.where(foreground.view(b, h * w), out, zero).view(b, h, w)
    return _restore(out, added)


def remove_small_components(mask, min_area, connectivity: int = 8) -> torch.Tensor:
    """Binary mask without the product components that have fewer than `min_area` pixels."""
    min_area = _count(min_area, "min_area")
    batch, added = _to_batch(mask)
    binary = (batch > 0.5).to(torch.float32)
    if min_area <= 1:
        return _restore(binary, added)
    labels = connected_components(batch, connectivity)
    out = torch.zeros_like(binary)
    for i in range(batch.shape[0]):
        areas = torch.bincount(labels[i].reshape(-1))
        keep = areas >= min_area
        keep[0] = False
        out[i] = keep[labels[i]].to(torch.float32)
    return _restore(out, added)


def feather(mask, radius) -> torch.Tensor:
    """Soft compositing alpha: exactly 1.0 on the binarized mask, a linear ramp down over
    `radius` pixels outside it, and 0 beyond (never nonzero outside dilate(mask, 2*radius+1)).

    Built from repeated 3x3 dilations (cross, cross, square, ... for a rounder halo than a
    square alone): a pixel first reached at step d gets (radius + 1 - d) / (radius + 1).
    Inside the mask that is (radius + 1) / (radius + 1) == 1.0 exactly, which paste-back
    relies on to keep product pixels bit-identical. radius 0 returns the binary mask.
    """
    radius = _count(radius, "feather radius")
    batch, added = _to_batch(mask)
    binary = (batch > 0.5).to(torch.float32)
    if radius == 0:
        return _restore(binary, added)
    # uint8/int32 instead of float32: these loops are memory-bound.
    reached = (batch > 0.5).to(torch.uint8)
    coverage = reached.to(torch.int32)
    for step in range(1, radius + 1):
        connectivity = 8 if step % 3 == 0 else 4
        reached = _neighbour_max(reached, connectivity)
        coverage += reached
    alpha = coverage.to(torch.float32) / float(radius + 1)
    alpha = torch.where(binary > 0.5, torch.ones_like(alpha), alpha)
    return _restore(alpha, added)


# refine_mask's keyword names shadow these functions inside it; keep handles to them.
_dilate_op, _fill_holes_op, _feather_op = dilate, fill_holes, feather


def refine_mask(mask, close=0, open=0, dilate=0, fill_holes=False, min_area=0, feather=0) -> torch.Tensor:  # noqa: A002
    """Clean up a product mask against "overcompletion" (seed 004), in this order:

    binarize -> closing (kernel `close`: fills small gaps) -> opening (kernel `open`:
    removes specks) -> dilation (kernel `dilate`: grows the edge) -> hole filling (if
    `fill_holes`) -> removal of components smaller than `min_area` px -> feathering over
    `feather` px. Binary out unless feather > 0. Kernel sizes <= 1 are no-ops.
    """
    close_k = _count(close, "close kernel")
    open_k = _count(open, "open kernel")
    dilate_k = _count(dilate, "dilate kernel")
    area = _count(min_area, "min_area")
    feather_radius = _count(feather, "feather radius")
    do_fill = bool(fill_holes)

    out = binarize(mask)
    if close_k > 1:
        out = erode(_dilate_op(out, close_k), close_k)
    if open_k > 1:
        out = _dilate_op(erode(out, open_k), open_k)
    if dilate_k > 1:
        out = _dilate_op(out, dilate_k)
    if do_fill:
        out = _fill_holes_op(out)
    if area > 1:
        out = remove_small_components(out, area)
    if feather_radius > 0:
        out = _feather_op(out, feather_radius)
    return out


def mask_to_token_grid(mask, grid_h: int, grid_w: int) -> torch.Tensor:
    """[B, H, W] (or [H, W]) mask -> [B, grid_h * grid_w] float 0/1, row-major token order.

    A token is 1 when any product pixel falls in its cell (adaptive max pool), so mask
    guidance never cuts the control signal off a token that holds part of the product.
    """
    grid_h = _count(grid_h, "grid_h")
    grid_w = _count(grid_w, "grid_w")
    if grid_h == 0 or grid_w == 0:
        raise InputError(f"token grid: expected a size of at least 1x1, got {grid_h}x{grid_w}.")
    batch, _ = _to_batch(mask)
    binary = (batch > 0.5).to(torch.float32).unsqueeze(1)
    pooled = F.adaptive_max_pool2d(binary, (grid_h, grid_w))
    return pooled.flatten(1)
