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


def test_a_header_sealed_with_the_secret_opens_as_sent_and_nothing_else_is_a_members() -> None:
    import msgpack

    from lmcache_mesh.transports.seal import SEAL_MARK, HeaderSeal, strip_seal

    header = msgpack.packb({"op": 10, "id": 7})
    seal, other = HeaderSeal(b"secret"), HeaderSeal(b"other")
    sealed = seal.seal(header)
    assert sealed[:1] == SEAL_MARK and header[:1] != SEAL_MARK  # msgpack never writes 0xc1
    opened, proven = seal.open(sealed)
    assert bytes(opened) == header and proven and seal.rejected == 0
    assert other.open(sealed)[1] is False and other.rejected == 1  # another secret: counted
    forged = bytearray(sealed)
    forged[-1] ^= 1  # the header changed after sealing
    assert seal.open(bytes(forged))[1] is False and seal.rejected == 1
    assert seal.open(header) == (header, False) and seal.rejected == 1  # plain: not counted
    assert seal.open(SEAL_MARK + b"short")[1] is False
    assert bytes(strip_seal(sealed)) == header and strip_seal(header) == header
