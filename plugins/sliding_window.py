"""``sliding_window``: local attention, each query sees only keys within a window.

Beltagy et al. 2020 (Longformer), bidirectional; Jiang et al. 2023 (Mistral 7B), causal.
Softmax attention restricted to a band around the diagonal: with query i at position
p_i and key j at position j,

    bidirectional:  allowed(i, j) = |p_i - j| < window
    causal:         allowed(i, j) = 0 <= p_i - j < window    (the window most recent keys)

    O = softmax(where(allowed, Q K^T * scale, -inf)) V

Stacking L such layers lets information travel L * (window - 1) positions. When the
band is narrow against the sequence, the queries are taken a block of rows at a time
and each block is multiplied only with the keys its band reaches, so the time grows as
O(seq * window), not O(seq^2) (the weights are still returned, zero outside the band;
``tinytx demo --attention sliding_window`` shows it). Otherwise the full score matrix is
computed and masked, the definition as written above.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx.functional import scaled_dot_product_attention, scaled_dot_product_attention_backward
from tinytx.plugins.registry import Option, register_attention

Array = Any


def band_mask(seq_q: int, seq_k: int, window: int, causal: bool, *, xp: Any, device: Any) -> Array:
    """Boolean (seq_q, seq_k): True where query i may see key j (queries are the last
    seq_q of the seq_k positions, as in :func:`tinytx.functional.causal_mask`)."""
    return _band(seq_k - seq_q, seq_k, 0, seq_k, window, causal, xp=xp, device=device)


def _band(
    p0: int, p1: int, k0: int, k1: int, window: int, causal: bool, *, xp: Any, device: Any
) -> Array:
    """Boolean (p1 - p0, k1 - k0): the band for queries at positions p0..p1-1 and keys
    k0..k1-1 (True where the query may see the key)."""
    q_pos = xp.arange(p0, p1, device=device)  # (rows,)
    k_pos = xp.arange(k0, k1, device=device)  # (keys,)
    distance = q_pos[:, None] - k_pos[None, :]  # (rows, keys)  p_i - j
    if causal:
        return xp.logical_and(distance >= 0, distance < window)  # (rows, keys)
    return xp.abs(distance) < window  # (rows, keys)


def _mask_tile(mask: Array, rows: slice, cols: slice) -> Array:
    """mask[..., rows, cols], keeping a broadcast (size 1) axis as it is."""
    if mask.ndim < 2:  # (seq_k,) or a scalar: the same for every query row
        mask = mask[None, ...] if mask.ndim == 1 else mask[None, None]  # (1, seq_k or 1)
    rows = slice(None) if mask.shape[-2] == 1 else rows
    cols = slice(None) if mask.shape[-1] == 1 else cols
    return mask[..., rows, cols]  # (.., rows or 1, cols or 1)


def rows_per_block(window: int) -> int:
    """Query rows per block of the banded computation: 4 x window, at least 64.

    A block of r rows is multiplied with the r + 2 window - 1 keys its band reaches, so
    about r / (2 window) of the scores computed lie outside the band: with r = 4 window,
    3x the band's work, in blocks large enough (64 rows or more) that one call's fixed
    cost stays small beside its arithmetic. A rule, not a tuned constant."""
    return max(64, 4 * window)


def sliding_window_attention_backward(
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
    window: int = 4,
) -> tuple[Array, Array, Array]:
    """The backward of :func:`sliding_window_attention` (defined first: the registration
    names it): softmax attention's, with the band in the weights.

    W is 0 outside the window (and wherever ``mask`` forbids), so dS = W * (dW -
    rowsum(dW * W)) is 0 there too: keys outside a query's window get no gradient from
    it. dV = W^T G, dW = G V^T, dQ = dS K * scale, dK = dS^T Q * scale.
    grad_out: (b, h, s_q, d_v); weights: (b, h, s_q, s_k) -> dq, dk, dv of q's, k's, v's shapes.
    """
    return scaled_dot_product_attention_backward(grad_out, q, k, v, weights, scale=scale)


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
    backward=sliding_window_attention_backward,
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
    seq_q, seq_k = q.shape[2], k.shape[2]
    reach = 2 * window - 1 if not causal else window  # keys one query's band can cover
    if rows_per_block(window) + reach >= seq_k:  # the band covers most of each row
        band = band_mask(seq_q, seq_k, window, causal, xp=xp, device=device_of(q))
        allowed = band if mask is None else xp.logical_and(mask, band)  # (.., seq_q, seq_k)
        return scaled_dot_product_attention(q, k, v, mask=allowed, scale=scale)
    return _banded(q, k, v, mask, causal, scale, window)


def _banded(
    q: Array, k: Array, v: Array, mask: Array | None, causal: bool, scale: float | None,
    window: int,
) -> tuple[Array, Array]:  # fmt: skip
    """The same attention, a block of query rows at a time against only the keys in its
    band: the keys outside it would get weight exactly 0 (exp(-inf)), so leaving them out
    changes nothing but the order of the sums. Weights outside the band stay 0.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    xp = array_namespace(q, k, v)
    dev = device_of(q)
    batch, heads, seq_q = q.shape[0], q.shape[1], q.shape[2]
    seq_k = k.shape[2]
    offset = seq_k - seq_q  # query i sits at position i + offset
    out = xp.zeros((batch, heads, seq_q, v.shape[3]), dtype=q.dtype, device=dev)
    weights = xp.zeros((batch, heads, seq_q, seq_k), dtype=q.dtype, device=dev)
    rows = rows_per_block(window)
    for q0 in range(0, seq_q, rows):
        q1 = min(q0 + rows, seq_q)
        p0, p1 = q0 + offset, q1 + offset  # the block's positions
        k0 = max(0, p0 - window + 1)  # the first key the block's band reaches
        k1 = min(seq_k, p1 if causal else p1 + window - 1)  # one past the last
        if k1 <= k0:
            continue  # no key in reach: zero output and weights
        allowed = _band(p0, p1, k0, k1, window, causal, xp=xp, device=dev)  # (r, keys)
        if mask is not None:
            allowed = xp.logical_and(_mask_tile(mask, slice(q0, q1), slice(k0, k1)), allowed)
        o, w = scaled_dot_product_attention(
            q[:, :, q0:q1, :], k[:, :, k0:k1, :], v[:, :, k0:k1, :], mask=allowed, scale=scale
        )  # (batch, heads, r, d_v), (batch, heads, r, keys)
        out[:, :, q0:q1, :] = o
        weights[:, :, q0:q1, k0:k1] = w
    return out, weights
