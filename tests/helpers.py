"""Test helpers: real daemon subprocesses and deterministic payloads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmcache_mesh.node import Client

STARTUP_TIMEOUT_S = 30.0


@dataclass
class Daemon:
    """A real ``lmcache-node run`` process."""

    proc: subprocess.Popen[str]
    data_dir: Path
    tcp: str
    ipc: str | None
    lines: list[str] = field(default_factory=list)

    def client(self, timeout_s: float = 10.0) -> Client:
        return Client(self.tcp, timeout_s=timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> str:
        """Signal the daemon, wait for it, and return the rest of its stdout."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=timeout_s)
        return out


def short_tmpdir() -> Path:
    # ipc:// paths must stay under 107 bytes, and pytest's tmp_path can be long.
    return Path(tempfile.mkdtemp(prefix="lmc-", dir="/tmp"))


def node_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmcache_mesh.node.cli", *args]


def start_daemon(
    data_dir: Path,
    *extra: str,
    ipc: bool = True,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Daemon:
    sock_dir = short_tmpdir()
    listen = ["--listen", "tcp://127.0.0.1:0"]
    if ipc:
        listen += ["--listen", f"ipc://{sock_dir}/n.sock"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(
        node_command("run", *listen, "--data-dir", str(data_dir), *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        preexec_fn=preexec_fn,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"serving on (\S+)(?: (\S+))?", line)
        if m:
            daemon = Daemon(proc, data_dir, m.group(1), m.group(2), lines)
            with daemon.client() as c:
                c.ping()
            return daemon
    proc.kill()
    rest = proc.communicate(timeout=10)[0]
    raise RuntimeError("daemon did not start:\n" + "".join(lines) + (rest or ""))


def payload(i: int, size: int = 4096) -> bytes:
    """Deterministic, distinct payload bytes for chunk ``i``."""
    block = (i.to_bytes(4, "little") * 1024)[:1024]
    reps = size // len(block) + 1
    return bytes((block * reps)[:size])
