"""Atomic file writes (layer 1: imports nothing from demuon).

:func:`atomic_write_bytes` writes through a temp file in the same folder, flushes, fsyncs, renames
over the target and fsyncs the folder: a crash at any point leaves either the old file or the new
one, never half of either. Results, summaries and checkpoints all go through it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Prefix of the temp files :func:`atomic_write_bytes` makes (``.<name>.<random>``).
TEMP_PREFIX = "."


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
