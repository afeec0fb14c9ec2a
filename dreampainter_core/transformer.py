"""The DreamPainter transformer on top of diffusers' CogView4 DiT.

We reuse diffusers' ``CogView4Transformer2DModel`` (patch embedding, timestep/size
embedding, blocks, output head) unchanged and own only what DreamPainter changes:

* the forward loop (the stock one is a short loop over blocks; ours is checked
  bit-exact against it when DreamPainter adds nothing);
* the auxiliary control branch (stage 1): ``num_blocks`` copies of base blocks fed
  with the base's patch-embedded noisy tokens plus a linear embedding of the
  patchified ``[Z_f, Z_m]`` (17 channels); block ``j``'s output goes through a
  zero-initialised linear gate and is added to the target tokens after base block
  ``injection_layers[j]``;
* reference tokens (stage 2): the reference latent is patch-embedded with the base
  patch embedding and appended after the target tokens, with shifted RoPE (rope.py);
* the attention processor (attention modulation between reference and the rest).

Design choices (documented, stored in weight metadata):

* ``reference_timestep``: "same-as-target" gives reference tokens the target's timestep
  modulation (the stock block applies one AdaLN modulation to the whole image stream, so
  the base blocks run unchanged; LoRA adapts them in stage 2). "clean" gives them the
  modulation of t = 0, as OminiControl does: the reference is a clean image, and the base
  blocks then read it as one, at every noise level of the target. That needs per-token
  modulation, so those blocks run through ``run_block_with_clean_reference`` (the stock
  block's arithmetic, checked equal to it when both timesteps are the same).
* ``reference_layout``: where the reference sits in RoPE (rope.py): "diagonal" (the
  paper's (h + i, w + j)) or "beside" (same rows, to the right).
* The control branch sees target tokens and text only, never reference tokens: it is
  trained in stage 1 without references and frozen in stage 2.
* Control blocks are initialised from the first ``num_blocks`` base blocks: the branch
  consumes the same input as base block 0, so copying the base's first blocks starts
  it with the features the base computes there (``init_from`` overrides this).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import AttentionModulation
from .rope import REFERENCE_LAYOUTS, REFERENCE_SCALES, dreampainter_rope

LORA_ADAPTER = "dreampainter"
PRODUCT_ADAPTER = "product"  # a DreamPaint product's LoRA (dreampainter_core.product_lora)
# All linear layers of the base DiT blocks (the paper: "all linear layers of the original branch").
REFERENCE_TIMESTEPS = ("same-as-target", "clean")
# What a control branch was trained for. "background": keep the product, paint the scene (stage 1).
# "insertion": keep the user's photo (the context), paint a product into a hole (DreamPaint's inpainting
# module, train.stage1 with data.mask_policy = "insertion"). Both take [Z_f, Z_m] = the kept pixels on
# white and the kept region; the pipeline uses a branch only for its own task.
CONTROL_TASKS = ("background", "insertion")
DEFAULT_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear")


def evenly_spaced_layers(num_control_blocks: int, num_base_layers: int) -> list[int]:
    """Default injection layers: control block j feeds base block floor(j * L / N) (VACE-style)."""
    return [int(j * num_base_layers / num_control_blocks) for j in range(num_control_blocks)]


@dataclass
class DreamPainterConfig:
    """What a DreamPainter weight file needs besides the base model; stored as metadata."""

    control_blocks: int = 6
    injection_layers: list[int] | None = None  # default: evenly spaced over the base blocks
    init_from: list[int] | None = None  # base blocks copied into the branch; default: the first N
    lora_rank: int = 0  # 0 = no LoRA (stage-1 model)
    lora_alpha: float | None = None  # default: = rank (scaling 1)
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    reference_scale: str = "target"  # see rope.py
    reference_timestep: str = "same-as-target"  # or "clean": t = 0 modulation (OminiControl)
    reference_layout: str = "diagonal"  # RoPE placement of the reference: "diagonal" or "beside"
    task: str = "background"  # CONTROL_TASKS; files from before it existed are background branches

    def resolved(self, num_base_layers: int) -> "DreamPainterConfig":
        cfg = copy.deepcopy(self)
        if cfg.control_blocks < 1:
            raise ValueError(f"control_blocks must be >= 1, got {cfg.control_blocks}")
        if cfg.injection_layers is None:
            cfg.injection_layers = evenly_spaced_layers(cfg.control_blocks, num_base_layers)
        if cfg.init_from is None:
            cfg.init_from = list(range(min(cfg.control_blocks, num_base_layers)))
            cfg.init_from += [cfg.init_from[-1]] * (cfg.control_blocks - len(cfg.init_from))
        if len(cfg.injection_layers) != cfg.control_blocks or len(cfg.init_from) != cfg.control_blocks:
            raise ValueError(
                f"injection_layers ({cfg.injection_layers}) and init_from ({cfg.init_from}) need one entry per "
                f"control block ({cfg.control_blocks})"
            )
        for name, layers in (("injection_layers", cfg.injection_layers), ("init_from", cfg.init_from)):
            bad = [i for i in layers if not 0 <= i < num_base_layers]
            if bad:
                raise ValueError(f"{name} {bad} outside the base model's blocks 0..{num_base_layers - 1}")
        if cfg.lora_alpha is None and cfg.lora_rank:
            cfg.lora_alpha = float(cfg.lora_rank)
        if cfg.reference_scale not in REFERENCE_SCALES:
            raise ValueError(f"reference_scale must be one of {REFERENCE_SCALES}")
        if cfg.reference_timestep not in REFERENCE_TIMESTEPS:
            raise ValueError(f"reference_timestep must be one of {REFERENCE_TIMESTEPS}, got {cfg.reference_timestep!r}")
        if cfg.reference_layout not in REFERENCE_LAYOUTS:
            raise ValueError(f"reference_layout must be one of {REFERENCE_LAYOUTS}, got {cfg.reference_layout!r}")
        if cfg.task not in CONTROL_TASKS:
            raise ValueError(f"task must be one of {CONTROL_TASKS}, got {cfg.task!r}")
        return cfg

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DreamPainterConfig":
        return cls(**json.loads(text))


@functools.lru_cache(maxsize=None)
def _block_takes_attention_kwargs(block_type: type) -> bool:
    """Whether a CogView4 block's forward has an ``attention_kwargs`` parameter (diffusers >= 0.34)."""
    return "attention_kwargs" in inspect.signature(block_type.forward).parameters


def run_block_with_clean_reference(block, hidden, text, temb, reference_temb, reference_tokens: int, rope,
                                   attention_kwargs=None):
    """One CogView4 block in which the last ``reference_tokens`` image tokens are modulated by
    ``reference_temb`` (t = 0) and the target and text by ``temb``: diffusers'
    CogView4TransformerBlock.forward with per-token AdaLN (tested equal to it when the two
    embeddings are the same)."""
    norm1 = block.norm1
    dtype = hidden.dtype
    n_target = hidden.shape[1] - reference_tokens
    target_mod = norm1.linear(temb).chunk(12, dim=1)
    reference_mod = norm1.linear(reference_temb).chunk(12, dim=1)

    def per_token(i: int) -> torch.Tensor:  # [B, N, D]: target rows, then reference rows
        return torch.cat([target_mod[i].unsqueeze(1).expand(-1, n_target, -1),
                          reference_mod[i].unsqueeze(1).expand(-1, reference_tokens, -1)], dim=1)

    # The 12 chunks, in CogView4AdaLayerNormZero's order: shift/scale/gate of attention and of the
    # MLP, each for the image stream and its c_ twin for the text.
    shift_msa, c_shift_msa, scale_msa, c_scale_msa, gate_msa, c_gate_msa = range(6)
    shift_mlp, c_shift_mlp, scale_mlp, c_scale_mlp, gate_mlp, c_gate_mlp = range(6, 12)
    norm_hidden = norm1.norm(hidden).to(dtype=dtype) * (1 + per_token(scale_msa)) + per_token(shift_msa)
    norm_text = (norm1.norm_context(text).to(dtype=dtype) * (1 + target_mod[c_scale_msa].unsqueeze(1))
                 + target_mod[c_shift_msa].unsqueeze(1))
    attn_hidden, attn_text = block.attn1(hidden_states=norm_hidden, encoder_hidden_states=norm_text,
                                         image_rotary_emb=rope, attention_mask=None, **(attention_kwargs or {}))
    hidden = hidden + attn_hidden * per_token(gate_msa)
    text = text + attn_text * target_mod[c_gate_msa].unsqueeze(1)
    norm_hidden = block.norm2(hidden) * (1 + per_token(scale_mlp)) + per_token(shift_mlp)
    norm_text = block.norm2_context(text) * (1 + target_mod[c_scale_mlp].unsqueeze(1)) + target_mod[c_shift_mlp].unsqueeze(1)
    hidden = hidden + block.ff(norm_hidden) * per_token(gate_mlp)
    text = text + block.ff(norm_text) * target_mod[c_gate_mlp].unsqueeze(1)
    return hidden, text


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], the same token layout as CogView4PatchEmbed."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).flatten(3, 5).flatten(1, 2)


class DreamPainterAttnProcessor:
    """CogView4's attention (qk LayerNorm, RoPE on image tokens, SDPA) plus attention modulation.

    Identical to diffusers' ``CogView4AttnProcessor`` when there are no reference tokens
    or ``attention_scale == 1``. Reference tokens are the last ``reference_tokens`` image
    tokens; group A = text + target, group B = reference (see attention.py).
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference_tokens: int = 0,
        modulation: AttentionModulation | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise NotImplementedError("DreamPainter does not use text attention masks (CogView4 passes none)")
        dtype = encoder_hidden_states.dtype
        text_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:
            query[:, :, text_len:, :] = apply_rotary_emb(query[:, :, text_len:, :], image_rotary_emb, use_real_unbind_dim=-2)
            key[:, :, text_len:, :] = apply_rotary_emb(key[:, :, text_len:, :], image_rotary_emb, use_real_unbind_dim=-2)

        total = query.shape[2]
        if reference_tokens and modulation is not None and not modulation.is_plain:
            out = modulation.attend(query, key, value, split=total - reference_tokens, text_len=text_len)
        else:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, image_out = out.split([text_len, total - text_len], dim=1)
        return image_out, encoder_out


class ControlBranch(nn.Module):
    """Stage 1's auxiliary branch: condition embedding, copied blocks, zero-initialised gates."""

    def __init__(self, base, config: DreamPainterConfig):
        super().__init__()
        cfg = base.config
        if config.control_blocks > cfg.num_layers:  # weight files are refused beyond this too (weights.py)
            raise ValueError(f"control_blocks ({config.control_blocks}) must not exceed the base model's "
                             f"{cfg.num_layers} blocks")
        inner_dim = cfg.num_attention_heads * cfg.attention_head_dim
        # [Z_f (in_channels), Z_m (1)] patchified like the base's patch embedding.
        self.cond_embed = nn.Linear((cfg.in_channels + 1) * cfg.patch_size**2, inner_dim)
        self.blocks = nn.ModuleList(copy.deepcopy(base.transformer_blocks[i]) for i in config.init_from)
        self.gates = nn.ModuleList(nn.Linear(inner_dim, inner_dim) for _ in range(config.control_blocks))
        for gate in self.gates:
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        self.injection_layers = list(config.injection_layers)
        p = next(base.parameters())
        self.to(device=p.device, dtype=p.dtype)
        # The copies inherit requires_grad=False from a frozen base; the branch is what trains.
        self.requires_grad_(True)


class DreamPainterTransformer(nn.Module):
    """CogView4 DiT + control branch + reference tokens + LoRA, with its own forward loop."""

    def __init__(self, base, config: DreamPainterConfig | None = None, with_control: bool = True):
        super().__init__()
        self.base = base
        self.config = (config or DreamPainterConfig()).resolved(base.config.num_layers)
        self.control = ControlBranch(base, self.config) if with_control else None
        self.gradient_checkpointing = False
        self.has_lora = False
        # Merge LoRA into the weights for a generation (fast). Off for weights stored in
        # fp8 (merging there is lossy/unsupported) or streamed from the CPU (block swap).
        self.merge_lora_at_inference = True
        processor = DreamPainterAttnProcessor()
        for block in self.base.transformer_blocks:
            block.attn1.set_processor(processor)
        if self.control is not None:
            for block in self.control.blocks:
                block.attn1.set_processor(processor)
        if self.config.lora_rank:
            self.add_lora()

    # ---- properties used by the pipeline -------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.base.config.patch_size

    @property
    def in_channels(self) -> int:
        return self.base.config.in_channels

    @property
    def inner_dim(self) -> int:
        return self.base.config.num_attention_heads * self.base.config.attention_head_dim

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def supports_reference(self) -> bool:
        return self.has_lora

    def has_branch_for(self, task: str) -> bool:
        """Whether this model has a control branch trained for ``task`` (CONTROL_TASKS)."""
        return self.control is not None and self.config.task == task

    # ---- LoRA -------------------------------------------------------------------------
    # Two peft adapters can sit on the base blocks' linears: LORA_ADAPTER (stage 2, loaded with the
    # DreamPainter file) and PRODUCT_ADAPTER (a DreamPaint product, dreampainter_core.product_lora, only
    # while an insertion runs or a product trains). Between generations only the stage-2 adapter is
    # active, so a model that once held a product generates exactly as one that never did.
    def lora_target_regex(self, targets=None) -> str:
        names = "|".join(t.replace(".", r"\.") for t in (self.config.lora_targets if targets is None else targets))
        return rf"^transformer_blocks\.\d+\.({names})$"

    def add_lora(self) -> None:
        """Inject peft LoRA layers into the base blocks' linears (not the control branch)."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.has_lora:
            return
        if not self.config.lora_rank:
            raise ValueError("set config.lora_rank > 0 before adding LoRA")
        lora_config = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            target_modules=self.lora_target_regex(),
            lora_dropout=0.0,
            init_lora_weights=True,  # B = 0: adding LoRA leaves the model's output unchanged
        )
        inject_adapter_in_model(lora_config, self.base, adapter_name=LORA_ADAPTER)
        self.has_lora = True

    def lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.base.modules() if isinstance(m, LoraLayer)]

    def set_lora_scale(self, scale: float) -> None:
        """``f_out = W x + scale * LoRA(x)``; scale 0 gives back the stage-1 model exactly."""
        for layer in self.lora_layers():
            layer.set_scale(LORA_ADAPTER, float(scale))

    # ---- the product adapter ----------------------------------------------------------
    @property
    def has_product_adapter(self) -> bool:
        return any(PRODUCT_ADAPTER in layer.lora_A for layer in self.lora_layers())

    def add_product_adapter(self, rank: int, alpha: float, targets, dtype: torch.dtype | None = None) -> None:
        """Inject an (initially zero) product LoRA beside the stage-2 one, replacing a previous product
        adapter; its weights in ``dtype`` (default: the model's compute dtype, also when the block
        weights are stored in float8) and frozen; inactive until set_active_adapters or
        lora_for_inference(product_scale=...) turns it on."""
        import warnings

        from peft import LoraConfig, inject_adapter_in_model

        self.remove_product_adapter()
        lora_config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=self.lora_target_regex(targets),
                                 lora_dropout=0.0, init_lora_weights=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")  # a second adapter is the point
            inject_adapter_in_model(lora_config, self.base, adapter_name=PRODUCT_ADAPTER)
        dtype = dtype or self.dtype
        for param in self.product_parameters().values():
            param.data = param.data.to(dtype)
            param.requires_grad_(False)
        self.set_active_adapters(self.resting_adapters())

    def remove_product_adapter(self) -> None:
        for layer in self.lora_layers():
            if PRODUCT_ADAPTER in layer.lora_A:
                layer.delete_adapter(PRODUCT_ADAPTER)
        getattr(self.base, "peft_config", {}).pop(PRODUCT_ADAPTER, None)
        if self.lora_layers():
            self.set_active_adapters(self.resting_adapters())

    def product_parameters(self) -> dict[str, nn.Parameter]:
        marker = f".{PRODUCT_ADAPTER}."
        return {name: p for name, p in self.named_parameters() if "lora_" in name and marker in name}

    def product_state_dict(self) -> dict[str, torch.Tensor]:
        """The product adapter's weights under peft's key names (adapter name left out)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.base, adapter_name=PRODUCT_ADAPTER)

    def load_product_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        dtype = next(iter(self.product_parameters().values())).dtype
        tensors = {k: v.to(device=self.device, dtype=dtype) for k, v in tensors.items()}
        result = set_peft_model_state_dict(self.base, tensors, adapter_name=PRODUCT_ADAPTER)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"product LoRA tensors do not fit this model's layers, e.g. {unexpected[:3]}")

    def resting_adapters(self) -> list[str]:
        """The adapters active between generations: the stage-2 one, if any."""
        return [LORA_ADAPTER] if self.has_lora else []

    def set_active_adapters(self, names: list[str]) -> None:
        """Which adapters every LoRA layer applies; their parameters keep their requires_grad (peft's
        set_adapter would make every active adapter trainable)."""
        flags = {p: p.requires_grad for name, p in self.named_parameters() if "lora_" in name}
        for layer in self.lora_layers():
            layer.set_adapter(list(names))
        for param, flag in flags.items():
            param.requires_grad_(flag)

    @contextmanager
    def lora_for_inference(self, scale: float, merge: bool = True, product_scale: float = 0.0):
        """LoRA at ``scale`` (and the product adapter, when one is loaded, at ``product_scale``) for a
        whole generation, without its per-layer cost.

        An adapter at scale 0 is switched off (exactly the model without it, and free; both at 0: the
        stage-1 model); otherwise the scaled adapters are merged into the base weights for the duration
        and unmerged afterwards, so training and later calls see the unmerged model. ``merge=False``
        keeps the separate LoRA path (e.g. for fp8-stored weights, where merging is lossy).
        """
        layers = self.lora_layers()
        if not layers:
            yield
            return
        with_product = self.has_product_adapter
        active = [name for name, s in ((LORA_ADAPTER, scale), (PRODUCT_ADAPTER, product_scale))
                  if s != 0.0 and (self.has_lora if name == LORA_ADAPTER else with_product)]
        self.set_lora_scale(scale)
        if with_product:
            for layer in layers:
                layer.set_scale(PRODUCT_ADAPTER, float(product_scale))
        if not active:
            for layer in layers:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in layers:
                    layer.enable_adapters(True)
            return
        if with_product:  # without one, the stage-2 adapter alone is active already
            self.set_active_adapters(active)
        try:
            if not merge:
                yield
                return
            # peft's unmerge subtracts the delta again, which is not exact (and in bf16 would
            # erode the base a little on every call); so back the weights up (on the CPU, as
            # ComfyUI's ModelPatcher does) and copy them back afterwards: bit-exact.
            merging = [layer for layer in layers if any(name in layer.lora_A for name in active)]
            backups = []
            with torch.no_grad():
                for layer in merging:
                    weight = layer.get_base_layer().weight
                    backups.append((weight, weight.detach().to("cpu", copy=True)))
                    layer.merge(adapter_names=[name for name in active if name in layer.lora_A])
            try:
                yield
            finally:
                with torch.no_grad():
                    for layer, (weight, saved) in zip(merging, backups):
                        layer.unmerge()
                        weight.copy_(saved)
        finally:
            if with_product:
                self.set_active_adapters(self.resting_adapters())

    # ---- forward ----------------------------------------------------------------------
    def _run_block(self, block, hidden, text, temb, rope, attention_kwargs, reference_temb=None):
        if reference_temb is not None:  # clean reference tokens: per-token modulation
            args = (block, hidden, text, temb, reference_temb, attention_kwargs["reference_tokens"], rope, attention_kwargs)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return checkpoint(run_block_with_clean_reference, *args, use_reentrant=False)
            return run_block_with_clean_reference(*args)
        # diffusers >= 0.34 takes the processor's extra arguments as one `attention_kwargs`
        # dict; 0.33's CogView4TransformerBlock takes them as **kwargs.
        if _block_takes_attention_kwargs(type(block)):
            args, kwargs = (hidden, text, temb, rope, None, attention_kwargs), {}
        else:
            args, kwargs = (hidden, text, temb, rope, None), dict(attention_kwargs or {})
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def control_residuals(
        self,
        target_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        control_latents: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        control_scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """Gated outputs of the control blocks, one per injection (target tokens only)."""
        hidden = target_tokens + self.control.cond_embed(patchify(control_latents.to(target_tokens.dtype), self.patch_size))
        text = text_tokens
        residuals = []
        for block, gate in zip(self.control.blocks, self.control.gates):
            hidden, text = self._run_block(block, hidden, text, temb, rope, None)
            residual = gate(hidden)
            if token_mask is not None:
                # Train-free mask guidance: the branch only constrains the product region.
                residual = residual * token_mask.to(residual.dtype).unsqueeze(-1)
            if control_scale != 1.0:
                residual = residual * control_scale
            residuals.append(residual)
        return residuals

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        original_size: torch.Tensor,
        target_size: torch.Tensor,
        crop_coords: torch.Tensor,
        control_latents: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        modulation: AttentionModulation | None = None,
        token_mask: torch.Tensor | None = None,
        control_scale: float = 1.0,
        reference_layout: str | None = None,
        reference_timestep: str | None = None,
    ) -> torch.Tensor:
        """Velocity prediction ``[B, C, H, W]`` for the target latent.

        control_latents: ``[B, in_channels + 1, H, W]`` = [foreground latent, mask on the
        latent grid]; None runs the base alone. reference_latents: ``[B, in_channels, h, w]``
        (any size divisible by the patch size). modulation: the attention control between
        target and reference (None = plain attention). token_mask: ``[B, N_target]`` for mask guidance.
        reference_layout / reference_timestep: None = the model's config (what it was trained with);
        the training-free in-context reference, noised with the target, passes "beside" and
        "same-as-target".
        """
        base = self.base
        p = self.patch_size
        batch, _, height, width = hidden_states.shape
        grid = (height // p, width // p)
        ref_grid = None
        if reference_latents is not None:
            ref_grid = (reference_latents.shape[-2] // p, reference_latents.shape[-1] // p)
        rope = dreampainter_rope(
            base.config.attention_head_dim,
            grid,
            ref_grid,
            axes_dim=tuple(base.config.rope_axes_dim),
            reference_scale=self.config.reference_scale,
            device=hidden_states.device,
            layout=reference_layout or self.config.reference_layout,
        )
        n_target = grid[0] * grid[1]

        tokens, text = base.patch_embed(hidden_states, encoder_hidden_states)
        temb = F.silu(base.time_condition_embed(timestep, original_size, target_size, crop_coords, tokens.dtype))

        residuals: dict[int, list[torch.Tensor]] = {}
        if control_latents is not None and self.control is not None:
            target_rope = (rope[0][:n_target], rope[1][:n_target])
            outs = self.control_residuals(tokens, text, temb, target_rope, control_latents, token_mask, control_scale)
            for layer, residual in zip(self.control.injection_layers, outs):
                residuals.setdefault(layer, []).append(residual)

        attention_kwargs: dict[str, Any] | None = None
        reference_temb = None
        if reference_latents is not None:
            ref_tokens = base.patch_embed.proj(patchify(reference_latents.to(tokens.dtype), p))
            tokens = torch.cat([tokens, ref_tokens], dim=1)
            attention_kwargs = {"reference_tokens": ref_tokens.shape[1], "modulation": modulation}
            if (reference_timestep or self.config.reference_timestep) == "clean":
                reference_temb = F.silu(base.time_condition_embed(torch.zeros_like(timestep), original_size, target_size,
                                                                  crop_coords, tokens.dtype))

        for index, block in enumerate(base.transformer_blocks):
            tokens, text = self._run_block(block, tokens, text, temb, rope, attention_kwargs, reference_temb)
            for residual in residuals.get(index, ()):
                if tokens.shape[1] == n_target:
                    tokens = tokens + residual
                else:  # control residuals go to the target tokens only
                    tokens = torch.cat([tokens[:, :n_target] + residual, tokens[:, n_target:]], dim=1)

        out = base.norm_out(tokens[:, :n_target], temb)
        out = base.proj_out(out)
        out = out.reshape(batch, grid[0], grid[1], -1, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)

    # ---- parameter groups (training and weight files) ----------------------------------
    def control_state_dict(self) -> dict[str, torch.Tensor]:
        if self.control is None:
            return {}
        return {k: v for k, v in self.control.state_dict().items() if not k.startswith("injection")}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.has_lora:
            return {}
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.base, adapter_name=LORA_ADAPTER)

    def freeze_base(self) -> None:
        for name, param in self.base.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(False)
