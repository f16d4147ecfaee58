"""Lossy KV codecs: 8-bit (``int8``, ``fp8`` e4m3) and 4-bit (``int4``) with small groups.

A chunk's payload is K and V matrices of 2- or 4-byte floats; :class:`KVGeometry` says where
they lie. Every value is quantized within a *group* of up to 64 neighbours that share a
scale (stored as bf16, rounded up, so no value lands outside
its code range):

* ``int8``: symmetric, ``round(x / s)`` with ``s = max|x| / 127``, groups along the channels
  of one token (per token and head where heads are 64 wide);
* ``fp8``: e4m3 (3 mantissa bits, finite range ±448) of ``x / s``, ``s = max|x| / 448``, the
  same groups;
* ``int4``: asymmetric, ``round((x - min) / s)`` in 0..15 with ``s = (max - min) / 15``, two
  codes per byte, in the KIVI spirit: K grouped along tokens (per channel: K's outliers sit
  in fixed channels), V along the channels of one token.

Sizes against 2-byte KV: 8-bit 0.516x, 4-bit 0.281x (64-wide groups). A payload the codec
cannot hold faithfully (non-finite values, int4 minimums beyond f16's range, widths not a
multiple of 4) raises
ValueError on encode; the caller stores it raw instead.

The arithmetic runs in torch (numpy converts f16 one element at a time, 20x slower), which
the engines that opt in already have; the node itself never decodes a lossy payload.

Layout of an encoded payload (little-endian)::

    u8 version (1), u8 codec (1 int8, 2 fp8, 3 int4), u8 element type (1 f16, 2 bf16, 4 f32),
    u8 0, u32 elements N
    for K, then V: bf16 scales [groups], (int4: f16 minimums [groups], rounded down), codes

Every size follows from the geometry, so decoding checks the payload's length exactly.
"""

from __future__ import annotations

import math
import struct
import threading
import warnings
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from .kvformat import CodecError, KVGeometry

if TYPE_CHECKING:
    import torch
    from torch import Tensor

LOSSY = ("int8", "fp8", "int4")
_CODEC_IDS = {"int8": 1, "fp8": 2, "int4": 3}
_TYPE_IDS = {"f16": 1, "bf16": 2, "f32": 4}
_HEAD = struct.Struct("<BBBBI")
_VERSION = 1
_F16_MAX = 65504.0
_E4M3_MAX = 448.0


def require_torch() -> Any:
    """torch, or ImportError saying how to get it."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            "the lossy codecs (int8, fp8, int4) need torch: pip install torch==2.13.0 (CPU) "
            "or the lmcache-mesh[quant] extra"
        ) from None
    return torch


def _group(width: int) -> int:
    for g in (64, 32, 16, 8, 4):
        if width % g == 0:
            return g
    raise ValueError(f"cannot group {width} values (not a multiple of 4)")


def _axes(codec: str) -> tuple[int, int]:
    """Axis of ``[layers, tokens, channels]`` along which K's and V's groups run."""
    return (1, 2) if codec == "int4" else (2, 2)


def _part_sizes(codec: str, geometry: KVGeometry) -> list[tuple[int, int]]:
    """(groups, code bytes) of K and V."""
    sizes = []
    for axis, width in zip(_axes(codec), (geometry.k_channels, geometry.v_channels), strict=True):
        count = geometry.layers * geometry.tokens * width
        groups = count // _group(geometry.tokens if axis == 1 else width)
        sizes.append((groups, count // 2 if codec == "int4" else count))
    return sizes


def encoded_bytes(codec: str, geometry: KVGeometry) -> int:
    scale_arrays = 2 if codec == "int4" else 1
    return _HEAD.size + sum(2 * g * scale_arrays + c for g, c in _part_sizes(codec, geometry))


def _typed(payload: torch.Tensor, dtype: str) -> torch.Tensor:
    torch = require_torch()
    return payload.view({"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype])


_BLOCK = 1 << 19
"""values per step (2 MiB as f32): fewer, longer passes; measured fastest on this CPU"""

_local = threading.local()


def _scratch(geometry: KVGeometry) -> torch.Tensor:
    """This thread's f32 work buffer, kept between calls (a fresh one costs its page faults)."""
    torch = require_torch()
    n = max(_BLOCK, geometry.k_channels, geometry.v_channels, geometry.tokens)
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.numel() < n:
        buf = _local.scratch = torch.empty(n, dtype=torch.float32)
    return cast("Tensor", buf)


def _e4m3_as_f16(code: torch.Tensor) -> torch.Tensor:
    """e4m3 codes as f16 values 256x too small, exactly: the code's exponent and mantissa bits
    shifted into an f16's line up with e4m3's meaning at a bias 8 lower, subnormals included
    (torch converts e4m3 on the CPU one element at a time, 20x slower)."""
    torch = require_torch()
    bits = code.to(torch.int16)
    return (((bits & 0x7F) << 7) | ((bits & 0x80) << 8)).view(torch.float16)


def _blocks(part: torch.Tensor, axis: int) -> list[tuple[torch.Tensor, int]]:
    """``part`` ([layers, tokens, channels]) with its groups' axis last, cut into blocks of
    whole rows of about ``_BLOCK`` values: (block view, index of its first group), in group
    order. Small layers go several to a block (fewer steps), large ones a few rows at a time."""
    moved = part.movedim(axis, -1)
    layers, rows, width = moved.shape
    group = _group(width)
    blocks = []
    if rows * width <= _BLOCK:
        step = _BLOCK // (rows * width)
        for layer in range(0, layers, step):
            blocks.append((moved[layer : layer + step], layer * rows * width // group))
        return blocks
    step = max(1, _BLOCK // width)
    for layer in range(layers):
        for r in range(0, rows, step):
            blocks.append((moved[layer, r : r + step], (layer * rows + r) * width // group))
    return blocks


def _encode_block(codec: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """[groups, G] f32 values (overwritten) -> (scales, minimums or None, codes)."""
    torch = require_torch()
    lo, hi = x.amin(dim=1), x.amax(dim=1)  # (aminmax is 4x slower over short rows)
    if codec == "int4":
        low = _f16_floor(lo)
        scale = _scale((hi - low.float()) / 15)
        y = x.sub_(low.float()[:, None]).mul_(_inverse(scale)[:, None]).round_().clamp_(0, 15).to(torch.uint8)
        return scale, low, y[:, 0::2] | (y[:, 1::2] << 4)
    peak = torch.maximum(hi, lo.neg_())
    scale = _scale(peak / (127.0 if codec == "int8" else _E4M3_MAX))
    y = x.mul_(_inverse(scale)[:, None])
    if codec == "int8":
        return scale, None, y.round_().clamp_(-127, 127).to(torch.int8)
    return scale, None, y.clamp_(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)


def _scale(scale: torch.Tensor) -> torch.Tensor:
    """bf16 scales no smaller than ``scale`` (bf16 rounds within 2^-9 of the value, so
    2^-8 more always lands above it)."""
    if not bool(scale.isfinite().all()):
        raise ValueError("KV values beyond what a lossy codec holds (non-finite)")
    return (scale * (1 + 2**-8)).bfloat16()


def _f16_floor(low: torch.Tensor) -> torch.Tensor:
    """f16 values no larger than ``low``, so every ``x - low`` is at least 0."""
    torch = require_torch()
    if not bool(low.isfinite().all()) or float(low.abs().max()) > _F16_MAX:
        raise ValueError("KV values beyond what a lossy codec holds (non-finite, or past f16's range)")
    rounded = low.half()
    down = torch.nextafter(rounded, torch.full_like(rounded, -_F16_MAX))
    return cast("Tensor", torch.where(rounded.float() > low, down, rounded))


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, 0 where the scale is 0 (an all-zero group)."""
    torch = require_torch()
    s = scale.float()
    return cast("Tensor", torch.where(s > 0, 1.0 / s, torch.zeros_like(s)))


def _sections(
    codec: str, buf: torch.Tensor, geometry: KVGeometry
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Views of K's and V's (scales, minimums, codes [groups, code bytes per group]) in an
    encoded payload ``buf`` (bytes)."""
    torch = require_torch()
    sections = []
    off = _HEAD.size
    for groups, code_bytes in _part_sizes(codec, geometry):
        scale = buf[off : off + 2 * groups].view(torch.bfloat16)
        off += 2 * groups
        low = None
        if codec == "int4":
            low = buf[off : off + 2 * groups].view(torch.float16)
            off += 2 * groups
        sections.append((scale, low, buf[off : off + code_bytes].view(groups, code_bytes // groups)))
        off += code_bytes
    return sections


def _check(codec: str, geometry: KVGeometry) -> None:
    if codec not in _CODEC_IDS:
        raise ValueError(f"{codec!r} is not a lossy codec ({', '.join(LOSSY)})")


def encode(codec: str, payload: npt.NDArray[np.uint8], geometry: KVGeometry) -> npt.NDArray[np.uint8]:
    """``payload`` (raw KV of ``geometry``) under the lossy ``codec``."""
    torch = require_torch()
    _check(codec, geometry)
    if payload.nbytes != geometry.elements * geometry.element_bytes:
        raise ValueError(f"payload of {payload.nbytes} bytes does not hold {geometry}")
    out = np.empty(encoded_bytes(codec, geometry), dtype=np.uint8)
    _HEAD.pack_into(out.data, 0, _VERSION, _CODEC_IDS[codec], _TYPE_IDS[geometry.dtype], 0, geometry.elements)
    with warnings.catch_warnings():  # read-only payloads: torch warns, we only read them
        warnings.simplefilter("ignore", UserWarning)
        flat = _typed(torch.frombuffer(payload.reshape(-1).data, dtype=torch.uint8), geometry.dtype)
    sections = _sections(codec, torch.from_numpy(out), geometry)
    scratch = _scratch(geometry)
    for axis, part, (scales, lows, codes) in zip(_axes(codec), geometry.parts(flat), sections, strict=True):
        for block, first in _blocks(part, axis):
            x = scratch[: block.numel()].view(block.shape)
            x.copy_(block)
            x = x.view(-1, _group(block.shape[-1]))
            scale, low, code = _encode_block(codec, x)
            end = first + len(scale)
            scales[first:end] = scale
            if lows is not None and low is not None:
                lows[first:end] = low
            codes[first:end] = code.view(torch.uint8)
    return out


def decode(codec: str, data: Any, raw_bytes: int, geometry: KVGeometry) -> npt.NDArray[np.uint8]:
    """The raw KV bytes of a payload stored under the lossy ``codec``; CodecError unless the
    payload is exactly what ``geometry`` and its header say."""
    torch = require_torch()
    _check(codec, geometry)
    view = memoryview(data).cast("B")
    try:
        expected = encoded_bytes(codec, geometry)
    except ValueError as exc:  # a geometry no payload of this codec can have
        raise CodecError(f"{codec}: {exc}") from None
    if raw_bytes != geometry.elements * geometry.element_bytes or len(view) != expected:
        raise CodecError(f"{codec} payload of {len(view)} bytes, expected {expected} for {raw_bytes} raw")
    version, codec_id, type_id, _, n = _HEAD.unpack_from(view, 0)
    if (version, codec_id, type_id, n) != (
        _VERSION,
        _CODEC_IDS[codec],
        _TYPE_IDS[geometry.dtype],
        geometry.elements,
    ):
        raise CodecError(f"{codec} header v{version} codec {codec_id} type {type_id} of {n} does not match")
    with warnings.catch_warnings():  # a read-only buffer: torch warns, we never write to it
        warnings.simplefilter("ignore", UserWarning)
        buf = torch.frombuffer(view, dtype=torch.uint8)
    out = np.empty(raw_bytes, dtype=np.uint8)
    parts = geometry.parts(_typed(torch.from_numpy(out), geometry.dtype))
    scratch = _scratch(geometry)
    for axis, part, (scales, lows, codes) in zip(
        _axes(codec), parts, _sections(codec, buf, geometry), strict=True
    ):
        for block, first in _blocks(part, axis):
            group = _group(block.shape[-1])
            count = block.numel() // group
            x = scratch[: block.numel()].view(count, group)
            code = codes[first : first + count]
            if codec == "int4":
                x[:, 0::2].copy_(code & 15)
                x[:, 1::2].copy_(code >> 4)
            elif codec == "fp8":
                x.copy_(_e4m3_as_f16(code))
            else:
                x.copy_(code.view(torch.int8))
            scale = scales[first : first + count].float()
            x.mul_((scale * 256 if codec == "fp8" else scale)[:, None])
            if lows is not None:
                x.add_(lows[first : first + count].float()[:, None])
            if not math.isfinite(float(x.sum())):  # one pass; NaN and inf survive a sum
                raise CodecError(f"{codec} payload decodes to non-finite values")
            if geometry.dtype == "f16":  # scales rounded up may reach just past f16's range
                x.clamp_(-_F16_MAX, _F16_MAX)
            block.copy_(x.view(block.shape))
    return out
