"""What the wire path costs next to raw ZeroMQ, and what each codec buys.

    python bench/wire.py [--json] [--quick]

Part 1 — one float32 tensor of 64 KiB / 1 MiB / 16 MiB moved from one socket to another in this
process, over tcp loopback and ipc, side by side:

    memcpy   torch ``clone`` of the tensor (the limit: one copy in memory)
    raw      plain pyzmq DEALER → ROUTER, a small header frame + the tensor's bytes, copy=False
    demuon   identity codec → ``wire.encode`` → ``ZmqTransport.send`` → ``recv`` → ``wire.decode``
             (one copy at encode, CRC-32C on both sides, one copy at decode into a dense tensor)
    pickle   ``pickle.dumps(tensor)`` over the same raw sockets, ``pickle.loads`` on receipt

Every method keeps a window of messages in flight (a semaphore released on receipt), so the
figures are throughput, not round-trip latency. GB/s = tensor bytes moved / wall time, best of a
few repetitions; the ratio is to raw ZeroMQ on the same transport and size.

Part 2 — each codec on a 1024×1024 float32 tensor (1 M floats): compression ratio (dense bytes /
payload bytes) and encode+decode speed in dense GB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import torch
import zmq
import zmq.asyncio
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demuon.transport import wire  # noqa: E402
from demuon.transport.codecs import Cast, Codec, Identity, Int8, Natural, RandK, RankK, TopK  # noqa: E402
from demuon.transport.zeromq import ZmqTransport  # noqa: E402

SIZES = (64 << 10, 1 << 20, 16 << 20)  # tensor bytes
METHODS = ("memcpy", "raw", "demuon", "pickle")
TRANSPORTS = ("tcp", "ipc")
CODECS: dict[str, Codec] = {
    "identity": Identity(),
    "cast bf16": Cast(torch.bfloat16),
    "topk 10%": TopK(0.1),
    "topk 1%": TopK(0.01),
    "randk 10%": RandK(0.1),
    "rankk 4": RankK(4),
    "natural": Natural(),
    "int8": Int8(),
}
HWM = 1000


def plan(size: int, quick: bool) -> tuple[int, int]:
    """(messages per measurement, window in flight) for one tensor size."""
    volume = (64 << 20) if quick else (256 << 20)  # bytes moved per measurement
    n = max(16, min(4000, volume // size))
    window = max(4, min(64, (64 << 20) // size))
    return n, window


async def pump(
    send: Callable[[], Awaitable[None]], recv: Callable[[], Awaitable[None]], n: int, w: int
) -> float:
    """Seconds to move ``n`` messages with at most ``w`` in flight."""
    credit = asyncio.Semaphore(w)

    async def producer() -> None:
        for _ in range(n):
            await credit.acquire()
            await send()

    async def consumer() -> None:
        for _ in range(n):
            await recv()
            credit.release()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(producer())
        tg.create_task(consumer())
    return time.perf_counter() - start


def endpoint(transport: str, tmp: Path, name: str) -> str:
    return f"ipc://{tmp}/{name}" if transport == "ipc" else "tcp://127.0.0.1:*"


async def raw_pair(ctx: zmq.asyncio.Context, transport: str, tmp: Path) -> tuple[zmq.asyncio.Socket, ...]:
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
    dealer.setsockopt(zmq.IDENTITY, b"0")
    router.bind(endpoint(transport, tmp, "raw"))
    dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())  # type: ignore[union-attr]
    await cast(Any, dealer).poll(5000, zmq.POLLOUT)  # the pyzmq stub lacks the flags argument
    return router, dealer


async def measure_raw(x: torch.Tensor, transport: str, tmp: Path, n: int, w: int, pickled: bool) -> float:
    ctx = zmq.asyncio.Context()
    try:
        router, dealer = await raw_pair(ctx, transport, tmp)
        view = x.view(torch.uint8).numpy().data

        async def send() -> None:
            payload = pickle.dumps(x, protocol=5) if pickled else view
            await dealer.send_multipart([b"hdr", payload], copy=False)

        async def recv() -> None:
            parts = await router.recv_multipart(copy=False)
            if pickled:
                pickle.loads(parts[2].buffer)

        await pump(send, recv, min(n, 8), w)  # warm-up
        return await pump(send, recv, n, w)
    finally:
        ctx.destroy(linger=0)


async def measure_demuon(x: torch.Tensor, transport: str, tmp: Path, n: int, w: int) -> float:
    ctx = wire.DecodeContext(senders={0}, shapes={"x": tuple(x.shape)})
    identity = Identity()

    def decode(sender: int, frames: list[memoryview]) -> wire.Message:
        return wire.decode(frames, ctx)

    rx: ZmqTransport[wire.Message] = ZmqTransport(1, endpoint(transport, tmp, "rx"), {}, decode, hwm=HWM)
    tx: ZmqTransport[wire.Message] | None = None
    try:
        await rx.start()
        tx = ZmqTransport(0, endpoint(transport, tmp, "tx"), {1: rx.endpoint}, decode, hwm=HWM)
        await tx.start()
        assert await tx.wait_ready([1], 5.0)
        sender = tx
        k = 0

        async def send() -> None:
            nonlocal k
            enc = {"x": identity.encode(x, seed=0)}
            frames = wire.encode(sender=0, round=k, phase="V", codec="identity", tensors=enc)
            k += 1
            await sender.send([1], frames)

        async def recv() -> None:
            await rx.recv()

        await pump(send, recv, min(n, 8), w)
        seconds = await pump(send, recv, n, w)
        assert not sender.dropped and not rx.rejected, (sender.dropped, rx.rejected)
        return seconds
    finally:
        await rx.close()
        if tx is not None:
            await tx.close()


def measure_memcpy(x: torch.Tensor, n: int) -> float:
    for _ in range(min(n, 8)):
        x.clone()
    start = time.perf_counter()
    for _ in range(n):
        x.clone()
    return time.perf_counter() - start


async def transfer_rows(quick: bool, console: Console) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    repeats = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="dmw", dir="/tmp"))  # short: ipc paths are limited
    try:
        for size in SIZES:
            x = torch.randn(size // 4)
            n, w = plan(size, quick)
            best: dict[tuple[str, str], float] = {}
            for transport in TRANSPORTS:
                for method in METHODS:
                    console.log(f"{transport:>3} {size >> 10:>6} KiB  {method:<7} x{n}")
                    for _ in range(repeats):
                        if method == "memcpy":
                            s = measure_memcpy(x, n)
                        elif method == "demuon":
                            s = await measure_demuon(x, transport, tmp, n, w)
                        else:
                            s = await measure_raw(x, transport, tmp, n, w, pickled=method == "pickle")
                        key = (transport, method)
                        best[key] = min(best.get(key, float("inf")), s)
            for transport in TRANSPORTS:
                raw = size * n / best[(transport, "raw")] / 1e9
                for method in METHODS:
                    gbps = size * n / best[(transport, method)] / 1e9
                    rows.append(
                        {
                            "transport": transport,
                            "bytes": size,
                            "method": method,
                            "gbps": round(gbps, 3),
                            "ratio_to_raw": round(gbps / raw, 3),
                        }
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def codec_rows(quick: bool, console: Console) -> list[dict[str, Any]]:
    x = torch.randn(1024, 1024)
    dense = x.numel() * x.element_size()
    reps = 3 if quick else 10
    rows = []
    for name, codec in CODECS.items():
        console.log(f"codec {name}")
        enc = codec.encode(x, seed=0)
        codec.decode(enc, tuple(x.shape), x.dtype)  # warm-up
        start = time.perf_counter()
        for seed in range(reps):
            codec.decode(codec.encode(x, seed=seed), tuple(x.shape), x.dtype)
        seconds = (time.perf_counter() - start) / reps
        rows.append(
            {
                "codec": name,
                "compression": round(dense / enc.nbytes, 2),
                "gbps": round(dense / seconds / 1e9, 3),
            }
        )
    return rows


def show(rows: list[dict[str, Any]], codecs: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="Moving one float32 tensor: GB/s (× raw ZeroMQ)")
    table.add_column("transport")
    table.add_column("method")
    for size in SIZES:
        table.add_column(f"{size >> 10} KiB" if size < (1 << 20) else f"{size >> 20} MiB", justify="right")
    for transport in TRANSPORTS:
        for method in METHODS:
            cells = []
            for size in SIZES:
                r = next(
                    r for r in rows if (r["transport"], r["method"], r["bytes"]) == (transport, method, size)
                )
                cells.append(f"{r['gbps']:.2f} ({r['ratio_to_raw']:.2f}×)")
            table.add_row(transport, method, *cells)
    console.print(table)
    ctable = Table(title="Codecs on 1024×1024 float32")
    ctable.add_column("codec")
    ctable.add_column("compression", justify="right")
    ctable.add_column("encode+decode GB/s", justify="right")
    for c in codecs:
        ctable.add_row(c["codec"], f"{c['compression']:.1f}×", f"{c['gbps']:.2f}")
    console.print(ctable)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--quick", action="store_true", help="fewer messages and repetitions")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    console = Console(stderr=True, quiet=args.json)
    started = time.perf_counter()
    rows = asyncio.run(transfer_rows(args.quick, console))
    codecs = codec_rows(args.quick, console)
    console.log(f"done in {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps({"rows": rows, "codecs": codecs}, indent=2))
    else:
        show(rows, codecs, Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
