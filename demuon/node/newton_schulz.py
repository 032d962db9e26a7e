"""Orthogonalisation of a tracker and the per-parameter routing table (layer 2, pure torch).

``msgn(A) = U Vᵀ`` from the thin SVD ``A = U Σ Vᵀ`` is DeMuon's step direction
(docs/algorithms.md §2.1). The fast path is the quintic Newton–Schulz iteration
(docs/algorithms.md §5.1; KellerJordan/Muon ``muon.py``)::

    NS5(G):  a, b, c = 3.4445, −4.7750, 2.0315
             X = G in the compute dtype;  if rows > cols: X = Xᵀ      (work on the wide side)
             X = X / (‖X‖_F + 1e-7)                                    (per matrix, spectral norm ≤ 1)
             repeat 5×:  A = X Xᵀ;  B = b A + c A²;  X = a X + B X
             if rows > cols: X = Xᵀ

Per singular value the map is ``p(x) = a x + b x³ + c x⁵``; after 5 steps every normalised singular
value above ≈0.005 lands in ``[0.6818, 1.1344]`` and no output exceeds ``NS5_MAX_SINGULAR``
(docs/algorithms.md §9 items 1–3). :func:`polar_svd` is the exact float64 reference.

Routing (docs/algorithms.md §2.4, §5.3): which direction each parameter tensor takes, chosen once
per name and shape by :func:`route_for` and applied by :func:`orthogonalize`. Every function
returns a new tensor and never modifies its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from demuon.config import RoutingConfig

# docs/algorithms.md §5.1 (KellerJordan/Muon muon.py): quintic coefficients, steps, normalisation guard.
NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
# docs/algorithms.md §9 item 3: largest singular value NS5 (5 steps, fp32) can output; Lemma 1 with NS5
# in place of the exact polar factor is multiplied by this.
NS5_MAX_SINGULAR = 1.2024
# Routes: matrix ones see a 2-D view of the tensor; elementwise ones see the whole tensor.
MATRIX_ROUTES: tuple[str, ...] = ("newton_schulz", "polar_svd", "colnorm", "rownorm")
ELEMENTWISE_ROUTES: tuple[str, ...] = ("normalize", "sign", "rms")
ROUTES: tuple[str, ...] = MATRIX_ROUTES + ELEMENTWISE_ROUTES


def newton_schulz(G: Tensor, steps: int = NS_STEPS, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """NS5(G) ≈ msgn(G) for a matrix or a batch of matrices ``(..., m, n)`` (docs/algorithms.md §5.1).

    Computes in ``dtype`` (bfloat16 or float32; float64 works too and is used by tests), returns in
    G's dtype on G's device. The Frobenius normalisation is per matrix, so a batch gives the same
    result as looping over its matrices. Zero input gives zero output (the 1e-7 guard).
    """
    # G: the matrix or batch to orthogonalise, not modified.
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + NS_EPS)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    out: Tensor = X.to(G.dtype)
    return out


def polar_svd(G: Tensor) -> Tensor:
    """Exact polar factor ``U Vᵀ`` of each matrix in ``(..., m, n)``, in float64 (the reference).

    Singular values below ``max(m, n) · eps · σ_max`` (numerically zero) map to zero instead of one,
    as in NS5: ``polar_svd(0) = 0`` and a rank-r input gives a rank-r partial isometry. The result
    is float64 on G's device.
    """
    # G: the matrix or batch to orthogonalise, not modified.
    if G.ndim < 2:
        raise ValueError(f"polar_svd needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    U, S, Vh = torch.linalg.svd(G.to(torch.float64), full_matrices=False)
    tol = max(G.shape[-2:]) * torch.finfo(torch.float64).eps * S[..., :1]
    keep = (S > tol).to(torch.float64)
    out: Tensor = (U * keep.unsqueeze(-2)) @ Vh
    return out


def _contains_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(p in name for p in patterns)


def route_for(name: str, shape: tuple[int, ...], routing: RoutingConfig) -> str:
    """The route of parameter ``name`` with ``shape`` (docs/algorithms.md §2.4, §5.3).

    Size-1 dimensions are dropped first, as the DeMuon code's ``squeeze()`` does (a ``1×128×256``
    positional embedding is a matrix, a ``1×n`` tensor a vector). Then: ≥2-D → ``routing.embedding``
    if the name contains one of ``routing.embedding_names``, else ``routing.head`` if it contains one
    of ``routing.head_names``, else ``routing.matrix``; 1-D → ``routing.vector``; 0-D → ``"sign"``
    (``V/|V|``). Matching is by substring, so choose patterns that do not occur inside other names
    (``"head"`` also matches ``multihead_attn``; harmless with the default routes, which agree).
    """
    # name: parameter name from named_parameters(); shape: its shape; routing: the settings. None modified.
    ndim = sum(1 for d in shape if d != 1)
    if ndim == 0:
        return "sign"
    if ndim == 1:
        return routing.vector
    if _contains_any(name, routing.embedding_names):
        return routing.embedding
    if _contains_any(name, routing.head_names):
        return routing.head
    return routing.matrix


def _as_matrix(V: Tensor) -> Tensor:
    """A 2-D view: size-1 dims dropped, then ``(out, in, kh, kw)`` → ``(out, in·kh·kw)``; a vector
    or scalar becomes one row."""
    S = V.squeeze()
    if S.ndim >= 2:
        return S.reshape(S.shape[0], -1)
    return S.reshape(1, -1)


def safe_divide(V: Tensor, norm: Tensor) -> Tensor:
    """``V / norm`` where ``norm > 0``, and 0 where ``norm == 0`` (no host sync, no NaN)."""
    # V: numerator, not modified; norm: broadcastable non-negative denominator, not modified.
    return torch.where(norm > 0, V / norm, 0.0)


def normalize(V: Tensor) -> Tensor:
    """``V / ‖V‖₂`` over the whole tensor; zero stays zero (docs/algorithms.md §2.4)."""
    # V: tracker, not modified.
    return safe_divide(V, torch.linalg.vector_norm(V))


def rms_normalize(V: Tensor) -> Tensor:
    """``V / RMS(V)`` with ``RMS = ‖V‖₂ / √numel``; zero stays zero (docs/algorithms.md §5.3)."""
    # V: tracker, not modified.
    rms = torch.linalg.vector_norm(V) / max(V.numel(), 1) ** 0.5
    return safe_divide(V, rms)


def column_normalize(V: Tensor) -> Tensor:
    """Each column ``V[:, j]`` divided by its RMS; zero columns stay zero (docs/algorithms.md §5.3)."""
    # V: 2-D tracker, not modified.
    rms = torch.linalg.vector_norm(V, dim=-2, keepdim=True) / V.shape[-2] ** 0.5
    return safe_divide(V, rms)


def row_normalize(V: Tensor) -> Tensor:
    """Each row ``V[i, :]`` divided by its RMS; zero rows stay zero (docs/algorithms.md §5.3)."""
    # V: 2-D tracker, not modified.
    rms = torch.linalg.vector_norm(V, dim=-1, keepdim=True) / V.shape[-1] ** 0.5
    return safe_divide(V, rms)


def _matrix_direction(V2: Tensor, route: str, ns_steps: int, ns_dtype: torch.dtype) -> Tensor:
    if route == "newton_schulz":
        return newton_schulz(V2, ns_steps, dtype=ns_dtype)
    if route == "polar_svd":
        return polar_svd(V2).to(V2.dtype)
    if route == "colnorm":
        return column_normalize(V2)
    return row_normalize(V2)


def orthogonalize(
    V: Tensor, route: str, *, ns_steps: int = NS_STEPS, ns_dtype: torch.dtype = torch.float32
) -> Tensor:
    """The step direction of one tensor for ``route`` (one of :data:`ROUTES`), same shape and dtype.

    Matrix routes (``newton_schulz``, ``polar_svd``, ``colnorm``, ``rownorm``) act on the 2-D view of
    :func:`_as_matrix` (conv kernels flattened to ``(out, in·kh·kw)``, ``1×a×b`` squeezed) and
    reshape back. ``normalize`` = ``V/‖V‖₂``, ``sign`` = elementwise sign (``V/|V|`` for a scalar; no
    ``1/d_in`` factor, as DeMuon uses no shape factors), ``rms`` = ``V/RMS(V)``. All are zero-safe.
    """
    # V: the mixed tracker of one parameter, not modified; route: its route from route_for;
    # ns_steps / ns_dtype: Newton–Schulz steps and compute dtype.
    if route in MATRIX_ROUTES:
        return _matrix_direction(_as_matrix(V), route, ns_steps, ns_dtype).reshape(V.shape)
    if route == "normalize":
        return normalize(V)
    if route == "sign":
        return torch.sign(V)
    if route == "rms":
        return rms_normalize(V)
    raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
