"""A real ``lmcache-node run`` process, spoken to over real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from lmcache_mesh.node import AsyncClient, ChunkRecord, Client, DeadlineExceeded
from lmcache_mesh.node.errors import ErrorCode
from lmcache_mesh.node.protocol import Op, put_request, request_header
from lmcache_mesh.node.tenants import scoped_key

from ..conftest import DaemonFactory
from ..helpers import Daemon, payload


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_put_get_lookup_delete(daemon: Daemon, ns: bytes, keys: list[bytes], transport: str) -> None:
    address = daemon.tcp if transport == "tcp" else daemon.ipc
    assert address is not None
    with Client(address) as c:
        for i, k in enumerate(keys[:8]):
            c.put(
                k,
                payload(i, 64 << 10),
                namespace=ns,
                meta={"tokens": 16, "dtype": "f16", "shape": [2, 16, 1024]},
            )
        assert c.lookup(keys) == 8
        assert c.lookup(keys[1:]) == 7
        got = c.get_records(keys[:10])
        assert [None if r is None else bytes(r.payload) for r in got] == [
            payload(i, 64 << 10) for i in range(8)
        ] + [None, None]
        first = got[0]
        assert first is not None and first.header.shape == (2, 16, 1024) and first.header.namespace == ns
        assert c.delete(keys[:2]) == 2
        assert c.lookup(keys) == 0 and c.lookup(keys[2:]) == 6
        assert c.checksum_failures == 0


def test_async_client_with_many_requests_in_flight(daemon: Daemon, ns: bytes, keys: list[bytes]) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.tcp) as c:
            await asyncio.gather(*(c.put(k, payload(i), namespace=ns) for i, k in enumerate(keys)))
            results = await asyncio.gather(*(c.get([k]) for k in keys))
            assert [bytes(r[0]) for r in results if r[0] is not None] == [
                payload(i) for i in range(len(keys))
            ]
            assert await c.lookup(keys) == len(keys)
            assert (await c.stats())["counters"]["puts"] == len(keys)

    asyncio.run(main())


def wait_for_writeback(c: Client, timeout_s: float = 20.0) -> dict[str, Any]:
    """The disk tier's stats once the node's write-back queue has drained."""
    deadline = time.monotonic() + timeout_s
    while True:
        disk: dict[str, Any] = c.stats()["tiers"]["disk"]
        if disk["pending_bytes"] == 0 or time.monotonic() > deadline:
            return disk
        time.sleep(0.05)


def _raw(daemon: Daemon, frames: list[bytes]) -> dict[str, object]:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.tcp)
    try:
        s.send_multipart(frames)
        assert s.poll(10_000), "no reply to a malformed request: the node must answer every request"
        reply = s.recv_multipart()
        return msgpack.unpackb(reply[0])  # type: ignore[no-any-return]
    finally:
        s.close()


def test_bad_input_gets_typed_error_replies_and_changes_nothing(
    daemon_factory: DaemonFactory, ns: bytes, keys: list[bytes]
) -> None:
    d = daemon_factory("--max-record", "64KiB", "--max-keys", "16", "--disk", "0")
    good = ChunkRecord.build(keys[0], payload(0), ns)
    corrupt_header = {**good.header.to_wire(), "xxh3": good.header.checksum ^ 1}
    cases = [
        ([b"\xc1 not msgpack"], ErrorCode.BAD_REQUEST),
        ([msgpack.packb([1, 2, 3])], ErrorCode.BAD_REQUEST),
        ([msgpack.packb({"v": 99, "id": 5, "op": 1})], ErrorCode.UNSUPPORTED_VERSION),
        ([msgpack.packb({"v": 1, "id": 5, "op": 77})], ErrorCode.UNKNOWN_OP),
        ([request_header(Op.GET, 5, 1000, keys=[b"x"])], ErrorCode.BAD_REQUEST),
        ([request_header(Op.GET, 5, 1000, keys=keys[:17])], ErrorCode.TOO_LARGE),
        (
            [request_header(Op.PUT, 5, 1000, records=[corrupt_header]), bytes(good.payload)],
            ErrorCode.CHECKSUM_MISMATCH,
        ),
        ([request_header(Op.PUT, 5, 1000, records=[good.header.to_wire()])], ErrorCode.BAD_REQUEST),
        (
            [request_header(Op.PUT, 5, 1000, records=[good.header.to_wire()]), b"short"],
            ErrorCode.CHECKSUM_MISMATCH,
        ),
    ]
    big = ChunkRecord.build(keys[1], b"b" * (100 << 10), ns)
    cases.append(
        (
            [request_header(Op.PUT, 5, 1000, records=[big.header.to_wire()]), bytes(big.payload)],
            ErrorCode.TOO_LARGE,
        )
    )
    for frames, code in cases:
        reply = _raw(d, frames)
        assert reply["ok"] is False and reply["code"] == code, (frames[0][:40], reply)
        assert isinstance(reply["error"], str) and reply["error"]
    with d.client() as c:
        stats = c.stats()
        assert stats["counters"]["puts"] == 0 and stats["tiers"]["memory"]["entries"] == 0
        assert sum(stats["counters"]["errors"].values()) == len(cases)
        c.put(keys[0], payload(0), namespace=ns)  # still serving
        assert c.lookup(keys[:1]) == 1


def test_a_batch_with_one_bad_record_stores_none_of_it(daemon: Daemon, ns: bytes, keys: list[bytes]) -> None:
    records = [ChunkRecord.build(k, payload(i), ns) for i, k in enumerate(keys[:3])]
    fields, frames = put_request(records)
    frames[2] = b"tampered" + bytes(frames[2])[8:]
    reply = _raw(daemon, [request_header(Op.PUT, 9, 1000, **fields), *map(bytes, frames)])
    assert reply["code"] == ErrorCode.CHECKSUM_MISMATCH and reply["id"] == 9
    with daemon.client() as c:
        assert c.lookup(keys[:1]) == 0


def test_client_times_out_against_a_dead_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"tcp://127.0.0.1:{port}", timeout_s=0.3) as c:
        with pytest.raises(DeadlineExceeded, match="no reply"):
            c.ping()


def test_sigterm_writes_memory_back_and_a_restart_serves_it(
    daemon_factory: DaemonFactory, tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    data = tmp_path / "persist"
    d = daemon_factory("--memory", "64MiB", "--disk", "64MiB", data_dir=data)
    with d.client() as c:
        for i, k in enumerate(keys[:10]):
            c.put(k, payload(i, 32 << 10), namespace=ns)
    d.stop(signal.SIGTERM)
    assert d.proc.returncode == 0
    assert "wrote 10 memory records back to disk" in d.output
    d2 = daemon_factory("--memory", "64MiB", "--disk", "64MiB", data_dir=data)
    assert "recovered 10 chunks" in d2.output
    with d2.client() as c:
        assert c.lookup(keys) == 10
        got = c.get(keys[:10])
        assert [bytes(g) for g in got if g is not None] == [payload(i, 32 << 10) for i in range(10)]
        assert c.stats()["counters"]["hits_disk"] == 10


def test_sigint_also_stops_cleanly(daemon: Daemon) -> None:
    daemon.stop(signal.SIGINT)
    assert daemon.proc.returncode == 0


def test_kill9_then_planted_torn_and_corrupt_files_are_discarded_on_restart(
    daemon_factory: DaemonFactory, tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    data = tmp_path / "crash"
    # A tiny memory tier pushes everything through write-back to disk.
    d = daemon_factory("--memory", "64KiB", "--disk", "64MiB", data_dir=data)
    with d.client() as c:
        for i, k in enumerate(keys[:12]):
            c.put(k, payload(i, 32 << 10), namespace=ns)
        wait_for_writeback(c)
    d.stop(signal.SIGKILL)
    files = {p.name[:32]: p for p in (data / "chunks").rglob("*.rec")}
    stored = [scoped_key("", k).hex() for k in keys[:12]]  # files are named by the stored key
    on_disk = [i for i, name in enumerate(stored) if name in files]
    assert len(on_disk) >= 8
    torn, corrupt = files[stored[on_disk[0]]], files[stored[on_disk[1]]]
    torn.write_bytes(torn.read_bytes()[:1000])
    blob = bytearray(corrupt.read_bytes())
    blob[-5] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    (torn.parent / "half-written.99.tmp").write_bytes(b"x" * 100)

    d2 = daemon_factory("--memory", "64MiB", "--disk", "64MiB", data_dir=data)
    with d2.client() as c:
        got = c.get([keys[i] for i in on_disk])
        assert got[0] is None and got[1] is None  # torn dropped at start, corrupt dropped at read
        for j, i in enumerate(on_disk[2:], start=2):
            g = got[j]
            assert g is not None and bytes(g) == payload(i, 32 << 10)
        stats = c.stats()
        assert stats["node"]["recovery"]["discarded"] == 1 and stats["node"]["recovery"]["temp_removed"] == 1
        assert stats["counters"]["checksum_failures"] >= 2


def _ignore_sigxfsz_and_limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))


def test_failing_disk_writes_are_counted_and_the_node_keeps_serving(
    daemon_factory: DaemonFactory, ns: bytes, keys: list[bytes]
) -> None:
    d = daemon_factory(
        "--memory", "256KiB", "--disk", "64MiB", preexec_fn=_ignore_sigxfsz_and_limit_file_size
    )
    with d.client() as c:
        for i, k in enumerate(keys[:20]):
            c.put(k, payload(i, 32 << 10), namespace=ns)  # write-backs fail: files above 16 KiB
        disk = wait_for_writeback(c)
        assert disk["write_errors"] > 0 and disk["entries"] == 0
        assert c.get(keys[19:20])[0] is not None  # still in memory, still served
        assert c.ping()["name"]
