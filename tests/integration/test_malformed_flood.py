"""A running ZeroMQ transport with the real wire decoder survives 10,000 malformed messages from a
raw socket, counts every one by kind, and still delivers the valid message sent after them."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Callable

import msgpack
import torch
import zmq
import zmq.asyncio

from demuon.errors import WireFormatError
from demuon.transport import wire
from demuon.transport.codecs import Encoded, Identity, TopK
from demuon.transport.zeromq import ZmqTransport

FLOOD = 10_000
SHAPES = {"w": (8, 4), "b": (4,)}
CTX = wire.DecodeContext(
    senders={1},
    shapes=SHAPES,
    codecs={"identity": Identity(), "topk": TopK(0.25)},
    max_round=100,
)

Frames = list[bytes]


def frames_of(
    *,
    sender: int = 1,
    round: int = 5,
    phase: str = "V",
    codec: str = "identity",
    tensors: dict[str, torch.Tensor] | None = None,
    encoded: dict[str, Encoded] | None = None,
) -> Frames:
    if encoded is None:
        tensors = tensors if tensors is not None else {n: torch.randn(s) for n, s in SHAPES.items()}
        encoded = {n: Identity().encode(t, seed=0) for n, t in tensors.items()}
    out = wire.encode(sender=sender, round=round, phase=phase, codec=codec, tensors=encoded)
    return [bytes(f) for f in out]


def reenvelope(frames: Frames, version: int) -> Frames:
    _, crc, body = msgpack.unpackb(frames[0])
    return [msgpack.packb([version, crc, body], use_bin_type=True), *frames[1:]]


def flip_a_byte(rng: random.Random) -> Frames:
    frames = frames_of()
    i = rng.randrange(len(frames))
    data = bytearray(frames[i])
    data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    frames[i] = bytes(data)
    return frames


def bad_topk_index() -> Frames:
    values = torch.ones(8)
    idx = torch.arange(8, dtype=torch.int32) * 1000  # beyond the 32 entries of "w"
    enc = {"w": Encoded((values, idx), {"k": 8}, (8, 4), torch.float32)}
    enc["b"] = TopK(0.25).encode(torch.randn(4), seed=0)
    return frames_of(codec="topk", encoded=enc)


MALFORMED: list[Callable[[random.Random], Frames]] = [
    lambda rng: [rng.randbytes(rng.randrange(0, 64))],  # random bytes
    lambda rng: [rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(2, 6))],
    lambda rng: [frames_of()[0][: rng.randrange(1, 20)]],  # truncated header
    lambda rng: frames_of()[:-1],  # a missing frame
    lambda rng: [*frames_of(), b"extra"],
    lambda rng: [*frames_of()[:-1], frames_of()[-1][:-4]],  # truncated payload
    flip_a_byte,  # bad checksum (or a header that no longer parses)
    lambda rng: reenvelope(frames_of(), version=wire.PROTOCOL_VERSION + 1),
    lambda rng: frames_of(sender=7),
    lambda rng: frames_of(round=10_000),
    lambda rng: frames_of(phase="Z"),
    lambda rng: frames_of(codec="natural"),
    lambda rng: frames_of(tensors={"w": torch.randn(4, 8), "b": torch.randn(4)}),  # wrong shape
    lambda rng: frames_of(tensors={"w": torch.randn(8, 4)}),  # a missing tensor
    lambda rng: frames_of(tensors={"w": torch.randn(8, 4, dtype=torch.float64), "b": torch.randn(4)}),
    lambda rng: frames_of(tensors={"w": torch.full((8, 4), float("nan")), "b": torch.randn(4)}),
    lambda rng: bad_topk_index(),
]


def rejection_kind(frames: Frames) -> str:
    try:
        wire.decode(frames, CTX)
    except WireFormatError as err:
        return err.kind
    raise AssertionError(f"a malformed message decoded: {frames!r:.200}")


def decode(sender: int, frames: list[memoryview]) -> wire.Message:
    return wire.decode(frames, CTX)


async def test_ten_thousand_malformed_messages_are_counted_and_a_valid_one_still_arrives() -> None:
    rng = random.Random(0)
    flood = [MALFORMED[i % len(MALFORMED)](rng) for i in range(FLOOD)]
    expected = Counter(rejection_kind(m) for m in flood)  # sans-IO: what the wire code says
    assert len(expected) >= 12, expected

    receiver: ZmqTransport[wire.Message] = ZmqTransport(0, "tcp://127.0.0.1:*", {}, decode)
    ctx = zmq.asyncio.Context()
    try:
        await receiver.start()
        attacker = ctx.socket(zmq.DEALER)
        attacker.setsockopt(zmq.LINGER, 0)
        attacker.setsockopt(zmq.IDENTITY, b"1")  # claims to be a legitimate peer
        attacker.connect(receiver.endpoint)
        for frames in flood:
            await asyncio.wait_for(attacker.send_multipart(frames), 10)
        X = {n: torch.randn(s) for n, s in SHAPES.items()}
        await attacker.send_multipart(frames_of(round=6, tensors=X))

        msg = await asyncio.wait_for(receiver.recv(), 30)  # same connection: after the flood
        assert (msg.sender, msg.round, msg.phase) == (1, 6, "V")
        assert all(torch.equal(msg.tensors[n], X[n]) for n in SHAPES)
        assert receiver.rejected == expected
        assert sum(receiver.rejected.values()) == FLOOD
        assert receiver.pending() == 0
    finally:
        ctx.destroy(linger=0)
        await receiver.close()


def test_random_frames_never_escape_as_anything_but_a_wire_format_error() -> None:
    rng = random.Random(1)
    for _ in range(500):
        frames = [os.urandom(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 5))]
        rejection_kind(frames)
