"""Test helpers: real daemon subprocesses, deterministic payloads, engine imports.

A missing engine (llama-cpp-python, vLLM, torch) fails the tests that need it, so CI can
never pass by skipping them; LMCACHE_MESH_SKIP_ENGINES=1 skips them instead on a box
without the engines.
"""

from __future__ import annotations

import importlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmcache_mesh.node import Client

STARTUP_TIMEOUT_S = 30.0


@dataclass
class Daemon:
    """A real ``lmcache-node run`` process; a thread keeps reading its output so it never blocks."""

    proc: subprocess.Popen[str]
    data_dir: Path
    tcp: str
    ipc: str | None
    lines: list[str]
    reader: threading.Thread

    def client(self, timeout_s: float = 10.0) -> Client:
        # ipc:// when there is one: it also reaches a daemon in another network namespace
        return Client(self.ipc or self.tcp, timeout_s=timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> str:
        """Signal the daemon, wait for it, and return everything it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout_s)
        self.reader.join(timeout=timeout_s)
        return "".join(self.lines)


def kill_all(daemons: Sequence[Daemon]) -> None:
    """End test daemons at once (SIGKILL), reaping each and its output reader."""
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.kill()
        d.stop()


def short_tmpdir() -> Path:
    # ipc:// paths must stay under 107 bytes, and pytest's tmp_path can be long.
    return Path(tempfile.mkdtemp(prefix="lmc-", dir="/tmp"))


def node_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmcache_mesh.node.cli", *args]


def start_daemon(
    data_dir: Path,
    *extra: str,
    ipc: bool = True,
    tcp: str = "tcp://127.0.0.1:0",
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    prefix: Sequence[str] = (),
) -> Daemon:
    """``prefix``: a command that runs the daemon, e.g. ``ip netns exec NS``."""
    sock_dir = short_tmpdir()
    listen = ["--listen", tcp]
    if ipc:
        listen += ["--listen", f"ipc://{sock_dir}/n.sock"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(
        [*prefix, *node_command("run", *listen, "--data-dir", str(data_dir), *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        preexec_fn=preexec_fn,
    )
    lines: list[str] = []
    started: queue.Queue[re.Match[str] | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving on (\S+)(?: (ipc://\S+))?", line)
            if m:
                started.put(m)
        started.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        m = started.get(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        m = None
    if m is None:
        proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)
        raise RuntimeError("daemon did not start:\n" + "".join(lines))
    daemon = Daemon(proc, data_dir, m.group(1), m.group(2), lines, reader)
    try:
        with daemon.client() as c:
            c.ping()
    except BaseException:
        kill_all([daemon])  # never leave a daemon nobody holds
        raise
    return daemon


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def payload(i: int, size: int = 4096) -> bytes:
    """Deterministic, distinct payload bytes for chunk ``i``."""
    block = (i.to_bytes(4, "little") * 1024)[:1024]
    reps = size // len(block) + 1
    return bytes((block * reps)[:size])


def require(module: str) -> Any:
    if os.environ.get("LMCACHE_MESH_SKIP_ENGINES") == "1":
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"{module} is not installed ({exc}); install the test extras as README says, "
            "or set LMCACHE_MESH_SKIP_ENGINES=1 to skip the engine tests",
            pytrace=False,
        )
