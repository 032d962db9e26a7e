"""Mixing matrices: the facts of docs/algorithms.md §4 and §9, validation errors, config and peer
views."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from demuon.config import TopologyConfig, TopologyName
from demuon.errors import TopologyError
from demuon.topology import (
    TOPOLOGY_NAMES,
    WEIGHT_RULES,
    metropolis_weights,
    mixing_matrix,
    mixing_matrix_from_config,
    peer_view,
    period,
    spectral_gap,
    validate_mixing,
)

RANDOM_OPTIONS: dict[str, dict[str, object]] = {
    "erdos_renyi": {"p": 0.7, "seed": 3},
    "random_geometric": {"radius": 0.9, "seed": 3},
}


def _doubly_stochastic(W: torch.Tensor) -> bool:
    ones = torch.ones(W.shape[0], dtype=torch.float64)
    return bool((W >= 0).all() and torch.allclose(W @ ones, ones) and torch.allclose(W.T @ ones, ones))


# -------------------------------------------------------------- docs/algorithms.md §9 items 9–12


@pytest.mark.parametrize(("n", "lam"), [(8, 0.80474), (16, 0.94925), (32, 0.98719)])
def test_ring_with_one_third_weights_has_the_documented_lambda(n: int, lam: float) -> None:
    W = mixing_matrix("ring", n)
    assert torch.allclose(W[0, [n - 1, 0, 1]], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert spectral_gap(W) == pytest.approx(lam, abs=1e-5)
    assert spectral_gap(W) == pytest.approx((1 + 2 * math.cos(2 * math.pi / n)) / 3, abs=1e-12)


def test_directed_exponential_on_8_peers_matches_the_demuon_code_row_by_row() -> None:
    W = mixing_matrix("directed_exponential", 8)
    for i in range(8):
        expected = torch.zeros(8, dtype=torch.float64)
        expected[i] = 0.4
        expected[[(i + 1) % 8, (i + 2) % 8, (i + 4) % 8]] = 0.2
        assert torch.allclose(W[i], expected, atol=1e-12)
    assert _doubly_stochastic(W)
    assert not torch.allclose(W, W.T)
    assert spectral_gap(W) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize(("n", "lam"), [(16, 0.6667), (32, 0.7143), (64, 0.75)])
def test_directed_exponential_lambda_is_one_minus_two_over_tau_plus_two(n: int, lam: float) -> None:
    tau = int(math.log2(n))
    assert spectral_gap(mixing_matrix("directed_exponential", n)) == pytest.approx(lam, abs=1e-4)
    assert spectral_gap(mixing_matrix("directed_exponential", n)) == pytest.approx(1 - 2 / (tau + 2))


@pytest.mark.parametrize("n", [1, 2, 8, 16, 32])
def test_complete_graph_averages_in_one_step(n: int) -> None:
    W = mixing_matrix("complete", n)
    assert torch.allclose(W, torch.full((n, n), 1 / n, dtype=torch.float64))
    assert spectral_gap(W) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [8, 16, 32, 64])
def test_one_peer_exponential_product_over_a_period_is_exactly_the_average(n: int) -> None:
    cfg = TopologyConfig(name="one_peer_exponential")
    tau = period(cfg, n)
    assert tau == int(math.log2(n))
    product = torch.eye(n, dtype=torch.float64)
    for t in range(tau):
        product = mixing_matrix_from_config(cfg, n, t=t) @ product
    assert torch.equal(product, torch.full((n, n), 1 / n, dtype=torch.float64))


def test_one_peer_exponential_single_rounds_are_stochastic_but_only_hop_one_mixes() -> None:
    W0 = mixing_matrix("one_peer_exponential", 8, t=0)
    W1 = mixing_matrix("one_peer_exponential", 8, t=1)
    assert _doubly_stochastic(W1)
    assert spectral_gap(W0) == pytest.approx(math.cos(math.pi / 8), abs=1e-12)
    assert spectral_gap(W1) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(mixing_matrix("one_peer_exponential", 8, t=3), W0)


@pytest.mark.parametrize(("n", "lam"), [(8, 0.5), (16, 0.6), (32, 2 / 3)])
def test_hypercube_with_one_over_d_plus_one_weights_has_the_documented_lambda(n: int, lam: float) -> None:
    W = mixing_matrix("hypercube", n)
    d = int(math.log2(n))
    assert torch.allclose(W[0][W[0] > 0], torch.full((d + 1,), 1 / (d + 1), dtype=torch.float64))
    assert spectral_gap(W) == pytest.approx(lam, abs=1e-12)


@pytest.mark.parametrize(("n", "lam"), [(8, 2 / 3), (16, 0.75), (32, 0.8)])
def test_lazy_hypercube_has_lambda_one_minus_one_over_d(n: int, lam: float) -> None:
    assert spectral_gap(mixing_matrix("hypercube", n, weights="lazy_max_degree")) == pytest.approx(lam)


@pytest.mark.parametrize(("n", "lam"), [(8, 0.8536), (16, 0.9619), (32, 0.9904)])
def test_lazy_metropolis_ring_puts_half_on_self_and_a_quarter_on_each_side(n: int, lam: float) -> None:
    W = mixing_matrix("ring", n, weights="lazy_metropolis")
    assert (
        W[0, 0] == pytest.approx(0.5)
        and W[0, 1] == pytest.approx(0.25)
        and W[0, n - 1] == pytest.approx(0.25)
    )
    assert spectral_gap(W) == pytest.approx(lam, abs=1e-4)


@pytest.mark.parametrize(("n", "lam"), [(8, 0.5), (16, 0.6), (32, 0.8828), (64, 0.8828)])
def test_torus_lambda_matches_the_table(n: int, lam: float) -> None:
    W = mixing_matrix("torus", n)
    assert spectral_gap(W) == pytest.approx(lam, abs=1e-4)


def test_four_by_four_torus_gives_one_fifth_to_self_and_each_grid_neighbour() -> None:
    W = mixing_matrix("torus", 16, rows=4)
    assert torch.allclose(W[5][W[5] > 0], torch.full((5,), 0.2, dtype=torch.float64))
    assert sorted(torch.nonzero(W[5]).flatten().tolist()) == [1, 4, 5, 6, 9]
    assert spectral_gap(W) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize(("n", "lam"), [(8, 0.5), (16, 0.6), (32, 2 / 3)])
def test_directed_static_exponential_gives_one_over_tau_plus_one_to_self_and_each_hop(
    n: int, lam: float
) -> None:
    W = mixing_matrix("exponential", n, directed=True)
    tau = int(math.log2(n))
    assert torch.allclose(W[0][W[0] > 0], torch.full((tau + 1,), 1 / (tau + 1), dtype=torch.float64))
    assert spectral_gap(W) == pytest.approx(lam, abs=1e-12)


@pytest.mark.parametrize("n", [8, 16, 32])
def test_undirected_static_exponential_links_both_ways_with_symmetric_metropolis_weights(n: int) -> None:
    W = mixing_matrix("exponential", n)
    hops = [1 << h for h in range(int(math.log2(n)))]
    assert sorted(torch.nonzero(W[0]).flatten().tolist()) == sorted({0, *hops, *(n - h for h in hops)})
    assert torch.equal(W, W.T)
    assert torch.allclose(W.sum(0), torch.ones(n, dtype=torch.float64))
    assert spectral_gap(W) < spectral_gap(mixing_matrix("ring", n))


def test_directed_must_be_a_boolean() -> None:
    with pytest.raises(TopologyError) as err:
        mixing_matrix("exponential", 8, directed="yes")
    assert err.value.problem == "bad_option" and err.value.where == "directed"


# -------------------------------------------------------------------------- every named topology


def _options(name: str, tmp_path_file: str) -> dict[str, object]:
    if name == "edge_list":
        return {"path": tmp_path_file}
    return RANDOM_OPTIONS.get(name, {})


@pytest.mark.parametrize("name", TOPOLOGY_NAMES)
@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_every_named_topology_is_doubly_stochastic_for_several_sizes(
    name: str, n: int, tmp_path: Path
) -> None:
    if name == "hypercube" and n & (n - 1):
        with pytest.raises(TopologyError, match="power of two"):
            mixing_matrix(name, n)
        return
    edges = tmp_path / "ring.txt"
    edges.write_text("".join(f"{i} {(i + 1) % n}\n" for i in range(n) if n > 1))
    W = mixing_matrix(name, n, **_options(name, str(edges)))
    assert W.dtype == torch.float64 and W.shape == (n, n)
    assert _doubly_stochastic(W)
    if name != "one_peer_exponential":
        assert spectral_gap(W) < 1.0


@pytest.mark.parametrize("rule", WEIGHT_RULES)
@pytest.mark.parametrize(
    "name", ["ring", "torus", "hypercube", "star", "erdos_renyi", "directed_exponential"]
)
def test_every_weight_rule_gives_a_valid_mixing_matrix(name: str, rule: str) -> None:
    W = mixing_matrix(name, 16, weights=rule, **RANDOM_OPTIONS.get(name, {}))
    assert _doubly_stochastic(W) and spectral_gap(W) < 1.0


def test_topology_names_are_exactly_the_ones_the_config_accepts() -> None:
    assert set(TOPOLOGY_NAMES) == set(typing.get_args(TopologyName))


def test_n_equal_one_is_the_one_by_one_identity_everywhere_it_makes_sense(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# no edges\n")
    for name in TOPOLOGY_NAMES:
        W = mixing_matrix(name, 1, **_options(name, str(empty)))
        assert torch.equal(W, torch.ones(1, 1, dtype=torch.float64)), name


@st.composite
def connected_graphs(draw: st.DrawFn) -> torch.Tensor:
    n = draw(st.integers(min_value=1, max_value=14))
    A = torch.zeros(n, n, dtype=torch.bool)
    for i in range(1, n):  # a random spanning tree keeps it connected
        j = draw(st.integers(min_value=0, max_value=i - 1))
        A[i, j] = A[j, i] = True
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n))
    for i, j in extra:
        if i != j:
            A[i, j] = A[j, i] = True
    return A


@settings(max_examples=60, deadline=None)
@given(connected_graphs())
def test_metropolis_weights_are_symmetric_and_doubly_stochastic_on_any_connected_graph(
    A: torch.Tensor,
) -> None:
    W = metropolis_weights(A)
    assert torch.allclose(W, W.T)
    assert _doubly_stochastic(W)
    validate_mixing(W, A)


# ------------------------------------------------------------------------------------ validation


def _problem(W: torch.Tensor, adjacency: torch.Tensor | None = None) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        validate_mixing(W, adjacency)
    return info.value


def test_a_negative_weight_is_named_with_its_position() -> None:
    W = torch.tensor([[1.2, -0.2], [-0.2, 1.2]], dtype=torch.float64)
    err = _problem(W)
    assert err.problem == "negative_entry" and err.where == (0, 1) and err.value == pytest.approx(-0.2)


def test_a_row_that_does_not_sum_to_one_is_named() -> None:
    W = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.1, 0.5]], dtype=torch.float64)
    err = _problem(W)
    assert err.problem == "row_sum" and err.where == 2 and err.value == pytest.approx(0.6)


def test_a_column_that_does_not_sum_to_one_is_named() -> None:
    W = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], dtype=torch.float64)
    err = _problem(W)
    assert err.problem == "column_sum" and err.where == 0 and err.value == pytest.approx(1.5)


def test_weight_on_a_pair_that_is_not_an_edge_is_named() -> None:
    W = mixing_matrix("complete", 4)
    err = _problem(W, mixing_matrix("ring", 4) > 0)
    assert err.problem == "non_edge_weight" and err.where == (0, 2)


def test_a_disconnected_matrix_is_refused_as_not_mixing() -> None:
    W = torch.kron(torch.eye(2, dtype=torch.float64), torch.full((2, 2), 0.5, dtype=torch.float64))
    err = _problem(W)
    assert err.problem == "not_mixing" and err.value == pytest.approx(1.0)


def test_a_non_square_matrix_is_a_bad_size() -> None:
    assert _problem(torch.ones(2, 3, dtype=torch.float64)).problem == "bad_size"


def test_unknown_topology_names_and_options_are_refused_with_the_valid_ones_listed() -> None:
    with pytest.raises(TopologyError, match="valid: complete, ring") as info:
        mixing_matrix("rign", 8)
    assert info.value.problem == "bad_option" and info.value.value == "rign"
    with pytest.raises(TopologyError, match="valid: weights, rows") as info:
        mixing_matrix("torus", 8, p=0.3)
    assert info.value.problem == "bad_option" and info.value.where == "p"
    with pytest.raises(TopologyError, match="lazy_max_degree") as info:
        mixing_matrix("ring", 8, weights="uniform")
    assert info.value.problem == "bad_option" and info.value.value == "uniform"


@pytest.mark.parametrize(
    ("name", "options", "where"),
    [
        ("torus", {"rows": 3}, "rows"),
        ("erdos_renyi", {}, "p"),
        ("random_geometric", {"radius": -1.0}, "radius"),
    ],
)
def test_missing_or_bad_topology_options_are_bad_options(
    name: str, options: dict[str, object], where: str
) -> None:
    with pytest.raises(TopologyError) as info:
        mixing_matrix(name, 8, **options)
    assert info.value.problem == "bad_option" and info.value.where == where


@pytest.mark.parametrize("n", [0, -3])
def test_a_non_positive_peer_count_is_a_bad_size(n: int) -> None:
    with pytest.raises(TopologyError) as info:
        mixing_matrix("ring", n)
    assert info.value.problem == "bad_size"


# ------------------------------------------------------------------------- config and peer views


def test_config_picks_topology_weights_and_options() -> None:
    cfg = TopologyConfig(name="erdos_renyi", p=0.7, seed=3, weights="lazy_metropolis")
    assert torch.equal(
        mixing_matrix_from_config(cfg, 8),
        mixing_matrix("erdos_renyi", 8, p=0.7, seed=3, weights="lazy_metropolis"),
    )
    assert period(cfg, 8) == 1
    assert period(TopologyConfig(name="one_peer_exponential"), 8) == 3
    assert torch.equal(mixing_matrix_from_config(TopologyConfig(), 8), mixing_matrix("ring", 8))


def test_peer_view_of_the_directed_exponential_graph_hears_ahead_and_sends_behind() -> None:
    W = mixing_matrix("directed_exponential", 8)
    view = peer_view(W, 6)
    assert view.index == 6
    assert view.self_weight == pytest.approx(0.4)
    assert [j for j, _ in view.in_neighbours] == [0, 2, 7]  # 6+1, 6+2, 6+4 mod 8
    assert all(w == pytest.approx(0.2) for _, w in view.in_neighbours)
    assert view.out_neighbours == (2, 4, 5)  # 6-4, 6-2, 6-1
    view0 = peer_view(W, 0)
    assert [j for j, _ in view0.in_neighbours] == [1, 2, 4] and view0.out_neighbours == (4, 6, 7)


def test_peer_view_outside_the_peers_is_refused() -> None:
    with pytest.raises(TopologyError) as info:
        peer_view(mixing_matrix("ring", 4), 4)
    assert info.value.problem == "bad_option"
