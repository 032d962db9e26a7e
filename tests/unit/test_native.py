"""The compiled stochastic block quantization (demuon/transport/_blockq.c): the same draws as
NumPy's SFC64, the torch path's codes bit for bit, and the torch path whenever it cannot build."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from demuon.transport import kernels, native
from demuon.transport.codecs import BlockQuant


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A process-wide decision made again under the test's environment, and restored after."""
    monkeypatch.setenv("DEMUON_NATIVE_DIR", str(tmp_path / "native"))
    native.reset()
    yield monkeypatch
    native.reset()


def encode_both(x: torch.Tensor, bits: int, block: int, seed: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """``blockq_encode`` on the native path and on the torch path."""
    lib = native.library()
    assert lib is not None, native.status()
    fast = kernels.blockq_encode(x, bits, block, seed)
    native._state["lib"] = None  # the torch path, for this comparison only
    try:
        slow = kernels.blockq_encode(x, bits, block, seed)
    finally:
        native._state["lib"] = lib
    return fast, slow


def test_the_native_stream_is_numpys_sfc64() -> None:
    lib = native.library()
    assert lib is not None, native.status()
    for seed in (0, 7, 2**63 + 5):
        state = np.array(np.random.SFC64(seed).state["state"]["state"], dtype=np.uint64)
        out = np.empty(1000, dtype=np.uint64)
        lib.demuon_sfc64_fill(state.ctypes.data, out.ctypes.data, out.size)
        assert np.array_equal(out, np.random.SFC64(seed).random_raw(1000))


@pytest.mark.parametrize("bits", [4, 2, 1])
@pytest.mark.parametrize("block", [8, 16, 256])
def test_native_codes_equal_the_torch_paths_bit_for_bit(bits: int, block: int) -> None:
    gen = torch.Generator().manual_seed(block + bits)
    scaled = torch.randn(4099, generator=gen) * torch.logspace(-6, 6, 4099)  # a partial last block
    ties = torch.randint(-9, 10, (203,), generator=gen).float() / 4  # exact grid points, zero blocks
    specials = torch.randn(64, generator=gen)
    specials[3], specials[40] = float("nan"), float("inf")
    for x in (scaled, ties, torch.zeros(24), specials):
        for seed in (0, 2**63 + 5):
            (fast_codes, fast_scales), (slow_codes, slow_scales) = encode_both(x, bits, block, seed)
            assert torch.equal(fast_codes, slow_codes)
            finite = torch.isfinite(slow_scales)
            assert torch.equal(finite, torch.isfinite(fast_scales))
            assert fast_scales[finite].tolist() == pytest.approx(
                slow_scales[finite].tolist(), rel=2e-6, abs=0
            )


def test_blocks_larger_than_the_compiled_path_takes_use_the_torch_path(fresh: pytest.MonkeyPatch) -> None:
    x = torch.randn(3 * native.MAX_BLOCK)
    big = 2 * native.MAX_BLOCK
    assert native.library() is not None, native.status()
    compiled_process = kernels.blockq_encode(x, 4, big, 1)  # would raise if C were handed the block
    fresh.setenv("DEMUON_NATIVE", "0")
    native.reset()
    torch_only = kernels.blockq_encode(x, 4, big, 1)
    assert all(torch.equal(a, b) for a, b in zip(compiled_process, torch_only, strict=True))


def test_decoding_a_native_payload_equals_decoding_the_torch_one() -> None:
    x = torch.randn(40, 24)
    _, (slow, slow_scales) = encode_both(x.reshape(-1), 4, 16, 3)
    codec = BlockQuant(4, 16, stochastic=True)
    back = codec.decode(codec.encode(x, seed=3), (40, 24), torch.float32)
    assert torch.allclose(
        back.reshape(-1), kernels.blockq_decode(slow, slow_scales, 4, 16, x.numel()), rtol=2e-6
    )


def test_native_off_or_unbuildable_falls_back_to_the_torch_path_and_says_why(
    fresh: pytest.MonkeyPatch,
) -> None:
    x = torch.randn(1000)
    fresh.setenv("DEMUON_NATIVE", "0")
    assert native.library() is None and "DEMUON_NATIVE=0" in native.status()
    off = kernels.blockq_encode(x, 4, 256, 9)
    fresh.delenv("DEMUON_NATIVE")
    fresh.setenv("CC", "no-such-compiler-here")
    native.reset()
    assert native.library() is None and "no-such-compiler-here" in native.status()
    assert all(torch.equal(a, b) for a, b in zip(off, kernels.blockq_encode(x, 4, 256, 9), strict=True))
    fresh.setenv("CC", "false")  # a compiler that fails
    native.reset()
    assert native.library() is None and "exited 1" in native.status()
    assert not list((Path(str(native.cache_dir()))).glob("*.so*"))  # nothing half-written is left


def test_the_library_is_built_once_into_the_cache_named_by_the_source(fresh: pytest.MonkeyPatch) -> None:
    lib = native.library()
    assert isinstance(lib, ctypes.CDLL), native.status()
    built = list(native.cache_dir().glob("blockq-*.so"))
    assert len(built) == 1 and str(built[0]) in native.status()
    before = built[0].stat().st_mtime_ns
    native.reset()
    assert native.library() is not None and built[0].stat().st_mtime_ns == before  # reused, not rebuilt
