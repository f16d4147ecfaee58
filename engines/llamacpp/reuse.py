"""The mesh side of one llama.cpp context: restore cached prefixes, store new chunks.

Before prefill, :meth:`KVReuse.before_prefill` looks up the prompt's chunk chain, fetches
the cached leading chunks and the tail after them (the tokens past the last full chunk, in
multiples of ``tail_tokens``, as far as they agree with the prompt), joins them into one
sequence-state blob and restores it; it then sets the Llama's token bookkeeping so that
llama-cpp-python's own prefix matching evaluates only the rest. After generation,
:meth:`KVReuse.after_generation` copies the sequence state, cuts out the chunks nobody has
stored yet and the context's tail, and hands them to a background thread that puts them.
Every mesh failure is a miss; nothing reaches the user.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from cachetools import TTLCache

from lmcache_mesh.node.calls import Reservation
from lmcache_mesh.node.codecs import LOSSY
from lmcache_mesh.node.keys import chunk_keys, namespace_id, tail_key, tokens_to_bytes
from lmcache_mesh.node.shm import Lease
from lmcache_mesh.node.tails import pack_tail, tail_bytes, unpack_tail, usable_tokens

from ..codec import codec_meta, decoded, encoded_runs, lossy_codec, not_readable
from ..fingerprint import model_fingerprint
from ..prefill import PrefillRate
from ..saver import Saver
from ..store import MeshStore
from . import seqstate
from .config import LlamaMeshConfig
from .identity import compute_settings, layout_descriptor, probe_layout
from .seqio import read_sequence, restore_sequence

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)

_KNOWN_KEYS = 1 << 16
_KNOWN_TTL_S = 300.0
"""a chunk stored or seen less than this long ago is not stored again"""


@dataclass
class ReuseStats:
    requests: int = 0
    lookups: int = 0
    hit_requests: int = 0
    hit_tokens: int = 0
    """prompt tokens restored from the mesh instead of computed"""
    tail_tokens: int = 0
    """of those, tokens restored from tails (after a prompt's last full chunk)"""
    skipped_restores: int = 0
    """hits not restored because computing what they add to the context was faster"""
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
    saved_tails: int = 0
    save_seconds: float = 0.0
    """time the caller spent copying KV out for saving (the rest runs in the background)"""


@dataclass
class _TailSave:
    """A tail to store: ``count`` tokens of the context from ``start``, under ``key``;
    ``content`` names what it holds (its key names only the prefix before it)."""

    key: bytes
    start: int
    count: int
    content: bytes
    payload: np.ndarray[Any, np.dtype[np.uint8]] | None = None


def common_prefix(held: np.ndarray[Any, Any], tokens: Sequence[int]) -> int:
    n = min(len(held), len(tokens))
    diff = np.flatnonzero(held[:n] != np.asarray(tokens[:n], dtype=held.dtype))
    return int(diff[0]) if len(diff) else n


class KVReuse:
    """Chunk-level KV reuse for one ``llama_cpp.Llama`` (single sequence, as Llama runs).

    ``enabled`` is False (and every hook a no-op) when the engine's KV cannot be shared
    safely: ``logits_all`` engines (restored prompts have no per-token logits; draft
    models force it) and models whose state is not one plain KV stream.
    """

    def __init__(self, llm: Llama, config: LlamaMeshConfig | None = None, store: MeshStore | None = None):
        self.llm = llm
        self.config = config or LlamaMeshConfig()
        self.chunk_tokens = self.config.chunk_tokens
        self.stats = ReuseStats()
        self.enabled = False
        self.codec = "raw"
        """what this engine stores: the configured codec, where its KV types allow it"""
        self.namespace = b""
        self.chunk_bytes = 0
        self._known: TTLCache[bytes, bool] = TTLCache(maxsize=_KNOWN_KEYS, ttl=_KNOWN_TTL_S)
        self._known_lock = threading.Lock()
        self._prompt_tokens = 0
        self.prefill = PrefillRate(self.config.prefill_tokens_per_s)
        self.restore_rate = PrefillRate()
        """tokens per second of restores (fetch, join, hand to llama.cpp), measured"""
        self._prefill_clock: tuple[float, int] | None = None
        self.fingerprint = model_fingerprint(llm.model_path, self.config.fingerprint_cache_dir)
        self.layout: seqstate.BlobLayout | None
        try:
            self.layout = probe_layout(llm)
        except seqstate.BlobError as exc:
            logger.warning(
                "%s: its KV state cannot be cut into chunks (%s); the mesh is off for it", llm.model_path, exc
            )
            self.layout = None
        if llm._logits_all:
            logger.warning(
                "logits_all=True (or a draft model): restored prompts have no logits, the mesh is off"
            )
        self._owns_store = store is None
        self.store = store or MeshStore(self.config.store_config())
        self._saver = Saver("lmcache-llamacpp-save", self.config.max_pending_save_bytes)
        if self.layout is None or llm._logits_all:
            return
        self.geometry = self.layout.geometry(self.chunk_tokens)
        if self.geometry is not None:
            self.codec = self.config.codec
        elif self.config.codec != "raw":
            logger.warning("codec %s needs f16/bf16/f32 K and V of one type; storing raw", self.config.codec)
        compute = compute_settings(llm, self.config.fingerprint_cache_dir)
        lossy = lossy_codec(self.codec)
        self.descriptor = layout_descriptor(llm, self.layout, compute, lossy)
        self.namespace = namespace_id(
            self.fingerprint, self.descriptor, self.chunk_tokens, self.config.tenant
        )
        self.chunk_bytes = self.layout.chunk_bytes(self.chunk_tokens)
        self._meta = {
            "tokens": self.chunk_tokens,
            "layout": self.descriptor,
            "dtype": self.descriptor["k_type"],
            "shape": [self.layout.n_layer, 2, self.chunk_tokens],
        }
        self.enabled = True
        self.store.check_chunk_bytes(self.chunk_bytes)
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
            "enabled": self.enabled,
            **asdict(self.stats),
            "saver": self._saver.snapshot(),
            "store": self.store.snapshot(),
            "namespace": self.namespace.hex(),
            "codec": self.codec,
            "prefill_tokens_per_s": self.prefill.tokens_per_s,
            "restore_tokens_per_s": self.restore_rate.tokens_per_s,
        }

    # known chunks: stored by us or seen in the mesh recently, so not stored again

    def _remember(self, keys: Sequence[bytes]) -> None:
        with self._known_lock:  # (re)set: its time to live starts now; the least recent go first
            for key in keys:
                self._known[key] = True

    def _forget(self, keys: Sequence[bytes]) -> None:
        with self._known_lock:
            for key in keys:
                self._known.pop(key, None)

    def _first_unknown(self, keys: Sequence[bytes]) -> int:
        with self._known_lock:
            for i, key in enumerate(keys):
                if key not in self._known:  # never seen, or longer than its time to live ago
                    return i
        return len(keys)

    # before prefill

    @property
    def prompt_tokens(self) -> int:
        """Length of the last prompt (the context before generation)."""
        return self._prompt_tokens

    def continue_prompt(self, tokens: Sequence[int]) -> None:
        """A ``reset=False`` call: ``tokens`` extend what the context holds (no restore)."""
        self._prompt_tokens = self.llm.n_tokens + len(tokens)

    def before_prefill(self, tokens: Sequence[int]) -> int:
        """Restore the longest cached chunk prefix of ``tokens`` the context lacks; tokens restored."""
        self._prompt_tokens = len(tokens)
        if not self.enabled:
            return 0
        restored = self._restore(tokens)
        have = max(restored, common_prefix(self.llm.input_ids[: self.llm.n_tokens], tokens))
        self._prefill_clock = (time.perf_counter(), len(tokens) - have)
        return restored

    def first_token(self) -> None:
        """The prompt is evaluated (the first token is out): measure the prefill rate."""
        if self._prefill_clock is not None:
            started, evaluated = self._prefill_clock
            self._prefill_clock = None
            self.prefill.observe(evaluated, time.perf_counter() - started)

    def _restore(self, tokens: Sequence[int]) -> int:
        assert self.layout is not None
        self.stats.requests += 1
        llm, c, g = self.llm, self.chunk_tokens, self.config.tail_tokens
        # restoring the whole prompt is fine: generate() evaluates its last token again
        reach = min(len(tokens), llm.n_ctx())
        n_full = reach // c
        tail_room = (reach - n_full * c) // g * g if g else 0
        best = n_full * c + tail_room  # the most that chunks and a tail could give
        have = common_prefix(llm.input_ids[: llm.n_tokens], tokens)
        if best == 0 or have >= best:
            return 0  # the context itself holds all that the mesh could give
        started = time.perf_counter()
        keys = chunk_keys(self.namespace, tokens[: n_full * c], c)
        self.stats.lookups += 1
        cost = self.prefill.cost(c, self.chunk_bytes) if self.config.cost_aware else None
        hits = self.store.lookup(keys, cost) if keys else 0
        looked_up = time.perf_counter()
        self.stats.lookup_seconds += looked_up - started
        tail = tail_key(keys[hits - 1] if hits else self.namespace) if g and hits * c + g <= reach else None
        wanted = tokens[hits * c : reach]  # what a tail after the hits could hold
        if hits * c + (len(wanted) if tail else 0) <= have:
            return 0
        with ExitStack() as leases:
            part: seqstate.Tail | None = None
            if tail is not None and hits * c <= have:
                # only the tail could add to what the context holds: see it before fetching chunks
                part = self._tail(leases.enter_context(self.store.read([tail], cost)), 0, wanted)
                if part is None or hits * c + part.used <= have:
                    return 0
                tail = None
            estimate = hits * c + (part.used if part else len(wanted) // g * g if tail else 0)
            if not self._worth_restoring(estimate, have):
                self.stats.skipped_restores += 1
                return 0
            lease = leases.enter_context(self.store.read(keys[:hits] + ([tail] if tail else []), cost))
            payloads = self._payloads(lease, hits)
            n = len(payloads)
            if n < hits:
                part = None  # a tail after a missing chunk belongs to no prefix we restore
            elif tail is not None:
                part = self._tail(lease, hits, wanted)
            fetched = time.perf_counter()
            self.stats.fetch_seconds += fetched - looked_up
            restoring = n * c + (part.used if part else 0)
            if restoring <= have:
                return 0
            blob = seqstate.join(self.layout, payloads, c, part)  # the one copy out of the lease
        restored = restore_sequence(llm, blob, tokens[:restoring])
        self.stats.restore_seconds += time.perf_counter() - fetched
        if not restored:
            self.stats.restore_failures += 1
            logger.warning("llama.cpp refused a restored blob of %d tokens; recomputing", restoring)
            return 0
        self.restore_rate.observe(restoring, time.perf_counter() - looked_up)
        self._remember(keys[:n])  # present in the mesh: no need to store them again
        self.stats.hit_requests += 1
        self.stats.hit_tokens += restoring
        self.stats.tail_tokens += part.used if part else 0
        return restoring

    def _worth_restoring(self, restoring: int, have: int) -> bool:
        """A restore replaces the whole sequence: worth it when computing what it adds to the
        context (``restoring - have`` tokens) takes longer than restoring all of it. Both
        rates are measured on this engine; until they are, restore."""
        prefill, restore = self.prefill.tokens_per_s, self.restore_rate.tokens_per_s
        if prefill is None or restore is None:
            return True
        return (restoring - have) / prefill > restoring / restore

    def _payloads(self, lease: Lease, count: int) -> list[memoryview]:
        """Payloads of the leading run of the lease's first ``count`` records that belong
        here, each verified (in place when they are views into the node's shared memory)."""
        payloads = []
        for i, record in enumerate(lease.records[:count]):
            if record is None:
                break
            h = record.header
            raw = h.codec == "raw"
            if (
                h.namespace != self.namespace
                or h.tokens != self.chunk_tokens
                or (raw and h.length != self.chunk_bytes)
            ):
                self._drop("chunk", h.key, "not of this model and layout")
                break
            refused = not_readable(h, self.codec)
            if refused:
                self._drop("chunk", h.key, refused)
                break
            payload = lease.payload(i)
            if payload is None:
                break  # failed its checksum (counted): recompute from here
            try:
                payload = memoryview(decoded(h, payload, self.chunk_bytes, self.geometry))
            except Exception as exc:  # a record that does not decode is a miss, never an error
                self._drop("chunk", h.key, str(exc))
                break
            payloads.append(payload)
        return payloads

    def _drop(self, kind: str, key: bytes, why: str) -> None:
        """A fetched record we will not use: counted, logged, recomputed instead."""
        self.stats.bad_chunks += 1
        logger.warning("dropping %s %s: %s", kind, key.hex(), why)

    def _tail(self, lease: Lease, i: int, wanted: Sequence[int]) -> seqstate.Tail | None:
        """The part of the lease's tail record ``i`` that agrees with ``wanted`` (the prompt
        after the restored chunks), in whole ``tail_tokens``; None if nothing of it serves."""
        assert self.layout is not None
        record = lease.records[i] if i < len(lease.records) else None
        if record is None:
            return None
        h = record.header
        if h.namespace != self.namespace or not 0 < h.tokens < self.chunk_tokens or h.codec in LOSSY:
            self._drop("tail", h.key, "not a tail of this model and layout")
            return None
        payload = lease.payload(i)
        if payload is None:
            return None
        try:  # tails are stored raw; a node may re-encode one (losslessly) for a slow link
            ids, kv = unpack_tail(
                decoded(h, payload, tail_bytes(h.tokens, self.layout.chunk_bytes(h.tokens)), None)
            )
        except Exception as exc:  # BadRequest, CodecError...: a miss, never an error
            self._drop("tail", h.key, str(exc))
            return None
        if len(ids) != h.tokens or len(kv) != self.layout.chunk_bytes(h.tokens):
            self._drop("tail", h.key, "its size does not match this layout")
            return None
        used = usable_tokens(ids, wanted, self.config.tail_tokens)
        return seqstate.Tail(kv, stored=len(ids), used=used) if used else None

    # after generation

    def after_generation(self) -> None:
        """Cut out the context's chunks and tails that are not stored yet and queue them for
        storing.

        Tails: the context's own (what the next turn of a chat continues), and, where the
        generated tokens filled the chunk the prompt ended in, the prompt's (what another
        request sharing the prompt's opening continues: that full chunk holds this answer).

        Runs on the caller's thread because only it may touch the context: it copies the
        sequence state once and cuts the new chunks right away, so the queue holds only
        what will be stored. Saves that would not fit the queue are dropped before copying.
        """
        if not self.enabled:
            return
        assert self.layout is not None
        llm, c = self.llm, self.chunk_tokens
        n_held = llm.n_tokens if self.config.save_completions else min(llm.n_tokens, self._prompt_tokens)
        n_full = n_held // c
        tokens = llm.input_ids[:n_held].tolist()
        keys = chunk_keys(self.namespace, tokens[: n_full * c], c)
        first = self._first_unknown(keys)
        new_keys = keys[first:]
        tails = self._new_tails(tokens, keys, min(self._prompt_tokens, n_held))
        if not new_keys and not tails:
            return
        nbytes = len(new_keys) * self.chunk_bytes + sum(self.layout.chunk_bytes(t.count) for t in tails)
        if not self._saver.has_room(nbytes):
            self._saver.count_dropped()
            return
        started = time.perf_counter()
        try:
            state = seqstate.parse(read_sequence(llm))
            if state.layout != self.layout:
                raise seqstate.BlobError(f"layout changed from {self.layout} to {state.layout}")
            payloads = seqstate.split(state, c, first, len(new_keys))
            for t in tails:
                t.payload = pack_tail(
                    tokens[t.start : t.start + t.count], seqstate.cut(state, t.start, t.count)
                )
        except Exception as exc:  # never fail the user's request over a save
            logger.warning("could not cut the KV to save it: %s: %s", type(exc).__name__, exc)
            return
        finally:
            self.stats.save_seconds += time.perf_counter() - started
        remembered = new_keys + [t.content for t in tails]
        self._remember(remembered)
        # Announced now, stored in the background: a request with this prefix on another
        # engine of the node hits at once (its fetch waits for the bytes) instead of recomputing.
        raw = self.codec == "raw"  # encoded chunks have other sizes: announced when they are put
        reservation = (
            self.store.reserve(new_keys, [self.chunk_bytes] * len(new_keys)) if new_keys and raw else None
        )
        if not self._saver.submit(lambda: self._save(new_keys, payloads, reservation, tails), nbytes):
            self._forget(remembered)
            self.store.cancel(reservation)

    def _new_tails(self, tokens: list[int], keys: list[bytes], prompt_end: int) -> list[_TailSave]:
        """The tails to store for a context of ``tokens`` (chunk ``keys``) whose prompt ended
        at ``prompt_end``: the context's, and the prompt's if it ended in an earlier chunk."""
        g, c = self.config.tail_tokens, self.chunk_tokens
        if not g:
            return []
        ends = [len(tokens)] if prompt_end // c == len(tokens) // c else [prompt_end, len(tokens)]
        tails = []
        for end in ends:
            k = end // c
            count = (end - k * c) // g * g
            if count == 0:
                continue
            key = tail_key(keys[k - 1] if k else self.namespace)
            content = hashlib.blake2b(
                key + tokens_to_bytes(tokens[k * c : k * c + count]), digest_size=16
            ).digest()
            if self._first_unknown([content]) == 0:  # not this very tail, stored lately
                tails.append(_TailSave(key, k * c, count, content))
        return tails

    def _save(
        self,
        keys: list[bytes],
        payloads: list[np.ndarray[Any, np.dtype[np.uint8]]],
        reservation: Reservation | None,
        tails: list[_TailSave],
    ) -> None:
        assert self.layout is not None
        try:
            # encoded here, off the request's path
            for codec, run_keys, run in encoded_runs(self.codec, keys, payloads, self.geometry):
                meta = codec_meta(self._meta, codec, self.chunk_bytes)
                self.store.put_payloads(run_keys, run, self.namespace, meta, reservation)
            for t in tails:  # raw: a tail is small, and its token ids lead its payload
                tail_meta = {**self._meta, "tokens": t.count, "shape": [self.layout.n_layer, 2, t.count]}
                self.store.put_payloads([t.key], [t.payload], self.namespace, tail_meta)
        except Exception:
            self._forget(keys + [t.content for t in tails])
            self.store.cancel(reservation)
            raise
        self.stats.saves += 1
        self.stats.saved_chunks += len(keys)
        self.stats.saved_tails += len(tails)
