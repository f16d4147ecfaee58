"""Chunk records: encoding, golden bytes, verification."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import msgpack
import pytest

from lmcache_mesh.node import (
    BadRequest,
    ChecksumMismatch,
    ChunkRecord,
    RecordHeader,
    TooLarge,
    UnsupportedVersion,
)
from lmcache_mesh.node.tiers.disk import CorruptFile, decode_file_header, encode_file

DATA = Path(__file__).parent / "data"


def _golden_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def golden(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_header_round_trip_matches_golden_bytes() -> None:
    record = _golden_module().golden_record()
    assert record.header.encode() == golden("record_v1.header.bin")
    assert RecordHeader.decode(golden("record_v1.header.bin")) == record.header


def test_file_round_trip_matches_golden_bytes() -> None:
    record = _golden_module().golden_record()
    head, payload = encode_file(record)
    data = golden("record_v1.bin")
    assert head + bytes(payload) == data
    header, offset = decode_file_header(data, len(data))
    assert header == record.header
    assert bytes(ChunkRecord.verified(header, data[offset:]).payload) == bytes(record.payload)


@pytest.mark.parametrize(
    "name, message",
    [
        ("record_v1_truncated.bin", "torn file"),
        ("record_v1_bad_magic.bin", "bad magic"),
        ("record_v1_bad_header_checksum.bin", "header checksum mismatch"),
        ("record_v2_file_version.bin", "file version 2 not supported"),
    ],
)
def test_malformed_files_fail_with_exact_errors(name: str, message: str) -> None:
    data = golden(name)
    with pytest.raises(CorruptFile, match=message):
        decode_file_header(data, len(data))


def test_flipped_payload_byte_fails_the_checksum() -> None:
    data = golden("record_v1_bad_payload.bin")
    header, offset = decode_file_header(data, len(data))
    with pytest.raises(ChecksumMismatch, match="checksum mismatch"):
        ChunkRecord.verified(header, data[offset:])


def test_wrong_length_payload_fails() -> None:
    record = _golden_module().golden_record()
    with pytest.raises(ChecksumMismatch, match="header says"):
        ChunkRecord.verified(record.header, bytes(record.payload)[:-1])


def test_build_takes_meta_and_rejects_unknown_keys() -> None:
    rec = ChunkRecord.build(b"k" * 16, b"abc", b"n" * 16, {"tokens": 256, "shape": (1, 3), "dtype": "u8"})
    assert rec.header.tokens == 256 and rec.header.shape == (1, 3) and rec.nbytes == 3
    with pytest.raises(ValueError, match="unknown meta keys"):
        ChunkRecord.build(b"k" * 16, b"abc", b"n" * 16, {"colour": "red"})
    with pytest.raises(ValueError, match="16 bytes"):
        ChunkRecord.build(b"k", b"abc", b"n" * 16)


def _wire(**changes: object) -> bytes:
    m = ChunkRecord.build(b"k" * 16, b"abc", b"n" * 16).header.to_wire()
    m.update(changes)
    return msgpack.packb(m)


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"\xc1garbage", BadRequest, "not valid msgpack"),
        (msgpack.packb([1, 2]), BadRequest, "must be a msgpack map"),
        (_wire(v=99), UnsupportedVersion, r"must be in range \[1, 1\]"),
        (_wire(key=b"short"), BadRequest, "'key' must be 16 bytes"),
        (_wire(len=-1), BadRequest, "'len' must be a non-negative int"),
        (_wire(shape=[1, "x"]), BadRequest, "'shape'"),
        (_wire(layout=[1]), BadRequest, "'layout' must be a map"),
        (b"\x80" * 20000, TooLarge, "exceeds"),
    ],
)
def test_malformed_headers_fail_with_typed_errors(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        RecordHeader.decode(data)
