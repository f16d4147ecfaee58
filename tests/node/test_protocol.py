"""Request decoding: every malformed variant gets its own typed error."""

from __future__ import annotations

import msgpack
import pytest

from lmcache_mesh.node import BadRequest, ChunkRecord, TooLarge, UnknownOp, UnsupportedVersion
from lmcache_mesh.node.errors import ErrorCode, error_from_wire
from lmcache_mesh.node.protocol import Limits, Op, peek_request_id, request_header
from lmcache_mesh.node.requests import decode_request

LIMITS = Limits(max_header_bytes=4096, max_record_bytes=1000, max_keys=8)
REC = ChunkRecord.build(b"k" * 16, b"x" * 10, b"n" * 16)


def hdr(**m: object) -> bytes:
    return msgpack.packb({"v": 1, "id": 7, "timeout_ms": 100, **m})


def test_valid_requests_decode() -> None:
    r = decode_request([request_header(Op.GET, 3, 50, keys=[b"a" * 16])], LIMITS)
    assert (r.op, r.id, r.timeout_ms, r.body.keys) == (Op.GET, 3, 50, [b"a" * 16])
    r = decode_request([hdr(op=2, records=[REC.header.to_wire()]), b"x" * 10], LIMITS)
    assert r.op is Op.PUT and r.body.headers == [REC.header] and len(r.payloads) == 1
    assert decode_request([hdr(op=1)], LIMITS).op is Op.PING
    r = decode_request([hdr(op=7, **{"from": "tcp://127.0.0.1:1"}), b"gossip"], LIMITS)
    assert r.op is Op.MESH and r.body.sender == "tcp://127.0.0.1:1" and r.payloads == [b"gossip"]
    r = decode_request([hdr(op=9, holder="n1", add=[b"a" * 16])], LIMITS)
    assert (r.body.holder, r.body.add, r.body.remove) == ("n1", [b"a" * 16], [])
    r = decode_request([hdr(op=4, keys=[b"a" * 16], local=True, holders=True)], LIMITS)
    assert r.body.local and r.body.holders


@pytest.mark.parametrize(
    "frames, error, message",
    [
        ([], BadRequest, "empty message"),
        ([b"\xc1\xc1"], BadRequest, "not valid msgpack"),
        ([msgpack.packb("hello")], BadRequest, "must be a msgpack map"),
        ([b"\x80" * 5000], TooLarge, "request header of 5000 bytes exceeds the limit of 4096"),
        (
            [hdr(v=2, op=1)],
            UnsupportedVersion,
            r"protocol version 2 not supported; must be in range \[1, 1\]",
        ),
        ([hdr(v="1", op=1)], UnsupportedVersion, "not supported"),
        ([hdr(op=99)], UnknownOp, "unknown op 99"),
        ([hdr(op=1, id=-1)], BadRequest, "'id' must be a non-negative int"),
        ([hdr(op=1, timeout_ms=0)], BadRequest, "'timeout_ms' must be a positive int"),
        ([hdr(op=3)], BadRequest, "'keys' must be a list"),
        ([hdr(op=3, keys=[b"short"])], BadRequest, "every key must be 16 bytes"),
        ([hdr(op=3, keys=[b"k" * 16] * 9)], TooLarge, "9 keys in one request exceed the limit of 8"),
        ([hdr(op=3, keys=[b"k" * 16]), b"extra"], BadRequest, "GET takes no payload frames"),
        ([hdr(op=2, records=[])], BadRequest, "non-empty list 'records'"),
        (
            [hdr(op=2, records=[REC.header.to_wire()])],
            BadRequest,
            "1 records to come in frames but 0 payload frames",
        ),
        (
            [hdr(op=2, records=[{**REC.header.to_wire(), "len": 5000}]), b"x"],
            TooLarge,
            "record of 5000 bytes exceeds",
        ),
        (
            [hdr(op=2, records=[{**REC.header.to_wire(), "v": 9}]), b"x"],
            UnsupportedVersion,
            "record version 9",
        ),
        (
            [hdr(op=2, records=[REC.header.to_wire()], replica="yes"), b"x" * 10],
            BadRequest,
            "'replica' must be a boolean",
        ),
        ([hdr(op=3, keys=[b"k" * 16], local=1)], BadRequest, "'local' must be a boolean"),
        (
            [hdr(op=7, **{"from": "tcp://a:1"})],
            BadRequest,
            "MESH needs a string 'from' and exactly one payload",
        ),
        ([hdr(op=7), b"d"], BadRequest, "MESH needs a string 'from'"),
        ([hdr(op=8, seeds=[])], BadRequest, "JOIN needs a non-empty list 'seeds'"),
        ([hdr(op=9, add=[b"k" * 16])], BadRequest, "field 'holder' must be a non-empty string"),
        ([hdr(op=9, holder="h", add=[b"short"])], BadRequest, "every key must be 16 bytes"),
        ([hdr(op=9, holder="h", remove="x")], BadRequest, "'remove' must be a list"),
        (
            [hdr(op=11, keys=[b"k" * 16], candidates=[1])],
            BadRequest,
            "'candidates' must be a list of strings",
        ),
    ],
)
def test_malformed_requests(frames: list[bytes], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_request(frames, LIMITS)


def test_request_id_is_recovered_from_broken_headers_when_possible() -> None:
    assert peek_request_id(hdr(op=99, id=42)) == 42
    assert peek_request_id(b"\xc1") == 0
    assert peek_request_id(msgpack.packb({"id": "x"})) == 0


def test_every_error_code_maps_back_to_its_exception() -> None:
    for code in ErrorCode:
        assert error_from_wire(int(code), "m").code is code
    assert error_from_wire(999, "m").code is ErrorCode.INTERNAL


@pytest.mark.parametrize(
    ("op", "fields", "frames"),
    [
        (Op.ATTACH, {}, 0),  # no name
        (Op.ATTACH, {"name": 7}, 0),
        (Op.RELAY, {"to": "edge"}, 0),  # nothing to forward
        (Op.RELAY, {"to": ""}, 1),
        (Op.SIGNAL, {"from": "tcp://a:1", "name": "a", "session": "s", "kind": "hello", "sdp": "x"}, 0),
        (Op.SIGNAL, {"from": "tcp://a:1", "name": "a", "session": "s", "kind": "offer"}, 0),  # no sdp
        (
            Op.SIGNAL,
            {"from": "tcp://a:1", "name": "a", "session": "s", "kind": "offer", "sdp": "x" * (65 << 10)},
            0,
        ),
        (Op.SIGNAL, {"name": "a", "session": "s", "kind": "answer", "sdp": "x"}, 0),  # no sender address
    ],
)
def test_malformed_relay_and_signaling_requests_are_bad_requests(op: Op, fields: dict, frames: int) -> None:
    with pytest.raises(BadRequest):
        decode_request([request_header(op, 1, 1000, **fields), *([b"x"] * frames)], Limits())


def test_relay_and_signaling_requests_decode() -> None:
    req = decode_request([request_header(Op.RELAY, 1, 1000, to="edge"), b"inner", b"payload"], Limits())
    assert req.body.to == "edge" and [bytes(p) for p in req.payloads] == [b"inner", b"payload"]
    sig = {"from": "webrtc://h:1/a", "name": "a", "session": "s1", "kind": "refuse", "reason": "no"}
    assert decode_request([request_header(Op.SIGNAL, 1, 1000, **sig)], Limits()).body.signal.sdp == ""
