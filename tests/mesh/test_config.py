"""MeshConfig profiles and the SWIM/Lifeguard formulas."""

from __future__ import annotations

import pytest

from lmcache_mesh.mesh.config import (
    MeshConfig,
    push_pull_scale,
    remaining_suspicion_s,
    retransmit_limit,
    suspicion_bounds,
)


@pytest.mark.parametrize(
    "mult, n, expected", [(4, 1, 4), (4, 9, 4), (4, 10, 8), (4, 100, 12), (4, 1000, 16), (2, 5, 2)]
)
def test_retransmit_limit(mult: int, n: int, expected: int) -> None:
    assert retransmit_limit(mult, n) == expected


@pytest.mark.parametrize(
    "n, low, high", [(1, 4.0, 24.0), (10, 4.0, 24.0), (100, 8.0, 48.0), (1000, 12.0, 72.0)]
)
def test_suspicion_bounds_match_memberlist_lan(n: int, low: float, high: float) -> None:
    assert suspicion_bounds(MeshConfig.lan(), n) == pytest.approx((low, high))


@pytest.mark.parametrize(
    "confirmations, expected, elapsed, remaining",
    [
        (0, 3, 0.0, 30.0),
        (3, 3, 0.0, 10.0),
        (1, 3, 0.0, 20.0),
        (0, 3, 5.0, 25.0),
        (5, 3, 0.0, 10.0),
        (0, 0, 0.0, 10.0),
    ],
)
def test_remaining_suspicion_falls_with_confirmations(
    confirmations: int, expected: int, elapsed: float, remaining: float
) -> None:
    assert remaining_suspicion_s(confirmations, expected, elapsed, 10.0, 30.0) == pytest.approx(remaining)


@pytest.mark.parametrize(
    "n, scaled", [(1, 30.0), (32, 30.0), (33, 60.0), (64, 60.0), (65, 90.0), (1000, 180.0)]
)
def test_push_pull_scale(n: int, scaled: float) -> None:
    assert push_pull_scale(30.0, n) == scaled


def test_profiles_and_validation() -> None:
    lan, wan, local = MeshConfig.lan(), MeshConfig.wan(), MeshConfig.local()
    assert (lan.probe_interval_s, lan.probe_timeout_s, lan.indirect_checks) == (1.0, 0.5, 3)
    assert wan.probe_interval_s == 5.0 and local.probe_interval_s < lan.probe_interval_s
    with pytest.raises(ValueError, match="probe_timeout_s"):
        MeshConfig(probe_interval_s=1.0, probe_timeout_s=2.0)
    with pytest.raises(ValueError, match="gossip_nodes"):
        MeshConfig(gossip_nodes=0)
