"""Memory and disk tiers behind one thread-safe interface.

Puts land in memory; what memory evicts is queued for the disk (off the caller's path)
unless the disk already holds that exact version. A disk hit is promoted to memory and stays
on disk, so evicting it again costs nothing. On close, memory is written back so that a
clean shutdown loses nothing that fits the disk budget.

Consistency: a re-PUT or DELETE invalidates the disk copy at once (the file follows in
order), and a disk read is only promoted if the disk still holds that version and memory
got nothing newer meanwhile. So no read ever returns a version older than the last write.

With an :class:`~.arena.Arena`, memory's payloads live in shared memory: a record that
arrives elsewhere (a socket frame, a disk read) is copied into a slot once; one written
into a slot by a local engine is kept where it is. When the arena has no room (other slots
still being read or written back), memory evicts more; failing that, the record stays in
ordinary memory — slower to share, never lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lmcache_mesh.mesh.errors import Busy, NoSpace
from lmcache_mesh.transports.shm import Arena, slot_offset

from ..records import ChunkRecord
from .disk import DiskTier
from .memory import MemoryTier

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TierCounters:
    puts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    hits_memory: int = 0
    hits_disk: int = 0
    misses: int = 0
    deletes: int = 0
    promotions: int = 0
    busy_writeback: int = 0
    """PUTs refused (BUSY) because what they would evict could not be queued for the disk."""
    unpromoted: int = 0
    """Disk hits served without a copy in memory, for the same reason."""


class TieredStore:
    """Memory (L1) over an optional disk tier (L3). All methods are thread-safe.

    Only :meth:`get_many` (on a memory miss) and :meth:`close` touch the disk on the calling
    thread; callers on an event loop run those in a worker thread.
    """

    def __init__(self, memory: MemoryTier, disk: DiskTier | None = None, arena: Arena | None = None) -> None:
        self.memory = memory
        self.disk = disk
        self.arena = arena
        self.counters = TierCounters()
        self._lock = threading.Lock()
        self._on_forgotten: Callable[[list[bytes]], None] | None = None
        if disk is not None:
            disk.on_dropped = self._dropped_from_disk

    def watch_forgotten(self, callback: Callable[[list[bytes]], None]) -> None:
        """Be called, from any thread, with keys that left every tier (not on DELETE: the
        caller knows); the mesh un-announces them."""
        self._on_forgotten = callback

    def _dropped_from_disk(self, keys: list[bytes]) -> None:
        with self._lock:
            gone = [k for k in keys if k not in self.memory]
        if gone and self._on_forgotten is not None:
            self._on_forgotten(gone)

    def __repr__(self) -> str:
        return f"<TieredStore {self.memory!r} {self.disk!r}>"

    def _admissible(self, record: ChunkRecord) -> bool:
        if record.nbytes + self.memory.pinned_bytes() <= self.memory.capacity_bytes:
            return True
        d = self.disk
        return d is not None and record.nbytes <= d.capacity_bytes

    def put(self, record: ChunkRecord) -> None:
        self.put_many([record])

    def put_many(self, records: Sequence[ChunkRecord]) -> list[ChunkRecord]:
        """Store every record, or (NoSpace) none of them when some tier cannot take one.
        Returns them as kept, in order: payloads in the shared arena where it had room."""
        kept: list[ChunkRecord] = []
        direct: list[ChunkRecord] = []
        evicted: list[ChunkRecord] = []
        with self._lock:
            for record in records:
                if not self._admissible(record):
                    raise NoSpace(
                        f"no tier can admit {record.nbytes} bytes (memory {self.memory.capacity_bytes} with "
                        f"{self.memory.pinned_bytes()} pinned, disk {self.disk.capacity_bytes if self.disk else 0})"
                    )
            if not self._write_back_has_room(sum(r.nbytes for r in records)):
                self.counters.busy_writeback += 1
                assert self.disk is not None
                raise Busy(
                    f"the disk write-back queue is full ({self.disk.pending_bytes >> 20} MiB waiting): "
                    "this PUT would evict records it cannot take; retry shortly"
                )
            for record in records:
                self.counters.puts += 1
                self.counters.bytes_in += record.nbytes
                if self.disk is not None:
                    self.disk.invalidate(record)  # an older version on disk must never be served
                held = self.memory.peek(record.key)
                if held is not None and held.header == record.header:
                    kept.append(held)
                    continue  # the same version: nothing to change (and nothing to copy)
                shared = self._shared(record, evicted)
                try:
                    evicted += self.memory.put(shared)
                    kept.append(shared)
                except NoSpace:
                    self.memory.remove(record.key)  # an older version must not outlive this one
                    direct.append(record)  # too big for what memory has unpinned: straight to disk
                    kept.append(record)
        for record in direct:
            assert self.disk is not None  # _admissible said so
            self.disk.submit(record, block=True)
        self._write_back(evicted)
        return kept

    def reserve_slots(self, sizes: Sequence[int]) -> list[memoryview] | None:
        """Fresh arena slots to write payloads of ``sizes`` into (evicting to make room), or None
        (no arena, or no room: the writer sends frames instead)."""
        if self.arena is None:
            return None
        evicted: list[ChunkRecord] = []
        slots: list[memoryview] = []
        with self._lock:
            for size in sizes:
                slot = self.arena.alloc(size)
                if slot is None:
                    evicted += self.memory.evict_bytes(size)
                    slot = self.arena.alloc(size)
                if slot is None:
                    break
                slots.append(slot)
        self._write_back(evicted)
        return slots if len(slots) == len(sizes) else None  # the ones taken free themselves

    def _shared(self, record: ChunkRecord, evicted: list[ChunkRecord]) -> ChunkRecord:
        """``record`` with its payload in the arena (copied once, unless it is there already);
        as it is when there is no arena or no room in it. Under the lock."""
        if self.arena is None or slot_offset(record.payload) is not None:
            return record
        slot = self.arena.alloc(record.nbytes)
        if slot is None:
            # Slots still viewed (being read, sent or written back) are not free yet: evict
            # what memory can spare, and take what is free at once.
            evicted += self.memory.evict_bytes(record.nbytes)
            slot = self.arena.alloc(record.nbytes)
            if slot is None:
                return record
        slot[:] = memoryview(record.payload).cast("B")
        return ChunkRecord(record.header, slot.toreadonly())

    def _write_back(self, evicted: list[ChunkRecord]) -> None:
        # The room was checked before evicting; should another thread have filled the queue
        # meanwhile, wait for the writer rather than lose an acknowledged record.
        lost = [r.key for r in evicted if self.disk is None or not self.disk.submit(r, block=True)]
        if lost and self._on_forgotten is not None:
            self._on_forgotten(lost)

    def keys(self) -> list[bytes]:
        """Every key held in any tier (a snapshot)."""
        with self._lock:
            held = set(self.memory.keys())
        if self.disk is not None:
            held.update(self.disk.keys())
        return list(held)

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is held in some tier (any order, not just a prefix)."""
        with self._lock:
            here = [key in self.memory for key in keys]
        if self.disk is not None and not all(here):
            on_disk = self.disk.present(keys)
            here = [a or b for a, b in zip(here, on_disk, strict=True)]
        return here

    def in_memory(self, keys: Sequence[bytes]) -> bool:
        with self._lock:
            return all(k in self.memory for k in keys)

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` are present in any tier. No side effects."""
        with self._lock:
            n = next((i for i, key in enumerate(keys) if key not in self.memory), len(keys))
        if n == len(keys) or self.disk is None:
            return n
        on_disk = self.disk.present(keys[n:])
        with self._lock:
            return next(
                (n + i for i, key in enumerate(keys[n:]) if not (on_disk[i] or key in self.memory)), len(keys)
            )

    def get_many(self, keys: Sequence[bytes]) -> list[ChunkRecord | None]:
        """Records for ``keys`` (None per miss), promoting disk hits into memory."""
        out: list[ChunkRecord | None] = []
        for key in keys:
            with self._lock:
                record = self.memory.get(key)
                if record is not None:
                    self.counters.hits_memory += 1
                    self.counters.bytes_out += record.nbytes
                    out.append(record)
                    continue
            record = self.disk.read(key) if self.disk is not None else None
            evicted: list[ChunkRecord] = []
            with self._lock:
                if record is not None:
                    newer = self.memory.get(key)
                    if newer is not None:
                        record = newer  # put while we read the disk: the newer version wins
                    elif self.disk is not None and self.disk.holds(record):
                        evicted = self._promote(record)
                    else:
                        record = None  # deleted or replaced while we read it
                if record is None:
                    self.counters.misses += 1
                else:
                    self.counters.hits_disk += 1
                    self.counters.bytes_out += record.nbytes
            self._write_back(evicted)
            out.append(record)
        return out

    def _write_back_has_room(self, incoming: int) -> bool:
        """Whether what memory would evict to admit ``incoming`` bytes can be queued for the
        disk (counting every eviction as new to it: a little conservative). Under the lock."""
        evictable = self.memory.used_bytes - self.memory.pinned_bytes()
        overflow = min(self.memory.used_bytes + incoming - self.memory.capacity_bytes, evictable)
        return self.disk is None or overflow <= 0 or self.disk.has_queue_room(overflow)

    def _promote(self, record: ChunkRecord) -> list[ChunkRecord]:
        evicted: list[ChunkRecord] = []
        if not self._write_back_has_room(record.nbytes):
            self.counters.unpromoted += 1
            return evicted  # served from disk; memory keeps what it holds
        try:
            evicted += self.memory.put(self._shared(record, evicted))
        except NoSpace:
            return evicted
        self.counters.promotions += 1
        return evicted

    def delete(self, keys: Sequence[bytes]) -> int:
        deleted = 0
        with self._lock:
            for key in keys:
                hit = self.memory.remove(key) is not None
                if self.disk is not None:
                    hit = self.disk.remove(key) or hit
                deleted += hit
            self.counters.deletes += deleted
        return deleted

    def pin(self, keys: Sequence[bytes]) -> int:
        """Pin the leading ``keys`` held in memory; returns how many were pinned."""
        with self._lock:
            n = 0
            for key in keys:
                if not self.memory.pin(key):
                    break
                n += 1
            return n

    def unpin(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                self.memory.unpin(key)

    def close(self, persist: bool = True) -> int:
        """Write memory back to disk (if ``persist``), wait for the disk, stop it; returns records queued."""
        written = 0
        if self.disk is not None:
            if persist:
                with self._lock:
                    # Least valuable first: if disk fills, LRU eviction drops those, not main's.
                    items = list(reversed(self.memory.items()))
                for record in items:
                    if not self.disk.holds(record):
                        written += self.disk.submit(record, block=True)
            self.disk.close()
        if self.arena is not None:
            self.arena.close()
        return written

    def stats(self) -> dict[str, Any]:
        with self._lock:
            memory = {
                "capacity_bytes": self.memory.capacity_bytes,
                "used_bytes": self.memory.used_bytes,
                "pinned_bytes": self.memory.pinned_bytes(),
                "entries": len(self.memory),
                "evictions": self.memory.evictions,
                "tenants": _named(self.memory.held.tenants),
                "codecs": self.memory.held.codec_stats(),
            }
            counters = asdict(self.counters)
            if self.arena is not None:
                self.arena.reclaim()
                memory["shared"] = {
                    "path": str(self.arena.path),
                    "capacity_bytes": self.arena.capacity,
                    "used_bytes": self.arena.used,
                    "largest_free_bytes": self.arena.largest_free(),
                    "failed_allocations": self.arena.failed_allocations,
                }
        tiers: dict[str, Any] = {"memory": memory}
        if self.disk is not None:
            tenants, codecs = self.disk.held_stats()
            tiers["disk"] = {
                "capacity_bytes": self.disk.capacity_bytes,
                "used_bytes": self.disk.used_bytes,
                "pending_bytes": self.disk.pending_bytes,
                "entries": len(self.disk),
                "path": str(self.disk.data_dir),
                "tenants": _named(tenants),
                "codecs": codecs,
                **asdict(self.disk.counters),
            }
        return {"tiers": tiers, "counters": counters}


def _named(counts: Mapping[str, int]) -> dict[str, int]:
    """Records per tenant, the default space shown as "default"."""
    return {(tenant or "default"): n for tenant, n in sorted(counts.items())}
