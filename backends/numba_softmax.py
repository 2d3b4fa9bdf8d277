"""A fused softmax numerator for attention tiles (numba, optional): fewer passes over a tile.

Softmax attention without stored weights (inference, blockwise) computes, for one tile of
score rows that sits in the core's cache (``_attention_tiled`` in numpy_natives.py):

    m_r = max_j (s_rj + b_rj),   e_rj = exp(s_rj + b_rj - m_r),   total_r = sum_j e_rj

and then out = (e v) / total. NumPy does that in five calls (add the mask's bias, max,
subtract, exp, sum), each a pass over the tile. Here NumPy adds the bias (when there is
a mask) and takes the row maxima (its max is vectorized, and propagates NaN), and one
compiled pass does the rest: the exponentials and their sum, with
:func:`tinytx.backends.numba_kernels._exp` (plain arithmetic, so LLVM vectorizes it;
numba's own exp is a scalar libm call). Measured on the 2-core EPYC, one thread, loaded:
a (8, 256, 256) tile 406 us instead of NumPy's 790 (torch's softmax ~310 us quiet), a
(256, 2048) tile 257 us instead of 624.

What it leaves to NumPy: a row whose maximum is +inf or NaN (an infinite or NaN score).
Then :func:`softmax_numerator` returns None before any exponential is taken, with the
bias already added in place, which :func:`~tinytx.backends.numpy_natives._softmax_block`
may add again (adding 0 or -inf twice changes nothing): the caller runs that on the tile
instead, and its limits are the definition's. A row with nothing allowed (maximum -inf)
is handled here as there: exponentials 0, total 1, so its output is 0.

float32 only, and only when :func:`tinytx.backends.numba_kernels.enabled` (numba
installed, ``TINYTX_NUMBA`` not 0). tests/test_numba_softmax.py checks it against the
definition within rounding.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from tinytx.backends import numba_kernels

__all__ = ["softmax_numerator"]

_kernel: Any = None


def _exp_and_sum_kernel(w: Any, totals: Any) -> None:
    """In place, per row r: w[r] = exp(w[r] - m_r), then totals[r] = sum of the row (0 -> 1).
    On entry totals[r] holds the row's maximum m_r, finite or -inf (nothing allowed: the
    row's exponentials are all 0). w: (rows, n) C-contiguous; totals: (rows,)."""
    n_rows, n = w.shape
    for r in range(n_rows):
        m = totals[r]
        m = np.float32(0.0) if m == np.float32(-np.inf) else m
        total = np.float32(0.0)
        for j in range(n):
            e = numba_kernels._exp(w[r, j] - m)  # exp(-inf) = 0
            w[r, j] = e
            total += e
        totals[r] = total if total != np.float32(0.0) else np.float32(1.0)


_compile_lock = threading.Lock()  # the pool's threads may all ask at once


def _compile() -> Any:
    global _kernel
    with _compile_lock:
        if _kernel is None:
            numba_kernels._kernel("gelu")  # compiles the shared helpers (numba_kernels._exp)
            numba = numba_kernels._numba
            # "reassoc" lets the row sum run in vector lanes (NumPy's sum is pairwise anyway)
            _kernel = numba.njit(
                nogil=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"}
            )(_exp_and_sum_kernel)
    return _kernel


def softmax_numerator(w: np.ndarray, biases: list[np.ndarray]) -> np.ndarray | None:
    """The tile's exp(s + b - max) in place and its row totals (..., r, 1), or None where
    the kernel does not apply (not float32, kernels off, more than one bias, a row with
    an infinite or NaN maximum: see the module docstring) and NumPy must do the tile.

    w: (..., r, n) float32 scores, C-contiguous, written in place; biases: the mask's
    0 / -inf arrays, broadcastable to w, added first (a NumPy pass each).
    """
    if w.dtype != np.float32 or not w.flags.c_contiguous or not numba_kernels.enabled():
        return None
    if any(bias.dtype != np.float32 for bias in biases):
        return None
    with np.errstate(invalid="ignore"):  # inf + -inf: a NaN row, NumPy's turn below
        for bias in biases:  # the mask's 0 / -inf: one NumPy pass each
            np.add(w, bias, out=w)
    totals = np.max(w, axis=-1)  # (..., r) the row maxima (NumPy's max: vectorized)
    if np.isnan(totals).any() or np.isposinf(totals).any():  # an inf or NaN score
        return None  # (nothing exponentiated yet)
    _compile()(w.reshape(-1, w.shape[-1]), totals.reshape(-1))  # exp(s - max), row totals
    return totals[..., None]  # (..., r, 1)
