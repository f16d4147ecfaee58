"""NodeServer: serves a Node's API over ZeroMQ ROUTER sockets (tcp:// and ipc://).

Each request is decoded and validated in full before anything changes: a malformed
header, an unknown version or op, an oversize record or a checksum mismatch gets a typed
error reply and leaves the node as it was. Then the sender is admitted: with a keyring,
tcp:// connections are CurveZMQ-encrypted and only allow-listed keys get in at all; each
key's role says which operations it may use and its tenant which keys it sees
(:mod:`.tenants`). ipc:// sockets are owner-only files and trusted.

Memory-tier work runs on the event loop; disk reads, deletes and mesh work run in tasks,
bounded per connection (requests and bytes in flight) and in total: past a bound the
sender gets BUSY at once, so an engine never waits past its deadline for a full node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lmcache_mesh.mesh.cluster import Cluster
from lmcache_mesh.mesh.coordinator import MeshCoordinator
from lmcache_mesh.mesh.errors import (
    BadRequest,
    ChecksumMismatch,
    DeadlineExceeded,
    Forbidden,
    InternalError,
    MeshError,
    Unavailable,
)
from lmcache_mesh.transports.relay import RelayTable
from lmcache_mesh.transports.seal import HeaderSeal, strip_seal
from lmcache_mesh.transports.webrtc import Signal
from lmcache_mesh.transports.zmq import ZmqRouter

from .admission import Job, admit
from .endpoints import Routers
from .flow import TRACKED_REPLY_BYTES, FlowControl
from .keyring import ANONYMOUS, TRUSTED, Keyring, Principal, Role, Sender
from .node import Node
from .protocol import Limits, Op, error_reply, ok_reply, peek_request_id
from .records import Buffer, ChunkRecord, RecordHeader
from .requests import (
    Announce,
    Attach,
    Body,
    Delete,
    Get,
    Join,
    Lookup,
    Mesh,
    Ping,
    Put,
    Rank,
    Relay,
    Release,
    Request,
    Reserve,
    SignalBody,
    Stats,
    WhoHas,
    decode_request,
)
from .sharing import Sharing
from .tenants import client_records
from .wirecodec import for_reply

logger = logging.getLogger(__name__)

Observer = Callable[[str, str, float], None]
"""Called after each request with (op name, outcome, seconds); must not block."""

Reply = list[Any]
"""A reply's frames: its header, then payload frames."""

ReplyTo = Callable[[Sequence[Any]], Awaitable[None]]
"""Sends a reply (frames) back to whoever sent the request: a ROUTER peer or a WebRTC link."""


def _relayable(frames: Sequence[Buffer], limits: Limits) -> bool:
    """Only membership datagrams and WebRTC signaling travel through a relay."""
    return _peek_op(frames, limits) in (Op.MESH, Op.SIGNAL)


async def _no_reply(frames: Sequence[Any]) -> None:
    """For messages relayed to us: they are one-way, nobody waits for an answer."""


FROM_MEMBER = Sender()

ONE_WAY_OPS = frozenset({Op.MESH, Op.RELAY, Op.SIGNAL})


@dataclass(frozen=True)
class MeshParts:
    """What a node in a mesh serves with, besides its own tiers."""

    cluster: Cluster
    coordinator: MeshCoordinator[ChunkRecord]
    on_signal: Callable[[Signal], None] | None = None
    """Takes WebRTC SIGNAL messages (None: no WebRTC here)."""
    sections: Mapping[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    """More sections of ``status`` under "mesh" (WebRTC links, the relay we use)."""


REPLY_MARGIN_FRACTION = 0.1
REPLY_MARGIN_MAX_S = 0.25
"""A request's work (peers asked, disk read) ends this much before its deadline: a tenth of
its timeout, at most 250 ms, left for the reply to reach the asker."""


class NodeServer:
    """Serves ``node`` on its :class:`Routers` (by default those of ``node.config.listen``)
    until :meth:`stop`; in a mesh with ``mesh``. The constructor does no I/O."""

    def __init__(
        self,
        node: Node,
        observe: Observer | None = None,
        keyring: Keyring | None = None,
        routers: Routers | None = None,
        mesh: MeshParts | None = None,
    ) -> None:
        cfg = node.config
        self.node = node
        self.keyring = keyring
        self.mesh = mesh
        self.limits = Limits(
            cfg.limits.max_header_bytes,
            cfg.limits.max_record_bytes,
            cfg.limits.max_keys_per_request,
            cfg.limits.max_request_bytes,
        )
        self.routers = routers or Routers(cfg, keyring)
        self._public, self._local = self.routers.public, self.routers.local
        self.coordinator = mesh.coordinator if mesh is not None else None
        self._observe = observe
        self.flow = FlowControl(cfg.limits)
        """Slots and queued reply bytes per party (a client's key, or a connection): BUSY past them."""
        self.busy = 0
        self.forbidden = 0
        secret = cfg.webrtc.mesh_secret.encode()
        self.seal = HeaderSeal(secret) if keyring is None and secret else None
        """Without CurveZMQ, a mesh secret: a tcp:// request is a member's only if its header
        is sealed with it."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_tasks: list[asyncio.Task[None]] = []
        self.relay = RelayTable()
        """Nodes behind NAT that reach the mesh through us."""
        self.sharing = Sharing(cfg, node.lookup)
        """Shared-memory reads engines hold, saves announced but not landed, reply sizes."""
        self._handlers: dict[type[Body], Callable[[Any, float], Awaitable[Reply]]] = {
            Ping: self._ping,
            Put: self._put,
            Get: self._get,
            Lookup: self._lookup,
            Delete: self._delete,
            WhoHas: self._who_has,
            Announce: self._announce,
            Rank: self._rank,
            Stats: self._stats,
            Attach: self._attach_elsewhere,
            Join: self._join,
            Reserve: self._reserve,
            Release: self._release,
        }
        """How each request type is answered (one-way ones go to :meth:`_one_way`)."""

    def __repr__(self) -> str:
        return f"<NodeServer {self.node.config.name} {self._public!r} {self._local!r} inflight={len(self._tasks)}>"

    @property
    def auth_denied(self) -> int:
        """Connections refused because their key is not allowed."""
        zap = self._public.zap if self._public is not None else None
        return zap.denied if zap is not None else 0

    def security_stats(self) -> dict[str, Any]:
        config = self.node.config
        out: dict[str, Any] = {
            "curve": self.keyring is not None,
            "connections_refused": self.auth_denied,
            "forbidden": self.forbidden,
            "busy": self.busy,
            # what a member proves itself with on gossip (and index/repair requests)
            "membership_proof": "curve"
            if self.keyring is not None
            else "mesh secret"
            if self.seal
            else "none",
            "bad_seals": self.seal.rejected if self.seal is not None else 0,
            "insecure": config.security.insecure,
        }
        if self.keyring is not None:
            out["key"] = self.keyring.keys.public
            out["allowed_keys"] = self.keyring.count()
        return out

    def status(self) -> dict[str, Any]:
        """The ``status --json`` document: the node's own part, its mesh, its security."""
        doc = self.node.stats()
        if self.mesh is not None:
            membership = self.mesh.cluster.membership
            doc["members"] = self.mesh.cluster.members_status()
            doc["mesh"] = {
                "membership": dict(membership.counters),
                "awareness": membership.awareness,
                **self.mesh.coordinator.stats(),
                **{name: section() for name, section in self.mesh.sections.items()},
            }
            if not self.node.config.mesh.nat:  # nodes behind NAT may attach to us
                doc["mesh"]["relaying"] = {"attached": self.relay.names(), "forwarded": self.relay.forwarded}
        doc["security"] = self.security_stats()
        memory = doc["tiers"]["memory"]
        if "shared" in memory:
            memory["shared"]["leases"] = self.sharing.leases.stats()
        else:
            memory["shared"] = {"off": self.node.shm_off_reason or "the node is not open"}
        return doc

    async def start(self) -> list[str]:
        """Bind every endpoint (unless bound already) and start answering; returns the bound addresses."""
        bound = self.routers.bind()
        self.node.addresses = list(bound)
        self._loop_tasks = [
            asyncio.create_task(self._serve(r), name="lmcache-node-serve") for r in self.routers.all()
        ]
        return bound

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop reading, let requests in flight finish (up to ``grace_s``), close the sockets."""
        for task in self._loop_tasks:
            task.cancel()
        await asyncio.gather(*self._loop_tasks, return_exceptions=True)
        self._loop_tasks = []
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        self.routers.close()

    async def _serve(self, router: ZmqRouter) -> None:
        public = router is self._public
        while True:
            peer, frames, user, source = await router.recv()
            principal: Principal | None = TRUSTED
            buffers = [f.buffer for f in frames]
            if buffers and public and router.curve is None:
                if self.seal is not None:
                    buffers[0], proven = self.seal.open(buffers[0])
                    principal = TRUSTED if proven else ANONYMOUS
                else:
                    buffers[0] = strip_seal(buffers[0])  # a seal we cannot check: an open mesh
            if router.curve is not None:
                # No User-Id cannot happen past the handshake; if it did, nothing is served.
                principal = self.keyring.principal(user) if self.keyring is not None and user else None
            if principal is None:
                # Admitted, but the key left the allow-list since (reloaded): nothing more.
                self.forbidden += 1
                self.node.count_error("FORBIDDEN")
                continue
            # Limits count per key for clients (however many connections they open); without
            # keys per sending host on tcp:// (connections add up), per connection on ipc://.
            party: Hashable
            if user is not None and principal.role is not Role.NODE:
                party = principal.name
            elif user is None and source is not None:
                party = ("host", source)
            else:
                party = (public, peer)
            sender = Sender(principal, peer if public else None, party)
            await self.take(buffers, self._replier(router, peer, party), sender)

    def _replier(self, router: ZmqRouter, peer: bytes, party: Hashable) -> ReplyTo:
        """Sends a reply to ``peer``; large ones are tracked until libzmq has sent them, so
        the bytes queued for one party stay bounded."""

        async def reply(frames: Sequence[Any]) -> None:
            nbytes = sum(len(f) for f in frames[1:])
            if nbytes < TRACKED_REPLY_BYTES:
                await router.send(peer, frames)
                return
            # GETs admitted together may each pass the check before any reply is queued:
            # the reply itself must fit too (a read: nothing is lost by answering BUSY).
            busy = self.flow.reply_over_limit(party, nbytes)
            if busy is not None:
                self.busy += 1
                await router.send(peer, [error_reply(peek_request_id(frames[0]), busy)])
                return
            self.flow.sent(party, await router.send(peer, frames, track=True), nbytes)

        return reply

    async def take(self, buffers: list[Buffer], reply_to: ReplyTo, sender: Sender = FROM_MEMBER) -> None:
        """Handle one message from a ROUTER peer, a WebRTC link (a proven member), or our
        relay (``reply_to`` drops the reply)."""
        try:
            await self._take(buffers, reply_to, sender)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in one request must not stop the node serving the rest
            logger.exception("x internal error taking a request")
            self.node.count_error("INTERNAL")

    async def take_relayed(self, buffers: list[Buffer]) -> None:
        """A one-way message our relay forwarded to us (we are behind NAT): membership
        datagrams and signaling only — anything else would bypass the WebRTC membership proof."""
        if _relayable(buffers, self.limits):
            await self.take(buffers, _no_reply, FROM_MEMBER)
        else:
            self.node.count_error("RELAYED_NOT_ALLOWED")

    async def _take(self, buffers: list[Buffer], reply_to: ReplyTo, sender: Sender) -> None:
        received = time.monotonic()
        self.sharing.tick(received)
        job: Job[Any] | MeshError
        try:
            job = admit(decode_request(buffers, self.limits), sender)
        except MeshError as exc:
            job = exc
        if isinstance(job, Forbidden):
            self.forbidden += 1
        if isinstance(job, Job) and job.op in ONE_WAY_OPS:
            self._one_way(job.request, sender.peer)  # gossip, forwarding and signaling get no reply
        elif isinstance(job, Forbidden) and _peek_op(buffers, self.limits) in ONE_WAY_OPS:
            self.node.count_error("FORBIDDEN")  # nobody waits for an answer
        elif isinstance(job, Job) and isinstance(job.body, Attach) and sender.peer is not None:
            await reply_to([self._attach(job.request.id, job.body, sender.peer)])
        elif isinstance(job, Job):
            wait, local_hits = self._may_wait(job)
            if local_hits is not None:
                job = replace(job, local_hits=local_hits)
            busy = self.flow.over_limit(job.party, wait, replies_bytes=job.op is Op.GET)
            if busy is not None:
                self.busy += 1
                await self._answer(reply_to, buffers, busy, received)
            elif wait:
                self.flow.hold(job.party)
                task = asyncio.create_task(self._answer_in_slot(reply_to, buffers, job, received))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:  # memory-only work never blocks: answering inline saves a task per request
                await self._answer(reply_to, buffers, job, received)
        else:
            await self._answer(reply_to, buffers, job, received)

    def _attach(self, rid: int, body: Attach, peer: bytes) -> bytes:
        if self.relay.attach(body.name, peer, body.token):
            return ok_reply(rid, relay=self.node.name)
        error = Unavailable(f"name {body.name!r} is attached elsewhere, or this relay is full")
        return error_reply(rid, error)

    def _one_way(self, req: Request[Any], peer: bytes | None) -> None:
        body = req.body
        if isinstance(body, Mesh):
            if self.mesh is None:
                self.node.count_error("MESH_WITHOUT_CLUSTER")
            else:
                self.mesh.cluster.on_datagram(body.sender, bytes(req.payloads[0]))
        elif isinstance(body, Relay):
            target = self.relay.identity(body.to) if peer is not None else None
            if target is None:
                self.node.count_error("RELAY_UNKNOWN_TARGET")
            elif not _relayable(req.payloads, self.limits):
                self.node.count_error("RELAY_NOT_ALLOWED")
            else:
                self.relay.forwarded += 1
                assert self._public is not None  # attached over it
                task = asyncio.create_task(self._public.send(target, req.payloads))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        elif self.mesh is None or self.mesh.on_signal is None:
            self.node.count_error("SIGNAL_WITHOUT_WEBRTC")
        elif isinstance(body, SignalBody):
            self.mesh.on_signal(body.signal)

    def _may_wait(self, job: Job[Any]) -> tuple[bool, int | None]:
        """Whether answering may wait (disk, peers): such requests get a task and a slot;
        and, for a LOOKUP, its hits here (so they are counted once)."""
        body = job.body
        if isinstance(body, (Delete, Rank)):
            return True, None
        if isinstance(body, Get):
            return self.sharing.pending(body.keys) or not self.node.store.in_memory(body.keys), None
        if isinstance(body, Lookup):
            mesh_wide = self._mesh_wide(body.local)
            if not mesh_wide or body.holders:
                return mesh_wide, None
            # A chain cached here entirely needs no peer: answer inline.
            hits = self.sharing.hits_here(body.keys)
            return hits < len(body.keys), hits
        return False, None

    def _mesh_wide(self, local: bool) -> bool:
        c = self.coordinator
        return c is not None and not local and c.mesh_wide

    async def _answer_in_slot(
        self, reply_to: ReplyTo, buffers: list[Any], job: Job[Any], received: float
    ) -> None:
        try:
            await self._answer(reply_to, buffers, job, received)
        finally:
            self.flow.release(job.party)

    async def _answer(
        self, reply_to: ReplyTo, buffers: list[Any], job: Job[Any] | MeshError, received: float
    ) -> None:
        op_name = job.op.name if isinstance(job, Job) else "INVALID"
        outcome = "ok"
        try:
            if isinstance(job, MeshError):
                raise job
            timeout_s = job.request.timeout_ms / 1000.0
            deadline = received + timeout_s
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"request {job.request.id} waited past its {job.request.timeout_ms} ms deadline"
                )
            # Answer with what we have a little before the asker gives up, so that a slow
            # peer costs it a miss, never a DeadlineExceeded: the reply has to travel too.
            answer_by = deadline - min(REPLY_MARGIN_MAX_S, REPLY_MARGIN_FRACTION * timeout_s)
            reply = await self._handlers[type(job.body)](job, answer_by)
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

    # the handlers: one per request type (one-way ones are in _one_way)

    async def _ping(self, job: Job[Ping], deadline: float) -> Reply:
        arena = self.node.store.arena
        shm = {"shm": arena.describe()} if job.body.shm and arena is not None else {}
        return [ok_reply(job.request.id, **self.node.ping(), **shm)]

    async def _put(self, job: Job[Put], deadline: float) -> Reply:
        # Verify every record before storing any: a bad one means nothing changes.
        try:
            records = self.sharing.put_records(job.body, job.request.payloads)
        except ChecksumMismatch:
            self.node.checksum_failures += 1
            raise
        self.node.put_records(records)
        if job.tenant is not None:
            self.node.count_tenant(job.tenant, puts=len(records))
        if self.coordinator is not None:
            self.coordinator.directory.stored(records, replicate=not job.body.replica)
        return [ok_reply(job.request.id, stored=len(records))]

    async def _get(self, job: Job[Get], deadline: float) -> Reply:
        keys = job.body.keys
        await self.sharing.until_landed(keys, deadline)
        if self.node.store.in_memory(keys):
            found = self.node.get_records(keys)
        else:
            found = await self._in_thread(self.node.get_records, keys, deadline=deadline, party=job.party)
        if self.coordinator is not None and self._mesh_wide(job.body.local) and None in found:
            found = await self.coordinator.reads.get(keys, found, deadline, job.body.cost)
        if job.body.wire and not job.body.shm and job.tenant is None:  # a member over a slow link
            found = await self._wire(found, job.body.wire, deadline, job.party)
        tenant = job.tenant
        if tenant is None:  # a member's request: keys and records as stored
            headers: list[RecordHeader | None] = [None if r is None else r.header for r in found]
        else:
            assert job.client_keys is not None
            headers = client_records(found, job.client_keys, tenant)
            found = [r if h is not None else None for r, h in zip(found, headers, strict=True)]
        if tenant is not None:
            self.node.count_tenant(tenant, gets=len(keys), hits=sum(r is not None for r in found))
        return self.sharing.get_reply(job.request.id, found, headers, job.party, job.body.shm)

    async def _wire(
        self, found: list[ChunkRecord | None], codec: str, deadline: float, party: Hashable
    ) -> list[ChunkRecord | None]:
        """``found`` re-encoded for the trip, or as stored if that would miss the deadline."""
        try:
            out, saved = await self._in_thread(
                for_reply, found, codec, self.sharing.max_reply_bytes, deadline=deadline, party=party
            )
        except DeadlineExceeded:
            return found  # an optimisation must never cost the fetch
        self.node.count_wire(saved)
        return list(out)

    async def _lookup(self, job: Job[Lookup], deadline: float) -> Reply:
        reply, hits = await self._lookup_hits(job, deadline)
        if job.tenant is not None:  # a client's (a member's lookups are the mesh's own work)
            self.node.count_lookup(len(job.body.keys), hits)
        return reply

    async def _lookup_hits(self, job: Job[Lookup], deadline: float) -> tuple[Reply, int]:
        body, rid = job.body, job.request.id
        mesh_wide = self.coordinator is not None and self._mesh_wide(body.local)
        if body.holders and mesh_wide:
            assert self.coordinator is not None
            hits, holders = await self.coordinator.reads.lookup(body.keys, deadline, body.cost)
            return [ok_reply(rid, hits=hits, holders=holders)], hits
        hits = self.sharing.hits_here(body.keys) if job.local_hits is None else job.local_hits
        if hits < len(body.keys) and mesh_wide:
            assert self.coordinator is not None
            # Only the part of the chain not cached here needs the owners.
            more, _ = await self.coordinator.reads.lookup(body.keys[hits:], deadline, body.cost)
            hits += more
        if body.holders:
            holders = [[self.node.name]] * hits + [[] for _ in body.keys[hits:]]
            return [ok_reply(rid, hits=hits, holders=holders)], hits
        return [ok_reply(rid, hits=hits)], hits

    async def _delete(self, job: Job[Delete], deadline: float) -> Reply:
        deleted = await self._in_thread(self.node.delete, job.body.keys, deadline=None)
        if self.coordinator is not None:
            self.coordinator.directory.removed(job.body.keys)
        return [ok_reply(job.request.id, deleted=deleted)]

    async def _who_has(self, job: Job[WhoHas], deadline: float) -> Reply:
        keys = job.body.keys
        holders = self.coordinator.directory.who_has(keys) if self.coordinator else [[] for _ in keys]
        return [ok_reply(job.request.id, holders=holders)]

    async def _announce(self, job: Job[Announce], deadline: float) -> Reply:
        f = job.body
        if self.coordinator is None:
            if f.route:
                raise Unavailable("this node is in no mesh (no tcp:// endpoint): it keeps no prefix index")
        elif f.route:
            self.coordinator.directory.engine_announced(f.holder, f.add, f.remove)
        else:
            self.coordinator.directory.on_announce(f.holder, f.add, f.remove)
        return [ok_reply(job.request.id)]

    async def _rank(self, job: Job[Rank], deadline: float) -> Reply:
        keys, candidates = job.body.keys, job.body.candidates
        if self.coordinator is not None:
            ranking = await self.coordinator.reads.rank(keys, candidates, deadline)
        else:
            n = self.node.lookup(keys)
            ranking = sorted(((c, n if c == self.node.name else 0) for c in candidates), key=lambda r: -r[1])
        return [ok_reply(job.request.id, ranking=[list(r) for r in ranking])]

    async def _stats(self, job: Job[Stats], deadline: float) -> Reply:
        return [ok_reply(job.request.id, stats=self.status())]

    async def _reserve(self, job: Job[Reserve], deadline: float) -> Reply:
        body = job.body
        slots: list[memoryview] | None = None
        if body.shm and self.sharing.leases.room(job.party, sum(body.sizes)):
            reserve = self.node.store.reserve_slots
            slots = await self._in_thread(reserve, body.sizes, deadline=deadline, party=job.party)
        return [self.sharing.reservation_reply(job.request.id, job.party, body.keys, slots)]

    async def _release(self, job: Job[Release], deadline: float) -> Reply:
        return [ok_reply(job.request.id, released=self.sharing.leases.release(job.body.leases))]

    async def _attach_elsewhere(self, job: Job[Attach], deadline: float) -> Reply:
        raise BadRequest("ATTACH is only accepted over a ZeroMQ connection")

    async def _join(self, job: Job[Join], deadline: float) -> Reply:
        if self.mesh is None:
            raise Unavailable("this node runs without a mesh")
        self.mesh.cluster.join(job.body.seeds)
        return [ok_reply(job.request.id, seeds=job.body.seeds)]

    async def _in_thread(
        self, fn: Callable[..., Any], *args: Any, deadline: float | None, party: Hashable = None
    ) -> Any:
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        if deadline is None:
            return await work  # a delete must finish once started: nothing half-done
        try:
            return await asyncio.wait_for(asyncio.shield(work), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            # The thread cannot be stopped: it keeps its party's slot until it ends, so
            # requests that time out cannot pile up reads without bound.
            self.flow.hold(party)
            work.add_done_callback(lambda _: self.flow.release(party))
            raise DeadlineExceeded("deadline passed while reading from disk") from None


def _peek_op(buffers: Sequence[Buffer], limits: Limits) -> Op | None:
    """The op of a message that decodes in full (None if it does not)."""
    try:
        return decode_request(buffers, limits).op
    except MeshError:
        return None
