"""Message loss, partitions and a departure: the old tracker policy next to the new one.

``gossip.tracker = "self_weight"`` (old: a missing neighbour's weight goes to self and the mass of
its lost V message is gone for good) against ``"running_sum"`` (new default: tracker messages carry
running sums, so a lost message's mass arrives with the sender's next one). Every number below is
measured in this one run, both policies side by side on the same fault plan (same seed, so the same
messages are lost under both).

Workloads: multinomial logistic regression (8 peers, ring and directed_exponential, 300 rounds,
float64 so the drift numbers are clean; DeMuon η = 0.05, linear decay) and the byte-level GPT of
``demuon/configs/demo-simulate.toml`` (8-peer ring, float32, its settings, 100 rounds instead of
its 60; ``eval_every`` is set to the round count, which changes no parameter, only skips the
intermediate evaluations).

1. Drop rate 0, 5, 10, 20, 30 % on every link, both phases (V and X).
2. Partition into halves [[0..3], [4..7]] from round 20 for 5, 10, 20 and 40 rounds (logistic,
   both graphs; length 0 is the fault-free run).
3. An unannounced departure: peer 5 cut off from round 20 to the end, every other peer keeps
   training. The partition section of a fault plan refuses a single group (``groups`` needs two),
   so the plan is two certain drop rules, everything peer 5 sends and everything sent to it, from
   round 20 on; that is exactly a partition whose groups list every peer but 5 (the same fates).
   The validation loss is the summary's, of the model averaged over all 8 peers, peer 5's stale
   replica included; the survivors' averaged model is evaluated as well, from the same final state.
   Announced leaves (``faults.peer.leave_at``), with a hand-off of the leaver's tracker mass and a
   re-weighting of the mixing matrix, are not built yet, so they are not measured here.

4. One Byzantine peer (peer 5 of the logistic ring, ``--rounds`` rounds): it trains honestly but
   every message it sends is replaced (``demuon.node.exchange.Poison``), by 1e30 in every entry or
   by −4 × the honest message, in both phases; the guard ``gossip.clip = "self_centred"``
   (docs/algorithms.md §8.1) off and on at several ``clip_multiple`` values, and the fault-free run
   with the guard off and on (its cost). Validation loss of the honest peers' averaged model,
   their consensus error, their tracking drift (counting what is in flight between them) and the
   share of the neighbour values they used that the guard clipped. ``--only byzantine`` runs this
   scenario alone (about 1 min on 2 CPU cores).

Columns: validation loss of the averaged model at the last round; consensus error at the last
round; tracking drift = summary["tracking_drift"], the final ‖mean V + in-flight − mean M‖ /
‖mean M‖ (relative); worst gap = max over rounds of ``tracking_gap_in_flight``, the absolute
‖mean V + in-flight − mean M‖; missing = summary["faults"]["missing"] (in-neighbours that a peer
waited for in vain, summed over peers and rounds).

    python bench/faults.py [--rounds 300] [--gpt-rounds 100] [--no-gpt] [--out runs/bench-faults]
                           [--quick] [--json] [--only byzantine]

Writes ``faults.png`` and every row as ``faults.json`` under ``--out`` (``faults-quick.*`` with
``--quick``). A full run took 11 min on 2 CPU cores: 1.2 min logistic drop sweep, 6.8 min GPT drop
sweep, 1.4 min partitions, 1.7 min departures (1.4 of them the GPT). The GPT keeps 100 rounds; give
``--gpt-rounds 60`` (or ``--no-gpt``) for a shorter run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from demuon.app import simulate
from demuon.config import Config, config_from_dict, load_config
from demuon.node.exchange import Poison
from demuon.node.observe import TrackerState, averaged_validation_loss, consensus_error, tracking_drift
from demuon.workloads import make_workload

POLICIES = ("self_weight", "running_sum")
GRAPHS = ("ring", "directed_exponential")
DROP_PERCENT = (0, 5, 10, 20, 30)
PARTITION_ROUNDS = (0, 5, 10, 20, 40)
HALVES = [[0, 1, 2, 3], [4, 5, 6, 7]]
CUT_FROM = 20  # partitions and the departure start at this round
LEAVER = 5
FAULT_SEED = 7
PEERS = 8
DEMO = "demo-simulate.toml"
BYZANTINE = 5
ATTACKS: dict[str, Poison | None] = {
    "none": None,
    "1e30": Poison(BYZANTINE, value=1e30),
    "−4 × honest": Poison(BYZANTINE, scale=-4.0),
}
CLIP_MULTIPLES = (1.0, 2.0, 4.0)  # 2.0 is the default of gossip.clip_multiple


@dataclass(frozen=True)
class Case:
    """One run of the table: a workload on a graph, one scenario at one level, one policy."""

    workload: str  # "logistic" | "gpt"
    graph: str
    scenario: str  # "drop" | "partition" | "departure"
    level: int  # drop rate in %, partition length in rounds, departure round
    policy: str

    def faults(self, rounds: int) -> dict[str, Any]:
        last = rounds - 1
        if self.level == 0:
            return {}
        if self.scenario == "drop":
            return {"seed": FAULT_SEED, "link": [{"action": "drop", "probability": self.level / 100}]}
        if self.scenario == "partition":
            span = [CUT_FROM, min(CUT_FROM + self.level - 1, last)]
            return {"seed": FAULT_SEED, "partition": [{"groups": HALVES, "rounds": span}]}
        span = [self.level, last]  # departure: peer LEAVER cut off from everyone to the end
        rules = [{"action": "drop", side: [LEAVER], "rounds": span} for side in ("src", "dst")]
        return {"seed": FAULT_SEED, "link": rules}


def logistic_config(case: Case, rounds: int) -> Config:
    return config_from_dict(
        {
            "peers": PEERS,
            "rounds": rounds,
            "seed": 1,
            "dtype": "float64",
            "eval_every": rounds,
            "topology": {"name": case.graph},
            "algorithm": {"name": "demuon", "lr": 0.05, "schedule": {"kind": "linear"}},
            "gossip": {"tracker": case.policy},
            "workload": {"kind": "logistic"},
            "faults": case.faults(rounds),
        }
    )


def gpt_config(case: Case, rounds: int) -> Config:
    with as_file(files("demuon.configs") / DEMO) as path:
        base = load_config(path)
    data = base.model_dump()
    data.update(rounds=rounds, eval_every=rounds, faults=case.faults(rounds))
    data["topology"] = {**data["topology"], "name": case.graph}
    data["gossip"] = {**data["gossip"], "tracker": case.policy}
    return config_from_dict(data)


def survivors_val_loss(res: simulate.SimulationResult, survivors: Sequence[int]) -> float:
    """Validation loss of the model averaged over ``survivors`` only (the final parameters)."""
    config, peers = res.config, [p for p in res.peers if p.index in survivors]
    workload = make_workload(config.workload, seed=config.seed, device=peers[0].device)
    states = [p.X() for p in peers]
    return averaged_validation_loss(
        workload, config.seed, states, device=peers[0].device, dtype=peers[0].dtype
    )


def measure(case: Case, rounds: int) -> dict[str, Any]:
    config = logistic_config(case, rounds) if case.workload == "logistic" else gpt_config(case, rounds)
    start = time.perf_counter()
    res = simulate.run(config)
    gaps = [g for r in res.cluster if (g := r["tracking_gap_in_flight"]) is not None]
    row: dict[str, Any] = {
        "workload": case.workload,
        "graph": case.graph,
        "scenario": case.scenario,
        "level": case.level,
        "policy": case.policy,
        "rounds": rounds,
        "final_val_loss": res.summary["average"]["validation_loss"],
        "consensus_error": res.cluster[-1]["consensus_error"],
        "tracking_drift": res.summary["tracking_drift"],
        "worst_gap_in_flight": max(gaps) if gaps else None,
        "missing": res.summary["faults"]["missing"],
        "survivors_val_loss": None,
    }
    if case.scenario == "departure":
        row["survivors_val_loss"] = survivors_val_loss(res, [i for i in range(PEERS) if i != LEAVER])
    row["wall_s"] = time.perf_counter() - start
    return row


def byzantine_config(rounds: int, multiple: float | None) -> Config:
    """The logistic ring of the other scenarios; ``multiple`` None = guard off."""
    data = logistic_config(Case("logistic", "ring", "byzantine", 0, "running_sum"), rounds).model_dump()
    if multiple is not None:
        data["gossip"].update(clip="self_centred", clip_multiple=multiple)
    return config_from_dict(data)


def measure_byzantine(attack: str, multiple: float | None, rounds: int) -> dict[str, Any]:
    config, poison = byzantine_config(rounds, multiple), ATTACKS[attack]
    start = time.perf_counter()
    peers = simulate.run_poisoned(config, poison)
    honest = [p for p in peers if poison is None or p.index != poison.sender]
    workload = make_workload(config.workload, seed=config.seed, device=honest[0].device)
    states = [p.X() for p in honest]
    used = sum(len(p.view(0).in_neighbours) for p in honest) * len(honest[0].phases) * rounds
    return {
        "workload": "logistic",
        "graph": "ring",
        "scenario": "byzantine",
        "level": 0,
        "policy": "running_sum",
        "rounds": rounds,
        "attack": attack,
        "clip_multiple": multiple,
        "final_val_loss": averaged_validation_loss(
            workload, config.seed, states, device=honest[0].device, dtype=honest[0].dtype
        ),
        "consensus_error": consensus_error(honest),
        "tracking_drift": tracking_drift([TrackerState.of(p, rounds - 1) for p in honest]),
        "largest_entry": max(float(t.abs().max()) for x in states for t in x.values()),
        "clipped_share": sum(p.clipped for p in honest) / used,
        "wall_s": time.perf_counter() - start,
    }


def byzantine_cases(quick: bool) -> Iterator[tuple[str, float | None]]:
    for attack in ATTACKS:
        for multiple in (None, *((2.0,) if quick else CLIP_MULTIPLES)):
            yield attack, multiple


def byzantine_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table:
    t = Table(title=title)
    cols = ["peer 5 sends", "guard", "val loss (honest avg)", "consensus error", "tracking drift (rel.)"]
    for c in [*cols, "largest |X| entry", "clipped"]:
        t.add_column(c, justify="right")
    for r in rows:
        if r["scenario"] != "byzantine":
            continue
        m = r["clip_multiple"]
        guard = "off" if m is None else f"c = {m:g}"
        sent = "honest (fault-free)" if r["attack"] == "none" else r["attack"]
        t.add_row(
            sent, guard, _g(r["final_val_loss"], ".4f"), _g(r["consensus_error"], ".3g"),
            _g(r["tracking_drift"], ".3g"), _g(r["largest_entry"], ".3g"),
            f"{100 * r['clipped_share']:.1f} %",
        )  # fmt: skip
    return t


def cases(quick: bool, gpt: bool) -> Iterator[Case]:
    """Every case of the bench, in the order the tables show them."""
    drops = (0, 20) if quick else DROP_PERCENT
    lengths = (0, 10) if quick else PARTITION_ROUNDS
    for graph in GRAPHS:
        for level in drops:
            for policy in POLICIES:
                yield Case("logistic", graph, "drop", level, policy)
    if gpt:
        for level in drops:
            for policy in POLICIES:
                yield Case("gpt", "ring", "drop", level, policy)
    for graph in GRAPHS[::-1]:  # directed_exponential first: the interesting one
        for level in lengths:
            for policy in POLICIES:
                yield Case("logistic", graph, "partition", level, policy)
    for workload, graph in [("logistic", g) for g in GRAPHS] + ([("gpt", "ring")] if gpt else []):
        for level in (0, CUT_FROM):
            for policy in POLICIES:
                yield Case(workload, graph, "departure", level, policy)


def _fault_free(case: Case) -> Case:
    """Level 0 of every scenario is the same fault-free run: measure it once."""
    return Case(case.workload, case.graph, "none", 0, case.policy) if case.level == 0 else case


def _g(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


LEVEL_NAME = {"drop": "drop %", "partition": "partition (rounds)", "departure": "peer 5 cut off at"}


def table(rows: Sequence[Mapping[str, Any]], scenario: str, title: str) -> Table:
    t = Table(title=title)
    cols = ["workload", "graph", LEVEL_NAME[scenario], "policy", "val loss (avg model)"]
    if scenario == "departure":
        cols.append("val loss (survivors' avg)")
    cols += ["consensus error", "tracking drift (rel.)", "worst gap in flight", "missing"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        if r["scenario"] != scenario:
            continue
        level = str(r["level"]) if scenario != "departure" or r["level"] else "never"
        cells = [r["workload"], r["graph"], level, r["policy"], _g(r["final_val_loss"], ".4f")]
        if scenario == "departure":
            cells.append(_g(r["survivors_val_loss"], ".4f"))
        cells += [
            _g(r["consensus_error"], ".3g"), _g(r["tracking_drift"], ".3g"),
            _g(r["worst_gap_in_flight"], ".3g"), str(r["missing"]),
        ]  # fmt: skip
        t.add_row(*cells)
    return t


FLOOR = 1e-18  # a drift of exactly 0 is drawn here on the log axis
STYLE = {"self_weight": ("tab:red", "o"), "running_sum": ("tab:blue", "s")}
LINE = {("logistic", "ring"): "-", ("logistic", "directed_exponential"): "--", ("gpt", "ring"): ":"}


def _curves(
    rows: Sequence[Mapping[str, Any]], scenario: str, key: str, workloads: Sequence[str]
) -> Iterator[tuple[str, str, str, list[int], list[float]]]:
    for (workload, graph), _ in LINE.items():
        if workload not in workloads:
            continue
        for policy in POLICIES:
            pts = sorted(
                (r["level"], r[key])
                for r in rows
                if (r["workload"], r["graph"], r["policy"]) == (workload, graph, policy)
                and r["scenario"] == scenario
                and r[key] is not None
            )
            if pts:
                yield workload, graph, policy, [p[0] for p in pts], [float(p[1]) for p in pts]


def plot(rows: Sequence[Mapping[str, Any]], path: Path, rounds: Mapping[str, int]) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels: list[tuple[Any, str, str, Sequence[str], str, bool]] = [
        (axes[0, 0], "drop", "final_val_loss", ["logistic"], "logistic: val loss (nats/sample)", False),
        (axes[0, 1], "drop", "final_val_loss", ["gpt"], "byte-level GPT: val loss (nats/byte)", False),
        (axes[1, 0], "drop", "tracking_drift", ["logistic", "gpt"], "tracking drift (relative)", True),
        (axes[1, 1], "partition", "final_val_loss", ["logistic"], "logistic: val loss (nats/sample)", False),
    ]
    for ax, scenario, key, workloads, ylabel, log in panels:
        drawn = False
        for workload, graph, policy, xs, ys in _curves(rows, scenario, key, workloads):
            colour, marker = STYLE[policy]
            ys = [max(y, FLOOR) for y in ys] if log else ys
            label = f"{workload} {graph}, {policy}"
            ax.plot(xs, ys, LINE[(workload, graph)], color=colour, marker=marker, label=label)
            drawn = True
        if log:
            ax.set_yscale("log")
        across = f"partition length (rounds, halves from round {CUT_FROM})"
        ax.set_xlabel(across if scenario == "partition" else "drop rate (% of messages, every link)")
        ax.set_ylabel(ylabel + (f" (0 drawn at {FLOOR:g})" if log else ""))
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    axes[0, 0].set_title(f"final validation loss vs drop rate ({rounds['logistic']} rounds)")
    axes[0, 1].set_title(f"final validation loss vs drop rate, 8-peer ring ({rounds['gpt']} rounds)")
    axes[1, 0].set_title("final ‖mean V + in-flight − mean M‖ / ‖mean M‖ vs drop rate")
    axes[1, 1].set_title("final validation loss vs partition length")
    fig.suptitle("8 peers, DeMuon: tracker policy self_weight (old) vs running_sum (new)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300, help="logistic rounds")
    ap.add_argument("--gpt-rounds", type=int, default=100)
    ap.add_argument("--no-gpt", action="store_true", help="logistic only")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-faults"))
    ap.add_argument("--quick", action="store_true", help="40 logistic rounds, two levels, no GPT (smoke run)")
    ap.add_argument("--json", action="store_true", help="print every row as JSON instead of the tables")
    ap.add_argument("--only", choices=["byzantine"], help="run one scenario alone")
    args = ap.parse_args(argv)
    rounds = {"logistic": 40 if args.quick else args.rounds, "gpt": args.gpt_rounds}
    gpt = not (args.quick or args.no_gpt)
    console = Console(stderr=True)
    todo = [] if args.only else list(cases(args.quick, gpt))
    measured: dict[Case, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for n, case in enumerate(todo, 1):
        key = _fault_free(case)
        cached = key in measured
        if not cached:
            measured[key] = measure(case, rounds[case.workload])
        row = {**measured[key], "scenario": case.scenario, "level": case.level}
        rows.append(row)
        note = "same fault-free run as above" if cached else f"{row['wall_s']:.1f} s"
        console.print(
            f"[{n:>2}/{len(todo)}] {case.workload:>8} {case.graph:>20} {case.scenario:>9} {case.level:>3}"
            f" {case.policy:>11}: val {row['final_val_loss']:.4f}, drift {_g(row['tracking_drift'], '.3g')}"
            f", missing {row['missing']} ({note}, {time.perf_counter() - start:.0f} s in all)",
            soft_wrap=True,
        )
    byzantine = list(byzantine_cases(args.quick))
    for n, (attack, multiple) in enumerate(byzantine, 1):
        rows.append(measure_byzantine(attack, multiple, rounds["logistic"]))
        r, guard = rows[-1], "off" if multiple is None else f"c = {multiple:g}"
        console.print(
            f"[byzantine {n:>2}/{len(byzantine)}] peer {BYZANTINE} sends {attack:>12}, guard {guard:>7}: "
            f"val {r['final_val_loss']:.4f}, consensus {r['consensus_error']:.3g} "
            f"({r['wall_s']:.1f} s, {time.perf_counter() - start:.0f} s in all)",
            soft_wrap=True,
        )
    stem = ("byzantine" if args.only else "faults") + ("-quick" if args.quick else "")
    path = args.out / f"{stem}.png"
    if not args.only:
        plot(rows, path, rounds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    wall = time.perf_counter() - start
    out = Console() if sys.stdout.isatty() else Console(width=200)  # a pipe: do not cut columns
    lr, gr = rounds["logistic"], rounds["gpt"]
    byzantine_title = (
        f"4. peer {BYZANTINE} Byzantine, gossip.clip = self_centred off and on: "
        f"logistic ring, {lr} rounds (float64)"
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.only:
        out.print(byzantine_table(rows, byzantine_title))
        out.print(f"rows: {path.with_suffix('.json')}; {len(byzantine)} runs, {wall:.0f} s")
    else:
        where = f"logistic {lr} rounds (float64)" + (f", GPT ring {gr} rounds (float32)" if gpt else "")
        out.print(table(rows, "drop", f"1. drop rate, every link, both phases: {where}"))
        out.print(table(rows, "partition", f"2. halves {HALVES} from round {CUT_FROM}: logistic {lr} rounds"))
        out.print(
            table(rows, "departure", f"3. peer {LEAVER} cut off from round {CUT_FROM} to the end: {where}")
        )
        out.print(byzantine_table(rows, byzantine_title))
        runs = len(measured) + len(byzantine)
        out.print(f"plot: {path}, rows: {path.with_suffix('.json')}; {runs} runs, {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
