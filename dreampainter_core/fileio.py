"""Atomic file writes: nothing the user made is ever left half-written.

Everything goes to a temporary file in the destination folder (same file system, so the
final rename is atomic) and replaces the destination only once it is complete; on any
error the temporary file is removed and the old file, if any, is untouched. The file is
fsynced before the rename and its folder after it, so a power loss cannot leave the new
name pointing at data that never reached the disk. A process killed mid-write leaves its
temporary file behind (``.<name>.<8 random chars>.tmp``): remove_stale_temp_files removes
those at the start of the next run that owns the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_file", "fsync_dir", "file_digest",
           "remove_stale_temp_files"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
# atomic_path's temporary names: mkstemp's 8 random characters between our prefix and suffix
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to the disk (opened for writing: Windows cannot flush a read-only handle)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename or a new file in it) to the disk. No-op on Windows, which
    cannot open a folder for this (NTFS journals the rename itself)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically (the
    temporary file is fsynced before the rename, the folder after it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(tmp)  # whoever wrote it (save_file, PIL, ...) may not have
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed atomic writes left directly in `folder` (returns them).
    Only for a folder that no other live process is writing into."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if _TEMP_NAME.match(p.name) and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed
