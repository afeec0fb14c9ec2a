"""Load CogView4-6B (or a smaller model of its architecture) from a diffusers folder and/or single safetensors files.

* ``load_cogview4(base_path, transformer_path=..., vae_path=..., text_encoder_path=...,
  tokenizer_path=...)``: every component comes from ``base_path`` (diffusers layout, as in
  THUDM/CogView4-6B) unless a path overrides it. Without ``base_path`` every needed part must be
  given; the scheduler then uses CogView4's known config.
* Per component: ``load_transformer``, ``load_vae``, ``load_text_encoder``, ``load_tokenizer``,
  ``default_scheduler``. A *folder* is a diffusers component folder (``config.json`` +
  safetensors, sharded index supported); a *file* is one ``.safetensors`` file (its config comes
  from the safetensors metadata key ``"config"`` when present, otherwise it is inferred from the
  tensor shapes).

Everything is validated from file headers before any weight is read, and before any module is
built: paths, layout, file format (pickle formats are refused: they can run code when loaded),
truncation, header size, dtypes (safetensors_io.LOADABLE_DTYPES; F8_E4M3 too for the transformer
and text encoder), the layer counts a config asks for against the weights present (and caps:
``MAX_*_LAYERS``), shard indexes naming only files beside them, key names and shapes.
``check_finite=True`` also refuses NaN/inf weights while they are read.
Failures raise ``ModelFilesError`` (files) or ``InputError`` (arguments) with a message that names
the file and says what was expected; the low-level exception is chained.

Models are built on the meta device and the weights are assigned tensor by tensor
(``load_state_dict(assign=True)``), so loading never holds two copies of the weights.
Returned models are in eval mode with ``requires_grad=False``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import InputError, ModelFilesError
from .safetensors_io import (
    CONVERT_HINT,
    FP8_DTYPES,
    LOADABLE_DTYPES,
    PICKLE_SUFFIXES,
    TensorInfo,
    dtype_problem,
    first_non_finite,
    non_finite_message,
    read_safetensors_header,
)

__all__ = [
    "CogView4Components",
    "COGVIEW4_SCHEDULER_CONFIG",
    "default_scheduler",
    "load_cogview4",
    "load_text_encoder",
    "load_tokenizer",
    "load_transformer",
    "load_vae",
    "resolve_dtype",
]

REPO_HINT = "THUDM/CogView4-6B"
LAYOUT_HINT = (
    "expected a diffusers-layout CogView4 folder with transformer/ vae/ text_encoder/ tokenizer/ "
    f"scheduler/ and model_index.json ({REPO_HINT})"
)

#: FlowMatchEulerDiscreteScheduler config of THUDM/CogView4-6B (scheduler/scheduler_config.json).
COGVIEW4_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.25,
    max_shift=0.75,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    invert_sigmas=False,
    shift_terminal=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    time_shift_type="linear",
)

#: Head widths of CogView4-6B's transformer and GLM-4-9B. Neither is visible in weight shapes
#: (qk-norm has no weights, RoPE none), so single files without a "config" metadata entry assume
#: them; other widths need that entry.
COGVIEW4_HEAD_DIM = 128
GLM_HEAD_DIM = 128
#: Config files, shard indexes and 'config' metadata longer than this are refused unread (CogView4-6B's
#: are 1-30 KB).
MAX_JSON_CHARS = 2**20
#: Layer counts a config may ask for, whether read or inferred from key names. CogView4-6B has 28
#: transformer blocks, GLM-4-9B 40 layers, the VAE 4 levels of 2 (encoder) / 3 (decoder) resnets; the
#: caps leave room for larger models of these architectures, and stop a forged config or key name
#: ("transformer_blocks.999999999.x") from building millions of modules, even on the meta device.
MAX_TRANSFORMER_LAYERS = 256
MAX_TEXT_ENCODER_LAYERS = 256
MAX_VAE_LEVELS = 8
MAX_VAE_LAYERS_PER_BLOCK = 8
#: CogView4-6B's VAE settings that weight shapes do not show (its vae/config.json); shape inference
#: assumes them.
COGVIEW4_VAE_SETTINGS: dict[str, Any] = dict(
    act_fn="silu", norm_num_groups=32, sample_size=1024, force_upcast=True,
    scaling_factor=1.0, shift_factor=0.0, latents_mean=None, latents_std=None,  # latents taken as they are
)
#: CogView4-6B's transformer settings that weight shapes do not show (its transformer/config.json;
#: the patch size is not separable from in_channels in the patch-embedding shape).
COGVIEW4_TRANSFORMER_SETTINGS: dict[str, Any] = dict(
    patch_size=2,
    pos_embed_max_size=128,
    sample_size=128,
    rope_axes_dim=(256, 256),
)


@dataclass
class CogView4Components:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    transformer: Any
    scheduler: Any


# --------------------------------------------------------------------------------------------
# dtype / device
# --------------------------------------------------------------------------------------------

_DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
FP16_MESSAGE = (
    "CogView4 does not support float16: its activations overflow in fp16 and the result is a black "
    "(NaN) image (stated by the model's makers). Use torch.bfloat16 (or torch.float32)."
)


def resolve_dtype(dtype, allow_fp16: bool = False) -> torch.dtype:
    """torch.float32 / torch.bfloat16 (or 'fp32'/'bf16'); float16 only with ``allow_fp16`` (warned)."""
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPE_ALIASES:
            raise InputError(f"dtype {dtype!r} is not supported; use torch.bfloat16 or torch.float32.")
        dtype = _DTYPE_ALIASES[key]
    if dtype is None:
        dtype = torch.float32
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"dtype must be a torch.dtype (torch.bfloat16 or torch.float32), got {dtype!r}.")
    if dtype == torch.float16:
        if not allow_fp16:
            raise InputError(FP16_MESSAGE + " Pass allow_fp16=True to load in float16 anyway.")
        warnings.warn(FP16_MESSAGE + " Loading in float16 because allow_fp16=True.", UserWarning, stacklevel=3)
        return dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise InputError(f"dtype {dtype} is not supported for CogView4; use torch.bfloat16 or torch.float32.")
    return dtype


def _resolve_device(device) -> torch.device:
    try:
        return torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:0').") from e


# --------------------------------------------------------------------------------------------
# Files: existence, format, headers
# --------------------------------------------------------------------------------------------


def _as_path(p, what: str) -> Path:
    if p is None:
        raise InputError(f"{what}: no path given.")
    if not isinstance(p, (str, Path)):
        raise InputError(f"{what}: expected a path (str or Path), got {type(p).__name__}.")
    return Path(p).expanduser()


def _refuse_pickle(path: Path, what: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFilesError(f"{what}: {path} is a pickle-based weight file. {CONVERT_HINT}.")


@dataclass
class _Weights:
    """Where each stored key lives, its shape and dtype (from headers only)."""

    label: str  # file or folder, for messages
    files: list[Path]
    key_file: dict[str, Path]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]  # of the first / only file
    shapes: dict[str, tuple] = field(init=False)

    def __post_init__(self):
        self.shapes = {k: t.shape for k, t in self.tensors.items()}


def _weights_from_file(path: Path, what: str) -> _Weights:
    h = read_safetensors_header(path, what)
    return _Weights(str(path), [path], {k: path for k in h.tensors}, h.tensors, h.metadata)


def _weights_from_folder(folder: Path, what: str, stem: str) -> _Weights:
    """diffusers/transformers component folder: ``{stem}.safetensors`` or a sharded
    ``{stem}.safetensors.index.json``; any single ``*.safetensors`` is accepted as well."""
    index = None
    for cand in (f"{stem}.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
                 "model.safetensors.index.json"):
        if (folder / cand).is_file():
            index = folder / cand
            break
    if index is not None:
        weight_map = _read_json(index, what).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFilesError(f"{what}: shard index {index} has no 'weight_map' object (tensor name -> shard file).")
        for key, name in weight_map.items():
            _check_shard_name(index, key, name, what)
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not (folder / s).is_file()]
        if missing:
            raise ModelFilesError(
                f"{what}: {index} lists shards that are not in {folder}: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; the download is incomplete."
            )
        key_file, tensors, meta = {}, {}, {}
        files = [folder / s for s in shard_names]
        for fp in files:
            h = read_safetensors_header(fp, what)
            meta = meta or h.metadata
            for k, t in h.tensors.items():
                key_file[k] = fp
                tensors[k] = t
        not_in_shards = [k for k in weight_map if k not in tensors]
        if not_in_shards:
            raise ModelFilesError(
                f"{what}: {index} names tensors not found in their shards (first: {not_in_shards[:3]}); "
                "a shard is truncated or from another version."
            )
        return _Weights(str(folder), files, key_file, tensors, meta)

    st = sorted(folder.glob("*.safetensors"))
    preferred = [p for p in st if p.name in (f"{stem}.safetensors", "diffusion_pytorch_model.safetensors",
                                             "model.safetensors")]
    if preferred:
        return _weights_from_file(preferred[0], what)
    if len(st) == 1:
        return _weights_from_file(st[0], what)
    if len(st) > 1:
        raise ModelFilesError(
            f"{what}: {folder} holds several .safetensors files ({', '.join(p.name for p in st[:5])}) but no "
            f"{stem}.safetensors.index.json saying how they fit together."
        )
    pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise ModelFilesError(f"{what}: {folder} has only pickle weights ({', '.join(pickles[:3])}). {CONVERT_HINT}.")
    raise ModelFilesError(f"{what}: no .safetensors weights in {folder} (expected {stem}.safetensors).")


def _check_shard_name(index: Path, key, name, what: str) -> None:
    """A shard index may only name files beside it: never a path that leads elsewhere."""
    plain = (isinstance(key, str) and isinstance(name, str) and name not in ("", ".", "..")
             and not any(c in name for c in "/\\\0:"))
    if not plain:
        raise ModelFilesError(
            f"{what}: shard index {index} maps {str(key)[:100]!r} to {str(name)[:100]!r}; shard names must be plain "
            "file names in the index's own folder (no '/', '\\', ':', '..' or absolute paths). The index is corrupt "
            "or made to read files elsewhere: re-download the model.")


def _parse_json(text: str, source: str, what: str, max_chars: int = MAX_JSON_CHARS):
    """JSON from a config file or metadata field, bounded in size (nesting is bounded by Python's
    recursion limit, reported as an error like any other)."""
    if len(text) > max_chars:
        raise ModelFilesError(f"{what}: {source} is {len(text)} characters long; at most {max_chars} are read "
                              "(real model configs are a few KB). The file is corrupt or not a model config.")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelFilesError(f"{what}: {source} is not valid JSON ({str(e)[:200]}).") from e


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        extra = (" (expected a diffusers component folder: config.json plus .safetensors weights, as in "
                 f"{REPO_HINT})") if path.name == "config.json" else ""
        raise ModelFilesError(f"{what}: {path} is missing{extra}.")
    size = path.stat().st_size
    if size > MAX_JSON_CHARS:  # refused unread
        raise ModelFilesError(f"{what}: {path} is {size} bytes; at most {MAX_JSON_CHARS} are read (real configs "
                              "and shard indexes are under 100 KB). The file is corrupt or not a model config.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFilesError(f"{what}: cannot read {path} as UTF-8 text ({e}).") from e
    value = _parse_json(text, str(path), what)
    if not isinstance(value, dict):
        raise ModelFilesError(f"{what}: {path} is not a JSON object.")
    return value


def _metadata_config(w: _Weights, what: str) -> dict | None:
    raw = w.metadata.get("config")
    if raw is None:
        return None
    cfg = _parse_json(raw, f"the 'config' metadata of {w.label}", what)
    if not isinstance(cfg, dict):
        raise ModelFilesError(f"{what}: the 'config' metadata of {w.label} is not a JSON object.")
    return cfg


# --------------------------------------------------------------------------------------------
# Key mapping and validation
# --------------------------------------------------------------------------------------------


def _strip_prefix(keys, signature: str, ignorable: Callable[[str], bool]) -> tuple[dict[str, str], list[str]]:
    """Find the prefix in front of ``signature`` and strip it. Returns (model_key -> stored_key,
    unexpected stored keys that do not carry the prefix and are not ignorable)."""
    prefix = None
    for k in sorted(keys, key=len):
        if k == signature or k.endswith("." + signature):
            prefix = k[: len(k) - len(signature)]
            break
    if prefix is None:
        prefix = ""
    mapping, outside = {}, []
    for k in keys:
        if k.startswith(prefix):
            mk = k[len(prefix):]
            if not ignorable(mk):
                mapping[mk] = k
        elif not ignorable(k):
            outside.append(k)
    return mapping, outside


_SIGNATURES = {
    "transformer": ("patch_embed.proj.weight", "a CogView4 transformer"),
    "vae": ("decoder.conv_in.weight", "a VAE"),
    "text_encoder": ("embed_tokens.weight", "a GLM text encoder"),
}


def _check_kind(w: _Weights, kind: str, what: str) -> None:
    """Refuse early (with a useful hint) a file that is not this kind of component at all."""
    def has(sig):
        return any(k == sig or k.endswith("." + sig) for k in w.shapes)

    sig, desc = _SIGNATURES[kind]
    if has(sig):
        return
    looks = [d for k, (s, d) in _SIGNATURES.items() if k != kind and has(s)]
    hint = f" It looks like {looks[0]} file: wrong slot?" if looks else ""
    raise ModelFilesError(
        f"{what}: {w.label} is not {desc} in diffusers/transformers key layout (no tensor named {sig!r}; "
        f"first keys: {_fmt_keys(sorted(w.shapes), 3)}).{hint}"
    )


def _check_class(cfg: dict | None, expected: str, source: str, what: str) -> None:
    cls = (cfg or {}).get("_class_name")
    if cls and cls != expected:
        raise ModelFilesError(f"{what}: {source} describes a {cls}, not a {expected}.")


def _fmt_keys(keys, n: int = 5) -> str:
    keys = list(keys)
    s = ", ".join(keys[:n])
    return s + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _validate_keys(model: torch.nn.Module, mapping: dict[str, str], outside: list[str], w: _Weights,
                   what: str, cfg_note: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in mapping]
    unexpected = outside + [mapping[k] for k in mapping if k not in expected]
    wrong = [(k, expected[k], w.shapes[mapping[k]]) for k in expected
             if k in mapping and tuple(w.shapes[mapping[k]]) != expected[k]]
    if not (missing or unexpected or wrong):
        return

    def where(k):  # name the shard when the weights span several files
        return f" (in {w.key_file[mapping[k]].name})" if len(w.files) > 1 else ""

    parts = []
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of the wrong shape: " + "; ".join(
            f"{k} expected {tuple(e)} found {tuple(f)}{where(k)}" for k, e, f in wrong[:4])
            + (" ..." if len(wrong) > 4 else ""))
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_fmt_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_fmt_keys(unexpected)}")
    raise ModelFilesError(
        f"{what}: {w.label} does not match the expected model ({cfg_note}): " + " | ".join(parts)
        + ". Is this the right file for this slot, complete and from the same model version?"
    )


# --------------------------------------------------------------------------------------------
# Plans: validate everything from headers, build on meta; materialise later
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    what: str
    model: torch.nn.Module  # on meta
    mapping: dict[str, str]  # model key -> stored key
    weights: _Weights
    config: dict


def _empty_model(factory: Callable[[], torch.nn.Module], what: str, cfg: dict) -> torch.nn.Module:
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return factory()
    except Exception as e:
        raise ModelFilesError(f"{what}: cannot build the model from its config ({e}); config: {str(cfg)[:400]}") from e


def _materialise(plan: _Plan, dtype: torch.dtype, device: torch.device, check_finite: bool = False) -> torch.nn.Module:
    """Read the weights into the meta-built model, file by file; with ``check_finite``, a tensor
    holding NaN or inf (after conversion to ``dtype``) is refused before it is assigned."""
    from safetensors import safe_open

    model = plan.model
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for mk, sk in plan.mapping.items():
        by_file.setdefault(plan.weights.key_file[sk], []).append((mk, sk))
    open_dev = str(device) if device.type == "cuda" else "cpu"
    for fp, pairs in by_file.items():
        sd = {}
        try:
            with safe_open(str(fp), framework="pt", device=open_dev) as f:
                for mk, sk in pairs:
                    t = f.get_tensor(sk)
                    if t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    sd[mk] = t
        except Exception as e:
            raise ModelFilesError(f"{plan.what}: reading tensors from {fp} failed ({e}); the file may be corrupt.") from e
        if check_finite and (bad := first_non_finite(sd.items())) is not None:
            raise ModelFilesError(non_finite_message(plan.what, fp, plan.mapping[bad]))
        model.load_state_dict(sd, strict=False, assign=True)
        del sd
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:  # cannot happen after _validate_keys; guard anyway
        raise ModelFilesError(f"{plan.what}: {plan.weights.label} did not provide {_fmt_keys(left)}.")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _component_dir(path: Path, sub: str, what: str) -> Path:
    """A component folder, or a base folder containing ``sub/``."""
    if (path / "config.json").is_file() or (sub == "tokenizer" and (path / "tokenizer.json").is_file()):
        return path
    if (path / sub).is_dir():
        return path / sub
    return path


def _source(path_or_folder, sub: str, what: str) -> tuple[Path, bool]:
    p = _as_path(path_or_folder, what)
    if not p.exists():
        hint = f"a .safetensors file or a diffusers '{sub}/' folder (config.json + safetensors) from {REPO_HINT}"
        raise ModelFilesError(f"{what}: {p} does not exist; expected {hint}.")
    if p.is_file():
        _refuse_pickle(p, what)
        if p.suffix.lower() != ".safetensors":
            raise ModelFilesError(f"{what}: {p} is not a .safetensors file; expected a .safetensors file or a "
                                  f"diffusers '{sub}/' folder.")
        return p, True
    return _component_dir(p, sub, what), False


def _open_component(path_or_folder, sub: str, what: str, stem: str,
                    cls_name: str | None) -> tuple[_Weights, bool, dict | None]:
    """(weights from the headers, is a single file, the folder's config.json or None for a file);
    a folder's config.json is read, and its class checked, before its weights."""
    p, is_file = _source(path_or_folder, sub, what)
    if is_file:
        return _weights_from_file(p, what), True, None
    cfg_json = _read_json(p / "config.json", what)
    if cls_name:
        _check_class(cfg_json, cls_name, str(p / "config.json"), what)
    return _weights_from_folder(p, what, stem), False, cfg_json


def _resolve_config(config: dict | None, w: _Weights, is_file: bool, cfg_json: dict | None, cls_name: str | None,
                    infer: Callable[[dict, str, str], dict], shapes: dict[str, tuple], what: str) -> tuple[dict, str]:
    """(config, where it came from): `config` when given; else the folder's config.json or the
    file's 'config' metadata; else inferred from the weight shapes (keys without their prefix)."""
    if config is not None:
        source = "the config given"
    else:
        if is_file:
            config, source = _metadata_config(w, what), f"the 'config' metadata of {w.label}"
        else:
            config, source = cfg_json, f"the config.json of {w.label}"
        if cls_name:
            _check_class(config, cls_name, source, what)
    if config is None:
        config, source = infer(shapes, w.label, what), f"the config inferred from {w.label}"
    if not isinstance(config, dict):
        raise ModelFilesError(f"{what}: {source} is not a JSON object / dict.")
    return config, source


# ---- transformer ---------------------------------------------------------------------------

_T_SIG = "patch_embed.proj.weight"


def _shape_getter(shapes: dict[str, tuple], label: str, what: str, kind: str, hint: str) -> Callable[[str], tuple]:
    def get(k):
        if k not in shapes:
            raise ModelFilesError(f"{what}: cannot infer the {kind} config from {label}: key {k!r} missing ({hint}).")
        return shapes[k]

    return get


def _layer_count(shapes: dict[str, tuple], prefix: str, label: str, what: str, kind: str, cap: int) -> int:
    """N for keys "<prefix>.0." .. "<prefix>.N-1." (a ModelFilesError naming `kind` when there are none,
    when N exceeds `cap` or when a layer in between has no tensors)."""
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"\.(\d{1,9})\.", k))}
    if not found:
        raise ModelFilesError(f"{what}: {label} has no '{prefix}.N.' tensors; not {kind}.")
    n = max(found) + 1
    if n > cap:
        raise ModelFilesError(f"{what}: {label} has tensors named {prefix}.{n - 1}.*; at most {cap} layers are "
                              f"loaded for {kind}. The file is corrupt or not {kind}.")
    if len(found) != n:
        gaps = sorted(set(range(n)) - found)
        raise ModelFilesError(f"{what}: {label} has no tensors for {prefix}.{gaps[0]} (layers 0..{n - 1} expected); "
                              "the file is incomplete or corrupt.")
    return n


def _check_config_fits(config: dict, source: str, what: str, label: str, counts: dict[str, int],
                       lengths: dict[str, int] | None = None) -> None:
    """The layer counts a config asks for (ints in ``counts``, list lengths in ``lengths``) must be
    the ones the weights hold. Checked before any module is built, so that a forged config cannot
    build millions of modules, not even on the meta device."""
    wanted = [(f, n, config.get(f)) for f, n in counts.items() if type(config.get(f)) is not int or config.get(f) != n]
    wanted += [(f, n, config.get(f)) for f, n in (lengths or {}).items()
               if not isinstance(config.get(f), list) or len(config.get(f)) != n]
    if wanted:
        field_name, n, value = wanted[0]
        shown = f"a list of {len(value)}" if isinstance(value, list) else repr(value)[:60]
        said = f"does not set {field_name}" if value is None else f"sets {field_name} = {shown}"
        raise ModelFilesError(f"{what}: {source} {said}, but {label} holds weights for {n}. "
                              "The config does not belong to these weights: fix or remove it.")


def _check_dtypes(w: _Weights, mapping: dict[str, str], allowed: tuple[str, ...], what: str) -> None:
    problem = dtype_problem({sk: w.tensors[sk] for sk in mapping.values()}, allowed)
    if problem:
        raise ModelFilesError(f"{what}: {w.label}: {problem}.")


def _no_config_for(label: str, what: str, detail: str) -> ModelFilesError:
    return ModelFilesError(
        f"{what}: cannot infer the config of {label}: {detail}, which shape inference assumes (it is not "
        "visible in the weight shapes). Store the component's config as JSON under the safetensors metadata "
        "key 'config', or load its diffusers folder (config.json + weights)."
    )


def _infer_transformer_config(shapes: dict[str, tuple], label: str, what: str) -> dict:
    get = _shape_getter(shapes, label, what, "transformer", "is this a CogView4 transformer in diffusers key layout?")
    num_layers = _layer_count(shapes, "transformer_blocks", label, what, "a CogView4 transformer", MAX_TRANSFORMER_LAYERS)
    inner, proj_in = get(_T_SIG)
    p = COGVIEW4_TRANSFORMER_SETTINGS["patch_size"]
    head_dim = COGVIEW4_HEAD_DIM
    if inner % head_dim:
        raise _no_config_for(label, what, f"its width {inner} is not a multiple of CogView4's head width {head_dim}")
    return dict(
        COGVIEW4_TRANSFORMER_SETTINGS,
        in_channels=proj_in // (p * p),
        out_channels=get("proj_out.weight")[0] // (p * p),
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        text_embed_dim=get("patch_embed.text_proj.weight")[1],
        time_embed_dim=get("transformer_blocks.0.norm1.linear.weight")[1],
        condition_dim=get("time_condition_embed.condition_embedder.linear_1.weight")[1] // 6,
    )


def _clean_cfg(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _plan_transformer(path_or_folder, what="transformer", config: dict | None = None) -> _Plan:
    from diffusers import CogView4Transformer2DModel

    cls_name = "CogView4Transformer2DModel"
    w, is_file, cfg_json = _open_component(path_or_folder, "transformer", what, "diffusion_pytorch_model", cls_name)
    _check_kind(w, "transformer", what)
    mapping, outside = _strip_prefix(w.shapes, _T_SIG, lambda k: False)
    shapes = {k: w.shapes[v] for k, v in mapping.items()}
    config, source = _resolve_config(config, w, is_file, cfg_json, cls_name, _infer_transformer_config, shapes, what)
    config = _clean_cfg(config)
    layers = _layer_count(shapes, "transformer_blocks", w.label, what, "a CogView4 transformer", MAX_TRANSFORMER_LAYERS)
    _check_config_fits(config, source, what, w.label, {"num_layers": layers})
    _check_dtypes(w, mapping, LOADABLE_DTYPES + FP8_DTYPES, what)
    model = _empty_model(lambda: CogView4Transformer2DModel.from_config(config), what, config)
    note = (f"CogView4Transformer2DModel, {config.get('num_layers')} layers, "
            f"{config.get('num_attention_heads')}x{config.get('attention_head_dim')}")
    _validate_keys(model, mapping, outside, w, what, note)
    return _Plan(what, model, mapping, w, config)


# ---- VAE -----------------------------------------------------------------------------------

_V_SIG = "decoder.conv_in.weight"


def _vae_layer_counts(shapes: dict[str, tuple], label: str, what: str) -> tuple[int, int]:
    """(levels, resnets per encoder level) that the weights hold."""
    levels = _layer_count(shapes, "encoder.down_blocks", label, what, "a VAE", MAX_VAE_LEVELS)
    per_block = _layer_count(shapes, "encoder.down_blocks.0.resnets", label, what, "a VAE", MAX_VAE_LAYERS_PER_BLOCK)
    return levels, per_block


def _infer_vae_config(shapes: dict[str, tuple], label: str, what: str) -> dict:
    if "encoder.conv_in.weight" not in shapes or _V_SIG not in shapes or not any(
            k.startswith("encoder.down_blocks.") for k in shapes):
        raise ModelFilesError(f"{what}: {label} is not an AutoencoderKL in diffusers key layout "
                              "(no encoder.down_blocks.N / encoder.conv_in / decoder.conv_in tensors).")
    n, lpb = _vae_layer_counts(shapes, label, what)
    boc = []
    for i in range(n):
        k = f"encoder.down_blocks.{i}.resnets.0.conv1.weight"
        if k not in shapes:
            raise ModelFilesError(f"{what}: cannot infer the VAE config from {label}: {k!r} missing.")
        boc.append(shapes[k][0])
    groups = COGVIEW4_VAE_SETTINGS["norm_num_groups"]
    if any(c % groups for c in boc):
        raise _no_config_for(label, what, f"its block widths {boc} are not multiples of CogView4's {groups} norm groups")
    return dict(
        COGVIEW4_VAE_SETTINGS,
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes.get("decoder.conv_out.weight", (3,))[0],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=boc,
        layers_per_block=lpb,
        latent_channels=shapes[_V_SIG][1],
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in shapes),
    )


def _plan_vae(path_or_folder, what="vae", config: dict | None = None) -> _Plan:
    from diffusers import AutoencoderKL

    w, is_file, cfg_json = _open_component(path_or_folder, "vae", what, "diffusion_pytorch_model", "AutoencoderKL")
    if any(re.match(r"(.*\.)?encoder\.down\.\d+\.block\.", k) for k in w.shapes):
        raise ModelFilesError(f"{what}: {w.label} uses the original (LDM/SAT) VAE key layout (encoder.down.N.block...); "
                              f"use the diffusers-layout vae from {REPO_HINT} (vae/ folder or its safetensors file).")
    _check_kind(w, "vae", what)
    mapping, outside = _strip_prefix(w.shapes, _V_SIG, lambda k: False)
    shapes = {k: w.shapes[v] for k, v in mapping.items()}
    config, source = _resolve_config(config, w, is_file, cfg_json, "AutoencoderKL", _infer_vae_config, shapes, what)
    config = _clean_cfg(config)
    levels, per_block = _vae_layer_counts(shapes, w.label, what)
    _check_config_fits(config, source, what, w.label, {"layers_per_block": per_block},
                       {k: levels for k in ("block_out_channels", "down_block_types", "up_block_types")})
    _check_dtypes(w, mapping, LOADABLE_DTYPES, what)  # the pack never stores the VAE in fp8
    model = _empty_model(lambda: AutoencoderKL.from_config(config), what, config)
    note = f"AutoencoderKL, block_out_channels {list(config.get('block_out_channels', []))}, " \
           f"{config.get('latent_channels')} latent channels"
    _validate_keys(model, mapping, outside, w, what, note)
    return _Plan(what, model, mapping, w, config)


# ---- text encoder --------------------------------------------------------------------------

_G_SIG = "embed_tokens.weight"


def _glm_ignorable(k: str) -> bool:
    return k.startswith("lm_head.") or k.endswith("rotary_emb.inv_freq")


def _infer_glm_config(shapes: dict[str, tuple], label: str, what: str) -> dict:
    get = _shape_getter(shapes, label, what, "GLM", "is this a transformers GlmModel / GLM-4 text encoder?")
    num_layers = _layer_count(shapes, "layers", label, what, "a GLM text encoder", MAX_TEXT_ENCODER_LAYERS)
    vocab, hidden = get(_G_SIG)
    q_out = get("layers.0.self_attn.q_proj.weight")[0]
    k_out = get("layers.0.self_attn.k_proj.weight")[0]
    head_dim = GLM_HEAD_DIM
    if q_out % head_dim or k_out % head_dim:
        raise _no_config_for(label, what, f"its attention widths {q_out}/{k_out} are not multiples of GLM-4's "
                                          f"head width {head_dim}")
    return dict(
        model_type="glm",
        architectures=["GlmModel"],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("layers.0.mlp.down_proj.weight")[1],
        num_hidden_layers=num_layers,
        num_attention_heads=q_out // head_dim,
        num_key_value_heads=k_out // head_dim,
        head_dim=head_dim,
        attention_bias="layers.0.self_attn.q_proj.bias" in shapes,
    )


def _glm_config(cfg: dict, what: str):
    from transformers import GlmConfig

    mt = cfg.get("model_type", "glm")
    if mt != "glm":
        raise ModelFilesError(
            f"{what}: config model_type is {mt!r}; expected 'glm' (transformers GlmModel, as in {REPO_HINT}'s "
            "text_encoder/). Remote-code ChatGLM checkpoints are not supported."
        )
    try:
        c = GlmConfig.from_dict(_clean_cfg(cfg))
    except Exception as e:
        raise ModelFilesError(f"{what}: invalid GLM config ({e}).") from e
    if c.pad_token_id is not None and not (0 <= c.pad_token_id < c.vocab_size):
        c.pad_token_id = None  # only sets nn.Embedding's padding_idx; must be inside the vocab
    return c


def _plan_text_encoder(path_or_folder, what="text_encoder", config: dict | None = None) -> _Plan:
    from transformers import GlmModel

    w, is_file, cfg_json = _open_component(path_or_folder, "text_encoder", what, "model", None)
    _check_kind(w, "text_encoder", what)
    mapping, outside = _strip_prefix(w.shapes, _G_SIG, _glm_ignorable)
    shapes = {k: w.shapes[v] for k, v in mapping.items()}
    config, source = _resolve_config(config, w, is_file, cfg_json, None, _infer_glm_config, shapes, what)
    layers = _layer_count(shapes, "layers", w.label, what, "a GLM text encoder", MAX_TEXT_ENCODER_LAYERS)
    _check_config_fits(config, source, what, w.label, {"num_hidden_layers": layers})
    _check_dtypes(w, mapping, LOADABLE_DTYPES + FP8_DTYPES, what)
    gcfg = _glm_config(config, what)
    # head_dim sizes a real (not meta) RoPE buffer: it must match the weights before building
    q_out = shapes.get("layers.0.self_attn.q_proj.weight", (None,))[0]
    heads, head_dim = gcfg.num_attention_heads, gcfg.head_dim
    if type(heads) is not int or type(head_dim) is not int or heads * head_dim != q_out:
        raise ModelFilesError(f"{what}: {source} sets {heads!r} heads x head_dim {head_dim!r}, "
                              f"but the q_proj weights of {w.label} are {q_out} wide. The config does not belong to "
                              "these weights: fix or remove it.")
    model = _empty_model(lambda: GlmModel(gcfg), what, config)
    note = f"GlmModel, {gcfg.num_hidden_layers} layers, hidden {gcfg.hidden_size}, vocab {gcfg.vocab_size}"
    _validate_keys(model, mapping, outside, w, what, note)
    return _Plan(what, model, mapping, w, gcfg.to_dict())


# --------------------------------------------------------------------------------------------
# Public per-component loaders
# --------------------------------------------------------------------------------------------


def load_transformer(path_or_folder, dtype=torch.float32, device="cpu", *, allow_fp16: bool = False,
                     config: dict | None = None, check_finite: bool = False):
    """CogView4Transformer2DModel from a diffusers ``transformer/`` folder or one safetensors file.
    ``config`` overrides the folder's config.json / the file's metadata / shape inference.
    ``check_finite`` refuses weights holding NaN or inf (one extra pass over them)."""
    dtype = resolve_dtype(dtype, allow_fp16)
    device = _resolve_device(device)
    return _materialise(_plan_transformer(path_or_folder, config=config), dtype, device, check_finite)


def load_vae(path_or_folder, dtype=torch.float32, device="cpu", *, allow_fp16: bool = False,
             config: dict | None = None, check_finite: bool = False):
    """AutoencoderKL from a diffusers ``vae/`` folder or one safetensors file."""
    dtype = resolve_dtype(dtype, allow_fp16)
    device = _resolve_device(device)
    return _materialise(_plan_vae(path_or_folder, config=config), dtype, device, check_finite)


def load_text_encoder(path_or_folder, dtype=torch.float32, device="cpu", *, allow_fp16: bool = False,
                      config: dict | None = None, check_finite: bool = False):
    """transformers GlmModel from a ``text_encoder/`` folder or one safetensors file (keys with or
    without the ``model.`` prefix; an ``lm_head`` is ignored)."""
    dtype = resolve_dtype(dtype, allow_fp16)
    device = _resolve_device(device)
    return _materialise(_plan_text_encoder(path_or_folder, config=config), dtype, device, check_finite)


def _tokenizer_source(folder, what="tokenizer") -> Path:
    p = _as_path(folder, what)
    if not p.exists():
        raise ModelFilesError(f"{what}: {p} does not exist; expected the tokenizer/ folder of {REPO_HINT} "
                              "(tokenizer.json + tokenizer_config.json).")
    if p.is_file():
        if p.suffix.lower() == ".safetensors":
            raise ModelFilesError(f"{what}: {p} is a weight file; a safetensors file holds no tokenizer. Give the "
                                  f"tokenizer/ folder of {REPO_HINT} (tokenizer.json + tokenizer_config.json).")
        if p.name.endswith(".json") and p.name != "tokenizer_config.json":
            return p
        p = p.parent
    p = _component_dir(p, "tokenizer", what)
    if not (p / "tokenizer.json").is_file():
        others = sorted(x.name for x in p.iterdir())[:8] if p.is_dir() else []
        raise ModelFilesError(f"{what}: {p} has no tokenizer.json (found: {', '.join(others) or 'nothing'}); expected "
                              f"the tokenizer/ folder of {REPO_HINT} (a fast tokenizer: tokenizer.json).")
    return p


def load_tokenizer(folder):
    """PreTrainedTokenizerFast from a tokenizer folder (or a base folder with tokenizer/, or a
    tokenizer.json file). Offline: never contacts a hub."""
    from transformers import PreTrainedTokenizerFast

    src = _tokenizer_source(folder)
    try:
        if src.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(src))
        return PreTrainedTokenizerFast.from_pretrained(str(src), local_files_only=True)
    except Exception as e:
        raise ModelFilesError(f"tokenizer: cannot load the tokenizer from {src} ({e}).") from e


def default_scheduler():
    """FlowMatchEulerDiscreteScheduler with CogView4-6B's config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**COGVIEW4_SCHEDULER_CONFIG)


def _load_scheduler(folder: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = _read_json(folder / "scheduler_config.json", "scheduler")
    cls = cfg.get("_class_name")
    if cls and cls != "FlowMatchEulerDiscreteScheduler":
        warnings.warn(f"{folder}: scheduler is {cls}; using FlowMatchEulerDiscreteScheduler with its config.")
    try:
        return FlowMatchEulerDiscreteScheduler.from_config(_clean_cfg(cfg))
    except Exception as e:
        raise ModelFilesError(f"scheduler: invalid {folder / 'scheduler_config.json'} ({e}).") from e


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------


def load_cogview4(
    base_path=None,
    *,
    transformer_path=None,
    vae_path=None,
    text_encoder_path=None,
    tokenizer_path=None,
    dtype=torch.float32,
    device="cpu",
    load_text_encoder: bool = True,
    allow_fp16: bool = False,
    check_finite: bool = False,
) -> CogView4Components:
    """Load CogView4's parts. Every path is checked (and every weight file's header read and its
    keys/shapes compared with the model) before any weights are loaded.

    ``load_text_encoder=False`` leaves ``text_encoder`` as None (the tokenizer is still loaded
    when a source for it is available, else None). ``check_finite`` refuses weights holding NaN or
    inf (one extra pass over them)."""
    dtype = resolve_dtype(dtype, allow_fp16)
    device = _resolve_device(device)

    base = None
    if base_path is not None:
        base = _as_path(base_path, "base_path")
        if not base.exists():
            raise ModelFilesError(f"base_path {base} does not exist; {LAYOUT_HINT}.")
        if not base.is_dir():
            raise ModelFilesError(f"base_path {base} is a file, not a folder; {LAYOUT_HINT}. For single files use "
                                  "transformer_path= / vae_path= / text_encoder_path= (and tokenizer_path=).")
        mi = base / "model_index.json"
        if mi.is_file():
            cls = _read_json(mi, "base_path").get("_class_name", "")
            if cls and not str(cls).startswith("CogView4"):
                raise ModelFilesError(f"base_path {base}: model_index.json describes a {cls}; {LAYOUT_HINT}.")

    need = {"transformer": transformer_path, "vae": vae_path}
    if load_text_encoder:
        need["text_encoder"] = text_encoder_path
        need["tokenizer"] = tokenizer_path
    if base is None:
        lacking = [k for k, v in need.items() if v is None]
        if lacking:
            extra = (" (a single .safetensors file holds no tokenizer: give tokenizer_path= the tokenizer/ folder "
                     f"of {REPO_HINT})") if "tokenizer" in lacking else ""
            raise InputError(f"no base_path given, so every part must be given; missing: "
                             f"{', '.join(k + '_path' for k in lacking)}{extra}.")
    else:
        missing_sub = [k for k, v in need.items() if v is None and not (base / k).is_dir()]
        if missing_sub:
            raise ModelFilesError(f"base_path {base} has no {', '.join(s + '/' for s in missing_sub)} subfolder(s); "
                                  f"{LAYOUT_HINT}. Or give the missing part(s) as single files "
                                  f"({', '.join(s + '_path=' for s in missing_sub)}).")

    def src(name, override):
        return override if override is not None else base / name

    # 1. validate everything (headers only), build on meta
    plans = {
        "transformer": _plan_transformer(src("transformer", transformer_path)),
        "vae": _plan_vae(src("vae", vae_path)),
    }
    if load_text_encoder:
        plans["text_encoder"] = _plan_text_encoder(src("text_encoder", text_encoder_path))
    tok_src = tokenizer_path if tokenizer_path is not None else (
        base / "tokenizer" if base is not None and (base / "tokenizer").is_dir() else None)
    if tok_src is not None:
        _tokenizer_source(tok_src)

    tcfg, vcfg = plans["transformer"].config, plans["vae"].config
    if vcfg.get("latent_channels") != tcfg.get("in_channels"):
        raise ModelFilesError(
            f"vae ({plans['vae'].weights.label}) has {vcfg.get('latent_channels')} latent channels but the transformer "
            f"({plans['transformer'].weights.label}) expects {tcfg.get('in_channels')}: they are not from the same model "
            f"(CogView4 uses a 16-channel VAE).")
    if load_text_encoder:
        hid = plans["text_encoder"].config.get("hidden_size")
        if hid != tcfg.get("text_embed_dim"):
            raise ModelFilesError(
                f"text_encoder ({plans['text_encoder'].weights.label}) has hidden size {hid} but the transformer "
                f"expects text_embed_dim {tcfg.get('text_embed_dim')}: they are not from the same model.")

    # 2. light parts, then the heavy ones
    tokenizer = load_tokenizer(tok_src) if tok_src is not None else None
    if load_text_encoder and tokenizer is not None:
        vocab = plans["text_encoder"].config.get("vocab_size")
        if vocab is not None and len(tokenizer) > vocab:
            raise ModelFilesError(f"tokenizer ({tok_src}) has {len(tokenizer)} tokens but the text encoder's vocabulary "
                                  f"has {vocab}: they are not from the same model.")
    if base is not None and (base / "scheduler").is_dir():
        scheduler = _load_scheduler(base / "scheduler")
    else:
        if base is not None:
            warnings.warn(f"{base} has no scheduler/ folder; using CogView4's default scheduler config.")
        scheduler = default_scheduler()

    transformer = _materialise(plans["transformer"], dtype, device, check_finite)
    vae = _materialise(plans["vae"], dtype, device, check_finite)
    text_encoder = _materialise(plans["text_encoder"], dtype, device, check_finite) if load_text_encoder else None
    return CogView4Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)
