"""``demuon launch``: every peer of a cluster file as its own process on this machine (layer 6).

It only spawns and watches; it coordinates nothing (the peers find each other through the config's
endpoints). Each peer ``i`` runs ``PEER_COMMAND --config FILE --peer i --out DIR/peer-i`` with its
stdout and stderr in ``DIR/peer-i/stdout.txt``. Before anything starts: a ``DIR`` that holds a
previous run is refused unless ``--resume`` (every peer runs with ``--resume``; a peer without a
checkpoint is named and nothing starts) or ``--force`` (the old run's files are removed; ``keys/``
stays), and every tcp endpoint on an address of this machine is bound once and closed (a taken
port names the peer and the endpoint).

The live view (or, with ``--no-live``, a line every ``--every`` rounds of the peers still running)
tails the peers' ``metrics.jsonl`` and ``stdout.txt``: round, loss, rounds/s (from the rows'
``t_round``), ETA, bytes/s, late and missing messages (``missing`` is a list of senders per row:
its entries are counted), neighbours down; ``paused`` when a peer's log says a telemetry pause
holds it; one row per group of peers beyond :data:`COMPACT_PEERS`. A peer that exits with an
error before its first row stops the launch at once (the others are stopped) and its last
``error:`` line is printed. On SIGINT/SIGTERM every peer gets SIGTERM (it stops after its current
round), then SIGKILL after ``--grace`` seconds (default: one round of phase deadlines plus a
margin; a second Ctrl-C kills at once). When all peers have exited, ``DIR/summary.json`` (removed
at the start, so never a stale one) is written in the shared schema (:mod:`demuon.results`) with
the validation loss of the average of the peers' ``final.pt``.

Exit status: 0 when every peer finished, 1 when any failed (named on stderr), 2 when nothing was
started (a refused ``--out``, a missing checkpoint, a taken port), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import errno
import ipaddress
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from demuon import results
from demuon.app.peers import leaves
from demuon.app.report import RUN_PLOTS
from demuon.atomic import atomic_write_bytes
from demuon.config import Config, PeerFault, load_config
from demuon.errors import ConfigError, DemuonError

# How a peer is started (the one place to change it).
PEER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "demuon", "run")
REFRESH_S = 0.5  # live view / watch tick (about 2 refreshes a second)
GRACE_S = 5.0  # SIGTERM → SIGKILL: this margin + one round of phase deadlines (see stop_grace)
RATE_WINDOW = 5  # rounds averaged for bytes/s and rounds/s
COMPACT_PEERS = 20  # more peers than this: one row per group of peers
PR_SET_PDEATHSIG = 1
#: What a previous run left in ``--out`` (besides ``peer-<i>/`` folders): ``--force`` removes it.
RUN_FILES = ("summary.json", "peers.json", results.CLUSTER, *RUN_PLOTS)
#: A peer's log lines that say whether a telemetry pause holds it (demuon.node.telemetry logs them).
CONTROL_LINE = re.compile(
    r"telemetry: (?:command '(pause|resume|stop)' \(peer \d+\)$|status (\S+) \(peer \d+\))"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: What to check when a test bind of an endpoint fails, by errno.
BIND_HINTS = {
    errno.EADDRINUSE: "is another peer or launch running?",
    errno.EACCES: "ports below 1024 need privileges",
}

console = Console(stderr=True)


class Status(enum.Enum):
    STARTING = "starting"  # no metrics row yet (since launch started it)
    RUNNING = "running"
    PAUSED = "paused"  # running, held by a telemetry pause (its log says so)
    DONE = "done"  # exited 0 (finished, or stopped cleanly by remote control)
    STOPPED = "stopped"  # exited after our SIGTERM/SIGKILL, or exited 0 before the last round
    CRASHED = "crashed"  # killed by the fault plan (crash_at), not restarted (yet)
    FAILED = "failed"


class LineTail:
    """The complete lines appended to a file since the last call (from ``offset`` on)."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self._offset = offset
        self._partial = b""

    def read_lines(self, *, final: bool = False) -> list[bytes]:
        """New complete lines; with ``final`` (the writer has exited) a last unterminated one too."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return lines


class MetricsTail(LineTail):
    """Reads the complete rows appended to a metrics.jsonl since the last call."""

    def read_new(self) -> list[dict[str, Any]]:
        rows = []
        for line in self.read_lines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


class OutputTail(LineTail):
    """A peer's ``stdout.txt`` from where it stood when launch started the peer: its last
    ``error:`` line, its last non-empty line, and whether a telemetry pause holds it."""

    def __init__(self, path: Path) -> None:
        try:
            offset = path.stat().st_size  # what earlier runs wrote is not this run's
        except FileNotFoundError:
            offset = 0
        super().__init__(path, offset)
        self.error: str | None = None
        self.last: str | None = None
        self.paused = False

    def read_new(self, *, final: bool = False) -> None:
        for raw in self.read_lines(final=final):
            line = ANSI.sub("", raw.decode("utf-8", "replace")).strip()
            if not line:
                continue
            self.last = line
            if line.startswith("error:"):
                self.error = line
            if (m := CONTROL_LINE.search(line)) is not None:
                command, status = m.groups()
                self.paused = command == "pause" if command is not None else status == "paused"


@dataclass
class PeerProcess:
    id: int
    out: Path
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    tail: MetricsTail
    output: OutputTail | None = None  # its stdout.txt (None: not watched)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the last RATE_WINDOW rows
    totals: dict[str, float] = field(default_factory=lambda: {"bytes_out": 0.0, "late": 0.0, "missing": 0.0})
    fresh: int = 0  # rows written since launch started it (a resumed peer's older rows not counted)
    status: Status = Status.STARTING
    signalled: bool = False  # launch sent it SIGTERM/SIGKILL while it ran
    crashed: bool = False  # the fault plan killed it (and it has not been restarted since)
    restarts: int = 0
    announced: bool = False  # its unexpected exit has been reported

    def ingest(self, rows: Sequence[dict[str, Any]], *, fresh: bool = True) -> None:
        """Count ``rows`` in: ``missing`` holds the senders missing that round (its entries are
        counted), ``late`` and ``bytes_out`` are numbers."""
        for row in rows:
            for key in self.totals:
                value = row.get(key)
                if isinstance(value, list | tuple):
                    self.totals[key] += len(value)
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    self.totals[key] += float(value)
            self.rows = [*self.rows, row][-RATE_WINDOW:]
        if fresh:
            self.fresh += len(rows)

    def refresh(self) -> None:
        self.ingest(self.tail.read_new())
        rc = self.proc.poll()
        if self.output is not None:
            self.output.read_new(final=rc is not None)
        if rc is not None and self.crashed:
            self.status = Status.CRASHED
        elif rc is None:
            paused = self.output is not None and self.output.paused
            self.status = Status.PAUSED if paused else Status.RUNNING if self.fresh else Status.STARTING
        elif rc == 0:
            self.status = Status.STOPPED if self.signalled else Status.DONE
        else:
            self.status = Status.STOPPED if self.signalled else Status.FAILED
        if rc is not None and not self.log.closed:
            self.log.close()

    @property
    def active(self) -> bool:
        """Running and moving (not paused, not still starting)."""
        return self.status is Status.RUNNING

    @property
    def failed_at_start(self) -> bool:
        """Exited with an error before its first row (and nobody asked it to)."""
        rc = self.proc.returncode
        return (
            rc not in (None, 0)
            and not self.fresh
            and not self.restarts
            and not self.crashed
            and not self.signalled
        )

    @property
    def round(self) -> int | None:
        return int(self.rows[-1]["round"]) if self.rows else None

    @property
    def loss(self) -> float | None:
        value = self.rows[-1].get("train_loss") if self.rows else None
        return float(value) if isinstance(value, int | float) else None

    def bytes_per_s(self) -> float | None:
        sent = sum(float(r.get("bytes_out") or 0) for r in self.rows)
        spent = sum(float(r.get("t_round") or 0) for r in self.rows)
        return sent / spent if spent > 0 else None

    def rounds_per_s(self) -> float | None:
        """Rounds per second over the last rows (their own ``t_round``: waits included)."""
        spent = sum(float(r.get("t_round") or 0) for r in self.rows)
        return len(self.rows) / spent if spent > 0 else None

    def eta_s(self, rounds: int) -> float | None:
        """Seconds until it has run round ``rounds - 1`` at its recent pace."""
        rate = self.rounds_per_s()
        if self.round is None or rate is None:
            return None
        return max(0, rounds - 1 - self.round) / rate

    def down(self) -> int:
        value = self.rows[-1].get("down") if self.rows else None
        return len(value) if isinstance(value, list | tuple) else int(value or 0)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if launch itself dies (Linux), so no peer is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def peer_argv(config_path: Path, peer: int, out: Path, overrides: Sequence[str], *extra: str) -> list[str]:
    argv = [*PEER_COMMAND, "--config", str(config_path), "--peer", str(peer), "--out", str(out), *extra]
    for item in overrides:
        argv += ["--set", item]
    return argv


def spawn(
    config_path: Path,
    peer: int,
    out: Path,
    overrides: Sequence[str],
    *extra: str,
    prefix: Sequence[str] = (),  # what runs the peer's command (e.g. ``ip netns exec NS``)
) -> PeerProcess:
    """Start peer ``peer``; the rows its folder already holds (a resumed peer's) are read first."""
    out.mkdir(parents=True, exist_ok=True)
    tail = MetricsTail(out / results.METRICS)
    earlier = tail.read_new()
    output = OutputTail(out / "stdout.txt")
    log = (out / "stdout.txt").open("ab")
    try:
        proc = subprocess.Popen(
            [*prefix, *peer_argv(config_path, peer, out, overrides, *extra)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,  # a terminal's Ctrl-C reaches launch only; launch stops the peers
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    except BaseException:
        log.close()
        raise
    p = PeerProcess(peer, out, proc, log, tail, output)
    p.ingest(earlier, fresh=False)
    return p


def _fmt(value: float | int | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``—`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def exit_text(rc: int | None) -> str:
    """``2``, ``-9 (SIGKILL)``."""
    if rc is None or rc >= 0:
        return str(rc)
    with contextlib.suppress(ValueError):
        return f"{rc} ({signal.Signals(-rc).name})"
    return str(rc)


@dataclass(frozen=True)
class Progress:
    """What the live view's title and the ``--no-live`` lines say about a set of peers."""

    lo: int | None  # lowest and highest round logged
    hi: int | None
    loss: tuple[float, float, float] | None  # mean, min, max of the last losses
    bytes_per_s: float
    late: float
    missing: float  # senders missing, summed over every row
    down: int
    running: int  # processes still running (paused ones included)
    paused: int
    total: int
    rounds_per_s: float | None  # mean over the peers that are moving
    eta_s: float | None  # until the slowest moving peer is through


def progress(peers: Sequence[PeerProcess], rounds: int) -> Progress:
    seen = [p for p in peers if p.rows]
    losses = [x for p in seen if (x := p.loss) is not None]
    rates = [r for p in seen if (r := p.bytes_per_s()) is not None]
    moving = [p for p in peers if p.active]
    speeds = [r for p in moving if (r := p.rounds_per_s()) is not None]
    etas = [p.eta_s(rounds) for p in moving]
    return Progress(
        lo=min((p.round or 0) for p in seen) if seen else None,
        hi=max((p.round or 0) for p in seen) if seen else None,
        loss=(sum(losses) / len(losses), min(losses), max(losses)) if losses else None,
        bytes_per_s=sum(rates),
        late=sum(p.totals["late"] for p in peers),
        missing=sum(p.totals["missing"] for p in peers),
        down=sum(p.down() for p in peers),
        running=sum(p.status in (Status.RUNNING, Status.STARTING, Status.PAUSED) for p in peers),
        paused=sum(p.status is Status.PAUSED for p in peers),
        total=len(peers),
        rounds_per_s=sum(speeds) / len(speeds) if speeds else None,
        eta_s=max(e for e in etas if e is not None) if etas and None not in etas else None,
    )


def _rounds(g: Progress, rounds: int) -> str:
    return f"{_fmt(g.lo, 'd')}..{_fmt(g.hi, 'd')}/{rounds - 1}"


def progress_line(peers: Sequence[PeerProcess], rounds: int) -> str:
    g = progress(peers, rounds)
    loss = f"{g.loss[0]:.4f} ({g.loss[1]:.4f}..{g.loss[2]:.4f})" if g.loss else "—"
    paused = f" ({g.paused} paused)" if g.paused else ""
    return (
        f"round {_rounds(g, rounds)}  {_fmt(g.rounds_per_s, '.2f')} rounds/s  ETA {duration(g.eta_s)}"
        f"  loss {loss}  out {g.bytes_per_s / 1e3:.1f} KB/s  late {g.late:.0f}  missing {g.missing:.0f}"
        f"  down {g.down}  running {g.running}/{g.total}{paused}"
    )


COLOURS = {Status.FAILED: "red", Status.DONE: "green", Status.STOPPED: "yellow", Status.PAUSED: "cyan"}
COLUMNS = ("peer", "round", "loss", "rounds/s", "KB/s out", "late", "missing", "down", "status")


def _status(p: PeerProcess) -> str:
    text = p.status.value if p.proc.returncode in (None, 0) else f"{p.status.value} ({p.proc.returncode})"
    colour = COLOURS.get(p.status)
    return f"[{colour}]{text}[/{colour}]" if colour else text


def group_size(n: int) -> int:
    """Peers per row of the compact table: 10, or more so that it has at most COMPACT_PEERS rows."""
    return max(10, math.ceil(n / COMPACT_PEERS))


def _group_row(group: Sequence[PeerProcess], rounds: int) -> list[str]:
    g = progress(group, rounds)
    counts = Counter(p.status for p in group)
    states = ", ".join(
        f"[{c}]{n} {s.value}[/{c}]" if (c := COLOURS.get(s)) else f"{n} {s.value}"
        for s in Status
        if (n := counts[s])
    )
    return [
        f"{group[0].id}–{group[-1].id}",
        f"{_fmt(g.lo, 'd')}..{_fmt(g.hi, 'd')}",
        _fmt(g.loss[0] if g.loss else None, ".4f"),
        _fmt(g.rounds_per_s, ".2f"),
        f"{g.bytes_per_s / 1e3:.1f}",
        f"{g.late:.0f}",
        f"{g.missing:.0f}",
        str(g.down),
        states,
    ]


def render_table(peers: Sequence[PeerProcess], rounds: int, elapsed: float) -> Table:
    """One row per peer, or beyond :data:`COMPACT_PEERS` one per group of :func:`group_size`
    peers (round range, mean loss and rounds/s, summed bytes/s and counters, statuses counted)."""
    g = progress(peers, rounds)
    title = (
        f"demuon launch — {len(peers)} peers, round {_rounds(g, rounds)}, {elapsed:.0f}s"
        f" — {_fmt(g.rounds_per_s, '.2f')} rounds/s, ETA {duration(g.eta_s)}"
    )
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="right")
    if len(peers) > COMPACT_PEERS:
        size = group_size(len(peers))
        for start in range(0, len(peers), size):
            table.add_row(*_group_row(peers[start : start + size], rounds))
        return table
    for p in peers:
        bps = p.bytes_per_s()
        table.add_row(
            str(p.id),
            _fmt(p.round, "d"),
            _fmt(p.loss, ".4f"),
            _fmt(p.rounds_per_s(), ".2f"),
            _fmt(None if bps is None else bps / 1e3, ".1f"),
            f"{p.totals['late']:.0f}",
            f"{p.totals['missing']:.0f}",
            str(p.down()),
            _status(p),
        )
    return table


def line_front(peers: Sequence[PeerProcess]) -> int | None:
    """The round the ``--no-live`` lines follow: the lowest of the peers still moving (a dead or
    paused peer's last round would hold them back for good); None while none is."""
    moving = [p.round for p in peers if p.active and p.round is not None]
    return min(moving) if moving else None


class Stopper:
    """SIGINT/SIGTERM handlers for the watch loop (restored on exit): first → stop, second → kill."""

    def __init__(self) -> None:
        self.requests = 0
        self.wake = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Stopper:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requests += 1
        self.wake.set()


class Events(Protocol):
    """Something the watch loop drives between refreshes (planned crashes, link faults, ...)."""

    @property
    def waiting(self) -> bool:
        """Work is still to come after every peer has exited (keep watching)."""
        ...

    def step(self, peers: Sequence[PeerProcess]) -> None: ...


class PlannedCrashes:
    """The fault plan's ``[[peer]] crash_at`` and ``restart_after_s``. The peer itself carries out
    the crash (it SIGKILLs itself as it starts round ``crash_at``, exactly, see
    :class:`demuon.node.daemon.Daemon`); launch notices the kill and, after ``restart_after_s``,
    starts the same peer again with ``--resume`` (from its last periodic checkpoint)."""

    def __init__(self, faults: Sequence[PeerFault], restart: Callable[[PeerProcess], None]) -> None:
        self.pending = {f.id: f for f in faults if f.crash_at is not None}
        self.restart_at: dict[int, float] = {}
        self.restart = restart

    @property
    def waiting(self) -> bool:
        """A killed peer is still to be restarted."""
        return bool(self.restart_at)

    def step(self, peers: Sequence[PeerProcess]) -> None:
        now = time.monotonic()
        for p in peers:
            f = self.pending.get(p.id)
            if f is None or p.proc.poll() != -signal.SIGKILL:
                continue
            p.crashed = True
            p.announced = True
            p.status = Status.CRASHED
            del self.pending[p.id]
            later = "" if f.restart_after_s is None else f", restart in {f.restart_after_s:g}s"
            console.print(f"fault plan: peer {p.id} crashed at round {f.crash_at}{later}")
            if f.restart_after_s is not None:
                self.restart_at[p.id] = now + f.restart_after_s
        for p in peers:
            if p.id in self.restart_at and now >= self.restart_at[p.id]:
                del self.restart_at[p.id]
                console.print(f"fault plan: restarting peer {p.id} with --resume")
                self.restart(p)


def start_up_failure(p: PeerProcess) -> str:
    """The line launch prints for a peer that failed before its first row."""
    output = p.output
    said = output.error or output.last if output is not None else None
    where = p.out / "stdout.txt"
    rc = exit_text(p.proc.returncode)
    if said is None:
        return f"peer {p.id} exited with {rc} during start-up, saying nothing (see {where})"
    return f"peer {p.id} exited with {rc} during start-up: {said}"


@dataclass
class Outcome:
    """How the watch ended."""

    interrupted: bool = False  # launch stopped the peers (signal, --timeout, a start-up failure)
    start_up_failure: PeerProcess | None = None  # the peer whose start-up failure stopped the launch


def watch(
    peers: Sequence[PeerProcess],
    rounds: int,
    *,
    live: bool,
    every: int,
    grace_s: float,
    timeout_s: float | None,
    events: Sequence[Events] = (),
) -> Outcome:
    """Refresh until every peer has exited. A peer failing during start-up stops the others at
    once (SIGKILL for those still starting too: they have nothing to save yet)."""
    start = time.monotonic()
    outcome = Outcome()
    stop_at: float | None = None  # SIGTERM sent; SIGKILL after this
    next_line = every
    view = Live(render_table(peers, rounds, 0.0), console=Console(), refresh_per_second=2) if live else None
    with Stopper() as stopper, view if view is not None else contextlib.nullcontext():
        while True:
            for p in peers:
                p.refresh()
            if stop_at is None:
                for e in events:
                    e.step(peers)
                early = next((p for p in peers if p.failed_at_start), None)
                if early is not None:
                    outcome.start_up_failure = early
                    for p in peers:
                        p.announced = True
                    console.print(f"[red]{escape(start_up_failure(early))}[/red]", soft_wrap=True)
                    console.print("stopping: the other peers are stopped")
                    for p in peers:
                        if p.proc.poll() is None:
                            p.signalled = True
                            p.proc.send_signal(signal.SIGTERM if p.fresh else signal.SIGKILL)
                    stop_at = time.monotonic() + grace_s
            if view is not None:
                view.update(render_table(peers, rounds, time.monotonic() - start))
            else:
                for p in peers:
                    if p.status is Status.FAILED and not p.announced:
                        p.announced = True
                        rc = exit_text(p.proc.returncode)
                        console.print(f"peer {p.id} failed: exit {rc}; see {p.out / 'stdout.txt'}")
                front = line_front(peers)
                if front is not None and front + 1 >= next_line:
                    print(progress_line(peers, rounds), flush=True)
                    next_line = (front + 1) // every * every + every
            exited = all(p.proc.returncode is not None for p in peers)
            if exited and (stop_at is not None or not any(e.waiting for e in events)):
                break
            overdue = timeout_s is not None and time.monotonic() - start > timeout_s
            if (stopper.requests or overdue) and stop_at is None:
                console.print("stopping: SIGTERM to every peer")
                terminate(peers, signal.SIGTERM)
                stop_at = time.monotonic() + grace_s
            if stop_at is not None and (time.monotonic() > stop_at or stopper.requests > 1):
                terminate(peers, signal.SIGKILL)
            stopper.wake.wait(REFRESH_S)
            stopper.wake.clear()
    for p in peers:  # the last rows and exits, written since this tick's read
        p.refresh()
    if not live:
        print(progress_line(peers, rounds), flush=True)
    outcome.interrupted = stop_at is not None
    return outcome


def terminate(peers: Sequence[PeerProcess], sig: signal.Signals) -> None:
    for p in peers:
        if p.proc.poll() is None:
            p.signalled = True
            p.proc.send_signal(sig)


def reap(peers: Sequence[PeerProcess], deadline_s: float = GRACE_S) -> None:
    """Make sure no peer outlives launch: SIGKILL whatever still runs, then wait for every one."""
    terminate(peers, signal.SIGTERM)
    end = time.monotonic() + deadline_s
    for p in peers:
        try:
            p.proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
        p.log.close()


def write_launch_summary(
    config: Config, out: Path, peers: Sequence[PeerProcess], *, interrupted: bool, wall_s: float
) -> dict[str, Any]:
    """summary.json from the peers' final files (or checkpoints / metrics of stopped peers)."""
    from demuon.app.summary import launch_summary

    statuses: dict[int, dict[str, Any]] = {}
    for p in peers:
        statuses[p.id] = {"exit_code": p.proc.returncode}
        if p.status is not Status.DONE:  # exit 0: the peer's own files say done, left or stopped
            statuses[p.id]["status"] = p.status.value
    data = launch_summary(config, out, statuses, interrupted=interrupted, wall_s=wall_s)
    results.write_summary(out, data)
    return data


def stop_grace(config: Config) -> float:
    """A peer told to stop finishes its round, which may wait out both phase deadlines for
    neighbours that have already left."""
    return 2 * config.network.phase_timeout_s + GRACE_S


def check_peer_faults(config: Config) -> None:
    """A plan ``demuon launch`` cannot carry out fails before anything starts, naming the field."""
    leaves(config)  # announced leaves: exact mode, a static undirected graph that stays connected
    for f in config.faults.peer:
        if f.restart_after_s is not None and config.checkpoint.every == 0:
            raise ConfigError(
                "faults.peer.restart_after_s",
                f.restart_after_s,
                f"peer {f.id} resumes from its last periodic checkpoint: set checkpoint.every > 0",
            )


# ----------------------------------------------------------------------- before anything starts


def _is_peer_folder(path: Path) -> bool:
    name, _, number = path.name.partition("-")
    return name == "peer" and number.isdigit() and path.is_dir()


def previous_run(out: Path) -> list[str]:
    """What a previous run left in ``out`` (``summary.json``, ``peer-0/``, ...); empty if none."""
    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES[:2] if (out / name).exists()]
    return found + sorted(f"{p.name}/" for p in out.iterdir() if _is_peer_folder(p))


def checkpoint_dir(config: Config, out: Path, peer: int) -> Path:
    return config.checkpoint.dir or results.peer_folder(out, peer) / "checkpoint"


def without_checkpoint(config: Config, out: Path) -> list[int]:
    """The peers that ``demuon run --resume`` could not restart: no checkpoint file of theirs
    (newest or previous; whether it is sound is theirs to check)."""
    from demuon.node.checkpoint import checkpoint_path, previous_path

    return [
        i
        for i in range(config.peers)
        if not any(f(checkpoint_dir(config, out, i), i).is_file() for f in (checkpoint_path, previous_path))
    ]


def check_out(config: Config, out: Path, *, resume: bool, force: bool) -> None:
    """Refuse an ``--out`` that holds a previous run (unless ``resume`` or ``force``), and a
    ``resume`` of peers without a checkpoint. Changes nothing."""
    if resume:
        missing = without_checkpoint(config, out)
        if missing:
            ids = ", ".join(map(str, missing))
            where = config.checkpoint.dir or out / "peer-<i>" / "checkpoint"
            raise DemuonError(
                f"--resume: no checkpoint of peer{'s' if len(missing) > 1 else ''} {ids} in {where}: "
                "nothing started (without --resume the run starts over)"
            )
        return
    found = previous_run(out)
    if found and not force:
        listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(
            "--out",
            str(out),
            f"holds a previous run ({listed}): --resume continues it, --force clears it first",
        )


def clear_run(out: Path) -> list[Path]:
    """Remove what a previous run left in ``out``: ``peer-<i>/`` and :data:`RUN_FILES` (not
    ``keys/``, reused). Returns what was removed."""
    removed: list[Path] = []
    if not out.is_dir():
        return removed
    for path in sorted(out.iterdir()):
        if _is_peer_folder(path):
            shutil.rmtree(path)
            removed.append(path)
        elif path.name in RUN_FILES and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def tcp_address(endpoint: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp://HOST:PORT`` endpoint (brackets of an IPv6 host removed)."""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not port.isdigit():
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def _local_socket_address(host: str) -> tuple[socket.AddressFamily, str] | None:
    """The address a test bind of ``host`` uses: IP literals, ``*``, ``localhost`` and this
    machine's name (resolved as ZeroMQ does, IPv4); None for other names (not looked up)."""
    if host in ("*", ""):
        return socket.AF_INET, "0.0.0.0"
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), str(ip)
    if host not in ("localhost", socket.gethostname()):
        return None
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return (socket.AF_INET, str(infos[0][4][0])) if infos else None


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now, or None: it can, or ``host`` is no address of this
    machine (the peer itself says so at start-up). Bound with SO_REUSEADDR, as ZeroMQ binds."""
    target = _local_socket_address(host)
    if target is None:
        return None
    family, address = target
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.ENODEV):
            return None
        hint = BIND_HINTS.get(exc.errno or 0)
        return (exc.strerror or str(exc)) + (f" ({hint})" if hint else "")
    return None


def check_ports(config: Config) -> None:
    """Every peer's tcp endpoint on this machine is free (bound once and closed), and no two
    peers share one; the first that is not fails in one line naming the peer and the endpoint."""
    owners: dict[tuple[str, int], int] = {}
    for i in range(config.peers):
        endpoint = config.endpoint(i)
        address = tcp_address(endpoint)
        if address is None:
            continue
        if address in owners:
            raise DemuonError(f"peers {owners[address]} and {i} both bind {endpoint}: give each its own port")
        owners[address] = i
        problem = bind_problem(*address)
        if problem is not None:
            raise DemuonError(f"peer {i} cannot bind {endpoint}: {problem}; nothing started")


def cluster_security(config: Config, out: Path) -> list[str]:
    """The overrides that turn CURVE on for every peer: with ``security.enabled`` unset (or on
    without a key folder), a keypair per peer is generated in ``out/keys`` (kept with the run, so a
    restarted or resumed peer finds its key again). Nothing when security is on with its keys, or
    off on purpose (said on the console)."""
    sec = config.security
    if sec.enabled is False:
        console.print("[yellow]security.enabled = false:[/yellow] the links are open to any local process")
        return []
    if sec.enabled and sec.key_dir is not None:
        return []
    from demuon.transport.security import ensure_keys

    keys = ensure_keys(out / "keys", config.peers)
    return ["security.enabled=true", f"security.key_dir={json.dumps(str(keys.resolve()))}"]


def run_cluster(
    args: argparse.Namespace,
    config_path: Path,
    config: Config,
    overrides: Sequence[str],
    *,
    prefix: Callable[[int], Sequence[str]] = lambda i: (),
    events: Sequence[Events] = (),
) -> int:
    """Spawn, watch and summarise every peer of ``config`` (``demuon launch`` and ``demuon
    netlab``); ``prefix(i)`` runs peer i's command, ``events`` are driven while it runs. With
    ``args.resume`` every peer starts with ``--resume``. A ``summary.json`` already in the folder
    is removed first (the one written at the end is this run's)."""
    resume = ("--resume",) if getattr(args, "resume", False) else ()
    extra = ("--faults", str(Path(args.faults).resolve())) if args.faults else ()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    overrides = [*overrides, *cluster_security(config, out)]
    start = time.monotonic()
    peers: list[PeerProcess] = []
    outcome = Outcome()
    try:
        for i in range(config.peers):
            folder = results.peer_folder(out, i)
            peers.append(spawn(config_path, i, folder, overrides, *extra, *resume, prefix=prefix(i)))

        def restart(p: PeerProcess) -> None:
            again = spawn(config_path, p.id, p.out, overrides, *extra, "--resume", prefix=prefix(p.id))
            p.log.close()
            p.proc, p.log, p.crashed, p.restarts = again.proc, again.log, False, p.restarts + 1

        pids = [{"id": p.id, "pid": p.proc.pid, "argv": p.proc.args} for p in peers]
        atomic_write_bytes(out / "peers.json", json.dumps({"peers": pids}, indent=1).encode())
        how = "resumed" if resume else "launched"
        console.print(f"{how} {config.peers} peers ({config.topology.name}); output in {out}/peer-<i>/")
        crashes = [PlannedCrashes(config.faults.peer, restart)] if config.faults.peer else []
        outcome = watch(
            peers,
            config.rounds,
            live=not args.no_live,
            every=args.every,
            grace_s=stop_grace(config) if args.grace is None else args.grace,
            timeout_s=args.timeout,
            events=[*crashes, *events],
        )
    finally:
        reap(peers)
    for p in peers:
        p.refresh()
    wall = time.monotonic() - start
    data = write_launch_summary(config, out, peers, interrupted=outcome.interrupted, wall_s=wall)
    val = data["average"]["validation_loss"]
    console.print(f"wrote {out / 'summary.json'} (validation loss of the average: {_fmt(val, '.4f')})")
    if data["failed"]:
        names = ", ".join(
            f"peer {p.id} (exit {p.proc.returncode}, see {p.out / 'stdout.txt'})"
            for p in peers
            if p.id in data["failed"]
        )
        console.print(f"[red]failed:[/red] {names}")
        return 1
    return 130 if outcome.interrupted else 0


def cmd_launch(args: argparse.Namespace) -> int:
    config_path = Path(args.config).resolve()
    config = load_config(config_path, args.set, faults=args.faults)
    check_peer_faults(config)
    out = Path(args.out)
    resume, force = bool(getattr(args, "resume", False)), bool(getattr(args, "force", False))
    check_out(config, out, resume=resume, force=force)
    check_ports(config)
    if force and (removed := clear_run(out)):
        console.print(f"--force: removed the previous run in {out} ({len(removed)} entries; keys/ kept)")
    return run_cluster(args, config_path, config, args.set)
