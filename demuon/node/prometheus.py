"""Prometheus metrics of one peer (layer 5): the figures of the MQTT metrics rows, scraped over HTTP.

``telemetry.prometheus_port`` (unset: off) turns it on: peer ``i`` serves
``http://{telemetry.prometheus_host}:{prometheus_port + i}/metrics`` (the convention of
``network.base_port``; ``0``: every peer picks a free port and logs it). The server is asyncio's
own (``asyncio.start_server`` on the daemon's loop, one short ``GET`` per connection): no thread,
and closing it drops open connections, so nothing outlives the daemon. Every peer has its own
:class:`~prometheus_client.CollectorRegistry` (never the process-global one); its series carry
the labels ``peer`` and, when a run name is given (``demuon run`` gives ``run_name(config)``, the
``run`` of the MQTT payloads), ``run``.

:meth:`Prometheus.observe` is the daemon's ``on_round`` hook: each row of ``metrics.jsonl``
(:class:`demuon.node.rounds.RoundMetrics`) updates the series below (``ROW_SERIES``; the test
checks that every row key is either exported or named in ``NOT_EXPORTED``).

=========================================  =====================================================
series                                     from the row
=========================================  =====================================================
``demuon_rounds_completed_total``          +1 per row
``demuon_round``                           ``round`` (the last completed)
``demuon_train_loss``, ``demuon_lr``       ``train_loss``, ``lr`` (a NaN loss stays NaN)
``demuon_val_loss``                        ``val_loss`` of the peer's own model (rows that have one)
``demuon_bytes_out_total``, ``_in_total``  ``bytes_out``, ``bytes_in``
``demuon_messages_received_total``         ``received``
``demuon_neighbours_missing``              ``len(missing)`` of the last round (gauge)
``demuon_missing_total``                   ``len(missing)`` summed over rounds
``demuon_neighbours_down``                 ``len(down)`` after the last round (gauge)
``demuon_neighbour_down{neighbour}``       1 while that neighbour is down, 0 once it is back
``demuon_late_total``                      ``late``
``demuon_dropped_total{reason}``           ``stale_dropped``, ``duplicates``, ``ahead_dropped``
``demuon_rejected_total``                  ``rejected`` (messages the wire refused)
``demuon_injected_total``                  ``injected`` (fault-plan faults)
``demuon_resends_total``                   ``resends``
``demuon_keyframes_total``                 ``keyframe``
``demuon_skipped_rounds_total``            ``skipped``
``demuon_round_seconds``                   ``t_round`` of the last round (gauge)
``demuon_round_part_seconds{part}``        ``t_compute``, ``t_encode``, ``t_wait``, ``t_wait_max``,
                                           ``t_mix`` of the last round
``demuon_round_duration_seconds``          histogram of ``t_round``
``demuon_deadline_seconds``                ``deadline_s``
``demuon_local_disagreement``              ``local_disagreement`` (unchanged when None)
=========================================  =====================================================

The losses and ``demuon_local_disagreement`` read NaN until a row gives them a value.

=========================================  =====================================================
series                                     not from a row
=========================================  =====================================================
``demuon_rounds_planned``                  the run's K
``demuon_status{state}``                   1 for the peer's current state, read at each scrape
                                           (:meth:`watch`)
=========================================  =====================================================

Wiring (``demuon.app.run.run_peer``)::

    prometheus = Prometheus(config.telemetry, peer_id, run=run_name(config), rounds=config.rounds)
    daemon = Daemon(..., on_round=prometheus.observe, services=[prometheus])
    prometheus.watch(lambda: daemon.status.value, states)
    await prometheus.start()     # binds now: a taken port is a TransportError, before any round
    await daemon.run()           # run() serves until the daemon's close() calls close()
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from demuon.config import TelemetryConfig
from demuon.errors import TransportError

log = logging.getLogger("demuon.prometheus")

METRICS_PATH = "/metrics"
MAX_REQUEST_BYTES = 8192  # request line and headers; a longer request is dropped
REQUEST_TIMEOUT_S = 5.0  # a client that does not send its request (or read the answer) in time is dropped
CLOSE_TIMEOUT_S = 1.0  # how long run() waits for connections it cancelled
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Row keys exported, and the ones that are not (``peer`` is a label; the per-tensor sums are for
#: invariant checks in the files).
ROW_SERIES = frozenset(
    {
        "round",
        "train_loss",
        "lr",
        "bytes_out",
        "bytes_in",
        "received",
        "missing",
        "down",
        "late",
        "stale_dropped",
        "duplicates",
        "ahead_dropped",
        "rejected",
        "injected",
        "keyframe",
        "resends",
        "skipped",
        "t_compute",
        "t_encode",
        "t_wait",
        "t_wait_max",
        "deadline_s",
        "t_mix",
        "t_round",
        "local_disagreement",
        "val_loss",
    }
)
NOT_EXPORTED = frozenset({"peer", "sum_V", "sum_M", "bytes_out_V", "bytes_out_X"})  # per phase: in bytes_out
DROP_REASONS = {"stale_dropped": "stale", "duplicates": "duplicate", "ahead_dropped": "ahead"}
PARTS = {
    "t_compute": "compute",
    "t_encode": "encode",
    "t_wait": "wait",
    "t_wait_max": "wait_max",
    "t_mix": "mix",
}
BIND_HINTS = {
    errno.EADDRINUSE: "is another process using it? peer i serves on prometheus_port + i",
    errno.EADDRNOTAVAIL: "is telemetry.prometheus_host an address of this machine?",
    errno.EACCES: "ports below 1024 need privileges",
}


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}{METRICS_PATH}" if ":" in host else f"http://{host}:{port}{METRICS_PATH}"


class Prometheus:
    """Exports peer ``peer_id``'s round rows; a daemon service (``run()`` until ``close()``)."""

    def __init__(
        self,
        config: TelemetryConfig,
        peer_id: int,
        *,
        run: str | None = None,
        rounds: int | None = None,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.enabled = config.prometheus_port is not None
        self.host = config.prometheus_host
        base = config.prometheus_port
        self.requested_port = 0 if not base else base + peer_id  # 0: the system picks
        self.port: int | None = None  # the bound port, once started
        self.registry = CollectorRegistry()
        self.rows = 0
        self.requests = 0
        labels = {"peer": str(peer_id)} | ({"run": run} if run is not None else {})
        self.labels = labels
        names = tuple(labels)

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, [*names, *extra], registry=self.registry)

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=self.registry)

        self._rounds_done = counter("demuon_rounds_completed", "Rounds completed").labels(**labels)
        self._round = gauge("demuon_round", "Last completed round").labels(**labels)
        self._loss = gauge("demuon_train_loss", "Training loss of the last round").labels(**labels)
        self._val_loss = gauge("demuon_val_loss", "Validation loss of the own model, last evaluated").labels(
            **labels
        )
        self._lr = gauge("demuon_lr", "Step size of the last round").labels(**labels)
        self._bytes_out = counter("demuon_bytes_out", "Bytes of whole messages sent").labels(**labels)
        self._bytes_in = counter("demuon_bytes_in", "Bytes of whole messages received and used").labels(
            **labels
        )
        self._received = counter("demuon_messages_received", "Messages used, over phases").labels(**labels)
        self._missing_now = gauge(
            "demuon_neighbours_missing", "Senders missing in any phase of the last round"
        ).labels(**labels)
        self._missing = counter("demuon_missing", "Senders missing, summed over rounds").labels(**labels)
        self._down_now = gauge("demuon_neighbours_down", "Neighbours down after the last round").labels(
            **labels
        )
        self._down = gauge("demuon_neighbour_down", "1 while this neighbour is down", "neighbour")
        self._ever_down: set[int] = set()
        self._late = counter("demuon_late", "Messages that arrived after their phase closed").labels(**labels)
        dropped = counter("demuon_dropped", "Mailbox drops other than late ones", "reason")
        self._dropped = {key: dropped.labels(**labels, reason=r) for key, r in DROP_REASONS.items()}
        self._rejected = counter("demuon_rejected", "Messages the wire refused").labels(**labels)
        self._injected = counter("demuon_injected", "Faults a fault plan injected").labels(**labels)
        self._resends = counter("demuon_resends", "Messages sent again while waiting").labels(**labels)
        self._keyframes = counter("demuon_keyframes", "Rounds whose messages were keyframes").labels(**labels)
        self._skipped = counter("demuon_skipped_rounds", "Rounds jumped over to catch up").labels(**labels)
        self._t_round = gauge("demuon_round_seconds", "Duration of the last round").labels(**labels)
        parts = gauge("demuon_round_part_seconds", "Parts of the last round's duration", "part")
        self._parts = {key: parts.labels(**labels, part=p) for key, p in PARTS.items()}
        self._t_hist = Histogram(
            "demuon_round_duration_seconds",
            "Round durations",
            names,
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self._deadline = gauge("demuon_deadline_seconds", "Longest phase deadline of the last round").labels(
            **labels
        )
        self._disagreement = gauge(
            "demuon_local_disagreement", "||Y_i - X_i|| after phase X mixed (consensus proxy)"
        ).labels(**labels)
        for unknown in (self._loss, self._val_loss, self._disagreement):
            unknown.set(math.nan)  # not 0 before the first row (or evaluation) says
        if rounds is not None:
            gauge("demuon_rounds_planned", "Rounds of the run (K)").labels(**labels).set(rounds)
        self._status = gauge("demuon_status", "1 for the peer's current state", "state")
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    # ------------------------------------------------------------------ the daemon's side
    def observe(self, row: Mapping[str, Any]) -> None:
        """Update the series from one round's row (the ``on_round`` hook); never blocks."""
        if not self.enabled:
            return
        self.rows += 1
        self._rounds_done.inc()
        self._round.set(row["round"])
        self._loss.set(row["train_loss"])
        self._lr.set(row["lr"])
        self._bytes_out.inc(row["bytes_out"])
        self._bytes_in.inc(row["bytes_in"])
        self._received.inc(row["received"])
        missing, down = row["missing"], set(row["down"])
        self._missing_now.set(len(missing))
        self._missing.inc(len(missing))
        self._down_now.set(len(down))
        self._ever_down |= down
        for j in sorted(self._ever_down):
            self._down.labels(**self.labels, neighbour=str(j)).set(1.0 if j in down else 0.0)
        self._late.inc(row["late"])
        for key, drops in self._dropped.items():
            drops.inc(row[key])
        self._rejected.inc(row["rejected"])
        self._injected.inc(row["injected"])
        self._resends.inc(row["resends"])
        self._keyframes.inc(1 if row["keyframe"] else 0)
        self._skipped.inc(row["skipped"])
        self._t_round.set(row["t_round"])
        self._t_hist.observe(row["t_round"])
        for key, part in self._parts.items():
            part.set(row[key])
        self._deadline.set(row["deadline_s"])
        if row["local_disagreement"] is not None:
            self._disagreement.set(row["local_disagreement"])
        if row.get("val_loss") is not None:  # only rounds with an evaluation have one
            self._val_loss.set(row["val_loss"])

    def watch(self, read: Callable[[], str], states: Sequence[str]) -> None:
        """Export ``demuon_status{state}``: 1 for ``read()`` (read at every scrape), 0 for the others."""

        def is_now(state: str) -> Callable[[], float]:
            return lambda: 1.0 if read() == state else 0.0

        for state in states:
            self._status.labels(**self.labels, state=state).set_function(is_now(state))

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._clients)

    @property
    def url(self) -> str | None:
        return _url(self.host, self.port) if self.port is not None else None

    async def start(self) -> None:
        """Bind the endpoint (once). A port that cannot be bound is a TransportError naming it."""
        if not self.enabled or self._server is not None or self._closing.is_set():
            return
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.requested_port, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            hint = BIND_HINTS.get(exc.errno or 0)
            where = f"{self.host}:{self.requested_port}"
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's strerror is long
            raise TransportError(
                f"cannot serve Prometheus metrics on {where}: {reason}" + (f" ({hint})" if hint else ""),
                peer=self.peer_id,
                endpoint=_url(self.host, self.requested_port),
            ) from exc
        bound = [s.getsockname() for s in self._server.sockets]
        self.port = int(bound[0][1])
        extra = f" (also {', '.join(f'{a[0]}:{a[1]}' for a in bound[1:])})" if len(bound) > 1 else ""
        log.info("prometheus: metrics of peer %d at %s%s", self.peer_id, self.url, extra)

    def close(self) -> None:
        """Stop listening now and let ``run()`` drop open connections and return. Idempotent."""
        self._closing.set()
        if self._server is not None:
            self._server.close()

    # ------------------------------------------------------------------ the background task
    async def run(self) -> None:
        """Serve until ``close()``; returns at once if the exporter is off."""
        if not self.enabled:
            return
        try:
            await self.start()
            await self._closing.wait()
        finally:
            self.close()
            clients = list(self._clients)
            for task in clients:
                task.cancel()
            if clients:
                await asyncio.wait(clients, timeout=CLOSE_TIMEOUT_S)
            if self._server is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(self.respond(head))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that hung up, stalled or sent too much: nothing to answer
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()

    def respond(self, head: bytes) -> bytes:
        """The whole HTTP/1.1 answer to one request head (``Connection: close``)."""
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if len(request) != 3 or not request[2].startswith("HTTP/"):
            return _answer("400 Bad Request", b"bad request\n")
        method, target = request[0], request[1]
        if target.partition("?")[0] != METRICS_PATH:
            return _answer("404 Not Found", f"only {METRICS_PATH} is served\n".encode())
        if method not in ("GET", "HEAD"):
            return _answer("405 Method Not Allowed", b"GET or HEAD\n", extra=[("Allow", "GET, HEAD")])
        self.requests += 1
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        try:
            body = encoder(self.registry)
        except Exception as exc:  # e.g. a status reader that failed: the scrape fails, not the peer
            log.warning("prometheus: cannot render the metrics: %s: %s", type(exc).__name__, exc)
            return _answer("500 Internal Server Error", b"cannot render the metrics\n")
        return _answer("200 OK", body, content_type=content_type, head=method == "HEAD")


def _answer(
    status: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: Sequence[tuple[str, str]] = (),
    head: bool = False,
) -> bytes:
    fields = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close")]
    text = "".join(f"{k}: {v}\r\n" for k, v in [*fields, *extra])
    return f"HTTP/1.1 {status}\r\n{text}\r\n".encode("latin-1") + (b"" if head else body)
