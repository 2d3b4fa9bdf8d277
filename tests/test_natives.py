"""The NumPy backend's natives compute what tinytx.functional's definitions compute.

Each test runs a function twice on the same input: once as the library runs it (the
native), once with the natives switched off (the readable array-API definition), and
compares. Block sizes are shrunk so that small inputs already take the threaded,
many-block path.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from native_helpers import definition, linear_bound, without_numba

import tinytx
from tinytx import functional as F
from tinytx.backends import numpy_natives
from tinytx.plugins import get_attention

NATIVE_NAMES = (
    "softmax",
    "layer_norm",
    "relu",
    "linear",
    "scaled_dot_product_attention",
    "blockwise_attention",
    "gelu",
)
DTYPES = (np.float32, np.float64)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks and no size threshold: every input is cut up and spread over threads
    (attention: tiles of one or two query rows; linear: products of two rows or more
    split between the threads)."""
    monkeypatch.setattr(numpy_natives, "_BLOCK_ELEMENTS", 8)
    monkeypatch.setattr(numpy_natives, "_PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(numpy_natives, "_TILE_ELEMENTS", 8)
    monkeypatch.setattr(numpy_natives, "_POOL_ROWS_PER_THREAD", 1)
    before = numpy_natives.get_num_threads()
    numpy_natives.set_num_threads(2)
    yield
    numpy_natives.set_num_threads(before)


def both(fn, *args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(native result, definition result) for the same call."""
    return fn(*args, **kwargs), definition(fn, *args, **kwargs)


def test_numpy_backend_lists_the_natives(numpy_backend: tinytx.Backend) -> None:
    for name in NATIVE_NAMES:
        assert numpy_backend.natives[name] is getattr(numpy_natives, name)
        assert F._native(numpy_backend.xp, name) is getattr(numpy_natives, name)


def test_functional_calls_the_native(numpy_backend: tinytx.Backend, monkeypatch) -> None:
    calls = []
    original = numpy_natives.softmax

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setitem(numpy_backend.natives, "softmax", spy)
    F.softmax(numpy_backend.asarray(np.zeros((2, 3), np.float32)))
    assert calls == [(2, 3)]


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


def random_array(seed: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(dtype)


# --- rounding-error bounds ---------------------------------------------------------------
# The native and the definition compute the same sums in different orders (tiles, one
# product instead of a loop, BLAS kernels). Each is within the classical bound of the exact
# result (a dot product of n terms: |error| <= n eps sum |a_i b_i|, Higham 2002, 3.1), so
# they differ by at most twice that; the tolerances below are those bounds, element by
# element, never a flat guess.


def attention_bounds(q, k, v, weights, scale, *, blocks: int = 1):
    """(weights bound, output bound) for softmax(q k^T * scale) v, both elementwise.

    scores s = (q * scale) k^T: each off by at most (d + 1) eps scale (|q| |k|^T), so the
    two computations by twice that (delta). The softmax's exp(s_i - max s) / sum: a weight
    moves relatively by its own and the row maximum's score errors and by the sum's
    (each at most max delta of its row), plus eps |s_i - max s| <= eps |log w_i| from the
    subtraction and (seq_k + 4) eps from exp, the sum and the division. An online softmax
    over ``blocks`` key blocks rescales by exp(m_old - m_new): 2 eps max |s| + 3 eps per
    block more. out = w v: |dw| |v| + 2 (seq_k + 1) eps w |v|.
    """
    eps = float(np.finfo(q.dtype).eps)
    d, seq_k = q.shape[-1], k.shape[-2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    q, k, v, weights = (np.abs(np.asarray(a, dtype=np.float64)) for a in (q, k, v, weights))
    group = q.shape[1] // k.shape[1]  # grouped-query heads share a key/value head
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    magnitude = scale * (q @ np.swapaxes(k, -1, -2))  # (batch, heads, seq_q, seq_k)
    delta = 2 * (d + 1) * eps * magnitude.max(axis=-1, keepdims=True)  # per row
    with np.errstate(divide="ignore"):
        log_w = np.where(weights > 0, -np.log(weights), 0.0)
    relative = 3 * delta + eps * (log_w + seq_k + 4)
    relative += blocks * 3 * eps + 2 * eps * magnitude.max(axis=-1, keepdims=True) * (blocks > 1)
    tiny = float(np.finfo(np.float32).tiny)  # below it, subnormal weights round absolutely
    weights_bound = relative * weights + tiny
    out_bound = weights_bound @ v + 2 * (seq_k + 1) * eps * (weights @ v)
    return weights_bound, out_bound


def assert_within_attention_bounds(q, k, v, scale, native, reference) -> None:
    """The native's (out, w) and the definition's differ by no more than rounding."""
    (out, w), (out_ref, w_ref) = native, reference
    w_bound, out_bound = attention_bounds(q, k, v, w_ref, scale)
    assert np.all(np.abs(w - w_ref) <= w_bound), np.max(np.abs(w - w_ref) - w_bound)
    assert np.all(np.abs(out - out_ref) <= out_bound), np.max(np.abs(out - out_ref) - out_bound)


@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES), data=st.data())
def test_softmax_native_equals_definition(numpy_backend, shape, seed, dtype, data) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, dtype))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    native, reference = both(F.softmax, x, axis=axis)
    assert native.dtype == reference.dtype == dtype
    np.testing.assert_array_equal(native, reference)


@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES), data=st.data())
def test_masked_softmax_native_equals_definition(numpy_backend, shape, seed, dtype, data) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, dtype))
    # A mask broadcastable to x: some axes of length 1, some leading axes dropped.
    mask_shape = tuple(data.draw(st.sampled_from([1, n]), label="mask axis") for n in shape)
    mask_shape = mask_shape[data.draw(st.integers(0, len(shape) - 1), label="drop") :]
    mask = np.random.default_rng(seed + 1).random(mask_shape) < 0.6
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    native, reference = both(F.softmax, x, axis=axis, mask=mask)
    assert native.shape == reference.shape
    np.testing.assert_array_equal(native, reference)
    assert np.all(np.isfinite(native))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_give_zeros(numpy_backend, dtype) -> None:
    x = numpy_backend.asarray(random_array(0, (2, 3, 5, 7), dtype))
    mask = np.ones((2, 1, 5, 7), dtype=bool)
    mask[0, :, 1, :] = False  # row 1 of batch 0: nothing allowed
    mask[1, :, :, :] = False  # all of batch 1
    native, reference = both(F.softmax, x, mask=mask)
    np.testing.assert_array_equal(native, reference)
    assert np.all(native[0, :, 1, :] == 0) and np.all(native[1] == 0)
    # exp, a sum of 7 and a division each round: (7 + 4) eps, the weights summed again: 7 eps
    np.testing.assert_allclose(native[0, :, 0, :].sum(-1), 1.0, rtol=18 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_softmax_ignores_non_finite_values_where_masked(numpy_backend, dtype) -> None:
    """The native masks by adding 0 / -inf; +inf or NaN at a masked place would make NaN
    that way. Masked values never matter in the definition, so neither here."""
    x = random_array(0, (3, 4, 6), dtype)
    mask = np.random.default_rng(1).random((3, 1, 6)) < 0.5
    mask[:, :, 0] = True  # every row keeps something
    dropped = np.broadcast_to(~mask, x.shape)
    x[dropped] = np.resize(np.array([np.inf, np.nan, -np.inf], dtype), int(dropped.sum()))
    native, reference = both(F.softmax, numpy_backend.asarray(x), mask=mask)
    np.testing.assert_array_equal(native, reference)
    assert np.all(np.isfinite(native)) and np.all(native[dropped] == 0)


@pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("causal", [False, True])
def test_attention_ignores_infinite_scores_at_masked_keys(numpy_backend, causal) -> None:
    q = np.abs(random_array(0, (2, 2, 4, 3), np.float32))
    k, v = random_array(1, (2, 2, 4, 3), np.float32), random_array(2, (2, 2, 4, 3), np.float32)
    k[:, :, 1] = 3e38  # key 1: its scores overflow to +inf
    mask = np.ones((2, 1, 1, 4), dtype=bool)
    mask[..., 1] = False  # ... and it is masked
    for tile in (8, 400):  # a row per tile; whole heads and batch entries per tile
        numpy_natives._TILE_ELEMENTS = tile
        (out, w), (out_ref, w_ref) = both(
            F.scaled_dot_product_attention, q, k, v, mask=mask, causal=causal
        )
        np.testing.assert_array_equal(w, w_ref)
        np.testing.assert_array_equal(out, out_ref)
        assert np.all(np.isfinite(out)) and np.all(w[..., 1] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_extreme_rows(numpy_backend, dtype) -> None:
    rows = np.array(
        [[-np.inf] * 4, [1e4, -1e4, 0.0, 1e4], [-np.inf, 0.0, -np.inf, 1.0], [np.inf, 0, 0, 0]],
        dtype=dtype,
    )
    native, reference = both(F.softmax, numpy_backend.asarray(rows))
    np.testing.assert_array_equal(native, reference)
    assert np.all(native[0] == 0)
    np.testing.assert_array_equal(native[3], [1.0, 0.0, 0.0, 0.0])  # +inf: the limit
    np.testing.assert_allclose(native[1], [0.5, 0.0, 0.0, 0.5])


def test_softmax_mask_of_other_dtype_reads_nonzero_as_true(numpy_backend) -> None:
    x = numpy_backend.asarray(random_array(3, (4, 6), np.float32))
    mask = np.array([1, 0, 2, 0, 0, 5], dtype=np.int8)
    native, reference = both(F.softmax, x, mask=mask)
    np.testing.assert_array_equal(native, reference)


@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES), data=st.data())
def test_layer_norm_native_equals_definition(numpy_backend, shape, seed, dtype, data) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, dtype))
    d = shape[-1]
    weight = random_array(seed + 1, (d,), dtype) if data.draw(st.booleans()) else None
    bias = random_array(seed + 2, (d,), dtype) if data.draw(st.booleans()) else None
    with without_numba():
        native, reference = both(F.layer_norm, x, weight, bias, eps=1e-5)
    assert native.dtype == reference.dtype == dtype
    np.testing.assert_array_equal(native, reference)


def test_layer_norm_mixed_dtypes_fall_back_to_the_definition(numpy_backend) -> None:
    x = numpy_backend.asarray(random_array(0, (3, 4), np.float32))
    weight = random_array(1, (4,), np.float64)
    assert numpy_natives.layer_norm(x, weight) is NotImplemented
    native, reference = both(F.layer_norm, x, weight)
    assert native.dtype == np.float64
    np.testing.assert_array_equal(native, reference)


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    block=st.integers(1, 100),
)
def test_row_blocks_cover_every_element_once(shape, block) -> None:
    """Blocks of rows, or of whole slabs side by side, tile x exactly, none larger than
    a block (or one row, when a row alone is larger)."""
    x = np.zeros(shape)
    rows = numpy_natives._as_rows(x)  # a view of x
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numpy_natives, "_BLOCK_ELEMENTS", block)
        blocks = numpy_natives._row_blocks(rows)
    for index in blocks:
        piece = rows[index]
        assert piece.size <= max(block, shape[-1])
        piece += 1
    np.testing.assert_array_equal(x, 1)


@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_relu_native_equals_definition(numpy_backend, shape, seed, dtype) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, dtype))
    native, reference = both(F.relu, x)
    assert native.dtype == dtype
    np.testing.assert_array_equal(native, reference)


@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_gelu_native_equals_definition_bit_for_bit(numpy_backend, shape, seed, dtype) -> None:
    x_host = random_array(seed, shape, dtype) * 6  # reach the tails on both sides
    x = numpy_backend.asarray(x_host)
    with without_numba():
        native, reference = both(F.gelu, x)
    assert native.dtype == dtype
    np.testing.assert_array_equal(native, reference)


def test_gelu_native_leaves_the_tanh_form_to_the_definition(numpy_backend, monkeypatch) -> None:
    x = numpy_backend.asarray(np.linspace(-4, 4, 9), dtype="float32")
    calls = []
    native = numpy_backend.natives["gelu"]
    monkeypatch.setitem(numpy_backend.natives, "gelu", lambda *a: calls.append(a) or native(*a))
    with without_numba():  # (with numba, the tanh form has a kernel: test_numba_kernels)
        tanh_form = F.gelu(x, approximate="tanh")
    np.testing.assert_array_equal(tanh_form, definition(F.gelu, x, "tanh"))
    assert not calls  # the tanh form never reaches the exact-form native
    F.gelu(x)
    assert len(calls) == 1


@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    with_bias=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)
def test_linear_native_equals_definition(
    numpy_backend, lead, d_in, d_out, with_bias, transposed, seed, dtype
) -> None:
    x = random_array(seed, (*lead, d_in), dtype)
    if transposed and x.ndim >= 2:  # a non-contiguous view with the same shape
        x = np.swapaxes(random_array(seed, (*lead[:-1], d_in, lead[-1]), dtype), -1, -2)
    weight = random_array(seed + 1, (d_out, d_in), dtype)
    bias = random_array(seed + 2, (d_out,), dtype) if with_bias else None
    native, reference = both(F.linear, x, weight, bias)
    assert native.shape == reference.shape == (*lead, d_out)
    assert native.dtype == dtype
    # One matrix product instead of a loop of them may round differently in the last bit.
    assert np.all(np.abs(native - reference) <= linear_bound(x, weight, bias))


@pytest.mark.parametrize(("rows", "on_pool"), [(63, False), (64, True), (301, True)])
def test_linear_splits_many_rows_between_threads(numpy_backend, monkeypatch, rows, on_pool) -> None:
    """With the default threshold (32 rows per thread, 2 threads): 64 rows or more are
    multiplied on the pool, fewer on BLAS's own threads; both give the definition's y."""
    monkeypatch.setattr(numpy_natives, "_POOL_ROWS_PER_THREAD", 32)
    if not numpy_natives._can_pin_blas():
        pytest.skip("NumPy's BLAS is not OpenBLAS here: products stay on BLAS's threads")
    calls = []
    executor = numpy_natives._executor
    monkeypatch.setattr(numpy_natives, "_executor", lambda: calls.append(1) or executor())
    x = random_array(0, (rows, 24), np.float32)
    weight, bias = random_array(1, (40, 24), np.float32), random_array(2, (40,), np.float32)
    monkeypatch.setattr(numpy_natives, "_PARALLEL_MIN_ELEMENTS", 1 << 30)  # serial bias pass
    native, reference = both(F.linear, x, weight, bias)
    assert np.all(np.abs(native - reference) <= linear_bound(x, weight, bias))
    assert bool(calls) == on_pool


def test_attention_with_natives_equals_definition(numpy_backend) -> None:
    q, k, v = (random_array(s, (2, 3, 5, 4), np.float32) for s in range(3))
    mask = np.random.default_rng(9).random((2, 1, 5, 5)) < 0.5
    mask[0, 0, 2, :] = False  # one query that may attend to nothing
    (out, w), (out_ref, w_ref) = both(
        F.scaled_dot_product_attention, q, k, v, mask=mask, causal=True
    )
    assert_within_attention_bounds(q, k, v, None, (out, w), (out_ref, w_ref))
    assert np.all(w[0, :, 2, :] == 0) and np.all(out[0, :, 2, :] == 0)


def test_one_thread_and_many_threads_agree(numpy_backend) -> None:
    x = random_array(4, (3, 40, 33), np.float32)
    numpy_natives.set_num_threads(3)
    many = numpy_natives.softmax(x, mask=x > -1)
    numpy_natives.set_num_threads(1)
    one = numpy_natives.softmax(x, mask=x > -1)
    np.testing.assert_array_equal(many, one)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("n_shares", [2, 3, 17])
def test_every_share_runs_once(threads, n_shares) -> None:
    numpy_natives.set_num_threads(threads)
    ran = []
    numpy_natives._run_shares(ran.append, list(range(n_shares)), caller_too=True)
    assert sorted(ran) == list(range(n_shares))
    numpy_natives._run_shares(ran.append, ["a", "b", "c"], caller_too=False)
    assert sorted(ran[n_shares:]) == ["a", "b", "c"]


def test_the_caller_takes_the_shares_of_a_pool_thread_that_has_not_started() -> None:
    """A pool thread busy elsewhere (or slow to wake) holds nothing up: the caller claims
    every share and returns without waiting for it."""
    import threading

    numpy_natives.set_num_threads(2)
    release, started = threading.Event(), threading.Event()

    def occupy() -> None:
        started.set()
        release.wait(timeout=30)

    busy = [numpy_natives._executor().submit(occupy) for _ in range(2)]  # every pool thread
    assert started.wait(timeout=30)
    try:
        where = []
        numpy_natives._run_shares(
            lambda share: where.append((share, threading.current_thread())),
            list(range(5)),
            caller_too=True,
        )
        assert [share for share, _ in where] == list(range(5))
        assert {thread for _, thread in where} == {threading.current_thread()}
    finally:
        release.set()
        for future in busy:
            future.result(timeout=30)


def test_an_error_in_a_share_is_raised_and_the_shares_not_started_are_skipped() -> None:
    ran = []

    def run(share: int) -> None:
        ran.append(share)
        if share == 2:
            raise ValueError("share two failed")

    for threads in (1, 2):
        numpy_natives.set_num_threads(threads)
        ran.clear()
        with pytest.raises(ValueError, match="share two failed"):
            numpy_natives._run_shares(run, list(range(200)), caller_too=True)
        assert 2 in ran and len(ran) < 200  # the rest were skipped, not run
    with pytest.raises(ValueError, match="share two failed"):
        numpy_natives._run_shares(run, [1, 2, 3], caller_too=False)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects_bad_counts(bad) -> None:
    with pytest.raises(ValueError, match="positive int"):
        numpy_natives.set_num_threads(bad)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_native_equals_definition(numpy_backend, causal, dtype) -> None:
    q = random_array(0, (2, 4, 6, 3), dtype)
    k, v = (random_array(s, (2, 2, 7, 3), dtype) for s in (1, 2))  # grouped-query: 2 kv heads
    mask = np.random.default_rng(5).random((2, 1, 1, 7)) < 0.7
    mask[1] = False  # batch 1 may attend to nothing
    for m in (None, mask):
        (out, w), (out_ref, w_ref) = both(
            F.scaled_dot_product_attention, q, k, v, mask=m, causal=causal, scale=0.3
        )
        assert out.dtype == w.dtype == dtype
        assert_within_attention_bounds(q, k, v, 0.3, (out, w), (out_ref, w_ref))
        assert np.all(np.isfinite(w))
        if m is not None:
            assert np.all(w[1] == 0) and np.all(out[1] == 0)


# --- tiled attention -------------------------------------------------------------------


@st.composite
def attention_inputs(draw):
    """q, k, v, mask, causal, scale for one attention call: grouped-query heads, seq_q
    below, equal to or above seq_k, masks of every broadcastable shape (with rows that
    may attend to nothing), float32 and float64."""
    batch, heads_kv, group = (draw(st.integers(1, n)) for n in (5, 2, 3))  # batch 5: tiles
    # of several batch entries
    seq_q, seq_k, d, d_v = (draw(st.integers(1, n)) for n in (7, 7, 4, 3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    q = random_array(seed, (batch, heads_kv * group, seq_q, d), dtype)
    k = random_array(seed + 1, (batch, heads_kv, seq_k, d), dtype)
    v = random_array(seed + 2, (batch, heads_kv, seq_k, d_v), dtype)
    mask = None
    if draw(st.booleans()):
        full = (batch, heads_kv * group, seq_q, seq_k)
        shape = tuple(draw(st.sampled_from([1, n])) for n in full)
        shape = shape[draw(st.integers(0, 3)) :]  # leading axes may be left out
        keep = draw(st.sampled_from([0.0, 0.3, 0.8]))  # 0.0: nothing allowed anywhere
        mask = np.random.default_rng(seed + 3).random(shape) < keep
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.3, 2.0]))
    return q, k, v, mask, causal, scale


@settings(max_examples=60)
@given(
    inputs=attention_inputs(),
    tile=st.sampled_from([1, 5, 12, 64, 400]),
    threads=st.sampled_from([1, 2]),
)
def test_attention_without_weights_equals_definition(numpy_backend, inputs, tile, threads) -> None:
    """return_weights=False: the tiles divide W v by the row sums instead of W (never
    stored); the output is the definition's up to rounding, and the weights are None."""
    q, k, v, mask, causal, scale = inputs
    numpy_natives._TILE_ELEMENTS = tile  # the fixture puts the default back
    numpy_natives.set_num_threads(threads)
    out, none = F.scaled_dot_product_attention(
        q, k, v, mask=mask, causal=causal, scale=scale, return_weights=False
    )
    out_ref, w_ref = definition(
        F.scaled_dot_product_attention, q, k, v, mask=mask, causal=causal, scale=scale
    )
    assert none is None and out.dtype == q.dtype and out.shape == out_ref.shape
    assert_within_attention_bounds(q, k, v, scale, (out, w_ref), (out_ref, w_ref))
    assert np.all(np.isfinite(out))
    nothing_allowed = np.all(w_ref == 0, axis=-1)  # (batch, heads, seq_q)
    assert np.all(out[nothing_allowed] == 0)


@settings(max_examples=60)
@given(
    inputs=attention_inputs(),
    tile=st.sampled_from([1, 5, 12, 64, 400]),
    threads=st.sampled_from([1, 2]),
)
def test_tiled_attention_equals_definition(numpy_backend, inputs, tile, threads) -> None:
    q, k, v, mask, causal, scale = inputs
    numpy_natives._TILE_ELEMENTS = tile  # the fixture puts the default back
    numpy_natives.set_num_threads(threads)
    (out, w), (out_ref, w_ref) = both(
        F.scaled_dot_product_attention, q, k, v, mask=mask, causal=causal, scale=scale
    )
    assert out.dtype == w.dtype == q.dtype
    assert out.shape == out_ref.shape and w.shape == w_ref.shape
    # scores and w v sum products in an order BLAS picks (tile by tile, or whole)
    assert_within_attention_bounds(q, k, v, scale, (out, w), (out_ref, w_ref))
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(out))
    nothing_allowed = np.all(w_ref == 0, axis=-1)  # (batch, heads, seq_q)
    assert np.all(out[nothing_allowed] == 0)


@settings(max_examples=60)
@given(
    inputs=attention_inputs(),
    tile=st.sampled_from([1, 5, 12, 64, 400]),
    threads=st.sampled_from([1, 2]),
)
def test_blockwise_native_equals_the_plugins_definition(
    numpy_backend, inputs, tile, threads
) -> None:
    """plugins/blockwise.py's online softmax over key blocks (the definition, native
    removed) and the NumPy native's query tiles give the same outputs, and no weights."""
    q, k, v, mask, causal, scale = inputs
    numpy_natives._TILE_ELEMENTS = tile  # the fixture puts the default back
    numpy_natives.set_num_threads(threads)
    blockwise = get_attention("blockwise")
    out, weights = blockwise(q, k, v, mask=mask, causal=causal, scale=scale)
    with pytest.MonkeyPatch.context() as patch:
        patch.delitem(numpy_backend.natives, "blockwise_attention")
        out_ref, _ = blockwise(q, k, v, mask=mask, causal=causal, scale=scale, block_size=3)
    assert weights is None and out.dtype == q.dtype
    # two algorithms (online softmax over key blocks, or whole rows): float rounding differs
    _, w_ref = definition(
        F.scaled_dot_product_attention, q, k, v, mask=mask, causal=causal, scale=scale
    )
    blocks = -(-k.shape[2] // 3)
    _, out_bound = attention_bounds(q, k, v, w_ref, scale, blocks=blocks)
    assert np.all(np.abs(out - out_ref) <= out_bound)


def test_blockwise_calls_the_native(numpy_backend, monkeypatch) -> None:
    calls = []

    def spy(q, *args):
        calls.append(q.shape)
        return numpy_natives.blockwise_attention(q, *args)

    monkeypatch.setitem(numpy_backend.natives, "blockwise_attention", spy)
    q = numpy_backend.asarray(random_array(0, (1, 2, 5, 4), np.float32))
    get_attention("blockwise")(q, q, q, causal=True)
    assert calls == [(1, 2, 5, 4)]


def test_large_attention_takes_the_tiled_path(numpy_backend, monkeypatch) -> None:
    calls = []
    tiled = numpy_natives._attention_tiled

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return tiled(*args, **kwargs)

    monkeypatch.setattr(numpy_natives, "_attention_tiled", spy)
    q, k, v = (random_array(s, (1, 2, 9, 4), np.float32) for s in range(3))
    F.scaled_dot_product_attention(q, k, v)
    assert calls == [(1, 2, 9, 4)]
    F.scaled_dot_product_attention(q[:, :, :1], k, v)  # one query (generation): whole path
    assert calls == [(1, 2, 9, 4)]


def test_causal_tiles_with_a_key_value_cache(numpy_backend) -> None:
    """seq_q < seq_k: queries are the last positions; tiles skip the keys after them."""
    q = random_array(0, (1, 2, 5, 4), np.float32)
    k, v = (random_array(s, (1, 2, 11, 4), np.float32) for s in (1, 2))
    (out, w), (out_ref, w_ref) = both(F.scaled_dot_product_attention, q, k, v, causal=True)
    assert_within_attention_bounds(q, k, v, None, (out, w), (out_ref, w_ref))
    for i in range(5):  # query i sits at key position i + 6
        assert np.all(w[..., i, i + 7 :] == 0) and np.all(w[..., i, : i + 7] > 0)


def test_causal_queries_before_every_key_get_zeros(numpy_backend) -> None:
    """seq_q > seq_k: the first seq_q - seq_k queries may attend to nothing."""
    q = random_array(0, (2, 1, 6, 3), np.float64)
    k, v = (random_array(s, (2, 1, 2, 3), np.float64) for s in (1, 2))
    (out, w), (out_ref, w_ref) = both(F.scaled_dot_product_attention, q, k, v, causal=True)
    assert_within_attention_bounds(q, k, v, None, (out, w), (out_ref, w_ref))
    assert np.all(w[:, :, :4] == 0) and np.all(out[:, :, :4] == 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("special", [None, np.inf, -np.inf, np.nan])
def test_one_query_attention_equals_definition(numpy_backend, causal, special) -> None:
    """A decode step (one query, no mask; causal changes nothing for the last position)
    takes the five-call softmax; a row with an infinite or NaN score goes back to the
    blocked softmax, whose limits are the definition's."""
    q = random_array(0, (2, 3, 1, 4), np.float32)
    k, v = (random_array(s, (2, 3, 6, 4), np.float32) for s in (1, 2))
    if special is not None:
        k[1, 2, 3] = special  # one row of scores holds +-inf or NaN (through q k^T)
    (out, w), (out_ref, w_ref) = both(F.scaled_dot_product_attention, q, k, v, causal=causal)
    assert np.array_equal(np.isnan(w), np.isnan(w_ref))
    assert np.array_equal(np.isnan(out), np.isnan(out_ref))
    # (batch 1, head 2) took the blocked softmax: the definition's numbers, its limits too
    np.testing.assert_array_equal(w[1, 2], w_ref[1, 2])  # (NaN where NaN)
    w[1, 2], w_ref[1, 2], out[1, 2], out_ref[1, 2] = 0, 0, 0, 0  # the other rows, bounded:
    k_finite = np.where(np.isfinite(k), k, 0)  # k[1, 2] reaches only that row
    assert_within_attention_bounds(q, k_finite, v, None, (out, w), (out_ref, w_ref))


def test_blas_threads_are_given_back(numpy_backend) -> None:
    if not numpy_natives._can_pin_blas():
        pytest.skip("threadpoolctl finds no BLAS here whose threads tinytx can set")
    counts = numpy_natives._blas_thread_counts()
    with numpy_natives._blas_single_threaded():
        with numpy_natives._blas_single_threaded():  # nested (another thread, say)
            assert all(n == 1 for n in numpy_natives._blas_thread_counts())
        assert all(n == 1 for n in numpy_natives._blas_thread_counts())
    assert numpy_natives._blas_thread_counts() == counts
    q, k, v = (random_array(s, (1, 3, 8, 4), np.float32) for s in range(3))
    F.scaled_dot_product_attention(q, k, v)  # on the pool: pinned, then given back
    assert numpy_natives._blas_thread_counts() == counts


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [
        ((3, 5), (5, 4)),  # one small product: on the caller's thread, BLAS at one thread
        ((2, 4, 9, 6), (2, 4, 6, 7)),  # a stack of products: split over the pool
        ((1, 9, 6), (3, 6, 7)),  # broadcast stacks: one call
        ((4, 0, 6), (4, 6, 3)),  # empty
    ],
)
@pytest.mark.parametrize("threaded_min", [0, 1 << 40])
def test_matmul_native_equals_definition(
    numpy_backend, monkeypatch, a_shape, b_shape, threaded_min
) -> None:
    """Every route of the matmul native (threaded_min 0: the pool for stacks; huge: the
    single-thread route) gives xp.matmul's numbers within the dot product's rounding."""
    monkeypatch.setattr(numpy_natives, "_THREADED_MIN_FLOPS_PER_THREAD", threaded_min)
    a, b = random_array(0, a_shape, np.float32), random_array(1, b_shape, np.float32)
    native, reference = both(F.matmul, a, b)
    assert native.shape == reference.shape and native.dtype == reference.dtype
    eps = np.finfo(np.float32).eps
    bound = 2 * (a_shape[-1] + 1) * eps * (np.abs(a).astype(np.float64) @ np.abs(b))
    assert np.all(np.abs(native - reference) <= bound)
    assert numpy_natives.matmul(a.astype(np.float64), b) is NotImplemented  # mixed dtypes
