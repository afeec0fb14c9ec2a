"""DreamPaint insertion (pipe.insert): the user's photo kept exactly, a learned product painted into the hole."""

import logging

import pytest
import torch

from dreampainter_core.errors import CapabilityError, InputError, WeightFormatError
from dreampainter_core.options import ControlOptions, OutputOptions, ReferenceOptions, SamplingOptions
from dreampainter_core.pipeline import DreamPainterPipeline
from dreampainter_core.product import paste_back
from dreampainter_core.product_lora import identifier_in, load_product_lora, save_product_lora
from dreampainter_core.transformer import DreamPainterConfig
from train.tiny import write_random_dreampainter_weights, write_random_product_lora, write_tiny_model

from test_pipeline import PROMPT, SIZE  # noqa: F401
from test_pipeline import base_pipe, stage2_pipe  # noqa: F401 (fixtures)

INSERT_PROMPT = "a sks cup on a wooden table"
FAST = SamplingOptions(steps=3, seed=1, guidance_scale=2.0)


def _scene(batch=1):
    context = torch.rand((batch, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(4))
    hole = torch.zeros(batch, SIZE, SIZE)
    hole[:, 40:90, 30:100] = 1
    return context, hole


@pytest.fixture(scope="module")
def product_file(tiny_model_dir, tmp_path_factory):
    return write_random_product_lora(tiny_model_dir, tmp_path_factory.mktemp("product") / "cup.safetensors", seed=3)


@pytest.fixture(scope="module")
def token_product_file(tiny_model_dir, tmp_path_factory):
    return write_random_product_lora(tiny_model_dir, tmp_path_factory.mktemp("product") / "cup_token.safetensors",
                                     seed=5, learn_token=True)


@pytest.fixture(scope="module")
def insertion_pipe(tiny_model_dir, tmp_path_factory):
    config = DreamPainterConfig(control_blocks=2, lora_rank=0, task="insertion")
    weights = write_random_dreampainter_weights(tiny_model_dir, tmp_path_factory.mktemp("ins") / "insertion.safetensors",
                                                seed=7, stage=1, config=config)
    return DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=weights)


def _inpaint_before_insert_existed(pipe, prompt, image, mask, sampling, control, output, lora_scale=1.0):
    """inpaint as it was written before insert shared its path (the known-region sampler, inverted mask)."""
    context, hole = pipe._check_inpaint_inputs(image, mask)
    batch = context.shape[0]
    keep = 1.0 - hole
    known = pipe.known_region(context, keep, control)
    prompt_embeds = pipe._batch_embeds(pipe.encode_prompt([prompt] * batch), batch, "prompt")
    negative = pipe._batch_embeds(pipe.encode_prompt([""] * batch), batch, "negative_prompt") if sampling.uses_cfg else None
    shape = (batch, pipe.transformer.in_channels, SIZE // 8, SIZE // 8)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(sampling.seed), dtype=torch.float32)
    latents = pipe.sample(noise, prompt_embeds, negative, height=SIZE, width=SIZE, sampling=sampling,
                          reference=ReferenceOptions(lora_scale=lora_scale), control=control, known=known)
    return paste_back(pipe.decode(latents).cpu(), context, keep, feather=output.feather_radius, source=context)


def test_insert_without_a_product_is_the_old_inpaint_bit_for_bit(base_pipe, stage2_pipe):
    context, hole = _scene(batch=2)
    control, output = ControlOptions(harmonize=0.3), OutputOptions(feather=2)
    for pipe in (base_pipe, stage2_pipe):
        old = _inpaint_before_insert_existed(pipe, PROMPT, context, hole, FAST, control, output)
        assert torch.equal(pipe.inpaint(PROMPT, context, hole, sampling=FAST, control=control, output=output), old)
        out = pipe.insert(PROMPT, context, hole, sampling=FAST, control=control, output=output, return_dict=True)
        assert torch.equal(out.images, old) and out.mode == "training_free"


def test_product_lora_at_scale_zero_equals_none_and_the_context_is_kept_exactly(base_pipe, stage2_pipe, product_file):
    context, hole = _scene()
    kept = (hole < 0.5).unsqueeze(-1).expand_as(context)
    merged = {}
    for pipe in (base_pipe, stage2_pipe):
        background_before = pipe(PROMPT, context[0], hole[0], steps=2, seed=2)
        plain = pipe.insert(INSERT_PROMPT, context, hole, sampling=FAST)
        off = pipe.insert(INSERT_PROMPT, context, hole, product_file, sampling=FAST,
                          reference=ReferenceOptions(product_scale=0.0))
        on = merged[pipe] = pipe.insert(INSERT_PROMPT, context, hole, product_file, sampling=FAST)
        assert torch.equal(off, plain)
        assert (on - plain).abs()[~kept].mean() > 1e-3  # the product LoRA paints the hole
        assert torch.equal(on[kept], context[kept]) and torch.equal(plain[kept], context[kept])
        # The product leaves with the call: the background sampler is as before, bit for bit.
        assert not pipe.transformer.has_product_adapter
        assert torch.equal(pipe(PROMPT, context[0], hole[0], steps=2, seed=2), background_before)
    unmerged = base_pipe.insert(INSERT_PROMPT, context, hole, product_file, sampling=FAST, merge_lora=False)
    assert (unmerged - merged[base_pipe]).abs().max() < 1e-4  # merged for speed, the same model


def test_product_file_round_trips(product_file, token_product_file, tmp_path):
    for path in (product_file, token_product_file):
        product = load_product_lora(path)
        again = load_product_lora(save_product_lora(product, tmp_path / path.name))
        assert (again.identifier, again.class_noun, again.rank, again.alpha, again.targets, again.base, again.info) == (
            product.identifier, product.class_noun, product.rank, product.alpha, product.targets, product.base,
            product.info)
        assert again.lora.keys() == product.lora.keys() and all(torch.equal(again.lora[k], product.lora[k])
                                                                for k in product.lora)
        assert (again.token is None) == (product.token is None) == (path == product_file)
    token = load_product_lora(token_product_file).token
    assert token.token == "sks" and token.embedding.shape == (32,)


def test_a_learned_identifier_changes_the_prompt_and_a_missing_identifier_is_named(base_pipe, token_product_file,
                                                                                   product_file, caplog):
    context, hole = _scene()
    product = load_product_lora(token_product_file)
    with_token = base_pipe.encode_prompt([INSERT_PROMPT], tokens=product.tokens)
    assert not torch.equal(with_token, base_pipe.encode_prompt([INSERT_PROMPT]))
    with caplog.at_level(logging.WARNING, logger="dreampainter"):
        base_pipe.insert("a cup on a wooden table", context, hole, product_file, sampling=SamplingOptions(steps=1))
    assert "does not contain the product identifier 'sks'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dreampainter"):
        base_pipe.insert(INSERT_PROMPT, context, hole, token_product_file, sampling=SamplingOptions(steps=1))
    assert "identifier" not in caplog.text
    assert identifier_in("a sks cup", "sks") and not identifier_in("tasks", "sks") and not identifier_in("<sks>", "sks")


def test_bad_inputs_are_refused_before_sampling(base_pipe, product_file, tmp_path, monkeypatch):
    monkeypatch.setattr(base_pipe, "sample", lambda *a, **k: pytest.fail("sampled despite a bad input"))
    context, hole = _scene()
    with pytest.raises(InputError, match="nothing to generate"):
        base_pipe.insert(INSERT_PROMPT, context, torch.zeros(SIZE, SIZE), product_file)
    with pytest.raises(InputError, match="no context to keep"):
        base_pipe.insert(INSERT_PROMPT, context, torch.ones(SIZE, SIZE), product_file)
    with pytest.raises(InputError, match="does not match the context"):
        base_pipe.insert(INSERT_PROMPT, context, torch.ones(SIZE, SIZE + 16), product_file)
    with pytest.raises(InputError, match="no reference image"):
        base_pipe.insert(INSERT_PROMPT, context, hole, product_file, reference=ReferenceOptions(image=context))
    other_base = write_tiny_model(tmp_path / "other", seed=1)  # same shapes, other weights
    other = write_random_product_lora(other_base, tmp_path / "other.safetensors", base_model="tiny seed 1")
    with pytest.raises(WeightFormatError, match=r"another base model \(tiny seed 1\)"):
        base_pipe.insert(INSERT_PROMPT, context, hole, other)
    with pytest.raises(WeightFormatError, match="not a DreamPaint product file"):
        base_pipe.insert(INSERT_PROMPT, context, hole, other_base / "vae" / "diffusion_pytorch_model.safetensors")


def test_an_insertion_branch_holds_the_context_and_is_used_only_for_insertion(insertion_pipe, stage2_pipe, product_file,
                                                                               monkeypatch):
    context, hole = _scene()
    kept = (hole < 0.5).unsqueeze(-1).expand_as(context)
    seen = []
    forward = insertion_pipe.transformer.forward
    monkeypatch.setattr(insertion_pipe.transformer, "forward",
                        lambda *a, **k: seen.append(k.get("control_latents")) or forward(*a, **k))
    out = insertion_pipe.insert(INSERT_PROMPT, context, hole, product_file, sampling=FAST, return_dict=True)
    assert out.mode == "dreampainter" and seen and all(c is not None for c in seen)
    keep = 1.0 - hole
    expected = insertion_pipe.prepare_control(context * keep.unsqueeze(-1) + hole.unsqueeze(-1), keep)
    assert torch.equal(seen[0], expected)  # what the branch was trained on: kept pixels on white, and where
    assert torch.equal(out.images[kept], context[kept])
    free = insertion_pipe.insert(INSERT_PROMPT, context, hole, product_file, sampling=FAST,
                                 control=ControlOptions(mode="training_free"), return_dict=True)
    assert free.mode == "training_free" and (free.images - out.images).abs().max() > 1e-3
    # Backgrounds: an insertion branch is not a background branch, and the other way round.
    assert insertion_pipe(PROMPT, context[0], hole[0], steps=1, return_dict=True).mode == "training_free"
    with pytest.raises(CapabilityError, match="inserting products"):
        insertion_pipe(PROMPT, context[0], hole[0], steps=1, mode="dreampainter")
    with pytest.raises(CapabilityError, match="a branch for backgrounds only"):
        stage2_pipe.insert(INSERT_PROMPT, context, hole, control=ControlOptions(mode="dreampainter"))
    assert stage2_pipe.insert(INSERT_PROMPT, context, hole, sampling=SamplingOptions(steps=1),
                              return_dict=True).mode == "training_free"
