"""The memory tier: byte budget, S3-FIFO eviction, pinning."""

from __future__ import annotations

import pytest

from lmcache_mesh.node import ChunkRecord, NoSpace
from lmcache_mesh.node.tiers import MemoryTier


def rec(i: int, size: int = 100) -> ChunkRecord:
    return ChunkRecord.build(i.to_bytes(16, "big"), bytes([i % 256]) * size, b"n" * 16)


def test_stays_within_its_byte_budget() -> None:
    tier = MemoryTier(1000)
    evicted = []
    for i in range(50):
        evicted += tier.put(rec(i))
        assert tier.used_bytes <= 1000
    assert len(tier) == 10
    assert len(evicted) == 40 and tier.evictions == 40
    assert repr(tier).startswith("<MemoryTier 10 entries 1000/1000 B")


def test_get_returns_the_record() -> None:
    tier = MemoryTier(1000)
    tier.put(rec(1))
    got = tier.get((1).to_bytes(16, "big"))
    assert got is not None and bytes(got.payload) == bytes([1]) * 100
    assert tier.get(b"x" * 16) is None


def test_frequently_read_entries_survive_a_scan_of_one_hit_wonders() -> None:
    """S3-FIFO: a scan of new keys must not flush the hot working set."""
    tier = MemoryTier(2000)  # 20 records
    hot = [rec(i) for i in range(10)]
    for r in hot:
        tier.put(r)
    for _ in range(2):
        for r in hot:
            assert tier.get(r.key) is not None
    for i in range(100, 300):  # a long scan of keys seen once
        tier.put(rec(i))
    assert all(r.key in tier for r in hot)


def test_lru_like_recency_for_cold_entries() -> None:
    tier = MemoryTier(500)
    for i in range(5):
        tier.put(rec(i))
    tier.put(rec(5))
    assert rec(0).key not in tier and rec(5).key in tier


def test_ghost_hit_goes_to_main() -> None:
    tier = MemoryTier(1000)
    for i in range(11):
        tier.put(rec(i))  # evicts 0 into the ghost queue
    assert rec(0).key not in tier
    tier.put(rec(0))
    assert tier._entries[rec(0).key].in_main  # a ghost hit skips probation
    for i in range(20, 40):  # more newcomers than the tier holds: they leave through the small queue
        tier.put(rec(i))
    assert rec(0).key in tier


def test_pinned_entries_are_never_evicted() -> None:
    tier = MemoryTier(500)
    for i in range(5):
        tier.put(rec(i))
    assert tier.pin(rec(0).key) and tier.pin(rec(1).key)
    for i in range(10, 40):
        tier.put(rec(i))
    assert rec(0).key in tier and rec(1).key in tier
    tier.unpin(rec(0).key)
    tier.unpin(rec(1).key)
    for i in range(40, 60):  # hot newcomers fill main, which then evicts the unpinned pair
        tier.put(rec(i))
        tier.get(rec(i).key)
    assert rec(0).key not in tier and rec(1).key not in tier


def test_no_space_when_everything_is_pinned_changes_nothing() -> None:
    tier = MemoryTier(300)
    for i in range(3):
        tier.put(rec(i))
        tier.pin(rec(i).key)
    before = (len(tier), tier.used_bytes)
    with pytest.raises(NoSpace, match="pinned 300"):
        tier.put(rec(9))
    assert (len(tier), tier.used_bytes) == before


def test_record_larger_than_budget_is_refused() -> None:
    with pytest.raises(NoSpace):
        MemoryTier(50).put(rec(1, 100))


def test_remove_and_replace() -> None:
    tier = MemoryTier(1000)
    tier.put(rec(1))
    tier.pin(rec(1).key)
    bigger = ChunkRecord.build(rec(1).key, b"z" * 300, b"n" * 16)
    tier.put(bigger)
    assert tier.used_bytes == 300 and tier.pinned_bytes() == 300
    assert tier.remove(rec(1).key) is not None
    assert tier.used_bytes == 0 and tier.pinned_bytes() == 0 and len(tier) == 0


def test_put_returns_what_it_evicted() -> None:
    tier = MemoryTier(200)
    tier.put(rec(1))
    tier.put(rec(2))
    evicted = tier.put(rec(3)) + tier.put(rec(4))
    assert sorted(r.key for r in evicted) == [rec(1).key, rec(2).key]


def test_a_refused_replacement_keeps_the_old_version() -> None:
    tier = MemoryTier(300)
    tier.put(rec(1))
    tier.pin(rec(1).key)
    tier.put(rec(2))
    tier.pin(rec(2).key)
    with pytest.raises(NoSpace):
        tier.put(ChunkRecord.build(rec(2).key, b"z" * 250, b"n" * 16))  # 100 pinned elsewhere + 250 > 300
    got = tier.get(rec(2).key)
    assert got is not None and bytes(got.payload) == bytes(rec(2).payload) and tier.used_bytes == 200
