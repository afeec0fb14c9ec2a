"""DreamPainterPipeline: product + mask (+ reference) + prompt -> image with a new background.

The sampler follows diffusers' ``CogView4Pipeline`` exactly where DreamPainter adds
nothing (same noise convention, timesteps, dynamic shift and CFG), which the tests
check on a tiny model. The pieces (``encode_prompt``, ``prepare_control``,
``encode_reference``, ``sample``, ``decode``) are public so that the ComfyUI nodes
and the training code reuse them instead of re-implementing them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CapabilityError, DreamPainterError, InputError, NonFiniteError
from .images import as_image_batch, as_mask_batch, check_product_and_mask, resize_cover
from . import masks
from .masks import mask_to_token_grid
from .options import (MAX_BATCH, ControlOptions, OutputOptions, ReferenceOptions, SamplingOptions, _whole,
                      check_schedule, options_from_keywords)
from .product import paste_back as paste_back_product
from .product import place_product
from .prompts import prompt_problem
from .tokens import LearnedToken, input_embeddings, text_lora_weights, tokenizer_with
from .transformer import DreamPainterTransformer

logger = logging.getLogger("dreampainter")



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
    mode: str = "dreampainter"  # how the product was held: "dreampainter" or "training_free"


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, base_shift: float = 0.25, max_shift: float = 0.75) -> float:
    # CogView4's own dynamic shift (not Flux's): mu = sqrt(seq / 256) * 0.75 + 0.25.
    return (image_seq_len / base_seq_len) ** 0.5 * max_shift + base_shift


def draw_noise(sampling: SamplingOptions, shape, reference_shape=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The starting noise [B, C, h, w] (and the in-context reference's, drawn after it from the same
    generator, so T2I's numbers stay the same), float32 from a CPU generator: the same numbers on
    every device, as diffusers does. With ``sampling.image_seeds`` each image draws its own from its
    own seed: a batch of one with seed s equals image_seeds=(s,)."""
    seeds = sampling.image_seeds
    if seeds is None:
        generator = torch.Generator("cpu").manual_seed(sampling.seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        reference = None if reference_shape is None else torch.randn(reference_shape, generator=generator, dtype=torch.float32)
        return noise, reference
    noises, references = [], []
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(seed)
        noises.append(torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32))
        if reference_shape is not None:
            references.append(torch.randn((1, *reference_shape[1:]), generator=generator, dtype=torch.float32))
    return torch.cat(noises), (torch.cat(references) if references else None)


def _check_image_seeds(sampling: SamplingOptions, batch: int) -> None:
    if sampling.image_seeds is not None and len(sampling.image_seeds) != batch:
        raise InputError(f"image_seeds: got {len(sampling.image_seeds)} seeds for a batch of {batch}; give one per image")


def check_prompt(text, name: str) -> str:
    """``text`` if it can be a prompt (prompts.prompt_problem: a string, paired surrogates, at most
    MAX_PROMPT_CHARS characters), else InputError naming ``name``. Cheap: before any tokenizer."""
    problem = prompt_problem(text)
    if problem:
        raise InputError(f"{name} {problem}")
    return text


def _as_prompt_list(prompt, batch: int, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [check_prompt(prompt, name)] * batch
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        for i, text in enumerate(prompt):
            check_prompt(text, f"{name}[{i}]")
        if len(prompt) == batch:
            return list(prompt)
        if len(prompt) == 1:
            return list(prompt) * batch
        raise InputError(f"{name}: got {len(prompt)} prompts for a batch of {batch}; give one prompt or one per image")
    raise InputError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


def prompt_ids(tokenizer, prompts: Sequence[str], max_sequence_length: int = 1024) -> torch.Tensor:
    """Token ids as CogView4 makes them: special tokens added, left-padded to the longest prompt and
    then to a multiple of 16."""
    inputs = tokenizer(
        list(prompts), padding="longest", max_length=max_sequence_length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    )
    ids = inputs.input_ids
    pad = (16 - ids.shape[1] % 16) % 16
    if pad:
        ids = torch.cat([torch.full((ids.shape[0], pad), tokenizer.pad_token_id, dtype=ids.dtype), ids], dim=1)
    return ids


def text_hidden_states(tokenizer, text_encoder, prompts: Sequence[str], *, max_sequence_length: int = 1024,
                       tokens: Sequence[LearnedToken] = (), return_ids: bool = False):
    """GLM's hidden_states[-2] of the prompts, where the text encoder is, in its dtype; differentiable
    in the learned tokens' embeddings (dreampainter_core.tokens), which replace their words' rows.
    Without learned tokens: CogView4's own encoding, ids in. ``return_ids``: (hidden states, the ids
    [B, T] they belong to, a learned token's id as the copied tokenizer gives it)."""
    if not tokens:
        ids = prompt_ids(tokenizer, prompts, max_sequence_length).to(text_encoder.device)
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        return (hidden, ids) if return_ids else hidden
    for token in tokens:
        token.check_fits(text_encoder)
    extended, token_ids = tokenizer_with(tokenizer, [t.token for t in tokens])
    ids = prompt_ids(extended, prompts, max_sequence_length).to(text_encoder.device)
    embeds = input_embeddings(text_encoder, ids, {token_ids[t.token]: t.embedding for t in tokens},
                              tokenizer.pad_token_id)
    weights = text_lora_weights(text_encoder, tokens)  # a token's LoRA on GLM, if it carries one
    if weights:
        out = torch.func.functional_call(text_encoder, weights, (),
                                         {"inputs_embeds": embeds, "output_hidden_states": True}, strict=False)
    else:
        out = text_encoder(inputs_embeds=embeds, output_hidden_states=True)
    hidden = out.hidden_states[-2]
    return (hidden, ids) if return_ids else hidden


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompts: Sequence[str], *, dtype: torch.dtype, device,
                  max_sequence_length: int = 1024, tokens: Sequence[LearnedToken] = ()) -> torch.Tensor:
    """GLM embeddings as CogView4 does it: hidden_states[-2], ids left-padded to a multiple of 16.

    The text encoder runs where it is; the embeddings come back as `dtype` on `device`. ``tokens``:
    learned words (dreampainter_core.tokens) the prompts may use.
    """
    prompts = list(prompts)
    for i, text in enumerate(prompts):
        check_prompt(text, "prompt" if len(prompts) == 1 else f"prompt {i}")
    out = text_hidden_states(tokenizer, text_encoder, prompts, max_sequence_length=max_sequence_length, tokens=tokens)
    return out.to(dtype=dtype, device=device)


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
    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: int = 1024,
                      tokens: Sequence[LearnedToken] = ()) -> torch.Tensor:
        """encode_prompt (the module function) with this pipeline's parts: in the transformer's dtype, on its device."""
        if self.text_encoder is None or self.tokenizer is None:
            raise CapabilityError("this pipeline was built without a text encoder; pass prompt embeddings instead")
        return encode_prompt(self.tokenizer, self.text_encoder, prompts, dtype=self.transformer.dtype,
                             device=self.device, max_sequence_length=max_sequence_length, tokens=tokens)

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
        if not bool(torch.isfinite(image).all()):
            cause = "finite latents" if bool(torch.isfinite(latents).all()) else "non-finite latents"
            raise NonFiniteError(
                f"the VAE decode gave NaN or infinite pixels from {cause}; likely causes: the VAE in "
                f"{self.vae.dtype} overflowing (fp16 does: load it in bf16 or fp32), or corrupt VAE weights "
                "(NaN/inf in the file: re-download it)")
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

    @torch.no_grad()
    def known_region(self, foreground: torch.Tensor, mask: torch.Tensor, control: ControlOptions) -> "KnownRegion":
        """The training-free mode's held region: the product latent and a per-latent-pixel strength.

        The strength is the share of the (held) steps a latent pixel is held for, in the manner
        of differential diffusion. The (dilated, optionally outward-feathered) mask is
        area-averaged onto the latent grid, and a latent pixel is held in proportion to how far
        its product coverage c exceeds one half: strength = clamp(2c - 1, 0, 1). A pixel mostly
        covered by the product canvas's white backdrop is not held, because holding it paints a
        white halo that the scene then builds around (on 80 miniature validation scenes, holding
        by plain coverage c put the stand in the prompt's colour 58% of the time, holding the
        8 px outward ramp too 29%, this rule 70%; T2I + paste-back 69%). Paste-back restores the
        product's own edge pixels.
        """
        region = mask
        if control.region_dilate:
            region = masks.dilate(region, 2 * control.region_dilate + 1)
        region = masks.feather(region, control.region_feather)
        coverage = self.latent_mask(region)
        return KnownRegion(self.encode_image(foreground), (2.0 * coverage - 1.0).clamp(0.0, 1.0), control.harmonize)

    def product_over_reference(self, foreground: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The product (hard mask) pasted over the reference, cover-resized to the canvas."""
        height, width = foreground.shape[1:3]
        backdrop = resize_cover(reference.to(foreground), width, height)
        m = (mask > 0.5).to(foreground.dtype).unsqueeze(-1)
        return m * foreground + (1 - m) * backdrop

    def default_reference_size(self, width: int, height: int) -> int:
        # The paper trains with 512 and 800 px square references; never larger than the target.
        side = min(512, max(width, height))
        step = self.vae_scale_factor * self.transformer.patch_size
        return max(step, side // step * step)

    @torch.no_grad()
    def encode_reference(self, reference: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
        """A reference batch [B, H, W, 3] -> latents, resized (cover + centre crop) to size = side or
        (width, height); one already at that size (the Reference node's canvas) is used as it is."""
        width, height = (size, size) if isinstance(size, int) else size
        return self.encode_image(resize_cover(reference, width, height))

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
        height: int,
        width: int,
        sampling: SamplingOptions,
        reference: ReferenceOptions | None = None,
        control: ControlOptions | None = None,
        control_latents: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        init_latents: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        callback: Callable[[StepInfo], object] | None = None,
        merge_lora: bool | None = None,
        known: "KnownRegion | None" = None,
        reference_trajectory: tuple[torch.Tensor, torch.Tensor] | None = None,
        shielded_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow-matching Euler with CFG from ``noise`` (float32 latents) to final latents.

        ``reference.guidance`` (g_r; used only with reference_latents) guides towards the
        reference separately from the text (g = guidance_scale, n = negative prompt):

            v = v(n, no ref) + g_r * (v(n, ref) - v(n, no ref)) + g * (v(prompt, ref) - v(n, ref))

        None (default) = g: CFG against "no prompt and no reference", the reference left out
        of the negative pass as IP-Adapter does (2 model calls per step). g_r = 1 puts the
        reference in both passes (2 calls); other values take 3. Without text CFG (g <= 1):
        v = v(prompt, no ref) + g_r * (v(prompt, ref) - v(prompt, no ref)), None = 1 (1 call).
        Why it matters: with the reference in both passes, guidance amplifies only what the
        prompt adds over the reference, so the reference is followed less as cfg rises
        (measured on the miniature at cfg 3.5: reference similarity below plain T2I).
        Steps past ``sampling.guidance_end`` run as without text CFG.

        ``known`` (training-free mode) holds a region on the known latent's own trajectory:
        wherever it is held, the latents at sigma are ``sigma * noise + (1 - sigma) * known``
        (blended latent diffusion for flow matching), with the same noise as the rest.
        ``reference_trajectory`` = (clean reference latents, their noise): in-context reference
        tokens, noised to each step's sigma, beside the target (same rows).

        ``shielded_tokens`` ([B, N_target] bool): target tokens that do not attend to the reference
        (``ReferenceOptions.shield_product``: the product's).

        ``merge_lora``: merge the scaled LoRA into the weights for the run (fast, and exact
        afterwards: the weights are backed up on the CPU and restored; see
        DreamPainterTransformer.lora_for_inference). None = the model's
        ``merge_lora_at_inference`` setting.
        """
        reference = reference or ReferenceOptions()
        control = control or ControlOptions()
        model = self.transformer
        device, dtype = self.device, model.dtype
        batch = noise.shape[0]
        seq_len = (height // self.vae_scale_factor) * (width // self.vae_scale_factor) // model.patch_size**2
        scheduler, timesteps = self.schedule(sampling.steps, seq_len, sampling.denoise, sampling.shift)
        sigmas = scheduler.sigmas[len(scheduler.sigmas) - 1 - len(timesteps) :]
        latents = noise.to(device=device, dtype=torch.float32)
        if sampling.denoise < 1.0:
            if init_latents is None:
                raise InputError("denoise < 1 needs starting latents (init_latents): there is nothing to partially denoise")
            sigma0 = sigmas[0].to(device)
            latents = sigma0 * latents + (1.0 - sigma0) * init_latents.to(device=device, dtype=torch.float32)
        if known is not None:
            known = known.on(device)
            latents = known.hold(latents, noise.to(device), float(sigmas[0]), 0.0)

        size = torch.tensor([[height, width]], dtype=dtype, device=device).repeat(batch, 1)
        crop = torch.zeros_like(size)
        guidance_scale = sampling.guidance_scale
        do_cfg = sampling.uses_cfg and negative_embeds is not None
        cfg_steps = sampling.cfg_steps(len(timesteps)) if do_cfg else 0
        extra = dict(
            control_latents=None if control_latents is None else control_latents.to(device=device, dtype=dtype),
            reference_latents=None if reference_latents is None else reference_latents.to(device=device, dtype=dtype),
            modulation=reference.modulation if shielded_tokens is None else dataclasses.replace(
                reference.modulation, shielded=shielded_tokens.to(device)),
            token_mask=token_mask,
            control_scale=control.control_scale,
        )
        if reference_trajectory is not None:
            clean_reference, reference_noise = (x.to(device=device, dtype=torch.float32) for x in reference_trajectory)
            extra["reference_layout"] = "beside"
            extra["reference_timestep"] = "same-as-target"  # noised with the target, at its sigma
            reference_latents = clean_reference  # for guide_reference below
        without_reference = dict(extra, reference_latents=None)
        merge = model.merge_lora_at_inference if merge_lora is None else bool(merge_lora)
        with model.lora_for_inference(reference.lora_scale, merge=merge, product_scale=reference.product_scale):
            for i, t in enumerate(timesteps):
                cfg_now = i < cfg_steps
                reference_guidance = (guidance_scale if cfg_now else 1.0) if reference.guidance is None else reference.guidance
                guide_reference = reference_latents is not None and reference_guidance != 1.0
                if reference_trajectory is not None:
                    sigma_now = float(sigmas[i])
                    extra["reference_latents"] = (sigma_now * reference_noise + (1 - sigma_now) * clean_reference).to(dtype)
                model_input = latents.to(dtype)
                timestep = t.expand(batch).to(device)
                args = (model_input, prompt_embeds, timestep, size, size, crop)
                negative_args = (model_input, negative_embeds, timestep, size, size, crop)
                v = model(*args, **extra)
                if cfg_now and (not guide_reference or reference_guidance == guidance_scale):
                    # Two passes: the reference in both (g_r = 1), or in neither negative input (g_r = g).
                    v_uncond = model(*negative_args, **(without_reference if guide_reference else extra))
                    v = v_uncond + guidance_scale * (v - v_uncond)
                elif cfg_now:
                    v_negative = model(*negative_args, **extra)
                    v_uncond = model(*negative_args, **without_reference)
                    v = v_uncond + reference_guidance * (v_negative - v_uncond) + guidance_scale * (v - v_negative)
                elif guide_reference:
                    v_no_reference = model(*args, **without_reference)
                    v = v_no_reference + reference_guidance * (v - v_no_reference)
                sigma = float(sigmas[i])
                denoised_estimate = latents - sigma * v.float() if callback is not None else None
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
                if known is not None:
                    latents = known.hold(latents, noise.to(device), float(sigmas[i + 1]), (i + 1) / len(timesteps))
                # One reduction per step (a transformer pass costs far more): a NaN/inf stops the run
                # here, named, instead of coming back as a blank image after all the steps.
                if not bool(torch.isfinite(latents).all()):
                    raise NonFiniteError(self._non_finite_message(i, len(timesteps), sampling, reference, control))
                if callback is not None:
                    if callback(StepInfo(i, len(timesteps), float(t), sigma, latents, denoised_estimate)) is False:
                        raise GenerationCancelled(f"generation stopped by the callback after step {i + 1} of {len(timesteps)}")
        return latents

    def _non_finite_message(self, step: int, total: int, sampling: SamplingOptions, reference: ReferenceOptions,
                            control: ControlOptions) -> str:
        dtype = self.transformer.dtype
        precision = ("the model runs in float16, which overflows easily: load it in bf16 or fp32"
                     if dtype == torch.float16 else f"the model runs in {str(dtype).replace('torch.', '')}")
        return (
            f"sampling produced NaN or infinite latents at step {step + 1} of {total}; stopped there instead of "
            f"returning a blank image. Likely causes: a scale too large for this model (guidance_scale="
            f"{sampling.guidance_scale:g}, lora_scale={reference.lora_scale:g}, "
            f"{f'product_scale={reference.product_scale:g}, ' if self.transformer.has_product_adapter else ''}control_scale="
            f"{control.control_scale:g}, shift={'auto' if sampling.shift is None else format(sampling.shift, 'g')}: "
            f"lower them); {precision}; or corrupt weights (NaN/inf in a transformer or DreamPainter file: "
            "re-download or re-export it)."
        )

    # ---- the whole thing ------------------------------------------------------------------
    def prepare(
        self,
        product,
        mask,
        *,
        width: int | None = None,
        height: int | None = None,
        sampling: SamplingOptions | None = None,
        reference: ReferenceOptions | None = None,
        control: ControlOptions | None = None,
        output: OutputOptions | None = None,
        batch_size: int | None = None,
        init_image=None,
        callback: Callable[[StepInfo], object] | None = None,
        merge_lora: bool | None = None,
    ) -> "GenerationRequest":
        """Check the images against the model and each other (cheap: no model runs).

        The option objects checked their own values when they were built; this checks what
        needs the model or the images. Raises InputError/CapabilityError.

        width/height: the output size (None = the product's; 0 is refused, not read as "auto").
        batch_size: images per product, 1..MAX_BATCH (None = one per product); a batch is at most
        MAX_BATCH images. reference_size: within the model's size rule (each side <= max_side,
        at most max_pixels pixels: a reference never costs more tokens than the largest output).
        """
        sampling = sampling or SamplingOptions()
        reference = reference or ReferenceOptions()
        control = control or ControlOptions()
        output = output or OutputOptions()
        if batch_size is not None:
            batch_size = _whole("batch_size", batch_size, 1, MAX_BATCH, " (images per product; None = one per product)")
        for name, value in (("width", width), ("height", height)):
            if value is not None and not isinstance(value, bool) and isinstance(value, numbers.Real) and value <= 0:
                raise InputError(f"{name}={value} is not a size: give the output {name} in pixels "
                                 f"({self.size_rule.min_side}..{self.size_rule.max_side}, divisible by "
                                 f"{self.size_rule.multiple}), or leave it out (None) for the product's {name}")
        self._check_reference_size(reference.size)
        product_b, mask_b = check_product_and_mask(as_image_batch(product, "product"), as_mask_batch(mask, "mask"))
        batch = product_b.shape[0]
        if batch_size is not None:
            if batch > 1 and batch_size != batch:
                raise InputError(f"batch_size={batch_size} does not fit {batch} products; give 1 product or batch_size={batch}")
            if batch == 1 and batch_size > 1:
                product_b, mask_b = product_b.expand(batch_size, -1, -1, -1), mask_b.expand(batch_size, -1, -1)
                batch = batch_size
        if batch > MAX_BATCH:
            raise InputError(f"a batch of {batch} images is more than the {MAX_BATCH} one run takes: split the products "
                             f"into batches of at most {MAX_BATCH}")
        mode = control.resolved_mode(self.transformer.has_branch_for("background"))
        if mode == "dreampainter" and self.transformer.has_branch_for("insertion"):
            raise CapabilityError(
                "mode='dreampainter' asks for the control branch, but this model's branch was trained for inserting "
                "products into photos (pipe.insert), not for backgrounds. Use mode='training_free' or 'auto', or "
                "load a stage-1/stage-2 DreamPainter file.")
        if reference.image is not None:
            if mode == "dreampainter" and not self.transformer.supports_reference:
                raise CapabilityError(
                    "a reference image was given, but this DreamPainter model has no reference support "
                    "(it is a stage-1 file or has no DreamPainter weights). Use mode='training_free' (it follows a "
                    "reference with any model), remove the reference, or load a stage-2 DreamPainter file."
                )
            if mode == "training_free" and reference.training_free_method == "init" and sampling.denoise < 1.0:
                raise InputError(
                    "denoise < 1 and a training-free reference both set where sampling starts: with "
                    "training_free_reference='init', reference_strength is the denoise; leave denoise at 1"
                )
            if mode == "training_free" and reference.training_free_method == "init":
                check_schedule(sampling.steps, reference.strength, "reference_strength")
            if reference.image.shape[0] not in (1, batch):
                raise InputError(f"reference: got {reference.image.shape[0]} images for a batch of {batch}; give 1 or {batch}")
            reference = dataclasses.replace(reference, image=reference.image.expand(batch, -1, -1, -1))
        width = product_b.shape[2] if width is None else width
        height = product_b.shape[1] if height is None else height
        self.size_rule.check(width, height)
        init_b = None
        if init_image is not None:
            init_b = as_image_batch(init_image, "init_image")
            if tuple(init_b.shape[1:3]) != (height, width):
                raise InputError(f"init_image is {init_b.shape[2]}x{init_b.shape[1]} but the output is {width}x{height}")
            if init_b.shape[0] not in (1, batch):
                raise InputError(f"init_image: got {init_b.shape[0]} images for a batch of {batch}")
            init_b = init_b.expand(batch, -1, -1, -1)
        _check_image_seeds(sampling, batch)
        return GenerationRequest(
            product=product_b, mask=mask_b, width=int(width), height=int(height), sampling=sampling,
            reference=reference, control=control, output=output, mode=mode, init_image=init_b, callback=callback,
            merge_lora=merge_lora,
        )

    def _check_reference_size(self, size: tuple[int, int] | None) -> None:
        """reference_size (width, height): whole tokens, and no more than the model's largest output."""
        if size is None:
            return
        (width, height), step, rule = size, self.vae_scale_factor * self.transformer.patch_size, self.size_rule
        if width % step or height % step:
            raise InputError(f"reference_size {width}x{height} must be a positive multiple of {step} px")
        if max(width, height) > rule.max_side or width * height > rule.max_pixels:
            raise InputError(
                f"reference_size {width}x{height} is larger than this model takes: each side at most {rule.max_side} "
                f"px and at most {rule.max_pixels} pixels (as many as its largest output; the paper uses 512-800 px "
                "references). Use a smaller reference size (DreamPainter Reference: a lower resolution).")

    def prepare_inputs(self, product, mask, reference=None, **keywords) -> "GenerationRequest":
        """``prepare`` from ``pipe(...)``'s flat keywords (see ``__call__``)."""
        groups, left = options_from_keywords(reference=reference, **keywords)
        return self.prepare(product, mask, **groups, **left)

    @torch.no_grad()
    def generate(self, request: "GenerationRequest", prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None) -> DreamPainterOutput:
        """Run a checked request with prompt embeddings ([1 or B, T, D]; negative may be None without CFG)."""
        r = request
        batch = r.product.shape[0]
        prompt_embeds = self._batch_embeds(prompt_embeds, batch, "prompt_embeds")
        if r.sampling.uses_cfg:
            if negative_embeds is None:
                raise InputError("guidance_scale > 1 needs negative prompt embeddings (an empty negative prompt is fine)")
            negative_embeds = self._batch_embeds(negative_embeds, batch, "negative_embeds")
        else:
            negative_embeds = None
        if r.mode == "dreampainter" and self.transformer.control is None and not getattr(self, "_warned_no_weights", False):
            self._warned_no_weights = True
            logger.warning("no DreamPainter weights loaded: the base model paints the whole canvas; the product comes back only through paste-back")

        # `source` is the photo placed the same way, with its real pixels around the product:
        # the paste-back feather blends those, not the blank fill (which would leave a halo).
        foreground, canvas_mask, source, *matte = place_product(
            r.product, r.mask, r.width, r.height, placement=r.output.placement, box_ratio=r.output.box_ratio,
            return_source=True, return_matte=r.output.decontaminate,
        )
        training_free = r.mode == "training_free"
        use_control = not training_free and self.transformer.has_branch_for("background")
        control = self.prepare_control(foreground, canvas_mask) if use_control else None
        known = self.known_region(foreground, canvas_mask, r.control) if training_free else None
        ref_latents = in_context = None
        init_latents, sampling = None, r.sampling
        if r.reference.image is not None:
            if not training_free:
                ref_latents = self.encode_reference(r.reference.image, r.reference.size or self.default_reference_size(r.width, r.height))
            elif r.reference.training_free_method == "in_context":
                in_context = self.encode_reference(r.reference.image, r.reference.size or (r.width, r.height))
            else:  # "init": the product over the reference, partly denoised
                init_latents = self.encode_image(self.product_over_reference(foreground, canvas_mask, r.reference.image))
                sampling = dataclasses.replace(sampling, denoise=r.reference.strength)
        token_mask = shielded = None
        p = self.vae_scale_factor * self.transformer.patch_size
        if r.control.mask_guidance and control is not None:
            token_mask = mask_to_token_grid(canvas_mask, r.height // p, r.width // p).to(self.device)
        if r.reference.shield_product and ref_latents is not None:  # a token with any product pixel
            shielded = mask_to_token_grid(canvas_mask, r.height // p, r.width // p) > 0.5
        if sampling.denoise < 1.0 and init_latents is None:
            init_latents = self.encode_image(r.init_image if r.init_image is not None else foreground)

        shape = (batch, self.transformer.in_channels, r.height // self.vae_scale_factor, r.width // self.vae_scale_factor)
        noise, reference_noise = draw_noise(r.sampling, shape, None if in_context is None else in_context.shape)
        reference_trajectory = None if in_context is None else (in_context, reference_noise)
        latents = self.sample(
            noise, prompt_embeds, negative_embeds, height=r.height, width=r.width, sampling=sampling,
            reference=r.reference, control=r.control, control_latents=control, reference_latents=ref_latents,
            init_latents=init_latents, token_mask=token_mask, callback=r.callback, merge_lora=r.merge_lora,
            known=known, reference_trajectory=reference_trajectory, shielded_tokens=shielded,
        )
        images = self.decode(latents).cpu()
        if r.output.paste_back:
            images = paste_back_product(images, foreground, canvas_mask, feather=r.output.feather_radius, source=source,
                                        matte=matte[0] if matte else None)
        return DreamPainterOutput(images=images, latents=latents, foreground=foreground, mask=canvas_mask, mode=r.mode)

    @torch.no_grad()
    def inpaint(
        self,
        prompt,
        image,
        mask,
        *,
        negative_prompt="",
        sampling: SamplingOptions | None = None,
        control: ControlOptions | None = None,
        output: OutputOptions | None = None,
        lora_scale: float = 1.0,
        callback: Callable[[StepInfo], object] | None = None,
        merge_lora: bool | None = None,
        return_dict: bool = False,
    ):
        """Generate where ``mask`` is 1 and keep ``image`` everywhere else: the training-free
        known-region sampler with the mask inverted (the context is held on its own noised
        trajectory). With paste-back, every pixel outside the mask is the input's, exactly, and
        ``output.feather`` px of the context blend into the generated region.

        Works with any model the pack loads (the control branch is not used). Used to remove
        a product from a photo (``train.data references``); ``insert`` is the same with a product.
        """
        context, hole = self._check_inpaint_inputs(image, mask)
        embeds = self._hole_prompts(prompt, negative_prompt, context.shape[0], sampling)
        out = self.fill_hole(context, hole, *embeds, sampling=sampling, reference=ReferenceOptions(lora_scale=lora_scale),
                             control=control, output=output, callback=callback, merge_lora=merge_lora)
        out.mode = "inpaint"
        return out if return_dict else out.images

    @torch.no_grad()
    def insert(
        self,
        prompt,
        context,
        mask,
        product_lora=None,
        *,
        negative_prompt="",
        sampling: SamplingOptions | None = None,
        reference: ReferenceOptions | None = None,
        control: ControlOptions | None = None,
        output: OutputOptions | None = None,
        callback: Callable[[StepInfo], object] | None = None,
        merge_lora: bool | None = None,
        return_dict: bool = False,
    ):
        """DreamPaint: put a learned catalog product into the user's photo. ``mask`` = 1 marks the
        region to generate (where the product goes); every pixel of ``context`` outside it is kept,
        exactly after paste-back, with a ``output.feather`` px seam blending into the new region.

        ``product_lora``: a ProductLoRA or its file (train.dreampaint), applied for this call at
        ``reference.product_scale`` (0 = the class noun only, exactly as without it); its learned
        identifier embedding, if any, is used for the prompt, which should name the product
        ("a sks cup on the desk": a warning names an identifier missing from the prompt).
        ``reference.lora_scale`` scales the stage-2 LoRA, if the model has one. The context is held
        by the training-free known-region sampler (``control.harmonize``: the share of the last steps
        that run free), or, with an insertion control branch loaded (train.stage1 with
        data.mask_policy = "insertion"; control.mode "auto" or "dreampainter"), by that branch.
        Without a product this is ``inpaint``, bit for bit. Returns [B, H, W, 3] (or the
        DreamPainterOutput, whose mode says which sampler held the context).
        """
        from .product_lora import warn_missing_identifier

        request = self.prepare_insert(context, mask, product_lora, sampling=sampling, reference=reference,
                                      control=control, output=output, callback=callback, merge_lora=merge_lora)
        if request.product is not None:
            warn_missing_identifier(_as_prompt_list(prompt, request.context.shape[0], "prompt"), request.product)
        embeds = self._hole_prompts(prompt, negative_prompt, request.context.shape[0], request.sampling, request.tokens)
        out = self.generate_insert(request, *embeds)
        return out if return_dict else out.images

    def prepare_insert(self, context, mask, product_lora=None, *, sampling: SamplingOptions | None = None,
                       reference: ReferenceOptions | None = None, control: ControlOptions | None = None,
                       output: OutputOptions | None = None, callback=None,
                       merge_lora: bool | None = None) -> "InsertRequest":
        """insert's checks (cheap: no model runs): the context and mask, the product file and its base,
        and which sampler holds the context. Raises InputError / CapabilityError / WeightFormatError."""
        from .product_lora import load_product_lora

        reference = reference or ReferenceOptions()
        control = control or ControlOptions()
        if reference.image is not None:
            raise InputError("insert takes no reference image: the product comes from its product LoRA (learned from "
                             "the catalog images by train.dreampaint)")
        mode = control.resolved_mode(self.transformer.has_branch_for("insertion"))
        if mode == "dreampainter" and not self.transformer.has_branch_for("insertion"):
            raise CapabilityError(
                "mode='dreampainter' asks for an insertion control branch, but this model has "
                + ("a branch for backgrounds only" if self.transformer.control is not None else "no DreamPainter branch")
                + ". Use mode='training_free' or 'auto' (the known-region sampler), or load a branch trained with "
                "train.stage1 data.mask_policy=insertion.")
        context, hole = self._check_inpaint_inputs(context, mask, "context")
        product = load_product_lora(product_lora) if isinstance(product_lora, (str, os.PathLike)) else product_lora
        if product is not None:
            product.check_base(self.transformer)
        sampling = sampling or SamplingOptions()
        _check_image_seeds(sampling, context.shape[0])
        return InsertRequest(context, hole, product, mode, sampling, reference, control, output or OutputOptions(),
                             callback, merge_lora)

    @torch.no_grad()
    def generate_insert(self, request: "InsertRequest", prompt_embeds: torch.Tensor,
                        negative_embeds: torch.Tensor | None) -> DreamPainterOutput:
        """Run a prepared insertion with prompt embeddings (made with ``request.tokens``)."""
        from .product_lora import product_applied

        r = request
        with product_applied(self.transformer, r.product):
            out = self.fill_hole(r.context, r.hole, prompt_embeds, negative_embeds, sampling=r.sampling,
                                 reference=r.reference, control=r.control, output=r.output, callback=r.callback,
                                 merge_lora=r.merge_lora, use_branch=r.mode == "dreampainter")
        out.mode = r.mode
        return out

    def _hole_prompts(self, prompt, negative_prompt, batch: int, sampling: SamplingOptions | None,
                      tokens=()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """inpaint's and insert's prompt embeddings (the negative one only with CFG)."""
        prompt_embeds = self.encode_prompt(_as_prompt_list(prompt, batch, "prompt"), tokens=tokens)
        negative_embeds = None
        if (sampling or SamplingOptions()).uses_cfg:
            negatives = _as_prompt_list(negative_prompt if negative_prompt is not None else "", batch, "negative_prompt")
            negative_embeds = self.encode_prompt(negatives, tokens=tokens)
        return prompt_embeds, negative_embeds

    @torch.no_grad()
    def fill_hole(self, context: torch.Tensor, hole: torch.Tensor, prompt_embeds: torch.Tensor,
                  negative_embeds: torch.Tensor | None, *, sampling: SamplingOptions | None = None,
                  reference: ReferenceOptions | None = None, control: ControlOptions | None = None,
                  output: OutputOptions | None = None, callback=None, merge_lora: bool | None = None,
                  use_branch: bool = False) -> DreamPainterOutput:
        """inpaint's and insert's sampler with prompt embeddings ([1 or B, T, D]): a checked [B, H, W, 3]
        context and [B, H, W] 0/1 hole (_check_inpaint_inputs) in; the context kept (held on its noised
        trajectory, or with ``use_branch`` by an insertion control branch), the hole generated."""
        sampling = sampling or SamplingOptions()
        control = control or ControlOptions()
        output = output or OutputOptions()
        batch, height, width = context.shape[0], context.shape[1], context.shape[2]
        keep = 1.0 - hole
        _check_image_seeds(sampling, batch)
        known = control_latents = None
        if use_branch:  # the branch sees the kept pixels on white and where they are, as it was trained
            control_latents = self.prepare_control(context * keep.unsqueeze(-1) + hole.unsqueeze(-1), keep)
        else:
            known = self.known_region(context, keep, control)
        prompt_embeds = self._batch_embeds(prompt_embeds, batch, "prompt")
        if sampling.uses_cfg:
            if negative_embeds is None:
                raise InputError("guidance_scale > 1 needs negative prompt embeddings (an empty negative prompt is fine)")
            negative_embeds = self._batch_embeds(negative_embeds, batch, "negative_prompt")
        shape = (batch, self.transformer.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise, _ = draw_noise(sampling, shape)
        init_latents = None
        if sampling.denoise < 1.0:
            init_latents = known.latents if known is not None else self.encode_image(context)
        latents = self.sample(
            noise, prompt_embeds, negative_embeds if sampling.uses_cfg else None, height=height, width=width,
            sampling=sampling, reference=reference, control=control, control_latents=control_latents,
            init_latents=init_latents, callback=callback, merge_lora=merge_lora, known=known,
        )
        images = self.decode(latents).cpu()
        if output.paste_back:
            images = paste_back_product(images, context, keep, feather=output.feather_radius, source=context)
        return DreamPainterOutput(images=images, latents=latents, foreground=context, mask=hole)

    def _check_inpaint_inputs(self, image, mask, image_name: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
        context = as_image_batch(image, image_name)
        hole = as_mask_batch(mask, "mask").to(context.device)
        if tuple(context.shape[1:3]) != tuple(hole.shape[1:3]):
            raise InputError(f"mask size {hole.shape[2]}x{hole.shape[1]} (WxH) does not match the {image_name}'s "
                             f"{context.shape[2]}x{context.shape[1]}; resize the mask to the {image_name}")
        batch = max(context.shape[0], hole.shape[0])
        if context.shape[0] not in (1, batch) or hole.shape[0] not in (1, batch):
            raise InputError(f"{context.shape[0]} {image_name} images and {hole.shape[0]} masks: give one mask per "
                             "image, or one for all")
        context, hole = context.expand(batch, -1, -1, -1), (hole > 0.5).float().expand(batch, -1, -1)
        for i, count in enumerate(hole.flatten(1).sum(dim=1).tolist()):
            if count == 0:
                raise InputError(f"mask for image {i} is empty: nothing to generate (1 = the region to generate, "
                                 "0 = the photo kept). Check that the mask is not all black or inverted.")
            if count == hole.shape[1] * hole.shape[2]:
                raise InputError(f"mask for image {i} covers the whole image: no context to keep (1 = the region "
                                 "to generate, 0 = the photo kept). Mask only the region to repaint.")
        self.size_rule.check(int(context.shape[2]), int(context.shape[1]))
        return context.contiguous(), hole.contiguous()

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

        All inputs are checked before any model runs. Keyword options (each belongs to one
        option object, ``dreampainter_core.options``): batch_size (repeats a single product),
        denoise (< 1 starts from init_image, default the product on its blank canvas),
        init_image, shift, guidance_end, control_scale, renormalize_attention, shield_product, reference_size,
        reference_guidance (see ``sample``), box_ratio, feather, merge_lora.
        """
        request = self.prepare_inputs(
            product, mask, reference, width=width, height=height, steps=steps, guidance_scale=guidance_scale,
            seed=seed, lora_scale=lora_scale, attention_scale=attention_scale, mask_guidance=mask_guidance,
            placement=placement, paste_back=paste_back, callback=callback, **options,
        )
        out = self.run(prompt, request, negative_prompt)
        return out if return_dict else out.images

    def run(self, prompt, request: "GenerationRequest", negative_prompt="") -> DreamPainterOutput:
        """Encode the prompt(s) (one, or one per image) and generate a prepared request."""
        batch = request.product.shape[0]
        prompts = _as_prompt_list(prompt, batch, "prompt")
        negatives = _as_prompt_list(negative_prompt if negative_prompt is not None else "", batch, "negative_prompt")
        prompt_embeds = self.encode_prompt(prompts)
        negative_embeds = self.encode_prompt(negatives) if request.sampling.uses_cfg else None
        return self.generate(request, prompt_embeds, negative_embeds)


@dataclass
class GenerationRequest:
    """Checked inputs of one generation (see DreamPainterPipeline.prepare)."""

    product: torch.Tensor  # [B, H, W, 3]
    mask: torch.Tensor  # [B, H, W]
    width: int
    height: int
    sampling: SamplingOptions
    reference: ReferenceOptions  # its image, if any, expanded to the batch
    control: ControlOptions
    output: OutputOptions
    mode: str = "dreampainter"  # resolved: "dreampainter" or "training_free"
    init_image: torch.Tensor | None = None
    callback: Callable[[StepInfo], object] | None = None
    merge_lora: bool | None = None


@dataclass
class InsertRequest:
    """Checked inputs of one insertion (see DreamPainterPipeline.prepare_insert)."""

    context: torch.Tensor  # [B, H, W, 3]
    hole: torch.Tensor  # [B, H, W] 0/1: the region to generate
    product: object  # a product_lora.ProductLoRA, or None
    mode: str  # "training_free" (known-region sampler) or "dreampainter" (an insertion branch)
    sampling: SamplingOptions
    reference: ReferenceOptions
    control: ControlOptions
    output: OutputOptions
    callback: Callable[[StepInfo], object] | None = None
    merge_lora: bool | None = None

    @property
    def tokens(self) -> tuple:
        """The learned words the prompts use (the product's identifier, when learned)."""
        return () if self.product is None else self.product.tokens


@dataclass
class KnownRegion:
    """What the training-free mode holds: a latent and where, for how long, it is held."""

    latents: torch.Tensor  # [B, C, h, w] float32: the product's clean latent
    strength: torch.Tensor  # [B, 1, h, w] in 0..1: the share of the held steps each pixel is held for
    harmonize: float = 0.0  # the share of the last steps that run unconstrained

    def on(self, device) -> "KnownRegion":
        return KnownRegion(self.latents.to(device), self.strength.to(device), self.harmonize)

    def held(self, progress: float) -> torch.Tensor:
        """[B, 1, h, w] bool: pixels held once ``progress`` (0..1) of the steps are done."""
        return (self.strength > 0) & (progress <= self.strength * (1.0 - self.harmonize))

    def hold(self, latents: torch.Tensor, noise: torch.Tensor, sigma: float, progress: float) -> torch.Tensor:
        return torch.where(self.held(progress), sigma * noise + (1.0 - sigma) * self.latents, latents)
