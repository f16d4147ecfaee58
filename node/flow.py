"""Flow control: bounds per party on requests in flight and on reply bytes not yet sent.

A party is what one sender's limits count against: a client's key (however many
connections it opens), or one connection. Requests that may wait (disk, peers) hold a
slot, in all and per party; large replies are tracked until the transport no longer holds
their bytes. Past a bound the sender gets BUSY at once, so an engine never waits past its
deadline for a full node, and a client that stops reading cannot grow the node's memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from lmcache_mesh.mesh.errors import Busy
from lmcache_mesh.transports.base import Tracker

from .config import LimitsSettings

MAX_TRACKED_PARTIES = 1024
"""Parties whose queued replies are followed; past it, those with nothing queued are forgotten."""

TRACKED_REPLY_BYTES = 64 << 10
"""Replies this large are tracked until sent: they count against a party's queued bytes."""


class FlowControl:
    """Slots and queued reply bytes, per party and in all. Use on the event loop."""

    def __init__(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self.slots = max(limits.max_inflight_requests, 1)
        self.busy_slots = 0
        self.inflight: dict[Hashable, int] = {}
        """Requests waiting (disk, peers) per party."""
        self._queued: dict[Hashable, deque[tuple[Tracker, int]]] = {}
        """Large replies handed to the transport per party, until sent."""

    def __repr__(self) -> str:
        return f"<FlowControl {self.busy_slots}/{self.slots} slots, {len(self.inflight)} parties waiting>"

    def over_limit(self, party: Hashable, wait: bool, replies_bytes: bool) -> Busy | None:
        """BUSY when taking a request would pass a bound: requests waiting (in all, and for
        this party; only for a request that ``wait``s) or, for one whose reply carries
        payloads (``replies_bytes``), reply bytes not yet sent to the party."""
        limits = self.limits
        if wait:
            if self.busy_slots >= self.slots:
                return Busy(f"node busy: {self.slots} requests in flight")
            waiting = self.inflight.get(party, 0)
            if waiting >= limits.max_inflight_per_peer:
                return Busy(f"{waiting} requests of yours in flight (limit {limits.max_inflight_per_peer})")
        if replies_bytes:
            queued = self.queued_bytes(party)
            if queued >= limits.max_inflight_bytes_per_peer:
                return Busy(
                    f"{queued} bytes of replies to you not sent yet (limit {limits.max_inflight_bytes_per_peer})"
                )
        return None

    def reply_over_limit(self, party: Hashable, nbytes: int) -> Busy | None:
        """BUSY instead of a reply of ``nbytes`` that would pass the bytes queued for this
        party, or for everyone, while others are queued (alone, a reply always goes: its
        request passed the size checks)."""
        limits = self.limits
        queued = self.queued_bytes(party)
        if queued and queued + nbytes > limits.max_inflight_bytes_per_peer:
            return Busy(
                f"{queued} bytes of replies to you not sent yet (limit {limits.max_inflight_bytes_per_peer})"
            )
        total = sum(self.queued_bytes(p) for p in list(self._queued))
        if total and total + nbytes > limits.max_inflight_bytes:
            return Busy(
                f"node busy: {total} bytes of replies not sent yet (limit {limits.max_inflight_bytes})"
            )
        return None

    def hold(self, party: Hashable) -> None:
        self.busy_slots += 1
        self.inflight[party] = self.inflight.get(party, 0) + 1

    def release(self, party: Hashable) -> None:
        self.busy_slots -= 1
        left = self.inflight[party] - 1
        if left:
            self.inflight[party] = left
        else:
            del self.inflight[party]

    def sent(self, party: Hashable, tracker: Tracker, nbytes: int) -> None:
        """A reply of ``nbytes`` went to the transport; ``tracker`` says when it is out."""
        self._queued.setdefault(party, deque()).append((tracker, nbytes))
        if len(self._queued) > MAX_TRACKED_PARTIES:  # parties that left: forget them
            for gone in list(self._queued):
                self.queued_bytes(gone)

    def queued_bytes(self, party: Hashable) -> int:
        """Reply bytes handed to the transport for ``party`` and not sent yet."""
        queue = self._queued.get(party)
        if not queue:
            return 0
        pending = deque(item for item in queue if not item[0].done)
        if pending:
            self._queued[party] = pending
        else:
            del self._queued[party]
        return sum(n for _, n in pending)
