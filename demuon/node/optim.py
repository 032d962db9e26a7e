"""The update rules of DeMuon and its baselines as small pure functions (layer 2, pure torch).

One iteration ``k`` at peer ``i`` (ALGORITHMS.md §1.2, §1.7), per parameter tensor::

    G_i   = ∇f_i(X_i; ξ_i^k)
    M_i'  = (1 − θ) M_i + θ G_i                      momentum_update
    U_i   = V_i + M_i' − M_i                         tracker_message      → phase "V"
    V_i   = Σ_j w_ij U_j                             mix (or choco_mix)
    Y_i   = X_i − η_k · ORTH(V_i)                    demuon_step           → phase "X"
    X_i   = Σ_j w_ij Y_j                             mix (or choco_mix)

Baselines (§1.6): DSGD ``Y = X − ηG`` (phase "X" only); DSGD-Clip the same after clipping the
whole-model gradient to ``τ_k = 0.1·k^0.4``; GT-DSGD ``U = V + G − G_prev``, ``Y = X − ηV``;
GT-NSGDm DeMuon's M/V recursions with ``Y = X − η V/‖V‖`` (norm over all parameters jointly).

A peer runs: gradient → (if tracking) :func:`local_tracker_update` → mix → :func:`local_step` →
mix, over :func:`phases`. :func:`reference_round` is the stacked float64 oracle of one iteration
for N peers; tests hold the per-peer composition equal to it. No function modifies its inputs.
Orthogonalisation and routing live in :mod:`demuon.node.newton_schulz` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from demuon.config import (
    ConstantSchedule,
    CosineSchedule,
    InvSqrtSchedule,
    LinearSchedule,
    RoutingConfig,
)
from demuon.node.newton_schulz import NS5_MAX_SINGULAR as NS5_MAX_SINGULAR
from demuon.node.newton_schulz import NS_COEFFS as NS_COEFFS
from demuon.node.newton_schulz import NS_STEPS as NS_STEPS
from demuon.node.newton_schulz import ROUTES as ROUTES
from demuon.node.newton_schulz import newton_schulz as newton_schulz
from demuon.node.newton_schulz import orthogonalize as orthogonalize
from demuon.node.newton_schulz import polar_svd as polar_svd
from demuon.node.newton_schulz import route_for as route_for
from demuon.node.newton_schulz import safe_divide as safe_divide

TensorDict = dict[str, Tensor]
Schedule = ConstantSchedule | InvSqrtSchedule | LinearSchedule | CosineSchedule

ALGORITHMS: tuple[str, ...] = ("demuon", "dsgd", "dsgd_clip", "gt_dsgd", "gt_nsgdm")
# Methods with a gradient tracker: two gossip phases per round ("V" then "X"); the others only "X".
TRACKING_ALGORITHMS: tuple[str, ...] = ("demuon", "gt_dsgd", "gt_nsgdm")
# ALGORITHMS.md §1.6, DeMuon code's dsgd_gclip_decay: τ_k = 0.1 · k^0.4.
CLIP_SCALE = 0.1
CLIP_POWER = 0.4


def phases(algorithm: str) -> tuple[str, ...]:
    """The gossip phases of one round: ``("V", "X")`` with tracking, ``("X",)`` for DSGD(-Clip)."""
    # algorithm: one of ALGORITHMS.
    _check_algorithm(algorithm)
    return ("V", "X") if algorithm in TRACKING_ALGORITHMS else ("X",)


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")


# --------------------------------------------------------------------------------- schedules


def learning_rate(schedule: Schedule, lr: float, k: int, total: int) -> float:
    """η_k for round ``k`` of ``total`` (``K``).

    constant: η;  inv_sqrt: η/√(k+1);  linear: η(1 − k/K), 0 from k = K on;  cosine: linear warm-up
    ``η(k+1)/warmup`` for k < warmup, then ``η(f + (1−f)(1 + cos πt)/2)`` with
    ``t = (k − warmup)/(K − warmup)`` clamped to [0, 1] and ``f = final_fraction``.
    """
    # schedule: config schedule (not modified); lr: peak η; k: round ≥ 0; total: K ≥ 1 rounds.
    if k < 0 or total < 1:
        raise ValueError(f"need k >= 0 and total >= 1, got k={k}, total={total}")
    if isinstance(schedule, ConstantSchedule):
        return lr
    if isinstance(schedule, InvSqrtSchedule):
        return lr / math.sqrt(k + 1)
    if isinstance(schedule, LinearSchedule):
        return lr * max(0.0, 1.0 - k / total)
    if k < schedule.warmup:
        return lr * (k + 1) / schedule.warmup
    t = min(1.0, (k - schedule.warmup) / max(1, total - schedule.warmup))
    f = schedule.final_fraction
    return lr * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------ per-tensor equations


def momentum_update(M: Tensor, G: Tensor, theta: float) -> Tensor:
    """``M' = (1 − θ) M + θ G`` — EMA with weight θ on the new gradient (§1.2 eq. 1)."""
    # M: previous momentum M^{k−1}; G: gradient G^k; theta: θ ∈ (0, 1]. None modified.
    return (1.0 - theta) * M + theta * G


def tracker_message(V: Tensor, M_new: Tensor, M_old: Tensor) -> Tensor:
    """``U = V + M_new − M_old`` — the pre-mix tracker value a peer sends in phase "V" (§1.2 eq. 2)."""
    # V: tracker V^{k−1}; M_new: M^k; M_old: M^{k−1}. None modified.
    return V + M_new - M_old


def mix(terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """``Σ w·Z`` accumulated in the given order, starting from the first term.

    Callers put their own term first, then the neighbours' sorted by peer id: the floating-point
    sum is then the same on every run and in the simulator and the daemon (bitwise reproducible).
    """
    # terms: (w_ij, Z_j) pairs, self first then neighbours by id; tensors not modified.
    if not terms:
        raise ValueError("mix needs at least one (weight, tensor) term")
    w0, Z0 = terms[0]
    out = Z0 * w0
    for w, Z in terms[1:]:
        out.add_(Z, alpha=w)
    return out


def choco_mix(Z: Tensor, S: Tensor, Zhat: Tensor, gamma: float) -> Tensor:
    """``Z + γ (S − Ẑ)``: the CHOCO consensus step of C-DeMuon Option A (§3.3).

    ``S = Σ_j w_ij Ẑ_j`` (including j = i) over the public replicas. With the identity codec and
    γ = 1, ``Ẑ_j = Z_j`` and this equals :func:`mix` up to rounding.
    """
    # Z: own pre-mix value (U or Y); S: weighted replica sum; Zhat: own replica Ẑ_i; gamma: γ ∈ (0, 1].
    # None modified.
    return Z + gamma * (S - Zhat)


def demuon_direction(
    V: Tensor, route: str, *, ns_steps: int = NS_STEPS, ns_dtype: torch.dtype = torch.float32
) -> Tensor:
    """``ORTH(V)`` for one tensor: :func:`orthogonalize` along its route (NS5 for matrices)."""
    # V: mixed tracker V^k, not modified; route: from route_for; ns_steps / ns_dtype: NS5 settings.
    return orthogonalize(V, route, ns_steps=ns_steps, ns_dtype=ns_dtype)


def demuon_step(
    X: Tensor,
    V: Tensor,
    lr: float,
    route: str,
    *,
    ns_steps: int = NS_STEPS,
    ns_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``Y = X − η · ORTH(V)`` (§1.2 eq. 3, before mixing)."""
    # X: iterate X^k; V: mixed tracker V^k; lr: η_k; route: from route_for. None modified.
    return X - lr * demuon_direction(V, route, ns_steps=ns_steps, ns_dtype=ns_dtype)


def dsgd_step(X: Tensor, D: Tensor, lr: float) -> Tensor:
    """``Y = X − η D``: DSGD with ``D = G``, GT-DSGD with ``D = V`` (§1.6)."""
    # X: iterate; D: gradient or tracker; lr: η_k. None modified.
    return X - lr * D


# ----------------------------------------------------------------------- whole-model helpers


def global_norm(T: Mapping[str, Tensor]) -> Tensor:
    """``‖T‖ = √(Σ_p ‖T_p‖²)`` over every tensor of the model, as a float64 scalar tensor."""
    # T: tensor dict, not modified.
    squares = [torch.linalg.vector_norm(t).to(torch.float64) ** 2 for t in T.values()]
    if not squares:
        return torch.zeros((), dtype=torch.float64)
    return torch.sqrt(torch.stack(squares).sum())


def clip_threshold(k: int, scale: float = CLIP_SCALE, power: float = CLIP_POWER) -> float:
    """``τ_k = scale · k^power`` (§1.6). Round 0 uses k = 1 (``τ_0 = τ_1 = scale``), so the first
    gradient is clipped to ``scale`` rather than to zero."""
    # k: round ≥ 0; scale, power: the schedule's constants.
    if k < 0:
        raise ValueError(f"clip_threshold needs k >= 0, got {k}")
    return scale * float(max(k, 1)) ** power


def clip_by_global_norm(G: Mapping[str, Tensor], tau: float) -> TensorDict:
    """``G · min(1, τ/‖G‖)`` with ``‖G‖`` the Euclidean norm over the whole model; zero stays zero."""
    # G: whole-model gradient, not modified; tau: threshold τ_k > 0.
    factor = torch.clamp(tau / global_norm(G), max=1.0)  # ‖G‖ = 0 → τ/0 = inf → 1
    return {n: g * factor.to(device=g.device, dtype=g.dtype) for n, g in G.items()}


def gt_nsgdm_direction(V: Mapping[str, Tensor]) -> TensorDict:
    """``V/‖V‖`` with the Euclidean norm over all parameters jointly (GT-NSGDm, §1.6); zero-safe."""
    # V: whole-model mixed tracker, not modified.
    norm = global_norm(V)
    return {n: safe_divide(v, norm.to(device=v.device, dtype=v.dtype)) for n, v in V.items()}


def mix_dicts(terms: Sequence[tuple[float, Mapping[str, Tensor]]]) -> TensorDict:
    """:func:`mix` applied tensor by tensor to whole-model dicts (same order rule)."""
    # terms: (w_ij, dict_j) pairs, self first then neighbours by id; not modified.
    if not terms:
        raise ValueError("mix_dicts needs at least one (weight, dict) term")
    return {n: mix([(w, d[n]) for w, d in terms]) for n in terms[0][1]}


# ------------------------------------------------------------------- per-algorithm, per peer


def demuon_tracker_update(
    M: Mapping[str, Tensor], V: Mapping[str, Tensor], G: Mapping[str, Tensor], theta: float
) -> tuple[TensorDict, TensorDict]:
    """DeMuon and GT-NSGDm phase "V" message: ``M' = (1−θ)M + θG``, ``U = V + M' − M``."""
    # M: momentum M^{k−1}; V: tracker V^{k−1}; G: gradient G^k; theta: θ. None modified.
    M_new = {n: momentum_update(M[n], G[n], theta) for n in G}
    return M_new, {n: tracker_message(V[n], M_new[n], M[n]) for n in G}


def gt_dsgd_tracker_update(
    M: Mapping[str, Tensor], V: Mapping[str, Tensor], G: Mapping[str, Tensor]
) -> tuple[TensorDict, TensorDict]:
    """GT-DSGD phase "V" message: M carries the previous gradient, ``U = V + G − M``, ``M' = G``."""
    # M: previous gradient G^{k−1} (0 at k = 0); V: tracker; G: gradient G^k. None modified.
    return {n: g.clone() for n, g in G.items()}, {n: tracker_message(V[n], G[n], M[n]) for n in G}


def local_tracker_update(
    algorithm: str,
    M: Mapping[str, Tensor],
    V: Mapping[str, Tensor],
    G: Mapping[str, Tensor],
    theta: float,
) -> tuple[TensorDict, TensorDict]:
    """``(M_new, U)``: the new local state M and the phase "V" message U of a tracking method.

    demuon, gt_nsgdm: :func:`demuon_tracker_update`; gt_dsgd: :func:`gt_dsgd_tracker_update`
    (θ unused). dsgd and dsgd_clip have no "V" phase and raise ValueError.
    """
    # algorithm: one of TRACKING_ALGORITHMS; M, V, G: tensor dicts, not modified; theta: θ.
    _check_algorithm(algorithm)
    if algorithm == "gt_dsgd":
        return gt_dsgd_tracker_update(M, V, G)
    if algorithm in ("demuon", "gt_nsgdm"):
        return demuon_tracker_update(M, V, G, theta)
    raise ValueError(f"{algorithm} has no tracker (phases {phases(algorithm)})")


def demuon_local_step(
    X: Mapping[str, Tensor],
    V: Mapping[str, Tensor],
    lr: float,
    routes: Mapping[str, str] | None = None,
    *,
    ns_steps: int = NS_STEPS,
    ns_dtype: torch.dtype = torch.float32,
) -> TensorDict:
    """DeMuon phase "X" message ``Y = X − η ORTH(V)``. Phases: "V" then "X".

    ``routes`` maps names to routes (:func:`route_for`); a missing name gets the default routing.
    """
    # X: iterate; V: mixed tracker; lr: η_k; routes: name → route. None modified.
    chosen = dict(routes or {})
    for n, x in X.items():
        chosen.setdefault(n, route_for(n, tuple(x.shape), RoutingConfig()))
    return {
        n: demuon_step(x, V[n], lr, chosen[n], ns_steps=ns_steps, ns_dtype=ns_dtype) for n, x in X.items()
    }


def dsgd_local_step(X: Mapping[str, Tensor], G: Mapping[str, Tensor], lr: float) -> TensorDict:
    """DSGD phase "X" message ``Y = X − η G``. Phases: "X" only."""
    # X: iterate; G: local gradient; lr: η_k. None modified.
    return {n: dsgd_step(x, G[n], lr) for n, x in X.items()}


def dsgd_clip_local_step(
    X: Mapping[str, Tensor],
    G: Mapping[str, Tensor],
    lr: float,
    k: int,
    clip_scale: float = CLIP_SCALE,
    clip_power: float = CLIP_POWER,
) -> TensorDict:
    """DSGD-Clip phase "X" message ``Y = X − η clip(G, τ_k)``, whole-model clip. Phases: "X" only."""
    # X: iterate; G: local gradient; lr: η_k; k: round; clip_scale/clip_power: τ_k. None modified.
    return dsgd_local_step(X, clip_by_global_norm(G, clip_threshold(k, clip_scale, clip_power)), lr)


def gt_dsgd_local_step(X: Mapping[str, Tensor], V: Mapping[str, Tensor], lr: float) -> TensorDict:
    """GT-DSGD phase "X" message ``Y = X − η V``. Phases: "V" then "X"."""
    # X: iterate; V: mixed tracker; lr: η_k. None modified.
    return dsgd_local_step(X, V, lr)


def gt_nsgdm_local_step(X: Mapping[str, Tensor], V: Mapping[str, Tensor], lr: float) -> TensorDict:
    """GT-NSGDm phase "X" message ``Y = X − η V/‖V‖`` (joint norm). Phases: "V" then "X"."""
    # X: iterate; V: mixed tracker; lr: η_k. None modified.
    return dsgd_local_step(X, gt_nsgdm_direction(V), lr)


def local_step(
    algorithm: str,
    X: Mapping[str, Tensor],
    V: Mapping[str, Tensor] | None,
    G: Mapping[str, Tensor] | None,
    lr: float,
    k: int,
    *,
    routes: Mapping[str, str] | None = None,
    ns_steps: int = NS_STEPS,
    ns_dtype: torch.dtype = torch.float32,
    clip_scale: float = CLIP_SCALE,
    clip_power: float = CLIP_POWER,
) -> TensorDict:
    """``Y``: the phase "X" message of ``algorithm`` (mix it next: ``X = Σ_j w_ij Y_j``).

    Tracking methods use the mixed tracker ``V`` (``G`` may be None); dsgd/dsgd_clip use ``G``
    (``V`` may be None). ``lr`` is η_k (schedule already applied); ``k`` sets the clip threshold.
    """
    # algorithm: one of ALGORITHMS; X, V, G: tensor dicts, not modified; routes, ns_*: DeMuon only;
    # clip_*: dsgd_clip only.
    _check_algorithm(algorithm)
    D = V if algorithm in TRACKING_ALGORITHMS else G
    if D is None:
        raise ValueError(f"{algorithm} needs {'V' if algorithm in TRACKING_ALGORITHMS else 'G'}")
    if algorithm == "demuon":
        return demuon_local_step(X, D, lr, routes, ns_steps=ns_steps, ns_dtype=ns_dtype)
    if algorithm == "gt_nsgdm":
        return gt_nsgdm_local_step(X, D, lr)
    if algorithm == "dsgd_clip":
        return dsgd_clip_local_step(X, D, lr, k, clip_scale, clip_power)
    return dsgd_local_step(X, D, lr)  # dsgd (D = G) and gt_dsgd (D = V)


# ---------------------------------------------------------------------------- stacked oracle


def _mix_stacked(W: Tensor, Z: Tensor) -> Tensor:
    """``(W ⊗ I) Z``: row i is ``Σ_j w_ij Z_j`` for stacked ``Z`` of shape (N, m, n)."""
    return torch.einsum("ij,jmn->imn", W, Z)


def _check_stacked(W: Tensor, *stacked: Tensor) -> None:
    N = W.shape[0]
    if W.shape != (N, N) or any(t.ndim != 3 or t.shape[0] != N for t in stacked):
        raise ValueError(f"need W (N, N) and (N, m, n) stacks, got {[tuple(t.shape) for t in (W, *stacked)]}")
    if any(t.dtype != torch.float64 for t in (W, *stacked)):
        raise ValueError("reference_round works in float64 only")


def reference_round(
    algorithm: str,
    W: Tensor,
    X: Tensor,
    M: Tensor,
    V: Tensor,
    G: Tensor,
    k: int,
    *,
    lr: float,
    theta: float,
    clip_scale: float = CLIP_SCALE,
    clip_power: float = CLIP_POWER,
) -> tuple[Tensor, Tensor, Tensor]:
    """One iteration of ALGORITHMS.md §1.2 for all N peers at once, in float64: ``(X, M, V)``.

    demuon:    M ← (1−θ)M + θG;  V ← W(V + M_new − M_old);  X ← W(X − η polar_svd(V))
    gt_nsgdm:  same M, V;  X ← W(X − η V_i/‖V_i‖_F)   (each peer's single matrix is its whole model)
    gt_dsgd:   V ← W(V + G − M);  M ← G (M carries the previous gradient);  X ← W(X − ηV)
    dsgd:      X ← W(X − ηG);  dsgd_clip: G_i clipped to τ_k = clip_scale·max(k,1)^clip_power first
    (M, V returned unchanged for dsgd/dsgd_clip). ``lr`` is used as given: callers apply the
    schedule; ``k`` only sets the clip threshold.
    """
    # W: N×N mixing matrix; X, M, V, G: (N, m, n) iterates, momenta, trackers, gradients. None modified.
    _check_algorithm(algorithm)
    _check_stacked(W, X, M, V, G)
    if algorithm in ("dsgd", "dsgd_clip"):
        if algorithm == "dsgd_clip":
            norms = torch.linalg.matrix_norm(G, keepdim=True)
            G = G * torch.clamp(clip_threshold(k, clip_scale, clip_power) / norms, max=1.0)
        return _mix_stacked(W, X - lr * G), M, V
    M_new = G.clone() if algorithm == "gt_dsgd" else (1.0 - theta) * M + theta * G
    V_new = _mix_stacked(W, V + M_new - M)
    if algorithm == "demuon":
        D = polar_svd(V_new)
    elif algorithm == "gt_nsgdm":
        D = safe_divide(V_new, torch.linalg.matrix_norm(V_new, keepdim=True))
    else:
        D = V_new
    return _mix_stacked(W, X - lr * D), M_new, V_new
