"""Relaying for nodes behind NAT: the relay's table, and the NAT node's uplink to it.

A node started with ``--nat`` accepts no inbound connections. Its :class:`Uplink` keeps
one outbound ZeroMQ connection to a reachable member (its relay) and sends ATTACH on it
every ``keepalive_s``; the relay's :class:`RelayTable` remembers which connection carries
which name, and forwards RELAY messages (membership datagrams, WebRTC offers) down it.
When the relay stops answering, the uplink moves to another reachable member and the node
re-announces its ``webrtc://RELAY/NAME`` address with a higher incarnation.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

import zmq
import zmq.asyncio

from .base import Buffer
from .zmq import CurveFor, TransportError, dealer

logger = logging.getLogger(__name__)

KEEPALIVE_S = 1.0
"""How often a NAT node re-attaches to its relay (also keeps NAT mappings open)."""

ATTACH_TTL_S = 5.0
"""A relay forgets an attachment not renewed for this long."""

MAX_ATTACHED = 4096
"""Most nodes one relay serves."""

SWITCH_AFTER_S = 4.0
"""A NAT node with no answer from its relay for this long moves to another member."""


class RelayTable:
    """Relay side: member name -> ROUTER identity of its uplink. Use on the event loop."""

    def __init__(self, ttl_s: float = ATTACH_TTL_S) -> None:
        self.ttl_s = ttl_s
        self.forwarded = 0
        self._attached: dict[str, tuple[bytes, float, str]] = {}

    def __len__(self) -> int:
        return len(self._attached)

    def attach(self, name: str, identity: bytes, token: str = "") -> bool:
        """Attach (or renew) ``name`` on this connection; False if another live connection
        holds the name. The holder's ``token`` (random per uplink) lets it move to a new
        connection (a reconnect); a restarted node gets its name back once the entry expires."""
        now = time.monotonic()
        held = self._attached.get(name)
        if held is not None and held[0] != identity and held[1] >= now and not (token and token == held[2]):
            return False
        if held is None and len(self._attached) >= MAX_ATTACHED:
            self._purge(now)
            if len(self._attached) >= MAX_ATTACHED:
                return False
        self._attached[name] = (identity, now + self.ttl_s, token)
        return True

    def _purge(self, now: float) -> None:
        for name in [n for n, (_, until, _) in self._attached.items() if until < now]:
            del self._attached[name]

    def identity(self, name: str) -> bytes | None:
        entry = self._attached.get(name)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._attached[name]
            return None
        return entry[0]

    def names(self) -> list[str]:
        self._purge(time.monotonic())
        return sorted(self._attached)


class AttachMessages(Protocol):
    """How the node's protocol spells an ATTACH and its answer (the uplink only sends them)."""

    def attach(self, request_id: int, name: str, token: str) -> bytes:
        """The one-frame ATTACH request for ``name``."""
        ...

    def answer(self, header: Buffer) -> bool | None:
        """True/False for an ok/error reply (to our ATTACH); None for anything else (a
        message the relay forwarded to us)."""
        ...


class Uplink:
    """NAT side: the outbound connection to our relay, and what comes down it."""

    def __init__(
        self,
        name: str,
        candidates: Callable[[], Sequence[str]],
        messages: AttachMessages,
        on_relay: Callable[[str], None],
        max_message_bytes: int,
        keepalive_s: float = KEEPALIVE_S,
        switch_after_s: float = SWITCH_AFTER_S,
        curve: CurveFor | None = None,
    ) -> None:
        self.name = name
        self._curve = curve
        self.relay = ""
        """tcp:// address of the current relay ("" before the first)."""
        self.attached = False
        """The current relay answered our last ATTACH in time."""
        self.switches = 0
        self._candidates = candidates
        self._messages = messages
        self._deliver: Callable[[list[Buffer]], Awaitable[None]] | None = None
        self._on_relay = on_relay
        self._max_message_bytes = max_message_bytes
        self._keepalive_s = keepalive_s
        self._switch_after_s = switch_after_s
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._last_answer = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._attached_event = asyncio.Event()
        self._closing = False
        self._token = secrets.token_hex(16)

    def __repr__(self) -> str:
        return f"<Uplink {self.name} via {self.relay or '-'} attached={self.attached}>"

    def start(self, first_relay: str, deliver: Callable[[list[Buffer]], Awaitable[None]]) -> None:
        """Connect to ``first_relay`` and keep attached; what the relay forwards to us goes
        to ``deliver``."""
        self._deliver = deliver
        self._connect(first_relay)
        self._tasks = [
            asyncio.create_task(self._keepalive(), name="lmcache-uplink-keepalive"),
            asyncio.create_task(self._read(), name="lmcache-uplink-read"),
        ]

    async def wait_attached(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._attached_event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _connect(self, relay: str) -> None:
        try:
            credentials = self._curve(relay) if self._curve is not None else None
        except LookupError as exc:
            raise TransportError(str(exc)) from None
        # raises before we drop the old one
        sock = cast(zmq.asyncio.Socket, dealer(self._ctx, relay, self._max_message_bytes, credentials))
        if self._sock is not None:
            self._sock.close(0)
        self._sock = sock
        self.relay = relay
        self.attached = False
        self._attached_event.clear()
        self._last_answer = time.monotonic()
        self._send_attach()

    def _send_attach(self) -> None:
        assert self._sock is not None
        try:
            self._sock.send(self._messages.attach(next(self._ids), self.name, self._token), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the relay is not reading: the switch timer deals with it

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self._keepalive_s)
            if time.monotonic() - self._last_answer > self._switch_after_s:
                self._switch()
            else:
                self._send_attach()

    def _switch(self) -> None:
        # Every direct member is a candidate, even one our membership calls dead: without a
        # relay we hear nobody, so we soon suspect everyone.
        others = [c for c in self._candidates() if c != self.relay]
        if not others:
            self._last_answer = time.monotonic()  # nobody else: keep trying this one
            self._send_attach()
            return
        for i in range(len(others)):
            nxt = others[(self.switches + i) % len(others)]
            try:
                self._connect(nxt)
            except TransportError as exc:  # an address gossip gave us that we cannot dial
                logger.warning("x cannot use %s as relay: %s", nxt, exc)
                continue
            logger.warning("! relay is not answering; moved to %s", nxt)
            self.switches += 1
            self._on_relay(nxt)
            return
        self._last_answer = time.monotonic()  # none usable: try again after the next interval

    async def _read(self) -> None:
        while True:
            sock = self._sock
            assert sock is not None
            try:
                frames = await sock.recv_multipart(copy=False)
            except (zmq.ZMQError, asyncio.CancelledError):
                # Closing the old socket when we switch relays fails (or cancels) its pending
                # receive; only a stop of the uplink itself ends this loop.
                if self._closing or sock is self._sock:
                    raise
                continue
            buffers: list[Any] = [f.buffer for f in frames]
            if sock is not self._sock:
                continue
            reply = self._messages.answer(buffers[0])
            if reply is False:
                logger.warning("x relay %s refused us (an older node, or our name is taken)", self.relay)
            elif reply:
                self._last_answer = time.monotonic()
                if not self.attached:
                    logger.info("- attached to relay %s", self.relay)
                self.attached = True
                self._attached_event.set()
            elif self._deliver is not None:
                await self._deliver(buffers)

    async def aclose(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        self._ctx.term()
