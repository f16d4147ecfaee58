"""The node's wire protocol: one msgpack header frame, then raw payload frames.

Request header: ``{"v": version, "op": Op, "id": request id, "timeout_ms": budget, ...}``
with per-op fields; PUT is followed by one payload frame per record. Reply header:
``{"v", "id", "ok": true, ...}`` (GET followed by one frame per found record) or
``{"v", "id", "ok": false, "code": ErrorCode, "error": message}``.

Payloads never go inside msgpack: they travel as their own frames, zero-copy — or, between
a node and an engine on the same host, not at all: a ``slots`` field gives, per record,
where in the node's shared-memory arena its payload is (None: in the next frame). Each op's
request, as a type with its one validating decoder, is in :mod:`.requests`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from lmcache_mesh.mesh.costs import Cost as Cost  # what an engine says recomputing costs it
from lmcache_mesh.mesh.errors import BadRequest, MeshError, UnsupportedVersion, error_from_wire
from lmcache_mesh.transports.addresses import parse_webrtc_address
from lmcache_mesh.transports.webrtc.signaling import Signal

from .records import Buffer, ChunkRecord, RecordHeader, unpack_map

PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 1
PROTOCOL_VERSION = 1
"""Version 1: PING, PUT, GET, LOOKUP, DELETE, STATS, MESH, JOIN, ANNOUNCE, WHO_HAS, RANK,
ATTACH, RELAY, SIGNAL, RESERVE, RELEASE (ops added within a version are answered UNKNOWN_OP
by older nodes; fields added to an op are ignored by them)."""

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
    RESERVE = 15
    """Announce chunks about to be PUT (lookups see them at once; GETs wait for them) and, with
    ``shm``, reserve slots in the node's shared memory to write them into."""
    RELEASE = 16
    """End leases: shared-memory reads done, or reservations given up."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a node enforces on every request before acting on it."""

    max_header_bytes: int = 1 << 20
    max_record_bytes: int = 256 << 20
    max_keys: int = 4096
    max_request_bytes: int = 256 << 20
    """All payload frames of one request together."""


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
    records, bad, _ = read_records(reply, keys)
    return records, bad


SlotReader = Callable[[int, int], Buffer]
"""(offset, length) -> the bytes of a slot in the node's arena, as this client mapped it."""


def read_records(
    reply: Reply, keys: Sequence[bytes], slot: SlotReader | None = None
) -> tuple[list[ChunkRecord | None], int, list[int]]:
    """Records per key (None per miss or bad record), how many failed verification, and which
    records are views into the arena (``slots``, read with ``slot``): those are *not* verified
    yet — the reader checks them as it copies them out, under the reply's lease."""
    raw = reply.fields.get("records")
    if not isinstance(raw, list) or len(raw) != len(keys):
        raise BadRequest("GET reply has no per-key 'records' list of the right length")
    slots = reply.fields.get("slots") if slot is not None else None
    if slots is not None and (not isinstance(slots, list) or len(slots) != len(keys)):
        raise BadRequest("GET reply has no per-key 'slots' list of the right length")
    out: list[ChunkRecord | None] = []
    shared: list[int] = []
    bad = 0
    frames = iter(reply.payloads)
    for i, (key, h) in enumerate(zip(keys, raw, strict=True)):
        if h is None:
            out.append(None)
            continue
        offset = slots[i] if slots is not None else None
        payload = next(frames, None) if offset is None else None
        try:
            header = RecordHeader.from_wire(h)
            if header.key != key:
                raise BadRequest("GET reply record does not match its key")
            if offset is not None:
                assert slot is not None
                if not isinstance(offset, int) or offset < 0:
                    raise BadRequest(f"GET reply slot {offset!r:.40} is not an arena offset")
                out.append(ChunkRecord(header, slot(offset, header.length)))
                shared.append(i)
                continue
            if payload is None:
                raise BadRequest("GET reply record lacks a payload")
            out.append(ChunkRecord.verified(header, payload))
        except MeshError:
            bad += 1
            out.append(None)
    return out, bad, shared


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


def signal_message(signal: Signal) -> bytes:
    """A one-way WebRTC SIGNAL (offer, answer or refusal)."""
    fields = {
        "from": signal.sender,
        "name": signal.name,
        "session": signal.session,
        "kind": signal.kind,
        "sdp": signal.sdp,
        "reason": signal.reason,
        "channels": signal.channels,
    }
    return request_header(Op.SIGNAL, 0, 5000, **fields)


class AttachWire:
    """ATTACH as the NAT node's uplink sends it (sealed with ``seal``: a member's request,
    without CurveZMQ), and the relay's answer as it reads it."""

    def __init__(self, seal: Callable[[bytes], bytes] | None = None) -> None:
        self._seal = seal

    def attach(self, request_id: int, name: str, token: str) -> bytes:
        header = request_header(Op.ATTACH, request_id, 2000, name=name, token=token)
        return self._seal(header) if self._seal is not None else header

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
