"""Attention modulation between the reference image and the rest (method.md, "Inference controls").

The joint sequence is split in two groups: tokens ``[0, split)`` are group A (text + target
image), tokens ``[split, N)`` are group B (reference image). The paper's control is

    Attention = S ⊙ softmax(Q K^T / sqrt(D)) V

with ``S = 1`` inside a group and ``S = scale`` between the groups (both directions). It is
*not* renormalised: at ``scale = 0`` the probability mass that went to the other group is
simply dropped. ``renormalize=True`` offers ``(S ⊙ P) / rowsum(S ⊙ P)`` instead.

Why it needs no N x N matrix: S only depends on (query group, key group), so for the query
rows of one group, ``S ⊙ P`` is ``P`` times a per-key scale, and ``(P * s_key) V`` equals
``P (V * s_key)``. One stock ``F.scaled_dot_product_attention`` call per query group, each
with its own scaled copy of V, is therefore exact and keeps the fused / flash kernels.

Shapes follow SDPA: ``[..., N, D]`` (typically ``[B, heads, N, D]``, already RoPE'd).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

__all__ = [
    "AttentionModulation",
    "GROUP_A",
    "GROUP_B",
    "group_key_scales",
    "modulation_matrix",
    "modulated_attention",
    "naive_modulated_attention",
]

GROUP_A = 0  # text + target image, tokens [0, split)
GROUP_B = 1  # reference image, tokens [split, N)

# Flash SDPA kernels want one head dim, a multiple of 8, for q, k and v; the renormalised
# path's extra "ones" value column makes the dims differ, so all three are padded to this.
_HEAD_DIM_ALIGN = 8


def _check_args(query: Tensor, key: Tensor, value: Tensor, split, scale) -> tuple[int, float]:
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError(
            f"modulated_attention: query/key/value must be [..., N, D] tensors, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    n = query.shape[-2]
    if key.shape[-2] != n or value.shape[-2] != n:
        raise ValueError(
            "modulated_attention: query, key and value must hold the same tokens (joint "
            f"self-attention), got N = {n}, {key.shape[-2]}, {value.shape[-2]}."
        )
    try:
        split = operator.index(split)
    except TypeError:
        raise ValueError(
            f"modulated_attention: split must be an integer token index, got {split!r}."
        ) from None
    if not 0 <= split <= n:
        raise ValueError(
            f"modulated_attention: split must be in [0, N] = [0, {n}] (tokens [0, split) are "
            f"text + target, [split, N) the reference), got {split}."
        )
    return split, check_modulation_scale(scale, "modulated_attention: scale")


def check_modulation_scale(scale, name: str = "attention_scale", maximum: float | None = None) -> float:
    """The one rule for S's between-group value: a finite number >= 0 (and <= ``maximum``, the
    sampler's documented limit, when given)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0 \
            or maximum is not None and scale > maximum:
        bound = "" if maximum is None else f" and <= {maximum:g}"
        raise InputError(
            f"{name} must be a finite number >= 0{bound} (1 = plain attention, > 1 = attend more to the other "
            f"group, 0 = the groups do not see each other), got {scale!r}"
        )
    return float(scale)


@dataclass(frozen=True)
class AttentionModulation:
    """The reference attention control, checked once here and carried to the attention processor.

    ``shielded``: ``[B, N_target]`` bool, the target's image tokens that do not see the reference
    at all (the product's tokens, ``ReferenceOptions.shield_product``): their rows attend over the
    text and target keys only, as if no reference were there. The reference sits on the target's
    own positions in some layouts, so without this the product's tokens read the background the
    reference shows where the product stands. None = every row as ``scale`` says."""

    scale: float = 1.0
    renormalize: bool = False
    shielded: Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "scale", check_modulation_scale(self.scale))
        object.__setattr__(self, "renormalize", bool(self.renormalize))
        if self.shielded is not None:
            if not isinstance(self.shielded, Tensor) or self.shielded.dim() != 2:
                raise InputError(f"shielded must be a [batch, target tokens] tensor, got "
                                 f"{getattr(self.shielded, 'shape', type(self.shielded).__name__)}")
            object.__setattr__(self, "shielded", self.shielded.to(torch.bool))

    @property
    def is_plain(self) -> bool:
        """S is all ones and nothing is shielded: plain attention, bit for bit."""
        return self.scale == 1.0 and self.shielded is None

    def attend(self, query: Tensor, key: Tensor, value: Tensor, split: int, text_len: int = 0) -> Tensor:
        """``modulated_attention`` without re-checking what construction checked; then the shielded
        rows (target tokens, which start at ``text_len``) over the keys before ``split`` only."""
        out = _modulated(query, key, value, split, self.scale, self.renormalize)
        if self.shielded is not None:
            out = _shield_rows(out, query, key, value, split, text_len, self.shielded)
        return out


def _shield_rows(out: Tensor, query: Tensor, key: Tensor, value: Tensor, split: int, text_len: int,
                 shielded: Tensor) -> Tensor:
    """``out`` with the shielded target rows recomputed over keys ``[0, split)`` (renormalised there).
    Exact and without an N x N matrix: one SDPA call per batch row over just those query rows.
    The batch may be the shield's repeated (classifier-free guidance stacks the passes)."""
    batch, n_target = query.shape[0], shielded.shape[1]
    if text_len + n_target > split:
        raise ValueError(f"shielded covers {n_target} target tokens after {text_len} text tokens, past the "
                         f"reference's start ({split})")
    if batch % shielded.shape[0]:
        raise ValueError(f"shielded has batch {shielded.shape[0]}, the attention {batch}: expected a divisor")
    rows = shielded.to(query.device).repeat(batch // shielded.shape[0], 1)
    out = out.clone()
    for b in range(batch):
        idx = rows[b].nonzero().flatten() + text_len
        if idx.numel():
            out[b, ..., idx, :] = F.scaled_dot_product_attention(
                query[b, ..., idx, :], key[b, ..., :split, :], value[b, ..., :split, :])
    return out


def group_key_scales(
    n_tokens: int,
    split: int,
    scale: float,
    query_group: int,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-key factor ``S[i, :]`` shared by every query row ``i`` of ``query_group`` (shape ``[N]``).

    ``query_group`` is ``GROUP_A`` (0) or ``GROUP_B`` (1). Keys of the same group get 1,
    keys of the other group get ``scale``.
    """
    if query_group not in (GROUP_A, GROUP_B):
        raise ValueError(f"group_key_scales: query_group must be 0 (A) or 1 (B), got {query_group!r}.")
    in_b = torch.arange(n_tokens, device=device) >= split
    same = in_b if query_group == GROUP_B else ~in_b
    out = torch.full((n_tokens,), float(scale), device=device, dtype=dtype)
    out[same] = 1.0
    return out


def modulation_matrix(n_tokens: int, split: int, scale: float, *, device=None, dtype=torch.float32) -> Tensor:
    """The full ``[N, N]`` S matrix. Materialised: for tests and the naive reference only."""
    s_a = group_key_scales(n_tokens, split, scale, GROUP_A, device=device, dtype=dtype)
    s_b = group_key_scales(n_tokens, split, scale, GROUP_B, device=device, dtype=dtype)
    return torch.cat([s_a.expand(split, n_tokens), s_b.expand(n_tokens - split, n_tokens)], dim=0)


def _scale_other_group(value: Tensor, split: int, scale: float, query_group: int) -> Tensor:
    """``value * s_key`` for the query rows of ``query_group``; a copy, the input is untouched.

    One copy scaled in place (no extra temporary: this is the only O(N * D) working memory
    besides the outputs). Multiplying by a Python float keeps a single rounding in bf16/fp16:
    ``scale`` itself is not rounded to the low-precision dtype first.
    """
    scaled = value.clone()
    other = scaled[..., split:, :] if query_group == GROUP_A else scaled[..., :split, :]
    other.mul_(scale)
    return scaled


def modulated_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    split: int,
    scale: float,
    renormalize: bool = False,
) -> Tensor:
    """``S ⊙ softmax(Q K^T / sqrt(D)) V`` with S = 1 within a group, ``scale`` between groups.

    Exact, no N x N matrix: two ``F.scaled_dot_product_attention`` calls (one per query
    group) over all keys, with V scaled per key group. ``renormalize=True`` divides each row
    by ``rowsum(S ⊙ P)``. ``scale == 1`` (or a single group) is one plain SDPA call, bit-for-bit.
    Keeps the input dtype and device; differentiable.
    """
    split, scale = _check_args(query, key, value, split, scale)
    return _modulated(query, key, value, split, scale, renormalize)


def _modulated(query: Tensor, key: Tensor, value: Tensor, split: int, scale: float, renormalize: bool) -> Tensor:
    n = query.shape[-2]
    if scale == 1.0 or split == 0 or split == n:
        # S is all ones: exactly plain attention in both modes.
        return F.scaled_dot_product_attention(query, key, value)

    q_a, q_b = query[..., :split, :], query[..., split:, :]

    if renormalize and scale == 0.0:
        # Renormalised at 0 = attention restricted to the own group. Computing it that way
        # is exact, cheaper, and avoids 0/0 when the own group's softmax mass underflows.
        out_a = F.scaled_dot_product_attention(q_a, key[..., :split, :], value[..., :split, :])
        out_b = F.scaled_dot_product_attention(q_b, key[..., split:, :], value[..., split:, :])
        return torch.cat([out_a, out_b], dim=-2)

    if not renormalize:
        out_a = F.scaled_dot_product_attention(q_a, key, _scale_other_group(value, split, scale, GROUP_A))
        out_b = F.scaled_dot_product_attention(q_b, key, _scale_other_group(value, split, scale, GROUP_B))
        return torch.cat([out_a, out_b], dim=-2)

    # Renormalised, scale > 0: a ones column appended to V comes out of SDPA as rowsum(S ⊙ P)
    # (it is scaled per key like V). Flash kernels (CPU and CUDA) need q, k and v to share one
    # head dim that is a multiple of 8, else SDPA falls back to the N x N math path; so q, k
    # and v are all zero-padded to that width. Zero columns in q/k leave QK^T unchanged; the
    # softmax scale is passed explicitly because it must stay 1/sqrt(D) of the real head dim.
    d_qk, d_v = query.shape[-1], value.shape[-1]
    width = -(-max(d_qk, d_v + 1) // _HEAD_DIM_ALIGN) * _HEAD_DIM_ALIGN
    extra = value.new_zeros(*value.shape[:-1], width - d_v)
    extra[..., 0] = 1.0
    value_aug = torch.cat([value, extra], dim=-1)
    q_pad = F.pad(query, (0, width - d_qk))
    k_pad = F.pad(key, (0, width - d_qk))
    sm_scale = 1.0 / math.sqrt(d_qk)
    out_a = F.scaled_dot_product_attention(
        q_pad[..., :split, :], k_pad, _scale_other_group(value_aug, split, scale, GROUP_A), scale=sm_scale
    )
    out_b = F.scaled_dot_product_attention(
        q_pad[..., split:, :], k_pad, _scale_other_group(value_aug, split, scale, GROUP_B), scale=sm_scale
    )
    out = torch.cat([out_a, out_b], dim=-2)
    # Divide in fp32 (fp64 stays fp64) so bf16/fp16 take one rounding, not two.
    # rowsum(S ⊙ P) >= min(1, scale) > 0, so no 0/0 here.
    work = torch.promote_types(value.dtype, torch.float32)
    num = out[..., :d_v].to(work)
    den = out[..., d_v : d_v + 1].to(work)
    return (num / den).to(value.dtype)


def naive_modulated_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    split: int,
    scale: float,
    renormalize: bool = False,
) -> Tensor:
    """Materialised reference: builds softmax(QK^T/sqrt(D)) and S as N x N, fp32 (or wider) inside.

    O(B * heads * N^2) memory. For tests and benchmarks only, never in the model.
    """
    split, scale = _check_args(query, key, value, split, scale)
    n, d = query.shape[-2], query.shape[-1]
    work = torch.promote_types(query.dtype, torch.float32)
    # Without autograd the peak is two [..., N, N] tensors (+ the [N, N] S): a fair naive cost.
    probs = (query.to(work) @ key.to(work).transpose(-2, -1) / math.sqrt(d)).softmax(dim=-1)
    weights = probs * modulation_matrix(n, split, scale, device=query.device, dtype=work)
    del probs
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights @ value.to(work)).to(value.dtype)
