"""MeshConfig: the timing and fan-out of membership and gossip, with LAN/WAN/local profiles.

Derived values, as in SWIM/Lifeguard (memberlist):
    retransmits        = retransmit_mult * ceil(log10(N + 1))
    suspicion timeout  = suspicion_mult * max(1, log10(N)) * probe_interval_s     (min)
                         ... * suspicion_max_timeout_mult                          (max)
    push-pull interval = push_pull_interval_s * (ceil(log2 N - log2 32) + 1) above 32 nodes
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class MeshConfig:
    probe_interval_s: float = 1.0
    """Seconds between probes of one random member. Lower: failures found sooner, more bytes/s."""
    probe_timeout_s: float = 0.5
    """Wait for a direct ack before asking others to probe. Must exceed the network's RTT p99."""
    indirect_checks: int = 3
    """Members asked to probe a silent member for us. More: fewer false suspicions, more traffic."""
    suspicion_mult: float = 4.0
    """Scales the minimum suspicion timeout (see the module docstring)."""
    suspicion_max_timeout_mult: float = 6.0
    """Maximum suspicion timeout as a multiple of the minimum; confirmations shrink it toward min."""
    retransmit_mult: int = 4
    """Each broadcast is piggybacked retransmit_mult * ceil(log10(N+1)) times."""
    gossip_interval_s: float = 0.2
    """Seconds between gossip rounds (broadcasts sent without waiting for a probe)."""
    gossip_nodes: int = 3
    """Random members each gossip round sends to."""
    gossip_to_dead_s: float = 30.0
    """Keep gossiping to dead members this long, so they learn they were declared dead."""
    push_pull_interval_s: float = 30.0
    """Full-state anti-entropy with one random member every this many seconds (scaled above 32 nodes)."""
    awareness_max_multiplier: int = 8
    """Lifeguard: a node that misses acks slows its own probing by up to this factor."""
    dead_reclaim_s: float = 60.0
    """Forget members that left gracefully after this long."""
    reconnect_interval_s: float = 30.0
    """Every this many seconds, try a push-pull with one random dead member: how a healed
    partition finds its other half again."""
    reconnect_timeout_s: float = 24 * 3600.0
    """Stop trying to reconnect to (and forget) a dead member after this long."""
    max_datagram_bytes: int = 64 * 1024
    """Largest gossip datagram we build; piggybacked broadcasts fill it up to this size."""

    def __post_init__(self) -> None:
        for name in (
            "probe_interval_s",
            "probe_timeout_s",
            "gossip_interval_s",
            "push_pull_interval_s",
            "reconnect_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ValueError(
                f"probe_timeout_s ({self.probe_timeout_s}) must be below probe_interval_s ({self.probe_interval_s})"
            )
        for name in ("indirect_checks", "retransmit_mult", "gossip_nodes", "awareness_max_multiplier"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.suspicion_mult <= 0 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("suspicion_mult must be > 0 and suspicion_max_timeout_mult >= 1")

    @classmethod
    def lan(cls) -> MeshConfig:
        """Inside one site or data centre (memberlist's DefaultLANConfig timings)."""
        return cls()

    @classmethod
    def wan(cls) -> MeshConfig:
        """Across sites and edge links: slower, more tolerant of latency and loss."""
        return replace(
            cls.lan(),
            probe_interval_s=5.0,
            probe_timeout_s=3.0,
            suspicion_mult=6.0,
            gossip_interval_s=0.5,
            gossip_nodes=4,
            push_pull_interval_s=60.0,
            gossip_to_dead_s=60.0,
        )

    @classmethod
    def local(cls) -> MeshConfig:
        """One machine (tests on 127.0.0.x): fast detection."""
        return replace(
            cls.lan(),
            probe_interval_s=0.2,
            probe_timeout_s=0.1,
            indirect_checks=1,
            suspicion_mult=3.0,
            retransmit_mult=2,
            gossip_interval_s=0.05,
            push_pull_interval_s=2.0,
            gossip_to_dead_s=5.0,
            dead_reclaim_s=10.0,
            reconnect_interval_s=1.0,
        )


def retransmit_limit(mult: int, n: int) -> int:
    """Times a broadcast is sent in a cluster of ``n`` members."""
    return mult * math.ceil(math.log10(n + 1))


def suspicion_bounds(cfg: MeshConfig, n: int) -> tuple[float, float]:
    """(min, max) suspicion timeout in seconds for a cluster of ``n`` members."""
    low = cfg.suspicion_mult * max(1.0, math.log10(max(n, 1))) * cfg.probe_interval_s
    return low, low * cfg.suspicion_max_timeout_mult


def remaining_suspicion_s(
    confirmations: int, expected: int, elapsed_s: float, low: float, high: float
) -> float:
    """Lifeguard: the timeout falls from ``high`` to ``low`` as independent confirmations arrive.

    ``expected`` is how many confirmations would make us sure (k); the fall is logarithmic.
    """
    frac = math.log(confirmations + 1) / math.log(expected + 1) if expected > 0 else 1.0
    timeout = max(low, high - frac * (high - low))
    return timeout - elapsed_s


def push_pull_scale(interval_s: float, n: int) -> float:
    """Slow down full-state sync above 32 members so its cost per node stays bounded."""
    if n <= 32:
        return interval_s
    return interval_s * (math.ceil(math.log2(n) - math.log2(32)) + 1)
