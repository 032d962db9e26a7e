"""Multinomial logistic regression with a shifted feature distribution per peer.

    model      ``nn.Linear(features, classes)`` (weight matrix + bias), softmax cross-entropy
    teacher    W° ∈ ℝ^{classes×features}, entries N(0, TEACHER_SCALE² / features)     (shared)
    peer i     μ_i = heterogeneity · δ_i, δ_i entries N(0, 1)                  (its own shift)
               x = μ_i + z, z ~ N(0, I);  y ~ Categorical(softmax(W° x))      (``samples`` rows)
    batch      ``batch_size`` rows of the peer's samples, drawn per (peer, round)
    validation VALIDATION_SAMPLES held-out rows, each with its own fresh shift δ (the population
               of peers), scored with the mean cross-entropy

With ``heterogeneity = 0`` every peer samples the same distribution (IID); larger values move the
peers' inputs, and therefore their label mixes and local minimisers, apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from demuon.config import LogisticWorkload
from demuon.workloads.base import DTYPE, check_peer, evaluate, generator, sample_rows

TEACHER_SCALE = 3.0  # logits of the teacher have standard deviation ≈ 3 (labels mostly clear)
VALIDATION_SAMPLES = 1024


class LogisticRegression:
    """The ``logistic`` workload (see the module docstring)."""

    def __init__(self, cfg: LogisticWorkload, *, seed: int, device: torch.device) -> None:
        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(device)
        g = generator(seed, "logistic/teacher")
        self._teacher = torch.randn((cfg.classes, cfg.features), generator=g, dtype=DTYPE)
        self._teacher *= TEACHER_SCALE / cfg.features**0.5
        g = generator(seed, "logistic/validation")
        shifts = cfg.heterogeneity * torch.randn((VALIDATION_SAMPLES, cfg.features), generator=g, dtype=DTYPE)
        self._val = self._sample(shifts, g)
        self._data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _sample(self, shift: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``shift + z`` (one row per row of ``shift``) and teacher-sampled labels."""
        x = shift + torch.randn(shift.shape, generator=g, dtype=DTYPE)
        probs = torch.softmax(x @ self._teacher.T, dim=1)
        y = torch.multinomial(probs, 1, generator=g).squeeze(1)
        return x.to(self.device), y.to(self.device)

    def peer_data(self, peer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of ``peer``, all ``samples`` rows, on the device (cached)."""
        if peer not in self._data:
            cfg = self.cfg
            g = generator(self.seed, "logistic/peer", peer)
            mu = cfg.heterogeneity * torch.randn((1, cfg.features), generator=g, dtype=DTYPE)
            self._data[peer] = self._sample(mu.expand(cfg.samples, -1), g)
        return self._data[peer]

    def build_model(self, seed: int) -> nn.Linear:
        """``nn.Linear(features, classes)``: weight U(±1/√features) from ``seed``, bias 0."""
        with torch.device("meta"):
            model = nn.Linear(self.cfg.features, self.cfg.classes, dtype=DTYPE)
        model.to_empty(device="cpu")
        bound = self.cfg.features**-0.5
        with torch.no_grad():
            nn.init.uniform_(model.weight, -bound, bound, generator=generator(seed, "logistic/init"))
            nn.init.zeros_(model.bias)
        return model.to(device=self.device, dtype=DTYPE)

    def train_batch(self, peer: int, n_peers: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` (features, labels) rows of ``peer`` at round ``k``."""
        check_peer(peer, n_peers)
        x, y = self.peer_data(peer)
        cfg = self.cfg
        g = generator(self.seed, "logistic/rows", peer, k)
        rows = sample_rows(cfg.samples, cfg.batch_size, g, self.device)
        return x[rows], y[rows]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        dtype = next(model.parameters()).dtype  # float64 models (reference checks) get float64 data
        return F.cross_entropy(model(x.to(dtype)), y)

    def validation_loss(self, model: nn.Module) -> float:
        return evaluate(model, [self._val], lambda batch: self.loss(model, batch))
