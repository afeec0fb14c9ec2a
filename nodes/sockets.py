"""The pack's custom ComfyUI types and what travels on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from comfy_api.latest import io

# Socket types (stable names: workflows store them).
DreamPainterModelType = io.Custom("DREAMPAINTER_MODEL")
DreamPainterTextEncoderType = io.Custom("DREAMPAINTER_TEXT_ENCODER")
DreamPainterConditioningType = io.Custom("DREAMPAINTER_CONDITIONING")
DreamPainterVAEType = io.Custom("DREAMPAINTER_VAE")
DreamPainterReferenceType = io.Custom("DREAMPAINTER_REFERENCE")
DreamPainterProductType = io.Custom("DREAMPAINTER_PRODUCT")  # a dreampainter_core.product_lora.ProductLoRA
DreamPainterTokenType = io.Custom("DREAMPAINTER_TOKEN")  # a dreampainter_core.tokens.LearnedToken

CATEGORY = "DreamPainter"
# The Add Node menu, by role ("DreamPainter/<role>"). The role names are the core's own category
# names, which the frontend already translates (nodeCategories.loaders = "加载器", ...).
CATEGORY_LOADERS = f"{CATEGORY}/loaders"  # model, text encoder, VAE
CATEGORY_CONDITIONING = f"{CATEGORY}/conditioning"  # prompt, reference image
CATEGORY_IMAGE = f"{CATEGORY}/image"  # product placement, paste back
CATEGORY_MASK = f"{CATEGORY}/mask"  # auto mask, mask refine
CATEGORY_SAMPLING = f"{CATEGORY}/sampling"  # the samplers (background, insertion)


@dataclass(eq=False)
class DreamPainterModel:
    """DREAMPAINTER_MODEL: the DreamPainter transformer (CogView4 + control branch + LoRA)."""

    transformer: Any  # dreampainter_core.transformer.DreamPainterTransformer
    patcher: Any  # comfy.model_patcher.ModelPatcher over the resident part
    scheduler: Any
    stage: int  # 0 = base model only, 1 = control branch, 2 = control branch + LoRA (references)
    weight_dtype: str
    memory_mode: str
    swap: Any = None  # memory.BlockSwap or None
    notes: list[str] = field(default_factory=list)
    source: str = ""


@dataclass(eq=False)
class DreamPainterTextEncoder:
    """DREAMPAINTER_TEXT_ENCODER: GLM text encoder + tokenizer."""

    tokenizer: Any
    text_encoder: Any  # transformers GlmModel
    patcher: Any
    notes: list[str] = field(default_factory=list)
    source: str = ""


@dataclass(eq=False)
class DreamPainterVAE:
    """DREAMPAINTER_VAE: CogView4's AutoencoderKL."""

    vae: Any  # diffusers AutoencoderKL
    patcher: Any
    notes: list[str] = field(default_factory=list)
    source: str = ""
    preview_map: Any = None  # (weights [C, 3], bias [3]) latent -> RGB, fitted on first use


@dataclass
class DreamPainterConditioning:
    """DREAMPAINTER_CONDITIONING: GLM embeddings (float32, intermediate device) of both prompts."""

    prompt_embeds: torch.Tensor  # [1, T, D]
    negative_embeds: torch.Tensor  # [1, T', D]
    prompt: str
    negative_prompt: str


@dataclass
class DreamPainterReference:
    """DREAMPAINTER_REFERENCE: the reference image(s) already resized to what the model sees."""

    image: torch.Tensor  # [B, h, w, 3] float 0..1, at the size the model sees it
