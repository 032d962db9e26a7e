"""Graph constructors: shapes of the graphs, random draws refused when disconnected, edge-list files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from demuon.errors import TopologyError
from demuon.topology import (
    directed_exponential,
    erdos_renyi,
    exponential_hops,
    hypercube,
    is_connected,
    mixing_matrix,
    one_peer_exponential,
    random_geometric,
    read_edge_list,
    ring,
    star,
    torus,
    torus_shape,
)


def _neighbours(A: torch.Tensor, i: int) -> list[int]:
    return torch.nonzero(A[i]).flatten().tolist()


def test_directed_exponential_row_i_listens_to_i_plus_powers_of_two() -> None:
    A = directed_exponential(8)
    assert _neighbours(A, 0) == [1, 2, 4]
    assert _neighbours(A, 5) == [1, 6, 7]
    assert not A.diagonal().any()
    assert (A.sum(0) == A.sum(1)).all()  # balanced digraph


@pytest.mark.parametrize(
    ("n", "hops"), [(1, ()), (2, (1,)), (8, (1, 2, 4)), (9, (1, 2, 4, 8)), (16, (1, 2, 4, 8))]
)
def test_exponential_hops_run_up_to_floor_log2_of_n_minus_one(n: int, hops: tuple[int, ...]) -> None:
    assert exponential_hops(n) == hops


def test_one_peer_exponential_listens_to_a_single_peer_whose_hop_cycles() -> None:
    assert [_neighbours(one_peer_exponential(8, t), 0) for t in range(4)] == [[1], [2], [4], [1]]
    assert (one_peer_exponential(8, 2).sum(1) == 1).all()


def test_ring_and_star_have_the_expected_degrees() -> None:
    assert (ring(8).sum(1) == 2).all() and torch.equal(ring(8), ring(8).T)
    assert ring(2).sum() == 2
    S = star(6)
    assert S.sum(1).tolist() == [5, 1, 1, 1, 1, 1]


def test_hypercube_neighbours_differ_in_exactly_one_bit() -> None:
    A = hypercube(16)
    assert _neighbours(A, 5) == [1, 4, 7, 13]


def test_hypercube_refuses_a_size_that_is_not_a_power_of_two() -> None:
    with pytest.raises(TopologyError) as info:
        hypercube(12)
    assert info.value.problem == "bad_size" and info.value.value == 12


def test_torus_defaults_to_the_most_square_shape_and_wraps_around() -> None:
    assert torus_shape(16) == (4, 4) and torus_shape(32) == (4, 8) and torus_shape(7) == (1, 7)
    A = torus(16)
    assert _neighbours(A, 0) == [1, 3, 4, 12]
    assert (A.sum(1) == 4).all()


def test_two_row_torus_has_coinciding_up_and_down_neighbours() -> None:
    A = torus(8, rows=2)
    assert _neighbours(A, 0) == [1, 3, 4]
    assert (A.sum(1) == 3).all() and torch.equal(A, A.T)


def test_one_row_torus_is_a_ring() -> None:
    assert torch.equal(torus(7, rows=1), ring(7))


def test_erdos_renyi_draw_is_determined_by_its_seed() -> None:
    assert torch.equal(erdos_renyi(12, 0.5, seed=4), erdos_renyi(12, 0.5, seed=4))
    assert not torch.equal(erdos_renyi(12, 0.5, seed=4), erdos_renyi(12, 0.5, seed=5))


def test_a_disconnected_erdos_renyi_draw_is_refused_and_a_working_seed_named() -> None:
    with pytest.raises(TopologyError, match=r"seed=\d+ gives a connected graph") as info:
        erdos_renyi(16, 0.1, seed=0)
    assert info.value.problem == "disconnected" and info.value.where == "seed"
    good = int(str(info.value).split("seed=")[-1].split()[0])
    assert is_connected(erdos_renyi(16, 0.1, seed=good))


def test_a_disconnected_random_geometric_draw_is_refused() -> None:
    with pytest.raises(TopologyError, match="raise radius") as info:
        random_geometric(16, 0.05, seed=0)
    assert info.value.problem == "disconnected"


def test_random_geometric_joins_peers_within_the_radius() -> None:
    A = random_geometric(10, 2.0, seed=1)  # the unit square's diagonal is √2 < 2
    assert A.sum() == 10 * 9


def test_strong_connectivity_needs_paths_both_ways() -> None:
    A = torch.zeros(3, 3, dtype=torch.bool)
    A[0, 1] = A[1, 2] = True
    assert not is_connected(A)
    A[2, 0] = True
    assert is_connected(A)


# ------------------------------------------------------------------------------------ edge lists


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edges.txt"
    path.write_text(text)
    return path


def test_edge_list_with_comments_is_read_as_an_undirected_graph(tmp_path: Path) -> None:
    path = _write(tmp_path, "# a square\n0 1\n1 2  # trailing comment\n\n2 3\n3 0\n")
    A, weights = read_edge_list(path, 4)
    assert weights is None
    assert torch.equal(A, ring(4))
    assert torch.allclose(mixing_matrix("edge_list", 4, path=str(path)), mixing_matrix("ring", 4))


def test_edge_list_weights_are_used_with_self_weights_filling_each_row(tmp_path: Path) -> None:
    path = _write(tmp_path, "0 1 0.25\n1 2 0.5\n")
    W = mixing_matrix("edge_list", 3, path=path)
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.25, 0.25, 0.5], [0.0, 0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(W, expected)
    metropolis = mixing_matrix("edge_list", 3, path=path, weights="metropolis")
    assert metropolis[0, 1] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("0 1\n1 two\n", 2, "integers"),
        ("0 1\n1 2 3 4\n", 2, "expected 'i j'"),
        ("0 1\n\n# gap\n1 9\n", 4, "outside 0..3"),
        ("0 0\n", 1, "self-loop"),
        ("0 1 0.5\n1 2\n", 2, "mixes weighted"),
        ("0 1 1.5\n", 1, "weight must be"),
    ],
)
def test_a_bad_edge_list_line_is_named_with_file_and_line(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(TopologyError, match=reason) as info:
        read_edge_list(path, 4)
    assert info.value.problem == "bad_file"
    assert info.value.where == f"{path}:{line}" and str(path) in str(info.value)


def test_an_edge_list_that_leaves_a_peer_out_is_disconnected(tmp_path: Path) -> None:
    with pytest.raises(TopologyError) as info:
        read_edge_list(_write(tmp_path, "0 1\n1 2\n"), 4)
    assert info.value.problem == "disconnected"


def test_a_missing_edge_list_file_is_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError) as info:
        mixing_matrix("edge_list", 4, path=tmp_path / "nope.txt")
    assert info.value.problem == "bad_file"


def test_edge_list_weights_that_overfill_a_row_are_a_negative_self_weight(tmp_path: Path) -> None:
    with pytest.raises(TopologyError) as info:
        mixing_matrix("edge_list", 3, path=_write(tmp_path, "0 1 0.6\n0 2 0.6\n"))
    assert info.value.problem == "negative_entry" and info.value.where == (0, 0)
