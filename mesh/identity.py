"""Names are identities: another node under our name, or an earlier life of ours?

When news puts our own name alive at another address, membership does not refute at once:
it pings that address under our name (:class:`IdentityChecks` keeps those pings). A live
node answering there holds our name — if we are the newcomer we refuse to join — while
silence means an earlier life of ours (a restart on a new port), which is then refuted.
"""

from __future__ import annotations

from dataclasses import dataclass

IDENTITY_CHECK_SEQ = 1 << 40
"""Sequence numbers of identity checks start here, apart from probes' (which count from 1)."""
NEWCOMER_S = 30.0
"""A node that finds its name held by a live member within this long of starting is the
second one: it refuses to join. An older node keeps its name and only logs the conflict."""
CLEARED_ADDRESSES = 64
"""Addresses found silent (an earlier life of ours) are remembered, up to this many, for
:data:`CLEARED_S`: news of us there is refuted at once instead of checked again."""
CLEARED_S = 60.0


@dataclass(slots=True)
class IdentityCheck:
    """A ping under our name to ``address``, where news put us alive at ``incarnation``."""

    address: str
    incarnation: int
    deadline: float


class IdentityChecks:
    """Identity pings in flight, by sequence number, and addresses found silent."""

    def __init__(self) -> None:
        self._pending: dict[int, IdentityCheck] = {}
        self._cleared: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def cleared(self, address: str, now: float) -> bool:
        """Whether ``address`` was found silent lately (an earlier life of ours)."""
        return self._cleared.get(address, 0.0) > now

    def begin(self, seq: int, address: str, incarnation: int, deadline: float) -> bool:
        """Start a check; False if one for ``address`` is in flight (it then covers
        ``incarnation`` as well)."""
        for check in self._pending.values():
            if check.address == address:
                check.incarnation = max(check.incarnation, incarnation)
                return False
        self._pending[seq] = IdentityCheck(address, incarnation, deadline)
        return True

    def answered(self, seq: int) -> IdentityCheck | None:
        """The check this reply answers (and no longer in flight), if any."""
        return self._pending.pop(seq, None)

    def expired(self, now: float) -> list[IdentityCheck]:
        """Checks nobody answered by their deadline; their addresses count as cleared."""
        done = [seq for seq, c in self._pending.items() if now >= c.deadline]
        checks = [self._pending.pop(seq) for seq in done]
        for c in checks:
            self.clear(c.address, now)
        return checks

    def next_deadline(self) -> float:
        return min((c.deadline for c in self._pending.values()), default=float("inf"))

    def clear(self, address: str, now: float) -> None:
        if len(self._cleared) >= CLEARED_ADDRESSES:
            self._cleared = {a: t for a, t in self._cleared.items() if t > now}
            while len(self._cleared) >= CLEARED_ADDRESSES:
                self._cleared.pop(next(iter(self._cleared)))
        self._cleared[address] = now + CLEARED_S
