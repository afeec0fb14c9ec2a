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

Reading is validated before anything is built, so that memory is bounded by what the file
really holds (a forged 1 MB file cannot make the loader build thousands of blocks):

1. ``read_dreampainter_file``, from the header alone (safetensors_io: bounded, typed): the
   metadata against a typed schema (integers that are integers, the config with known keys
   only and values in range: ``control_blocks`` <= the declared base layer count, LoRA rank
   <= the declared base width, at most ``MAX_LORA_TARGETS`` targets, ...), consistency of the
   duplicated keys, and dtypes (F32/BF16/F16: LoRA and gates are never stored in fp8).
2. Against the loaded base (``build_from_weights``, ``load_dreampainter_weights``): its geometry,
   the config's bounds on it (``DreamPainterConfig.resolved``; rank <= its width; targets that are
   Linear layers of its blocks), and the tensors the header declares, which must be exactly those
   the config implies, with their shapes.
3. Only then are tensors read (``check_finite`` refuses NaN/inf) and modules built.

Every problem is a ``WeightFormatError`` naming the file and the field (``ModelFilesError`` for a
missing or unreadable file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFilesError, WeightFormatError
from .fileio import atomic_path
from .loading import MAX_TRANSFORMER_LAYERS
from .rope import REFERENCE_LAYOUTS, REFERENCE_SCALES
from .safetensors_io import (
    LOADABLE_DTYPES,
    SafetensorsHeader,
    TensorInfo,
    dtype_problem,
    first_non_finite,
    non_finite_message,
    read_safetensors_header,
)
from .transformer import CONTROL_TASKS, REFERENCE_TIMESTEPS, DreamPainterConfig, DreamPainterTransformer

FORMAT_NAME = "dreampainter"
FORMAT_VERSION = 1
DEFAULT_BASE_MODEL = "CogView4-6B"
WHAT = "DreamPainter weights"

#: Bounds of the metadata schema (real files: a config of ~400 characters, 7 targets, rank <= 256).
MAX_JSON_FIELD_CHARS = 64 * 1024
MAX_LORA_TARGETS = 64
MAX_LORA_ALPHA = 65536.0
MAX_BASE_WIDTH = 65536  # CogView4-6B: 4096
_GEOMETRY_FIELDS = ("base_num_layers", "base_inner_dim", "base_in_channels", "base_patch_size")
_CONFIG_FIELDS = tuple(f.name for f in fields(DreamPainterConfig))
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,7}")
_DECIMAL = re.compile(r"[0-9]{1,12}")


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


@dataclass
class DreamPainterFile:
    """What a DreamPainter file declares, checked against the schema (not yet against a base)."""

    path: Path
    metadata: dict[str, str]
    stage: int  # 1: control branch; 2: + LoRA
    config: DreamPainterConfig  # as stored (lora_rank 0 for stage 1), not resolved
    geometry: dict[str, int]  # the base_* fields present
    tensors: dict[str, TensorInfo]


def _bad(path: Path, field: str, detail: str) -> WeightFormatError:
    return WeightFormatError(
        f"{path}: metadata field '{field}' {detail}. The file is corrupt, forged or not made by this pack: "
        "re-export it with its training code (python -m train.stage1 / train.stage2) or re-download it.")


def _int_text(path: Path, metadata: dict[str, str], field: str, lo: int, hi: int) -> int | None:
    text = metadata.get(field)
    if text is None:
        return None
    if not _DECIMAL.fullmatch(text):
        raise _bad(path, field, f"is {text[:40]!r}, not a whole number")
    value = int(text)
    if not lo <= value <= hi:
        raise _bad(path, field, f"is {value}; expected {lo}..{hi}")
    return value


def _json_text(path: Path, field: str, text: str):
    if len(text) > MAX_JSON_FIELD_CHARS:
        raise _bad(path, field, f"is {len(text)} characters long; at most {MAX_JSON_FIELD_CHARS} are read")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise _bad(path, field, f"is not valid JSON ({str(exc)[:120]})") from exc


def _int_value(path: Path, field: str, value, lo: int, hi: int) -> int:
    if type(value) is not int:  # noqa: E721 - True is not a block count
        raise _bad(path, field, f"is {json.dumps(value)[:40]}, not a whole number")
    if not lo <= value <= hi:
        raise _bad(path, field, f"is {value}; expected {lo}..{hi}")
    return value


def _index_list(path: Path, field: str, value, count: int, layers: int) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count:
        raise _bad(path, field, f"is {json.dumps(value)[:60]}; expected a list of {count} block indices "
                                "(one per control block)")
    return [_int_value(path, f"{field}[{i}]", v, 0, layers - 1) for i, v in enumerate(value)]


def _parse_config(path: Path, text: str, stage: int, max_layers: int, max_width: int) -> DreamPainterConfig:
    """The ``dreampainter_config`` JSON as a DreamPainterConfig whose every value has the right type and
    lies within what the declared base allows."""
    raw = _json_text(path, "dreampainter_config", text)
    if not isinstance(raw, dict):
        raise _bad(path, "dreampainter_config", "is not a JSON object")
    unknown = sorted(set(raw) - set(_CONFIG_FIELDS))
    if unknown:
        raise _bad(path, "dreampainter_config", f"has unknown keys {[k[:40] for k in unknown[:5]]} (known: "
                                               f"{', '.join(_CONFIG_FIELDS)}); a newer pack may read it")
    defaults = DreamPainterConfig()
    f = "dreampainter_config."
    blocks = _int_value(path, f + "control_blocks", raw.get("control_blocks", defaults.control_blocks), 1, max_layers)
    rank = _int_value(path, f + "lora_rank", raw.get("lora_rank", defaults.lora_rank), 0, max_width)
    alpha = raw.get("lora_alpha")
    if alpha is not None and (type(alpha) not in (int, float) or not math.isfinite(alpha)
                              or not 0 < alpha <= MAX_LORA_ALPHA):
        raise _bad(path, f + "lora_alpha", f"is {json.dumps(alpha)[:40]}; expected null or a number in "
                                           f"(0, {MAX_LORA_ALPHA:g}]")
    targets = raw.get("lora_targets", list(defaults.lora_targets))
    if (not isinstance(targets, list) or not 1 <= len(targets) <= MAX_LORA_TARGETS
            or not all(isinstance(t, str) and len(t) <= 100 and _MODULE_PATH.fullmatch(t) for t in targets)):
        raise _bad(path, f + "lora_targets", f"is {json.dumps(targets)[:80]}; expected a list of 1..{MAX_LORA_TARGETS} "
                                             "module names inside a block, like \"attn1.to_q\"")
    choices = {"reference_scale": REFERENCE_SCALES, "reference_timestep": REFERENCE_TIMESTEPS,
               "reference_layout": REFERENCE_LAYOUTS, "task": CONTROL_TASKS}
    for name, allowed in choices.items():
        value = raw.get(name, getattr(defaults, name))
        if value not in allowed:
            raise _bad(path, f + name, f"is {json.dumps(value)[:40]}; expected one of {list(allowed)}")
    return DreamPainterConfig(
        control_blocks=blocks,
        injection_layers=_index_list(path, f + "injection_layers", raw.get("injection_layers"), blocks, max_layers),
        init_from=_index_list(path, f + "init_from", raw.get("init_from"), blocks, max_layers),
        lora_rank=rank if stage == 2 else 0,
        lora_alpha=None if alpha is None else float(alpha),
        lora_targets=list(targets),
        reference_scale=raw.get("reference_scale", defaults.reference_scale),
        reference_timestep=raw.get("reference_timestep", defaults.reference_timestep),
        reference_layout=raw.get("reference_layout", defaults.reference_layout),
        task=raw.get("task", defaults.task),
    )


def _check_duplicates(path: Path, metadata: dict[str, str], config: DreamPainterConfig, stage: int) -> None:
    """The keys written next to the config for other tools must say the same as the config."""
    if "task" in metadata and metadata["task"] != config.task:
        raise _bad(path, "task", f"is {metadata['task'][:40]!r} but dreampainter_config says {config.task!r}")
    copies = {"control_blocks": config.control_blocks, "lora_rank": config.lora_rank}
    if config.injection_layers is not None:
        copies["injection_layers"] = config.injection_layers
    if stage == 2:
        copies["lora_targets"] = config.lora_targets
    for field, value in copies.items():
        if field in metadata and _json_text(path, field, metadata[field]) != value:
            raise _bad(path, field, f"is {metadata[field][:60]!r} but dreampainter_config says {json.dumps(value)[:60]}")


def read_format_header(path: str | os.PathLike, format_name: str, max_version: int, kind: str, made_by: str,
                       other_file_hint: str = "") -> SafetensorsHeader:
    """Header (metadata, tensor names, dtypes, shapes; no tensor data) of a file of one of the pack's
    safetensors formats (``format`` = format_name, a version up to max_version), read within
    safetensors_io's bounds; a clear error naming ``kind`` and ``made_by`` (where such files come from)
    for a missing file, a pickle, a corrupt header, another format, a newer version or a dtype the
    pack cannot run."""
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"{kind} file not found: {path}. Expected a .safetensors file {made_by}.")
    if path.suffix != ".safetensors":
        raise WeightFormatError(f"{path}: {kind} files must be .safetensors files (pickle formats are refused).")
    header = read_safetensors_header(path, f"{kind} file")
    metadata = header.metadata
    if metadata.get("format") != format_name:
        raise WeightFormatError(
            f"{path} is not a {kind} file (its metadata has no format={format_name}). {other_file_hint}".rstrip())
    version = _int_text(path, metadata, "format_version", 1, 10**6)
    if version is None:
        raise _bad(path, "format_version", "is missing")
    if version > max_version:
        raise WeightFormatError(
            f"{path} uses {kind} format version {version}; this version of the pack reads up to "
            f"{max_version}. Update ComfyUI-DreamPainter.")
    problem = dtype_problem(header.tensors, LOADABLE_DTYPES)
    if problem:
        raise WeightFormatError(f"{path}: {problem}. (The pack's own files are never stored in fp8.)")
    return header


def read_tensors(path: str | os.PathLike, names: Iterable[str] | None = None, check_finite: bool = False,
                 what: str = WHAT) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (``names``, default all), on the CPU; ModelFilesError for a
    truncated file, and with ``check_finite`` WeightFormatError for NaN/inf values."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in (f.keys() if names is None else names)}
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ModelFilesError(f"{path}: could not read tensors (truncated or corrupt file?): {exc}") from exc
    if check_finite and (bad := first_non_finite(tensors.items())) is not None:
        raise WeightFormatError(non_finite_message(what, path, bad))
    return tensors


def read_safetensors(path: str | os.PathLike, format_name: str, max_version: int, kind: str,
                     made_by: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a small file of one of the pack's formats (read_format_header),
    its tensors checked for NaN/inf."""
    header = read_format_header(path, format_name, max_version, kind, made_by)
    return read_tensors(path, check_finite=True, what=f"{kind} file"), header.metadata


def read_dreampainter_file(path: str | os.PathLike) -> DreamPainterFile:
    """Header and metadata of a DreamPainter file, checked against the schema; reads no tensor data."""
    path = Path(path)
    header = read_format_header(
        path, FORMAT_NAME, FORMAT_VERSION, "DreamPainter weight",
        "made by `python -m train.stage1/stage2` (put it in ComfyUI/models/dreampainter/)",
        "It may be a base CogView4 transformer or another LoRA: load base models with the model loader and "
        "DreamPainter files (control branch + LoRA) as the DreamPainter weights.")
    metadata = header.metadata
    stage = _int_text(path, metadata, "stage", 1, 2)
    if stage is None:
        raise _bad(path, "stage", "is missing")
    geometry = {k: v for k in _GEOMETRY_FIELDS if (v := _int_text(path, metadata, k, 1, MAX_BASE_WIDTH)) is not None}
    if "dreampainter_config" not in metadata:
        raise WeightFormatError(f"{path}: metadata lacks dreampainter_config (file made by an unknown tool?)")
    max_layers = min(geometry.get("base_num_layers", MAX_TRANSFORMER_LAYERS), MAX_TRANSFORMER_LAYERS)
    config = _parse_config(path, metadata["dreampainter_config"], stage, max_layers,
                           geometry.get("base_inner_dim", MAX_BASE_WIDTH))
    _check_duplicates(path, metadata, config, stage)
    return DreamPainterFile(path, metadata, stage, config, geometry, header.tensors)


def read_dreampainter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Header metadata of a DreamPainter file, after the checks of ``read_dreampainter_file``."""
    return read_dreampainter_file(path).metadata


def check_base(path: Path, metadata: dict[str, str], base) -> None:
    """WeightFormatError unless the base a file records (its geometry, and its fingerprint when the
    file has one) is the loaded base transformer's."""
    actual = base_geometry(base)
    wrong = {}
    for k, v in actual.items():
        text = metadata.get(k)
        if text is not None and (not _DECIMAL.fullmatch(text) or int(text) != v):
            wrong[k] = (text[:20], v)
    if not wrong and metadata.get("base_fingerprint") not in (None, base_fingerprint(base)):
        wrong = {"base_fingerprint": (metadata["base_fingerprint"][:20], base_fingerprint(base))}
    if wrong:
        detail = ", ".join(f"{k}: file {f}, loaded base {b}" for k, (f, b) in wrong.items())
        raise WeightFormatError(
            f"{path} was made for another base model ({metadata.get('base_model', 'unknown')[:100]}) than "
            f"the one loaded ({detail}). Load it together with the base transformer it was trained on."
        )


def _fit_to_base(info: DreamPainterFile, base) -> DreamPainterConfig:
    """The file's config resolved on ``base``; refuses a file made for another base, or a config
    that does not fit this one (nothing is built yet)."""
    cfg = base.config
    inner = int(cfg.num_attention_heads * cfg.attention_head_dim)
    check_base(info.path, info.metadata, base)
    if info.config.control_blocks > cfg.num_layers:  # each control block is a copy of a base block
        raise _bad(info.path, "dreampainter_config.control_blocks", f"is {info.config.control_blocks}; expected "
                                                                    f"1..{cfg.num_layers} (the loaded base's block count)")
    try:
        config = info.config.resolved(int(cfg.num_layers))
    except ValueError as exc:
        raise WeightFormatError(f"{info.path}: its DreamPainter config does not fit the loaded base model: {exc}") from exc
    if config.lora_rank > inner:
        raise _bad(info.path, "dreampainter_config.lora_rank", f"is {config.lora_rank}; expected at most the base "
                                                               f"width {inner}")
    if config.lora_rank:
        for target in config.lora_targets:
            if _target_linear(base.transformer_blocks[0], target) is None:
                raise _bad(info.path, "dreampainter_config.lora_targets", f"names {target!r}, which is not a Linear "
                                                                          "layer of the base model's blocks")
    return config


def _target_linear(block: nn.Module, target: str) -> nn.Linear | None:
    """The Linear layer a LoRA target names inside a block (under peft's wrapper once LoRA is in), else None."""
    try:
        module = block.get_submodule(target)
    except AttributeError:
        return None
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    return module if isinstance(module, nn.Linear) else None


def expected_tensor_shapes(base, config: DreamPainterConfig, with_lora: bool) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) of a file for ``config`` (resolved) on ``base``, computed from the
    base's shapes without building anything."""
    cfg = base.config
    inner = int(cfg.num_attention_heads * cfg.attention_head_dim)
    shapes = {"control.cond_embed.weight": (inner, (cfg.in_channels + 1) * cfg.patch_size**2),
              "control.cond_embed.bias": (inner,)}
    for j, i in enumerate(config.init_from):
        for k, v in base.transformer_blocks[i].state_dict().items():
            shapes[f"control.blocks.{j}.{k}"] = tuple(v.shape)
    for j in range(config.control_blocks):
        shapes[f"control.gates.{j}.weight"] = (inner, inner)
        shapes[f"control.gates.{j}.bias"] = (inner,)
    if with_lora:
        for i, block in enumerate(base.transformer_blocks):
            for target in config.lora_targets:
                linear = _target_linear(block, target)
                shapes[f"lora.transformer_blocks.{i}.{target}.lora_A.weight"] = (config.lora_rank, linear.in_features)
                shapes[f"lora.transformer_blocks.{i}.{target}.lora_B.weight"] = (linear.out_features, config.lora_rank)
    return shapes


def _check_tensors(info: DreamPainterFile, expected: dict[str, tuple], strict: bool) -> list[str]:
    """The names to read: those the layout expects; refuses missing and wrong-shaped tensors (and,
    when ``strict``, unexpected ones)."""
    missing = sorted(set(expected) - set(info.tensors))
    unexpected = sorted(set(info.tensors) - set(expected)) if strict else []
    wrong_shape = [f"{k}: file {info.tensors[k].shape}, expected {tuple(v)}"
                   for k, v in expected.items() if k in info.tensors and info.tensors[k].shape != tuple(v)]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {[k[:100] for k in unexpected[:3]]})")
        if wrong_shape:
            parts.append(f"wrong shapes: {wrong_shape[:3]}")
        raise WeightFormatError(f"{info.path} does not match the DreamPainter layout it declares: " + "; ".join(parts))
    return list(expected)


def _assign(model: DreamPainterTransformer, info: DreamPainterFile, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    device, dtype = model.device, model.dtype
    control = {k[len("control."):]: v.to(device=device, dtype=dtype) for k, v in tensors.items() if k.startswith("control.")}
    model.control.load_state_dict(control, strict=True)
    lora = {k[len("lora."):]: v.to(device=device, dtype=dtype) for k, v in tensors.items() if k.startswith("lora.")}
    if lora:
        result = set_peft_model_state_dict(model.base, lora, adapter_name="dreampainter")
        if getattr(result, "unexpected_keys", None):
            raise WeightFormatError(f"{info.path}: LoRA tensors did not match the model: {result.unexpected_keys[:3]}")


def build_from_weights(base, path: str | os.PathLike, strict: bool = True,
                       check_finite: bool = False) -> DreamPainterTransformer:
    """Build a DreamPainterTransformer around ``base`` and load a DreamPainter weight file into it.

    Everything the file declares is checked (and, with ``check_finite``, its tensors read and checked
    for NaN/inf) before the control branch and LoRA are built. ``strict=False`` ignores tensors the
    layout does not use."""
    info = read_dreampainter_file(path)
    config = _fit_to_base(info, base)
    names = _check_tensors(info, expected_tensor_shapes(base, config, with_lora=info.stage == 2), strict)
    tensors = read_tensors(info.path, names, check_finite)
    try:
        model = DreamPainterTransformer(base, config)
    except ValueError as exc:
        raise WeightFormatError(f"{info.path}: its DreamPainter config does not fit the loaded base model: {exc}") from exc
    _assign(model, info, tensors)
    return model


def load_dreampainter_weights(model: DreamPainterTransformer, path: str | os.PathLike, strict: bool = True,
                              check_finite: bool = False) -> None:
    """Load a file into an already built model whose layout must match the file's."""
    info = read_dreampainter_file(path)
    config = _fit_to_base(info, model.base)
    if config.control_blocks != model.config.control_blocks or list(config.injection_layers) != list(
        model.config.injection_layers
    ):
        raise WeightFormatError(
            f"{info.path} has {config.control_blocks} control blocks injected at {config.injection_layers}; "
            f"the model was built with {model.config.control_blocks} at {model.config.injection_layers}."
        )
    if info.stage == 2 and not model.has_lora:
        raise WeightFormatError(f"{info.path} is a stage-2 file (LoRA) but the model was built without LoRA.")
    expected = {f"control.{k}": tuple(v.shape) for k, v in model.control_state_dict().items()}
    if info.stage == 2:
        expected.update({f"lora.{k}": tuple(v.shape) for k, v in model.lora_state_dict().items()})
    _assign(model, info, read_tensors(info.path, _check_tensors(info, expected, strict), check_finite))
