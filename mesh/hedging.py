"""Hedged requests: ask one peer per item, and a second one once the first is late.

Reads ask a key's owner who holds it, and a holder for its bytes. When that peer is stopped
(SIGSTOP, a long pause) or slow, waiting for it until the deadline turns a hit into a miss.
:func:`hedged` asks each item's first candidate; an item the candidate cannot answer (None)
goes to the next candidate at once, and items still unanswered when their requests are
late — ``hedge_after`` says when, from the peers' measured latency — go to the next
candidate as well, the late requests still running. The first answer per item wins; what is
still in flight is cancelled once every item is answered, or at the deadline.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

Ask = Callable[[str, list[int]], Awaitable[Sequence[T | None]]]
"""Ask ``peer`` about items ``idx``: one answer per item, None where it has none."""


async def hedged(
    wanted: Sequence[int],
    candidates: Mapping[int, Sequence[str]],
    ask: Ask[T],
    hedge_after: Callable[[dict[str, list[int]]], float],
    deadline: float,
    clock: Callable[[], float],
) -> tuple[dict[int, T], int]:
    """Answers by item, and how many items were hedged (asked again because late).

    ``candidates[i]``: the peers to ask about item ``i``, best first. ``hedge_after(plan)``:
    the time at which requests just sent (peer -> items) count as late."""
    tried = dict.fromkeys(wanted, 0)
    answers: dict[int, T] = {}
    inflight: dict[asyncio.Future[Sequence[T | None]], list[int]] = {}
    hedges = 0

    def ask_next(items: Sequence[int], late: bool = False) -> float:
        nonlocal hedges
        plan: dict[str, list[int]] = defaultdict(list)
        for i in items:
            if i not in answers and tried[i] < len(candidates[i]):
                plan[candidates[i][tried[i]]].append(i)
                tried[i] += 1
                hedges += late
        for peer, idx in plan.items():
            inflight[asyncio.ensure_future(ask(peer, idx))] = idx
        return hedge_after(plan) if plan else float("inf")

    hedge_at = ask_next(wanted)
    try:
        while inflight and len(answers) < len(tried):
            now = clock()
            if now >= deadline:
                break
            wait_s = max(0.0, min(hedge_at, deadline) - now)
            done, _ = await asyncio.wait(inflight, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            retry: list[int] = []
            for task in done:
                idx = inflight.pop(task)
                for i, answer in zip(idx, task.result(), strict=True):
                    if answer is None:
                        retry.append(i)
                    else:
                        answers.setdefault(i, answer)
            if not done and clock() >= hedge_at:  # late: ask the next candidate as well
                late = list(dict.fromkeys(i for idx in inflight.values() for i in idx if i not in answers))
                hedge_at = ask_next(late, late=True)
            if retry:
                hedge_at = min(hedge_at, ask_next(retry))
    finally:
        for task in inflight:
            task.cancel()
    return answers, hedges
