"""Who leaves before which round, as one peer knows it (layer 4: pure, no I/O).

Two kinds of leave re-weight the survivors to Metropolis weights on the live graph
(``topology.leave_schedule``, docs/algorithms.md §8):

* **planned** leaves (``[[peer]] leave_at`` in a fault plan): every peer knows them from the
  shared config before the run starts;
* leaves **announced at run time** (``network.on_sigterm = "leave"``, then SIGTERM): the leaver
  picks the round ``r = k + network.leave_notice_rounds`` it will leave before, runs the rounds up
  to ``r − 1`` as usual and puts the notice ``(leaver, r)`` in the header of every message it
  sends. Every peer that hears a notice relays it in its own headers, so the peers two hops away
  (whose weights change too: Metropolis weights depend on both ends' degrees) learn it a phase
  later. A notice heard before round ``r`` starts re-weights from ``r`` exactly as a planned leave
  would: both ends of every edge use the same weights from the same round, so W stays symmetric
  and doubly stochastic on the survivors with no coordinator and no extra messages.

A notice heard only after its round started (every message that carried it was lost) is
**late**: the peer re-weights from its next round, its neighbours already did, and for the rounds
in between the two ends of an edge disagree — counted (``late``) and logged, never silent. A
notice that would leave the survivors disconnected is ignored (by every peer alike) and the leaver
then leaves at once, its neighbours lending its weight to self as for a neighbour that is down.

Graphs that cannot be re-weighted (directed or time-varying) and the compressed mode have no
:class:`Membership` (``W`` is None): a run-time leave there happens at once and the survivors lend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from demuon.errors import TopologyError
from demuon.topology import PeerView, heir, leave_schedule

log = logging.getLogger(__name__)


@dataclass
class Membership:
    """Peer ``index``'s knowledge of the leaves of the run (see the module docstring)."""

    W: torch.Tensor | None  # the static undirected base matrix; None: leaves cannot re-weight
    index: int
    planned: Mapping[int, int]  # peer → round it leaves before, from the fault plan
    notice: int  # rounds between a run-time leave request and the leave (0: at once, lending)
    max_notices: int = 32  # notices a header carries (the wire's MAX_NOTICES)
    announced: dict[int, int] = field(default_factory=dict)  # learnt at run time
    late: int = 0  # notices heard after their round had started

    @property
    def can_reweight(self) -> bool:
        return self.W is not None and self.notice > 0

    def leaves(self) -> dict[int, int]:
        """Every leave known: the plan's and the announced ones."""
        return {**self.announced, **self.planned}

    def announce(self, k: int) -> int | None:
        """Our own leave, asked for as round ``k`` starts: the round we leave before, or None when
        the survivors cannot be re-weighted (leave at once)."""
        if not self.can_reweight:
            return None
        r = k + self.notice
        if not self._valid({**self.leaves(), self.index: r}):
            log.warning("a leave before round %d would disconnect the others: leaving at once", r)
            return None
        self.announced[self.index] = r
        return r

    def learn(self, heard: Mapping[int, int], k: int) -> bool:
        """Take in notices heard from neighbours before round ``k`` starts. True if anything new
        (then :meth:`schedule`, :meth:`inherits` and :meth:`notices` changed)."""
        if self.W is None:
            return False
        new = False
        for j, r in sorted(heard.items()):
            if j in self.planned or self.announced.get(j) == r:
                continue
            if not 0 <= j < self.W.shape[0] or j == self.index:
                continue  # not one of the peers, or our own notice echoed back
            if not self._valid({**self.leaves(), j: r}):
                log.warning(
                    "ignoring peer %d's leave before round %d: the others would be disconnected", j, r
                )
                continue
            self.announced[j] = r
            new = True
            if r < k:
                self.late += 1
                log.warning(
                    "heard peer %d's leave before round %d only before round %d: re-weighting late", j, r, k
                )
        return new

    def _valid(self, leaves: Mapping[int, int]) -> bool:
        assert self.W is not None
        try:
            leave_schedule(self.W, leaves, self.index)
        except TopologyError:
            return False
        return True

    def schedule(self) -> list[tuple[int, list[PeerView]]]:
        """Our views from each round at which peers leave (``Peer.reschedule``)."""
        return [] if self.W is None else leave_schedule(self.W, self.leaves(), self.index)

    def heir(self, leaver: int) -> int | None:
        assert self.W is not None
        return heir(self.W, self.leaves(), leaver)

    def inherits(self) -> dict[int, tuple[int, ...]]:
        """Round → the announced leavers whose tracker share we take over then."""
        out: dict[int, list[int]] = {}
        for j, r in self.announced.items():
            if j != self.index and self.heir(j) == self.index:
                out.setdefault(r, []).append(j)
        return {r: tuple(sorted(js)) for r, js in out.items()}

    def notices(self) -> tuple[tuple[int, int], ...]:
        """What our headers carry: the announced leaves, the latest ``max_notices`` of them."""
        latest = sorted(self.announced.items(), key=lambda item: (item[1], item[0]))[-self.max_notices :]
        return tuple(sorted(latest))
