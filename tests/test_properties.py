"""Property-based tests (hypothesis, a dev dependency) of the image/mask converters, the mask
tools, product placement and paste-back, 2000 cases each (small arrays: 5-25 s a test on two
busy cores, about 90 s for the file).

Invariants: nothing raises but a DreamPainterError; what comes back keeps the input's size,
is float32, finite and within 0..1 (masks binary where documented); inputs that are valid by
construction are accepted; paste-back returns the product's pixels bit for bit.

Kept out of tests/test_images.py & co.: the min-version CI leg runs those without hypothesis.
"""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings  # requirements-dev.txt (not in the min-version leg)
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from dreampainter_core import DreamPainterError, masks
from dreampainter_core.images import as_image_batch, as_mask_batch
from dreampainter_core.product import PLACEMENTS, paste_back, place_product

# Hostile inputs: a regression that allocates what one asks for fails instead of eating the machine.
pytestmark = pytest.mark.memcap  # tests/conftest.py

# CI draws the same 2000 cases every run (a red CI then always means a code change); a local run
# draws new ones each time, to keep looking.
CASES = settings(max_examples=2000, deadline=None, derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"),
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

DTYPES = [np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64, np.float16,
          np.float32, np.float64]


def _elements(dtype, dirty: bool = True):
    """Values a mask or image may hold (0/1, 0..1, 0..255), and when `dirty` also anything the dtype
    holds (NaN, inf, -5, 2^40)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return st.booleans()
    if dtype.kind == "f":
        width = dtype.itemsize * 8
        clean = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1, width=width))
        return st.one_of(clean, st.floats(width=width)) if dirty else clean
    info = np.iinfo(dtype)
    clean = st.one_of(st.sampled_from([0, 1]), st.integers(0, min(info.max, 255)))
    return st.one_of(clean, st.integers(info.min, info.max)) if dirty else clean


def _side(low: int = 0):
    return st.integers(low, 6)


# Shapes: any at all, or the layouts the converters take (and their near misses).
SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
    st.tuples(_side(), _side(), st.sampled_from([1, 3, 4])),  # [H, W, C]
    st.tuples(_side(1), _side(), _side(), st.sampled_from([1, 3, 4])),  # [B, H, W, C]
    st.tuples(_side(), _side()),  # [H, W]
    st.tuples(_side(1), _side(), _side()),  # [B, H, W]
    st.tuples(_side(1), st.just(1), _side(), _side()),  # [B, 1, H, W]
)


@st.composite
def any_array(draw):
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(hnp.arrays(dtype, draw(SHAPES), elements=_elements(dtype, dirty=draw(st.booleans()))))
    return torch.from_numpy(x) if draw(st.booleans()) else x


def _unit_checks(out: torch.Tensor):
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    if out.numel():
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


# ---------------------------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------------------------


@CASES
@given(x=any_array())
def test_image_converter_never_crashes_and_keeps_the_size(x):
    try:
        out = as_image_batch(x)
    except DreamPainterError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    _unit_checks(out)
    shape = tuple(x.shape)
    assert out.shape == ((1, *shape[:2], 3) if len(shape) == 3 else (*shape[:3], 3))


@CASES
@given(x=any_array())
def test_mask_converter_never_crashes_and_keeps_the_size(x):
    try:
        out = as_mask_batch(x)
    except DreamPainterError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    _unit_checks(out)
    shape = tuple(x.shape)
    expected = {2: (1, *shape), 3: shape, 4: (shape[0], *shape[2:])}[len(shape)]
    assert out.shape == expected


@st.composite
def valid_mask(draw):
    """A mask that must be accepted: bool, uint8/uint16 levels, 0/1 integers or floats in 0..1,
    [H, W] or [B, H, W] (B <= 3: never read as a picture), as numpy or torch."""
    dtype = draw(st.sampled_from([np.bool_, np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32,
                                  np.float64]))
    dims = draw(st.sampled_from([2, 3]))
    shape = draw(hnp.array_shapes(min_dims=dims, max_dims=dims, min_side=1, max_side=6))
    if dims == 3:
        shape = (min(shape[0], 3), *shape[1:])
    if np.dtype(dtype).kind == "f":
        elements = st.floats(0, 1, width=np.dtype(dtype).itemsize * 8)
    elif dtype in (np.int32, np.int64):
        elements = st.integers(0, 1)
    else:
        elements = _elements(dtype) if dtype == np.bool_ else st.integers(0, np.iinfo(dtype).max)
    x = draw(hnp.arrays(dtype, shape, elements=elements))
    return (torch.from_numpy(x) if draw(st.booleans()) else x), shape


@CASES
@given(case=valid_mask())
def test_every_common_mask_dtype_is_accepted(case):
    x, shape = case
    out = as_mask_batch(x)
    _unit_checks(out)
    assert out.shape == (shape if len(shape) == 3 else (1, *shape))


@st.composite
def valid_image(draw):
    """An image that must be accepted: uint8/uint16 levels or floats in 0..1, [H, W, C] or
    [B, H, W, C] with C = 3 or 4, as numpy or torch."""
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float16, np.float32, np.float64]))
    shape = (*draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6)), draw(st.sampled_from([3, 4])))
    x = draw(hnp.arrays(dtype, shape, elements=_elements(dtype, dirty=False) if np.dtype(dtype).kind == "f"
                        else st.integers(0, np.iinfo(dtype).max)))
    return (torch.from_numpy(x) if draw(st.booleans()) else x), shape


@CASES
@given(case=valid_image())
def test_every_common_image_dtype_is_accepted(case):
    x, shape = case
    out = as_image_batch(x)
    _unit_checks(out)
    assert out.shape == ((1, *shape[:2], 3) if len(shape) == 3 else (*shape[:3], 3))


PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "I", "I;16",
             "F"]


@st.composite
def pil_image(draw):
    mode = draw(st.sampled_from(PIL_MODES))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    # fromarray picks the mode from the dtype: uint16 -> I;16, int32 -> I, float32 -> F, uint8 x4 -> RGBA
    if mode == "I;16":
        return mode, Image.fromarray(draw(hnp.arrays(np.uint16, (h, w))))
    if mode == "I":
        top = draw(st.sampled_from([255, 65535]))  # 8-bit levels, or 16-bit ones (older Pillows' 16-bit PNGs)
        return mode, Image.fromarray(draw(hnp.arrays(np.int32, (h, w), elements=st.integers(0, top))))
    if mode == "F":
        return mode, Image.fromarray(draw(hnp.arrays(np.float32, (h, w), elements=st.floats(0, 1, width=32))))
    return mode, Image.fromarray(draw(hnp.arrays(np.uint8, (h, w, 4)))).convert(mode)


@CASES
@given(case=pil_image())
def test_every_pil_mode_converts_to_an_image_and_a_mask(case):
    mode, img = case
    w, h = img.size
    image, mask = as_image_batch(img), as_mask_batch(img)
    _unit_checks(image)
    _unit_checks(mask)
    assert image.shape == (1, h, w, 3) and mask.shape == (1, h, w), mode


# ---------------------------------------------------------------------------------------------
# Mask tools
# ---------------------------------------------------------------------------------------------


@st.composite
def mask_tensor(draw, hostile=True):
    dims = draw(st.sampled_from([2, 3]))
    shape = draw(hnp.array_shapes(min_dims=dims, max_dims=dims, min_side=1, max_side=10))
    kind = draw(st.sampled_from(["binary", "soft", "bool", "hostile"] if hostile else ["binary", "soft", "bool"]))
    if kind == "bool":
        return torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
    if kind == "binary":
        return torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0]))))
    if kind == "soft":
        return torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32))))
    dtype = draw(st.sampled_from([np.float32, np.uint8, np.int64]))
    return torch.from_numpy(draw(hnp.arrays(dtype, shape, elements=_elements(dtype))))


OPS = ["binarize", "dilate", "erode", "fill_holes", "components4", "components8", "remove_small", "feather", "refine",
       "token_grid"]


@CASES
@given(mask=mask_tensor(), op=st.sampled_from(OPS), k=st.integers(0, 7), area=st.integers(0, 12),
       flag=st.booleans())
def test_mask_tools_keep_size_and_range(mask, op, k, area, flag):
    try:
        binary = masks.binarize(mask)
        if op == "binarize":
            out = binary
        elif op == "dilate":
            out = masks.dilate(mask, k)
        elif op == "erode":
            out = masks.erode(mask, k)
        elif op == "fill_holes":
            out = masks.fill_holes(mask)
        elif op.startswith("components"):
            out = masks.connected_components(mask, 4 if op == "components4" else 8)
        elif op == "remove_small":
            out = masks.remove_small_components(mask, area, 8 if flag else 4)
        elif op == "feather":
            out = masks.feather(mask, k)
        elif op == "refine":
            out = masks.refine_mask(mask, close=k, open=area % 5, dilate=(k + area) % 4, fill_holes=flag,
                                    min_area=area, feather=k % 3)
        else:
            out = masks.mask_to_token_grid(mask, k + 1, area + 1)
    except DreamPainterError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    m = mask.float() if mask.ndim == 3 else mask.float()[None]
    b = binary if binary.ndim == 3 else binary[None]
    if op == "token_grid":
        assert out.shape == (m.shape[0], (k + 1) * (area + 1)) and set(out.unique().tolist()) <= {0.0, 1.0}
        return
    assert out.shape == mask.shape
    o = out if out.ndim == 3 else out[None]
    if op.startswith("components"):
        assert out.dtype == torch.int64 and bool(((o > 0) == (b > 0.5)).all())
        for i in range(o.shape[0]):  # labels are 1..n, each used
            labels = set(o[i].unique().tolist()) - {0}
            assert labels == set(range(1, len(labels) + 1))
        return
    _unit_checks(out)
    if op in ("binarize", "fill_holes", "remove_small") or op == "refine" and k % 3 == 0:
        assert set(o.unique().tolist()) <= {0.0, 1.0}
    if op == "dilate":
        assert bool((o >= m).all())
    if op == "erode":
        assert bool((o <= m).all())
    if op == "fill_holes":
        assert bool((o >= b).all())
    if op == "remove_small":
        assert bool((o <= b).all())
    if op == "feather":  # exactly 1 on the mask, nothing beyond the ramp
        assert bool((o[b > 0.5] == 1.0).all())
        assert bool((o[masks.dilate(b, 2 * k + 1) < 0.5] == 0.0).all())


# ---------------------------------------------------------------------------------------------
# Placement and paste-back
# ---------------------------------------------------------------------------------------------


@st.composite
def product_and_mask(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(2, 9))
    pb = draw(st.integers(1, 2))
    mb = draw(st.sampled_from([1, pb]))
    levels = draw(hnp.arrays(np.uint8, (pb, h, w, 3)))
    product = torch.from_numpy(levels).float() / 255.0
    mask = torch.from_numpy(draw(hnp.arrays(np.float32, (mb, h, w), elements=st.sampled_from([0.0, 0.3, 0.7, 1.0]))))
    if draw(st.booleans()):  # mostly a usable mask: some product and some background in every item
        mask[:, 0, 0], mask[:, -1, -1] = 1.0, 0.0
    return product, mask


FILLS = st.one_of(st.floats(0, 1), st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)))


@CASES
@given(pm=product_and_mask(), width=st.integers(1, 12), height=st.integers(1, 12), same_size=st.booleans(),
       placement=st.sampled_from(PLACEMENTS), ratio=st.floats(0.05, 1.0), fill=FILLS, feather=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_placement_and_paste_back_keep_the_product_exactly(pm, width, height, same_size, placement, ratio, fill,
                                                           feather, seed):
    product, mask = pm
    if same_size:
        height, width = product.shape[1:3]
    try:
        foreground, canvas_mask, source, matte = place_product(
            product, mask, width, height, placement=placement, box_ratio=(ratio, ratio), fill=fill,
            return_source=True, return_matte=True)
    except DreamPainterError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    batch = max(product.shape[0], mask.shape[0])
    assert foreground.shape == source.shape == (batch, height, width, 3)
    assert canvas_mask.shape == matte.shape == (batch, height, width)
    for t in (foreground, canvas_mask, source, matte):
        _unit_checks(t)
    assert set(canvas_mask.unique().tolist()) <= {0.0, 1.0} and bool((canvas_mask.flatten(1).sum(1) > 0).all())
    on = canvas_mask > 0.5
    fill_rgb = torch.tensor([fill] * 3 if isinstance(fill, float) else list(fill), dtype=torch.float32)
    assert bool((foreground[~on] == fill_rgb).all())  # off the product: the fill colour
    assert torch.equal(source[on], foreground[on])
    if placement == "keep" and (height, width) == tuple(product.shape[1:3]):  # nothing resampled
        hard = (mask > 0.5).expand(batch, -1, -1)
        assert torch.equal(canvas_mask > 0.5, hard)
        assert torch.equal(foreground[hard], product.expand(batch, -1, -1, -1)[hard])

    generated = torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))
    for kwargs in (dict(feather=feather), dict(feather=feather, source=source), dict(matte=matte, source=source)):
        out = paste_back(generated, foreground, canvas_mask, **kwargs)
        assert out.shape == (batch, height, width, 3)
        _unit_checks(out)
        exact = on if "matte" not in kwargs else on & (matte >= 1.0)
        assert torch.equal(out[exact], foreground[exact])  # the product's pixels, bit for bit
        if feather == 0 and "matte" not in kwargs:
            assert torch.equal(out[~on], generated[~on])  # and nothing else changed


@st.composite
def composite_inputs(draw):
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    sizes = {name: draw(st.sampled_from([(h, w), (h, w), (h, w), (h + 1, w)])) for name in ("g", "f", "m")}
    batches = {name: draw(st.integers(1, 3)) for name in ("g", "f", "m")}

    def values():
        return _elements(np.float32, dirty=draw(st.booleans()))

    def image(name):
        return torch.from_numpy(draw(hnp.arrays(np.float32, (batches[name], *sizes[name], 3), elements=values())))

    mask = torch.from_numpy(draw(hnp.arrays(np.float32, (batches["m"], *sizes["m"]), elements=values())))
    return image("g"), image("f"), mask


@CASES
@given(inputs=composite_inputs(), feather=st.integers(0, 4))
def test_paste_back_of_arbitrary_inputs_only_raises_dreampainter_errors(inputs, feather):
    generated, foreground, mask = inputs
    try:
        out = paste_back(generated, foreground, mask, feather=feather)
    except DreamPainterError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    _unit_checks(out)
    on = (as_mask_batch(mask) > 0.5).expand(out.shape[:3])
    assert out.shape[1:3] == generated.shape[1:3]
    assert torch.equal(out[on], as_image_batch(foreground).expand(out.shape)[on])
