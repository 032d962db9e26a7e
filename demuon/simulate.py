"""N peers in one process: the same :class:`~demuon.node.peer.Peer` and math as the daemon, with
exact delivery instead of sockets (layer 6, a composition root).

It is both a research tool (compare decentralized optimizers across graphs before deploying) and
the oracle the networked daemon must match: with the identity codec and no faults, a cluster and
the simulator produce the same parameters for the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from demuon import results
from demuon.config import Config
from demuon.node.peer import Peer, resolve_device
from demuon.topology import mixing_matrix_from_config, peer_view, period
from demuon.workloads import Workload, make_workload

ProgressHook = Callable[[int, Mapping[str, Any]], None]


@dataclass
class SimulationResult:
    config: Config
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    peers: list[Peer] = field(default_factory=list)


def build_peers(config: Config, workload: Workload, device: torch.device) -> list[Peer]:
    """Every peer derives its views from the shared config alone, as a daemon peer would."""
    n = config.peers
    Ws = [mixing_matrix_from_config(config.topology, n, t) for t in range(period(config.topology, n))]
    return [Peer(i, config, workload, [peer_view(W, i) for W in Ws], device=device) for i in range(n)]


def consensus_error(peers: Sequence[Peer]) -> float:
    """sqrt(Σ_params ‖stack_i(X_i − X̄)‖²): spectral norm of the stacked (N·m)×n matrix for ≥2-D
    parameters, ℓ2 for 1-D and scalars (ALGORITHMS.md §1.6)."""
    total = 0.0
    for name in peers[0].names:
        stack = torch.stack([p.params[name].detach().double() for p in peers])
        dev = stack - stack.mean(dim=0, keepdim=True)
        if dev.dim() >= 3:
            flat = dev.reshape(dev.shape[0] * dev.shape[1], -1)
            total += float(torch.linalg.matrix_norm(flat, ord=2)) ** 2
        else:
            total += float(dev.square().sum())
    return total**0.5


def tracking_gap(peers: Sequence[Peer]) -> float | None:
    """‖mean_i V_i − mean_i M_i‖ over all parameters (ALGORITHMS.md §7 item 17); None for DSGD."""
    if "V" not in peers[0].phases:
        return None
    sq = 0.0
    for name in peers[0].names:
        mv = torch.stack([p.V[name].double() for p in peers]).mean(0)
        mm = torch.stack([p.M[name].double() for p in peers]).mean(0)
        sq += float((mv - mm).square().sum())
    return sq**0.5


def averaged_validation_loss(
    workload: Workload,
    seed: int,
    states: Sequence[Mapping[str, torch.Tensor]],  # each peer's parameters by name (not modified)
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Validation loss of the model whose parameters are the mean of the peers' (the mean is
    taken in float64, then cast to ``dtype``). The simulator and ``demuon launch`` both use it."""
    model = workload.build_model(seed).to(device or torch.device("cpu"), dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            stacked = torch.stack([torch.as_tensor(s[name]).to(param.device, torch.float64) for s in states])
            param.copy_(stacked.mean(0))
    return float(workload.validation_loss(model))


def simulate_round(peers: Sequence[Peer], k: int) -> tuple[float, int]:
    """One iteration for every peer with exact delivery. Returns (mean loss, payload bytes sent)."""
    losses = [p.gradient(k) for p in peers]
    sent = 0
    for phase in peers[0].phases:
        encoded = [p.message(phase, k) for p in peers]
        decoded = [p.decode(enc) for p, enc in zip(peers, encoded, strict=True)]
        for p, enc in zip(peers, encoded, strict=True):
            sent += len(p.recipients(k)) * sum(
                b.numel() * b.element_size() for e in enc.values() for b in e.buffers
            )
        for p in peers:
            p.mix(phase, k, {j: decoded[j] for j in p.expected_senders(k)})
    return sum(losses) / len(losses), sent


def run(config: Config, *, out: Path | None = None, progress: ProgressHook | None = None) -> SimulationResult:
    """Run ``config.rounds`` iterations of ``config.algorithm`` on ``config.peers`` simulated peers."""
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    workload = make_workload(config.workload, seed=config.seed, device=device)
    peers = build_peers(config, workload, device)
    res = SimulationResult(config=config, peers=peers)
    writer = results.MetricsWriter(out / "metrics.jsonl") if out else None
    start = time.perf_counter()
    try:
        for k in range(config.rounds):
            loss, sent = simulate_round(peers, k)
            last = k == config.rounds - 1
            val = (
                averaged_validation_loss(
                    workload, config.seed, [p.X() for p in peers], device=device, dtype=peers[0].dtype
                )
                if last or (k + 1) % config.eval_every == 0
                else None
            )
            row = {
                "round": k,
                "train_loss": loss,
                "val_loss": val,
                "consensus_error": consensus_error(peers),
                "tracking_gap": tracking_gap(peers),
                "bytes": sent,
                "lr": peers[0].lr(k),
            }
            res.rows.append(row)
            if writer:
                writer.write(row)
            if progress:
                progress(k, row)
    finally:
        if writer:
            writer.close()
    res.summary = results.summary(
        algorithm=config.algorithm.name,
        topology=config.topology.name,
        rounds=config.rounds,
        peers=[results.peer_entry(p.index, p.round, p.last_loss, p.fingerprint()) for p in peers],
        validation_loss=res.rows[-1]["val_loss"],
        source="simulate",
        extra={
            "wall_s": time.perf_counter() - start,
            "codec": config.gossip.codec.kind,
            "lr": config.algorithm.lr,
        },
    )
    if out:
        results.write_summary(out, res.summary)
    return res
