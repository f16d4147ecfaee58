"""OpenAI-compatible HTTP API over one :class:`MeshLlama` (Starlette + uvicorn).

    POST /v1/completions        POST /v1/chat/completions   (``"stream": true`` = SSE)
    GET  /v1/models             GET  /health                (liveness and mesh counters)

One model serves one request at a time (llama.cpp contexts are single-sequence); others
wait in order, up to ``max_waiting``, then get 503. Generation runs on a worker thread so
the event loop only moves bytes; a client that disconnects mid-stream stops its generation
at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from .model import MeshLlama

logger = logging.getLogger(__name__)

COMPLETION_PARAMS = frozenset(
    {
        "prompt", "suffix", "max_tokens", "temperature", "top_p", "min_p", "typical_p", "echo",
        "stop", "frequency_penalty", "presence_penalty", "repeat_penalty", "top_k", "seed",
        "logprobs", "logit_bias", "stream",
    }
)  # fmt: skip
CHAT_PARAMS = frozenset(
    {
        "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "min_p",
        "typical_p", "stop", "frequency_penalty", "presence_penalty", "repeat_penalty", "top_k",
        "seed", "logprobs", "top_logprobs", "logit_bias", "response_format", "tools",
        "tool_choice", "stream",
    }
)  # fmt: skip
OPENAI_DEFAULT_MAX_TOKENS = 16
"""what OpenAI's /v1/completions uses when max_tokens is absent"""


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    """the name clients pass as ``model`` (any name is accepted: one model is served)"""
    max_waiting: int = 64
    """requests queued behind the running one; more get 503"""


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_DONE = object()


class ModelRunner:
    """Runs one model's calls on worker threads, one at a time, in arrival order."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiting = 0
        self.served = 0

    def _admit(self) -> None:
        if self._waiting >= self.max_waiting:
            raise ApiError(503, f"server busy: {self._waiting} requests waiting", "server_error")
        self._waiting += 1

    async def call(self, fn: Callable[..., Any], params: dict[str, Any]) -> Any:
        self._admit()

        def work() -> Any:
            with self._lock:
                self._waiting -= 1
                self.served += 1
                return fn(**params)

        return await asyncio.to_thread(work)

    def stream(self, fn: Callable[..., Iterator[Any]], params: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """Items of ``fn(**params)`` as they come; closing the iterator stops the generation.

        Admission (and 503) happens here, before any response starts; the generation starts
        at once and runs on a worker thread, handing items over through a queue.
        """
        self._admit()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        def work() -> None:
            with self._lock:
                self._waiting -= 1
                self.served += 1
                try:
                    it = fn(**params)
                    try:
                        for item in it:
                            if stop.is_set():
                                break
                            put(item)
                    finally:
                        close = getattr(it, "close", None)
                        if close is not None:
                            close()  # the model saves its KV here, still under the lock
                except Exception as exc:  # delivered to the client as an error event
                    put(exc)
                finally:
                    put(_DONE)

        loop.run_in_executor(None, work)  # never raises: work() reports errors as items
        return self._drain(items, stop)

    @staticmethod
    async def _drain(items: asyncio.Queue[Any], stop: threading.Event) -> AsyncGenerator[Any, None]:
        try:
            while (item := await items.get()) is not _DONE:
                yield item
        finally:
            stop.set()  # the client left (or the stream ended): the worker stops at the next token


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _read_json(request: Request, allowed: frozenset[str], required: str) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if required not in body:
        raise ApiError(400, f"missing required field {required!r}")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "field 'stream' must be a boolean")
    # Unknown OpenAI fields (user, n=1, ...) are ignored rather than refused, like other servers do.
    return {k: v for k, v in body.items() if k in allowed and v is not None}


def create_app(llm: MeshLlama, config: ServerConfig) -> Starlette:
    runner = ModelRunner(config.max_waiting)
    started = int(time.time())

    async def respond(fn: Callable[..., Any], params: dict[str, Any]) -> Response:
        params["model"] = config.model_id
        if not params.get("stream"):
            try:
                return JSONResponse(await runner.call(fn, params))
            except (ValueError, TypeError) as exc:  # llama-cpp-python's errors for bad parameters
                raise ApiError(400, str(exc)) from exc

        chunks = runner.stream(fn, params)

        async def events() -> AsyncIterator[bytes]:
            async for item in chunks:
                if isinstance(item, Exception):
                    status = 400 if isinstance(item, (ValueError, TypeError)) else 500
                    yield _sse(ApiError(status, str(item)).body())
                    break
                yield _sse(item)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def completions(request: Request) -> Response:
        try:
            params = await _read_json(request, COMPLETION_PARAMS, "prompt")
            params.setdefault("max_tokens", OPENAI_DEFAULT_MAX_TOKENS)
            return await respond(llm.create_completion, params)
        except ApiError as exc:
            return exc.response()

    async def chat_completions(request: Request) -> Response:
        try:
            params = await _read_json(request, CHAT_PARAMS, "messages")
            if "max_completion_tokens" in params:  # the newer OpenAI name
                params["max_tokens"] = params.pop("max_completion_tokens")
            if not isinstance(params["messages"], list) or not params["messages"]:
                raise ApiError(400, "field 'messages' must be a non-empty list")
            return await respond(llm.create_chat_completion, params)
        except ApiError as exc:
            return exc.response()

    async def models(request: Request) -> Response:
        model = {"id": config.model_id, "object": "model", "created": started, "owned_by": "lmcache-mesh"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "model": config.model_id, "served": runner.served, "mesh": llm.mesh.snapshot()}
        )

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ]
    )
