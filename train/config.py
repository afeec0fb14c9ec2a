"""Training configuration: typed sections, paper defaults, TOML/YAML files, CLI overrides.

    cfg = load_config(stage=1, path="configs/stage1.toml", overrides=["optim.lr=1e-4", "train.batch_size=2"])

A config file has one table per section (``[model]``, ``[data]``, ``[train]``, ``[optim]``,
``[ema]``, ``[cache]``, ``[checkpoint]``, ``[validation]``, ``[log]``, ``[distributed]``) and
optionally a top-level ``stage = 1|2`` that must match the command. Anything left out keeps
its default; the defaults are the paper's section 5.1 where the paper gives a value:

* stage 1: 6 control blocks (evenly spaced injection), constant learning rate 4e-5,
  800x800 and 1024x1024 training images (aspect-ratio buckets around those areas);
* stage 2: LoRA rank 256 on all linear layers of the base DiT blocks, cosine schedule
  peaking at 8e-5 (after a linear warmup), reference used in 50% of samples, references
  randomly resized/cropped to 512x512 or 800x800 and randomly shifted.

Everything else (batch size, step counts, warmup length, betas, weight decay, gradient
clipping, timestep sampling) the paper does not state; the defaults here are ordinary
choices and are marked "(ours)" in the field comments.

Command-line overrides are ``section.key=value``. The value is parsed by the field's declared
type: ``bool`` (true/false/1/0/yes/no/on/off), ``int``, ``float``, ``str`` (as given), and
lists (a JSON/TOML inline array such as ``[800,1024]``, or comma-separated ``800,1024``;
``[]`` for empty). Unknown sections or keys are errors that list the valid names, in files
as well as on the command line, so a typo never passes silently.

Relative paths in a config are taken relative to the current working directory (run the
commands from the repository root, as the examples in ``configs/`` assume).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreampainter_core.errors import DreamPainterError
from dreampainter_core.rope import REFERENCE_LAYOUTS
from dreampainter_core.transformer import DEFAULT_LORA_TARGETS, REFERENCE_TIMESTEPS

from .buckets import DEFAULT_RATIOS

__all__ = ["ConfigError", "Config", "default_config", "load_config", "apply_overrides", "config_to_dict", "dump_toml",
           "read_table", "explicit_values", "override_tables",
           "claim_run_dir"]


class ConfigError(DreamPainterError, ValueError):
    """A config file or override is malformed, unknown or inconsistent."""


@dataclass
class ModelConfig:
    base: str = ""  # CogView4 diffusers folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/)
    transformer_path: str = ""  # optional single-file overrides of the parts of `base`
    vae_path: str = ""
    text_encoder_path: str = ""
    tokenizer_path: str = ""
    base_model_name: str = "CogView4-6B"  # written into the exported file's metadata
    dtype: str = "bf16"  # storage dtype of the frozen weights (bf16 | fp32)
    trainable_dtype: str = "fp32"  # master copy of the trained parameters (fp32 | bf16)
    text_encoder_device: str = ""  # "" = the training device; "cpu" keeps GLM-4-9B off the GPU
    # stage 1 (the paper: a 6-block branch initialised from base blocks, zero-initialised gates)
    control_blocks: int = 6
    injection_layers: list[int] = field(default_factory=list)  # [] = evenly spaced over the base blocks
    init_from: list[int] = field(default_factory=list)  # [] = the first control_blocks base blocks
    # stage 2
    stage1_weights: str = ""  # the stage-1 DreamPainter file stage 2 starts from
    lora_rank: int = 256
    lora_alpha: float = 0.0  # 0 = rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # How the reference enters the blocks (stored in the exported file): its timestep modulation
    # ("same-as-target", or "clean" = t 0 as OminiControl) and its RoPE place ("diagonal", the
    # paper's, or "beside": same rows). A stage-2 file given as stage1_weights keeps its own.
    reference_timestep: str = "same-as-target"
    reference_layout: str = "diagonal"


@dataclass
class DataConfig:
    manifest: str = ""  # JSONL manifest (python -m train.data check MANIFEST validates it)
    base_sizes: list[int] = field(default_factory=lambda: [800, 1024])  # bucket areas (paper: 800^2, 1024^2)
    ratios: list[str] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    bucket_step: int = 32  # bucket sides divisible by this (VAE 8 x patch 2 x 2)
    max_pixels: int = 0  # 0 = no cap on bucket area
    on_bad: str = "skip"  # skip (warn, count, serve the next sample) | stop (raise naming the line)
    reference_prob: float = 0.0  # stage 2 default 0.5 (paper: reference used in 50% of samples)
    reference_sizes: list[int] = field(default_factory=lambda: [512, 800])  # paper: 512x512, 800x800
    reference_shift: float = 0.1  # random spatial shift, fraction of the side (ours: the paper gives none)
    # The reference's random square crop covers this range of the image's largest centred square's
    # area, so it never lines up with the target and the model takes its look, not its pixels.
    # [1, 1] with reference_shift 0: the whole background, aligned (references that are the target's own).
    reference_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    second_prompt_prob: float = 0.5  # use prompt_2 (second language) when a sample has one
    empty_prompt_prob: float = 0.0  # replace the prompt by "" (text dropout; paper silent, off)
    num_workers: int = 2  # DataLoader workers per process (0 = load in the main process)
    # stage 1: what the control branch learns to keep. "product" (the paper: keep the product, paint
    # the background) or "insertion" (DreamPaint's inpainting module: keep the scene, paint a product
    # into a hole drawn over it; train.insertion_masks). Stored in the exported file as its task.
    mask_policy: str = "product"


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 1  # per process (ours)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 20000  # optimizer steps; sets the LR schedule's length (ours)
    stop_after: int = 0  # stop (checkpoint + export) once this step is reached; 0 = max_steps
    mixed_precision: str = "bf16"  # bf16 (autocast) | no
    gradient_checkpointing: bool = True
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform: the sampler-space time s in (0, 1)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mu: str = "dynamic"  # time shift: "dynamic" = CogView4's mu for the image's token count, or a number
    # Move this share of the times into [high_noise_from, 1) (ours; 0 = off): a condition that only
    # decides what is unreadable from x_t near pure noise (a reference's colours on a small latent)
    # is otherwise trained too rarely. See train/flow.py into_high_noise.
    high_noise_prob: float = 0.0
    high_noise_from: float = 0.8
    fixed_batch: bool = False  # overfit: reuse the first global batch every step (debugging, tests)
    # Loss weight inside the product: per latent pixel 1 + (w - 1) * Z_m (the mask on the latent grid,
    # soft at edges; with data.mask_policy=insertion the hole, 1 - Z_m), normalised to mean 1 per sample;
    # 1 = plain MSE (ours; the paper gives none)
    mask_loss_weight: float = 1.0
    # Stage 2 (ours): the product's tokens (any product pixel; those the control's Z_m covers) do not
    # attend to the reference, as ReferenceOptions.shield_product samples. Off = every target token sees
    # it, which is what sampling unshielded does; train as the model will be sampled.
    shield_product: bool = False
    device: str = "auto"  # auto = cuda:LOCAL_RANK when CUDA is available, else cpu
    # A step whose loss or gradient is NaN or infinite is never applied (no optimizer or EMA update).
    # stop: max_nonfinite_steps of them in a row stop the run with an error (the checkpoints stay
    # those of finite weights) | skip: skip every such step and go on (counted and reported)
    on_nonfinite: str = "stop"
    max_nonfinite_steps: int = 3


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    lr: float = 4e-5  # paper: stage 1 4e-5 constant, stage 2 peak 8e-5 cosine
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01  # (ours)
    max_grad_norm: float = 1.0  # 0 = no clipping (ours)
    scheduler: str = "constant"  # constant | cosine (both after `warmup_steps` of linear warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = True  # effective decay min(decay, (1 + n) / (10 + n)) over the first updates
    export: bool = True  # the exported file holds the EMA weights (the raw ones go to *-raw.safetensors)


@dataclass
class CacheConfig:
    enabled: bool = False  # cache VAE latents and text embeddings; the text encoder is then unloaded
    dir: str = ""  # "" = <output_dir>/cache


@dataclass
class CheckpointConfig:
    output_dir: str = "runs/dreampainter"
    every: int = 1000  # steps between checkpoints (0 = only at the end)
    keep_last: int = 3
    resume: str = "auto"  # auto = latest checkpoint in output_dir if any | none | a checkpoint folder
    export_name: str = ""  # "" = dreampainter_stage<N>.safetensors in output_dir
    export_dtype: str = "bf16"  # dtype of the exported DreamPainter file (bf16 | fp32)
    export_every_checkpoint: bool = False  # also export a weight file into every checkpoint


@dataclass
class ValidationConfig:
    every: int = 1000  # steps between validation grids (0 = off)
    at_start: bool = False  # also render before the first step (the untrained baseline)
    manifest: str = ""  # "" = the training manifest
    num: int = 4  # the first `num` samples of that manifest: fixed products/prompts/references
    steps: int = 28
    guidance_scale: float = 3.5
    negative_prompt: str = ""
    seed: int = 0
    reference_size: int = 512
    lora_scale: float = 1.0
    cell: int = 256  # grid cell size in pixels
    probe_batches: int = 1  # fixed-noise loss on the first batches, logged with each validation


@dataclass
class LogConfig:
    every: int = 10  # steps between log lines / CSV rows
    tensorboard: bool = True  # used when installed; a CSV is written always
    progress: bool = True  # tqdm bar when installed (plain lines otherwise)


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp (shards the base blocks; see train/README.md)
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    shard_control: bool = False  # fsdp: also shard the control-branch blocks
    timeout_minutes: int = 30


@dataclass
class Config:
    stage: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "stage")

CHOICES = {
    ("model", "dtype"): ("bf16", "fp32"),
    ("model", "trainable_dtype"): ("fp32", "bf16"),
    ("model", "reference_timestep"): REFERENCE_TIMESTEPS,
    ("model", "reference_layout"): REFERENCE_LAYOUTS,
    ("data", "on_bad"): ("skip", "stop"),
    ("data", "mask_policy"): ("product", "insertion"),
    ("train", "mixed_precision"): ("bf16", "no"),
    ("train", "timestep_sampling"): ("logit_normal", "uniform"),
    ("train", "on_nonfinite"): ("stop", "skip"),
    ("optim", "optimizer"): ("adamw", "adamw8bit"),
    ("optim", "scheduler"): ("constant", "cosine"),
    ("checkpoint", "export_dtype"): ("bf16", "fp32"),
    ("distributed", "strategy"): ("ddp", "fsdp"),
    ("distributed", "backend"): ("auto", "nccl", "gloo"),
}


def default_config(stage: int) -> Config:
    """The paper's section 5.1 defaults for a stage (see the module docstring)."""
    if stage not in (1, 2):
        raise ConfigError(f"stage must be 1 or 2, got {stage!r}")
    cfg = Config(stage=stage)
    if stage == 1:
        cfg.optim.lr = 4e-5
        cfg.optim.scheduler = "constant"
        cfg.data.reference_prob = 0.0
        cfg.checkpoint.output_dir = "runs/stage1"
    else:
        cfg.optim.lr = 8e-5
        cfg.optim.scheduler = "cosine"
        cfg.optim.warmup_steps = 500  # (ours: the paper gives the peak and the shape only)
        cfg.train.max_steps = 10000
        cfg.data.reference_prob = 0.5
        cfg.checkpoint.output_dir = "runs/stage2"
    return cfg


# ---------------------------------------------------------------------------------------
# typing helpers


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _optional(tp):
    """X for a field typed ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _coerce(value: Any, tp, where: str) -> Any:
    """Check/convert a value from a file (already parsed) to the field's type."""
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (elem,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(elem)}, got {value!r}")
        return [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 4e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. train.mu = 1.2 in a file
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp!r}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_scalar(text: str, tp, where: str) -> Any:
    text = text.strip()
    if tp is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{where}: expected true/false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    if tp is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return text[1:-1]
        return text
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _parse_value(text: str, tp, where: str) -> Any:
    """Parse a command-line value by the field's declared type."""
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        s = text.strip()
        if s.startswith("["):
            parsed = None
            for loader in (json.loads, lambda t: tomllib.loads(f"v = {t}")["v"]):
                try:
                    parsed = loader(s)
                    break
                except Exception:
                    continue
            if parsed is None:
                raise ConfigError(f"{where}: cannot parse {text!r} as a list (write e.g. [1,2] or 1,2)")
            return _coerce(parsed, tp, where)
        if not s:
            return []
        return [_parse_scalar(part, elem, f"{where}[{i}]") for i, part in enumerate(s.split(","))]
    return _parse_scalar(text, tp, where)


def _check_key(section: str, key: str) -> tuple[Any, Any]:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}; sections: {', '.join(SECTIONS)}")
    cls = type(getattr(Config(), section))
    hints = _hints(cls)
    if key not in hints:
        raise ConfigError(f"unknown key {section}.{key}; keys of [{section}]: {', '.join(hints)}")
    return cls, hints[key]


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _check_choice(section: str, key: str, value: Any, choices: dict = CHOICES) -> None:
    allowed = choices.get((section, key))
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{_dotted(section, key)} must be one of {', '.join(allowed)}; got {value!r}")


def _typed_values(cls, values: Any, section: str, source: str, choices: dict = CHOICES) -> dict[str, Any]:
    """One table's values checked and converted by the declared field types of dataclass `cls`
    (and `choices`, keyed (section, key)): an unknown key, a wrong type or a value outside its
    choices is a ConfigError that names the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{section}] must be a table of keys")
    hints = _hints(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            where = f"keys of [{section}]" if section else "top-level keys"
            raise ConfigError(f"{source}: unknown key {_dotted(section, key)}; {where}: {', '.join(hints)}")
        if dataclasses.is_dataclass(hints[key]):  # a sub-table: read_table reads it
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{_dotted(section, key)}] must be a table of keys")
            out[key] = value
            continue
        out[key] = _coerce(value, hints[key], f"{source}: {_dotted(section, key)}")
        _check_choice(section, key, out[key], choices)
    return out


# ---------------------------------------------------------------------------------------
# files and overrides


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use TOML") from None
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: config files must be .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: cannot parse ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected tables/mappings at the top level")
    return data


def merge_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> Config:
    for section, values in data.items():
        if section == "stage":
            if values != cfg.stage:
                raise ConfigError(f"{source} is a stage-{values} config, but this is the stage-{cfg.stage} command")
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]; sections: {', '.join(SECTIONS)}")
        target = getattr(cfg, section)
        for key, value in _typed_values(type(target), values, section, source).items():
            setattr(target, key, value)
    return cfg


def read_table(cls, values: Any, source: str, section: str = "", choices: dict = CHOICES):
    """Dataclass `cls` from a parsed file's table, checked as config files are (unknown keys, types,
    `choices`). Fields that are dataclasses are read from sub-tables (``[section.key]``); a field
    without a default must be given. The keys the table set are kept for explicit_values."""
    kwargs = _typed_values(cls, values, section, source, choices)
    hints = _hints(cls)
    for key, value in kwargs.items():
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = read_table(hints[key], values[key], source, _dotted(section, key), choices)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        what = [f"[{_dotted(section, k)}]" if dataclasses.is_dataclass(hints[k]) else _dotted(section, k) for k in missing]
        raise ConfigError(f"{source}: missing {', '.join(what)}")
    obj = cls(**kwargs)
    obj._given = frozenset(values)
    return obj


def explicit_values(obj) -> dict[str, Any]:
    """A dataclass's fields that its table set (read_table) or that differ from their defaults,
    sub-tables likewise: the settings as written, typed (a new field whose default keeps the old
    behaviour leaves this unchanged)."""
    given = getattr(obj, "_given", frozenset())
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = explicit_values(value)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if f.name in given or default is dataclasses.MISSING or value != default:
            out[f.name] = value
    return out


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write section.key=value (e.g. optim.lr=1e-4)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: the key must be section.key (e.g. train.batch_size)")
        section, key = parts
        _, tp = _check_key(section, key)
        value = _parse_value(text, tp, f"override {dotted}")
        _check_choice(section, key, value)
        setattr(getattr(cfg, section), key, value)
    return cfg


def override_tables(tables: dict, item: str, flag: str = "--set", create: bool = False) -> None:
    """Apply one ``section.key=value`` (value in TOML syntax; a bare word is a string) to a config
    file's parsed tables, in place, before they are read (read_table checks the result like the file):
    how a run varies one setting without copying its file. ``create``: a missing table is made (its
    other keys keep their defaults); else it is an error."""
    dotted, sep, text = item.partition("=")
    parts = dotted.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"{flag} {item!r}: write section.key=value (e.g. vae.steps=3000) or key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    table = tables
    for part in parts[:-1]:
        if create and part not in table:
            table[part] = {}
        if not isinstance(table.get(part), dict):
            raise ConfigError(f"{flag} {item!r}: the file has no table [{'.'.join(parts[:-1])}]")
        table = table[part]
    table[parts[-1]] = value


def _differing(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two JSON records."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix or "value"] if old != new else []
    return [d for k in sorted(set(old) | set(new))
            for d in _differing(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)]


def claim_run_dir(run_dir: str | Path, record: dict, what: str, write: bool = True) -> None:
    """A run folder resumes only the run it was made for: ``record`` (JSON: the settings and inputs
    that decide the result) is kept in ``run_dir/run_settings.json``; a folder holding another
    record is refused (ConfigError naming the differing keys) instead of mixing two runs. ``write``
    False: only check (the other ranks of a distributed run)."""
    from dreampainter_core.fileio import atomic_write_text

    run_dir = Path(run_dir)
    path = run_dir / "run_settings.json"
    record = json.loads(json.dumps(record))  # what the file will hold (tuples -> lists)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != record:
            raise ConfigError(f"{run_dir} holds a {what} run with other settings ({', '.join(_differing(old, record))}): "
                              "give another run folder, or delete it to start afresh")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def validate(cfg: Config) -> Config:
    """Cross-field checks (single fields are checked when set)."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    problems = []
    for name, v, lo in (("train.batch_size", t.batch_size, 1), ("train.grad_accum", t.grad_accum, 1),
                        ("train.max_steps", t.max_steps, 1), ("checkpoint.keep_last", cfg.checkpoint.keep_last, 1),
                        ("log.every", cfg.log.every, 1), ("train.max_nonfinite_steps", t.max_nonfinite_steps, 1)):
        if v < lo:
            problems.append(f"{name} must be >= {lo}, got {v}")
    for section in SECTIONS:  # nan/inf parse as numbers; no setting means anything with them
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            v = getattr(values, f.name)
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, float) and not math.isfinite(x):
                    problems.append(f"{section}.{f.name} must be a finite number, got {v}")
                    break
    if not 0.0 <= d.reference_prob <= 1.0:
        problems.append(f"data.reference_prob must be in [0, 1], got {d.reference_prob}")
    crop = d.reference_crop_scale
    if len(crop) != 2 or not all(isinstance(x, (int, float)) for x in crop) or not 0.0 < crop[0] <= crop[1] <= 1.0:
        problems.append(f"data.reference_crop_scale must be [low, high] with 0 < low <= high <= 1 (shares of the "
                        f"image's area the reference crop covers; [1, 1] = no crop), got {crop}")
    if not 0.0 <= t.high_noise_prob <= 1.0:
        problems.append(f"train.high_noise_prob must be in [0, 1], got {t.high_noise_prob}")
    if not 0.0 <= t.high_noise_from < 1.0:
        problems.append(f"train.high_noise_from must be in [0, 1), got {t.high_noise_from}")
    if t.mask_loss_weight <= 0:
        problems.append(f"train.mask_loss_weight must be > 0 (1 = plain MSE), got {t.mask_loss_weight}")
    if not 0.0 <= d.empty_prompt_prob <= 1.0:
        problems.append(f"data.empty_prompt_prob must be in [0, 1], got {d.empty_prompt_prob}")
    if o.lr <= 0:
        problems.append(f"optim.lr must be > 0, got {o.lr}")
    if len(o.betas) != 2:
        problems.append(f"optim.betas needs two values, got {o.betas}")
    if not 0.0 < cfg.ema.decay < 1.0:
        problems.append(f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    if t.mu != "dynamic":
        try:
            float(t.mu)
        except ValueError:
            problems.append(f"train.mu must be 'dynamic' or a number, got {t.mu!r}")
    if cfg.model.dtype == "bf16" and t.mixed_precision != "bf16":
        problems.append("model.dtype=bf16 needs train.mixed_precision=bf16 (the trained fp32 parameters meet bf16 weights)")
    if cfg.stage == 2 and cfg.model.lora_rank < 1:
        problems.append("stage 2 trains LoRA: model.lora_rank must be >= 1")
    if cfg.stage == 1 and d.reference_prob > 0:
        problems.append("stage 1 is text-only control: data.reference_prob must be 0")
    if cfg.model.control_blocks < 1:
        problems.append("model.control_blocks must be >= 1")
    if t.shield_product and cfg.stage != 2:
        problems.append("train.shield_product keeps the product's tokens off the reference: only stage 2 has one")
    if d.mask_policy == "insertion" and cfg.stage != 1:
        problems.append("data.mask_policy=insertion trains an insertion control branch: that is stage 1")
    if d.mask_policy == "insertion" and cfg.cache.enabled:
        problems.append("data.mask_policy=insertion draws a new hole every epoch, which cache.enabled would encode "
                        "once: set cache.enabled=false")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def load_config(stage: int, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = default_config(stage)
    if path is not None:
        merge_dict(cfg, read_config_file(path), source=str(path))
    apply_overrides(cfg, list(overrides or []))
    return validate(cfg)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def dump_toml(cfg: Config) -> str:
    """The whole config as TOML (written next to checkpoints: what a run actually used)."""
    d = config_to_dict(cfg)
    lines = [f"stage = {d.pop('stage')}"]
    for section, values in d.items():
        lines.append("")
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
