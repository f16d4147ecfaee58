"""The relay's table of attached NAT nodes."""

from __future__ import annotations

import time

from lmcache_mesh.transports.relay import RelayTable


def test_a_live_name_cannot_be_taken_but_its_holder_may_reconnect() -> None:
    t = RelayTable(ttl_s=0.2)
    assert t.attach("edge", b"conn-1", "secret-token")
    assert t.attach("edge", b"conn-1", "secret-token")  # renewal
    assert not t.attach("edge", b"intruder", "guess")
    assert not t.attach("edge", b"intruder")
    assert t.identity("edge") == b"conn-1"
    assert t.attach("edge", b"conn-2", "secret-token")  # the same uplink after a reconnect
    assert t.identity("edge") == b"conn-2"
    time.sleep(0.25)  # expired: a restarted node (new token) gets the name back
    assert t.identity("edge") is None
    assert t.attach("edge", b"conn-3", "new-token") and t.names() == ["edge"]
