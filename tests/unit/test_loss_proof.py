"""Loss-proof gradient tracking (docs/algorithms.md §8): with running-sum tracker messages a lost
V message's mass arrives with the sender's next message, so mean V = mean M holds at every round
once the mass still in flight is counted, and training reaches what it reaches without faults."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from demuon.app import simulate
from demuon.config import Config, config_from_dict
from demuon.node.observe import averaged_validation_loss
from demuon.workloads import make_workload
from tests.support.configs import eight_peers

GRAPHS = ("ring", "directed_exponential")


def logistic(
    graph: str, rounds: int, *, tracker: str = "running_sum", faults: dict[str, Any] | None = None
) -> Config:
    return eight_peers("logistic", rounds, topology=graph, tracker=tracker, faults=faults)


DROP_20 = {"seed": 3, "link": [{"action": "drop", "probability": 0.2}]}  # every link, both phases


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_a_20_percent_drop_keeps_the_tracking_invariant_and_the_fault_free_loss(graph: str) -> None:
    clean = simulate.run(logistic(graph, 300))
    lossy = simulate.run(logistic(graph, 300, faults=DROP_20))
    assert lossy.summary["faults"]["missing"] > 0.15 * 8 * 2 * 2 * 300  # the plan really dropped ~20 %
    gaps = [r["tracking_gap_in_flight"] for r in lossy.cluster]
    assert max(gaps) <= 1e-9, f"worst ‖mean V + in-flight − mean M‖ = {max(gaps):.3g}"
    assert lossy.summary["tracking_drift"] <= 1e-9
    want, got = clean.summary["average"]["validation_loss"], lossy.summary["average"]["validation_loss"]
    assert abs(got - want) <= 0.02 * want, f"validation loss {got:.4f} vs fault-free {want:.4f}"


def test_the_old_policy_loses_the_mass_of_lost_messages_for_good() -> None:
    lossy = simulate.run(logistic("ring", 60, tracker="self_weight", faults=DROP_20))
    assert lossy.cluster[-1]["tracking_gap_in_flight"] > 1e-3  # what running sums fix
    assert lossy.summary["tracking_drift"] > 1e-3


def test_after_a_partition_of_the_directed_graph_the_invariant_held_and_consensus_returns() -> None:
    halves = {"partition": [{"groups": [[0, 1, 2, 3], [4, 5, 6, 7]], "rounds": [20, 39]}]}
    clean = simulate.run(logistic("directed_exponential", 90))
    cut = simulate.run(logistic("directed_exponential", 90, faults=halves))
    # peer i hears i+1, i+2, i+4: 14 of the 24 in-links cross between the halves, for 20 rounds
    assert cut.summary["faults"]["missing"] == 14 * 20
    assert max(r["tracking_gap_in_flight"] for r in cut.cluster) <= 1e-9
    assert cut.cluster[-1]["consensus_error"] <= 2 * clean.cluster[-1]["consensus_error"]


def test_compressed_gossip_repairs_lost_corrections_at_each_keyframe() -> None:
    """Top-k with γ = 0.2 under a 20 % drop, a keyframe every 5 rounds: copies that missed a
    correction stay in the mix and each keyframe brings the mass they missed, so the invariant
    holds counting the repair still owed, and the loss is the fault-free one's."""
    topk = {"codec": {"kind": "topk", "ratio": 0.1}, "gamma": 0.2, "keyframe_every": 5}

    def run(faults: dict[str, Any] | None) -> simulate.SimulationResult:
        data = logistic("ring", 150, faults=faults).model_dump()
        data["gossip"].update(topk)
        return simulate.run(config_from_dict(data))

    clean, lossy = run(None), run(DROP_20)
    assert max(r["tracking_gap_in_flight"] for r in lossy.cluster) <= 1e-9
    assert lossy.cluster[-1]["tracking_gap"] > 1e-6  # some repair is still owed after round 145
    want, got = clean.summary["average"]["validation_loss"], lossy.summary["average"]["validation_loss"]
    assert abs(got - want) <= 0.02 * want


def test_a_neighbour_gone_for_good_costs_no_more_than_under_the_old_policy() -> None:
    """Peer 5 cut off from round 20 to the end: its neighbours lend its weight to themselves, so
    the survivors train as under weight-to-self, and the loans keep the invariant exact."""
    gone = {
        "link": [
            {"action": "drop", "src": [5], "rounds": [20, 119]},
            {"action": "drop", "dst": [5], "rounds": [20, 119]},
        ]
    }

    def survivors_loss(tracker: str) -> tuple[float, float]:
        config = logistic("ring", 120, tracker=tracker, faults=gone)
        res = simulate.run(config)
        workload = make_workload(config.workload, seed=config.seed, device=torch.device("cpu"))
        states = [p.X() for p in res.peers if p.index != 5]
        worst = max(r["tracking_gap_in_flight"] for r in res.cluster)
        return averaged_validation_loss(workload, config.seed, states, dtype=torch.float64), worst

    old, _ = survivors_loss("self_weight")
    new, worst = survivors_loss("running_sum")
    assert new <= old * 1.01, f"survivors' validation loss {new:.4f} vs {old:.4f} with the old policy"
    assert worst <= 1e-9
