"""Mixing matrices W for gossip, their checks and what one peer needs of them (layer 2: pure).

DeMuon mixes ``X_i ← Σ_j w_ij Y_j``; it needs ``W`` nonnegative and doubly stochastic with
``λ = ‖W − J‖₂ < 1`` (docs/algorithms.md §2.3). Symmetry is not required: the circulant directed graphs
are balanced, so uniform weights are doubly stochastic although ``W ≠ Wᵀ``.

Weight rules (docs/algorithms.md §4.1; ``d_i`` = number of neighbours, self excluded):

* Metropolis–Hastings: ``w_ij = 1/(1 + max(d_i, d_j))``; lazy: ``w_ij = 1/(2·max(d_i, d_j))``.
* max-degree: ``w_ij = 1/(1 + d_max)``; lazy: ``w_ij = 1/(2·d_max)``.
* self weight ``w_ii = 1 − Σ_{j≠i} w_ij`` in every rule.

Canonical weights (``weights=None``): complete ``1/N``; ring Metropolis (``1/3``); torus
max-degree (``1/5`` incl. self when both sides are ≥ 3; the 2×4 torus has degree 3, so ``1/4`` and
λ = 0.5); hypercube ``1/(d+1)``; static exponential ``1/(τ+1)`` incl. self (Ying et al.); directed
exponential ``1/(τ+2)`` per arc and ``2/(τ+2)`` self (DeMuon code, ``graph.py``: N=8 rows are 0.4
self + 0.2 on ``i+1, i+2, i+4``); one-peer exponential ``1/2`` self and ``1/2`` peer; Erdős–Rényi,
random geometric, star: Metropolis; edge list: the file's weights, else Metropolis.

A single one-peer exponential ``W_t`` is usually not mixing on its own (λ = 1 whenever the hop
splits the peers into several cycles, e.g. every hop but 1 for ``N = 2^τ``); only the product over a
period is (exactly ``J`` for ``N = 2^τ``). ``mixing_matrix`` therefore
checks only nonnegativity and stochasticity for it, not ``λ < 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from demuon.config import TopologyConfig
from demuon.errors import TopologyError
from demuon.topology import graphs

WEIGHT_RULES: tuple[str, ...] = ("metropolis", "max_degree", "lazy_metropolis", "lazy_max_degree")

# Options each topology accepts besides ``weights`` (None values mean "the default").
TOPOLOGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "complete": (),
    "ring": (),
    "torus": ("rows",),
    "hypercube": (),
    "exponential": ("directed",),
    "directed_exponential": (),
    "one_peer_exponential": ("t",),
    "erdos_renyi": ("p", "seed"),
    "random_geometric": ("radius", "seed"),
    "star": (),
    "edge_list": ("path",),
}
TOPOLOGY_NAMES: tuple[str, ...] = tuple(TOPOLOGY_OPTIONS)


# ------------------------------------------------------------------------------- weight rules


def degrees(A: torch.Tensor) -> torch.Tensor:
    """``d_i`` = number of peers ``i`` listens to (self excluded), as float64."""
    return A.sum(dim=1).to(torch.float64)


def with_self_weights(W: torch.Tensor) -> torch.Tensor:
    """Set ``w_ii = 1 − Σ_{j≠i} w_ij`` (the off-diagonal of ``W`` is taken as given)."""
    W = W.clone()
    W.fill_diagonal_(0.0)
    W += torch.diag(1.0 - W.sum(dim=1))
    return W


def uniform_weights(A: torch.Tensor, w: float) -> torch.Tensor:
    """``w`` on every arc of ``A``, the rest of each row on self."""
    return with_self_weights(A.to(torch.float64) * w)


def metropolis_weights(A: torch.Tensor) -> torch.Tensor:
    """Metropolis–Hastings: ``w_ij = 1/(1 + max(d_i, d_j))``; symmetric, doubly stochastic if A is."""
    d = degrees(A)
    pair = torch.maximum(d[:, None], d[None, :])
    return with_self_weights(torch.where(A, 1.0 / (1.0 + pair), 0.0))


def lazy_metropolis_weights(A: torch.Tensor) -> torch.Tensor:
    """Lazy Metropolis: ``w_ij = 1/(2·max(d_i, d_j))`` (ring: 1/2 self, 1/4 each neighbour)."""
    d = degrees(A)
    pair = torch.maximum(d[:, None], d[None, :]).clamp(min=1.0)
    return with_self_weights(torch.where(A, 0.5 / pair, 0.0))


def max_degree_weights(A: torch.Tensor) -> torch.Tensor:
    """Max-degree: ``w_ij = 1/(1 + d_max)`` (hypercube: ``1/(d+1)``, complete: ``1/N``)."""
    d_max = float(degrees(A).max()) if A.numel() else 0.0
    return uniform_weights(A, 1.0 / (1.0 + d_max))


def lazy_max_degree_weights(A: torch.Tensor) -> torch.Tensor:
    """Lazy max-degree: ``w_ij = 1/(2·d_max)`` (hypercube: 1/2 self, ``1/(2d)`` each)."""
    d_max = float(degrees(A).max()) if A.numel() else 0.0
    return uniform_weights(A, 0.5 / max(d_max, 1.0))


WEIGHT_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "metropolis": metropolis_weights,
    "max_degree": max_degree_weights,
    "lazy_metropolis": lazy_metropolis_weights,
    "lazy_max_degree": lazy_max_degree_weights,
}


# -------------------------------------------------------------------------------- diagnostics


def spectral_gap(W: torch.Tensor) -> float:
    """λ = ‖W − J‖₂, the largest singular value of ``W − 11ᵀ/N`` (despite the name)."""
    W = W.to(torch.float64)
    n = W.shape[0]
    return float(torch.linalg.matrix_norm(W - 1.0 / n, ord=2))


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    """Index of the first ``True`` in ``mask`` (row-major)."""
    return tuple(int(k) for k in torch.nonzero(mask)[0])


def _check_sums(W: torch.Tensor, dim: int, problem: str, atol: float) -> None:
    """Every row (``dim=1``) or column (``dim=0``) of ``W`` sums to 1 within ``atol``."""
    sums = W.sum(dim=dim)
    bad = ~((sums - 1.0).abs() <= atol)  # NaN counts as bad
    if bad.any():
        k = _first(bad)[0]
        what = "row" if dim == 1 else "column"
        raise TopologyError(
            problem, f"{what} {k} sums to {sums[k].item():.12g}, not 1", where=k, value=sums[k].item()
        )


def validate_mixing(
    W: torch.Tensor, adjacency: torch.Tensor | None = None, *, atol: float = 1e-9, require_mixing: bool = True
) -> None:
    """Raise ``TopologyError`` unless ``W`` is a usable mixing matrix.

    Checks, in order: square shape (``bad_size``), ``w_ij ≥ 0`` (``negative_entry``), rows and
    columns sum to 1 (``row_sum``, ``column_sum``), no weight off the graph when ``adjacency`` is
    given (``non_edge_weight``), and, if ``require_mixing``, ``λ = ‖W − J‖₂ < 1`` (``not_mixing``).
    """
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise TopologyError("bad_size", f"W must be a non-empty square matrix, got shape {tuple(W.shape)}")
    W = W.to(torch.float64)
    negative = W < -atol
    if negative.any():
        i, j = _first(negative)
        raise TopologyError(
            "negative_entry", f"w[{i},{j}] = {W[i, j].item():.12g} < 0", where=(i, j), value=W[i, j].item()
        )
    _check_sums(W, 1, "row_sum", atol)
    _check_sums(W, 0, "column_sum", atol)
    if adjacency is not None:
        _check_support(W, adjacency, atol)
    if require_mixing:
        lam = spectral_gap(W)
        if lam >= 1.0 - atol:
            raise TopologyError(
                "not_mixing",
                f"λ = ‖W − J‖₂ = {lam:.12g} ≥ 1: the graph does not mix (disconnected?)",
                value=lam,
            )


def _check_support(W: torch.Tensor, adjacency: torch.Tensor, atol: float) -> None:
    """No weight on a pair ``i ≠ j`` that is not an edge of ``adjacency``."""
    if adjacency.shape != W.shape:
        raise TopologyError(
            "bad_size", f"adjacency shape {tuple(adjacency.shape)} != W shape {tuple(W.shape)}"
        )
    off_graph = ~adjacency.to(torch.bool) & ~torch.eye(W.shape[0], dtype=torch.bool)
    bad = off_graph & (W.abs() > atol)
    if bad.any():
        i, j = _first(bad)
        raise TopologyError(
            "non_edge_weight",
            f"w[{i},{j}] = {W[i, j].item():.12g} but ({i},{j}) is not an edge",
            where=(i, j),
            value=W[i, j].item(),
        )


# ---------------------------------------------------------------------------- named topologies


def _bad_option(key: str, value: object, valid: tuple[str, ...]) -> TopologyError:
    """A ``bad_option`` error naming the value and listing the valid ones."""
    listed = ", ".join(valid) if valid else "none"
    return TopologyError(
        "bad_option", f"{key}={value!r} is not valid; valid: {listed}", where=key, value=value
    )


def _required(name: str, options: dict[str, object], key: str) -> object:
    """An option the topology cannot do without."""
    value = options.get(key)
    if value is None:
        raise TopologyError("bad_option", f"topology {name!r} needs the option {key}=", where=key)
    return value


def _number(name: str, options: dict[str, object], key: str) -> float:
    """A required numeric option (range checks are the graph constructor's)."""
    value = _required(name, options, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError("bad_option", f"{key}={value!r} must be a number", where=key, value=value)
    return float(value)


def _int_option(options: dict[str, object], key: str, default: int | None) -> int | None:
    """An integer option (``default`` when absent or None)."""
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError("bad_option", f"{key}={value!r} must be an integer", where=key, value=value)
    return value


def _adjacency(name: str, n: int, options: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The graph of topology ``name`` and, for a weighted edge list, the file's weights."""
    simple: dict[str, Callable[[int], torch.Tensor]] = {
        "complete": graphs.complete,
        "ring": graphs.ring,
        "hypercube": graphs.hypercube,
        "directed_exponential": graphs.directed_exponential,
        "star": graphs.star,
    }
    if name in simple:
        return simple[name](n), None
    if name == "torus":
        return graphs.torus(n, _int_option(options, "rows", None)), None
    if name == "exponential":
        return graphs.exponential(n, _directed(options)), None
    if name == "one_peer_exponential":
        return graphs.one_peer_exponential(n, _int_option(options, "t", 0) or 0), None
    seed = _int_option(options, "seed", 0) or 0
    if name == "erdos_renyi":
        return graphs.erdos_renyi(n, _number(name, options, "p"), seed), None
    if name == "random_geometric":
        return graphs.random_geometric(n, _number(name, options, "radius"), seed), None
    path = _required(name, options, "path")
    if not isinstance(path, str | Path):
        raise TopologyError("bad_option", f"path={path!r} must be a file path", where="path", value=path)
    return graphs.read_edge_list(path, n)


def _directed(options: dict[str, object]) -> bool:
    value = options.get("directed")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TopologyError(
            "bad_option", f"directed={value!r} must be true or false", where="directed", value=value
        )
    return value


def canonical_weights(name: str, A: torch.Tensor, file_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The weights docs/algorithms.md §4.1 gives topology ``name`` on its graph ``A`` (the undirected
    static exponential graph gets Metropolis weights; Ying et al.'s directed one ``1/(τ+1)``)."""
    tau = len(graphs.exponential_hops(A.shape[0]))
    if name in ("complete", "hypercube", "torus"):
        return max_degree_weights(A)
    if name == "exponential" and not bool(torch.equal(A, A.T)):
        return uniform_weights(A, 1.0 / (tau + 1))
    if name == "directed_exponential":
        return uniform_weights(A, 1.0 / (tau + 2))
    if name == "one_peer_exponential":
        return uniform_weights(A, 0.5)
    if file_weights is not None:
        return with_self_weights(file_weights)
    return metropolis_weights(A)


def mixing_matrix(name: str, n: int, **options: object) -> torch.Tensor:
    """N×N float64 mixing matrix of topology ``name`` on ``n`` peers, validated.

    ``options``: ``weights`` (one of ``WEIGHT_RULES``; None = canonical) and the topology's own
    (``TOPOLOGY_OPTIONS``): ``rows`` (torus), ``directed`` (exponential), ``t`` (one-peer round),
    ``p``/``seed`` (Erdős–Rényi), ``radius``/``seed`` (random geometric), ``path`` (edge list).
    A None value means the default.
    """
    if name not in TOPOLOGY_OPTIONS:
        raise _bad_option("name", name, TOPOLOGY_NAMES)
    graphs.check_size(n)
    valid = ("weights", *TOPOLOGY_OPTIONS[name])
    for key in options:
        if key not in valid:
            raise TopologyError(
                "bad_option",
                f"topology {name!r} takes no option {key!r}; valid: {', '.join(valid)}",
                where=key,
            )
    rule = options.get("weights")
    if rule is not None and rule not in WEIGHT_RULES:
        raise _bad_option("weights", rule, WEIGHT_RULES)
    A, file_weights = _adjacency(name, n, options)
    W = canonical_weights(name, A, file_weights) if rule is None else WEIGHT_FUNCTIONS[str(rule)](A)
    validate_mixing(W, A, require_mixing=name != "one_peer_exponential")
    return W


def _config_options(cfg: TopologyConfig, t: int) -> dict[str, object]:
    """The options of ``cfg`` that its topology reads."""
    every: dict[str, object] = {
        "rows": cfg.rows,
        "t": t,
        "p": cfg.p,
        "radius": cfg.radius,
        "seed": cfg.seed,
        "path": cfg.edges_file,
        "directed": cfg.directed,
    }
    return {key: every[key] for key in TOPOLOGY_OPTIONS[cfg.name]}


def mixing_matrix_from_config(cfg: TopologyConfig, n: int, t: int = 0) -> torch.Tensor:
    """``W`` (round ``t``'s ``W_t`` for a time-varying topology) for the configured topology."""
    return mixing_matrix(cfg.name, n, weights=cfg.weights, **_config_options(cfg, t))


def period(cfg: TopologyConfig, n: int) -> int:
    """How many rounds before ``W_t`` repeats: 1 for static graphs, τ = ⌈log₂N⌉ for one-peer exp."""
    graphs.check_size(n)
    return graphs.one_peer_period(n) if cfg.name == "one_peer_exponential" else 1


# ---------------------------------------------------------------------------------- peer view


@dataclass(frozen=True)
class PeerView:
    """What peer ``index`` needs of ``W``, computed from the shared config alone."""

    index: int
    self_weight: float  # w_ii
    in_neighbours: tuple[tuple[int, float], ...]  # (j, w_ij), j != i, w_ij > 0, sorted by j
    out_neighbours: tuple[int, ...]  # j != i with w_ji > 0, sorted


def peer_view(W: torch.Tensor, i: int) -> PeerView:
    """Row ``i`` of ``W`` (whom ``i`` hears and with which weight) and column ``i`` (whom it feeds)."""
    n = W.shape[0]
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise TopologyError("bad_option", f"peer index {i!r} outside 0..{n - 1}", where="i", value=i)
    row, col = W[i].tolist(), W[:, i].tolist()
    ins = tuple((j, float(row[j])) for j in range(n) if j != i and row[j] > 0)
    outs = tuple(j for j in range(n) if j != i and col[j] > 0)
    return PeerView(index=i, self_weight=float(row[i]), in_neighbours=ins, out_neighbours=outs)


def live_mixing_matrix(W: torch.Tensor, live: Collection[int]) -> torch.Tensor:
    """Metropolis weights on the graph of ``W`` restricted to the peers in ``live`` (a peer that
    left keeps only its own weight 1). Every peer computes the same matrix from the shared config
    and the list of who left, so both ends of every edge agree on its weight; the result is
    symmetric and doubly stochastic. The graph must be undirected and stay connected."""
    n = W.shape[0]
    A = (W > 0) & ~torch.eye(n, dtype=torch.bool)
    if not torch.equal(A, A.T):
        raise TopologyError("not_undirected", "re-weighting after a leave needs an undirected graph")
    keep = torch.zeros(n, dtype=torch.bool)
    keep[list(live)] = True
    A_live = A & keep[:, None] & keep[None, :]
    ids = [i for i in range(n) if keep[i]]
    if ids and not graphs.is_connected(A_live[ids][:, ids]):
        raise TopologyError("disconnected", f"the peers that stay ({ids}) are not connected", where=ids)
    return metropolis_weights(A_live)


def leave_schedule(
    W: torch.Tensor, leaves: Mapping[int, int], index: int
) -> list[tuple[int, list[PeerView]]]:
    """Peer ``index``'s view from each round at which peers leave (``leaves``: peer → the round it
    leaves before): Metropolis weights on the graph of the peers still there. Two peers that know
    the same leaves compute the same weights for the edge between them."""
    n = W.shape[0]
    out = []
    for r in sorted(set(leaves.values())):
        live = [i for i in range(n) if leaves.get(i, r + 1) > r]
        out.append((r, [peer_view(live_mixing_matrix(W, live), index)]))
    return out


def heir(W: torch.Tensor, leaves: Mapping[int, int], leaver: int) -> int | None:
    """Who takes over ``leaver``'s share of the trackers: its lowest-numbered neighbour that is
    still there when it leaves (None: no such neighbour)."""
    r = leaves[leaver]
    row = W[leaver].tolist()
    stay = [j for j in range(W.shape[0]) if j != leaver and row[j] > 0 and leaves.get(j, r + 1) > r]
    return stay[0] if stay else None
