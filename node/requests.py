"""Requests as types: one frozen message class per op, and one validating decoder.

:func:`decode_request` reads the envelope (version, op, id, deadline, tenant) once, then
the op's own class reads its fields with :class:`~lmcache_mesh.transports.wire.Fields`;
everything is checked before a request exists, and nothing changes it afterwards (the
server's admission makes a new one). Wire bytes are those of :mod:`.protocol`: the class
attributes are the header's fields, under their wire names where those are not Python
names (``from`` → ``sender``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from lmcache_mesh.mesh.costs import Cost
from lmcache_mesh.mesh.errors import BadRequest, TooLarge, UnknownOp, UnsupportedVersion
from lmcache_mesh.transports.leases import LEASE_BITS
from lmcache_mesh.transports.webrtc.signaling import SIGNAL_KINDS, Signal
from lmcache_mesh.transports.wire import Fields, is_int

from .keys import KEY_BYTES
from .protocol import (
    DEFAULT_TIMEOUT_MS,
    MAX_SDP_BYTES,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    Limits,
    Op,
)
from .records import MAX_RECORD_HEADER_BYTES, TENANT_RE, Buffer, RecordHeader, unpack_map


class Body:
    """The op-specific part of a request. ``decode`` validates; instances are frozen."""

    __slots__ = ()

    op: ClassVar[Op]
    payloads: ClassVar[str] = "none"
    """What payload frames may follow: "none", "some" (one or more) or "records" (one per record)."""

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Body:
        return cls()


def _keys(f: Fields, limits: Limits, name: str = "keys") -> list[bytes]:
    keys = f.raw(name, None if name == "keys" else [])
    if not isinstance(keys, list):
        raise f.fail(name, f"a list of {KEY_BYTES}-byte keys")
    if len(keys) > limits.max_keys:
        raise TooLarge(f"{len(keys)} keys in one request exceed the limit of {limits.max_keys}")
    for k in keys:
        if not isinstance(k, bytes) or len(k) != KEY_BYTES:
            raise BadRequest(f"every key must be {KEY_BYTES} bytes, got {k!r:.60}")
    return keys


def _keyed(f: Fields, limits: Limits) -> tuple[list[bytes], bool, bool]:
    """The fields every keyed op (GET, LOOKUP, DELETE, WHO_HAS, RANK) carries, all checked
    whether the op uses them or not: its keys and its ``local`` and ``holders`` flags."""
    return _keys(f, limits), f.flag("local"), f.flag("holders")


def _cost(f: Fields) -> Cost | None:
    raw = f.raw("cost")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("field 'cost' must be a map {recompute_s, chunk_bytes}")
    seconds: Any = raw.get("recompute_s")
    nbytes: Any = raw.get("chunk_bytes")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds < 1e6:
        raise BadRequest(f"cost.recompute_s must be a positive number of seconds, got {seconds!r:.40}")
    if not is_int(nbytes) or not 0 < nbytes <= 1 << 40:
        raise BadRequest(f"cost.chunk_bytes must be a positive int, got {nbytes!r:.40}")
    return Cost(float(seconds), nbytes)


def _slots(f: Fields, count: int) -> list[int | None] | None:
    """Per record, where its payload is in the arena (None: in a frame); None without the field."""
    raw = f.raw("slots")
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != count
        or not all(s is None or (is_int(s) and 0 <= s < 1 << 48) for s in raw)
    ):
        raise f.fail("slots", f"a list of {count} arena offsets (or nil)")
    return raw


@dataclass(frozen=True, slots=True)
class Ping(Body):
    op = Op.PING
    shm: bool = False
    """The sender could use shared memory: describe this node's arena in the reply."""

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Ping:
        return cls(f.flag("shm"))


@dataclass(frozen=True, slots=True)
class Stats(Body):
    op = Op.STATS


@dataclass(frozen=True, slots=True)
class Put(Body):
    op = Op.PUT
    payloads = "records"
    headers: list[RecordHeader]
    replica: bool = False
    """The records are replicas sent by a member: store them, do not replicate them again."""
    lease: int | None = None
    """The RESERVE these records complete (its slots and its announcement)."""
    slots: list[int | None] | None = None
    """Per record, the offset of its payload in the arena (written into the lease's slots);
    None: its payload is the next frame."""

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Put:
        raw = f.raw("records")
        if not isinstance(raw, list) or not raw:
            raise BadRequest("PUT needs a non-empty list 'records' of record headers")
        if len(raw) > limits.max_keys:
            raise TooLarge(f"{len(raw)} records in one PUT exceed the limit of {limits.max_keys}")
        slots = _slots(f, len(raw))
        framed = len(raw) if slots is None else sum(s is None for s in slots)
        if framed != len(payloads):
            raise BadRequest(f"PUT has {framed} records to come in frames but {len(payloads)} payload frames")
        lease = None if f.raw("lease") is None else f.integer("lease", lo=0, hi=(1 << LEASE_BITS) - 1)
        if slots is not None and any(s is not None for s in slots) and lease is None:
            raise BadRequest("PUT with payloads in shared memory needs the 'lease' of their slots")
        headers = [RecordHeader.from_wire(h) for h in raw]
        for h in headers:
            if len(h.encode()) > MAX_RECORD_HEADER_BYTES:
                raise TooLarge(f"a record header exceeds {MAX_RECORD_HEADER_BYTES} bytes")
            if h.length > limits.max_record_bytes:
                raise TooLarge(f"record of {h.length} bytes exceeds the limit of {limits.max_record_bytes}")
        return cls(headers, f.flag("replica"), lease, slots)


@dataclass(frozen=True, slots=True)
class KeysBody(Body):
    """A request about a chain of keys."""

    keys: list[bytes]

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> KeysBody:
        keys, _, _ = _keyed(f, limits)
        return cls(keys)


@dataclass(frozen=True, slots=True)
class Get(Body):
    op = Op.GET
    keys: list[bytes]
    local: bool = False
    """This node's tiers only (no peers)."""
    cost: Cost | None = None
    """Fetch remote chunks only while that beats recomputing them."""
    shm: bool = False
    """The sender mapped this node's arena: answer with slots under a lease, not frames."""
    wire: str = ""
    """Re-encode raw float payloads under this lossless codec for the trip ("zstd"; "": as
    stored). Asked by nodes fetching over slow links (``wire_codec``)."""

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Get:
        keys, local, _ = _keyed(f, limits)
        wire = f.raw("wire", "")
        if wire not in ("", "zstd"):
            raise f.fail("wire", "'zstd' or absent", wire, width=40)
        return cls(keys, local, _cost(f), f.flag("shm"), wire)


@dataclass(frozen=True, slots=True)
class Lookup(Body):
    op = Op.LOOKUP
    keys: list[bytes]
    local: bool = False
    holders: bool = False
    """Answer who holds each key too."""
    cost: Cost | None = None

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Lookup:
        return cls(*_keyed(f, limits), _cost(f))


@dataclass(frozen=True, slots=True)
class Delete(KeysBody):
    op = Op.DELETE


@dataclass(frozen=True, slots=True)
class WhoHas(KeysBody):
    op = Op.WHO_HAS


@dataclass(frozen=True, slots=True)
class Rank(Body):
    op = Op.RANK
    keys: list[bytes]
    candidates: list[str]

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Rank:
        keys, _, _ = _keyed(f, limits)
        return cls(keys, f.strings("candidates"))


@dataclass(frozen=True, slots=True)
class Announce(Body):
    op = Op.ANNOUNCE
    holder: str
    add: list[bytes] = field(default_factory=list)
    remove: list[bytes] = field(default_factory=list)
    route: bool = False
    """The holder is an engine attached to the receiving node, which routes the keys to
    their owners; otherwise the receiver is an owner and records them."""

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Announce:
        holder = f.string("holder", 255)
        add, remove, route = _keys(f, limits, "add"), _keys(f, limits, "remove"), f.flag("route")
        if route and "/" in holder:
            raise BadRequest("an engine name must not contain '/'")
        return cls(holder, add, remove, route)


@dataclass(frozen=True, slots=True)
class Reserve(Body):
    op = Op.RESERVE
    keys: list[bytes]
    sizes: list[int] = field(default_factory=list)
    """Payload bytes per key: with ``shm``, a slot of that size is reserved for each."""
    shm: bool = False

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Reserve:
        keys = _keys(f, limits)
        if not keys:
            raise BadRequest("RESERVE needs a non-empty list 'keys'")
        shm = f.flag("shm")
        sizes = f.raw("sizes", [])
        if not isinstance(sizes, list) or (shm and len(sizes) != len(keys)):
            raise f.fail("sizes", "a list of payload sizes, one per key")
        for size in sizes:
            if not is_int(size) or not 0 <= size <= limits.max_record_bytes:
                raise TooLarge(f"a RESERVE size {size!r:.40} is not within [0, {limits.max_record_bytes}]")
        return cls(keys, sizes, shm)


@dataclass(frozen=True, slots=True)
class Release(Body):
    op = Op.RELEASE
    leases: list[int]

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Release:
        leases = f.raw("leases")
        if (
            not isinstance(leases, list)
            or len(leases) > limits.max_keys
            or not all(is_int(x) and 0 <= x < 1 << LEASE_BITS for x in leases)
        ):
            raise f.fail("leases", f"a list of at most {limits.max_keys} lease ids")
        return cls(leases)


@dataclass(frozen=True, slots=True)
class Join(Body):
    op = Op.JOIN
    seeds: list[str]

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Join:
        seeds = f.raw("seeds")
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, str) for s in seeds):
            raise BadRequest("JOIN needs a non-empty list 'seeds' of addresses")
        return cls(seeds)


@dataclass(frozen=True, slots=True)
class Mesh(Body):
    """A membership/gossip datagram from a peer: one payload frame, no reply."""

    op = Op.MESH
    payloads = "some"
    sender: str

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Mesh:
        sender = f.raw("from")
        if not isinstance(sender, str) or len(payloads) != 1:
            raise BadRequest("MESH needs a string 'from' and exactly one payload frame")
        return cls(sender)


@dataclass(frozen=True, slots=True)
class Relay(Body):
    """Forward the payload frames (a whole one-way request) to the attached node ``to``."""

    op = Op.RELAY
    payloads = "some"
    to: str

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Relay:
        if not payloads:
            raise BadRequest("RELAY needs the forwarded request as payload frames")
        return cls(f.string("to"))


@dataclass(frozen=True, slots=True)
class Attach(Body):
    """A node behind NAT asks this node to relay messages to it (repeated as a keepalive)."""

    op = Op.ATTACH
    name: str
    token: str = ""

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> Attach:
        name = f.string("name", 255)
        token = f.raw("token", "")
        if not isinstance(token, str) or len(token) > 64:
            raise BadRequest("ATTACH token must be a string of at most 64 characters")
        return cls(name, token)


@dataclass(frozen=True, slots=True)
class SignalBody(Body):
    """One-way WebRTC signaling, for the peering (:class:`Signal`)."""

    op = Op.SIGNAL
    signal: Signal

    @classmethod
    def decode(cls, f: Fields, payloads: Sequence[Buffer], limits: Limits) -> SignalBody:
        sender, name, session = f.string("from"), f.string("name"), f.string("session")
        kind = f.raw("kind")
        if kind not in SIGNAL_KINDS:
            raise BadRequest(f"SIGNAL kind must be one of {', '.join(SIGNAL_KINDS)}, got {kind!r:.40}")
        sdp = f.string("sdp", MAX_SDP_BYTES) if kind != "refuse" else ""
        reason = f.raw("reason", "")
        channels = f.raw("channels", 0)
        if not is_int(channels) or not 0 <= channels <= 64:
            raise BadRequest(f"SIGNAL channels must be an int in [0, 64], got {channels!r:.40}")
        signal = Signal(sender, name, session, kind, sdp, reason if isinstance(reason, str) else "", channels)
        return cls(signal)


BODIES: dict[Op, type[Body]] = {
    cls.op: cls
    for cls in (
        Reserve,
        Release,
        Ping,
        Put,
        Get,
        Lookup,
        Delete,
        Stats,
        Mesh,
        Join,
        Announce,
        WhoHas,
        Rank,
        Attach,
        Relay,
        SignalBody,
    )
}
"""The message class of each op: every Op has one."""

B = TypeVar("B", bound=Body)


@dataclass(frozen=True, slots=True)
class Request(Generic[B]):
    """One decoded, validated request: its envelope, its body and its payload frames."""

    op: Op
    id: int
    timeout_ms: int
    body: B
    payloads: list[Buffer] = field(default_factory=list)
    tenant: str | None = None
    """The tenant the sender names (None: its own)."""
    scoped: bool = False
    """A member forwarding keys it has scoped already."""

    def __repr__(self) -> str:
        return f"<Request {self.op.name} id={self.id} {type(self.body).__name__}>"


def _tenant(f: Fields) -> str | None:
    tenant = f.raw("tenant")
    if tenant is None:
        return None
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise BadRequest(f"field 'tenant' must be 1-64 of A-Z a-z 0-9 . _ - , got {tenant!r:.80}")
    return tenant


def decode_request(frames: Sequence[Buffer], limits: Limits) -> Request[Any]:
    """Parse and validate a whole request; raises a typed MeshError, never anything else."""
    if not frames:
        raise BadRequest("empty message")
    m = unpack_map(frames[0], limits.max_header_bytes, "request header")
    version: Any = m.get("v")
    if not is_int(version) or not PROTOCOL_VERSION_MIN <= version <= PROTOCOL_VERSION_MAX:
        raise UnsupportedVersion(
            f"protocol version {version!r:.40} not supported; must be in range "
            f"[{PROTOCOL_VERSION_MIN}, {PROTOCOL_VERSION_MAX}]"
        )
    f = Fields(m, BadRequest)
    rid = f.integer("id", lo=0)
    timeout_ms = f.integer("timeout_ms", DEFAULT_TIMEOUT_MS, lo=1)
    op_code: Any = m.get("op")
    try:
        op = Op(op_code) if is_int(op_code) else Op(-1)
    except ValueError:
        raise UnknownOp(
            f"unknown op {op_code!r:.40}; this node knows {', '.join(o.name for o in Op)}"
        ) from None
    tenant, scoped = _tenant(f), f.flag("scoped")
    payloads = list(frames[1:])
    total = sum(len(p) for p in payloads)
    if total > limits.max_request_bytes:
        raise TooLarge(f"request of {total} payload bytes exceeds the limit of {limits.max_request_bytes}")
    cls = BODIES[op]
    if cls.payloads == "none" and payloads:
        raise BadRequest(f"{op.name} takes no payload frames, got {len(payloads)}")
    return Request(op, rid, timeout_ms, cls.decode(f, payloads, limits), payloads, tenant, scoped)
