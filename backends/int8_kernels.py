"""Fused dequantize-and-multiply for weight-only int8 (see :mod:`tinytx.quantize`).

    y[r, o] = s[o] * sum_i x[r, i] Q[o, i] + b[o]      x (rows, d_in) float32,
                                                        Q (d_out, d_in) int8

Decoding multiplies a few rows (one per sequence) by every weight matrix: the time is
the time to read Q. Both kernels read Q one tile of output rows at a time and turn each
int8 tile into floats only where it is used, so the bytes crossing the memory bus are
the int8 ones.

- numba (optional, ``pip install 'tinytx[int8]'``): one compiled loop, output rows
  spread over numba's threads (as many as tinytx's pool), the int8 -> float32 conversion
  and the multiply-add vectorized together by LLVM. ``fastmath`` lets it reorder the
  sum (as BLAS does), so results differ from the definition by rounding only.
- NumPy: the same tiles with NumPy calls (convert a tile of Q to float32, multiply);
  correct, but each tile is written and read again as float32, so it reads more than
  the float32 product it replaces. It is there so the feature works without numba.

:func:`tinytx.quantize.int8_linear` is the definition; tests check both against it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["int8_matmul", "kernel_name"]

_TILE_BYTES = 1 << 18  # NumPy kernel: a tile of Q as float32 stays within a core's L2
_numba_kernel: Any = None
_numba_missing: str | None = None


def _compile() -> Any:
    """The numba kernel, compiled on first use; None when numba is not installed."""
    global _numba_kernel, _numba_missing
    if _numba_kernel is not None or _numba_missing is not None:
        return _numba_kernel
    try:
        import numba
    except ImportError as err:
        _numba_missing = str(err)
        return None

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def kernel(x: Any, q: Any, scale: Any, out: Any) -> None:  # pragma: no cover (compiled)
        rows, d_in = x.shape
        d_out = q.shape[0]
        for o in numba.prange(d_out):  # output rows shared between threads
            for r in range(rows):
                total = np.float32(0.0)
                for i in range(d_in):  # int8 -> float32 and multiply-add, vectorized
                    total += x[r, i] * np.float32(q[o, i])
                out[r, o] = total * scale[o]

    _numba_kernel = kernel
    return kernel


def kernel_name() -> str:
    """Which kernel :func:`int8_matmul` uses here: 'numba' or 'numpy (numba not installed)'."""
    return "numba" if _compile() is not None else "numpy (numba not installed)"


def int8_matmul(
    x: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, threads: int
) -> np.ndarray:
    """y = s * (x Q^T) + b.  x: (rows, d_in) float32; Q: (d_out, d_in) int8; s, b: (d_out,)
    -> (rows, d_out) float32. ``threads``: numba's thread count for this call."""
    kernel = _compile()
    out = np.empty((x.shape[0], q.shape[0]), dtype=np.float32)  # (rows, d_out)
    if kernel is not None:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        kernel(np.ascontiguousarray(x, dtype=np.float32), q, scale.astype(np.float32), out)
    else:
        tile = max(1, _TILE_BYTES // (4 * q.shape[1]))  # output rows per tile
        for start in range(0, q.shape[0], tile):
            stop = min(start + tile, q.shape[0])
            w = q[start:stop].astype(np.float32)  # (tile, d_in), in cache
            np.matmul(x, w.T, out=out[:, start:stop])  # (rows, tile)
        out *= scale
    if bias is not None:
        out += bias
    return out
