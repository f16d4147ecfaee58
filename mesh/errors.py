"""Typed errors of the mesh."""

from __future__ import annotations


class MeshProtocolError(Exception):
    """Base of the errors the mesh raises on purpose."""


class MalformedMessage(MeshProtocolError):
    """A datagram could not be decoded or has fields of the wrong type; it is dropped and counted."""
