"""The daemon over real links: a ring of 4 `demuon run` processes, each in its own network namespace
on a private bridge (:mod:`tests.support.netns`), with one peer unplugged and plugged back in,
or throttled by a token bucket. Needs root; a failure to create the namespaces fails the test."""

from __future__ import annotations

import functools
import os
import re
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import RING, WAIT_TOLERANCE_S, Cluster, wait_for
from tests.support.netns import Lan, lan, run_command

#: Slow (about 20 s together): `make test-slow` runs them; `make test` runs the netlab tool's own
#: namespace test (tests/integration/test_netlab.py), which cuts and restores a link too.
pytestmark = [pytest.mark.netns, pytest.mark.slow]


#: The port every peer binds, each on its own address in its own namespace.
PORT = 27400
#: Rows at the end of a run that must show a healthy ring again.
TAIL = 5
#: The peer whose link is unplugged or throttled, and its neighbours on the ring.
VICTIM, NEIGHBOURS = 2, (1, 3)

Row = dict[str, Any]


def lan_endpoints_setting(net: Lan) -> str:
    entries = ", ".join(f'{{id = {i}, endpoint = "tcp://{net.addr(i)}:{PORT}"}}' for i in range(net.n))
    return f"network.peers=[{entries}]"


class NetnsCluster(Cluster):
    """A :class:`Cluster` of the ring config, peer i run as ``demuon run`` in namespace
    ``net.ns(i)``, bound at ``net.addr(i):PORT``."""

    def __init__(self, root: Path, net: Lan, sets: Sequence[str]) -> None:
        super().__init__(root, RING, sets)
        self.net = net
        self.sets = [lan_endpoints_setting(net), *sets]  # instead of the loopback endpoints

    def prefix(self, i: int) -> list[str]:
        return list(self.net.exec_prefix(i))

    def logs(self, i: int) -> str:
        """The process's stderr and the tail of its ``log.txt``."""
        log = self.out(i) / "log.txt"
        text = log.read_text(errors="replace")[-6000:] if log.exists() else ""
        return f"{super().logs(i)}\n--- log.txt of peer {i}\n{text}"

    def all_rows(self) -> dict[int, list[Row]]:
        return {i: self.rows(i) for i in range(self.config.peers)}


@contextmanager
def ring_on_a_lan(root: Path, tag: str, *sets: str) -> Iterator[NetnsCluster]:
    """Four ring peers, one per namespace of a fresh LAN (named after this process and ``tag``).
    On exit every process is killed and reaped, then every namespace is deleted."""
    with lan(4, f"dm{os.getpid()}{tag}") as net:
        c = NetnsCluster(root, net, sets)
        try:
            yield c
        finally:
            c.kill_all()


def tcp_connections(net: Lan, i: int) -> set[tuple[str, str]]:
    """(local, peer) address:port pairs of the established TCP connections in peer ``i``'s namespace."""
    out = run_command([*net.exec_prefix(i), "ss", "-Htn", "state", "established"], "list connections")
    pairs = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            pairs.add((fields[-2], fields[-1]))
    return pairs


def assert_finished(c: Cluster, rows: dict[int, list[Row]]) -> None:
    last = c.config.rounds - 1
    for i, rs in rows.items():
        rounds = [r["round"] for r in rs]
        assert rounds == sorted(set(rounds)), f"peer {i} ran a round twice or went back"
        assert rounds[-1] == last, f"peer {i} ended at round {rounds[-1]}\n{c.logs(i)}"


def test_a_link_that_goes_down_and_comes_back_leaves_the_peer_down_then_back_in_the_mix(
    tmp_path: Path,
) -> None:
    """Peer 2 is unplugged (its switch port goes down: no RST, no FIN, packets just vanish) until
    both neighbours have marked it down, which takes about two phase deadlines; then plugged back.

    What happens (read from the logs): while unplugged, the neighbours stop waiting for peer 2 and
    run on; peer 2 marks them down as well and either waits out its deadlines or, once both are
    down, runs alone, so one side ends up many rounds ahead. The outage (~0.5 s) is far shorter
    than ZeroMQ's heartbeat timeout (3 × heartbeat_ms = 3 s), so no connection is closed: TCP
    retransmits what was queued once the link is back (within its back-off, under a second) and
    the same connections carry on (asserted: same ports before and after). The first message
    from the side ahead tells the side behind that it was left behind, and it skips ahead
    (``skipped`` > 0) instead of running the rounds alone: peer 2 if it was behind, its
    neighbours (and then peer 0) if it had run ahead. At the end the ring is whole again.

    ``rounds`` is large because a peer alone runs a round in ~2 ms: it must not finish before the
    link is back (about a second in the worst case: outage plus TCP's retransmission back-off).
    Once every peer has run ``TAIL`` healthy rounds the peers are stopped with SIGTERM."""
    sets = (
        "rounds=1500",
        "network.phase_timeout_s=0.25",
        "network.down_after_misses=2",
        "network.start_timeout_s=30.0",
        "network.heartbeat_ms=1000",  # dead connections noticed after 3 s: longer than the outage
    )
    with ring_on_a_lan(tmp_path, "a", *sets) as c:
        for i in range(4):
            c.start(i)
        wait_for(lambda: any(r["round"] >= 5 for r in c.rows(VICTIM)), "peer 2 logs round 5", c, VICTIM)
        before = tcp_connections(c.net, VICTIM)
        c.net.link_down(VICTIM)
        unplugged = time.monotonic()

        def marked_down(j: int) -> bool:
            return any(VICTIM in r["down"] for r in c.rows(j))

        for j in NEIGHBOURS:
            wait_for(functools.partial(marked_down, j), f"peer {j} marks 2 down", c, j, 30.0)
        c.net.link_up(VICTIM)
        outage = time.monotonic() - unplugged
        seen = {j: len(c.rows(j)) for j in NEIGHBOURS}

        def back_in_the_mix(j: int) -> bool:
            return any(not r["down"] and not r["missing"] for r in c.rows(j)[seen[j] :])

        for j in NEIGHBOURS:
            wait_for(functools.partial(back_in_the_mix, j), f"peer {j} hears from 2 again", c, j, 30.0)
        after = tcp_connections(c.net, VICTIM)

        def healthy(j: int) -> bool:
            rs = c.rows(j)
            return len(rs) >= TAIL and all(not r["missing"] and not r["down"] for r in rs[-TAIL:])

        for j in range(4):  # the ring is whole again: then stop it (no need to run all 1500 rounds)
            wait_for(functools.partial(healthy, j), f"peer {j} runs {TAIL} healthy rounds", c, j, 30.0)
        rows = c.all_rows()
        for j in range(4):
            c.procs[j].send_signal(signal.SIGTERM)
        c.wait_all()  # each finishes its round, checkpoints and exits 0

    peers = {f"{c.net.addr(j)}:{PORT}" for j in NEIGHBOURS}
    assert len(before) == 4 and {p for _, p in before} >= peers, before  # 2 → 1, 2 → 3 and back
    assert after == before, f"connections replaced after a {outage:.2f}s outage: {before} → {after}"

    for i, rs in rows.items():
        rounds = [r["round"] for r in rs]
        assert rounds == sorted(set(rounds)), f"peer {i} ran a round twice or went back"
    assert any({1, 3} <= set(r["missing"]) for r in rows[VICTIM]), "peer 2 never missed its neighbours"
    for j in NEIGHBOURS:
        assert any(VICTIM in r["down"] for r in rows[j])  # (and not at the end: see below)
    skips = {i: [(r["round"], r["skipped"]) for r in rs if r["skipped"]] for i, rs in rows.items()}
    assert any(skips.values()), "nobody was left behind by two rounds or more"
    for i, rs in rows.items():
        tail = [(r["round"], r["missing"], r["down"]) for r in rs[-TAIL:]]
        assert all(not missing and not down for _, missing, down in tail), (i, tail, c.logs(i))
    print(f"outage {outage:.2f}s; skipped ahead (round, rounds skipped): {skips}")


def test_a_rate_limited_link_never_makes_a_round_wait_past_its_deadline(tmp_path: Path) -> None:
    """Once the ring runs, peer 2's sending is limited to 16 kbit/s by a token bucket: a round's
    four messages (2 phases × 2 neighbours × ~430 bytes, see ``bytes_out``) then need about a
    second on the wire, over three phase deadlines. Its neighbours wait for it up to the deadline
    and go on without it; what it sends arrives later and later (the queue only grows) and is
    dropped as too old. No wait, anywhere, lasts past its deadline, and everyone runs to the end.

    (Throttled from the start instead, the neighbours' first phase, whose deadline is the long
    start timeout, waits a second for peer 2 while peer 0, past its own first phase, waits only
    the phase deadline for them: peer 0 can then mark both down, run every round alone within
    milliseconds and, by the catch-up rule, pull the others straight to the last round.)"""
    timeout = 0.3
    sets = (
        "rounds=40",  # 36 or so throttled rounds: plenty to miss and drop peer 2's messages
        f"network.phase_timeout_s={timeout}",
        "network.down_after_misses=2",
        "network.start_timeout_s=30.0",
    )
    with ring_on_a_lan(tmp_path, "b", *sets) as c:
        for i in range(4):
            c.start(i)
        wait_for(lambda: any(r["round"] >= 3 for r in c.rows(VICTIM)), "peer 2 logs round 3", c, VICTIM)
        shaped_at = c.rows(VICTIM)[-1]["round"]
        c.net.shape(VICTIM, "16kbit", latency_ms=5000)
        c.wait_all()
        rows = c.all_rows()
        qdisc = c.net.qdisc(VICTIM)

    throttled = re.search(r"overlimits (\d+)", qdisc)
    assert throttled is not None and int(throttled.group(1)) > 0, qdisc  # the bucket did hold packets
    assert_finished(c, rows)
    assert 800 <= rows[VICTIM][1]["bytes_out"] <= 4000, "a round is ~2 KB: 16 kbit/s makes it late"
    for i, rs in rows.items():
        for r in rs:
            assert r["t_wait_max"] <= r["deadline_s"] + WAIT_TOLERANCE_S, (i, r)
            assert r["t_wait"] <= 2 * r["deadline_s"] + WAIT_TOLERANCE_S, (i, r)
            if r["round"] > 0:
                assert r["deadline_s"] == timeout, (i, r)
    for j in NEIGHBOURS:
        missed = [r["round"] for r in rows[j] if r["round"] > shaped_at and VICTIM in r["missing"]]
        assert missed, f"peer {j} always had 2's messages in time"
    summary = {
        i: (len(rs), sum(VICTIM in r["missing"] for r in rs), [r["skipped"] for r in rs if r["skipped"]])
        for i, rs in rows.items()
    }
    print(f"throttled after round {shaped_at}; (rows, rows missing 2, skips) per peer: {summary}")
