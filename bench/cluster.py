"""Where a networked round's time goes, and what compression saves on the wire.

    python bench/cluster.py [--config demuon/configs/demo-cluster.toml] [--rounds 30] [--json]

Runs ``demuon launch`` twice on this machine (8 peer processes on a loopback ring by default):
once with the identity codec and once with top-k (C-DeMuon, γ from ``--gamma``). From the peers'
``metrics.jsonl`` (first ``--warmup`` rounds dropped) it prints the median over peers and rounds
of each part of a round (gradient compute, local step + encode, send + wait, mix), the round time
over the compute time (target ≤ 1.15 with the identity codec: gossip adds at most 15 %), and the
bytes each peer sends per round, next to the simulator's count for the same config (both count
whole wire messages, headers included).
With more peers than cores, a peer's wait includes its neighbours' compute (they share the cores),
so the ratio is only meaningful with a core per peer (e.g. ``--peers 2`` on a 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demuon import results  # noqa: E402
from demuon.app import cli, simulate  # noqa: E402
from demuon.config import load_config  # noqa: E402

DEFAULT_CONFIG = ROOT / "demuon" / "configs" / "demo-cluster.toml"
TIMES = ("t_compute", "t_encode", "t_wait", "t_mix", "t_round")
TARGET_RATIO = 1.15
SIM_ROUNDS = 3  # the simulator's bytes per round do not change with the round


def codec_overrides(codec: str, ratio: float, gamma: float) -> list[str]:
    if codec == "identity":
        return ['gossip.codec={ kind = "identity" }', "gossip.gamma=1.0"]
    return [f'gossip.codec={{ kind = "topk", ratio = {ratio} }}', f"gossip.gamma={gamma}"]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cluster_figures(out: Path, warmup: int) -> dict[str, Any]:
    """Medians over every (peer, round ≥ warmup) row of the launch folder ``out``."""
    rows = [r for rs in results.read_per_peer(out).values() for r in rs if r.get("round", 0) >= warmup]
    fig: dict[str, Any] = {"rows": len(rows)}
    for key in (*TIMES, "bytes_out"):
        fig[key] = median([float(r[key]) for r in rows if isinstance(r.get(key), int | float)])
    compute, round_ = fig["t_compute"], fig["t_round"]
    fig["round_over_compute"] = round_ / compute if compute and round_ else None
    busy = sum(fig[k] or 0.0 for k in ("t_compute", "t_encode", "t_mix"))
    fig["round_over_busy"] = round_ / busy if busy and round_ else None
    fig["late"] = sum(int(r.get("late") or 0) for r in rows)
    fig["missing"] = sum(len(r.get("missing") or ()) for r in rows)  # senders missing, per row
    return fig


def simulated_bytes(config_path: Path, overrides: list[str]) -> float:
    """Bytes one peer sends per round in the simulator (mean over peers)."""
    cfg = load_config(config_path, [*overrides, f"rounds={SIM_ROUNDS}"])
    res = simulate.run(cfg)
    return statistics.mean(float(r["bytes_out"]) for r in res.cluster) / cfg.peers


def run_codec(config_path: Path, codec: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    overrides = [f"rounds={args.rounds}", *codec_overrides(codec, args.ratio, args.gamma)]
    if args.peers:
        overrides.append(f"peers={args.peers}")
    if args.base_port:
        overrides.append(f"network.base_port={args.base_port}")
    out = workdir / codec
    argv = ["--config", str(config_path), "--out", str(out), "--no-live", "--every", "10", "--force"]
    for item in overrides:
        argv += ["--set", item]
    start = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout carries the result
        rc = cli.main(["launch", *argv])
    wall = time.monotonic() - start
    fig = cluster_figures(out, args.warmup)
    fig.update(codec=codec, exit_code=rc, wall_s=wall, sim_bytes=simulated_bytes(config_path, overrides))
    summary = results.read_summary(out)
    fig["val_loss_average"] = summary["average"]["validation_loss"]
    return fig


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1e3:.1f}"


def _ratio(f: dict[str, Any], key: str) -> str:
    value = f[key]
    if value is None:
        return "—"
    mark = " (target ✓)" if value <= TARGET_RATIO else " (target ✗)"
    return f"{value:.2f}{mark if key == 'round_over_compute' and f['codec'] == 'identity' else ''}"


ROWS: tuple[tuple[str, Any], ...] = (
    *((f"{k[2:]} ms (median)", lambda f, k=k: _ms(f[k])) for k in TIMES),
    ("round / compute", lambda f: _ratio(f, "round_over_compute")),
    ("round / (compute+encode+mix)", lambda f: _ratio(f, "round_over_busy")),
    ("KB sent per round per peer", lambda f: _kb(f["bytes_out"])),
    ("KB per round per peer (simulator)", lambda f: _kb(f["sim_bytes"])),
    ("late / missing messages", lambda f: f"{f['late']} / {f['missing']}"),
    (
        "validation loss of the average",
        lambda f: "—" if f["val_loss_average"] is None else f"{f['val_loss_average']:.4f}",
    ),
    ("wall s (launch)", lambda f: f"{f['wall_s']:.0f}"),
)


def _kb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e3:.1f}"


def render(figures: list[dict[str, Any]], title: str) -> Table:
    caption = f"medians over peers and rounds; target round/compute ≤ {TARGET_RATIO} (identity)"
    table = Table(title=title, caption=caption)
    table.add_column("")
    for f in figures:
        table.add_column(
            f["codec"] + ("" if f["exit_code"] == 0 else f" (exit {f['exit_code']})"), justify="right"
        )
    for label, cell in ROWS:
        table.add_row(label, *(cell(f) for f in figures))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--peers", type=int, default=0, help="override the number of peers (0 = the config's)")
    p.add_argument("--warmup", type=int, default=3, help="first rounds left out of the medians")
    p.add_argument("--ratio", type=float, default=0.1, help="top-k fraction kept")
    p.add_argument("--gamma", type=float, default=0.2, help="γ for the compressed run")
    p.add_argument("--base-port", type=int, default=0, help="override network.base_port (0 = the config's)")
    p.add_argument("--codecs", default="identity,topk")
    p.add_argument("--out", type=Path, help="keep the launch folders here (default: a temp folder)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"peers={args.peers}"] if args.peers else [])
    title = (
        f"cluster bench: {cfg.peers} peers, {cfg.topology.name}, {cfg.workload.kind}, {args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory(prefix="demuon-bench-") as tmp:
        workdir = args.out or Path(tmp)
        figures = [
            run_codec(args.config, c.strip(), args, workdir) for c in args.codecs.split(",") if c.strip()
        ]
    if args.json:
        print(json.dumps({"title": title, "figures": figures}, indent=2))
    else:
        Console().print(render(figures, title))
    return 0 if all(f["exit_code"] == 0 for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
