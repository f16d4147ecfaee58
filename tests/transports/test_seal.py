"""Sealed gossip: datagrams carry an HMAC of the mesh secret; others never reach membership."""

from __future__ import annotations

from lmcache_mesh.mesh.simulated_ports import InProcGossip
from lmcache_mesh.transports.inproc import InProcNetwork
from lmcache_mesh.transports.seal import TAG_BYTES, SealedGossip


def _pair(
    net: InProcNetwork, secret_a: bytes, secret_b: bytes
) -> tuple[SealedGossip, SealedGossip, list[bytes]]:
    a = SealedGossip(InProcGossip(net.transport("a")), secret_a)
    b = SealedGossip(InProcGossip(net.transport("b")), secret_b)
    got: list[bytes] = []
    b.on_receive = lambda src, data: got.append(data)
    return a, b, got


def test_a_datagram_sealed_with_the_secret_arrives_as_sent() -> None:
    net = InProcNetwork()
    a, b, got = _pair(net, b"secret", b"secret")
    a.send("b", b"hello members")
    net.run_for(1.0)
    assert got == [b"hello members"] and b.rejected == 0


def test_other_secrets_forged_tags_and_bare_datagrams_are_dropped_and_counted() -> None:
    net = InProcNetwork()
    a, b, got = _pair(net, b"other", b"secret")
    a.send("b", b"from another mesh")
    outsider = net.transport("x")
    outsider.send("b", b"\x00" * TAG_BYTES + b"forged")  # a tag of the right size, wrong
    outsider.send("b", b"short")
    net.run_for(1.0)
    assert got == [] and b.rejected == 3
