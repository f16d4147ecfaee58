"""``MeshLlama``: a ``llama_cpp.Llama`` whose prompts reuse KV from the mesh.

Every way of prompting a Llama (``create_completion``, ``create_chat_completion``,
``__call__``, streaming or not) ends in :meth:`Llama.generate`, so that is the one place
hooked: restore before llama-cpp-python's own prefix matching runs, save once the
generator is finished or closed.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from llama_cpp import Llama

from .config import LlamaMeshConfig
from .reuse import KVReuse

_RESET_POSITION = 6
"""index of ``reset`` among Llama.generate's positional parameters after ``tokens``"""


class MeshLlama(Llama):  # type: ignore[misc]  # llama_cpp ships no type information
    """``Llama(*args, mesh=LlamaMeshConfig(...), **kwargs)``: all Llama arguments, plus the mesh's."""

    mesh: KVReuse

    def __init__(self, *args: Any, mesh: LlamaMeshConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mesh = KVReuse(self, mesh)

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Generator[int, Any, None]:
        reset = args[_RESET_POSITION] if len(args) > _RESET_POSITION else kwargs.get("reset", True)
        if reset:
            self.mesh.before_prefill(tokens)
        inner = super().generate(tokens, *args, **kwargs)
        try:
            yield from inner  # forwards send(): generate() takes draft tokens that way
        finally:
            inner.close()
            self.mesh.after_generation()

    def close(self) -> None:
        mesh = getattr(self, "mesh", None)
        if mesh is not None:
            mesh.close()
        super().close()


def attach(llm: Llama, mesh: LlamaMeshConfig | None = None) -> MeshLlama:
    """Turn an existing ``Llama`` into a :class:`MeshLlama` (its current KV state is cleared)."""
    if isinstance(llm, MeshLlama):
        raise ValueError("this Llama already uses the mesh")
    llm.__class__ = MeshLlama
    assert isinstance(llm, MeshLlama)
    llm.mesh = KVReuse(llm, mesh)
    return llm
