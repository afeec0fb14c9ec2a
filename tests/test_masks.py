import math

import pytest
import torch

from dreampainter_core import masks
from dreampainter_core.errors import InputError


def square_mask(h=32, w=32, top=10, left=10, size=8):
    m = torch.zeros(h, w)
    m[top : top + size, left : left + size] = 1
    return m


def blob_mask(size, centre, radius, wobble=0.12, lobes=5):
    """A star-ish blob like a segmented product, radius in pixels."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    dy, dx = ys - centre[0], xs - centre[1]
    angle = torch.atan2(dy, dx)
    return (torch.hypot(dy, dx) < radius * (1 + wobble * torch.sin(lobes * angle))).float()


# ----------------------------------------------------------------------------- shapes and types


def test_rank_dtype_and_batch_are_kept():
    m2 = square_mask() > 0.5  # bool in
    m3 = torch.stack([square_mask(), square_mask(top=2)])
    for fn in (masks.binarize, lambda m: masks.dilate(m, 3), lambda m: masks.erode(m, 3), masks.fill_holes,
               lambda m: masks.feather(m, 2), lambda m: masks.remove_small_components(m, 4)):
        assert fn(m2).shape == (32, 32) and fn(m2).dtype == torch.float32
        out = fn(m3)
        assert out.shape == (2, 32, 32) and out.dtype == torch.float32
        # batch items are processed independently
        assert torch.equal(out[1], fn(m3[1]))


def test_bad_rank_and_arguments_raise_input_error():
    with pytest.raises(InputError, match=r"\[H, W\] or \[B, H, W\]"):
        masks.binarize(torch.zeros(1, 1, 4, 4))
    with pytest.raises(InputError, match="torch tensor"):
        masks.dilate([[0, 1]], 3)
    with pytest.raises(InputError, match="whole-number"):
        masks.dilate(square_mask(), 2.5)
    with pytest.raises(InputError, match="0 or more"):
        masks.refine_mask(square_mask(), close=-3)
    with pytest.raises(InputError, match="connectivity"):
        masks.connected_components(square_mask(), connectivity=6)


def test_binarize_threshold():
    m = torch.tensor([[0.2, 0.5, 0.51, 0.9]])
    assert masks.binarize(m).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert masks.binarize(m, threshold=0.1).tolist() == [[1.0, 1.0, 1.0, 1.0]]


# ----------------------------------------------------------------------------- morphology


@pytest.mark.parametrize("k", [3, 5, 7])
def test_dilation_grows_by_half_the_kernel(k):
    m = square_mask(size=6)
    grown = masks.dilate(m, k)
    r = k // 2
    expected = square_mask(top=10 - r, left=10 - r, size=6 + 2 * r)
    assert torch.equal(grown, expected)


def test_even_kernel_rounds_up_and_small_kernel_is_noop():
    m = square_mask()
    assert torch.equal(masks.dilate(m, 4), masks.dilate(m, 5))
    assert torch.equal(masks.erode(m, 4), masks.erode(m, 5))
    assert torch.equal(masks.dilate(m, 1), m)
    assert torch.equal(masks.erode(m, 0), m)


def test_erosion_shrinks_by_half_the_kernel():
    m = square_mask(size=10)
    assert torch.equal(masks.erode(m, 5), square_mask(top=12, left=12, size=6))


def test_border_neither_eats_nor_wraps():
    m = torch.zeros(16, 16)
    m[:, :5] = 1  # product touching the left, top and bottom borders
    eroded = masks.erode(m, 5)
    assert eroded[:, :3].eq(1).all()  # only the inner edge moves in, by 2
    assert eroded[:, 3:].eq(0).all()
    dilated = masks.dilate(m, 5)
    assert dilated[:, :7].eq(1).all() and dilated[:, 7:].eq(0).all()  # nothing wraps to the right edge


def test_closing_fills_a_small_hole():
    m = square_mask(size=12)
    m[15:17, 15:17] = 0  # 2x2 hole inside the product
    closed = masks.refine_mask(m, close=5)
    assert torch.equal(closed, square_mask(size=12))


def test_opening_removes_a_speck():
    m = square_mask(size=12)
    m[2, 28] = 1  # isolated speck
    opened = masks.refine_mask(m, open=3)
    assert opened[2, 28] == 0
    assert torch.equal(opened, square_mask(size=12))


def test_refine_dilate_then_binary_output():
    m = square_mask(size=6) * 0.8  # soft input
    out = masks.refine_mask(m, dilate=3)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert out.sum() == 8 * 8


# ----------------------------------------------------------------------------- holes and components


def test_fill_holes_fills_a_hand_drawn_ring():
    ring = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 0],
            [0, 1, 0, 0, 0, 1, 0],
            [0, 1, 0, 0, 0, 1, 0],
            [0, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    filled = masks.fill_holes(ring)
    expected = ring.clone()
    expected[2:4, 2:5] = 1
    assert torch.equal(filled, expected)


def test_fill_holes_uses_4_connectivity_and_keeps_border_background():
    # The "hole" leaks to the outside only through a diagonal gap: with 4-connectivity it
    # is still enclosed and gets filled.
    m = torch.tensor(
        [
            [0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 1, 0, 1, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    filled = masks.fill_holes(m)
    assert filled[2, 2] == 1
    assert filled[1, 3] == 0  # open bay connected to the border stays background
    # A background pocket touching the image border is not a hole.
    u = torch.ones(6, 6)
    u[0:3, 2:4] = 0
    assert torch.equal(masks.fill_holes(u), u)


def test_fill_holes_follows_a_winding_corridor():
    # A spiral-ish corridor that needs several row/column passes to reach from the border.
    m = torch.ones(20, 20)
    m[0, 1] = 0
    m[1:18, 1] = 0
    m[17, 1:18] = 0
    m[3:18, 17] = 0
    m[3, 4:18] = 0
    m[3:15, 4] = 0
    m[10, 10] = 0  # a true hole
    filled = masks.fill_holes(m)
    assert filled[10, 10] == 1
    corridor = m == 0
    corridor[10, 10] = False
    assert filled[corridor].eq(0).all()


def test_connected_components_labels_and_connectivity():
    m = torch.zeros(8, 8)
    m[0:2, 0:2] = 1
    m[2, 2] = 1  # touches the first block only diagonally
    m[5:8, 5:8] = 1
    labels8 = masks.connected_components(m)
    labels4 = masks.connected_components(m, connectivity=4)
    assert labels8.dtype == torch.int64
    assert int(labels8.max()) == 2 and int(labels4.max()) == 3
    assert labels8[0, 0] == labels8[2, 2] != labels8[6, 6]
    assert labels4[0, 0] != labels4[2, 2]
    assert labels8[m == 0].eq(0).all() and labels8[m == 1].gt(0).all()
    # each label is one region with the right size
    assert sorted(torch.bincount(labels8.flatten())[1:].tolist()) == [5, 9]


def test_connected_components_full_mask_and_batch():
    full = torch.ones(2, 5, 5)
    full[1, :, 2] = 0
    labels = masks.connected_components(full)
    assert labels[0].eq(1).all()
    assert int(labels[1].max()) == 2 and labels[1, :, 2].eq(0).all()


def test_remove_small_components_keeps_big_drops_small():
    m = torch.zeros(40, 40)
    m[5:25, 5:25] = 1  # 400 px
    m[30:33, 30:33] = 1  # 9 px
    m[35, 2] = 1  # 1 px
    out = masks.remove_small_components(m, min_area=10)
    expected = torch.zeros(40, 40)
    expected[5:25, 5:25] = 1
    assert torch.equal(out, expected)
    without_single_pixel = m.clone()
    without_single_pixel[35, 2] = 0
    assert torch.equal(masks.remove_small_components(m, min_area=9), without_single_pixel)
    assert torch.equal(masks.remove_small_components(m, min_area=0), m)


# ----------------------------------------------------------------------------- feathering


@pytest.mark.parametrize("radius", [1, 4, 9])
def test_feather_exact_one_on_mask_zero_far_monotone(radius):
    m = square_mask(h=48, w=48, top=16, left=16, size=12)
    m[20, 20] = 0.7  # soft but above threshold: still product
    alpha = masks.feather(m, radius)
    on_mask = masks.binarize(m) > 0.5
    assert alpha[on_mask].eq(1.0).all()  # exact, not approximately
    reach = masks.dilate(masks.binarize(m), 2 * radius + 1) > 0.5
    assert alpha[~reach].eq(0).all()
    assert alpha[~on_mask].lt(1).all() and alpha.ge(0).all()
    # moving away from the mask along the row through its middle, alpha never increases
    row = alpha[22, 28:]
    assert (row[1:] <= row[:-1]).all()
    assert 0 < row[0] < 1  # a real ramp, not a hard edge
    assert row[radius - 1] > 0 and row[radius] == 0  # reaches exactly `radius` px along an axis
    # and right next to the mask it is nonzero all around
    assert alpha[22, 15] > 0 and alpha[15, 22] > 0


def test_feather_zero_is_binary():
    m = square_mask() * 0.9
    assert torch.equal(masks.feather(m, 0), masks.binarize(m))


def test_refine_feather_output_is_soft_and_exact_inside():
    m = square_mask(size=10)
    out = masks.refine_mask(m, feather=3)
    assert out[m > 0.5].eq(1).all()
    assert ((out > 0) & (out < 1)).any()


# ----------------------------------------------------------------------------- pipeline and token grid


def test_refine_mask_keyword_api_and_order():
    m = blob_mask(64, (32, 32), 18)
    m[30:33, 30:33] = 0  # hole
    m[2:4, 2:4] = 1  # 4 px speck
    out = masks.refine_mask(m, close=0, open=0, dilate=0, fill_holes=True, min_area=10, feather=0)
    assert out[31, 31] == 1 and out[2, 2] == 0
    # dilation happens before small-component removal: a 2x2 speck dilated by 3 (16 px) survives
    kept = masks.refine_mask(m, dilate=3, min_area=10)
    assert kept[2, 2] == 1
    # no-op settings give the binarized mask back
    assert torch.equal(masks.refine_mask(m), masks.binarize(m))


def test_refine_mask_1024_realistic_blob_runs():
    m = blob_mask(1024, (520, 500), 300)
    m[480:520, 470:510] = 0  # hole
    m[(torch.rand(1024, 1024) < 0.001)] = 1  # segmentation noise specks
    m[100:106, 900:906] = 1  # a small stray component
    out = masks.refine_mask(m, close=5, open=3, dilate=3, fill_holes=True, min_area=200)
    assert out[500, 490] == 1
    assert out[102, 902] == 0
    assert masks.connected_components(out).max() == 1


def test_mask_to_token_grid_marks_any_product_pixel():
    m = torch.zeros(2, 32, 32)
    m[0, 0, 0] = 1  # a single pixel marks token (0, 0)
    m[1, 16:, 8:16] = 1
    tokens = masks.mask_to_token_grid(m, 4, 4)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.float32
    expected0 = torch.zeros(16)
    expected0[0] = 1
    assert torch.equal(tokens[0], expected0)
    grid1 = tokens[1].view(4, 4)  # row-major token order
    assert grid1[2:, 1].eq(1).all() and grid1.sum() == 2
    with pytest.raises(InputError, match="at least 1x1"):
        masks.mask_to_token_grid(m, 0, 4)


def test_mask_to_token_grid_uneven_cells():
    m = torch.zeros(1, 30, 50)
    m[0, 29, 49] = 1
    tokens = masks.mask_to_token_grid(m, 4, 6).view(4, 6)
    assert tokens[3, 5] == 1 and tokens.sum() == 1
    assert math.isclose(float(masks.mask_to_token_grid(torch.ones(30, 50), 4, 6).mean()), 1.0)
