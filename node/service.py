"""NodeServer: serves a Node's API over ZeroMQ ROUTER sockets (tcp:// and ipc://).

Each request is decoded and validated in full before anything changes: a malformed
header, an unknown version or op, an oversize record or a checksum mismatch gets a typed
error reply and leaves the node as it was. Memory-tier work runs on the event loop; disk
reads and deletes run in worker threads, bounded by the request's deadline.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from lmcache_mesh.transports import ZmqRouter

from .coordinator import MeshCoordinator
from .errors import BadRequest, ChecksumMismatch, DeadlineExceeded, InternalError, MeshError, Unavailable
from .node import Node
from .protocol import Limits, Op, Request, decode_request, error_reply, ok_reply, peek_request_id
from .records import Buffer, ChunkRecord
from .relay import RelayTable

if TYPE_CHECKING:
    from .peering import WebRTCPeering

logger = logging.getLogger(__name__)

Observer = Callable[[str, str, float], None]
"""Called after each request with (op name, outcome, seconds); must not block."""

ReplyTo = Callable[[Sequence[Any]], Awaitable[None]]
"""Sends a reply (frames) back to whoever sent the request: a ROUTER peer or a WebRTC link."""


def _relayable(frames: Sequence[Buffer], limits: Limits) -> bool:
    """Only membership datagrams and WebRTC signaling travel through a relay."""
    try:
        return decode_request(frames, limits).op in (Op.MESH, Op.SIGNAL)
    except MeshError:
        return False


async def _no_reply(frames: Sequence[Any]) -> None:
    """For messages relayed to us: they are one-way, nobody waits for an answer."""


class NodeServer:
    """Binds ``node.config.listen`` and answers requests until :meth:`stop`."""

    def __init__(self, node: Node, observe: Observer | None = None) -> None:
        cfg = node.config
        self.node = node
        self.limits = Limits(
            cfg.max_header_bytes, cfg.max_record_bytes, cfg.max_keys_per_request, cfg.max_request_bytes
        )
        # Frames a little above our own limits still reach us, so they get an error reply;
        # libzmq drops the connection of a peer sending anything larger.
        self._router = ZmqRouter(
            cfg.listen, max(cfg.max_record_bytes, cfg.max_header_bytes) + FRAME_SLACK_BYTES
        )
        self._observe = observe
        self._slots = asyncio.Semaphore(cfg.max_inflight_requests)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.coordinator: MeshCoordinator | None = None
        """Set by the daemon when the node is part of a mesh."""
        self.peering: WebRTCPeering | None = None
        """Set by the daemon when the node makes WebRTC links (to or as a node behind NAT)."""
        self.relay = RelayTable()
        """Nodes behind NAT that reach the mesh through us."""

    def __repr__(self) -> str:
        return f"<NodeServer {self.node.config.name} {self._router!r} inflight={len(self._tasks)}>"

    async def start(self) -> list[str]:
        """Bind every endpoint and start answering; returns the bound addresses."""
        bound: list[str] = self._router.bind()
        self.node.addresses = bound
        self._loop_task = asyncio.create_task(self._serve(), name="lmcache-node-serve")
        return bound

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop reading, let requests in flight finish (up to ``grace_s``), close the sockets."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        self._router.close()

    async def _serve(self) -> None:
        while True:
            peer, frames = await self._router.recv()
            await self.take([f.buffer for f in frames], functools.partial(self._router.send, peer), peer)

    async def take(self, buffers: list[Buffer], reply_to: ReplyTo, peer: bytes | None = None) -> None:
        """Handle one message from a ROUTER peer (``peer``: its identity), a WebRTC link, or
        our relay (``reply_to`` drops the reply)."""
        try:
            await self._take(buffers, reply_to, peer)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in one request must not stop the node serving the rest
            logger.exception("x internal error taking a request")
            self.node.count_error("INTERNAL")

    async def take_relayed(self, buffers: list[Buffer]) -> None:
        """A one-way message our relay forwarded to us (we are behind NAT): membership
        datagrams and signaling only — anything else would bypass the WebRTC membership proof."""
        if _relayable(buffers, self.limits):
            await self.take(buffers, _no_reply)
        else:
            self.node.count_error("RELAYED_NOT_ALLOWED")

    async def _take(self, buffers: list[Buffer], reply_to: ReplyTo, peer: bytes | None) -> None:
        received = time.monotonic()
        request: Request | MeshError
        try:
            request = decode_request(buffers, self.limits)
        except MeshError as exc:
            request = exc
        if isinstance(request, Request) and request.op in (Op.MESH, Op.RELAY, Op.SIGNAL):
            self._one_way(request, peer)  # gossip, forwarding and signaling get no reply
        elif isinstance(request, Request) and request.op is Op.ATTACH and peer is not None:
            if self.relay.attach(request.fields["name"], peer, request.fields["token"]):
                await reply_to([ok_reply(request.id, relay=self.node.name)])
            else:
                error = Unavailable(
                    f"name {request.fields['name']!r} is attached elsewhere, or this relay is full"
                )
                await reply_to([error_reply(request.id, error)])
        elif isinstance(request, Request) and self._may_wait(request):
            await self._slots.acquire()  # when all slots are busy, we stop reading: back-pressure
            task = asyncio.create_task(self._answer_in_slot(reply_to, buffers, request, received))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            # Memory-only work never blocks: answering inline saves a task per request.
            await self._answer(reply_to, buffers, request, received)

    def _one_way(self, req: Request, peer: bytes | None) -> None:
        if req.op is Op.MESH:
            self._mesh_datagram(req)
        elif req.op is Op.RELAY:
            target = self.relay.identity(req.fields["to"]) if peer is not None else None
            if target is None:
                self.node.count_error("RELAY_UNKNOWN_TARGET")
                return
            if not _relayable(req.payloads, self.limits):
                self.node.count_error("RELAY_NOT_ALLOWED")
                return
            self.relay.forwarded += 1
            task = asyncio.create_task(self._router.send(target, req.payloads))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif self.peering is None:
            self.node.count_error("SIGNAL_WITHOUT_WEBRTC")
        else:
            self.peering.on_signal(req.fields)

    def _mesh_datagram(self, req: Request) -> None:
        cluster = self.node.cluster
        if cluster is None:
            self.node.count_error("MESH_WITHOUT_CLUSTER")
            return
        cluster.on_datagram(req.fields["from"], bytes(req.payloads[0]))

    def _may_wait(self, req: Request) -> bool:
        """True when answering may wait (disk, peers): such requests get a task and a slot."""
        if req.op in (Op.DELETE, Op.RANK):
            return True
        if req.op is Op.GET:
            return not self.node.store.in_memory(req.fields["keys"])
        if req.op is Op.LOOKUP:
            # A chain cached here entirely needs no peer: answer inline.
            if not self._mesh_wide(req) or req.fields["holders"]:
                return self._mesh_wide(req)
            req.fields["local_hits"] = self.node.lookup(req.fields["keys"])  # reused by _dispatch
            return bool(req.fields["local_hits"] < len(req.fields["keys"]))
        return False

    def _mesh_wide(self, req: Request) -> bool:
        c = self.coordinator
        return c is not None and not req.fields["local"] and c.cluster.membership.num_alive() > 1

    async def _answer_in_slot(
        self, reply_to: ReplyTo, buffers: list[Any], request: Request, received: float
    ) -> None:
        try:
            await self._answer(reply_to, buffers, request, received)
        finally:
            self._slots.release()

    async def _answer(
        self, reply_to: ReplyTo, buffers: list[Any], request: Request | MeshError, received: float
    ) -> None:
        op_name = request.op.name if isinstance(request, Request) else "INVALID"
        outcome = "ok"
        try:
            if isinstance(request, MeshError):
                raise request
            reply = await self._dispatch(request, received + request.timeout_ms / 1000.0)
        except MeshError as exc:
            outcome = exc.code.name
            self.node.count_error(exc.code.name)
            rid = peek_request_id(buffers[0], self.limits.max_header_bytes) if buffers else 0
            logger.debug("x %s request %d: %s", op_name, rid, exc)
            reply = [error_reply(rid, exc)]
        except Exception as exc:  # a bug must not take the node down
            logger.exception("x internal error answering %s", op_name)
            outcome = "INTERNAL"
            self.node.count_error("INTERNAL")
            rid = peek_request_id(buffers[0], self.limits.max_header_bytes) if buffers else 0
            reply = [error_reply(rid, InternalError(f"{type(exc).__name__}: {exc}"))]
        try:
            await reply_to(reply)
        except Exception as exc:  # the asker went away (a WebRTC link closed): nothing to do
            logger.debug("x could not send a %s reply: %s", op_name, exc)
        if self._observe is not None:
            self._observe(op_name, outcome, time.monotonic() - received)

    async def _dispatch(self, req: Request, deadline: float) -> list[Any]:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"request {req.id} waited past its {req.timeout_ms} ms deadline")
        store = self.node.store
        if req.op is Op.PING:
            return [ok_reply(req.id, **self.node.ping())]
        if req.op is Op.PUT:
            # Verify every record before storing any: a bad one means nothing changes.
            try:
                records = [
                    ChunkRecord.verified(h, _own(p))
                    for h, p in zip(req.fields["headers"], req.payloads, strict=True)
                ]
            except ChecksumMismatch:
                self.node.checksum_failures += 1
                raise
            self.node.put_records(records)
            if self.coordinator is not None:
                self.coordinator.stored(records, replicate=not req.fields["replica"])
            return [ok_reply(req.id, stored=len(records))]
        if req.op is Op.GET:
            keys = req.fields["keys"]
            if store.in_memory(keys):
                found = self.node.get_records(keys)
            else:
                found = await self._in_thread(self.node.get_records, keys, deadline=deadline)
            if self.coordinator is not None and self._mesh_wide(req) and None in found:
                found = await self.coordinator.get(keys, found, deadline, req.fields["cost"])
            headers = [None if r is None else r.header.to_wire() for r in found]
            return [ok_reply(req.id, records=headers), *(r.payload for r in found if r is not None)]
        if req.op is Op.LOOKUP:
            keys = req.fields["keys"]
            if req.fields["holders"] and self.coordinator is not None and self._mesh_wide(req):
                hits, holders = await self.coordinator.lookup(keys, deadline, req.fields["cost"])
                return [ok_reply(req.id, hits=hits, holders=holders)]
            cached = req.fields.get("local_hits")
            hits = self.node.lookup(keys) if cached is None else int(cached)
            if hits < len(keys) and self.coordinator is not None and self._mesh_wide(req):
                # Only the part of the chain not cached here needs the owners.
                more, _ = await self.coordinator.lookup(keys[hits:], deadline, req.fields["cost"])
                hits += more
            if req.fields["holders"]:
                return [
                    ok_reply(req.id, hits=hits, holders=[[self.node.name]] * hits + [[] for _ in keys[hits:]])
                ]
            return [ok_reply(req.id, hits=hits)]
        if req.op is Op.DELETE:
            deleted = await self._in_thread(self.node.delete, req.fields["keys"], deadline=None)
            if self.coordinator is not None:
                self.coordinator.removed(req.fields["keys"])
            return [ok_reply(req.id, deleted=deleted)]
        if req.op is Op.WHO_HAS:
            holders = (
                self.coordinator.who_has(req.fields["keys"])
                if self.coordinator
                else [[] for _ in req.fields["keys"]]
            )
            return [ok_reply(req.id, holders=holders)]
        if req.op is Op.ANNOUNCE:
            f = req.fields
            if self.coordinator is None:
                if f["route"]:
                    raise Unavailable(
                        "this node is in no mesh (no tcp:// endpoint): it keeps no prefix index"
                    )
            elif f["route"]:
                self.coordinator.engine_announced(f["holder"], f["add"], f["remove"])
            else:
                self.coordinator.on_announce(f["holder"], f["add"], f["remove"])
            return [ok_reply(req.id)]
        if req.op is Op.RANK:
            keys, candidates = req.fields["keys"], req.fields["candidates"]
            if self.coordinator is not None:
                ranking = await self.coordinator.rank(keys, candidates, deadline)
            else:
                n = self.node.lookup(keys)
                ranking = sorted(
                    ((c, n if c == self.node.name else 0) for c in candidates), key=lambda r: -r[1]
                )
            return [ok_reply(req.id, ranking=[list(r) for r in ranking])]
        if req.op is Op.STATS:
            return [ok_reply(req.id, stats=self.node.stats())]
        if req.op is Op.ATTACH:
            raise BadRequest("ATTACH is only accepted over a ZeroMQ connection")
        if req.op is Op.JOIN:
            if self.node.cluster is None:
                raise Unavailable("this node runs without a mesh")
            self.node.cluster.join(req.fields["seeds"])
            return [ok_reply(req.id, seeds=req.fields["seeds"])]
        raise InternalError(f"op {req.op.name} has no handler")  # pragma: no cover - Op and this table agree

    async def _in_thread(self, fn: Callable[..., Any], *args: Any, deadline: float | None) -> Any:
        work = asyncio.to_thread(fn, *args)
        if deadline is None:
            return await work  # a delete must finish once started: nothing half-done
        try:
            return await asyncio.wait_for(work, max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("deadline passed while reading from disk") from None


FRAME_SLACK_BYTES = 1 << 20
"""Frames up to this much above our limits still reach us and get a TOO_LARGE reply."""

SMALL_FRAME_BYTES = 64 << 10
"""Below this, libzmq may place a received frame inside a shared receive buffer."""


def _own(buffer: Any) -> Any:
    # Keeping a small frame would pin the whole shared buffer it sits in, so small payloads
    # are copied (cheap); large ones have a buffer of their own and are kept zero-copy.
    return bytes(buffer) if len(buffer) < SMALL_FRAME_BYTES else buffer
