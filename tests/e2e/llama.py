"""Real llama-cpp-python engines for the tests: generated models, plain and mesh-backed Llamas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..helpers import require

__all__ = ["require"]


CHUNK = 64
ENGINE_KW: dict[str, Any] = {"n_ctx": 2048, "n_threads": 1, "n_threads_batch": 1, "verbose": False}


def write_models(root: Path) -> dict[str, Path]:
    from lmcache_mesh.engines.llamacpp.tinymodel import PRESETS, write_model

    tiny = PRESETS["tiny"]
    return {
        "tiny": write_model(root / "tiny.gguf", tiny),
        # same shape, other weights: its KV must never be used for "tiny"
        "twin": write_model(root / "twin.gguf", type(tiny)(seed=1)),
    }


def prompt(n: int, seed: int = 0) -> list[int]:
    """BOS and ``n - 1`` random ordinary tokens."""
    return [1, *np.random.default_rng(seed).integers(3, 500, n - 1).tolist()]


def plain(model: Path, **kw: Any) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(model), **{**ENGINE_KW, **kw})


def meshed(model: Path, node: str | None, **kw: Any) -> Any:
    from lmcache_mesh.engines.llamacpp import LlamaMeshConfig, MeshLlama

    mesh = LlamaMeshConfig(node=node, chunk_tokens=kw.pop("chunk_tokens", CHUNK), **kw.pop("mesh", {}))
    return MeshLlama(model_path=str(model), mesh=mesh, **{**ENGINE_KW, **kw})


def greedy(llm: Any, tokens: list[int], n: int = 16) -> str:
    """The greedy continuation's text."""
    out = llm.create_completion(tokens, max_tokens=n, temperature=0.0)
    text: str = out["choices"][0]["text"]
    return text


def last_logits(llm: Any) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def next_logits(llm: Any, tokens: list[int]) -> np.ndarray:
    """Logits of the token after ``tokens``, through the normal completion API."""
    llm.create_completion(tokens, max_tokens=1, temperature=0.0)
    return last_logits(llm)


def next_logits_split(llm: Any, tokens: list[int], split: int) -> np.ndarray:
    """Logits after evaluating ``tokens[:split]`` then the rest: the batches a restore leads to."""
    llm.reset()
    llm.eval(tokens[:split])
    llm.eval(tokens[split:])
    return last_logits(llm)
