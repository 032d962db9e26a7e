"""Wire-format helpers shared by the wire tests: sample tensors, encoded messages, receive
contexts, and a way to edit a header and re-seal it with a correct checksum."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack
import torch
import xxhash

from demuon.transport import wire
from demuon.transport.codecs import (
    BlockQuant,
    Cast,
    Codec,
    Encoded,
    Identity,
    Int8,
    Natural,
    RandK,
    RankK,
    TopK,
)

SHAPES: dict[str, tuple[int, ...]] = {"layer.weight": (6, 5), "layer.bias": (5,), "gain": ()}
CODECS: list[Codec] = [
    Identity(),
    Cast(torch.bfloat16),
    Cast(torch.float16),
    TopK(0.2),
    RandK(0.3),
    RankK(2, 1),
    Natural(),
    Int8(),
    Int8(per_row=True),
    Int8(deflate=True),
    BlockQuant(4),
    BlockQuant(2, 8, stochastic=True),
    BlockQuant(1),
    BlockQuant(1, 16, stochastic=True),
]


def tensors(scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {name: scale * torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def encoded(codec: Codec, values: Mapping[str, torch.Tensor] | None = None) -> dict[str, Encoded]:
    values = tensors() if values is None else values
    return {name: codec.encode(x, seed=100 + t) for t, (name, x) in enumerate(values.items())}


TOPK = TopK(0.2)


def frames_of(codec: Codec = TOPK, **overrides: Any) -> list[wire.Frame]:
    args: dict[str, Any] = {
        "sender": 2,
        "round": 7,
        "phase": "X",
        "codec": codec.kind,
        "tensors": encoded(codec),
        "codec_params": codec.params,
    }
    args.update(overrides)
    return wire.encode(**args)


def context(*codecs: Codec, **overrides: Any) -> wire.DecodeContext:
    args: dict[str, Any] = {
        "senders": frozenset({0, 1, 2, 3}),
        "shapes": SHAPES,
        "codecs": {c.kind: c for c in (codecs or (TopK(0.2),))},
        "min_round": 5,
        "max_round": 9,
    }
    args.update(overrides)
    return wire.DecodeContext(**args)


def copies(frames: Sequence[Any]) -> list[bytes]:
    return [bytes(f) for f in frames]


def rewrite(frames: Sequence[Any], edit: Callable[[dict[str, Any]], None]) -> list[bytes]:
    """Edit the header (as a dict) and re-seal the message with a correct checksum."""
    version, _, body = msgpack.unpackb(bytes(frames[0]))
    header = msgpack.unpackb(body)
    edit(header)
    packed = msgpack.packb(header, use_bin_type=True)
    payload = copies(frames[1:])
    return [msgpack.packb([version, digest(packed, payload), packed], use_bin_type=True), *payload]


def digest(body: bytes, payload: Sequence[Any]) -> int:
    """The envelope's checksum: XXH3-64 over the header body, then every payload frame."""
    hasher = xxhash.xxh3_64(body)
    for frame in payload:
        hasher.update(frame)
    return hasher.intdigest()
