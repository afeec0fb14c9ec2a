"""The DreamPainter transformer against stock diffusers CogView4 (tiny real-architecture model)."""

import copy

import pytest
import torch
from diffusers.models.transformers.transformer_cogview4 import CogView4RotaryPosEmbed

from dreampainter_core.attention import AttentionModulation
from dreampainter_core.rope import dreampainter_rope, target_and_reference_positions
from train.tiny import build_tiny_components
from dreampainter_core.transformer import (
    DreamPainterConfig,
    DreamPainterTransformer,
    evenly_spaced_layers,
    run_block_with_clean_reference,
)


@pytest.fixture(scope="module")
def base():
    return build_tiny_components(seed=0)["transformer"].eval()


def _inputs(base, batch=2, h=16, w=24, text=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = base.config
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    e = torch.randn(batch, text, cfg.text_embed_dim, generator=g)
    t = torch.tensor([700.0, 120.0][:batch])
    size = torch.tensor([[h * 8.0, w * 8.0]]).repeat(batch, 1)
    crop = torch.zeros(batch, 2)
    control = torch.randn(batch, cfg.in_channels + 1, h, w, generator=g)
    return x, e, t, size, crop, control


def _randomize(model, pattern, seed=3, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def test_init_equals_stock_cogview4_forward(base):
    x, e, t, size, crop, control = _inputs(base)
    stock = base(x, e, t, size, size, crop, return_dict=False)[0]
    model = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2))
    ours = model(x, e, t, size, size, crop, control_latents=control)
    assert ours.shape == stock.shape
    assert (ours - stock).abs().max().item() <= 1e-6
    # The control branch does run (and would change the output once the gates are trained).
    _randomize(model.control, "gates")
    assert (model(x, e, t, size, size, crop, control_latents=control) - stock).abs().max().item() > 1e-3


@torch.no_grad()
def test_fresh_lora_leaves_output_unchanged_and_targets_only_base_blocks(base):
    x, e, t, size, crop, control = _inputs(base)
    stage1 = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2))
    _randomize(stage1.control, "gates")
    expected = stage1(x, e, t, size, size, crop, control_latents=control)
    stage2 = copy.deepcopy(stage1)
    stage2.config.lora_rank = 4
    stage2.config.lora_alpha = 4.0
    stage2.add_lora()
    assert torch.equal(stage2(x, e, t, size, size, crop, control_latents=control), expected)
    names = [n for n, _ in stage2.named_modules() if n.endswith("lora_A")]
    assert names and all(n.startswith("base.transformer_blocks.") for n in names)
    # 7 linears per base block (q, k, v, out, ff in, ff out, AdaLN) x 4 blocks
    assert len(stage2.lora_layers()) == 7 * base.config.num_layers


@torch.no_grad()
def test_lora_scale_zero_is_stage1_exactly_and_scale_matters(base):
    x, e, t, size, crop, control = _inputs(base)
    model = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2, lora_rank=4))
    _randomize(model.control, "gates")
    model.set_lora_scale(0.0)
    stage2_off = model(x, e, t, size, size, crop, control_latents=control)
    stage1 = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2))
    stage1.control.load_state_dict(model.control.state_dict())
    _randomize(model.base, "lora_B")
    model.set_lora_scale(0.0)
    assert torch.equal(model(x, e, t, size, size, crop, control_latents=control), stage1(x, e, t, size, size, crop, control_latents=control))
    assert torch.equal(stage2_off, stage1(x, e, t, size, size, crop, control_latents=control))
    model.set_lora_scale(1.0)
    full = model(x, e, t, size, size, crop, control_latents=control)
    model.set_lora_scale(0.5)
    half = model(x, e, t, size, size, crop, control_latents=control)
    assert (full - stage2_off).abs().max() > 1e-3 and (half - full).abs().max() > 1e-4


def test_rope_offset_zero_equals_stock():
    for h, w in [(8, 8), (8, 12), (64, 64), (37, 21)]:
        stock = CogView4RotaryPosEmbed(32, 2, (256, 256))(torch.zeros(1, 16, 2 * h, 2 * w))
        ours = dreampainter_rope(32, (h, w))
        assert torch.equal(stock[0], ours[0]) and torch.equal(stock[1], ours[1])


@pytest.mark.parametrize("reference_scale", ["target", "own"])
@pytest.mark.parametrize("target,reference", [((64, 64), (64, 64)), ((64, 64), (32, 32)), ((32, 48), (50, 50)), ((8, 8), (128, 96))])
def test_reference_positions_never_overlap_target(target, reference, reference_scale):
    rows, cols = target_and_reference_positions(target, reference, reference_scale=reference_scale)
    n = target[0] * target[1]
    assert rows[:n].max() <= 255 and cols[:n].max() <= 255
    assert rows[n:].min() >= 256 and cols[n:].min() >= 256  # diagonal: both axes beyond the canvas
    target_pairs = set(zip(rows[:n].tolist(), cols[:n].tolist()))
    ref_pairs = set(zip(rows[n:].tolist(), cols[n:].tolist()))
    assert not target_pairs & ref_pairs
    assert len(ref_pairs) == reference[0] * reference[1]  # distinct positions for distinct tokens


def test_reference_layouts_place_the_reference_beside_or_over_the_target():
    target, reference = (4, 6), (4, 6)
    n = target[0] * target[1]
    diag = target_and_reference_positions(target, reference, layout="diagonal")
    beside = target_and_reference_positions(target, reference, layout="beside")
    overlay = target_and_reference_positions(target, reference, layout="overlay")
    # beside: the same rows, columns past the canvas; overlay: exactly the target's positions
    assert torch.equal(beside[0][n:], diag[0][:n]) and beside[1][n:].min() >= 256
    assert torch.equal(overlay[0][n:], overlay[0][:n]) and torch.equal(overlay[1][n:], overlay[1][:n])
    with pytest.raises(ValueError, match="layout"):
        target_and_reference_positions(target, reference, layout="above")


def test_reference_keeps_target_scale():
    # A 512 px reference beside a 1024 px target spans half the target's range (paper: (h+i, w+j)).
    rows, _ = target_and_reference_positions((64, 64), (32, 32), reference_scale="target")
    assert rows[64 * 64 :].min() == 256 and rows[64 * 64 :].max() == 256 + 31 * 4


@torch.no_grad()
def test_reference_tokens_change_target_and_renormalized_zero_scale_removes_them(base):
    x, e, t, size, crop, control = _inputs(base)
    model = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2, lora_rank=4))
    _randomize(model.control, "gates")
    _randomize(model.base, "lora_B", seed=5)
    ref = torch.randn(2, 16, 10, 8)  # another size than the target
    plain = model(x, e, t, size, size, crop, control_latents=control)
    with_ref = model(x, e, t, size, size, crop, control_latents=control, reference_latents=ref)
    assert with_ref.shape == plain.shape
    assert (with_ref - plain).abs().max() > 1e-3
    # Renormalised modulation at 0: text+target attend only among themselves -> reference has no effect.
    cut = model(x, e, t, size, size, crop, control_latents=control, reference_latents=ref, modulation=AttentionModulation(0.0, renormalize=True))
    assert (cut - plain).abs().max().item() <= 1e-5
    # The paper's (un-renormalised) formula at 0 drops probability mass: not the same as no reference.
    dropped = model(x, e, t, size, size, crop, control_latents=control, reference_latents=ref, modulation=AttentionModulation(0.0))
    assert (dropped - plain).abs().max() > 1e-4
    # Scale 1 is plain attention over all tokens.
    one = model(x, e, t, size, size, crop, control_latents=control, reference_latents=ref, modulation=AttentionModulation(1.0))
    assert torch.equal(one, with_ref)


@torch.no_grad()
def test_per_token_modulation_equals_the_stock_block_when_both_timesteps_agree(base):
    """run_block_with_clean_reference is the stock block's arithmetic: with the reference modulated
    by the target's own embedding it gives the stock block's output; with another embedding only
    the reference rows' modulation changes (the target moves only through attention)."""
    model = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=1))
    _randomize(model.base, "norm1.linear", seed=7)  # a non-trivial modulation
    block = model.base.transformer_blocks[1]
    g = torch.Generator().manual_seed(2)
    inner = model.inner_dim
    hidden, text = torch.randn(2, 20, inner, generator=g), torch.randn(2, 6, inner, generator=g)
    temb, other = torch.randn(2, base.config.time_embed_dim, generator=g), torch.randn(2, base.config.time_embed_dim, generator=g)
    rope = dreampainter_rope(base.config.attention_head_dim, (3, 4), (2, 4))
    kwargs = {"reference_tokens": 8, "modulation": None}
    stock = model._run_block(block, hidden, text, temb, rope, kwargs)  # diffusers' block, called as this version takes it
    ours = run_block_with_clean_reference(block, hidden, text, temb, temb, 8, rope, kwargs)
    torch.testing.assert_close(ours[0], stock[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], stock[1], rtol=0, atol=1e-6)
    moved = run_block_with_clean_reference(block, hidden, text, temb, other, 8, rope, kwargs)
    assert (moved[0][:, 12:] - stock[0][:, 12:]).abs().max() > 1e-2


@torch.no_grad()
def test_clean_reference_timestep_is_t0_modulation_of_the_reference_only(base):
    """reference_timestep="clean" equals "same-as-target" when the target's timestep is 0, differs at
    t > 0, never touches a forward without a reference, and the in-context override restores the
    target's timestep; training through it (checkpointing) gives the same gradients."""
    x, e, t, size, crop, control = _inputs(base)
    ref = torch.randn(2, 16, 8, 8)
    same = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2, lora_rank=4))
    _randomize(same.control, "gates")
    _randomize(same.base, "lora_B", seed=5)
    clean = copy.deepcopy(same)
    clean.config.reference_timestep = "clean"
    zero = torch.zeros_like(t)
    torch.testing.assert_close(clean(x, e, zero, size, size, crop, control_latents=control, reference_latents=ref),
                               same(x, e, zero, size, size, crop, control_latents=control, reference_latents=ref),
                               rtol=0, atol=1e-5)
    assert (clean(x, e, t, size, size, crop, control_latents=control, reference_latents=ref)
            - same(x, e, t, size, size, crop, control_latents=control, reference_latents=ref)).abs().max() > 1e-3
    assert torch.equal(clean(x, e, t, size, size, crop, control_latents=control),
                       same(x, e, t, size, size, crop, control_latents=control))
    assert torch.equal(clean(x, e, t, size, size, crop, reference_latents=ref, reference_timestep="same-as-target"),
                       same(x, e, t, size, size, crop, reference_latents=ref))
    with torch.enable_grad():
        clean.freeze_base()
        grads = []
        for ckpt in (False, True):
            clean.zero_grad(set_to_none=True)
            clean.gradient_checkpointing = ckpt
            clean(x, e, t, size, size, crop, control_latents=control, reference_latents=ref).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in clean.base.named_parameters() if p.grad is not None})
        assert grads[0] and grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_reference_layout_and_timestep_are_validated():
    with pytest.raises(ValueError, match="reference_timestep"):
        DreamPainterConfig(reference_timestep="t0").resolved(4)
    with pytest.raises(ValueError, match="reference_layout"):
        DreamPainterConfig(reference_layout="above").resolved(4)


@torch.no_grad()
def test_mask_guidance_zero_mask_removes_control_and_full_mask_keeps_it(base):
    x, e, t, size, crop, control = _inputs(base)
    model = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2))
    _randomize(model.control, "gates")
    n = (x.shape[2] // 2) * (x.shape[3] // 2)
    no_control = model(x, e, t, size, size, crop)
    full = model(x, e, t, size, size, crop, control_latents=control)
    assert torch.equal(model(x, e, t, size, size, crop, control_latents=control, token_mask=torch.ones(2, n)), full)
    assert torch.equal(model(x, e, t, size, size, crop, control_latents=control, token_mask=torch.zeros(2, n)), no_control)
    half_mask = torch.zeros(2, n)
    half_mask[:, : n // 2] = 1
    partial = model(x, e, t, size, size, crop, control_latents=control, token_mask=half_mask)
    assert not torch.equal(partial, full) and not torch.equal(partial, no_control)


def test_gradient_checkpointing_matches_and_base_stays_frozen(base):
    x, e, t, size, crop, control = _inputs(base)
    model = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2))
    model.freeze_base()
    _randomize(model.control, "gates")
    grads = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = ckpt
        model(x, e, t, size, size, crop, control_latents=control).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.control.named_parameters()})
        assert all(p.grad is None for p in model.base.parameters())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_config_validation_and_default_injection():
    assert evenly_spaced_layers(6, 28) == [0, 4, 9, 14, 18, 23]
    with pytest.raises(ValueError, match="injection_layers"):
        DreamPainterConfig(control_blocks=2, injection_layers=[0, 9]).resolved(4)
    with pytest.raises(ValueError, match="one entry per"):
        DreamPainterConfig(control_blocks=2, injection_layers=[0]).resolved(4)


@torch.no_grad()
def test_lora_inference_modes_agree_and_restore_the_base_exactly(base):
    x, e, t, size, crop, control = _inputs(base)
    model = DreamPainterTransformer(copy.deepcopy(base), DreamPainterConfig(control_blocks=2, lora_rank=4))
    _randomize(model.control, "gates")
    _randomize(model.base, "lora_B", seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_lora_scale(0.7)
    unmerged = model(x, e, t, size, size, crop, control_latents=control)
    with model.lora_for_inference(0.7, merge=True):
        merged = model(x, e, t, size, size, crop, control_latents=control)
    with model.lora_for_inference(0.0):
        off = model(x, e, t, size, size, crop, control_latents=control)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert (merged - off).abs().max() > 1e-3
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored bit for bit
    model.set_lora_scale(0.7)
    assert torch.equal(model(x, e, t, size, size, crop, control_latents=control), unmerged)  # adapters active again
