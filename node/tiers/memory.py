"""L1: records in memory under a byte budget, evicted by S3-FIFO, with pinning.

S3-FIFO (Yang et al., SOSP'23) keeps a small FIFO (10% of the budget) for new entries, a
main FIFO for entries seen again, and a ghost FIFO of recently evicted keys. One-hit
wonders (a prompt seen once) leave through the small queue without disturbing the main
one; a key that comes back while still a ghost goes straight to main. Hits only bump a
2-bit counter, so a read never reorders a queue.

Pinned entries are never evicted; callers pin chunks between LOOKUP and GET.
Not thread-safe: :class:`TieredStore` holds the lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmcache_mesh.mesh.errors import NoSpace

from ..records import ChunkRecord
from .held import Held

_MAX_FREQ = 3


@dataclass(slots=True)
class _Entry:
    record: ChunkRecord
    in_main: bool
    freq: int = 0
    pins: int = 0


class MemoryTier:
    """Byte-budgeted S3-FIFO cache of chunk records keyed by chunk key."""

    def __init__(self, capacity_bytes: int, small_fraction: float = 0.1) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"memory capacity must be >= 0 bytes, got {capacity_bytes}")
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be in (0, 1), got {small_fraction}")
        self.capacity_bytes = capacity_bytes
        self._small_limit = int(capacity_bytes * small_fraction)
        self._entries: dict[bytes, _Entry] = {}
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._small_bytes = 0
        self._main_bytes = 0
        self._pinned_bytes = 0
        self.evictions = 0
        self.held = Held()
        """records per tenant, bytes per codec"""

    def __repr__(self) -> str:
        return (
            f"<MemoryTier {len(self._entries)} entries {self.used_bytes}/{self.capacity_bytes} B "
            f"small={len(self._small)} main={len(self._main)} ghost={len(self._ghost)}>"
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    @property
    def used_bytes(self) -> int:
        return self._small_bytes + self._main_bytes

    def keys(self) -> list[bytes]:
        return list(self._entries)

    def peek(self, key: bytes) -> ChunkRecord | None:
        """The record of ``key`` without counting a hit."""
        entry = self._entries.get(key)
        return None if entry is None else entry.record

    def get(self, key: bytes) -> ChunkRecord | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.freq = min(entry.freq + 1, _MAX_FREQ)
        return entry.record

    def put(self, record: ChunkRecord) -> list[ChunkRecord]:
        """Admit ``record``; returns the records evicted to make room.

        Raises NoSpace (admitting nothing, evicting nothing, keeping any old version) when
        pinned entries leave too little room. Re-putting a key replaces the record and keeps
        its pins.
        """
        size = record.nbytes
        old = self._entries.get(record.key)
        if old is not None and old.record.header == record.header:
            return []
        pins = old.pins if old is not None else 0
        pinned_elsewhere = self._pinned_bytes - (old.record.nbytes if old is not None and old.pins else 0)
        if size + pinned_elsewhere > self.capacity_bytes:
            raise NoSpace(
                f"memory tier cannot admit {size} bytes: capacity {self.capacity_bytes}, "
                f"pinned {pinned_elsewhere}"
            )
        if old is not None:
            self._drop(record.key)
        in_main = self._ghost.pop(record.key, False) is None  # seen recently: skip probation
        evicted = self._make_room(size)
        entry = _Entry(record, in_main, pins=pins)
        self._entries[record.key] = entry
        self.held.add_header(record.header)
        if in_main:
            self._main[record.key] = None
            self._main_bytes += size
        else:
            self._small[record.key] = None
            self._small_bytes += size
        if pins:
            self._pinned_bytes += size
        return evicted

    def remove(self, key: bytes) -> ChunkRecord | None:
        """Drop ``key`` even when pinned (an explicit delete wins over a pin)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._drop(key)
        return entry.record

    def pin(self, key: bytes) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.pins == 0:
            self._pinned_bytes += entry.record.nbytes
        entry.pins += 1
        return True

    def unpin(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.pins == 0:
            return
        entry.pins -= 1
        if entry.pins == 0:
            self._pinned_bytes -= entry.record.nbytes

    def evict_bytes(self, nbytes: int) -> list[ChunkRecord]:
        """Evict (by policy, never pinned entries) until ``nbytes`` more are free or nothing
        more can go; returns what was evicted."""
        target = min(self.capacity_bytes - self.used_bytes + nbytes, self.capacity_bytes)
        return self._make_room(max(target, 0), strict=False)

    def pinned_bytes(self) -> int:
        return self._pinned_bytes

    def items(self) -> list[ChunkRecord]:
        """Every record, main queue first (the ones worth keeping most)."""
        return [self._entries[k].record for k in (*self._main, *self._small)]

    # eviction

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.held.remove_header(entry.record.header)
        size = entry.record.nbytes
        if entry.in_main:
            del self._main[key]
            self._main_bytes -= size
        else:
            del self._small[key]
            self._small_bytes -= size
        if entry.pins:
            self._pinned_bytes -= size

    def _make_room(self, size: int, strict: bool = True) -> list[ChunkRecord]:
        evicted: list[ChunkRecord] = []
        # Each pass over an entry either evicts it, lowers its counter or moves it small->main,
        # so the loop ends; the bound only guards against a bookkeeping bug.
        budget = 2 * (_MAX_FREQ + 2) * (len(self._entries) + 1)
        main_spins = 0  # passes over main that evicted nothing (all hot or pinned)
        while self.used_bytes + size > self.capacity_bytes and budget > 0:
            budget -= 1
            main_stuck = main_spins > (_MAX_FREQ + 1) * len(self._main)
            if self._small and (self._small_bytes > self._small_limit or not self._main or main_stuck):
                victim = self._evict_small()
            else:
                victim = self._evict_main()
                main_spins = 0 if victim is not None else main_spins + 1
            if victim is not None:
                evicted.append(victim)
        if strict and self.used_bytes + size > self.capacity_bytes:
            raise NoSpace(f"memory tier could not free {size} bytes")  # pragma: no cover - bookkeeping bug
        return evicted

    def _evict_small(self) -> ChunkRecord | None:
        key, _ = self._small.popitem(last=False)
        entry = self._entries[key]
        size = entry.record.nbytes
        self._small_bytes -= size
        if entry.freq > 0 or entry.pins:
            # Seen again while in probation (or in use): it earns a place in main.
            entry.in_main = True
            entry.freq = 0
            self._main[key] = None
            self._main_bytes += size
            return None
        del self._entries[key]
        self.held.remove_header(entry.record.header)
        self._ghost[key] = None
        while len(self._ghost) > max(len(self._entries), 1):  # remember about as many as we hold
            self._ghost.popitem(last=False)
        self.evictions += 1
        return entry.record

    def _evict_main(self) -> ChunkRecord | None:
        key, _ = self._main.popitem(last=False)
        entry = self._entries[key]
        if entry.freq > 0 or entry.pins:
            entry.freq = max(entry.freq - 1, 0)
            self._main[key] = None
            return None
        self._main_bytes -= entry.record.nbytes
        del self._entries[key]
        self.held.remove_header(entry.record.header)
        self.evictions += 1
        return entry.record
