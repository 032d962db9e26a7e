"""EF21-Muon: server–worker Muon with error feedback on both links (layer 4: pure, no I/O).

Gruntkowska, Gaponov, Tovmasyan, Richtárik, arXiv 2510.00643 (docs/algorithms.md §12). A server
holds the iterate ``X``, the copy ``W`` every worker holds, and ``G``, the average of the workers'
estimates; worker ``j`` holds its momentum ``M_j`` and its estimate ``G_j`` of it. Round ``k``::

    server   X ← X + η_k · LMO(G) = decoupled_decay(X) − η_k s_p ORTH(G)  (docs/algorithms.md §2.6)
             S = C_down(X − W);  W ← W + S;  broadcast S                    (compressed model shift)
    worker j W ← W + S
             M_j ← (1 − θ) M_j + θ ∇f_j(W; ξ_{j,k})                         (at the compressed model)
             R_j = C_up(M_j − G_j);  G_j ← G_j + R_j;  send R_j             (compressed momentum shift)
    server   G ← G + (1/n) Σ_j R_j                                          (= mean_j G_j)

Only compressed *differences* travel; what a compression leaves out stays in ``X − W`` or
``M_j − G_j`` and is sent later (error feedback), so nothing is lost for good. Start: ``W = X``,
``M_j = G_j = G = 0`` (the first step is then zero, as DeMuon's trackers start at 0). With the
identity codec on both links ``W ≡ X`` and ``G = mean_j M_j``: Muon on the averaged momentum,
orthogonalised once, on the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from demuon.config import AdjustLR
from demuon.node import optim
from demuon.transport.codecs import Codec, Encoded

TensorDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Shift:
    """One compressed difference as it travels: the encoded tensors and their decoded value."""

    encoded: dict[str, Encoded]
    value: TensorDict


def compress(D: Mapping[str, torch.Tensor], codec: Codec, seeds: Sequence[int]) -> Shift:
    """``C(D)`` per tensor (``seeds``: one codec seed per tensor, for stochastic codecs): what is
    sent and what every receiver decodes (the sender adds the same decoded value)."""
    encoded, value = {}, {}
    for (n, d), seed in zip(D.items(), seeds, strict=True):
        enc = codec.encode(d.contiguous(), seed=seed)
        encoded[n] = enc
        value[n] = codec.decode(enc, tuple(d.shape), d.dtype)
    return Shift(encoded, value)


def add(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor]) -> TensorDict:
    """``A + B`` per tensor."""
    return {n: A[n] + B[n] for n in A}


def diff(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor]) -> TensorDict:
    """``A − B`` per tensor."""
    return {n: A[n] - B[n] for n in A}


def server_step(
    X: Mapping[str, torch.Tensor],
    G: Mapping[str, torch.Tensor],
    lr: float,
    routes: Mapping[str, str],
    *,
    ns_steps: int,
    ns_dtype: torch.dtype,
    weight_decay: float = 0.0,
    adjust_lr: AdjustLR = "none",
) -> TensorDict:
    """``X + η LMO(G)``: DeMuon's local step applied to the server's estimate (same routes,
    shape factors and decay, so EF21-Muon and DeMuon differ only in how ``G`` is formed)."""
    return optim.demuon_local_step(
        X, G, lr, routes, ns_steps=ns_steps, ns_dtype=ns_dtype, weight_decay=weight_decay, adjust_lr=adjust_lr
    )


def worker_momentum(
    M: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor], theta: float
) -> TensorDict:
    """``M_j ← (1 − θ) M_j + θ ∇f_j(W)``, DeMuon's EMA (θ the weight on the new gradient)."""
    return {n: optim.momentum_update(M[n], grad[n], theta) for n in M}


def server_estimate(
    G: Mapping[str, torch.Tensor], shifts: Sequence[Mapping[str, torch.Tensor]]
) -> TensorDict:
    """``G + (1/n) Σ_j R_j``, summed in worker order (deterministic)."""
    return optim.mix_dicts([(1.0, G), *((1.0 / len(shifts), R) for R in shifts)])
