"""TTFT of llama.cpp with and without the mesh: cold, miss, hit on the local node, hit on a peer.

Setup, all real: a generated random-weight llama GGUF large enough that prefill dominates
("mid": n_embd 512, 8 layers, 8/2 heads, f16, KV f16, 4 KiB of KV per token), two
``lmcache-node run`` daemons on 127.0.0.61 / 127.0.0.62 meshed over tcp (replicas 1, memory
tier only), and in this process a plain ``llama_cpp.Llama`` and a ``MeshLlama`` using node 1
over tcp, both with 1 thread (the machine has 2 shared cores).

TTFT is the time from calling ``generate()`` (the path every completion API takes) to its
first token: for the mesh engine it includes the LOOKUP, the GET, joining the chunks and
restoring them. Saving runs after the first token and is not timed; its queue is drained
between runs so it never overlaps a timed run. Per prompt length N (all full chunks of 256):

* cold: the plain engine, empty context (baseline);
* miss: the mesh engine on a prompt nobody cached (the LOOKUP misses), interleaved with the
  cold runs so both see the same machine noise;
* hit local: the mesh engine, empty context, the prompt's chunks on node 1;
* hit peer: the same, with the chunks only on node 2 (deleted from node 1 before each run):
  node 1 finds the holder through the mesh index and fetches over tcp. Node 1 may pull a
  few of them back on its own before the run (it owns them on the ring and repairs its
  replica), so the table reports the share of chunks that really came from the peer.

Ratios use medians. It prints a table and writes JSON (machine info, cells, ratios, targets,
pass/fail) to ``bench/results/bench_llamacpp.json`` unless ``--out`` says otherwise.

Run:  python bench/bench_llamacpp.py            (1k, 2k, 4k tokens; a few minutes)
      python bench/bench_llamacpp.py --quick    (1k and 2k, fewer runs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import machine_info, start_mesh_daemon, wait_for, write_results

from lmcache_mesh.engines.cli.launch import Daemon
from lmcache_mesh.engines.cli.tables import render, table
from lmcache_mesh.node import Client, chunk_keys

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_llamacpp.json"
CHUNK = 256
TARGETS = {"hit_local_2k": 0.05, "hit_peer_2k": 0.10, "miss_overhead": 1.02}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompt(n: int, seed: int) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(3, 1000, n - 1).tolist()]


def ttft(llm: Any, tokens: list[int]) -> float:
    """Seconds to the first generated token from an empty context; the rest is not timed."""
    llm.reset()
    start = time.perf_counter()
    gen = llm.generate(tokens, temp=0.0)
    next(gen)
    took = time.perf_counter() - start
    gen.close()  # the mesh engine queues its save here
    return took


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def measure(
    n: int, reps: int, hit_reps: int, plain: Any, meshed: Any, node1: Client, node2: Client
) -> dict[str, Any]:
    cold, miss = [], []
    hits_before = meshed.mesh.stats.hit_tokens
    for r in range(reps):  # interleaved so both see the same noise
        cold.append(ttft(plain, prompt(n, seed=1000 * n + r)))
        miss.append(ttft(meshed, prompt(n, seed=2000 * n + r)))
        meshed.mesh.flush(120)
    if meshed.mesh.stats.hit_tokens != hits_before:
        raise RuntimeError("a miss prompt hit the cache")

    local_prompt = prompt(n, seed=2000 * n)  # cached on node 1 by the first miss run
    keys = chunk_keys(meshed.mesh.namespace, local_prompt, CHUNK)
    if wait_for(lambda: node1.lookup(keys, local=True) == len(keys), 30) is None:
        raise RuntimeError("the miss run's chunks never reached node 1")
    before = meshed.mesh.stats.hit_tokens
    hit_local = [ttft(meshed, local_prompt) for _ in range(hit_reps)]
    assert meshed.mesh.stats.hit_tokens - before == hit_reps * (n - n % CHUNK)

    # Chunks only on node 2: copy them there, then keep deleting them from node 1.
    peer_prompt = prompt(n, seed=3000 * n)
    ttft(meshed, peer_prompt)
    meshed.mesh.flush(120)
    peer_keys = chunk_keys(meshed.mesh.namespace, peer_prompt, CHUNK)
    wait_for(lambda: node1.lookup(peer_keys, local=True) == len(peer_keys), 30)
    records = node1.get_records(peer_keys, local=True)
    if any(r is None for r in records):
        raise RuntimeError("could not read the peer prompt's chunks back from node 1")
    node2.put_records([r for r in records if r is not None], replica=True)
    hit_peer, remote_before = [], node1.stats()["mesh"].get("remote_hits", 0)
    for _ in range(hit_reps):
        node1.delete(peer_keys)
        if (
            wait_for(
                lambda: (
                    node1.lookup(peer_keys, local=True) == 0 and node1.lookup(peer_keys) == len(peer_keys)
                ),
                30,
            )
            is None
        ):
            raise RuntimeError("node 1 does not see node 2's copy of the chunks")
        before = meshed.mesh.stats.hit_tokens
        hit_peer.append(ttft(meshed, peer_prompt))
        if meshed.mesh.stats.hit_tokens - before != n - n % CHUNK:
            raise RuntimeError("a peer run did not restore the whole prompt")
        meshed.mesh.flush(120)
    remote = node1.stats()["mesh"].get("remote_hits", 0) - remote_before
    cell = {
        "tokens": n,
        "cold_ms": median_ms(cold),
        "miss_ms": median_ms(miss),
        "hit_local_ms": median_ms(hit_local),
        "hit_peer_ms": median_ms(hit_peer),
        "samples_ms": {k: [x * 1e3 for x in v] for k, v in
                       {"cold": cold, "miss": miss, "hit_local": hit_local, "hit_peer": hit_peer}.items()},
        "remote_chunks_fetched": remote,
        "remote_share": remote / (hit_reps * (n // CHUNK)),
        "kv_mb": meshed.mesh.chunk_bytes * (n // CHUNK) / 1e6,
    }  # fmt: skip
    cell["hit_local_ratio"] = cell["hit_local_ms"] / cell["cold_ms"]
    cell["hit_peer_ratio"] = cell["hit_peer_ms"] / cell["cold_ms"]
    cell["miss_ratio"] = cell["miss_ms"] / cell["cold_ms"]
    return cell


def same_output(plain: Any, meshed: Any, n: int) -> bool:
    """Greedy text with a hit equals the plain engine's (the correctness tests do this in depth)."""
    tokens = prompt(n, seed=2000 * n)
    plain.reset()
    meshed.reset()
    a = plain.create_completion(tokens, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    b = meshed.create_completion(tokens, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    return bool(a == b)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    from lmcache_mesh.engines.llamacpp import LlamaMeshConfig, MeshLlama
    from lmcache_mesh.engines.llamacpp.tinymodel import PRESETS, write_model

    lengths = [1024, 2048] if args.quick else [1024, 2048, 4096]
    reps, hit_reps = (2, 3) if args.quick else (3, 5)
    workdir = Path(tempfile.mkdtemp(prefix="lmbl-"))
    model = write_model(workdir / "mid.gguf", PRESETS["mid"])
    log(f"model {model.name}: {PRESETS['mid']}")
    kw: dict[str, Any] = {"n_ctx": max(lengths) + 256, "n_threads": 1, "n_threads_batch": 1, "verbose": False}
    daemons: list[Daemon] = []
    try:
        daemons.append(start_mesh_daemon(61, None, "--replicas", "1", "--max-record", "64MiB", memory="2GiB"))
        daemons.append(
            start_mesh_daemon(62, daemons[0].tcp, "--replicas", "1", "--max-record", "64MiB", memory="2GiB")
        )
        one, two = daemons
        with one.client(30) as node1, two.client(30) as node2:
            if (
                wait_for(lambda: len(node1.stats()["members"]) == len(node2.stats()["members"]) == 2, 30)
                is None
            ):
                raise RuntimeError("the two nodes did not form a mesh")
            plain = Llama(model_path=str(model), **kw)
            meshed = MeshLlama(
                model_path=str(model), mesh=LlamaMeshConfig(node=one.tcp, chunk_tokens=CHUNK), **kw
            )
            cells = []
            for n in lengths:
                log(f"N={n}: cold/miss x{reps}, hits x{hit_reps} ...")
                cells.append(measure(n, reps, hit_reps, plain, meshed, node1, node2))
                log(json.dumps({k: v for k, v in cells[-1].items() if k != "samples_ms"}))
            identical = same_output(plain, meshed, lengths[0])
            stats = meshed.mesh.snapshot()
            meshed.close()
    finally:
        for d in daemons:
            d.stop()
    at2k = next(c for c in cells if c["tokens"] == 2048)
    checks = {
        "hit_local_2k": at2k["hit_local_ratio"] <= TARGETS["hit_local_2k"],
        "hit_peer_2k": at2k["hit_peer_ratio"] <= TARGETS["hit_peer_2k"],
        "miss_overhead": all(c["miss_ratio"] <= TARGETS["miss_overhead"] for c in cells),
        "same_greedy_output": identical,
    }
    return {
        "machine": machine_info(model=str(PRESETS["mid"]), chunk_tokens=CHUNK, threads=1),
        "cells": cells,
        "targets": TARGETS,
        "pass": checks,
        "adapter_stats": stats,
    }


def print_table(result: dict[str, Any]) -> None:
    cells = table(
        "tokens", "KV MB", "cold ms", "miss ms", "miss/cold", "hit local ms", "local/cold", "hit peer ms",
        "peer/cold", "from peer",
    )  # fmt: skip
    fmt: Callable[[float], str] = lambda x: f"{x:.1f}"  # noqa: E731
    for c in result["cells"]:
        cells.add_row(
            str(c["tokens"]), fmt(c["kv_mb"]), fmt(c["cold_ms"]), fmt(c["miss_ms"]), f"{c['miss_ratio']:.3f}",
            fmt(c["hit_local_ms"]), f"{c['hit_local_ratio']:.3f}", fmt(c["hit_peer_ms"]), f"{c['hit_peer_ratio']:.3f}",
            f"{100 * c['remote_share']:.0f}%",
        )  # fmt: skip
    print(render(cells, indent=0))
    t = result["targets"]
    print(
        f"targets: hit local/cold <= {t['hit_local_2k']} and hit peer/cold <= {t['hit_peer_2k']} at 2048 tokens; "
        f"miss/cold <= {t['miss_overhead']}"
    )
    print("pass:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in result["pass"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1k and 2k tokens, fewer runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    write_results(result, args.out)


if __name__ == "__main__":
    main()
