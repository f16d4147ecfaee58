"""Mesh wire messages: one msgpack map per datagram, validated at decode.

    {"v": 1, "t": MsgType, "src": sender name, "sa": sender address, ...fields, "g": [broadcast, ...]}

Broadcasts (membership news, piggybacked on any message) are compact lists
``[kind, name, incarnation, address, zone, weight, from]``. Unknown fields are ignored, so
fields may be added; the numbers below may not change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack

from lmcache_mesh.transports import wire

from .errors import MalformedMessage

MESH_VERSION_MIN = 1
MESH_VERSION_MAX = 1
MESH_VERSION = 1
MAX_INCARNATION = 1 << 62
"""Highest incarnation accepted: a refute adds one, and the result must still encode."""
MAX_MESSAGE_BYTES = 4 << 20
"""Largest datagram we decode (a push-pull of a few thousand members fits)."""
MAX_WEIGHT = float(1 << 16)
"""Largest member weight accepted (a node's weight is its storage in GiB: 64 TiB)."""
MAX_TABLE = 1 << 16
"""Most members in one push-pull table."""
MAX_GOSSIP = 1024
"""Most news items piggybacked on one message."""
NAME_RE = re.compile(r"^[^\s#/@]{1,255}$")
"""A member's name: no blanks, and none of ``# / @`` (``/`` joins a node and an engine name in
the index; ``NAME@address`` names a seed)."""
ADDRESS_RE = re.compile(r"^\S{1,256}$")
"""An address: no blanks, bounded (what it names is for the transports to judge)."""
MAX_ZONE_CHARS = 128


class MsgType(IntEnum):
    # APPEND ONLY: the numbers are on the wire.
    PING = 1
    ACK = 2
    PING_REQ = 3
    NACK = 4
    PUSH_PULL = 5
    GOSSIP = 6


class Kind(IntEnum):
    # APPEND ONLY: the numbers are on the wire.
    ALIVE = 1
    SUSPECT = 2
    DEAD = 3


@dataclass(frozen=True, slots=True)
class News:
    """One membership fact: ``name`` is in state ``kind`` at ``incarnation`` (said by ``origin``)."""

    kind: Kind
    name: str
    incarnation: int
    address: str = ""
    zone: str = ""
    weight: float = 1.0
    origin: str = ""

    def to_wire(self) -> list[Any]:
        return [
            int(self.kind),
            self.name,
            self.incarnation,
            self.address,
            self.zone,
            self.weight,
            self.origin,
        ]

    @classmethod
    def from_wire(cls, raw: object) -> News:
        if not isinstance(raw, list) or len(raw) < 7:
            raise MalformedMessage(f"broadcast must be a list of 7 fields, got {raw!r:.80}")
        kind, name, inc, address, zone, weight, origin = raw[:7]
        try:
            k = Kind(kind)
        except ValueError:
            raise MalformedMessage(f"unknown broadcast kind {kind!r:.40}") from None
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise MalformedMessage(f"broadcast name {name!r:.60} is not a member name")
        if not wire.is_int(inc) or not 0 <= inc <= MAX_INCARNATION:
            raise MalformedMessage(f"incarnation must be an int in [0, 2**62], got {inc!r:.40}")
        if not all(isinstance(s, str) for s in (address, zone, origin)):
            raise MalformedMessage("broadcast address, zone and origin must be strings")
        if address and not ADDRESS_RE.match(address):
            raise MalformedMessage(f"broadcast address {address!r:.60} is blank-separated or too long")
        if len(zone) > MAX_ZONE_CHARS or (origin and not NAME_RE.match(origin)):
            raise MalformedMessage("broadcast zone too long, or origin not a member name")
        if (
            not isinstance(weight, (int, float))
            or isinstance(weight, bool)
            or not math.isfinite(weight)
            or not 0 < weight <= MAX_WEIGHT
        ):
            raise MalformedMessage(f"weight must be a number in (0, {MAX_WEIGHT:g}], got {weight!r:.40}")
        return cls(k, name, inc, address, zone, float(weight), origin)


@dataclass(slots=True)
class Message:
    type: MsgType
    src: str
    src_addr: str
    seq: int = 0
    target: str = ""
    target_addr: str = ""
    state: list[News] = field(default_factory=list)
    """PUSH_PULL: the sender's whole member table."""
    reply: bool = False
    """PUSH_PULL: True for the answer to a push (which must not be answered again)."""
    gossip: list[News] = field(default_factory=list)

    def encode(self) -> bytes:
        m: dict[str, Any] = {"v": MESH_VERSION, "t": int(self.type), "src": self.src, "sa": self.src_addr}
        if self.seq:
            m["seq"] = self.seq
        if self.target:
            m["tg"] = self.target
            m["ta"] = self.target_addr
        if self.type is MsgType.PUSH_PULL:
            m["st"] = [n.to_wire() for n in self.state]
            m["r"] = self.reply
        if self.gossip:
            m["g"] = [n.to_wire() for n in self.gossip]
        packed: bytes = msgpack.packb(m, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Raises MalformedMessage (never anything else) on any bad input."""
        m = wire.unpack_map(data, MAX_MESSAGE_BYTES, "message", MalformedMessage, MalformedMessage)
        v = m.get("v")
        if not wire.is_int(v) or not MESH_VERSION_MIN <= v <= MESH_VERSION_MAX:
            raise MalformedMessage(
                f"mesh version {v!r:.40} not supported; must be in range [{MESH_VERSION_MIN}, {MESH_VERSION_MAX}]"
            )
        raw_type = m.get("t")
        try:
            t = MsgType(raw_type if isinstance(raw_type, int) else -1)
        except ValueError:
            raise MalformedMessage(f"unknown message type {m.get('t')!r:.40}") from None
        src, sa, seq = m.get("src"), m.get("sa"), m.get("seq", 0)
        target, ta = m.get("tg", ""), m.get("ta", "")
        if (
            not (
                isinstance(src, str)
                and isinstance(sa, str)
                and isinstance(target, str)
                and isinstance(ta, str)
            )
            or not src
        ):
            raise MalformedMessage("src, sa, tg and ta must be strings (src non-empty)")
        if not wire.is_int(seq):
            raise MalformedMessage("seq must be an int")
        f = wire.Fields(m, MalformedMessage)
        raw_state, raw_gossip = f.listing("st", []), f.listing("g", [])
        if len(raw_state) > MAX_TABLE or len(raw_gossip) > MAX_GOSSIP:
            raise MalformedMessage(
                f"{len(raw_state)} members and {len(raw_gossip)} news items: at most {MAX_TABLE} and {MAX_GOSSIP}"
            )
        state = [News.from_wire(x) for x in raw_state]
        gossip = [News.from_wire(x) for x in raw_gossip]
        return cls(t, src, sa, seq, target, ta, state, bool(m.get("r", False)), gossip)
