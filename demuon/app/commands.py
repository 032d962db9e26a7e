"""``demuon simulate`` and ``demuon demo`` (layer 6). Heavy modules are imported inside the
commands, so importing this module for a handler costs little."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from demuon.config import ALGORITHM_NAMES, Config, load_config
from demuon.errors import ConfigError, DemuonError

if TYPE_CHECKING:
    from demuon.app.simulate import SimulationResult

console = Console(stderr=True)

#: The built-in experiment files (package data: they travel with an installed wheel).
DEMO_SIMULATE = "demo-simulate.toml"
DEMO_CLUSTER = "demo-cluster.toml"


def packaged_config(name: str, stack: ExitStack) -> Path:
    """A file of ``demuon/configs`` as a real path for as long as ``stack`` is open."""
    return stack.enter_context(as_file(files("demuon.configs") / name))


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


def algorithms_arg(arg: str | None, config: Config) -> list[str]:
    if not arg:
        return [config.algorithm.name]
    names = [a.strip() for a in arg.split(",") if a.strip()]
    bad = [a for a in names if a not in ALGORITHM_NAMES]
    if bad:
        raise DemuonError(f"--algorithms: unknown {bad}; choose from {', '.join(ALGORITHM_NAMES)}")
    return names


#: The label of ``simulate --server`` runs (EF21-Muon, demuon/app/server.py).
SERVER_RUN = "ef21_muon"


def simulate_many(
    config: Config, algorithms: Sequence[str], out: Path | None, *, server: bool = False
) -> dict[str, SimulationResult]:
    """Run each algorithm on the same config (with its ``per_algorithm`` overrides), side by side:
    with several, each gets its own run folder ``out/<algorithm>``. ``server``: EF21-Muon's
    server–worker run of the config instead (one run, labelled :data:`SERVER_RUN`)."""
    from demuon import results
    from demuon.app import plots, simulate
    from demuon.app import server as server_mode

    runs: dict[str, SimulationResult] = {}
    with _progress() as bar:
        for name in [SERVER_RUN] if server else algorithms:
            cfg = config if server else config.for_algorithm(name)
            task = bar.add_task(name, total=cfg.rounds, loss="…")

            def hook(k: int, row: Mapping[str, Any], task: Any = task) -> None:
                bar.update(task, completed=k + 1, loss=f"{row['train_loss']:.4f}")

            sub = (out / name) if out and len(algorithms) > 1 and not server else out
            runner = server_mode.run if server else simulate.run
            runs[name] = runner(cfg, out=sub, progress=hook)
    if out:
        title = f"{config.peers} peers, {config.topology.name}, {config.workload.kind}"
        plots.plot_runs(
            {n: results.run_series(r.per_peer, r.cluster) for n, r in runs.items()}, out / "plot.png", title
        )
    return runs


def print_run_table(runs: Mapping[str, SimulationResult]) -> None:
    from demuon import results
    from demuon.app.report import run_table

    series = {name: (results.run_series(r.per_peer, r.cluster), r.summary) for name, r in runs.items()}
    Console().print(run_table(series, "results"))


def check_device(name: str) -> None:
    """Fail before anything starts when ``name`` (``cuda`` or ``cuda:N``) is not a CUDA device
    this process can use: a ConfigError naming the setting and why."""
    if not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = (
            f"torch {torch.__version__} has no CUDA support"
            if torch.version.cuda is None
            else f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU"
        )
        raise ConfigError(
            "device",
            name,
            f'CUDA is not available in this torch build ({build}); use device = "cpu" or "auto"',
        )
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError("device", name, f"only {count} CUDA device(s) present (cuda:0..cuda:{count - 1})")


def cmd_simulate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set, faults=args.faults)
    check_device(config.device)
    out = Path(args.out) if args.out else None
    server = bool(getattr(args, "server", False))
    if server and (args.algorithms or not config.faults.empty):
        what = "--algorithms" if args.algorithms else "a fault plan"
        raise ConfigError("--server", what, "EF21-Muon runs one algorithm with no faults: drop " + what)
    if server and config.algorithm.name != "demuon":
        raise ConfigError(
            "algorithm.name", config.algorithm.name, "--server runs EF21-Muon, whose step is demuon's"
        )
    runs = simulate_many(config, algorithms_arg(args.algorithms, config), out, server=server)
    print_run_table(runs)
    if out:
        console.print(f"wrote {out}/ (peer-<i>/metrics.jsonl, cluster.jsonl, summary.json, plot.png)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``make demo``: a real local cluster (one process per peer) then its report; with
    ``--simulate``, the simulator's side-by-side comparison of DeMuon, DSGD and GT-NSGDm."""
    from demuon.app.cli import main

    out = Path(args.out)
    with ExitStack() as stack:
        if args.simulate:
            config = load_config(packaged_config(DEMO_SIMULATE, stack), args.set)
            check_device(config.device)
            console.print(
                f"demo: {config.peers} simulated peers on a {config.topology.name}, {config.workload.kind}"
            )
            runs = simulate_many(config, ["demuon", "dsgd", "gt_nsgdm"], out)
            print_run_table(runs)
            console.print(f"plot: {out / 'plot.png'}")
            return 0
        path = packaged_config(DEMO_CLUSTER, stack)
        config = load_config(path, args.set)  # fail early, before any process starts
        check_device(config.device)
        console.print(
            f"demo: {config.peers} peer processes on a {config.topology.name} over loopback ZeroMQ, "
            f"{config.algorithm.name}, {config.workload.kind} workload, {config.rounds} rounds"
        )
        argv = ["--config", str(path), "--out", str(out), "--force"]  # the demo's folder is its own
        argv += [f"--set={item}" for item in args.set]
        if not sys.stderr.isatty():
            argv += ["--no-live", "--every", "20"]
        code = main(["launch", *argv])
        if code == 0:
            code = main(["report", str(out)])
        return code


def existing_keys(directory: Path) -> list[Path]:
    """The CURVE key files (``peer-<id>.key``, ``peer-<id>.key_secret``) already in ``directory``."""
    if not directory.is_dir():
        return []
    names = (
        p for p in directory.iterdir() if p.name.startswith("peer-") and p.suffix in (".key", ".key_secret")
    )
    return sorted(names, key=lambda p: p.name)


def cmd_keys(args: argparse.Namespace) -> int:
    from demuon.transport.security import generate_keys

    if args.peers < 1:
        raise ConfigError("--peers", args.peers, "must be at least 1 (one keypair per peer id 0..N-1)")
    directory = Path(args.dir)
    found = existing_keys(directory)
    if found and not args.force:
        raise ConfigError(
            "",
            None,
            f"{found[0]} exists ({len(found)} key file(s) in {directory}): refusing to overwrite "
            "CURVE keys that peers may be using; pass --force to replace them",
        )
    ids = list(range(args.peers))
    paths = generate_keys(directory, ids)
    console.print(f"wrote CURVE keypairs for peers {ids[0]}..{ids[-1]} in {args.dir} ({len(paths)} peers)")
    stale = sorted(
        {p.name.removesuffix(p.suffix) for p in existing_keys(directory)} - {f"peer-{i}" for i in ids}
    )
    if stale:
        console.print(
            f"[yellow]warning:[/yellow] {args.dir} still holds keys of {', '.join(stale)} (not replaced); "
            "every public key in the folder is admitted, so remove them if those peers are gone",
            soft_wrap=True,
        )
    return 0
