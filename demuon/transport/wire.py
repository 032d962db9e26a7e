"""Sans-IO wire format: one gossip message ⇄ a list of frames (layer 2; docs/design.md §5).

Frames of one message (all multi-byte values little-endian, the byte order of every supported host)::

    frame 0   msgpack array [version, digest, body]                           (the envelope)
                version  int  PROTOCOL_VERSION
                digest   int  XXH3-64 of ``body``, continued over frames 1… in order
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

The checksum is XXH3-64 (``xxhash``), streamed over the header body and then every payload frame,
so any corrupted byte is rejected: maintained, non-cryptographic and the fastest good hash (about
twice hardware CRC-32C, which version 1 used; version-1 messages are refused). Each side hashes
every byte once. It guards against corruption, not against forgery (that is CURVE's job).

``decode`` checks everything it can from the header before touching a payload byte or allocating:
sizes against limits, version, sender, round window, phase, codec, tensor names and shapes, dtypes
against allow-lists, buffer counts and sizes against the codec's ``expected_buffers`` and against
the actual frames; then the checksum (one XXH3 pass per side); then it wraps the frames without
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
from typing import Any, NamedTuple

import msgpack
import torch
import xxhash
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

__all__ = [  # the codec of messages and, re-exported, every kind of rejection
    "MAX_ROUND",
    "PROTOCOL_VERSION",
    "WIRE_ERRORS",
    "BadHeader",
    "BadPayload",
    "ChecksumMismatch",
    "DecodeContext",
    "DtypeNotAllowed",
    "Frame",
    "FrameCountMismatch",
    "Message",
    "NonFinite",
    "RoundOutOfWindow",
    "ShapeMismatch",
    "SizeMismatch",
    "TensorSetMismatch",
    "TooLarge",
    "UnknownCodec",
    "UnknownPhase",
    "UnknownSender",
    "UnsupportedVersion",
    "WireError",
    "decode",
    "encode",
    "peek",
]
BadMeta = wire_errors.BadMeta  # raised by codecs; re-exported like every error class used here

PROTOCOL_VERSION = 2  # 2: XXH3-64 checksum (1: CRC-32C)
MAX_ROUND = 2**63 - 1
MAX_DIMS = 32  # tensor rank limit
MAX_BUFFERS_PER_TENSOR = 4  # every codec uses at most 2
MAX_STR = 1024  # names, phases, codec kinds, dtype names
MAX_MAP = 32  # header, tensor entry, meta and params maps
MAX_ARRAY = 1 << 16  # tensors per message, dims, buffers
MAX_DIM = 2**62  # one dimension's size limit
HEADER_BASE_BYTES = 1024  # header_bound: envelope, digest, fixed keys, codec params
ENTRY_BYTES = 512  # header_bound: one tensor entry besides its name
NOTICE_BYTES = 24  # header_bound: one leave notice (a msgpack pair of two ints takes at most 19)
WIDEST_ITEMSIZE = 8  # frame_bound: float64
HEADER_KEYS = frozenset({"sender", "round", "phase", "codec", "params", "keyframe", "tensors"})
#: Optional header keys: ``leaves``, the leaves announced at run time that the sender knows of, as
#: ``[[peer, round it leaves before], ...]`` (relayed, so that peers two hops away re-weight too).
OPTIONAL_KEYS = frozenset({"leaves"})
MAX_NOTICES = MAX_DIMS  # leave notices per header (no header array is shorter than MAX_DIMS)
TENSOR_KEYS = frozenset({"name", "shape", "dtype", "meta", "buffers"})

LOGICAL_NAMES = ("float32", "float64", "bfloat16", "float16")  # what a tensor may be
BUFFER_NAMES = (*LOGICAL_NAMES, "int8", "uint8", "int32")  # what a payload frame may hold
LOGICAL_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in LOGICAL_NAMES}
BUFFER_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in BUFFER_NAMES}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in BUFFER_DTYPES.items()}
_SENDABLE = frozenset(LOGICAL_DTYPES.values())
_SCALAR_TYPES = frozenset({int, float, str, bool})
_NOT_WRITABLE = "The given buffer is not writable"  # torch.frombuffer's warning for read-only frames

Frame = bytes | memoryview  # what encode returns; decode accepts any C-contiguous buffer


@dataclass(frozen=True)
class DecodeContext:
    """What a receiver accepts. ``shapes`` maps every expected tensor name to its shape (all must
    be present exactly once); ``codecs`` maps codec kind → codec, ``phase_codecs`` the same per
    phase where phases differ (keyframes are always decoded with the identity codec)."""

    senders: Collection[int]
    shapes: Mapping[str, Shape]
    dtype: torch.dtype = torch.float32
    phase_dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)  # per-phase exceptions to dtype
    # keyframes may carry more tensors (e.g. replica sums): their shapes and dtypes (None: as others)
    keyframe_shapes: Mapping[str, Shape] | None = None
    keyframe_dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    codecs: Mapping[str, Codec] = field(default_factory=lambda: {"identity": Identity()})
    # per-phase codecs (each phase may have its own; a phase not named here accepts ``codecs``)
    phase_codecs: Mapping[str, Mapping[str, Codec]] = field(default_factory=dict)
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
    leaves: tuple[tuple[int, int], ...] = ()  # (peer, round it leaves before) the sender knows of


class _TensorHeader(NamedTuple):  # a tuple: built once per tensor per message, so cheap matters
    name: str
    shape: Shape
    dtype: torch.dtype
    meta: Meta
    buffers: tuple[tuple[torch.dtype, Shape, int], ...]  # (dtype, shape, nbytes)


# ------------------------------------------------------------------------------------ encode


def _digest(body: bytes, payload: Sequence[Buffer]) -> int:
    """XXH3-64 of the header body, continued over the payload frames in order."""
    hasher = xxhash.xxh3_64(body)
    for frame in payload:
        hasher.update(frame)
    return hasher.intdigest()


def _frame(buf: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor as a flat memoryview, without copying (the view keeps it alive)."""
    if not buf.is_cpu or buf.requires_grad or not buf.is_contiguous():  # codec buffers never are
        buf = buf.detach().to("cpu").contiguous()
    flat = buf if buf.dim() == 1 else buf.reshape(-1)
    return flat.view(torch.uint8).numpy().data


def _tensor_header(name: str, enc: Encoded) -> dict[str, Any]:
    shape, dtype = enc.logical()
    if dtype not in _SENDABLE:
        raise ValueError(f"{name}: logical dtype {dtype} is not sendable")
    if any(b.dtype not in DTYPE_NAMES for b in enc.buffers):
        raise ValueError(f"{name}: buffer dtypes {[b.dtype for b in enc.buffers]} not all in the allow-list")
    buffers = [[DTYPE_NAMES[b.dtype], list(b.shape), b.nbytes] for b in enc.buffers]
    meta = dict(enc.meta)
    return {"name": name, "shape": list(shape), "dtype": DTYPE_NAMES[dtype], "meta": meta, "buffers": buffers}


def encode(
    *,
    sender: int,
    round: int,
    phase: str,
    codec: str,
    tensors: Mapping[str, Encoded],
    keyframe: bool = False,
    codec_params: Meta | None = None,
    leaves: Sequence[tuple[int, int]] = (),
) -> list[Frame]:
    """Frames of one message: the envelope, then one zero-copy frame per buffer. Send the same
    list to every out-neighbour. A keyframe must use the identity codec. ``leaves``: leave notices
    (peer, round), at most :data:`MAX_NOTICES`; the key is left out when there are none."""
    if keyframe and codec != Identity.kind:
        raise ValueError(f"a keyframe is sent with the identity codec, not {codec!r}")
    if len(leaves) > MAX_NOTICES:
        raise ValueError(f"{len(leaves)} leave notices: at most {MAX_NOTICES} fit a header")
    if sys.byteorder != "little":
        raise RuntimeError("the wire format is little-endian; this host is not")
    entries = [_tensor_header(name, enc) for name, enc in tensors.items()]
    params = dict(codec_params or {})
    body = {"sender": sender, "round": round, "phase": phase, "codec": codec}
    body.update(params=params, keyframe=keyframe, tensors=entries)
    if leaves:
        body["leaves"] = [[int(j), int(r)] for j, r in leaves]
    packed = msgpack.packb(body, use_bin_type=True)
    payload = [_frame(b) for enc in tensors.values() for b in enc.buffers]
    envelope: bytes = msgpack.packb([PROTOCOL_VERSION, _digest(packed, payload), packed], use_bin_type=True)
    return [envelope, *payload]


# ------------------------------------------------------------------------- header validation


def _get(obj: dict[str, Any], key: str, kind: type) -> Any:
    """``obj[key]`` if present and of exactly type ``kind`` (so bool is not an int)."""
    value = obj.get(key)
    if type(value) is not kind:
        raise BadHeader(f"field {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _shape(value: Any, what: str) -> Shape:
    if type(value) is list and len(value) <= MAX_DIMS:
        for s in value:
            if type(s) is not int or not 0 <= s < MAX_DIM:
                break
        else:
            return tuple(value)
    raise BadHeader(f"{what} is not a list of at most {MAX_DIMS} non-negative ints: {value!r}")


def _scalars(value: Any, what: str) -> Meta:
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str or type(v) not in _SCALAR_TYPES:
                break
        else:
            return value  # msgpack built it for this message alone: no copy needed
    raise BadHeader(f"{what} is not a map of str → scalar")


def _dtype(name: Any, allowed: Mapping[str, torch.dtype], tensor: str) -> torch.dtype:
    dtype = allowed.get(name) if type(name) is str else None
    if dtype is None:
        raise DtypeNotAllowed(
            f"dtype {name!r} not allowed", tensor=tensor, expected=sorted(allowed), actual=name
        )
    return dtype


def _buffer_spec(item: Any, tensor: str) -> tuple[torch.dtype, Shape, int]:
    if type(item) is not list or len(item) != 3 or type(item[2]) is not int:
        raise BadHeader(f"buffer entry {item!r} is not [dtype, shape, nbytes]", tensor=tensor)
    return _dtype(item[0], BUFFER_DTYPES, tensor), _shape(item[1], "buffer shape"), item[2]


def _tensor(entry: Any) -> _TensorHeader:
    if type(entry) is not dict or entry.keys() != TENSOR_KEYS:
        raise BadHeader(f"tensor entry is not a map with keys {sorted(TENSOR_KEYS)}")
    name = _get(entry, "name", str)
    buffers = _get(entry, "buffers", list)
    if len(buffers) > MAX_BUFFERS_PER_TENSOR:
        raise FrameCountMismatch(f"{len(buffers)} buffers for one tensor", tensor=name, actual=len(buffers))
    return _TensorHeader(
        name,
        _shape(entry["shape"], "shape"),
        _dtype(entry["dtype"], LOGICAL_DTYPES, name),
        _scalars(entry["meta"], "meta"),
        tuple([_buffer_spec(b, name) for b in buffers]),
    )


def header_bound(names: Collection[str]) -> int:
    """The most bytes frame 0 of a valid message with tensors ``names`` can take: the envelope
    and fixed keys, plus per tensor its name and an entry (shape, dtype, meta, buffers) well above
    what any codec writes (about 80 bytes measured), and room for a full list of leave notices."""
    return HEADER_BASE_BYTES + NOTICE_BYTES * MAX_NOTICES + sum(len(n.encode()) + ENTRY_BYTES for n in names)


def frame_bound(shapes: Mapping[str, Shape]) -> int:
    """The largest payload frame a valid message with these tensors can hold: one dense tensor
    of the widest sendable dtype (float64), which no codec's buffers exceed."""
    return max((math.prod(shape) * WIDEST_ITEMSIZE for shape in shapes.values()), default=0)


def message_bound(shapes: Mapping[str, Shape]) -> int:
    """The most bytes (all frames) a valid message with these tensors can take: its header and,
    per tensor, twice its dense float64 size (a codec's buffers together never exceed that: top-k
    values and indices, rank-r factors with r ≤ min(m, n))."""
    dense = sum(math.prod(shape) * WIDEST_ITEMSIZE for shape in shapes.values())
    return header_bound(shapes) + 2 * dense


def _unpack(data: Buffer, **limits: int) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, **limits)
    except Exception as exc:
        raise BadHeader(f"not valid msgpack: {type(exc).__name__}: {exc}") from exc


def _envelope(frame0: memoryview, ctx: DecodeContext) -> tuple[int, bytes]:
    """``(digest, body)`` after the version check."""
    limit = ctx.max_header_bytes
    obj = _unpack(frame0, max_bin_len=limit, max_str_len=0, max_array_len=3, max_map_len=0)
    if type(obj) is not list or len(obj) != 3 or type(obj[0]) is not int:
        raise BadHeader("frame 0 is not [version, digest, body]")
    if obj[0] != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"version {obj[0]}", expected=PROTOCOL_VERSION, actual=obj[0])
    if type(obj[1]) is not int or type(obj[2]) is not bytes:
        raise BadHeader("frame 0 is not [version, digest:int, body:bin]")
    return obj[1], obj[2]


def _header(body: bytes, ctx: DecodeContext) -> dict[str, Any]:
    # no array in a header is longer than the receiver's tensor list or MAX_DIMS: msgpack refuses
    # a longer one from its length prefix, before parsing any entry of it
    longest = min(MAX_ARRAY, max(MAX_DIMS, len(ctx.shapes), len(ctx.keyframe_shapes or ())))
    header = _unpack(body, max_bin_len=0, max_str_len=MAX_STR, max_array_len=longest, max_map_len=MAX_MAP)
    if type(header) is not dict or not HEADER_KEYS <= header.keys() <= HEADER_KEYS | OPTIONAL_KEYS:
        raise BadHeader(
            f"header is not a map with keys {sorted(HEADER_KEYS)} (and maybe {sorted(OPTIONAL_KEYS)})"
        )
    return header


def _notices(value: Any) -> tuple[tuple[int, int], ...]:
    """The ``leaves`` of a header: at most MAX_NOTICES pairs of a peer id and a round."""
    if type(value) is not list or len(value) > MAX_NOTICES:
        raise BadHeader(f"leaves is not a list of at most {MAX_NOTICES} notices")
    out = []
    for item in value:
        ok = type(item) is list and len(item) == 2 and all(type(x) is int for x in item)
        if not ok or not (0 <= item[0] < 2**31 and 0 <= item[1] <= MAX_ROUND):
            raise BadHeader(f"leave notice {item!r} is not [peer, round]", actual=str(item)[:64])
        out.append((item[0], item[1]))
    return tuple(out)


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
    codecs = ctx.phase_codecs.get(phase, ctx.codecs)
    codec = codecs.get(name, Identity()) if keyframe else codecs.get(name)
    if codec is None:
        raise UnknownCodec(f"codec {name!r} in phase {phase}", expected=sorted(codecs), actual=name)
    return codec


def _tensors(header: dict[str, Any], ctx: DecodeContext) -> list[_TensorHeader]:
    """The tensor entries in header (= frame) order, checked against the receiver's shapes."""
    entries = [_tensor(e) for e in _get(header, "tensors", list)]
    keyframe = header["keyframe"] and ctx.keyframe_shapes is not None
    shapes = ctx.keyframe_shapes if keyframe and ctx.keyframe_shapes is not None else ctx.shapes
    if len(entries) != len(shapes) or {t.name for t in entries} != shapes.keys():
        names = [t.name for t in entries]
        raise TensorSetMismatch(f"tensors {names}", expected=list(shapes), actual=names)
    allowed = ctx.phase_dtypes.get(header["phase"], ctx.dtype)  # the phase was checked by _codec
    for name, shape, dtype, _, _ in entries:
        expected = tuple(shapes[name])
        if shape != expected:
            raise ShapeMismatch(f"{name} shape", tensor=name, expected=expected, actual=shape)
        want = ctx.keyframe_dtypes.get(name, allowed) if keyframe else allowed
        if dtype != want:
            raise DtypeNotAllowed(f"{name} dtype", tensor=name, expected=want, actual=dtype)
    return entries


def _check_sizes(tensors: Sequence[_TensorHeader], codec: Codec, views: Sequence[memoryview]) -> None:
    """Declared buffers == the codec's expectation == the actual sizes of frames 1… (``views``)."""
    declared = sum(len(t.buffers) for t in tensors)
    if declared != len(views) - 1:
        raise FrameCountMismatch("buffers vs frames", expected=declared, actual=len(views) - 1)
    i = 1
    for name, shape, dtype, meta, buffers in tensors:
        expected = codec.expected_buffers(shape, dtype, meta)
        actual = [(dt, sh) for dt, sh, _ in buffers]
        if actual != expected:
            raise SizeMismatch(f"{name} buffers", tensor=name, expected=expected, actual=actual)
        for dt, sh, nbytes in buffers:
            frame_bytes = views[i].nbytes
            i += 1
            if not nbytes == math.prod(sh) * dt.itemsize == frame_bytes:
                raise SizeMismatch(f"{name} buffer bytes", tensor=name, expected=nbytes, actual=frame_bytes)


# ------------------------------------------------------------------------------------ decode


def _views(frames: Sequence[Buffer], ctx: DecodeContext) -> tuple[list[memoryview], int]:
    """The frames as byte views, and their total size."""
    if not isinstance(frames, Sequence) or not frames:
        raise BadHeader("expected a non-empty sequence of frames")
    most = 1 + MAX_BUFFERS_PER_TENSOR * max(len(ctx.shapes), len(ctx.keyframe_shapes or ()))
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
    return views, total


def _wrap(view: memoryview, dtype: torch.dtype, shape: Shape) -> torch.Tensor:
    """The frame as a tensor of ``dtype``/``shape`` without copying (sizes already checked)."""
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(view, dtype=dtype)
    return flat if len(shape) == 1 else flat.reshape(shape)


def _all_finite(t: torch.Tensor) -> bool:
    """NaN / ±inf make the sum non-finite, so a finite sum (one pass, no temporary) settles it;
    otherwise (or on overflow) min and max, which propagate NaN, must both be finite."""
    if math.isfinite(float(t.sum())):  # also the empty tensor's
        return True
    return all(math.isfinite(float(v)) for v in torch.aminmax(t.reshape(-1)))


def _decode_tensor(
    t: _TensorHeader, codec: Codec, views: Iterator[memoryview], require_finite: bool
) -> torch.Tensor:
    name, shape, dtype, meta, specs = t
    buffers = tuple([_wrap(next(views), dt, sh) for dt, sh, _ in specs])
    try:
        dense = codec.decode(Encoded(buffers, meta, shape, dtype), shape, dtype)
    except WireError as exc:
        exc.annotate(tensor=name)
        raise
    except Exception as exc:
        raise BadPayload(f"{name}: {type(exc).__name__}: {exc}", tensor=name) from exc
    if dense.shape != shape or dense.dtype != dtype:
        raise BadPayload(f"{name} decoded to {dense.dtype}{tuple(dense.shape)}", tensor=name)
    if require_finite and not _all_finite(dense):
        raise NonFinite(f"{name} holds NaN or inf", tensor=name)
    return dense


def _decode(frames: Sequence[Buffer], ctx: DecodeContext) -> Message:
    views, nbytes = _views(frames, ctx)
    digest, body = _envelope(views[0], ctx)
    header = _header(body, ctx)
    sender, k = _check_origin(header, ctx)
    try:
        codec = _codec(header, ctx)
        tensors = _tensors(header, ctx)
        _check_sizes(tensors, codec, views)
        if (actual := _digest(body, views[1:])) != digest:
            raise ChecksumMismatch("XXH3-64", expected=digest, actual=actual)
        payload, finite = iter(views[1:]), ctx.require_finite
        with warnings.catch_warnings():  # once per message: frames are read-only, codecs only read
            warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
            decoded = {t.name: _decode_tensor(t, codec, payload, finite) for t in tensors}
        shapes = ctx.keyframe_shapes if header["keyframe"] and ctx.keyframe_shapes is not None else ctx.shapes
        dense = {name: decoded[name] for name in shapes}
        leaves = _notices(header["leaves"]) if "leaves" in header else ()
    except WireError as exc:
        exc.annotate(sender=sender, round=k)
        raise
    params = dict(header["params"])
    return Message(
        sender, k, header["phase"], header["keyframe"], header["codec"], dense, params, nbytes, leaves
    )


def decode(frames: Sequence[Buffer], ctx: DecodeContext) -> Message:
    """Validate and decode one message. Raises only :class:`WireError` subclasses (each with a
    ``kind`` to count); never allocates beyond what ``ctx``'s limits and shapes allow."""
    try:
        return _decode(frames, ctx)
    except WireFormatError:
        raise
    except Exception as exc:  # the contract: nothing but a WireFormatError escapes
        raise BadHeader(f"unexpected {type(exc).__name__}: {exc}") from exc


def peek(frames: Sequence[Buffer]) -> tuple[int, str]:
    """``(round, phase)`` read from frame 0 of a message this process encoded, without checking
    it (for keying deterministic fault decisions on the sending side; receivers use :func:`decode`)."""
    _, _, body = msgpack.unpackb(bytes(memoryview(frames[0]).cast("B")))
    header = msgpack.unpackb(body)
    return int(header["round"]), str(header["phase"])
