"""FaultyTransport: each fault lands on the exact (sender, receiver, key) its plan names, the
same way in every run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable, Sequence

import pytest

from demuon.transport.base import Buffer
from demuon.transport.faults import FaultPlan, FaultRule, FaultyTransport, decide, draw
from demuon.transport.inproc import InprocHub, InprocTransport

DEADLINE_S = 5.0
Received = tuple[int, list[bytes]]


def decode(sender: int, frames: list[memoryview]) -> Received:
    return sender, [bytes(f) for f in frames]


def round_phase(frames: Sequence[Buffer]) -> Hashable:
    """The test's stand-in for peeking at a wire header: frame 0 is b"<round>:<phase>"."""
    r, phase = bytes(frames[0]).decode().split(":")
    return int(r), phase


def message(k: int, phase: str = "V") -> list[Buffer]:
    return [f"{k}:{phase}".encode(), bytes(range(256)) * 4]


class Trio:
    """Peer 0 wrapped in ``plan``; peers 1 and 2 plain receivers, all on one hub."""

    def __init__(self, plan: FaultPlan) -> None:
        hub = InprocHub()
        self.sender = FaultyTransport(InprocTransport(0, hub, decode), plan, key_of=round_phase)
        self.receivers = [InprocTransport(i, hub, decode) for i in (1, 2)]

    async def start(self) -> None:
        await self.sender.start()
        for t in self.receivers:
            await t.start()

    async def close(self) -> None:
        await self.sender.close()
        for t in self.receivers:
            await t.close()

    async def send_rounds(self, rounds: range, phase: str = "V") -> None:
        for k in rounds:
            await self.sender.send([1, 2], message(k, phase))

    async def received(self, i: int) -> list[Received]:
        """Everything waiting at receiver ``i`` (inproc delivery is synchronous)."""
        t = self.receivers[i - 1]
        return [await t.recv() for _ in range(t.pending())]


def rounds_of(received: list[Received]) -> list[int]:
    return [int(frames[0].split(b":")[0]) for _, frames in received]


@pytest.fixture
async def trio(request: pytest.FixtureRequest) -> AsyncIterator[Trio]:
    t = Trio(request.param)
    try:
        await t.start()
        yield t
    finally:
        await t.close()


def plan(*rules: FaultRule, seed: int = 0) -> FaultPlan:
    return FaultPlan(rules=rules, seed=seed)


@pytest.mark.parametrize("trio", [plan(FaultRule("drop", receivers=[1], keys=[(5, "V")]))], indirect=True)
async def test_a_drop_rule_loses_exactly_the_named_message_on_the_named_link(trio: Trio) -> None:
    await trio.send_rounds(range(10))
    await trio.send_rounds(range(10), phase="X")
    assert rounds_of(await trio.received(1)) == [k for k in range(10) if k != 5] + list(range(10))
    assert rounds_of(await trio.received(2)) == list(range(10)) * 2
    assert trio.sender.injected == {"drop": 1}


@pytest.mark.parametrize("trio", [plan(FaultRule("duplicate", senders=[0], keys=[(3, "V")]))], indirect=True)
async def test_a_duplicate_rule_delivers_the_message_twice(trio: Trio) -> None:
    await trio.send_rounds(range(6))
    assert rounds_of(await trio.received(1)) == [0, 1, 2, 3, 3, 4, 5]
    assert rounds_of(await trio.received(2)) == [0, 1, 2, 3, 3, 4, 5]


@pytest.mark.parametrize(
    "trio", [plan(FaultRule("delay", receivers=[2], keys=[(3, "V")], delay=2))], indirect=True
)
async def test_a_delayed_message_is_overtaken_by_the_next_n(trio: Trio) -> None:
    await trio.send_rounds(range(8))
    assert rounds_of(await trio.received(1)) == list(range(8))
    assert rounds_of(await trio.received(2)) == [0, 1, 2, 4, 5, 3, 6, 7]


@pytest.mark.parametrize("trio", [plan(FaultRule("delay", keys=[(7, "V")], delay=5))], indirect=True)
async def test_flush_releases_held_messages_and_close_counts_what_is_left(trio: Trio) -> None:
    await trio.send_rounds(range(9))
    assert rounds_of(await trio.received(1)) == [0, 1, 2, 3, 4, 5, 6, 8]
    await trio.sender.flush()
    assert rounds_of(await trio.received(1)) == [7]
    await trio.send_rounds(range(7, 8))
    await trio.sender.close()
    assert trio.sender.injected["delay_lost"] == 2  # round 7 again, held for both receivers


@pytest.mark.parametrize(
    "trio", [plan(FaultRule("corrupt", receivers=[1], keys=[(2, "V")], frame=1))], indirect=True
)
async def test_corruption_flips_one_byte_of_a_copy(trio: Trio) -> None:
    original = message(2)
    await trio.sender.send([1, 2], original)
    assert original == message(2)  # the caller's frames are untouched
    (_, bad), (_, good) = (await trio.received(1))[0], (await trio.received(2))[0]
    assert good == [bytes(f) for f in original]
    assert bad[0] == good[0] and len(bad[1]) == len(good[1])
    assert sum(x != y for x, y in zip(bad[1], good[1], strict=True)) == 1


def test_the_same_seed_gives_the_same_fates_and_another_seed_other_fates() -> None:
    rule = FaultRule("drop", probability=0.5)
    keys = [(k, "V") for k in range(400)]

    def dropped(seed: int) -> list[Hashable]:
        return [k for k in keys if decide(plan(rule, seed=seed), 0, 1, k) is not None]

    assert dropped(7) == dropped(7)
    assert dropped(7) != dropped(8)
    assert 150 < len(dropped(7)) < 250
    assert draw(3, "x", 1) == draw(3, "x", 1) != draw(4, "x", 1)


def test_the_first_matching_rule_decides() -> None:
    p = plan(FaultRule("drop", receivers=[1]), FaultRule("duplicate"))
    assert decide(p, 0, 1, None) == p.rules[0]
    assert decide(p, 0, 2, None) == p.rules[1]


@pytest.mark.parametrize("trio", [plan(FaultRule("drop", keys=[(1, "V")]))], indirect=True)
async def test_a_key_function_that_fails_means_no_key_and_no_keyed_fault(trio: Trio) -> None:
    await trio.sender.send([1], [b"not a header"])
    assert await trio.received(1) == [(0, [b"not a header"])]


@pytest.mark.parametrize(
    "bad",
    [
        {"action": "explode"},
        {"action": "drop", "probability": 1.5},
        {"action": "delay", "delay": 0},
        {"action": "duplicate", "copies": 0},
    ],
)
def test_a_bad_rule_fails_when_built(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FaultRule(**bad)  # type: ignore[arg-type]


async def test_recv_through_the_wrapper_gets_what_the_inner_transport_receives() -> None:
    hub = InprocHub()
    a = FaultyTransport(InprocTransport(0, hub, decode), plan(FaultRule("drop", receivers=[9])))
    b = FaultyTransport(InprocTransport(1, hub, decode), FaultPlan())
    try:
        await a.start()
        await b.start()
        await b.send([0], [b"hi"])
        assert await asyncio.wait_for(a.recv(), DEADLINE_S) == (1, [b"hi"])
        assert a.peer_id == 0 and a.rejected is a.inner.rejected
    finally:
        await a.close()
        await b.close()
