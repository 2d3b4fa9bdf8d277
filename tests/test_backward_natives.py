"""The NumPy backend's backward natives compute what tinytx.functional's definitions compute.

As in tests/test_natives.py: each backward runs twice on the same input, once as the
library runs it (the native) and once with the natives switched off (the readable
array-API definition), with blocks shrunk so that small inputs already take the
threaded, many-block path.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from native_helpers import definition, without_numba

import tinytx
from tinytx import functional as F
from tinytx.backends import numpy_backward_natives, numpy_natives

BACKWARD_NAMES = (
    "gelu_backward",
    "layer_norm_backward",
    "linear_backward",
    "relu_backward",
    "softmax_backward",
)
DTYPES = (np.float32, np.float64)

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks and no size threshold: every input is cut up and spread over threads."""
    monkeypatch.setattr(numpy_natives, "_BLOCK_ELEMENTS", 8)
    monkeypatch.setattr(numpy_natives, "_PARALLEL_MIN_ELEMENTS", 0)
    before = numpy_natives.get_num_threads()
    numpy_natives.set_num_threads(2)
    yield
    numpy_natives.set_num_threads(before)


def random_array(seed: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(dtype)


def test_numpy_backend_lists_the_backward_natives(numpy_backend: tinytx.Backend) -> None:
    for name in BACKWARD_NAMES:
        native = getattr(numpy_backward_natives, name)
        assert numpy_backend.natives[name] is native
        assert F._native(numpy_backend.xp, name) is native


def check_softmax_backward(backend, shape, seed, masked) -> None:
    """Against the exact result (float64 from the same float32 inputs). Per row, with
    s = sum_j dy_j y_j: the kernel's float32 sum is off by at most n eps sum_j |dy_j y_j|
    (any order of n additions, products included), and y (dy - s) adds two roundings:
    |dx_j - exact_j| <= |y_j| (n + 1) eps sum |dy y| + 2 eps |y_j| (|dy_j| + |s|) (+ the
    smallest normal, for products that fall below it). Rows with masked entries (y = 0)
    and fully masked rows (all 0: dx = 0) included; the definition meets the same bound."""
    from tinytx.backends import numba_kernels

    rng = np.random.default_rng(seed)
    scores = random_array(seed, shape, np.float32)
    scores[rng.random(shape) < masked] = -np.inf
    y = definition(F.softmax, backend.asarray(scores))  # rows sum to 1, or all 0
    grad_y = backend.asarray(random_array(seed + 1, shape, np.float32))
    native = numpy_backward_natives.softmax_backward(grad_y, y)
    if not numba_kernels.enabled():
        assert native is NotImplemented
        return
    y64, dy64 = np.asarray(y, np.float64), np.asarray(grad_y, np.float64)
    s = np.sum(dy64 * y64, axis=-1, keepdims=True)  # (..., 1)
    exact = y64 * (dy64 - s)
    eps, n = float(np.finfo(np.float32).eps), shape[-1]
    sizes = np.sum(np.abs(dy64 * y64), axis=-1, keepdims=True)
    bound = np.abs(y64) * ((n + 1) * eps * sizes + 2 * eps * (np.abs(dy64) + np.abs(s)))
    bound += float(np.finfo(np.float32).tiny)
    assert native.dtype == np.float32 and native.shape == y.shape
    assert np.all(np.abs(native - exact) <= bound)
    assert np.all(np.abs(F.softmax_backward(grad_y, y) - exact) <= bound)  # through F
    assert np.all(np.abs(definition(F.softmax_backward, grad_y, y) - exact) <= bound)
    assert not np.any(native[np.all(np.asarray(y) == 0, axis=-1)])  # masked rows: 0


@given(shape=shapes, seed=st.integers(0, 2**16), masked=st.sampled_from([0.0, 0.3, 1.0]))
def test_softmax_backward_native_within_its_rounding(numpy_backend, shape, seed, masked) -> None:
    check_softmax_backward(numpy_backend, shape, seed, masked)


@pytest.mark.parametrize("shape", [(3, 5, 300), (2, 4, 64, 64), (7, 1000)])
def test_softmax_backward_native_on_rows_of_many_vector_lanes(numpy_backend, shape) -> None:
    check_softmax_backward(numpy_backend, shape, 5, 0.2)


def test_softmax_backward_native_leaves_other_inputs_to_the_definition(numpy_backend) -> None:
    y = np.full((2, 3), 1 / 3, dtype=np.float32)
    assert numpy_backward_natives.softmax_backward(y, y, axis=0) is NotImplemented
    assert numpy_backward_natives.softmax_backward(y, y.astype(np.float64)) is NotImplemented
    assert numpy_backward_natives.softmax_backward(y[:1], y) is NotImplemented
    with without_numba():
        assert numpy_backward_natives.softmax_backward(y, y) is NotImplemented


SPECIALS = (0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45)


@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_relu_backward_native_equals_definition_bit_for_bit(
    numpy_backend, shape, seed, dtype
) -> None:
    """Every bit, signed zeros and NaNs included: the native chooses dy or +0 as the
    definition's where does; it never multiplies (dy * 0 would give -0 for negative dy,
    and NaN for infinite dy)."""
    from tinytx.backends import numba_kernels

    rng = np.random.default_rng(seed)
    x, grad_y = random_array(seed, shape, dtype), random_array(seed + 1, shape, dtype)
    for a in (x, grad_y):  # some entries at the edge cases, anywhere
        picks = rng.random(a.shape) < 0.3
        a[picks] = rng.choice(np.array(SPECIALS, dtype=dtype), size=int(picks.sum()))
    x, grad_y = numpy_backend.asarray(x), numpy_backend.asarray(grad_y)
    native = numpy_backward_natives.relu_backward(grad_y, x)
    if not numba_kernels.enabled():
        assert native is NotImplemented  # left to the definition
        return
    reference = definition(F.relu_backward, grad_y, x)
    assert native.dtype == dtype and native.shape == reference.shape
    bits = np.uint32 if dtype == np.float32 else np.uint64
    np.testing.assert_array_equal(native.view(bits), reference.view(bits))
    np.testing.assert_array_equal(F.relu_backward(grad_y, x).view(bits), reference.view(bits))


def test_relu_backward_native_leaves_other_inputs_to_the_definition(numpy_backend) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    assert numpy_backward_natives.relu_backward(x.astype(np.float64), x) is NotImplemented
    assert numpy_backward_natives.relu_backward(x.astype(np.float16), x.astype(np.float16)) is (
        NotImplemented
    )
    with without_numba():
        assert numpy_backward_natives.relu_backward(x, x) is NotImplemented


@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_gelu_backward_native_equals_definition_bit_for_bit(
    numpy_backend, shape, seed, dtype
) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, dtype) * 6)  # both tails
    grad_y = numpy_backend.asarray(random_array(seed + 1, shape, dtype))
    with without_numba():
        native = F.gelu_backward(grad_y, x)
    reference = definition(F.gelu_backward, grad_y, x)
    assert native.dtype == dtype
    np.testing.assert_array_equal(native, reference)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_backward_native_at_the_limits(numpy_backend, dtype) -> None:
    """Huge, tiny and zero inputs: the same numbers as the definition (NaN where it has NaN)."""
    finfo = np.finfo(dtype)
    extremes = (finfo.tiny, 40.0, 1e4, finfo.max, np.inf)
    values = [0.0, -0.0, np.nan, *extremes, *(-e for e in extremes)]
    x = numpy_backend.asarray(np.array(values, dtype=dtype))
    grad_y = numpy_backend.asarray(np.ones(x.shape, dtype=dtype))
    with np.errstate(all="ignore"), without_numba():
        native = F.gelu_backward(grad_y, x)
        reference = definition(F.gelu_backward, grad_y, x)
    np.testing.assert_array_equal(native, reference)


def test_gelu_backward_native_leaves_the_tanh_form_to_the_definition(
    numpy_backend, monkeypatch
) -> None:
    x = numpy_backend.asarray(np.linspace(-4, 4, 9), dtype="float32")
    grad_y = numpy_backend.asarray(np.ones(9), dtype="float32")
    calls = []
    native = numpy_backend.natives["gelu_backward"]
    monkeypatch.setitem(
        numpy_backend.natives, "gelu_backward", lambda *a: calls.append(a) or native(*a)
    )
    np.testing.assert_array_equal(
        F.gelu_backward(grad_y, x, approximate="tanh"),
        definition(F.gelu_backward, grad_y, x, approximate="tanh"),
    )
    assert not calls  # the tanh form never reaches the exact-form native
    F.gelu_backward(grad_y, x)
    assert len(calls) == 1


@pytest.mark.parametrize("lead", [(7,), (3, 5)])
def test_linear_backward_splits_rows_between_threads(numpy_backend, monkeypatch, lead) -> None:
    """Both products of linear_backward (dy W, and dy^T x with a transposed dy) have one
    2-D matrix on the right: the matmul native splits their rows between the pool's
    threads, and the gradients stay within the dot products' rounding of the definition's."""
    monkeypatch.setattr(numpy_natives, "_POOL_ROWS_PER_THREAD", 1)
    monkeypatch.setattr(numpy_natives, "_THREADED_MIN_FLOPS_PER_THREAD", 0)
    monkeypatch.delitem(numpy_backend.natives, "linear_backward")  # the definition's path
    splits = []
    original = numpy_natives._rows_on_pool
    monkeypatch.setattr(
        numpy_natives, "_rows_on_pool", lambda a, b, n: splits.append(a.shape) or original(a, b, n)
    )
    d_in, d_out = 6, 4
    x = random_array(0, (*lead, d_in), np.float32)
    weight = random_array(1, (d_out, d_in), np.float32)
    grad_y = random_array(2, (*lead, d_out), np.float32)
    native = F.linear_backward(grad_y, x, weight)
    reference = definition(F.linear_backward, grad_y, x, weight)
    rows = int(np.prod(lead))
    assert splits == [(rows, d_out), (d_out, rows)]
    bounds = linear_backward_bounds(grad_y, x, weight)
    for got, want, bound in zip(native, reference, bounds, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.all(np.abs(got - want) <= bound)


def linear_backward_bounds(grad_y, x, weight):
    """|native - definition| bounds for (dx, dW, db): 2 (terms + 1) eps sum |a_i b_i| for
    each dot product (both sides round), and 0 for db (the same NumPy sum on both sides)."""
    lead, d_out, d_in = grad_y.shape[:-1], weight.shape[0], weight.shape[1]
    rows = int(np.prod(lead))
    eps = np.finfo(x.dtype).eps
    dy, xs = np.abs(grad_y).reshape(rows, d_out), np.abs(x).reshape(rows, d_in)
    return [
        2 * (d_out + 1) * eps * (dy @ np.abs(weight)).reshape(*lead, d_in),
        2 * (rows + 1) * eps * (dy.T @ xs),
        np.zeros(d_out),
    ]


@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)
def test_linear_backward_native_equals_definition(
    numpy_backend, lead, d_in, d_out, bias, seed, dtype
) -> None:
    """dx on the calling thread, dW and db on a pool thread: the definition's products
    and sum, so its numbers to the products' rounding, db exactly."""
    threshold = numpy_natives._THREADED_MIN_FLOPS_PER_THREAD
    numpy_natives._THREADED_MIN_FLOPS_PER_THREAD = 0  # every size takes the native
    try:
        x = random_array(seed, (*lead, d_in), dtype)
        weight = random_array(seed + 1, (d_out, d_in), dtype)
        grad_y = random_array(seed + 2, (*lead, d_out), dtype)
        native = numpy_backward_natives.linear_backward(grad_y, x, weight, bias)
        reference = definition(F.linear_backward, grad_y, x, weight, bias)
    finally:
        numpy_natives._THREADED_MIN_FLOPS_PER_THREAD = threshold
    assert native is not NotImplemented
    bounds = linear_backward_bounds(grad_y, x, weight)
    for got, want, bound in zip(native[:2], reference[:2], bounds, strict=False):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.all(np.abs(got - want) <= bound)
    if bias:
        np.testing.assert_array_equal(native[2], reference[2])
    else:
        assert native[2] is None and reference[2] is None


def test_linear_backward_native_runs_the_two_products_side_by_side(
    numpy_backend, monkeypatch
) -> None:
    monkeypatch.setattr(numpy_natives, "_THREADED_MIN_FLOPS_PER_THREAD", 0)
    jobs = []
    original = numpy_backward_natives._map_with_blas_on_pool
    monkeypatch.setattr(
        numpy_backward_natives,
        "_map_with_blas_on_pool",
        lambda work, todo: jobs.append(list(todo)) or original(work, todo),
    )
    x, weight, grad_y = (random_array(s, shape, np.float32)
                         for s, shape in ((0, (5, 3)), (1, (4, 3)), (2, (5, 4))))  # fmt: skip
    F.linear_backward(grad_y, x, weight)
    if numpy_natives._can_pin_blas():
        assert jobs == [["dx", "dw"]]
    numpy_natives.set_num_threads(1)  # one thread: the definition's path
    assert numpy_backward_natives.linear_backward(grad_y, x, weight) is NotImplemented
