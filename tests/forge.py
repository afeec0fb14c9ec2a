"""Hostile safetensors files for tests, written byte by byte where save_file would refuse."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import safe_open


def raw_safetensors(path: Path, header, data: bytes = b"", declared_length: int | None = None) -> Path:
    """A file with exactly this header (a dict, or str/bytes used as they are) and data; the 8-byte
    length field says ``declared_length`` when given."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    length = len(header) if declared_length is None else declared_length
    path.write_bytes(struct.pack("<Q", length) + header + data)
    return path


def read_all(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, to change and write back with save_file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
