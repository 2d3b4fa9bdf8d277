"""``relu``: ReLU attention, softmax replaced by relu and a division by the length.

Wortsman et al. 2023, "Replacing softmax with ReLU in Vision Transformers"
(arXiv:2309.08586):

    O = relu(Q K^T * scale) V / n

with n the number of keys a query may attend to (seq_k without a mask; we count it from
the mask so that padding does not change the real tokens' outputs). The rows do not sum
to 1, so it does not promise ``normalized``; it honours masks and causal=True.

It also registers its backward (``register_attention(..., backward=...)``), so models
can learn through it and the kit checks it against finite differences: with
W = relu(S) / n and G = dL/dO, dV = W^T G and dS = (G V^T) * [S > 0] / n.

An example of a third-party plugin: this package declares the entry point
``relu = tinytx_relu_attention`` in the group ``tinytx.attention`` (setup.cfg).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx.functional import causal_mask
from tinytx.plugins import register_attention

__version__ = "0.1.0"


def _allowed_and_count(q: Any, k: Any, mask: Any, causal: bool) -> tuple[Any, Any]:
    """(which keys each query may see, how many): boolean broadcastable to
    (batch, heads, seq_q, seq_k) or None (all), and n (.., seq_q, 1) or seq_k."""
    xp = array_namespace(q, k)
    seq_q, seq_k = q.shape[2], k.shape[2]
    allowed = mask
    if causal:
        before = causal_mask(seq_q, seq_k, xp=xp, device=device_of(q))  # (seq_q, seq_k)
        allowed = before if allowed is None else xp.logical_and(allowed, before)
    if allowed is None:
        return None, float(seq_k)
    n = xp.sum(xp.astype(allowed, q.dtype), axis=-1, keepdims=True)  # (.., seq_q, 1)
    return allowed, xp.maximum(n, 1.0)


def relu_attention_backward(
    grad_out: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    weights: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[Any, Any, Any]:
    """dQ, dK, dV of ReLU attention (defined before the forward: the registration names it).

    W = relu(S) / n (0 where masked), S = Q K^T * scale, O = W V, G = dL/dO:
        dV = W^T G,   dW = G V^T,   dS = dW * [S > 0] / n   ([S > 0] is where W > 0)
        dQ = dS K * scale,   dK = dS^T Q * scale
    grad_out: (batch, heads, seq_q, d_v); weights: (batch, heads, seq_q, seq_k)
    -> dq, dk, dv of q's, k's and v's shapes.
    """
    xp = array_namespace(grad_out, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    _, n = _allowed_and_count(q, k, mask, causal)  # n: (.., seq_q, 1) or seq_k
    dv = xp.matmul(xp.matrix_transpose(weights), grad_out)  # (batch, heads, seq_k, d_v)
    d_weights = xp.matmul(grad_out, xp.matrix_transpose(v))  # (batch, heads, seq_q, seq_k)
    d_scores = xp.where(weights > 0, d_weights, 0.0) / n  # (batch, heads, seq_q, seq_k)
    dq = xp.matmul(d_scores, k) * scale  # (batch, heads, seq_q, d)
    dk = xp.matmul(xp.matrix_transpose(d_scores), q) * scale  # (batch, heads, seq_k, d)
    return dq, dk, dv


@register_attention(
    "relu",
    description="ReLU attention: relu(scores) / n instead of softmax (example plugin package)",
    paper="Wortsman et al. 2023, Replacing softmax with ReLU in Vision Transformers "
    "(arXiv:2309.08586)",
    permutation_equivariant=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
    backward=relu_attention_backward,
)
def relu_attention(
    q: Any, k: Any, v: Any, *, mask: Any = None, causal: bool = False, scale: float | None = None
) -> tuple[Any, Any]:
    """relu(Q K^T * scale) / n, then times V.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    xp = array_namespace(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    scores = xp.matmul(q * scale, xp.matrix_transpose(k))  # (batch, heads, seq_q, seq_k)
    allowed, n = _allowed_and_count(q, k, mask, causal)  # n: (.., seq_q, 1) or seq_k
    positive = xp.maximum(scores, 0.0)  # (batch, heads, seq_q, seq_k)
    if allowed is not None:
        positive = xp.where(allowed, positive, 0.0)  # (batch, heads, seq_q, seq_k)
    weights = positive / n  # (batch, heads, seq_q, seq_k)
    return xp.matmul(weights, v), weights  # (batch, heads, seq_q, d_v)
