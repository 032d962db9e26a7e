"""Heterogeneous least squares: peer ``i`` minimises its own quadratic, the network the average.

model      a bias-free ``nn.Linear(dim_in, dim_out)``; its weight ``W`` (dim_out × dim_in) is
           the iterate, so Newton–Schulz applies to it; prediction ``A Wᵀ``
data       A_i ∈ ℝ^{rows×dim_in}, entries N(0, 1)                      (one matrix per peer)
           X*  ∈ ℝ^{dim_in×dim_out}, entries N(0, 1)                   (shared centre)
           X_i* = X* + heterogeneity · Δ_i,  Δ_i entries N(0, 1)       (peer i's minimiser)
           B_i = A_i X_i*
loss       f_i(W) = ½ ‖A_S Wᵀ − (B_S + noise · ξ)‖² / |S|
           S = all rows (``batch_size = None``) or ``batch_size`` rows drawn per round;
           ξ is drawn per (peer, round): N(0, 1), or Student-t with ``noise_df`` degrees of
           freedom (heavy tails). ξ is zero-mean and enters the gradient linearly
           (−A_Sᵀ ξ / |S|), so stochastic gradients stay unbiased.
objective  F(W) = (1/N) Σ_i f_i(W) (noise-free, full batch): :meth:`LeastSquares.global_loss`,
           :meth:`~LeastSquares.global_gradient_norm` and the closed-form minimiser
           :meth:`~LeastSquares.optimum` (float64) are exact references for tests.
validation ½ ‖A_val Wᵀ − A_val X*‖² / rows_val on held-out rows against the shared centre X*
           (the population minimiser, the mean of the peers' minimisers' distribution).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from demuon.config import QuadraticWorkload
from demuon.workloads.base import DTYPE, check_peer, derive_seed, evaluate, generator, sample_rows

VALIDATION_ROWS = 256  # held-out rows of A_val


def least_squares_loss(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """½ ‖A Wᵀ − B‖² / rows.  W: weight (dim_out × dim_in); A: inputs; B: targets (not modified).
    The data is cast to W's dtype, so a float64 model (reference checks) gets a float64 loss."""
    return 0.5 * (A.to(W.dtype) @ W.T - B.to(W.dtype)).square().sum() / A.shape[0]


class LeastSquares:
    """The ``quadratic`` workload (see the module docstring). Data of a peer is made on first use."""

    def __init__(self, cfg: QuadraticWorkload, *, seed: int, device: torch.device) -> None:
        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(device)
        shape = (cfg.dim_in, cfg.dim_out)
        self._centre = torch.randn(shape, generator=generator(seed, "quadratic/centre"), dtype=DTYPE)
        g = generator(seed, "quadratic/validation")
        A_val = torch.randn((VALIDATION_ROWS, cfg.dim_in), generator=g, dtype=DTYPE)
        self._val = (A_val.to(self.device), (A_val @ self._centre).to(self.device))
        self._data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------ data

    def local_optimum(self, peer: int) -> torch.Tensor:
        """X_i* as a weight matrix (dim_out × dim_in, float32, CPU): peer ``peer``'s own minimiser
        (unique when rows ≥ dim_in)."""
        g = generator(self.seed, "quadratic/delta", peer)
        delta = torch.randn((self.cfg.dim_in, self.cfg.dim_out), generator=g, dtype=DTYPE)
        return (self._centre + self.cfg.heterogeneity * delta).T.contiguous()

    def peer_data(self, peer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_i, B_i) of ``peer`` on the workload's device (cached)."""
        if peer not in self._data:
            g = generator(self.seed, "quadratic/A", peer)
            A = torch.randn((self.cfg.rows, self.cfg.dim_in), generator=g, dtype=DTYPE)
            B = A @ self.local_optimum(peer).T
            self._data[peer] = (A.to(self.device), B.to(self.device))
        return self._data[peer]

    def _noise(self, peer: int, k: int, shape: tuple[int, int]) -> torch.Tensor:
        """ξ of (peer, k): standard normal, or standard Student-t when ``noise_df`` is set."""
        if self.cfg.noise_df is None:
            return torch.randn(shape, generator=generator(self.seed, "quadratic/noise", peer, k), dtype=DTYPE)
        rng = np.random.default_rng(derive_seed(self.seed, "quadratic/noise-t", peer, k))
        return torch.from_numpy(rng.standard_t(self.cfg.noise_df, size=shape)).to(DTYPE)

    # -------------------------------------------------------------------------- protocol

    def build_model(self, seed: int) -> nn.Linear:
        """``nn.Linear(dim_in, dim_out, bias=False)``, weight U(±1/√dim_in) from ``seed``."""
        with torch.device("meta"):
            model = nn.Linear(self.cfg.dim_in, self.cfg.dim_out, bias=False, dtype=DTYPE)
        model.to_empty(device="cpu")
        bound = self.cfg.dim_in**-0.5
        with torch.no_grad():
            nn.init.uniform_(model.weight, -bound, bound, generator=generator(seed, "quadratic/init"))
        return model.to(device=self.device, dtype=DTYPE)

    def train_batch(self, peer: int, n_peers: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_S, B_S + noise·ξ) of ``peer`` at round ``k`` (``n_peers`` only checks the index)."""
        check_peer(peer, n_peers)
        A, B = self.peer_data(peer)
        cfg = self.cfg
        if cfg.batch_size is not None:
            g = generator(self.seed, "quadratic/rows", peer, k)
            rows = sample_rows(cfg.rows, cfg.batch_size, g, self.device)
            A, B = A[rows], B[rows]
        if cfg.noise > 0.0:
            B = B + cfg.noise * self._noise(peer, k, (B.shape[0], cfg.dim_out)).to(self.device)
        return A, B

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        A, B = batch
        return least_squares_loss(_weight(model), A, B)

    def validation_loss(self, model: nn.Module) -> float:
        return evaluate(model, [self._val], lambda batch: self.loss(model, batch))

    # ------------------------------------------------------------------ exact references

    def _stacked(self, n_peers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All peers' (A_i; B_i) stacked, float64 on CPU."""
        parts = [self.peer_data(i) for i in range(n_peers)]
        A = torch.cat([a for a, _ in parts]).to("cpu", torch.float64)
        B = torch.cat([b for _, b in parts]).to("cpu", torch.float64)
        return A, B

    def optimum(self, n_peers: int) -> torch.Tensor:
        """argmin_W F(W) as a weight matrix (dim_out × dim_in, float64, CPU); the minimum-norm one
        if Σ A_iᵀA_i is singular. All peers have ``rows`` rows, so F is the stacked problem / N."""
        A, B = self._stacked(n_peers)
        solution: torch.Tensor = torch.linalg.lstsq(A, B, driver="gelsd").solution.T.contiguous()
        return solution

    def global_loss(self, model: nn.Module, n_peers: int) -> float:
        """F(W) = (1/N) Σ_i f_i(W), full batch, noise-free, float64."""
        A, B = self._stacked(n_peers)
        W = _weight(model).detach().to("cpu", torch.float64)
        return float(least_squares_loss(W, A, B))

    def global_gradient_norm(self, model: nn.Module, n_peers: int) -> float:
        """‖∇F(W)‖_F with ∇F(W) = (A Wᵀ − B)ᵀ A / (N·rows) on the stacked data, float64."""
        A, B = self._stacked(n_peers)
        W = _weight(model).detach().to("cpu", torch.float64)
        return float(torch.linalg.norm((A @ W.T - B).T @ A / A.shape[0]))


def _weight(model: nn.Module) -> torch.Tensor:
    """The single weight matrix of a least-squares model."""
    weight = model.weight
    assert isinstance(weight, torch.Tensor)
    return weight
