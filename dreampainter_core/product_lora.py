"""DreamPaint product files: one catalog product, learned by ``python -m train.dreampaint`` (masked
DreamBooth on its 3-10 catalog images), for ``DreamPainterPipeline.insert``.

A product is a LoRA on the base DiT blocks (the peft adapter ``PRODUCT_ADAPTER``, beside the stage-2
one) and optionally a learned embedding for its identifier (dreampainter_core.tokens), used in prompts
as "a <identifier> <class noun> ..." ("a sks cup on the desk").

File layout (safetensors, written atomically):

* tensors ``lora.<peft key>`` (peft's names on the base transformer, the adapter name left out, as in
  DreamPainter files) and, with a learned identifier, ``token_embedding``;
* metadata: ``format`` = "dreampainter-product", ``format_version``, ``identifier``, ``class_noun``,
  ``prompt`` (what it was trained with), ``base_model`` (a name), the base geometry and fingerprint
  (weights.base_geometry / base_fingerprint: a file for another base model is refused),
  ``lora_rank``, ``lora_alpha``, ``lora_targets`` (JSON), and what training recorded
  (``trained_steps``, ``dreampainter_weights``, ``prior_preservation``, ...); with a learned
  identifier also the token's ``token_*`` keys (tokens.token_metadata).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import WeightFormatError
from .tokens import LearnedToken, check_token_string, token_from, token_metadata, token_tensors
from .weights import atomic_save_safetensors, base_fingerprint, base_geometry, check_base, read_safetensors

__all__ = ["PRODUCT_FORMAT", "DEFAULT_PRODUCT_TARGETS", "ProductLoRA", "save_product_lora", "load_product_lora",
           "product_applied", "identifier_in", "warn_missing_identifier", "product_prompt"]

logger = logging.getLogger("dreampainter")

PRODUCT_FORMAT = "dreampainter-product"
PRODUCT_FORMAT_VERSION = 1
#: The product LoRA's default layers: attention and MLP of every base block (the stage-2 LoRA also
#: adapts the AdaLN modulation, norm1.linear, which for one product is 3x the parameters for little).
DEFAULT_PRODUCT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
MADE_BY = "made by `python -m train.dreampaint --images DIR --class-noun NOUN --out FILE`"
BASE_KEYS = ("base_model", "base_num_layers", "base_inner_dim", "base_in_channels", "base_patch_size",
             "base_fingerprint")


def product_prompt(identifier: str, class_noun: str) -> str:
    """DreamBooth's prompt: the rare identifier right before the class noun."""
    return f"a {identifier} {class_noun}"


def base_identity(transformer, name: str) -> dict[str, str]:
    """What a product file records of the base it was trained on (a DreamPainterTransformer's base)."""
    return {"base_model": name, **{k: str(v) for k, v in base_geometry(transformer.base).items()},
            "base_fingerprint": base_fingerprint(transformer.base)}


@dataclass
class ProductLoRA:
    """One learned product: its LoRA, its identifier (and the identifier's embedding, when learned)."""

    identifier: str
    class_noun: str
    lora: dict[str, torch.Tensor]  # peft keys (adapter name left out) -> tensors
    rank: int
    alpha: float
    targets: list[str]
    base: dict[str, str]  # base_identity()
    token: LearnedToken | None = None
    info: dict[str, str] = field(default_factory=dict)  # what training recorded (trained_steps, ...)
    source: str = ""  # the file it came from, for messages
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def prompt(self) -> str:
        return product_prompt(self.identifier, self.class_noun)

    @property
    def tokens(self) -> tuple[LearnedToken, ...]:
        """The learned words its prompts use (for encode_prompt)."""
        return () if self.token is None else (self.token,)

    def check_base(self, transformer) -> None:
        """WeightFormatError unless the loaded base is the one this product was trained on."""
        check_base(Path(self.source or f"product {self.identifier!r}"), self.base, transformer.base)


def identifier_in(prompt: str, identifier: str) -> bool:
    """Whether ``identifier`` occurs in ``prompt`` as a word of its own."""
    return re.search(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])", prompt) is not None


def warn_missing_identifier(prompts: Sequence[str], product: ProductLoRA) -> list[str]:
    """Log a warning for each prompt that does not name the product; returns those prompts. The LoRA
    still acts, but the learned product is tied to its identifier: without it the prompt asks for some
    other thing."""
    missing = [p for p in dict.fromkeys(prompts) if not identifier_in(p, product.identifier)]
    for p in missing:
        logger.warning("the prompt %r does not contain the product identifier %r: write it before the class noun, "
                       "e.g. %r, or the model paints a generic %s", p[:120], product.identifier,
                       f"{product.prompt} on a wooden desk", product.class_noun)
    return missing


def save_product_lora(product: ProductLoRA, path: str | os.PathLike) -> Path:
    """Write a product file (module docstring)."""
    metadata = {
        "format": PRODUCT_FORMAT, "format_version": str(PRODUCT_FORMAT_VERSION),
        "identifier": product.identifier, "class_noun": product.class_noun, "prompt": product.prompt,
        "lora_rank": str(product.rank), "lora_alpha": str(float(product.alpha)),
        "lora_targets": json.dumps(list(product.targets)), "learned_token": str(product.token is not None),
        **product.info, **product.base,
    }
    tensors = {f"lora.{k}": v.detach().to("cpu").contiguous() for k, v in product.lora.items()}
    if product.token is not None:
        tensors.update(token_tensors(product.token, "token_"))
        metadata.update(token_metadata(product.token, "token_"))
    return atomic_save_safetensors(tensors, path, metadata)


def load_product_lora(path: str | os.PathLike) -> ProductLoRA:
    """Read a product file; clear errors for another format, a newer version or missing parts."""
    tensors, metadata = read_safetensors(path, PRODUCT_FORMAT, PRODUCT_FORMAT_VERSION, "DreamPaint product", MADE_BY)
    needed = ("identifier", "class_noun", "lora_rank", "lora_alpha", "lora_targets") + BASE_KEYS
    missing = [k for k in needed if k not in metadata]
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    if missing or not lora:
        raise WeightFormatError(f"{path}: an incomplete product file (missing {', '.join(missing) or 'LoRA tensors'}); "
                                f"make it again with train.dreampaint")
    token = None
    if metadata.get("learned_token") == "True":
        token = token_from(tensors, metadata, "token_", where=str(path))
    known = set(needed) | {"format", "format_version", "prompt", "learned_token"}
    return ProductLoRA(
        identifier=check_token_string(metadata["identifier"]), class_noun=metadata["class_noun"], lora=lora,
        rank=int(metadata["lora_rank"]), alpha=float(metadata["lora_alpha"]),
        targets=list(json.loads(metadata["lora_targets"])), base={k: metadata[k] for k in BASE_KEYS}, token=token,
        info={k: v for k, v in metadata.items() if k not in known and not k.startswith("token_")}, source=str(path))


@contextmanager
def product_applied(transformer, product: ProductLoRA | None):
    """The product's LoRA on ``transformer`` for the duration (then removed, so later generations are as
    if it had never been there). Checks the base first; None does nothing."""
    if product is None:
        yield
        return
    product.check_base(transformer)
    transformer.add_product_adapter(product.rank, product.alpha, product.targets)
    try:
        try:
            transformer.load_product_state_dict(product.lora)
        except ValueError as exc:
            raise WeightFormatError(f"{product.source or 'product LoRA'}: {exc}; the file does not match the base "
                                    "model it names") from exc
        yield
    finally:
        transformer.remove_product_adapter()
