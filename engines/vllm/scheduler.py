"""The scheduler side of ``MeshConnector``: how much of a prompt the mesh holds, and what to move.

It runs in vLLM's engine-core process and never touches KV. Per request it remembers the
mesh's answer for the prompt's record chain (its whole chunks, then its tail as whole blocks:
:class:`~lmcache_mesh.engines.vllm.chain.Chain`; asked once: vLLM may ask again while a
request waits), the request's blocks, and how many records are known stored. Each step it
tells the workers which tokens to load (a hit just allocated) and which newly computed
records to save.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..prefill import PrefillRate
from ..store import MeshStore
from .chain import Chain
from .metadata import LoadSpec, MeshConnectorMetadata, SaveSpec

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    prompt: list[int]
    chain: Chain
    """the prompt's records: whole chunks, then whole tail blocks"""
    hits: int
    """leading records the mesh held at lookup"""
    local_computed: int = 0
    """tokens vLLM had itself (prefix cache) when it asked"""
    block_ids: list[int] = field(default_factory=list)
    stored: int = 0
    """leading records known stored (mesh hits, then our saves)"""
    recompute_s: float = 0.0
    asynchronous: bool = False
    """the hit loads between steps"""


def reusable(request: Any) -> bool:
    """Requests whose KV depends on more than their tokens (LoRA, salts, images, embeddings) stay out."""
    return not (
        getattr(request, "lora_request", None)
        or getattr(request, "cache_salt", None)
        or getattr(request, "mm_features", None)
        or getattr(request, "prompt_embeds", None) is not None
        or not getattr(request, "prompt_token_ids", None)
    )


REMEMBERED_KEYS = 1 << 16
"""Chunk keys the scheduler side remembers as stored (about 5 MB): a prompt vLLM's own cache
covers neither re-saves them nor asks the node about them. One the node has since evicted is
only a later miss."""

STEP_OUTLIER = 4.0
"""A step slower than this many times the current estimate is not a prefill measurement
(the engine sat idle between steps)."""


class SchedulerSide:
    """``prefill`` (with ``chunk_bytes``): send the engine's recompute cost with lookups, so
    the mesh advises loading only chunks that are faster to fetch than to recompute. Without
    a configured rate it is measured here: tokens scheduled in a step over the time until
    the next step is built (steps of at least ``MIN_MEASURED_TOKENS`` tokens)."""

    def __init__(
        self,
        namespace: bytes,
        chunk_tokens: int,
        block_size: int,
        store: MeshStore,
        prefill: PrefillRate | None = None,
        chunk_bytes: int = 0,
        async_loads: str = "remote",
        tails: bool = True,
    ) -> None:
        if chunk_tokens % block_size:
            raise ValueError(
                f"chunk_tokens ({chunk_tokens}) must be a multiple of the block size ({block_size})"
            )
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self.store = store
        self._tracked: dict[str, _Tracked] = {}
        self._loads: list[LoadSpec] = []
        self.prefill = prefill
        self.chunk_bytes = chunk_bytes
        self.async_loads = async_loads
        self.tails = tails
        """reuse past the last whole chunk, down to the last whole block"""
        self._known: OrderedDict[bytes, None] = OrderedDict()
        """chunk keys known stored lately (saved by this engine, or found on the node): the
        last ``REMEMBERED_KEYS``"""
        self._last_step: tuple[float, int] | None = None
        self.stats = {"lookups": 0, "hit_tokens": 0, "loads": 0, "saved_chunks": 0}

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens the mesh can supply beyond the ``num_computed_tokens`` vLLM has, and whether
        they load between steps (``async_loads``)."""
        if not reusable(request):
            return 0, False
        tracked = self._tracked.get(request.request_id)
        most = (request.num_tokens - 1) // self.block_size * self.block_size
        if tracked is None:
            prompt = list(request.prompt_token_ids)
            c = self.chunk_tokens
            chain = Chain.of(self.namespace, prompt, c, self.block_size, self.tails)
            if num_computed_tokens >= most:
                tracked = self._covered(prompt, chain, num_computed_tokens)
            else:
                cost = self.prefill.cost(c, self.chunk_bytes) if self.prefill is not None else None
                hits = self.store.lookup(chain.keys, cost) if chain.keys else 0
                self.stats["lookups"] += 1
                tracked = _Tracked(prompt, chain, hits, stored=hits)
                tracked.recompute_s = cost.recompute_s if cost is not None else 0.0
                tracked.asynchronous = hits > 0 and self._between_steps(chain.keys[:hits])
            self._tracked[request.request_id] = tracked
        tracked.local_computed = num_computed_tokens
        matched = tracked.chain.end(tracked.hits)
        if matched >= request.num_tokens:
            # vLLM must compute at least one token; keep the hit block-aligned, so no block is
            # left half loaded (vLLM recomputes the prompt's last block instead).
            matched = most
        new = max(0, matched - num_computed_tokens)
        return new, new > 0 and tracked.asynchronous

    def _covered(self, prompt: list[int], chain: Chain, computed: int) -> _Tracked:
        """vLLM's own prefix cache covers all that a hit could: no lookup (its records were
        saved when this engine computed them). Only a record that the cache covers in part may
        be new; it is saved unless known stored, or this node holds it (a LOOKUP of it here)."""
        stored = chain.within(computed)
        rest = chain.keys[stored:]
        if rest and all(k in self._known for k in rest):
            stored += len(rest)  # saved by this engine or found on the node lately: no need to ask
        elif rest:
            held = self.store.lookup(rest, local=True)
            self._remember(rest[:held])
            stored += held
        return _Tracked(prompt, chain, 0, stored=stored)

    def _between_steps(self, hit: list[bytes]) -> bool:
        """Whether a hit loads between steps: with "remote", when some of it is on peers only
        (one more LOOKUP, of this node alone)."""
        if self.async_loads != "remote":
            return self.async_loads == "always"
        return self.store.lookup(hit, local=True) < len(hit)

    def after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            return
        tracked.block_ids = list(block_ids)
        if num_external_tokens > 0:
            start = tracked.local_computed
            end = start + num_external_tokens
            last_record_end = tracked.chain.end(tracked.chain.at(end - 1) + 1)
            self._loads.append(
                LoadSpec(
                    request.request_id,
                    tracked.prompt[:last_record_end],
                    list(block_ids),
                    start,
                    end,
                    tracked.recompute_s,
                    tracked.asynchronous,
                )
            )
            self.stats["loads"] += 1
            self.stats["hit_tokens"] += num_external_tokens

    def build_meta(self, scheduler_output: Any) -> MeshConnectorMetadata:
        meta = MeshConnectorMetadata(loads=self._loads)
        self._loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        self._time_step(sum(scheduled.values()))
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._plan_save(
                    meta, new.req_id, tracked, new.num_computed_tokens + scheduled.get(new.req_id, 0)
                )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:  # preempted: its blocks were replaced
                    tracked.block_ids = list(new_blocks[0])
                else:
                    tracked.block_ids.extend(new_blocks[0])
            self._plan_save(meta, req_id, tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _time_step(self, tokens: int) -> None:
        """The previous step ran from its build to now: measure the prefill rate from it."""
        now = time.perf_counter()
        last, self._last_step = self._last_step, (now, tokens)
        prefill = self.prefill
        if last is None or prefill is None or prefill.configured is not None:
            return
        started, n = last
        rate = prefill.tokens_per_s
        if rate is not None and now - started > STEP_OUTLIER * n / rate:
            return
        prefill.observe(n, now - started)

    def _plan_save(self, meta: MeshConnectorMetadata, req_id: str, tracked: _Tracked, computed: int) -> None:
        """Save the prompt records this step completes (whole chunks and whole tail blocks,
        each once)."""
        chain = tracked.chain
        full = chain.within(min(computed, len(tracked.prompt)))
        if full <= tracked.stored:
            return
        end = chain.end(full)
        meta.saves.append(
            SaveSpec(
                req_id,
                tracked.prompt[:end],
                tracked.block_ids[: end // self.block_size],
                tracked.stored,
                full - tracked.stored,
            )
        )
        self.stats["saved_chunks"] += full - tracked.stored
        self._remember(chain.keys[tracked.stored : full])
        tracked.stored = full

    def _remember(self, keys: list[bytes]) -> None:
        for key in keys:
            self._known[key] = None
            self._known.move_to_end(key)
        while len(self._known) > REMEMBERED_KEYS:
            self._known.popitem(last=False)

    def finished(self, request: Any) -> None:
        self._tracked.pop(request.request_id, None)
