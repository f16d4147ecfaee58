"""The demo's PNG chart: a valid PNG whose bars, ticks and labels are where they should be."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from lmcache_mesh.engines.pngplot import (
    GLYPH_H,
    GLYPH_W,
    GLYPHS,
    TEXT,
    Canvas,
    nice_ticks,
    tick_label,
    write_bar_chart,
)

RED, BLUE = (200, 40, 40), (40, 40, 200)


def decode(data: bytes) -> list[list[tuple[int, int, int]]]:
    """Rows of RGB pixels of a PNG as the chart writes it (8-bit RGB, filter 0), checking
    the signature and every chunk's CRC as a viewer would."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour_type) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = []
    for y in range(height):
        line = raw[y * stride : (y + 1) * stride]
        assert line[0] == 0
        rows.append([tuple(line[1 + 3 * x : 4 + 3 * x]) for x in range(width)])
    return rows  # type: ignore[return-value]


def column_height(rows: list[list[tuple[int, int, int]]], colour: tuple[int, int, int]) -> int:
    """The tallest run of ``colour`` in any column (a bar's height in pixels)."""
    return max(sum(row[x] == colour for row in rows) for x in range(len(rows[0])))


def test_bars_are_proportional_and_labelled(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    write_bar_chart(
        path,
        [1000.0, 250.0],
        [RED, BLUE],
        title="ttft (ms)",
        labels=["1", "2"],
        x_title="request",
        legend=[("cold", RED), ("hit", BLUE)],
    )
    rows = decode(path.read_bytes())
    assert (len(rows[0]), len(rows)) == (800, 420)
    red, blue = column_height(rows, RED), column_height(rows, BLUE)
    assert red > 200 and abs(blue / red - 0.25) < 0.02, (red, blue)  # legend swatches are 8 px
    text_rows = [y for y, row in enumerate(rows) if TEXT in row]
    assert text_rows and min(text_rows) < 20  # the title is drawn at the top
    assert max(text_rows) > 400  # ... and the x axis title at the bottom


def test_the_font_and_text() -> None:
    assert all(len(g) == GLYPH_H and all(len(r) == GLYPH_W for r in g) for g in GLYPHS.values())
    assert all(any(any(r) for r in g) for ch, g in GLYPHS.items() if ch != " ")
    c = Canvas(40, 10)
    c.text(1, 1, "Hi")  # lower case is drawn as upper case
    assert sum(px == TEXT for row in c.pixels for px in row) == sum(sum(r) for ch in "HI" for r in GLYPHS[ch])
    with pytest.raises(ValueError, match="no '@'"):
        c.text(0, 0, "a@b")


@pytest.mark.parametrize("top", [0.7, 9.0, 11.0, 174.0, 999.0, 1000.0, 9984.0, 123456.0, 2.4e6])
def test_ticks_are_round_and_reach_the_top(top: float) -> None:
    ticks = nice_ticks(top)
    step = ticks[1]
    assert ticks[0] == 0 and ticks[-1] >= top and ticks[-2] < top and 2 <= len(ticks) <= 7
    mantissa = step / 10 ** int(f"{step:e}".split("e")[1])
    assert round(mantissa, 6) in (1.0, 2.0, 2.5, 5.0)
    # every tick is drawn as the number it is
    assert [float(tick_label(t)) for t in ticks] == pytest.approx(ticks) and all(
        "e" not in tick_label(t) for t in ticks
    )


def test_values_and_colours_must_pair(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one colour"):
        write_bar_chart(tmp_path / "c.png", [1.0], [RED, BLUE])
    assert not (tmp_path / "c.png").exists()


def test_many_bars_still_draw(tmp_path: Path) -> None:
    path = tmp_path / "many.png"
    write_bar_chart(
        path, [float(i) for i in range(1, 121)], [RED] * 120, labels=[str(i) for i in range(1, 121)]
    )
    assert (
        column_height(decode(path.read_bytes()), RED) > 300
    )  # the tallest bar, drawn; crowded labels left out
