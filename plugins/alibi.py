"""``alibi``: attention with linear biases, no position embeddings (ALiBi).

Press, Smith & Lewis 2022, "Train Short, Test Long" (arXiv:2108.12409), section 3.
Each head h adds a penalty proportional to the distance between query and key:

    O = softmax(Q K^T * scale - m_h * |p_i - j|) V

(causal: only keys j <= p_i, so the penalty is m_h * (p_i - j), the paper's form;
bidirectional: |p_i - j| on both sides). The slopes are a geometric sequence fixed
before training: for n heads (a power of 2), m_h = 2^(-8 (h + 1) / n), h = 0..n-1, so
with 8 heads 1/2, 1/4, ..., 1/256: some heads look far, some only nearby. For other n,
take the slopes of the nearest power of two below and fill up with every other slope of
twice that number (the paper's recipe).

Because the bias depends only on p_i - j, ALiBi extrapolates to sequences longer than
those seen in training. It is not permutation-equivariant (that is the point).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx.backends import native_function
from tinytx.functional import (
    causal_mask,
    matmul,
    scaled_dot_product_attention_backward,
    softmax,
)
from tinytx.plugins.registry import register_attention

Array = Any


def alibi_slopes(n_heads: int) -> list[float]:
    """The ALiBi slope m_h of each of ``n_heads`` heads (Python floats)."""
    if n_heads & (n_heads - 1) == 0:  # a power of two: 2^(-8/n), 2^(-16/n), ...
        return [2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)]
    lower = 2 ** math.floor(math.log2(n_heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: n_heads - lower]


def alibi_attention_backward(
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
) -> tuple[Array, Array, Array]:
    """The backward of :func:`alibi_attention` (defined first: the registration names it).

    The bias -m_h |p_i - j| is a constant: d(score)/dQ and d(score)/dK are those of
    Q K^T * scale alone, so softmax attention's backward applies to ALiBi's weights W
    (0 where masked): dS = W * (dW - rowsum(dW * W)) with dW = G V^T, dV = W^T G,
    dQ = dS K * scale, dK = dS^T Q * scale.
    grad_out: (b, h, s_q, d_v); weights: (b, h, s_q, s_k) -> dq, dk, dv of q's, k's, v's shapes.
    """
    return scaled_dot_product_attention_backward(grad_out, q, k, v, weights, scale=scale)


@register_attention(
    "alibi",
    description="Softmax attention minus a head-specific linear distance penalty",
    paper="Press, Smith & Lewis 2022, Train Short, Test Long: Attention with Linear "
    "Biases (arXiv:2108.12409)",
    normalized=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
    backward=alibi_attention_backward,
)
def alibi_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """softmax(Q K^T * scale - m_h |p_i - j|) V.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    xp = array_namespace(q, k, v)
    dev = device_of(q)
    heads, seq_q, d = q.shape[1], q.shape[2], q.shape[3]
    seq_k = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    native = native_function(xp, "alibi_attention")  # NumPy: tiles with the penalty per tile
    if native is not None:
        out = native(q, k, v, alibi_slopes(heads), mask, causal, scale)
        if out is not NotImplemented:
            return out
    slopes = xp.asarray(alibi_slopes(heads), dtype=q.dtype, device=dev)  # (heads,)
    q_pos = xp.arange(seq_k - seq_q, seq_k, dtype=q.dtype, device=dev)  # (seq_q,) query positions
    k_pos = xp.arange(seq_k, dtype=q.dtype, device=dev)  # (seq_k,)
    distance = xp.abs(q_pos[:, None] - k_pos[None, :])  # (seq_q, seq_k)
    bias = -slopes[:, None, None] * distance  # (heads, seq_q, seq_k)
    scores = matmul(q * scale, xp.matrix_transpose(k))  # (batch, heads, seq_q, seq_k)
    scores += bias  # in place (broadcast over batch): no second score-sized array
    if causal:
        allowed = causal_mask(seq_q, seq_k, xp=xp, device=dev)  # (seq_q, seq_k)
        mask = allowed if mask is None else xp.logical_and(mask, allowed)
    weights = softmax(scores, axis=-1, mask=mask)  # (batch, heads, seq_q, seq_k)
    return matmul(weights, v), weights  # (batch, heads, seq_q, d_v)
