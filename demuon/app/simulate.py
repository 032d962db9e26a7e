"""``demuon simulate``: N peers in one process, through the same round driver and the same
:class:`~demuon.node.peer.Peer` as the daemon, with exact delivery instead of sockets (layer 6).

It is both a research tool (compare decentralized optimizers across graphs before deploying) and
the oracle the networked daemon must match: with the identity codec and no faults, a cluster and
the simulator produce the same parameters for the same seed.

With ``out``, the run folder holds what a ``demuon launch`` folder holds (:mod:`demuon.results`):
``peer-<i>/metrics.jsonl`` with the daemon's row keys, ``summary.json`` in the shared schema, and
in addition ``cluster.jsonl``, the measurements that need every peer at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from demuon import results
from demuon.app.peers import build_peers, heir_of, leaves
from demuon.app.summary import config_fields
from demuon.config import Config
from demuon.node.exchange import ExactExchange, Poison
from demuon.node.observe import (
    TrackerState,
    averaged_validation_loss,
    consensus_error,
    tracking_drift,
    tracking_gap,
)
from demuon.node.peer import Peer
from demuon.node.rounds import RoundMetrics, keyframe_due, run_round
from demuon.transport.faults import plan_from_config
from demuon.workloads import Workload

R = TypeVar("R")

#: ``progress(k, cluster_row)`` after every round.
ProgressHook = Callable[[int, Mapping[str, Any]], None]


@dataclass
class SimulationResult:
    config: Config
    per_peer: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # peer → metrics rows
    cluster: list[dict[str, Any]] = field(default_factory=list)  # one cluster row per round
    summary: dict[str, Any] = field(default_factory=dict)
    peers: list[Peer] = field(default_factory=list)


async def simulate_round_async(
    peers: Sequence[Peer],
    k: int,
    exchange: ExactExchange,
    *,
    keyframe_every: int = 0,
    eval_every: int = 0,
) -> list[RoundMetrics]:
    """Round ``k`` of every peer: one :func:`~demuon.node.rounds.run_round` each, all meeting at
    the exact exchange's barrier once per phase (each validates its own model every
    ``eval_every`` rounds, as a daemon does)."""
    keyframe = keyframe_due(k, exact=peers[0].exact, every=keyframe_every)
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(run_round(p, k, exchange.side(p.index), keyframe=keyframe, eval_every=eval_every))
            for p in peers
        ]
    return [t.result() for t in tasks]


def run_sync(main: Coroutine[Any, Any, R], threads: int) -> R:
    """Run ``main`` to the end from synchronous code, also when an event loop is already running
    in this thread (then on a worker thread whose torch thread count is set to ``threads`` first,
    since the intra-op thread count is per OS thread and changes reduction orders)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main)
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        return pool.submit(asyncio.run, main).result()


def simulate_round(peers: Sequence[Peer], k: int, *, keyframe_every: int = 0) -> list[RoundMetrics]:
    """:func:`simulate_round_async` from synchronous code (its own event loop)."""
    main = simulate_round_async(peers, k, ExactExchange(peers), keyframe_every=keyframe_every)
    return run_sync(main, torch.get_num_threads())


def cluster_row(
    config: Config, peers: Sequence[Peer], metrics: Sequence[RoundMetrics], k: int, workload: Workload
) -> dict[str, Any]:
    """The cluster-level row of round ``k`` (``cluster.jsonl``, see :mod:`demuon.results`)."""
    last = k == config.rounds - 1
    val = (
        averaged_validation_loss(
            workload, config.seed, [p.X() for p in peers], device=peers[0].device, dtype=peers[0].dtype
        )
        if last or (k + 1) % config.eval_every == 0
        else None
    )
    return {
        "round": k,
        "train_loss": sum(m.train_loss for m in metrics) / len(metrics),
        "val_loss": val,
        "consensus_error": consensus_error(peers),
        "tracking_gap": tracking_gap(peers),  # without the mass in flight
        "tracking_gap_in_flight": tracking_gap(peers, k),  # counting it as delivered
        "bytes_out": sum(m.bytes_out for m in metrics),
        "lr": peers[0].lr(k),
    }


async def _rounds(
    config: Config,
    peers: Sequence[Peer],
    workload: Workload,
    res: SimulationResult,
    writers: Mapping[int, results.MetricsWriter],
    cluster: results.MetricsWriter | None,
    progress: ProgressHook | None,
) -> None:
    exchange = ExactExchange(peers, plan_from_config(config.faults))
    plan = leaves(config)
    by_index = {p.index: p for p in peers}
    for k in range(config.rounds):
        for gone in sorted(i for i, r in plan.items() if r == k):  # announced leaves, as the round starts
            by_index[heir_of(config, gone)].inherit(by_index[gone].handoff())
            exchange.retire(gone)
            for p in peers:
                p.retire(gone)
        active = [p for p in peers if plan.get(p.index, config.rounds) > k]
        metrics = await simulate_round_async(
            active, k, exchange, keyframe_every=config.gossip.keyframe_every, eval_every=config.eval_every
        )
        for m in metrics:
            row = m.row()
            res.per_peer[m.peer].append(row)
            if m.peer in writers:
                writers[m.peer].write(row)
        row = cluster_row(config, active, metrics, k, workload)
        res.cluster.append(row)
        if cluster is not None:
            cluster.write(row)
        if progress:
            progress(k, row)


def run(config: Config, *, out: Path | None = None, progress: ProgressHook | None = None) -> SimulationResult:
    """Run ``config.rounds`` iterations of ``config.algorithm`` on ``config.peers`` simulated peers."""
    torch.set_num_threads(config.threads)
    peers, workload, _ = build_peers(config)
    res = SimulationResult(config=config, peers=peers, per_peer={p.index: [] for p in peers})
    writers = (
        {p.index: results.MetricsWriter(results.peer_folder(out, p.index) / results.METRICS) for p in peers}
        if out
        else {}
    )
    cluster = results.MetricsWriter(out / results.CLUSTER) if out else None
    start = time.perf_counter()
    try:
        run_sync(_rounds(config, peers, workload, res, writers, cluster, progress), config.threads)
    finally:
        for w in [*writers.values(), *([cluster] if cluster else [])]:
            w.close()
    gone = leaves(config)
    stay = [p for p in peers if p.index not in gone]
    res.summary = results.summary(
        source="simulate",
        **config_fields(config),
        peers=[
            results.peer_entry(
                p.index, p.round, p.last_loss, p.fingerprint(), status="left" if p.index in gone else "done"
            )
            for p in peers
        ],
        validation_loss=res.cluster[-1]["val_loss"],
        averaged_peers=[p.index for p in stay],
        wall_s=time.perf_counter() - start,
        tracking_drift=tracking_drift([TrackerState.of(p, config.rounds - 1) for p in stay]),
        faults=results.fault_totals(res.per_peer),
        per_peer_rows=res.per_peer,
    )
    if out:
        results.write_summary(out, res.summary)
    return res


def run_poisoned(config: Config, poison: Poison | None) -> list[Peer]:
    """``config.rounds`` rounds with ``poison`` replacing one peer's messages (a Byzantine
    neighbour, for the guard's tests and bench); no files, no metrics. Returns the peers."""
    torch.set_num_threads(config.threads)
    peers, _, _ = build_peers(config)
    exchange = ExactExchange(peers, poison=poison)

    async def rounds() -> None:
        for k in range(config.rounds):
            await simulate_round_async(peers, k, exchange)

    run_sync(rounds(), config.threads)
    return peers
