"""``demuon run``: one peer of a cluster as a long-running process (a composition root, layer 6).

    demuon run --config cluster.toml --peer ID [--out DIR] [--resume | --resume-if-present] [--set k=v ...]

Every peer reads the same config file and derives everything else from it and its id: the graph
(its views over the topology's period), the initial model (shared seed), its data shard (its id),
the endpoints of its neighbours. Output folder (default ``runs/peer-<id>``): ``metrics.jsonl``
(one row per round, keys of :class:`demuon.node.rounds.RoundMetrics`), ``log.txt``, a checkpoint in
``checkpoint.dir`` (default ``<out>/checkpoint``), and at the end ``final.json``
(``{"id", "final_round", "final_train_loss", "fingerprint": {"sum", "l2"}}``) and ``final.pt``
(``{name: tensor}`` of the final parameters), and ``status.json`` rewritten at every change of
state and after every round (:mod:`demuon.node.status`; read by ``demuon health``).
``--resume`` requires this peer's checkpoint; ``--resume-if-present`` resumes from it when there
is one and starts fresh otherwise (what a restarted container does).

Exit codes: 0 finished or stopped cleanly (SIGTERM/SIGINT: the current round finishes and a
checkpoint is written), 1 the run failed, 2 a bad config, peer id or checkpoint, or an endpoint
that cannot be bound (nothing started; one ``error: ...`` line on stderr), 3 the peer never heard
from any neighbour (it trained alone: ``final.json`` has status ``lonely`` and the reason).
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import uvloop

from demuon.app.health import hold_until_signalled
from demuon.app.peers import build_peer as build_one
from demuon.app.peers import heir_of, leaves, membership_of, peer_setup
from demuon.config import Config, load_config, math_fingerprint
from demuon.errors import ConfigError, TransportError
from demuon.node.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    previous_path,
    remove_leftover_temp_files,
    restore,
)
from demuon.node.daemon import Control, Daemon, DaemonSettings, DaemonStatus, RoundHook, Service
from demuon.node.gossip import Gossip, Inbound
from demuon.node.peer import Peer
from demuon.node.status import max_age_s
from demuon.transport import wire
from demuon.transport.base import Buffer, Transport
from demuon.transport.faults import FaultyTransport, plan_from_config
from demuon.workloads import make_workload

#: How long closing the sockets may wait for the last queued messages to leave (ms).
SHUTDOWN_LINGER_MS = 1000

log = logging.getLogger("demuon.run")

T = TypeVar("T")

#: What to check when binding our own endpoint fails, by errno.
BIND_HINTS = {
    errno.EADDRINUSE: "is another peer running?",
    errno.EADDRNOTAVAIL: "is the host an address of this machine?",
    errno.ENODEV: "is the host an address or interface of this machine?",
    errno.EACCES: "ports below 1024 need privileges",
}

#: How the daemon's status reads on the MQTT status topic (README, "Telemetry (MQTT)"); telemetry
#: itself says "paused" while a pause holds a training peer, and the broker "offline" (Last Will).
TELEMETRY_STATUS = {
    DaemonStatus.NEW: "starting",
    DaemonStatus.STARTING: "waiting-for-links",  # the transport is bound: it waits for its links
    DaemonStatus.RUNNING: "training",
    DaemonStatus.STOPPING: "stopping",
    DaemonStatus.STOPPED: "stopped",
    DaemonStatus.FAILED: "failed",
    DaemonStatus.LONELY: "lonely",  # never heard from any neighbour: not a success
}
EXIT_LONELY = 3  # the run ended without ever hearing from a neighbour (final.json says why)


def telemetry_status(status: DaemonStatus) -> str:
    """``status`` as the MQTT status topic says it; an outcome without an entry reads "failed"."""
    return TELEMETRY_STATUS.get(status, "failed")


def run_name(config: Config) -> str:
    """The run's name in every MQTT payload: ``telemetry.run_id``, else the first 12 hex digits of
    the math fingerprint (the same on every peer of a cluster, and for a resumed run)."""
    return config.telemetry.run_id or math_fingerprint(config)[:12]


def build_peer(config: Config, peer_id: int) -> Peer:
    """Peer ``peer_id`` exactly as :func:`demuon.app.peers.build_peers` builds it."""
    setup = peer_setup(config)
    workload = make_workload(config.workload, seed=config.seed, device=setup.device)
    return build_one(config, peer_id, workload, setup)


def daemon_settings(config: Config, peer_id: int | None = None) -> DaemonSettings:
    crash = [f.crash_at for f in config.faults.peer if f.id == peer_id and f.crash_at is not None]
    plan = leaves(config)
    inherit: dict[int, list[int]] = {}
    for gone, r in plan.items():
        if heir_of(config, gone) == peer_id:
            inherit.setdefault(r, []).append(gone)
    return DaemonSettings(
        rounds=config.rounds,
        threads=config.threads,
        checkpoint_every=config.checkpoint.every,
        keyframe_every=config.gossip.keyframe_every,
        fingerprint=math_fingerprint(config),
        crash_at=crash[0] if crash else None,
        leave_at=plan.get(peer_id) if peer_id is not None else None,
        heir=heir_of(config, peer_id) if peer_id in plan else None,
        inherit={r: tuple(sorted(js)) for r, js in inherit.items()},
        on_sigterm=config.network.on_sigterm,
        eval_every=config.eval_every,
        status_max_age_s=max_age_s(
            phase_timeout_s=config.network.phase_timeout_s, start_timeout_s=config.network.start_timeout_s
        ),
    )


def check_security(config: Config, peer_id: int) -> None:
    """With ``security.enabled`` unset, a peer runs without CURVE only if every endpoint it binds
    or connects to is loopback; otherwise it refuses to start, saying how to choose."""
    if config.security.enabled is not None:
        return
    from demuon.transport.security import is_loopback

    ids = [peer_id, *sorted(j for j in range(config.peers) if j != peer_id)]
    wide = next((config.endpoint(j) for j in ids if not is_loopback(config.endpoint(j))), None)
    if wide is not None:
        raise ConfigError(
            "security.enabled",
            "unset",
            f"peer {peer_id} would use {wide} (beyond loopback) without CURVE: set security.enabled = true "
            "and security.key_dir (demuon keys generate DIR --peers N), or security.enabled = false to "
            "run open on purpose",
        )


def build_transport(config: Config, peer: Peer, gossip: Gossip) -> Any:
    """A ZeroMQ transport bound at ``config.endpoint(id)`` with DEALERs to every recipient over
    the topology's period; CURVE when ``security.enabled``."""
    from demuon.transport.base import RejectBudget
    from demuon.transport.security import load_keys, load_public_keys
    from demuon.transport.zeromq import ZmqTransport

    check_security(config, peer.index)
    targets = sorted({j for k in range(len(peer.views)) for j in peer.recipients(k)})
    curve, public = None, None
    if config.security.enabled:
        if config.security.key_dir is None:
            raise ConfigError("security.key_dir", None, "required when security.enabled = true")
        curve = load_keys(config.security.key_dir, peer.index)
        public = dict(load_public_keys(config.security.key_dir))
        public.update({p.id: p.public_key.encode() for p in config.network.peers if p.public_key})
        log.info("CURVE on: keys of %d peers from %s", len(public), config.security.key_dir)
    else:
        log.info("CURVE off: any process that reaches %s can send to this peer", config.endpoint(peer.index))
    net = config.network
    transport = ZmqTransport[Inbound](
        peer.index,
        config.endpoint(peer.index),
        {j: config.endpoint(j) for j in targets},
        gossip.decode,
        hwm=net.hwm,
        heartbeat_ms=net.heartbeat_ms,
        linger_ms=SHUTDOWN_LINGER_MS,
        max_frame_bytes=gossip.max_frame_bytes,  # a larger frame is refused before it is buffered
        senders=gossip.senders,
        budget=RejectBudget(net.reject_budget, net.mute_s),
        curve=curve,
        public_keys=public,
    )
    plan = plan_from_config(config.faults)
    if not plan.rules:
        return transport
    return FaultyTransport(transport, plan, key_of=wire.peek)  # the plan's faults, on our messages


@dataclass(frozen=True)
class Start:
    """Peer state to run from: fresh (round 0) or restored from its checkpoint."""

    peer: Peer
    round: int
    resumed: bool
    checkpoint_dir: Path


def prepare(
    config: Config, peer_id: int, out: Path, *, resume: bool = False, blob: dict[str, Any] | None = None
) -> Start:
    """Build peer ``peer_id`` and, with ``resume``, restore it from ``blob`` (a checkpoint already
    loaded and checked) or its newest good checkpoint (a CheckpointError names the file). Temp
    files of this peer's checkpoint writes that a killed process left are removed first."""
    peer = build_peer(config, peer_id)
    checkpoint_dir = config.checkpoint.dir or out / "checkpoint"
    remove_leftover_temp_files(checkpoint_dir, peer_id)
    if resume and blob is None:
        blob = load_checkpoint(checkpoint_dir, peer_id, math_fingerprint(config))
    start = restore(peer, blob) if resume and blob is not None else 0
    if resume:
        log.info("resumed from %s at round %d", checkpoint_dir, start)
    return Start(peer, start, resume, checkpoint_dir)


def build_daemon(
    config: Config,
    start: Start,
    out: Path,
    *,
    on_round: RoundHook | None = None,
    control: Control | None = None,
    services: Sequence[Service] = (),
) -> Daemon:
    """The daemon of ``start.peer`` over ZeroMQ. Call inside the event loop that will run it."""
    gossip = Gossip(
        start.peer,
        config.network,
        n_peers=config.peers,
        rounds=config.rounds,
        start_round=start.round,
        plan=plan_from_config(config.faults),
    )
    gossip.transport = build_transport(config, start.peer, gossip)
    return Daemon(
        start.peer,
        daemon_settings(config, start.peer.index),
        gossip,
        gossip.transport,
        out=out,
        checkpoint_dir=start.checkpoint_dir,
        start_round=start.round,
        resumed=start.resumed,
        on_round=on_round,
        control=control,
        services=services,
        membership=membership_of(config, start.peer.index),
    )


class _Started(Generic[T]):
    """``inner`` once :func:`start_transport` has started it: ``start()`` is a no-op, the rest is
    ``inner``'s (its optional members, e.g. ``wait_ready`` and ``injected``, too)."""

    def __init__(self, inner: Transport[T]) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def peer_id(self) -> int:
        return self.inner.peer_id

    @property
    def rejected(self) -> Counter[str]:
        return self.inner.rejected

    async def start(self) -> None:
        pass

    async def send(self, targets: Sequence[int], frames: Sequence[Buffer]) -> None:
        await self.inner.send(targets, frames)

    async def recv(self) -> T:
        return await self.inner.recv()

    async def close(self) -> None:
        await self.inner.close()


def bind_error(exc: TransportError, peer: int, endpoint: str) -> TransportError:
    """``exc`` with a hint, if it is ZeroMQ refusing to bind ``peer``'s own ``endpoint``."""
    import zmq

    cause = exc.__cause__
    if exc.peer != peer or exc.endpoint != endpoint or not isinstance(cause, zmq.ZMQError):
        return exc
    if cause.errno is None:
        return exc
    hint = BIND_HINTS.get(cause.errno)
    message = f"cannot bind {endpoint}: {zmq.strerror(cause.errno)}" + (f" ({hint})" if hint else "")
    return TransportError(message, peer=peer, endpoint=endpoint)


async def start_transport(config: Config, daemon: Daemon) -> None:
    """Bind and connect before the daemon runs. A port that is taken or a host that is not this
    machine's is the operator's to fix: it is raised (one TransportError, one line on the command
    line), where inside ``Daemon.run`` it would be a run failure logged with its traceback."""
    transport = daemon.transport
    try:
        await transport.start()
    except TransportError as exc:
        await daemon.close()
        own = daemon.peer.index
        raise bind_error(exc, own, config.endpoint(own)) from exc
    except BaseException:
        await daemon.close()
        raise
    daemon.transport = daemon.gossip.transport = _Started(transport)


#: The states ``demuon_status`` reports (Prometheus): the daemon's, and "paused" while running.
PEER_STATES = (*(s.value for s in DaemonStatus), "paused")


def peer_state(daemon: Daemon) -> str:
    """The daemon's state for ``demuon_status``: "paused" while a pause holds a running daemon."""
    if daemon.status is DaemonStatus.RUNNING and daemon.control.paused.is_set():
        return "paused"
    return daemon.status.value


def fan_out(hooks: Sequence[RoundHook]) -> RoundHook | None:
    """One ``on_round`` hook that hands each row to every (synchronous) hook of ``hooks``."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def each(row: Mapping[str, Any]) -> None:
        for hook in hooks:
            hook(row)

    return each


async def run_peer(config: Config, start: Start, out: Path) -> DaemonStatus:
    """Run the daemon (with MQTT telemetry when ``telemetry.mqtt_host`` is set, Prometheus metrics
    when ``telemetry.prometheus_port`` is; a metrics port that cannot be bound is raised)."""
    from demuon.node.prometheus import Prometheus
    from demuon.node.telemetry import Telemetry

    telemetry = Telemetry(config.telemetry, start.peer.index, run=run_name(config))
    prometheus = Prometheus(config.telemetry, start.peer.index, run=run_name(config), rounds=config.rounds)
    hooks: list[RoundHook] = [telemetry.publish] if telemetry.enabled else []
    services: list[Service] = [telemetry] if telemetry.enabled else []
    if prometheus.enabled:
        hooks.append(prometheus.observe)
        services.append(prometheus)
    daemon = build_daemon(
        config,
        start,
        out,
        on_round=fan_out(hooks),
        control=telemetry if telemetry.enabled else None,
        services=services,
    )
    prometheus.watch(functools.partial(peer_state, daemon), PEER_STATES)
    daemon.on_status = lambda status: telemetry.set_status(telemetry_status(status))
    await start_transport(config, daemon)
    try:
        await prometheus.start()
    except BaseException:
        await daemon.close()
        raise
    log.info(
        "peer %d of %d: %s on %s, %d rounds, listening on %s",
        start.peer.index,
        config.peers,
        config.algorithm.name,
        config.topology.name,
        config.rounds,
        config.endpoint(start.peer.index),
    )
    return await daemon.run()


@contextmanager
def peer_logging(out: Path, peer_id: int) -> Iterator[None]:
    """``log.txt`` in ``out`` and stderr, every line naming the peer (handlers removed after)."""
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s peer-{peer_id} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    level = root.level
    handlers: list[logging.Handler] = [
        logging.FileHandler(out / "log.txt", encoding="utf-8"),
        logging.StreamHandler(),
    ]
    root.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


def has_checkpoint(checkpoint_dir: Path, peer_id: int) -> bool:
    """A checkpoint of ``peer_id`` is in ``checkpoint_dir`` (the newest or the one before it: a
    crash between a save's two renames leaves only the latter), good or not: ``run
    --resume-if-present`` resumes from it, and a damaged or foreign one is an error, never a
    silent fresh start."""
    return any(
        p.is_file()
        for p in (checkpoint_path(checkpoint_dir, peer_id), previous_path(checkpoint_dir, peer_id))
    )


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set, faults=args.faults)
    if not 0 <= args.peer < config.peers:
        raise ConfigError("--peer", args.peer, f"must be in 0..{config.peers - 1} (peers = {config.peers})")
    out = Path(args.out) if args.out else Path("runs") / f"peer-{args.peer}"
    check_security(config, args.peer)
    checkpoint_dir = config.checkpoint.dir or out / "checkpoint"
    if_present = bool(getattr(args, "resume_if_present", False))  # a Namespace built without it: False
    resume = args.resume or (if_present and has_checkpoint(checkpoint_dir, args.peer))
    blob = None
    if resume:  # fail before creating anything when there is nothing to resume from
        blob = load_checkpoint(checkpoint_dir, args.peer, math_fingerprint(config))
    torch.set_num_threads(config.threads)
    with peer_logging(out, args.peer):
        if if_present:
            found = "resuming from it" if resume else "none there: starting fresh"
            log.info("--resume-if-present: checkpoint of peer %d in %s: %s", args.peer, checkpoint_dir, found)
        start = prepare(config, args.peer, out, resume=resume, blob=blob)
        status = uvloop.run(run_peer(config, start, out))
    if status is DaemonStatus.LONELY:
        return EXIT_LONELY
    if status is DaemonStatus.STOPPED and getattr(args, "hold_when_done", False):
        hold_until_signalled()
    return 0 if status is DaemonStatus.STOPPED else 1
