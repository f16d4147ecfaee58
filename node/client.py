"""Clients of a node: :class:`Client` (blocking), :class:`AsyncClient`, and :class:`PeerClient`.

Every call is written once, in :mod:`.calls` (its request and how its reply is read);
the two engine-facing clients have the same methods and differ only in how they wait:
``Client`` on a blocking socket, ``AsyncClient`` on a conduit with many calls in flight.
:class:`PeerClient` adds what only mesh members ask of each other (announcements to a
key's owner, WHO_HAS). Every payload received is checked against its record checksum; a
bad one is counted in ``checksum_failures`` and returned as a miss, never as data.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from lmcache_mesh.mesh.costs import Cost
from lmcache_mesh.mesh.errors import DeadlineExceeded, MeshError, Unavailable
from lmcache_mesh.transports.base import Conduit
from lmcache_mesh.transports.curve import CurveClient
from lmcache_mesh.transports.zmq import ZmqChannel, ZmqConduit

from . import calls
from .calls import Call, Keys, Reservation, Steps
from .protocol import decode_reply, peek_request_id, request_header
from .records import Buffer, ChunkRecord
from .shm import Lease, SharedArena

DEFAULT_TIMEOUT_S = 5.0

T = TypeVar("T")


def _payloads(records: list[ChunkRecord | None]) -> list[memoryview | None]:
    return [None if r is None else memoryview(r.payload) for r in records]


class _Core:
    """What both clients share: address, deadline, tenant, request ids, checksum counts, and
    the node's shared memory when this process can map it."""

    def __init__(
        self, address: str, timeout_s: float, tenant: str, first_id: int = 1, shm: bool = True
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.tenant = tenant
        self.checksum_failures = 0
        self.arena: SharedArena | None = None
        """The node's arena as mapped here (None: payloads travel as frames)."""
        self._shm_untried = shm
        self._ids = itertools.count(first_id)

    @property
    def transport(self) -> str:
        """How payloads travel: "shared memory" (the node's arena, mapped here) or "frames"."""
        return "shared memory" if self.arena is not None else "frames"

    def _map_arena(self, pong: dict[str, Any]) -> None:
        self._shm_untried = False
        self.arena = SharedArena.open(pong.get("shm"))

    def _count_bad(self, n: int) -> None:
        self.checksum_failures += n

    def _drive_steps(self, steps: Steps[T], run: Callable[[Call[Any]], Any]) -> T:
        """Run calls that take several requests (:data:`.calls.Steps`); a failed call is raised
        into the steps, which may answer it (fall back to frames)."""
        try:
            call = next(steps)
            while True:
                try:
                    result = run(call)
                except MeshError as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(result)
        except StopIteration as done:
            value: T = done.value
            return value

    def _header(self, call: Call[Any], rid: int, timeout: float, **extra: Any) -> bytes:
        if self.tenant:
            extra["tenant"] = self.tenant
        return request_header(call.op, rid, max(int(timeout * 1000), 1), **call.fields, **extra)

    def _timeout(self, call: Call[Any]) -> float:
        return self.timeout_s if call.timeout_s is None else call.timeout_s

    def _late(self, call: Call[Any], timeout: float) -> DeadlineExceeded:
        return DeadlineExceeded(f"no reply from {self.address} to {call.op.name} within {timeout:g} s")

    def _records(self, verified: calls.Verified) -> list[ChunkRecord | None]:
        self.checksum_failures += verified.bad
        return verified.records


class Client(_Core):
    """Blocking client of one node; thread-safe (calls are serialised).

    ``timeout_s`` bounds each call; on expiry it raises DeadlineExceeded and reconnects,
    so a reply that arrives late is never mistaken for the next one. Runs every request in
    ``tenant`` ("": the default space, or the key's own); ``curve`` for CurveZMQ on tcp://.
    On the node's host, payloads go through its shared memory (``shm=False``: always frames).
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        curve: CurveClient | None = None,
        tenant: str = "",
        shm: bool = True,
    ) -> None:
        super().__init__(address, timeout_s, tenant, shm=shm)
        self.curve = curve
        self._channel = ZmqChannel(address, curve)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Client {self.address}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._channel.close()
            if self.arena is not None:
                self.arena.close()

    def _run(self, call: Call[T]) -> T:
        if not call.needs_sending:
            return call.result
        timeout = self._timeout(call)
        with self._lock:
            if self._channel.closed:
                raise Unavailable(f"client of {self.address} is closed")
            rid = next(self._ids)
            deadline = time.monotonic() + timeout
            sent = self._channel.send([self._header(call, rid, timeout), *call.frames], deadline)
            while True:
                reply = self._channel.recv(deadline) if sent else None
                if reply is None:
                    self._channel.reset()  # drop whatever is queued or late, start clean
                    raise self._late(call, timeout)
                if peek_request_id(reply[0]) == rid:
                    return call.read(decode_reply(reply))

    def _drive(self, steps: Steps[T]) -> T:
        return self._drive_steps(steps, self._run)

    def shared_arena(self) -> SharedArena | None:
        """The node's shared memory as this process maps it (mapped now if not yet), or None."""
        return self._shared()

    def _shared(self) -> SharedArena | None:
        """The node's arena, mapped on first use if this process can (else frames from then on)."""
        if self._shm_untried:
            try:
                self._map_arena(self._run(calls.ping(shm=True)))
            except DeadlineExceeded:
                raise  # the node did not answer: the call would wait as long again
            except MeshError:
                pass  # the node cannot map memory now: try again with the next call
        return self.arena

    def _release(self, lease_ids: list[int]) -> None:
        try:
            self._run(calls.release(lease_ids))
        except MeshError:
            pass  # the leases end by themselves when their time is up

    # the engine-facing API (AsyncClient has the same methods, as coroutines)

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self._run(calls.ping(timeout_s))

    def put(
        self, key: bytes, payload: Buffer, namespace: bytes, meta: Mapping[str, Any] | None = None
    ) -> None:
        self._run(calls.put(key, payload, namespace, meta))

    def put_records(self, records: Sequence[ChunkRecord], replica: bool = False) -> None:
        """Store ``records`` (in batches of at most 64 MiB, each stored whole or not at all);
        on the node's host, written straight into its shared memory."""
        self._drive(calls.put_all(records, replica, self._shared()))

    def put_payloads(
        self,
        keys: Sequence[bytes],
        payloads: Sequence[Buffer],
        namespace: bytes,
        meta: Mapping[str, Any] | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        """Store ``payloads`` as chunks ``keys`` (of ``reservation``, if :meth:`reserve` announced
        them): on the node's host, copied into its shared memory and checksummed in one pass."""
        self._drive(calls.put_payloads(keys, payloads, namespace, meta, self._shared(), reservation))

    def reserve(self, keys: Sequence[bytes], sizes: Sequence[int]) -> Reservation:
        """Announce a save of ``keys`` (payloads of ``sizes``) before it is ready: lookups on
        the node count them at once and GETs wait for them. Land it with :meth:`commit`."""
        return self._run(calls.reserve(keys, sizes, shm=self._shared() is not None))

    def commit(self, records: Sequence[ChunkRecord], reservation: Reservation, written: bool = False) -> None:
        """Store the records of a :meth:`reserve` (into its slots, when it has them; ``written``:
        their payloads are in those slots already)."""
        self._drive(calls.commit(records, reservation, self.arena, written=written))

    def release(self, lease_ids: Sequence[int]) -> None:
        """End leases now: reads done, or reservations given up (unknown ids are ignored)."""
        self._run(calls.release(lease_ids))

    def read(
        self,
        keys: Keys,
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
        wire: str = "",
    ) -> Lease:
        """Like :meth:`get_records`, without copying: on the node's host the records are views
        into its shared memory, unchanged until the lease is released (use it as a context
        manager); verify each as it is used (:meth:`Lease.copy_into`, :meth:`Lease.payload`)."""
        steps = calls.get_all(
            keys, local, self.timeout_s if timeout_s is None else timeout_s, cost, self._shared(), wire
        )
        got = self._drive(steps)
        return Lease(self._records(got), got.shared, got.leases, self._release, self._count_bad)

    def get(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        return _payloads(self.get_records(keys))

    def get_records(
        self,
        keys: Keys,
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
        wire: str = "",
    ) -> list[ChunkRecord | None]:
        """Verified records per key, None per miss; ``local``: this node's tiers only;
        ``cost``: skip remote chunks that would take longer to fetch than to recompute;
        ``wire``: raw float payloads re-encoded under that lossless codec ("zstd") for the
        trip (their headers say so). A hit of any length comes back whole, in as many replies
        as it needs, all within ``timeout_s``."""
        with self.read(keys, local, timeout_s, cost, wire) as lease:
            return lease.kept()

    def lookup(
        self, keys: Keys, local: bool = False, timeout_s: float | None = None, cost: Cost | None = None
    ) -> int:
        """Leading ``keys`` cached: anywhere in the mesh, or on this node only with ``local``;
        with ``cost``, only as far as fetching them beats recomputing them."""
        return self._run(calls.lookup(keys, local, timeout_s, cost))

    def locate(self, keys: Sequence[bytes], timeout_s: float | None = None) -> tuple[int, list[list[str]]]:
        """Mesh-wide: the longest cached prefix and the members holding each key."""
        return self._run(calls.locate(keys, timeout_s))

    def rank(self, keys: Sequence[bytes], candidates: Sequence[str]) -> list[tuple[str, int]]:
        """``candidates`` (node names) ordered by the cached prefix of ``keys`` each holds."""
        return self._run(calls.rank(keys, candidates))

    def delete(self, keys: Sequence[bytes]) -> int:
        """Delete this node's copies (replicas elsewhere stay); returns how many were held."""
        return self._run(calls.delete(keys))

    def stats(self) -> dict[str, Any]:
        """The node's ``status --json`` document."""
        return self._run(calls.stats())

    def announce_engine(self, engine: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        """Tell the mesh that ``engine`` (attached to this node) holds ``add`` and dropped ``remove``
        in its own KV cache; the index then names it ``<node>/<engine>``."""
        self._run(calls.announce_engine(engine, add, remove))

    def join(self, seeds: Sequence[str]) -> None:
        """Make the node join the mesh that ``seeds`` (tcp:// addresses) belong to."""
        self._run(calls.join(seeds))


class AsyncClient(_Core):
    """asyncio client of one node; many calls may be in flight at once on one conduit.

    Bound to the event loop of its first call. The constructor does no I/O. ``conduit``
    makes the connection (default: ZeroMQ to ``address``, CurveZMQ with ``curve``); a conduit
    that breaks fails the calls waiting on it and is made afresh by the next call.
    """

    _scoped = False
    _shm = True

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        conduit: Callable[[], Conduit] | None = None,
        curve: CurveClient | None = None,
        tenant: str = "",
    ) -> None:
        # Random start: a later client on the same connection (a WebRTC link outlives its
        # clients) must never take a late reply to an earlier client's request for its own.
        shm = self._shm and conduit is None  # a WebRTC link reaches another host
        super().__init__(address, timeout_s, tenant, first_id=random.getrandbits(48) + 1, shm=shm)
        self._make_conduit = conduit or (lambda: ZmqConduit(address, curve))
        self._releasing: set[asyncio.Task[None]] = set()
        self._conduit: Conduit | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[list[Buffer]]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address} inflight={len(self._pending)}>"

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
        if self.arena is not None:
            self.arena.close()

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

    async def _drive(self, steps: Steps[T]) -> T:
        """Run calls that take several requests (as :meth:`_Core._drive_steps`, awaiting each)."""
        try:
            call = next(steps)
            while True:
                try:
                    result = await self._run(call)
                except MeshError as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(result)
        except StopIteration as done:
            value: T = done.value
            return value

    async def _shared(self) -> SharedArena | None:
        if self._shm_untried:
            try:
                self._map_arena(await self._run(calls.ping(shm=True)))
            except DeadlineExceeded:
                raise  # as Client._shared
            except MeshError:
                pass
        return self.arena

    def _release(self, lease_ids: list[int]) -> None:
        async def release() -> None:
            try:
                await self._run(calls.release(lease_ids))
            except MeshError:
                pass  # the leases end by themselves when their time is up

        task = asyncio.get_running_loop().create_task(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _run(self, call: Call[T]) -> T:
        if not call.needs_sending:
            return call.result
        if self._closed:
            raise Unavailable(f"client of {self.address} is closed")
        if self._conduit is None:
            conduit = self._conduit = self._make_conduit()
            self._reader = asyncio.create_task(
                self._read_replies(conduit), name=f"lmcache-client-{self.address}"
            )
        timeout = self._timeout(call)
        rid = next(self._ids)
        fut: asyncio.Future[list[Buffer]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        conduit = self._conduit
        header = self._header(call, rid, timeout, **({"scoped": True} if self._scoped else {}))

        async def send_and_wait() -> list[Buffer]:
            await conduit.send([header, *call.frames])
            return await fut

        try:
            reply = await asyncio.wait_for(send_and_wait(), timeout)
        except asyncio.TimeoutError:
            raise self._late(call, timeout) from None
        finally:
            self._pending.pop(rid, None)
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # failed while the send failed too: seen, so asyncio does not warn
        return call.read(decode_reply(reply))

    # the engine-facing API: the same methods as Client's

    async def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._run(calls.ping(timeout_s))

    async def put(
        self, key: bytes, payload: Buffer, namespace: bytes, meta: Mapping[str, Any] | None = None
    ) -> None:
        await self._run(calls.put(key, payload, namespace, meta))

    async def put_records(self, records: Sequence[ChunkRecord], replica: bool = False) -> None:
        await self._drive(calls.put_all(records, replica, await self._shared()))

    async def put_payloads(
        self,
        keys: Sequence[bytes],
        payloads: Sequence[Buffer],
        namespace: bytes,
        meta: Mapping[str, Any] | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        steps = calls.put_payloads(keys, payloads, namespace, meta, await self._shared(), reservation)
        await self._drive(steps)

    async def reserve(self, keys: Sequence[bytes], sizes: Sequence[int]) -> Reservation:
        return await self._run(calls.reserve(keys, sizes, shm=await self._shared() is not None))

    async def commit(
        self, records: Sequence[ChunkRecord], reservation: Reservation, written: bool = False
    ) -> None:
        await self._drive(calls.commit(records, reservation, self.arena, written=written))

    async def release(self, lease_ids: Sequence[int]) -> None:
        await self._run(calls.release(lease_ids))

    async def read(
        self,
        keys: Keys,
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
        wire: str = "",
    ) -> Lease:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        got = await self._drive(calls.get_all(keys, local, timeout, cost, await self._shared(), wire))
        return Lease(self._records(got), got.shared, got.leases, self._release, self._count_bad)

    async def shared_arena(self) -> SharedArena | None:
        """The node's shared memory as this process maps it (mapped now if not yet), or None."""
        return await self._shared()

    async def get(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        return _payloads(await self.get_records(keys))

    async def get_records(
        self,
        keys: Keys,
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
        wire: str = "",
    ) -> list[ChunkRecord | None]:
        with await self.read(keys, local, timeout_s, cost, wire) as lease:
            return lease.kept()

    async def lookup(
        self, keys: Keys, local: bool = False, timeout_s: float | None = None, cost: Cost | None = None
    ) -> int:
        return await self._run(calls.lookup(keys, local, timeout_s, cost))

    async def locate(
        self, keys: Sequence[bytes], timeout_s: float | None = None
    ) -> tuple[int, list[list[str]]]:
        return await self._run(calls.locate(keys, timeout_s))

    async def rank(self, keys: Sequence[bytes], candidates: Sequence[str]) -> list[tuple[str, int]]:
        return await self._run(calls.rank(keys, candidates))

    async def delete(self, keys: Sequence[bytes]) -> int:
        return await self._run(calls.delete(keys))

    async def stats(self) -> dict[str, Any]:
        return await self._run(calls.stats())

    async def announce_engine(self, engine: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        await self._run(calls.announce_engine(engine, add, remove))

    async def join(self, seeds: Sequence[str]) -> None:
        await self._run(calls.join(seeds))


class PeerClient(AsyncClient):
    """A mesh member's client of another member (:class:`lmcache_mesh.mesh.ports.Peer`).

    Its keys are already in the node key space (see :mod:`.tenants`), so every request says
    ``scoped``; only a node's key may send those.
    """

    _scoped = True
    _shm = False  # members keep their own memory; what they send each other goes as frames

    async def announce(self, holder: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        """Tell a key's owner that ``holder`` now holds ``add`` and dropped ``remove``."""
        await self._run(calls.announce(holder, add, remove))

    async def who_has(self, keys: Sequence[bytes], timeout_s: float | None = None) -> list[list[str]]:
        """Which members the owner knows to hold each key."""
        return await self._run(calls.who_has(keys, timeout_s))
