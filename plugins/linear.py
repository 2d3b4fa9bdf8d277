"""``linear``: kernelized linear attention with the elu+1 feature map.

Katharopoulos et al. 2020, "Transformers are RNNs" (arXiv:2006.16236), sections 3.2-3.3.
Replace the similarity exp(q . k) by phi(q) . phi(k) with phi(x) = elu(x) + 1 > 0:

    O_i = phi(Q_i)^T S / (phi(Q_i)^T z),   S = sum_j phi(K_j) V_j^T  (d x d_v),
                                           z = sum_j phi(K_j)        (d)

S and z are computed once, so time and memory grow as O(seq), not O(seq^2). The
weights phi(Q_i) . phi(K_j) / (phi(Q_i)^T z) are non-negative and sum to 1 over j,
but they are never formed (none are returned).

Causal: query i may only use S_i = sum_{j<=i} phi(K_j) V_j^T, a prefix sum (the
paper's "RNN" view). We take the prefix sums a chunk of C positions at a time: the
state before a chunk is a cumulative sum over the chunks before it, and inside the
chunk the (C x C) causal products are done directly. ``chunk=1`` is the textbook prefix sum one
position at a time; larger chunks compute the same numbers with fewer, larger products.

Masks: a key-padding mask (broadcastable to (batch, heads, 1, seq_k)) zeroes phi(K_j)
of the masked keys. A general (seq_q x seq_k) mask cannot be applied without forming
the seq_q x seq_k matrix, so it is refused. ``scale`` (default 1: the paper has none)
multiplies the queries before the feature map.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx.functional import matmul
from tinytx.plugins.registry import AttentionError, Option, register_attention

Array = Any


def elu_plus_one(x: Array) -> Array:
    """phi(x) = elu(x) + 1 = x + 1 if x > 0 else exp(x); always > 0.  Any shape.

    Written as max(x, 0) + exp(min(x, 0)), which is the same and takes fewer passes.
    exp(x) is floored at exp(-30) ~ 1e-13: for x < -30 it would otherwise round to 0,
    and a query whose features all round to 0 would divide 0 by 0.
    """
    xp = array_namespace(x)
    phi = xp.exp(xp.clip(x, -30.0, 0.0))  # (...) exp(min(x, 0)), floored
    phi += xp.maximum(x, 0.0)  # in place
    return phi  # (...)


def _safe_divide(num: Array, den: Array) -> Array:
    """num / den, 0 where den == 0 (a query that may see no key)."""
    xp = array_namespace(num, den)
    return num / xp.where(den > 0, den, 1.0)


@register_attention(
    "linear",
    description="Linear attention, phi(q).phi(k) with phi = elu + 1, O(seq) time and memory",
    paper="Katharopoulos et al. 2020, Transformers are RNNs (arXiv:2006.16236)",
    normalized=True,
    permutation_equivariant=True,
    supports_mask=True,
    supports_causal=True,
    options={
        "chunk": Option(int, 64, "positions per chunk of the causal prefix sum", lambda c: c > 0)
    },
)
def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    chunk: int = 64,
) -> tuple[Array, None]:
    """phi(Q) S / phi(Q) z, with prefix sums when causal.

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), None.
    """
    xp = array_namespace(q, k, v)
    fq = elu_plus_one(q if scale is None else q * scale)  # (batch, heads, seq_q, d)
    fk = elu_plus_one(k)  # (batch, heads, seq_k, d)
    if mask is not None:
        if mask.ndim >= 2 and mask.shape[-2] != 1:
            raise AttentionError(
                "attention 'linear' supports key-padding masks only (broadcastable to "
                f"(batch, heads, 1, seq_k)), got a mask of shape {tuple(mask.shape)}"
            )
        keep = xp.astype(mask, fk.dtype)  # (..., 1, seq_k), (seq_k,) or ()
        if keep.ndim == 1:
            keep = keep[:, None]  # (seq_k, 1)
        elif keep.ndim >= 2:
            keep = xp.matrix_transpose(keep)  # (..., seq_k, 1)
        fk = fk * keep  # (batch, heads, seq_k, d): masked keys contribute nothing
    if not causal:
        s = matmul(xp.matrix_transpose(fk), v)  # (batch, heads, d, d_v)
        z = xp.sum(fk, axis=2)[..., None]  # (batch, heads, d, 1)
        return _safe_divide(matmul(fq, s), matmul(fq, z)), None  # (b, h, seq_q, d_v)
    return _causal(fq, fk, v, chunk), None


def _causal(fq: Array, fk: Array, v: Array, chunk: int) -> Array:
    """Causal linear attention; the queries are the last seq_q of the seq_k positions."""
    xp = array_namespace(fq, fk, v)
    batch, heads, seq_q, d = fq.shape
    seq_k = fk.shape[2]
    if seq_q > seq_k:  # the first seq_q - seq_k queries sit before every key: zero output
        zeros = xp.zeros(
            (batch, heads, seq_q - seq_k, v.shape[3]), dtype=v.dtype, device=device_of(v)
        )
        return xp.concat([zeros, _causal(fq[:, :, seq_q - seq_k :, :], fk, v, chunk)], axis=2)
    # Line the queries up with the keys: a query row of zeros gives a zero output row.
    lead = xp.zeros((batch, heads, seq_k - seq_q, d), dtype=fq.dtype, device=device_of(fq))
    out = _causal_aligned(xp.concat([lead, fq], axis=2), fk, v, chunk)  # (b, h, seq_k, d_v)
    return out[:, :, seq_k - seq_q :, :]  # (batch, heads, seq_q, d_v)


def _pad_rows(x: Array, pad: int) -> Array:
    """Append ``pad`` zero rows along the sequence axis.  (b, h, s, d) -> (b, h, s + pad, d)."""
    xp = array_namespace(x)
    zeros = xp.zeros((x.shape[0], x.shape[1], pad, x.shape[3]), dtype=x.dtype, device=device_of(x))
    return xp.concat([x, zeros], axis=2)


def _causal_aligned(fq: Array, fk: Array, v: Array, chunk: int) -> Array:
    """O_i = phi(Q_i) S_i / phi(Q_i) z_i with S_i, z_i summed over keys j <= i.

    fq, fk: (batch, heads, seq, d); v: (batch, heads, seq, d_v) -> (batch, heads, seq, d_v).
    """
    xp = array_namespace(fq, fk, v)
    batch, heads, seq, d = fq.shape
    d_v, dev = v.shape[3], device_of(fq)
    n = -(-seq // chunk)  # number of chunks
    pad = n * chunk - seq  # zero rows at the end: they add nothing to any sum
    if pad:
        fq, fk, v = (_pad_rows(x, pad) for x in (fq, fk, v))  # (b, h, n * C, d or d_v)
    fq_c = xp.reshape(fq, (batch, heads, n, chunk, d))  # (b, h, n, C, d)
    fk_c = xp.reshape(fk, (batch, heads, n, chunk, d))  # (b, h, n, C, d)
    v_c = xp.reshape(v, (batch, heads, n, chunk, d_v))  # (b, h, n, C, d_v)
    # The state carried into each chunk: prefix sums over the chunks before it.
    s_chunk = matmul(xp.matrix_transpose(fk_c), v_c)  # (b, h, n, d, d_v)
    s_before = xp.cumulative_sum(s_chunk, axis=2, include_initial=True)[:, :, :-1, ...]  # same
    z_chunk = xp.sum(fk_c, axis=3)  # (b, h, n, d)
    z_before = xp.cumulative_sum(z_chunk, axis=2, include_initial=True)[:, :, :-1, :]  # (b,h,n,d)
    # Inside a chunk: phi(Q_i) . phi(K_j) for j <= i, done directly.
    ones = xp.ones((chunk, chunk), dtype=xp.bool, device=dev)
    a = matmul(fq_c, xp.matrix_transpose(fk_c))  # (b, h, n, C, C)
    a = xp.where(xp.tril(ones), a, 0.0)  # (b, h, n, C, C)
    num = matmul(fq_c, s_before) + matmul(a, v_c)  # (b, h, n, C, d_v)
    den = matmul(fq_c, z_before[..., None]) + xp.sum(a, axis=-1, keepdims=True)  # (.., C, 1)
    out = xp.reshape(_safe_divide(num, den), (batch, heads, n * chunk, d_v))  # (b, h, seq+pad, d_v)
    return out[:, :, :seq, :]  # (batch, heads, seq, d_v)
