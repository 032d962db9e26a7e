"""Fault plans (``[faults]``, ``--faults FILE``): the simulator and the daemon give every message
the same fate, so under drops, duplicates, corruption and partitions they reach the same
parameters; every injected fault is counted, and a corrupted payload is never applied."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from demuon.app import simulate
from demuon.config import load_config
from demuon.errors import ConfigError
from demuon.node.daemon import DaemonStatus, RoundHook
from tests.support.cluster import CONFIGS, inproc_daemons

PLANS: dict[str, str] = {
    "drop": "faults={seed = 7, link = [{action = 'drop', probability = 0.1}]}",
    "duplicate": "faults={seed = 7, link = [{action = 'duplicate', probability = 0.3, copies = 2}]}",
    "corrupt": "faults={seed = 7, link = [{action = 'corrupt', probability = 0.2, phases = ['V']}]}",
    "partition": "faults={partition = [{groups = [[0, 1], [2, 3]], rounds = [5, 9]}]}",
}


def record(into: list[dict[str, Any]], row: Mapping[str, Any]) -> None:
    into.append(dict(row))


async def daemon_rows(
    config_sets: list[str], root: Path
) -> tuple[dict[int, list[dict[str, Any]]], list[Path]]:
    config = load_config(CONFIGS / "oracle-ring4.toml", config_sets)
    rows: dict[int, list[dict[str, Any]]] = {i: [] for i in range(config.peers)}
    hooks: dict[int, RoundHook] = {i: functools.partial(record, rows[i]) for i in rows}
    daemons = inproc_daemons(config, root, hooks=hooks)
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * config.peers
    return rows, [root / f"peer-{i}" for i in rows]


@pytest.mark.parametrize("plan", list(PLANS))
async def test_the_daemon_under_a_plan_reaches_the_simulators_parameters(tmp_path: Path, plan: str) -> None:
    sets = [PLANS[plan], "network.phase_timeout_s=5.0"]  # long: nothing but the plan may go missing
    rows, folders = await daemon_rows(sets, tmp_path)
    reference = simulate.run(load_config(CONFIGS / "oracle-ring4.toml", sets))
    for folder, ref in zip(folders, reference.peers, strict=True):
        final = torch.load(folder / "final.pt", weights_only=True)
        assert all(torch.equal(final[n], ref.params[n].detach()) for n in ref.names), folder
    for i, own in rows.items():  # the same messages went missing, round by round
        assert [r["missing"] for r in own] == [r["missing"] for r in reference.per_peer[i]]
        assert [r["injected"] for r in own] == [r["injected"] for r in reference.per_peer[i]]
        assert max(r["t_wait_max"] for r in own) < 5.0  # nobody waited for a message the plan dropped
    injected = sum(r["injected"] for own in rows.values() for r in own)
    assert injected > 0 and reference.summary["faults"]["injected"] == injected


async def test_a_corrupted_payload_is_caught_counted_and_never_applied(tmp_path: Path) -> None:
    sets = [PLANS["corrupt"], "network.phase_timeout_s=5.0"]
    rows, _ = await daemon_rows(sets, tmp_path)
    rejected = sum(r["rejected"] for own in rows.values() for r in own)
    injected = sum(r["injected"] for own in rows.values() for r in own)
    missing = sum(len(r["missing"]) for own in rows.values() for r in own)
    assert injected > 0 and rejected == injected == missing  # each one refused by the checksum
    clean = simulate.run(load_config(CONFIGS / "oracle-ring4.toml"))
    corrupt = simulate.run(load_config(CONFIGS / "oracle-ring4.toml", sets))
    assert corrupt.summary["tracking_drift"] < 1e-5  # its mass came with the next message
    assert [p["fingerprint"] for p in corrupt.summary["peers"]] != [
        p["fingerprint"] for p in clean.summary["peers"]
    ]


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("faults={link = [{action = 'explode'}]}", "faults.link.0.action"),
        ("faults={link = [{action = 'drop', probability = 1.5}]}", "faults.link.0.probability"),
        ("faults={link = [{action = 'drop', rounds = [9, 3]}]}", "faults.link.0.rounds"),
        ("faults={peer = [{id = 7, crash_at = 3}]}", "faults.peer.id"),
        ("faults={partition = [{groups = [[0, 1], [1, 2]], rounds = [1, 2]}]}", "faults.partition.0"),
    ],
)
def test_a_bad_plan_fails_before_anything_starts_naming_the_field(setting: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(CONFIGS / "oracle-ring4.toml", [setting])
