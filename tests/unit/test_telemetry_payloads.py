"""MQTT payloads, commands and replies, the reported status, the telemetry settings and the
watcher's picture, without a broker."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from rich.console import Console

from demuon.app.run import TELEMETRY_STATUS, run_name, telemetry_status
from demuon.app.watch import SILENT_S, View, parse_broker, render
from demuon.config import TelemetryConfig, load_config, math_fingerprint
from demuon.errors import ConfigError
from demuon.node.daemon import DaemonStatus
from demuon.node.telemetry import (
    PREVIEW_CHARS,
    SCHEMA,
    STATUSES,
    CommandRejected,
    Telemetry,
    encode,
    metrics_payload,
    read_command,
    status_payload,
    tls_context,
)

ON = TelemetryConfig(mqtt_host="127.0.0.1", topic_prefix="p")


def test_a_metrics_row_carries_schema_run_peer_and_time_then_its_own_keys() -> None:
    row = {"peer": 99, "round": 4, "train_loss": float("nan"), "missing": (1,)}
    payload = json.loads(encode(metrics_payload(row, run="r1", peer=2, now=1700000000.123456)))
    assert payload == {
        "schema": SCHEMA,
        "run": "r1",
        "peer": 2,  # the envelope's peer, not the row's
        "time": 1700000000.123,
        "round": 4,
        "train_loss": None,  # JSON has no NaN
        "missing": [1],
    }
    assert list(payload)[:4] == ["schema", "run", "peer", "time"]


def test_a_status_payload_has_exactly_the_documented_keys_and_refuses_other_statuses() -> None:
    payload = status_payload("training", run="r", peer=0, round=None, now=1.0)
    assert payload == {
        "schema": SCHEMA,
        "run": "r",
        "peer": 0,
        "time": 1.0,
        "status": "training",
        "round": None,
    }
    with pytest.raises(ValueError, match="unknown status 'running'"):
        status_payload("running", run="r", peer=0, round=0, now=1.0)


@pytest.mark.parametrize(
    ("payload", "command"),
    [(b"pause", "pause"), (b' {"command": "STOP"} ', "stop"), ("resume\n", "resume")],
)
def test_commands_read_from_text_and_json(payload: bytes | str, command: str) -> None:
    assert read_command(payload) == command


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"reboot", "unknown command"),
        (b"{not json", "not valid JSON"),
        (b'{"cmd": "stop"}', 'without a "command" string'),
        (b'["stop"]', "unknown command"),  # only an object is read as JSON
        (b"\xff\xfe", "not UTF-8"),
        (b"   ", "empty"),
    ],
)
def test_a_bad_command_is_refused_saying_why_and_quoting_it(payload: bytes, why: str) -> None:
    with pytest.raises(CommandRejected, match=why) as error:
        read_command(payload)
    assert why in error.value.why and error.value.payload == payload.decode("utf-8", "replace")


def test_a_refused_payload_is_quoted_cut_to_the_preview_length_in_the_reply_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    telemetry = Telemetry(ON, 3, run="r")
    with caplog.at_level(logging.WARNING, "demuon.telemetry"):
        reply = telemetry.receive(b"launch missiles " + b"!" * 1000, topic="p/peer/3/control")
    assert reply is not None and not reply.accepted and reply.command is None
    assert len(reply.payload) == PREVIEW_CHARS and reply.payload.startswith("launch missiles !!")
    assert reply.payload.endswith("…")
    [record] = caplog.records
    assert reply.payload in record.getMessage() and "p/peer/3/control" in record.getMessage()
    assert not telemetry.paused.is_set() and not telemetry.stop.is_set()


def test_accepted_commands_are_answered_and_a_retained_one_is_refused() -> None:
    telemetry = Telemetry(ON, 0, run="r")
    assert telemetry.receive(b"stop", retained=True) == telemetry.replies[-1]
    assert not telemetry.replies[-1].accepted and not telemetry.stop.is_set()
    assert telemetry.receive(b"", retained=True) is None  # clearing a retained message: no reply
    pause = telemetry.receive(b'{"command": "pause"}')
    assert pause is not None and (pause.command, pause.accepted) == ("pause", True)
    assert pause.payload == '{"command": "pause"}'
    stop = telemetry.receive(b"stop")
    assert stop is not None and stop.accepted and telemetry.stop.is_set() and not telemetry.paused.is_set()
    late = telemetry.receive(b"pause")
    assert late is not None and not late.accepted and late.why == "already stopping"


def test_the_reported_status_follows_the_daemon_and_a_pause_and_a_final_one_sticks() -> None:
    telemetry = Telemetry(ON, 0, run="r")
    seen = []
    for status in ("waiting-for-links", "training"):
        telemetry.set_status(status)
        seen.append(telemetry.status)
    telemetry.apply("pause")
    seen.append(telemetry.status)
    telemetry.apply("resume")
    seen.append(telemetry.status)
    telemetry.set_status("failed")
    telemetry.close()  # would say "stopped": a failure stays a failure
    seen.append(telemetry.status)
    assert seen == ["waiting-for-links", "training", "paused", "training", "failed"]
    with pytest.raises(ValueError, match="offline"):
        telemetry.set_status("offline")  # the broker's word (the Last Will), never a peer's


def test_every_daemon_status_reads_as_a_telemetry_status() -> None:
    lifecycle = ("NEW", "STARTING", "RUNNING", "STOPPING", "STOPPED", "FAILED")
    assert {DaemonStatus[name] for name in lifecycle} <= set(TELEMETRY_STATUS)
    assert {telemetry_status(s) for s in DaemonStatus} <= set(STATUSES) - {"paused", "offline"}


def test_the_run_name_is_the_config_s_or_its_math_fingerprint() -> None:
    config = load_config(None, ["peers=3"])
    assert run_name(config) == math_fingerprint(config)[:12]
    assert run_name(load_config(None, ["peers=3", "network.base_port=4000"])) == run_name(config)
    assert run_name(load_config(None, ["telemetry.run_id='exp-7'"])) == "exp-7"
    with pytest.raises(ConfigError, match=r"telemetry.run_id"):
        load_config(None, ["telemetry.run_id='a/b'"])


def test_the_password_comes_from_the_environment_and_is_never_shown() -> None:
    environ = {"DEMUON__TELEMETRY__PASSWORD": "hunter2", "DEMUON__TELEMETRY__USERNAME": "peer"}
    config = load_config(None, environ=environ)
    assert config.telemetry.password is not None
    assert config.telemetry.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.telemetry)
    assert "hunter2" not in config.model_dump_json()
    with pytest.raises(ConfigError, match=r"without telemetry.username"):
        load_config(None, ["telemetry.password='x'"])


def test_tls_settings_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="tls = true"):
        load_config(None, ["telemetry.tls_ca='/etc/ssl/ca.pem'"])
    assert tls_context(TelemetryConfig(tls=True)) is not None  # the system CAs
    with pytest.raises(ConfigError, match=r"telemetry.tls_ca"):
        tls_context(TelemetryConfig(tls=True, tls_ca=Path("/no/such/ca.pem")))


def test_broker_urls() -> None:
    assert parse_broker("mqtt://10.0.0.5:1884").url == "mqtt://10.0.0.5:1884"
    assert parse_broker("mqtts://ops@broker.lan").url == "mqtts://ops@broker.lan:8883"
    assert parse_broker("localhost").port == 1883
    for bad in ("http://x:1", "mqtt://:1883", "mqtt://u:secret@x", "mqtt://x:port"):
        with pytest.raises(ConfigError, match="--broker"):
            parse_broker(bad)


def feed(view: View, kind: str, peer: int, **payload: object) -> bool:
    body = {"schema": SCHEMA, "run": "r", "peer": peer, **payload}
    return view.feed(f"p/peer/{peer}/{kind}", json.dumps(body))


def test_the_watcher_keeps_the_latest_status_totals_and_rates_of_each_peer() -> None:
    view = View("p")
    assert feed(view, "status", 1, time=100.0, status="training", round=3)
    for k in range(4, 9):
        row = {"round": k, "train_loss": 1.0 / k, "bytes_out": 1000, "late": 1, "missing": [0], "down": [0]}
        assert feed(view, "metrics", 1, time=100.0 + (k - 4) * 0.5, **row)
    assert feed(view, "status", 0, time=90.0, status="offline", round=2)
    [offline, training] = view.snapshot(now=102.0)
    assert (offline["peer"], offline["status"], offline["round"], offline["age_s"]) == (0, "offline", 2, 12.0)
    assert training["round"] == 8 and training["loss"] == pytest.approx(1 / 8)
    assert training["rounds_per_s"] == pytest.approx(2.0) and training["bytes_per_s"] == pytest.approx(2000.0)
    assert (training["late"], training["missing"], training["down"]) == (5, 5, 1)
    assert not training["silent"] and view.snapshot(now=103.0 + SILENT_S)[1]["silent"]


def test_the_watcher_ignores_foreign_payloads_and_other_runs() -> None:
    view = View("p", run="mine")
    assert not view.feed("p/peer/1/status", b"not json")
    assert not view.feed("p/peer/1/status", json.dumps({"schema": "other/1", "run": "mine", "peer": 1}))
    assert not view.feed("p/peer/2/status", json.dumps({"schema": SCHEMA, "run": "mine", "peer": 1}))
    assert not feed(view, "status", 1, time=1.0, status="training", round=0)  # run "r", not "mine"
    assert view.peers == {} and view.ignored == 3


def test_the_table_marks_offline_peers_and_names_runs_when_there_are_several() -> None:
    view = View("p")
    feed(view, "status", 0, time=1.0, status="offline", round=2)
    other = {"schema": SCHEMA, "run": "other", "peer": 1, "status": "paused"}
    assert view.feed("p/peer/1/status", json.dumps(other))
    console = Console(record=True, width=120)
    console.print(render(view, now=5.0, title="t"))
    text = console.export_text()
    assert "offline" in text and "paused" in text and "other" in text and "4.0s" in text
