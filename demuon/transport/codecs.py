"""Message compressors C(·) for compressed gossip (layer 2: pure torch, no I/O).

A codec turns one tensor into an :class:`Encoded` (contiguous CPU buffers whose raw bytes travel
as wire frames, plus a few msgpack-able scalars) and back into a dense tensor. docs/algorithms.md §7
gives the constants; ``alpha`` is the contraction ``E‖C(x) − x‖² ≤ (1 − α)‖x‖²`` of the codec *as
sent*, ``omega`` the variance ``E‖C(x) − x‖² ≤ ω‖x‖²`` of its unbiased form (None where the
codec has none, or the constant depends on the tensor's size).

    kind      buffers (d = numel)                                  α              ω
    identity  x                                                    1              0
    cast      x in bfloat16 / float16                              1 − u² (u = unit roundoff)
    topk      K values (x's dtype) + K int32 flat indices          K/d            —
    randk     K values; sorted indices regenerated from meta seed  K/d            d/K − 1 (scaled)
    rankk     P (m×r), Q (n×r) factors, X ≈ P Qᵀ                   ≥ r/min(m,n)   —
    natural   exponent bytes + packed sign bits (9 bits)           7/8            1/8
    int8      int8 codes + float32 scale per tensor / row          —              ≤ row_len/(4·127²)
              (``deflate``: the codes DEFLATE-compressed, lossless)
    blockq    b-bit codes packed 8/b per byte + float32 per block  see BlockQuant (B = block)

with K = max(1, round(ratio·d)) (the nominal α is ``ratio``; the exact one is K/d).

Determinism (docs/algorithms.md §6): ``encode`` draws all randomness from generators seeded by its
``seed`` argument (the caller derives it from seed, sender, round, phase and tensor) and works on
CPU data (a copy, except identity's zero-copy buffer), so the payload does not depend on the
device; ``decode`` is deterministic and uses only elementwise ops or scatters (no BLAS
reductions), so every machine decoding the same payload gets the same bits, and a sender can
apply exactly ``decode(encode(x))`` to its replica.

Receivers call ``expected_buffers(shape, dtype, meta)`` before allocating anything; it checks the
meta values (raising :class:`~demuon.transport.wire_errors.BadMeta`) and returns the exact buffer
dtypes and shapes the payload must have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from demuon import config
from demuon.transport.kernels import (
    QUANT_ALIGN,
    QUANT_BITS,
    SEED_MASK,
    blockq_decode,
    blockq_encode,
    deflate,
    deflate_bound,
    factor_dtype,
    inflate,
    int8_decode,
    int8_encode,
    low_rank_factors,
    natural_decode,
    natural_encode,
    outer_sum,
    padded_length,
    quant_levels,
    randk_indices,
    topk_indices,
)
from demuon.transport.wire_errors import BadMeta, BadPayload

MetaValue = int | float | str
Meta = dict[str, MetaValue]
Shape = tuple[int, ...]
BufferSpec = tuple[torch.dtype, Shape]

MAX_INDEXED_NUMEL = 2**31 - 1  # top-k/rand-k send int32 indices


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Encoded:
    """One compressed tensor: ``buffers`` are contiguous CPU tensors whose raw bytes are the payload
    frames (they travel without a copy: do not modify them until sent); ``meta`` holds small
    scalars (k, seed, rank); ``shape``/``dtype`` are the logical (decoded) shape and dtype, which
    codecs always set (``None`` means "the single buffer's", for hand-made identity payloads)."""

    buffers: tuple[torch.Tensor, ...]
    meta: Meta
    shape: Shape | None = None
    dtype: torch.dtype | None = None

    def logical(self) -> tuple[Shape, torch.dtype]:
        """``(shape, dtype)`` of the decoded tensor."""
        if self.shape is not None and self.dtype is not None:
            return self.shape, self.dtype
        if len(self.buffers) != 1:
            raise ValueError("Encoded with several buffers needs an explicit shape and dtype")
        only = self.buffers[0]
        shape = self.shape if self.shape is not None else tuple(only.shape)
        return shape, self.dtype if self.dtype is not None else only.dtype

    @property
    def nbytes(self) -> int:
        """Payload bytes (the buffers only, not the header)."""
        return sum(b.numel() * b.element_size() for b in self.buffers)


@runtime_checkable
class Codec(Protocol):
    """A compressor C(·). ``params`` are the settings the header names (informational)."""

    @property
    def kind(self) -> str: ...
    @property
    def alpha(self) -> float | None: ...
    @property
    def omega(self) -> float | None: ...
    @property
    def params(self) -> Meta: ...

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded: ...
    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor: ...
    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]: ...


# ----------------------------------------------------------------------------------- helpers


def numel(shape: Shape) -> int:
    return math.prod(shape)


def keep_count(ratio: float, d: int) -> int:
    """K = max(1, round(ratio·d)), at most d (0 for an empty tensor)."""
    return min(d, max(1, round(ratio * d)))


def matrix_shape(shape: Shape) -> tuple[int, int]:
    """The 2-D view a matrix codec works on: ``(shape[0], rest)``."""
    return shape[0], numel(shape[1:])


def _cpu_copy(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous CPU tensor with ``x``'s values that never shares memory with ``x``."""
    src = x.detach()
    out = src.to(device="cpu", dtype=dtype or src.dtype, memory_format=torch.contiguous_format)
    return out.clone() if out is src else out


def _flat_cpu(x: torch.Tensor) -> torch.Tensor:
    """A flat CPU view or copy of ``x`` (only read, never returned as a buffer)."""
    return x.detach().to("cpu").reshape(-1)


def _check_keys(meta: Meta, keys: tuple[str, ...]) -> None:
    if sorted(meta) != sorted(keys):
        raise BadMeta(f"meta keys {sorted(meta)} != {sorted(keys)}", expected=keys, actual=tuple(meta))


def _meta_int(meta: Meta, key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if type(value) is not int or not low <= value <= high:
        raise BadMeta(
            f"{key}={value!r} is not an integer in [{low}, {high}]", expected=(low, high), actual=value
        )
    return value


def _check_indices(idx: torch.Tensor, d: int) -> None:
    if idx.numel():
        low, high = torch.aminmax(idx)
        if int(low) < 0 or int(high) >= d:
            raise BadPayload(f"index range [{int(low)}, {int(high)}] outside [0, {d})", expected=d)


def _scatter(values: torch.Tensor, idx: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(numel(shape), dtype=dtype)
    out[idx] = values.to(dtype)
    return out.reshape(shape)


def _dense(buffer: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """A fresh tensor (never a view of the frame memory) of ``shape``/``dtype``."""
    return buffer.reshape(shape).to(dtype=dtype, copy=True)


# ------------------------------------------------------------------------------------ codecs


@dataclass(frozen=True)
class Identity:
    """C(x) = x. Also the keyframe codec. Zero-copy both ways: ``encode`` returns a contiguous
    CPU ``x`` itself as the buffer (a copy only if ``x`` is elsewhere or strided), so the caller
    must not modify ``x`` until it is sent (and kept for resends); ``decode`` returns a view of the
    buffer when the dtype matches (on a receiver, of the frame memory: read it, do not modify it)."""

    kind: ClassVar[str] = "identity"
    alpha: ClassVar[float | None] = 1.0
    omega: ClassVar[float | None] = 0.0
    params: ClassVar[Meta] = {}

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        buffer = x.detach().to("cpu").contiguous()
        return Encoded((buffer,), {}, tuple(x.shape), x.dtype)

    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        out = enc.buffers[0]
        out = out if out.shape == shape else out.reshape(shape)
        return out if out.dtype == dtype else out.to(dtype)

    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]:
        if meta:
            _check_keys(meta, ())
        return [(dtype, shape)]


@dataclass(frozen=True)
class Cast:
    """Round to nearest in ``target`` (bfloat16 or float16); decode widens back. Deterministic and
    biased; for values in the normal range ``|C(t) − t| ≤ u·|t|`` so α = 1 − u² (u = 2^-8 for
    bfloat16, 2^-11 for float16; float16 overflows above 65504)."""

    target: torch.dtype = torch.bfloat16
    kind: ClassVar[str] = "cast"
    omega: ClassVar[float | None] = None

    @property
    def alpha(self) -> float | None:
        roundoff = 2.0**-8 if self.target == torch.bfloat16 else 2.0**-11
        return 1.0 - roundoff**2

    @property
    def params(self) -> Meta:
        return {"dtype": str(self.target).removeprefix("torch.")}

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        return Encoded((_cpu_copy(x, self.target),), {}, tuple(x.shape), x.dtype)

    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return _dense(enc.buffers[0], shape, dtype)

    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]:
        _check_keys(meta, ())
        return [(self.target, shape)]


@dataclass(frozen=True)
class TopK:
    """Keep the K entries of largest magnitude (ties: the lowest indices; NaN counts as +inf),
    zero the rest; indices travel in ascending order (``kernels.topk_indices``).
    ``‖TopK(x) − x‖² ≤ (1 − K/d)‖x‖²`` deterministically."""

    ratio: float = 0.1
    kind: ClassVar[str] = "topk"
    omega: ClassVar[float | None] = None

    @property
    def alpha(self) -> float | None:
        return self.ratio

    @property
    def params(self) -> Meta:
        return {"ratio": self.ratio}

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        flat = _flat_cpu(x)
        k = keep_count(self.ratio, flat.numel())
        idx = topk_indices(flat, k)
        return Encoded((flat[idx], idx.to(torch.int32)), {"k": k}, tuple(x.shape), x.dtype)

    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        values, idx = enc.buffers
        _check_indices(idx, numel(shape))
        return _scatter(values, idx, shape, dtype)

    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]:
        _check_keys(meta, ("k",))
        k = _meta_int(meta, "k", 0, min(numel(shape), MAX_INDEXED_NUMEL))
        return [(dtype, (k,)), (torch.int32, (k,))]


@dataclass(frozen=True)
class RandK:
    """Keep K uniformly random entries, *unscaled*: contractive with α = K/d in expectation
    (``E‖C(x) − x‖² = (1 − K/d)‖x‖²``); the scaled form ``(d/K)·C`` would be unbiased with
    ω = d/K − 1. Only the values travel: the seed in meta regenerates the indices."""

    ratio: float = 0.1
    kind: ClassVar[str] = "randk"

    @property
    def alpha(self) -> float | None:
        return self.ratio

    @property
    def omega(self) -> float | None:
        return 1.0 / self.ratio - 1.0

    @property
    def params(self) -> Meta:
        return {"ratio": self.ratio}

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        flat = _flat_cpu(x)
        k = keep_count(self.ratio, flat.numel())
        seed &= SEED_MASK
        values = flat[randk_indices(flat.numel(), k, seed)]
        return Encoded((values,), {"k": k, "seed": seed}, tuple(x.shape), x.dtype)

    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        k, seed = int(enc.meta["k"]), int(enc.meta["seed"])
        return _scatter(enc.buffers[0], randk_indices(numel(shape), k, seed), shape, dtype)

    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]:
        _check_keys(meta, ("k", "seed"))
        k = _meta_int(meta, "k", 0, min(numel(shape), MAX_INDEXED_NUMEL))
        _meta_int(meta, "seed", 0, SEED_MASK)
        return [(dtype, (k,))]


@dataclass(frozen=True)
class RankK:
    """Rank-r approximation X ≈ P Qᵀ of the (shape[0], rest) view, r = min(rank, m, n), by a
    seeded randomized SVD with ``power_iters`` power iterations (exact truncated SVD when
    r + 8 ≥ min(m, n)): ``‖X − C(X)‖² = Σ_{l>r} σ_l² ≤ (1 − r/min(m,n))‖X‖²``. Factors travel in
    float32 (float64 for float64 tensors). Tensors with ndim < 2 are sent as they are (identity)."""

    rank: int = 4
    power_iters: int = 2
    kind: ClassVar[str] = "rankk"
    alpha: ClassVar[float | None] = None  # ≥ r/min(m, n): depends on the shape
    omega: ClassVar[float | None] = None

    @property
    def params(self) -> Meta:
        return {"rank": self.rank, "power_iters": self.power_iters}

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        shape = tuple(x.shape)
        if x.ndim < 2:
            return Encoded((_cpu_copy(x),), {}, shape, x.dtype)
        m, n = matrix_shape(shape)
        A = x.detach().to(device="cpu", dtype=factor_dtype(x.dtype)).reshape(m, n)
        r = min(self.rank, m, n)
        P, Q = low_rank_factors(A, r, self.power_iters, seed) if r else (A[:, :0], A[:0].T)
        return Encoded((P.contiguous(), Q.contiguous()), {"rank": r}, shape, x.dtype)

    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        if len(shape) < 2:
            return _dense(enc.buffers[0], shape, dtype)
        return outer_sum(*enc.buffers).reshape(shape).to(dtype)

    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]:
        if len(shape) < 2:
            _check_keys(meta, ())
            return [(dtype, shape)]
        _check_keys(meta, ("rank",))
        m, n = matrix_shape(shape)
        r = _meta_int(meta, "rank", 0, min(self.rank, m, n))
        return [(factor_dtype(dtype), (m, r)), (factor_dtype(dtype), (n, r))]


@dataclass(frozen=True)
class Natural:
    """Natural compression (stochastic rounding to ±2^a, unbiased, ω = 1/8, so α = 7/8 as sent;
    docs/algorithms.md §7). Computed in float32 (exact for bfloat16 inputs; float64 inputs are first
    rounded to float32, float16 outputs can overflow above 2^15). See ``transport.kernels``."""

    kind: ClassVar[str] = "natural"
    alpha: ClassVar[float | None] = 7 / 8
    omega: ClassVar[float | None] = 1 / 8
    params: ClassVar[Meta] = {}

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        flat = _flat_cpu(x).to(torch.float32).contiguous()
        return Encoded(natural_encode(flat, seed), {}, tuple(x.shape), x.dtype)

    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return natural_decode(*enc.buffers).reshape(shape).to(dtype)

    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]:
        _check_keys(meta, ())
        d = numel(shape)
        return [(torch.uint8, (d,)), (torch.uint8, ((d + 7) // 8,))]


@dataclass(frozen=True)
class Int8:
    """Unbiased stochastic rounding to the grid s·{−127…127}, s = max|x|/127 per tensor (or per
    row of the (shape[0], rest) view when ``per_row``): q = ⌊x/s + u⌋, u ~ U[0, 1) on a 2^-23
    grid. Per-entry variance ≤ s²/4, so ω ≤ row_len/(4·127²): it depends on the size (None).

    ``deflate``: the codes travel losslessly compressed (:func:`~demuon.transport.kernels.deflate`,
    their byte count in meta ``n``). A grid scaled by the largest entry puts most codes near 0, so
    on the GPT's tracker messages they take 0.64 of int8's bytes (5.1 bits per entry) at the same
    values. It costs about 18 ms per million entries to compress and 6 to inflate on one core:
    for slow links."""

    per_row: bool = False
    deflate: bool = False
    kind: ClassVar[str] = "int8"
    alpha: ClassVar[float | None] = None
    omega: ClassVar[float | None] = None

    @property
    def params(self) -> Meta:
        return {"per_row": self.per_row, **({"deflate": True} if self.deflate else {})}

    def rows(self, shape: Shape) -> tuple[int, int]:
        if self.per_row and len(shape) >= 2 and shape[0] > 0:
            return matrix_shape(shape)
        return 1, numel(shape)

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        A = x.detach().to(device="cpu", dtype=torch.float32).reshape(self.rows(tuple(x.shape)))
        q, scale = int8_encode(A, seed)
        if not self.deflate:
            return Encoded((q, scale), {}, tuple(x.shape), x.dtype)
        packed = deflate(q.reshape(-1))
        return Encoded((packed, scale), {"n": packed.numel()}, tuple(x.shape), x.dtype)

    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        q, scale = enc.buffers
        if self.deflate:
            rows, cols = self.rows(shape)
            codes = inflate(q, rows * cols)
            if codes is None:
                raise BadPayload(
                    f"the deflated codes do not inflate to {rows * cols} bytes", expected=rows * cols
                )
            q = codes.view(torch.int8).reshape(rows, cols)
        return int8_decode(q, scale).reshape(shape).to(dtype)

    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]:
        rows, cols = self.rows(shape)
        if not self.deflate:
            _check_keys(meta, ())
            return [(torch.int8, (rows, cols)), (torch.float32, (rows,))]
        _check_keys(meta, ("n",))
        n = _meta_int(meta, "n", 0, deflate_bound(rows * cols))
        return [(torch.uint8, (n,)), (torch.float32, (rows,))]


@dataclass(frozen=True)
class BlockQuant:
    """Block-wise quantization to ``bits`` ∈ {4, 2, 1} with one float32 scale per block of
    ``block`` = B entries (a multiple of 8) of the flat tensor; the last block may be partial, its
    codes padded to a multiple of 8. Codes travel packed ``8/bits`` to a byte (two's complement,
    low bits first), the scales as float32 (bfloat16 scales would save 2 bytes a block but add a
    2^-8 relative error to every entry). Payload ``⌈d/8⌉·bits + 4⌈d/B⌉`` bytes: 4.125, 2.125 and
    1.125 bits per entry at B = 256 (7.8×, 15× and 28× fewer than float32). Computed in float32
    (float64 inputs are rounded to float32 first); decoding is elementwise, so bit-identical
    everywhere. NaN or ±inf in a block make its scale, so every value decoded from that block,
    non-finite: the receiver's finiteness check rejects the message.

    Per block ``x_b`` of ``n ≤ B`` entries: ``s = max|x_b|``, ``L = 2^(bits−1) − 1`` (7 for 4 bits;
    1 for 2 bits, i.e. ternary, three of the four codes used), step ``Δ = s/L``.

    * **Deterministic, bits ≥ 2** (the default): ``C(x)_i = Δ·round(x_i/Δ)``, biased. The largest
      entry is exact and every other one is off by at most ``min(Δ/2, |x_i|)`` (0 is on the grid),
      so ``‖C(x_b) − x_b‖² ≤ Σ_{i≠max} min(Δ²/4, x_i²)`` while ``‖x_b‖² = s² + Σ_{i≠max} x_i²``;
      the ratio is largest with every other entry at ``Δ/2``, ``(B − 1)/(4L² + B − 1)``, hence
      ``α = 4L²/(4L² + B − 1)``: 0.435 (4 bits) and 0.0154 (2 bits) at B = 256 (for blocks whose
      maximum is a normal float32). Gaussian blocks do far better: α ≈ 0.984 and 0.35.
    * **Deterministic, 1 bit**: the scaled sign ``C(x)_i = m·sign(x_i)``, ``m = ‖x_b‖₁/n`` (the
      sign bit, so −0.0 counts as negative). ``‖C(x_b) − x_b‖² = ‖x_b‖² − ‖x_b‖₁²/n`` exactly, so
      ``α_b = ‖x_b‖₁²/(n‖x_b‖²) ≥ 1/n``: ``α = 1/B`` at worst (one nonzero entry), 2/π ≈ 0.64 on
      Gaussian blocks.
    * **Stochastic, bits ≥ 2**: ``Q_i = Δ·⌊x_i/Δ + u_i⌋`` with ``u_i`` uniform on the midpoints
      of the 2^-16 grid (:func:`~demuon.transport.kernels.uniform16` of ``seed``): unbiased to
      within 2^-17 of a step, ``Var Q_i = Δ²f_i(1 − f_i)`` (``f_i`` the fractional part of
      ``x_i/Δ``), so ``E‖Q − x_b‖² = ω_b‖x_b‖²``, ``ω_b = Σ f_i(1 − f_i)/Σ (x_i/Δ)²``. With the
      maximum exact, the ratio is largest with every other entry at ``t·Δ``,
      ``t = (√(1 + r) − 1)/r``, ``r = (B − 1)/L²``: ``ω_b ≤ ω = (√(1 + r) − 1)/2``, 0.745 (4 bits)
      and 7.5 (2 bits) at B = 256. Sent unscaled, ω > 1 would make the replica error grow, so
      **the codec scales**: each block travels as ``C = Q/(1 + ω_b)`` (its step shrunk), the
      least-squares multiple of ``Q``: ``E C = x_b/(1 + ω_b)`` and ``E‖C − x_b‖² =
      ω_b/(1 + ω_b)·‖x_b‖²``, so ``α = 1/(1 + ω)``: 0.573 (4 bits) and 0.118 (2 bits); on Gaussian
      blocks ``1/(1 + ω_b)`` ≈ 0.97 and 0.41. ``omega`` is the ω of the unscaled ``Q``.
    * **Stochastic, 1 bit**: ``Q_i = ±s`` with ``P(+) = (1 + x_i/s)/2``: unbiased, ``Var Q_i =
      s² − x_i²``, ``ω_b = n s²/‖x_b‖² − 1 ≤ B − 1``; scaled the same way, ``C_i = ±‖x_b‖²/(n s)``
      and ``α_b = ‖x_b‖²/(n s²) ≥ 1/B`` (about 0.11 on Gaussian blocks, far below the
      deterministic scaled sign's 0.64).

    ``encode`` is a function of ``(x, seed)``. The scales of the 1-bit and the stochastic variants
    are float sums over a block: reproducible on one machine, and every holder of a replica
    applies the same payload, but another CPU, or the compiled path of the stochastic variants
    (``kernels``), might round a scale differently. Suggested consensus steps (``gossip.gamma``),
    the best of a sweep on 8 peers (docs/algorithms.md §7):
    :data:`BLOCKQ_GAMMA`, 1.0 (4 bits), 0.4 (2 bits), 0.6 (1 bit); stochastic 1.0, 0.5, 0.1."""

    bits: int = 4
    block: int = 256
    stochastic: bool = False
    kind: ClassVar[str] = "blockq"

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits={self.bits} is not one of {QUANT_BITS}")
        if self.block < QUANT_ALIGN or self.block % QUANT_ALIGN:
            raise ValueError(f"block={self.block} is not a positive multiple of {QUANT_ALIGN}")

    @property
    def omega(self) -> float | None:
        """ω of the unscaled stochastic rounding (None when deterministic)."""
        if not self.stochastic:
            return None
        if self.bits == 1:
            return float(self.block - 1)
        return (math.sqrt(1 + (self.block - 1) / quant_levels(self.bits) ** 2) - 1) / 2

    @property
    def alpha(self) -> float:
        """The worst-case contraction of the codec as sent (see the class docstring)."""
        if self.bits == 1:
            return 1 / self.block
        if self.stochastic:
            return 1 / (1 + (self.omega or 0.0))
        four_l2 = 4 * quant_levels(self.bits) ** 2
        return four_l2 / (four_l2 + self.block - 1)

    @property
    def gamma(self) -> float:
        """The suggested consensus step γ (:data:`BLOCKQ_GAMMA`); ``gossip.gamma`` is what is used."""
        return BLOCKQ_GAMMA[self.bits, self.stochastic]

    @property
    def params(self) -> Meta:
        return {"bits": self.bits, "block": self.block, "stochastic": self.stochastic}

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        flat = _flat_cpu(x).to(torch.float32).contiguous()
        draws = seed & SEED_MASK if self.stochastic else None
        return Encoded(blockq_encode(flat, self.bits, self.block, draws), {}, tuple(x.shape), x.dtype)

    def decode(self, enc: Encoded, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        packed, scales = enc.buffers
        return blockq_decode(packed, scales, self.bits, self.block, numel(shape)).reshape(shape).to(dtype)

    def expected_buffers(self, shape: Shape, dtype: torch.dtype, meta: Meta) -> list[BufferSpec]:
        _check_keys(meta, ())
        d = numel(shape)
        return [(torch.uint8, (padded_length(d) * self.bits // 8,)), (torch.float32, (-(-d // self.block),))]


#: Suggested ``gossip.gamma`` for :class:`BlockQuant` by ``(bits, stochastic)``: the best of a sweep
#: on 8 peers (ring, DeMuon, quadratic 32×64, 300 rounds; docs/algorithms.md §7). 2 bits diverged
#: at γ = 0.6, 1 bit stochastic at γ = 0.3; 4 bits at γ = 1 matched exact mixing.
BLOCKQ_GAMMA: dict[tuple[int, bool], float] = {
    (4, False): 1.0,
    (2, False): 0.4,
    (1, False): 0.6,
    (4, True): 1.0,
    (2, True): 0.5,
    (1, True): 0.1,
}

CAST_TARGETS: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def make_codec(cfg: config.CodecConfig) -> Codec:
    """The codec a ``[gossip.codec]`` config section names."""
    match cfg:
        case config.IdentityCodec():
            return Identity()
        case config.CastCodec():
            return Cast(CAST_TARGETS[cfg.dtype])
        case config.TopKCodec():
            return TopK(cfg.ratio)
        case config.RandKCodec():
            return RandK(cfg.ratio)
        case config.RankKCodec():
            return RankK(cfg.rank, cfg.power_iters)
        case config.NaturalCodec():
            return Natural()
        case config.Int8Codec():
            return Int8(cfg.per_row, cfg.deflate)
        case config.BlockQuantCodec():
            return BlockQuant(cfg.bits, cfg.block, cfg.stochastic)
    raise TypeError(f"unknown codec config {cfg!r}")
