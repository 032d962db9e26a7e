"""Communication graphs as boolean adjacency matrices (layer 2: pure torch/numpy).

``A[i, j]`` is ``True`` when peer ``i`` consumes a message from peer ``j`` (``w_ij > 0``, ``i != j``);
the diagonal is always ``False``. Undirected graphs have symmetric ``A``.

Where the constructions come from (docs/algorithms.md §4.1 and §4.2):

* complete, ring, star, hypercube (``i ↔ i XOR 2^b``), 2-D torus with wrap-around: textbook graphs.
* directed exponential: the DeMuon code (``MozarTuring/DeMuon``, ``graph.py``): row ``i`` has entries
  at columns ``(i + 2^h) mod N``, ``h = 0 … ⌊log₂(N−1)⌋``, so peer ``i`` averages messages from
  ``i+1, i+2, i+4, …`` and sends to ``i−1, i−2, i−4, …``.
* static exponential (Ying et al. 2021, "Exponential Graph is Provably Efficient for Decentralized
  Deep Training"): the same arcs ``i → i + 2^h``, ``h = 0 … ⌈log₂N⌉−1`` (the two hop sets coincide);
  the graphs differ only in their weights (see ``mixing``).
* one-peer exponential (Ying et al. 2021): at round ``t`` only the arc ``i → i + 2^(t mod τ)``,
  ``τ = ⌈log₂N⌉``; time-varying, each single graph is usually disconnected.
* Erdős–Rényi and random geometric graphs are drawn from a numpy ``Generator`` seeded by ``seed``;
  a disconnected draw is refused (never silently redrawn) and the error names a seed that works.
* edge lists are read from a text file: one undirected edge per line, ``i j`` or ``i j w``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from demuon.errors import TopologyError

SEED_SEARCH = 64  # how many later seeds a refused random draw tries, to suggest one that connects


# ------------------------------------------------------------------------------------ helpers


def check_size(n: int) -> None:
    """Refuse a peer count that is not a positive integer."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TopologyError("bad_size", f"number of peers must be an integer ≥ 1, got {n!r}", value=n)


def empty(n: int) -> torch.Tensor:
    """The N×N adjacency with no edges."""
    check_size(n)
    return torch.zeros(n, n, dtype=torch.bool)


def circulant(n: int, hops: tuple[int, ...]) -> torch.Tensor:
    """``A[i, (i + h) mod N] = True`` for every hop ``h`` (hops ≡ 0 mod N are dropped)."""
    A = empty(n)
    rows = torch.arange(n)
    for h in hops:
        if h % n:
            A[rows, (rows + h) % n] = True
    return A


def symmetrise(A: torch.Tensor) -> torch.Tensor:
    """``A ∨ Aᵀ`` (an undirected graph from a set of arcs)."""
    return A | A.T


def is_connected(A: torch.Tensor) -> bool:
    """Whether the graph is strongly connected (BFS from peer 0 along arcs and against them)."""
    n = A.shape[0]
    return _reaches_all(A, n) and _reaches_all(A.T, n)


def _reaches_all(A: torch.Tensor, n: int) -> bool:
    """Whether every peer is reachable from peer 0 following ``A[i, j]`` from ``i`` to ``j``."""
    neighbours = [torch.nonzero(A[i]).flatten().tolist() for i in range(n)]
    seen = [False] * n
    seen[0] = True
    queue = deque([0])
    while queue:
        for j in neighbours[queue.popleft()]:
            if not seen[j]:
                seen[j] = True
                queue.append(j)
    return all(seen)


def exponential_hops(n: int) -> tuple[int, ...]:
    """``2^h`` for ``h = 0 … ⌊log₂(N−1)⌋`` (= ``⌈log₂N⌉ − 1``); empty for N = 1."""
    check_size(n)
    return tuple(1 << h for h in range((n - 1).bit_length()))


def one_peer_period(n: int) -> int:
    """τ = ⌈log₂N⌉, the number of distinct hops of the one-peer exponential graph (1 for N = 1)."""
    return max(1, len(exponential_hops(n)))


# ------------------------------------------------------------------------------- deterministic


def complete(n: int) -> torch.Tensor:
    """Every pair of peers talks."""
    return ~empty(n) ^ torch.eye(n, dtype=torch.bool)


def ring(n: int) -> torch.Tensor:
    """Undirected cycle ``i ↔ i ± 1`` (N = 2 is a single edge)."""
    return circulant(n, (1, n - 1))


def star(n: int) -> torch.Tensor:
    """Peer 0 is the hub, every other peer a leaf."""
    A = empty(n)
    A[0, 1:] = True
    A[1:, 0] = True
    return A


def hypercube(n: int) -> torch.Tensor:
    """``i ↔ i XOR 2^b`` for each of the ``d = log₂N`` bits; N must be a power of two."""
    check_size(n)
    if n & (n - 1):
        raise TopologyError("bad_size", f"hypercube needs N a power of two, got N={n}", value=n)
    A = empty(n)
    rows = torch.arange(n)
    for b in range(n.bit_length() - 1):
        A[rows, rows ^ (1 << b)] = True
    return A


def torus_shape(n: int, rows: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows · cols = N``; by default the most square factorisation."""
    check_size(n)
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or n % rows:
        raise TopologyError(
            "bad_option", f"torus rows={rows!r} must be a positive divisor of N={n}", where="rows", value=rows
        )
    return rows, n // rows


def torus(n: int, rows: int | None = None) -> torch.Tensor:
    """2-D ``rows × cols`` grid with wrap-around: up, down, left, right.

    With 2 rows (or columns) up and down (left and right) are the same peer, so the degree drops
    to 3 (or 2); with 1 row the vertical neighbours are the peer itself and are dropped.
    """
    r, c = torus_shape(n, rows)
    idx = torch.arange(n)
    row, col = idx // c, idx % c
    A = empty(n)
    for nr, nc in (((row + 1) % r, col), ((row - 1) % r, col), (row, (col + 1) % c), (row, (col - 1) % c)):
        A[idx, nr * c + nc] = True
    A.fill_diagonal_(False)
    return A


def exponential(n: int, directed: bool = False) -> torch.Tensor:
    """Static exponential graph: edges ``i ↔ i ± 2^h``, ``h = 0 … ⌈log₂N⌉−1`` (undirected), or
    with ``directed`` Ying et al.'s arcs ``i → i + 2^h`` only."""
    hops = exponential_hops(n)
    return circulant(n, hops if directed else tuple(sorted({*hops, *(n - h for h in hops)})))


def directed_exponential(n: int) -> torch.Tensor:
    """DeMuon code's directed exponential graph: row ``i`` has ``i + 2^h mod N``, ``h ≤ ⌊log₂(N−1)⌋``."""
    return circulant(n, exponential_hops(n))


def one_peer_exponential(n: int, t: int = 0) -> torch.Tensor:
    """Round ``t`` of the one-peer exponential graph: only ``i → i + 2^(t mod τ)``."""
    hops = exponential_hops(n)
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise TopologyError("bad_option", f"round t must be an integer ≥ 0, got {t!r}", where="t", value=t)
    return circulant(n, (hops[t % len(hops)],)) if hops else empty(n)


# ------------------------------------------------------------------------------------- random


def _check_fraction(name: str, value: float, upper: float | None) -> None:
    """Refuse a probability/radius that is not a positive number (≤ ``upper`` when given)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value
    if not ok or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "> 0"
        raise TopologyError(
            "bad_option", f"{name}={value!r} must be a number {bound}", where=name, value=value
        )


def _erdos_renyi_draw(n: int, p: float, seed: int) -> torch.Tensor:
    """One G(N, p) draw: each unordered pair independently with probability ``p``."""
    coins = np.random.default_rng(seed).random((n, n)) < p
    return symmetrise(torch.from_numpy(np.triu(coins, k=1)))


def _geometric_draw(n: int, radius: float, seed: int) -> torch.Tensor:
    """Points uniform in the unit square; peers within ``radius`` of each other are joined."""
    pts = torch.from_numpy(np.random.default_rng(seed).random((n, 2)))
    A = torch.cdist(pts, pts) <= radius
    A.fill_diagonal_(False)
    return A


def _next_connected_seed(draw: Callable[[int], torch.Tensor], seed: int) -> int | None:
    """The first of the next ``SEED_SEARCH`` seeds whose draw is connected, if any."""
    for s in range(seed + 1, seed + 1 + SEED_SEARCH):
        if is_connected(draw(s)):
            return s
    return None


def erdos_renyi(n: int, p: float, seed: int = 0) -> torch.Tensor:
    """Erdős–Rényi G(N, p) drawn from ``seed``; a disconnected draw raises ``disconnected``."""
    check_size(n)
    _check_fraction("p", p, 1.0)
    A = _erdos_renyi_draw(n, p, seed)
    if not is_connected(A):
        good = _next_connected_seed(lambda s: _erdos_renyi_draw(n, p, s), seed)
        hint = f"seed={good} gives a connected graph" if good is not None else "no nearby seed connects"
        raise TopologyError(
            "disconnected",
            f"erdos_renyi N={n} p={p} seed={seed} drew a disconnected graph; {hint}, "
            f"or raise p (above 2·ln(N)/N ≈ {min(1.0, 2 * math.log(n) / n):.3g} it rarely happens)",
            where="seed",
            value=seed,
        )
    return A


def random_geometric(n: int, radius: float, seed: int = 0) -> torch.Tensor:
    """Random geometric graph in the unit square drawn from ``seed``; refuses a disconnected draw."""
    check_size(n)
    _check_fraction("radius", radius, None)
    A = _geometric_draw(n, radius, seed)
    if not is_connected(A):
        good = _next_connected_seed(lambda s: _geometric_draw(n, radius, s), seed)
        hint = f"seed={good} gives a connected graph" if good is not None else "no nearby seed connects"
        suggested = 1.2 * math.sqrt(2 * math.log(n) / n)
        raise TopologyError(
            "disconnected",
            f"random_geometric N={n} radius={radius} seed={seed} drew a disconnected graph; {hint}, "
            f"or raise radius (1.2·√(2·ln(N)/N) ≈ {suggested:.3g} usually connects)",
            where="seed",
            value=seed,
        )
    return A


# ---------------------------------------------------------------------------------- edge list


def _bad_line(path: Path, number: int, text: str, reason: str) -> TopologyError:
    """A ``bad_file`` error naming the file, the line number and the line."""
    return TopologyError(
        "bad_file", f"{path}:{number}: {reason}: {text!r}", where=f"{path}:{number}", value=text
    )


def _parse_edge(path: Path, number: int, text: str, n: int) -> tuple[int, int, float | None]:
    """``(i, j, w)`` from one non-empty line ``i j`` or ``i j w`` (``w`` None when absent)."""
    fields = text.split()
    if len(fields) not in (2, 3):
        raise _bad_line(path, number, text, "expected 'i j' or 'i j w'")
    try:
        i, j = int(fields[0]), int(fields[1])
        w = float(fields[2]) if len(fields) == 3 else None
    except ValueError:
        raise _bad_line(path, number, text, "peers must be integers and the weight a number") from None
    if not (0 <= i < n and 0 <= j < n):
        raise _bad_line(path, number, text, f"peer index outside 0..{n - 1}")
    if i == j:
        raise _bad_line(path, number, text, "self-loop (self weights are implied)")
    if w is not None and not (0.0 < w <= 1.0):
        raise _bad_line(path, number, text, "weight must be in (0, 1]")
    return i, j, w


def read_edge_list(path: str | Path, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Undirected graph on ``n`` peers from a text file.

    One edge per line: ``i j`` or ``i j w`` (all lines the same form); ``#`` starts a comment.
    Returns the adjacency and, when weights are given, the N×N float64 matrix with ``w`` at
    ``(i, j)`` and ``(j, i)`` (zero diagonal; the caller fills self weights). Errors name the file
    and line; a graph that leaves some peer unreachable raises ``disconnected``.
    """
    check_size(n)
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError("bad_file", f"cannot read edge list {p}: {exc}", where=str(p)) from exc
    A = empty(n)
    weights = torch.zeros(n, n, dtype=torch.float64)
    weighted: bool | None = None
    for number, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        i, j, w = _parse_edge(p, number, text, n)
        if weighted is not None and weighted != (w is not None):
            raise _bad_line(p, number, text, "mixes weighted and unweighted lines")
        weighted = w is not None
        if w is not None and A[i, j] and weights[i, j] != w:
            raise _bad_line(p, number, text, f"edge repeated with a different weight {weights[i, j].item()}")
        A[i, j] = A[j, i] = True
        if w is not None:
            weights[i, j] = weights[j, i] = w
    if not is_connected(A):
        raise TopologyError(
            "disconnected", f"edge list {p} leaves some of the {n} peers unreachable", where=str(p)
        )
    return A, (weights if weighted else None)
