"""WebRTC links between members: dialing, answering, proving membership, serving requests.

A node that needs a member behind NAT (address ``webrtc://RELAY/NAME``) sends it a SIGNAL
offer routed through its relay; the NAT node checks that the offer comes from a live member
at the address it claims, answers with a SIGNAL sent back the same way a datagram to that
member goes (directly, or through the asker's own relay), and both ends bring the link up.
Requests then flow over it exactly as over ZeroMQ: the dialer is the client, the answerer
serves them with the node's own request handler (given to :meth:`WebRTCPeering.start`).
What a member is, how a SIGNAL is sent and who a proven peer is come from the node, as
callables: this module knows links and proofs, not the node's protocol.

Proof of membership: before the answerer serves anything, the dialer sends an AUTH message
and the answerer returns its own. Each carries the sender's name and, when the mesh has a
shared secret, an HMAC-SHA256 over the role, the name and both DTLS fingerprints — so the
proof is bound to this very DTLS session and cannot be replayed on another. A link whose
proof fails is closed and counted; no request on it is ever served.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar

import msgpack

from ..base import Buffer
from ..zmq import TransportError
from .link import LinkClosed, WebRTCConfig, WebRTCLink, answer, offer
from .signaling import Signal

logger = logging.getLogger(__name__)

AUTH_MAGIC = b"LMAUTH1"
RETRY_AFTER_S = 5.0
"""After a failed dial, requests to that member fail fast for this long."""
MAX_INBOUND_LINKS = 64
MAX_OFFERED_CHANNELS = 16
MAX_REPLY_BYTES = 1 << 30
"""Largest reply a dialed link accepts (what we accept from a node we chose to ask)."""
MAX_INFLIGHT_PER_LINK = 64


class AuthFailed(Exception):
    pass


class LinkUnavailable(TransportError, ConnectionError):
    """No WebRTC link to that member (now): it failed, was refused, or is shutting down."""


P = TypeVar("P")
"""Who a proven peer is to the node (its principal); opaque here."""

Serve = Callable[[list[Buffer], Callable[[Sequence[Any]], Awaitable[None]], P, Hashable], Awaitable[None]]
"""The node's request handler: (request frames, reply function, the peer's principal, the
link its requests count against)."""


def _mac(secret: bytes, role: bytes, name: str, offer_fp: str, answer_fp: str) -> bytes:
    msg = b"\0".join(
        [b"lmcache-mesh webrtc auth v1", role, name.encode(), offer_fp.encode(), answer_fp.encode()]
    )
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _same_for_all(secret: bytes, peer: str) -> bytes:
    return secret


class WebRTCPeering(Generic[P]):
    """Every WebRTC link of one node. Constructing it does no I/O; use on the event loop.

    ``name`` and ``address()`` are this node's; ``member_address(name)`` is where a live
    member is (None if it is not one); ``send_signal(address, signal)`` sends one
    :class:`Signal` there; ``principal_of(name)`` says who a proven member is now (None: no longer allowed).
    """

    def __init__(
        self,
        name: Callable[[], str],
        address: Callable[[], str],
        member_address: Callable[[str], str | None],
        send_signal: Callable[[str, Signal], None],
        principal_of: Callable[[str], P | None],
        config: WebRTCConfig,
        secret: bytes | Callable[[str], bytes | None] = b"",
        accept_offers: bool = False,
        signal_timeout_s: float = 5.0,
    ) -> None:
        self._name = name
        self._address = address
        self._member_address = member_address
        self._send_signal = send_signal
        self._handler: Serve[P] | None = None
        self.config = config
        # Replies are as large as what we asked for (a GET of many records); requests to us
        # are bounded like any request.
        self.dial_config = replace(config, max_message_bytes=MAX_REPLY_BYTES)
        self.accept_offers = accept_offers
        """Only nodes behind NAT take offers: peers reach a direct node over ZeroMQ."""
        self.secret_with: Callable[[str], bytes | None] = (
            secret if callable(secret) else functools.partial(_same_for_all, secret)
        )
        """The secret proofs to and from a peer use: b"" none required, None: no way to trust it."""
        self.signal_timeout_s = signal_timeout_s
        self.principal_of = principal_of
        """Who a proven member is now, per message (None: its key left the allow-list)."""
        self.counters: dict[str, int] = defaultdict(int)
        self._out: dict[str, WebRTCLink] = {}
        self._dialing: dict[str, asyncio.Future[WebRTCLink]] = {}
        self._answers: dict[str, asyncio.Future[str]] = {}
        self._inbound: set[WebRTCLink] = set()
        self._accepting = 0
        self._readers: dict[str, LinkConduit] = {}
        """The one conduit per member that receives its link's replies."""
        self._retry_at: dict[str, float] = {}
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.setup_seconds: list[float] = []
        """Dial-to-proven times of recent links (last 32)."""

    def __repr__(self) -> str:
        return f"<WebRTCPeering out={len(self._out)} in={len(self._inbound)}>"

    @property
    def me(self) -> str:
        return self._name()

    def start(self, serve: Serve[P]) -> None:
        """Serve requests that arrive on links members dial to us with ``serve``."""
        self._handler = serve

    # dialing (we are the client)

    def conduit(self, name: str) -> LinkConduit:
        """A conduit to ``name``; it takes over the replies of any earlier one (a member whose
        address changed gets a new client, and the old one must not eat its replies)."""
        conduit = LinkConduit(self, name)
        old = self._readers.get(name)
        self._readers[name] = conduit
        if old is not None:
            old.superseded()
        return conduit

    async def _pump(self, name: str, link: WebRTCLink) -> None:
        """The dialed link's only reader: hands each reply to the member's current conduit
        (if it uses this link; replies nobody waits for are dropped)."""
        try:
            while True:
                frames = await link.recv()
                conduit = self._readers.get(name)
                if conduit is not None and conduit.uses(link):
                    conduit.deliver(frames)
        except LinkClosed as exc:
            conduit = self._readers.get(name)
            if conduit is not None and conduit.uses(link):
                conduit.broken(str(exc))

    def release(self, name: str, conduit: LinkConduit) -> None:
        if self._readers.get(name) is conduit:
            del self._readers[name]

    async def link_to(self, name: str) -> WebRTCLink:
        """An open, proven link to member ``name``, dialing it if needed."""
        link = self._out.get(name)
        if link is not None and not link.closed:
            return link
        if time.monotonic() < self._retry_at.get(name, 0.0):
            raise LinkUnavailable(f"WebRTC link to {name} failed recently; retrying later")
        if self._closed:
            raise LinkUnavailable("WebRTC is shutting down")
        pending = self._dialing.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._dial(name))
            self._dialing[name] = pending
            pending.add_done_callback(lambda _f: self._dialing.pop(name, None))
        return await asyncio.shield(pending)

    async def _dial(self, name: str) -> WebRTCLink:
        started = time.monotonic()
        member_address = self._member_address(name)
        if member_address is None:
            raise LinkUnavailable(f"{name} is not a live member")
        session = secrets.token_hex(8)
        dialing = await offer(self.dial_config, label=f"{self.me}->{name}")
        answer_future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._answers[session] = answer_future
        try:
            self._signal(member_address, session, "offer", dialing.sdp)
            sdp = await asyncio.wait_for(answer_future, self.signal_timeout_s)
            link = await dialing.complete(sdp)
            await self._prove(link, b"dialer", dialing.sdp, sdp, expect=name)
        except asyncio.CancelledError:
            await dialing.cancel()
            raise
        except (asyncio.TimeoutError, LinkClosed, AuthFailed, LinkUnavailable) as exc:
            await dialing.cancel()
            self._retry_at[name] = time.monotonic() + RETRY_AFTER_S
            self.counters["webrtc_dial_failures"] += 1
            why = "no answer" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            logger.warning("x WebRTC link to %s failed: %s", name, why)
            raise LinkUnavailable(f"no WebRTC link to {name}: {why}") from None
        finally:
            self._answers.pop(session, None)
        if self._closed:
            await link.close("node stopping")
            raise LinkUnavailable("WebRTC is shutting down")
        self._out[name] = link
        self._spawn(self._pump(name, link))
        self._retry_at.pop(name, None)
        self.counters["webrtc_links_dialed"] += 1
        self.setup_seconds = [*self.setup_seconds[-31:], time.monotonic() - started]
        logger.info("- WebRTC link to %s up in %.0f ms", name, 1000 * (time.monotonic() - started))
        return link

    async def _prove(
        self, link: WebRTCLink, role: bytes, offer_sdp: str, answer_sdp: str, expect: str
    ) -> None:
        """Dialer: send our proof, then check the answerer's."""
        offer_fp, answer_fp = link.local_fingerprint, link.remote_fingerprint
        await link.send(self._proof(role, expect, offer_fp, answer_fp))
        try:
            frames = await asyncio.wait_for(link.recv(), self.signal_timeout_s)
        except asyncio.TimeoutError:
            raise AuthFailed(f"{expect} sent no membership proof") from None
        self._check_proof(frames, b"answerer", expect, offer_fp, answer_fp)

    def _proof(self, role: bytes, peer: str, offer_fp: str, answer_fp: str) -> list[bytes]:
        secret = self.secret_with(peer)
        mac = _mac(secret, role, self.me, offer_fp, answer_fp) if secret else b""
        return [AUTH_MAGIC, msgpack.packb({"name": self.me, "mac": mac}, use_bin_type=True)]

    def _check_proof(
        self, frames: Sequence[Buffer], role: bytes, expect: str, offer_fp: str, answer_fp: str
    ) -> None:
        try:
            if len(frames) != 2 or bytes(frames[0]) != AUTH_MAGIC:
                raise ValueError("not a membership proof")
            m = msgpack.unpackb(frames[1], raw=False)
            name, mac = m["name"], m["mac"]
        except Exception as exc:
            self.counters["webrtc_auth_failures"] += 1
            raise AuthFailed(f"bad membership proof from {expect}: {exc}") from None
        if name != expect:
            self.counters["webrtc_auth_failures"] += 1
            raise AuthFailed(f"peer claims to be {name!r}, expected {expect!r}")
        secret = self.secret_with(expect)
        if secret is None:
            self.counters["webrtc_auth_failures"] += 1
            raise AuthFailed(f"{expect} has no node key in the allow-list")
        if secret:
            want = _mac(secret, role, expect, offer_fp, answer_fp)
            if not isinstance(mac, bytes) or not hmac.compare_digest(mac, want):
                self.counters["webrtc_auth_failures"] += 1
                raise AuthFailed(f"{expect} could not prove membership (wrong mesh secret or key)")

    # answering (we serve)

    def on_signal(self, signal: Signal) -> None:
        """A SIGNAL message arrived (directly or through our relay)."""
        if signal.kind == "offer":
            self._spawn(self._accept(signal))
            return
        future = self._answers.get(signal.session)
        if future is None or future.done():
            self.counters["webrtc_stray_signals"] += 1
        elif signal.kind == "answer":
            future.set_result(signal.sdp)
        else:
            future.set_exception(LinkUnavailable(f"{signal.name} refused the link: {signal.reason}"))

    async def _accept(self, f: Signal) -> None:
        name, address, session = f.name, f.sender, f.session
        if self._member_address(name) != address:
            self.counters["webrtc_refused"] += 1
            logger.warning("x WebRTC offer from %s at %s refused: not a live member there", name, address)
            self._signal(address, session, "refuse", reason="not a live member at that address")
            return
        if not self.accept_offers:
            self.counters["webrtc_refused"] += 1
            self._signal(address, session, "refuse", reason="directly reachable: use ZeroMQ")
            return
        if f.channels > MAX_OFFERED_CHANNELS:
            self.counters["webrtc_refused"] += 1
            self._signal(address, session, "refuse", reason=f"more than {MAX_OFFERED_CHANNELS} channels")
            return
        if len(self._inbound) + self._accepting >= MAX_INBOUND_LINKS:
            self.counters["webrtc_refused"] += 1
            self._signal(address, session, "refuse", reason="too many links")
            return
        self._accepting += 1  # held from here, so a burst of offers cannot pass the check at once
        try:
            link, sdp = await answer(
                self.config, f.sdp, label=f"{name}->{self.me}", channels=f.channels or None
            )
        except LinkClosed as exc:
            self.counters["webrtc_refused"] += 1
            self._signal(address, session, "refuse", reason=str(exc))
            return
        finally:
            self._accepting -= 1
        self._signal(address, session, "answer", sdp)
        self._inbound.add(link)
        try:
            await link.wait_open()
            frames = await asyncio.wait_for(link.recv(), self.signal_timeout_s)
            offer_fp, answer_fp = link.remote_fingerprint, link.local_fingerprint
            self._check_proof(frames, b"dialer", name, offer_fp, answer_fp)
            await link.send(self._proof(b"answerer", name, offer_fp, answer_fp))
            self.counters["webrtc_links_accepted"] += 1
            await self._serve(link, name)
        except (LinkClosed, AuthFailed, asyncio.TimeoutError) as exc:
            logger.warning("x WebRTC link from %s closed: %s", name, exc or "no proof in time")
        finally:
            self._inbound.discard(link)
            await link.close()

    async def _serve(self, link: WebRTCLink, name: str) -> None:
        slots = asyncio.Semaphore(MAX_INFLIGHT_PER_LINK)
        serve = self._handler
        if serve is None:
            raise AuthFailed("this node serves no requests over WebRTC (not started)")

        async def one(frames: list[Buffer], principal: P) -> None:
            try:
                await serve(frames, link.send, principal, link)
            finally:
                slots.release()

        while True:
            frames = await link.recv()
            principal = self.principal_of(name)
            if principal is None:  # its key left the allow-list: this link serves nothing more
                raise AuthFailed(f"{name} is no longer allowed")
            # Each request gets its own task (a slow disk read must not hold up the link), up
            # to a bound: past it we stop reading, and SCTP's window pushes back on the peer.
            await slots.acquire()
            self._spawn(one(list(frames), principal))

    def _signal(self, to: str, session: str, kind: str, sdp: str = "", reason: str = "") -> None:
        signal = Signal(self._address(), self.me, session, kind, sdp, reason, self.config.channels)
        self._send_signal(to, signal)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, name: str) -> None:
        """A member died or left: close our link to it."""
        self._readers.pop(name, None)
        link = self._out.pop(name, None)
        if link is not None:
            self._spawn(link.close("member gone"))

    def stats(self) -> dict[str, Any]:
        setup = sorted(self.setup_seconds)
        return {
            "links_out": sorted(n for n, link in self._out.items() if not link.closed),
            "links_in": len(self._inbound),
            "bytes_sent": sum(link.bytes_sent for link in [*self._out.values(), *self._inbound]),
            "bytes_received": sum(link.bytes_received for link in [*self._out.values(), *self._inbound]),
            "setup_ms_p50": round(1000 * setup[len(setup) // 2], 1) if setup else None,
            **self.counters,
        }

    async def aclose(self) -> None:
        self._closed = True
        for pending in list(self._dialing.values()):
            pending.cancel()
        await asyncio.gather(*self._dialing.values(), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        links = [*self._out.values(), *self._inbound]
        self._out.clear()
        await asyncio.gather(*(link.close("node stopping") for link in links), return_exceptions=True)


INBOX_MESSAGES = 1024
"""Replies waiting for the client reading a link (it reads them as they come)."""


class LinkConduit:
    """An AsyncClient conduit over the WebRTC link to one member (dialed on first use).

    Replies reach it through the peering's one reader per link, so a conduit made later for
    the same member (its address changed) takes them over instead of racing for them.
    """

    def __init__(self, peering: WebRTCPeering[Any], name: str) -> None:
        self._peering = peering
        self._name = name
        # Bounded: a member can have no more replies for us than requests we sent it.
        self._inbox: asyncio.Queue[list[Buffer] | str] = asyncio.Queue(INBOX_MESSAGES)
        self._link: asyncio.Future[WebRTCLink] = asyncio.ensure_future(peering.link_to(name))

    def uses(self, link: WebRTCLink) -> bool:
        return (
            self._link.done()
            and not self._link.cancelled()
            and self._link.exception() is None
            and (self._link.result() is link)
        )

    def deliver(self, frames: Sequence[Buffer]) -> None:
        try:
            self._inbox.put_nowait(list(frames))
        except asyncio.QueueFull:  # replies nobody asked for: dropped, counted
            self._peering.counters["webrtc_replies_dropped"] += 1

    def broken(self, why: str) -> None:
        while self._inbox.full():
            self._inbox.get_nowait()  # whoever waits must hear that the link broke
        self._inbox.put_nowait(why)

    def superseded(self) -> None:
        self.broken("superseded by a newer connection")

    async def _ready(self) -> WebRTCLink:
        try:
            return await asyncio.shield(self._link)
        except LinkUnavailable:
            raise
        except Exception as exc:
            raise LinkUnavailable(f"no WebRTC link to {self._name}: {exc}") from None

    async def send(self, frames: Sequence[Buffer]) -> None:
        link = await self._ready()
        try:
            # Shielded: a caller that stops waiting must not cut a message in half (that
            # would close the link under every other request on it).
            await asyncio.shield(link.send(frames))
        except LinkClosed as exc:
            raise LinkUnavailable(str(exc)) from None

    async def recv(self) -> list[Buffer]:
        await self._ready()
        item = await self._inbox.get()
        if isinstance(item, str):
            self._inbox.put_nowait(item)
            raise LinkUnavailable(f"WebRTC link to {self._name}: {item}")
        return item

    async def aclose(self) -> None:
        # The link itself stays with the peering (the next conduit reuses it).
        self._peering.release(self._name, self)
        if not self._link.done():
            self._link.cancel()
        elif not self._link.cancelled():
            self._link.exception()  # mark a failed dial as seen, so asyncio does not warn
