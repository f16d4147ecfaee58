"""The engine adapters' configs share one base for their common fields and checks."""

from __future__ import annotations

from dataclasses import fields

import pytest

from lmcache_mesh.engines.adapter_config import AdapterConfig
from lmcache_mesh.engines.llamacpp.config import LlamaMeshConfig
from lmcache_mesh.engines.vllm.config import VllmMeshConfig


def test_both_adapters_extend_the_one_base_with_only_their_own_fields() -> None:
    common = {f.name for f in fields(AdapterConfig)}
    assert {"node", "chunk_tokens", "tenant", "key_file", "server_key", "lookup_timeout_s", "codec"} <= common
    assert {f.name for f in fields(LlamaMeshConfig)} - common == {
        "node_config",
        "save_completions",
        "tail_tokens",
    }
    assert {f.name for f in fields(VllmMeshConfig)} - common == {
        "load_failure_policy",
        "engine_name",
        "ingest_events",
        "layerwise",
        "pin_shared_memory",
        "async_loads",
        "tails",
    }
    assert VllmMeshConfig().max_pending_save_bytes == 2 * LlamaMeshConfig().max_pending_save_bytes


@pytest.mark.parametrize("cls", [LlamaMeshConfig, VllmMeshConfig])
@pytest.mark.parametrize(
    "bad, message",
    [
        ({"chunk_tokens": 0}, "chunk_tokens must be positive, got 0"),
        ({"fetch_timeout_s": 0}, "fetch_timeout_s must be positive"),
        ({"key_file": "k"}, "CurveZMQ needs both key_file"),
        ({"tenant": "a b"}, "tenant 'a b' must be"),
    ],
)
def test_the_shared_checks_run_for_every_adapter(
    cls: type[AdapterConfig], bad: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**bad)  # type: ignore[arg-type]


def test_vllm_reads_its_extra_config_and_names_unknown_keys() -> None:
    cfg = VllmMeshConfig.from_extra({"node": "tcp://127.0.0.1:7700", "chunk_tokens": 64})
    assert cfg.store_config().node == "tcp://127.0.0.1:7700" and cfg.chunk_tokens == 64
    with pytest.raises(ValueError, match="unknown MeshConnector setting"):
        VllmMeshConfig.from_extra({"chunk_size": 64})
    with pytest.raises(ValueError, match="async_loads must be one of remote, always, never, got 'sometimes'"):
        VllmMeshConfig.from_extra({"async_loads": "sometimes"})
