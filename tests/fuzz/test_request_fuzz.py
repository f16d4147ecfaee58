"""Fuzzing the node's request and reply decoders, and a NodeServer fed garbage.

Every input either decodes into a request that satisfies every documented bound, or raises
one of the typed request errors. A NodeServer (no sockets) answers each with a typed error
reply under the right id, or as the request's op and sender allow (a mesh member, or an
engine's key in another tenant), and the node's records stay as they were.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import event, given

from lmcache_mesh.node import (
    BadRequest,
    ChecksumMismatch,
    ChunkRecord,
    DeadlineExceeded,
    MeshError,
    Node,
    NodeConfig,
    TooLarge,
    Unavailable,
    UnknownOp,
    UnsupportedVersion,
)
from lmcache_mesh.node.config import LimitsSettings, StorageSettings
from lmcache_mesh.node.errors import Busy, ErrorCode, Forbidden
from lmcache_mesh.node.keyring import MEMBER, Principal, Role, Sender
from lmcache_mesh.node.protocol import (
    PROTOCOL_VERSION,
    Limits,
    Op,
    decode_reply,
    error_reply,
    get_results,
    ok_reply,
)
from lmcache_mesh.node.records import TENANT_RE, RecordHeader, checksum
from lmcache_mesh.node.requests import Request, SignalBody, decode_request
from lmcache_mesh.node.service import NodeServer
from lmcache_mesh.transports.webrtc import SIGNAL_KINDS

from .strategies import FUZZ, RECORDS, Fuzz, fuzzed, is_int, pack, record_header_map

MAX_KEYS = 8
LIMITS = Limits(max_header_bytes=2048, max_record_bytes=1000, max_keys=MAX_KEYS, max_request_bytes=4096)
REQUEST_ERRORS = (BadRequest, TooLarge, UnknownOp, UnsupportedVersion)
"""What decode_request may raise: it documents 'a typed MeshError, never anything else'."""

MAX_ERROR_TEXT = 400
"""Error messages quote a bad value cut to 40-60 characters: they never echo the request."""

# inputs

GOOD_KEYS = [r.key for r in RECORDS] + [b"\xaa" * 16]
BAD_KEYS: list[Any] = [b"", b"k" * 15, b"k" * 17, "k" * 16, None, 16, [b"k" * 16]]


def key_list(fz: Fuzz) -> list[Any]:
    mode = fz.below(6)
    if mode == 4:
        return GOOD_KEYS[:1] * (MAX_KEYS + 1 + fz.below(3))  # too many
    if mode == 5:
        return [fz.pick(GOOD_KEYS + BAD_KEYS) for _ in range(1 + fz.below(4))]  # wrong lengths/types
    return [fz.pick(GOOD_KEYS) for _ in range(fz.below(5))]


NAMES = ["n1", "tcp://127.0.0.1:1", "edge", "\u00e9", "x" * 255, "a/b", ""]


def choose(*options: Any) -> Callable[[Fuzz], Any]:
    return lambda fz: fz.pick(options)


def names(fz: Fuzz) -> list[str]:
    return [fz.pick(NAMES) for _ in range(fz.below(4))]


REQUEST_FIELDS: dict[str, Callable[[Fuzz], Any]] = {
    "keys": key_list,
    "add": key_list,
    "remove": key_list,
    "local": choose(False, True),
    "holders": choose(False, True),
    "replica": choose(False, True),
    "route": choose(False, True),
    "candidates": names,
    "seeds": names,
    "cost": lambda fz: {
        "recompute_s": fz.pick([0.5, 0.001, 0, -1.0, 1e6, 2e6, math.nan, math.inf, True, 3]),
        "chunk_bytes": fz.pick([4096, 1, 0, -1, 2**40, 2**40 + 1, True, 1.5]),
    },
    "holder": choose("n1", "a/b", ""),
    "name": choose("edge", "x" * 255, "x" * 256, ""),
    "token": choose("", "t0k3n", "t" * 64, "t" * 65),
    "to": choose("edge", "", "x" * 1024, "x" * 1025),
    "from": choose(*NAMES),
    "session": choose(*NAMES),
    "kind": choose(*SIGNAL_KINDS, "hello"),
    "sdp": choose(*NAMES),
    "reason": choose(*NAMES),
    "channels": choose(0, 1, 4, 64, 65, -1, True),
    "tenant": choose("t1", "t2", "", "a/b", "x" * 65),
    "scoped": choose(True, False),
    "shm": choose(True, False, 1, None),
    "lease": choose(None, 0, 7, 2**62 - 1, 2**62, -1, "7", True),
    "slots": choose(None, [None], [0], [4096], [None, 4096], [-1], ["0"], 5, [2**48]),
    "sizes": choose([], [4096], [0, 1], [-1], [2**40], ["1"], None),
    "leases": choose([], [7], [2**62], [-1], ["x"], None, [7] * (MAX_KEYS + 1)),
    "pad": choose(b"", b"\0" * 1000, b"\0" * 2030, b"\0" * 2100),  # headers near and over the limit
}
FIELD_NAMES = sorted(REQUEST_FIELDS)
OP_FIELDS: dict[Op, tuple[str, ...]] = {
    Op.PING: ("shm",),
    Op.PUT: ("replica", "lease", "slots"),
    Op.GET: ("keys", "local", "holders", "cost", "shm"),
    Op.LOOKUP: ("keys", "local", "holders", "cost"),
    Op.DELETE: ("keys", "local", "holders"),
    Op.STATS: (),
    Op.MESH: ("from",),
    Op.JOIN: ("seeds",),
    Op.ANNOUNCE: ("holder", "add", "remove", "route"),
    Op.WHO_HAS: ("keys", "local", "holders"),
    Op.RANK: ("keys", "candidates", "local", "holders"),
    Op.ATTACH: ("name", "token"),
    Op.RELAY: ("to",),
    Op.SIGNAL: ("from", "name", "session", "kind", "sdp", "reason", "channels"),
    Op.RESERVE: ("keys", "sizes", "shm"),
    Op.RELEASE: ("leases",),
}
"""The fields each op reads: a near-valid request mostly has these, mostly valid."""
OP_CODES = [int(op) for op in Op]
HEAD: dict[str, tuple[list[Any], list[Any]]] = {  # good values, bad values
    "v": ([PROTOCOL_VERSION], [0, 2, -1, "1", 1.0, None, [1], True]),
    "op": (OP_CODES, [0, -1, 17, 40, 2**64 - 1, "1", 1.5, None, True]),
    "id": ([7, 0, 2**32, 2**64 - 1], [-1, True, "7", 1.5, None]),
    "timeout_ms": ([1000, 1, 5000], [0, -1, True, "5", 1.5, None]),
}
INNER = pack({"v": 1, "op": int(Op.MESH), "id": 1, "from": "tcp://127.0.0.1:1"})


def near_valid_request(fz: Fuzz) -> list[bytes]:
    """A header with valid-looking version, op, id and timeout (each sometimes bad, junk or
    missing), the op's fields (each sometimes missing or bad) and maybe others, and the
    payload frames the op takes: PUT's often match its records, but one may be corrupted
    (a checksum mismatch); any op may get random frames instead."""
    m: dict[str, Any] = {}
    for name, (good, bad) in HEAD.items():
        kind = fz.below(16)
        if kind < 14:
            m[name] = fz.pick(good)
        elif kind == 14:
            m[name] = fz.pick(bad) if fz.below(2) else fz.junk()
    op = m.get("op")
    for name in OP_FIELDS[Op(op)] if is_int(op) and op in OP_CODES else ():
        if fz.often(10):
            m[name] = REQUEST_FIELDS[name](fz) if fz.often(8) else fz.junk()
    for name in ("tenant", "scoped"):  # any op may name a tenant, or claim its keys are scoped
        if not fz.often(6):
            m[name] = REQUEST_FIELDS[name](fz)
    for _ in range(fz.below(3) // 2 + fz.below(3) // 2):  # 0-2 others, usually none
        name = fz.pick(FIELD_NAMES)
        m[name] = REQUEST_FIELDS[name](fz) if fz.often() else fz.junk()
    frames: list[bytes] = []
    if op == Op.PUT or not fz.often(8):
        records = [fz.pick(RECORDS) for _ in range(fz.below(4) or 1)]
        m["records"] = [record_header_map(fz, r) for r in records]
        frames = [bytes(r.payload) for r in records]
        if fz.below(3) == 2:
            i = fz.below(len(frames))
            frames[i] = fz.mutate(frames[i])
    elif op in (Op.MESH, Op.RELAY):
        frames = [INNER]
    if not fz.often(8):
        frames = [fz.pick([b"", b"x", INNER, b"\0" * 3000]) for _ in range(fz.below(4))]
    return [pack(m), *frames]


def request_frames(fz: Fuzz) -> list[bytes]:
    kind = fz.below(10)
    if kind < 7:
        return near_valid_request(fz)
    if kind == 7:  # a valid request, then broken bytes
        fields = {name: REQUEST_FIELDS[name](fz) for name in ("keys", "holder", "to", "from")}
        header = pack({"v": 1, "op": fz.pick(OP_CODES), "id": 7, "timeout_ms": 1000, **fields})
        return [fz.mutate(header), *([INNER] if fz.below(2) else [])]
    if kind == 8:
        return [pack(fz.junk()), *([fz.raw(8)] if fz.below(2) else [])]
    return [fz.raw(64) for _ in range(fz.below(4))]  # raw bytes, the empty message included


requests = fuzzed(request_frames)


# oracles


def header_map(frame: bytes, limit: int) -> dict[Any, Any] | None:
    if len(frame) > limit:
        return None
    try:
        m = msgpack.unpackb(frame, raw=False)
    except Exception:
        return None
    return m if isinstance(m, dict) else None


def expected_reply_id(frames: Sequence[bytes], limit: int) -> int:
    """The id an error reply must carry: the header's id when readable, else 0."""
    m = header_map(frames[0], limit) if frames else None
    rid = None if m is None else m.get("id")
    return rid if isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0 else 0


def fields_of(req: Request[Any]) -> dict[str, Any]:
    """A typed request's fields under their wire names ("from" for ``sender``)."""
    body = req.body.signal if isinstance(req.body, SignalBody) else req.body
    out: dict[str, Any] = {"tenant": req.tenant, "scoped": req.scoped}
    for f in dataclasses.fields(body):
        out["from" if f.name == "sender" else f.name] = getattr(body, f.name)
    return out


def check_request(req: Request[Any], frames: Sequence[bytes], limits: Limits) -> None:
    """Every bound decode_request promises, checked against the raw header."""
    m = header_map(frames[0], limits.max_header_bytes)
    assert m is not None
    assert m.get("v") == PROTOCOL_VERSION
    assert req.op == m.get("op") and req.id == m.get("id") and is_int(req.id) and req.id >= 0
    assert is_int(req.timeout_ms) and req.timeout_ms > 0
    assert [bytes(p) for p in req.payloads] == list(frames[1:])
    assert sum(len(p) for p in req.payloads) <= limits.max_request_bytes
    f = fields_of(req)
    assert f["tenant"] == m.get("tenant") and (f["tenant"] is None or TENANT_RE.match(f["tenant"]))
    if req.op is Op.PUT:
        slots = f["slots"]
        framed = len(f["headers"]) if slots is None else sum(o is None for o in slots)
        assert 0 < len(f["headers"]) <= limits.max_keys and framed == len(req.payloads)
        assert slots is None or all(o is None or (is_int(o) and o >= 0) for o in slots)
        assert f["lease"] is not None or slots is None or all(o is None for o in slots)
        assert [h.encode() for h in f["headers"]] == [
            RecordHeader.from_wire(h).encode() for h in m["records"]
        ]
        assert all(h.length <= limits.max_record_bytes for h in f["headers"])
        assert isinstance(f["replica"], bool)
    elif req.op is Op.MESH:
        assert isinstance(f["from"], str) and len(req.payloads) == 1
    elif req.op is Op.RELAY:
        assert req.payloads and isinstance(f["to"], str) and 0 < len(f["to"]) <= 1024
    else:
        assert not req.payloads
    for name in ("keys", "add", "remove"):
        if name in f:
            assert len(f[name]) <= limits.max_keys
            assert all(isinstance(k, bytes) and len(k) == 16 for k in f[name])
    for name in ("local", "holders", "route"):
        if name in f:
            assert isinstance(f[name], bool)
    if req.op is Op.RANK:
        assert all(isinstance(c, str) for c in f["candidates"])
    if req.op in (Op.GET, Op.LOOKUP) and f["cost"] is not None:
        assert 0 < f["cost"].recompute_s < 1e6 and 0 < f["cost"].chunk_bytes <= 1 << 40
    if req.op is Op.ANNOUNCE:
        assert isinstance(f["holder"], str) and f["holder"]
        assert not (f["route"] and "/" in f["holder"])
    if req.op is Op.ATTACH:
        assert 0 < len(f["name"]) <= 255 and isinstance(f["token"], str) and len(f["token"]) <= 64
    if req.op is Op.SIGNAL:
        assert f["kind"] in SIGNAL_KINDS and 0 <= f["channels"] <= 64 and is_int(f["channels"])
        assert all(isinstance(f[n], str) and f[n] for n in ("from", "name", "session"))
        assert (f["sdp"] == "") == (f["kind"] == "refuse")
    if req.op is Op.JOIN:
        assert f["seeds"] and all(isinstance(s, str) for s in f["seeds"])
    if req.op is Op.RESERVE:
        assert f["keys"] and all(is_int(n) and 0 <= n <= limits.max_record_bytes for n in f["sizes"])
        assert not f["shm"] or len(f["sizes"]) == len(f["keys"])
    if req.op is Op.RELEASE:
        assert len(f["leases"]) <= limits.max_keys and all(is_int(x) and 0 <= x < 2**62 for x in f["leases"])


def check_error(exc: MeshError, frames: Sequence[bytes], limits: Limits) -> None:
    """The documented order of checks decides which typed error a header gets."""
    assert type(exc) in REQUEST_ERRORS, f"{type(exc).__name__}: {exc}"
    m = header_map(frames[0], limits.max_header_bytes) if frames else None
    if m is None:
        assert type(exc) in (BadRequest, TooLarge)
        return
    v = m.get("v")
    if not (is_int(v) and v == PROTOCOL_VERSION):
        assert type(exc) is UnsupportedVersion
        return
    assert type(exc) is not UnsupportedVersion or "record version" in str(exc)
    rid, timeout = m.get("id"), m.get("timeout_ms", 1)
    if (
        isinstance(rid, int)
        and is_int(rid)
        and rid >= 0
        and isinstance(timeout, int)
        and is_int(timeout)
        and timeout > 0
    ):
        op = m.get("op")
        assert (type(exc) is UnknownOp) == (not is_int(op) or op not in set(OP_CODES)), exc
    assert len(str(exc)) <= MAX_ERROR_TEXT, str(exc)[:200]


# the decoders


@FUZZ
@given(requests)
def test_any_frames_decode_to_a_valid_request_or_a_typed_error(frames: list[bytes]) -> None:
    try:
        req = decode_request(frames, LIMITS)
    except MeshError as exc:
        event(type(exc).__name__)
        check_error(exc, frames, LIMITS)
    else:
        event(f"decoded {req.op.name}")
        check_request(req, frames, LIMITS)


@pytest.mark.parametrize("where", ["request", "record"])
def test_an_unsupported_version_is_not_echoed_back(where: str) -> None:
    """Found by this fuzzer: a bad 'v' was quoted whole, and a 1 MiB header made a ~6 MiB
    error reply that clients refused as TOO_LARGE."""
    junk_version = [None] * 100_000
    if where == "request":
        header = {"v": junk_version, "op": 1, "id": 5}
    else:
        header = {"v": 1, "op": 2, "id": 5, "records": [{**RECORDS[0].header.to_wire(), "v": junk_version}]}
    frames = [pack(header), bytes(RECORDS[0].payload)]
    with pytest.raises(UnsupportedVersion) as caught:
        decode_request(frames, Limits())
    assert len(str(caught.value)) <= MAX_ERROR_TEXT
    reply = error_reply(5, caught.value)
    with pytest.raises(UnsupportedVersion):
        decode_reply([reply], max_header_bytes=len(frames[0]))


ERROR_CODES = [int(c) for c in ErrorCode]


def reply_frames(fz: Fuzz) -> list[bytes]:
    kind = fz.below(6)
    if kind < 4:  # near-valid
        m: dict[str, Any] = {"v": fz.pick(HEAD["v"][0] * 8 + HEAD["v"][1]), "id": fz.pick([7, 0, 2**64 - 1])}
        if not fz.often():
            m["id"] = fz.junk()
        for _ in range(fz.below(5)):
            name = fz.pick(["ok", "code", "error", "records", "stats"])
            if name == "ok":
                m["ok"] = fz.pick([True, True, True, False, None, 1, "true"])
            elif name == "code":
                m["code"] = fz.pick(ERROR_CODES + [0, -1, 10, 99, True, "1", 1.0])
            else:
                m[name] = fz.pick(["boom", "", "\u00e9" * 50]) if fz.often() else fz.junk()
        return [pack(m), *(fz.pick([b"", b"payload"]) for _ in range(fz.below(3)))]
    if kind == 4:
        return [fz.mutate(ok_reply(fz.pick([7, 2**64 - 1]), stats=fz.junk()))]
    return [pack(fz.junk())] if fz.below(2) else [fz.raw(64) for _ in range(fz.below(4))]


replies = fuzzed(reply_frames)


@FUZZ
@given(replies)
def test_any_reply_decodes_or_raises_the_typed_error_it_names(frames: list[bytes]) -> None:
    try:
        reply = decode_reply(frames, max_header_bytes=1024)
    except MeshError as exc:
        m = header_map(frames[0], 1024) if frames else None
        if m is None:
            assert type(exc) in (BadRequest, TooLarge)
        elif not (is_int(m.get("v")) and m["v"] == PROTOCOL_VERSION):
            assert type(exc) is UnsupportedVersion
        elif not is_int(m.get("id")):
            assert type(exc) is BadRequest
        else:
            assert m.get("ok") is not True
            code = m.get("code")
            want = ErrorCode(code).name if isinstance(code, int) and code in set(ErrorCode) else "INTERNAL"
            assert exc.code.name == want
            assert str(exc) == str(m.get("error", "error reply without a message"))
    else:
        m = header_map(frames[0], 1024)
        assert m is not None and m.get("ok") is True and m.get("v") == PROTOCOL_VERSION
        assert reply.id == m["id"] and pack(reply.fields) == pack(m) and reply.payloads == frames[1:]


# a NodeServer fed the same frames, without sockets

ENGINE = Principal("engine", Role.CLIENT, tenant="t1")
"""An engine's key in tenant t1: it sees none of the default space's records."""
ENGINE_OPS = {Op.PING, Op.PUT, Op.GET, Op.LOOKUP, Op.DELETE, Op.RANK, Op.ANNOUNCE, Op.RESERVE, Op.RELEASE}
ONE_WAY = {
    Op.MESH: "MESH_WITHOUT_CLUSTER",
    Op.RELAY: "RELAY_UNKNOWN_TARGET",
    Op.SIGNAL: "SIGNAL_WITHOUT_WEBRTC",
}
"""Ops that get no reply, and what a node without a mesh, relay or WebRTC counts for them."""


@dataclass
class Served:
    loop: asyncio.AbstractEventLoop
    node: Node
    server: NodeServer
    stored: dict[bytes, tuple[RecordHeader, bytes]]


def snapshot(node: Node) -> dict[bytes, tuple[RecordHeader, bytes]]:
    return {r.key: (r.header, bytes(r.payload)) for r in node.store.memory.items()}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """One memory-only node holding three of RECORDS (not the last), one loop for all examples."""
    cfg = NodeConfig(
        name="fuzz",
        listen=("tcp://127.0.0.1:0",),
        storage=StorageSettings(
            data_dir="/tmp/lmcache-mesh-fuzz-unused",  # disk_bytes=0: never touched
            memory_bytes=1 << 20,
            disk_bytes=0,
        ),
        limits=LimitsSettings(
            max_header_bytes=LIMITS.max_header_bytes,
            max_record_bytes=LIMITS.max_record_bytes,
            max_keys_per_request=LIMITS.max_keys,
            max_request_bytes=LIMITS.max_request_bytes,
        ),
    )
    node = Node(cfg)
    node.open()
    node.put_records(RECORDS[:3])
    loop = asyncio.new_event_loop()

    async def make() -> NodeServer:
        return NodeServer(node)  # constructed, never started: nothing is bound

    server = loop.run_until_complete(make())
    assert server.limits == LIMITS
    yield Served(loop, node, server, snapshot(node))
    node.close()
    loop.close()


def server_case(fz: Fuzz) -> tuple[Principal, list[bytes]]:
    return (MEMBER if fz.below(3) else ENGINE), request_frames(fz)


async def take(
    server: NodeServer, frames: list[bytes], principal: Principal, wait: bool
) -> list[list[bytes]]:
    replies: list[list[bytes]] = []
    done = asyncio.Event()

    async def reply_to(out: Sequence[Any]) -> None:
        replies.append([bytes(f) for f in out])
        done.set()

    await server.take(list(frames), reply_to, Sender(principal, None, "fuzz"))
    if wait:  # disk-less GETs of absent keys, DELETEs and RANKs are answered from a task
        await asyncio.wait_for(done.wait(), 10)
    return replies


def verified(req: Request) -> bool:
    try:
        for h, p in zip(fields_of(req)["headers"], req.payloads, strict=True):
            ChunkRecord.verified(h, p)
    except (ChecksumMismatch, ValueError):  # a bad payload, or fewer payloads than records (slots)
        return False
    return True


def changes_records(req: Request, principal: Principal) -> bool:
    """A valid PUT or a member's DELETE changes the records, as it should: not sent."""
    return (req.op is Op.PUT and verified(req)) or (req.op is Op.DELETE and principal.role is Role.NODE)


ANSWERS = (Forbidden, ChecksumMismatch, BadRequest, Unavailable, DeadlineExceeded, Busy)
"""What a request that decoded may get from a node without disk, mesh, relay or WebRTC:
refused for its sender or tenant, a bad checksum, ATTACH without a ZeroMQ peer, JOIN or a
routed ANNOUNCE without a mesh, a tiny deadline passed, or a bound reached."""


@FUZZ
@given(fuzzed(server_case))
def test_a_server_answers_garbage_with_typed_errors_and_keeps_its_records(
    served: Served, case: tuple[Principal, list[bytes]]
) -> None:
    principal, frames = case
    node, server = served.node, served.server
    server.sharing.leases.clear()  # a RESERVE of an earlier example announced keys: they would count
    try:
        req: Request | MeshError = decode_request(frames, server.limits)
    except MeshError as exc:
        req = exc
    if isinstance(req, Request) and changes_records(req, principal):
        event("valid PUT or member's DELETE: not sent")
        return
    errors_before, failures_before = dict(node.errors), node.checksum_failures
    one_way = isinstance(req, Request) and req.op in ONE_WAY
    got = served.loop.run_until_complete(take(server, frames, principal, wait=not one_way))

    assert snapshot(node) == served.stored
    assert "INTERNAL" not in node.errors, node.errors
    if isinstance(req, MeshError):  # a request that fails to decode: its error, under its id
        event(f"undecodable: {type(req).__name__}")
        assert len(got) == 1 and len(got[0]) == 1
        with pytest.raises(type(req)) as caught:
            decode_reply(got[0])
        assert str(caught.value) == str(req)
        assert msgpack.unpackb(got[0][0])["id"] == expected_reply_id(frames, server.limits.max_header_bytes)
        assert node.errors[req.code.name] == errors_before.get(req.code.name, 0) + 1
        return
    engine_may = req.op in ENGINE_OPS and (req.op is not Op.ANNOUNCE or fields_of(req)["route"])
    if one_way:  # no reply; counted as refused, or as what this node lacks to act on it
        counted = {k for k, n in node.errors.items() if n != errors_before.get(k, 0)}
        event(f"{req.op.name} as {principal.name}: {', '.join(sorted(counted))}")
        assert got == [] and sum(node.errors.values()) == sum(errors_before.values()) + 1
        assert counted <= {ONE_WAY[req.op], "FORBIDDEN"}
        assert principal is MEMBER or counted == {"FORBIDDEN"}  # gossip is for members only
        return
    assert len(got) == 1
    (reply,) = got
    assert msgpack.unpackb(reply[0])["id"] == req.id
    try:
        ok = decode_reply(reply)
    except ANSWERS as exc:
        event(f"{req.op.name} as {principal.name}: {type(exc).__name__}")
        assert type(exc) is Forbidden or principal is MEMBER or engine_may, f"{req.op.name}: {exc}"
        assert (type(exc) is ChecksumMismatch) == (node.checksum_failures == failures_before + 1)
        return
    event(f"{req.op.name} ok as {principal.name}")
    assert principal is MEMBER or engine_may, f"an engine's key may not use {req.op.name}"
    assert req.op is not Op.PUT, "a PUT whose payloads fail their checksums was stored"
    # Whatever the keys, a reply never carries bytes the node does not hold for them, and an
    # engine in tenant t1 never reaches the default space's records.
    if req.op is Op.LOOKUP:
        assert 0 <= ok.fields["hits"] <= len(fields_of(req)["keys"])
        assert principal is MEMBER or ok.fields["hits"] == 0
    if req.op is Op.GET and ok.fields.get("slots"):
        # payloads left in the node's shared memory (a client on its host reads them there,
        # checking each checksum): only keys it holds have a slot
        for key, slot in zip(fields_of(req)["keys"], ok.fields["slots"], strict=False):
            assert slot is None or (principal is MEMBER and key in served.stored)
        return
    if req.op is Op.GET:
        found, bad = get_results(ok, fields_of(req)["keys"])  # the keys as the client sent them
        assert bad == 0
        for key, rec in zip(fields_of(req)["keys"], found, strict=True):
            if rec is not None:
                assert principal is MEMBER and key in served.stored
                assert (rec.header, bytes(rec.payload)) == served.stored[key]
                assert checksum(rec.payload) == rec.header.checksum
