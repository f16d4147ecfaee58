"""The node's side of the mesh's ports: its tiers as :class:`Holdings`, its peers as :class:`Peers`.

:class:`PeerPool` keeps one :class:`AsyncClient` per member address (least recently used
closed past ``max_peers``). A member behind NAT (``webrtc://`` address) is spoken to over
a WebRTC link, made on first use through ``links``; without WebRTC here its requests fail
as Unavailable (a miss), as do those to a member whose CurveZMQ key is unknown.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from lmcache_mesh.mesh.errors import Unavailable
from lmcache_mesh.transports.addresses import parse_webrtc_address
from lmcache_mesh.transports.base import Conduit
from lmcache_mesh.transports.zmq import CurveFor, Sealer, ZmqConduit

from .client import PeerClient
from .node import Node
from .records import Buffer, ChunkRecord


class Links(Protocol):
    """WebRTC links to members behind NAT, by member name."""

    def conduit(self, name: str) -> Conduit: ...


class NodeHoldings:
    """A Node's tiers as the mesh sees them (:class:`lmcache_mesh.mesh.ports.Holdings`)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        return self._node.store.present(keys)

    def keys(self) -> list[bytes]:
        return self._node.store.keys()

    def put_records(self, records: Sequence[ChunkRecord]) -> list[ChunkRecord]:
        return self._node.put_records(records)

    def checksum_failed(self, count: int) -> None:
        self._node.checksum_failures += count


class PeerPool:
    """Clients of other members, by address (:class:`lmcache_mesh.mesh.ports.Peers`)."""

    def __init__(
        self,
        timeout_s: float,
        links: Links | None = None,
        curve: CurveFor | None = None,
        max_peers: int = 256,
        seal: Sealer | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._seal = seal
        """Seals each request's header (the mesh secret, without CurveZMQ)."""
        self.max_peers = max_peers
        self._links = links
        self._curve = curve
        """CurveZMQ credentials per peer address (None: plain ZeroMQ)."""
        self._clients: OrderedDict[str, PeerClient] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<PeerPool {len(self._clients)} peers>"

    def get(self, address: str) -> PeerClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = PeerClient(
                address, timeout_s=self.timeout_s, conduit=self._conduit(address)
            )
            while len(self._clients) > self.max_peers:
                _, old = self._clients.popitem(last=False)
                self._close(old)
        else:
            self._clients.move_to_end(address)
        return client

    def _conduit(self, address: str) -> Callable[[], Conduit] | None:
        try:
            relayed = parse_webrtc_address(address)
        except ValueError:
            return lambda: _NoRoute(address)  # a malformed address from gossip: unreachable
        if relayed is None:
            if self._curve is None:
                seal = self._seal
                return (lambda: ZmqConduit(address, seal=seal)) if seal is not None else None  # plain ZeroMQ
            try:
                credentials = self._curve(address)
            except LookupError as exc:
                why = str(exc)
                return lambda: _NoRoute(address, why)
            return lambda: ZmqConduit(address, credentials)
        links, name = self._links, relayed.name
        if links is None:
            return lambda: _NoRoute(address)
        return lambda: links.conduit(name)

    def drop(self, address: str) -> None:
        """Close the client of a dead or unresponsive peer: what it still queues is discarded."""
        client = self._clients.pop(address, None)
        if client is not None:
            self._close(client)

    def _close(self, client: PeerClient) -> None:
        task = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await asyncio.gather(*(c.aclose() for c in clients), *self._closing, return_exceptions=True)


class _NoRoute:
    """The conduit to a peer we cannot reach: behind NAT with no WebRTC here, a malformed
    address, or (CurveZMQ) no key known for it."""

    def __init__(self, address: str, why: str = "behind NAT, and no WebRTC here; or malformed") -> None:
        self._error = Unavailable(f"no route to {address} ({why})")

    async def send(self, frames: Sequence[Buffer]) -> None:
        raise self._error

    async def recv(self) -> list[Buffer]:
        raise self._error

    async def aclose(self) -> None:
        pass
