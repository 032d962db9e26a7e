"""Building peers from a config: the one place that turns the root :class:`Config` into the
sections and resolved values a :class:`~demuon.node.peer.Peer` takes (layer 6).

``demuon simulate`` builds all N peers here; ``demuon run`` builds one, exactly the same way, so
the simulator and a daemon cluster start from identical state.
"""

from __future__ import annotations

import torch

from demuon.config import Config
from demuon.node.peer import Peer, PeerSetup, resolve_device, resolve_dtype
from demuon.topology import PeerView, mixing_matrix_from_config, peer_view, period
from demuon.workloads import Workload, make_workload


def peer_setup(config: Config, device: torch.device | None = None) -> PeerSetup:
    """The run's shape with the config's device and dtype resolved (``auto`` → cuda if present)."""
    return PeerSetup(
        seed=config.seed,
        n_peers=config.peers,
        rounds=config.rounds,
        device=device if device is not None else resolve_device(config.device),
        dtype=resolve_dtype(config.dtype),
    )


def views_of(config: Config, index: int) -> list[PeerView]:
    """Peer ``index``'s view of the mixing matrix for each round of the topology's period."""
    n = config.peers
    Ws = [mixing_matrix_from_config(config.topology, n, t) for t in range(period(config.topology, n))]
    return [peer_view(W, index) for W in Ws]


def build_peer(config: Config, index: int, workload: Workload, setup: PeerSetup) -> Peer:
    return Peer(
        index,
        workload,
        views_of(config, index),
        algorithm=config.algorithm,
        gossip=config.gossip,
        setup=setup,
    )


def build_peers(config: Config) -> tuple[list[Peer], Workload, PeerSetup]:
    """Every peer of ``config`` (each derives its views from the shared config alone, as a
    daemon peer would), with the workload and setup they share."""
    setup = peer_setup(config)
    workload = make_workload(config.workload, seed=config.seed, device=setup.device)
    return [build_peer(config, i, workload, setup) for i in range(config.peers)], workload, setup
