"""The update rules of DeMuon and its baselines as small pure functions (layer 2, pure torch).

One iteration ``k`` at peer ``i`` (docs/algorithms.md §2.1), per parameter tensor::

    G_i   = ∇f_i(X_i; ξ_i^k)
    M_i'  = (1 − θ) M_i + θ G_i                      momentum_update
    U_i   = V_i + M_i' − M_i                         tracker_message      → phase "V"
    V_i   = Σ_j w_ij U_j                             mix (or choco_mix)
    Y_i   = X_i − η_k · ORTH(V_i)                    demuon_step           → phase "X"
    X_i   = Σ_j w_ij Y_j                             mix (or choco_mix)

Baselines (docs/algorithms.md §3): DSGD ``Y = X − ηG`` (phase "X" only); DSGD-Clip the same after
clipping the whole-model gradient to ``τ_k = 0.1·k^0.4``; GT-DSGD ``U = V + G − G_prev``, ``Y = X − ηV``;
GT-NSGDm DeMuon's M/V recursions with ``Y = X − η V/‖V‖`` (norm over all parameters jointly).

The optional guard (docs/algorithms.md §8.1) replaces a neighbour's ``Z_j`` by
``Z_i + clip(Z_j − Z_i, τ)`` (:func:`clip_to`), with ``τ = c · max ‖own update‖`` over the last
rounds (:func:`guard_threshold`).

Which functions make up each algorithm is :mod:`demuon.node.algorithms`' registry; the stacked
float64 oracle that tests hold the per-peer composition equal to is :mod:`demuon.node.reference`.
Muon's options (docs/algorithms.md §2.6, torch.optim.Muon), all off by default::

    Ṽ_i   = θ G_i + (1 − θ) V_i                      nesterov_lookahead   (nesterov)
    Y_i   = (1 − η_k λ) X_i − η_k s(A×B) ORTH(Ṽ_i)   decoupled_decay, shape_factor
    M_i'  = G_i + (1 − θ)(M_i − G̃_i),  G̃_i = ∇f_i(X_i^{k−1}; ξ_i^k)          mvr_update

No function modifies its inputs.
Orthogonalisation and routing live in :mod:`demuon.node.newton_schulz` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from demuon.config import (
    CLIP_POWER,
    CLIP_SCALE,
    AdjustLR,
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
#: The routes whose direction is an (approximate) orthogonal factor: the ones the shape factor
#: ``s`` of ``adjust_lr`` applies to (docs/algorithms.md §2.6).
ORTHOGONAL_ROUTES: tuple[str, ...] = ("newton_schulz", "polar_svd")
Schedule = ConstantSchedule | InvSqrtSchedule | LinearSchedule | CosineSchedule

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
    """``M' = (1 − θ) M + θ G``: EMA, weight θ on the new gradient (docs/algorithms.md §2.1)."""
    # M: previous momentum M^{k−1}; G: gradient G^k; theta: θ ∈ (0, 1]. None modified.
    return (1.0 - theta) * M + theta * G


def mvr_update(M: Tensor, G: Tensor, G_tilde: Tensor, theta: float) -> Tensor:
    """``M' = G + (1 − θ)(M − G̃)``: momentum-based variance reduction (STORM, docs/algorithms.md §2.6).

    ``G̃ = ∇f(X^{k−1}; ξ^k)`` is the gradient at the previous iterate on this round's batch, so
    ``G − G̃`` corrects the old momentum for the move. θ = 1 gives ``M' = G``; with ``G̃ = G`` it
    is :func:`momentum_update`'s EMA.
    """
    # M: M^{k−1}; G: G^k = ∇f(X^k; ξ^k); G_tilde: G̃^k; theta: θ ∈ (0, 1]. None modified.
    return G + (1.0 - theta) * (M - G_tilde)


def nesterov_lookahead(V: Tensor, G: Tensor, theta: float) -> Tensor:
    """``Ṽ = θ G + (1 − θ) V``: Nesterov's look-ahead, the direction that is orthogonalised with
    ``nesterov`` (torch.optim.Muon's ``grad.lerp(buf, μ)`` with μ = 1 − θ; docs/algorithms.md §2.6)."""
    # V: mixed tracker V^k (the momentum M^k when N = 1); G: own gradient G^k; theta: θ. None modified.
    return theta * G + (1.0 - theta) * V


def decoupled_decay(X: Tensor, lr: float, weight_decay: float) -> Tensor:
    """``(1 − η λ) X``: decoupled weight decay (Loshchilov & Hutter; torch.optim.Muon's
    ``param.mul_(1 − lr·weight_decay)``), by the unscaled η; λ = 0 returns ``X`` itself."""
    # X: iterate, not modified; lr: η_k; weight_decay: λ ≥ 0.
    if weight_decay == 0.0:
        return X
    return X * (1.0 - lr * weight_decay)


def shape_factor(shape: Sequence[int], rule: AdjustLR) -> float:
    """``s``: the step-size factor of an orthogonalised ``A×B`` matrix (torch.optim.Muon's
    ``adjust_lr_fn``; docs/algorithms.md §2.6): ``none`` 1, ``original`` ``√max(1, A/B)`` (Keller
    Jordan), ``match_rms_adamw`` ``0.2 √max(A, B)`` (Moonshot). ``A×B`` is the 2-D view the matrix
    routes see: size-1 dimensions dropped, ``A`` the first, ``B`` the product of the others."""
    # shape: the parameter's shape; rule: the config's adjust_lr.
    if rule == "none":
        return 1.0
    dims = [d for d in shape if d != 1]
    if len(dims) < 2:
        raise ValueError(f"shape_factor needs a matrix, got shape {tuple(shape)}")
    A, B = dims[0], math.prod(dims[1:])
    if rule == "original":
        return math.sqrt(max(1.0, A / B))
    if rule == "scion":
        return math.sqrt(A / B)
    return 0.2 * math.sqrt(max(A, B))


def step_factor(shape: Sequence[int], route: str, rule: AdjustLR) -> float:
    """``s_p`` of one parameter: :func:`shape_factor` on the orthogonalised routes; with ``scion``
    also ``1/B`` (``1/d_in``) on a sign-routed matrix, Scion's Sign LMO for the output head
    (docs/algorithms.md §2.6); 1 on every other route."""
    # shape: the parameter's shape; route: from route_for; rule: the config's adjust_lr.
    if route in ORTHOGONAL_ROUTES:
        return shape_factor(shape, rule)
    dims = [d for d in shape if d != 1]
    if rule == "scion" and route == "sign" and len(dims) >= 2:
        return 1.0 / math.prod(dims[1:])
    return 1.0


def tracker_message(V: Tensor, M_new: Tensor, M_old: Tensor) -> Tensor:
    """``U = V + M_new − M_old`` = the tracker message of phase "V" (docs/algorithms.md §2.1)."""
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
    """``Z + γ (S − Ẑ)``: the CHOCO consensus step of C-DeMuon Option A (docs/algorithms.md §6).

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
    weight_decay: float = 0.0,
    scale: float = 1.0,
) -> Tensor:
    """``Y = X − η · ORTH(V)`` (docs/algorithms.md §2.1, before mixing); with Muon's options
    ``Y = (1 − η λ) X − η s · ORTH(V)`` (docs/algorithms.md §2.6, torch.optim.Muon's order: decay,
    then step)."""
    # X: iterate X^k; V: mixed tracker V^k (or its look-ahead Ṽ); lr: η_k; route: from route_for;
    # weight_decay: λ; scale: s from shape_factor. None modified.
    direction = demuon_direction(V, route, ns_steps=ns_steps, ns_dtype=ns_dtype)
    return decoupled_decay(X, lr, weight_decay) - (lr * scale) * direction


def dsgd_step(X: Tensor, D: Tensor, lr: float, weight_decay: float = 0.0) -> Tensor:
    """``Y = X − η D``: DSGD with ``D = G``, GT-DSGD with ``D = V`` (docs/algorithms.md §3);
    ``Y = (1 − η λ) X − η D`` with decoupled weight decay λ (docs/algorithms.md §2.6)."""
    # X: iterate; D: gradient or tracker; lr: η_k; weight_decay: λ. None modified.
    return decoupled_decay(X, lr, weight_decay) - lr * D


# ----------------------------------------------------------------------- whole-model helpers


def global_norm(T: Mapping[str, Tensor]) -> Tensor:
    """``‖T‖ = √(Σ_p ‖T_p‖²)`` over every tensor of the model, as a float64 scalar tensor."""
    # T: tensor dict, not modified.
    squares = [torch.linalg.vector_norm(t).to(torch.float64) ** 2 for t in T.values()]
    if not squares:
        return torch.zeros((), dtype=torch.float64)
    return torch.sqrt(torch.stack(squares).sum())


def clip_threshold(k: int, scale: float = CLIP_SCALE, power: float = CLIP_POWER) -> float:
    """``τ_k = scale · k^power`` (docs/algorithms.md §3.2). Round 0 uses k = 1
    (``τ_0 = τ_1 = scale``), so the first gradient is clipped to ``scale`` rather than to zero."""
    # k: round ≥ 0; scale, power: the schedule's constants.
    if k < 0:
        raise ValueError(f"clip_threshold needs k >= 0, got {k}")
    return scale * math.pow(float(max(k, 1)), power)


def clip_by_global_norm(G: Mapping[str, Tensor], tau: float) -> TensorDict:
    """``G · min(1, τ/‖G‖)`` with ``‖G‖`` the Euclidean norm over the whole model; zero stays zero."""
    # G: whole-model gradient, not modified; tau: threshold τ_k > 0.
    factor = torch.clamp(tau / global_norm(G), max=1.0)  # ‖G‖ = 0 → τ/0 = inf → 1
    return {n: g * factor.to(device=g.device, dtype=g.dtype) for n, g in G.items()}


def gt_nsgdm_direction(V: Mapping[str, Tensor]) -> TensorDict:
    """``V/‖V‖`` with the Euclidean norm over all parameters jointly (docs/algorithms.md §3.4)."""
    # V: whole-model mixed tracker, not modified.
    norm = global_norm(V)
    return {n: safe_divide(v, norm.to(device=v.device, dtype=v.dtype)) for n, v in V.items()}


# ------------------------------------------------------- self-centred clipping (the guard)


def clip_factor(v: Mapping[str, Tensor], tau: float) -> float:
    """``min(1, τ/‖v‖)`` with ``‖v‖`` the Euclidean norm over the whole model, taken in float64
    (docs/algorithms.md §8.1); 1 for ``v = 0``, 0 when ``‖v‖`` is not finite."""
    # v: whole-model difference Z_j − Z_i, not modified; tau: threshold τ ≥ 0.
    squares = [torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in v.values()]
    norm = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    if not math.isfinite(norm):
        return 0.0
    return 1.0 if norm <= tau else tau / norm


def clip_to(z_self: Mapping[str, Tensor], z_j: Mapping[str, Tensor], tau: float) -> TensorDict:
    """``Z_i + clip(Z_j − Z_i, τ)``, ``clip(v, τ) = v · min(1, τ/‖v‖)`` over the whole model: a
    neighbour's value moved to within τ of the own value Z_i (ClippedGossip, docs/algorithms.md §8.1).

    Inside the ball (``‖Z_j − Z_i‖ ≤ τ``) the neighbour's own tensors come back unchanged, so a
    guard that never binds leaves every sum bitwise as it was; a difference that is not finite
    gives ``Z_i`` (the neighbour is ignored)."""
    # z_self: own pre-mix value Z_i; z_j: neighbour's value, same names and dtype; tau: τ ≥ 0. None modified.
    diff = {n: z_j[n] - z for n, z in z_self.items()}
    factor = clip_factor(diff, tau)
    if factor >= 1.0:
        return dict(z_j)
    if factor == 0.0:  # τ = 0, or a difference that is not finite (0 · inf would be NaN)
        return dict(z_self)
    return {n: z + factor * diff[n] for n, z in z_self.items()}


def guard_threshold(own_updates: Sequence[float], multiple: float) -> float:
    """``τ = c · max_t ‖own update_t‖`` over the recent rounds given (docs/algorithms.md §8.1)."""
    # own_updates: this peer's own local-update norms of the phase, newest last; multiple: c > 0.
    return multiple * max(own_updates, default=0.0)


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


def mvr_tracker_update(
    M: Mapping[str, Tensor],
    V: Mapping[str, Tensor],
    G: Mapping[str, Tensor],
    G_tilde: Mapping[str, Tensor],
    theta: float,
) -> tuple[TensorDict, TensorDict]:
    """Phase "V" message with MVR momentum: ``M' = G + (1−θ)(M − G̃)``, ``U = V + M' − M``."""
    # M: M^{k−1}; V: V^{k−1}; G: G^k; G_tilde: ∇f(X^{k−1}; ξ^k); theta: θ. None modified.
    M_new = {n: mvr_update(M[n], G[n], G_tilde[n], theta) for n in G}
    return M_new, {n: tracker_message(V[n], M_new[n], M[n]) for n in G}


def nesterov_lookahead_dicts(V: Mapping[str, Tensor], G: Mapping[str, Tensor], theta: float) -> TensorDict:
    """:func:`nesterov_lookahead` tensor by tensor: ``Ṽ = θ G + (1 − θ) V`` for the whole model."""
    # V: mixed tracker; G: own gradient; theta: θ. None modified.
    return {n: nesterov_lookahead(v, G[n], theta) for n, v in V.items()}


def gt_dsgd_tracker_update(
    M: Mapping[str, Tensor], V: Mapping[str, Tensor], G: Mapping[str, Tensor]
) -> tuple[TensorDict, TensorDict]:
    """GT-DSGD phase "V" message: M carries the previous gradient, ``U = V + G − M``, ``M' = G``."""
    # M: previous gradient G^{k−1} (0 at k = 0); V: tracker; G: gradient G^k. None modified.
    return {n: g.clone() for n, g in G.items()}, {n: tracker_message(V[n], G[n], M[n]) for n in G}


def demuon_local_step(
    X: Mapping[str, Tensor],
    V: Mapping[str, Tensor],
    lr: float,
    routes: Mapping[str, str] | None = None,
    *,
    ns_steps: int = NS_STEPS,
    ns_dtype: torch.dtype = torch.float32,
    weight_decay: float = 0.0,
    adjust_lr: AdjustLR = "none",
) -> TensorDict:
    """DeMuon phase "X" message ``Y = X − η ORTH(V)``. Phases: "V" then "X".

    ``routes`` maps names to routes (:func:`route_for`); a missing name gets the default routing.
    With Muon's options (docs/algorithms.md §2.6): ``Y = (1 − η λ) X − η s ORTH(V)``,
    ``s = step_factor``: ``shape_factor`` on the orthogonalised routes (``newton_schulz``,
    ``polar_svd``), with ``scion`` ``1/d_in`` on sign-routed matrices, and 1 on every other.
    """
    # X: iterate; V: mixed tracker (or Ṽ); lr: η_k; routes: name → route; weight_decay: λ;
    # adjust_lr: the shape-factor rule. None modified.
    chosen = dict(routes or {})
    for n, x in X.items():
        chosen.setdefault(n, route_for(n, tuple(x.shape), RoutingConfig()))
    return {
        n: demuon_step(
            x,
            V[n],
            lr,
            chosen[n],
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            weight_decay=weight_decay,
            scale=step_factor(tuple(x.shape), chosen[n], adjust_lr),
        )
        for n, x in X.items()
    }


def dsgd_local_step(
    X: Mapping[str, Tensor], G: Mapping[str, Tensor], lr: float, weight_decay: float = 0.0
) -> TensorDict:
    """DSGD phase "X" message ``Y = X − η G`` (``(1 − η λ) X − η G`` with decay). Phases: "X" only."""
    # X: iterate; G: local gradient; lr: η_k; weight_decay: λ. None modified.
    return {n: dsgd_step(x, G[n], lr, weight_decay) for n, x in X.items()}


def dsgd_clip_local_step(
    X: Mapping[str, Tensor],
    G: Mapping[str, Tensor],
    lr: float,
    k: int,
    clip_scale: float = CLIP_SCALE,
    clip_power: float = CLIP_POWER,
    weight_decay: float = 0.0,
) -> TensorDict:
    """DSGD-Clip phase "X" message ``Y = X − η clip(G, τ_k)``, whole-model clip. Phases: "X" only."""
    # X: iterate; G: local gradient; lr: η_k; k: round; clip_scale/clip_power: τ_k; weight_decay: λ.
    # None modified.
    clipped = clip_by_global_norm(G, clip_threshold(k, clip_scale, clip_power))
    return dsgd_local_step(X, clipped, lr, weight_decay)


def gt_dsgd_local_step(
    X: Mapping[str, Tensor], V: Mapping[str, Tensor], lr: float, weight_decay: float = 0.0
) -> TensorDict:
    """GT-DSGD phase "X" message ``Y = X − η V``. Phases: "V" then "X"."""
    # X: iterate; V: mixed tracker; lr: η_k; weight_decay: λ. None modified.
    return dsgd_local_step(X, V, lr, weight_decay)


def gt_nsgdm_local_step(
    X: Mapping[str, Tensor], V: Mapping[str, Tensor], lr: float, weight_decay: float = 0.0
) -> TensorDict:
    """GT-NSGDm phase "X" message ``Y = X − η V/‖V‖`` (joint norm). Phases: "V" then "X"."""
    # X: iterate; V: mixed tracker (or Ṽ); lr: η_k; weight_decay: λ. None modified.
    return dsgd_local_step(X, gt_nsgdm_direction(V), lr, weight_decay)
