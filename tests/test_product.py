import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreampainter_core import masks
from dreampainter_core.errors import InputError
from dreampainter_core.product import SOURCE_MARGIN, match_color, paste_back, place_product


def photo_with_product(h=120, w=200, box=(30, 70, 40, 140), colour=(0.9, 0.1, 0.2)):
    """Random background, a solid-coloured rectangular product at rows y0:y1, cols x0:x1."""
    y0, y1, x0, x1 = box
    image = torch.rand(1, h, w, 3)
    image[0, y0:y1, x0:x1] = torch.tensor(colour)
    mask = torch.zeros(1, h, w)
    mask[0, y0:y1, x0:x1] = 1
    return image, mask


def bbox(mask2d):
    ys, xs = torch.nonzero(mask2d > 0.5, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


# ----------------------------------------------------------------------------- place_product


@pytest.mark.parametrize(
    "width, height, box_ratio",
    [(256, 256, (0.6, 0.6)), (320, 192, (0.6, 0.6)), (192, 320, (0.5, 0.8))],
)
def test_center_placement_fits_and_centres_the_bbox(width, height, box_ratio):
    image, mask = photo_with_product()  # product bbox 40 x 100 (h x w), off-centre
    fg, out_mask = place_product(image, mask, width, height, placement="center", box_ratio=box_ratio)
    assert fg.shape == (1, height, width, 3) and out_mask.shape == (1, height, width)
    box_h, box_w = box_ratio[0] * height, box_ratio[1] * width
    scale = min(box_h / 40, box_w / 100)
    y0, y1, x0, x1 = bbox(out_mask[0])
    # the limiting side fills the box; the other keeps the aspect ratio (within a pixel)
    assert abs((y1 - y0) - 40 * scale) <= 1.5 and abs((x1 - x0) - 100 * scale) <= 1.5
    assert y1 - y0 <= box_h + 1e-6 and x1 - x0 <= box_w + 1e-6
    assert abs((y0 + y1) / 2 - height / 2) <= 1 and abs((x0 + x1) / 2 - width / 2) <= 1


def test_center_placement_keeps_product_colour_and_fills_outside():
    image, mask = photo_with_product(colour=(0.9, 0.1, 0.2))
    fg, out_mask = place_product(image, mask, 256, 256, placement="center", fill=1.0)
    assert set(out_mask.unique().tolist()) == {0.0, 1.0}
    inside = out_mask[0] > 0.5
    # mask-premultiplied resize: no random background bleeds into the edge pixels
    assert torch.allclose(fg[0][inside], torch.tensor([0.9, 0.1, 0.2]).expand(int(inside.sum()), 3), atol=1e-5)
    assert fg[0][~inside].eq(1.0).all()


def test_center_placement_per_item_and_rgb_fill():
    image, mask = photo_with_product()
    image2, mask2 = photo_with_product(box=(5, 100, 150, 190))
    fg, out_mask = place_product(
        torch.cat([image, image2]), torch.cat([mask, mask2]), 200, 200, placement="center", fill=(0.0, 0.5, 1.0)
    )
    for i in range(2):
        y0, y1, x0, x1 = bbox(out_mask[i])
        assert abs((y0 + y1) / 2 - 100) <= 1 and abs((x0 + x1) / 2 - 100) <= 1
    assert bbox(out_mask[0]) != bbox(out_mask[1])  # each item uses its own bbox
    assert torch.equal(fg[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_keep_placement_same_size_is_identity_on_product():
    image, mask = photo_with_product()
    image[0, 30:70, 40:140] = torch.rand(40, 100, 3)  # textured product
    fg, out_mask = place_product(image, mask, 200, 120)
    assert torch.equal(out_mask, mask)
    on = mask[0] > 0.5
    assert torch.equal(fg[0][on], image[0][on])
    assert fg[0][~on].eq(1.0).all()


def test_keep_placement_contains_and_pads():
    image, mask = photo_with_product(h=100, w=200, box=(20, 80, 50, 150))
    fg, out_mask = place_product(image, mask, 256, 256, placement="keep", fill=0.0)
    # 200x100 scaled by 1.28 -> 256x128, centred vertically: rows 64..191
    assert out_mask[0, :64].eq(0).all() and out_mask[0, 192:].eq(0).all()
    assert fg[0, :64].eq(0).all()
    y0, y1, x0, x1 = bbox(out_mask[0])
    assert abs(y0 - (64 + 20 * 1.28)) <= 1 and abs(y1 - (64 + 80 * 1.28)) <= 1
    assert abs(x0 - 50 * 1.28) <= 1 and abs(x1 - 150 * 1.28) <= 1


def test_place_product_accepts_pil_and_numpy():
    image, mask = photo_with_product()
    pil_image = Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8))
    pil_mask = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8), "L")
    fg, out_mask = place_product(pil_image, pil_mask, 200, 120)
    assert torch.equal(out_mask, mask)
    fg2, _ = place_product(np.asarray(pil_image), mask[0].numpy(), 200, 120)
    assert torch.equal(fg, fg2)


def test_place_product_errors():
    image, mask = photo_with_product()
    with pytest.raises(InputError, match="placement: expected one of keep, center"):
        place_product(image, mask, 64, 64, placement="middle")
    with pytest.raises(InputError, match="width"):
        place_product(image, mask, 0, 64)
    with pytest.raises(InputError, match="height"):
        place_product(image, mask, 64, 12.5)
    with pytest.raises(InputError, match="box_ratio"):
        place_product(image, mask, 64, 64, placement="center", box_ratio=(0.6, 1.5))
    with pytest.raises(InputError, match="box_ratio"):
        place_product(image, mask, 64, 64, placement="center", box_ratio=0.6)
    with pytest.raises(InputError, match="fill"):
        place_product(image, mask, 64, 64, fill=255)
    with pytest.raises(InputError, match="does not match"):
        place_product(image, mask[:, :50], 64, 64)
    tiny_image, tiny_mask = photo_with_product(h=400, w=400, box=(200, 201, 200, 201))
    with pytest.raises(InputError, match="empty after resizing to 20x20"):
        place_product(tiny_image, tiny_mask, 20, 20, placement="keep")


# ----------------------------------------------------------------------------- place_product: source


BLUE = torch.tensor([0.0, 0.0, 1.0])


def red_on_blue(h=120, w=200, box=(30, 70, 40, 140)):
    """A red rectangular product on a pure blue photo background."""
    image, mask = photo_with_product(h, w, box, colour=(1.0, 0.0, 0.0))
    image[0][mask[0] < 0.5] = BLUE
    return image, mask


def ring(mask2d, inner, outer):
    """Pixels more than `inner` and at most `outer` px (chessboard distance) outside the mask."""
    grow = lambda r: masks.dilate(mask2d, 2 * r + 1) > 0.5 if r else mask2d > 0.5  # noqa: E731
    return grow(outer) & ~grow(inner)


def test_keep_source_is_the_photo_at_the_same_size():
    image, mask = photo_with_product()
    fg, out_mask, source = place_product(image, mask, 200, 120, return_source=True)
    assert torch.equal(source, image)
    fg2, out_mask2 = place_product(image, mask, 200, 120)  # default: the 2-tuple, unchanged
    assert torch.equal(fg, fg2) and torch.equal(out_mask, out_mask2)


def test_keep_source_is_the_photo_resized_like_the_canvas():
    image, mask = photo_with_product(h=100, w=200, box=(20, 80, 50, 150))
    fg, out_mask, source = place_product(image, mask, 256, 256, placement="keep", fill=0.0, return_source=True)
    # 200x100 -> 256x128 at rows 64..191, with the antialiased bilinear filter of F.interpolate
    expected = F.interpolate(image.double().permute(0, 3, 1, 2), size=(128, 256), mode="bilinear",
                             align_corners=False, antialias=True).permute(0, 2, 3, 1).float()
    off = out_mask[0, 64:192] < 0.5
    assert torch.allclose(source[0, 64:192][off], expected[0][off], atol=1e-5)
    assert source[0, :64].eq(0).all() and source[0, 192:].eq(0).all()  # margins: fill


@pytest.mark.parametrize("placement", ["keep", "center"])
@pytest.mark.parametrize("width, height", [(200, 120), (256, 256), (97, 61), (640, 320)])
def test_source_equals_foreground_on_the_mask(placement, width, height):
    image, mask = photo_with_product()
    image2, mask2 = photo_with_product(box=(5, 100, 150, 190))
    image, mask = torch.cat([image, image2]), torch.cat([mask, mask2])
    fg, out_mask, source = place_product(image, mask, width, height, placement=placement, return_source=True)
    fg2, out_mask2 = place_product(image, mask, width, height, placement=placement)
    assert torch.equal(fg, fg2) and torch.equal(out_mask, out_mask2)
    on = (out_mask > 0.5).unsqueeze(-1).expand_as(fg)
    assert torch.equal(source[on], fg[on])
    assert source.shape == fg.shape and source.min() >= 0 and source.max() <= 1
    # per item: each uses its own geometry, same as placing it alone
    for i in range(2):
        alone = place_product(image[i : i + 1], mask[i : i + 1], width, height, placement=placement, return_source=True)
        assert torch.equal(alone[2][0], source[i])


@pytest.mark.parametrize("width, height", [(256, 256), (320, 192), (120, 120)])
def test_center_source_keeps_the_photos_surround(width, height):
    image, mask = red_on_blue()
    fg, out_mask, source = place_product(image, mask, width, height, placement="center", return_source=True)
    m = out_mask[0]
    assert fg[0][ring(m, 0, 4)].eq(1.0).all()  # the foreground is filled there: the old halo colour
    near = source[0][ring(m, 0, 1)]  # the edge row: red and blue mixed by the filter, never fill
    assert near[:, 1].eq(0).all() and torch.allclose(near.sum(-1), torch.ones(len(near)), atol=1e-5)
    assert torch.allclose(source[0][ring(m, 2, 16)], BLUE, atol=1e-6)  # the photo reaches >= 16 px here


def test_center_source_reaches_the_margin_then_fill():
    image, mask = red_on_blue()  # bbox 40 x 100 scaled by 1.536 into 256 x 256, rows 97..158
    _, out_mask, source = place_product(image, mask, 256, 256, placement="center", fill=0.5, return_source=True)
    y0, y1, x0, x1 = bbox(out_mask[0])
    column = source[0, :, (x0 + x1) // 2]
    assert torch.allclose(column[y0 - SOURCE_MARGIN : y0 - 1], BLUE, atol=1e-6)
    assert column[: y0 - SOURCE_MARGIN - 8].eq(0.5).all()  # beyond the margin: fill


def test_center_source_is_fill_where_the_photo_ends():
    image, mask = red_on_blue(box=(30, 70, 100, 200))  # the product touches the photo's right edge
    _, out_mask, source = place_product(image, mask, 256, 256, placement="center", fill=0.5, return_source=True)
    y0, y1, x0, x1 = bbox(out_mask[0])
    row = source[0, (y0 + y1) // 2]
    assert torch.allclose(row[x0 - SOURCE_MARGIN : x0 - 1], BLUE, atol=1e-6)
    assert row[x1:].eq(0.5).all()


@pytest.mark.parametrize(
    "width, height, box_ratio", [(256, 256, (0.6, 0.6)), (97, 61, (0.5, 0.7)), (320, 192, (0.9, 0.3))]
)
def test_center_source_follows_the_foregrounds_map_around_the_product(width, height, box_ratio):
    # A photo whose colour is its own pixel-centre coordinate, so every placed pixel says where
    # it came from; the source's ring must continue the map that put the product on the mask.
    h, w = 120, 200
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    image = torch.stack([ys / h, xs / w, torch.zeros(h, w)], dim=-1).unsqueeze(0)
    mask = torch.zeros(1, h, w)
    mask[0, 30:70, 40:140] = 1
    _, out_mask, source = place_product(image, mask, width, height, placement="center", box_ratio=box_ratio,
                                        return_source=True)
    # the product rectangle [30, 70) x [40, 140) lands exactly on the mask's bounding box
    top, bottom, left, right = bbox(out_mask[0])
    sy, sx = 40 / (bottom - top), 100 / (right - left)  # source px per canvas px
    cy, cx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    expected = torch.stack([30 + (cy - top) * sy, 40 + (cx - left) * sx], dim=-1)  # source px
    support = max(sy, sx, 1.0) + 0.5  # keep the filter footprint inside the photo
    inside_photo = (expected[..., 0] > support) & (expected[..., 0] < h - support)
    inside_photo &= (expected[..., 1] > support) & (expected[..., 1] < w - support)
    inner = ring(out_mask[0], 2, SOURCE_MARGIN - 3) & inside_photo
    assert inner.sum() > 1000
    got = source[0][..., :2] * torch.tensor([h, w])
    # Upscaling, the triangle filter reproduces a linear image exactly; downscaling by a
    # non-integer ratio it is off by up to ~0.04 px (so is F.interpolate's). Half a canvas
    # pixel of misalignment would be >= 0.5 source px.
    tolerance = 1e-3 if max(sy, sx) < 1 else 0.1
    assert (got[inner] - expected[inner]).abs().max() < tolerance


@pytest.mark.parametrize("width, height", [(256, 256), (97, 61), (320, 192), (64, 64)])
def test_center_source_matches_f_interpolate_of_the_bbox(width, height):
    # Texture everywhere; the mask is only the bbox's outline, so inside it the source is the
    # plain resampled photo, which must match F.interpolate of the bbox crop pixel for pixel.
    image = torch.rand(1, 120, 200, 3)
    mask = torch.zeros(1, 120, 200)
    mask[0, 30:70, 40:140] = 1
    mask[0, 33:67, 43:137] = 0
    fg, out_mask, source = place_product(image, mask, width, height, placement="center", return_source=True)
    top, bottom, left, right = bbox(out_mask[0])
    crop = image[:, 30:70, 40:140].double().permute(0, 3, 1, 2)
    expected = F.interpolate(crop, size=(bottom - top, right - left), mode="bilinear", align_corners=False,
                             antialias=True)[0].permute(1, 2, 0).float()
    # away from the crop's border (where F.interpolate truncates its filter at the crop while
    # the source sees the photo beyond) and off the mask (where source is the foreground)
    core = masks.erode(torch.ones(bottom - top, right - left), 2 * math.ceil(max(40 / (bottom - top), 1) + 1) + 1) > 0.5
    core &= out_mask[0, top:bottom, left:right] < 0.5
    assert core.sum() > 20
    assert torch.allclose(source[0, top:bottom, left:right][core], expected[core], atol=1e-5)


# ----------------------------------------------------------------------------- paste_back


def soft_blob_mask(b, h, w):
    m = torch.zeros(b, h, w)
    m[:, h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = 0.9
    m[:, h // 2, w // 5 - 3 : w // 5] = 0.6  # a thin soft protrusion
    m[:, 2, 2] = 0.45  # below threshold: background
    return m


@pytest.mark.parametrize("with_source", [False, True])
@pytest.mark.parametrize("radius", [0, 1, 3, 8])
def test_paste_back_is_bit_identical_on_the_mask(radius, with_source):
    generated, foreground = torch.rand(2, 48, 64, 3), torch.rand(2, 48, 64, 3)
    mask = soft_blob_mask(2, 48, 64)
    source = torch.rand(2, 48, 64, 3) if with_source else None
    out = paste_back(generated, foreground, mask, feather=radius, source=source)
    on = (mask > 0.5).unsqueeze(-1).expand_as(out)
    assert torch.equal(out[on], foreground[on])
    reach = (masks.dilate(masks.binarize(mask), 2 * radius + 1) > 0.5).unsqueeze(-1).expand_as(out)
    assert torch.equal(out[~reach], generated[~reach])  # far background untouched
    assert out.min() >= 0 and out.max() <= 1


def test_paste_back_feather_blends_the_ring():
    generated, foreground = torch.zeros(1, 32, 32, 3), torch.ones(1, 32, 32, 3)
    mask = torch.zeros(1, 32, 32)
    mask[0, 8:24, 8:24] = 1
    out = paste_back(generated, foreground, mask, feather=4)
    row = out[0, 16, 24:30, 0]
    assert (row[1:] <= row[:-1]).all() and 0 < row[0] < 1 and row[-1] == 0


@pytest.mark.parametrize("feather", [1, 4, 12])
def test_paste_back_with_source_leaves_no_fill_halo(feather):
    image, mask = red_on_blue()
    fg, out_mask, source = place_product(image, mask, 256, 256, placement="center", return_source=True)
    generated = torch.rand(1, 256, 256, 3) * 0.6  # never white
    alpha = masks.feather(out_mask, feather).unsqueeze(-1)
    halo = ((alpha > 0) & (alpha < 1))[0, ..., 0]  # the feather ramp, outside the mask

    old = paste_back(generated, fg, out_mask, feather=feather)
    assert old[0][halo][:, 1].max() > 0.5  # without source the white fill shows (green channel)

    out = paste_back(generated, fg, out_mask, feather=feather, source=source)
    expected = alpha * source + (1 - alpha) * generated  # a mix of the photo and the generated image
    assert torch.allclose(out[0][halo], expected[0][halo], atol=1e-6)
    assert out[0][halo][:, 1].max() <= 0.6  # no fill anywhere: green only from `generated`
    on = out_mask[0] > 0.5
    assert torch.equal(out[0][on], fg[0][on])
    reach = masks.dilate(out_mask[0], 2 * feather + 1) > 0.5
    assert torch.equal(out[0][~reach], generated[0][~reach])


def test_paste_back_broadcasts_a_single_foreground():
    generated, foreground = torch.rand(3, 16, 16, 3), torch.rand(1, 16, 16, 3)
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    out = paste_back(generated, foreground, mask)
    assert out.shape == (3, 16, 16, 3)
    assert torch.equal(out[2, 4:12, 4:12], foreground[0, 4:12, 4:12])


def test_paste_back_size_and_batch_mismatch():
    mask = torch.ones(1, 16, 16)
    with pytest.raises(InputError, match=r"sizes differ \(generated 20x16"):
        paste_back(torch.rand(1, 16, 20, 3), torch.rand(1, 16, 16, 3), mask)
    with pytest.raises(InputError, match="batch sizes do not match"):
        paste_back(torch.rand(2, 16, 16, 3), torch.rand(3, 16, 16, 3), mask)
    with pytest.raises(InputError, match=r"sizes differ \(.*source 20x16"):
        paste_back(torch.rand(1, 16, 16, 3), torch.rand(1, 16, 16, 3), mask, source=torch.rand(1, 16, 20, 3))
    with pytest.raises(InputError, match="source: 2"):
        paste_back(torch.rand(3, 16, 16, 3), torch.rand(1, 16, 16, 3), mask, source=torch.rand(2, 16, 16, 3))


# ----------------------------------------------------------------------------- match_color


def test_match_color_undoes_a_colour_shift_near_the_product():
    base = torch.rand(1, 64, 64, 3) * 0.6 + 0.2
    mask = torch.zeros(1, 64, 64)
    mask[0, 20:44, 20:44] = 1
    foreground = torch.where(mask.unsqueeze(-1) > 0.5, base, torch.ones(()))
    # the model rendered everything with a per-channel colour cast
    gain, offset = torch.tensor([0.8, 1.1, 0.9]), torch.tensor([0.1, -0.05, 0.05])
    generated = base * gain + offset
    out = match_color(generated, foreground, mask, ring=6)

    error_before = (generated - base).abs().mean(-1)[0]
    error_after = (out - base).abs().mean(-1)[0]
    assert error_after[20:44, 20:44].max() < 0.01  # full correction on the product
    # just outside the mask the cast shrinks, more so closer to the product
    assert error_after[32, 44] < 0.5 * error_before[32, 44]
    errs = [float(error_after[20:44, c].mean() / error_before[20:44, c].mean()) for c in range(44, 51)]
    assert all(a <= b + 1e-6 for a, b in zip(errs, errs[1:]))
    # beyond the ring the generated background is untouched
    assert torch.equal(out[0, :, 51:], generated[0, :, 51:])
    assert out.min() >= 0 and out.max() <= 1


def test_match_color_ring_zero_and_validation():
    generated = torch.rand(1, 16, 16, 3)
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:12, 4:12] = 1
    assert torch.equal(match_color(generated, generated, mask, ring=0), generated)
    with pytest.raises(InputError, match="ring"):
        match_color(generated, generated, mask, ring=-1)
