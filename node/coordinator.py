"""MeshCoordinator: what a node does with the mesh around its own tiers.

- **Replication.** A PUT from a client is stored locally, then copied to the key's ring
  owners (R of them) in the background: never on the caller's path, dropped and counted
  when a peer is slow or gone.
- **Announcements.** Every node tells each key's owners that it holds the key (batched),
  and owners keep a :class:`HolderIndex`. "Who holds k" is then one question to k's owner.
- **Mesh-wide LOOKUP and GET.** Local tiers first; then the owners say who holds the rest;
  then holders (or owners) are asked for the bytes, all within the request's deadline. A
  peer that fails or is late is a miss, never an error for the engine. Fetched chunks are
  kept locally, since the engine here is likely to want them again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lmcache_mesh.mesh.index import HolderIndex
from lmcache_mesh.mesh.membership import State
from lmcache_mesh.transports.addresses import parse_webrtc_address, reachability
from lmcache_mesh.transports.zmq import CurveFor

from .client import AsyncClient, Conduit, ZmqConduit
from .costs import PeerStats, fetch_window, nearest_first, worth_prefix
from .errors import Busy, DeadlineExceeded, MeshError, Unavailable
from .protocol import Cost
from .records import ChunkRecord

if TYPE_CHECKING:
    from .cluster import Cluster
    from .node import Node
    from .peering import WebRTCPeering

logger = logging.getLogger(__name__)

REANNOUNCE_DELAY_S = 0.5
"""Membership changes within this window cost one re-announcement, not one each."""

ANNOUNCE_BATCH_KEYS = 1024
"""Keys per ANNOUNCE request (below the default per-request key limit)."""

REANNOUNCE_SLICE_KEYS = 2048
"""Keys re-announced per event-loop turn (about 15 ms of work), so the loop stays responsive."""

REPAIR_BATCH_KEYS = 64
"""Chunks pulled per GET when repairing replicas."""

WEBRTC_GET_KEYS = 8
"""Records per GET to a peer behind NAT: 8 of the largest (64 MiB) stay within what a
WebRTC link accepts in one reply."""

REPAIR_TIMEOUT_S = 30.0
"""Repairs run in the background: give slow peers (WebRTC) time to send a whole batch."""

MAX_ENGINES = 256
"""Engines a node indexes for its clients (KV events); more are refused."""

MAX_REPAIR_KEYS = 100_000
"""Most keys waiting for repair at once; beyond that they wait for the next announcement."""


class PeerPool:
    """One AsyncClient per peer address, at most ``max_peers`` (least recently used closed).

    A peer behind NAT (``webrtc://`` address) is spoken to over a WebRTC link, made on first
    use through ``links``; without WebRTC here its requests fail as Unavailable (a miss).
    """

    def __init__(self, timeout_s: float, max_peers: int = 256) -> None:
        self.timeout_s = timeout_s
        self.max_peers = max_peers
        self.links: WebRTCPeering | None = None
        self.curve: CurveFor | None = None
        """CurveZMQ credentials per peer address (None: plain ZeroMQ)."""
        self._clients: OrderedDict[str, AsyncClient] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, address: str) -> AsyncClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = AsyncClient(
                address, timeout_s=self.timeout_s, conduit=self._conduit(address), scoped=True
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
            if self.curve is None:
                return None  # plain ZeroMQ
            try:
                credentials = self.curve(address)
            except LookupError as exc:
                why = str(exc)
                return lambda: _NoRoute(address, why)
            return lambda: ZmqConduit(address, credentials)
        links, name = self.links, relayed.name
        if links is None:
            return lambda: _NoRoute(address)
        return lambda: links.conduit(name)

    def drop(self, address: str) -> None:
        """Close the client of a dead or unresponsive peer: what it still queues is discarded."""
        client = self._clients.pop(address, None)
        if client is not None:
            self._close(client)

    def _close(self, client: AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


class _NoRoute:
    """The conduit to a peer we cannot reach: behind NAT with no WebRTC here, a malformed
    address, or (CurveZMQ) no key known for it."""

    def __init__(self, address: str, why: str = "behind NAT, and no WebRTC here; or malformed") -> None:
        self._error = Unavailable(f"no route to {address} ({why})")

    async def send(self, frames: Sequence[Any]) -> None:
        raise self._error

    async def recv(self) -> list[Any]:
        raise self._error

    async def aclose(self) -> None:
        pass


class MeshCoordinator:
    """Replication, announcements and mesh-wide reads for one node. Runs on the event loop."""

    def __init__(
        self,
        node: Node,
        cluster: Cluster,
        replicas: int = 2,
        flush_interval_s: float = 0.05,
        peer_timeout_s: float = 2.0,
        max_index_keys: int = 1_000_000,
        max_queued_bytes: int = 256 << 20,
        anti_entropy_s: float = 300.0,
    ) -> None:
        self.node = node
        self.cluster = cluster
        self.replicas = replicas
        self.flush_interval_s = flush_interval_s
        self.anti_entropy_s = anti_entropy_s
        """Every this many seconds, re-announce everything held here to its owners."""
        self.index = HolderIndex(max_index_keys)
        self.peers = PeerPool(peer_timeout_s)
        self.peer_stats = PeerStats()
        """Latency and bandwidth per peer, from real requests: nearest-first GETs, cost decisions."""
        self.counters: dict[str, int] = defaultdict(int)
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        # owner name -> holder -> keys: the holder is this node, or an engine attached to it
        self._adds: dict[str, dict[str, set[bytes]]] = defaultdict(lambda: defaultdict(set))
        self._removes: dict[str, dict[str, set[bytes]]] = defaultdict(lambda: defaultdict(set))
        self._engines: dict[str, set[bytes]] = defaultdict(set)  # "me/engine" -> keys its KV cache holds
        self._replicate: dict[str, list[ChunkRecord]] = defaultdict(list)  # owner name -> records to copy
        self._repair: dict[str, set[bytes]] = defaultdict(set)  # holder name -> keys we own and lack
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._reannounce: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._anti_entropy: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<MeshCoordinator R={self.replicas} {self.index!r} queued={self._queued_bytes}B>"

    @property
    def me(self) -> str:
        return self.cluster.name

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._flush_loop(), name="lmcache-mesh-flush")
        self._anti_entropy = loop.call_later(
            self.anti_entropy_s * random.uniform(0.5, 1.0), self._periodic_reannounce
        )

    def _periodic_reannounce(self) -> None:
        # Anti-entropy: owners that lost announcements (a failed request, a restart) relearn them.
        self.ring_changed()
        self._anti_entropy = asyncio.get_running_loop().call_later(
            self.anti_entropy_s, self._periodic_reannounce
        )

    async def aclose(self) -> None:
        if self._anti_entropy is not None:
            self._anti_entropy.cancel()
            self._anti_entropy = None
        if self._reannounce is not None:
            self._reannounce.cancel()
            self._reannounce = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.peers.aclose()

    # writes

    def stored(self, records: Sequence[ChunkRecord], replicate: bool) -> None:
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
        self._adds = defaultdict(lambda: defaultdict(set))
        self._removes = defaultdict(lambda: defaultdict(set))
        self._replicate = defaultdict(list)
        self._queued_bytes = 0
        jobs = []
        for owner in set(adds) | set(removes) | set(replicate):
            address = self._address(owner)
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
        records: list[ChunkRecord],
    ) -> None:
        client = self.peers.get(address)
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
            self._peer_failed(address, exc)

    # owner side

    def on_announce(self, holder: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        self.index.add(holder, add)
        self.index.remove(holder, remove)
        if "/" in holder:
            return  # an engine's own KV cache: nothing there to pull replicas from
        # Repair: a key we own but do not hold (we are a new owner, or lost our copy) is
        # pulled from the holder that announced it, so each chunk gets back to R copies.
        missing = [k for k, here in zip(add, self.node.store.present(add), strict=True) if not here]
        wanted = [k for k in missing if self.me in self.cluster.ring.owners(k, self.replicas)]
        room = MAX_REPAIR_KEYS - sum(len(v) for v in self._repair.values())
        if wanted and room > 0:
            self._repair[holder].update(wanted[:room])
            self.counters["repair_dropped"] += max(0, len(wanted) - room)
            self._wake.set()

    async def _pull_repairs(self) -> None:
        repair, self._repair = self._repair, defaultdict(set)
        for holder, keys in repair.items():
            address = self._address(holder)
            if address is None:
                continue
            wanted = [
                k for k, here in zip(keys, self.node.store.present(list(keys)), strict=True) if not here
            ]
            for i in range(0, len(wanted), REPAIR_BATCH_KEYS):
                batch = wanted[i : i + REPAIR_BATCH_KEYS]
                records = await self._fetch(holder, batch, time.monotonic() + REPAIR_TIMEOUT_S)
                got = [r for r in records if r is not None]
                if not got:
                    break
                try:
                    self.node.put_records(got)
                except MeshError:
                    self.counters["repair_dropped"] += len(got)
                    break
                self.counters["repaired"] += len(got)
                self.stored(got, replicate=False)

    def who_has(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Holders of each key known here (this node's own tiers included)."""
        local = self.node.store.present(keys)
        return [
            ([self.me] if here else []) + [h for h in self.index.holders(k) if h != self.me]
            for k, here in zip(keys, local, strict=True)
        ]

    def forget(self, member: str) -> None:
        self.index.forget(member)
        for holder in self.index.names():
            if holder.startswith(member + "/"):  # the engines attached to it went with it
                self.index.forget(holder)
        m = self.cluster.membership.members.get(member)
        if m is not None:
            self.peers.drop(m.address)
        self.ring_changed()

    def ring_changed(self) -> None:
        """Owners moved: re-announce what we hold, once the membership settles (debounced)."""
        if self._reannounce is None:
            self._reannounce = asyncio.get_running_loop().call_later(REANNOUNCE_DELAY_S, self._reannounce_all)

    def _reannounce_all(self) -> None:
        self._reannounce = None
        task = asyncio.get_running_loop().create_task(self._reannounce_in_slices())
        self._background.add(task)  # keep a reference until done
        task.add_done_callback(self._background.discard)

    async def _reannounce_in_slices(self) -> None:
        held = [(self.me, self.node.store.keys())] + [(h, list(keys)) for h, keys in self._engines.items()]
        for holder, keys in held:
            self.counters["reannounced"] += len(keys)
            for start in range(0, len(keys), REANNOUNCE_SLICE_KEYS):
                self._route(holder, keys[start : start + REANNOUNCE_SLICE_KEYS], ())
                await asyncio.sleep(0)  # let requests and membership run between slices

    # reads

    async def locate(self, keys: Sequence[bytes], deadline: float) -> list[list[str]]:
        """Live holders of each key, asking each key's primary owner (one round, in parallel)."""
        holders: list[list[str]] = [[] for _ in keys]
        by_owner: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            owners = self.cluster.ring.owners(key, 1)
            by_owner[owners[0] if owners else self.me].append(i)
        remote = [(owner, idx) for owner, idx in by_owner.items() if owner != self.me]
        for i in by_owner.get(self.me, []):
            holders[i] = self.index.holders(keys[i])  # we own it: our index answers (tiers added below)
        answers = await asyncio.gather(
            *(self._ask_owner(owner, [keys[i] for i in idx], deadline) for owner, idx in remote)
        )
        for (_, idx), answer in zip(remote, answers, strict=True):
            for i, hs in zip(idx, answer, strict=True):
                holders[i] = hs
        alive = {
            m.name
            for m in self.cluster.membership.members.values()
            if m.state in (State.ALIVE, State.SUSPECT)
        }
        local = self.node.store.present(keys)
        return [
            # an engine's entry lives as long as the node it is attached to
            sorted(set(h for h in hs if h.partition("/")[0] in alive) | ({self.me} if here else set()))
            for hs, here in zip(holders, local, strict=True)
        ]

    async def _ask_owner(self, owner: str, keys: list[bytes], deadline: float) -> list[list[str]]:
        address = self._address(owner)
        remaining = deadline - time.monotonic()
        if address is None or remaining <= 0:
            return [[] for _ in keys]
        try:
            # Never the whole deadline: a stalled owner must leave time to fetch from holders.
            budget = min(remaining / 2, self.peers.timeout_s)
            started = time.monotonic()
            holders = await self.peers.get(address).who_has(keys, timeout_s=budget)
            self.peer_stats.observe(owner, 0, time.monotonic() - started)
            return holders
        except (MeshError, OSError) as exc:
            self._peer_failed(address, exc)
            return [[] for _ in keys]

    async def lookup(
        self, keys: Sequence[bytes], deadline: float, cost: Cost | None = None
    ) -> tuple[int, list[list[str]]]:
        """Longest prefix of ``keys`` cached anywhere (and, with ``cost``, worth fetching
        rather than recomputing), and who holds each key of it."""
        holders = await self.locate(keys, deadline)
        if cost is not None:
            n, skipped = worth_prefix(self.peer_stats, holders, self.me, cost)
            self.counters["cost_skip_chunks"] += skipped
            return n, holders
        # Only nodes can serve bytes: an engine's own cache (``node/engine``) is no hit here.
        n = next((i for i, hs in enumerate(holders) if not any("/" not in h for h in hs)), len(keys))
        return n, holders

    async def get(
        self,
        keys: Sequence[bytes],
        local: list[ChunkRecord | None],
        deadline: float,
        cost: Cost | None = None,
    ) -> list[ChunkRecord | None]:
        """Fill the local misses from holders (nearest first), then from ring owners, within
        ``deadline``; with ``cost``, skip peers from which recomputing would be faster."""
        missing = [i for i, r in enumerate(local) if r is None]
        if not missing:
            return local
        found = list(local)
        size_hint = cost.chunk_bytes if cost is not None else 1 << 20
        holders = await self.locate([keys[i] for i in missing], deadline)
        candidates: dict[int, list[str]] = {}
        for i, hs in zip(missing, holders, strict=True):
            owners = self.cluster.ring.owners(keys[i], self.replicas)
            held = [h for h in hs if h != self.me and "/" not in h]
            candidates[i] = nearest_first(self.peer_stats, held, size_hint) + [
                o for o in owners if o != self.me and o not in hs
            ]
        fetched: list[ChunkRecord] = []
        for attempt in range(self.replicas + 1):  # each round asks every missing key's next candidate
            plan: dict[str, list[int]] = defaultdict(list)
            for i in missing:
                if found[i] is None and attempt < len(candidates[i]):
                    plan[candidates[i][attempt]].append(i)
            if cost is not None:
                plan = self._affordable(plan, cost)
            if not plan or time.monotonic() >= deadline:
                break
            results = await asyncio.gather(
                *(self._fetch(peer, [keys[i] for i in idx], deadline, cost) for peer, idx in plan.items())
            )
            for idx, records in zip(plan.values(), results, strict=True):
                for i, record in zip(idx, records, strict=True):
                    if record is not None:
                        found[i] = record
                        fetched.append(record)
        if fetched:
            self.counters["remote_hits"] += len(fetched)
            if cost is not None:
                self.counters["cost_fetch_chunks"] += len(fetched)
            try:
                self.node.put_records(fetched)
                self.stored(fetched, replicate=False)
            except MeshError:
                pass  # keeping a copy is an optimisation; the caller has its bytes
        self.counters["remote_misses"] += sum(1 for i in missing if found[i] is None)
        return found

    def _affordable(self, plan: dict[str, list[int]], cost: Cost) -> dict[str, list[int]]:
        """The part of a fetch plan that beats recomputing (the rest is left to the engine)."""
        kept = {}
        for peer, idx in plan.items():
            if fetch_window(self.peer_stats, peer, len(idx), cost) is None:
                self.counters["cost_skip_chunks"] += len(idx)
            else:
                kept[peer] = idx
        return kept

    async def _fetch(
        self, peer: str, keys: list[bytes], deadline: float, cost: Cost | None = None
    ) -> list[ChunkRecord | None]:
        address = self._address(peer)
        started = time.monotonic()
        window = None if cost is None else fetch_window(self.peer_stats, peer, len(keys), cost)
        if window is not None:
            deadline = min(deadline, started + window)  # never wait longer than recomputing
        remaining = deadline - started
        if address is None or remaining <= 0:
            return [None] * len(keys)
        client = self.peers.get(address)
        # Replies over a WebRTC link are bounded (and slow): ask in slices, side by side,
        # all within the one deadline; the estimate comes from the whole transfer.
        step = WEBRTC_GET_KEYS if reachability(address) == "webrtc" else len(keys)
        slices = [keys[i : i + step] for i in range(0, len(keys), step)]
        answers = await asyncio.gather(
            *(client.get_records(part, local=True, timeout_s=remaining) for part in slices),
            return_exceptions=True,
        )
        self.node.checksum_failures += client.checksum_failures
        client.checksum_failures = 0
        records: list[ChunkRecord | None] = []
        failure: BaseException | None = None
        for part, answer in zip(slices, answers, strict=True):
            if isinstance(answer, BaseException):
                failure = failure or answer
                records.extend([None] * len(part))
            else:
                records.extend(answer)
        elapsed = time.monotonic() - started
        if failure is None:
            self.peer_stats.observe(peer, sum(r.nbytes for r in records if r is not None), elapsed)
            return records
        if not isinstance(failure, (MeshError, OSError)):
            raise failure
        if isinstance(failure, DeadlineExceeded) and cost is not None:
            self.peer_stats.cut_off(peer, len(keys) * cost.chunk_bytes, elapsed)
            self.counters["cost_cut_off_fetches"] += 1
        self._peer_failed(address, failure)
        return records

    def _peer_failed(self, address: str, exc: Exception) -> None:
        self.counters["peer_errors"] += 1
        logger.debug("x request to peer %s failed: %s", address, exc)
        if isinstance(exc, DeadlineExceeded):
            self.peers.drop(address)  # do not let requests queue up for a peer that is not answering

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

    def _address(self, name: str) -> str | None:
        m = self.cluster.membership.members.get(name)
        if m is None or m.state not in (State.ALIVE, State.SUSPECT):
            return None
        address: str = m.address
        return address

    def stats(self) -> dict[str, Any]:
        return {
            "index_keys": len(self.index),
            "replicas": self.replicas,
            "engines": {holder: len(keys) for holder, keys in self._engines.items()},
            "peers": self.peer_stats.snapshot(),
            **self.counters,
        }
