"""The node's wire protocol: one msgpack header frame, then raw payload frames.

Request header: ``{"v": version, "op": Op, "id": request id, "timeout_ms": budget, ...}``
with per-op fields; PUT is followed by one payload frame per record. Reply header:
``{"v", "id", "ok": true, ...}`` (GET followed by one frame per found record) or
``{"v", "id", "ok": false, "code": ErrorCode, "error": message}``.

Payloads never go inside msgpack: they travel as their own frames, zero-copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack

from lmcache_mesh.mesh.costs import Cost
from lmcache_mesh.transports.addresses import parse_webrtc_address

from .errors import BadRequest, MeshError, TooLarge, UnknownOp, UnsupportedVersion, error_from_wire
from .keys import KEY_BYTES
from .records import MAX_RECORD_HEADER_BYTES, TENANT_RE, Buffer, ChunkRecord, RecordHeader, unpack_map

PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 1
PROTOCOL_VERSION = 1
"""Version 1: PING, PUT, GET, LOOKUP, DELETE, STATS, MESH, JOIN, ANNOUNCE, WHO_HAS, RANK,
ATTACH, RELAY, SIGNAL (ops added within a version are answered UNKNOWN_OP by older nodes)."""

SIGNAL_KINDS = ("offer", "answer", "refuse")
MAX_SDP_BYTES = 64 << 10

DEFAULT_TIMEOUT_MS = 5000


class Op(IntEnum):
    # APPEND ONLY: the numbers are on the wire.
    PING = 1
    PUT = 2
    GET = 3
    LOOKUP = 4
    DELETE = 5
    STATS = 6
    MESH = 7
    """A membership/gossip datagram from a peer: one payload frame, no reply."""
    JOIN = 8
    """Ask this node to join the cluster of the given seed addresses."""
    ANNOUNCE = 9
    """A holder tells a key's owner which keys it now holds ("add") or dropped ("remove")."""
    WHO_HAS = 10
    """Ask a key's owner which members hold each key."""
    RANK = 11
    """Order candidate nodes by how long a prefix of a key chain each holds."""
    ATTACH = 12
    """A node behind NAT asks this node to relay messages to it (repeated as a keepalive)."""
    RELAY = 13
    """Forward the payload frames (a whole one-way request) to the attached node ``to``."""
    SIGNAL = 14
    """One-way WebRTC signaling: an offer, its answer, or a refusal, for one session."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a node enforces on every request before acting on it."""

    max_header_bytes: int = 1 << 20
    max_record_bytes: int = 64 << 20
    max_keys: int = 4096
    max_request_bytes: int = 256 << 20
    """All payload frames of one request together."""


@dataclass(slots=True)
class Request:
    op: Op
    id: int
    timeout_ms: int
    fields: dict[str, Any]
    payloads: list[Buffer] = field(default_factory=list)


def encode_header(m: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(m, use_bin_type=True)
    return packed


def request_header(op: Op, request_id: int, timeout_ms: int, **fields: Any) -> bytes:
    return encode_header(
        {"v": PROTOCOL_VERSION, "op": int(op), "id": request_id, "timeout_ms": timeout_ms, **fields}
    )


def ok_reply(request_id: int, **fields: Any) -> bytes:
    return encode_header({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields})


def error_reply(request_id: int, error: MeshError) -> bytes:
    return encode_header(
        {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "code": int(error.code), "error": str(error)}
    )


def peek_request_id(frame: Buffer, max_bytes: int = 1 << 20) -> int:
    """The request id from a header that may be otherwise broken (0 if unreadable or too big)."""
    if len(frame) > max_bytes:
        return 0  # never parse an oversize frame: msgpack can expand it many times over
    try:
        m = msgpack.unpackb(frame, raw=False)
        rid = m.get("id") if isinstance(m, dict) else None
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0 else 0
    except Exception:
        return 0


def _flag(m: dict[str, Any], name: str) -> bool:
    value = m.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be a boolean, got {value!r:.40}")
    return value


def _strings(m: dict[str, Any], name: str) -> list[str]:
    value = m.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"field {name!r} must be a list of strings")
    return value


def _string(m: dict[str, Any], name: str, max_len: int = 1024) -> str:
    value = m.get(name)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise BadRequest(f"field {name!r} must be a non-empty string of at most {max_len} characters")
    return value


def _cost(m: dict[str, Any]) -> Cost | None:
    raw = m.get("cost")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("field 'cost' must be a map {recompute_s, chunk_bytes}")
    seconds, nbytes = raw.get("recompute_s"), raw.get("chunk_bytes")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds < 1e6:
        raise BadRequest(f"cost.recompute_s must be a positive number of seconds, got {seconds!r:.40}")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 0 < nbytes <= 1 << 40:
        raise BadRequest(f"cost.chunk_bytes must be a positive int, got {nbytes!r:.40}")
    return Cost(float(seconds), nbytes)


def _tenant(m: dict[str, Any]) -> str | None:
    tenant = m.get("tenant")
    if tenant is None:
        return None
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise BadRequest(f"field 'tenant' must be 1-64 of A-Z a-z 0-9 . _ - , got {tenant!r:.80}")
    return tenant


def _keys(m: dict[str, Any], limits: Limits, name: str = "keys") -> list[bytes]:
    keys = m.get(name, [] if name != "keys" else None)
    if not isinstance(keys, list):
        raise BadRequest(f"field {name!r} must be a list of 16-byte keys")
    if len(keys) > limits.max_keys:
        raise TooLarge(f"{len(keys)} keys in one request exceed the limit of {limits.max_keys}")
    for k in keys:
        if not isinstance(k, bytes) or len(k) != KEY_BYTES:
            raise BadRequest(f"every key must be {KEY_BYTES} bytes, got {k!r:.60}")
    return keys


def decode_request(frames: Sequence[Buffer], limits: Limits) -> Request:
    """Parse and validate a whole request; raises a typed MeshError, never anything else."""
    if not frames:
        raise BadRequest("empty message")
    m = unpack_map(frames[0], limits.max_header_bytes, "request header")
    version = m.get("v")
    if (
        not isinstance(version, int)
        or isinstance(version, bool)
        or not PROTOCOL_VERSION_MIN <= version <= PROTOCOL_VERSION_MAX
    ):
        raise UnsupportedVersion(
            f"protocol version {version!r:.40} not supported; must be in range "
            f"[{PROTOCOL_VERSION_MIN}, {PROTOCOL_VERSION_MAX}]"
        )
    rid, timeout_ms, op_code = m.get("id"), m.get("timeout_ms", DEFAULT_TIMEOUT_MS), m.get("op")
    if not isinstance(rid, int) or isinstance(rid, bool) or rid < 0:
        raise BadRequest(f"field 'id' must be a non-negative int, got {rid!r:.40}")
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
        raise BadRequest(f"field 'timeout_ms' must be a positive int, got {timeout_ms!r:.40}")
    try:
        op = Op(op_code) if isinstance(op_code, int) and not isinstance(op_code, bool) else Op(-1)
    except ValueError:
        raise UnknownOp(
            f"unknown op {op_code!r:.40}; this node knows {', '.join(o.name for o in Op)}"
        ) from None
    fields_: dict[str, Any] = {"tenant": _tenant(m), "scoped": _flag(m, "scoped")}
    payloads = list(frames[1:])
    total = sum(len(p) for p in payloads)
    if total > limits.max_request_bytes:
        raise TooLarge(f"request of {total} payload bytes exceeds the limit of {limits.max_request_bytes}")
    if op is Op.PUT:
        raw = m.get("records")
        if not isinstance(raw, list) or not raw:
            raise BadRequest("PUT needs a non-empty list 'records' of record headers")
        if len(raw) > limits.max_keys:
            raise TooLarge(f"{len(raw)} records in one PUT exceed the limit of {limits.max_keys}")
        if len(raw) != len(payloads):
            raise BadRequest(f"PUT has {len(raw)} record headers but {len(payloads)} payload frames")
        headers = [RecordHeader.from_wire(h) for h in raw]
        for h in headers:
            if len(h.encode()) > MAX_RECORD_HEADER_BYTES:
                raise TooLarge(f"a record header exceeds {MAX_RECORD_HEADER_BYTES} bytes")
            if h.length > limits.max_record_bytes:
                raise TooLarge(f"record of {h.length} bytes exceeds the limit of {limits.max_record_bytes}")
        fields_["headers"] = headers
        fields_["replica"] = _flag(m, "replica")
    elif op is Op.MESH:
        sender = m.get("from")
        if not isinstance(sender, str) or len(payloads) != 1:
            raise BadRequest("MESH needs a string 'from' and exactly one payload frame")
        fields_["from"] = sender
    elif op is Op.RELAY:
        if not payloads:
            raise BadRequest("RELAY needs the forwarded request as payload frames")
        fields_["to"] = _string(m, "to")
    elif payloads:
        raise BadRequest(f"{op.name} takes no payload frames, got {len(payloads)}")
    elif op in (Op.GET, Op.LOOKUP, Op.DELETE, Op.WHO_HAS, Op.RANK):
        fields_["keys"] = _keys(m, limits)
        fields_["local"] = _flag(m, "local")
        fields_["holders"] = _flag(m, "holders")
        if op is Op.RANK:
            fields_["candidates"] = _strings(m, "candidates")
        if op in (Op.GET, Op.LOOKUP):
            fields_["cost"] = _cost(m)
    elif op is Op.ANNOUNCE:
        fields_["holder"] = _string(m, "holder", 255)
        fields_["add"] = _keys(m, limits, "add")
        fields_["remove"] = _keys(m, limits, "remove")
        # route: the holder is an engine attached to the receiving node, which routes the
        # keys to their owners; otherwise the receiver is an owner and records them.
        fields_["route"] = _flag(m, "route")
        if fields_["route"] and "/" in fields_["holder"]:
            raise BadRequest("an engine name must not contain '/'")
    elif op is Op.ATTACH:
        fields_["name"] = _string(m, "name", 255)
        token = m.get("token", "")
        if not isinstance(token, str) or len(token) > 64:
            raise BadRequest("ATTACH token must be a string of at most 64 characters")
        fields_["token"] = token
    elif op is Op.SIGNAL:
        for name in ("from", "name", "session"):
            fields_[name] = _string(m, name)
        kind = m.get("kind")
        if kind not in SIGNAL_KINDS:
            raise BadRequest(f"SIGNAL kind must be one of {', '.join(SIGNAL_KINDS)}, got {kind!r:.40}")
        fields_["kind"] = kind
        fields_["sdp"] = _string(m, "sdp", MAX_SDP_BYTES) if kind != "refuse" else ""
        reason = m.get("reason", "")
        fields_["reason"] = reason if isinstance(reason, str) else ""
        channels = m.get("channels", 0)
        if not isinstance(channels, int) or isinstance(channels, bool) or not 0 <= channels <= 64:
            raise BadRequest(f"SIGNAL channels must be an int in [0, 64], got {channels!r:.40}")
        fields_["channels"] = channels
    elif op is Op.JOIN:
        seeds = m.get("seeds")
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, str) for s in seeds):
            raise BadRequest("JOIN needs a non-empty list 'seeds' of addresses")
        fields_["seeds"] = seeds
    return Request(op, rid, timeout_ms, fields_, payloads)


@dataclass(slots=True)
class Reply:
    id: int
    fields: dict[str, Any]
    payloads: list[Buffer]


def decode_reply(frames: Sequence[Buffer], max_header_bytes: int = 1 << 20) -> Reply:
    """Parse a reply; an error reply raises its typed MeshError."""
    if not frames:
        raise BadRequest("empty reply")
    m = unpack_map(frames[0], max_header_bytes, "reply header")
    version = m.get("v")
    if (
        not isinstance(version, int)
        or isinstance(version, bool)
        or not PROTOCOL_VERSION_MIN <= version <= PROTOCOL_VERSION_MAX
    ):
        raise UnsupportedVersion(f"reply with protocol version {version!r:.40}")
    rid = m.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise BadRequest("reply without an id")
    if m.get("ok") is not True:
        raise error_from_wire(m.get("code"), m.get("error", "error reply without a message"))
    return Reply(rid, m, list(frames[1:]))


# per-op request builders and reply readers, shared by every client


def put_request(records: Sequence[ChunkRecord]) -> tuple[dict[str, Any], list[Buffer]]:
    return {"records": [r.header.to_wire() for r in records]}, [r.payload for r in records]


def get_results(reply: Reply, keys: Sequence[bytes]) -> tuple[list[ChunkRecord | None], int]:
    """Verified records per key (None per miss or bad record) and how many failed verification."""
    raw = reply.fields.get("records")
    if not isinstance(raw, list) or len(raw) != len(keys):
        raise BadRequest("GET reply has no per-key 'records' list of the right length")
    out: list[ChunkRecord | None] = []
    bad = 0
    frames = iter(reply.payloads)
    for key, h in zip(keys, raw, strict=True):
        if h is None:
            out.append(None)
            continue
        payload = next(frames, None)
        try:
            header = RecordHeader.from_wire(h)
            if payload is None or header.key != key:
                raise BadRequest("GET reply record does not match its key or lacks a payload")
            out.append(ChunkRecord.verified(header, payload))
        except MeshError:
            bad += 1
            out.append(None)
    return out, bad


# one-way messages between members, as the transports send them


def mesh_envelope(address: str) -> bytes:
    """The frame before each membership datagram from ``address``."""
    return request_header(Op.MESH, 0, 1000, **{"from": address})


def route_to(address: str) -> tuple[str, list[bytes]]:
    """Where one-way messages for a member go: straight to it, or through its relay."""
    relayed = parse_webrtc_address(address)
    if relayed is None:
        return address, []
    return relayed.relay, [request_header(Op.RELAY, 0, 1000, to=relayed.name)]


def signal_message(fields: dict[str, Any]) -> bytes:
    """A one-way WebRTC SIGNAL (offer, answer or refusal)."""
    return request_header(Op.SIGNAL, 0, 5000, **fields)


class AttachWire:
    """ATTACH as the NAT node's uplink sends it, and the relay's answer as it reads it."""

    def attach(self, request_id: int, name: str, token: str) -> bytes:
        return request_header(Op.ATTACH, request_id, 2000, name=name, token=token)

    def answer(self, header: Buffer) -> bool | None:
        if len(header) > 4096:
            return None
        try:
            m = msgpack.unpackb(header, raw=False)
        except Exception:
            return None
        if not isinstance(m, dict) or "ok" not in m:
            return None
        return m["ok"] is True
