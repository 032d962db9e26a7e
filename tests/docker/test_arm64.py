"""A mixed cluster: two amd64 and two arm64 containers (``demuon:arm64`` runs under qemu-user-static)
train the oracle's quadratic workload on a ring, every link between an amd64 and an arm64 peer,
and end where the simulator ends: each peer's parameters equal the simulator's up to the float
rounding of two torch builds (2.13 on amd64, 2.10 on arm64), and the peers' spread (the
simulator's consensus error, computed from their final parameters) is the simulator's.

Slow (emulated torch: minutes), so ``make test-docker`` runs it only with ``ARM64=1``
(``make test-docker-arm64``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from demuon import results
from demuon.app import simulate
from demuon.app.summary import launch_summary
from demuon.config import ENV_PREFIX, load_config
from demuon.node.observe import consensus_error_of
from tests.docker.conftest import Docker, Images, Sandbox
from tests.support.cluster import CONFIGS

pytestmark = pytest.mark.docker

ROUNDS = 6
PORT = 27400
SETS = (
    f"rounds={ROUNDS}",
    "security.enabled=false",
    # emulated torch imports and steps are slow: generous deadlines, never reached by a healthy run
    "network.start_timeout_s=420.0",
    "network.phase_timeout_s=180.0",
)
#: peer i's architecture: every ring link joins an amd64 and an arm64 peer
ARCH = {0: "amd64", 1: "arm64", 2: "amd64", 3: "arm64"}
RUN_TIMEOUT_S = 900.0


def test_two_amd64_and_two_arm64_peers_train_together_and_match_the_simulator(
    docker: Docker, images: Images, sandbox: Sandbox, tmp_path: Path
) -> None:
    tags = {"amd64": images.require(images.peer), "arm64": images.require(images.peer_arm64)}
    for arch, tag in tags.items():
        assert docker("image", "inspect", "--format", "{{.Architecture}}", tag).strip() == arch, tag
    config_file = CONFIGS / "oracle-ring4.toml"
    config = load_config(config_file, list(SETS))
    cluster_toml = tmp_path / "cluster.toml"
    cluster_toml.write_text(config_file.read_text())
    cluster_toml.chmod(0o644)

    network = sandbox.network()
    peers = [{"id": i, "endpoint": f"tcp://peer-{i}:{PORT + i}"} for i in range(config.peers)]
    env = {f"{ENV_PREFIX}NETWORK__PEERS": json.dumps(peers)}
    sets = [arg for s in SETS for arg in ("--set", s)]
    cids = {
        i: sandbox.run(
            tags[ARCH[i]],
            *("demuon", "run", "--config", "/config/cluster.toml", "--peer", str(i), "--out", "/runs", *sets),
            name=f"peer-{i}",
            network=network,
            env=env,
            files={"/config/cluster.toml": cluster_toml},
        )
        for i in range(config.peers)
    }
    machines = {i: docker("exec", cid, "uname", "-m").strip() for i, cid in cids.items()}
    assert machines == {i: {"amd64": "x86_64", "arm64": "aarch64"}[a] for i, a in ARCH.items()}

    codes = {i: sandbox.wait(cid, RUN_TIMEOUT_S) for i, cid in cids.items()}
    assert codes == dict.fromkeys(cids, 0), {i: sandbox.logs(cid) for i, cid in cids.items() if codes[i]}

    for i, cid in cids.items():
        sandbox.copy_out(cid, "/runs", results.peer_folder(tmp_path, i))
    summary_path = results.write_summary(tmp_path, launch_summary(config, tmp_path))
    summary = json.loads(summary_path.read_text())
    assert summary["failed"] == [] and summary["n_peers"] == config.peers
    assert [(p["id"], p["status"], p["final_round"]) for p in summary["peers"]] == [
        (i, "done", ROUNDS - 1) for i in range(config.peers)
    ]
    rows = {i: results.read_metrics(results.peer_folder(tmp_path, i) / results.METRICS) for i in cids}
    assert all([r["round"] for r in rows[i]] == list(range(ROUNDS)) for i in rows)
    assert all(r["missing"] == [] for i in rows for r in rows[i])

    reference = simulate.run(config)
    finals = [
        torch.load(results.peer_folder(tmp_path, i) / "final.pt", weights_only=True)
        for i in range(config.peers)
    ]
    for i, (final, ref) in enumerate(zip(finals, reference.peers, strict=True)):
        for name in ref.names:
            want = ref.params[name].detach()
            gap = float((final[name] - want).abs().max())
            assert gap <= 1e-4 * (1.0 + float(want.abs().max())), (i, ARCH[i], name, gap)
    expected = reference.cluster[-1]["consensus_error"]
    assert reference.cluster[0]["consensus_error"] > expected  # the simulator's peers draw together
    assert consensus_error_of(finals) == pytest.approx(expected, rel=1e-3, abs=1e-6)
