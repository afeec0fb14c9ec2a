import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter_core import masks
from dreampainter_core.errors import InputError
from dreampainter_core.product import match_color, paste_back, place_product


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


# ----------------------------------------------------------------------------- paste_back


def soft_blob_mask(b, h, w):
    m = torch.zeros(b, h, w)
    m[:, h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = 0.9
    m[:, h // 2, w // 5 - 3 : w // 5] = 0.6  # a thin soft protrusion
    m[:, 2, 2] = 0.45  # below threshold: background
    return m


@pytest.mark.parametrize("radius", [0, 1, 3, 8])
def test_paste_back_is_bit_identical_on_the_mask(radius):
    generated, foreground = torch.rand(2, 48, 64, 3), torch.rand(2, 48, 64, 3)
    mask = soft_blob_mask(2, 48, 64)
    out = paste_back(generated, foreground, mask, feather=radius)
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
