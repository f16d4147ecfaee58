"""Record codecs: how a chunk's payload is stored (its header's ``codec`` names it).

``raw``: the engine's bytes as they are. ``int8``, ``fp8``, ``int4``: lossy, opt-in (see
:mod:`lmcache_mesh.node.quant`); an engine that stores them puts the codec in its namespace,
so engines that did not opt in never meet such a chunk. ``zstd``: lossless, for KV of 2- or 4-byte floats —
the payload is cut into byte planes (byte j of every element together), and each plane
except the lowest (mantissa bits, close to noise) is compressed with zstd where that makes
it smaller; the sign and exponent bits, which vary little across a layer, are where the
savings are. Measured on SmolLM2's f16 KV: 1.17x smaller, about 1 GB/s to encode and 0.5
GB/s to decode per core — worth it on slow links, not beside the engine.

Layout of a ``zstd`` payload (little-endian)::

    u8 version (1), u8 element bytes E, u32 elements N
    E x (u8 mode (0 raw, 1 zstd), u32 length, bytes)     plane 0 (lowest byte) first

Decoding checks every length; a payload that does not decode to exactly its expected size
raises :class:`CodecError` (readers treat it like a corrupt record).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from . import quant
from .kvformat import CodecError, KVGeometry

LOSSLESS = ("raw", "zstd")
LOSSY = quant.LOSSY
CODECS = LOSSLESS + LOSSY
"""What the ``codec`` setting accepts."""

FLOAT_TYPES = {"f16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "f32": 4, "float32": 4}
"""Element bytes of the float types record headers name (llama.cpp's names and torch's)."""

_HEAD = struct.Struct("<BBI")
_PLANE = struct.Struct("<BI")
_VERSION = 1
_LEVEL = 1


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    return codec


def encode(codec: str, payload: npt.NDArray[np.uint8], geometry: KVGeometry) -> npt.NDArray[np.uint8]:
    """``payload`` (raw KV of ``geometry``) under ``codec`` (``raw``: itself). ValueError where
    the codec cannot hold it (the caller stores it raw)."""
    if codec == "raw":
        return payload
    if check_codec(codec) in LOSSY:
        return quant.encode(codec, payload, geometry)
    return _zstd_encode(payload, geometry.element_bytes)


def decode(codec: str, data: Any, geometry: KVGeometry) -> npt.NDArray[np.uint8] | memoryview:
    """The engine's bytes of a payload stored under ``codec``; CodecError unless they are
    exactly the raw KV of ``geometry``."""
    raw_bytes = geometry.elements * geometry.element_bytes
    if codec in LOSSY:
        return quant.decode(codec, data, raw_bytes, geometry)
    if codec not in LOSSLESS:
        raise CodecError(f"unknown codec {codec!r}")
    return decode_lossless(codec, data, raw_bytes)


def wire_encoded(payload: Any, dtype: str) -> npt.NDArray[np.uint8] | None:
    """A raw payload of float ``dtype`` under ``zstd`` for a trip over a slow link, or None
    where that would not make it smaller (or the type is not one the codec splits)."""
    element_bytes = FLOAT_TYPES.get(dtype)
    data = np.frombuffer(memoryview(payload).cast("B"), dtype=np.uint8)
    if element_bytes is None or len(data) % element_bytes or len(data) < 1024:
        return None
    packed = _zstd_encode(data, element_bytes)
    return packed if packed.nbytes < len(data) else None


def decode_lossless(codec: str, data: Any, raw_bytes: int) -> npt.NDArray[np.uint8] | memoryview:
    """The bytes of a ``raw`` or ``zstd`` payload that holds ``raw_bytes`` (CodecError if not)."""
    if codec == "zstd":
        return _zstd_decode(data, raw_bytes)
    if codec != "raw":
        raise CodecError(f"{codec!r} is not a lossless codec")
    view = memoryview(data).cast("B")
    if view.nbytes != raw_bytes:
        raise CodecError(f"raw payload of {view.nbytes} bytes, expected {raw_bytes}")
    return view


def _zstd_encode(payload: npt.NDArray[np.uint8], element_bytes: int) -> npt.NDArray[np.uint8]:
    import zstandard

    if element_bytes not in (2, 4) or payload.nbytes % element_bytes:
        raise ValueError(f"zstd splits 2- or 4-byte elements; got {element_bytes} for {payload.nbytes} bytes")
    n = payload.nbytes // element_bytes
    planes = payload.reshape(n, element_bytes)
    compressor = zstandard.ZstdCompressor(level=_LEVEL)
    parts: list[Any] = [_HEAD.pack(_VERSION, element_bytes, n)]
    for j in range(element_bytes):
        plane = np.ascontiguousarray(planes[:, j])
        packed = compressor.compress(plane.data) if j > 0 else None
        if packed is not None and len(packed) < n:
            parts += [_PLANE.pack(1, len(packed)), packed]
        else:
            parts += [_PLANE.pack(0, n), plane.data]
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def _zstd_decode(data: Any, raw_bytes: int) -> npt.NDArray[np.uint8]:
    import zstandard

    buf = memoryview(data).cast("B")
    try:
        version, element_bytes, n = _HEAD.unpack_from(buf, 0)
        if version != _VERSION or element_bytes not in (2, 4) or n * element_bytes != raw_bytes:
            raise CodecError(f"zstd payload v{version} of {n} x {element_bytes} bytes, expected {raw_bytes}")
        out = np.empty((n, element_bytes), dtype=np.uint8)
        off = _HEAD.size
        decompressor = zstandard.ZstdDecompressor()
        for j in range(element_bytes):
            mode, length = _PLANE.unpack_from(buf, off)
            off += _PLANE.size
            body = buf[off : off + length]
            if len(body) != length:
                raise CodecError("zstd payload is shorter than its planes")
            off += length
            plane = body if mode == 0 else decompressor.decompress(body, max_output_size=n)
            if mode not in (0, 1) or len(plane) != n:
                raise CodecError(f"plane {j} holds {len(plane)} bytes, expected {n}")
            out[:, j] = np.frombuffer(plane, dtype=np.uint8)
        if off != len(buf):
            raise CodecError(f"zstd payload has {len(buf) - off} trailing bytes")
    except (struct.error, zstandard.ZstdError) as exc:
        raise CodecError(f"zstd payload does not decode: {exc}") from None
    return out.reshape(-1)
