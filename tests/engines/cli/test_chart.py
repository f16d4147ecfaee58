"""The demo's bar chart: a PNG of the asked size whose bars are where and as tall as they should be."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lmcache_mesh.engines.cli import demo
from lmcache_mesh.engines.cli.chart import MISSING, write_bar_chart

from ...helpers import require

RED, BLUE = (200, 40, 40), (40, 40, 200)


def read_png(path: Path) -> np.ndarray:
    """The PNG's pixels as 0-255 RGB, decoded by matplotlib's own reader."""
    image: np.ndarray = require("matplotlib.image").imread(path)
    assert image.dtype == np.float32 and image.shape[2] in (3, 4)
    rgb: np.ndarray = np.rint(image[:, :, :3] * 255).astype(np.int16)
    return rgb


def mask(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(pixels == colour, axis=2)  # type: ignore[no-any-return]


def longest_runs(column_mask: np.ndarray) -> np.ndarray:
    """Per column, the longest unbroken vertical run of True."""
    best = np.zeros(column_mask.shape[1], dtype=int)
    run = np.zeros_like(best)
    for row in column_mask:
        run = np.where(row, run + 1, 0)
        best = np.maximum(best, run)
    return best


def bar_heights(pixels: np.ndarray, colour: tuple[int, int, int]) -> list[int]:
    """Heights in pixels of the bars filled with ``colour``, left to right: runs of adjacent
    columns with a long unbroken vertical run of it (a legend swatch's is short)."""
    bars, current = [], 0
    for h in [*longest_runs(mask(pixels, colour)), 0]:
        if h > 20:
            current = max(current, int(h))
        elif current:
            bars.append(current)
            current = 0
    return bars


def test_bars_are_proportional_titled_and_have_a_legend(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    write_bar_chart(
        path,
        [1000.0, 250.0, 500.0],
        [RED, BLUE, RED],
        title="ttft (ms)",
        labels=["1", "2", "3"],
        x_title="request",
        y_title="ms",
        legend=[("cold", RED), ("hit", BLUE)],
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = read_png(path)
    assert pixels.shape[:2] == (420, 800)
    (red_a, red_b), (blue,) = bar_heights(pixels, RED), bar_heights(pixels, BLUE)
    assert red_a > 200 and abs(blue / red_a - 0.25) < 0.02 and abs(red_b / red_a - 0.5) < 0.02
    # the legend's swatches: a little of each colour in the top band, above the bars
    top = pixels[:60]
    assert mask(top, RED).sum() > 20 and mask(top, BLUE).sum() > 20
    dark = np.all(pixels < 80, axis=2)  # text and axes
    rows = np.flatnonzero(dark.any(axis=1))
    assert rows.min() < 30 and rows.max() > 390  # a title at the top, the x axis title at the bottom


def test_a_chart_without_values_or_labels(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    write_bar_chart(path, [], [], width=400, height=300)
    assert read_png(path).shape[:2] == (300, 400)


def test_values_and_colours_must_pair(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one colour"):
        write_bar_chart(tmp_path / "c.png", [1.0], [RED, BLUE])
    with pytest.raises(ValueError, match="one label"):
        write_bar_chart(tmp_path / "c.png", [1.0], [RED], labels=["1", "2"])
    assert not (tmp_path / "c.png").exists()


def test_many_bars_still_draw(tmp_path: Path) -> None:
    path = tmp_path / "many.png"
    n = 120
    write_bar_chart(
        path, [float(i) for i in range(1, n + 1)], [RED] * n, labels=[str(i) for i in range(1, n + 1)]
    )
    heights = bar_heights(read_png(path), RED)
    assert len(heights) > n // 2 and max(heights) > 250  # crowded values and labels left out


def rows() -> list[demo.Row]:
    return [
        demo.Row(1, 1, "engine A @ demo-1", 2183, 0, 10233.0, "cold"),
        demo.Row(2, 1, "engine B @ demo-3", 2178, 2048, 818.0, "peer node"),
        demo.Row(3, 1, "engine A @ demo-1", 2186, 2048, 838.0, "local node"),
    ]


def test_the_demo_draws_its_rows_in_their_source_colours(tmp_path: Path) -> None:
    path = tmp_path / "demo.png"
    assert demo.plot(rows(), path) == f"plot: {path}"
    pixels = read_png(path)
    assert pixels.shape[:2] == (420, 800)
    cold, peer, local = (bar_heights(pixels, demo.COLOURS[s]) for s in ("cold", "peer node", "local node"))
    assert len(cold) == len(peer) == len(local) == 1 and abs(peer[0] / cold[0] - 818 / 10233) < 0.01


def test_the_demo_says_how_to_get_its_chart_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    path = tmp_path / "demo.png"
    assert demo.plot(rows(), path) == f"plot not written: {MISSING}"
    assert "pip install -e '.[plot]'" in MISSING and not path.exists()
