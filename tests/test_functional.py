"""tinytx.functional against plain NumPy references, on every backend.

The hypothesis property tests (random shapes, dtypes, values) are in test_properties.py;
these are fixed examples with hand-written references and the error paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinytx import functional as F

RNG = np.random.default_rng(1234)
TOL = {"float32": 2e-6, "float64": 1e-12}


def np_softmax(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    x = x.astype(np.float64)
    if mask is not None:
        x = np.where(mask, x, -np.inf)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    return e / np.where(s > 0, s, 1.0)


def np_attention(q, k, v, mask=None, causal=False, scale=None):
    """Reference attention in float64 with an explicit loop over heads."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    b, h, sq, d = q.shape
    group = h // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = 1 / math.sqrt(d) if scale is None else scale
    scores = q @ np.swapaxes(k, -1, -2) * scale
    allowed = np.ones(scores.shape, dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask, scores.shape)
    if causal:
        sk = k.shape[2]
        allowed &= np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
    w = np_softmax(scores, allowed)
    return w @ v, w


def put(backend, host, dtype="float32"):
    return backend.asarray(host, dtype=dtype)


def check(backend, got, want, dtype="float32", tol=None) -> None:
    got = backend.to_numpy(got)
    assert got.dtype == np.dtype(dtype), f"dtype {got.dtype}, expected {dtype}"
    np.testing.assert_allclose(got, want, atol=tol or TOL[dtype], rtol=tol or TOL[dtype])


# --- activations ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu(backend, dtype) -> None:
    x = RNG.normal(size=(3, 4))
    check(backend, F.relu(put(backend, x, dtype)), np.maximum(x, 0), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_erf_matches_math_erf(backend, dtype) -> None:
    x = np.concatenate([np.linspace(-6, 6, 241), [0.0, 1e-8, -1e-8, 30.0, -30.0]])
    x = x.astype(dtype)
    want = np.array([math.erf(float(v)) for v in x])
    got = backend.to_numpy(F.erf(put(backend, x, dtype)))
    assert got.dtype == np.dtype(dtype)
    assert np.max(np.abs(got - want)) < 1e-6
    big = np.abs(x) >= 6
    assert np.all(got[big] == np.sign(x[big]))  # saturates to exactly +-1
    assert np.all(got[x == 0] == 0.0)  # the Taylor branch near 0: erf(0) is exactly 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_erf_is_odd_and_relatively_accurate_near_zero(backend, dtype) -> None:
    x = np.concatenate([np.geomspace(1e-12, 0.49, 50), [0.5, 0.7]]).astype(dtype)
    got = backend.to_numpy(F.erf(put(backend, x, dtype)))
    negated = backend.to_numpy(F.erf(put(backend, -x, dtype)))
    np.testing.assert_array_equal(negated, -got)  # erf(-x) = -erf(x), exactly
    want = np.array([math.erf(float(v)) for v in x])
    taylor = np.abs(x) < 0.5  # float64 is near-exact there; elsewhere float32-accurate
    tolerance = 1e-6 if dtype == "float32" else 1e-9
    np.testing.assert_allclose(got[taylor], want[taylor], rtol=tolerance)  # relative, tiny x too
    np.testing.assert_allclose(got[~taylor], want[~taylor], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_exact_and_tanh(backend, dtype) -> None:
    x = np.linspace(-10, 10, 401).astype(dtype)
    exact = np.array([0.5 * float(v) * math.erfc(-float(v) / math.sqrt(2)) for v in x])
    c = math.sqrt(2 / math.pi)
    tanh = np.array(
        [0.5 * float(v) * (1 + math.tanh(c * (float(v) + 0.044715 * float(v) ** 3))) for v in x]
    )
    xb = put(backend, x, dtype)
    check(backend, F.gelu(xb), exact, dtype, tol=1e-6)
    check(backend, F.gelu(xb, approximate="tanh"), tanh, dtype, tol=1e-6)
    # the two forms differ (by up to ~5e-4), so the flag really switches the formula
    assert np.max(np.abs(exact - tanh)) > 1e-4


def test_gelu_rejects_bad_arguments(backend) -> None:
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        F.gelu(put(backend, np.ones(2)), approximate="fast")
    with pytest.raises(TypeError, match="floating-point"):
        F.gelu(backend.asarray(np.arange(3)))
    with pytest.raises(TypeError, match="floating-point"):
        F.erf(backend.asarray(np.arange(3)))


# --- softmax and norms ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_matches_numpy(backend, dtype) -> None:
    x = RNG.normal(size=(2, 3, 5)) * 3
    check(backend, F.softmax(put(backend, x, dtype)), np_softmax(x), dtype)
    # along another axis
    got = F.softmax(put(backend, x, dtype), axis=1)
    want = np.moveaxis(np_softmax(np.moveaxis(x, 1, -1)), -1, 1)
    check(backend, got, want, dtype)


def test_softmax_mask_and_fully_masked_rows(backend) -> None:
    x = RNG.normal(size=(3, 4))
    mask = np.array([[True, False, True, True], [False] * 4, [False, False, False, True]])
    got = backend.to_numpy(F.softmax(put(backend, x), mask=backend.asarray(mask)))
    np.testing.assert_allclose(got, np_softmax(x, mask), atol=2e-6)
    assert np.all(got[~mask] == 0)  # masked entries are exactly zero
    assert np.all(got[1] == 0)  # nothing allowed: zeros, not NaN
    assert got[2, 3] == 1.0
    # a row of -inf logits (no mask) also gives zeros
    minus_inf = backend.to_numpy(F.softmax(put(backend, np.full((1, 3), -np.inf))))
    assert np.all(minus_inf == 0)


def test_softmax_extreme_logits_stay_finite(backend) -> None:
    x = np.array([[1e4, -1e4, 0.0], [1e4, 1e4, 1e4], [-1e4, -1e4, -1e4]])
    got = backend.to_numpy(F.softmax(put(backend, x)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, [[1, 0, 0], [1 / 3] * 3, [1 / 3] * 3], atol=1e-6)


def test_softmax_rejects_integers(backend) -> None:
    with pytest.raises(TypeError, match="softmax input must be a real floating-point"):
        F.softmax(backend.asarray(np.arange(4)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_norm_matches_numpy(backend, dtype) -> None:
    x = RNG.normal(size=(2, 3, 8)) * 4 + 1
    w, b = RNG.normal(size=8), RNG.normal(size=8)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)  # biased, as in PyTorch
    want = (x - mean) / np.sqrt(var + 1e-5) * w + b
    got = F.layer_norm(put(backend, x, dtype), put(backend, w, dtype), put(backend, b, dtype))
    check(backend, got, want, dtype, tol=1e-5 if dtype == "float32" else 1e-12)
    plain = (x - mean) / np.sqrt(var + 0.1)
    check(backend, F.layer_norm(put(backend, x, dtype), eps=0.1), plain, dtype, tol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rms_norm_matches_numpy(backend, dtype) -> None:
    x = RNG.normal(size=(4, 6)) * 3
    w = RNG.normal(size=6)
    want = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w
    check(backend, F.rms_norm(put(backend, x, dtype), put(backend, w, dtype)), want, dtype, 1e-5)
    unweighted = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    check(backend, F.rms_norm(put(backend, x, dtype)), unweighted, dtype, 1e-5)


def test_norms_of_a_constant_row_are_finite(backend) -> None:
    x = put(backend, np.full((2, 5), 3.0))
    assert np.all(backend.to_numpy(F.layer_norm(x)) == 0)
    zeros = backend.to_numpy(F.rms_norm(put(backend, np.zeros((2, 5)))))
    assert np.all(zeros == 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_linear(backend, dtype) -> None:
    x, w, b = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(5, 4)), RNG.normal(size=5)
    got = F.linear(put(backend, x, dtype), put(backend, w, dtype), put(backend, b, dtype))
    check(backend, got, x @ w.T + b, dtype, tol=1e-5)
    check(backend, F.linear(put(backend, x, dtype), put(backend, w, dtype)), x @ w.T, dtype, 1e-5)


# --- masks and attention -------------------------------------------------------------


def test_causal_mask(backend) -> None:
    got = backend.to_numpy(F.causal_mask(3, 3, xp=backend.xp, device=backend.device))
    np.testing.assert_array_equal(got, np.tril(np.ones((3, 3), dtype=bool)))
    # with a key/value cache the 2 queries are the last 2 of 4 positions
    cached = backend.to_numpy(F.causal_mask(2, 4, xp=backend.xp, device=backend.device))
    np.testing.assert_array_equal(cached, [[1, 1, 1, 0], [1, 1, 1, 1]])
    assert cached.dtype == np.bool_


def test_repeat_kv_groups_consecutive_heads(backend) -> None:
    kv = RNG.normal(size=(2, 2, 3, 4))  # 2 key/value heads
    got = backend.to_numpy(F.repeat_kv(put(backend, kv, "float64"), 6))
    assert got.shape == (2, 6, 3, 4)
    for h in range(6):  # query heads 0-2 share kv head 0, heads 3-5 kv head 1
        np.testing.assert_array_equal(got[:, h], kv[:, h // 3])
    same = put(backend, kv, "float64")
    assert F.repeat_kv(same, 2) is same
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        F.repeat_kv(same, 3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(backend, dtype, causal) -> None:
    q, k, v = (
        RNG.normal(size=(2, 4, 3, 8)),
        RNG.normal(size=(2, 2, 5, 8)),
        RNG.normal(size=(2, 2, 5, 6)),
    )
    mask = RNG.random(size=(2, 1, 3, 5)) < 0.7
    mask[..., -1] = True
    want_out, want_w = np_attention(q, k, v, mask, causal, scale=0.4)
    out, w = F.scaled_dot_product_attention(
        put(backend, q, dtype), put(backend, k, dtype), put(backend, v, dtype),
        mask=backend.asarray(mask), causal=causal, scale=0.4,
    )  # fmt: skip
    assert tuple(out.shape) == (2, 4, 3, 6) and tuple(w.shape) == (2, 4, 3, 5)
    check(backend, out, want_out, dtype, tol=1e-5 if dtype == "float32" else 1e-12)
    check(backend, w, want_w, dtype, tol=1e-5 if dtype == "float32" else 1e-12)


def test_attention_default_scale_is_inverse_sqrt_d(backend) -> None:
    q, k, v = (RNG.normal(size=(1, 2, 3, 16)) for _ in range(3))
    out, _ = F.scaled_dot_product_attention(*(put(backend, a, "float64") for a in (q, k, v)))
    check(backend, out, np_attention(q, k, v)[0], "float64")


def test_attention_fully_masked_row_gives_zeros(backend) -> None:
    q, k, v = (RNG.normal(size=(1, 2, 3, 4)) for _ in range(3))
    mask = np.ones((1, 1, 3, 3), dtype=bool)
    mask[0, 0, 1] = False  # query 1 may look at nothing
    out, w = F.scaled_dot_product_attention(
        *(put(backend, a) for a in (q, k, v)), mask=backend.asarray(mask)
    )
    out, w = backend.to_numpy(out), backend.to_numpy(w)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
    assert np.all(out[:, :, 1] == 0) and np.all(w[:, :, 1] == 0)
    np.testing.assert_allclose(w[:, :, [0, 2]].sum(-1), 1, atol=1e-6)


def test_attention_keeps_float32(backend) -> None:
    """No silent float64 upcast (picoGPT's lesson): float32 in, float32 out."""
    q = put(backend, RNG.normal(size=(1, 1, 2, 8)))
    out, w = F.scaled_dot_product_attention(q, q, q, causal=True)
    assert out.dtype == backend.xp.float32 and w.dtype == backend.xp.float32


def test_attention_input_errors(backend) -> None:
    q = put(backend, np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"q must be 4-D \(batch, heads, seq, d\)"):
        F.scaled_dot_product_attention(put(backend, np.zeros((2, 3, 4))), q, q)
    with pytest.raises(TypeError, match="share one floating dtype"):
        F.scaled_dot_product_attention(q, put(backend, np.zeros((1, 2, 3, 4)), "float64"), q)
    with pytest.raises(ValueError, match="heads a multiple of heads_kv"):
        F.scaled_dot_product_attention(q, put(backend, np.zeros((1, 2, 3, 5))), q)
    with pytest.raises(ValueError, match="heads a multiple of heads_kv"):
        k3 = put(backend, np.zeros((1, 3, 3, 4)))
        F.scaled_dot_product_attention(q, k3, k3)
    with pytest.raises(TypeError, match="mask must be boolean"):
        F.scaled_dot_product_attention(q, q, q, mask=put(backend, np.ones((3, 3))))
    with pytest.raises(ValueError, match=r"does not broadcast to \(batch, heads, seq_q, seq_k\)"):
        F.scaled_dot_product_attention(q, q, q, mask=backend.asarray(np.ones((2, 2), dtype=bool)))
    with pytest.raises(ValueError, match="does not broadcast"):
        bad = backend.asarray(np.ones((1, 1, 1, 1, 3), dtype=bool))
        F.scaled_dot_product_attention(q, q, q, mask=bad)
