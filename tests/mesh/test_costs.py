"""Per-peer estimates and the fetch-or-recompute decisions made from them."""

from __future__ import annotations

import pytest

from lmcache_mesh.mesh.costs import PeerStats, fetch_window, nearest_first, spread, worth_prefix
from lmcache_mesh.node.errors import BadRequest
from lmcache_mesh.node.protocol import Cost, Limits, Op, request_header
from lmcache_mesh.node.requests import decode_request

MB = 1_000_000


def test_small_replies_measure_latency_and_large_ones_bandwidth() -> None:
    s = PeerStats(alpha=1.0)
    s.observe("p", 100, 0.002)
    s.observe("p", 10 * MB, 0.102)  # 0.1 s moving 10 MB after 2 ms latency
    assert s.transfer_s("p", 10 * MB) == pytest.approx(0.102, rel=1e-6)
    assert s.transfer_s("unknown", MB) is None


def test_a_slow_peer_is_skipped_and_an_unmeasured_one_is_tried_within_the_recompute_time() -> None:
    s = PeerStats(alpha=1.0)
    cost = Cost(recompute_s=0.01, chunk_bytes=MB)
    assert fetch_window(s, "new", 4, cost) == pytest.approx(0.05)  # at least one slow round trip
    s.observe("slow", MB, 1.0)  # 1 MB/s: 1 s per chunk vs 10 ms to recompute
    s.observe("fast", 100 * MB, 0.1)  # 1 GB/s
    assert fetch_window(s, "slow", 4, cost) is None
    assert fetch_window(s, "fast", 4, cost) == pytest.approx(0.05)
    assert nearest_first(s, ["new", "slow", "fast"], MB) == ["fast", "slow", "new"]
    s.cut_off("new", 4 * MB, 0.05)  # abandoned: at most 80 MB/s
    assert s.transfer_s("new", MB) == pytest.approx(MB / (80 * MB))


def test_a_chain_is_spread_over_its_holders_by_how_fast_each_is() -> None:
    s = PeerStats(alpha=1.0)
    both = [["a", "b"]] * 8
    firsts = [order[0] for order in spread(s, both, MB)]
    assert firsts.count("a") == firsts.count("b") == 4  # nothing measured: dealt out evenly
    assert all(sorted(order) == ["a", "b"] for order in spread(s, both, MB))  # the other is the fallback
    s.observe("a", 300 * MB, 1.0)  # 300 MB/s
    s.observe("b", 100 * MB, 1.0)  # 100 MB/s
    firsts = [order[0] for order in spread(s, both, MB)]
    assert firsts.count("a") == 6 and firsts.count("b") == 2  # shares end at about the same time
    assert spread(s, [["b"], [], ["a", "b"]], MB) == [["b"], [], ["a", "b"]]


def test_worth_prefix_stops_where_remote_chunks_cost_more_than_recomputing() -> None:
    s = PeerStats(alpha=1.0)
    s.observe("slow", MB, 1.0)
    cost = Cost(recompute_s=0.01, chunk_bytes=MB)
    holders = [["me"], ["me", "slow"], ["slow"], ["slow"], []]
    assert worth_prefix(s, holders, "me", cost) == (2, 3)
    assert worth_prefix(s, [["me"], ["x/engine"]], "me", cost) == (1, 0)  # engines serve no bytes
    s.observe("slow", 100 * MB, 0.1)
    s.observe("slow", 100 * MB, 0.1)
    assert worth_prefix(s, holders, "me", Cost(recompute_s=0.5, chunk_bytes=MB)) == (4, 0)


@pytest.mark.parametrize(
    "cost",
    [
        {"recompute_s": -1, "chunk_bytes": 1},
        {"recompute_s": 1},
        "fast",
        {"recompute_s": True, "chunk_bytes": 1},
    ],
)
def test_a_malformed_cost_hint_is_a_bad_request(cost: object) -> None:
    header = request_header(Op.GET, 1, 1000, keys=[bytes(16)], cost=cost)
    with pytest.raises(BadRequest):
        decode_request([header], Limits())


def test_a_cost_hint_is_decoded() -> None:
    header = request_header(Op.LOOKUP, 1, 1000, keys=[bytes(16)], cost=Cost(0.5, 1024).to_wire())
    assert decode_request([header], Limits()).body.cost == Cost(0.5, 1024)


def test_old_estimates_count_as_unknown_so_slow_peers_get_measured_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lmcache_mesh.mesh.costs as costs

    s = PeerStats(alpha=1.0)
    s.cut_off("p", MB, 1.0)
    assert s.transfer_s("p", MB) is not None
    monkeypatch.setattr(costs, "REMEASURE_AFTER_S", -1.0)
    assert s.transfer_s("p", MB) is None
    assert fetch_window(s, "p", 1, Cost(0.01, MB)) is not None  # tried again


def test_auto_wire_codec_re_encodes_for_slow_peers_only_and_counts_codec_time() -> None:
    from lmcache_mesh.mesh.costs import WIRE_BELOW_BYTES_PER_S, WIRE_CODEC_S_PER_BYTE, WIRE_RATIO

    s = PeerStats(alpha=1.0)
    assert s.wire("new") == "" and s.wire("new", slow_link=True) == "zstd"  # unmeasured: WebRTC only
    s.observe("slow", 10 * MB, 10 * MB / 2e6)  # 2 MB/s
    s.observe("fast", 100 * MB, 100 * MB / 1e9)  # 1 GB/s
    assert WIRE_BELOW_BYTES_PER_S > 2e6 and s.wire("slow") == "zstd" and s.wire("fast") == ""
    # the estimate of a re-encoded fetch: fewer bytes moved, plus encoding and decoding them
    assert s.transfer_s("slow", MB) == pytest.approx(
        WIRE_RATIO * MB / 2e6 + MB * WIRE_CODEC_S_PER_BYTE, rel=0.05
    )
    assert s.transfer_s("fast", MB) == pytest.approx(MB / 1e9, rel=0.05)
    s.saw_wire_ratio(50, 100)
    assert s.wire_ratio == 0.5  # learned from replies
    assert PeerStats(wire_codec="raw").wire("x", slow_link=True) == ""
    assert PeerStats(wire_codec="zstd").wire("x") == "zstd"
    with pytest.raises(ValueError, match="wire_codec"):
        PeerStats(wire_codec="lz4")


@pytest.mark.parametrize("wire", ["lz4", 1, "int8"])
def test_a_get_asking_for_an_unknown_wire_codec_is_a_bad_request(wire: object) -> None:
    header = request_header(Op.GET, 1, 1000, keys=[bytes(16)], wire=wire)
    with pytest.raises(BadRequest, match="wire"):
        decode_request([header], Limits())
    assert (
        decode_request([request_header(Op.GET, 1, 1000, keys=[bytes(16)], wire="zstd")], Limits()).body.wire
        == "zstd"
    )
