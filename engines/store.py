"""What an engine adapter talks to: a node over ZeroMQ, or a node embedded in the process.

Engines treat the mesh as best effort. Every call here turns a failure into "miss" (or a
dropped save) and never raises to the engine; after a failure the store stays quiet for
``retry_after_s`` so that a dead node costs one timeout, not one per request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmcache_mesh.node.calls import Reservation
from lmcache_mesh.node.client import Client
from lmcache_mesh.node.config import NodeConfig
from lmcache_mesh.node.errors import DeadlineExceeded, MeshError, Unavailable
from lmcache_mesh.node.keyring import read_key_pair, read_public_key
from lmcache_mesh.node.node import Node
from lmcache_mesh.node.protocol import Cost
from lmcache_mesh.node.records import TENANT_RE, ChunkRecord
from lmcache_mesh.node.shm import Lease
from lmcache_mesh.node.sizes import format_size
from lmcache_mesh.transports.curve import CurveClient

logger = logging.getLogger(__name__)


def check_adapter_settings(config: Any) -> None:
    """Checks shared by the engine adapters' configs (llama.cpp and vLLM)."""
    if config.chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {config.chunk_tokens}")
    if config.prefill_tokens_per_s is not None and config.prefill_tokens_per_s <= 0:
        raise ValueError(f"prefill_tokens_per_s must be positive, got {config.prefill_tokens_per_s}")
    for name in ("lookup_timeout_s", "fetch_timeout_s", "retry_after_s"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if config.tenant is not None and not TENANT_RE.match(config.tenant):
        raise ValueError(
            f"tenant {config.tenant!r:.80} must be 1-64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
        )
    if bool(config.key_file) != bool(config.server_key):
        raise ValueError("CurveZMQ needs both key_file (this engine's key pair) and server_key (the node's)")


def adapter_store_config(config: Any, node_config: NodeConfig | None = None) -> StoreConfig:
    """The store settings of an engine adapter's config (llama.cpp and vLLM share the fields)."""
    curve = None
    if config.key_file:
        curve = CurveClient(read_key_pair(config.key_file)[1], read_public_key(config.server_key))
    return StoreConfig(
        node=config.node,
        node_config=node_config,
        lookup_timeout_s=config.lookup_timeout_s,
        fetch_timeout_s=config.fetch_timeout_s,
        retry_after_s=config.retry_after_s,
        curve=curve,
        tenant=config.tenant or "",
    )


@dataclass(frozen=True)
class StoreConfig:
    """How an adapter reaches the mesh. Defaults suit a node on the same machine."""

    node: str | None = None
    """node address (tcp://HOST:PORT or ipc:///PATH); None = an embedded node in this process"""
    node_config: NodeConfig | None = None
    """config of the embedded node (None = NodeConfig defaults); unused with ``node``"""
    lookup_timeout_s: float = 0.25
    """longest wait for a LOOKUP; past it the request is a miss"""
    fetch_timeout_s: float = 2.0
    """longest wait for the chunks of a hit; past it the engine recomputes"""
    put_timeout_s: float = 10.0
    retry_after_s: float = 5.0
    """after a failed call, treat the node as absent (instant misses) for this long"""
    curve: CurveClient | None = None
    """CurveZMQ credentials for a tcp:// node (its allow-list must hold our key)"""
    tenant: str = ""
    """the node runs our requests in this tenant (a client key pinned to one may leave it "")"""


@dataclass
class StoreStats:
    lookups: int = 0
    fetches: int = 0
    puts: int = 0
    failures: int = 0
    skipped_while_down: int = 0
    last_error: str = ""
    errors: dict[str, int] = field(default_factory=dict)


def _open_embedded(config: NodeConfig) -> Node:
    """An in-process node; if its disk tier cannot open (another process holds the data
    dir, no permission), the engine still starts, with a memory-only cache."""
    config = config.with_(shm_dir="")  # nobody else can reach an embedded node to share its memory
    node = Node(config)
    try:
        node.open()
        return node
    except (OSError, MeshError) as exc:
        logger.warning("embedded node: disk tier unavailable (%s); caching in memory only", exc)
        node = Node(config.with_(disk_bytes=0))
        node.open()
        return node


def _nothing(_: object) -> None:
    return None


def _no_lease(n: int) -> Lease:
    return Lease([None] * n, (), (), _nothing, _nothing)


class MeshStore:
    """Best-effort LOOKUP / GET / PUT for an engine; thread-safe.

    Foreground calls (lookup, fetch) and background puts use separate connections, so a
    large PUT never delays the next request's lookup.
    """

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self.stats = StoreStats()
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._node: Node | None = None
        self._front: Client | None = None
        self._back: Client | None = None
        if self.config.node is None:
            self._node = _open_embedded(self.config.node_config or NodeConfig())
        else:
            c = self.config
            self._front = Client(c.node, c.fetch_timeout_s, curve=c.curve, tenant=c.tenant)
            self._back = Client(c.node, c.put_timeout_s, curve=c.curve, tenant=c.tenant)

    def __repr__(self) -> str:
        return f"<MeshStore {self.config.node or 'embedded'}>"

    @property
    def embedded_node(self) -> Node | None:
        return self._node

    def close(self) -> None:
        for client in (self._front, self._back):
            if client is not None:
                client.close()
        if self._node is not None:
            self._node.close()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**asdict(self.stats), "errors": dict(self.stats.errors), "transport": self.transport}

    def _available(self) -> bool:
        if time.monotonic() < self._down_until:
            with self._lock:
                self.stats.skipped_while_down += 1
            return False
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        name = type(exc).__name__
        with self._lock:
            self.stats.failures += 1
            self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
            self.stats.last_error = f"{what}: {name}: {exc}"
            # Only an unreachable node is skipped for a while; a refused request (full
            # node, bad record) says nothing about the next one.
            unreachable = isinstance(exc, (DeadlineExceeded, Unavailable))
            first = unreachable and self._down_until < time.monotonic()
            if unreachable:
                self._down_until = time.monotonic() + self.config.retry_after_s
        outcome = "chunks not stored" if what == "put" else "recomputing"
        if not unreachable and self.stats.errors[name] == 1:
            logger.warning("mesh %s refused (%s): %s: %s (logged once per kind)", what, outcome, name, exc)
        elif first:
            logger.warning(
                "mesh %s failed (%s: %s); %s, node skipped for %.0f s",
                what,
                name,
                exc,
                outcome,
                self.config.retry_after_s,
            )

    def check_chunk_bytes(self, chunk_bytes: int) -> None:
        """Raise ValueError, naming the setting to change, if the node cannot store one chunk of
        ``chunk_bytes``: an adapter calls it at start, so such a limit never shows up as misses.
        A node that does not answer now is not an error (it may start later)."""
        if self._node is not None:
            limit = self._node.config.limits.max_record_bytes
        else:
            assert self._front is not None
            try:
                limits = self._front.ping(timeout_s=self.config.lookup_timeout_s * 4).get("limits", {})
            except MeshError as exc:
                logger.warning(
                    "node %s did not answer at start (%s); its limits are not checked", self.config.node, exc
                )
                return
            limit = limits.get("max_record_bytes") if isinstance(limits, dict) else None
            if not isinstance(limit, int):
                return  # an older node: it says nothing about its limits
        if chunk_bytes > limit:
            raise ValueError(
                f"one chunk holds {format_size(chunk_bytes)} ({chunk_bytes} bytes) of KV, more than node "
                f"{self.config.node or '(embedded)'} accepts per record ({format_size(limit)}): start the node "
                f"with --max-record {-(-chunk_bytes // (1 << 20))}MiB or more, or use a smaller chunk_tokens"
            )

    def lookup(self, keys: Sequence[bytes], cost: Cost | None = None, local: bool = False) -> int:
        """Leading ``keys`` cached anywhere in the mesh, or on the node itself with ``local``
        (with ``cost``: only as far as fetching beats recomputing); 0 on any failure."""
        if not keys or not self._available():
            return 0
        with self._lock:
            self.stats.lookups += 1
        try:
            if self._node is not None:
                return int(self._node.lookup(keys, local))
            assert self._front is not None
            return int(self._front.lookup(keys, local, timeout_s=self.config.lookup_timeout_s, cost=cost))
        except Exception as exc:  # any failure is a miss: the engine recomputes
            self._failed("lookup", exc)
            return 0

    def read(self, keys: Sequence[bytes], cost: Cost | None = None) -> Lease:
        """Records per key (None per miss, or per chunk cheaper to recompute than to fetch,
        given ``cost``), all None on any failure: on the node's host, views into its shared
        memory, unchanged until the lease is released. Verify each as it is used
        (:meth:`Lease.payload`, :meth:`Lease.copy_into`); use the lease as a context manager."""
        if not keys or not self._available():
            return _no_lease(len(keys))
        with self._lock:
            self.stats.fetches += 1
        try:
            if self._node is not None:
                return Lease(self._node.get_records(keys), (), (), _nothing, _nothing)
            assert self._front is not None
            return self._front.read(keys, timeout_s=self.config.fetch_timeout_s, cost=cost)
        except Exception as exc:  # a failed fetch is a miss
            self._failed("fetch", exc)
            return _no_lease(len(keys))

    def fetch(self, keys: Sequence[bytes], cost: Cost | None = None) -> list[ChunkRecord | None]:
        """As :meth:`read`, as verified copies that need no lease."""
        with self.read(keys, cost) as lease:
            records: list[ChunkRecord | None] = lease.kept()
            return records

    def reserve(self, keys: Sequence[bytes], sizes: Sequence[int]) -> Reservation | None:
        """Announce a save (lookups on the node count ``keys`` at once, GETs wait for them) and,
        on the node's host, get slots to write it into; None when there is no node to tell."""
        if self._back is None or not keys or not self._available():
            return None
        try:
            return self._back.reserve(keys, sizes)
        except Exception as exc:
            self._failed("put", exc)
            return None

    def shared_mappings(self) -> list[memoryview]:
        """The node's shared memory as each of this store's connections maps it (mapped now if
        not yet; none when the node is elsewhere or unreachable, or embedded)."""
        mappings = []
        for client in (self._front, self._back):
            arena = client.shared_arena() if client is not None else None
            if arena is not None:
                mappings.append(arena.mapping)
        return mappings

    def reserved_slots(
        self, reservation: Reservation | None, sizes: Sequence[int]
    ) -> list[memoryview] | None:
        """The node's slots of ``reservation`` as this process maps them (``sizes``: bytes of
        each, as reserved), to write the chunks into; None when it has none (then:
        :meth:`put_payloads`)."""
        arena = self._back.arena if self._back is not None else None
        if reservation is None or reservation.slots is None or arena is None:
            return None
        return [arena.slot(offset, size) for offset, size in zip(reservation.slots, sizes, strict=True)]

    def commit_records(
        self, records: Sequence[ChunkRecord], reservation: Reservation | None, written: bool
    ) -> None:
        """Store ``records``, all of ``reservation`` at once when one announced them: into its
        slots (``written``: their payloads are there already, checksummed where they are), or
        as frames when it has none."""
        if reservation is None or self._back is None:
            self._storing(lambda: self._put_records(records))
            return
        back = self._back
        self._storing(lambda: back.commit(records, reservation, written=written))

    def cancel(self, reservation: Reservation | None) -> None:
        """Withdraw an announced save that will not land (its keys stop counting at once)."""
        if reservation is None or self._back is None:
            return
        try:
            self._back.release([reservation.lease])
        except Exception as exc:  # it ends by itself at its lease timeout
            self._failed("put", exc)

    @property
    def transport(self) -> str:
        """How chunks travel to and from the node: "shared memory", "frames" or "in process"."""
        return "in process" if self._front is None else self._front.transport

    def announce_engine(self, engine: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None:
        """Tell the mesh's index what an engine's own KV cache holds; raises on failure."""
        if self._back is None:
            raise Unavailable("an embedded node keeps no mesh index: give the engine a node address")
        self._back.announce_engine(engine, add, remove)

    def put(self, records: Sequence[ChunkRecord]) -> None:
        """Store ``records``; raises on failure (callers run it in the background and count it)."""
        if records:
            self._storing(lambda: self._put_records(records))

    def put_payloads(
        self,
        keys: Sequence[bytes],
        payloads: Sequence[Any],
        namespace: bytes,
        meta: Mapping[str, Any],
        reservation: Reservation | None = None,
    ) -> None:
        """Store ``payloads`` as chunks ``keys`` (the ones :meth:`reserve` announced, with
        ``reservation``): on the node's host, written into its shared memory and checksummed in
        one pass. Raises on failure (callers run it in the background and count it)."""
        if not keys:
            return
        if self._node is not None:
            records = [ChunkRecord.build(k, p, namespace, meta) for k, p in zip(keys, payloads, strict=True)]
            self._storing(lambda: self._put_records(records))
            return
        assert self._back is not None
        back = self._back
        self._storing(lambda: back.put_payloads(keys, payloads, namespace, meta, reservation))

    def _put_records(self, records: Sequence[ChunkRecord]) -> None:
        if self._node is not None:
            self._node.put_records(records)
        else:
            assert self._back is not None
            self._back.put_records(records)

    def _storing(self, store: Callable[[], None]) -> None:
        if not self._available():
            raise Unavailable(f"node {self.config.node} did not answer lately; chunks not stored")
        with self._lock:
            self.stats.puts += 1
        try:
            store()
        except Exception as exc:
            self._failed("put", exc)
            raise
