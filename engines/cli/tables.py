"""Text tables with rich, for the CLI, the demo and the benchmarks.

A table has a rule under its header and no borders, so each row stays one line of
whitespace-separated cells (easy to read, grep and parse). :func:`render` lays it out as plain
text at any width a row needs (never wrapped or cut, on a terminal or into a pipe alike).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from rich import box
from rich.console import Console
from rich.table import Column, Table

__all__ = ["Column", "add_rows", "render", "table"]


def table(*columns: str | Column, **options: object) -> Table:
    """A table of ``columns``: a name is a right-aligned column (figures); pass a
    :class:`Column` for anything else, e.g. ``Column("engine")`` for left-aligned text.
    ``options`` go to :class:`rich.table.Table`."""
    cols = [Column(c, justify="right") if isinstance(c, str) else c for c in columns]
    settings: dict[str, object] = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False}
    settings.update(options)
    return Table(*cols, **settings)  # type: ignore[arg-type]


def add_rows(t: Table, rows: Iterable[Iterable[object]]) -> Table:
    """Add each row's cells to ``t`` as text (``str(cell)``); returns ``t``."""
    for row in rows:
        t.add_row(*(str(cell) for cell in row))
    return t


def render(t: Table, indent: int = 2) -> str:
    """``t`` as plain text lines (no colour, no trailing spaces), each indented by ``indent``."""
    out = io.StringIO()
    Console(file=out, width=10_000, color_system=None, highlight=False, emoji=False).print(t)
    return "\n".join(" " * indent + line.rstrip() for line in out.getvalue().splitlines())
