"""Helpers shared by the benchmarks in this folder: timing, percentiles, machine info."""

from __future__ import annotations

import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import zmq

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
