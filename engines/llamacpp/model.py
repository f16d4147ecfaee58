"""``MeshLlama``: a ``llama_cpp.Llama`` whose prompts reuse KV from the mesh.

Every way of prompting a Llama (``create_completion``, ``create_chat_completion``,
``__call__``, streaming or not) ends in :meth:`Llama.generate`, so that is the one place
hooked: restore before llama-cpp-python's own prefix matching runs, save once the
generator is finished or closed.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from typing import Any

from llama_cpp import Llama

from .config import LlamaMeshConfig
from .reuse import KVReuse

_RESET_POSITION = 6
"""index of ``reset`` among Llama.generate's positional parameters after ``tokens``"""


class MeshLlama(Llama):  # type: ignore[misc]  # llama_cpp is not type-checked (follow_imports = skip)
    """``Llama(*args, mesh=LlamaMeshConfig(...), **kwargs)``: all Llama arguments, plus the mesh's.

    ``abort``: when set to an Event, generation stops at the next token once it is set
    (servers use it for clients that went away).
    """

    mesh: KVReuse
    abort: threading.Event | None = None

    def __init__(self, *args: Any, mesh: LlamaMeshConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mesh = KVReuse(self, mesh)

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Generator[int, Any, None]:
        reset = args[_RESET_POSITION] if len(args) > _RESET_POSITION else kwargs.get("reset", True)
        if reset:
            self.mesh.before_prefill(tokens)
        else:
            self.mesh.continue_prompt(tokens)
        inner = super().generate(tokens, *args, **kwargs)
        abort = self.abort
        first = True
        try:
            sent = None  # generate() takes extra (draft) tokens through send()
            while abort is None or not abort.is_set():
                try:
                    token = inner.send(sent)
                except StopIteration:
                    return
                if first:
                    first = False
                    self.mesh.first_token()
                sent = yield token
        finally:
            inner.close()
            self.mesh.after_generation()

    def close(self) -> None:
        mesh = getattr(self, "mesh", None)
        if mesh is not None:
            mesh.close()
        super().close()


def attach(llm: Llama, mesh: LlamaMeshConfig | None = None) -> MeshLlama:
    """Turn an existing ``Llama`` into a :class:`MeshLlama` (its current KV state is cleared).

    If the mesh side cannot be set up, this raises and leaves ``llm`` a plain Llama.
    """
    if isinstance(llm, MeshLlama):
        raise ValueError("this Llama already uses the mesh")
    reuse = KVReuse(llm, mesh)
    llm.__class__ = MeshLlama
    assert isinstance(llm, MeshLlama)
    llm.mesh = reuse
    return llm
