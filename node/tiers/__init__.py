"""Storage tiers of one node: memory (L1) and local disk (L3); the mesh is L2."""

from .disk import DiskTier, RecoveryReport
from .memory import MemoryTier
from .store import TierCounters, TieredStore

__all__ = ["DiskTier", "MemoryTier", "RecoveryReport", "TierCounters", "TieredStore"]
