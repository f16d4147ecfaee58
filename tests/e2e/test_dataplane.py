"""The data plane at real model sizes, against a real daemon: hits of any length come back
whole, records of real models fit at the default settings."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from lmcache_mesh.engines.store import MeshStore, StoreConfig
from lmcache_mesh.node.client import Client
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


# shared memory between a node and the engines on its host


def _records(ns: bytes, n: int, nbytes: int, salt: int = 0) -> list[ChunkRecord]:
    keys = chunk_keys(ns, list(range(16 * n)), 16)
    return [ChunkRecord.build(k, _chunk(i + salt, nbytes), ns) for i, k in enumerate(keys)]


def _shared(client: Client) -> dict[str, Any]:
    shared: dict[str, Any] = client.stats()["tiers"]["memory"]["shared"]
    return shared


def test_chunks_fetched_from_peers_reach_a_local_engine_in_shared_memory(
    daemon_factory: DaemonFactory,
) -> None:
    """The engine's node keeps what it fetched in its arena and hands over those copies in
    place (not the frames it received): one copy on the way, at any distance."""
    flags = ("--memory", "64MiB", "--disk", "0", "--replicas", "1")
    holder = daemon_factory(*flags)
    near = daemon_factory(*flags, "--join", holder.tcp)
    ns = _namespace(b"fetched")
    records = _records(ns, 12, 1 << 20)
    keys = [r.key for r in records]
    with holder.client() as c:
        c.put_records(records)
    with near.client(timeout_s=10) as engine:
        deadline = time.monotonic() + 20
        while engine.lookup(keys) < len(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # replicas of the keys this node owns have landed
        remote = [i for i, hs in enumerate(engine.locate(keys)[1]) if near.name not in hs]
        assert remote, "with one replica each, the holder alone keeps the keys it owns"
        with engine.read(keys) as lease:
            assert lease.hits == 12 and engine.transport == "shared memory"
            assert lease._unverified == set(range(12)), (
                "every chunk, fetched or not, is a view into the arena"
            )
            out = np.empty(1 << 20, dtype=np.uint8)
            for i, record in enumerate(records):
                assert lease.copy_into(i, out) and out.tobytes() == bytes(memoryview(record.payload))
        assert engine.stats()["mesh"]["remote_hits"] == len(remote)


def test_a_local_client_reads_and_writes_through_shared_memory(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--memory", "64MiB", "--disk", "0")
    ns = _namespace(b"shm")
    records = _records(ns, 8, 1 << 20)
    keys = [r.key for r in records]
    with d.client(timeout_s=10) as writer, Client(d.address, timeout_s=10) as reader:
        writer.put_records(records)
        assert writer.transport == "shared memory"
        with reader.read(keys) as lease:
            assert reader.transport == "shared memory" and lease.shared and lease.hits == 8
            out = np.empty(1 << 20, dtype=np.uint8)
            for i, record in enumerate(records):
                assert lease.copy_into(i, out) and out.tobytes() == bytes(memoryview(record.payload))
            assert _shared(reader)["leases"]["held"] == 1
        got = reader.get_records(keys)  # copies that outlive the lease
        assert [bytes(memoryview(g.payload)) if g else None for g in got] == [
            bytes(r.payload) for r in records
        ]
        leases = _shared(reader)["leases"]
        assert leases["held"] == 0 and leases["committed"] >= 1 and leases["granted_reads"] == 2
        assert reader.checksum_failures == 0


def test_bytes_under_a_lease_never_change_while_the_keys_are_re_put_and_evicted(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory("--memory", "16MiB", "--disk", "0")
    ns = _namespace(b"race")
    first = _records(ns, 4, 1 << 20)
    keys = [r.key for r in first]
    with d.client(timeout_s=10) as reader, Client(d.address, timeout_s=10) as writer:
        writer.put_records(first)
        with reader.read(keys) as lease:
            assert lease.shared
            views = [lease.records[i].payload for i in range(4)]  # type: ignore[union-attr]
            writer.put_records(_records(ns, 4, 1 << 20, salt=100))  # new versions of the same keys
            for round_ in range(3):  # and 3x the memory tier of other chunks: everything is evicted
                writer.put_records(_records(_namespace(b"filler%d" % round_), 16, 1 << 20))
            for view, record in zip(views, first, strict=True):
                assert bytes(view) == bytes(memoryview(record.payload))  # the leased bytes, unchanged
            assert all(lease.payload(i) is not None for i in range(4))  # and they still verify
        again = reader.get_records(keys)
        assert all(
            r is None or bytes(memoryview(r.payload))[:8] != bytes(memoryview(first[i].payload))[:8]
            for i, r in enumerate(again)
        )  # never the old version once it was replaced


_HOLD_A_LEASE = """
import sys, time
from lmcache_mesh.node.client import Client
client = Client(sys.argv[1], timeout_s=10)
lease = client.read([bytes.fromhex(k) for k in sys.argv[2:]])
print("holding", len(lease.records), lease.shared, flush=True)
time.sleep(60)
"""


def test_a_killed_engine_holds_its_lease_only_until_it_times_out(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--memory", "64MiB", "--disk", "0", "--lease-timeout", "1")
    ns = _namespace(b"killed")
    records = _records(ns, 4, 1 << 20)
    with d.client(timeout_s=10) as client:
        client.put_records(records)
        used = _shared(client)["used_bytes"]
        child = subprocess.Popen(
            [sys.executable, "-c", _HOLD_A_LEASE, d.address, *(r.key.hex() for r in records)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().split() == ["holding", "4", "True"]
            assert _shared(client)["leases"]["held"] == 1
            client.delete([r.key for r in records])  # the leased slots stay in use while held
            assert _shared(client)["used_bytes"] == used
        finally:
            child.kill()
            child.wait(10)
        deadline = time.monotonic() + 10
        while _shared(client)["leases"]["held"] and time.monotonic() < deadline:
            time.sleep(0.2)
        shared = _shared(client)
        assert shared["leases"]["held"] == 0 and shared["leases"]["expired"] == 1
        assert shared["used_bytes"] == 0  # every slot came back
        client.put_records(records)  # and the node serves on
        assert all(r is not None for r in client.get_records([r.key for r in records]))


def test_without_shared_memory_chunks_travel_as_frames_and_status_says_why(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory("--memory", "64MiB", "--disk", "0", "--shm-dir", "")
    ns = _namespace(b"frames")
    records = _records(ns, 4, 1 << 20)
    with d.client(timeout_s=10) as client:
        client.put_records(records)
        got = client.get_records([r.key for r in records])
        assert client.transport == "frames" and all(g is not None for g in got)
        assert "shm-dir is empty" in _shared(client)["off"]


def test_a_save_announced_before_it_lands_is_a_hit_at_once(daemon_factory: DaemonFactory) -> None:
    """The next request with the same prefix (here: another engine's client) counts an
    announced save as cached, and its GET waits for the bytes instead of missing."""
    d = daemon_factory("--memory", "64MiB", "--disk", "0", "--lease-timeout", "2")
    ns = _namespace(b"pending")
    records = _records(ns, 4, 1 << 20)
    keys = [r.key for r in records]
    with d.client(timeout_s=10) as saver, Client(d.address, timeout_s=10) as other:
        reservation = saver.reserve(keys, [r.nbytes for r in records])
        assert other.lookup(keys) == 4
        landing = threading.Timer(0.3, saver.commit, args=(records, reservation))
        landing.start()
        started = time.monotonic()
        got = other.get_records(keys, timeout_s=5)
        assert all(g is not None for g in got) and 0.25 < time.monotonic() - started < 3
        landing.join()
        # a save that never lands stops counting when its lease ends: misses, never errors
        late = _records(_namespace(b"never"), 2, 1 << 20)
        saver.reserve([r.key for r in late], [r.nbytes for r in late])
        assert other.lookup([r.key for r in late]) == 2
        assert other.get_records([r.key for r in late], timeout_s=0.5) == [None, None]
        time.sleep(2.6)
        assert other.lookup([r.key for r in late]) == 0
