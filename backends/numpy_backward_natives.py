"""Faster NumPy versions of the element-wise backward passes in :mod:`tinytx.functional`.

The companion of :mod:`tinytx.backends.numpy_natives` (the forwards), with the same rules:
the readable array-API backward in ``tinytx/functional.py`` is the definition, and each
function here computes the same numbers, only with one output buffer filled in place
(``out=``, no temporary array per step) on row blocks that stay in the CPU cache, spread
over tinytx's thread pool. tests/test_backward_natives.py checks each against its
definition. The functional backward has already checked the cotangent's shape and dtype
when a native is called.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tinytx.backends import numpy_natives
from tinytx.backends.numpy_natives import (
    _as_rows,
    _blockwise,
    _can_pin_blas,
    _for_each_block,
    _map_with_blas_on_pool,
    get_num_threads,
)

__all__ = [
    "BACKWARD_NATIVES",
    "gelu_backward",
    "layer_norm_backward",
    "linear_backward",
    "relu_backward",
    "softmax_backward",
]


def softmax_backward(grad_y: np.ndarray, y: np.ndarray, axis: int = -1) -> Any:
    """Same as :func:`tinytx.functional.softmax_backward` (dx = y (dy - sum(dy y)) along
    the last axis), within rounding: the fused numba kernel, two passes over each row in
    cache instead of the definition's four over the whole array (a product, a sum, a
    difference, a product), on row blocks spread over the pool. The row sums run in
    vector lanes, so they are rounded in another order than NumPy's.
    grad_y, y: float32 (..., n), the same shape -> grad_x, that shape. Another axis,
    dtype or shape, or numba off: the definition (NotImplemented).
    """
    from tinytx.backends import numba_kernels

    if axis not in (-1, y.ndim - 1) or y.ndim == 0 or grad_y.shape != y.shape:
        return NotImplemented
    if not numba_kernels.covers(y, grad_y) or y.size == 0:
        return NotImplemented
    return _blockwise(numba_kernels.softmax_backward, grad_y, y)


def relu_backward(grad_y: np.ndarray, x: np.ndarray) -> Any:
    """Same as :func:`tinytx.functional.relu_backward` (dx = dy [x > 0]), bit for bit: with
    numba, one compiled pass per row block on the pool, a vector select with no
    arithmetic. Measured on the 2-core EPYC, (8, 256, 2048) float32 with random signs: the
    definition's where 20-24 ms (a branch per element, half of them mispredicted).
    grad_y, x: any shape (the same), one float32 or float64 dtype -> grad_x, that shape.
    Without numba, or for other inputs, the definition (NotImplemented).
    """
    from tinytx.backends import numba_kernels

    if grad_y.dtype != x.dtype or x.dtype not in (np.float32, np.float64):
        return NotImplemented
    if grad_y.shape != x.shape or not numba_kernels.enabled():
        return NotImplemented
    return _blockwise(numba_kernels.relu_backward, grad_y, x)


def gelu_backward(grad_y: np.ndarray, x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """Same as :func:`tinytx.functional.gelu_backward` (exact form), bit for bit.

    dx = dy * (Phi(x) + x phi(x)), with the definition's erfc fit for Phi and its
    operations in its order, on cache-sized blocks with scratch buffers: about 30 passes
    over one block in cache instead of about 30 over arrays in memory. float32 with
    numba: the fused kernel of :mod:`tinytx.backends.numba_kernels` (within rounding).
    grad_y, x: any shape (the same) -> grad_x, that shape. The tanh form, and inputs that
    are not one floating dtype, are left to the definition (NotImplemented).
    """
    from tinytx.backends import numba_kernels
    from tinytx.functional import _ERFC_COEFFS

    if approximate != "none" or x.dtype.kind != "f" or grad_y.dtype != x.dtype:
        return NotImplemented
    if numba_kernels.covers(x):  # float32 with numba: one compiled pass per block
        return _blockwise(numba_kernels.gelu_backward, grad_y, x)
    out = np.empty(x.shape, dtype=x.dtype)
    x_rows, dy_rows, out_rows = _as_rows(x), _as_rows(grad_y), _as_rows(out)
    root_half = 1.0 / math.sqrt(2.0)
    inv_root_two_pi = 1.0 / math.sqrt(2.0 * math.pi)

    def work(block: tuple[Any, ...]) -> None:
        xs, dy, o = x_rows[block], dy_rows[block], out_rows[block]  # (..., r, n)
        z = np.abs(xs)
        np.multiply(z, root_half, out=z)  # z = |x| / sqrt(2) >= 0
        t = np.multiply(z, 0.5)
        np.add(t, 1.0, out=t)
        np.divide(1.0, t, out=t)  # t = 1 / (1 + z/2)
        poly = np.full_like(z, _ERFC_COEFFS[-1])
        for c in reversed(_ERFC_COEFFS[:-1]):  # Horner: poly = c + t * poly
            np.multiply(t, poly, out=poly)
            np.add(poly, c, out=poly)
        np.multiply(z, z, out=z)  # z^2
        np.subtract(poly, z, out=poly)  # -z^2 + P(t)
        np.exp(poly, out=poly)
        np.multiply(t, poly, out=t)  # erfc(|x| / sqrt 2) = 2 Phi(-|x|)
        np.multiply(t, 0.5, out=t)  # tail = Phi(-|x|)
        # Phi(x) = 1 - tail where x >= 0, else tail: chosen without a branch (a masked
        # ufunc or np.where is some 50x slower than a product here). With s = [x >= 0]
        # in {0, 1}: Phi = (1 - tail) s + tail (1 - s), exact, since products by 0 or 1
        # and adding 0 round nothing.
        s = np.greater_equal(xs, 0.0, out=np.empty_like(t))  # s = [x >= 0], 0.0 or 1.0
        upper = np.subtract(1.0, t)  # 1 - tail
        np.multiply(upper, s, out=upper)
        np.subtract(1.0, s, out=s)
        np.multiply(t, s, out=t)
        np.add(t, upper, out=t)  # cdf = Phi(x)
        density = np.multiply(xs, -0.5, out=z)
        np.multiply(density, xs, out=density)  # -x^2 / 2
        np.exp(density, out=density)
        np.multiply(density, inv_root_two_pi, out=density)  # phi(x)
        np.multiply(xs, density, out=density)  # x phi(x)
        np.add(t, density, out=t)  # GELU'(x) = Phi(x) + x phi(x)
        np.multiply(dy, t, out=o)

    if out.size:
        _for_each_block(work, out_rows)
    return out


def layer_norm_backward(
    grad_y: np.ndarray, x: np.ndarray, weight: np.ndarray | None = None, eps: float = 1e-5
) -> Any:
    """Same as :func:`tinytx.functional.layer_norm_backward`, within rounding: the fused
    numba kernel (:mod:`tinytx.backends.numba_kernels`) on row blocks spread over the
    pool, each block adding its rows' dy xhat and dy to its own float64 sums, added up at
    the end. Everything else (no numba, float64, mixed dtypes, a row whose variance
    overflows float32 or is 0 with eps 0, a NaN or inf) is left to the definition.

    grad_y, x: (..., d); weight: (d,) or None -> (grad_x (..., d), grad_weight (d,) or
    None, grad_bias (d,)).
    """
    from tinytx.backends import numba_kernels

    d = x.shape[-1]
    if weight is not None and (weight.dtype != x.dtype or weight.shape != (d,)):
        return NotImplemented
    if not numba_kernels.covers(x, grad_y) or x.size == 0:
        return NotImplemented
    w = np.ones((d,), dtype=x.dtype) if weight is None else weight  # (d,)
    grad_x = np.empty(x.shape, dtype=x.dtype)  # C order: blocks are contiguous
    x_rows, dy_rows, dx_rows = _as_rows(x), _as_rows(grad_y), _as_rows(grad_x)
    sums = []  # per block: (where it starts, sum of dy xhat, sum of dy)
    overflowed = []

    def work(block: tuple[Any, ...]) -> None:
        grad_w, grad_b = np.zeros(d), np.zeros(d)  # (d,) float64
        if not numba_kernels.layer_norm_backward(
            dy_rows[block], x_rows[block], w, eps, dx_rows[block], grad_w, grad_b
        ):
            overflowed.append(block)
        start = tuple(i.start if isinstance(i, slice) else i for i in block if i is not ...)
        sums.append((start, grad_w, grad_b))

    _for_each_block(work, dx_rows)
    if overflowed:
        return NotImplemented
    sums.sort(key=lambda s: s[0])  # blocks in row order, whichever thread finished first:
    grad_weight = sum(s[1] for s in sums).astype(x.dtype)  # (d,)  the same sum every run
    grad_bias = sum(s[2] for s in sums).astype(x.dtype)  # (d,)
    return grad_x, (None if weight is None else grad_weight), grad_bias


def linear_backward(
    grad_y: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: bool = True
) -> Any:
    """Same as :func:`tinytx.functional.linear_backward`: dx = dy W, dW = dy^T x, db = the
    sum of dy's rows; the same BLAS products and the same sum, run side by side.

    The two products have the same number of multiply-adds (n d_out d_in), so instead of
    splitting each over the pool in turn (two hand-offs and two waits), the calling
    thread computes dx while one pool thread computes dW and db, each on a
    single-threaded BLAS: one hand-off, one wait, and each product whole.
    grad_y: (..., d_out); x: (..., d_in); weight: (d_out, d_in) -> (dx, dW, db or None).
    Left to the definition (NotImplemented): one thread, mixed dtypes, a BLAS whose
    threads tinytx cannot hold to one, or products too small to be worth a hand-off.
    """
    d_out, d_in = weight.shape
    n = math.prod(x.shape[:-1])
    if get_num_threads() < 2 or not _can_pin_blas():
        return NotImplemented
    if grad_y.dtype != x.dtype or weight.dtype != x.dtype or x.dtype.kind != "f":
        return NotImplemented
    if 2 * n * d_out * d_in < numpy_natives._THREADED_MIN_FLOPS_PER_THREAD:  # hand-off costs more
        return NotImplemented
    rows_dy = grad_y.reshape(n, d_out)  # (n, d_out)
    rows_x = x.reshape(n, d_in)  # (n, d_in)
    results: dict[str, Any] = {}

    def product(which: str) -> None:
        if which == "dx":
            results["dx"] = np.matmul(rows_dy, weight)  # (n, d_in)
        else:
            results["dw"] = np.matmul(rows_dy.T, rows_x)  # (d_out, d_in)
            results["db"] = np.sum(rows_dy, axis=0) if bias else None  # (d_out,)

    _map_with_blas_on_pool(product, ["dx", "dw"])  # the caller takes "dx"
    return results["dx"].reshape(*x.shape[:-1], d_in), results["dw"], results["db"]


BACKWARD_NATIVES = {
    "gelu_backward": gelu_backward,
    "layer_norm_backward": layer_norm_backward,
    "linear_backward": linear_backward,
    "relu_backward": relu_backward,
    "softmax_backward": softmax_backward,
}
