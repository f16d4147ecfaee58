"""Namespaces and chained chunk keys."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lmcache_mesh.node import chunk_keys, namespace_id, tail_key

LAYOUT = {
    "engine": "llama.cpp",
    "dtype": "f16",
    "n_layers": 8,
    "n_kv_heads": 4,
    "head_dim": 64,
    "v_trans": True,
}


def test_namespace_is_16_bytes_and_stable() -> None:
    ns = namespace_id(b"\x01" * 32, LAYOUT, 256)
    assert len(ns) == 16
    # Golden values: if these change, every cache on disk and in every mesh is orphaned.
    assert ns.hex() == "60390364cd7054d2c761b529fad9f6c5"
    assert chunk_keys(ns, list(range(512)), 256)[1].hex() == "ad5fbd05403c36784ea7297117ce8cec"
    # Key order in the layout does not matter.
    assert ns == namespace_id(b"\x01" * 32, dict(reversed(list(LAYOUT.items()))), 256)


@pytest.mark.parametrize(
    "change",
    [
        {"model_fingerprint": b"\x02" * 32},
        {"layout": {**LAYOUT, "v_trans": False}},
        {"layout": {**LAYOUT, "dtype": "q8_0"}},
        {"chunk_tokens": 128},
        {"tenant": "acme"},
    ],
)
def test_namespace_changes_with_every_component(change: dict[str, object]) -> None:
    base = {"model_fingerprint": b"\x01" * 32, "layout": LAYOUT, "chunk_tokens": 256, "tenant": None}
    assert namespace_id(**base) != namespace_id(**{**base, **change})  # type: ignore[arg-type]


def test_chunk_keys_follow_the_chain_definition() -> None:
    import hashlib
    import struct

    ns = namespace_id(b"fp", LAYOUT, 4)
    tokens = list(range(100, 111))  # 2 full chunks of 4, tail of 3
    keys = chunk_keys(ns, tokens, 4)
    k0 = hashlib.blake2b(ns + struct.pack("<4i", *tokens[0:4]), digest_size=16).digest()
    k1 = hashlib.blake2b(k0 + struct.pack("<4i", *tokens[4:8]), digest_size=16).digest()
    assert keys == [k0, k1]


def test_only_full_chunks_get_keys() -> None:
    ns = namespace_id(b"fp", LAYOUT, 4)
    assert chunk_keys(ns, [1, 2, 3], 4) == []
    assert len(chunk_keys(ns, list(range(8)), 4)) == 2
    assert len(chunk_keys(ns, list(range(11)), 4)) == 2


def test_key_depends_on_the_whole_prefix() -> None:
    ns = namespace_id(b"fp", LAYOUT, 4)
    a = chunk_keys(ns, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = chunk_keys(ns, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second chunk, different prefix
    c = chunk_keys(ns, [1, 2, 3, 4, 5, 6, 7, 9], 4)
    assert a[0] == c[0] and a[1] != c[1]


def test_numpy_and_list_tokens_agree() -> None:
    ns = namespace_id(b"fp", LAYOUT, 16)
    tokens = list(range(64))
    assert chunk_keys(ns, np.array(tokens, dtype=np.int64), 16) == chunk_keys(ns, tokens, 16)


def test_token_outside_int32_is_rejected() -> None:
    ns = namespace_id(b"fp", LAYOUT, 2)
    with pytest.raises(ValueError, match="int32"):
        chunk_keys(ns, [1, 2**31], 2)


def test_bad_arguments_have_clear_errors() -> None:
    with pytest.raises(ValueError, match="model_fingerprint"):
        namespace_id(b"", LAYOUT)
    with pytest.raises(ValueError, match="chunk_tokens"):
        namespace_id(b"fp", LAYOUT, 0)
    with pytest.raises(TypeError, match="layout.bad"):
        namespace_id(b"fp", {"bad": object()})
    with pytest.raises(ValueError, match="16 bytes"):
        chunk_keys(b"short", [1, 2], 2)


def test_keys_are_identical_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from lmcache_mesh.node import namespace_id, chunk_keys\n"
        f"ns = namespace_id(b'fp', {LAYOUT!r}, 8, tenant='t')\n"
        "print(','.join(k.hex() for k in chunk_keys(ns, list(range(40)), 8)))\n"
    )
    here = chunk_keys(namespace_id(b"fp", LAYOUT, 8, tenant="t"), list(range(40)), 8)
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out.split(",") == [k.hex() for k in here]


def test_a_tail_key_names_its_prefix_and_is_never_a_chunk_key() -> None:
    ns = namespace_id(b"fp", {"engine": "test"}, chunk_tokens=1)
    tokens = list(range(64))
    keys = chunk_keys(ns, tokens, 1)
    tails = [tail_key(ns), *(tail_key(k) for k in keys)]
    assert len(set(tails)) == len(tails) and not set(tails) & set(keys)
    assert tail_key(keys[3]) == tail_key(chunk_keys(ns, tokens[:4], 1)[-1])  # depends on the prefix only
    assert tail_key(chunk_keys(ns, [9, *tokens[1:4]], 1)[-1]) != tail_key(keys[3])
    with pytest.raises(ValueError, match="16-byte"):
        tail_key(b"short")


def test_block_keys_chain_after_the_last_chunk_and_never_equal_chunk_or_tail_keys() -> None:
    from lmcache_mesh.node.keys import block_keys

    ns = namespace_id(b"w", {"engine": "vllm"}, 64)
    tokens = list(range(1, 64 + 3 * 16 + 5))
    (chunk,) = chunk_keys(ns, tokens, 64)
    blocks = block_keys(chunk, tokens[64:], 16)
    assert len(blocks) == 3  # whole blocks only: the last 5 tokens get no key
    assert block_keys(chunk, tokens[64 : 64 + 32], 16) == blocks[:2]  # a prefix of the chain
    other = tokens[: 64 + 20] + [999] + tokens[64 + 21 :]
    assert (
        block_keys(chunk, other[64:], 16)[0] == blocks[0]
        and block_keys(chunk, other[64:], 16)[1] != blocks[1]
    )
    assert block_keys(ns, tokens[:64], 16)[0] not in chunk_keys(ns, tokens, 16)  # other personalization
    assert blocks[0] != tail_key(chunk)
    assert (
        block_keys(chunk_keys(ns, [7] + tokens[1:], 64)[0], tokens[64:], 16)[0] != blocks[0]
    )  # names its prefix
