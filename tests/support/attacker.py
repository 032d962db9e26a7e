"""A hostile client, run as its own process (``python -m tests.support.attacker ACTION ...``) so
that what it buffers is not counted in the victim's memory. Loopback only.

Actions:

``flood PORT SECONDS``
    three DEALERs sharing one routing identity queue 66 KB junk headers as fast as the victim takes
    them, for SECONDS, then leave: the backed-up-connection attack (a full receive pipe, heartbeats,
    and a reconnecting identity taken over by ROUTER_HANDOVER).
``big PORT MIB``
    one frame of MIB mebibytes from a non-peer identity.
``claim PORT``
    a raw ZMTP 3.0 client (NULL mechanism) whose first frame header claims 2**40 bytes; prints
    ``closed`` when the victim drops the connection, ``open`` if it is still up after 10 s.
``forge PORT SENDER ROUND``
    a plain (no CURVE) DEALER claiming to be peer SENDER sends, for rounds 0..ROUND, a well-formed
    V and X message each for the oracle config's model (float32 ``weight`` 6×12) holding zeros, a
    1e30-poisoned one, and a replay of each; prints ``connected`` if its link ever became
    writable, else ``refused``.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

import msgpack
import zmq

HOST = "127.0.0.1"


def flood(port: int, seconds: float) -> None:
    ctx = zmq.Context()
    socks = []
    for _ in range(3):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, b"90")
        s.setsockopt(zmq.SNDHWM, 1500)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://{HOST}:{port}")
        socks.append(s)
    junk = msgpack.packb({"x": [list(range(10))] * 6000})
    end, sent = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        for s in socks:
            try:
                s.send(junk, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                time.sleep(0.001)
    print("sent", sent, flush=True)
    ctx.destroy(linger=0)


def big(port: int, mib: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"91")
    s.setsockopt(zmq.LINGER, 5000)
    s.connect(f"tcp://{HOST}:{port}")
    s.send(bytes(mib << 20), copy=False)
    s.close()  # waits (LINGER) until the frame is written or the victim hung up
    ctx.term()
    print("sent", flush=True)


def claim(port: int) -> None:
    greeting = (
        b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)
    )
    props = (
        b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER" + b"\x08Identity" + struct.pack(">I", 2) + b"92"
    )
    ready = b"\x05READY" + props
    with socket.create_connection((HOST, port), timeout=10.0) as s:
        s.sendall(greeting)
        s.recv(64)  # the victim's greeting
        s.sendall(b"\x04" + bytes([len(ready)]) + ready)
        s.sendall(b"\x02" + struct.pack(">Q", 1 << 40) + bytes(4096))  # a long frame of 2**40 bytes
        end = time.monotonic() + 10.0
        try:
            while time.monotonic() < end:
                if not s.recv(4096):
                    print("closed", flush=True)
                    return
        except (ConnectionResetError, TimeoutError):
            print("closed", flush=True)
            return
        print("open", flush=True)


def forge(port: int, sender: int, last_round: int) -> None:
    import torch

    from demuon.transport import wire
    from demuon.transport.codecs import Identity

    shapes = {"weight": (6, 12)}  # demuon/configs/oracle-ring4.toml's quadratic
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, str(sender).encode())
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IMMEDIATE, 1)  # writable only once a connection is through its handshake
    s.connect(f"tcp://{HOST}:{port}")
    connected = bool(s.poll(1000, zmq.POLLOUT))
    for k in range(last_round + 1):
        for phase in ("V", "X"):
            for value in (0.0, 1e30):
                tensors = {n: Identity().encode(torch.full(sh, value), seed=0) for n, sh in shapes.items()}
                frames = [
                    bytes(f)
                    for f in wire.encode(
                        sender=sender, round=k, phase=phase, codec="identity", tensors=tensors
                    )
                ]
                for _ in range(2):  # and its replay
                    try:
                        s.send_multipart(frames, zmq.NOBLOCK)
                    except zmq.Again:
                        pass
    print("connected" if connected else "refused", flush=True)
    ctx.destroy(linger=0)


def main(argv: list[str]) -> None:
    action, port = argv[0], int(argv[1])
    if action == "flood":
        flood(port, float(argv[2]))
    elif action == "big":
        big(port, int(argv[2]))
    elif action == "claim":
        claim(port)
    elif action == "forge":
        forge(port, int(argv[2]), int(argv[3]))
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
