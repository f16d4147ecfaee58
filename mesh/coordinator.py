"""MeshCoordinator: what a node does with the mesh around its own tiers, in one place to wire.

It builds the three parts that share one cluster view, one peer pool and one set of
counters — :class:`RemoteCalls` (questions to members), :class:`HolderDirectory`
(announcements, the owner-side index, replication, repair) and :class:`MeshReads`
(mesh-wide lookup, get, locate, rank) — and follows membership: a member that dies or
leaves is forgotten, and any change of owners triggers a re-announcement.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Generic

from .cluster import Cluster
from .directory import DirectoryConfig, HolderDirectory
from .ports import Holdings, Peers, R
from .reads import MeshReads
from .remote import RemoteCalls


class MeshCoordinator(Generic[R]):
    """The mesh's work for one node. Constructing it does no I/O; use on the event loop."""

    def __init__(
        self,
        cluster: Cluster,
        holdings: Holdings[R],
        peers: Peers[R],
        replicas: int = 2,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        directory: DirectoryConfig | None = None,
        wire_codec: str = "auto",
    ) -> None:
        self.cluster = cluster
        self.peers = peers
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.remote = RemoteCalls(cluster, peers, holdings, clock, self.counters, wire_codec)
        self.directory = HolderDirectory(
            cluster, holdings, self.remote, self.counters, replicas=replicas, config=directory, rng=rng
        )
        self.reads = MeshReads(cluster, holdings, self.directory, self.remote, self.counters)
        cluster.subscribe(on_gone=self.forget, on_joined=lambda _name: self.directory.ring_changed())

    def __repr__(self) -> str:
        return f"<MeshCoordinator {self.cluster.name} {self.directory!r}>"

    @property
    def mesh_wide(self) -> bool:
        """True while another member is alive: only then do reads go beyond this node."""
        return self.cluster.membership.num_alive() > 1

    def start(self) -> None:
        self.directory.start()

    async def aclose(self) -> None:
        """Send what is queued (announcements, replicas), then stop and close the peers."""
        await self.directory.flush()
        await self.directory.aclose()
        await self.peers.aclose()

    def forget(self, member: str) -> None:
        """A member died or left: drop its index entries and its connection."""
        self.directory.forget(member)
        m = self.cluster.membership.members.get(member)
        if m is not None:
            self.peers.drop(m.address)

    def stats(self) -> dict[str, Any]:
        return {
            "index_keys": len(self.directory.index),
            "replicas": self.directory.replicas,
            "engines": self.directory.engines(),
            "peers": self.remote.peer_stats.snapshot(),
            **self.counters,
        }
