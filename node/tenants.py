"""Tenants: each tenant's chunks live under keys that no other tenant can name.

A node admitting a client's request in tenant T replaces every chunk key k by
``blake2b(k, key=T)`` (the default tenant "" by an unkeyed blake2b under another
personalisation): a chunk stored for T can only be hit, read, deleted or ranked by a
request in T, whatever keys another tenant sends — no client ever names a stored key
directly, so knowing T's name and prompt is not enough. Only a mesh member forwards keys
already scoped (``"scoped": true``). The mesh (ring, replicas, index) only ever sees the
scoped keys; replies carry the client's own keys back. Records are labelled with their
tenant, so a node can count what it holds per tenant without knowing anyone's keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from .keys import KEY_BYTES
from .records import ChunkRecord, RecordHeader

KEY_FIELDS = ("keys", "add", "remove")
"""Request fields that hold chunk keys."""

B = TypeVar("B")


def scoped_key(tenant: str, key: bytes) -> bytes:
    if not tenant:
        return hashlib.blake2b(key, digest_size=KEY_BYTES, person=b"lmcache-default").digest()
    return hashlib.blake2b(key, digest_size=KEY_BYTES, key=tenant.encode(), person=b"lmcache-tenant").digest()


def scope_body(body: B, tenant: str) -> B:
    """A request body with every chunk key scoped to ``tenant`` (a new body; the old one stays)."""
    changes = {
        name: [scoped_key(tenant, k) for k in getattr(body, name)]
        for name in KEY_FIELDS
        if hasattr(body, name)
    }
    return replace(body, **changes) if changes else body  # type: ignore[type-var]  # bodies are dataclasses


def client_records(
    found: Sequence[ChunkRecord | None], client_keys: Sequence[bytes], tenant: str
) -> list[RecordHeader | None]:
    """Headers of a GET reply to a client: its own keys back; a record labelled for another
    tenant (which no scoped key should reach) is a miss."""
    return [
        None if r is None or r.header.tenant != tenant else client_header(r, k)
        for r, k in zip(found, client_keys, strict=True)
    ]


def admit_headers(headers: Sequence[RecordHeader], tenant: str) -> list[RecordHeader]:
    """Record headers as stored: scoped key, labelled with the tenant that put them."""
    return [replace(h, key=scoped_key(tenant, h.key), tenant=tenant) for h in headers]


def client_header(record: ChunkRecord, client_key: bytes) -> RecordHeader:
    """A stored record's header as its tenant's client knows it."""
    return replace(record.header, key=client_key, tenant="")
