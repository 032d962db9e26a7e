"""Helpers the daemon tests share: multi-process clusters of `demuon run` over loopback ZeroMQ
(:class:`Cluster`, every process killed and reaped on exit) and in-process daemons on one
:class:`~demuon.transport.inproc.InprocHub` (:func:`inproc_daemons`)."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from demuon import results
from demuon.app import simulate
from demuon.app.peers import build_peers, membership_of
from demuon.app.run import daemon_settings
from demuon.config import Config, load_config, math_fingerprint
from demuon.node.checkpoint import load_checkpoint, restore
from demuon.node.daemon import Control, Daemon, RoundHook
from demuon.node.gossip import Gossip, Inbound
from demuon.transport import wire
from demuon.transport.base import Transport
from demuon.transport.faults import FaultyTransport, plan_from_config
from demuon.transport.inproc import InprocHub, InprocTransport

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "demuon" / "configs"
RING = CONFIGS / "oracle-ring4.toml"
#: Slack allowed on top of a phase deadline in a recorded wait (scheduling on a loaded machine).
WAIT_TOLERANCE_S = 1.0
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
            assert got[name].dtype == want.dtype
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
    wrap: Callable[[Transport[Inbound]], Transport[Inbound]] | None = None,
) -> Daemon:
    """Peer ``index`` as a daemon on ``hub``; with ``resume``, restored from its checkpoint; ``wrap``
    (e.g. a FaultyTransport) wraps its transport."""
    peer = build_peers(config.model_copy(update={"device": "cpu"}))[0][index]
    out = root / f"peer-{index}"
    fingerprint = math_fingerprint(config)
    start = restore(peer, load_checkpoint(out / "checkpoint", index, fingerprint)) if resume else 0
    plan = plan_from_config(config.faults)  # the config's own fault plan, as `demuon run` applies it
    gossip = Gossip(
        peer, config.network, n_peers=config.peers, rounds=config.rounds, start_round=start, plan=plan
    )
    inner: Transport[Inbound] = InprocTransport[Inbound](index, hub, gossip.decode)
    if plan.rules:
        inner = FaultyTransport(inner, plan, key_of=wire.peek)
    gossip.transport = wrap(inner) if wrap is not None else inner
    return Daemon(
        peer,
        daemon_settings(config, index),
        gossip,
        gossip.transport,
        out=out,
        checkpoint_dir=out / "checkpoint",
        start_round=start,
        resumed=resume,
        on_round=on_round,
        control=control,
        handle_signals=False,
        membership=membership_of(config, index),
    )


def inproc_daemons(
    config: Config,
    root: Path,
    *,
    hooks: dict[int, RoundHook] | None = None,
    controls: dict[int, Control] | None = None,
    wrap: Callable[[int, Transport[Inbound]], Transport[Inbound]] | None = None,
    peers: Sequence[int] | None = None,
) -> list[Daemon]:
    """One daemon per peer on one in-process hub (call inside the event loop that runs them)."""
    hub = InprocHub(range(config.peers))
    return [
        inproc_daemon(
            config,
            hub,
            i,
            root,
            on_round=(hooks or {}).get(i),
            control=(controls or {}).get(i),
            wrap=None if wrap is None else functools.partial(wrap, i),
        )
        for i in (range(config.peers) if peers is None else peers)
    ]


def wait_for(condition: Callable[[], bool], what: str, c: Cluster, i: int, timeout_s: float = 120.0) -> None:
    """Poll ``condition`` (cheap file reads, every 20 ms) until true, failing after ``timeout_s``
    or if peer ``i`` exited first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if c.procs[i].poll() is not None and not condition():
            pytest.fail(f"peer {i} exited (rc {c.procs[i].returncode}) before {what}\n{c.logs(i)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{c.logs(i)}")
        time.sleep(0.02)
