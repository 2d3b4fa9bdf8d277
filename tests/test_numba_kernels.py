"""The numba kernels (backends/numba_kernels.py) compute what tinytx.functional's
definitions compute, within the rounding errors derived below.

Each test runs a function as the library runs it (the NumPy native, which hands float32
blocks to a kernel) and with the natives switched off (the readable definition), with
blocks shrunk so that small inputs already take the threaded, many-block path. The
kernels are not the definition bit for bit (they fuse multiply-adds and compute exp
themselves), so each comparison has a bound derived from the operations both sides do.
Notation: u = eps / 2, the unit roundoff of float32; "each side" = kernel and definition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from native_helpers import definition

from tinytx import functional as F
from tinytx.backends import numba_kernels, numpy_natives

pytest.importorskip("numba")

F32 = np.float32
EPS = float(np.finfo(F32).eps)  # 2^-23
U = EPS / 2
SUBNORMAL = float(np.finfo(F32).smallest_subnormal)  # 2^-149
# |computed exp(y) / exp(y) - 1| in units of eps, for float32 results that are normal
# numbers, both sides together: the kernel's exp is within 1.5 ulp (its docstring, and
# test_exp_within_its_documented_ulps; 1.19 measured on Zen 4), NumPy's float32 exp within
# 3 (2.4 measured here for its AVX-512 loop; libm's is below 1); an ulp of a normal float
# is at most eps times it.
EXP_EPS = 1.5 + 3.0
KERNEL_NAMES = ("gelu", "gelu_backward", "gelu_tanh", "layer_norm", "layer_norm_backward")

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
scales = st.sampled_from([1e-3, 1.0, 6.0, 20.0])


@pytest.fixture(autouse=True)
def small_blocks_and_numba_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks, no size threshold, two threads; the kernels switched on."""
    monkeypatch.setattr(numpy_natives, "_BLOCK_ELEMENTS", 8)
    monkeypatch.setattr(numpy_natives, "_PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.delenv("TINYTX_NUMBA", raising=False)
    before = numpy_natives.get_num_threads()
    numpy_natives.set_num_threads(2)
    yield
    numpy_natives.set_num_threads(before)


def random_array(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the kernels the natives call, in order."""
    calls: list[str] = []
    for name in KERNEL_NAMES:
        original = getattr(numba_kernels, name)

        def spy(*args, _name=name, _original=original):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(numba_kernels, name, spy)
    return calls


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
    """|got - want| <= bound elementwise; NaN exactly where the definition has NaN."""
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    error = np.abs(got[finite].astype(np.float64) - want[finite])
    worst = np.argmax(error - bound[finite]) if error.size else 0
    assert np.all(error <= bound[finite]), (
        f"error {error.flat[worst]:.3g} > bound {bound[finite].flat[worst]:.3g} "
        f"(got {got[finite].flat[worst]!r}, definition {want[finite].flat[worst]!r})"
    )


# --- GELU -------------------------------------------------------------------------------
#
# Both sides compute, from the same float32 x, the same operations in the same order:
#   size = min(|x|, 1e4) (the backward: |x|), z = size * fl(1/sqrt 2), t = 1 / (z/2 + 1),
#   P = Horner(t), y = P - z*z, e = exp(y), erfc = t e,
# so z and t are the same floats on both sides (z/2 is exact, so a fused z/2 + 1 rounds as
# the unfused one). They differ where the kernel fuses a multiply and an add (one rounding
# instead of two), and in exp. Per side, to first order:
#   Horner: each step p_k = c_k + t p_{k+1} rounds |t p_{k+1}| and |p_k| at most once
#     each, later steps multiply the error by t <= 1: |dP| <= u H, H = sum_k |t p_{k+1}| + |p_k|;
#   z*z and y = P - z*z: <= u z^2 + u |y|;
#   so |dy| <= 2u (H + z^2 + |y|) = eps (H + z^2 + |y|) between the sides, which changes
#   exp(y) by that factor (the exp argument's rounding: large when z^2 is);
#   exp itself: EXP_EPS eps; t e, size/2 * erfc: u each per side, so eps each.
# Where a result is a subnormal number, relative bounds do not hold: each rounding there
# is off by at most half a subnormal step s, and exp by 1.5 s, in absolute terms. GELU's
# erfc is subnormal only for |x| in about [13, 14.2], and its errors are then multiplied
# by size/2: per side (1.5 s t + 0.5 s) size/2 + s, so both sides (2 size + 2) s.


def erfc_parts(size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(erfc(z), z^2 + H + |y|) of the fit at float64 precision for size = |x| >= 0
    (float64): the fit's value and the exp argument's error bound in units of eps."""
    z = size * float(F32(1 / math.sqrt(2)))
    t = 1 / (z / 2 + 1)
    p = np.full_like(z, F._ERFC_COEFFS[-1])
    horner = np.zeros_like(z)
    for c in reversed(F._ERFC_COEFFS[:-1]):
        tp = t * p
        p = c + tp
        horner += np.abs(tp) + np.abs(p)
    y = p - z * z
    return t * np.exp(y), z * z + horner + np.abs(y)


def gelu_bound(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|kernel - definition| <= this, for GELU(x) (see above)."""
    with np.errstate(invalid="ignore", over="ignore"):
        size = np.minimum(np.abs(x.astype(np.float64)), 1e4)
        erfc, y_error = erfc_parts(size)
        tail = size / 2 * erfc
        relative = EPS * (y_error + EXP_EPS + 2)  # of the tail, between the sides
        # the last subtraction rounds once per side
        subnormal = (2 * size + 2) * SUBNORMAL
        return np.nan_to_num(relative * tail) + EPS * np.abs(reference) + subnormal


@given(shape=shapes, seed=st.integers(0, 2**16), scale=scales)
def test_gelu_kernel_equals_definition(numpy_backend, shape, seed, scale) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, scale))
    native, reference = F.gelu(x), definition(F.gelu, x)
    assert_within(native, reference, gelu_bound(x, reference))


def extremes() -> np.ndarray:
    """0, tiny, subnormal, huge and infinite inputs, NaN, and the range where GELU's and
    phi's results are subnormal numbers, on both sides of 0."""
    info = np.finfo(F32)
    values = [0.0, info.smallest_subnormal, info.tiny, 1e-20, 1.0, 13.0, 13.5, 14.0, 40.0]
    values += [1e4, 1e5, float(info.max), math.inf]
    values += list(np.linspace(12.5, 15.0, 41))  # subnormal tails and densities
    x = np.array(values + [-v for v in values] + [math.nan], dtype=F32)
    return x


def test_gelu_kernel_at_the_extremes(numpy_backend, kernel_calls) -> None:
    x = numpy_backend.asarray(extremes())
    native, reference = F.gelu(x), definition(F.gelu, x)
    assert "gelu" in kernel_calls
    assert_within(native, reference, gelu_bound(x, reference))
    assert native[np.isposinf(x)] == np.inf and native[np.isneginf(x)] == 0


# GELU, tanh form: y = x/2 (1 + tanh u), u = c (x + a x^3). Per side: u carries five
# roundings (three products, a sum of like signs, the product by c): |du| <= 5 u |u|,
# and it moves 1 + tanh u by sech^2(u) |du| <= 5 u max(u sech^2 u) < 2.3 u. The
# definition's tanh is within 4 ulp (NumPy's SIMD loops; an ulp of |t| < 1 is at most u),
# 1 + t rounds by u; the kernel's 1 + exp(-2u) and its division round by u each and its
# exp by 1.5 ulp, which moves 2 sigmoid(2u) by at most 2 s (1 - s) 1.5 eps <= 0.75 eps.
# So 1 + t is off by at most (2.3 + 4 + 1) u per side, times |x| / 2; the last two
# products round by u each relative to |y| <= |x|. Both sides: 5 eps |x| covers it.


def test_gelu_tanh_kernel_equals_definition_everywhere(numpy_backend, kernel_calls) -> None:
    grid = np.linspace(-30.0, 30.0, 200_001, dtype=F32)  # dense: where tanh saturates too
    x = numpy_backend.asarray(np.concatenate([grid, extremes()]))
    with np.errstate(all="ignore"):
        native = F.gelu(x, approximate="tanh")
        reference = definition(F.gelu, x, approximate="tanh")
    assert "gelu_tanh" in kernel_calls
    finite = np.isfinite(x)
    bound = 5 * EPS * np.abs(x[finite].astype(np.float64)) + SUBNORMAL
    assert_within(native[finite], reference[finite], bound)
    assert native[np.isposinf(x)] == np.inf and native[np.isneginf(x)] == 0


# dx = dy (Phi + x phi). Phi: tail = erfc/2 (exact) with the tail's error above (exp,
# y, and t e: eps), then 1 - tail for x >= 0 (u per side). phi = exp(x * -0.5 * x) / sqrt(2 pi):
# its argument is the same float on both sides (x * -0.5 is exact, then one rounding, no
# add to fuse), so exp's EXP_EPS, the product by 1/sqrt(2 pi) and x phi: eps each. The sum
# Phi + x phi and the product by dy: u per side each, relative to what they round.
# Subnormal results (|x| about 13.2 to 14.4): phi is off by 1.5 s + 0.5 s per side, which
# x phi multiplies by |x|; the tail by 1.5 s + 0.5 s (t e) + 0.5 s (/ 2); the sum by 0.5 s:
# both sides |dy| (4 |x| + 6) s, and s for the product by dy.


def gelu_backward_bound(grad_y: np.ndarray, x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        x64, dy = x.astype(np.float64), np.abs(grad_y.astype(np.float64))
        erfc, y_error = erfc_parts(np.abs(x64))
        tail = erfc / 2  # Phi(-|x|)
        cdf = np.where(x64 >= 0, 1 - tail, tail)  # Phi(x)
        x_phi = np.abs(x64) * np.exp(-x64 * x64 / 2) / math.sqrt(2 * math.pi)
        d_cdf = EPS * (y_error + EXP_EPS + 1) * tail + EPS * cdf
        d_x_phi = EPS * (EXP_EPS + 2) * x_phi
        d_slope = d_cdf + d_x_phi + EPS * (cdf + x_phi)
        subnormal = (dy * (4 * np.abs(x64) + 6) + 1) * SUBNORMAL
        bound = dy * d_slope + EPS * np.abs(reference) + subnormal
        return np.nan_to_num(bound, nan=np.inf)


@given(shape=shapes, seed=st.integers(0, 2**16), scale=scales)
def test_gelu_backward_kernel_equals_definition(numpy_backend, shape, seed, scale) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, scale))
    grad_y = numpy_backend.asarray(random_array(seed + 1, shape, 3.0))
    native, reference = F.gelu_backward(grad_y, x), definition(F.gelu_backward, grad_y, x)
    assert_within(native, reference, gelu_backward_bound(grad_y, x, reference))


def test_gelu_backward_kernel_at_the_extremes(numpy_backend, kernel_calls) -> None:
    x = numpy_backend.asarray(extremes())
    grad_y = numpy_backend.asarray(random_array(0, x.shape, 3.0))
    with np.errstate(all="ignore"):
        native, reference = F.gelu_backward(grad_y, x), definition(F.gelu_backward, grad_y, x)
    assert "gelu_backward" in kernel_calls
    assert_within(native, reference, gelu_backward_bound(grad_y, x, reference))
    assert np.all(np.isnan(native[np.isinf(x)]))  # as the definition: inf * phi(inf) = inf * 0


def test_gelu_kernels_where_results_are_subnormal(numpy_backend) -> None:
    """A dense grid over the window where erfc and phi are subnormal numbers (the bounds'
    subnormal terms), with cotangents of all sizes."""
    x = numpy_backend.asarray(np.linspace(-14.5, -12.5, 100_001).astype(F32))
    grad_y = numpy_backend.asarray(random_array(1, x.shape, 3.0))
    native, reference = F.gelu(x), definition(F.gelu, x)
    assert_within(native, reference, gelu_bound(x, reference))
    native, reference = F.gelu_backward(grad_y, x), definition(F.gelu_backward, grad_y, x)
    assert_within(native, reference, gelu_backward_bound(grad_y, x, reference))


# --- LayerNorm ----------------------------------------------------------------------------
#
# Per row of d numbers, A = mean |x|, c = x - mean, v = mean(c^2), r = 1 / sqrt(v + eps_ln),
# xhat = c r. The kernel sums in float64 (its errors are float32 roundings of the results);
# the definition sums float32 numbers, in some order: a sum of d terms in any order is off
# by at most (d - 1) u sum |terms|. To first order, between the sides:
#   mean: (d - 1) u A + u A (the division) + u A (the kernel rounds its mean) <= (d + 1) u A;
#   c_i:  d_mean + 2u |c_i| (one subtraction per side);
#   v:    2 mean(|c|) d_mean + (d + 3) u (v + eps_ln)  (squares, sum, division, + eps_ln);
#   r:    relative d_v / (2 (v + eps_ln)) + 4u  (sqrt and reciprocal, or divide, per side);
#   xhat: r d_c + |xhat| (d_r + 2u);  y = xhat w + b: |w| d_xhat + 2u (|xhat w| + |y|).


def row_stats(x: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """Float64 statistics of each row of x (..., d), and the first-order error bounds of
    mean, centred values, the reciprocal std (relative) and xhat, as derived above."""
    x = x.astype(np.float64)
    d = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)
    c = x - mean
    var = (c * c).mean(axis=-1, keepdims=True)
    # a constant row with eps_ln = 0 has r = 0 by the definition's convention (y = 0);
    # the kernels leave such rows to the definition, so they are exact
    safe = np.where(var + eps > 0, var + eps, 1.0)
    r = np.where(var + eps > 0, 1 / np.sqrt(safe), 0.0)
    d_mean = (d + 1) * U * np.abs(x).mean(axis=-1, keepdims=True)
    d_c = d_mean + 2 * U * np.abs(c)
    d_var = 2 * np.abs(c).mean(axis=-1, keepdims=True) * d_mean + (d + 3) * U * (var + eps)
    d_r = np.where(var + eps > 0, d_var / (2 * safe) + 4 * U, 0.0)
    xhat = c * r
    d_xhat = r * d_c + np.abs(xhat) * (d_r + 2 * U)
    return {"xhat": xhat, "r": r, "d_r": d_r, "d_xhat": d_xhat}


def layer_norm_bound(x, weight, bias, eps, reference) -> np.ndarray:
    s = row_stats(x, eps)
    w = np.ones(x.shape[-1]) if weight is None else np.abs(weight.astype(np.float64))
    return w * s["d_xhat"] + 2 * U * (np.abs(s["xhat"]) * w + np.abs(reference))


rows_of = st.tuples(st.integers(1, 5), st.integers(1, 12))


@given(
    shape=rows_of,
    seed=st.integers(0, 2**16),
    scale=scales,
    offset=st.sampled_from([0.0, 10.0, -1e3]),
    weighted=st.booleans(),
    biased=st.booleans(),
    eps=st.sampled_from([1e-5, 0.0, 1.0]),
)
def test_layer_norm_kernel_equals_definition(
    numpy_backend, shape, seed, scale, offset, weighted, biased, eps
) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, scale) + F32(offset))
    d = shape[-1]
    weight = random_array(seed + 1, (d,), 2.0) if weighted else None
    bias = random_array(seed + 2, (d,), 2.0) if biased else None
    native = F.layer_norm(x, weight, bias, eps=eps)
    reference = definition(F.layer_norm, x, weight, bias, eps=eps)
    assert_within(native, reference, layer_norm_bound(x, weight, bias, eps, reference))


# Backward, with g = dy w (one rounding per side), G = mean |g|, and the bounds above:
#   mean(g): (d + 2) u G;  mean(g xhat): mean(|g| d_xhat) + (d + 3) u mean |g xhat|;
#   inner = g - mean(g) - xhat mean(g xhat): the terms' errors, plus 3u (|g| + |mean g| +
#   |xhat mean(g xhat)|) for its three roundings per side;
#   dx = r inner: r d_inner + |dx| (d_r + 2u).
#   dw = sum over N rows of dy xhat: sum |dy| d_xhat + (N + 2) u sum |dy xhat|;
#   db = sum over N rows of dy: (N + 1) u sum |dy|.


def layer_norm_backward_bounds(grad_y, x, weight, eps, grad_x):
    s = row_stats(x, eps)
    d = x.shape[-1]
    dy = grad_y.astype(np.float64)
    w = np.ones(d) if weight is None else weight.astype(np.float64)
    g = dy * w
    g_mean, gx_mean = g.mean(-1, keepdims=True), (g * s["xhat"]).mean(-1, keepdims=True)
    d_g = 2 * U * np.abs(g)
    d_g_mean = (d + 2) * U * np.abs(g).mean(-1, keepdims=True)
    d_gx_mean = (np.abs(g) * s["d_xhat"]).mean(-1, keepdims=True)
    d_gx_mean += (d + 3) * U * np.abs(g * s["xhat"]).mean(-1, keepdims=True)
    xhat = np.abs(s["xhat"])
    d_inner = d_g + d_g_mean + s["d_xhat"] * np.abs(gx_mean) + xhat * d_gx_mean
    d_inner += 3 * U * (np.abs(g) + np.abs(g_mean) + xhat * np.abs(gx_mean))
    d_dx = s["r"] * d_inner + np.abs(grad_x) * (s["d_r"] + 2 * U)
    n = int(np.prod(x.shape[:-1]))
    rows = (-1, d)
    d_dw = (np.abs(dy) * s["d_xhat"]).reshape(rows).sum(0)
    d_dw += (n + 2) * U * np.abs(dy * s["xhat"]).reshape(rows).sum(0)
    d_db = (n + 1) * U * np.abs(dy).reshape(rows).sum(0)
    return d_dx, d_dw, d_db


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
    scale=scales,
    offset=st.sampled_from([0.0, 10.0, -1e3]),
    weighted=st.booleans(),
    eps=st.sampled_from([1e-5, 1.0]),
)
def test_layer_norm_backward_kernel_equals_definition(
    numpy_backend, shape, seed, scale, offset, weighted, eps
) -> None:
    x = numpy_backend.asarray(random_array(seed, shape, scale) + F32(offset))
    grad_y = numpy_backend.asarray(random_array(seed + 1, shape, 2.0))
    weight = random_array(seed + 2, shape[-1:], 2.0) if weighted else None
    native = F.layer_norm_backward(grad_y, x, weight, eps=eps)
    reference = definition(F.layer_norm_backward, grad_y, x, weight, eps=eps)
    bounds = layer_norm_backward_bounds(grad_y, x, weight, eps, reference[0])
    assert (native[1] is None) == (reference[1] is None) == (weight is None)
    for got, want, bound in zip(native, reference, bounds, strict=True):
        if want is not None:
            assert_within(got, want, bound)


def test_layer_norm_kernels_leave_overflow_nan_and_constant_rows_to_the_definition(
    numpy_backend, kernel_calls
) -> None:
    """A row whose variance overflows float32, a row with NaN or inf, a constant row with
    eps 0: the kernel refuses the input and the definition computes it (so, bit for bit)."""
    base = np.array([1.0, -2.0, 3.0, 0.5], dtype=F32)
    normal = np.stack([base, base * 2])  # (2, 4)
    for odd_row in (base * F32(3e20), np.array([1, math.nan, 2, 3], F32), base * 0 + 1):
        x = numpy_backend.asarray(np.concatenate([normal, odd_row[None]]))  # (3, 4)
        grad_y = numpy_backend.asarray(random_array(0, x.shape))
        eps = 0.0 if np.all(odd_row == 1) else 1e-5
        kernel_calls.clear()
        with np.errstate(all="ignore"):
            got = F.layer_norm(x, eps=eps)
            want = definition(F.layer_norm, x, eps=eps)
            grads = F.layer_norm_backward(grad_y, x, eps=eps)
            want_grads = definition(F.layer_norm_backward, grad_y, x, eps=eps)
        assert kernel_calls.count("layer_norm") >= 1
        assert kernel_calls.count("layer_norm_backward") >= 1
        np.testing.assert_array_equal(got, want)
        for a, b in zip(grads, want_grads, strict=True):
            np.testing.assert_array_equal(a, b)


# --- when the kernels run -----------------------------------------------------------------


def all_four(x: np.ndarray, grad_y: np.ndarray, weight: np.ndarray) -> list[np.ndarray]:
    grads = F.layer_norm_backward(grad_y, x, weight)
    return [F.gelu(x), F.gelu_backward(grad_y, x), F.layer_norm(x, weight), *grads]


def test_numba_off_gives_the_numpy_natives(numpy_backend, kernel_calls, monkeypatch) -> None:
    """TINYTX_NUMBA=0: no kernel runs, and every result is the NumPy natives' (which are
    the definition bit for bit; LayerNorm's backward has no NumPy native: the definition)."""
    x = numpy_backend.asarray(random_array(0, (7, 9), 3.0))
    grad_y = numpy_backend.asarray(random_array(1, (7, 9)))
    weight = random_array(2, (9,))
    all_four(x, grad_y, weight)
    assert set(kernel_calls) == set(KERNEL_NAMES) - {"gelu_tanh"}
    kernel_calls.clear()
    monkeypatch.setenv("TINYTX_NUMBA", "0")
    assert not numba_kernels.enabled() and numba_kernels.available()
    got = all_four(x, grad_y, weight)
    assert kernel_calls == []
    want = [
        definition(F.gelu, x),
        definition(F.gelu_backward, grad_y, x),
        definition(F.layer_norm, x, weight),
        *definition(F.layer_norm_backward, grad_y, x, weight),
    ]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_float64_stays_on_the_numpy_natives(numpy_backend, kernel_calls) -> None:
    x = numpy_backend.asarray(random_array(0, (5, 6)).astype(np.float64))
    all_four(x, x, x[0])
    assert kernel_calls == []


def test_kernels_take_non_contiguous_inputs(numpy_backend) -> None:
    """A transposed input: the kernels read a contiguous copy, the output is x's shape."""
    x = numpy_backend.asarray(random_array(0, (9, 7), 4.0).T)  # (7, 9), not C-contiguous
    grad_y = numpy_backend.asarray(random_array(1, (9, 7)).T)
    native, reference = F.gelu_backward(grad_y, x), definition(F.gelu_backward, grad_y, x)
    assert_within(native, reference, gelu_backward_bound(grad_y, x, reference))
    native, reference = F.layer_norm(x), definition(F.layer_norm, x)
    assert_within(native, reference, layer_norm_bound(x, None, None, 1e-5, reference))


def test_exp_within_its_documented_ulps() -> None:
    """The kernels' own exp (module docstring): within 1.5 ulp where exp(y) is a normal
    float32 (1.19 measured on this grid on Zen 4), within one step where it is subnormal,
    0 at -inf; the GELU bounds above take EXP_EPS from it."""
    import numba

    numba_kernels._kernel("gelu")  # compiles the helpers in place
    exp = numba_kernels._exp

    @numba.njit
    def each(y, out):
        for i in range(y.size):
            out[i] = exp(y[i])

    y = np.concatenate([np.linspace(-104, 88, 1_000_003), [-np.inf, -200.0, 0.0]]).astype(F32)
    got = np.empty_like(y)
    each(y, got)
    exact = np.exp(y.astype(np.float64))
    normal = exact >= np.finfo(F32).tiny
    ulp = np.spacing(exact.astype(F32)).astype(np.float64)
    assert np.max(np.abs(got - exact)[normal] / ulp[normal]) <= 1.5
    assert np.max(np.abs(got - exact)[~normal]) <= SUBNORMAL
    assert got[-3] == 0 and got[-2] == 0 and got[-1] == 1
