"""Random-weight Hugging Face Llama models for tests, benchmarks and demos (no downloads).

    python -m lmcache_mesh.engines.vllm.tinymodel OUT_DIR [--seed N] [--max-len N]

vLLM loads them with ``skip_tokenizer_init=True`` and token-id prompts. Needs torch and
transformers (both come with vLLM).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def write_model(
    out_dir: str | Path, seed: int = 0, max_len: int = 2048, layers: int = 2, hidden: int = 128
) -> Path:
    """A tiny LlamaForCausalLM (vocab 512, 4 heads / 2 KV heads, head dim 32) saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max_len,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    out = Path(out_dir)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="write a random-weight Hugging Face Llama")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0, help="another seed = another model of the same shape")
    parser.add_argument("--max-len", type=int, default=2048)
    args = parser.parse_args()
    print(f"wrote {write_model(args.out_dir, args.seed, args.max_len)}")


if __name__ == "__main__":
    main()
