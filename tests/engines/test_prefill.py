"""The engine's prefill rate, which becomes its recompute cost per chunk."""

from __future__ import annotations

import pytest

from lmcache_mesh.engines.prefill import PrefillRate
from lmcache_mesh.node.protocol import Cost

MB = 1_000_000


def test_prefill_rate_measured_or_configured() -> None:
    measured = PrefillRate()
    assert measured.cost(256, MB) is None  # unknown: fetch everything
    measured.observe(8, 1.0)  # too short to mean much
    assert measured.tokens_per_s is None
    measured.observe(1000, 0.5)
    assert measured.cost(256, MB) == Cost(256 / 2000, MB)
    assert PrefillRate(configured=512.0).cost(256, MB) == Cost(0.5, MB)
    with pytest.raises(ValueError):
        PrefillRate(configured=0)
