"""Cluster-level measurements that need every peer's state at once (layer 4).

Only the simulator holds all peers; it writes these to ``cluster.jsonl``. ``demuon launch`` and
``demuon report`` use :func:`averaged_validation_loss` on the peers' final parameters.
docs/algorithms.md §2.5 defines the consensus error and the tracking invariant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from demuon.node.peer import Peer
from demuon.workloads import Workload


def consensus_error(peers: Sequence[Peer]) -> float:
    """sqrt(Σ_params ‖stack_i(X_i − X̄)‖²): spectral norm of the stacked (N·m)×n matrix for ≥2-D
    parameters, ℓ2 for 1-D and scalars (docs/algorithms.md §2.5)."""
    return consensus_error_of([{n: p.params[n].detach() for n in p.names} for p in peers])


def consensus_error_of(states: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """:func:`consensus_error` of parameter sets (name → tensor, one per peer), e.g. read back
    from ``final.pt`` files."""
    total = 0.0
    for name in states[0]:
        stack = torch.stack([s[name].double() for s in states])
        dev = stack - stack.mean(dim=0, keepdim=True)
        if dev.dim() >= 3:
            flat = dev.reshape(dev.shape[0] * dev.shape[1], -1)
            total += float(torch.linalg.matrix_norm(flat, ord=2)) ** 2
        else:
            total += float(dev.square().sum())
    return math.sqrt(total)


@dataclass(frozen=True)
class TrackerState:
    """What the tracking invariant needs of one peer: its V and M, and with running sums its own
    S, its ρ per in-neighbour and its view of the round (float64 or not, any device)."""

    index: int
    V: Mapping[str, torch.Tensor]
    M: Mapping[str, torch.Tensor]
    S: Mapping[str, torch.Tensor]
    rho: Mapping[int, Mapping[str, torch.Tensor]]
    in_neighbours: tuple[tuple[int, float], ...]
    R_self: Mapping[str, torch.Tensor] = field(default_factory=dict)  # compressed: Σ_t V̂^t, own
    R: Mapping[int, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # ... of each copy
    gamma: float = 1.0
    B: Mapping[int, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # lent to self, by sender

    @classmethod
    def of(cls, peer: Peer, k: int) -> TrackerState:
        return cls(
            peer.index,
            peer.V,
            peer.M,
            peer.S,
            peer.rho,
            peer.view(k).in_neighbours,
            peer.R_self.get("V", {}),
            peer.R.get("V", {}),
            peer.gammas.get("V", 1.0),
            peer.B,
        )


def _in_flight(states: Sequence[TrackerState], name: str) -> torch.Tensor:
    """Tracker mass of parameter ``name`` sent but not yet used, summed over every link between
    ``states`` (float64): ``w_ij (S_j − ρ_ij) − B_ij`` with running sums (minus what a missing
    sender's weight lent to self), ``γ w_ij (R_j − R_ij)`` (the repair the next keyframe brings)
    with compressed replica sums (docs/algorithms.md §8), else zero."""
    by_index = {s.index: s for s in states}
    total = torch.zeros_like(states[0].V[name], dtype=torch.float64, device="cpu")
    for s in states:
        for j, w in s.in_neighbours:
            sender = by_index.get(j)
            if sender is not None and sender.S and j in s.rho:
                total += w * (sender.S[name].double().cpu() - s.rho[j][name].double().cpu())
                if j in s.B:
                    total -= s.B[j][name].double().cpu()
            elif sender is not None and sender.R_self and j in s.R:
                total += s.gamma * w * (sender.R_self[name].double().cpu() - s.R[j][name].double().cpu())
    return total


def _gap(states: Sequence[TrackerState], count_in_flight: bool) -> tuple[float, float]:
    """``(‖mean V (+ in-flight/N) − mean M‖, ‖mean M‖)`` over all parameters, float64."""
    gap = mean_m = 0.0
    for name in states[0].V:
        v = torch.stack([s.V[name].double().cpu() for s in states]).mean(0)
        if count_in_flight:
            v = v + _in_flight(states, name) / len(states)
        m = torch.stack([s.M[name].double().cpu() for s in states]).mean(0)
        gap += float((v - m).square().sum())
        mean_m += float(m.square().sum())
    return math.sqrt(gap), math.sqrt(mean_m)


def tracking_drift(states: Sequence[TrackerState]) -> float | None:
    """``‖mean V + in-flight/N − mean M‖ / max(‖mean M‖, 1e-12)`` over all parameters, float64:
    how far the network-wide averages are from mean V = mean M, counting tracker mass still in
    flight on a link as delivered. None without trackers (empty V)."""
    if not states or not states[0].V:
        return None
    gap, mean_m = _gap(states, count_in_flight=True)
    return gap / max(mean_m, 1e-12)


def tracking_gap(peers: Sequence[Peer], k: int | None = None) -> float | None:
    """‖mean_i V_i − mean_i M_i‖ over all parameters (docs/algorithms.md §9 item 17); None
    without a tracker. With ``k`` (the round just run), tracker mass still in flight after it
    counts as if delivered: the invariant mean V = mean M then holds under message loss too."""
    if "V" not in peers[0].phases:
        return None
    states = [TrackerState.of(p, 0 if k is None else k) for p in peers]
    return _gap(states, count_in_flight=k is not None)[0]


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
