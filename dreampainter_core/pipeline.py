"""DreamPainterPipeline: product + mask (+ reference) + prompt -> image with a new background.

The sampler follows diffusers' ``CogView4Pipeline`` exactly where DreamPainter adds
nothing (same noise convention, timesteps, dynamic shift and CFG), which the tests
check on a tiny model. The pieces (``encode_prompt``, ``prepare_control``,
``encode_reference``, ``sample``, ``decode``) are public so that the ComfyUI nodes
and the training code reuse them instead of re-implementing them.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CapabilityError, DreamPainterError, InputError
from .images import as_image_batch, as_mask_batch, check_product_and_mask
from .masks import mask_to_token_grid
from .product import paste_back as paste_back_product
from .product import place_product
from .transformer import DreamPainterTransformer

logger = logging.getLogger("dreampainter")

PLACEMENTS = ("keep", "center")


class GenerationCancelled(DreamPainterError):
    """The per-step callback asked to stop."""


@dataclass(frozen=True)
class SizeRule:
    """Allowed output sizes. CogView4's makers: 512..2048 per side, divisible by 32, <= 2^21 px."""

    min_side: int = 512
    max_side: int = 2048
    multiple: int = 32
    max_pixels: int = 2**21

    def check(self, width: int, height: int) -> None:
        problems = []
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise InputError(f"{name} must be an integer number of pixels, got {value!r}")
            if not self.min_side <= value <= self.max_side:
                problems.append(f"{name}={value} is outside {self.min_side}..{self.max_side}")
            elif value % self.multiple:
                problems.append(f"{name}={value} is not divisible by {self.multiple}")
        if not problems and width * height > self.max_pixels:
            problems.append(f"{width}x{height} = {width * height} pixels exceeds {self.max_pixels}")
        if problems:
            w, h = self.nearest(width, height)
            raise InputError(
                "output size not allowed: " + "; ".join(problems) + f". The nearest allowed size is {w}x{h} "
                f"(rule: each side {self.min_side}..{self.max_side}, divisible by {self.multiple}, "
                f"at most {self.max_pixels} pixels). Pass width/height explicitly or resize the product."
            )

    def nearest(self, width: int, height: int) -> tuple[int, int]:
        w = min(max(int(round(width / self.multiple)) * self.multiple, self.min_side), self.max_side)
        h = min(max(int(round(height / self.multiple)) * self.multiple, self.min_side), self.max_side)
        while w * h > self.max_pixels:
            scale = math.sqrt(self.max_pixels / (w * h))
            w = max(self.min_side, int(w * scale) // self.multiple * self.multiple)
            h = max(self.min_side, int(h * scale) // self.multiple * self.multiple)
        return w, h


REAL_MODEL_SIZES = SizeRule()
# Tiny/miniature models (tests, the embedded demo) are trained at small sizes; only the
# VAE x patch granularity (8 x 2 = 16 px) is a hard limit there.
SMALL_MODEL_SIZES = SizeRule(min_side=32, max_side=2048, multiple=16, max_pixels=2**21)


@dataclass
class StepInfo:
    """What the per-step callback receives."""

    step: int  # 0-based index of the step just finished
    total: int
    timestep: float
    sigma: float
    latents: torch.Tensor  # current latents (after the step)
    denoised: torch.Tensor  # the model's x0 estimate at this step (for previews)


@dataclass
class DreamPainterOutput:
    images: torch.Tensor  # [B, H, W, 3] 0..1
    latents: torch.Tensor  # [B, C, h, w] final latents
    foreground: torch.Tensor  # [B, H, W, 3] product on the canvas
    mask: torch.Tensor  # [B, H, W] binary product mask on the canvas


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, base_shift: float = 0.25, max_shift: float = 0.75) -> float:
    # CogView4's own dynamic shift (not Flux's): mu = sqrt(seq / 256) * 0.75 + 0.25.
    return (image_seq_len / base_seq_len) ** 0.5 * max_shift + base_shift


def _as_prompt_list(prompt, batch: int, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * batch
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        if len(prompt) == batch:
            return list(prompt)
        if len(prompt) == 1:
            return list(prompt) * batch
        raise InputError(f"{name}: got {len(prompt)} prompts for a batch of {batch}; give one prompt or one per image")
    raise InputError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


class DreamPainterPipeline:
    def __init__(self, tokenizer, text_encoder, vae, transformer: DreamPainterTransformer, scheduler, size_rule: SizeRule | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        if size_rule is None:
            # The real CogView4 has 4096 hidden units; anything far smaller is a test/miniature model.
            size_rule = REAL_MODEL_SIZES if transformer.inner_dim >= 1024 else SMALL_MODEL_SIZES
        self.size_rule = size_rule

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_path=None,
        dreampainter_weights=None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        transformer_path=None,
        vae_path=None,
        text_encoder_path=None,
        tokenizer_path=None,
        allow_fp16: bool = False,
    ) -> "DreamPainterPipeline":
        """Load CogView4 (diffusers folder and/or single files) plus an optional DreamPainter file.

        Never touches the network. Without ``dreampainter_weights`` the transformer is the
        plain base model (the product then only comes back through paste-back).
        """
        from .loading import load_cogview4
        from .weights import build_from_weights, read_dreampainter_metadata

        if dreampainter_weights is not None:
            read_dreampainter_metadata(dreampainter_weights)  # fail fast, before loading gigabytes
        parts = load_cogview4(
            base_path,
            transformer_path=transformer_path,
            vae_path=vae_path,
            text_encoder_path=text_encoder_path,
            tokenizer_path=tokenizer_path,
            dtype=dtype,
            device=device,
            allow_fp16=allow_fp16,
        )
        if dreampainter_weights is not None:
            transformer = build_from_weights(parts.transformer, dreampainter_weights)
        else:
            transformer = DreamPainterTransformer(parts.transformer, with_control=False)
        transformer.eval()
        return cls(parts.tokenizer, parts.text_encoder, parts.vae, transformer, parts.scheduler)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    # ---- text --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: int = 1024, device=None) -> torch.Tensor:
        """GLM embeddings as CogView4 does it: hidden_states[-2], ids left-padded to a multiple of 16."""
        if self.text_encoder is None or self.tokenizer is None:
            raise CapabilityError("this pipeline was built without a text encoder; pass prompt embeddings instead")
        device = device or self.text_encoder.device
        inputs = self.tokenizer(
            list(prompts), padding="longest", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        ids = inputs.input_ids
        pad = (16 - ids.shape[1] % 16) % 16
        if pad:
            ids = torch.cat([torch.full((ids.shape[0], pad), self.tokenizer.pad_token_id, dtype=ids.dtype), ids], dim=1)
        out = self.text_encoder(ids.to(device), output_hidden_states=True).hidden_states[-2]
        return out.to(dtype=self.transformer.dtype, device=self.device)

    # ---- images <-> latents ---------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] 0..1 -> VAE latents (distribution mode: deterministic conditioning)."""
        x = images.permute(0, 3, 1, 2).to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
        latents = self.vae.encode(x).latent_dist.mode()
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return ((latents - shift) * cfg.scaling_factor).to(torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [B, H, W, 3] in 0..1 (as diffusers' CogView4Pipeline postprocesses)."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        x = latents.to(device=self.vae.device, dtype=self.vae.dtype) / cfg.scaling_factor + shift
        image = self.vae.decode(x, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Product mask [B, H, W] -> [B, 1, h, w] on the latent grid (area average: soft coverage)."""
        h, w = mask.shape[-2] // self.vae_scale_factor, mask.shape[-1] // self.vae_scale_factor
        return F.interpolate(mask[:, None].float(), size=(h, w), mode="area")

    @torch.no_grad()
    def prepare_control(self, foreground: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[Z_f, Z_m]: the control branch's condition, [B, C + 1, h, w] float32."""
        z_f = self.encode_image(foreground)
        z_m = self.latent_mask(mask).to(z_f.device)
        return torch.cat([z_f, z_m], dim=1)

    def reference_canvas(self, reference: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
        """Resize (cover) and centre-crop a reference batch [B, H, W, 3] to (width, height)."""
        width, height = (size, size) if isinstance(size, int) else size
        x = reference.permute(0, 3, 1, 2)
        scale = max(width / x.shape[-1], height / x.shape[-2])
        new_h, new_w = max(height, round(x.shape[-2] * scale)), max(width, round(x.shape[-1] * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return x[:, :, top : top + height, left : left + width].clamp(0, 1).permute(0, 2, 3, 1)

    def default_reference_size(self, width: int, height: int) -> int:
        # The paper trains with 512 and 800 px square references; never larger than the target.
        side = min(512, max(width, height))
        step = self.vae_scale_factor * self.transformer.patch_size
        return max(step, side // step * step)

    @torch.no_grad()
    def encode_reference(self, reference: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
        return self.encode_image(self.reference_canvas(reference, size))

    # ---- schedule -------------------------------------------------------------------------
    def schedule(self, steps: int, image_seq_len: int, denoise: float = 1.0, mu: float | None = None):
        """(scheduler copy, timesteps) exactly as CogView4Pipeline computes them.

        denoise < 1 follows ComfyUI's convention: the schedule of round(steps / denoise)
        steps is built and only its last ``steps`` are run.
        """
        total = steps if denoise >= 1.0 else max(steps, int(round(steps / denoise)))
        scheduler = copy.deepcopy(self.scheduler)
        cfg = scheduler.config
        timesteps = np.linspace(cfg.num_train_timesteps, 1.0, total).astype(np.int64).astype(np.float32)
        sigmas = timesteps / cfg.num_train_timesteps
        if mu is None:
            mu = calculate_shift(
                image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("base_shift", 0.25), cfg.get("max_shift", 0.75)
            )
        scheduler.set_timesteps(total, device=self.device, timesteps=timesteps, sigmas=sigmas, mu=mu)
        start = total - steps
        if start:
            scheduler.set_begin_index(start)
        return scheduler, scheduler.timesteps[start:]

    # ---- the denoising loop ---------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        *,
        steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        control_latents: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        init_latents: torch.Tensor | None = None,
        denoise: float = 1.0,
        mu: float | None = None,
        lora_scale: float = 1.0,
        attention_scale: float = 1.0,
        renormalize_attention: bool = False,
        token_mask: torch.Tensor | None = None,
        control_scale: float = 1.0,
        callback: Callable[[StepInfo], object] | None = None,
        merge_lora: bool | None = None,
        reference_guidance: float | None = None,
    ) -> torch.Tensor:
        """Flow-matching Euler with CFG from ``noise`` (float32 latents) to final latents.

        ``reference_guidance`` (g_r; used only with reference_latents) guides towards the
        reference separately from the text (g = guidance_scale, n = negative prompt):

            v = v(n, no ref) + g_r * (v(n, ref) - v(n, no ref)) + g * (v(prompt, ref) - v(n, ref))

        None (default) = g: CFG against "no prompt and no reference", the reference left out
        of the negative pass as IP-Adapter does (2 model calls per step). g_r = 1 puts the
        reference in both passes (2 calls); other values take 3. Without text CFG (g <= 1):
        v = v(prompt, no ref) + g_r * (v(prompt, ref) - v(prompt, no ref)), None = 1 (1 call).
        Why it matters: with the reference in both passes, guidance amplifies only what the
        prompt adds over the reference, so the reference is followed less as cfg rises
        (measured on the miniature at cfg 3.5: reference similarity below plain T2I).

        ``merge_lora``: merge the scaled LoRA into the weights for the run (fast, and exact
        afterwards: the weights are backed up on the CPU and restored; see
        DreamPainterTransformer.lora_for_inference). None = the model's
        ``merge_lora_at_inference`` setting.
        """
        model = self.transformer
        device, dtype = self.device, model.dtype
        batch = noise.shape[0]
        seq_len = (height // self.vae_scale_factor) * (width // self.vae_scale_factor) // model.patch_size**2
        scheduler, timesteps = self.schedule(steps, seq_len, denoise, mu)
        sigmas = scheduler.sigmas[len(scheduler.sigmas) - 1 - len(timesteps) :]
        latents = noise.to(device=device, dtype=torch.float32)
        if denoise < 1.0:
            if init_latents is None:
                raise InputError("denoise < 1 needs starting latents (init_latents): there is nothing to partially denoise")
            sigma0 = sigmas[0].to(device)
            latents = sigma0 * latents + (1.0 - sigma0) * init_latents.to(device=device, dtype=torch.float32)

        size = torch.tensor([[height, width]], dtype=dtype, device=device).repeat(batch, 1)
        crop = torch.zeros_like(size)
        do_cfg = guidance_scale > 1.0 and negative_embeds is not None
        extra = dict(
            control_latents=None if control_latents is None else control_latents.to(device=device, dtype=dtype),
            reference_latents=None if reference_latents is None else reference_latents.to(device=device, dtype=dtype),
            attention_scale=attention_scale,
            renormalize_attention=renormalize_attention,
            token_mask=token_mask,
            control_scale=control_scale,
        )
        reference_guidance = (guidance_scale if do_cfg else 1.0) if reference_guidance is None else float(reference_guidance)
        guide_reference = reference_latents is not None and reference_guidance != 1.0
        without_reference = dict(extra, reference_latents=None)
        merge = model.merge_lora_at_inference if merge_lora is None else bool(merge_lora)
        with model.lora_for_inference(lora_scale, merge=merge):
            for i, t in enumerate(timesteps):
                model_input = latents.to(dtype)
                timestep = t.expand(batch).to(device)
                args = (model_input, prompt_embeds, timestep, size, size, crop)
                negative_args = (model_input, negative_embeds, timestep, size, size, crop)
                v = model(*args, **extra)
                if do_cfg and (not guide_reference or reference_guidance == guidance_scale):
                    # Two passes: the reference in both (g_r = 1), or in neither negative input (g_r = g).
                    v_uncond = model(*negative_args, **(without_reference if guide_reference else extra))
                    v = v_uncond + guidance_scale * (v - v_uncond)
                elif do_cfg:
                    v_negative = model(*negative_args, **extra)
                    v_uncond = model(*negative_args, **without_reference)
                    v = v_uncond + reference_guidance * (v_negative - v_uncond) + guidance_scale * (v - v_negative)
                elif guide_reference:
                    v_no_reference = model(*args, **without_reference)
                    v = v_no_reference + reference_guidance * (v - v_no_reference)
                sigma = float(sigmas[i])
                denoised_estimate = latents - sigma * v.float() if callback is not None else None
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
                if callback is not None:
                    if callback(StepInfo(i, len(timesteps), float(t), sigma, latents, denoised_estimate)) is False:
                        raise GenerationCancelled(f"generation stopped by the callback after step {i + 1} of {len(timesteps)}")
        return latents

    # ---- validation -------------------------------------------------------------------------
    def _check_scalars(self, steps, guidance_scale, lora_scale, attention_scale, denoise, placement, control_scale,
                       reference_guidance=None):
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        if reference_guidance is not None and (
                isinstance(reference_guidance, bool) or not isinstance(reference_guidance, (int, float))
                or not math.isfinite(reference_guidance) or reference_guidance < 0):
            raise InputError(f"reference_guidance must be None (= guidance_scale) or a finite number >= 0 (1 = the "
                             f"reference in both CFG passes, higher = follow the reference more), got {reference_guidance!r}")
        for name, value in (("guidance_scale", guidance_scale), ("lora_scale", lora_scale),
                            ("attention_scale", attention_scale), ("denoise", denoise), ("control_scale", control_scale)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if guidance_scale < 0:
            raise InputError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if attention_scale < 0:
            raise InputError(f"attention_scale must be >= 0 (0 = ignore the other group, 1 = plain attention), got {attention_scale}")
        if not 0.0 < denoise <= 1.0:
            raise InputError(f"denoise must be in (0, 1], got {denoise}")
        if placement not in PLACEMENTS:
            raise InputError(f"placement must be one of {PLACEMENTS}, got {placement!r}")

    # ---- the whole thing ------------------------------------------------------------------
    def prepare_inputs(
        self,
        product,
        mask,
        reference=None,
        width: int | None = None,
        height: int | None = None,
        steps: int = 50,
        guidance_scale: float = 3.5,
        seed: int = 0,
        lora_scale: float = 1.0,
        attention_scale: float = 1.0,
        mask_guidance: bool = False,
        placement: str = "keep",
        paste_back: bool = True,
        callback: Callable[[StepInfo], object] | None = None,
        *,
        batch_size: int | None = None,
        denoise: float = 1.0,
        init_image=None,
        shift: float | None = None,
        control_scale: float = 1.0,
        renormalize_attention: bool = False,
        reference_size: int | tuple[int, int] | None = None,
        box_ratio: tuple[float, float] = (0.6, 0.6),
        feather: int | None = None,
        merge_lora: bool | None = None,
        reference_guidance: float | None = None,
    ) -> "GenerationRequest":
        """Check and convert every input (cheap: no model runs). Raises InputError/CapabilityError."""
        self._check_scalars(steps, guidance_scale, lora_scale, attention_scale, denoise, placement, control_scale,
                            reference_guidance)
        product_b, mask_b = check_product_and_mask(as_image_batch(product, "product"), as_mask_batch(mask, "mask"))
        batch = product_b.shape[0]
        if batch_size is not None:
            if batch_size < 1 or (batch > 1 and batch_size != batch):
                raise InputError(f"batch_size={batch_size} does not fit {batch} products; give 1 product or batch_size={batch}")
            if batch == 1 and batch_size > 1:
                product_b, mask_b = product_b.expand(batch_size, -1, -1, -1), mask_b.expand(batch_size, -1, -1)
                batch = batch_size
        ref_b = None
        if reference is not None:
            if not self.transformer.supports_reference:
                raise CapabilityError(
                    "a reference image was given, but this DreamPainter model has no reference support "
                    "(it is a stage-1 file or has no DreamPainter weights). Remove the reference, or load a "
                    "stage-2 DreamPainter file."
                )
            ref_b = as_image_batch(reference, "reference")
            if ref_b.shape[0] not in (1, batch):
                raise InputError(f"reference: got {ref_b.shape[0]} images for a batch of {batch}; give 1 or {batch}")
            ref_b = ref_b.expand(batch, -1, -1, -1)
        width = width or product_b.shape[2]
        height = height or product_b.shape[1]
        self.size_rule.check(width, height)
        init_b = None
        if init_image is not None:
            init_b = as_image_batch(init_image, "init_image")
            if tuple(init_b.shape[1:3]) != (height, width):
                raise InputError(f"init_image is {init_b.shape[2]}x{init_b.shape[1]} but the output is {width}x{height}")
            if init_b.shape[0] not in (1, batch):
                raise InputError(f"init_image: got {init_b.shape[0]} images for a batch of {batch}")
            init_b = init_b.expand(batch, -1, -1, -1)
        if reference_size is not None:
            sizes = (reference_size, reference_size) if isinstance(reference_size, int) else tuple(reference_size)
            step = self.vae_scale_factor * self.transformer.patch_size
            if any(s < step or s % step for s in sizes):
                raise InputError(f"reference_size {reference_size} must be a positive multiple of {step} px")
        return GenerationRequest(
            product=product_b, mask=mask_b, reference=ref_b, width=int(width), height=int(height), steps=int(steps),
            guidance_scale=float(guidance_scale), seed=int(seed), lora_scale=float(lora_scale),
            attention_scale=float(attention_scale), mask_guidance=bool(mask_guidance), placement=placement,
            paste_back=bool(paste_back), callback=callback, denoise=float(denoise), init_image=init_b,
            shift=shift, control_scale=float(control_scale), renormalize_attention=bool(renormalize_attention),
            reference_size=reference_size, box_ratio=tuple(box_ratio), feather=feather, merge_lora=merge_lora,
            reference_guidance=None if reference_guidance is None else float(reference_guidance),
        )

    @torch.no_grad()
    def generate(self, request: "GenerationRequest", prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None) -> DreamPainterOutput:
        """Run a checked request with prompt embeddings ([1 or B, T, D]; negative may be None without CFG)."""
        r = request
        batch = r.product.shape[0]
        prompt_embeds = self._batch_embeds(prompt_embeds, batch, "prompt_embeds")
        if r.guidance_scale > 1.0:
            if negative_embeds is None:
                raise InputError("guidance_scale > 1 needs negative prompt embeddings (an empty negative prompt is fine)")
            negative_embeds = self._batch_embeds(negative_embeds, batch, "negative_embeds")
        else:
            negative_embeds = None
        if self.transformer.control is None and not getattr(self, "_warned_no_weights", False):
            self._warned_no_weights = True
            logger.warning("no DreamPainter weights loaded: the base model paints the whole canvas; the product comes back only through paste-back")

        # `source` is the photo placed the same way, with its real pixels around the product:
        # the paste-back feather blends those, not the blank fill (which would leave a halo).
        foreground, canvas_mask, source = place_product(
            r.product, r.mask, r.width, r.height, placement=r.placement, box_ratio=r.box_ratio, return_source=True
        )
        control = self.prepare_control(foreground, canvas_mask) if self.transformer.control is not None else None
        ref_latents = None
        if r.reference is not None:
            ref_latents = self.encode_reference(r.reference, r.reference_size or self.default_reference_size(r.width, r.height))
        token_mask = None
        if r.mask_guidance and control is not None:
            p = self.vae_scale_factor * self.transformer.patch_size
            token_mask = mask_to_token_grid(canvas_mask, r.height // p, r.width // p).to(self.device)
        init_latents = None
        if r.denoise < 1.0:
            init_latents = self.encode_image(r.init_image if r.init_image is not None else foreground)

        # Noise in float32 from a CPU generator: the same numbers on every device, as diffusers does.
        generator = torch.Generator("cpu").manual_seed(r.seed)
        shape = (batch, self.transformer.in_channels, r.height // self.vae_scale_factor, r.width // self.vae_scale_factor)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = self.sample(
            noise, prompt_embeds, negative_embeds, steps=r.steps, guidance_scale=r.guidance_scale, height=r.height,
            width=r.width, control_latents=control, reference_latents=ref_latents, init_latents=init_latents,
            denoise=r.denoise, mu=None if r.shift is None else float(r.shift), lora_scale=r.lora_scale,
            attention_scale=r.attention_scale, renormalize_attention=r.renormalize_attention, token_mask=token_mask,
            control_scale=r.control_scale, callback=r.callback, merge_lora=r.merge_lora,
            reference_guidance=r.reference_guidance,
        )
        images = self.decode(latents).cpu()
        if r.paste_back:
            images = paste_back_product(images, foreground, canvas_mask, feather=self.feather_radius(r), source=source)
        return DreamPainterOutput(images=images, latents=latents, foreground=foreground, mask=canvas_mask)

    @staticmethod
    def feather_radius(request: "GenerationRequest") -> int:
        # Default 1 px: an anti-aliasing ramp over the photo's own edge pixels. Wider ramps
        # bring back a ring of the photo's old background (white on studio shots): use them
        # for loose masks only.
        return 1 if request.feather is None else int(request.feather)

    def _batch_embeds(self, embeds: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        if embeds.dim() != 3 or embeds.shape[0] not in (1, batch):
            raise InputError(f"{name} must be [1 or {batch}, tokens, dim], got {tuple(embeds.shape)}")
        expected = self.transformer.base.config.text_embed_dim
        if embeds.shape[-1] != expected:
            raise InputError(
                f"{name} have width {embeds.shape[-1]} but this transformer expects {expected}: "
                "the text encoder does not belong to this model (CogView4 needs GLM-4-9B)"
            )
        return embeds.expand(batch, -1, -1).to(device=self.device, dtype=self.transformer.dtype)

    def __call__(
        self,
        prompt,
        product,
        mask,
        reference=None,
        negative_prompt="",
        width: int | None = None,
        height: int | None = None,
        steps: int = 50,
        guidance_scale: float = 3.5,
        seed: int = 0,
        lora_scale: float = 1.0,
        attention_scale: float = 1.0,
        mask_guidance: bool = False,
        placement: str = "keep",
        paste_back: bool = True,
        callback: Callable[[StepInfo], object] | None = None,
        *,
        return_dict: bool = False,
        **options,
    ):
        """Generate backgrounds; returns ``[B, H, W, 3]`` float 0..1 (or DreamPainterOutput).

        All inputs are checked before any model runs. Keyword options (see
        ``prepare_inputs``): batch_size (repeats a single product), denoise (< 1 starts
        from init_image, default the product on its blank canvas), init_image, shift,
        control_scale, renormalize_attention, reference_size, box_ratio, feather, merge_lora,
        reference_guidance (see ``sample``).
        """
        request = self.prepare_inputs(
            product, mask, reference, width, height, steps, guidance_scale, seed, lora_scale, attention_scale,
            mask_guidance, placement, paste_back, callback, **options,
        )
        batch = request.product.shape[0]
        prompts = _as_prompt_list(prompt, batch, "prompt")
        negatives = _as_prompt_list(negative_prompt if negative_prompt is not None else "", batch, "negative_prompt")
        prompt_embeds = self.encode_prompt(prompts)
        negative_embeds = self.encode_prompt(negatives) if request.guidance_scale > 1.0 else None
        out = self.generate(request, prompt_embeds, negative_embeds)
        return out if return_dict else out.images


@dataclass
class GenerationRequest:
    """Checked inputs of one generation (see DreamPainterPipeline.prepare_inputs)."""

    product: torch.Tensor
    mask: torch.Tensor
    reference: torch.Tensor | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    lora_scale: float
    attention_scale: float
    mask_guidance: bool
    placement: str
    paste_back: bool
    callback: Callable[[StepInfo], object] | None
    denoise: float
    init_image: torch.Tensor | None
    shift: float | None
    control_scale: float
    renormalize_attention: bool
    reference_size: int | tuple[int, int] | None
    box_ratio: tuple[float, float]
    feather: int | None
    merge_lora: bool | None = None
    reference_guidance: float | None = None
