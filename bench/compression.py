"""Compression that pays: bytes per peer to a target validation loss, and the final loss, for each
codec and per-phase combination, next to the uncompressed run's seed-to-seed spread.

Workload: the byte-level GPT of ``demuon/configs/demo-simulate.toml`` (8 peers, DeMuon, η 0.1 with
a linear decay) for ``--rounds`` rounds (150), evaluated every ``rounds/10`` rounds, on the 8-peer
ring and the directed exponential graph. Uncompressed: three seeds (the noise band). The target is
the uncompressed validation loss at 80 % of its rounds (mean over the seeds); ``bytes_to_target``
is the bytes sent per peer (whole wire messages: headers, keyframes and float64 tracker sums
included, as the daemon sends them) until the first evaluation at or below the target.
``bytes_ratio_vs_uncompressed`` divides the uncompressed runs' mean bytes to the target by the
row's; ``val_loss_delta_pct`` is the final validation loss against the uncompressed mean, in %.

Variants (``V=…`` is the tracker message's codec, ``X=…`` the parameter message's, each with its γ;
block-wise quantisation ``blockq`` at 4, 2 and 1 bit with a float32 scale per 256 values,
docs/algorithms.md §7): int8 on both; blockq at each width on both; mixed widths; the 4-bit run
also without keyframes (``keyframe_every = 0``: no losses here, so no replica to repair); int8
trackers with their codes DEFLATE-compressed (lossless); and
EF21-Muon (``demuon simulate --server``: the same peers as workers of one server, uplink =
V codec, downlink = X codec; its bytes are a worker's uplink plus downlink).

    python bench/compression.py [--rounds 150] [--graphs ring,directed_exponential] [--quick]
                                [--only LABELS] [--out runs/bench-compression] [--json]

Writes ``compression.png`` (validation loss against MB per peer) and ``compression.json`` under
``--out``. ``--quick``: 30 rounds, the ring, four variants (a smoke run). A full run is about
26 simulations of the GPT.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from demuon.app import server, simulate
from demuon.config import Config, load_config

GRAPHS = ("ring", "directed_exponential")
SEEDS = (42, 43, 44)
TARGET_AT = 0.8  # the target: the uncompressed loss at this fraction of the rounds
TARGET_RATIO, TARGET_DELTA_PCT = 10.0, 1.0  # what compression must buy: ≥ 10× fewer bytes at ≤ 1 % loss
console = Console(stderr=True)


@dataclass(frozen=True)
class Variant:
    label: str  # e.g. "V=blockq4 X=blockq2"
    level: str  # bits and γ, e.g. "4/2 bit, γ 1/0.4"
    sets: tuple[str, ...] = ()
    server: bool = False
    seed: int = SEEDS[0]
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def uncompressed(self) -> bool:
        return not self.sets and not self.server


def _phase(ph: str, kind: str, gamma: float, bits: int | None = None) -> list[str]:
    codec = f"{{kind = '{kind}'" + (f", bits = {bits}" if bits else "") + "}"
    return [f"gossip.{ph}.codec={codec}", f"gossip.{ph}.gamma={gamma}"]


def blockq(v_bits: int, v_gamma: float, x_bits: int, x_gamma: float) -> Variant:
    sets = (*_phase("v", "blockq", v_gamma, v_bits), *_phase("x", "blockq", x_gamma, x_bits))
    return Variant(
        f"V=blockq{v_bits} X=blockq{x_bits}", f"{v_bits}/{x_bits} bit, γ {v_gamma:g}/{x_gamma:g}", sets
    )


def variants(quick: bool) -> Iterator[Variant]:
    for seed in SEEDS[: 1 if quick else 3]:
        yield Variant("uncompressed", f"seed {seed}", seed=seed)
    yield Variant("V=int8 X=int8", "8 bit, γ 1", (*_phase("v", "int8", 1.0), *_phase("x", "int8", 1.0)))
    yield blockq(4, 1.0, 4, 1.0)
    if not quick:
        no_kf = blockq(4, 1.0, 4, 1.0)
        yield Variant(no_kf.label, no_kf.level + ", no keyframes", (*no_kf.sets, "gossip.keyframe_every=0"))
        for bits, gamma in ((4, 1.0), (2, 0.4), (1, 1.0)):
            yield Variant(
                f"V=int8 X=blockq{bits}",
                f"8/{bits} bit, γ 1/{gamma:g}",
                (*_phase("v", "int8", 1.0), *_phase("x", "blockq", gamma, bits)),
            )
        best = (*_phase("v", "int8", 1.0), *_phase("x", "blockq", 1.0, 1), "gossip.keyframe_every=0")
        yield Variant("V=int8 X=blockq1", "8/1 bit, γ 1/1, no keyframes", best)
        deflated = ("gossip.v.codec={kind = 'int8', deflate = true}", "gossip.v.gamma=1.0")
        x1 = _phase("x", "blockq", 1.0, 1)
        yield Variant("V=int8+deflate X=blockq1", "8/1 bit, γ 1/1", (*deflated, *x1))
        yield Variant(
            "V=int8+deflate X=blockq1",
            "8/1 bit, γ 1/1, no keyframes",
            (*deflated, *x1, "gossip.keyframe_every=0"),
        )
        x1_06 = _phase("x", "blockq", 0.6, 1)  # 1 bit at its documented γ (codecs.BLOCKQ_GAMMA)
        yield Variant(
            "V=int8+deflate X=blockq1",
            "8/1 bit, γ 1/0.6, no keyframes",
            (*deflated, *x1_06, "gossip.keyframe_every=0"),
        )
        yield blockq(4, 1.0, 2, 0.4)
        yield blockq(4, 1.0, 1, 1.0)
        yield blockq(2, 0.2, 2, 0.4)
        yield blockq(2, 0.4, 2, 0.4)
        yield blockq(2, 0.2, 1, 1.0)
    yield blockq(1, 0.4, 1, 1.0)


def server_variants(quick: bool) -> Iterator[Variant]:
    yield Variant("EF21-Muon", "uncompressed", server=True)
    yield Variant(
        "EF21-Muon",
        "4 bit up/down",
        tuple(_phase("v", "blockq", 1.0, 4) + _phase("x", "blockq", 1.0, 4)),
        True,
    )
    if not quick:
        yield Variant(
            "EF21-Muon",
            "2 bit up/down",
            tuple(_phase("v", "blockq", 1.0, 2) + _phase("x", "blockq", 1.0, 2)),
            True,
        )


def config_for(variant: Variant, graph: str, rounds: int, base: Path) -> Config:
    sets = [
        f"rounds={rounds}",
        f"eval_every={max(1, rounds // 10)}",
        f"seed={variant.seed}",
        f"topology.name='{graph}'",
        *variant.sets,
    ]
    return load_config(base, sets)


def curve(res: simulate.SimulationResult, server_mode: bool) -> list[tuple[int, float, float]]:
    """(round, MB per peer so far, validation loss) at every evaluation."""
    n = len(res.per_peer)
    out, sent = [], 0.0
    for k, row in enumerate(res.cluster):
        if server_mode:
            sent = float(row["bytes_per_worker"])
        else:
            sent += sum(float(rows[k]["bytes_out"]) for rows in res.per_peer.values() if k < len(rows)) / n
        if row.get("val_loss") is not None:
            out.append((k, sent, float(row["val_loss"])))
    return out


def measure(variant: Variant, graph: str, rounds: int, base: Path) -> dict[str, Any]:
    config = config_for(variant, graph, rounds, base)
    start = time.perf_counter()
    res = server.run(config) if variant.server else simulate.run(config)
    points = curve(res, variant.server)
    return {
        "graph": "server" if variant.server else graph,
        "codec": variant.label,
        "level": variant.level,
        "final_val_loss": points[-1][2],
        "curve": points,
        "wall_s": time.perf_counter() - start,
        "bytes_per_peer": points[-1][1] * 1.0,
    }


def bytes_to(points: Sequence[Sequence[float]], target: float) -> float | None:
    return next((p[1] for p in points if p[2] <= target), None)


def finish(rows: list[dict[str, Any]], rounds: int) -> None:
    """Targets, bytes to them, ratios and deltas against each graph's uncompressed seeds (the server
    rows against the ring's)."""
    evals = max(1, rounds // 10)
    at = math.ceil(TARGET_AT * rounds / evals) * evals - 1  # the evaluation round at 80 %
    for graph in {r["graph"] for r in rows if r["graph"] != "server"}:
        base = [r for r in rows if r["graph"] == graph and r["codec"] == "uncompressed"]
        target = sum(next(p[2] for p in r["curve"] if p[0] == at) for r in base) / len(base)
        final = sum(r["final_val_loss"] for r in base) / len(base)
        spread = (
            (max(r["final_val_loss"] for r in base) - min(r["final_val_loss"] for r in base)) / final * 100
        )
        ref_bytes = [b for r in base if (b := bytes_to(r["curve"], target)) is not None]
        ref = sum(ref_bytes) / len(ref_bytes) if ref_bytes else None
        group = [r for r in rows if r["graph"] == graph or (graph == "ring" and r["graph"] == "server")]
        for r in group:
            b = bytes_to(r["curve"], target)
            r.update(
                target_val_loss=target,
                seed_spread_pct=spread,
                bytes_to_target=b,
                bytes_ratio_vs_uncompressed=(ref / b) if (ref and b) else None,
                val_loss_delta_pct=(r["final_val_loss"] - final) / final * 100,
            )


def _g(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def table(rows: Sequence[Mapping[str, Any]]) -> Table:
    t = Table(title="compression on the GPT: bytes per peer to the target validation loss")
    for c in ("graph", "codec", "level", "MB to target", "× fewer", "final val", "Δ %", "MB / peer", "s"):
        t.add_column(c, justify="left" if c in ("graph", "codec", "level") else "right")
    for r in rows:
        mb = r.get("bytes_to_target")
        t.add_row(
            r["graph"],
            r["codec"],
            r["level"],
            _g(mb / 1e6 if mb is not None else None, ".2f"),
            _g(r.get("bytes_ratio_vs_uncompressed"), ".1f"),
            f"{r['final_val_loss']:.4f}",
            _g(r.get("val_loss_delta_pct"), "+.2f"),
            f"{r['bytes_per_peer'] / 1e6:.2f}",
            f"{r['wall_s']:.0f}",
        )
    return t


def meets_target(row: Mapping[str, Any]) -> bool:
    """≥ 10× fewer bytes to the target at ≤ 1 % worse final validation loss."""
    ratio, delta = row.get("bytes_ratio_vs_uncompressed"), row.get("val_loss_delta_pct")
    return ratio is not None and delta is not None and ratio >= TARGET_RATIO and delta <= TARGET_DELTA_PCT


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    graphs = [g for g in (*GRAPHS, "server") if any(r["graph"] == g for r in rows)]
    fig, axes = plt.subplots(1, len(graphs), figsize=(7.5 * len(graphs), 7.0), squeeze=False)
    for ax, graph in zip(axes[0], graphs, strict=True):
        colours = itertools.cycle(plt.get_cmap("tab10")(range(10)))
        for r in rows:
            if r["graph"] != graph and not (
                graph == "server" and r["graph"] == "ring" and r["codec"] == "uncompressed"
            ):
                continue
            xs = [p[1] / 1e6 for p in r["curve"]]
            ys = [p[2] for p in r["curve"]]
            label = f"{r['codec']} ({r['level']})"
            if r["codec"] == "uncompressed":
                style: dict[str, Any] = dict(color="black", lw=1.0, alpha=0.6)
            elif meets_target(r):  # the rows that meet the target stand out
                style = dict(marker="o", ms=4, lw=2.6, zorder=3, color="crimson")
                label += f": {r['bytes_ratio_vs_uncompressed']:.1f}× at {r['val_loss_delta_pct']:+.2f} %"
            else:
                style = dict(marker=".", ms=3, lw=1.0, alpha=0.6)
            ax.plot(xs, ys, label=label, color=style.pop("color", next(colours)), **style)
        own = next((r for r in rows if r["graph"] == graph and r.get("target_val_loss") is not None), None)
        if own is not None:
            ax.axhline(own["target_val_loss"], color="grey", ls="--", lw=0.8, label="target")
        ax.set_xscale("log")
        # the first evaluations are alike: cut them so the finish is legible
        ax.set_ylim(top=min(ax.get_ylim()[1], 2.4))
        ax.set_xlabel("MB sent per peer (log)")
        ax.set_ylabel("validation loss of the averaged model")
        ax.set_title(graph if graph != "server" else "server (EF21-Muon) vs ring uncompressed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--graphs", default=",".join(GRAPHS), help="comma-separated topologies")
    ap.add_argument("--no-server", action="store_true", help="leave out the EF21-Muon rows")
    ap.add_argument(
        "--only", default="", help="comma-separated substrings of the codec labels to run (plus the seeds)"
    )
    ap.add_argument("--quick", action="store_true", help="30 rounds, the ring, a few variants (smoke run)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-compression"))
    ap.add_argument("--json", action="store_true", help="print {'rows': [...]} as JSON instead of the table")
    args = ap.parse_args(argv)
    rounds = 30 if args.quick else args.rounds
    graphs = ["ring"] if args.quick else [g.strip() for g in args.graphs.split(",") if g.strip()]
    bad = [g for g in graphs if g not in GRAPHS]
    if bad:
        ap.error(f"--graphs: {bad} not in {list(GRAPHS)}")
    jobs = [(v, g) for g in graphs for v in variants(args.quick)]
    if not args.no_server and "ring" in graphs:
        jobs += [(v, "ring") for v in server_variants(args.quick)]
    if args.only:  # the uncompressed seeds always run: they set the target
        jobs = [(v, g) for v, g in jobs if v.uncompressed or any(o in v.label for o in args.only.split(","))]
    rows: list[dict[str, Any]] = []
    with as_file(files("demuon.configs") / "demo-simulate.toml") as base:
        for i, (variant, graph) in enumerate(jobs, 1):
            where = "server" if variant.server else graph
            console.print(f"[{i}/{len(jobs)}] {where}: {variant.label} ({variant.level})")
            rows.append(measure(variant, graph, rounds, base))
    finish(rows, rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    (args.out / "compression.json").write_text(json.dumps({"rounds": rounds, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out / "compression.png")
    if args.json:
        keys = (
            "graph",
            "codec",
            "level",
            "bytes_to_target",
            "bytes_ratio_vs_uncompressed",
            "final_val_loss",
            "val_loss_delta_pct",
        )
        print(json.dumps({"rows": [{k: r.get(k) for k in keys} for r in slim]}, indent=1))
    else:
        Console(width=150).print(table(slim))
        console.print(f"wrote {args.out / 'compression.png'} and {args.out / 'compression.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
