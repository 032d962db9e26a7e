"""In-process transport over asyncio queues (layer 3), with the network's semantics.

All peers of one process register with one :class:`InprocHub`. ``send`` copies every frame to
``bytes`` once (so a sender that later mutates its buffers cannot change what was sent, as if the
bytes had left over a socket) and hands the same copies to each target's receive side, where the
target's own ``decode`` runs and the result waits in the target's bounded queue.

Drops, counted in the *sender's* ``dropped``: ``"peer_down"`` (the target is known but not running:
not started yet, closed, or restarting), ``"dropped_hwm"`` (the target's queue is full). A target
the hub has never heard of raises ``TransportError``. A peer that restarts (close, then a new
transport with the same id on the same hub) is reached again as soon as it has started.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar, cast

from demuon.errors import TransportError
from demuon.transport.base import DEFAULT_QUEUE_SIZE, Buffer, Decode, Inbox, TransportStatus

T = TypeVar("T")


class InprocHub:
    """Registry of the in-process peers: peer id → the running transport with that id."""

    def __init__(self, peers: Iterable[int] = ()) -> None:
        self._known: set[int] = set(peers)  # ids a send may name (declared or ever registered)
        self._live: dict[int, InprocTransport[Any]] = {}
        self._up: dict[int, asyncio.Event] = {}

    def known(self, peer_id: int) -> bool:
        return peer_id in self._known

    def live(self, peer_id: int) -> InprocTransport[Any] | None:
        return self._live.get(peer_id)

    def _event(self, peer_id: int) -> asyncio.Event:
        return self._up.setdefault(peer_id, asyncio.Event())

    def register(self, transport: InprocTransport[Any]) -> None:
        pid = transport.peer_id
        if pid in self._live and self._live[pid] is not transport:
            raise TransportError(f"peer {pid} is already running on this hub", peer=pid)
        self._known.add(pid)
        self._live[pid] = transport
        self._event(pid).set()

    def unregister(self, transport: InprocTransport[Any]) -> None:
        pid = transport.peer_id
        if self._live.get(pid) is transport:
            del self._live[pid]
            self._event(pid).clear()

    async def wait_up(self, peer_id: int) -> None:
        await self._event(peer_id).wait()


class InprocTransport(Generic[T]):
    """One peer's link on an :class:`InprocHub`. See the module docstring for semantics."""

    def __init__(
        self, peer_id: int, hub: InprocHub, decode: Decode[T], *, queue_size: int = DEFAULT_QUEUE_SIZE
    ) -> None:
        self.peer_id = peer_id
        self.hub = hub
        self.rejected: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.status = TransportStatus.NEW
        self._inbox: Inbox[T] = Inbox(decode, self.rejected, queue_size)

    def __repr__(self) -> str:
        return f"InprocTransport(peer_id={self.peer_id}, status={self.status.name})"

    async def start(self) -> None:
        if self.status is not TransportStatus.NEW:
            raise TransportError(f"cannot start a transport that is {self.status.name}", peer=self.peer_id)
        self.hub.register(self)
        self.status = TransportStatus.RUNNING

    async def send(self, targets: Sequence[int], frames: Sequence[Buffer]) -> None:
        if self.status is not TransportStatus.RUNNING:
            raise TransportError(f"cannot send: transport is {self.status.name}", peer=self.peer_id)
        for t in targets:
            if not self.hub.known(t):
                raise TransportError(f"unknown target peer {t}", peer=t)
        copies = [memoryview(bytes(f)) for f in frames]  # one copy, shared read-only by all targets
        for t in targets:
            dest = self.hub.live(t)
            if dest is None:
                self.dropped["peer_down"] += 1
            elif not dest._deliver(self.peer_id, list(copies)):
                self.dropped["dropped_hwm"] += 1
        await asyncio.sleep(0)  # a send is a scheduling point, as on a socket

    def _deliver(self, sender: int, frames: list[memoryview]) -> bool:
        """Receive side, called by the sender. False only if the queue is full (message lost)."""
        if self.status is not TransportStatus.RUNNING:
            return True  # closing: the message is dropped on the floor, like a closed socket
        ok, msg = self._inbox.accept(sender, frames)
        if not ok:
            return True  # rejected and counted here
        return self._inbox.put_nowait(cast(T, msg))

    async def recv(self) -> T:
        return await self._inbox.get()

    def pending(self) -> int:
        """Accepted messages waiting in the queue."""
        return self._inbox.qsize()

    async def wait_ready(self, targets: Sequence[int], timeout_s: float) -> bool:
        """True once every target is registered and running; False at the deadline."""
        for t in targets:
            if not self.hub.known(t):
                raise TransportError(f"unknown target peer {t}", peer=t)
        try:
            async with asyncio.timeout(timeout_s):
                for t in targets:
                    await self.hub.wait_up(t)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self.status in (TransportStatus.CLOSING, TransportStatus.CLOSED):
            return
        self.status = TransportStatus.CLOSING
        self.hub.unregister(self)
        self._inbox.close()
        self.status = TransportStatus.CLOSED
