"""The one round driver (layer 4): one iteration of one peer, for the simulator and the daemon.

docs/design.md §4 describes the data path; the driver is::

    loss = compute(peer.gradient, k)                          G = ∇f_i(X; ξ_{i,k})
    for phase in peer.phases:                                 ("V", "X"), or ("X",) for DSGD
        encoded = compute(peer.message, phase, k)             local update, then encode each tensor once
        delivery = exchange.exchange(k, phase, encoded)       injected: who sent what
        compute(peer.mix, phase, k, delivery.received)        Σ_j w_ij Z_j, tensor by tensor
    if eval_due(k, rounds, eval_every):                       every eval_every rounds and the last
        val_loss = compute(validation_loss, peer)             own model, held-out data, no RNG
    return RoundMetrics(...)

Both sides are injected. ``exchange`` is :class:`~demuon.node.exchange.ExactExchange` in the
simulator (every message arrives), :class:`~demuon.node.gossip.Gossip` in the daemon (a transport,
deadlines, liveness), and a fault-injecting exchange in tests. ``compute`` runs the synchronous
math: inline in the simulator, on the daemon's compute thread in the daemon (so its event loop
keeps draining sockets). A message is a ``{parameter name: Encoded}`` dict in parameter order and
every mix is tensor by tensor, so a later change can pipeline a phase tensor by tensor here.

:class:`RoundMetrics` is one row of ``metrics.jsonl`` with the same keys and meanings for
``demuon simulate`` and ``demuon launch`` (see its fields). Bytes count whole wire messages,
headers included, as :func:`demuon.transport.wire.encode` frames them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ParamSpec, Protocol, TypeVar

import torch

from demuon.node.peer import MixReport, Peer
from demuon.transport.codecs import Encoded

#: Models with fewer parameters than this log the float64 sums of V and M in every row (the
#: cluster-wide sums then check the tracking invariant mean V = mean M across processes).
SUMS_MAX_PARAMS = 100_000

P = ParamSpec("P")
R = TypeVar("R")


class Compute(Protocol):
    """Runs one synchronous step of the math (inline, or on a worker thread)."""

    def __call__(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]: ...


async def inline(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """The simulator's :class:`Compute`: run the step here and now."""
    return fn(*args, **kwargs)


@dataclass
class ExchangeStats:
    """What one exchange of one phase saw (the simulator's exact delivery fills the counters with 0)."""

    round: int
    phase: str
    waited_s: float  # time spent waiting for neighbours
    deadline_s: float  # the deadline that applied to this wait (0: no deadline)
    waited_for: tuple[int, ...]  # expected senders waited for
    received: tuple[int, ...]
    missing: tuple[int, ...]
    down: tuple[int, ...]  # neighbours down after this phase
    bytes_out: int  # whole messages sent, × recipients, resends included
    bytes_in: int  # whole messages used
    resends: int
    # mailbox outcomes (late, stale, duplicate, ahead) and, from injected faults, rejected/injected
    counts: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Delivery:
    """An exchange's answer: the decoded payloads of the senders that arrived, and what it saw."""

    received: dict[int, dict[str, torch.Tensor]]  # sender → {name: decoded tensor}
    keyframes: frozenset[int]  # senders whose payload is a full replica
    stats: ExchangeStats


class Exchange(Protocol):
    """One peer's side of a phase: send its message, return what its in-neighbours sent."""

    async def exchange(
        self, k: int, phase: str, encoded: Mapping[str, Encoded], *, keyframe: bool = False
    ) -> Delivery: ...


@dataclass(frozen=True)
class RoundMetrics:
    """One peer's round: one row of ``metrics.jsonl`` (:meth:`row`)."""

    peer: int
    round: int
    train_loss: float
    lr: float  # η_k
    bytes_out: int  # whole messages sent this round (headers included, × recipients, resends)
    bytes_in: int  # whole messages received and used
    received: int  # messages used, summed over phases
    missing: tuple[int, ...]  # senders missing in any phase
    down: tuple[int, ...]  # neighbours down after the round
    late: int  # mailbox drops this round: after the phase closed,
    stale_dropped: int  # for an older round,
    duplicates: int  # a second copy,
    ahead_dropped: int  # too far ahead
    rejected: int  # messages the wire refused (malformed, corrupted, unknown sender, ...)
    injected: int  # faults a fault plan injected into this peer's outgoing messages
    keyframe: bool  # this round's messages of the compressed phases were full replicas
    resends: int
    skipped: int  # rounds jumped over to catch up before this one
    t_compute: float  # seconds: gradient
    t_encode: float  # local step + encode
    t_wait: float  # send + wait, summed over phases
    t_wait_max: float  # the longest single wait
    deadline_s: float  # the longest deadline that applied
    t_mix: float
    t_round: float  # the whole round, the validation (if any) included
    local_disagreement: float | None  # ‖Y_i − X_i(mixed)‖: how far phase X moved it (consensus proxy)
    sum_V: tuple[float, ...] | None  # float64 sum of each tensor of V after the round (small models)
    sum_M: tuple[float, ...] | None
    # this peer's own model after the round on the workload's held-out data, every eval_every
    # rounds and at the last (:func:`eval_due`), else None
    val_loss: float | None = None
    bytes_out_V: int = 0  # bytes_out of phase V (0 without one)
    bytes_out_X: int = 0  # bytes_out of phase X

    def row(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in ROW_KEYS}  # shallow: every field is a plain value
        for key in ("missing", "down", "sum_V", "sum_M"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


#: The keys of every ``metrics.jsonl`` row, in order.
ROW_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RoundMetrics))


def keyframe_due(
    k: int, *, exact: bool, every: int, resumed_at: int | None = None, wanted: bool = False
) -> bool:
    """Whether round ``k``'s messages are full replicas (compressed mode only): every ``every``
    rounds (0 = never), at the first round after a resume, and when a neighbour came back."""
    if exact:
        return False
    return wanted or k == resumed_at or (every > 0 and k > 0 and k % every == 0)


def eval_due(k: int, rounds: int, every: int) -> bool:
    """Whether round ``k`` (of ``rounds``) ends with a validation of the peer's own model: every
    ``every`` rounds (``(k + 1) % every == 0``, as the simulator's averaged model) and at the last
    round; never when ``every`` is 0."""
    return every > 0 and ((k + 1) % every == 0 or k == rounds - 1)


def validation_loss(peer: Peer) -> float:
    """``peer``'s own model on the workload's held-out data (a fixed set, no gradients): draws no
    random numbers and leaves the parameters and the train/eval mode as they were, so a run with
    evaluations ends bitwise where one without would."""
    with torch.no_grad():
        return float(peer.workload.validation_loss(peer.model))


def mix_and_measure(peer: Peer, phase: str, k: int, delivery: Delivery) -> tuple[MixReport, float | None]:
    """``peer.mix`` of one phase; for phase X also ``‖Y_i − X_i^{new}‖`` (the local disagreement)."""
    if phase != "X":
        return peer.mix(phase, k, delivery.received, keyframes=delivery.keyframes), None
    Y = peer.pending("X")  # the pre-mix value, before mix() replaces X
    report = peer.mix(phase, k, delivery.received, keyframes=delivery.keyframes)
    sq = sum(float((Y[n].double() - p.detach().double()).square().sum()) for n, p in peer.params.items())
    return report, sq**0.5


def _sums(tensors: Mapping[str, torch.Tensor]) -> tuple[float, ...]:
    return tuple(float(t.detach().double().sum()) for t in tensors.values())


async def run_round(
    peer: Peer,
    k: int,
    exchange: Exchange,
    *,
    keyframe: bool = False,
    compute: Compute = inline,
    skipped: int = 0,
    eval_every: int = 0,
) -> RoundMetrics:
    """Round ``k`` of ``peer``: gradient, then message → exchange → mix for each phase; then,
    every ``eval_every`` rounds and at the last (0: never), the validation loss of its own model."""
    t0 = time.perf_counter()
    loss = await compute(peer.gradient, k)
    t_compute = time.perf_counter() - t0
    t_encode = t_mix = 0.0
    disagreement: float | None = None
    stats: list[ExchangeStats] = []
    for phase in peer.phases:
        full = peer.sends_keyframe(phase, keyframe)  # an exact phase has no replica to send
        t = time.perf_counter()
        encoded = await compute(peer.message, phase, k, keyframe=full)
        t_encode += time.perf_counter() - t
        delivery = await exchange.exchange(k, phase, encoded, keyframe=full)
        stats.append(delivery.stats)
        t = time.perf_counter()
        _, d = await compute(mix_and_measure, peer, phase, k, delivery)
        disagreement = d if d is not None else disagreement
        t_mix += time.perf_counter() - t
    due = eval_due(k, peer.setup.rounds, eval_every)
    val_loss = await compute(validation_loss, peer) if due else None
    counts = sum((s.counts for s in stats), Counter[str]())
    track = "V" in peer.phases and peer.numel < SUMS_MAX_PARAMS
    return RoundMetrics(
        peer=peer.index,
        round=k,
        train_loss=loss,
        lr=peer.lr(k),
        bytes_out=sum(s.bytes_out for s in stats),
        bytes_in=sum(s.bytes_in for s in stats),
        bytes_out_V=sum(s.bytes_out for s in stats if s.phase == "V"),
        bytes_out_X=sum(s.bytes_out for s in stats if s.phase == "X"),
        received=sum(len(s.received) for s in stats),
        missing=tuple(sorted({j for s in stats for j in s.missing})),
        down=stats[-1].down,
        late=counts["late"],
        stale_dropped=counts["stale"],
        duplicates=counts["duplicate"],
        ahead_dropped=counts["ahead"],
        rejected=counts["rejected"],
        injected=counts["injected"],
        keyframe=keyframe,
        resends=sum(s.resends for s in stats),
        skipped=skipped,
        t_compute=t_compute,
        t_encode=t_encode,
        t_wait=sum(s.waited_s for s in stats),
        t_wait_max=max(s.waited_s for s in stats),
        deadline_s=max(s.deadline_s for s in stats),
        t_mix=t_mix,
        t_round=time.perf_counter() - t0,
        local_disagreement=disagreement,
        sum_V=_sums(peer.V) if track else None,
        sum_M=_sums(peer.M) if track else None,
        val_loss=val_loss,
    )
