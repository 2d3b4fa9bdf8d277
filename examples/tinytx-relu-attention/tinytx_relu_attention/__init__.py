"""``relu``: ReLU attention, softmax replaced by relu and a division by the length.

Wortsman et al. 2023, "Replacing softmax with ReLU in Vision Transformers"
(arXiv:2309.08586):

    O = relu(Q K^T * scale) V / n

with n the number of keys a query may attend to (seq_k without a mask; we count it from
the mask so that padding does not change the real tokens' outputs). The rows do not sum
to 1, so it does not promise ``normalized``; it honours masks and causal=True.

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


@register_attention(
    "relu",
    description="ReLU attention: relu(scores) / n instead of softmax (example plugin package)",
    paper="Wortsman et al. 2023, Replacing softmax with ReLU in Vision Transformers "
    "(arXiv:2309.08586)",
    permutation_equivariant=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
)
def relu_attention(
    q: Any, k: Any, v: Any, *, mask: Any = None, causal: bool = False, scale: float | None = None
) -> tuple[Any, Any]:
    """relu(Q K^T * scale) / n, then times V.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    xp = array_namespace(q, k, v)
    seq_q, seq_k = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    scores = xp.matmul(q * scale, xp.matrix_transpose(k))  # (batch, heads, seq_q, seq_k)
    allowed = mask
    if causal:
        before = causal_mask(seq_q, seq_k, xp=xp, device=device_of(q))  # (seq_q, seq_k)
        allowed = before if allowed is None else xp.logical_and(allowed, before)
    positive = xp.maximum(scores, 0.0)  # (batch, heads, seq_q, seq_k)
    if allowed is None:
        weights = positive / float(seq_k)
    else:
        n = xp.sum(xp.astype(allowed, q.dtype), axis=-1, keepdims=True)  # (.., seq_q, 1)
        weights = xp.where(allowed, positive, 0.0) / xp.maximum(n, 1.0)  # (b, h, seq_q, seq_k)
    return xp.matmul(weights, v), weights  # (batch, heads, seq_q, d_v)
