"""Configuration of the vLLM connector, read from ``kv_connector_extra_config``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..adapter_config import AdapterConfig

ASYNC_LOADS = ("remote", "always", "never")


@dataclass(frozen=True, kw_only=True)
class VllmMeshConfig(AdapterConfig):
    """``kv_connector_extra_config`` keys of ``MeshConnector``: the shared
    :class:`~lmcache_mesh.engines.adapter_config.AdapterConfig` fields, plus these. Defaults
    suit a node on the same machine."""

    max_pending_save_bytes: int = 1 << 30
    """KV bytes waiting to be stored; past it new saves are dropped (counted), never waited on.
    Twice the shared default: one vLLM step saves the KV of a whole batch of requests."""
    load_failure_policy: str = "recompute"
    """What vLLM does when a load fails: "recompute" the tokens (a cache may forget) or "fail"
    the request."""
    engine_name: str | None = None
    """This engine's name in the mesh index (``<node>/<engine_name>``); default ``vllm-<engine id>``."""
    ingest_events: bool = True
    """When the engine publishes KV events (``kv_events_config``), feed them to the mesh index."""
    layerwise: bool = True
    """Write a hit into the paged blocks layer by layer while the forward runs the layers before
    it (once vLLM is seen waiting on every layer), and copy saves out as each layer completes;
    False: all layers before the forward, saves after it."""
    pin_shared_memory: bool = True
    """On a CUDA device, page-lock the node's shared memory (the node's memory budget, all of
    it, at start) so hits are copied to the GPU by DMA straight from it, and saves back."""
    tails: bool = True
    """Reuse past a prompt's last whole chunk, down to its last whole block: the blocks after
    it are stored (and found) as records of one block each. False: whole chunks only."""
    async_loads: str = "remote"
    """Which hits load between steps instead of inside one, so a slow fetch never stalls the
    batch (the request waits outside it): "remote" (some of its chunks are on peers),
    "always", or "never"."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.load_failure_policy not in ("recompute", "fail"):
            raise ValueError(
                f"load_failure_policy must be 'recompute' or 'fail', got {self.load_failure_policy!r}"
            )
        if self.async_loads not in ASYNC_LOADS:
            raise ValueError(f"async_loads must be one of {', '.join(ASYNC_LOADS)}, got {self.async_loads!r}")

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> VllmMeshConfig:
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"unknown MeshConnector setting(s) {', '.join(unknown)} in kv_connector_extra_config; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**extra)
