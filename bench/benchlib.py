"""Helpers shared by the benchmarks in this folder: timing, percentiles, machine info, mesh daemons."""

from __future__ import annotations

import gc
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

from lmcache_mesh.engines.cli import launch
from lmcache_mesh.engines.cli.launch import Daemon
from lmcache_mesh.engines.cli.tables import Column, render, table
from lmcache_mesh.node import VERSION


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    idx = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[idx]


@contextmanager
def no_gc() -> Iterator[None]:
    """Collect once, then keep the garbage collector out of the timed region."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def latency(call: Callable[[], object], reps: int, warmup: int = 20) -> dict[str, Any]:
    """p50/p90/p99/max in ms of ``reps`` sequential calls (one outstanding)."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    with no_gc():
        for _ in range(reps):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
    ms = sorted(x * 1000.0 for x in samples)
    return {
        "reps": reps,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1],
    }


def latency_table(*rows: tuple[str, dict[str, Any]]) -> str:
    """Summaries from :func:`latency` as a table, one row per ``(what was called, summary)``."""
    t = table(Column("call"), "p50 ms", "p90 ms", "p99 ms", "max ms", "calls")
    for name, lk in rows:
        t.add_row(
            name,
            f"{lk['p50_ms']:.3f}",
            f"{lk['p90_ms']:.3f}",
            f"{lk['p99_ms']:.3f}",
            f"{lk['max_ms']:.3f}",
            str(lk["reps"]),
        )
    text: str = render(t)
    return text


def write_results(result: dict[str, Any], out: Path) -> None:
    """Write a benchmark's JSON results to ``out`` (creating its folder) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}")


def machine_info(**extra: Any) -> dict[str, Any]:
    """What the figures were measured on (shared, noisy machines: read ratios, not absolutes)."""
    return {
        "cpu_count": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "lmcache_node": VERSION,
        **extra,
    }


# --------------------------------------------------------------------------- real daemons


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_mesh_daemon(i: int, join: str | None, *extra: str, memory: str = "256MiB") -> Daemon:
    """``lmcache-node run`` as node{i} on 127.0.0.{i}; returns once it prints its serving line.

    Its data directory is temporary (removed by ``Daemon.stop``) and only these flags configure
    it: no LMCACHE_MESH_* settings from the caller's environment."""
    host = f"127.0.0.{i}"
    return launch.start(
        "--zone", f"z{i % 2}", "--memory", memory, "--disk", "0", "--mesh-profile", "local", *extra,
        listen=[f"tcp://{host}:{free_port(host)}"], name=f"node{i}", join=join, isolate=True,
    )  # fmt: skip


def wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(step_s)
    return None
