"""Writes the golden record files in this folder. Run once when the format changes on purpose:

    python tests/node/data/make_golden.py

The tests compare fresh encodings with these bytes, so an accidental format change fails.
"""

from __future__ import annotations

import struct
from pathlib import Path

from lmcache_mesh.node import ChunkRecord, chunk_keys, namespace_id
from lmcache_mesh.node.tiers.disk import encode_file

HERE = Path(__file__).parent


def golden_record() -> ChunkRecord:
    ns = namespace_id(b"golden-model", {"engine": "test", "dtype": "f16"}, 4)
    key = chunk_keys(ns, [1, 2, 3, 4], 4)[0]
    payload = bytes(range(256)) * 4
    return ChunkRecord.build(
        key, payload, ns, {"tokens": 4, "dtype": "f16", "shape": [2, 256], "layout": {"n_layers": 2}}
    )


def main() -> None:
    record = golden_record()
    head, payload = encode_file(record)
    good = head + bytes(payload)
    (HERE / "record_v1.header.bin").write_bytes(record.header.encode())
    (HERE / "record_v1.bin").write_bytes(good)
    (HERE / "record_v1_truncated.bin").write_bytes(good[:-100])
    (HERE / "record_v1_bad_magic.bin").write_bytes(b"XXXX" + good[4:])
    flipped = bytearray(good)
    flipped[30] ^= 0xFF  # inside the msgpack header
    (HERE / "record_v1_bad_header_checksum.bin").write_bytes(bytes(flipped))
    flipped = bytearray(good)
    flipped[-1] ^= 0x01  # last payload byte
    (HERE / "record_v1_bad_payload.bin").write_bytes(bytes(flipped))
    (HERE / "record_v2_file_version.bin").write_bytes(good[:4] + struct.pack("<H", 2) + good[6:])


if __name__ == "__main__":
    main()
