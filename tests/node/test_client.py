"""Both clients, against a node that lies: a payload that fails its checksum is a counted miss."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from lmcache_mesh.node import AsyncClient, ChunkRecord, Client
from lmcache_mesh.node.protocol import ok_reply, peek_request_id

RECORD = ChunkRecord.build(b"k" * 16, b"payload!" * 16, b"n" * 16)


@pytest.fixture
def lying_node() -> Iterator[str]:
    """A ROUTER that answers every GET with RECORD's header and a payload one byte off."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(50):
                continue
            peer, header = sock.recv_multipart()[:2]
            bad = b"X" + bytes(RECORD.payload)[1:]
            reply = ok_reply(peek_request_id(header), records=[RECORD.header.to_wire()])
            sock.send_multipart([peer, reply, bad])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join(5)
    sock.close(0)
    ctx.term()


def test_sync_get_and_get_records_count_a_bad_payload_and_return_a_miss(lying_node: str) -> None:
    """Client.get and get_records return None for the bad record and count it."""
    with Client(lying_node, timeout_s=5) as c:
        assert c.get([RECORD.key]) == [None]
        assert c.checksum_failures == 1
        assert c.get_records([RECORD.key]) == [None]
        assert c.checksum_failures == 2


async def test_async_get_and_get_records_count_a_bad_payload_and_return_a_miss(lying_node: str) -> None:
    """AsyncClient.get and get_records return None for the bad record and count it."""
    async with AsyncClient(lying_node, timeout_s=5) as c:
        assert await c.get([RECORD.key]) == [None]
        assert c.checksum_failures == 1
        assert await c.get_records([RECORD.key]) == [None]
        assert c.checksum_failures == 2
