import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter_core.errors import InputError
from dreampainter_core.images import as_image_batch, as_mask_batch, check_product_and_mask


def rgb_array(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def product_mask(h=6, w=8):
    m = np.zeros((h, w), dtype=np.float32)
    m[1:4, 2:6] = 1
    return m


# ----------------------------------------------------------------------------- as_image_batch


def test_numpy_uint8_hwc_becomes_unit_float_batch():
    arr = rgb_array()
    out = as_image_batch(arr)
    assert out.shape == (1, 6, 8, 3) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.from_numpy(arr).float() / 255)


def test_alpha_channel_is_dropped_and_batches_kept():
    arr = np.concatenate([rgb_array(), np.full((6, 8, 1), 7, np.uint8)], axis=-1)
    out = as_image_batch(np.stack([arr, arr]))
    assert out.shape == (2, 6, 8, 3)
    assert torch.allclose(out[1], torch.from_numpy(arr[..., :3]).float() / 255)


def test_float_tensor_passes_through_and_tiny_overshoot_is_clamped():
    t = torch.rand(2, 5, 4, 3, dtype=torch.float64)
    assert torch.equal(as_image_batch(t), t.float())
    t[0, 0, 0, 0] = 1.0005
    assert as_image_batch(t).max() == 1.0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_pil_modes_convert_to_rgb(mode):
    img = Image.fromarray(rgb_array()).convert(mode)
    out = as_image_batch(img)
    assert out.shape == (1, 6, 8, 3)
    expected = torch.from_numpy(np.array(img.convert("RGB"))).float() / 255
    assert torch.allclose(out[0], expected)


def test_image_errors_name_the_input_and_say_what_to_do():
    with pytest.raises(InputError, match=r"reference: expected an image of shape .*\[B, H, W, 3\]"):
        as_image_batch(np.zeros((4, 4)), name="reference")
    with pytest.raises(InputError, match="channels-first"):
        as_image_batch(torch.zeros(1, 3, 8, 8))
    with pytest.raises(InputError, match="grayscale"):
        as_image_batch(torch.zeros(8, 8, 1))
    with pytest.raises(InputError, match="NaN or infinite"):
        as_image_batch(torch.full((4, 4, 3), float("nan")))
    with pytest.raises(InputError, match="NaN or infinite"):
        as_image_batch(torch.full((4, 4, 3), float("inf")))
    with pytest.raises(InputError, match="if your image is 0..255, divide by 255"):
        as_image_batch(torch.full((4, 4, 3), 200.0))
    with pytest.raises(InputError, match="0..1"):
        as_image_batch(torch.full((4, 4, 3), -0.1))
    with pytest.raises(InputError, match="empty"):
        as_image_batch(torch.zeros(1, 0, 4, 3))
    with pytest.raises(InputError, match="uint8"):
        as_image_batch(np.zeros((4, 4, 3), dtype=np.int32))
    with pytest.raises(InputError, match="PIL image, numpy array or torch tensor"):
        as_image_batch([[0.0]])


# ----------------------------------------------------------------------------- as_mask_batch


@pytest.mark.parametrize(
    "mask, shape",
    [
        (np.zeros((6, 8), np.float32), (1, 6, 8)),
        (torch.zeros(3, 6, 8), (3, 6, 8)),
        (torch.zeros(3, 1, 6, 8), (3, 6, 8)),
    ],
)
def test_mask_shapes(mask, shape):
    assert as_mask_batch(mask).shape == shape


def test_mask_dtypes():
    m = product_mask()
    assert torch.equal(as_mask_batch(m > 0.5)[0], torch.from_numpy(m))
    assert torch.equal(as_mask_batch((m * 255).astype(np.uint8))[0], torch.from_numpy(m))
    # 0/1 uint8 masks (segmentation PNGs) are labels, not near-black 0..255 levels
    assert torch.equal(as_mask_batch(m.astype(np.uint8))[0], torch.from_numpy(m))
    assert torch.allclose(as_mask_batch(np.full((2, 2), 128, np.uint8)), torch.full((1, 2, 2), 128 / 255))
    assert torch.equal(as_mask_batch(torch.from_numpy(m).long())[0], torch.from_numpy(m))


def test_pil_masks_l_1_rgba_alpha_and_rgb_luminance():
    m = product_mask()
    levels = (m * 255).astype(np.uint8)
    expected = torch.from_numpy(m)
    assert torch.equal(as_mask_batch(Image.fromarray(levels, "L"))[0], expected)
    assert torch.equal(as_mask_batch(Image.fromarray(levels, "L").convert("1"))[0], expected)
    # RGBA: the alpha is the mask (a cut-out product), whatever the colours
    rgba = np.concatenate([rgb_array(), levels[..., None]], axis=-1)
    assert torch.equal(as_mask_batch(Image.fromarray(rgba, "RGBA"))[0], expected)
    # fully opaque RGBA: the picture itself is the mask
    opaque = np.concatenate([np.repeat(levels[..., None], 3, -1), np.full((6, 8, 1), 255, np.uint8)], -1)
    assert torch.equal(as_mask_batch(Image.fromarray(opaque, "RGBA"))[0], expected)
    rgb = Image.fromarray(np.repeat(levels[..., None], 3, -1), "RGB")
    assert torch.equal(as_mask_batch(rgb)[0], expected)


def test_mask_errors():
    with pytest.raises(InputError, match=r"mask: expected a mask of shape"):
        as_mask_batch(torch.zeros(2, 2, 6, 8))
    with pytest.raises(InputError, match="looks like an image"):
        as_mask_batch(torch.zeros(1, 6, 8, 3))
    with pytest.raises(InputError, match="NaN or infinite"):
        as_mask_batch(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(InputError, match="if your mask is 0..255, divide by 255"):
        as_mask_batch(torch.tensor([[0.0, 255.0]]))
    with pytest.raises(InputError, match="label map"):
        as_mask_batch(torch.tensor([[0, 3]]))
    with pytest.raises(InputError, match="empty"):
        as_mask_batch(torch.zeros(0, 4))


# ----------------------------------------------------------------------------- check_product_and_mask


def test_check_product_and_mask_converts_and_broadcasts():
    product, mask = check_product_and_mask(rgb_array(), np.stack([product_mask()] * 3))
    assert product.shape == (3, 6, 8, 3) and mask.shape == (3, 6, 8)
    assert torch.equal(product[0], product[2])
    product, mask = check_product_and_mask(np.stack([rgb_array(seed=1), rgb_array(seed=2)]), product_mask())
    assert mask.shape == (2, 6, 8) and torch.equal(mask[0], mask[1])


def test_check_size_mismatch_gives_both_sizes():
    with pytest.raises(InputError, match=r"mask size 4x6 .* product image size 8x6.*resize the mask.*product-prep"):
        check_product_and_mask(rgb_array(), np.ones((6, 4), np.float32))


def test_check_batch_mismatch():
    with pytest.raises(InputError, match="batch"):
        check_product_and_mask(np.stack([rgb_array()] * 2), np.stack([product_mask()] * 3))


def test_check_empty_and_full_masks_name_the_item():
    masks = np.stack([product_mask(), np.full((6, 8), 0.4, np.float32)])  # 0.4 < 0.5: empty
    with pytest.raises(InputError, match="mask for image 1 is empty: nothing marks the product; 1 = product"):
        check_product_and_mask(rgb_array(), masks)
    masks = np.stack([np.full((6, 8), 0.6, np.float32), product_mask()])
    with pytest.raises(InputError, match="mask for image 0 covers the whole image: there is no background left"):
        check_product_and_mask(rgb_array(), masks)
