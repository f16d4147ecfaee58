"""The owner-side holder index."""

from __future__ import annotations

import pytest

from lmcache_mesh.mesh.index import HolderIndex

K = [bytes([i]) * 16 for i in range(10)]


def test_add_remove_and_query() -> None:
    idx = HolderIndex()
    idx.add("a", K[:3])
    idx.add("b", K[2:5])
    assert idx.holders(K[2]) == ["a", "b"] and idx.holders(K[0]) == ["a"] and idx.holders(K[9]) == []
    idx.remove("a", K[:3])
    assert idx.holders(K[2]) == ["b"] and idx.holders(K[0]) == [] and len(idx) == 3
    idx.remove("zzz", K)  # unknown holder: nothing happens
    assert len(idx) == 3


def test_forgotten_holders_vanish_and_ids_are_compacted() -> None:
    idx = HolderIndex()
    for n in range(30):
        idx.add(f"n{n}", K[:2])
    for n in range(25):
        idx.forget(f"n{n}")
    assert idx.holders(K[0]) == [f"n{n}" for n in range(25, 30)]
    assert len(idx._names) < 30  # compacted
    idx.add("new", K[:1])
    assert idx.holders(K[0])[-1] == "new" and "new" not in idx.holders(K[1])


def test_bounded_first_announced_go_first() -> None:
    idx = HolderIndex(max_keys=5)
    idx.add("a", K[:5])
    idx.add("b", K[0:1])  # another holder of an existing key: no new entry
    idx.add("b", K[5:7])
    assert len(idx) == 5 and idx.dropped == 2
    assert idx.holders(K[0]) == [] and idx.holders(K[1]) == []
    assert idx.holders(K[2]) == ["a"] and idx.holders(K[6]) == ["b"]


def test_bad_bound() -> None:
    with pytest.raises(ValueError):
        HolderIndex(0)
