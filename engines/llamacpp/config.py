"""Configuration of the llama.cpp adapter."""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_mesh.node.config import NodeConfig

from ..adapter_config import AdapterConfig
from ..store import StoreConfig, adapter_store_config


@dataclass(frozen=True, kw_only=True)
class LlamaMeshConfig(AdapterConfig):
    """How a :class:`~lmcache_mesh.engines.llamacpp.MeshLlama` uses the mesh: the shared
    :class:`~lmcache_mesh.engines.adapter_config.AdapterConfig` fields, plus these.

    The defaults suit one engine beside one node: an embedded node when ``node`` is None.
    """

    node_config: NodeConfig | None = None
    """Config of the embedded node (None = the defaults of ``lmcache-node run``)."""
    save_completions: bool = True
    """Also store the KV of generated tokens, so the next turn of a chat reuses it."""
    tail_tokens: int = 16
    """Reuse down to this many tokens: the tokens after a prompt's last full chunk are
    stored (and restored) as a tail record in multiples of it. 0 turns tails off: whole
    chunks only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.tail_tokens < self.chunk_tokens:
            raise ValueError(f"tail_tokens must be in [0, chunk_tokens), got {self.tail_tokens}")

    def store_config(self) -> StoreConfig:
        return adapter_store_config(self, self.node_config)
