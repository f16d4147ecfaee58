"""Test helpers: real daemon subprocesses, deterministic payloads, engine imports.

A missing engine (llama-cpp-python, vLLM, torch) fails the tests that need it, so CI can
never pass by skipping them; LMCACHE_MESH_SKIP_ENGINES=1 skips them instead on a box
without the engines.
"""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from lmcache_mesh.engines.cli import launch
from lmcache_mesh.engines.cli.launch import Daemon
from lmcache_mesh.engines.cli.launch import command as node_command

__all__ = [
    "Daemon",
    "free_port",
    "kill_all",
    "node_command",
    "payload",
    "require",
    "short_tmpdir",
    "start_daemon",
]


def kill_all(daemons: Sequence[Daemon]) -> None:
    """End test daemons at once (SIGKILL), reaping each and its output reader."""
    for d in daemons:
        d.kill()


def short_tmpdir() -> Path:
    # ipc:// paths must stay under 107 bytes, and pytest's tmp_path can be long.
    return Path(tempfile.mkdtemp(prefix="lmc-", dir="/tmp"))


def start_daemon(
    data_dir: Path,
    *extra: str,
    ipc: bool = True,
    tcp: str = "tcp://127.0.0.1:0",
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    prefix: Sequence[str] = (),
) -> Daemon:
    """A daemon on ``tcp`` (and an ipc:// socket), answering PING. ``prefix``: a command that
    runs the daemon, e.g. ``ip netns exec NS``."""
    return launch.start(
        *extra,
        data_dir=data_dir,
        listen=[tcp],
        ipc=ipc,
        env=env,
        prefix=prefix,
        preexec_fn=preexec_fn,
        ping=True,
    )


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
