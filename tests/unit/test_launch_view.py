"""What `demuon launch` shows and checks, in-process: progress with rounds/s and ETA, missing
messages counted, paused peers, the compact table beyond 20 peers, the ``--no-live`` lines after a
peer died, a start-up failure stopping the launch, and the refusals before anything starts (an
``--out`` with a previous run, ``--resume`` without checkpoints, a taken port, ``--every 0``).

The peers here are fake: :class:`FakeProc` stands in for the process, and the test writes the
``metrics.jsonl`` rows and ``stdout.txt`` lines a real peer would.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from rich.console import Console
from rich.table import Table

from demuon import results
from demuon.app import cli, launch, report
from demuon.app.launch import MetricsTail, OutputTail, PeerProcess, Status
from demuon.config import TelemetryConfig, load_config
from demuon.errors import DemuonError
from demuon.node.telemetry import Telemetry


class FakeProc:
    """The part of a ``subprocess.Popen`` that launch uses; a signal ends it (``-signal``)."""

    def __init__(self, returncode: int | None = None) -> None:
        self.returncode = returncode
        self.signals: list[int] = []
        self.pid = 0
        self.args: list[str] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if self.returncode is None:
            self.returncode = -sig

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def row(k: int, *, missing: Sequence[int] = (), t_round: float = 0.5, loss: float = 1.0) -> dict[str, Any]:
    return {
        "round": k,
        "train_loss": loss,
        "bytes_out": 1000,
        "late": 0,
        "missing": list(missing),
        "down": [],
        "t_round": t_round,
    }


def append_rows(p: PeerProcess, rows: Sequence[dict[str, Any]]) -> None:
    with (p.out / results.METRICS).open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def say(p: PeerProcess, *lines: str) -> None:
    with (p.out / "stdout.txt").open("a") as f:
        f.writelines(line + "\n" for line in lines)


def fake_peer(root: Path, i: int, rows: Sequence[dict[str, Any]] = (), rc: int | None = None) -> PeerProcess:
    out = results.peer_folder(root, i)
    out.mkdir(parents=True, exist_ok=True)
    proc = cast("Any", FakeProc(rc))
    p = PeerProcess(
        i, out, proc, io.BytesIO(), MetricsTail(out / results.METRICS), OutputTail(out / "stdout.txt")
    )
    append_rows(p, rows)
    p.refresh()
    return p


def text(table: Table) -> str:
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(table)
    return console.export_text()


def cells(table: Table) -> list[list[str]]:
    """The body rows of a rendered table, cell by cell."""
    lines = [line for line in text(table).splitlines() if line.startswith("│")]
    return [[c.strip() for c in line.strip("│").split("│")] for line in lines]


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "REFRESH_S", 0.01)


# ------------------------------------------------------------------------------- the view


def test_missing_counts_every_sender_of_every_row_in_the_view_and_the_report(tmp_path: Path) -> None:
    """68 rounds with ``"missing": [3]`` after peer 3 was killed read 68, not 0."""
    rows = [row(k) for k in range(12)] + [row(k, missing=[3]) for k in range(12, 80)]
    survivor = fake_peer(tmp_path, 0, rows)
    two = fake_peer(tmp_path, 2, [row(k, missing=[1, 3] if k == 79 else ()) for k in range(80)])
    assert survivor.totals["missing"] == 68 and two.totals["missing"] == 2
    assert "missing 70" in launch.progress_line([survivor, two], 80)
    missing = launch.COLUMNS.index("missing")
    assert [r[missing] for r in cells(launch.render_table([survivor, two], 80, 1.0))] == ["68", "2"]
    # the report reads the same rows
    assert [r[5] for r in cells(report.peer_table(results.read_per_peer(tmp_path), None))] == ["68", "2"]
    assert results.fault_totals(results.read_per_peer(tmp_path))["missing"] == 70


def test_progress_has_rounds_per_second_and_an_eta_from_the_slowest_peer(tmp_path: Path) -> None:
    fast_peer = fake_peer(tmp_path, 0, [row(k, t_round=0.25) for k in range(10)])  # 4 rounds/s
    slow_peer = fake_peer(tmp_path, 1, [row(k, t_round=0.5) for k in range(10)])  # 2 rounds/s
    assert fast_peer.rounds_per_s() == pytest.approx(4.0)
    assert slow_peer.eta_s(30) == pytest.approx(10.0)  # rounds 10..29 at 2 rounds/s
    g = launch.progress([fast_peer, slow_peer], 30)
    assert g.rounds_per_s == pytest.approx(3.0) and g.eta_s == pytest.approx(10.0)
    line = launch.progress_line([fast_peer, slow_peer], 30)
    assert "round 9..9/29  3.00 rounds/s  ETA 10s" in line
    assert "rounds/s, ETA 10s" in text(launch.render_table([fast_peer, slow_peer], 30, 4.0))
    slow_peer.proc = cast("Any", FakeProc(0))  # an exited peer no longer sets the pace
    slow_peer.refresh()
    assert launch.progress([fast_peer, slow_peer], 30).eta_s == pytest.approx(5.0)
    assert [launch.duration(s) for s in (None, 4.4, 65, 7260)] == ["—", "4s", "1m05s", "2h01m"]


def test_a_peer_is_paused_while_its_log_says_a_telemetry_pause_holds_it(tmp_path: Path) -> None:
    p = fake_peer(tmp_path, 1, [row(0)])
    assert p.active
    say(p, "2026-01-01 12:00:00,000 peer-1 INFO demuon.telemetry: telemetry: command 'pause' (peer 1)")
    p.refresh()
    assert p.status is Status.PAUSED and not p.active
    g = launch.progress([p], 10)
    assert (g.paused, g.running, g.eta_s) == (1, 1, None)
    assert "running 1/1 (1 paused)" in launch.progress_line([p], 10)
    say(p, "\x1b[2m... telemetry: command 'resume' (peer 1)\x1b[0m")  # colours do not hide it
    p.refresh()
    assert p.status is Status.RUNNING
    say(p, "... telemetry: command 'pause' (peer 1): already stopping")  # refused: not paused
    p.refresh()
    assert p.status is Status.RUNNING


def test_the_pause_lines_launch_reads_are_the_ones_telemetry_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The coupling between the two modules, held by the real :class:`Telemetry`."""
    telemetry = Telemetry(TelemetryConfig(), 4)
    p = fake_peer(tmp_path, 4, [row(0)])
    for command, paused in (("pause", True), ("resume", False), ("pause", True), ("stop", False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="demuon.telemetry"):
            telemetry.apply(command)
        say(p, *(f"2026-01-01 12:00:00,000 peer-4 INFO {r.name}: {r.getMessage()}" for r in caplog.records))
        p.refresh()
        assert p.output is not None and p.output.paused is paused, (command, caplog.text)


def test_more_than_20_peers_are_shown_one_row_per_group_of_10(tmp_path: Path) -> None:
    peers = [fake_peer(tmp_path, i, [row(k) for k in range(5 + i % 3)]) for i in range(45)]
    peers[17].proc = cast("Any", FakeProc(1))
    peers[17].refresh()
    body = cells(launch.render_table(peers, 50, 3.0))
    assert [r[0] for r in body] == ["0–9", "10–19", "20–29", "30–39", "40–44"]
    assert [r[-1] for r in body] == [
        "10 running",
        "9 running, 1 failed",
        "10 running",
        "10 running",
        "5 running",
    ]
    assert body[0][1] == "4..6"  # the group's round range
    assert body[1][launch.COLUMNS.index("KB/s out")] == "20.0"  # summed over the group
    assert launch.group_size(45) == 10 and launch.group_size(1000) == 50
    assert [r[0] for r in cells(launch.render_table(peers[:20], 50, 3.0))] == [str(i) for i in range(20)]


# ------------------------------------------------------------------------ the watch loop


class Script:
    """An :class:`launch.Events` that plays a run: each step, every live peer logs its next row
    (peer 2 dies at round 3); after round 19 they finish."""

    def __init__(self, peers: Sequence[PeerProcess]) -> None:
        self.peers = peers
        self.k = 0

    @property
    def waiting(self) -> bool:
        return False

    def step(self, peers: Sequence[PeerProcess]) -> None:
        for p in self.peers:
            if p.proc.returncode is None:
                append_rows(p, [row(self.k, missing=[2] if self.k > 3 and p.id != 2 else ())])
        if self.k == 3:
            cast("FakeProc", self.peers[2].proc).returncode = -signal.SIGKILL
        if self.k == 19:
            for p in self.peers:
                if p.proc.returncode is None:
                    cast("FakeProc", p.proc).returncode = 0
        self.k += 1


def test_no_live_lines_keep_coming_after_a_peer_dies(
    tmp_path: Path, fast: None, capsys: pytest.CaptureFixture[str]
) -> None:
    peers = [fake_peer(tmp_path, i) for i in range(3)]
    outcome = launch.watch(
        peers, 20, live=False, every=5, grace_s=1.0, timeout_s=30.0, events=[Script(peers)]
    )
    assert not outcome.interrupted and outcome.start_up_failure is None
    out, err = capsys.readouterr()
    lines = out.splitlines()
    fronts = [int(line.split()[1].split("..")[1].split("/")[0]) for line in lines]
    assert len(lines) >= 4 and max(fronts[:-1]) >= 14, out  # lines past the dead peer's round 3
    assert "missing 32" in lines[-1]  # rounds 4..19 of two survivors
    assert "peer 2 failed: exit -9 (SIGKILL)" in err
    assert [p.status for p in peers] == [Status.DONE, Status.DONE, Status.FAILED]
    assert launch.line_front(peers) is None


def test_a_peer_failing_at_start_up_stops_the_others_and_its_error_line_is_printed(
    tmp_path: Path, fast: None, capsys: pytest.CaptureFixture[str]
) -> None:
    starting, failing, running = (fake_peer(tmp_path, i) for i in range(3))
    append_rows(running, [row(0)])
    say(failing, "2026 peer-1 INFO demuon.run: CURVE on", "error: cannot bind tcp://10.9.9.9:5: Cannot", "")
    cast("FakeProc", failing.proc).returncode = 2
    outcome = launch.watch(
        [starting, failing, running], 10, live=False, every=1, grace_s=60.0, timeout_s=None
    )
    assert outcome.interrupted and outcome.start_up_failure is failing
    sig = [cast("FakeProc", p.proc).signals for p in (starting, failing, running)]
    assert sig == [[signal.SIGKILL], [], [signal.SIGTERM]]  # nothing to save yet / finish the round
    err = capsys.readouterr().err
    assert "peer 1 exited with 2 during start-up: error: cannot bind tcp://10.9.9.9:5: Cannot" in err
    assert [p.status for p in (starting, failing, running)] == [Status.STOPPED, Status.FAILED, Status.STOPPED]


def test_a_start_up_failure_without_an_error_line_names_the_file(tmp_path: Path) -> None:
    p = fake_peer(tmp_path, 0, rc=-signal.SIGKILL)
    assert p.failed_at_start
    assert launch.start_up_failure(p) == (
        f"peer 0 exited with -9 (SIGKILL) during start-up, saying nothing (see {p.out / 'stdout.txt'})"
    )
    resumed = fake_peer(tmp_path, 1, [row(0)])  # rows from before launch started it do not count
    resumed.fresh = 0
    resumed.proc = cast("Any", FakeProc(1))
    resumed.refresh()
    assert resumed.failed_at_start
    late = fake_peer(tmp_path, 2, [row(0)], rc=1)
    assert not late.failed_at_start and late.status is Status.FAILED


def test_spawn_reads_the_rows_a_resumed_peer_already_has_as_earlier_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "peer-0"
    out.mkdir()
    (out / results.METRICS).write_text("".join(json.dumps(row(k)) + "\n" for k in range(6)))
    (out / "stdout.txt").write_text("error: from an earlier run\n")
    monkeypatch.setattr(launch, "PEER_COMMAND", ("true",))
    p = launch.spawn(tmp_path / "c.toml", 0, out, [], "--resume")
    try:
        p.proc.wait(timeout=10)
        p.refresh()
    finally:
        p.log.close()
    assert list(cast("list[str]", p.proc.args))[-1] == "--resume"
    assert (p.round, p.fresh, p.status) == (5, 0, Status.DONE)
    assert p.output is not None and p.output.error is None  # not this run's line


# ------------------------------------------------------------------- before anything starts

CLUSTER = """peers = 2
rounds = 4
device = "cpu"
[topology]
name = "ring"
[workload]
kind = "quadratic"
rows = 8
dim_in = 4
dim_out = 2
[[network.peers]]
id = 0
endpoint = "tcp://127.0.0.1:{p0}"
[[network.peers]]
id = 1
endpoint = "tcp://{host1}:{p1}"
"""


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 that something listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_file(tmp_path: Path, p1: int | None = None, host1: str = "127.0.0.1") -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER.format(p0=free_port(), p1=p1 or free_port(), host1=host1))
    return path


def last_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def previous(out: Path) -> None:
    (out / "peer-0").mkdir(parents=True)
    (out / "peer-0" / results.METRICS).write_text(json.dumps(row(0)) + "\n")
    (out / "summary.json").write_text("{}")
    (out / report.RUN_PLOTS[0]).write_bytes(b"")
    (out / "keys").mkdir()
    (out / "notes.txt").write_text("mine")


def test_an_out_folder_with_a_previous_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = cluster_file(tmp_path), tmp_path / "run"
    previous(out)
    assert cli.main(["launch", "--config", str(config), "--out", str(out)]) == 2
    assert last_error(capsys) == (
        f"error: --out={str(out)!r}: holds a previous run (summary.json, peer-0/): "
        "--resume continues it, --force clears it first"
    )
    assert (out / "peer-0" / results.METRICS).read_text() == json.dumps(row(0)) + "\n"  # untouched
    launch.check_out(load_config(config), out, resume=False, force=True)
    launch.check_out(load_config(config), tmp_path / "new", resume=False, force=False)
    removed = launch.clear_run(out)
    assert sorted(p.name for p in removed) == sorted(["peer-0", "summary.json", report.RUN_PLOTS[0]])
    assert sorted(p.name for p in out.iterdir()) == ["keys", "notes.txt"]


def test_resume_names_the_peers_without_a_checkpoint_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = cluster_file(tmp_path), tmp_path / "run"
    previous(out)
    argv = ["launch", "--config", str(config), "--out", str(out), "--resume"]
    assert cli.main(argv) == 2
    assert last_error(capsys) == (
        f"error: --resume: no checkpoint of peers 0, 1 in {out / 'peer-<i>' / 'checkpoint'}: "
        "nothing started (without --resume the run starts over)"
    )
    (out / "peer-0" / "checkpoint").mkdir()
    (out / "peer-0" / "checkpoint" / "peer-0.prev.pt").write_bytes(b"")  # the one before counts
    assert cli.main(argv) == 2
    assert "no checkpoint of peer 1 in" in last_error(capsys)
    assert not (out / "peer-1").exists() and (out / "summary.json").read_text() == "{}"


def test_a_taken_port_fails_in_one_line_naming_the_peer_before_anything_changes(
    tmp_path: Path, listener: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = cluster_file(tmp_path, p1=listener), tmp_path / "run"
    previous(out)
    assert cli.main(["launch", "--config", str(config), "--out", str(out), "--force"]) == 2
    assert last_error(capsys) == (
        f"error: peer 1 cannot bind tcp://127.0.0.1:{listener}: Address already in use "
        "(is another peer or launch running?); nothing started"
    )
    assert (out / "summary.json").is_file() and (out / "peer-0" / results.METRICS).is_file()  # kept


def test_the_port_check_skips_addresses_of_other_machines_and_refuses_shared_ports(tmp_path: Path) -> None:
    launch.check_ports(load_config(cluster_file(tmp_path, host1="192.0.2.1")))  # TEST-NET: not ours
    launch.check_ports(load_config(cluster_file(tmp_path, host1="localhost")))
    port = free_port()
    same = ", ".join(f'{{id = {i}, endpoint = "tcp://127.0.0.1:{port}"}}' for i in (0, 1))
    shared = load_config(cluster_file(tmp_path), [f"network.peers=[{same}]"])
    with pytest.raises(DemuonError, match=f"peers 0 and 1 both bind tcp://127.0.0.1:{port}"):
        launch.check_ports(shared)
    assert launch.tcp_address("tcp://[::1]:7000") == ("::1", 7000)
    assert launch.tcp_address("ipc:///tmp/x") is None


def test_every_must_be_a_positive_number_of_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["launch", "--config", "c.toml", "--out", "o", "--every", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "demuon launch: error: argument --every: expected a whole number ≥ 1, got 0"
    with pytest.raises(SystemExit):
        cli.main(["launch", "--config", "c.toml", "--out", "o", "--resume", "--force"])
    assert "not allowed with argument" in capsys.readouterr().err
