"""``demuon netlab``: a local cluster with real links, every peer in its own network namespace
(root only; layer 6).

    demuon netlab --config cluster.toml --out DIR [--cut PEER@ROUND+SECONDS ...]
                  [--rate PEER=RATE ...] [--loss PEER=PERCENT ...] [launch's options]

It builds a private LAN: a *switch* namespace with a bridge and one namespace per peer, joined to
the bridge by a veth pair (peer side ``eth0`` with ``10.213.<subnet>.<i+1>/24``). Nothing is
connected to the host's namespace or any other network: the peers' traffic never leaves these
namespaces. Each peer runs ``demuon run`` inside its namespace, bound to its own address, and the
run is watched and summarised as ``demuon launch`` does it (same run folder, same live view).

Link faults, all on peer ``i``'s link:

* ``--cut i@R+S``: once peer ``i`` has logged round ``R``, unplug its switch port (packets vanish
  both ways, no reset), and plug it back ``S`` seconds later;
* ``--rate i=RATE``: a token bucket (``tc tbf``) limits what peer ``i`` sends (tc syntax:
  ``16kbit``, ``10mbit``);
* ``--loss i=P``: iptables in peer ``i``'s namespace drops P % of the packets it receives at
  random (``statistic --mode random``; not replayable, unlike a ``--faults`` plan).

Everything it creates is removed on exit, also on an error or Ctrl-C (processes still running in
the namespaces are killed first). ``tc netem`` is not used (not available on every kernel).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from demuon.app.launch import PeerProcess, check_peer_faults, console, run_cluster
from demuon.config import load_config
from demuon.errors import ConfigError, DemuonError

IP = "/usr/sbin/ip"
TC = "/usr/sbin/tc"
IPTABLES = "iptables"
#: Longest interface name the kernel accepts (IFNAMSIZ − 1).
IFNAME_MAX = 15
#: Seconds any one ``ip``/``tc``/``iptables`` command may take.
COMMAND_TIMEOUT_S = 20.0
BRIDGE = "br0"
PEER_IF = "eth0"


class NetlabError(DemuonError):
    """A namespace command failed; ``command`` is what ran."""

    def __init__(self, message: str, *, command: Sequence[str] = ()) -> None:
        self.command = tuple(command)
        super().__init__(message)


def run_command(args: Sequence[str], what: str) -> str:
    """Run one command; a failure raises :class:`NetlabError` naming it and its stderr."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetlabError(f"{what}: `{' '.join(args)}` could not run: {exc}", command=args) from exc
    if done.returncode != 0:
        raise NetlabError(
            f"{what}: `{' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}"
            " (network namespaces need root, iproute2 and tc; --loss needs iptables)",
            command=args,
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

    def lose(self, i: int, percent: float) -> None:
        """Drop ``percent`` % of the packets peer ``i`` receives, at random (iptables)."""
        rule = ["-m", "statistic", "--mode", "random", "--probability", f"{percent / 100:.4f}", "-j", "DROP"]
        run_command(
            [*self.exec_prefix(i), IPTABLES, "-A", "INPUT", "-i", PEER_IF, *rule], f"loss on peer {i}"
        )

    def qdisc(self, i: int) -> str:
        """``tc -s qdisc show`` of peer ``i``'s ``eth0`` (sent/dropped counters)."""
        return run_command([*self.exec_prefix(i), TC, "-s", "qdisc", "show", "dev", PEER_IF], "tc show")

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"peer {i} is not on this LAN of {self.n}")


def existing_namespaces() -> set[str]:
    """Names of the network namespaces that exist now (``ip netns list``)."""
    return {
        line.split()[0] for line in run_command([IP, "netns", "list"], "list namespaces").splitlines() if line
    }


def _add_namespace(net: Lan, name: str) -> None:
    run_command([IP, "netns", "add", name], f"create network namespace {name}")
    net.created.append(name)
    # IPv4 only: no IPv6 duplicate detection or router solicitations on the private links
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
            for pid in _namespace_pids(name):
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


@contextmanager
def lan(n: int, tag: str) -> Iterator[Lan]:
    """``n`` peer namespaces on one bridge (see the module docstring); removed on exit, also
    when the body or the set-up fails or is interrupted."""
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
        raise NetlabError(f"could not remove network namespaces: {problems}")


# ---------------------------------------------------------------------------------- the command

CUT = re.compile(r"^(\d+)@(\d+)\+(\d+(?:\.\d+)?)$")
SETTING = re.compile(r"^(\d+)=(\S+)$")


@dataclass
class Cut:
    peer: int
    at_round: int
    seconds: float
    down_since: float | None = None
    done: bool = False


def parse_cut(text: str) -> Cut:
    m = CUT.match(text)
    if m is None:
        raise ConfigError("--cut", text, "expected PEER@ROUND+SECONDS, e.g. 2@10+1.5")
    return Cut(int(m.group(1)), int(m.group(2)), float(m.group(3)))


def parse_setting(option: str, text: str) -> tuple[int, str]:
    m = SETTING.match(text)
    if m is None:
        raise ConfigError(option, text, "expected PEER=VALUE, e.g. 2=16kbit")
    return int(m.group(1)), m.group(2)


class LinkCuts:
    """The ``--cut`` events of a run (see the module docstring), driven by the watch loop."""

    def __init__(self, net: Lan, cuts: Sequence[Cut]) -> None:
        self.net = net
        self.cuts = list(cuts)

    @property
    def waiting(self) -> bool:
        return any(c.down_since is not None and not c.done for c in self.cuts)

    def step(self, peers: Sequence[PeerProcess]) -> None:
        now = time.monotonic()
        for c in self.cuts:
            p = peers[c.peer]
            if c.down_since is None and p.round is not None and p.round >= c.at_round:
                self.net.link_down(c.peer)
                c.down_since = now
                console.print(f"netlab: peer {c.peer} unplugged at round {p.round} for {c.seconds:g}s")
            elif c.down_since is not None and not c.done and now - c.down_since >= c.seconds:
                self.net.link_up(c.peer)
                c.done = True
                console.print(f"netlab: peer {c.peer} plugged back in")


def cmd_netlab(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise DemuonError("demuon netlab creates network namespaces: run it as root")
    config_path = Path(args.config).resolve()
    config = load_config(config_path, args.set, faults=args.faults)
    check_peer_faults(config)
    cuts = [parse_cut(c) for c in args.cut]
    rates = [parse_setting("--rate", r) for r in args.rate]
    losses = [(i, float(v)) for i, v in (parse_setting("--loss", x) for x in args.loss)]
    for option, i in [("--cut", c.peer) for c in cuts] + [("--rate", i) for i, _ in rates + losses]:
        if not 0 <= i < config.peers:
            raise ConfigError(option, i, f"peer {i} is not in 0..{config.peers - 1}")
    port = config.network.base_port
    with lan(config.peers, f"dn{os.getpid() % 100000}") as net:
        entries = ", ".join(f'{{id = {i}, endpoint = "tcp://{net.addr(i)}:{port}"}}' for i in range(net.n))
        overrides = [*args.set, f"network.peers=[{entries}]"]
        console.print(f"netlab: {net.n} namespaces on 10.213.{net.subnet}.0/24 ({net.tag}*)")
        for i, rate in rates:
            net.shape(i, rate)
        for i, percent in losses:
            net.lose(i, percent)
        return run_cluster(
            args, config_path, config, overrides, prefix=net.exec_prefix, events=[LinkCuts(net, cuts)]
        )
