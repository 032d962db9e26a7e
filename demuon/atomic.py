"""Atomic file writes (layer 1: imports nothing from demuon).

:func:`atomic_write_bytes` writes through a temp file in the same folder, flushes, fsyncs, renames
over the target and fsyncs the folder: a crash at any point leaves either the old file or the new
one, never half of either. Given ``previous``, the old file is renamed there only once the new data
is on disk, just before the new file takes its place. Results, summaries and checkpoints all go
through it. A process killed mid-write leaves its temp file (``.<name>.<random>``) behind;
:func:`remove_temp_files` removes those of one target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Prefix of the temp files :func:`atomic_write_bytes` makes (``.<name>.<random>``).
TEMP_PREFIX = "."


def temp_prefix(path: Path) -> str:
    """The name every temp file of a write to ``path`` starts with."""
    return f"{TEMP_PREFIX}{path.name}."


def atomic_write_bytes(path: Path, data: bytes, *, previous: Path | None = None) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename.

    With ``previous`` (in the same folder), an existing ``path`` is first renamed to ``previous``
    (replacing it), after the new data is fsynced: the old file is kept, never lost before the new
    one is complete. A crash between the two renames leaves ``previous`` and no ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, data)
    try:
        if previous is not None:
            _rotate(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_temp_files(path: Path) -> list[Path]:
    """Remove the temp files that interrupted writes to ``path`` left in its folder (only
    ``.<name>.*`` of this target, only plain files). Returns the removed paths, sorted."""
    prefix = temp_prefix(path)
    try:
        entries = sorted(path.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        if entry.name.startswith(prefix) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_temp(path: Path, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _rotate(path: Path, previous: Path) -> None:
    """Rename ``path`` to ``previous`` (if ``path`` exists) and make that rename durable before
    anything takes ``path``'s place."""
    try:
        os.replace(path, previous)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
