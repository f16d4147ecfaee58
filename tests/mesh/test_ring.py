"""The consistent-hash ring: balance, weights, zones, minimal movement."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from lmcache_mesh.mesh.ring import HashRing, RingMember

KEYS = [hashlib.blake2b(i.to_bytes(4, "little"), digest_size=16).digest() for i in range(20_000)]


def ring(n: int, vnodes: int = 128, zones: int = 1, weights: dict[str, float] | None = None) -> HashRing:
    w = weights or {}
    return HashRing([RingMember(f"n{i}", f"z{i % zones}", w.get(f"n{i}", 1.0)) for i in range(n)], vnodes)


def test_owners_are_distinct_and_deterministic() -> None:
    a, b = ring(10), ring(10)
    for key in KEYS[:500]:
        owners = a.owners(key, 3)
        assert len(set(owners)) == 3 and owners == b.owners(key, 3)


def test_balance_improves_with_virtual_nodes() -> None:
    def max_over_mean(vnodes: int) -> float:
        r = ring(10, vnodes)
        counts = Counter(r.owners(k, 1)[0] for k in KEYS)
        return max(counts.values()) / (len(KEYS) / 10)

    assert max_over_mean(1) > max_over_mean(128)
    assert max_over_mean(128) < 1.25


def test_weights_scale_ownership() -> None:
    r = ring(4, weights={"n0": 3.0})
    shares = r.shares()
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert shares["n0"] > 2 * shares["n1"]


def test_replicas_go_to_distinct_zones_when_possible() -> None:
    r = ring(9, zones=3)
    for key in KEYS[:500]:
        owners = r.owners(key, 3)
        assert len({r.members[o].zone for o in owners}) == 3
    two_zones = ring(6, zones=2)
    for key in KEYS[:200]:
        owners = two_zones.owners(key, 3)
        assert len(set(owners)) == 3 and len({two_zones.members[o].zone for o in owners}) == 2


def test_a_join_moves_about_one_nth_of_the_keys() -> None:
    before, after = ring(10), ring(11)
    moved = sum(before.owners(k, 1) != after.owners(k, 1) for k in KEYS) / len(KEYS)
    assert 0.5 / 11 < moved < 1.5 / 11
    # ...and every moved key moved to the newcomer.
    assert all(after.owners(k, 1)[0] == "n10" for k in KEYS if before.owners(k, 1) != after.owners(k, 1))


@pytest.mark.parametrize("n, r, expected", [(0, 2, 0), (1, 2, 1), (3, 5, 3), (5, 0, 0)])
def test_small_rings(n: int, r: int, expected: int) -> None:
    assert len(ring(n).owners(KEYS[0], r)) == expected


def test_bad_weight() -> None:
    with pytest.raises(ValueError, match="weight"):
        HashRing([RingMember("a", weight=0)])


def test_one_member_counts_with_at_most_16_times_the_median_weight() -> None:
    """A forged or misconfigured weight neither takes the keys nor blows the ring up."""
    members = [RingMember(f"n{i}") for i in range(9)] + [RingMember("huge", weight=60000.0)]
    ring = HashRing(members)
    assert len(ring._points) == 9 * 128 + 16 * 128
    keys = [i.to_bytes(16, "big") for i in range(0, 1 << 128, (1 << 128) // 4000)]
    share = sum(ring.owners(k, 1) == ["huge"] for k in keys) / len(keys)
    assert 0.5 < share < 0.75  # 16 of 25 weight units, not all of them
