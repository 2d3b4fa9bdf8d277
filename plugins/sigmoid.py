"""``sigmoid``: sigmoid attention, each weight squashed on its own (no softmax).

Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention"
(arXiv:2409.04431):

    O = sigmoid(Q K^T * scale + b) V,    b = -log(n)

with n the number of keys a query may attend to (seq_k without a mask). The bias keeps
the total weight of a row near 1 at the start of training, as softmax's would be, but
nothing forces the rows to sum to 1: this variant is **not normalized** and declares so.
Each weight depends on its own score only, so there is no row-wise reduction (which is
what makes it fast on accelerators). Masked keys get weight 0. We count n per query from
the mask (and the causal flag), so padding a sequence leaves its real rows unchanged.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx.backends import native_function
from tinytx.functional import causal_mask, matmul
from tinytx.plugins.registry import register_attention

Array = Any


def sigmoid(x: Array) -> Array:
    """sigmoid(x) = 1 / (1 + exp(-x)) = (1 + tanh(x / 2)) / 2.

    The tanh form never overflows (exp(-x) would at x = -1e4) and takes few passes.
    """
    xp = array_namespace(x)
    t = xp.tanh(0.5 * x)  # (...) in [-1, 1]
    t *= 0.5  # in place: no further temporary
    t += 0.5
    return t  # (...) in [0, 1]


def sigmoid_attention_backward(
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
    """The backward of :func:`sigmoid_attention` (defined first: the registration names it).

    With W = sigmoid(S + b) (0 where masked), S = Q K^T * scale, O = W V and G = dL/dO:

        dV = W^T G                         (batch, heads, seq_k, d_v)
        dW = G V^T                         (batch, heads, seq_q, seq_k)
        dS = dW * W * (1 - W)              sigmoid' = sigmoid (1 - sigmoid); 0 where masked
        dQ = dS K * scale,  dK = dS^T Q * scale

    Each weight depends on its own score only, so there is no row-wise term (softmax's
    backward subtracts one). The bias -log n does not depend on q or k.
    grad_out, out: (batch, heads, seq_q, d_v); weights: (batch, heads, seq_q, seq_k)
    -> dq (batch, heads, seq_q, d), dk (batch, heads, seq_k, d), dv (batch, heads, seq_k, d_v).
    """
    xp = array_namespace(grad_out, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    dv = xp.matmul(xp.matrix_transpose(weights), grad_out)  # (batch, heads, seq_k, d_v)
    d_weights = xp.matmul(grad_out, xp.matrix_transpose(v))  # (batch, heads, seq_q, seq_k)
    d_scores = d_weights * weights * (1.0 - weights)  # (batch, heads, seq_q, seq_k)
    dq = xp.matmul(d_scores, k) * scale  # (batch, heads, seq_q, d)
    dk = xp.matmul(xp.matrix_transpose(d_scores), q) * scale  # (batch, heads, seq_k, d)
    return dq, dk, dv


@register_attention(
    "sigmoid",
    description="Sigmoid attention with bias -log(n); rows do not sum to 1",
    paper="Ramapuram et al. 2024, Theory, Analysis, and Best Practices for Sigmoid "
    "Self-Attention (arXiv:2409.04431)",
    permutation_equivariant=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
    backward=sigmoid_attention_backward,
)
def sigmoid_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """sigmoid(Q K^T * scale - log n) V, masked weights set to 0.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    xp = array_namespace(q, k, v)
    seq_q, d, seq_k = q.shape[2], q.shape[3], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    native = native_function(xp, "sigmoid_attention")  # NumPy, no mask: tiles on the pool
    if native is not None and (out := native(q, k, v, mask, causal, scale)) is not NotImplemented:
        return out
    scores = matmul(q * scale, xp.matrix_transpose(k))  # (batch, heads, seq_q, seq_k)
    allowed = mask
    if causal:
        before = causal_mask(seq_q, seq_k, xp=xp, device=device_of(q))  # (seq_q, seq_k)
        allowed = before if allowed is None else xp.logical_and(allowed, before)
    if allowed is None:
        scores -= math.log(seq_k)  # in place: the bias -log n, n = seq_k for every query
        return _weighted(sigmoid(scores), v)
    n = xp.sum(xp.astype(allowed, scores.dtype), axis=-1, keepdims=True)  # (.., seq_q, 1)
    bias = -xp.log(xp.maximum(n, 1.0))  # (.., seq_q, 1)
    weights = xp.where(allowed, sigmoid(scores + bias), 0.0)  # (b, h, seq_q, seq_k)
    return _weighted(weights, v)


def _weighted(weights: Array, v: Array) -> tuple[Array, Array]:
    """(weights V, weights).  weights: (b, h, seq_q, seq_k); v: (b, h, seq_k, d_v)."""
    return matmul(weights, v), weights  # (batch, heads, seq_q, d_v)
