"""Training checkpoints: atomic, keep-last-N, everything needed for an exact resume, no pickle.

A checkpoint is a folder ``<output_dir>/checkpoint-<step:08d>/``::

    trainable.safetensors   the trained parameters (full, unsharded, their training dtype)
    ema.safetensors         EMA shadow of the same (when EMA is on)
    optimizer.safetensors   optimizer state tensors, keyed "state/<param name>/<field>"
    optimizer.json          optimizer param groups + non-tensor state (JSON)
    scheduler.json          LR scheduler state_dict (JSON)
    rng.safetensors         per-rank torch CPU/CUDA generator states and numpy's MT19937 key
    rng.json                per-rank python `random` state and the rest of numpy's state
    config.toml             the run's whole config
    state.json              step, epoch, position in the epoch's batch order, world layout (written last)

The folder is assembled as ``.checkpoint-<step>.tmp-<pid>`` and renamed into place, so a
kill leaves either the previous checkpoints or a complete new one (stale temp folders are
removed by the next save). Nothing is pickled: tensors go to safetensors, the rest to JSON,
so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "list_checkpoints",
    "latest_checkpoint",
    "CheckpointWriter",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
]

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d{8})$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


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
# write / read


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
        if self.final.exists():  # e.g. re-saving the same step after a resume
            old = self.final.with_name(self.final.name + f".old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        prune(self.output_dir, keep_last)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def prune(output_dir: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(output_dir)
    for old in ckpts[: max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for p in output_dir.iterdir():  # temp folders of runs that were killed while saving
        if p.name.startswith(".checkpoint-") and ".tmp-" in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Everything in a checkpoint folder (tensors on CPU)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
    out: dict[str, Any] = {"path": path, "state": _read_json(path / "state.json")}
    out["trainable"] = _read_tensors(path / "trainable.safetensors")
    out["ema"] = _read_tensors(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    out["optimizer"] = unflatten_optimizer_state(
        _read_tensors(path / "optimizer.safetensors"), _read_json(path / "optimizer.json")
    )
    out["scheduler"] = _read_json(path / "scheduler.json")
    rng_t = _read_tensors(path / "rng.safetensors")
    rng_m = _read_json(path / "rng.json")
    out["rng"] = {}
    for rank_key, meta in rng_m.items():
        prefix = f"{rank_key}."
        out["rng"][int(rank_key.removeprefix("rank"))] = (
            {k[len(prefix):]: v for k, v in rng_t.items() if k.startswith(prefix)},
            meta,
        )
    return out
