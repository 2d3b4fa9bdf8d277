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


def elu_plus_one_derivative(x: Array) -> Array:
    """phi'(x) = 1 if x > 0 else exp(x) (0 below -30, where phi is floored).  Any shape.

    As phi = exp(clip(x, -30, 0)) + max(x, 0): for x > 0 the exp term is exp(0) = 1.
    """
    xp = array_namespace(x)
    return xp.where(x >= -30.0, xp.exp(xp.clip(x, -30.0, 0.0)), 0.0)  # (...)


def _key_keep(mask: Array, dtype: Any) -> Array:
    """A key-padding mask as 1.0 (kept) / 0.0 per key, shaped to multiply phi(K):
    (..., 1, seq_k), (seq_k,) or () -> (..., seq_k, 1), (seq_k, 1) or ()."""
    xp = array_namespace(mask)
    if mask.ndim >= 2 and mask.shape[-2] != 1:
        raise AttentionError(
            "attention 'linear' supports key-padding masks only (broadcastable to "
            f"(batch, heads, 1, seq_k)), got a mask of shape {tuple(mask.shape)}"
        )
    keep = xp.astype(mask, dtype)  # (..., 1, seq_k), (seq_k,) or ()
    if keep.ndim == 1:
        return keep[:, None]  # (seq_k, 1)
    if keep.ndim >= 2:
        return xp.matrix_transpose(keep)  # (..., seq_k, 1)
    return keep


def _safe_divide(num: Array, den: Array) -> Array:
    """num / den, 0 where den == 0 (a query that may see no key)."""
    xp = array_namespace(num, den)
    return num / xp.where(den > 0, den, 1.0)


def linear_attention_backward(
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
    chunk: int = 64,
) -> tuple[Array, Array, Array]:
    """The backward of :func:`linear_attention` (defined first: the registration names it).

    The forward is O_i = N_i / D_i with N_i = phi(Q_i)^T S, D_i = phi(Q_i)^T z. With
    G = dL/dO, going back through the division, then through S, z and the feature map:

        dN_i = G_i / D_i,   dD_i = -sum(G_i * O_i) / D_i         (0 for a query seeing no key)
        dphi(Q)_i = S^T dN_i + z dD_i                             (d)
        dS = sum_i phi(Q_i) dN_i^T,  dz = sum_i phi(Q_i) dD_i     (d x d_v), (d)
        dphi(K)_j = dS V_j + dz,     dV_j = dS^T phi(K_j)
        dQ = dphi(Q) * phi'(Q * scale) * scale,   dK = dphi(K) * phi'(K) * keep

    Still O(seq): no (seq_q x seq_k) matrix. Causal: S and z are prefix sums, so dS and
    dz are suffix sums (a key gets the gradient of every later query), taken a chunk at
    a time as the forward takes its prefix sums (:func:`_causal_aligned_backward`).
    grad_out, out: (batch, heads, seq_q, d_v) -> dq (batch, heads, seq_q, d),
    dk (batch, heads, seq_k, d), dv (batch, heads, seq_k, d_v).
    """
    xp = array_namespace(grad_out, q, k, v)
    q_in = q if scale is None else q * scale  # (batch, heads, seq_q, d)
    fq = elu_plus_one(q_in)  # (batch, heads, seq_q, d)
    fk = elu_plus_one(k)  # (batch, heads, seq_k, d)
    keep = None if mask is None else _key_keep(mask, fk.dtype)  # (.., seq_k, 1) or None
    if keep is not None:
        fk = fk * keep  # (batch, heads, seq_k, d)
    if causal:
        d_fq, d_fk, dv = _causal_backward(fq, fk, v, grad_out, chunk)
    else:
        s = xp.matmul(xp.matrix_transpose(fk), v)  # (batch, heads, d, d_v)
        z = xp.sum(fk, axis=2)[..., None]  # (batch, heads, d, 1)
        d_num, d_den = _division_backward(grad_out, out, xp.matmul(fq, z))  # (.., d_v), (.., 1)
        d_fq = xp.matmul(d_num, xp.matrix_transpose(s))  # (batch, heads, seq_q, d)
        d_fq = d_fq + d_den * xp.matrix_transpose(z)  # (batch, heads, seq_q, d)
        d_s = xp.matmul(xp.matrix_transpose(fq), d_num)  # (batch, heads, d, d_v)
        d_z = xp.matmul(xp.matrix_transpose(fq), d_den)  # (batch, heads, d, 1)
        d_fk = xp.matmul(v, xp.matrix_transpose(d_s)) + xp.matrix_transpose(d_z)  # (b,h,s_k,d)
        dv = xp.matmul(fk, d_s)  # (batch, heads, seq_k, d_v)
    if keep is not None:
        d_fk = d_fk * keep  # (batch, heads, seq_k, d): masked keys get no gradient
    dk = d_fk * elu_plus_one_derivative(k)  # (batch, heads, seq_k, d)
    dq = d_fq * elu_plus_one_derivative(q_in)  # (batch, heads, seq_q, d)
    return (dq if scale is None else dq * scale), dk, dv


def _division_backward(grad_out: Array, out: Array, den: Array) -> tuple[Array, Array]:
    """Gradients of O = N / D (O = 0 where D = 0) with respect to N and D.

    dN = G / D, dD = -sum(G * O) / D over the last axis; both 0 where D = 0 (no key
    to see: O is 0 whatever N, whose terms are all 0 there).
    grad_out, out: (..., d_v); den: (..., 1) -> (..., d_v), (..., 1).
    """
    xp = array_namespace(grad_out, out, den)
    positive = den > 0  # (..., 1)
    safe = xp.where(positive, den, 1.0)  # (..., 1)
    d_num = grad_out / safe  # (..., d_v)
    d_den = -xp.sum(grad_out * out, axis=-1, keepdims=True) / safe  # (..., 1)
    return d_num, xp.where(positive, d_den, 0.0)


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
    backward=linear_attention_backward,
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
        fk = fk * _key_keep(mask, fk.dtype)  # (batch, heads, seq_k, d): masked keys add nothing
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


def _causal_backward(
    fq: Array, fk: Array, v: Array, grad_out: Array, chunk: int
) -> tuple[Array, Array, Array]:
    """The backward of :func:`_causal`: (d phi(Q), d phi(K), dV), lining the queries up
    with the keys as the forward does (queries before every key get zero gradient)."""
    xp = array_namespace(fq, fk, v, grad_out)
    batch, heads, seq_q, d = fq.shape
    seq_k = fk.shape[2]
    if seq_q > seq_k:  # the first seq_q - seq_k queries had a constant (zero) output
        early = seq_q - seq_k
        zeros = xp.zeros((batch, heads, early, d), dtype=fq.dtype, device=device_of(fq))
        later = (fq[:, :, early:, :], fk, v, grad_out[:, :, early:, :])
        d_fq, d_fk, dv = _causal_backward(*later, chunk)
        return xp.concat([zeros, d_fq], axis=2), d_fk, dv  # (b, h, seq_q, d), ...
    lead = seq_k - seq_q
    zeros_q = xp.zeros((batch, heads, lead, d), dtype=fq.dtype, device=device_of(fq))
    zeros_g = xp.zeros((batch, heads, lead, v.shape[3]), dtype=fq.dtype, device=device_of(fq))
    fq_aligned = xp.concat([zeros_q, fq], axis=2)  # (batch, heads, seq_k, d)
    g_aligned = xp.concat([zeros_g, grad_out], axis=2)  # (batch, heads, seq_k, d_v)
    d_fq, d_fk, dv = _causal_aligned_backward(fq_aligned, fk, v, g_aligned, chunk)
    return d_fq[:, :, lead:, :], d_fk, dv  # (b, h, seq_q, d), (b, h, seq_k, d), (.., d_v)


def _exclusive_suffix_sum(x: Array) -> Array:
    """out[c] = sum of x[c'] over the chunks c' > c (axis 2): the backward of the
    exclusive prefix sum the forward carries from chunk to chunk.  (b, h, n, ...) -> same."""
    xp = array_namespace(x)
    flipped = xp.flip(x, axis=2)  # (b, h, n, ...) last chunk first
    summed = xp.cumulative_sum(flipped, axis=2, include_initial=True)[:, :, :-1, ...]  # same
    return xp.flip(summed, axis=2)


def _causal_aligned_backward(
    fq: Array, fk: Array, v: Array, grad_out: Array, chunk: int
) -> tuple[Array, Array, Array]:
    """The backward of :func:`_causal_aligned`, a chunk of C positions at a time.

    Recomputes the forward's chunk states (S_before, z_before, the in-chunk products A),
    then, with dN, dD from the division:

        dA = tril(dN V^T + dD)                          in-chunk (C x C)
        dphi(Q) = dN S_before^T + dD z_before^T + dA phi(K)
        dphi(K) = dA^T phi(Q) + V dS_chunk^T + dz_chunk,   dV = A^T dN + phi(K) dS_chunk
        dS_chunk[c] = sum_{c' > c} phi(Q)_c'^T dN_c'     (the suffix sum of dS_before)

    fq, fk: (batch, heads, seq, d); v, grad_out: (batch, heads, seq, d_v) -> the
    gradients with respect to fq, fk and v, of the same shapes.
    """
    xp = array_namespace(fq, fk, v, grad_out)
    batch, heads, seq, d = fq.shape
    d_v, dev = v.shape[3], device_of(fq)
    n = -(-seq // chunk)  # number of chunks
    pad = n * chunk - seq  # zero rows at the end: they add nothing, and get nothing back
    if pad:
        fq, fk, v, grad_out = (_pad_rows(x, pad) for x in (fq, fk, v, grad_out))
    fq_c = xp.reshape(fq, (batch, heads, n, chunk, d))  # (b, h, n, C, d)
    fk_c = xp.reshape(fk, (batch, heads, n, chunk, d))  # (b, h, n, C, d)
    v_c = xp.reshape(v, (batch, heads, n, chunk, d_v))  # (b, h, n, C, d_v)
    g_c = xp.reshape(grad_out, (batch, heads, n, chunk, d_v))  # (b, h, n, C, d_v)
    # The forward again: the states carried into each chunk and the in-chunk products.
    s_chunk = xp.matmul(xp.matrix_transpose(fk_c), v_c)  # (b, h, n, d, d_v)
    s_before = xp.cumulative_sum(s_chunk, axis=2, include_initial=True)[:, :, :-1, ...]  # same
    z_before = xp.cumulative_sum(xp.sum(fk_c, axis=3), axis=2, include_initial=True)
    z_before = z_before[:, :, :-1, :]  # (b, h, n, d)
    lower = xp.tril(xp.ones((chunk, chunk), dtype=xp.bool, device=dev))  # (C, C)
    a = xp.where(lower, xp.matmul(fq_c, xp.matrix_transpose(fk_c)), 0.0)  # (b, h, n, C, C)
    num = xp.matmul(fq_c, s_before) + xp.matmul(a, v_c)  # (b, h, n, C, d_v)
    den = xp.matmul(fq_c, z_before[..., None]) + xp.sum(a, axis=-1, keepdims=True)  # (.., C, 1)
    out = _safe_divide(num, den)  # (b, h, n, C, d_v)
    # Back through O = N / D, then N = phi(Q) S_before + A V and D = phi(Q) z_before + A 1.
    d_num, d_den = _division_backward(g_c, out, den)  # (b, h, n, C, d_v), (b, h, n, C, 1)
    d_a = xp.where(lower, xp.matmul(d_num, xp.matrix_transpose(v_c)) + d_den, 0.0)  # (.., C, C)
    d_fq = xp.matmul(d_num, xp.matrix_transpose(s_before))  # (b, h, n, C, d)
    d_fq = d_fq + d_den * z_before[..., None, :] + xp.matmul(d_a, fk_c)  # (b, h, n, C, d)
    d_fk = xp.matmul(xp.matrix_transpose(d_a), fq_c)  # (b, h, n, C, d)
    dv = xp.matmul(xp.matrix_transpose(a), d_num)  # (b, h, n, C, d_v)
    # Each chunk's state went into every later chunk: its gradient is a suffix sum.
    d_s_chunk = _exclusive_suffix_sum(xp.matmul(xp.matrix_transpose(fq_c), d_num))  # (.,d,d_v)
    d_z_chunk = _exclusive_suffix_sum(xp.sum(fq_c * d_den, axis=3))  # (b, h, n, d)
    d_fk = d_fk + xp.matmul(v_c, xp.matrix_transpose(d_s_chunk)) + d_z_chunk[..., None, :]
    dv = dv + xp.matmul(fk_c, d_s_chunk)  # (b, h, n, C, d_v)
    d_fq = xp.reshape(d_fq, (batch, heads, n * chunk, d))[:, :, :seq, :]  # (b, h, seq, d)
    d_fk = xp.reshape(d_fk, (batch, heads, n * chunk, d))[:, :, :seq, :]  # (b, h, seq, d)
    dv = xp.reshape(dv, (batch, heads, n * chunk, d_v))[:, :, :seq, :]  # (b, h, seq, d_v)
    return d_fq, d_fk, dv
