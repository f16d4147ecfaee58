"""An engine process for the multi-process tests: one greedy completion through a node.

    python llama_worker.py MODEL NODE TOKENS_JSON [--chunk N]

Prints one JSON line: the text, the tokens it restored from the mesh, its namespace and
the chunks it stored.
"""

from __future__ import annotations

import argparse
import json

from lmcache_mesh.engines.llamacpp import LlamaMeshConfig, MeshLlama


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("node")
    parser.add_argument("tokens", type=json.loads)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    llm = MeshLlama(
        model_path=args.model,
        n_ctx=2048,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
        mesh=LlamaMeshConfig(node=args.node, chunk_tokens=args.chunk),
    )
    out = llm.create_completion(args.tokens, max_tokens=16, temperature=0.0)
    llm.mesh.flush(60)
    stats = llm.mesh.stats
    print(
        json.dumps(
            {
                "text": out["choices"][0]["text"],
                "hit_tokens": stats.hit_tokens,
                "saved_chunks": stats.saved_chunks,
                "namespace": llm.mesh.namespace.hex(),
            }
        ),
        flush=True,
    )
    llm.close()


if __name__ == "__main__":
    main()
