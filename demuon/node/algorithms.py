"""The one algorithm registry (layer 2, pure torch): name → phases, tracker update, local step,
float64 reference.

:class:`~demuon.node.peer.Peer` and the oracle (:func:`reference_round`) read :data:`REGISTRY`;
config validation uses ``config.AlgorithmName``, which this module checks against the registry
when it is imported (and a test checks the command line's list too). No other module branches on
an algorithm's name. docs/algorithms.md §2 (DeMuon) and §3 (the baselines) state the equations.

One round of any algorithm at peer i (docs/algorithms.md §2.1)::

    G = ∇f_i(X; ξ)
    if the algorithm tracks:  M, U = tracker_update(M, V, G, θ);   V = Σ_j w_ij U_j   (phase "V")
    Y = local_step(X, D, η_k, k, options);                         X = Σ_j w_ij Y_j   (phase "X")

with ``D`` from :func:`step_input`: V for tracking methods, G otherwise, and Nesterov's look-ahead
``θG + (1 − θ)V`` with ``nesterov``. Muon's options (docs/algorithms.md §2.6) enter through
:func:`tracker_step` (``momentum_form = "mvr"``) and :class:`StepOptions` (weight decay, shape factor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor

from demuon.config import CLIP_POWER, CLIP_SCALE, MOMENTUM_ALGORITHMS, AdjustLR, AlgorithmName
from demuon.node import optim, reference
from demuon.node.newton_schulz import NS_STEPS

TensorDict = dict[str, Tensor]
Tensors = Mapping[str, Tensor]


@dataclass(frozen=True)
class StepOptions:
    """The per-peer constants a local step may use (resolved once, by the peer)."""

    routes: Mapping[str, str] | None = None  # parameter name → route (DeMuon only)
    ns_steps: int = NS_STEPS  # Newton–Schulz iterations (DeMuon only)
    ns_dtype: torch.dtype = torch.float32  # Newton–Schulz compute dtype (DeMuon only)
    clip_scale: float = CLIP_SCALE  # τ_k = clip_scale · max(k, 1)^clip_power (DSGD-Clip only)
    clip_power: float = CLIP_POWER
    weight_decay: float = 0.0  # λ: Y = (1 − η_k λ) X − η_k · direction (every algorithm)
    adjust_lr: AdjustLR = "none"  # shape factor s of orthogonalised matrices (DeMuon only)


#: ``(M, V, G, θ) → (M_new, U)``: the new local state M and the phase "V" message U.
TrackerUpdate = Callable[[Tensors, Tensors, Tensors, float], tuple[TensorDict, TensorDict]]
#: ``(X, D, η_k, k, options) → Y``: the phase "X" message; D is the mixed tracker V for tracking
#: methods and the local gradient G otherwise.
LocalStep = Callable[[Tensors, Tensors, float, int, StepOptions], TensorDict]


@dataclass(frozen=True)
class Algorithm:
    """One row of the registry."""

    name: str
    tracker_update: TrackerUpdate | None  # None: no tracker, one phase ("X") per round
    local_step: LocalStep
    reference: reference.ReferenceRound  # the stacked float64 oracle of one round
    summary: str
    momentum: bool = False  # M is DeMuon's EMA momentum (nesterov and momentum_form apply)

    @property
    def tracking(self) -> bool:
        return self.tracker_update is not None

    @property
    def phases(self) -> tuple[str, ...]:
        """The gossip phases of one round: ``("V", "X")`` with a tracker, ``("X",)`` without."""
        return ("V", "X") if self.tracking else ("X",)


def _demuon_update(M: Tensors, V: Tensors, G: Tensors, theta: float) -> tuple[TensorDict, TensorDict]:
    return optim.demuon_tracker_update(M, V, G, theta)


def _gt_dsgd_update(M: Tensors, V: Tensors, G: Tensors, theta: float) -> tuple[TensorDict, TensorDict]:
    return optim.gt_dsgd_tracker_update(M, V, G)  # θ unused: M carries the previous gradient


def _demuon_step(X: Tensors, V: Tensors, lr: float, k: int, o: StepOptions) -> TensorDict:
    return optim.demuon_local_step(
        X,
        V,
        lr,
        o.routes,
        ns_steps=o.ns_steps,
        ns_dtype=o.ns_dtype,
        weight_decay=o.weight_decay,
        adjust_lr=o.adjust_lr,
    )


def _gt_nsgdm_step(X: Tensors, V: Tensors, lr: float, k: int, o: StepOptions) -> TensorDict:
    return optim.gt_nsgdm_local_step(X, V, lr, o.weight_decay)


def _plain_step(X: Tensors, D: Tensors, lr: float, k: int, o: StepOptions) -> TensorDict:
    return optim.dsgd_local_step(X, D, lr, o.weight_decay)  # DSGD (D = G) and GT-DSGD (D = V)


def _dsgd_clip_step(X: Tensors, G: Tensors, lr: float, k: int, o: StepOptions) -> TensorDict:
    return optim.dsgd_clip_local_step(X, G, lr, k, o.clip_scale, o.clip_power, o.weight_decay)


REGISTRY: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            "demuon",
            _demuon_update,
            _demuon_step,
            reference.demuon,
            "DeMuon: EMA momentum, gradient tracking, Y = X − η·NS5(V)",
            momentum=True,
        ),
        Algorithm(
            "dsgd",
            None,
            _plain_step,
            reference.dsgd,
            "DSGD: Y = X − η·G",
        ),
        Algorithm(
            "dsgd_clip",
            None,
            _dsgd_clip_step,
            reference.dsgd_clip,
            "DSGD-Clip: G clipped to τ_k = 0.1·k^0.4 (whole model), then DSGD",
        ),
        Algorithm(
            "gt_dsgd",
            _gt_dsgd_update,
            _plain_step,
            reference.gt_dsgd,
            "GT-DSGD: tracker of the gradients, Y = X − η·V",
        ),
        Algorithm(
            "gt_nsgdm",
            _demuon_update,
            _gt_nsgdm_step,
            reference.gt_nsgdm,
            "GT-NSGDm: DeMuon's M and V, Y = X − η·V/‖V‖ (joint norm)",
            momentum=True,
        ),
    )
}

#: Every algorithm name, in the registry's order (the config's ``AlgorithmName`` lists the same).
NAMES: tuple[str, ...] = tuple(REGISTRY)

if set(NAMES) != set(get_args(AlgorithmName)):  # the config schema and the registry must agree
    raise ImportError(f"config.AlgorithmName {get_args(AlgorithmName)} != registry {NAMES}")
if {a.name for a in REGISTRY.values() if a.momentum} != set(MOMENTUM_ALGORITHMS):
    raise ImportError(f"config.MOMENTUM_ALGORITHMS {MOMENTUM_ALGORITHMS} != the registry's momentum methods")


def get(name: str) -> Algorithm:
    """The registry row of ``name``; ValueError naming the choices for an unknown one."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {NAMES}") from None


def phases(name: str) -> tuple[str, ...]:
    return get(name).phases


def local_tracker_update(
    name: str, M: Tensors, V: Tensors, G: Tensors, theta: float
) -> tuple[TensorDict, TensorDict]:
    """``(M_new, U)`` of a tracking method; ValueError for one without a tracker."""
    # M, V, G: tensor dicts, not modified; theta: θ.
    update = get(name).tracker_update
    if update is None:
        raise ValueError(f"{name} has no tracker (phases {phases(name)})")
    return update(M, V, G, theta)


def tracker_step(
    algorithm: Algorithm,
    M: Tensors,
    V: Tensors,
    G: Tensors,
    theta: float,
    *,
    G_tilde: Tensors | None = None,
) -> tuple[TensorDict, TensorDict]:
    """``(M_new, U)`` of phase "V": the row's own update, or with ``G_tilde = ∇f(X^{k−1}; ξ^k)``
    MVR momentum ``M' = G + (1−θ)(M − G̃)`` (``momentum_form = "mvr"``, momentum methods only)."""
    # M, V, G, G_tilde: tensor dicts, not modified; theta: θ.
    update = algorithm.tracker_update
    if update is None:
        raise ValueError(f"{algorithm.name} has no tracker (phases {algorithm.phases})")
    if G_tilde is None:
        return update(M, V, G, theta)
    if not algorithm.momentum:
        raise ValueError(f"{algorithm.name} has no momentum for momentum_form = 'mvr'")
    return optim.mvr_tracker_update(M, V, G, G_tilde, theta)


def step_input(
    algorithm: Algorithm, V: Tensors, G: Tensors, theta: float, *, nesterov: bool = False
) -> Tensors:
    """``D``, what the local step moves along: the mixed tracker V for tracking methods, the
    gradient G otherwise; with ``nesterov`` (momentum methods) the look-ahead ``θG + (1 − θ)V``
    (docs/algorithms.md §2.6). Without it, V or G itself is returned (not a copy)."""
    # V: mixed tracker; G: own gradient; theta: θ. None modified.
    if not nesterov:
        return V if algorithm.tracking else G
    if not algorithm.momentum:
        raise ValueError(f"{algorithm.name} has no momentum for nesterov")
    return optim.nesterov_lookahead_dicts(V, G, theta)


def local_step(
    name: str,
    X: Tensors,
    V: Tensors | None,
    G: Tensors | None,
    lr: float,
    k: int,
    *,
    routes: Mapping[str, str] | None = None,
    ns_steps: int = NS_STEPS,
    ns_dtype: torch.dtype = torch.float32,
    clip_scale: float = CLIP_SCALE,
    clip_power: float = CLIP_POWER,
    theta: float = 1.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    adjust_lr: AdjustLR = "none",
) -> TensorDict:
    """``Y``: the phase "X" message of ``name``. Tracking methods step along the mixed tracker
    ``V`` (``G`` may be None), the others along ``G`` (``V`` may be None); ``nesterov`` needs both
    (and θ) for the look-ahead ``θG + (1 − θ)V``."""
    # X, V, G: tensor dicts, not modified; lr: η_k; k: round (sets DSGD-Clip's threshold).
    algorithm = get(name)
    if nesterov:
        if V is None or G is None:
            raise ValueError(f"{name} with nesterov needs V and G")
        D: Tensors | None = step_input(algorithm, V, G, theta, nesterov=True)
    else:
        D = V if algorithm.tracking else G
    if D is None:
        raise ValueError(f"{name} needs {'V' if algorithm.tracking else 'G'}")
    options = StepOptions(routes, ns_steps, ns_dtype, clip_scale, clip_power, weight_decay, adjust_lr)
    return algorithm.local_step(X, D, lr, k, options)


def reference_round(
    name: str,
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
    """The float64 oracle of one round of ``name`` for N stacked peers (:mod:`demuon.node.reference`)."""
    # W: N×N mixing matrix; X, M, V, G: (N, m, n) stacks, none modified.
    reference.check_stacked(W, X, M, V, G)
    return get(name).reference(W, X, M, V, G, k, reference.Constants(lr, theta, clip_scale, clip_power))
