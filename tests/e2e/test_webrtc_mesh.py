"""Nodes behind NAT: relayed membership and signaling, chunk records over real WebRTC links.

Daemons run as real processes. On loopback the edge node only *acts* as if behind NAT
(``--nat``: it dials out and accepts nothing); the namespace test puts it behind a real
masquerading router, where nothing from outside can reach it except through its relay.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from lmcache_mesh.mesh.ring import HashRing, RingMember
from lmcache_mesh.node import ChunkRecord, Client, chunk_keys, namespace_id
from lmcache_mesh.node.errors import DeadlineExceeded
from lmcache_mesh.node.protocol import Op, request_header

from ..conftest import DaemonFactory
from ..helpers import Daemon, kill_all, node_command, require, start_daemon
from ..netns import Topology, require_netns

COMMON = ("--memory", "256MiB", "--disk", "0", "--mesh-profile", "local")
LOOPBACK = ("--webrtc-host-addresses", "127.0.0.1")


def wait_for(what: str, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def members(d: Daemon) -> dict[str, dict[str, Any]]:
    with d.client() as c:
        return {m["name"]: m for m in c.stats()["members"]}


def all_alive(ds: list[Daemon], n: int) -> bool:
    return all(sum(m["state"] == "alive" for m in members(d).values()) == n for d in ds)


def same_ring(ds: list[Daemon]) -> bool:
    """Every daemon places keys alike: the same members with the same shares of the ring
    (a member's weight arrives with gossip, a moment after the member itself)."""
    views = [{name: m["ring_share"] for name, m in members(d).items()} for d in ds]
    return all(v == views[0] for v in views)


def records(n: int, size: int) -> list[ChunkRecord]:
    ns = namespace_id(model_fingerprint=b"webrtc-test", layout={"size": size}, chunk_tokens=4)
    keys = chunk_keys(ns, list(range(4 * n)), chunk_tokens=4)
    return [ChunkRecord.build(k, bytes([i + 1]) * size, ns) for i, k in enumerate(keys)]


def owned_by(owner: str, members: list[str], size: int) -> ChunkRecord:
    """A record whose one ring owner (``--replicas 1``) is ``owner``: then no other member
    pulls a copy of it (the ring as the daemons build it: their weight is their GiB, here
    the 256 MiB memory tier of COMMON, in the default zone)."""
    ring = HashRing([RingMember(m, "default", 0.25) for m in members])
    ns = namespace_id(model_fingerprint=b"webrtc-owned", layout={"size": size}, chunk_tokens=4)
    key = next(k for k in chunk_keys(ns, list(range(4 * 64)), chunk_tokens=4) if ring.owners(k, 1) == [owner])
    return ChunkRecord.build(key, b"\x07" * size, ns)


def announced(d: Daemon, recs: list[ChunkRecord]) -> None:
    """Until ``d`` learns (from the keys' owners) that some node holds every record."""

    def known() -> bool:
        with d.client() as c:
            return all(c.locate([r.key])[0] == 1 for r in recs)

    wait_for("the records to be announced", known)


@pytest.fixture
def mesh(daemon_factory: DaemonFactory) -> tuple[Daemon, Daemon, Daemon]:
    require("aiortc")
    seed = daemon_factory("--name", "seed", *COMMON, *LOOPBACK)
    cloud = daemon_factory("--name", "cloud", "--join", seed.tcp, *COMMON, *LOOPBACK)
    # fewer channels than the others: the answering end takes the offerer's count
    edge = daemon_factory(
        "--name", "edge", "--nat", "--join", seed.tcp, *COMMON, *LOOPBACK, "--webrtc-channels", "2"
    )
    wait_for("three members alive everywhere", lambda: all_alive([seed, cloud, edge], 3))
    return seed, cloud, edge


@pytest.mark.timeout(240)
def test_records_of_4_and_16_mib_come_from_a_nat_node_over_webrtc(
    mesh: tuple[Daemon, Daemon, Daemon],
) -> None:
    seed, cloud, edge = mesh
    view = members(cloud)
    assert view["edge"]["reachability"] == "webrtc"
    assert view["edge"]["address"].startswith("webrtc://") and view["edge"]["ring_share"] == 0
    assert view["seed"]["reachability"] == "direct" and view["cloud"]["reachability"] == "direct"
    with seed.client() as c:
        assert "edge" in c.stats()["mesh"]["relaying"]["attached"]

    recs = records(1, 4 << 20) + records(1, 16 << 20)
    with edge.client(timeout_s=60) as c:
        c.put_records(recs, replica=True)  # stored on the edge only (owners may pull copies later)
    announced(cloud, recs)
    with cloud.client(timeout_s=120) as c:
        got = c.get_records([r.key for r in recs])  # verified against each record's checksum
        mesh_stats = c.stats()["mesh"]
    for want, have in zip(recs, got, strict=True):
        assert have is not None, "a record held behind NAT was not fetched"
        assert have.header.checksum == want.header.checksum and bytes(have.payload) == bytes(want.payload)
    assert "edge" in mesh_stats["webrtc"]["links_out"]
    assert mesh_stats["webrtc"]["bytes_received"] >= (20 << 20)
    with edge.client() as c:
        edge_stats = c.stats()["mesh"]
    assert edge_stats["webrtc"]["webrtc_links_accepted"] >= 1
    assert edge_stats["relay"]["attached"] and edge_stats["relay"]["via"] == seed.tcp
    table = subprocess.run(
        node_command("status", "--node", edge.ipc or edge.tcp), capture_output=True, text=True, timeout=30
    ).stdout
    assert f"behind NAT: relayed by {seed.tcp} (attached" in table and "webrtc" in table
    table = subprocess.run(
        node_command("status", "--node", cloud.ipc or cloud.tcp), capture_output=True, text=True, timeout=30
    ).stdout
    assert "webrtc   links to edge" in table and "bandwidth" in table


@pytest.mark.timeout(180)
def test_a_peer_without_the_mesh_secret_gets_nothing(daemon_factory: DaemonFactory) -> None:
    require("aiortc")
    # One replica, owned by the stranger: the members with the secret never pull a copy of
    # their own (repair), so all the stranger could get is what the edge sends it. LAN
    # timings: a false suspicion under load (local ones are tight) would move ownership.
    one = ("--replicas", "1", "--mesh-profile", "lan")
    seed = daemon_factory("--name", "seed", *COMMON, *LOOPBACK, *one, "--mesh-secret", "right")
    stranger = daemon_factory(
        "--name", "stranger", "--join", seed.tcp, *COMMON, *LOOPBACK, *one, "--mesh-secret", "wrong"
    )
    friend = daemon_factory(
        "--name", "friend", "--join", seed.tcp, *COMMON, *LOOPBACK, *one, "--mesh-secret", "right"
    )
    edge = daemon_factory(
        "--name", "edge", "--nat", "--join", seed.tcp, *COMMON, *LOOPBACK, *one, "--mesh-secret", "right"
    )
    # Its gossip is sealed with another secret: the members drop it unread, so the stranger
    # never becomes a member at all (no ring share, no replicas, no WebRTC link).
    wait_for("three members alive", lambda: all_alive([seed, friend, edge], 3))
    time.sleep(2.0)
    assert all("stranger" not in members(d) for d in (seed, friend, edge))
    # (its envelopes carry a seal of the wrong secret: refused before the datagram is read)
    stats = seed.stats()
    assert stats["security"]["bad_seals"] + stats["mesh"]["gossip"]["rejected"] >= 1
    recs = [owned_by("friend", ["seed", "friend"], 1 << 20)]
    with edge.client() as c:
        c.put_records(recs)
    with stranger.client(timeout_s=10) as c:
        assert c.get_records([recs[0].key], local=False) == [None]
        assert c.stats()["mesh"]["webrtc"]["bytes_received"] == 0
    with edge.client() as c:
        assert c.ping()  # still serving
    with friend.client(timeout_s=30) as c:
        deadline = time.monotonic() + 20
        got = c.get_records([recs[0].key])
        while got[0] is None and time.monotonic() < deadline:
            time.sleep(0.5)
            got = c.get_records([recs[0].key])
    assert got[0] is not None and bytes(got[0].payload) == bytes(recs[0].payload)


@pytest.mark.timeout(240)
def test_a_node_behind_a_real_nat_serves_a_chunk_through_webrtc(tmp_path: Path) -> None:
    require("aiortc")
    require_netns("iptables")
    topo = Topology()
    daemons: list[Daemon] = []
    try:
        router, edge_ns = topo.namespace("r"), topo.namespace("e")
        _, root_ip, router_out, _router_ip = topo.link(None, router)
        router_in, router_in_ip, _, edge_ip = topo.link(router, edge_ns)
        topo.route(router, "default", root_ip)
        topo.nat_router(router, router_in, router_out, router_in_ip, edge_ns)

        def start(name: str, *extra: str, ip: str, prefix: tuple[str, ...] = ()) -> Daemon:
            d = start_daemon(
                tmp_path / name,
                "--name",
                name,
                *COMMON,
                "--webrtc-host-addresses",
                ip,
                "--mesh-secret",  # beyond loopback, in namespaces: the nodes prove membership
                "nat",
                *extra,
                tcp=f"tcp://{ip}:0",
                prefix=prefix,
            )
            daemons.append(d)
            return d

        seed = start("seed", ip=root_ip)
        cloud = start("cloud", "--join", seed.tcp, ip=root_ip)
        edge = start("edge", "--nat", "--join", seed.tcp, ip=edge_ip, prefix=tuple(topo.exec_prefix(edge_ns)))
        # The edge really is unreachable from outside: a direct connection to it goes nowhere.
        with pytest.raises(DeadlineExceeded):
            with Client(edge.tcp, timeout_s=1.0) as c:
                c.ping()
        wait_for("three members alive", lambda: all_alive([seed, cloud, edge], 3), timeout_s=60)
        recs = records(2, 2 << 20)
        with edge.client() as c:
            c.put_records(recs, replica=True)
        announced(cloud, recs)
        with cloud.client(timeout_s=60) as c:
            got = c.get_records([r.key for r in recs])
            webrtc = c.stats()["mesh"]["webrtc"]
        assert [bytes(g.payload) if g else None for g in got] == [bytes(r.payload) for r in recs]
        assert "edge" in webrtc["links_out"]
        with seed.client() as c:
            assert c.stats()["mesh"]["relaying"]["forwarded"] > 0
    finally:
        kill_all(daemons)
        topo.close()


@pytest.mark.timeout(180)
def test_an_edge_node_moves_to_another_relay_when_its_relay_dies(mesh: tuple[Daemon, Daemon, Daemon]) -> None:
    seed, cloud, edge = mesh
    seed.proc.kill()
    seed.stop()
    moved = wait_for(
        "the edge to re-attach through the cloud node",
        lambda: members(cloud)["edge"]["address"] == f"webrtc://{cloud.tcp[len('tcp://') :]}/edge",
        timeout_s=60,
    )
    assert moved
    with edge.client() as c:
        relay = c.stats()["mesh"]["relay"]
    assert relay["via"] == cloud.tcp and relay["switches"] >= 1
    recs = records(1, 1 << 20)
    with edge.client() as c:
        c.put_records(recs, replica=True)
    announced(cloud, recs)
    # The first link to the edge through its new relay may fail while the mesh settles (the
    # dialer then fails fast for a few seconds, and a failed fetch is a miss): ask again.
    with cloud.client(timeout_s=60) as c:
        deadline = time.monotonic() + 30
        got = c.get_records([recs[0].key])
        while got[0] is None and time.monotonic() < deadline:
            time.sleep(1.0)
            got = c.get_records([recs[0].key])
    logs = f"cloud:\n{cloud.output[-3000:]}\nedge:\n{edge.output[-3000:]}"
    assert got[0] is not None, logs
    assert bytes(got[0].payload) == bytes(recs[0].payload)


@pytest.mark.timeout(120)
def test_a_relay_forwards_only_gossip_and_signaling_and_names_cannot_be_taken(
    mesh: tuple[Daemon, Daemon, Daemon],
) -> None:
    seed, _cloud, edge = mesh
    recs = records(1, 1 << 16)
    with edge.client() as c:
        c.put_records(recs, replica=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(seed.tcp)
    try:
        # A DELETE smuggled through the relay must not reach the edge node (it would skip
        # the WebRTC membership proof).
        inner = request_header(Op.DELETE, 1, 1000, keys=[recs[0].key])
        sock.send_multipart([request_header(Op.RELAY, 2, 1000, to="edge"), inner])
        # Nor may anyone take over the edge's name while it is attached.
        sock.send_multipart([request_header(Op.ATTACH, 3, 1000, name="edge")])
        assert sock.poll(5000), "no reply to ATTACH"
        reply = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
        assert reply["ok"] is False and "attached elsewhere" in reply["error"]
    finally:
        sock.close(0)
        ctx.term()
    time.sleep(0.5)
    with edge.client() as c:
        assert c.get_records([recs[0].key], local=True)[0] is not None
    with seed.client() as c:
        assert c.stats()["counters"]["errors"].get("RELAY_NOT_ALLOWED", 0) >= 1
    assert members(seed)["edge"]["state"] == "alive"
