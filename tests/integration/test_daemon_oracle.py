"""The oracle: a cluster of `demuon run` processes over ZeroMQ (tcp loopback) ends with exactly the
simulator's parameters, and with compression it keeps the tracking invariant mean V = mean M.

Also home of the helpers the daemon fault tests share (:class:`Cluster`)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from demuon import results, simulate
from demuon.config import Config, load_config
from demuon.node.checkpoint import load_checkpoint, restore
from demuon.node.daemon import Control, Daemon, DaemonStatus, RoundHook
from demuon.node.gossip import Gossip, Inbound
from demuon.transport.inproc import InprocHub, InprocTransport
from demuon.workloads import make_workload

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
PROCESS_TIMEOUT_S = 120.0  # one peer process, start to exit, on a slow 2-core machine


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while being picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def endpoints_setting(ports: Sequence[int]) -> str:
    entries = ", ".join(f'{{id = {i}, endpoint = "tcp://127.0.0.1:{p}"}}' for i, p in enumerate(ports))
    return f"network.peers=[{entries}]"


class Cluster:
    """Peer processes of one config file; every process is killed and reaped on exit."""

    def __init__(self, root: Path, config_file: Path, sets: Sequence[str]) -> None:
        self.root = root
        self.config_file = config_file
        self.config = load_config(config_file, list(sets))
        self.sets = [endpoints_setting(free_ports(self.config.peers)), *sets]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.starts: dict[int, int] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEMUON__")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        self.env = env

    def out(self, i: int) -> Path:
        return self.root / f"peer-{i}"

    def prefix(self, i: int) -> list[str]:
        """What runs peer ``i``'s command (nothing here; e.g. ``ip netns exec NS`` in a subclass)."""
        return []

    def start(self, i: int, *extra: str) -> subprocess.Popen[bytes]:
        n = self.starts[i] = self.starts.get(i, 0) + 1
        args = [*self.prefix(i), sys.executable, "-m", "demuon", "run"]
        args += ["--config", str(self.config_file), "--peer", str(i)]
        args += ["--out", str(self.out(i)), *extra]
        for s in self.sets:
            args += ["--set", s]
        with (self.root / f"stderr-{i}.{n}.txt").open("wb") as err:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=self.env, cwd=self.root)
        self.procs[i] = proc
        return proc

    def wait(self, i: int, timeout_s: float = PROCESS_TIMEOUT_S) -> int:
        try:
            return self.procs[i].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"peer {i} did not exit within {timeout_s}s\n{self.logs(i)}")

    def wait_all(self) -> None:
        for i in sorted(self.procs):
            assert self.wait(i) == 0, f"peer {i} failed\n{self.logs(i)}"

    def logs(self, i: int) -> str:
        files = sorted(self.root.glob(f"stderr-{i}.*.txt"))
        return "\n".join(f.read_text(errors="replace")[-3000:] for f in files)

    def rows(self, i: int) -> list[dict[str, Any]]:
        path = self.out(i) / "metrics.jsonl"
        return results.read_metrics(path) if path.exists() else []

    def final_params(self, i: int) -> dict[str, torch.Tensor]:
        params: dict[str, torch.Tensor] = torch.load(self.out(i) / "final.pt", weights_only=True)
        return params

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@contextmanager
def cluster(root: Path, config_file: Path, *sets: str) -> Iterator[Cluster]:
    c = Cluster(root, config_file, sets)
    try:
        yield c
    finally:
        c.kill_all()


def assert_same_as_simulator(c: Cluster, config: Config, atol: float = 1e-5) -> bool:
    """Every peer's final parameters equal the simulator's; returns whether they are bitwise equal."""
    reference = simulate.run(config).peers
    bitwise = True
    for peer in reference:
        got = c.final_params(peer.index)
        assert list(got) == list(peer.names)
        for name in peer.names:
            want = peer.params[name].detach()
            assert got[name].dtype == torch.float32
            assert torch.allclose(got[name], want, rtol=0.0, atol=atol), f"peer {peer.index} {name}"
            bitwise = bitwise and torch.equal(got[name], want)
    return bitwise


def inproc_daemon(
    config: Config,
    hub: InprocHub,
    index: int,
    root: Path,
    *,
    on_round: RoundHook | None = None,
    control: Control | None = None,
    resume: bool = False,
) -> Daemon:
    """Peer ``index`` as a daemon on ``hub``; with ``resume``, restored from its checkpoint."""
    workload = make_workload(config.workload, seed=config.seed, device=torch.device("cpu"))
    peer = simulate.build_peers(config, workload, torch.device("cpu"))[index]
    out = root / f"peer-{index}"
    start = restore(peer, load_checkpoint(out / "checkpoint", index, config)) if resume else 0
    gossip = Gossip(peer, config, start_round=start)
    gossip.transport = InprocTransport[Inbound](index, hub, gossip.decode)
    return Daemon(
        peer,
        config,
        gossip,
        gossip.transport,
        out=out,
        checkpoint_dir=out / "checkpoint",
        start_round=start,
        resumed=resume,
        on_round=on_round,
        control=control,
        handle_signals=False,
    )


def inproc_daemons(
    config: Config,
    root: Path,
    *,
    hooks: dict[int, RoundHook] | None = None,
    controls: dict[int, Control] | None = None,
) -> list[Daemon]:
    """One daemon per peer on one in-process hub (call inside the event loop that runs them)."""
    hub = InprocHub(range(config.peers))
    return [
        inproc_daemon(config, hub, i, root, on_round=(hooks or {}).get(i), control=(controls or {}).get(i))
        for i in range(config.peers)
    ]


async def test_daemons_in_one_process_match_the_simulator_and_report_every_round(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "oracle-ring4.toml")
    seen: dict[int, list[int]] = {i: [] for i in range(config.peers)}

    def recorder(i: int) -> RoundHook:
        return lambda row: seen[i].append(row["round"])

    hooks = {i: recorder(i) for i in seen}
    daemons = inproc_daemons(config, tmp_path, hooks=hooks)
    statuses = await asyncio.gather(*(d.run() for d in daemons))
    assert statuses == [DaemonStatus.STOPPED] * config.peers
    reference = simulate.run(config).peers
    for d, ref in zip(daemons, reference, strict=True):
        assert seen[d.peer.index] == list(range(config.rounds))
        final = torch.load(tmp_path / f"peer-{d.peer.index}" / "final.pt", weights_only=True)
        assert torch.equal(final["weight"], ref.params["weight"].detach())
        await d.close()  # idempotent


@pytest.mark.parametrize("config_name", ["oracle-ring4.toml", "oracle-expo4.toml"])
def test_a_zeromq_cluster_ends_with_exactly_the_simulators_parameters(
    tmp_path: Path, config_name: str
) -> None:
    with cluster(tmp_path, CONFIGS / config_name) as c:
        for i in range(c.config.peers):
            c.start(i)
        c.wait_all()
        for i in range(c.config.peers):
            rows = c.rows(i)
            assert [r["round"] for r in rows] == list(range(c.config.rounds))
            assert all(r["missing"] == [] and r["down"] == [] for r in rows), c.logs(i)
        bitwise = assert_same_as_simulator(c, c.config)
    print(f"{config_name}: bitwise equal to the simulator: {bitwise}")
    assert bitwise  # same inputs, same summation order, one torch thread: not merely close


def test_with_top_k_compression_the_cluster_keeps_mean_v_equal_to_mean_m_at_every_round(
    tmp_path: Path,
) -> None:
    topk = ("gossip.codec={kind = 'topk', ratio = 0.1}", "gossip.gamma=0.2")
    with cluster(tmp_path, CONFIGS / "oracle-ring4.toml", *topk) as c:
        for i in range(c.config.peers):
            c.start(i)
        c.wait_all()
        rows = [c.rows(i) for i in range(c.config.peers)]
        for k in range(c.config.rounds):
            at_k = [r[k] for r in rows]
            assert all(r["round"] == k and r["missing"] == [] for r in at_k)
            sum_V = torch.tensor([r["sum_V"] for r in at_k], dtype=torch.float64).sum(0)
            sum_M = torch.tensor([r["sum_M"] for r in at_k], dtype=torch.float64).sum(0)
            scale = 1.0 + torch.tensor([r["sum_M"] for r in at_k], dtype=torch.float64).abs().sum()
            assert (sum_V - sum_M).abs().max() <= 1e-4 * scale, f"round {k}: {sum_V} vs {sum_M}"
        assert_same_as_simulator(c, c.config)  # replicas evolve as in the simulator, too


def test_a_curve_secured_cluster_with_keys_from_the_cli_matches_the_simulator(tmp_path: Path) -> None:
    from demuon import cli

    keys = tmp_path / "keys"
    assert cli.main(["keys", "generate", str(keys), "--peers", "4"]) == 0
    assert sorted(p.name for p in keys.glob("*.key_secret")) == [f"peer-{i}.key_secret" for i in range(4)]
    secure = ("security.enabled=true", f"security.key_dir='{keys}'", "rounds=6")
    with cluster(tmp_path / "run", CONFIGS / "oracle-ring4.toml", *secure) as c:
        c.root.mkdir(parents=True, exist_ok=True)
        for i in range(c.config.peers):
            c.start(i)
        c.wait_all()
        assert all(c.rows(i)[-1]["round"] == 5 for i in range(c.config.peers))
        assert assert_same_as_simulator(c, c.config)
