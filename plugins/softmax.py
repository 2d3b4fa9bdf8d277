"""``softmax``: the reference scaled dot-product attention (Vaswani et al. 2017).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

Every other variant is compared with this one. The arithmetic lives in
:func:`tinytx.functional.scaled_dot_product_attention`; this module only registers it.
"""

from __future__ import annotations

from typing import Any

from tinytx.functional import scaled_dot_product_attention, scaled_dot_product_attention_backward
from tinytx.plugins.registry import register_attention


def softmax_attention_backward(
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
    """dQ, dK, dV of softmax attention (defined first: the registration names it).

    With W the forward's weights (0 where masked), S = Q K^T * scale, G = dL/dO:
        dV = W^T G,  dW = G V^T,  dS = W * (dW - rowsum(dW * W)),
        dQ = dS K * scale,  dK = dS^T Q * scale.
    The weights carry the mask (and causality), so neither is needed here; the
    arithmetic is :func:`tinytx.functional.scaled_dot_product_attention_backward`.
    grad_out: (b, h, s_q, d_v); q: (b, h, s_q, d); k, v: (b, h, s_k, d / d_v);
    weights: (b, h, s_q, s_k) -> dq, dk, dv of q's, k's and v's shapes.
    """
    return scaled_dot_product_attention_backward(grad_out, q, k, v, weights, scale=scale)


@register_attention(
    "softmax",
    description="Scaled dot-product attention, the reference",
    paper="Vaswani et al. 2017, Attention Is All You Need (arXiv:1706.03762)",
    normalized=True,
    permutation_equivariant=True,
    exact=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
    backward=softmax_attention_backward,
)
def softmax_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = True,
) -> tuple[Any, Any]:
    """softmax(Q K^T * scale) V.  q: (b, h, s_q, d); k, v: (b, h_kv, s_k, d) -> (b, h, s_q, d_v),
    and the weights (b, h, s_q, s_k), or None with ``return_weights=False``."""
    return scaled_dot_product_attention(
        q, k, v, mask=mask, causal=causal, scale=scale, return_weights=return_weights
    )
