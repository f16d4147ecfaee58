"""What the mesh's work needs from the node it runs in: small interfaces, implemented by node/.

The mesh (holder index, replication, repair, mesh-wide reads) sees chunk keys as opaque
16-byte strings and records as opaque objects with a key and a size. It reaches this
node's tiers through :class:`Holdings` and other members through :class:`Peers`, so the
same code runs inside the daemon (ZeroMQ, WebRTC) and in a simulation (in-process peers,
a virtual clock). Every call is made on the event loop's thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from .costs import Cost


class Record(Protocol):
    """A chunk record as the mesh sees it: its key, its size on the wire, and the size of
    what it holds (more when a codec made it smaller)."""

    @property
    def key(self) -> bytes: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def raw_nbytes(self) -> int: ...

    @property
    def wire_coded(self) -> bool:
        """Re-encoded by the sender for the trip (not stored that way there)."""
        ...


R = TypeVar("R", bound=Record)


class Holdings(Protocol[R]):
    """This node's own tiers. Must not block the loop for long (memory and index lookups)."""

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        """Per key: held in any tier here. No side effects."""
        ...

    def keys(self) -> list[bytes]:
        """Every key held here (a copy)."""
        ...

    def put_records(self, records: Sequence[R]) -> list[R]:
        """Keep these records here (all or none); raises a MeshError such as NoSpace. Returns
        them as kept (e.g. copied into the node's shared memory), in order."""
        ...

    def checksum_failed(self, count: int) -> None:
        """``count`` records from peers failed verification and were dropped."""
        ...


class Peer(Protocol[R]):
    """The calls the mesh makes of one member. Failures raise MeshError or OSError."""

    checksum_failures: int
    """Records received that failed verification (returned as misses); the mesh resets it."""

    async def put_records(self, records: Sequence[R], replica: bool = False) -> None: ...

    async def announce(self, holder: str, add: Sequence[bytes], remove: Sequence[bytes]) -> None: ...

    async def who_has(self, keys: Sequence[bytes], timeout_s: float | None = None) -> list[list[str]]: ...

    async def get_records(
        self,
        keys: Sequence[bytes],
        local: bool = False,
        timeout_s: float | None = None,
        cost: Cost | None = None,
        wire: str = "",
    ) -> list[R | None]:
        """``wire``: a lossless codec the peer re-encodes raw float payloads into for the trip."""
        ...


class Peers(Protocol[R]):
    """One :class:`Peer` per member address, made on first use."""

    timeout_s: float
    """The longest a single call to a peer may take."""

    def get(self, address: str) -> Peer[R]: ...

    def drop(self, address: str) -> None:
        """Forget the peer at ``address`` (dead or unresponsive): what it still queues is discarded."""
        ...

    async def aclose(self) -> None: ...
