"""Fuzzing record files: decode_file_header, and a DiskTier recovering a data dir with a bad file.

A file's head either decodes into a header whose prefix, checksum and size all agree, or
raises CorruptFile; a file that was damaged never yields other bytes than it was written
with. At start-up a disk tier keeps every good record byte-identical, and a bad file is
discarded or, if it survives the header checks, never read back with wrong bytes.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import xxhash
from hypothesis import event, given, settings

from lmcache_mesh.node import ChecksumMismatch, ChunkRecord, RecordHeader
from lmcache_mesh.node.records import checksum
from lmcache_mesh.node.tiers import DiskTier
from lmcache_mesh.node.tiers.disk import MAX_FILE_HEADER_BYTES, CorruptFile, decode_file_header, encode_file

from .strategies import FUZZ, RECORDS, Fuzz, fuzzed, pack, record_header_map

PREFIX = struct.Struct("<4sHHIQ")
"""magic "LMCR" | u16 file version | u16 reserved | u32 header length | u64 xxh3 of header."""
MAGIC = b"LMCR"

Case = tuple[bytes, int | None, ChunkRecord | None]
"""A file's bytes, the size to check them against, and the record they were written from
(None when they were never a whole record file)."""


def file_bytes(record: ChunkRecord) -> bytes:
    head, payload = encode_file(record)
    return bytes(head) + bytes(payload)


FILES = [file_bytes(r) for r in RECORDS]


def damaged(fz: Fuzz, i: int) -> bytes:
    """RECORDS[i]'s file: whole, with a payload bit flipped (the header checks pass), or
    mutated anywhere."""
    kind = fz.below(8)
    if kind == 0:
        return FILES[i]
    if kind < 3:
        data = bytearray(FILES[i])
        data[len(data) - 1 - fz.below(RECORDS[i].nbytes)] ^= 1 << fz.below(8)
        return bytes(data)
    return fz.mutate(FILES[i])


def record_file(fz: Fuzz) -> Case:
    """A record file, a damaged one, one with a hand-made prefix, or random bytes."""
    kind = fz.below(10)
    if kind < 5:  # a real file, mostly damaged
        i = fz.below(len(RECORDS))
        data = damaged(fz, i)
        size = fz.pick([len(data), len(data), len(data), None, len(FILES[i])])
        return data, size, RECORDS[i]
    if kind < 9:  # a prefix made by hand around a (maybe broken) header
        rec = fz.pick(RECORDS)
        header = pack(record_header_map(fz, rec))
        hlen = (
            len(header) if fz.often() else fz.pick([0, len(header) + 1, MAX_FILE_HEADER_BYTES + 1, 2**32 - 1])
        )
        digest = xxhash.xxh3_64_intdigest(header) if fz.often() else fz.pick([0, 2**64 - 1])
        magic = MAGIC if fz.often(8) else fz.pick([b"LMCQ", b"\0\0\0\0", b"RCML"])
        version = 1 if fz.often(8) else fz.pick([0, 2, 0xFFFF])
        prefix = PREFIX.pack(magic, version, fz.pick([0, 1, 0xFFFF]), hlen, digest)
        payload = bytes(rec.payload) if fz.often() else fz.raw(64)
        data = prefix + header + payload
        return data, fz.pick([len(data), len(data), None, len(data) + 1, len(data) - 1]), None
    return fz.raw(64), fz.pick([None, 0, 24, 2**40]), None


@FUZZ
@given(fuzzed(record_file))
def test_a_file_head_decodes_to_a_consistent_header_or_is_corrupt(case: Case) -> None:
    data, size, origin = case
    head = data[: PREFIX.size + MAX_FILE_HEADER_BYTES]  # what recovery reads
    try:
        header, offset = decode_file_header(head, size)
    except CorruptFile:
        event("corrupt")
        return
    # only CorruptFile may escape: anything else fails the test here
    magic, version, _, hlen, digest = PREFIX.unpack_from(data)
    assert magic == MAGIC and version == 1 and hlen <= MAX_FILE_HEADER_BYTES
    raw = data[PREFIX.size : PREFIX.size + hlen]
    assert len(raw) == hlen and xxhash.xxh3_64_intdigest(raw) == digest
    assert header.encode() == RecordHeader.decode(raw).encode() and offset == PREFIX.size + hlen
    assert size is None or size == offset + header.length
    if origin is None:
        event("decoded")
        return
    # A damaged file passes the header checks only with the header it was written with...
    assert header == origin.header and offset == len(encode_file(origin)[0])
    # ...and then its payload verifies exactly when it is the payload it was written with.
    payload = data[offset : offset + header.length]
    try:
        ChunkRecord.verified(header, payload)
    except ChecksumMismatch:
        event("header intact, payload refused")
        assert payload != bytes(origin.payload) or len(data) != offset + header.length
    else:
        event("intact")
        assert payload == bytes(origin.payload)


GOOD, BAD = RECORDS[:3], RECORDS[3]


def bad_file(fz: Fuzz) -> bytes:
    """What ends up under BAD's file name: its own file damaged, another record's file,
    a hand-made file, or random bytes."""
    kind = fz.below(6)
    if kind < 3:
        return damaged(fz, 3)
    if kind == 3:
        return fz.pick(FILES[:3])  # a whole, valid file under the wrong name
    if kind == 4:
        return record_file(fz)[0]
    return fz.raw(64)


def accepted_at_start(data: bytes) -> bool:
    try:
        header, _ = decode_file_header(data[: PREFIX.size + MAX_FILE_HEADER_BYTES], len(data))
    except CorruptFile:
        return False
    return bool(header.key == BAD.key)


# Each example writes a data dir and opens a tier on it (files, a writer thread): far slower
# than a pure decode, so this test runs 1,000 examples; the 10,000 cases of the decoder
# itself are test_a_file_head_decodes_to_a_consistent_header_or_is_corrupt above.
@settings(FUZZ, max_examples=1_000)
@given(fuzzed(bad_file))
def test_recovery_keeps_good_records_and_never_serves_a_bad_file_with_wrong_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="lmc-fuzz-") as d:
        tier = DiskTier(d, 1 << 20)
        bad_path: Path = tier._path(BAD.key)  # where the tier keeps (and looks for) BAD's file
        for path, contents in [
            *((tier._path(r.key), FILES[i]) for i, r in enumerate(GOOD)),
            (bad_path, data),
        ]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(contents)
        accepted = accepted_at_start(data)
        report = tier.open()  # nothing but a held lock may raise here
        try:
            assert (report.recovered, report.discarded) == (len(GOOD) + accepted, int(not accepted))
            assert bad_path.exists() == accepted and (BAD.key in tier) == accepted
            for r in GOOD:
                got = tier.read(r.key)
                assert got is not None and got.header == r.header and bytes(got.payload) == bytes(r.payload)
            got = tier.read(BAD.key)
            event("served" if got is not None else "refused at start" if not accepted else "refused on read")
            if got is not None:
                # Served only if self-consistent: a file rewritten with a matching header
                # checksum (a forgery, not a corruption) is indistinguishable without a MAC,
                # but its bytes are always the ones its header vouches for.
                assert got.header.key == BAD.key and len(got.payload) == got.header.length
                assert checksum(got.payload) == got.header.checksum
                if got.header.checksum == BAD.header.checksum:
                    assert bytes(got.payload) == bytes(BAD.payload)
            elif accepted:  # dropped on read: gone from the index at once, from disk after the writer
                assert tier.flush(10) and BAD.key not in tier and not bad_path.exists()
                assert tier.counters.corrupt_discarded == 1
            again = tier.read(BAD.key)  # and the same answer again
            assert (again is None) == (got is None)
            assert again is None or bytes(again.payload) == bytes(BAD.payload)
        finally:
            tier.close()
