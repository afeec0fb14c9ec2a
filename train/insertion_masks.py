"""Insertion masks: the region a user would mark to put a product there (DreamPaint, section 3.4).

The paper masks its training images "with equal probability, with rectangular or elliptic masks (since
these are the most common mask shapes used by users)" or object-shaped ones (from a segmenter, whose
imperfections make the model robust to arbitrary masks). Here every shape covers the whole product:

* rectangle: the product's bounding box, grown by a margin on every side;
* ellipse: the ellipse through the corners of that grown box (it covers the box);
* object: the product mask itself, grown by the margin (a rough silhouette, as a segmenter or a brush
  gives).

The margin is drawn per mask, a share of the product's larger side (MARGIN). Masks are bool [H, W]
(True = the region to generate), clipped to the image. Used by ``train.dreampaint`` (the loss region)
and by stage 1 with ``data.mask_policy = "insertion"`` (the hole the insertion branch learns to fill),
and by ``train.dreampaint_eval`` (masks of chosen shapes and sizes).
"""

from __future__ import annotations

import numpy as np
import torch

from dreampainter_core import masks as mask_ops

__all__ = ["MASK_SHAPES", "MARGIN", "insertion_hole", "draw_insertion_hole"]

MASK_SHAPES = ("rectangle", "ellipse", "object")
MARGIN = (0.04, 0.2)  # the margin around the product, a share of its larger side (uniform in this range)


def _bbox(product: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(product)
    if ys.size == 0:
        raise ValueError("the product mask is empty: there is no product to mask")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def insertion_hole(product: np.ndarray, shape: str, margin: float) -> np.ndarray:
    """The ``shape`` mask (MASK_SHAPES) around a product mask (bool [H, W]), ``margin`` x its larger side
    beyond it on every side; bool [H, W], True = generate. It always contains the product."""
    if shape not in MASK_SHAPES:
        raise ValueError(f"mask shape must be one of {MASK_SHAPES}, got {shape!r}")
    product = np.asarray(product, bool)
    height, width = product.shape
    x0, y0, x1, y1 = _bbox(product)
    pad = margin * max(x1 - x0, y1 - y0)
    if shape == "object":
        grow = max(1, int(round(pad)))
        return mask_ops.dilate(torch.from_numpy(product).float(), 2 * grow + 1).numpy() > 0.5
    yy, xx = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    left, top, right, bottom = x0 - pad, y0 - pad, x1 + pad, y1 + pad
    if shape == "rectangle":
        hole = (xx >= left) & (xx <= right) & (yy >= top) & (yy <= bottom)
    else:  # the ellipse through the grown box's corners: semi-axes sqrt(2) x the box's half sides
        cx, cy = (left + right) / 2, (top + bottom) / 2
        ax, ay = np.sqrt(2) * (right - left) / 2, np.sqrt(2) * (bottom - top) / 2
        hole = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
    return hole | product


def draw_insertion_hole(product: np.ndarray, rng: np.random.Generator,
                        margin: tuple[float, float] = MARGIN) -> tuple[np.ndarray, str]:
    """(hole, shape): a shape drawn with equal probability from MASK_SHAPES and a margin uniform in
    ``margin``, from ``rng`` (two draws, in that order)."""
    shape = MASK_SHAPES[int(rng.integers(len(MASK_SHAPES)))]
    return insertion_hole(product, shape, float(rng.uniform(*margin))), shape
