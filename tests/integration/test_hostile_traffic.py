"""Hostile traffic against a running ZeroMQ transport, each attack from its own process
(``tests/support/attacker.py``, loopback only): the backed-up-connection attack that aborted
libzmq 4.3 through a listener heartbeat, a 256 MiB frame, and a frame header claiming 2**40 bytes.
Each test asserts that the victim is alive, that a valid message still arrives afterwards, and
where it applies that its memory stayed bounded."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import torch
import zmq
import zmq.asyncio

from demuon.config import NetworkConfig
from demuon.transport import wire
from demuon.transport.base import TransportStatus
from demuon.transport.codecs import Identity
from demuon.transport.zeromq import ZmqTransport

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"w": (8, 4)}
CTX = wire.DecodeContext(senders={1}, shapes=SHAPES, max_round=100)
PAGE = 4096
ATTACK_TIMEOUT_S = 60.0


async def attack(*args: str) -> str:
    """Run one action of tests/support/attacker.py to its end; returns its last output line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.attacker", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), ATTACK_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"attacker {args} failed with {proc.returncode}"
    return out.decode().strip().splitlines()[-1]


def valid_frames(value: float = 1.0) -> list[bytes]:
    tensors = {n: Identity().encode(torch.full(s, value), seed=0) for n, s in SHAPES.items()}
    return [bytes(f) for f in wire.encode(sender=1, round=3, phase="V", codec="identity", tensors=tensors)]


@asynccontextmanager
async def victim(
    decode: Callable[[int, list[memoryview]], wire.Message], max_frame_bytes: int | None = None
) -> AsyncIterator[ZmqTransport[wire.Message]]:
    """Peer 0's transport on a free loopback port with the default network settings."""
    net = NetworkConfig()
    t = ZmqTransport[wire.Message](
        0,
        "tcp://127.0.0.1:0",
        {},
        decode,
        hwm=net.hwm,
        heartbeat_ms=net.heartbeat_ms,
        max_frame_bytes=max_frame_bytes,
    )
    await t.start()
    try:
        yield t
    finally:
        await t.close()


async def still_delivers(t: ZmqTransport[wire.Message]) -> None:
    """A valid message from peer 1 sent now reaches ``recv``."""
    ctx = zmq.asyncio.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"1")
    s.setsockopt(zmq.LINGER, 0)
    s.connect(t.endpoint)
    try:
        await s.send_multipart(valid_frames())
        msg = await asyncio.wait_for(t.recv(), 30.0)
        assert (msg.sender, msg.round) == (1, 3)
        assert t.status is TransportStatus.RUNNING
    finally:
        s.close()
        ctx.term()


async def quiet(t: ZmqTransport[wire.Message], settle_s: float = 1.0, limit_s: float = 30.0) -> None:
    """Until the victim has taken in everything queued (no new rejection for ``settle_s``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    last = -1
    while loop.time() < end:
        seen = sum(t.rejected.values())
        if seen == last:
            return
        last = seen
        await asyncio.sleep(settle_s)  # a quiet period is what is measured here
    raise AssertionError(f"still receiving after {limit_s}s: {dict(t.rejected)}")


def slow_decode(sender: int, frames: list[memoryview]) -> wire.Message:
    """The real decoder behind 2 ms of work per message: slow enough that a flood fills the
    connection's receive pipe, which is what the libzmq abort needs."""
    time.sleep(0.002)
    return wire.decode(frames, CTX)


async def test_a_backed_up_connection_taken_over_by_its_identity_does_not_abort_the_peer() -> None:
    """Three connections with one identity flood a slow receiver, then leave. With a heartbeat on
    the listener this aborted the process (``!_io_error``, stream_engine_base.cpp:310) in every
    trial; the listener now runs none (docs/design.md §8)."""
    async with victim(slow_decode) as t:
        assert (await attack("flood", t.endpoint.rpartition(":")[2], "5")).startswith("sent")
        await quiet(t)
        assert t.rejected["bad_header"] > 0
        await still_delivers(t)


@contextmanager
def peak_of(field: int) -> Iterator[list[int]]:
    """The peak of /proc/self/statm's ``field`` (0: VmSize, 1: RSS; in pages) over the block,
    sampled every millisecond from a thread; yields ``[baseline, peak]``."""
    path = Path("/proc/self/statm")

    def read() -> int:
        return int(path.read_text().split()[field])

    seen = [read(), read()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            seen[1] = max(seen[1], read())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=5.0)


def rejecting_decode(sender: int, frames: list[memoryview]) -> wire.Message:
    return wire.decode(frames, CTX)


async def test_a_256_mib_frame_from_a_non_peer_is_refused_without_buffering_it() -> None:
    async with victim(rejecting_decode, max_frame_bytes=1 << 20) as t:
        with peak_of(1) as rss:
            assert await attack("big", t.endpoint.rpartition(":")[2], "256") == "sent"
        assert (rss[1] - rss[0]) * PAGE < 32 << 20, f"RSS grew by {(rss[1] - rss[0]) * PAGE >> 20} MiB"
        await still_delivers(t)


async def test_a_frame_header_claiming_two_to_the_forty_bytes_drops_the_connection() -> None:
    async with victim(rejecting_decode, max_frame_bytes=1 << 20) as t:
        with peak_of(0) as size:
            assert await attack("claim", t.endpoint.rpartition(":")[2]) == "closed"
        assert (size[1] - size[0]) * PAGE < 1 << 30, f"VmSize grew by {(size[1] - size[0]) * PAGE >> 20} MiB"
        await still_delivers(t)
