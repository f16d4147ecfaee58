"""Peer addresses: ``tcp://HOST:PORT`` for a node peers can dial, and ``webrtc://HOST:PORT/NAME``
for a node behind NAT.

A node behind NAT accepts no inbound connections. It keeps an outbound connection to a
reachable node, its *relay* (``tcp://HOST:PORT``), which forwards small one-way messages
(membership datagrams, WebRTC offers) to it by NAME; bulk data then flows over a WebRTC
link set up by one offer and one answer. The address names both, so every member knows how
to reach every other from the address alone.
"""

from __future__ import annotations

from typing import NamedTuple

WEBRTC_SCHEME = "webrtc://"


class RelayedAddress(NamedTuple):
    relay: str
    """tcp://HOST:PORT of the relay node."""
    name: str
    """The NAT node's member name, which the relay knows it by."""


def webrtc_address(relay: str, name: str) -> str:
    if not relay.startswith("tcp://"):
        raise ValueError(f"relay address must be tcp://HOST:PORT, got {relay!r}")
    if not name or "/" in name:
        raise ValueError(f"node name {name!r} cannot be used in a webrtc:// address (empty or has '/')")
    return f"{WEBRTC_SCHEME}{relay[len('tcp://') :]}/{name}"


def parse_webrtc_address(address: str) -> RelayedAddress | None:
    """The relay and name of a ``webrtc://`` address; None for any other address."""
    if not address.startswith(WEBRTC_SCHEME):
        return None
    hostport, sep, name = address[len(WEBRTC_SCHEME) :].partition("/")
    if not sep or not hostport or not name or "/" in name:
        raise ValueError(f"bad webrtc address {address!r}: expected webrtc://HOST:PORT/NAME")
    return RelayedAddress(f"tcp://{hostport}", name)


def reachability(address: str) -> str:
    """``webrtc`` for a node behind NAT, ``direct`` for one peers can dial."""
    return "webrtc" if address.startswith(WEBRTC_SCHEME) else "direct"
