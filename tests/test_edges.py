"""Colour decontamination (edges.estimate_foreground) and the paths that use it: paste_back with a
matte, place_product's matte, the pipeline's decontaminate option; and per-image seeds."""

import numpy as np
import pytest
import torch

from dreampainter_core.edges import box_blur, estimate_foreground
from dreampainter_core.errors import InputError
from dreampainter_core.options import SamplingOptions
from dreampainter_core.product import paste_back, place_product
from test_pipeline import PROMPT, SIZE, _product, base_pipe  # noqa: F401 (fixture)


def _disc_matte(size=96, radius=30, supersample=4):
    """A disc's exact coverage per pixel (supersampled): a soft 0..1 edge, 1 inside."""
    n = size * supersample
    y, x = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
    inside = (((y - n / 2) ** 2 + (x - n / 2) ** 2) <= (radius * supersample) ** 2).float()
    return inside.view(size, supersample, size, supersample).mean(dim=(1, 3))[None]


def test_box_blur_is_the_mean_over_the_clipped_window():
    x = torch.rand(1, 9, 11, 2, dtype=torch.float64)
    out = box_blur(x, 2)
    expected = torch.empty_like(x)
    for i in range(9):
        for j in range(11):
            expected[0, i, j] = x[0, max(0, i - 2):i + 3, max(0, j - 2):j + 3].mean(dim=(0, 1))
    assert torch.allclose(out, expected, atol=1e-12)


def test_foreground_under_a_white_backdrop_is_recovered_at_the_soft_edge():
    alpha = _disc_matte()
    product, backdrop = torch.tensor([0.8, 0.1, 0.2]), torch.ones(3)
    photo = alpha[..., None] * product + (1 - alpha[..., None]) * backdrop
    estimate = estimate_foreground(photo, alpha)
    edge = (alpha > 0.02) & (alpha < 0.98)
    assert int(edge.sum()) > 100
    raw_error = (photo[edge] - product).abs().max()
    assert raw_error > 0.5  # the raw edge pixels are mostly backdrop
    assert (estimate[edge] - product).abs().max() < 0.02
    inside = alpha >= 1.0
    assert torch.equal(estimate[inside], photo[inside])  # exact where the matte is 1


def test_estimate_foreground_says_which_shapes_it_needs():
    with pytest.raises(InputError, match=r"image must be \[B, H, W, 3\]"):
        estimate_foreground(torch.rand(8, 8, 3), torch.rand(8, 8))
    with pytest.raises(InputError, match="matte of the image's size"):
        estimate_foreground(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 9))


def test_paste_back_with_a_matte_leaves_no_backdrop_fringe_on_a_dark_background():
    alpha = _disc_matte()
    product = torch.tensor([0.8, 0.1, 0.2])
    photo = alpha[..., None] * product + (1 - alpha[..., None]) * torch.ones(3)
    dark = torch.full((1, 96, 96, 3), 0.05)
    truth = alpha[..., None] * product + (1 - alpha[..., None]) * dark
    hard = (alpha > 0.5).float()
    edge = (alpha > 0.02) & (alpha < 0.98)
    plain = paste_back(dark, photo, hard, feather=1, source=photo)
    clean = paste_back(dark, photo, hard, source=photo, matte=alpha)
    fringe = lambda img: float(((img - truth)[edge] ** 2).mean())  # noqa: E731
    assert fringe(clean) < 0.05 * fringe(plain)
    full = alpha >= 1.0
    assert torch.equal(clean[full], photo[full])


def test_place_product_matte_is_the_soft_mask_on_the_source_geometry():
    image, mask = _product()
    soft = torch.nn.functional.avg_pool2d(mask[None, None], 5, 1, 2)[0, 0]
    fg, canvas_mask, source = place_product(image, soft, 160, 128, placement="center", return_source=True)
    fg2, canvas_mask2, source2, matte = place_product(image, soft, 160, 128, placement="center", return_source=True,
                                                      return_matte=True)
    assert torch.equal(fg, fg2) and torch.equal(canvas_mask, canvas_mask2) and torch.equal(source, source2)
    assert matte.shape == canvas_mask.shape and 0 < float(matte.min() + 1) and float(matte.max()) <= 1
    assert ((matte > 0.5) == (canvas_mask > 0.5)).float().mean() > 0.99  # same product, soft edge
    assert ((matte > 0) & (matte < 1)).sum() > ((canvas_mask > 0) & (canvas_mask < 1)).sum()


def test_decontaminate_off_is_the_old_path_and_on_softens_only_the_edge(base_pipe):  # noqa: F811
    image, mask = _product()
    kwargs = dict(steps=2, seed=5, guidance_scale=1.0)
    default = base_pipe(PROMPT, image, mask, **kwargs)
    off = base_pipe(PROMPT, image, mask, decontaminate=False, **kwargs)
    assert torch.equal(default, off)
    soft = torch.nn.functional.avg_pool2d(mask[None, None], 5, 1, 2)[0, 0]
    on = base_pipe(PROMPT, image, soft, decontaminate=True, **kwargs)
    off = base_pipe(PROMPT, image, soft, decontaminate=False, **kwargs)  # the same sampling, plain paste-back
    full = (soft >= 1.0)[None]
    assert torch.equal(on[full], image[None][full])  # the product itself stays exact
    far = (torch.nn.functional.max_pool2d(soft[None, None], 9, 1, 4)[0] == 0)
    assert torch.equal(on[far], off[far])  # the background away from the edge is the same picture


def test_per_image_seeds_give_each_image_its_own_noise(base_pipe):  # noqa: F811
    image, mask = _product()
    single = base_pipe(PROMPT, image, mask, steps=2, seed=11, guidance_scale=1.0)
    request = base_pipe.prepare(image, mask, batch_size=1,
                                sampling=SamplingOptions(steps=2, seed=0, guidance_scale=1.0, image_seeds=[11]))
    embeds = base_pipe.encode_prompt([PROMPT])
    assert torch.equal(base_pipe.generate(request, embeds, None).images, single)  # seeds (s,) == seed s
    request = base_pipe.prepare(image, mask, batch_size=2,
                                sampling=SamplingOptions(steps=2, seed=0, guidance_scale=1.0, image_seeds=[3, 11]))
    pair = base_pipe.generate(request, embeds, None).images
    # the same image as alone, up to the float sums of a batched matmul
    assert float((pair[1] - single[0]).abs().max()) < 2e-3
    assert float((pair[0] - pair[1]).abs().max()) > 0.05
    with pytest.raises(InputError, match="got 1 seeds for a batch of 2"):
        base_pipe.prepare(image, mask, batch_size=2, sampling=SamplingOptions(image_seeds=[3]))
    with pytest.raises(InputError, match="image_seeds must be a non-empty list"):
        SamplingOptions(image_seeds="12")
