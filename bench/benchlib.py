"""Helpers shared by the benchmarks in this folder: timing, percentiles, machine info, mesh daemons."""

from __future__ import annotations

import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import zmq

from lmcache_mesh.engines.cli import chart, launch
from lmcache_mesh.engines.cli.launch import Daemon
from lmcache_mesh.engines.cli.tables import Column, render, table
from lmcache_mesh.node import VERSION

T = TypeVar("T")


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


def start_mesh_pair(i: int, *extra: str, memory: str = "2GiB") -> list[Daemon]:
    """Nodes ``i`` and ``i + 1`` (see :func:`start_mesh_daemon`), the second joined to the
    first; returns once each sees the other."""
    nodes = [start_mesh_daemon(i, None, *extra, memory=memory)]
    nodes.append(start_mesh_daemon(i + 1, nodes[0].tcp, *extra, memory=memory))
    if wait_for(lambda: all(d.alive_members() == 2 for d in nodes), 30) is None:
        for d in nodes:
            d.stop()
        raise RuntimeError("the two nodes did not see each other in 30 s")
    return nodes


def wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(step_s)
    return None


# --------------------------------------------------------------------------- servers side by side


@dataclass
class ServerProcess:
    """One OpenAI-compatible server process of a system under test: started (its output in
    ``workdir/server.log``), waited for until ``/v1/models`` answers, stopped."""

    label: str
    command: list[str]
    workdir: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    start_timeout_s: float = 180.0
    proc: subprocess.Popen[bytes] | None = None
    model_id: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "server.log"
        with log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(self.command, cwd=self.workdir, stdout=log_file, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})  # fmt: skip

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.label} exited:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2):
                    return True
            except OSError:
                return False

        if wait_for(up, self.start_timeout_s, step_s=0.5) is None:
            self.stop()
            raise RuntimeError(f"{self.label} did not start in {self.start_timeout_s:.0f} s")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def ask(server: ServerProcess, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, str]:
    """Stream one greedy chat completion with the official openai client; (seconds to the
    first chunk that carries text, the whole answer)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=600)
    server.model_id = server.model_id or client.models.list().data[0].id
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    stream = client.chat.completions.create(
        model=server.model_id,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
    )
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            first = first if first is not None else time.perf_counter() - started
            text.append(piece)
    return (first if first is not None else time.perf_counter() - started), "".join(text)


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` starting at ``turn`` (mod their count): each workload starts with another system."""
    k = turn % len(items)
    return [*items[k:], *items[:k]]


def summarise(
    samples: dict[str, dict[str, list[float]]], base: str, metric: str = "median"
) -> dict[str, Any]:
    """``{system: {workload: [seconds]}}`` -> ``{workload: {system: cell}}`` with the median,
    mean, p90, the first request ("cold") in ms and ``metric``'s ratio to ``base``'s."""
    cells: dict[str, Any] = {}
    for system, per in samples.items():
        for workload, took in per.items():
            ms = sorted(1e3 * t for t in took)
            cells.setdefault(workload, {})[system] = {
                "median_ms": statistics.median(ms),
                "mean_ms": statistics.fmean(ms),
                "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
                "cold_ms": 1e3 * took[0],
                "n": len(took),
                "samples_ms": [1e3 * t for t in took],
            }
    for per in cells.values():
        for cell in per.values():
            cell["ratio"] = cell[f"{metric}_ms"] / per[base][f"{metric}_ms"]
            cell["ratio_of"] = metric
    return cells


@dataclass(frozen=True)
class Comparison:
    """How systems and workloads are named in a side-by-side benchmark's table and chart."""

    systems: dict[str, str]  # system -> label, in the order shown
    workloads: dict[str, str]
    colours: dict[str, tuple[int, int, int]]
    base: str
    title: str
    metric: str = "median"
    """what the ratios compare: "median" or "mean" TTFT"""

    def table(self, cells: dict[str, Any], systems: Sequence[str]) -> str:
        t = table(Column("workload"), Column("server"), "median ms", "mean ms", "p90 ms", "first ms",
                  f"{self.metric} / {self.base}", title=self.title)  # fmt: skip
        for workload, name in self.workloads.items():
            for system in systems:
                if system in cells.get(workload, {}):
                    c = cells[workload][system]
                    t.add_row(name, self.systems[system], f"{c['median_ms']:.0f}", f"{c['mean_ms']:.0f}",
                              f"{c['p90_ms']:.0f}", f"{c['cold_ms']:.0f}", f"{c['ratio']:.2f}")  # fmt: skip
        text: str = render(t)
        return text

    def chart(self, cells: dict[str, Any], systems: Sequence[str], path: Path) -> None:
        if not chart.available():
            print(chart.MISSING)
            return
        values, colours, labels = [], [], []
        for workload, name in self.workloads.items():
            shown = [s for s in systems if s in cells.get(workload, {})]
            for system in shown:
                values.append(cells[workload][system]["ratio"])
                colours.append(self.colours[system])
                # each group's name under its middle bar, wrapped to about the group's width
                labels.append(textwrap.fill(name, 4 * len(shown)) if system == shown[len(shown) // 2] else "")
        chart.write_bar_chart(
            path, values, colours, labels=labels, width=max(1000, 28 * len(values)), height=460,
            title=f"{self.metric.capitalize()} TTFT, × {self.systems[self.base]} (lower is better)",
            y_title=f"{self.metric} TTFT / {self.base}",
            legend=[(self.systems[s], self.colours[s]) for s in systems],
            value_labels=[f"{v:.2f}" for v in values],
        )  # fmt: skip
        print(f"chart written to {path}")
