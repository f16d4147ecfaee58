"""vLLM KV events: both encodings decoded, blocks chained into our chunk keys."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from lmcache_mesh.engines.vllm.events import BlockChain, EventFormatError, KVEvent, block_id, decode_batch
from lmcache_mesh.node import chunk_keys, namespace_id

NS = namespace_id(b"model", {"engine": "vllm"}, 64)
BS = 32
TOKENS = list(range(100, 100 + 6 * BS))  # 6 blocks = 3 chunks of 64


def h(i: int) -> int:
    return int.from_bytes(hashlib.sha256(str(i).encode()).digest()[-8:], "big")


def stored(first: int, count: int, parent: int | None) -> KVEvent:
    return KVEvent(
        "BlockStored",
        {
            "block_hashes": [h(i) for i in range(first, first + count)],
            "parent_block_hash": parent,
            "token_ids": TOKENS[first * BS : (first + count) * BS],
            "block_size": BS,
            "medium": "GPU",
        },
    )


def test_map_and_array_encodings_decode_alike() -> None:
    as_map = {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None, "token_ids": [5] * 64, "block_size": 32, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": [None, None], "group_idx": 0}  # fmt: skip
    as_array = ["BlockStored", [1, 2], None, [5] * 64, 32, None, "GPU", None]
    for events in ([as_map, {"type": "AllBlocksCleared"}], [as_array, ["AllBlocksCleared"]]):
        ts, decoded = decode_batch(msgpack.packb([1.5, events, 0]))
        assert ts == 1.5 and [e.type for e in decoded] == ["BlockStored", "AllBlocksCleared"]
        assert decoded[0].fields["block_hashes"] == [1, 2] and decoded[0].fields["block_size"] == 32


def test_raw_digest_hashes_become_their_last_eight_bytes() -> None:
    digest = bytes(range(32))
    assert block_id(digest) == int.from_bytes(digest[-8:], "big")
    assert block_id(2**70 + 5) == (2**70 + 5) & (2**64 - 1)


@pytest.mark.parametrize(
    "payload", [b"\xc1", msgpack.packb({"ts": 1}), msgpack.packb([1.0, [42]]), msgpack.packb(7)]
)
def test_garbage_batches_are_refused(payload: bytes) -> None:
    with pytest.raises(EventFormatError):
        decode_batch(payload)


def test_stored_blocks_yield_our_chunk_keys_and_removals_take_them_back() -> None:
    chain = BlockChain(NS, 64)
    keys = chunk_keys(NS, TOKENS, 64)
    add, _ = chain.apply(stored(0, 3, None))  # blocks 0-2: chunk 0 complete, chunk 1 half
    assert add == keys[:1]
    add, _ = chain.apply(stored(3, 3, h(2)))  # blocks 3-5 continue from block 2
    assert add == keys[1:3] and len(chain) == 3
    _, removed = chain.apply(KVEvent("BlockRemoved", {"block_hashes": [h(5), h(4)], "medium": "GPU"}))
    assert removed == [keys[2]]  # block 5 completed chunk 2; block 4 completed nothing
    _, removed = chain.apply(KVEvent("AllBlocksCleared"))
    assert sorted(removed) == sorted(keys[:2]) and len(chain) == 0


def test_blocks_we_cannot_place_are_skipped_not_guessed() -> None:
    chain = BlockChain(NS, 64)
    assert chain.apply(stored(2, 2, h(1))) == ([], [])  # parent never seen
    lora = stored(0, 2, None)
    lora.fields["lora_name"] = "adapter"
    assert chain.apply(lora) == ([], [])
    offloaded = stored(0, 2, None)
    offloaded.fields["medium"] = "CPU"
    assert chain.apply(offloaded) == ([], [])
    assert chain.skipped == 6


def test_a_block_reported_twice_is_still_removed_once() -> None:
    chain = BlockChain(NS, 64)
    keys = chunk_keys(NS, TOKENS, 64)
    assert chain.apply(stored(0, 2, None))[0] == keys[:1]
    assert chain.apply(stored(0, 2, None))[0] == []  # vLLM re-reports cached blocks
    _, removed = chain.apply(KVEvent("BlockRemoved", {"block_hashes": [h(0), h(1)], "medium": "GPU"}))
    assert removed == keys[:1] and len(chain) == 0
