"""The typed rejections of the wire format (layer 2: imports only ``demuon.errors``).

One subclass of :class:`~demuon.errors.WireFormatError` per check that can fail; ``kind`` is the
short name a receiver counts rejections by. They live in their own module because both
``transport.codecs`` (meta and payload checks) and ``transport.wire`` (everything else) raise them;
``transport.wire`` re-exports all of them and :data:`WIRE_ERRORS`.

Every error carries what is known when it is raised: ``sender`` and ``round`` (once the header has
been read that far), ``tensor`` (the tensor name), and ``expected`` / ``actual`` values.
"""

from __future__ import annotations

from typing import Any

from demuon.errors import WireFormatError


class WireError(WireFormatError):
    """Common base: stores the standard fields as attributes and in ``fields``."""

    def __init__(
        self,
        message: str,
        *,
        sender: int | None = None,
        round: int | None = None,
        tensor: str | None = None,
        expected: Any = None,
        actual: Any = None,
    ) -> None:
        self.sender = sender
        self.round = round
        self.tensor = tensor
        self.expected = expected
        self.actual = actual
        self.message = message
        super().__init__(message, sender=sender, round=round, tensor=tensor, expected=expected, actual=actual)

    def annotate(
        self, *, sender: int | None = None, round: int | None = None, tensor: str | None = None
    ) -> None:
        """Fill in the sender, round and tensor where they were not known when the error was raised."""
        if self.sender is None:
            self.sender = self.fields["sender"] = sender
        if self.round is None:
            self.round = self.fields["round"] = round
        if self.tensor is None:
            self.tensor = self.fields["tensor"] = tensor


class BadHeader(WireError):
    """Frame 0 is not valid msgpack of the expected structure, or a field has the wrong type
    (also: anything unexpected raised while decoding, wrapped)."""

    kind = "bad_header"


class UnsupportedVersion(WireError):
    kind = "version"


class UnknownSender(WireError):
    kind = "sender"


class RoundOutOfWindow(WireError):
    kind = "round"


class UnknownPhase(WireError):
    kind = "phase"


class UnknownCodec(WireError):
    kind = "codec"


class TensorSetMismatch(WireError):
    """The tensor names are not exactly the receiver's (missing, extra or duplicated)."""

    kind = "tensor_set"


class ShapeMismatch(WireError):
    """A tensor's logical shape differs from the receiver's parameter shape."""

    kind = "shape"


class DtypeNotAllowed(WireError):
    """A logical or buffer dtype is unknown, not in the allow-list, or not the expected one."""

    kind = "dtype"


class FrameCountMismatch(WireError):
    """The header declares a different number of buffers than there are payload frames."""

    kind = "frame_count"


class SizeMismatch(WireError):
    """A buffer's declared shape or byte count disagrees with the codec or with the frame."""

    kind = "size"


class TooLarge(WireError):
    """The header or the whole message exceeds the receiver's limits."""

    kind = "too_large"


class ChecksumMismatch(WireError):
    kind = "checksum"


class BadMeta(WireError):
    """A codec's per-tensor meta values are missing, of the wrong type, or out of range."""

    kind = "meta"


class BadPayload(WireError):
    """The payload bytes are inconsistent (e.g. a top-k index outside the tensor)."""

    kind = "payload"


class NonFinite(WireError):
    """A decoded tensor holds NaN or ±inf and the receiver requires finite values."""

    kind = "non_finite"


WIRE_ERRORS: tuple[type[WireError], ...] = (
    BadHeader,
    UnsupportedVersion,
    UnknownSender,
    RoundOutOfWindow,
    UnknownPhase,
    UnknownCodec,
    TensorSetMismatch,
    ShapeMismatch,
    DtypeNotAllowed,
    FrameCountMismatch,
    SizeMismatch,
    TooLarge,
    ChecksumMismatch,
    BadMeta,
    BadPayload,
    NonFinite,
)
"""Every rejection class, for counting by ``kind`` (each ``kind`` is unique)."""
