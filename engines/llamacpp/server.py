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
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
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
SERVER_DEFAULTS = {"repeat_penalty": 1.1}
"""Where ``llama_cpp.server`` (what users of this API come from) defaults a sampling field
differently from llama-cpp-python's ``create_completion`` (repeat_penalty 1.0): the same
request gives the same temperature-0 text on both. Every other default already agrees."""


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    """the name clients pass as ``model`` (any name is accepted: one model is served)"""
    max_waiting: int = 64
    """requests queued behind the running one; more get 503 (0: only when idle)"""


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_DONE = object()


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not fut.done():
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


class ModelRunner:
    """Runs one model's calls on one worker thread, strictly in arrival order.

    At most ``max_waiting`` calls wait behind the running one; more get 503. A call whose
    client went away (its handler was cancelled, or it closed its stream) is skipped if it
    has not started, and stopped at the next token if it has: ``bind_abort`` hands the
    running call's abort event to the model.
    """

    def __init__(
        self, max_waiting: int, bind_abort: Callable[[threading.Event | None], None] | None = None
    ) -> None:
        self.max_waiting = max_waiting
        self.served = 0
        self._bind_abort = bind_abort or (lambda event: None)
        self._jobs: queue.Queue[tuple[Callable[[threading.Event], None], threading.Event] | None] = (
            queue.Queue()
        )
        self._lock = threading.Lock()
        self._pending = 0  # queued + running
        self._aborts: set[threading.Event] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="lmcache-serve-model", daemon=True)
        self._thread.start()

    def _submit(self, run: Callable[[threading.Event], None]) -> threading.Event:
        abort = threading.Event()
        with self._lock:
            if self._closed:
                raise ApiError(503, "server is shutting down", "server_error")
            if self._pending > self.max_waiting:
                raise ApiError(503, f"server busy: {self._pending - 1} requests waiting", "server_error")
            self._pending += 1
            self._aborts.add(abort)
        self._jobs.put((run, abort))
        return abort

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            run, abort = job
            try:
                if not abort.is_set():
                    with self._lock:
                        self.served += 1
                    self._bind_abort(abort)
                    run(abort)
            finally:
                self._bind_abort(None)
                self._release(abort)

    def _release(self, abort: threading.Event) -> None:
        """The job is done: free its place (once), before its caller hears of the result, so
        the caller's next request is admitted."""
        with self._lock:
            if abort in self._aborts:
                self._aborts.discard(abort)
                self._pending -= 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new calls, abort queued and running ones, stop the worker."""
        with self._lock:
            self._closed = True
            for abort in self._aborts:
                abort.set()
        self._jobs.put(None)
        self._thread.join(timeout_s)

    async def call(self, fn: Callable[..., Any], params: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def run(abort: threading.Event) -> None:
            try:
                result, error = fn(**params), None
            except Exception as exc:  # handed to the waiting handler
                result, error = None, exc
            self._release(abort)
            try:
                loop.call_soon_threadsafe(_settle, done, result, error)
            except RuntimeError:  # the loop is gone (shutdown): nobody is waiting
                pass

        abort = self._submit(run)
        try:
            return await done
        finally:
            abort.set()  # finished, or the handler was cancelled: either way, stop

    def stream(self, fn: Callable[..., Iterator[Any]], params: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """Items of ``fn(**params)`` as they come; closing the iterator stops the generation.

        Admission (and 503) happens here, before any response starts.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        def run(abort: threading.Event) -> None:
            try:
                it = fn(**params)
                try:
                    for item in it:
                        if abort.is_set():
                            break
                        put(item)
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()  # the model saves its KV here, still on the model's thread
            except Exception as exc:  # delivered to the client as an error event
                put(exc)
            finally:
                put(_DONE)

        abort = self._submit(run)
        return self._drain(items, abort)

    @staticmethod
    async def _drain(items: asyncio.Queue[Any], abort: threading.Event) -> AsyncGenerator[Any, None]:
        try:
            while (item := await items.get()) is not _DONE:
                yield item
        finally:
            abort.set()  # the client left (or the stream ended): generation stops at the next token


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
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "only n = 1 is supported (one choice per request)")
    # Unknown OpenAI fields (user, n=1, ...) are ignored rather than refused, like other servers do.
    return {k: v for k, v in body.items() if k in allowed and v is not None}


def create_app(llm: MeshLlama, config: ServerConfig) -> Starlette:
    runner = ModelRunner(config.max_waiting, bind_abort=lambda event: setattr(llm, "abort", event))
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
            params = {**SERVER_DEFAULTS, **await _read_json(request, COMPLETION_PARAMS, "prompt")}
            params.setdefault("max_tokens", OPENAI_DEFAULT_MAX_TOKENS)
            return await respond(llm.create_completion, params)
        except ApiError as exc:
            return exc.response()

    async def chat_completions(request: Request) -> Response:
        try:
            params = {**SERVER_DEFAULTS, **await _read_json(request, CHAT_PARAMS, "messages")}
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

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(runner.close)  # stop generations nobody will read

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
    )
