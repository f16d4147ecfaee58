"""Shared fuzzing settings and input builders: raw bytes, msgpack junk, near-valid maps, mutations.

Every decoder gets 10,000 examples in CI, and Hypothesis spends a fixed cost per example
plus a cost per value drawn, so a composite strategy drawing dozens of values per example
would take minutes. Instead each example draws one short byte string, and a builder reads
its decisions from those bytes (as libFuzzer's FuzzedDataProvider does): which kind of
input, which field to break, which junk value to put there. A zero byte, or running out of
bytes, picks the first option, always the simplest (the valid value, the first record), so
when Hypothesis shrinks the bytes toward zeros the input it reports shrinks too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgpack
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st

from lmcache_mesh.node import ChunkRecord

T = TypeVar("T")

CASES = 10_000
"""Examples per decoder: the CI requirement is at least 10,000 cases per decoder."""

FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    database=None,
)

EDGE_INTS = [0, 1, -1, 2, 15, 16, 17, 127, 128, 255, 256, 2**31, 2**32, 2**63 - 1, 2**64 - 1, -(2**63)]
"""Integers at msgpack's encoding boundaries (msgpack carries [-2**63, 2**64 - 1])."""

SCALARS: list[Any] = [
    None,
    True,
    False,
    *EDGE_INTS,
    0.0,
    -0.0,
    1.0,
    0.5,
    1e300,
    -1e-300,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "1",
    "v",
    "x" * 300,
    "\u00e9\u4e2d\U0001f600",
    "a/b",
    "\x00",
    b"",
    b"\x00",
    b"k" * 15,
    b"k" * 16,
    b"k" * 17,
    bytes(range(256)),
    msgpack.ExtType(5, b"\x00"),
    msgpack.Timestamp(1, 0),
]
"""Msgpack scalars of every type, at edges (NaN, infinities, 15/16/17-byte keys, ext types)."""

_NAMES = ["", "v", "op", "id", "key", "ns", "len", "keys", "records", "t", "src", "g", "st", "x"]


def _junk_pool(seed: int, size: int) -> list[Any]:
    rng = random.Random(seed)

    def value(depth: int) -> Any:
        r = rng.random()
        if depth < 4 and r < 0.2:
            return [value(depth + 1) for _ in range(rng.choice([0, 1, 2, 3, 7, 20]))]
        if depth < 4 and r < 0.35:
            return {rng.choice(_NAMES): value(depth + 1) for _ in range(rng.choice([0, 1, 2, 5]))}
        if r < 0.5:
            return rng.randint(-(2**63), 2**64 - 1) if rng.random() < 0.5 else rng.randint(-300, 300)
        if r < 0.6:
            return rng.uniform(-1e6, 1e6)
        if r < 0.7:
            return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0xD7FF)])) for _ in range(4))
        if r < 0.8:
            return rng.randbytes(rng.choice([0, 1, 8, 15, 16, 17, 40]))
        return rng.choice(SCALARS)

    return [value(0) for _ in range(size)]


JUNK: list[Any] = [*SCALARS, [], {}, [None] * 20, {"v": 1}, [1, "n", 0], *_junk_pool(1, 400)]
"""Any msgpack value, nested; maps are keyed by strings, so decoding gets past strict_map_key."""

MUTATIONS = ("flip", "set", "truncate", "insert", "delete", "extend")
SPECIAL_BYTES = (0x00, 0x7F, 0x80, 0xC1, 0xCC, 0xDC, 0xFF)


class Fuzz:
    """Decisions read from fuzz bytes; a zero byte or no byte left picks the first option."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            return 0
        self.at += 1
        return self.data[self.at - 1]

    def below(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 1:
            return 0
        if n <= 256:
            return self.byte() % n
        return (self.byte() << 8 | self.byte()) % n

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def often(self, odds: int = 5) -> bool:
        """True but one time in ``odds`` (and on a zero byte): a field keeps its valid value."""
        return self.below(odds) != odds - 1

    def junk(self) -> Any:
        return self.pick(JUNK)

    def raw(self, max_size: int) -> bytes:
        """Up to ``max_size`` of the remaining bytes, verbatim."""
        n = self.below(max_size + 1)
        out = self.data[self.at : self.at + n]
        self.at += len(out)
        return out

    def mutate(self, data: bytes) -> bytes:
        """``data`` after 1-3 bit flips, overwrites, cuts, insertions, deletions or extensions."""
        out = bytearray(data)
        for _ in range(1 + self.below(3)):
            action, at = self.pick(MUTATIONS), self.below(len(out) + 1)
            if action == "flip" and out:
                out[min(at, len(out) - 1)] ^= 1 << self.below(8)
            elif action == "set" and out:
                out[min(at, len(out) - 1)] = self.pick(SPECIAL_BYTES)
            elif action == "truncate":
                del out[at:]
            elif action == "insert":
                out[at:at] = self.raw(8) or b"\xc1"
            elif action == "delete":
                del out[at : at + 1 + self.below(8)]
            else:
                out += self.raw(8) or b"\x00"
        return bytes(out)


def fuzzed(build: Callable[[Fuzz], T], min_size: int = 16, max_size: int = 64) -> st.SearchStrategy[T]:
    """Inputs made by ``build`` from one drawn byte string; a failure shows the input and
    the bytes (``build(Fuzz(those bytes))`` makes it again)."""

    @st.composite
    def inputs(draw: st.DrawFn) -> T:
        data = draw(st.binary(min_size=min_size, max_size=max_size))
        note(f"fuzz bytes: {data!r}")
        return build(Fuzz(data))

    return inputs()


def pack(m: Any) -> bytes:
    packed: bytes = msgpack.packb(m, use_bin_type=True)
    return packed


def record(i: int, size: int = 64) -> ChunkRecord:
    """A small valid record with distinct key and payload per ``i``."""
    return ChunkRecord.build(
        bytes([i]) * 16, bytes((i * 7 + j) % 256 for j in range(size)), b"n" * 16, {"tokens": 16}
    )


RECORDS = [record(i, 16 * i) for i in range(1, 5)]

HEADER_FIELDS = (
    "v",
    "key",
    "ns",
    "len",
    "xxh3",
    "tokens",
    "layout",
    "dtype",
    "shape",
    "codec",
    "tenant",
    "extra",
)
HEADER_EDGES: list[Any] = [
    *SCALARS,
    2,
    0,
    [1, 2],
    [0],
    [-1],
    [True],
    [1.5],
    {"a": [1]},
    "float16",
    "raw",
    b"x" * 16,
    "t1",
    "-t",
    "t" * 65,
]


def record_header_map(fz: Fuzz, rec: ChunkRecord, broken: bool = False) -> dict[str, Any]:
    """``rec``'s header map, mostly valid; else (or if ``broken``) 1-3 fields dropped, retyped
    or added (which may leave it valid: an added field, a new dtype)."""
    m: dict[str, Any] = rec.header.to_wire()
    if not broken and fz.often():
        return m
    for _ in range(1 + fz.below(3)):
        name = fz.pick(HEADER_FIELDS)
        choice = fz.below(4)
        if choice == 0:
            m.pop(name, None)
        elif choice == 1:
            m[name] = fz.junk()
        else:
            m[name] = fz.pick(HEADER_EDGES)
    return m


def is_int(value: object) -> bool:
    """An int that is not a bool (msgpack and Python treat True as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
