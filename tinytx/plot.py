"""Attention maps as PNG pictures, with matplotlib (the optional extra ``tinytx[plot]``).

Host-side code: it takes NumPy arrays. The terminal version is :func:`tinytx.viz.heatmap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PlotUnavailable", "save_attention_png"]


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "drawing a PNG needs matplotlib: pip install 'tinytx[plot]'"
        ) from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def save_attention_png(
    weights: np.ndarray,
    tokens: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    head_titles: Sequence[str] | None = None,
    row_tokens: Sequence[str] | None = None,
) -> Path:
    """Draw attention weights as a labelled heatmap and write it to ``path`` (PNG).

    weights: (seq, seq) for one head, or (heads, seq, seq) for a grid of heads; rows are
    the attending tokens (queries), columns the attended ones (keys); every cell is in
    [0, 1] and shown on one colour scale from 0 to 1. For cross-attention the queries
    are other tokens than the keys: pass them as ``row_tokens`` (weights then
    (len(row_tokens), len(tokens)) per head). Returns the path written.
    """
    plt = _pyplot()
    weights = np.asarray(weights, dtype=np.float64)
    grid = weights[None] if weights.ndim == 2 else weights  # (heads, rows, seq)
    seq = len(tokens)
    row_tokens = tokens if row_tokens is None else row_tokens
    n_rows = len(row_tokens)
    if grid.ndim != 3 or grid.shape[1:] != (n_rows, seq):
        raise ValueError(
            f"expected ({n_rows}, {seq}) or (heads, {n_rows}, {seq}) weights, got {weights.shape}"
        )
    n = grid.shape[0]
    cols = 1 if n == 1 else min(4, n)
    rows = -(-n // cols)
    width = max(3.0, 0.32 * seq + 1.5)  # inches per map: room for the token labels
    height = max(3.0, 0.32 * n_rows + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.2, height * rows + 0.6),
                             squeeze=False, layout="constrained")  # fmt: skip
    image = None
    for h, ax in enumerate(axes.ravel()):
        if h >= n:
            ax.axis("off")
            continue
        image = ax.imshow(grid[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(seq), labels=tokens, rotation=90, fontsize=8)
        ax.set_yticks(range(n_rows), labels=row_tokens, fontsize=8)
        if head_titles is not None:
            ax.set_title(head_titles[h], fontsize=10)
    if title:
        fig.suptitle(title)
    fig.supxlabel("attended token (key)", fontsize=9)
    fig.supylabel("attending token (query)", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
