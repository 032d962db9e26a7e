"""MQTT telemetry and remote control for one peer (layer 5): it watches and steers, never trains.

* ``publish(row)`` puts one round's metrics row on a bounded queue and returns at once; when the
  queue is full the oldest row is dropped and counted (``dropped``). A background pump sends the
  rows to ``{prefix}/peer/{id}/metrics`` as JSON (QoS 0).
* Commands arrive on ``{prefix}/control`` (every peer) and ``{prefix}/peer/{id}/control`` (this
  peer): ``pause``, ``resume`` and ``stop``, as plain text or JSON ``{"command": "pause"}``. They
  set the :class:`asyncio.Event` s ``paused`` and ``stop``; the daemon watches them between rounds.
* Training never depends on the broker: if it is unreachable, ``run()`` logs once per outage and
  retries with exponential backoff while ``publish`` keeps dropping the oldest rows.

Wiring (the daemon's TaskGroup owns the task)::

    telemetry = Telemetry(config.telemetry, peer_id)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(telemetry.run())       # returns at once when telemetry.mqtt_host is unset
        for k in rounds:
            await telemetry.wait_while_paused()   # immediate unless paused; "stop" releases it too
            if telemetry.stop.is_set():
                break
            ...
            telemetry.publish(row)
        telemetry.close()                     # run() flushes briefly, then returns
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Protocol

import aiomqtt

from demuon.config import TelemetryConfig

log = logging.getLogger("demuon.telemetry")

QUEUE_SIZE = 256  # rows held while the broker is slow or away (about 4 minutes at 1 round/s)
BACKOFF_MIN_S = 0.5  # first retry delay after a failed connection
BACKOFF_MAX_S = 30.0  # retry delay cap
FLUSH_TIMEOUT_S = 1.0  # how long close() lets queued rows drain to a connected broker
KEEPALIVE_S = 15
COMMANDS = ("pause", "resume", "stop")


class Control(Protocol):
    """What the daemon reads from any remote-control source."""

    paused: asyncio.Event
    stop: asyncio.Event

    async def wait_while_paused(self) -> None: ...


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: send them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def parse_command(payload: bytes | bytearray | str) -> str | None:
    """``b"pause"`` or ``b'{"command": "pause"}'`` → ``"pause"``; anything else → None."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes | bytearray) else payload
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return None
        text = str(data.get("command", "")) if isinstance(data, dict) else ""
    text = text.strip().lower()
    return text if text in COMMANDS else None


class Telemetry:
    """Publishes round rows and receives pause/resume/stop for peer ``peer_id``."""

    def __init__(
        self,
        config: TelemetryConfig,
        peer_id: int,
        *,
        queue_size: int = QUEUE_SIZE,
        backoff: tuple[float, float] = (BACKOFF_MIN_S, BACKOFF_MAX_S),
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.enabled = config.mqtt_host is not None
        prefix = config.topic_prefix.rstrip("/")
        self.metrics_topic = f"{prefix}/peer/{peer_id}/metrics"
        self.control_topics = (f"{prefix}/control", f"{prefix}/peer/{peer_id}/control")
        self.backoff = backoff
        self.paused = asyncio.Event()  # set while a "pause" is in force
        self.stop = asyncio.Event()  # set once "stop" arrived
        self.connected = asyncio.Event()  # set while subscribed to the control topics
        self.unreachable = asyncio.Event()  # set after a failed attempt, cleared on connect
        self.published = 0
        self.connections = 0
        self.dropped = 0
        self.commands: list[str] = []
        self._running = asyncio.Event()  # the inverse of paused (or stop): what rounds wait on
        self._running.set()
        self._closing = asyncio.Event()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_size)

    # ------------------------------------------------------------------ the daemon's side
    def publish(self, row: Mapping[str, Any]) -> None:
        """Queue one metrics row; never blocks. A full queue loses its oldest row."""
        if not self.enabled:
            return
        payload = json.dumps(_finite(row)).encode()
        if self._queue.full():
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
        self._queue.put_nowait(payload)

    async def wait_while_paused(self) -> None:
        """Return at once unless paused; when paused, wait for "resume" or "stop"."""
        await self._running.wait()

    def close(self) -> None:
        """Ask ``run()`` to flush what it can (bounded) and return. Idempotent."""
        self._closing.set()

    def apply(self, command: str) -> None:
        """Act on one command (also usable locally, e.g. from a signal handler)."""
        self.commands.append(command)
        if command == "pause" and not self.stop.is_set():
            self.paused.set()
            self._running.clear()
        elif command == "resume":
            self.paused.clear()
            self._running.set()
        elif command == "stop":
            self.stop.set()
            self.paused.clear()
            self._running.set()
        log.info("telemetry: command %r (peer %d)", command, self.peer_id)

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
        assert self.config.mqtt_host is not None
        async with aiomqtt.Client(
            self.config.mqtt_host,
            self.config.mqtt_port,
            identifier=f"demuon-peer-{self.peer_id}-{os.getpid()}",  # unique: a clash evicts a client
            keepalive=KEEPALIVE_S,
            timeout=5.0,
        ) as client:
            for topic in self.control_topics:
                await client.subscribe(topic, qos=1)
            self.connections += 1
            self.unreachable.clear()
            self.connected.set()
            log.info("telemetry: connected to %s:%d", self.config.mqtt_host, self.config.mqtt_port)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(client))
                tg.create_task(self._listen(client))

    async def _pump(self, client: aiomqtt.Client) -> None:
        while True:
            payload = await self._queue.get()
            try:
                await client.publish(self.metrics_topic, payload, qos=0)
                self.published += 1
            finally:
                self._queue.task_done()

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not isinstance(message.payload, bytes | bytearray | str):
                continue
            command = parse_command(message.payload)
            if command is None:
                log.warning("telemetry: ignored control message on %s", message.topic)
                continue
            self.apply(command)
