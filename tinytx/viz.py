"""Terminal pictures of attention: a coloured heatmap with the tokens on both axes.

Host-side code: it takes NumPy arrays (use ``backend.to_numpy`` first).
Each cell shows a shade character (`` .:-=+*#%@``, light to heavy) on a coloured
background, so the picture survives when colours are stripped (pipes, logs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["heatmap", "split_words"]

_SHADES = " .:-=+*#%@"
# xterm-256 colours from dark blue through green to yellow, a viridis-like ramp.
_COLOURS = (17, 18, 19, 25, 31, 37, 36, 35, 71, 113, 149, 185, 221, 227)


def split_words(text: str) -> list[str]:
    """Split a sentence simply into words, keeping contractions and punctuation marks:
    "didn't cross the street." -> ["didn't", "cross", "the", "street", "."]."""
    import re

    return re.findall(r"\w+(?:'\w+)*|[^\w\s]", text)


def _cell(value: float, top: float, colour: bool) -> str:
    level = 0.0 if top <= 0 else min(max(value / top, 0.0), 1.0)
    shade = _SHADES[min(int(level * len(_SHADES)), len(_SHADES) - 1)]
    text = f" {shade} "
    if not colour:
        return text
    code = _COLOURS[min(int(level * len(_COLOURS)), len(_COLOURS) - 1)]
    ink = 16 if level > 0.55 else 255
    return f"\x1b[48;5;{code}m\x1b[38;5;{ink}m{text}\x1b[0m"


def heatmap(
    weights: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    colour: bool = True,
    title: str = "",
) -> str:
    """Draw a (rows, cols) matrix of attention weights as text.

    Rows are the attending tokens (queries), columns the attended ones (keys), whose
    labels are written vertically above their column. Shades are relative to the
    largest weight shown; the legend gives the scale.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"heatmap needs a ({len(row_labels)}, {len(col_labels)}) matrix, got {weights.shape}"
        )
    top = float(weights.max()) if weights.size else 0.0
    left = max((len(label) for label in row_labels), default=0) + 1
    tall = max((len(label) for label in col_labels), default=0)
    lines = [title] if title else []
    for i in range(tall):  # column labels, one character per line, bottom-aligned
        chars = []
        for label in col_labels:
            offset = i - (tall - len(label))
            chars.append(f" {label[offset] if offset >= 0 else ' '} ")
        lines.append(" " * left + "".join(chars))
    for label, row in zip(row_labels, weights, strict=True):
        cells = "".join(_cell(float(v), top, colour) for v in row)
        lines.append(label.rjust(left - 1) + " " + cells)
    lines.append(f"shades {_SHADES.strip()!r}: light to heavy, relative to the max {top:.3f}")
    return "\n".join(lines)
