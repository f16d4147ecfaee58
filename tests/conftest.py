"""Shared fixtures: real daemon subprocesses, namespaces, keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcache_mesh.node import chunk_keys, namespace_id

from .helpers import Daemon, kill_all, start_daemon

DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    started: list[Daemon] = []

    def make(*extra: str, data_dir: Path | None = None, **kw: Any) -> Daemon:
        d = start_daemon(data_dir or tmp_path / f"data{len(started)}", *extra, **kw)
        started.append(d)
        return d

    yield make
    kill_all(started)


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> Daemon:
    return daemon_factory("--memory", "64MiB", "--disk", "256MiB")


@pytest.fixture
def ns() -> bytes:
    return namespace_id(b"test-model", {"engine": "test", "dtype": "f16", "n_layers": 2}, chunk_tokens=16)


@pytest.fixture
def keys(ns: bytes) -> list[bytes]:
    return chunk_keys(ns, list(range(16 * 32)), chunk_tokens=16)
