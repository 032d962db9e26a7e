"""``demuon launch``: every peer of a cluster file as its own process on this machine (layer 6).

It only spawns and watches; it coordinates nothing (the peers find each other through the config's
endpoints). Each peer ``i`` runs ``PEER_COMMAND --config FILE --peer i --out DIR/peer-i`` with its
stdout and stderr in ``DIR/peer-i/stdout.txt``. The live view tails the peers' ``metrics.jsonl``.
On SIGINT/SIGTERM every peer gets SIGTERM (it stops after its current round), then SIGKILL after
``--grace`` seconds (default: one round of phase deadlines plus a margin; a second Ctrl-C kills at
once). When all peers have exited, ``DIR/summary.json`` is written in the shared schema
(:mod:`demuon.results`) with the validation loss of the average of the peers' ``final.pt``.

Exit status: 0 when every peer finished, 1 when any failed (named on stderr), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

from demuon import results
from demuon.app.peers import leaves
from demuon.atomic import atomic_write_bytes
from demuon.config import Config, PeerFault, load_config
from demuon.errors import ConfigError

# How a peer is started (the one place to change it).
PEER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "demuon", "run")
REFRESH_S = 0.5  # live view / watch tick (about 2 refreshes a second)
GRACE_S = 5.0  # SIGTERM → SIGKILL: this margin + one round of phase deadlines (see stop_grace)
RATE_WINDOW = 5  # rounds averaged for bytes/s
PR_SET_PDEATHSIG = 1

console = Console(stderr=True)


class Status(enum.Enum):
    STARTING = "starting"  # no metrics row yet
    RUNNING = "running"
    DONE = "done"  # exited 0 (finished, or stopped cleanly by remote control)
    STOPPED = "stopped"  # exited after our SIGTERM/SIGKILL, or exited 0 before the last round
    CRASHED = "crashed"  # killed by the fault plan (crash_at), not restarted (yet)
    FAILED = "failed"


class MetricsTail:
    """Reads the complete lines appended to a metrics.jsonl since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


@dataclass
class PeerProcess:
    id: int
    out: Path
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    tail: MetricsTail
    rows: list[dict[str, Any]] = field(default_factory=list)  # the last RATE_WINDOW rows
    totals: dict[str, float] = field(default_factory=lambda: {"bytes_out": 0.0, "late": 0.0, "missing": 0.0})
    status: Status = Status.STARTING
    signalled: bool = False  # launch sent it SIGTERM/SIGKILL while it ran
    crashed: bool = False  # the fault plan killed it (and it has not been restarted since)
    restarts: int = 0

    def refresh(self) -> None:
        for row in self.tail.read_new():
            for key in self.totals:
                value = row.get(key)
                if isinstance(value, list):  # "missing": the senders missing this round
                    self.totals[key] += len(value)
                elif isinstance(value, int | float):
                    self.totals[key] += float(value)
            self.rows = [*self.rows, row][-RATE_WINDOW:]
        rc = self.proc.poll()
        if rc is not None and self.crashed:
            self.status = Status.CRASHED
        elif rc is None:
            self.status = Status.RUNNING if self.rows else Status.STARTING
        elif rc == 0:
            self.status = Status.STOPPED if self.signalled else Status.DONE
        else:
            self.status = Status.STOPPED if self.signalled else Status.FAILED
        if rc is not None and not self.log.closed:
            self.log.close()

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
    out.mkdir(parents=True, exist_ok=True)
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
    return PeerProcess(peer, out, proc, log, MetricsTail(out / results.METRICS))


def _fmt(value: float | int | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_table(peers: Sequence[PeerProcess], rounds: int, elapsed: float) -> Table:
    table = Table(title=f"demuon launch — {len(peers)} peers, {rounds} rounds, {elapsed:.0f}s")
    for col in ("peer", "round", "loss", "KB/s out", "late", "missing", "down", "status"):
        table.add_column(col, justify="right")
    colours = {Status.FAILED: "red", Status.DONE: "green", Status.STOPPED: "yellow"}
    for p in peers:
        bps = p.bytes_per_s()
        status = (
            p.status.value if p.proc.returncode in (None, 0) else f"{p.status.value} ({p.proc.returncode})"
        )
        colour = colours.get(p.status)
        table.add_row(
            str(p.id),
            _fmt(p.round, "d"),
            _fmt(p.loss, ".4f"),
            _fmt(None if bps is None else bps / 1e3, ".1f"),
            f"{p.totals['late']:.0f}",
            f"{p.totals['missing']:.0f}",
            str(p.down()),
            f"[{colour}]{status}[/{colour}]" if colour else status,
        )
    return table


def progress_line(peers: Sequence[PeerProcess], rounds: int) -> str:
    live = [p for p in peers if p.rows]
    losses = [p.loss for p in live if p.loss is not None]
    rates = [r for p in live if (r := p.bytes_per_s()) is not None]
    lo = min((p.round or 0) for p in live) if live else 0
    hi = max((p.round or 0) for p in live) if live else 0
    loss = f"{sum(losses) / len(losses):.4f} ({min(losses):.4f}..{max(losses):.4f})" if losses else "—"
    running = sum(p.status in (Status.RUNNING, Status.STARTING) for p in peers)
    late = sum(p.totals["late"] for p in peers)
    missing = sum(p.totals["missing"] for p in peers)
    return (
        f"round {lo}..{hi}/{rounds - 1}  loss {loss}  out {sum(rates) / 1e3:.1f} KB/s"
        f"  late {late:.0f}  missing {missing:.0f}"
        f"  down {sum(p.down() for p in peers)}  running {running}/{len(peers)}"
    )


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


def watch(
    peers: Sequence[PeerProcess],
    rounds: int,
    *,
    live: bool,
    every: int,
    grace_s: float,
    timeout_s: float | None,
    events: Sequence[Events] = (),
) -> bool:
    """Refresh until every peer has exited. Returns True if launch was interrupted."""
    start = time.monotonic()
    stop_at: float | None = None  # SIGTERM sent; SIGKILL after this
    next_line = every
    view = Live(render_table(peers, rounds, 0.0), console=Console(), refresh_per_second=2) if live else None
    with Stopper() as stopper, view if view is not None else contextlib.nullcontext():
        while True:
            for p in peers:
                p.refresh()
            if view is not None:
                view.update(render_table(peers, rounds, time.monotonic() - start))
            else:
                lo = min((p.round or 0) for p in peers if p.rows) if any(p.rows for p in peers) else -1
                if lo + 1 >= next_line:
                    print(progress_line(peers, rounds), flush=True)
                    next_line = (lo + 1) // every * every + every
            if stop_at is None:
                for e in events:
                    e.step(peers)
            if all(p.proc.returncode is not None for p in peers) and not any(e.waiting for e in events):
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
    if not live:
        print(progress_line(peers, rounds), flush=True)
    return stop_at is not None


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
    from demuon.transport.security import generate_keys

    keys = out / "keys"
    missing = [i for i in range(config.peers) if not (keys / f"peer-{i}.key_secret").is_file()]
    if missing:
        generate_keys(keys, missing)
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
    netlab``); ``prefix(i)`` runs peer i's command, ``events`` are driven while it runs."""
    extra = ("--faults", str(Path(args.faults).resolve())) if args.faults else ()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*overrides, *cluster_security(config, out)]
    start = time.monotonic()
    peers: list[PeerProcess] = []
    interrupted = False
    try:
        for i in range(config.peers):
            peers.append(
                spawn(config_path, i, results.peer_folder(out, i), overrides, *extra, prefix=prefix(i))
            )

        def restart(p: PeerProcess) -> None:
            again = spawn(config_path, p.id, p.out, overrides, *extra, "--resume", prefix=prefix(p.id))
            p.log.close()
            p.proc, p.log, p.crashed, p.restarts = again.proc, again.log, False, p.restarts + 1

        pids = [{"id": p.id, "pid": p.proc.pid, "argv": p.proc.args} for p in peers]
        atomic_write_bytes(out / "peers.json", json.dumps({"peers": pids}, indent=1).encode())
        console.print(f"launched {config.peers} peers ({config.topology.name}); output in {out}/peer-<i>/")
        crashes = [PlannedCrashes(config.faults.peer, restart)] if config.faults.peer else []
        interrupted = watch(
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
    data = write_launch_summary(config, out, peers, interrupted=interrupted, wall_s=time.monotonic() - start)
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
    return 130 if interrupted else 0


def cmd_launch(args: argparse.Namespace) -> int:
    config_path = Path(args.config).resolve()
    config = load_config(config_path, args.set, faults=args.faults)
    check_peer_faults(config)
    return run_cluster(args, config_path, config, args.set)
