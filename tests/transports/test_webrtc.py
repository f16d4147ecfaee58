"""WebRTC links: framing of large multipart messages, and real aiortc peer connections on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_mesh.transports.webrtc import (
    FramingError,
    LinkClosed,
    Reassembler,
    WebRTCConfig,
    WebRTCLink,
    answer,
    offer,
    pieces,
    sdp_fingerprint,
)

from ..helpers import require

LOOPBACK = WebRTCConfig(host_addresses=("127.0.0.1",), connect_timeout_s=15.0)


def reassemble(chunks: list[bytes], limit: int = 1 << 30) -> list[list[bytes]]:
    r = Reassembler(limit)
    out = []
    for c in chunks:
        frames = r.feed(c)
        if frames is not None:
            out.append([bytes(f) for f in frames])
    assert not r.busy
    return out


@pytest.mark.parametrize("piece", [7, 1024, 64 << 10, 256 << 10])
def test_pieces_reassemble_to_the_same_frames(piece: int) -> None:
    frames = [b"header", os.urandom(300_001), b"", os.urandom(5)]
    chunks = list(pieces(frames, piece))
    assert all(0 < len(c) <= piece for c in chunks)
    assert reassemble(chunks) == [frames]


def test_consecutive_messages_and_a_header_split_across_pieces() -> None:
    many = [bytes([i % 256]) for i in range(4097)]  # a 32 KiB header: spans several 1 KiB pieces
    chunks = list(pieces(many, 1024)) + list(pieces([b"next"], 1024))
    assert reassemble(chunks) == [many, [b"next"]]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"XXXX\x01\x00\x00\x00" + b"\x00" * 8],  # bad magic
        [b"LMW1\x00\x00\x00\x00"],  # no frames
        [b"LMW1\x01\x00\x00\x00" + (10).to_bytes(8, "little") + b"x" * 11],  # longer than declared
        [b"LMW1\x01\x00\x00\x00" + (1 << 40).to_bytes(8, "little")],  # over the size limit
        [b""],
    ],
)
def test_malformed_pieces_are_refused(chunks: list[bytes]) -> None:
    with pytest.raises(FramingError):
        reassemble(chunks, limit=1 << 20)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        WebRTCConfig(channels=0)
    with pytest.raises(ValueError):
        WebRTCConfig(piece_bytes=300 << 10)
    with pytest.raises(ValueError):
        WebRTCConfig(ice_servers=("http://example.org",))


async def connect(config: WebRTCConfig = LOOPBACK) -> tuple[WebRTCLink, WebRTCLink]:
    dialing = await offer(config, "a->b")
    remote, sdp = await answer(config, dialing.sdp, "a->b")
    link, _ = await asyncio.gather(dialing.complete(sdp), remote.wait_open())
    return link, remote


@pytest.fixture
async def links() -> AsyncIterator[tuple[WebRTCLink, WebRTCLink]]:
    require("aiortc")
    a, b = await connect()
    yield a, b
    await asyncio.gather(a.close(), b.close())


async def test_host_candidates_only_and_fingerprints_match(links: tuple[WebRTCLink, WebRTCLink]) -> None:
    a, b = links
    assert a.local_fingerprint == b.remote_fingerprint and a.remote_fingerprint == b.local_fingerprint
    assert a.local_fingerprint.startswith("sha-256 ")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [4 << 20, 16 << 20])
async def test_large_records_arrive_intact(links: tuple[WebRTCLink, WebRTCLink], size: int) -> None:
    a, b = links
    payload = os.urandom(size)
    await a.send([b"hdr", payload])
    frames = await asyncio.wait_for(b.recv(), 90)
    assert bytes(frames[0]) == b"hdr"
    assert hashlib.blake2b(frames[1]).digest() == hashlib.blake2b(payload).digest()
    await b.send([b"reply"])  # both directions work on one link
    assert [bytes(f) for f in await asyncio.wait_for(a.recv(), 10)] == [b"reply"]


@pytest.mark.timeout(120)
async def test_concurrent_messages_spread_over_channels(links: tuple[WebRTCLink, WebRTCLink]) -> None:
    a, b = links
    messages = [[i.to_bytes(2, "little"), os.urandom(600_000)] for i in range(8)]
    await asyncio.gather(*(a.send(m) for m in messages))
    got = [await asyncio.wait_for(b.recv(), 60) for _ in messages]
    assert sorted((bytes(f[0]), bytes(f[1])) for f in got) == sorted((m[0], m[1]) for m in messages)


async def test_closing_one_end_fails_the_other(links: tuple[WebRTCLink, WebRTCLink]) -> None:
    a, b = links
    await a.close()
    with pytest.raises(LinkClosed):
        await asyncio.wait_for(b.recv(), 30)
    with pytest.raises(LinkClosed):
        await b.send([b"late"])


async def test_a_bad_offer_is_refused() -> None:
    require("aiortc")
    with pytest.raises(LinkClosed):
        await answer(LOOPBACK, "v=0\r\nnot an sdp\r\n")
    with pytest.raises(ValueError):
        sdp_fingerprint("v=0\r\n")


@settings(max_examples=10_000, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=64), max_size=8))
def test_any_pieces_give_frames_or_a_framing_error(chunks: list[bytes]) -> None:
    r = Reassembler(1 << 16)
    try:
        for c in chunks:
            r.feed(c)
    except FramingError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=6), st.integers(1, 4096))
def test_any_frames_survive_any_piece_size(frames: list[bytes], piece: int) -> None:
    assert reassemble(list(pieces(frames, piece))) == [frames]


@pytest.mark.timeout(60)
async def test_a_send_interrupted_half_way_closes_the_link_instead_of_corrupting_it(
    links: tuple[WebRTCLink, WebRTCLink],
) -> None:
    a, _b = links
    big = os.urandom(24 << 20)  # well past the high-water mark: the send has to wait midway
    task = asyncio.ensure_future(a.send([big]))
    await asyncio.sleep(0.2)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.closed
    with pytest.raises(LinkClosed):
        await a.send([b"next"])
