"""RemoteCalls: this node's questions to other members, each within a deadline.

Shared by the holder directory (repair pulls) and the mesh-wide reads: who a member is
now (its address, if alive), asking a key's owner who holds it, fetching records from a
holder — and what failures teach us (a peer that is late is dropped, so requests do not
queue up behind it; transfer times feed the per-peer cost estimates).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Generic

from lmcache_mesh.transports.addresses import reachability

from .cluster import Cluster
from .costs import Cost, PeerStats, fetch_window
from .errors import DeadlineExceeded, MeshError
from .ports import Holdings, Peers, R

logger = logging.getLogger(__name__)

WEBRTC_GET_KEYS = 8
"""Records per GET to a peer behind NAT: 8 of the largest (64 MiB) stay within what a
WebRTC link accepts in one reply."""

FETCH_SLICE_BYTES = 32 << 20
"""A fetch from one peer over ZeroMQ goes as GETs of about this many bytes, side by side
(at most ``FETCH_SLICES``): the peer reads the next slice from its tiers while the last one
is on the wire, and we verify one while the next arrives."""

FETCH_SLICES = 4


class RemoteCalls(Generic[R]):
    """Calls to members by name. Use on the event loop."""

    def __init__(
        self,
        cluster: Cluster,
        peers: Peers[R],
        holdings: Holdings[R],
        clock: Callable[[], float],
        counters: defaultdict[str, int],
        wire_codec: str = "auto",
    ) -> None:
        self.cluster = cluster
        self.peers = peers
        self.holdings = holdings
        self.clock = clock
        self.counters = counters
        self.peer_stats = PeerStats(clock=clock, wire_codec=wire_codec)
        """Latency and bandwidth per peer, from real requests: nearest-first GETs, cost decisions."""

    def address(self, name: str) -> str | None:
        """Where member ``name`` is served, if it is alive (or suspected)."""
        return self.cluster.live_address(name)

    async def ask_owner(self, owner: str, keys: list[bytes], deadline: float) -> list[list[str] | None]:
        """Holders of ``keys`` by their owner's index; None per key if it fails or is late."""
        address = self.address(owner)
        remaining = deadline - self.clock()
        if address is None or remaining <= 0:
            return [None] * len(keys)
        try:
            # Never the whole deadline: a stalled owner must leave time to fetch from holders.
            budget = min(remaining / 2, self.peers.timeout_s)
            started = self.clock()
            holders: list[list[str] | None] = list(
                await self.peers.get(address).who_has(keys, timeout_s=budget)
            )
            self.peer_stats.observe(owner, 0, self.clock() - started)
            return holders
        except (MeshError, OSError) as exc:
            self.failed(address, exc)
            return [None] * len(keys)

    async def fetch(
        self,
        peer: str,
        keys: Sequence[bytes],
        deadline: float,
        cost: Cost | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> list[R | None]:
        """Records of ``keys`` held by ``peer`` (None per miss, or all None on failure); with
        ``cost``, never waiting longer than recomputing them would take. ``chunk_bytes``:
        about how large each record is, to slice the fetch."""
        address = self.address(peer)
        started = self.clock()
        window = None if cost is None else fetch_window(self.peer_stats, peer, len(keys), cost)
        if window is not None:
            deadline = min(deadline, started + window)  # never wait longer than recomputing
        remaining = deadline - started
        if address is None or remaining <= 0:
            return [None] * len(keys)
        client = self.peers.get(address)
        webrtc = reachability(address) == "webrtc"
        wire = self.peer_stats.wire(peer, slow_link=webrtc)
        # Ask in slices, side by side, all within the one deadline; the estimate comes from
        # the whole transfer. Replies over a WebRTC link are bounded (and slow).
        if webrtc:
            step = WEBRTC_GET_KEYS
        else:
            parts = min(FETCH_SLICES, -(-len(keys) * chunk_bytes // FETCH_SLICE_BYTES))
            step = max(1, -(-len(keys) // max(parts, 1)))
        slices = [list(keys[i : i + step]) for i in range(0, len(keys), step)]
        answers = await asyncio.gather(
            *(client.get_records(part, local=True, timeout_s=remaining, wire=wire) for part in slices),
            return_exceptions=True,
        )
        if client.checksum_failures:
            self.holdings.checksum_failed(client.checksum_failures)
            client.checksum_failures = 0
        records: list[R | None] = []
        failure: BaseException | None = None
        for part, answer in zip(slices, answers, strict=True):
            if isinstance(answer, BaseException):
                failure = failure or answer
                records.extend([None] * len(part))
            else:
                records.extend(answer)
        elapsed = self.clock() - started
        if failure is None:
            got = [r for r in records if r is not None]
            moved = sum(r.nbytes for r in got)
            self.peer_stats.observe(peer, moved, elapsed)
            # only what the wire codec changed (stored codecs are not the link's doing)
            changed = [r for r in got if r.wire_coded]
            if wire and changed:
                sent, held = sum(r.nbytes for r in changed), sum(r.raw_nbytes for r in changed)
                self.peer_stats.saw_wire_ratio(sent, held)
                self.counters["wire_fetched_bytes"] += sent
                self.counters["wire_raw_bytes"] += held
            return records
        if not isinstance(failure, (MeshError, OSError)):
            raise failure
        if isinstance(failure, DeadlineExceeded) and cost is not None:
            self.peer_stats.cut_off(peer, len(keys) * cost.chunk_bytes, elapsed)
            self.counters["cost_cut_off_fetches"] += 1
        self.failed(address, failure)
        return records

    def failed(self, address: str, exc: Exception) -> None:
        """A call to ``address`` failed: counted; a peer that did not answer in time is dropped."""
        self.counters["peer_errors"] += 1
        logger.debug("x request to peer %s failed: %s", address, exc)
        if isinstance(exc, DeadlineExceeded):
            self.peers.drop(address)  # do not let requests queue up for a peer that is not answering
