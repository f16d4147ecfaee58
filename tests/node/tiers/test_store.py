"""Memory over disk: write-back on eviction, promotion on a disk hit, persistence on close."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_mesh.node import ChunkRecord, NoSpace
from lmcache_mesh.node.tiers import DiskTier, MemoryTier, TieredStore


def rec(i: int, size: int = 100) -> ChunkRecord:
    return ChunkRecord.build(i.to_bytes(16, "big"), bytes([i % 251]) * size, b"n" * 16)


def make(tmp_path: Path, memory: int = 500, disk: int = 10_000) -> TieredStore:
    d = DiskTier(tmp_path, disk)
    d.open()
    return TieredStore(MemoryTier(memory), d)


def test_memory_evictions_are_written_back_and_served_from_disk(tmp_path: Path) -> None:
    store = make(tmp_path)
    for i in range(20):
        store.put(rec(i))
    assert store.disk is not None and store.disk.flush(10)
    assert store.lookup([rec(i).key for i in range(20)]) == 20
    got = store.get_many([rec(0).key, rec(19).key, b"z" * 16])
    assert [None if r is None else bytes(r.payload) for r in got] == [
        bytes(rec(0).payload),
        bytes(rec(19).payload),
        None,
    ]
    c = store.counters
    assert (c.hits_disk, c.hits_memory, c.misses, c.promotions) == (1, 1, 1, 1)
    assert rec(0).key in store.memory  # promoted
    store.close()


def test_promoted_entries_are_not_written_twice(tmp_path: Path) -> None:
    store = make(tmp_path)
    for i in range(10):
        store.put(rec(i))
    assert store.disk is not None and store.disk.flush(10)
    writes = store.disk.counters.writes
    store.get_many([rec(0).key])  # promote
    for i in range(10, 20):
        store.put(rec(i))  # evicts rec(0) again
    store.disk.flush(10)
    assert store.disk.counters.writes == writes + 10  # only the new ones
    store.close()


def test_close_writes_memory_back_so_a_restart_finds_everything(tmp_path: Path) -> None:
    store = make(tmp_path)
    for i in range(4):
        store.put(rec(i))
    assert store.close() == 4
    again = make(tmp_path)
    assert again.lookup([rec(i).key for i in range(4)]) == 4
    again.close(persist=False)


def test_lookup_counts_leading_keys_only(tmp_path: Path) -> None:
    store = make(tmp_path)
    for i in (0, 1, 3):
        store.put(rec(i))
    assert store.lookup([rec(i).key for i in range(4)]) == 2
    assert store.lookup([rec(2).key, rec(3).key]) == 0
    before = store.counters.hits_memory
    store.lookup([rec(0).key])
    assert store.counters.hits_memory == before  # no side effects
    store.close()


def test_too_big_for_memory_goes_to_disk(tmp_path: Path) -> None:
    store = make(tmp_path, memory=100)
    store.put(rec(1, 1000))
    assert store.disk is not None and store.disk.flush(10)
    got = store.get_many([rec(1, 1000).key])[0]
    assert got is not None and got.nbytes == 1000
    store.close()


def test_memory_only_store_raises_no_space_when_pinned_full() -> None:
    store = TieredStore(MemoryTier(200))
    store.put(rec(1))
    store.put(rec(2))
    assert store.pin([rec(1).key, rec(2).key, rec(3).key]) == 2
    with pytest.raises(NoSpace):
        store.put(rec(3))
    store.unpin([rec(1).key, rec(2).key])
    store.put(rec(3))


def test_delete_removes_from_every_tier(tmp_path: Path) -> None:
    store = make(tmp_path)
    for i in range(10):
        store.put(rec(i))
    assert store.disk is not None and store.disk.flush(10)
    assert store.delete([rec(0).key, rec(9).key, b"q" * 16]) == 2
    assert store.lookup([rec(0).key]) == 0 and store.lookup([rec(9).key]) == 0
    store.close()
    again = make(tmp_path)
    assert again.lookup([rec(0).key]) == 0
    again.close(persist=False)
