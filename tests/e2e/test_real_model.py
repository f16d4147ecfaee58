"""Real text on a real trained model (SmolLM2-135M-Instruct, from the registry): its chat
template, streaming, and reuse that changes nothing — the same greedy text and the same
logits with a hit as without."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ..helpers import Daemon
from .llama import CHUNK, meshed, next_logits, next_logits_split, plain, require
from .test_readme import code

require("llama_cpp")

DOCUMENT = " ".join(
    [
        "The lighthouse of Varn stands on a granite cliff at the northern end of the island.",
        "It was built in 1871 by the harbour board after three ships were lost on the reef in one winter.",
        "Its lamp burned whale oil until 1902, then paraffin, and since 1958 it has been electric.",
        "The keeper's cottage next to the tower now houses a small museum about the island's fishing fleet.",
        "Visitors climb 132 steps to the gallery, from which the mainland is visible on clear days.",
        "The last keeper, Ada Morrow, left in 1987, when the light was automated.",
    ]
    * 4
)
QUESTION = "Question: In which year was the lighthouse of Varn built? Answer:"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from lmcache_mesh.engines.llamacpp.smollm2 import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (the test extra installs it)", pytrace=False)


@pytest.fixture
def engines(daemon: Daemon, smollm2: Path) -> Iterator[Any]:
    made: list[Any] = []

    def make(**kw: Any) -> Any:
        llm = meshed(smollm2, daemon.ipc, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


SAMPLING = {"max_tokens": 24, "temperature": 0.0, "repeat_penalty": 1.1}
"""greedy, with llama_cpp.server's repeat penalty (as `serve` uses): without it this small
quantized model loops"""


def chat(llm: Any, content: str, **kw: Any) -> str:
    out = llm.create_chat_completion([{"role": "user", "content": content}], **SAMPLING, **kw)
    return str(out["choices"][0]["message"]["content"])


def test_the_chat_template_answers_and_a_hit_answers_the_same(engines, smollm2: Path) -> None:  # type: ignore[no-untyped-def]
    reference = chat(plain(smollm2), "What is the capital of France?")
    assert "Paris" in reference  # a real model, a real answer
    first = engines()
    assert chat(first, "What is the capital of France?") == reference
    assert first.mesh.flush(30)
    # a long conversation opening: several chunks to reuse
    opening = DOCUMENT + "\n\nSummarise the text above in one sentence."
    cold = engines()
    answer = chat(cold, opening)
    assert cold.mesh.flush(30)
    warm = engines()
    assert chat(warm, opening) == answer == chat(plain(smollm2), opening)
    assert warm.mesh.stats.hit_tokens >= 4 * CHUNK
    # streaming gives the same text, token by token
    streamed = warm.create_chat_completion([{"role": "user", "content": opening}], **SAMPLING, stream=True)
    assert "".join(part["choices"][0]["delta"].get("content", "") for part in streamed) == answer


def test_document_questions_reuse_the_document_and_keep_text_and_logits(engines, smollm2: Path) -> None:  # type: ignore[no-untyped-def]
    reference = plain(smollm2)
    tokens = reference.tokenize((DOCUMENT + "\n\n" + QUESTION).encode())
    doc_tokens = len(reference.tokenize(DOCUMENT.encode()))
    expected = reference.create_completion(tokens, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert expected.strip()  # (a 135M model: readable, not always right)

    writer = engines()
    assert writer.create_completion(tokens, max_tokens=8, temperature=0.0)["choices"][0]["text"] == expected
    assert writer.mesh.flush(30)

    reader = engines()  # another engine, same node: the document comes from the mesh
    assert reader.create_completion(tokens, max_tokens=8, temperature=0.0)["choices"][0]["text"] == expected
    hit = reader.mesh.stats.hit_tokens
    assert hit >= (doc_tokens // CHUNK) * CHUNK - CHUNK
    assert hit > len(tokens) - 16 and hit % 16 == 0  # the same prompt: chunks and tail, all but < 16 tokens

    # restored chunks + the rest = the same two batches computed without the mesh, exactly
    again = engines()
    logits = next_logits(again, tokens)
    split = again.mesh.stats.hit_tokens
    assert split >= hit
    np.testing.assert_array_equal(logits, next_logits_split(plain(smollm2), tokens, split))
    assert logits.argmax() == next_logits(plain(smollm2), tokens).argmax()


def test_the_readme_python_example_answers_and_a_second_process_restores_the_guide(
    daemon: Daemon, smollm2: Path, tmp_path: Path
) -> None:
    """The README's MeshLlama block as a newcomer runs it, against a real node: it answers in
    words, saves the guide's chunks; the same block in a second process restores them and
    answers the same."""
    example = code("## llama.cpp", "python").replace("tcp://127.0.0.1:7700", daemon.tcp)
    script = tmp_path / "example.py"
    script.write_text(example + '\nprint("HIT TOKENS", llm.mesh.snapshot()["hit_tokens"])\n')

    def run() -> list[str]:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        return done.stdout.strip().splitlines()

    first, second = run(), run()
    *answers, saved, hits = first
    assert len(" ".join(answers).split()) >= 6, first  # two answers in words
    assert int(saved) >= 2 and hits == "HIT TOKENS 0", first  # the guide is two chunks and more
    assert second[:-2] == answers, (first, second)  # greedy: the same text with the restored guide
    assert int(second[-1].split()[-1]) >= 512, second
