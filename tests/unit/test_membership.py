"""Leave notices: what a peer learns from headers, when it re-weights, and the wire field that
carries them (docs/algorithms.md §8)."""

from __future__ import annotations

import msgpack
import pytest
import torch

from demuon.node.membership import Membership
from demuon.topology import heir, leave_schedule, live_mixing_matrix, mixing_matrix, peer_view
from demuon.transport import wire
from demuon.transport.codecs import Identity
from demuon.transport.wire_errors import BadHeader

EXPO8 = mixing_matrix("exponential", 8)
RING4 = mixing_matrix("ring", 4)


def test_a_notice_re_weights_from_its_round_like_a_planned_leave() -> None:
    m = Membership(EXPO8, 0, {}, notice=3)
    assert m.learn({5: 9}, k=7) and m.late == 0
    assert m.schedule() == leave_schedule(EXPO8, {5: 9}, 0)
    assert m.schedule()[0][1][0] == peer_view(live_mixing_matrix(EXPO8, [0, 1, 2, 3, 4, 6, 7]), 0)
    assert m.notices() == ((5, 9),)  # relayed in our own headers
    assert not m.learn({5: 9}, k=8)  # heard again: nothing new


def test_a_notice_heard_after_its_round_started_is_counted_late() -> None:
    m = Membership(EXPO8, 0, {}, notice=3)
    assert m.learn({5: 9}, k=9) and m.late == 0  # before round 9 starts: on time
    m2 = Membership(EXPO8, 0, {}, notice=3)
    assert m2.learn({5: 9}, k=11) and m2.late == 1


def test_the_leaver_announces_notice_rounds_ahead_and_its_heir_inherits() -> None:
    leaver = Membership(EXPO8, 5, {}, notice=3)
    assert leaver.announce(6) == 9 and leaver.notices() == ((5, 9),)
    expected_heir = heir(EXPO8, {5: 9}, 5)
    assert expected_heir == 1  # lowest-numbered neighbour: 5 ± 1, ± 2, + 4 → {1, 3, 4, 6, 7}
    other = Membership(EXPO8, expected_heir, {}, notice=3)
    other.learn({5: 9}, k=7)
    assert other.inherits() == {9: (5,)}
    assert Membership(EXPO8, 3, {}, notice=3).inherits() == {}


def test_no_notice_where_the_graph_cannot_be_re_weighted() -> None:
    assert Membership(None, 0, {}, notice=3).announce(4) is None  # directed / compressed: at once
    assert Membership(EXPO8, 0, {}, notice=0).announce(4) is None  # no notice asked for
    m = Membership(None, 0, {}, notice=3)
    assert not m.learn({1: 9}, k=2) and m.schedule() == []


def test_a_notice_that_would_disconnect_the_survivors_is_ignored_by_everyone() -> None:
    # the ring of 4 without peers 1 and 3 leaves 0 and 2 apart
    m = Membership(RING4, 0, {}, notice=3)
    assert m.learn({1: 9}, k=5)
    assert not m.learn({3: 9}, k=5) and m.announced == {1: 9}
    leaver = Membership(RING4, 3, {1: 9}, notice=3)
    assert leaver.announce(6) is None  # leaves at once instead (its neighbours then lend)


def test_notices_about_strangers_or_ourselves_are_dropped() -> None:
    m = Membership(EXPO8, 2, {}, notice=3)
    assert not m.learn({8: 9, 2: 9}, k=1) and m.announced == {}


def test_planned_leaves_are_not_announced_again() -> None:
    m = Membership(EXPO8, 0, {4: 12}, notice=3)
    assert not m.learn({4: 12}, k=3) and m.notices() == ()
    assert m.leaves() == {4: 12}


def test_a_header_carries_the_latest_notices_only() -> None:
    big = torch.eye(80, dtype=torch.float64) * 0.5 + 0.5 / 79 * (1 - torch.eye(80, dtype=torch.float64))
    m = Membership(big, 0, {}, notice=3, max_notices=4)
    m.learn({j: 100 + j for j in range(1, 10)}, k=0)
    assert m.notices() == ((6, 106), (7, 107), (8, 108), (9, 109))


def _context() -> wire.DecodeContext:
    return wire.DecodeContext(senders={1}, shapes={"w": (2,)}, dtype=torch.float64)


def _message(**extra: object) -> list[wire.Frame]:
    enc = {"w": Identity().encode(torch.ones(2, dtype=torch.float64), seed=0)}
    return wire.encode(sender=1, round=3, phase="V", codec="identity", tensors=enc, **extra)  # type: ignore[arg-type]


def test_leave_notices_travel_in_the_header() -> None:
    plain = wire.decode(_message(), _context())
    assert plain.leaves == ()
    msg = wire.decode(_message(leaves=[(5, 9), (2, 40)]), _context())
    assert msg.leaves == ((5, 9), (2, 40))
    assert len(_message(leaves=[(j, 2**40) for j in range(wire.MAX_NOTICES)])[0]) <= wire.header_bound({"w"})
    with pytest.raises(ValueError, match="leave notices"):
        _message(leaves=[(j, 1) for j in range(wire.MAX_NOTICES + 1)])


@pytest.mark.parametrize("bad", [[[5]], [[5, "9"]], [[-1, 9]], [5, 9], "x", [[5, 9, 1]]])
def test_a_malformed_notice_list_is_refused(bad: object) -> None:
    frames = _message()
    version, _, body = msgpack.unpackb(frames[0], raw=False)
    header = msgpack.unpackb(body, raw=False)
    header["leaves"] = bad
    packed = msgpack.packb(header, use_bin_type=True)
    digest = wire._digest(packed, [memoryview(f) for f in frames[1:]])
    frames[0] = msgpack.packb([version, digest, packed], use_bin_type=True)
    with pytest.raises(BadHeader):
        wire.decode(frames, _context())
