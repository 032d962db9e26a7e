"""Exact in-process delivery among N peers of one process: the simulator's exchange (layer 5).

Every peer of the simulator calls :meth:`ExactExchange.exchange` (through its
:meth:`ExactExchange.side`) once per phase; the call returns when all N peers have posted that
``(round, phase)``: a barrier, so every in-neighbour's message is there. Nothing is lost, late or
duplicated, and the decoded payload is exactly what a daemon's receiver decodes from the wire, so
with the identity codec the simulator and a daemon cluster reach the same parameters bitwise.

Bytes are counted as the daemon counts them: each message is framed by
:func:`demuon.transport.wire.encode` (header and checksum included) and its size is multiplied by
the number of recipients; a receiver counts the size of every message it uses.

With a fault plan (:func:`demuon.transport.faults.plan_from_config`), each message on each link
meets the fate the daemon's :class:`~demuon.transport.faults.FaultyTransport` would give it, decided
by the same function from the same key ``(round, phase)``: dropped (and partitioned) messages do not
arrive; corrupted ones are caught (counted ``rejected``) and never applied; duplicates arrive once
(the extra copies counted ``duplicate``); delayed ones miss their round (counted ``late``). The
sender counts every fault injected into its messages.

For tests and benchmarks of the guard (docs/algorithms.md §8.1), a :class:`Poison` makes one peer
Byzantine: it computes and keeps its honest state, but every receiver decodes what the poison makes
of its message (every entry a constant such as 1e30, or ``scale`` × the honest message). It is
not a config setting: a run with one is built in code (``ExactExchange(peers, poison=...)``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from demuon.node.peer import Peer
from demuon.node.rounds import Delivery, ExchangeStats
from demuon.transport import wire
from demuon.transport.codecs import Encoded
from demuon.transport.faults import FaultPlan, FaultRule, decide

#: How a receiver counts each injected fate (the mailbox's and the wire's names in the daemon).
FATE_COUNTS = {"drop": "dropped", "corrupt": "rejected", "delay": "late", "duplicate": "duplicate"}


@dataclass(frozen=True)
class Poison:
    """Peer ``sender`` turned Byzantine in ``phases``: what it sends decodes as ``value`` in every
    entry when ``value`` is set, else as ``scale`` × its honest message (in phase V with running
    sums the message is the sum S, so ``scale`` multiplies every increment too)."""

    sender: int
    value: float | None = None  # e.g. 1e30: a finite, absurd value
    scale: float = 1.0  # e.g. −4: sign-flipped and scaled
    phases: tuple[str, ...] = ("V", "X")

    def apply(self, decoded: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.value is not None:
            return {n: torch.full_like(t, self.value) for n, t in decoded.items()}
        return {n: t * self.scale for n, t in decoded.items()}


@dataclass(frozen=True)
class Posted:
    decoded: dict[str, torch.Tensor]  # as every receiver decodes it
    keyframe: bool
    nbytes: int  # size of the whole wire message
    fates: dict[int, FaultRule | None]  # recipient → what the fault plan does to it (decided once)


def message_size(peer: Peer, k: int, phase: str, encoded: Mapping[str, Encoded], keyframe: bool) -> int:
    """Bytes of the wire message peer ``peer`` sends for ``(k, phase)`` (header included)."""
    return wire_size(peer.index, k, phase, peer.wire_codec(phase, keyframe), encoded, keyframe=keyframe)


def wire_size(
    sender: int, k: int, phase: str, codec: str, encoded: Mapping[str, Encoded], *, keyframe: bool = False
) -> int:
    """Bytes of one wire message (all frames, header included), as the daemon would send it."""
    frames = wire.encode(sender=sender, round=k, phase=phase, codec=codec, tensors=encoded, keyframe=keyframe)
    return sum(memoryview(f).nbytes for f in frames)


class ExactExchange:
    """The barrier every simulated peer meets once per ``(round, phase)``."""

    def __init__(
        self, peers: Sequence[Peer], plan: FaultPlan | None = None, *, poison: Poison | None = None
    ) -> None:
        self.peers = {p.index: p for p in peers}
        self.plan = plan if plan is not None and plan.rules else None
        self.poison = poison
        self._posted: dict[tuple[int, str], dict[int, Posted]] = {}
        self._complete: dict[tuple[int, str], asyncio.Event] = {}
        self._taken: dict[tuple[int, str], int] = {}

    def retire(self, index: int) -> None:
        """Peer ``index`` left: the barrier no longer waits for it."""
        self.peers.pop(index, None)

    def side(self, index: int) -> PeerSide:
        """Peer ``index``'s :class:`~demuon.node.rounds.Exchange`."""
        return PeerSide(self, index)

    async def exchange(
        self, index: int, k: int, phase: str, encoded: Mapping[str, Encoded], *, keyframe: bool
    ) -> Delivery:
        peer = self.peers[index]
        key = (k, phase)
        box = self._posted.setdefault(key, {})
        if index in box:
            raise RuntimeError(f"peer {index} posted ({k}, {phase}) twice")
        size = message_size(peer, k, phase, encoded, keyframe)
        recipients = peer.recipients(k, phase)
        fates = {t: self._fate(index, t, k, phase) for t in recipients}
        decoded = peer.decode(encoded, phase, keyframe=keyframe)
        if self.poison is not None and self.poison.sender == index and phase in self.poison.phases:
            decoded = self.poison.apply(decoded)
        box[index] = Posted(decoded, keyframe, size, fates)
        complete = self._complete.setdefault(key, asyncio.Event())
        if len(box) == len(self.peers):
            complete.set()
        await complete.wait()
        expected = peer.expected_senders(k, phase)
        counts: Counter[str] = Counter()
        fates = {j: box[j].fates.get(index) for j in expected}  # what happened to each sender's message
        got = {j: box[j] for j, rule in fates.items() if rule is None or rule.action == "duplicate"}
        for rule in fates.values():
            if rule is not None:
                counts[FATE_COUNTS[rule.action]] += rule.copies if rule.action == "duplicate" else 1
        counts["injected"] = sum(rule is not None for rule in box[index].fates.values())
        self._taken[key] = self._taken.get(key, 0) + 1
        if self._taken[key] == len(self.peers):  # everyone has its share: forget this phase
            del self._posted[key], self._complete[key], self._taken[key]
        stats = ExchangeStats(
            round=k,
            phase=phase,
            waited_s=0.0,
            deadline_s=0.0,
            waited_for=tuple(expected),
            received=tuple(sorted(got)),
            missing=tuple(j for j in expected if j not in got),
            down=(),
            bytes_out=size * len(recipients),
            bytes_in=sum(p.nbytes for p in got.values()),
            resends=0,
            counts=counts,
        )
        received = {j: p.decoded for j, p in got.items()}
        return Delivery(received, frozenset(j for j, p in got.items() if p.keyframe), stats)

    def _fate(self, sender: int, receiver: int, k: int, phase: str) -> FaultRule | None:
        return None if self.plan is None else decide(self.plan, sender, receiver, (k, phase))


@dataclass(frozen=True)
class PeerSide:
    hub: ExactExchange
    index: int

    async def exchange(
        self, k: int, phase: str, encoded: Mapping[str, Encoded], *, keyframe: bool = False
    ) -> Delivery:
        return await self.hub.exchange(self.index, k, phase, encoded, keyframe=keyframe)
