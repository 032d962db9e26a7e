"""Compiled kernels, built on first use with the system C compiler (layer 2: numeric kernels).

The wheel stays pure Python (one wheel for every architecture, docker/wheels.sh): the C source
ships as package data, and the first stochastic block quantization in a process compiles it
(``$CC`` or ``cc``, ``-O3``, no fast-math, no FP contraction) into a shared library under
``$DEMUON_NATIVE_DIR`` (default ``$XDG_CACHE_HOME/demuon`` or ``~/.cache/demuon``). The library is
named by the hash of the source, the flags and the machine type, and written atomically, so
concurrent processes agree and a changed source rebuilds. Without a compiler, with an unwritable
cache, or with ``DEMUON_NATIVE=0`` the torch path is used instead; :func:`status` says which and
why. The native path gives the torch path's codes bit for bit (scales may differ in their last
bits: docs/algorithms.md §7), so peers may mix them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("_blockq.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off")
COMPILE_TIMEOUT_S = 120.0
MAX_BLOCK = 65536  # the largest block the C functions take (_blockq.c); larger ones use torch

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": CDLL | None, "why": str


def cache_dir() -> Path:
    if explicit := os.environ.get("DEMUON_NATIVE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "demuon"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler!r} not on PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} exited {done.returncode}: {done.stderr.strip()[:300]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("DEMUON_NATIVE", "1") == "0":
        _state["why"] = "off (DEMUON_NATIVE=0)"
        return None
    try:
        key = SOURCE.read_bytes() + " ".join((*FLAGS, platform.machine())).encode()  # a shared home
        digest = hashlib.sha256(key).hexdigest()[:16]
        target = cache_dir() / f"blockq-{digest}.so"  # Path.home() raises RuntimeError without a home
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _state["why"] = f"torch path: {exc}"
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.demuon_stochastic_grid.argtypes = (p, i64, i64, ctypes.c_int32, p, p, p)
    lib.demuon_stochastic_grid.restype = ctypes.c_int
    lib.demuon_stochastic_sign.argtypes = (p, i64, i64, i64, p, p, p)
    lib.demuon_stochastic_sign.restype = ctypes.c_int
    lib.demuon_sfc64_fill.argtypes = (p, p, i64)
    lib.demuon_sfc64_fill.restype = None
    _state["why"] = f"native ({target})"
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when the torch path must be used (decided once per process)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        lib = _state["lib"]
    return lib if isinstance(lib, ctypes.CDLL) else None


def status() -> str:
    """Which path stochastic block quantization takes in this process, and why."""
    library()
    return str(_state["why"])


def reset() -> None:
    """Forget the decision (tests: after changing ``DEMUON_NATIVE`` or the cache folder)."""
    with _lock:
        _state.clear()
