"""Newton–Schulz (NS5) against the numbers of docs/algorithms.md §9 items 1–8, and the exact polar
factor."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from demuon.node.newton_schulz import NS5_MAX_SINGULAR, NS_COEFFS, newton_schulz, polar_svd

FP32_BAND = (0.6818, 1.1344)  # docs/algorithms.md §9 items 2–4
BAND_TOL = 1e-3  # fp32 rounding around the exact band edges 0.68183 / 1.13436
BF16_BAND = (0.66, 1.16)  # docs/algorithms.md §9 item 5: the safe bf16 tolerance (observed ≈[0.6745, 1.141])
# docs/algorithms.md §9 item 4's shapes; 768×3072 takes ~1.5 s per dtype on one core (NS5 plus a
# float64 SVD; bf16 through Float32Gemm below), kept.
NON_SQUARE_SHAPES = [(128, 512), (512, 128), (50, 2000), (768, 3072)]
MATMULS = {torch.Tensor.__matmul__, torch.Tensor.matmul, torch.matmul}


class Float32Gemm(TorchFunctionMode):
    """Every bf16 × bf16 matrix product computed as a bf16 GEMM computes it (exact products, float32
    accumulation, one rounding of the result to bf16), through the float32 kernel.

    CPUs without AVX512-BF16 or AMX have no fast bf16 GEMM: torch falls back to a generic loop,
    ~25 s for NS5 of one 768×3072 matrix against ~0.5 s this way. Everything else in
    ``newton_schulz`` (casts, normalisation, the elementwise bf16 arithmetic) runs unchanged; only
    the summation order inside a product may differ from the native kernel's (see
    ``test_bf16_products_through_float32_match_the_native_bf16_kernel``)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in MATMULS and all(
            isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args[:2]
        ):
            return torch.matmul(args[0].float(), args[1].float()).bfloat16()
        return func(*args, **kwargs)


def bf16_newton_schulz(G: torch.Tensor) -> torch.Tensor:
    """``newton_schulz(G, dtype=torch.bfloat16)`` with its products through :class:`Float32Gemm`."""
    with Float32Gemm():
        return newton_schulz(G, dtype=torch.bfloat16)


def scalar_map(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def singular_values(A: torch.Tensor) -> torch.Tensor:
    values: torch.Tensor = torch.linalg.svdvals(A.to(torch.float64))
    return values


def test_coefficients_give_slope_3_4445_at_zero_and_0_701_at_one() -> None:
    a, b, c = NS_COEFFS
    assert NS_COEFFS == (3.4445, -4.7750, 2.0315)
    assert a + b + c == pytest.approx(0.7010, abs=1e-12)  # p(1)
    assert a == pytest.approx(3.4445)  # p'(0) = a


def test_iterated_scalar_map_settles_in_the_fixed_band() -> None:
    x = torch.logspace(-3, 0, 20001, dtype=torch.float64)
    for steps in (7, 10, 30):
        y = scalar_map(x, steps)
        assert FP32_BAND[0] <= y.min().item() < FP32_BAND[0] + 1e-4
        assert FP32_BAND[1] - 1e-4 < y.max().item() <= FP32_BAND[1]


def test_five_steps_reach_the_band_above_0_0052_and_never_exceed_1_2024() -> None:
    x = torch.logspace(-7, 0, 200001, dtype=torch.float64)
    y = scalar_map(x, 5)
    above = y[x >= 0.0052]
    assert FP32_BAND[0] <= above.min().item() and above.max().item() <= FP32_BAND[1]
    assert 1.2 < y.max().item() <= NS5_MAX_SINGULAR
    overshoot = y[(x >= 0.0032) & (x <= 0.0052)]
    assert overshoot.max().item() > FP32_BAND[1] + 0.05
    assert y[x < 0.0015].max().item() < 0.68


@pytest.mark.parametrize("shape", NON_SQUARE_SHAPES)
def test_gaussian_non_square_matrices_land_in_the_fp32_band(shape: tuple[int, int]) -> None:
    s = singular_values(newton_schulz(torch.randn(*shape)))
    assert FP32_BAND[0] - BAND_TOL <= s.min().item()
    assert s.max().item() <= FP32_BAND[1] + BAND_TOL


@pytest.mark.parametrize("shape", NON_SQUARE_SHAPES)
def test_gaussian_non_square_matrices_land_in_the_bf16_band(shape: tuple[int, int]) -> None:
    out = bf16_newton_schulz(torch.randn(*shape))
    assert out.dtype == torch.float32
    s = singular_values(out)
    assert BF16_BAND[0] <= s.min().item() and s.max().item() <= BF16_BAND[1]


@pytest.mark.parametrize(
    "shape",
    [*NON_SQUARE_SHAPES[:-1], pytest.param(NON_SQUARE_SHAPES[-1], marks=pytest.mark.slow)],  # ~25 s on CPU
)
def test_bf16_products_through_float32_match_the_native_bf16_kernel(shape: tuple[int, int]) -> None:
    """The native bf16 kernel lands in the band too, and :class:`Float32Gemm` changes the output only
    by summation-order rounding (observed: identical, or singular values within 1e-3)."""
    G = torch.randn(*shape)
    native = newton_schulz(G, dtype=torch.bfloat16)
    s_native, s_routed = singular_values(native), singular_values(bf16_newton_schulz(G))
    assert BF16_BAND[0] <= s_native.min().item() and s_native.max().item() <= BF16_BAND[1]
    assert torch.allclose(s_routed, s_native, rtol=0.0, atol=5e-3)


@pytest.mark.parametrize("n", [64, 256])
def test_well_conditioned_inputs_stay_in_the_band_in_fp32_and_bf16(n: int) -> None:
    Q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    G = (Q1 * (1.0 + torch.rand(n, dtype=torch.float64))) @ Q2.T  # singular values uniform in [1, 2]
    s32 = singular_values(newton_schulz(G.float()))
    assert 0.68 <= s32.min().item() and s32.max().item() <= 1.135
    s16 = singular_values(newton_schulz(G.float(), dtype=torch.bfloat16))
    assert BF16_BAND[0] <= s16.min().item() and s16.max().item() <= BF16_BAND[1]


def test_orthogonal_256_input_becomes_1_0705_times_identity() -> None:
    Q, _ = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64))
    out = newton_schulz(Q.float()).double() @ Q.T  # NS5(Q) = c·Q, so NS5(Q) Qᵀ = c·I
    c = scalar_map(torch.tensor(256**-0.5, dtype=torch.float64), 5).item()
    assert c == pytest.approx(1.0705, abs=5e-5)
    assert torch.allclose(out, c * torch.eye(256, dtype=torch.float64), atol=2e-4)


def test_zero_input_gives_zero_output() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        out = newton_schulz(torch.zeros(8, 5), dtype=dtype)
        assert torch.equal(out, torch.zeros(8, 5))


def test_rank_r_input_stays_rank_r() -> None:
    r = 3
    G = torch.randn(64, r) @ torch.randn(r, 96)
    s = singular_values(newton_schulz(G))
    assert s[:r].min().item() > 0.68
    assert s[r:].max().item() < 1e-4


def test_transpose_and_positive_scaling_commute_with_ns5() -> None:
    G = torch.randn(40, 90)
    out = newton_schulz(G)
    assert torch.allclose(newton_schulz(G.T), out.T, atol=1e-5)
    assert torch.allclose(newton_schulz(37.5 * G), out, atol=1e-5)
    assert torch.allclose(newton_schulz(1e-3 * G), out, atol=1e-5)


def test_batched_input_equals_looping_over_matrices() -> None:
    G = torch.randn(5, 30, 20) * torch.tensor([1e-3, 1.0, 10.0, 0.0, 3.0]).view(5, 1, 1)
    batched = newton_schulz(G)
    for i in range(5):
        assert torch.allclose(batched[i], newton_schulz(G[i]), atol=1e-6)
    assert torch.equal(batched[3], torch.zeros(30, 20))


def test_output_keeps_the_input_dtype_and_leaves_the_input_alone() -> None:
    G = torch.randn(12, 7, dtype=torch.float64)
    before = G.clone()
    assert newton_schulz(G).dtype == torch.float64
    assert newton_schulz(G.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(G, before)
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(5))


def test_ns5_shares_singular_vectors_with_the_exact_polar_factor() -> None:
    G = torch.randn(96, 48)
    gap = torch.linalg.matrix_norm(newton_schulz(G).double() - polar_svd(G), ord=2).item()
    assert gap <= 1.0 - FP32_BAND[0] + BAND_TOL  # only the singular values differ, within the band


def test_polar_svd_is_an_exact_float64_partial_isometry() -> None:
    G = torch.randn(20, 7)
    P = polar_svd(G)
    assert P.dtype == torch.float64
    assert torch.allclose(P.T @ P, torch.eye(7, dtype=torch.float64), atol=1e-12)
    low_rank = polar_svd(torch.randn(20, 2, dtype=torch.float64) @ torch.randn(2, 7, dtype=torch.float64))
    assert torch.allclose(
        singular_values(low_rank), torch.tensor([1.0, 1.0] + [0.0] * 5).double(), atol=1e-12
    )
    assert torch.equal(polar_svd(torch.zeros(3, 4)), torch.zeros(3, 4, dtype=torch.float64))
