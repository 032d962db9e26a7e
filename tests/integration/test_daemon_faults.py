"""The daemon under faults: a peer stopped by SIGTERM resumes from its checkpoint; a neighbour that
never starts is marked down and no round waits past its deadline; bad input fails at once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from demuon import cli, results
from demuon.config import load_config
from demuon.node.checkpoint import load_checkpoint
from demuon.node.daemon import Control, DaemonStatus, LocalControl, RoundHook
from demuon.transport.inproc import InprocHub
from tests.integration.test_daemon_oracle import (
    CONFIGS,
    Cluster,
    assert_same_as_simulator,
    cluster,
    inproc_daemon,
    inproc_daemons,
)

RING = CONFIGS / "oracle-ring4.toml"
#: Slack allowed on top of a phase deadline in a recorded wait (scheduling on a loaded machine).
WAIT_TOLERANCE_S = 1.0


def wait_for(condition: Callable[[], bool], what: str, c: Cluster, i: int, timeout_s: float = 120.0) -> None:
    """Poll ``condition`` (cheap file reads) until true, failing after ``timeout_s`` or if peer
    ``i`` exited first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if c.procs[i].poll() is not None and not condition():
            pytest.fail(f"peer {i} exited (rc {c.procs[i].returncode}) before {what}\n{c.logs(i)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{c.logs(i)}")
        time.sleep(0.02)


def test_a_peer_stopped_by_sigterm_checkpoints_and_resumes_where_it_left_off(tmp_path: Path) -> None:
    sets = (
        "rounds=80",
        "network.phase_timeout_s=60.0",  # the others wait for the restarting peer: no round misses it
        "network.start_timeout_s=60.0",
        "network.down_after_misses=2",
    )
    with cluster(tmp_path, RING, *sets) as c:
        for i in range(4):
            c.start(i)
        wait_for(lambda: any(r["round"] >= 3 for r in c.rows(2)), "peer 2 logs round 3", c, 2)
        c.procs[2].send_signal(signal.SIGTERM)
        assert c.wait(2) == 0, c.logs(2)
        saved = torch.load(c.out(2) / "checkpoint" / "peer-2.pt", weights_only=True)["round"]
        assert 3 <= saved < 79, "stopped mid-run"
        assert c.rows(2)[-1]["round"] == saved  # the round in progress was finished, then saved
        assert not (c.out(2) / "final.json").exists()

        c.start(2, "--resume")
        c.wait_all()
        rounds = [r["round"] for r in c.rows(2)]
        assert rounds == list(range(80))  # saved_round + 1 follows saved_round: nothing lost or redone
        assert "resumed" in (c.out(2) / "log.txt").read_text()
        for i in range(4):
            assert all(r["missing"] == [] for r in c.rows(i)), f"peer {i} missed a message"
        assert_same_as_simulator(c, c.config)  # a clean stop and resume changes nothing


def test_a_neighbour_that_never_starts_is_marked_down_and_no_wait_overruns_its_deadline(
    tmp_path: Path,
) -> None:
    timeout = 0.3
    sets = (
        f"network.phase_timeout_s={timeout}",
        "network.start_timeout_s=5.0",
        "network.down_after_misses=2",
    )
    with cluster(tmp_path, RING, *sets) as c:
        for i in (1, 2, 3):  # peer 0, the neighbour of 1 and 3, never starts
            c.start(i)
        c.wait_all()
        for i in (1, 2, 3):
            rows = c.rows(i)
            assert [r["round"] for r in rows] == list(range(c.config.rounds)), c.logs(i)
            assert (c.out(i) / "final.json").exists()
            for r in rows:
                assert r["t_wait_max"] <= r["deadline_s"] + WAIT_TOLERANCE_S, r
                assert r["t_wait"] <= 2 * r["deadline_s"] + WAIT_TOLERANCE_S, r
                if r["round"] > 0:
                    assert r["deadline_s"] == timeout
        for i in (1, 3):  # (whether 1, 2 and 3 also saw each other in time depends on how far
            rows = c.rows(i)  # apart their processes started: not asserted)
            assert all(0 in r["down"] and 0 in r["missing"] for r in rows), [r["down"] for r in rows]


async def test_a_stop_request_finishes_the_round_in_progress_and_writes_a_checkpoint(tmp_path: Path) -> None:
    config = load_config(RING, ["network.phase_timeout_s=0.2", "network.start_timeout_s=5.0"])
    controls: dict[int, Control] = {i: LocalControl() for i in range(config.peers)}

    def stop_everyone(row: object) -> None:
        for control in controls.values():
            control.apply("stop")

    hooks: dict[int, RoundHook] = {0: lambda row: stop_everyone(row) if row["round"] == 2 else None}
    daemons = inproc_daemons(config, tmp_path, hooks=hooks, controls=controls)
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * config.peers
    for d in daemons:
        assert d.last_completed is not None and 2 <= d.last_completed < config.rounds - 1
        saved = load_checkpoint(d.checkpoint_dir, d.peer.index, config)
        assert saved["round"] == d.last_completed
        assert not (d.out / "final.json").exists()


def test_a_bad_setting_fails_before_anything_starts_naming_field_and_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert (
        cli.main(["run", "--config", str(RING), "--peer", "0", "--out", str(out), "--set", "rounds=-3"]) == 2
    )
    assert "rounds=-3" in capsys.readouterr().err
    assert cli.main(["run", "--config", str(RING), "--peer", "4", "--out", str(out)]) == 2
    assert "--peer=4" in capsys.readouterr().err
    assert not out.exists()


def test_resuming_without_a_checkpoint_fails_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fresh"
    assert cli.main(["run", "--config", str(RING), "--peer", "1", "--out", str(out), "--resume"]) == 2
    assert str(out / "checkpoint" / "peer-1.pt") in capsys.readouterr().err


async def test_a_peer_left_behind_skips_ahead_and_rejoins_the_mix(tmp_path: Path) -> None:
    """Peer 1 stops at round 3 and its neighbours go on without it (marking it down) to round 12,
    where they pause. Restarted from its checkpoint it learns from their next messages that it was
    left behind, skips ahead instead of running the remaining rounds alone, and is back in the
    mix: in the last rounds nobody misses anybody and nobody is down."""
    config = load_config(
        RING,
        [
            "rounds=60",
            "network.phase_timeout_s=0.2",
            "network.start_timeout_s=5.0",
            "network.down_after_misses=2",
        ],
    )
    controls: dict[int, LocalControl] = {i: LocalControl() for i in range(config.peers)}
    paused: set[int] = set()
    all_paused = asyncio.Event()

    def hook(i: int) -> RoundHook:
        def on_round(row: Mapping[str, Any]) -> None:
            if i == 1 and row["round"] == 3:
                controls[1].apply("stop")
            elif i != 1 and row["round"] == 12:
                controls[i].apply("pause")
                paused.add(i)
                if len(paused) == 3:
                    all_paused.set()

        return on_round

    hub = InprocHub(range(config.peers))
    daemons = [
        inproc_daemon(config, hub, i, tmp_path, on_round=hook(i), control=controls[i]) for i in range(4)
    ]
    tasks = {i: asyncio.create_task(d.run()) for i, d in enumerate(daemons)}
    try:
        async with asyncio.timeout(120):
            assert await tasks[1] == DaemonStatus.STOPPED
            await all_paused.wait()
            saved = load_checkpoint(daemons[1].checkpoint_dir, 1, config)["round"]
            assert 3 <= saved < 12
            tasks[1] = asyncio.create_task(inproc_daemon(config, hub, 1, tmp_path, resume=True).run())
            for i in (0, 2, 3):
                controls[i].apply("resume")
            assert await asyncio.gather(*tasks.values()) == [DaemonStatus.STOPPED] * 4
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    rows = {i: results.read_metrics(tmp_path / f"peer-{i}" / "metrics.jsonl") for i in range(4)}
    after = [r for r in rows[1] if r["round"] > saved]
    assert any(r["skipped"] > 0 for r in after), [r["round"] for r in after]
    print("peer 1 after its restart:", [(r["round"], r["skipped"], r["missing"]) for r in after][:12])
    assert rows[1][-1]["round"] == config.rounds - 1
    for i in range(4):
        tail = rows[i][-5:]
        assert all(r["missing"] == [] and r["down"] == [] for r in tail), (i, tail)
