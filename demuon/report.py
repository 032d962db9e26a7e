"""``demuon report DIR``: a table and PNG plots of a finished (or interrupted) run (layer 6).

A ``demuon launch`` folder (``DIR/peer-<i>/metrics.jsonl`` + ``DIR/summary.json``) gives a table
per peer (final round, final loss, bytes sent, late/missing totals, validation loss of the average
model) and four plots in ``DIR``: ``loss.png`` (train loss per peer), ``average.png`` (final train
loss per peer against the validation loss of the averaged model), ``disagreement.png`` (local
disagreement, the consensus proxy, per peer) and ``bytes.png`` (cumulative bytes sent per peer).

A ``demuon simulate`` folder (one ``metrics.jsonl``, or one subfolder per algorithm) has no
per-peer rows; it gets a per-run table and ``report.png`` (the simulator's four panels).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from rich.console import Console
from rich.table import Table

from demuon import plots, results
from demuon.config import Config

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PEER_DIR = re.compile(r"^peer-(\d+)$")
LAUNCH_PLOTS = ("loss.png", "average.png", "disagreement.png", "bytes.png")

PerPeer = dict[int, list[dict[str, Any]]]


def launch_metrics(directory: Path) -> PerPeer:
    """``{peer id: rows}`` for every ``peer-<i>/metrics.jsonl`` under ``directory``."""
    out: PerPeer = {}
    for sub in directory.iterdir():
        m = PEER_DIR.match(sub.name)
        if m and sub.is_dir():
            path = sub / "metrics.jsonl"
            out[int(m.group(1))] = results.read_metrics(path) if path.is_file() else []
    return dict(sorted(out.items()))


def simulate_runs(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """``{run name: rows}`` for a simulator folder: itself, or one subfolder per algorithm."""
    if (directory / "metrics.jsonl").is_file():
        return {directory.name: results.read_metrics(directory / "metrics.jsonl")}
    return {
        sub.name: results.read_metrics(sub / "metrics.jsonl")
        for sub in sorted(directory.iterdir())
        if sub.is_dir() and (sub / "metrics.jsonl").is_file()
    }


def _summary(directory: Path) -> dict[str, Any] | None:
    try:
        return results.read_summary(directory)
    except (FileNotFoundError, ValueError):
        return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None


def _total(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    return sum(v for r in rows if (v := _num(r.get(key))) is not None)


def _f(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


# ------------------------------------------------------------------ a launch folder's summary


def average_validation_loss(config: Config, states: Sequence[Mapping[str, Any]]) -> float | None:
    """Validation loss of the averaged model of a launch (None without any peer's tensors)."""
    import torch

    from demuon.simulate import averaged_validation_loss
    from demuon.workloads import make_workload

    if not states:
        return None
    workload = make_workload(config.workload, seed=config.seed, device=torch.device("cpu"))
    return averaged_validation_loss(workload, config.seed, states)


def peer_final(config: Config, directory: Path, peer: int) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
    """Peer ``peer``'s summary entry and final tensors, from the best source its folder has:
    ``final.json``/``final.pt`` (it finished), else its checkpoint (it was stopped), else the last
    ``metrics.jsonl`` row (no tensors). The entry's ``from`` names the source."""
    import torch

    from demuon.errors import CheckpointError
    from demuon.node.checkpoint import load_checkpoint
    from demuon.node.peer import fingerprint

    folder = directory / f"peer-{peer}"
    rows = results.read_metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    if (folder / "final.json").is_file():
        data = json.loads((folder / "final.json").read_text())
        fp, loss = data["fingerprint"], data.get("final_train_loss")
        entry = results.peer_entry(
            peer, int(data["final_round"]), _nan(loss), (_nan(fp["sum"]), _nan(fp["l2"]))
        )
        pt = folder / "final.pt"
        state = torch.load(pt, map_location="cpu", weights_only=True) if pt.is_file() else None
        return {**entry, "from": "final"}, state
    try:
        blob = load_checkpoint(config.checkpoint.dir or folder / "checkpoint", peer, config)
    except CheckpointError:
        blob = None
    if blob is not None:
        k, state = int(blob["round"]), blob["state"]["model"]
        loss = next((r.get("train_loss") for r in reversed(rows) if r.get("round") == k), None)
        entry = results.peer_entry(peer, k, _nan(loss), fingerprint(list(state.values())))
        return {**entry, "from": "checkpoint"}, state
    last = rows[-1] if rows else {}
    entry = results.peer_entry(
        peer, int(last.get("round", -1)), _nan(last.get("train_loss")), (math.nan,) * 2
    )
    return {**entry, "from": "metrics" if rows else "none"}, None


def launch_summary(
    config: Config,
    directory: Path,
    statuses: Mapping[int, Mapping[str, Any]] | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The shared summary (``source="launch"``) of a launch folder, with the validation loss of
    the average of every peer's final (or checkpointed) parameters. ``statuses`` adds per-peer
    fields (e.g. ``status``, ``exit_code``) from whoever watched the processes."""
    entries, states = [], {}
    for i in range(config.peers):
        entry, state = peer_final(config, directory, i)
        entries.append({**entry, **(statuses or {}).get(i, {})})
        if state is not None:
            states[i] = state
    try:
        val = average_validation_loss(config, list(states.values()))
    except (KeyError, RuntimeError) as exc:  # tensors that do not fit the config's workload
        Console(stderr=True).print(f"[yellow]warning:[/yellow] validation of the average failed: {exc}")
        val = None
    return results.summary(
        algorithm=config.algorithm.name,
        topology=config.topology.name,
        rounds=config.rounds,
        peers=entries,
        validation_loss=val,
        source="launch",
        extra={"codec": config.gossip.codec.kind, "averaged_peers": sorted(states), **(extra or {})},
    )


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


# ------------------------------------------------------------------ tables and plots


def peer_table(per_peer: PerPeer, summary: Mapping[str, Any] | None) -> Table:
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
            str(entry.get("status") or (f"from {entry['from']}" if "from" in entry else "—")),
        )
    return table


def run_table(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],  # run name → metrics rows
    summaries: Mapping[str, Mapping[str, Any] | None],  # run name → its summary.json, if any
    title: str = "demuon report — simulator runs",
) -> Table:
    """One row per simulator run: η, rounds, final train loss, validation loss of the averaged
    model, consensus error, payload MB (``demuon simulate`` prints it; so does ``report``)."""
    table = Table(title=title)
    columns = ("run", "η", "rounds", "final train loss", "val loss (average model)", "consensus error", "MB")
    for col in columns:
        table.add_column(col, justify="right")
    for name, rows in runs.items():
        summary = summaries.get(name) or {}
        last = rows[-1] if rows else {}
        table.add_row(
            name,
            _f(_num(summary.get("lr")), "g"),
            str(len(rows)),
            _f(_num(last.get("train_loss"))),
            _f(_num((summary.get("average") or {}).get("validation_loss"))),
            _f(_num(last.get("consensus_error")), ".3g"),
            f"{_total(rows, 'bytes') / 1e6:.2f}",
        )
    return table


def plot_average(per_peer: PerPeer, summary: Mapping[str, Any] | None, path: Path) -> Path:
    """Final train loss of each peer (bars) and the averaged model's validation loss (line)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    entries = {int(p["id"]): p for p in (summary or {}).get("peers", [])}
    ids = sorted(set(per_peer) | set(entries))
    losses = []
    for i in ids:
        last = per_peer.get(i, [{}])[-1] if per_peer.get(i) else {}
        losses.append(_num(entries.get(i, {}).get("final_train_loss", last.get("train_loss"))) or 0.0)
    ax.bar([str(i) for i in ids], losses, color="tab:blue", alpha=0.6, label="final train loss (own model)")
    val = _num(((summary or {}).get("average") or {}).get("validation_loss"))
    if val is not None:
        ax.axhline(val, color="tab:red", linestyle="--", label=f"validation loss of the average: {val:.4f}")
    else:
        ax.set_title("no validation loss of the average in summary.json")
    ax.set_xlabel("peer")
    ax.set_ylabel("loss")
    if val is not None:
        ax.set_title("final losses: each peer vs the averaged model")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return plots.save(fig, path)


def report_launch(directory: Path, console: Console) -> list[Path]:
    per_peer = launch_metrics(directory)
    summary = _summary(directory)
    if summary is None:
        console.print(
            f"[yellow]note:[/yellow] no valid {directory / 'summary.json'} (launch killed?); "
            "`demuon report DIR --config FILE` rebuilds it from the peers' files"
        )
    console.print(peer_table(per_peer, summary))
    title = f"{len(per_peer)} peers" + (
        f", {summary['algorithm']} on {summary['topology']}" if summary else ""
    )
    return [
        plots.plot_per_peer(
            per_peer,
            "train_loss",
            directory / "loss.png",
            title=f"train loss per peer ({title})",
            ylabel="train loss",
        ),
        plot_average(per_peer, summary, directory / "average.png"),
        plots.plot_per_peer(
            per_peer,
            "local_disagreement",
            directory / "disagreement.png",
            title="local disagreement (consensus proxy)",
            ylabel="‖X_i − Σ_j w_ij X_j‖",
            log=True,
        ),
        plots.plot_per_peer(
            per_peer,
            "bytes_out",
            directory / "bytes.png",
            title="bytes sent per peer (cumulative)",
            ylabel="bytes",
            cumulative=True,
        ),
    ]


def report_simulate(directory: Path, console: Console) -> list[Path]:
    runs = simulate_runs(directory)
    console.print(
        f"[yellow]note:[/yellow] {directory} holds simulator output (all peers in one process): there are "
        "no per-peer metrics, so the per-peer plots need a `demuon launch` folder; showing per-run results."
    )
    summaries = {
        name: _summary(directory / name) or (_summary(directory) if len(runs) == 1 else None) for name in runs
    }
    console.print(run_table(runs, summaries))
    return [plots.plot_runs(runs, directory / "report.png", f"simulator runs in {directory.name}")]


def cmd_report(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    console = Console()
    err = Console(stderr=True)
    if not directory.is_dir():
        err.print(f"[red]error:[/red] {directory} is not a folder")
        return 2
    if launch_metrics(directory):
        if args.config is not None and _summary(directory) is None:
            from demuon.config import load_config

            config = load_config(args.config, args.set)
            results.write_summary(directory, launch_summary(config, directory, extra={"rebuilt": True}))
        written = report_launch(directory, console)
    elif simulate_runs(directory):
        written = report_simulate(directory, console)
    else:
        err.print(
            f"[red]error:[/red] {directory} has neither peer-<i>/metrics.jsonl (from `demuon launch`) "
            "nor metrics.jsonl (from `demuon simulate`)"
        )
        return 2
    err.print("wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report", help="table and plots of a launch/simulate folder"
    )
    p.add_argument("dir", type=Path, help="output folder of `demuon launch` or `demuon simulate`")
    p.add_argument("--config", type=Path, help="the run's config: rebuild a missing launch summary.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as given to launch")
    p.set_defaults(func=cmd_report)
    return p
