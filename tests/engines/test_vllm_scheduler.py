"""The connector's scheduler side with vLLM's real Request objects and a real (embedded) node."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ..helpers import require

require("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from lmcache_mesh.engines.store import MeshStore, StoreConfig  # noqa: E402
from lmcache_mesh.engines.vllm.scheduler import SchedulerSide  # noqa: E402
from lmcache_mesh.node import ChunkRecord, NodeConfig, chunk_keys, namespace_id  # noqa: E402
from lmcache_mesh.node.config import StorageSettings  # noqa: E402

NS = namespace_id(b"weights", {"engine": "vllm"}, 64)
C, BS = 64, 32
MEMORY_ONLY = NodeConfig(storage=StorageSettings(memory_bytes=1 << 20, disk_bytes=0))


def request(rid: str, tokens: list[int], **kw: object) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), None, **kw)


@pytest.fixture
def side() -> SchedulerSide:
    store = MeshStore(StoreConfig(node_config=MEMORY_ONLY))
    return SchedulerSide(NS, C, BS, store)


def cache(side: SchedulerSide, tokens: list[int], chunks: int) -> None:
    keys = chunk_keys(NS, tokens, C)[:chunks]
    side.store.put([ChunkRecord.build(k, b"x" * 8, NS) for k in keys])


def step(
    new: list[tuple[str, list[int], int]] = (),
    cached: list[tuple[str, int]] = (),
    scheduled: dict[str, int] | None = None,
) -> SimpleNamespace:  # type: ignore[assignment]
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=n) for r, b, n in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _ in cached], resumed_req_ids=set(), new_block_ids=[None for _ in cached],
            num_computed_tokens=[n for _, n in cached],
        ),
        num_scheduled_tokens=scheduled or {},
    )  # fmt: skip


def test_hits_beyond_the_local_prefix_are_loaded_block_aligned(side: SchedulerSide) -> None:
    tokens = list(range(1, 201))  # 3 chunks and 8 tokens
    cache(side, tokens, 3)
    req = request("r1", tokens)
    assert side.matched_tokens(req, 0) == (192, False)
    assert side.matched_tokens(req, 64) == (128, False)  # vLLM already has the first chunk
    assert side.stats["lookups"] == 1  # asked again: answered from the first lookup
    side.after_alloc(req, list(range(10, 17)), 128)
    meta = side.build_meta(step([("r1", list(range(10, 17)), 192)], scheduled={"r1": 8}))
    (load,) = meta.loads
    assert (load.start, load.end, load.block_ids, len(load.tokens)) == (64, 192, list(range(10, 17)), 192)
    assert meta.saves == []  # all three chunks are in the mesh already
    assert side.build_meta(step()).loads == []  # loads go out once


@pytest.mark.parametrize(
    "async_loads, between_steps", [("remote", False), ("always", True), ("never", False)]
)
def test_hits_load_between_steps_as_configured(
    side: SchedulerSide, async_loads: str, between_steps: bool
) -> None:
    """A hit this node holds itself loads inside the step unless "always"; the answer holds
    while the request waits, and goes into its load."""
    side = SchedulerSide(NS, C, BS, side.store, async_loads=async_loads)
    tokens = list(range(1, 201))
    cache(side, tokens, 3)
    req = request("r1", tokens)
    assert side.matched_tokens(req, 0) == (192, between_steps)
    assert side.matched_tokens(req, 64) == (128, between_steps)
    side.after_alloc(req, list(range(10, 17)), 192)
    (load,) = side.build_meta(step()).loads
    assert load.asynchronous is between_steps
    assert side.matched_tokens(request("miss", list(range(500, 700))), 0) == (0, False)  # nothing to load


@pytest.mark.parametrize("held", [True, False])
def test_a_prompt_vllm_covers_is_not_looked_up_and_its_last_chunk_saved_once(
    side: SchedulerSide, held: bool
) -> None:
    tokens = list(range(1, 257))  # 4 chunks; vLLM's prefix cache has all but its last block
    if held:
        cache(side, tokens, 4)
    req = request("warm", tokens)
    assert side.matched_tokens(req, 224) == (0, False)
    assert side.stats["lookups"] == 0
    blocks = list(range(30, 38))
    side.after_alloc(req, blocks, 0)
    meta = side.build_meta(step([("warm", blocks, 224)], scheduled={"warm": 32}))
    assert [(s.first, s.count) for s in meta.saves] == ([] if held else [(3, 1)])
    # asked again: this engine just saved that chunk, so neither a save nor a question to the node
    side.store.close()
    again = request("again", tokens)
    assert side.matched_tokens(again, 224) == (0, False)
    side.after_alloc(again, blocks, 0)
    assert side.build_meta(step([("again", blocks, 224)], scheduled={"again": 32})).saves == []


def test_a_fully_cached_prompt_leaves_its_last_block_to_compute(side: SchedulerSide) -> None:
    tokens = list(range(1, 193))  # exactly 3 chunks
    cache(side, tokens, 3)
    assert side.matched_tokens(request("r", tokens), 0) == (160, False)


def test_chunks_are_saved_once_as_chunked_prefill_completes_them(side: SchedulerSide) -> None:
    tokens = list(range(1, 201))
    req = request("r", tokens)
    assert side.matched_tokens(req, 0) == (0, False)
    blocks = list(range(20, 27))
    side.after_alloc(req, blocks, 0)
    first = side.build_meta(step([("r", blocks, 0)], scheduled={"r": 100}))  # prefill 0..99
    assert [(s.first, s.count) for s in first.saves] == [(0, 1)]
    second = side.build_meta(step(cached=[("r", 100)], scheduled={"r": 101}))  # 100..200 done
    assert [(s.first, s.count, len(s.tokens), s.block_ids) for s in second.saves] == [(1, 2, 192, blocks[:6])]
    assert side.build_meta(step(cached=[("r", 201)], scheduled={"r": 1})).saves == []  # decode: nothing new


def test_requests_whose_kv_depends_on_more_than_tokens_stay_out(side: SchedulerSide) -> None:
    tokens = list(range(1, 201))
    cache(side, tokens, 3)
    assert side.matched_tokens(request("salted", tokens, cache_salt="tenant-b"), 0) == (0, False)
    assert side.stats["lookups"] == 0


def test_chunk_size_must_be_whole_blocks(side: SchedulerSide) -> None:
    with pytest.raises(ValueError, match="multiple of the block size"):
        SchedulerSide(NS, 48, 32, side.store)


def test_lookups_carry_the_engines_recompute_cost_and_loads_keep_it() -> None:
    from lmcache_mesh.engines.prefill import PrefillRate

    store = MeshStore(StoreConfig(node_config=MEMORY_ONLY))
    side = SchedulerSide(NS, C, BS, store, PrefillRate(configured=640.0), chunk_bytes=8)
    tokens = list(range(1, 201))
    cache(side, tokens, 3)
    req = request("r1", tokens)
    assert side.matched_tokens(req, 0) == (192, False)  # local chunks always beat recomputing
    side.after_alloc(req, list(range(7)), 192)
    (load,) = side.build_meta(step()).loads
    assert load.recompute_s == pytest.approx(C / 640.0)


def test_the_prefill_rate_is_measured_from_step_times() -> None:
    import time

    from lmcache_mesh.engines.prefill import PrefillRate

    store = MeshStore(StoreConfig(node_config=MEMORY_ONLY))
    side = SchedulerSide(NS, C, BS, store, PrefillRate(), chunk_bytes=8)
    side.build_meta(step(scheduled={"a": 512}))
    time.sleep(0.1)
    side.build_meta(step(scheduled={"a": 1}))  # the 512-token step took ~0.1 s
    rate = side.prefill.tokens_per_s if side.prefill else None
    assert rate is not None and 1000 < rate < 5200
    time.sleep(0.05)
    side.build_meta(step(scheduled={"b": 512}))  # a 1-token step is no measurement
    assert side.prefill is not None and side.prefill.tokens_per_s == rate


def cache_chain(side: SchedulerSide, tokens: list[int], records: int) -> None:
    from lmcache_mesh.engines.vllm.chain import Chain

    keys = Chain.of(NS, tokens, C, BS).keys[:records]
    side.store.put([ChunkRecord.build(k, b"x" * 8, NS) for k in keys])


def test_a_hit_reaches_down_to_the_last_whole_block_after_the_chunks(side: SchedulerSide) -> None:
    tokens = list(range(1, 3 * C + BS + 9))  # 3 chunks, 1 whole block, 8 more
    cache_chain(side, tokens, 4)
    assert side.matched_tokens(request("r", tokens), 0) == (3 * C + BS, False)  # recomputes 8
    differs = tokens[: 3 * C + 5] + [9999] + tokens[3 * C + 6 :]  # inside the tail block
    assert side.matched_tokens(request("d", differs), 0) == (3 * C, False)
    side.after_alloc(request("r", tokens), list(range(10, 18)), 3 * C + BS)
    (load,) = side.build_meta(step()).loads
    assert (load.start, load.end, len(load.tokens)) == (0, 3 * C + BS, 3 * C + BS)
    off = SchedulerSide(NS, C, BS, side.store, tails=False)
    assert off.matched_tokens(request("o", tokens), 0) == (3 * C, False)


def test_the_tail_blocks_a_prefill_completes_are_saved_after_its_chunks(side: SchedulerSide) -> None:
    tokens = list(range(1, 2 * C + BS + 4))  # 2 chunks, 1 whole block, 3 more
    req = request("r", tokens)
    assert side.matched_tokens(req, 0) == (0, False)
    blocks = list(range(40, 46))
    side.after_alloc(req, blocks, 0)
    meta = side.build_meta(step([("r", blocks, 0)], scheduled={"r": len(tokens)}))
    assert [(s.first, s.count, len(s.tokens), s.block_ids) for s in meta.saves] == [
        (0, 3, 2 * C + BS, blocks[:5])
    ]
    # the next turn's prompt extends this one: its chain starts with the same two chunks
    from lmcache_mesh.engines.vllm.chain import Chain

    longer = Chain.of(NS, tokens + list(range(500, 600)), C, BS)
    assert longer.keys[:2] == Chain.of(NS, tokens, C, BS).keys[:2]
