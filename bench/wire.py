"""What the wire path costs next to raw ZeroMQ, and what each codec buys.

    python bench/wire.py [--json] [--quick] [--repeats N]

Part 1 — one float32 tensor of 64 KiB / 1 MiB / 16 MiB moved from one socket to another in this
process, over tcp loopback and ipc, side by side:

    memcpy     torch ``clone`` of the tensor (the limit: one copy in memory)
    raw        plain pyzmq DEALER → ROUTER, a small header frame + the tensor's bytes, copy=False
    transport  ``ZmqTransport.send`` → ``recv`` of the same two frames (no wire format)
    demuon     identity codec → ``wire.encode`` → ``ZmqTransport.send`` → ``recv`` → ``wire.decode``
               (zero-copy both ways; one XXH3-64 pass per side, one finiteness reduction)
    pickle     ``pickle.dumps(tensor)`` over the raw sockets, ``pickle.loads`` on receipt

Fair by construction: every method moves the same tensor the same number of times with the same
window of messages in flight (a semaphore released on receipt: throughput, not round-trip
latency), after a warm-up, and every socket of a measurement lives in one ZeroMQ context (one I/O
thread; a context per end adds a second I/O thread that costs raw and demuon alike, about 2.5×
on a 2-core machine). The methods take turns within each repetition, so a busy machine slows them
alike; GB/s = tensor bytes moved / wall time, the median over the repetitions; the ratio is to
raw ZeroMQ on the same transport and size.

Part 2 — each codec on a 1024×1024 float32 tensor (1 M floats): compression ratio (dense bytes /
payload bytes) and encode+decode speed in dense GB/s (median over the repetitions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import shutil
import statistics
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

from demuon.transport import native, wire  # noqa: E402
from demuon.transport.codecs import (  # noqa: E402
    BlockQuant,
    Cast,
    Codec,
    Identity,
    Int8,
    Natural,
    RandK,
    RankK,
    TopK,
)
from demuon.transport.zeromq import ZmqTransport  # noqa: E402

SIZES = (64 << 10, 1 << 20, 16 << 20)  # tensor bytes
METHODS = ("memcpy", "raw", "transport", "demuon", "pickle")
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
    "blockq 4-bit": BlockQuant(4),
    "blockq 2-bit": BlockQuant(2),
    "blockq 1-bit": BlockQuant(1),
    "blockq 4-bit stoch": BlockQuant(4, stochastic=True),
    "blockq 2-bit stoch": BlockQuant(2, stochastic=True),
    "blockq 1-bit stoch": BlockQuant(1, stochastic=True),
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


async def measure_demuon(x: torch.Tensor, transport: str, tmp: Path, n: int, w: int, use_wire: bool) -> float:
    """``ZmqTransport`` both ends (in one context, as raw); with ``use_wire`` the whole path,
    otherwise the transport alone carrying raw's two frames."""
    ctx = wire.DecodeContext(senders={0}, shapes={"x": tuple(x.shape)})
    identity = Identity()
    view = x.view(torch.uint8).numpy().data

    def decode(sender: int, frames: list[memoryview]) -> Any:
        return wire.decode(frames, ctx) if use_wire else frames

    zctx = zmq.asyncio.Context()
    rx: ZmqTransport[Any] = ZmqTransport(1, endpoint(transport, tmp, "rx"), {}, decode, hwm=HWM, context=zctx)
    tx: ZmqTransport[Any] | None = None
    try:
        await rx.start()
        tx = ZmqTransport(0, endpoint(transport, tmp, "tx"), {1: rx.endpoint}, decode, hwm=HWM, context=zctx)
        await tx.start()
        assert await tx.wait_ready([1], 5.0)
        sender = tx
        k = 0

        async def send() -> None:
            nonlocal k
            if use_wire:
                enc = {"x": identity.encode(x, seed=0)}
                frames = wire.encode(sender=0, round=k, phase="V", codec="identity", tensors=enc)
            else:
                frames = [b"hdr", view]
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
        zctx.destroy(linger=0)


def measure_memcpy(x: torch.Tensor, n: int) -> float:
    for _ in range(min(n, 8)):
        x.clone()
    start = time.perf_counter()
    for _ in range(n):
        x.clone()
    return time.perf_counter() - start


async def measure(method: str, x: torch.Tensor, transport: str, tmp: Path, n: int, w: int) -> float:
    if method == "memcpy":
        return measure_memcpy(x, n)
    if method in ("transport", "demuon"):
        return await measure_demuon(x, transport, tmp, n, w, use_wire=method == "demuon")
    return await measure_raw(x, transport, tmp, n, w, pickled=method == "pickle")


async def transfer_rows(quick: bool, repeats: int, console: Console) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="dmw", dir="/tmp"))  # short: ipc paths are limited
    try:
        for size in SIZES:
            x = torch.randn(size // 4)
            n, w = plan(size, quick)
            for transport in TRANSPORTS:
                console.log(f"{transport:>3} {size >> 10:>6} KiB  x{n} (window {w}) x{repeats} repetitions")
                times: dict[str, list[float]] = {m: [] for m in METHODS}
                for _ in range(repeats):  # the methods take turns: load drifts hit all alike
                    for method in METHODS:
                        times[method].append(await measure(method, x, transport, tmp, n, w))
                gbps = {m: [size * n / s / 1e9 for s in t] for m, t in times.items()}
                raw = statistics.median(gbps["raw"])
                for method in METHODS:
                    med = statistics.median(gbps[method])
                    rows.append(
                        {
                            "transport": transport,
                            "bytes": size,
                            "method": method,
                            "gbps": round(med, 3),
                            "ratio_to_raw": round(med / raw, 3),
                            "runs_gbps": [round(g, 3) for g in gbps[method]],
                            "messages": n,
                            "window": w,
                        }
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def codec_rows(quick: bool, console: Console) -> list[dict[str, Any]]:
    x = torch.randn(1024, 1024)
    dense = x.numel() * x.element_size()
    reps = 5 if quick else 21
    rows = []
    for name, codec in CODECS.items():
        console.log(f"codec {name}")
        enc = codec.encode(x, seed=0)
        codec.decode(enc, tuple(x.shape), x.dtype)  # warm-up
        seconds = []
        for seed in range(reps):
            start = time.perf_counter()
            codec.decode(codec.encode(x, seed=seed), tuple(x.shape), x.dtype)
            seconds.append(time.perf_counter() - start)
        rows.append(
            {
                "codec": name,
                "compression": round(dense / enc.nbytes, 2),
                "gbps": round(dense / statistics.median(seconds) / 1e9, 3),
            }
        )
    return rows


def show(rows: list[dict[str, Any]], codecs: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="Moving one float32 tensor: GB/s, median (× raw ZeroMQ)")
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
    ap.add_argument("--repeats", type=int, default=None, help="repetitions per cell (default 5, quick 3)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(1)
    console = Console(stderr=True, quiet=args.json)
    started = time.perf_counter()
    rows = asyncio.run(transfer_rows(args.quick, repeats, console))
    codecs = codec_rows(args.quick, console)
    console.log(f"stochastic block quantization: {native.status()}")
    console.log(f"done in {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps({"rows": rows, "codecs": codecs, "native": native.status()}, indent=2))
    else:
        show(rows, codecs, Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
