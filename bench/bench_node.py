"""Benchmark of one lmcache-node daemon over ZeroMQ, against a numpy memcpy baseline.

What it measures, all against a real ``lmcache-node run`` subprocess started here
(memory tier 2 GiB, no disk tier) and the blocking :class:`Client`:

* memcpy baseline: ``np.copyto(dst, src)`` of each record size, median of many reps, GB/s;
* PUT: ``client.put(key, payload, namespace=ns)`` with distinct keys (the client's xxh3
  checksum is included: this is what a user gets), one request outstanding;
* GET: ``client.get([key])``, one record per request, one request outstanding, and a
  pipelined variant ``client.get(keys8)`` (8 records in one request). The client verifies
  the xxh3 checksum of every payload it receives, so every byte is read;
* record sizes 256 KiB, 1 MiB, 4 MiB, 16 MiB, over ipc:// and tcp://127.0.0.1; each cell
  is GB/s = payload bytes / median seconds per call, and its ratio to memcpy of that size;
* LOOKUP latency of a 128-key chain, all present: p50/p99 over 2000 calls, per transport,
  and PING latency as the round-trip floor;
* daemon RSS (VmRSS) right after start (before any request) and after the load;
* for diagnosis, minor page faults per call in this process and in the daemon.

A PUT cell stores at most 1 GiB (half the memory tier), so no eviction is timed; every
cell's records are deleted after it.

It prints a table and writes JSON (machine info, baselines, cells, ratios, targets and
pass/fail) to ``bench/results/bench_node.json`` unless ``--out`` says otherwise.

Run:  python bench/bench_node.py            (full run, under a minute)
      python bench/bench_node.py --quick    (smoke check: 1 MiB and 4 MiB, fewer reps)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import (
    latency,
    latency_table,
    machine_info,
    no_gc,
    percentile,
    write_results,
)

from lmcache_mesh.engines.cli import launch
from lmcache_mesh.engines.cli.launch import STARTUP_TIMEOUT_S, Daemon
from lmcache_mesh.engines.cli.tables import Column, render, table
from lmcache_mesh.node import ChunkRecord, Client, chunk_keys, namespace_id

KIB = 1 << 10
MIB = 1 << 20
FULL_SIZES = (256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB)
QUICK_SIZES = (1 * MIB, 4 * MIB)
BATCH = 8
LOOKUP_CHUNKS = 128
CHUNK_TOKENS = 256
LOOKUP_PAYLOAD = 1 * KIB
CLIENT_TIMEOUT_S = 30.0
WARMUP_CALLS = 2  # untimed calls before each timed cell
DAEMON_MEMORY = "2GiB"
PUT_MAX_BYTES = 1 << 30  # bytes one PUT cell may store: half the memory tier, so no eviction is timed
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_node.json"

# Targets (issue): GET 4 MiB single-record vs memcpy, LOOKUP p99, idle RSS.
TARGET_GET_IPC_RATIO = 0.25
TARGET_GET_TCP_RATIO = 0.15
TARGET_LOOKUP_P99_MS = 1.0
TARGET_IDLE_RSS_MB = 80.0
TARGET_SIZE = 4 * MIB


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    cell_seconds: float  # time budget of one timed cell (adaptive reps)
    min_reps: int
    max_reps: int
    lookup_reps: int
    memcpy_seconds: float


FULL = Settings(FULL_SIZES, cell_seconds=1.2, min_reps=5, max_reps=5000, lookup_reps=2000, memcpy_seconds=0.4)
QUICK = Settings(
    QUICK_SIZES, cell_seconds=0.3, min_reps=3, max_reps=1000, lookup_reps=300, memcpy_seconds=0.15
)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    reps: int
    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    client_faults_per_call: float = 0.0
    daemon_faults_per_call: float = 0.0


FaultProbe = Callable[[], tuple[int, int]]
"""Returns (client, daemon) minor page-fault counts so far."""


def time_calls(
    fn: Callable[[int], object],
    budget_s: float,
    min_reps: int,
    max_reps: int,
    warmup: int = WARMUP_CALLS,
    probe: FaultProbe | None = None,
) -> Timing:
    """Time ``fn(i)`` for i = 0, 1, ...; reps chosen so the cell takes about ``budget_s``.

    ``probe``, if given, is read around the timed loop to count page faults per call.
    """
    i = 0
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn(i)
        i += 1
    estimate = max((time.perf_counter() - t0) / max(warmup, 1), 1e-7)
    reps = int(min(max_reps, max(min_reps, budget_s / estimate)))
    samples: list[float] = []
    with no_gc():
        before = probe() if probe else (0, 0)
        for _ in range(reps):
            start = time.perf_counter()
            fn(i)
            samples.append(time.perf_counter() - start)
            i += 1
        after = probe() if probe else (0, 0)
    samples.sort()
    return Timing(
        reps,
        statistics.median(samples),
        percentile(samples, 10),
        percentile(samples, 90),
        samples[0],
        (after[0] - before[0]) / reps,
        (after[1] - before[1]) / reps,
    )


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# --------------------------------------------------------------------------- daemon


def start_daemon() -> Daemon:
    """Start ``lmcache-node run`` on tcp port 0 and an ipc socket; wait for its serving line."""
    return launch.start(
        "--memory", DAEMON_MEMORY, "--disk", "0", "--max-record", "64MiB", ipc=True, isolate=True
    )  # fmt: skip


def wait_ready(address: str, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
    """Ping until the daemon answers; returns seconds waited. Raises on timeout."""
    start = time.monotonic()
    with Client(address, timeout_s=1.0) as client:
        while True:
            try:
                client.ping(timeout_s=1.0)
                return time.monotonic() - start
            except Exception:
                if time.monotonic() - start > timeout_s:
                    raise
                time.sleep(0.05)


def minor_faults(pid: int) -> int:
    """Minor page faults of ``pid`` so far (field 10 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def fault_probe(daemon_pid: int) -> FaultProbe:
    return lambda: (resource.getrusage(resource.RUSAGE_SELF).ru_minflt, minor_faults(daemon_pid))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------- workloads


class Keys:
    """Distinct 16-byte keys for the whole run."""

    def __init__(self) -> None:
        self._n = 0

    def take(self, n: int) -> list[bytes]:
        out = [b"bench-key-" + (self._n + i).to_bytes(6, "little") for i in range(n)]
        self._n += n
        return out


def make_payload(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def memcpy_baseline(size: int, s: Settings) -> dict[str, Any]:
    src = make_payload(size, 1)
    dst = np.zeros_like(src)
    np.copyto(dst, src)  # fault both in
    t = time_calls(lambda _i: np.copyto(dst, src), s.memcpy_seconds, 20, 200_000, warmup=5)
    return {"size": size, "reps": t.reps, "median_s": t.median_s, "gbps": gbps(size, t.median_s)}


def bench_put(
    client: Client, ns: bytes, keys: Keys, size: int, s: Settings, probe: FaultProbe
) -> tuple[Timing, list[bytes]]:
    payload = make_payload(size, 2)
    max_reps = min(s.max_reps, max(s.min_reps, PUT_MAX_BYTES // size - 2))
    pool = keys.take(max_reps + WARMUP_CALLS)
    used: list[bytes] = []

    def put(i: int) -> None:
        client.put(pool[i], payload, namespace=ns)
        used.append(pool[i])

    return time_calls(put, s.cell_seconds, s.min_reps, max_reps, probe=probe), used


def _check_get(got: Sequence[memoryview | None], expected: np.ndarray) -> None:
    for view in got:
        if view is None or len(view) != expected.nbytes or bytes(view[:4096]) != expected[:4096].tobytes():
            raise RuntimeError("GET returned a miss or the wrong payload")


def bench_get(
    client: Client, ns: bytes, keys: Keys, size: int, batch: int, s: Settings, probe: FaultProbe
) -> tuple[Timing, list[bytes]]:
    """Put ``batch`` records of ``size``, then time ``client.get(those keys)``."""
    payload = make_payload(size, 3)
    ks = keys.take(batch)
    client.put_records([ChunkRecord.build(k, payload, ns) for k in ks])
    _check_get(client.get(ks), payload)
    t = time_calls(lambda _i: client.get(ks), s.cell_seconds, s.min_reps, s.max_reps, probe=probe)
    return t, ks


def bench_lookup(client: Client, keys: Sequence[bytes], reps: int) -> dict[str, Any]:
    def lookup() -> None:
        hits = client.lookup(keys)
        if hits != len(keys):
            raise RuntimeError(f"LOOKUP found {hits} of {len(keys)} keys")

    return {"keys": len(keys), **latency(lookup, reps)}


def lookup_keys() -> tuple[bytes, list[bytes]]:
    ns = namespace_id(b"bench", {"engine": "bench"}, CHUNK_TOKENS)
    return ns, chunk_keys(ns, list(range(LOOKUP_CHUNKS * CHUNK_TOKENS)), CHUNK_TOKENS)


# --------------------------------------------------------------------------- run


def _cell(
    op: str, transport: str, size: int, batch: int, t: Timing, memcpy: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    rate = gbps(size * batch, t.median_s)
    return {
        "op": op,
        "transport": transport,
        "size": size,
        "records_per_call": batch,
        "reps": t.reps,
        "median_s": t.median_s,
        "p10_s": t.p10_s,
        "p90_s": t.p90_s,
        "min_s": t.min_s,
        "gbps": rate,
        "ratio_to_memcpy": rate / memcpy[size]["gbps"],
        "client_minor_faults_per_call": t.client_faults_per_call,
        "daemon_minor_faults_per_call": t.daemon_faults_per_call,
    }


def bench_transport(
    transport: str,
    address: str,
    s: Settings,
    memcpy: dict[int, dict[str, Any]],
    keys: Keys,
    probe: FaultProbe,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """PUT/GET cells for every size, then LOOKUP and PING latency, over one transport."""
    cells: list[dict[str, Any]] = []
    ns = namespace_id(b"bench-bulk", {"engine": "bench"}, CHUNK_TOKENS)
    with Client(address, timeout_s=CLIENT_TIMEOUT_S) as client:
        for size in s.sizes:
            t, used = bench_put(client, ns, keys, size, s, probe)
            cells.append(_cell("put", transport, size, 1, t, memcpy))
            client.delete(used)
            for batch, op in ((1, "get"), (BATCH, "get_batch")):
                t, used = bench_get(client, ns, keys, size, batch, s, probe)
                cells.append(_cell(op, transport, size, batch, t, memcpy))
                client.delete(used)
            log(f"  {transport} {_size_str(size)} done")
        _, lkeys = lookup_keys()
        lookup = bench_lookup(client, lkeys, s.lookup_reps)
        ping = latency(client.ping, s.lookup_reps)
        if client.checksum_failures:
            raise RuntimeError(f"{client.checksum_failures} GET payloads failed their checksum")
    return cells, lookup, ping


def put_lookup_chain(address: str) -> None:
    ns, keys = lookup_keys()
    payload = make_payload(LOOKUP_PAYLOAD, 4)
    with Client(address, timeout_s=CLIENT_TIMEOUT_S) as client:
        client.put_records([ChunkRecord.build(k, payload, ns) for k in keys])
        if client.lookup(keys) != len(keys):
            raise RuntimeError("LOOKUP chain not fully present after PUT")


def find_cell(cells: Sequence[dict[str, Any]], op: str, transport: str, size: int) -> dict[str, Any] | None:
    return next(
        (c for c in cells if c["op"] == op and c["transport"] == transport and c["size"] == size), None
    )


def evaluate_targets(
    cells: Sequence[dict[str, Any]], lookup: dict[str, dict[str, Any]], idle_rss: float
) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    for transport, need in (("ipc", TARGET_GET_IPC_RATIO), ("tcp", TARGET_GET_TCP_RATIO)):
        cell = find_cell(cells, "get", transport, TARGET_SIZE)
        value = None if cell is None else cell["ratio_to_memcpy"]
        targets.append({
            "name": f"GET 4 MiB over {transport} (single record) / memcpy",
            "value": value, "op": ">=", "threshold": need,
            "passed": None if value is None else value >= need,
        })  # fmt: skip
    for transport, res in lookup.items():
        value = res["p99_ms"]
        targets.append({
            "name": f"LOOKUP {LOOKUP_CHUNKS} keys p99 over {transport} (ms)",
            "value": value, "op": "<=", "threshold": TARGET_LOOKUP_P99_MS,
            "passed": value <= TARGET_LOOKUP_P99_MS,
        })  # fmt: skip
    targets.append({
        "name": "idle daemon RSS (MB)", "value": idle_rss, "op": "<=", "threshold": TARGET_IDLE_RSS_MB,
        "passed": idle_rss <= TARGET_IDLE_RSS_MB,
    })  # fmt: skip
    return targets


def run(s: Settings, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    log("memcpy baseline ...")
    memcpy = {size: memcpy_baseline(size, s) for size in s.sizes}
    log("starting daemon ...")
    daemon = start_daemon()
    exit_code: int | None = None
    try:
        rss_start = rss_mb(daemon.proc.pid)  # before any request
        ready_s = wait_ready(daemon.ipc)
        rss_idle_after_ping = rss_mb(daemon.proc.pid)
        put_lookup_chain(daemon.ipc)
        keys = Keys()
        cells: list[dict[str, Any]] = []
        lookup: dict[str, dict[str, Any]] = {}
        ping: dict[str, dict[str, Any]] = {}
        probe = fault_probe(daemon.proc.pid)
        for transport, address in (("ipc", daemon.ipc), ("tcp", daemon.tcp)):
            log(f"{transport}: {address}")
            c, lookup[transport], ping[transport] = bench_transport(
                transport, address, s, memcpy, keys, probe, log
            )
            cells += c
        with Client(daemon.ipc, timeout_s=CLIENT_TIMEOUT_S) as client:
            node_stats = client.stats()
        rss_after = rss_mb(daemon.proc.pid)
    finally:
        exit_code = daemon.stop()
    if exit_code != 0:
        raise RuntimeError(f"daemon exited with {exit_code!r} after SIGTERM (None = had to be killed)")
    return {
        "benchmark": "bench_node",
        "quick": quick,
        "settings": asdict(s),
        "machine": machine_info(numpy=np.__version__),
        "daemon": {
            "serving_line": next((ln for ln in daemon.lines if "serving on" in ln), ""),
            "ready_after_s": ready_s,
            "exit_code": exit_code,
            "rss_idle_mb": rss_start,
            "rss_after_first_ping_mb": rss_idle_after_ping,
            "rss_after_load_mb": rss_after,
            "memory_tier_entries_at_end": node_stats["tiers"]["memory"]["entries"],
            "memory_tier_used_bytes_at_end": node_stats["tiers"]["memory"]["used_bytes"],
        },
        "memcpy": {str(k): v for k, v in memcpy.items()},
        "cells": cells,
        "lookup": lookup,
        "ping": ping,
        "targets": evaluate_targets(cells, lookup, rss_start),
        "elapsed_s": time.monotonic() - started,
    }


# --------------------------------------------------------------------------- report


def _size_str(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def _cell_table(
    r: dict[str, Any], ops: Sequence[tuple[str, str]], text: Callable[[dict[str, Any]], str]
) -> str:
    """One table row per record size, one column per (transport, op) cell."""
    t = table("size", *(f"{transport} {name}" for transport in ("ipc", "tcp") for _, name in ops))
    for size in r["settings"]["sizes"]:
        row = [_size_str(size)]
        for transport in ("ipc", "tcp"):
            for op, _ in ops:
                c = find_cell(r["cells"], op, transport, size)
                row.append(text(c) if c else "-")
        t.add_row(*row)
    rendered: str = render(t)
    return rendered


def format_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [
        f"lmcache-node benchmark{' (quick)' if r['quick'] else ''}: {m['platform']}, {m['cpu_count']} CPUs, "
        f"Python {m['python']}, numpy {m['numpy']}, libzmq {m['libzmq']}",
        "",
        "memcpy baseline (np.copyto, median)",
    ]
    memcpy = table("size", "GB/s", "reps")
    for size, b in r["memcpy"].items():
        memcpy.add_row(_size_str(int(size)), f"{b['gbps']:.2f}", str(b["reps"]))
    out.append(render(memcpy))
    out.append("  (sizes that fit the CPU caches copy far faster, so their ratios below are harsh)")
    out += ["", "throughput: GB/s of payload (median per call), x = ratio to memcpy of the record size"]
    ops = (("put", "put"), ("get", "get"), ("get_batch", "get x8"))
    out.append(
        _cell_table(
            r, ops, lambda c: f"{c['gbps']:6.2f} ({c['ratio_to_memcpy']:5.3f}x) {c['median_s'] * 1e3:6.2f}ms"
        )
    )
    out += ["", "minor page faults per call (client / daemon), same cells"]
    out.append(
        _cell_table(
            r,
            ops,
            lambda c: f"{c['client_minor_faults_per_call']:.0f} / {c['daemon_minor_faults_per_call']:.0f}",
        )
    )
    out += ["", "latency, one request outstanding"]
    out.append(
        latency_table(
            *(
                (f"{what} {transport}", lk)
                for what, by_transport in (
                    (f"LOOKUP {LOOKUP_CHUNKS} keys (all present)", r["lookup"]),
                    ("PING (for reference)", r["ping"]),
                )
                for transport, lk in by_transport.items()
            )
        )
    )
    d = r["daemon"]
    out += [
        "",
        f"daemon RSS: idle {d['rss_idle_mb']:.1f} MB (after first ping {d['rss_after_first_ping_mb']:.1f} MB), "
        f"after load {d['rss_after_load_mb']:.1f} MB; exit code {d['exit_code']}",
        "",
        "targets",
    ]
    targets = table(Column("verdict"), Column("target"), "value", Column(""), "threshold")
    for t in r["targets"]:
        verdict = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        targets.add_row(verdict, t["name"], value, t["op"], str(t["threshold"]))
    out.append(render(targets))
    out.append(f"\nelapsed {r['elapsed_s']:.1f} s")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 MiB and 4 MiB only, fewer reps")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON results path (default: bench/results/bench_node.json)",
    )
    p.add_argument(
        "--cell-seconds",
        type=float,
        default=None,
        help="time budget per timed cell (default: 1.2, quick 0.3)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.cell_seconds is not None:
        s = Settings(**{**asdict(s), "cell_seconds": args.cell_seconds})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run(s, args.quick, log)
    print(format_report(result))
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
