"""``demuon netlab``: a 4-peer ring with every peer in its own network namespace, one link cut
for a second and restored: training goes on, the ring is whole again at the end, and every
namespace the tool created is gone afterwards (also the ones of a run that fails)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from demuon import results
from tests.support.cluster import RING
from tests.support.netns import Lan, existing_namespaces

pytestmark = pytest.mark.netns
TAIL = 5
TIMEOUT_S = 240


def netlab(out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "demuon", "netlab", "--config", str(RING), "--out", str(out), "--no-live"]
    return subprocess.run([*argv, *options], capture_output=True, text=True, timeout=TIMEOUT_S)


def netlab_namespaces() -> set[str]:
    """The namespaces of any ``demuon netlab`` (named ``dn<pid>…``; other tests use other names)."""
    return {name for name in existing_namespaces() if name.startswith("dn")}


@pytest.mark.slow  # four peer processes in namespaces, about 20 s: make test-slow
def test_a_cut_link_is_restored_and_the_ring_recovers_and_nothing_is_left_behind(tmp_path: Path) -> None:
    before = netlab_namespaces()
    # Nobody is marked down (down_after_misses is large), so the neighbours wait out each short
    # deadline for peer 2 while it is unplugged instead of running far ahead: the run length
    # then does not race the restore, however loaded the machine is.
    sets = ["rounds=200", "network.phase_timeout_s=0.25", "network.down_after_misses=1000"]
    done = netlab(tmp_path / "run", "--cut", "2@5+1", *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "peer 2 unplugged at round" in done.stderr and "peer 2 plugged back in" in done.stderr
    assert netlab_namespaces() == before  # everything it created is gone
    per_peer = results.read_per_peer(tmp_path / "run")
    assert sorted(per_peer) == [0, 1, 2, 3]
    assert any({1, 3} <= set(r["missing"]) for r in per_peer[2]), "the cut never showed"
    for i, rows in per_peer.items():
        assert rows[-1]["round"] == 199, f"peer {i} ended at {rows[-1]['round']}"
        tail = [(r["round"], r["missing"], r["down"]) for r in rows[-TAIL:]]
        assert all(not missing and not down for _, missing, down in tail), (i, tail)
    summary = results.read_summary(tmp_path / "run")
    assert [p["status"] for p in summary["peers"]] == ["done"] * 4


def test_a_bad_option_fails_in_one_line_before_any_namespace_exists(tmp_path: Path) -> None:
    before = netlab_namespaces()
    done = netlab(tmp_path / "run", "--cut", "two@5")
    assert done.returncode == 2
    assert "--cut='two@5': expected PEER@ROUND+SECONDS" in done.stderr
    assert netlab_namespaces() == before


def test_loss_drops_what_the_peer_receives_inside_its_namespace_only(tmp_path: Path) -> None:
    """``--loss 1=100`` in a two-namespace LAN: UDP datagrams to peer 1 all vanish, the rule is in
    peer 1's namespace (not the host's), and the namespaces are gone afterwards."""
    from demuon.app.netlab import IPTABLES, lan

    probe = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3.0); "
        "s.bind((sys.argv[1], 9999)); "
        "print('got' if s.recvfrom(64) else '')"
    )
    send = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "[s.sendto(b'x', (sys.argv[1], 9999)) for _ in range(20)]"
    )

    def delivered(net: Lan) -> bool:
        receiver = subprocess.Popen(
            [*net.exec_prefix(1), sys.executable, "-c", probe, net.addr(1)], stdout=subprocess.PIPE, text=True
        )
        try:
            for _ in range(5):  # the receiver binds within a second; send a few bursts
                subprocess.run(
                    [*net.exec_prefix(0), sys.executable, "-c", send, net.addr(1)], check=True, timeout=30
                )
            out, _ = receiver.communicate(timeout=30)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        return "got" in out

    before = existing_namespaces()
    with lan(2, f"dl{os.getpid() % 100000}") as net:
        assert delivered(net)  # the link works
        net.lose(1, 100.0)
        rules = subprocess.run([*net.exec_prefix(1), IPTABLES, "-S", "INPUT"], capture_output=True, text=True)
        assert "statistic" in rules.stdout and "DROP" in rules.stdout
        assert not delivered(net)  # and now everything peer 1 receives is dropped
    assert existing_namespaces() == before
