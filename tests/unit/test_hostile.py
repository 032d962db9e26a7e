"""What bounds the work a hostile sender can cause, in process: the reject budget, the checks made
before decoding, the size bounds of valid messages, and the agreement a catch-up jump needs."""

from __future__ import annotations

from collections import Counter

import msgpack
import pytest
import torch

from demuon.errors import WireFormatError
from demuon.node.gossip import Gossip
from demuon.transport import wire
from demuon.transport.base import MUTED, NOT_A_NEIGHBOUR, Decode, Inbox, RejectBudget
from demuon.transport.codecs import Codec, Identity
from demuon.transport.wire_errors import BadHeader, TooLarge
from tests.support.wire import CODECS, SHAPES, context, encoded, frames_of, rewrite, tensors
from tests.unit.test_gossip import build, ring3

# ------------------------------------------------------------------------------ reject budget


def test_a_sender_over_its_budget_is_muted_for_mute_s_then_heard_again() -> None:
    budget = RejectBudget(3, mute_s=10.0)
    assert [budget.charge(1, t) for t in (0.0, 1.0)] == [False, False]
    assert not budget.muted(1, 1.5)
    assert budget.charge(1, 2.0)  # the third rejection within 10 s
    assert budget.muted(1, 2.0) and budget.muted(1, 11.9) and not budget.muted(2, 5.0)
    assert not budget.muted(1, 12.0)  # the mute is over, and the budget is whole again
    assert not budget.charge(1, 12.5) and not budget.charge(1, 13.0)


def test_rejections_spread_wider_than_the_window_never_mute() -> None:
    budget = RejectBudget(2, mute_s=1.0)
    assert not any(budget.charge(4, float(t)) for t in range(20))  # one per second: the window refills


@pytest.mark.parametrize(("budget", "mute_s"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_a_budget_that_would_mute_everything_or_nothing_is_refused(budget: int, mute_s: float) -> None:
    with pytest.raises(ValueError, match="reject budget"):
        RejectBudget(budget, mute_s)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counting_decode(calls: Counter[int]) -> Decode[wire.Message]:
    ctx = context(Identity())

    def decode(sender: int, frames: list[memoryview]) -> wire.Message:
        calls[sender] += 1
        return wire.decode(frames, ctx)

    return decode


def test_strangers_and_muted_senders_cost_no_decoding() -> None:
    calls: Counter[int] = Counter()
    rejected: Counter[str] = Counter()
    clock = Clock()
    inbox = Inbox(counting_decode(calls), rejected, senders={1, 2}, budget=RejectBudget(5, 30.0), clock=clock)
    junk = [memoryview(b"\x93junk")]
    good = [memoryview(bytes(f)) for f in frames_of(Identity(), sender=2)]
    assert inbox.accept(7, good) == (False, None)  # peer 7 never sends to us: not even parsed
    for _ in range(5):
        assert inbox.accept(2, junk)[0] is False
    assert inbox.accept(2, good)[0] is False  # muted now, although this one is valid
    assert inbox.accept(1, junk)[0] is False  # another sender has its own budget
    assert calls == Counter({2: 5, 1: 1})
    assert rejected == Counter({"bad_header": 6, NOT_A_NEIGHBOUR: 1, MUTED: 1})
    clock.now = 30.0
    ok, msg = inbox.accept(2, good)
    assert ok and msg is not None and msg.sender == 2


# ------------------------------------------------------------------------------ size bounds


def keyframe_shapes() -> dict[str, tuple[int, ...]]:
    return {**SHAPES, **{n + "@sum": s for n, s in SHAPES.items()}}


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_no_valid_message_exceeds_the_bounds_its_receiver_enforces(codec: Codec) -> None:
    big = tensors(scale=1e30)  # values do not change sizes
    for phase_tensors, shapes in (
        (encoded(codec, big), SHAPES),
        (
            {
                n: Identity().encode(t.double(), seed=0)
                for n, t in {**big, **{k + "@sum": v for k, v in big.items()}}.items()
            },
            keyframe_shapes(),
        ),
    ):
        frames = [
            bytes(f)
            for f in wire.encode(
                sender=1,
                round=3,
                phase="V",
                codec=codec.kind,
                tensors=phase_tensors,
                codec_params=codec.params,
            )
        ]
        assert len(frames[0]) <= wire.header_bound(shapes)
        assert max(len(f) for f in frames[1:]) <= wire.frame_bound(shapes)
        assert sum(len(f) for f in frames) <= wire.message_bound(shapes)


def test_a_header_with_thousands_of_tensor_entries_is_refused_from_its_length_prefix() -> None:
    """The CPU attack: 1 MiB headers with ~16k tensor entries. The array limit is the receiver's
    tensor count, so msgpack refuses the list before parsing one entry; the size limit of a real
    receiver refuses the frame before msgpack sees it."""
    entry = {"name": "w" * 40, "shape": [1], "dtype": "float32", "meta": {}, "buffers": [["float32", [1], 4]]}
    frames = rewrite(frames_of(Identity()), lambda h: h.__setitem__("tensors", [entry] * 15_800))
    assert len(frames[0]) > 1_000_000  # about a MiB, as in the attack
    with pytest.raises(BadHeader, match=r"not valid msgpack.*exceeds max_array_len"):
        wire.decode(frames, context(Identity(), max_header_bytes=4 << 20))
    with pytest.raises(TooLarge):
        wire.decode(frames, context(Identity(), max_header_bytes=wire.header_bound(SHAPES)))


def test_the_gossip_context_refuses_what_no_valid_message_of_the_run_can_be() -> None:
    g = Gossip(build(ring3())[0], ring3().network, n_peers=3, rounds=4)
    huge_header = [msgpack.packb([2, 0, b"\x00" * (g.max_header_bytes + 1)]), b""]
    with pytest.raises(TooLarge):
        g.decode(1, [memoryview(f) for f in huge_header])
    assert g.max_frame_bytes == max(g.max_header_bytes, 8 * 5 * 3)  # the quadratic's 5×3 matrix, float64


# ------------------------------------------------------------------------------ catch-up


def gossip() -> Gossip:
    config = ring3()
    return Gossip(build(config)[0], config.network, n_peers=config.peers, rounds=100)


def test_only_in_neighbours_are_possible_senders() -> None:
    g = gossip()
    assert g.senders == frozenset({1, 2})
    with pytest.raises(WireFormatError, match="sender 0 not accepted"):
        g.decode(0, [memoryview(bytes(f)) for f in frames_of(Identity(), sender=0)])


def test_one_neighbour_far_ahead_is_not_enough_to_jump() -> None:
    g = gossip()
    g.mailbox.latest.update({1: 90, 2: 4})
    assert g.catch_up_round(5, [1, 2]) is None  # peer 2 is with us: peer 1's word alone is not enough
    g.mailbox.latest[2] = 30
    assert g.catch_up_round(5, [1, 2]) == 30  # both went on: jump to where both are
    g.mailbox.latest[2] = 6
    assert g.catch_up_round(5, [1, 2]) is None  # one round ahead is normal


def test_a_down_neighbour_has_no_vote_and_a_lone_one_decides() -> None:
    g = gossip()
    g.mailbox.latest.update({1: 90})
    g.liveness.down.add(2)
    assert g.catch_up_round(5, [1, 2]) == 90
    assert g.catch_up_round(5, [1]) == 90
    g.mailbox.latest[1] = 500
    assert g.catch_up_round(5, [1]) == 99  # never past the run's last round


def test_a_valid_message_is_unchanged_by_the_new_bounds() -> None:
    g = gossip()
    peer = g.peer
    out = {n: Identity().encode(torch.zeros_like(p), seed=0) for n, p in peer.params.items()}
    frames = wire.encode(sender=1, round=0, phase="X", codec="identity", tensors=out)
    assert g.decode(1, [memoryview(bytes(f)) for f in frames]).message.sender == 1
