"""Forged membership traffic against real daemons (issue 17): raw ZeroMQ frames, as an
outsider on the network would send them."""

from __future__ import annotations

import time

import zmq

from lmcache_mesh.mesh.messages import MAX_INCARNATION, Kind, Message, MsgType, News
from lmcache_mesh.node.protocol import mesh_envelope

from ..conftest import DaemonFactory
from ..helpers import Daemon, free_port
from .test_mesh import members, start_node, wait_until

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
    gossip = a.stats()["mesh"]["gossip"]
    assert gossip == {"proof": "mesh secret", "rejected": gossip["rejected"]} and gossip["rejected"] >= 3
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
    time.sleep(1.5)
    view = members(a)
    assert view["node65"]["state"] == "alive" and view["node65"]["address"] == b.tcp  # refuted
    # an open mesh admits the ghost (that is what the secret is for), at most 16x a median share
    assert view.get("ghost", {}).get("ring_share", 0) <= 16 / 18 + 0.01
    assert a.stats()["mesh"]["membership"]["implausible_news"] >= 1
    with a.client() as c:
        assert c.ping() is not None  # still answering at once
