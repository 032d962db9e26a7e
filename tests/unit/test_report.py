"""`demuon report` on synthetic run folders: one code path for launch and simulate folders
(``peer-<i>/metrics.jsonl`` + ``summary.json``, and ``cluster.jsonl`` from the simulator), and a
folder of several runs (``demuon simulate --algorithms a,b --out DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from demuon import results
from demuon.app import cli, report
from demuon.node.rounds import ROW_KEYS, RoundMetrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_PEERS = 3
ROUNDS = 6


def metrics_row(peer: int, k: int, **values: Any) -> dict[str, Any]:
    """One ``metrics.jsonl`` row with every key of the schema (built through RoundMetrics): zero
    counters and timings, no validation, unless given."""
    base: dict[str, Any] = dict.fromkeys(ROW_KEYS, 0)
    base.update(peer=peer, round=k, train_loss=1.0, lr=0.05, received=2, missing=(), down=())
    base.update(keyframe=False, deadline_s=1.0, local_disagreement=None, sum_V=None, sum_M=None)
    base.update(val_loss=None)
    return RoundMetrics(**{**base, **values}).row()


def write_run(root: Path, source: str = "launch", algorithm: str = "demuon", val: float = 0.42) -> None:
    """A run folder of ``N_PEERS`` peers and ``ROUNDS`` rounds, as ``source`` writes it."""
    for i in range(N_PEERS):
        writer = results.MetricsWriter(results.peer_folder(root, i) / results.METRICS)
        for k in range(ROUNDS):
            writer.write(
                metrics_row(
                    i,
                    k,
                    train_loss=2.0 / (k + 1) + 0.1 * i,
                    bytes_out=1000 * (i + 1),
                    bytes_in=1000,
                    missing=(0,) if (i, k) == (1, 3) else (),
                    late=1 if i == 2 else 0,
                    local_disagreement=1.0 / (k + 1),
                )
            )
        writer.close()
    if source == "simulate":
        cluster = results.MetricsWriter(root / results.CLUSTER)
        for k in range(ROUNDS):
            cluster.write(
                {
                    "round": k,
                    "train_loss": 2.0 / (k + 1) + 0.1,
                    "val_loss": val if k == ROUNDS - 1 else None,
                    "consensus_error": 0.125 / (k + 1),
                    "tracking_gap": None,
                    "bytes_out": 6000,
                    "lr": 0.05,
                }
            )
        cluster.close()
    peers = [results.peer_entry(i, ROUNDS - 1, 2.0 / ROUNDS + 0.1 * i, (1.0, 2.0)) for i in range(N_PEERS)]
    results.write_summary(
        root,
        results.summary(
            source=source,
            algorithm=algorithm,
            topology="ring",
            codec="identity",
            lr=0.05,
            dtype="float32",
            rounds=ROUNDS,
            peers=peers,
            validation_loss=val,
            averaged_peers=range(N_PEERS),
            wall_s=1.0,
        ),
    )


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path


@pytest.mark.parametrize("source", ["launch", "simulate"])
def test_report_on_a_run_folder_prints_one_row_per_peer_and_writes_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str
) -> None:
    write_run(tmp_path, source)
    assert cli.main(["report", str(tmp_path)]) == 0
    for name in report.RUN_PLOTS:
        assert_png(tmp_path / name)
    per_peer = results.read_per_peer(tmp_path)
    table = report.peer_table(per_peer, results.read_summary(tmp_path))
    assert table.row_count == N_PEERS
    out = capsys.readouterr().out
    assert "0.4200" in out  # validation loss of the average model
    assert "demuon report" in out


def test_totals_come_from_every_row_of_each_peer(tmp_path: Path) -> None:
    write_run(tmp_path)
    per_peer = results.read_per_peer(tmp_path)
    table = report.peer_table(per_peer, None)
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["MB sent"] == [f"{1000 * (i + 1) * ROUNDS / 1e6:.2f}" for i in range(N_PEERS)]
    assert cells["missing"] == ["0", "1", "0"]
    assert cells["late"] == ["0", "0", str(ROUNDS)]


def test_report_without_summary_still_plots(tmp_path: Path) -> None:
    write_run(tmp_path)
    (tmp_path / "summary.json").unlink()
    assert cli.main(["report", str(tmp_path)]) == 0
    for name in report.RUN_PLOTS:
        assert_png(tmp_path / name)


def test_report_on_a_folder_of_several_runs_reports_each_and_compares_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for alg, val in (("demuon", 0.5), ("dsgd", 0.75)):
        write_run(tmp_path / alg, "simulate", alg, val)
    assert cli.main(["report", str(tmp_path)]) == 0
    for alg in ("demuon", "dsgd"):
        for name in report.RUN_PLOTS:
            assert_png(tmp_path / alg / name)
    assert_png(tmp_path / "plot.png")  # all runs in one plot
    out = capsys.readouterr().out
    assert "demuon report — runs" in out and "demuon" in out and "dsgd" in out
    assert "0.5000" in out and "0.7500" in out

    runs = {
        alg: (
            results.run_series(results.read_per_peer(tmp_path / alg), results.read_cluster(tmp_path / alg)),
            results.read_summary(tmp_path / alg),
        )
        for alg in ("demuon", "dsgd")
    }
    table = report.run_table(runs)
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["run"] == ["demuon", "dsgd"]
    assert cells["rounds"] == [str(ROUNDS)] * 2
    assert cells["consensus error"] == [f"{0.125 / ROUNDS:.3g}"] * 2  # from cluster.jsonl
    assert cells["MB"] == [f"{sum(1000 * (i + 1) for i in range(N_PEERS)) * ROUNDS / 1e6:.2f}"] * 2


def test_report_on_an_empty_folder_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "neither" in capsys.readouterr().err
