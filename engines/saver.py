"""Background saving: engines hand over KV to store and go on at once.

One worker thread runs the save jobs in order. The queue is bounded in bytes; when it is
full a new job is dropped and counted (a cache may forget; an engine must never wait on
it). A failing job is logged and counted; the thread keeps going.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class SaverStats:
    queued: int = 0
    done: int = 0
    dropped: int = 0
    failed: int = 0
    pending_bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Saver:
    """A single background thread running save jobs, at most ``max_pending_bytes`` queued."""

    def __init__(self, name: str, max_pending_bytes: int = 512 << 20) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.stats = SaverStats()
        self._jobs: queue.Queue[tuple[Callable[[], None], int] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def has_room(self, nbytes: int) -> bool:
        """Whether a job of ``nbytes`` would be queued now (check before preparing it)."""
        with self._lock:
            return not self._closed and self.stats.pending_bytes + nbytes <= self.max_pending_bytes

    def count_dropped(self) -> None:
        with self._lock:
            self.stats.dropped += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**asdict(self.stats), "errors": dict(self.stats.errors)}

    def submit(self, job: Callable[[], None], nbytes: int) -> bool:
        """Queue ``job`` (holding ``nbytes``); False when it was dropped instead."""
        with self._lock:
            if self._closed or self.stats.pending_bytes + nbytes > self.max_pending_bytes:
                self.stats.dropped += 1
                return False
            self.stats.pending_bytes += nbytes
            self.stats.queued += 1
        self._jobs.put((job, nbytes))
        return True

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, nbytes = item
            try:
                job()
                outcome = "done"
            except Exception as exc:  # one failed save must not stop the others
                logger.warning("background save failed: %s: %s", type(exc).__name__, exc)
                outcome = type(exc).__name__
            with self._lock:
                self.stats.pending_bytes -= nbytes
                if outcome == "done":
                    self.stats.done += 1
                else:
                    self.stats.failed += 1
                    self.stats.errors[outcome] = self.stats.errors.get(outcome, 0) + 1
                self._idle.notify_all()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued job has run; False on timeout."""
        with self._lock:
            return self._idle.wait_for(
                lambda: self.stats.done + self.stats.failed >= self.stats.queued, timeout=timeout_s
            )

    def close(self, timeout_s: float = 30.0) -> None:
        """Run what is queued (up to ``timeout_s``), then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("background saves still running after %.0f s; leaving them", timeout_s)
