"""Numeric kernels behind the codecs (layer 2: pure torch/NumPy, no I/O, no classes).

**Natural compression** (Horváth et al. 2019, "Natural compression for distributed deep
learning"; docs/algorithms.md §7) rounds each entry ``t`` with ``2^a ≤ |t| < 2^(a+1)`` to
``sign(t)·2^a`` with probability ``(2^(a+1) − |t|)/2^a`` and to ``sign(t)·2^(a+1)`` otherwise:
unbiased, ``E[C(t)²] ≤ (9/8)·t²`` (ω = 1/8).

On float32 bits this is one integer add: with ``|t| = 2^a·(1 + m/2^23)`` (``m`` the 23-bit
mantissa field), adding a uniform ``r ∈ [0, 2^23)`` to the bit pattern carries into the exponent
field exactly when ``r ≥ 2^23 − m``, i.e. with probability ``m/2^23 = (|t| − 2^a)/2^a``. The
exponent byte after the add is the whole magnitude of the result. Subnormals round the same way
to 0 or 2^-126 (still unbiased, but the 9/8 bound only holds for |t| ≥ 2^-126); zero stays zero.
Payload: the exponent bytes plus the sign bits packed eight to a byte (little bit order): 9 bits
per entry. A result is a signed power of two with an empty mantissa, so it is exactly a bfloat16:
decoding assembles the two bfloat16 bytes from the exponent and sign bytes and widens to float32.

**Random bits** for natural compression and int8 come from NumPy's PCG64 bit generator seeded with
``seed``: its raw stream is guaranteed stable across NumPy versions (NEP 19), and it is about
twice as fast as drawing the same integers from a ``torch.Generator`` (1.2 ms vs 2.6 ms per
million on one core), which is most of natural compression's encode time. Block quantization's
stochastic rounding takes 16 bits per entry (:func:`uniform16`), a quarter of the stream, from
NumPy's SFC64 (also stream-stable, and a quarter faster than PCG64 again: 0.50 ms vs 0.68 ms
per million entries, the largest single cost of that encode). Rand-K
indices and the rank-K sketch use a seeded CPU ``torch.Generator`` (randperm / randn).

**Compiled path**: stochastic rounding (4, 2 and 1 bit) runs in C when the machine has a compiler
(``native``: ``_blockq.c``, built on first use; one pass per block, eight lanes, the same draws),
with the torch code below as the fallback (and for blocks over ``native.MAX_BLOCK``). Both give
the same codes bit for bit; a block's scale is summed in another order there, so it can differ in
its last bits (2e-7 relative measured).

**Block quantization** (4, 2 or 1 bit, a float32 scale per block; ``codecs.BlockQuant`` states
the rules and their contraction factors): blocks are rows of a 2-D view, so every step is one
vectorised pass; signed codes are packed ``8/bits`` to a byte by reading the ``8/bits`` code bytes
of one output byte as one little-endian integer and folding its fields together with shifts
(unpacking shifts them apart and sign-extends with an arithmetic shift), 1-bit codes with NumPy's
``packbits``. Decoding is elementwise.

**DEFLATE** (zlib, raw stream) packs int8 codes losslessly when they crowd near zero (a grid
scaled by the largest entry of a heavy-tailed tensor); :func:`inflate` stops after ``n + 1`` bytes,
so a hostile stream cannot allocate more than the tensor it claims to be.

**Low rank**: a seeded randomized SVD (range finder with power iterations), and the product
``P Qᵀ`` summed one outer product at a time with elementwise ops, so decoding gives the same bits
on every machine (BLAS results can depend on the CPU and the thread count).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from demuon.transport import native

MANTISSA_BITS = 23  # float32 mantissa field width (IEEE 754 binary32)
EXPONENT_ALL_ONES = 255  # exponent byte of ±inf / NaN
SEED_MASK = (1 << 64) - 1  # seeds are reduced to 64 bits
OVERSAMPLE = 8  # randomized range finder oversampling p (Halko, Martinsson, Tropp 2011, section 4.2)
INT8_LEVELS = 127  # symmetric int8 grid −127…127 (−128 unused so the grid is symmetric)
TOPK_SAMPLE = 1 << 14  # entries sampled to estimate the top-k thresholds


# ------------------------------------------------------------------------------- random bits


def random_bits23(n: int, seed: int) -> torch.Tensor:
    """``n`` independent uniform integers in ``[0, 2^23)`` as int32, fully determined by ``seed``."""
    raw = np.random.PCG64(seed & SEED_MASK).random_raw((n + 1) // 2)
    bits = torch.from_numpy(raw.view(np.int32)[:n])
    return bits.bitwise_and_((1 << MANTISSA_BITS) - 1)


def uniform01(n: int, seed: int) -> torch.Tensor:
    """``n`` float32 uniforms in ``[0, 1)`` on the 2^-23 grid, from :func:`random_bits23`."""
    return random_bits23(n, seed).to(torch.float32).mul_(2.0**-MANTISSA_BITS)


def uniform16(n: int, seed: int) -> torch.Tensor:
    """``n`` float32 uniforms ``(2k + 1)/2^17``, ``k`` uniform in ``[0, 2^16)``: 16 bits of the SFC64
    stream of ``seed`` each (a quarter of :func:`uniform01`'s draws), read as a signed int16 ``k_s``
    and ``k = k_s + 2^15``. Midpoints, so ``P(u < t)`` is within 2^-17 of ``t`` for every
    ``t ∈ [0, 1]``: enough for stochastic rounding to a few levels (block quantization), at a
    quarter of the generator's time."""
    out = torch.empty(-(-n // 4) * 4)
    return _fill_draws(np.random.SFC64(seed & SEED_MASK), out, 0.0).mul_(2.0**-16)[:n]


def randk_indices(d: int, k: int, seed: int) -> torch.Tensor:
    """A uniformly random set of K distinct flat indices in ``[0, d)``, sorted, regenerated
    identically from ``seed``: draw with replacement and keep the distinct ones until there are K
    (a uniform K-subset; O(K log K) instead of a full permutation when K ≪ d)."""
    gen = torch.Generator().manual_seed(seed & SEED_MASK)
    if 4 * k > d:
        return torch.randperm(d, generator=gen)[:k].sort().values
    idx = torch.empty(0, dtype=torch.int64)
    while idx.numel() < k:
        draws = torch.randint(d, (k - idx.numel(),), generator=gen)
        idx = torch.unique(torch.cat((idx, draws)))
    return idx


# ------------------------------------------------------------------------------------ top-k


def _select_largest(v: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of exactly ``k`` entries of ``v`` (no NaN): the ``k`` largest, and among the
    entries equal to the k-th largest value, the first ones in order."""
    keep = np.zeros(v.size, dtype=bool)
    if k <= 0:
        return keep
    kth = np.partition(v, v.size - k)[v.size - k]
    np.greater(v, kth, out=keep)
    ties = np.flatnonzero(v == kth)[: k - int(np.count_nonzero(keep))]
    keep[ties] = True
    return keep


def _sample_rank(sample: np.ndarray, rank: float) -> float:
    """The ``rank``-th largest entry of ``sample`` (−inf past its end, +inf before its start)."""
    r = math.ceil(rank)
    if r > sample.size:
        return -math.inf
    if r < 1:
        return math.inf
    return float(np.partition(sample, sample.size - r)[sample.size - r])


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (int64, ascending) of the ``k`` entries of largest magnitude of a flat CPU
    tensor; ties at the k-th magnitude go to the lowest indices, and NaN counts as +inf.

    Exact, and about ten times faster than ``torch.topk`` on a million entries: the magnitudes of
    a strided sample of :data:`TOPK_SAMPLE` entries give two thresholds, ``low`` (with high
    probability at least ``k`` entries are ≥ it) and ``high`` (fewer than ``k`` are above it).
    Only the candidates ``|x| ≥ low`` are gathered (one vectorized pass, no full-size float
    temporary); the ones above ``high`` are kept outright, and a partition of the few in between
    picks the rest. Should the sample mislead (fewer than ``k`` candidates, or more than ``k``
    above ``high``), the same selection runs on all entries or all candidates: slower, same set.
    """
    d = x.numel()
    if k >= d:
        return torch.arange(d)
    src = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)  # exact widening
    xs = src.numpy()
    stride = d // TOPK_SAMPLE
    low = high = -math.inf
    if stride >= 4:  # otherwise the sample would cost about as much as the whole
        sample = np.abs(xs[::stride])
        np.nan_to_num(sample, copy=False, nan=np.inf)
        expected = k / d * sample.size
        margin = 4.0 * math.sqrt(expected) + 16.0
        low, high = _sample_rank(sample, expected + margin), _sample_rank(sample, expected - margin)
    if low > 0:
        outside = np.less(xs, low)
        outside &= np.greater(xs, -low)  # |x| < low; NaN compares false, so it stays a candidate
        np.logical_not(outside, out=outside)
        cand = np.flatnonzero(outside)
    else:
        cand = np.arange(d)
    if cand.size < k:  # the sample misled us: fall back to all entries
        cand = np.arange(d)
    mag = np.abs(xs[cand])
    np.nan_to_num(mag, copy=False, nan=np.inf)
    sure = np.greater(mag, high)
    n_sure = int(np.count_nonzero(sure))
    if n_sure > k:  # the sample misled us: select among all candidates
        sure[:], n_sure = False, 0
    rest = np.flatnonzero(~sure)
    sure[rest[_select_largest(mag[rest], k - n_sure)]] = True
    return torch.from_numpy(cand[sure])


# --------------------------------------------------------------------------- natural (±2^a)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool vector → ``ceil(n/8)`` uint8, entry ``i`` in bit ``i % 8`` of byte ``i // 8``."""
    return torch.from_numpy(np.packbits(flags.numpy(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 vector of ``n`` zeros and ones."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little"))


def natural_encode(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural compression of a flat contiguous float32 CPU tensor ``x`` (not modified).

    Returns ``(exponents, signs)``: uint8 of shape ``(n,)`` and ``(ceil(n/8),)``. NaN and ±inf
    encode as ±inf (so a receiver that requires finite values still rejects them), and values
    that round past the float32 range become ±inf.
    """
    bits = x.view(torch.int32)
    carry = random_bits23(x.numel(), seed)
    carry += bits  # mantissa + r carries into the exponent field with probability m / 2^23
    carry >>= MANTISSA_BITS  # arithmetic shift: the low byte is the new exponent field
    exponents = carry.to(torch.uint8)
    if not math.isfinite(float(x.sum())):  # rare slow path: pin NaN/inf to the all-ones exponent
        exponents[~torch.isfinite(x)] = EXPONENT_ALL_ONES
    return exponents, pack_bits(torch.from_numpy(np.signbit(x.numpy())))  # the sign bit, NaN's too


def natural_decode(exponents: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Float32 vector ``±2^(e − 127)`` (0 for ``e = 0``) from :func:`natural_encode`'s buffers:
    the float32 bits are ``sign << 31 | e << 23`` (the bfloat16 ``sign, e, 0`` widened)."""
    negative = unpack_bits(signs, exponents.numel()).numpy()
    bits = exponents.numpy().astype(np.uint32)
    bits <<= MANTISSA_BITS
    bits |= np.left_shift(negative, 31, dtype=np.uint32)
    return torch.from_numpy(bits.view(np.float32))


# ------------------------------------------------------------------------------------- int8


def int8_encode(A: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased stochastic rounding of each row of float32 ``A`` (rows × cols, not modified) to
    ``s·{−127…127}`` with ``s = max|row|/127``: ``q = ⌊A/s + u⌋``. Returns ``(q int8, s float32)``."""
    scale = A.abs().amax(dim=1) / INT8_LEVELS if A.numel() else torch.zeros(A.shape[0])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    noise = uniform01(A.numel(), seed).reshape(A.shape)
    q = torch.floor(A / safe + noise).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return q, scale.contiguous()


def int8_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale[:, None]


# ------------------------------------------------------------------------ lossless DEFLATE

DEFLATE_LEVEL = 1  # zlib level; with the RLE strategy higher levels gain nothing on code bytes
DEFLATE_WBITS = -15  # raw DEFLATE: no zlib header or Adler-32 (the wire checksums every message)


def deflate_bound(n: int) -> int:
    """The most bytes DEFLATE can turn ``n`` bytes into (zlib's ``compressBound``)."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


def deflate(codes: torch.Tensor) -> torch.Tensor:
    """Raw DEFLATE of a contiguous 1-byte-per-entry CPU tensor's bytes (level 1, ``Z_RLE``: runs
    and Huffman codes only, which is what small integer codes need; on the GPT's tracker codes it
    beats the default strategy by 5 % and runs 30 % faster), as a uint8 tensor."""
    packer = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, DEFLATE_WBITS, 9, zlib.Z_RLE)
    data = packer.compress(codes.numpy().view(np.uint8).data) + packer.flush()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def inflate(packed: torch.Tensor, n: int) -> torch.Tensor | None:
    """The ``n`` bytes :func:`deflate` packed into ``packed`` (uint8), as uint8; None unless the
    stream is valid and holds exactly ``n`` bytes with nothing after its end. Never inflates more
    than ``n + 1`` bytes, so a hostile stream cannot make it allocate more."""
    unpacker = zlib.decompressobj(DEFLATE_WBITS)
    try:
        data = unpacker.decompress(packed.numpy().data, n + 1)
    except zlib.error:
        return None
    if len(data) != n or not unpacker.eof or unpacker.unused_data or unpacker.unconsumed_tail:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)


# --------------------------------------------------------------------------------- low rank


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rank-K factors travel in float32, or float64 for float64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def low_rank_factors(
    A: torch.Tensor, r: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized truncated SVD (Halko et al. 2011, Alg. 4.4 + 5.1) of ``A`` (m×n, not modified):
    ``P = U_r Σ_r`` (m×r), ``Q = V_r`` (n×r). Exact when r + OVERSAMPLE ≥ min(m, n)."""
    m, n = A.shape
    gen = torch.Generator().manual_seed(seed & SEED_MASK)
    sketch = torch.randn(n, min(r + OVERSAMPLE, m, n), generator=gen, dtype=A.dtype)
    basis = torch.linalg.qr(A @ sketch).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(A @ torch.linalg.qr(A.T @ basis).Q).Q
    U, S, Vh = torch.linalg.svd(basis.T @ A, full_matrices=False)
    return ((basis @ U[:, :r]) * S[:r]).contiguous(), Vh[:r].T.contiguous()


def outer_sum(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``P Qᵀ`` as Σ_l P[:, l] Q[:, l]ᵀ summed in order l = 0, 1, … with elementwise ops only, so
    the bits do not depend on the BLAS library, the CPU or the thread count."""
    out = torch.zeros(P.shape[0], Q.shape[0], dtype=P.dtype)
    for col in range(P.shape[1]):
        out += P[:, col, None] * Q[None, :, col]
    return out


# ------------------------------------------------------------------- block quantization


QUANT_BITS = (1, 2, 4)  # block quantization widths; 8/bits codes per byte
STOCHASTIC_CHUNK = 1 << 18  # entries per pass of stochastic block quantization (1 MiB float32 scratch)
QUANT_ALIGN = 8  # a block's codes start on a byte boundary: blocks and the padded tail are multiples of 8
_WIDE = {1: torch.int64, 2: torch.int32, 4: torch.int16}  # 8/bits bytes: one packed byte's codes


def quant_levels(bits: int) -> int:
    """``L = 2^(bits−1) − 1``: the signed grid ``−L … L`` of ``bits`` ≥ 2 (7 for 4 bits, 1 for 2
    bits: ternary); 0 for 1 bit, whose two levels ``±1`` have no zero."""
    return (1 << (bits - 1)) - 1


def padded_length(d: int) -> int:
    """Codes on the wire for ``d`` entries: ``d`` rounded up to a multiple of :data:`QUANT_ALIGN`."""
    return -(-d // QUANT_ALIGN) * QUANT_ALIGN


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit codes (flat int8, length a multiple of 8) → uint8, ``8/bits`` per byte:
    code ``i`` (two's complement) in bits ``[bits·(i % k), bits·(i % k + 1))`` of byte ``i // k``,
    ``k = 8/bits`` (little bit order, as :func:`pack_bits`). The ``k`` bytes of one output byte are
    read as one little-endian integer whose fields are folded together by shifts."""
    mask = (1 << bits) - 1
    wide = q.view(_WIDE[bits]) & int.from_bytes(bytes([mask]) * (8 // bits), "little")
    for step in range((8 // bits).bit_length() - 1):  # log2(k) folds, each halving the fields
        wide |= wide >> ((8 - bits) << step)  # fields 2m+1 move next to fields 2m
    return wide.to(torch.uint8)  # the low byte (integer conversion wraps)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes in ``−2^(bits−1) … 2^(bits−1) − 1``, ``8/bits``
    per byte. Each byte is widened and shifted so that code ``j`` lands in the top bits of byte
    ``j`` of the wide integer; an arithmetic shift of those bytes sign-extends it."""
    src = packed.to(_WIDE[bits])
    shift = 8 - bits
    wide = src << shift
    for j in range(1, 8 // bits):
        wide |= src << (shift * (j + 1))
    return wide.view(torch.int8) >> shift


def quant_pieces(
    t: torch.Tensor, d: int, block: int, most: int | None = None
) -> list[tuple[slice, torch.Tensor, int]]:
    """A flat tensor of :func:`padded_length` ``(d)`` entries cut into blocks: ``(rows, view, count)``
    for the full blocks (``k × block`` views of at most ``most`` rows each, ``count = block``) and
    for the last, partial block (a ``1 × padded`` view holding ``count = d mod block`` real
    entries, then zeros); ``rows`` is the slice of the per-block scales each view's rows own."""
    full = d // block
    step = most or max(full, 1)
    pieces = [
        (slice(i, min(i + step, full)), t[i * block : min(i + step, full) * block].view(-1, block), block)
        for i in range(0, full, step)
    ]
    if full * block < t.numel():
        pieces.append((slice(full, full + 1), t[full * block :].view(1, -1), d - full * block))
    return pieces


def _block_max(A: torch.Tensor) -> torch.Tensor:
    """``max|row|`` of each row (NaN if the row holds one), without an ``|A|`` temporary."""
    return torch.maximum(A.amax(dim=1), A.amin(dim=1).neg_())


def _grid_steps(A: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, divisor)`` per row: ``step = max|row|/L`` (NaN or inf in the row make it, so every
    value decoded from the row, non-finite) and the step with 0 replaced by 1. ``A`` is divided by
    it, not multiplied by ``1/step``, which overflows for tiny steps."""
    step = _block_max(A) / levels
    return step, torch.where(step == 0, 1.0, step)[:, None]


def _grid_codes(A: torch.Tensor, levels: int, out: torch.Tensor) -> torch.Tensor:
    """Round each row of ``A`` to nearest on ``step·{−L … L}`` (half to even), codes into int8
    ``out``; returns the steps."""
    step, divisor = _grid_steps(A, levels)
    out.copy_(torch.div(A, divisor).round_())
    return step


def _sign_bits(A: torch.Tensor, count: int, out: np.ndarray) -> torch.Tensor:
    """The scaled sign of each row: sign bits into bool ``out`` (True = negative), scale
    ``‖row‖₁/count``."""
    np.signbit(A.numpy(), out=out)
    return A.abs().sum(dim=1) / count


def _fill_draws(gen: np.random.SFC64, out: torch.Tensor, offset: float) -> torch.Tensor:
    """``out`` (float32, a multiple of 4 entries) filled with the next draws of :func:`uniform16`
    plus ``offset``, in units of 2^-16: ``2^16·(u + offset) = k_s + 2^15 + 1/2 + 2^16·offset``,
    exact in float32 for ``|offset| ≤ 8`` (a multiple of 1/2): the int16 view of the raw stream
    widened by a copy (torch's vectorised conversion, faster than NumPy's cast or a
    type-promoting add), then one add."""
    raw = gen.random_raw(out.numel() // 4)
    draws = torch.from_numpy(raw.view(np.int16)).view(out.shape)
    return out.copy_(draws).add_(2.0**15 + 0.5 + 2.0**16 * offset)


def _row_stats(xp: torch.Tensor, d: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max|block|, ‖block‖)`` of every block of a padded flat tensor (:func:`quant_pieces`),
    each in one pass over all blocks: per-row reductions cost little per entry but a fixed price
    per call, so they run once rather than once per chunk."""
    top = torch.empty(-(-d // block), dtype=torch.float32)
    norm = torch.empty_like(top)
    for rows, A, _ in quant_pieces(xp, d, block):
        top[rows] = _block_max(A)
        torch.linalg.vector_norm(A, dim=1, out=norm[rows])
    return top, norm


def _stochastic_grid(
    xp: torch.Tensor, d: int, bits: int, block: int, gen: np.random.SFC64, codes: torch.Tensor
) -> torch.Tensor:
    """Unbiased rounding ``⌊x/step + u⌋`` of each block onto ``step·{−L … L}``, codes into int8
    ``codes`` (plus ``L + 1``; the caller subtracts it). Returns each block's step shrunk by
    ``1/(1 + ω_b)``, ``ω_b = Σ f(1 − f)/Σ y²`` (``y = x/step``, ``f = y − ⌊y⌋``): the block's exact
    variance ratio, so the shrunk block has the least mean square error, ``ω/(1 + ω)·‖x_b‖²``.

    Seven elementwise passes per chunk, the fewest found: ``f(1 − f)`` is symmetric in
    ``f ↔ 1 − f``, so the magnitude of ``torch.frac`` (``y − trunc y``) serves for ``f``, and the
    sums of squares are fused norms. The draws carry the offset ``L + 1``, so ``y + u`` lies in
    ``(1, 2L + 2)`` (``|y| ≤ L(1 + 2^-22)`` and ``u`` is at least ``2^-17`` from the integers): the
    conversion to int8 (truncation) is the floor, and no clamp is needed."""
    levels = quant_levels(bits)
    top, norm = _row_stats(xp, d, block)
    step = top.div_(levels)
    divisor = torch.where(step == 0, 1.0, step)
    energy = norm.div_(divisor).square_()  # Σ y²
    total, root = torch.empty_like(step), torch.empty_like(step)  # Σ f and ‖f‖ per block
    for (rows, A, u, y, t), out in _chunks(xp, d, block, codes):
        _fill_draws(gen, u, levels + 1)
        torch.div(A, divisor[rows, None], out=y)
        frac = torch.frac(y, out=t).abs_()
        torch.sum(frac, dim=1, out=total[rows])
        torch.linalg.vector_norm(frac, dim=1, out=root[rows])
        out.copy_(y.add_(u, alpha=2.0**-16))
    var = total.sub_(root.square_())  # Σ f − Σ f² = Σ f(1 − f)
    return torch.where(energy > 0, step * energy / (energy + var), step)


def _stochastic_sign(
    xp: torch.Tensor, d: int, block: int, gen: np.random.SFC64, codes: torch.Tensor
) -> torch.Tensor:
    """Each block's entries to ``±s``, ``s = max|block|``, negative with probability
    ``(1 − x/s)/2`` (unbiased), into bool ``codes`` (True = negative): ``u − 1/2 < −x/(2s)``.
    Returns the scales shrunk by ``1/(1 + ω_b) = ‖x_b‖²/(count·s²)``, i.e. ``‖x_b‖²/(count·s)``
    (0 for a zero block; NaN stays NaN)."""
    top, norm = _row_stats(xp, d, block)
    safe = torch.where(top > 0, top, 1.0)
    slope = safe.reciprocal().mul_(-(2.0**15))[:, None]  # −x/(2s) in units of 2^-16
    count = torch.full_like(top, block)
    count[-1:] = d - (len(top) - 1) * block
    for (rows, A, u, _, t), out in _chunks(xp, d, block, codes):
        _fill_draws(gen, u, -0.5)
        np.less(u.numpy(), torch.mul(A, slope[rows], out=t).numpy(), out=out.numpy())
    return torch.where(top > 0, norm.square_() / (count * safe), top)


def _chunks(
    xp: torch.Tensor, d: int, block: int, codes: torch.Tensor
) -> Iterator[tuple[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``((rows, A, u, y, t), out)`` for the chunks of at most :data:`STOCHASTIC_CHUNK` entries of
    the blocks of ``xp`` and ``codes``: ``u, y, t`` are views of three scratch buffers shaped like
    ``A`` and reused by every chunk (fresh large temporaries cost a page fault per 4 KiB, several
    times the arithmetic)."""
    most = max(1, STOCHASTIC_CHUNK // block)
    scratch = torch.empty(3, min(xp.numel(), most * block))
    for (rows, A, _), (_, out, _) in zip(
        quant_pieces(xp, d, block, most), quant_pieces(codes, d, block, most), strict=True
    ):
        u, y, t = (buf[: A.numel()].view(A.shape) for buf in scratch)
        yield (rows, A, u, y, t), out


def _stochastic_codes(
    xp: torch.Tensor, d: int, bits: int, block: int, seed: int, scales: torch.Tensor
) -> torch.Tensor:
    """The packed stochastic codes of :func:`blockq_encode`, scales into ``scales``. The draws are
    consumed in order, so they are those of :func:`uniform16` ``(padded_length(d), seed)`` whatever
    the chunking and whichever path (compiled or torch) runs."""
    n = xp.numel()
    gen = np.random.SFC64(seed & SEED_MASK)
    lib = native.library() if block <= native.MAX_BLOCK else None
    if lib is not None:  # the same codes in one compiled pass per block (demuon/transport/_blockq.c)
        state = np.array(gen.state["state"]["state"], dtype=np.uint64)  # kept alive: C advances it
        src, words = (xp.data_ptr(), n), state.ctypes.data
        if bits == 1:
            signs = torch.empty(n, dtype=torch.bool)
            rc = lib.demuon_stochastic_sign(*src, d, block, words, signs.data_ptr(), scales.data_ptr())
            packed = pack_bits(signs)
        else:
            packed = torch.empty(n * bits // 8, dtype=torch.uint8)
            rc = lib.demuon_stochastic_grid(
                *src, block, quant_levels(bits), words, packed.data_ptr(), scales.data_ptr()
            )
        if rc != 0:
            raise RuntimeError(f"the compiled block quantization refused bits={bits} block={block} ({rc})")
        return packed
    if bits == 1:
        signs = torch.empty(n, dtype=torch.bool)
        scales.copy_(_stochastic_sign(xp, d, block, gen, signs))
        return pack_bits(signs)
    codes = torch.empty(n, dtype=torch.int8)
    scales.copy_(_stochastic_grid(xp, d, bits, block, gen, codes))
    return pack_codes(codes.sub_(quant_levels(bits) + 1), bits)


def blockq_encode(
    x: torch.Tensor, bits: int, block: int, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block quantization of a flat contiguous float32 CPU tensor ``x`` (not modified): blocks of
    ``block`` entries (a multiple of 8; the last one partial), each with a float32 scale, codes
    packed ``8/bits`` to a byte (:func:`pack_codes`, :func:`pack_bits`). ``seed`` None rounds to
    nearest; otherwise stochastic rounding with the :func:`uniform16` draws of ``seed``, in order.
    Returns ``(packed, scales)``: uint8 of ``padded_length(d)·bits/8`` bytes and float32 of
    ``⌈d/block⌉``. For ``bits`` ≥ 2 the scale is the grid step (decode: ``code·step``), for 1 bit
    the magnitude (``±scale``)."""
    d = x.numel()
    n = padded_length(d)
    xp = x if n == d else torch.cat((x, x.new_zeros(n - d)))
    scales = torch.empty(-(-d // block), dtype=torch.float32)
    if seed is not None:
        return _stochastic_codes(xp, d, bits, block, seed, scales), scales
    codes = torch.empty(n, dtype=torch.bool if bits == 1 else torch.int8)
    for (rows, A, count), (_, out, _) in zip(
        quant_pieces(xp, d, block), quant_pieces(codes, d, block), strict=True
    ):
        scales[rows] = (
            _sign_bits(A, count, out.numpy()) if bits == 1 else _grid_codes(A, quant_levels(bits), out)
        )
    return (pack_bits(codes) if bits == 1 else pack_codes(codes, bits)), scales


def blockq_decode(packed: torch.Tensor, scales: torch.Tensor, bits: int, block: int, d: int) -> torch.Tensor:
    """Float32 vector of ``d`` entries from :func:`blockq_encode`'s buffers (sizes checked by the
    caller): ``code·step`` per block for ``bits`` ≥ 2, ``±scale`` for 1 bit. Elementwise only."""
    n = padded_length(d)
    if bits == 1:
        out = unpack_bits(packed, n).to(torch.float32)  # 1 = negative
        for rows, A, _ in quant_pieces(out, d, block):
            s = scales[rows, None]
            A.mul_(-2.0 * s).add_(s)
    else:
        out = unpack_codes(packed, bits).to(torch.float32)
        for rows, A, _ in quant_pieces(out, d, block):
            A.mul_(scales[rows, None])
    return out if n == d else out[:d]
