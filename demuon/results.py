"""The one result schema shared by ``demuon simulate`` and ``demuon launch`` (and read by
``demuon report``): ``metrics.jsonl`` (one JSON object per round) and ``summary.json``.

``summary.json``::

    {"schema": "demuon.summary/1", "algorithm": "demuon", "topology": "ring", "n_peers": 4,
     "rounds": 20, "source": "simulate" | "launch",
     "peers": [{"id": 0, "final_round": 19, "final_train_loss": 1.23,
                "fingerprint": {"sum": -3.1, "l2": 10.2}}, ...],
     "average": {"validation_loss": 1.30}}

Files are written atomically (temp file, fsync, rename), so a crash never leaves half a summary.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "demuon.summary/1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def peer_entry(
    peer_id: int, final_round: int, final_train_loss: float, fp: tuple[float, float]
) -> dict[str, Any]:
    return {
        "id": peer_id,
        "final_round": final_round,
        "final_train_loss": final_train_loss,
        "fingerprint": {"sum": fp[0], "l2": fp[1]},
    }


def summary(
    *,
    algorithm: str,
    topology: str,
    rounds: int,
    peers: Sequence[Mapping[str, Any]],
    validation_loss: float | None,
    source: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "algorithm": algorithm,
        "topology": topology,
        "n_peers": len(peers),
        "rounds": rounds,
        "source": source,
        "peers": sorted((dict(p) for p in peers), key=lambda p: p["id"]),
        "average": {"validation_loss": validation_loss},
    }
    if extra:
        out.update(extra)
    return out


def write_summary(directory: Path, data: Mapping[str, Any]) -> Path:
    path = directory / "summary.json"
    atomic_write_bytes(path, (json.dumps(_clean(dict(data)), indent=2) + "\n").encode())
    return path


def read_summary(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "summary.json").read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{directory / 'summary.json'}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data


class MetricsWriter:
    """Appends one JSON line per round and flushes, so a crash loses at most the line in flight."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = path.open("a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(_clean(dict(row))) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics.jsonl (a torn last line from a crash is ignored)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
