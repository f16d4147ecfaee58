"""Shared memory between a node and the engines on its host: the arena and its mappings.

The node's side is :class:`Arena` (its memory tier's payloads live in it); a client's is
:class:`SharedArena` (the same file, mapped by an engine's process) and
:func:`copy_verified` (the one copy out of it, checksummed in the same pass).

A node maps one file in a tmpfs directory (``/dev/shm`` by default) and keeps its memory
tier's payloads in it. Engines on the same host open the same file (the file's owner-only
permission is the gate: whoever can open it could read the node's memory anyway) and read
hits straight from it, or write their chunks into slots the node reserved for them: no
payload crosses a socket, and the pages are reused from one chunk to the next, so a PUT
does not pay page faults on fresh memory.

Layout: a 4 KiB header (magic, a random token clients check, so they know they mapped
this node's arena, and the size), then slots, each page-aligned. A slot lives as long as
any view of it: :meth:`Arena.alloc` hands out a view whose exporter holds the slot, and
its pages return to the free list only when the last view (the tier's record, a lease a
reader holds, a reply frame ZeroMQ has not sent yet, a record queued for the disk) is
gone. So eviction or a re-PUT never changes bytes someone still reads.

Every slot's pages are allocated (``posix_fallocate``) when the slot is, so a full tmpfs
is a failed allocation (the record stays in ordinary memory), never a SIGBUS on write.
The owner holds an ``flock`` on the file: a node that starts removes arenas in its
directory whose owner died (their lock is free), which also works across containers that
share the directory but not their process ids.

:class:`Arena` is not thread-safe: the node's store holds the lock.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .base import Buffer

logger = logging.getLogger(__name__)

MAGIC = b"LMCA"
HEADER_BYTES = 4096
PAGE = 4096
TOKEN_BYTES = 16
FILE_PREFIX = "lmcache-mesh-"
FILE_SUFFIX = ".arena"


class _Slot:
    """Returns its extent to the arena when the last view of it is gone."""

    __slots__ = ("offset", "extent", "_freed")

    def __init__(self, offset: int, extent: int, freed: collections.deque[tuple[int, int]]) -> None:
        self.offset, self.extent, self._freed = offset, extent, freed

    def __del__(self) -> None:
        # Any thread, any time (under someone else's lock, too): only hand the extent over;
        # the arena takes it back under the store's lock (deque appends are atomic).
        self._freed.append((self.offset, self.extent))


class _SlotBytes(np.ndarray):
    """The exporter of a slot's views: every memoryview of it keeps it, and so the slot, alive."""

    _slot: _Slot


def slot_offset(payload: object) -> int | None:
    """Where in its arena ``payload`` (a view :meth:`Arena.alloc` handed out) starts; None for
    any other buffer."""
    owner = getattr(payload, "obj", None)
    if (
        not isinstance(owner, _SlotBytes)
        or not isinstance(payload, memoryview)
        or payload.nbytes != owner.nbytes
    ):
        return None  # not a slot's view, or only a part of one
    return int(owner._slot.offset)


class Arena:
    """A shared-memory file of ``capacity`` payload bytes, mapped read-write."""

    def __init__(self, directory: Path, capacity: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        remove_orphans(directory)
        self.capacity = -(-capacity // PAGE) * PAGE
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.path = directory / f"{FILE_PREFIX}{os.getpid()}-{self.token[:4].hex()}{FILE_SUFFIX}"
        self.size = HEADER_BYTES + self.capacity
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, self.size)
            os.posix_fallocate(fd, 0, HEADER_BYTES)
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            _unlink(self.path)
            raise
        self._fd = fd
        self._map[: len(MAGIC)] = MAGIC
        self._map[len(MAGIC) : len(MAGIC) + TOKEN_BYTES] = self.token
        self._map[len(MAGIC) + TOKEN_BYTES : len(MAGIC) + TOKEN_BYTES + 8] = self.size.to_bytes(8, "little")
        _huge_pages(self._map)
        self._view = memoryview(self._map)
        self._freed: collections.deque[tuple[int, int]] = collections.deque()
        self._free: list[tuple[int, int]] = [(HEADER_BYTES, self.capacity)]
        """Free extents (offset, length), sorted by offset, never adjacent (coalesced)."""
        self._allocated_to = HEADER_BYTES
        """Pages below this offset are allocated in the file (first fit keeps slots low)."""
        self.used = 0
        """Bytes of extents allocated (slots viewed by the tier, by readers, writers or the disk queue)."""
        self.failed_allocations = 0

    def __repr__(self) -> str:
        return f"<Arena {self.path.name} {self.used}/{self.capacity} B in {len(self._free)} free extents>"

    def describe(self) -> dict[str, object]:
        """What a client needs to map it (and check it mapped the right file)."""
        return {"path": str(self.path), "size": self.size, "token": self.token}

    def alloc(self, size: int) -> memoryview | None:
        """A writable view of ``size`` bytes in a fresh slot (first fit), its pages allocated;
        None when no free extent is large enough or the file system is full."""
        self.reclaim()
        need = -(-max(size, 1) // PAGE) * PAGE
        i = next((i for i, (_, length) in enumerate(self._free) if length >= need), None)
        if i is None:
            self.failed_allocations += 1
            return None
        offset, length = self._free[i]
        try:
            if offset + need > self._allocated_to:  # pages below were allocated before: tmpfs keeps them
                start = max(offset, self._allocated_to)
                os.posix_fallocate(self._fd, start, offset + need - start)
                _populate(self._map, start, offset + need - start)
                self._allocated_to = offset + need
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise
            self.failed_allocations += 1
            if self.failed_allocations == 1:  # once: status counts the rest
                logger.warning("x shared memory is full (%s): records stay in ordinary memory", exc)
            return None
        if length == need:
            del self._free[i]
        else:
            self._free[i] = (offset + need, length - need)
        self.used += need
        owner = np.frombuffer(self._map, dtype=np.uint8, count=size, offset=offset).view(_SlotBytes)
        owner._slot = _Slot(offset, need, self._freed)
        return memoryview(owner)  # type: ignore[arg-type]  # an ndarray is a buffer

    def reclaim(self) -> int:
        """Take back the extents of slots nobody views any more; returns how many."""
        n = 0
        while self._freed:
            offset, extent = self._freed.popleft()
            self._give_back(offset, extent)
            self.used -= extent
            n += 1
        return n

    def view(self, offset: int, size: int) -> memoryview:
        """Raw bytes of the mapping (for tests and tools; records hold :meth:`alloc`'s views)."""
        return self._view[offset : offset + size]

    def _give_back(self, offset: int, length: int) -> None:
        i = bisect.bisect(self._free, (offset, 0))
        if i < len(self._free) and offset + length == self._free[i][0]:  # joins the next extent
            length += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # joins the previous one
            offset, length = self._free[i - 1][0], self._free[i - 1][1] + length
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (offset, length))

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    def close(self) -> None:
        """Remove the file; the mapping goes when the last view of it does (clients that mapped
        it keep theirs until they close)."""
        _unlink(self.path)
        with contextlib.suppress(BufferError):
            self._view.release()
        os.close(self._fd)  # the flock goes with it: nobody else can open the file now anyway


def _huge_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages (fewer TLB misses on large copies); tmpfs grants them
    only where the system allows (``shmem_enabled``: advise or always)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):
            mapping.madvise(advice)


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
"""Linux 5.14+ (Python's mmap names it from 3.13 on)."""


def _populate(mapping: mmap.mmap, start: int, length: int) -> None:
    """Map freshly allocated pages in one call: a first write then costs no page fault per
    page (on this machine kind, fresh slots fill about twice as fast). Older kernels refuse
    the advice, and the pages fault in on first use as before."""
    start_page = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        mapping.madvise(MADV_POPULATE_WRITE, start_page, length + start - start_page)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_orphans(directory: Path) -> int:
    """Remove arenas in ``directory`` whose node died (their lock is free); returns how many."""
    removed = 0
    for path in directory.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # not ours to remove, or gone already
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its node is alive
        finally:
            os.close(fd)
        _unlink(path)
        removed += 1
    if removed:
        logger.debug("- removed %d shared-memory arenas of nodes that are gone", removed)
    return removed


def shared_memory_room(directory: Path) -> int:
    """Free bytes in the file system of ``directory`` (0 if it is not there)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def open_client_view(path: str, size: int, token: bytes) -> mmap.mmap | None:
    """A client's mapping of a node's arena, or None when this process cannot use it: another
    host (no such file), another node's file, no permission."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return None
    finally:
        os.close(fd)
    _huge_pages(mapping)
    start = len(MAGIC)
    if mapping[:start] != MAGIC or mapping[start : start + TOKEN_BYTES] != token:
        mapping.close()
        return None
    return mapping


COPY_BLOCK_BYTES = 1 << 20
"""Copied, then hashed while still in cache: the checksum costs little beyond the copy. On
this machine kind 1 MiB blocks keep ~0.9x memcpy; 256 KiB blocks out of a shared mapping
(4 KiB pages) fell to half of it."""


class SharedArena:
    """A node's arena mapped into this process (read and write)."""

    def __init__(self, mapping: mmap.mmap, path: str) -> None:
        self._map = mapping
        self.path = path
        self._view = memoryview(mapping)

    def __repr__(self) -> str:
        return f"<SharedArena {self.path} {len(self._map)} B>"

    @classmethod
    def open(cls, described: Any) -> SharedArena | None:
        """The arena a PING reply describes, if this process can map it (else None)."""
        if not isinstance(described, dict):
            return None
        path, size, token = described.get("path"), described.get("size"), described.get("token")
        if not isinstance(path, str) or not isinstance(size, int) or not isinstance(token, bytes):
            return None
        mapping = open_client_view(path, size, token)
        return None if mapping is None else cls(mapping, path)

    @property
    def mapping(self) -> memoryview:
        """The whole arena as this process maps it (writable; e.g. to page-lock it for a GPU)."""
        return self._view

    def slot(self, offset: int, length: int) -> memoryview:
        """The bytes at ``offset`` (writable: a PUT writes its payloads through this)."""
        if offset + length > len(self._map):
            raise ValueError(f"slot {offset}+{length} lies outside the arena ({len(self._map)} B)")
        return self._view[offset : offset + length]

    def close(self) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # views handed out are still alive: the mapping goes with them
            pass


def copy_hashed(src: Buffer, dst: Buffer) -> int:
    """Copy ``src`` into ``dst`` (same length); returns the xxh3-64 of what was written, computed
    in the same pass (a writer's checksum at the cost of the copy)."""
    s = np.frombuffer(memoryview(src).cast("B"), dtype=np.uint8)
    d = np.frombuffer(memoryview(dst).cast("B"), dtype=np.uint8)
    if len(s) != len(d):
        raise ValueError(f"copying {len(s)} bytes into a buffer of {len(d)}")
    h = xxhash.xxh3_64()
    for start in range(0, len(s), COPY_BLOCK_BYTES):
        end = start + COPY_BLOCK_BYTES
        np.copyto(d[start:end], s[start:end])  # numpy's copy: memoryview's is half as fast here
        h.update(d[start:end].data)
    return int(h.intdigest())


def copy_verified(src: Buffer, dst: Buffer, checksum: int) -> bool:
    """Copy ``src`` into ``dst`` (same length) and check the copy against ``checksum`` in the
    same pass; False (and ``dst`` holds unverified bytes) when it does not match."""
    return copy_hashed(src, dst) == checksum
