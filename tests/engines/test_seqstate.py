"""Cutting and joining llama.cpp sequence-state blobs, against blobs written independently here."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from lmcache_mesh.engines.llamacpp import seqstate
from lmcache_mesh.engines.llamacpp.seqstate import SEQ_MAGIC, BlobError, BlobLayout

N_LAYER, N_EMBD_K, N_EMBD_V = 3, 8, 6


def reference_blob(rows: np.ndarray, pos: list[int], v_trans: bool, el: int = 2) -> bytes:
    """A blob written the slow, obvious way from rows[layer, kv, cell, element-bytes]."""
    k_row, v_row = N_EMBD_K * el, N_EMBD_V * el
    out = [struct.pack("<IiII", SEQ_MAGIC, 0, 1, len(pos))]
    out += [struct.pack("<iIi", p, 1, 0) for p in pos]
    out.append(struct.pack("<II", int(v_trans), N_LAYER))
    for layer in range(N_LAYER):
        out.append(struct.pack("<iQ", 1, k_row))
        out += [rows[layer, 0, c, :k_row].tobytes() for c in range(len(pos))]
    for layer in range(N_LAYER):
        if v_trans:
            out.append(struct.pack("<iII", 1, el, N_EMBD_V))
            for j in range(N_EMBD_V):  # element j of every cell
                out += [rows[layer, 1, c, j * el : (j + 1) * el].tobytes() for c in range(len(pos))]
        else:
            out.append(struct.pack("<iQ", 1, v_row))
            out += [rows[layer, 1, c, :v_row].tobytes() for c in range(len(pos))]
    return b"".join(out)


def random_rows(cells: int, seed: int = 0) -> np.ndarray:
    width = max(N_EMBD_K, N_EMBD_V) * 2
    return np.random.default_rng(seed).integers(0, 256, (N_LAYER, 2, cells, width), dtype=np.uint8)


@pytest.mark.parametrize("v_trans", [False, True])
def test_parse_reads_the_layout(v_trans: bool) -> None:
    state = seqstate.parse(reference_blob(random_rows(10), list(range(10)), v_trans))
    assert state.layout == BlobLayout(3, 1, 1, N_EMBD_K * 2, N_EMBD_V * 2, 2 if v_trans else 1, v_trans)
    assert state.cells == 10 and state.pos.tolist() == list(range(10))
    assert state.layout.blob_bytes(10) == len(reference_blob(random_rows(10), list(range(10)), v_trans))


@pytest.mark.parametrize("v_trans", [False, True])
def test_split_then_join_gives_back_the_same_bytes(v_trans: bool) -> None:
    c, n = 4, 5
    rows = random_rows(c * n)
    blob = reference_blob(rows, list(range(c * n)), v_trans)
    state = seqstate.parse(blob)
    payloads = seqstate.split(state, c, 0, n)
    assert [len(p) for p in payloads] == [state.layout.chunk_bytes(c)] * n
    assert seqstate.join(state.layout, payloads, c).tobytes() == blob


@pytest.mark.parametrize("v_trans", [False, True])
def test_a_leading_run_of_chunks_restores_exactly_that_prefix(v_trans: bool) -> None:
    c = 4
    rows = random_rows(11)  # 2 full chunks and a tail
    state = seqstate.parse(reference_blob(rows, list(range(11)), v_trans))
    payloads = seqstate.split(state, c, 0, 2)
    prefix = reference_blob(rows[:, :, :8], list(range(8)), v_trans)
    assert seqstate.join(state.layout, payloads, c).tobytes() == prefix
    # chunks cut separately (later ones from a longer blob) join the same way
    tail = seqstate.split(state, c, 1, 1)
    assert seqstate.join(state.layout, [payloads[0], tail[0]], c).tobytes() == prefix


@pytest.mark.parametrize("v_trans", [False, True])
def test_cells_out_of_position_order_are_cut_by_position(v_trans: bool) -> None:
    c, cells = 4, 12
    rows = random_rows(cells, seed=3)
    perm = np.random.default_rng(1).permutation(cells)
    shuffled = reference_blob(rows[:, :, perm], perm.tolist(), v_trans)  # cell i holds position perm[i]
    payloads = seqstate.split(seqstate.parse(shuffled), c, 0, 3)
    in_order = reference_blob(rows, list(range(cells)), v_trans)
    assert seqstate.join(seqstate.parse(in_order).layout, payloads, c).tobytes() == in_order


def test_gaps_in_positions_are_refused() -> None:
    blob = reference_blob(random_rows(8), [0, 1, 2, 3, 5, 6, 7, 8], v_trans=False)
    with pytest.raises(BlobError, match="every position"):
        seqstate.split(seqstate.parse(blob), 4, 0, 2)
    assert len(seqstate.split(seqstate.parse(blob), 4, 0, 1)) == 1  # the first chunk is whole


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\0\0\0\0" + b[4:], "unknown sequence-state format"),
        (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "2 streams"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b[:-1], "trailing|shorter"),
        (lambda b: b[:10], "too short|shorter"),
        (lambda b: b[:16] + struct.pack("<iIi", 0, 2, 0) + b[28:], "several sequences"),
    ],
)
def test_malformed_blobs_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    blob = reference_blob(random_rows(4), list(range(4)), v_trans=True)
    with pytest.raises(BlobError, match=message):
        seqstate.parse(mutate(blob))


def test_layers_with_other_row_sizes_are_refused() -> None:
    blob = bytearray(reference_blob(random_rows(4), list(range(4)), v_trans=False))
    second_k = 16 + 12 * 4 + 8 + 12 + 4 * N_EMBD_K * 2
    struct.pack_into("<i", blob, second_k, 0)  # layer 1's K claims f32
    with pytest.raises(BlobError, match="layer 1"):
        seqstate.parse(bytes(blob))


def test_join_refuses_a_payload_of_the_wrong_size() -> None:
    state = seqstate.parse(reference_blob(random_rows(4), list(range(4)), v_trans=False))
    with pytest.raises(BlobError, match="part 0"):
        seqstate.join(state.layout, [b"\0" * 10], 4)


@pytest.mark.parametrize("v_trans", [False, True])
def test_chunks_and_part_of_a_tail_restore_exactly_that_prefix(v_trans: bool) -> None:
    c = 4
    rows = random_rows(15)  # 2 full chunks and a tail of 7 tokens
    state = seqstate.parse(reference_blob(rows, list(range(15)), v_trans))
    chunks = seqstate.split(state, c, 0, 2)
    tail = seqstate.cut(state, 8, 7)
    assert len(tail) == state.layout.chunk_bytes(7)
    for used in (7, 5, 1):
        blob = seqstate.join(state.layout, chunks, c, seqstate.Tail(tail, stored=7, used=used))
        assert blob.tobytes() == reference_blob(rows[:, :, : 8 + used], list(range(8 + used)), v_trans)
    # a tail with no full chunk before it (a prompt shorter than a chunk)
    short = seqstate.join(state.layout, [], c, seqstate.Tail(seqstate.cut(state, 0, 3), stored=3, used=2))
    assert short.tobytes() == reference_blob(rows[:, :, :2], [0, 1], v_trans)


def test_join_refuses_more_of_a_tail_than_it_holds() -> None:
    state = seqstate.parse(reference_blob(random_rows(4), list(range(4)), v_trans=False))
    tail = seqstate.cut(state, 0, 3)
    with pytest.raises(BlobError, match="4 tokens of a tail of 3"):
        seqstate.join(state.layout, [], 4, seqstate.Tail(tail, stored=3, used=4))
