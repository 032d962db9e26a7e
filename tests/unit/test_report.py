"""`demuon report` on synthetic launch and simulate folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demuon import cli, report, results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_PEERS = 3
ROUNDS = 6


def write_launch_dir(root: Path) -> None:
    for i in range(N_PEERS):
        writer = results.MetricsWriter(root / f"peer-{i}" / "metrics.jsonl")
        for k in range(ROUNDS):
            writer.write(
                {
                    "round": k,
                    "train_loss": 2.0 / (k + 1) + 0.1 * i,
                    "bytes_out": 1000 * (i + 1),
                    "bytes_in": 1000,
                    "received": 2,
                    "missing": 1 if (i, k) == (1, 3) else 0,
                    "late": 1 if i == 2 else 0,
                    "stale_dropped": 0,
                    "duplicates": 0,
                    "down": 0,
                    "t_compute": 0.01,
                    "t_encode": 0.001,
                    "t_wait": 0.002,
                    "t_mix": 0.001,
                    "t_round": 0.015,
                    "local_disagreement": 1.0 / (k + 1),
                }
            )
        writer.close()
    peers = [results.peer_entry(i, ROUNDS - 1, 2.0 / ROUNDS + 0.1 * i, (1.0, 2.0)) for i in range(N_PEERS)]
    results.write_summary(
        root,
        results.summary(
            algorithm="demuon",
            topology="ring",
            rounds=ROUNDS,
            peers=peers,
            validation_loss=0.42,
            source="launch",
        ),
    )


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path


def test_report_on_a_launch_folder_prints_one_row_per_peer_and_writes_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_launch_dir(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 0
    for name in report.LAUNCH_PLOTS:
        assert_png(tmp_path / name)
    per_peer = report.launch_metrics(tmp_path)
    table = report.peer_table(per_peer, results.read_summary(tmp_path))
    assert table.row_count == N_PEERS
    out = capsys.readouterr().out
    assert "0.4200" in out  # validation loss of the average model
    assert "demuon report" in out


def test_totals_come_from_every_row_of_each_peer(tmp_path: Path) -> None:
    write_launch_dir(tmp_path)
    per_peer = report.launch_metrics(tmp_path)
    table = report.peer_table(per_peer, None)
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["MB sent"] == [f"{1000 * (i + 1) * ROUNDS / 1e6:.2f}" for i in range(N_PEERS)]
    assert cells["missing"] == ["0", "1", "0"]
    assert cells["late"] == ["0", "0", str(ROUNDS)]


def test_report_without_summary_still_plots(tmp_path: Path) -> None:
    write_launch_dir(tmp_path)
    (tmp_path / "summary.json").unlink()
    assert cli.main(["report", str(tmp_path)]) == 0
    for name in report.LAUNCH_PLOTS:
        assert_png(tmp_path / name)


def test_report_on_a_simulate_folder_explains_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for alg in ("demuon", "dsgd"):
        rows = [
            {
                "round": k,
                "train_loss": 1.0 / (k + 1),
                "val_loss": 0.5 if k == ROUNDS - 1 else None,
                "consensus_error": 0.1 / (k + 1),
                "bytes": 100,
            }
            for k in range(ROUNDS)
        ]
        (tmp_path / alg).mkdir()
        (tmp_path / alg / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "simulator output" in out
    assert "demuon" in out and "dsgd" in out
    assert_png(tmp_path / "report.png")


def test_report_on_an_empty_folder_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "neither" in capsys.readouterr().err
