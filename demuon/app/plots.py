"""PNG plots of runs (matplotlib, headless Agg backend; layer 6).

Every plot reads the one schema of :mod:`demuon.results`: :func:`demuon.results.run_series` rows
for a run (simulate and launch alike) and per-peer ``metrics.jsonl`` rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

Rows = Sequence[Mapping[str, Any]]

#: (key, title, log scale) of the four panels of a run plot.
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("train_loss", "train loss (mean over peers, min–max band)", False),
    ("val_loss", "validation loss of the averaged model", False),
    ("consensus_error", "consensus error (simulator) / mean local disagreement (cluster)", True),
    ("bytes_out", "bytes sent per round, all peers (headers included)", True),
)


def _series(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and v == v:
            xs.append(float(r["round"]))
            ys.append(float(v))
    return xs, ys


def _panel_key(rows: Rows, key: str) -> str:
    """A launch has no consensus error: show the mean local disagreement instead."""
    if key == "consensus_error" and not _series(rows, key)[0]:
        return "local_disagreement"
    return key


def plot_runs(runs: Mapping[str, Rows], path: Path, title: str) -> Path:
    """One figure, four panels (:data:`PANELS`), one line per run (``run_series`` rows)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, label, log) in zip(axes.flat, PANELS, strict=True):
        drawn = False
        for name, rows in runs.items():
            shown = _panel_key(rows, key)
            xs, ys = _series(rows, shown)
            if not xs:
                continue
            drawn = True
            (line,) = ax.plot(xs, ys, label=name, marker="o" if key == "val_loss" else None, markersize=3)
            if key == "train_loss":
                lo, hi = _series(rows, "train_loss_min"), _series(rows, "train_loss_max")
                if lo[0] and len(lo[0]) == len(hi[0]):
                    ax.fill_between(lo[0], lo[1], hi[1], color=line.get_color(), alpha=0.15)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not drawn:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        elif log:
            ax.set_yscale(
                "symlog" if key == "consensus_error" else "log",
                **({"linthresh": 1e-6} if key == "consensus_error" else {}),
            )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return save(fig, path)


def plot_per_peer(
    per_peer: Mapping[int, Rows],
    key: str,
    path: Path,
    *,
    title: str,
    ylabel: str,
    log: bool = False,
    cumulative: bool = False,
) -> Path:
    """One line per peer of ``key`` against the round (optionally its running total)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn: list[float] = []
    for peer, rows in sorted(per_peer.items()):
        xs, ys = _series(rows, key)
        if cumulative:
            ys = list(itertools.accumulate(ys))
        if xs:
            ax.plot(xs, ys, label=f"peer {peer}", linewidth=1)
            drawn += ys
    if not drawn:
        ax.text(0.5, 0.5, f"no '{key}' in the metrics", ha="center", va="center", transform=ax.transAxes)
    elif log and min(drawn) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    return save(fig, path)


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders made as needed) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
