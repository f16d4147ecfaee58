"""Start ``lmcache-node run`` as a subprocess and wait until it serves.

The one launcher behind the end-to-end tests, the benchmarks in bench/ and ``lmcache-node
demo``::

    with launch.start("--memory", "64MiB", "--disk", "0", ipc=True) as node:
        with node.client() as c:
            c.ping()

:func:`start` returns once the daemon has printed its serving line (``lmcache-node NAME vX
serving on ADDRESS ... (``), with the addresses it bound; a thread keeps reading its output
(stdout and stderr together) so the daemon never blocks on a full pipe, and keeps every line
for error messages. A daemon that exits or stays silent is killed and reported with its output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from lmcache_mesh.node import Client

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
OUTPUT_TAIL_LINES = 100
"""How much of a daemon's output an error message quotes."""

_SERVING = re.compile(r"lmcache-node (\S+) v\S+ serving on ((?:[a-z]+://\S+ ?)+)")


def command(*args: str) -> list[str]:
    """``lmcache-node ARGS`` run by this interpreter (no installed script needed)."""
    return [sys.executable, "-m", "lmcache_mesh.engines.cli", *args]


def child_env(env: Mapping[str, str] | None = None, isolate: bool = False) -> dict[str, str]:
    """The environment of a child process: ours, one OpenMP thread, unbuffered output, then ``env``.

    ``isolate`` drops our ``LMCACHE_MESH_*`` variables, so that only the flags configure the
    child (a config file or join address from the caller's shell must not leak into a
    benchmark's or the demo's nodes)."""
    base = {k: v for k, v in os.environ.items() if not (isolate and k.startswith("LMCACHE_MESH_"))}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


class Daemon:
    """A running ``lmcache-node run`` process (see :func:`start`); a context manager that stops it."""

    def __init__(
        self, proc: subprocess.Popen[str], data_dir: Path, label: str, private_dir: Path | None
    ) -> None:
        self.proc = proc
        self.data_dir = data_dir
        self.name = label
        """The node's name, as it printed it (before that: what the caller called it)."""
        self.addresses: tuple[str, ...] = ()
        """What it listens on, from its serving line, in ``--listen`` order."""
        self.lines: list[str] = []
        """Everything it printed so far, one line each (no newlines)."""
        self._private_dir = private_dir
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{label}-output", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"<Daemon {self.name} {' '.join(self.addresses) or '(not serving)'} {state}>"

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def tcp(self) -> str:
        """Its first ``tcp://`` address (its first address of any kind if it has none)."""
        return next((a for a in self.addresses if a.startswith("tcp://")), self.addresses[0])

    @property
    def ipc(self) -> str | None:
        """Its first ``ipc://`` address, if it has one."""
        return next((a for a in self.addresses if a.startswith("ipc://")), None)

    @property
    def address(self) -> str:
        """Where to reach it from this machine: its ipc:// address if it has one (no CurveZMQ keys
        needed, and it also reaches a daemon in another network namespace), else :attr:`tcp`."""
        return self.ipc or self.tcp

    @property
    def output(self) -> str:
        """Everything it printed so far."""
        return "".join(line + "\n" for line in self.lines)

    def client(self, timeout_s: float = 10.0) -> Client:
        """A client of :attr:`address` (close it, or use it as a context manager)."""
        return Client(self.address, timeout_s=timeout_s)

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        with self.client(timeout_s) as c:
            stats: dict[str, Any] = c.stats()
        return stats

    def alive_members(self) -> int:
        """How many members (itself included) this node sees alive."""
        return sum(m["state"] == "alive" for m in self.stats()["members"])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Send ``sig`` (if it still runs) and wait; SIGKILL it if it has not exited in ``timeout_s``.

        Returns its exit code, or None if it had to be killed. Calling it again is harmless."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code: int | None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            code = None
        self._reader.join(timeout=10)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        return code

    def kill(self) -> None:
        """End it at once (SIGKILL) and reap it."""
        self.stop(signal.SIGKILL)

    def tail(self, lines: int = OUTPUT_TAIL_LINES) -> str:
        """The last ``lines`` lines of its output, for an error message."""
        return "\n".join(self.lines[-lines:])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = None if self._serving.is_set() else _SERVING.search(line)
            if m is not None:
                self.name, self.addresses = m.group(1), tuple(m.group(2).split())
                self._serving.set()
        self._serving.set()  # it exited (or closed its output) without serving

    def _wait_serving(self, timeout_s: float) -> bool:
        return self._serving.wait(timeout_s) and bool(self.addresses)


def start(
    *args: str,
    data_dir: Path | None = None,
    listen: Sequence[str] = ("tcp://127.0.0.1:0",),
    ipc: bool = False,
    name: str | None = None,
    join: str | None = None,
    env: Mapping[str, str] | None = None,
    isolate: bool = False,
    prefix: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
    ping: bool = False,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> Daemon:
    """Run ``lmcache-node run --listen L ... --data-dir D [--name N] [--join J] ARGS`` and wait
    until it prints its serving line.

    ``data_dir``: None for a fresh temporary one, removed by :meth:`Daemon.stop`. ``ipc``: also
    listen on an ``ipc://`` socket in a short temporary directory (socket paths must stay
    under 108 bytes), removed by :meth:`Daemon.stop`. ``env`` and ``isolate``: see
    :func:`child_env`. ``prefix``: a command that runs the daemon, e.g. ``ip netns exec NS``.
    ``ping``: also wait for its answer to a PING. Raises RuntimeError, with the daemon's output,
    if it does not get that far in ``timeout_s`` (the daemon is killed first)."""
    private_dir = None
    if data_dir is None or ipc:
        private_dir = Path(tempfile.mkdtemp(prefix="lmc-", dir="/tmp"))
        if data_dir is None:
            data_dir = private_dir / "data"
    addresses = [*listen, *([f"ipc://{private_dir}/n.sock"] if ipc else [])]
    argv = [
        *prefix,
        *command("run", *(f for a in addresses for f in ("--listen", a)), "--data-dir", str(data_dir)),
        *(["--name", name] if name else []),
        *(["--join", join] if join else []),
        *args,
    ]
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(env, isolate),
            preexec_fn=preexec_fn,
        )
    except BaseException:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
        raise
    daemon = Daemon(proc, data_dir, name or "lmcache-node", private_dir)
    try:
        serving = daemon._wait_serving(timeout_s)
        if serving and ping:
            with daemon.client() as c:
                c.ping()
    except BaseException:
        daemon.kill()  # never leave a daemon nobody holds
        raise
    if not serving:
        daemon.kill()  # and its output is complete once it is reaped
        killed = proc.returncode == -signal.SIGKILL
        how = f"no serving line in {timeout_s:g} s" if killed else f"exited with {proc.returncode}"
        raise RuntimeError(f"{daemon.name} did not start ({how}):\n{daemon.tail()}")
    return daemon


def wait_for_mesh(daemons: Sequence[Daemon], timeout_s: float, step_s: float = 0.1) -> float | None:
    """Seconds until every one of ``daemons`` sees all of them alive, or None after ``timeout_s``."""
    start_at = time.monotonic()
    while not all(d.alive_members() == len(daemons) for d in daemons):
        if time.monotonic() - start_at > timeout_s:
            return None
        time.sleep(step_s)
    return time.monotonic() - start_at
