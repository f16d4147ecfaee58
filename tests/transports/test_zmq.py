"""ZeroMQ plumbing: endpoint checks, stale ipc sockets, zero-copy frames."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from lmcache_mesh.transports import TransportError, ZmqRouter, dealer

from ..helpers import short_tmpdir


def test_endpoint_errors_are_clear() -> None:
    with pytest.raises(TransportError, match="ipc path too long"):
        ZmqRouter(["ipc:///" + "x" * 200], 1 << 20)
    with pytest.raises(TransportError, match="unsupported endpoint"):
        ZmqRouter(["udp://127.0.0.1:1"], 1 << 20)


def test_a_stale_ipc_socket_file_is_replaced_but_a_live_one_is_not() -> None:
    path = short_tmpdir() / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    router = ZmqRouter([f"ipc://{path}"], 1 << 20)
    assert router.bind() == [f"ipc://{path}"]
    try:
        with pytest.raises(TransportError, match="another process is serving it"):
            ZmqRouter([f"ipc://{path}"], 1 << 20).bind()
    finally:
        router.close()
    assert not Path(path).exists()


def test_round_trip_keeps_frames_intact() -> None:
    async def main() -> None:
        router = ZmqRouter(["tcp://127.0.0.1:0"], 64 << 20)
        (address,) = router.bind()
        ctx = zmq.asyncio.Context()
        client = dealer(ctx, address, 64 << 20)
        try:
            blob = bytes(range(256)) * 16384  # 4 MiB
            await client.send_multipart([b"hdr", blob], copy=False)
            peer, frames, _, source = await router.recv()
            assert [bytes(f.buffer) for f in frames] == [b"hdr", blob]
            assert source == "127.0.0.1"  # the sending host: limits without keys count per host
            await router.send(peer, [b"reply", frames[1].buffer])
            back = await client.recv_multipart()
            assert back == [b"reply", blob]
        finally:
            client.close(0)
            ctx.term()
            router.close()

    asyncio.run(main())
