"""What a llama.cpp engine's KV depends on: the namespace's model fingerprint and layout.

llama.cpp accepts any blob of the right shape, so everything that changes K or V for the
same tokens must be in the namespace: the weights (every shard of the GGUF), a LoRA
adapter and its scale, metadata overrides, the RoPE/YaRN settings of the context, whether
the context runs past the trained length (some models switch RoPE factors there), the KV
types and V layout, the blob format and the llama.cpp build. Settings left at their
defaults are recorded as such, so equal configurations always share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..fingerprint import model_fingerprint
from . import seqstate
from .seqio import read_sequence

if TYPE_CHECKING:
    from llama_cpp import Llama

ENGINE = "llama.cpp"
_ROPE_FIELDS = (
    "rope_scaling_type",
    "rope_freq_base",
    "rope_freq_scale",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_orig_ctx",
)


def probe_layout(llm: Llama) -> seqstate.BlobLayout:
    """The context's KV layout, read from the blob of a one-token decode (then cleared).

    Raises BlobError for contexts whose state is not one plain stream (sliding-window,
    recurrent or hybrid models), which the adapter cannot cut into chunks.
    """
    token = max(llm.token_bos(), 0)
    llm.reset()
    llm.eval([token])
    try:
        return seqstate.parse(read_sequence(llm)).layout
    finally:
        llm._ctx.kv_cache_clear()
        llm.n_tokens = 0
        llm._requires_eval = True


def compute_settings(llm: Llama, fingerprint_cache_dir: str | None) -> dict[str, Any]:
    """Engine settings besides the weights that change the KV of the same tokens."""
    params = llm.context_params
    settings: dict[str, Any] = {name: _plain(getattr(params, name)) for name in _ROPE_FIELDS}
    settings["past_trained_ctx"] = llm.n_ctx() > llm._model.n_ctx_train()
    if llm.kv_overrides:
        settings["kv_overrides"] = {str(k): _plain(v) for k, v in sorted(llm.kv_overrides.items())}
    if llm.lora_path:
        settings["lora"] = model_fingerprint(llm.lora_path, fingerprint_cache_dir).hex()
        settings["lora_scale"] = float(llm.lora_scale)
        if llm.lora_base:
            settings["lora_base"] = model_fingerprint(llm.lora_base, fingerprint_cache_dir).hex()
    return settings


def _plain(value: Any) -> Any:
    """A msgpack-able, exactly comparable form (floats by repr, so equal settings stay equal)."""
    return value if isinstance(value, bool | int | str) or value is None else repr(value)


def layout_descriptor(
    llm: Llama, layout: seqstate.BlobLayout, compute: dict[str, Any], lossy_codec: str | None = None
) -> dict[str, Any]:
    """The namespace's layout part: engine and build, blob layout, heads, compute settings,
    and the lossy codec chunks are stored in, if any (KV that is not the engine's own)."""
    import llama_cpp

    n_kv_heads = int(llama_cpp.llama_model_n_head_kv(llm.model))
    descriptor: dict[str, Any] = {
        "engine": ENGINE,
        "engine_version": llama_cpp.__version__,
        **layout.descriptor(),
        "n_kv_heads": n_kv_heads,
    }
    el = seqstate.FLOAT_BYTES.get(layout.k_type)
    if el is not None and n_kv_heads > 0:
        descriptor["head_dim"] = layout.k_row // el // n_kv_heads
    descriptor["compute"] = compute
    if lossy_codec is not None:
        descriptor["codec"] = lossy_codec
    return descriptor
