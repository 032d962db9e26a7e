"""`demuon launch` with real peer processes on loopback (against `demuon simulate` on the same
file, interrupted by SIGINT, stopped over MQTT); the compose file `demuon compose` writes is
tested in tests/unit/test_compose.py.

A process start (importing torch) is what these tests spend their time on: the two that compare
with the simulator run the oracle file's 4 peers, the others a 2-peer cluster file with short
deadlines (a stopped peer's neighbour waits at most two of them before it stops too).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from demuon import results
from demuon.app import cli
from demuon.app.summary import launch_summary
from demuon.config import load_config
from demuon.node.daemon import Control, DaemonStatus, LocalControl
from demuon.node.rounds import ROW_KEYS
from tests.support.broker import mosquitto, needs_broker
from tests.support.cluster import CONFIGS, endpoints_setting, free_ports, inproc_daemons

ORACLE = CONFIGS / "oracle-ring4.toml"
ROOT = CONFIGS.parents[1]
#: Peers of the generated cluster file.
N_PEERS = 2
ROUNDS = 6
DEADLINE_S = 90.0


def write_config(path: Path, rounds: int, peers: int = N_PEERS) -> Path:
    ports = free_ports(peers)
    endpoints = "\n".join(
        f'[[network.peers]]\nid = {i}\nendpoint = "tcp://127.0.0.1:{p}"\n' for i, p in enumerate(ports)
    )
    path.write_text(
        f'peers = {peers}\nrounds = {rounds}\nseed = 3\ndevice = "cpu"\n\n'
        '[topology]\nname = "ring"\n\n'
        '[workload]\nkind = "quadratic"\nrows = 16\ndim_in = 8\ndim_out = 4\n\n'
        "[network]\nphase_timeout_s = 0.5\nstart_timeout_s = 60.0\n\n" + endpoints
    )
    return path


def launch_argv(config: Path, out: Path, overrides: Sequence[str] = (), *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "demuon", "launch", "--config", str(config), "--out", str(out), *extra]
    argv += ["--no-live", "--every", "2"]
    return argv + [arg for item in overrides for arg in ("--set", item)]


def launch_and_simulate(
    tmp_path: Path,
    sets: Sequence[str] = (),
    *extra: str,
    during: Callable[[Path, Sequence[int], subprocess.Popen[bytes]], None] | None = None,
) -> tuple[Path, Path, bytes]:
    """``demuon launch`` (loopback endpoints on free ports) and ``demuon simulate --out`` on the
    oracle file with ``sets`` and the options ``extra`` (e.g. ``--faults F``); ``during(out, ports,
    proc)`` runs while the cluster does. Returns (launch folder, simulate folder, launch's output)."""
    config = load_config(ORACLE, list(sets))
    out = tmp_path / "launch"
    ports = free_ports(config.peers)
    with launched(ORACLE, out, [endpoints_setting(ports), *sets], *extra) as proc:
        if during is not None:
            during(out, ports, proc)
        output, _ = proc.communicate(timeout=DEADLINE_S)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(out.glob("peer-*/stdout.txt")))
        assert proc.returncode == 0, output.decode() + logs
        assert not any(alive(pid) for pid in recorded_pids(out))
    sim = tmp_path / "sim"
    argv = ["simulate", "--config", str(ORACLE), "--out", str(sim), *extra]
    assert cli.main(argv + [arg for item in sets for arg in ("--set", item)]) == 0
    return out, sim, output


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
def launched(
    config: Path, out: Path, overrides: Sequence[str] = (), *extra: str
) -> Iterator[subprocess.Popen[bytes]]:
    argv = launch_argv(config, out, overrides, *extra)
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


def keyless_attacks(out: Path, ports: Sequence[int], proc: subprocess.Popen[bytes]) -> None:
    """While the cluster runs, processes without a key attack peer 0: one claims to be peer 1 and
    sends forged messages for every round (far-future ones included), 1e30-poisoned ones and
    replays; another runs the backed-up-connection flood for 3 s (tests/support/attacker.py).
    launch turned CURVE on, so their handshakes are refused and nothing of them reaches the peer."""
    wait_for_round(out, proc, at_least=2)
    attacker = [sys.executable, "-m", "tests.support.attacker"]
    flood = subprocess.Popen([*attacker, "flood", str(ports[0]), "3"], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        argv = [*attacker, "forge", str(ports[0]), "1", "19"]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=DEADLINE_S, check=True)
        assert done.stdout.decode().split() == ["refused"]
        assert flood.wait(timeout=DEADLINE_S) == 0
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()


def test_launch_and_simulate_on_the_oracle_file_write_the_same_run_folder(tmp_path: Path) -> None:
    """docs/design.md §4's strongest check through the user-facing commands and the one result
    schema: the same files, the same keys, the same final parameters. Launch is secure by default
    (keys generated with the run), so forged, poisoned and replayed messages from a process without
    a key change nothing."""
    out, sim, output = launch_and_simulate(tmp_path, during=keyless_attacks)
    keys = sorted(p.name for p in (out / "keys").iterdir())
    assert keys == sorted(f"peer-{i}.key{s}" for i in range(4) for s in ("", "_secret"))
    assert all((out / "keys" / f"peer-{i}.key_secret").stat().st_mode & 0o077 == 0 for i in range(4))
    config = load_config(ORACLE)
    last = config.rounds - 1
    launched_summary, simulated_summary = results.read_summary(out), results.read_summary(sim)
    assert launched_summary["source"] == "launch" and simulated_summary["source"] == "simulate"
    assert set(launched_summary) == set(simulated_summary)
    for summary in (launched_summary, simulated_summary):
        assert summary["n_peers"] == config.peers and summary["failed"] == []
        assert [p["id"] for p in summary["peers"]] == list(range(config.peers))
        assert [p["final_round"] for p in summary["peers"]] == [last] * config.peers
        assert all(p["status"] == "done" and p["from"] == "final" for p in summary["peers"])
        assert summary["average"]["validation_loss"] is not None
    for lp, sp in zip(launched_summary["peers"], simulated_summary["peers"], strict=True):
        assert set(lp) == set(sp)
        assert lp["fingerprint"] == sp["fingerprint"], lp["id"]
    assert launched_summary["average"] == simulated_summary["average"]

    launched_rows, simulated_rows = results.read_per_peer(out), results.read_per_peer(sim)
    assert sorted(launched_rows) == sorted(simulated_rows) == list(range(config.peers))
    for rows in (*launched_rows.values(), *simulated_rows.values()):
        assert [r["round"] for r in rows] == list(range(config.rounds))  # every peer to the last round
        assert {frozenset(r) for r in rows} == {frozenset(ROW_KEYS)}  # the same keys on both sides
    for i in range(config.peers):
        assert (out / f"peer-{i}" / "stdout.txt").is_file()
    assert b"round" in output  # the --no-live progress lines


def test_in_float64_and_under_a_fault_plan_launch_and_simulate_reach_the_same_parameters(
    tmp_path: Path,
) -> None:
    """float64 everywhere, and a plan given to both commands as ``--faults FILE``: a 10 % drop on
    every link (a receiver does not wait for a message the plan drops, so the short phase deadline
    is never met by a planned drop) and peer 2 leaving before round 12 (it hands its tracker share
    to its heir and the others re-weight)."""
    plan = tmp_path / "drop10.toml"
    plan.write_text(
        'seed = 7\n[[link]]\naction = "drop"\nprobability = 0.1\n[[peer]]\nid = 2\nleave_at = 12\n'
    )
    sets = ["dtype=float64", "network.phase_timeout_s=2.0"]
    out, sim, _ = launch_and_simulate(tmp_path, sets, "--faults", str(plan))
    launched_summary, simulated_summary = results.read_summary(out), results.read_summary(sim)
    assert launched_summary["dtype"] == simulated_summary["dtype"] == "float64"
    statuses = [[p["status"] for p in s["peers"]] for s in (launched_summary, simulated_summary)]
    assert statuses[0] == statuses[1] == ["done", "done", "left", "done"]
    fingerprints = [[p["fingerprint"] for p in s["peers"]] for s in (launched_summary, simulated_summary)]
    assert fingerprints[0] == fingerprints[1]
    assert launched_summary["faults"] == simulated_summary["faults"]
    assert launched_summary["faults"]["injected"] > 0
    assert launched_summary["tracking_drift"] == simulated_summary["tracking_drift"]


@pytest.mark.slow  # a SIGKILL, a restart and a resume, about 17 s: make test-slow
def test_a_planned_crash_is_restarted_from_its_checkpoint_and_the_run_finishes(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cluster.toml", rounds=14, peers=3)
    plan = tmp_path / "crash.toml"
    plan.write_text("[[peer]]\nid = 1\ncrash_at = 6\nrestart_after_s = 0.5\n")
    # long deadlines: the survivors wait for peer 1 through its restart instead of running ahead
    sets = ["checkpoint.every=2", "network.phase_timeout_s=15.0", "network.down_after_misses=3"]
    out = tmp_path / "run"
    with launched(config, out, sets, "--faults", str(plan)) as proc:
        output, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, output.decode()
    text = output.decode()
    assert "peer 1 crashed at round 6" in text and "restarting peer 1" in text
    data = results.read_summary(out)
    assert [p["status"] for p in data["peers"]] == ["done"] * 3, data["peers"]
    assert all(p["final_round"] == 13 for p in data["peers"])
    log = (out / "peer-1" / "stdout.txt").read_text()
    assert "resumed from" in log  # the second life of peer 1 started from its checkpoint
    for i in (0, 2):  # the survivors never waited past a deadline for it
        rows = results.read_metrics(out / f"peer-{i}" / "metrics.jsonl")
        assert [r["round"] for r in rows] == list(range(14))
        assert max(r["t_wait_max"] - r["deadline_s"] for r in rows[1:]) <= 1.0


def test_a_peer_that_cannot_bind_stops_the_launch_at_once_with_its_error_line(tmp_path: Path) -> None:
    """Peer 1's endpoint is on no interface of this machine (TEST-NET-1, which launch's own port
    check leaves to the peer): it exits 2 before its first round, launch kills the peer still
    waiting for it instead of letting it wait out start_timeout_s, and prints peer 1's error."""
    config = write_config(tmp_path / "cluster.toml", rounds=ROUNDS)
    text = config.read_text()
    config.write_text(
        text.replace('id = 1\nendpoint = "tcp://127.0.0.1:', 'id = 1\nendpoint = "tcp://192.0.2.1:')
    )
    out = tmp_path / "run"
    with launched(config, out) as proc:
        output, _ = proc.communicate(timeout=DEADLINE_S)
        pids = recorded_pids(out)
    lines = output.decode().splitlines()
    assert proc.returncode == 1, lines
    failure = next(line for line in lines if line.startswith("peer 1 exited with 2 during start-up"))
    assert failure.endswith("(is the host an address of this machine?)")
    assert ": error: cannot bind tcp://192.0.2.1:" in failure
    assert len(pids) == N_PEERS and not [pid for pid in pids if alive(pid)]
    data = results.read_summary(out)
    assert data["failed"] == [1] and data["interrupted"] is True
    assert [p["status"] for p in data["peers"]] == ["stopped", "failed"]
    assert results.read_metrics(out / "peer-0" / results.METRICS) == []  # it never ran a round


async def test_resume_restarts_every_peer_from_its_checkpoint_and_rebuilds_the_summary(
    tmp_path: Path,
) -> None:
    """The run folder a stopped launch leaves (both peers stopped after a few rounds with their
    checkpoints, an interrupted summary; made in-process here); a plain relaunch into it is
    refused, and ``--resume`` runs the remaining rounds on both and writes a new summary."""
    rounds = 8
    config = write_config(tmp_path / "cluster.toml", rounds=rounds)
    out = tmp_path / "run"
    first = load_config(config, ["network.start_timeout_s=5.0"])
    controls: dict[int, Control] = {i: LocalControl() for i in range(N_PEERS)}

    def stop_at_round_2(row: Mapping[str, Any]) -> None:
        for control in controls.values():
            if row["round"] == 2:
                control.apply("stop")

    daemons = inproc_daemons(first, out, hooks={0: stop_at_round_2}, controls=controls)
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * N_PEERS
    stopped_at: list[int] = []
    for d in daemons:
        assert d.last_completed is not None and d.last_completed < rounds - 1
        stopped_at.append(d.last_completed)
    results.write_summary(out, launch_summary(first, out, interrupted=True))
    assert cli.main(["launch", "--config", str(config), "--out", str(out), "--no-live"]) == 2  # refused

    with launched(config, out, (), "--resume") as proc:
        output, _ = await asyncio.to_thread(proc.communicate, timeout=DEADLINE_S)
        assert proc.returncode == 0, output.decode()
    assert f"resumed {N_PEERS} peers" in output.decode()
    data = results.read_summary(out)
    assert data["interrupted"] is False and data["failed"] == []
    assert [(p["status"], p["final_round"], p["from"]) for p in data["peers"]] == [("done", 7, "final")] * 2
    for i in range(N_PEERS):
        log = (out / f"peer-{i}" / "stdout.txt").read_text()
        assert f"at round {stopped_at[i] + 1}" in log.split("resumed from", 1)[1].splitlines()[0]
        rows = results.read_metrics(out / f"peer-{i}" / "metrics.jsonl")
        assert [r["round"] for r in rows] == list(range(rounds))  # one row per round, none twice
