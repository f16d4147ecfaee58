"""What the server does with payloads: which travel in shared memory and which as frames,
saves announced before they land, and how much one reply holds.

:class:`Sharing` is the server's half of :mod:`.shm`: a GET's records that live in the
arena are answered by offset under a read lease, the rest as frames, as many as one reply
holds (the client asks again where it stopped); a PUT's payloads come from the slots of
its reservation or from frames; keys of an announced save count as held, and a GET waits
for them within its deadline. Runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from lmcache_mesh.mesh.errors import BadRequest, Unavailable
from lmcache_mesh.transports.leases import Leases
from lmcache_mesh.transports.shm import slot_offset

from .config import NodeConfig
from .protocol import ok_reply
from .records import Buffer, ChunkRecord, RecordHeader
from .requests import Put

REAP_EVERY_S = 0.5
"""How often leases past their time are ended (checked as requests arrive, and by waiting GETs)."""

DEADLINE_MARGIN_S = 0.005
"""A GET waiting for a save stops this long before its deadline, to answer in time."""

HEADER_ALLOWANCE_BYTES = 1024
"""What a record header adds to a reply, roughly (they are at most MAX_RECORD_HEADER_BYTES)."""

SMALL_FRAME_BYTES = 64 << 10
"""Below this, libzmq may place a received frame inside a shared receive buffer."""


class Sharing:
    """Leases and pending saves of one server; ``lookup`` counts the leading keys held here."""

    def __init__(self, config: NodeConfig, lookup: Callable[[Sequence[bytes]], int]) -> None:
        limits = config.limits
        # A lease allocates nothing (its slots exist); what it costs is slots kept from reuse
        # while memory moves on. So one party may hold as much as the memory tier: a whole
        # 32k-token hit of a 70B model in one read.
        most = max(limits.max_inflight_bytes_per_peer, config.storage.memory_bytes)
        self.leases = Leases(limits.lease_seconds, most, self._wake)
        self.max_reply_bytes = limits.max_request_bytes
        self._lookup = lookup
        self._settled: list[asyncio.Future[None]] = []
        self._reaped_at = 0.0

    def tick(self, now: float) -> None:
        """End leases past their time (at most every REAP_EVERY_S)."""
        if now - self._reaped_at > REAP_EVERY_S:
            self._reaped_at = now
            self.leases.reap()

    # pending saves

    def pending(self, keys: Sequence[bytes]) -> bool:
        return any(self.leases.pending(k) for k in keys)

    def hits_here(self, keys: Sequence[bytes]) -> int:
        """Leading ``keys`` held here or on their way (a save announced by RESERVE)."""
        hits = 0
        while hits < len(keys):
            hits += self._lookup(keys[hits:])
            start = hits
            while hits < len(keys) and self.leases.pending(keys[hits]):
                hits += 1
            if hits == start:
                break
        return hits

    def _wake(self) -> None:
        """Pending keys settled: the GETs waiting on them look again."""
        waiting, self._settled = self._settled, []
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)

    async def until_landed(self, keys: Sequence[bytes], deadline: float) -> None:
        """Wait (up to ``deadline``) until no key of ``keys`` is pending; those still pending
        then are misses."""
        loop = asyncio.get_running_loop()
        while self.pending(keys):
            left = deadline - time.monotonic() - DEADLINE_MARGIN_S
            if left <= 0:
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._settled.append(fut)
            try:
                await asyncio.wait_for(fut, min(left, REAP_EVERY_S))
            except asyncio.TimeoutError:
                self.leases.reap()  # a reservation that expired settles its keys too

    # PUT

    def reservation_reply(
        self, rid: int, party: Hashable, keys: list[bytes], slots: list[memoryview] | None
    ) -> bytes:
        lease = self.leases.grant(party, slots or [], keys)
        offsets = {"slots": [slot_offset(v) for v in slots]} if slots else {}
        return ok_reply(rid, lease=lease.id, seconds=self.leases.seconds, **offsets)

    def put_records(self, body: Put, frames: Sequence[Buffer]) -> list[ChunkRecord]:
        """The records of a PUT, each verified (ChecksumMismatch: nothing is to be stored), its
        payload from its reservation's slot or its frame. Ends the reservation."""
        lease = self.leases.take(body.lease) if body.lease is not None else None
        if body.slots is not None and any(s is not None for s in body.slots) and lease is None:
            raise Unavailable(
                f"lease {body.lease} ended before its PUT (after {self.leases.seconds:g} s, or released): "
                "its slots may be reused; send the payloads again"
            )
        framed = iter(frames)
        records = []
        for i, h in enumerate(body.headers):
            offset = None if body.slots is None else body.slots[i]
            if offset is None:
                records.append(ChunkRecord.verified(h, own(next(framed))))
                continue
            assert lease is not None
            slot = lease.slot(offset)
            if slot is None or slot.nbytes != h.length:
                raise BadRequest(
                    f"PUT record {i}: lease {lease.id} reserved no slot of {h.length} bytes at {offset}"
                )
            records.append(ChunkRecord.verified(h, slot.toreadonly()))
        return records

    # GET

    def get_reply(
        self,
        rid: int,
        found: list[ChunkRecord | None],
        headers: list[RecordHeader | None],
        party: Hashable,
        shm: bool,
    ) -> list[Any]:
        """A GET's reply frames: records in the arena by offset (``shm``: the asker mapped it),
        the rest as frames, as many as one reply holds; ``next`` says where it stopped."""
        shared = self._read_lease(party, found) if shm else {}
        slots: list[int | None] = shared.get("slots") or [None] * len(found)
        framed = [r if slots[i] is None else None for i, r in enumerate(found)]
        framed_headers = [h if slots[i] is None else None for i, h in enumerate(headers)]
        framed, framed_headers, stop = within(framed, framed_headers, self.max_reply_bytes)
        headers = [h if slots[i] is not None else framed_headers[i] for i, h in enumerate(headers)]
        if stop is not None:
            headers[stop:] = [None] * (len(headers) - stop)
            if "slots" in shared:
                shared["slots"] = slots[:stop] + [None] * (len(slots) - stop)
        wire = [None if h is None else h.to_wire() for h in headers]
        more = {} if stop is None else {"next": stop}  # the client asks again from there
        return [ok_reply(rid, records=wire, **shared, **more), *(r.payload for r in framed if r is not None)]

    def _read_lease(self, party: Hashable, found: list[ChunkRecord | None]) -> dict[str, Any]:
        """Where each record's payload is in the arena, under a new read lease (empty when
        none is there, or the asker holds too much already: then they all go as frames)."""
        offsets = [None if r is None else slot_offset(r.payload) for r in found]
        views = [
            memoryview(r.payload)
            for r, o in zip(found, offsets, strict=True)
            if r is not None and o is not None
        ]
        if not views or not self.leases.room(party, sum(v.nbytes for v in views)):
            return {}
        return {"slots": offsets, "lease": self.leases.grant(party, views).id}


def within(
    found: list[ChunkRecord | None], headers: list[RecordHeader | None], max_bytes: int
) -> tuple[list[ChunkRecord | None], list[RecordHeader | None], int | None]:
    """The records of one reply: as many as ``max_bytes`` (payloads and headers) holds, and
    where it stopped (None: all of them). Nothing from there on is sent; the client asks
    again for those keys. A first record too large for any reply is a miss."""
    total = 0
    for i, r in enumerate(found):
        if r is None or headers[i] is None:
            continue
        total += r.nbytes + HEADER_ALLOWANCE_BYTES
        if total > max_bytes:
            if i == 0:
                return [None, *found[1:]], [None, *headers[1:]], None if len(found) == 1 else 1
            blank: list[None] = [None] * (len(found) - i)
            return [*found[:i], *blank], [*headers[:i], *blank], i
    return found, headers, None


def own(buffer: Any) -> Any:
    # Keeping a small frame would pin the whole shared buffer it sits in, so small payloads
    # are copied (cheap); large ones have a buffer of their own and are kept zero-copy.
    return bytes(buffer) if len(buffer) < SMALL_FRAME_BYTES else buffer
