"""MQTT telemetry and remote control for one peer (layer 5): it watches and steers, never trains.

Topics (``prefix`` is ``telemetry.topic_prefix``; README, "Telemetry (MQTT)", has the schemas):

* ``{prefix}/peer/{id}/metrics`` — one JSON row per round (QoS ``telemetry.qos``): the envelope
  ``schema`` (:data:`SCHEMA`), ``run``, ``peer``, ``time`` (Unix seconds), then the
  ``metrics.jsonl`` row. ``publish(row)`` queues it and returns at once; a full queue loses its
  oldest row (``dropped``).
* ``{prefix}/peer/{id}/status`` — retained, QoS 1: the envelope plus ``status`` (one of
  :data:`STATUSES`) and ``round`` (the last completed round, or null). Sent on every change, and
  at most every ``status_every_s`` with a newer round; on (re)connect the current one is sent
  first. The connection's Last Will (retained, QoS 1) is the same with ``status = "offline"``:
  the broker publishes it when the peer vanishes without saying goodbye (SIGKILL, a lost link).
* ``{prefix}/control`` (every peer) and ``{prefix}/peer/{id}/control`` (this peer) — commands
  ``pause``, ``resume`` and ``stop``, as plain text or JSON ``{"command": "pause"}``. They set the
  :class:`asyncio.Event` s ``paused`` and ``stop``; the daemon reads them between rounds. Each
  command gets an answer on ``{prefix}/peer/{id}/reply`` (QoS 1): the envelope plus ``command``
  (null if none was understood), ``accepted``, ``why`` and ``payload`` (what arrived, cut to
  :data:`PREVIEW_CHARS`). A retained control message is refused, so a stale ``stop`` left on the
  broker never stops a later run.

Training never depends on the broker: if it is unreachable, ``run()`` logs once per outage and
retries with exponential backoff while ``publish`` keeps dropping the oldest rows.

Wiring (the daemon's TaskGroup owns the task; see ``demuon.app.run.run_peer``)::

    telemetry = Telemetry(config.telemetry, peer_id, run="r1")
    async with asyncio.TaskGroup() as tg:
        tg.create_task(telemetry.run())       # returns at once when telemetry.mqtt_host is unset
        telemetry.set_status("training")      # the daemon's status changes, mapped to STATUSES
        for k in rounds:
            await telemetry.wait_while_paused()   # immediate unless paused; "stop" releases it too
            if telemetry.stop.is_set():
                break
            ...
            telemetry.publish(row)
        telemetry.close()                     # "stopped" (unless "failed"), a bounded flush, return
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

import aiomqtt

from demuon.config import TelemetryConfig
from demuon.errors import ConfigError, DemuonError

log = logging.getLogger("demuon.telemetry")

SCHEMA = "demuon.mqtt/1"  # the payload schema; a change of meaning bumps the number
STATUSES = (
    "starting",
    "waiting-for-links",
    "training",
    "paused",
    "stopping",
    "stopped",
    "failed",
    "lonely",  # the run ended without ever hearing from a neighbour (exit 3)
    "offline",  # only ever sent by the broker: the Last Will
)
FINAL = ("stopped", "failed")
ENVELOPE = ("schema", "run", "peer", "time")
DEFAULT_RUN = "default"  # when neither telemetry.run_id nor the caller names the run
COMMANDS = ("pause", "resume", "stop")
PREVIEW_CHARS = 200  # a control payload is quoted up to this many characters (log and reply)
QUEUE_SIZE = 256  # rows held while the broker is slow or away (about 4 minutes at 1 round/s)
OUTBOX_SIZE = 64  # statuses and replies held the same way
BACKOFF_MIN_S = 0.5  # first retry delay after a failed connection
BACKOFF_MAX_S = 30.0  # retry delay cap
FLUSH_TIMEOUT_S = 1.0  # how long close() lets queued messages drain to a connected broker
KEEPALIVE_S = 15


class Control(Protocol):
    """What the daemon reads from any remote-control source."""

    paused: asyncio.Event
    stop: asyncio.Event

    async def wait_while_paused(self) -> None: ...


class CommandRejected(DemuonError):
    """A control message that is not a command: ``why`` says what is wrong, ``payload`` quotes it."""

    def __init__(self, why: str, payload: str) -> None:
        self.why = why
        self.payload = payload
        super().__init__(f"{why}: {payload!r}")


@dataclass(frozen=True)
class Reply:
    """The answer to one control message (``why``: a short note, or the reason for a refusal)."""

    command: str | None
    accepted: bool
    why: str | None
    payload: str


class Topics(NamedTuple):
    metrics: str
    status: str
    reply: str
    control: tuple[str, str]  # every peer's, this peer's


def topics(prefix: str, peer: int) -> Topics:
    base = f"{prefix.rstrip('/')}/peer/{peer}"
    return Topics(
        f"{base}/metrics",
        f"{base}/status",
        f"{base}/reply",
        (f"{prefix.rstrip('/')}/control", f"{base}/control"),
    )


# ---------------------------------------------------------------------------------- payloads
def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: send them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(_finite(payload), allow_nan=False).encode()


def envelope(run: str, peer: int, now: float) -> dict[str, Any]:
    return {"schema": SCHEMA, "run": run, "peer": peer, "time": round(now, 3)}


def metrics_payload(row: Mapping[str, Any], *, run: str, peer: int, now: float) -> dict[str, Any]:
    """The envelope, then the row's own keys (an envelope key in the row is overridden)."""
    return {**envelope(run, peer, now), **{k: v for k, v in row.items() if k not in ENVELOPE}}


def status_payload(status: str, *, run: str, peer: int, round: int | None, now: float) -> dict[str, Any]:
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r} (expected one of {', '.join(STATUSES)})")
    return {**envelope(run, peer, now), "status": status, "round": round}


def reply_payload(reply: Reply, *, run: str, peer: int, now: float) -> dict[str, Any]:
    return {
        **envelope(run, peer, now),
        "command": reply.command,
        "accepted": reply.accepted,
        "why": reply.why,
        "payload": reply.payload,
    }


def preview(payload: bytes | bytearray | str) -> str:
    """The payload as text (bad UTF-8 replaced), cut to :data:`PREVIEW_CHARS` with a ``…``."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes | bytearray) else payload
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def read_command(payload: bytes | bytearray | str) -> str:
    """``b"pause"`` or ``b'{"command": "pause"}'`` → ``"pause"``; anything else raises
    :class:`CommandRejected` saying why."""
    quoted = preview(payload)
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes | bytearray) else payload
    except UnicodeDecodeError as exc:
        raise CommandRejected("not UTF-8 text", quoted) from exc
    text = text.strip()
    if not text:
        raise CommandRejected("empty message", quoted)
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandRejected(f"not valid JSON ({exc.msg})", quoted) from exc
        if not isinstance(data, dict) or not isinstance(data.get("command"), str):
            raise CommandRejected('JSON without a "command" string', quoted)
        text = data["command"]
    command = text.strip().lower()
    if command not in COMMANDS:
        raise CommandRejected(f"unknown command (expected {', '.join(COMMANDS)})", quoted)
    return command


def parse_command(payload: bytes | bytearray | str) -> str | None:
    """:func:`read_command`, with None for anything that is not a command."""
    try:
        return read_command(payload)
    except CommandRejected:
        return None


def tls_context(config: TelemetryConfig) -> ssl.SSLContext | None:
    """The client's TLS context (system CAs, or ``tls_ca``); a CA file that cannot be read is a
    ConfigError now rather than an endless retry later."""
    if not config.tls:
        return None
    try:
        return ssl.create_default_context(cafile=None if config.tls_ca is None else str(config.tls_ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("telemetry.tls_ca", str(config.tls_ca), f"cannot load: {exc}") from exc


class _Outgoing(NamedTuple):
    topic: str
    payload: bytes
    status: bool  # a status (retained; superseded by a newer one), else a reply


class Telemetry:
    """Publishes rows and statuses and receives pause/resume/stop for peer ``peer_id`` of run ``run``."""

    def __init__(
        self,
        config: TelemetryConfig,
        peer_id: int,
        *,
        run: str | None = None,
        queue_size: int = QUEUE_SIZE,
        backoff: tuple[float, float] = (BACKOFF_MIN_S, BACKOFF_MAX_S),
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.run_id = run if run is not None else (config.run_id or DEFAULT_RUN)
        self.enabled = config.mqtt_host is not None
        self.topics = topics(config.topic_prefix, peer_id)
        self.metrics_topic = self.topics.metrics
        self.control_topics = self.topics.control
        self.backoff = backoff
        self.tls = tls_context(config) if self.enabled else None
        self.paused = asyncio.Event()  # set while a "pause" is in force
        self.stop = asyncio.Event()  # set once "stop" arrived
        self.connected = asyncio.Event()  # set while subscribed to the control topics
        self.unreachable = asyncio.Event()  # set after a failed attempt, cleared on connect
        self.status = "starting"  # as reported: the daemon's, "paused" while a pause holds "training"
        self._told = "starting"  # the last status set_status was given
        self.round: int | None = None  # the last round published
        self.published = 0
        self.connections = 0
        self.dropped = 0
        self.commands: list[str] = []
        self.replies: deque[Reply] = deque(maxlen=OUTBOX_SIZE)  # the latest answers
        self._status_sent_at = -math.inf  # monotonic time of the last status queued
        self._running = asyncio.Event()  # the inverse of paused (or stop): what rounds wait on
        self._running.set()
        self._closing = asyncio.Event()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_size)
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue(maxsize=OUTBOX_SIZE)

    # ------------------------------------------------------------------ the daemon's side
    def publish(self, row: Mapping[str, Any]) -> None:
        """Queue one metrics row; never blocks. A full queue loses its oldest row."""
        value = row.get("round")
        if isinstance(value, int):
            self.round = value
        if not self.enabled:
            return
        payload = encode(metrics_payload(row, run=self.run_id, peer=self.peer_id, now=time.time()))
        if self._queue.full():
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
        self._queue.put_nowait(payload)
        if time.monotonic() - self._status_sent_at >= self.config.status_every_s:
            self._queue_status()  # the same status, a newer round

    def set_status(self, status: str) -> None:
        """The peer's status changed (one of :data:`STATUSES` but ``offline``). It is reported as
        ``paused`` while a pause holds a ``training`` peer (the round under way finishes first);
        a final status (``stopped``, ``failed``) sticks."""
        if status not in STATUSES or status == "offline":
            raise ValueError(f"not a status a peer reports: {status!r}")
        self._told = status
        self._report()

    def _report(self) -> None:
        status = "paused" if self._told == "training" and self.paused.is_set() else self._told
        if status == self.status or self.status in FINAL:
            return
        self.status = status
        log.info("telemetry: status %s (peer %d)", status, self.peer_id)
        self._queue_status()

    def status_message(self, status: str | None = None) -> bytes:
        now = time.time()
        payload = status_payload(
            status or self.status, run=self.run_id, peer=self.peer_id, round=self.round, now=now
        )
        return encode(payload)

    async def wait_while_paused(self) -> None:
        """Return at once unless paused; when paused, wait for "resume" or "stop"."""
        await self._running.wait()

    def close(self) -> None:
        """Report ``stopped`` (unless ``failed`` was) and ask ``run()`` to flush what it can
        (bounded) and return. Idempotent."""
        self.set_status("stopped")
        self._closing.set()

    def apply(self, command: str) -> None:
        """Act on one command (also usable locally, e.g. from a signal handler)."""
        self.steer(command)

    def steer(self, command: str) -> Reply:
        """:meth:`apply`, saying what it did."""
        self.commands.append(command)
        why: str | None = None
        accepted = True
        if command == "pause" and self.stop.is_set():
            accepted, why = False, "already stopping"
        elif command == "pause":
            why = "rounds wait from the next round boundary"
            self.paused.set()
            self._running.clear()
        elif command == "resume":
            why = None if self.paused.is_set() else "was not paused"
            self.paused.clear()
            self._running.set()
        elif command == "stop":
            why = "stops after the current round"
            self.stop.set()
            self.paused.clear()
            self._running.set()
        else:
            accepted, why = False, f"unknown command (expected {', '.join(COMMANDS)})"
        log.info("telemetry: command %r (peer %d)%s", command, self.peer_id, "" if accepted else f": {why}")
        self._report()
        return Reply(command, accepted, why, command)

    def _queue_status(self) -> None:
        self._status_sent_at = time.monotonic()
        self._send(_Outgoing(self.topics.status, self.status_message(), status=True))

    def _send(self, item: _Outgoing) -> None:
        if not self.enabled:
            return
        if self._outbox.full():
            self._outbox.get_nowait()
            self._outbox.task_done()
        self._outbox.put_nowait(item)

    # ------------------------------------------------------------------ the background task
    async def run(self) -> None:
        """Keep a broker connection until ``close()``; returns at once if telemetry is off."""
        if not self.enabled:
            return
        async with asyncio.TaskGroup() as tg:
            sessions = tg.create_task(self._connect_forever())
            await self._closing.wait()
            if self.connected.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_TIMEOUT_S):
                        await self._queue.join()
                        await self._outbox.join()
            sessions.cancel()

    async def _connect_forever(self) -> None:
        delay = self.backoff[0]
        warned = False
        while True:
            before = self.connections
            error: BaseException | None = None
            try:
                await self._session()
            except* (aiomqtt.MqttError, OSError) as group:
                error = group.exceptions[0]
            except* Exception as group:  # paho surprises too: telemetry must never stop training
                error = group.exceptions[0]
                log.warning("telemetry: unexpected %s, reconnecting", type(error).__name__, exc_info=error)
            finally:
                self.connected.clear()
            task = asyncio.current_task()
            if self._closing.is_set() or (task is not None and task.cancelling()):
                return  # closing (aiomqtt may turn a cancellation into an MqttError): no retry
            if self.connections != before:  # it was up: a new outage starts now
                delay, warned = self.backoff[0], False
            self.unreachable.set()
            if not warned:
                host = f"{self.config.mqtt_host}:{self.config.mqtt_port}"
                log.warning("telemetry: broker %s unreachable (%s); training goes on, retrying", host, error)
                warned = True
            await asyncio.sleep(delay)  # retry backoff, not synchronisation
            delay = min(delay * 2, self.backoff[1])

    async def _session(self) -> None:
        config = self.config
        assert config.mqtt_host is not None
        password = None if config.password is None else config.password.get_secret_value()
        will = aiomqtt.Will(self.topics.status, self.status_message("offline"), qos=1, retain=True)
        async with aiomqtt.Client(
            config.mqtt_host,
            config.mqtt_port,
            username=config.username,
            password=password,
            identifier=f"demuon-peer-{self.peer_id}-{os.getpid()}",  # unique: a clash evicts a client
            will=will,
            tls_context=self.tls,
            keepalive=KEEPALIVE_S,
            timeout=5.0,
        ) as client:
            # statuses are state, not events: queued ones are stale now, the current one goes first
            replies = [item for item in self._drain_outbox() if not item.status]
            await client.publish(self.topics.status, self.status_message(), qos=1, retain=True)
            for item in replies:
                self._send(item)
            for topic in self.control_topics:
                await client.subscribe(topic, qos=1)
            self.connections += 1
            self.unreachable.clear()
            self.connected.set()
            log.info("telemetry: connected to %s:%d", config.mqtt_host, config.mqtt_port)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(client))
                tg.create_task(self._pump_outbox(client))
                tg.create_task(self._listen(client))
                # Wait here, not in the group's __aexit__: when the broker vanishes a child fails
                # (``client.messages`` raises on disconnection, a publish on a dead link), which
                # cancels this wait and the group undoes that cancellation. A child failing while
                # the group is already exiting leaves this task's cancelling() raised on Python
                # 3.11 (the group cancels it and never uncancels), and _connect_forever would take
                # the lost connection for its own cancellation and stop reconnecting.
                await asyncio.Event().wait()

    def _drain_outbox(self) -> list[_Outgoing]:
        items = []
        while not self._outbox.empty():
            items.append(self._outbox.get_nowait())
            self._outbox.task_done()
        return items

    async def _pump(self, client: aiomqtt.Client) -> None:
        while True:
            payload = await self._queue.get()
            try:
                await client.publish(self.metrics_topic, payload, qos=self.config.qos)
                self.published += 1
            finally:
                self._queue.task_done()

    async def _pump_outbox(self, client: aiomqtt.Client) -> None:
        while True:
            item = await self._outbox.get()
            try:
                await client.publish(item.topic, item.payload, qos=1, retain=item.status)
            finally:
                self._outbox.task_done()

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not isinstance(message.payload, bytes | bytearray | str):
                continue  # an int/float/None payload: paho never makes one from the wire
            reply = self.receive(message.payload, retained=message.retain, topic=str(message.topic))
            if reply is not None:
                payload = reply_payload(reply, run=self.run_id, peer=self.peer_id, now=time.time())
                self._send(_Outgoing(self.topics.reply, encode(payload), status=False))

    def receive(
        self, payload: bytes | bytearray | str, *, retained: bool = False, topic: str = "control"
    ) -> Reply | None:
        """One control message: act on it if it is a command, else log why not (quoting it);
        returns the reply to send (None for an empty retained message, which only clears one)."""
        quoted = preview(payload)
        if retained and not quoted:
            return None
        if retained:
            reply = Reply(None, False, "retained control message ignored (clear it: empty retained)", quoted)
        else:
            try:
                command = read_command(payload)
            except CommandRejected as exc:
                reply = Reply(None, False, exc.why, exc.payload)
            else:
                reply = replace(self.steer(command), payload=quoted)
        if not reply.accepted:
            log.warning("telemetry: refused control message on %s: %s: %r", topic, reply.why, reply.payload)
        self.replies.append(reply)
        return reply
