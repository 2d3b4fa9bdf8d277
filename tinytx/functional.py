"""Pure functions on arrays: the arithmetic of a transformer.

Every function takes its array namespace from its inputs (``xp = array_namespace(x)``)
and uses only the Python array API standard, so the same code runs on NumPy, CuPy and
array-api-strict. What the standard lacks (softmax, erf) is written here, once. A backend
may offer a faster native version of such a function; :func:`_native` is the one place
where that choice is made.

Each forward has its backward right below it (``softmax`` / ``softmax_backward``, ...),
llm.c style: the backward takes the cotangent first (dL/dy, the gradient of a loss with
respect to the forward's output), then what the forward's caller kept (its inputs, or its
output where that is enough), and returns the vector-Jacobian product dL/dx = J^T dL/dy.
Its docstring derives the equation. A cotangent whose shape or dtype differs from the
forward output's is an error.

Shapes use these names: ``batch``, ``heads`` (query heads), ``heads_kv`` (key/value heads,
fewer than ``heads`` for grouped-query attention), ``seq_q`` and ``seq_k`` (query and key
lengths), ``d`` (per-head width), ``d_v`` (per-head value width).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from array_api_compat import device as device_of

from tinytx.backends import BackendMismatchError, dtype_is, native_function
from tinytx.backends import array_namespace as compat_namespace  # remembered by type

Array = Any


def array_namespace(*arrays: Any) -> Any:
    """The array namespace of ``arrays`` (array_api_compat's), or tinytx's error naming the
    kinds of arrays when they come from different backends or are not arrays at all."""
    try:
        return compat_namespace(*arrays)
    except TypeError:
        given = [a for a in arrays if a is not None]
        kinds = sorted({f"{type(a).__module__}.{type(a).__name__}" for a in given})
        raise BackendMismatchError(
            f"expected arrays of one backend, got {', '.join(kinds)}; convert them with "
            "backend.asarray(...) (tinytx.get_backend(name)) first"
        ) from None


__all__ = [
    "causal_mask",
    "cross_entropy",
    "cross_entropy_backward",
    "embedding",
    "embedding_backward",
    "erf",
    "gelu",
    "gelu_backward",
    "layer_norm",
    "layer_norm_backward",
    "linear",
    "linear_backward",
    "log_softmax",
    "log_softmax_backward",
    "matmul",
    "relu",
    "relu_backward",
    "repeat_kv",
    "repeat_kv_backward",
    "rms_norm",
    "rms_norm_backward",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "softmax",
    "softmax_backward",
]


def _native(xp: Any, name: str) -> Any:
    """The backend's own version of ``name`` for namespace ``xp``, or None (see backends).

    A native computes the same numbers as the definition below it, only faster; it may
    return ``NotImplemented`` for an input it does not cover, and the definition runs.
    """
    return native_function(xp, name)


def _require_float(x: Array, what: str) -> None:
    xp = array_namespace(x)
    if not dtype_is(xp, x.dtype, "real floating"):
        raise TypeError(f"{what} must be a real floating-point array, got dtype {x.dtype}")


def _check_cotangent(grad: Array, shape: tuple[int, ...], dtype: Any, what: str) -> None:
    """Raise unless the cotangent ``grad`` has the forward output's shape and dtype."""
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(
            f"{what}: the cotangent must have the forward output's shape {tuple(shape)}, "
            f"got {tuple(grad.shape)}"
        )
    if grad.dtype != dtype:
        raise TypeError(
            f"{what}: the cotangent must have the forward output's dtype {_dtype_name(dtype)}, "
            f"got {_dtype_name(grad.dtype)}"
        )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # array_api_strict.float64 -> float64


# --- activations ---------------------------------------------------------------------


def relu(x: Array) -> Array:
    """ReLU(x) = max(x, 0), elementwise.  x: any shape -> same shape."""
    xp = array_namespace(x)
    native = _native(xp, "relu")
    if native is not None and (y := native(x)) is not NotImplemented:
        return y
    return xp.maximum(x, xp.zeros_like(x))  # (...)


def relu_backward(grad_y: Array, x: Array) -> Array:
    """Gradient of ReLU: dx = dy * [x > 0] (0 at x = 0, as PyTorch).

    y = max(x, 0) passes x through where x > 0 (slope 1) and is constant elsewhere (slope 0).
    grad_y, x: any shape (the same) -> grad_x, that shape.
    """
    xp = array_namespace(grad_y, x)
    _check_cotangent(grad_y, x.shape, x.dtype, "relu_backward")
    native = _native(xp, "relu_backward")
    if native is not None and (grad_x := native(grad_y, x)) is not NotImplemented:
        return grad_x
    return xp.where(x > 0, grad_y, xp.zeros_like(grad_y))  # (...)


# Coefficients of a Chebyshev fit to erfc (Numerical Recipes in C, 2nd ed., section 6.2):
# erfc(z) ~= t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), fractional error < 1.2e-7 for z >= 0.
_ERFC_COEFFS = (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
)  # fmt: skip


def _erfc_nonneg(z: Array) -> Array:
    """erfc(z) for z >= 0 with relative error below 1.2e-7 (float32 precision)."""
    xp = array_namespace(z)
    t = 1.0 / (1.0 + 0.5 * z)  # (...)
    poly = xp.full_like(z, _ERFC_COEFFS[-1])  # Horner's rule, highest coefficient first
    for c in reversed(_ERFC_COEFFS[:-1]):
        poly = c + t * poly
    return t * xp.exp(-z * z + poly)  # (...)


def erf(x: Array) -> Array:
    """erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, elementwise.

    The standard has no erf. We use the backend's native one when it has it (CuPy), and
    otherwise erf(x) = sign(x) * (1 - erfc(|x|)) with a float32-accurate erfc fit; for
    |x| < 1/2, where 1 - erfc loses the small value, the Taylor series
    erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)), which keeps erf odd and erf(0) = 0.
    """
    xp = array_namespace(x)
    _require_float(x, "erf input")
    native = _native(xp, "erf")
    if native is not None:
        return native(x)
    tail = _erfc_nonneg(xp.abs(x))  # (...)
    from_tail = xp.where(x >= 0, 1.0 - tail, tail - 1.0)  # (...)
    return xp.where(xp.abs(x) < 0.5, _erf_taylor(x), from_tail)


def _erf_taylor(x: Array) -> Array:
    """erf(x) by its Taylor series, 8 terms: error below 1e-10 for |x| <= 1/2."""
    x2 = x * x  # (...)
    term = x  # (-1)^n x^(2n+1) / n!
    total = x
    for n in range(1, 8):
        term = term * x2 * (-1.0 / n)
        total = total + term * (1.0 / (2 * n + 1))
    return total * (2.0 / math.sqrt(math.pi))


def gelu(x: Array, approximate: str = "none") -> Array:
    """GELU(x) = x * Phi(x), Phi the standard normal CDF (Hendrycks & Gimpel 2016).

    ``approximate="none"``: the exact form, x/2 * (1 + erf(x / sqrt(2))). Since
    Phi(x) = 1 - Phi(-x) and Phi(-|x|) = erfc(|x| / sqrt(2)) / 2, it equals
    GELU(x) = max(x, 0) - |x|/2 * erfc(|x| / sqrt(2)): one erfc of a non-negative
    argument, no branch, and float32 relative precision also for large negative x
    (where 1 + erf(...) would cancel).
    ``approximate="tanh"``: x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), GPT-2's.
    Limits, both forms: GELU(+inf) = +inf, GELU(-inf) = 0; NaN only where x is NaN.
    x: any shape -> same shape.
    """
    xp = array_namespace(x)
    _require_float(x, "gelu input")
    if approximate == "tanh":
        native_tanh = _native(xp, "gelu_tanh")
        if native_tanh is not None and (y := native_tanh(x)) is not NotImplemented:
            return y
        # Beyond |x| = 1e4 tanh(...) is exactly +-1, so capping x there changes nothing,
        # keeps x^3 from overflowing and gives 0.5 * (-1e4) * 0 = 0 at -inf (not NaN).
        inside = xp.clip(x, min=-1e4, max=1e4)  # (...)
        inner = math.sqrt(2.0 / math.pi) * (inside + 0.044715 * inside * inside * inside)
        return 0.5 * xp.clip(x, min=-1e4) * (1.0 + xp.tanh(inner))  # (...)
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    native_gelu = _native(xp, "gelu")
    if native_gelu is not None and (y := native_gelu(x)) is not NotImplemented:
        return y
    native = _native(xp, "erf")
    if native is not None:  # x capped below at -1e4, as the tanh form: 0, not -inf * 0, at -inf
        return 0.5 * xp.clip(x, min=-1e4) * (1.0 + native(x * (1.0 / math.sqrt(2.0))))
    # |x| capped at 1e4: the tail |x|/2 erfc(|x|/sqrt 2) is exactly 0 from |x| ~ 40 on, and
    # the cap keeps inf * erfc(inf) = inf * 0 from making NaN at x = +-inf.
    size = xp.where(xp.abs(x) > 1e4, 1e4, xp.abs(x))  # (...)  |x|, capped
    tail = _erfc_nonneg(size * (1.0 / math.sqrt(2.0)))  # (...)  erfc(|x|/sqrt 2) = 2 Phi(-|x|)
    return xp.maximum(x, xp.zeros_like(x)) - 0.5 * size * tail  # (...)


def gelu_backward(grad_y: Array, x: Array, approximate: str = "none") -> Array:
    """Gradient of GELU, dx = dy * GELU'(x).

    ``approximate="none"``: GELU(x) = x Phi(x), so by the product rule
    GELU'(x) = Phi(x) + x phi(x), with phi(x) = exp(-x^2/2) / sqrt(2 pi) the normal density
    (Phi' = phi). Phi is computed as in :func:`gelu`: Phi(x) = 1 - erfc(x/sqrt 2)/2 for
    x >= 0 and erfc(|x|/sqrt 2)/2 for x < 0.
    ``approximate="tanh"``: with u = c (x + a x^3), c = sqrt(2/pi), a = 0.044715, t = tanh(u),
    GELU(x) = x/2 (1 + t), so GELU'(x) = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2).
    grad_y, x: any shape (the same) -> grad_x, that shape.
    """
    xp = array_namespace(grad_y, x)
    _require_float(x, "gelu_backward input")
    _check_cotangent(grad_y, x.shape, x.dtype, "gelu_backward")
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = xp.tanh(c * (x + 0.044715 * x * x * x))  # (...)
        slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
        return grad_y * slope  # (...)
    if approximate != "none":
        raise ValueError(
            f"gelu_backward: approximate must be 'none' or 'tanh', got {approximate!r}"
        )
    native_backward = _native(xp, "gelu_backward")
    if native_backward is not None and (
        (grad_x := native_backward(grad_y, x)) is not NotImplemented
    ):
        return grad_x
    native = _native(xp, "erf")
    if native is not None:
        cdf = 0.5 * (1.0 + native(x * (1.0 / math.sqrt(2.0))))  # (...)  Phi(x)
    else:
        tail = 0.5 * _erfc_nonneg(xp.abs(x) * (1.0 / math.sqrt(2.0)))  # (...)  Phi(-|x|)
        cdf = xp.where(x >= 0, 1.0 - tail, tail)  # (...)  Phi(x)
    density = xp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))  # (...)  phi(x)
    return grad_y * (cdf + x * density)  # (...)


# --- softmax and norms ---------------------------------------------------------------


def softmax(x: Array, axis: int = -1, *, mask: Array | None = None) -> Array:
    """softmax(x)_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x)) along ``axis``.

    Subtracting the row maximum keeps exp() from overflowing, so logits of +-1e4 are fine.
    ``mask`` (boolean, True = keep, broadcastable to x) sets the other entries to zero
    weight. A row with nothing kept (all masked, or all -inf) gives zeros, never NaN.
    A row holding +inf gives the limit as those logits grow together: equal shares among
    its +inf entries, 0 elsewhere. NaN only in a row whose kept entries hold a NaN.
    x: any shape -> same shape.
    """
    xp = array_namespace(x)
    _require_float(x, "softmax input")
    native = _native(xp, "softmax")
    if native is not None and (y := native(x, axis, mask=mask)) is not NotImplemented:
        return y
    if mask is not None:
        x = xp.where(mask, x, -xp.inf)  # (...)
    infinite = x == xp.inf  # (...)
    if xp.any(infinite):  # rows holding +inf: 0 there, -inf (weight 0) elsewhere, NaN stays
        limit = xp.where(infinite, 0.0, xp.where(xp.isnan(x), x, -xp.inf))  # (...)
        x = xp.where(xp.any(infinite, axis=axis, keepdims=True), limit, x)  # (...)
    row_max = xp.max(x, axis=axis, keepdims=True)  # (..., 1, ...)
    row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)  # an all -inf row has max -inf
    e = xp.exp(x - row_max)  # (...)  exactly 0 where x is -inf
    total = xp.sum(e, axis=axis, keepdims=True)  # (..., 1, ...)
    total = xp.where(total == 0, 1.0, total)  # all-masked row: 0 / 1 = 0 (a NaN stays NaN)
    return e / total


def softmax_backward(grad_y: Array, y: Array, axis: int = -1) -> Array:
    """Gradient of softmax from its output: dx = y * (dy - sum(dy * y)) along ``axis``.

    The Jacobian of y = softmax(x) is dy_i/dx_j = y_i (delta_ij - y_j), so the
    vector-Jacobian product is dx_j = sum_i dy_i y_i (delta_ij - y_j) = y_j (dy_j - sum_i dy_i y_i).
    Only y is needed, not x. Masked entries have y = 0 and so get dx = 0; a fully masked
    row (all y = 0) gets a zero gradient, never NaN.
    grad_y, y: any shape (the same) -> grad_x, that shape.
    """
    xp = array_namespace(grad_y, y)
    _check_cotangent(grad_y, y.shape, y.dtype, "softmax_backward")
    native = _native(xp, "softmax_backward")
    if native is not None and (grad_x := native(grad_y, y, axis)) is not NotImplemented:
        return grad_x
    along = xp.sum(grad_y * y, axis=axis, keepdims=True)  # (..., 1, ...)  sum_i dy_i y_i
    return y * (grad_y - along)  # (...)


def log_softmax(x: Array, axis: int = -1) -> Array:
    """log_softmax(x)_i = x_i - max(x) - log(sum_j exp(x_j - max(x))) along ``axis``.

    The log of :func:`softmax`, computed without taking the log of a rounded-to-zero
    probability: a logit far below the others gets a large negative number, not -inf.
    x: any shape -> same shape.
    """
    xp = array_namespace(x)
    _require_float(x, "log_softmax input")
    row_max = xp.max(x, axis=axis, keepdims=True)  # (..., 1, ...)
    shifted = x - row_max  # (...)  <= 0, the largest exactly 0
    total = xp.sum(xp.exp(shifted), axis=axis, keepdims=True)  # (..., 1, ...)  in [1, n]
    return shifted - xp.log(total)  # (...)


def log_softmax_backward(grad_y: Array, y: Array, axis: int = -1) -> Array:
    """Gradient of log_softmax from its output: dx = dy - exp(y) * sum(dy) along ``axis``.

    y_i = x_i - logsumexp(x), and d logsumexp(x) / dx_j = softmax(x)_j = exp(y_j), so
    dy_i/dx_j = delta_ij - exp(y_j) and dx_j = dy_j - exp(y_j) sum_i dy_i.
    grad_y, y: any shape (the same) -> grad_x, that shape.
    """
    xp = array_namespace(grad_y, y)
    _check_cotangent(grad_y, y.shape, y.dtype, "log_softmax_backward")
    total = xp.sum(grad_y, axis=axis, keepdims=True)  # (..., 1, ...)  sum_i dy_i
    return grad_y - xp.exp(y) * total  # (...)


def _kept_targets(logits: Array, targets: Array, ignore_index: int, what: str) -> tuple[Array, int]:
    """Check targets against logits; return (kept: bool (...), how many are kept).

    logits: (..., vocab) floating; targets: integer (...) in [0, vocab) or ignore_index.
    """
    xp = array_namespace(logits, targets)
    _require_float(logits, f"{what} logits")
    if not xp.isdtype(targets.dtype, "integral"):
        raise TypeError(f"{what}: targets must be an integer array, got dtype {targets.dtype}")
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{what}: expected logits (..., vocab) and targets (...) with the same leading "
            f"shape, got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    vocab = logits.shape[-1]
    kept = targets != ignore_index  # (...)
    outside = xp.logical_and(kept, xp.logical_or(targets < 0, targets >= vocab))  # (...)
    if bool(xp.any(outside)):
        offenders = xp.where(outside, targets, xp.zeros_like(targets))  # (...)
        low, high = int(xp.min(offenders)), int(xp.max(offenders))
        raise ValueError(
            f"{what}: targets must lie in [0, {vocab}) (the vocabulary) or equal "
            f"ignore_index={ignore_index}, got {low if low < 0 else high}"
        )
    count = int(xp.sum(xp.astype(kept, xp.int64)))
    return kept, count


def cross_entropy(logits: Array, targets: Array, ignore_index: int = -100) -> Array:
    """Mean cross-entropy loss = -(1/N) sum_p log softmax(logits_p)[targets_p].

    The sum runs over the N positions p whose target is not ``ignore_index`` (-100, as in
    PyTorch: padding, or the prompt part of a sequence). If every position is ignored the
    loss is 0 (PyTorch gives NaN). Targets outside [0, vocab) raise ValueError.
    logits: (..., vocab) floating; targets: integer (...) -> loss, a 0-d array of logits' dtype.
    """
    xp = array_namespace(logits, targets)
    kept, count = _kept_targets(logits, targets, ignore_index, "cross_entropy")
    vocab = logits.shape[-1]
    log_probs = log_softmax(logits, axis=-1)  # (..., vocab)
    classes = xp.arange(vocab, dtype=targets.dtype, device=device_of(targets))  # (vocab,)
    one_hot = xp.logical_and(targets[..., None] == classes, kept[..., None])  # (..., vocab)
    picked = xp.sum(xp.where(one_hot, log_probs, 0.0))  # ()  sum_p log p(target_p)
    return -picked / max(count, 1)  # ()


def cross_entropy_backward(
    grad_loss: Array | float, logits: Array, targets: Array, ignore_index: int = -100
) -> Array:
    """Gradient of :func:`cross_entropy`: dlogits_p = dloss / N * (softmax(logits_p) - onehot(t_p)).

    For one position, -log softmax(z)[t] = logsumexp(z) - z_t, whose gradient is
    softmax(z) - onehot(t) (see :func:`log_softmax_backward` with dy = -onehot(t)).
    The mean divides by N, the number of kept positions; ignored positions get 0.
    If every position is ignored the gradient is 0.
    grad_loss: 0-d array (or Python float); logits: (..., vocab); targets: integer (...)
    -> grad_logits (..., vocab).
    """
    xp = array_namespace(logits, targets)
    kept, count = _kept_targets(logits, targets, ignore_index, "cross_entropy_backward")
    if isinstance(grad_loss, (int, float)):
        grad_loss = xp.asarray(grad_loss, dtype=logits.dtype, device=device_of(logits))
    _check_cotangent(grad_loss, (), logits.dtype, "cross_entropy_backward")
    vocab = logits.shape[-1]
    probs = softmax(logits, axis=-1)  # (..., vocab)
    classes = xp.arange(vocab, dtype=targets.dtype, device=device_of(targets))  # (vocab,)
    one_hot = targets[..., None] == classes  # (..., vocab)
    per_position = xp.where(one_hot, probs - 1.0, probs)  # (..., vocab)  p - onehot(t)
    weight = xp.where(kept, grad_loss / max(count, 1), 0.0)  # (...)  dloss/N, 0 if ignored
    return per_position * weight[..., None]  # (..., vocab)


def layer_norm(
    x: Array, weight: Array | None = None, bias: Array | None = None, eps: float = 1e-5
) -> Array:
    """LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last axis.

    Ba, Kiros & Hinton 2016. The variance is the biased one (divide by n), as in PyTorch.
    Rows are first divided by a power of two s >= 1 near their largest |x| (exact, so other
    rows are computed bit for bit as without it): LayerNorm(x) = (u - mean u) /
    sqrt(var u + eps / s^2), u = x / s, so |x| up to float max gives finite results where
    x^2 overflows. A row holding NaN or +-inf gives NaN.
    x: (..., d); weight, bias: (d,) -> (..., d).
    """
    xp = array_namespace(x)
    _require_float(x, "layer_norm input")
    native = _native(xp, "layer_norm")
    if native is not None and (y := native(x, weight, bias, eps)) is not NotImplemented:
        return y
    s = _row_scale(x)  # (..., 1)
    u = x / s  # (..., d)  exact: s is a power of two
    mean = xp.mean(u, axis=-1, keepdims=True)  # (..., 1)
    centered = u - mean  # (..., d)
    var = xp.mean(centered * centered, axis=-1, keepdims=True)  # (..., 1)
    scale = xp.sqrt(var + eps / s / s)  # (..., 1)  eps / s^2 may underflow to 0
    y = centered / xp.where(scale == 0, 1.0, scale)  # (..., d)  a constant row: 0 / 1 = 0
    if weight is not None:
        y = y * weight  # (..., d)
    if bias is not None:
        y = y + bias  # (..., d)
    return y


def _reciprocal_or_zero(a: Array) -> Array:
    """1 / a, and 0 where a == 0 (without dividing by zero)."""
    xp = array_namespace(a)
    safe = xp.where(a == 0, 1.0, a)  # (...)
    return xp.where(a == 0, 0.0, 1.0 / safe)  # (...)


def _sum_leading(a: Array) -> Array:
    """Sum over every axis but the last: (..., d) -> (d,)."""
    xp = array_namespace(a)
    return xp.sum(xp.reshape(a, (-1, a.shape[-1])), axis=0)  # (d,)


def layer_norm_backward(
    grad_y: Array, x: Array, weight: Array | None = None, eps: float = 1e-5
) -> tuple[Array, Array | None, Array]:
    """Gradients of :func:`layer_norm`, recomputing mean and rstd from x.

    With xhat = (x - mean) * rstd, rstd = 1/sqrt(var + eps), y = xhat * w + b, and
    g = dy * w the gradient reaching xhat (llm.c's doc/layernorm derivation):
    dxhat_i/dx_j = rstd * (delta_ij - 1/d - xhat_i xhat_j / d), so
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
        dw = sum over positions of dy * xhat,   db = sum over positions of dy.
    As in the forward, rows are first divided by a power of two s (u = x / s, exact), so
    squares never overflow: xhat = (u - mean u) / sqrt(var u + eps / s^2) and rstd is that
    1 / (s sqrt(...)). A constant row with eps = 0 (y = 0 by the forward's convention)
    gets dx = 0.
    grad_y, x: (..., d); weight: (d,) or None -> (grad_x (..., d), grad_weight (d,) or None
    when weight is None, grad_bias (d,)).
    """
    xp = array_namespace(grad_y, x)
    _require_float(x, "layer_norm_backward input")
    _check_cotangent(grad_y, x.shape, x.dtype, "layer_norm_backward")
    native = _native(xp, "layer_norm_backward")
    if native is not None and (grads := native(grad_y, x, weight, eps)) is not NotImplemented:
        return grads
    s = _row_scale(x)  # (..., 1)
    u = x / s  # (..., d)  exact: s is a power of two
    mean = xp.mean(u, axis=-1, keepdims=True)  # (..., 1)
    centered = u - mean  # (..., d)
    var = xp.mean(centered * centered, axis=-1, keepdims=True)  # (..., 1)
    inv_scale = _reciprocal_or_zero(xp.sqrt(var + eps / s / s))  # (..., 1)
    xhat = centered * inv_scale  # (..., d)
    rstd = inv_scale / s  # (..., 1)  1 / sqrt(var(x) + eps)
    g = grad_y if weight is None else grad_y * weight  # (..., d)  dL/dxhat
    g_mean = xp.mean(g, axis=-1, keepdims=True)  # (..., 1)
    g_xhat_mean = xp.mean(g * xhat, axis=-1, keepdims=True)  # (..., 1)
    grad_x = rstd * (g - g_mean - xhat * g_xhat_mean)  # (..., d)
    grad_weight = None if weight is None else _sum_leading(grad_y * xhat)  # (d,)
    grad_bias = _sum_leading(grad_y)  # (d,)
    return grad_x, grad_weight, grad_bias


def _row_scale(x: Array) -> Array:
    """A power of two s >= 1 per row (last axis) with max |x| / s < 4: dividing by it is
    exact and keeps the row's squares and sums from overflowing.  (..., d) -> (..., 1).
    (One below floor(log2 max|x|): log2 of the largest float32 rounds up to 128.)"""
    xp = array_namespace(x)
    largest = xp.max(xp.abs(x), axis=-1, keepdims=True)  # (..., 1)
    largest = xp.where(largest > 2.0, largest, 2.0)  # rows within [-2, 2] keep s = 1 (NaN stays)
    return 2.0 ** (xp.floor(xp.log2(largest)) - 1.0)  # (..., 1)


def rms_norm(x: Array, weight: Array | None = None, eps: float = 1e-6) -> Array:
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight, over the last axis.

    Zhang & Sennrich 2019: LayerNorm without the centring and the bias. Overflowing
    squares are avoided as in :func:`layer_norm`: u = x / s, y = u / sqrt(mean(u^2) +
    eps / s^2). A row holding NaN or +-inf gives NaN.
    x: (..., d); weight: (d,) -> (..., d).
    """
    xp = array_namespace(x)
    _require_float(x, "rms_norm input")
    s = _row_scale(x)  # (..., 1)
    u = x / s  # (..., d)  exact: s is a power of two
    mean_square = xp.mean(u * u, axis=-1, keepdims=True)  # (..., 1)
    scale = xp.sqrt(mean_square + eps / s / s)  # (..., 1)
    y = u / xp.where(scale == 0, 1.0, scale)  # (..., d)  a zero row (eps = 0): 0 / 1 = 0
    return y if weight is None else y * weight


def rms_norm_backward(
    grad_y: Array, x: Array, weight: Array | None = None, eps: float = 1e-6
) -> tuple[Array, Array | None]:
    """Gradients of :func:`rms_norm`, recomputing r = 1/sqrt(mean(x^2) + eps) from x.

    y = xhat * w with xhat = x * r. Since dr/dx_j = -r^3 x_j / d, with g = dy * w:
        dx = r * (g - xhat * mean(g * xhat)),   dw = sum over positions of dy * xhat.
    Computed on u = x / s as in the forward (s a power of two): xhat = u / sqrt(mean(u^2) +
    eps / s^2), r = that 1 / (s sqrt(...)). A zero row with eps = 0 gets dx = 0.
    grad_y, x: (..., d); weight: (d,) or None -> (grad_x (..., d), grad_weight (d,) or None).
    """
    xp = array_namespace(grad_y, x)
    _require_float(x, "rms_norm_backward input")
    _check_cotangent(grad_y, x.shape, x.dtype, "rms_norm_backward")
    s = _row_scale(x)  # (..., 1)
    u = x / s  # (..., d)  exact: s is a power of two
    mean_square = xp.mean(u * u, axis=-1, keepdims=True)  # (..., 1)
    inv_scale = _reciprocal_or_zero(xp.sqrt(mean_square + eps / s / s))  # (..., 1)
    xhat = u * inv_scale  # (..., d)
    r = inv_scale / s  # (..., 1)  1 / sqrt(mean(x^2) + eps)
    g = grad_y if weight is None else grad_y * weight  # (..., d)  dL/dxhat
    g_xhat_mean = xp.mean(g * xhat, axis=-1, keepdims=True)  # (..., 1)
    grad_x = r * (g - xhat * g_xhat_mean)  # (..., d)
    grad_weight = None if weight is None else _sum_leading(grad_y * xhat)  # (d,)
    return grad_x, grad_weight


def matmul(a: Array, b: Array) -> Array:
    """C = A B, the matrix product (over stacks): a (..., m, k), b (..., k, n) -> (..., m, n).

    ``xp.matmul``, or the backend's native: on NumPy one that decides by rule where the
    threads go (small products on one thread, stacks split over the thread pool), so a
    plugin's products never wake BLAS threads that then spin idle on the cores.
    """
    xp = array_namespace(a, b)
    native = _native(xp, "matmul")
    if native is not None and (c := native(a, b)) is not NotImplemented:
        return c
    return xp.matmul(a, b)  # (..., m, n)


def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """y = x W^T + b, PyTorch's layout.  x: (..., d_in); W: (d_out, d_in); b: (d_out,)."""
    xp = array_namespace(x, weight)
    native = _native(xp, "linear")
    if native is not None and (y := native(x, weight, bias)) is not NotImplemented:
        return y
    y = xp.matmul(x, xp.matrix_transpose(weight))  # (..., d_out)
    return y if bias is None else y + bias


def linear_backward(
    grad_y: Array, x: Array, weight: Array, bias: bool = True
) -> tuple[Array, Array, Array | None]:
    """Gradients of :func:`linear` y = x W^T + b.

    y_pi = sum_j x_pj W_ij + b_i for each position p, so
        dx = dy W,   dW = sum_p dy_p^T x_p = dy^T x (positions flattened),   db = sum_p dy_p.
    ``bias``: whether the forward had one (else grad_bias is None).
    grad_y: (..., d_out); x: (..., d_in); W: (d_out, d_in)
    -> (grad_x (..., d_in), grad_weight (d_out, d_in), grad_bias (d_out,) or None).
    """
    xp = array_namespace(grad_y, x, weight)
    d_out, d_in = weight.shape
    _check_cotangent(grad_y, (*x.shape[:-1], d_out), x.dtype, "linear_backward")
    native = _native(xp, "linear_backward")
    if native is not None and (grads := native(grad_y, x, weight, bias)) is not NotImplemented:
        return grads
    rows_dy = xp.reshape(grad_y, (-1, d_out))  # (n, d_out)
    rows_x = xp.reshape(x, (-1, d_in))  # (n, d_in)
    grad_x = xp.reshape(matmul(rows_dy, weight), (*x.shape[:-1], d_in))  # (..., d_in)
    grad_weight = matmul(xp.matrix_transpose(rows_dy), rows_x)  # (d_out, d_in)
    grad_bias = xp.sum(rows_dy, axis=0) if bias else None  # (d_out,)
    return grad_x, grad_weight, grad_bias


# --- embedding lookup ----------------------------------------------------------------


def _check_ids(ids: Array, num_embeddings: int, what: str) -> None:
    """Raise unless ids is an integer array with values in [0, num_embeddings)."""
    xp = array_namespace(ids)
    if not xp.isdtype(ids.dtype, "integral"):
        raise TypeError(f"{what}: expects integer token ids, got dtype {ids.dtype}")
    if math.prod(ids.shape) and (int(xp.min(ids)) < 0 or int(xp.max(ids)) >= num_embeddings):
        raise ValueError(
            f"{what}: token ids must lie in [0, {num_embeddings}), got values from "
            f"{int(xp.min(ids))} to {int(xp.max(ids))}"
        )


def embedding(table: Array, ids: Array) -> Array:
    """Embedding lookup: y[..., :] = table[ids[...], :], row ids[p] of the table for each p.

    table: (num_embeddings, d); ids: integer (...) in [0, num_embeddings) -> (..., d).
    """
    xp = array_namespace(table, ids)
    num_embeddings, d = table.shape
    _check_ids(ids, num_embeddings, "embedding")
    flat = xp.reshape(ids, (-1,))  # (n,)
    rows = xp.take(table, flat, axis=0)  # (n, d)
    return xp.reshape(rows, (*ids.shape, d))  # (..., d)


# One-hot blocks of the embedding backward hold at most this many elements.
_ONE_HOT_ELEMENTS = 1 << 22


def embedding_backward(grad_y: Array, ids: Array, num_embeddings: int) -> Array:
    """Gradient of :func:`embedding` with respect to the table: a scatter-add.

    y_p = table[ids_p], so row v of the table receives the sum of dy_p over every
    position p with ids_p = v (a token repeated in the batch adds up), and rows of unused
    ids get 0. The array API has no scatter-add, so the definition writes it as a product
    with the one-hot matrix, onehot(ids)^T dy, in blocks of vocabulary rows so that the
    one-hot block stays small; NumPy's native uses np.add.at.
    grad_y: (..., d); ids: integer (...) -> grad_table (num_embeddings, d).
    """
    xp = array_namespace(grad_y, ids)
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int):
        raise TypeError(
            f"embedding_backward: num_embeddings must be an int, got {num_embeddings!r}"
        )
    if num_embeddings < 1:
        raise ValueError(
            f"embedding_backward: num_embeddings must be a positive int, got {num_embeddings!r}"
        )
    _require_float(grad_y, "embedding_backward cotangent")
    _check_ids(ids, num_embeddings, "embedding_backward")
    d = grad_y.shape[-1] if grad_y.ndim else 0
    _check_cotangent(grad_y, (*ids.shape, d), grad_y.dtype, "embedding_backward")
    native = _native(xp, "embedding_backward")
    if native is not None and (out := native(grad_y, ids, num_embeddings)) is not NotImplemented:
        return out
    flat_ids = xp.reshape(ids, (-1,))  # (n,)
    rows = xp.reshape(grad_y, (-1, d))  # (n, d)
    block = max(1, _ONE_HOT_ELEMENTS // max(flat_ids.shape[0], 1))  # vocabulary rows per block
    pieces = []
    for start in range(0, num_embeddings, block):
        stop = min(start + block, num_embeddings)
        vocab_ids = xp.arange(start, stop, dtype=ids.dtype, device=device_of(ids))  # (c,)
        one_hot = xp.astype(flat_ids[:, None] == vocab_ids, grad_y.dtype)  # (n, c)
        pieces.append(xp.matmul(xp.matrix_transpose(one_hot), rows))  # (c, d)
    return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)  # (num_embeddings, d)


# --- attention -----------------------------------------------------------------------


def causal_mask(seq_q: int, seq_k: int, *, xp: Any, device: Any = None) -> Array:
    """Boolean (seq_q, seq_k) mask, True where query i may attend to key j.

    The queries are the *last* seq_q positions of the seq_k keys (with a key/value cache
    seq_k > seq_q), so query i sits at position i + (seq_k - seq_q) and sees keys j up to it.
    """
    allowed = xp.ones((seq_q, seq_k), dtype=xp.bool, device=device)  # (seq_q, seq_k)
    return xp.tril(allowed, k=seq_k - seq_q)  # (seq_q, seq_k)


def repeat_kv(x: Array, n_heads: int) -> Array:
    """Repeat key/value heads for grouped-query attention (Ainslie et al. 2023).

    Each of the heads_kv heads serves n_heads / heads_kv consecutive query heads.
    x: (batch, heads_kv, seq, d) -> (batch, n_heads, seq, d).
    """
    xp = array_namespace(x)
    batch, heads_kv, seq, d = x.shape
    if heads_kv == n_heads:
        return x
    if n_heads % heads_kv != 0:
        raise ValueError(
            f"grouped-query attention needs heads ({n_heads}) to be a multiple of "
            f"key/value heads ({heads_kv})"
        )
    group = n_heads // heads_kv
    x = xp.broadcast_to(x[:, :, None, ...], (batch, heads_kv, group, seq, d))  # (b, h_kv, g, s, d)
    return xp.reshape(x, (batch, n_heads, seq, d))  # (batch, heads, seq, d)


def repeat_kv_backward(grad: Array, n_kv_heads: int) -> Array:
    """Gradient of :func:`repeat_kv`: each key/value head sums the gradients of its group.

    repeat_kv copies head j to the query heads j*g ... j*g + g - 1 (g = heads / heads_kv);
    a copied input gets the sum of its copies' gradients: dx_j = sum_r dy_(j*g + r).
    grad: (batch, heads, seq, d) -> (batch, heads_kv, seq, d), heads_kv = n_kv_heads.
    """
    xp = array_namespace(grad)
    if grad.ndim != 4:
        raise ValueError(
            f"repeat_kv_backward: grad must be 4-D (batch, heads, seq, d), got {tuple(grad.shape)}"
        )
    batch, heads, seq, d = grad.shape
    if heads == n_kv_heads:
        return grad
    if n_kv_heads < 1 or heads % n_kv_heads != 0:
        raise ValueError(
            f"grouped-query attention needs heads ({heads}) to be a multiple of "
            f"key/value heads ({n_kv_heads})"
        )
    group = heads // n_kv_heads
    grouped = xp.reshape(grad, (batch, n_kv_heads, group, seq, d))  # (b, h_kv, g, s, d)
    return xp.sum(grouped, axis=2)  # (batch, heads_kv, seq, d)


def check_attention_inputs(q: Array, k: Array, v: Array, mask: Array | None) -> None:
    """Raise a clear error unless q, k, v (and mask) fit the attention contract.

    q: (batch, heads, seq_q, d); k: (batch, heads_kv, seq_k, d); v: (batch, heads_kv, seq_k, d_v);
    mask: boolean, broadcastable to (batch, heads, seq_q, seq_k).
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(
                f"attention: {name} must be 4-D (batch, heads, seq, d), got shape {tuple(a.shape)}"
            )
    xp = array_namespace(q, k, v)
    if not xp.isdtype(q.dtype, "real floating") or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    (b, h, _, d), (bk, hk, sk, dk), (bv, hv, sv, _) = q.shape, k.shape, v.shape
    if not (b == bk == bv) or dk != d or sv != sk or hv != hk or h % hk != 0:
        raise ValueError(
            "attention: expected q (batch, heads, seq_q, d), k (batch, heads_kv, seq_k, d), "
            "v (batch, heads_kv, seq_k, d_v) with heads a multiple of heads_kv; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if mask is not None:
        if mask.dtype != xp.bool:
            raise TypeError(f"attention: mask must be boolean (True = attend), got {mask.dtype}")
        target = (b, h, q.shape[2], sk)
        padded = (1,) * (4 - mask.ndim) + tuple(mask.shape)
        if mask.ndim > 4 or any(m not in (1, t) for m, t in zip(padded, target, strict=True)):
            raise ValueError(
                f"attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                f"(batch, heads, seq_q, seq_k) = {target}"
            )


def check_attention_scale(scale: Any) -> None:
    """Raise a clear error unless ``scale`` is None (1/sqrt(d)) or a finite number > 0."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"attention: scale must be a number > 0 (or None), got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: scale must be a finite number > 0 (or None), got {scale!r}")


def scaled_dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    *,
    return_weights: bool = True,
) -> tuple[Array, Array | None]:
    """Attention(Q, K, V) = softmax(Q K^T * scale) V (Vaswani et al. 2017, eq. 1).

    scale defaults to 1/sqrt(d). ``mask`` is boolean, True where attention is allowed,
    broadcastable to (batch, heads, seq_q, seq_k); ``causal=True`` also forbids attending
    to later positions. A query that may attend to nothing gets a zero output row and
    zero weights. Keys and values may have fewer heads than queries (grouped-query).
    ``return_weights=False`` gives None for the weights, and lets a native never store
    the (seq_q, seq_k) matrix (what inference wants: only the output is used).

    q: (batch, heads, seq_q, d); k: (batch, heads_kv, seq_k, d); v: (batch, heads_kv, seq_k, d_v)
    -> output (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k) or None.
    """
    check_attention_inputs(q, k, v, mask)
    check_attention_scale(scale)
    xp = array_namespace(q, k, v)
    native = _native(xp, "scaled_dot_product_attention")
    if native is not None:
        out = native(q, k, v, mask, causal, scale, keep_weights=return_weights)
        if out is not NotImplemented:
            return out
    heads, seq_q, d = q.shape[1], q.shape[2], q.shape[3]
    seq_k = k.shape[2]
    k = repeat_kv(k, heads)  # (batch, heads, seq_k, d)
    v = repeat_kv(v, heads)  # (batch, heads, seq_k, d_v)
    if scale is None:
        scale = 1.0 / math.sqrt(d)  # a Python float: keeps float32 float32
    # Scaling q (seq_q * d numbers) costs less than scaling the scores (seq_q * seq_k).
    scores = xp.matmul(q * scale, xp.matrix_transpose(k))  # (batch, heads, seq_q, seq_k)
    if causal:
        allowed = causal_mask(seq_q, seq_k, xp=xp, device=device_of(q))  # (seq_q, seq_k)
        mask = allowed if mask is None else xp.logical_and(mask, allowed)
    weights = softmax(scores, axis=-1, mask=mask)  # (batch, heads, seq_q, seq_k)
    output = xp.matmul(weights, v)  # (batch, heads, seq_q, d_v)
    return output, weights if return_weights else None


def scaled_dot_product_attention_backward(
    grad_out: Array,
    q: Array,
    k: Array,
    v: Array,
    weights: Array,
    scale: float | None = None,
) -> tuple[Array, Array, Array]:
    """Gradients of :func:`scaled_dot_product_attention` with respect to q, k and v.

    The forward is S = scale * Q K^T, W = softmax(S) (masked entries 0), O = W V. Going back:
        dV = W^T dO,   dW = dO V^T,
        dS = W * (dW - sum_j(dW * W))            (:func:`softmax_backward`, per row),
        dQ = scale * dS K,   dK = scale * dS^T Q.
    ``weights`` are the forward's returned weights: they are 0 wherever the mask (or
    causality) forbade attention, so dS is 0 there and no mask argument is needed; a fully
    masked query row gets zero gradients, never NaN. With grouped-query attention
    (heads_kv < heads) the gradients of the query heads sharing a key/value head are
    summed (:func:`repeat_kv_backward`). Cross-attention (seq_q != seq_k) is the same.
    grad_out: (batch, heads, seq_q, d_v); q: (batch, heads, seq_q, d);
    k: (batch, heads_kv, seq_k, d); v: (batch, heads_kv, seq_k, d_v);
    weights: (batch, heads, seq_q, seq_k) -> (dq, dk, dv) with the shapes of q, k, v.
    """
    check_attention_inputs(q, k, v, None)
    xp = array_namespace(grad_out, q, k, v, weights)
    batch, heads, seq_q, d = q.shape
    heads_kv, seq_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    what = "scaled_dot_product_attention_backward"
    if tuple(weights.shape) != (batch, heads, seq_q, seq_k) or weights.dtype != q.dtype:
        raise ValueError(
            f"{what}: weights must be the forward's (batch, heads, seq_q, seq_k) = "
            f"{(batch, heads, seq_q, seq_k)} of dtype {_dtype_name(q.dtype)}, got "
            f"{tuple(weights.shape)} of dtype {_dtype_name(weights.dtype)}"
        )
    _check_cotangent(grad_out, (batch, heads, seq_q, d_v), q.dtype, what)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    k_all = repeat_kv(k, heads)  # (batch, heads, seq_k, d)
    v_all = repeat_kv(v, heads)  # (batch, heads, seq_k, d_v)
    # matmul: xp.matmul, or the backend's native (a stack of small products on the pool)
    grad_v_all = matmul(xp.matrix_transpose(weights), grad_out)  # (batch, heads, seq_k, d_v)
    grad_weights = matmul(grad_out, xp.matrix_transpose(v_all))  # (batch, heads, seq_q, seq_k)
    grad_scores = softmax_backward(grad_weights, weights, axis=-1)  # (batch, heads, seq_q, seq_k)
    grad_q = matmul(grad_scores, k_all) * scale  # (batch, heads, seq_q, d)
    grad_k_all = matmul(xp.matrix_transpose(grad_scores), q) * scale  # (batch, heads, seq_k, d)
    grad_k = repeat_kv_backward(grad_k_all, heads_kv)  # (batch, heads_kv, seq_k, d)
    grad_v = repeat_kv_backward(grad_v_all, heads_kv)  # (batch, heads_kv, seq_k, d_v)
    return grad_q, grad_k, grad_v
