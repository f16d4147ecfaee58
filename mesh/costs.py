"""Cost-aware fetching: is a remote chunk worth its transfer, or should the engine recompute?

Each node keeps, per peer, an EWMA of request latency (small replies) and of bandwidth
(large replies), both from real requests. An engine sends what recomputing one chunk would
cost it (its measured prefill rate turned into seconds per chunk, and the chunk's size);
the node then fetches a peer's share of a prefix only while the estimated transfer is
shorter than recomputing those chunks. Peers not measured yet are tried (that is how they
get measured), but never for longer than the recompute time they would replace: a peer
that turns out slow is cut off and measured as at most that fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Cost:
    """What recomputing one chunk costs the asking engine: fetch a remote chunk only if the
    transfer is estimated to be faster than ``recompute_s``."""

    recompute_s: float
    chunk_bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"recompute_s": self.recompute_s, "chunk_bytes": self.chunk_bytes}


SMALL_REPLY_BYTES = 64 << 10
"""Replies below this measure latency; larger ones measure bandwidth."""

REMEASURE_AFTER_S = 30.0
"""Estimates older than this count as unknown, so a peer judged slow is tried (and measured)
again now and then: links change, and one bad sample must not exclude a peer for good."""

MIN_FETCH_WINDOW_S = 0.05
"""An untried fetch gets at least this long (one round trip on a slow link)."""

WIRE_CODECS = ("auto", "raw", "zstd")
"""``wire_codec`` settings: how raw float chunks travel from a peer (see :meth:`PeerStats.wire`)."""

WIRE_RATIO = 0.8
"""Bytes on the wire per raw byte under the lossless wire codec, as assumed before any is seen
(measured on SmolLM2's KV: 0.86 for f16, 0.69 for bf16)."""

WIRE_CODEC_S_PER_BYTE = 1 / 0.4e9 + 1 / 1.0e9
"""Seconds per raw byte to encode (at the sender, about 0.4 GB/s) and decode (at the engine,
about 1 GB/s) under the lossless wire codec, one core each (bench/bench_codecs.py)."""

WIRE_BELOW_BYTES_PER_S = (1 - WIRE_RATIO) / WIRE_CODEC_S_PER_BYTE
"""Below this bandwidth the bytes saved outweigh the encode and decode time (about 57 MB/s):
``auto`` re-encodes for such peers."""


@dataclass(slots=True)
class PeerEstimate:
    rtt_s: float | None = None
    bytes_per_s: float | None = None
    samples: int = 0
    measured_at: float = 0.0
    """When the bandwidth was last measured (monotonic)."""

    def transfer_s(self, nbytes: int, now: float) -> float | None:
        """Estimated seconds to fetch ``nbytes`` in one request; None while unmeasured (or
        measured too long ago)."""
        if self.bytes_per_s is None or now - self.measured_at > REMEASURE_AFTER_S:
            return None
        return (self.rtt_s or 0.0) + nbytes / self.bytes_per_s


class PeerStats:
    """Latency and bandwidth per peer name, from real transfers. Use on one thread.

    ``clock`` gives the time in seconds (monotonic; a simulation's virtual clock).
    """

    def __init__(
        self,
        alpha: float = 0.3,
        max_peers: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        wire_codec: str = "auto",
    ) -> None:
        if wire_codec not in WIRE_CODECS:
            raise ValueError(f"wire_codec must be one of {', '.join(WIRE_CODECS)}, got {wire_codec!r}")
        self.wire_codec = wire_codec
        self.wire_ratio = WIRE_RATIO
        """bytes on the wire per raw byte, as last seen (EWMA) in re-encoded replies"""
        self.clock = clock
        self.alpha = alpha
        self.max_peers = max_peers
        self.peers: dict[str, PeerEstimate] = {}

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def observe(self, peer: str, nbytes: int, seconds: float) -> None:
        """A request to ``peer`` returned ``nbytes`` of payload after ``seconds``."""
        if seconds <= 0:
            return
        e = self.peers.get(peer)
        if e is None:
            if len(self.peers) >= self.max_peers:
                self.peers.pop(next(iter(self.peers)))
            e = self.peers[peer] = PeerEstimate()
        e.samples += 1
        if nbytes < SMALL_REPLY_BYTES:
            e.rtt_s = self._ewma(e.rtt_s, seconds)
        else:
            moving = max(seconds - (e.rtt_s or 0.0), seconds / 2)
            now = self.clock()
            stale = now - e.measured_at > REMEASURE_AFTER_S
            e.bytes_per_s = self._ewma(None if stale else e.bytes_per_s, nbytes / moving)
            e.measured_at = now

    def cut_off(self, peer: str, nbytes: int, seconds: float) -> None:
        """A fetch of ``nbytes`` was abandoned after ``seconds``: the peer is at most that fast."""
        e = self.peers.setdefault(peer, PeerEstimate())
        bound = nbytes / max(seconds, 1e-6)
        now = self.clock()
        fresh = e.bytes_per_s is not None and now - e.measured_at <= REMEASURE_AFTER_S
        e.bytes_per_s = min(e.bytes_per_s, bound) if fresh and e.bytes_per_s is not None else bound
        e.measured_at = now
        e.samples += 1

    def transfer_s(self, peer: str, nbytes: int) -> float | None:
        """Estimated seconds to fetch ``nbytes`` of raw chunks from ``peer``, in the form they
        would travel: re-encoded by the wire codec (fewer bytes, plus encode and decode time)
        where :meth:`wire` picks it."""
        e = self.peers.get(peer)
        if e is None:
            return None
        if self.wire(peer):
            # (once re-encoded replies were measured, their time includes the sender's
            # encoding, counted here once more: a cautious estimate, never an optimistic one)
            moved = e.transfer_s(int(nbytes * self.wire_ratio), self.clock())
            return None if moved is None else moved + nbytes * WIRE_CODEC_S_PER_BYTE
        return e.transfer_s(nbytes, self.clock())

    def wire(self, peer: str, slow_link: bool = False) -> str:
        """The codec to ask ``peer`` to re-encode raw chunks into for the trip ("" for none):
        with ``auto``, the lossless one where the peer's measured bandwidth is below
        :data:`WIRE_BELOW_BYTES_PER_S`, or, unmeasured, where the link is known to be slow
        (``slow_link``: WebRTC)."""
        if self.wire_codec != "auto":
            return "" if self.wire_codec == "raw" else self.wire_codec
        e = self.peers.get(peer)
        if e is None or e.bytes_per_s is None or self.clock() - e.measured_at > REMEASURE_AFTER_S:
            return "zstd" if slow_link else ""
        return "zstd" if e.bytes_per_s < WIRE_BELOW_BYTES_PER_S else ""

    def saw_wire_ratio(self, wire_bytes: int, raw_bytes: int) -> None:
        """A re-encoded reply moved ``wire_bytes`` for ``raw_bytes`` of chunks."""
        if raw_bytes > 0:
            self.wire_ratio = self._ewma(self.wire_ratio, min(1.0, wire_bytes / raw_bytes))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "rtt_ms": None if e.rtt_s is None else round(1000 * e.rtt_s, 3),
                "mb_per_s": None if e.bytes_per_s is None else round(e.bytes_per_s / 1e6, 3),
                "samples": e.samples,
            }
            for name, e in sorted(self.peers.items())
        }


def fetch_window(stats: PeerStats, peer: str, n_chunks: int, cost: Cost) -> float | None:
    """How long fetching ``n_chunks`` from ``peer`` may take: None when recomputing is faster.

    A measured peer is used when its estimate beats recomputing; an unmeasured one is tried
    for at most the recompute time.
    """
    budget = n_chunks * cost.recompute_s
    estimate = stats.transfer_s(peer, n_chunks * cost.chunk_bytes)
    if estimate is not None and estimate > budget:
        return None
    return max(budget, MIN_FETCH_WINDOW_S)


def worth_prefix(stats: PeerStats, holders: Sequence[Sequence[str]], me: str, cost: Cost) -> tuple[int, int]:
    """Leading keys worth serving: (count, how many were cut by cost rather than absence).

    Key i counts if held here, or if fetching every remote key up to i — in parallel, each
    from its fastest holder — is estimated to beat recomputing them.
    """
    per_peer: dict[str, int] = {}
    remote = 0
    for i, hs in enumerate(holders):
        nodes = [h for h in hs if "/" not in h]  # engines' own caches serve no bytes
        if not nodes:
            return i, 0
        if me in nodes:
            continue
        best = min(nodes, key=lambda p: _sort_time(stats, p, cost.chunk_bytes))
        per_peer[best] = per_peer.get(best, 0) + 1
        remote += 1
        slowest = max((stats.transfer_s(p, n * cost.chunk_bytes) or 0.0) for p, n in per_peer.items())
        if slowest > remote * cost.recompute_s:
            return i, len(holders) - i
    return len(holders), 0


def _sort_time(stats: PeerStats, peer: str, nbytes: int) -> float:
    t = stats.transfer_s(peer, nbytes)
    return 0.0 if t is None else t  # unmeasured peers are tried: that is how they get measured


def nearest_first(stats: PeerStats, peers: list[str], nbytes: int) -> list[str]:
    """Peers by estimated transfer time (stable: equal or unknown keep their order)."""
    known = [p for p in peers if stats.transfer_s(p, nbytes) is not None]
    unknown = [p for p in peers if stats.transfer_s(p, nbytes) is None]
    return sorted(known, key=lambda p: _sort_time(stats, p, nbytes)) + unknown


def spread(stats: PeerStats, holders: Sequence[list[str]], nbytes: int) -> list[list[str]]:
    """Each key's holders in the order to ask them: first the one whose share of the whole
    fetch would end soonest, so a chain held by several peers comes from all of them side by
    side (a faster peer takes more of it); then the others, nearest first, to fall back on.

    Unmeasured peers are counted as fast as the fastest measured one (so they get tried, and
    measured); with nothing measured, keys are dealt out evenly.
    """
    rates = [e.bytes_per_s for e in stats.peers.values() if e.bytes_per_s is not None]
    default_rate = max(rates, default=1.0)
    now = stats.clock()
    assigned: dict[str, int] = {}

    def finish_s(peer: str) -> float:
        share = (assigned.get(peer, 0) + 1) * nbytes
        estimate = stats.peers[peer].transfer_s(share, now) if peer in stats.peers else None
        return share / default_rate if estimate is None else estimate

    ordered = []
    for hs in holders:
        order = nearest_first(stats, hs, nbytes)
        if not order:
            ordered.append(order)
            continue
        first = min(order, key=finish_s)  # the nearest among equals
        assigned[first] = assigned.get(first, 0) + 1
        ordered.append([first, *(p for p in order if p != first)])
    return ordered
