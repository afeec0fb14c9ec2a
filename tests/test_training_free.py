"""Training-free mode: the product held on its own noised trajectory, with no DreamPainter weights."""

import pytest
import torch

from dreampainter_core.errors import InputError
from dreampainter_core.options import ControlOptions, SamplingOptions
from dreampainter_core.pipeline import KnownRegion

from test_pipeline import PROMPT, SIZE, _CountCalls, _product, _reference_image  # noqa: F401
from test_pipeline import base_pipe, stage2_pipe  # noqa: F401 (fixtures)


def test_an_empty_known_region_is_plain_cogview4(tiny_model_dir, base_pipe):
    """At the sampler level (the public API refuses an empty mask): nothing held = CogView4Pipeline T2I."""
    from diffusers import CogView4Pipeline

    reference = CogView4Pipeline.from_pretrained(tiny_model_dir)
    steps, guidance = 4, 3.5
    theirs = reference(PROMPT, negative_prompt="", height=SIZE, width=SIZE, num_inference_steps=steps,
                       guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(7),
                       output_type="pt").images.permute(0, 2, 3, 1)
    noise = torch.randn((1, 16, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(7))
    known = KnownRegion(torch.rand(1, 16, SIZE // 8, SIZE // 8), torch.zeros(1, 1, SIZE // 8, SIZE // 8), 0.0)
    latents = base_pipe.sample(noise, base_pipe.encode_prompt([PROMPT]), base_pipe.encode_prompt([""]), height=SIZE,
                               width=SIZE, sampling=SamplingOptions(steps=steps, guidance_scale=guidance), known=known)
    ours = base_pipe.decode(latents)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.std() > 0.01


def test_without_harmonizing_the_product_region_stays_on_its_noised_trajectory(base_pipe):
    product, mask = _product()
    steps, seed = 5, 13
    seen = []
    out = base_pipe(PROMPT, product, mask, steps=steps, seed=seed, guidance_scale=2.0, paste_back=False,
                    mode="training_free", harmonize=0.0, region_feather=0,
                    callback=lambda info: seen.append(info.latents.clone()), return_dict=True)
    assert out.mode == "training_free" and len(seen) == steps
    product_latents = base_pipe.encode_image(out.foreground)
    hard = base_pipe.latent_mask(out.mask) == 1.0  # latent pixels wholly inside the product
    assert hard.sum() > 4
    noise = torch.randn(product_latents.shape, generator=torch.Generator("cpu").manual_seed(seed))
    seq_len = (SIZE // 16) ** 2
    scheduler, timesteps = base_pipe.schedule(steps, seq_len)
    sigmas = scheduler.sigmas[-len(timesteps) - 1:]
    hard = hard.expand_as(product_latents)
    for i, latents in enumerate(seen):
        sigma = float(sigmas[i + 1])
        expected = sigma * noise + (1 - sigma) * product_latents
        assert torch.equal(latents[hard], expected[hard]), f"step {i}"
    assert torch.equal(seen[-1][hard], product_latents[hard])  # sigma 0: the product latent itself
    # ...while the background was generated (not held).
    assert (seen[-1][~hard] - product_latents[~hard]).abs().mean() > 0.05


def test_harmonize_releases_the_last_steps(base_pipe):
    product, mask = _product()
    region = base_pipe.known_region(*_placed(base_pipe, product, mask), ControlOptions(harmonize=0.4, region_feather=0))
    inside = region.strength == 1.0
    assert region.held(0.6)[inside].all() and not region.held(0.61)[inside].any()
    feathered = base_pipe.known_region(*_placed(base_pipe, product, mask), ControlOptions(harmonize=0.0, region_feather=16))
    ramp = (feathered.strength > 0) & (feathered.strength < 1)
    assert ramp.any()  # a soft edge: those pixels are held for part of the steps only
    assert feathered.held(0.0)[ramp].all() and not feathered.held(1.0)[ramp].any()


def test_latent_pixels_mostly_backdrop_are_not_held(base_pipe):
    """Holding a latent pixel that is mostly the product canvas's white paints a white halo."""
    product, _ = _product()
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 27:78, 35:90] = 1.0  # edges off the 8 px latent grid: partly covered latent pixels
    region = base_pipe.known_region(product[None], mask, ControlOptions(harmonize=0.0))
    coverage = base_pipe.latent_mask(mask)
    assert ((coverage > 0) & (coverage <= 0.5)).any() and ((coverage > 0.5) & (coverage < 1)).any()
    assert (region.strength[coverage <= 0.5] == 0).all()
    assert (region.strength[coverage == 1] == 1).all()
    partial = (coverage > 0.5) & (coverage < 1)
    assert torch.allclose(region.strength[partial], 2 * coverage[partial] - 1)


def _placed(pipe, product, mask):
    from dreampainter_core.product import place_product

    return place_product(product, mask, SIZE, SIZE)


def test_auto_mode_is_visible_and_training_free_runs_on_dreampainter_weights(base_pipe, stage2_pipe, monkeypatch):
    product, mask = _product()
    kwargs = dict(steps=3, seed=1, paste_back=False, return_dict=True)
    assert base_pipe(PROMPT, product, mask, **kwargs).mode == "training_free"
    auto = stage2_pipe(PROMPT, product, mask, **kwargs)
    assert auto.mode == "dreampainter"
    assert torch.equal(stage2_pipe(PROMPT, product, mask, mode="dreampainter", **kwargs).images, auto.images)
    calls = []
    forward = stage2_pipe.transformer.forward
    monkeypatch.setattr(stage2_pipe.transformer, "forward",
                        lambda *a, **k: calls.append(k.get("control_latents")) or forward(*a, **k))
    free = stage2_pipe(PROMPT, product, mask, mode="training_free", **kwargs)
    assert free.mode == "training_free" and all(c is None for c in calls)  # the control branch is not used
    assert (free.images - auto.images).abs().max() > 1e-3


def test_training_free_reference_init_starts_from_the_product_over_the_reference(base_pipe, monkeypatch):
    product, mask = _product()
    reference = _reference_image()
    kwargs = dict(steps=4, seed=2, paste_back=False, mode="training_free")
    plain = base_pipe(PROMPT, product, mask, **kwargs)
    # Strength 1 repaints from pure noise: the reference no longer matters.
    assert torch.equal(base_pipe(PROMPT, product, mask, reference=reference, reference_strength=1.0, **kwargs), plain)
    seen = {}
    sample = base_pipe.sample
    monkeypatch.setattr(base_pipe, "sample", lambda *a, **k: seen.update(k) or sample(*a, **k))
    low = base_pipe(PROMPT, product, mask, reference=reference, reference_strength=0.3, **kwargs)
    foreground, canvas_mask = _placed(base_pipe, product, mask)
    backdrop = base_pipe.product_over_reference(foreground, canvas_mask, reference[None])
    assert seen["sampling"].denoise == 0.3
    assert torch.equal(seen["init_latents"], base_pipe.encode_image(backdrop))
    assert seen["control_latents"] is None and seen["reference_latents"] is None
    assert (low - plain).abs().max() > 1e-3
    # The backdrop is the reference on the canvas with the product over it.
    inside = canvas_mask[0] > 0.5
    assert torch.equal(backdrop[0][inside], foreground[0][inside])
    with pytest.raises(InputError, match="reference_strength is the denoise"):
        base_pipe(PROMPT, product, mask, reference=reference, denoise=0.5, **kwargs)


def test_in_context_reference_is_cut_exactly_by_renormalized_zero_attention(base_pipe, monkeypatch):
    product, mask = _product()
    reference = _reference_image()
    kwargs = dict(steps=3, seed=4, paste_back=False, mode="training_free", guidance_scale=1.0)
    plain = base_pipe(PROMPT, product, mask, **kwargs)
    seen = []
    forward = base_pipe.transformer.forward
    monkeypatch.setattr(base_pipe.transformer, "forward",
                        lambda *a, **k: seen.append((k.get("reference_latents"), k.get("reference_layout")))
                        or forward(*a, **k))
    ctx = dict(reference=reference, training_free_reference="in_context", **kwargs)
    followed = base_pipe(PROMPT, product, mask, **ctx)
    refs = [r for r, _ in seen if r is not None]
    assert len(refs) == 3 and all(layout == "beside" for _, layout in seen)
    assert (refs[0] - refs[-1]).abs().mean() > 0.1  # noised to each step's sigma, not fixed
    cut = base_pipe(PROMPT, product, mask, attention_scale=0.0, renormalize_attention=True, **ctx)
    assert (cut - plain).abs().max() <= 1e-5
    assert (followed - plain).abs().max() > 1e-3


def _hole(size=SIZE):
    hole = torch.zeros(size, size)
    hole[40:90, 30:100] = 1
    return hole


def test_inpaint_keeps_every_context_pixel_and_paints_the_hole(base_pipe, stage2_pipe):
    context = torch.rand(1, SIZE, SIZE, 3)
    hole = _hole()
    for pipe in (base_pipe, stage2_pipe):  # any model: the control branch is not used
        out = pipe.inpaint(PROMPT, context, hole, sampling=SamplingOptions(steps=3, seed=1), return_dict=True)
        kept = (hole < 0.5)
        assert torch.equal(out.images[0][kept], context[0][kept])
        assert (out.images[0][~kept] - context[0][~kept]).abs().mean() > 0.05
        assert out.mode == "inpaint"


def test_inpaint_refuses_a_mask_with_nothing_to_generate_or_nothing_to_keep(base_pipe, monkeypatch):
    monkeypatch.setattr(base_pipe, "sample", lambda *a, **k: pytest.fail("sampled despite a bad mask"))
    context = torch.rand(SIZE, SIZE, 3)
    with pytest.raises(InputError, match="nothing to generate"):
        base_pipe.inpaint(PROMPT, context, torch.zeros(SIZE, SIZE))
    with pytest.raises(InputError, match="no context to keep"):
        base_pipe.inpaint(PROMPT, context, torch.ones(SIZE, SIZE))
    with pytest.raises(InputError, match="does not match the image"):
        base_pipe.inpaint(PROMPT, context, torch.ones(SIZE, SIZE + 16))
