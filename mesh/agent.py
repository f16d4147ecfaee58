"""MeshAgent: drives a sans-I/O :class:`Membership` over a transport and a scheduler.

The same agent runs over ZeroMQ on asyncio's loop (real time) and over the in-process
network on its virtual clock (simulations). It owns the one timer the core asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lmcache_mesh.transports.base import DatagramTransport, Handle, Scheduler

from .membership import Membership, Out

logger = logging.getLogger(__name__)

ERROR_BACKOFF_S = 0.1
"""After a failed tick, wait at least this long before the next one."""


class MeshAgent:
    """Feeds datagrams and timer ticks to a Membership and sends what it returns.

    All calls happen on the scheduler's thread.
    """

    def __init__(self, membership: Membership, transport: DatagramTransport, scheduler: Scheduler) -> None:
        self.membership = membership
        self.transport = transport
        self.scheduler = scheduler
        self._timer: Handle | None = None
        self._timer_at = float("inf")
        self._running = False
        self._not_before = 0.0

    def __repr__(self) -> str:
        return f"<MeshAgent {self.membership!r}>"

    def start(self, seeds: Sequence[str] = ()) -> None:
        self._running = True
        self.transport.on_receive = self._on_receive
        self._send(self.membership.start(self.scheduler.time(), seeds))
        self._reschedule()

    def join(self, seeds: Sequence[str]) -> None:
        self._send(self.membership.join(self.scheduler.time(), seeds))
        self._reschedule()

    def leave(self) -> None:
        """Tell the cluster we are leaving; keep running briefly so the news spreads."""
        self._send(self.membership.leave(self.scheduler.time()))

    def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport.on_receive = None

    def _on_receive(self, src: str, data: bytes) -> None:
        if not self._running:
            return
        try:
            self._send(self.membership.on_message(src, data, self.scheduler.time()))
        except Exception:  # a bug on one datagram must not stop membership
            logger.exception("x %s: error handling a datagram from %s", self.membership.me.name, src)
        self._reschedule()

    def _tick(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if not self._running:
            return
        try:
            self._send(self.membership.tick(self.scheduler.time()))
        except Exception:  # keep ticking: a silent stop would look like a dead node to everyone
            logger.exception("x %s: error in a membership tick", self.membership.me.name)
            self._not_before = self.scheduler.time() + ERROR_BACKOFF_S  # but never spin on a bug
        self._reschedule()

    def _reschedule(self) -> None:
        wake = max(self.membership.next_wakeup(), self._not_before)
        if self._timer is not None and wake >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = wake
        self._timer = self.scheduler.call_at(wake, self._tick)

    def _send(self, outs: list[Out]) -> None:
        for address, data in outs:
            self.transport.send(address, data)
