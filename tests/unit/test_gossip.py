"""The round protocol: mailbox rules, liveness, and exchanges over the in-process transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import torch

from demuon.app import simulate
from demuon.app.peers import build_peers
from demuon.config import Config, config_from_dict
from demuon.node.gossip import AHEAD_WINDOW, Gossip, Inbound, Liveness, Mailbox, Outcome
from demuon.node.peer import Peer
from demuon.node.rounds import ExchangeStats
from demuon.transport.faults import FaultPlan, FaultRule, FaultyTransport
from demuon.transport.inproc import InprocHub, InprocTransport

# ------------------------------------------------------------------------------ mailbox


def test_messages_from_a_neighbour_running_ahead_are_kept_until_their_round() -> None:
    box: Mailbox[str] = Mailbox(current=5)
    assert box.put(6, "V", 1, "ahead") is Outcome.KEPT
    assert box.put(5 + AHEAD_WINDOW, "X", 1, "far ahead") is Outcome.KEPT
    box.advance(6)
    assert box.take(6, "V", [1, 2]) == {1: "ahead"}
    assert box.has(5 + AHEAD_WINDOW, "X", 1)


def test_messages_beyond_the_ahead_window_are_dropped_and_counted() -> None:
    box: Mailbox[str] = Mailbox(current=0)
    assert box.put(AHEAD_WINDOW + 1, "V", 1, "too far") is Outcome.AHEAD
    assert box.counts["ahead"] == 1 and len(box) == 0


def test_stale_messages_are_dropped_and_counted() -> None:
    box: Mailbox[str] = Mailbox(current=3)
    assert box.put(2, "V", 1, "old") is Outcome.STALE
    box.put(3, "X", 2, "unused")
    box.advance(4)  # a stored message of a past round is stale too
    assert box.counts["stale"] == 2 and len(box) == 0


def test_duplicates_are_dropped_and_counted_whether_stored_or_already_used() -> None:
    box: Mailbox[str] = Mailbox(current=0)
    assert box.put(0, "V", 1, "first") is Outcome.KEPT
    assert box.put(0, "V", 1, "again") is Outcome.DUPLICATE
    assert box.take(0, "V", [1]) == {1: "first"}
    box.close(0, "V")
    assert box.put(0, "V", 1, "once more") is Outcome.DUPLICATE
    box.advance(1)
    assert box.put(0, "V", 1, "a round later") is Outcome.DUPLICATE
    assert box.counts["duplicate"] == 3


def test_a_message_for_a_phase_already_exchanged_is_late() -> None:
    box: Mailbox[str] = Mailbox(current=0)
    box.close(0, "V")
    assert box.put(0, "V", 2, "too late") is Outcome.LATE
    assert box.put(0, "X", 2, "in time") is Outcome.KEPT
    assert box.counts["late"] == 1


# ------------------------------------------------------------------------------ liveness


def test_a_neighbour_is_down_after_k_consecutive_misses_and_up_when_heard_again() -> None:
    live = Liveness(down_after=3)
    assert not live.missed(4) and not live.missed(4)
    live.heard(4)  # a message resets the count
    assert [live.missed(4) for _ in range(3)] == [False, False, True]
    assert live.down == {4}
    assert not live.missed(4)  # already down: reported once
    assert live.heard(4) and live.down == set()


# ------------------------------------------------------------------------------ exchanges


def ring3(**network: object) -> Config:
    return config_from_dict(
        {
            "peers": 3,
            "rounds": 4,
            "seed": 1,
            "device": "cpu",
            "workload": {"kind": "quadratic", "rows": 8, "dim_in": 5, "dim_out": 3},
            "network": {"phase_timeout_s": 0.05, "start_timeout_s": 0.05, "down_after_misses": 2, **network},
        }
    )


def build(config: Config) -> list[Peer]:
    return build_peers(config)[0]


async def pump(gossip: Gossip) -> None:
    assert gossip.transport is not None
    while True:
        gossip.deliver(await gossip.transport.recv())


@asynccontextmanager
async def cluster(config: Config, running: list[int]) -> AsyncIterator[dict[int, Gossip]]:
    """Gossips of ``running`` peers on one in-process hub, each with its receive task."""
    hub = InprocHub(range(config.peers))
    peers = build(config)
    gossips: dict[int, Gossip] = {}
    for i in running:
        g = Gossip(peers[i], config.network, n_peers=config.peers, rounds=config.rounds, start_round=0)
        g.transport = InprocTransport[Inbound](i, hub, g.decode)
        await g.transport.start()
        gossips[i] = g
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(pump(g)) for g in gossips.values()]
            try:
                yield gossips
            finally:
                for t in tasks:
                    t.cancel()
    finally:
        for g in gossips.values():
            assert g.transport is not None
            await g.transport.close()


async def one_phase(
    g: Gossip, k: int, phase: str
) -> tuple[dict[int, dict[str, torch.Tensor]], ExchangeStats]:
    g.begin_round(k)
    if phase == g.peer.phases[0]:
        g.peer.gradient(k)
    out = g.peer.message(phase, k)
    delivery = await g.exchange(k, phase, out)
    g.peer.mix(phase, k, delivery.received)
    return delivery.received, delivery.stats


async def test_every_neighbour_receives_exactly_what_the_simulator_would_deliver() -> None:
    config = ring3(phase_timeout_s=5.0, start_timeout_s=5.0)
    reference = build(config)
    async with cluster(config, [0, 1, 2]) as gossips:
        for k in range(2):
            simulate.simulate_round(reference, k)
            for phase in ("V", "X"):
                await asyncio.gather(*(one_phase(g, k, phase) for g in gossips.values()))
    for i, g in gossips.items():
        for name in g.peer.names:
            assert torch.equal(g.peer.params[name], reference[i].params[name])


async def test_a_silent_neighbour_is_marked_down_and_no_longer_waited_for() -> None:
    config = ring3()
    async with cluster(config, [0, 1]) as gossips:
        g = gossips[0]
        history = []
        for k in range(2):
            for phase in ("V", "X"):
                await asyncio.gather(*(one_phase(x, k, phase) for x in gossips.values()))
                history.append(g.liveness.down.copy())
        assert history == [set(), {2}, {2}, {2}]
        _, stats = await one_phase(g, 2, "V")
        assert stats.waited_for == (1,)  # peer 2 is down: not waited for


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_a_message_from_a_down_neighbour_is_still_used_and_marks_it_up() -> None:
    config = ring3()
    async with cluster(config, [0, 1]) as gossips:
        g = gossips[0]
        g.liveness.down.update({1, 2})
        sender = asyncio.create_task(one_phase(gossips[1], 0, "V"))
        await wait_until(lambda: g.mailbox.has(0, "V", 1))
        assert g.liveness.down == {2}  # up again as soon as its message arrived
        received, _ = await one_phase(g, 0, "V")
        await sender
        assert set(received) == {1}
        assert g.keyframe_wanted


async def test_a_peer_whose_every_neighbour_is_down_still_waits_out_the_deadline() -> None:
    """An isolated peer (probably its own link is down) must not race through the remaining
    rounds alone: it waits for everybody, so it stays at most a few rounds ahead of the others."""
    config = ring3()
    async with cluster(config, [0]) as gossips:
        g = gossips[0]
        g.liveness.down.update({1, 2})
        _, stats = await one_phase(g, 0, "V")
        assert stats.waited_for == (1, 2)
        assert stats.waited_s >= config.network.start_timeout_s  # the first phase's deadline


async def test_a_neighbour_that_hands_off_while_we_wait_for_it_is_no_longer_waited_for() -> None:
    """A leave announced at run time can reach a peer already waiting for the leaver's message of
    the round it left before: the hand-off ends that wait, instead of the phase deadline."""
    config = ring3(phase_timeout_s=10.0, start_timeout_s=10.0)
    async with cluster(config, [0, 1, 2]) as gossips:
        g, leaver = gossips[0], gossips[2]
        waiting = asyncio.create_task(one_phase(g, 0, "V"))
        await wait_until(lambda: len(g._sent) == 1)  # sent, and now waiting for peers 1 and 2
        await leaver.send_handoff(0, leaver.peer.handoff(), 0)
        await leaver.send_handoff(0, {n: torch.zeros_like(t) for n, t in leaver.peer.handoff().items()}, 1)
        _, peer1_stats = await one_phase(gossips[1], 0, "V")
        _, stats = await waiting
    assert stats.waited_for == (1, 2) and stats.missing == (2,)
    assert stats.waited_s < stats.deadline_s and peer1_stats.missing == (2,)
    assert g.departed == {2} and set(g.take_handoffs()) == {2}


async def test_a_sender_a_round_ahead_whose_message_is_missing_is_not_waited_for() -> None:
    """Links keep each sender's order, so a message of round k + 1 from j means j's round-k one
    was lost (e.g. sent to the process we were before a restart): no wait for it."""
    config = ring3(phase_timeout_s=10.0, start_timeout_s=10.0)
    async with cluster(config, [0]) as gossips:
        g = gossips[0]
        g.mailbox.latest.update({1: 1, 2: 1})  # both have sent round-1 messages, not their round-0 ones
        _, stats = await one_phase(g, 0, "V")
    assert stats.waited_for == (1, 2) and stats.missing == (1, 2)
    assert stats.waited_s < stats.deadline_s


async def test_over_a_link_that_may_reorder_only_two_rounds_ahead_prove_a_loss() -> None:
    config = ring3(phase_timeout_s=0.3, start_timeout_s=0.3)
    async with cluster(config, [0]) as gossips:
        g = gossips[0]
        assert g.transport is not None
        g.transport = FaultyTransport(g.transport, FaultPlan((FaultRule("delay"),)))
        g.mailbox.latest.update({1: 1, 2: 1})  # a held-back round-0 message may still come
        _, stats = await one_phase(g, 0, "V")
    assert stats.missing == (1, 2) and stats.waited_s >= stats.deadline_s


@pytest.mark.parametrize(("resend_s", "most", "least"), [(0.1, 3, 1), (0.0, 0, 0)])
async def test_resends_back_off_within_a_wait(resend_s: float, most: int, least: int) -> None:
    """A wait of 1 s for silent neighbours resends after 0.1, 0.3 and 0.7 s (the gap doubles), not
    every 0.1 s: on a link slower than a round's messages, fixed-interval copies would queue up
    faster than the link drains them. ``resend_s = 0`` never resends. (A loaded machine can only
    delay a resend, which delays the later ones: never more than the schedule's count.)"""
    config = ring3(phase_timeout_s=1.0, start_timeout_s=1.0, resend_s=resend_s)
    async with cluster(config, [0]) as gossips:
        _, stats = await one_phase(gossips[0], 0, "V")
    assert least <= stats.resends <= most
