"""Configuration of the llama.cpp adapter."""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_mesh.node.config import NodeConfig

from ..store import StoreConfig, adapter_store_config, check_adapter_settings


@dataclass(frozen=True)
class LlamaMeshConfig:
    """How a :class:`~lmcache_mesh.engines.llamacpp.MeshLlama` uses the mesh.

    The defaults suit one engine beside one node: an embedded node when ``node`` is None.
    """

    node: str | None = None
    """address of a running node (``tcp://HOST:PORT`` / ``ipc:///PATH``); None = embedded node"""
    node_config: NodeConfig | None = None
    """config of the embedded node (None = the defaults of ``lmcache-node run``)"""
    chunk_tokens: int = 256
    """tokens per chunk; keys chain over whole chunks, so a shorter tail is never cached"""
    tenant: str | None = None
    """namespace salt, and the node-side tenant of every request: tenants never share chunks"""
    key_file: str | None = None
    """CurveZMQ key pair file (``lmcache-node keygen --role client``) for a tcp:// node"""
    server_key: str | None = None
    """that node's public key: Z85 text or its ``node.key`` file"""
    lookup_timeout_s: float = 0.25
    fetch_timeout_s: float = 2.0
    """past these the request is a miss and the engine recomputes"""
    retry_after_s: float = 5.0
    """after the node failed to answer, skip the mesh (instant misses) for this long"""
    save_completions: bool = True
    """also store the KV of generated tokens, so the next turn of a chat reuses it"""
    max_pending_save_bytes: int = 512 << 20
    """KV waiting to be stored; past it new saves are dropped (counted), never waited on"""
    fingerprint_cache_dir: str | None = None
    """where model fingerprints are cached when the model's directory is read-only"""
    cost_aware: bool = True
    """fetch a remote chunk only when the transfer is estimated faster than recomputing it"""
    prefill_tokens_per_s: float | None = None
    """this engine's prefill rate for those estimates; None = measured from its own prefills"""

    def __post_init__(self) -> None:
        check_adapter_settings(self)

    def store_config(self) -> StoreConfig:
        return adapter_store_config(self, self.node_config)
