"""WebRTC (aiortc) data-channel throughput and link setup, against ZeroMQ tcp in the same run.

A server process answers requests of a few bytes with a reply of 1, 4 or 16 MiB, as a
node answers a GET: over our WebRTC link (1 channel, one request in flight; and several
channels with as many requests in flight) and over ZeroMQ tcp (the direct-path baseline).
Setup is the time from creating the offer until the link is open on both ends, with the
SDP carried between the two processes (as the mesh relays it), median of several links.
Loopback, host candidates only. Prints a table, writes JSON; read the ratios.

    python bench/bench_webrtc.py [--seconds 4] [--out bench/results/webrtc.json]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from benchlib import machine_info, write_results

from lmcache_mesh.engines.cli.tables import render, table
from lmcache_mesh.transports.webrtc import WebRTCConfig, answer, offer

SIZES = [1 << 20, 4 << 20, 16 << 20]
CHANNELS = 4


def config(channels: int) -> WebRTCConfig:
    return WebRTCConfig(host_addresses=("127.0.0.1",), channels=channels)


async def webrtc_server(offers: Any, answers: Any, channels: int) -> None:
    replies = {size: b"x" * size for size in SIZES}
    tasks: set[asyncio.Future[Any]] = set()

    async def serve(sdp: str) -> None:
        link, answer_sdp = await answer(config(channels), sdp)
        answers.put(answer_sdp)
        await link.wait_open()

        async def reply(frames: list[memoryview]) -> None:
            await link.send([bytes(frames[0]), replies[int(bytes(frames[1]))]])

        try:
            while True:
                frames = await link.recv()
                task = asyncio.ensure_future(reply(frames))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception:
            await link.close()

    loop = asyncio.get_running_loop()
    while True:
        sdp = await loop.run_in_executor(None, offers.get)
        if sdp is None:
            return
        task = asyncio.ensure_future(serve(sdp))  # links are served side by side
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def run_webrtc_server(offers: Any, answers: Any, channels: int) -> None:
    asyncio.run(webrtc_server(offers, answers, channels))


def zmq_server(endpoint: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint.put(f"tcp://127.0.0.1:{port}")
    replies = {size: b"x" * size for size in SIZES}
    while True:
        peer, rid, size = sock.recv_multipart()
        if size == b"stop":
            return
        sock.send_multipart([peer, rid, replies[int(size)]], copy=False)


async def throughput(send: Any, recv: Any, size: int, inflight: int, seconds: float) -> float:
    """MB/s of replies of ``size`` with ``inflight`` requests outstanding, for about ``seconds``."""
    done = 0
    ids = iter(range(1 << 30))
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await send(next(ids), size)
            await recv()
            done += size

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return done / (time.perf_counter() - started) / 1e6


async def measure_webrtc(channels: int, inflight: int, seconds: float, setups: int) -> dict[str, Any]:
    offers: Any = mp.Queue()
    answers: Any = mp.Queue()
    proc = mp.Process(target=run_webrtc_server, args=(offers, answers, channels), daemon=True)
    proc.start()
    setup_ms = []
    link = None
    for _ in range(setups):
        started = time.perf_counter()
        dialing = await offer(config(channels))
        offers.put(dialing.sdp)
        answer_sdp = await asyncio.get_running_loop().run_in_executor(None, answers.get)
        new = await dialing.complete(answer_sdp)
        setup_ms.append(1000 * (time.perf_counter() - started))
        if link is not None:
            await link.close()
        link = new
    assert link is not None
    replies: asyncio.Queue[int] = asyncio.Queue()

    async def reader() -> None:
        while True:
            frames = await link.recv()
            replies.put_nowait(int.from_bytes(bytes(frames[0]), "little"))

    read_task = asyncio.ensure_future(reader())

    async def send(rid: int, size: int) -> None:
        await link.send([rid.to_bytes(8, "little"), str(size).encode()])

    async def recv() -> None:
        await replies.get()

    result: dict[str, Any] = {"setup_ms": setup_ms}
    for size in SIZES:
        result[str(size)] = await throughput(send, recv, size, inflight, seconds)
    read_task.cancel()
    await link.close()
    offers.put(None)
    proc.join(10)
    return result


async def measure_zmq(seconds: float) -> dict[str, float]:
    endpoint: Any = mp.Queue()
    proc = mp.Process(target=zmq_server, args=(endpoint,), daemon=True)
    proc.start()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint.get())

    async def send(rid: int, size: int) -> None:
        await sock.send_multipart([rid.to_bytes(8, "little"), str(size).encode()])

    async def recv() -> None:
        await sock.recv_multipart(copy=False)

    result = {str(size): await throughput(send, recv, size, 1, seconds) for size in SIZES}
    await sock.send_multipart([b"", b"stop"])
    proc.join(10)
    sock.close(0)
    ctx.term()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--setups", type=int, default=7, help="links made to time setup")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "webrtc.json")
    args = parser.parse_args()
    print("measuring ZeroMQ tcp ...", flush=True)
    zmq_tcp = asyncio.run(measure_zmq(args.seconds))
    print("measuring WebRTC, 1 channel ...", flush=True)
    one = asyncio.run(measure_webrtc(1, 1, args.seconds, args.setups))
    print(f"measuring WebRTC, {CHANNELS} channels, {CHANNELS} in flight ...", flush=True)
    several = asyncio.run(measure_webrtc(CHANNELS, CHANNELS, args.seconds, args.setups))
    rows = []
    t = table("record", "zmq tcp MB/s", "webrtc 1ch MB/s", "ratio", f"webrtc {CHANNELS}ch MB/s", "ratio")
    for size in SIZES:
        z, a, b = zmq_tcp[str(size)], one[str(size)], several[str(size)]
        rows.append(
            {
                "bytes": size,
                "zmq_tcp_mb_s": z,
                "webrtc_1ch_mb_s": a,
                f"webrtc_{CHANNELS}ch_mb_s": b,
                "ratio_1ch": a / z,
                f"ratio_{CHANNELS}ch": b / z,
            }
        )
        t.add_row(f"{size >> 20}Mi", f"{z:.1f}", f"{a:.1f}", f"{a / z:.4f}", f"{b:.1f}", f"{b / z:.4f}")
    print()
    print(render(t, indent=0))
    setup = sorted(one["setup_ms"] + several["setup_ms"])
    print(
        f"\nlink setup (offer -> open, two processes): median {statistics.median(setup):.0f} ms, "
        f"min {setup[0]:.0f} ms, max {setup[-1]:.0f} ms over {len(setup)} links"
    )
    best = max(max(r["webrtc_1ch_mb_s"], r[f"webrtc_{CHANNELS}ch_mb_s"]) for r in rows)
    print(
        f"targets: >= 50 MB/s with several channels (best here {best:.1f}); setup <= 200 ms "
        f"(median {statistics.median(setup):.0f})"
    )
    write_results(
        {
            "benchmark": "webrtc",
            "machine": machine_info(),
            "seconds": args.seconds,
            "rows": rows,
            "setup_ms": setup,
            "setup_ms_median": statistics.median(setup),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
