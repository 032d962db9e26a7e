"""The edge case: a real cluster on slow links. Wall-clock seconds and bytes per peer to a target
validation loss, uncompressed next to the compressed settings of ``bench/compression.py``.

Every peer runs as its own ``demuon run`` process in its own network namespace (``demuon netlab``:
a private bridge, addresses 10.213.x.x inside the namespaces only) and every peer's link is capped
with a token bucket (``tc tbf``) at each ``--rates`` value (10 and 100 Mbit/s). Workload: the
byte-level GPT of ``demuon/configs/demo-simulate.toml`` on a ring of ``--peers`` peers (4), one
torch thread each, ``--rounds`` rounds (60), every peer evaluating its own model every
``rounds/10`` rounds. Root only (namespaces).

The target is the uncompressed run's mean per-peer validation loss at 80 % of its rounds on the
fastest link; for each run: the seconds (the slowest peer's summed round times) and the bytes per
peer (whole wire messages) until the mean per-peer validation loss first reaches it, and the final
validation loss of the averaged model (``summary.json``).

    sudo python bench/edge.py [--peers 4] [--rounds 60] [--rates 10mbit,100mbit]
                              [--out runs/bench-edge] [--json]

Writes ``edge.png`` (validation loss against seconds, one panel per rate) and ``edge.json``.
On 2 CPU cores the peers share the cores, so compute also limits the rounds; the uncompressed
run at 10 Mbit/s is the long one (about 3.3 MB per peer per round on the 4-peer ring). Resends
are set to start after 30 s (``network.resend_s``, see ``RESEND_S``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from demuon import results

console = Console(stderr=True)

#: (label, --set overrides): uncompressed and the settings bench/compression.py measured best.
SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("uncompressed", ()),
    (
        "V=int8 X=int8",
        ("gossip.v.codec={kind = 'int8'}", "gossip.x.codec={kind = 'int8'}"),
    ),
    (
        "V=int8 X=blockq1, no keyframes",
        (
            "gossip.v.codec={kind = 'int8'}",
            "gossip.x.codec={kind = 'blockq', bits = 1}",
            "gossip.keyframe_every=0",
        ),
    ),
    (
        "V=int8+deflate X=blockq1, no keyframes",
        (
            "gossip.v.codec={kind = 'int8', deflate = true}",
            "gossip.x.codec={kind = 'blockq', bits = 1}",
            "gossip.keyframe_every=0",
        ),
    ),
)
TARGET_AT = 0.8
#: network.resend_s on these links: above the time a round's messages take to send (3.3 MB per peer
#: per round uncompressed, 2.6 s at 10 Mbit/s). With the default 1 s, resends of copies the slow
#: link is still sending queue up faster than it drains them (measured: round 3 at 22 s, 6 resends).
RESEND_S = 30.0


def run_one(config: Path, out: Path, peers: int, rounds: int, rate: str, sets: Sequence[str]) -> float:
    """One ``demuon netlab`` run; returns its wall-clock seconds."""
    every = max(1, rounds // 10)
    cmd = [
        sys.executable, "-m", "demuon", "netlab", "--config", str(config), "--out", str(out), "--no-live",
        "--every", str(every), "--set", f"peers={peers}", "--set", f"rounds={rounds}",
        "--set", f"eval_every={every}", "--set", "threads=1", "--set", "security.enabled=false",
        "--set", "network.phase_timeout_s=120.0", "--set", "network.start_timeout_s=120.0",
        "--set", f"network.resend_s={RESEND_S}",
        *(x for s in sets for x in ("--set", s)),
        *(x for i in range(peers) for x in ("--rate", f"{i}={rate}")),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"netlab failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - start


def curve(out: Path, peers: int) -> list[tuple[int, float, float, float]]:
    """(round, seconds so far, MB per peer so far, mean per-peer validation loss) at each
    evaluation round: seconds = the slowest peer's summed ``t_round``."""
    rows = results.read_per_peer(out)
    n = min(len(r) for r in rows.values())
    points, t, sent = [], [0.0] * peers, 0.0
    for k in range(n):
        for i in range(peers):
            t[i] += float(rows[i][k]["t_round"])
        sent += sum(float(rows[i][k]["bytes_out"]) for i in range(peers)) / peers
        vals = [float(v) for i in range(peers) if (v := rows[i][k].get("val_loss")) is not None]
        if len(vals) == peers:
            points.append((k, max(t), sent / 1e6, sum(vals) / peers))
    return points


def table(rows: Sequence[Mapping[str, Any]]) -> Table:
    t = Table(title="edge: peers in network namespaces, every link capped with tc tbf")
    for c in (
        "rate",
        "setting",
        "s to target",
        "MB to target",
        "× faster",
        "final val",
        "MB / peer",
        "wall s",
    ):
        t.add_column(c, justify="left" if c in ("rate", "setting") else "right")
    for r in rows:
        t.add_row(
            r["rate"],
            r["setting"],
            "—" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.0f}",
            "—" if r["mb_to_target"] is None else f"{r['mb_to_target']:.1f}",
            "—" if r["speedup_vs_uncompressed"] is None else f"{r['speedup_vs_uncompressed']:.1f}",
            "—" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}",
            f"{r['mb_per_peer']:.1f}",
            f"{r['wall_s']:.0f}",
        )
    return t


def plot(rows: Sequence[Mapping[str, Any]], rates: Sequence[str], target: float, path: Path) -> None:
    fig, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 4.6), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for r in rows:
            if r["rate"] == rate:
                ax.plot(
                    [p[1] for p in r["curve"]],
                    [p[3] for p in r["curve"]],
                    marker="o",
                    ms=3,
                    label=r["setting"],
                )
        ax.axhline(target, color="grey", ls="--", lw=0.8, label="target")
        ax.set_xlabel("seconds (slowest peer)")
        ax.set_ylabel("mean per-peer validation loss")
        ax.set_title(f"links capped at {rate}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--rates", default="10mbit,100mbit", help="tc tbf rates, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-edge"))
    ap.add_argument("--json", action="store_true", help="print {'rows': [...]} as JSON instead of the table")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("the peers run in network namespaces: run as root")
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    rows: list[dict[str, Any]] = []
    with as_file(files("demuon.configs") / "demo-simulate.toml") as config:
        for rate in rates:
            for label, sets in SETTINGS:
                out = args.out / f"{rate}-{label.replace(' ', '_').replace('=', '').replace(',', '')}"
                console.print(f"{rate}: {label} …")
                wall = run_one(config, out, args.peers, args.rounds, rate, sets)
                summary = json.loads((out / "summary.json").read_text())
                points = curve(out, args.peers)
                rows.append(
                    {
                        "rate": rate,
                        "setting": label,
                        "wall_s": wall,
                        "curve": points,
                        "final_val_loss": summary["average"]["validation_loss"],
                        "mb_per_peer": summary["bytes"]["out_per_peer"] / 1e6,
                    }
                )
    fastest = next(r for r in rows if r["setting"] == "uncompressed" and r["rate"] == rates[-1])
    evals = max(1, args.rounds // 10)
    at = math.ceil(TARGET_AT * args.rounds / evals) * evals - 1
    target = next(p[3] for p in fastest["curve"] if p[0] == at)
    for r in rows:
        hit = next((p for p in r["curve"] if p[3] <= target), None)
        r["seconds_to_target"], r["mb_to_target"] = (hit[1], hit[2]) if hit else (None, None)
    for r in rows:
        base = next(b for b in rows if b["rate"] == r["rate"] and b["setting"] == "uncompressed")
        ok = r["seconds_to_target"] and base["seconds_to_target"]
        r["speedup_vs_uncompressed"] = base["seconds_to_target"] / r["seconds_to_target"] if ok else None
        r["target_val_loss"] = target
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edge.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    plot(rows, rates, target, args.out / "edge.png")
    slim = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    if args.json:
        print(json.dumps({"rows": slim}, indent=1))
    else:
        Console(width=150).print(table(slim))
        console.print(f"wrote {args.out / 'edge.png'} and {args.out / 'edge.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
