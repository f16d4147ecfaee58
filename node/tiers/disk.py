"""L3: records as files on local disk under a byte budget, crash-safe, recovered at start.

One file per record, ``chunks/<2 hex>/<32 hex>.rec``:

    magic "LMCR" | u16 file version | u16 reserved | u32 header length |
    u64 xxh3 of header | msgpack record header | payload

Writes go to a temp file, are fsynced, renamed into place and the directory is fsynced,
so a crash leaves either the old state or the whole new file. At start the index is rebuilt
from the files: temp files, torn files (size disagrees with the header) and files whose
header fails its checksum are deleted. The payload checksum is verified on every read; a
record that fails is deleted and counted, never returned.

Eviction is LRU by last read. Write-backs from the memory tier go through a bounded queue
to one writer thread, so no caller waits on the disk; queued records stay readable.
Thread-safe.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from lmcache_mesh.mesh.errors import MeshError

from ..records import ChunkRecord, RecordHeader
from .held import Held

logger = logging.getLogger(__name__)

FILE_MAGIC = b"LMCR"
FILE_VERSION = 1
_PREFIX = struct.Struct("<4sHHIQ")  # magic, version, reserved, header length, header xxh3
MAX_FILE_HEADER_BYTES = 16 * 1024
_SUFFIX = ".rec"
_TMP_SUFFIX = ".tmp"


class CorruptFile(MeshError):  # type: ignore[misc]  # mypy checks mesh/ on its own: Any here
    """A record file on disk is torn, truncated or fails a checksum."""


def encode_file(record: ChunkRecord) -> tuple[bytes, memoryview]:
    """The prefix+header bytes and the payload view of a record file."""
    header = record.header.encode()
    prefix = _PREFIX.pack(FILE_MAGIC, FILE_VERSION, 0, len(header), xxhash.xxh3_64_intdigest(header))
    return prefix + header, memoryview(record.payload)


def decode_file_header(head: bytes, file_size: int | None = None) -> tuple[RecordHeader, int]:
    """The record header and payload offset from the start of a file; raises CorruptFile."""
    if len(head) < _PREFIX.size:
        raise CorruptFile(f"file of {len(head)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, _, hlen, hsum = _PREFIX.unpack_from(head)
    if magic != FILE_MAGIC:
        raise CorruptFile(f"bad magic {magic!r}")
    if version != FILE_VERSION:
        raise CorruptFile(f"file version {version} not supported; must be {FILE_VERSION}")
    if hlen > MAX_FILE_HEADER_BYTES or len(head) < _PREFIX.size + hlen:
        raise CorruptFile(f"header length {hlen} is out of range or truncated")
    raw = head[_PREFIX.size : _PREFIX.size + hlen]
    if xxhash.xxh3_64_intdigest(raw) != hsum:
        raise CorruptFile("header checksum mismatch")
    try:
        header = RecordHeader.decode(raw)
    except MeshError as exc:
        raise CorruptFile(f"bad record header: {exc}") from exc
    offset = _PREFIX.size + hlen
    if file_size is not None and file_size != offset + header.length:
        raise CorruptFile(f"torn file: {file_size} bytes on disk, header says {offset + header.length}")
    return header, offset


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What start-up found in the data dir."""

    recovered: int = 0
    recovered_bytes: int = 0
    discarded: int = 0
    temp_removed: int = 0
    evicted_over_budget: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class DiskCounters:
    writes: int = 0
    write_errors: int = 0
    writeback_dropped: int = 0
    """Records memory evicted that the write-back queue could not take: lost (0 unless a
    caller bypasses the room check; see TieredStore)."""
    evictions: int = 0
    budget_lowered: int = 0
    """Times the file system filled up below the disk budget, which then shrank to what fits."""
    corrupt_discarded: int = 0


@dataclass(slots=True)
class _Slot:
    """What the index keeps of a record on disk (little: there may be millions)."""

    size: int
    checksum: int
    """Checksum of the record version on disk: a stale file is never served for a newer one."""
    tenant: str = ""
    codec: str = "raw"
    raw_size: int = 0

    @classmethod
    def of(cls, header: RecordHeader) -> _Slot:
        return cls(header.length, header.checksum, header.tenant, header.codec, header.raw_bytes)


class DiskTier:
    """Byte-budgeted, crash-safe record files under ``<data_dir>/chunks``. Thread-safe.

    One writer thread does every file write and unlink, in submission order, so a delete
    or a newer version of a key can never be overtaken by an older write of it. The index
    changes at once (under the lock); the files follow.
    """

    def __init__(self, data_dir: Path | str, capacity_bytes: int, max_pending_bytes: int = 256 << 20) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"disk capacity must be >= 0 bytes, got {capacity_bytes}")
        self.data_dir = Path(data_dir)
        self.capacity_bytes = capacity_bytes
        self.max_pending_bytes = max_pending_bytes
        self.counters = DiskCounters()
        self._root = self.data_dir / "chunks"
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)
        """Notified (by the writer thread) after each queued write or unlink is done."""
        self._index: OrderedDict[bytes, _Slot] = OrderedDict()  # on disk, LRU first
        self._used = 0
        self._pending: dict[bytes, ChunkRecord] = {}  # queued for writing, newest version per key
        self._pending_bytes = 0
        self._queue: queue.Queue[tuple[str, ChunkRecord | bytes] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._failures: dict[str, int] = {}
        """Failed writes by cause (ENOSPC, EIO...), for the log."""
        self.recovery = RecoveryReport()
        self.held = Held()
        """records on disk per tenant, bytes per codec"""
        self.on_dropped: Callable[[list[bytes]], None] | None = None
        """Called (on the writer thread) with keys the disk evicted or failed to write."""

    def __repr__(self) -> str:
        return f"<DiskTier {len(self._index)} files {self._used}/{self.capacity_bytes} B at {self.data_dir}>"

    # lifecycle

    def open(self) -> RecoveryReport:
        """Lock the data dir, rebuild the index from disk and start the writer thread."""
        self._root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise MeshError(
                f"data dir {self.data_dir} is in use by another node (its lock is held, by another process or another node in this one)"
            ) from exc
        try:
            self.recovery = self._recover()
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._writer = threading.Thread(target=self._write_loop, name="lmcache-disk-writer", daemon=True)
        self._writer.start()
        return self.recovery

    def close(self) -> None:
        """Finish queued writes, stop the writer thread and release the data dir."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            with self._written:
                self._writer = None
                self._written.notify_all()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write and unlink is done; False on timeout."""
        with self._written:
            return self._written.wait_for(
                lambda: self._queue.unfinished_tasks == 0 or self._writer is None, timeout_s
            )

    # queries

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index or key in self._pending

    def __len__(self) -> int:
        return len(self._index)

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is on disk (or queued for it), under one lock."""
        with self._lock:
            return [key in self._index or key in self._pending for key in keys]

    def holds(self, record: ChunkRecord) -> bool:
        """True when this exact version of the record is on disk or queued for it."""
        with self._lock:
            return self._holds(record)

    def _holds(self, record: ChunkRecord) -> bool:
        queued = self._pending.get(record.key)
        if queued is not None:
            return queued.header == record.header
        slot = self._index.get(record.key)
        return slot is not None and slot.checksum == record.header.checksum

    def held_stats(self) -> tuple[dict[str, int], dict[str, Any]]:
        """(records per tenant, bytes per codec) on disk."""
        with self._lock:
            return dict(self.held.tenants), self.held.codec_stats()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def has_queue_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more could be queued for writing now without waiting."""
        with self._lock:
            return self._pending_bytes + nbytes <= self.max_pending_bytes or not self._pending

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index) + [k for k in self._pending if k not in self._index]

    def read(self, key: bytes) -> ChunkRecord | None:
        """The verified record, or None on a miss or a corrupt file (which is then deleted)."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None:
                return pending
            slot = self._index.get(key)
            if slot is None:
                return None
            self._index.move_to_end(key)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None  # evicted or deleted since we looked
        try:
            header, offset = decode_file_header(data, len(data))
            if header.key != key:
                raise CorruptFile(f"file holds key {header.key.hex()}")
            record = ChunkRecord.verified(header, memoryview(data)[offset:])
        except MeshError as exc:
            logger.warning("x %s: corrupt record file dropped: %s", path.name, exc)
            with self._lock:
                self.counters.corrupt_discarded += 1
                dropped = self._index.get(key) is slot
                if dropped:
                    self._forget(key)
                    self._queue.put(("unlink", key))
            if dropped and self.on_dropped is not None:
                self.on_dropped([key])  # the mesh must stop naming us as a holder, and repair
            return None
        if header.checksum != slot.checksum:
            return None  # an older version still on disk while a newer one is on its way
        return record

    # writes

    def submit(self, record: ChunkRecord, block: bool = False) -> bool:
        """Queue ``record`` for the writer thread; True if it is (or will be) on disk.

        When the queue is full: wait for room if ``block``, else return False (counted).
        False too when the record exceeds the whole budget.
        """
        if record.nbytes > self.capacity_bytes or self._writer is None:
            return False
        with self._written:
            while True:
                if self._holds(record):
                    return True
                if self._pending_bytes + record.nbytes <= self.max_pending_bytes or not self._pending:
                    self._invalidate(record.key)
                    self._pending[record.key] = record
                    self._pending_bytes += record.nbytes
                    self._queue.put(("write", record))
                    return True
                if not block:
                    self.counters.writeback_dropped += 1
                    return False
                # every queued record is followed by the writer's notify once it has left the queue
                self._written.wait()

    def remove(self, key: bytes) -> bool:
        """Forget ``key`` now (its file goes in order with the writes); True if it was held."""
        with self._lock:
            return self._invalidate(key)

    def invalidate(self, record: ChunkRecord) -> None:
        """A different version of ``record`` may be on disk: drop it so it is never served."""
        with self._lock:
            if not self._holds(record):
                self._invalidate(record.key)

    def _invalidate(self, key: bytes) -> bool:
        held = False
        queued = self._pending.pop(key, None)
        if queued is not None:
            self._pending_bytes -= queued.nbytes
            held = True
        if key in self._index:
            self._forget(key)
            self._queue.put(("unlink", key))
            held = True
        return held

    # the writer thread

    def _write_loop(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                self._queue.task_done()
                return
            kind, item = op
            try:
                if isinstance(item, ChunkRecord):
                    self._write(item)
                else:
                    _unlink(self._path(item))
            except Exception:  # the writer must outlive any one bad write or unlink
                logger.exception("x disk writer: %s failed", kind)
                with self._lock:
                    self.counters.write_errors += 1
                    if isinstance(item, ChunkRecord) and self._pending.get(item.key) is item:
                        del self._pending[item.key]
                        self._pending_bytes -= item.nbytes
            finally:
                self._queue.task_done()
                with self._written:
                    self._written.notify_all()

    def _write(self, record: ChunkRecord) -> None:
        size = record.nbytes
        with self._lock:
            if self._pending.get(record.key) is not record:
                return  # deleted or superseded while queued
        self._make_room(size)
        path = self._path(record.key)
        ok = False
        for attempt in range(2):
            try:
                _write_atomic(path, *encode_file(record))
                ok = True
                break
            except OSError as exc:
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                if not (attempt == 0 and full and self._shrink_to_fit(size)):
                    self._log_failure(exc, path.name)
                    break
        with self._lock:
            wanted = self._pending.get(record.key) is record
            if wanted:
                del self._pending[record.key]
                self._pending_bytes -= size
            if not ok:
                self.counters.write_errors += 1
                if self.on_dropped is not None:
                    self.on_dropped([record.key])
            elif wanted:
                if record.key in self._index:  # an older version's slot: this file replaced it
                    self._forget(record.key)
                self._add(record.key, _Slot.of(record.header))
                self.counters.writes += 1
            elif record.key not in self._pending:
                # Deleted while we wrote it: the file must go (a newer version, if any, is queued after us).
                if record.key in self._index:
                    self._forget(record.key)
                self._queue.put(("unlink", record.key))

    def _shrink_to_fit(self, size: int) -> bool:
        """The file system is full below our budget: the budget becomes what is on disk now,
        and older records are evicted (by policy, as at the budget) to make room for ``size``
        more. False when nothing could be freed."""
        with self._lock:
            lowered = max(self._used, size)
            if lowered < self.capacity_bytes:
                logger.warning(
                    "x the file system under %s is full at %d MiB of the %d MiB disk budget: budget lowered to %d MiB",
                    self.data_dir,
                    self._used >> 20,
                    self.capacity_bytes >> 20,
                    lowered >> 20,
                )
                self.capacity_bytes = lowered
                self.counters.budget_lowered += 1
        return self._make_room(size)

    def _make_room(self, size: int) -> bool:
        """Evict the least recently used records until ``size`` more bytes fit the budget (on
        the writer thread); whether any went."""
        victims: list[bytes] = []
        with self._lock:
            while self._used + size > self.capacity_bytes and self._index:
                victim = next(iter(self._index))
                self._forget(victim)
                victims.append(victim)
            self.counters.evictions += len(victims)
        for victim in victims:
            _unlink(self._path(victim))
        if victims and self.on_dropped is not None:
            self.on_dropped(victims)
        return bool(victims)

    def _log_failure(self, exc: OSError, name: str) -> None:
        """Once per cause (errno), then every hundredth: a failing disk must not flood the log."""
        cause = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        count = self._failures[cause] = self._failures.get(cause, 0) + 1
        if count == 1 or count % 100 == 0:
            logger.warning(
                "x disk write of %s failed (%s): not stored on disk (%d so far for %s)",
                name,
                exc,
                count,
                cause,
            )

    # internals

    def _add(self, key: bytes, slot: _Slot) -> None:
        self._index[key] = slot
        self._used += slot.size
        self.held.add(slot.tenant, slot.codec, slot.size, slot.raw_size)

    def _forget(self, key: bytes) -> None:
        slot = self._index.pop(key)
        self._used -= slot.size
        self.held.remove(slot.tenant, slot.codec, slot.size, slot.raw_size)

    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self._root / h[:2] / (h + _SUFFIX)

    def _recover(self) -> RecoveryReport:
        started = time.monotonic()
        found: list[tuple[float, bytes, _Slot]] = []
        discarded = temp_removed = scanned = 0
        for sub in sorted(p for p in self._root.iterdir() if p.is_dir()):
            for path in sub.iterdir():
                scanned += 1
                if scanned % 50_000 == 0:
                    logger.info(
                        "- disk recovery: %d files scanned in %.1f s", scanned, time.monotonic() - started
                    )
                if path.name.endswith(_TMP_SUFFIX):
                    _unlink(path)
                    temp_removed += 1
                    continue
                if not path.name.endswith(_SUFFIX):
                    continue
                try:
                    st = path.stat()
                    with open(path, "rb") as f:
                        head = f.read(_PREFIX.size + MAX_FILE_HEADER_BYTES)
                    header, _ = decode_file_header(head, st.st_size)
                    if header.key.hex() + _SUFFIX != path.name:
                        raise CorruptFile(f"file name does not match key {header.key.hex()}")
                except (OSError, CorruptFile) as exc:
                    logger.warning("x %s: discarded at start-up: %s", path.name, exc)
                    _unlink(path)
                    discarded += 1
                    continue
                found.append((st.st_mtime, header.key, _Slot.of(header)))
        found.sort(key=lambda t: t[0])
        for _, key, slot in found:
            self._add(key, slot)
        evicted = 0
        while self._used > self.capacity_bytes and self._index:
            key = next(iter(self._index))
            self._forget(key)
            _unlink(self._path(key))
            evicted += 1
        self.counters.corrupt_discarded += discarded
        return RecoveryReport(
            recovered=len(self._index),
            recovered_bytes=self._used,
            discarded=discarded,
            temp_removed=temp_removed,
            evicted_over_budget=evicted,
            seconds=time.monotonic() - started,
        )


def _write_atomic(path: Path, head: bytes, payload: memoryview) -> None:
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for chunk in (memoryview(head), payload):
                while chunk:
                    n = os.write(fd, chunk)
                    chunk = chunk[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
