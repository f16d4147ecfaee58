"""MeshStore: the engines' best-effort view of a node (real daemon, real dead address)."""

from __future__ import annotations

import time

import pytest

from lmcache_mesh.engines.store import MeshStore, StoreConfig
from lmcache_mesh.node import ChunkRecord, NodeConfig
from lmcache_mesh.node.config import StorageSettings
from lmcache_mesh.node.errors import Unavailable

from ..helpers import Daemon, free_port, payload


def records(ns: bytes, keys: list[bytes], n: int) -> list[ChunkRecord]:
    return [ChunkRecord.build(k, payload(i, 1024), ns) for i, k in enumerate(keys[:n])]


def test_lookup_fetch_and_put_through_a_daemon(daemon: Daemon, ns: bytes, keys: list[bytes]) -> None:
    store = MeshStore(StoreConfig(node=daemon.tcp))
    try:
        assert store.lookup(keys[:4]) == 0
        store.put(records(ns, keys, 3))
        assert store.lookup(keys[:4]) == 3
        got = store.fetch(keys[:4])
        assert [bytes(r.payload) if r else None for r in got] == [payload(i, 1024) for i in range(3)] + [None]
    finally:
        store.close()


def test_a_dead_node_costs_one_timeout_then_instant_misses(ns: bytes, keys: list[bytes]) -> None:
    store = MeshStore(
        StoreConfig(node=f"tcp://127.0.0.1:{free_port()}", lookup_timeout_s=0.2, retry_after_s=30)
    )
    try:
        started = time.monotonic()
        assert store.lookup(keys[:4]) == 0
        assert 0.15 < time.monotonic() - started < 2.0
        started = time.monotonic()
        for _ in range(100):
            assert store.lookup(keys[:4]) == 0
            assert store.fetch(keys[:2]) == [None, None]
        assert time.monotonic() - started < 0.5
        assert store.stats.failures == 1 and store.stats.skipped_while_down == 200
        assert "DeadlineExceeded" in store.stats.last_error
        started = time.monotonic()
        with pytest.raises(Unavailable):  # saves fail fast too, so their queue drains
            store.put(records(ns, keys, 1))
        assert time.monotonic() - started < 0.1
    finally:
        store.close()


def test_an_embedded_node_whose_data_dir_is_taken_falls_back_to_memory(tmp_path, ns, keys) -> None:  # type: ignore[no-untyped-def]
    config = NodeConfig(
        storage=StorageSettings(data_dir=str(tmp_path), memory_bytes=1 << 20, disk_bytes=1 << 20)
    )
    first = MeshStore(StoreConfig(node_config=config))
    second = MeshStore(StoreConfig(node_config=config))
    try:
        assert first.embedded_node is not None and first.embedded_node.store.disk is not None
        assert second.embedded_node is not None and second.embedded_node.store.disk is None
        second.put(records(ns, keys, 2))
        assert second.lookup(keys[:2]) == 2
    finally:
        first.close()
        second.close()
