"""What a flood of huge headers costs the peer that receives it, next to one round of training.

    python bench/hostile.py [--json] [--repeats N]

The attack: 64 messages whose frame 0 is about 1 MiB, a well-sealed header with 15,800 tensor
entries (checksum correct, so only the limits stop it). Each is handed to the decoder of peer 0 of
``demuon/configs/oracle-ring4.toml`` as its transport would, side by side:

    run limits   the receive context a peer builds now: frame 0 at most ``wire.header_bound`` of
                 the run's tensors, msgpack arrays no longer than its tensor list
    wide header  the same, but frame 0 up to 2 MiB: msgpack refuses the tensor list from its
                 length prefix
    old limits   frame 0 up to 2 MiB and arrays up to 65,536 entries (the fixed limits before
                 they were derived from the run; emulated with a receiver of 65,536 tensors): the
                 header is parsed and checked entry by entry

and one round of the same config (``simulate_round`` of all 4 peers, divided by 4) for scale. The
median over the repetitions; a ratio above 1 means the flood costs more than a round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demuon.app import simulate  # noqa: E402
from demuon.app.peers import build_peers  # noqa: E402
from demuon.config import load_config  # noqa: E402
from demuon.errors import WireFormatError  # noqa: E402
from demuon.node.gossip import Gossip  # noqa: E402
from demuon.transport import wire  # noqa: E402
from tests.support.wire import rewrite  # noqa: E402

CONFIG = ROOT / "demuon" / "configs" / "oracle-ring4.toml"
FLOOD = 64
ENTRIES = 15_800


def attack_frames(peer_names: list[str]) -> list[bytes]:
    """One attack message: a valid message of the run whose header lists ENTRIES tensors."""
    import torch

    from demuon.transport.codecs import Identity

    tensors = {n: Identity().encode(torch.zeros(6, 12), seed=0) for n in peer_names}
    frames = wire.encode(sender=1, round=0, phase="V", codec="identity", tensors=tensors)
    entry = {"name": "w" * 8, "shape": [1], "dtype": "float32", "meta": {}, "buffers": [["float32", [1], 4]]}
    return rewrite(frames, lambda h: h.__setitem__("tensors", [entry] * ENTRIES))


def reject_all(ctx: wire.DecodeContext, frames: list[bytes]) -> tuple[float, str]:
    views = [memoryview(f) for f in frames]
    kind = ""
    start = time.perf_counter()
    for _ in range(FLOOD):
        try:
            wire.decode(views, ctx)
        except WireFormatError as err:
            kind = err.kind
    return time.perf_counter() - start, kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (median)")
    args = parser.parse_args(argv)
    config = load_config(CONFIG)
    peers = build_peers(config)[0]
    g = Gossip(peers[0], config.network, n_peers=config.peers, rounds=config.rounds)
    run_ctx = g._context(0)
    wide_ctx = replace(run_ctx, max_header_bytes=2 << 20, max_message_bytes=1 << 30)
    many = {**run_ctx.shapes, **{f"t{i}": (1,) for i in range(wire.MAX_ARRAY - len(run_ctx.shapes))}}
    old_ctx = replace(wide_ctx, shapes=many, keyframe_shapes=None)
    contexts = {"run limits": run_ctx, "wide header": wide_ctx, "old limits": old_ctx}
    frames = attack_frames(list(peers[0].names))
    times: dict[str, list[float]] = {name: [] for name in (*contexts, "round")}
    kinds: dict[str, str] = {}
    for r in range(args.repeats):
        for name, ctx in contexts.items():
            seconds, kinds[name] = reject_all(ctx, frames)
            times[name].append(seconds)
        start = time.perf_counter()
        simulate.simulate_round(peers, r)
        times["round"].append((time.perf_counter() - start) / len(peers))
    median = {k: statistics.median(v) for k, v in times.items()}
    rows: list[dict[str, Any]] = [
        {
            "limits": name,
            "header_bytes": len(frames[0]),
            "flood_s": median[name],
            "rejected_as": kinds[name],
            "flood_vs_round": median[name] / median["round"],
        }
        for name in contexts
    ]
    if args.json:
        print(json.dumps({"round_s": median["round"], "rows": rows}, indent=1))
        return 0
    print(f"{FLOOD} headers of {len(frames[0]) / 2**20:.2f} MiB with {ENTRIES} tensor entries each")
    print(f"one round of {CONFIG.name} per peer: {median['round'] * 1e3:.2f} ms")
    print(f"{'limits':<12} {'flood':>12} {'rejected as':<14} {'flood / round':>14}")
    for row in rows:
        print(
            f"{row['limits']:<12} {float(row['flood_s']) * 1e3:>9.2f} ms {row['rejected_as']:<14} "
            f"{row['flood_vs_round']:>14.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
