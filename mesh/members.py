"""Members as one node's membership sees them, and the records it keeps per member.

:class:`Member` is a member's current view (address, zone, weight, incarnation, state);
:class:`Suspicion`, :class:`Probe` and :class:`Relay` are the timers of Lifeguard's
suspicion, of one probe round and of an indirect ping done for someone else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .messages import Kind, News


class State(str, Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


LIVE_STATES = frozenset({State.ALIVE, State.SUSPECT})
"""A member in these states owns its share of the ring and is probed, asked and served."""


def is_live(state: State | None) -> bool:
    return state in LIVE_STATES


@dataclass(slots=True)
class Member:
    name: str
    address: str
    zone: str = "default"
    weight: float = 1.0
    incarnation: int = 0
    state: State = State.ALIVE
    since: float = 0.0
    """When the member entered its current state (scheduler time)."""

    def __repr__(self) -> str:
        return f"<Member {self.name} {self.state.value} inc={self.incarnation} zone={self.zone}>"

    def news(self, origin: str = "") -> News:
        kind = {State.ALIVE: Kind.ALIVE, State.SUSPECT: Kind.SUSPECT}.get(self.state, Kind.DEAD)
        if self.state is State.LEFT:
            origin = self.name
        return News(kind, self.name, self.incarnation, self.address, self.zone, self.weight, origin)


@dataclass(slots=True)
class Suspicion:
    started: float
    deadline: float
    confirmations: set[str] = field(default_factory=set)
    regossip_at: float = 0.0
    """Until it is refuted or expires, a suspicion is gossiped again now and then: news sent
    while we were cut off is lost, and the suspect must hear of it to refute it."""


@dataclass(slots=True)
class Probe:
    target: str
    seq: int
    indirect_at: float
    ends_at: float
    acked: bool = False
    indirect_sent: bool = False
    helpers: int = 0
    nacks: int = 0


@dataclass(slots=True)
class Relay:
    requester_addr: str
    requester_seq: int
    nack_at: float
