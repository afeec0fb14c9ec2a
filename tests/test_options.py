"""The option objects: each value is checked once, where the object is built; the pipeline's
keyword API maps onto them; guidance_end (the example control) at 1 is the old sampler."""

import inspect
import math

import pytest
import torch

from dreampainter_core.attention import AttentionModulation
from dreampainter_core.errors import InputError
from dreampainter_core.options import (
    KEYWORDS,
    ControlOptions,
    OutputOptions,
    ReferenceOptions,
    SamplingOptions,
    options_from_keywords,
)
from dreampainter_core.pipeline import DreamPainterPipeline

from test_pipeline import PROMPT, SIZE, _CountCalls, _product, _reference_image  # noqa: F401 (fixtures below)
from test_pipeline import stage2_pipe  # noqa: F401


@pytest.mark.parametrize(
    "build, phrase",
    [
        (lambda: SamplingOptions(steps=0), "steps must be an integer >= 1"),
        (lambda: SamplingOptions(steps=2.5), "steps"),
        (lambda: SamplingOptions(guidance_scale=-1), "guidance_scale must be >= 0"),
        (lambda: SamplingOptions(guidance_scale=math.nan), "guidance_scale must be a finite number"),
        (lambda: SamplingOptions(shift=math.inf), "shift must be a finite number"),
        (lambda: SamplingOptions(denoise=0.0), r"denoise must be in \(0, 1\]"),
        (lambda: SamplingOptions(guidance_end=1.5), r"guidance_end must be in \[0, 1\]"),
        (lambda: SamplingOptions(seed=True), "seed"),
        (lambda: ReferenceOptions(attention_scale=-0.5), "attention_scale must be a finite number >= 0"),
        (lambda: ReferenceOptions(attention_scale=math.nan), "attention_scale"),
        (lambda: ReferenceOptions(lora_scale=math.inf), "lora_scale must be a finite number"),
        (lambda: ReferenceOptions(guidance=-1.0), "reference_guidance must be >= 0"),
        (lambda: ReferenceOptions(size=(64,)), "reference_size must be one side or"),
        (lambda: ReferenceOptions(image=torch.full((8, 8, 3), math.nan)), "NaN"),
        (lambda: ControlOptions(control_scale=math.nan), "control_scale must be a finite number"),
        (lambda: ControlOptions(harmonize=1.2), r"harmonize must be in \[0, 1\]"),
        (lambda: ControlOptions(harmonize=math.nan), "harmonize must be a finite number"),
        (lambda: ControlOptions(mode="inpaint"), "mode must be one of"),
        (lambda: ReferenceOptions(strength=0.0), r"reference_strength must be in \(0, 1\]"),
        (lambda: ReferenceOptions(strength=1.5), "reference_strength"),
        (lambda: ReferenceOptions(training_free_method="beside"), "training_free_reference must be one of"),
        (lambda: OutputOptions(placement="left"), "placement must be one of"),
        (lambda: OutputOptions(feather=-1), "feather must be an integer >= 0"),
        (lambda: OutputOptions(box_ratio=(0.0, 0.5)), "box_ratio"),
    ],
)
def test_each_value_is_checked_where_its_object_is_built(build, phrase):
    with pytest.raises(InputError, match=phrase):
        build()


def test_attention_scale_is_checked_once_and_reaches_the_processor_as_one_object():
    reference = ReferenceOptions(attention_scale=0.6, renormalize_attention=True)
    assert reference.modulation == AttentionModulation(0.6, renormalize=True)
    assert not reference.modulation.is_plain and ReferenceOptions().modulation.is_plain


def test_every_keyword_of_the_pipeline_lands_in_one_group():
    call = inspect.signature(DreamPainterPipeline.__call__).parameters
    documented = {"steps", "guidance_scale", "seed", "lora_scale", "attention_scale", "mask_guidance", "placement",
                  "paste_back", "reference"}
    assert documented <= set(call) and documented <= set(KEYWORDS)
    groups, left = options_from_keywords(steps=7, reference_guidance=2.0, reference_size=(32, 48), control_scale=0.5,
                                         feather=2, shift=1.5, batch_size=3)
    assert groups["sampling"].steps == 7 and groups["sampling"].shift == 1.5
    assert groups["reference"].guidance == 2.0 and groups["reference"].size == (32, 48)
    assert groups["control"].control_scale == 0.5 and groups["output"].feather_radius == 2
    assert left == {"batch_size": 3}
    # The defaults of the keyword API are the option objects' defaults.
    defaults, _ = options_from_keywords()
    assert defaults["sampling"] == SamplingOptions() and defaults["output"] == OutputOptions()
    for name in ("steps", "guidance_scale", "seed", "lora_scale", "attention_scale", "mask_guidance", "placement",
                 "paste_back"):
        group, field_name = KEYWORDS[name]
        assert call[name].default == getattr(defaults[group], field_name), name


def test_guidance_end_one_is_the_old_sampler_and_zero_is_no_cfg(stage2_pipe):
    product, mask = _product()
    kwargs = dict(steps=4, seed=3, guidance_scale=3.0, paste_back=False, reference=_reference_image())
    full = stage2_pipe(PROMPT, product, mask, **kwargs)
    assert torch.equal(stage2_pipe(PROMPT, product, mask, guidance_end=1.0, **kwargs), full)
    no_cfg = stage2_pipe(PROMPT, product, mask, **dict(kwargs, guidance_scale=1.0))
    assert torch.equal(stage2_pipe(PROMPT, product, mask, guidance_end=0.0, **kwargs), no_cfg)
    half = stage2_pipe(PROMPT, product, mask, guidance_end=0.5, **kwargs)
    assert (half - full).abs().max() > 1e-4 and (half - no_cfg).abs().max() > 1e-4


def test_guidance_end_drops_the_negative_pass_of_the_late_steps(stage2_pipe, monkeypatch):
    product, mask = _product()
    counter = _CountCalls(stage2_pipe, monkeypatch)
    stage2_pipe(PROMPT, product, mask, steps=4, guidance_scale=3.0, guidance_end=0.5, reference=_reference_image(),
                reference_guidance=2.0)
    # Steps 1-2: (prompt, ref), (negative, ref), (negative, no ref); steps 3-4 without CFG, g_r = 2:
    # (prompt, ref), (prompt, no ref).
    assert counter.calls == [True, True, False] * 2 + [True, False] * 2
