"""Pure functions on arrays: the arithmetic of a transformer.

Every function takes its array namespace from its inputs (``xp = array_namespace(x)``)
and uses only the Python array API standard, so the same code runs on NumPy, CuPy and
array-api-strict. What the standard lacks (softmax, erf) is written here, once. A backend
may offer a faster native version of such a function; :func:`_native` is the one place
where that choice is made.

Shapes use these names: ``batch``, ``heads`` (query heads), ``heads_kv`` (key/value heads,
fewer than ``heads`` for grouped-query attention), ``seq_q`` and ``seq_k`` (query and key
lengths), ``d`` (per-head width), ``d_v`` (per-head value width).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

Array = Any

__all__ = [
    "causal_mask",
    "erf",
    "gelu",
    "layer_norm",
    "linear",
    "relu",
    "repeat_kv",
    "rms_norm",
    "scaled_dot_product_attention",
    "softmax",
]


def _native(xp: Any, name: str) -> Any:
    """The backend's own version of ``name`` for namespace ``xp``, or None (see backends).

    A native computes the same numbers as the definition below it, only faster; it may
    return ``NotImplemented`` for an input it does not cover, and the definition runs.
    """
    from tinytx.backends import native_function

    return native_function(xp, name)


def _require_float(x: Array, what: str) -> None:
    xp = array_namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{what} must be a real floating-point array, got dtype {x.dtype}")


# --- activations ---------------------------------------------------------------------


def relu(x: Array) -> Array:
    """ReLU(x) = max(x, 0), elementwise.  x: any shape -> same shape."""
    xp = array_namespace(x)
    native = _native(xp, "relu")
    if native is not None and (y := native(x)) is not NotImplemented:
        return y
    return xp.maximum(x, xp.zeros_like(x))  # (...)


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
    x: any shape -> same shape.
    """
    xp = array_namespace(x)
    _require_float(x, "gelu input")
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)  # (...)
        return 0.5 * x * (1.0 + xp.tanh(inner))
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    native_gelu = _native(xp, "gelu")
    if native_gelu is not None and (y := native_gelu(x)) is not NotImplemented:
        return y
    native = _native(xp, "erf")
    if native is not None:
        return 0.5 * x * (1.0 + native(x * (1.0 / math.sqrt(2.0))))
    size = xp.abs(x)  # (...)  |x|
    tail = _erfc_nonneg(size * (1.0 / math.sqrt(2.0)))  # (...)  erfc(|x|/sqrt 2) = 2 Phi(-|x|)
    return xp.maximum(x, xp.zeros_like(x)) - 0.5 * size * tail  # (...)


# --- softmax and norms ---------------------------------------------------------------


def softmax(x: Array, axis: int = -1, *, mask: Array | None = None) -> Array:
    """softmax(x)_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x)) along ``axis``.

    Subtracting the row maximum keeps exp() from overflowing, so logits of +-1e4 are fine.
    ``mask`` (boolean, True = keep, broadcastable to x) sets the other entries to zero
    weight. A row with nothing kept (all masked, or all -inf) gives zeros, never NaN.
    x: any shape -> same shape.
    """
    xp = array_namespace(x)
    _require_float(x, "softmax input")
    native = _native(xp, "softmax")
    if native is not None and (y := native(x, axis, mask=mask)) is not NotImplemented:
        return y
    if mask is not None:
        x = xp.where(mask, x, -xp.inf)  # (...)
    row_max = xp.max(x, axis=axis, keepdims=True)  # (..., 1, ...)
    row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)  # an all -inf row has max -inf
    e = xp.exp(x - row_max)  # (...)  exactly 0 where x is -inf
    total = xp.sum(e, axis=axis, keepdims=True)  # (..., 1, ...)
    total = xp.where(total > 0, total, 1.0)  # all-masked row: 0 / 1 = 0
    return e / total


def layer_norm(
    x: Array, weight: Array | None = None, bias: Array | None = None, eps: float = 1e-5
) -> Array:
    """LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last axis.

    Ba, Kiros & Hinton 2016. The variance is the biased one (divide by n), as in PyTorch.
    x: (..., d); weight, bias: (d,) -> (..., d).
    """
    xp = array_namespace(x)
    _require_float(x, "layer_norm input")
    native = _native(xp, "layer_norm")
    if native is not None and (y := native(x, weight, bias, eps)) is not NotImplemented:
        return y
    mean = xp.mean(x, axis=-1, keepdims=True)  # (..., 1)
    centered = x - mean  # (..., d)
    var = xp.mean(centered * centered, axis=-1, keepdims=True)  # (..., 1)
    y = centered / xp.sqrt(var + eps)  # (..., d)
    if weight is not None:
        y = y * weight  # (..., d)
    if bias is not None:
        y = y + bias  # (..., d)
    return y


def rms_norm(x: Array, weight: Array | None = None, eps: float = 1e-6) -> Array:
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight, over the last axis.

    Zhang & Sennrich 2019: LayerNorm without the centring and the bias.
    x: (..., d); weight: (d,) -> (..., d).
    """
    xp = array_namespace(x)
    _require_float(x, "rms_norm input")
    mean_square = xp.mean(x * x, axis=-1, keepdims=True)  # (..., 1)
    y = x / xp.sqrt(mean_square + eps)  # (..., d)
    return y if weight is None else y * weight


def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """y = x W^T + b, PyTorch's layout.  x: (..., d_in); W: (d_out, d_in); b: (d_out,)."""
    xp = array_namespace(x, weight)
    native = _native(xp, "linear")
    if native is not None and (y := native(x, weight, bias)) is not NotImplemented:
        return y
    y = xp.matmul(x, xp.matrix_transpose(weight))  # (..., d_out)
    return y if bias is None else y + bias


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


def scaled_dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """Attention(Q, K, V) = softmax(Q K^T * scale) V (Vaswani et al. 2017, eq. 1).

    scale defaults to 1/sqrt(d). ``mask`` is boolean, True where attention is allowed,
    broadcastable to (batch, heads, seq_q, seq_k); ``causal=True`` also forbids attending
    to later positions. A query that may attend to nothing gets a zero output row and
    zero weights. Keys and values may have fewer heads than queries (grouped-query).

    q: (batch, heads, seq_q, d); k: (batch, heads_kv, seq_k, d); v: (batch, heads_kv, seq_k, d_v)
    -> output (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    check_attention_inputs(q, k, v, mask)
    xp = array_namespace(q, k, v)
    native = _native(xp, "scaled_dot_product_attention")
    if native is not None and (out := native(q, k, v, mask, causal, scale)) is not NotImplemented:
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
    return output, weights
