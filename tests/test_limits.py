"""Behaviour at the limits, as documented in tinytx.functional's docstrings.

- softmax / attention with +inf scores: the limit as those scores grow together (equal
  shares among them, 0 elsewhere);
- gelu at +-inf, exact and tanh forms: +inf and 0;
- LayerNorm / RMSNorm at magnitudes whose squares overflow: finite, equal to the result
  at a harmless magnitude (both are scale-invariant when eps is negligible);
- attention with a non-finite or non-positive scale: a clear error;
- NaN only where the input held NaN (row-wise for the row operations).
Every case on every backend; on NumPy the natives give the definition's numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from native_helpers import definition

from tinytx import functional as F
from tinytx.plugins import available_attention, get_attention

INF, NAN = np.inf, np.nan
DTYPES = ("float32", "float64")


def host(backend, x) -> np.ndarray:
    return np.asarray(backend.to_numpy(x))


# --- softmax and attention with +inf ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_of_infinite_logits_is_the_limit(backend, dtype) -> None:
    rows = np.array(
        [
            [INF, 0.0, INF, -INF],  # two +inf: half each
            [INF, 1e30, -1e30, 5.0],  # one +inf takes everything
            [INF, NAN, 0.0, 0.0],  # NaN in the row: NaN (the input had NaN)
            [1.0, 2.0, 3.0, 4.0],  # an ordinary row is untouched
        ],
        dtype=dtype,
    )
    y = host(backend, F.softmax(backend.asarray(rows)))
    np.testing.assert_array_equal(y[0], [0.5, 0.0, 0.5, 0.0])
    np.testing.assert_array_equal(y[1], [1.0, 0.0, 0.0, 0.0])
    assert np.all(np.isnan(y[2]))
    expected = np.exp(rows[3] - 4.0) / np.exp(rows[3] - 4.0).sum()
    np.testing.assert_allclose(y[3], expected, rtol=8 * np.finfo(dtype).eps)
    assert np.all(np.isfinite(np.delete(y, 2, axis=0)))


def test_masked_infinite_logits_do_not_count(backend) -> None:
    x = backend.asarray(np.array([[INF, 1.0, 1.0], [INF, INF, 0.0]], dtype=np.float32))
    mask = backend.asarray(np.array([[False, True, True], [True, False, True]]))
    y = host(backend, F.softmax(x, mask=mask))
    np.testing.assert_array_equal(y, [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


def test_numpy_softmax_native_gives_the_limit_too(numpy_backend) -> None:
    rows = np.array([[INF, 0.0, INF, -INF], [INF, NAN, 0, 0], [0, 1, 2, 3]], dtype=np.float32)
    mask = np.array([True, True, False, True])
    for m in (None, mask):
        with np.errstate(invalid="ignore"):
            native = F.softmax(rows, mask=m)
            reference = definition(F.softmax, rows, mask=m)
        np.testing.assert_array_equal(native, reference)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_attention_with_overflowing_scores_gives_the_limit(backend) -> None:
    """q . k overflows to +inf for key 2 only: every query attends to key 2 alone."""
    q = np.ones((1, 1, 3, 2), dtype=np.float32)
    k = np.zeros((1, 1, 4, 2), dtype=np.float32)
    k[0, 0, 2] = 3e38
    v = np.arange(8, dtype=np.float32).reshape(1, 1, 4, 2)
    xs = [backend.asarray(a) for a in (q, k, v)]
    for attend in (F.scaled_dot_product_attention, get_attention("softmax")):
        out, weights = attend(*xs)
        w = host(backend, weights)
        np.testing.assert_array_equal(w[0, 0], np.tile([0.0, 0.0, 1.0, 0.0], (3, 1)))
        np.testing.assert_array_equal(host(backend, out)[0, 0], np.tile(v[0, 0, 2], (3, 1)))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("block_size", [1, 2, 256])
def test_blockwise_gives_the_same_limit_across_key_blocks(backend, block_size) -> None:
    """Keys 1 and 4 give +inf scores, in different blocks: each gets half, as softmax's."""
    q = np.ones((1, 1, 3, 2), dtype=np.float32)
    k = np.zeros((1, 1, 5, 2), dtype=np.float32)
    k[0, 0, [1, 4]] = 3e38
    v = np.arange(10, dtype=np.float32).reshape(1, 1, 5, 2)
    xs = [backend.asarray(a) for a in (q, k, v)]
    out, _ = get_attention("blockwise")(*xs, block_size=block_size)
    expected = (v[0, 0, 1] + v[0, 0, 4]) / 2  # (2,)
    np.testing.assert_array_equal(host(backend, out)[0, 0], np.tile(expected, (3, 1)))


# --- gelu ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_through_a_backends_own_erf_keeps_the_limits(numpy_backend, monkeypatch, dtype):
    """A backend with its own erf (CuPy's) takes x/2 (1 + erf(x / sqrt 2)): the same limits
    as the definition, 0 at -inf (not -inf * 0 = NaN). Found on an H200, 2026-12-04."""
    import math

    exact_erf = np.vectorize(math.erf, otypes=[dtype])
    monkeypatch.setitem(numpy_backend.natives, "erf", lambda a: exact_erf(a).astype(a.dtype))
    monkeypatch.delitem(numpy_backend.natives, "gelu")
    big = float(np.finfo(dtype).max)
    x = np.array([INF, -INF, big, -big, 0.0, NAN, 1.0], dtype=dtype)
    y = F.gelu(numpy_backend.asarray(x))
    np.testing.assert_array_equal(y[:5], [INF, 0.0, big, 0.0, 0.0])
    assert np.isnan(y[5]) and abs(y[6] - 0.8413447460685429) < 1e-6


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_at_the_infinities(backend, approximate, dtype) -> None:
    big = float(np.finfo(dtype).max)
    x = np.array([INF, -INF, big, -big, 0.0, NAN, 1.0], dtype=dtype)
    y = host(backend, F.gelu(backend.asarray(x), approximate=approximate))
    np.testing.assert_array_equal(y[:5], [INF, 0.0, big, 0.0, 0.0])
    assert np.isnan(y[5]) and np.isfinite(y[6])  # NaN only where x is NaN


def test_numpy_gelu_native_equals_the_definition_at_the_infinities(numpy_backend) -> None:
    x = np.array([INF, -INF, 3e38, -3e38, 1e4, -1e4, 40.0, -40.0, NAN], dtype=np.float32)
    np.testing.assert_array_equal(F.gelu(x), definition(F.gelu, x))


# --- LayerNorm and RMSNorm where squares overflow ---------------------------------------


def norm_cases(dtype: str) -> np.ndarray:
    """Rows at 1, at a magnitude whose squares overflow, near the largest float."""
    base = np.array([[1.0, -2.0, 3.0, 0.5], [4.0, -1.0, 0.0, 2.0]], dtype=dtype)  # (2, 4)
    huge = float(np.finfo(dtype).max) / 8
    overflow = np.sqrt(float(np.finfo(dtype).max)) * 4  # its square overflows
    return base, np.concatenate([base, base * overflow, base * (huge / 4)]).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_norms_where_squares_overflow(backend, dtype, norm) -> None:
    base, x = norm_cases(dtype)
    fn = getattr(F, norm)
    y = host(backend, fn(backend.asarray(x), eps=0.0))  # (6, 4)
    assert np.all(np.isfinite(y)), y
    # x -> c x leaves the norm unchanged (eps 0): every magnitude gives the first rows'
    # numbers, up to the rounding of x / s (none: s is a power of two) and of the mean,
    # variance and division: (d + 4) eps relative.
    reference = y[:2]  # (2, 4)
    tol = (4 + 4) * np.finfo(dtype).eps * np.maximum(np.abs(reference), 1.0)
    for start in (2, 4):
        assert np.all(np.abs(y[start : start + 2] - reference) <= tol)
    constant = backend.asarray(np.full((1, 4), float(np.finfo(dtype).max), dtype=dtype))
    y = host(backend, fn(constant))
    if norm == "layer_norm":
        np.testing.assert_array_equal(y, 0.0)  # a constant row: all zeros, not NaN
    else:
        np.testing.assert_allclose(y, 1.0, rtol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_norms_give_nan_only_in_rows_with_nan(backend, norm) -> None:
    x = np.array([[1.0, NAN, 2.0], [1.0, 2.0, 3.0], [INF, 1.0, 0.0]], dtype=np.float32)
    with np.errstate(invalid="ignore"):
        y = host(backend, getattr(F, norm)(backend.asarray(x)))
    assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1]))
    assert np.all(np.isnan(y[2]))  # documented: a row holding +-inf has no finite norm


def test_numpy_layer_norm_native_equals_the_definition_at_overflow(numpy_backend) -> None:
    _, x = norm_cases("float32")
    with np.errstate(over="ignore", invalid="ignore"):
        native = F.layer_norm(x, eps=1e-5)
    np.testing.assert_array_equal(native, definition(F.layer_norm, x, eps=1e-5))


# --- attention's scale --------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, -1.0, INF, -INF, NAN])
def test_attention_refuses_a_non_finite_or_non_positive_scale(backend, scale) -> None:
    q = backend.asarray(np.ones((1, 1, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0 \(or None\)"):
        F.scaled_dot_product_attention(q, q, q, scale=scale)
    for name in available_attention():
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            get_attention(name)(q, q, q, scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, [1.0]])
def test_attention_refuses_a_scale_that_is_not_a_number(backend, scale) -> None:
    q = backend.asarray(np.ones((1, 1, 2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="scale must be a number > 0"):
        F.scaled_dot_product_attention(q, q, q, scale=scale)
