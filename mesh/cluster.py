"""Cluster: this node's place in the mesh — membership, gossip transport and hash ring.

Membership runs on the event loop (the loop is the scheduler). Its datagrams go out over
the transport it is given — ZeroMQ DEALERs in the daemon, whose ROUTER hands inbound ones
back through :meth:`Cluster.on_datagram`; the in-process network in simulations.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from lmcache_mesh.transports.addresses import reachability
from lmcache_mesh.transports.base import GossipTransport

from .agent import MeshAgent
from .config import MeshConfig
from .membership import Member, Membership, State, is_live
from .ring import HashRing, RingMember

logger = logging.getLogger(__name__)


PROFILES = {"lan": MeshConfig.lan, "wan": MeshConfig.wan, "local": MeshConfig.local}


class Cluster:
    """Membership, gossip and placement for one node. Use from the event loop's thread."""

    def __init__(
        self,
        name: str,
        address: str,
        zone: str,
        weight: float,
        config: MeshConfig,
        transport: GossipTransport,
        rng: random.Random | None = None,
        seed_address: Callable[[str], str] = str,
    ) -> None:
        self.transport = transport
        self.seed_address = seed_address
        """A seed as given on the command line → the address to send to (the daemon strips a
        ``NAME@`` and notes the name for CurveZMQ; by default the seed is the address)."""
        self.membership = Membership(config, name, address, zone, weight, rng, on_change=self._changed)
        self._ring: HashRing | None = HashRing(
            [RingMember(name, zone, weight)] if reachability(address) == "direct" else []
        )
        self._ring_generation = 0
        """Counts membership changes that move owners: a ring built from an older count is
        not kept (a status scrape on another thread may build one while the loop changes it)."""
        self._agent: MeshAgent | None = None
        self._on_gone: list[Callable[[str], None]] = []
        self._on_joined: list[Callable[[str], None]] = []

    def __repr__(self) -> str:
        return f"<Cluster {self.membership!r} {self.ring!r}>"

    @property
    def ring(self) -> HashRing:
        """Placement over the live members that peers can dial. Rebuilt on first use after
        membership changed, so a join that brings in k members at once costs one rebuild, not k."""
        ring = self._ring
        if ring is None:
            generation = self._ring_generation
            # Nodes behind NAT own no part of the ring: every lookup of a key asks its owner,
            # and an owner reachable only through a relay and WebRTC would slow them all.
            members = list(self.membership.members.values())  # one step: safe from a scrape thread
            ring = HashRing(
                RingMember(m.name, m.zone, m.weight)
                for m in members
                if is_live(m.state) and reachability(m.address) == "direct"
            )
            if generation == self._ring_generation:
                self._ring = ring
        return ring

    def live_address(self, name: str) -> str | None:
        """Where member ``name`` is served, while it is alive or suspected; else None."""
        m = self.membership.members.get(name)
        return str(m.address) if m is not None and is_live(m.state) else None

    def live_names(self) -> set[str]:
        """Members alive or suspected (this node included)."""
        return {m.name for m in list(self.membership.members.values()) if is_live(m.state)}

    @property
    def name(self) -> str:
        name: str = self.membership.me.name
        return name

    def subscribe(
        self, on_gone: Callable[[str], None] | None = None, on_joined: Callable[[str], None] | None = None
    ) -> None:
        """Be called with a member's name when it is declared dead or leaves (``on_gone``), or
        when it joins or comes back (``on_joined``). Callbacks run on the loop; must not block."""
        if on_gone is not None:
            self._on_gone.append(on_gone)
        if on_joined is not None:
            self._on_joined.append(on_joined)

    def start(self, loop: asyncio.AbstractEventLoop, seeds: Sequence[str] = ()) -> None:
        self._agent = MeshAgent(self.membership, self.transport, loop)
        self._agent.start([self.seed_address(s) for s in seeds])

    def name_at(self, address: str) -> str | None:
        """The member serving at ``address`` (its latest address), if any."""
        for m in list(self.membership.members.values()):
            if m.address == address:
                return str(m.name)
        return None

    def on_datagram(self, sender: str, data: bytes) -> None:
        self.transport.deliver(sender, data)

    def join(self, seeds: Sequence[str]) -> None:
        if self._agent is None:
            raise RuntimeError("cluster not started")
        self._agent.join([self.seed_address(s) for s in seeds])

    async def leave(self, linger_s: float | None = None) -> None:
        """Announce a graceful leave, give it a moment to spread, then stop."""
        if self._agent is None:
            return
        if self.membership.num_alive() > 1:
            self._agent.leave()
            await asyncio.sleep(
                linger_s if linger_s is not None else 3 * self.membership.config.gossip_interval_s
            )
        self._agent.stop()
        self.transport.close()
        self._agent = None

    def readdress(self, address: str) -> None:
        """Our address changed (a node behind NAT moved to another relay): tell everyone."""
        self.transport.readdress(address)
        self.membership.readdress(address)
        self._changed(self.membership.me, self.membership.me.state)

    def _changed(self, member: Member, old: State | None) -> None:
        live_now = is_live(member.state)
        # Rebuild on joins, deaths and revivals, and when a live member's zone or weight changed.
        if old is None or is_live(old) != live_now or old is member.state:
            live = self.membership.alive_members()
            self._ring_generation += 1
            self._ring = None  # rebuilt when next used
            logger.info(
                "- %s: %s %s; %d member%s alive, %d on the ring",
                self.name,
                member.name,
                "has left" if member.state is State.LEFT else f"is {member.state.value}",
                len(live),
                "" if len(live) == 1 else "s",
                sum(reachability(m.address) == "direct" for m in live),
            )
        if member.state in (State.DEAD, State.LEFT):
            for callback in self._on_gone:
                callback(member.name)
        elif old is None or old in (State.DEAD, State.LEFT):
            for callback in self._on_joined:
                callback(member.name)

    def members_status(self) -> list[dict[str, Any]]:
        shares = self.ring.shares()
        return [
            {
                "name": m.name,
                "address": m.address,
                "zone": m.zone,
                "state": m.state.value,
                "reachability": reachability(m.address),
                "incarnation": m.incarnation,
                "ring_share": round(shares.get(m.name, 0.0), 4),
            }
            # list(...) copies in one step, so a scrape from another thread never sees the dict change
            for m in sorted(list(self.membership.members.values()), key=lambda m: m.name)
        ]
