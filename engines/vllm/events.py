"""vLLM KV events into the mesh's prefix index: which engine's own cache holds which prefix.

vLLM publishes block events over ZeroMQ (``kv_events_config``): PUB frames ``[topic,
seq (u64 big-endian), msgpack(EventBatch)]``; a batch is ``[ts, events, dp_rank]`` and an
event is a map with ``"type"`` (current vLLM) or a tagged array (older vLLM). A replay
ROUTER, when configured, resends buffered batches from a sequence number on, which is how
a gap is repaired.

vLLM's block hashes are its own; the mesh keys chunks by our chained keys. :class:`BlockChain`
follows ``parent_block_hash`` links to rebuild each block's token prefix incrementally and
emits our chunk key whenever a stored block completes a chunk, and the removal of that key
when the block goes. :class:`EventsIngest` runs the subscription on a thread and announces
the keys to the node as held by the engine (``<node>/<engine>`` in the index).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from lmcache_mesh.node.keys import chunk_keys

logger = logging.getLogger(__name__)

END_OF_REPLAY = -1
ANNOUNCE_BATCH = 1024
"""keys per ANNOUNCE (a node takes at most 4096 by default)"""
_ARRAY_FIELDS = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


class EventFormatError(ValueError):
    """A payload that is not a vLLM event batch."""


@dataclass
class KVEvent:
    type: str
    fields: dict[str, Any] = field(default_factory=dict)


def block_id(h: Any) -> int | None:
    """A block hash as vLLM's events give it (int, or a raw digest) -> uint64."""
    if h is None:
        return None
    if isinstance(h, int):
        return h & 0xFFFF_FFFF_FFFF_FFFF
    if isinstance(h, bytes | bytearray):
        return int.from_bytes(bytes(h)[-8:].rjust(8, b"\0"), "big")
    raise EventFormatError(f"block hash of type {type(h).__name__}")


def decode_event(raw: Any) -> KVEvent:
    if isinstance(raw, dict):
        kind = raw.get("type")
        if not isinstance(kind, str):
            raise EventFormatError("event map without a string 'type'")
        return KVEvent(kind, {k: v for k, v in raw.items() if k != "type"})
    if isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        names = _ARRAY_FIELDS.get(raw[0], ())
        return KVEvent(raw[0], dict(zip(names, raw[1:], strict=False)))
    raise EventFormatError(f"event of type {type(raw).__name__}")


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent]]:
    """(timestamp, events) of one EventBatch payload, in either encoding."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise EventFormatError(f"not msgpack: {exc}") from exc
    if isinstance(batch, dict):
        ts, events = batch.get("ts", 0.0), batch.get("events")
    elif isinstance(batch, list | tuple) and len(batch) >= 2:
        ts, events = batch[0], batch[1]
    else:
        raise EventFormatError("an event batch is [ts, events, ...] or a map")
    if not isinstance(events, list):
        raise EventFormatError("batch events must be a list")
    return float(ts or 0.0), [decode_event(e) for e in events]


@dataclass
class _Block:
    prev_key: bytes
    """key of the last whole chunk before this block's chunk (the namespace at the start)"""
    pending: list[int]
    """tokens since that chunk, up to and including this block"""
    key: bytes | None
    """the chunk key this block completes, if it completes one"""


class BlockChain:
    """Maps vLLM block events of one engine to (chunk keys added, chunk keys removed)."""

    def __init__(self, namespace: bytes, chunk_tokens: int) -> None:
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self._blocks: dict[int, _Block] = {}
        self._held: dict[bytes, int] = {}  # chunk key -> blocks completing it (normally 1)
        self.skipped = 0
        """stored blocks we could not place (unknown parent, LoRA, extra keys, other media)"""

    def __len__(self) -> int:
        return len(self._held)

    def apply(self, event: KVEvent) -> tuple[list[bytes], list[bytes]]:
        if event.type == "BlockStored":
            return self._stored(event.fields), []
        if event.type == "BlockRemoved":
            return [], self._removed(event.fields)
        if event.type == "AllBlocksCleared":
            removed = list(self._held)
            self._blocks.clear()
            self._held.clear()
            return [], removed
        return [], []  # other event kinds say nothing about blocks

    def _stored(self, f: dict[str, Any]) -> list[bytes]:
        hashes = f.get("block_hashes") or []
        tokens = list(f.get("token_ids") or [])
        size = int(f.get("block_size") or 0)
        extra = f.get("extra_keys") or []
        if (
            f.get("medium") not in (None, "GPU")
            or f.get("lora_name")
            or f.get("lora_id")
            or any(e is not None for e in extra)
            or size <= 0
            or len(tokens) != size * len(hashes)
        ):
            self.skipped += len(hashes)
            return []
        parent = block_id(f.get("parent_block_hash"))
        added: list[bytes] = []
        for i, raw in enumerate(hashes):
            if parent is None:
                before = _Block(self.namespace, [], None)
            elif parent in self._blocks:
                before = self._blocks[parent]
            else:  # its prefix is unknown to us (we joined late, or missed events)
                self.skipped += len(hashes) - i
                return added
            pending = (before.pending if before.key is None else []) + tokens[i * size : (i + 1) * size]
            prev = before.prev_key if before.key is None else before.key
            key = None
            if len(pending) == self.chunk_tokens:
                key = chunk_keys(prev, pending, self.chunk_tokens)[0]
                self._held[key] = self._held.get(key, 0) + 1
                if self._held[key] == 1:
                    added.append(key)
            elif len(pending) > self.chunk_tokens:  # chunk not a multiple of the block size
                self.skipped += len(hashes) - i
                return added
            block = block_id(raw)
            assert block is not None
            if block in self._blocks:  # stored again (a re-report, or a second copy): counted once
                parent = block
                if key is not None:
                    self._held[key] -= 1
                    if added and added[-1] == key and self._held[key] == 0:
                        added.pop()
                continue
            self._blocks[block] = _Block(prev, pending if key is None else [], key)
            parent = block
        return added

    def _removed(self, f: dict[str, Any]) -> list[bytes]:
        if f.get("medium") not in (None, "GPU"):
            return []
        removed: list[bytes] = []
        for raw in f.get("block_hashes") or []:
            b = self._blocks.pop(block_id(raw) or 0, None)
            if b is None or b.key is None:
                continue
            left = self._held.get(b.key, 0) - 1
            if left > 0:
                self._held[b.key] = left
            else:
                self._held.pop(b.key, None)
                removed.append(b.key)
        return removed


@dataclass
class IngestStats:
    batches: int = 0
    events: int = 0
    gaps: int = 0
    replayed: int = 0
    bad_payloads: int = 0
    announced_add: int = 0
    announced_remove: int = 0
    announce_failures: int = 0


class EventsIngest:
    """Subscribes to one engine's KV events and keeps the mesh index up to date (own thread).

    ``announce(add, remove)`` is called with batched keys at most every ``flush_s``; a failed
    call is retried with the next batch, so nothing announced is lost to a node restart.
    """

    def __init__(
        self,
        endpoint: str,
        chain: BlockChain,
        announce: Callable[[Sequence[bytes], Sequence[bytes]], None],
        topic: str = "",
        replay_endpoint: str | None = None,
        flush_s: float = 0.2,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.chain = chain
        self.announce = announce
        self.flush_s = flush_s
        self.stats = IngestStats()
        self._stop = threading.Event()
        self._last_seq: int | None = None
        self._add: dict[bytes, None] = {}
        self._remove: dict[bytes, None] = {}
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._thread = threading.Thread(target=self._run, name="lmcache-vllm-events", daemon=True)

    def start(self) -> EventsIngest:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt_string(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        last_flush = time.monotonic()
        try:
            while not self._stop.is_set():
                if sub.poll(100):
                    frames = sub.recv_multipart()
                    if len(frames) == 3:
                        self._on_message(int.from_bytes(frames[1], "big"), frames[2])
                    else:
                        self.stats.bad_payloads += 1
                if time.monotonic() - last_flush >= self.flush_s:
                    self._flush()
                    last_flush = time.monotonic()
            self._flush()
        except Exception:  # the engine must not notice: log and stop ingesting
            logger.exception("KV events ingest from %s stopped", self.endpoint)
        finally:
            sub.close(0)

    def _on_message(self, seq: int, payload: bytes) -> None:
        if self._last_seq is not None and seq > self._last_seq + 1:
            self.stats.gaps += 1
            self._replay(self._last_seq + 1, seq)
        if self._last_seq is not None and seq <= self._last_seq:
            return  # already applied (replayed)
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        self._last_seq = seq
        try:
            _, events = decode_batch(payload)
        except EventFormatError as exc:
            self.stats.bad_payloads += 1
            logger.warning("ignoring a KV event batch from %s: %s", self.endpoint, exc)
            return
        self.stats.batches += 1
        for event in events:
            self.stats.events += 1
            try:
                add, remove = self.chain.apply(event)
            except (EventFormatError, TypeError, ValueError) as exc:  # one odd event, not the stream
                self.stats.bad_payloads += 1
                logger.warning("ignoring a KV event from %s: %s", self.endpoint, exc)
                continue
            for key in add:
                self._remove.pop(key, None)
                self._add[key] = None
            for key in remove:
                self._add.pop(key, None)
                self._remove[key] = None

    def _replay(self, start: int, stop: int) -> None:
        """Ask the replay endpoint for ``start .. stop - 1``; without one, the gap stays (counted)."""
        if self.replay_endpoint is None:
            logger.warning("missed KV event batches %d..%d (no replay endpoint)", start, stop - 1)
            return
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while dealer.poll(2000):
                frames = dealer.recv_multipart()
                if len(frames) < 4:
                    break
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_OF_REPLAY or seq >= stop:
                    break
                if self._last_seq is None or seq > self._last_seq:
                    self._apply(seq, frames[3])
                    self.stats.replayed += 1
        finally:
            dealer.close(0)

    def _flush(self) -> None:
        if not self._add and not self._remove:
            return
        # In batches under a node's per-request key limit; what fails stays queued for the next flush.
        while self._add or self._remove:
            add = list(self._add)[:ANNOUNCE_BATCH]
            remove = list(self._remove)[: ANNOUNCE_BATCH - len(add)]
            try:
                self.announce(add, remove)
            except Exception as exc:
                self.stats.announce_failures += 1
                logger.warning("could not announce engine-held chunks: %s: %s", type(exc).__name__, exc)
                return
            self.stats.announced_add += len(add)
            self.stats.announced_remove += len(remove)
            for key in add:
                del self._add[key]
            for key in remove:
                del self._remove[key]
