"""Chunk records: a msgpack header plus the raw KV payload of one chunk.

The header carries everything a reader needs to trust and use the payload: format
version, key, namespace, token count, layout, dtype, shape, codec, payload length and an
xxh3-64 checksum of the payload. Decoding checks length, then version, then checksum;
every failure is a typed error, and a record that fails is never handed out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from lmcache_mesh.mesh.errors import BadRequest, ChecksumMismatch, TooLarge, UnsupportedVersion
from lmcache_mesh.transports import wire
from lmcache_mesh.transports.base import Buffer as Buffer  # records keep payloads without copying

from .keys import KEY_BYTES

RECORD_VERSION_MIN = 1
RECORD_VERSION_MAX = 1
RECORD_VERSION = 1
"""Version of the record header layout we write."""

MAX_RECORD_HEADER_BYTES = 16 * 1024
"""Largest encoded record header we accept; a header only describes a payload."""


TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A tenant name: short, printable, safe in file names and metric labels."""

META_FIELDS = ("tokens", "layout", "dtype", "shape", "codec", "raw_length")
"""Keys a caller may pass in ``meta`` when putting a chunk."""


def unpack_map(frame: Buffer, limit: int, what: str) -> dict[str, Any]:
    """Decode a msgpack map of at most ``limit`` bytes; raises TooLarge or BadRequest naming ``what``."""
    m: dict[str, Any] = wire.unpack_map(frame, limit, what, BadRequest, TooLarge)
    return m


def checksum(payload: Buffer) -> int:
    """xxh3-64 of the payload bytes."""
    return xxhash.xxh3_64_intdigest(payload)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """What is known about one chunk's payload; ``length`` and ``checksum`` bind it."""

    key: bytes
    namespace: bytes
    length: int
    checksum: int
    tokens: int = 0
    layout: Mapping[str, Any] = field(default_factory=dict)
    dtype: str = "uint8"
    shape: tuple[int, ...] = ()
    codec: str = "raw"
    version: int = RECORD_VERSION
    tenant: str = ""
    """Whose chunk this is, set by the node that admitted it ("": the shared default space)."""
    raw_length: int = 0
    """Bytes of the payload before its codec (0: as stored); for accounting only."""
    wire_coded: bool = False
    """Re-encoded for the trip by a node that sent it (``wire_codec``), not by its writer."""

    @property
    def raw_bytes(self) -> int:
        return self.length if self.codec == "raw" else self.raw_length or self.length

    def to_wire(self) -> dict[str, Any]:
        """The header as a msgpack-ready map (the on-disk and on-wire form)."""
        wire = {
            "v": self.version,
            "key": self.key,
            "ns": self.namespace,
            "len": self.length,
            "xxh3": self.checksum,
            "tokens": self.tokens,
            "layout": dict(self.layout),
            "dtype": self.dtype,
            "shape": list(self.shape),
            "codec": self.codec,
        }
        if self.tenant:
            wire["tenant"] = self.tenant
        if self.raw_length:
            wire["raw"] = self.raw_length
        if self.wire_coded:
            wire["wire"] = True
        return wire

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(self.to_wire(), use_bin_type=True)
        return packed

    @classmethod
    def from_wire(cls, m: object) -> RecordHeader:
        """Validate a decoded header map; raises BadRequest/UnsupportedVersion naming the field."""
        if not isinstance(m, dict):
            raise BadRequest(f"record header must be a map, got {type(m).__name__}")
        version: Any = m.get("v")
        if not wire.is_int(version) or not RECORD_VERSION_MIN <= version <= RECORD_VERSION_MAX:
            raise UnsupportedVersion(
                f"record version {version!r:.40} not supported; must be in range "
                f"[{RECORD_VERSION_MIN}, {RECORD_VERSION_MAX}]"
            )
        # Checked in this order (the first bad field is the one named): key and namespace,
        # the counts, layout, dtype and codec, shape, tenant.
        f = wire.Fields(m, BadRequest, "record header field")
        key, namespace = f.blob("key", KEY_BYTES), f.blob("ns", KEY_BYTES)
        length, digest = f.integer("len", lo=0, width=60), f.integer("xxh3", lo=0, width=60)
        tokens = f.integer("tokens", 0, lo=0, width=60)
        layout = f.mapping("layout", {})
        dtype, codec = f.raw("dtype", "uint8"), f.raw("codec", "raw")
        if not isinstance(dtype, str) or not isinstance(codec, str):
            raise BadRequest("record header fields 'dtype' and 'codec' must be strings")
        shape = f.raw("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise f.fail("shape", "a list of non-negative ints", shape, width=60)
        tenant = f.raw("tenant", "")
        if not isinstance(tenant, str) or (tenant and not TENANT_RE.match(tenant)):
            raise f.fail("tenant", "a tenant name", tenant, width=80)
        raw_length = f.integer("raw", 0, lo=0, width=60)
        return cls(
            key,
            namespace,
            length,
            digest,
            tokens,
            layout,
            dtype,
            tuple(shape),
            codec,
            version,
            tenant,
            raw_length,
            f.flag("wire"),
        )

    @classmethod
    def decode(cls, data: Buffer) -> RecordHeader:
        return cls.from_wire(unpack_map(data, MAX_RECORD_HEADER_BYTES, "record header"))


def describe(
    key: bytes, length: int, digest: int, namespace: bytes, meta: Mapping[str, Any] | None = None
) -> RecordHeader:
    """The header of a payload of ``length`` bytes whose xxh3-64 is ``digest``; ``meta`` holds
    optional META_FIELDS (ValueError on others)."""
    if len(key) != KEY_BYTES or len(namespace) != KEY_BYTES:
        raise ValueError(f"key and namespace must be {KEY_BYTES} bytes each")
    meta = dict(meta or {})
    unknown = set(meta) - set(META_FIELDS)
    if unknown:
        raise ValueError(f"unknown meta keys {sorted(unknown)}; allowed: {', '.join(META_FIELDS)}")
    return RecordHeader.from_wire(
        {
            "v": RECORD_VERSION,
            "key": bytes(key),
            "ns": bytes(namespace),
            "len": length,
            "xxh3": digest,
            "tokens": meta.get("tokens", 0),
            "layout": meta.get("layout", {}),
            "dtype": meta.get("dtype", "uint8"),
            "shape": list(meta.get("shape", ())),
            "codec": meta.get("codec", "raw"),
            "raw": meta.get("raw_length", 0),
        }
    )


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One chunk: its header and its payload (kept as given, never copied)."""

    header: RecordHeader
    payload: Buffer

    @property
    def key(self) -> bytes:
        return self.header.key

    @property
    def nbytes(self) -> int:
        return self.header.length

    @property
    def raw_nbytes(self) -> int:
        return self.header.raw_bytes

    @property
    def wire_coded(self) -> bool:
        return self.header.wire_coded

    @classmethod
    def build(
        cls, key: bytes, payload: Buffer, namespace: bytes, meta: Mapping[str, Any] | None = None
    ) -> ChunkRecord:
        """A record for ``payload``, checksummed now; ``meta`` holds optional META_FIELDS."""
        view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
        return cls(describe(key, len(view), checksum(view), namespace, meta), view)

    @classmethod
    def verified(cls, header: RecordHeader, payload: Buffer) -> ChunkRecord:
        """The record if ``payload`` matches ``header``; raises ChecksumMismatch otherwise."""
        if len(payload) != header.length:
            raise ChecksumMismatch(
                f"payload of {len(payload)} bytes for key {header.key.hex()} but header says {header.length}"
            )
        if checksum(payload) != header.checksum:
            raise ChecksumMismatch(f"payload checksum mismatch for key {header.key.hex()}")
        return cls(header, payload)
