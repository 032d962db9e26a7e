"""MQTT telemetry of whole clusters against a real mosquitto broker: rows that `mosquitto_sub`
receives follow the documented schema, pause/resume/stop show in the retained statuses, a
refused command is answered, a SIGKILLed peer turns ``offline`` (its Last Will) and
``demuon watch --once --json`` lists every peer with its status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import torch

from demuon.app import simulate
from demuon.app.run import prepare, run_peer, telemetry_status
from demuon.app.watch import Broker, View, collect
from demuon.config import load_config
from demuon.node.daemon import Daemon, DaemonStatus
from demuon.node.rounds import ROW_KEYS
from demuon.node.telemetry import ENVELOPE, PREVIEW_CHARS, SCHEMA, STATUSES, Telemetry
from tests.support.broker import free_port, mosquitto, needs_broker
from tests.support.cluster import RING, ROOT, cluster, inproc_daemons

MOSQUITTO_SUB = shutil.which("mosquitto_sub")
RUN = "mqtt-test"
DEADLINE_S = 30.0  # any one wait of these tests (a loaded 2-core machine); they take seconds
STATUS_KEYS = {*ENVELOPE, "status", "round"}
REPLY_KEYS = {*ENVELOPE, "command", "accepted", "why", "payload"}


@pytest.fixture
def mosquitto_sub_installed() -> None:
    if MOSQUITTO_SUB is None:
        pytest.fail("mosquitto_sub is not installed: apt-get install mosquitto-clients")


def check_envelope(payload: dict[str, Any], topic: str, since: float) -> None:
    peer = int(topic.split("/")[-2])
    assert payload["schema"] == SCHEMA and payload["run"] == RUN and payload["peer"] == peer, payload
    assert isinstance(payload["time"], float) and since - 1.0 <= payload["time"] <= time.time() + 1.0


def check_row(topic: str, row: dict[str, Any], since: float) -> None:
    check_envelope(row, topic, since)
    assert set(row) == {*ENVELOPE, *ROW_KEYS}, set(row) ^ {*ENVELOPE, *ROW_KEYS}
    assert isinstance(row["round"], int) and isinstance(row["train_loss"], float)
    assert isinstance(row["bytes_out"], int) and isinstance(row["missing"], list)


class Statuses:
    """The test's own subscriber: the latest status and every reply of each peer."""

    def __init__(self, client: aiomqtt.Client, since: float) -> None:
        self.client = client
        self.since = since
        self.latest: dict[int, dict[str, Any]] = {}
        self.replies: dict[int, list[dict[str, Any]]] = {}

    async def until(self, what: str, condition: Callable[[Statuses], bool]) -> None:
        try:
            async with asyncio.timeout(DEADLINE_S):
                while not condition(self):
                    message = await anext(self.client.messages)
                    assert isinstance(message.payload, bytes)
                    topic, payload = str(message.topic), json.loads(message.payload)
                    check_envelope(payload, topic, self.since)
                    if topic.endswith("/status"):
                        assert set(payload) == STATUS_KEYS and payload["status"] in STATUSES, payload
                        self.latest[payload["peer"]] = payload
                    else:
                        assert set(payload) == REPLY_KEYS, payload
                        self.replies.setdefault(payload["peer"], []).append(payload)
        except TimeoutError:
            pytest.fail(f"no {what} within {DEADLINE_S}s; statuses {self.latest}")

    async def all(self, status: str, peers: range) -> None:
        def every(s: Statuses) -> bool:
            return all(s.latest.get(i, {}).get("status") == status for i in peers)

        await self.until(f"status {status!r} from every peer", every)


@contextlib.asynccontextmanager
async def observer(port: int, prefix: str) -> AsyncIterator[Statuses]:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"{prefix}/peer/+/status", qos=1)
        await client.subscribe(f"{prefix}/peer/+/reply", qos=1)
        yield Statuses(client, time.time())


@contextlib.asynccontextmanager
async def mosquitto_sub(port: int, prefix: str, count: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """``mosquitto_sub`` on every metrics topic, printing ``topic payload`` for ``count`` rows; it
    is subscribed once it has printed the retained marker this publishes first."""
    assert MOSQUITTO_SUB is not None
    marker = f"{prefix}/subscribed"
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.publish(marker, b"yes", qos=1, retain=True)
    proc = await asyncio.create_subprocess_exec(
        *[MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), "-v", "-q", "1"],
        *["-t", marker, "-t", f"{prefix}/peer/+/metrics", "-C", str(count + 1), "-W", str(int(DEADLINE_S))],
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(DEADLINE_S):
            assert (await proc.stdout.readline()).decode().startswith(f"{marker} yes")
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def rows_of(proc: asyncio.subprocess.Process, since: float) -> dict[int, list[dict[str, Any]]]:
    async with asyncio.timeout(DEADLINE_S):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, f"mosquitto_sub exited {proc.returncode}"
    rows: dict[int, list[dict[str, Any]]] = {}
    for line in out.decode().splitlines():
        topic, _, text = line.partition(" ")
        row = json.loads(text)
        check_row(topic, row, since)
        rows.setdefault(row["peer"], []).append(row)
    return rows


def refused(seen: Statuses, peer: int) -> list[dict[str, Any]]:
    return [r for r in seen.replies.get(peer, []) if not r["accepted"]]


def with_telemetry(daemon: Daemon, telemetry: Telemetry) -> None:
    """What ``demuon.app.run.run_peer`` wires: rows, steering, the service and status changes."""
    daemon.on_round, daemon.control, daemon.services = telemetry.publish, telemetry, (telemetry,)
    daemon.on_status = lambda status: telemetry.set_status(telemetry_status(status))


@needs_broker
@pytest.mark.usefixtures("mosquitto_sub_installed")
async def test_three_in_process_peers_report_rows_statuses_and_replies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port, prefix = free_port(), "demuon-inproc"
    sets = ["peers=3", "rounds=100000", "network.phase_timeout_s=2.0", "network.start_timeout_s=5.0"]
    sets += [
        "telemetry.mqtt_host='127.0.0.1'",
        f"telemetry.mqtt_port={port}",
        f"telemetry.topic_prefix='{prefix}'",
    ]
    config = load_config(RING, sets)
    peers = range(config.peers)
    with mosquitto(tmp_path, port), caplog.at_level(logging.WARNING, "demuon.telemetry"):
        telemetries = [Telemetry(config.telemetry, i, run=RUN, backoff=(0.05, 0.2)) for i in peers]
        daemons = inproc_daemons(config, tmp_path)
        for daemon, telemetry in zip(daemons, telemetries, strict=True):
            with_telemetry(daemon, telemetry)
        async with observer(port, prefix) as seen, mosquitto_sub(port, prefix, count=30) as sub:
            async with asyncio.TaskGroup() as tg:
                runs = [tg.create_task(d.run()) for d in daemons]
                try:
                    rows = await rows_of(sub, seen.since)
                    assert sorted(rows) == list(peers), {i: len(r) for i, r in rows.items()}

                    await seen.client.publish(f"{prefix}/control", b"pause", qos=1)
                    await seen.all("paused", peers)
                    view = await collect(Broker("127.0.0.1", port), View(prefix, RUN), timeout_s=DEADLINE_S)
                    assert [(p["peer"], p["status"], p["run"]) for p in view.snapshot(time.time())] == [
                        (i, "paused", RUN) for i in peers
                    ]

                    bad = b"reboot " + b"x" * 500
                    await seen.client.publish(f"{prefix}/peer/1/control", bad, qos=1)
                    await seen.until("peer 1 refusing a command", lambda s: bool(refused(s, 1)))
                    [reply] = refused(seen, 1)
                    assert reply["command"] is None
                    assert "unknown command" in reply["why"]
                    assert (
                        reply["payload"].startswith("reboot xxx") and len(reply["payload"]) == PREVIEW_CHARS
                    )
                    assert any(reply["payload"] in r.getMessage() for r in caplog.records)

                    await seen.client.publish(f"{prefix}/control", b'{"command": "resume"}', qos=1)
                    await seen.all("training", peers)
                    await seen.client.publish(f"{prefix}/control", b"stop", qos=1)
                    await seen.all("stopped", peers)
                finally:
                    for telemetry in telemetries:  # whatever failed: the daemons stop, the group ends
                        telemetry.apply("stop")
            assert [r.result() for r in runs] == [DaemonStatus.STOPPED] * config.peers
    for i, telemetry in enumerate(telemetries):
        assert [r["command"] for r in seen.replies[i] if r["accepted"]] == ["pause", "resume", "stop"]
        assert telemetry.dropped == 0
        last = daemons[i].last_completed
        assert last is not None and seen.latest[i]["round"] == last < config.rounds - 1


@needs_broker
async def test_a_killed_peer_turns_offline_and_watch_lists_every_peer(tmp_path: Path) -> None:
    """Peers 0 and 1 run in this process as `demuon run` runs them (`run_peer`, over ZeroMQ); peer
    2 is a `demuon run` process, so that it can be SIGKILLed."""
    port, prefix = free_port(), "demuon-procs"
    sets = ["peers=3", "rounds=100000", "network.phase_timeout_s=0.5", "network.start_timeout_s=20.0"]
    sets += [
        "telemetry.mqtt_host=127.0.0.1",
        f"telemetry.mqtt_port={port}",
        f"telemetry.topic_prefix={prefix}",
    ]
    sets += [f"telemetry.run_id={RUN}"]
    with mosquitto(tmp_path, port), cluster(tmp_path, RING, *sets) as c:
        config = load_config(RING, c.sets)  # the process's config, endpoints included
        async with observer(port, prefix) as seen, asyncio.TaskGroup() as tg:
            c.start(2)
            here = [tg.create_task(run_peer(config, prepare(config, i, c.out(i)), c.out(i))) for i in (0, 1)]
            try:
                await seen.all("training", range(3))
                c.procs[2].send_signal(signal.SIGKILL)
                await seen.until("peer 2 offline", lambda s: s.latest.get(2, {}).get("status") == "offline")
                listed = await watch_once(port, prefix)
                assert {i: p["status"] for i, p in listed.items()} == {
                    0: "training",
                    1: "training",
                    2: "offline",
                }
                assert all(p["run"] == RUN and isinstance(p["last_seen"], float) for p in listed.values())
                await seen.client.publish(f"{prefix}/control", b"stop", qos=1)
                await seen.until(
                    "peers 0 and 1 stopped", lambda s: all(s.latest[i]["status"] == "stopped" for i in (0, 1))
                )
            finally:
                await seen.client.publish(f"{prefix}/control", b"stop", qos=1)  # whatever failed
        assert [t.result() for t in here] == [DaemonStatus.STOPPED] * 2


async def watch_once(port: int, prefix: str) -> dict[int, dict[str, Any]]:
    """What `demuon watch --once --json` lists, by peer."""
    watch = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "demuon", "watch", "--broker", f"mqtt://127.0.0.1:{port}"],
        *["--prefix", prefix, "--run", RUN, "--once", "--json", "--timeout", "10"],
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(DEADLINE_S):
            out, _ = await watch.communicate()
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    assert watch.returncode == 0
    return {p["peer"]: p for p in json.loads(out)["peers"]}


@needs_broker
async def test_a_broker_killed_mid_run_changes_nothing_and_telemetry_resumes_when_it_returns(
    tmp_path: Path,
) -> None:
    """Every peer pauses itself after round 4; the broker is killed; rounds 5–9 run without it;
    every peer pauses again, a new broker starts on the same port and the rest of the run goes
    on. Training never waited on the broker (the peers end with the simulator's parameters and
    no missing message) and every peer's rows reach a subscriber of the new broker."""
    port, prefix = free_port(), "demuon-outage"
    sets = [
        "telemetry.mqtt_host='127.0.0.1'",
        f"telemetry.mqtt_port={port}",
        f"telemetry.topic_prefix='{prefix}'",
    ]
    config = load_config(RING, sets)
    peers = range(config.peers)
    telemetries = [Telemetry(config.telemetry, i, run=RUN, backoff=(0.05, 0.2)) for i in peers]
    daemons = inproc_daemons(config, tmp_path)
    held = {k: asyncio.Event() for k in (4, 9, 14)}
    paused_at: dict[int, set[int]] = {k: set() for k in held}

    def hook(i: int) -> Callable[[Mapping[str, Any]], None]:
        def on_round(row: Mapping[str, Any]) -> None:
            telemetries[i].publish(row)
            if row["round"] in held:  # nobody starts the next round until the test resumes them all
                telemetries[i].apply("pause")
                paused_at[row["round"]].add(i)
                if len(paused_at[row["round"]]) == config.peers:
                    held[row["round"]].set()

        return on_round

    for daemon, telemetry in zip(daemons, telemetries, strict=True):
        with_telemetry(daemon, telemetry)
        daemon.on_round = hook(daemon.peer.index)
    seen: dict[int, set[int]] = {i: set() for i in peers}
    async with asyncio.TaskGroup() as tg:
        runs = [tg.create_task(d.run()) for d in daemons]
        try:
            with mosquitto(tmp_path, port) as first:
                async with asyncio.timeout(DEADLINE_S):
                    await held[4].wait()
                first.kill()
                first.wait(timeout=DEADLINE_S)
            for telemetry in telemetries:
                telemetry.apply("resume")  # rounds 5–9 with no broker
            async with asyncio.timeout(DEADLINE_S):
                await held[9].wait()
            with mosquitto(tmp_path, port):
                async with aiomqtt.Client("127.0.0.1", port) as client:
                    await client.subscribe(f"{prefix}/peer/+/metrics", qos=1)
                    for telemetry in telemetries:
                        telemetry.apply("resume")
                    async with asyncio.timeout(DEADLINE_S):
                        await held[14].wait()  # held again, with rows of rounds 10–14 to send
                        while not all(14 in rounds for rounds in seen.values()):
                            message = await anext(client.messages)
                            assert isinstance(message.payload, bytes)
                            row = json.loads(message.payload)
                            seen[row["peer"]].add(row["round"])
            for telemetry in telemetries:
                telemetry.apply("resume")  # and on to the end
        except BaseException:
            for telemetry in telemetries:
                telemetry.apply("stop")
            raise
    assert [r.result() for r in runs] == [DaemonStatus.STOPPED] * config.peers
    assert all(set(range(10, 15)) <= rounds for rounds in seen.values()), seen  # telemetry is back
    reference = simulate.run(config).peers
    for daemon, want in zip(daemons, reference, strict=True):
        rows = [json.loads(line) for line in (daemon.out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == list(range(config.rounds))
        assert all(r["missing"] == [] and r["down"] == [] for r in rows)  # the broker is not a neighbour
        for name, p in want.params.items():
            assert torch.equal(daemon.peer.params[name].detach(), p.detach()), (daemon.peer.index, name)
