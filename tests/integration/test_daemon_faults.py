"""The daemon under faults. One multi-process smoke test: a peer stopped by SIGTERM resumes from
its checkpoint. Everything else runs in one process on the in-process hub: a neighbour that never
starts is marked down and no round waits past its deadline; a stop request finishes the round in
progress; a peer left behind skips ahead; and the gossip policy under single faults injected by
:class:`~demuon.transport.faults.FaultyTransport`, keyed on the (round, phase) of each message
(dropped: counted missing exactly there; duplicated: changes nothing; delayed: used, or counted
late). Bad input fails at once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from demuon import results
from demuon.app import cli, simulate
from demuon.config import Config, load_config, math_fingerprint
from demuon.node.checkpoint import load_checkpoint
from demuon.node.daemon import Control, Daemon, DaemonStatus, LocalControl, RoundHook
from demuon.transport import wire
from demuon.transport.codecs import Identity
from demuon.transport.faults import FaultPlan, FaultRule, FaultyTransport
from demuon.transport.inproc import InprocHub
from tests.support.cluster import (
    RING,
    WAIT_TOLERANCE_S,
    assert_same_as_simulator,
    cluster,
    inproc_daemon,
    inproc_daemons,
    wait_for,
)

#: Bound on any in-process run of the oracle ring (they take a few seconds at most).
RUN_BOUND_S = 60.0


@pytest.mark.slow  # four processes and a restart, 16–70 s: make test-slow (launch --resume is in make test)
def test_a_peer_stopped_by_sigterm_checkpoints_and_resumes_where_it_left_off(tmp_path: Path) -> None:
    rounds = 40
    sets = (
        f"rounds={rounds}",
        # the others wait for the restarting peer (a process start: seconds), so no round misses it
        "network.phase_timeout_s=30.0",
        "network.start_timeout_s=30.0",
        "network.down_after_misses=2",
    )
    with cluster(tmp_path, RING, *sets) as c:
        for i in range(4):
            c.start(i)
        wait_for(lambda: any(r["round"] >= 3 for r in c.rows(2)), "peer 2 logs round 3", c, 2)
        c.procs[2].send_signal(signal.SIGTERM)
        assert c.wait(2) == 0, c.logs(2)
        saved = torch.load(c.out(2) / "checkpoint" / "peer-2.pt", weights_only=True)["round"]
        assert 3 <= saved < rounds - 1, "stopped mid-run"
        assert c.rows(2)[-1]["round"] == saved  # the round in progress was finished, then saved
        assert not (c.out(2) / "final.json").exists()

        c.start(2, "--resume")
        c.wait_all()
        got = [r["round"] for r in c.rows(2)]
        assert got == list(range(rounds))  # saved_round + 1 follows saved_round: nothing lost or redone
        assert "resumed" in (c.out(2) / "log.txt").read_text()
        for i in range(4):
            assert all(r["missing"] == [] for r in c.rows(i)), f"peer {i} missed a message"
        assert_same_as_simulator(c, c.config)  # a clean stop and resume changes nothing


def rows_of(d: Daemon) -> list[dict[str, Any]]:
    return results.read_metrics(d.out / results.METRICS)


async def run_daemons(daemons: Sequence[Daemon]) -> None:
    """Run every daemon to its end (bounded); each must stop cleanly."""
    async with asyncio.timeout(RUN_BOUND_S):
        statuses = await asyncio.gather(*(d.run() for d in daemons))
    assert statuses == [DaemonStatus.STOPPED] * len(daemons)


async def test_a_neighbour_that_never_starts_is_marked_down_and_no_wait_overruns_its_deadline(
    tmp_path: Path,
) -> None:
    timeout = 0.3
    config = load_config(
        RING,
        [f"network.phase_timeout_s={timeout}", "network.start_timeout_s=1.0", "network.down_after_misses=2"],
    )
    daemons = inproc_daemons(config, tmp_path, peers=[1, 2, 3])  # peer 0, neighbour of 1 and 3, never starts
    await run_daemons(daemons)
    for d in daemons:
        rows = rows_of(d)
        assert [r["round"] for r in rows] == list(range(config.rounds))
        assert (d.out / "final.json").exists()
        for r in rows:
            assert r["t_wait_max"] <= r["deadline_s"] + WAIT_TOLERANCE_S, r
            assert r["t_wait"] <= 2 * r["deadline_s"] + WAIT_TOLERANCE_S, r
            if r["round"] > 0:
                assert r["deadline_s"] == timeout
    for d in daemons:  # (whether 2 saw 1 and 3 in time in round 0, while they waited for peer 0
        if d.peer.index in (1, 3):  # to come up, depends on scheduling: not asserted)
            rows = rows_of(d)
            assert all(0 in r["down"] and 0 in r["missing"] for r in rows), [r["down"] for r in rows]


async def test_a_stop_request_finishes_the_round_in_progress_and_writes_a_checkpoint(tmp_path: Path) -> None:
    config = load_config(RING, ["network.phase_timeout_s=0.2", "network.start_timeout_s=5.0"])
    controls: dict[int, Control] = {i: LocalControl() for i in range(config.peers)}

    def stop_everyone(row: object) -> None:
        for control in controls.values():
            control.apply("stop")

    hooks: dict[int, RoundHook] = {0: lambda row: stop_everyone(row) if row["round"] == 2 else None}
    daemons = inproc_daemons(config, tmp_path, hooks=hooks, controls=controls)
    assert await asyncio.gather(*(d.run() for d in daemons)) == [DaemonStatus.STOPPED] * config.peers
    for d in daemons:
        assert d.last_completed is not None and 2 <= d.last_completed < config.rounds - 1
        saved = load_checkpoint(d.checkpoint_dir, d.peer.index, math_fingerprint(config))
        assert saved["round"] == d.last_completed
        assert not (d.out / "final.json").exists()


def test_a_bad_setting_fails_before_anything_starts_naming_field_and_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert (
        cli.main(["run", "--config", str(RING), "--peer", "0", "--out", str(out), "--set", "rounds=-3"]) == 2
    )
    assert "rounds=-3" in capsys.readouterr().err
    assert cli.main(["run", "--config", str(RING), "--peer", "4", "--out", str(out)]) == 2
    assert "--peer=4" in capsys.readouterr().err
    assert not out.exists()


def test_resuming_without_a_checkpoint_fails_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fresh"
    assert cli.main(["run", "--config", str(RING), "--peer", "1", "--out", str(out), "--resume"]) == 2
    assert str(out / "checkpoint" / "peer-1.pt") in capsys.readouterr().err


async def test_a_peer_left_behind_skips_ahead_and_rejoins_the_mix(tmp_path: Path) -> None:
    """Peer 1 stops at round 3 and its neighbours go on without it (marking it down) to round 12,
    where they pause. Restarted from its checkpoint it learns from their next messages that it was
    left behind, skips ahead instead of running the remaining rounds alone, and is back in the
    mix: in the last rounds nobody misses anybody and nobody is down."""
    config = load_config(
        RING,
        [
            "rounds=60",
            "network.phase_timeout_s=0.2",
            "network.start_timeout_s=5.0",
            "network.down_after_misses=2",
        ],
    )
    controls: dict[int, LocalControl] = {i: LocalControl() for i in range(config.peers)}
    paused: set[int] = set()
    all_paused = asyncio.Event()

    def hook(i: int) -> RoundHook:
        def on_round(row: Mapping[str, Any]) -> None:
            if i == 1 and row["round"] == 3:
                controls[1].apply("stop")
            elif i != 1 and row["round"] == 12:
                controls[i].apply("pause")
                paused.add(i)
                if len(paused) == 3:
                    all_paused.set()

        return on_round

    hub = InprocHub(range(config.peers))
    daemons = [
        inproc_daemon(config, hub, i, tmp_path, on_round=hook(i), control=controls[i]) for i in range(4)
    ]
    tasks = {i: asyncio.create_task(d.run()) for i, d in enumerate(daemons)}
    try:
        async with asyncio.timeout(120):
            assert await tasks[1] == DaemonStatus.STOPPED
            await all_paused.wait()
            saved = load_checkpoint(daemons[1].checkpoint_dir, 1, math_fingerprint(config))["round"]
            assert 3 <= saved < 12
            tasks[1] = asyncio.create_task(inproc_daemon(config, hub, 1, tmp_path, resume=True).run())
            for i in (0, 2, 3):
                controls[i].apply("resume")
            assert await asyncio.gather(*tasks.values()) == [DaemonStatus.STOPPED] * 4
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    rows = {i: results.read_metrics(tmp_path / f"peer-{i}" / "metrics.jsonl") for i in range(4)}
    after = [r for r in rows[1] if r["round"] > saved]
    assert any(r["skipped"] > 0 for r in after), [r["round"] for r in after]
    print("peer 1 after its restart:", [(r["round"], r["skipped"], r["missing"]) for r in after][:12])
    assert rows[1][-1]["round"] == config.rounds - 1
    for i in range(4):
        tail = rows[i][-5:]
        assert all(r["missing"] == [] and r["down"] == [] for r in tail), (i, tail)


# ---------------------------------------------------------------------------------------------
# The gossip policy under single injected faults (in one process, deterministic).

#: The link and round every single fault below is injected on: peer 1 → peer 2 (ring neighbours).
SENDER, RECEIVER, FAULT_ROUND = 1, 2, 3
#: The receiver's phase deadline: it alone can miss a message or get one late.
SHORT_S = 0.5
#: Everyone else's: never reached (a message that is not faulted arrives within milliseconds, and
#: the receiver lags at most a couple of SHORT_S deadlines), so nobody else misses anything.
LONG_S = 30.0


def test_the_fault_key_is_the_round_and_phase_of_the_wire_header() -> None:
    tensors = {"w": Identity().encode(torch.ones(3, 2), seed=0)}
    frames = wire.encode(sender=1, round=7, phase="X", codec="identity", tensors=tensors)
    assert wire.peek(frames) == (7, "X")


def ring_config(timeout_s: float) -> Config:
    return load_config(RING, [f"network.phase_timeout_s={timeout_s}", "network.start_timeout_s=10.0"])


async def faulty_ring(
    root: Path, plan: FaultPlan, *, short: int | None = None
) -> tuple[list[Daemon], dict[int, FaultyTransport[Any]]]:
    """The oracle ring in one process, every peer's sending wrapped in a FaultyTransport of
    ``plan`` keyed on (round, phase), run to the end. Peer ``short`` waits at most SHORT_S for a
    message, the others LONG_S (a per-peer setting of the same file: with one short deadline for
    all, the receiver's lag after a fault would race its neighbours' deadlines)."""
    hub = InprocHub(range(4))
    faulty: dict[int, FaultyTransport[Any]] = {}

    def wrap(i: int) -> Callable[[Any], Any]:
        def wrapped(inner: Any) -> Any:
            faulty[i] = FaultyTransport(inner, plan, key_of=wire.peek)
            return faulty[i]

        return wrapped

    configs = {i: ring_config(SHORT_S if i == short else LONG_S) for i in range(4)}
    daemons = [inproc_daemon(configs[i], hub, i, root, wrap=wrap(i)) for i in range(4)]
    await run_daemons(daemons)
    return daemons, faulty


def assert_finished(daemons: Sequence[Daemon], rounds: int) -> dict[int, list[dict[str, Any]]]:
    rows = {d.peer.index: rows_of(d) for d in daemons}
    for i, rs in rows.items():
        assert [r["round"] for r in rs] == list(range(rounds)), i
        for r in rs:
            assert r["t_wait_max"] <= r["deadline_s"] + WAIT_TOLERANCE_S, (i, r)
    return rows


def assert_same_parameters_as_the_simulator(daemons: Sequence[Daemon], config: Config) -> None:
    """Bitwise: what a fault must not change."""
    finals = {d.peer.index: torch.load(d.out / "final.pt", weights_only=True) for d in daemons}
    for peer in simulate.run(config).peers:
        got = finals[peer.index]
        assert all(torch.equal(got[n], peer.params[n].detach()) for n in peer.names), peer.index


async def test_one_dropped_message_is_missing_in_that_round_of_that_receiver_and_nowhere_else(
    tmp_path: Path,
) -> None:
    plan = FaultPlan((FaultRule("drop", senders=[SENDER], receivers=[RECEIVER], keys=[(FAULT_ROUND, "V")]),))
    daemons, faulty = await faulty_ring(tmp_path, plan, short=RECEIVER)
    assert faulty[SENDER].injected["drop"] >= 1  # (once, unless a resend met the same rule)
    rows = assert_finished(daemons, 20)
    for i, rs in rows.items():
        for r in rs:
            fault = (i, r["round"]) == (RECEIVER, FAULT_ROUND)
            assert r["missing"] == ([SENDER] if fault else []), (i, r["round"], r["missing"])
            assert r["down"] == [], (i, r)  # one miss is not down_after_misses
            assert r["late"] == 0 and r["stale_dropped"] == 0, (i, r)
    normal = rows[RECEIVER][FAULT_ROUND - 1]["received"]
    hit = rows[RECEIVER][FAULT_ROUND]
    assert hit["received"] == normal - 1  # the receiver mixed without the one message
    assert SHORT_S <= hit["t_wait_max"] <= SHORT_S + WAIT_TOLERANCE_S  # and waited its deadline out


async def test_duplicated_messages_change_nothing(tmp_path: Path) -> None:
    config = ring_config(LONG_S)
    copies = 2
    # every link, half the (round, phase) keys, except the last round's (a copy sent after the
    # receiver's last phase would find it closed instead of being counted)
    keys = [(k, phase) for k in range(config.rounds - 1) for phase in ("V", "X")]
    plan = FaultPlan((FaultRule("duplicate", keys=keys, probability=0.5, copies=copies),), seed=5)
    faulty: dict[int, FaultyTransport[Any]] = {}

    def wrap(i: int, inner: Any) -> Any:
        faulty[i] = FaultyTransport(inner, plan, key_of=wire.peek)
        return faulty[i]

    daemons = inproc_daemons(config, tmp_path, wrap=wrap)
    await run_daemons(daemons)
    injected = sum(f.injected["duplicate"] for f in faulty.values())
    assert injected >= 10
    rows = [r for rs in assert_finished(daemons, config.rounds).values() for r in rs]
    assert all(r["missing"] == [] and r["down"] == [] for r in rows)
    duplicates = sum(r["duplicates"] for r in rows)
    if sum(r["resends"] for r in rows) == 0:  # (a resend would add copies of its own)
        assert duplicates == injected * copies  # every extra copy was seen and dropped as such
    assert duplicates >= injected * copies
    assert_same_parameters_as_the_simulator(daemons, config)


async def test_a_message_overtaken_by_the_next_one_is_still_used(tmp_path: Path) -> None:
    """Round 3's V message from 1 to 2 is held until 1 has sent 2 its round-3 X message (which
    needs only 1's own neighbours' V messages): 2 gets X before V, waits for V, and uses it."""
    plan = FaultPlan(
        (FaultRule("delay", senders=[SENDER], receivers=[RECEIVER], keys=[(FAULT_ROUND, "V")], delay=1),)
    )
    daemons, faulty = await faulty_ring(tmp_path, plan)  # no short deadline: the message must be used
    assert faulty[SENDER].injected["delay"] == 1 and faulty[SENDER].injected["delay_lost"] == 0
    rows = [r for rs in assert_finished(daemons, 20).values() for r in rs]
    assert all(r["missing"] == [] and r["late"] == 0 and r["stale_dropped"] == 0 for r in rows)
    assert_same_parameters_as_the_simulator(daemons, ring_config(LONG_S))  # reordering changes nothing


async def test_a_message_that_arrives_after_its_phase_is_counted_late_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    """Round 3's V and X messages from 1 to 2 are each held until 1 has sent 2 two more messages.
    1's round-4 V message needs 2's round-3 X message, which 2 sends only once its V deadline
    has passed: V(3) reaches 2 after its V phase closed, while 2 still waits for X(3) (held
    until 1's X(4), which needs 2's V(4)): counted late. X(3) comes in round 4: dropped as stale."""
    keys = [(FAULT_ROUND, "V"), (FAULT_ROUND, "X")]
    plan = FaultPlan((FaultRule("delay", senders=[SENDER], receivers=[RECEIVER], keys=keys, delay=2),))
    daemons, faulty = await faulty_ring(tmp_path, plan, short=RECEIVER)
    assert faulty[SENDER].injected["delay"] >= 2 and faulty[SENDER].injected["delay_lost"] == 0
    rows = assert_finished(daemons, 20)  # every peer ran every round
    hit = rows[RECEIVER][FAULT_ROUND]
    assert hit["missing"] == [SENDER] and hit["late"] >= 1, hit
    assert sum(r["stale_dropped"] for r in rows[RECEIVER][FAULT_ROUND + 1 :]) >= 1
    for i, rs in rows.items():
        for r in rs:
            if (i, r["round"]) != (RECEIVER, FAULT_ROUND):
                assert r["missing"] == [], (i, r["round"], r["missing"])
