"""Clients of a node over ZeroMQ: :class:`Client` (blocking) and :class:`AsyncClient`.

Both speak :mod:`.protocol` and share its request builders and reply readers; only the
waiting differs. Every payload received is checked against its record checksum; a bad
one is counted in ``checksum_failures`` and returned as a miss, never as data.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import zmq
import zmq.asyncio

from lmcache_mesh.transports import dealer
from lmcache_mesh.transports.curve import CurveClient

from .errors import BadRequest, DeadlineExceeded, Unavailable
from .protocol import (
    Cost,
    Op,
    Reply,
    decode_reply,
    get_results,
    peek_request_id,
    put_request,
    request_header,
)
from .records import Buffer, ChunkRecord

DEFAULT_TIMEOUT_S = 5.0
MAX_REPLY_FRAME_BYTES = 1 << 30  # what we accept from a node we chose to talk to


def _with_cost(fields: dict[str, Any], cost: Cost | None) -> dict[str, Any]:
    if cost is not None:
        fields["cost"] = cost.to_wire()
    return fields


def _in_tenant(fields: dict[str, Any], tenant: str) -> dict[str, Any]:
    if tenant:
        fields["tenant"] = tenant
    return fields


def _payloads(records: list[ChunkRecord | None]) -> list[memoryview | None]:
    return [None if r is None else memoryview(r.payload) for r in records]


class Client:
    """Blocking client of one node; thread-safe (calls are serialised).

    ``timeout_s`` bounds each call; on expiry it raises DeadlineExceeded and reconnects,
    so a reply that arrives late is never mistaken for the next one.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        curve: CurveClient | None = None,
        tenant: str = "",
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.checksum_failures = 0
        self.curve = curve
        self.tenant = tenant
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = dealer(self._ctx, address, MAX_REPLY_FRAME_BYTES, curve)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Client {self.address}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(0)
                self._sock = None

    def _call(
        self, op: Op, fields: dict[str, Any], frames: Sequence[Buffer] = (), timeout_s: float | None = None
    ) -> Reply:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._sock is None:
                raise Unavailable(f"client of {self.address} is closed")
            rid = next(self._ids)
            header = request_header(op, rid, max(int(timeout * 1000), 1), **_in_tenant(fields, self.tenant))
            self._sock.send_multipart([header, *frames], copy=False)
            deadline = time.monotonic() + timeout
            while True:
                remaining_ms = (deadline - time.monotonic()) * 1000
                if remaining_ms <= 0 or not self._sock.poll(int(remaining_ms) + 1):
                    # Drop whatever is queued or late on this socket and start clean.
                    self._sock.close(0)
                    self._sock = dealer(self._ctx, self.address, MAX_REPLY_FRAME_BYTES, self.curve)
                    raise DeadlineExceeded(f"no reply from {self.address} to {op.name} within {timeout:g} s")
                reply = [f.buffer for f in self._sock.recv_multipart(copy=False)]
                if peek_request_id(reply[0]) == rid:
                    return decode_reply(reply)

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self._call(Op.PING, {}, timeout_s=timeout_s).fields

    def put(
        self, key: bytes, payload: Buffer, namespace: bytes, meta: Mapping[str, Any] | None = None
    ) -> None:
        self.put_records([ChunkRecord.build(key, payload, namespace, meta)])

    def put_records(self, records: Sequence[ChunkRecord], replica: bool = False) -> None:
        if records:
            fields, frames = put_request(records)
            self._call(Op.PUT, {**fields, "replica": replica}, frames)

    def get(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        return _payloads(self.get_records(keys))

    def get_records(
        self,
        keys: Sequence[bytes],
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
    ) -> list[ChunkRecord | None]:
        """Verified records per key, None per miss; ``local``: this node's tiers only;
        ``cost``: skip remote chunks that would take longer to fetch than to recompute."""
        if not keys:
            return []
        fields = _with_cost({"keys": list(keys), "local": local}, cost)
        reply = self._call(Op.GET, fields, timeout_s=timeout_s)
        records, bad = get_results(reply, keys)
        self.checksum_failures += bad
        return records

    def lookup(
        self,
        keys: Sequence[bytes],
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
    ) -> int:
        """Leading ``keys`` cached: anywhere in the mesh, or on this node only with ``local``;
        with ``cost``, only as far as fetching them beats recomputing them."""
        if not keys:
            return 0
        fields = _with_cost({"keys": list(keys), "local": local}, cost)
        return int(self._call(Op.LOOKUP, fields, timeout_s=timeout_s).fields["hits"])

    def locate(self, keys: Sequence[bytes]) -> tuple[int, list[list[str]]]:
        """Mesh-wide: the longest cached prefix and the members holding each key."""
        if not keys:
            return 0, []
        f = self._call(Op.LOOKUP, {"keys": list(keys), "holders": True}).fields
        return int(f["hits"]), f["holders"]

    def rank(self, keys: Sequence[bytes], candidates: Sequence[str]) -> list[tuple[str, int]]:
        """``candidates`` (node names) ordered by the cached prefix of ``keys`` each holds."""
        f = self._call(Op.RANK, {"keys": list(keys), "candidates": list(candidates)}).fields
        return [(name, int(n)) for name, n in f["ranking"]]

    def delete(self, keys: Sequence[bytes]) -> int:
        return int(self._call(Op.DELETE, {"keys": list(keys)}).fields["deleted"]) if keys else 0

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._call(Op.STATS, {}).fields["stats"]
        return stats

    def announce_engine(self, engine: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        """Tell the mesh that ``engine`` (attached to this node) holds ``add`` and dropped ``remove``
        in its own KV cache; the index then names it ``<node>/<engine>``."""
        fields = {"holder": engine, "add": list(add), "remove": list(remove), "route": True}
        self._call(Op.ANNOUNCE, fields)

    def join(self, seeds: Sequence[str]) -> None:
        """Make the node join the mesh that ``seeds`` (tcp:// addresses) belong to."""
        self._call(Op.JOIN, {"seeds": list(seeds)})


class Conduit(Protocol):
    """Carries whole messages (lists of frames) to one node and back."""

    async def send(self, frames: Sequence[Buffer]) -> None: ...

    async def recv(self) -> list[Buffer]: ...

    async def aclose(self) -> None: ...


class ZmqConduit:
    """A DEALER socket on its own asyncio context (CurveZMQ with ``curve``, for tcp://)."""

    def __init__(self, address: str, curve: CurveClient | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        try:
            self._sock = dealer(self._ctx, address, MAX_REPLY_FRAME_BYTES, curve)
        except BaseException:
            self._ctx.term()
            raise

    async def send(self, frames: Sequence[Buffer]) -> None:
        await self._sock.send_multipart(list(frames), copy=False)  # may wait: queues are bounded

    async def recv(self) -> list[Buffer]:
        return [f.buffer for f in await self._sock.recv_multipart(copy=False)]

    async def aclose(self) -> None:
        self._sock.close(0)
        self._ctx.term()


class AsyncClient:
    """asyncio client of one node; many calls may be in flight at once on one conduit.

    Bound to the event loop of its first call. The constructor does no I/O. ``conduit``
    makes the connection (default: ZeroMQ to ``address``, CurveZMQ with ``curve``); a conduit
    that breaks fails the calls waiting on it and is made afresh by the next call. Both
    clients run every request in ``tenant`` ("": the default space, or the key's own).
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        conduit: Callable[[], Conduit] | None = None,
        curve: CurveClient | None = None,
        tenant: str = "",
        scoped: bool = False,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.checksum_failures = 0
        self.tenant = tenant
        self.scoped = scoped
        """A mesh member's client: keys are already in the node key space (see node.tenants)."""
        self._make_conduit = conduit or (lambda: ZmqConduit(address, curve))
        self._conduit: Conduit | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[list[Buffer]]] = {}
        # Random start: a later client on the same connection (a WebRTC link outlives its
        # clients) must never take a late reply to an earlier client's request for its own.
        self._ids = itertools.count(random.getrandbits(48) + 1)
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncClient {self.address} inflight={len(self._pending)}>"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        self._fail_pending(Unavailable(f"client of {self.address} closed"))
        if self._conduit is not None:
            conduit, self._conduit = self._conduit, None
            await conduit.aclose()

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def _read_replies(self, conduit: Conduit) -> None:
        try:
            while True:
                reply = await conduit.recv()
                fut = self._pending.get(peek_request_id(reply[0]))
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection broke: fail who waits, reconnect on the next call
            self._fail_pending(Unavailable(f"connection to {self.address} lost: {exc}"))
            if self._conduit is conduit:
                self._conduit = None
            await conduit.aclose()

    async def _call(
        self, op: Op, fields: dict[str, Any], frames: Sequence[Buffer] = (), timeout_s: float | None = None
    ) -> Reply:
        if self._closed:
            raise Unavailable(f"client of {self.address} is closed")
        if self._conduit is None:
            conduit = self._conduit = self._make_conduit()
            self._reader = asyncio.create_task(
                self._read_replies(conduit), name=f"lmcache-client-{self.address}"
            )
        timeout = self.timeout_s if timeout_s is None else timeout_s
        rid = next(self._ids)
        fut: asyncio.Future[list[Buffer]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        conduit = self._conduit

        async def send_and_wait() -> list[Buffer]:
            fields_ = {**_in_tenant(fields, self.tenant), **({"scoped": True} if self.scoped else {})}
            header = request_header(op, rid, max(int(timeout * 1000), 1), **fields_)
            await conduit.send([header, *frames])
            return await fut

        try:
            reply = await asyncio.wait_for(send_and_wait(), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"no reply from {self.address} to {op.name} within {timeout:g} s"
            ) from None
        finally:
            self._pending.pop(rid, None)
        return decode_reply(reply)

    async def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return (await self._call(Op.PING, {}, timeout_s=timeout_s)).fields

    async def put(
        self, key: bytes, payload: Buffer, namespace: bytes, meta: Mapping[str, Any] | None = None
    ) -> None:
        await self.put_records([ChunkRecord.build(key, payload, namespace, meta)])

    async def put_records(self, records: Sequence[ChunkRecord], replica: bool = False) -> None:
        if records:
            fields, frames = put_request(records)
            await self._call(Op.PUT, {**fields, "replica": replica}, frames)

    async def get(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        return _payloads(await self.get_records(keys))

    async def get_records(
        self,
        keys: Sequence[bytes],
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
    ) -> list[ChunkRecord | None]:
        if not keys:
            return []
        fields = _with_cost({"keys": list(keys), "local": local}, cost)
        reply = await self._call(Op.GET, fields, timeout_s=timeout_s)
        records, bad = get_results(reply, keys)
        self.checksum_failures += bad
        return records

    async def lookup(self, keys: Sequence[bytes], local: bool = False, cost: Cost | None = None) -> int:
        if not keys:
            return 0
        fields = _with_cost({"keys": list(keys), "local": local}, cost)
        return int((await self._call(Op.LOOKUP, fields)).fields["hits"])

    async def locate(self, keys: Sequence[bytes]) -> tuple[int, list[list[str]]]:
        if not keys:
            return 0, []
        f = (await self._call(Op.LOOKUP, {"keys": list(keys), "holders": True})).fields
        return int(f["hits"]), f["holders"]

    async def rank(self, keys: Sequence[bytes], candidates: Sequence[str]) -> list[tuple[str, int]]:
        f = (await self._call(Op.RANK, {"keys": list(keys), "candidates": list(candidates)})).fields
        return [(name, int(n)) for name, n in f["ranking"]]

    async def announce(self, holder: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        """Peer call: tell a key owner that ``holder`` now holds ``add`` and dropped ``remove``."""
        await self._call(Op.ANNOUNCE, {"holder": holder, "add": list(add), "remove": list(remove)})

    async def who_has(self, keys: Sequence[bytes], timeout_s: float | None = None) -> list[list[str]]:
        """Peer call: which members the owner knows to hold each key."""
        holders = (await self._call(Op.WHO_HAS, {"keys": list(keys)}, timeout_s=timeout_s)).fields.get(
            "holders"
        )
        if (
            not isinstance(holders, list)
            or len(holders) != len(keys)
            or not all(isinstance(h, list) and all(isinstance(n, str) for n in h) for h in holders)
        ):
            raise BadRequest("WHO_HAS reply needs one list of member names per key")
        return holders

    async def delete(self, keys: Sequence[bytes]) -> int:
        return int((await self._call(Op.DELETE, {"keys": list(keys)})).fields["deleted"]) if keys else 0

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = (await self._call(Op.STATS, {})).fields["stats"]
        return stats

    async def join(self, seeds: Sequence[str]) -> None:
        await self._call(Op.JOIN, {"seeds": list(seeds)})
