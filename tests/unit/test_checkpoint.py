"""Checkpoints: a round trip restores the peer exactly; crashes mid-write and bad files are caught."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from demuon.app import simulate
from demuon.app.peers import build_peers
from demuon.config import Config, config_from_dict, math_fingerprint
from demuon.errors import CheckpointError
from demuon.node.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from demuon.node.peer import Peer


def small_config(**extra: object) -> Config:
    data: dict[str, object] = {
        "peers": 3,
        "rounds": 5,
        "seed": 7,
        "device": "cpu",
        "workload": {"kind": "quadratic", "rows": 8, "dim_in": 5, "dim_out": 3},
    }
    data.update(extra)
    return config_from_dict(data)


def built(config: Config) -> list[Peer]:
    return build_peers(config)[0]


def run_rounds(peers: list[Peer], rounds: range) -> None:
    for k in rounds:
        simulate.simulate_round(peers, k)


def test_a_restored_peer_continues_exactly_like_one_that_never_stopped(tmp_path: Path) -> None:
    config = small_config()
    straight, stopped = built(config), built(config)
    run_rounds(straight, range(5))
    run_rounds(stopped, range(3))
    save_checkpoint(tmp_path, stopped[1], math_fingerprint(config))
    resumed = [stopped[0], built(config)[1], stopped[2]]  # peer 1 restarts from its file
    next_round = restore(resumed[1], load_checkpoint(tmp_path, 1, math_fingerprint(config)))
    assert next_round == 3
    run_rounds(resumed, range(next_round, 5))
    for a, b in zip(straight, resumed, strict=True):
        for name in a.names:
            assert torch.equal(a.params[name], b.params[name])
            assert torch.equal(a.V[name], b.V[name])


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = small_config()
    peers = built(config)
    run_rounds(peers, range(2))
    save_checkpoint(tmp_path, peers[0], math_fingerprint(config))
    before = checkpoint_path(tmp_path, 0).read_bytes()
    run_rounds(peers, range(2, 4))

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, peers[0], math_fingerprint(config))
    monkeypatch.undo()
    assert checkpoint_path(tmp_path, 0).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer-0.pt"]  # no temp file left behind
    assert load_checkpoint(tmp_path, 0, math_fingerprint(config))["round"] == 1


def test_a_missing_checkpoint_is_an_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint") as err:
        load_checkpoint(tmp_path, 2, math_fingerprint(small_config()))
    assert err.value.path == str(tmp_path / "peer-2.pt")


@pytest.mark.parametrize("keep", [0, 10, 200, -1])
def test_a_truncated_checkpoint_is_reported_as_corrupt(tmp_path: Path, keep: int) -> None:
    config = small_config()
    peers = built(config)
    path = save_checkpoint(tmp_path, peers[0], math_fingerprint(config))
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_checkpoint(tmp_path, 0, math_fingerprint(config))
    assert str(path) in str(err.value)


def test_another_peers_checkpoint_is_refused(tmp_path: Path) -> None:
    config = small_config()
    peers = built(config)
    save_checkpoint(tmp_path, peers[2], math_fingerprint(config))
    checkpoint_path(tmp_path, 2).rename(checkpoint_path(tmp_path, 1))
    with pytest.raises(CheckpointError, match="peer 2's, not peer 1's"):
        load_checkpoint(tmp_path, 1, math_fingerprint(config))


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path: Path) -> None:
    config = small_config()
    save_checkpoint(tmp_path, built(config)[0], math_fingerprint(config))
    with pytest.raises(CheckpointError, match="different configuration"):
        load_checkpoint(tmp_path, 0, math_fingerprint(small_config(algorithm={"lr": 0.5})))


def test_run_local_settings_do_not_change_the_config_fingerprint(tmp_path: Path) -> None:
    config = small_config()
    moved = small_config(
        network={"base_port": 40000, "phase_timeout_s": 1.0},
        checkpoint={"dir": str(tmp_path), "every": 3},
        threads=2,
    )
    assert math_fingerprint(config) == math_fingerprint(moved)
    assert math_fingerprint(config) != math_fingerprint(small_config(seed=8))
