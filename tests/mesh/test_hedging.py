"""Hedged requests: a late peer costs the hedge delay, a miss moves on at once, the deadline holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from lmcache_mesh.mesh.hedging import hedged


class Peers:
    """Peers that answer after a delay (None: never), with what they hold; records calls."""

    def __init__(self, delays: dict[str, float | None], holds: dict[str, set[int]]) -> None:
        self.delays, self.holds = delays, holds
        self.asked: list[tuple[str, list[int]]] = []
        self.cancelled: list[str] = []

    async def ask(self, peer: str, idx: list[int]) -> Sequence[str | None]:
        self.asked.append((peer, idx))
        delay = self.delays[peer]
        try:
            await asyncio.sleep(3600 if delay is None else delay)
        except asyncio.CancelledError:
            self.cancelled.append(peer)
            raise
        return [f"{peer}:{i}" if i in self.holds[peer] else None for i in idx]


def run(
    peers: Peers, candidates: dict[int, list[str]], hedge_s: float, deadline_s: float
) -> tuple[dict[int, str], int, float]:
    async def main() -> tuple[dict[int, str], int, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        answers, hedges = await hedged(
            list(candidates),
            candidates,
            peers.ask,
            lambda plan: loop.time() + hedge_s,
            start + deadline_s,
            loop.time,
        )
        return answers, hedges, loop.time() - start

    return asyncio.run(main())


def test_a_stopped_peer_costs_the_hedge_delay_and_is_cancelled() -> None:
    peers = Peers({"stopped": None, "live": 0.01}, {"stopped": {0, 1}, "live": {0, 1}})
    started = time.monotonic()
    answers, hedges, took = run(peers, {0: ["stopped", "live"], 1: ["stopped", "live"]}, 0.1, 5.0)
    assert answers == {0: "live:0", 1: "live:1"} and hedges == 2
    assert 0.1 <= took < 0.5 and time.monotonic() - started < 1.0
    assert peers.cancelled == ["stopped"]  # the late request does not outlive the call


def test_a_miss_goes_to_the_next_candidate_at_once_without_a_hedge() -> None:
    peers = Peers({"a": 0.01, "b": 0.01}, {"a": {0}, "b": {1}})
    answers, hedges, took = run(peers, {0: ["a", "b"], 1: ["a", "b"]}, 1.0, 5.0)
    assert answers == {0: "a:0", 1: "b:1"} and hedges == 0 and took < 0.5
    assert peers.asked == [("a", [0, 1]), ("b", [1])]


def test_the_first_answer_wins_and_nothing_outlives_the_deadline() -> None:
    peers = Peers({"slow": 0.3, "slower": 0.6, "never": None}, {"slow": {0}, "slower": {0}, "never": {1}})
    answers, hedges, took = run(peers, {0: ["slow", "slower"], 1: ["never"]}, 0.05, 1.0)
    assert answers == {0: "slow:0"} and hedges == 1  # item 0 hedged to "slower"; item 1 had no one left
    assert 1.0 <= took < 1.3 and peers.cancelled == ["never"]  # "slower" answered (ignored)
