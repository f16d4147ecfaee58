"""What a tier holds, counted as records come and go: records per tenant, and records,
stored bytes and raw-equivalent bytes per codec (what ``status --json`` and the metrics show)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..codecs import CODECS
from ..records import RecordHeader


@dataclass(slots=True)
class _Bytes:
    records: int = 0
    bytes: int = 0
    raw_bytes: int = 0


@dataclass(slots=True)
class Held:
    tenants: Counter[str] = field(default_factory=Counter)
    """records per tenant ("" = the default space)"""
    codecs: dict[str, _Bytes] = field(default_factory=dict)

    def add_header(self, header: RecordHeader) -> None:
        self.add(header.tenant, header.codec, header.length, header.raw_bytes)

    def remove_header(self, header: RecordHeader) -> None:
        self.remove(header.tenant, header.codec, header.length, header.raw_bytes)

    def add(self, tenant: str, codec: str, length: int, raw_bytes: int) -> None:
        self._change(tenant, codec, length, raw_bytes, 1)

    def remove(self, tenant: str, codec: str, length: int, raw_bytes: int) -> None:
        self._change(tenant, codec, length, raw_bytes, -1)

    def _change(self, tenant: str, codec: str, length: int, raw_bytes: int, sign: int) -> None:
        self.tenants[tenant] += sign
        if self.tenants[tenant] <= 0:
            del self.tenants[tenant]  # stats list live tenants only
        name = codec if codec in CODECS else "other"  # bounded: names come from writers
        tally = self.codecs.setdefault(name, _Bytes())
        tally.records += sign
        tally.bytes += sign * length
        tally.raw_bytes += sign * raw_bytes
        if tally.records <= 0:
            del self.codecs[name]

    def codec_stats(self) -> dict[str, Any]:
        """Per codec: records, bytes stored, and the bytes they hold before their codec."""
        return {
            name: {"records": t.records, "bytes": t.bytes, "raw_bytes": t.raw_bytes}
            for name, t in sorted(self.codecs.items())
        }
