"""An engine's prefill rate, turned into what recomputing one chunk costs it.

The node fetches a remote chunk only when the transfer is estimated to be faster than
recomputing it (see ``lmcache_mesh.node.costs``); the engine tells it the recompute side.
The rate is either configured or measured: an EWMA over this engine's own prefills (tokens
evaluated / seconds to the first token), counting only prefills long enough to mean much.
"""

from __future__ import annotations

import threading

from lmcache_mesh.node.protocol import Cost

MIN_MEASURED_TOKENS = 32
"""Shorter prefills are dominated by fixed costs: they do not update the rate."""


class PrefillRate:
    """Tokens per second of prefill; thread-safe."""

    def __init__(self, configured: float | None = None, alpha: float = 0.3) -> None:
        if configured is not None and configured <= 0:
            raise ValueError(f"prefill_tokens_per_s must be positive, got {configured}")
        self.configured = configured
        self.alpha = alpha
        self._measured: float | None = None
        self._lock = threading.Lock()

    @property
    def tokens_per_s(self) -> float | None:
        return self.configured if self.configured is not None else self._measured

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < MIN_MEASURED_TOKENS or seconds <= 0:
            return
        rate = tokens / seconds
        with self._lock:
            old = self._measured
            self._measured = rate if old is None else old + self.alpha * (rate - old)

    def cost(self, chunk_tokens: int, chunk_bytes: int) -> Cost | None:
        """What recomputing one chunk costs; None until the rate is known (fetch everything)."""
        rate = self.tokens_per_s
        if rate is None or chunk_bytes <= 0:
            return None
        return Cost(chunk_tokens / rate, chunk_bytes)
