"""Checkpoints: a round trip restores the peer exactly; crashes mid-write and bad files are caught;
a damaged newest checkpoint falls back to the previous one; leftover temp files are removed."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
import torch

from demuon.app import simulate
from demuon.app.peers import build_peers
from demuon.app.run import prepare
from demuon.config import Config, config_from_dict, math_fingerprint
from demuon.errors import CheckpointError
from demuon.node.checkpoint import (
    TRAILER,
    checkpoint_path,
    load_checkpoint,
    previous_path,
    remove_leftover_temp_files,
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


def model_bytes(peer: Peer) -> tuple[str, bytes]:
    """The name and raw bytes of the peer's first model tensor, as torch.save stores them."""
    name = peer.names[0]
    return name, peer.params[name].detach().cpu().numpy().tobytes()


def flip_a_bit(path: Path, inside: bytes) -> bytes:
    """Flip one bit in the middle of the first copy of ``inside`` in the file; return the file."""
    data = bytearray(path.read_bytes())
    at = data.find(inside)
    assert at > 0
    data[at + len(inside) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return bytes(data)


def two_saves(tmp_path: Path, config: Config) -> tuple[Peer, dict[str, torch.Tensor], bytes]:
    """Peer 0 saved after round 1 and again after round 3. Returns the peer, its model at the
    first save and the raw bytes of one tensor of the second."""
    peers = built(config)
    peer = peers[0]
    run_rounds(peers, range(2))
    save_checkpoint(tmp_path, peer, math_fingerprint(config))
    first = {n: p.detach().clone() for n, p in peer.params.items()}
    run_rounds(peers, range(2, 4))
    save_checkpoint(tmp_path, peer, math_fingerprint(config))
    return peer, first, model_bytes(peer)[1]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_one_flipped_bit_in_the_model_is_refused_in_one_line(tmp_path: Path) -> None:
    config = small_config()
    peers = built(config)
    peer = peers[0]
    run_rounds(peers, range(2))
    path = save_checkpoint(tmp_path, peer, math_fingerprint(config))
    name, raw = model_bytes(peer)
    damaged = flip_a_bit(path, raw)
    # a plain torch.load (no digest) still reads the file, silently, as a different model
    unchecked = torch.load(io.BytesIO(damaged), weights_only=True)
    assert not torch.equal(unchecked["state"]["model"][name], peer.params[name])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, 0, math_fingerprint(config))
    message = str(err.value)
    assert "\n" not in message
    assert message == f"corrupt checkpoint: SHA-256 digest does not match the contents ({path})"
    assert err.value.path == str(path)


@pytest.mark.parametrize(("offset", "reason"), [(7, "the trailer says"), (20, "digest does not match")])
def test_a_flipped_bit_in_the_trailer_is_refused(tmp_path: Path, offset: int, reason: str) -> None:
    config = small_config()
    path = save_checkpoint(tmp_path, built(config)[0], math_fingerprint(config))
    data = bytearray(path.read_bytes())
    data[len(data) - TRAILER.size + offset] ^= 0x01  # in the length, in the digest
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(tmp_path, 0, math_fingerprint(config))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = small_config()
    _, first, raw = two_saves(tmp_path, config)
    newest = checkpoint_path(tmp_path, 0)
    flip_a_bit(newest, raw)
    with caplog.at_level(logging.WARNING, logger="demuon.node.checkpoint"):
        blob = load_checkpoint(tmp_path, 0, math_fingerprint(config))
    assert blob["round"] == 1
    for name, tensor in first.items():
        assert torch.equal(blob["state"]["model"][name], tensor)
    resumed = built(config)[0]
    assert restore(resumed, blob) == 2
    [warning] = warnings_of(caplog)
    assert "\n" not in warning
    assert str(newest) in warning and "digest does not match" in warning
    assert f"falling back to {previous_path(tmp_path, 0)} of round 1" in warning


@pytest.mark.parametrize("keep", [0, 50, -1])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: int
) -> None:
    config = small_config()
    two_saves(tmp_path, config)
    newest = checkpoint_path(tmp_path, 0)
    data = newest.read_bytes()
    newest.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with caplog.at_level(logging.WARNING, logger="demuon.node.checkpoint"):
        assert load_checkpoint(tmp_path, 0, math_fingerprint(config))["round"] == 1
    [warning] = warnings_of(caplog)
    assert "truncated" in warning and str(newest) in warning


def test_saves_keep_the_last_two_checkpoints_and_the_newest_loads(tmp_path: Path) -> None:
    config = small_config()
    fp = math_fingerprint(config)
    peers = built(config)
    peer = peers[0]
    for k in range(3):
        run_rounds(peers, range(k, k + 1))
        save_checkpoint(tmp_path, peer, fp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer-0.prev.pt", "peer-0.pt"]
    blob = load_checkpoint(tmp_path, 0, fp)
    assert blob["round"] == 2
    for name in peer.names:
        assert torch.equal(blob["state"]["model"][name], peer.params[name])
    previous = previous_path(tmp_path, 0)
    previous.rename(checkpoint_path(tmp_path, 0))  # the older file is itself a good checkpoint
    assert load_checkpoint(tmp_path, 0, fp)["round"] == 1


def test_a_crash_between_the_renames_leaves_the_previous_checkpoint_to_resume_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = small_config()
    peers = built(config)
    peer = peers[0]
    run_rounds(peers, range(2))
    save_checkpoint(tmp_path, peer, math_fingerprint(config))
    run_rounds(peers, range(2, 4))
    real_replace = os.replace
    calls: list[object] = []

    def crash_on_second(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, peer, math_fingerprint(config))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer-0.prev.pt"]
    with caplog.at_level(logging.WARNING, logger="demuon.node.checkpoint"):
        assert load_checkpoint(tmp_path, 0, math_fingerprint(config))["round"] == 1
    [warning] = warnings_of(caplog)
    assert "no checkpoint for peer 0" in warning and "of round 1" in warning


def test_when_neither_checkpoint_is_good_the_error_names_the_newest_and_both_reasons(
    tmp_path: Path,
) -> None:
    config = small_config()
    two_saves(tmp_path, config)
    newest, previous = checkpoint_path(tmp_path, 0), previous_path(tmp_path, 0)
    newest.write_bytes(newest.read_bytes()[:100])
    previous.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, 0, math_fingerprint(config))
    message = str(err.value)
    assert err.value.path == str(newest) and message.endswith(f"({newest})")
    assert "\n" not in message
    assert message.startswith("corrupt checkpoint: no demuon.checkpoint/2 trailer (truncated")
    assert f"the previous checkpoint {previous} is unusable too: corrupt checkpoint: no" in message


def test_an_intact_newest_of_another_configuration_is_refused_not_passed_over(tmp_path: Path) -> None:
    config, other = small_config(), small_config(algorithm={"lr": 0.5})
    peer = built(config)[0]
    save_checkpoint(tmp_path, peer, math_fingerprint(config))
    save_checkpoint(tmp_path, peer, math_fingerprint(other))  # the good older one is ours
    with pytest.raises(CheckpointError, match="different configuration") as err:
        load_checkpoint(tmp_path, 0, math_fingerprint(config))
    assert err.value.path == str(checkpoint_path(tmp_path, 0))


def test_a_damaged_newest_does_not_fall_back_to_another_configurations_checkpoint(tmp_path: Path) -> None:
    config, other = small_config(), small_config(algorithm={"lr": 0.5})
    peer = built(config)[0]
    save_checkpoint(tmp_path, peer, math_fingerprint(other))
    save_checkpoint(tmp_path, peer, math_fingerprint(config))
    flip_a_bit(checkpoint_path(tmp_path, 0), model_bytes(peer)[1])
    with pytest.raises(CheckpointError, match="digest does not match") as err:
        load_checkpoint(tmp_path, 0, math_fingerprint(config))
    assert "unusable too: checkpoint was written with a different configuration" in str(err.value)


def test_a_format_1_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    config = small_config()
    buf = io.BytesIO()
    torch.save({"format": "demuon.checkpoint/1", "peer": 0}, buf)
    checkpoint_path(tmp_path, 0).write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"no demuon\.checkpoint/2 trailer .* older format"):
        load_checkpoint(tmp_path, 0, math_fingerprint(config))


def leave_temp_files(folder: Path) -> list[str]:
    """Temp files as killed writes leave them: peer 0's (both names), peer 1's and peer 10's."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [".peer-0.pt.k3x_9a2b", ".peer-0.prev.pt.q0w1e2r3", ".peer-1.pt.abcdefgh", ".peer-10.pt.zz"]
    for name in names:
        (folder / name).write_bytes(b"half a checkpoint")
    (folder / "notes.txt").write_text("kept")
    return names


def test_a_save_removes_this_peers_leftover_temp_files_first(tmp_path: Path) -> None:
    config = small_config()
    leave_temp_files(tmp_path)
    save_checkpoint(tmp_path, built(config)[0], math_fingerprint(config))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".peer-1.pt.abcdefgh", ".peer-10.pt.zz", "notes.txt", "peer-0.pt"]
    removed = remove_leftover_temp_files(tmp_path, 1)
    assert [p.name for p in removed] == [".peer-1.pt.abcdefgh"]
    assert remove_leftover_temp_files(tmp_path / "absent", 0) == []


def test_starting_a_peer_removes_its_leftover_temp_files(tmp_path: Path) -> None:
    config = small_config()
    leave_temp_files(tmp_path / "checkpoint")
    start = prepare(config, 1, tmp_path)
    assert start.round == 0
    left = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert left == [".peer-0.prev.pt.q0w1e2r3", ".peer-0.pt.k3x_9a2b", ".peer-10.pt.zz", "notes.txt"]


def test_demuon_run_resume_refuses_a_flipped_bit_in_one_line_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from demuon.app import cli
    from demuon.config import load_config
    from tests.support.cluster import RING

    config = load_config(RING)
    peer = build_peers(config)[0][0]
    out = tmp_path / "peer-0"
    path = save_checkpoint(out / "checkpoint", peer, math_fingerprint(config))
    flip_a_bit(path, model_bytes(peer)[1])
    assert cli.main(["run", "--config", str(RING), "--peer", "0", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: corrupt checkpoint: SHA-256 digest does not match the contents ({path})"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]  # nothing started, nothing written
