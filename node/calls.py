"""Every call a client makes, written once: the request it sends and how its reply is read.

A :class:`Call` is sans-I/O: an op, its header fields, its payload frames and a reader
that turns the reply into the caller's result (or raises). :class:`~.client.Client` runs
calls on a blocking socket and :class:`~.client.AsyncClient` on a conduit with many in
flight; neither builds a request or parses a reply itself. A call with nothing to ask
(no keys) has its ``result`` already and is never sent.

What takes several requests is written once too, as :data:`Steps`: a generator that
yields each call and is sent its result. A hit of any length comes back whole that way
(:func:`get_all` asks again for what one reply could not hold, within one deadline), and
a PUT of any size goes in batches (:func:`put_all`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from lmcache_mesh.mesh.costs import Cost
from lmcache_mesh.mesh.errors import BadRequest, MeshError
from lmcache_mesh.transports.shm import copy_hashed

from .protocol import Op, Reply, put_request, read_records
from .records import Buffer, ChunkRecord, describe
from .shm import SharedArena

T = TypeVar("T")

Keys = Sequence[bytes]
"""A chain of chunk keys (16 bytes each), in prompt order."""

Steps = Generator["Call[Any]", Any, T]
"""Calls made one after another: each yielded call is run and its result sent back in;
the generator's return value is the caller's result."""

_UNSENT: Any = object()

PUT_BATCH_BYTES = 64 << 20
"""Payload bytes per PUT request when a client stores many records (a node accepts 256 MiB
per request by default; smaller batches keep its memory per request low)."""

PUT_BATCH_RECORDS = 1024
"""Records per PUT request (a node accepts 4096 keys per request by default)."""


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    op: Op
    fields: dict[str, Any]
    read: Callable[[Reply], T]
    frames: Sequence[Buffer] = ()
    timeout_s: float | None = None
    """This call's own deadline (None: the client's ``timeout_s``)."""
    result: T = field(default=_UNSENT)
    """Set when the answer is known without asking (nothing to ask)."""

    @property
    def needs_sending(self) -> bool:
        return self.result is _UNSENT


def _answered(op: Op, result: T) -> Call[T]:
    return Call(op, {}, _no_reader, result=result)


def _no_reader(reply: Reply) -> Any:  # pragma: no cover - an answered call is never sent
    raise AssertionError("an answered call has no reply")


def _ignore(reply: Reply) -> None:
    return None


def _keys_fields(keys: Sequence[bytes], local: bool, cost: Cost | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"keys": list(keys), "local": local}
    if cost is not None:
        fields["cost"] = cost.to_wire()
    return fields


def ping(timeout_s: float | None = None, shm: bool = False) -> Call[dict[str, Any]]:
    """The node's name, version and limits; with ``shm``, its arena too (if it has one)."""
    return Call(Op.PING, {"shm": True} if shm else {}, lambda r: r.fields, timeout_s=timeout_s)


def put_records(
    records: Sequence[ChunkRecord],
    replica: bool = False,
    lease: int | None = None,
    slots: Sequence[int] | None = None,
) -> Call[None]:
    """One PUT: payloads as frames, or (``slots``) written into the lease's slots already."""
    if not records:
        return _answered(Op.PUT, None)
    fields, frames = put_request(records)
    extra: dict[str, Any] = {} if lease is None else {"lease": lease}
    if slots is not None:
        extra["slots"], frames = list(slots), []
    return Call(Op.PUT, {**fields, "replica": replica, **extra}, _ignore, frames)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A save announced to the node (its keys count as cached until it lands or ``seconds``
    pass), with slots in the node's arena to write the payloads into when ``slots``."""

    lease: int
    seconds: float
    slots: list[int] | None = None


def reserve(keys: Sequence[bytes], sizes: Sequence[int], shm: bool) -> Call[Reservation]:
    def read(reply: Reply) -> Reservation:
        lease, seconds, slots = (
            reply.fields.get("lease"),
            reply.fields.get("seconds", 0),
            reply.fields.get("slots"),
        )
        if not isinstance(lease, int) or (
            slots is not None and (not isinstance(slots, list) or len(slots) != len(keys))
        ):
            raise BadRequest("RESERVE reply needs a 'lease' and, with slots, one per key")
        return Reservation(lease, float(seconds), slots)

    return Call(Op.RESERVE, {"keys": list(keys), "sizes": list(sizes), "shm": shm}, read)


def release(lease_ids: Sequence[int]) -> Call[None]:
    return Call(Op.RELEASE, {"leases": list(lease_ids)}, _ignore)


def commit(
    records: Sequence[ChunkRecord],
    reservation: Reservation,
    arena: SharedArena | None,
    replica: bool = False,
    written: bool = False,
) -> Steps[None]:
    """Land a reserved save: payloads written into its slots (one copy, no socket; none with
    ``written``: the caller wrote them there), or sent as frames when it has none (or they are
    gone: its lease ended first)."""
    if reservation.slots is not None and arena is not None:
        try:
            for record, offset in zip(records, reservation.slots, strict=True):
                if not written:
                    arena.slot(offset, record.nbytes)[:] = memoryview(record.payload).cast("B")
            yield put_records(records, replica, reservation.lease, reservation.slots)
            return
        except MeshError:
            pass  # e.g. the lease ran out while we wrote: the frames below still land
    yield put_records(records, replica, reservation.lease)


def put(key: bytes, payload: Buffer, namespace: bytes, meta: Mapping[str, Any] | None = None) -> Call[None]:
    return put_records([ChunkRecord.build(key, payload, namespace, meta)])


Payloads = Sequence[Buffer]


def put_payloads(
    keys: Sequence[bytes],
    payloads: Payloads,
    namespace: bytes,
    meta: Mapping[str, Any] | None,
    arena: SharedArena | None,
    reservation: Reservation | None = None,
) -> Steps[None]:
    """Store ``payloads`` as the chunks ``keys`` (those of ``reservation``, if one announced
    them). On the node's host each payload is copied into its slot and checksummed in the
    same pass: one pass over the bytes, no socket. Else: records built here, sent as frames."""
    if arena is not None and reservation is None:
        reservation = yield reserve(keys, [memoryview(p).nbytes for p in payloads], shm=True)
    if arena is None or reservation is None or reservation.slots is None:
        records = [ChunkRecord.build(k, p, namespace, meta) for k, p in zip(keys, payloads, strict=True)]
        if reservation is None:
            yield from put_all(records)
        else:
            yield from commit(records, reservation, None)
        return
    records = []
    for key, payload, offset in zip(keys, payloads, reservation.slots, strict=True):
        slot = arena.slot(offset, memoryview(payload).nbytes)
        digest = copy_hashed(payload, slot)
        records.append(ChunkRecord(describe(key, slot.nbytes, digest, namespace, meta), slot))
    try:
        yield put_records(records, False, reservation.lease, reservation.slots)
    except MeshError:  # the lease ran out first: send the bytes instead (they verify as written)
        yield from put_all(
            [ChunkRecord.build(k, p, namespace, meta) for k, p in zip(keys, payloads, strict=True)]
        )


def put_all(
    records: Sequence[ChunkRecord], replica: bool = False, arena: SharedArena | None = None
) -> Steps[None]:
    """Store ``records`` in as many PUTs as their size needs (a batch is stored whole or not at
    all); with ``arena``, each batch is written into slots reserved for it."""
    for batch in _batches(records):
        if arena is None:
            yield put_records(batch, replica)
            continue
        reservation = yield reserve([r.key for r in batch], [r.nbytes for r in batch], shm=True)
        yield from commit(batch, reservation, arena, replica)


def _batches(records: Sequence[ChunkRecord]) -> list[list[ChunkRecord]]:
    batches: list[list[ChunkRecord]] = []
    nbytes = 0
    for record in records:
        if not batches or nbytes + record.nbytes > PUT_BATCH_BYTES or len(batches[-1]) >= PUT_BATCH_RECORDS:
            batches.append([])
            nbytes = 0
        batches[-1].append(record)
        nbytes += record.nbytes
    return batches


@dataclass(slots=True)
class Verified:
    """Records of a GET reply, each verified; ``bad`` of them failed and became misses."""

    records: list[ChunkRecord | None]
    bad: int = 0
    next: int | None = None
    """Where the node stopped because its reply was full: keys from here on were not answered."""
    shared: list[int] = field(default_factory=list)
    """Records that are views into the node's arena, not verified yet (:class:`~.shm.Lease`)."""
    leases: list[int] = field(default_factory=list)
    """The read leases those views are under."""


def get_records(
    keys: Sequence[bytes],
    local: bool = False,
    timeout_s: float | None = None,
    cost: Cost | None = None,
    arena: SharedArena | None = None,
    wire: str = "",
) -> Call[Verified]:
    """One GET; with ``arena``, payloads held in it come as views under a lease; ``wire``:
    raw float payloads re-encoded under that lossless codec for the trip."""
    if not keys:
        return _answered(Op.GET, Verified([]))

    def read(reply: Reply) -> Verified:
        records, bad, shared = read_records(reply, keys, arena.slot if arena is not None else None)
        stop, lease = reply.fields.get("next"), reply.fields.get("lease")
        valid = isinstance(stop, int) and not isinstance(stop, bool) and 0 < stop < len(keys)
        leases = [lease] if shared and isinstance(lease, int) else []
        return Verified(records, bad, stop if valid else None, shared, leases)

    fields = _keys_fields(keys, local, cost)
    if arena is not None:
        fields["shm"] = True
    if wire:
        fields["wire"] = wire
    return Call(Op.GET, fields, read, timeout_s=timeout_s)


def get_all(
    keys: Sequence[bytes],
    local: bool,
    timeout_s: float,
    cost: Cost | None = None,
    arena: SharedArena | None = None,
    wire: str = "",
) -> Steps[Verified]:
    """Every record of ``keys`` within ``timeout_s`` in all: a node answers as many as one
    reply holds (``max-request``) and says where it stopped; the rest is asked for again."""
    deadline = time.monotonic() + timeout_s
    out = Verified([])
    start = 0
    while True:
        left = max(deadline - time.monotonic(), 1e-3)
        part: Verified = yield get_records(keys[start:], local, left, cost, arena, wire)
        out.bad += part.bad
        out.leases += part.leases
        taken = len(part.records) if part.next is None else part.next
        out.records += part.records[:taken]
        out.shared += [start + i for i in part.shared if i < taken]
        if part.next is None:
            return out
        start += part.next


def lookup(
    keys: Sequence[bytes], local: bool = False, timeout_s: float | None = None, cost: Cost | None = None
) -> Call[int]:
    if not keys:
        return _answered(Op.LOOKUP, 0)
    return Call(
        Op.LOOKUP, _keys_fields(keys, local, cost), lambda r: int(r.fields["hits"]), timeout_s=timeout_s
    )


def locate(keys: Sequence[bytes], timeout_s: float | None = None) -> Call[tuple[int, list[list[str]]]]:
    if not keys:
        return _answered(Op.LOOKUP, (0, []))

    def read(reply: Reply) -> tuple[int, list[list[str]]]:
        return int(reply.fields["hits"]), _holders(reply, keys, "LOOKUP")

    return Call(Op.LOOKUP, {"keys": list(keys), "holders": True}, read, timeout_s=timeout_s)


def rank(keys: Sequence[bytes], candidates: Sequence[str]) -> Call[list[tuple[str, int]]]:
    def read(reply: Reply) -> list[tuple[str, int]]:
        return [(name, int(n)) for name, n in reply.fields["ranking"]]

    return Call(Op.RANK, {"keys": list(keys), "candidates": list(candidates)}, read)


def delete(keys: Sequence[bytes]) -> Call[int]:
    if not keys:
        return _answered(Op.DELETE, 0)
    return Call(Op.DELETE, {"keys": list(keys)}, lambda r: int(r.fields["deleted"]))


def stats() -> Call[dict[str, Any]]:
    def read(reply: Reply) -> dict[str, Any]:
        document: dict[str, Any] = reply.fields["stats"]
        return document

    return Call(Op.STATS, {}, read)


def announce_engine(engine: str, add: Sequence[bytes], remove: Sequence[bytes]) -> Call[None]:
    fields = {"holder": engine, "add": list(add), "remove": list(remove), "route": True}
    return Call(Op.ANNOUNCE, fields, _ignore)


def join(seeds: Sequence[str]) -> Call[None]:
    return Call(Op.JOIN, {"seeds": list(seeds)}, _ignore)


# peer-to-peer calls (members only)


def announce(holder: str, add: Sequence[bytes], remove: Sequence[bytes]) -> Call[None]:
    return Call(Op.ANNOUNCE, {"holder": holder, "add": list(add), "remove": list(remove)}, _ignore)


def who_has(keys: Sequence[bytes], timeout_s: float | None = None) -> Call[list[list[str]]]:
    return Call(Op.WHO_HAS, {"keys": list(keys)}, lambda r: _holders(r, keys, "WHO_HAS"), timeout_s=timeout_s)


def _holders(reply: Reply, keys: Sequence[bytes], op: str) -> list[list[str]]:
    holders = reply.fields.get("holders")
    if (
        not isinstance(holders, list)
        or len(holders) != len(keys)
        or not all(isinstance(h, list) and all(isinstance(n, str) for n in h) for h in holders)
    ):
        raise BadRequest(f"{op} reply needs one list of member names per key")
    return holders
