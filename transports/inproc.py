"""An in-process network on a virtual clock, for deterministic simulations of many nodes.

Every transport created by one :class:`InProcNetwork` shares its event queue. Delivery
takes a seeded random delay; messages may be lost (seeded), reordered (by the delay jitter)
or blocked by a partition. Nothing sleeps: :meth:`InProcNetwork.run_until` jumps from event
to event, so a simulated hour of gossip among 500 nodes takes seconds. Given a
``scheduler`` (a virtual-time asyncio loop, say), the network keeps no clock of its own:
deliveries are timers on that scheduler, which then runs everything on one clock.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .base import Handle, Receiver, Scheduler


@dataclass(slots=True)
class _Timer:
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(slots=True)
class NetworkStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    blocked: int = 0
    unroutable: int = 0
    bytes_sent: int = 0


class InProcNetwork:
    """A simulated network and the scheduler (virtual clock) of everything attached to it."""

    def __init__(
        self,
        seed: int = 0,
        loss: float = 0.0,
        delay_s: tuple[float, float] = (0.001, 0.005),
        scheduler: Scheduler | None = None,
    ) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        if not 0.0 <= delay_s[0] <= delay_s[1]:
            raise ValueError(f"delay_s must be (min, max) with 0 <= min <= max, got {delay_s}")
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay_s = delay_s
        self.stats = NetworkStats()
        self.scheduler = scheduler
        """Whose clock and timers deliveries use; None: this network's own (:meth:`run_until`)."""
        self._now = 0.0
        self._queue: list[tuple[float, int, _Timer, Callable[[], object]]] = []
        self._seq = itertools.count()
        self._endpoints: dict[str, InProcTransport] = {}
        self._group: dict[str, int] = {}  # address -> partition group; absent = group 0
        self.bytes_by_sender: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<InProcNetwork t={self._now:.3f} endpoints={len(self._endpoints)} queued={len(self._queue)}>"

    # Scheduler

    def time(self) -> float:
        return self._now if self.scheduler is None else self.scheduler.time()

    def call_at(self, when: float, callback: Callable[[], object]) -> Handle:
        if self.scheduler is not None:
            return self.scheduler.call_at(when, callback)
        timer = _Timer()
        heapq.heappush(self._queue, (max(when, self._now), next(self._seq), timer, callback))
        return timer

    def call_later(self, delay: float, callback: Callable[[], object]) -> Handle:
        return self.call_at(self.time() + delay, callback)

    def run_until(self, t: float, max_events: int = 50_000_000) -> int:
        """Run every event due up to virtual time ``t``; returns how many ran."""
        if self.scheduler is not None:
            raise RuntimeError("this network runs on its scheduler's clock: run that instead")
        ran = 0
        while self._queue and self._queue[0][0] <= t:
            when, _, timer, callback = heapq.heappop(self._queue)
            self._now = when
            if not timer.cancelled:
                callback()
                ran += 1
                if ran >= max_events:
                    raise RuntimeError(f"simulation exceeded {max_events} events before t={t}")
        self._now = max(self._now, t)
        return ran

    def run_for(self, seconds: float) -> int:
        return self.run_until(self._now + seconds)

    # topology

    def transport(self, address: str) -> InProcTransport:
        if address in self._endpoints:
            raise ValueError(f"address {address!r} is already attached")
        t = InProcTransport(self, address)
        self._endpoints[address] = t
        return t

    def detach(self, address: str) -> None:
        """The node at ``address`` vanishes (a crash): messages to it are dropped."""
        self._endpoints.pop(address, None)

    def partition(self, *groups: Iterable[str]) -> None:
        """Only members of the same group can reach each other; unlisted addresses form group 0."""
        self._group = {}
        for i, group in enumerate(groups, start=1):
            for address in group:
                self._group[address] = i

    def heal(self) -> None:
        self._group = {}

    def reachable(self, src: str, dst: str) -> bool:
        """``dst`` is attached and no partition separates it from ``src``."""
        return dst in self._endpoints and self._group.get(src, 0) == self._group.get(dst, 0)

    def _route(self, src: str, dst: str, data: bytes) -> None:
        self.stats.sent += 1
        self.stats.bytes_sent += len(data)
        self.bytes_by_sender[src] = self.bytes_by_sender.get(src, 0) + len(data)
        if self._group.get(src, 0) != self._group.get(dst, 0):
            self.stats.blocked += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.stats.lost += 1
            return
        delay = self.rng.uniform(*self.delay_s)
        self.call_at(self.time() + delay, lambda: self._deliver(src, dst, data))

    def _deliver(self, src: str, dst: str, data: bytes) -> None:
        endpoint = self._endpoints.get(dst)
        if (
            endpoint is None
            or endpoint.on_receive is None
            or self._group.get(src, 0) != self._group.get(dst, 0)
        ):
            self.stats.unroutable += 1
            return
        self.stats.delivered += 1
        endpoint.on_receive(src, data)


class InProcTransport:
    """One node's attachment to an :class:`InProcNetwork` (a DatagramTransport)."""

    def __init__(self, network: InProcNetwork, address: str) -> None:
        self.network = network
        self.address = address
        self.on_receive: Receiver | None = None

    def __repr__(self) -> str:
        return f"<InProcTransport {self.address}>"

    def send(self, to: str, data: bytes) -> None:
        self.network._route(self.address, to, data)

    def close(self) -> None:
        self.network.detach(self.address)
