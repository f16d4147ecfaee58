"""AdapterConfig: the settings every engine adapter shares (llama.cpp, vLLM).

How an adapter reaches the mesh (a node's address and its keys, or a node embedded in the
process), how its KV is cut into chunks, how long it waits before it recomputes instead, and
when a remote chunk is worth fetching. Each adapter's config adds its own fields to these.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_mesh.node.codecs import check_codec

from .store import StoreConfig, adapter_store_config, check_adapter_settings


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """What every engine adapter asks of the mesh; the defaults suit a node on the same machine."""

    node: str | None = None
    """Address of a running node (``tcp://HOST:PORT`` / ``ipc:///PATH``); None = a node embedded
    in the engine's process (vLLM: one per engine process, and its scheduler and workers would
    not share it: give vLLM a node)."""
    chunk_tokens: int = 256
    """Tokens per chunk (vLLM: a multiple of the engine's block size). Keys chain over whole
    chunks, so a shorter tail is never cached; smaller: more of a prompt reused, more keys and
    requests per prompt."""
    tenant: str | None = None
    """Namespace salt, and the node-side tenant of every request: tenants never share chunks."""
    key_file: str | None = None
    """CurveZMQ key pair file (``lmcache-node keygen --role client``) for a tcp:// node."""
    server_key: str | None = None
    """That node's public key: Z85 text or its ``node.key`` file."""
    lookup_timeout_s: float = 0.25
    """Seconds a LOOKUP may take; past it the request is a miss and the engine recomputes."""
    fetch_timeout_s: float = 2.0
    """Seconds fetching a hit's chunks may take; past it the engine recomputes them."""
    retry_after_s: float = 5.0
    """Seconds to skip the mesh (instant misses) after the node failed to answer: a dead node
    costs one timeout, not one per request."""
    max_pending_save_bytes: int = 512 << 20
    """KV bytes waiting to be stored; past it new saves are dropped (counted), never waited on.
    More: fewer dropped saves under bursts, more host memory held."""
    fingerprint_cache_dir: str | None = None
    """Where model fingerprints are cached when the model's directory is read-only."""
    cost_aware: bool = True
    """Fetch (and count) a remote chunk only when the transfer is estimated faster than
    recomputing it."""
    prefill_tokens_per_s: float | None = None
    """This engine's prefill rate for those estimates, in tokens/s; None = measured from its
    own prefills."""
    codec: str = "raw"
    """How chunks are stored: ``raw`` (the engine's bytes), ``zstd`` (lossless, byte planes;
    smaller, for slow links; costs decode time on every restore; any reader decodes it), or
    opt-in lossy ``int8``, ``fp8``, ``int4`` (about 0.52x, 0.52x, 0.28x of 16-bit KV; they need
    torch). A lossy codec is part of the namespace: such engines share chunks only with
    engines of the same codec. KV of other types (quantized caches) is stored raw."""

    def __post_init__(self) -> None:
        check_adapter_settings(self)
        check_codec(self.codec)

    def store_config(self) -> StoreConfig:
        """How this adapter's :class:`~lmcache_mesh.engines.store.MeshStore` reaches the mesh."""
        return adapter_store_config(self)
