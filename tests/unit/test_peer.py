"""The per-peer fast path (Peer + simulator) against the stacked float64 oracle, and C-DeMuon's
replica properties (docs/algorithms.md §6, §9 items 16–17)."""

from __future__ import annotations

import pytest
import torch

from demuon.app import simulate
from demuon.app.peers import build_peers
from demuon.config import Config, config_from_dict
from demuon.node import algorithms
from demuon.node.observe import tracking_gap
from demuon.node.peer import Peer
from demuon.topology import mixing_matrix_from_config


def quadratic_config(algorithm: str, **extra: object) -> Config:
    data: dict[str, object] = {
        "peers": 4,
        "rounds": 6,
        "seed": 3,
        "dtype": "float64",
        "topology": {"name": "ring"},
        "algorithm": {
            "name": algorithm,
            "lr": 0.05,
            "theta": 0.3,
            "routing": {"matrix": "polar_svd"},
        },
        "workload": {"kind": "quadratic", "rows": 16, "dim_in": 6, "dim_out": 4, "heterogeneity": 1.0},
    }
    data.update(extra)
    return config_from_dict(data)


def build(config: Config) -> list[Peer]:
    return build_peers(config.model_copy(update={"device": "cpu"}))[0]


def stacked(peers: list[Peer], attr: str) -> torch.Tensor:
    name = peers[0].names[0]
    if attr == "X":
        return torch.stack([p.params[name].detach().clone() for p in peers])
    return torch.stack([getattr(p, attr)[name].clone() for p in peers])


def mix_phases(peers: list[Peer], k: int) -> None:
    for phase in peers[0].phases:
        decoded = [p.decode(p.message(phase, k), phase) for p in peers]
        for p in peers:
            p.mix(phase, k, {j: decoded[j] for j in p.expected_senders(k)})


@pytest.mark.parametrize("algorithm", algorithms.NAMES)
def test_peer_fast_path_equals_the_float64_reference_round(algorithm: str) -> None:
    config = quadratic_config(algorithm)
    peers = build(config)
    W = mixing_matrix_from_config(config.topology, config.peers)
    X, M, V = stacked(peers, "X"), stacked(peers, "M"), stacked(peers, "V")
    for k in range(config.rounds):
        for p in peers:
            p.gradient(k)
        G = stacked(peers, "G")
        X, M, V = algorithms.reference_round(
            algorithm, W, X, M, V, G, k, lr=peers[0].lr(k), theta=config.algorithm.theta
        )
        mix_phases(peers, k)
        assert torch.allclose(stacked(peers, "X"), X, atol=1e-10, rtol=0)
        assert torch.allclose(stacked(peers, "M"), M, atol=1e-10, rtol=0)
        assert torch.allclose(stacked(peers, "V"), V, atol=1e-10, rtol=0)


def test_identity_codec_with_replicas_reproduces_exact_demuon() -> None:
    """docs/algorithms.md §9 item 16: Option A with the identity compressor and γ = 1 is DeMuon (to
    rounding)."""
    exact = quadratic_config("demuon")
    peers_exact = build(exact)
    peers_choco = build(exact)
    for p in peers_choco:
        p.exact_phase = dict.fromkeys(p.phases, False)  # force the replica path with identity, γ = 1
    for k in range(exact.rounds):
        for a, b in zip(peers_exact, peers_choco, strict=True):
            a.gradient(k)
            b.gradient(k)
        mix_phases(peers_exact, k)
        mix_phases(peers_choco, k)
    assert torch.allclose(stacked(peers_exact, "X"), stacked(peers_choco, "X"), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "codec", [{"kind": "topk", "ratio": 0.2}, {"kind": "natural"}, {"kind": "rankk", "rank": 1}]
)
def test_compressed_gossip_keeps_mean_tracker_equal_to_mean_momentum(codec: dict[str, object]) -> None:
    """docs/algorithms.md §9 item 17: with any compressor, mean_i V_i = mean_i M_i at every round."""
    config = quadratic_config("demuon", gossip={"codec": codec, "gamma": 0.2}, rounds=30)
    peers = build(config)
    for k in range(config.rounds):
        simulate.simulate_round(peers, k)
        gap = tracking_gap(peers)
        assert gap is not None and gap < 1e-10


def test_simulator_runs_are_bitwise_reproducible() -> None:
    config = quadratic_config("demuon", dtype="float32", rounds=5)
    a = simulate.run(config)
    b = simulate.run(config)
    assert [p["fingerprint"] for p in a.summary["peers"]] == [p["fingerprint"] for p in b.summary["peers"]]


def test_missing_neighbour_gives_its_weight_to_self() -> None:
    config = quadratic_config("dsgd", rounds=1)
    peers = build(config)
    p = peers[0]
    p.gradient(0)
    before = {n: t.clone() for n, t in p.X().items()}
    Y = p.decode(p.message("X", 0), "X")
    report = p.mix("X", 0, {})  # nobody arrived
    assert report.missing == (1, 3)
    for n in p.names:
        assert torch.equal(p.params[n].detach(), Y[n])
        assert not torch.equal(p.params[n].detach(), before[n])


def test_keyframe_resynchronises_a_stale_replica() -> None:
    config = quadratic_config("demuon", gossip={"codec": {"kind": "topk", "ratio": 0.2}, "gamma": 0.2})
    peers = build(config)
    for k in range(3):
        for p in peers:
            p.gradient(k)
        for phase in p.phases:
            out = {p.index: p.message(phase, k, keyframe=(k == 2)) for p in peers}
            for p in peers:
                # peer 0 misses peer 1's messages in round 1 only
                got = {
                    j: p.decode(out[j], phase, keyframe=k == 2)
                    for j in p.expected_senders(k)
                    if not (p.index == 0 and j == 1 and k == 1)
                }
                report = p.mix(phase, k, got, keyframes=frozenset(out) if k == 2 else frozenset())
                if p.index == 0 and k == 1:
                    assert 1 in report.missing
    # after the keyframe round, peer 0's replica of peer 1 equals peer 1's own replica
    for phase in peers[0].phases:
        for n in peers[0].names:
            assert torch.equal(peers[0].hat[phase][1][n], peers[1].hat_self[phase][n])
    assert not peers[0].stale
