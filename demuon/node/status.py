"""``OUT/status.json``: where one peer's run stands, for ``demuon health`` (layer 5).

The daemon rewrites the file at every change of its state and after every round::

    {"schema": "demuon.status/1", "peer": 2, "state": "running", "round": 7, "rounds": 20,
     "start_round": 0, "resumed": false, "time": 1767225600.25, "started": 1767225590.0,
     "wall_s": 10.25, "max_age_s": 110.0, "pid": 1}

``state`` is the daemon's (:class:`demuon.node.daemon.DaemonStatus` values, the ones the
Prometheus ``demuon_status`` gauge reports: new, starting, running, stopping, stopped, failed,
lonely), except that a run that completed its last round reads ``done`` and one that left the
cluster for good ``left`` (the words of ``summary.json``). ``round`` is the last completed round
(null before the first), ``time`` the Unix time of the write, ``wall_s`` the seconds since the
process started its run, ``max_age_s`` how old a running peer's status may grow before it reads as
stuck (:func:`max_age_s`: the config's deadlines). A peer killed mid-run leaves its last status
behind, which then grows stale.

The write is atomic for readers (a temp file in the same folder renamed over the target: a reader
sees the old status or the new one, never half of either) but not fsynced: it is rewritten every
round, and a status lost to a power cut reads as an older, stale one. This module imports neither
torch nor asyncio: ``demuon health`` runs it every few seconds in every container.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from demuon.atomic import temp_prefix

SCHEMA = "demuon.status/1"
STATUS = "status.json"
#: States after which the process ends on purpose (``done``: every round; ``left``: for good).
FINISHED = ("done", "left")
#: States of a live run: healthy while the status is fresh.
LIVE = ("new", "starting", "running", "stopping")
#: Seconds allowed for one round's computation on top of its network deadlines (the workloads of
#: ``demuon/configs`` compute a round in well under a second on one core; a GPT round in a few).
COMPUTE_ALLOWANCE_S = 60.0


def max_age_s(*, phase_timeout_s: float, start_timeout_s: float) -> float:
    """How long a live peer may go without a new status: the start-up wait (which also bounds the
    first round's first phase), a round's two gossip phases, and :data:`COMPUTE_ALLOWANCE_S`."""
    return start_timeout_s + 2 * phase_timeout_s + COMPUTE_ALLOWANCE_S


def status_document(
    *,
    peer: int,
    state: str,
    round: int | None,
    rounds: int,
    start_round: int,
    resumed: bool,
    started: float,
    max_age_s: float,
    now: float | None = None,
) -> dict[str, Any]:
    """The JSON object of one status (``now``: the Unix time of the write, default the clock's)."""
    now = time.time() if now is None else now
    return {
        "schema": SCHEMA,
        "peer": peer,
        "state": state,
        "round": round,
        "rounds": rounds,
        "start_round": start_round,
        "resumed": resumed,
        "time": now,
        "started": started,
        "wall_s": round_s(now - started),
        "max_age_s": max_age_s,
        "pid": os.getpid(),
    }


def round_s(seconds: float) -> float:
    return float(f"{seconds:.3f}")


def write_status(out: Path, document: Mapping[str, Any]) -> Path:
    """Replace ``out/status.json`` with ``document`` (atomic for readers, see the module notes)."""
    path = out / STATUS
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(document) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_status(out: Path) -> dict[str, Any]:
    """``out/status.json`` as a dict. Raises OSError (no file) or ValueError (not a status)."""
    data = json.loads((out / STATUS).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} document")
    return data
