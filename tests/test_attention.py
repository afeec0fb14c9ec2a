"""modulated_attention (two SDPA calls, no N x N) against the materialised formula."""

import pytest
import torch
import torch.nn.functional as F

from dreampainter_core.attention import (
    GROUP_A,
    GROUP_B,
    group_key_scales,
    modulated_attention,
    modulation_matrix,
    naive_modulated_attention,
)

SCALES = [0.0, 0.3, 1.0, 1.7]

# (B, heads, N, D, split): split = 0 and N (one group), tiny and large group B, N % 8 != 0.
SHAPES = [
    (1, 1, 8, 8, 0),
    (1, 2, 13, 16, 13),
    (2, 2, 37, 16, 30),  # small group B, N not a multiple of 8
    (1, 3, 29, 8, 28),  # group B is a single token
    (2, 2, 45, 32, 9),  # large group B
    (1, 2, 64, 64, 51),  # ~80 / 20 like 1024^2 target + 512^2 reference
    (1, 1, 21, 24, 1),  # group A is a single token
]


def _qkv(b, h, n, d, dtype=torch.float32, requires_grad=False):
    return [torch.randn(b, h, n, d, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_naive_fp32(shape, scale, renormalize):
    b, h, n, d, split = shape
    q, k, v = _qkv(b, h, n, d)
    out = modulated_attention(q, k, v, split, scale, renormalize=renormalize)
    ref = naive_modulated_attention(q, k, v, split, scale, renormalize=renormalize)
    assert out.shape == ref.shape == (b, h, n, d)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [False, True])
def test_value_head_dim_differs_from_query(renormalize):
    q, k = torch.randn(2, 2, 19, 16), torch.randn(2, 2, 19, 16)
    v = torch.randn(2, 2, 19, 12)
    out = modulated_attention(q, k, v, 15, 0.4, renormalize=renormalize)
    ref = naive_modulated_attention(q, k, v, 15, 0.4, renormalize=renormalize)
    assert out.shape == (2, 2, 19, 12)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("split", [0, 17, 25, 40])
def test_scale_one_is_plain_sdpa(split, renormalize):
    q, k, v = _qkv(2, 3, 40, 16)
    out = modulated_attention(q, k, v, split, 1.0, renormalize=renormalize)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=0)


def test_single_group_is_plain_sdpa_at_any_scale():
    q, k, v = _qkv(1, 2, 23, 8)
    plain = F.scaled_dot_product_attention(q, k, v)
    for split in (0, 23):
        for renorm in (False, True):
            assert torch.equal(modulated_attention(q, k, v, split, 0.0, renormalize=renorm), plain)


def test_scale_zero_drops_the_other_groups_mass():
    n, split = 33, 26
    q, k, v = _qkv(2, 2, n, 16)
    out = modulated_attention(q, k, v, split, 0.0)

    v_b_zeroed = v.clone()
    v_b_zeroed[..., split:, :] = 0
    expected_a = F.scaled_dot_product_attention(q, k, v_b_zeroed)[..., :split, :]
    torch.testing.assert_close(out[..., :split, :], expected_a, atol=1e-6, rtol=1e-6)

    v_a_zeroed = v.clone()
    v_a_zeroed[..., :split, :] = 0
    expected_b = F.scaled_dot_product_attention(q, k, v_a_zeroed)[..., split:, :]
    torch.testing.assert_close(out[..., split:, :], expected_b, atol=1e-6, rtol=1e-6)

    # Not renormalised: NOT the same as the group attending only to itself.
    own_only_a = F.scaled_dot_product_attention(q[..., :split, :], k[..., :split, :], v[..., :split, :])
    assert not torch.allclose(out[..., :split, :], own_only_a, atol=1e-3)


def test_scale_zero_renormalized_is_own_group_attention():
    n, split = 33, 26
    q, k, v = _qkv(2, 2, n, 16)
    out = modulated_attention(q, k, v, split, 0.0, renormalize=True)
    own_a = F.scaled_dot_product_attention(q[..., :split, :], k[..., :split, :], v[..., :split, :])
    own_b = F.scaled_dot_product_attention(q[..., split:, :], k[..., split:, :], v[..., split:, :])
    torch.testing.assert_close(out[..., :split, :], own_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[..., split:, :], own_b, atol=1e-6, rtol=1e-6)


def test_renormalized_tiny_scale_stays_finite():
    # Logits so peaked toward the other group that the own group's softmax mass underflows.
    n, split, d = 12, 8, 8
    q = torch.zeros(1, 1, n, d)
    q[..., 0] = 50.0
    k = torch.zeros(1, 1, n, d)
    k[..., split:, 0] = 50.0  # group-A queries would attend only to group-B keys
    v = torch.randn(1, 1, n, d)
    for s in (0.0, 1e-6):
        out = modulated_attention(q, k, v, split, s, renormalize=True)
        assert torch.isfinite(out).all()
    own_a = F.scaled_dot_product_attention(q[..., :split, :], k[..., :split, :], v[..., :split, :])
    torch.testing.assert_close(
        modulated_attention(q, k, v, split, 0.0, renormalize=True)[..., :split, :], own_a
    )


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scale", [0.0, 0.3, 1.7])
def test_gradients_match_naive(scale, renormalize):
    b, h, n, d, split = 2, 2, 27, 16, 21
    q, k, v = _qkv(b, h, n, d, requires_grad=True)
    grad_out = torch.randn(b, h, n, d)

    out = modulated_attention(q, k, v, split, scale, renormalize=renormalize)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = naive_modulated_attention(q, k, v, split, scale, renormalize=renormalize)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("renormalize", [False, True])
def test_gradcheck_float64(renormalize):
    q, k, v = _qkv(1, 1, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: modulated_attention(q, k, v, 5, 0.4, renormalize=renormalize), (q, k, v)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0])
def test_low_precision_keeps_dtype(dtype, scale, renormalize):
    q, k, v = _qkv(2, 2, 50, 32)
    q16, k16, v16 = (t.to(dtype) for t in (q, k, v))
    out = modulated_attention(q16, k16, v16, 40, scale, renormalize=renormalize)
    assert out.dtype == dtype
    ref = naive_modulated_attention(q16.float(), k16.float(), v16.float(), 40, scale, renormalize=renormalize)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_group_key_scales_and_matrix():
    s_a = group_key_scales(5, 3, 0.25, GROUP_A)
    s_b = group_key_scales(5, 3, 0.25, GROUP_B)
    assert s_a.tolist() == [1, 1, 1, 0.25, 0.25]
    assert s_b.tolist() == [0.25, 0.25, 0.25, 1, 1]
    m = modulation_matrix(5, 3, 0.25)
    assert torch.equal(m[:3], s_a.expand(3, 5)) and torch.equal(m[3:], s_b.expand(2, 5))
    assert torch.equal(m, m.T)  # both directions get the same scale


@pytest.mark.parametrize("split", [-1, 11, 2.5, None])
def test_bad_split_raises(split):
    q, k, v = _qkv(1, 1, 10, 8)
    with pytest.raises(ValueError, match="split"):
        modulated_attention(q, k, v, split, 0.5)


@pytest.mark.parametrize("scale", [-0.1, float("nan"), float("inf")])
def test_bad_scale_raises(scale):
    q, k, v = _qkv(1, 1, 10, 8)
    with pytest.raises(ValueError, match="scale"):
        modulated_attention(q, k, v, 5, scale)


def test_mismatched_token_counts_raise():
    q, k, v = torch.randn(1, 1, 10, 8), torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8)
    with pytest.raises(ValueError, match="same tokens"):
        modulated_attention(q, k, v, 5, 0.5)


def _sdpa_kernels(fn):
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_uses_the_same_fused_kernel_as_plain_sdpa(scale, renormalize):
    # The point of the two-call form: no fallback to the N x N math backend. (A ones column
    # on V alone makes v's head dim differ from q/k's, which flash kernels refuse.)
    q, k, v = _qkv(1, 2, 40, 16)
    plain = _sdpa_kernels(lambda: F.scaled_dot_product_attention(q, k, v))
    if any("math" in name for name in plain):
        pytest.skip(f"plain SDPA itself uses the math backend here: {plain}")
    ours = _sdpa_kernels(lambda: modulated_attention(q, k, v, 33, scale, renormalize=renormalize))
    assert ours == plain


# ----------------------------------------------------------------------------- shielded rows


def _naive_shielded(q, k, v, split, scale, renormalize, text_len, shielded):
    """The materialised formula, then each shielded target row as softmax over keys [0, split) only."""
    out = naive_modulated_attention(q, k, v, split, scale, renormalize=renormalize).clone()
    work = torch.float64
    for b in range(q.shape[0]):
        rows = shielded[b % shielded.shape[0]].nonzero().flatten() + text_len
        probs = (q[b][:, rows].to(work) @ k[b][:, :split].to(work).transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
        out[b][:, rows] = (probs @ v[b][:, :split].to(work)).to(out.dtype)
    return out


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_shielded_target_rows_attend_without_the_reference(scale, renormalize):
    from dreampainter_core.attention import AttentionModulation

    text_len, n_target, n_ref = 5, 12, 9
    split = text_len + n_target
    q, k, v = _qkv(2, 3, split + n_ref, 16)
    shielded = torch.zeros(1, n_target, dtype=torch.bool)
    shielded[0, [1, 4, 5, 11]] = True  # one mask, repeated over the batch (the CFG passes)
    mod = AttentionModulation(scale, renormalize, shielded=shielded)
    assert not mod.is_plain
    out = mod.attend(q, k, v, split, text_len=text_len)
    torch.testing.assert_close(out, _naive_shielded(q, k, v, split, scale, renormalize, text_len, shielded),
                               atol=1e-5, rtol=1e-5)
    # every other row is exactly the unshielded modulation's
    plain = AttentionModulation(scale, renormalize).attend(q, k, v, split, text_len=text_len)
    keep = torch.ones(split + n_ref, dtype=torch.bool)
    keep[text_len + shielded[0].nonzero().flatten()] = False
    assert torch.equal(out[:, :, keep], plain[:, :, keep])
    # nothing shielded: the plain path's numbers, bit for bit
    none = AttentionModulation(scale, renormalize, shielded=torch.zeros(1, n_target, dtype=torch.bool))
    assert torch.equal(none.attend(q, k, v, split, text_len=text_len), plain)


def test_shielded_rows_equal_renormalised_attention_scale_zero_for_those_rows():
    from dreampainter_core.attention import AttentionModulation

    # Renormalised at scale 0 every target row ignores the reference: shielding all of them changes nothing.
    text_len, n_target, n_ref = 3, 8, 8
    q, k, v = _qkv(1, 2, text_len + n_target + n_ref, 8)
    split = text_len + n_target
    every = AttentionModulation(0.0, True, shielded=torch.ones(1, n_target, dtype=torch.bool))
    torch.testing.assert_close(every.attend(q, k, v, split, text_len=text_len),
                               AttentionModulation(0.0, True).attend(q, k, v, split), atol=1e-6, rtol=1e-6)


def test_shielded_rejects_what_does_not_fit():
    from dreampainter_core.attention import AttentionModulation
    from dreampainter_core.errors import InputError

    with pytest.raises(InputError, match="target tokens"):
        AttentionModulation(1.0, shielded=torch.ones(4, dtype=torch.bool))
    q, k, v = _qkv(3, 1, 20, 8)
    with pytest.raises(ValueError, match="divisor"):
        AttentionModulation(1.0, shielded=torch.ones(2, 4, dtype=torch.bool)).attend(q, k, v, 16, text_len=2)
    with pytest.raises(ValueError, match="past the reference"):
        AttentionModulation(1.0, shielded=torch.ones(1, 15, dtype=torch.bool)).attend(q, k, v, 16, text_len=2)
