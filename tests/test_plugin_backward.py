"""Attention variants' backward passes (issue 10): every built-in's backward against float64
central differences through the conformance kit, on every backend; exact variants against
softmax's backward; blockwise's FlashAttention-style backward equal to softmax's within
rounding and never holding a (seq_q x seq_k) matrix; the registry's checks and errors; and
the kit catching a broken backward."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from array_api_compat import array_namespace
from click.testing import CliRunner

from tinytx import functional as F
from tinytx.cli import cli
from tinytx.plugins import (
    BUILTIN_VARIANTS,
    AttentionError,
    available_attention,
    get_attention,
    register_attention,
    registry,
)
from tinytx.testing import check_attention

FAST = 8  # hypothesis examples for the checks that only need to see a failure


@pytest.fixture
def clean_registry():
    stores = (registry._REGISTRY, registry._LOADED, registry._BROKEN)
    saved = [dict(store) for store in stores]
    yield
    for store, copy in zip(stores, saved, strict=True):
        store.clear()
        store.update(copy)


def _inputs(backend, shape, seq_k, d_v, *, heads_kv=None, dtype="float64", seed=0):
    """q (batch, heads, seq_q, d), k (batch, heads_kv, seq_k, d), v (.., d_v), a cotangent
    of the output's shape, all standard normal, on ``backend``."""
    rng = np.random.default_rng(seed)
    batch, heads, seq_q, d = shape
    kv = heads_kv or heads
    host = [
        rng.standard_normal(shape),
        rng.standard_normal((batch, kv, seq_k, d)),
        rng.standard_normal((batch, kv, seq_k, d_v)),
        rng.standard_normal((batch, heads, seq_q, d_v)),
    ]
    return [backend.asarray(a.astype(dtype)) for a in host]


# --- every built-in, through the kit ------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_VARIANTS)
def test_every_builtin_has_a_backward_that_passes_the_kit(backend, name):
    variant = get_attention(name)
    assert variant.has_backward
    report = check_attention(name, backend, properties=["backward"])
    report.assert_passed()
    assert report["backward"].status == "passed"
    assert "vs central differences" in report["backward"].detail
    if variant.promises.exact:  # blockwise and softmax: also equal to softmax's gradients
        assert "matches softmax's" in report["backward"].detail


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("blockwise", {"block_size": 1}),
        ("blockwise", {"block_size": 2}),
        ("blockwise", {"block_size": 3}),
        ("linear", {"chunk": 1}),
        ("linear", {"chunk": 2}),
        ("linear", {"chunk": 3}),
        ("sliding_window", {"window": 1}),
        ("sliding_window", {"window": 2}),
        ("cosine", {"temperature": 0.5}),
    ],
)
def test_backwards_with_small_blocks_chunks_and_windows(backend, name, options):
    """The kit's sequences are short: small blocks and chunks exercise the tiles, the
    suffix sums across chunks and the skipped causal tiles."""
    check_attention(name, backend, options=options, properties=["backward"]).assert_passed()


# --- blockwise: FlashAttention's backward -------------------------------------------------


def _rounding_bounds(q, k, v, g, weights, scale, eps):
    """Elementwise bounds on |blockwise's gradient - softmax's|, from the rounding of the
    two computations (host arrays, float64 arithmetic).

    Both make dV = P^T G, dS = P (dP - D), dQ = dS K scale, dK = dS^T Q scale from the same
    products in different orders, with P from exp(S - L) instead of a softmax. Each entry
    is a sum of n <= seq_q + seq_k + d + d_v products of terms each within a few eps, so
    its error is at most gamma = 4 (n + 10) eps times the sum of the products' sizes
    (the usual bound for dot products, |fl(a.b) - a.b| <= n eps sum|a b|)."""
    seq_q, d = q.shape[2], q.shape[3]
    seq_k, d_v = k.shape[2], v.shape[3]
    gamma = 4 * (seq_q + seq_k + d + d_v + 10) * eps
    p = np.abs(weights)  # (b, h, seq_q, seq_k)
    size_dp = np.abs(g) @ np.swapaxes(np.abs(v), -1, -2)  # (b, h, seq_q, seq_k) |G| |V|^T
    size_d = np.sum(p * size_dp, axis=-1, keepdims=True)  # (b, h, seq_q, 1)  |D|'s size
    size_ds = p * (size_dp + size_d)  # (b, h, seq_q, seq_k)
    bound_dq = gamma * scale * (size_ds @ np.abs(k))  # (b, h, seq_q, d)
    bound_dk = gamma * scale * (np.swapaxes(size_ds, -1, -2) @ np.abs(q))  # (b, h, seq_k, d)
    bound_dv = gamma * (np.swapaxes(p, -1, -2) @ np.abs(g))  # (b, h, seq_k, d_v)
    return bound_dq, bound_dk, bound_dv


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("seq_q", "seq_k", "block_size", "causal", "masked"),
    [
        (37, 37, 8, False, False),
        (37, 37, 8, True, False),
        (37, 37, 5, True, True),
        (11, 29, 4, True, True),  # cross-attention / a cache: the queries are the last 11
        (29, 11, 4, True, False),  # more queries than keys: the first 18 see nothing
        (16, 16, 256, False, True),  # one block
    ],
)
def test_blockwise_backward_equals_softmax_backward_within_rounding(
    backend, dtype, seq_q, seq_k, block_size, causal, masked
):
    q, k, v, g = _inputs(backend, (2, 2, seq_q, 6), seq_k, 5, dtype=dtype, seed=seq_q)
    mask = None
    if masked:  # a random (seq_q x seq_k) mask with some fully masked rows
        host = np.random.default_rng(1).random((2, 1, seq_q, seq_k)) > 0.4
        host[0, 0, 3, :] = False
        mask = backend.asarray(host)
    blockwise, softmax = get_attention("blockwise"), get_attention("softmax")
    out, _ = blockwise(q, k, v, mask=mask, causal=causal, block_size=block_size)
    got = blockwise.backward(g, q, k, v, out, None, mask=mask, causal=causal, block_size=block_size)
    ref_out, weights = softmax(q, k, v, mask=mask, causal=causal)
    want = softmax.backward(g, q, k, v, ref_out, weights, mask=mask, causal=causal)
    host = [backend.to_numpy(a).astype(np.float64) for a in (q, k, v, g, weights)]
    eps = float(np.finfo(np.dtype(dtype)).eps)
    bounds = _rounding_bounds(*host, 1.0 / math.sqrt(6), eps)
    for name, a, b, bound in zip(("dq", "dk", "dv"), got, want, bounds, strict=True):
        diff = np.abs(backend.to_numpy(a).astype(np.float64) - backend.to_numpy(b))
        worst = np.unravel_index(np.argmax(diff - bound), diff.shape)
        assert np.all(diff <= bound), (name, diff[worst], bound[worst], worst)
    if masked:  # the fully masked query row gets exactly zero gradient
        assert np.all(backend.to_numpy(got[0])[0, :, 3] == 0)


def test_blockwise_backward_never_holds_the_score_matrix(backend):
    """Peak memory of blockwise's backward (NumPy's native; the definition on strict) stays
    far below one (seq_q x seq_k) matrix of the scores, which softmax's backward needs
    several of (tracemalloc sees NumPy's buffers, and strict's, which are NumPy's). Not a
    timing: the allocations are deterministic."""
    if backend.name not in ("numpy", "strict"):
        pytest.skip("tracemalloc sees host memory only")
    seq = 4096
    q, k, v, g = _inputs(backend, (1, 1, seq, 16), seq, 16, seed=3)
    blockwise = get_attention("blockwise")
    out, _ = blockwise(q, k, v, causal=True)
    scores_bytes = seq * seq * 8  # one float64 (seq x seq) matrix: 128 MiB
    tracemalloc.start()
    try:
        blockwise.backward(g, q, k, v, out, None, causal=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < scores_bytes / 8, f"peak {peak / 2**20:.2f} MiB"


@pytest.mark.parametrize("causal", [False, True])
def test_numpys_blockwise_backward_native_computes_the_definitions_numbers(causal):
    """Several query tiles of the native (rows x seq_k above its tile size) against the
    definition (the plugin's loop, which strict runs), within the rounding bound."""
    import tinytx

    numpy_backend, strict = tinytx.get_backend("numpy"), tinytx.get_backend("strict")
    rng = np.random.default_rng(7)
    host = [rng.standard_normal(shape) for shape in ((2, 2, 600, 8), (2, 2, 1000, 8))]
    host += [rng.standard_normal((2, 2, 1000, 4)), rng.standard_normal((2, 2, 600, 4))]
    mask = rng.random((2, 1, 600, 1000)) > 0.3
    grads = []
    for backend in (numpy_backend, strict):
        q, k, v, g = (backend.asarray(a) for a in host)
        m = backend.asarray(mask)
        blockwise = get_attention("blockwise")
        out, _ = blockwise(q, k, v, mask=m, causal=causal)
        grads.append(blockwise.backward(g, q, k, v, out, None, mask=m, causal=causal))
    _, weights = F.scaled_dot_product_attention(*host[:3], mask=mask, causal=causal)
    bounds = _rounding_bounds(*host[:3], host[3], weights, 1 / math.sqrt(8), 2.0**-52)
    for native, definition, bound in zip(*grads, bounds, strict=True):
        diff = np.abs(numpy_backend.to_numpy(native) - strict.to_numpy(definition))
        assert np.all(diff <= bound)


# --- exact variants against softmax's backward, grouped-query, recomputation ----------------


def test_grouped_query_gradients_are_summed_per_shared_head(backend):
    q, k, v, g = _inputs(backend, (2, 6, 5, 4), 7, 3, heads_kv=2, seed=4)
    for name in BUILTIN_VARIANTS:
        variant = get_attention(name)
        out, weights = variant(q, k, v, causal=variant.promises.supports_causal)
        causal = variant.promises.supports_causal
        dq, dk, dv = variant.backward(g, q, k, v, out, weights, causal=causal)
        assert tuple(dk.shape) == tuple(k.shape) and tuple(dv.shape) == tuple(v.shape), name
        k_all, v_all = F.repeat_kv(k, 6), F.repeat_kv(v, 6)  # (2, 6, 7, 4 / 3)
        dq_all, dk_all, dv_all = variant.backward(g, q, k_all, v_all, out, weights, causal=causal)
        xp = array_namespace(dk)
        for grouped, full in ((dk, dk_all), (dv, dv_all)):
            summed = F.repeat_kv_backward(full, 2)  # (2, 2, 7, d)
            assert bool(xp.all(grouped == summed)), name
        assert bool(xp.all(dq == dq_all)), name


def test_out_and_weights_none_are_recomputed(backend):
    q, k, v, g = _inputs(backend, (1, 2, 4, 3), 4, 2, seed=5)
    for name in ("softmax", "sigmoid", "blockwise"):
        variant = get_attention(name)
        out, weights = variant(q, k, v, causal=True)
        given = variant.backward(g, q, k, v, out, weights, causal=True)
        recomputed = variant.backward(g, q, k, v, None, None, causal=True)
        for a, b in zip(given, recomputed, strict=True):
            assert np.array_equal(backend.to_numpy(a), backend.to_numpy(b)), name


# --- the registry's contract and errors ------------------------------------------------------


def test_a_variant_without_a_backward_is_a_clear_error_naming_it(backend, clean_registry):
    @register_attention("forward_only", normalized=True, returns_weights=True)
    def forward_only(q, k, v, *, mask=None, causal=False, scale=None):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    variant = get_attention("forward_only")
    assert not variant.has_backward
    q, k, v, g = _inputs(backend, (1, 1, 3, 2), 3, 2)
    out, weights = variant(q, k, v)
    with pytest.raises(AttentionError) as err:
        variant.backward(g, q, k, v, out, weights)
    message = str(err.value)
    assert message.startswith("attention 'forward_only' has no backward; variants with one: ")
    for name in BUILTIN_VARIANTS:
        assert name in message
    report = check_attention("forward_only", backend, max_examples=FAST)
    assert report.passed, report.table()
    assert report["backward"].status == "skipped"
    assert report["backward"].detail == "no backward"


def test_the_backward_is_validated_like_the_forward(backend, clean_registry):
    q, k, v, g = _inputs(backend, (1, 2, 3, 4), 3, 2)
    softmax = get_attention("softmax")
    out, weights = softmax(q, k, v)
    with pytest.raises(AttentionError, match=r"attention 'softmax': grad_out has shape"):
        softmax.backward(g[:, :, :2, ...], q, k, v, out, weights)
    with pytest.raises(AttentionError, match=r"attention 'softmax': weights has shape"):
        softmax.backward(g, q, k, v, out, weights[:, :1, ...])
    with pytest.raises(AttentionError, match="has no option 'window'"):
        softmax.backward(g, q, k, v, out, weights, window=2)
    with pytest.raises(ValueError, match="q, k, v must share one floating dtype|expected q"):
        softmax.backward(g, q, k[:, :, :2, ...], v, out, weights)
    general_mask = backend.asarray(np.ones((1, 1, 3, 3), dtype=bool))
    with pytest.raises(AttentionError, match="key-padding masks only"):
        get_attention("linear").backward(g, q, k, v, out, None, mask=general_mask)

    @register_attention("no_causal", backward=lambda *a, **kw: None)
    def no_causal(q, k, v, *, mask=None, causal=False, scale=None):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    with pytest.raises(AttentionError, match="'no_causal' does not support causal=True"):
        get_attention("no_causal").backward(g, q, k, v, out, None, causal=True)


def _sdpa(q, k, v, *, mask=None, causal=False, scale=None):
    return F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)


def test_what_a_registered_backward_returns_is_checked(backend, clean_registry):
    q, k, v, g = _inputs(backend, (1, 2, 3, 4), 3, 2)

    def two_things(grad_out, q, k, v, out, weights, **kw):
        return q, k

    def wrong_shape(grad_out, q, k, v, out, weights, **kw):
        return q, k[:, :, :1, ...], v

    def wrong_dtype(grad_out, q, k, v, out, weights, **kw):
        xp = array_namespace(q)
        return q, xp.astype(k, xp.float32), v

    def raises(grad_out, q, k, v, out, weights, **kw):
        raise ZeroDivisionError("oops")

    cases = [
        (two_things, r"its backward must return \(dq, dk, dv\), got tuple"),
        (wrong_shape, r"backward's dk has shape \(1, 2, 1, 4\); expected shape \(1, 2, 3, 4\)"),
        (wrong_dtype, r"backward's dk has dtype .*float32.*; expected .*float64"),
        (raises, r"its backward raised ZeroDivisionError: oops"),
    ]
    for backward, message in cases:
        register_attention("bad", backward=backward, replace=True)(_sdpa)
        with pytest.raises(AttentionError, match=r"attention 'bad'.*" + message):
            get_attention("bad").backward(g, q, k, v, None, None)
    with pytest.raises(AttentionError, match="backward=42 is not callable"):
        register_attention("bad", backward=42, replace=True)


# --- the kit catches a broken backward --------------------------------------------------------


def _forgets_the_scale(grad_out, q, k, v, out, weights, *, mask=None, causal=False, scale=None):
    return F.scaled_dot_product_attention_backward(grad_out, q, k, v, weights, scale=1.0)


def _forgets_the_mask(grad_out, q, k, v, out, weights, *, mask=None, causal=False, scale=None):
    _, unmasked = F.scaled_dot_product_attention(q, k, v, scale=scale)  # recomputed: no mask
    return F.scaled_dot_product_attention_backward(grad_out, q, k, v, unmasked, scale=scale)


def _drops_the_row_term(grad_out, q, k, v, out, weights, *, mask=None, causal=False, scale=None):
    """dS = W * dW: softmax's backward without its '- rowsum(dW * W)'."""
    xp = array_namespace(q)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    d_weights = xp.matmul(grad_out, xp.matrix_transpose(v))  # (b, h, s_q, s_k)
    d_scores = weights * d_weights  # (b, h, s_q, s_k)
    dq = xp.matmul(d_scores, k) * scale  # (b, h, s_q, d)
    dk = xp.matmul(xp.matrix_transpose(d_scores), q) * scale  # (b, h, s_k, d)
    return dq, dk, xp.matmul(xp.matrix_transpose(weights), grad_out)


@pytest.mark.parametrize("broken", [_forgets_the_scale, _forgets_the_mask, _drops_the_row_term])
def test_the_kit_catches_a_broken_backward(backend, clean_registry, broken):
    register_attention(
        "broken_backward",
        normalized=True,
        supports_mask=True,
        supports_causal=True,
        returns_weights=True,
        backward=broken,
    )(_sdpa)
    report = check_attention("broken_backward", backend, properties=["backward"], max_examples=20)
    result = report["backward"]
    assert result.status == "failed", report.table()
    assert "!= central differences: relative error" in result.detail
    assert result.counterexample.startswith("AttentionCase(")
    if broken is _forgets_the_mask:  # found only where a mask or causal=True is at work
        assert "mask=" in result.counterexample or "causal=True" in result.counterexample


def test_an_exact_variant_whose_gradients_differ_from_softmax_fails(clean_registry):
    """Promising exact means softmax's gradients too: a backward that is right for another
    function (here: softmax at twice the scale) fails the kit either way."""

    def twice_the_scale(q, k, v, *, mask=None, causal=False, scale=None):
        scale = 2.0 / math.sqrt(q.shape[3]) if scale is None else scale
        return F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)

    def its_backward(grad_out, q, k, v, out, weights, *, mask=None, causal=False, scale=None):
        scale = 2.0 / math.sqrt(q.shape[3]) if scale is None else scale
        return F.scaled_dot_product_attention_backward(grad_out, q, k, v, weights, scale=scale)

    register_attention("not_exact", exact=True, returns_weights=True, backward=its_backward)(
        twice_the_scale
    )
    report = check_attention("not_exact", "numpy", properties=["backward"], max_examples=FAST)
    assert report["backward"].status == "failed"
    assert "differs from softmax attention's" in report["backward"].detail


# --- the CLI ---------------------------------------------------------------------------------


def test_check_plugin_shows_the_backward_line_within_100_columns():
    result = CliRunner().invoke(
        cli, ["check-plugin", "blockwise", "--max-examples", "3"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if row.startswith("backward"))
    assert "passed" in line and "vs central differences; matches softmax's" in line
    assert max(len(row) for row in result.output.splitlines()) <= 100
    assert set(available_attention()) >= set(BUILTIN_VARIANTS)
