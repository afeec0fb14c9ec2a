"""Learned token embeddings for the frozen text encoder (GLM-4-9B), textual-inversion style.

A ``LearnedToken`` is a new word of the prompt (its string, e.g. ``sks`` or ``<background>``) with one
embedding row of its own. The text encoder and its tokenizer are never changed: a prompt is tokenized
by a copy of the tokenizer that knows the token (``tokenizer_with``), its ids are embedded by the text
encoder's own input embedding, the learned row replaces the embedding wherever the token occurs
(``input_embeddings``), and the text encoder runs on those input embeddings. So training a token
trains one vector (hidden_size numbers) and leaves GLM's 9B weights bit-identical; a prompt without
the token encodes exactly as it does without any token.

Users: the DreamPaint product identifier (``train.dreampaint --learn-token``, stored inside the
product file) and the learned ``<background>`` token of Product2Img (issue 17).

A token file (``save_learned_token`` / ``load_learned_token``) is safetensors with one tensor,
``embedding`` ([hidden_size] float32), and string metadata:

* ``format`` = "dreampainter-token", ``format_version``;
* ``token``: the string it stands for in prompts;
* ``init``: how it was initialised: ``word:<text>`` (the mean of that text's embedding rows, e.g. the
  class noun) or ``random:<seed>`` (normal, with the embedding table's standard deviation);
* ``base_model``: the model it was trained with (a name, for people);
* ``text_encoder_hidden_size``, ``text_encoder_fingerprint``: the text encoder it belongs to (the
  fingerprint of its first embedding rows, weights.weights_fingerprint); another one is refused.

A token may carry a LoRA on GLM's linear layers (``text_lora``, the background token's option, off
by default): tensors ``text_lora.<module>.lora_A`` [r, in] and ``.lora_B`` [out, r], metadata
``text_lora_rank`` and ``text_lora_alpha``. It is applied while the token is in use, without touching
the text encoder's weights (``text_lora_weights``: each targeted weight is W + alpha / r * B A, passed to
the forward pass in place of W); B starts at zero, so a fresh LoRA changes nothing.

Other files carry a token under a key prefix (``token_tensors`` / ``token_metadata`` /
``token_from``), e.g. the product file (dreampainter_core/product_lora.py).
"""

from __future__ import annotations

import copy
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import InputError, WeightFormatError
from .weights import atomic_save_safetensors, read_safetensors, weights_fingerprint

__all__ = [
    "TOKEN_FORMAT",
    "LearnedToken",
    "check_token_string",
    "text_encoder_identity",
    "init_token",
    "tokenizer_with",
    "input_embeddings",
    "token_tensors",
    "token_metadata",
    "token_from",
    "save_learned_token",
    "load_learned_token",
    "add_text_lora",
    "text_lora_weights",
]

TOKEN_FORMAT = "dreampainter-token"
TOKEN_FORMAT_VERSION = 1
FINGERPRINT_ROWS = 256  # embedding rows the text encoder's fingerprint covers (GLM-4-9B: 2 MB in bf16)
MAX_TOKEN_CHARS = 64


@dataclass
class LearnedToken:
    """One learned word: its string and its embedding row for one text encoder."""

    token: str
    embedding: torch.Tensor  # [hidden_size] (float32; an nn.Parameter while it trains)
    init: str  # "word:<text>" or "random:<seed>"
    text_encoder: dict[str, str]  # text_encoder_identity() of the encoder it belongs to
    base_model: str = ""
    # Optional LoRA on GLM's linear layers (module docstring): "<module>.lora_A" / "<module>.lora_B".
    text_lora: dict[str, torch.Tensor] | None = None
    text_lora_alpha: float = 0.0  # 0 = its rank (scale 1)

    @property
    def text_lora_rank(self) -> int:
        """The LoRA's rank (0 without one)."""
        return next((int(v.shape[0]) for k, v in (self.text_lora or {}).items() if k.endswith(".lora_A")), 0)

    def check_fits(self, text_encoder, where: str = "the learned token") -> None:
        """WeightFormatError unless this token was made for ``text_encoder``."""
        actual = text_encoder_identity(text_encoder)
        if self.text_encoder.get("hidden_size") != actual["hidden_size"]:
            raise WeightFormatError(
                f"{where} {self.token!r} has {self.text_encoder.get('hidden_size')} numbers but the loaded text "
                f"encoder embeds words in {actual['hidden_size']}: it was made for another model "
                f"({self.base_model or 'unknown'}). Load the text encoder it was trained with.")
        if self.text_encoder.get("fingerprint") != actual["fingerprint"]:
            raise WeightFormatError(
                f"{where} {self.token!r} was made for another text encoder (fingerprint "
                f"{self.text_encoder.get('fingerprint')}, the loaded one has {actual['fingerprint']}; made with "
                f"{self.base_model or 'an unknown model'}). Load the text encoder it was trained with.")


def check_token_string(token) -> str:
    """``token`` if it can be a prompt word: a non-empty string without spaces, at most 64 characters."""
    if not isinstance(token, str) or not token or re.search(r"\s", token) or len(token) > MAX_TOKEN_CHARS:
        raise InputError(f"a learned token must be one word: a non-empty string without spaces, at most "
                         f"{MAX_TOKEN_CHARS} characters (e.g. 'sks' or '<background>'), got {token!r}")
    return token


def _embedding_table(text_encoder) -> torch.nn.Embedding:
    return text_encoder.get_input_embeddings()


def text_encoder_identity(text_encoder) -> dict[str, str]:
    """{"hidden_size", "fingerprint"} of a text encoder: what a learned token records and checks."""
    weight = _embedding_table(text_encoder).weight
    return {"hidden_size": str(int(weight.shape[1])), "fingerprint": weights_fingerprint([weight[:FINGERPRINT_ROWS]])}


def _pieces_in_a_sentence(tokenizer, word: str) -> list[int]:
    """``word``'s token ids where it follows a space in a prompt. A byte-level BPE (GLM-4's) gives a word
    after a space other pieces (" background") than at the start of a text ("background"); a learned
    token stands after a space, and takes that space (tokenizer_with: lstrip), so it starts as the word
    would be read there. Word-level tokenizers give the same ids either way."""
    head = tokenizer("a", add_special_tokens=False).input_ids
    ids = tokenizer(f"a {word}", add_special_tokens=False).input_ids
    if ids[:len(head)] == head and len(ids) > len(head):
        return ids[len(head):]
    return tokenizer(word, add_special_tokens=False).input_ids


@torch.no_grad()
def init_token(tokenizer, text_encoder, token: str, init_word: str | None = None, seed: int = 0,
               base_model: str = "") -> LearnedToken:
    """A new token's starting embedding: the mean of ``init_word``'s embedding rows (its word pieces as
    they stand inside a prompt, without special tokens; e.g. the class noun), or, without one, a seeded
    normal draw with the embedding table's standard deviation."""
    check_token_string(token)
    table = _embedding_table(text_encoder).weight
    if init_word:
        ids = _pieces_in_a_sentence(tokenizer, init_word)
        if not ids:
            raise InputError(f"init_word {init_word!r} gives no tokens: give a word of the prompt's language")
        vector = table[torch.tensor(ids, device=table.device)].float().mean(dim=0)
        init = f"word:{init_word}"
    else:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        vector = torch.randn(table.shape[1], generator=generator) * table.float().std().cpu()
        init = f"random:{int(seed)}"
    return LearnedToken(token, vector.detach().to("cpu", torch.float32).clone(), init,
                        text_encoder_identity(text_encoder), base_model)


# (tokenizer, tokens) -> the tokenizer's copy that knows them; the copies live as long as the tokenizer.
_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_with(tokenizer, tokens: Sequence[str]) -> tuple[object, dict[str, int]]:
    """(a copy of ``tokenizer`` that reads each of ``tokens`` as one word, {token: its id}). The given
    tokenizer is not changed (ComfyUI shares it between nodes). A token is matched as a whole word only
    ("sks" in "tasks" is not the token), before the tokenizer's normalisation (case-sensitive), and takes
    the space before it (lstrip), as a byte-level BPE folds a word's leading space into the word: "a red
    cup <background>" then reads as "a red cup background" does, the token in the last word's place."""
    from tokenizers import AddedToken

    key = tuple(check_token_string(t) for t in tokens)
    cached = _COPIES.setdefault(tokenizer, {})
    if key not in cached:
        copied = copy.deepcopy(tokenizer)
        copied.add_tokens([AddedToken(t, single_word=True, lstrip=True, normalized=False) for t in key])
        cached[key] = (copied, {t: int(copied.convert_tokens_to_ids(t)) for t in key})
    return cached[key]


def input_embeddings(text_encoder, ids: torch.Tensor, vectors: dict[int, torch.Tensor], pad_id: int) -> torch.Tensor:
    """[B, T, D] input embeddings of ``ids`` with the row of each id in ``vectors`` replaced by its
    vector (differentiable in the vectors; the table itself is only read)."""
    table = _embedding_table(text_encoder)
    learned = torch.zeros_like(ids, dtype=torch.bool)
    for token_id in vectors:
        learned |= ids == token_id
    embeds = table(torch.where(learned, torch.full_like(ids, pad_id), ids))  # a new id may lie past the table
    for token_id, vector in vectors.items():
        where = (ids == token_id).unsqueeze(-1)
        embeds = torch.where(where, vector.to(device=embeds.device, dtype=embeds.dtype), embeds)
    return embeds


def add_text_lora(token: LearnedToken, text_encoder, rank: int, targets: Sequence[str], alpha: float = 0.0,
                  seed: int = 0) -> list[str]:
    """Give ``token`` a fresh LoRA (A: seeded, Kaiming-uniform as peft draws it; B: zero) on the text
    encoder's linear layers whose names end with one of ``targets`` (e.g. "self_attn.q_proj"); returns
    the module names. InputError when no layer matches."""
    import math

    if rank < 1:
        raise InputError(f"text LoRA rank must be >= 1, got {rank}")
    names = [n for n, m in text_encoder.named_modules()
             if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise InputError(f"text LoRA targets {list(targets)} match no linear layer of the text encoder "
                         "(GLM-4's are e.g. self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj)")
    generator = torch.Generator("cpu").manual_seed(int(seed))
    lora = {}
    for name in names:
        weight = text_encoder.get_submodule(name).weight
        bound = 1.0 / math.sqrt(weight.shape[1])  # kaiming_uniform_(a=sqrt(5)) of an [r, in] matrix
        lora[f"{name}.lora_A"] = (torch.rand(rank, weight.shape[1], generator=generator) * 2 - 1) * bound
        lora[f"{name}.lora_B"] = torch.zeros(weight.shape[0], rank)
    token.text_lora, token.text_lora_alpha = lora, float(alpha or rank)
    return names


def text_lora_weights(text_encoder, tokens: Sequence[LearnedToken]) -> dict[str, torch.Tensor]:
    """{parameter name: W + alpha / r * B A} for the LoRA the tokens carry ({} without one): what the
    text encoder's forward pass takes in place of W (torch.func.functional_call), so its own weights
    stay as loaded. Differentiable in A and B. WeightFormatError when a LoRA does not fit the encoder."""
    out: dict[str, torch.Tensor] = {}
    for token in tokens:
        if not token.text_lora:
            continue
        rank = token.text_lora_rank
        scale = (token.text_lora_alpha or rank) / rank
        for key, a in token.text_lora.items():
            if not key.endswith(".lora_A"):
                continue
            module = key[: -len(".lora_A")]
            b = token.text_lora.get(f"{module}.lora_B")
            try:
                weight = text_encoder.get_submodule(module).weight
            except AttributeError:
                weight = None
            if b is None or weight is None or tuple(weight.shape) != (b.shape[0], a.shape[1]):
                raise WeightFormatError(f"the learned token {token.token!r} carries a text-encoder LoRA for "
                                        f"{module}, which the loaded text encoder does not have in that shape: it "
                                        "was made for another model")
            base = out.get(f"{module}.weight", weight)
            delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * scale
            out[f"{module}.weight"] = base + delta.to(weight.dtype)
    return out


# ---- files -------------------------------------------------------------------------------


def token_tensors(token: LearnedToken, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {f"{prefix}embedding": token.embedding.detach().to("cpu", torch.float32).contiguous()}
    for key, value in (token.text_lora or {}).items():
        out[f"{prefix}text_lora.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def token_metadata(token: LearnedToken, prefix: str = "") -> dict[str, str]:
    meta = {f"{prefix}token": token.token, f"{prefix}init": token.init, f"{prefix}base_model": token.base_model,
            f"{prefix}text_encoder_hidden_size": token.text_encoder["hidden_size"],
            f"{prefix}text_encoder_fingerprint": token.text_encoder["fingerprint"]}
    if token.text_lora:
        meta.update({f"{prefix}text_lora_rank": str(token.text_lora_rank),
                     f"{prefix}text_lora_alpha": repr(float(token.text_lora_alpha or token.text_lora_rank))})
    return meta


def token_from(tensors: dict[str, torch.Tensor], metadata: dict[str, str], prefix: str = "",
               where: str = "token file") -> LearnedToken:
    """The LearnedToken stored under ``prefix`` (WeightFormatError naming ``where`` if incomplete)."""
    keys = ("token", "init", "text_encoder_hidden_size", "text_encoder_fingerprint")
    missing = [prefix + k for k in keys if prefix + k not in metadata]
    if missing or f"{prefix}embedding" not in tensors:
        raise WeightFormatError(f"{where}: the learned token is incomplete (missing "
                                f"{', '.join(missing + ([] if f'{prefix}embedding' in tensors else [f'{prefix}embedding']))})")
    embedding = tensors[f"{prefix}embedding"].float()
    hidden = metadata[f"{prefix}text_encoder_hidden_size"]
    if embedding.dim() != 1 or str(embedding.shape[0]) != hidden:
        raise WeightFormatError(f"{where}: the token's embedding has shape {tuple(embedding.shape)}, expected "
                                f"[{hidden}] (its recorded text encoder width)")
    lora_prefix = f"{prefix}text_lora."
    lora = {k[len(lora_prefix):]: v.float() for k, v in tensors.items() if k.startswith(lora_prefix)}
    alpha = 0.0
    if lora:
        pairs = {k.rsplit(".", 1)[0] for k in lora}
        rank = metadata.get(f"{prefix}text_lora_rank", "")
        bad = [m for m in sorted(pairs) if f"{m}.lora_A" not in lora or f"{m}.lora_B" not in lora
               or lora[f"{m}.lora_A"].dim() != 2 or lora[f"{m}.lora_B"].dim() != 2
               or str(lora[f"{m}.lora_A"].shape[0]) != rank or str(lora[f"{m}.lora_B"].shape[1]) != rank]
        try:
            alpha = float(metadata.get(f"{prefix}text_lora_alpha", "nan"))
        except ValueError:
            alpha = float("nan")
        if bad or not (alpha > 0):
            raise WeightFormatError(f"{where}: the token's text-encoder LoRA is incomplete or inconsistent (rank "
                                    f"{rank!r}, alpha {metadata.get(prefix + 'text_lora_alpha')!r}"
                                    + (f", e.g. {bad[0]}" if bad else "") + ")")
    return LearnedToken(check_token_string(metadata[f"{prefix}token"]), embedding, metadata[f"{prefix}init"],
                        {"hidden_size": hidden, "fingerprint": metadata[f"{prefix}text_encoder_fingerprint"]},
                        metadata.get(f"{prefix}base_model", ""), lora or None, alpha)


def save_learned_token(token: LearnedToken, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write a token file (module docstring), atomically."""
    metadata = {"format": TOKEN_FORMAT, "format_version": str(TOKEN_FORMAT_VERSION), **token_metadata(token)}
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    return atomic_save_safetensors(token_tensors(token), path, metadata)


def load_learned_token(path: str | os.PathLike) -> LearnedToken:
    """Read a token file; a clear error for a missing file, another format or a newer version."""
    tensors, metadata = read_safetensors(path, TOKEN_FORMAT, TOKEN_FORMAT_VERSION, "learned-token",
                                         "made by train.dreampaint --learn-token or the <background> token training")
    return token_from(tensors, metadata, where=str(path))
