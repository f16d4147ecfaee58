"""Quantities as people write and read them: byte sizes (``512MiB``, ``4GiB``, ``1.5G``, ``0``)
and counts of things (``1 chunk``, ``3 chunks``)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in ``text``; raises ValueError naming the value and the accepted units."""
    if isinstance(text, bool):
        raise ValueError(f"size must be a number of bytes or a string like '4GiB', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional unit "
            "(B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB), e.g. '512MiB' or '4GiB'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``1 chunk``, ``3 chunks``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_size(n: int) -> str:
    """``n`` bytes as a short binary-unit string (``1.5 GiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
