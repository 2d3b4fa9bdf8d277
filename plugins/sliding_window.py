"""``sliding_window``: local attention, each query sees only keys within a window.

Beltagy et al. 2020 (Longformer), bidirectional; Jiang et al. 2023 (Mistral 7B), causal.
Softmax attention restricted to a band around the diagonal: with query i at position
p_i and key j at position j,

    bidirectional:  allowed(i, j) = |p_i - j| < window
    causal:         allowed(i, j) = 0 <= p_i - j < window    (the window most recent keys)

    O = softmax(where(allowed, Q K^T * scale, -inf)) V

Stacking L such layers lets information travel L * (window - 1) positions. This module
computes the full score matrix and masks it, so it is O(seq^2) like softmax but shows
the band in ``tinytx demo --attention sliding_window``; a memory-saving version would
skip the blocks outside the band, as :mod:`~tinytx.plugins.blockwise` skips them for
causal attention.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx.functional import scaled_dot_product_attention
from tinytx.plugins.registry import Option, register_attention

Array = Any


def band_mask(seq_q: int, seq_k: int, window: int, causal: bool, *, xp: Any, device: Any) -> Array:
    """Boolean (seq_q, seq_k): True where query i may see key j (queries are the last
    seq_q of the seq_k positions, as in :func:`tinytx.functional.causal_mask`)."""
    q_pos = xp.arange(seq_k - seq_q, seq_k, device=device)  # (seq_q,)
    k_pos = xp.arange(seq_k, device=device)  # (seq_k,)
    distance = q_pos[:, None] - k_pos[None, :]  # (seq_q, seq_k)  p_i - j
    if causal:
        return xp.logical_and(distance >= 0, distance < window)  # (seq_q, seq_k)
    return xp.abs(distance) < window  # (seq_q, seq_k)


@register_attention(
    "sliding_window",
    description="Softmax attention within a window of nearby positions (local attention)",
    paper="Beltagy et al. 2020, Longformer (arXiv:2004.05150); Jiang et al. 2023, "
    "Mistral 7B (arXiv:2310.06825)",
    normalized=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
    options={
        "window": Option(
            int, 4, "keys within this distance (exclusive)", check=lambda w: w > 0, rule=">= 1"
        )
    },
)
def sliding_window_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int = 4,
) -> tuple[Array, Array]:
    """softmax attention with keys outside the window masked out.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    xp = array_namespace(q, k, v)
    band = band_mask(q.shape[2], k.shape[2], window, causal, xp=xp, device=device_of(q))
    allowed = band if mask is None else xp.logical_and(mask, band)  # (.., seq_q, seq_k)
    return scaled_dot_product_attention(q, k, v, mask=allowed, scale=scale)
