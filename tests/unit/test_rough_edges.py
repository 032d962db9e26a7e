"""Rough edges of operating a cluster: one line instead of a traceback, a misspelt environment
variable, keys that would be overwritten, the edge list's option name, metrics of a relaunched
run, a custom workload in the current folder, a peer whose neighbours never come, the help."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from demuon import results
from demuon.app import cli, commands
from demuon.app.summary import launch_summary
from demuon.config import load_config
from demuon.errors import ConfigError, WorkloadError
from demuon.node.daemon import DaemonStatus, LocalControl
from demuon.transport import zeromq
from demuon.transport.inproc import InprocHub
from demuon.workloads import make_workload
from tests.support.cluster import free_ports, inproc_daemon, inproc_daemons
from tests.support.configs import tiny_cluster_toml

TINY = tiny_cluster_toml(rounds=3, phase_timeout_s=0.05, extra="[security]\nenabled = false\n")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single stderr line a command wrote (no traceback)."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------- one line instead of a traceback


def test_a_cuda_device_without_cuda_is_one_line(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["simulate", "--config", str(tiny), "--set", "device=cuda"]) == 2
    line = one_line(capsys)
    assert line.startswith("error: device='cuda': ") and "CUDA is not available in this torch build" in line


def test_a_cuda_index_beyond_the_devices_is_one_line(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["simulate", "--config", str(tiny), "--set", 'device="cuda:1"']) == 2
    assert one_line(capsys) == "error: device='cuda:1': only 1 CUDA device(s) present (cuda:0..cuda:0)"
    commands.check_device("cuda:0")  # the one that is there is fine


def test_ctrl_c_is_exit_130_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_keys", interrupted)  # while a command runs
    assert cli.main(["keys", "generate", str(tmp_path)]) == 130
    assert one_line(capsys) == "demuon: interrupted"

    def parser() -> argparse.ArgumentParser:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", parser)  # before anything is parsed or imported
    assert cli.main(["--version"]) == 130
    assert one_line(capsys) == "demuon: interrupted"


# ------------------------------------------------------------------ a misspelt env variable


def test_a_misspelt_environment_variable_fails_naming_it(tiny: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tiny, environ={"DEMUON__ALGORITM__LR": "0.5"})
    assert info.value.field == "DEMUON__ALGORITM__LR" and info.value.value == "0.5"
    assert "did you mean DEMUON__ALGORITHM__LR?" in str(info.value)
    with pytest.raises(ConfigError, match=r"DEMUON__ALGORITHM__LRR='0\.5': no setting 'lrr' in section"):
        load_config(tiny, environ={"DEMUON__ALGORITHM__LRR": "0.5"})
    with pytest.raises(ConfigError, match="rounds is a value, not a section"):
        load_config(tiny, environ={"DEMUON__ROUNDS__X": "3"})


def test_known_environment_variables_still_apply(tiny: Path) -> None:
    env = {
        "DEMUON__ALGORITHM__LR": "0.5",
        "demuon__rounds": "4",
        "DEMUON__ALGORITHM__SCHEDULE__KIND": "cosine",
        "DEMUON__ALGORITHM__SCHEDULE__WARMUP": "2",
        "DEMUON__PER_ALGORITHM__DSGD__LR": "0.3",
        "DEMUON__NETWORK__PEERS": json.dumps([{"id": i, "endpoint": f"tcp://p{i}:70{i}"} for i in range(2)]),
        "OTHER__ALGORITM": "ignored: not ours",
    }
    config = load_config(tiny, environ=env)
    assert config.algorithm.lr == 0.5 and config.rounds == 4
    assert config.algorithm.schedule.kind == "cosine" and config.for_algorithm("dsgd").algorithm.lr == 0.3
    assert config.endpoint(1) == "tcp://p1:701"


def test_the_cli_names_a_misspelt_variable(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEMUON__ALGORITM__LR", "0.5")
    assert cli.main(["simulate", "--config", str(tiny)]) == 2
    assert one_line(capsys).startswith("error: DEMUON__ALGORITM__LR='0.5': no setting 'algoritm'")


# ------------------------------------------------------------------------- keys not overwritten


def test_keys_for_zero_peers_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "generate", str(tmp_path / "k"), "--peers", "0"]) == 2
    assert one_line(capsys).startswith("error: --peers=0: must be at least 1")


def test_keys_are_not_overwritten_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "keys"
    assert cli.main(["keys", "generate", str(folder), "--peers", "2"]) == 0
    capsys.readouterr()
    before = (folder / "peer-0.key_secret").read_bytes()
    assert cli.main(["keys", "generate", str(folder), "--peers", "2"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"error: {folder / 'peer-0.key'} exists") and "--force" in line
    assert (folder / "peer-0.key_secret").read_bytes() == before
    assert cli.main(["keys", "generate", str(folder), "--peers", "1", "--force"]) == 0
    assert (folder / "peer-0.key_secret").read_bytes() != before
    _, err = capsys.readouterr()
    assert "still holds keys of peer-1" in err  # not replaced, and said so


# ----------------------------------------------------------------------- the edge list's option


def test_an_edge_list_without_its_file_names_edges_file(tiny: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tiny, ['topology.name="edge_list"'], environ={})
    assert info.value.field == "topology.edges_file"
    assert "path" not in str(info.value) and 'edges_file = "' in str(info.value)
    with pytest.raises(ConfigError, match=r"topology\.p=None: topology 'erdos_renyi' needs topology\.p"):
        load_config(tiny, ['topology.name="erdos_renyi"'], environ={})
    edges = tiny.parent / "edges.txt"
    edges.write_text("0 1\n")
    config = load_config(tiny, ['topology.name="edge_list"', f'topology.edges_file="{edges}"'], environ={})
    assert config.topology.edges_file == edges


# ------------------------------------------------------------------- metrics of a relaunched run


def test_a_fresh_writer_replaces_and_a_resumed_one_trims(tmp_path: Path) -> None:
    path = tmp_path / results.METRICS
    w = results.MetricsWriter(path)
    for k in range(5):
        w.write({"round": k})
    w.close()
    again = results.MetricsWriter(path)  # a relaunch without --resume
    assert again.replaced == 5 and path.read_text() == ""
    for k in range(4):
        again.write({"round": k})
    again.close()
    resumed = results.MetricsWriter(path, resume_from=2)  # the checkpoint was of round 1
    assert resumed.dropped == 2 and resumed.replaced == 0
    for k in range(2, 6):
        resumed.write({"round": k})
    resumed.close()
    assert [r["round"] for r in results.read_metrics(path)] == [0, 1, 2, 3, 4, 5]
    untouched = results.MetricsWriter(path, resume_from=6)  # nothing to drop: appended to as it is
    assert untouched.dropped == 0
    untouched.close()
    assert len(results.read_metrics(path)) == 6


async def test_a_daemon_relaunched_into_its_folder_starts_its_metrics_again(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(tiny, ["checkpoint.every=1"], environ={})
    for _ in range(2):
        daemons = inproc_daemons(config, tmp_path)
        with caplog.at_level(logging.INFO, logger="demuon.node.daemon"):
            assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * 2
    assert "fresh run: replaced the 3 rows" in caplog.text
    for i in range(2):
        rows = results.read_metrics(tmp_path / f"peer-{i}" / results.METRICS)
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert json.loads((tmp_path / f"peer-{i}" / "final.json").read_text())["status"] == "done"


# ---------------------------------------------------------- a custom workload in the current folder

FACTORY = """
from demuon.config import QuadraticWorkload
from demuon.workloads.quadratic import LeastSquares


def make(options, seed, device):
    return LeastSquares(QuadraticWorkload(rows=8, dim_in=4, dim_out=2), seed=seed, device=device)
"""


def test_a_custom_workload_in_the_current_folder_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "rough_edges_workload"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    # as under the `demuon` console script: the path starts at the script's folder, not the cwd
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        config = load_config(
            None, ['workload={kind = "custom", factory = "rough_edges_workload:make"}'], environ={}
        )
        workload = make_workload(config.workload, seed=0, device=torch.device("cpu"))
        assert workload.build_model(0)
        assert sys.path[-1] == str(tmp_path)  # appended: it shadows nothing installed
    finally:
        sys.modules.pop(name, None)


def test_a_summary_is_written_when_the_workload_cannot_be_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(
        None, ["peers=1", 'workload={kind = "custom", factory = "no_such_module_here:make"}'], environ={}
    )
    folder = results.peer_folder(tmp_path, 0)
    folder.mkdir()
    entry = results.peer_entry(0, 4, 1.5, (0.0, 1.0))
    (folder / "final.json").write_text(json.dumps(entry))
    torch.save({"w": torch.zeros(2)}, folder / "final.pt")
    with pytest.raises(WorkloadError):
        make_workload(config.workload, seed=0, device=torch.device("cpu"))
    data = launch_summary(config, tmp_path)
    assert data["average"]["validation_loss"] is None and data["peers"][0]["final_round"] == 4
    assert "No module named 'no_such_module_here'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- a lonely peer


async def test_a_peer_that_never_hears_a_neighbour_is_lonely_not_done(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(tiny, ["network.start_timeout_s=0.05"], environ={})
    daemon = inproc_daemon(config, InprocHub(range(2)), 0, tmp_path)  # peer 1 never comes
    with caplog.at_level(logging.INFO, logger="demuon.node.daemon"):
        assert await daemon.run() is DaemonStatus.LONELY
    assert "links to [1] NOT up" in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [daemon.lonely_reason()] and "never heard from any of its neighbours [1]" in errors[0]
    final = json.loads((tmp_path / "peer-0" / "final.json").read_text())
    assert final["status"] == "lonely" and final["exit_code"] is None and final["final_round"] == 2


def test_demuon_run_of_a_lonely_peer_exits_non_zero(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ports = free_ports(2)
    peers = ", ".join(f'{{id = {i}, endpoint = "tcp://127.0.0.1:{p}"}}' for i, p in enumerate(ports))
    argv = ["run", "--config", str(tiny), "--peer", "0", "--out", str(tmp_path / "peer-0")]
    argv += ["--set", f"network.peers=[{peers}]", "--set", "network.start_timeout_s=0.2"]
    assert cli.main(argv) == 3  # demuon.app.run.EXIT_LONELY
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if " ERROR " in line] == [
        next(line for line in err.splitlines() if "never heard from any of its neighbours [1]" in line)
    ]
    assert json.loads((tmp_path / "peer-0" / "final.json").read_text())["status"] == "lonely"


async def test_a_stop_during_the_start_wait_acts_at_once(tiny: Path, tmp_path: Path) -> None:
    config = load_config(tiny, ["network.start_timeout_s=60"], environ={})
    hub = InprocHub(range(2))
    control = LocalControl()
    daemon = inproc_daemon(config, hub, 0, tmp_path, control=control)
    task = asyncio.create_task(daemon.run())
    while hub.live(0) is None:  # until its transport is up: the wait for peer 1 has begun
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    began = time.monotonic()
    control.apply("stop")  # what SIGINT / SIGTERM do
    async with asyncio.timeout(5.0):
        assert await task is DaemonStatus.STOPPED
    assert time.monotonic() - began < 1.0
    assert daemon.last_completed is None and not (tmp_path / "peer-0" / "final.json").exists()


async def test_the_zmq_wait_names_the_endpoints_and_is_cancelled_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (port,) = free_ports(1)
    absent = f"tcp://127.0.0.1:{port}"

    def decode(sender: int, frames: list[memoryview]) -> Any:
        return frames

    transport: zeromq.ZmqTransport[Any] = zeromq.ZmqTransport(0, "tcp://127.0.0.1:*", {1: absent}, decode)
    await transport.start()
    try:
        monkeypatch.setattr(zeromq, "READY_NOTICE_S", 0.0)
        with caplog.at_level(logging.WARNING, logger="demuon.transport.zeromq"):
            assert await transport.wait_ready([1], 0.3) is False
        notices = [r.getMessage() for r in caplog.records]
        assert len(notices) == 1 and f"peer 1 at {absent}" in notices[0]
        task = asyncio.create_task(transport.wait_ready([1], 60.0))
        for _ in range(10):
            await asyncio.sleep(0)
        began = time.monotonic()
        task.cancel()
        async with asyncio.timeout(1.0):
            await asyncio.wait({task})
        assert task.cancelled() and time.monotonic() - began < 0.5
    finally:
        await transport.close()


# --------------------------------------------------------------------------------- the help


def test_version_and_every_help_shows_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from demuon import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"demuon {__version__}"
    parsers = [cli.build_parser()]
    checked = 0
    while parsers:
        parser = parsers.pop()
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
            elif action.default not in (None, False, [], argparse.SUPPRESS) and action.help:
                assert f"(default: {action.default})" in text, (parser.prog, action.dest)
                checked += 1
    assert checked >= 5
