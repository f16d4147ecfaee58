"""llama.cpp sequence-state blobs, cut into per-chunk KV payloads and joined again.

``llama_state_seq_get_data`` returns one blob per sequence (little-endian; llama.cpp as
vendored by llama-cpp-python 0.3.36, plain attention KV cache, one stream)::

    u32 magic 0xAF143CD8, i32 seq_id, u32 n_stream (= 1), u32 cell_count
    cell_count x (i32 pos, u32 n_seq_id (= 1), i32 seq_id)
    u32 v_trans, u32 n_layer
    n_layer x (i32 k_type, u64 k_row_bytes, cell_count rows)             K, one row per token
    v_trans = 0: n_layer x (i32 v_type, u64 v_row_bytes, cell_count rows)
    v_trans = 1: n_layer x (i32 v_type, u32 v_el_bytes, u32 n_embd_v,      V transposed: one row
                            n_embd_v rows of cell_count elements)          per element

A restore replaces the whole sequence, so the chunks of a prefix are joined into one blob
before restoring. A chunk payload (our format) holds one chunk's tokens only, in the
engine's own byte layout so that cutting and joining are plain copies::

    K: n_layer x [C x k_row_bytes]
    V: n_layer x [C x v_row_bytes]                  (v_trans = 0)
       n_layer x [n_embd_v x C x v_el_bytes]        (v_trans = 1)

Cell positions are not stored: chunk i holds positions [i*C, (i+1)*C).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from lmcache_mesh.node.kvformat import KVGeometry

SEQ_MAGIC = 0xAF143CD8
BLOB_FORMAT = "llama.cpp-seq/af143cd8"
"""Names the blob format in the layout descriptor: another format is another namespace."""

GGML_TYPE_NAMES = {0: "f32", 1: "f16", 30: "bf16"}
"""KV cache types whose rows we can cut; quantized caches (q8_0, ...) are cut the same way
but named by number."""
FLOAT_BYTES = {0: 4, 1: 2, 30: 2}
"""bytes per element of the float KV types (what the codecs take)"""

_HEAD = struct.Struct("<IiII")  # magic, seq_id, n_stream, cell_count
_TAIL = struct.Struct("<II")  # v_trans, n_layer
_ROWS = struct.Struct("<iQ")  # type, row bytes
_VT_ROWS = struct.Struct("<iII")  # type, element bytes, n_embd_v

Bytes = npt.NDArray[np.uint8]


class BlobError(ValueError):
    """A blob we cannot cut: another format, several streams, gaps, or a layout change."""


@dataclass(frozen=True)
class BlobLayout:
    """What fixes the byte layout of a sequence's KV; equal layouts can share chunks."""

    n_layer: int
    k_type: int
    v_type: int
    k_row: int
    """bytes of one token's K in one layer"""
    v_row: int
    """bytes of one token's V in one layer"""
    v_el: int
    """bytes of one V element (transposed V is stored element-major)"""
    v_trans: bool

    @property
    def n_embd_v(self) -> int:
        return self.v_row // self.v_el

    def chunk_bytes(self, chunk_tokens: int) -> int:
        return self.n_layer * chunk_tokens * (self.k_row + self.v_row)

    def blob_bytes(self, n_tokens: int) -> int:
        return _HEAD.size + 12 * n_tokens + _TAIL.size + self.n_layer * 24 + self.chunk_bytes(n_tokens)

    def geometry(self, tokens: int) -> KVGeometry | None:
        """Where K and V of ``tokens`` tokens lie in a chunk payload, for the codecs; None
        unless K and V are floats of one type."""
        el = FLOAT_BYTES.get(self.k_type)
        if el is None or self.v_type != self.k_type:
            return None
        name = GGML_TYPE_NAMES[self.k_type]
        return KVGeometry(self.n_layer, tokens, self.k_row // el, self.v_row // el, name, self.v_trans)

    def descriptor(self) -> dict[str, Any]:
        """The layout as a plain map, for the namespace and the record headers."""
        return {
            "blob": BLOB_FORMAT,
            "n_layer": self.n_layer,
            "k_type": GGML_TYPE_NAMES.get(self.k_type, str(self.k_type)),
            "v_type": GGML_TYPE_NAMES.get(self.v_type, str(self.v_type)),
            "k_row": self.k_row,
            "v_row": self.v_row,
            "v_trans": self.v_trans,
        }


@dataclass(frozen=True)
class SeqState:
    """A parsed blob: its layout, and views (no copies) of its cells and rows."""

    layout: BlobLayout
    pos: npt.NDArray[np.int32]
    k: Bytes
    """[n_layer, cells * k_row]"""
    v: Bytes
    """[n_layer, cells * v_row], or [n_layer, n_embd_v, cells * v_el] when transposed"""

    @property
    def cells(self) -> int:
        return len(self.pos)


def _layer_view(blob: Bytes, offset: int, n_layer: int, header: int, data: int) -> Bytes:
    """[n_layer, data] view of ``n_layer`` blocks of ``header`` + ``data`` bytes at ``offset``."""
    stride = header + data
    if offset + n_layer * stride > len(blob):
        raise BlobError("blob is shorter than its layer rows")
    blocks = blob[offset : offset + n_layer * stride].reshape(n_layer, stride)
    return blocks[:, header:]


def parse(blob: bytes | bytearray | memoryview | Bytes) -> SeqState:
    """Parse a one-stream sequence blob; raises BlobError for anything we cannot cut."""
    buf = np.frombuffer(blob, dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob
    if len(buf) < _HEAD.size:
        raise BlobError(f"blob of {len(buf)} bytes is too short")
    magic, _, n_stream, cells = _HEAD.unpack_from(buf.data, 0)
    if magic != SEQ_MAGIC:
        raise BlobError(f"unknown sequence-state format (magic {magic:#x}, expected {SEQ_MAGIC:#x})")
    if n_stream != 1:
        raise BlobError(f"blob has {n_stream} streams; only single-stream contexts are supported")
    if cells == 0:
        raise BlobError("blob holds no cells")
    off = _HEAD.size
    if off + 12 * cells + _TAIL.size > len(buf):
        raise BlobError("blob is shorter than its cell list")
    meta = buf[off : off + 12 * cells].view(np.int32).reshape(cells, 3)
    if not (meta[:, 1] == 1).all():
        raise BlobError("cells shared by several sequences (or extended cells) are not supported")
    pos = meta[:, 0]
    off += 12 * cells
    v_trans, n_layer = _TAIL.unpack_from(buf.data, off)
    off += _TAIL.size
    if n_layer == 0:
        raise BlobError("blob has no layers")
    k_type, k_row = _ROWS.unpack_from(buf.data, off)
    k = _layer_view(buf, off, n_layer, _ROWS.size, cells * k_row)
    off += n_layer * (_ROWS.size + cells * k_row)
    if v_trans:
        v_type, v_el, n_embd_v = _VT_ROWS.unpack_from(buf.data, off)
        v_row = v_el * n_embd_v
        v = _layer_view(buf, off, n_layer, _VT_ROWS.size, cells * v_row).reshape(n_layer, n_embd_v, -1)
    else:
        v_type, v_row = _ROWS.unpack_from(buf.data, off)
        v_el = 1
        v = _layer_view(buf, off, n_layer, _ROWS.size, cells * v_row)
    off += n_layer * (_ROWS.size + cells * v_row)
    if off != len(buf):
        raise BlobError(f"blob has {len(buf) - off} unexpected trailing bytes")
    layout = BlobLayout(n_layer, k_type, v_type, k_row, v_row, v_el, bool(v_trans))
    _check_uniform_layers(buf, layout, cells)
    return SeqState(layout, pos, k, v)


def _check_uniform_layers(buf: Bytes, layout: BlobLayout, cells: int) -> None:
    """Every layer must have the first layer's types and row sizes (else chunks would not line up)."""
    off = _HEAD.size + 12 * cells + _TAIL.size
    for li in range(layout.n_layer):
        if _ROWS.unpack_from(buf.data, off) != (layout.k_type, layout.k_row):
            raise BlobError(f"layer {li} has another K type or row size than layer 0")
        off += _ROWS.size + cells * layout.k_row
    v_head = (
        _VT_ROWS.pack(layout.v_type, layout.v_el, layout.n_embd_v)
        if layout.v_trans
        else _ROWS.pack(layout.v_type, layout.v_row)
    )
    for li in range(layout.n_layer):
        if bytes(buf[off : off + len(v_head)]) != v_head:
            raise BlobError(f"layer {li} has another V type or row size than layer 0")
        off += len(v_head) + cells * layout.v_row


def _in_position_order(state: SeqState, n_tokens: int) -> SeqState:
    """The state's first ``n_tokens`` positions as cells 0..n-1, copying only when cells are out of order."""
    if (state.pos[:n_tokens] == np.arange(n_tokens, dtype=np.int32)).all():
        return state
    order = np.argsort(state.pos, kind="stable")[:n_tokens]
    if not (state.pos[order] == np.arange(n_tokens, dtype=np.int32)).all():
        raise BlobError(f"the sequence does not hold every position below {n_tokens}")
    lay, cells = state.layout, state.cells
    k = state.k.reshape(lay.n_layer, cells, lay.k_row)[:, order].reshape(lay.n_layer, -1)
    if lay.v_trans:
        v = state.v.reshape(lay.n_layer, lay.n_embd_v, cells, lay.v_el)[:, :, order]
        v = v.reshape(lay.n_layer, lay.n_embd_v, -1)
    else:
        v = state.v.reshape(lay.n_layer, cells, lay.v_row)[:, order].reshape(lay.n_layer, -1)
    return SeqState(lay, state.pos[order], np.ascontiguousarray(k), np.ascontiguousarray(v))


def cut(state: SeqState, start: int, count: int) -> Bytes:
    """The payload of tokens ``start`` .. ``start + count - 1`` (a chunk, or a tail's KV):
    K rows per layer, then V rows per layer (or V elements, transposed)."""
    state = _in_position_order(state, start + count)
    lay = state.layout
    k_bytes = lay.n_layer * count * lay.k_row
    payload = np.empty(lay.chunk_bytes(count), dtype=np.uint8)
    payload[:k_bytes].reshape(lay.n_layer, -1)[:] = state.k[
        :, start * lay.k_row : (start + count) * lay.k_row
    ]
    if lay.v_trans:
        a, b = start * lay.v_el, (start + count) * lay.v_el
        payload[k_bytes:].reshape(lay.n_layer, lay.n_embd_v, -1)[:] = state.v[:, :, a:b]
    else:
        payload[k_bytes:].reshape(lay.n_layer, -1)[:] = state.v[
            :, start * lay.v_row : (start + count) * lay.v_row
        ]
    return payload


def split(state: SeqState, chunk_tokens: int, first: int, count: int) -> list[Bytes]:
    """Payloads of chunks ``first`` .. ``first + count - 1`` (positions from 0, full chunks only)."""
    state = _in_position_order(state, (first + count) * chunk_tokens)
    return [cut(state, i * chunk_tokens, chunk_tokens) for i in range(first, first + count)]


@dataclass(frozen=True)
class Tail:
    """The KV of a tail that holds ``stored`` tokens, of which the first ``used`` are restored."""

    kv: bytes | memoryview | Bytes
    stored: int
    used: int


def join(
    layout: BlobLayout,
    payloads: Sequence[bytes | memoryview | Bytes],
    chunk_tokens: int,
    tail: Tail | None = None,
) -> Bytes:
    """One restorable blob holding chunks 0 .. len(payloads)-1, then ``tail.used`` tokens of
    ``tail``: positions 0 .. n*C + used - 1."""
    parts = [(p, chunk_tokens, chunk_tokens) for p in payloads]
    if tail is not None and tail.used > 0:
        if not 0 < tail.used <= tail.stored:
            raise BlobError(f"cannot restore {tail.used} tokens of a tail of {tail.stored}")
        parts.append((tail.kv, tail.stored, tail.used))
    cells = sum(used for _, _, used in parts)
    blob = np.empty(layout.blob_bytes(cells), dtype=np.uint8)
    _HEAD.pack_into(blob.data, 0, SEQ_MAGIC, 0, 1, cells)
    off = _HEAD.size
    meta = blob[off : off + 12 * cells].view(np.int32).reshape(cells, 3)
    meta[:, 0] = np.arange(cells, dtype=np.int32)
    meta[:, 1] = 1
    meta[:, 2] = 0
    off += 12 * cells
    _TAIL.pack_into(blob.data, off, int(layout.v_trans), layout.n_layer)
    off += _TAIL.size

    k_dst = _layer_view(blob, off, layout.n_layer, _ROWS.size, cells * layout.k_row)
    for li in range(layout.n_layer):
        _ROWS.pack_into(
            blob.data, off + li * (_ROWS.size + cells * layout.k_row), layout.k_type, layout.k_row
        )
    off += layout.n_layer * (_ROWS.size + cells * layout.k_row)
    v_block = _ROWS.size + cells * layout.v_row
    v_dst = _layer_view(blob, off, layout.n_layer, _ROWS.size, cells * layout.v_row)
    for li in range(layout.n_layer):
        if layout.v_trans:
            _VT_ROWS.pack_into(blob.data, off + li * v_block, layout.v_type, layout.v_el, layout.n_embd_v)
        else:
            _ROWS.pack_into(blob.data, off + li * v_block, layout.v_type, layout.v_row)
    v3 = v_dst.reshape(layout.n_layer, layout.n_embd_v, cells * layout.v_el) if layout.v_trans else v_dst

    at = 0  # first cell of the part being copied
    for i, (payload, stored, used) in enumerate(parts):
        src = np.frombuffer(payload, dtype=np.uint8)
        if len(src) != layout.chunk_bytes(stored):
            raise BlobError(
                f"part {i} has {len(src)} bytes; {stored} tokens of this layout need {layout.chunk_bytes(stored)}"
            )
        k_bytes = layout.n_layer * stored * layout.k_row
        k_src = src[:k_bytes].reshape(layout.n_layer, stored * layout.k_row)
        k_dst[:, at * layout.k_row : (at + used) * layout.k_row] = k_src[:, : used * layout.k_row]
        if layout.v_trans:
            vt_src = src[k_bytes:].reshape(layout.n_layer, layout.n_embd_v, stored * layout.v_el)
            v3[:, :, at * layout.v_el : (at + used) * layout.v_el] = vt_src[:, :, : used * layout.v_el]
        else:
            v_src = src[k_bytes:].reshape(layout.n_layer, stored * layout.v_row)
            v_dst[:, at * layout.v_row : (at + used) * layout.v_row] = v_src[:, : used * layout.v_row]
        at += used
    return blob
