"""Random-weight llama GGUF files for tests, benchmarks and demos (no downloads).

    python -m lmcache_mesh.engines.llamacpp.tinymodel out.gguf [--preset mid]

The vocabulary is SentencePiece-style (unk, bos, eos, the 256 byte tokens, then a few
hundred letters and bigrams), so llama.cpp tokenizes any text; the output is gibberish but
deterministic, which is all KV-reuse tests need. Needs the ``gguf`` package.
"""

from __future__ import annotations

import argparse
import string
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

SPM_SPACE = "\u2581"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    n_vocab: int = 512
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 256
    n_ctx: int = 4096
    f16: bool = False
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS = {
    "tiny": ModelSpec(),
    # Large enough that prefill dominates a request (benchmarks).
    "mid": ModelSpec(n_vocab=1000, n_embd=512, n_layer=8, n_head=8, n_head_kv=2, n_ff=1536, f16=True),
}


def spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types of a toy SentencePiece vocabulary of ``n_vocab`` tokens."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = (
        [int(gguf.TokenType.UNKNOWN)] + [int(gguf.TokenType.CONTROL)] * 2 + [int(gguf.TokenType.BYTE)] * 256
    )
    scores = [0.0] * len(tokens)
    letters = string.ascii_letters + string.digits
    candidates = [SPM_SPACE, *string.printable[:94], *(SPM_SPACE + c for c in letters)]
    candidates += [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    seen = set(tokens)
    for piece in candidates:
        if len(tokens) == n_vocab:
            break
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(int(gguf.TokenType.NORMAL))
            scores.append(len(piece) - len(tokens) * 1e-4)  # SPM merges prefer higher scores
    if len(tokens) < n_vocab:
        raise ValueError(f"the toy vocabulary has at most {len(tokens)} tokens, asked for {n_vocab}")
    return tokens, scores, types


def write_model(path: str | Path, spec: ModelSpec = PRESETS["tiny"]) -> Path:
    """Write a random llama GGUF for ``spec`` to ``path``; same spec, same bytes."""
    import gguf

    if spec.n_embd % spec.n_head or spec.n_head % spec.n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    rng = np.random.default_rng(spec.seed)
    wtype = np.float16 if spec.f16 else np.float32
    n_embd_kv = spec.head_dim * spec.n_head_kv

    def linear(n_out: int, n_in: int) -> np.ndarray:  # numpy shape = reversed ggml ne
        weights: np.ndarray = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(wtype)
        return weights

    def norm() -> np.ndarray:
        return np.ones(spec.n_embd, dtype=np.float32)

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"random-llama-{spec.n_embd}x{spec.n_layer}-seed{spec.seed}")
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(spec.n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if spec.f16 else gguf.LlamaFileType.ALL_F32))
    tokens, scores, types = spm_vocab(spec.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", rng.standard_normal((spec.n_vocab, spec.n_embd)).astype(wtype))
    for i in range(spec.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.attn_q.weight", linear(spec.n_embd, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", linear(n_embd_kv, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", linear(n_embd_kv, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", linear(spec.n_embd, spec.n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", linear(spec.n_ff, spec.n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", linear(spec.n_ff, spec.n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", linear(spec.n_embd, spec.n_ff))
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", linear(spec.n_vocab, spec.n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="write a random-weight llama GGUF")
    parser.add_argument("out", help="output .gguf path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0, help="another seed = another model of the same shape")
    args = parser.parse_args()
    spec = replace(PRESETS[args.preset], seed=args.seed)
    path = write_model(args.out, spec)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {spec}")


if __name__ == "__main__":
    main()
