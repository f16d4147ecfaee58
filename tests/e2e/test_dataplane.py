"""The data plane at real model sizes, against a real daemon: hits of any length come back
whole, records of real models fit at the default settings."""

from __future__ import annotations

import numpy as np
import pytest

from lmcache_mesh.engines.store import MeshStore, StoreConfig
from lmcache_mesh.node.keys import chunk_keys, namespace_id
from lmcache_mesh.node.records import ChunkRecord

from ..conftest import DaemonFactory

LLAMA3_8B_CHUNK = 32 * 2 * 8 * 128 * 2 * 256
"""One 256-token chunk of Llama-3-8B's KV in bf16 (32 layers, K and V, 8 KV heads of 128): 32 MiB."""

LLAMA3_70B_CHUNK = 80 * 2 * 8 * 128 * 2 * 256
"""The same for Llama-3-70B (80 layers): 80 MiB."""


def _namespace(name: bytes) -> bytes:
    return namespace_id(name, {"engine": "test", "dtype": "bf16"}, chunk_tokens=256)


def _chunk(i: int, nbytes: int) -> np.ndarray:
    out = np.empty(nbytes, dtype=np.uint8)
    out[:] = i % 251
    out[:8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)  # distinct even where i % 251 repeats
    return out


def test_a_1_gib_hit_comes_back_whole_from_one_get(daemon_factory: DaemonFactory) -> None:
    """8k tokens of Llama-3-8B KV (32 chunks, 1 GiB) are four times the node's reply limit:
    the client asks again where each reply stopped, so nothing becomes a miss."""
    d = daemon_factory("--memory", "1200MiB", "--disk", "0")
    ns = _namespace(b"llama-3-8b")
    keys = chunk_keys(ns, list(range(256 * 32)), 256)
    with d.client(timeout_s=60) as client:
        client.put_records([ChunkRecord.build(k, _chunk(i, LLAMA3_8B_CHUNK), ns) for i, k in enumerate(keys)])
        records = client.get_records(keys, timeout_s=60)
        assert all(r is not None for r in records), [i for i, r in enumerate(records) if r is None]
        for i, r in enumerate(records):
            assert r is not None and r.nbytes == LLAMA3_8B_CHUNK
            assert int.from_bytes(bytes(memoryview(r.payload)[:8]), "little") == i
        assert client.checksum_failures == 0


def test_a_70b_chunk_is_stored_and_served_at_default_limits(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--memory", "256MiB", "--disk", "0")
    ns = _namespace(b"llama-3-70b")
    key = chunk_keys(ns, list(range(256)), 256)[0]
    chunk = _chunk(7, LLAMA3_70B_CHUNK)
    with d.client(timeout_s=30) as client:
        client.put_records([ChunkRecord.build(key, chunk, ns)])
        (record,) = client.get_records([key])
        assert record is not None and memoryview(record.payload) == memoryview(chunk)


def test_an_adapter_refuses_at_start_a_node_that_cannot_hold_one_chunk(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--max-record", "16MiB", "--disk", "0")
    store = MeshStore(StoreConfig(node=d.address))
    try:
        store.check_chunk_bytes(16 << 20)  # fits exactly
        with pytest.raises(ValueError, match=r"--max-record 32MiB"):
            store.check_chunk_bytes(LLAMA3_8B_CHUNK)
    finally:
        store.close()
