"""vLLM on a real trained model: SmolLM2-135M-Instruct, turned from the registry's GGUF into
a Hugging Face checkpoint (safetensors and its real tokenizer), prompted through its chat
template. A second engine process reuses the document the first one read, and answers the
same greedy text as an engine without the mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ..helpers import Daemon
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
    return write_checkpoint(tmp_path_factory.mktemp("smollm2") / "hf")


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
