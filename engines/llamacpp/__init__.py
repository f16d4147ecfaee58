"""llama.cpp adapter: chunk-level KV reuse for llama-cpp-python through the mesh.

    from lmcache_mesh.engines.llamacpp import MeshLlama, LlamaMeshConfig
    llm = MeshLlama(model_path="model.gguf", n_ctx=4096,
                    mesh=LlamaMeshConfig(node="tcp://127.0.0.1:7700"))
    llm.create_completion(prompt, max_tokens=64)   # reuses cached prefix chunks

Importing this package needs ``llama-cpp-python`` (``pip install -e '.[llama]'`` in the checkout).
"""

from ..fingerprint import model_fingerprint
from .config import LlamaMeshConfig
from .model import MeshLlama, attach
from .reuse import KVReuse

__all__ = ["KVReuse", "LlamaMeshConfig", "MeshLlama", "attach", "model_fingerprint"]
