"""``cosine``: cosine-similarity (QK-norm) attention with a fixed temperature.

Henry et al. 2020, "Query-Key Normalization for Transformers" (arXiv:2010.04245);
Liu et al. 2022, Swin Transformer V2 (arXiv:2111.09883), which uses the same form:

    O = softmax(tau * cos(Q_i, K_j)) V,    cos(q, k) = q . k / (|q| |k|)

Queries and keys are L2-normalized per head, so every score lies in [-tau, tau]: no
single large dot product can saturate the softmax, whatever the scale of q and k.
The temperature tau (in the papers a learned scalar) sets how peaked the weights can
get; ``scale``, when given, is used as tau.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from tinytx.functional import scaled_dot_product_attention, scaled_dot_product_attention_backward
from tinytx.plugins.registry import Option, register_attention

Array = Any


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    """x / max(|x|, eps) over the last axis (a zero vector stays zero).  (..., d) -> (..., d)."""
    xp = array_namespace(x)
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))  # (..., 1)
    return x / xp.maximum(norm, eps)  # (..., d)


def l2_normalize_backward(grad_y: Array, x: Array, eps: float = 1e-6) -> Array:
    """The backward of :func:`l2_normalize`: with y = x / |x| (|x| > eps),

        dx = (dy - y * sum(dy * y)) / |x|       (the part of dy along y is removed)

    and dx = dy / eps where |x| <= eps (there y = x / eps is linear in x).
    grad_y, x: (..., d) -> (..., d).
    """
    xp = array_namespace(grad_y, x)
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))  # (..., 1)
    large = norm > eps  # (..., 1)
    safe = xp.where(large, norm, eps)  # (..., 1)
    y = x / safe  # (..., d)
    along = xp.where(large, xp.sum(grad_y * y, axis=-1, keepdims=True), 0.0)  # (..., 1)
    return (grad_y - y * along) / safe  # (..., d)


def cosine_attention_backward(
    grad_out: Array,
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    weights: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    temperature: float = 10.0,
) -> tuple[Array, Array, Array]:
    """The backward of :func:`cosine_attention` (defined first: the registration names it).

    Softmax attention's backward on the normalized Q^, K^ with scale tau gives dQ^, dK^
    and dV; then back through the normalization (:func:`l2_normalize_backward`):
        dQ = (dQ^ - Q^ rowsum(dQ^ * Q^)) / |Q|,   dK likewise.
    grad_out: (b, h, s_q, d_v); weights: (b, h, s_q, s_k) -> dq, dk, dv of q's, k's, v's shapes.
    """
    tau = temperature if scale is None else scale
    q_hat = l2_normalize(q)  # (batch, heads, seq_q, d)
    k_hat = l2_normalize(k)  # (batch, heads, seq_k, d)
    dq_hat, dk_hat, dv = scaled_dot_product_attention_backward(
        grad_out, q_hat, k_hat, v, weights, scale=tau
    )  # (b, h, seq_q, d), (b, h, seq_k, d), (b, h, seq_k, d_v)
    return l2_normalize_backward(dq_hat, q), l2_normalize_backward(dk_hat, k), dv


@register_attention(
    "cosine",
    description="Softmax over tau * cosine(q, k): QK-norm attention, scores bounded by tau",
    paper="Henry et al. 2020, Query-Key Normalization for Transformers (arXiv:2010.04245); "
    "Liu et al. 2022, Swin Transformer V2 (arXiv:2111.09883)",
    normalized=True,
    permutation_equivariant=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
    options={
        "temperature": Option(
            float, 10.0, "tau, the largest possible score", check=lambda t: t > 0, rule="> 0"
        )
    },
    backward=cosine_attention_backward,
)
def cosine_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    temperature: float = 10.0,
) -> tuple[Array, Array]:
    """softmax(tau * normalize(Q) normalize(K)^T) V.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    tau = temperature if scale is None else scale
    q_hat = l2_normalize(q)  # (batch, heads, seq_q, d), unit rows
    k_hat = l2_normalize(k)  # (batch, heads, seq_k, d), unit rows
    return scaled_dot_product_attention(q_hat, k_hat, v, mask=mask, causal=causal, scale=tau)
