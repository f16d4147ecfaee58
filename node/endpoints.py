"""The node's listening sockets: ROUTERs for ``config.listen``, bound before the mesh starts
(the mesh needs the bound address), served by :class:`~.service.NodeServer`."""

from __future__ import annotations

from lmcache_mesh.transports.curve import CurveServer
from lmcache_mesh.transports.zmq import ZmqRouter

from .config import NodeConfig
from .keyring import Keyring

FRAME_SLACK_BYTES = 1 << 20
"""Frames up to this much above our limits still reach us and get a TOO_LARGE reply."""


class Routers:
    """The node's ROUTER sockets for ``config.listen``: tcp:// ones public (CurveZMQ with a
    keyring), ipc:// ones local. Built without I/O; :meth:`bind` listens."""

    def __init__(self, config: NodeConfig, keyring: Keyring | None = None) -> None:
        # Frames a little above our own limits still reach us, so they get an error reply;
        # libzmq drops the connection of a peer sending anything larger.
        max_frame = max(config.limits.max_record_bytes, config.limits.max_header_bytes) + FRAME_SLACK_BYTES
        public = [ep for ep in config.listen if ep.startswith("tcp://")]
        local = [ep for ep in config.listen if not ep.startswith("tcp://")]
        curve = CurveServer(keyring.keys, keyring.authorize) if keyring is not None else None
        # Encryption runs in libzmq's I/O threads: two let sending and receiving overlap.
        self.public = ZmqRouter(public, max_frame, curve, io_threads=2 if curve else 1) if public else None
        self.local = ZmqRouter(local, max_frame) if local else None
        self.bound: list[str] = []

    def __repr__(self) -> str:
        return f"<Routers {self.public!r} {self.local!r}>"

    def all(self) -> list[ZmqRouter]:
        return [r for r in (self.public, self.local) if r is not None]

    def bind(self) -> list[str]:
        """Bind every endpoint (once); returns the bound addresses."""
        if not self.bound:
            for router in self.all():
                self.bound += router.bind()
        return self.bound

    def close(self) -> None:
        for router in self.all():
            router.close()
