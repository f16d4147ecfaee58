"""The queue of membership news waiting to be piggybacked, each sent a bounded number of times.

Newer news about a member replaces older news about it, so a queue never holds two facts
about one name. The least-sent items go first: fresh news spreads before old news repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import retransmit_limit
from .messages import News

NEWS_WIRE_BYTES_ESTIMATE = 80
"""Rough encoded size of one News, for packing datagrams."""


@dataclass(slots=True)
class _Item:
    news: News
    sent: int = 0


class BroadcastQueue:
    """News waiting to be piggybacked, at most retransmit_mult * ceil(log10(N+1)) times each."""

    def __init__(self, retransmit_mult: int, num_members: Callable[[], int]) -> None:
        self._mult = retransmit_mult
        self._num_members = num_members
        self._items: dict[str, _Item] = {}

    def __repr__(self) -> str:
        return f"<BroadcastQueue {len(self._items)} items>"

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, news: News) -> None:
        self._items[news.name] = _Item(news)

    def take(self, max_bytes: int) -> list[News]:
        """Up to ``max_bytes`` of news, least-sent first; counts the sends and retires spent items."""
        if not self._items:
            return []
        limit = retransmit_limit(self._mult, self._num_members())
        budget = max(1, max_bytes // NEWS_WIRE_BYTES_ESTIMATE)
        chosen = sorted(self._items.values(), key=lambda it: it.sent)[:budget]
        for item in chosen:
            item.sent += 1
            if item.sent >= limit:
                del self._items[item.news.name]
        return [item.news for item in chosen]
