"""One peer as a long-running process: the round loop over a real transport (layer 6).

:class:`Daemon` owns one :class:`asyncio.TaskGroup` with

* the **receive** task: ``transport.recv()`` → :meth:`Gossip.deliver` (the mailbox), always
  draining the socket, also while the round loop computes;
* the **training** task: the rounds (docs/design.md §4, :func:`demuon.node.rounds.run_round`);
  gradient, ``message()`` and ``mix()`` run in one worker thread (the daemon's own single-thread
  executor) so the loop keeps receiving. That thread calls ``torch.set_num_threads(threads)``
  first: the intra-op thread count is per OS thread under OpenMP, and a worker left at the
  default computes backward passes with a different reduction order (results then differ from
  the simulator's in the last bits);
* the **control** task: hands each round's row to the ``on_round`` hook (a bounded queue: a slow
  hook never blocks a round; the oldest rows are dropped and counted);
* any **services** the composition root passes (e.g. telemetry: ``run()`` then ``close()``).

Stop and pause come from a :class:`Control` (``stop``/``paused`` events, e.g. MQTT telemetry) and
from SIGTERM/SIGINT: the current round finishes, a checkpoint is written, the transport closes and
the process exits 0. A second signal aborts the round at once (no checkpoint; the last periodic
one stays). Lifecycle: ``NEW → STARTING → RUNNING → STOPPING → STOPPED`` (or ``FAILED``); every
change is handed to ``on_status`` (e.g. telemetry's retained status topic). A failure is ``FAILED``
before the services are closed, so they can still report it.

Per-round row (``metrics.jsonl``): :class:`demuon.node.rounds.RoundMetrics`, the same keys the
simulator writes; the daemon fills in ``rejected`` (messages the wire refused this round) and
``skipped`` (rounds jumped over to catch up before this one).

The daemon is given the sections it uses: the :class:`~demuon.node.peer.Peer`, its
:class:`~demuon.node.gossip.Gossip` (with the network section) and :class:`DaemonSettings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import inspect
import io
import json
import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import torch

from demuon import results
from demuon.atomic import atomic_write_bytes
from demuon.errors import TransportError
from demuon.node.checkpoint import save_checkpoint
from demuon.node.gossip import Gossip, Inbound
from demuon.node.membership import Membership
from demuon.node.peer import Peer
from demuon.node.rounds import RoundMetrics, keyframe_due, run_round
from demuon.node.status import status_document, write_status
from demuon.transport.base import Transport

#: Rows waiting for the ``on_round`` hook before the oldest is dropped.
ROW_QUEUE = 64
#: How long the end of a run waits for the ``on_round`` hook to take the last rows (services such
#: as telemetry close after that, so their last report has the last round).
ROW_FLUSH_S = 1.0

log = logging.getLogger(__name__)

R = TypeVar("R")
P = ParamSpec("P")
RoundHook = Callable[[Mapping[str, Any]], object]
StatusHook = Callable[["DaemonStatus"], object]


class DaemonStatus(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    LONELY = "lonely"  # ran its rounds but never heard from any neighbour: it trained alone


class Control(Protocol):
    """Remote or local steering, read between rounds (``demuon.node.telemetry.Telemetry`` is one)."""

    paused: asyncio.Event
    stop: asyncio.Event

    async def wait_while_paused(self) -> None: ...

    def apply(self, command: str) -> None: ...


class Service(Protocol):
    """A helper the daemon runs in its TaskGroup: ``run()`` until ``close()`` is called."""

    async def run(self) -> None: ...

    def close(self) -> None: ...


class LocalControl:
    """The default :class:`Control`: ``apply("pause" | "resume" | "stop")`` from this process."""

    def __init__(self) -> None:
        self.paused = asyncio.Event()
        self.stop = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()

    def apply(self, command: str) -> None:
        if command == "pause" and not self.stop.is_set():
            self.paused.set()
            self._running.clear()
        elif command in ("resume", "stop"):
            if command == "stop":
                self.stop.set()
            self.paused.clear()
            self._running.set()

    async def wait_while_paused(self) -> None:
        await self._running.wait()


@dataclass(frozen=True)
class DaemonSettings:
    """What the round loop needs beyond the peer and its gossip."""

    rounds: int  # K: the run ends after round K − 1
    threads: int  # torch intra-op threads on the compute thread
    checkpoint_every: int  # every N rounds (0 = only on shutdown)
    keyframe_every: int  # compressed only: a full replica every N rounds (0 = never)
    fingerprint: str  # demuon.config.math_fingerprint of the run, written into checkpoints
    crash_at: int | None = None  # fault plan: SIGKILL ourselves as round crash_at starts (first life)
    leave_at: int | None = None  # fault plan: hand our tracker share to ``heir`` and leave then
    heir: int | None = None
    inherit: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # round → leavers we inherit
    on_sigterm: str = "stop"  # "stop" (checkpoint, resume later) or "leave" (hand off, for good)
    eval_every: int = 0  # validation loss of the own model every N rounds and the last (0 = never)
    status_max_age_s: float = 120.0  # status.json: how old a live peer's status may grow (health)


class Daemon:
    """Runs peer ``peer`` from ``start_round`` to ``settings.rounds − 1`` over ``transport``."""

    def __init__(
        self,
        peer: Peer,
        settings: DaemonSettings,
        gossip: Gossip,
        transport: Transport[Inbound],
        *,
        out: Path,
        checkpoint_dir: Path,
        start_round: int = 0,
        resumed: bool = False,
        on_round: RoundHook | None = None,
        control: Control | None = None,
        services: Sequence[Service] = (),
        handle_signals: bool = True,
        on_status: StatusHook | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.peer = peer
        # who leaves when (planned and announced leaves); without one, a leave is at once
        self.membership = membership if membership is not None else Membership(None, peer.index, {}, 0)
        self.settings = settings
        self.gossip = gossip
        self.transport = transport
        self.out = out
        self.checkpoint_dir = checkpoint_dir
        self.start_round = start_round
        self.resumed = resumed
        self.caught_up = 0  # rounds skipped to rejoin neighbours that went on without us
        self.on_round = on_round
        self.control: Control = control if control is not None else LocalControl()
        self.services = tuple(services)
        self.handle_signals = handle_signals
        self.on_status = on_status  # called with every new status (a failing hook is logged)
        self._status = DaemonStatus.NEW
        self.last_completed: int | None = start_round - 1 if resumed else None
        self.rows_dropped = 0
        self.aborted = False
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"peer{peer.index}-compute",
            initializer=torch.set_num_threads,
            initargs=(settings.threads,),
        )
        self._rows: asyncio.Queue[Mapping[str, Any] | None] = asyncio.Queue(ROW_QUEUE)
        self._rows_done = asyncio.Event()  # the control task has handed over every row
        self._train_task: asyncio.Task[None] | None = None
        self._rejected_seen: Counter[str] = Counter()
        self._injected_seen: Counter[str] = Counter()
        self.left_at: int | None = None  # the round we left before (announced leave)
        self._leave_requested = False
        self._leave_round: int | None = None  # the round we leave before, once a leave is asked for
        self._inherited: set[int] = set()
        self._retired: set[int] = set()  # leavers whose replicas we dropped
        self._metrics: results.MetricsWriter | None = None
        self._closed = False
        self._signalled = False
        self.in_neighbours = sorted({j for view in peer.views for j, _ in view.in_neighbours})
        self.heard: set[int] = set()  # neighbours any message came from (late ones too)
        self._interrupt = asyncio.Event()  # a leave asked for: ends the start-up wait, as a stop does
        self._started = time.time()  # status.json's wall clock

    @property
    def status(self) -> DaemonStatus:
        return self._status

    @status.setter
    def status(self, status: DaemonStatus) -> None:
        changed, self._status = status is not self._status, status
        if changed:
            self._write_status()
        if changed and self.on_status is not None:
            try:
                self.on_status(status)
            except Exception as exc:  # a broken hook never stops training
                log.warning("on_status hook failed: %s: %s", type(exc).__name__, exc)

    @property
    def completed(self) -> bool:
        return self.last_completed == self.settings.rounds - 1

    def state_word(self) -> str:
        """The state ``status.json`` names: the status, ``done`` or ``left`` for a planned end."""
        if self.status is DaemonStatus.STOPPED and self.left_at is not None:
            return "left"
        if self.status is DaemonStatus.STOPPED and self.completed:
            return "done"
        return self.status.value

    def _write_status(self) -> None:
        """``out/status.json`` (demuon.node.status); a failed write is logged, never raised."""
        doc = status_document(
            peer=self.peer.index,
            state=self.state_word(),
            round=self.last_completed,
            rounds=self.settings.rounds,
            start_round=self.start_round,
            resumed=self.resumed,
            started=self._started,
            max_age_s=self.settings.status_max_age_s,
        )
        try:
            write_status(self.out, doc)
        except OSError as exc:
            log.warning("cannot write %s/status.json: %s", self.out, exc)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> DaemonStatus:
        """Run to the end (or a stop). Returns STOPPED, FAILED or LONELY (it ran rounds but never
        heard from a neighbour: logged as an error, ``lonely`` in final.json); never raises for a
        run failure."""
        if self.status is not DaemonStatus.NEW:
            raise RuntimeError(f"a daemon runs once (status {self.status.name})")
        self.status = DaemonStatus.STARTING
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if self.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self._metrics = self._open_metrics()
            await self.transport.start()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(), name="receive")
                tg.create_task(self._control(), name="control")
                for service in self.services:
                    tg.create_task(service.run(), name=f"service-{type(service).__name__}")
                self._train_task = tg.create_task(self._train(), name="train")
        except* Exception as group:
            for exc in group.exceptions:
                log.error("peer failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self.status = DaemonStatus.FAILED
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.close()
        if self.aborted:
            self.status = DaemonStatus.FAILED
        elif self.status is not DaemonStatus.FAILED:
            self.status = DaemonStatus.LONELY if self.lonely else DaemonStatus.STOPPED
        if self.status is DaemonStatus.LONELY:
            log.error("%s", self.lonely_reason())
        log.info("peer %s after round %s", self.status.name.lower(), self.last_completed)
        return self.status

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._signalled:
            log.warning("%s again: aborting the current round without a checkpoint", sig.name)
            self.aborted = True
            if self._train_task is not None:
                self._train_task.cancel()
            return
        self._signalled = True
        if sig is signal.SIGTERM and self.settings.on_sigterm == "leave":
            log.info("SIGTERM: leaving for good after the current round")
            self.request_leave()
            return
        log.info("%s: stopping after the current round", sig.name)
        self.control.apply("stop")

    def request_leave(self) -> None:
        """Leave for good after the current round: hand our share of the trackers to a neighbour,
        tell the others, stop (a leave announced at run time, docs/algorithms.md §8)."""
        self._leave_requested = True
        self._interrupt.set()

    async def close(self) -> None:
        """Close the transport, the services and the metrics file. Idempotent, never hangs."""
        if self._closed:
            return
        self._closed = True
        for service in self.services:
            service.close()
        await self.transport.close()
        if self._metrics is not None:
            self._metrics.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _compute(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn`` on the compute thread (the event loop keeps receiving meanwhile)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # ------------------------------------------------------------------ tasks
    async def _receive(self) -> None:
        while True:
            try:
                item = await self.transport.recv()
            except TransportError:
                if self._closed or self.status is DaemonStatus.STOPPING:
                    return
                raise
            self.heard.add(item.message.sender)
            self.gossip.deliver(item)

    async def _control(self) -> None:
        try:
            while (row := await self._rows.get()) is not None:
                if self.on_round is None:
                    continue
                try:
                    result = self.on_round(row)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:  # a broken hook never stops training
                    log.warning("on_round hook failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._rows_done.set()

    def _queue_row(self, row: Mapping[str, Any] | None) -> None:
        if self._rows.full():
            self._rows.get_nowait()
            self.rows_dropped += 1
        self._rows.put_nowait(row)

    async def _train(self) -> None:
        try:
            await self._wait_ready()
            self.status = DaemonStatus.RUNNING
            every = self.settings.checkpoint_every
            rounds = self.settings.rounds
            k = self.start_round
            while k < rounds:
                await self.control.wait_while_paused()
                if self.control.stop.is_set():
                    log.info("stop requested: leaving before round %d", k)
                    break
                target = self._catch_up(k)
                skipped, k = target - k, target
                self._learn(k)
                if self._leave_requested and self._leave_round is None:
                    self._leave_round = self._announce_leave(k)
                planned = self.settings.leave_at is not None and k >= self.settings.leave_at
                if planned or (self._leave_round is not None and k >= self._leave_round):
                    await self._leave(k, announce=self._leave_requested)
                    break
                self._retire_leavers(k)
                await self._inherit(k)
                for j, share in self.gossip.take_handoffs().items():  # leaves announced at run time
                    await self._compute(self.peer.inherit, share)
                    log.info("took over peer %d's tracker share (it left)", j)
                if self.settings.crash_at is not None and k >= self.settings.crash_at and not self.resumed:
                    log.warning("fault plan: crashing (SIGKILL) as round %d starts", k)
                    logging.shutdown()
                    os.kill(os.getpid(), signal.SIGKILL)
                row = (await self._round(k, skipped)).row()
                self.last_completed = k
                self._write_status()
                assert self._metrics is not None
                self._metrics.write(row)
                self._queue_row(row)
                if every and (k + 1) % every == 0 and k != rounds - 1:
                    await self._save_checkpoint()
                k += 1
            self.status = DaemonStatus.STOPPING
            await self._finish()
        except BaseException:  # a failure, a sibling's failure or an abort: the TaskGroup reports it
            self.status = DaemonStatus.FAILED
            raise
        finally:
            if self.status is not DaemonStatus.FAILED:
                self.status = DaemonStatus.STOPPING
            self._queue_row(None)
            with contextlib.suppress(TimeoutError):  # the hook takes the last rows before services close
                async with asyncio.timeout(ROW_FLUSH_S):
                    await self._rows_done.wait()
            await self.close()

    async def _wait_ready(self) -> None:
        """Start-up: wait (up to ``network.start_timeout_s``) for links to every recipient, so the
        first messages are not dropped by a connection still in progress. A stop or a leave asked
        for meanwhile ends the wait at once."""
        net = self.gossip.net
        targets = sorted({j for k in range(len(self.peer.views)) for j in self.peer.recipients(k)})
        wait_ready = getattr(self.transport, "wait_ready", None)
        start = time.perf_counter()
        if wait_ready is not None and targets:
            ok = await self._unless_interrupted(wait_ready(targets, net.start_timeout_s))
            took = time.perf_counter() - start
            if ok is None:
                log.info("start-up wait for links to %s ended after %.2fs: stop asked for", targets, took)
            elif ok:
                log.info("links to %s up after %.2fs", targets, took)
            else:
                missing = [t for t in targets if not await wait_ready([t], 0.0)]
                log.warning("links to %s NOT up after %.2fs (of %s)", missing, took, targets)
        left = net.start_timeout_s - (time.perf_counter() - start)
        self.gossip.first_timeout_s = max(net.phase_timeout_s, left)

    async def _unless_interrupted(self, wait: Awaitable[bool]) -> bool | None:
        """``wait``'s result, or None (``wait`` cancelled) as soon as a stop or leave is asked for."""
        task = asyncio.ensure_future(wait)
        stop = asyncio.ensure_future(self.control.stop.wait())
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait({task, stop, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stop, interrupt):
                t.cancel()
            await asyncio.wait({task, stop, interrupt})
        return None if task.cancelled() else task.result()

    @property
    def lonely(self) -> bool:
        """This run had neighbours to hear from, ran rounds, and never heard from any of them."""
        ran = self.last_completed is not None and self.last_completed >= self.start_round
        return ran and self.left_at is None and bool(self.in_neighbours) and not self.heard

    def lonely_reason(self) -> str:
        """One line for the log: why the run is not a success."""
        return (
            f"peer {self.peer.index} never heard from any of its neighbours {self.in_neighbours} in rounds "
            f"{self.start_round}..{self.last_completed}: it trained alone (status lonely); are they running, "
            "and can they reach this peer's endpoint?"
        )

    def _open_metrics(self) -> results.MetricsWriter:
        """``metrics.jsonl``: replaced by a fresh run, trimmed to the rounds before ours when resumed."""
        path = self.out / results.METRICS
        writer = results.MetricsWriter(path, resume_from=self.start_round if self.resumed else None)
        if writer.replaced:
            log.info("fresh run: replaced the %d rows an earlier run left in %s", writer.replaced, path)
        if writer.dropped:
            log.info(
                "resumed at round %d: dropped %d rows of rounds from it on in %s",
                self.start_round,
                writer.dropped,
                path,
            )
        return writer

    def _announce_leave(self, k: int) -> int:
        """A leave asked for at run time, as round ``k`` starts: the round we leave before. With
        ``network.leave_notice_rounds`` on a graph that can be re-weighted, that many rounds ahead,
        and every header we send from now on says so (docs/algorithms.md §8); else ``k``."""
        r = self.membership.announce(k)
        if r is None:
            return k
        self._membership_changed()
        log.info("leaving before round %d: announced %d rounds ahead", r, r - k)
        return r

    def _learn(self, k: int) -> None:
        """Take in the leave notices heard since the last round (before round ``k`` starts)."""
        heard = self.gossip.take_notices()
        if heard and self.membership.learn(heard, k):
            self._membership_changed()
            log.info("leaves announced: %s (peer → round it leaves before)", self.membership.announced)

    def _membership_changed(self) -> None:
        self.peer.reschedule(self.membership.schedule())
        self.gossip.notices = self.membership.notices()

    async def _leave(self, k: int, *, announce: bool = False) -> None:
        """Leave before round ``k``: hand our share of the trackers to the heir (the plan's, the
        announced leave's, or our lowest-numbered neighbour), and with ``announce`` a zero share to
        every other neighbour so that none of them waits for us again; then stop."""
        view = self.peer.view(max(k - 1, 0))  # our neighbours while we were there
        ins = {j for j, _ in view.in_neighbours}
        neighbours = sorted(ins & set(view.out_neighbours)) or sorted(view.out_neighbours)
        heir: int | None
        if self.settings.heir is not None:
            heir = self.settings.heir
        elif self.peer.index in self.membership.announced:
            heir = self.membership.heir(self.peer.index)
        else:
            heir = neighbours[0] if neighbours else None
        if heir is None:
            log.warning("leaving before round %d with no neighbour to hand the tracker share to", k)
        else:
            share = await self._compute(self.peer.handoff)
            await self.gossip.send_handoff(k, share, heir)
            if announce:
                zero = {n: torch.zeros_like(t) for n, t in share.items()}
                for j in view.out_neighbours:
                    if j != heir:
                        await self.gossip.send_handoff(k, zero, j)
        self.left_at = k
        log.info("left before round %d, tracker share handed to peer %s", k, heir)

    def _retire_leavers(self, k: int) -> None:
        """Forget the replicas of every peer that left before round ``k`` (compressed phases)."""
        for j, r in self.membership.leaves().items():
            if r <= k and j not in self._retired and j != self.peer.index:
                self._retired.add(j)
                self.peer.retire(j)

    async def _inherit(self, k: int) -> None:
        """Take over the shares of the neighbours that leave at or before round ``k`` (once each)."""
        inherit: dict[int, set[int]] = {}
        for source in (self.settings.inherit, self.membership.inherits()):
            for r, js in source.items():
                inherit.setdefault(r, set()).update(js)
        for r, gone in sorted(inherit.items()):
            for j in sorted(gone):
                if r > k or j in self._inherited:
                    continue
                self._inherited.add(j)
                share = await self.gossip.receive_handoff(r, j)
                if share is None:
                    log.warning("peer %d left before round %d but its tracker share never came", j, r)
                    continue
                await self._compute(self.peer.inherit, share)
                log.info("took over peer %d's tracker share (it left before round %d)", j, r)

    async def _save_checkpoint(self) -> Path:
        return await self._compute(save_checkpoint, self.checkpoint_dir, self.peer, self.settings.fingerprint)

    async def _finish(self) -> None:
        if self.last_completed is not None:
            path = await self._save_checkpoint()
            log.info("checkpoint of round %d written to %s", self.last_completed, path)
        if self.completed or self.left_at is not None:
            await self._compute(self._write_final)

    def _write_final(self) -> None:
        assert self.last_completed is not None
        loss = self.peer.last_loss
        entry = results.peer_entry(self.peer.index, self.last_completed, loss, self.peer.fingerprint())
        if self.left_at is not None:
            entry["status"], entry["left_at"] = "left", self.left_at
        elif self.lonely:
            entry["status"], entry["reason"] = "lonely", self.lonely_reason()
            entry["exit_code"] = None  # not a success: the process exits non-zero
        if self.membership.announced:  # leaves announced at run time, and how many we heard late
            entry["leaves_announced"] = {str(j): r for j, r in sorted(self.membership.announced.items())}
            entry["membership_late"] = self.membership.late
        if not math.isfinite(loss):
            entry["final_train_loss"] = None  # JSON has no NaN
        atomic_write_bytes(self.out / "final.json", (json.dumps(entry, indent=2) + "\n").encode())
        buf = io.BytesIO()
        torch.save({n: p.detach().cpu().clone() for n, p in self.peer.params.items()}, buf)
        atomic_write_bytes(self.out / "final.pt", buf.getvalue())

    # ------------------------------------------------------------------ one round
    def _catch_up(self, k: int) -> int:
        """Rejoin neighbours that went on without us (see :meth:`Gossip.catch_up_round`)."""
        senders = {j for view in self.peer.views for j, _ in view.in_neighbours}
        target = self.gossip.catch_up_round(k, senders)
        if target is None:
            return k
        log.warning("left behind at round %d: neighbours are at round %d; catching up", k, target)
        self.caught_up += target - k
        self.gossip.keyframe_wanted = True  # compressed: our replicas at the neighbours are stale
        return target

    async def _round(self, k: int, skipped: int) -> RoundMetrics:
        """One round through the shared driver; the daemon adds what only it sees."""
        self.gossip.begin_round(k)
        keyframe = keyframe_due(
            k,
            exact=self.peer.exact,
            every=self.settings.keyframe_every,
            resumed_at=self.start_round if self.resumed else None,
            wanted=self.gossip.keyframe_wanted,
        )
        self.gossip.keyframe_wanted = False
        metrics = await run_round(
            self.peer,
            k,
            self.gossip,
            keyframe=keyframe,
            compute=self._compute,
            skipped=skipped,
            eval_every=self.settings.eval_every,
        )
        rejected = self.transport.rejected - self._rejected_seen
        self._rejected_seen = self.transport.rejected.copy()
        injected = Counter[str](getattr(self.transport, "injected", {}))
        new_faults = injected - self._injected_seen
        self._injected_seen = injected.copy()
        if metrics.missing:
            log.info("round %d: missing %s, down %s", k, list(metrics.missing), list(metrics.down))
        return replace(
            metrics,
            rejected=metrics.rejected + sum(rejected.values()),
            injected=metrics.injected + sum(new_faults.values()),
        )
