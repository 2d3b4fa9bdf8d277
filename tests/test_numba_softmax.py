"""The attention tiles' compiled softmax numerator (numba_kernels.softmax_numerator).

Checked two ways: the numerator and row totals of one tile against NumPy's
``_softmax_block`` (the natives' softmax, itself the definition bit for bit), and whole
attention without weights against the readable definition, with special scores (+-inf,
NaN, rows with nothing allowed) that must go back to NumPy.

Tolerance of the tile check: both sides exponentiate the same float32 difference s - m;
the kernel's exp is within 1.5 ulp and NumPy's float32 exp within 3 (the budget
tests/test_numba_kernels.py allows it), and an ulp is at most eps relative: each
exponential within 4.5 eps relative. A float32 sum of n positive numbers in any order is
within (n - 1) eps of the exact sum relative to it, so each total within (n + 4.5) eps.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from native_helpers import definition

import tinytx
from tinytx import functional as F
from tinytx.backends import numba_kernels, numpy_natives

pytest.importorskip("numba", reason="the compiled kernels need numba (pip install 'tinytx[fast]')")

EPS = float(np.finfo(np.float32).eps)


@settings(max_examples=40, deadline=None)  # the first example compiles (or loads) the kernel
@given(
    rows=st.integers(1, 9),
    n=st.integers(1, 70),
    spread=st.sampled_from([0.1, 3.0, 40.0]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_numerator_equals_numpys(rows, n, spread, masked, seed) -> None:
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((2, rows, n)) * spread).astype(np.float32)
    biases = []
    if masked:  # some keys dropped, one row with nothing allowed
        allowed = rng.random((2, rows, n)) < 0.7
        allowed[0, 0] = False
        biases = [numpy_natives._additive(allowed, np.dtype(np.float32))]
    w = scores.copy()
    totals = numba_kernels.softmax_numerator(w, biases)
    w_ref = scores.copy()
    totals_ref = numpy_natives._softmax_block(w_ref, None, biases, normalize=False)
    assert totals is not None and totals.shape == totals_ref.shape == (2, rows, 1)
    assert np.all(np.abs(w - w_ref) <= 4.5 * EPS * w_ref + np.finfo(np.float32).tiny)
    assert np.all(np.abs(totals - totals_ref) <= (n + 4.5) * EPS * totals_ref)
    if masked:
        assert np.all(w[0, 0] == 0) and totals[0, 0, 0] == 1  # nothing allowed: output 0


@pytest.mark.parametrize("special", [np.inf, np.nan])
def test_an_infinite_or_nan_score_goes_back_to_numpy(special) -> None:
    w = np.zeros((1, 2, 4), dtype=np.float32)
    w[0, 1, 2] = special
    before = w.copy()
    assert numba_kernels.softmax_numerator(w, []) is None
    np.testing.assert_array_equal(w, before)  # nothing exponentiated


@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_without_weights_with_special_scores(special, masked) -> None:
    """Through the tiled native: the same output as the definition, NaN where it has NaN."""
    tinytx.get_backend("numpy")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 2, 300, 8)).astype(np.float32)  # 300 x 300: the tiled path
    k, v = (rng.standard_normal((2, 2, 300, 8)).astype(np.float32) for _ in range(2))
    k[1, 0, 5] = special  # every query of (batch 1, head 0) meets it
    mask = rng.random((2, 1, 1, 300)) < 0.8 if masked else None
    out, _ = F.scaled_dot_product_attention(q, k, v, mask=mask, return_weights=False)
    out_ref, _ = definition(F.scaled_dot_product_attention, q, k, v, mask=mask)
    assert np.array_equal(np.isnan(out), np.isnan(out_ref))
    finite = ~np.isnan(out_ref)
    # The other heads: out = sum_j w_j v_j with weights summing to 1, so |out| <= max |v|;
    # the scores' rounding ((d + 1) eps |q| |k| scale, ~1e-5 here) moves each weight
    # relatively by a few times that, and the sum of 300 products adds (300 + 1) eps:
    # 4 (seq_k + d) eps max |v| covers both with room.
    bound = 4 * (300 + 8) * EPS * np.abs(v).max()
    assert np.all(np.abs(out[finite] - out_ref[finite]) <= bound)


def test_kernels_off_leave_the_tile_to_numpy(monkeypatch) -> None:
    monkeypatch.setenv("TINYTX_NUMBA", "0")
    assert not numba_kernels.enabled()
    assert numba_kernels.softmax_numerator(np.zeros((1, 1, 3), np.float32), []) is None


def test_float64_and_strided_tiles_are_left_to_numpy() -> None:
    assert numba_kernels.softmax_numerator(np.zeros((1, 2, 3)), []) is None  # float64
    strided = np.zeros((1, 4, 6), np.float32)[..., ::2]
    assert numba_kernels.softmax_numerator(strided, []) is None
