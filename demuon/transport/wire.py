"""Sans-IO wire format: one gossip message ⇄ a list of frames (layer 2; DESIGN.md §5).

Frames of one message (all multi-byte values little-endian, the byte order of every supported host)::

    frame 0   msgpack array [version, crc, body]                              (the envelope)
                version  int  PROTOCOL_VERSION
                crc      int  CRC-32C of ``body``, continued over frames 1… in order
                body     bin  msgpack map (the header):
                  sender    int          peer id
                  round     int          k ≥ 0
                  phase     str          "V" / "X" (the receiver's allowed set)
                  codec     str          codec kind ("identity" for keyframes)
                  params    map          codec settings, str → scalar (informational)
                  keyframe  bool         full replica resync (identity codec)
                  tensors   array of maps, one per tensor:
                    name     str         parameter name
                    shape    [int]       logical shape
                    dtype    str         logical dtype ("float32", …)
                    meta     map         codec scalars (k, seed, rank), str → scalar
                    buffers  [[dtype str, [int] shape, nbytes int], …]
    frames 1… raw bytes of each buffer: tensors in header order, buffers in order

The checksum is CRC-32C (the ``crc32c`` package: maintained, and hardware-accelerated with
SSE4.2 / ARMv8 CRC instructions, so checking a 1 GiB message costs well under a second); it covers
the header body too, so any corrupted byte is rejected. It guards against corruption, not against
forgery (that is CURVE's job).

``decode`` checks everything it can from the header before touching a payload byte or allocating:
sizes against limits, version, sender, round window, phase, codec, tensor names and shapes, dtypes
against allow-lists, buffer counts and sizes against the codec's ``expected_buffers`` and against
the actual frames; then the checksum (one CRC-32C pass per side); then it wraps the frames without
copying (``torch.frombuffer``) and decodes to dense CPU tensors. Identity payloads stay views of
the frame memory, which the tensors keep alive: treat them as read-only. Every failure is a
:class:`~demuon.transport.wire_errors.WireError` subclass; anything unexpected (from msgpack, torch,
a codec) is wrapped into ``BadHeader`` / ``BadPayload``, never raised as another type. msgpack only
produces plain data (no pickle, no eval, no extension types).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
import msgpack
import torch
from typing_extensions import Buffer

from demuon.errors import WireFormatError
from demuon.transport import wire_errors
from demuon.transport.codecs import Codec, Encoded, Identity, Meta, Shape
from demuon.transport.wire_errors import (
    BadHeader,
    BadPayload,
    ChecksumMismatch,
    DtypeNotAllowed,
    FrameCountMismatch,
    NonFinite,
    RoundOutOfWindow,
    ShapeMismatch,
    SizeMismatch,
    TensorSetMismatch,
    TooLarge,
    UnknownCodec,
    UnknownPhase,
    UnknownSender,
    UnsupportedVersion,
    WireError,
)

WIRE_ERRORS = wire_errors.WIRE_ERRORS  # every rejection class, for counting by kind
BadMeta = wire_errors.BadMeta  # raised by codecs; re-exported like every error class used here

PROTOCOL_VERSION = 1
MAX_ROUND = 2**63 - 1
MAX_DIMS = 32  # tensor rank limit
MAX_BUFFERS_PER_TENSOR = 4  # every codec uses at most 2
MAX_STR = 1024  # names, phases, codec kinds, dtype names
MAX_MAP = 32  # header, tensor entry, meta and params maps
MAX_ARRAY = 1 << 16  # tensors per message, dims, buffers
HEADER_KEYS = frozenset({"sender", "round", "phase", "codec", "params", "keyframe", "tensors"})
TENSOR_KEYS = frozenset({"name", "shape", "dtype", "meta", "buffers"})

LOGICAL_NAMES = ("float32", "float64", "bfloat16", "float16")  # what a tensor may be
BUFFER_NAMES = (*LOGICAL_NAMES, "int8", "uint8", "int32")  # what a payload frame may hold
LOGICAL_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in LOGICAL_NAMES}
BUFFER_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in BUFFER_NAMES}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in BUFFER_DTYPES.items()}

Frame = bytes | memoryview  # what encode returns; decode accepts any C-contiguous buffer


@dataclass(frozen=True)
class DecodeContext:
    """What a receiver accepts. ``shapes`` maps every expected tensor name to its shape (all must
    be present exactly once); ``codecs`` maps codec kind → codec (keyframes are always decoded
    with the identity codec)."""

    senders: Collection[int]
    shapes: Mapping[str, Shape]
    dtype: torch.dtype = torch.float32
    codecs: Mapping[str, Codec] = field(default_factory=lambda: {"identity": Identity()})
    phases: Collection[str] = frozenset({"V", "X"})
    min_round: int = 0
    max_round: int = MAX_ROUND
    require_finite: bool = True
    max_message_bytes: int = 1 << 30
    max_header_bytes: int = 1 << 20


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Message:
    """One accepted message; ``tensors``: dense CPU tensors in ``ctx.shapes`` order (read-only)."""

    sender: int
    round: int
    phase: str
    keyframe: bool
    codec: str
    tensors: dict[str, torch.Tensor]
    codec_params: Meta = field(default_factory=dict)
    nbytes: int = 0  # all frames, header included


@dataclass(frozen=True)
class _TensorHeader:
    name: str
    shape: Shape
    dtype: torch.dtype
    meta: Meta
    buffers: tuple[tuple[torch.dtype, Shape, int], ...]  # (dtype, shape, nbytes)


# ------------------------------------------------------------------------------------ encode


def _frame(buf: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor as a flat memoryview, without copying (the view keeps it alive)."""
    flat = buf.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def _tensor_header(name: str, enc: Encoded) -> dict[str, Any]:
    shape, dtype = enc.logical()
    if dtype not in LOGICAL_DTYPES.values():
        raise ValueError(f"{name}: logical dtype {dtype} is not sendable")
    if any(b.dtype not in DTYPE_NAMES for b in enc.buffers):
        raise ValueError(f"{name}: buffer dtypes {[b.dtype for b in enc.buffers]} not all in the allow-list")
    buffers = [[DTYPE_NAMES[b.dtype], list(b.shape), b.numel() * b.element_size()] for b in enc.buffers]
    return {
        "name": name,
        "shape": list(shape),
        "dtype": DTYPE_NAMES[dtype],
        "meta": dict(enc.meta),
        "buffers": buffers,
    }


def encode(
    *,
    sender: int,
    round: int,
    phase: str,
    codec: str,
    tensors: Mapping[str, Encoded],
    keyframe: bool = False,
    codec_params: Meta | None = None,
) -> list[Frame]:
    """Frames of one message: the envelope, then one zero-copy frame per buffer. Send the same
    list to every out-neighbour. A keyframe must use the identity codec."""
    if keyframe and codec != Identity.kind:
        raise ValueError(f"a keyframe is sent with the identity codec, not {codec!r}")
    if sys.byteorder != "little":
        raise RuntimeError("the wire format is little-endian; this host is not")
    body = {
        "sender": sender,
        "round": round,
        "phase": phase,
        "codec": codec,
        "params": dict(codec_params or {}),
        "keyframe": keyframe,
        "tensors": [_tensor_header(name, enc) for name, enc in tensors.items()],
    }
    packed = msgpack.packb(body, use_bin_type=True)
    payload = [_frame(b) for enc in tensors.values() for b in enc.buffers]
    crc = crc32c.crc32c(packed)
    for frame in payload:
        crc = crc32c.crc32c(frame, value=crc)
    envelope: bytes = msgpack.packb([PROTOCOL_VERSION, crc, packed], use_bin_type=True)
    return [envelope, *payload]


# ------------------------------------------------------------------------- header validation


def _get(obj: dict[str, Any], key: str, kind: type) -> Any:
    """``obj[key]`` if present and of exactly type ``kind`` (so bool is not an int)."""
    value = obj.get(key)
    if type(value) is not kind:
        raise BadHeader(f"field {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _shape(value: Any, what: str) -> Shape:
    ok = type(value) is list and len(value) <= MAX_DIMS
    if not ok or not all(type(s) is int and 0 <= s < 2**62 for s in value):
        raise BadHeader(f"{what} is not a list of at most {MAX_DIMS} non-negative ints: {value!r}")
    return tuple(value)


def _scalars(value: Any, what: str) -> Meta:
    ok = type(value) is dict and all(type(k) is str for k in value)
    if not ok or not all(type(v) in (int, float, str, bool) for v in value.values()):
        raise BadHeader(f"{what} is not a map of str → scalar")
    return dict(value)


def _dtype(name: Any, allowed: Mapping[str, torch.dtype], tensor: str) -> torch.dtype:
    if type(name) is not str or name not in allowed:
        raise DtypeNotAllowed(
            f"dtype {name!r} not allowed", tensor=tensor, expected=sorted(allowed), actual=name
        )
    return allowed[name]


def _buffer_spec(item: Any, tensor: str) -> tuple[torch.dtype, Shape, int]:
    if type(item) is not list or len(item) != 3 or type(item[2]) is not int:
        raise BadHeader(f"buffer entry {item!r} is not [dtype, shape, nbytes]", tensor=tensor)
    return _dtype(item[0], BUFFER_DTYPES, tensor), _shape(item[1], "buffer shape"), item[2]


def _tensor(entry: Any) -> _TensorHeader:
    if type(entry) is not dict or set(entry) != TENSOR_KEYS:
        raise BadHeader(f"tensor entry is not a map with keys {sorted(TENSOR_KEYS)}")
    name = _get(entry, "name", str)
    buffers = _get(entry, "buffers", list)
    if len(buffers) > MAX_BUFFERS_PER_TENSOR:
        raise FrameCountMismatch(f"{len(buffers)} buffers for one tensor", tensor=name, actual=len(buffers))
    return _TensorHeader(
        name=name,
        shape=_shape(entry["shape"], "shape"),
        dtype=_dtype(entry["dtype"], LOGICAL_DTYPES, name),
        meta=_scalars(entry["meta"], "meta"),
        buffers=tuple(_buffer_spec(b, name) for b in buffers),
    )


def _unpack(data: memoryview, **limits: int) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, **limits)
    except Exception as exc:
        raise BadHeader(f"not valid msgpack: {type(exc).__name__}: {exc}") from exc


def _envelope(frame0: memoryview, ctx: DecodeContext) -> tuple[int, bytes]:
    """``(crc, body)`` after the version check."""
    limit = ctx.max_header_bytes
    obj = _unpack(frame0, max_bin_len=limit, max_str_len=0, max_array_len=3, max_map_len=0)
    if type(obj) is not list or len(obj) != 3 or type(obj[0]) is not int:
        raise BadHeader("frame 0 is not [version, crc, body]")
    if obj[0] != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"version {obj[0]}", expected=PROTOCOL_VERSION, actual=obj[0])
    if type(obj[1]) is not int or type(obj[2]) is not bytes:
        raise BadHeader("frame 0 is not [version, crc:int, body:bin]")
    return obj[1], obj[2]


def _header(body: bytes) -> dict[str, Any]:
    limits = {"max_str_len": MAX_STR, "max_array_len": MAX_ARRAY, "max_map_len": MAX_MAP}
    header = _unpack(memoryview(body), max_bin_len=0, **limits)
    if type(header) is not dict or set(header) != HEADER_KEYS:
        raise BadHeader(f"header is not a map with keys {sorted(HEADER_KEYS)}")
    return header


def _check_origin(header: dict[str, Any], ctx: DecodeContext) -> tuple[int, int]:
    sender, k = _get(header, "sender", int), _get(header, "round", int)
    if sender not in ctx.senders:
        raise UnknownSender(f"sender {sender} not accepted", sender=sender, round=k)
    if not ctx.min_round <= k <= ctx.max_round:
        expected = (ctx.min_round, ctx.max_round)
        raise RoundOutOfWindow(f"round {k} outside {expected}", sender=sender, round=k, expected=expected)
    return sender, k


def _codec(header: dict[str, Any], ctx: DecodeContext) -> Codec:
    phase, name = _get(header, "phase", str), _get(header, "codec", str)
    keyframe = _get(header, "keyframe", bool)
    _scalars(header["params"], "params")
    if phase not in ctx.phases:
        raise UnknownPhase(f"phase {phase!r}", expected=sorted(ctx.phases), actual=phase)
    if keyframe and name != Identity.kind:
        raise BadHeader(f"keyframe with codec {name!r} (keyframes use identity)", actual=name)
    codec = ctx.codecs.get(name, Identity()) if keyframe else ctx.codecs.get(name)
    if codec is None:
        raise UnknownCodec(f"codec {name!r}", expected=sorted(ctx.codecs), actual=name)
    return codec


def _tensors(header: dict[str, Any], ctx: DecodeContext) -> list[_TensorHeader]:
    """The tensor entries in header (= frame) order, checked against the receiver's shapes."""
    entries = [_tensor(e) for e in _get(header, "tensors", list)]
    by_name = {t.name: t for t in entries}
    if len(by_name) != len(entries) or by_name.keys() != ctx.shapes.keys():
        names = [t.name for t in entries]
        raise TensorSetMismatch(f"tensors {names}", expected=list(ctx.shapes), actual=names)
    for t in entries:
        expected = tuple(ctx.shapes[t.name])
        if t.shape != expected:
            raise ShapeMismatch(f"{t.name} shape", tensor=t.name, expected=expected, actual=t.shape)
        if t.dtype != ctx.dtype:
            raise DtypeNotAllowed(f"{t.name} dtype", tensor=t.name, expected=ctx.dtype, actual=t.dtype)
    return entries


def _check_sizes(tensors: Sequence[_TensorHeader], codec: Codec, sizes: Sequence[int]) -> None:
    """Declared buffers == the codec's expectation == the actual frame sizes (``sizes``)."""
    declared = [spec for t in tensors for spec in t.buffers]
    if len(declared) != len(sizes):
        raise FrameCountMismatch("buffers vs frames", expected=len(declared), actual=len(sizes))
    frame_sizes = iter(sizes)
    for t in tensors:
        expected = codec.expected_buffers(t.shape, t.dtype, t.meta)
        actual = [(dt, shape) for dt, shape, _ in t.buffers]
        if actual != expected:
            raise SizeMismatch(f"{t.name} buffers", tensor=t.name, expected=expected, actual=actual)
        for dt, shape, nbytes in t.buffers:
            frame_bytes = next(frame_sizes)
            if not nbytes == math.prod(shape) * dt.itemsize == frame_bytes:
                raise SizeMismatch(
                    f"{t.name} buffer bytes", tensor=t.name, expected=nbytes, actual=frame_bytes
                )


# ------------------------------------------------------------------------------------ decode


def _views(frames: Sequence[Buffer], ctx: DecodeContext) -> list[memoryview]:
    if not isinstance(frames, Sequence) or not frames:
        raise BadHeader("expected a non-empty sequence of frames")
    most = 1 + MAX_BUFFERS_PER_TENSOR * len(ctx.shapes)
    if len(frames) > most:
        raise FrameCountMismatch(f"{len(frames)} frames", expected=most, actual=len(frames))
    try:
        views = [memoryview(f).cast("B") for f in frames]
    except (TypeError, ValueError) as exc:
        raise BadHeader(f"a frame is not a contiguous buffer: {exc}") from exc
    if views[0].nbytes > ctx.max_header_bytes:
        raise TooLarge("header", expected=ctx.max_header_bytes, actual=views[0].nbytes)
    total = sum(v.nbytes for v in views)
    if total > ctx.max_message_bytes:
        raise TooLarge("message", expected=ctx.max_message_bytes, actual=total)
    return views


def _check_crc(expected: int, body: bytes, payload: Sequence[memoryview]) -> None:
    crc = crc32c.crc32c(body)
    for view in payload:
        crc = crc32c.crc32c(view, value=crc)
    if crc != expected:
        raise ChecksumMismatch("CRC-32C", expected=expected, actual=crc)


def _wrap(view: memoryview, dtype: torch.dtype, shape: Shape) -> torch.Tensor:
    """The frame as a tensor of ``dtype``/``shape`` without copying (sizes already checked)."""
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # frames are read-only; codecs never write to their buffers
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(view, dtype=dtype).reshape(shape)


def _all_finite(t: torch.Tensor) -> bool:
    """NaN / ±inf make the sum non-finite, so a finite sum (one pass, no temporary) settles it;
    otherwise (or on overflow) min and max, which propagate NaN, must both be finite."""
    if t.numel() == 0 or math.isfinite(float(t.sum())):
        return True
    return all(math.isfinite(float(v)) for v in torch.aminmax(t.reshape(-1)))


def _decode_tensor(
    t: _TensorHeader, codec: Codec, views: Iterator[memoryview], ctx: DecodeContext
) -> torch.Tensor:
    buffers = tuple(_wrap(next(views), dt, shape) for dt, shape, _ in t.buffers)
    try:
        dense = codec.decode(Encoded(buffers, t.meta, t.shape, t.dtype), t.shape, t.dtype)
    except WireError as exc:
        exc.annotate(tensor=t.name)
        raise
    except Exception as exc:
        raise BadPayload(f"{t.name}: {type(exc).__name__}: {exc}", tensor=t.name) from exc
    if tuple(dense.shape) != t.shape or dense.dtype != t.dtype:
        raise BadPayload(f"{t.name} decoded to {dense.dtype}{tuple(dense.shape)}", tensor=t.name)
    if ctx.require_finite and not _all_finite(dense):
        raise NonFinite(f"{t.name} holds NaN or inf", tensor=t.name)
    return dense


def _decode(frames: Sequence[Buffer], ctx: DecodeContext) -> Message:
    views = _views(frames, ctx)
    crc, body = _envelope(views[0], ctx)
    header = _header(body)
    sender, k = _check_origin(header, ctx)
    try:
        codec = _codec(header, ctx)
        tensors = _tensors(header, ctx)
        _check_sizes(tensors, codec, [v.nbytes for v in views[1:]])
        _check_crc(crc, body, views[1:])
        payload = iter(views[1:])
        decoded = {t.name: _decode_tensor(t, codec, payload, ctx) for t in tensors}
        dense = {name: decoded[name] for name in ctx.shapes}
    except WireError as exc:
        exc.annotate(sender=sender, round=k)
        raise
    params = dict(header["params"])
    nbytes = sum(v.nbytes for v in views)
    return Message(sender, k, header["phase"], header["keyframe"], header["codec"], dense, params, nbytes)


def decode(frames: Sequence[Buffer], ctx: DecodeContext) -> Message:
    """Validate and decode one message. Raises only :class:`WireError` subclasses (each with a
    ``kind`` to count); never allocates beyond what ``ctx``'s limits and shapes allow."""
    try:
        return _decode(frames, ctx)
    except WireFormatError:
        raise
    except Exception as exc:  # the contract: nothing but a WireFormatError escapes
        raise BadHeader(f"unexpected {type(exc).__name__}: {exc}") from exc
