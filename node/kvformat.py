"""What a chunk's payload is: its K and V matrices (:class:`KVGeometry`), and the error a
payload that does not decode under its codec raises (:class:`CodecError`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ELEMENT_BYTES = {"f16": 2, "bf16": 2, "f32": 4}
"""the float types codecs take, by the names record headers give them"""


class CodecError(ValueError):
    """A payload that does not decode under the codec its header names (readers treat it
    like a corrupt record: dropped, recomputed)."""


@dataclass(frozen=True)
class KVGeometry:
    """Where a chunk's K and V matrices lie in its payload (what the groups follow).

    llama.cpp: all layers' K ``[tokens, k_channels]``, then all layers' V (``[v_channels,
    tokens]`` when ``v_trans``). vLLM (``interleaved``): ``[layers, 2, tokens, channels]``.
    """

    layers: int
    tokens: int
    k_channels: int
    v_channels: int
    dtype: str
    """element type: f16, bf16 or f32"""
    v_trans: bool = False
    interleaved: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ELEMENT_BYTES:
            raise ValueError(f"lossy codecs take f16, bf16 or f32 KV, not {self.dtype}")
        if self.interleaved and self.k_channels != self.v_channels:
            raise ValueError("interleaved K and V must be equally wide")

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @property
    def elements(self) -> int:
        return self.layers * self.tokens * (self.k_channels + self.v_channels)

    def parts(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``flat`` (the payload's elements) as ``[layers, tokens, channels]`` views."""
        n, t = self.layers, self.tokens
        if self.interleaved:
            both = flat.view(n, 2, t, self.k_channels)
            return both[:, 0], both[:, 1]
        split = n * t * self.k_channels
        k = flat[:split].view(n, t, self.k_channels)
        if self.v_trans:
            return k, flat[split:].view(n, self.v_channels, t).transpose(1, 2)
        return k, flat[split:].view(n, t, self.v_channels)
