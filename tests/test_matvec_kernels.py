"""The compiled few-rows product (backends/matvec_kernels.py) against the definition.

Decoding multiplies one row per sequence by every weight; with numba installed the
linear native sends such products to the kernel. The kernel sums in its own order
(``fastmath``: vector lanes), so it agrees with ``x @ W.T + b`` up to the rounding of a
dot product of d_in terms: |error| <= 2 (d_in + 1) eps (|x| |W|^T + |b|) elementwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from native_helpers import definition, linear_bound

import tinytx
from tinytx import functional as F
from tinytx.backends import matvec_kernels

pytest.importorskip("numba", reason="the few-rows kernel needs numba (pip install 'tinytx[fast]')")


@settings(max_examples=40, deadline=None)  # the first example compiles (or loads) the kernel
@given(
    rows=st.integers(1, matvec_kernels.MAX_ROWS),
    d_in=st.integers(1, 70),
    d_out=st.integers(1, 70),
    with_bias=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
    threads=st.sampled_from([1, 2]),
)
def test_kernel_equals_the_definition(rows, d_in, d_out, with_bias, dtype, seed, threads) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d_in)).astype(dtype)
    weight = rng.standard_normal((d_out, d_in)).astype(dtype)
    bias = rng.standard_normal(d_out).astype(dtype) if with_bias else None
    y = matvec_kernels.few_rows_matmul(x, weight, bias, threads)
    reference = definition(F.linear, x, weight, bias)
    assert y is not None and y.dtype == dtype and y.shape == (rows, d_out)
    assert np.all(np.abs(y - reference) <= linear_bound(x, weight, bias))


def test_linear_uses_the_kernel_for_a_decode_row(monkeypatch) -> None:
    tinytx.get_backend("numpy")  # made once: F.linear then finds its natives
    calls = []
    kernel = matvec_kernels.few_rows_matmul
    monkeypatch.setattr(
        "tinytx.backends.numpy_natives.few_rows_matmul",
        lambda *args: calls.append(args[0].shape) or kernel(*args),
    )
    x = np.ones((1, 1, 16), dtype=np.float32)  # (batch, seq, d_in): one new token
    weight, bias = np.full((5, 16), 0.5, dtype=np.float32), np.arange(5, dtype=np.float32)
    y = F.linear(x, weight, bias)
    assert calls == [(1, 16)]
    np.testing.assert_array_equal(y, np.full((1, 1, 5), 8.0, dtype=np.float32) + bias)


@pytest.mark.parametrize(
    "case",
    ["too many rows", "mixed dtypes", "integers", "strided weight", "bias of another dtype"],
)
def test_inputs_the_kernel_does_not_cover_go_back_to_blas(case) -> None:
    x = np.ones((2, 4), dtype=np.float32)
    weight, bias = np.ones((3, 4), dtype=np.float32), None
    if case == "too many rows":
        x = np.ones((matvec_kernels.MAX_ROWS + 1, 4), dtype=np.float32)
    elif case == "mixed dtypes":
        x = x.astype(np.float64)
    elif case == "integers":
        x, weight = x.astype(np.int64), weight.astype(np.int64)
    elif case == "strided weight":
        weight = np.ones((4, 3), dtype=np.float32).T  # (3, 4), not C-contiguous
    else:
        bias = np.ones(3, dtype=np.float64)
    assert matvec_kernels.few_rows_matmul(x, weight, bias, 2) is None


def test_tinytx_numba_0_turns_the_kernel_off(monkeypatch) -> None:
    x, weight = np.ones((1, 4), dtype=np.float32), np.ones((3, 4), dtype=np.float32)
    assert matvec_kernels.kernel_available()
    monkeypatch.setenv("TINYTX_NUMBA", "0")
    assert not matvec_kernels.kernel_available()
    assert matvec_kernels.few_rows_matmul(x, weight, None, 2) is None
    np.testing.assert_array_equal(F.linear(x, weight), np.full((1, 3), 4.0, dtype=np.float32))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 5000),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_lane_sum_is_the_sum_within_rounding(n, dtype, seed) -> None:
    """The bandwidth probe's sum: any order of n adds is within (n - 1) eps sum|a| of the
    exact sum (float64 here, exact enough for n <= 5000 float32 terms)."""
    a = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    exact = float(np.sum(a.astype(np.float64)))
    eps = float(np.finfo(dtype).eps)
    bound = max(n - 1, 0) * eps * float(np.sum(np.abs(a.astype(np.float64))))
    if dtype == np.float64:
        bound *= 2  # the float64 reference itself rounds at the same scale
    assert abs(matvec_kernels.lane_sum(a) - exact) <= bound


@pytest.mark.parametrize(
    "a", [np.ones((2, 3), dtype=np.float32), np.ones(8, dtype=np.int64), np.ones(8)[::2]]
)
def test_lane_sum_refuses_what_it_cannot_read_as_one_stream(a) -> None:
    with pytest.raises(ValueError, match="1-D contiguous float32/float64"):
        matvec_kernels.lane_sum(a)


def test_the_bandwidth_probe_reads_with_the_compiled_sum(monkeypatch) -> None:
    """bench generate's ceiling comes from the compiled sum where numba runs, and from
    NumPy's sum (said so in the printed words) where it does not."""
    from tinytx.bench import generate

    summed = []
    real = matvec_kernels.lane_sum
    monkeypatch.setattr(matvec_kernels, "lane_sum", lambda a: summed.append(a.size) or real(a))
    assert generate.read_bandwidth(n_bytes=1 << 16, repeats=2, threads=2) > 0
    assert sum(summed) == 16 + 2 * (1 << 14)  # the warm-up slice, then both halves twice
    assert generate.read_method() == "a compiled sum in vector lanes"
    monkeypatch.setenv("TINYTX_NUMBA", "0")
    summed.clear()
    assert generate.read_bandwidth(n_bytes=1 << 16, repeats=2, threads=2) > 0
    assert summed == [] and "NumPy's sum" in generate.read_method()


def test_the_weights_are_read_where_they_lie_slice_by_slice(monkeypatch) -> None:
    """Summing a model's weights: each array a step reads (a view of the model's own,
    the tied embedding once, no position table), split between the threads, every slice
    summed once per repeat; the rate counts their bytes."""
    from tinytx.bench import generate
    from tinytx.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1))
    arrays = generate.weight_arrays(model)
    owned = [a for n, a in model.parameters().items() if not n.startswith("position")]
    assert len(arrays) == len(owned)
    assert all(np.shares_memory(a, b) for a, b in zip(arrays, owned, strict=True))
    assert sum(a.nbytes for a in arrays) == generate.weight_bytes_per_token(model)
    summed = []
    real = matvec_kernels.lane_sum
    monkeypatch.setattr(matvec_kernels, "lane_sum", lambda a: summed.append(a.size) or real(a))
    assert generate.read_bandwidth(repeats=3, threads=2, data=arrays) > 0
    sizes = sum(a.size for a in arrays)
    assert sum(summed) == 16 + 3 * sizes  # the warm-up slice, then every slice, three times
    assert len(summed) == 1 + 3 * 2 * len(arrays)  # two slices of each array a repeat
