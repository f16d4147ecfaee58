"""Slot mapping against vLLM's packed 4-D and split 5-D KV layouts, with real tensors."""

from __future__ import annotations

import pytest

from ..helpers import require

torch = require("torch")

from lmcache_mesh.engines.vllm.layout import PagedLayout, slots_of  # noqa: E402

BLOCKS, HEADS, BS, HS = 12, 2, 4, 3


def reference(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A paged tensor in ``kind`` layout and the K, V it holds per slot ([slots, heads, head_size])."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(BLOCKS * BS, HEADS, HS, generator=g)
    v = torch.randn(BLOCKS * BS, HEADS, HS, generator=g)
    kb = k.reshape(BLOCKS, BS, HEADS, HS)
    vb = v.reshape(BLOCKS, BS, HEADS, HS)
    if kind == "packed":  # [B, H, N, 2*hs]
        kv = torch.cat([kb, vb], dim=-1).transpose(1, 2).contiguous()
    elif kind == "NHD":  # [2, B, N, H, hs]
        kv = torch.stack([kb, vb]).contiguous()
    else:  # HND: [2, B, H, N, hs]
        kv = torch.stack([kb, vb]).transpose(2, 3).contiguous()
    return kv, k, v


@pytest.mark.parametrize("kind", ["packed", "NHD", "HND"])
def test_layouts_are_detected(kind: str) -> None:
    kv, _, _ = reference(kind)
    assert PagedLayout.detect(kv, BS) == PagedLayout(kind, BS, HEADS, HS)  # type: ignore[arg-type]


def test_slots_follow_the_block_table() -> None:
    assert slots_of([7, 2, 5], BS, 0, 12).tolist() == [28, 29, 30, 31, 8, 9, 10, 11, 20, 21, 22, 23]
    assert slots_of([7, 2, 5], BS, 6, 9).tolist() == [10, 11, 20]


@pytest.mark.parametrize("kind", ["packed", "NHD", "HND"])
def test_reading_blocks_gives_each_tokens_k_and_v(kind: str) -> None:
    kv, k, v = reference(kind)
    layout = PagedLayout.detect(kv, BS)
    block_ids = torch.tensor([7, 2, 5])
    got_k, got_v = layout.read_blocks(kv, block_ids)
    slots = slots_of(block_ids, BS, 0, 3 * BS)
    assert torch.equal(got_k, k[slots]) and torch.equal(got_v, v[slots])
    into_k, into_v = torch.zeros_like(got_k), torch.zeros_like(got_v)
    layout.read_blocks_into(kv, block_ids.tolist(), into_k, into_v)
    assert torch.equal(into_k, got_k) and torch.equal(into_v, got_v)


@pytest.mark.parametrize("kind", ["packed", "NHD", "HND"])
def test_writing_slots_changes_exactly_those_slots(kind: str) -> None:
    kv, k, v = reference(kind)
    layout = PagedLayout.detect(kv, BS)
    slots = slots_of([9, 4], BS, 1, 7)  # a partial first and last block
    new_k, new_v = torch.full((6, HEADS, HS), 5.0), torch.full((6, HEADS, HS), -5.0)
    layout.write_slots(kv, slots, new_k, new_v)
    all_k, all_v = layout.read_blocks(kv, torch.arange(BLOCKS))
    expected_k, expected_v = k.clone(), v.clone()
    expected_k[slots], expected_v[slots] = new_k, new_v
    assert torch.equal(all_k, expected_k) and torch.equal(all_v, expected_v)


def test_a_chunk_moves_between_layouts_unchanged() -> None:
    packed, _, _ = reference("packed")
    split = torch.zeros(2, BLOCKS, BS, HEADS, HS)
    src, dst = PagedLayout.detect(packed, BS), PagedLayout.detect(split, BS)
    k, v = src.read_blocks(packed, torch.tensor([3, 1]))
    dst.write_slots(split, slots_of([10, 0], BS, 0, 2 * BS), k, v)
    k2, v2 = dst.read_blocks(split, torch.tensor([10, 0]))
    assert torch.equal(k, k2) and torch.equal(v, v2)


def test_unknown_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="does not match block size"):
        PagedLayout.detect(torch.zeros(4, 2, 8, 6), BS)
    with pytest.raises(ValueError, match="unknown KV tensor layout"):
        PagedLayout.detect(torch.zeros(3, 4, 4, 2, 3), BS)
