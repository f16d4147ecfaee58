"""Node: one cache node's state and API, usable in-process (edge boxes, tests).

The daemon serves a Node over ZeroMQ; an engine on the same machine may instead hold a
Node directly. Both expose the same calls as :class:`~lmcache_mesh.node.client.Client`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmcache_mesh.mesh.errors import Unavailable
from lmcache_mesh.transports.shm import Arena, shared_memory_room

from .config import NodeConfig
from .records import Buffer, ChunkRecord
from .sizes import format_size
from .tiers import DiskTier, MemoryTier, RecoveryReport, TieredStore

logger = logging.getLogger(__name__)

VERSION = "0.1.0"

MAX_TENANTS_TRACKED = 1024

LOOKUP_COUNTERS = ("lookups", "lookup_keys", "lookup_hit_keys", "lookup_missed_keys")
"""Clients' LOOKUPs: requests, chunks asked about, found cached (the leading run, here or in
the mesh), and not: the hit rate is lookup_hit_keys / lookup_keys."""


class Node:
    """A cache node's tiers and counters. Thread-safe; the constructor does no I/O.

    The disk tier is opened (and recovered) by :meth:`open`, or on first use.
    """

    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = config or NodeConfig()
        disk = None
        storage = self.config.storage
        if storage.disk_bytes > 0:
            disk = DiskTier(storage.data_path, storage.disk_bytes, storage.writeback_queue_bytes)
        self.store = TieredStore(MemoryTier(storage.memory_bytes), disk)
        self.name = self.config.name or socket.gethostname()
        self.addresses: list[str] = []
        """Where this node is served (set when its server binds); empty when embedded."""
        self.started_at = time.time()
        self.checksum_failures = 0
        self.shm_off_reason = "" if self.config.storage.shm_dir else "turned off (shm-dir is empty)"
        """Why the memory tier is not in shared memory ("" when it is, or before :meth:`open`)."""
        self.errors: dict[str, int] = {}
        self.lookups: Counter[str] = Counter()
        self.wire = Counter[str]()
        """Replies re-encoded for a peer's slow link: records and bytes saved."""
        self.tenant_requests: dict[str, Counter[str]] = {}
        """Per tenant: keys asked for (gets), found (hits), records put (puts)."""
        self._state = "new"  # new -> open -> closed
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Node {self.name} {self._state} {self.store!r}>"

    def __enter__(self) -> Node:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> RecoveryReport:
        """Open the disk tier and rebuild its index; idempotent."""
        with self._lock:
            if self._state == "closed":
                raise Unavailable(f"node {self.name} is closed")
            if self._state == "new":
                report = self.store.disk.open() if self.store.disk is not None else RecoveryReport()
                self.store.arena = self._open_arena()
                self._state = "open"
                if report.discarded or report.temp_removed:
                    logger.warning(
                        "- recovery discarded %d corrupt/torn files and %d temp files",
                        report.discarded,
                        report.temp_removed,
                    )
                return report
        return self.store.disk.recovery if self.store.disk is not None else RecoveryReport()

    def close(self) -> int:
        """Write memory back to disk (per ``persist_on_shutdown``) and close; returns records written."""
        with self._lock:
            if self._state != "open":
                self._state = "closed"
                return 0
            self._state = "closed"
        return self.store.close(persist=self.config.storage.persist_on_shutdown)

    def _open_arena(self) -> Arena | None:
        """The shared-memory arena for the memory tier, if shm-dir has room for it."""
        storage = self.config.storage
        if not storage.shm_dir or storage.memory_bytes == 0:
            return None
        directory = Path(storage.shm_dir)
        # Room for the memory budget, evictions queued for the disk (they keep their slots until
        # written) and leases (slots read or written by engines while memory moves on).
        size = storage.memory_bytes + storage.memory_bytes // 8
        if self.store.disk is not None:
            size += storage.writeback_queue_bytes
        room = shared_memory_room(directory)
        if room < size:
            self.shm_off_reason = (
                f"{directory} has {format_size(room)} free, the arena needs {format_size(size)}: "
                "enlarge it (docker run --shm-size, a Memory emptyDir) or set --shm-dir"
            )
            logger.debug("- shared memory off: %s", self.shm_off_reason)
            return None
        try:
            arena = Arena(directory, size)
        except OSError as exc:
            self.shm_off_reason = f"cannot create an arena in {directory}: {exc.strerror or exc}"
            logger.debug("- shared memory off: %s", self.shm_off_reason)
            return None
        logger.debug("- memory tier in shared memory: %s (%s)", arena.path, format_size(arena.capacity))
        return arena

    def _ready(self) -> None:
        if self._state != "open":
            self.open()

    # the client API

    def put(
        self, key: bytes, payload: Buffer, namespace: bytes, meta: Mapping[str, Any] | None = None
    ) -> None:
        """Store one chunk. A writable buffer is copied, so later changes cannot corrupt the cache."""
        view = memoryview(payload)
        if not view.readonly:
            payload = view.tobytes()
        self.put_records([ChunkRecord.build(key, payload, namespace, meta)])

    def put_records(self, records: Sequence[ChunkRecord]) -> list[ChunkRecord]:
        """Store all of ``records``, or none of them (NoSpace); returns them as kept."""
        self._ready()
        return self.store.put_many(records)

    def get(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        """Payloads (read-only views) per key, None per miss."""
        return [None if r is None else memoryview(r.payload).toreadonly() for r in self.get_records(keys)]

    def get_records(self, keys: Sequence[bytes]) -> list[ChunkRecord | None]:
        self._ready()
        return self.store.get_many(keys)

    def lookup(self, keys: Sequence[bytes], local: bool = False) -> int:
        """How many leading ``keys`` are cached. No side effects (no pins, no counters)."""
        self._ready()
        return self.store.lookup(keys)

    def delete(self, keys: Sequence[bytes]) -> int:
        self._ready()
        return self.store.delete(keys)

    def pin(self, keys: Sequence[bytes]) -> int:
        self._ready()
        return self.store.pin(keys)

    def unpin(self, keys: Sequence[bytes]) -> None:
        self.store.unpin(keys)

    def ping(self) -> dict[str, Any]:
        limits = self.config.limits
        return {
            "name": self.name,
            "version": VERSION,
            "limits": {
                "max_record_bytes": limits.max_record_bytes,
                "max_request_bytes": limits.max_request_bytes,
            },
        }

    def count_error(self, code_name: str) -> None:
        with self._lock:
            self.errors[code_name] = self.errors.get(code_name, 0) + 1

    def count_lookup(self, keys: int, hits: int) -> None:
        """A client's LOOKUP of ``keys`` chunks, ``hits`` of them cached (here or in the mesh)."""
        with self._lock:
            self.lookups.update(
                lookups=1, lookup_keys=keys, lookup_hit_keys=hits, lookup_missed_keys=keys - hits
            )

    def count_wire(self, saved: int) -> None:
        """A reply went re-encoded for the trip, ``saved`` bytes smaller (0: nothing was)."""
        if not saved:
            return
        with self._lock:
            self.wire["replies"] += 1
            self.wire["bytes_saved"] += saved

    def count_tenant(self, tenant: str, **counts: int) -> None:
        with self._lock:
            counter = self.tenant_requests.get(tenant)
            if counter is None:
                if len(self.tenant_requests) >= MAX_TENANTS_TRACKED:
                    tenant = "(others)"  # bounded: names come from the allow-list or requests
                counter = self.tenant_requests.setdefault(tenant, Counter())
            counter.update(counts)

    def _tenants(self, tiers: dict[str, Any]) -> dict[str, Any]:
        """Per tenant ("default" = ""): records held per tier and request counts; never keys."""
        with self._lock:
            requests = {(t or "default"): dict(c) for t, c in self.tenant_requests.items()}
        out: dict[str, Any] = {}
        for tier_name, tier in tiers.items():
            for tenant, n in tier.get("tenants", {}).items():
                out.setdefault(tenant, {"records": {}, "requests": {}})["records"][tier_name] = n
        for tenant, counts in requests.items():
            out.setdefault(tenant, {"records": {}, "requests": {}})["requests"] = counts
        return dict(sorted(out.items()))

    def stats(self) -> dict[str, Any]:
        """This node's part of the ``status --json`` document: node, tiers, tenants, counters
        (a server adds members, mesh and security: :meth:`NodeServer.status`)."""
        address = self.addresses[0] if self.addresses else "embedded"
        tier_stats = self.store.stats()
        counters = tier_stats["counters"]
        counters["checksum_failures"] = self.checksum_failures + sum(
            t.get("corrupt_discarded", 0) for t in tier_stats["tiers"].values()
        )
        with self._lock:
            counters["errors"] = dict(self.errors)
            counters.update({k: self.lookups[k] for k in LOOKUP_COUNTERS})
            counters["wire_replies"] = self.wire["replies"]
            counters["wire_bytes_saved"] = self.wire["bytes_saved"]
        report = self.store.disk.recovery if self.store.disk is not None else RecoveryReport()
        return {
            "node": {
                "name": self.name,
                "address": address,
                "addresses": list(self.addresses),
                "zone": self.config.mesh.zone,
                "version": VERSION,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started_at, 3),
                "state": self._state,
                "recovery": {
                    "recovered": report.recovered,
                    "discarded": report.discarded,
                    "temp_removed": report.temp_removed,
                },
            },
            "members": [
                {
                    "name": self.name,
                    "address": address,
                    "zone": self.config.mesh.zone,
                    "state": "alive",
                    "reachability": "direct",
                    "incarnation": 0,
                    "ring_share": 1.0,
                }
            ],
            "mesh": {},
            "tiers": tier_stats["tiers"],
            "tenants": self._tenants(tier_stats["tiers"]),
            "security": {"curve": False},
            "counters": counters,
        }
