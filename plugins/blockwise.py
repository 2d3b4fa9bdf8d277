"""``blockwise``: exact attention in key/value blocks with an online softmax.

Milakov & Gimelshein 2018 (online softmax); Rabe & Staats 2021 (attention in O(sqrt n)
memory); Dao et al. 2022 (FlashAttention). The result equals softmax attention

    O = softmax(S) V,   S = Q K^T * scale,

but S (seq_q x seq_k) is never stored. The keys are read a block of B at a time; each
query row keeps a running maximum m, a running sum l and an unnormalised output a:

    S_b    = Q K_b^T * scale                          scores against block b: (seq_q, B)
    m'     = max(m, rowmax(S_b))
    l      = l * exp(m - m') + rowsum(exp(S_b - m'))
    a      = a * exp(m - m') + exp(S_b - m') V_b
    m      = m'
    O      = a / l                                    after the last block

Multiplying by exp(m - m') rescales what was summed under the old maximum to the new
one, so every exp() sees an argument <= 0 and cannot overflow. The queries are also
taken a block at a time, so the extra memory is O(B^2) per head, not O(seq^2) (plus
the output, written block by block into its place). The weights are never formed, so
none are returned.

This loop is the definition, and what runs on CuPy and array-api-strict. On NumPy the
backend's native (``backends/numpy_natives.py``) computes the same numbers faster: tiles
of query rows against all keys, spread over its thread pool, each tile's scores in a
buffer reused from tile to tile, so memory stays O(seq x tile) there too. ``block_size``
shapes this loop only; the native chooses cache-sized tiles.

The backward (:func:`blockwise_attention_backward`) is FlashAttention's: it recomputes
each tile's scores from Q and K instead of keeping them (on NumPy, a native again). Peak
memory of one forward + backward at (batch 1, 8 heads, seq 4096, d 64) float32, measured
with tracemalloc on NumPy (``tinytx.bench.backward.attention_memory``, 2-core AMD EPYC):
softmax 1577 MiB (its weights alone are 512 MiB, and the backward makes their gradient),
blockwise 45 MiB, 2.9% of it: the output, dq, dk, dv (8 MiB each) and a few tiles (this
loop, without the native: 53 MiB, 3.4%). One thread, (1, 8, 1024, 64) float32: the
native's backward takes 96 ms of CPU, softmax's 91 ms, this loop 158 ms.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx.backends import native_function
from tinytx.plugins.registry import Option, register_attention

Array = Any


def _block_of(mask: Array, rows: slice, cols: slice) -> Array:
    """mask[..., rows, cols], keeping a broadcast (size 1) axis as it is."""
    if mask.ndim < 2:  # (seq_k,) or a scalar: the same for every query row
        mask = mask[None, ...] if mask.ndim == 1 else mask[None, None]  # (1, seq_k or 1)
    rows = slice(None) if mask.shape[-2] == 1 else rows
    cols = slice(None) if mask.shape[-1] == 1 else cols
    return mask[..., rows, cols]  # (.., rows or 1, cols or 1)


def blockwise_attention_backward(
    grad_out: Array,
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    weights: None,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    block_size: int = 256,
) -> tuple[Array, Array, Array]:
    """FlashAttention's backward (Dao et al. 2022, Algorithm 2; FlashAttention-2, Dao
    2023): the gradients of softmax attention without storing P (seq_q x seq_k).

    The weights of a tile are recomputed from Q and K and each row's logsumexp L, which
    a first blockwise pass finds (:func:`_row_logsumexp`); with G = dL/dO:

        D_i   = rowsum(G_i * O_i)               = rowsum(dP_i * P_i), one number per query
        for each key block j, for each query block i:
            S_ij  = Q_i K_j^T * scale           (Bq, Bk), masked entries -inf
            P_ij  = exp(S_ij - L_i)             the forward's weights for this tile
            dV_j += P_ij^T G_i
            dP_ij = G_i V_j^T
            dS_ij = P_ij * (dP_ij - D_i)        softmax's backward, its row sum taken from D
            dQ_i += dS_ij K_j * scale,   dK_j += dS_ij^T Q_i * scale

    Memory: besides the inputs and the gradients, O(Bq x Bk) per tile and two numbers
    per query (L, D): never (seq_q x seq_k). Time: the scores are computed twice (once
    for L, once here), as FlashAttention recomputes them instead of reading them back.
    Causal: tiles wholly after the queries' positions are skipped. A fully masked row
    has L = -inf, P = 0 and zero gradients. On NumPy the backend's native computes the
    same numbers faster (whole rows of keys per tile, so one softmax replaces the
    logsumexp pass; heads on the thread pool); ``block_size`` shapes this loop only.
    grad_out, out: (batch, heads, seq_q, d_v); q: (batch, heads, seq_q, d);
    k, v: (batch, heads, seq_k, d / d_v) -> dq, dk, dv of q's, k's and v's shapes.
    """
    xp = array_namespace(grad_out, q, k, v, out)
    native = native_function(xp, "blockwise_attention_backward")  # NumPy: heads on the pool
    if native is not None:
        grads = native(grad_out, q, k, v, out, mask, causal, scale)
        if grads is not NotImplemented:
            return grads
    dev = device_of(q)
    seq_q, seq_k = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    offset = seq_k - seq_q  # query i sits at position i + offset (see causal_mask)
    q_scaled = q * scale  # (batch, heads, seq_q, d)
    lse = _row_logsumexp(q_scaled, k, mask, causal, block_size)  # (batch, heads, seq_q, 1)
    lse = xp.where(xp.isfinite(lse), lse, 0.0)  # a fully masked row: P = exp(-inf) = 0
    delta = xp.sum(grad_out * out, axis=-1, keepdims=True)  # (batch, heads, seq_q, 1)
    dq = xp.zeros(q.shape, dtype=q.dtype, device=dev)  # (batch, heads, seq_q, d)
    dk = xp.zeros(k.shape, dtype=q.dtype, device=dev)  # (batch, heads, seq_k, d)
    dv = xp.zeros(v.shape, dtype=q.dtype, device=dev)  # (batch, heads, seq_k, d_v)
    for k0 in range(0, seq_k, block_size):
        k1 = min(k0 + block_size, seq_k)
        k_block, v_block = k[:, :, k0:k1, :], v[:, :, k0:k1, :]  # (batch, heads, Bk, d / d_v)
        dk_block = xp.zeros(k_block.shape, dtype=q.dtype, device=dev)  # (b, h, Bk, d)
        dv_block = xp.zeros(v_block.shape, dtype=q.dtype, device=dev)  # (b, h, Bk, d_v)
        for q0 in range(0, seq_q, block_size):
            q1 = min(q0 + block_size, seq_q)
            if causal and q1 - 1 + offset < k0:  # every query here is before every key
                continue
            rows = slice(q0, q1)
            q_pos = xp.arange(q0 + offset, q1 + offset, device=dev)  # (Bq,)
            allowed = _tile_allowed(mask, causal, q_pos, rows, slice(k0, k1))
            s = xp.matmul(q_scaled[:, :, rows, :], xp.matrix_transpose(k_block))  # (b,h,Bq,Bk)
            if allowed is not None:
                s = xp.where(allowed, s, -xp.inf)  # (b, h, Bq, Bk)
            p = xp.exp(s - lse[:, :, rows, :])  # (b, h, Bq, Bk): P, 0 where masked
            g = grad_out[:, :, rows, :]  # (b, h, Bq, d_v)
            dv_block += xp.matmul(xp.matrix_transpose(p), g)  # (b, h, Bk, d_v)
            dp = xp.matmul(g, xp.matrix_transpose(v_block))  # (b, h, Bq, Bk)
            ds = p * (dp - delta[:, :, rows, :])  # (b, h, Bq, Bk)
            dq[:, :, rows, :] = dq[:, :, rows, :] + xp.matmul(ds, k_block) * scale  # (.., Bq, d)
            dk_block += xp.matmul(xp.matrix_transpose(ds), q_scaled[:, :, rows, :])  # (.., Bk, d)
        dk[:, :, k0:k1, :] = dk_block  # (b, h, Bk, d); Q was scaled already
        dv[:, :, k0:k1, :] = dv_block  # (b, h, Bk, d_v)
    return dq, dk, dv


def _row_logsumexp(
    q_scaled: Array, k: Array, mask: Array | None, causal: bool, block_size: int
) -> Array:
    """L_i = log sum_j exp(S_ij) over the keys query i may see, one tile at a time (the
    online softmax's running max m and sum l, without the output): L = m + log l.

    q_scaled: (batch, heads, seq_q, d), already times scale; k: (batch, heads, seq_k, d)
    -> (batch, heads, seq_q, 1); -inf for a query that may see no key.
    """
    xp = array_namespace(q_scaled, k)
    dev = device_of(q_scaled)
    batch, heads, seq_q, _ = q_scaled.shape
    seq_k = k.shape[2]
    offset = seq_k - seq_q
    lse = xp.zeros((batch, heads, seq_q, 1), dtype=q_scaled.dtype, device=dev)
    for q0 in range(0, seq_q, block_size):
        q1 = min(q0 + block_size, seq_q)
        rows = slice(q0, q1)
        q_pos = xp.arange(q0 + offset, q1 + offset, device=dev)  # (Bq,)
        k_end = min(seq_k, q1 + offset) if causal else seq_k
        m = xp.full((batch, heads, q1 - q0, 1), -xp.inf, dtype=lse.dtype, device=dev)  # max
        l = xp.zeros((batch, heads, q1 - q0, 1), dtype=lse.dtype, device=dev)  # sum
        for k0 in range(0, k_end, block_size):
            k1 = min(k0 + block_size, k_end)
            allowed = _tile_allowed(mask, causal, q_pos, rows, slice(k0, k1))
            s = xp.matmul(q_scaled[:, :, rows, :], xp.matrix_transpose(k[:, :, k0:k1, :]))
            if allowed is not None:
                s = xp.where(allowed, s, -xp.inf)  # (b, h, Bq, Bk)
            m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))  # (b, h, Bq, 1)
            m_safe = xp.where(xp.isfinite(m_new), m_new, 0.0)  # nothing allowed yet
            l = l * xp.exp(m - m_safe) + xp.sum(xp.exp(s - m_safe), axis=-1, keepdims=True)
            m = m_new
        log_l = xp.log(xp.where(l > 0, l, 1.0))  # (b, h, Bq, 1)
        lse[:, :, rows, :] = xp.where(l > 0, m + log_l, -xp.inf)  # (b, h, Bq, 1)
    return lse


@register_attention(
    "blockwise",
    description="Exact softmax attention, key/value blocks with an online softmax",
    paper="Rabe & Staats 2021 (arXiv:2112.05682); Dao et al. 2022, FlashAttention "
    "(arXiv:2205.14135); online softmax: Milakov & Gimelshein 2018 (arXiv:1805.02867)",
    normalized=True,
    permutation_equivariant=True,
    exact=True,
    supports_mask=True,
    supports_causal=True,
    options={
        "block_size": Option(
            int, 256, "keys and queries per block", check=lambda b: b > 0, rule="must be >= 1"
        )
    },
    backward=blockwise_attention_backward,
)
def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    block_size: int = 256,
) -> tuple[Array, None]:
    """softmax(Q K^T * scale) V, one (query block, key block) tile at a time.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), None.
    """
    xp = array_namespace(q, k, v)
    native = native_function(xp, "blockwise_attention")  # NumPy: tiles on the thread pool
    if native is not None and (out := native(q, k, v, mask, causal, scale)) is not NotImplemented:
        return out
    seq_q, seq_k = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    offset = seq_k - seq_q  # query i sits at position i + offset (see causal_mask)
    shape = (q.shape[0], q.shape[1], seq_q, v.shape[3])
    out = xp.zeros(shape, dtype=q.dtype, device=device_of(q))  # (batch, heads, seq_q, d_v)
    for q0 in range(0, seq_q, block_size):
        q1 = min(q0 + block_size, seq_q)
        q_block = q[:, :, q0:q1, :] * scale  # (batch, heads, Bq, d)
        # causal: this query block sees no key past its last query's position
        k_end = min(seq_k, q1 + offset) if causal else seq_k
        tile = _query_block(q_block, k, v, mask, causal, q0, q1, offset, k_end, block_size)
        out[:, :, q0:q1, :] = tile  # (batch, heads, Bq, d_v)
    return out, None


def _query_block(
    q_block: Array,
    k: Array,
    v: Array,
    mask: Array | None,
    causal: bool,
    q0: int,
    q1: int,
    offset: int,
    k_end: int,
    block_size: int,
) -> Array:
    """Online softmax of one query block over the key blocks up to ``k_end``."""
    xp = array_namespace(q_block)
    dev = device_of(q_block)
    batch, heads, rows = q_block.shape[0], q_block.shape[1], q_block.shape[2]
    dtype = q_block.dtype
    m = xp.full((batch, heads, rows, 1), -xp.inf, dtype=dtype, device=dev)  # running max
    l = xp.zeros((batch, heads, rows, 1), dtype=dtype, device=dev)  # running sum
    acc = xp.zeros((batch, heads, rows, v.shape[3]), dtype=dtype, device=dev)  # (b, h, Bq, d_v)
    q_pos = xp.arange(q0 + offset, q1 + offset, device=dev)  # (Bq,) positions of the queries
    for k0 in range(0, k_end, block_size):
        k1 = min(k0 + block_size, k_end)
        allowed = _tile_allowed(mask, causal, q_pos, slice(q0, q1), slice(k0, k1))
        m, l, acc = _online_step(q_block, k[:, :, k0:k1, :], v[:, :, k0:k1, :], allowed, m, l, acc)
    return acc / xp.where(l > 0, l, 1.0)  # (b, h, Bq, d_v); a fully masked row stays 0


def _tile_allowed(
    mask: Array | None, causal: bool, q_pos: Array, rows: slice, cols: slice
) -> Array | None:
    """Which keys of the tile each query may see: the mask's block, and with causal=True
    only keys at or before the query's position. None when everything is allowed.

    q_pos: (Bq,) the positions of the tile's queries; rows, cols: the tile's query and
    key ranges -> boolean, broadcastable to (batch, heads, Bq, Bk), or None.
    """
    allowed = None if mask is None else _block_of(mask, rows, cols)  # (.., Bq or 1, Bk or 1)
    if causal:
        xp = array_namespace(q_pos)
        k_pos = xp.arange(cols.start, cols.stop, device=device_of(q_pos))  # (Bk,)
        before = k_pos[None, :] <= q_pos[:, None]  # (Bq, Bk)
        allowed = before if allowed is None else xp.logical_and(allowed, before)
    return allowed


def _online_step(
    q_block: Array,
    k_block: Array,
    v_block: Array,
    allowed: Array | None,
    m: Array,
    l: Array,
    acc: Array,
) -> tuple[Array, Array, Array]:
    """Fold one key block into the running max m, sum l and output acc of a query block.

    q_block: (b, h, Bq, d), already scaled; k_block, v_block: (b, h, Bk, d / d_v);
    allowed: None or boolean, broadcastable to (b, h, Bq, Bk); m, l: (b, h, Bq, 1);
    acc: (b, h, Bq, d_v). The tile-sized temporaries die when this function returns.
    """
    xp = array_namespace(q_block)
    s = xp.matmul(q_block, xp.matrix_transpose(k_block))  # (b, h, Bq, Bk)
    if allowed is not None:
        s = xp.where(allowed, s, -xp.inf)  # (b, h, Bq, Bk)
    m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))  # (b, h, Bq, 1)
    infinite = m_new == xp.inf  # (b, h, Bq, 1): rows holding a +inf score so far
    if xp.any(infinite):  # softmax's limit: equal shares among the +inf scores, 0 elsewhere
        s = xp.where(infinite, xp.where(s == xp.inf, 0.0, xp.where(xp.isnan(s), s, -xp.inf)), s)
    m_safe = xp.where(xp.isfinite(m_new), m_new, 0.0)  # a row with nothing allowed yet
    s -= m_safe  # in place: one tile-sized temporary fewer
    p = xp.exp(s)  # (b, h, Bq, Bk), 0 where masked
    rescale = xp.exp(m - m_safe)  # (b, h, Bq, 1), 0 on the first block
    if xp.any(infinite):  # earlier finite scores vanish; earlier +inf ones keep their share
        rescale = xp.where(infinite, xp.astype(m == xp.inf, m.dtype), rescale)  # 1 or 0
    l = l * rescale + xp.sum(p, axis=-1, keepdims=True)  # (b, h, Bq, 1)
    acc = acc * rescale + xp.matmul(p, v_block)  # (b, h, Bq, d_v)
    return m_new, l, acc
