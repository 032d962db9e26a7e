"""``demuon health``: is this peer's run alive? (A container's HEALTHCHECK, layer 6.)

    demuon health --out DIR [--max-age-s S]

Reads ``DIR/status.json`` (:mod:`demuon.node.status`, written by the peer's daemon) and exits

* 0 when the run is ``done`` (or ``left`` the cluster for good), or live (``new``, ``starting``,
  ``running``, ``stopping``) with a status at most ``S`` seconds old: one line saying where it is;
* 1 otherwise, with one line saying why: no status file, stale by N s (the process is stuck or was
  killed), or the run ended ``failed``, ``lonely`` or ``stopped`` before its last round.

``S`` defaults to the status file's own ``max_age_s`` (from the config's deadlines: start-up wait
plus a round's two gossip phases plus a compute allowance). Never 2: Docker reserves that exit
code. It imports neither torch nor pydantic (it runs every few seconds in every container).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from demuon.node.status import FINISHED, LIVE, STATUS, read_status

HEALTHY, UNHEALTHY = 0, 1


def verdict(status: Mapping[str, Any], *, now: float, max_age_s: float | None = None) -> tuple[int, str]:
    """(exit code, one line) for one status document at Unix time ``now``."""
    state = str(status.get("state"))
    where = f"peer {status.get('peer')}: {state}, round {status.get('round')} of {status.get('rounds')}"
    if state in FINISHED:
        return HEALTHY, where
    if state not in LIVE:
        return UNHEALTHY, f"unhealthy: {where} (the run ended {state})"
    limit = float(status.get("max_age_s") or 0.0) if max_age_s is None else max_age_s
    age = now - float(status.get("time") or 0.0)
    if age > limit:
        stale = f"status stale by {age - limit:.0f} s ({age:.0f} s old, limit {limit:g} s)"
        return UNHEALTHY, f"unhealthy: {where}, {stale}"
    return HEALTHY, f"{where}, status {max(age, 0.0):.1f} s old"


def check(out: Path, *, now: float | None = None, max_age_s: float | None = None) -> tuple[int, str]:
    """(exit code, one line) for the peer whose run folder is ``out``."""
    try:
        status = read_status(out)
    except FileNotFoundError:
        return UNHEALTHY, f"unhealthy: no status file {out / STATUS} (not started yet?)"
    except (OSError, ValueError) as exc:
        return UNHEALTHY, f"unhealthy: unreadable status file {out / STATUS}: {exc}"
    return verdict(status, now=time.time() if now is None else now, max_age_s=max_age_s)


def cmd_health(args: argparse.Namespace) -> int:
    code, line = check(Path(args.out), max_age_s=args.max_age_s)
    (sys.stdout if code == HEALTHY else sys.stderr).write(line + "\n")
    return code


def hold_until_signalled() -> None:
    """Block until SIGTERM or SIGINT (``--hold-when-done``): a finished peer stays up, its status
    file saying ``done``, so that an orchestrator that restarts every exit (a Kubernetes
    StatefulSet) does not restart it, and its results can still be copied out."""
    wanted = {signal.SIGTERM, signal.SIGINT}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        logging.getLogger(__name__).info("finished: holding until SIGTERM (--hold-when-done)")
        signal.sigwait(wanted)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
