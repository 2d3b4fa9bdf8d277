"""Fused kernels for the NumPy natives: GELU (both forms) and LayerNorm, forward and
backward; the exponentials and row sums of attention's softmax; AdamW's update.

The NumPy natives make 25-40 passes over a block for GELU's erfc fit (one ufunc call per
operation), and LayerNorm's backward has ten or so. A compiled loop makes one pass: each
element is read once, every operation runs in vector registers, and LLVM vectorizes the
loop (16 float32 lanes with AVX-512). Measured on a 2-core EPYC (Zen 4), one thread,
(768, 512) float32: GELU 0.37 ms instead of 1.6, its backward 0.51 instead of 1.9,
LayerNorm 0.13 instead of 0.62, its backward 0.32 instead of 1.6 (the definition's; it
had no native). The LayerNorm kernels sum each row in float64, so their mean and variance
are more accurate than the float32 definition's.

Where they run: the natives (backends/numpy_natives.py, numpy_backward_natives.py) still
cut arrays into cache-sized row blocks and spread them over tinytx's thread pool; each
kernel here works on one block on one thread (``nogil``, so the pool's threads run at
once). The readable definitions in tinytx/functional.py stay the reference;
tests/test_numba_kernels.py checks every kernel against them within rounding.

- Optional: numba is the ``fast`` extra (``pip install 'tinytx[fast]'``). Without it, or
  with ``TINYTX_NUMBA=0``, :func:`enabled` is False and the NumPy natives run as before.
  numba is imported on first use, not at ``import tinytx`` (it takes ~0.3 s).
- float32 only (AdamW's update, bit for bit the definition's, also float64). float64, the
  dtype the gradient checks use, stays on the NumPy natives, which are the definition bit
  for bit.
- ``fastmath={"contract"}`` lets LLVM fuse a multiply and an add into one FMA (one
  rounding instead of two); inf and NaN keep their meaning. Only row sums are also
  reordered ("reassoc"), and AdamW's update has neither.

The exp trick, used by the GELU and softmax kernels. numba's ``np.exp`` is a scalar libm call here
(llvmlite has no vector math library), which would stop LLVM from vectorizing the loop.
So the kernels compute exp with plain arithmetic (:func:`_exp`), as vector libraries do:

    exp(y) = 2^n exp(r),   n = round(y / ln 2),   r = y - n ln 2,   |r| <= ln(2) / 2,

with exp(r) a degree-7 Taylor polynomial (its truncation error, 0.35^8 / 8! < 1e-8, is
below float32's rounding), r computed in two steps with ln 2 = hi + lo (Cody and Waite:
n hi is exact, so no digits of y are lost), and 2^n written straight into a float's
exponent bits. 2^n is applied as 2^a 2^b with a + b = n, so that each factor is a normal
float even when exp(y) is a subnormal number (y down to -104, where it rounds to 0).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np

__all__ = [
    "adamw_update",
    "available",
    "covers",
    "enabled",
    "gelu",
    "gelu_backward",
    "gelu_tanh",
    "layer_norm",
    "layer_norm_backward",
    "softmax_numerator",
]

_numba: Any = None  # the numba module, once imported
_missing: str | None = None  # why numba could not be imported
_kernels: dict[str, Any] = {}  # name -> compiled kernel
_compile_lock = threading.Lock()


def available() -> bool:
    """Whether numba imports here (imported on the first call, not before)."""
    global _numba, _missing
    if _numba is None and _missing is None:
        try:
            import numba
        except ImportError as err:
            _missing = str(err)
        else:
            _numba = numba
    return _numba is not None


def enabled() -> bool:
    """Whether the natives use these kernels: numba is installed and ``TINYTX_NUMBA`` is
    not 0 (read on every call, so a benchmark or test can switch it)."""
    off = os.environ.get("TINYTX_NUMBA", "1").strip().lower() in ("0", "false", "no", "off")
    return not off and available()


def covers(*arrays: np.ndarray) -> bool:
    """Whether the kernels take these arrays: all float32, and the kernels enabled."""
    return all(a.dtype == np.float32 for a in arrays) and enabled()


# --- the kernels, as plain Python; compiled by _kernel() on first use --------------------

_F = np.float32
_LOG2E = _F(1.0 / math.log(2.0))
_LN2_HI = _F(0.693145751953125)  # ln 2 = hi + lo; hi has 12 zero bits at the end,
_LN2_LO = _F(1.428606765330187e-06)  # so n hi is exact for |n| < 2^12
_ROOT_HALF = _F(1.0 / math.sqrt(2.0))
_INV_ROOT_TWO_PI = _F(1.0 / math.sqrt(2.0 * math.pi))


def _float32_from_bits(bits: Any) -> Any:
    """The float32 whose bit pattern is the int32 ``bits`` (compiled: one bitcast)."""
    return np.int32(bits).view(np.float32)


def _exp(y: Any) -> Any:
    """exp(y) for float32 y, within 1.5 ulp (1.19 measured over [-104, 88] on Zen 4); see
    the module docstring. exp(-inf) = 0; exp(NaN) is some number (callers keep NaN)."""
    y = _F(-104.0) if not y > _F(-104.0) else y  # also NaN -> -104: n stays an integer
    y = _F(88.0) if y > _F(88.0) else y
    n = np.floor(y * _LOG2E + _F(0.5))  # round(y / ln 2)
    r = (y - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln(2) / 2
    p = _F(1.0 / 5040.0)  # exp(r) = sum r^k / k!, k <= 7, by Horner's rule
    p = _F(1.0 / 720.0) + r * p
    p = _F(1.0 / 120.0) + r * p
    p = _F(1.0 / 24.0) + r * p
    p = _F(1.0 / 6.0) + r * p
    p = _F(0.5) + r * p
    p = _F(1.0) + r * p
    p = _F(1.0) + r * p
    k = np.int32(n)  # in [-150, 128]
    a = k >> 1  # 2^n = 2^a 2^b, each a normal float
    b = k - a
    # a float32 is sign | 8 exponent bits (biased by 127) | 23 fraction bits: 2^a is (a+127) << 23
    return p * _float32_from_bits((a + 127) << 23) * _float32_from_bits((b + 127) << 23)


def _erfc_tail(size: Any) -> tuple[Any, Any]:
    """(t, erfc(z)) for z = size / sqrt 2, size >= 0: the definition's fit (functional.py's
    ``_erfc_nonneg``), erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2)."""
    z = size * _ROOT_HALF
    t = _F(1.0) / (z * _F(0.5) + _F(1.0))
    p = _F(0.17087277)  # P(t), the coefficients of functional._ERFC_COEFFS, by Horner
    p = _F(-0.82215223) + t * p
    p = _F(1.48851587) + t * p
    p = _F(-1.13520398) + t * p
    p = _F(0.27886807) + t * p
    p = _F(-0.18628806) + t * p
    p = _F(0.09678418) + t * p
    p = _F(0.37409196) + t * p
    p = _F(1.00002368) + t * p
    p = _F(-1.26551223) + t * p
    return t, t * _exp(p - z * z)


def _gelu_one(xi: Any) -> Any:
    """GELU(x) = max(x, 0) - |x|/2 erfc(|x| / sqrt 2) of one float32, |x| capped at 1e4 as
    in the definition (GELU(+inf) = +inf, GELU(-inf) = 0); NaN stays NaN."""
    size = min(abs(xi), _F(1e4))
    _, erfc = _erfc_tail(size)
    positive = xi if xi > _F(0.0) else _F(0.0)
    y = positive - size * _F(0.5) * erfc
    return xi if xi != xi else y


def _gelu_kernel(x: Any, out: Any) -> None:
    """out = GELU(x) (:func:`_gelu_one`). x, out: (n,) float32, contiguous."""
    for i in range(x.size):
        out[i] = _gelu_one(x[i])


def _relu_backward_kernel(grad_y: Any, x: Any, out: Any) -> None:
    """out = dy where x > 0, else 0 (also where x is NaN: x > 0 is false). A choice per
    element, no arithmetic: the definition's numbers exactly, in any float dtype. LLVM
    makes it a vector select; NumPy's masked where branches per element, and random signs
    mispredict half of those branches. grad_y, x, out: (n,), one float dtype."""
    for i in range(x.size):
        out[i] = grad_y[i] if x[i] > 0 else 0


def _gelu_backward_kernel(grad_y: Any, x: Any, out: Any) -> None:
    """out = dy (Phi(x) + x phi(x)), Phi(x) = 1 - erfc(|x|/sqrt 2)/2 for x >= 0, else
    erfc(|x|/sqrt 2)/2; phi(x) = exp(-x^2/2) / sqrt(2 pi). As the definition, x is not
    capped: at x = +-inf, x phi(x) is inf * 0 = NaN. grad_y, x, out: (n,) float32."""
    for i in range(x.size):
        xi = x[i]
        _, erfc = _erfc_tail(abs(xi))
        tail = erfc * _F(0.5)  # Phi(-|x|)
        cdf = _F(1.0) - tail if xi >= _F(0.0) else tail  # Phi(x)
        density = _exp(xi * _F(-0.5) * xi) * _INV_ROOT_TWO_PI  # phi(x)
        slope = cdf + xi * density
        out[i] = grad_y[i] * (xi if xi != xi else slope)  # NaN stays NaN


_TANH_C = _F(math.sqrt(2.0 / math.pi))


def _gelu_tanh_one(xi: Any) -> Any:
    """x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), GPT-2's GELU, of one float32,
    with x capped at +-1e4 as in the definition. Computed as x sigmoid(2u) =
    x / (1 + exp(-2u)), the same number (1 + tanh(u) = 2 sigmoid(2u)) without
    1 + tanh(u)'s cancellation for negative x, and with this module's vectorizable exp."""
    inside = min(max(xi, _F(-1e4)), _F(1e4))  # (NaN stays NaN below)
    u = _TANH_C * (inside + _F(0.044715) * inside * inside * inside)
    # exp(-2u) past float32's range (x below about -9.3) is inf, so y = x / inf = -0,
    # the definition's 0.5 x (1 + tanh u) = 0.5 x 0 (not _exp's clamped 1.7e38)
    e = _exp(_F(-2.0) * u) if _F(-2.0) * u < _F(88.0) else _F(np.inf)
    y = max(xi, _F(-1e4)) / (_F(1.0) + e)
    return xi if xi != xi else y


def _gelu_tanh_kernel(x: Any, out: Any) -> None:
    """out = GELU(x), tanh form (:func:`_gelu_tanh_one`). x, out: (n,) float32."""
    for i in range(x.size):
        out[i] = _gelu_tanh_one(x[i])


def _adamw_kernel(
    p: Any, g: Any, m: Any, v: Any, decay: bool, decay_factor: Any, one_minus_beta1: Any,
    beta2: Any, one_minus_beta2: Any, bias_correction2_sqrt: Any, eps: Any, neg_step: Any,
) -> None:  # fmt: skip
    """One AdamW update in place, element by element, with :class:`tinytx.optim.AdamW`'s
    operations in its order and its dtype (no fused multiply-adds): bit for bit the same
    numbers, in one pass instead of about twelve. p, g, m, v: (n,) of one dtype; the
    constants are that dtype's scalars."""
    for i in range(p.size):
        pi = p[i] * decay_factor if decay else p[i]  # p (1 - lr wd)
        gi = g[i]
        mi = m[i] + one_minus_beta1 * (gi - m[i])  # m + (1 - b1) (g - m)
        vi = v[i] * beta2 + one_minus_beta2 * gi * gi  # v b2 + (1 - b2) g g
        denom = np.sqrt(vi) / bias_correction2_sqrt + eps
        p[i] = pi + neg_step * mi / denom  # p - s m / denom
        m[i] = mi
        v[i] = vi


def _exp_and_sum_kernel(w: Any, totals: Any) -> None:
    """Softmax's numerator for an attention tile, in place, per row r: w[r] = exp(w[r] - m_r),
    then totals[r] = the row's sum (0 -> 1). On entry totals[r] holds the row's maximum
    m_r, finite or -inf (nothing allowed: the row's exponentials are all 0).
    w: (rows, n) C-contiguous; totals: (rows,). See :func:`softmax_numerator`."""
    n_rows, n = w.shape
    for r in range(n_rows):
        m = totals[r]
        m = _F(0.0) if m == _F(-np.inf) else m
        total = _F(0.0)
        for j in range(n):
            e = _exp(w[r, j] - m)  # exp(-inf) = 0
            w[r, j] = e
            total += e
        totals[r] = total if total != _F(0.0) else _F(1.0)


def _softmax_backward_kernel(grad_y: Any, y: Any, grad_x: Any) -> None:
    """Softmax's vector-Jacobian product along each row r, in two passes over the row:
    s = sum_j dy[r, j] y[r, j] (in vector lanes), then dx[r, j] = y[r, j] (dy[r, j] - s).
    grad_y, y, grad_x: (rows, n) float32, C-contiguous."""
    n_rows, n = y.shape
    for r in range(n_rows):
        along = _F(0.0)
        for j in range(n):
            along += grad_y[r, j] * y[r, j]
        for j in range(n):
            grad_x[r, j] = y[r, j] * (grad_y[r, j] - along)


def _row_moments(x: Any, r: int) -> tuple[float, float]:
    """(mean, biased variance) of row r of x (rows, d), both summed in float64."""
    d = x.shape[1]
    total = 0.0
    for j in range(d):
        total += np.float64(x[r, j])
    mean = total / d
    total = 0.0
    for j in range(d):
        c = np.float64(x[r, j]) - mean
        total += c * c
    return mean, total / d


def _layer_norm_kernel(x: Any, weight: Any, bias: Any, eps: float, out: Any) -> int:
    """out[r] = (x[r] - mean) / sqrt(var + eps) * weight + bias for each row r, mean and
    (biased) var summed in float64. x, out: (rows, d) float32; weight, bias: (d,).
    Returns how many rows the definition must do instead: var not finite or its float32
    square overflowing (the definition rescales such rows), or var + eps <= 0."""
    rows, d = x.shape
    bad = 0
    for r in range(rows):
        mean, var = _row_moments(x, r)  # float64
        if not (var <= 3.4e38 and var + eps > 0.0):  # NaN, inf or float32 overflow
            bad += 1
            continue
        mean32 = _F(mean)
        rstd = _F(1.0 / math.sqrt(var + eps))
        for j in range(d):
            out[r, j] = (x[r, j] - mean32) * rstd * weight[j] + bias[j]
    return bad


def _layer_norm_backward_kernel(
    grad_y: Any, x: Any, weight: Any, eps: float, grad_x: Any, grad_w: Any, grad_b: Any
) -> int:
    """For each row, with xhat = (x - mean) rstd, rstd = 1 / sqrt(var + eps), g = dy w:
        grad_x = rstd (g - mean(g) - xhat mean(g xhat)),
    and adds dy xhat to grad_w and dy to grad_b (float64 accumulators, (d,)).
    grad_y, x, grad_x: (rows, d) float32; weight: (d,). Returns the rows left to the
    definition, as :func:`_layer_norm_kernel`."""
    rows, d = x.shape
    bad = 0
    for r in range(rows):
        mean, var = _row_moments(x, r)  # float64
        if not (var <= 3.4e38 and var + eps > 0.0):
            bad += 1
            continue
        mean32 = _F(mean)
        rstd = _F(1.0 / math.sqrt(var + eps))
        g_total = 0.0  # sum of g
        gx_total = 0.0  # sum of g xhat
        for j in range(d):
            xhat = (x[r, j] - mean32) * rstd
            g = grad_y[r, j] * weight[j]
            g_total += np.float64(g)
            gx_total += np.float64(g * xhat)
            grad_w[j] += np.float64(grad_y[r, j] * xhat)
            grad_b[j] += np.float64(grad_y[r, j])
        g_mean = _F(g_total / d)
        gx_mean = _F(gx_total / d)
        for j in range(d):
            xhat = (x[r, j] - mean32) * rstd
            grad_x[r, j] = rstd * (grad_y[r, j] * weight[j] - g_mean - xhat * gx_mean)
    return bad


def _compile_all() -> dict[str, Any]:
    """The kernels by name, compiled with numba (each on its first call; cached on disk)."""
    numba = _numba
    from llvmlite import ir
    from numba.extending import intrinsic

    @intrinsic
    def float32_from_bits(typingctx: Any, bits: Any) -> Any:  # pragma: no cover (compiled)
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.FloatType())  # reinterpret, no conversion

        return numba.types.float32(numba.types.int32), codegen

    jit = numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
    # Sums over a row (the norms, softmax's totals) may be reordered into vector lanes
    # ("reassoc"), as NumPy's pairwise sum reorders them.
    jit_sums = numba.njit(
        nogil=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"}
    )
    # The helpers see each other through this module's globals, compiled in place.
    globals()["_float32_from_bits"] = float32_from_bits
    inline = numba.njit(inline="always")  # helpers: inlined into the kernels' loops
    for name in ("_exp", "_erfc_tail", "_row_moments", "_gelu_one", "_gelu_tanh_one"):
        globals()[name] = inline(globals()[name])
    exact = numba.njit(nogil=True, cache=True, error_model="numpy")  # no FMA: bit for bit
    return {
        "adamw": exact(_adamw_kernel),
        "exp_and_sum": jit_sums(_exp_and_sum_kernel),  # the row sum in vector lanes
        "gelu": jit(_gelu_kernel),
        "gelu_backward": jit(_gelu_backward_kernel),
        "gelu_tanh": jit(_gelu_tanh_kernel),
        "layer_norm": jit_sums(_layer_norm_kernel),
        "layer_norm_backward": jit_sums(_layer_norm_backward_kernel),
        "relu_backward": exact(_relu_backward_kernel),
        "softmax_backward": jit_sums(_softmax_backward_kernel),  # the row sum in lanes
    }


def _kernel(name: str) -> Any:
    """The compiled kernel ``name``; the first call sets them all up (once, under a lock:
    the pool's threads may all ask at the same moment)."""
    if not _kernels:
        with _compile_lock:
            if not _kernels:
                if not available():
                    raise RuntimeError(f"numba is not installed here: {_missing}")
                _kernels.update(_compile_all())  # all at once: other threads read it unlocked
    return _kernels[name]


def _flat(a: np.ndarray) -> np.ndarray:
    """a as a contiguous 1-D array (a view when a is contiguous already)."""
    return np.ascontiguousarray(a).reshape(-1)


def _into(out: np.ndarray) -> np.ndarray:
    """out as a 1-D view; it must be C-contiguous (a reshaped copy would be lost)."""
    if not out.flags.c_contiguous:
        raise ValueError("numba_kernels: the output block must be C-contiguous")
    return out.reshape(-1)


def _matrix(a: np.ndarray) -> np.ndarray:
    """a (..., d) as a contiguous (rows, d) array (a view when a is contiguous)."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


# --- one block each; called by the natives inside their pool work ------------------------


def gelu(x: np.ndarray, out: np.ndarray) -> None:
    """out = GELU(x), exact form. x: float32, any shape; out: C-contiguous, x's shape."""
    _kernel("gelu")(_flat(x), _into(out))


def adamw_update(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, decay: bool,
    decay_factor: float, beta1: float, beta2: float, bias_correction2_sqrt: float,
    eps: float, step_size: float,
) -> bool:  # fmt: skip
    """One AdamW update of p, m, v in place (see :func:`_adamw_kernel`); False, touching
    nothing, unless p, m, v are C-contiguous arrays of one float dtype with g's shape.
    The Python-float constants become p's dtype, as NumPy makes them in the definition."""
    arrays = (p, g, m, v)
    if p.dtype not in (np.float32, np.float64) or any(a.dtype != p.dtype for a in arrays):
        return False
    if any(a.shape != p.shape for a in arrays) or not all(a.flags.c_contiguous for a in (p, m, v)):
        return False
    t = p.dtype.type
    _kernel("adamw")(
        p.reshape(-1), _flat(g), m.reshape(-1), v.reshape(-1), decay, t(decay_factor),
        t(1 - beta1), t(beta2), t(1 - beta2), t(bias_correction2_sqrt), t(eps), t(-step_size),
    )  # fmt: skip
    return True


def softmax_numerator(w: np.ndarray, biases: list[np.ndarray]) -> np.ndarray | None:
    """Softmax's numerator for one attention tile, in place: w = exp(s + b - max) with its
    row totals (..., r, 1), for out = (w v) / total; or None, and NumPy does the tile.

    NumPy adds the mask's bias (when there is one) and takes the row maxima (its max is
    vectorized and propagates NaN); one compiled pass (:func:`_exp_and_sum_kernel`) makes
    the exponentials and their sums, where NumPy needs three calls (subtract, exp, sum).
    Measured on the 2-core EPYC, one thread: a (8, 256, 256) tile 406 us instead of 790.
    None, before any exponential, for a row whose maximum is +inf or NaN: the bias is then
    already added in place, which ``numpy_natives._softmax_block`` may add again (0 or -inf
    twice changes nothing), and its limits are the definition's. None also when the
    kernels are off, or w is not float32 or not C-contiguous.

    w: (..., r, n) float32 scores; biases: the mask's 0 / -inf arrays, broadcastable to w.
    """
    if w.dtype != np.float32 or not w.flags.c_contiguous or not enabled():
        return None
    if any(bias.dtype != np.float32 for bias in biases):
        return None
    with np.errstate(invalid="ignore"):  # inf + -inf: a NaN row, NumPy's turn below
        for bias in biases:  # the mask's 0 / -inf: one NumPy pass each
            np.add(w, bias, out=w)
    totals = np.max(w, axis=-1)  # (..., r) the row maxima
    if np.isnan(totals).any() or np.isposinf(totals).any():  # an inf or NaN score
        return None  # (nothing exponentiated yet)
    _kernel("exp_and_sum")(w.reshape(-1, w.shape[-1]), totals.reshape(-1))
    return totals[..., None]  # (..., r, 1)


def gelu_tanh(x: np.ndarray, out: np.ndarray) -> None:
    """out = GELU(x), tanh form. x: float32, any shape; out: C-contiguous, x's shape."""
    _kernel("gelu_tanh")(_flat(x), _into(out))


def softmax_backward(grad_y: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """out = y (dy - sum(dy y)) along the last axis. grad_y, y: float32 (..., n), the same
    shape; out: C-contiguous, that shape."""
    rows = _into(out).reshape(-1, y.shape[-1])  # (rows, n)
    _kernel("softmax_backward")(_matrix(grad_y), _matrix(y), rows)


def relu_backward(grad_y: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out = dy [x > 0]. grad_y, x: one float dtype (float32 or float64), any shape (the
    same); out: C-contiguous, that shape."""
    _kernel("relu_backward")(_flat(grad_y), _flat(x), _into(out))


def gelu_backward(grad_y: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out = dy GELU'(x), exact form. grad_y, x: float32, any shape (the same); out:
    C-contiguous, that shape."""
    _kernel("gelu_backward")(_flat(grad_y), _flat(x), _into(out))


def layer_norm(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray
) -> bool:
    """out = LayerNorm(x) over the last axis. x: (..., d) float32; weight, bias: (d,);
    out: C-contiguous, x's shape. False when some row must go to the definition."""
    out_rows = _into(out).reshape(-1, x.shape[-1])  # (rows, d)
    return _kernel("layer_norm")(_matrix(x), weight, bias, float(eps), out_rows) == 0


def layer_norm_backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    eps: float,
    grad_x: np.ndarray,
    grad_w: np.ndarray,
    grad_b: np.ndarray,
) -> bool:
    """grad_x of LayerNorm, and dy xhat and dy summed over these rows added to grad_w and
    grad_b ((d,) float64). grad_y, x: (..., d) float32; weight: (d,); grad_x: C-contiguous,
    x's shape. False when some row must go to the definition."""
    kernel = _kernel("layer_norm_backward")
    dx = _into(grad_x).reshape(-1, x.shape[-1])
    bad = kernel(_matrix(grad_y), _matrix(x), weight, float(eps), dx, grad_w, grad_b)
    return bad == 0
