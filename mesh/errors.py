"""Typed errors, each with one wire code: the node's requests and the mesh's calls share them.

A reply that carries an error holds ``code`` (an :class:`ErrorCode`) and a message;
:func:`error_from_wire` turns it back into the matching exception on the client. They live
in the mesh package because the mesh's own calls to peers raise and catch them too; the
node's public path for them is :mod:`lmcache_mesh.node.errors`.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BadRequest",
    "Busy",
    "ChecksumMismatch",
    "DeadlineExceeded",
    "ErrorCode",
    "Forbidden",
    "InternalError",
    "MalformedMessage",
    "MeshError",
    "MeshProtocolError",
    "NoSpace",
    "TooLarge",
    "Unavailable",
    "UnknownOp",
    "UnsupportedVersion",
    "error_from_wire",
]


class ErrorCode(IntEnum):
    # APPEND ONLY: the numbers are on the wire.
    BAD_REQUEST = 1
    UNSUPPORTED_VERSION = 2
    TOO_LARGE = 3
    CHECKSUM_MISMATCH = 4
    DEADLINE_EXCEEDED = 5
    UNKNOWN_OP = 6
    NO_SPACE = 7
    INTERNAL = 8
    UNAVAILABLE = 9
    BUSY = 10
    FORBIDDEN = 11


class MeshError(Exception):
    """Base of every error lmcache-mesh raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL


class BadRequest(MeshError):
    """A frame or header could not be decoded, or a field has the wrong type or value."""

    code = ErrorCode.BAD_REQUEST


class UnsupportedVersion(MeshError):
    """The peer speaks a protocol or record format version outside our supported range."""

    code = ErrorCode.UNSUPPORTED_VERSION


class TooLarge(MeshError):
    """A header, record or message is above a configured limit."""

    code = ErrorCode.TOO_LARGE


class ChecksumMismatch(MeshError):
    """A payload does not match the checksum in its record header."""

    code = ErrorCode.CHECKSUM_MISMATCH


class DeadlineExceeded(MeshError, TimeoutError):
    """The request's deadline passed before it completed (or no reply came in time)."""

    code = ErrorCode.DEADLINE_EXCEEDED


class UnknownOp(MeshError):
    """The request names an operation this node does not know."""

    code = ErrorCode.UNKNOWN_OP


class NoSpace(MeshError):
    """No tier can admit the record (everything is pinned, or it exceeds every budget)."""

    code = ErrorCode.NO_SPACE


class Unavailable(MeshError):
    """The node is shutting down or the client is closed."""

    code = ErrorCode.UNAVAILABLE


class Busy(MeshError):
    """The node is at a limit (requests or bytes in flight): try later, or recompute."""

    code = ErrorCode.BUSY


class Forbidden(MeshError):
    """The sender's key may not do this (its role), or not in that tenant."""

    code = ErrorCode.FORBIDDEN


class InternalError(MeshError):
    """A bug on the remote side; the message says what failed."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[int, type[MeshError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        TooLarge,
        ChecksumMismatch,
        DeadlineExceeded,
        UnknownOp,
        NoSpace,
        Unavailable,
        Busy,
        Forbidden,
        InternalError,
    )
}


def error_from_wire(code: object, message: object) -> MeshError:
    """The exception for an error reply; unknown codes become :class:`InternalError`."""
    cls = _BY_CODE.get(code, InternalError) if isinstance(code, int) else InternalError
    return cls(str(message))


class MeshProtocolError(Exception):
    """Base of the errors membership and gossip raise on purpose (never sent as a reply)."""


class MalformedMessage(MeshProtocolError):
    """A datagram could not be decoded or has fields of the wrong type; it is dropped and counted."""
