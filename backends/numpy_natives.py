"""Faster NumPy versions of the element-wise passes in :mod:`tinytx.functional`.

The readable array-API code in ``tinytx/functional.py`` is the definition; each function
here computes the same numbers, in the same order of operations, only faster:

- one output buffer, filled in place with ``out=`` (no temporary per step);
- rows in blocks small enough to stay in the CPU cache, so the max / subtract / exp / sum /
  divide passes of a softmax read the data from memory once, not five times;
- blocks spread over a small thread pool: NumPy releases the GIL inside its loops, so
  the element-wise work uses every core, as the matrix products (BLAS) already do.

The NumPy backend lists them in ``Backend.natives``; :func:`tinytx.functional._native`
is the one place that picks them. This is host-side code, so it imports NumPy.
Masking semantics are those of the definition: a row with nothing kept gives zeros.
A native returns ``NotImplemented`` for an input it does not cover (mixed dtypes, say);
the definition then computes it.
"""

from __future__ import annotations

import contextvars
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = [
    "NATIVES",
    "get_num_threads",
    "layer_norm",
    "linear",
    "relu",
    "scaled_dot_product_attention",
    "set_num_threads",
    "softmax",
]

# A block of about this many elements (256 KiB of float32) stays in a core's L2 cache.
_BLOCK_ELEMENTS = 1 << 16
# Below this many elements, starting threads costs more than it saves.
_PARALLEL_MIN_ELEMENTS = 1 << 18

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_num_threads: int | None = None


def _default_threads() -> int:
    env = os.environ.get("TINYTX_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def get_num_threads() -> int:
    """Threads used for the element-wise passes ($TINYTX_NUM_THREADS, else every core)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for the element-wise passes from now on (1 = no pool)."""
    global _pool, _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive int, got {n!r}")
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n


def _forget_pool() -> None:
    """After fork() the pool's threads are gone in the child: start a fresh pool there."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(get_num_threads(), thread_name_prefix="tinytx")
        return _pool


def _row_blocks(x: np.ndarray) -> list[tuple[Any, ...]]:
    """Index tuples cutting x (..., rows, n) into blocks of whole rows, each (r, n)."""
    *outer, rows, n = x.shape
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    return [
        (*index, slice(start, min(start + step, rows)))
        for index in np.ndindex(*outer)
        for start in range(0, rows, step)
    ]


def _for_each_block(work: Callable[[tuple[Any, ...]], None], x: np.ndarray) -> None:
    """Run ``work(block_index)`` over the row blocks of x, on the pool when x is large."""
    blocks = _row_blocks(x)
    if x.size < _PARALLEL_MIN_ELEMENTS or len(blocks) == 1 or get_num_threads() == 1:
        for block in blocks:
            work(block)
        return
    caller = contextvars.copy_context()  # np.errstate lives in a context variable

    def work_as_caller(block: tuple[Any, ...]) -> None:
        caller.copy().run(work, block)

    for _ in _executor().map(work_as_caller, blocks):  # re-raises a worker's exception here
        pass


def _as_rows(x: np.ndarray) -> np.ndarray:
    """A view of x with at least two axes (a 1-D array is one row)."""
    return x[None, :] if x.ndim == 1 else x


# --- the natives ---------------------------------------------------------------------


def _softmax_rows(out: np.ndarray, x: np.ndarray, mask: np.ndarray | None) -> None:
    """out = softmax(where(mask, x, -inf)) along the last axis; x may be out itself.

    out, x, mask: (..., rows, n), mask boolean or None. The steps of the definition, on
    one cache-sized block of rows at a time.
    """
    neg_inf = out.dtype.type(-np.inf)
    in_place = x is out

    def work(block: tuple[Any, ...]) -> None:
        o, logits = out[block], x[block]  # (r, n)
        if mask is not None:
            if not in_place:
                np.copyto(o, logits)
            np.copyto(o, neg_inf, where=~mask[block])  # where(mask, x, -inf)
            logits = o
        row_max = np.max(logits, axis=-1, keepdims=True)  # (r, 1)
        row_max[~np.isfinite(row_max)] = 0  # an all -inf row has max -inf
        np.subtract(logits, row_max, out=o)
        np.exp(o, out=o)  # exactly 0 where x was -inf
        total = np.sum(o, axis=-1, keepdims=True)  # (r, 1)
        total[~(total > 0)] = 1  # all-masked row: 0 / 1 = 0
        np.divide(o, total, out=o)

    if out.size:
        _for_each_block(work, out)


def _bool(mask: np.ndarray | None) -> np.ndarray | None:
    """where() reads any nonzero mask value as True; so do we."""
    return mask if mask is None or mask.dtype == np.bool_ else mask.astype(np.bool_)


def softmax(x: np.ndarray, axis: int = -1, *, mask: np.ndarray | None = None) -> np.ndarray:
    """Same as :func:`tinytx.functional.softmax`; x (and mask) any shape -> broadcast shape."""
    mask = _bool(mask)
    shape = x.shape if mask is None else np.broadcast_shapes(x.shape, mask.shape)
    out = np.empty(shape, dtype=x.dtype)

    def rows(a: np.ndarray) -> np.ndarray:  # (..., rows, n) view, the softmax axis last
        return _as_rows(np.moveaxis(a, axis, -1))

    def broadcast_rows(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else rows(np.broadcast_to(a, shape))

    _softmax_rows(rows(out), broadcast_rows(x), broadcast_rows(mask))
    return out


def scaled_dot_product_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Same as :func:`tinytx.functional.scaled_dot_product_attention` (inputs already
    checked there), with the softmax computed in place in the scores' buffer: one
    (batch, heads, seq_q, seq_k) array is made instead of two.
    """
    from tinytx.functional import causal_mask, repeat_kv

    heads, seq_q, d = q.shape[1:]
    seq_k = k.shape[2]
    k = repeat_kv(k, heads)  # (batch, heads, seq_k, d)
    v = repeat_kv(v, heads)  # (batch, heads, seq_k, d_v)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    weights = np.matmul(q * scale, np.swapaxes(k, -1, -2))  # (batch, heads, seq_q, seq_k)
    mask = _bool(mask)
    if causal:
        allowed = causal_mask(seq_q, seq_k, xp=np)  # (seq_q, seq_k)
        mask = allowed if mask is None else np.logical_and(mask, allowed)
    if mask is not None:
        mask = np.broadcast_to(mask, weights.shape)  # (batch, heads, seq_q, seq_k)
    _softmax_rows(weights, weights, mask)  # scores -> weights, in place
    return np.matmul(weights, v), weights  # (batch, heads, seq_q, d_v), weights


def layer_norm(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Same as :func:`tinytx.functional.layer_norm`; x (..., d) -> (..., d)."""
    params = [p for p in (weight, bias) if p is not None]
    if any(p.dtype != x.dtype or p.shape != x.shape[-1:] for p in params):
        return NotImplemented  # mixed dtypes or unusual shapes: the definition handles them
    out = np.empty(x.shape, dtype=x.dtype)
    x_rows, out_rows = _as_rows(x), _as_rows(out)  # (..., rows, d)

    def work(block: tuple[Any, ...]) -> None:
        o = out_rows[block]  # (r, d)
        xs = x_rows[block]  # (r, d)
        mean = np.mean(xs, axis=-1, keepdims=True)  # (r, 1)
        np.subtract(xs, mean, out=o)  # centred
        var = np.mean(o * o, axis=-1, keepdims=True)  # (r, 1)
        np.divide(o, np.sqrt(var + eps), out=o)
        if weight is not None:
            np.multiply(o, weight, out=o)
        if bias is not None:
            np.add(o, bias, out=o)

    if out.size:
        _for_each_block(work, out_rows)
    return out


def relu(x: np.ndarray) -> np.ndarray:
    """Same as :func:`tinytx.functional.relu`: max(x, 0) elementwise."""
    out = np.empty_like(x)
    x_rows, out_rows = _as_rows(x), _as_rows(out)
    zero = x.dtype.type(0)

    def work(block: tuple[Any, ...]) -> None:
        np.maximum(x_rows[block], zero, out=out_rows[block])

    if out.size:
        _for_each_block(work, out_rows)
    return out


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Same as :func:`tinytx.functional.linear` (x W^T + b), with the bias added in place.

    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,) -> (..., d_out).
    """
    if (
        x.ndim < 1
        or weight.ndim != 2
        or x.dtype != weight.dtype
        or (bias is not None and bias.dtype != x.dtype)
    ):
        return NotImplemented
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (n, d_in): one product, no loop
    y = np.matmul(rows, weight.T)  # (n, d_out)
    if bias is not None and y.size:

        def work(block: tuple[Any, ...]) -> None:
            np.add(y[block], bias, out=y[block])

        _for_each_block(work, y)
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., d_out)


NATIVES: dict[str, Callable[..., Any]] = {
    "softmax": softmax,
    "scaled_dot_product_attention": scaled_dot_product_attention,
    "layer_norm": layer_norm,
    "relu": relu,
    "linear": linear,
}
