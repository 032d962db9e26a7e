"""Prometheus metrics: the row → series mapping, the HTTP endpoint scraped over loopback while an
in-process cluster runs (scrapes at known rounds, from the round hook), `demuon run`'s wiring, a
port that cannot be bound, and the shipped deploy/ files (scrape config and Grafana dashboard)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from demuon.app.compose import service_name
from demuon.app.run import PEER_STATES, fan_out, peer_state, prepare, run_name, run_peer
from demuon.config import TelemetryConfig, load_config
from demuon.errors import TransportError
from demuon.node import prometheus as prometheus_module
from demuon.node.daemon import Daemon, DaemonStatus, RoundHook
from demuon.node.prometheus import NOT_EXPORTED, ROW_SERIES, Prometheus
from demuon.node.rounds import ROW_KEYS, RoundMetrics
from tests.support.cluster import RING, free_ports, inproc_daemons

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BOUND_S = 30.0  # any run or exchange below; they take about a second
SCRAPE_TIMEOUT_S = 5.0
METRIC = re.compile(r"\bdemuon_[a-z_]+\b")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def row(k: int, **changes: Any) -> dict[str, Any]:
    """A complete metrics row of round ``k`` (the daemon's own type, so its keys stay in step)."""
    metrics = RoundMetrics(
        peer=3,
        round=k,
        train_loss=1.0 / (k + 1),
        lr=0.05,
        bytes_out=1000,
        bytes_in=900,
        received=4,
        missing=(),
        down=(),
        late=0,
        stale_dropped=0,
        duplicates=0,
        ahead_dropped=0,
        rejected=0,
        injected=0,
        keyframe=False,
        resends=0,
        skipped=0,
        t_compute=0.01,
        t_encode=0.002,
        t_wait=0.03,
        t_wait_max=0.02,
        deadline_s=10.0,
        t_mix=0.001,
        t_round=0.05,
        local_disagreement=0.5,
        sum_V=None,
        sum_M=None,
    )
    return replace(metrics, **changes).row()


def samples_of(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(url: str, method: str = "GET") -> str:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        body: bytes = response.read()
        return body.decode()


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextlib.asynccontextmanager
async def serving(exporter: Prometheus) -> AsyncIterator[asyncio.Task[None]]:
    """``exporter`` bound and served; closed and awaited (bounded) even on failure."""
    await exporter.start()
    task = asyncio.create_task(exporter.run())
    try:
        yield task
    finally:
        exporter.close()
        try:
            async with asyncio.timeout(BOUND_S):
                await task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def exporter_config(port: int | None = 0) -> TelemetryConfig:
    return TelemetryConfig(prometheus_port=port)


# ------------------------------------------------------------------------------ row → series


def test_every_row_key_is_exported_or_named_as_not_exported() -> None:
    assert set(ROW_KEYS) <= ROW_SERIES | NOT_EXPORTED  # a new row field must be placed in one
    assert not ROW_SERIES & NOT_EXPORTED


def test_rows_update_counters_by_sum_and_gauges_to_the_last_round() -> None:
    exporter = Prometheus(exporter_config(), 3, run="r1", rounds=10)
    got = exporter.registry.get_sample_value
    labels = {"peer": "3", "run": "r1"}
    before = got("demuon_val_loss", labels)
    assert before is not None and math.isnan(before)  # unknown, not 0, before a row says
    exporter.observe(row(0, missing=(2,), down=(2,), late=1, stale_dropped=2, rejected=1, keyframe=True))
    exporter.observe(
        row(1, down=(4,), duplicates=3, ahead_dropped=1, resends=2, skipped=1, local_disagreement=None)
    )
    evaluated = row(2, train_loss=float("nan"), bytes_out=500, t_round=2.0) | {"val_loss": 0.7}
    exporter.observe(evaluated)

    def at(name: str, **extra: str) -> float | None:
        return got(name, labels | extra)

    assert at("demuon_rounds_completed_total") == 3
    assert at("demuon_round") == 2
    assert at("demuon_rounds_planned") == 10
    loss = at("demuon_train_loss")
    assert loss is not None and math.isnan(loss)  # NaN stays NaN
    assert at("demuon_val_loss") == 0.7
    assert at("demuon_lr") == 0.05
    assert at("demuon_bytes_out_total") == 2500 and at("demuon_bytes_in_total") == 2700
    assert at("demuon_messages_received_total") == 12
    assert at("demuon_missing_total") == 1 and at("demuon_neighbours_missing") == 0
    assert at("demuon_neighbours_down") == 0
    assert at("demuon_neighbour_down", neighbour="2") == 0  # came back
    assert at("demuon_neighbour_down", neighbour="4") == 0
    assert at("demuon_late_total") == 1 and at("demuon_rejected_total") == 1
    assert at("demuon_dropped_total", reason="stale") == 2
    assert at("demuon_dropped_total", reason="duplicate") == 3
    assert at("demuon_dropped_total", reason="ahead") == 1
    assert at("demuon_keyframes_total") == 1 and at("demuon_resends_total") == 2
    assert at("demuon_skipped_rounds_total") == 1 and at("demuon_injected_total") == 0
    assert at("demuon_round_seconds") == 2.0
    assert at("demuon_round_part_seconds", part="wait") == 0.03
    assert at("demuon_round_part_seconds", part="wait_max") == 0.02
    assert at("demuon_deadline_seconds") == 10.0
    assert at("demuon_local_disagreement") == 0.5  # a None leaves the last value
    assert at("demuon_round_duration_seconds_count") == 3
    assert at("demuon_round_duration_seconds_bucket", le="0.05") == 2
    exporter.observe(row(3, down=(2, 4)) | {"val_loss": None})
    assert at("demuon_val_loss") == 0.7  # rounds without an evaluation leave it
    assert at("demuon_neighbour_down", neighbour="2") == 1 and at("demuon_neighbours_down") == 2


def test_the_status_reads_its_source_at_each_scrape_and_a_broken_source_fails_only_the_scrape() -> None:
    exporter = Prometheus(exporter_config(), 0)
    state = {"now": "starting"}

    def read() -> str:
        if state["now"] == "boom":
            raise RuntimeError("boom")
        return state["now"]

    exporter.watch(read, PEER_STATES)
    got = exporter.registry.get_sample_value
    assert got("demuon_status", {"peer": "0", "state": "starting"}) == 1
    state["now"] = "paused"
    assert got("demuon_status", {"peer": "0", "state": "paused"}) == 1
    assert got("demuon_status", {"peer": "0", "state": "starting"}) == 0
    state["now"] = "boom"
    assert exporter.respond(b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500 ")


def test_requests_other_than_get_metrics_are_refused() -> None:
    exporter = Prometheus(exporter_config(), 0)
    assert exporter.respond(b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert exporter.respond(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert exporter.respond(b"\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    head = exporter.respond(b"HEAD /metrics?x=1 HTTP/1.1\r\nAccept: text/plain\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # headers only
    openmetrics = exporter.respond(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
    assert b"application/openmetrics-text" in openmetrics and openmetrics.endswith(b"# EOF\n")
    assert exporter.requests == 2


def test_fan_out_hands_each_row_to_every_hook() -> None:
    seen: list[tuple[str, int]] = []
    hooks: list[RoundHook] = [
        lambda r: seen.append(("a", r["round"])),
        lambda r: seen.append(("b", r["round"])),
    ]
    assert fan_out([]) is None and fan_out(hooks[:1]) is hooks[0]
    both = fan_out(hooks)
    assert both is not None
    both({"round": 7})
    assert seen == [("a", 7), ("b", 7)]


async def test_off_by_default_it_serves_nothing_and_returns_at_once() -> None:
    exporter = Prometheus(TelemetryConfig(), 0)
    exporter.observe(row(0))
    async with asyncio.timeout(BOUND_S):
        await exporter.run()
    assert not exporter.enabled and exporter.url is None and exporter.rows == 0


# ------------------------------------------------------------------------------ the endpoint


def test_peer_i_serves_on_the_base_port_plus_i() -> None:
    assert Prometheus(exporter_config(9400), 5).requested_port == 9405
    assert Prometheus(exporter_config(0), 5).requested_port == 0


async def test_a_taken_port_is_one_transport_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exporter = Prometheus(exporter_config(port - 1), 1)  # peer 1: port - 1 + 1
        with pytest.raises(TransportError, match=rf"cannot serve Prometheus metrics on 127\.0\.0\.1:{port}"):
            await exporter.start()
        exporter.close()
        async with asyncio.timeout(BOUND_S):
            await exporter.run()  # closed before it served: returns at once


async def test_close_drops_a_client_that_never_sends_its_request() -> None:
    exporter = Prometheus(exporter_config(), 0)
    async with asyncio.timeout(BOUND_S):
        async with serving(exporter) as task:
            assert exporter.port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", exporter.port)
            try:
                while not exporter.connections:
                    await asyncio.sleep(0.01)  # the accept is scheduled by the loop, not timed
                exporter.close()
                await task  # returns although the client is still connected
                assert await reader.read() == b""  # and the client was hung up on
            finally:
                writer.close()
        assert refused(exporter.port)


async def test_counters_rise_between_scrapes_at_known_rounds_of_a_running_cluster(tmp_path: Path) -> None:
    config = load_config(RING, ["rounds=6", "telemetry.prometheus_port=0"])
    exporters = {
        i: Prometheus(config.telemetry, i, run="t1", rounds=config.rounds) for i in range(config.peers)
    }
    scrapes: dict[int, Samples] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-scrape")

    async def observe_and_scrape(r: Mapping[str, Any]) -> None:
        exporters[0].observe(r)
        if r["round"] in (1, 4):  # the hook runs in row order: the scrape sees rows 0..round exactly
            url = exporters[0].url
            assert url is not None
            text = await asyncio.get_running_loop().run_in_executor(pool, scrape, url)
            scrapes[r["round"]] = samples_of(text)

    hooks: dict[int, RoundHook] = {i: e.observe for i, e in exporters.items()}
    hooks[0] = observe_and_scrape
    daemons = inproc_daemons(config, tmp_path, hooks=hooks)
    threads_before = set(threading.enumerate())
    try:
        for d in daemons:
            exporter = exporters[d.peer.index]
            d.services = (exporter,)
            exporter.watch(functools.partial(peer_state, d), PEER_STATES)
            await exporter.start()
        assert set(threading.enumerate()) == threads_before  # served without a thread
        ports = {e.port for e in exporters.values()}
        assert None not in ports and len(ports) == config.peers  # port 0: each its own, free
        async with asyncio.timeout(BOUND_S):
            statuses = await asyncio.gather(*(d.run() for d in daemons))
    finally:
        for e in exporters.values():
            e.close()
        for d in daemons:
            await d.close()
        pool.shutdown(wait=True)
    assert statuses == [DaemonStatus.STOPPED] * config.peers
    assert sorted(scrapes) == [1, 4], "the hook raised (see the log) or a row was dropped"
    first, second = scrapes[1], scrapes[4]
    labels = {"peer": "0", "run": "t1"}
    assert value(first, "demuon_rounds_completed_total", **labels) == 2
    assert value(second, "demuon_rounds_completed_total", **labels) == 5
    assert (value(first, "demuon_round", **labels), value(second, "demuon_round", **labels)) == (1, 4)
    for name in ("demuon_bytes_out_total", "demuon_bytes_in_total", "demuon_messages_received_total"):
        assert 0 < value(first, name, **labels) < value(second, name, **labels), name
    assert value(first, "demuon_status", **labels, state="running") == 1
    assert value(first, "demuon_status", **labels, state="stopped") == 0
    assert value(second, "demuon_neighbours_down", **labels) == 0
    assert value(second, "demuon_rounds_planned", **labels) == config.rounds
    rows = [json.loads(line) for line in (daemons[0].out / "metrics.jsonl").read_text().splitlines()]
    assert value(second, "demuon_bytes_out_total", **labels) == sum(r["bytes_out"] for r in rows[:5])
    for e in exporters.values():
        assert e.rows == config.rounds
        assert e.port is not None and refused(e.port)  # closed with its daemon


# ------------------------------------------------------------------------------ demuon run's wiring


class Recorded(Prometheus):
    made: ClassVar[list[Prometheus]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Recorded.made.append(self)


def one_peer(tmp_path: Path, *sets: str) -> tuple[Any, Any]:
    port = free_ports(1)[0]
    config = load_config(RING, ["peers=1", "rounds=3", f"network.base_port={port}", *sets])
    return config, prepare(config, 0, tmp_path / "peer-0")


async def test_demuon_run_serves_the_rows_and_closes_the_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Recorded.made = []
    monkeypatch.setattr(prometheus_module, "Prometheus", Recorded)
    config, start = one_peer(tmp_path, "telemetry.prometheus_port=0")
    async with asyncio.timeout(BOUND_S):
        assert await run_peer(config, start, tmp_path / "peer-0") is DaemonStatus.STOPPED
    [exporter] = Recorded.made
    assert exporter.rows == 3 and exporter.port is not None and refused(exporter.port)
    got = exporter.registry.get_sample_value
    labels = {"peer": "0", "run": run_name(config)}  # the run of the MQTT payloads
    assert got("demuon_rounds_completed_total", labels) == 3
    assert got("demuon_status", labels | {"state": "running"}) == 0  # read now: the run is over


async def test_demuon_run_with_a_taken_metrics_port_raises_before_any_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[Daemon] = []
    close = Daemon.close

    async def record_close(self: Daemon) -> None:
        closed.append(self)
        await close(self)

    monkeypatch.setattr(Daemon, "close", record_close)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, start = one_peer(tmp_path, f"telemetry.prometheus_port={port}")
        async with asyncio.timeout(BOUND_S):
            with pytest.raises(TransportError, match="cannot serve Prometheus metrics"):
                await run_peer(config, start, tmp_path / "peer-0")
    assert len(closed) == 1 and closed[0].last_completed is None  # closed, never ran a round
    assert not (tmp_path / "peer-0" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ deploy/


def test_the_scrape_config_names_every_compose_service_on_its_metrics_port() -> None:
    text = (DEPLOY / "prometheus.yml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    doc = json.loads(body)  # JSON is YAML; the '#' lines are YAML comments
    [job] = doc["scrape_configs"]
    assert job["metrics_path"] == prometheus_module.METRICS_PATH
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"{service_name(i)}:{9400 + i}" for i in range(len(targets))]
    assert len(targets) == 8


def test_every_dashboard_query_names_a_series_the_endpoint_serves() -> None:
    exporter = Prometheus(exporter_config(), 0, rounds=5)
    exporter.observe(row(0, down=(1,)))
    exporter.watch(lambda: "running", PEER_STATES)
    answer = exporter.respond(b"GET /metrics HTTP/1.1\r\n\r\n")
    served = {name for name, _ in samples_of(answer.partition(b"\r\n\r\n")[2].decode())}
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("loss", "round", "rounds per second", "bytes out", "bytes in", "missing", "down"):
        assert topic in titles, topic
    named = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(METRIC.findall(target["expr"]))
            assert names, target["expr"]
            assert names <= served, (panel["title"], names - served)
            named |= names
    assert {"demuon_train_loss", "demuon_rounds_completed_total", "demuon_bytes_out_total"} <= named
