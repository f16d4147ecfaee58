"""Fuzzing record headers, payload verification and the reading of GET replies.

A record header either decodes into one whose every field is in range, or raises one of
its typed errors; a payload is accepted exactly when its length and xxh3 match the header;
a GET reply yields, per key, None or a record that belongs to the key and verifies.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import event, given

from lmcache_mesh.node import (
    BadRequest,
    ChecksumMismatch,
    ChunkRecord,
    MeshError,
    RecordHeader,
    TooLarge,
    UnsupportedVersion,
)
from lmcache_mesh.node.protocol import decode_reply, get_results, ok_reply
from lmcache_mesh.node.records import MAX_RECORD_HEADER_BYTES, RECORD_VERSION, TENANT_RE

from .strategies import FUZZ, RECORDS, Fuzz, fuzzed, is_int, pack, record_header_map

HEADER_ERRORS = (BadRequest, TooLarge, UnsupportedVersion)
MAX_ERROR_TEXT = 400
BY_KEY = {r.key: r for r in RECORDS}
ABSENT = b"\xaa" * 16
OVERSIZE = pack({**RECORDS[0].header.to_wire(), "pad": b"\0" * MAX_RECORD_HEADER_BYTES})


def broken_header_map(fz: Fuzz) -> dict[str, Any]:
    """A real header map with 1-3 fields dropped, retyped or added (sometimes none)."""
    return record_header_map(fz, fz.pick(RECORDS), broken=fz.below(2) == 0)


def header_bytes(fz: Fuzz) -> bytes:
    kind = fz.below(10)
    if kind < 6:
        return pack(broken_header_map(fz))
    if kind < 8:
        return fz.mutate(fz.pick(RECORDS).header.encode())
    if kind == 8:
        return pack(fz.junk()) if fz.below(2) else OVERSIZE
    return fz.raw(64)


@FUZZ
@given(fuzzed(header_bytes))
def test_any_bytes_decode_to_a_valid_record_header_or_a_typed_error(data: bytes) -> None:
    try:
        m = msgpack.unpackb(data, raw=False) if len(data) <= MAX_RECORD_HEADER_BYTES else None
    except Exception:
        m = None
    try:
        h = RecordHeader.decode(data)
    except MeshError as exc:
        event(type(exc).__name__)
        assert type(exc) in HEADER_ERRORS, f"{type(exc).__name__}: {exc}"
        assert (type(exc) is TooLarge) == (len(data) > MAX_RECORD_HEADER_BYTES)
        if isinstance(m, dict):  # the map decoded: the version is checked first
            v = m.get("v")
            bad_version = not isinstance(v, int) or isinstance(v, bool) or v != RECORD_VERSION
            assert (type(exc) is UnsupportedVersion) == bad_version
            with pytest.raises(type(exc)):  # the same verdict on the decoded map
                RecordHeader.from_wire(m)
        assert len(str(exc)) <= MAX_ERROR_TEXT, str(exc)[:200]
        return
    event("decoded")
    assert isinstance(m, dict)
    assert h.version == m["v"] == RECORD_VERSION
    assert isinstance(h.key, bytes) and len(h.key) == 16 and h.key == m["key"]
    assert isinstance(h.namespace, bytes) and len(h.namespace) == 16 and h.namespace == m["ns"]
    assert is_int(h.length) and h.length >= 0 and h.length == m["len"]
    assert is_int(h.checksum) and h.checksum >= 0 and h.checksum == m["xxh3"]
    assert is_int(h.tokens) and h.tokens >= 0 and h.tokens == m.get("tokens", 0)
    assert isinstance(h.layout, dict) and isinstance(h.dtype, str) and isinstance(h.codec, str)
    assert all(isinstance(d, int) and d >= 0 for d in h.shape)
    assert h.tenant == m.get("tenant", "") and (h.tenant == "" or TENANT_RE.match(h.tenant))
    assert RecordHeader.decode(h.encode()).encode() == h.encode()  # what we decode, we can write


def payload_case(fz: Fuzz) -> tuple[RecordHeader, Any, bytes | None]:
    """A header, a payload to check against it, and the payload it was built for (None when
    the header is fuzzed: then only its length and checksum say what matches)."""
    rec = fz.pick(RECORDS)
    header: RecordHeader = rec.header
    original: bytes | None = bytes(rec.payload)
    if not fz.often():
        try:
            header = RecordHeader.from_wire(broken_header_map(fz))
            if (header.length, header.checksum) != (rec.header.length, rec.header.checksum):
                original = None
        except MeshError:
            pass
    kind = fz.below(6)
    if kind < 2:
        payload = original if original is not None else bytes(rec.payload)
    elif kind < 4:
        payload = fz.mutate(bytes(rec.payload))
    elif kind == 4:
        payload = bytes(fz.pick(RECORDS).payload)
    else:
        payload = fz.raw(64)
    wrap = fz.pick([bytes, bytearray, memoryview])
    return header, wrap(payload), original


@FUZZ
@given(fuzzed(payload_case))
def test_a_payload_is_accepted_exactly_when_it_matches_its_header(
    case: tuple[RecordHeader, Any, bytes | None],
) -> None:
    header, payload, original = case
    matches = len(payload) == header.length and xxhash.xxh3_64_intdigest(payload) == header.checksum
    if original is not None:
        assert matches == (bytes(payload) == original)
    try:
        rec = ChunkRecord.verified(header, payload)
    except MeshError as exc:
        event("refused")
        assert type(exc) is ChecksumMismatch and not matches, exc
    else:
        event("accepted")
        assert matches and rec.header is header and rec.payload is payload


def get_reply(fz: Fuzz) -> tuple[list[bytes], list[bytes], list[RecordHeader | None] | None]:
    """GET reply frames for some keys, the keys, and the header each key must get (None
    when that is unknown: a fuzzed header may or may not still be valid)."""
    keys = [fz.pick([*BY_KEY, ABSENT]) for _ in range(fz.below(5))]
    raw: list[Any] = []
    frames: list[bytes] = []
    expect: list[RecordHeader | None] = []
    exact = True
    for key in keys:
        rec = BY_KEY.get(key)
        kind = fz.below(8)
        want: RecordHeader | None = None
        if rec is None or kind == 0:  # a miss
            raw.append(None)
            expect.append(None)
            continue
        if kind < 4:
            raw.append(rec.header.to_wire())
            want = rec.header
        elif kind == 4:  # another key's record
            raw.append(fz.pick([r for r in RECORDS if r.key != key]).header.to_wire())
        elif kind == 5:
            raw.append(fz.junk())
        else:
            raw.append(record_header_map(fz, rec, broken=True))
            exact = False  # it may still be a valid header of this key
        payload = bytes(rec.payload)
        if fz.below(4) == 3:
            changed = fz.mutate(payload)
            want = want if changed == payload else None
            payload = changed
        if raw[-1] is not None:  # the server sends a payload per record it found
            frames.append(payload)
        expect.append(want)
    reply_records: Any = raw
    kind = fz.below(10)
    if kind == 0 and frames:  # a payload frame missing: the records after it shift
        del frames[fz.below(len(frames))]
        exact = False
    elif kind == 1:
        frames.append(fz.raw(32))  # an extra frame is ignored
    elif kind == 2:
        reply_records = fz.pick([raw[:-1], [*raw, None], fz.junk(), None])  # the wrong length, or no list
        exact = False
    return [ok_reply(7, records=reply_records), *frames], keys, expect if exact else None


@FUZZ
@given(fuzzed(get_reply))
def test_a_get_reply_yields_per_key_none_or_a_verified_record_of_that_key(
    case: tuple[list[bytes], list[bytes], list[RecordHeader | None] | None],
) -> None:
    frames, keys, expect = case
    reply = decode_reply(frames)
    raw = reply.fields.get("records")
    try:
        found, bad = get_results(reply, keys)
    except MeshError as exc:
        event("no per-key list")
        assert type(exc) is BadRequest
        assert not isinstance(raw, list) or len(raw) != len(keys)
        return
    assert isinstance(raw, list) and len(raw) == len(keys) == len(found)
    assert bad == sum(h is not None for h in raw) - sum(r is not None for r in found)
    event(f"{bad} bad")
    for key, rec in zip(keys, found, strict=True):
        if rec is not None:
            assert rec.key == key and rec.nbytes == len(rec.payload)
            assert xxhash.xxh3_64_intdigest(rec.payload) == rec.header.checksum
            assert bytes(rec.payload) == bytes(BY_KEY[key].payload)
    if expect is not None:
        assert [None if r is None else r.header for r in found] == expect
