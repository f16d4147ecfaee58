"""Transports move frames between processes; they know nothing of KV.

``zmq`` is the data path between daemons and engines (tcp:// and ipc://). WebRTC and the
in-process simulation transport arrive with the mesh and edge issues.
"""

from .zmq import TransportError, ZmqRouter, dealer

__all__ = ["TransportError", "ZmqRouter", "dealer"]
