"""Tail payloads: their token ids travel with their KV, and readers use only what agrees."""

from __future__ import annotations

import numpy as np
import pytest

from lmcache_mesh.node import BadRequest
from lmcache_mesh.node.tails import pack_tail, unpack_tail, usable_tokens


def test_a_tail_payload_gives_back_its_tokens_and_kv() -> None:
    kv = np.arange(40, dtype=np.uint8)
    ids, rest = unpack_tail(pack_tail([5, -1, 70000], kv))
    assert ids.tolist() == [5, -1, 70000] and bytes(rest) == kv.tobytes()


@pytest.mark.parametrize(
    "payload", [b"", b"\x01\x00", b"\x00\x00\x00\x00rest", b"\x05\x00\x00\x00\x01\x00\x00\x00"]
)
def test_malformed_tail_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(BadRequest, match="tail payload"):
        unpack_tail(payload)


def test_only_the_agreeing_prefix_is_usable_in_whole_granules() -> None:
    stored = np.array(range(100, 140), dtype=np.int32)  # 40 tokens
    assert usable_tokens(stored, list(range(100, 200)), 16) == 32  # all agree: 40 -> 32
    assert usable_tokens(stored, list(range(100, 120)), 16) == 16  # the prompt ends after 20
    assert usable_tokens(stored, [*range(100, 117), 0, *range(118, 140)], 16) == 16  # differs at 17
    assert usable_tokens(stored, [*range(100, 110), 0], 16) == 0  # differs before one granule
    assert usable_tokens(stored, [*range(100, 117), 0], 1) == 17
    assert usable_tokens(stored, [], 16) == 0
