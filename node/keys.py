"""Namespaces and chained chunk keys.

A namespace id names the only set of engines that may share KV: same model weights, same
KV layout, same chunk size, same tenant. A chunk key names one chunk of tokens *and the
whole prefix before it*, because each key hashes the previous key with the chunk's tokens:

    k_0 = H(ns || tokens[0:C]),   k_i = H(k_{i-1} || tokens[iC:(i+1)C])

with H = blake2b, 16-byte digest, tokens as little-endian int32. Nothing here depends on
Python's ``hash``, the process or the machine.

The tokens after the last full chunk (a *tail*, fewer than C) are stored under one more key,
``tail_key(k_{n-1})`` (``tail_key(ns)`` for a prompt shorter than a chunk): blake2b with its
own personalization, so no tail key can equal a chunk key, and it names the whole prefix
before the tail. One tail per prefix chain: a later tail after the same chain replaces it,
so stored tails stay O(prompt). The tail's own tokens travel in its payload (see
:mod:`lmcache_mesh.node.tails`), where readers check them against their prompt.

Engines with blocks (vLLM) store a tail as whole blocks instead, each under a chained *block
key*, ``b_1 = H'(k_{n-1} || block_1)``, ``b_j = H'(b_{j-1} || block_j)`` (H' = blake2b with a
third personalization): a key again names its whole prefix, so a LOOKUP of the chain tells
how far a prompt is cached, down to the block, without fetching anything.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

KEY_BYTES = 16
"""Length of namespace ids and chunk keys in bytes (blake2b-128)."""

_INT32 = struct.Struct("<i")
_TAIL_PERSON = b"lmcache-tail-v1"
_BLOCK_PERSON = b"lmcache-tblk-v1"


def _canonical(value: Any, where: str) -> Any:
    """``value`` with mapping keys sorted, so equal descriptors encode to equal bytes."""
    if isinstance(value, Mapping):
        items = []
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"{where}: mapping keys must be str, got {k!r}")
            items.append(k)
        return {k: _canonical(value[k], f"{where}.{k}") for k in sorted(items)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[]") for v in value]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not allowed in a namespace descriptor")


def namespace_id(
    model_fingerprint: bytes,
    layout: Mapping[str, Any],
    chunk_tokens: int = 256,
    tenant: str | bytes | None = None,
) -> bytes:
    """The 16-byte namespace id for a model, its KV layout, a chunk size and a tenant.

    ``model_fingerprint`` must digest the model's weights and metadata (not its file name).
    ``layout`` describes the engine's KV layout: engine kind, dtype, n_layers, n_kv_heads,
    head_dim, block/V layout. Any difference in any of these gives another namespace.
    """
    if not isinstance(model_fingerprint, (bytes, bytearray)) or not model_fingerprint:
        raise ValueError("model_fingerprint must be non-empty bytes (a digest of the model's weights)")
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if tenant is not None and not isinstance(tenant, (str, bytes)):
        raise TypeError(f"tenant must be str, bytes or None, got {type(tenant).__name__}")
    descriptor = {
        "chunk_tokens": chunk_tokens,
        "fingerprint": bytes(model_fingerprint),
        "layout": _canonical(layout, "layout"),
        "tenant": tenant,
    }
    packed = msgpack.packb(descriptor, use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=KEY_BYTES).digest()


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    """Tokens as little-endian int32; raises ValueError for ids outside int32."""
    try:
        return struct.pack(f"<{len(tokens)}i", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must be ints in the int32 range: {exc}") from exc


def chunk_keys(namespace: bytes, tokens: Sequence[int], chunk_tokens: int = 256) -> list[bytes]:
    """Chained keys for every *full* chunk of ``tokens``; a partial tail gets no key."""
    if len(namespace) != KEY_BYTES:
        raise ValueError(f"namespace must be {KEY_BYTES} bytes, got {len(namespace)}")
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if hasattr(tokens, "tolist"):  # numpy arrays and torch tensors, without importing either
        tokens = tokens.tolist()
    n_full = len(tokens) // chunk_tokens
    data = tokens_to_bytes(tokens[: n_full * chunk_tokens])
    step = chunk_tokens * _INT32.size
    keys: list[bytes] = []
    prev = bytes(namespace)
    for i in range(n_full):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        h.update(data[i * step : (i + 1) * step])
        prev = h.digest()
        keys.append(prev)
    return keys


def tail_key(prev: bytes) -> bytes:
    """The key of the tail after the chunk chain ending in key ``prev`` (or after nothing:
    ``prev`` = the namespace id)."""
    if len(prev) != KEY_BYTES:
        raise ValueError(f"prev must be a {KEY_BYTES}-byte chunk key or namespace id, got {len(prev)} bytes")
    return hashlib.blake2b(prev, digest_size=KEY_BYTES, person=_TAIL_PERSON).digest()


def block_keys(prev: bytes, tokens: Sequence[int], block_tokens: int) -> list[bytes]:
    """Chained keys of every *full* block of ``tokens``, the tail after the chunk chain
    ending in key ``prev`` (the namespace id for a prompt shorter than a chunk)."""
    if len(prev) != KEY_BYTES:
        raise ValueError(f"prev must be a {KEY_BYTES}-byte chunk key or namespace id, got {len(prev)} bytes")
    if not isinstance(block_tokens, int) or block_tokens <= 0:
        raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    keys: list[bytes] = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES, person=_BLOCK_PERSON)
        h.update(tokens_to_bytes(tokens[start : start + block_tokens]))
        prev = h.digest()
        keys.append(prev)
    return keys
