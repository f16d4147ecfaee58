"""Two engine processes on two meshed nodes: what one computes, the other restores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmcache_mesh.node import Client, chunk_keys

from ..conftest import DaemonFactory
from ..helpers import free_port
from .llama import CHUNK, greedy, plain, prompt, require, write_models
from .test_mesh import members, start_node, wait_until

require("llama_cpp")

WORKER = Path(__file__).with_name("llama_worker.py")


def run_engine(model: Path, node: str, tokens: list[int]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(WORKER), str(model), node, json.dumps(tokens), "--chunk", str(CHUNK)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_engine_b_on_node_2_restores_what_engine_a_on_node_1_computed(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    model = write_models(tmp_path)["tiny"]
    ports = {i: free_port(f"127.0.0.{i}") for i in (41, 42)}
    one = start_node(daemon_factory, 41, ports[41])
    two = start_node(daemon_factory, 42, ports[42], "--join", one.tcp)
    assert wait_until(lambda: len(members(one)) == len(members(two)) == 2, 20) is not None

    tokens = prompt(5 * CHUNK + 7)
    a = run_engine(model, one.tcp, tokens)
    assert a["hit_tokens"] == 0 and a["saved_chunks"] == 5

    keys = chunk_keys(bytes.fromhex(a["namespace"]), tokens, CHUNK)
    with Client(two.tcp) as c:  # the chunks reach node 2's view of the mesh (index, replicas)
        assert wait_until(lambda: c.lookup(keys) == 5, 20) is not None

    b = run_engine(model, two.tcp, tokens)
    assert b["hit_tokens"] == 5 * CHUNK
    assert b["text"] == a["text"] == greedy(plain(model), tokens)


def test_chunks_fetched_from_a_peer_travel_reencoded_and_are_restored_exactly(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """An edge node with ``--wire-codec zstd`` asks its peer for raw chunks re-encoded for the
    trip: fewer bytes move, the edge keeps them as they came, and its engine decodes them into
    the same KV (same greedy text). Tails travel the same way."""
    from .llama import meshed

    model = write_models(tmp_path)["tiny"]
    cloud = start_node(daemon_factory, 43, free_port("127.0.0.43"), "--replicas", "1")
    # behind NAT: it owns no ring range, so the chunks reach it only by its own fetch
    edge = daemon_factory("--name", "edge", "--nat", "--join", cloud.tcp, "--disk", "0",
                          "--mesh-profile", "local", "--wire-codec", "zstd")  # fmt: skip
    assert wait_until(lambda: len(members(cloud)) == 2, 20) is not None
    tokens = prompt(5 * CHUNK + 40)
    writer = meshed(model, cloud.tcp)
    try:
        expected = greedy(writer, tokens)
        assert writer.mesh.flush()
    finally:
        writer.close()
    engine = meshed(model, edge.ipc)
    try:
        assert wait_until(
            lambda: engine.mesh.store.lookup(chunk_keys(engine.mesh.namespace, tokens, CHUNK)) == 5, 20
        )
        assert greedy(engine, tokens) == expected == greedy(plain(model), tokens)
        stats = engine.mesh.snapshot()
        assert stats["hit_tokens"] > 5 * CHUNK and stats["bad_chunks"] == 0  # chunks and the tail
    finally:
        engine.close()
    with Client(cloud.tcp) as c:
        sent = c.stats()["counters"]
    assert sent["wire_replies"] >= 1 and sent["wire_bytes_saved"] > 0
    with Client(edge.ipc) as c:
        held = c.stats()["tiers"]["memory"]["codecs"]
        assert held["zstd"]["records"] >= 5 and held["zstd"]["bytes"] < held["zstd"]["raw_bytes"]
        assert c.stats()["mesh"]["wire_raw_bytes"] > c.stats()["mesh"]["wire_fetched_bytes"] > 0
