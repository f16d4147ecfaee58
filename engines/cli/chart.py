"""A labelled bar chart as a PNG file, drawn with matplotlib (the optional ``plot`` extra).

Bars go left to right with each bar's value above it, its label below, a title, axis titles,
a light grid and a legend. matplotlib is imported only when a chart is drawn, on its Agg
backend (no display needed); without it :func:`write_bar_chart` raises :class:`ImportError`
and :data:`MISSING` says how to install it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

Colour = tuple[int, int, int]  # 0-255 RGB

MISSING = "matplotlib is not installed; install the plot extra: pip install -e '.[plot]'"
CHAR_PX = 7  # about the width of a character of a label, at 100 dpi


def available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _rgb(colour: Colour) -> tuple[float, float, float]:
    r, g, b = colour
    return r / 255, g / 255, b / 255


def _number(value: float) -> str:
    """A bar's value: whole from 10 up, one decimal below."""
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def write_bar_chart(
    path: Path,
    values: Sequence[float],
    colours: Sequence[Colour],
    *,
    title: str = "",
    labels: Sequence[str] = (),
    x_title: str = "",
    y_title: str = "",
    legend: Sequence[tuple[str, Colour]] = (),
    width: int = 800,
    height: int = 420,
    value_labels: Sequence[str] = (),
) -> None:
    """Write ``values`` as bars (each in its colour, labelled below by ``labels``, above by
    ``value_labels`` or the rounded value) to ``path``, a ``width`` x ``height`` PNG."""
    if len(values) != len(colours) or (labels and len(labels) != len(values)):
        raise ValueError("one colour (and one label, if any) per value")
    import matplotlib

    matplotlib.use("Agg")  # no display; pyplot's global state is not used
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    xs = range(len(values))
    bars = ax.bar(xs, values, width=0.7, color=[_rgb(c) for c in colours], zorder=2)
    slot = 0.9 * width / max(len(values), 1)  # pixels per bar, about
    if value_labels and len(value_labels) != len(values):
        raise ValueError("one value label per value")
    shown = list(value_labels) or [_number(v) for v in values]
    if max(map(len, shown), default=0) * CHAR_PX <= slot:  # else values would run into each other
        ax.bar_label(bars, labels=shown, padding=2, fontsize=9)
    named = [i for i, label in enumerate(labels) if label]
    if labels and len(named) < len(labels):  # groups: one name under some bar of each, as given
        ax.set_xticks(named, [labels[i] for i in named])
    elif labels:  # every label if they fit, else every k-th (a label may be several lines)
        longest = max((len(line) for label in labels for line in label.split("\n")), default=0)
        step = math.ceil((longest * CHAR_PX + 10) / slot)
        ax.set_xticks(list(xs)[::step], list(labels)[::step])
    else:
        ax.set_xticks([])
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.margins(y=0.12)  # room above the tallest bar for its value
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", color="#e4e4e4", zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(axis="x", length=0)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    if x_title:
        ax.set_xlabel(x_title)
    if y_title:
        ax.set_ylabel(y_title)
    if legend:
        handles = [Patch(color=_rgb(colour), label=name) for name, colour in legend]
        # in a row between the title and the plot, on the right: never over a bar
        row = sum(len(name) * CHAR_PX + 40 for name, _ in legend)
        ax.legend(
            handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False,
            ncols=len(handles) if row <= 0.9 * width else math.ceil(len(handles) / 2),
        )  # fmt: skip
    fig.savefig(path, format="png", dpi=dpi)
