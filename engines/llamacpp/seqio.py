"""Reading and restoring llama.cpp sequence state through the C API (sequence 0)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llama_cpp import Llama


def read_sequence(llm: Llama) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Sequence 0's state blob, copied out of the context."""
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    blob = np.empty(size, dtype=np.uint8)
    written = llama_cpp.llama_state_seq_get_data(
        llm.ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0
    )
    return blob[:written]


def restore_sequence(llm: Llama, blob: np.ndarray[Any, np.dtype[np.uint8]], tokens: Sequence[int]) -> bool:
    """Replace sequence 0 with ``blob`` (holding ``tokens``); False if llama.cpp refused it."""
    import llama_cpp

    read = llama_cpp.llama_state_seq_set_data(
        llm.ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), len(blob), 0
    )
    if read != len(blob):
        # A refused restore leaves the sequence empty: the bookkeeping must say so.
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.n_tokens = 0
        llm._requires_eval = True
        return False
    n = len(tokens)
    llm.input_ids[:n] = tokens
    llm.n_tokens = n
    # The restored state has no logits: generate() must decode at least one token.
    llm._requires_eval = True
    return True
