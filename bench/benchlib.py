"""Helpers shared by the benchmarks in this folder: timing, percentiles, machine info."""

from __future__ import annotations

import gc
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from lmcache_mesh.node import VERSION, Client

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


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


@dataclass
class MeshDaemon:
    index: int
    proc: subprocess.Popen[str]
    tcp: str
    workdir: Path
    lines: list[str] = field(default_factory=list)

    def client(self, timeout_s: float = 10.0) -> Client:
        return Client(self.tcp, timeout_s=timeout_s)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def daemon_env() -> dict[str, str]:
    # No LMCACHE_MESH_* settings from the caller's environment: the flags below are the config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_MESH_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(proc: subprocess.Popen[str], lines: list[str], started: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        m = re.search(r"serving on (tcp://\S+)", line)
        if m:
            started.put(m.group(1))
    started.put(None)


def start_mesh_daemon(i: int, join: str | None, *extra: str, memory: str = "256MiB") -> MeshDaemon:
    """``lmcache-node run`` as node{i} on 127.0.0.{i}; returns once it prints its serving line."""
    host = f"127.0.0.{i}"
    workdir = Path(tempfile.mkdtemp(prefix="lmbm-", dir="/tmp"))
    cmd = [
        sys.executable, "-m", "lmcache_mesh.node.cli", "run",
        "--listen", f"tcp://{host}:{free_port(host)}",
        "--data-dir", str(workdir / "data"),
        "--name", f"node{i}", "--zone", f"z{i % 2}",
        "--memory", memory, "--disk", "0", "--mesh-profile", "local",
        *(["--join", join] if join else []), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=daemon_env()
    )
    daemon = MeshDaemon(i, proc, "", workdir)
    started: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc, daemon.lines, started), daemon=True).start()
    try:
        address = started.get(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        address = None
    if address is None:
        stop_mesh_daemon(daemon)
        raise RuntimeError(f"node{i} did not start:\n" + "\n".join(daemon.lines[-40:]))
    daemon.tcp = address
    return daemon


def stop_process(proc: subprocess.Popen[str], workdir: Path) -> int | None:
    """SIGTERM, wait; SIGKILL if it does not exit in time; remove ``workdir``.

    Returns the exit code (None if it had to be killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        code = None
    shutil.rmtree(workdir, ignore_errors=True)
    return code


def stop_mesh_daemon(daemon: MeshDaemon) -> int | None:
    return stop_process(daemon.proc, daemon.workdir)


def wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(step_s)
    return None
