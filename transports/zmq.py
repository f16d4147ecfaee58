"""ZeroMQ ROUTER/DEALER plumbing: bind, connect, socket limits, error translation.

Frames are sent and received zero-copy (``copy=False``): a received frame's ``buffer`` is
a read-only memoryview that stays valid as long as someone holds it. Senders must not
change a buffer after handing it over; callers here only send immutable buffers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq
import zmq.asyncio

from .base import Buffer
from .curve import CurveClient, CurveServer, ZapHandler

logger = logging.getLogger(__name__)

Frame = bytes | memoryview | zmq.Frame

# Longest ipc:// path the kernel accepts (sun_path is 108 bytes including the NUL).
MAX_IPC_PATH = 107


ROUTER_QUEUE_MESSAGES = 64
"""High-water mark of a ROUTER's per-peer queues, in messages: what one peer can have
queued here is bounded by this times the largest message."""

IPC_MODE = 0o600
"""Socket files are for their owner only: on one machine, file permissions authorise."""


DEALER_QUEUE_MESSAGES = 64
"""High-water mark of a client's send queue, in messages."""


FRAME_HEAP_BYTES = 256 << 20
"""Buffers up to this size come from (and go back to) the heap; see :func:`reuse_frame_buffers`."""


def reuse_frame_buffers() -> bool:
    """Let glibc reuse freed frame buffers instead of mapping fresh pages for each one.

    libzmq allocates every received message; glibc maps allocations above 32 MiB (a chunk of
    an 8B-class model) afresh each time and unmaps them when freed, so every received chunk
    pays a page fault per 4 KiB page: a peer GET moved ~0.5x a raw TCP socket pair on this
    machine kind, ~1.1x with this. The cost: up to twice ``FRAME_HEAP_BYTES`` of freed heap
    stays with the process for the next message. A process-wide setting, so only for
    processes that are ours (the node daemon; benchmarks that act as one), never an engine's.
    Returns whether it applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        applied = bool(libc.mallopt(m_mmap_threshold, FRAME_HEAP_BYTES)) and bool(
            libc.mallopt(m_trim_threshold, 2 * FRAME_HEAP_BYTES)
        )
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if not applied:
        logger.debug("mallopt refused: received frames keep fresh pages")
    return applied


class TransportError(Exception):
    """A socket could not be bound or connected; the message says which endpoint and why."""


def check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if len(os.fsencode(path)) > MAX_IPC_PATH:
            raise TransportError(
                f"ipc path too long ({len(path)} > {MAX_IPC_PATH} bytes): {endpoint}; use a shorter path"
            )
    elif not endpoint.startswith("tcp://"):
        raise TransportError(f"unsupported endpoint {endpoint!r}: use tcp://HOST:PORT or ipc:///PATH")


def _configure(sock: zmq.Socket[Any], max_message_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # A peer sending a single frame above this is disconnected by libzmq before we see it;
    # the node checks its (smaller) application limits itself and answers with an error.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


class ZmqRouter:
    """An asyncio ROUTER socket bound to one or more endpoints.

    ``recv()`` yields ``(peer id, frames, user)``; ``send(peer id, frames)`` answers. Both
    run on the event loop that created the socket and never block it. With ``curve`` every
    connection is encrypted and admitted (or not) by its rule before anything is read;
    ``user`` is then the client's public key, else None.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        max_message_bytes: int,
        curve: CurveServer | None = None,
        io_threads: int = 1,
    ) -> None:
        for ep in endpoints:
            check_endpoint(ep)
        self.endpoints = list(endpoints)
        self.max_message_bytes = max_message_bytes
        self.curve = curve
        self.io_threads = io_threads
        self.bound: list[str] = []
        self.tcp = any(ep.startswith("tcp://") for ep in endpoints)
        self.zap: ZapHandler | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None

    def __repr__(self) -> str:
        return f"<ZmqRouter {' '.join(self.bound or self.endpoints)}>"

    def bind(self) -> list[str]:
        """Bind every endpoint; returns the bound addresses (a tcp port 0 becomes the real one)."""
        self._ctx = zmq.asyncio.Context(io_threads=self.io_threads)
        if self.curve is not None:
            # The handler must exist before the first connection: libzmq refuses
            # connections outright while no handler is bound.
            self.zap = ZapHandler(self._ctx, self.curve.authorize)
            self.zap.start()
        sock = self._ctx.socket(zmq.ROUTER)
        _configure(sock, self.max_message_bytes)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to a vanished peer are dropped, not errors
        # Bounded queues: a peer that floods us is read no faster than we answer (back-pressure),
        # and replies to a peer that stopped reading are dropped past the mark.
        sock.setsockopt(zmq.RCVHWM, ROUTER_QUEUE_MESSAGES)
        sock.setsockopt(zmq.SNDHWM, ROUTER_QUEUE_MESSAGES)
        try:
            for ep in self.endpoints:
                if ep.startswith("ipc://"):
                    _remove_stale_ipc(ep[len("ipc://") :])
                try:
                    sock.bind(ep)
                    if ep.startswith("ipc://"):
                        os.chmod(ep[len("ipc://") :], IPC_MODE)
                except zmq.ZMQError as exc:
                    raise TransportError(f"cannot listen on {ep}: {exc.strerror}") from exc
                self.bound.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except BaseException:
            sock.close(0)
            if self.zap is not None:
                self.zap.close()
            self._ctx.term()
            raise
        self._sock = sock
        return self.bound

    async def recv(self) -> tuple[bytes, list[zmq.Frame], str | None, str | None]:
        """(peer id, frames, user, source): ``user`` the client's CurveZMQ key (else None),
        ``source`` the sending host's IP for tcp:// (else None)."""
        assert self._sock is not None, "bind() first"
        frames = await self._sock.recv_multipart(copy=False)
        # The ZAP handler set the connection's User-Id: the client's public key.
        user = frames[0].get("User-Id") if self.curve is not None else None
        source = frames[0].get("Peer-Address") if self.tcp else None
        return (
            frames[0].bytes,
            frames[1:],
            user if isinstance(user, str) and user else None,
            source if isinstance(source, str) and source else None,
        )

    async def send(self, peer: bytes, frames: Sequence[Frame], track: bool = False) -> Any:
        """Queue a message for ``peer``; with ``track``, returns a MessageTracker that is
        ``done`` once libzmq no longer holds the frames (sent, or dropped)."""
        assert self._sock is not None, "bind() first"
        return await self._sock.send_multipart([peer, *frames], copy=False, track=track)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self.zap is not None:
            self.zap.close()
            self.zap = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        for ep in self.bound:
            if ep.startswith("ipc://"):
                try:
                    os.unlink(ep[len("ipc://") :])
                except FileNotFoundError:
                    pass


def dealer(
    ctx: zmq.Context[Any], endpoint: str, max_message_bytes: int, curve: CurveClient | None = None
) -> zmq.Socket[Any]:
    """A DEALER connected to ``endpoint`` (works for zmq.Context and zmq.asyncio.Context).

    ``curve`` applies to tcp:// only: an ipc:// socket is authorised by its file permissions.
    """
    check_endpoint(endpoint)
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    _configure(sock, max_message_bytes)
    if curve is not None and endpoint.startswith("tcp://"):
        curve.apply(sock)
    # Bounded: requests to a peer that is down wait here only up to this many messages
    # (a sender then waits or times out) instead of piling up until it comes back.
    sock.setsockopt(zmq.SNDHWM, DEALER_QUEUE_MESSAGES)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise TransportError(f"cannot connect to {endpoint}: {exc.strerror}") from exc
    return sock


MAX_REPLY_FRAME_BYTES = 1 << 30
"""The largest frame a client accepts from a node it chose to talk to."""


Sealer = Callable[[Buffer], bytes]
"""Turns a request's first frame into its sealed form (:class:`~.seal.HeaderSeal`)."""


class ZmqConduit:
    """A DEALER socket on its own asyncio context (CurveZMQ with ``curve``, for tcp://):
    a :class:`~lmcache_mesh.transports.base.Conduit`. With ``seal``, each message's first
    frame goes out sealed (a member's request, without CurveZMQ)."""

    def __init__(self, address: str, curve: CurveClient | None = None, seal: Sealer | None = None) -> None:
        self._seal = seal
        self._ctx = zmq.asyncio.Context()
        try:
            self._sock = cast(zmq.asyncio.Socket, dealer(self._ctx, address, MAX_REPLY_FRAME_BYTES, curve))
        except BaseException:
            self._ctx.term()
            raise

    async def send(self, frames: Sequence[Buffer]) -> None:
        out = list(frames)
        if self._seal is not None and out:
            out[0] = self._seal(out[0])
        await self._sock.send_multipart(out, copy=False)  # may wait: queues are bounded

    async def recv(self) -> list[Buffer]:
        return [f.buffer for f in await self._sock.recv_multipart(copy=False)]

    async def aclose(self) -> None:
        self._sock.close(0)
        self._ctx.term()


class ZmqChannel:
    """A blocking DEALER to one node, for one caller at a time (the sync client locks it).

    :meth:`recv` waits up to a deadline; :meth:`reset` drops the socket with whatever is
    queued or late on it and connects afresh, so a late reply is never read as the next.
    """

    def __init__(self, address: str, curve: CurveClient | None = None) -> None:
        self.address = address
        self._curve = curve
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = dealer(self._ctx, address, MAX_REPLY_FRAME_BYTES, curve)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def send(self, frames: Sequence[Buffer], deadline: float) -> bool:
        """Queue a message; False once ``deadline`` (time.monotonic) has passed first. A DEALER
        whose peer never completes its handshake (a refused CurveZMQ key) takes no message:
        a plain blocking send would wait for ever."""
        assert self._sock is not None, "channel closed"
        remaining_ms = (deadline - time.monotonic()) * 1000
        if remaining_ms <= 0 or not self._sock.poll(int(remaining_ms) + 1, zmq.POLLOUT):
            return False
        self._sock.send_multipart(list(frames), copy=False)
        return True

    def recv(self, deadline: float) -> list[Buffer] | None:
        """The next message, or None once ``deadline`` (time.monotonic) has passed."""
        assert self._sock is not None, "channel closed"
        remaining_ms = (deadline - time.monotonic()) * 1000
        if remaining_ms <= 0 or not self._sock.poll(int(remaining_ms) + 1):
            return None
        return [f.buffer for f in self._sock.recv_multipart(copy=False)]

    def reset(self) -> None:
        self.close()
        self._sock = dealer(self._ctx, self.address, MAX_REPLY_FRAME_BYTES, self._curve)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


def _remove_stale_ipc(path: str) -> None:
    """Remove a socket file left by a killed process; refuse one a live process serves."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise TransportError(f"cannot listen on ipc://{path}: another process is serving it")


Route = Callable[[str], tuple[str, list[bytes]]]
"""Where a message for an address goes: (endpoint to connect to, frames to put before it)."""

CurveFor = Callable[[str], CurveClient | None]
"""The CurveZMQ credentials for connecting to an endpoint; raises LookupError if none are known."""


class ZmqDatagramTransport:
    """Best-effort datagrams to peers' ROUTER sockets over DEALERs (a DatagramTransport).

    Each datagram goes out as ``[*prefix, envelope, data]``: the envelope, a frame the
    owner builds from this node's address (``envelope(address)``), tells the receiving node what the frame is and who sent it;
    ``route(to)`` says which endpoint to connect to and which prefix frames go first. Usually
    that is the peer itself with no prefix; for a node behind NAT it is its relay, with a
    prefix asking the relay to forward. ``curve(endpoint)`` gives the credentials to connect
    with (None: plain); an endpoint whose server key is unknown gets nothing (dropped). With
    ``seal``, the first frame of each goes out sealed. :meth:`send_message` sends other one-way messages
    the same way. Sends never block:
    datagrams for a peer still connecting are queued (up to ``queue_limit``), and beyond
    that, as for a peer that is down, they are dropped and counted, as UDP would lose them.
    Inbound datagrams are not read here: the node that owns the ROUTER hands them to
    :meth:`deliver`. Use from one thread (the event loop's).
    """

    def __init__(
        self,
        address: str,
        envelope: Callable[[str], bytes],
        route: Route,
        max_peers: int = 1024,
        queue_limit: int = 256,
        curve: CurveFor | None = None,
        seal: Sealer | None = None,
    ) -> None:
        self.address = address
        self._seal = seal
        self._envelope_for = envelope
        self.envelope = envelope(address)
        self.on_receive: Callable[[str, bytes], None] | None = None
        self.dropped = 0
        self.sent = 0
        self._route = route
        self._curve = curve
        self._max_peers = max_peers
        self._queue_limit = queue_limit
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._peers: OrderedDict[str, zmq.Socket[Any]] = OrderedDict()

    def __repr__(self) -> str:
        return f"<ZmqDatagramTransport {self.address} peers={len(self._peers)} sent={self.sent} dropped={self.dropped}>"

    def send(self, to: str, data: bytes) -> None:
        self.send_message(to, [self.envelope, data])

    def send_message(self, to: str, frames: list[bytes]) -> None:
        """One-way ``frames`` to ``to``, routed like a datagram (dropped and counted if stuck)."""
        try:
            endpoint, prefix = self._route(to)
        except ValueError:
            self.dropped += 1
            return
        sock = self._peers.get(endpoint)
        if sock is None:
            try:
                check_endpoint(endpoint)
                credentials = self._curve(endpoint) if self._curve is not None else None
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, self._queue_limit)
                if credentials is not None and endpoint.startswith("tcp://"):
                    credentials.apply(sock)
                sock.connect(endpoint)
            except (zmq.ZMQError, TransportError, LookupError):
                self.dropped += 1
                return
            self._peers[endpoint] = sock
            while len(self._peers) > self._max_peers:
                _, old = self._peers.popitem(last=False)
                old.close(0)
        else:
            self._peers.move_to_end(endpoint)
        out: list[Buffer] = [*prefix, *frames]
        if self._seal is not None:
            out[0] = self._seal(out[0])  # the frame the receiving node reads as the header
        try:
            sock.send_multipart(out, flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    def readdress(self, address: str) -> None:
        """Datagrams now say they come from ``address``."""
        self.address = address
        self.envelope = self._envelope_for(address)

    def deliver(self, sender: str, data: bytes) -> None:
        """Hand an inbound datagram to the owner's receiver (called by whoever reads the ROUTER)."""
        if self.on_receive is not None:
            self.on_receive(sender, data)

    def close(self) -> None:
        for sock in self._peers.values():
            sock.close(0)
        self._peers.clear()
