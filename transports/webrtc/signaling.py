"""WebRTC signaling messages: what two nodes exchange, through relays, to make one link.

One offer, its answer or a refusal, per session. The node's protocol carries them as SIGNAL
requests; :class:`~.peering.WebRTCPeering` sends and takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

SIGNAL_KINDS = ("offer", "answer", "refuse")


@dataclass(frozen=True, slots=True)
class Signal:
    """One WebRTC signaling message: an offer, its answer, or a refusal, for one session."""

    sender: str
    """Where the sender is reached (its member address): answers and refusals go there."""
    name: str
    """The sender's member name."""
    session: str
    kind: str
    """One of :data:`SIGNAL_KINDS`."""
    sdp: str = ""
    """The offer or answer ("" for a refusal)."""
    reason: str = ""
    """Why a link was refused."""
    channels: int = 0
    """Data channels the offer opens (0: the answerer's default)."""
