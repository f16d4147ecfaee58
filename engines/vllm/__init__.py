"""vLLM adapter: ``MeshConnector`` (a v1 KV connector) and the KV-events ingest.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "MeshConnector",
        "kv_connector_module_path": "lmcache_mesh.engines.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"node": "tcp://127.0.0.1:7700", "chunk_tokens": 256}}'

``MeshConnector`` is imported on first use, so the torch-only parts (layouts) load without vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MeshConnector"]


def __getattr__(name: str) -> Any:
    if name == "MeshConnector":  # vLLM's factory looks the class up with getattr
        from .connector import MeshConnector

        return MeshConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
