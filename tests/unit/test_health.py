"""``status.json`` (written by the daemon at every change of state and after every round), ``demuon
health`` reading it (exit 0 done or live and fresh, 1 with one line naming why not, torch never
imported), and ``demuon run --resume-if-present`` (resume when this peer's checkpoint is there,
start fresh otherwise)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from demuon.app import cli, health
from demuon.app import run as run_module
from demuon.config import load_config, math_fingerprint
from demuon.node.checkpoint import save_checkpoint
from demuon.node.daemon import DaemonStatus
from demuon.node.status import STATUS, max_age_s, read_status, status_document, write_status
from tests.support.cluster import CONFIGS, inproc_daemons
from tests.support.configs import tiny_cluster_toml

NOW = 1_767_225_600.0


def status(state: str, *, age_s: float = 1.0, limit_s: float = 30.0, round: int | None = 3) -> dict[str, Any]:
    return status_document(
        peer=1,
        state=state,
        round=round,
        rounds=10,
        start_round=0,
        resumed=False,
        started=NOW - 100.0,
        max_age_s=limit_s,
        now=NOW - age_s,
    )


@pytest.mark.parametrize("state", ["new", "starting", "running", "stopping"])
def test_a_live_peer_with_a_fresh_status_is_healthy(state: str) -> None:
    code, line = health.verdict(status(state, age_s=29.0), now=NOW)
    assert code == 0 and line.startswith(f"peer 1: {state}, round 3 of 10")


@pytest.mark.parametrize("state", ["done", "left"])
def test_a_run_that_ended_as_planned_stays_healthy_however_old_its_status(state: str) -> None:
    assert health.verdict(status(state, age_s=1e6), now=NOW)[0] == 0


def test_a_stale_live_status_is_unhealthy_by_how_much() -> None:
    code, line = health.verdict(status("running", age_s=45.0), now=NOW)
    assert code == 1 and "stale by 15 s" in line and "limit 30 s" in line
    assert health.verdict(status("running", age_s=45.0), now=NOW, max_age_s=60.0)[0] == 0  # --max-age-s


@pytest.mark.parametrize("state", ["failed", "lonely", "stopped"])
def test_a_run_that_ended_badly_or_early_is_unhealthy_naming_its_state(state: str) -> None:
    code, line = health.verdict(status(state, age_s=0.0), now=NOW)
    assert code == 1 and f"the run ended {state}" in line and "\n" not in line


def test_no_or_a_foreign_status_file_is_unhealthy(tmp_path: Path) -> None:
    code, line = health.check(tmp_path)
    assert code == 1 and f"no status file {tmp_path / STATUS}" in line
    (tmp_path / STATUS).write_text('{"schema": "other"}')
    code, line = health.check(tmp_path)
    assert code == 1 and "unreadable status file" in line


def test_the_command_exits_0_or_1_with_one_line_and_never_imports_torch(tmp_path: Path) -> None:
    doc = {**status("running"), "time": time.time()}  # written just now
    write_status(tmp_path, doc)
    probe = (
        "import sys; from demuon.app import cli; code = cli.main(['health', '--out', sys.argv[1]]);"
        "sys.stdout.flush(); assert 'torch' not in sys.modules and 'pydantic' not in sys.modules;"
        "sys.exit(code)"
    )
    fresh = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.startswith("peer 1: running, round 3 of 10")
    missing = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"unhealthy: no status file {tmp_path / 'nowhere' / STATUS} (not started yet?)"
    ]


def test_the_status_age_limit_comes_from_the_config_deadlines() -> None:
    config = load_config(CONFIGS / "oracle-ring4.toml")
    net = config.network
    limit = run_module.daemon_settings(config, 0).status_max_age_s
    assert limit == max_age_s(phase_timeout_s=net.phase_timeout_s, start_timeout_s=net.start_timeout_s)
    assert limit >= net.start_timeout_s + 2 * net.phase_timeout_s


async def test_the_daemon_rewrites_its_status_after_every_round_and_ends_done(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "oracle-ring4.toml", ["rounds=4"])
    seen: dict[int, list[tuple[int, str, int | None]]] = {i: [] for i in range(config.peers)}

    def recorder(i: int) -> Any:
        def hook(row: Mapping[str, Any]) -> None:  # runs after the round's status was written
            doc = read_status(tmp_path / f"peer-{i}")
            seen[i].append((row["round"], doc["state"], doc["round"]))

        return hook

    daemons = inproc_daemons(config, tmp_path, hooks={i: recorder(i) for i in seen})
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * config.peers
    for i, rows in seen.items():
        assert [r for r, _, _ in rows] == list(range(4))
        assert all(
            state in ("running", "stopping") and last >= r for r, state, last in rows if last is not None
        )
        doc = read_status(tmp_path / f"peer-{i}")
        assert (doc["peer"], doc["state"], doc["round"], doc["rounds"], doc["resumed"]) == (
            i,
            "done",
            3,
            4,
            False,
        )
        assert health.check(tmp_path / f"peer-{i}")[0] == 0


# ---------------------------------------------------------------------------- --resume-if-present


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[run_module.Start]:
    """``demuon run`` up to the daemon: the Start it would run from is recorded, nothing runs."""
    starts: list[run_module.Start] = []

    async def no_daemon(config: Any, start: run_module.Start, out: Path) -> DaemonStatus:
        starts.append(start)
        return DaemonStatus.STOPPED

    monkeypatch.setattr(run_module, "run_peer", no_daemon)
    return starts


def run_args(config: Path, out: Path, *flags: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(
        ["run", "--config", str(config), "--peer", "1", "--out", str(out), *flags]
    )


def test_resume_if_present_starts_fresh_without_a_checkpoint(tmp_path: Path, started: list[Any]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(tiny_cluster_toml(rounds=8, phase_timeout_s=1.0))
    assert run_module.cmd_run(run_args(config, tmp_path / "out", "--resume-if-present")) == 0
    [start] = started
    assert (start.resumed, start.round) == (False, 0)
    assert "none there: starting fresh" in (tmp_path / "out" / "log.txt").read_text()


def test_resume_if_present_resumes_from_the_checkpoint_that_is_there(
    tmp_path: Path, started: list[Any]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(tiny_cluster_toml(rounds=8, phase_timeout_s=1.0))
    config = load_config(path)
    peer = run_module.build_peer(config, 1)
    peer.round = 4  # its last completed round
    save_checkpoint(tmp_path / "out" / "checkpoint", peer, math_fingerprint(config))
    assert run_module.cmd_run(run_args(path, tmp_path / "out", "--resume-if-present")) == 0
    [start] = started
    assert (start.resumed, start.round) == (True, 5)
    assert "resuming from it" in (tmp_path / "out" / "log.txt").read_text()


def test_resume_and_resume_if_present_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(
            ["run", "--config", "c", "--peer", "0", "--resume", "--resume-if-present"]
        )
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_status_json_is_valid_json_with_the_documented_keys(tmp_path: Path) -> None:
    write_status(tmp_path, status("running"))
    keys = set(json.loads((tmp_path / STATUS).read_text()))
    assert {"peer", "state", "round", "rounds", "time", "wall_s", "max_age_s", "resumed"} <= keys


# ---------------------------------------------------------------------------- --hold-when-done
def test_a_held_peer_stays_up_until_sigterm_then_exits_0() -> None:
    """``--hold-when-done`` (what a StatefulSet's pods run with): once finished, the process blocks
    until SIGTERM and then exits 0 rather than exiting at once and being restarted. (The child
    blocks SIGTERM before it says it is holding, so the signal cannot arrive too early.)"""
    code = (
        "import signal; from demuon.app.health import hold_until_signalled\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})\n"
        "print('holding', flush=True); hold_until_signalled(); print('released', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        assert proc.poll() is None  # still up
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out.strip() == "released"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
