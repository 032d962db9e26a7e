"""Building peers from a config: the one place that turns the root :class:`Config` into the
sections and resolved values a :class:`~demuon.node.peer.Peer` takes (layer 6).

``demuon simulate`` builds all N peers here; ``demuon run`` builds one, exactly the same way, so
the simulator and a daemon cluster start from identical state.
"""

from __future__ import annotations

import torch

from demuon.config import Config
from demuon.errors import ConfigError, TopologyError
from demuon.node.membership import Membership
from demuon.node.peer import Peer, PeerSetup, resolve_device, resolve_dtype
from demuon.topology import (
    PeerView,
    heir,
    leave_schedule,
    live_mixing_matrix,
    mixing_matrix_from_config,
    peer_view,
    period,
)
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


def leaves(config: Config) -> dict[int, int]:
    """``{peer: round it leaves at}`` of the fault plan's announced leaves, checked: they need
    a static undirected graph that stays connected (a bad plan fails here,
    naming the field, before anything starts)."""
    plan = {f.id: f.leave_at for f in config.faults.peer if f.leave_at is not None}
    if not plan:
        return {}
    if period(config.topology, config.peers) != 1:
        raise ConfigError(
            "faults.peer.leave_at",
            sorted(plan.values()),
            "announced leaves need a static graph (the topology varies with the round)",
        )
    if len(plan) >= config.peers:
        raise ConfigError("faults.peer.leave_at", sorted(plan), "at least one peer must stay")
    for r in sorted(set(plan.values())):
        try:
            live_mixing_matrix(
                base_matrix(config), [i for i in range(config.peers) if plan.get(i, r + 1) > r]
            )
        except TopologyError as exc:
            raise ConfigError("faults.peer.leave_at", r, str(exc)) from exc
    return plan


def base_matrix(config: Config) -> torch.Tensor:
    return mixing_matrix_from_config(config.topology, config.peers, 0)


def schedule_of(config: Config, index: int) -> list[tuple[int, list[PeerView]]]:
    """Peer ``index``'s views after each round at which peers leave: Metropolis weights on the
    graph of the peers that stay, which every peer computes alike from the shared config."""
    return leave_schedule(base_matrix(config), leaves(config), index)


def membership_of(config: Config, index: int) -> Membership:
    """Peer ``index``'s knowledge of the leaves: the plan's, and room for leaves announced at run
    time, which re-weight the survivors only in the exact mode on a static undirected graph."""
    W = base_matrix(config)
    undirected = torch.equal(W > 0, (W > 0).T)
    reweight = config.gossip.exact and undirected and period(config.topology, config.peers) == 1
    return Membership(W if reweight else None, index, leaves(config), config.network.leave_notice_rounds)


def view_at(config: Config, index: int, k: int) -> PeerView:
    """Peer ``index``'s view in round ``k``, leaves included (as :meth:`Peer.view` answers it)."""
    views = views_of(config, index)
    for start, later in schedule_of(config, index):
        if k >= start:
            views = later
    return views[k % len(views)]


def heir_of(config: Config, leaver: int) -> int:
    """Who takes over ``leaver``'s share of the trackers: its lowest-numbered neighbour that stays."""
    plan = leaves(config)
    found = heir(base_matrix(config), plan, leaver)
    if found is None:
        raise ConfigError("faults.peer.leave_at", plan[leaver], f"peer {leaver} has no neighbour that stays")
    return found


def build_peer(config: Config, index: int, workload: Workload, setup: PeerSetup) -> Peer:
    return Peer(
        index,
        workload,
        views_of(config, index),
        algorithm=config.algorithm,
        gossip=config.gossip,
        setup=setup,
        schedule=schedule_of(config, index),
    )


def build_peers(config: Config) -> tuple[list[Peer], Workload, PeerSetup]:
    """Every peer of ``config`` (each derives its views from the shared config alone, as a
    daemon peer would), with the workload and setup they share."""
    setup = peer_setup(config)
    workload = make_workload(config.workload, seed=config.seed, device=setup.device)
    return [build_peer(config, i, workload, setup) for i in range(config.peers)], workload, setup
