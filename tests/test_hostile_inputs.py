"""Hostile and careless inputs to the core (issue 16, points 4-7): every numeric control has a
documented range, pipeline inputs are refused by name before heavy work, unbounded work is
bounded before anything is allocated, a NaN during sampling stops at its step with the likely
cause, and the image/mask converters take every common dtype and PIL mode or say what they got.

Memory: nothing here may allocate much even when a check regresses. Two guards:

* the in-process tests replace the allocation points (the schedule, the prompt and image
  encoders) with a function that raises, so a check that stopped working fails the test at the
  first allocation instead of allocating (``_forbid_heavy_work``);
* ``test_unbounded_requests_fail_under_a_memory_cap`` runs the worst requests (10^7 steps, a
  4096 px reference, a 10^6 batch, a 10 MB prompt) in a child process whose address space is
  capped at what it has after loading the tiny model plus 1 GiB (RLIMIT_AS), so even an
  allocation point nobody patched ends in a MemoryError there, not in a swapping machine. The
  cap is relative because torch's own mappings are several GB of address space.
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter_core import DreamPainterError, InputError, NonFiniteError
from dreampainter_core.images import as_image_batch, as_mask_batch
from dreampainter_core.options import (
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_SCALE,
    MAX_SEED,
    MAX_SHIFT,
    MAX_STEPS,
    ControlOptions,
    ReferenceOptions,
    SamplingOptions,
)
from dreampainter_core.prompts import MAX_PROMPT_CHARS

from test_pipeline import PROMPT, _product, stage2_pipe  # noqa: F401 (fixture)

# Hostile inputs: a regression that allocates what one asks for fails instead of eating the machine.
pytestmark = pytest.mark.memcap  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]


class _Allocation(Exception):
    pass


def _forbid_heavy_work(pipe, monkeypatch):
    """Every place a request allocates in proportion to its size raises instead."""

    def boom(*a, **k):
        raise _Allocation("heavy work (an allocation) started before the input was refused")

    for name in ("encode_prompt", "encode_image", "encode_reference", "schedule", "sample"):
        monkeypatch.setattr(pipe, name, boom)


# ---------------------------------------------------------------------------------------------
# Numeric controls: finite, in a documented range, the range in the message
# ---------------------------------------------------------------------------------------------

RANGES = [  # (build, name, low, high, a value inside)
    (lambda v: SamplingOptions(guidance_scale=v), "guidance_scale", 0, MAX_GUIDANCE, 3.5),
    (lambda v: SamplingOptions(shift=v), "shift", 0, MAX_SHIFT, 3.25),
    (lambda v: ReferenceOptions(lora_scale=v), "lora_scale", 0, MAX_SCALE, 1.0),
    (lambda v: ReferenceOptions(attention_scale=v), "attention_scale", 0, MAX_SCALE, 1.0),
    (lambda v: ReferenceOptions(guidance=v), "reference_guidance", 0, MAX_GUIDANCE, 2.0),
    (lambda v: ControlOptions(control_scale=v), "control_scale", 0, MAX_SCALE, 1.0),
]


@pytest.mark.parametrize("build, name, low, high, inside", RANGES, ids=[r[1] for r in RANGES])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30, -1e30, "high", "low"])
def test_numeric_controls_are_finite_and_in_their_range(build, name, low, high, inside, bad):
    build(inside)
    build(high)  # both ends belong to the range (shift: only the top one)
    value = {"high": high * 1.001, "low": low - 0.001}.get(bad, bad)
    with pytest.raises(InputError, match=rf"^{name} must be") as info:
        build(value)
    assert f"<= {high:g}" in str(info.value), info.value  # the range is in the message


def test_shift_zero_is_not_auto_in_the_core():
    # The node's widget uses 0 for "auto" and translates it to None; the core takes None only.
    with pytest.raises(InputError, match=r"shift must be > 0 and <= 20 \(mu; None = CogView4's automatic shift"):
        SamplingOptions(shift=0.0)
    assert SamplingOptions(shift=None).shift is None


# ---------------------------------------------------------------------------------------------
# Pipeline inputs: InputError naming the input, before heavy work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, -1, -(2**63), None, 1.5, "7", True])
def test_seeds_are_integers_in_comfyuis_range(seed):
    with pytest.raises(InputError, match=r"^seed must be an integer >= 0 and <= 18446744073709551615") as info:
        SamplingOptions(seed=seed)
    assert "-1 is not 'random'" in str(info.value)
    with pytest.raises(InputError, match=r"^image_seeds item must be an integer >= 0"):
        SamplingOptions(image_seeds=[0, seed])


def test_the_largest_seed_is_taken_and_is_not_an_alias():
    assert SamplingOptions(seed=MAX_SEED).seed == MAX_SEED
    assert SamplingOptions(seed=np.uint64(MAX_SEED)).seed == MAX_SEED
    torch.Generator().manual_seed(MAX_SEED)  # what draw_noise does with it


@pytest.mark.parametrize("batch_size, phrase", [
    (2.5, "batch_size must be an integer >= 1 and <= 64"),
    ("2", "batch_size must be an integer"),
    (True, "batch_size must be an integer"),
    (0, "batch_size must be an integer >= 1"),
    (MAX_BATCH + 1, "batch_size must be an integer >= 1 and <= 64"),
    (10**6, "batch_size must be an integer >= 1 and <= 64"),
])
def test_batch_size_is_a_bounded_integer(stage2_pipe, monkeypatch, batch_size, phrase):
    _forbid_heavy_work(stage2_pipe, monkeypatch)
    product, mask = _product()
    with pytest.raises(InputError, match=phrase):
        stage2_pipe(PROMPT, product, mask, steps=1, batch_size=batch_size)


def test_a_batch_of_products_is_bounded_too(stage2_pipe, monkeypatch):
    _forbid_heavy_work(stage2_pipe, monkeypatch)
    product, mask = _product(size=32)
    many = product.expand(MAX_BATCH + 1, -1, -1, -1)
    with pytest.raises(InputError, match=r"a batch of 65 images is more than the 64 one run takes"):
        stage2_pipe.prepare_inputs(many, mask)


@pytest.mark.parametrize("side", ["width", "height"])
def test_a_zero_size_is_refused_not_replaced_by_the_products(stage2_pipe, monkeypatch, side):
    _forbid_heavy_work(stage2_pipe, monkeypatch)
    product, mask = _product()
    with pytest.raises(InputError, match=rf"^{side}=0 is not a size: .*leave it out \(None\) for the product's"):
        stage2_pipe.prepare_inputs(product, mask, **{side: 0})
    request = stage2_pipe.prepare_inputs(product, mask, **{side: None})  # None is "the product's"
    assert (request.width, request.height) == (product.shape[1], product.shape[0])


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(prompt="a \ud83d bottle"), r"^prompt has an unpaired surrogate at character 2"),
    (dict(negative_prompt="blurry \udc00"), r"^negative_prompt has an unpaired surrogate at character 7"),
    (dict(prompt=["fine", "broken \ud800"], batch_size=2), r"^prompt\[1\] has an unpaired surrogate"),
    (dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), rf"^prompt is {MAX_PROMPT_CHARS + 1} characters long; at most "
                                                rf"{MAX_PROMPT_CHARS}"),
    (dict(prompt=None), r"^prompt must be a string or a list of strings"),
])
def test_prompts_are_checked_before_the_text_encoder(stage2_pipe, monkeypatch, kwargs, phrase):
    _forbid_heavy_work(stage2_pipe, monkeypatch)
    product, mask = _product()
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(InputError, match=phrase):
        stage2_pipe(prompt, product, mask, steps=1, guidance_scale=3.5, **kwargs)


def test_encode_prompt_itself_refuses_what_a_tokenizer_cannot_take():
    from dreampainter_core.pipeline import encode_prompt

    def tokenizer(*a, **k):
        raise AssertionError("the tokenizer was reached")

    with pytest.raises(InputError, match=r"^prompt has an unpaired surrogate"):
        encode_prompt(tokenizer, None, ["\ud83d"], dtype=torch.float32, device="cpu")
    with pytest.raises(InputError, match=r"^prompt 1 is 10001 characters long"):
        encode_prompt(tokenizer, None, ["ok", "y" * 10_001], dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------------------------------------
# Bounds: checked before any allocation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(steps=10**7), rf"^steps must be an integer >= 1 and <= {MAX_STEPS}"),
    (dict(steps=MAX_STEPS + 1), rf"^steps must be an integer >= 1 and <= {MAX_STEPS}"),
    (dict(steps=5000, denoise=0.1), r"^steps=5000 with denoise=0.1 builds a 50000-step schedule"),
    (dict(steps=1, denoise=1e-9), r"builds a 1000000000-step schedule \(steps / denoise\); at most 10000"),
    (dict(steps=200, mode="training_free", reference=torch.rand(32, 32, 3), reference_strength=0.01),
     r"^steps=200 with reference_strength=0.01 builds a 20000-step schedule"),
    (dict(reference=torch.rand(32, 32, 3), reference_size=4096), r"^reference_size 4096x4096 is larger than"),
    (dict(reference=torch.rand(32, 32, 3), reference_size=(2048, 2048)), r"at most 2097152 pixels"),
    (dict(reference=torch.rand(32, 32, 3), reference_size=(4096, 512)), r"each side at most 2048 px"),
])
def test_unbounded_work_is_refused_before_any_allocation(stage2_pipe, monkeypatch, kwargs, phrase):
    _forbid_heavy_work(stage2_pipe, monkeypatch)
    product, mask = _product()
    with pytest.raises(InputError, match=phrase):
        stage2_pipe(PROMPT, product, mask, **kwargs)


def test_the_largest_allowed_schedule_and_reference_are_accepted(stage2_pipe):
    product, mask = _product()
    request = stage2_pipe.prepare_inputs(product, mask, steps=100, denoise=0.01)  # exactly 10000
    assert request.sampling.steps == 100
    stage2_pipe.prepare_inputs(product, mask, torch.rand(32, 32, 3), reference_size=(2048, 1024))


_CAPPED_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from dreampainter_core import DreamPainterPipeline
    pipe = DreamPainterPipeline.from_pretrained(sys.argv[1], dreampainter_weights=sys.argv[2])
    product = torch.rand(64, 64, 3)
    mask = torch.zeros(64, 64)
    mask[16:40, 16:40] = 1
    pipe("warm up", product, mask, steps=1)  # the allocator's and the model's own first-run memory
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    results = {}
    requests = {
        "steps": dict(steps=10**7),
        "denoise": dict(steps=10_000, denoise=1e-3),
        "reference": dict(reference=torch.rand(64, 64, 3), reference_size=4096),
        "batch": dict(batch_size=10**6),
        "prompt": dict(prompt="a" * 10_000_000),
    }
    for name, kwargs in requests.items():
        prompt = kwargs.pop("prompt", "a bottle")
        try:  # a request that gets past the checks stops at its first step (a regression fails fast)
            pipe(prompt, product, mask, callback=lambda step: False, **kwargs)
            results[name] = "ran"
        except MemoryError:
            results[name] = "MemoryError"
        except Exception as exc:
            results[name] = type(exc).__name__
    print(json.dumps(results))
""")


def test_unbounded_requests_fail_under_a_memory_cap(tiny_model_dir, tiny_stage2_weights):
    """The worst requests, in a child capped at its post-load address space + 1 GiB (see the module
    docstring): each must be an InputError. Before the bounds, 10^7 steps alone took 3.7 GB."""
    if sys.platform != "linux":
        pytest.skip("RLIMIT_AS and /proc/self/status are Linux's")
    run = subprocess.run([sys.executable, "-c", _CAPPED_CHILD, str(tiny_model_dir), str(tiny_stage2_weights)],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                              "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results == {name: "InputError" for name in ("steps", "denoise", "reference", "batch", "prompt")}, results


# ---------------------------------------------------------------------------------------------
# Non-finite results stop at their step
# ---------------------------------------------------------------------------------------------


def _nan_from_call(pipe, monkeypatch, first_bad_call: int):
    """The transformer returns NaN from its `first_bad_call`-th call on (a corrupt weight, an overflow)."""
    forward, calls = pipe.transformer.forward, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = forward(*args, **kwargs)
        return out * math.nan if len(calls) >= first_bad_call else out

    monkeypatch.setattr(pipe.transformer, "forward", poisoned)


@pytest.mark.parametrize("paste_back", [True, False])
def test_a_nan_latent_stops_sampling_at_its_step(stage2_pipe, monkeypatch, paste_back):
    _nan_from_call(stage2_pipe, monkeypatch, first_bad_call=3)  # cfg: two calls per step, so step 2
    product, mask = _product()
    seen = []
    with pytest.raises(NonFiniteError) as info:
        stage2_pipe(PROMPT, product, mask, steps=4, guidance_scale=3.5, paste_back=paste_back,
                    callback=lambda step: seen.append(step.step))
    message = str(info.value)
    assert message.startswith("sampling produced NaN or infinite latents at step 2 of 4; stopped there"), message
    for cause in ("a scale too large", "guidance_scale=3.5", "lora_scale=1", "control_scale=1", "corrupt weights"):
        assert cause in message, (cause, message)
    assert "generated" not in message  # an input the user never passed
    assert seen == [0]  # step 1 finished, step 2 did not reach the callback
    assert isinstance(info.value, DreamPainterError)


def test_the_nan_message_names_fp16(stage2_pipe, monkeypatch):
    from dreampainter_core.transformer import DreamPainterTransformer

    monkeypatch.setattr(DreamPainterTransformer, "dtype", property(lambda self: torch.float16))
    message = stage2_pipe._non_finite_message(0, 10, SamplingOptions(), ReferenceOptions(), ControlOptions())
    assert "float16, which overflows easily: load it in bf16 or fp32" in message


def test_a_nan_from_the_vae_is_named_too(stage2_pipe, monkeypatch):
    decode = stage2_pipe.vae.decode

    def broken(*args, **kwargs):
        image = decode(*args, **kwargs)[0]
        return (image * math.inf,)

    monkeypatch.setattr(stage2_pipe.vae, "decode", broken)
    product, mask = _product()
    with pytest.raises(NonFiniteError, match=r"^the VAE decode gave NaN or infinite pixels from finite latents"):
        stage2_pipe(PROMPT, product, mask, steps=1)


# ---------------------------------------------------------------------------------------------
# Converters: every common dtype and PIL mode, or what was received
# ---------------------------------------------------------------------------------------------

MASK_VALUES = np.array([[0, 1, 1], [0, 1, 0]])


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32,
                                   np.int64, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_masks_of_every_dtype_as_labels(dtype, kind):
    m = MASK_VALUES.astype(dtype)
    out = as_mask_batch(m if kind == "numpy" else torch.from_numpy(m))
    assert out.dtype == torch.float32 and torch.equal(out[0], torch.from_numpy(MASK_VALUES).float())


def test_uint16_masks_are_16_bit_levels():
    m = np.array([[0, 65535], [32768, 1000]], np.uint16)
    out = as_mask_batch(m)[0]
    assert torch.equal(out, torch.from_numpy(m.astype(np.float32) / 65535.0))
    assert torch.equal(as_mask_batch(torch.from_numpy(m))[0], out)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint32, np.uint64])
def test_integer_masks_other_than_labels_say_what_they_hold(dtype):
    with pytest.raises(InputError, match=rf"integer masks of dtype {np.dtype(dtype).name} must hold only 0 and 1, "
                                         r"got values 0..7"):
        as_mask_batch(np.array([[0, 7]], dtype))


def test_images_of_uint16_and_every_float_width():
    rgb = np.array([[[0, 32768, 65535]]], np.uint16)
    assert torch.equal(as_image_batch(rgb)[0], torch.from_numpy(rgb.astype(np.float32) / 65535.0))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert as_image_batch(torch.full((2, 2, 3), 0.5, dtype=dtype)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.int32, np.int64, np.uint32])
def test_images_of_ambiguous_integer_types_name_the_type(dtype):
    with pytest.raises(InputError, match=rf"got {np.dtype(dtype).name}, whose scale is ambiguous"):
        as_image_batch(np.zeros((2, 2, 3), dtype))


PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "I", "I;16",
             "I;16B", "I;16L", "F"]


def _pil(mode: str) -> Image.Image:
    # a grey level for the integer modes (16-bit ones above 255), the default (black) otherwise
    return Image.new(mode, (2, 2), {"I": 40000, "I;16": 40000, "I;16B": 40000, "I;16L": 40000, "F": 0.5}.get(mode, 0))


@pytest.mark.parametrize("mode", PIL_MODES)
def test_every_pil_mode_converts(mode):
    img = _pil(mode)
    image, mask = as_image_batch(img), as_mask_batch(img)
    assert image.shape == (1, 2, 2, 3) and mask.shape == (1, 2, 2)
    for t in (image, mask):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all()) and 0 <= float(t.min()) <= float(t.max()) <= 1


def test_premultiplied_alpha_modes_use_their_alpha_as_the_mask():
    alpha = np.array([[0, 255], [128, 255]], np.uint8)
    for mode, channels in (("RGBa", 3), ("La", 1)):
        plain = "RGBA" if mode == "RGBa" else "LA"
        img = Image.fromarray(np.concatenate([np.full((2, 2, channels), 200, np.uint8), alpha[..., None]], -1),
                              plain).convert(mode)
        assert torch.equal(as_mask_batch(img)[0], torch.from_numpy(alpha.astype(np.float32) / 255.0))


def test_16_bit_mode_i_images_are_not_clipped():
    img = Image.fromarray(np.array([[0, 65535]], np.int32), "I")
    assert torch.equal(as_image_batch(img)[0, 0, :, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(as_mask_batch(img)[0], torch.tensor([[0.0, 1.0]]))
    with pytest.raises(InputError, match=r"mode 'I' with values -5..3; expected levels 0..255 or 0..65535"):
        as_image_batch(Image.fromarray(np.array([[-5, 3]], np.int32), "I"))


def test_lab_images_are_refused_by_name_and_lab_masks_use_lightness():
    lab = Image.new("LAB", (2, 2), (200, 128, 128))
    with pytest.raises(InputError, match=r"mode 'LAB' \(CIELAB\).*PIL.ImageCms"):
        as_image_batch(lab)
    assert torch.equal(as_mask_batch(lab), torch.full((1, 2, 2), 200.0) / 255.0)


@pytest.mark.parametrize("shape, phrase", [
    ((64, 64, 3), r"got \[64, 64, 3\]\. It looks like an image \[\.\.\., H, W, 3\] \(RGB\), not a mask"),
    ((64, 64, 4), r"\(RGBA\), not a mask"),
    ((2, 64, 64, 3), r"got \[2, 64, 64, 3\]\. It looks like an image"),
    ((64, 64, 1), r"\(one channel\), not a mask: drop the last axis"),
])
def test_a_picture_given_as_a_mask_is_called_one(shape, phrase):
    with pytest.raises(InputError, match=phrase):
        as_mask_batch(np.zeros(shape, np.uint8))
    # ... and so before the pipeline compares it with the product ("mask size 3x64 ...")
    with pytest.raises(InputError, match="looks like an image"):
        from dreampainter_core.images import check_product_and_mask
        check_product_and_mask(np.zeros((64, 64, 3), np.uint8), np.zeros(shape, np.uint8))


def test_narrow_mask_batches_stay_masks():
    assert as_mask_batch(np.ones((2, 8, 3), np.float32)).shape == (2, 8, 3)  # [B, H, W], 3 px wide


@pytest.mark.parametrize("x, phrase", [
    (np.zeros((2, 2), np.longdouble), "numpy dtype float128 has no torch equivalent"),
    (torch.zeros(2, 2, device="meta"), "on the meta device"),
    (np.zeros((2, 2), "datetime64[s]"), "expected a numeric array, got dtype datetime64"),
    ([[0, 1]], "expected a PIL image, numpy array or torch tensor, got list"),
])
def test_unconvertible_inputs_say_what_they_are(x, phrase):
    if isinstance(x, np.ndarray) and x.dtype == np.longdouble and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("long double is float64 on this platform")
    for convert in (as_mask_batch, as_image_batch):
        with pytest.raises(InputError, match=phrase):
            convert(x)


def test_big_endian_arrays_convert_like_native_ones():
    m = MASK_VALUES.astype(">f4")
    assert torch.equal(as_mask_batch(m), as_mask_batch(MASK_VALUES.astype(np.float32)))


@pytest.mark.parametrize("mask, phrase", [
    (torch.tensor([[0.0, math.nan]]), "NaN or infinite"),
    (torch.tensor([[0.0, 255.0]]), "float values must lie in 0..1"),
    (torch.tensor([[0, 255]], dtype=torch.uint8), "an integer mask must hold only 0 and 1, got values 0..255"),
    (torch.zeros(0, 4), "is empty"),
])
def test_mask_tools_refuse_what_is_not_a_mask(mask, phrase):
    from dreampainter_core import masks

    for op in (masks.binarize, lambda m: masks.dilate(m, 3), lambda m: masks.feather(m, 2), masks.fill_holes,
               masks.connected_components):
        with pytest.raises(InputError, match=phrase):
            op(mask)


@pytest.mark.memcap(1)
def test_the_memory_cap_turns_a_runaway_allocation_into_a_failure():
    """The cap the hostile-input tests run under (tests/conftest.py) is real: 3 GiB past it raises."""
    if not Path("/proc/self/status").exists():
        pytest.skip("the cap needs Linux")
    with pytest.raises((MemoryError, RuntimeError)):
        torch.empty(3 * 2**30, dtype=torch.uint8).fill_(1)
