"""Configuration of the vLLM connector, read from ``kv_connector_extra_config``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..store import StoreConfig, adapter_store_config, check_adapter_settings


@dataclass(frozen=True)
class VllmMeshConfig:
    """``kv_connector_extra_config`` keys of ``MeshConnector``; defaults suit a node on the same machine."""

    node: str | None = None
    """address of a running node (``tcp://HOST:PORT`` / ``ipc:///PATH``); None = a node embedded in
    each engine process (scheduler and workers would then not share it: use a node)"""
    chunk_tokens: int = 256
    """tokens per chunk; a multiple of the engine's block size"""
    tenant: str | None = None
    """namespace salt, and the node-side tenant of every request: tenants never share chunks"""
    key_file: str | None = None
    """CurveZMQ key pair file (``lmcache-node keygen --role client``) for a tcp:// node"""
    server_key: str | None = None
    """that node's public key: Z85 text or its ``node.key`` file"""
    lookup_timeout_s: float = 0.25
    fetch_timeout_s: float = 2.0
    retry_after_s: float = 5.0
    max_pending_save_bytes: int = 1 << 30
    """KV waiting to be stored; past it new saves are dropped (counted), never waited on"""
    load_failure_policy: str = "recompute"
    """what vLLM does when a load fails: "recompute" the tokens (a cache may forget) or "fail" the request"""
    fingerprint_cache_dir: str | None = None
    engine_name: str | None = None
    """this engine's name in the mesh index (``<node>/<engine_name>``); default ``vllm-<engine id>``"""
    ingest_events: bool = True
    """when the engine publishes KV events (``kv_events_config``), feed them to the mesh index"""
    cost_aware: bool = True
    """count and load a remote chunk only when fetching it is estimated faster than recomputing"""
    prefill_tokens_per_s: float | None = None
    """this engine's prefill rate for those estimates; None = measured from its own steps"""

    def __post_init__(self) -> None:
        check_adapter_settings(self)
        if self.load_failure_policy not in ("recompute", "fail"):
            raise ValueError(
                f"load_failure_policy must be 'recompute' or 'fail', got {self.load_failure_policy!r}"
            )

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

    def store_config(self) -> StoreConfig:
        return adapter_store_config(self)
