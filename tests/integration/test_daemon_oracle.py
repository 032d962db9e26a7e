"""The oracle: daemons (in one process over the in-process hub, or as `demuon run` processes over
CURVE-secured ZeroMQ) end with exactly the simulator's parameters; with compression they keep the
tracking invariant mean V = mean M at every round."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from demuon.app import cli, simulate
from demuon.app.summary import launch_summary
from demuon.config import load_config
from demuon.node.daemon import DaemonStatus, RoundHook
from tests.support.cluster import CONFIGS, assert_same_as_simulator, cluster, inproc_daemons


def record(into: list[dict[str, Any]], row: Mapping[str, Any]) -> None:
    into.append(dict(row))


async def run_all(
    config_name: str, root: Path, *sets: str, hooks: dict[int, RoundHook] | None = None
) -> list[Path]:
    config = load_config(CONFIGS / config_name, list(sets))
    daemons = inproc_daemons(config, root, hooks=hooks)
    statuses = await asyncio.gather(*(d.run() for d in daemons))
    assert statuses == [DaemonStatus.STOPPED] * config.peers
    for d in daemons:
        await d.close()  # idempotent
    return [root / f"peer-{d.peer.index}" for d in daemons]


async def test_daemons_in_one_process_match_the_simulator_and_report_every_round(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "oracle-ring4.toml")
    seen: dict[int, list[int]] = {i: [] for i in range(config.peers)}

    def recorder(i: int) -> RoundHook:
        return lambda row: seen[i].append(row["round"])

    folders = await run_all("oracle-ring4.toml", tmp_path, hooks={i: recorder(i) for i in seen})
    reference = simulate.run(config).peers
    for folder, ref in zip(folders, reference, strict=True):
        assert seen[ref.index] == list(range(config.rounds))
        final = torch.load(folder / "final.pt", weights_only=True)
        assert torch.equal(final["weight"], ref.params["weight"].detach())


@pytest.mark.parametrize(
    ("config_name", "sets"),
    [
        ("oracle-expo4.toml", ()),
        ("oracle-ring4.toml", ("dtype='float64'",)),
        ("oracle-ring4.toml", ("algorithm.name='dsgd_clip'",)),
    ],
    ids=["directed-exponential", "float64", "dsgd_clip"],
)
async def test_daemons_equal_the_simulator_bitwise(
    tmp_path: Path, config_name: str, sets: tuple[str, ...]
) -> None:
    config = load_config(CONFIGS / config_name, list(sets))
    folders = await run_all(config_name, tmp_path, *sets)
    for folder, ref in zip(folders, simulate.run(config).peers, strict=True):
        final = torch.load(folder / "final.pt", weights_only=True)
        assert all(torch.equal(final[n], ref.params[n].detach()) for n in ref.names), folder


async def test_with_top_k_compression_the_daemons_keep_mean_v_equal_to_mean_m_at_every_round(
    tmp_path: Path,
) -> None:
    topk = ("gossip.codec={kind = 'topk', ratio = 0.1}", "gossip.gamma=0.2", "gossip.keyframe_every=7")
    config = load_config(CONFIGS / "oracle-ring4.toml", list(topk))
    rows: dict[int, list[dict[str, object]]] = {i: [] for i in range(config.peers)}
    hooks: dict[int, RoundHook] = {i: functools.partial(record, rows[i]) for i in rows}
    folders = await run_all("oracle-ring4.toml", tmp_path, *topk, hooks=hooks)
    for k in range(config.rounds):
        at_k = [rows[i][k] for i in rows]
        assert all(r["round"] == k and r["missing"] == [] for r in at_k)
        assert all(r["keyframe"] == (k > 0 and k % 7 == 0) for r in at_k)
        sum_V = torch.tensor([r["sum_V"] for r in at_k], dtype=torch.float64).sum(0)
        sum_M = torch.tensor([r["sum_M"] for r in at_k], dtype=torch.float64).sum(0)
        scale = 1.0 + torch.tensor([r["sum_M"] for r in at_k], dtype=torch.float64).abs().sum()
        assert (sum_V - sum_M).abs().max() <= 1e-4 * scale, f"round {k}: {sum_V} vs {sum_M}"
    reference = simulate.run(config)
    for folder, ref in zip(folders, reference.peers, strict=True):  # replicas evolve as in the simulator
        final = torch.load(folder / "final.pt", weights_only=True)
        assert all(torch.equal(final[n], ref.params[n].detach()) for n in ref.names), folder
    for i in rows:  # and the simulator counts the same bytes, keyframes included
        assert [r["bytes_out"] for r in rows[i]] == [r["bytes_out"] for r in reference.per_peer[i]]


@pytest.mark.parametrize(
    "v_codec", ["{kind='int8'}", "{kind='int8', deflate=true}"], ids=["int8", "deflated"]
)
async def test_with_a_codec_per_phase_the_daemons_equal_the_simulator_and_send_its_bytes(
    tmp_path: Path, v_codec: str
) -> None:
    """V int8 (its codes deflated or not), X 4-bit blocks, a keyframe every 3 rounds: the daemons
    end with the simulator's parameters bitwise, and every peer sends the bytes the simulator
    counts, round by round and per phase (headers and keyframes included), so both summaries report
    the same bytes per peer."""
    sets = (
        f"gossip.v.codec={v_codec}",
        "gossip.x.codec={kind='blockq', bits=4}",
        "gossip.keyframe_every=3",
    )
    config = load_config(CONFIGS / "oracle-ring4.toml", list(sets))
    rows: dict[int, list[dict[str, object]]] = {i: [] for i in range(config.peers)}
    hooks: dict[int, RoundHook] = {i: functools.partial(record, rows[i]) for i in rows}
    folders = await run_all("oracle-ring4.toml", tmp_path, *sets, hooks=hooks)
    reference = simulate.run(config)
    for folder, ref in zip(folders, reference.peers, strict=True):
        final = torch.load(folder / "final.pt", weights_only=True)
        assert all(torch.equal(final[n], ref.params[n].detach()) for n in ref.names), folder
    keys = ("bytes_out", "bytes_out_V", "bytes_out_X", "bytes_in", "keyframe")
    for i in rows:
        assert [[r[k] for k in keys] for r in rows[i]] == [
            [r[k] for k in keys] for r in reference.per_peer[i]
        ]
        assert sum(r["keyframe"] is True for r in rows[i]) == len(range(3, config.rounds, 3))
    launched = launch_summary(config, tmp_path)
    assert launched["bytes"] == reference.summary["bytes"]
    assert launched["phases"] == reference.summary["phases"] and launched["codec"] == "V=int8 X=blockq"
    assert all(p["out_V"] > 0 and p["out_X"] > 0 for p in launched["bytes"]["per_peer"])


@pytest.mark.slow  # launch is secure by default: test_launch's oracle test covers a CURVE cluster
def test_a_curve_secured_cluster_with_keys_from_the_cli_matches_the_simulator(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert cli.main(["keys", "generate", str(keys), "--peers", "4"]) == 0
    assert sorted(p.name for p in keys.glob("*.key_secret")) == [f"peer-{i}.key_secret" for i in range(4)]
    secure = ("security.enabled=true", f"security.key_dir='{keys}'", "rounds=6")
    with cluster(tmp_path / "run", CONFIGS / "oracle-ring4.toml", *secure) as c:
        c.root.mkdir(parents=True, exist_ok=True)
        for i in range(c.config.peers):
            c.start(i)
        c.wait_all()
        for i in range(c.config.peers):
            rows = c.rows(i)
            assert [r["round"] for r in rows] == list(range(6))
            assert all(r["missing"] == [] and r["down"] == [] for r in rows), c.logs(i)
        assert assert_same_as_simulator(c, c.config)  # bitwise: same inputs, same summation order
