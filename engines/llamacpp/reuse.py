"""The mesh side of one llama.cpp context: restore cached prefixes, store new chunks.

Before prefill, :meth:`KVReuse.before_prefill` looks up the prompt's chunk chain, fetches
the cached leading chunks, joins them into one sequence-state blob and restores it; it
then sets the Llama's token bookkeeping so that llama-cpp-python's own prefix matching
evaluates only the rest. After generation, :meth:`KVReuse.after_generation` copies the
sequence state once and hands it to a background thread, which cuts the chunks nobody
has stored yet and puts them. Every mesh failure is a miss; nothing reaches the user.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache_mesh.node.config import NodeConfig
from lmcache_mesh.node.keys import chunk_keys, namespace_id
from lmcache_mesh.node.records import ChunkRecord

from ..saver import Saver
from ..store import MeshStore
from . import seqstate
from .config import LlamaMeshConfig
from .fingerprint import model_fingerprint

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)

ENGINE = "llama.cpp"
_MAX_PUT_BYTES = 64 << 20
"""records per PUT request, by payload bytes (well under a node's default request limit)"""
_KNOWN_KEYS = 1 << 16
_KNOWN_TTL_S = 300.0
"""a chunk stored or seen less than this long ago is not stored again"""
_FLOAT_BYTES = {0: 4, 1: 2, 30: 2}


@dataclass
class ReuseStats:
    requests: int = 0
    lookups: int = 0
    hit_requests: int = 0
    hit_tokens: int = 0
    """prompt tokens restored from the mesh instead of computed"""
    restore_failures: int = 0
    """blobs llama.cpp refused (then the prompt was recomputed)"""
    bad_chunks: int = 0
    """fetched records that did not match this namespace or layout"""
    lookup_seconds: float = 0.0
    fetch_seconds: float = 0.0
    restore_seconds: float = 0.0
    """joining the chunks and handing the blob to llama.cpp"""
    saves: int = 0
    saved_chunks: int = 0
    save_seconds: float = 0.0
    """time the caller spent copying KV out for saving (the rest runs in the background)"""


def read_sequence(llm: Llama) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Sequence 0's state blob, copied out of the context."""
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    blob = np.empty(size, dtype=np.uint8)
    written = llama_cpp.llama_state_seq_get_data(
        llm.ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0
    )
    return blob[:written]


def restore_sequence(llm: Llama, blob: np.ndarray[Any, np.dtype[np.uint8]], tokens: Sequence[int]) -> bool:
    """Replace sequence 0 with ``blob`` (holding ``tokens``); False if llama.cpp refused it."""
    import llama_cpp

    read = llama_cpp.llama_state_seq_set_data(
        llm.ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), len(blob), 0
    )
    if read != len(blob):
        # A refused restore leaves the sequence empty: the bookkeeping must say so.
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.n_tokens = 0
        llm._requires_eval = True
        return False
    n = len(tokens)
    llm.input_ids[:n] = tokens
    llm.n_tokens = n
    # The restored state has no logits: generate() must decode at least one token.
    llm._requires_eval = True
    return True


def probe_layout(llm: Llama) -> seqstate.BlobLayout:
    """The context's KV layout, read from the blob of a one-token decode (then cleared)."""
    token = max(llm.token_bos(), 0)
    llm.reset()
    llm.eval([token])
    try:
        return seqstate.parse(read_sequence(llm)).layout
    finally:
        llm._ctx.kv_cache_clear()
        llm.n_tokens = 0
        llm._requires_eval = True


def layout_descriptor(llm: Llama, layout: seqstate.BlobLayout) -> dict[str, Any]:
    """What the namespace must pin: engine, blob format version and the KV layout."""
    import llama_cpp

    n_kv_heads = int(llama_cpp.llama_model_n_head_kv(llm.model))
    descriptor = {"engine": ENGINE, "engine_version": llama_cpp.__version__, **layout.descriptor()}
    descriptor["n_kv_heads"] = n_kv_heads
    el = _FLOAT_BYTES.get(layout.k_type)
    if el is not None and n_kv_heads > 0:
        descriptor["head_dim"] = layout.k_row // el // n_kv_heads
    return descriptor


def common_prefix(held: np.ndarray[Any, Any], tokens: Sequence[int]) -> int:
    n = min(len(held), len(tokens))
    diff = np.flatnonzero(held[:n] != np.asarray(tokens[:n], dtype=held.dtype))
    return int(diff[0]) if len(diff) else n


class KVReuse:
    """Chunk-level KV reuse for one ``llama_cpp.Llama`` (single sequence, as Llama runs)."""

    def __init__(self, llm: Llama, config: LlamaMeshConfig | None = None, store: MeshStore | None = None):
        self.llm = llm
        self.config = config or LlamaMeshConfig()
        self.chunk_tokens = self.config.chunk_tokens
        self.stats = ReuseStats()
        self.fingerprint = model_fingerprint(llm.model_path, self.config.fingerprint_cache_dir)
        self.layout = probe_layout(llm)
        self.descriptor = layout_descriptor(llm, self.layout)
        self.namespace = namespace_id(
            self.fingerprint, self.descriptor, self.chunk_tokens, self.config.tenant
        )
        self.chunk_bytes = self.layout.chunk_bytes(self.chunk_tokens)
        self.enabled = not llm._logits_all
        if not self.enabled:
            logger.warning("logits_all=True: prompt logits cannot be restored, so the mesh is not used")
        self._owns_store = store is None
        self.store = store or MeshStore(self.config.store_config())
        self._saver = Saver("lmcache-llamacpp-save", self.config.max_pending_save_bytes)
        self._known: OrderedDict[bytes, float] = OrderedDict()
        self._known_lock = threading.Lock()
        self._prompt_tokens = 0
        self._meta = {
            "tokens": self.chunk_tokens,
            "layout": self.descriptor,
            "dtype": self.descriptor["k_type"],
            "shape": [self.layout.n_layer, 2, self.chunk_tokens],
        }
        if self.chunk_bytes > NodeConfig.default_of("max_record_bytes"):
            logger.warning(
                "chunks of %d tokens hold %.0f MB of KV, more than a node accepts by default (--max-record): "
                "run the node with a larger --max-record, or use a smaller chunk_tokens",
                self.chunk_tokens,
                self.chunk_bytes / 1e6,
            )
        logger.info(
            "mesh KV reuse on %s: namespace %s, %d tokens/chunk (%.2f MB), node %s",
            llm.model_path,
            self.namespace.hex(),
            self.chunk_tokens,
            self.chunk_bytes / 1e6,
            self.config.node or "embedded",
        )

    def close(self) -> None:
        self._saver.close()
        if self._owns_store:
            self.store.close()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait for queued saves (tests, shutdown)."""
        return bool(self._saver.flush(timeout_s))

    def snapshot(self) -> dict[str, Any]:
        return {
            **asdict(self.stats),
            "saver": asdict(self._saver.stats),
            "store": asdict(self.store.stats),
            "namespace": self.namespace.hex(),
        }

    # known chunks: stored by us or seen in the mesh recently, so not stored again

    def _remember(self, keys: Sequence[bytes]) -> None:
        now = time.monotonic()
        with self._known_lock:
            for key in keys:
                self._known[key] = now
                self._known.move_to_end(key)
            while len(self._known) > _KNOWN_KEYS:
                self._known.popitem(last=False)

    def _forget(self, keys: Sequence[bytes]) -> None:
        with self._known_lock:
            for key in keys:
                self._known.pop(key, None)

    def _first_unknown(self, keys: Sequence[bytes]) -> int:
        horizon = time.monotonic() - _KNOWN_TTL_S
        with self._known_lock:
            for i, key in enumerate(keys):
                seen = self._known.get(key)
                if seen is None or seen < horizon:
                    return i
        return len(keys)

    # before prefill

    def before_prefill(self, tokens: Sequence[int]) -> int:
        """Restore the longest cached chunk prefix of ``tokens`` the context lacks; tokens restored."""
        self._prompt_tokens = len(tokens)
        if not self.enabled:
            return 0
        self.stats.requests += 1
        llm, c = self.llm, self.chunk_tokens
        n_full = min(len(tokens), llm.n_ctx()) // c
        have = common_prefix(llm.input_ids[: llm.n_tokens], tokens)
        if n_full == 0 or have >= n_full * c:
            return 0  # the context itself holds all that chunks could give
        started = time.perf_counter()
        keys = chunk_keys(self.namespace, tokens[: n_full * c], c)
        self.stats.lookups += 1
        hits = self.store.lookup(keys)
        looked_up = time.perf_counter()
        self.stats.lookup_seconds += looked_up - started
        if hits * c <= have:
            return 0
        self._remember(keys[:hits])
        payloads = self._fetch(keys[:hits])
        fetched = time.perf_counter()
        self.stats.fetch_seconds += fetched - looked_up
        n = len(payloads)
        if n * c <= have:
            return 0
        blob = seqstate.join(self.layout, payloads, c)
        restored = restore_sequence(llm, blob, tokens[: n * c])
        self.stats.restore_seconds += time.perf_counter() - fetched
        if not restored:
            self.stats.restore_failures += 1
            logger.warning("llama.cpp refused a restored blob of %d tokens; recomputing", n * c)
            return 0
        self.stats.hit_requests += 1
        self.stats.hit_tokens += n * c
        return n * c

    def _fetch(self, keys: Sequence[bytes]) -> list[memoryview]:
        """Payloads of the leading run of ``keys`` that arrived and belong here."""
        payloads = []
        for record in self.store.fetch(keys):
            if record is None:
                break
            h = record.header
            if h.namespace != self.namespace or h.tokens != self.chunk_tokens or h.length != self.chunk_bytes:
                self.stats.bad_chunks += 1
                logger.warning("dropping chunk %s: not of this model and layout", h.key.hex())
                break
            payloads.append(memoryview(record.payload))
        return payloads

    # after generation

    def after_generation(self) -> None:
        """Queue the context's chunks that are not stored yet (copying the KV once, here)."""
        if not self.enabled:
            return
        llm, c = self.llm, self.chunk_tokens
        n_held = llm.n_tokens if self.config.save_completions else min(llm.n_tokens, self._prompt_tokens)
        n_full = n_held // c
        if n_full == 0:
            return
        tokens = llm.input_ids[: n_full * c].tolist()
        keys = chunk_keys(self.namespace, tokens, c)
        first = self._first_unknown(keys)
        if first == n_full:
            return
        started = time.perf_counter()
        try:
            blob = read_sequence(llm)
        except Exception as exc:  # never fail the user's request over a save
            logger.warning("could not read the KV to save it: %s", exc)
            return
        self.stats.save_seconds += time.perf_counter() - started
        new_keys = keys[first:]
        self._remember(new_keys)
        if not self._saver.submit(lambda: self._save(blob, first, new_keys), len(blob)):
            self._forget(new_keys)

    def _save(self, blob: np.ndarray[Any, np.dtype[np.uint8]], first: int, keys: list[bytes]) -> None:
        try:
            state = seqstate.parse(blob)
            if state.layout != self.layout:
                raise seqstate.BlobError(f"layout changed from {self.layout} to {state.layout}")
            payloads = seqstate.split(state, self.chunk_tokens, first, len(keys))
            records = [
                ChunkRecord.build(k, p, self.namespace, self._meta)
                for k, p in zip(keys, payloads, strict=True)
            ]
            batch: list[ChunkRecord] = []
            for record in records:
                if batch and (len(batch) + 1) * self.chunk_bytes > _MAX_PUT_BYTES:
                    self.store.put(batch)
                    batch = []
                batch.append(record)
            self.store.put(batch)
        except Exception:
            self._forget(keys)
            raise
        self.stats.saves += 1
        self.stats.saved_chunks += len(keys)
