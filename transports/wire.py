"""Reading one msgpack map off the wire, and its fields, with one set of checks.

Every message this project decodes — request and reply headers, chunk record headers,
membership datagrams — is a msgpack map. :func:`unpack_map` bounds and decodes the frame;
:class:`Fields` reads typed fields out of it. Each check names the field, what it must be
and (briefly) what it got, and raises the caller's own error type, so a malformed node
request is a BadRequest and a malformed datagram a MalformedMessage, from the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgpack

Raise = Callable[[str], Exception]
"""Makes the caller's error for a message (e.g. ``BadRequest``)."""

_REQUIRED: Any = object()


def unpack_map(
    data: bytes | bytearray | memoryview, limit: int, what: str, bad: Raise, too_large: Raise
) -> dict[str, Any]:
    """Decode a msgpack map of at most ``limit`` bytes; ``too_large`` or ``bad`` naming ``what``."""
    if len(data) > limit:
        raise too_large(f"{what} of {len(data)} bytes exceeds the limit of {limit}")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise bad(f"{what} is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(m, dict):
        raise bad(f"{what} must be a msgpack map, got {type(m).__name__}")
    return m


def is_int(value: object) -> bool:
    """An int that is not a bool (msgpack's True is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


class Fields:
    """Typed reads of one decoded map; a missing or wrong field raises ``bad(message)``.

    Omitting ``default`` makes a field required. Messages read ``{prefix} 'name' must be ...``.
    """

    __slots__ = ("_m", "_bad", "_prefix")

    def __init__(self, m: Mapping[str, Any], bad: Raise, prefix: str = "field") -> None:
        self._m = m
        self._bad = bad
        self._prefix = prefix

    def raw(self, name: str, default: Any = None) -> Any:
        return self._m.get(name, default)

    def fail(self, name: str, must: str, value: object = _REQUIRED, width: int = 40) -> Exception:
        """The error for field ``name``: what it must be and (its repr cut at ``width``) what it is."""
        got = "" if value is _REQUIRED else f", got {value!r:.{width}}"
        return self._bad(f"{self._prefix} {name!r} must be {must}{got}")

    def _value(self, name: str, default: Any) -> Any:
        """The field's value; a missing required one reads as None, which no check accepts."""
        return self._m.get(name, None if default is _REQUIRED else default)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self._value(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, "a boolean", value)
        return value

    def integer(
        self,
        name: str,
        default: Any = _REQUIRED,
        lo: int | None = None,
        hi: int | None = None,
        width: int = 40,
    ) -> int:
        value = self._value(name, default)
        if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(name, _int_bounds(lo, hi), value, width)
        return int(value)

    def string(self, name: str, max_len: int = 1024, default: Any = _REQUIRED, empty: bool = False) -> str:
        value = self._value(name, "" if default is _REQUIRED and empty else default)
        if not isinstance(value, str) or (not value and not empty) or len(value) > max_len:
            must = "a string" if empty else "a non-empty string"
            raise self.fail(name, f"{must} of at most {max_len} characters")
        return value

    def strings(self, name: str) -> list[str]:
        value = self._m.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "a list of strings")
        return value

    def blob(self, name: str, length: int) -> bytes:
        value = self._m.get(name)
        if not isinstance(value, bytes) or len(value) != length:
            raise self.fail(name, f"{length} bytes", value, width=60)
        return value

    def listing(self, name: str, default: Any = _REQUIRED, must: str = "a list") -> list[Any]:
        value = self._value(name, default)
        if not isinstance(value, list):
            raise self.fail(name, must)
        return value

    def mapping(self, name: str, default: Any = _REQUIRED) -> dict[str, Any]:
        value = self._value(name, default)
        if not isinstance(value, dict):
            raise self._bad(f"{self._prefix} {name!r} must be a map, got {type(value).__name__}")
        return value


def _int_bounds(lo: int | None, hi: int | None) -> str:
    if lo == 0 and hi is None:
        return "a non-negative int"
    if lo == 1 and hi is None:
        return "a positive int"
    if lo is not None and hi is not None:
        return f"an int in [{lo}, {hi}]"
    return "an int"
