"""DreamPainterPipeline on the tiny model: equivalence with diffusers, controls, and input errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter_core import CapabilityError, DreamPainterPipeline, InputError, ModelFilesError
from dreampainter_core.pipeline import REAL_MODEL_SIZES, GenerationCancelled

SIZE = 128
PROMPT = "a red bottle on a white marble table, green leaves, soft light"


def _product(batch=None, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (size, size, 3) if batch is None else (batch, size, size, 3)
    image = torch.rand(shape, generator=g)
    mask = torch.zeros(shape[:-1])
    mask[..., size // 4 : size // 2 + 8, size // 3 : size // 2 + 16] = 1.0
    return image, mask


@pytest.fixture(scope="module")
def base_pipe(tiny_model_dir):
    return DreamPainterPipeline.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def stage2_pipe(tiny_model_dir, tiny_stage2_weights):
    return DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=tiny_stage2_weights)


@pytest.fixture(scope="module")
def stage1_pipe(tiny_model_dir, tiny_stage1_weights):
    return DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=tiny_stage1_weights)


def test_matches_diffusers_cogview4_pipeline(tiny_model_dir, base_pipe):
    from diffusers import CogView4Pipeline

    reference = CogView4Pipeline.from_pretrained(tiny_model_dir)
    product, mask = _product()
    for steps, guidance, neg in [(4, 3.5, ""), (3, 5.0, "blurry, dark"), (2, 1.0, "")]:
        ours = base_pipe(PROMPT, product, mask, negative_prompt=neg, steps=steps, guidance_scale=guidance, seed=7,
                         paste_back=False, mode="dreampainter")
        theirs = reference(
            PROMPT, negative_prompt=neg, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(7), output_type="pt",
        ).images.permute(0, 2, 3, 1)
        assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert ours.std() > 0.01  # not a blank image: the comparison means something


def test_seed_is_deterministic_and_matters(stage2_pipe):
    product, mask = _product()
    a = stage2_pipe(PROMPT, product, mask, steps=2, seed=3)
    b = stage2_pipe(PROMPT, product, mask, steps=2, seed=3)
    c = stage2_pipe(PROMPT, product, mask, steps=2, seed=4)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_paste_back_keeps_product_pixels_bit_identical(stage2_pipe):
    product, mask = _product(batch=2)
    out = stage2_pipe([PROMPT, "a blue cup"], product, mask, steps=2, seed=0, feather=3)
    hard = mask > 0.5
    assert torch.equal(out[hard], product[hard])
    raw = stage2_pipe([PROMPT, "a blue cup"], product, mask, steps=2, seed=0, paste_back=False)
    assert not torch.equal(raw[hard], product[hard])  # the model alone does not give them back exactly
    # Away from the product paste-back changes nothing but the 1-3 px feather ramp.
    assert out.shape == (2, SIZE, SIZE, 3) and (out - raw).abs()[~hard].mean() < (out - raw).abs()[hard].mean()


def test_lora_scale_zero_equals_stage1_model(stage1_pipe, stage2_pipe):
    product, mask = _product()
    kwargs = dict(steps=3, seed=5, paste_back=False)
    stage1 = stage1_pipe(PROMPT, product, mask, **kwargs)
    assert torch.equal(stage2_pipe(PROMPT, product, mask, lora_scale=0.0, **kwargs), stage1)
    assert (stage2_pipe(PROMPT, product, mask, lora_scale=1.0, **kwargs) - stage1).abs().max() > 1e-4


def test_reference_and_sliders_change_the_result(stage2_pipe):
    product, mask = _product()
    g = torch.Generator().manual_seed(9)
    reference = torch.rand(96, 160, 3, generator=g)  # another size and aspect than the target
    kwargs = dict(steps=2, seed=1, paste_back=False)
    plain = stage2_pipe(PROMPT, product, mask, **kwargs)
    with_ref = stage2_pipe(PROMPT, product, mask, reference=reference, **kwargs)
    half = stage2_pipe(PROMPT, product, mask, reference=reference, attention_scale=0.5, **kwargs)
    assert (with_ref - plain).abs().max() > 1e-3
    assert (half - with_ref).abs().max() > 1e-4
    cut = stage2_pipe(PROMPT, product, mask, reference=reference, attention_scale=0.0, renormalize_attention=True, **kwargs)
    assert (cut - plain).abs().max() <= 1e-4  # renormalised scale 0 isolates the reference completely
    guided = stage2_pipe(PROMPT, product, mask, mask_guidance=True, **kwargs)
    assert (guided - plain).abs().max() > 1e-4


def test_shield_product_keeps_the_products_tokens_from_the_reference(stage2_pipe, monkeypatch):
    from dreampainter_core.masks import mask_to_token_grid

    product, mask = _product()
    reference = _reference_image()
    kwargs = dict(steps=2, seed=1, paste_back=False)
    with_ref = stage2_pipe(PROMPT, product, mask, reference=reference, **kwargs)
    # off is the old path, bit for bit; without a reference there is nothing to shield from
    assert torch.equal(stage2_pipe(PROMPT, product, mask, reference=reference, shield_product=False, **kwargs), with_ref)
    assert torch.equal(stage2_pipe(PROMPT, product, mask, shield_product=True, **kwargs),
                       stage2_pipe(PROMPT, product, mask, **kwargs))
    seen = []
    forward = stage2_pipe.transformer.forward

    def recording(*args, **kw):
        if kw.get("reference_latents") is not None:
            seen.append(kw["modulation"].shielded)
        return forward(*args, **kw)

    monkeypatch.setattr(stage2_pipe.transformer, "forward", recording)
    shielded = stage2_pipe(PROMPT, product, mask, reference=reference, shield_product=True, **kwargs)
    assert (shielded - with_ref).abs().max() > 1e-4
    # the shielded tokens are the product's: every token holding a product pixel, in every pass that has the reference
    grid = SIZE // (stage2_pipe.vae_scale_factor * stage2_pipe.transformer.patch_size)
    expected = mask_to_token_grid(mask[None], grid, grid) > 0.5
    assert seen and all(torch.equal(t.cpu(), expected) for t in seen)
    assert 0 < int(expected.sum()) < expected.numel()
    # renormalised at attention_scale 0 no target token sees the reference already: shielding adds nothing
    cut = dict(reference=reference, attention_scale=0.0, renormalize_attention=True, **kwargs)
    torch.testing.assert_close(stage2_pipe(PROMPT, product, mask, shield_product=True, **cut),
                               stage2_pipe(PROMPT, product, mask, **cut), atol=1e-5, rtol=1e-5)


def _reference_image():
    return torch.rand(96, 160, 3, generator=torch.Generator().manual_seed(9))


class _CountCalls:
    """Wraps the transformer's forward: counts calls and records whether each had the reference."""

    def __init__(self, pipe, monkeypatch):
        self.calls = []
        forward = pipe.transformer.forward

        def counted(*args, **kwargs):
            self.calls.append(kwargs.get("reference_latents") is not None)
            return forward(*args, **kwargs)

        monkeypatch.setattr(pipe.transformer, "forward", counted)


def test_reference_guidance_without_cfg_zero_ignores_the_reference(stage2_pipe):
    # cfg <= 1: v = v(prompt, no ref) + g_r * (v(prompt, ref) - v(prompt, no ref)); g_r = 0 is T2I exactly.
    product, mask = _product()
    kwargs = dict(steps=3, seed=2, guidance_scale=1.0, paste_back=False)
    t2i = stage2_pipe(PROMPT, product, mask, **kwargs)
    ignored = stage2_pipe(PROMPT, product, mask, reference=_reference_image(), reference_guidance=0.0, **kwargs)
    followed = stage2_pipe(PROMPT, product, mask, reference=_reference_image(), **kwargs)
    assert (ignored - t2i).abs().max() <= 1e-5
    assert (followed - t2i).abs().max() > 1e-3


def test_reference_guidance_velocity_is_the_three_pass_formula(stage2_pipe, monkeypatch):
    """One step, checked against the formula computed from three direct transformer calls."""
    product, mask = _product()
    reference = _reference_image()
    g, g_r = 3.0, 2.0
    seen = []
    request = stage2_pipe.prepare_inputs(product, mask, reference, steps=4, guidance_scale=g, seed=11,
                                         paste_back=False, reference_guidance=g_r,
                                         callback=lambda info: seen.append(info) or False)
    prompt, negative = stage2_pipe.encode_prompt([PROMPT]), stage2_pipe.encode_prompt([""])
    counter = _CountCalls(stage2_pipe, monkeypatch)
    with pytest.raises(GenerationCancelled):
        stage2_pipe.generate(request, prompt, negative)
    assert counter.calls == [True, True, False]  # (prompt, ref), (negative, ref), (negative, no ref)
    info = seen[0]
    noise = torch.randn((1, 16, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(11))
    velocity = (noise - info.denoised) / info.sigma

    from dreampainter_core.product import place_product

    model = stage2_pipe.transformer
    foreground, canvas_mask = place_product(request.product, request.mask, SIZE, SIZE, placement="keep")
    control = stage2_pipe.prepare_control(foreground, canvas_mask)
    ref_latents = stage2_pipe.encode_reference(request.reference.image, stage2_pipe.default_reference_size(SIZE, SIZE))
    size = torch.tensor([[SIZE, SIZE]], dtype=model.dtype)
    t = torch.tensor([info.timestep])
    with torch.no_grad():
        def v(text, ref):
            return model(noise, text, t, size, size, torch.zeros_like(size), control_latents=control,
                         reference_latents=ref).float()
        v_cond, v_neg, v_none = v(prompt, ref_latents), v(negative, ref_latents), v(negative, None)
    expected = v_none + g_r * (v_neg - v_none) + g * (v_cond - v_neg)
    assert (velocity - expected).abs().max() <= 1e-4 * expected.abs().max()
    plain = v_neg + g * (v_cond - v_neg)
    assert (expected - plain).abs().max() > 1e-3  # g_r = 2 is not plain CFG on this model


@pytest.mark.parametrize("g_r,passes", [(None, [True, False]), (1.0, [True, True]), (3.5, [True, False]),
                                        (2.0, [True, True, False])])
def test_reference_guidance_takes_two_passes_where_it_can(stage2_pipe, monkeypatch, g_r, passes):
    product, mask = _product()
    counter = _CountCalls(stage2_pipe, monkeypatch)
    stage2_pipe(PROMPT, product, mask, reference=_reference_image(), steps=1, guidance_scale=3.5,
                reference_guidance=g_r, paste_back=False)
    assert counter.calls == passes
    counter.calls.clear()
    stage2_pipe(PROMPT, product, mask, steps=1, guidance_scale=3.5, reference_guidance=g_r, paste_back=False)
    assert counter.calls == [False, False]  # no reference: plain CFG whatever g_r


def test_reference_guidance_equal_to_cfg_is_cfg_against_nothing(stage2_pipe):
    """g_r = g takes the 2-pass shortcut; it must agree with the general 3-pass formula."""
    product, mask = _product()
    kwargs = dict(reference=_reference_image(), steps=3, seed=4, guidance_scale=3.0, paste_back=False)
    shortcut = stage2_pipe(PROMPT, product, mask, reference_guidance=3.0, **kwargs)
    general = stage2_pipe(PROMPT, product, mask, reference_guidance=3.0 + 1e-6, **kwargs)
    assert (shortcut - general).abs().max() <= 1e-4
    assert torch.equal(stage2_pipe(PROMPT, product, mask, **kwargs), shortcut)  # the default is g_r = cfg
    both_passes = stage2_pipe(PROMPT, product, mask, reference_guidance=1.0, **kwargs)
    assert (shortcut - both_passes).abs().max() > 1e-3


def test_pil_inputs_batch_size_and_center_placement(stage2_pipe):
    image, mask = _product()
    pil_image = Image.fromarray((image.numpy() * 255).astype(np.uint8))
    pil_mask = Image.fromarray((mask.numpy() * 255).astype(np.uint8))
    out = stage2_pipe(PROMPT, pil_image, pil_mask, steps=1, batch_size=3, placement="center", width=160, height=128, return_dict=True)
    assert out.images.shape == (3, 128, 160, 3)
    assert out.mask.shape == (3, 128, 160)
    assert torch.equal(out.images[out.mask > 0.5], out.foreground[out.mask > 0.5])


def test_callback_progress_preview_and_cancel(stage2_pipe):
    product, mask = _product()
    seen = []
    stage2_pipe(PROMPT, product, mask, steps=3, callback=lambda info: seen.append((info.step, info.total, info.denoised.shape)))
    assert [s[:2] for s in seen] == [(0, 3), (1, 3), (2, 3)]
    assert seen[0][2] == (1, 16, SIZE // 8, SIZE // 8)
    calls = []
    with pytest.raises(GenerationCancelled):
        stage2_pipe(PROMPT, product, mask, steps=5, callback=lambda info: calls.append(info.step) or False)
    assert calls == [0]


def test_denoise_runs_the_tail_of_a_longer_schedule(stage2_pipe):
    scheduler, timesteps = stage2_pipe.schedule(4, 64, denoise=0.5)
    full_scheduler, full = stage2_pipe.schedule(8, 64)
    assert torch.equal(timesteps, full[4:])
    product, mask = _product()
    a = stage2_pipe(PROMPT, product, mask, steps=2, denoise=0.3, paste_back=False)
    b = stage2_pipe(PROMPT, product, mask, steps=2, denoise=1.0, paste_back=False)
    assert a.shape == b.shape and (a - b).abs().max() > 1e-3


class _Boom(Exception):
    pass


def _forbid_heavy_work(pipe, monkeypatch):
    def boom(*a, **k):
        raise _Boom("heavy work started before input validation")

    monkeypatch.setattr(pipe, "encode_prompt", boom)
    monkeypatch.setattr(pipe, "encode_image", boom)


@pytest.mark.parametrize(
    "case,error,phrase",
    [
        ("mask_size", InputError, "size"),
        ("empty_mask", InputError, "empty"),
        ("full_mask", InputError, "background"),
        ("bad_width", InputError, "width"),
        ("nan_product", InputError, "NaN"),
        ("nan_reference", InputError, "NaN"),
        ("steps_zero", InputError, "steps"),
        ("bad_placement", InputError, "placement"),
        ("negative_attention", InputError, "attention_scale"),
        ("negative_reference_guidance", InputError, "reference_guidance"),
    ],
)
def test_bad_inputs_fail_clearly_before_heavy_work(stage2_pipe, monkeypatch, case, error, phrase):
    _forbid_heavy_work(stage2_pipe, monkeypatch)
    product, mask = _product()
    kwargs = dict(steps=2)
    if case == "mask_size":
        mask = torch.nn.functional.pad(mask, (0, 16))  # 144 px wide vs a 128 px product
    elif case == "empty_mask":
        mask = torch.zeros_like(mask)
    elif case == "full_mask":
        mask = torch.ones_like(mask)
    elif case == "bad_width":
        kwargs["width"] = 100
    elif case == "nan_product":
        product = product.clone()
        product[3, 3, 0] = float("nan")
    elif case == "nan_reference":
        kwargs["reference"] = torch.full((64, 64, 3), float("nan"))
    elif case == "steps_zero":
        kwargs["steps"] = 0
    elif case == "bad_placement":
        kwargs["placement"] = "left"
    elif case == "negative_attention":
        kwargs["attention_scale"] = -0.5
    elif case == "negative_reference_guidance":
        kwargs["reference_guidance"] = -1.0
    with pytest.raises(error, match=phrase):
        stage2_pipe(PROMPT, product, mask, **kwargs)


def test_reference_with_stage1_model_is_refused_before_heavy_work(stage1_pipe, base_pipe, monkeypatch):
    product, mask = _product()
    for pipe in (stage1_pipe, base_pipe):
        _forbid_heavy_work(pipe, monkeypatch)
        with pytest.raises(CapabilityError, match="no reference support") as info:
            pipe(PROMPT, product, mask, reference=product, steps=2, mode="dreampainter")
        assert "mode='training_free'" in str(info.value)  # names the way that works with this model


def test_real_model_size_rule():
    REAL_MODEL_SIZES.check(1024, 1024)
    REAL_MODEL_SIZES.check(2048, 1024)
    for w, h, phrase in [(1000, 1024, "divisible by 32"), (256, 1024, "outside"), (2048, 2048, "exceeds"), (4096, 512, "outside")]:
        with pytest.raises(InputError, match=phrase) as info:
            REAL_MODEL_SIZES.check(w, h)
        assert "nearest allowed size" in str(info.value)
    w, h = REAL_MODEL_SIZES.nearest(2048, 2048)
    REAL_MODEL_SIZES.check(w, h)


def test_missing_or_incomplete_model_folder(tmp_path, tiny_model_dir):
    with pytest.raises(ModelFilesError, match="not found|does not exist|missing"):
        DreamPainterPipeline.from_pretrained(tmp_path / "nowhere")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "transformer").mkdir()
    with pytest.raises(ModelFilesError, match="vae|text_encoder|tokenizer|config"):
        DreamPainterPipeline.from_pretrained(incomplete)


def test_bf16_pipeline_runs_every_path_close_to_fp32(tiny_model_dir, tiny_stage2_weights, stage2_pipe):
    bf16 = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=tiny_stage2_weights, dtype=torch.bfloat16)
    assert bf16.transformer.dtype == torch.bfloat16
    product, mask = _product()
    kwargs = dict(reference=torch.rand(64, 64, 3), steps=3, attention_scale=0.5, mask_guidance=True, paste_back=False)
    low = bf16(PROMPT, product, mask, **kwargs)
    full = stage2_pipe(PROMPT, product, mask, **kwargs)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().mean() < 0.03  # bf16 rounding, not a different computation
