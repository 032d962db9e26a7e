"""Codecs: determinism, buffer layouts, and each compressor's α / ω (docs/algorithms.md §7, §9
item 19)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from demuon import config
from demuon.transport import kernels
from demuon.transport.codecs import (
    Cast,
    Codec,
    Encoded,
    Identity,
    Int8,
    Natural,
    RandK,
    RankK,
    TopK,
    keep_count,
    make_codec,
)
from demuon.transport.wire_errors import BadMeta, BadPayload

CODECS: list[Codec] = [
    Identity(),
    Cast(torch.bfloat16),
    Cast(torch.float16),
    TopK(0.1),
    TopK(0.01),
    RandK(0.25),
    RankK(3, 2),
    RankK(2, 0),
    Natural(),
    Int8(),
    Int8(per_row=True),
    Int8(deflate=True),
    Int8(per_row=True, deflate=True),
]
SHAPES = [(), (0,), (1,), (7,), (5, 6), (3, 4, 5), (0, 3), (40, 24)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32)


def vectors(min_size: int = 1, max_size: int = 300) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(FINITE, min_size=min_size, max_size=max_size).map(
        lambda v: torch.tensor(v, dtype=torch.float32)
    )


def roundtrip(codec: Codec, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return codec.decode(codec.encode(x, seed=seed), tuple(x.shape), x.dtype)


# ------------------------------------------------------------------------- every codec


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_codec_returns_the_buffers_it_promises_for_every_shape(
    codec: Codec, dtype: torch.dtype
) -> None:
    for shape in SHAPES:
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        enc = codec.encode(x, seed=11)
        assert enc.logical() == (shape, dtype)
        layout = [(b.dtype, tuple(b.shape)) for b in enc.buffers]
        assert layout == codec.expected_buffers(shape, dtype, enc.meta)
        assert all(b.is_contiguous() and b.device.type == "cpu" for b in enc.buffers)
        y = codec.decode(enc, shape, dtype)
        assert (tuple(y.shape), y.dtype, y.device.type) == (shape, dtype, "cpu")


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_encode_is_a_function_of_the_seed_and_decode_is_deterministic(codec: Codec) -> None:
    x = torch.randn(40, 24)
    first, again = codec.encode(x, seed=5), codec.encode(x.clone(), seed=5)
    assert first.meta == again.meta
    assert all(torch.equal(a, b) for a, b in zip(first.buffers, again.buffers, strict=True))
    assert torch.equal(codec.decode(first, (40, 24), x.dtype), codec.decode(again, (40, 24), x.dtype))


@pytest.mark.parametrize("codec", [c for c in CODECS if not isinstance(c, Identity)], ids=repr)
def test_buffers_and_decoded_tensors_never_share_memory_with_the_input(codec: Codec) -> None:
    x = torch.randn(40, 24)
    enc = codec.encode(x, seed=1)
    before = [b.clone() for b in enc.buffers]
    y = codec.decode(enc, (40, 24), torch.float32)
    x.add_(100.0)
    y.add_(100.0)
    assert all(torch.equal(a, b) for a, b in zip(before, enc.buffers, strict=True))


def test_identity_is_zero_copy_for_contiguous_cpu_tensors_and_copies_otherwise() -> None:
    x = torch.randn(40, 24)
    enc = Identity().encode(x, seed=0)
    assert enc.buffers[0].data_ptr() == x.data_ptr()
    assert Identity().decode(enc, (40, 24), torch.float32).data_ptr() == x.data_ptr()
    strided = Identity().encode(x.T, seed=0).buffers[0]
    assert strided.is_contiguous() and strided.data_ptr() != x.data_ptr()
    assert torch.equal(strided, x.T)
    widened = Identity().decode(Identity().encode(x.bfloat16(), seed=0), (40, 24), torch.float32)
    assert torch.equal(widened, x.bfloat16().float())


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (config.IdentityCodec(), Identity()),
        (config.CastCodec(dtype="float16"), Cast(torch.float16)),
        (config.TopKCodec(ratio=0.05), TopK(0.05)),
        (config.RandKCodec(ratio=0.2), RandK(0.2)),
        (config.RankKCodec(rank=8, power_iters=1), RankK(8, 1)),
        (config.NaturalCodec(), Natural()),
        (config.Int8Codec(per_row=True), Int8(per_row=True)),
        (config.Int8Codec(deflate=True), Int8(deflate=True)),
    ],
)
def test_make_codec_builds_the_codec_the_config_names(cfg: config.CodecConfig, expected: Codec) -> None:
    codec = make_codec(cfg)
    assert codec == expected
    assert codec.kind == cfg.kind
    assert isinstance(codec, Codec)


def test_identity_and_cast_round_trip_within_their_precision() -> None:
    x = torch.randn(1000).sign() * torch.logspace(-3, 3, 1000)  # inside float16's normal range
    assert torch.equal(roundtrip(Identity(), x), x)
    for codec, roundoff in ((Cast(torch.bfloat16), 2.0**-8), (Cast(torch.float16), 2.0**-11)):
        y = roundtrip(codec, x)
        assert torch.all((y - x).abs() <= roundoff * x.abs())
        assert codec.alpha is not None
        assert (y - x).square().sum() <= (1 - codec.alpha) * x.square().sum()


# --------------------------------------------------------------------------------- top-k


@settings(max_examples=60, deadline=None)
@given(x=vectors(), ratio=st.floats(0.001, 1.0))
def test_topk_contracts_by_k_over_d(x: torch.Tensor, ratio: float) -> None:
    d, k = x.numel(), keep_count(ratio, x.numel())
    y = roundtrip(TopK(ratio), x)
    assert int((y != 0).sum()) <= k
    assert float((y - x).square().sum()) <= (1 - k / d) * float(x.square().sum()) * (1 + 1e-6) + 1e-30


def test_topk_keeps_exactly_the_largest_magnitudes() -> None:
    x = torch.randn(500)
    y = roundtrip(TopK(0.1), x)
    kept = y != 0
    assert int(kept.sum()) == 50
    assert torch.equal(y[kept], x[kept])
    assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-5, 5), min_size=1, max_size=200), ratio=st.floats(0.001, 1.0))
def test_topk_keeps_the_largest_magnitudes_even_with_ties(values: list[int], ratio: float) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    enc = TopK(ratio).encode(x, seed=0)
    values_kept, idx = enc.buffers
    assert idx.numel() == keep_count(ratio, x.numel()) == enc.meta["k"]
    assert torch.unique(idx).numel() == idx.numel()
    assert torch.equal(values_kept.abs().sort(descending=True).values, x.abs().topk(idx.numel()).values)


def test_topk_keeps_non_finite_entries() -> None:
    x = torch.tensor([1.0, float("nan"), -2.0, float("-inf"), 0.5])
    assert sorted(TopK(0.4).encode(x, seed=0).buffers[1].tolist()) == [1, 3]


def topk_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The documented selection: largest |x| first (NaN as +inf), ties to the lowest index."""
    magnitude = x.abs().nan_to_num(nan=math.inf)
    return magnitude.sort(descending=True, stable=True).indices[:k].sort().values


def misleading_inputs(d: int) -> list[torch.Tensor]:
    """Inputs whose strided sample misjudges the threshold (both ways), ties, and NaN / ±inf."""
    gen = torch.Generator().manual_seed(3)
    sampled_big = torch.randn(d, generator=gen)
    sampled_big[:: d // kernels.TOPK_SAMPLE] = 100.0  # few candidates: the fallback
    sampled_small = 1.0 + torch.rand(d, generator=gen)
    sampled_small[:: d // kernels.TOPK_SAMPLE] = 0.0  # too many above the high threshold
    special = torch.randn(d, generator=gen)
    special[torch.randint(d, (300,), generator=gen)] = float("nan")
    special[torch.randint(d, (300,), generator=gen)] = float("-inf")
    ties = torch.randint(-6, 7, (d,), generator=gen).float()  # heavy ties at the boundary
    other_dtypes = [torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d).bfloat16()]
    plain, zeros = torch.randn(d, generator=gen), torch.zeros(d)
    return [plain, ties, zeros, sampled_big, sampled_small, special, *other_dtypes]


@pytest.mark.parametrize("d", [1 << 16, 1 << 18, 300_001])
@pytest.mark.parametrize("ratio", [0.0001, 0.01, 0.1, 0.5])
def test_threshold_topk_selects_exactly_the_reference_set(d: int, ratio: float) -> None:
    k = keep_count(ratio, d)
    for x in misleading_inputs(d):
        idx = kernels.topk_indices(x, k)
        assert torch.equal(idx, topk_reference(x, k))
        assert torch.equal(idx, kernels.topk_indices(x.clone(), k))  # deterministic


def test_threshold_topk_agrees_with_torch_topk_on_distinct_values() -> None:
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(8))
    for k in (1, 1000, 104_858, 500_000):
        expected = x.abs().topk(k, sorted=False).indices.sort().values
        assert torch.equal(kernels.topk_indices(x, k), expected)
    first, again = TopK(0.1).encode(x, seed=0), TopK(0.1).encode(x.clone(), seed=9)
    assert all(torch.equal(a, b) for a, b in zip(first.buffers, again.buffers, strict=True))
    assert bool((first.buffers[1][1:] > first.buffers[1][:-1]).all())  # ascending indices


def test_keep_count_rounds_and_never_drops_everything() -> None:
    assert [keep_count(0.1, d) for d in (0, 1, 4, 10, 26, 1000)] == [0, 1, 1, 1, 3, 100]


def test_topk_decode_rejects_indices_outside_the_tensor() -> None:
    bad = Encoded((torch.ones(2), torch.tensor([0, 9], dtype=torch.int32)), {"k": 2}, (9,), torch.float32)
    with pytest.raises(BadPayload):
        TopK(0.2).decode(bad, (9,), torch.float32)


# -------------------------------------------------------------------------------- rand-k


def test_randk_regenerates_its_indices_from_the_seed_in_meta() -> None:
    x = torch.randn(1000)
    enc = RandK(0.1).encode(x, seed=2**64 + 7)
    assert enc.meta == {"k": 100, "seed": 7}
    idx = kernels.randk_indices(1000, 100, 7)
    assert len(set(idx.tolist())) == 100
    assert torch.equal(enc.buffers[0], x[idx])
    y = RandK(0.1).decode(enc, (1000,), torch.float32)
    assert torch.equal(y[idx], x[idx]) and int((y != 0).sum()) == 100
    other = RandK(0.1).encode(x, seed=8)
    assert not torch.equal(other.buffers[0], enc.buffers[0])


@pytest.mark.parametrize(("d", "k"), [(50, 5), (20, 12)])
def test_randk_indices_are_distinct_sorted_and_uniform(d: int, k: int) -> None:
    counts = torch.zeros(d)
    for seed in range(4000):
        idx = kernels.randk_indices(d, k, seed)
        assert idx.numel() == k and torch.equal(idx, torch.unique(idx))
        counts[idx] += 1
    expected = 4000 * k / d
    assert torch.all((counts - expected).abs() <= 5 * math.sqrt(expected))


def test_randk_contracts_by_k_over_d_in_expectation() -> None:
    x = torch.randn(200, dtype=torch.float64)
    errors = [float((roundtrip(RandK(0.25), x, seed) - x).square().sum()) for seed in range(400)]
    expected = 0.75 * float(x.square().sum())
    assert sum(errors) / len(errors) == pytest.approx(expected, rel=0.03)


# -------------------------------------------------------------------------------- rank-k


def svd_tail(X: torch.Tensor, r: int) -> float:
    return float(torch.linalg.svdvals(X.double())[r:].square().sum())


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 40), rank=st.integers(1, 6), seed=st.integers(0, 2**64 - 1))
def test_rankk_error_is_the_singular_value_tail_when_the_sketch_covers_the_matrix(
    m: int, n: int, rank: int, seed: int
) -> None:
    X = torch.randn(m, n, dtype=torch.float64)  # min(m, n) ≤ 9 ≤ r + OVERSAMPLE: an exact SVD
    X = X.T if n % 2 else X
    r = min(rank, m, n)
    Y = roundtrip(RankK(rank, power_iters=0), X, seed)
    assert torch.linalg.matrix_rank(Y) <= r
    err = float((Y - X).square().sum())
    assert err == pytest.approx(svd_tail(X, r), rel=1e-9, abs=1e-9)
    assert err <= (1 - r / min(m, n)) * float(X.square().sum()) + 1e-9


def test_rankk_with_power_iterations_is_close_to_the_truncated_svd() -> None:
    X = torch.randn(120, 8) @ torch.randn(8, 90) + 0.05 * torch.randn(120, 90)
    err = float((roundtrip(RankK(4, power_iters=2), X, 3) - X).square().sum())
    assert 0.9999 * svd_tail(X, 4) <= err <= 1.05 * svd_tail(X, 4)


def test_rankk_reshapes_higher_rank_tensors_and_sends_vectors_as_they_are() -> None:
    kernel = torch.randn(6, 3, 2, 2)
    enc = RankK(2).encode(kernel, seed=0)
    assert [tuple(b.shape) for b in enc.buffers] == [(6, 2), (12, 2)]
    v = torch.randn(9)
    assert torch.equal(roundtrip(RankK(2), v), v)


def test_rankk_decode_is_the_fixed_order_sum_of_outer_products() -> None:
    P, Q = torch.randn(30, 4), torch.randn(20, 4)
    assert torch.allclose(kernels.outer_sum(P, Q), P @ Q.T, atol=1e-5)


# ------------------------------------------------------------------------------- natural


def natural_reference(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Slow float64 natural compression with the same random draws as the fast path."""
    u = kernels.random_bits23(x.numel(), seed).double() / 2**23
    t = x.double()
    mantissa, exponent = torch.frexp(t.abs())  # |t| = f·2^e, f ∈ [0.5, 1)
    low = torch.ldexp(torch.ones_like(t), exponent - 1)  # 2^a ≤ |t| < 2^(a+1)
    p_up = 2 * mantissa - 1  # (|t| − 2^a) / 2^a
    tiny = t.abs() < 2.0**-126  # subnormals round between 0 and 2^-126
    low = torch.where(tiny, torch.zeros_like(t), low)
    p_up = torch.where(tiny, t.abs() / 2.0**-126, p_up)
    up = u >= 1 - p_up
    magnitude = torch.where(up, torch.where(tiny, torch.full_like(t, 2.0**-126), 2 * low), low)
    return (torch.sign(t) * magnitude).float()


def test_natural_fast_path_equals_the_float64_reference_bit_for_bit() -> None:
    x = torch.cat([torch.randn(5000) * torch.logspace(-30, 30, 5000), torch.tensor([0.0, 1e-40, -3e-42])])
    for seed in (0, 1, 2**63 + 5):
        assert torch.equal(roundtrip(Natural(), x, seed), natural_reference(x, seed))


@settings(max_examples=40, deadline=None)
@given(x=vectors(), seed=st.integers(0, 2**64 - 1))
def test_natural_outputs_signed_powers_of_two_bracketing_the_input(x: torch.Tensor, seed: int) -> None:
    y = roundtrip(Natural(), x, seed)
    nonzero = y != 0
    mantissa, _ = torch.frexp(y[nonzero])
    assert torch.all(mantissa.abs() == 0.5)
    assert torch.equal(nonzero, x != 0)
    assert torch.all(torch.sign(y) == torch.sign(x))
    ratio = (y[nonzero] / x[nonzero]).double()
    assert torch.all((ratio > 0.5) & (ratio <= 2.0))


def repeated_draws(codec: Codec, x: torch.Tensor, copies: int, seed: int = 0) -> torch.Tensor:
    """``copies`` independent draws of ``codec`` on ``x`` (one encode of a tiled tensor), float64."""
    tiled = x.expand(copies, *x.shape).contiguous()
    return roundtrip(codec, tiled, seed).double()


def test_natural_is_unbiased_with_second_moment_at_most_nine_eighths() -> None:
    base = torch.tensor([1.0, 4 / 3, 1.5, 1.9, 3.0, 0.3, 1e-3, 1e-30])
    t = torch.cat([base, -base]).double()
    draws = repeated_draws(Natural(), t.float(), 100_000)
    assert torch.allclose(draws.mean(0), t, rtol=0.01)
    second = draws.square().mean(0) / t.square()
    assert torch.all(second <= 9 / 8 + 0.01)
    assert second[1].item() == pytest.approx(9 / 8, abs=0.01)  # equality at |t| = (4/3)·2^a
    assert float((draws - t).square().sum(1).mean()) <= (1 / 8) * float(t.square().sum()) * 1.01


def test_natural_rounds_subnormals_unbiasedly_to_zero_or_the_smallest_normal() -> None:
    t = torch.tensor([1e-39, -3e-40, 2.0**-130])
    draws = repeated_draws(Natural(), t, 100_000)
    assert set(torch.unique(draws.abs()).tolist()) <= {0.0, 2.0**-126}
    assert torch.allclose(draws.mean(0), t.double(), rtol=0.06)


def test_natural_keeps_zeros_and_bfloat16_powers_of_two_and_flags_non_finite_values() -> None:
    x = torch.tensor([0.0, -0.0, 1.0, -0.5, 2.0**-126, float("inf"), float("-inf"), float("nan"), 3e38])
    y = roundtrip(Natural(), x, 4)
    assert torch.equal(y[:5], x[:5])
    assert torch.equal(y[5:7], x[5:7]) and torch.isinf(y[7]) and torch.isinf(y[8]) | (y[8] == 2.0**127)
    powers = torch.tensor([0.25, -8.0, 1.0], dtype=torch.bfloat16)
    assert torch.equal(roundtrip(Natural(), powers), powers)


def test_natural_payload_is_nine_bits_per_entry() -> None:
    enc = Natural().encode(torch.randn(1001), seed=0)
    assert enc.nbytes == 1001 + 126


# ---------------------------------------------------------------------------------- int8


@pytest.mark.parametrize("per_row", [False, True])
def test_int8_is_unbiased_on_its_grid(per_row: bool) -> None:
    x = torch.randn(4, 16) * torch.tensor([[1.0], [10.0], [0.01], [0.0]])
    codec = Int8(per_row=per_row)
    enc = codec.encode(x, seed=0)
    q, scale = enc.buffers
    assert int(q.abs().max()) <= 127
    assert scale.shape == ((4,) if per_row else (1,))
    draws = torch.stack([roundtrip(codec, x, seed).double() for seed in range(2000)])
    step = (scale[:, None] if per_row else scale).double().expand(4, 16)
    assert torch.all((draws.mean(0) - x.double()).abs() <= 0.06 * step + 1e-12)  # ≥ 5σ
    assert torch.all(draws[:, 3] == 0)


def test_int8_single_draw_is_within_one_step() -> None:
    x = torch.randn(300)
    y = roundtrip(Int8(), x, 9)
    assert float((y - x).abs().max()) <= float(x.abs().max()) / 127 * (1 + 1e-6)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_deflated_int8_decodes_to_exactly_the_int8_values(per_row: bool, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    plain, packed = Int8(per_row=per_row), Int8(per_row=per_row, deflate=True)
    for seed in (0, 7):
        enc = packed.encode(x, seed=seed)
        assert torch.equal(roundtrip(plain, x, seed), packed.decode(enc, shape, x.dtype))
        assert enc.meta == {"n": enc.buffers[0].numel()} and enc.buffers[0].dtype == torch.uint8
        assert enc.buffers[0].numel() <= kernels.deflate_bound(x.numel())


def test_deflate_shrinks_codes_that_crowd_near_zero_and_is_lossless_on_any_bytes() -> None:
    gen = torch.Generator().manual_seed(3)
    heavy = torch.randn(64, 256, generator=gen) * torch.rand(64, 1, generator=gen).pow(
        4
    )  # rows of mixed scale
    plain, packed = Int8().encode(heavy, seed=1), Int8(deflate=True).encode(heavy, seed=1)
    assert packed.nbytes < 0.7 * plain.nbytes
    noise = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=gen)  # incompressible
    squeezed = kernels.deflate(noise)
    assert noise.numel() < squeezed.numel() <= kernels.deflate_bound(noise.numel())
    back = kernels.inflate(squeezed, noise.numel())
    assert back is not None and torch.equal(back, noise)


def test_a_deflated_payload_that_does_not_inflate_to_the_tensor_is_rejected() -> None:
    codec, x = Int8(deflate=True), torch.randn(40, 24)
    enc = codec.encode(x, seed=2)
    packed, scale = enc.buffers
    longer = kernels.deflate(torch.zeros(x.numel() + 1, dtype=torch.uint8))
    shorter = kernels.deflate(torch.zeros(x.numel() - 1, dtype=torch.uint8))
    bad = {
        "truncated": packed[:-3],
        "trailing bytes": torch.cat((packed, torch.tensor([1, 2], dtype=torch.uint8))),
        "one byte too many": longer,
        "one byte too few": shorter,
        "not deflate": torch.full((50,), 255, dtype=torch.uint8),
    }
    for what, payload in bad.items():
        with pytest.raises(BadPayload, match="inflate") as info:
            codec.decode(
                Encoded((payload, scale), {"n": payload.numel()}, (40, 24), torch.float32),
                (40, 24),
                torch.float32,
            )
        assert info.value.expected == x.numel(), what


# --------------------------------------------------------------------------- meta checks


@pytest.mark.parametrize(
    ("codec", "shape", "meta"),
    [
        (TopK(0.1), (10,), {"k": 11}),
        (TopK(0.1), (10,), {"k": -1}),
        (TopK(0.1), (10,), {"k": True}),
        (TopK(0.1), (10,), {"k": 1.0}),
        (TopK(0.1), (10,), {}),
        (TopK(0.1), (10,), {"k": 1, "extra": 0}),
        (RandK(0.1), (10,), {"k": 1, "seed": 2**64}),
        (RandK(0.1), (10,), {"k": 1, "seed": "7"}),
        (RankK(4), (10, 3), {"rank": 4}),
        (RankK(2), (10, 10), {"rank": 3}),
        (RankK(2), (10,), {"rank": 1}),
        (Identity(), (3,), {"k": 1}),
        (Natural(), (3,), {"seed": 1}),
        (Int8(deflate=True), (10,), {}),
        (Int8(deflate=True), (10,), {"n": -1}),
        (Int8(deflate=True), (10,), {"n": kernels.deflate_bound(10) + 1}),
        (Int8(), (10,), {"n": 4}),
    ],
)
def test_expected_buffers_rejects_bad_meta(
    codec: Codec, shape: tuple[int, ...], meta: dict[str, int | float | str]
) -> None:
    with pytest.raises(BadMeta) as info:
        codec.expected_buffers(shape, torch.float32, meta)
    assert info.value.kind == "meta"


def test_alpha_and_omega_are_the_documented_constants() -> None:
    assert (Identity().alpha, Identity().omega) == (1.0, 0.0)
    assert (TopK(0.1).alpha, TopK(0.1).omega) == (0.1, None)
    assert RandK(0.25).alpha == 0.25 and RandK(0.25).omega == pytest.approx(3.0)
    assert (Natural().alpha, Natural().omega) == (7 / 8, 1 / 8)
    assert math.isclose(Cast(torch.bfloat16).alpha or 0, 1 - 2.0**-16)
