"""The client's side of shared memory: the node's arena as this process mapped it, reads
under a lease, and the one copy that also verifies.

A client on the node's host maps the arena the node describes in its PING reply (it
checks the token, so it knows it mapped this node's file); from then on a GET answers
with offsets into it and a lease, and a PUT writes payloads into slots the node reserved.
Another host, a container without the shared directory, a node without an arena: the
file does not open, and the client sends frames as before (:attr:`SharedArena` is None).

Records read from the arena are verified as they are copied out (:func:`copy_verified`:
the copy and its checksum in one pass, over what was written), so the engine's buffer
holds exactly the bytes the record's checksum vouches for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import xxhash

from lmcache_mesh.transports.shm import SharedArena as SharedArena
from lmcache_mesh.transports.shm import copy_verified

from .records import Buffer, ChunkRecord


def verified_copy(record: ChunkRecord) -> ChunkRecord | None:
    """A record whose payload is a verified copy of ``record``'s (None if it does not verify)."""
    out = np.empty(record.nbytes, dtype=np.uint8)
    if not copy_verified(record.payload, out, record.header.checksum):
        return None
    return ChunkRecord(record.header, out.data.toreadonly())


class Lease:
    """Records of a GET, some of them views into the node's arena that stay unchanged until
    :meth:`release` (or the node's lease timeout). Verify as you use them: :meth:`copy_into`
    (copy and check in one pass) or :meth:`payload` (check, then read the view in place).
    A record that fails is counted in the client's ``checksum_failures``."""

    def __init__(
        self,
        records: list[ChunkRecord | None],
        shared: Sequence[int],
        lease_ids: Sequence[int],
        release: Callable[[list[int]], None],
        count_bad: Callable[[int], None],
    ) -> None:
        self.records = records
        """Per key: its record (header and payload), None per miss."""
        self._unverified = set(shared)
        self._ids = list(lease_ids)
        self._release = release
        self._count_bad = count_bad

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def hits(self) -> int:
        """Leading records present."""
        return next((i for i, r in enumerate(self.records) if r is None), len(self.records))

    @property
    def shared(self) -> bool:
        """Whether any record is read in place from shared memory."""
        return bool(self._ids)

    def copy_into(self, i: int, dst: Buffer) -> bool:
        """Copy record ``i``'s payload into ``dst`` (its exact size); False if there is none or
        it fails its checksum (``dst`` then holds bytes not to be used)."""
        record = self.records[i]
        if record is None:
            return False
        if i not in self._unverified:
            memoryview(dst).cast("B")[:] = memoryview(record.payload).cast("B")
            return True
        if copy_verified(record.payload, dst, record.header.checksum):
            return True
        self._fail(i)
        return False

    def payload(self, i: int) -> memoryview | None:
        """Record ``i``'s payload, verified (read it before :meth:`release`); None if it fails."""
        record = self.records[i]
        if record is None:
            return None
        if i in self._unverified:
            if xxhash.xxh3_64_intdigest(record.payload) != record.header.checksum:
                self._fail(i)
                return None
            self._unverified.discard(i)
        return memoryview(record.payload)

    def kept(self) -> list[ChunkRecord | None]:
        """Every record, verified, as copies that stay valid after :meth:`release` (records
        that came as frames are not copied again)."""
        out = list(self.records)
        for i in sorted(self._unverified):
            record = out[i]
            assert record is not None
            out[i] = verified_copy(record)
            if out[i] is None:
                self._fail(i)
        self._unverified.clear()
        return out

    def _fail(self, i: int) -> None:
        self.records[i] = None
        self._unverified.discard(i)
        self._count_bad(1)

    def release(self) -> None:
        """Let the node reuse the slots (idempotent); views of them must not be read after."""
        ids, self._ids = self._ids, []
        if ids:
            self._release(ids)
