"""One suite, every Transport: inproc, ZeroMQ over tcp / ipc / tcp+CURVE, and FaultyTransport with
an empty plan around inproc. Then a few ZeroMQ-only checks (identities, HWM, uvloop)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
import zmq
import zmq.asyncio

from demuon.errors import TransportError, WireFormatError
from demuon.transport.base import Buffer, Transport, TransportStatus
from demuon.transport.faults import FaultPlan, FaultyTransport
from demuon.transport.inproc import InprocHub, InprocTransport
from demuon.transport.security import CurveKeys
from demuon.transport.zeromq import ZmqTransport

KINDS = ["inproc", "zmq-tcp", "zmq-ipc", "zmq-curve", "faulty-inproc"]
N = 3  # peers 0, 1, 2, everyone an out-neighbour of everyone
GHOST = 9  # a known neighbour that never starts
DEADLINE_S = 5.0  # bound on every wait in this file

Received = tuple[int, list[bytes]]


class Rejected(WireFormatError):
    kind = "test_reject"


def decode(sender: int, frames: list[memoryview]) -> Received:
    """Trivial decode: copies the frames; a magic first frame is rejected, another crashes."""
    first = bytes(frames[0]) if frames else b""
    if first == b"reject-me":
        raise Rejected("magic payload")
    if first == b"crash-me":
        raise RuntimeError("decoder bug")
    return sender, [bytes(f) for f in frames]


async def recv(t: Any) -> Received:
    msg: Received = await asyncio.wait_for(t.recv(), DEADLINE_S)
    return msg


class Cluster:
    """N peers of one transport kind, fully connected, plus the ghost neighbour."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        self.hub = InprocHub(peers=[*range(N), GHOST])
        self.keys = {i: CurveKeys.generate() for i in [*range(N), GHOST]}
        self.endpoints: dict[int, str] = {i: f"ipc://{tmp}/p{i}" for i in range(N)}
        self.endpoints[GHOST] = f"ipc://{tmp}/ghost"
        self.peers: list[Any] = []
        self._all: list[Any] = []  # every transport ever made here, closed at the end

    def make(self, i: int) -> Any:
        others = {j: e for j, e in self.endpoints.items() if j != i}
        t: Any
        if self.kind in ("inproc", "faulty-inproc"):
            t = InprocTransport(i, self.hub, decode)
            if self.kind == "faulty-inproc":
                t = FaultyTransport(t, FaultPlan())
        elif self.kind == "zmq-ipc":
            t = ZmqTransport(i, self.endpoints[i], others, decode)
        else:
            curve = self.kind == "zmq-curve"
            public = {j: k.public for j, k in self.keys.items()}
            endpoint = self.endpoints[i] if self.endpoints[i].startswith("tcp") else "tcp://127.0.0.1:*"
            t = ZmqTransport(
                i, endpoint, {}, decode, curve=self.keys[i] if curve else None, public_keys=public
            )
        self._all.append(t)
        return t

    async def start(self) -> None:
        assert len(f"{self.tmp}/ghost") < 100, "ipc path too long"
        self.peers = [self.make(i) for i in range(N)]
        for t in self.peers:
            await t.start()
        if self.kind in ("zmq-tcp", "zmq-curve"):  # ports chosen at bind: connect afterwards
            self.endpoints.update({i: t.endpoint for i, t in enumerate(self.peers)})
            for i, t in enumerate(self.peers):
                for j, e in self.endpoints.items():
                    if j != i:
                        t.add_neighbour(j, e)
        for i, t in enumerate(self.peers):
            assert await t.wait_ready([j for j in range(N) if j != i], DEADLINE_S)

    async def restart(self, i: int) -> Any:
        await self.peers[i].close()
        self.peers[i] = self.make(i)
        if self.kind in ("zmq-tcp", "zmq-curve"):
            for j, e in self.endpoints.items():
                if j != i:
                    self.peers[i].add_neighbour(j, e)
        await self.peers[i].start()
        return self.peers[i]

    async def close(self) -> None:
        for t in self._all:
            await t.close()


@pytest.fixture(params=KINDS)
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(request.param, tmp_path)
    try:
        await c.start()
        yield c
    finally:
        await c.close()


def test_every_transport_satisfies_the_protocol() -> None:
    hub = InprocHub()
    transports: list[Transport[Received]] = [  # checked by mypy as much as by the asserts
        InprocTransport(0, hub, decode),
        ZmqTransport(1, "tcp://127.0.0.1:*", {}, decode),
        FaultyTransport(InprocTransport(2, hub, decode), FaultPlan()),
    ]
    assert [t.peer_id for t in transports] == [0, 1, 2]
    assert all(not t.rejected for t in transports)


async def test_a_multi_frame_message_reaches_every_target_with_identical_bytes(cluster: Cluster) -> None:
    a, b, c = cluster.peers
    frames: list[Buffer] = [b"header", os.urandom(1 << 20), b"", bytearray(b"tail")]
    await a.send([1, 2], frames)
    expected = (0, [bytes(f) for f in frames])
    assert await recv(b) == expected
    assert await recv(c) == expected


async def test_messages_from_each_sender_arrive_in_order_with_the_right_sender_id(cluster: Cluster) -> None:
    a, b, c = cluster.peers
    for k in range(100):
        await a.send([1], [b"a%d" % k])
        await c.send([1], [b"c%d" % k])
    got: dict[int, list[bytes]] = {0: [], 2: []}
    for _ in range(200):
        sender, frames = await recv(b)
        got[sender].append(frames[0])
    assert got[0] == [b"a%d" % k for k in range(100)]
    assert got[2] == [b"c%d" % k for k in range(100)]


async def test_rejections_are_counted_by_kind_and_the_receiver_keeps_going(cluster: Cluster) -> None:
    a, b, _ = cluster.peers
    for payload in [b"reject-me", b"crash-me", b"reject-me", b"reject-me", b"crash-me"]:
        await a.send([1], [payload, b"x"])
    await a.send([1], [b"fine"])
    assert await recv(b) == (0, [b"fine"])
    assert b.rejected == {"test_reject": 3, "decode_crash": 2}


async def test_an_unknown_target_raises_naming_it_and_nothing_is_sent(cluster: Cluster) -> None:
    a, b, _ = cluster.peers
    with pytest.raises(TransportError, match="77") as err:
        await a.send([1, 77], [b"never"])
    assert err.value.peer == 77
    await a.send([1], [b"after"])
    assert await recv(b) == (0, [b"after"])


async def test_a_neighbour_that_never_started_costs_a_drop_not_a_wait(cluster: Cluster) -> None:
    a = cluster.peers[0]
    start = time.monotonic()
    for _ in range(20):
        await a.send([GHOST], [b"into the void"])
    assert time.monotonic() - start < 1.0
    assert sum(a.dropped.values()) == 20


async def test_close_is_idempotent_and_fast_even_with_undelivered_messages(cluster: Cluster) -> None:
    a, b, _ = cluster.peers
    await b.close()
    for _ in range(50):
        await a.send([1, GHOST], [os.urandom(100_000)])
    start = time.monotonic()
    await a.close()
    await a.close()
    assert time.monotonic() - start < 1.0
    inner: Any = a.inner if isinstance(a, FaultyTransport) else a
    assert inner.status is TransportStatus.CLOSED
    with pytest.raises(TransportError):
        await a.send([1], [b"late"])


async def test_recv_after_close_raises_and_a_waiting_recv_is_woken(cluster: Cluster) -> None:
    b = cluster.peers[1]
    waiting = asyncio.create_task(b.recv())
    try:
        await asyncio.sleep(0)  # let it start waiting
        await b.close()
        with pytest.raises(TransportError):
            await asyncio.wait_for(waiting, DEADLINE_S)
    finally:
        waiting.cancel()
        await asyncio.wait({waiting})
    with pytest.raises(TransportError):
        await b.recv()


async def test_a_neighbour_that_restarts_with_the_same_id_is_reached_again(cluster: Cluster) -> None:
    a = cluster.peers[0]
    b = await cluster.restart(1)
    # Until a sender notices the old connection died, a message may go to it: retry, bounded.
    got: Received | None = None
    for k in range(50):
        await a.send([1], [b"hello again %d" % k])
        try:
            got = await asyncio.wait_for(b.recv(), 0.1)
            break
        except TimeoutError:
            continue
    assert got is not None and got[0] == 0 and got[1][0].startswith(b"hello again")
    assert await b.wait_ready([0], DEADLINE_S)
    await b.send([0], [b"back"])  # the restarted peer is heard (ROUTER_HANDOVER for ZeroMQ)
    assert await recv(a) == (1, [b"back"])


# ------------------------------------------------------------------------- ZeroMQ only


@pytest.fixture
async def receiver() -> AsyncIterator[ZmqTransport[Received]]:
    t: ZmqTransport[Received] = ZmqTransport(0, "tcp://127.0.0.1:*", {}, decode, hwm=10, queue_size=10)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


async def raw_dealer(ctx: zmq.asyncio.Context, endpoint: str, identity: bytes | None) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


async def test_identities_that_are_not_peer_ids_are_rejected(receiver: ZmqTransport[Received]) -> None:
    ctx = zmq.asyncio.Context()
    try:
        socks = []  # kept referenced: a collected socket is closed with its queue
        for identity in [None, b"x1", b"-1", b"12345678901", b" 1"]:
            socks.append(await raw_dealer(ctx, receiver.endpoint, identity))
            await socks[-1].send_multipart([b"hi"])
        honest = await raw_dealer(ctx, receiver.endpoint, b"4")
        await honest.send_multipart([b"hi"])
        assert await recv(receiver) == (4, [b"hi"])
        deadline = time.monotonic() + DEADLINE_S  # the other connections race the honest one
        while receiver.rejected["unknown_identity"] < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert receiver.rejected == {"unknown_identity": 5}
    finally:
        ctx.destroy(linger=0)


async def test_a_full_queue_drops_at_the_sender_instead_of_blocking(receiver: ZmqTransport[Received]) -> None:
    sender: ZmqTransport[Received] = ZmqTransport(
        1, "tcp://127.0.0.1:*", {0: receiver.endpoint}, decode, hwm=10
    )
    try:
        await sender.start()
        assert await sender.wait_ready([0], DEADLINE_S)
        start = time.monotonic()
        for k in range(2000):  # the receiver does not read: its queue, then both HWMs fill
            await sender.send([0], [b"%d" % k, bytes(1000)])
        assert time.monotonic() - start < 5.0
        assert sender.dropped["dropped_hwm"] > 0
        assert (await recv(receiver))[1][0] == b"0"  # what got through is in order
    finally:
        await sender.close()


async def test_a_frame_over_the_size_limit_drops_its_connection_not_the_receiver() -> None:
    receiver: ZmqTransport[Received] = ZmqTransport(0, "tcp://127.0.0.1:*", {}, decode, max_frame_bytes=1000)
    ctx = zmq.asyncio.Context()
    try:
        await receiver.start()
        big = await raw_dealer(ctx, receiver.endpoint, b"1")
        await big.send_multipart([b"too big", bytes(1001)])
        small = await raw_dealer(ctx, receiver.endpoint, b"2")
        await small.send_multipart([b"fits", bytes(1000)])
        assert await recv(receiver) == (2, [b"fits", bytes(1000)])
        await small.send_multipart([b"still here"])
        assert await recv(receiver) == (2, [b"still here"])
        assert receiver.pending() == 0 and not receiver.rejected  # ZeroMQ dropped it on the wire
    finally:
        ctx.destroy(linger=0)
        await receiver.close()


def test_the_zeromq_transport_runs_under_uvloop() -> None:
    async def main() -> Received:
        a: ZmqTransport[Received] = ZmqTransport(0, "tcp://127.0.0.1:*", {}, decode)
        b: ZmqTransport[Received] | None = None
        try:
            await a.start()
            b = ZmqTransport(1, "tcp://127.0.0.1:*", {0: a.endpoint}, decode)
            await b.start()
            assert await b.wait_ready([0], DEADLINE_S)
            await b.send([0], [b"on uvloop", os.urandom(200_000)])
            return await recv(a)
        finally:
            await a.close()
            if b is not None:
                await b.close()

    sender, frames = uvloop.run(main())
    assert sender == 1 and frames[0] == b"on uvloop" and len(frames[1]) == 200_000
