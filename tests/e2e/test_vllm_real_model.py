"""vLLM on a real trained model: SmolLM2-135M-Instruct, turned from the registry's GGUF into
a Hugging Face checkpoint (safetensors and its real tokenizer), prompted through its chat
template. A second engine process reuses the document the first one read, and answers the
same greedy text as an engine without the mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..helpers import Daemon, free_port
from .llama import require
from .test_real_model import DOCUMENT
from .test_vllm import CHUNK, run_engine, stored_chunks, wait_until

require("vllm")
require("accelerate")

QUESTIONS = (
    "In which year was the lighthouse of Varn built?",
    "Who was the last keeper of the lighthouse?",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmcache_mesh.engines.llamacpp.smollm2 import available
    from lmcache_mesh.engines.vllm.smollm2 import write_checkpoint

    if not available():
        pytest.fail("SmolLM2 is not installed (the test extra installs it)", pytrace=False)
    # where `lmcache-vllm ... smollm2` keeps it, under the XDG_CACHE_HOME its test sets
    return write_checkpoint(tmp_path_factory.mktemp("cache") / "lmcache-mesh" / "smollm2-hf")


def chat_tokens(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": f"{DOCUMENT}\n\n{question}"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


@pytest.mark.timeout(600)
def test_a_second_engine_reuses_the_document_and_answers_the_same(checkpoint: Path, daemon: Daemon) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    first_q, second_q = (chat_tokens(tokenizer, q) for q in QUESTIONS)
    shared = next(i for i, (a, b) in enumerate(zip(first_q, second_q, strict=False)) if a != b)
    assert shared > 4 * CHUNK, "the document is the long shared opening of both prompts"

    first = run_engine(checkpoint, [first_q], daemon.tcp, max_tokens=16)
    assert first[0]["cached"] == 0
    whole = len(first_q) // CHUNK
    assert wait_until(lambda: stored_chunks(daemon) >= whole, 30) is not None

    second = run_engine(checkpoint, [second_q], daemon.tcp, max_tokens=16)
    baseline = run_engine(checkpoint, [first_q, second_q], None, max_tokens=16)
    assert second[0]["cached"] == (shared // CHUNK) * CHUNK  # the document's whole chunks
    assert [first[0]["tokens"], second[0]["tokens"]] == [r["tokens"] for r in baseline]
    answers = [tokenizer.decode(r["tokens"], skip_special_tokens=True) for r in baseline]
    assert "1871" in answers[0], answers  # real text: the model read the document
    assert answers[1].isprintable() and len(answers[1].split()) >= 5, answers


def lmcache_vllm(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmcache_mesh.engines.vllm.cli", *args]


def cli_env(checkpoint: Path) -> dict[str, str]:
    # the converted checkpoint is found where lmcache-vllm keeps it: no second conversion
    xdg = checkpoint.parent.parent
    return {**os.environ, "XDG_CACHE_HOME": str(xdg), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}


def wait_served(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "lmcache-vllm serve exited"
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"lmcache-vllm serve did not answer within {timeout_s:.0f} s")


@pytest.mark.timeout(600)
def test_lmcache_vllm_serves_smollm2_with_the_mesh_and_vllms_own_benchmark_runs(
    checkpoint: Path, daemon: Daemon, tmp_path: Path
) -> None:
    """`lmcache-vllm serve smollm2 --node ADDR` (vLLM's own server, under vllm-cpu) answers
    through the official openai client, a second question about the same document is a
    mesh hit (vLLM's own prefix cache off), and `lmcache-vllm bench serve` runs against it."""
    from openai import OpenAI

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        lmcache_vllm("serve", "smollm2", "--node", daemon.tcp, "--chunk-tokens", str(CHUNK), "--port", str(port),
                     "--host", "127.0.0.1", "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
                     "--block-size", "32", "--no-enable-prefix-caching"),
        stdout=log, stderr=subprocess.STDOUT, env=cli_env(checkpoint),
    )  # fmt: skip
    try:
        wait_served(url, serve, 400)
        client = OpenAI(base_url=f"{url}/v1", api_key="none")

        def ask(question: str) -> str:
            stream = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": f"{DOCUMENT}\n\n{question}"}],
                max_tokens=16,
                temperature=0.0,
                stream=True,
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

        first = ask(QUESTIONS[0])
        assert "1871" in first, first
        assert wait_until(lambda: stored_chunks(daemon) >= 4, 30) is not None
        before = daemon.stats()["counters"]
        second = ask(QUESTIONS[1])
        after = daemon.stats()["counters"]
        assert second.strip(), second
        assert after["lookup_hit_keys"] - before["lookup_hit_keys"] >= 4  # the document's chunks
        # what vLLM itself shows: its metric of external hits, and our line naming the node
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        hits = [
            line for line in metrics.splitlines() if line.startswith("vllm:external_prefix_cache_hits_total")
        ]
        assert hits and float(hits[0].split()[-1]) >= 4 * CHUNK, hits
        served = (tmp_path / "serve.log").read_text(errors="replace")
        assert "MeshConnector (scheduler): namespace" in served and f"node {daemon.tcp}" in served

        result = tmp_path / "bench.json"
        bench = subprocess.run(
            lmcache_vllm("bench", "serve", "--base-url", url, "--model", "smollm2", "--tokenizer", "smollm2",
                         "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "256",
                         "--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", "1",
                         "--prefix-repetition-output-len", "4", "--num-prompts", "4", "--max-concurrency", "1",
                         "--save-result", "--result-dir", str(tmp_path), "--result-filename", result.name),
            capture_output=True, text=True, timeout=300, env=cli_env(checkpoint),
        )  # fmt: skip
        assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
        report = json.loads(result.read_text())
        assert report["completed"] == 4 and report.get("failed", 0) == 0, report
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()
