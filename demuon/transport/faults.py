"""Deterministic fault injection around any Transport (layer 3).

``FaultyTransport(inner, plan, key_of=...)`` wraps the *sending* side of a peer's transport: for
every (sender, receiver, message key) a :class:`FaultPlan` decides — from its seed, never from the
clock — whether the message to that receiver is dropped, duplicated, delayed by N messages
(reordered), or has one byte corrupted. Receiving is passed through untouched, so a cluster whose
peers all wrap their transports sees every link's faults exactly once.

The message key is whatever ``key_of(frames)`` returns (any hashable with a stable ``repr``, e.g.
``(round, phase)`` peeked from a wire header by the caller); this module never looks inside a
message, so it stays ignorant of rounds. If ``key_of`` raises, the key is ``None``.

Rules are tried in order and the first one that matches and fires decides. A rule fires with its
``probability``, drawn from a hash of (seed, sender, receiver, key, rule index): the same message
on the same link always meets the same fate, in every run. With an empty plan the wrapper is a
pure pass-through (it runs the transport conformance suite).

Delayed messages wait until ``delay`` later messages have been sent to the same receiver, then go
out right after that one; :meth:`FaultyTransport.flush` sends whatever still waits, and ``close``
drops it (counted as ``injected["delay_lost"]``). A drop rule does not notice an unknown target.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from demuon.config import FaultsConfig, LinkFault, PartitionFault
from demuon.transport.base import Buffer, Transport

T = TypeVar("T")

FaultAction = Literal["drop", "duplicate", "delay", "corrupt"]
ACTIONS: tuple[str, ...] = ("drop", "duplicate", "delay", "corrupt")

KeyOf = Callable[[Sequence[Buffer]], Hashable]


def no_key(frames: Sequence[Buffer]) -> Hashable:
    """Default message key: every message looks the same to the rules."""
    return None


def _frozen(ids: Collection[Any] | None) -> frozenset[Any] | None:
    return None if ids is None else frozenset(ids)


@dataclass(frozen=True)
class FaultRule:
    """One kind of fault on the messages it matches (``None`` filters match anything)."""

    action: FaultAction
    senders: Collection[int] | None = None  # ids of sending peers
    receivers: Collection[int] | None = None  # ids of receiving peers
    keys: Collection[Hashable] | None = None  # message keys, as returned by key_of
    probability: float = 1.0  # chance the rule fires on a matching message (seeded)
    delay: int = 1  # "delay": later messages to the same receiver that overtake it
    copies: int = 1  # "duplicate": extra copies sent
    frame: int | None = None  # "corrupt": index of the frame hit (None: seeded choice)
    where: Callable[[int, int, Hashable], bool] | None = None  # (sender, receiver, key) → applies?

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action={self.action!r}: expected one of {ACTIONS}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability={self.probability!r}: expected 0 ≤ p ≤ 1")
        if self.delay < 1 or self.copies < 1:
            raise ValueError(f"delay={self.delay}, copies={self.copies}: expected ≥ 1")
        object.__setattr__(self, "senders", _frozen(self.senders))
        object.__setattr__(self, "receivers", _frozen(self.receivers))
        object.__setattr__(self, "keys", _frozen(self.keys))

    def matches(self, sender: int, receiver: int, key: Hashable) -> bool:
        return (
            (self.senders is None or sender in self.senders)
            and (self.receivers is None or receiver in self.receivers)
            and (self.keys is None or key in self.keys)
            and (self.where is None or self.where(sender, receiver, key))
        )


@dataclass(frozen=True)
class FaultPlan:
    """An ordered tuple of rules and the seed of their coin flips."""

    rules: tuple[FaultRule, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))


#: The gossip phases a fault plan acts on.
PLANNED_PHASES = frozenset({"V", "X"})


def _round_phase(
    rounds: tuple[int, int] | None, phases: Collection[str] | None
) -> Callable[[int, int, Hashable], bool]:
    """A ``where`` for message keys ``(round, phase)``: the round in ``rounds``, the phase in ``phases``."""

    def where(sender: int, receiver: int, key: Hashable) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        k, phase = key
        if phase not in PLANNED_PHASES:  # a leaver's hand-off is not one of the plan's messages
            return False
        return (rounds is None or rounds[0] <= k <= rounds[1]) and (phases is None or phase in phases)

    return where


def _partition(p: PartitionFault) -> Callable[[int, int, Hashable], bool]:
    group = {i: g for g, ids in enumerate(p.groups) for i in ids}
    during = _round_phase(p.rounds, None)

    def where(sender: int, receiver: int, key: Hashable) -> bool:
        apart = group.get(sender, ("alone", sender)) != group.get(receiver, ("alone", receiver))
        return apart and during(sender, receiver, key)

    return where


def _link(f: LinkFault) -> FaultRule:
    return FaultRule(
        action="delay" if f.action == "reorder" else f.action,
        senders=f.src,
        receivers=f.dst,
        probability=f.probability,
        delay=f.delay,
        copies=f.copies,
        where=_round_phase(f.rounds, f.phases),
    )


def plan_from_config(cfg: FaultsConfig) -> FaultPlan:
    """The message faults of a fault plan (``[faults]``), keyed on ``(round, phase)``: every
    partition (a certain drop across groups while it lasts), then every link rule in file order.
    The simulator and the daemon build the same plan, so the same message meets the same fate."""
    rules = [FaultRule("drop", where=_partition(p)) for p in cfg.partition]
    rules += [_link(f) for f in cfg.link]
    return FaultPlan(tuple(rules), seed=cfg.seed)


def draw(seed: int, *parts: Hashable) -> int:
    """A 64-bit number fixed by ``seed`` and ``parts`` (stable across processes and runs)."""
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def decide(plan: FaultPlan, sender: int, receiver: int, key: Hashable) -> FaultRule | None:
    """The rule that applies to this message on this link, or None (delivered as is)."""
    for index, rule in enumerate(plan.rules):
        if rule.matches(sender, receiver, key):
            coin = draw(plan.seed, "fire", sender, receiver, key, index) / 2.0**64
            if coin < rule.probability:
                return rule
    return None


def corrupt(frames: Sequence[Buffer], rule: FaultRule, seed: int, *where: Hashable) -> list[Buffer] | None:
    """A copy of ``frames`` with one byte flipped (seeded position), or None if all are empty."""
    sizes = [memoryview(f).nbytes for f in frames]
    candidates = [i for i, n in enumerate(sizes) if n] if rule.frame is None else [rule.frame]
    candidates = [i for i in candidates if 0 <= i < len(frames) and sizes[i]]
    if not candidates:
        return None
    r = draw(seed, "corrupt", *where)
    i = candidates[r % len(candidates)]
    data = bytearray(memoryview(frames[i]).cast("B"))
    data[(r >> 16) % len(data)] ^= 1 + (r >> 8) % 255  # a non-zero mask: the byte always changes
    out = list(frames)
    out[i] = data
    return out


@dataclass
class _Held:
    release_at: int  # the receiver's message count after which it goes out
    frames: list[Buffer] = field(default_factory=list)


class FaultyTransport(Generic[T]):
    """``inner`` with the faults of ``plan`` applied to what it sends. See the module docstring."""

    def __init__(self, inner: Transport[T], plan: FaultPlan, key_of: KeyOf = no_key) -> None:
        self.inner = inner
        self.plan = plan
        self.key_of = key_of
        self.injected: Counter[str] = Counter()  # action → times applied (per receiver)
        self._sent: Counter[int] = Counter()  # receiver → messages the caller addressed to it
        self._held: defaultdict[int, list[_Held]] = defaultdict(list)

    def __repr__(self) -> str:
        return f"FaultyTransport({self.inner!r}, rules={len(self.plan.rules)})"

    @property
    def peer_id(self) -> int:
        return self.inner.peer_id

    @property
    def ordered(self) -> bool:
        """Whether each sender's messages still arrive in order: not with a ``delay`` rule."""
        return getattr(self.inner, "ordered", True) and not any(r.action == "delay" for r in self.plan.rules)

    @property
    def rejected(self) -> Counter[str]:
        return self.inner.rejected

    @property
    def dropped(self) -> Counter[str]:
        dropped = getattr(self.inner, "dropped", None)
        return dropped if isinstance(dropped, Counter) else Counter()

    async def start(self) -> None:
        await self.inner.start()

    async def recv(self) -> T:
        return await self.inner.recv()

    async def wait_ready(self, targets: Sequence[int], timeout_s: float) -> bool:
        ready: Callable[[Sequence[int], float], Any] | None = getattr(self.inner, "wait_ready", None)
        return True if ready is None else bool(await ready(targets, timeout_s))

    def _key(self, frames: Sequence[Buffer]) -> Hashable:
        try:
            return self.key_of(frames)
        except Exception:
            return None

    async def send(self, targets: Sequence[int], frames: Sequence[Buffer]) -> None:
        if not self.plan.rules:
            await self.inner.send(targets, frames)
            return
        key = self._key(frames)
        plain: list[int] = []
        faulted: list[tuple[int, FaultRule]] = []
        for t in targets:
            self._sent[t] += 1
            rule = decide(self.plan, self.peer_id, t, key)
            if rule is None:
                plain.append(t)
            else:
                faulted.append((t, rule))
        if plain:
            await self.inner.send(plain, frames)
        for t, rule in faulted:
            await self._apply(t, rule, key, frames)
        for t in targets:
            await self._release(t)

    async def _apply(self, target: int, rule: FaultRule, key: Hashable, frames: Sequence[Buffer]) -> None:
        if rule.action == "drop":
            self.injected["drop"] += 1
        elif rule.action == "duplicate":
            self.injected["duplicate"] += 1
            for _ in range(1 + rule.copies):
                await self.inner.send([target], frames)
        elif rule.action == "delay":
            self.injected["delay"] += 1
            self._held[target].append(_Held(self._sent[target] + rule.delay, list(frames)))
        else:
            bad = corrupt(frames, rule, self.plan.seed, self.peer_id, target, key)
            self.injected["corrupt" if bad is not None else "corrupt_skipped"] += 1
            await self.inner.send([target], frames if bad is None else bad)

    async def _release(self, target: int) -> None:
        held = self._held.get(target)
        if not held:
            return
        due = [h for h in held if h.release_at <= self._sent[target]]
        self._held[target] = [h for h in held if h.release_at > self._sent[target]]
        for h in due:
            await self.inner.send([target], h.frames)

    async def flush(self) -> None:
        """Send every message still held back by a delay rule, oldest first."""
        held, self._held = self._held, defaultdict(list)
        for target, items in held.items():
            for h in items:
                await self.inner.send([target], h.frames)

    async def close(self) -> None:
        lost = sum(len(v) for v in self._held.values())
        if lost:
            self.injected["delay_lost"] += lost
        self._held.clear()
        await self.inner.close()
