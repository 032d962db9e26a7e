"""A private LAN of network namespaces for tests that need real links (root and ``ip`` required).

``lan(n, tag)`` creates a *switch* namespace holding a bridge and ``n`` peer namespaces, each
joined to the bridge by a veth pair: the peer side is ``eth0`` with ``10.213.<subnet>.<i+1>/24``
(plus ``lo``), the switch side is ``<tag>v<i>``, a bridge port. Nothing is connected to the host's
namespace or to any other network: traffic between the peers never leaves these namespaces.

A link fault is a change on one side of a veth: :meth:`Lan.link_down` sets the switch side down
(the peer's ``eth0`` loses its carrier; no RST, no FIN, packets are silently lost both ways) and
:meth:`Lan.link_up` brings it back; :meth:`Lan.shape` puts a token bucket (``tc tbf``) on the
peer's ``eth0``, limiting what the peer sends. Everything created is removed on exit, also when
the body or the set-up fails; processes still running inside the namespaces are killed first.

Names carry the caller's ``tag`` (make it unique per run, e.g. with the pid): namespaces
``<tag>sw`` and ``<tag>p<i>``; interface names stay under the kernel's 15-character limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

IP = "/usr/sbin/ip"
TC = "/usr/sbin/tc"
#: Longest interface name the kernel accepts (IFNAMSIZ − 1).
IFNAME_MAX = 15
#: Seconds any one ``ip``/``tc`` command may take.
COMMAND_TIMEOUT_S = 20.0
BRIDGE = "br0"
PEER_IF = "eth0"


def run_command(args: Sequence[str], what: str) -> str:
    """Run one set-up command; a failure fails the test naming the command and its stderr."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{what}: `{' '.join(args)}` could not run: {exc}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"{what}: `{' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}"
            " (network namespace tests need root, iproute2 and tc)",
            pytrace=False,
        )
    return done.stdout


def subnet_of(tag: str) -> int:
    """The third octet of the LAN's 10.213.x.0/24, derived from the tag (1..254)."""
    return zlib.crc32(tag.encode()) % 254 + 1


@dataclass
class Lan:
    """Handles on a LAN made by :func:`lan` (names, addresses and link operations)."""

    n: int
    tag: str
    subnet: int
    created: list[str] = field(default_factory=list)  # namespaces, in creation order

    @property
    def switch(self) -> str:
        return f"{self.tag}sw"

    def ns(self, i: int) -> str:
        """Namespace of peer ``i``."""
        self._check(i)
        return f"{self.tag}p{i}"

    def port(self, i: int) -> str:
        """Switch-side veth of peer ``i`` (a port of the bridge, in the switch namespace)."""
        self._check(i)
        return f"{self.tag}v{i}"

    def addr(self, i: int) -> str:
        """IPv4 address of peer ``i`` on its ``eth0``."""
        self._check(i)
        return f"10.213.{self.subnet}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program inside peer ``i``'s namespace."""
        return [IP, "netns", "exec", self.ns(i)]

    def link_down(self, i: int) -> None:
        """Unplug peer ``i``: its switch-side veth goes down (silent loss, no reset)."""
        run_command([IP, "-n", self.switch, "link", "set", self.port(i), "down"], f"unplug peer {i}")

    def link_up(self, i: int) -> None:
        """Plug peer ``i`` back in."""
        run_command([IP, "-n", self.switch, "link", "set", self.port(i), "up"], f"plug peer {i}")

    def shape(self, i: int, rate: str, *, burst_bytes: int = 1600, latency_ms: int = 5000) -> None:
        """Limit what peer ``i`` sends to ``rate`` (tc syntax, e.g. ``"24kbit"``) with a token
        bucket on its ``eth0``; packets wait up to ``latency_ms`` in the queue (delay, not loss)."""
        bucket = ["rate", rate, "burst", str(burst_bytes), "latency", f"{latency_ms}ms"]
        run_command(
            [*self.exec_prefix(i), TC, "qdisc", "replace", "dev", PEER_IF, "root", "tbf", *bucket],
            f"shape peer {i}",
        )

    def qdisc(self, i: int) -> str:
        """``tc -s qdisc show`` of peer ``i``'s ``eth0`` (sent/dropped counters)."""
        return run_command([*self.exec_prefix(i), TC, "-s", "qdisc", "show", "dev", PEER_IF], "tc show")

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"peer {i} is not on this LAN of {self.n}")


def _add_namespace(net: Lan, name: str) -> None:
    run_command([IP, "netns", "add", name], f"create network namespace {name}")
    net.created.append(name)
    # IPv4 only: no IPv6 duplicate detection or router solicitations on the test links
    for key in ("all", "default"):
        run_command(
            [IP, "netns", "exec", name, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"],
            f"disable IPv6 in {name}",
        )
    run_command([IP, "-n", name, "link", "set", "lo", "up"], f"bring up lo in {name}")


def _namespace_pids(name: str) -> list[int]:
    done = subprocess.run(
        [IP, "netns", "pids", name], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _remove(net: Lan) -> list[str]:
    """Kill what still runs in the LAN's namespaces, delete them; returns what could not be."""
    problems = []
    for name in reversed(net.created):
        try:
            for pid in _namespace_pids(name):  # processes this test started there
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            done = subprocess.run(
                [IP, "netns", "del", name], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
            )
            if done.returncode != 0:
                problems.append(f"{name}: {done.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{name}: {exc}")
    net.created.clear()
    return problems


@contextmanager
def lan(n: int, tag: str) -> Iterator[Lan]:
    """``n`` peer namespaces on one bridge (see the module docstring); removed on exit."""
    net = Lan(n=n, tag=tag, subnet=subnet_of(tag))
    longest = net.port(n - 1) if n > 0 else tag
    if len(longest) > IFNAME_MAX or not tag.isalnum():
        raise ValueError(f"tag {tag!r}: interface name {longest!r} must be alphanumeric, ≤ {IFNAME_MAX}")
    try:
        _build(net)
        yield net
    except BaseException:
        _remove(net)  # best effort: the failure in flight is the one to report
        raise
    problems = _remove(net)
    if problems:
        raise RuntimeError(f"could not remove network namespaces: {problems}")


def _build(net: Lan) -> None:
    _add_namespace(net, net.switch)
    sw = [IP, "-n", net.switch]
    run_command([*sw, "link", "add", BRIDGE, "type", "bridge"], "create the bridge")
    run_command([*sw, "link", "set", BRIDGE, "up"], "bring up the bridge")
    for i in range(net.n):
        peer = net.ns(i)
        _add_namespace(net, peer)
        run_command(
            [*sw, "link", "add", net.port(i), "type", "veth", "peer", "name", PEER_IF, "netns", peer],
            f"create the veth pair of peer {i}",
        )
        run_command([*sw, "link", "set", net.port(i), "master", BRIDGE], f"attach peer {i}")
        run_command([*sw, "link", "set", net.port(i), "up"], f"bring up port {i}")
        pn = [IP, "-n", peer]
        run_command([*pn, "addr", "add", f"{net.addr(i)}/24", "dev", PEER_IF], f"address peer {i}")
        run_command([*pn, "link", "set", PEER_IF, "up"], f"bring up eth0 of peer {i}")
