"""DreamPainter weight files: control branch (stage 1) and LoRA (stage 2) in safetensors.

Layout of a file:

* tensors ``control.cond_embed.*``, ``control.blocks.<j>.*``, ``control.gates.<j>.*``
  (always), and ``lora.<peft key>`` (stage 2 only, peft's key names on the base
  transformer, e.g. ``lora.transformer_blocks.3.attn1.to_q.lora_A.weight``);
* string metadata: ``format`` = "dreampainter", ``format_version``, ``stage``,
  ``base_model``, the base geometry it was made for (``base_num_layers``,
  ``base_inner_dim``, ``base_in_channels``, ``base_patch_size``) and the DreamPainter
  config as JSON (``dreampainter_config``: block count, injection layers, LoRA rank,
  alpha and targets, reference RoPE scale, ...). The first few of those are also
  written as separate keys so that tools can read them without parsing JSON.

A stage-2 file carries its stage-1 branch, so users load one file.
Files are written atomically (temporary file in the same folder, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFilesError, WeightFormatError
from .fileio import atomic_path
from .transformer import DreamPainterConfig, DreamPainterTransformer

FORMAT_NAME = "dreampainter"
FORMAT_VERSION = 1
DEFAULT_BASE_MODEL = "CogView4-6B"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file so that a crash never leaves a half-written file at ``path``."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def base_geometry(base) -> dict[str, int]:
    """What a weight file records of the CogView4 base it was made for (diffusers' transformer)."""
    cfg = base.config
    return {
        "base_num_layers": int(cfg.num_layers),
        "base_inner_dim": int(cfg.num_attention_heads * cfg.attention_head_dim),
        "base_in_channels": int(cfg.in_channels),
        "base_patch_size": int(cfg.patch_size),
    }


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """16 hex digits of sha256 over the tensors' shapes and values rounded to bf16: the same weights
    give the same fingerprint whether they were loaded in bf16 or fp32 (both round alike), other
    weights of the same shape a different one."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprint(base) -> str:
    """The base transformer's fingerprint: its patch embedding and output head, which no DreamPainter
    file, LoRA or fp8 storage (blocks only) changes, and which differ between any two trainings."""
    return weights_fingerprint([base.patch_embed.proj.weight, base.proj_out.weight])


def dreampainter_tensors(model: DreamPainterTransformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    tensors = {f"control.{k}": v for k, v in model.control_state_dict().items()}
    tensors.update({f"lora.{k}": v for k, v in model.lora_state_dict().items()})
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return tensors


def save_dreampainter_weights(
    model: DreamPainterTransformer,
    path: str | os.PathLike,
    base_model: str = DEFAULT_BASE_MODEL,
    dtype: torch.dtype | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    if model.control is None:
        raise ValueError("this model has no control branch: there is nothing DreamPainter-specific to save")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "stage": "2" if model.has_lora else "1",
        "base_model": base_model,
        "dreampainter_config": model.config.to_json(),
        "control_blocks": str(model.config.control_blocks),
        "injection_layers": json.dumps(model.config.injection_layers),
        "lora_rank": str(model.config.lora_rank if model.has_lora else 0),
        "lora_targets": json.dumps(model.config.lora_targets if model.has_lora else []),
        "task": model.config.task,
    }
    metadata.update({k: str(v) for k, v in base_geometry(model.base).items()})
    if extra_metadata:
        metadata.update({k: str(v) for k, v in extra_metadata.items()})
    return atomic_save_safetensors(dreampainter_tensors(model, dtype), path, metadata)


def read_format_metadata(path: str | os.PathLike, format_name: str, max_version: int, kind: str, made_by: str,
                         other_file_hint: str = "") -> dict[str, str]:
    """Header metadata of one of the pack's safetensors formats (``format`` = format_name, a version up
    to max_version); a clear error naming ``kind`` and ``made_by`` (where such files come from) for a
    missing file, a pickle, a corrupt header, another format or a newer version."""
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"{kind} file not found: {path}. Expected a .safetensors file {made_by}.")
    if path.suffix != ".safetensors":
        raise WeightFormatError(f"{path}: {kind} files must be .safetensors files (pickle formats are refused).")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for truncated headers
        raise ModelFilesError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if metadata.get("format") != format_name:
        raise WeightFormatError(
            f"{path} is not a {kind} file (its metadata has no format={format_name}). {other_file_hint}".rstrip())
    version = int(metadata.get("format_version", "0"))
    if version > max_version:
        raise WeightFormatError(
            f"{path} uses {kind} format version {version}; this version of the pack reads up to "
            f"{max_version}. Update ComfyUI-DreamPainter."
        )
    return metadata


def read_safetensors(path: str | os.PathLike, format_name: str, max_version: int, kind: str,
                     made_by: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a small file of one of the pack's formats (read_format_metadata)."""
    metadata = read_format_metadata(path, format_name, max_version, kind, made_by)
    return read_tensors(path), metadata


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU (ModelFilesError for a truncated file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ModelFilesError(f"{path}: could not read tensors (truncated or corrupt file?): {exc}") from exc


def read_dreampainter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Header metadata of a DreamPainter file; raises a clear error for anything else."""
    metadata = read_format_metadata(
        path, FORMAT_NAME, FORMAT_VERSION, "DreamPainter weight",
        "made by `python -m train.stage1/stage2` (put it in ComfyUI/models/dreampainter/)",
        "It may be a base CogView4 transformer or another LoRA: load base models with the model loader and "
        "DreamPainter files (control branch + LoRA) as the DreamPainter weights.")
    if "dreampainter_config" not in metadata:
        raise WeightFormatError(f"{path}: metadata lacks dreampainter_config (file made by an unknown tool?)")
    return metadata


def config_from_metadata(metadata: dict[str, str]) -> DreamPainterConfig:
    return DreamPainterConfig.from_json(metadata["dreampainter_config"])


def check_base(path: Path, metadata: dict[str, str], base) -> None:
    """WeightFormatError unless the file's recorded base (geometry, and its fingerprint when the file
    has one) is the loaded base transformer's."""
    actual = base_geometry(base)
    wrong = {k: (metadata.get(k), v) for k, v in actual.items() if metadata.get(k) is not None and int(metadata[k]) != v}
    if not wrong and metadata.get("base_fingerprint") not in (None, base_fingerprint(base)):
        wrong = {"base_fingerprint": (metadata["base_fingerprint"], base_fingerprint(base))}
    if wrong:
        detail = ", ".join(f"{k}: file {f}, loaded base {b}" for k, (f, b) in wrong.items())
        raise WeightFormatError(
            f"{path} was made for another base model ({metadata.get('base_model', 'unknown')}) than the one "
            f"loaded ({detail}). Load it together with the base transformer it was trained on."
        )


def build_from_weights(base, path: str | os.PathLike, strict: bool = True) -> DreamPainterTransformer:
    """Build a DreamPainterTransformer around ``base`` and load a DreamPainter weight file into it."""
    path = Path(path)
    metadata = read_dreampainter_metadata(path)
    check_base(path, metadata, base)
    config = config_from_metadata(metadata)
    if metadata.get("stage") == "1":
        config.lora_rank = 0
    try:
        model = DreamPainterTransformer(base, config)
    except ValueError as exc:
        raise WeightFormatError(f"{path}: its DreamPainter config does not fit the loaded base model: {exc}") from exc
    load_dreampainter_weights(model, path, strict=strict, _metadata=metadata)
    return model


def load_dreampainter_weights(model: DreamPainterTransformer, path: str | os.PathLike, strict: bool = True, _metadata=None) -> None:
    """Load a file into an already built model whose layout must match the file's."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    metadata = _metadata or read_dreampainter_metadata(path)
    check_base(path, metadata, model.base)
    file_config = config_from_metadata(metadata)
    if file_config.control_blocks != model.config.control_blocks or list(file_config.injection_layers) != list(
        model.config.injection_layers
    ):
        raise WeightFormatError(
            f"{path} has {file_config.control_blocks} control blocks injected at {file_config.injection_layers}; "
            f"the model was built with {model.config.control_blocks} at {model.config.injection_layers}."
        )
    tensors = read_tensors(path)

    expected = {f"control.{k}": v for k, v in model.control_state_dict().items()}
    if metadata.get("stage") == "2":
        if not model.has_lora:
            raise WeightFormatError(f"{path} is a stage-2 file (LoRA) but the model was built without LoRA.")
        expected.update({f"lora.{k}": v for k, v in model.lora_state_dict().items()})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if strict and (missing or unexpected or wrong_shape):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong_shape:
            parts.append(f"wrong shapes: {wrong_shape[:3]}")
        raise WeightFormatError(f"{path} does not match the DreamPainter layout it declares: " + "; ".join(parts))

    device, dtype = model.device, model.dtype
    control = {k[len("control."):]: v.to(device=device, dtype=dtype) for k, v in tensors.items() if k.startswith("control.")}
    model.control.load_state_dict(control, strict=True)
    lora = {k[len("lora."):]: v.to(device=device, dtype=dtype) for k, v in tensors.items() if k.startswith("lora.")}
    if lora:
        result = set_peft_model_state_dict(model.base, lora, adapter_name="dreampainter")
        if getattr(result, "unexpected_keys", None):
            raise WeightFormatError(f"{path}: LoRA tensors did not match the model: {result.unexpected_keys[:3]}")

