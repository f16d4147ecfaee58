"""A bar chart as a PNG file, written with zlib alone (no plotting library to install).

Bars are drawn left to right, scaled to the tallest, on a white canvas with a baseline and a
light grid line per quarter of the tallest bar; the caller prints the legend.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
GRID: Colour = (225, 225, 225)
AXIS: Colour = (60, 60, 60)


def write_bar_chart(
    path: Path, values: Sequence[float], colours: Sequence[Colour], width: int = 640, height: int = 320
) -> None:
    """Write ``values`` as bars (each in its colour) to ``path`` (PNG, RGB)."""
    if len(values) != len(colours):
        raise ValueError("one colour per value")
    margin = 20
    pixels = [[WHITE] * width for _ in range(height)]
    top = max(max(values, default=0.0), 1e-9)
    base = height - margin
    span = base - margin
    for q in (0.25, 0.5, 0.75, 1.0):
        y = base - int(q * span)
        pixels[y][margin : width - margin] = [GRID] * (width - 2 * margin)
    n = max(len(values), 1)
    slot = (width - 2 * margin) / n
    for i, (value, colour) in enumerate(zip(values, colours, strict=True)):
        x0 = margin + int(i * slot + slot * 0.15)
        x1 = margin + int((i + 1) * slot - slot * 0.15)
        y0 = base - max(1, int(value / top * span))
        for y in range(y0, base):
            pixels[y][x0:x1] = [colour] * (x1 - x0)
    pixels[base][margin : width - margin] = [AXIS] * (width - 2 * margin)
    for y in range(margin, base + 1):
        pixels[y][margin] = AXIS
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)
    path.write_bytes(_png(width, height, raw))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, raw: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )
