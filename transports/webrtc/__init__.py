"""WebRTC (aiortc) links: how nodes behind NAT exchange requests and chunk records.

``offer``/``answer`` make a :class:`WebRTCLink` from one SDP offer and one answer, carried
by the caller's signaling; the link moves multipart messages of any size (fragmented below
the data channel's 256 KiB limit) over several data channels with flow control. aiortc is
an optional dependency (``lmcache-mesh[webrtc]``), imported only when a link is made.
:class:`WebRTCPeering` holds every link of one node: dialing members behind NAT, answering
offers, and the membership proof each link must pass before it carries a request.
"""

from .framing import FramingError, Reassembler, pieces
from .link import Dialing, LinkClosed, WebRTCConfig, WebRTCLink, answer, offer, sdp_fingerprint
from .peering import LinkConduit, LinkUnavailable, WebRTCPeering
from .signaling import SIGNAL_KINDS, Signal

__all__ = [
    "SIGNAL_KINDS",
    "Dialing",
    "FramingError",
    "LinkClosed",
    "LinkConduit",
    "LinkUnavailable",
    "Reassembler",
    "Signal",
    "WebRTCConfig",
    "WebRTCLink",
    "WebRTCPeering",
    "answer",
    "offer",
    "pieces",
    "sdp_fingerprint",
]
