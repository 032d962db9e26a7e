"""ZeroMQ transport: one ROUTER bound per peer, one DEALER per out-neighbour (layer 3).

Peer ``i`` binds a ROUTER at ``bind_endpoint`` and connects one DEALER (ZMQ IDENTITY ``b"%d" % i``)
to each out-neighbour's endpoint. A message is a multipart send of the caller's frames with
``copy=False`` (large frames go out zero-copy; the caller must not modify them afterwards). On
receive, frame 0 is the DEALER's identity, parsed as the sender id (anything but a decimal integer
is counted as ``rejected["unknown_identity"]``); the other frames reach ``decode`` as memoryviews
of the received ZeroMQ frames, without a copy.

Sockets (options set explicitly): LINGER ``linger_ms`` (0: close never waits), SNDHWM/RCVHWM
``hwm`` messages, RECONNECT_IVL/_MAX, IMMEDIATE on DEALERs (queue only to live connections),
ROUTER_HANDOVER on the ROUTER (a restarted neighbour with the same identity takes over), and
MAXMSGSIZE ``max_frame_bytes`` (plus CURVE's envelope) on the ROUTER (libzmq checks each frame's
declared size before buffering it: a larger frame drops the connection, nothing is allocated).

ZMTP heartbeats (IVL ``heartbeat_ms``, TIMEOUT and TTL three intervals; 0 disables) run on the
DEALERs only, never on the ROUTER. libzmq 4.3.x aborts the process (``Assertion failed:
!_io_error (src/stream_engine_base.cpp:310)``) when a listener's heartbeat times out a connection
whose input is stopped by a full receive pipe and a new connection with the same routing identity
takes the pipe over (ROUTER_HANDOVER): any client that can reach the port could trigger it by
flooding from three connections with one identity (docs/design.md §8). With no heartbeat on
the listener, the same flood is harmless (``tests/integration/test_hostile_traffic.py``); the
DEALERs still detect a dead neighbour by its missing PONGs.

Before any decoding work, the receive side drops (and counts) a message from a peer id outside
``senders`` (``not_a_neighbour``) and from a sender over its ``budget`` of rejected messages
(``muted``; :class:`~demuon.transport.base.RejectBudget`).

``send`` never blocks on a dead or slow neighbour: it uses NOBLOCK and counts a message that finds
no live connection or a full queue as ``dropped["dropped_hwm"]``.

Lifecycle: ``start()`` binds, connects and starts the receive-loop task, which the transport owns;
``close()`` cancels and awaits that task (and the ZAP task), closes every socket and terminates the
ZeroMQ context if the transport created it. ``close()`` is idempotent and, with ``linger_ms=0``,
immediate. If the receive loop fails on a ZeroMQ error, it logs it and closes the queue, so
``recv()`` raises ``TransportError`` instead of waiting forever.

CURVE (``curve`` = this peer's keypair, ``public_keys`` = peer id → Z85 public key of every peer
that may connect to us *and* of every out-neighbour): the ROUTER is a CURVE server, each DEALER a
CURVE client with its neighbour's public key as server key, and a :class:`ZapAllowList` admits
only clients whose key is in ``public_keys``; a message whose routing identity differs from the
peer id its key belongs to is counted as ``rejected["identity_mismatch"]``. The ZAP handler is
per context: with CURVE, each transport needs its own context (the default).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

import zmq
import zmq.asyncio

from demuon.errors import TransportError
from demuon.transport.base import DEFAULT_QUEUE_SIZE, Buffer, Decode, Inbox, RejectBudget, TransportStatus
from demuon.transport.security import ZAP_DOMAIN, CurveKeys, ZapAllowList, as_key

T = TypeVar("T")

#: What ZMQ_MAXMSGSIZE allows above ``max_frame_bytes`` under CURVE: libzmq counts a frame as it
#: travels, and CURVE wraps each one in a MESSAGE command (name, nonce, MAC: about 34 bytes).
CURVE_MARGIN_BYTES = 1024
#: Longest decimal peer id accepted as a routing identity.
MAX_IDENTITY_DIGITS = 10
#: Reconnect back-off of the DEALERs (first try, ceiling), in ms.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
#: :meth:`ZmqTransport.wait_ready` names the endpoints it still waits for after this many seconds,
#: and polls in slices of at most READY_POLL_S.
READY_NOTICE_S = 1.0
READY_POLL_S = 0.25
#: The receive loop yields to the event loop after this many messages in a row: a ready socket
#: makes ``await recv_multipart`` return without suspending, so a flood would starve other tasks.
YIELD_EVERY = 32

log = logging.getLogger(__name__)


def parse_identity(identity: bytes) -> int | None:
    """Peer id from a routing identity (``b"12"``), or None if it is not a plain decimal."""
    if 0 < len(identity) <= MAX_IDENTITY_DIGITS and identity.isdigit():
        return int(identity)
    return None


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end (without swallowing our own cancellation)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


class ZmqTransport(Generic[T]):
    """Peer ``peer_id``'s ZeroMQ link. See the module docstring for the contract."""

    def __init__(
        self,
        peer_id: int,
        bind_endpoint: str,
        neighbours: Mapping[int, str],
        decode: Decode[T],
        *,
        hwm: int = 1000,
        heartbeat_ms: int = 1000,
        linger_ms: int = 0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_frame_bytes: int | None = None,
        senders: Collection[int] | None = None,
        budget: RejectBudget | None = None,
        curve: CurveKeys | None = None,
        public_keys: Mapping[int, bytes | str] | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if peer_id < 0:
            raise TransportError(f"peer id must be >= 0, got {peer_id}", peer=peer_id)
        if hwm < 1 or heartbeat_ms < 0 or linger_ms < 0:
            raise TransportError(
                f"bad socket options: hwm={hwm} heartbeat_ms={heartbeat_ms} linger_ms={linger_ms}"
            )
        self.peer_id = peer_id
        self.bind_endpoint = bind_endpoint
        self.endpoint = bind_endpoint  # the resolved endpoint (port chosen) once started
        self.rejected: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.status = TransportStatus.NEW
        self.hwm, self.heartbeat_ms, self.linger_ms = hwm, heartbeat_ms, linger_ms
        self.max_frame_bytes = max_frame_bytes
        self.curve = curve
        self._public_keys: dict[int, bytes] = {}
        if curve is not None:
            if public_keys is None:
                raise TransportError("CURVE needs public_keys (peer id → public key)", peer=peer_id)
            self._public_keys = {p: as_key(k, f"public key of peer {p}") for p, k in public_keys.items()}
        self._endpoints: dict[int, str] = dict(neighbours)
        for n in self._endpoints:
            self._server_key(n)  # fail early on a neighbour without a key
        self._inbox: Inbox[T] = Inbox(decode, self.rejected, queue_size, senders=senders, budget=budget)
        self._own_context = context is None
        self._ctx = context
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: dict[int, zmq.asyncio.Socket] = {}
        self._zap: ZapAllowList | None = None
        self._zap_task: asyncio.Task[None] | None = None
        self._recv_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"ZmqTransport(peer_id={self.peer_id}, endpoint={self.endpoint!r}, status={self.status.name})"

    @property
    def neighbours(self) -> dict[int, str]:
        return dict(self._endpoints)

    # ------------------------------------------------------------------------------ set-up

    def _server_key(self, peer: int) -> bytes | None:
        if self.curve is None:
            return None
        key = self._public_keys.get(peer)
        if key is None:
            raise TransportError(f"no CURVE public key for neighbour {peer}", peer=peer)
        return key

    def _common_options(self, sock: zmq.asyncio.Socket, *, heartbeat_ms: int) -> None:
        sock.setsockopt(zmq.LINGER, self.linger_ms)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        if heartbeat_ms:
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, min(max(3 * heartbeat_ms, 100), 6_553_500))

    def _make_dealer(self, peer: int, endpoint: str) -> zmq.asyncio.Socket:
        assert self._ctx is not None
        server_key = self._server_key(peer)
        sock = self._ctx.socket(zmq.DEALER)
        try:
            self._common_options(sock, heartbeat_ms=self.heartbeat_ms)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.IDENTITY, b"%d" % self.peer_id)
            if self.curve is not None and server_key is not None:
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            msg = f"cannot connect to peer {peer}: {exc}"
            raise TransportError(msg, peer=peer, endpoint=endpoint) from exc
        return sock

    def _make_router(self) -> zmq.asyncio.Socket:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.ROUTER)
        try:
            self._common_options(sock, heartbeat_ms=0)  # never on the listener: see the module docstring
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            margin = CURVE_MARGIN_BYTES if self.curve is not None else 0  # libzmq counts the wrapped frame
            limit = -1 if self.max_frame_bytes is None else self.max_frame_bytes + margin
            sock.setsockopt(zmq.MAXMSGSIZE, limit)
            if self.curve is not None:
                sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
            sock.bind(self.bind_endpoint)
            self.endpoint = cast(bytes, sock.getsockopt(zmq.LAST_ENDPOINT)).decode()
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(
                f"cannot bind {self.bind_endpoint}: {exc}", peer=self.peer_id, endpoint=self.bind_endpoint
            ) from exc
        return sock

    async def start(self) -> None:
        """Bind, connect to the neighbours, start the receive loop (on the running event loop)."""
        if self.status is not TransportStatus.NEW:
            raise TransportError(f"cannot start a transport that is {self.status.name}", peer=self.peer_id)
        self.status = TransportStatus.RUNNING
        try:
            if self._ctx is None:
                self._ctx = zmq.asyncio.Context()
            if self.curve is not None:  # the ZAP handler must be up before the server binds
                self._zap = ZapAllowList(self._ctx, self._public_keys)
                self._zap.start()
                self._zap_task = asyncio.create_task(self._zap.serve(), name=f"zap-{self.peer_id}")
            self._router = self._make_router()
            for peer, endpoint in self._endpoints.items():
                self._dealers[peer] = self._make_dealer(peer, endpoint)
        except BaseException:
            await self.close()
            raise
        self._recv_task = asyncio.create_task(self._receive_loop(), name=f"recv-{self.peer_id}")

    def add_neighbour(self, peer: int, endpoint: str, public_key: bytes | str | None = None) -> None:
        """Connect to a new out-neighbour (or reconnect one whose endpoint changed)."""
        if public_key is not None:
            self._public_keys[peer] = as_key(public_key, f"public key of peer {peer}")
        self.remove_neighbour(peer)
        self._endpoints[peer] = endpoint
        if self.status is TransportStatus.RUNNING:
            self._dealers[peer] = self._make_dealer(peer, endpoint)

    def remove_neighbour(self, peer: int) -> None:
        """Stop sending to ``peer``; messages still queued to it are dropped (LINGER)."""
        self._endpoints.pop(peer, None)
        sock = self._dealers.pop(peer, None)
        if sock is not None:
            sock.close(linger=self.linger_ms)

    # --------------------------------------------------------------------------- data path

    async def send(self, targets: Sequence[int], frames: Sequence[Buffer]) -> None:
        if self.status is not TransportStatus.RUNNING:
            raise TransportError(f"cannot send: transport is {self.status.name}", peer=self.peer_id)
        socks = []
        for t in targets:
            sock = self._dealers.get(t)
            if sock is None:
                msg = f"unknown target peer {t} (not an out-neighbour of {self.peer_id})"
                raise TransportError(msg, peer=t)
            socks.append(sock)
        parts = list(frames)
        for sock in socks:
            try:
                await sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.dropped["dropped_hwm"] += 1

    def _unpack(self, parts: list[zmq.Frame]) -> tuple[int, list[memoryview]] | None:
        """Sender id and payload frames of one received message, or None (counted)."""
        sender = parse_identity(parts[0].bytes)
        if sender is None:
            self._inbox.reject("unknown_identity", f"a message from identity {parts[0].bytes[:16]!r}")
            return None
        if self.curve is not None and parts[0].get("User-Id") != str(sender):
            key_of = parts[0].get("User-Id")
            self._inbox.reject("identity_mismatch", f"a message claiming peer {sender}, key of {key_of}")
            return None
        return sender, [p.buffer for p in parts[1:]]

    async def _receive_loop(self) -> None:
        assert self._router is not None
        router = self._router
        count = 0
        try:
            while True:
                count += 1
                if count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                parts = await router.recv_multipart(copy=False)
                unpacked = self._unpack(parts)
                if unpacked is None:
                    continue
                ok, msg = self._inbox.accept(*unpacked)
                if ok:
                    await self._inbox.put(cast(T, msg))  # back-pressure: stop reading when full
        except zmq.ZMQError as exc:
            if self.status is TransportStatus.RUNNING:
                log.error("receive loop of peer %d stopped: %s", self.peer_id, exc)
                self._inbox.close()

    async def recv(self) -> T:
        """The next accepted message; raises ``TransportError`` once closed."""
        return await self._inbox.get()

    def pending(self) -> int:
        """Accepted messages waiting in the queue."""
        return self._inbox.qsize()

    async def wait_ready(self, targets: Sequence[int], timeout_s: float) -> bool:
        """True once every target's DEALER has a live connection (handshake done), else False
        at the deadline. A connection that died but is not yet detected still counts as live.

        After :data:`READY_NOTICE_S` without every link, logs once which endpoints it still waits
        for. It polls in slices of at most :data:`READY_POLL_S`, so a cancelled wait (a stop
        during start-up) ends at once."""
        socks: dict[int, Any] = {}
        for t in targets:
            sock = self._dealers.get(t)
            if sock is None:
                raise TransportError(f"unknown target peer {t}", peer=t)
            socks[t] = sock  # pyzmq's stub lacks poll's flags
        loop = asyncio.get_running_loop()
        begin = loop.time()
        deadline = begin + timeout_s
        notice: float | None = begin + READY_NOTICE_S
        pending = list(socks)
        while True:
            pending = [t for t in pending if not await socks[t].poll(0, zmq.POLLOUT)]
            now = loop.time()
            if not pending:
                return True
            if now >= deadline:
                return False
            if notice is not None and now >= notice:
                notice = None
                waiting = ", ".join(f"peer {t} at {self._endpoints[t]}" for t in pending)
                log.warning(
                    "peer %d: waiting up to %.0f s more for links to %s",
                    self.peer_id,
                    deadline - now,
                    waiting,
                )
            wake = deadline if notice is None else min(deadline, notice)
            await socks[pending[0]].poll(max(1, int(min(wake - now, READY_POLL_S) * 1000)), zmq.POLLOUT)

    # ---------------------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Stop receiving, close the sockets and (if ours) the context. Idempotent; the sockets
        are closed even if the caller is cancelled while the tasks wind down."""
        if self.status in (TransportStatus.CLOSING, TransportStatus.CLOSED):
            return
        self.status = TransportStatus.CLOSING
        self._inbox.close()
        try:
            for task in (self._recv_task, self._zap_task):
                if task is not None:
                    await _cancel_and_wait(task)
        finally:
            self._close_sockets()
        if self._own_context and self._ctx is not None:
            ctx: Any = self._ctx
            if self.linger_ms:
                await asyncio.to_thread(ctx.term)  # waits up to linger_ms for queued messages
            else:
                ctx.term()  # immediate: every socket is closed with LINGER 0
        self.status = TransportStatus.CLOSED

    def _close_sockets(self) -> None:
        if self._zap is not None:
            self._zap.stop()
        for sock in [*self._dealers.values(), self._router]:
            if sock is not None:
                sock.close(linger=self.linger_ms)
        self._dealers.clear()
        self._router = None
