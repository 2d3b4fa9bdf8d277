"""A compiled product for a few rows against a layer's weight: decoding's matrix-vector step.

    y[r, o] = sum_i x[r, i] W[o, i] + b[o]     x (rows, d_in), W (d_out, d_in), rows small

Generating text multiplies one row per sequence by every weight matrix, so a decode step
is bound by reading the weights from memory (see the README's "Why decoding is
bandwidth-bound"). OpenBLAS's matrix-vector kernel reads float32 weights at about 24 GB/s
on two cores of the EPYC where this was written, while summing an array reads at 33-35
GB/s there. This kernel reads each row of W once, as one contiguous stream, and keeps
the few rows of x in cache: measured there, the weights of GPT-2 small read at 31 GB/s on
two threads (27 on one).

- numba (optional, ``pip install 'tinytx[fast]'``): one compiled loop, output rows
  shared between numba's threads (as many as tinytx's pool). ``fastmath`` lets LLVM
  reorder the sum into vector lanes (as BLAS does), so results differ from the
  definition's ``x @ W.T`` by rounding only.
- Without numba, or with ``TINYTX_NUMBA=0``, :func:`few_rows_matmul` returns None and
  the caller uses BLAS.

:func:`tinytx.functional.linear` is the definition; tests/test_natives.py checks the
linear native (which calls this) against it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from tinytx.backends import numba_kernels

__all__ = ["MAX_ROWS", "few_rows_matmul", "kernel_available"]

# The kernel keeps every row of x next to one row of W: it is for matrix-vector-like
# products. The rule: up to 8 rows, the rows' partial sums and one 16-float vector of W
# fit in the 32 vector registers of AVX-512 (16 of AVX2, NEON); beyond that BLAS's
# blocked kernels, which reuse W from cache across many rows, are the better tool.
MAX_ROWS = 8

_kernel: Any = None
_compile_lock = threading.Lock()  # one thread compiles; others wait for it


def _compile() -> Any:
    """The numba kernel, compiled on first use (cached on disk). Call only when
    :func:`tinytx.backends.numba_kernels.enabled` (numba imported)."""
    global _kernel
    with _compile_lock:
        if _kernel is None:
            numba = numba_kernels._numba

            @numba.njit(parallel=True, fastmath=True, cache=True)
            def kernel(x: Any, w: Any, bias: Any, out: Any) -> None:  # pragma: no cover
                rows, d_in = x.shape
                has_bias = bias.shape[0] > 0  # an empty bias: none
                for o in numba.prange(w.shape[0]):  # output rows shared between threads
                    for r in range(rows):
                        total = x.dtype.type(0.0)
                        for i in range(d_in):  # one contiguous row of W, vectorized
                            total += x[r, i] * w[o, i]
                        out[r, o] = total + bias[o] if has_bias else total

            _kernel = kernel
    return _kernel


def kernel_available() -> bool:
    """Whether :func:`few_rows_matmul` runs here (numba installed, TINYTX_NUMBA not 0)."""
    return numba_kernels.enabled()


_threads = threading.local()  # .count: numba's thread count last set on this thread


def _set_threads(threads: int) -> None:
    """numba's thread count for this calling thread, set only when it changes."""
    import numba

    count = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if getattr(_threads, "count", None) != count:
        numba.set_num_threads(count)
        _threads.count = count


def few_rows_matmul(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, threads: int
) -> np.ndarray | None:
    """x W^T + b with the compiled kernel, or None where it does not apply (numba missing
    or turned off, more than ``MAX_ROWS`` rows, mixed or non-float32/64 dtypes, a weight
    that is not C-contiguous).

    x: (rows, d_in); weight: (d_out, d_in); bias: (d_out,) or None -> (rows, d_out).
    ``threads``: numba's thread count for this call.
    """
    rows = x.shape[0]
    if rows == 0 or rows > MAX_ROWS or x.dtype != weight.dtype:
        return None
    if x.dtype not in (np.float32, np.float64) or not weight.flags.c_contiguous:
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.shape != weight.shape[:1]):
        return None
    if not numba_kernels.enabled():
        return None
    kernel = _compile()
    _set_threads(threads)
    out = np.empty((rows, weight.shape[0]), dtype=x.dtype)  # (rows, d_out)
    no_bias = np.empty(0, dtype=x.dtype)  # (0,): the kernel adds nothing
    kernel(np.ascontiguousarray(x), weight, no_bias if bias is None else bias, out)
    return out
