"""MeshReads: mesh-wide LOCATE, LOOKUP, GET and RANK for one node.

Local tiers first; then the owners say who holds the rest; then holders (or owners) are
asked for the bytes, all within the request's deadline. A peer that fails or is late is a
miss, never an error for the engine. Fetched chunks are kept locally, since the engine
here is likely to want them again. With a :class:`Cost`, remote chunks are fetched only
while that beats recomputing them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Generic

from .cluster import Cluster
from .costs import Cost, fetch_window, spread, worth_prefix
from .directory import HolderDirectory
from .errors import MeshError
from .ports import Holdings, R
from .remote import RemoteCalls


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
        """Live holders of each key, asking each key's primary owner (one round, in parallel)."""
        holders: list[list[str]] = [[] for _ in keys]
        by_owner: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            owners = self.cluster.ring.owners(key, 1)
            by_owner[owners[0] if owners else self.me].append(i)
        remote = [(owner, idx) for owner, idx in by_owner.items() if owner != self.me]
        for i in by_owner.get(self.me, []):
            holders[i] = self.directory.index.holders(keys[i])  # we own it: our index answers
        answers = await asyncio.gather(
            *(self.remote.ask_owner(owner, [keys[i] for i in idx], deadline) for owner, idx in remote)
        )
        for (_, idx), answer in zip(remote, answers, strict=True):
            for i, hs in zip(idx, answer, strict=True):
                holders[i] = hs
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
        fetched: list[tuple[int, R]] = []
        for attempt in range(replicas + 1):  # each round asks every missing key's next candidate
            plan: dict[str, list[int]] = defaultdict(list)
            for i in missing:
                if found[i] is None and attempt < len(candidates[i]):
                    plan[candidates[i][attempt]].append(i)
            if cost is not None:
                plan = self._affordable(plan, cost)
            if not plan or self.remote.clock() >= deadline:
                break
            last = not any(attempt + 1 < len(candidates[i]) for idx in plan.values() for i in idx)
            until = deadline if last else self._round_deadline(plan, deadline, size_hint)
            results = await asyncio.gather(
                *(
                    self.remote.fetch(peer, [keys[i] for i in idx], until, cost, size_hint)
                    for peer, idx in plan.items()
                )
            )
            for idx, records in zip(plan.values(), results, strict=True):
                for i, record in zip(idx, records, strict=True):
                    if record is not None:
                        found[i] = record
                        fetched.append((i, record))
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

    def _round_deadline(self, plan: dict[str, list[int]], deadline: float, size_hint: int) -> float:
        """How long a round of fetches may take when other holders could still be asked: half
        of what is left (a holder that stopped answering must leave time for the next one),
        or twice the slowest expected transfer if that is longer."""
        now = self.remote.clock()
        expected = max(
            (self.remote.peer_stats.transfer_s(peer, len(idx) * size_hint) or 0.0)
            for peer, idx in plan.items()
        )
        return min(deadline, now + max((deadline - now) / 2, 2 * expected))

    def _affordable(self, plan: dict[str, list[int]], cost: Cost) -> dict[str, list[int]]:
        """The part of a fetch plan that beats recomputing (the rest is left to the engine)."""
        kept = {}
        for peer, idx in plan.items():
            if fetch_window(self.remote.peer_stats, peer, len(idx), cost) is None:
                self.counters["cost_skip_chunks"] += len(idx)
            else:
                kept[peer] = idx
        return kept

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
