"""A vLLM engine process for the tests: greedy completions of token prompts, as JSON.

    python vllm_worker.py MODEL_DIR PROMPTS_JSON [--node ADDR] [--chunk N] [--events ENDPOINT] [--extra JSON]

Without --node the engine runs without any connector (the baseline). Prints one JSON line:
per prompt the generated token ids and vLLM's count of cached (externally loaded) tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("prompts", type=json.loads)
    parser.add_argument("--node")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--events", help="publish KV events on this ZMQ endpoint (turns prefix caching on)")
    parser.add_argument("--engine-name", help="the engine's name in the mesh index")
    parser.add_argument("--extra", type=json.loads, default={}, help="more kv_connector_extra_config keys")
    parser.add_argument(
        "--interactive", action="store_true", help="then obey stdin: 'reset' (prefix cache), 'quit'"
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw: dict = {}
    if args.node:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="MeshConnector",
            kv_connector_module_path="lmcache_mesh.engines.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={
                "node": args.node,
                "chunk_tokens": args.chunk,
                **({"engine_name": args.engine_name} if args.engine_name else {}),
                **args.extra,
            },
        )
    if args.events:
        kw["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=args.events, topic="kv"
        )
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=4,
        block_size=32,
        enable_prefix_caching=bool(args.events),
        **kw,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, detokenize=False, ignore_eos=True)
    results = []
    for prompt in args.prompts:  # one at a time: each sees the saves of the ones before
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        results.append({"tokens": list(out.outputs[0].token_ids), "cached": out.num_cached_tokens or 0})
    if args.node:
        from lmcache_mesh.engines.vllm.config import VllmMeshConfig
        from lmcache_mesh.engines.vllm.identity import engine_namespace

        mesh = VllmMeshConfig(chunk_tokens=args.chunk, codec=args.extra.get("codec", "raw"))
        namespace, _ = engine_namespace(llm.llm_engine.vllm_config, mesh)
        print("NAMESPACE " + namespace.hex(), flush=True)
    print("RESULT " + json.dumps(results), flush=True)
    if args.interactive:
        for line in sys.stdin:
            if line.strip() == "reset":
                assert llm.reset_prefix_cache()
                # Events go out with the next engine step: run one too short to fill a block.
                llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], params, use_tqdm=False)
                print("RESET", flush=True)
            elif line.strip() == "quit":
                break


if __name__ == "__main__":
    main()
