"""Prometheus metrics of a node.

Counters and gauges are read from :meth:`Node.stats` at scrape time, so there is one set
of books; request latency is a histogram observed by the server. Each node has its own
registry, so several nodes can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

Status = Callable[[], dict[str, Any]]
"""The node's ``status --json`` document, read at each scrape."""

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class _StatsCollector(Collector):
    def __init__(self, status: Status) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        stats = self._status()
        c, tiers = stats["counters"], stats["tiers"]
        hits = CounterMetricFamily("lmcache_hits", "Chunks served, by tier", labels=["tier"])
        hits.add_metric(["memory"], c["hits_memory"])
        hits.add_metric(["disk"], c["hits_disk"])
        yield hits
        for name, key, doc in (
            ("lmcache_misses", "misses", "Chunks asked for and not found"),
            ("lmcache_puts", "puts", "Chunks stored"),
            ("lmcache_bytes_in", "bytes_in", "Payload bytes stored"),
            ("lmcache_bytes_out", "bytes_out", "Payload bytes served"),
            ("lmcache_deletes", "deletes", "Chunks deleted on request"),
            ("lmcache_checksum_failures", "checksum_failures", "Records dropped for a bad checksum"),
            ("lmcache_wire_replies", "wire_replies", "Replies to peers re-encoded for the trip (wire codec)"),
            ("lmcache_wire_bytes_saved", "wire_bytes_saved", "Payload bytes the wire codec saved in them"),
            ("lmcache_lookups", "lookups", "LOOKUP requests from clients"),
            ("lmcache_lookup_keys", "lookup_keys", "Chunks clients looked up"),
            (
                "lmcache_lookup_hit_keys",
                "lookup_hit_keys",
                "Chunks looked up and found cached (here or in the mesh)",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=c[key])
        errors = CounterMetricFamily("lmcache_request_errors", "Error replies, by code", labels=["code"])
        for code, n in sorted(c["errors"].items()):
            errors.add_metric([code], n)
        yield errors
        mesh = stats["mesh"]
        for name, key, doc in (
            ("lmcache_remote_hits", "remote_hits", "Chunks this node fetched from peers for its clients"),
            ("lmcache_remote_misses", "remote_misses", "Chunks asked of peers and not found"),
        ):
            yield CounterMetricFamily(name, doc, value=mesh.get(key, 0))
        security = stats["security"]
        yield CounterMetricFamily(
            "lmcache_connections_refused",
            "Connections refused at the CurveZMQ handshake: key not in the allow-list",
            value=security.get("connections_refused", 0),
        )
        records = GaugeMetricFamily(
            "lmcache_tenant_records", "Chunks held, by tenant and tier", labels=["tenant", "tier"]
        )
        requests = CounterMetricFamily(
            "lmcache_tenant_requests",
            "Chunks asked for (gets), found (hits) and put, by tenant",
            labels=["tenant", "kind"],
        )
        for tenant, t in stats["tenants"].items():
            for tier, n in t["records"].items():
                records.add_metric([tenant, tier], n)
            for kind, n in t["requests"].items():
                requests.add_metric([tenant, kind], n)
        yield from (records, requests)
        evictions = CounterMetricFamily("lmcache_evictions", "Chunks evicted, by tier", labels=["tier"])
        used = GaugeMetricFamily("lmcache_tier_bytes", "Bytes held, by tier", labels=["tier"])
        capacity = GaugeMetricFamily("lmcache_tier_capacity_bytes", "Byte budget, by tier", labels=["tier"])
        entries = GaugeMetricFamily("lmcache_tier_entries", "Chunks held, by tier", labels=["tier"])
        for tier, t in tiers.items():
            evictions.add_metric([tier], t["evictions"])
            used.add_metric([tier], t["used_bytes"])
            capacity.add_metric([tier], t["capacity_bytes"])
            entries.add_metric([tier], t["entries"])
        yield from (evictions, used, capacity, entries)
        stored = GaugeMetricFamily(
            "lmcache_codec_bytes", "Payload bytes held, by tier and record codec", labels=["tier", "codec"]
        )
        raw = GaugeMetricFamily(
            "lmcache_codec_raw_bytes",
            "What those payloads hold before their codec (raw KV bytes), by tier and codec",
            labels=["tier", "codec"],
        )
        for tier, t in tiers.items():
            for codec, c in t.get("codecs", {}).items():
                stored.add_metric([tier, codec], c["bytes"])
                raw.add_metric([tier, codec], c["raw_bytes"])
        yield from (stored, raw)
        disk = tiers.get("disk", {})
        yield CounterMetricFamily(
            "lmcache_disk_write_errors",
            "Failed disk writes (full disk, I/O error)",
            value=disk.get("write_errors", 0),
        )
        yield CounterMetricFamily(
            "lmcache_writeback_dropped",
            "Memory evictions not written back (queue full)",
            value=disk.get("writeback_dropped", 0),
        )
        members = GaugeMetricFamily("lmcache_members", "Members of the mesh, by state", labels=["state"])
        for state in ("alive", "suspect", "dead", "left"):
            members.add_metric([state], sum(1 for m in stats["members"] if m["state"] == state))
        yield members
        reach = GaugeMetricFamily(
            "lmcache_members_reachability", "Live members, by how they are reached", labels=["reachability"]
        )
        for kind in ("direct", "webrtc"):
            reach.add_metric(
                [kind],
                sum(1 for m in stats["members"] if m["reachability"] == kind and m["state"] == "alive"),
            )
        yield reach
        mesh = stats.get("mesh", {})
        decisions = CounterMetricFamily(
            "lmcache_cost_decisions",
            "Remote chunks asked for with an engine's recompute cost: fetched, or skipped because "
            "recomputing was estimated faster",
            labels=["decision"],
        )
        decisions.add_metric(["fetch"], mesh.get("cost_fetch_chunks", 0))
        decisions.add_metric(["recompute"], mesh.get("cost_skip_chunks", 0))
        yield decisions
        peer_bw = GaugeMetricFamily(
            "lmcache_peer_bandwidth_bytes_per_second", "EWMA bandwidth of fetches, by peer", labels=["peer"]
        )
        peer_rtt = GaugeMetricFamily(
            "lmcache_peer_latency_seconds", "EWMA latency of small requests, by peer", labels=["peer"]
        )
        for peer, e in mesh.get("peers", {}).items():
            if e["mb_per_s"] is not None:
                peer_bw.add_metric([peer], e["mb_per_s"] * 1e6)
            if e["rtt_ms"] is not None:
                peer_rtt.add_metric([peer], e["rtt_ms"] / 1000)
        yield from (peer_bw, peer_rtt)
        webrtc = mesh.get("webrtc", {})
        yield GaugeMetricFamily(
            "lmcache_webrtc_links",
            "Open WebRTC links",
            value=len(webrtc.get("links_out", [])) + webrtc.get("links_in", 0),
        )
        yield CounterMetricFamily(
            "lmcache_webrtc_auth_failures",
            "WebRTC peers that failed to prove membership",
            value=webrtc.get("webrtc_auth_failures", 0),
        )


class RequestLatency:
    """The request latency histogram the server observes, in the node's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.histogram = Histogram(
            "lmcache_request_seconds",
            "Time from receiving a request to sending its reply",
            ["op", "outcome"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS_S,
        )
        self._children: dict[tuple[str, str], Any] = {}

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        child = self._children.get((op, outcome))
        if child is None:
            child = self._children[(op, outcome)] = self.histogram.labels(op, outcome)
        child.observe(seconds)


class NodeMetrics:
    """The metrics of one node — latency, and everything else read from its status at
    scrape time — and an optional HTTP endpoint serving them."""

    def __init__(self, status: Status, latency: RequestLatency | None = None) -> None:
        self.latency = latency or RequestLatency()
        self.registry = self.latency.registry
        self.registry.register(_StatsCollector(status))
        self._server: Any = None

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        self.latency.observe(op, outcome, seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` over HTTP in a background thread."""
        self._server = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if isinstance(self._server, tuple):
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=2)
        self._server = None
