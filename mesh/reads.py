"""MeshReads: mesh-wide LOCATE, LOOKUP, GET and RANK for one node.

Local tiers first; then the owners say who holds the rest; then holders (or owners) are
asked for the bytes, all within the request's deadline. A peer that fails or is late is a
miss, never an error for the engine. Fetched chunks are kept locally, since the engine
here is likely to want them again. With a :class:`Cost`, remote chunks are fetched only
while that beats recomputing them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Generic

from .cluster import Cluster
from .costs import Cost, fetch_window, spread, worth_prefix
from .directory import HolderDirectory
from .errors import MeshError
from .hedging import hedged
from .ports import Holdings, R
from .remote import RemoteCalls

HEDGE_MIN_S = 0.05
"""A fetch is never hedged sooner: below this, a second request costs more than it saves."""


def _is_node(holder: str) -> bool:
    """Only nodes can serve bytes: an engine's own cache (``node/engine``) is no hit here."""
    return "/" not in holder


class MeshReads(Generic[R]):
    """Reads across the mesh. Use on the event loop; ``deadline`` is in the clock's seconds."""

    def __init__(
        self,
        cluster: Cluster,
        holdings: Holdings[R],
        directory: HolderDirectory[R],
        remote: RemoteCalls[R],
        counters: defaultdict[str, int],
    ) -> None:
        self.cluster = cluster
        self.holdings = holdings
        self.directory = directory
        self.remote = remote
        self.counters = counters

    @property
    def me(self) -> str:
        return self.cluster.name

    async def locate(self, keys: Sequence[bytes], deadline: float) -> list[list[str]]:
        """Live holders of each key, asking its owners' index (the primary, hedged to the next
        owner when late or failing; in parallel across owners)."""
        replicas = self.directory.replicas
        owners = {i: self.cluster.ring.owners(key, replicas) or [self.me] for i, key in enumerate(keys)}

        async def ask(owner: str, idx: list[int]) -> Sequence[list[str] | None]:
            if owner == self.me:  # we own it: our index answers
                return [self.directory.index.holders(keys[i]) for i in idx]
            return await self.remote.ask_owner(owner, [keys[i] for i in idx], deadline)

        answers, hedges = await hedged(
            range(len(keys)),
            owners,
            ask,
            lambda plan: self._hedge_at(plan, deadline, 0),
            deadline,
            self.remote.clock,
        )
        self.counters["hedged_lookups"] += hedges
        holders = [answers.get(i, []) for i in range(len(keys))]
        alive = self.cluster.live_names()
        local = self.holdings.present(keys)
        return [
            # an engine's entry lives as long as the node it is attached to
            sorted(set(h for h in hs if h.partition("/")[0] in alive) | ({self.me} if here else set()))
            for hs, here in zip(holders, local, strict=True)
        ]

    async def lookup(
        self, keys: Sequence[bytes], deadline: float, cost: Cost | None = None
    ) -> tuple[int, list[list[str]]]:
        """Longest prefix of ``keys`` cached anywhere (and, with ``cost``, worth fetching
        rather than recomputing), and who holds each key of it."""
        holders = await self.locate(keys, deadline)
        if cost is not None:
            n, skipped = worth_prefix(self.remote.peer_stats, holders, self.me, cost)
            self.counters["cost_skip_chunks"] += skipped
            return n, holders
        n = next((i for i, hs in enumerate(holders) if not any(_is_node(h) for h in hs)), len(keys))
        return n, holders

    async def get(
        self,
        keys: Sequence[bytes],
        local: list[R | None],
        deadline: float,
        cost: Cost | None = None,
    ) -> list[R | None]:
        """Fill the local misses from holders, then from ring owners, within ``deadline``; a
        chain held by several peers is fetched from all of them at once (see :func:`spread`);
        with ``cost``, skip peers from which recomputing would be faster."""
        missing = [i for i, r in enumerate(local) if r is None]
        if not missing:
            return local
        found = list(local)
        replicas = self.directory.replicas
        size_hint = cost.chunk_bytes if cost is not None else 1 << 20
        holders = await self.locate([keys[i] for i in missing], deadline)
        held = [[h for h in hs if h != self.me and _is_node(h)] for hs in holders]
        candidates: dict[int, list[str]] = {}
        for i, hs, order in zip(
            missing, holders, spread(self.remote.peer_stats, held, size_hint), strict=True
        ):
            owners = self.cluster.ring.owners(keys[i], replicas)
            candidates[i] = order + [o for o in owners if o != self.me and o not in hs]

        async def fetch(peer: str, idx: list[int]) -> Sequence[R | None]:
            if cost is not None and fetch_window(self.remote.peer_stats, peer, len(idx), cost) is None:
                self.counters["cost_skip_chunks"] += len(idx)  # recomputing beats fetching from it
                return [None] * len(idx)
            return await self.remote.fetch(peer, [keys[i] for i in idx], deadline, cost, size_hint)

        got, hedges = await hedged(
            missing,
            candidates,
            fetch,
            lambda plan: self._hedge_at(plan, deadline, size_hint),
            deadline,
            self.remote.clock,
        )
        self.counters["hedged_fetches"] += hedges
        fetched = sorted(got.items())
        for i, record in fetched:
            found[i] = record
        if fetched:
            self.counters["remote_hits"] += len(fetched)
            if cost is not None:
                self.counters["cost_fetch_chunks"] += len(fetched)
            try:
                kept = self.holdings.put_records([record for _, record in fetched])
                self.directory.stored(kept, replicate=False)
            except MeshError:
                pass  # keeping a copy is an optimisation; the caller has its bytes
            else:
                for (i, _), record in zip(fetched, kept, strict=True):
                    found[i] = record  # the copy kept here (in shared memory: read in place)
        self.counters["remote_misses"] += sum(1 for i in missing if found[i] is None)
        return found

    def _hedge_at(self, plan: dict[str, list[int]], deadline: float, size_hint: int) -> float:
        """When fetches just sent are late enough to ask another holder as well: three times
        the slowest expected transfer (at least HEDGE_MIN_S), or a quarter of what is left
        while a peer is unmeasured."""
        now = self.remote.clock()
        stats = self.remote.peer_stats
        expected = [
            stats.transfer_s(peer, len(idx) * size_hint) for peer, idx in plan.items() if peer != self.me
        ]
        if any(e is None for e in expected):
            return min(deadline, now + (deadline - now) / 4)
        slowest = max((e for e in expected if e is not None), default=0.0)
        return min(deadline, now + max(HEDGE_MIN_S, 3 * slowest))

    async def rank(
        self, keys: Sequence[bytes], candidates: Sequence[str], deadline: float
    ) -> list[tuple[str, int]]:
        """Candidates ordered by how many leading chunks of ``keys`` each holds (KV-aware routing)."""
        holders = await self.locate(keys, deadline)
        scores = []
        for name in candidates:
            n = next((i for i, hs in enumerate(holders) if name not in hs), len(keys))
            scores.append((name, n))
        return sorted(scores, key=lambda s: -s[1])
