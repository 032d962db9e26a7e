"""``demuon watch``: every peer of a running cluster, as its MQTT telemetry tells it (layer 6).

    demuon watch --broker mqtt://HOST:PORT [--run NAME] [--prefix demuon] [--once] [--json] [--timeout S]

It subscribes to ``{prefix}/peer/+/status`` (retained: every peer's last word arrives at once)
and ``{prefix}/peer/+/metrics``, and shows one line per (run, peer): status, round, loss,
rounds/s, bytes/s out, late / missing (summed over the rows seen), down (after the last row) and
when it was last heard from; ``offline`` (the broker's Last Will for a peer that vanished) and
``failed`` in red, and a peer that said ``training`` but has been silent for :data:`SILENT_S`
seconds is marked. ``--once`` waits until the retained statuses have settled (:data:`SETTLE_S`
without a new one, at most ``--timeout``, default :data:`ONCE_TIMEOUT_S`) and prints one table,
or with ``--json`` one document ``{"broker", "prefix", "run", "peers": [...]}`` (keys of
:meth:`PeerView.as_json`). The live view runs until Ctrl-C or ``--timeout``.

``mqtts://`` connects with TLS (system CAs, or ``--tls-ca``); ``mqtt://USER@HOST`` logs in as
USER with the password in ``DEMUON__TELEMETRY__PASSWORD`` (never on the command line).
Exit status: 0, or 2 when the broker cannot be reached (one ``error: ...`` line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from rich.console import Console
from rich.live import Live
from rich.table import Table

from demuon.errors import ConfigError, DemuonError
from demuon.node.telemetry import SCHEMA, STATUSES

SETTLE_S = 0.5  # --once: this long without a new retained status and the picture is complete
ONCE_TIMEOUT_S = 5.0  # --once: the longest it waits, connection included
REFRESH_S = 0.5  # live view refresh
RETRY_S = 1.0  # live view: delay between attempts to reach a lost broker
SILENT_S = 10.0  # a training peer not heard from for this long is marked silent
RATE_WINDOW = 5  # rows averaged for rounds/s and bytes/s
CONNECT_TIMEOUT_S = 5.0
PASSWORD_ENV = "DEMUON__TELEMETRY__PASSWORD"
COLOURS = {"offline": "red", "failed": "red", "paused": "yellow", "stopped": "cyan", "training": "green"}


class BrokerUnreachable(DemuonError):
    """The broker refused or did not answer."""


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool = False
    username: str | None = None

    @property
    def url(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker(text: str) -> Broker:
    """``mqtt://HOST[:PORT]`` (1883) or ``mqtts://[USER@]HOST[:PORT]`` (8883)."""
    parts = urlsplit(text if "://" in text else f"mqtt://{text}")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError("--broker", text, "expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    if parts.password is not None:
        raise ConfigError("--broker", text, f"no password in the URL: set {PASSWORD_ENV}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError("--broker", text, "the port is not a number in 0..65535") from exc
    tls = parts.scheme == "mqtts"
    return Broker(parts.hostname, port or (8883 if tls else 1883), tls, parts.username or None)


@dataclass
class PeerView:
    """What the watcher knows of one peer of one run."""

    run: str
    peer: int
    status: str | None = None  # None: metrics seen, no status yet
    round: int | None = None
    loss: float | None = None
    last_seen: float | None = None  # the newest payload's "time" (Unix seconds, the peer's clock)
    late: int = 0
    missing: int = 0
    down: int = 0
    rows: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))

    def seen(self, when: Any) -> None:
        if isinstance(when, int | float) and (self.last_seen is None or when > self.last_seen):
            self.last_seen = float(when)

    def add_row(self, row: dict[str, Any]) -> None:
        k = row.get("round")
        if isinstance(k, int) and (self.round is None or k >= self.round):
            self.round = k
            loss = row.get("train_loss")
            self.loss = float(loss) if isinstance(loss, int | float) else None
            down = row.get("down")
            self.down = len(down) if isinstance(down, list) else 0
        for key in ("late", "missing"):
            value = row.get(key)
            count = len(value) if isinstance(value, list) else value if isinstance(value, int) else 0
            setattr(self, key, getattr(self, key) + count)
        when, sent = row.get("time"), row.get("bytes_out")
        if isinstance(when, int | float) and isinstance(k, int):
            self.rows.append((float(when), k, float(sent) if isinstance(sent, int | float) else 0.0))

    def rates(self) -> tuple[float | None, float | None]:
        """Rounds per second and bytes per second out, over the last rows."""
        if len(self.rows) < 2 or self.rows[-1][0] <= self.rows[0][0]:
            return None, None
        span = self.rows[-1][0] - self.rows[0][0]
        rounds = (self.rows[-1][1] - self.rows[0][1]) / span
        return rounds, sum(r[2] for r in list(self.rows)[1:]) / span

    def silent(self, now: float) -> bool:
        return self.status == "training" and self.last_seen is not None and now - self.last_seen > SILENT_S

    def as_json(self, now: float) -> dict[str, Any]:
        rounds_per_s, bytes_per_s = self.rates()
        return {
            "peer": self.peer,
            "run": self.run,
            "status": self.status,
            "round": self.round,
            "loss": self.loss,
            "rounds_per_s": rounds_per_s,
            "bytes_per_s": bytes_per_s,
            "late": self.late,
            "missing": self.missing,
            "down": self.down,
            "last_seen": self.last_seen,
            "age_s": None if self.last_seen is None else round(now - self.last_seen, 3),
            "silent": self.silent(now),
        }


class View:
    """Every peer heard on ``prefix`` (of run ``run`` only, when given)."""

    def __init__(self, prefix: str, run: str | None = None) -> None:
        self.prefix = prefix.rstrip("/")
        self.run = run
        self.peers: dict[tuple[str, int], PeerView] = {}
        self.ignored = 0  # messages that are not demuon.mqtt/1 payloads of a peer

    @property
    def subscriptions(self) -> tuple[str, str]:
        return f"{self.prefix}/peer/+/status", f"{self.prefix}/peer/+/metrics"

    def feed(self, topic: str, payload: bytes | bytearray | str) -> bool:
        """One message; returns whether it was a payload of a watched peer."""
        head, _, kind = topic.rpartition("/")
        try:
            data = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        peer = head.rpartition("/")[2]
        if (
            not isinstance(data, dict)
            or head != f"{self.prefix}/peer/{peer}"
            or data.get("schema") != SCHEMA
            or data.get("peer") != (int(peer) if peer.isdigit() else None)
            or not isinstance(data.get("run"), str)
            or kind not in ("status", "metrics")
        ):
            self.ignored += 1
            return False
        if self.run is not None and data["run"] != self.run:
            return False
        view = self.peers.setdefault((data["run"], data["peer"]), PeerView(data["run"], data["peer"]))
        view.seen(data.get("time"))
        if kind == "metrics":
            view.add_row(data)
        elif data.get("status") in STATUSES:
            view.status = data["status"]
            k = data.get("round")
            if isinstance(k, int) and (view.round is None or k > view.round or data["status"] == "starting"):
                view.round = k
        return True

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        return [self.peers[key].as_json(now) for key in sorted(self.peers)]


def _fmt(value: float | int | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.0f}m"


def render(view: View, now: float, title: str) -> Table:
    runs = {run for run, _ in view.peers}
    table = Table(title=title)
    columns = ["peer", "status", "round", "loss", "rounds/s", "KB/s out", "late", "missing", "down", "seen"]
    if len(runs) > 1:
        columns.insert(1, "run")
    for col in columns:
        text = col in ("status", "run")
        table.add_column(col, justify="left" if text else "right", no_wrap=text or col == "seen")
    for row in view.snapshot(now):
        status = row["status"] or "—"
        if row["silent"]:
            status += " (silent)"
        colour = "red" if row["silent"] else COLOURS.get(row["status"] or "")
        cells = [
            str(row["peer"]),
            f"[{colour}]{status}[/{colour}]" if colour else status,
            _fmt(row["round"], "d"),
            _fmt(row["loss"], ".4f"),
            _fmt(row["rounds_per_s"], ".2f"),
            _fmt(None if row["bytes_per_s"] is None else row["bytes_per_s"] / 1e3, ".1f"),
            str(row["late"]),
            str(row["missing"]),
            str(row["down"]),
            _age(row["age_s"]),
        ]
        if len(runs) > 1:
            cells.insert(1, row["run"])
        table.add_row(*cells)
    if not view.peers:
        table.caption = "no peer heard yet"
    return table


def _tls(broker: Broker, ca: Path | None) -> ssl.SSLContext | None:
    if not broker.tls:
        return None
    try:
        return ssl.create_default_context(cafile=None if ca is None else str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--tls-ca", str(ca), f"cannot load: {exc}") from exc


@asynccontextmanager
async def subscribed(broker: Broker, view: View, ca: Path | None = None) -> AsyncIterator[aiomqtt.Client]:
    """A client subscribed to the view's topics (a failure to connect is BrokerUnreachable)."""
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        username=broker.username,
        password=os.environ.get(PASSWORD_ENV) if broker.username else None,
        identifier=f"demuon-watch-{os.getpid()}",
        tls_context=_tls(broker, ca),
        timeout=CONNECT_TIMEOUT_S,
    )
    try:
        await client.__aenter__()
    except (aiomqtt.MqttError, OSError) as exc:
        raise BrokerUnreachable(f"cannot reach the broker {broker.url}: {exc}") from exc
    try:
        for topic in view.subscriptions:
            await client.subscribe(topic, qos=1)
        yield client
    finally:
        await client.__aexit__(None, None, None)


async def _next(client: aiomqtt.Client, timeout_s: float) -> aiomqtt.Message | None:
    try:
        return await asyncio.wait_for(anext(client.messages), max(timeout_s, 0.0))
    except TimeoutError:
        return None


async def collect(
    broker: Broker,
    view: View,
    *,
    timeout_s: float = ONCE_TIMEOUT_S,
    settle_s: float = SETTLE_S,
    ca: Path | None = None,
) -> View:
    """Fill ``view`` until no retained status has arrived for ``settle_s`` (at most ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with asyncio.timeout(timeout_s + CONNECT_TIMEOUT_S), subscribed(broker, view, ca) as client:
        quiet_at = loop.time() + settle_s
        while (left := min(quiet_at, deadline) - loop.time()) > 0:
            message = await _next(client, left)
            if message is None:
                break
            if isinstance(message.payload, bytes | bytearray | str):
                view.feed(str(message.topic), message.payload)
            if message.retain:
                quiet_at = loop.time() + settle_s
    return view


async def follow(broker: Broker, view: View, *, timeout_s: float | None, ca: Path | None = None) -> None:
    """The live table until ``timeout_s`` (or Ctrl-C). A broker lost after the first connection
    is retried every :data:`RETRY_S` (the table says so); one never reached is BrokerUnreachable."""
    loop = asyncio.get_running_loop()
    deadline = math.inf if timeout_s is None else loop.time() + timeout_s
    title = f"demuon watch — {broker.url} {view.prefix}" + (f" run {view.run}" if view.run else "")
    lost: str | None = None

    def show() -> Table:
        table = render(view, time.time(), title)
        if lost is not None:
            table.caption = f"[red]{lost}: retrying[/red]"
        return table

    with Live(show(), console=Console(), refresh_per_second=2) as live:
        connected = False
        while loop.time() < deadline:
            try:
                async with subscribed(broker, view, ca) as client:
                    connected, lost = True, None
                    next_refresh = loop.time()
                    while loop.time() < deadline:
                        message = await _next(client, min(next_refresh, deadline) - loop.time())
                        if message is not None and isinstance(message.payload, bytes | bytearray | str):
                            view.feed(str(message.topic), message.payload)
                        if loop.time() >= next_refresh:
                            live.update(show())
                            next_refresh = loop.time() + REFRESH_S
            except (BrokerUnreachable, aiomqtt.MqttError) as exc:
                if not connected:
                    raise
                lost = f"lost the broker ({exc})"
                live.update(show())
                await asyncio.sleep(min(RETRY_S, max(deadline - loop.time(), 0.0)))  # retry backoff
        live.update(show())


def document(broker: Broker, view: View, now: float) -> dict[str, Any]:
    return {"broker": broker.url, "prefix": view.prefix, "run": view.run, "peers": view.snapshot(now)}


def cmd_watch(args: argparse.Namespace) -> int:
    broker = parse_broker(args.broker)
    view = View(args.prefix, args.run)
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout", args.timeout, "must be a positive number of seconds")
    if args.json and not args.once:
        raise ConfigError("--json", True, "prints one snapshot: use it with --once")
    try:
        if args.once:
            asyncio.run(collect(broker, view, timeout_s=args.timeout or ONCE_TIMEOUT_S, ca=args.tls_ca))
        else:
            asyncio.run(follow(broker, view, timeout_s=args.timeout, ca=args.tls_ca))
    except TimeoutError as exc:
        raise BrokerUnreachable(f"the broker {broker.url} did not answer in time") from exc
    except aiomqtt.MqttError as exc:
        raise BrokerUnreachable(f"lost the broker {broker.url}: {exc}") from exc
    if args.once:
        now = time.time()
        if args.json:
            print(json.dumps(document(broker, view, now), indent=2))
        else:
            Console().print(render(view, now, f"demuon watch — {broker.url} {view.prefix}"))
    return 0
