"""PNG plots of runs (matplotlib, headless Agg backend)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS: tuple[tuple[str, str, bool], ...] = (
    ("train_loss", "mean train loss", False),
    ("val_loss", "validation loss of the averaged model", False),
    ("consensus_error", "consensus error", True),
    ("bytes", "payload bytes sent per round (all peers)", True),
)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and v == v:
            xs.append(float(r["round"]))
            ys.append(float(v))
    return xs, ys


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> Path:
    """One figure, four panels (train loss, validation loss, consensus error, bytes), one line per run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, label, log) in zip(axes.flat, PANELS, strict=True):
        for name, rows in runs.items():
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, label=name, marker="o" if key == "val_loss" else None, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("round")
        if log and any(_series(rows, key)[1] for rows in runs.values()):
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
    per_peer: Mapping[int, Sequence[Mapping[str, Any]]],
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
