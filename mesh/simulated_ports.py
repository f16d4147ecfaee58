"""The mesh's ports in memory, for simulations: records, holdings, peers and a virtual-time loop.

:class:`DataSimulation <lmcache_mesh.mesh.simulation.DataSimulation>` runs the real
:class:`MeshCoordinator` of every node on one :class:`VirtualLoop`, an asyncio loop whose
clock is virtual: it never waits, it jumps to the next timer. Membership timers, gossip
datagrams (:class:`~lmcache_mesh.transports.inproc.InProcNetwork` with that loop as its
scheduler) and the peer calls below all share it, so a run depends only on its seed.

A peer call (:class:`SimPeer`) reaches the target node's handlers directly, as the node's
server would: PUT → ``holdings.put_records`` + ``directory.stored``, ANNOUNCE →
``directory.on_announce``, WHO_HAS → ``directory.who_has``, GET (local) → the target's
holdings. :class:`CallNetwork` gives each call a seeded delay each way (plus bytes over
bandwidth) and seeded loss; a lost request or reply, a crashed target, a partition or a
reply later than the call's timeout all end as the real client ends: ``DeadlineExceeded``
once the timeout has passed (or, with ``refuse_dead``, a crashed target refuses at once
with ``ConnectionRefusedError``, as a link that reports errors would).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import random
import selectors
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lmcache_mesh.transports.base import Receiver
from lmcache_mesh.transports.inproc import InProcTransport

from .cluster import Cluster
from .coordinator import MeshCoordinator
from .costs import Cost
from .directory import HolderDirectory
from .errors import DeadlineExceeded, MeshError, NoSpace, Unavailable
from .reads import MeshReads

Keys = Sequence[bytes]


class SimulationStalled(RuntimeError):
    """Nothing is scheduled and nothing is ready: waiting would take forever."""


class _NoWaitSelector(selectors.SelectSelector):
    """A selector that never waits: asked to wait ``timeout`` s, it moves the clock on instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationStalled(f"nothing scheduled or ready at t={self._loop.time():.3f}")
        if timeout > 0:
            self._loop.advance(timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock: ``time()`` starts at 0 and only moves when every
    ready callback has run, straight to the next timer. No file descriptors are ever polled
    (nothing here does I/O) and nothing reads the wall clock."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(selector=_NoWaitSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


@dataclass(frozen=True, slots=True)
class SimRecord:
    """A chunk record as the mesh sees it (:class:`~lmcache_mesh.mesh.ports.Record`), with its bytes."""

    key: bytes
    payload: bytes

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    @property
    def raw_nbytes(self) -> int:
        return len(self.payload)  # simulated peers move records as they are (no wire codec)

    @property
    def wire_coded(self) -> bool:
        return False

    @classmethod
    def of(cls, name: str, nbytes: int = 1024) -> SimRecord:
        """A record whose 16-byte key and payload are derived from ``name``."""
        key = hashlib.blake2b(name.encode(), digest_size=16).digest()
        return cls(key, (key * (nbytes // 16 + 1))[:nbytes])


class MemoryHoldings:
    """A node's tiers as a dict (:class:`~lmcache_mesh.mesh.ports.Holdings`), within an
    optional byte budget (a put that does not fit raises NoSpace; nothing is evicted)."""

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.records: dict[bytes, SimRecord] = {}
        self.nbytes = 0
        self.checksum_failures = 0

    def __repr__(self) -> str:
        return f"<MemoryHoldings {len(self.records)} records {self.nbytes}B>"

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        return [k in self.records for k in keys]

    def keys(self) -> list[bytes]:
        return list(self.records)

    def put_records(self, records: Sequence[SimRecord]) -> list[SimRecord]:
        new = {r.key: r for r in records if r.key not in self.records}
        grow = sum(r.nbytes for r in new.values())
        if self.capacity_bytes is not None and self.nbytes + grow > self.capacity_bytes:
            raise NoSpace(f"{grow} B more would pass the {self.capacity_bytes} B budget")
        self.records.update(new)
        self.nbytes += grow
        return list(records)

    def get(self, keys: Sequence[bytes]) -> list[SimRecord | None]:
        return [self.records.get(k) for k in keys]

    def discard(self, keys: Sequence[bytes]) -> int:
        """Lose these copies silently (a failed disk); the owners are not told. Returns how many."""
        gone = [self.records.pop(k) for k in keys if k in self.records]
        self.nbytes -= sum(r.nbytes for r in gone)
        return len(gone)

    def checksum_failed(self, count: int) -> None:
        self.checksum_failures += count


class Served(Protocol):
    """What a peer call reaches on its target: the node's holdings and its mesh work."""

    @property
    def holdings(self) -> MemoryHoldings: ...

    @property
    def coordinator(self) -> MeshCoordinator[SimRecord]: ...


@dataclass(slots=True)
class CallStats:
    calls: Counter[str]
    """Calls made, by operation."""
    lost: int = 0
    """Requests or replies dropped by the seeded loss."""
    unreachable: int = 0
    """Calls to a crashed or partitioned node."""
    late: int = 0
    """Calls whose reply would have come after their timeout."""
    errors: int = 0
    """Calls the target answered with a MeshError (NoSpace, Busy...)."""
    bytes_sent: int = 0


class CallNetwork:
    """Peer calls between simulated nodes, by address: delay, loss and failures, all seeded.

    ``reachable(src, dst)`` says whether a partition separates two addresses (the gossip
    network's view, so both planes are cut alike); a node is served from :meth:`attach`
    until :meth:`detach` (its crash).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        loss: float = 0.0,
        delay_s: tuple[float, float] = (0.001, 0.010),
        bandwidth_bytes_s: float = 1e9,
        reachable: Callable[[str, str], bool] = lambda src, dst: True,
        refuse_dead: bool = False,
    ) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        self.loop = loop
        self.rng = rng
        self.loss = loss
        self.delay_s = delay_s
        self.bandwidth_bytes_s = bandwidth_bytes_s
        self.reachable = reachable
        self.refuse_dead = refuse_dead
        self.stalled: set[str] = set()
        """Addresses whose server takes requests and never answers (stuck, or a link too slow
        for any reply) while the node itself stays in the membership."""
        self.stats = CallStats(Counter())
        self._nodes: dict[str, Served] = {}

    def __repr__(self) -> str:
        return f"<CallNetwork {len(self._nodes)} nodes loss={self.loss:.0%} calls={self.stats.calls.total()}>"

    def attach(self, address: str, node: Served) -> None:
        self._nodes[address] = node

    def detach(self, address: str) -> None:
        self._nodes.pop(address, None)

    def _delay(self, nbytes: int) -> float:
        return self.rng.uniform(*self.delay_s) + nbytes / self.bandwidth_bytes_s

    def _lost(self) -> bool:
        if self.loss and self.rng.random() < self.loss:
            self.stats.lost += 1
            return True
        return False

    def _target(self, src: str, dst: str) -> Served | None:
        node = self._nodes.get(dst)
        if node is None or not self.reachable(src, dst):
            self.stats.unreachable += 1
            return None
        return node

    async def call(
        self,
        src: str,
        dst: str,
        op: str,
        serve: Callable[[Served, float], Any],
        timeout_s: float,
        nbytes: int = 0,
        reply_nbytes: Callable[[Any], int] = lambda _result: 0,
    ) -> Any:
        """``serve(target, deadline)`` on node ``dst`` as a call from ``src`` would: after the
        request's delay, and its result (or MeshError) back after the reply's."""
        started = self.loop.time()
        deadline = started + timeout_s
        self.stats.calls[op] += 1
        self.stats.bytes_sent += nbytes
        late = DeadlineExceeded(f"no reply from {dst} to {op} within {timeout_s:g} s")
        lost = self._lost()
        there = self._delay(nbytes)
        if lost:
            return await self._wait_out(deadline, late)
        if started + there > deadline:  # the server would refuse it as past its deadline
            self.stats.late += 1
            return await self._wait_out(deadline, late)
        await asyncio.sleep(there)
        target = self._target(src, dst)
        if target is None:
            if self.refuse_dead and dst not in self._nodes:
                await asyncio.sleep(self._delay(0))
                raise ConnectionRefusedError(f"{dst} refused {op}")
            return await self._wait_out(deadline, late)
        if dst in self.stalled:
            return await self._wait_out(deadline, late)
        error: MeshError | None = None
        result: Any = None
        try:
            result = serve(target, deadline)
            if inspect.isawaitable(result):
                result = await result
        except MeshError as exc:
            self.stats.errors += 1
            error = exc
        size = 0 if error is not None else reply_nbytes(result)
        back = self._delay(size)
        if self._lost():
            return await self._wait_out(deadline, late)
        if self.loop.time() + back > deadline:
            self.stats.late += 1
            return await self._wait_out(deadline, late)
        self.stats.bytes_sent += size
        await asyncio.sleep(back)
        if error is not None:
            raise error
        return result

    async def _wait_out(self, deadline: float, late: DeadlineExceeded) -> Any:
        await asyncio.sleep(max(0.0, deadline - self.loop.time()))
        raise late


def _retrieve(call: asyncio.Future[Any]) -> None:
    """A call nobody waits for any more (its peer was closed) ends unseen: asyncio must not warn."""
    if not call.cancelled():
        call.exception()


def _records_nbytes(records: Sequence[SimRecord | None]) -> int:
    return sum(r.nbytes for r in records if r is not None)


class SimPeer:
    """One member as seen from ``src`` (:class:`~lmcache_mesh.mesh.ports.Peer`), over a :class:`CallNetwork`.

    Like the node's client, once closed (:meth:`SimPeers.drop`) its calls in flight and any
    later ones raise Unavailable; requests already on their way still reach the target.
    """

    def __init__(self, network: CallNetwork, src: str, dst: str, timeout_s: float) -> None:
        self.network = network
        self.src = src
        self.dst = dst
        self.timeout_s = timeout_s
        self.checksum_failures = 0
        self._closed = network.loop.create_future()

    def __repr__(self) -> str:
        return f"<SimPeer {self.src}->{self.dst}{' closed' if self._closed.done() else ''}>"

    def close(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    async def _call(
        self, op: str, serve: Callable[[Served, float], Any], timeout_s: float, **sizes: Any
    ) -> Any:
        if self._closed.done():
            raise Unavailable(f"client of {self.dst} is closed")
        call = asyncio.ensure_future(self.network.call(self.src, self.dst, op, serve, timeout_s, **sizes))
        call.add_done_callback(_retrieve)
        try:
            await asyncio.wait((call, self._closed), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if call.done():
            return call.result()
        raise Unavailable(f"client of {self.dst} closed")

    async def put_records(self, records: Sequence[SimRecord], replica: bool = False) -> None:
        records = list(records)

        def serve(node: Served, _deadline: float) -> None:
            node.holdings.put_records(records)
            node.coordinator.directory.stored(records, replicate=not replica)

        await self._call("put", serve, self.timeout_s, nbytes=_records_nbytes(records))

    async def announce(self, holder: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        add, remove = list(add), list(remove)

        def serve(node: Served, _deadline: float) -> None:
            node.coordinator.directory.on_announce(holder, add, remove)

        await self._call("announce", serve, self.timeout_s, nbytes=16 * len(add))

    async def who_has(self, keys: Sequence[bytes], timeout_s: float | None = None) -> list[list[str]]:
        keys = list(keys)
        holders: list[list[str]] = await self._call(
            "who_has",
            lambda node, _deadline: node.coordinator.directory.who_has(keys),
            self.timeout_s if timeout_s is None else timeout_s,
            nbytes=16 * len(keys),
        )
        return holders

    async def get_records(
        self,
        keys: Keys,
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
        wire: str = "",
    ) -> list[SimRecord | None]:
        keys = list(keys)

        async def serve(node: Served, deadline: float) -> list[SimRecord | None]:
            found = node.holdings.get(keys)
            if not local and None in found and node.coordinator.mesh_wide:
                found = await node.coordinator.reads.get(keys, found, deadline, cost)
            return found

        records: list[SimRecord | None] = await self._call(
            "get",
            serve,
            self.timeout_s if timeout_s is None else timeout_s,
            nbytes=16 * len(keys),
            reply_nbytes=_records_nbytes,
        )
        return records


class SimPeers:
    """The peers of the node at ``src`` (:class:`~lmcache_mesh.mesh.ports.Peers`), one per address."""

    def __init__(self, network: CallNetwork, src: str, timeout_s: float = 2.0) -> None:
        self.network = network
        self.src = src
        self.timeout_s = timeout_s
        self.dropped = 0
        self._peers: dict[str, SimPeer] = {}

    def get(self, address: str) -> SimPeer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = SimPeer(self.network, self.src, address, self.timeout_s)
        return peer

    def drop(self, address: str) -> None:
        peer = self._peers.pop(address, None)
        if peer is not None:
            peer.close()
            self.dropped += 1

    async def aclose(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()


class InProcGossip:
    """An in-process transport as the :class:`GossipTransport` a :class:`Cluster` holds: the
    datagrams are the transport's; other one-way messages (WebRTC signals) are dropped."""

    def __init__(self, transport: InProcTransport) -> None:
        self.transport = transport
        self.address = transport.address
        self.messages_dropped = 0

    @property
    def on_receive(self) -> Receiver | None:
        return self.transport.on_receive

    @on_receive.setter
    def on_receive(self, receiver: Receiver | None) -> None:
        self.transport.on_receive = receiver

    def send(self, to: str, data: bytes) -> None:
        self.transport.send(to, data)

    def send_message(self, to: str, frames: list[bytes]) -> None:
        self.messages_dropped += 1

    def deliver(self, sender: str, data: bytes) -> None:
        if self.transport.on_receive is not None:
            self.transport.on_receive(sender, data)

    def readdress(self, address: str) -> None:
        raise NotImplementedError("simulated nodes keep their address")

    def close(self) -> None:
        self.transport.close()


@dataclass(slots=True)
class SimNode:
    """One simulated node's data side: its cluster view, tiers, peers and mesh work."""

    name: str
    address: str
    cluster: Cluster
    holdings: MemoryHoldings
    peers: SimPeers
    coordinator: MeshCoordinator[SimRecord]

    @property
    def directory(self) -> HolderDirectory[SimRecord]:
        return self.coordinator.directory

    @property
    def reads(self) -> MeshReads[SimRecord]:
        return self.coordinator.reads


class ErrorLog(logging.Handler):
    """Collects the mesh's logged errors (a failed flush, a membership bug) into a list."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(logging.ERROR)
        self._errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        self._errors.append(f"{record.name}: {record.getMessage()}")
