"""Training checkpoints: atomic, verified, keep-last-N, everything needed for an exact resume, no pickle.

A checkpoint is a folder ``<output_dir>/checkpoint-<step:08d>/``::

    trainable.safetensors   the trained parameters (full, unsharded, their training dtype)
    ema.safetensors         EMA shadow of the same (when EMA is on)
    optimizer.safetensors   optimizer state tensors, keyed "state/<param name>/<field>"
    optimizer.json          optimizer param groups + non-tensor state (JSON)
    scheduler.json          LR scheduler state_dict (JSON)
    rng.safetensors         per-rank torch CPU/CUDA generator states and numpy's MT19937 key
    rng.json                per-rank python `random` state and the rest of numpy's state
    config.toml             the run's whole config
    state.json              step, epoch, position in the epoch's batch order, world layout
    manifest.json           every other file's size and sha256 (written last)

The folder is assembled as ``.checkpoint-<step>.tmp-<pid>``; every file is fsynced, the manifest
written, the folder fsynced, renamed into place and its parent fsynced, so a kill or a power loss
leaves either the previous checkpoints or a complete new one (remove_stale_temp, at the start of
a run, removes what a killed save left). Nothing is pickled: tensors go to safetensors, the rest
to JSON, so loading a checkpoint cannot run code.

Resume (load_newest_intact) verifies the newest checkpoint against its manifest (sizes, then
hashes), reads it, and checks that its weights and optimizer state are finite; a checkpoint
that fails any of that is reported (which one, which file, what is wrong) and the next older one
is tried. Checkpoints written before manifests existed (format 1, no manifest.json) are loaded
with a warning after structural checks (files present, JSON and safetensors headers parse) and
the finite check. prune keeps the newest ``keep_last`` checkpoints that verify: damaged ones do
not count, so a damaged newest checkpoint never gets the intact older ones deleted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreampainter_core.errors import DreamPainterError
from dreampainter_core.fileio import file_digest, fsync_dir, fsync_file, remove_stale_temp_files

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "list_checkpoints",
    "checkpoint_problem",
    "load_checkpoint",
    "load_newest_intact",
    "CheckpointWriter",
    "read_checkpoint",
    "nonfinite_tensor",
    "prune",
    "remove_stale_temp",
    "rng_state",
    "set_rng_state",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
]

CHECKPOINT_FORMAT = 2  # 2: with manifest.json; 1: without (still loaded, with a warning)
MANIFEST = "manifest.json"
# What a checkpoint without a manifest must hold (ema.safetensors and config.toml are optional).
_LEGACY_REQUIRED = ("state.json", "trainable.safetensors", "optimizer.safetensors", "optimizer.json",
                    "scheduler.json", "rng.safetensors", "rng.json")
_NAME = re.compile(r"^checkpoint-(\d{8})$")
_TEMP_DIR = re.compile(r"^(\.checkpoint-\d{8}\.tmp-\d+|checkpoint-\d{8}\.old-\d+)$")


class CheckpointError(DreamPainterError, RuntimeError):
    """A checkpoint is damaged or unreadable, or no intact one is left to resume from."""


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-<step>`` folder in `output_dir`, oldest first, intact or not."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def remove_stale_temp(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what killed runs left in `output_dir`: half-assembled checkpoint folders, the old copy of
    a checkpoint being replaced, and temporary files of atomic writes (exports, logs, validation
    grids). Call it at the start of a run, before anything writes there. Returns what was removed."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    removed = []
    for p in sorted(out.iterdir()):
        if _TEMP_DIR.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for folder in (out, out / "logs", out / "validation"):
        removed += remove_stale_temp_files(folder)
    return removed


# ---------------------------------------------------------------------------------------
# JSON-safe helpers


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"__tuple__": [_jsonable(x) for x in v]}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint's JSON")


def _unjson(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_unjson(x) for x in v["__tuple__"])
        return {k: _unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=1, sort_keys=True), encoding="utf-8")


def _read_json(path: Path) -> Any:
    return _unjson(json.loads(path.read_text(encoding="utf-8")))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


# ---------------------------------------------------------------------------------------
# optimizer state <-> (tensors, JSON)


def flatten_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A (name-keyed) optimizer state_dict -> safetensors tensors + JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest_state: dict[str, dict[str, Any]] = {}
    for pname, fields in osd.get("state", {}).items():
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pname}/{key}"] = _cpu(value)
            else:
                rest_state.setdefault(str(pname), {})[key] = value
    meta = {"param_groups": osd.get("param_groups", []), "state": rest_state}
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, rest = key.split("/", 1)
        pname, field = rest.rsplit("/", 1)
        state.setdefault(pname, {})[field] = value
    for pname, fields in meta.get("state", {}).items():
        state.setdefault(pname, {}).update(fields)
    return {"state": state, "param_groups": meta.get("param_groups", [])}


# ---------------------------------------------------------------------------------------
# RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states as (tensors, JSON-able)."""
    tensors = {"torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state().clone()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(cached)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------
# write


class CheckpointWriter:
    """Assembles one checkpoint in a temp folder and renames it into place."""

    def __init__(self, output_dir: str | os.PathLike, step: int):
        self.output_dir = Path(output_dir)
        self.step = int(step)
        self.final = self.output_dir / f"checkpoint-{self.step:08d}"
        self.tmp = self.output_dir / f".checkpoint-{self.step:08d}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        save_file({k: _cpu(v) for k, v in tensors.items()}, str(self.tmp / name), metadata=metadata)

    def json(self, name: str, obj: Any) -> None:
        _write_json(self.tmp / name, obj)

    def text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text, encoding="utf-8")

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, state: dict[str, Any], keep_last: int) -> Path:
        _write_json(self.tmp / "state.json", {"format": CHECKPOINT_FORMAT, **state})
        files = {}
        for p in sorted(self.tmp.iterdir()):
            if p.is_file():
                fsync_file(p)
                files[p.name] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        _write_json(self.tmp / MANIFEST, {"format": CHECKPOINT_FORMAT, "files": files})  # last: it vouches for the rest
        fsync_file(self.tmp / MANIFEST)
        fsync_dir(self.tmp)
        if self.final.exists():  # e.g. re-saving the same step after a resume
            old = self.final.with_name(self.final.name + f".old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        fsync_dir(self.output_dir)
        _remember_intact(self.final)
        prune(self.output_dir, keep_last)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# verify

# Checkpoints this process wrote or verified, with the identity of their manifest then: pruning
# after every save must not re-hash the kept checkpoints (tens of GB at full scale).
_intact: dict[Path, tuple[int, int, int]] = {}


def _manifest_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = (path / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _remember_intact(path: Path) -> None:
    ident = _manifest_identity(path)
    if ident is not None:
        _intact[path.resolve()] = ident


def _is_intact(path: Path) -> bool:
    ident = _manifest_identity(path)
    if ident is not None and _intact.get(path.resolve()) == ident:
        return True
    if checkpoint_problem(path) is not None:
        return False
    _remember_intact(path)
    return True


def _legacy_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint without a manifest, as far as can be seen without reading
    its tensors: required files present, JSON parses, safetensors headers parse."""
    for name in _LEGACY_REQUIRED + (("ema.safetensors",) if (path / "ema.safetensors").exists() else ()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        try:
            if name.endswith(".json"):
                json.loads(f.read_text(encoding="utf-8"))
            else:
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
        except Exception as e:
            return f"{name} cannot be read ({_short(e)})"
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """None when the checkpoint folder matches its manifest (every listed file present, with its size
    and sha256), else what is wrong, naming the file. A checkpoint without a manifest is judged by
    _legacy_problem if its state.json says format 1 (written before manifests), and is damaged
    otherwise (the manifest is written last, so its absence means the folder is incomplete)."""
    path = Path(path)
    if not path.is_dir():
        return "the folder does not exist"
    manifest = path / MANIFEST
    if not manifest.is_file():
        try:
            fmt = json.loads((path / "state.json").read_text(encoding="utf-8")).get("format", 1)
        except FileNotFoundError:
            return "state.json and manifest.json are missing"
        except Exception as e:
            return f"state.json cannot be read ({_short(e)}) and manifest.json is missing"
        if fmt == 1:
            return _legacy_problem(path)
        return f"{MANIFEST} is missing (it is written last: the checkpoint is incomplete or was altered)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        entries = [(str(n), int(e["bytes"]), str(e["sha256"])) for n, e in files.items()]
    except Exception as e:
        return f"{MANIFEST} cannot be read ({_short(e)})"
    for name, size, _ in entries:  # sizes first: cheap, and they catch truncated and emptied files
        f = path / name
        if Path(name).name != name or not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size} (truncated, emptied or overwritten)"
    for name, _, digest in entries:
        if file_digest(path / name) != digest:
            return f"{name} differs from the manifest's sha256 (its bytes changed after it was written)"
    return None


def nonfinite_tensor(tensors: dict[str, torch.Tensor] | None) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, t in (tensors or {}).items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------
# read


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Everything in a checkpoint folder (tensors on CPU). Not verified against the manifest
    (load_checkpoint does that); a file that is missing or cannot be parsed, a state.json without
    its step, or non-finite weights or optimizer state raise CheckpointError naming the file."""
    path = Path(path)

    def read(name: str, reader: Callable[[Path], Any]) -> Any:
        try:
            return reader(path / name)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {name} is missing") from None
        except Exception as e:
            raise CheckpointError(f"{path}: {name} cannot be read ({_short(e)})") from None

    state = read("state.json", _read_json)
    m = _NAME.match(path.name)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: state.json holds no step number")
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{path}: state.json says step {state['step']}, the folder's name says {int(m.group(1))}")
    out: dict[str, Any] = {"path": path, "state": state}
    out["trainable"] = read("trainable.safetensors", _read_tensors)
    out["ema"] = read("ema.safetensors", _read_tensors) if (path / "ema.safetensors").is_file() else None
    opt_tensors = read("optimizer.safetensors", _read_tensors)
    out["optimizer"] = unflatten_optimizer_state(opt_tensors, read("optimizer.json", _read_json))
    out["scheduler"] = read("scheduler.json", _read_json)
    for name, tensors in (("trainable.safetensors", out["trainable"]), ("ema.safetensors", out["ema"]),
                          ("optimizer.safetensors", opt_tensors)):
        bad = nonfinite_tensor(tensors)
        if bad is not None:
            raise CheckpointError(f"{path}: {name}: tensor {bad!r} holds NaN or infinite values")
    rng_t = read("rng.safetensors", _read_tensors)
    rng_m = read("rng.json", _read_json)
    out["rng"] = {}
    try:
        for rank_key, meta in rng_m.items():
            prefix = f"{rank_key}."
            out["rng"][int(rank_key.removeprefix("rank"))] = (
                {k[len(prefix):]: v for k, v in rng_t.items() if k.startswith(prefix)},
                meta,
            )
    except Exception as e:
        raise CheckpointError(f"{path}: rng.json does not match rng.safetensors ({_short(e)})") from None
    return out


def load_checkpoint(path: str | os.PathLike, say: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """read_checkpoint after checkpoint_problem: a checkpoint that does not match its manifest raises
    CheckpointError naming the file; one without a manifest (format 1) is loaded with a warning."""
    path = Path(path)
    _intact.pop(path.resolve(), None)  # verified afresh: its files may have changed since
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    if not (path / MANIFEST).is_file():
        say(f"warning: {path} was written before checkpoints had a manifest: its files cannot be verified "
            "(only that they parse and hold finite values)")
    ck = read_checkpoint(path)
    _remember_intact(path)
    return ck


def load_newest_intact(output_dir: str | os.PathLike, say: Callable[[str], None] = lambda msg: None) -> dict[str, Any] | None:
    """load_checkpoint of the newest checkpoint in `output_dir` that is intact, saying (through `say`)
    which newer ones were passed over and why; ``ck["skipped"]`` lists them as (path, reason). None
    when there is no checkpoint at all; CheckpointError, listing every problem, when none is intact
    (nothing is started afresh over them: that run would overwrite them as it reached their steps)."""
    out = Path(output_dir)
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(out)):
        try:
            ck = load_checkpoint(path, say)
        except CheckpointError as e:
            reason = str(e).removeprefix(f"{path}: ")
            skipped.append((path, reason))
            say(f"{path.name} cannot be resumed from: {reason}. Trying the one before it.")
            continue
        if skipped:
            say(f"resuming from {path.name}, the newest intact checkpoint in {out} (passed over: "
                f"{', '.join(p.name for p, _ in skipped)}; left in place, not counted by pruning, replaced when "
                "this run saves those steps again)")
        ck["skipped"] = skipped
        return ck
    if not skipped:
        return None
    lines = "\n  ".join(f"{p.name}: {reason}" for p, reason in skipped)
    raise CheckpointError(
        f"no intact checkpoint to resume from in {out}:\n  {lines}\n"
        "Nothing was loaded or deleted. Move the damaged folders away to keep them, then run again to start "
        "afresh, or set checkpoint.resume=none to start afresh here (that run replaces each damaged folder "
        "when it saves that step).")


def prune(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` intact checkpoints. Damaged ones do not count: those newer
    than the kept ones stay (a damaged newest checkpoint never costs an intact older one), older ones go."""
    ckpts = list_checkpoints(output_dir)
    kept = 0
    for i in range(len(ckpts) - 1, -1, -1):
        kept += _is_intact(ckpts[i])
        if kept == keep_last:
            for old in ckpts[:i]:
                _intact.pop(old.resolve(), None)
                shutil.rmtree(old, ignore_errors=True)
            break
