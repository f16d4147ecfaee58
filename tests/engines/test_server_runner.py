"""The serve command's request runner: one call at a time, in order, bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from ..helpers import require

require("starlette")

from lmcache_mesh.engines.llamacpp.server import ApiError, ModelRunner  # noqa: E402


async def test_calls_run_one_at_a_time_and_a_full_queue_gets_503() -> None:
    runner = ModelRunner(max_waiting=1)
    gate = threading.Event()
    running: list[int] = []
    overlap: list[bool] = []

    def work(i: int) -> int:
        overlap.append(bool(running))
        running.append(i)
        gate.wait(10)
        running.remove(i)
        return i

    calls = [asyncio.create_task(runner.call(work, {"i": i})) for i in range(2)]
    await asyncio.sleep(0.2)
    third = asyncio.create_task(runner.call(work, {"i": 3}))
    with pytest.raises(ApiError) as refused:
        await third
    assert refused.value.status == 503
    gate.set()
    assert await asyncio.gather(*calls) == [0, 1]
    assert overlap == [False, False] and runner.served == 2
    assert await runner.call(work, {"i": 4}) == 4  # room again


async def test_leaving_a_stream_stops_the_generation_and_frees_the_model() -> None:
    runner = ModelRunner(max_waiting=4)
    produced: list[int] = []
    closed = threading.Event()

    def tokens() -> Iterator[int]:
        try:
            for i in range(10_000):
                produced.append(i)
                time.sleep(0.001)
                yield i
        finally:
            closed.set()

    stream = runner.stream(tokens, {})
    async for item in stream:
        if item == 3:
            break
    await stream.aclose()  # what Starlette does when the client disconnects
    assert await asyncio.to_thread(closed.wait, 10)
    assert len(produced) < 10_000
    assert await runner.call(lambda: "next", {}) == "next"


async def test_an_error_inside_a_stream_is_delivered_as_an_item() -> None:
    runner = ModelRunner(max_waiting=4)

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("Requested tokens exceed context window")

    items = [item async for item in runner.stream(failing, {})]
    assert items[0] == 1 and isinstance(items[1], ValueError)


async def test_calls_run_in_arrival_order() -> None:
    runner = ModelRunner(max_waiting=32)
    gate = threading.Event()
    order: list[int] = []

    def work(i: int) -> None:
        gate.wait(10)
        order.append(i)

    calls = []
    for i in range(12):
        calls.append(asyncio.create_task(runner.call(work, {"i": i})))
        await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*calls)
    assert order == list(range(12))


async def test_max_waiting_zero_serves_an_idle_model() -> None:
    runner = ModelRunner(max_waiting=0)
    assert await runner.call(lambda: "ok", {}) == "ok"
    assert await runner.call(lambda: "again", {}) == "again"


async def test_close_skips_queued_calls_and_aborts_the_running_one() -> None:
    started = threading.Event()
    ran: list[str] = []
    aborts: list[threading.Event | None] = []
    runner = ModelRunner(max_waiting=8, bind_abort=aborts.append)

    def running() -> str:
        started.set()
        abort = aborts[-1]
        assert abort is not None
        abort.wait(10)  # a generation that stops when told to
        ran.append("running")
        return "stopped"

    first = asyncio.create_task(runner.call(running, {}))
    queued = [asyncio.create_task(runner.call(lambda: ran.append("queued"), {})) for _ in range(3)]
    assert await asyncio.to_thread(started.wait, 10)
    await asyncio.to_thread(runner.close)
    assert await first == "stopped"
    assert ran == ["running"]
    for task in queued:
        task.cancel()
    with pytest.raises(ApiError, match="shutting down"):
        await runner.call(lambda: None, {})
