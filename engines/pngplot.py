"""A labelled bar chart as a PNG file, written with zlib alone (no plotting library to install).

Bars go left to right on a white canvas with a y axis of round ticks, each bar's value above
it, its label below, a title and a legend; text is drawn with a built-in 5x7 pixel font
(upper-case letters, digits and a little punctuation — lower case is drawn as upper case).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
GRID: Colour = (228, 228, 228)
AXIS: Colour = (60, 60, 60)
TEXT: Colour = (30, 30, 30)

# 5 columns x 7 rows per glyph, one string of five 0/1 per row, top row first
_FONT_ROWS = {
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 10001 11111 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    " ": "00000 00000 00000 00000 00000 00000 00000",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000",
    ":": "00000 01100 01100 00000 01100 01100 00000",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    "/": "00000 00001 00010 00100 01000 10000 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000",
    "#": "01010 01010 11111 01010 11111 01010 01010",
    "%": "11000 11001 00010 00100 01000 10011 00011",
}
GLYPHS: dict[str, list[list[bool]]] = {
    ch: [[bit == "1" for bit in row] for row in rows.split()] for ch, rows in _FONT_ROWS.items()
}
GLYPH_W, GLYPH_H = 5, 7


class Canvas:
    """RGB pixels, row-major, with the few drawing operations a bar chart needs."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = [[WHITE] * width for _ in range(height)]

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: Colour) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(0, x0), min(self.width, x1)
        for y in range(max(0, y0), min(self.height, y1)):
            self.pixels[y][x0:x1] = [colour] * max(0, x1 - x0)

    def text(self, x: int, y: int, text: str, colour: Colour = TEXT, scale: int = 1) -> None:
        """Draw ``text`` with its top-left corner at (x, y); ValueError for a character the
        font lacks (a label would silently lose it)."""
        for i, ch in enumerate(text.upper()):
            glyph = GLYPHS.get(ch)
            if glyph is None:
                raise ValueError(f"the chart font has no {ch!r}")
            gx = x + i * (GLYPH_W + 1) * scale
            for row, bits in enumerate(glyph):
                for col, on in enumerate(bits):
                    if on:
                        px, py = gx + col * scale, y + row * scale
                        self.rect(px, py, px + scale, py + scale, colour)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in self.pixels)
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b"")
        )


def text_width(text: str, scale: int = 1) -> int:
    return max(0, len(text) * (GLYPH_W + 1) * scale - scale)


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values 0, s, 2s, ... reaching at least ``top`` (s is 1, 2, 2.5 or 5 x 10^k)."""
    if top <= 0:
        return [0.0, 1.0]
    rough = top / count
    magnitude = 10 ** math.floor(math.log10(rough))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= rough)
    n = math.ceil(top / step - 1e-9)
    return [i * step for i in range(n + 1)]


def _number(value: float) -> str:
    """A bar's value: whole from 10 up, one decimal below."""
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def tick_label(value: float) -> str:
    """A tick exactly (12.5, 0.25, 2500), without float noise or exponents."""
    return f"{round(value, 9):.12g}"


def write_bar_chart(
    path: Path,
    values: Sequence[float],
    colours: Sequence[Colour],
    *,
    title: str = "",
    labels: Sequence[str] = (),
    x_title: str = "",
    legend: Sequence[tuple[str, Colour]] = (),
    width: int = 800,
    height: int = 420,
) -> None:
    """Write ``values`` as bars (each in its colour, labelled below by ``labels``) to ``path``."""
    if len(values) != len(colours) or (labels and len(labels) != len(values)):
        raise ValueError("one colour (and one label, if any) per value")
    c = Canvas(width, height)
    c.text((width - text_width(title, 2)) // 2, 10, title, scale=2)
    ticks = nice_ticks(max(values, default=0.0))
    left = 16 + max(text_width(tick_label(t)) for t in ticks)
    right, top_y = width - 16, 34 + (16 if legend else 0)
    base = height - 24 - (14 if x_title else 0)
    span = base - top_y - 12  # room for the tallest bar's value
    # legend: a swatch and its name each, right-aligned under the title
    x = right
    for name, colour in reversed(legend):
        x -= text_width(name) + 14
        c.rect(x, top_y - 16, x + 8, top_y - 8, colour)
        c.text(x + 11, top_y - 16, name)
        x -= 14
    for t in ticks:
        y = base - round(t / ticks[-1] * span)
        c.rect(left, y, right, y + 1, GRID)
        label = tick_label(t)
        c.text(left - 6 - text_width(label), y - 3, label)
    slot = (right - left) / max(len(values), 1)
    for i, (value, colour) in enumerate(zip(values, colours, strict=True)):
        x0, x1 = left + int(i * slot + slot * 0.15), left + int((i + 1) * slot - slot * 0.15)
        y0 = base - max(1, round(value / ticks[-1] * span))
        c.rect(x0, y0, x1, base, colour)
        mid = (x0 + x1) // 2
        shown = _number(value)
        if text_width(shown) <= slot:  # many narrow bars: values would run into each other
            c.text(mid - text_width(shown) // 2, y0 - 10, shown)
        if labels and text_width(labels[i]) <= slot:
            c.text(mid - text_width(labels[i]) // 2, base + 6, labels[i])
    c.rect(left, base, right, base + 1, AXIS)
    c.rect(left, top_y, left + 1, base + 1, AXIS)
    if x_title:
        c.text((left + right - text_width(x_title)) // 2, height - 14, x_title)
    path.write_bytes(c.png())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
