"""What ``tinytx embed``, ``similarity`` and ``attention-map`` compute and print, with a
BERT-family encoder (all-MiniLM-L6-v2 by default). Host-side code: NumPy for the tables.

Every function takes plain values and returns text (or arrays), so the commands only parse
options and print, and learners and tests can call the same code.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinytx.backends import Backend

__all__ = [
    "AttentionMap",
    "OptionError",
    "attention_map",
    "embed_texts",
    "embeddings_json",
    "embeddings_table",
    "load_encoder",
    "row_index",
    "shorten",
    "similarity_json",
    "similarity_table",
]


class OptionError(ValueError):
    """A value out of range for this model or text; ``option`` names it (``layer``, ``head``,
    ``row``) so a command line can say which flag was wrong."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def load_encoder(
    folder: str | None = None, *, backend: str | Backend | None = None, attention: str = "softmax"
) -> Any:
    """A BERT-family folder with a tokenizer (default: the installed all-MiniLM-L6-v2) as a
    :class:`~tinytx.models.bert.BertModel`; CheckpointError when it is anything else."""
    from tinytx.models.bert import BertModel
    from tinytx.pretrained import CheckpointError, default_encoder_folder, load_pretrained

    folder = default_encoder_folder() if folder is None else folder
    model = load_pretrained(folder, backend=backend, attention=attention)
    if not isinstance(model, BertModel):
        raise CheckpointError(f"{folder} is not a BERT-family encoder; this command needs one")
    if model.tokenizer is None:
        raise CheckpointError(f"{folder} has no tokenizer.json; this command needs one")
    return model


def embed_texts(
    model: Any,
    texts: Sequence[str],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(vectors (n, d) unit length, host; the truncation warnings as one line each).

    On Linux with glibc, first lets malloc keep up to 256 MiB of freed memory, so that
    each batch reuses the pages the one before freed instead of faulting in new ones (see
    :mod:`tinytx.backends.host_memory`; process-wide, as ``tinytx train`` does). Measured
    2026-12-04 on a 2-vCPU EPYC, ``model.embed`` of the benchmark's 256 sentences, 4 runs
    each: without it 34,000 page faults, 0.23-0.57 s of system time and 2.64-3.10 s a
    run; with it under 400 faults, 0.04-0.07 s and 2.23-2.46 s.
    """
    from tinytx.backends.host_memory import keep_freed_memory
    from tinytx.tokenizer import TruncationWarning

    keep_freed_memory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        vectors = model.embed(list(texts), batch_size=batch_size, progress=progress)
    return np.asarray(vectors), [str(w.message) for w in caught]


def embeddings_table(texts: Sequence[str], vectors: np.ndarray, dims: int = 6) -> str:
    """Each text with the first ``dims`` numbers of its vector."""
    dims = min(dims, vectors.shape[1])
    width = min(36, max(len(shorten(t, 36)) for t in texts))
    head = "  ".join(f"{f'd{j}':>7}" for j in range(dims))
    lines = [f"{'#':>3}  {'text':<{width}}  {head}  ...  (of {vectors.shape[1]}; --json for all)"]
    for i, (t, v) in enumerate(zip(texts, vectors, strict=True), start=1):
        cells = "  ".join(f"{x:>7.4f}" for x in v[:dims])
        lines.append(f"{i:>3}  {shorten(t, width):<{width}}  {cells}")
    return "\n".join(lines)


def embeddings_json(texts: Sequence[str], vectors: np.ndarray, model: str, backend: str) -> str:
    """Every vector, with its text, as one JSON object."""
    payload = {
        "model": model,
        "backend": backend,
        "dim": int(vectors.shape[1]),
        "embeddings": [
            {"text": t, "vector": [float(x) for x in v]}
            for t, v in zip(texts, vectors, strict=True)
        ],
    }
    return json.dumps(payload, ensure_ascii=False)


def similarity_table(texts: Sequence[str], vectors: np.ndarray) -> str:
    """The numbered texts, then the matrix of cosine similarities (unit vectors: v_i . v_j)."""
    matrix = vectors @ vectors.T  # (n, n)
    lines = [f"[{i}] {shorten(t, 72)}" for i, t in enumerate(texts, start=1)]
    lines.append("")
    label = len(f"[{len(texts)}]")
    cell = max(6, label)
    lines.append(" " * label + "".join(f"{f'[{j}]':>{cell + 1}}" for j in range(1, len(texts) + 1)))
    for i, row in enumerate(matrix, start=1):
        lines.append(f"{f'[{i}]':>{label}}" + "".join(f"{x:>{cell + 1}.3f}" for x in row))
    return "\n".join(lines)


def similarity_json(texts: Sequence[str], vectors: np.ndarray) -> str:
    """The texts and their similarity matrix (6 decimals) as one JSON object."""
    rows = [[round(float(x), 6) for x in row] for row in vectors @ vectors.T]
    return json.dumps({"texts": list(texts), "similarity": rows}, ensure_ascii=False)


def row_index(tokens: Sequence[str], row: str) -> int:
    """A row of the map chosen by a token (its first occurrence) or a position."""
    if row.isdigit() and int(row) < len(tokens):
        return int(row)
    for candidate in (row, row.lower()):
        if candidate in tokens:
            return list(tokens).index(candidate)
    raise OptionError(
        f"{row!r} is neither a token of the text nor a position 0..{len(tokens) - 1}; "
        f"tokens: {' '.join(tokens)}",
        "row",
    )


@dataclass
class AttentionMap:
    """What :func:`attention_map` drew: the text to print, the truncation warnings, and
    the PNG written (or None)."""

    text: str
    warnings: list[str] = field(default_factory=list)
    png: str | None = None


def attention_map(
    model: Any,
    text: str,
    *,
    layer: int = 0,
    head: int = 0,
    all_heads: bool = False,
    row: str | None = None,
    colour: bool = False,
    output: str | None = None,
) -> AttentionMap:
    """The attention of one head (or every head) of ``layer`` over ``text`` as terminal
    heatmaps, with one row's weights listed largest first when ``row`` names a token; with
    ``output``, also a labelled PNG (matplotlib). OptionError for a layer, head or row out
    of range; PlotUnavailable without matplotlib; OSError when the PNG cannot be written.
    """
    from tinytx.tokenizer import TruncationWarning
    from tinytx.viz import heatmap

    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if not 0 <= layer < n_layers:
        raise OptionError(
            f"{layer} is out of range: the model has layers 0..{n_layers - 1}", "layer"
        )
    if not 0 <= head < n_heads:
        raise OptionError(f"{head} is out of range: the model has heads 0..{n_heads - 1}", "head")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        seen = model.inspect(text)
    tokens = seen.tokens
    chosen_row = None if row is None else row_index(tokens, row)
    heads = list(range(n_heads)) if all_heads else [head]
    parts = []
    for h in heads:
        title = f"layer {layer}, head {h}: row = attending token, column = attended token"
        weights = seen.attentions[layer, h]  # (seq, seq)
        parts.append(heatmap(weights, tokens, tokens, colour=colour, title=title))
        if chosen_row is not None:
            ranked = sorted(zip(tokens, weights[chosen_row], strict=True), key=lambda p: -p[1])
            listing = ", ".join(f"{tok} {w:.3f}" for tok, w in ranked)
            parts.append(f"row of {tokens[chosen_row]!r} (position {chosen_row}): {listing}")
        parts.append("")
    result = AttentionMap("\n".join(parts), [str(w.message) for w in caught])
    if output:
        from tinytx.plot import save_attention_png

        grid = seen.attentions[layer] if all_heads else seen.attentions[layer, head]
        titles = [f"head {h}" for h in heads] if all_heads else None
        name = f"layer {layer}" + ("" if all_heads else f", head {head}")
        result.png = str(
            save_attention_png(
                grid, tokens, output, title=f"{name}: {shorten(text, 60)}", head_titles=titles
            )
        )
    return result
