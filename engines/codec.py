"""What an engine stores and reads under the ``codec`` setting, the same for every adapter.

An engine stores its chunks under its codec (a chunk the codec cannot hold is stored raw)
and reads raw, lossless and — only where it opted in — its own lossy codec: a lossy codec is
also in the engine's namespace, so this check is the second line, against records misfiled
or forged under a namespace that never allowed them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from lmcache_mesh.node import quant
from lmcache_mesh.node.codecs import LOSSLESS, LOSSY, CodecError, decode, decode_lossless, encode
from lmcache_mesh.node.kvformat import KVGeometry
from lmcache_mesh.node.records import RecordHeader

logger = logging.getLogger(__name__)

Payload = npt.NDArray[np.uint8]


def lossy_codec(codec: str) -> str | None:
    """The codec if it is lossy (it then goes into the namespace), else None; checks that
    torch, which the lossy codecs compute in, is there (now, not at the first save)."""
    if codec not in LOSSY:
        return None
    quant.require_torch()
    return codec


def not_readable(header: RecordHeader, own_codec: str) -> str | None:
    """Why an engine storing ``own_codec`` must not use this record's payload, or None."""
    if header.codec in LOSSY and header.codec != own_codec:
        return f"stored as {header.codec}, which this engine did not opt in to"
    return None


def decoded(header: RecordHeader, payload: Any, raw_bytes: int, geometry: KVGeometry | None) -> Any:
    """The ``raw_bytes`` of a payload before its codec (itself when raw): lossless codecs
    decode any payload (chunks and tails; a node may have re-encoded one for a slow link),
    lossy ones a chunk of ``geometry``. CodecError when it does not decode to exactly that."""
    if header.codec in LOSSLESS:
        return decode_lossless(header.codec, payload, raw_bytes)
    if geometry is None or geometry.elements * geometry.element_bytes != raw_bytes:
        raise CodecError(f"a {header.codec} record this engine cannot decode")
    return decode(header.codec, payload, geometry)


def encoded_runs(
    codec: str, keys: Sequence[bytes], payloads: Sequence[Payload], geometry: KVGeometry | None
) -> list[tuple[str, list[bytes], list[Payload]]]:
    """``keys``' payloads under ``codec``, in runs of one codec (each run is one put, its
    header naming the codec): a chunk the codec cannot hold is stored raw."""
    runs: list[tuple[str, list[bytes], list[Payload]]] = []
    for key, payload in zip(keys, payloads, strict=True):
        used = codec
        if codec != "raw" and geometry is not None:
            try:
                payload = encode(codec, payload, geometry)
            except ValueError as exc:
                logger.info("storing chunk %s raw: %s", key.hex(), exc)
                used = "raw"
        elif codec != "raw":
            used = "raw"
        if runs and runs[-1][0] == used:
            runs[-1][1].append(key)
            runs[-1][2].append(payload)
        else:
            runs.append((used, [key], [payload]))
    return runs


def codec_meta(meta: dict[str, Any], codec: str, raw_bytes: int) -> dict[str, Any]:
    """A put's header fields for payloads under ``codec`` (raw: as they are)."""
    return meta if codec == "raw" else {**meta, "codec": codec, "raw_length": raw_bytes}
