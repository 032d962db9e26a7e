"""The plots of `demuon report` and `demuon simulate` (demuon/app/plots.py), checked on the figure
objects built from synthetic run folders: units in the labels, integer round ticks, the min–max
band, one fixed colour per algorithm, markers where messages went missing or neighbours were
down, and a validation curve for a launch folder (no cluster.jsonl) from the rows' ``val_loss``,
which the shared round driver writes alike in the simulator and the daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from demuon import results
from demuon.app import cli, plots, report, simulate
from demuon.config import load_config
from demuon.node.algorithms import NAMES
from demuon.node.daemon import DaemonStatus
from demuon.node.rounds import eval_due
from tests.support.cluster import CONFIGS, inproc_daemons
from tests.unit.test_report import metrics_row

N_PEERS = 4
ROUNDS = 30
EVAL_EVERY = 10
DOWN_AT = (12, 13)  # peer 2 sees peer 3 down
MISSING_AT = (11, 12, 13)  # peer 2 misses peer 3's messages
SILENT = 3, range(14, 18)  # peer 3 writes no rows in these rounds


def write_run(root: Path, *, source: str = "launch", algorithm: str = "demuon") -> None:
    """A run of ``N_PEERS`` peers: the rows a launch writes (with ``val_loss`` every
    ``EVAL_EVERY`` rounds and at the last), and for ``simulate`` also ``cluster.jsonl``."""
    silent_peer, silent_rounds = SILENT
    for i in range(N_PEERS):
        writer = results.MetricsWriter(results.peer_folder(root, i) / results.METRICS)
        for k in range(ROUNDS):
            if i == silent_peer and k in silent_rounds:
                continue
            evaluated = (k + 1) % EVAL_EVERY == 0 or k == ROUNDS - 1
            writer.write(
                metrics_row(
                    i,
                    k,
                    train_loss=3.0 / (k + 1) + 0.05 * i,
                    bytes_out=2_500_000 + 1000 * i,
                    bytes_in=2_500_000,
                    t_round=0.2 + 0.01 * i,
                    t_wait=0.05,
                    t_compute=0.1,
                    missing=(3,) if i == 2 and k in MISSING_AT else (),
                    down=(3,) if i == 2 and k in DOWN_AT else (),
                    local_disagreement=0.5 / (k + 1) ** 2,
                    val_loss=3.2 / (k + 1) + 0.02 * i if evaluated else None,
                )
            )
        writer.close()
    if source == "simulate":
        cluster = results.MetricsWriter(root / results.CLUSTER)
        for k in range(ROUNDS):
            evaluated = (k + 1) % EVAL_EVERY == 0 or k == ROUNDS - 1
            cluster.write(
                {
                    "round": k,
                    "train_loss": 3.0 / (k + 1),
                    "val_loss": 3.1 / (k + 1) if evaluated else None,
                    "consensus_error": 0.3 / (k + 1) ** 2,
                    "tracking_gap": None,
                    "bytes_out": 10_000_000,
                    "lr": 0.05,
                }
            )
        cluster.close()
    peers = [results.peer_entry(i, ROUNDS - 1, 0.1, (1.0, 2.0)) for i in range(N_PEERS)]
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
            validation_loss=0.2,
            averaged_peers=range(N_PEERS),
            wall_s=1.0,
        ),
    )


def series_of(root: Path) -> list[dict[str, Any]]:
    return results.run_series(results.read_per_peer(root), results.read_cluster(root))


def lines(ax: Axes) -> list[Line2D]:
    return [line for line in ax.get_lines() if not str(line.get_label()).startswith("_")]


def bands(ax: Axes) -> list[PolyCollection]:
    return [c for c in ax.collections if isinstance(c, PolyCollection) and c.get_gid() != "event-silent"]


def colour(artist: Any) -> str:
    if isinstance(artist, Line2D):
        return to_hex(artist.get_color())
    return to_hex(artist.get_facecolor()[0], keep_alpha=False)


def data(line: Line2D, axis: str = "x") -> list[float]:
    values = line.get_xdata() if axis == "x" else line.get_ydata()
    return [float(v) for v in np.asarray(values, dtype=float)]


def events(ax: Axes, key: str) -> list[float]:
    return [x for line in ax.get_lines() if line.get_gid() == f"event-{key}" for x in data(line)]


def assert_integer_rounds(ax: Axes) -> None:
    assert ax.get_xlabel() == "round"
    locator = ax.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator)
    ticks = [t for t in locator.tick_values(0, 7) if 0 <= t <= 7]
    assert all(float(t).is_integer() for t in ticks), ticks


def test_every_algorithm_has_its_own_fixed_colour() -> None:
    assert set(plots.ALGORITHM_COLOURS) == set(NAMES)
    assert len(set(plots.ALGORITHM_COLOURS.values())) == len(NAMES)
    assert not set(plots.OTHER_COLOURS) & set(plots.ALGORITHM_COLOURS.values())
    assert plots.EVENT_COLOUR not in plots.ALGORITHM_COLOURS.values()
    assert plots.colour_of("whatever", "dsgd") == plots.ALGORITHM_COLOURS["dsgd"]
    assert plots.colour_of("gt_dsgd (lr 0.1)") == plots.ALGORITHM_COLOURS["gt_dsgd"]
    assert plots.colour_of("dsgd_clip") == plots.ALGORITHM_COLOURS["dsgd_clip"]
    assert plots.colour_of("cluster") in plots.OTHER_COLOURS


@pytest.mark.parametrize("source", ["launch", "simulate"])
def test_the_run_figure_has_units_bands_integer_rounds_and_events(tmp_path: Path, source: str) -> None:
    write_run(tmp_path, source=source, algorithm="gt_nsgdm")
    fig = plots.figure_runs({"run": series_of(tmp_path)}, "title", algorithms={"run": "gt_nsgdm"})
    try:
        loss, val, cons, sent = fig.axes[:4]
        mine = to_hex(plots.ALGORITHM_COLOURS["gt_nsgdm"])
        for ax in (loss, val, cons, sent):
            assert_integer_rounds(ax)
        assert "train loss" in loss.get_ylabel() and "validation" not in loss.get_ylabel()
        assert "validation loss" in val.get_ylabel() and "train" not in val.get_ylabel()
        assert not [line for line in lines(val) if "train" in str(line.get_label())]
        assert sent.get_ylabel() == "sent per round (MB)" and sent.get_yscale() == "linear"
        assert sent.get_ylim()[0] == 0
        assert cons.get_yscale() == "log" and cons.get_ylabel().endswith("(log)")
        assert ("consensus error" if source == "simulate" else "local disagreement") in cons.get_ylabel()

        (train_band,) = bands(loss)  # the min–max band over peers
        assert colour(train_band) == mine
        assert colour(lines(loss)[0]) == mine
        assert events(loss, "missing") == list(MISSING_AT)
        assert events(loss, "down") == list(DOWN_AT)
        silent = [c for c in loss.patches if c.get_gid() == "event-silent"]
        assert len(silent) == 1  # the four rounds of peer 3's silence, in one span

        labels = [str(line.get_label()) for line in lines(val)]
        own = next(line for line in lines(val) if "own model" in str(line.get_label()))
        assert data(own) == [9, 19, 29]  # every eval_every rounds and the last
        assert bands(val) and colour(bands(val)[0]) == mine
        assert any("averaged model" in label for label in labels) == (source == "simulate")
    finally:
        plt.close(fig)


def test_a_launch_folder_gets_a_validation_curve_from_its_rows(tmp_path: Path) -> None:
    write_run(tmp_path, source="launch")
    assert not (tmp_path / results.CLUSTER).exists()
    series = series_of(tmp_path)
    assert [r["round"] for r in series if r["peer_val_loss"] is not None] == [9, 19, 29]
    at_9 = series[9]
    assert at_9["peer_val_loss_min"] == pytest.approx(0.32)
    assert at_9["peer_val_loss_max"] == pytest.approx(0.32 + 0.02 * (N_PEERS - 1))
    assert [r["reporting"] for r in series[13:19]] == [4, 3, 3, 3, 3, 4]

    assert cli.main(["report", str(tmp_path)]) == 0
    for name in report.RUN_PLOTS:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_runs_of_several_algorithms_keep_their_colours_in_every_panel(tmp_path: Path) -> None:
    runs = {}
    for alg in ("dsgd", "demuon"):
        write_run(tmp_path / alg, source="simulate", algorithm=alg)
        runs[alg] = series_of(tmp_path / alg)
    fig = plots.figure_runs(runs, "two")
    try:
        for ax in fig.axes[:4]:
            for line in lines(ax):
                if str(line.get_gid()).startswith("event-"):
                    continue
                label = str(line.get_label())
                alg = label.split(":")[0]
                assert colour(line) == to_hex(plots.ALGORITHM_COLOURS[alg]), (ax.get_title(), label)
        markers = [x for x in fig.axes[0].get_lines() if x.get_gid() == "event-missing"]
        assert [colour(x) for x in markers] == [to_hex(plots.ALGORITHM_COLOURS[a]) for a in runs]
        names = [label for label in fig.axes[0].get_legend_handles_labels()[1] if "missing" in label]
        assert names == ["messages missing"]  # each run's events in its colour, named once
    finally:
        plt.close(fig)


def test_per_peer_figures_draw_the_mean_with_a_band_thin_peers_and_units(tmp_path: Path) -> None:
    write_run(tmp_path)
    per_peer = results.read_per_peer(tmp_path)
    mine = to_hex(plots.ALGORITHM_COLOURS["dsgd"])
    fig = plots.figure_per_peer(
        per_peer, "train_loss", title="t", ylabel="train loss", algorithm="dsgd", events=True
    )
    try:
        (ax,) = fig.axes
        assert_integer_rounds(ax)
        mean = next(line for line in lines(ax) if str(line.get_label()).startswith("mean over"))
        assert mean.get_label() == f"mean over {N_PEERS} peers" and colour(mean) == mine
        assert mean.get_linewidth() > 1
        thin = [line for line in ax.get_lines() if line.get_linewidth() < 1]
        assert len(thin) == N_PEERS
        assert len(bands(ax)) == 1
        assert events(ax, "missing") == list(MISSING_AT) and events(ax, "down") == list(DOWN_AT)
        assert ax.get_yscale() == "log"  # 3.0 .. 0.1: more than a decade
        assert ax.get_ylabel() == "train loss (log)"
    finally:
        plt.close(fig)

    fig = plots.figure_traffic(per_peer, title="t", algorithm="dsgd")
    try:
        left, right = fig.axes
        assert left.get_ylabel() == "sent so far (MB)" and right.get_ylabel() == "send rate (MB/s)"
        first = next(line for line in lines(right) if str(line.get_label()).startswith("mean"))
        assert data(first, "y")[0] == pytest.approx(
            sum((2.5 + 0.001 * i) / (0.2 + 0.01 * i) for i in range(4)) / 4
        )
        assert all(colour(line) == mine for line in right.get_lines())
    finally:
        plt.close(fig)

    fig = plots.figure_timing(per_peer, title="t")
    try:
        (ax,) = fig.axes
        assert ax.get_ylabel() == "time per round (s)"
        assert_integer_rounds(ax)
    finally:
        plt.close(fig)


def test_rows_without_events_draw_no_event_markers(tmp_path: Path) -> None:
    writer = results.MetricsWriter(results.peer_folder(tmp_path, 0) / results.METRICS)
    for k in range(5):
        writer.write(metrics_row(0, k, train_loss=1.0 + k))
    writer.close()
    fig: Figure = plots.figure_runs({"x": series_of(tmp_path)}, "t")
    try:
        ax = fig.axes[0]
        assert not events(ax, "missing") and not events(ax, "down")
        assert not [p for p in ax.patches if p.get_gid() == "event-silent"]
        assert fig.axes[1].texts and fig.axes[1].texts[0].get_text() == "not measured in this run"
    finally:
        plt.close(fig)


def test_matplotlib_is_headless() -> None:
    assert matplotlib.get_backend().lower() == "agg"


def test_eval_due_every_n_rounds_and_at_the_last() -> None:
    assert [k for k in range(25) if eval_due(k, 25, 10)] == [9, 19, 24]
    assert [k for k in range(5) if eval_due(k, 5, 1)] == [0, 1, 2, 3, 4]
    assert not any(eval_due(k, 5, 0) for k in range(5))


async def test_daemons_and_the_simulator_write_the_same_val_loss_and_evaluating_changes_nothing(
    tmp_path: Path,
) -> None:
    config = load_config(CONFIGS / "oracle-ring4.toml", ["eval_every=7"])
    daemons = inproc_daemons(config, tmp_path)
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * config.peers
    for d in daemons:
        await d.close()
    sim = simulate.run(config)
    quiet = simulate.run(config.model_copy(update={"eval_every": 10_000}))  # only the last round
    evaluated = [6, 13, 19]
    for i, ref in enumerate(sim.peers):
        rows = results.read_metrics(tmp_path / f"peer-{i}" / results.METRICS)
        got = [(r["round"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        want = [(r["round"], r["val_loss"]) for r in sim.per_peer[i] if r["val_loss"] is not None]
        assert [k for k, _ in want] == evaluated
        assert got == want  # bitwise: the same parameters, the same fixed validation data
        assert [r["round"] for r in quiet.per_peer[i] if r["val_loss"] is not None] == [19]
        assert ref.fingerprint() == quiet.peers[i].fingerprint()
        final = torch.load(tmp_path / f"peer-{i}" / "final.pt", weights_only=True)
        assert all(torch.equal(final[n], ref.params[n].detach()) for n in ref.names)
    assert quiet.per_peer[0][-1]["val_loss"] == sim.per_peer[0][-1]["val_loss"]


def test_the_loss_against_bytes_figure_puts_each_peers_bytes_so_far_on_x(tmp_path: Path) -> None:
    write_run(tmp_path, source="simulate")
    fig = plots.figure_loss_vs_bytes({"run": series_of(tmp_path)}, "t")
    ax_train, ax_val = fig.axes
    (train,) = lines(ax_train)
    xs = data(train)
    # round k: every reporting peer sent 2.5 MB + 1000·i bytes; the x axis is the running mean
    per_round = [
        sum(2_500_000 + 1000 * i for i in range(N_PEERS) if not (i == SILENT[0] and k in SILENT[1]))
        / (N_PEERS - (k in SILENT[1]))
        for k in range(ROUNDS)
    ]
    assert xs == pytest.approx([sum(per_round[: k + 1]) / 1e6 for k in range(ROUNDS)])
    assert data(train, "y")[0] == pytest.approx(sum(3.0 + 0.05 * i for i in range(N_PEERS)) / N_PEERS)
    assert "MB" in ax_train.get_xlabel() and "keyframes" in ax_train.get_xlabel()
    (val,) = lines(ax_val)  # the averaged model's validation loss, where measured
    assert len(data(val)) == ROUNDS // EVAL_EVERY
    plt.close(fig)
    assert "loss_bytes.png" in report.RUN_PLOTS
