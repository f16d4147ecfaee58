"""What the mesh needs from a network: a clock that can schedule, and a datagram transport.

Both are small Protocols so that the same membership and gossip code runs over ZeroMQ in
real time (asyncio's loop is a :class:`Scheduler`) and over the in-process network on a
virtual clock (hundreds of nodes, seeded loss, delay and partitions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Receiver = Callable[[str, bytes], None]
"""Called with (sender address, datagram) on the scheduler's thread; must not block.
The bytes belong to the receiver."""


class Handle(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """Time for protocol code: ``time()`` in seconds, ``call_at`` to run a callback later.

    ``asyncio.AbstractEventLoop`` satisfies it; so does :class:`InProcNetwork`.
    Callbacks run on the scheduler's thread, one at a time, and must not block.
    """

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Handle: ...


class DatagramTransport(Protocol):
    """Best-effort, unordered delivery of small messages between node addresses.

    ``send`` never blocks and never raises for an unreachable or dead peer: the message is
    dropped (and counted by the implementation), as UDP would. Call it on the scheduler's
    thread. ``on_receive`` is set once by the owner before traffic starts.
    """

    address: str
    on_receive: Receiver | None

    def send(self, to: str, data: bytes) -> None: ...

    def close(self) -> None: ...
