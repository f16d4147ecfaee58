"""Transports move frames between processes; they know nothing of KV.

``zmq`` is the data path between daemons and engines (tcp:// and ipc://); ``webrtc`` links
reach nodes behind NAT, through the ``relay``; ``inproc`` is the simulations' network; ``wire``
reads msgpack maps for every layer above.
"""

from .zmq import TransportError, ZmqRouter, dealer

__all__ = ["TransportError", "ZmqRouter", "dealer"]
