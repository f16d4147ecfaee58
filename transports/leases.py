"""Leases: what engines on a node's host hold in its shared memory, and saves on their way.

A *read lease* holds the slots a shared-memory GET pointed an engine at: while it lasts,
eviction or a re-PUT of those keys cannot reuse the slots (a slot lives as long as a view
of it, :mod:`.tiers.arena`), so the engine reads exactly the bytes it was told about.

A *reservation* is a save announced before its bytes land (RESERVE): its keys are
*pending*, so a lookup counts them at once and a GET waits for them (within its own
deadline) instead of missing — the next request with the same prefix, from the same
engine or another on the node, hits instead of recomputing. With shared memory it also
holds the slots the engine writes the payloads into; the PUT that follows commits them.

Each lease ends when released (RELEASE), committed (PUT with its id), or after
``seconds`` (the node's ``lease-timeout``), so an engine that was killed holds nothing for long. What one
party holds is bounded in bytes (a node allows as much as its memory tier). Runs on the event loop.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .shm import slot_offset

LEASE_BITS = 62
"""Lease ids are random ints below 2**62."""


@dataclass(slots=True, eq=False)
class Lease:
    id: int
    party: Hashable
    expires: float
    views: list[memoryview] = field(default_factory=list)
    """Slots held: read (a GET's) or to write (a reservation's)."""
    keys: list[bytes] = field(default_factory=list)
    """Keys announced by a reservation: pending until it ends."""

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.views)

    def slot(self, offset: int) -> memoryview | None:
        """The reserved slot at ``offset`` (None if this lease holds none there)."""
        return next((v for v in self.views if slot_offset(v) == offset), None)


class Leases:
    """Every lease of a node, by id; ``on_settled`` is called when pending keys stop being so."""

    def __init__(
        self,
        seconds: float,
        max_bytes_per_party: int,
        on_settled: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.max_bytes_per_party = max_bytes_per_party
        self._on_settled = on_settled
        self._clock = clock
        self._leases: dict[int, Lease] = {}
        self._pending: Counter[bytes] = Counter()
        self._bytes: Counter[Hashable] = Counter()
        self.counters: Counter[str] = Counter()
        """granted_reads, reservations, committed, released, expired, refused (over a party's bound)"""

    def __len__(self) -> int:
        return len(self._leases)

    def room(self, party: Hashable, nbytes: int) -> bool:
        """Whether ``party`` may hold ``nbytes`` more (counted as refused when not)."""
        if self._bytes[party] + nbytes <= self.max_bytes_per_party:
            return True
        self.counters["refused"] += 1
        return False

    def grant(self, party: Hashable, views: Sequence[memoryview], keys: Sequence[bytes] = ()) -> Lease:
        """A new lease on ``views`` (read), or on ``keys`` with their slots (a reservation)."""
        self.reap()
        lease = Lease(_new_id(self._leases), party, self._clock() + self.seconds, list(views), list(keys))
        self._leases[lease.id] = lease
        self._bytes[party] += lease.nbytes
        self._pending.update(lease.keys)
        self.counters["reservations" if keys else "granted_reads"] += 1
        return lease

    def take(self, lease_id: int) -> Lease | None:
        """End the reservation ``lease_id`` to commit it: its slots are the caller's now."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires < self._clock():
            return None
        views = list(lease.views)
        self._end(lease)
        lease.views = views
        self.counters["committed"] += 1
        return lease

    def release(self, lease_ids: Sequence[int]) -> int:
        """End leases (unknown ids are ignored: they expired or ended already); returns how many."""
        ended = 0
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is not None:
                self._end(lease)
                ended += 1
        self.counters["released"] += ended
        return ended

    def clear(self) -> int:
        """End every lease (a node that stops); returns how many."""
        return self.release(list(self._leases))

    def pending(self, key: bytes) -> bool:
        """Whether a save of ``key`` was announced and has not landed (or ended) yet."""
        return self._pending.get(key, 0) > 0

    def reap(self) -> int:
        """End leases past their time; returns how many."""
        now = self._clock()
        expired = [lease for lease in self._leases.values() if lease.expires < now]
        for lease in expired:
            self._end(lease)
        self.counters["expired"] += len(expired)
        return len(expired)

    def _end(self, lease: Lease) -> None:
        del self._leases[lease.id]
        self._bytes[lease.party] -= lease.nbytes
        if self._bytes[lease.party] <= 0:
            del self._bytes[lease.party]
        if lease.keys:
            self._pending.subtract(lease.keys)
            for key in lease.keys:
                if self._pending[key] <= 0:
                    del self._pending[key]
            self._on_settled()
        lease.views.clear()  # the slots go back once nobody else views them either

    def stats(self) -> dict[str, Any]:
        return {
            "held": len(self._leases),
            "held_bytes": sum(self._bytes.values()),
            "pending_keys": len(self._pending),
            **{
                name: self.counters[name]
                for name in ("granted_reads", "reservations", "committed", "released", "expired", "refused")
            },
        }


def _new_id(taken: dict[int, Lease]) -> int:
    while True:  # random, so a late release of an old lease never ends a new one
        lease_id = secrets.randbits(LEASE_BITS)
        if lease_id not in taken:
            return lease_id
