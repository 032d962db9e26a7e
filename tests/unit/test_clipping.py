"""The guard against poisoned values (docs/algorithms.md §8.1): self-centred clipping of each
neighbour's value, ``Z_j → Z_i + clip(Z_j − Z_i, τ)``, against a float64 reference, and on the
8-peer float64 logistic ring with one Byzantine peer (``demuon.node.exchange.Poison``)."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from demuon.app import simulate
from demuon.app.peers import build_peers
from demuon.config import Config, config_from_dict
from demuon.errors import ConfigError
from demuon.node import optim
from demuon.node.exchange import Poison
from demuon.node.observe import TrackerState, averaged_validation_loss, tracking_drift
from demuon.node.peer import Peer
from demuon.workloads import make_workload
from tests.support.configs import eight_peers

BYZANTINE = 5
ROUNDS = 30


# ----------------------------------------------------------------------- the pure function


def _dicts(seed: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (4, 20), "b": (4,), "s": ()}
    z_i = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in shapes.items()}
    z_j = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in shapes.items()}
    return z_i, z_j


def _reference(z_i: dict[str, torch.Tensor], z_j: dict[str, torch.Tensor], tau: float) -> torch.Tensor:
    """``Z_i + v · min(1, τ/‖v‖)``, ``v = Z_j − Z_i``, on the flattened whole model in float64."""
    a = torch.cat([z_i[n].double().flatten() for n in z_i])
    v = torch.cat([z_j[n].double().flatten() for n in z_i]) - a
    return a + v * min(1.0, tau / float(torch.linalg.vector_norm(v)))


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in d.values()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_to_matches_the_float64_reference_and_stays_within_tau(dtype: torch.dtype, seed: int) -> None:
    z_i, z_j = _dicts(seed, dtype)
    dist = float(torch.linalg.vector_norm(_flat(z_j) - _flat(z_i)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for tau in (0.01 * dist, 0.5 * dist, 0.999 * dist):
        got = optim.clip_to(z_i, z_j, tau)
        assert set(got) == set(z_i) and all(got[n].dtype == dtype for n in got)
        want = _reference(z_i, z_j, tau)
        assert float((_flat(got) - want).abs().max()) <= tol * (1 + float(want.abs().max()))
        moved = float(torch.linalg.vector_norm(_flat(got) - _flat(z_i)))
        assert moved <= tau * (1 + tol) and moved == pytest.approx(tau, rel=10 * tol)
    for tau in ((1 + tol) * dist, 2 * dist, math.inf):  # inside the ball: the neighbour's own tensors
        got = optim.clip_to(z_i, z_j, tau)
        assert all(got[n] is z_j[n] for n in z_j)


def test_clip_to_bounds_a_poisoned_value_and_ignores_one_that_is_not_finite() -> None:
    z_i, _ = _dicts(3, torch.float32)
    poisoned = {n: torch.full_like(t, 1e30) for n, t in z_i.items()}  # ‖·‖² overflows float32
    got = optim.clip_to(z_i, poisoned, 0.5)
    assert all(bool(torch.isfinite(t).all()) for t in got.values())
    assert float(torch.linalg.vector_norm(_flat(got) - _flat(z_i))) == pytest.approx(0.5, rel=1e-5)
    for bad in (math.inf, math.nan):
        got = optim.clip_to(z_i, {n: torch.full_like(t, bad) for n, t in z_i.items()}, 0.5)
        assert all(got[n] is z_i[n] for n in z_i)
    assert all(t is z_i[n] for n, t in optim.clip_to(z_i, poisoned, 0.0).items())  # τ = 0: own value


def test_clip_factor_and_the_threshold_rule() -> None:
    v = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor(4.0)}  # ‖v‖ = 5 over the whole model
    assert optim.clip_factor(v, 10.0) == 1.0
    assert optim.clip_factor(v, 2.5) == 0.5
    assert optim.clip_factor({"a": torch.zeros(3)}, 0.0) == 1.0
    assert optim.guard_threshold([0.5, 2.0, 1.0], 2.0) == 4.0  # τ = c · max of the window
    assert optim.guard_threshold([], 2.0) == 0.0


# ------------------------------------------------------------------------------ the config


def logistic(rounds: int = ROUNDS, **gossip: Any) -> Config:
    data = eight_peers("logistic", rounds).model_dump()
    data["gossip"].update(gossip)
    return config_from_dict(data)


def test_the_guard_is_off_by_default_and_refused_with_compression() -> None:
    assert logistic().gossip.clip == "off"
    with pytest.raises(ConfigError, match="exact mixing"):
        logistic(clip="self_centred", codec={"kind": "topk", "ratio": 0.1}, gamma=0.2)
    with pytest.raises(ConfigError):
        logistic(clip="self_centred", clip_multiple=0.0)


# ------------------------------------------------------------------- a Byzantine neighbour

ATTACKS = {"none": None, "1e30": Poison(BYZANTINE, value=1e30), "-4x": Poison(BYZANTINE, scale=-4.0)}


@functools.cache
def outcome(clip: str, attack: str) -> tuple[list[Peer], float]:
    """The honest peers after ROUNDS rounds, and the validation loss of their averaged model."""
    config = logistic(clip=clip)
    peers = [
        p
        for p in simulate.run_poisoned(config, ATTACKS[attack])
        if ATTACKS[attack] is None or p.index != BYZANTINE
    ]
    workload = make_workload(config.workload, seed=config.seed, device=torch.device("cpu"))
    return peers, averaged_validation_loss(workload, config.seed, [p.X() for p in peers], dtype=torch.float64)


def largest(peers: list[Peer]) -> float:
    return max(float(t.abs().max()) for p in peers for t in p.X().values())


def test_with_a_neighbour_sending_1e30_the_guard_keeps_the_honest_peers_near_the_fault_free_loss() -> None:
    off, off_loss = outcome("off", "1e30")
    on, on_loss = outcome("self_centred", "1e30")
    want = outcome("off", "none")[1]
    assert largest(off) > 1e20  # unguarded: the poison is in every honest model
    assert off_loss > 1.3  # chance level is ln 4 = 1.386
    assert all(bool(torch.isfinite(t).all()) for p in on for t in p.X().values())
    assert largest(on) < 10.0
    assert on_loss <= 1.05 * want, f"guarded validation loss {on_loss:.4f} vs fault-free {want:.4f}"
    assert all(p.clipped > 0 for p in on if p.index in (BYZANTINE - 1, BYZANTINE + 1))


def test_with_a_sign_flipping_neighbour_the_guard_does_better_than_no_guard() -> None:
    want = outcome("off", "none")[1]
    assert outcome("self_centred", "-4x")[1] < 1.25 * want < outcome("off", "-4x")[1]


# ---------------------------------------------------------------------- without a Byzantine


def test_a_guard_that_never_binds_changes_no_bit_also_under_message_loss() -> None:
    drop = {"seed": 3, "link": [{"action": "drop", "probability": 0.2}]}  # loans and in-flight mass too

    def with_faults(**gossip: Any) -> Config:
        data = logistic(20, **gossip).model_dump()
        data["faults"] = drop
        return config_from_dict(data)

    plain = simulate.run(with_faults())
    guarded = simulate.run(with_faults(clip="self_centred", clip_multiple=1e12))
    assert guarded.summary["faults"]["missing"] > 0
    assert sum(p.clipped for p in guarded.peers) == 0
    assert [p.fingerprint() for p in guarded.peers] == [p.fingerprint() for p in plain.peers]
    for a, b in zip(plain.peers, guarded.peers, strict=True):
        assert all(torch.equal(a.V[n], b.V[n]) for n in a.names)


def test_what_the_guard_holds_back_from_an_honest_sum_stays_in_flight() -> None:
    """Fault-free with the default multiple, some honest sums are clipped (early, before the
    trackers agree): their excess is delayed, not lost, so mean V = mean M holds counting it."""
    peers, loss = outcome("self_centred", "none")
    assert sum(p.clipped for p in peers) > 0
    drift = tracking_drift([TrackerState.of(p, ROUNDS - 1) for p in peers])
    assert drift is not None and drift <= 1e-9
    assert loss <= 1.01 * outcome("off", "none")[1]


def test_the_window_of_own_norms_survives_a_checkpoint() -> None:
    config = logistic(3, clip="self_centred")
    peers = simulate.run_poisoned(config, None)
    fresh = build_peers(config)[0][2]
    fresh.load_state_dict(peers[2].state_dict())
    assert fresh.own_updates == peers[2].own_updates and len(fresh.own_updates["V"]) == 3
    assert fresh.tau("X") == peers[2].tau("X") > 0.0
