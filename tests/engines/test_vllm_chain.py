"""A prompt's record chain on vLLM: whole chunks, then whole tail blocks."""

from __future__ import annotations

from lmcache_mesh.engines.vllm.chain import Chain
from lmcache_mesh.node import chunk_keys, namespace_id

NS = namespace_id(b"weights", {"engine": "vllm"}, 64)


def test_a_chain_is_whole_chunks_then_whole_blocks() -> None:
    tokens = list(range(1, 64 * 2 + 32 * 1 + 10))  # 2 chunks, 1 whole block, 9 more tokens
    chain = Chain.of(NS, tokens, 64, 32)
    assert len(chain) == 3 and chain.chunks == 2 and chain.keys[:2] == chunk_keys(NS, tokens, 64)
    assert [chain.start(i) for i in range(4)] == [0, 64, 128, 160]
    assert [chain.tokens(i) for i in range(3)] == [64, 64, 32]
    assert [chain.within(n) for n in (0, 63, 64, 150, 160, 200)] == [0, 0, 1, 2, 3, 3]
    assert [chain.at(t) for t in (0, 63, 64, 128, 159)] == [0, 0, 1, 2, 2]
    assert Chain.of(NS, tokens, 64, 32, tails=False).keys == chain.keys[:2]
    # a chain cut at a record's end holds the same keys: saves and loads name the same records
    assert Chain.of(NS, tokens[:160], 64, 32).keys == chain.keys
    assert Chain.of(NS, tokens[:128], 64, 32).keys == chain.keys[:2]


def test_a_prompt_shorter_than_a_chunk_is_all_tail_blocks() -> None:
    chain = Chain.of(NS, list(range(1, 70)), 64, 32)
    assert chain.chunks == 1 and len(chain) == 1  # 69 tokens: one chunk, 5 left (no whole block)
    short = Chain.of(NS, list(range(1, 50)), 64, 16)
    assert short.chunks == 0 and len(short) == 3 and short.within(48) == 3
