"""WebRTCLink: one aiortc peer connection carrying multipart messages on several data channels.

Setup is one offer and one answer (aiortc gathers every candidate before it writes the SDP,
so there is no trickle); the caller carries them over whatever signaling path it has.
Both sides create the same ``channels`` pre-negotiated data channels (ids 0..n-1), so no
in-band channel setup is needed. DTLS is always on (aiortc has no way to turn it off); the
certificate fingerprints in the two SDPs are what the link's owner can bind its own
authentication to.

Flow control: a sender waits while a channel's ``bufferedAmount`` is above the high-water
mark and resumes at the low-water mark, so a 16 MiB record never sits whole in SCTP's queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..base import Buffer
from .framing import MAX_PIECE_BYTES, FramingError, Reassembler, pieces

logger = logging.getLogger(__name__)


SOCKET_BUFFER_BYTES = 4 << 20


class LinkClosed(Exception):
    """The peer connection failed or was closed; pending and later sends fail with this."""


@dataclass(frozen=True, slots=True)
class WebRTCConfig:
    """How this process makes WebRTC links. The defaults suit a LAN (no STUN/TURN)."""

    ice_servers: tuple[str, ...] = ()
    """``stun:HOST:PORT`` / ``turn:HOST:PORT`` URLs; none by default (host candidates only)."""
    turn_username: str | None = None
    turn_password: str | None = None
    host_addresses: tuple[str, ...] = ()
    """Only these local addresses become host candidates (e.g. ``127.0.0.1`` for loopback,
    which aioice leaves out by default). Empty: every interface aioice finds."""
    channels: int = 4
    """Data channels per link; concurrent messages spread over them."""
    piece_bytes: int = 64 << 10
    high_water_bytes: int = 4 << 20
    low_water_bytes: int = 1 << 20
    max_message_bytes: int = 80 << 20
    max_unread_bytes: int = 1 << 30
    """Messages received but not yet read, in bytes; a peer that sends more is cut off."""
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.channels <= 64:
            raise ValueError(f"channels must be 1..64, got {self.channels}")
        if not 0 < self.piece_bytes <= MAX_PIECE_BYTES:
            raise ValueError(f"piece_bytes must be 1..{MAX_PIECE_BYTES}, got {self.piece_bytes}")
        if not 0 <= self.low_water_bytes < self.high_water_bytes:
            raise ValueError("low_water_bytes must be below high_water_bytes")
        for url in self.ice_servers:
            if not url.startswith(("stun:", "turn:", "turns:")):
                raise ValueError(f"ICE server {url!r} must be a stun:, turn: or turns: URL")


def _aiortc() -> Any:
    try:
        import aiortc
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "WebRTC needs aiortc: pip install -e '.[webrtc]' in the lmcache-mesh checkout"
        ) from exc
    return aiortc


_host_addresses: tuple[str, ...] = ()


def _restrict_host_addresses(addresses: tuple[str, ...]) -> None:
    """aioice reads host addresses from one module function: narrow it, process-wide."""
    global _host_addresses
    import aioice.ice

    original = getattr(aioice.ice, "_lmcache_original_get_host_addresses", None)
    if original is None:
        original = aioice.ice.get_host_addresses
        aioice.ice._lmcache_original_get_host_addresses = original  # type: ignore[attr-defined]
    if addresses == _host_addresses:
        return
    _host_addresses = addresses
    if addresses:
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addresses)
    else:
        aioice.ice.get_host_addresses = original


def _peer_connection(config: WebRTCConfig) -> Any:
    aiortc = _aiortc()
    _restrict_host_addresses(config.host_addresses)
    servers = [
        aiortc.RTCIceServer(url, config.turn_username, config.turn_password)
        if url.startswith("turn")
        else aiortc.RTCIceServer(url)
        for url in config.ice_servers
    ]
    # An explicit (possibly empty) list: aiortc's default adds a public STUN server.
    return aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=servers))


_FINGERPRINT = re.compile(r"^a=fingerprint:(\S+) (\S+)", re.MULTILINE)


def sdp_fingerprint(sdp: str) -> str:
    """The DTLS certificate fingerprint an SDP announces (``sha-256 AB:CD:...``)."""
    m = _FINGERPRINT.search(sdp)
    if m is None:
        raise ValueError("SDP carries no DTLS fingerprint")
    return f"{m.group(1).lower()} {m.group(2).upper()}"


@dataclass
class _Channel:
    dc: Any
    reassembler: Reassembler
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)


class WebRTCLink:
    """Messages (lists of frames) both ways over one peer connection. Use on one event loop."""

    def __init__(self, pc: Any, config: WebRTCConfig, label: str, channels: int | None = None) -> None:
        self.config = config
        self.label = label
        self.local_fingerprint = ""
        """DTLS fingerprints from the two SDPs (set once both are known)."""
        self.remote_fingerprint = ""
        self.bytes_sent = 0
        self.bytes_received = 0
        self._unread = 0
        self._pc = pc
        self._inbox: asyncio.Queue[list[memoryview] | None] = asyncio.Queue()
        self._closed = asyncio.Event()
        self._why = "closed"
        self._next = itertools.count()
        self._channels: list[_Channel] = []
        self.channels = channels or config.channels
        pc.on("connectionstatechange", self._state_changed)
        self._add_channels()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self._pc.connectionState
        return f"<WebRTCLink {self.label} {state} channels={len(self._channels)}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _add_channels(self) -> None:
        for i in range(self.channels):
            dc = self._pc.createDataChannel(f"lmcache-{i}", negotiated=True, id=i, ordered=True)
            dc.bufferedAmountLowThreshold = self.config.low_water_bytes
            ch = _Channel(dc, Reassembler(self.config.max_message_bytes))
            dc.on("open", ch.opened.set)
            dc.on("bufferedamountlow", ch.drained.set)
            dc.on("message", lambda piece, ch=ch: self._on_piece(ch, piece))
            dc.on("close", lambda: self._fail("a data channel closed"))
            self._channels.append(ch)

    async def wait_open(self, timeout_s: float | None = None) -> None:
        """Until every channel is open (ICE, DTLS and SCTP are up); LinkClosed on failure."""
        timeout = self.config.connect_timeout_s if timeout_s is None else timeout_s
        try:
            # a failure sets every channel's "opened" too, so this never outlives the link
            await asyncio.wait_for(asyncio.gather(*(ch.opened.wait() for ch in self._channels)), timeout)
        except asyncio.TimeoutError:
            await self.close(f"not connected within {timeout:g} s")
        if self.closed:
            raise LinkClosed(f"WebRTC link {self.label}: {self._why}")
        self._grow_socket_buffers()

    def _grow_socket_buffers(self) -> None:
        # aiortc's sender outruns a default-sized UDP receive buffer even on loopback; every
        # drop halves SCTP's congestion window. Best effort: aiortc does not expose the socket.
        try:
            for protocol in self._pc.sctp.transport.transport._connection._protocols:
                sock = protocol.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        except (AttributeError, OSError):
            pass

    def _state_changed(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._fail(f"peer connection {self._pc.connectionState}")

    def _fail(self, why: str) -> None:
        if self.closed:
            return
        self._why = why
        self._closed.set()
        self._inbox.put_nowait(None)
        for ch in self._channels:
            ch.drained.set()  # wake blocked senders so they see the link is gone
            ch.opened.set()
        asyncio.ensure_future(self._pc.close())

    def _on_piece(self, ch: _Channel, piece: bytes | str) -> None:
        if self.closed:
            return
        try:
            if isinstance(piece, str):
                raise FramingError("text message on a binary channel")
            self.bytes_received += len(piece)
            frames = ch.reassembler.feed(piece)
        except FramingError as exc:
            logger.warning("x WebRTC link %s: %s; closing it", self.label, exc)
            self._fail(f"protocol error: {exc}")
            return
        if frames is not None:
            self._unread += sum(len(f) for f in frames)
            if self._unread > self.config.max_unread_bytes:
                logger.warning("x WebRTC link %s: the peer sends faster than we read; closing it", self.label)
                self._fail("peer exceeded the unread-message limit")
                return
            self._inbox.put_nowait(frames)

    async def recv(self) -> list[memoryview]:
        """The next whole message; LinkClosed once the link is down and the inbox empty."""
        frames = await self._inbox.get()
        if frames is None:
            self._inbox.put_nowait(None)  # every later recv sees it too
            raise LinkClosed(f"WebRTC link {self.label}: {self._why}")
        self._unread -= sum(len(f) for f in frames)
        return frames

    async def send(self, frames: Sequence[Buffer]) -> None:
        """Queue one message on the least busy channel, waiting while that channel is full."""
        ch = self._pick()
        async with ch.lock:  # one message at a time per channel: pieces must not interleave
            sent_any = False
            try:
                for piece in pieces(frames, self.config.piece_bytes):
                    while not self.closed and ch.dc.bufferedAmount > self.config.high_water_bytes:
                        ch.drained.clear()
                        await ch.drained.wait()
                    if self.closed:
                        raise LinkClosed(f"WebRTC link {self.label}: {self._why}")
                    ch.dc.send(piece)
                    sent_any = True
                    self.bytes_sent += len(piece)
            except BaseException:
                # Half a message on the channel would corrupt the next one: give up the link.
                if sent_any:
                    self._fail("a message was interrupted half sent")
                raise

    def _pick(self) -> _Channel:
        if self.closed:
            raise LinkClosed(f"WebRTC link {self.label}: {self._why}")
        free = [ch for ch in self._channels if not ch.lock.locked()]
        if free:
            return min(free, key=lambda ch: ch.dc.bufferedAmount)
        return self._channels[next(self._next) % len(self._channels)]

    async def close(self, why: str = "closed") -> None:
        self._fail(why)
        await self._pc.close()


class Dialing:
    """The offering side of a link, between :func:`offer` and the peer's answer."""

    def __init__(self, link: WebRTCLink, sdp: str) -> None:
        self.sdp = sdp
        """The offer to send to the peer."""
        self._link = link

    async def complete(self, answer_sdp: str) -> WebRTCLink:
        """Apply the peer's answer and wait until the link is open; LinkClosed on failure."""
        aiortc = _aiortc()
        link = self._link
        try:
            link.remote_fingerprint = sdp_fingerprint(answer_sdp)
            await link._pc.setRemoteDescription(aiortc.RTCSessionDescription(answer_sdp, "answer"))
        except Exception as exc:
            await link.close("bad answer")
            raise LinkClosed(f"WebRTC link {link.label}: bad answer: {exc}") from exc
        await link.wait_open()
        return link

    async def cancel(self) -> None:
        await self._link.close("cancelled")


async def offer(config: WebRTCConfig, label: str = "") -> Dialing:
    """Start a link: the returned Dialing holds the offer SDP (every candidate gathered)."""
    pc = _peer_connection(config)
    link = WebRTCLink(pc, config, label)  # its channels must exist before the offer is written
    try:
        await pc.setLocalDescription(await pc.createOffer())
    except BaseException:
        await pc.close()
        raise
    sdp: str = pc.localDescription.sdp
    link.local_fingerprint = sdp_fingerprint(sdp)
    return Dialing(link, sdp)


async def answer(
    config: WebRTCConfig, offer_sdp: str, label: str = "", channels: int | None = None
) -> tuple[WebRTCLink, str]:
    """Answer a peer's offer: returns the link (``await link.wait_open()`` before use) and
    the answer SDP to send back; LinkClosed for an offer that does not parse. ``channels``:
    the offerer's channel count (both ends must have the same channels)."""
    aiortc = _aiortc()
    pc = _peer_connection(config)
    link = WebRTCLink(pc, config, label, channels)
    try:
        link.remote_fingerprint = sdp_fingerprint(offer_sdp)
        await pc.setRemoteDescription(aiortc.RTCSessionDescription(offer_sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:
        await link.close("bad offer")
        raise LinkClosed(f"WebRTC link {label}: bad offer: {exc}") from exc
    sdp: str = pc.localDescription.sdp
    link.local_fingerprint = sdp_fingerprint(sdp)
    return link, sdp
