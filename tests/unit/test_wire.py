"""The wire format, sans IO: round trips, zero-copy frames, and one test per kind of rejection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
import zmq

from demuon.errors import WireFormatError
from demuon.transport import wire
from demuon.transport.codecs import Cast, Codec, Encoded, Identity, TopK
from tests.support.wire import (
    CODECS,
    SHAPES,
    context,
    copies,
    digest,
    encoded,
    frames_of,
    rewrite,
    tensors,
)

# -------------------------------------------------------------------------------- success


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_every_codec_survives_the_wire_bit_for_bit(codec: Codec) -> None:
    encs = encoded(codec)
    frames = wire.encode(
        sender=2, round=7, phase="V", codec=codec.kind, tensors=encs, codec_params=codec.params
    )
    msg = wire.decode(copies(frames), context(codec))
    assert (msg.sender, msg.round, msg.phase, msg.keyframe, msg.codec) == (2, 7, "V", False, codec.kind)
    assert msg.codec_params == codec.params
    assert msg.nbytes == sum(len(bytes(f)) for f in frames)
    for name, enc in encs.items():  # what the sender applies to its replica, bit for bit
        assert torch.equal(msg.tensors[name], codec.decode(enc, SHAPES[name], torch.float32))


def test_payload_frames_are_the_buffers_memory_not_copies() -> None:
    encs = encoded(TopK(0.2))
    frames = wire.encode(sender=0, round=5, phase="X", codec="topk", tensors=encs)
    buffers = [b for enc in encs.values() for b in enc.buffers]
    assert len(frames) == 1 + len(buffers)
    for frame, buf in zip(frames[1:], buffers, strict=True):
        assert torch.frombuffer(frame, dtype=torch.uint8).data_ptr() == buf.data_ptr()


def test_bfloat16_buffers_travel_without_numpy_support() -> None:
    frames = frames_of(Cast(torch.bfloat16))
    assert all(isinstance(f, memoryview) for f in frames[1:])
    assert wire.decode(frames, context(Cast(torch.bfloat16))).codec == "cast"


def test_decode_accepts_bytes_bytearrays_and_memoryviews() -> None:
    frames = frames_of()
    for kind in (bytes, bytearray, memoryview):
        msg = wire.decode([kind(bytes(f)) for f in frames], context())
        assert set(msg.tensors) == set(SHAPES)


def test_tensors_come_back_in_the_receivers_order_whatever_the_senders_order() -> None:
    encs = encoded(Identity())
    backwards = dict(reversed(list(encs.items())))
    frames = wire.encode(sender=1, round=6, phase="V", codec="identity", tensors=backwards)
    msg = wire.decode(copies(frames), context(Identity()))
    assert list(msg.tensors) == list(SHAPES)
    assert all(torch.equal(msg.tensors[n], x) for n, x in tensors().items())


def test_keyframe_is_decoded_with_identity_even_where_the_receiver_runs_another_codec() -> None:
    replica = tensors()
    hand_made = {n: Encoded((x,), {}) for n, x in replica.items()}  # shape and dtype from the buffer
    frames = wire.encode(sender=3, round=9, phase="X", codec="identity", tensors=hand_made, keyframe=True)
    msg = wire.decode(copies(frames), context(TopK(0.2)))
    assert msg.keyframe and msg.codec == "identity"
    assert all(torch.equal(msg.tensors[n], x) for n, x in replica.items())


def test_keyframe_with_another_codec_is_refused_by_both_ends() -> None:
    with pytest.raises(ValueError, match="identity"):
        frames_of(keyframe=True)
    forged = rewrite(frames_of(), lambda h: h.update(keyframe=True))
    with pytest.raises(wire.BadHeader):
        wire.decode(forged, context())


def test_a_rejected_message_does_not_depend_on_finite_values_when_not_required() -> None:
    values = tensors()
    values["layer.bias"][1] = float("nan")
    frames = frames_of(Identity(), tensors=encoded(Identity(), values))
    with pytest.raises(wire.NonFinite) as info:
        wire.decode(frames, context(Identity()))
    assert info.value.tensor == "layer.bias" and (info.value.sender, info.value.round) == (2, 7)
    msg = wire.decode(frames, context(Identity(), require_finite=False))
    assert torch.isnan(msg.tensors["layer.bias"][1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_each_kind_of_non_finite_value_is_caught_and_huge_finite_values_pass(bad: float) -> None:
    values = tensors()
    values["layer.weight"][3, 2] = bad
    with pytest.raises(wire.NonFinite):
        wire.decode(frames_of(Identity(), tensors=encoded(Identity(), values)), context(Identity()))
    huge = {name: torch.full(shape, 3e38) for name, shape in SHAPES.items()}  # the sum overflows
    msg = wire.decode(frames_of(Identity(), tensors=encoded(Identity(), huge)), context(Identity()))
    assert torch.equal(msg.tensors["layer.weight"], huge["layer.weight"])


def test_identity_payloads_are_zero_copy_views_that_outlive_their_zmq_frames() -> None:
    """Decoded identity tensors view the received frame memory and keep it alive: they stay
    intact after the frames are dropped and many other messages have come and gone."""
    shapes = {"w": (256, 64)}  # 64 KiB: above pyzmq's copy threshold
    ctx = context(Identity(), shapes=shapes)
    zctx = zmq.Context()
    pull, push = zctx.socket(zmq.PULL), zctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")

        def roundtrip(value: float) -> torch.Tensor:
            enc = {"w": Identity().encode(torch.full(shapes["w"], value), seed=0)}
            push.send_multipart(
                wire.encode(sender=2, round=7, phase="V", codec="identity", tensors=enc), copy=False
            )
            parts = pull.recv_multipart(copy=False)
            tensor = wire.decode([p.buffer for p in parts], ctx).tensors["w"]
            assert tensor.data_ptr() == torch.frombuffer(parts[1].buffer, dtype=torch.uint8).data_ptr()
            return tensor

        kept = [roundtrip(float(i)) for i in range(4)]  # their frames are gone once roundtrip returns
        for i in range(200):
            roundtrip(-1.0 - i)
        for i, tensor in enumerate(kept):
            assert torch.equal(tensor, torch.full(shapes["w"], float(i)))
    finally:
        zctx.destroy(linger=0)


def test_decoded_views_of_byte_frames_outlive_the_frames() -> None:
    frames = copies(frames_of(Identity(), tensors=encoded(Identity())))
    msg = wire.decode(frames, context(Identity()))
    del frames
    for name, x in tensors().items():
        assert torch.equal(msg.tensors[name], x)


# ----------------------------------------------------------------------------- rejections


def drop_tensor(h: dict[str, Any]) -> None:
    h["tensors"].pop()


def duplicate_tensor(h: dict[str, Any]) -> None:
    h["tensors"][-1] = dict(h["tensors"][0])


def rename_tensor(h: dict[str, Any]) -> None:
    h["tensors"][0]["name"] = "other.weight"


def set_first(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda h: h["tensors"][0].__setitem__(key, value)


def set_first_buffer(index: int, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda h: h["tensors"][0]["buffers"][0].__setitem__(index, value)


HEADER_EDITS: list[tuple[str, Callable[[dict[str, Any]], None], type[WireFormatError]]] = [
    ("unknown sender", lambda h: h.update(sender=42), wire.UnknownSender),
    ("stale round", lambda h: h.update(round=4), wire.RoundOutOfWindow),
    ("round ahead", lambda h: h.update(round=10), wire.RoundOutOfWindow),
    ("unknown phase", lambda h: h.update(phase="Z"), wire.UnknownPhase),
    ("unknown codec", lambda h: h.update(codec="zstd"), wire.UnknownCodec),
    ("missing tensor", drop_tensor, wire.TensorSetMismatch),
    ("duplicated tensor", duplicate_tensor, wire.TensorSetMismatch),
    ("unknown tensor", rename_tensor, wire.TensorSetMismatch),
    ("other shape", set_first("shape", [5, 6]), wire.ShapeMismatch),
    ("huge shape", set_first("shape", [2**40]), wire.ShapeMismatch),
    ("other logical dtype", set_first("dtype", "float64"), wire.DtypeNotAllowed),
    ("unknown logical dtype", set_first("dtype", "complex64"), wire.DtypeNotAllowed),
    ("buffer dtype not allowed", set_first_buffer(0, "int64"), wire.DtypeNotAllowed),
    ("meta k beyond the tensor", set_first("meta", {"k": 31}), wire.BadMeta),
    ("meta of the wrong type", set_first("meta", {"k": "6"}), wire.BadMeta),
    ("buffer shape not the codec's", set_first_buffer(1, [7]), wire.SizeMismatch),
    ("huge buffer shape", set_first_buffer(1, [2**40]), wire.SizeMismatch),
    ("nbytes not the frame's", set_first_buffer(2, 10**12), wire.SizeMismatch),
    ("extra header key", lambda h: h.update(extra=1), wire.BadHeader),
    ("missing header key", lambda h: h.pop("phase"), wire.BadHeader),
    ("sender is a bool", lambda h: h.update(sender=True), wire.BadHeader),
    ("round is a string", lambda h: h.update(round="7"), wire.BadHeader),
    ("tensors is a map", lambda h: h.update(tensors={}), wire.BadHeader),
    ("shape holds a float", set_first("shape", [6.0, 5]), wire.BadHeader),
    ("negative dimension", set_first("shape", [-6, 5]), wire.BadHeader),
    ("meta holds a list", set_first("meta", {"k": [6]}), wire.BadHeader),
    ("buffer entry too short", set_first("buffers", [["float32", [6]]]), wire.BadHeader),
    ("too many buffers", set_first("buffers", [["uint8", [0], 0]] * 5), wire.FrameCountMismatch),
]


@pytest.mark.parametrize(("edit", "error"), [e[1:] for e in HEADER_EDITS], ids=[e[0] for e in HEADER_EDITS])
def test_each_bad_header_is_rejected_with_its_own_kind(
    edit: Callable[[dict[str, Any]], None], error: type[WireFormatError]
) -> None:
    with pytest.raises(error) as info:
        wire.decode(rewrite(frames_of(), edit), context())
    assert type(info.value) is error


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"senders": frozenset({0, 1})}, wire.UnknownSender),
        ({"min_round": 8}, wire.RoundOutOfWindow),
        ({"phases": frozenset({"V"})}, wire.UnknownPhase),
        ({"codecs": {"identity": Identity()}}, wire.UnknownCodec),
        ({"shapes": {**SHAPES, "gain": (1,)}}, wire.ShapeMismatch),
        ({"dtype": torch.bfloat16}, wire.DtypeNotAllowed),
        ({"max_message_bytes": 200}, wire.TooLarge),
        ({"max_header_bytes": 64}, wire.TooLarge),
    ],
)
def test_the_receivers_context_decides_what_is_accepted(overrides: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        wire.decode(frames_of(), context(**overrides))


def test_a_flipped_payload_byte_fails_the_checksum() -> None:
    frames = copies(frames_of())
    corrupt = bytearray(frames[1])
    corrupt[0] ^= 0x01
    with pytest.raises(wire.ChecksumMismatch):
        wire.decode([frames[0], bytes(corrupt), *frames[2:]], context())


def test_a_missing_or_extra_frame_is_a_frame_count_mismatch() -> None:
    frames = copies(frames_of())
    for wrong in (frames[:-1], [*frames, b"\x00" * 8]):
        with pytest.raises(wire.FrameCountMismatch):
            wire.decode(wrong, context())


def test_a_truncated_frame_is_a_size_mismatch() -> None:
    frames = copies(frames_of())
    with pytest.raises(wire.SizeMismatch):
        wire.decode([*frames[:-1], frames[-1][:-1]], context())


def test_a_version_1_message_is_refused() -> None:
    """Version 1 (CRC-32C checksums) is not understood any more, whatever its checksum."""
    _, _, body = msgpack.unpackb(bytes(frames_of()[0]))
    frames = copies(frames_of())
    frames[0] = msgpack.packb([1, digest(body, frames[1:]), body], use_bin_type=True)
    with pytest.raises(wire.UnsupportedVersion) as info:
        wire.decode(frames, context())
    assert (info.value.expected, info.value.actual) == (wire.PROTOCOL_VERSION, 1)


def test_a_future_version_is_unsupported() -> None:
    _, crc, body = msgpack.unpackb(bytes(frames_of()[0]))
    frames = copies(frames_of())
    frames[0] = msgpack.packb([wire.PROTOCOL_VERSION + 1, crc, body], use_bin_type=True)
    with pytest.raises(wire.UnsupportedVersion) as info:
        wire.decode(frames, context())
    assert info.value.actual == wire.PROTOCOL_VERSION + 1


NOT_AN_ENVELOPE = [msgpack.packb([wire.PROTOCOL_VERSION, 2, 3])]  # right version, wrong field types


@pytest.mark.parametrize("junk", [[], [b""], [b"\xc1"], NOT_AN_ENVELOPE, [object()], "not frames"])
def test_garbage_is_a_bad_header(junk: Any) -> None:
    with pytest.raises(wire.BadHeader):
        wire.decode(junk, context())


def test_an_index_outside_the_tensor_is_a_bad_payload() -> None:
    bad = dict(encoded(TopK(0.2)))
    values, idx = bad["layer.weight"].buffers
    bad["layer.weight"] = Encoded((values, idx + 30), {"k": idx.numel()}, (6, 5), torch.float32)
    with pytest.raises(wire.BadPayload) as info:
        wire.decode(frames_of(tensors=bad), context())
    assert info.value.tensor == "layer.weight"


def test_rejections_name_the_sender_round_tensor_and_values() -> None:
    with pytest.raises(wire.ShapeMismatch) as info:
        wire.decode(frames_of(), context(shapes={**SHAPES, "layer.bias": (4,)}))
    err = info.value
    assert (err.sender, err.round, err.tensor, err.expected, err.actual) == (2, 7, "layer.bias", (4,), (5,))
    assert err.fields["tensor"] == "layer.bias" and err.kind == "shape"


def test_every_wire_error_has_its_own_kind_and_the_common_base() -> None:
    kinds = [cls.kind for cls in wire.WIRE_ERRORS]
    assert len(set(kinds)) == len(kinds)
    assert all(issubclass(cls, WireFormatError) for cls in wire.WIRE_ERRORS)


def test_encode_refuses_buffers_the_receiver_could_not_accept() -> None:
    bad = {"gain": Encoded((torch.zeros(2, dtype=torch.int64),), {}, (), torch.float32)}
    with pytest.raises(ValueError, match="allow-list"):
        wire.encode(sender=0, round=0, phase="X", codec="identity", tensors=bad)
