"""The serve command's request runner: one call at a time, in order, bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("starlette")

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
