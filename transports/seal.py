"""Membership datagrams and members' request headers sealed with the mesh secret (when
CurveZMQ is off).

Each datagram carries a 16-byte HMAC-SHA256 tag of its bytes under a key derived from the
mesh secret; one without a valid tag is dropped and counted before it is even decoded, so
an outsider can neither declare a member dead, nor claim its name or address, nor inflate
its weight. Replays of sealed datagrams are harmless: membership ignores news older than
what it knows. With CurveZMQ the link itself is authenticated and nothing is added.

Requests between members (index announcements and queries, replica PUTs, repair reads,
relaying, signaling, NAT attachment) seal their first frame, the header, the same way
(:class:`HeaderSeal`): a node with a mesh secret serves an unsealed request as an engine's or
operator's, never as a member's. The seal covers the header (which carries each record's
checksum), not payload bytes, and does not stop a replay by someone who can read the traffic:
on a network like that, use CurveZMQ.
"""

from __future__ import annotations

import hashlib
import hmac

from .base import Buffer, GossipTransport, Receiver

TAG_BYTES = 16
_DOMAIN = b"lmcache-mesh gossip v1"
_REQUEST_DOMAIN = b"lmcache-mesh request v1"
SEAL_MARK = b"\xc1"
"""First byte of a sealed header: msgpack never uses it, so no plain header starts with it."""
SEALED_PREFIX_BYTES = len(SEAL_MARK) + TAG_BYTES


def gossip_key(secret: bytes) -> bytes:
    """The key datagrams are sealed with (not the secret itself, which also proves WebRTC peers)."""
    return hmac.new(secret, _DOMAIN, hashlib.sha256).digest()


class SealedGossip:
    """A :class:`GossipTransport` whose datagrams carry proof of the mesh secret."""

    def __init__(self, inner: GossipTransport, secret: bytes) -> None:
        if not secret:
            raise ValueError("a sealed gossip transport needs a non-empty mesh secret")
        self.inner = inner
        self._key = gossip_key(secret)
        self._receiver: Receiver | None = None
        self.rejected = 0
        """Datagrams dropped for a missing or wrong tag."""
        inner.on_receive = self._open

    def __repr__(self) -> str:
        return f"<SealedGossip {self.inner!r} rejected={self.rejected}>"

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def on_receive(self) -> Receiver | None:
        return self._receiver

    @on_receive.setter
    def on_receive(self, receiver: Receiver | None) -> None:
        self._receiver = receiver

    def _tag(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()[:TAG_BYTES]

    def send(self, to: str, data: bytes) -> None:
        self.inner.send(to, self._tag(data) + data)

    def _open(self, src: str, sealed: bytes) -> None:
        tag, data = sealed[:TAG_BYTES], sealed[TAG_BYTES:]
        if len(sealed) < TAG_BYTES or not hmac.compare_digest(tag, self._tag(data)):
            self.rejected += 1
            return
        if self._receiver is not None:
            self._receiver(src, data)

    def send_message(self, to: str, frames: list[bytes]) -> None:
        self.inner.send_message(to, frames)  # signaling: proven on its own (DTLS-bound HMAC)

    def deliver(self, sender: str, data: bytes) -> None:
        self.inner.deliver(sender, data)

    def readdress(self, address: str) -> None:
        self.inner.readdress(address)

    def close(self) -> None:
        self.inner.close()


def strip_seal(frame: Buffer) -> Buffer:
    """A header with its seal (if any) removed, unchecked: for a node without a mesh secret."""
    view = memoryview(frame)
    return view[SEALED_PREFIX_BYTES:] if view[:1] == SEAL_MARK else frame


class HeaderSeal:
    """Seals members' request headers with the mesh secret, and checks them."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("sealing headers needs a non-empty mesh secret")
        self._key = hmac.new(secret, _REQUEST_DOMAIN, hashlib.sha256).digest()
        self.rejected = 0
        """Sealed headers whose tag was wrong (a member with another secret, or a forgery)."""

    def __repr__(self) -> str:
        return f"<HeaderSeal rejected={self.rejected}>"

    def _tag(self, header: Buffer) -> bytes:
        return hmac.new(self._key, header, hashlib.sha256).digest()[:TAG_BYTES]

    def seal(self, header: Buffer) -> bytes:
        return SEAL_MARK + self._tag(header) + bytes(header)

    def open(self, frame: Buffer) -> tuple[Buffer, bool]:
        """(header, proven): the header without its seal; proven only with a valid tag."""
        view = memoryview(frame)
        if view[:1] != SEAL_MARK:
            return frame, False
        header = view[SEALED_PREFIX_BYTES:]
        if len(view) < SEALED_PREFIX_BYTES or not hmac.compare_digest(
            bytes(view[1:SEALED_PREFIX_BYTES]), self._tag(header)
        ):
            self.rejected += 1
            return header, False
        return header, True
