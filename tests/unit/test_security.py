"""CURVE keys on disk, and a CURVE transport that admits only allow-listed peers."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from demuon.app.run import check_security
from demuon.config import load_config
from demuon.errors import TransportError
from demuon.transport.security import CurveKeys, generate_keys, is_loopback, load_keys, load_public_keys
from demuon.transport.zeromq import ZmqTransport
from tests.support.cluster import CONFIGS

DEADLINE_S = 5.0
HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
}

Received = tuple[int, list[bytes]]


def decode(sender: int, frames: list[memoryview]) -> Received:
    return sender, [bytes(f) for f in frames]


def test_generated_keys_load_back_and_secrets_are_private(tmp_path: Path) -> None:
    files = generate_keys(tmp_path, [0, 1, 5])
    assert sorted(files) == [0, 1, 5]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files.values())
    public = load_public_keys(tmp_path)
    assert sorted(public) == [0, 1, 5]
    for pid in (0, 1, 5):
        keys = load_keys(tmp_path, pid)
        assert keys.public == public[pid] and len(keys.secret) == 40
        assert keys.secret.decode() not in repr(keys)
    assert len(set(public.values())) == 3


def test_missing_or_malformed_keys_raise_transport_errors(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="peer 3"):
        load_keys(tmp_path, 3)
    with pytest.raises(TransportError, match="no key directory"):
        load_public_keys(tmp_path / "absent")
    with pytest.raises(TransportError, match="Z85"):
        CurveKeys(b"short", b"x" * 40)


def test_a_curve_transport_needs_the_public_key_of_every_neighbour() -> None:
    me, other = CurveKeys.generate(), CurveKeys.generate()
    with pytest.raises(TransportError, match="public_keys"):
        ZmqTransport(0, "tcp://127.0.0.1:*", {}, decode, curve=me)
    with pytest.raises(TransportError, match="neighbour 2"):
        ZmqTransport(
            0, "tcp://127.0.0.1:*", {2: "tcp://127.0.0.1:1"}, decode, curve=me, public_keys={1: other.public}
        )


class Secured:
    """Peer 0 (CURVE server, allow-list {1, 2}) and peer 1 (an allowed sender)."""

    def __init__(self) -> None:
        self.keys = {i: CurveKeys.generate() for i in (0, 1, 2)}
        self.public = {i: k.public for i, k in self.keys.items()}
        self.server: ZmqTransport[Received] = ZmqTransport(
            0, "tcp://127.0.0.1:*", {}, decode, curve=self.keys[0], public_keys=self.public
        )
        self.ctx = zmq.asyncio.Context()  # for the raw clients
        self.clients: list[zmq.asyncio.Socket] = []

    def client(self, identity: bytes, keys: CurveKeys | None) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        self.clients.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        if keys is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.keys[0].public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        return sock


@pytest.fixture
async def secured() -> AsyncIterator[Secured]:
    s = Secured()
    try:
        await s.server.start()
        yield s
    finally:
        await s.server.close()
        for sock in s.clients:
            sock.close(linger=0)
        s.ctx.destroy(linger=0)  # closes anything left, then terminates


async def handshake_outcome(sock: zmq.asyncio.Socket, endpoint: str, payload: bytes = b"") -> int:
    """Connect ``sock``, queue ``payload`` (if any) at once, and return its first handshake event
    (success or failure), bounded."""
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(endpoint)
        if payload:  # queued before the handshake: sent as soon as (if ever) it succeeds
            await sock.send_multipart([payload], flags=zmq.NOBLOCK)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if await monitor.poll(100):
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event in HANDSHAKE_FAILED or event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return int(event)
        raise AssertionError("no handshake outcome before the deadline")
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


async def test_strangers_are_refused_and_nothing_they_send_reaches_recv(secured: Secured) -> None:
    endpoint = secured.server.endpoint
    stranger = secured.client(b"1", CurveKeys.generate())  # a fresh keypair, not on the list
    plain = secured.client(b"1", None)  # no CURVE at all
    for sock in (stranger, plain):
        assert await handshake_outcome(sock, endpoint, b"let me in") in HANDSHAKE_FAILED

    legit = secured.client(b"1", secured.keys[1])
    assert await handshake_outcome(legit, endpoint) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    await legit.send_multipart([b"peer 1 here"])
    assert await asyncio.wait_for(secured.server.recv(), DEADLINE_S) == (1, [b"peer 1 here"])
    assert secured.server.pending() == 0
    assert not secured.server.rejected


async def test_an_allowed_key_cannot_speak_for_another_peer(secured: Secured) -> None:
    impostor = secured.client(b"2", secured.keys[1])  # peer 1's key, claiming to be peer 2
    honest = secured.client(b"1", secured.keys[1])
    for sock in (impostor, honest):
        assert await handshake_outcome(sock, secured.server.endpoint) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    await impostor.send_multipart([b"from 2, promise"])
    await honest.send_multipart([b"really from 1"])
    assert await asyncio.wait_for(secured.server.recv(), DEADLINE_S) == (1, [b"really from 1"])
    deadline = time.monotonic() + DEADLINE_S  # two connections: no order between them
    while not secured.server.rejected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert secured.server.rejected == {"identity_mismatch": 1}


async def test_two_secured_peers_talk_both_ways(secured: Secured) -> None:
    peer1: ZmqTransport[Received] = ZmqTransport(
        1,
        "tcp://127.0.0.1:*",
        {0: secured.server.endpoint},
        decode,
        curve=secured.keys[1],
        public_keys=secured.public,
    )
    try:
        await peer1.start()
        secured.server.add_neighbour(1, peer1.endpoint)
        assert await peer1.wait_ready([0], DEADLINE_S)
        assert await secured.server.wait_ready([1], DEADLINE_S)
        await peer1.send([0], [b"ping", bytes(100_000)])
        assert await asyncio.wait_for(secured.server.recv(), DEADLINE_S) == (1, [b"ping", bytes(100_000)])
        await secured.server.send([1], [b"pong"])
        assert await asyncio.wait_for(peer1.recv(), DEADLINE_S) == (0, [b"pong"])
    finally:
        await peer1.close()


async def test_two_secured_transports_cannot_share_one_context() -> None:
    ctx = zmq.asyncio.Context()
    keys = {i: CurveKeys.generate() for i in (0, 1)}
    public = {i: k.public for i, k in keys.items()}
    a: ZmqTransport[Received] = ZmqTransport(
        0, "tcp://127.0.0.1:*", {}, decode, curve=keys[0], public_keys=public, context=ctx
    )
    b: ZmqTransport[Received] = ZmqTransport(
        1, "tcp://127.0.0.1:*", {}, decode, curve=keys[1], public_keys=public, context=ctx
    )
    try:
        await a.start()
        with pytest.raises(TransportError, match="ZAP"):
            await b.start()
    finally:
        await a.close()
        await b.close()
        ctx.destroy(linger=0)


# ------------------------------------------------------------------------------ secure by default


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:7000", True),
        ("tcp://127.3.2.1:7000", True),
        ("tcp://localhost:7000", True),
        ("tcp://[::1]:7000", True),
        ("ipc:///tmp/demuon-0", True),
        ("tcp://0.0.0.0:7000", False),
        ("tcp://*:7000", False),
        ("tcp://10.213.0.2:7000", False),
        ("tcp://peer-3:7000", False),
        ("udp://127.0.0.1:7000", False),
    ],
)
def test_only_endpoints_that_stay_on_this_machine_are_loopback(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


def test_run_refuses_to_go_beyond_loopback_without_choosing_about_security(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from demuon.app import cli

    argv = [
        "run",
        "--config",
        str(CONFIGS / "oracle-ring4.toml"),
        "--peer",
        "0",
        "--out",
        str(tmp_path / "p0"),
    ]
    assert cli.main([*argv, "--set", "network.host='10.213.0.1'"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: security.enabled='unset'")
    assert "tcp://10.213.0.1:27400" in err and "security.enabled = false" in err
    assert not (tmp_path / "p0").exists()  # refused before anything was created
    config = load_config(
        CONFIGS / "oracle-ring4.toml", ["network.host='10.213.0.1'", "security.enabled=false"]
    )
    check_security(config, 0)  # open on purpose: allowed
    check_security(load_config(CONFIGS / "oracle-ring4.toml"), 0)  # loopback: allowed


async def test_a_frame_of_exactly_the_size_limit_passes_curve(secured: Secured) -> None:
    """ZMQ_MAXMSGSIZE counts a frame as it travels: CURVE's envelope must not push a frame of
    exactly ``max_frame_bytes`` (the run's largest tensor) over the limit."""
    limit = 131_072
    server: ZmqTransport[Received] = ZmqTransport(
        2,
        "tcp://127.0.0.1:*",
        {},
        decode,
        max_frame_bytes=limit,
        curve=secured.keys[2],
        public_keys=secured.public,
    )
    peer1: ZmqTransport[Received] = ZmqTransport(
        1, "tcp://127.0.0.1:*", {}, decode, curve=secured.keys[1], public_keys=secured.public
    )
    try:
        await server.start()
        await peer1.start()
        peer1.add_neighbour(2, server.endpoint)
        assert await peer1.wait_ready([2], DEADLINE_S)
        await peer1.send([2], [b"header", bytes(limit)])
        assert await asyncio.wait_for(server.recv(), DEADLINE_S) == (1, [b"header", bytes(limit)])
    finally:
        await peer1.close()
        await server.close()
