"""What a vLLM engine's KV depends on: the namespace's model fingerprint and layout.

The fingerprint is of the weights (the model directory's config and weight files), never
the model's name. The layout names our canonical chunk form ``[layers, 2, tokens, kv_heads,
head_size]`` with its dtype, plus the settings that change K for the same tokens (RoPE).
The scheduler and every worker compute the same namespace from the same ``VllmConfig``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmcache_mesh.node.codecs import FLOAT_TYPES
from lmcache_mesh.node.keys import namespace_id

from ..codec import lossy_codec
from ..fingerprint import model_fingerprint
from .config import VllmMeshConfig

ENGINE = "vllm"
CHUNK_FORMAT = "L2THD-v1"
"""our payload: [layers, K/V, tokens, kv_heads, head_size], C order, cache dtype"""


def model_dir(vllm_config: Any) -> Path:
    """The local directory of the engine's weights (a path, or a Hugging Face cache snapshot)."""
    model = vllm_config.model_config.model
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    revision = getattr(vllm_config.model_config, "revision", None)
    return Path(snapshot_download(model, revision=revision, local_files_only=True))


def kv_dtype_name(vllm_config: Any) -> str:
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype and cache_dtype != "auto":
        return str(cache_dtype)
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def layout_descriptor(vllm_config: Any, lossy_codec: str | None = None) -> dict[str, Any]:
    """Our chunk form, the engine's KV shape and dtype, RoPE, and the lossy codec chunks are
    stored in, if any (KV that is not the engine's own)."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    text = getattr(mc, "hf_text_config", None)
    rope = {
        name: repr(getattr(text, name, None)) for name in ("rope_theta", "rope_scaling", "rope_parameters")
    }
    descriptor = {
        "engine": ENGINE,
        "chunk_format": CHUNK_FORMAT,
        "dtype": kv_dtype_name(vllm_config),
        "n_layers": mc.get_num_layers(pc),
        "n_kv_heads": mc.get_num_kv_heads(pc),
        "head_size": mc.get_head_size(),
        "past_trained_len": mc.max_model_len > getattr(text, "max_position_embeddings", mc.max_model_len),
        "rope": rope,
    }
    if lossy_codec is not None:
        descriptor["codec"] = lossy_codec
    return descriptor


def chunk_bytes(descriptor: dict[str, Any], chunk_tokens: int) -> int:
    """Payload bytes of one chunk in our canonical form (what the workers will move)."""
    name = str(descriptor["dtype"])
    dtype = getattr(torch, name, None)
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else (1 if "fp8" in name else 2)
    n: int = descriptor["n_layers"] * 2 * chunk_tokens * descriptor["n_kv_heads"] * descriptor["head_size"]
    return n * itemsize


def check_supported(vllm_config: Any) -> None:
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
        raise ValueError(
            "MeshConnector supports tensor_parallel_size=1 and pipeline_parallel_size=1 for now "
            f"(got {pc.tensor_parallel_size} and {pc.pipeline_parallel_size})"
        )


def engine_namespace(vllm_config: Any, config: VllmMeshConfig) -> tuple[bytes, dict[str, Any]]:
    """(namespace id, layout descriptor) of this engine."""
    check_supported(vllm_config)
    fingerprint = model_fingerprint(model_dir(vllm_config), config.fingerprint_cache_dir)
    # KV of a type the codecs do not take (fp8 caches) is stored raw: its namespace is raw's
    floats = kv_dtype_name(vllm_config) in FLOAT_TYPES
    descriptor = layout_descriptor(vllm_config, lossy_codec(config.codec) if floats else None)
    return namespace_id(fingerprint, descriptor, config.chunk_tokens, config.tenant), descriptor
