"""An announced leave (``[[peer]] leave_at`` in a fault plan): the leaver hands its share of the
trackers (V − M) to its heir, the survivors re-weight (Metropolis on the live graph, computed alike
at both ends of every edge), mean V = mean M holds on the survivors, and they reach their own
optimum; the daemon does exactly what the simulator does."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from demuon.app import simulate
from demuon.app.peers import base_matrix, heir_of
from demuon.config import Config, load_config
from demuon.errors import ConfigError
from demuon.node.daemon import DaemonStatus
from demuon.topology import live_mixing_matrix, peer_view
from tests.support.cluster import CONFIGS, inproc_daemons
from tests.support.configs import eight_peers


def quadratic(leave_at: int | None, rounds: int = 200, *, compressed: bool = False) -> Config:
    faults: dict[str, Any] = {"peer": [{"id": 5, "leave_at": leave_at}]} if leave_at is not None else {}
    config = eight_peers("quadratic", rounds, faults=faults)
    if compressed:
        gossip = {
            "v": {"codec": {"kind": "int8"}},
            "x": {"codec": {"kind": "blockq", "bits": 2}, "gamma": 0.4},
        }
        config = config.model_copy(update={"gossip": config.gossip.model_validate(gossip)})
    return config


def survivors_gap(res: simulate.SimulationResult) -> float:
    """F_s(mean of the survivors' X) − min F_s for the survivors' average objective F_s."""
    stay = [p for p in res.peers if p.index != 5]
    data = [stay[0].workload.peer_data(p.index) for p in stay]  # type: ignore[attr-defined]
    A = torch.cat([a for a, _ in data]).double()
    B = torch.cat([b for _, b in data]).double()
    best = torch.linalg.lstsq(A, B).solution
    X = torch.stack([p.params["weight"].detach().T.double() for p in stay]).mean(0)

    def F(W: torch.Tensor) -> float:
        return float(0.5 * ((A @ W - B) ** 2).sum() / A.shape[0])

    return F(X) - F(best)


@pytest.mark.parametrize("compressed", [False, True], ids=["exact", "compressed"])
def test_after_a_leave_the_survivors_mix_doubly_stochastically_and_reach_their_optimum(
    compressed: bool,
) -> None:
    """Compressed (int8 trackers, 2-bit parameters, γ 0.4): mean V = mean M on the survivors
    holds as well, since the CHOCO step conserves the sum over any symmetric W."""
    left = simulate.run(quadratic(20, compressed=compressed))
    alone = simulate.run(quadratic(0, compressed=compressed))  # those survivors without peer 5 from the start
    stay = [p for p in left.peers if p.index != 5]
    W = torch.zeros(8, 8, dtype=torch.float64)
    for p in stay:
        view = p.view(20)
        W[p.index, p.index] = view.self_weight
        for j, w in view.in_neighbours:
            W[p.index, j] = w
    live = [p.index for p in stay]
    sub = W[live][:, live]
    assert torch.allclose(sub.sum(0), torch.ones(7, dtype=torch.float64))  # columns
    assert torch.allclose(sub.sum(1), torch.ones(7, dtype=torch.float64))  # rows
    assert torch.equal(sub, sub.T)  # both ends of every edge agree on its weight
    assert W[:, 5].abs().sum() == 0  # nobody mixes the leaver any more
    assert max(r["tracking_gap_in_flight"] for r in left.cluster[20:]) <= 1e-9 * 100  # ‖mean M‖ ~ 10²
    assert [e["status"] for e in left.summary["peers"]].count("left") == 1
    assert survivors_gap(left) <= 2 * survivors_gap(alone) + 1e-9


@pytest.mark.parametrize(
    "codec",
    [
        [],
        [
            "gossip.v.codec={kind = 'int8'}",
            "gossip.x.codec={kind = 'blockq', bits = 4}",
            "gossip.keyframe_every=3",
        ],
    ],
    ids=["exact", "compressed"],
)
async def test_daemons_carry_out_a_leave_exactly_as_the_simulator(tmp_path: Path, codec: list[str]) -> None:
    """Also in the compressed mode: from the leave on, nobody sends to the leaver or keeps its
    replicas (``Peer.retire``), in the daemon as in the simulator."""
    sets = ["faults={peer = [{id = 2, leave_at = 8}]}", "network.phase_timeout_s=5.0", *codec]
    config = load_config(CONFIGS / "oracle-ring4.toml", sets)
    daemons = inproc_daemons(config, tmp_path)
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * config.peers
    reference = simulate.run(config)
    for d, ref in zip(daemons, reference.peers, strict=True):
        final = torch.load(tmp_path / f"peer-{d.peer.index}" / "final.pt", weights_only=True)
        assert all(torch.equal(final[n], ref.params[n].detach()) for n in ref.names), d.peer.index
    assert daemons[2].left_at == 8 and heir_of(config, 2) in (1, 3)


@pytest.mark.parametrize(
    ("sets", "why"),
    [
        (["faults={peer = [{id = 1, leave_at = 5}]}", "topology.name='one_peer_exponential'"], "static"),
        (["faults={peer = [{id = 1, leave_at = 5}]}", "topology.name='directed_exponential'"], "undirected"),
        (
            [
                "peers=3",
                "network.peers=[]",
                "faults={peer = [{id = 0, leave_at = 5}]}",
                "topology.name='star'",
            ],
            "connected",
        ),
    ],
)
def test_a_leave_that_cannot_be_carried_out_fails_before_anything_starts(sets: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=f"faults.peer.leave_at.*{why}"):
        simulate.run(load_config(CONFIGS / "oracle-ring4.toml", sets))


async def test_a_leave_asked_for_at_run_time_hands_off_and_no_survivor_waits_for_the_leaver(
    tmp_path: Path,
) -> None:
    """What ``network.on_sigterm = "leave"`` does on SIGTERM with no notice
    (``network.leave_notice_rounds = 0``), asked for here by peer 2's own round hook after round 5:
    it hands its share to its heir, tells its other neighbours, and stops; the others never wait
    out a deadline for it and finish, with mean V = mean M on the survivors (they lend its weight
    to self; the ring's weights are symmetric, so their rows and columns still sum to one)."""
    sets = ["dtype='float64'", "network.phase_timeout_s=5.0", "network.leave_notice_rounds=0"]
    config = load_config(CONFIGS / "oracle-ring4.toml", sets)
    rows: dict[int, list[dict[str, Any]]] = {i: [] for i in range(config.peers)}
    daemons: list[Any] = []

    def hook(i: int, row: Mapping[str, Any]) -> None:
        rows[i].append(dict(row))
        if i == 2 and row["round"] == 5:
            daemons[2].request_leave()

    daemons.extend(inproc_daemons(config, tmp_path, hooks={i: functools.partial(hook, i) for i in rows}))
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * config.peers
    left = daemons[2].left_at
    assert left is not None and 6 <= left <= 8
    stay = [d for d in daemons if d.peer.index != 2]
    for d in stay:
        assert d.completed and rows[d.peer.index][-1]["round"] == config.rounds - 1
        after = [r for r in rows[d.peer.index] if r["round"] >= left]
        assert max(r["t_wait_max"] for r in after) < 2.0  # nobody waited out a 5 s deadline for peer 2
    V = {n: torch.stack([d.peer.V[n].double() for d in stay]).mean(0) for n in stay[0].peer.names}
    M = {n: torch.stack([d.peer.M[n].double() for d in stay]).mean(0) for n in stay[0].peer.names}
    gap = sum(float((V[n] - M[n]).square().sum()) for n in V) ** 0.5
    scale = max(1.0, sum(float(M[n].square().sum()) for n in M) ** 0.5)
    assert gap <= 1e-9 * scale, gap


async def test_a_leave_asked_for_at_run_time_is_carried_out_exactly_as_a_planned_one(tmp_path: Path) -> None:
    """With notice (the default ``network.leave_notice_rounds = 3``), peer 5 of an 8-peer
    exponential graph, asked to leave by its round hook after round 4, announces the round it
    leaves before in its headers; its neighbours relay it to theirs, every survivor re-weights to
    Metropolis on the live graph from that round, and the heir takes the share then: the daemons
    end with the parameters the simulator computes for a plan with that leave, bitwise — also
    with 30 % of all messages dropped (the notice is in every header, so one that gets through is
    enough). On this graph the weights differ from lending: the leaver's neighbours' neighbours
    re-weight too."""
    sets = [
        "peers=8",
        "topology.name='exponential'",
        "rounds=16",
        "dtype='float64'",
        "network.phase_timeout_s=5.0",
    ]
    drops = "seed = 3, link = [{action = 'drop', probability = 0.3}]"
    config = load_config(CONFIGS / "oracle-ring4.toml", [*sets, f"faults={{{drops}}}"])
    rows: dict[int, list[dict[str, Any]]] = {i: [] for i in range(config.peers)}
    daemons: list[Any] = []

    def hook(i: int, row: Mapping[str, Any]) -> None:
        rows[i].append(dict(row))
        if i == 5 and row["round"] == 4:
            daemons[5].request_leave()

    daemons.extend(inproc_daemons(config, tmp_path, hooks={i: functools.partial(hook, i) for i in rows}))
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * config.peers
    left = daemons[5].left_at
    assert left is not None and 5 + 3 <= left <= 4 + 3 + 3  # announced as round 5, 6 or 7 started
    stay = [d for d in daemons if d.peer.index != 5]
    for d in stay:
        entry = json.loads((tmp_path / f"peer-{d.peer.index}" / "final.json").read_text())
        assert entry["leaves_announced"] == {"5": left} and entry["membership_late"] == 0
    leave = f"peer = [{{id = 5, leave_at = {left}}}]"
    plan = load_config(CONFIGS / "oracle-ring4.toml", [*sets, f"faults={{{drops}, {leave}}}"])
    reference = simulate.run(plan)
    for d in stay:
        final = torch.load(tmp_path / f"peer-{d.peer.index}" / "final.pt", weights_only=True)
        ref = reference.peers[d.peer.index]
        assert all(torch.equal(final[n], ref.params[n].detach()) for n in ref.names), d.peer.index
        after = [r for r in rows[d.peer.index] if r["round"] >= left]
        assert max(r["t_wait_max"] for r in after) < 2.0  # nobody waited out a deadline for peer 5
    W = base_matrix(config)
    live = [d.peer.index for d in stay]
    metropolis = live_mixing_matrix(W, live)
    assert all(d.peer.view(left) == peer_view(metropolis, d.peer.index) for d in stay)
    lent = W.clone()
    lent[live, live] += W[live, 5]  # what lending would have mixed with instead
    lent[:, 5] = lent[5, :] = 0
    assert not torch.allclose(metropolis[live][:, live], lent[live][:, live])


async def test_sigterm_means_leave_only_when_the_config_says_so(tmp_path: Path) -> None:
    for setting, leaves_ in (("stop", False), ("leave", True)):
        config = load_config(CONFIGS / "oracle-ring4.toml", [f"network.on_sigterm='{setting}'"])
        daemon = inproc_daemons(config, tmp_path / setting, peers=[0])[0]
        daemon._on_signal(signal.SIGTERM)
        assert daemon._leave_requested is leaves_
        assert daemon.control.stop.is_set() is not leaves_  # a stop checkpoints to resume later
        await daemon.close()
