"""``demuon report DIR``: a table and PNG plots of a finished (or interrupted) run (layer 6).

A run folder is what both ``demuon launch --out DIR`` and ``demuon simulate --out DIR`` write
(:mod:`demuon.results`): ``peer-<i>/metrics.jsonl`` with the same row keys, ``summary.json``, and
for the simulator also ``cluster.jsonl``. One code path reads both: a table per peer (final round,
final loss, MB sent, late/missing/stale totals, status; the validation loss of the averaged model
below) and, in ``DIR``, :data:`RUN_PLOTS`: ``plot.png`` (train loss with its min–max band over
peers and the rounds where messages went missing or neighbours were down, validation loss of the
averaged model and of the peers' own models, consensus error or the mean local disagreement, MB
per round), ``loss.png`` (train loss: mean over peers, band, each peer thin, the same events),
``disagreement.png`` (local disagreement), ``bytes.png`` (MB sent so far and MB/s per peer),
``loss_bytes.png`` (train and validation loss against the MB each peer has sent) and
``time.png`` (seconds per round, waits and gradient). Every plot draws the run in its algorithm's
colour (:data:`demuon.app.plots.ALGORITHM_COLOURS`). A folder of several runs (``demuon simulate
--algorithms a,b``) gets each run's report, a table with a row per run, and a ``plot.png`` and a
``loss_bytes.png`` of all.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from demuon import results

RUN_PLOTS = ("plot.png", "loss.png", "disagreement.png", "bytes.png", "loss_bytes.png", "time.png")

Rows = Sequence[Mapping[str, Any]]


def _summary(directory: Path) -> dict[str, Any] | None:
    try:
        return results.read_summary(directory)
    except (FileNotFoundError, ValueError):
        return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None


def _total(rows: Rows, key: str) -> float:
    total = 0.0
    for r in rows:
        v = r.get(key)
        if isinstance(v, list | tuple):
            total += len(v)
        elif (n := _num(v)) is not None:
            total += n
    return total


def _f(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def run_folders(directory: Path) -> dict[str, Path]:
    """``{name: folder}`` of the runs in ``directory``: itself, or its subfolders that are runs."""
    if results.read_per_peer(directory):
        return {directory.name: directory}
    return {
        sub.name: sub for sub in sorted(directory.iterdir()) if sub.is_dir() and results.read_per_peer(sub)
    }


def peer_table(per_peer: Mapping[int, Rows], summary: Mapping[str, Any] | None) -> Table:
    """One row per peer; the summary (if any) supplies final round/loss and status."""
    entries = {int(p["id"]): p for p in (summary or {}).get("peers", [])}
    val = _num(((summary or {}).get("average") or {}).get("validation_loss"))
    caption = f"validation loss of the averaged model: {_f(val)}"
    table = Table(title="demuon report — per peer", caption=caption)
    for col in ("peer", "final round", "final loss", "MB sent", "late", "missing", "stale", "status"):
        table.add_column(col, justify="right")
    for peer in sorted(set(per_peer) | set(entries)):
        rows = per_peer.get(peer, [])
        entry = entries.get(peer, {})
        last = rows[-1] if rows else {}
        final_round = entry.get("final_round", last.get("round"))
        loss = _num(entry.get("final_train_loss", last.get("train_loss")))
        table.add_row(
            str(peer),
            "—" if final_round is None else str(final_round),
            _f(loss),
            f"{_total(rows, 'bytes_out') / 1e6:.2f}",
            f"{_total(rows, 'late'):.0f}",
            f"{_total(rows, 'missing'):.0f}",
            f"{_total(rows, 'stale_dropped'):.0f}",
            str(entry.get("status") or "—"),
        )
    return table


def run_table(
    runs: Mapping[str, tuple[Rows, Mapping[str, Any] | None]],  # name → (run_series rows, summary)
    title: str = "demuon report — runs",
) -> Table:
    """One row per run: η, rounds, final train loss, validation loss of the averaged model,
    consensus error (simulator runs), MB sent by all peers (``demuon simulate`` prints it too)."""
    table = Table(title=title)
    columns = (
        "run",
        "η",
        "rounds",
        "final train loss",
        "val loss (average model)",
        "consensus error",
        "MB",
        "MB / peer",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for name, (rows, summary) in runs.items():
        summary = summary or {}
        last = rows[-1] if rows else {}
        table.add_row(
            name,
            _f(_num(summary.get("lr")), "g"),
            str(len(rows)),
            _f(_num(last.get("train_loss"))),
            _f(_num((summary.get("average") or {}).get("validation_loss"))),
            _f(_num(last.get("consensus_error")), ".3g"),
            f"{_total(rows, 'bytes_out') / 1e6:.2f}",
            _f(_mb_per_peer(rows, summary), ".2f"),
        )
    return table


def _mb_per_peer(rows: Rows, summary: Mapping[str, Any]) -> float | None:
    """MB each peer sent, on average: the summary's ``bytes`` (as the peers sent them), else the
    series' total over the most peers that reported a round."""
    per_peer = _num((summary.get("bytes") or {}).get("out_per_peer"))
    if per_peer is not None:
        return per_peer / 1e6
    peers = max((int(r.get("reporting") or 0) for r in rows), default=0)
    return _total(rows, "bytes_out") / 1e6 / peers if peers else None


def report_run(directory: Path, console: Console) -> tuple[list[Path], list[dict[str, Any]]]:
    """The table and :data:`RUN_PLOTS` of one run folder. Returns (files written, its series)."""
    from demuon.app import plots

    per_peer = results.read_per_peer(directory)
    summary = _summary(directory)
    if summary is None:
        console.print(
            f"[yellow]note:[/yellow] no valid {directory / 'summary.json'} (run killed?); "
            "`demuon report DIR --config FILE` rebuilds a launch's from the peers' files"
        )
    console.print(peer_table(per_peer, summary))
    series = results.run_series(per_peer, results.read_cluster(directory))
    val = _num(((summary or {}).get("average") or {}).get("validation_loss"))
    if series and val is not None and all(r["val_loss"] is None for r in series):
        series[-1]["val_loss"] = val  # a launch measures the averaged model once, at the end
    what = f"{summary['algorithm']} on {summary['topology']}, " if summary else ""
    title = f"{what}{len(per_peer)} peers ({(summary or {}).get('source', 'unknown source')})"
    algorithm = (summary or {}).get("algorithm")
    written = [
        plots.plot_runs(
            {directory.name: series},
            directory / "plot.png",
            title,
            algorithms={directory.name: algorithm} if algorithm else None,
        ),
        plots.plot_per_peer(
            per_peer,
            "train_loss",
            directory / "loss.png",
            title=f"train loss – {title}",
            ylabel="train loss",
            algorithm=algorithm,
            events=True,
        ),
        plots.plot_per_peer(
            per_peer,
            "local_disagreement",
            directory / "disagreement.png",
            title=f"local disagreement, a consensus proxy – {title}",
            ylabel="‖Y_i − X_i after mixing‖",
            log=True,
            algorithm=algorithm,
        ),
        plots.save(plots.figure_traffic(per_peer, title=title, algorithm=algorithm), directory / "bytes.png"),
        plots.plot_loss_vs_bytes(
            {directory.name: series},
            directory / "loss_bytes.png",
            f"loss against bytes sent – {title}",
            algorithms={directory.name: algorithm} if algorithm else None,
        ),
        plots.save(
            plots.figure_timing(per_peer, title=f"time per round – {title}", algorithm=algorithm),
            directory / "time.png",
        ),
    ]
    return written, series


def cmd_report(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    console = Console()
    err = Console(stderr=True)
    if not directory.is_dir():
        err.print(f"[red]error:[/red] {directory} is not a folder")
        return 2
    folders = run_folders(directory)
    if not folders:
        err.print(
            f"[red]error:[/red] {directory} has no peer-<i>/metrics.jsonl (from `demuon launch` or "
            "`demuon simulate --out`), neither itself nor in a subfolder"
        )
        return 2
    if args.config is not None and len(folders) == 1 and _summary(directory) is None:
        from demuon.app.summary import launch_summary
        from demuon.config import load_config

        config = load_config(args.config, args.set)
        results.write_summary(directory, launch_summary(config, directory))
    written: list[Path] = []
    runs: dict[str, tuple[Rows, Mapping[str, Any] | None]] = {}
    for name, folder in folders.items():
        files, series = report_run(folder, console)
        written += files
        runs[name] = (series, _summary(folder))
    if len(folders) > 1:
        from demuon.app import plots

        console.print(run_table(runs))
        series_only = {name: rows for name, (rows, _) in runs.items()}
        algorithms = {name: str(s["algorithm"]) for name, (_, s) in runs.items() if s and s.get("algorithm")}
        written.append(
            plots.plot_runs(
                series_only, directory / "plot.png", f"runs in {directory.name}", algorithms=algorithms
            )
        )
        written.append(
            plots.plot_loss_vs_bytes(
                series_only,
                directory / "loss_bytes.png",
                f"loss against bytes sent – runs in {directory.name}",
                algorithms=algorithms,
            )
        )
    err.print("wrote " + ", ".join(str(p) for p in written))
    return 0
