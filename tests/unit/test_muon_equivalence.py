"""One peer with Muon's options is torch.optim.Muon, step for step (docs/algorithms.md §2.6).

N = 1 DeMuon runs through the project's own path (config → build_peers → the simulator's round
on the one-peer complete graph, W = [1]), so V = M and X is never mixed; torch.optim.Muon steps a
copy of the same model on the same batches. torch's Newton–Schulz always computes in bfloat16;
the tests swap in the same function computing in float32 (same coefficients, steps, eps), which
is what DeMuon runs with ``routing.ns_dtype = "float32"``. The parameters agree to 1e-6 after each
of 5 steps (measured: below 1e-7).

Also here, on the same path: MVR momentum (``momentum_form = "mvr"``) and the options with
N > 1 peers (the tracker still tracks M).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.optim._muon as torch_muon
from torch import Tensor

from demuon.app import simulate
from demuon.app.peers import build_peers
from demuon.config import Config, config_from_dict
from demuon.node.newton_schulz import newton_schulz
from demuon.node.observe import tracking_gap
from demuon.node.peer import Peer

ROUNDS = 5
LR = 0.02
TORCH_NS = torch_muon._zeropower_via_newtonschulz  # torch's own, computing in bfloat16


def ns_float32(
    grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> Tensor:
    """torch's ``_zeropower_via_newtonschulz`` line for line, computing in float32, not bfloat16."""
    a, b, c = ns_coefficients
    X = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        X = X.T
    X = X.div(X.norm().clamp(min=eps))
    for _ in range(ns_steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if tall else X


@pytest.fixture(autouse=True)
def float32_newton_schulz(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns_float32)
    yield


def one_peer_config(
    shape: tuple[int, int], peers: int = 1, dtype: str = "float32", **algorithm: Any
) -> Config:
    dim_out, dim_in = shape  # the quadratic workload's weight is dim_out × dim_in
    return config_from_dict(
        {
            "peers": peers,
            "rounds": ROUNDS,
            "seed": 1,
            "device": "cpu",
            "dtype": dtype,
            "topology": {"name": "complete" if peers == 1 else "ring"},
            "algorithm": {"name": "demuon", "lr": LR, "routing": {"ns_dtype": "float32"}, **algorithm},
            "workload": {
                "kind": "quadratic",
                "rows": 16,
                "dim_in": dim_in,
                "dim_out": dim_out,
                "noise": 0.5,
                "batch_size": 8,
            },
        }
    )


def differences_to_torch(config: Config, **muon: Any) -> list[float]:
    """Largest |X_demuon − X_torch| after each round: DeMuon's one peer against torch.optim.Muon
    on a copy of the same model, fed the same batch each round."""
    peers, *_ = build_peers(config)
    assert len(peers) == 1 and peers[0].view(0).in_neighbours == ()
    peer = peers[0]
    workload = peer.workload
    model = workload.build_model(config.seed).to(torch.float32)
    optimizer = torch.optim.Muon(model.parameters(), lr=config.algorithm.lr, **muon)
    out = []
    for k in range(config.rounds):
        simulate.simulate_round(peers, k)
        optimizer.zero_grad()
        torch.autograd.backward(workload.loss(model, workload.train_batch(0, 1, k)))
        optimizer.step()  # type: ignore[no-untyped-call]
        theirs = dict(model.named_parameters())["weight"].detach()
        out.append(float((theirs - peer.params["weight"].detach()).abs().max()))
    return out


@pytest.mark.parametrize("shape", [(4, 6), (8, 4)], ids=["wide", "tall"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_one_peer_with_muon_options_is_torch_muon(
    shape: tuple[int, int], nesterov: bool, adjust_lr: str
) -> None:
    momentum, weight_decay = 0.9, 0.1
    config = one_peer_config(
        shape, theta=1.0 - momentum, nesterov=nesterov, weight_decay=weight_decay, adjust_lr=adjust_lr
    )
    diffs = differences_to_torch(
        config, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, adjust_lr_fn=adjust_lr
    )
    assert max(diffs) < 1e-6, diffs


@pytest.mark.parametrize("shape", [(4, 6), (8, 4)], ids=["wide", "tall"])
def test_one_peer_equals_torch_muon_with_its_defaults(shape: tuple[int, int]) -> None:
    """torch's defaults (momentum 0.95, nesterov, weight decay 0.1, adjust_lr_fn None = "original")
    are θ = 0.05, nesterov = true, weight_decay = 0.1, adjust_lr = "original"."""
    config = one_peer_config(shape, theta=0.05, nesterov=True, weight_decay=0.1, adjust_lr="original")
    assert max(differences_to_torch(config)) < 1e-6


def test_default_demuon_is_torch_muon_without_nesterov_and_decay() -> None:
    """DeMuon's own EMA ``M = (1−θ)M + θG`` is torch's momentum buffer (``buf.lerp_(grad, 1 − μ)``)
    with θ = 1 − μ; on a wide matrix torch's "original" factor is 1, so default DeMuon is torch's
    Muon with nesterov = False and weight_decay = 0."""
    config = one_peer_config((4, 6), theta=0.05)
    diffs = differences_to_torch(config, momentum=0.95, nesterov=False, weight_decay=0.0)
    assert max(diffs) < 1e-6


def test_without_the_options_demuon_is_not_torch_muon() -> None:
    """The comparison can tell: default DeMuon against torch's defaults on a tall matrix."""
    config = one_peer_config((8, 4), theta=0.05)
    assert max(differences_to_torch(config)) > 1e-3


@pytest.mark.parametrize("shape", [(8, 4), (4, 8)])
def test_the_float32_stand_in_is_torch_newton_schulz_in_float32(shape: tuple[int, int]) -> None:
    """The stand-in matches torch's function up to bfloat16 rounding, and DeMuon's NS5 in float32
    (which adds eps to the norm where torch clamps the norm at eps) to float32 rounding."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    coefficients = (3.4445, -4.7750, 2.0315)
    ours = ns_float32(G, coefficients, 5, 1e-7)
    assert torch.allclose(ours, TORCH_NS(G, coefficients, 5, 1e-7).float(), atol=0.05)
    assert torch.allclose(ours, newton_schulz(G, 5, dtype=torch.float32), atol=1e-6)


# ---------------------------------------------------------------- MVR on the same peer path


def run_peers(config: Config) -> list[Peer]:
    peers, *_ = build_peers(config)
    for k in range(config.rounds):
        simulate.simulate_round(peers, k)
    return peers


def test_mvr_with_theta_one_is_the_plain_stochastic_gradient() -> None:
    """θ = 1: ``M = G + 0·(M − G̃) = G`` every round, so N = 1 DeMuon-MVR is DeMuon with θ = 1."""
    shape = (8, 4)
    mvr = run_peers(one_peer_config(shape, theta=1.0, momentum_form="mvr"))[0]
    ema = run_peers(one_peer_config(shape, theta=1.0))[0]
    assert torch.equal(mvr.M["weight"], mvr.G["weight"])
    assert torch.allclose(mvr.params["weight"], ema.params["weight"], atol=1e-7)


def test_mvr_momentum_uses_the_previous_iterate_on_the_same_batch() -> None:
    """``M^k = G^k + (1−θ)(M^{k−1} − ∇f(X^{k−1}; ξ^k))``, rebuilt in float64 from the peer's
    iterates and the workload's batches; ``M^0 = G^0``."""
    theta = 0.3
    config = one_peer_config((8, 4), theta=theta, momentum_form="mvr")
    peers, *_ = build_peers(config)
    peer = peers[0]
    workload = peer.workload

    def grad64(X: Tensor, k: int) -> Tensor:
        A, B = (t.double() for t in workload.train_batch(0, 1, k))
        grad: Tensor = (A @ X.double().T - B).T @ A / A.shape[0]  # ∇ of ½‖A Xᵀ − B‖²/|S|
        return grad

    M = torch.zeros(8, 4, dtype=torch.float64)
    X_prev: Tensor | None = None
    for k in range(config.rounds):
        X = peer.params["weight"].detach().clone()
        simulate.simulate_round(peers, k)
        G = grad64(X, k)
        G_tilde = grad64(X_prev, k) if X_prev is not None else torch.zeros_like(G)
        M = G + (1.0 - theta) * (M - G_tilde)
        assert torch.allclose(peer.M["weight"].double(), M, atol=1e-5), k
        X_prev = X


def test_mvr_peer_resumes_from_its_state_exactly() -> None:
    config = one_peer_config((8, 4), theta=0.3, momentum_form="mvr")
    straight, *_ = build_peers(config)
    resumed, *_ = build_peers(config)
    for k in range(3):
        simulate.simulate_round(straight, k)
        simulate.simulate_round(resumed, k)
    state = resumed[0].state_dict()
    assert "X_prev" in state
    fresh, *_ = build_peers(config)
    fresh[0].load_state_dict(state)
    for k in range(3, config.rounds):
        simulate.simulate_round(straight, k)
        simulate.simulate_round(fresh, k)
    assert torch.equal(straight[0].params["weight"], fresh[0].params["weight"])


# --------------------------------------------------------------------- the options with N > 1


@pytest.mark.parametrize(
    "options",
    [
        {"nesterov": True, "weight_decay": 0.1, "adjust_lr": "original"},
        {"momentum_form": "mvr", "nesterov": True},
    ],
    ids=["nesterov+decay+factor", "mvr+nesterov"],
)
def test_with_the_options_the_tracker_still_tracks_the_momentum(options: dict[str, Any]) -> None:
    """V tracks M whatever M is (EMA or MVR) and whatever the step does with V: mean V = mean M."""
    peers = run_peers(one_peer_config((8, 4), peers=4, dtype="float64", theta=0.3, **options))
    gap = tracking_gap(peers)
    assert gap is not None and gap < 1e-12
