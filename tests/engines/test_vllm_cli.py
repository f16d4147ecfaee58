"""lmcache-vllm's argument rewriting (the launcher itself runs in tests/e2e/test_vllm_real_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcache_mesh.engines.vllm.cli import vllm_args


def fake_checkpoint() -> Path:
    return Path("/models/smollm2-hf")


def test_serve_node_becomes_the_connector_config() -> None:
    args = vllm_args(["serve", "/m", "--node", "tcp://10.0.0.1:7700", "--chunk-tokens=64", "--port", "8000"])
    assert args[:4] == ["serve", "/m", "--port", "8000"]
    config = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert config["kv_connector"] == "MeshConnector" and config["kv_role"] == "kv_both"
    assert config["kv_connector_extra_config"] == {"node": "tcp://10.0.0.1:7700", "chunk_tokens": 64}


def test_an_explicit_connector_config_wins_and_other_arguments_pass_unchanged() -> None:
    given = ["serve", "/m", "--kv-transfer-config", "{}", "--node", "tcp://h:1"]
    assert vllm_args(given) == ["serve", "/m", "--kv-transfer-config", "{}"]
    assert vllm_args(["bench", "serve", "--model", "x"]) == ["bench", "serve", "--model", "x"]
    with pytest.raises(SystemExit, match="--chunk-tokens goes with --node"):
        vllm_args(["serve", "/m", "--chunk-tokens", "64"])


def test_smollm2_names_the_converted_checkpoint() -> None:
    args = vllm_args(["serve", "smollm2"], smollm2=fake_checkpoint)
    assert args == ["serve", str(fake_checkpoint()), "--served-model-name", "smollm2"]
    args = vllm_args(
        ["bench", "serve", "--model", "smollm2", "--tokenizer", "smollm2"], smollm2=fake_checkpoint
    )
    assert args == ["bench", "serve", "--model", "smollm2", "--tokenizer", str(fake_checkpoint())]
