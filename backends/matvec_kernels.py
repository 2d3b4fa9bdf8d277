"""Decoding's compiled kernels: a product for a few rows against a layer's weight (the
matrix-vector step), and a whole pre-norm block's step for one token built on it.

    y[r, o] = sum_i x[r, i] W[o, i] + b[o]     x (rows, d_in), W (d_out, d_in), rows small

Generating text multiplies one row per sequence by every weight matrix, so a decode step
is bound by reading the weights from memory (see the README's "Why decoding is
bandwidth-bound"). OpenBLAS's matrix-vector kernel reads float32 weights at about 24 GB/s
on two cores of the EPYC where this was written, while summing an array reads at 33-35
GB/s there. This kernel reads each row of W once, as one contiguous stream, and keeps
the few rows of x in cache: measured there, the weights of GPT-2 small read at 31 GB/s on
two threads (27 on one).

- numba (optional, ``pip install 'tinytx[fast]'``): one compiled loop, output rows
  shared between numba's threads (as many as tinytx's pool). LLVM may reorder the sum
  into vector lanes (as BLAS does), so results differ from the definition's ``x @ W.T``
  by rounding only.
- Without numba, or with ``TINYTX_NUMBA=0``, :func:`few_rows_matmul` and
  :func:`block_step` return None and the caller uses BLAS, or the block's modules.

:func:`tinytx.functional.linear` is the definition; tests/test_natives.py checks the
linear native (which calls :func:`few_rows_matmul`) against it, tests/test_decode_step.py
the block step against the block's modules.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from tinytx.backends import numba_kernels

__all__ = ["ACTIVATION_CODES", "MAX_ROWS", "block_step", "few_rows_matmul", "kernel_available"]

# The kernel keeps every row of x next to one row of W: it is for matrix-vector-like
# products. The rule: up to 8 rows, the rows' partial sums and one 16-float vector of W
# fit in the 32 vector registers of AVX-512 (16 of AVX2, NEON); beyond that BLAS's
# blocked kernels, which reuse W from cache across many rows, are the better tool.
MAX_ROWS = 8

_kernels: dict[str, Any] = {}  # "product", "step": compiled by _compile on first use
_compile_lock = threading.Lock()  # one thread compiles; others wait for it

# Sums reordered into vector lanes and fused multiply-adds ("reassoc", "contract": as BLAS
# does), but IEEE NaN and inf (no "nnan"/"ninf" assumptions) and NumPy's division (x / 0
# is inf, not an error): a NaN weight gives NaN logits, which generation reports.
_FASTMATH = {"contract", "reassoc"}
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2}  # product's activations; -1: none


def _compile() -> dict[str, Any]:
    """The numba kernels, compiled on first use (cached on disk). Call only when
    :func:`tinytx.backends.numba_kernels.enabled` (numba imported)."""
    with _compile_lock:
        if not _kernels:
            _kernels.update(_build(numba_kernels._numba))
    return _kernels


def _build(numba: Any) -> dict[str, Any]:
    """The few-rows product, and the decode step of one pre-norm block built on it."""
    parallel = numba.njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
    serial = numba.njit(fastmath=_FASTMATH, error_model="numpy", cache=True)
    # numba_kernels' compiled LayerNorm and one-number helpers (exp, GELU), set up here
    layer_norm = numba_kernels._kernel("layer_norm")
    exp, gelu, gelu_tanh = numba_kernels._exp, numba_kernels._gelu_one, numba_kernels._gelu_tanh_one

    @parallel
    def product(
        x: Any, w: Any, bias: Any, activation: int, residual: Any, out: Any
    ) -> None:  # pragma: no cover  fmt: skip
        """out = act(x W^T + b) + residual. x: (rows, d_in); w: (d_out, d_in); bias: (d_out,)
        or (0,) for none; activation: an ACTIVATION_CODES value or -1; residual: (rows,
        d_out) or (0, 0) for none; out: (rows, d_out). Output rows of W are shared
        between threads; each row of W is read once, as one contiguous stream, for every
        row of x; the activation comes right after its sum, beside the weights' reads."""
        rows, d_in = x.shape
        has_bias, has_residual = bias.shape[0] > 0, residual.shape[0] > 0
        zero = x.dtype.type(0.0)  # every number in x's dtype (a float64 0.0 would promote a)
        for o in numba.prange(w.shape[0]):
            for r in range(rows):
                total = zero
                for i in range(d_in):  # one contiguous row of W, vectorized
                    total += x[r, i] * w[o, i]
                a = total + bias[o] if has_bias else total
                if activation == 0:
                    a = max(a, zero)
                elif activation == 1:
                    a = gelu(a)
                elif activation == 2:
                    a = gelu_tanh(a)
                out[r, o] = a + residual[r, o] if has_residual else a

    @parallel
    def attend(
        qkv: Any, keys: Any, values: Any, position: int, scale: float, out: Any
    ) -> None:  # pragma: no cover  fmt: skip
        """out = softmax(q K[:, :p+1]^T scale) V[:, :p+1] for every head, heads between
        threads. qkv: (d + 2 d_kv,); keys, values: (heads_kv, max_len, d_head); out: (d,)."""
        heads_kv, _, d_head = keys.shape
        heads = out.shape[0] // d_head
        for head in numba.prange(heads):
            g = head // (heads // heads_kv)  # its key/value head
            scores = np.empty(position + 1, dtype=out.dtype)  # (seq_k,)
            top = out.dtype.type(-np.inf)  # float32 throughout: exp is float32's
            for t in range(position + 1):
                total = out.dtype.type(0.0)
                for j in range(d_head):
                    total += qkv[head * d_head + j] * keys[g, t, j]
                scores[t] = total * scale
                top = max(top, scores[t])
            norm = out.dtype.type(0.0)
            for t in range(position + 1):
                shifted = scores[t] - top  # exp turns NaN into a number: NaN kept here
                scores[t] = exp(shifted) if shifted == shifted else shifted
                norm += scores[t]
            mixed = np.zeros(d_head, dtype=out.dtype)  # sum_t p_t v_t, one cached row at a time
            for t in range(position + 1):
                for j in range(d_head):
                    mixed[j] += scores[t] * values[g, t, j]
            for j in range(d_head):
                out[head * d_head + j] = mixed[j] / norm

    @serial
    def step(  # pragma: no cover (compiled)
        x: Any, keys: Any, values: Any, position: int, n1w: Any, n1b: Any, eps1: float,
        w_in: Any, b_in: Any, w_out: Any, b_out: Any, n2w: Any, n2b: Any, eps2: float,
        w_1: Any, b_1: Any, w_2: Any, b_2: Any, activation: int, scale: float, out: Any,
    ) -> bool:  # fmt: skip
        """See :func:`block_step`; x, out: (1, d). False (before any write to the cache,
        or with the cache's position written again by the modules) where a LayerNorm row
        must go to the definition."""
        d = x.shape[1]
        heads_kv, _, d_head = keys.shape
        d_kv = heads_kv * d_head
        none = np.empty((0, 0), dtype=x.dtype)  # no residual
        # attention: x1 = x + W_out attend(q, K, V) + b_out, with q, k, v = W_in LN1(x) + b_in
        h = np.empty_like(x)  # (1, d)
        if layer_norm(x, n1w, n1b, eps1, h) != 0:
            return False
        qkv = np.empty((1, w_in.shape[0]), dtype=x.dtype)  # (1, d + 2 d_kv)
        product(h, w_in, b_in, -1, none, qkv)
        for g in range(heads_kv):  # the new position's key and value, into the cache
            for j in range(d_head):
                keys[g, position, j] = qkv[0, d + g * d_head + j]
                values[g, position, j] = qkv[0, d + d_kv + g * d_head + j]
        attended = np.empty_like(x)  # (1, d): the heads side by side
        attend(qkv[0], keys, values, position, scale, attended[0])
        x1 = np.empty_like(x)  # (1, d)
        product(attended, w_out, b_out, -1, x, x1)
        # feed-forward: y = x1 + W_2 act(W_1 LN2(x1) + b_1) + b_2
        if layer_norm(x1, n2w, n2b, eps2, h) != 0:
            return False
        hidden = np.empty((1, w_1.shape[0]), dtype=x.dtype)  # (1, d_ff)
        product(h, w_1, b_1, activation, none, hidden)
        product(hidden, w_2, b_2, -1, x1, out)
        return True

    return {"product": product, "step": step}


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
    product = _compile()["product"]
    _set_threads(threads)
    out = np.empty((rows, weight.shape[0]), dtype=x.dtype)  # (rows, d_out)
    no_bias, no_residual = np.empty(0, dtype=x.dtype), np.empty((0, 0), dtype=x.dtype)
    bias = no_bias if bias is None else bias
    product(np.ascontiguousarray(x), weight, bias, -1, no_residual, out)
    return out


def block_step(
    x: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    position: int,
    norm1: tuple[np.ndarray, np.ndarray, float],
    in_proj: tuple[np.ndarray, np.ndarray],
    out_proj: tuple[np.ndarray, np.ndarray],
    norm2: tuple[np.ndarray, np.ndarray, float],
    linear1: tuple[np.ndarray, np.ndarray],
    linear2: tuple[np.ndarray, np.ndarray],
    activation: str,
    scale: float,
    threads: int,
) -> np.ndarray | None:
    """One new token through a pre-norm decoder block, compiled as one function:

        h = LN1(x);  q, k, v = W_in h + b_in;  K[:, p], V[:, p] = k, v   (into the cache)
        x1 = x + W_out softmax(q K[:, :p+1]^T * scale) V[:, :p+1] + b_out   (per head)
        y  = x1 + W_2 act(W_1 LN2(x1) + b_1) + b_2

    what :class:`tinytx.layers.DecoderBlock` computes for one token with a KV cache, in
    its order, within rounding (sums in vector lanes, fused multiply-adds, and exp as
    :mod:`tinytx.backends.numba_kernels` computes it, within 1.5 ulp).
    The products are the few-rows kernel's loops (output rows shared between numba's
    threads); between them there is no Python at all, where the block's modules make
    some 100 calls per token (see the README's "Why decoding is bandwidth-bound").

    x: (d,); keys, values: (heads_kv, max_len, d_head) cache buffers, written at
    ``position``; norm1, norm2: (weight (d,), bias (d,), eps); in_proj: (W (d + 2 d_kv, d),
    b); out_proj: (W (d, d), b); linear1: (W (d_ff, d), b); linear2: (W (d, d_ff), b);
    activation: "relu", "gelu" or "gelu_tanh" -> (d,); None where it does not apply
    (numba missing or off, not all float32, a weight not C-contiguous, a full cache).
    """
    arrays = [x, keys, values, *norm1[:2], *in_proj, *out_proj, *norm2[:2], *linear1, *linear2]
    if activation not in ACTIVATION_CODES or not numba_kernels.enabled():
        return None
    if any(a.dtype != np.float32 or not a.flags.c_contiguous for a in arrays):
        return None
    if not keys.flags.writeable or not values.flags.writeable or position >= keys.shape[1]:
        return None
    step = _compile()["step"]
    _set_threads(threads)
    out = np.empty((1, x.shape[0]), dtype=x.dtype)  # (1, d)
    done = step(
        x.reshape(1, -1), keys, values, position, *norm1[:2], float(norm1[2]), *in_proj,
        *out_proj, *norm2[:2], float(norm2[2]), *linear1, *linear2,
        ACTIVATION_CODES[activation], float(scale), out,
    )  # fmt: skip
    return out[0] if done else None
