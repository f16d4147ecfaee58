"""Cluster: the ring follows membership, even when read from another thread mid-change."""

from __future__ import annotations

from typing import Any

import pytest

import lmcache_mesh.mesh.cluster as cluster_module
from lmcache_mesh.mesh.cluster import Cluster
from lmcache_mesh.mesh.config import MeshConfig
from lmcache_mesh.mesh.ring import HashRing


class _NoNetwork:
    """A gossip transport that sends nothing (these tests never start the cluster)."""

    address = "tcp://127.0.0.1:1"
    on_receive = None

    def send(self, to: str, data: bytes) -> None: ...

    def send_message(self, to: str, frames: list[bytes]) -> None: ...

    def deliver(self, sender: str, data: bytes) -> None: ...

    def readdress(self, address: str) -> None: ...

    def close(self) -> None: ...


def _cluster() -> Cluster:
    return Cluster("a", "tcp://127.0.0.1:1", "z", 1.0, MeshConfig.local(), _NoNetwork())


def test_a_ring_built_while_membership_changes_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild that a membership change overtakes (a status scrape on another thread) is
    used once and dropped, so the next reader builds from the new membership."""
    c = _cluster()
    c._changed(c.membership.me, c.membership.me.state)  # owners may have moved: rebuild on use

    def overtaken(*args: Any, **kwargs: Any) -> HashRing:
        c._changed(c.membership.me, c.membership.me.state)  # the loop changes membership meanwhile
        return HashRing(*args, **kwargs)

    monkeypatch.setattr(cluster_module, "HashRing", overtaken)
    assert c.ring.owners(b"k" * 16, 1) == ["a"]
    assert c._ring is None  # not kept: built from what may be old members
    monkeypatch.setattr(cluster_module, "HashRing", HashRing)
    ring = c.ring
    assert c.ring is ring  # an undisturbed rebuild is kept


def test_live_address_and_names_follow_member_state() -> None:
    """Only alive or suspected members have a live address."""
    c = _cluster()
    assert c.live_address("a") == "tcp://127.0.0.1:1" and c.live_names() == {"a"}
    assert c.live_address("nobody") is None
