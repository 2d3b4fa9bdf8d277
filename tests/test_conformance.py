"""The conformance kit (tinytx.testing): every registered variant passes it on every
backend; the three broken plugins are caught; and each property fails for a variant
that breaks it, so none of them can pass vacuously."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from array_api_compat import array_namespace
from hypothesis import given
from hypothesis import strategies as st

from tinytx import functional as F
from tinytx.plugins import Promises, available_attention, load_plugin, registry
from tinytx.testing import (
    PROPERTIES,
    AttentionCase,
    AttentionShape,
    attention_cases,
    check_attention,
    masks,
    qkv,
    shapes,
)

BROKEN = Path(__file__).resolve().parent / "broken_plugins"
FAST = 8  # hypothesis examples per property for the many small checks below


@pytest.fixture
def clean_registry():
    stores = (registry._REGISTRY, registry._LOADED, registry._BROKEN)
    saved = [dict(store) for store in stores]
    yield
    for store, copy in zip(stores, saved, strict=True):
        store.clear()
        store.update(copy)


# --- every registered variant on every backend -----------------------------------------


@pytest.mark.parametrize("name", sorted(available_attention()))
def test_every_registered_variant_passes_the_kit(backend, name):
    report = check_attention(name, backend)
    report.assert_passed()
    promises = available_attention()[name].promises
    expected_skips = {
        "normalized": not promises.normalized,
        "permutation_equivariance": not promises.permutation_equivariant,
        "exact_softmax": not promises.exact,
    }
    for prop, skipped in expected_skips.items():
        assert report[prop].status == ("skipped" if skipped else "passed"), (prop, report.table())
    for prop in ("shape_dtype", "finite_at_1e4", "batch_independence", "head_independence"):
        assert report[prop].status == "passed"
    if promises.supports_causal:
        assert report["causal_no_leak"].status == "passed"
    if promises.supports_mask:
        assert report["padding_invariance"].status == "passed"


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("blockwise", {"block_size": 1}),
        ("blockwise", {"block_size": 2}),
        ("blockwise", {"block_size": 3}),
        ("linear", {"chunk": 1}),
        ("linear", {"chunk": 3}),
        ("sliding_window", {"window": 1}),
        ("sliding_window", {"window": 2}),
        ("cosine", {"temperature": 0.5}),
    ],
)
def test_variants_pass_the_kit_with_small_blocks_chunks_and_windows(name, options):
    """With the kit's short sequences the default block (256) is one block: small ones
    exercise the online-softmax rescaling and the chunked prefix sums."""
    props = ["shape_dtype", "causal_no_leak", "padding_invariance", "exact_softmax", "normalized"]
    check_attention(name, "numpy", options=options, properties=props).assert_passed()


# --- the three broken plugins ----------------------------------------------------------


def test_a_plugin_that_fails_at_import_is_caught_naming_it(clean_registry):
    from tinytx.plugins import PluginError

    with pytest.raises(PluginError, match=r"plugin '.*fails_at_import\.py' failed to load"):
        load_plugin(BROKEN / "fails_at_import.py")
    assert "broken_import" not in available_attention()


def test_the_wrong_shape_plugin_fails_shape_dtype_naming_it(backend, clean_registry):
    load_plugin(BROKEN / "wrong_shape.py")
    props = ["shape_dtype", "padding_invariance"]
    report = check_attention("broken_shape", backend, properties=props, max_examples=FAST)
    assert not report.passed
    result = report["shape_dtype"]
    assert result.status == "failed"
    assert "attention 'broken_shape' (plugin" in result.detail
    assert "wrong_shape.py" in result.detail and "returned output of shape" in result.detail
    assert result.counterexample.startswith("AttentionCase(")
    assert "FAILED" in report.table() and "counter-example: AttentionCase(" in report.table()


def test_the_plugin_ignoring_causal_fails_causal_no_leak_with_a_small_example(
    backend, clean_registry
):
    load_plugin(BROKEN / "ignores_causal.py")
    report = check_attention("broken_causal", backend, max_examples=FAST)
    result = report["causal_no_leak"]
    assert result.status == "failed", report.table()
    assert "causal=True, yet changing the tokens after position" in result.detail
    # hypothesis shrinks it to the smallest case: two tokens, the first one looked at
    assert "seq_q=2, seq_k=2" in result.counterexample and "'t': 0" in result.counterexample
    assert report["shape_dtype"].status == "passed"  # nothing else gives it away


# --- a variant that breaks one property fails exactly there ------------------------------


def _sdpa(q, k, v, *, mask=None, causal=False, scale=None):
    return F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)


def _ignores_mask(q, k, v, *, mask=None, causal=False, scale=None):
    return _sdpa(q, k, v, causal=causal, scale=scale)


def _mixes_batch(q, k, v, *, mask=None, causal=False, scale=None):
    xp = array_namespace(q)
    out, w = _sdpa(q, k, v, mask=mask, causal=causal, scale=scale)
    return out + xp.mean(out, axis=0, keepdims=True), w  # every sequence sees the others


def _mixes_heads(q, k, v, *, mask=None, causal=False, scale=None):
    xp = array_namespace(q)
    out, w = _sdpa(q, k, v, mask=mask, causal=causal, scale=scale)
    return out + xp.mean(out, axis=1, keepdims=True), w  # talking heads, unannounced


def _naive_exp(q, k, v, *, mask=None, causal=False, scale=None):
    xp = array_namespace(q)
    e = xp.exp(xp.matmul(q, xp.matrix_transpose(k)) / math.sqrt(q.shape[-1]))  # overflows
    w = e / xp.sum(e, axis=-1, keepdims=True)
    return xp.matmul(w, v), w


def _unnormalized(q, k, v, *, mask=None, causal=False, scale=None):
    out, w = _sdpa(q, k, v, mask=mask, causal=causal, scale=scale)
    return 2.0 * out, 2.0 * w


def _positional(q, k, v, *, mask=None, causal=False, scale=None):
    xp = array_namespace(q)
    seq = q.shape[2]
    ramp = xp.reshape(xp.arange(seq, dtype=q.dtype), (1, 1, seq, 1))  # (1, 1, seq, 1)
    return _sdpa(q + ramp, k, v, mask=mask, causal=causal, scale=scale)


def _inexact(q, k, v, *, mask=None, causal=False, scale=None):
    return _sdpa(q, k, v, mask=mask, causal=causal, scale=0.5)


def _dtype_dependent(q, k, v, *, mask=None, causal=False, scale=None):
    xp = array_namespace(q)
    out, w = _sdpa(q, k, v, mask=mask, causal=causal, scale=scale)
    return (out + 1.0 if xp.__name__.startswith("array_api_strict") else out), w


def _silently_takes_causal(q, k, v, *, mask=None, causal=False, scale=None):
    return _sdpa(q, k, v, scale=scale)


def _refuses_causal(q, k, v, *, mask=None, causal=False, scale=None):
    if causal:
        raise ValueError("no causal here")
    if mask is not None:
        raise ValueError("no masks here")
    return _sdpa(q, k, v, scale=scale)


ALL = Promises(
    normalized=True,
    permutation_equivariant=True,
    exact=True,
    supports_mask=True,
    supports_causal=True,
    returns_weights=True,
)


@pytest.mark.parametrize(
    ("fn", "promises", "breaks"),
    [
        (_ignores_mask, ALL, "padding_invariance"),
        (_mixes_batch, Promises(), "batch_independence"),
        (_mixes_heads, Promises(), "head_independence"),
        (_naive_exp, Promises(), "finite_at_1e4"),
        (_unnormalized, Promises(normalized=True), "normalized"),
        (_positional, Promises(permutation_equivariant=True), "permutation_equivariance"),
        (_inexact, Promises(exact=True), "exact_softmax"),
        (_dtype_dependent, Promises(), "backend_agreement"),
        (_silently_takes_causal, Promises(), "causal_no_leak"),
    ],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # _naive_exp overflows on purpose
def test_each_property_catches_the_variant_that_breaks_it(fn, promises, breaks):
    report = check_attention(fn, "numpy", promises=promises, properties=[breaks], max_examples=15)
    assert report[breaks].status == "failed", report.table()
    assert report[breaks].counterexample.startswith("AttentionCase(")


def test_the_sdpa_function_itself_passes_everything_it_promises():
    check_attention(_sdpa, "numpy", promises=ALL, max_examples=FAST).assert_passed()


def test_a_variant_that_takes_causal_silently_is_held_to_it_whatever_it_declares():
    props = ["causal_no_leak", "shape_dtype"]
    report = check_attention(_silently_takes_causal, "numpy", properties=props, max_examples=FAST)
    assert report["causal_no_leak"].status == "failed"
    assert report["shape_dtype"].status == "passed"
    note = check_attention(_sdpa, "numpy", properties=["causal_no_leak"], max_examples=FAST)
    assert note["causal_no_leak"].status == "passed"
    assert "without declaring it, so it is held to it" in note["causal_no_leak"].detail


def test_a_loud_refusal_is_a_skip_not_a_failure():
    report = check_attention(_refuses_causal, "numpy", max_examples=FAST)
    assert report.passed, report.table()
    assert report["causal_no_leak"].status == "skipped"
    assert "refuses causal=True: " in report["causal_no_leak"].detail
    assert "no causal here" in report["causal_no_leak"].detail
    assert report["padding_invariance"].status == "skipped"
    assert report["normalized"].detail == "not promised"


def test_the_report_lists_every_property_and_rejects_unknown_ones():
    report = check_attention("softmax", "numpy", max_examples=2)
    assert list(report.results) == list(PROPERTIES)
    assert set(report.status().values()) == {"passed"}
    with pytest.raises(ValueError, match="unknown properties"):
        check_attention("softmax", "numpy", properties=["nope"])


# --- the public strategies -------------------------------------------------------------


@given(shape=shapes(max_seq=5), data=st.data())
def test_qkv_and_masks_strategies_give_arrays_of_the_shape(backend, shape, data):
    q, k, v = data.draw(qkv(shape, backend=backend, dtype="float64"))
    assert tuple(q.shape) == (shape.batch, shape.heads, shape.seq_q, shape.d)
    assert tuple(k.shape) == (shape.batch, shape.kv_heads, shape.seq_k, shape.d)
    assert tuple(v.shape) == (shape.batch, shape.kv_heads, shape.seq_k, shape.d_v)
    assert backend.owns(q) and str(q.dtype).endswith("float64")
    assert shape.heads % shape.kv_heads == 0
    padding = data.draw(masks(shape, backend=backend, kind="padding"))
    assert tuple(padding.shape) == (shape.batch, 1, 1, shape.seq_k)
    general = data.draw(masks(shape, backend=backend, kind="random"))
    assert tuple(general.shape) == (shape.batch, 1, shape.seq_q, shape.seq_k)


def test_a_counterexample_rebuilds_the_same_inputs(backend):
    case = AttentionCase(
        AttentionShape(2, 2, 3, 4, 2, 5, 1), seed=7, mask="padding", lengths=(4, 1)
    )
    rebuilt = eval(repr(case), {"AttentionCase": AttentionCase, "AttentionShape": AttentionShape})
    for a, b in zip(case.on(backend), rebuilt.on(backend), strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    mask = backend.to_numpy(case.on(backend)[3])
    assert mask.shape == (2, 1, 1, 4) and mask[1].sum() == 1


@given(case=attention_cases(shape=shapes(max_seq=4), mask=(None, "padding", "random"), causal=None))
def test_attention_cases_fit_the_contract(case):
    host = case.host()
    F.check_attention_inputs(host["q"], host["k"], host["v"], host["mask"])
    assert host["q"].dtype == np.dtype(case.dtype)
