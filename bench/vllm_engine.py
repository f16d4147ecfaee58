"""One vLLM engine for bench_vllm.py, driven over stdin/stdout with JSON lines.

    python vllm_engine.py MODEL_DIR [--node ADDR] [--chunk N] [--max-len N] [--prefix-cache] [--extra JSON]

Commands (one JSON object per line): {"prompt": [token ids], "max_tokens": n (1)} -> {"s":
seconds for the generation (with 1 token: TTFT), "cached": tokens vLLM did not compute,
"tokens": the greedy token ids}; {"quit": true}.
Prefix caching is off unless --prefix-cache, so any reuse comes from the connector.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--node")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--prefix-cache", action="store_true", help="vLLM's own prefix cache on")
    parser.add_argument("--extra", type=json.loads, default={}, help="more kv_connector_extra_config keys")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = {}
    if args.node:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="MeshConnector",
            kv_connector_module_path="lmcache_mesh.engines.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"node": args.node, "chunk_tokens": args.chunk, **args.extra},
        )
    llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=args.max_len, max_num_seqs=2, block_size=32, enable_prefix_caching=args.prefix_cache, **kw)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 6, 7])], params, use_tqdm=False)  # warm-up
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        asked = SamplingParams(temperature=0.0, max_tokens=cmd.get("max_tokens", 1), detokenize=False)
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=cmd["prompt"])], asked, use_tqdm=False)[0]
        took = time.perf_counter() - start
        reply = {"s": took, "cached": out.num_cached_tokens or 0, "tokens": list(out.outputs[0].token_ids)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
