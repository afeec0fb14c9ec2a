"""Disk cache of VAE latents and text embeddings, so the text encoder (GLM-4-9B, ~19 GB in bf16)
and the VAE need not be loaded while training.

Layout (``<cache.dir>``, default ``<output_dir>/cache``)::

    latents/<k[:2]>/<k>.safetensors   "latents" [16, h, w] (target, float32), "control" [17, h, w] ([Z_f, Z_m])
    text/<k[:2]>/<k>.safetensors      "embeds" [T, D] (the pipeline's encode_prompt([prompt]), float32)

Keys are SHA-256 hashes of everything the entry depends on, so a changed input simply
misses (and is recomputed) instead of serving stale data; stale files are never read again
(delete the folder to reclaim the space):

* latent key: the VAE's identity (every file of the VAE: name, size, mtime; the VAE dtype),
  the sample's image and mask files (resolved path, size, mtime_ns), the bucket it is cropped
  to, and CACHE_VERSION (bumped when the preprocessing code changes);
* text key: the text encoder's and tokenizer's identity (their files), the dtype, the prompt.

References are NOT cached: their random crop and shift change every epoch. Stage 2 therefore
keeps the VAE (about 0.4 GB in bf16 for CogView4) but not the text encoder.
Entries are written atomically (temp file + rename): a killed run leaves no half entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from dreampainter_core.weights import atomic_save_safetensors

__all__ = ["CACHE_VERSION", "files_identity", "file_stat", "ConditionCache"]

CACHE_VERSION = 1


def file_stat(path: str | os.PathLike) -> list:
    p = Path(path).resolve()
    st = p.stat()
    return [str(p), int(st.st_size), int(st.st_mtime_ns)]


def files_identity(paths: Iterable[str | os.PathLike], extra: dict | None = None) -> str:
    """Hash of the (name, size, mtime) of every file under the given files/folders."""
    entries = []
    for root in paths:
        root = Path(root)
        if root.is_dir():
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                st = f.stat()
                entries.append([str(f.resolve()), int(st.st_size), int(st.st_mtime_ns)])
        elif root.exists():
            entries.append(file_stat(root))
        else:
            entries.append([str(root), None, None])
    payload = json.dumps({"v": CACHE_VERSION, "files": entries, "extra": extra or {}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ConditionCache:
    """Lookup/store of per-sample latents and per-prompt embeddings; counts hits and misses."""

    def __init__(self, root: str | os.PathLike, vae_identity: str, text_identity: str):
        self.root = Path(root)
        self.vae_identity = vae_identity
        self.text_identity = text_identity
        self.stats = {"latent_hits": 0, "latent_misses": 0, "text_hits": 0, "text_misses": 0}

    # ---- keys ---------------------------------------------------------------------------
    def latent_key(self, sample, bucket) -> str:
        files = [file_stat(sample.image_path)] + [file_stat(p) for p in sample.mask_paths]
        return _hash({"v": CACHE_VERSION, "vae": self.vae_identity, "files": files, "bucket": list(bucket)})

    def text_key(self, prompt: str) -> str:
        return _hash({"v": CACHE_VERSION, "text": self.text_identity, "prompt": prompt})

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    # ---- access -------------------------------------------------------------------------
    def has_latents(self, key: str) -> bool:
        return self._path("latents", key).is_file()

    def has_text(self, key: str) -> bool:
        return self._path("text", key).is_file()

    def _read(self, path: Path) -> dict[str, torch.Tensor] | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            return None
        except Exception:  # unreadable (disk trouble): treat as a miss, it is rewritten
            return None

    def get_latents(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        t = self._read(self._path("latents", key))
        if t is None or "latents" not in t or "control" not in t:
            self.stats["latent_misses"] += 1
            return None
        self.stats["latent_hits"] += 1
        return t["latents"], t["control"]

    def put_latents(self, key: str, latents: torch.Tensor, control: torch.Tensor) -> None:
        atomic_save_safetensors(
            {"latents": latents.float(), "control": control.float()}, self._path("latents", key), {"cache_version": str(CACHE_VERSION)}
        )

    def get_text(self, key: str) -> torch.Tensor | None:
        t = self._read(self._path("text", key))
        if t is None or "embeds" not in t:
            self.stats["text_misses"] += 1
            return None
        self.stats["text_hits"] += 1
        return t["embeds"]

    def put_text(self, key: str, embeds: torch.Tensor) -> None:
        atomic_save_safetensors({"embeds": embeds.float()}, self._path("text", key), {"cache_version": str(CACHE_VERSION)})
