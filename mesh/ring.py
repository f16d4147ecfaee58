"""Consistent-hash ring with capacity-weighted virtual nodes and zone-aware replicas.

Every node computes placement from the same member list, so no placement state is
exchanged: ``owners(key, r)`` walks clockwise from the key and takes ``r`` distinct nodes,
preferring nodes in zones not yet chosen. Adding or removing one of N nodes moves about
1/N of the keys.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_VNODES = 128
"""Virtual nodes per unit of weight. More: better balance, bigger ring (memory, rebuild time)."""

MAX_WEIGHT_OVER_MEDIAN = 16.0
"""A member counts with at most this many times the median member's weight: one member (a
misconfigured one, or a forged ALIVE) can neither take most of the keys nor blow the ring up
to millions of points."""


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=1024)
def _member_points(name: str, count: int) -> tuple[tuple[int, str], ...]:
    """A member's virtual-node points, sorted: the same in every ring, so hashed once
    (a rebuild of an N-member ring then merges N sorted runs instead of hashing N * vnodes)."""
    return tuple(sorted((_point(f"{name}#{i}".encode()), name) for i in range(count)))


@dataclass(frozen=True, slots=True)
class RingMember:
    name: str
    zone: str = "default"
    weight: float = 1.0


class HashRing:
    """Placement of 16-byte keys onto members. Immutable once built: rebuild on membership change."""

    def __init__(self, members: Iterable[RingMember] = (), vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.vnodes = vnodes
        self.members: dict[str, RingMember] = {m.name: m for m in members}
        points: list[tuple[int, str]] = []
        for m in self.members.values():
            if not m.weight > 0:
                raise ValueError(f"member {m.name!r} has weight {m.weight}; must be > 0")
        weights = sorted(m.weight for m in self.members.values())
        ceiling = MAX_WEIGHT_OVER_MEDIAN * weights[len(weights) // 2] if weights else 0.0
        for m in self.members.values():
            points.extend(_member_points(m.name, max(1, round(vnodes * min(m.weight, ceiling)))))
        points.sort()
        self._zones_total = len({m.zone for m in self.members.values()})
        self._points = [p for p, _ in points]
        self._owners = [n for _, n in points]

    def __repr__(self) -> str:
        return f"<HashRing {len(self.members)} members {len(self._points)} points>"

    def __len__(self) -> int:
        return len(self.members)

    def owners(self, key: bytes, r: int = 2) -> list[str]:
        """The ``r`` members responsible for ``key``, primary first; distinct zones where possible."""
        n = len(self.members)
        if n == 0 or r <= 0:
            return []
        r = min(r, n)
        zones_total = self._zones_total
        start = bisect.bisect(self._points, int.from_bytes(key[:8], "big"))
        walk: list[str] = []
        seen: set[str] = set()
        zones: set[str] = set()
        for i in range(len(self._points)):
            name = self._owners[(start + i) % len(self._points)]
            if name in seen:
                continue
            seen.add(name)
            walk.append(name)
            zones.add(self.members[name].zone)
            if len(walk) >= r and len(zones) >= min(r, zones_total):
                break
        chosen: list[str] = []
        chosen_zones: set[str] = set()
        for name in walk:  # first pass: one per zone
            if len(chosen) < r and self.members[name].zone not in chosen_zones:
                chosen.append(name)
                chosen_zones.add(self.members[name].zone)
        for name in walk:  # then fill in ring order
            if len(chosen) >= r:
                break
            if name not in chosen:
                chosen.append(name)
        return chosen

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each member is primary for."""
        if not self._points:
            return {}
        space = 1 << 64
        share = dict.fromkeys(self.members, 0.0)
        for i, p in enumerate(self._points):
            prev = self._points[i - 1] if i else self._points[-1] - space
            share[self._owners[i]] += (p - prev) / space
        return share
