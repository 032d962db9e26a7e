"""Per-phase codecs (``[gossip.v]`` / ``[gossip.x]``, docs/algorithms.md §7): the config, the
simulator's equality with one shared codec, the bytes each phase puts on the wire, and the wire's
refusal of a codec that is not its phase's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from demuon.app import simulate
from demuon.app.peers import build_peers
from demuon.config import RUN_LOCAL_FIELDS, Config, config_from_dict, load_config, math_fingerprint
from demuon.errors import ConfigError
from demuon.node.exchange import ExactExchange, PeerSide
from demuon.node.rounds import Delivery, run_round
from demuon.transport import wire
from demuon.transport.codecs import BlockQuant, Codec, Encoded, Identity, Int8
from tests.support.cluster import CONFIGS

INT8 = {"kind": "int8"}
BLOCKQ4 = {"kind": "blockq", "bits": 4}


def quadratic(gossip: Mapping[str, Any], **extra: Any) -> Config:
    data: dict[str, Any] = {
        "peers": 4,
        "rounds": 12,
        "seed": 5,
        "device": "cpu",
        "threads": 1,
        "topology": {"name": "ring"},
        "algorithm": {"name": "demuon", "lr": 0.05, "theta": 0.3},
        "workload": {"kind": "quadratic", "rows": 16, "dim_in": 12, "dim_out": 6, "noise": 0.1},
        "gossip": dict(gossip),
    }
    data.update(extra)
    return config_from_dict(data)


# ----------------------------------------------------------------------------------- config


def test_phase_overrides_fall_back_to_the_shared_codec_and_gamma() -> None:
    g = quadratic({"codec": INT8, "gamma": 0.7, "x": {"codec": BLOCKQ4}}).gossip
    assert g.codec_for("V").kind == "int8" and g.gamma_for("V") == 0.7
    assert g.codec_for("X").kind == "blockq"
    assert g.gamma_for("X") == 0.7  # only the codec is overridden
    assert not g.exact_for("V") and not g.exact
    mixed = quadratic({"x": {"codec": BLOCKQ4}}).gossip
    assert mixed.exact_for("V") and not mixed.exact_for("X") and not mixed.exact


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("gossip.v.gamma=0", "gossip.v.gamma"),
        ("gossip.x.codec={kind='zip'}", "gossip.x.codec"),
        ("gossip.v.ratio=0.1", "gossip.v.ratio"),  # extra keys are refused
    ],
)
def test_a_bad_phase_setting_is_refused_naming_its_field(setting: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "oracle-ring4.toml", [setting])
    assert err.value.field.startswith(field), err.value.field


def test_the_guard_names_the_phase_setting_that_compresses() -> None:
    with pytest.raises(ConfigError, match=r"gossip\.x\.codec is 'blockq'"):
        load_config(
            CONFIGS / "oracle-ring4.toml", ["gossip.clip='self_centred'", "gossip.x.codec={kind='blockq'}"]
        )


def test_a_leave_is_carried_out_when_one_phase_is_compressed() -> None:
    """An announced leave with the tracker phase compressed (γ 0.5): the leaver's replicas are
    retired and mean V = mean M holds on the survivors (docs/algorithms.md §8)."""
    config = quadratic({"v": {"gamma": 0.5}}, faults={"peer": [{"id": 1, "leave_at": 3}]}, dtype="float64")
    res = simulate.run(config)
    assert [p["status"] for p in res.summary["peers"]].count("left") == 1
    assert res.summary["tracking_drift"] is not None and res.summary["tracking_drift"] < 1e-9


def test_the_fingerprint_is_unchanged_without_overrides_and_sees_them() -> None:
    plain = quadratic({"codec": INT8})
    data = plain.model_dump(mode="json")
    for key in RUN_LOCAL_FIELDS:
        data.pop(key)
    del data["gossip"]["v"], data["gossip"]["x"]
    assert math_fingerprint(plain) == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert math_fingerprint(quadratic({"codec": INT8, "x": {"codec": BLOCKQ4}})) != math_fingerprint(plain)


# ------------------------------------------------------------------------------- simulator


def test_one_codec_given_per_phase_equals_the_shared_codec_bitwise() -> None:
    shared = simulate.run(quadratic({"codec": INT8, "gamma": 0.7, "keyframe_every": 4}))
    phase = {"codec": INT8, "gamma": 0.7}
    split = simulate.run(quadratic({"v": phase, "x": phase, "keyframe_every": 4}))
    for a, b in zip(shared.peers, split.peers, strict=True):
        assert all(torch.equal(a.params[n], b.params[n]) for n in a.names)
        assert all(torch.equal(a.V[n], b.V[n]) for n in a.names)

    def untimed(res: simulate.SimulationResult) -> dict[int, list[dict[str, Any]]]:
        return {
            i: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]
            for i, rows in res.per_peer.items()
        }

    assert untimed(shared) == untimed(split)  # every row, bytes included, but its timings
    assert shared.summary["bytes"] == split.summary["bytes"]


@pytest.mark.parametrize(
    "gossip",
    [
        {"v": {"codec": INT8}, "x": {"codec": BLOCKQ4}},
        {"v": {"codec": {"kind": "int8", "deflate": True}}, "x": {"codec": {"kind": "blockq", "bits": 1}}},
        {"x": {"codec": BLOCKQ4}, "keyframe_every": 3},  # V exact (running sums), X compressed
        {"v": {"codec": {"kind": "blockq", "bits": 2}, "gamma": 0.4}, "keyframe_every": 3},  # the reverse
    ],
    ids=["int8-blockq4", "int8deflate-blockq1", "exact-blockq4", "blockq2-exact"],
)
def test_mixed_phases_keep_mean_v_equal_to_mean_m_and_replicas_consistent(gossip: dict[str, Any]) -> None:
    res = simulate.run(quadratic(gossip, rounds=20))
    assert max(r["tracking_gap_in_flight"] for r in res.cluster) <= 1e-5
    by_index = {p.index: p for p in res.peers}
    for p in res.peers:
        for phase, hats in p.hat.items():
            if p.exact_phase[phase]:
                continue
            for j, hat in hats.items():  # every holder's copy of j is j's own replica, bitwise
                assert all(torch.equal(hat[n], by_index[j].hat_self[phase][n]) for n in p.names)
    assert math.isfinite(res.summary["average"]["validation_loss"])


class Recording:
    """A peer's exchange that also keeps the frames its messages become on the wire."""

    def __init__(self, side: PeerSide, into: list[tuple[int, str, list[int], int]]) -> None:
        self.side, self.into = side, into

    async def exchange(
        self, k: int, phase: str, encoded: Mapping[str, Encoded], *, keyframe: bool = False
    ) -> Delivery:
        peer = self.side.hub.peers[self.side.index]
        frames = wire.encode(
            sender=peer.index,
            round=k,
            phase=phase,
            codec=peer.wire_codec(phase, keyframe),
            tensors=encoded,
            keyframe=keyframe,
        )
        sizes = [memoryview(f).nbytes for f in frames]
        self.into.append((k, phase, sizes, len(peer.recipients(k, phase))))
        return await self.side.exchange(k, phase, encoded, keyframe=keyframe)


def test_int8_trackers_and_4_bit_parameters_send_the_bytes_their_codecs_state() -> None:
    """V int8: d + 4 payload bytes per tensor; X 4-bit blocks: ⌈d/8⌉·4 + 4⌈d/256⌉; each round
    counts header frame + payload × recipients per phase, and a keyframe round the full replica."""
    config = quadratic({"v": {"codec": INT8}, "x": {"codec": BLOCKQ4}, "keyframe_every": 3}, rounds=4)
    peers, _, _ = build_peers(config)
    assert isinstance(peers[0].codecs["V"], Int8) and isinstance(peers[0].codecs["X"], BlockQuant)
    hub = ExactExchange(peers)
    sent: dict[int, list[tuple[int, str, list[int], int]]] = {p.index: [] for p in peers}

    async def rounds() -> list[list[Any]]:
        out = []
        for k in range(config.rounds):
            keyframe = k == 3
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(
                        run_round(p, k, Recording(hub.side(p.index), sent[p.index]), keyframe=keyframe)
                    )
                    for p in peers
                ]
            out.append([t.result() for t in tasks])
        return out

    metrics = asyncio.run(rounds())
    d = 6 * 12  # the quadratic's one weight
    payload = {"V": d + 4, "X": math.ceil(d / 8) * 4 + 4 * math.ceil(d / 256)}
    dense = d * 4  # a keyframe: the float32 replica, and its float64 replica sum
    for p in peers:
        for k, phase, sizes, recipients in sent[p.index]:
            want = dense + 2 * dense if k == 3 else payload[phase]
            assert sum(sizes[1:]) == want, (k, phase, sizes)
            assert recipients == 2
        for k, row in enumerate(metrics[k][p.index] for k in range(config.rounds)):
            frames = {ph: sum(s) * r for kk, ph, s, r in sent[p.index] if kk == k}
            assert (row.bytes_out_V, row.bytes_out_X) == (frames["V"], frames["X"])
            assert row.bytes_out == row.bytes_out_V + row.bytes_out_X
    # int8 trackers cost about a quarter of float32, 4-bit parameters about an eighth
    v, x = sent[0][0][2], sent[0][1][2]
    assert sum(v[1:]) < d * 4 / 3.5 and sum(x[1:]) < d * 4 / 7


def test_a_message_with_the_other_phases_codec_is_refused() -> None:
    codecs: dict[str, dict[str, Codec]] = {
        "V": {"identity": Identity(), "int8": Int8()},
        "X": {"identity": Identity(), "blockq": BlockQuant(4)},
    }
    ctx = wire.DecodeContext(senders={1}, shapes={"w": (4, 8)}, phase_codecs=codecs)
    enc = {"w": Int8().encode(torch.randn(4, 8), seed=1)}
    assert (
        wire.decode(wire.encode(sender=1, round=0, phase="V", codec="int8", tensors=enc), ctx).codec == "int8"
    )
    with pytest.raises(wire.UnknownCodec):
        wire.decode(wire.encode(sender=1, round=0, phase="X", codec="int8", tensors=enc), ctx)
