"""Byte corpora for the GPT workload: a text file, a folder of text files, or (by default) the
Python standard library's own ``.py`` sources, which every machine with Python already has.

The default corpus is the stdlib directory (``sysconfig.get_paths()["stdlib"]``), its ``.py``
files sorted by relative path, leaving out ``site-packages``/``dist-packages`` (installed
packages differ between machines) and ``test``/``tests`` folders, concatenated until
``corpus_bytes``. Two machines with the same Python version therefore read the same bytes.

Loaded corpora are cached per ``(path, corpus_bytes)`` in the process, so eight simulated peers
read the disk once.
"""

from __future__ import annotations

import codecs
import functools
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import torch

from demuon.errors import WorkloadError

STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests"})


def stdlib_dir() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def walk(root: Path, *, suffix: str = "", skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Regular files under ``root`` ending in ``suffix``, sorted by relative path; folders named in
    ``skip_dirs`` are not entered (so a large ``site-packages`` is never listed)."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(suffix) and path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    return [p for _, p in sorted(found)]


def stdlib_sources(root: Path) -> list[Path]:
    """``.py`` files under ``root``, sorted by relative path, outside the excluded folders."""
    return walk(root, suffix=".py", skip_dirs=STDLIB_EXCLUDED_DIRS)


def folder_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (recursively), sorted by relative path."""
    return walk(root)


def is_text(data: bytes) -> bool:
    """True if ``data`` has no NUL byte and is valid UTF-8 (a sequence cut at the end is allowed,
    since files may be read only up to a byte budget)."""
    if b"\0" in data:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True


def concatenate(files: Iterable[Path], limit: int) -> bytes:
    """The text files among ``files`` (binary or undecodable ones skipped), joined in order and
    cut at ``limit`` bytes."""
    parts: list[bytes] = []
    total = 0
    for path in files:
        if total >= limit:
            break
        try:
            with path.open("rb") as f:
                data = f.read(limit - total)
        except OSError:
            continue
        if data and is_text(data):
            parts.append(data)
            total += len(data)
    return b"".join(parts)


@functools.lru_cache(maxsize=8)
def _load(path: str | None, corpus_bytes: int) -> bytes:
    """Uncached loader behind :func:`load_corpus` (``path`` already resolved, or None)."""
    if path is None:
        root = stdlib_dir()
        data = concatenate(stdlib_sources(root), corpus_bytes)
        where = f"Python standard library at {root}"
    else:
        p = Path(path)
        where = path
        if p.is_dir():
            data = concatenate(folder_files(p), corpus_bytes)
        elif p.is_file():
            with p.open("rb") as f:
                data = f.read(corpus_bytes)
            if not is_text(data):
                raise WorkloadError(f"corpus {path} is not UTF-8 text", value=path)
        else:
            raise WorkloadError(f"corpus {path} does not exist", value=path)
    if not data:
        raise WorkloadError(f"corpus {where} is empty (no readable text files)", value=path)
    return data


def load_corpus(path: Path | str | None, corpus_bytes: int) -> bytes:
    """At most ``corpus_bytes`` bytes of the corpus at ``path`` (a text file or a folder of text
    files; None = the Python stdlib sources). Raises :class:`WorkloadError` naming the path if it
    does not exist, is not text, or holds no text."""
    if path is None:
        return _load(None, corpus_bytes)
    if not Path(path).expanduser().exists():
        raise WorkloadError(f"corpus {path} does not exist", value=str(path))
    return _load(str(Path(path).expanduser().resolve()), corpus_bytes)


def as_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    """The bytes as a 1-D ``uint8`` tensor on ``device`` (a copy; ``data`` is not modified)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
