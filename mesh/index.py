"""The prefix index held by a key's ring owners: which members hold which chunk keys.

Holders announce keys to the owners of each key (adds and removes, in batches), so "who
holds k" is one question to k's owner and no node keeps an index of everything cached
everywhere. Entries are a hint: a GET always verifies the bytes.

Holders are stored as a bitmask of small member ids per key rather than a set of names:
measured (bench/bench_mesh.py) about 100 B per key for one holder and 150 B for two,
the 49-byte key object included.
"""

from __future__ import annotations

from collections.abc import Iterable


class HolderIndex:
    """key -> members that said they hold it; bounded to ``max_keys`` (first announced go first)."""

    def __init__(self, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._holders: dict[bytes, int] = {}
        self._ids: dict[str, int] = {}
        self._names: list[str | None] = []
        self.dropped = 0

    def __repr__(self) -> str:
        return f"<HolderIndex {len(self._holders)} keys {len(self._ids)} holders>"

    def __len__(self) -> int:
        return len(self._holders)

    def _id(self, name: str) -> int:
        i = self._ids.get(name)
        if i is None:
            i = self._ids[name] = len(self._names)
            self._names.append(name)
        return i

    def add(self, holder: str, keys: Iterable[bytes]) -> None:
        bit = 1 << self._id(holder)
        holders = self._holders
        for key in keys:
            holders[key] = holders.get(key, 0) | bit  # in place: re-inserting would grow the table
        while len(self._holders) > self.max_keys:
            del self._holders[next(iter(self._holders))]
            self.dropped += 1

    def remove(self, holder: str, keys: Iterable[bytes]) -> None:
        i = self._ids.get(holder)
        if i is None:
            return
        mask = ~(1 << i)
        for key in keys:
            bits = self._holders.get(key)
            if bits is None:
                continue
            bits &= mask
            if bits:
                self._holders[key] = bits
            else:
                del self._holders[key]

    def names(self) -> list[str]:
        """Every holder currently named."""
        return list(self._ids)

    def forget(self, holder: str) -> None:
        """``holder`` is dead or gone: stop naming it (its bits are skipped, then swept)."""
        i = self._ids.pop(holder, None)
        if i is None:
            return
        self._names[i] = None
        if len(self._names) > 2 * len(self._ids) + 8:
            self._compact()

    def holders(self, key: bytes) -> list[str]:
        bits = self._holders.get(key, 0)
        out: list[str] = []
        i = 0
        while bits:
            if bits & 1:
                name = self._names[i]
                if name is not None:
                    out.append(name)
            bits >>= 1
            i += 1
        return out

    def _compact(self) -> None:
        """Renumber live holders densely and drop forgotten bits (O(keys), rare)."""
        live = [n for n in self._names if n is not None]
        remap = {self._ids[n]: new for new, n in enumerate(live)}
        for key, bits in list(self._holders.items()):
            new_bits, i = 0, 0
            while bits:
                if bits & 1 and i in remap:
                    new_bits |= 1 << remap[i]
                bits >>= 1
                i += 1
            if new_bits:
                self._holders[key] = new_bits
            else:
                del self._holders[key]
        self._names = list(live)
        self._ids = {n: i for i, n in enumerate(live)}
