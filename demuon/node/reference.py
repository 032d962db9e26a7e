"""The float64 oracle (layer 2): one round of every algorithm for N stacked peers at once.

Each peer holds one matrix (its whole model), stacked into ``(N, m, n)``; ``W`` is the N×N
mixing matrix and ``(W ⊗ I) Z`` mixes every peer at once. The fast per-peer path
(:class:`~demuon.node.peer.Peer` with the identity codec) is held equal to these in the tests
(docs/algorithms.md §2.1 and §3)::

    demuon:    M ← (1−θ)M + θG;  V ← W(V + M_new − M_old);  X ← W(X − η polar(V))
    gt_nsgdm:  same M, V;  X ← W(X − η V_i/‖V_i‖_F)
    gt_dsgd:   V ← W(V + G − M);  M ← G (M carries the previous gradient);  X ← W(X − ηV)
    dsgd:      X ← W(X − ηG)
    dsgd_clip: G_i clipped to τ_k = clip_scale·max(k,1)^clip_power, then dsgd

M and V come back unchanged for dsgd and dsgd_clip. ``lr`` is used as given (callers apply the
schedule); ``k`` only sets the clip threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from demuon.node.newton_schulz import polar_svd, safe_divide
from demuon.node.optim import clip_threshold


@dataclass(frozen=True)
class Constants:
    lr: float  # η_k, schedule applied
    theta: float  # θ
    clip_scale: float
    clip_power: float


#: ``(W, X, M, V, G, k, constants) → (X, M, V)`` after one round.
ReferenceRound = Callable[
    [Tensor, Tensor, Tensor, Tensor, Tensor, int, Constants], tuple[Tensor, Tensor, Tensor]
]


def mix_stacked(W: Tensor, Z: Tensor) -> Tensor:
    """``(W ⊗ I) Z``: row i is ``Σ_j w_ij Z_j`` for a stack ``Z`` of shape (N, m, n)."""
    return torch.einsum("ij,jmn->imn", W, Z)


def check_stacked(W: Tensor, *stacked: Tensor) -> None:
    N = W.shape[0]
    if W.shape != (N, N) or any(t.ndim != 3 or t.shape[0] != N for t in stacked):
        raise ValueError(f"need W (N, N) and (N, m, n) stacks, got {[tuple(t.shape) for t in (W, *stacked)]}")
    if any(t.dtype != torch.float64 for t in (W, *stacked)):
        raise ValueError("the reference works in float64 only")


def _tracked(W: Tensor, M: Tensor, V: Tensor, M_new: Tensor) -> Tensor:
    return mix_stacked(W, V + M_new - M)


def demuon(
    W: Tensor, X: Tensor, M: Tensor, V: Tensor, G: Tensor, k: int, c: Constants
) -> tuple[Tensor, Tensor, Tensor]:
    M_new = (1.0 - c.theta) * M + c.theta * G
    V_new = _tracked(W, M, V, M_new)
    return mix_stacked(W, X - c.lr * polar_svd(V_new)), M_new, V_new


def gt_nsgdm(
    W: Tensor, X: Tensor, M: Tensor, V: Tensor, G: Tensor, k: int, c: Constants
) -> tuple[Tensor, Tensor, Tensor]:
    M_new = (1.0 - c.theta) * M + c.theta * G
    V_new = _tracked(W, M, V, M_new)
    D = safe_divide(V_new, torch.linalg.matrix_norm(V_new, keepdim=True))
    return mix_stacked(W, X - c.lr * D), M_new, V_new


def gt_dsgd(
    W: Tensor, X: Tensor, M: Tensor, V: Tensor, G: Tensor, k: int, c: Constants
) -> tuple[Tensor, Tensor, Tensor]:
    V_new = _tracked(W, M, V, G)
    return mix_stacked(W, X - c.lr * V_new), G.clone(), V_new


def dsgd(
    W: Tensor, X: Tensor, M: Tensor, V: Tensor, G: Tensor, k: int, c: Constants
) -> tuple[Tensor, Tensor, Tensor]:
    return mix_stacked(W, X - c.lr * G), M, V


def dsgd_clip(
    W: Tensor, X: Tensor, M: Tensor, V: Tensor, G: Tensor, k: int, c: Constants
) -> tuple[Tensor, Tensor, Tensor]:
    norms = torch.linalg.matrix_norm(G, keepdim=True)
    clipped = G * torch.clamp(clip_threshold(k, c.clip_scale, c.clip_power) / norms, max=1.0)
    return dsgd(W, X, M, V, clipped, k, c)
