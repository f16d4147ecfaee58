"""NodeServer in-process: deadlines and the concurrency bound, over real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from lmcache_mesh.node import ChunkRecord, Node, NodeConfig
from lmcache_mesh.node.config import LimitsSettings, StorageSettings
from lmcache_mesh.node.errors import ErrorCode
from lmcache_mesh.node.protocol import Op, request_header
from lmcache_mesh.node.service import NodeServer
from lmcache_mesh.node.tenants import scoped_key
from lmcache_mesh.node.tiers import DiskTier

from ..helpers import payload


class StalledDisk(DiskTier):
    """A disk tier whose reads take half a second: a disk that has stopped answering quickly."""

    def read(self, key: bytes) -> ChunkRecord | None:
        time.sleep(0.5)
        return super().read(key)


@asynccontextmanager
async def stalled_node(
    tmp_path: Path, record: ChunkRecord, **limits: Any
) -> AsyncIterator[zmq.asyncio.Socket]:
    """A served node whose disk holds ``record`` behind a stalled read, and a raw DEALER to it."""
    cfg = NodeConfig(
        name="n",
        listen=("tcp://127.0.0.1:0",),
        storage=StorageSettings(data_dir=str(tmp_path), memory_bytes=1 << 20),
        limits=LimitsSettings(**limits),
    )
    node = Node(cfg)
    node.store.disk = StalledDisk(tmp_path, 1 << 20)
    node.open()
    assert node.store.disk.submit(record) and node.store.disk.flush(10)
    server = NodeServer(node)
    (address,) = await server.start()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close(0)
        ctx.term()
        await server.stop()
        node.close()


async def reply(sock: zmq.asyncio.Socket) -> tuple[dict[str, Any], list[bytes]]:
    frames = await sock.recv_multipart()
    return msgpack.unpackb(frames[0]), frames[1:]


def test_a_disk_read_past_the_deadline_gets_deadline_exceeded_and_the_node_keeps_serving(
    tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    async def main() -> None:
        async with stalled_node(tmp_path, ChunkRecord.build(keys[0], payload(0), ns)) as sock:
            await sock.send_multipart([request_header(Op.GET, 1, 100, keys=[keys[0]], scoped=True)])
            await sock.send_multipart([request_header(Op.PING, 2, 1000)])
            first, _ = await reply(sock)
            second, _ = await reply(sock)
            # The ping is answered while the slow disk read is still going on.
            assert first["id"] == 2 and first["ok"] is True
            assert second["id"] == 1 and second["code"] == ErrorCode.DEADLINE_EXCEEDED
            await sock.send_multipart([request_header(Op.GET, 3, 5000, keys=[keys[0]], scoped=True)])
            third, frames = await reply(sock)
            assert third["ok"] is True and frames == [payload(0)]

    asyncio.run(main())


def test_a_full_node_answers_busy_at_once_instead_of_making_the_engine_wait(
    tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    async def main() -> None:
        record = ChunkRecord.build(keys[0], payload(0), ns)
        async with stalled_node(tmp_path, record, max_inflight_requests=1) as sock:
            await sock.send_multipart(
                [request_header(Op.GET, 1, 5000, keys=[keys[0]], scoped=True)]
            )  # holds the only slot for 0.5 s
            started = time.monotonic()
            await sock.send_multipart([request_header(Op.GET, 2, 5000, keys=[keys[0]], scoped=True)])
            second, _ = await reply(sock)
            assert second["id"] == 2 and second["code"] == ErrorCode.BUSY
            assert time.monotonic() - started < 0.4  # answered before the slow read ends
            first, frames = await reply(sock)
            assert first["id"] == 1 and first["ok"] is True and frames == [payload(0)]
            await sock.send_multipart([request_header(Op.PING, 3, 1000)])  # and it keeps serving
            assert (await reply(sock))[0]["ok"] is True

    asyncio.run(main())


def test_slow_readers_on_many_connections_from_one_host_add_up_and_others_are_served(
    tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    """Issue 17 (7): without keys the bound on queued reply bytes is per sending host, not per
    connection (four connections got four times the bound), a reply must fit it as well as
    the request (GETs admitted together), and all hosts together are bounded too. Another
    host is still served."""

    async def main() -> None:
        cfg = NodeConfig(
            name="n",
            listen=("tcp://127.0.0.1:0",),
            storage=StorageSettings(data_dir=str(tmp_path), disk_bytes=0),
            limits=LimitsSettings(max_inflight_bytes_per_peer=8 << 20, max_inflight_bytes=12 << 20),
        )
        node = Node(cfg)
        node.open()
        node.put_records([ChunkRecord.build(scoped_key("", keys[0]), b"\x07" * (4 << 20), ns)])
        server = NodeServer(node)
        (address,) = await server.start()
        port = address.rsplit(":", 1)[1]
        ctx = zmq.asyncio.Context()

        def dealer(source: str) -> zmq.asyncio.Socket:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.setsockopt(zmq.RCVBUF, 64 << 10)
            sock.connect(f"tcp://{source}:0;127.0.0.1:{port}")  # from this source address
            return sock

        async def oks(socks: list[zmq.asyncio.Socket], n: int) -> int:
            for rid, sock in enumerate(socks * n):
                await sock.send_multipart([request_header(Op.GET, rid + 1, 30_000, keys=[keys[0]])])
            await asyncio.sleep(1.0)
            ok = 0
            for sock in socks * n:
                header, _ = await asyncio.wait_for(reply(sock), 30)
                ok += bool(header["ok"])
            return ok

        slow = [dealer("127.0.0.1") for _ in range(4)]
        other = [dealer("127.0.0.2")]
        third = [dealer("127.0.0.3")]
        try:
            # 4 connections x 10 GETs of 4 MiB, nothing read: about 8 MiB of replies in all
            # (per connection, as before, it was 4 x 8 MiB)
            ok = await oks(slow, 10)
            assert 1 <= ok <= 4, ok
            hosts = await asyncio.gather(oks(other, 10), oks(third, 10))
            assert all(n >= 1 for n in hosts) and sum(hosts) <= 6, hosts  # everyone: 12 MiB
        finally:
            for sock in slow + other + third:
                sock.close(0)
            ctx.term()
            await server.stop()
            node.close()

    asyncio.run(main())


def test_a_client_that_does_not_read_its_replies_gets_busy_not_more_data(
    tmp_path: Path, ns: bytes, keys: list[bytes]
) -> None:
    """Reply bytes queued for one client and not yet sent are bounded: past the bound its
    GETs are answered BUSY (small), so a slow or hostile reader cannot make the node hold
    gigabytes of replies."""

    async def main() -> None:
        cfg = NodeConfig(
            name="n",
            listen=("tcp://127.0.0.1:0",),
            storage=StorageSettings(data_dir=str(tmp_path), disk_bytes=0),
            limits=LimitsSettings(max_inflight_bytes_per_peer=8 << 20),
        )
        node = Node(cfg)
        node.open()
        node.put_records([ChunkRecord.build(scoped_key("", keys[0]), b"\x07" * (4 << 20), ns)])
        server = NodeServer(node)
        (address,) = await server.start()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 64 << 10)
        sock.connect(address)
        try:
            for i in range(40):  # ask for 160 MiB without reading any of it
                await sock.send_multipart([request_header(Op.GET, i + 1, 30_000, keys=[keys[0]])])
            await asyncio.sleep(1.0)
            codes = []
            for _ in range(40):
                header, frames = await asyncio.wait_for(reply(sock), 30)
                codes.append("ok" if header["ok"] else ErrorCode(header["code"]).name)
                if header["ok"]:
                    assert frames == [b"\x07" * (4 << 20)]
            assert codes.count("ok") >= 2 and codes.count("BUSY") >= 20, codes
            assert server.busy == codes.count("BUSY")
            await sock.send_multipart([request_header(Op.GET, 99, 5000, keys=[keys[0]])])
            header, _ = await reply(sock)  # all read: it serves again
            assert header["id"] == 99 and header["ok"] is True
        finally:
            sock.close(0)
            ctx.term()
            await server.stop()
            node.close()

    asyncio.run(main())
