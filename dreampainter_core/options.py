"""The sampler's controls, grouped by where they act, each checked once when it is built.

A node, the CLI, ``train.evaluate`` and training validation all build these objects; the
pipeline consumes them. ``pipe(...)`` keeps its keyword API and builds them from its
keywords (``options_from_keywords``). Adding a control means a field here (with its check
and, for a number, its documented range below: MAX_*), the place where it acts, and the node's
schema (whose min/max use the same constants).

    SamplingOptions   steps, guidance, seed, shift, denoise, guidance_end  -> pipeline.sample
    ReferenceOptions  image, size, lora_scale, product_scale, attention modulation, reference guidance
                                              -> pipeline.sample / transformer / attention processor
    ControlOptions    mode, control_scale, mask_guidance, harmonize, region_dilate/feather
                                              -> transformer.control_residuals / pipeline.sample
    OutputOptions     paste_back, feather, placement, box_ratio, decontaminate -> product.place_product / paste_back
    TextOptions       prompt_free, background token -> what the text encoder reads (TextOptions.prompt)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from .attention import AttentionModulation, check_modulation_scale
from .errors import InputError
from .images import as_image_batch
from .product import PLACEMENTS, normalize_box_ratio

__all__ = [
    "SamplingOptions",
    "ReferenceOptions",
    "ControlOptions",
    "OutputOptions",
    "TextOptions",
    "options_from_keywords",
    "check_schedule",
    "MAX_STEPS",
    "MAX_GUIDANCE",
    "MAX_SHIFT",
    "MAX_SCALE",
    "MAX_SEED",
    "MAX_BATCH",
]


#: The documented limits of the numeric controls (both ends included; README "Limits"). The Sampler node's widgets
#: take their min/max from here, so the node and the core refuse the same values. Beyond them a
#: value is either meaningless or overflows (a huge scale turns the latents into NaN/inf).
MAX_STEPS = 10_000  # also the longest schedule: steps / denoise (ComfyUI's way of denoising) <= MAX_STEPS
MAX_GUIDANCE = 30.0  # guidance_scale (cfg) and reference_guidance; CogView4 uses 3.5-5
MAX_SHIFT = 20.0  # shift (mu of CogView4's linear time shift): > 0; 3.25 at 1024x1024, ~4.5 at 2048x1024
MAX_SCALE = 2.0  # lora_scale, product_scale, attention_scale, control_scale: 1 = as trained, 0 = off
MAX_SEED = 2**64 - 1  # ComfyUI's seed range 0..2^64-1, what torch.Generator.manual_seed takes
MAX_BATCH = 64  # images in one sampler batch (products x batch_size)


def _finite(name: str, value, minimum: float | None = None, hint: str = "", maximum: float | None = None,
            above: bool = False) -> float:
    """float(value) if it is a finite number >= minimum (> minimum with ``above``) and <= maximum,
    else InputError naming ``name`` with the range and ``hint``."""
    bounds = "".join([f" {'>' if above else '>='} {minimum:g}" if minimum is not None else "",
                      " and" if minimum is not None and maximum is not None else "",
                      f" <= {maximum:g}" if maximum is not None else ""])
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number{bounds}{hint}, got {value!r}")
    if minimum is not None and (value <= minimum if above else value < minimum) \
            or maximum is not None and value > maximum:
        raise InputError(f"{name} must be{bounds}{hint}, got {value}")
    return float(value)


def _whole(name: str, value, minimum: int, maximum: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum \
            or maximum is not None and value > maximum:
        bounds = f" >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise InputError(f"{name} must be an integer{bounds}{hint}, got {value!r}")
    return int(value)


SEED_HINT = (" (ComfyUI's range; -1 is not 'random': for a random image draw a seed, e.g. "
             "random.randrange(2**64), and keep it to reproduce the image)")


def check_schedule(steps: int, denoise: float, name: str = "denoise") -> None:
    """denoise < 1 runs the last ``steps`` of a round(steps / denoise)-step schedule: bound its length,
    which is what is allocated (the schedule and the scheduler's tables) before the first step."""
    total = steps if denoise >= 1.0 else max(steps, int(round(steps / denoise)))
    if total > MAX_STEPS:
        raise InputError(f"steps={steps} with {name}={denoise:g} builds a {total}-step schedule (steps / {name}); "
                         f"at most {MAX_STEPS}: lower steps or raise {name}")


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise their own fields


@dataclass(frozen=True)
class SamplingOptions:
    """The denoising schedule and classifier-free guidance."""

    steps: int = 50
    guidance_scale: float = 3.5
    seed: int = 0
    shift: float | None = None  # mu; None = CogView4's resolution-dependent shift
    denoise: float = 1.0  # < 1: start from an init image (ComfyUI's convention)
    # Fraction of the steps (from the first) that use CFG; the rest run the conditional pass
    # alone. 1 = CFG on every step (CogView4's sampler). Late steps only refine detail, so
    # dropping their negative pass saves up to half their cost.
    guidance_end: float = 1.0
    # One seed per image of a batch: image i's noise comes from image_seeds[i] alone, exactly as
    # if it were generated by itself with that seed, so an image does not depend on its batch
    # mates (the batch command's resume and reproduce rely on it). None: the whole batch's noise
    # is drawn from `seed` in one go (diffusers' convention).
    image_seeds: tuple[int, ...] | None = None

    def __post_init__(self):
        _set(self, "steps", _whole("steps", self.steps, 1, MAX_STEPS))
        _set(self, "guidance_scale", _finite("guidance_scale", self.guidance_scale, 0.0,
                                             " (classifier-free guidance; <= 1 = off)", MAX_GUIDANCE))
        _set(self, "seed", _whole("seed", self.seed, 0, MAX_SEED, SEED_HINT))
        if self.image_seeds is not None:
            if isinstance(self.image_seeds, (str, bytes)) or not hasattr(self.image_seeds, "__len__") \
                    or not len(self.image_seeds):
                raise InputError(f"image_seeds must be a non-empty list of integers, one per image, got {self.image_seeds!r}")
            _set(self, "image_seeds", tuple(_whole("image_seeds item", s, 0, MAX_SEED, SEED_HINT)
                                               for s in self.image_seeds))
        if self.shift is not None:
            _set(self, "shift", _finite("shift", self.shift, 0.0, " (mu; None = CogView4's automatic shift, 3.25 at "
                                                                  "1024x1024)", MAX_SHIFT, above=True))
        denoise = _finite("denoise", self.denoise)
        if not 0.0 < denoise <= 1.0:
            raise InputError(f"denoise must be in (0, 1], got {denoise}")
        _set(self, "denoise", denoise)
        check_schedule(self.steps, denoise)
        end = _finite("guidance_end", self.guidance_end)
        if not 0.0 <= end <= 1.0:
            raise InputError(f"guidance_end must be in [0, 1] (the fraction of steps that use CFG; 1 = all), got {end}")
        _set(self, "guidance_end", end)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def cfg_steps(self, total: int) -> int:
        """How many of ``total`` steps, from the first, run the negative pass."""
        return total if self.guidance_end >= 1.0 else int(math.ceil(self.guidance_end * total - 1e-9))


TRAINING_FREE_REFERENCE = ("init", "in_context")


@dataclass(frozen=True)
class ReferenceOptions:
    """The reference image and how strongly it is followed (stage-2 models), and the product LoRA's
    strength (DreamPaint: the catalog images, the paper's reference, learned into a LoRA)."""

    image: torch.Tensor | None = None  # [B, H, W, 3] (or anything as_image_batch reads)
    size: tuple[int, int] | None = None  # (width, height) the model sees; None = the pipeline's default
    lora_scale: float = 1.0
    # The product LoRA of pipe.insert (dreampainter_core.product_lora): f = W x + product_scale * LoRA(x);
    # 0 = the class noun only, exactly as without the product. Acts only while a product LoRA is loaded.
    product_scale: float = 1.0
    attention_scale: float = 1.0
    renormalize_attention: bool = False
    # The product's tokens do not attend to the reference (stage-2 models): the reference shapes the
    # background only. Measured on the miniature, whose reference sits on the target's own positions:
    # product PSNR +0.3 dB with the pattern and tone kept (train/README.md, E8). No reference: no effect.
    shield_product: bool = False
    guidance: float | None = None  # g_r; None = the text guidance (see pipeline.sample)
    # Training-free mode only (no stage-2 weights): "init" starts from the product over the
    # reference, at `strength` (like denoise); "in_context" puts the reference's latent beside
    # the target as extra tokens on its own noised trajectory (experimental).
    training_free_method: str = "init"
    strength: float = 0.8
    modulation: AttentionModulation = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.image is not None:
            _set(self, "image", as_image_batch(self.image, "reference"))
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, numbers.Integral) else self.size
            try:
                width, height = size
                size = (_whole("reference_size", width, 1), _whole("reference_size", height, 1))
            except (TypeError, ValueError):
                raise InputError(f"reference_size must be one side or (width, height) in pixels, "
                                 f"got {self.size!r}") from None
            _set(self, "size", size)
        _set(self, "lora_scale", _finite("lora_scale", self.lora_scale, 0.0, " (1 = as trained, 0 = the stage-1 model)",
                                         MAX_SCALE))
        _set(self, "product_scale", _finite("product_scale", self.product_scale, 0.0,
                                            " (1 = the product LoRA as trained, 0 = without it)", MAX_SCALE))
        _set(self, "renormalize_attention", bool(self.renormalize_attention))
        _set(self, "shield_product", bool(self.shield_product))
        _set(self, "attention_scale", check_modulation_scale(self.attention_scale, maximum=MAX_SCALE))
        _set(self, "modulation", AttentionModulation(self.attention_scale, self.renormalize_attention))
        if self.training_free_method not in TRAINING_FREE_REFERENCE:
            raise InputError(f"training_free_reference must be one of {TRAINING_FREE_REFERENCE}, "
                             f"got {self.training_free_method!r}")
        strength = _finite("reference_strength", self.strength)
        if not 0.0 < strength <= 1.0:
            raise InputError(f"reference_strength must be in (0, 1] (how much of the schedule repaints the product "
                             f"over the reference; 1 = from pure noise), got {strength}")
        _set(self, "strength", strength)
        if self.guidance is not None:
            _set(self, "guidance", _finite(
                "reference_guidance", self.guidance, 0.0,
                " (None = guidance_scale; 1 = the reference in both CFG passes, higher = follow the reference more)",
                MAX_GUIDANCE))


MODES = ("auto", "dreampainter", "training_free")


@dataclass(frozen=True)
class ControlOptions:
    """How the product is held: by the stage-1 control branch ("dreampainter"), or with no
    DreamPainter weights by keeping the product's latent on its own noised trajectory
    ("training_free"). "auto" takes training_free when the model has no control branch."""

    mode: str = "auto"
    control_scale: float = 1.0
    mask_guidance: bool = False  # the branch acts on product tokens only (seed 004's overcompletion fix)
    # training_free: the share of the last steps that run unconstrained, so that the edge and
    # the contact shadow can form around the product (0 = held to the end).
    harmonize: float = 0.2
    region_dilate: int = 0  # px the held region grows past the mask (covers a loose mask's edge)
    # px of soft edge outside it, held for fewer steps the farther out. 0 by default: what lies
    # outside the mask is the product canvas's white, and holding it draws a halo (known_region).
    region_feather: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        _set(self, "control_scale", _finite("control_scale", self.control_scale, 0.0,
                                            " (1 = as trained, 0 = no control branch)", MAX_SCALE))
        _set(self, "mask_guidance", bool(self.mask_guidance))
        harmonize = _finite("harmonize", self.harmonize)
        if not 0.0 <= harmonize <= 1.0:
            raise InputError(f"harmonize must be in [0, 1] (the share of the last steps that run without holding "
                             f"the product; 0 = held to the end), got {harmonize}")
        _set(self, "harmonize", harmonize)
        _set(self, "region_dilate", _whole("region_dilate", self.region_dilate, 0))
        _set(self, "region_feather", _whole("region_feather", self.region_feather, 0))

    def resolved_mode(self, has_control_branch: bool) -> str:
        if self.mode == "auto":
            return "dreampainter" if has_control_branch else "training_free"
        return self.mode


@dataclass(frozen=True)
class OutputOptions:
    """Where the product goes on the canvas and how its pixels come back."""

    paste_back: bool = True
    feather: int | None = None  # None = 1 px (an anti-aliasing ramp over the photo's own edge)
    placement: str = "keep"
    box_ratio: tuple[float, float] = (0.6, 0.6)
    # Colour decontamination at paste-back: the mask is read as a soft matte (an auto mask's
    # alpha) and the backdrop colour mixed into its edge pixels is removed, so a white studio
    # backdrop leaves no light fringe on a dark background (product.paste_back(matte=...)). The
    # matte replaces the feather; with a hard 0/1 mask it only drops the feather.
    decontaminate: bool = False

    def __post_init__(self):
        _set(self, "paste_back", bool(self.paste_back))
        _set(self, "decontaminate", bool(self.decontaminate))
        if self.placement not in PLACEMENTS:
            raise InputError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.feather is not None:
            _set(self, "feather", _whole("feather", self.feather, 0))
        _set(self, "box_ratio", normalize_box_ratio(self.box_ratio))

    @property
    def feather_radius(self) -> int:
        # Wider ramps bring back a ring of the photo's old background (white on studio shots):
        # use them for loose masks only.
        return 1 if self.feather is None else self.feather


@dataclass(frozen=True)
class TextOptions:
    """How the prompt box is read (Product2Img's prompt-free mode, issue 17).

    prompt_free off: the prompt as written; a learned ``token`` (dreampainter_core.tokens) is then only
    a word the prompt may use. prompt_free on: the box holds the product's name alone and the text
    encoder reads "<name> <token>" (prompts.name_with_token), e.g. "a red cup <background>": the
    learned background token stands in for the scene description."""

    prompt_free: bool = False
    token: object = None  # a tokens.LearnedToken, or None

    def __post_init__(self):
        _set(self, "prompt_free", bool(self.prompt_free))
        if self.prompt_free and self.token is None:
            raise InputError("prompt_free needs a learned background token (a token file made by python -m "
                             "train.background_token): connect DreamPainter Background Token Loader, or turn "
                             "prompt_free off and write a prompt")

    @property
    def tokens(self) -> tuple:
        """The learned words the text encoder knows for this prompt."""
        return () if self.token is None else (self.token,)

    def prompt(self, text) -> str:
        """What the text encoder reads for the prompt box's ``text``."""
        if not self.prompt_free:
            return text
        from .prompts import PromptConfigError, name_with_token

        try:
            return name_with_token(text, self.token.token)
        except PromptConfigError as exc:  # "name is empty: ..." as an input error of the prompt box
            raise InputError(f"prompt_free: the prompt box holds the product's name: {exc}") from None


# pipe(...)'s flat keyword -> (group, field). Every keyword belongs to exactly one group.
KEYWORDS: dict[str, tuple[str, str]] = {
    **{name: ("sampling", name) for name in ("steps", "guidance_scale", "seed", "shift", "denoise", "guidance_end")},
    "reference": ("reference", "image"),
    "reference_size": ("reference", "size"),
    "reference_guidance": ("reference", "guidance"),
    "reference_strength": ("reference", "strength"),
    "training_free_reference": ("reference", "training_free_method"),
    **{name: ("reference", name) for name in ("lora_scale", "product_scale", "attention_scale",
                                              "renormalize_attention", "shield_product")},
    **{name: ("control", name) for name in ("mode", "control_scale", "mask_guidance", "harmonize", "region_dilate",
                                            "region_feather")},
    **{name: ("output", name) for name in ("paste_back", "feather", "placement", "box_ratio",
                                           "decontaminate")},
}
_CLASSES = {"sampling": SamplingOptions, "reference": ReferenceOptions, "control": ControlOptions,
            "output": OutputOptions}


def options_from_keywords(**keywords) -> tuple[dict[str, object], dict[str, object]]:
    """``pipe(...)``'s flat keywords -> ({"sampling": SamplingOptions, ...}, the keywords left over)."""
    values: dict[str, dict[str, object]] = {group: {} for group in _CLASSES}
    left = {}
    for key, value in keywords.items():
        if key in KEYWORDS:
            group, name = KEYWORDS[key]
            values[group][name] = value
        else:
            left[key] = value
    return {group: cls(**values[group]) for group, cls in _CLASSES.items()}, left
