"""CurveZMQ credentials and the ZAP handler that decides who may connect.

A server socket with CurveZMQ asks the ZAP handler of its context about every new
connection, before any message is read; the handler answers with the client's public key
as the connection's User-Id (every message from it carries that), or refuses it. The
decision itself (an allow-list) belongs to the caller: ``authorize(public key) -> bool``.

Keys are Z85 text (40 characters for 32 bytes), as libzmq takes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
import zmq.utils.z85

logger = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
Z85_KEY_CHARS = 40


class BadKey(ValueError):
    """A key is not a 40-character Z85 CurveZMQ key."""


def decode_key(key: str) -> bytes:
    """The 32 raw bytes of a Z85-encoded CurveZMQ key."""
    raw: bytes = zmq.utils.z85.decode(key.encode("ascii"))
    return raw


def check_key(key: str, what: str = "key") -> bytes:
    """``key`` as the bytes libzmq wants; raises BadKey naming ``what`` if malformed."""
    raw = key.strip().encode("ascii", "replace")
    if len(raw) != Z85_KEY_CHARS:
        raise BadKey(f"{what} must be {Z85_KEY_CHARS} Z85 characters, got {len(raw)}")
    try:
        zmq.utils.z85.decode(raw)
    except Exception as exc:  # z85 raises ValueError/KeyError on bad characters
        raise BadKey(f"{what} is not Z85 text: {exc}") from None
    return raw


@dataclass(frozen=True, slots=True)
class CurveKeyPair:
    """One party's long-term key pair (Z85)."""

    public: str
    secret: str

    @classmethod
    def generate(cls) -> CurveKeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))

    def __repr__(self) -> str:  # never print a secret by accident
        return f"<CurveKeyPair public={self.public}>"


@dataclass(frozen=True, slots=True)
class CurveClient:
    """What a connecting socket needs: its own key pair and the server's public key."""

    keys: CurveKeyPair
    server_key: str

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key.encode("ascii"))


@dataclass(frozen=True, slots=True)
class CurveServer:
    """A listening socket's key pair and its admission rule (called on the event loop)."""

    keys: CurveKeyPair
    authorize: Callable[[str], bool]
    """Whether the client with this public key (Z85) may connect."""

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret.encode("ascii"))


class ZapHandler:
    """Answers libzmq's authentication requests for one context, on the event loop."""

    def __init__(self, ctx: zmq.asyncio.Context, authorize: Callable[[str], bool]) -> None:
        self.authorize = authorize
        self.allowed = 0
        self.denied = 0
        self._denials: dict[str, int] = {}
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="lmcache-zap")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._sock.close(0)

    async def _serve(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            await self._sock.send_multipart(self._decide(frames))

    def _decide(self, frames: list[bytes]) -> list[bytes]:
        # Request: version, request id, domain, address, identity, mechanism, credentials...
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unsupported ZAP version", b"", b""]
        key = ""
        if mechanism == b"CURVE" and len(frames) == 7 and len(frames[6]) == 32:
            key = zmq.utils.z85.encode(frames[6]).decode("ascii")
        try:
            allowed = bool(key) and self.authorize(key)
        except Exception:  # a broken rule must refuse, never admit
            logger.exception("x authorization rule failed")
            allowed = False
        if allowed:
            self.allowed += 1
            return [b"1.0", request_id, b"200", b"OK", key.encode("ascii"), b""]
        self.denied += 1
        # A refused client retries every ~100 ms: log its 1st, 10th, 100th... refusal only.
        seen = self._denials[key] = self._denials.get(key, 0) + 1
        if len(self._denials) > 1024:
            self._denials.clear()
        if seen in (1, 10, 100, 1000, 10000):
            logger.warning(
                "x refused connection %d from %s: key %s is not allowed",
                seen,
                address.decode("ascii", "replace"),
                key or "(none)",
            )
        return [b"1.0", request_id, b"400", b"key not allowed", b"", b""]
