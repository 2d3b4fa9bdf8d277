"""The backward passes of tinytx.functional against finite differences, on every backend.

Each backward computes a vector-Jacobian product: given the cotangent dy of a forward
y = f(x), it returns grad_x = J^T dy, the gradient of the scalar L(x) = <f(x), dy>. We
check it along random directions u: the directional derivative <grad_x, u> must equal the
central difference of L along u, in float64. Over a few directions we collect the
analytic projections A and the numeric ones N and require

    ||A - N|| <= 1e-6 * max(||A||, ||N||) + floor,

the relative error of the issue (1e-6). By Cauchy-Schwarz |<grad - true, u>| <= ||grad -
true|| ||u||, and a wrong entry shows up with its weight u_i, so a real mistake (an error
of order one in some entry) fails by many orders of magnitude.

The central difference is the fourth-order one,
    L'(x; u) ~ (8 (L(x + h u) - L(x - h u)) - (L(x + 2h u) - L(x - 2h u))) / 12h,
whose truncation error h^4/30 |L^(5)| with h = 1e-5 stays far below 1e-6 relative even
where the function bends sharply: a LayerNorm row of tiny variance bends on the length
sqrt(eps) ~ 3e-3, where the second-order difference (h^2/6 |L^(3)|) failed at 6e-6, and
the fourth-order one with h = 1e-4 at 1.04e-6. ``floor`` is what the
numeric side cannot resolve: each L(x + t h u) is rounded by a few ulps of sum |m dy|,
m the size of the terms the forward adds to make y (|y| unless a test says otherwise:
GELU's tanh form cancels x/2 against x/2 tanh(...) for negative x), and the stencil
weighs those roundings by 18/12h. It matters only where the gradient is about zero
(fully masked rows, far tails).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import tinytx
from tinytx import functional as F

H = 1e-5  # step of the fourth-order central difference
RTOL = 1e-6  # the relative-error bound
EPS64 = float(np.finfo(np.float64).eps)
ULPS = 64  # rounding of one forward evaluation, in units of eps * sum |m dy|
DIRECTIONS = 3
STENCIL = {-2: 1.0, -1: -8.0, 1: 8.0, 2: -1.0}  # step multiple -> weight, over 12h

seeds = st.integers(0, 2**32 - 1)
small_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)

Magnitude = Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]


def assert_vjp(
    backend: tinytx.Backend,
    forward: Callable[..., object],
    primals: dict[str, np.ndarray],
    grads: dict[str, object],
    dy: np.ndarray,
    rng: np.random.Generator,
    *,
    allowance: float = 0.0,
    magnitude: Magnitude | None = None,
) -> None:
    """Check each analytic gradient in ``grads`` (device arrays, keyed like ``primals``)
    against central differences of ``<forward(**primals), dy>`` along random directions.

    ``forward`` takes device arrays (float64 for the perturbed ones) and returns a device
    array. ``allowance``: extra absolute error per unit of sum |u dy| that the forward's
    own approximation error is known to cause (see the GELU test); 0 elsewhere.
    ``magnitude(primals, y)``: the size of the terms behind each output element, for the
    rounding floor (default |y|).
    """
    on_device = {name: backend.asarray(a) for name, a in primals.items()}
    for name, grad in grads.items():
        g = backend.to_numpy(grad)
        x = primals[name]
        assert g.shape == x.shape, f"grad of {name}: shape {g.shape}, expected {x.shape}"
        assert g.dtype == np.float64, f"grad of {name}: dtype {g.dtype}, expected float64"
        analytic, numeric, floor = [], [], 0.0
        for _ in range(DIRECTIONS):
            u = rng.standard_normal(x.shape)
            combined = np.zeros(dy.shape)  # sum_t weight_t * y(x + t h u)
            for t, weight in STENCIL.items():
                moved = x + t * H * u
                y = backend.to_numpy(forward(**dict(on_device, **{name: backend.asarray(moved)})))
                combined = combined + weight * y
                size = np.abs(y) if magnitude is None else magnitude({**primals, name: moved}, y)
                floor += abs(weight) * ULPS * EPS64 * np.sum(size * np.abs(dy)) / (12 * H)
            numeric.append(np.sum(combined * dy) / (12 * H))
            analytic.append(np.sum(g * u))
            if allowance:  # an elementwise forward: u and dy have one shape
                floor += allowance * np.sum(np.abs(u * dy))
        a, n = np.array(analytic), np.array(numeric)
        error = np.linalg.norm(a - n)
        bound = RTOL * max(np.linalg.norm(a), np.linalg.norm(n)) + floor
        relative = error / max(np.linalg.norm(a), np.linalg.norm(n), 1e-300)
        assert error <= bound, (
            f"grad of {name}: relative error {relative:.3g} (analytic {a}, numeric {n})"
        )


def normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape) * scale


# --- activations ---------------------------------------------------------------------


@given(seed=seeds, shape=small_shapes)
def test_relu_backward(backend: tinytx.Backend, seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    # ReLU has a kink at 0 where no difference quotient converges: keep x away from it.
    z = normal(rng, shape)
    x = np.sign(z) * (0.05 + np.abs(z))
    dy = normal(rng, shape)
    grad = F.relu_backward(backend.asarray(dy), backend.asarray(x))
    assert_vjp(backend, lambda x: F.relu(x), {"x": x}, {"x": grad}, dy, rng)


# The exact GELU's forward evaluates Phi with a float32-accurate erfc fit (relative error
# < 1.2e-7), while its backward uses Phi + x phi: the difference quotient therefore sees
# the fit's own slope error as well. Measured over x in [-40, 40] on a grid of 400001
# points (this file's stencil), |d/dx GELU_fit - (Phi + x phi)| <= 7.9e-8 (largest near
# x = -0.38); we allow 2e-7 per unit of |u dy|.
GELU_FIT_SLOPE_ERROR = 2e-7


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@given(seed=seeds, shape=small_shapes, spread=st.sampled_from([0.5, 2.0, 5.0]))
@example(seed=934, shape=(1,), spread=5.0)  # x = -6.3: GELU ~ 1e-11, its terms ~ 3
def test_gelu_backward(
    backend: tinytx.Backend, approximate: str, seed: int, shape: tuple[int, ...], spread: float
) -> None:
    rng = np.random.default_rng(seed)
    x, dy = normal(rng, shape, spread), normal(rng, shape)
    grad = F.gelu_backward(backend.asarray(dy), backend.asarray(x), approximate=approximate)
    allowance = GELU_FIT_SLOPE_ERROR if approximate == "none" else 0.0

    def forward(x):
        return F.gelu(x, approximate=approximate)

    def magnitude(primals, y):  # x/2 + x/2 tanh(...): terms of size |x|/2 each
        return np.abs(primals["x"])

    assert_vjp(
        backend, forward, {"x": x}, {"x": grad}, dy, rng, allowance=allowance, magnitude=magnitude
    )


def test_gelu_backward_at_known_points(backend: tinytx.Backend) -> None:
    """GELU'(0) = 1/2 and, far out, GELU' -> 1 (x >> 0) and -> 0 (x << 0)."""
    x = np.array([0.0, 10.0, -10.0, 1.0])
    phi_1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
    want = [0.5, 1.0, 0.0, 0.5 * (1 + math.erf(1 / math.sqrt(2))) + phi_1]
    for approximate, tol in (("none", 2e-7), ("tanh", 1e-3)):
        dx = F.gelu_backward(backend.asarray(np.ones(4)), backend.asarray(x), approximate)
        np.testing.assert_allclose(backend.to_numpy(dx), want, atol=tol)


# --- softmax, log-softmax, cross-entropy ---------------------------------------------


@st.composite
def softmax_cases(draw):
    """(x shape, axis, mask shape or None, seed): masks broadcast from a size-1 axis too."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    mask_shape = draw(st.none() | st.tuples(*[st.sampled_from([1, n]) for n in shape]).map(tuple))
    return shape, axis, mask_shape, draw(seeds)


@given(case=softmax_cases(), scale=st.sampled_from([1.0, 4.0]))
def test_softmax_backward(backend: tinytx.Backend, case, scale: float) -> None:
    shape, axis, mask_shape, seed = case
    rng = np.random.default_rng(seed)
    x, dy = normal(rng, shape, scale), normal(rng, shape)
    mask = None if mask_shape is None else backend.asarray(rng.random(mask_shape) < 0.6)
    y = F.softmax(backend.asarray(x), axis=axis, mask=mask)
    grad = F.softmax_backward(backend.asarray(dy), y, axis=axis)

    def forward(x):
        return F.softmax(x, axis=axis, mask=mask)

    def magnitude(primals, y):  # exp(x - max x): the subtraction errs by eps |x| relatively
        largest = np.abs(primals["x"]).max(axis=axis, keepdims=True)
        return np.abs(y) * (1.0 + 2.0 * largest)

    assert_vjp(backend, forward, {"x": x}, {"x": grad}, dy, rng, magnitude=magnitude)


def test_softmax_backward_masked_rows_are_exactly_zero(backend: tinytx.Backend) -> None:
    x = backend.asarray(np.arange(12.0).reshape(3, 4))
    mask = np.array([[True, False, True, True], [False] * 4, [True] * 4])
    y = F.softmax(x, mask=backend.asarray(mask))
    dy = backend.asarray(np.ones((3, 4)) * 7.0 + np.arange(4.0))
    grad = backend.to_numpy(F.softmax_backward(dy, y))
    assert np.all(np.isfinite(grad))
    assert np.all(grad[~mask] == 0.0)  # masked entries and the fully masked row
    assert np.all(grad[1] == 0.0)


@given(case=softmax_cases(), scale=st.sampled_from([1.0, 10.0]))
def test_log_softmax_backward(backend: tinytx.Backend, case, scale: float) -> None:
    shape, axis, _, seed = case
    rng = np.random.default_rng(seed)
    x, dy = normal(rng, shape, scale), normal(rng, shape)
    y = F.log_softmax(backend.asarray(x), axis=axis)
    grad = F.log_softmax_backward(backend.asarray(dy), y, axis=axis)

    def forward(x):
        return F.log_softmax(x, axis=axis)

    def magnitude(primals, y):  # x - max x errs by eps |x|; log(sum) by eps
        return np.abs(y) + 1.0 + 2.0 * np.abs(primals["x"]).max(axis=axis, keepdims=True)

    assert_vjp(backend, forward, {"x": x}, {"x": grad}, dy, rng, magnitude=magnitude)


def test_log_softmax_is_log_of_softmax_even_for_huge_logits(backend: tinytx.Backend) -> None:
    x = np.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]])
    got = backend.to_numpy(F.log_softmax(backend.asarray(x)))
    m = x.max(axis=-1, keepdims=True)
    want = x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=4 * EPS64, atol=4 * EPS64)


@st.composite
def cross_entropy_cases(draw):
    """(leading shape, vocab, ignore_index, seed); ignore_index -100 or a real class."""
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple))
    vocab = draw(st.integers(1, 6))
    ignore_index = draw(st.sampled_from([-100, 0, vocab - 1]))
    return lead, vocab, ignore_index, draw(seeds)


def random_targets(rng, lead, vocab, ignore_index, p_ignore=0.3) -> np.ndarray:
    targets = rng.integers(0, vocab, size=lead)
    return np.where(rng.random(lead) < p_ignore, ignore_index, targets).astype(np.int64)


@given(case=cross_entropy_cases(), scale=st.sampled_from([1.0, 5.0]))
@example(case=((3,), 2, 0, 26710), scale=5.0)  # loss ~1e-7: rounding is eps |z|, not eps |loss|
def test_cross_entropy_backward(backend: tinytx.Backend, case, scale: float) -> None:
    lead, vocab, ignore_index, seed = case
    rng = np.random.default_rng(seed)
    logits = normal(rng, (*lead, vocab), scale)
    targets = backend.asarray(random_targets(rng, lead, vocab, ignore_index))
    dloss = np.asarray(rng.standard_normal())
    grad = F.cross_entropy_backward(
        backend.asarray(dloss), backend.asarray(logits), targets, ignore_index=ignore_index
    )

    def forward(logits):
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)

    kept = backend.to_numpy(targets) != ignore_index

    def magnitude(primals, loss):
        """Per kept position: z_t - max z (error eps |z|) and log(sum exp) with a sum in
        [1, vocab] (error eps): the loss can be far smaller than these (a confident,
        correct prediction), so |loss| is not the scale of its rounding."""
        largest = np.abs(primals["logits"]).max(axis=-1, initial=0.0)  # (...)
        return np.sum((1.0 + 2.0 * largest) * kept) / max(kept.sum(), 1)

    assert_vjp(
        backend, forward, {"logits": logits}, {"logits": grad}, dloss, rng, magnitude=magnitude
    )


@given(case=cross_entropy_cases(), scale=st.sampled_from([1.0, 1e3]))
def test_cross_entropy_is_mean_log_sum_exp_minus_target_logit(
    backend: tinytx.Backend, case, scale: float
) -> None:
    """loss = mean over kept p of (logsumexp(z_p) - z_p[t_p]); gradient rows of ignored
    positions are exactly 0."""
    lead, vocab, ignore_index, seed = case
    rng = np.random.default_rng(seed)
    logits = normal(rng, (*lead, vocab), scale)
    targets = random_targets(rng, lead, vocab, ignore_index)
    z = logits.reshape(-1, vocab)
    t = targets.reshape(-1)
    kept = t != ignore_index
    m = z.max(axis=-1)
    per_position = (
        m
        + np.log(np.sum(np.exp(z - m[:, None]), axis=-1))
        - z[np.arange(len(t)), np.where(kept, t, 0)]
    )
    want = per_position[kept].sum() / max(kept.sum(), 1)
    loss = F.cross_entropy(backend.asarray(logits), backend.asarray(targets), ignore_index)
    got = backend.to_numpy(loss)
    assert got.shape == () and got.dtype == np.float64
    # Each position's terms are of size ~max|z|: a few ulps of that, per position summed.
    tol = 8 * EPS64 * (vocab + 2) * (np.abs(z).max(initial=0.0) + 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    grad = backend.to_numpy(
        F.cross_entropy_backward(
            1.0, backend.asarray(logits), backend.asarray(targets), ignore_index
        )
    ).reshape(-1, vocab)
    assert np.all(grad[~kept] == 0.0)
    assert np.all(np.isfinite(grad))


def test_cross_entropy_all_ignored_is_zero(backend: tinytx.Backend) -> None:
    logits = backend.asarray(np.ones((2, 3, 5)))
    targets = backend.asarray(np.full((2, 3), -100, dtype=np.int64))
    assert float(backend.to_numpy(F.cross_entropy(logits, targets))) == 0.0
    grad = backend.to_numpy(F.cross_entropy_backward(1.0, logits, targets))
    assert grad.shape == (2, 3, 5) and np.all(grad == 0.0)


def test_cross_entropy_float32_stays_float32(backend: tinytx.Backend) -> None:
    logits = backend.asarray(np.zeros((3, 4), dtype=np.float32))
    targets = backend.asarray(np.array([0, 1, 3], dtype=np.int32))
    loss = F.cross_entropy(logits, targets)
    assert backend.to_numpy(loss).dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(loss), math.log(4), rtol=1e-6)
    grad = F.cross_entropy_backward(1.0, logits, targets)
    assert backend.to_numpy(grad).dtype == np.float32


# --- norms and linear ----------------------------------------------------------------


@st.composite
def row_cases(draw):
    """(shape (..., d), with weight, seed)."""
    shape = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple))
    d = draw(st.integers(2, 6))
    return (*shape, d), draw(st.booleans()), draw(seeds)


@given(case=row_cases(), offset=st.sampled_from([0.0, 3.0]))
@example(case=((4, 2), False, 2583), offset=0.0)  # a row of variance 8e-5 ~ eps: sharp bends
def test_layer_norm_backward(backend: tinytx.Backend, case, offset: float) -> None:
    shape, with_weight, seed = case
    rng = np.random.default_rng(seed)
    d = shape[-1]
    x, dy = normal(rng, shape) + offset, normal(rng, shape)
    primals = {"x": x, "bias": normal(rng, (d,))}
    if with_weight:
        primals["weight"] = normal(rng, (d,))
    weight = backend.asarray(primals["weight"]) if with_weight else None
    grad_x, grad_w, grad_b = F.layer_norm_backward(backend.asarray(dy), backend.asarray(x), weight)
    grads = {"x": grad_x, "bias": grad_b}
    if with_weight:
        grads["weight"] = grad_w
    else:
        assert grad_w is None

    def forward(x, bias, weight=None):
        return F.layer_norm(x, weight, bias)

    assert_vjp(backend, forward, primals, grads, dy, rng)


@given(case=row_cases())
def test_rms_norm_backward(backend: tinytx.Backend, case) -> None:
    shape, with_weight, seed = case
    rng = np.random.default_rng(seed)
    d = shape[-1]
    x, dy = normal(rng, shape), normal(rng, shape)
    primals = {"x": x}
    if with_weight:
        primals["weight"] = normal(rng, (d,))
    weight = backend.asarray(primals["weight"]) if with_weight else None
    grad_x, grad_w = F.rms_norm_backward(backend.asarray(dy), backend.asarray(x), weight)
    grads = {"x": grad_x}
    if with_weight:
        grads["weight"] = grad_w
    else:
        assert grad_w is None

    def forward(x, weight=None):
        return F.rms_norm(x, weight)

    assert_vjp(backend, forward, primals, grads, dy, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norm_backwards_at_the_limits(backend: tinytx.Backend, dtype) -> None:
    """Rows near the float maximum give the gradient of the rescaled row (LayerNorm and
    RMSNorm with eps = 0 are scale invariant: grad at c x = grad at x / c), and a constant
    (LayerNorm) or zero (RMSNorm) row with eps = 0 gets 0, never NaN."""
    big = float(np.finfo(dtype).max) / 4
    x = np.array([[1.0, -2.0, 0.5, 3.0], [7.0, 7.0, 7.0, 7.0], [0.0, 0.0, 0.0, 0.0]])
    huge = x[:1] * (big / 3)
    dy = np.array([[0.3, -1.0, 2.0, 0.7]] * 3)
    for norm in ("layer_norm", "rms_norm"):
        backward = getattr(F, f"{norm}_backward")
        on = [backend.asarray(a, dtype=dtype) for a in (dy, x)]
        small_grad = backend.to_numpy(backward(*on, eps=0.0)[0])
        huge_grad = backward(
            backend.asarray(dy[:1], dtype=dtype), backend.asarray(huge, dtype=dtype), eps=0.0
        )[0]
        huge_grad = backend.to_numpy(huge_grad) * (big / 3)
        assert np.all(np.isfinite(small_grad)) and np.all(np.isfinite(huge_grad))
        tol = 64 * float(np.finfo(dtype).eps) * np.abs(small_grad[0]).max()
        np.testing.assert_allclose(huge_grad[0], small_grad[0], rtol=0, atol=tol)
        zero_row = 1 if norm == "layer_norm" else 2
        assert np.all(small_grad[zero_row] == 0.0)


@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
    with_bias=st.booleans(),
    seed=seeds,
)
def test_linear_backward(
    backend: tinytx.Backend, lead, d_in: int, d_out: int, with_bias: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    primals = {"x": normal(rng, (*lead, d_in)), "weight": normal(rng, (d_out, d_in))}
    if with_bias:
        primals["bias"] = normal(rng, (d_out,))
    dy = normal(rng, (*lead, d_out))
    grad_x, grad_w, grad_b = F.linear_backward(
        backend.asarray(dy),
        backend.asarray(primals["x"]),
        backend.asarray(primals["weight"]),
        bias=with_bias,
    )
    grads = {"x": grad_x, "weight": grad_w}
    if with_bias:
        grads["bias"] = grad_b
    else:
        assert grad_b is None

    def forward(x, weight, bias=None):
        return F.linear(x, weight, bias)

    assert_vjp(backend, forward, primals, grads, dy, rng)


# --- embedding -----------------------------------------------------------------------


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple),
    num_embeddings=st.integers(1, 6),
    d=st.integers(1, 4),
    seed=seeds,
)
def test_embedding_backward(backend: tinytx.Backend, lead, num_embeddings, d, seed) -> None:
    """Repeated ids add up; the difference quotient is exact here (the lookup is linear)."""
    rng = np.random.default_rng(seed)
    table = normal(rng, (num_embeddings, d))
    ids = backend.asarray(rng.integers(0, num_embeddings, size=lead))
    dy = normal(rng, (*lead, d))
    grad = F.embedding_backward(backend.asarray(dy), ids, num_embeddings)
    assert_vjp(
        backend, lambda table: F.embedding(table, ids), {"table": table}, {"table": grad}, dy, rng
    )


def test_embedding_is_the_table_lookup(backend: tinytx.Backend) -> None:
    table = np.arange(12.0).reshape(4, 3)
    ids = np.array([[3, 0], [0, 2]])
    got = backend.to_numpy(F.embedding(backend.asarray(table), backend.asarray(ids)))
    np.testing.assert_array_equal(got, table[ids])


def embedding_backward_reference(dy: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, dy.shape[-1]), dtype=np.float64)
    np.add.at(out, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]).astype(np.float64))
    return out


def embedding_backward_bound(dy: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Summing c terms in any order is within (c - 1) eps sum |terms| of the exact sum."""
    eps = float(np.finfo(dy.dtype).eps)
    counts = np.bincount(ids.reshape(-1), minlength=n)[:, None]  # (n, 1)
    magnitude = embedding_backward_reference(np.abs(dy), ids, n)  # (n, d)
    return 2 * np.maximum(counts - 1, 0) * eps * magnitude


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(
    n_ids=st.integers(0, 40),
    num_embeddings=st.integers(1, 9),
    d=st.integers(1, 5),
    block=st.sampled_from([1, 7, 1 << 22]),
    seed=seeds,
)
def test_embedding_backward_native_and_blocks_match_the_definition(
    numpy_backend: tinytx.Backend, dtype, n_ids, num_embeddings, d, block, seed
) -> None:
    """NumPy's native (sort + reduceat) and the one-hot definition, in blocks of any size,
    give the scatter-add to within rounding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_embeddings, size=(n_ids,))
    dy = normal(rng, (n_ids, d)).astype(dtype)
    want = embedding_backward_reference(dy, ids, num_embeddings)
    bound = embedding_backward_bound(dy, ids, num_embeddings)
    native = F.embedding_backward(dy, ids, num_embeddings)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "_ONE_HOT_ELEMENTS", block)
        patch.setattr(F, "_native", lambda xp, name: None)
        definition = F.embedding_backward(dy, ids, num_embeddings)
    for got in (native, definition):
        assert got.dtype == dtype and got.shape == (num_embeddings, d)
        assert np.all(np.abs(got - want) <= bound)


def test_embedding_backward_uses_the_native(numpy_backend: tinytx.Backend) -> None:
    from tinytx.backends import numpy_natives

    assert F._native(numpy_backend.xp, "embedding_backward") is numpy_natives.embedding_backward


# --- attention -----------------------------------------------------------------------


@given(
    seed=seeds,
    batch=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    seq=st.integers(1, 3),
    d=st.integers(1, 3),
)
def test_repeat_kv_backward(backend: tinytx.Backend, seed, batch, kv_heads, group, seq, d) -> None:
    rng = np.random.default_rng(seed)
    x = normal(rng, (batch, kv_heads, seq, d))
    dy = normal(rng, (batch, kv_heads * group, seq, d))
    grad = F.repeat_kv_backward(backend.asarray(dy), kv_heads)
    # Exactly the sum over each group of consecutive query heads.
    want = dy.reshape(batch, kv_heads, group, seq, d).sum(axis=2)
    np.testing.assert_array_equal(backend.to_numpy(grad), want)
    forward = lambda x: F.repeat_kv(x, kv_heads * group)  # noqa: E731
    assert_vjp(backend, forward, {"x": x}, {"x": grad}, dy, rng)


@st.composite
def attention_cases(draw):
    """Shapes, a mask (none, key padding, or a full boolean mask, with fully masked rows
    likely), causal or not, grouped-query, seq_q != seq_k (cross-attention, or causal with
    a cache where seq_k > seq_q; with seq_q > seq_k causal rows see nothing)."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    seq_q, seq_k = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    d, d_v = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    mask_shape = draw(
        st.sampled_from([None, (batch, 1, 1, seq_k), (batch, heads, seq_q, seq_k), (seq_q, seq_k)])
    )
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.3]))
    return (batch, heads, kv_heads, seq_q, seq_k, d, d_v), mask_shape, causal, scale, draw(seeds)


@given(case=attention_cases())
def test_scaled_dot_product_attention_backward(backend: tinytx.Backend, case) -> None:
    (batch, heads, kv_heads, seq_q, seq_k, d, d_v), mask_shape, causal, scale, seed = case
    rng = np.random.default_rng(seed)
    primals = {
        "q": normal(rng, (batch, heads, seq_q, d)),
        "k": normal(rng, (batch, kv_heads, seq_k, d)),
        "v": normal(rng, (batch, kv_heads, seq_k, d_v)),
    }
    mask = None if mask_shape is None else backend.asarray(rng.random(mask_shape) < 0.6)
    dy = normal(rng, (batch, heads, seq_q, d_v))

    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)[0]

    q, k, v = (backend.asarray(primals[name]) for name in ("q", "k", "v"))
    _, weights = F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)
    dq, dk, dv = F.scaled_dot_product_attention_backward(
        backend.asarray(dy), q, k, v, weights, scale=scale
    )
    assert_vjp(backend, forward, primals, {"q": dq, "k": dk, "v": dv}, dy, rng)
    # A query row that may attend to nothing gets exactly zero gradient, never NaN.
    dead = np.all(backend.to_numpy(weights) == 0.0, axis=-1)  # (batch, heads, seq_q)
    dq_host = backend.to_numpy(dq)
    assert np.all(np.isfinite(dq_host))
    assert np.all(dq_host[dead] == 0.0)


def test_attention_backward_fully_masked_gives_exact_zeros(backend: tinytx.Backend) -> None:
    rng = np.random.default_rng(0)
    q = backend.asarray(normal(rng, (1, 4, 3, 2)))
    k = backend.asarray(normal(rng, (1, 2, 5, 2)))
    v = backend.asarray(normal(rng, (1, 2, 5, 3)))
    mask = backend.asarray(np.zeros((1, 1, 3, 5), dtype=bool))
    _, weights = F.scaled_dot_product_attention(q, k, v, mask=mask)
    dy = backend.asarray(normal(rng, (1, 4, 3, 3)))
    for grad in F.scaled_dot_product_attention_backward(dy, q, k, v, weights):
        assert np.all(backend.to_numpy(grad) == 0.0)


def test_attention_backward_causal_later_keys_get_nothing_from_earlier_queries(
    backend: tinytx.Backend,
) -> None:
    """Under a causal mask, key/value j gets gradient only from queries i >= j: with a
    cotangent on query 0 alone, only key/value 0 has a nonzero gradient."""
    rng = np.random.default_rng(1)
    q, k, v = (backend.asarray(normal(rng, (1, 2, 4, 3))) for _ in range(3))
    _, weights = F.scaled_dot_product_attention(q, k, v, causal=True)
    dy = np.zeros((1, 2, 4, 3))
    dy[:, :, 0] = 1.0
    _, dk, dv = F.scaled_dot_product_attention_backward(backend.asarray(dy), q, k, v, weights)
    for grad in (backend.to_numpy(dk), backend.to_numpy(dv)):
        assert np.all(grad[:, :, 1:] == 0.0)


def test_attention_backward_padded_keys_get_exactly_zero(backend: tinytx.Backend) -> None:
    """Keys hidden by a key-padding mask get zero dk and dv, also in grouped-query and
    cross-attention (seq_q != seq_k)."""
    rng = np.random.default_rng(2)
    q = backend.asarray(normal(rng, (2, 4, 3, 2)))
    k = backend.asarray(normal(rng, (2, 2, 5, 2)))
    v = backend.asarray(normal(rng, (2, 2, 5, 3)))
    keep = np.array([[True, True, True, False, False], [True, False, True, True, True]])
    mask = backend.asarray(keep[:, None, None, :])  # (batch, 1, 1, seq_k)
    _, weights = F.scaled_dot_product_attention(q, k, v, mask=mask)
    dy = backend.asarray(normal(rng, (2, 4, 3, 3)))
    _, dk, dv = F.scaled_dot_product_attention_backward(dy, q, k, v, weights)
    for grad in (backend.to_numpy(dk), backend.to_numpy(dv)):
        padded = np.broadcast_to(~keep[:, None, :], grad.shape[:3])  # (batch, heads_kv, seq_k)
        assert np.all(grad[padded] == 0.0)
        assert np.all(grad[~padded] != 0.0)


# --- bad input -----------------------------------------------------------------------


def test_cross_entropy_rejects_targets_outside_the_vocabulary(backend: tinytx.Backend) -> None:
    logits = backend.asarray(np.zeros((2, 5)))
    for bad in (5, -1, -99):
        targets = backend.asarray(np.array([0, bad], dtype=np.int64))
        expected = rf"\[0, 5\).*ignore_index=-100, got {bad}"
        with pytest.raises(ValueError, match=expected):
            F.cross_entropy(logits, targets)
        with pytest.raises(ValueError, match=expected):
            F.cross_entropy_backward(1.0, logits, targets)


def test_cross_entropy_rejects_mismatched_or_float_targets(backend: tinytx.Backend) -> None:
    logits = backend.asarray(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match=r"same leading shape.*\(2, 3, 5\).*\(3, 2\)"):
        F.cross_entropy(logits, backend.asarray(np.zeros((3, 2), dtype=np.int64)))
    with pytest.raises(TypeError, match="targets must be an integer array"):
        F.cross_entropy(logits, backend.asarray(np.zeros((2, 3))))


def test_cross_entropy_backward_rejects_a_non_scalar_cotangent(backend: tinytx.Backend) -> None:
    logits = backend.asarray(np.zeros((2, 5)))
    targets = backend.asarray(np.array([0, 1], dtype=np.int64))
    with pytest.raises(ValueError, match=r"cotangent must have the forward output's shape \(\)"):
        F.cross_entropy_backward(backend.asarray(np.ones(2)), logits, targets)
    with pytest.raises(TypeError, match="cotangent must have the forward output's dtype"):
        F.cross_entropy_backward(backend.asarray(np.float32(1.0)), logits, targets)


@pytest.mark.parametrize(
    "call",
    [
        lambda dy, x: F.relu_backward(dy, x),
        lambda dy, x: F.gelu_backward(dy, x),
        lambda dy, x: F.softmax_backward(dy, x),
        lambda dy, x: F.log_softmax_backward(dy, x),
        lambda dy, x: F.layer_norm_backward(dy, x),
        lambda dy, x: F.rms_norm_backward(dy, x),
    ],
    ids=["relu", "gelu", "softmax", "log_softmax", "layer_norm", "rms_norm"],
)
def test_backwards_reject_a_cotangent_of_the_wrong_shape_or_dtype(backend, call) -> None:
    x = backend.asarray(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 3\), got \(3, 2\)"):
        call(backend.asarray(np.ones((3, 2))), x)
    with pytest.raises(TypeError, match="dtype float64, got float32"):
        call(backend.asarray(np.ones((2, 3), dtype=np.float32)), x)


def test_linear_and_attention_backward_reject_wrong_cotangents(backend: tinytx.Backend) -> None:
    x, w = backend.asarray(np.ones((4, 3))), backend.asarray(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(4, 2\), got \(4, 3\)"):
        F.linear_backward(x, x, w)
    q = backend.asarray(np.ones((1, 2, 3, 4)))
    _, weights = F.scaled_dot_product_attention(q, q, q)
    with pytest.raises(ValueError, match=r"shape \(1, 2, 3, 4\), got \(1, 2, 4, 3\)"):
        F.scaled_dot_product_attention_backward(
            backend.asarray(np.ones((1, 2, 4, 3))), q, q, q, weights
        )
    with pytest.raises(ValueError, match="weights must be the forward's"):
        F.scaled_dot_product_attention_backward(q, q, q, q, q)


def test_embedding_rejects_bad_ids(backend: tinytx.Backend) -> None:
    table = backend.asarray(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"\[0, 4\), got values from 0 to 4"):
        F.embedding(table, backend.asarray(np.array([0, 4])))
    with pytest.raises(TypeError, match="integer token ids"):
        F.embedding(table, backend.asarray(np.array([0.0, 1.0])))
    dy = backend.asarray(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"\[0, 3\), got values from -1 to 1"):
        F.embedding_backward(dy, backend.asarray(np.array([-1, 1])), 3)
    with pytest.raises(ValueError, match=r"shape \(3, 2\), got \(2, 2\)"):
        F.embedding_backward(dy, backend.asarray(np.array([0, 1, 2])), 3)
    with pytest.raises(ValueError, match="positive int"):
        F.embedding_backward(dy, backend.asarray(np.array([0, 1])), 0)


def test_repeat_kv_backward_rejects_uneven_groups(backend: tinytx.Backend) -> None:
    with pytest.raises(ValueError, match=r"heads \(3\) to be a multiple of key/value heads \(2\)"):
        F.repeat_kv_backward(backend.asarray(np.ones((1, 3, 2, 2))), 2)
