"""Property tests: whatever bytes arrive, ``wire.decode`` answers with a message or a WireFormatError,
never another exception, and never allocates what a forged header declares."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from demuon.errors import WireFormatError
from demuon.transport import wire
from demuon.transport.codecs import Cast, Codec, Identity, Int8, Natural, TopK
from tests.support.wire import SHAPES, context, copies, digest, encoded, frames_of, rewrite

# ---------------------------------------------------------------------------------- the fuzzing


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
VALID = copies(frames_of())
PAYLOAD_SIZES = [len(f) for f in VALID[1:]]


def rejected(frames: Any, ctx: wire.DecodeContext | None = None) -> WireFormatError:
    """The WireFormatError ``decode`` raises; any other outcome fails the test."""
    try:
        wire.decode(frames, ctx or context())
    except WireFormatError as exc:
        return exc
    raise AssertionError("a corrupted message was accepted")


def seal(header: Any) -> list[bytes]:
    """A well-formed envelope (right version and checksum) around an arbitrary header object."""
    body = msgpack.packb(header, use_bin_type=True)
    return [
        msgpack.packb([wire.PROTOCOL_VERSION, digest(body, VALID[1:]), body], use_bin_type=True),
        *VALID[1:],
    ]


@FUZZ
@given(frames=st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_are_rejected(frames: list[bytes]) -> None:
    rejected(frames)


@FUZZ
@given(obj=VALUES)
def test_random_msgpack_in_frame_zero_is_rejected(obj: Any) -> None:
    rejected([msgpack.packb(obj, use_bin_type=True), *VALID[1:]])


@FUZZ
@given(obj=VALUES)
def test_a_random_header_in_a_valid_envelope_is_rejected(obj: Any) -> None:
    rejected(seal(obj))


@FUZZ
@given(data=st.data())
def test_every_single_byte_change_to_frame_zero_is_rejected(data: st.DataObject) -> None:
    frame = bytearray(VALID[0])
    at = data.draw(st.integers(0, len(frame) - 1))
    frame[at] ^= data.draw(st.integers(1, 255))
    rejected([bytes(frame), *VALID[1:]])


@FUZZ
@given(data=st.data())
def test_a_single_byte_change_to_a_payload_frame_fails_the_checksum(data: st.DataObject) -> None:
    index = data.draw(st.sampled_from([i for i, size in enumerate(PAYLOAD_SIZES, 1) if size]))
    frame = bytearray(VALID[index])
    frame[data.draw(st.integers(0, len(frame) - 1))] ^= data.draw(st.integers(1, 255))
    frames = list(VALID)
    frames[index] = bytes(frame)
    assert isinstance(rejected(frames), wire.ChecksumMismatch)


@FUZZ
@given(data=st.data())
def test_truncated_frames_are_rejected(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(VALID) - 1))
    assume(len(VALID[index]) > 0)
    frames = list(VALID)
    frames[index] = VALID[index][: data.draw(st.integers(0, len(VALID[index]) - 1))]
    rejected(frames)


@FUZZ
@given(extra=st.lists(st.binary(max_size=64), min_size=1, max_size=4), drop=st.integers(0, 3))
def test_extra_missing_and_reordered_frames_are_rejected(extra: list[bytes], drop: int) -> None:
    assert isinstance(rejected([*VALID, *extra]), wire.FrameCountMismatch)
    assert isinstance(rejected(VALID[: len(VALID) - 1 - drop]), wire.FrameCountMismatch | wire.BadHeader)
    rejected([VALID[0], *reversed(VALID[1:])])


@FUZZ
@given(dims=st.lists(st.integers(0, 2**61), min_size=1, max_size=4), k=st.integers(31, 2**60))
def test_huge_declared_sizes_are_rejected_before_anything_is_allocated(dims: list[int], k: int) -> None:
    def logical(h: dict[str, Any]) -> None:
        h["tensors"][0]["shape"] = dims

    def buffer(h: dict[str, Any]) -> None:
        h["tensors"][0]["buffers"][0][1] = dims

    def meta(h: dict[str, Any]) -> None:
        h["tensors"][0]["meta"] = {"k": k}
        h["tensors"][0]["buffers"] = [["float32", [k], 4 * k], ["int32", [k], 4 * k]]

    assume(dims != list(SHAPES["layer.weight"]))
    assert isinstance(rejected(rewrite(VALID, logical)), wire.ShapeMismatch)
    assert isinstance(rejected(rewrite(VALID, buffer)), wire.SizeMismatch)
    assert isinstance(rejected(rewrite(VALID, meta)), wire.BadMeta)


@FUZZ
@given(size=st.integers(0, sum(len(f) for f in VALID) - 1))
def test_messages_above_the_limits_are_too_large(size: int) -> None:
    assert isinstance(rejected(VALID, context(max_message_bytes=size)), wire.TooLarge)
    if size < len(VALID[0]):
        assert isinstance(rejected(VALID, context(max_header_bytes=size)), wire.TooLarge)


NAN_CODECS: list[Codec] = [
    Identity(),
    Cast(torch.bfloat16),
    Cast(torch.float16),
    TopK(0.2),
    Natural(),
    Int8(),
    Int8(deflate=True),
]


@FUZZ
@given(
    codec=st.sampled_from(NAN_CODECS),
    name=st.sampled_from(list(SHAPES)),
    position=st.integers(0, 29),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
def test_non_finite_values_are_rejected_when_finite_values_are_required(
    codec: Codec, name: str, position: int, value: float
) -> None:
    values = {n: torch.randn(s) for n, s in SHAPES.items()}
    flat = values[name].view(-1)
    flat[position % flat.numel()] = value
    frames = frames_of(codec, tensors=encoded(codec, values))
    err = rejected(frames, context(codec))
    assert isinstance(err, wire.NonFinite) and err.tensor == name


@FUZZ
@given(name=st.text(max_size=20), version=st.integers(-(2**63), 2**64 - 1))
def test_unknown_codecs_and_versions_are_named_in_the_rejection(name: str, version: int) -> None:
    assume(name != "topk" and version != wire.PROTOCOL_VERSION)
    err = rejected(rewrite(VALID, lambda h: h.update(codec=name)))
    assert isinstance(err, wire.UnknownCodec) and err.actual == name
    _, crc, body = msgpack.unpackb(VALID[0])
    old = [msgpack.packb([version, crc, body], use_bin_type=True), *VALID[1:]]
    assert isinstance(rejected(old), wire.UnsupportedVersion)


PATHS = [
    ("sender",),
    ("round",),
    ("phase",),
    ("codec",),
    ("params",),
    ("keyframe",),
    ("tensors",),
    ("tensors", 0),
    ("tensors", 0, "name"),
    ("tensors", 0, "shape"),
    ("tensors", 0, "dtype"),
    ("tensors", 0, "meta"),
    ("tensors", 0, "buffers"),
    ("tensors", 0, "buffers", 0),
    ("tensors", 1, "buffers", 0, 2),
]


@FUZZ
@given(path=st.sampled_from(PATHS), value=VALUES)
def test_any_header_field_replaced_by_any_value_is_accepted_or_rejected_cleanly(
    path: tuple[Any, ...], value: Any
) -> None:
    def edit(h: Any) -> None:
        for key in path[:-1]:
            h = h[key]
        h[path[-1]] = value

    try:
        msg = wire.decode(rewrite(VALID, edit), context())
    except WireFormatError:
        return
    assert set(msg.tensors) == set(SHAPES)  # an edit that kept the message valid (e.g. params)


def test_the_fuzzed_message_itself_is_valid() -> None:
    msg = wire.decode(VALID, context())
    assert (msg.sender, msg.round) == (2, 7)
    with pytest.raises(WireFormatError):
        wire.decode(VALID[:1], context())
