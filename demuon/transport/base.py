"""The Transport contract every peer-to-peer link implements (layer 3).

A transport moves *frames* (a list of raw buffers: one header frame plus one frame per tensor, see
``transport.wire``) from one peer to others and hands back *accepted messages*: the result of the
receiver's ``decode(sender, frames)``. It knows nothing of rounds, phases or math.

Contract shared by every implementation (``inproc``, ``zeromq``, ``faults``), held together by
``tests/unit/test_transport_conformance.py``:

- ``send(targets, frames)`` sends the *same* frames to every target (encode once, send many). An
  unknown target raises :class:`~demuon.errors.TransportError` naming it, before anything is sent.
  A target that is down or whose queue is full is not an error: the message is dropped and counted
  in the transport's ``dropped`` counter (a round never waits on a dead neighbour). Ownership of
  the frames passes to the transport: the caller must not modify them after ``send`` returns.
- Per-sender order is FIFO. The sender id handed to ``decode`` comes from the link itself (the
  routing identity), not from the message.
- ``decode`` raising :class:`~demuon.errors.WireFormatError` counts ``rejected[err.kind]`` and drops
  the message; any other exception counts ``rejected["decode_crash"]``. The receiver never dies
  because of what a peer sent.
- Accepted messages wait in a bounded queue; ``recv()`` awaits the next one. After ``close()``,
  ``recv()`` raises ``TransportError`` (also in a ``recv()`` that was already waiting).
- ``close()`` is idempotent and never hangs. Status moves NEW → RUNNING → CLOSING → CLOSED.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Generic, Protocol, TypeAlias, TypeVar

from demuon.errors import TransportError, WireFormatError

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: One frame of a message: anything exposing the buffer protocol as contiguous bytes.
Buffer: TypeAlias = bytes | bytearray | memoryview

#: ``decode(sender, frames) -> message``; raises ``WireFormatError`` on bad input.
Decode: TypeAlias = Callable[[int, list[memoryview]], T]

#: Default bound of the accepted-message queue (messages, not bytes).
DEFAULT_QUEUE_SIZE = 1000

#: ``rejected`` key for a decode function that raised something other than WireFormatError.
DECODE_CRASH = "decode_crash"
#: ``rejected`` keys of the checks made before decoding (see :class:`Inbox`).
NOT_A_NEIGHBOUR = "not_a_neighbour"
MUTED = "muted"

log = logging.getLogger(__name__)


class TransportStatus(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class Transport(Protocol[T_co]):
    """A link from one peer to its neighbours, yielding decoded messages of type ``T``."""

    @property
    def peer_id(self) -> int: ...

    @property
    def rejected(self) -> Counter[str]:
        """WireFormatError.kind (or a transport-level kind) → number of messages dropped."""
        ...

    async def start(self) -> None: ...

    async def send(self, targets: Sequence[int], frames: Sequence[Buffer]) -> None: ...

    async def recv(self) -> T_co: ...

    async def close(self) -> None: ...


class SupportsReady(Protocol):
    """Optional: wait until messages to ``targets`` can be handed to a live link (start-up)."""

    async def wait_ready(self, targets: Sequence[int], timeout_s: float) -> bool: ...


class _Closed:
    """Sentinel put in the queue on close, so waiting ``recv()`` calls wake up."""


_CLOSED = _Closed()


class RejectBudget:
    """Per-sender budget of rejected messages (sans-IO: the clock is passed in).

    A sender with ``budget`` rejected messages within ``mute_s`` seconds is *muted* for ``mute_s``:
    what it sends meanwhile is dropped before any decoding work (counted as ``muted``), so a flood
    of malformed messages costs a few microseconds each instead of a header parse. The budget
    refills when a window of ``mute_s`` passes (or the mute ends).
    """

    def __init__(self, budget: int, mute_s: float) -> None:
        if budget < 1 or not mute_s > 0:
            raise ValueError(f"reject budget needs budget >= 1 and mute_s > 0, got {budget} and {mute_s}")
        self.budget, self.mute_s = budget, mute_s
        self._spent: dict[int, tuple[float, int]] = {}  # sender → (window start, rejections in it)
        self._until: dict[int, float] = {}  # muted sender → end of its mute

    def muted(self, sender: int, now: float) -> bool:
        until = self._until.get(sender)
        if until is None:
            return False
        if now < until:
            return True
        del self._until[sender]
        return False

    def charge(self, sender: int, now: float) -> bool:
        """Count one rejected message of ``sender``; True when this one exhausts the budget (the
        sender is muted from now for ``mute_s``)."""
        start, spent = self._spent.get(sender, (now, 0))
        if now - start >= self.mute_s:
            start, spent = now, 0
        spent += 1
        if spent < self.budget:
            self._spent[sender] = (start, spent)
            return False
        self._spent.pop(sender, None)
        self._until[sender] = now + self.mute_s
        return True


class Inbox(Generic[T]):
    """The receive side shared by transports: decode-and-count, then a bounded queue.

    ``accept`` applies ``decode`` and records rejections in ``rejected`` (the transport's own
    counter). ``get`` raises ``TransportError`` once the inbox is closed.

    Optional, checked before ``decode`` (cheap): ``senders``, the peer ids that may send to us (any
    other is counted as ``not_a_neighbour``), and a :class:`RejectBudget` (a muted sender's message
    is counted as ``muted``, and each mute is logged as a warning).
    """

    def __init__(
        self,
        decode: Decode[T],
        rejected: Counter[str],
        maxsize: int = DEFAULT_QUEUE_SIZE,
        *,
        senders: Collection[int] | None = None,
        budget: RejectBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}")
        self._decode = decode
        self._rejected = rejected
        self._queue: asyncio.Queue[T | _Closed] = asyncio.Queue(maxsize)
        self._closed = False
        self._senders = None if senders is None else frozenset(senders)
        self._budget = budget
        self._clock = clock

    @property
    def closed(self) -> bool:
        return self._closed

    def reject(self, kind: str, detail: str = "") -> None:
        """Count a dropped message under ``kind``; log the first of each kind as a warning."""
        if not self._rejected[kind]:
            log.warning("dropping %s (further %r drops are logged at debug level)", detail or kind, kind)
        else:
            log.debug("dropping %s", detail or kind)
        self._rejected[kind] += 1

    def accept(self, sender: int, frames: list[memoryview]) -> tuple[bool, T | None]:
        """Decode one message; ``(False, None)`` if it was rejected (and counted)."""
        if self._senders is not None and sender not in self._senders:
            self.reject(NOT_A_NEIGHBOUR, f"a message from peer {sender}, which does not send to us")
            return False, None
        budget = self._budget
        if budget is not None and budget.muted(sender, self._clock()):
            self._rejected[MUTED] += 1
            return False, None
        try:
            return True, self._decode(sender, frames)
        except WireFormatError as err:
            self.reject(err.kind, f"a message from peer {sender}: {err}")
        except Exception as err:
            self.reject(DECODE_CRASH, f"a message from peer {sender}: {type(err).__name__}: {err}")
        if budget is not None and budget.charge(sender, self._clock()):
            log.warning(
                "peer %d sent %d rejected messages: ignoring it for %.0f s",
                sender,
                budget.budget,
                budget.mute_s,
            )
        return False, None

    def put_nowait(self, item: T) -> bool:
        """Queue without waiting; False if the queue is full or closed."""
        if self._closed or self._queue.full():
            return False
        self._queue.put_nowait(item)
        return True

    async def put(self, item: T) -> None:
        """Queue, waiting for room (back-pressure on the link); a no-op once closed."""
        if not self._closed:
            await self._queue.put(item)

    def qsize(self) -> int:
        return 0 if self._closed else self._queue.qsize()

    async def get(self) -> T:
        if self._closed:
            raise TransportError("transport is closed")
        item = await self._queue.get()
        if isinstance(item, _Closed):
            self._queue.put_nowait(item)  # wake the next waiter too
            raise TransportError("transport is closed")
        return item

    def close(self) -> None:
        """Drop what is queued and wake every waiting ``get``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_CLOSED)
