"""Tail payloads: the tokens of a partial last chunk, then their KV.

A tail record (key :func:`~lmcache_mesh.node.keys.tail_key`, header ``tokens`` = its token
count, always fewer than a chunk's) carries its own token ids in front of the engine's KV
bytes, inside the checksummed payload::

    u32 n, n x i32 token ids (little-endian), KV bytes of those n tokens

Its key names the prefix before it; the ids say which tokens it holds, so a reader uses the
tail only as far as it agrees with its own prompt (:func:`usable_tokens`), and a tail
written by another continuation of the same prefix is never taken for this one.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from lmcache_mesh.mesh.errors import BadRequest

_COUNT = struct.Struct("<I")


def pack_tail(tokens: Sequence[int] | npt.NDArray[Any], kv: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """One tail payload: ``tokens`` and the KV bytes that belong to them."""
    ids = np.asarray(tokens, dtype="<i4")
    out = np.empty(_COUNT.size + ids.nbytes + kv.nbytes, dtype=np.uint8)
    _COUNT.pack_into(out.data, 0, len(ids))
    out[_COUNT.size : _COUNT.size + ids.nbytes] = ids.view(np.uint8)
    out[_COUNT.size + ids.nbytes :] = kv.reshape(-1).view(np.uint8)
    return out


def tail_bytes(tokens: int, kv_bytes: int) -> int:
    """Payload bytes of a tail of ``tokens`` tokens whose KV takes ``kv_bytes``."""
    return _COUNT.size + 4 * tokens + kv_bytes


def unpack_tail(
    payload: bytes | memoryview | npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.int32], memoryview]:
    """(token ids, KV bytes) of a tail payload; BadRequest if it is not one."""
    buf = memoryview(payload if not isinstance(payload, np.ndarray) else payload.data).cast("B")
    if len(buf) < _COUNT.size:
        raise BadRequest(f"tail payload of {len(buf)} bytes has no token count")
    (n,) = _COUNT.unpack_from(buf, 0)
    end = _COUNT.size + 4 * n
    if n == 0 or end > len(buf):
        raise BadRequest(f"tail payload of {len(buf)} bytes cannot hold {n} token ids")
    ids = np.frombuffer(buf[_COUNT.size : end], dtype="<i4")
    return ids, buf[end:]


def usable_tokens(stored: npt.NDArray[np.int32], wanted: Sequence[int], granule: int) -> int:
    """How many leading tokens of a tail holding ``stored`` serve a prompt that continues
    with ``wanted``: their common prefix, rounded down to a multiple of ``granule``."""
    n = min(len(stored), len(wanted))
    if n == 0:
        return 0
    diff = np.flatnonzero(stored[:n] != np.asarray(wanted[:n], dtype=np.int64))
    common = int(diff[0]) if len(diff) else n
    return common - common % max(1, granule)
