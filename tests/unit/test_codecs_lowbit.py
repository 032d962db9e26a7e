"""Block quantization to 4, 2 and 1 bit (``BlockQuant``, docs/algorithms.md §7): the fast path
against a float64 reference, the stated contraction factors, unbiasedness of the stochastic
rounding, the bit packing, the wire's size checks, and the error-feedback replicas it feeds."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from demuon import config
from demuon.app import simulate
from demuon.app.peers import build_peers
from demuon.config import config_from_dict
from demuon.node.observe import tracking_gap
from demuon.transport import kernels, wire
from demuon.transport.codecs import BLOCKQ_GAMMA, BlockQuant, Codec, make_codec
from demuon.transport.wire_errors import BadMeta
from tests.support.wire import context, copies, rewrite

VARIANTS = [BlockQuant(bits, 16, stochastic) for bits in (4, 2, 1) for stochastic in (False, True)]
DETERMINISTIC = [c for c in VARIANTS if not c.stochastic]
STOCHASTIC = [c for c in VARIANTS if c.stochastic]
SHAPES = [(), (0,), (1,), (7,), (8,), (5, 6), (3, 4, 5), (0, 3), (40, 24)]
FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32)
EXAMPLES = settings(max_examples=25, deadline=None)


def vectors(max_size: int = 100) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(FINITE, min_size=1, max_size=max_size).map(lambda v: torch.tensor(v, dtype=torch.float32))


def roundtrip(codec: Codec, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return codec.decode(codec.encode(x, seed=seed), tuple(x.shape), x.dtype)


# ------------------------------------------------------------------- float64 reference


def reference(codec: BlockQuant, x: torch.Tensor, seed: int) -> tuple[list[int], list[float], list[float]]:
    """Slow float64 block quantization, one block at a time: ``(codes, scales, omegas)`` with the
    same uniform draws as the fast path (codes: signed levels, 1 bit: 1 = negative; omegas: each
    block's variance ratio ω_b of the unscaled stochastic rounding, 0 when deterministic)."""
    t = x.double().reshape(-1).tolist()
    u = kernels.uniform16(kernels.padded_length(len(t)), seed).double().tolist()
    levels = kernels.quant_levels(codec.bits)
    codes: list[int] = []
    scales: list[float] = []
    omegas: list[float] = []
    for start in range(0, len(t), codec.block):
        b = t[start : start + codec.block]
        ub = u[start : start + len(b)]
        top, n = max(abs(v) for v in b), len(b)
        energy = sum(v * v for v in b)
        omega = 0.0
        if codec.bits == 1 and not codec.stochastic:
            codes += [int(math.copysign(1.0, v) < 0) for v in b]
            scale = sum(abs(v) for v in b) / n
        elif codec.bits == 1:
            codes += [int(w < (1 - v / top) / 2) if top else int(w < 0.5) for v, w in zip(b, ub, strict=True)]
            omega = n * top * top / energy - 1 if top else 0.0
            scale = energy / (n * top) if top else 0.0
        else:
            y = [v * levels / top if top else 0.0 for v in b]
            if codec.stochastic:
                codes += [max(-levels, min(levels, math.floor(v + w))) for v, w in zip(y, ub, strict=True)]
                var = sum((v - math.floor(v)) * (1 - v + math.floor(v)) for v in y)
                omega = var / sum(v * v for v in y) if top else 0.0
            else:
                codes += [round(v) for v in y]  # half to even, as torch.round
            scale = top / levels / (1 + omega)
        scales.append(scale)
        omegas.append(omega)
    return codes, scales, omegas


def fast_codes(codec: BlockQuant, x: torch.Tensor, seed: int) -> tuple[list[int], list[float]]:
    packed, scales = codec.encode(x, seed=seed).buffers
    d = x.numel()
    if codec.bits == 1:
        return kernels.unpack_bits(packed, kernels.padded_length(d))[:d].tolist(), scales.tolist()
    return kernels.unpack_codes(packed, codec.bits)[:d].tolist(), scales.tolist()


def near_boundary(codec: BlockQuant, x: torch.Tensor, seed: int) -> list[bool]:
    """Entries whose float64 rounding argument is within 1e-4 of a code boundary (float32 and
    float64 may round them differently)."""
    t = x.double().reshape(-1).tolist()
    u = kernels.uniform16(kernels.padded_length(len(t)), seed).double().tolist()
    out = []
    for i, v in enumerate(t):
        b = t[i - i % codec.block : i - i % codec.block + codec.block]
        top = max(abs(w) for w in b)
        if codec.bits == 1:
            arg = (1 - v / top) / 2 - u[i] if top and codec.stochastic else v / (top or 1.0)
            out.append(abs(arg) < 1e-4)
            continue
        y = v * kernels.quant_levels(codec.bits) / top if top else 0.0
        arg = y + u[i] if codec.stochastic else y + 0.5
        out.append(abs(arg - round(arg)) < 1e-4)
    return out


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
def test_fast_path_equals_the_float64_reference(codec: BlockQuant) -> None:
    gen = torch.Generator().manual_seed(4)
    scaled = torch.randn(203, generator=gen) * torch.logspace(-3, 3, 203)  # blocks of mixed scales
    ints = torch.randint(-9, 10, (77,), generator=gen).float() / 4  # exact ties and zero blocks
    for x in (scaled, ints, torch.zeros(20), torch.tensor([-0.0, 0.0, 3.0])):
        for seed in (0, 2**63 + 5):
            codes, scales = fast_codes(codec, x, seed)
            ref_codes, ref_scales, _ = reference(codec, x, seed)
            edge = near_boundary(codec, x, seed)
            for c, r, e in zip(codes, ref_codes, edge, strict=True):
                assert c == r or (e and abs(c - r) == 1), (c, r)
            assert scales == pytest.approx(ref_scales, rel=2e-6, abs=0)


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_buffers_are_the_promised_packed_layout_for_every_shape(
    codec: BlockQuant, dtype: torch.dtype
) -> None:
    for shape in SHAPES:
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        enc = codec.encode(x, seed=11)
        d = x.numel()
        layout = [(b.dtype, tuple(b.shape)) for b in enc.buffers]
        assert layout == codec.expected_buffers(shape, dtype, enc.meta)
        assert layout == [(torch.uint8, (-(-d // 8) * codec.bits,)), (torch.float32, (-(-d // 16),))]
        assert enc.meta == {} and enc.logical() == (shape, dtype)
        assert all(b.is_contiguous() and b.device.type == "cpu" for b in enc.buffers)
        y = codec.decode(enc, shape, dtype)
        assert (tuple(y.shape), y.dtype) == (shape, dtype)


def test_payload_bits_per_entry_at_the_default_block() -> None:
    x = torch.randn(1024, 1024)
    for bits, ratio in ((4, 7.76), (2, 15.06), (1, 28.44)):
        enc = BlockQuant(bits).encode(x, seed=0)
        assert enc.nbytes == x.numel() * bits // 8 + 4 * x.numel() // 256
        assert x.numel() * 4 / enc.nbytes == pytest.approx(ratio, abs=0.01)


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
def test_encode_is_a_function_of_the_seed_and_never_shares_memory(codec: BlockQuant) -> None:
    x = torch.randn(40, 24)
    first, again, other = codec.encode(x, seed=5), codec.encode(x.clone(), seed=5), codec.encode(x, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first.buffers, again.buffers, strict=True))
    assert torch.equal(first.buffers[0], other.buffers[0]) is not codec.stochastic
    before = [b.clone() for b in first.buffers]
    y = codec.decode(first, (40, 24), torch.float32)
    assert torch.equal(y, codec.decode(again, (40, 24), torch.float32))
    x.add_(1.0)
    y.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, first.buffers, strict=True))


@pytest.mark.parametrize("codec", STOCHASTIC, ids=repr)
def test_the_stochastic_chunking_does_not_change_the_payload(
    codec: BlockQuant, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(1000)  # 62 full blocks and a partial one
    whole = codec.encode(x, seed=9).buffers
    monkeypatch.setattr(kernels, "STOCHASTIC_CHUNK", 48)  # three blocks a chunk
    chunked = codec.encode(x, seed=9).buffers
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))


# ------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("bits", kernels.QUANT_BITS)
def test_packing_is_a_bijection_between_code_tuples_and_bytes(bits: int) -> None:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    tuples = list(itertools.product(range(low, high + 1), repeat=8 // bits))
    codes = torch.tensor(tuples, dtype=torch.int8).reshape(-1)
    packed = kernels.pack_codes(codes, bits)
    assert sorted(packed.tolist()) == list(range(256))
    assert torch.equal(kernels.unpack_codes(packed, bits), codes)
    first = tuples[1]  # the code for entry i sits in bits [bits·i, bits·(i+1)) of its byte
    assert int(packed[1]) == sum((c & ((1 << bits) - 1)) << (bits * i) for i, c in enumerate(first))


@EXAMPLES
@given(data=st.data(), bits=st.sampled_from(kernels.QUANT_BITS), n=st.integers(0, 64))
def test_pack_then_unpack_round_trips_bit_for_bit(data: st.DataObject, bits: int, n: int) -> None:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.tensor(
        data.draw(st.lists(st.integers(low, high), min_size=8 * n, max_size=8 * n)), dtype=torch.int8
    )
    packed = kernels.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == n * bits
    assert torch.equal(kernels.unpack_codes(packed, bits), codes)
    assert torch.equal(kernels.pack_codes(kernels.unpack_codes(packed, bits), bits), packed)


# -------------------------------------------------------------------------------- alpha


def block_errors(
    codec: BlockQuant, x: torch.Tensor, y: torch.Tensor
) -> list[tuple[float, float, float, int]]:
    """Per block: (‖C(x) − x‖², ‖x‖², ‖x‖₁, entries) in float64."""
    t, e = x.double().reshape(-1), (y.double() - x.double()).reshape(-1)
    blocks = [(e[i : i + codec.block], t[i : i + codec.block]) for i in range(0, t.numel(), codec.block)]
    return [
        (float(eb.square().sum()), float(b.square().sum()), float(b.abs().sum()), b.numel())
        for eb, b in blocks
    ]


@EXAMPLES
@given(x=vectors(), codec=st.sampled_from(DETERMINISTIC))
def test_deterministic_variants_contract_by_their_stated_alpha(x: torch.Tensor, codec: BlockQuant) -> None:
    for err, energy, l1, n in block_errors(codec, x, roundtrip(codec, x)):
        assert err <= (1 - codec.alpha) * energy * (1 + 1e-5) + 1e-30
        if codec.bits == 1:  # the scaled sign's error is exactly ‖x‖² − ‖x‖₁²/n
            assert err == pytest.approx(energy - l1 * l1 / n, rel=1e-4, abs=1e-9 * energy)


@pytest.mark.parametrize("bits", [4, 2])
def test_the_deterministic_bound_is_attained_with_every_other_entry_at_half_a_step(bits: int) -> None:
    codec, levels = BlockQuant(bits, 256), kernels.quant_levels(bits)
    x = torch.full((256,), 0.5 / levels * (1 - 1e-6), dtype=torch.float32)  # just below Δ/2: rounds to 0
    x[17] = 1.0
    ((err, energy, _, _),) = block_errors(codec, x, roundtrip(codec, x))
    assert codec.alpha == pytest.approx(4 * levels**2 / (4 * levels**2 + 255))
    assert err / energy == pytest.approx(1 - codec.alpha, rel=1e-4)


def test_the_one_bit_bound_is_attained_by_a_single_nonzero_entry() -> None:
    x = torch.zeros(256)
    x[3] = -2.0
    ((err, energy, _, _),) = block_errors(BlockQuant(1), x, roundtrip(BlockQuant(1), x))
    assert err / energy == pytest.approx(1 - 1 / 256, rel=1e-6) and BlockQuant(1).alpha == 1 / 256


def test_stated_constants_at_the_default_block() -> None:
    assert BlockQuant(4).alpha == pytest.approx(0.4346, abs=1e-4)
    assert BlockQuant(2).alpha == pytest.approx(0.01544, abs=1e-5)
    assert BlockQuant(4, stochastic=True).omega == pytest.approx(0.7454, abs=1e-4)
    assert BlockQuant(4, stochastic=True).alpha == pytest.approx(0.5730, abs=1e-4)
    assert BlockQuant(2, stochastic=True).omega == 7.5 and BlockQuant(2, stochastic=True).alpha == 1 / 8.5
    assert BlockQuant(1, stochastic=True).omega == 255 and BlockQuant(1, stochastic=True).alpha == 1 / 256
    assert BlockQuant(4).omega is None and BlockQuant(1).omega is None


@EXAMPLES
@given(x=vectors(), codec=st.sampled_from(STOCHASTIC), seed=st.integers(0, 2**64 - 1))
def test_every_blocks_variance_ratio_is_within_the_stated_omega(
    x: torch.Tensor, codec: BlockQuant, seed: int
) -> None:
    _, _, omegas = reference(codec, x, seed)
    assert codec.omega is not None
    assert max(omegas) <= codec.omega * (1 + 1e-9)


@pytest.mark.parametrize("bits", [4, 2])
def test_the_stochastic_omega_is_attained_at_the_worst_spacing(bits: int) -> None:
    codec, levels = BlockQuant(bits, 256, stochastic=True), kernels.quant_levels(bits)
    r = 255 / levels**2
    x = torch.full((256,), (math.sqrt(1 + r) - 1) / r / levels, dtype=torch.float64)
    x[0] = 1.0
    (omega,) = reference(codec, x.float(), 0)[2]
    assert omega == pytest.approx(codec.omega, rel=1e-5)


def repeated_draws(codec: BlockQuant, x: torch.Tensor, copies: int, seed: int = 0) -> torch.Tensor:
    """``copies`` independent draws of ``codec`` on ``x`` (its length a multiple of the block: one
    encode of the tiled tensor), float64, shape (copies, len(x))."""
    tiled = x.expand(copies, x.numel()).contiguous()
    return roundtrip(codec, tiled, seed).double()


@pytest.mark.parametrize("codec", STOCHASTIC, ids=repr)
def test_stochastic_rounding_is_unbiased_and_its_error_is_the_stated_fraction(codec: BlockQuant) -> None:
    """E C(x)_b = x_b/(1 + ω_b) (so (1 + ω_b)·C is unbiased) and E‖C(x)_b − x_b‖² = ω_b/(1 + ω_b)·‖x_b‖²,
    within 5 standard errors over 20 000 draws."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, generator=gen) * torch.tensor([1.0] * 16 + [1e-3] * 16)  # two blocks
    x[20] = 0.0
    copies = 20_000
    draws = repeated_draws(codec, x, copies)
    _, _, omegas = reference(codec, x, 0)
    t = x.double()
    factor = torch.tensor(omegas, dtype=torch.float64).repeat_interleave(16) + 1
    unscaled = draws * factor
    sd = unscaled.std(0) / math.sqrt(copies)
    assert torch.all((unscaled.mean(0) - t).abs() <= 5 * sd + 1e-6 * t.abs())  # float32 scales
    for b, omega in enumerate(omegas):
        cols = slice(16 * b, 16 * b + 16)
        err = (draws[:, cols] - t[cols]).square().sum(1)
        energy = float(t[cols].square().sum())
        assert float(err.mean()) == pytest.approx(
            omega / (1 + omega) * energy, abs=5 * float(err.std()) / math.sqrt(copies)
        )
        assert omega / (1 + omega) <= 1 - codec.alpha


# ------------------------------------------------------------------------ misc contract


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
def test_non_finite_values_make_their_block_non_finite(codec: BlockQuant) -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(40)
        x[20] = bad
        y = roundtrip(codec, x, 3)
        assert not torch.isfinite(y[16:32]).any()  # so the receiver's finiteness check rejects it
        assert torch.isfinite(y[:16]).all() and torch.isfinite(y[32:]).all()


def test_constructor_and_config_refuse_unsupported_settings() -> None:
    for bits, block in ((3, 256), (8, 256), (4, 4), (4, 12), (4, 0)):
        with pytest.raises(ValueError):
            BlockQuant(bits, block)
    for fields in ({"bits": 3}, {"block": 4}, {"block": 100}):
        with pytest.raises(ValidationError):
            config.BlockQuantCodec(**fields)
    with pytest.raises(BadMeta):
        BlockQuant().expected_buffers((10,), torch.float32, {"seed": 1})


def test_make_codec_builds_it_from_the_gossip_section() -> None:
    cfg = config_from_dict(
        {"gossip": {"codec": {"kind": "blockq", "bits": 2, "block": 64, "stochastic": True}}}
    )
    codec = make_codec(cfg.gossip.codec)
    assert codec == BlockQuant(2, 64, True) and codec.kind == "blockq" and isinstance(codec, Codec)
    assert codec.params == {"bits": 2, "block": 64, "stochastic": True}
    assert make_codec(config.BlockQuantCodec()) == BlockQuant(4, 256, False)
    assert set(BLOCKQ_GAMMA) == {(bits, st) for bits in kernels.QUANT_BITS for st in (False, True)}
    assert BlockQuant(2).gamma == 0.4 and BlockQuant(1, stochastic=True).gamma == 0.1


# -------------------------------------------------------------------------------- wire


WIRE_VALUES = torch.randn(37, 9, generator=torch.Generator().manual_seed(5))  # a partial block, padded codes


def blockq_frames(codec: BlockQuant) -> tuple[list[bytes], wire.DecodeContext]:
    shapes = {"w": (37, 9)}
    enc = {"w": codec.encode(WIRE_VALUES, seed=4)}
    frames = wire.encode(
        sender=2, round=7, phase="X", codec=codec.kind, tensors=enc, codec_params=codec.params
    )
    return copies(frames), context(codec, shapes=shapes)


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
def test_the_wire_carries_it_bit_for_bit_and_refuses_a_short_or_long_packed_frame(codec: BlockQuant) -> None:
    frames, ctx = blockq_frames(codec)
    msg = wire.decode(frames, ctx)
    assert torch.equal(
        msg.tensors["w"], codec.decode(codec.encode(WIRE_VALUES, seed=4), (37, 9), torch.float32)
    )
    packed = frames[1]
    for cut in (packed[:-1], packed + b"\0"):  # the frame alone changed: the declared bytes disagree
        with pytest.raises(wire.SizeMismatch):
            wire.decode([frames[0], cut, frames[2]], ctx)

    def declare(nbytes: int) -> Callable[[dict[str, Any]], None]:
        def edit(header: dict[str, Any]) -> None:
            header["tensors"][0]["buffers"][0] = ["uint8", [nbytes], nbytes]

        return edit

    for delta in (-1, 1):  # header and frame agree with each other, not with the codec
        n = len(packed) + delta
        edited = rewrite(frames, declare(n))
        with pytest.raises(wire.SizeMismatch):
            wire.decode([edited[0], (packed + b"\0")[:n], edited[2]], ctx)


# ---------------------------------------------------------------------- replicas in use


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
def test_replicas_stay_bitwise_equal_and_the_tracking_invariant_holds(codec: BlockQuant) -> None:
    cfg = config_from_dict(
        {
            "peers": 8,
            "rounds": 20,
            "seed": 1,
            "dtype": "float64",
            "device": "cpu",
            "topology": {"name": "ring"},
            "algorithm": {"name": "demuon", "lr": 0.05, "theta": 0.3},
            "workload": {"kind": "quadratic", "rows": 16, "dim_in": 12, "dim_out": 6},
            "gossip": {
                "codec": {"kind": "blockq", "bits": codec.bits, "block": 16, "stochastic": codec.stochastic},
                "gamma": codec.gamma,
                "keyframe_every": 0,
            },
        }
    )
    peers = build_peers(cfg)[0]
    for k in range(cfg.rounds):
        simulate.simulate_round(peers, k)
        gap = tracking_gap(peers)
        assert gap is not None and gap < 1e-10
        for p in peers:
            for phase, held in p.hat.items():
                for j, replica in held.items():
                    own = peers[j].hat_self[phase]
                    assert all(torch.equal(replica[n], own[n]) for n in p.names), (k, p.index, j, phase)
    assert all(torch.isfinite(p.params[n]).all() for p in peers for n in p.names)
