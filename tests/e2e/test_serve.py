"""`lmcache-node serve`: the official openai client against real servers backed by a node."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..helpers import Daemon, free_port
from .llama import plain, require, write_models

require("llama_cpp")
openai = require("openai")
httpx = require("httpx")

PROMPT = "The quick brown fox jumps over the lazy dog. " * 16  # ~ 300 tokens: several chunks of 64


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    lines: list[str]

    def client(self) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=60, max_retries=0)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=10).json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("models"))["tiny"]


@pytest.fixture
def servers(model: Path) -> Iterator[Any]:
    started: list[Server] = []

    def start(*extra: str) -> Server:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache_mesh.engines.cli", "serve", "--model", str(model), "--port", str(port),
             "--threads", "1", "--chunk-tokens", "64", "--alias", "tiny", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        lines: list[str] = []
        ready: queue.Queue[bool] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "Uvicorn running" in line:
                    ready.put(True)
            ready.put(False)

        threading.Thread(target=pump, daemon=True).start()
        server = Server(proc, f"http://127.0.0.1:{port}", lines)
        started.append(server)
        try:
            ok = ready.get(timeout=60)
        except queue.Empty:
            ok = False
        assert ok, "server did not start:\n" + "".join(lines)
        return server

    yield start
    for s in started:
        s.proc.terminate()
        try:
            s.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            s.proc.kill()


def completion(server: Server, stream: bool = False) -> str:
    c = server.client()
    if stream:
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))  # fmt: skip
    return c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text  # type: ignore[no-any-return]


def test_the_second_identical_request_is_served_from_the_cache(servers, daemon: Daemon, model: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = servers("--node", daemon.tcp), servers("--node", daemon.tcp)
    assert [m.id for m in first.client().models.list().data] == ["tiny"]

    text = completion(first)
    expected = plain(model).create_completion(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert text == expected
    assert first.health()["mesh"]["hit_tokens"] == 0

    # The same request on another server (another process, same node): restored, same text.
    for _ in range(50):  # the first server stores its chunks in the background
        if first.health()["mesh"]["saver"]["done"] >= 1:
            break
        threading.Event().wait(0.1)
    assert completion(second, stream=True) == text
    assert second.health()["mesh"]["hit_tokens"] >= 4 * 64


def test_chat_streaming_and_not_and_an_embedded_node(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = servers("--data-dir", str(tmp_path / "node"), "--disk", "64MiB", "--memory", "64MiB")
    c = server.client()
    messages = [{"role": "system", "content": "Be brief. " * 40}, {"role": "user", "content": "Hello!"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    streamed = c.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == whole.choices[0].message.content
    # Another conversation, then the first again: its prefix comes back from the embedded node.
    c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Other " * 80}], max_tokens=2
    )
    again = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == whole.choices[0].message.content
    assert server.health()["mesh"]["hit_tokens"] >= 2 * 64


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_persists_the_embedded_cache_and_a_restart_reuses_it(  # type: ignore[no-untyped-def]
    servers, tmp_path: Path, stop: signal.Signals
) -> None:
    """systemd and Kubernetes stop services with SIGTERM: it must save like Ctrl-C does."""
    flags = ("--data-dir", str(tmp_path / "node"), "--disk", "64MiB", "--memory", "64MiB")
    first = servers(*flags)
    text = completion(first)
    first.proc.send_signal(stop)
    assert first.proc.wait(timeout=60) == 0, "".join(first.lines)
    assert list((tmp_path / "node").rglob("*.rec")), "".join(first.lines)
    second = servers(*flags)
    assert completion(second) == text
    assert second.health()["mesh"]["hit_tokens"] >= 4 * 64


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(servers, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    server = servers("--node", daemon.tcp)
    url = f"{server.url}/v1/completions"
    bad = httpx.post(url, content=b"{not json", timeout=10)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert (
        httpx.post(url, json={"max_tokens": 2}, timeout=10).json()["error"]["message"]
        == "missing required field 'prompt'"
    )
    too_long = httpx.post(url, json={"prompt": "x " * 5000, "max_tokens": 2}, timeout=30)
    assert too_long.status_code == 400 and "context window" in too_long.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        server.client().completions.create(model="tiny", prompt="x", max_tokens=2, n=3)
    assert completion(server) == completion(server, stream=True)


def test_a_client_that_leaves_mid_stream_does_not_stall_the_server(servers, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    server = servers("--node", daemon.tcp)
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 400, "stream": True}) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first token
    assert completion(server) == completion(server, stream=True)
    assert server.health()["served"] == 3


def test_a_stop_with_requests_queued_exits_promptly(servers, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    server = servers("--node", daemon.tcp)

    def long_request() -> None:
        try:
            httpx.post(
                f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3000}, timeout=60
            )
        except httpx.HTTPError:
            pass  # the server goes away under it

    clients = [threading.Thread(target=long_request, daemon=True) for _ in range(4)]
    for t in clients:
        t.start()
    threading.Event().wait(1.0)
    started = time.monotonic()
    server.proc.terminate()
    server.proc.wait(timeout=30)
    assert time.monotonic() - started < 12, "".join(server.lines)


def test_the_same_request_gives_the_same_text_as_llama_cpp_server(
    servers, model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A drop-in: temperature-0 text of `serve` and of llama-cpp-python's own server (the real
    one, same model) agree for requests that leave the sampling fields at their defaults
    (its repeat_penalty is 1.1, create_completion's 1.0: `serve` follows the server)."""
    ours = servers("--data-dir", str(tmp_path / "node"))
    port = free_port()
    theirs_proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port),
         "--n_threads", "1", "--model_alias", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    theirs = Server(theirs_proc, f"http://127.0.0.1:{port}", [])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{theirs.url}/v1/models", timeout=2)
                break
            except httpx.HTTPError:
                assert theirs_proc.poll() is None and time.monotonic() < deadline, (
                    "llama_cpp.server did not start"
                )
                time.sleep(0.3)
        texts = []
        for server in (ours, theirs):
            c = server.client()
            text = (
                c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
                .choices[0]
                .text
            )
            chat = (
                c.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0
                )
                .choices[0]
                .message.content
            )
            texts.append((text, chat))
        assert texts[0] == texts[1] and texts[0][0]  # the same, and something was generated
    finally:
        theirs_proc.terminate()
        try:
            theirs_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            theirs_proc.kill()


def test_serve_runs_the_packaged_real_model_by_name(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The README's serve example: `--model smollm2`, the official client, a real answer."""
    server = servers("--data-dir", str(tmp_path / "node"), "--model", "smollm2", "--alias", "smollm2")
    reply = server.client().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0,
    )  # fmt: skip
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.parametrize(
    ("tail_tokens", "reused"), [("16", "all but < 16 tokens"), ("0", "whole chunks only")]
)
def test_tail_tokens_sets_how_far_a_repeated_prompt_is_reused(
    servers, daemon: Daemon, tail_tokens: str, reused: str
) -> None:  # type: ignore[no-untyped-def]
    first = servers("--node", daemon.tcp, "--tail-tokens", tail_tokens)
    second = servers("--node", daemon.tcp, "--tail-tokens", tail_tokens)
    text = completion(first)
    for _ in range(50):  # the first server stores its chunks (and tail) in the background
        if first.health()["mesh"]["saver"]["done"] >= 1:
            break
        threading.Event().wait(0.1)
    assert completion(second) == text
    prompt_tokens = (
        second.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    )
    hit = second.health()["mesh"]["hit_tokens"]
    if tail_tokens == "0":
        assert hit == prompt_tokens // 64 * 64, reused
    else:
        assert prompt_tokens - 16 < hit <= prompt_tokens and hit % 16 == 0, reused


def test_codec_zstd_stores_smaller_chunks_that_another_server_restores(servers, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    first = servers("--node", daemon.tcp, "--codec", "zstd")
    second = servers("--node", daemon.tcp)
    text = completion(first)
    for _ in range(50):
        if first.health()["mesh"]["saver"]["done"] >= 1:
            break
        threading.Event().wait(0.1)
    assert first.health()["mesh"]["codec"] == "zstd"
    assert completion(second) == text
    assert second.health()["mesh"]["hit_tokens"] >= 4 * 64 and second.health()["mesh"]["bad_chunks"] == 0


def test_codec_int8_is_shared_between_servers_that_opted_in_only(servers, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    first = servers("--node", daemon.tcp, "--codec", "int8")
    completion(first)
    for _ in range(50):
        if first.health()["mesh"]["saver"]["done"] >= 1:
            break
        threading.Event().wait(0.1)
    assert first.health()["mesh"]["codec"] == "int8"
    raw = servers("--node", daemon.tcp)
    completion(raw)
    assert raw.health()["mesh"]["hit_tokens"] == 0  # another namespace: never an int8 chunk
    second = servers("--node", daemon.tcp, "--codec", "int8")
    completion(second)
    assert second.health()["mesh"]["hit_tokens"] >= 4 * 64 and second.health()["mesh"]["bad_chunks"] == 0
