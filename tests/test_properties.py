"""Property tests: the invariants of a transformer, over random shapes, dtypes and values.

Hypothesis draws the shapes, the dtype (float32 and float64; modules are cast with
``module.to(dtype=...)``), a seed for the random values and weights, masks and
permutations. Every test runs on every backend through the ``backend`` fixture.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinytx
from tinytx import functional as F
from tinytx.layers import DecoderBlock, Encoder, EncoderBlock, MultiHeadAttention, padding_mask

DTYPES = st.sampled_from(["float32", "float64"])
SEEDS = st.integers(0, 2**32 - 1)
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
# Two computations that should agree up to rounding (different shapes, orders of sums).
TOL = {"float32": 1e-4, "float64": 1e-9}


def put(backend, host, dtype):
    return backend.asarray(host, dtype=dtype)


def host(backend, x) -> np.ndarray:
    return backend.to_numpy(x)


def assert_close(a, b, dtype, what="") -> None:
    np.testing.assert_allclose(a, b, atol=TOL[dtype], rtol=TOL[dtype], err_msg=what)


@st.composite
def heads(draw):
    """(n_heads, n_kv_heads, d_head): n_kv_heads divides n_heads; d_head even (rotary)."""
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0]))
    return n_heads, n_kv_heads, draw(st.sampled_from([2, 4]))


def build(kind, backend, dtype, seed, *, n_heads=2, n_kv_heads=None, d_head=4, **options):
    """A small module of the given kind on ``backend``, cast to ``dtype``."""
    d_model = n_heads * d_head
    common = dict(n_kv_heads=n_kv_heads, backend=backend, seed=seed)
    if kind == "mha":
        module = MultiHeadAttention(d_model, n_heads, **common, **options)
    elif kind == "encoder_block":
        module = EncoderBlock(d_model, n_heads, 2 * d_model, **common, **options)
    elif kind == "encoder":
        module = Encoder(2, d_model, n_heads, 2 * d_model, max_len=16, **common, **options)
    elif kind == "decoder_block":
        module = DecoderBlock(d_model, n_heads, 2 * d_model, **common, **options)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return module.to(dtype=dtype)


# --- attention weights -----------------------------------------------------------------


def allowed_keys(mask, causal, shape) -> np.ndarray:
    """The (batch, heads, seq_q, seq_k) boolean of allowed keys, on the host."""
    allowed = np.ones(shape, dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask, shape)
    if causal:
        sq, sk = shape[2], shape[3]
        allowed &= np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
    return allowed


@given(
    dims=st.tuples(st.integers(1, 2), heads(), st.integers(1, 5), st.integers(1, 6)),
    mask_kind=st.sampled_from([None, "padding", "full", "2d"]),
    causal=st.booleans(),
    logit_scale=st.floats(0.1, 30.0),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_attention_weights_are_distributions(
    backend, dims, mask_kind, causal, logit_scale, dtype, seed
) -> None:
    """Weights >= 0; each row with an allowed key sums to 1 and puts exactly 0 on the
    forbidden keys; a row with no allowed key is all zeros, and so is its output."""
    batch, (h, h_kv, d), sq, sk = dims
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, h, sq, d)) * logit_scale
    k, v = rng.normal(size=(2, batch, h_kv, sk, d))
    mask = {
        None: None,
        "padding": rng.random((batch, 1, 1, sk)) < 0.7,
        "full": rng.random((batch, h, sq, sk)) < 0.6,
        "2d": rng.random((sq, sk)) < 0.6,
    }[mask_kind]
    out, w = F.scaled_dot_product_attention(
        put(backend, q, dtype),
        put(backend, k, dtype),
        put(backend, v, dtype),
        mask=None if mask is None else backend.asarray(mask),
        causal=causal,
    )
    out, w = host(backend, out), host(backend, w)
    assert w.dtype == out.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(out))
    assert np.all(w >= 0)
    allowed = allowed_keys(mask, causal, (batch, h, sq, sk))
    assert np.all(w[~allowed] == 0)
    some = allowed.any(axis=-1)  # (batch, heads, seq_q)
    np.testing.assert_allclose(w.sum(-1)[some], 1.0, atol=10 * sk * EPS[dtype])
    assert np.all(w[~some] == 0) and np.all(out[~some] == 0)


@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    hd=heads(),
    causal=st.booleans(),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_mha_weights_are_distributions(backend, batch, seq, hd, causal, dtype, seed) -> None:
    """The same through MultiHeadAttention, with a padding mask from random lengths."""
    n_heads, n_kv_heads, d_head = hd
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, seq + 1, size=batch)]
    mha = build("mha", backend, dtype, seed, n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head)
    x = put(backend, rng.normal(size=(batch, seq, n_heads * d_head)), dtype)
    mask = padding_mask(lengths, seq, backend=backend)
    _, w = mha(x, mask=mask, causal=causal, return_weights=True)
    w = host(backend, w)
    assert w.shape == (batch, n_heads, seq, seq) and np.all(w >= 0)
    allowed = allowed_keys(host(backend, mask), causal, w.shape)
    assert np.all(w[~allowed] == 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=10 * seq * EPS[dtype])  # key 0 is real


# --- permutations and positions ------------------------------------------------------


@st.composite
def permuted(draw, min_seq=1):
    seq = draw(st.integers(min_seq, 6))
    return seq, draw(st.permutations(range(seq)))


@given(
    sp=permuted(),
    hd=heads(),
    norm_first=st.booleans(),
    activation=st.sampled_from(["relu", "gelu"]),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_encoder_without_positions_is_permutation_equivariant(
    backend, sp, hd, norm_first, activation, dtype, seed
) -> None:
    """Encoder(x[:, perm]) == Encoder(x)[:, perm] when nothing tells positions apart."""
    (seq, perm), (n_heads, n_kv_heads, d_head) = sp, hd
    enc = build(
        "encoder", backend, dtype, seed, n_heads=n_heads, n_kv_heads=n_kv_heads,
        d_head=d_head, norm_first=norm_first, activation=activation,
    )  # fmt: skip
    x = np.random.default_rng(seed).normal(size=(2, seq, n_heads * d_head))
    out = host(backend, enc(put(backend, x, dtype)))
    out_perm = host(backend, enc(put(backend, x[:, perm], dtype)))
    assert_close(out_perm, out[:, perm], dtype)


@given(
    sp=permuted(min_seq=2),
    positions=st.sampled_from(["sinusoidal", "learned", "rotary"]),
    norm_first=st.booleans(),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_encoder_with_positions_is_not_permutation_equivariant(
    backend, sp, positions, norm_first, dtype, seed
) -> None:
    """With positional information, permuting the tokens changes more than their order."""
    seq, perm = sp
    assume(perm != list(range(seq)))
    enc = build("encoder", backend, dtype, seed, positions=positions, norm_first=norm_first)
    x = np.random.default_rng(seed).normal(size=(1, seq, 8))
    out = host(backend, enc(put(backend, x, dtype)))
    out_perm = host(backend, enc(put(backend, x[:, perm], dtype)))
    moved = [i for i in range(seq) if perm[i] != i]
    difference = np.max(np.abs(out_perm[:, moved] - out[:, perm][:, moved]))
    assert difference > 1e-3, f"{positions}: outputs only permuted (max difference {difference})"


# --- causality -----------------------------------------------------------------------

CAUSAL_KINDS = ["mha", "encoder_block", "encoder", "decoder_block"]


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@given(
    seq=st.integers(2, 7),
    data=st.data(),
    hd=heads(),
    positions=st.sampled_from([None, "sinusoidal", "learned", "rotary"]),
    norm_first=st.booleans(),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_causal_outputs_ignore_the_future(
    backend, kind, seq, data, hd, positions, norm_first, dtype, seed
) -> None:
    """Changing the tokens after position t never changes the outputs at positions <= t."""
    t = data.draw(st.integers(0, seq - 2), label="t")
    n_heads, n_kv_heads, d_head = hd
    if kind in ("encoder_block", "decoder_block"):
        options = dict(norm_first=norm_first, rotary=positions == "rotary")
    elif kind == "encoder":
        options = dict(norm_first=norm_first, positions=positions)
    else:
        options = dict(rotary=positions == "rotary")
    module = build(
        kind, backend, dtype, seed, n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head,
        **options,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, seq, n_heads * d_head))
    changed = x.copy()
    changed[:, t + 1 :] = rng.normal(size=changed[:, t + 1 :].shape) * 3
    memory = []  # the decoder block also attends to an encoder's output
    if kind == "decoder_block":
        memory.append(put(backend, rng.normal(size=(2, 3, n_heads * d_head)), dtype))

    def run(inputs):
        return module(put(backend, inputs, dtype), *memory, causal=True)

    before, after = host(backend, run(x)), host(backend, run(changed))
    assert_close(after[:, : t + 1], before[:, : t + 1], dtype, f"{kind}, t={t}")
    if n_heads * d_head >= 4:  # (a post-norm of 2 features is always +-1: nothing to see)
        assert np.max(np.abs(after[:, -1] - before[:, -1])) > 1e-6  # the future did change


# --- padding -------------------------------------------------------------------------

PADDING_KINDS = ["mha", "encoder_block", "encoder", "decoder_block"]


@pytest.mark.parametrize("kind", PADDING_KINDS)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    extra=st.integers(1, 3),
    positions=st.sampled_from([None, "sinusoidal", "learned", "rotary"]),
    norm_first=st.booleans(),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_padding_never_changes_real_tokens(
    backend, kind, batch, seq, extra, positions, norm_first, dtype, seed
) -> None:
    """Real tokens padded with junk under a padding mask give the outputs they give alone.

    For the decoder block the padded sequence is the memory (its self-attention is causal,
    so trailing padding cannot reach the real tokens anyway).
    """
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, seq + 1, size=batch)]
    total = seq + extra  # every sequence gets at least `extra` padding tokens
    if kind == "encoder":
        options = dict(norm_first=norm_first, positions=positions, pooling=None)
    elif kind == "mha":
        options = dict(rotary=positions == "rotary")
    else:
        options = dict(norm_first=norm_first, rotary=positions == "rotary")
    module = build(kind, backend, dtype, seed, **options)
    padded = rng.normal(size=(batch, total, 8)) * 5  # junk everywhere ...
    real = [rng.normal(size=(1, n, 8)) for n in lengths]
    for b, n in enumerate(lengths):
        padded[b, :n] = real[b][0]  # ... but the real tokens
    mask = padding_mask(lengths, total, backend=backend)
    if kind == "decoder_block":
        x = rng.normal(size=(batch, 4, 8))
        memory = put(backend, padded, dtype)
        out = host(backend, module(put(backend, x, dtype), memory, memory_mask=mask))
        for b in range(batch):
            alone = module(put(backend, x[b : b + 1], dtype), put(backend, real[b], dtype))
            assert_close(out[b : b + 1], host(backend, alone), dtype, f"sequence {b}")
        return
    out = host(backend, module(put(backend, padded, dtype), mask=mask))
    for b, n in enumerate(lengths):
        alone = host(backend, module(put(backend, real[b], dtype)))
        assert_close(out[b : b + 1, :n], alone, dtype, f"sequence {b} of length {n}")


@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    extra=st.integers(1, 3),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_mean_pooling_ignores_padding(backend, batch, seq, extra, dtype, seed) -> None:
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, seq + 1, size=batch)]
    enc = Encoder(1, 8, 2, 16, pooling="mean", positions="sinusoidal", backend=backend, seed=seed)
    enc.to(dtype=dtype)
    padded = rng.normal(size=(batch, seq + extra, 8)) * 5
    mask = padding_mask(lengths, seq + extra, backend=backend)
    pooled = host(backend, enc(put(backend, padded, dtype), mask=mask))
    for b, n in enumerate(lengths):
        alone = host(backend, enc(put(backend, padded[b : b + 1, :n], dtype)))
        assert_close(pooled[b : b + 1], alone, dtype)


# --- backends agree ------------------------------------------------------------------


@given(
    seq=st.integers(1, 6),
    hd=heads(),
    positions=st.sampled_from([None, "sinusoidal", "learned", "rotary"]),
    norm_first=st.booleans(),
    activation=st.sampled_from(["relu", "gelu", "gelu_tanh"]),
    causal=st.booleans(),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_same_seed_same_outputs_on_every_backend(
    backend, seq, hd, positions, norm_first, activation, causal, dtype, seed
) -> None:
    """An encoder built from the same seed gives the same outputs here as on numpy."""
    n_heads, n_kv_heads, d_head = hd
    options = dict(
        n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head, positions=positions,
        norm_first=norm_first, activation=activation,
    )  # fmt: skip
    numpy = tinytx.get_backend("numpy")
    here = build("encoder", backend, dtype, seed, **options)
    reference = build("encoder", numpy, dtype, seed, **options)
    x = np.random.default_rng(seed).normal(size=(2, seq, n_heads * d_head))
    mask = padding_mask([seq, max(1, seq - 1)], seq, backend=backend)
    out, weights = here(put(backend, x, dtype), mask=mask, causal=causal, return_weights=True)
    ref_out, ref_weights = reference(
        put(numpy, x, dtype), mask=padding_mask([seq, max(1, seq - 1)], seq, backend=numpy),
        causal=causal, return_weights=True,
    )  # fmt: skip
    assert_close(host(backend, out), ref_out, dtype, "outputs")
    for w, ref_w in zip(weights, ref_weights, strict=True):
        assert_close(host(backend, w), ref_w, dtype, "attention weights")


# --- softmax -------------------------------------------------------------------------


def float_rows(dtype, min_value=-100.0, max_value=100.0):
    width = 32 if dtype == "float32" else 64
    elements = st.floats(min_value, max_value, width=width, allow_subnormal=False)
    shapes = hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6)
    return hnp.arrays(np.dtype(dtype), shapes, elements=elements)


@given(data=st.data(), dtype=DTYPES, shift=st.floats(-50.0, 50.0))
def test_softmax_is_shift_invariant(backend, data, dtype, shift) -> None:
    """softmax(x + c) == softmax(x), c constant along the row."""
    x = data.draw(float_rows(dtype, -20.0, 20.0), label="x")
    row_shifts = data.draw(
        hnp.arrays(np.float64, x.shape[:-1] + (1,), elements=st.floats(-1.0, 1.0)), label="c"
    )
    shifted = (x + shift * row_shifts).astype(dtype)
    p = host(backend, F.softmax(put(backend, x, dtype)))
    p_shifted = host(backend, F.softmax(put(backend, shifted, dtype)))
    # rounding x + c costs up to eps * (|x| + |c|) in each logit
    tol = 4 * EPS[dtype] * (20.0 + abs(shift)) + 10 * EPS[dtype]
    np.testing.assert_allclose(p_shifted, p, atol=tol, rtol=0)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=10 * x.shape[-1] * EPS[dtype])


@given(data=st.data(), dtype=DTYPES)
def test_softmax_is_finite_at_extreme_logits(backend, data, dtype) -> None:
    """Logits of +-1e4 (and anything between) stay finite, non-negative, summing to 1."""
    x = data.draw(float_rows(dtype, -1e4, 1e4), label="x")
    x = np.where(data.draw(hnp.arrays(bool, x.shape), label="extreme"), np.sign(x) * 1e4, x)
    p = host(backend, F.softmax(put(backend, x, dtype)))
    assert np.all(np.isfinite(p)) and np.all(p >= 0) and np.all(p <= 1)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=10 * x.shape[-1] * EPS[dtype])
    # the largest logit of each row gets the largest weight
    top = np.take_along_axis(p, np.argmax(x, axis=-1)[..., None], axis=-1)
    np.testing.assert_array_equal(top[..., 0], p.max(-1))


@given(data=st.data(), dtype=DTYPES)
def test_masked_softmax(backend, data, dtype) -> None:
    """A masked softmax is the softmax of the kept entries alone; nothing kept -> zeros."""
    x = data.draw(float_rows(dtype, -30.0, 30.0), label="x")
    mask = data.draw(hnp.arrays(bool, x.shape), label="mask")
    p = host(backend, F.softmax(put(backend, x, dtype), mask=backend.asarray(mask)))
    assert np.all(np.isfinite(p)) and np.all(p[~mask] == 0)
    kept = mask.any(-1)
    assert np.all(p[~kept] == 0)
    for index in zip(*np.nonzero(kept), strict=True):
        row, keep = x[index], mask[index]
        alone = host(backend, F.softmax(put(backend, row[keep], dtype)))
        np.testing.assert_allclose(p[index][keep], alone, atol=4 * EPS[dtype], rtol=4 * EPS[dtype])


# --- grouped-query attention ---------------------------------------------------------


@given(hd=heads(), seq=st.integers(1, 5), dtype=DTYPES, seed=SEEDS)
def test_gqa_with_as_many_kv_heads_as_heads_is_mha(backend, hd, seq, dtype, seed) -> None:
    n_heads, _, d_head = hd
    d_model = n_heads * d_head
    mha = MultiHeadAttention(d_model, n_heads, backend=backend, seed=seed).to(dtype=dtype)
    gqa = MultiHeadAttention(d_model, n_heads, n_kv_heads=n_heads, backend=backend, seed=seed + 1)
    gqa.to(dtype=dtype).load_state_dict(mha.state_dict())  # the same weights
    x = put(backend, np.random.default_rng(seed).normal(size=(2, seq, d_model)), dtype)
    out, w = mha(x, causal=True, return_weights=True)
    out_gqa, w_gqa = gqa(x, causal=True, return_weights=True)
    np.testing.assert_array_equal(host(backend, out_gqa), host(backend, out))
    np.testing.assert_array_equal(host(backend, w_gqa), host(backend, w))


@given(hd=heads(), seq=st.integers(1, 5), dtype=DTYPES, seed=SEEDS)
def test_gqa_is_mha_with_repeated_kv_heads(backend, hd, seq, dtype, seed) -> None:
    """GQA == MHA whose K and V projections repeat each key/value head for its group of
    consecutive query heads (the repeat_kv semantics)."""
    n_heads, n_kv_heads, d_head = hd
    d_model, group = n_heads * d_head, n_heads // n_kv_heads
    gqa = MultiHeadAttention(d_model, n_heads, n_kv_heads=n_kv_heads, backend=backend, seed=seed)
    gqa.to(dtype=dtype)
    sd = gqa.state_dict()
    d_kv = n_kv_heads * d_head

    def expand(rows):  # (n_kv_heads * d_head, ...) -> (n_heads * d_head, ...)
        per_head = rows.reshape(n_kv_heads, d_head, *rows.shape[1:])
        return np.repeat(per_head, group, axis=0).reshape(d_model, *rows.shape[1:])

    full = {"out_proj.weight": sd["out_proj.weight"], "out_proj.bias": sd["out_proj.bias"]}
    for name in ("in_proj_weight", "in_proj_bias"):
        w = sd[name]
        q_rows, k_rows, v_rows = w[:d_model], w[d_model : d_model + d_kv], w[d_model + d_kv :]
        full[name] = np.concatenate([q_rows, expand(k_rows), expand(v_rows)])
    mha = MultiHeadAttention(d_model, n_heads, backend=backend).to(dtype=dtype)
    mha.load_state_dict(full)
    x = put(backend, np.random.default_rng(seed).normal(size=(2, seq, d_model)), dtype)
    assert_close(host(backend, gqa(x)), host(backend, mha(x)), dtype)


@given(hd=heads(), sq=st.integers(1, 4), sk=st.integers(1, 5), dtype=DTYPES, seed=SEEDS)
def test_repeat_kv_semantics(backend, hd, sq, sk, dtype, seed) -> None:
    """repeat_kv is numpy.repeat along the heads; attention with fewer kv heads equals
    attention with the repeated ones."""
    n_heads, n_kv_heads, d = hd
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, n_heads, sq, d))
    k, v = rng.normal(size=(2, 2, n_kv_heads, sk, d))
    group = n_heads // n_kv_heads
    repeated = host(backend, F.repeat_kv(put(backend, k, dtype), n_heads))
    np.testing.assert_array_equal(repeated, np.repeat(k, group, axis=1).astype(dtype))
    out, w = F.scaled_dot_product_attention(*(put(backend, a, dtype) for a in (q, k, v)))
    out_full, w_full = F.scaled_dot_product_attention(
        *(put(backend, a, dtype) for a in (q, np.repeat(k, group, 1), np.repeat(v, group, 1)))
    )
    assert_close(host(backend, out), host(backend, out_full), dtype)
    assert_close(host(backend, w), host(backend, w_full), dtype)


# --- norms and activations -----------------------------------------------------------


@given(data=st.data(), dtype=DTYPES, eps=st.sampled_from([1e-5, 1e-2, 1.0]))
def test_layer_norm_rows_have_zero_mean_unit_variance(backend, data, dtype, eps) -> None:
    """mean(y) = 0 and var(y) = var(x) / (var(x) + eps) per row (1 when var >> eps)."""
    x = data.draw(float_rows(dtype, -1e3, 1e3), label="x")
    y = host(backend, F.layer_norm(put(backend, x, dtype), eps=eps)).astype(np.float64)
    x64 = x.astype(np.float64)
    var = x64.var(-1)
    d = x.shape[-1]
    # rounding in the centring, relative to the output's scale
    tol = 4 * (d + 2) * EPS[dtype] * (np.abs(x64).max(-1) / np.sqrt(var + eps) + 1)
    assert np.all(np.abs(y.mean(-1)) <= tol)
    assert np.all(np.abs(y.var(-1) - var / (var + eps)) <= 2 * tol)


@given(data=st.data(), dtype=DTYPES, eps=st.sampled_from([1e-6, 1e-2]))
def test_rms_norm_definition(backend, data, dtype, eps) -> None:
    """y = x / sqrt(mean(x^2) + eps) * w, so mean(y^2) = ms / (ms + eps) without a weight."""
    x = data.draw(float_rows(dtype, -1e3, 1e3), label="x")
    w = data.draw(hnp.arrays(np.dtype(dtype), x.shape[-1:], elements=st.floats(-2, 2, width=32)))
    x64 = x.astype(np.float64)
    ms = np.mean(x64 * x64, axis=-1, keepdims=True)
    want = x64 / np.sqrt(ms + eps) * w
    got = host(backend, F.rms_norm(put(backend, x, dtype), put(backend, w, dtype), eps=eps))
    np.testing.assert_allclose(got, want, atol=20 * EPS[dtype], rtol=20 * EPS[dtype])
    plain = host(backend, F.rms_norm(put(backend, x, dtype), eps=eps)).astype(np.float64)
    tol = 20 * x.shape[-1] * EPS[dtype]
    np.testing.assert_allclose(np.mean(plain * plain, -1), (ms / (ms + eps))[..., 0], atol=tol)


def gelu_erf(v: float) -> float:
    return 0.5 * v * math.erfc(-v / math.sqrt(2))  # = x/2 (1 + erf(x / sqrt 2)), no cancel


def gelu_tanh(v: float) -> float:
    return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))


@given(data=st.data(), dtype=DTYPES)
def test_gelu_matches_the_erf_definition(backend, data, dtype) -> None:
    """GELU(x) = x/2 (1 + erf(x / sqrt 2)) to float32 precision, computed with math.erf on
    the host; and the tanh form matches its formula."""
    width = 32 if dtype == "float32" else 64
    shape = hnp.array_shapes(min_dims=1, max_dims=2, max_side=8)
    x = data.draw(hnp.arrays(np.dtype(dtype), shape, elements=st.floats(-30, 30, width=width)))
    xb = put(backend, x, dtype)
    exact = np.vectorize(gelu_erf)(x.astype(np.float64))
    x64 = x.astype(np.float64)
    erf_form = 0.5 * x64 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    np.testing.assert_allclose(exact, erf_form, atol=1e-12)  # the two forms agree
    got = host(backend, F.gelu(xb))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, exact, atol=1e-6, rtol=1e-6)
    got_tanh = host(backend, F.gelu(xb, approximate="tanh"))
    want_tanh = np.vectorize(gelu_tanh)(x.astype(np.float64))
    np.testing.assert_allclose(got_tanh, want_tanh, atol=1e-6, rtol=1e-6)
