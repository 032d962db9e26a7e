"""Command line: ``demuon simulate | demo | keys generate | run | launch | report``.

Only this module (and the other composition roots) reads configuration and picks concrete classes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from demuon.config import ALGORITHM_NAMES, Config, load_config
from demuon.errors import DemuonError

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
DEMO_SIMULATE_CONFIG = ROOT / "configs" / "demo-simulate.toml"
DEMO_CLUSTER_CONFIG = ROOT / "configs" / "demo-cluster.toml"


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _algorithms(arg: str | None, config: Config) -> list[str]:
    if not arg:
        return [config.algorithm.name]
    names = [a.strip() for a in arg.split(",") if a.strip()]
    bad = [a for a in names if a not in ALGORITHM_NAMES]
    if bad:
        raise DemuonError(f"--algorithms: unknown {bad}; choose from {', '.join(ALGORITHM_NAMES)}")
    return names


def simulate_many(config: Config, algorithms: Sequence[str], out: Path | None) -> dict[str, Any]:
    """Run each algorithm on the same config (with its ``per_algorithm`` overrides), side by side."""
    from demuon import plots, simulate

    runs: dict[str, Any] = {}
    with _progress() as bar:
        for name in algorithms:
            cfg = config.for_algorithm(name)
            task = bar.add_task(name, total=cfg.rounds, loss="…")

            def hook(k: int, row: Mapping[str, Any], task: Any = task) -> None:
                bar.update(task, completed=k + 1, loss=f"{row['train_loss']:.4f}")

            sub = (out / name) if out and len(algorithms) > 1 else out
            runs[name] = simulate.run(cfg, out=sub, progress=hook)
    if out:
        title = f"{config.peers} peers, {config.topology.name}, {config.workload.kind}"
        plots.plot_runs({n: r.rows for n, r in runs.items()}, out / "plot.png", title)
    return runs


def print_run_table(runs: dict[str, Any]) -> None:
    from demuon.report import run_table

    rows = {name: r.rows for name, r in runs.items()}
    Console().print(run_table(rows, {name: r.summary for name, r in runs.items()}, "results"))


def cmd_simulate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    out = Path(args.out) if args.out else None
    runs = simulate_many(config, _algorithms(args.algorithms, config), out)
    print_run_table(runs)
    if out:
        console.print(f"wrote {out}/ (metrics.jsonl, summary.json, plot.png)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``make demo``: a real local cluster (one process per peer) then its report; with
    ``--simulate``, the simulator's side-by-side comparison of DeMuon, DSGD and GT-NSGDm."""
    out = Path(args.out)
    if args.simulate:
        config = load_config(DEMO_SIMULATE_CONFIG, args.set)
        console.print(
            f"demo: {config.peers} simulated peers on a {config.topology.name}, {config.workload.kind}"
        )
        runs = simulate_many(config, ["demuon", "dsgd", "gt_nsgdm"], out)
        print_run_table(runs)
        console.print(f"plot: {out / 'plot.png'}")
        return 0

    config = load_config(DEMO_CLUSTER_CONFIG, args.set)  # fail early, before any process starts
    console.print(
        f"demo: {config.peers} peer processes on a {config.topology.name} over loopback ZeroMQ, "
        f"{config.algorithm.name}, {config.workload.kind} workload, {config.rounds} rounds"
    )
    argv = ["--config", str(DEMO_CLUSTER_CONFIG), "--out", str(out)]
    argv += [f"--set={item}" for item in args.set]
    if not sys.stderr.isatty():
        argv += ["--no-live", "--every", "20"]
    code = main(["launch", *argv])
    if code == 0:
        code = main(["report", str(out)])
    return code


def cmd_keys(args: argparse.Namespace) -> int:
    from demuon.transport.security import generate_keys

    ids = list(range(args.peers))
    paths = generate_keys(Path(args.dir), ids)
    console.print(f"wrote CURVE keypairs for peers {ids[0]}..{ids[-1]} in {args.dir} ({len(paths)} peers)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demuon", description="peer-to-peer decentralized Muon training")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="N peers in one process with exact mixing")
    s.add_argument("--config", type=Path, help="TOML experiment file (default: built-in defaults)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    s.add_argument("--out", type=Path, help="folder for metrics.jsonl, summary.json, plot.png")
    s.add_argument("--algorithms", help=f"comma-separated, side by side ({','.join(ALGORITHM_NAMES)})")
    s.set_defaults(func=cmd_simulate)

    d = sub.add_parser("demo", help="the default demonstration (what `make demo` runs)")
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--simulate", action="store_true", help="compare algorithms in the simulator instead")
    d.set_defaults(func=cmd_demo)

    from demuon import compose, launch, report
    from demuon.run_cli import add_run_parser

    add_run_parser(sub)
    launch.add_parser(sub)
    report.add_parser(sub)
    compose.add_parser(sub)

    k = sub.add_parser("keys", help="CURVE key management")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kg = ksub.add_parser("generate", help="write one CURVE keypair per peer into DIR")
    kg.add_argument("dir", type=Path)
    kg.add_argument("--peers", type=int, default=8, help="number of peers (ids 0..N-1)")
    kg.set_defaults(func=cmd_keys)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DemuonError as exc:
        # unwrapped and unformatted: paths and values in the message must survive copy and paste
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
