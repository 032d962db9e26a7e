"""The round protocol of one peer: send once, collect with a deadline (layer 5).

One exchange of phase ``p`` ("V" or "X") at round ``k`` (docs/design.md §4)::

    frames = wire.encode(sender=i, round=k, phase=p, codec, tensors, keyframe)   # once
    transport.send(peer.recipients(k), frames)                                   # same frames to all
    wait until every j in peer.expected_senders(k) − down has (k, p, j) in the mailbox,
         or the deadline passes: network.phase_timeout_s, except for the first phase a process
         runs, which gets what is left of network.start_timeout_s once the links are up
         (``first_timeout_s``, set by the daemon; peers start at different times)
    return what arrived (down neighbours included when their message is there)

The missing-neighbour policy (a missing sender's weight goes to self) is :meth:`Peer.mix`'s; this
module only reports who arrived.

Mailbox rules (keyed by ``(round, phase, sender)``; ``current`` is the round being run):

* ``round > current + AHEAD_WINDOW`` → dropped, counted ``ahead`` (the wire's round window also
  rejects these before they reach the mailbox).
* ``round < current`` → dropped, counted ``stale``.
* ``round == current`` for a phase already closed → dropped, counted ``late``.
* a key already stored or already consumed → dropped, counted ``duplicate``.
* otherwise kept until its phase is exchanged: a neighbour running ahead loses nothing.

Liveness: a neighbour that misses ``network.down_after_misses`` consecutive phases is *down* and
no longer waited for; any message from it in the current round or later marks it up again.

At-least-once delivery: while a wait lasts longer than ``network.resend_s`` (default 1 s), the
last ``RESEND_HISTORY`` messages sent are sent again (same frames) to their recipients, then again
after twice as long, four times … (exponential backoff: on a link slower than a round's messages,
fixed-interval resends queue copies faster than the link drains them; measured on a 10 Mbit/s
link before the backoff: 38 MB queued in the first round of the demo GPT instead of 3.3 MB). A
neighbour that restarted, or lost a message in its receive queue when it stopped, gets what it
needs; the mailbox drops the copies it already has, so replicas never see a message twice.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from demuon.config import IdentityCodec, NetworkConfig
from demuon.node.peer import SUM_DTYPE, Peer
from demuon.node.rounds import Delivery, ExchangeStats
from demuon.transport import wire, wire_errors
from demuon.transport.base import Buffer, Transport
from demuon.transport.codecs import Encoded, make_codec
from demuon.transport.faults import FaultPlan, decide

#: Rounds ahead of the current one whose messages are kept (a neighbour may run this far ahead
#: of us without losing anything). Independent of the config so every peer agrees on it.
AHEAD_WINDOW = 16

#: The phase of the one message a leaving peer sends: its share of the trackers, to its heir.
HANDOFF = "H"

#: How many of the last sent messages a resend repeats (the previous phase and the current one:
#: an in-neighbour we wait for is at most one phase behind us).
RESEND_HISTORY = 2

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[int, str, int]  # (round, phase, sender)


class Outcome(enum.Enum):
    KEPT = "kept"
    STALE = "stale"
    LATE = "late"
    DUPLICATE = "duplicate"
    AHEAD = "ahead"


class Mailbox(Generic[T]):
    """Messages waiting for their (round, phase) exchange; see the module docstring for the rules."""

    def __init__(self, window: int = AHEAD_WINDOW, current: int = 0) -> None:
        self.window = window
        self.current = current
        self.counts: Counter[str] = Counter()  # Outcome.value -> number of messages
        self._box: dict[Key, T] = {}
        self._seen: set[Key] = set()  # stored or consumed keys of rounds >= current - 1
        self._closed: set[tuple[int, str]] = set()  # phases of the current round already exchanged
        self.latest: dict[int, int] = {}  # sender -> highest round it has sent us (kept or not)

    def __len__(self) -> int:
        return len(self._box)

    def put(self, round: int, phase: str, sender: int, item: T) -> Outcome:
        key = (round, phase, sender)
        self.latest[sender] = max(round, self.latest.get(sender, round))
        if key in self._seen:
            outcome = Outcome.DUPLICATE
        elif round < self.current:
            outcome = Outcome.STALE
        elif round > self.current + self.window:
            outcome = Outcome.AHEAD
        elif (round, phase) in self._closed:
            outcome = Outcome.LATE
        else:
            self._box[key] = item
            self._seen.add(key)
            return Outcome.KEPT
        self.counts[outcome.value] += 1
        return outcome

    def has(self, round: int, phase: str, sender: int) -> bool:
        return (round, phase, sender) in self._box

    def take(self, round: int, phase: str, senders: Iterable[int]) -> dict[int, T]:
        """Remove and return the stored messages of ``(round, phase)`` from ``senders``."""
        out = {}
        for j in senders:
            item = self._box.pop((round, phase, j), None)
            if item is not None:
                out[j] = item
        return out

    def close(self, round: int, phase: str) -> None:
        """The exchange of ``(round, phase)`` is over: what still comes for it is late."""
        self._closed.add((round, phase))
        for key in [key for key in self._box if key[:2] == (round, phase)]:
            del self._box[key]  # from senders nobody expects in this round: not used
            self.counts[Outcome.LATE.value] += 1

    def advance(self, round: int) -> None:
        """Start round ``round``: older stored messages are dropped as stale."""
        self.current = round
        for key in [key for key in self._box if key[0] < round]:
            del self._box[key]
            self.counts[Outcome.STALE.value] += 1
        self._seen = {key for key in self._seen if key[0] >= round - 1}
        self._closed = {rp for rp in self._closed if rp[0] >= round}


class Liveness:
    """Which neighbours are down: ``down_after`` consecutive missed phases, until heard from again."""

    def __init__(self, down_after: int) -> None:
        self.down_after = down_after
        self.misses: Counter[int] = Counter()
        self.down: set[int] = set()

    def heard(self, j: int) -> bool:
        """A message from ``j`` arrived. True if ``j`` was down (it is up again)."""
        self.misses[j] = 0
        if j in self.down:
            self.down.discard(j)
            return True
        return False

    def missed(self, j: int) -> bool:
        """``j``'s message of a phase did not arrive in time. True if ``j`` just went down."""
        self.misses[j] += 1
        if j not in self.down and self.misses[j] >= self.down_after:
            self.down.add(j)
            return True
        return False


@dataclass(frozen=True)
class Inbound:
    """An accepted message and its size on the wire (what the transport's decode returns)."""

    message: wire.Message
    nbytes: int


def _nbytes(frames: Sequence[Buffer]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def possible_senders(peer: Peer) -> frozenset[int]:
    """Every peer that may send to ``peer`` in some round: its in-neighbours over the topology's
    period and after planned leaves (compressed mode: the peers whose replicas it holds). A leaving
    neighbour's hand-off comes from one of them too."""
    views = [*peer.views, *(v for _, later in peer.schedule for v in later)]
    ids = {j for v in views for j, _ in v.in_neighbours}
    if not peer.exact:
        ids.update(peer.hat[peer.phases[0]])
    return frozenset(ids)


class Gossip:
    """Peer ``peer``'s side of the protocol over a transport yielding :class:`Inbound` messages.

    The receive task calls :meth:`deliver` for every message; the round loop calls
    :meth:`begin_round` then :meth:`exchange` once per phase. ``decode`` is the function to build
    the transport with: it follows the current round (see :meth:`begin_round`)."""

    def __init__(
        self,
        peer: Peer,
        network: NetworkConfig,
        *,
        n_peers: int,
        rounds: int,
        start_round: int = 0,
        plan: FaultPlan | None = None,  # the run's injected faults (the senders apply them)
    ) -> None:
        self.peer = peer
        self.net = network
        self.plan = plan if plan is not None and plan.rules else None
        self.departed: set[int] = set()  # neighbours that handed off and left for good
        self.handoffs: dict[int, dict[str, torch.Tensor]] = {}  # sender → its share, until taken
        self.notices: tuple[tuple[int, int], ...] = ()  # leave notices our headers carry (membership)
        self._heard: dict[int, int] = {}  # leave notices in the headers that arrived, until taken
        self.mailbox: Mailbox[Inbound] = Mailbox(current=start_round)
        self.liveness = Liveness(self.net.down_after_misses)
        self.transport: Transport[Inbound] | None = None
        self.keyframe_wanted = False  # a neighbour came back: resynchronise its replicas of us
        if not 0 <= peer.index < n_peers:
            raise ValueError(f"peer {peer.index} is not one of {n_peers} peers")
        self.senders = possible_senders(peer)  # nobody else's message is even parsed
        self._rounds = rounds
        self._shapes = {n: tuple(p.shape) for n, p in peer.params.items()}
        self._keyframe_shapes, self._keyframe_dtypes = peer.keyframe_tensors()
        self._codecs = {"identity": make_codec(IdentityCodec())}  # hand-offs
        # each phase accepts its own codec only (and identity, for keyframes)
        self._phase_codecs = {ph: {**self._codecs, c.kind: c} for ph, c in peer.codecs.items()}
        # what any valid message of this run can take: fixed by its tensors, checked before parsing
        self.max_header_bytes = wire.header_bound(self._keyframe_shapes)  # frame 0
        self.max_frame_bytes = max(self.max_header_bytes, wire.frame_bound(self._keyframe_shapes))
        self._max_message_bytes = wire.message_bound(self._keyframe_shapes)  # all frames
        self._ctx = self._context(start_round)
        self._first_phase = True
        self.first_timeout_s = self.net.start_timeout_s  # deadline of the first phase this process runs
        self._sent: deque[tuple[tuple[int, ...], Sequence[Buffer]]] = deque(maxlen=RESEND_HISTORY)
        self._arrived = asyncio.Event()
        self._counts_seen: Counter[str] = Counter()

    # ---------------------------------------------------------------- receive side
    def _context(self, k: int) -> wire.DecodeContext:
        return wire.DecodeContext(
            senders=self.senders,
            shapes=self._shapes,
            dtype=self.peer.dtype,  # what the peers send: float32, or float64 for reference runs
            phases=frozenset({"V", "X", HANDOFF}),
            phase_dtypes={"V": self.peer.wire_dtype("V"), HANDOFF: SUM_DTYPE},  # sums travel in float64
            keyframe_shapes=self._keyframe_shapes,
            keyframe_dtypes=self._keyframe_dtypes,
            min_round=max(0, k - 1),
            # far-ahead rounds (up to the run's end) still decode, so a peer left behind learns
            # where its neighbours are (Mailbox.latest) although the mailbox keeps only the window
            max_round=max(k + AHEAD_WINDOW, self._rounds - 1),
            codecs=self._codecs,
            phase_codecs=self._phase_codecs,
            require_finite=True,
            max_message_bytes=self._max_message_bytes,
            max_header_bytes=self.max_header_bytes,
        )

    def decode(self, sender: int, frames: list[memoryview]) -> Inbound:
        """The transport's decode: ``wire.decode`` against the current round's context."""
        msg = wire.decode(frames, self._ctx)
        if msg.sender != sender:
            raise wire_errors.UnknownSender(
                f"header says sender {msg.sender}, the link is peer {sender}",
                sender=sender,
                round=msg.round,
                expected=sender,
                actual=msg.sender,
            )
        return Inbound(msg, _nbytes(frames))

    def deliver(self, item: Inbound) -> Outcome:
        """File one accepted message (called by the receive task). A hand-off means its sender
        left for good: it is never waited for again, and its share waits to be taken."""
        m = item.message
        self._heard.update(m.leaves)
        if m.phase == HANDOFF:
            if m.sender not in self.departed:
                self.departed.add(m.sender)
                self.handoffs[m.sender] = dict(m.tensors)
                log.info("neighbour %d left (hand-off for round %d)", m.sender, m.round)
            self._arrived.set()
            return Outcome.KEPT
        outcome = self.mailbox.put(m.round, m.phase, m.sender, item)
        # A late message, or one from the round just closed, still shows the sender is alive and
        # at most a round behind: mark it up so the next round waits for it and it can rejoin.
        alive = outcome in (Outcome.KEPT, Outcome.LATE) or (
            outcome is Outcome.STALE and m.round >= self.mailbox.current - 1
        )
        if alive and self.liveness.heard(m.sender):
            log.info("neighbour %d is up again (message for round %d)", m.sender, m.round)
            self.keyframe_wanted = True
        self._arrived.set()
        return outcome

    async def send_handoff(self, k: int, share: Mapping[str, torch.Tensor], heir: int) -> None:
        """Send our share of the trackers (float64, identity-coded), tagged with the round we
        leave before, to ``heir`` (announced leave, docs/algorithms.md §8)."""
        tensors = {n: self._codecs["identity"].encode(t.contiguous(), seed=0) for n, t in share.items()}
        frames = list(
            wire.encode(
                sender=self.peer.index,
                round=k,
                phase=HANDOFF,
                codec="identity",
                tensors=tensors,
                leaves=self.notices,
            )
        )
        await self._send((heir,), frames)
        self._sent.append(((heir,), frames))

    async def receive_handoff(self, k: int, sender: int) -> dict[str, torch.Tensor] | None:
        """The share ``sender`` handed us before round ``k`` (None if it did not come within a
        phase deadline)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.net.phase_timeout_s
        while sender not in self.handoffs and loop.time() < end:
            self._arrived.clear()
            try:
                async with asyncio.timeout(end - loop.time()):
                    await self._arrived.wait()
            except TimeoutError:
                pass
        return self.handoffs.pop(sender, None)

    def take_notices(self) -> dict[int, int]:
        """The leave notices heard since the last call (peer → round it leaves before)."""
        out, self._heard = self._heard, {}
        return out

    def take_handoffs(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every share handed to us so far and not yet taken (a leave announced at run time)."""
        out, self.handoffs = self.handoffs, {}
        return out

    def _lost_after(self) -> int:
        """How many rounds ahead a sender's message must be to prove its (k, phase) lost: 1 when
        links keep each sender's order (ZeroMQ over TCP, the in-process hub), 2 when the
        transport or the plan holds some messages back (``delay``: a later one may overtake)."""
        ordered = getattr(self.transport, "ordered", True)
        delays = self.plan is not None and any(r.action == "delay" for r in self.plan.rules)
        return 1 if ordered and not delays else 2

    def _doomed(self, sender: int, k: int, phase: str) -> bool:
        """Whether the fault plan keeps ``sender``'s (k, phase) message from arriving usable."""
        if self.plan is None:
            return False
        rule = decide(self.plan, sender, self.peer.index, (k, phase))
        return rule is not None and rule.action != "duplicate"

    def catch_up_round(self, k: int, senders: Iterable[int]) -> int | None:
        """The round to jump to if this peer was left behind, else None.

        In a healthy run no in-neighbour can be two rounds ahead: its round k+1 needs our round
        k messages. A message for round ≥ k+2 therefore means the neighbours went on without us
        (we were down, or restarted from an older checkpoint): skip to the latest such round and
        rejoin the mix there instead of running the remaining rounds alone.

        One message cannot move us far: the jump needs two in-neighbours that are up (not down) to
        be that far ahead, and goes to the round both have reached (with one such neighbour, its
        word is all there is). A forged or buggy far-future message from one neighbour changes
        nothing while the other neighbours disagree (docs/design.md §8)."""
        votes = sorted(
            (self.mailbox.latest.get(j, -1) for j in set(senders) if j not in self.liveness.down),
            reverse=True,
        )
        if not votes:
            return None
        agreed = votes[min(2, len(votes)) - 1]
        return min(agreed, self._rounds - 1) if agreed >= k + 2 else None

    # ---------------------------------------------------------------- the round
    def begin_round(self, k: int) -> None:
        self.mailbox.advance(k)
        self._ctx = self._context(k)

    async def _send(self, targets: tuple[int, ...], frames: Sequence[Buffer]) -> int:
        assert self.transport is not None, "attach a transport first"
        if targets:
            await self.transport.send(targets, frames)
        return len(targets) * _nbytes(frames)

    async def _collect(
        self, k: int, phase: str, waiting: list[int], deadline_s: float
    ) -> tuple[float, int, int]:
        """Wait until every sender in ``waiting`` has its (k, phase) message in the mailbox, or the
        deadline; resend the last messages after ``network.resend_s``, then after twice as long,
        and so on (0: never). Returns (seconds waited, resends, bytes resent)."""
        loop = asyncio.get_running_loop()
        start, clock = loop.time(), time.perf_counter()
        gap = self.net.resend_s
        deadline = start + deadline_s
        next_resend = start + gap if gap > 0 else math.inf
        resends = resent_bytes = 0
        lost_after = self._lost_after()
        while True:
            # a sender's later message means its (k, phase) was lost: links keep each sender's
            # order, and it sent (k, phase) before anything of round k + 1 (e.g. to the process we
            # were before a restart). One that handed off while we waited has left for good.
            waiting = [
                j
                for j in waiting
                if not self.mailbox.has(k, phase, j)
                and self.mailbox.latest.get(j, k) < k + lost_after
                and j not in self.departed
            ]
            now = loop.time()
            if not waiting or now >= deadline:
                break
            if now >= next_resend:
                for targets, frames in list(self._sent):
                    resent_bytes += await self._send(targets, frames)
                resends += 1
                gap *= 2
                next_resend = now + gap
                continue
            self._arrived.clear()  # no await since the mailbox check: no arrival can be missed
            try:
                async with asyncio.timeout(min(deadline, next_resend) - now):
                    await self._arrived.wait()
            except TimeoutError:
                pass
        return time.perf_counter() - clock, resends, resent_bytes  # perf_counter: uvloop's clock is in ms

    def _account(
        self, k: int, phase: str, expected: tuple[int, ...], got: Mapping[int, Inbound]
    ) -> tuple[int, ...]:
        """Update liveness from one phase's arrivals (a message the fault plan kept away is no
        sign of a dead neighbour). Returns the missing senders."""
        for j in got:
            if self.liveness.heard(j):
                self.keyframe_wanted = True
        missing = tuple(j for j in expected if j not in got)
        for j in missing:
            if j not in self.departed and not self._doomed(j, k, phase) and self.liveness.missed(j):
                log.warning("neighbour %d is down (%d missed phases)", j, self.liveness.misses[j])
        return missing

    async def exchange(
        self, k: int, phase: str, encoded: Mapping[str, Encoded], *, keyframe: bool = False
    ) -> Delivery:
        """Send this phase's message, wait for the neighbours' (see the module docstring).
        Returns the decoded tensors by sender, the senders whose message is a keyframe, and stats."""
        codec = self.peer.wire_codec(phase, keyframe)
        frames: Sequence[Buffer] = list(
            wire.encode(
                sender=self.peer.index,
                round=k,
                phase=phase,
                codec=codec,
                tensors=encoded,
                keyframe=keyframe,
                leaves=self.notices,
            )
        )
        targets = tuple(self.peer.recipients(k, phase))
        bytes_out = await self._send(targets, frames)
        self._sent.append((targets, frames))

        expected = tuple(self.peer.expected_senders(k, phase))
        waiting = [j for j in expected if j not in self.liveness.down and j not in self.departed]
        if expected and not waiting and not set(expected) <= self.departed:
            # Every neighbour is down: most likely our own link is. Going on alone would race
            # through the remaining rounds in milliseconds (and drag everyone to the end when they
            # catch up with us), so an isolated peer still waits out the deadline for them all.
            waiting = [j for j in expected if j not in self.departed]
        # A fault plan is shared by both ends: never wait for a message it drops (runs under a
        # plan replay exactly, whatever the timing; real link faults still meet the deadlines).
        waiting = [j for j in waiting if not self._doomed(j, k, phase)]
        deadline_s = self.first_timeout_s if self._first_phase else self.net.phase_timeout_s
        self._first_phase = False
        waited, resends, resent_bytes = await self._collect(k, phase, waiting, deadline_s)

        got = self.mailbox.take(k, phase, expected)
        self.mailbox.close(k, phase)
        missing = self._account(k, phase, expected, got)
        counts = self.mailbox.counts - self._counts_seen
        self._counts_seen = self.mailbox.counts.copy()
        stats = ExchangeStats(
            round=k,
            phase=phase,
            waited_s=waited,
            deadline_s=deadline_s,
            waited_for=tuple(waiting),
            received=tuple(sorted(got)),
            missing=missing,
            down=tuple(sorted(self.liveness.down)),
            bytes_out=bytes_out + resent_bytes,
            bytes_in=sum(item.nbytes for item in got.values()),
            resends=resends,
            counts=counts,
        )
        received = {j: dict(item.message.tensors) for j, item in got.items()}
        keyframes = frozenset(j for j, item in got.items() if item.message.keyframe)
        return Delivery(received, keyframes, stats)
