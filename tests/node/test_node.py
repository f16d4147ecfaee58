"""The embedded Node: the client API in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_mesh.node import Node, NodeConfig, Unavailable, chunk_keys
from lmcache_mesh.node.config import StorageSettings

from ..helpers import payload


def config(tmp_path: Path) -> NodeConfig:
    storage = StorageSettings(data_dir=str(tmp_path), memory_bytes=64 << 10, disk_bytes=1 << 20)
    return NodeConfig(name="n1", listen=(), storage=storage)


def test_put_get_lookup_delete(tmp_path: Path, ns: bytes, keys: list[bytes]) -> None:
    with Node(config(tmp_path)) as node:
        for i, k in enumerate(keys[:4]):
            node.put(k, payload(i), namespace=ns, meta={"tokens": 16})
        assert node.lookup(keys) == 4
        got = node.get(keys[:5])
        assert [None if g is None else bytes(g) for g in got] == [payload(i) for i in range(4)] + [None]
        assert got[0] is not None and got[0].readonly
        assert node.delete(keys[:1]) == 1
        assert node.lookup(keys) == 0
        s = node.stats()
        assert s["counters"]["puts"] == 4 and s["counters"]["misses"] == 1
        assert s["members"][0]["state"] == "alive" and s["node"]["address"] == "embedded"


def test_a_writable_payload_is_copied(tmp_path: Path, ns: bytes, keys: list[bytes]) -> None:
    buf = bytearray(payload(1))
    with Node(config(tmp_path)) as node:
        node.put(keys[0], buf, namespace=ns)
        buf[:4] = b"XXXX"
        got = node.get(keys[:1])[0]
        assert got is not None and bytes(got) == payload(1)


def test_more_than_memory_spills_to_disk_and_survives_restart(tmp_path: Path, ns: bytes) -> None:
    keys = chunk_keys(ns, list(range(16 * 64)), 16)
    with Node(config(tmp_path)) as node:
        for i, k in enumerate(keys):
            node.put(k, payload(i), namespace=ns)  # 64 x 4 KiB = 256 KiB > 64 KiB memory
        assert node.lookup(keys) == 64
    with Node(config(tmp_path)) as node:
        assert node.lookup(keys) == 64
        got = node.get(keys)
        assert all(g is not None and bytes(g) == payload(i) for i, g in enumerate(got))
        assert node.stats()["counters"]["hits_disk"] == 64


def test_closed_node_refuses(tmp_path: Path, ns: bytes, keys: list[bytes]) -> None:
    node = Node(config(tmp_path))
    node.put(keys[0], b"x", namespace=ns)  # opens on first use
    node.close()
    with pytest.raises(Unavailable):
        node.get(keys[:1])


def test_status_counts_bytes_per_codec_in_each_tier_and_after_a_restart(tmp_path: Path, ns: bytes) -> None:
    keys = chunk_keys(ns, list(range(16 * 40)), 16)
    with Node(config(tmp_path)) as node:
        for i, k in enumerate(keys[:20]):
            node.put(k, payload(i), namespace=ns)  # raw, 4 KiB each
        for i, k in enumerate(keys[20:]):
            node.put(k, payload(i)[:1000], namespace=ns, meta={"codec": "int8", "raw_length": 2000})
        node.put(keys[0], b"y" * 10, namespace=ns, meta={"codec": "lz9"})  # replaces a raw one
        memory = node.stats()["tiers"]["memory"]["codecs"]
        held = {c: t["records"] for c, t in memory.items()}
        assert sum(held.values()) == node.stats()["tiers"]["memory"]["entries"]
        if "int8" in memory:
            assert memory["int8"]["raw_bytes"] == 2 * memory["int8"]["bytes"]
        assert "lz9" not in memory  # unknown names are counted as "other" (bounded labels)
    with Node(config(tmp_path)) as node:
        disk = node.stats()["tiers"]["disk"]["codecs"]
        assert disk["int8"] == {"records": 20, "bytes": 20_000, "raw_bytes": 40_000}
        assert disk["other"]["records"] == 1 and disk["raw"]["records"] == 19
        assert disk["raw"]["bytes"] == disk["raw"]["raw_bytes"]
