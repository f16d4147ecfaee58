"""What the mesh needs from a network: a clock that can schedule, and a datagram transport.

Both are small Protocols so that the same membership and gossip code runs over ZeroMQ in
real time (asyncio's loop is a :class:`Scheduler`) and over the in-process network on a
virtual clock (hundreds of nodes, seeded loss, delay and partitions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview
"""Any bytes-like frame; transports keep it without copying."""

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


class GossipTransport(DatagramTransport, Protocol):
    """A datagram transport a node's cluster runs on (ZeroMQ in the daemon, in-process in
    simulations): datagrams, other one-way messages routed the same way, and an address
    that can change (a node behind NAT that moves to another relay)."""

    def send_message(self, to: str, frames: list[bytes]) -> None:
        """One-way ``frames`` to ``to``, routed like a datagram; dropped (and counted) if stuck."""
        ...

    def deliver(self, sender: str, data: bytes) -> None:
        """An inbound datagram read by whoever owns the receiving socket: hand it to ``on_receive``."""
        ...

    def readdress(self, address: str) -> None:
        """This node is now reached at ``address``."""
        ...


class Tracker(Protocol):
    """Follows a sent message until the transport no longer holds its buffers."""

    @property
    def done(self) -> bool: ...


class Conduit(Protocol):
    """Carries whole messages (lists of frames) to one node and back, many in flight.

    ``send`` may wait (bounded queues); ``recv`` returns the next message from the node, in
    whatever order replies come. A broken conduit raises (OSError, or the transport's own
    error) from both; the client that owns it makes a new one. Use on one event loop.
    """

    async def send(self, frames: Sequence[Buffer]) -> None: ...

    async def recv(self) -> list[Buffer]: ...

    async def aclose(self) -> None: ...
