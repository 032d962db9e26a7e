"""`demuon launch` with real peer processes on loopback, and the compose file `demuon compose` writes.

Every process a test starts is killed and reaped in a finally: the launch process by its handle,
the peers by the pids launch records in ``peers.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiomqtt

from demuon import cli, compose, results
from demuon.config import load_config
from tests.integration.broker import mosquitto, needs_broker
from tests.integration.test_daemon_oracle import free_ports

N_PEERS = 4
ROUNDS = 6
DEADLINE_S = 90.0


def write_config(path: Path, rounds: int) -> Path:
    ports = free_ports(N_PEERS)
    peers = "\n".join(
        f'[[network.peers]]\nid = {i}\nendpoint = "tcp://127.0.0.1:{p}"\n' for i, p in enumerate(ports)
    )
    path.write_text(
        f'peers = {N_PEERS}\nrounds = {rounds}\nseed = 3\ndevice = "cpu"\n\n'
        '[topology]\nname = "ring"\n\n'
        '[workload]\nkind = "quadratic"\nrows = 16\ndim_in = 8\ndim_out = 4\n\n'
        "[network]\nphase_timeout_s = 2.0\nstart_timeout_s = 60.0\n\n" + peers
    )
    return path


def launch_argv(config: Path, out: Path, overrides: Sequence[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "demuon", "launch", "--config", str(config), "--out", str(out)]
    argv += ["--no-live", "--every", "2"]
    return argv + [arg for item in overrides for arg in ("--set", item)]


def recorded_pids(out: Path) -> list[int]:
    try:
        return [int(p["pid"]) for p in json.loads((out / "peers.json").read_text())["peers"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@contextlib.contextmanager
def launched(config: Path, out: Path, overrides: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    argv = launch_argv(config, out, overrides)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=DEADLINE_S)
        for pid in recorded_pids(out):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_for_round(
    out: Path, proc: subprocess.Popen[bytes], at_least: int, deadline_s: float = DEADLINE_S
) -> None:
    """Until a peer logged round ≥ ``at_least`` (bounded; fails if launch exits first)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for path in out.glob("peer-*/metrics.jsonl"):
            if any(r.get("round", -1) >= at_least for r in results.read_metrics(path)):
                return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)  # back off on the launch process itself
        assert proc.returncode is None, f"launch exited early with {proc.returncode}"
    raise TimeoutError(f"no peer reached round {at_least} within {deadline_s}s")


def test_launch_runs_every_peer_to_the_last_round_and_writes_the_summary(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.toml", ROUNDS)
    out = tmp_path / "run"
    with launched(config, out) as proc:
        output, _ = proc.communicate(timeout=DEADLINE_S)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(out.glob("peer-*/stdout.txt")))
        assert proc.returncode == 0, output.decode() + logs
    data = results.read_summary(out)
    assert data["source"] == "launch" and data["n_peers"] == N_PEERS
    assert [p["final_round"] for p in data["peers"]] == [ROUNDS - 1] * N_PEERS
    assert all(p["fingerprint"]["l2"] is not None for p in data["peers"])
    assert data["average"]["validation_loss"] is not None and data["failed"] == []
    for i in range(N_PEERS):
        assert (out / f"peer-{i}" / "stdout.txt").is_file()
    assert b"round" in output  # the --no-live progress lines
    assert not any(alive(pid) for pid in recorded_pids(out))


def test_sigint_stops_every_peer_and_still_writes_a_summary(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.toml", rounds=1_000_000)
    out = tmp_path / "run"
    with launched(config, out) as proc:
        wait_for_round(out, proc, at_least=2)
        pids = recorded_pids(out)
        assert len(pids) == N_PEERS
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 130, output.decode()
    assert not [pid for pid in pids if alive(pid)]
    data = results.read_summary(out)
    assert data["interrupted"] is True and data["n_peers"] == N_PEERS
    assert all(p["final_round"] >= 2 and p["status"] == "stopped" for p in data["peers"]), data["peers"]
    assert data["failed"] == []
    # stopped peers leave checkpoints: the summary still has their fingerprints and the average's loss
    assert all(p["from"] == "checkpoint" and p["fingerprint"]["l2"] is not None for p in data["peers"])
    assert data["average"]["validation_loss"] is not None


def test_compose_file_has_one_service_per_peer_with_name_based_endpoints(tmp_path: Path) -> None:
    source = write_config(tmp_path / "src.toml", ROUNDS)
    out, cluster = compose.write_compose(
        source, tmp_path / "deploy" / "docker-compose.yml", mqtt=True, overrides=["algorithm.lr=0.05"]
    )
    text = out.read_text()
    doc = json.loads(text.split("\n", 1)[1])  # after the YAML comment line
    peers = {name: svc for name, svc in doc["services"].items() if name.startswith("peer-")}
    assert sorted(peers) == [f"peer-{i}" for i in range(N_PEERS)]
    assert "mosquitto" in doc["services"]
    assert doc["services"]["peer-0"]["build"]["dockerfile"] == "docker/Dockerfile"
    for i in range(N_PEERS):
        svc = peers[f"peer-{i}"]
        assert svc["command"][:6] == ["demuon", "run", "--config", "/config/cluster.toml", "--peer", str(i)]
        env = svc["environment"]
        config = load_config(cluster, environ=env)  # what the container reads
        assert config.endpoint(i) == f"tcp://peer-{i}:{config.network.base_port + i}"
        assert config.telemetry.mqtt_host == "mosquitto"
        assert config.algorithm.lr == 0.05
    assert cluster.read_text() == source.read_text()


@needs_broker
async def test_an_mqtt_stop_ends_every_launched_peer_cleanly(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.toml", rounds=1_000_000)
    port = free_ports(1)[0]
    out = tmp_path / "run"
    telemetry = [
        f"telemetry.mqtt_port={port}",
        'telemetry.mqtt_host="127.0.0.1"',
        'telemetry.topic_prefix="t"',
    ]
    with mosquitto(tmp_path, port), launched(config, out, telemetry) as proc:
        async with aiomqtt.Client("127.0.0.1", port) as client, asyncio.timeout(DEADLINE_S):
            await client.subscribe("t/peer/+/metrics")
            seen: dict[str, int] = {}
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                seen[str(message.topic)] = json.loads(message.payload)["round"]
                if len(seen) == N_PEERS and min(seen.values()) >= 2:
                    break
            await client.publish("t/control", b"stop", qos=1)
        output, _ = await asyncio.to_thread(proc.communicate, timeout=DEADLINE_S)
        assert proc.returncode == 0, output.decode()
    data = results.read_summary(out)
    assert [p["status"] for p in data["peers"]] == ["stopped"] * N_PEERS
    assert [p["exit_code"] for p in data["peers"]] == [0] * N_PEERS


def test_launch_and_simulate_on_the_oracle_file_write_the_same_fingerprints(tmp_path: Path) -> None:
    """DESIGN §4's strongest check through the user-facing commands and the one result schema."""
    oracle = Path(__file__).resolve().parents[2] / "configs" / "oracle-ring4.toml"
    ports = free_ports(N_PEERS)
    endpoints = ", ".join(f'{{id = {i}, endpoint = "tcp://127.0.0.1:{p}"}}' for i, p in enumerate(ports))
    out = tmp_path / "launch"
    with launched(oracle, out, [f"network.peers=[{endpoints}]"]) as proc:
        output, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, output.decode()
    assert cli.main(["simulate", "--config", str(oracle), "--out", str(tmp_path / "sim")]) == 0
    launched_summary = results.read_summary(out)
    simulated_summary = results.read_summary(tmp_path / "sim")
    assert [p["fingerprint"] for p in launched_summary["peers"]] == [
        p["fingerprint"] for p in simulated_summary["peers"]
    ]
    assert launched_summary["average"] == simulated_summary["average"]
