"""``softmax``: the reference scaled dot-product attention (Vaswani et al. 2017).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

Every other variant is compared with this one. The arithmetic lives in
:func:`tinytx.functional.scaled_dot_product_attention`; this module only registers it.
"""

from __future__ import annotations

from typing import Any

from tinytx.functional import scaled_dot_product_attention
from tinytx.plugins.registry import register_attention


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
)
def softmax_attention(
    q: Any, k: Any, v: Any, *, mask: Any = None, causal: bool = False, scale: float | None = None
) -> tuple[Any, Any]:
    """softmax(Q K^T * scale) V.  q: (b, h, s_q, d); k, v: (b, h_kv, s_k, d) -> (b, h, s_q, d_v)."""
    return scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)
