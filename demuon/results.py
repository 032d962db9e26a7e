"""The one result schema shared by ``demuon simulate`` and ``demuon launch`` (and read by
``demuon report``), in a run folder ``DIR``:

* ``DIR/peer-<i>/metrics.jsonl``: one row per round of peer i, the keys of
  :class:`demuon.node.rounds.RoundMetrics` (the same for both commands);
* ``DIR/cluster.jsonl`` (simulator only): one row per round with ``round, train_loss`` (mean over
  peers), ``val_loss`` (the averaged model, every ``eval_every`` rounds, else null),
  ``consensus_error, tracking_gap, bytes_out`` (all peers), ``lr``;
* ``DIR/summary.json``::

    {"schema": "demuon.summary/2", "source": "simulate" | "launch", "algorithm": "demuon",
     "topology": "ring", "codec": "identity", "lr": 0.02, "dtype": "float32", "n_peers": 4,
     "rounds": 20, "wall_s": 3.1, "interrupted": false, "failed": [], "averaged_peers": [0, 1, 2, 3],
     "tracking_drift": 1e-15, "faults": {"injected": 0, "missing": 0, "late": 0, ...},
     "phases": {"V": {"codec": {"kind": "identity"}, "gamma": 1.0}, "X": {...}},
     "bytes": {"out_total": 51200, "out_per_peer": 12800.0,
               "per_peer": [{"id": 0, "rounds": 20, "out": 12800, "in": 12800, "out_V": 6400,
                             "out_X": 6400}, ...]},
     "peers": [{"id": 0, "final_round": 19, "final_train_loss": 1.23,
                "fingerprint": {"sum": -3.1, "l2": 10.2}, "status": "done", "exit_code": 0,
                "from": "final"}, ...],
     "average": {"validation_loss": 1.30}}

  ``status`` is done | stopped | crashed | failed | left | lonely (it ran but never heard from a
  neighbour); ``from`` names where the peer's final state was read (final, checkpoint, metrics,
  none; the simulator's is always final). ``tracking_drift`` is
  ‖mean V − mean M‖ / ‖mean M‖ at the end, tracker mass in flight counted as delivered (None
  without a tracker, or when a peer's state is missing); ``faults`` totals the rows' counters;
  ``codec`` is the kind of both phases (``V=<kind> X=<kind>`` when they differ) and ``phases``
  each phase's codec and γ; ``bytes`` totals per peer what it put on the wire, as the daemon
  sends it (whole messages: header frame, payload frames, keyframes, × recipients, resends),
  from its ``metrics.jsonl`` rows (:func:`byte_totals`).

``summary.json`` is written atomically (temp file, fsync, rename), so a crash never leaves half a
summary; ``.jsonl`` files are appended and flushed row by row, and a torn last line is ignored
when read. A fresh run replaces its ``metrics.jsonl``; a resumed one first drops the rows of the
rounds it runs again (:class:`MetricsWriter`). A peer that finished also leaves
``peer-<i>/final.json`` (its summary entry) and ``peer-<i>/final.pt`` (its parameters).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from demuon.atomic import atomic_write_bytes

SCHEMA = "demuon.summary/2"

#: Per-peer files of a run folder (``demuon simulate --out DIR`` and ``demuon launch --out DIR``).
PEER_DIR = "peer-{id}"
METRICS = "metrics.jsonl"
#: Cluster-level rows that only the simulator can compute (consensus error, tracking gap,
#: validation loss of the averaged model), one per round, in ``DIR/cluster.jsonl``.
CLUSTER = "cluster.jsonl"


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
    peer_id: int,
    final_round: int,
    final_train_loss: float,
    fp: tuple[float, float],
    *,
    status: str = "done",
    exit_code: int | None = 0,
    source: str = "final",
) -> dict[str, Any]:
    """One peer of ``summary.json`` (see the module docstring)."""
    return {
        "id": peer_id,
        "final_round": final_round,
        "final_train_loss": final_train_loss,
        "fingerprint": {"sum": fp[0], "l2": fp[1]},
        "status": status,
        "exit_code": exit_code,
        "from": source,
    }


def summary(
    *,
    source: str,
    algorithm: str,
    topology: str,
    codec: str,
    lr: float,
    dtype: str,
    rounds: int,
    peers: Sequence[Mapping[str, Any]],
    validation_loss: float | None,
    averaged_peers: Sequence[int],
    wall_s: float,
    interrupted: bool = False,
    tracking_drift: float | None = None,
    faults: Mapping[str, int] | None = None,
    phases: Mapping[str, Any] | None = None,
    per_peer_rows: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``summary.json`` of a run (every key is always present; see the module docstring).
    ``per_peer_rows`` (the peers' ``metrics.jsonl`` rows) give the ``bytes`` totals."""
    entries = sorted((dict(p) for p in peers), key=lambda p: p["id"])
    return {
        "schema": SCHEMA,
        "source": source,
        "algorithm": algorithm,
        "topology": topology,
        "codec": codec,
        "phases": dict(phases or {}),
        "lr": lr,
        "dtype": dtype,
        "n_peers": len(entries),
        "rounds": rounds,
        "wall_s": wall_s,
        "interrupted": interrupted,
        "failed": [p["id"] for p in entries if p.get("status") == "failed"],
        "averaged_peers": sorted(averaged_peers),
        "tracking_drift": tracking_drift,
        "faults": {key: int((faults or {}).get(key, 0)) for key in FAULT_COUNTS},
        "bytes": byte_totals(per_peer_rows or {}),
        "peers": entries,
        "average": {"validation_loss": validation_loss},
    }


#: Per-round row counters that ``summary.json`` totals under ``faults``.
FAULT_COUNTS = ("injected", "missing", "late", "duplicates", "rejected", "stale_dropped", "skipped")


def fault_totals(per_peer: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[str, int]:
    """The :data:`FAULT_COUNTS` summed over every row of every peer (``missing`` counts senders)."""
    totals = dict.fromkeys(FAULT_COUNTS, 0)
    for rows in per_peer.values():
        for r in rows:
            for key in FAULT_COUNTS:
                v = r.get(key)
                totals[key] += len(v) if isinstance(v, list) else int(v) if isinstance(v, int | float) else 0
    return totals


#: Per-round row byte counters that ``summary.json`` totals per peer under ``bytes``.
BYTE_COUNTS = {"out": "bytes_out", "in": "bytes_in", "out_V": "bytes_out_V", "out_X": "bytes_out_X"}


def byte_totals(per_peer: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Bytes as the peers put them on the wire (whole messages, headers and keyframes included):
    ``per_peer`` (one entry per peer, by id: ``out``, ``in``, ``out_V``, ``out_X`` summed over
    its rows, and ``rounds``, how many rows), ``out_total`` and ``out_per_peer`` (the mean)."""
    entries = []
    for peer, rows in sorted(per_peer.items()):
        entry: dict[str, Any] = {"id": peer, "rounds": len(rows)}
        for key, column in BYTE_COUNTS.items():
            entry[key] = sum(int(v) for r in rows if isinstance(v := r.get(column), int | float))
        entries.append(entry)
    total = sum(e["out"] for e in entries)
    return {
        "out_total": total,
        "out_per_peer": total / len(entries) if entries else 0.0,
        "per_peer": entries,
    }


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
    """Writes one JSON line per round and flushes, so a crash loses at most the line in flight.

    A fresh run (``resume_from`` None) replaces what an earlier run left in the file (``replaced``
    counts those rows), so a relaunch into the same folder does not follow the old rows. A run
    resumed at round ``resume_from`` keeps the earlier rows of rounds before it, drops those of
    rounds from it on (``dropped``: they are run again), and appends."""

    def __init__(self, path: Path, *, resume_from: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.replaced = 0
        self.dropped = 0
        old = read_metrics(path) if path.is_file() else []
        if resume_from is None:
            self.replaced = len(old)
            self._f = path.open("w", encoding="utf-8")
            return
        keep = [r for r in old if isinstance(r.get("round"), int) and r["round"] < resume_from]
        self.dropped = len(old) - len(keep)
        if self.dropped:  # atomically: a crash now leaves the old file or the trimmed one
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
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


def peer_folder(directory: Path, peer_id: int) -> Path:
    """``DIR/peer-<id>``: where peer ``peer_id`` of a run writes its files."""
    return directory / PEER_DIR.format(id=peer_id)


def read_per_peer(directory: Path) -> dict[int, list[dict[str, Any]]]:
    """``{peer id: rows}`` of every ``DIR/peer-<i>/metrics.jsonl`` (a folder without one: no rows)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for sub in directory.iterdir() if directory.is_dir() else ():
        name, _, number = sub.name.partition("-")
        if sub.is_dir() and name == "peer" and number.isdigit():
            path = sub / METRICS
            out[int(number)] = read_metrics(path) if path.is_file() else []
    return dict(sorted(out.items()))


def read_cluster(directory: Path) -> list[dict[str, Any]]:
    """``DIR/cluster.jsonl`` rows (empty for a launch folder, which has none)."""
    path = directory / CLUSTER
    return read_metrics(path) if path.is_file() else []


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def run_series(
    per_peer: Mapping[int, Sequence[Mapping[str, Any]]], cluster: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """One row per round for plots and tables, from the per-peer rows (and the simulator's
    cluster rows where there are any): ``round``, ``train_loss`` (mean over the peers that ran the
    round) with ``train_loss_min``/``train_loss_max``, ``bytes_out`` (all peers),
    ``local_disagreement`` (mean), ``missing`` (messages missing, all peers), ``down`` (peers that
    saw a neighbour down), ``reporting`` (peers with a row of the round), ``peer_val_loss`` (mean
    of the peers' own validation losses, rows' ``val_loss``, None on rounds without one) with
    ``peer_val_loss_min``/``peer_val_loss_max``, and from ``cluster.jsonl`` ``val_loss`` (the
    averaged model), ``consensus_error``, ``tracking_gap`` (None for a launch)."""
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for rows in per_peer.values():
        for r in rows:
            if isinstance(r.get("round"), int):
                by_round.setdefault(int(r["round"]), []).append(r)
    extra = {int(r["round"]): r for r in cluster if isinstance(r.get("round"), int)}
    out = []
    for k in sorted(set(by_round) | set(extra)):
        rows = by_round.get(k, [])
        losses = [v for r in rows if (v := _number(r.get("train_loss"))) is not None]
        dis = [v for r in rows if (v := _number(r.get("local_disagreement"))) is not None]
        vals = [v for r in rows if (v := _number(r.get("val_loss"))) is not None]
        c = extra.get(k, {})
        out.append(
            {
                "round": k,
                "train_loss": sum(losses) / len(losses) if losses else _number(c.get("train_loss")),
                "train_loss_min": min(losses, default=None),
                "train_loss_max": max(losses, default=None),
                "bytes_out": sum(_number(r.get("bytes_out")) or 0.0 for r in rows) if rows else None,
                "local_disagreement": sum(dis) / len(dis) if dis else None,
                "missing": sum(len(r.get("missing") or ()) for r in rows),
                "down": sum(1 for r in rows if r.get("down")),
                "reporting": len(rows),
                "peer_val_loss": sum(vals) / len(vals) if vals else None,
                "peer_val_loss_min": min(vals, default=None),
                "peer_val_loss_max": max(vals, default=None),
                "val_loss": _number(c.get("val_loss")),
                "consensus_error": _number(c.get("consensus_error")),
                "tracking_gap": _number(c.get("tracking_gap")),
            }
        )
    return out
