"""Tables whose words exist in both languages, for notebook outputs.

``table(columns, rows)`` displays an HTML table whose headers (and any cell given as a
``(中文, English)`` pair) carry both languages marked with ``lang``: the book's language switch
then shows one of them, JupyterLab shows both. The plain-text form (what nbval also compares)
writes each pair as ``中文 · English``. Figures need no helper: keep words out of the plot (units
and names only) and give the cell a caption and alt text in its metadata, as CONTRIBUTING.md shows.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

Pair = tuple[str, str]
Cell = str | Pair


def _html(cell: Cell) -> str:
    if isinstance(cell, tuple):
        zh, en = cell
        return (
            f'<span lang="zh">{escape(zh)}</span>'
            '<span class="lang-sep" aria-hidden="true"> · </span>'
            f'<span lang="en">{escape(en)}</span>'
        )
    return escape(cell)


def _width(text: str) -> int:
    """Columns a terminal gives the text: Chinese characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _text(cell: Cell) -> str:
    return " · ".join(cell) if isinstance(cell, tuple) else cell


@dataclass
class Table:
    """A table shown as HTML in the book and JupyterLab, and as aligned text elsewhere."""

    columns: Sequence[Cell]
    rows: Sequence[Sequence[Cell]]
    align: str = ""  # one letter per column: "l" or "r" (default: left)

    def _side(self, i: int) -> str:
        return "right" if self.align[i : i + 1] == "r" else "left"

    def _repr_html_(self) -> str:
        head = "".join(
            f'<th style="text-align: {self._side(i)}">{_html(c)}</th>'
            for i, c in enumerate(self.columns)
        )
        body = "".join(
            "<tr>"
            + "".join(
                f'<td style="text-align: {self._side(i)}">{_html(c)}</td>'
                for i, c in enumerate(row)
            )
            + "</tr>"
            for row in self.rows
        )
        return (
            f'<table class="bilingual-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
        )

    def __repr__(self) -> str:
        grid = [[_text(c) for c in self.columns]] + [[_text(c) for c in row] for row in self.rows]
        widths = [max(_width(r[i]) for r in grid) for i in range(len(self.columns))]
        lines = []
        for k, row in enumerate(grid):
            pads = [" " * (w - _width(c)) for c, w in zip(row, widths)]
            cells = [
                p + c if self._side(i) == "right" else c + p
                for i, (c, p) in enumerate(zip(row, pads))
            ]
            lines.append("  ".join(cells).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def table(columns: Sequence[Cell], rows: Sequence[Sequence[Cell]], align: str = "") -> Table:
    """A table to show as a cell's last expression; ``columns`` are often ``(中文, English)``."""
    return Table(list(columns), [list(r) for r in rows], align)


@dataclass
class Lines:
    """Printed sentences in both languages: the book shows one language, text shows both."""

    pairs: Sequence[Pair]

    def _repr_html_(self) -> str:
        zh = "<br>".join(escape(z) for z, _ in self.pairs)
        en = "<br>".join(escape(e) for _, e in self.pairs)
        return f'<div class="bilingual-lines"><p lang="zh">{zh}</p><p lang="en">{en}</p></div>'

    def __repr__(self) -> str:
        return "\n".join(f"{zh}\n  {en}" for zh, en in self.pairs)


def lines(pairs: Sequence[Pair]) -> Lines:
    """Sentences given as ``(中文, English)`` pairs, to show as a cell's last expression."""
    return Lines([(zh, en) for zh, en in pairs])
