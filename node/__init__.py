"""lmcache_mesh.node: chunk keys and records, storage tiers, the node service and its clients.

from lmcache_mesh.node import Client, AsyncClient, Node, NodeConfig, namespace_id, chunk_keys
"""

from lmcache_mesh.mesh.errors import (
    BadRequest,
    ChecksumMismatch,
    DeadlineExceeded,
    ErrorCode,
    MeshError,
    NoSpace,
    TooLarge,
    Unavailable,
    UnknownOp,
    UnsupportedVersion,
)

from .client import AsyncClient, Client
from .config import NodeConfig
from .keys import KEY_BYTES, chunk_keys, namespace_id, tail_key
from .node import VERSION, Node
from .records import ChunkRecord, RecordHeader
from .sizes import format_size, parse_size

__all__ = [
    "KEY_BYTES",
    "VERSION",
    "AsyncClient",
    "BadRequest",
    "ChecksumMismatch",
    "ChunkRecord",
    "Client",
    "DeadlineExceeded",
    "ErrorCode",
    "MeshError",
    "Node",
    "NodeConfig",
    "NoSpace",
    "RecordHeader",
    "TooLarge",
    "Unavailable",
    "UnknownOp",
    "UnsupportedVersion",
    "chunk_keys",
    "format_size",
    "namespace_id",
    "parse_size",
    "tail_key",
]
