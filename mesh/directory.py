"""HolderDirectory: who holds which chunk, kept by each key's ring owners, and R copies of each.

- **Announcements.** Every node tells each key's owners that it holds the key (batched),
  and owners keep a :class:`HolderIndex`. "Who holds k" is then one question to k's owner.
- **Replication.** A PUT from a client is stored locally, then copied to the key's ring
  owners (R of them) in the background: never on the caller's path, dropped and counted
  when a peer is slow or gone.
- **Repair and anti-entropy.** An owner that learns of a key it owns but lacks pulls it
  from the holder that announced it; when owners move (joins, deaths), and every
  ``anti_entropy_s``, everything held here is announced again, in slices.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic

from .cluster import Cluster
from .errors import Busy, MeshError
from .index import HolderIndex
from .ports import Holdings, R
from .remote import RemoteCalls

logger = logging.getLogger(__name__)

REANNOUNCE_DELAY_S = 0.5
"""Membership changes within this window cost one re-announcement, not one each."""

ANNOUNCE_BATCH_KEYS = 1024
"""Keys per ANNOUNCE request (below the default per-request key limit)."""

REANNOUNCE_SLICE_KEYS = 2048
"""Keys re-announced per event-loop turn (about 15 ms of work), so the loop stays responsive."""

REPAIR_BATCH_KEYS = 64
"""Chunks pulled per GET when repairing replicas."""

REPAIR_TIMEOUT_S = 30.0
"""Repairs run in the background: give slow peers (WebRTC) time to send a whole batch."""

MAX_ENGINES = 256
"""Engines a node indexes for its clients (KV events); more are refused."""

MAX_REPAIR_KEYS = 100_000
"""Most keys waiting for repair at once; beyond that they wait for the next announcement."""


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    """How a node's holder directory batches, bounds and re-sends its work."""

    flush_interval_s: float = 0.05
    """Seconds between batches of announcements and replicas. Lower: peers learn sooner, more requests."""
    max_index_keys: int = 1_000_000
    """Keys the owner-side holder index keeps; past it, the oldest are forgotten (a GET still verifies)."""
    max_queued_bytes: int = 256 << 20
    """Replica bytes waiting to be sent; past it, replicas are dropped and counted (never the PUT)."""
    anti_entropy_s: float = 300.0
    """Every this many seconds, everything held here is announced again (owners that lost
    announcements relearn them). Lower: faster healing, more announcement traffic."""

    def __post_init__(self) -> None:
        for name in ("flush_interval_s", "anti_entropy_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in ("max_index_keys", "max_queued_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


def _owner_batches() -> defaultdict[str, defaultdict[str, set[bytes]]]:
    return defaultdict(lambda: defaultdict(set))


class HolderDirectory(Generic[R]):
    """Announcements, the owner-side index, replication and repair for one node (event loop)."""

    def __init__(
        self,
        cluster: Cluster,
        holdings: Holdings[R],
        remote: RemoteCalls[R],
        counters: defaultdict[str, int],
        replicas: int = 2,
        config: DirectoryConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        config = config or DirectoryConfig()
        self.cluster = cluster
        self.holdings = holdings
        self.remote = remote
        self.counters = counters
        self.replicas = replicas
        self.flush_interval_s = config.flush_interval_s
        self.anti_entropy_s = config.anti_entropy_s
        """Every this many seconds, re-announce everything held here to its owners."""
        self.index = HolderIndex(config.max_index_keys)
        self._rng = rng or random.Random()
        self._max_queued_bytes = config.max_queued_bytes
        self._queued_bytes = 0
        # owner name -> holder -> keys: the holder is this node, or an engine attached to it
        self._adds = _owner_batches()
        self._removes = _owner_batches()
        self._engines: dict[str, set[bytes]] = defaultdict(set)  # "me/engine" -> keys its KV cache holds
        self._replicate: dict[str, list[R]] = defaultdict(list)  # owner name -> records to copy
        self._repair: dict[str, set[bytes]] = defaultdict(set)  # holder name -> keys we own and lack
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._reannounce: asyncio.TimerHandle | None = None
        self._anti_entropy: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<HolderDirectory R={self.replicas} {self.index!r} queued={self._queued_bytes}B>"

    @property
    def me(self) -> str:
        return self.cluster.name

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._flush_loop(), name="lmcache-mesh-flush")
        self._anti_entropy = loop.call_later(
            self.anti_entropy_s * self._rng.uniform(0.5, 1.0), self._periodic_reannounce
        )

    async def aclose(self) -> None:
        for timer in (self._anti_entropy, self._reannounce):
            if timer is not None:
                timer.cancel()
        self._anti_entropy = self._reannounce = None
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    # what this node holds

    def stored(self, records: Sequence[R], replicate: bool) -> None:
        """Records are now held here: announce them, and copy them to their owners if asked."""
        self._route(self.me, [r.key for r in records], ())
        if replicate:
            for record in records:
                for owner in self.cluster.ring.owners(record.key, self.replicas):
                    if owner == self.me:
                        continue
                    if self._queued_bytes + record.nbytes > self._max_queued_bytes:
                        self.counters["replication_dropped"] += 1
                        continue
                    self._replicate[owner].append(record)
                    self._queued_bytes += record.nbytes
        self._wake.set()

    def removed(self, keys: Sequence[bytes]) -> None:
        self._route(self.me, (), keys)

    def engine_holder(self, engine: str) -> str:
        """Index name of an engine attached to this node: ``<node>/<engine>``."""
        return f"{self.me}/{engine}"

    def engine_announced(self, engine: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        """An engine attached here holds (or dropped) these chunks in its own KV cache."""
        holder = self.engine_holder(engine)
        if holder not in self._engines and len(self._engines) >= MAX_ENGINES:
            raise Busy(f"this node already indexes {MAX_ENGINES} engines; {engine!r} is not added")
        held = self._engines[holder]
        held.update(add)
        held.difference_update(remove)
        if not held:
            del self._engines[holder]
        self._route(holder, add, remove)

    def engines(self) -> dict[str, int]:
        """Chunks held per engine attached here."""
        return {holder: len(keys) for holder, keys in self._engines.items()}

    def _route(self, holder: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        """Tell each key's owners that ``holder`` now holds (or no longer holds) it."""
        owners = self.cluster.ring.owners
        for key in add:
            for owner in owners(key, self.replicas):
                if owner == self.me:
                    self.index.add(holder, [key])
                else:
                    self._adds[owner][holder].add(key)
                    self._removes[owner][holder].discard(key)
        for key in remove:
            for owner in owners(key, self.replicas):
                if owner == self.me:
                    self.index.remove(holder, [key])
                else:
                    self._removes[owner][holder].add(key)
                    self._adds[owner][holder].discard(key)
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                if self._repair:
                    await self._pull_repairs()
            except Exception:  # never let a bug stop replication for good
                logger.exception("x mesh flush failed")
            await asyncio.sleep(self.flush_interval_s)

    async def flush(self) -> None:
        """Send queued announcements and replicas, one batch per owner, concurrently."""
        adds, removes, replicate = self._adds, self._removes, self._replicate
        self._adds, self._removes = _owner_batches(), _owner_batches()
        self._replicate = defaultdict(list)
        self._queued_bytes = 0
        jobs = []
        for owner in set(adds) | set(removes) | set(replicate):
            address = self.remote.address(owner)
            if address is None:
                self.counters["announce_dropped"] += 1
                continue
            jobs.append(
                self._send_to_owner(
                    address, adds.get(owner, {}), removes.get(owner, {}), replicate.get(owner, [])
                )
            )
        if jobs:
            await asyncio.gather(*jobs)

    async def _send_to_owner(
        self,
        address: str,
        adds: dict[str, set[bytes]],
        removes: dict[str, set[bytes]],
        records: list[R],
    ) -> None:
        client = self.remote.peers.get(address)
        try:
            if records:
                await client.put_records(records, replica=True)
                self.counters["replicated"] += len(records)
            for holder in set(adds) | set(removes):
                add, remove = list(adds.get(holder, ())), list(removes.get(holder, ()))
                for i in range(0, max(len(add), len(remove)), ANNOUNCE_BATCH_KEYS):
                    batch = slice(i, i + ANNOUNCE_BATCH_KEYS)
                    await client.announce(holder, add[batch], remove[batch])
                    self.counters["announced"] += len(add[batch]) + len(remove[batch])
        except (MeshError, OSError) as exc:
            self.remote.failed(address, exc)

    # the owner's side

    def on_announce(self, holder: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        """A member (or an engine attached to one) now holds ``add`` and dropped ``remove``."""
        self.index.add(holder, add)
        self.index.remove(holder, remove)
        if "/" in holder:
            return  # an engine's own KV cache: nothing there to pull replicas from
        # Repair: a key we own but do not hold (we are a new owner, or lost our copy) is
        # pulled from the holder that announced it, so each chunk gets back to R copies.
        missing = [k for k, here in zip(add, self.holdings.present(add), strict=True) if not here]
        wanted = [k for k in missing if self.me in self.cluster.ring.owners(k, self.replicas)]
        room = MAX_REPAIR_KEYS - sum(len(v) for v in self._repair.values())
        if wanted and room > 0:
            self._repair[holder].update(wanted[:room])
            self.counters["repair_dropped"] += max(0, len(wanted) - room)
            self._wake.set()

    async def _pull_repairs(self) -> None:
        repair, self._repair = self._repair, defaultdict(set)
        for holder, keys in repair.items():
            if self.remote.address(holder) is None:
                continue
            wanted = [k for k, here in zip(keys, self.holdings.present(list(keys)), strict=True) if not here]
            for i in range(0, len(wanted), REPAIR_BATCH_KEYS):
                batch = wanted[i : i + REPAIR_BATCH_KEYS]
                records = await self.remote.fetch(holder, batch, self.remote.clock() + REPAIR_TIMEOUT_S)
                got = [r for r in records if r is not None]
                if not got:
                    break
                try:
                    self.holdings.put_records(got)
                except MeshError:
                    self.counters["repair_dropped"] += len(got)
                    break
                self.counters["repaired"] += len(got)
                self.stored(got, replicate=False)

    def who_has(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Holders of each key known here (this node's own tiers included)."""
        local = self.holdings.present(keys)
        return [
            ([self.me] if here else []) + [h for h in self.index.holders(k) if h != self.me]
            for k, here in zip(keys, local, strict=True)
        ]

    def forget(self, member: str) -> None:
        """A member died or left: its entries (and those of its engines) go; owners moved."""
        self.index.forget(member)
        for holder in self.index.names():
            if holder.startswith(member + "/"):  # the engines attached to it went with it
                self.index.forget(holder)
        self.ring_changed()

    # re-announcing

    def ring_changed(self) -> None:
        """Owners moved: re-announce what we hold, once the membership settles (debounced)."""
        if self._reannounce is None:
            self._reannounce = asyncio.get_running_loop().call_later(REANNOUNCE_DELAY_S, self._reannounce_all)

    def _periodic_reannounce(self) -> None:
        # Anti-entropy: owners that lost announcements (a failed request, a restart) relearn them.
        self.ring_changed()
        self._anti_entropy = asyncio.get_running_loop().call_later(
            self.anti_entropy_s, self._periodic_reannounce
        )

    def _reannounce_all(self) -> None:
        self._reannounce = None
        self._spawn(self._reannounce_in_slices())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until done; aclose() cancels it
        task.add_done_callback(self._background.discard)

    async def _reannounce_in_slices(self) -> None:
        held = [(self.me, self.holdings.keys())] + [(h, list(keys)) for h, keys in self._engines.items()]
        for holder, keys in held:
            self.counters["reannounced"] += len(keys)
            for start in range(0, len(keys), REANNOUNCE_SLICE_KEYS):
                self._route(holder, keys[start : start + REANNOUNCE_SLICE_KEYS], ())
                await asyncio.sleep(0)  # let requests and membership run between slices
