"""DeMuon's theory on stacked float64 peers (docs/algorithms.md §2.3, §9 items 13–15), the heterogeneity
floor of DSGD, and the per-peer building blocks held equal to the stacked oracle ``reference_round``.

Mixing matrices are built here from the numbers of docs/algorithms.md §4 and §9 (circulants), not from
``demuon.topology``, so these tests check the optimizer alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from demuon.config import ConstantSchedule, LinearSchedule
from demuon.node import algorithms, optim

N, ROWS, COLS = 8, 6, 4
F64 = torch.float64
Stack = torch.Tensor


def circulant(weights: dict[int, float]) -> torch.Tensor:
    """Row i has ``weights[d]`` in column ``(i + d) mod N``: peer i averages messages from i + d."""
    W = torch.zeros(N, N, dtype=F64)
    for i in range(N):
        for d, w in weights.items():
            W[i, (i + d) % N] += w
    return W


RING = circulant({-1: 1 / 3, 0: 1 / 3, 1: 1 / 3})  # Metropolis ring, docs/algorithms.md §4
# DeMuon code's graph, docs/algorithms.md §9 item 10
DIRECTED_EXP = circulant({0: 0.4, 1: 0.2, 2: 0.2, 4: 0.2})
COMPLETE = torch.full((N, N), 1 / N, dtype=F64)
GRAPHS = {"ring": (RING, 0.80474), "directed_exp": (DIRECTED_EXP, 0.6), "complete": (COMPLETE, 0.0)}


def lam(W: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(W - torch.full_like(W, 1 / N), ord=2))


def consensus_error(X: Stack) -> float:
    """Spectral norm of the stacked (N·m)×n matrix X − 1⊗X̄ (Lemma 1's norm)."""
    E = X - X.mean(dim=0, keepdim=True)
    return float(torch.linalg.matrix_norm(E.reshape(-1, X.shape[-1]), ord=2))


def student_t(shape: tuple[int, ...], df: float = 1.5) -> torch.Tensor:
    """Heavy-tailed noise: finite α-th moment for α < df only (no variance at df = 1.5)."""
    return torch.distributions.StudentT(df).sample(shape).to(F64)


def zeros() -> Stack:
    return torch.zeros(N, ROWS, COLS, dtype=F64)


def noisy_quadratic() -> Callable[[Stack], Stack]:
    """G_i = X_i − B_i + heavy-tailed noise (f_i = ½‖X − B_i‖²)."""
    B = torch.randn(N, ROWS, COLS, dtype=F64)
    return lambda X: X - B + student_t(tuple(X.shape))


def ns5_round(
    W: torch.Tensor, X: Stack, M: Stack, V: Stack, G: Stack, lr: float, theta: float
) -> tuple[Stack, Stack, Stack]:
    """DeMuon with NS5 (fp32) in place of the exact polar factor, stacked."""
    M_new = optim.momentum_update(M, G, theta)
    V_new = torch.einsum("ij,jmn->imn", W, optim.tracker_message(V, M_new, M))
    Y = X - lr * optim.newton_schulz(V_new).to(F64)
    return torch.einsum("ij,jmn->imn", W, Y), M_new, V_new


# ------------------------------------------------------------------------------ Lemma 1


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_mixing_matrices_have_the_documented_lambda_and_bound(graph: str) -> None:
    W, expected = GRAPHS[graph]
    assert torch.allclose(W.sum(0), torch.ones(N, dtype=F64)) and torch.allclose(
        W.sum(1), torch.ones(N, dtype=F64)
    )
    assert lam(W) == pytest.approx(expected, abs=1e-5)
    # docs/algorithms.md §9 item 13 (ring: 11.657, quoted as 11.65)
    bound_per_eta = math.sqrt(N) * lam(W) / (1 - lam(W))
    assert bound_per_eta == pytest.approx(
        {"ring": 11.65, "directed_exp": 4.243, "complete": 0.0}[graph], abs=1e-2
    )


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("ns5", [False, True], ids=["polar", "ns5"])
def test_consensus_error_stays_below_lemma_1_under_heavy_tailed_noise(graph: str, ns5: bool) -> None:
    W, _ = GRAPHS[graph]
    lr, theta = 0.05, 0.2
    bound = math.sqrt(N) * lam(W) * lr / (1 - lam(W)) * (optim.NS5_MAX_SINGULAR if ns5 else 1.0)
    grad = noisy_quadratic()
    X, M, V = torch.randn(1, ROWS, COLS, dtype=F64).expand(N, -1, -1).clone(), zeros(), zeros()
    worst = 0.0
    for k in range(300):
        if ns5:
            X, M, V = ns5_round(W, X, M, V, grad(X), lr, theta)
        else:
            X, M, V = algorithms.reference_round("demuon", W, X, M, V, grad(X), k, lr=lr, theta=theta)
        worst = max(worst, consensus_error(X))
    assert worst <= bound + 1e-12
    if graph != "complete":
        assert worst > 0.1 * bound  # the bound is not vacuous: peers do disagree


# -------------------------------------------------------------------- tracking invariant


@pytest.mark.parametrize("algorithm", ["demuon", "gt_nsgdm", "gt_dsgd"])
def test_tracker_sum_equals_momentum_sum_for_200_iterations(algorithm: str) -> None:
    grad = noisy_quadratic()
    X, M, V = zeros(), zeros(), zeros()
    for k in range(200):
        X, M, V = algorithms.reference_round(algorithm, DIRECTED_EXP, X, M, V, grad(X), k, lr=0.02, theta=0.2)
        gap = (V.sum(0) - M.sum(0)).abs().max().item()
        assert gap <= 1e-10 * (1.0 + M.abs().sum().item())


# ------------------------------------------------------------- complete graph = Muon


def test_complete_graph_demuon_is_centralised_muon_on_the_averaged_momentum() -> None:
    grad = noisy_quadratic()
    X0 = torch.randn(ROWS, COLS, dtype=F64)
    X, M, V = X0.expand(N, -1, -1).clone(), zeros(), zeros()
    X_c, M_c = X0.clone(), torch.zeros(ROWS, COLS, dtype=F64)
    lr, theta = 0.05, 0.3
    for k in range(50):
        G = grad(X)
        X, M, V = algorithms.reference_round("demuon", COMPLETE, X, M, V, G, k, lr=lr, theta=theta)
        M_c = (1 - theta) * M_c + theta * G.mean(0)
        X_c = X_c - lr * optim.polar_svd(M_c)
        assert torch.allclose(X, X_c.expand(N, -1, -1), atol=1e-10)
        assert torch.allclose(V, M_c.expand(N, -1, -1), atol=1e-10)


# ------------------------------------------------------------------- heterogeneity floor

# f_i(X) = ½ a_i ‖X − B_i‖² with a different curvature and minimiser per peer, exact gradients.
CURVATURE = torch.linspace(0.5, 2.0, N, dtype=F64).view(N, 1, 1)


def heterogeneous_run(algorithm: str, lr: float, rounds: int, schedule: object) -> float:
    """‖∇f(X̄)‖_F of the global objective at the average iterate after ``rounds`` on the ring."""
    B = 2.0 * torch.randn(N, ROWS, COLS, generator=torch.Generator().manual_seed(7), dtype=F64)
    X, M, V = zeros(), zeros(), zeros()
    for k in range(rounds):
        eta = optim.learning_rate(schedule, lr, k, rounds)  # type: ignore[arg-type]
        X, M, V = algorithms.reference_round(
            algorithm, RING, X, M, V, CURVATURE * (X - B), k, lr=eta, theta=0.2
        )
    return float(torch.linalg.norm((CURVATURE * (X.mean(0) - B)).mean(0)))


def test_dsgd_stalls_at_a_heterogeneity_floor_that_tracking_methods_go_below() -> None:
    # DSGD and GT-DSGD: constant η = 0.1. DeMuon's steps have unit spectral norm, so a constant
    # step leaves it oscillating at distance ~η: it uses the linear decay η(1 − k/K) from 0.1.
    floor = heterogeneous_run("dsgd", 0.1, 400, ConstantSchedule())
    assert floor == pytest.approx(heterogeneous_run("dsgd", 0.1, 800, ConstantSchedule()), rel=1e-6)
    assert floor > 0.1
    assert heterogeneous_run("gt_dsgd", 0.1, 400, ConstantSchedule()) < floor / 1000
    assert heterogeneous_run("demuon", 0.1, 400, LinearSchedule()) < floor / 10


# --------------------------------------------------- per-peer composition = stacked oracle


def peer_round(
    algorithm: str,
    W: torch.Tensor,
    state: list[dict[str, dict[str, torch.Tensor]]],
    grads: list[torch.Tensor],
    k: int,
    lr: float,
) -> None:
    """One round as N independent peers would run it: local messages, then mixes in fixed order."""

    def neighbourhood(
        i: int, key: str, values: list[dict[str, torch.Tensor]]
    ) -> list[tuple[float, torch.Tensor]]:
        others = [(W[i, j].item(), values[j][key]) for j in range(N) if j != i and W[i, j] > 0]
        return [(W[i, i].item(), values[i][key]), *others]

    if "V" in algorithms.phases(algorithm):
        msgs = []
        for s, G in zip(state, grads, strict=True):
            s["M"], U = algorithms.local_tracker_update(algorithm, s["M"], s["V"], {"w": G}, 0.2)
            msgs.append(U)
        for i, s in enumerate(state):
            s["V"] = {"w": optim.mix(neighbourhood(i, "w", msgs))}
    Ys = [
        algorithms.local_step(algorithm, s["X"], s["V"], {"w": G}, lr, k, routes={"w": "polar_svd"})
        for s, G in zip(state, grads, strict=True)
    ]
    for i, s in enumerate(state):
        s["X"] = {"w": optim.mix(neighbourhood(i, "w", Ys))}


@pytest.mark.parametrize("algorithm", algorithms.NAMES)
def test_peers_built_from_the_blocks_match_the_stacked_oracle(algorithm: str) -> None:
    B = 3.0 * torch.randn(N, ROWS, COLS, dtype=F64)
    X, M, V = torch.randn(1, ROWS, COLS, dtype=F64).expand(N, -1, -1).clone(), zeros(), zeros()
    state = [{"X": {"w": X[i].clone()}, "M": {"w": M[i].clone()}, "V": {"w": V[i].clone()}} for i in range(N)]
    rounds = 8
    for k in range(rounds):
        noise = student_t((N, ROWS, COLS), df=2.5)
        lr = optim.learning_rate(LinearSchedule(), 0.1, k, rounds)
        X, M, V = algorithms.reference_round(
            algorithm, DIRECTED_EXP, X, M, V, CURVATURE * (X - B) + noise, k, lr=lr, theta=0.2
        )
        peer_X = torch.stack([s["X"]["w"] for s in state])
        peer_round(algorithm, DIRECTED_EXP, state, list(CURVATURE * (peer_X - B) + noise), k, lr)
        assert torch.allclose(torch.stack([s["X"]["w"] for s in state]), X, rtol=0, atol=1e-10)
        assert torch.allclose(torch.stack([s["V"]["w"] for s in state]), V, rtol=0, atol=1e-10)
        assert torch.allclose(torch.stack([s["M"]["w"] for s in state]), M, rtol=0, atol=1e-10)
    assert consensus_error(X) > 1e-3  # the peers really differ, so mixing was exercised
