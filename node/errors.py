"""The node's typed errors (defined with the mesh, which raises them too), each with one wire code."""

from lmcache_mesh.mesh.errors import (
    BadRequest,
    Busy,
    ChecksumMismatch,
    DeadlineExceeded,
    ErrorCode,
    Forbidden,
    InternalError,
    MeshError,
    NoSpace,
    TooLarge,
    Unavailable,
    UnknownOp,
    UnsupportedVersion,
    error_from_wire,
)

__all__ = [
    "ErrorCode",
    "MeshError",
    "BadRequest",
    "UnsupportedVersion",
    "TooLarge",
    "ChecksumMismatch",
    "DeadlineExceeded",
    "UnknownOp",
    "NoSpace",
    "Unavailable",
    "Busy",
    "Forbidden",
    "InternalError",
    "error_from_wire",
]
