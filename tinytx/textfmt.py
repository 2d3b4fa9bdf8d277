"""Plain-text output that fits the terminal: its width, or 100 columns when unknown.

Host-side helpers shared by the trace table, the conformance kit's table and the CLI.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from collections.abc import Sequence

__all__ = ["DEFAULT_WIDTH", "fit_table", "natural_width", "output_width", "wrap"]

DEFAULT_WIDTH = 100
MIN_WIDTH = 40


def output_width(default: int = DEFAULT_WIDTH) -> int:
    """Columns to print in: $COLUMNS, else the terminal's width, else ``default``
    (a pipe, a file, a test); never fewer than 40."""
    return max(MIN_WIDTH, shutil.get_terminal_size((default, 24)).columns)


def wrap(text: str, width: int, indent: str = "") -> str:
    """``text`` wrapped at spaces to ``width`` columns, continuation lines starting with
    ``indent``. Words longer than a line (paths) stay whole, on a line of their own."""
    lines = textwrap.wrap(
        text, width=width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )
    return "\n".join(lines)


def _pieces(cell: str) -> list[str]:
    """A cell cut where it may wrap: after the commas between shapes "(1, 2), (3, 4)"
    (never inside a shape), else at spaces."""
    if "(" in cell:
        parts = re.split(r"(?<=\)), ", cell)
        return [p + "," for p in parts[:-1]] + [parts[-1]]
    return cell.split(" ")


def _indent(cell: str) -> str:
    """The leading spaces of a cell (a tree's depth): kept on every line it wraps onto."""
    return cell[: len(cell) - len(cell.lstrip(" "))]


def _floor(cell: str) -> int:
    """The narrowest a cell can wrap to: its indent and its longest unbreakable piece."""
    return len(_indent(cell)) + max(len(p) for p in _pieces(cell.lstrip(" ")))


def natural_width(rows: Sequence[Sequence[str]]) -> int:
    """The width of a table of ``rows`` with no wrapping (two spaces between columns)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return sum(widths) + 2 * (len(widths) - 1)


def _wrap_cell(cell: str, width: int) -> list[str]:
    """One cell as lines of at most ``width`` (an unbreakable piece may be longer)."""
    indent = _indent(cell)
    lines: list[str] = []
    for piece in _pieces(cell.lstrip(" ")):
        if lines and len(indent) + len(lines[-1]) + 1 + len(piece) <= width:
            lines[-1] += " " + piece
        else:
            lines.append(piece)
    return [indent + line for line in lines] or [""]


def fit_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int,
    wrap_columns: Sequence[int] = (),
) -> str:
    """An aligned text table (two spaces between columns, a dashed rule under the header)
    at most ``width`` columns wide where possible: the columns in ``wrap_columns``
    shrink, widest first, and their cells wrap onto more lines (shapes after their commas,
    text at spaces), down to their longest unbreakable piece."""
    table = [list(header), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    floor = {i: max(_floor(line[i]) for line in table) for i in wrap_columns}
    while sum(widths) + 2 * (len(widths) - 1) > width:
        shrinkable = [i for i in wrap_columns if widths[i] > floor[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
    out = []
    for n, cells in enumerate(table):
        wrapped = [_wrap_cell(c, widths[i]) if i in floor else [c] for i, c in enumerate(cells)]
        for k in range(max(len(w) for w in wrapped)):
            parts = [(w[k] if k < len(w) else "").ljust(widths[i]) for i, w in enumerate(wrapped)]
            out.append("  ".join(parts).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
