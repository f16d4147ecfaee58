"""Forged membership traffic against real daemons (issue 17): raw ZeroMQ frames, as an
outsider on the network would send them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from lmcache_mesh.mesh.messages import MAX_INCARNATION, Kind, Message, MsgType, News
from lmcache_mesh.node.protocol import mesh_envelope

from ..conftest import DaemonFactory
from ..helpers import Daemon, free_port, node_command
from .test_mesh import PROFILE, members, start_node, wait_until

SECRET = ("--mesh-secret", "s3cret-of-this-mesh")


def forge(to: Daemon, *news: News, sender: str = "attacker", address: str = "tcp://127.0.0.99:1") -> None:
    """One gossip datagram from an outsider, straight to ``to``'s ROUTER."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(to.tcp)
    datagram = Message(MsgType.GOSSIP, sender, address, gossip=list(news)).encode()
    sock.send_multipart([mesh_envelope(address), datagram])
    sock.close()


def _mesh(factory: DaemonFactory, base: int, *extra: str) -> tuple[Daemon, Daemon]:
    a = start_node(factory, base, free_port(f"127.0.0.{base}"), *extra)
    b = start_node(factory, base + 1, free_port(f"127.0.0.{base + 1}"), *extra, "--join", a.tcp)
    assert wait_until(lambda: len(members(a)) == 2 and len(members(b)) == 2, 20) is not None
    return a, b


ATTACKS = [
    News(Kind.DEAD, "node{victim}", MAX_INCARNATION, origin="attacker"),  # death no one can refute
    News(Kind.ALIVE, "ghost", 0, "tcp://127.0.0.99:1", "z0", 60000.0, "ghost"),  # a huge ring share
    News(Kind.ALIVE, "node{victim}", 5, "tcp://127.0.0.99:1", "z0", 1.0, "node{victim}"),  # hijack
]


def _attack(target: Daemon, victim: int) -> None:
    for n in ATTACKS:
        forge(target, News(n.kind, n.name.format(victim=victim), n.incarnation, n.address, n.zone, n.weight,
                           n.origin.format(victim=victim)))  # fmt: skip


def test_with_a_mesh_secret_forged_gossip_is_dropped_unread(daemon_factory: DaemonFactory) -> None:
    a, b = _mesh(daemon_factory, 60, *SECRET)
    _attack(a, 61)
    time.sleep(1.5)
    view = members(a)
    assert set(view) == {"node60", "node61"} and view["node61"]["state"] == "alive"
    assert view["node61"]["address"] == b.tcp
    stats = a.stats()
    gossip = stats["mesh"]["gossip"]
    assert gossip == {"proof": "mesh secret", "rejected": gossip["rejected"]}
    # the envelope is not sealed: refused as a member's request before the datagram is read
    assert stats["security"]["forbidden"] + gossip["rejected"] >= 3
    # a sealed envelope around an unsealed datagram: the datagram's own tag is checked too
    from lmcache_mesh.transports.seal import HeaderSeal

    sealer = HeaderSeal(SECRET[1].encode())
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(a.tcp)
    datagram = Message(MsgType.GOSSIP, "attacker", "tcp://127.0.0.99:1", gossip=[ATTACKS[0]]).encode()
    sock.send_multipart([sealer.seal(mesh_envelope("tcp://127.0.0.99:1")), datagram])
    sock.close()
    assert wait_until(lambda: a.stats()["mesh"]["gossip"]["rejected"] >= 1, 5) is not None
    # a node with another secret is no member either
    outsider = start_node(
        daemon_factory, 62, free_port("127.0.0.62"), "--mesh-secret", "guess", "--join", a.tcp
    )
    time.sleep(2.0)
    assert set(members(a)) == {"node60", "node61"} and set(members(outsider)) == {"node62"}


def test_without_a_secret_forged_gossip_cannot_pin_wedge_or_kill_a_member(
    daemon_factory: DaemonFactory,
) -> None:
    """Loopback meshes may run open, but the bounds still hold: the DEAD at 2**62 is dropped
    (counted), the hijacked address refuted, and a weight of 60000 counts as 16 members."""
    a, b = _mesh(daemon_factory, 64)
    _attack(a, 65)

    def refuted() -> bool:  # the hijack at incarnation 5 may make it a suspect for a moment
        m = members(a)["node65"]
        return bool(m["state"] == "alive" and m["address"] == b.tcp and m["incarnation"] > 5)

    assert wait_until(refuted, 15) is not None
    view = members(a)
    # an open mesh admits the ghost (that is what the secret is for), at most 16x a median share
    assert view.get("ghost", {}).get("ring_share", 0) <= 16 / 18 + 0.01
    assert a.stats()["mesh"]["membership"]["implausible_news"] >= 1
    with a.client() as c:
        assert c.ping() is not None  # still answering at once


def test_a_stopped_node_costs_a_get_misses_at_worst_never_its_deadline(daemon_factory: DaemonFactory) -> None:
    """Issue 17 (6): with a node SIGSTOPped (alive to the kernel, silent to us), GETs with a
    2 s timeout overran it: asking the stopped owner who holds a key took half the time, then
    fetching from it the rest. Now the node answers a little before the asker's deadline with
    what it has: a slow peer costs misses, never a DeadlineExceeded."""
    import signal

    from lmcache_mesh.node import ChunkRecord, chunk_keys, namespace_id
    from lmcache_mesh.node.client import Client

    one = ("--replicas", "1")  # the writer and one owner hold each chunk
    nodes = [start_node(daemon_factory, 70, free_port("127.0.0.70"), *one)]
    for i in (71, 72):
        nodes.append(start_node(daemon_factory, i, free_port(f"127.0.0.{i}"), *one, "--join", nodes[0].tcp))
    assert wait_until(lambda: all(len(members(d)) == 3 for d in nodes), 20) is not None
    writer, stopped, reader = nodes
    ns = namespace_id(b"stopped-node", {"engine": "test"}, 16)
    keys = chunk_keys(ns, list(range(16 * 24)), 16)
    with writer.client() as c:
        c.put_records([ChunkRecord.build(k, bytes([i]) * (64 << 10), ns) for i, k in enumerate(keys)])

    def owned_by_the_stopped_one() -> int:
        return sum(hs == ["node70", "node71"] for hs in reader.client().locate(keys)[1])

    assert wait_until(lambda: owned_by_the_stopped_one() >= 3, 10) is not None
    time.sleep(1.0)  # every replica has landed
    here = sum("node72" in hs for hs in reader.client().locate(keys)[1])
    stopped.proc.send_signal(signal.SIGSTOP)
    try:
        with Client(reader.tcp, timeout_s=2.0) as c:
            took = []
            for _ in range(5):
                started = time.monotonic()
                got = c.get_records(keys, timeout_s=2.0)  # raises on DeadlineExceeded
                took.append(time.monotonic() - started)
                assert took[-1] < 2.1
                assert all(r is None or bytes(r.payload[:1]) == bytes([i]) for i, r in enumerate(got))
                assert sum(r is not None for r in got) >= here
            print(f"\nGETs with a stopped holder: {', '.join(f'{t * 1000:.0f} ms' for t in took)}")
            assert took[0] < 1.2  # hedged: a late owner or holder costs a hedge delay, not the deadline
    finally:
        stopped.proc.send_signal(signal.SIGCONT)


def test_beyond_loopback_a_node_without_proof_refuses_to_start(tmp_path: Path) -> None:
    """Protected mode: 0.0.0.0 with neither keys nor a mesh secret is refused before anything
    binds (exit status 1, the reason and the three ways out on stderr)."""
    started = time.monotonic()
    out = subprocess.run(
        node_command("run", "--data-dir", str(tmp_path), "--listen", "tcp://0.0.0.0:0", "--disk", "0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and time.monotonic() - started < 30
    assert "refusing to listen at tcp://0.0.0.0:0" in out.stderr
    for way_out in ("--mesh-secret", "lmcache-node keygen", "--insecure", "127.0.0.1"):
        assert way_out in out.stderr


def test_insecure_says_so_in_the_log_and_in_status(
    daemon_factory: DaemonFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from lmcache_mesh.engines.cli.daemon import refuse_open_mesh
    from lmcache_mesh.node.config import NodeConfig

    cfg = NodeConfig.load(None, env={}, overrides={"listen": ["tcp://0.0.0.0:7700"], "insecure": True})
    refuse_open_mesh(cfg, None)
    assert "INSECURE (--insecure): listening at tcp://0.0.0.0:7700" in caplog.text
    d = start_node(daemon_factory, 66, free_port("127.0.0.66"), "--insecure")
    security = d.stats()["security"]
    assert security["insecure"] is True and security["membership_proof"] == "none"
    s = start_node(daemon_factory, 67, free_port("127.0.0.67"), *SECRET)
    assert s.stats()["security"]["membership_proof"] == "mesh secret"


def test_a_second_node_under_a_live_members_name_refuses_to_join(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Issue 17 (8): a node started with a live member's ``--name`` (another address) asks
    that member, under the name, and hears it answer: it exits (status 1) saying why; the
    mesh keeps the name at the first member's address, and that member logs the conflict."""
    a, b = _mesh(daemon_factory, 80)
    second = subprocess.run(
        node_command(
            "run", "--name", "node81", "--listen", f"tcp://127.0.0.82:{free_port('127.0.0.82')}",
            "--data-dir", str(tmp_path / "second"), "--disk", "0", *PROFILE, "--join", a.tcp,
        ),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1, second.stdout + second.stderr
    assert "the name 'node81' belongs to a live member at " + b.tcp in second.stderr
    time.sleep(1.0)
    for d in (a, b):
        m = members(d)["node81"]
        assert m["state"] == "alive" and m["address"] == b.tcp
    assert b.stats()["mesh"]["membership"]["name_conflicts"] >= 1


def test_with_a_mesh_secret_only_sealed_requests_are_a_members(daemon_factory: DaemonFactory) -> None:
    """Index and repair traffic between members carries the mesh secret's seal: an outsider's
    WHO_HAS, holder ANNOUNCE and scoped GET are refused (FORBIDDEN); a replica flag is ignored
    (its chunk is replicated like any client's); engines' and operators' requests still work."""
    from lmcache_mesh.node import ChunkRecord, chunk_keys, namespace_id
    from lmcache_mesh.node.client import Client
    from lmcache_mesh.node.errors import ErrorCode
    from lmcache_mesh.node.protocol import Op, request_header
    from lmcache_mesh.transports.seal import HeaderSeal

    a, b = _mesh(daemon_factory, 90, *SECRET)
    ns = namespace_id(b"sealed", {"engine": "test"}, 16)
    keys = chunk_keys(ns, list(range(16 * 4)), 16)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(a.tcp)
    try:
        member_only = [
            request_header(Op.WHO_HAS, 1, 2000, keys=keys[:1]),
            request_header(Op.ANNOUNCE, 2, 2000, holder="node91", add=keys[:1]),
            request_header(Op.GET, 3, 2000, keys=keys[:1], scoped=True),
        ]
        for header in member_only:
            sock.send_multipart([header])
            assert sock.poll(5000), "no answer"
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert reply["ok"] is False and reply["code"] == ErrorCode.FORBIDDEN, reply
        # the same WHO_HAS sealed with the secret is a member's
        sock.send_multipart([HeaderSeal(SECRET[1].encode()).seal(member_only[0])])
        assert sock.poll(5000)
        assert msgpack.unpackb(sock.recv_multipart()[0])["ok"] is True
    finally:
        sock.close()
    with Client(a.tcp, timeout_s=5.0) as engine:  # an engine over tcp://, no seal
        engine.put_records(
            [ChunkRecord.build(k, bytes([i]) * 4096, ns) for i, k in enumerate(keys)], replica=True
        )
        assert engine.lookup(keys) == len(keys)
    with Client(b.tcp, timeout_s=5.0) as other:
        assert wait_until(lambda: other.lookup(keys, local=True) > 0, 10) is not None  # replicated
    assert a.stats()["security"]["membership_proof"] == "mesh secret"
