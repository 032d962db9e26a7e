"""Telemetry against a real mosquitto broker on loopback (started per test, killed in a finally)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt

from demuon.config import TelemetryConfig
from demuon.node.telemetry import Telemetry, parse_command
from tests.support.broker import DEADLINE_S, free_port, mosquitto, needs_broker

PREFIX = "demuon-test"


@contextlib.asynccontextmanager
async def running(telemetry: Telemetry) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(telemetry.run())
    try:
        yield task
    finally:
        telemetry.close()
        try:
            async with asyncio.timeout(DEADLINE_S):
                await task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def config(port: int) -> TelemetryConfig:
    return TelemetryConfig(mqtt_host="127.0.0.1", mqtt_port=port, topic_prefix=PREFIX)


def test_commands_parse_from_text_and_json() -> None:
    assert parse_command(b"pause") == "pause"
    assert parse_command(b' {"command": "STOP"} ') == "stop"
    assert parse_command("resume\n") == "resume"
    assert parse_command(b"reboot") is None
    assert parse_command(b"{not json") is None


async def test_disabled_telemetry_returns_at_once_and_ignores_rows() -> None:
    telemetry = Telemetry(TelemetryConfig(), 0)
    telemetry.publish({"round": 0})
    async with asyncio.timeout(DEADLINE_S):
        await telemetry.run()
    assert telemetry.dropped == 0 and not telemetry.enabled


@needs_broker
async def test_rows_reach_a_subscriber_and_stop_sets_the_event(tmp_path: Path) -> None:
    port = free_port()
    with mosquitto(tmp_path, port):
        telemetry = Telemetry(config(port), 3, backoff=(0.05, 0.2))
        async with aiomqtt.Client("127.0.0.1", port) as watcher:
            await watcher.subscribe(f"{PREFIX}/peer/+/metrics")
            async with running(telemetry), asyncio.timeout(DEADLINE_S):
                for k in range(5):
                    telemetry.publish({"round": k, "train_loss": 1.0 / (k + 1), "late": float("nan")})
                got = []
                async for message in watcher.messages:
                    assert str(message.topic) == f"{PREFIX}/peer/3/metrics"
                    assert isinstance(message.payload, bytes)
                    got.append(json.loads(message.payload))
                    if len(got) == 5:
                        break
                assert [r["round"] for r in got] == [0, 1, 2, 3, 4]
                assert got[0]["late"] is None  # NaN travels as null

                await telemetry.connected.wait()
                await watcher.publish(f"{PREFIX}/peer/3/control", b"pause", qos=1)
                await telemetry.paused.wait()
                await watcher.publish(f"{PREFIX}/control", b'{"command": "stop"}', qos=1)
                await telemetry.stop.wait()
                await telemetry.wait_while_paused()  # stop releases a pause
            assert telemetry.commands[-1] == "stop"
            assert telemetry.published == 5 and telemetry.dropped == 0


@needs_broker
async def test_pause_blocks_rounds_until_resume(tmp_path: Path) -> None:
    port = free_port()
    with mosquitto(tmp_path, port):
        telemetry = Telemetry(config(port), 1, backoff=(0.05, 0.2))
        async with aiomqtt.Client("127.0.0.1", port) as steer, running(telemetry):
            async with asyncio.timeout(DEADLINE_S):
                await telemetry.connected.wait()
                await steer.publish(f"{PREFIX}/peer/1/control", b"pause", qos=1)
                await telemetry.paused.wait()
                gate = asyncio.create_task(telemetry.wait_while_paused())
                await asyncio.sleep(0)
                assert not gate.done()
                await steer.publish(f"{PREFIX}/control", b"resume", qos=1)
                await gate
            assert not telemetry.paused.is_set() and not telemetry.stop.is_set()


async def test_without_a_broker_publish_never_blocks_and_drops_oldest() -> None:
    telemetry = Telemetry(config(free_port()), 0, queue_size=8, backoff=(0.05, 0.2))
    async with running(telemetry):
        async with asyncio.timeout(DEADLINE_S):
            await telemetry.unreachable.wait()
        for k in range(100):
            telemetry.publish({"round": k})
        assert telemetry.dropped == 92
        assert not telemetry.connected.is_set() and not telemetry.stop.is_set()
        await telemetry.wait_while_paused()  # rounds are not held up by the missing broker


@needs_broker
async def test_a_broker_that_appears_later_receives_the_newest_rows(tmp_path: Path) -> None:
    port = free_port()
    telemetry = Telemetry(config(port), 2, queue_size=4, backoff=(0.05, 0.2))
    async with running(telemetry):
        async with asyncio.timeout(DEADLINE_S):
            await telemetry.unreachable.wait()
        for k in range(10):
            telemetry.publish({"round": k})
        assert telemetry.dropped == 6
        with mosquitto(tmp_path, port):
            async with aiomqtt.Client("127.0.0.1", port) as watcher, asyncio.timeout(DEADLINE_S):
                await watcher.subscribe(f"{PREFIX}/peer/2/metrics")
                # rows queued before the watcher subscribed may be gone: publish one more and wait for it
                await telemetry.connected.wait()
                telemetry.publish({"round": 10})
                async for message in watcher.messages:
                    assert isinstance(message.payload, bytes)
                    if json.loads(message.payload)["round"] == 10:
                        break
        assert telemetry.connections >= 1
