"""The data plane at real model sizes: how fast a hit gets into an engine's buffer, and a save
into the node, against memcpy (and a raw TCP socket pair) measured in the same run.

Against a real ``lmcache-node run`` subprocess (memory tier 5 GiB, no disk), for the KV
geometries of real models in bf16 (256-token chunks) and prompts of 4k, 8k and 32k tokens:

* **hit, shared memory**: ``Client.read(keys)`` over ipc:// on this host (the node's arena is
  mapped here), then ``lease.copy_into`` of every chunk into an engine buffer (copied and
  checksummed in one pass): what the adapters do;
* **hit, frames** (the old path, and what a client without the arena gets): the same with a
  client that does not map the arena: payloads come as ZeroMQ frames and are verified;
* **memcpy**: ``np.copyto`` of the same chunk sizes into the same engine buffers;
* **PUT**: ``Client.put_payloads`` of the whole prompt, what the adapters call: shared memory
  (copied into slots the node reserves and checksummed in the same pass; the node verifies
  each before acknowledging) and frames (records built, sent as frames), after the arena's
  pages were touched once (a node that has run a while);
* **peer**: a GET over tcp://127.0.0.1 (what one node asks of another) of Llama-3-8B chunks,
  against a raw TCP socket pair between two processes moving the same bytes;
* **mesh fetch**: three nodes; the engine's node lacks a chain two peers hold and fetches it
  from both at once (slices side by side), then hands it over in shared memory.

Cells above 4 GiB of KV (Llama-3-70B at 32k: 10 GiB) are measured on their first 4 GiB: a
chunk's cost does not depend on how many others the prompt has. Reported: median GB/s of
``--reps`` runs and its ratio to memcpy (to the raw TCP pair for peers); the machine is shared
and noisy, so read the ratios. Prints a table, writes JSON and a PNG chart.

Run:  python bench/bench_dataplane.py            (all cells, a few minutes)
      python bench/bench_dataplane.py --quick    (Llama-3-8B and SmolLM2 at 4k, one rep)
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import machine_info, no_gc, write_results

from lmcache_mesh.engines.cli import chart, launch
from lmcache_mesh.engines.cli.tables import Column, render, table
from lmcache_mesh.node.client import Client
from lmcache_mesh.node.keys import chunk_keys, namespace_id
from lmcache_mesh.node.records import ChunkRecord
from lmcache_mesh.transports.zmq import reuse_frame_buffers

CHUNK_TOKENS = 256
META = {"tokens": CHUNK_TOKENS, "dtype": "bfloat16"}
MAX_CELL_BYTES = 4 << 30
NODE_MEMORY = "5GiB"
ENGINE_BUFFER_BYTES = 1 << 30
"""The engine's KV buffers the hits are copied into (cycled through; touched before timing)."""


@dataclass(frozen=True)
class Geometry:
    name: str
    layers: int
    kv_heads: int
    head_size: int

    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_size * 2  # K and V, bf16

    def chunk_bytes(self) -> int:
        return self.bytes_per_token() * CHUNK_TOKENS


GEOMETRIES = [
    Geometry("Llama-3-8B", 32, 8, 128),
    Geometry("Llama-3-70B", 80, 8, 128),
    Geometry("Qwen2.5-7B", 28, 4, 128),
    Geometry("Mistral-7B", 32, 8, 128),
    Geometry("SmolLM2-135M", 30, 3, 64),
]
LENGTHS = [4096, 8192, 32768]

SHORT = {
    "Llama-3-8B": "L8B",
    "Llama-3-70B": "L70B",
    "Qwen2.5-7B": "Q7B",
    "Mistral-7B": "M7B",
    "SmolLM2-135M": "S135M",
}
"""Chart labels."""

TARGETS = {"hit_shm_vs_memcpy": 0.8, "put_shm_vs_memcpy": 0.5, "peer_vs_raw_tcp": 0.5}


@dataclass
class Cell:
    model: str
    tokens: int
    chunk_bytes: int
    chunks: int
    measured_bytes: int
    memcpy_gbps: float
    hit_shm_gbps: float
    hit_frames_gbps: float
    put_shm_gbps: float
    put_frames_gbps: float

    @property
    def ratios(self) -> dict[str, float]:
        m = self.memcpy_gbps
        return {
            "hit_shm": self.hit_shm_gbps / m,
            "hit_frames": self.hit_frames_gbps / m,
            "put_shm": self.put_shm_gbps / m,
            "put_frames": self.put_frames_gbps / m,
        }


def median_gbps(nbytes: int, run: Callable[[], object], reps: int) -> float:
    seconds = []
    for _ in range(reps):
        with no_gc():
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
    return nbytes / statistics.median(seconds) / 1e9


def pool(chunk_bytes: int, n: int, salt: int) -> list[np.ndarray]:
    """``n`` distinct chunk payloads (records cycle through them: distinct keys, shared bytes)."""
    out = []
    for i in range(n):
        a = np.empty(chunk_bytes, dtype=np.uint8)
        a[:] = (i * 7 + salt) % 251
        out.append(a)
    return out


def engine_buffers(chunk_bytes: int) -> list[np.ndarray]:
    n = max(1, ENGINE_BUFFER_BYTES // chunk_bytes)
    return [np.ones(chunk_bytes, dtype=np.uint8) for _ in range(n)]  # ones: pages touched now


def measure_cell(geometry: Geometry, tokens: int, reps: int, shm: Client, frames: Client, salt: int) -> Cell:
    chunk = geometry.chunk_bytes()
    n = min(tokens // CHUNK_TOKENS, MAX_CELL_BYTES // chunk)
    total = n * chunk
    ns = namespace_id(geometry.name.encode(), {"dtype": "bf16"}, chunk_tokens=CHUNK_TOKENS)
    sources = pool(chunk, 8, salt)
    dst = engine_buffers(chunk)
    keys = chunk_keys(ns, [salt] + list(range(n * CHUNK_TOKENS - 1)), CHUNK_TOKENS)

    payloads = [sources[i % 8] for i in range(n)]

    def put(client: Client) -> Callable[[], None]:
        def run() -> None:
            client.delete(keys)  # cheap, and every rep stores afresh
            client.put_payloads(keys, payloads, ns, META)

        return run

    def hit(client: Client) -> Callable[[], None]:
        def run() -> None:
            with client.read(keys, timeout_s=120) as lease:
                for i in range(n):
                    if not lease.copy_into(i, dst[i % len(dst)]):
                        raise RuntimeError(f"chunk {i} missing or corrupt")

        return run

    def memcpy() -> None:
        for i in range(n):
            np.copyto(dst[i % len(dst)], sources[i % 8])

    memcpy_gbps = median_gbps(total, memcpy, max(reps, 3))
    put(shm)()  # touch the arena's pages once: a node that has run a while
    put_shm = median_gbps(total, put(shm), reps)
    put_frames = median_gbps(total, put(frames), reps)
    hit_shm = median_gbps(total, hit(shm), reps)
    hit_frames = median_gbps(total, hit(frames), reps)
    shm.delete(keys)
    return Cell(geometry.name, tokens, chunk, n, total, memcpy_gbps, hit_shm, hit_frames, put_shm, put_frames)


_RAW_SENDER = """
import socket, sys
host, port, total, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
buf = memoryview(bytearray(b"x" * size))
with socket.create_connection((host, port)) as s:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = 0
    while sent < total:
        s.sendall(buf[: min(size, total - sent)])
        sent += min(size, total - sent)
"""


def raw_tcp_gbps(total: int, chunk: int, reps: int) -> float:
    """A raw TCP socket pair between this process and a child: the child sends ``total`` bytes,
    we receive them into a chunk-sized buffer."""
    buf = memoryview(bytearray(chunk))

    def once() -> None:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            child = subprocess.Popen(
                [sys.executable, "-c", _RAW_SENDER, "127.0.0.1", str(port), str(total), str(chunk)]
            )
            conn, _ = server.accept()
            with conn:
                got = 0
                while got < total:
                    n = conn.recv_into(buf[: min(chunk, total - got)])
                    if n == 0:
                        raise RuntimeError("raw TCP sender stopped early")
                    got += n
            child.wait(60)

    return median_gbps(total, once, reps)


def measure_peer(address: str, reps: int) -> dict[str, Any]:
    """GET over tcp:// (a peer's path) of 4k tokens of Llama-3-8B KV vs a raw TCP pair. This
    process receives as a node does, reusing frame buffers (the cells before are measured
    without that: an engine's process is not tuned)."""
    reuse_frame_buffers()
    geometry = GEOMETRIES[0]
    chunk, n = geometry.chunk_bytes(), 4096 // CHUNK_TOKENS
    ns = namespace_id(b"peer", {"dtype": "bf16"}, chunk_tokens=CHUNK_TOKENS)
    keys = chunk_keys(ns, list(range(n * CHUNK_TOKENS)), CHUNK_TOKENS)
    sources = pool(chunk, 8, 3)
    with Client(address, timeout_s=120, shm=False) as tcp:
        tcp.put_records([ChunkRecord.build(k, sources[i % 8], ns) for i, k in enumerate(keys)])

        def get() -> None:
            if any(r is None for r in tcp.get_records(keys, timeout_s=120)):
                raise RuntimeError("peer GET missed")

        get_gbps = median_gbps(n * chunk, get, max(reps, 3))
        tcp.delete(keys)
    raw = raw_tcp_gbps(n * chunk, chunk, max(reps, 3))
    return {"model": geometry.name, "tokens": 4096, "bytes": n * chunk, "get_tcp_gbps": get_gbps,
            "raw_tcp_gbps": raw, "ratio": get_gbps / raw}  # fmt: skip


def measure_mesh_fetch(reps: int) -> dict[str, Any]:
    """The mesh's own path: an engine's node fetches a 4k-token Llama-3-8B chain it lacks from
    the two peers holding it (each sends part, side by side), verifies and keeps it, and hands
    it to the engine through shared memory. Three ``lmcache-node run`` processes on loopback;
    a fresh chain per run, into arena pages the run before used (nodes that have run a while);
    GB/s counts the chunks that came from peers (the reader owns, and so already holds, about
    a third)."""
    geometry = GEOMETRIES[0]
    chunk, n = geometry.chunk_bytes(), 4096 // CHUNK_TOKENS
    sources = pool(chunk, 4, 5)
    flags = ("--memory", "3GiB", "--disk", "0", "--replicas", "1")
    first = launch.start(*flags, name="holder-a", isolate=True, ping=True)
    nodes = [first]
    try:
        nodes.append(launch.start(*flags, name="holder-b", join=first.tcp, isolate=True, ping=True))
        nodes.append(launch.start(*flags, name="reader", join=first.tcp, ipc=True, isolate=True, ping=True))
        a, b, reader = nodes
        assert reader.ipc is not None
        seconds, remote_bytes = [], []
        with Client(a.tcp, timeout_s=120, shm=False) as ca, Client(b.tcp, timeout_s=120, shm=False) as cb, \
                Client(reader.ipc, timeout_s=120) as engine:  # fmt: skip
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and sum(m["state"] == "alive" for m in engine.stats().get("members", [])) < 3
            ):
                time.sleep(0.2)
            for rep in range(1 + max(reps, 3)):  # the first touches the arenas' pages (not timed)
                ns = namespace_id(b"mesh-fetch-%d" % rep, {"dtype": "bf16"}, chunk_tokens=CHUNK_TOKENS)
                keys = chunk_keys(ns, list(range(n * CHUNK_TOKENS)), CHUNK_TOKENS)
                records = [ChunkRecord.build(k, sources[i % 4], ns) for i, k in enumerate(keys)]
                ca.put_records(records)
                cb.put_records(records)
                holders = _settled_holders(engine, keys, {"holder-a", "holder-b"})
                fetched = sum(1 for hs in holders if "reader" not in hs)
                with no_gc():
                    start = time.perf_counter()
                    with engine.read(keys, timeout_s=120) as lease:
                        if any(r is None for r in lease.records):
                            raise RuntimeError("mesh fetch missed")
                    took = time.perf_counter() - start
                for client in (ca, cb, engine):  # their slots are reused by the next chain
                    client.delete(keys)
                if rep > 0:
                    seconds.append(took)
                    remote_bytes.append(fetched * chunk)
    finally:
        for d in reversed(nodes):
            d.stop()
    i = sorted(range(len(seconds)), key=lambda j: seconds[j])[(len(seconds) - 1) // 2]  # the median run
    return {"model": geometry.name, "tokens": 4096, "holders": 2, "fetched_bytes": remote_bytes[i],
            "gbps": remote_bytes[i] / seconds[i] / 1e9}  # fmt: skip


def _settled_holders(client: Client, keys: list[bytes], holders: set[str]) -> list[list[str]]:
    """Who holds each key, once every key is indexed with ``holders`` and replication is quiet."""
    deadline = time.monotonic() + 30
    last: list[list[str]] = []
    while time.monotonic() < deadline:
        _, now = client.locate(keys)
        if now == last and all(holders <= set(hs) for hs in now):
            return now
        last = now
        time.sleep(0.3)
    raise RuntimeError(f"chunks not indexed on {sorted(holders)} within 30 s: {last}")


def report(cells: list[Cell], peer: dict[str, Any]) -> str:
    t = table(Column("model"), "tokens", "chunk MiB", "memcpy GB/s", "hit shm GB/s", "×memcpy",
              "hit frames GB/s", "×memcpy", "PUT shm GB/s", "×memcpy", "PUT frames GB/s", "×memcpy")  # fmt: skip
    for c in cells:
        r = c.ratios
        tokens = f"{c.tokens}" + (
            ""
            if c.measured_bytes == c.chunks * c.chunk_bytes and c.chunks * CHUNK_TOKENS == c.tokens
            else f" ({c.chunks * CHUNK_TOKENS} measured)"
        )
        t.add_row(c.model, tokens, f"{c.chunk_bytes / (1 << 20):.1f}", f"{c.memcpy_gbps:.2f}",
                  f"{c.hit_shm_gbps:.2f}", f"{r['hit_shm']:.2f}", f"{c.hit_frames_gbps:.2f}", f"{r['hit_frames']:.2f}",
                  f"{c.put_shm_gbps:.2f}", f"{r['put_shm']:.2f}", f"{c.put_frames_gbps:.2f}", f"{r['put_frames']:.2f}")  # fmt: skip
    p = table(Column("peer path"), "bytes", "GB/s", "raw TCP pair GB/s", "×raw TCP")
    p.add_row(f"GET over tcp:// ({peer['model']}, {peer['tokens']} tokens)", f"{peer['bytes'] >> 20} MiB",
              f"{peer['get_tcp_gbps']:.2f}", f"{peer['raw_tcp_gbps']:.2f}", f"{peer['ratio']:.2f}")  # fmt: skip
    mesh = peer.get("mesh")
    if mesh is not None:
        p.add_row(f"mesh fetch from {mesh['holders']} holders ({mesh['model']}, {mesh['tokens']} tokens)",
                  f"{mesh['fetched_bytes'] >> 20} MiB", f"{mesh['gbps']:.2f}", f"{peer['raw_tcp_gbps']:.2f}",
                  f"{mesh['gbps'] / peer['raw_tcp_gbps']:.2f}")  # fmt: skip
    return render(t) + "\n" + render(p)


def draw(cells: list[Cell], path: Path) -> None:
    if not chart.available():
        print(chart.MISSING)
        return
    shm, frames = (40, 110, 200), (200, 120, 60)
    values, colours, labels = [], [], []
    for c in cells:
        label = f"{SHORT[c.model]} {c.tokens // 1024}k"
        values += [c.ratios["hit_shm"], c.ratios["hit_frames"]]
        colours += [shm, frames]
        labels += [label, ""]
    chart.write_bar_chart(path, values, colours, labels=labels, title="A hit into the engine's buffer, × memcpy",
                          y_title="throughput / memcpy (same run)", legend=[("shared memory", shm), ("frames", frames)],
                          width=1400, height=480)  # fmt: skip
    print(f"chart written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Llama-3-8B and SmolLM2 at 4k tokens, one rep")
    parser.add_argument("--reps", type=int, default=3, help="runs per cell (median reported)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "bench_dataplane.json"
    )
    args = parser.parse_args(argv)
    reps = 1 if args.quick else args.reps
    grid = [(g, t) for g in GEOMETRIES for t in LENGTHS]
    if args.quick:
        grid = [(GEOMETRIES[0], 4096), (GEOMETRIES[-1], 4096)]
    daemon = launch.start("--memory", NODE_MEMORY, "--disk", "0", ipc=True, isolate=True, ping=True)
    cells: list[Cell] = []
    try:
        assert daemon.ipc is not None
        with Client(daemon.ipc, timeout_s=120) as shm, Client(daemon.ipc, timeout_s=120, shm=False) as frames:
            shm.ping()
            shm.put_records([])  # maps the arena
            for i, (geometry, tokens) in enumerate(grid, 1):
                print(f"[{i}/{len(grid)}] {geometry.name}, {tokens} tokens ...", flush=True)
                cells.append(measure_cell(geometry, tokens, reps, shm, frames, salt=i))
                if shm.transport != "shared memory":
                    raise RuntimeError("the client did not map the node's arena: is /dev/shm available?")
        print("[peer] GET over tcp:// vs a raw TCP socket pair ...", flush=True)
        peer = measure_peer(daemon.tcp, reps)
    finally:
        daemon.stop()
    print("[mesh] a chain fetched from two holders by the engine's node ...", flush=True)
    peer["mesh"] = measure_mesh_fetch(reps)
    print(report(cells, peer))
    checks = {
        "hit_shm_vs_memcpy": min(c.ratios["hit_shm"] for c in cells if c.model == "Llama-3-8B"),
        "put_shm_vs_memcpy": min(c.ratios["put_shm"] for c in cells if c.model == "Llama-3-8B"),
        "peer_vs_raw_tcp": peer["ratio"],
    }
    verdicts = {
        k: {"value": round(v, 3), "target": TARGETS[k], "pass": v >= TARGETS[k]} for k, v in checks.items()
    }
    for name, v in verdicts.items():
        print(f"{name}: {v['value']:.2f} (target >= {v['target']}) {'PASS' if v['pass'] else 'FAIL'}")
    result = {
        "machine": machine_info(node_memory=NODE_MEMORY, chunk_tokens=CHUNK_TOKENS, reps=reps),
        "cells": [{**asdict(c), "ratios": c.ratios} for c in cells],
        "peer": peer,
        "targets": verdicts,
    }
    write_results(result, args.out)
    draw(cells, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
