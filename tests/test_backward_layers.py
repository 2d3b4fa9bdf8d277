"""Every module's backward against central finite differences, in float64, on every backend;
and the backward API's properties (linearity, causality, padding, keys, bad input).

The check. For a module f, inputs x, parameters θ and a random cotangent g, the pullback
claims dL/dx and dL/dθ for L = <g, f(x, θ)>. Along a random direction u of one tensor t,
the central difference D(h) = (L(t + h u) - L(t - h u)) / (2 h) = <dL/dt, u> + c h^2 + O(h^4),
so Richardson's extrapolation

    fd = (4 D(h/2) - D(h)) / 3    must equal    <dL/dt, u>

up to an O(h^4) truncation error and the forward's rounding error divided by h. The error
is measured relative to |dL/dt| |u|, the largest value <dL/dt, u> can take
(Cauchy-Schwarz), so a directional derivative that happens to be near zero does not divide
by zero; it must stay below 1e-6. The step h is 1e-5 of the tensor's RMS (GPT's embeddings
are N(0, 0.02^2): an absolute step would be large for them). The extrapolation matters
where f curves sharply: LayerNorm of a row whose entries nearly agree (d = 2 makes that
common) left the plain central difference 8e-6 off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tinytx
from tinytx import functional as F
from tinytx.layers import (
    DecoderBlock,
    Embedding,
    Encoder,
    EncoderBlock,
    FeedForward,
    LayerNorm,
    LearnedPositions,
    Linear,
    Module,
    MultiHeadAttention,
    NoBackwardError,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositions,
    padding_mask,
)
from tinytx.models.gpt import GPT, GPTConfig

EPS64 = float(np.finfo(np.float64).eps)
SUBNORMAL64 = float(np.finfo(np.float64).smallest_subnormal)  # 5e-324
TOLERANCE = 1e-6  # relative error allowed between finite differences and the backward
STEP = 1e-5  # finite-difference step, relative to the perturbed tensor's RMS
# The composite modules cost many forward passes per example: fewer examples for them.
FEW = settings(max_examples=max(3, settings.default.max_examples // 5))

seeds = st.integers(0, 2**32 - 1)


# --- helpers -------------------------------------------------------------------------


def put(backend, host, dtype="float64"):
    return backend.asarray(np.asarray(host), dtype=dtype)


def to_host(backend, x) -> np.ndarray:
    return np.asarray(backend.to_numpy(x), dtype=np.float64)


def random_input(backend, rng, shape):
    return put(backend, rng.standard_normal(shape))


def random_mask(backend, rng, batch, seq_q, seq_k):
    """A random boolean mask (batch, 1, seq_q, seq_k), fully masked rows included."""
    return backend.asarray(rng.random((batch, 1, seq_q, seq_k)) < 0.7)


def step_for(value: np.ndarray) -> float:
    rms = math.sqrt(float(np.mean(value * value))) if value.size else 0.0
    return STEP * (rms if rms > 0 else 1.0)


def richardson(perturbed_loss, value, direction) -> tuple[float, float]:
    """(4 D(h/2) - D(h)) / 3 along ``direction``, and a bound on its rounding error.

    ``perturbed_loss(t) -> (L(t), sum of the magnitudes of L's terms)``. The rounding
    bound: each L is off by at most 1000 ulps of its terms' magnitudes (generous for these
    small forwards); D(h) divides two of them by 2h, and the extrapolation weighs
    D(h/2) by 4/3 and D(h) by 1/3.
    """
    h = step_for(value)
    differences, rounding = [], 0.0
    for step, weight in ((h, -1 / 3), (h / 2, 4 / 3)):
        plus, size_plus = perturbed_loss(value + step * direction)
        minus, size_minus = perturbed_loss(value - step * direction)
        differences.append(weight * (plus - minus) / (2 * step))
        rounding += abs(weight) * 1000 * EPS64 * (size_plus + size_minus) / (2 * step)
    return sum(differences), rounding


def relu_margin(backend, module, inputs, **kwargs) -> float:
    """The smallest |z| / rms(z) over the inputs z of the ReLUs in one forward (inf when
    there are none).

    Finite differences are only valid where the function is smooth along the whole
    step: a ReLU input within a step of its kink makes D(h) mix the two slopes, for
    every h down to the step (hypothesis found one at |z| = 1.2e-5, 2e-3 off)."""
    from tinytx.layers import basic

    margins = [math.inf]
    relu = basic.ACTIVATIONS["relu"]

    def watched(z):
        host = to_host(backend, z)
        rms = math.sqrt(float(np.mean(host * host))) if host.size else 0.0
        if rms > 0:
            margins.append(float(np.min(np.abs(host))) / rms)
        return relu(z)

    basic.ACTIVATIONS["relu"] = watched
    try:
        module(*inputs, **kwargs)
    finally:
        basic.ACTIVATIONS["relu"] = relu
    return min(margins)


def check_gradients(backend, module, inputs, rng, **kwargs) -> None:
    """Central differences along a random direction for every floating input and every
    parameter, against one pullback of a random cotangent. Draws with a ReLU input
    within 1e-3 of its RMS from the kink (100 steps) are skipped: see :func:`relu_margin`."""
    assume(relu_margin(backend, module, inputs, **kwargs) > 1e-3)
    output, pullback = tinytx.vjp(module, *inputs, **kwargs)
    cotangent = rng.standard_normal(tuple(output.shape))
    input_grads, param_grads = pullback(put(backend, cotangent))
    assert len(input_grads) == len(inputs)
    assert list(param_grads) == list(module.parameters())

    def loss(*args) -> tuple[float, float]:
        """<g, f(args)> and the sum of its terms' magnitudes (for the rounding bound)."""
        terms = to_host(backend, module(*args, **kwargs)) * cotangent
        return float(np.sum(terms)), float(np.sum(np.abs(terms)))

    def compare(what, grad, value, perturbed_loss) -> None:
        direction = rng.standard_normal(value.shape)
        numeric, rounding = richardson(perturbed_loss, value, direction)
        analytic = float(np.sum(to_host(backend, grad) * direction))
        scale = float(np.linalg.norm(to_host(backend, grad)) * np.linalg.norm(direction))
        error = abs(numeric - analytic)
        assert error <= TOLERANCE * scale + rounding, (
            f"{type(module).__name__} {what}: finite differences {numeric!r}, backward "
            f"{analytic!r}, relative error {error / max(scale, 1e-300):.2e}"
        )

    for i, x in enumerate(inputs):
        if not (hasattr(x, "dtype") and backend.xp.isdtype(x.dtype, "real floating")):
            assert input_grads[i] is None, f"input {i} is not floating: its gradient is None"
            continue
        assert tuple(input_grads[i].shape) == tuple(x.shape)

        def with_input(value, i=i):
            args = list(inputs)
            args[i] = put(backend, value)
            return loss(*args)

        compare(f"input {i}", input_grads[i], to_host(backend, x), with_input)

    state = module.state_dict()
    for key, value in state.items():
        assert tuple(param_grads[key].shape) == value.shape, key

        def with_param(new_value, key=key):
            module.load_state_dict({**state, key: new_value})
            try:
                return loss(*inputs)
            finally:
                module.load_state_dict(state)

        compare(f"parameter {key}", param_grads[key], value.astype(np.float64), with_param)


def f64(module: Module, backend) -> Module:
    return module.to(backend, dtype="float64")


# --- the small layers ----------------------------------------------------------------


@given(seed=seeds, batch=st.integers(1, 2), seq=st.integers(1, 4), d=st.integers(1, 5))
def test_linear_and_norms(backend, seed, batch, seq, d):
    rng = np.random.default_rng(seed)
    x = random_input(backend, rng, (batch, seq, d))
    for module in (
        Linear(d, 3, seed=seed),
        Linear(d, 2, bias=False, seed=seed),
        LayerNorm(d),
        LayerNorm(d, bias=False),
        RMSNorm(d),
    ):
        module = f64(module, backend)
        # non-trivial norm weights, so that the weight's role in dx is exercised
        module.load_state_dict(
            {k: v + rng.standard_normal(v.shape) for k, v in module.state_dict().items()}
        )
        check_gradients(backend, module, [x], rng)


@given(seed=seeds, seq=st.integers(1, 4), activation=st.sampled_from(["relu", "gelu", "gelu_tanh"]))
def test_feed_forward(backend, seed, seq, activation):
    rng = np.random.default_rng(seed)
    module = f64(FeedForward(4, 6, activation=activation, seed=seed), backend)
    check_gradients(backend, module, [random_input(backend, rng, (2, seq, 4))], rng)


@given(seed=seeds, batch=st.integers(1, 2), seq=st.integers(1, 5), vocab=st.integers(1, 6))
def test_embedding(backend, seed, batch, seq, vocab):
    rng = np.random.default_rng(seed)
    module = f64(Embedding(vocab, 3, seed=seed), backend)
    ids = backend.asarray(rng.integers(0, vocab, (batch, seq)))  # repeats are likely
    check_gradients(backend, module, [ids], rng)


@given(seed=seeds, seq=st.integers(1, 4), offset=st.integers(0, 3))
def test_positions(backend, seed, seq, offset):
    rng = np.random.default_rng(seed)
    x = random_input(backend, rng, (2, seq, 4))
    for module in (SinusoidalPositions(4), LearnedPositions(8, 4, seed=seed)):
        check_gradients(backend, f64(module, backend), [x, offset], rng)
    heads = random_input(backend, rng, (2, 3, seq, 4))  # (batch, heads, seq, d_head)
    check_gradients(backend, f64(RotaryEmbedding(4), backend), [heads, offset], rng)


# --- attention and blocks ------------------------------------------------------------


@st.composite
def attention_settings(draw):
    n_kv_heads = draw(st.sampled_from([1, 2]))
    attention = draw(st.sampled_from(["softmax", "softmax", *VARIANT_OPTIONS]))
    # linear attention takes key-padding masks only (it refuses others, loudly)
    masks = [None, "padding"] if attention == "linear" else [None, "padding", "random"]
    return {
        "attention": attention,
        "mask": draw(st.sampled_from(masks)),
        "n_kv_heads": n_kv_heads,
        "n_heads": n_kv_heads * draw(st.sampled_from([1, 2])),
        "d_head": draw(st.sampled_from([2, 4])),
        "rotary": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "cross": draw(st.booleans()),
        "causal": draw(st.booleans()),
        "seq_q": draw(st.integers(1, 4)),
        "seq_k": draw(st.integers(1, 4)),
    }


# Every built-in variant has a backward; small tiles so that blockwise and linear tile.
VARIANT_OPTIONS = {
    "alibi": {},
    "blockwise": {"block_size": 2},
    "cosine": {},
    "linear": {"chunk": 2},
    "sigmoid": {},
    "sliding_window": {"window": 2},
}


def make_mask(backend, rng, kind, batch, seq_q, seq_k):
    if kind == "padding":
        lengths = [int(n) for n in rng.integers(0, seq_k + 1, batch)]
        return padding_mask(lengths, seq_k, backend=backend)
    if kind == "random":
        return random_mask(backend, rng, batch, seq_q, seq_k)
    return None


@FEW
@given(seed=seeds, cfg=attention_settings())
def test_multi_head_attention(backend, seed, cfg):
    rng = np.random.default_rng(seed)
    d_model = cfg["n_heads"] * cfg["d_head"]
    module = MultiHeadAttention(
        d_model, cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"], bias=cfg["bias"],
        rotary=cfg["rotary"], attention=cfg["attention"],
        attention_options=VARIANT_OPTIONS.get(cfg["attention"]), seed=seed,
    )  # fmt: skip
    module = f64(module, backend)
    module.load_state_dict(  # non-zero biases
        {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in module.state_dict().items()}
    )
    batch, seq_q = 2, cfg["seq_q"]
    seq_k = cfg["seq_k"] if cfg["cross"] else seq_q
    inputs = [random_input(backend, rng, (batch, seq_q, d_model))]
    if cfg["cross"]:
        inputs.append(random_input(backend, rng, (batch, seq_k, d_model)))
    mask = make_mask(backend, rng, cfg["mask"], batch, seq_q, seq_k)
    check_gradients(backend, module, inputs, rng, mask=mask, causal=cfg["causal"])


@st.composite
def block_settings(draw):
    return {
        "norm_first": draw(st.booleans()),
        "norm": draw(st.sampled_from(["layer", "rms"])),
        "activation": draw(st.sampled_from(["relu", "gelu", "gelu_tanh"])),
        "n_kv_heads": draw(st.sampled_from([None, 1])),
        "rotary": draw(st.booleans()),
        "mask": draw(st.sampled_from([None, "padding", "random"])),
        "seq": draw(st.integers(1, 4)),
    }


def block_options(cfg):
    keys = ("norm_first", "norm", "activation", "n_kv_heads", "rotary")
    return {key: cfg[key] for key in keys}


@FEW
@given(seed=seeds, cfg=block_settings(), causal=st.booleans())
def test_encoder_block(backend, seed, cfg, causal):
    rng = np.random.default_rng(seed)
    module = f64(EncoderBlock(4, 2, 6, seed=seed, **block_options(cfg)), backend)
    seq = cfg["seq"]
    mask = make_mask(backend, rng, cfg["mask"], 2, seq, seq)
    x = random_input(backend, rng, (2, seq, 4))
    check_gradients(backend, module, [x], rng, mask=mask, causal=causal)


@FEW
@given(seed=seeds, cfg=block_settings(), cross=st.booleans(), seq_m=st.integers(1, 3))
def test_decoder_block(backend, seed, cfg, cross, seq_m):
    rng = np.random.default_rng(seed)
    module = DecoderBlock(4, 2, 6, cross_attention=cross, seed=seed, **block_options(cfg))
    module = f64(module, backend)
    seq = cfg["seq"]
    inputs = [random_input(backend, rng, (2, seq, 4))]
    kwargs = {"mask": make_mask(backend, rng, cfg["mask"], 2, seq, seq)}
    if cross:
        inputs.append(random_input(backend, rng, (2, seq_m, 4)))
        kwargs["memory_mask"] = make_mask(backend, rng, "padding", 2, seq, seq_m)
    check_gradients(backend, module, inputs, rng, **kwargs)


@FEW
@given(
    seed=seeds,
    positions=st.sampled_from([None, "sinusoidal", "learned", "rotary"]),
    norm_first=st.booleans(),
    pooling=st.sampled_from([None, "mean"]),
    padded=st.booleans(),
    seq=st.integers(1, 4),
)
def test_encoder(backend, seed, positions, norm_first, pooling, padded, seq):
    rng = np.random.default_rng(seed)
    module = Encoder(
        2, 4, 2, 6, norm_first=norm_first, positions=positions, max_len=6, pooling=pooling,
        activation="gelu", seed=seed,
    )  # fmt: skip
    module = f64(module, backend)
    mask = make_mask(backend, rng, "padding", 2, seq, seq) if padded else None
    check_gradients(backend, module, [random_input(backend, rng, (2, seq, 4))], rng, mask=mask)


# --- GPT and the loss ----------------------------------------------------------------


@st.composite
def gpt_configs(draw):
    n_heads = draw(st.sampled_from([1, 2]))
    return GPTConfig(
        vocab_size=draw(st.integers(2, 9)),
        context_length=6,
        d_model=4,
        n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([None, 1])),
        n_layers=draw(st.integers(1, 2)),
        d_ff=6,
        norm=draw(st.sampled_from(["layer", "rms"])),
        activation=draw(st.sampled_from(["gelu_tanh", "relu"])),
        positions=draw(st.sampled_from(["learned", "rotary", "none"])),
        tied_head=draw(st.booleans()),
        bias=draw(st.booleans()),
    )


@FEW
@given(seed=seeds, config=gpt_configs(), seq=st.integers(1, 4))
def test_gpt(backend, seed, config, seq):
    rng = np.random.default_rng(seed)
    model = f64(GPT(config, seed=seed), backend)
    ids = backend.asarray(rng.integers(0, config.vocab_size, (2, seq)))
    check_gradients(backend, model, [ids], rng)


@FEW
@given(seed=seeds, config=gpt_configs(), seq=st.integers(1, 4))
def test_loss_and_grads(backend, seed, config, seq):
    """The loss is the mean cross-entropy (NumPy reference) and its gradients match
    finite differences of the loss itself."""
    rng = np.random.default_rng(seed)
    model = f64(GPT(config, seed=seed), backend)
    vocab = config.vocab_size
    ids_host = rng.integers(0, vocab, (2, seq))
    targets_host = np.where(rng.random((2, seq)) < 0.3, -100, rng.integers(0, vocab, (2, seq)))
    ids, targets = backend.asarray(ids_host), backend.asarray(targets_host)
    assume(relu_margin(backend, model, [ids]) > 1e-3)  # no ReLU input at its kink
    loss, grads = tinytx.loss_and_grads(model, ids, targets)
    assert isinstance(loss, float)
    assert list(grads) == list(model.parameters())

    logits = to_host(backend, model(ids))  # (2, seq, vocab)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    kept = targets_host != -100
    picked = np.take_along_axis(log_probs, np.where(kept, targets_host, 0)[..., None], -1)
    expected = -picked[..., 0][kept].sum() / max(kept.sum(), 1)
    assert abs(loss - expected) <= 1e3 * EPS64 * (1 + abs(expected))

    state = model.state_dict()
    for key, value in state.items():

        def perturbed_loss(new_value, key=key):
            model.load_state_dict({**state, key: new_value})
            try:
                loss = float(F.cross_entropy(model(ids), targets))  # forward only
            finally:
                model.load_state_dict(state)
            return loss, abs(loss) + 1.0  # the loss's size, for the rounding bound

        direction = rng.standard_normal(value.shape)
        numeric, rounding = richardson(perturbed_loss, value, direction)
        grad = to_host(backend, grads[key])
        analytic = float(np.sum(grad * direction))
        scale = float(np.linalg.norm(grad) * np.linalg.norm(direction))
        assert abs(numeric - analytic) <= TOLERANCE * scale + rounding, key


def test_loss_and_grads_all_ignored(backend):
    """Every target -100: loss 0 and every gradient 0 (not NaN)."""
    model = f64(
        GPT(GPTConfig(vocab_size=5, context_length=4, d_model=4, n_heads=2, n_layers=1)), backend
    )
    ids = backend.asarray(np.array([[1, 2, 3]]))
    loss, grads = tinytx.loss_and_grads(model, ids, backend.asarray(np.full((1, 3), -100)))
    assert loss == 0.0
    assert all(not np.any(to_host(backend, g)) for g in grads.values())


# --- properties ----------------------------------------------------------------------


@FEW
@given(seed=seeds, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_pullback_is_linear_and_reusable(backend, seed, a, b):
    """pullback(a g1 + b g2) = a pullback(g1) + b pullback(g2); calling it again (it may be
    called any number of times) gives the same numbers."""
    rng = np.random.default_rng(seed)
    module = f64(DecoderBlock(4, 2, 6, norm_first=bool(seed % 2), seed=seed), backend)
    x, memory = random_input(backend, rng, (2, 3, 4)), random_input(backend, rng, (2, 2, 4))
    out, pullback = tinytx.vjp(module, x, memory)
    g1, g2 = rng.standard_normal(out.shape), rng.standard_normal(out.shape)
    (dx1, dm1), p1 = pullback(put(backend, g1))
    (dx2, dm2), p2 = pullback(put(backend, g2))
    (dx, dm), p = pullback(put(backend, a * g1 + b * g2))

    def same(got, want_1, want_2):
        want_1, want_2 = to_host(backend, want_1), to_host(backend, want_2)
        want = a * want_1 + b * want_2
        # Rounding: each entry is a sum whose terms (and partial cancellations) are at most
        # the tensor's largest entry in size; 1000 ulps of that is far above what a
        # backward of this size loses and far below any real error. Where a or b is so
        # small that the cotangent is subnormal (hypothesis found b = 5e-324), a rounding
        # loses up to half the subnormal spacing absolutely: 1000 of those on top.
        size = abs(a) * np.max(np.abs(want_1)) + abs(b) * np.max(np.abs(want_2))
        bound = 1000 * EPS64 * size + 1000 * SUBNORMAL64
        assert np.max(np.abs(to_host(backend, got) - want)) <= bound

    same(dx, dx1, dx2)
    same(dm, dm1, dm2)
    for key in p:
        same(p[key], p1[key], p2[key])
    (dx1_again, _), p1_again = pullback(put(backend, g1))
    np.testing.assert_array_equal(to_host(backend, dx1_again), to_host(backend, dx1))
    for key in p1:
        np.testing.assert_array_equal(to_host(backend, p1_again[key]), to_host(backend, p1[key]))


@given(seed=seeds, seq=st.integers(2, 5), rotary=st.booleans())
def test_causal_positions_get_no_gradient_from_earlier_outputs(backend, seed, seq, rotary):
    """Under a causal mask output position i depends on inputs 0..i only: a cotangent at
    position i gives exactly zero gradient to the inputs after i (GPT and a block)."""
    rng = np.random.default_rng(seed)
    i = int(rng.integers(0, seq - 1))
    block = f64(EncoderBlock(4, 2, 6, rotary=rotary, seed=seed), backend)
    x = random_input(backend, rng, (2, seq, 4))
    out, pullback = tinytx.vjp(block, x, causal=True)
    cotangent = np.zeros(out.shape)
    cotangent[:, i, :] = rng.standard_normal((2, 4))
    (dx,), _ = pullback(put(backend, cotangent))
    dx = to_host(backend, dx)
    assert np.all(dx[:, i + 1 :, :] == 0)
    assert np.any(dx[:, : i + 1, :] != 0)

    # GPT: the loss at position i alone sees tokens 0..i only, so every gradient is the
    # one the prefix 0..i alone gives (the later tokens change nothing but rounding).
    config = GPTConfig(vocab_size=7, context_length=6, d_model=4, n_heads=2, n_layers=2)
    model = f64(GPT(config, seed=seed), backend)
    ids = backend.asarray(rng.integers(0, 7, (1, seq)))
    targets = np.full((1, seq), -100)
    targets[0, i] = 3
    _, grads = tinytx.loss_and_grads(model, ids, backend.asarray(targets))
    prefix_ids, prefix_targets = ids[:, : i + 1], backend.asarray(targets[:, : i + 1])
    _, prefix_grads = tinytx.loss_and_grads(model, prefix_ids, prefix_targets)
    for key, grad in grads.items():
        got, want = to_host(backend, grad), to_host(backend, prefix_grads[key])
        assert np.max(np.abs(got - want)) <= 1000 * EPS64 * np.max(np.abs(want)), key


@given(seed=seeds, seq=st.integers(2, 5), norm_first=st.booleans())
def test_padded_positions_get_zero_gradient(backend, seed, seq, norm_first):
    """With a padding mask, mean pooling ignores the padded tokens and no real token attends
    to them: the pooled output's gradient reaching the padded inputs is exactly zero. And a
    cross-attention's padded memory positions get zero gradient for any cotangent."""
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, seq))
    mask = padding_mask([seq, length], seq, backend=backend)
    encoder = Encoder(2, 4, 2, 6, norm_first=norm_first, pooling="mean", seed=seed)
    encoder = f64(encoder, backend)
    x = random_input(backend, rng, (2, seq, 4))
    out, pullback = tinytx.vjp(encoder, x, mask=mask)
    (dx,), _ = pullback(put(backend, rng.standard_normal(out.shape)))
    dx = to_host(backend, dx)
    assert np.all(dx[1, length:, :] == 0)
    assert np.any(dx[1, :length, :] != 0)

    attention = f64(MultiHeadAttention(4, 2, seed=seed), backend)
    memory = random_input(backend, rng, (2, seq, 4))
    out, pullback = tinytx.vjp(attention, random_input(backend, rng, (2, 3, 4)), memory, mask=mask)
    (_, dmemory), _ = pullback(put(backend, rng.standard_normal(out.shape)))
    assert np.all(to_host(backend, dmemory)[1, length:, :] == 0)


# --- the API and bad input -----------------------------------------------------------


def small_gpt(backend, **overrides):
    config = GPTConfig(
        vocab_size=5, context_length=4, d_model=4, n_heads=2, n_layers=1, **overrides
    )
    return GPT(config).to(backend)


@pytest.mark.parametrize("tied", [True, False])
def test_param_grads_keys_are_the_parameters(backend, tied):
    model = small_gpt(backend, tied_head=tied)
    ids = backend.asarray(np.array([[1, 2, 3]]))
    out, pullback = tinytx.vjp(model, ids)
    input_grads, grads = pullback(backend.xp.zeros_like(out))
    assert input_grads == (None,)  # token ids are integers: no gradient
    assert list(grads) == list(model.parameters())
    for key, value in model.parameters().items():
        assert grads[key].shape == value.shape and grads[key].dtype == value.dtype


def test_vjp_output_is_the_forward(backend):
    """forward_and_save computes what the call computes (float32, the default dtype)."""
    rng = np.random.default_rng(3)
    x = backend.asarray(rng.standard_normal((2, 3, 4)), dtype="float32")
    memory = backend.asarray(rng.standard_normal((2, 2, 4)), dtype="float32")
    mask = padding_mask([3, 1], 3, backend=backend)
    ids = backend.asarray(rng.integers(0, 5, (2, 3)))
    cases = [
        (EncoderBlock(4, 2, 6, rotary=True), (x,), {"mask": mask}),
        (DecoderBlock(4, 2, 6, norm_first=True), (x, memory), {}),
        (MultiHeadAttention(4, 2), (x, memory), {}),
        (Encoder(2, 4, 2, 6, positions="learned", pooling="mean"), (x,), {"mask": mask}),
        (small_gpt(backend, tied_head=False), (ids,), {}),
    ]
    for module, inputs, kwargs in cases:
        module = module.to(backend)
        out, _ = tinytx.vjp(module, *inputs, **kwargs)
        want = to_host(backend, module(*inputs, **kwargs))
        # the same operations, except that cross-attention projects k and v in one product
        bound = 100 * float(np.finfo(np.float32).eps) * np.max(np.abs(want))
        assert np.max(np.abs(to_host(backend, out) - want)) <= bound, type(module).__name__


def test_context_given_as_x_gets_its_own_gradient(backend):
    """mha(x, x) treats the second x as the context: the two partial gradients add up to
    self-attention's gradient mha(x)."""
    rng = np.random.default_rng(4)
    module = f64(MultiHeadAttention(4, 2, n_kv_heads=1, rotary=True), backend)
    x = random_input(backend, rng, (2, 3, 4))
    cotangent = put(backend, rng.standard_normal((2, 3, 4)))
    (dx_self,), grads_self = tinytx.vjp(module, x, causal=True)[1](cotangent)
    (dx, dcontext), grads = tinytx.vjp(module, x, x, causal=True)[1](cotangent)
    total = to_host(backend, dx) + to_host(backend, dcontext)
    want = to_host(backend, dx_self)
    assert np.max(np.abs(total - want)) <= 1000 * EPS64 * np.max(np.abs(want))
    for key, grad in grads.items():
        got, want = to_host(backend, grad), to_host(backend, grads_self[key])
        assert np.max(np.abs(got - want)) <= 1000 * EPS64 * np.max(np.abs(want)), key


def test_float32_gradients_stay_float32(backend):
    module = EncoderBlock(4, 2, 6).to(backend)
    x = backend.asarray(np.ones((1, 2, 4)), dtype="float32")
    out, pullback = tinytx.vjp(module, x)
    (dx,), grads = pullback(backend.xp.ones_like(out))
    assert dx.dtype == backend.xp.float32
    assert all(g.dtype == backend.xp.float32 for g in grads.values())


def test_cotangent_must_match_the_output(backend):
    module = Linear(4, 3).to(backend)
    x = backend.asarray(np.ones((2, 4)), dtype="float32")
    _, pullback = tinytx.vjp(module, x)
    with pytest.raises(ValueError, match=r"shape \(2, 3\), got \(3, 2\)"):
        pullback(backend.asarray(np.ones((3, 2)), dtype="float32"))
    with pytest.raises(TypeError, match="dtype float32, got float64"):
        pullback(backend.asarray(np.ones((2, 3)), dtype="float64"))
    with pytest.raises(TypeError, match="must be an array"):
        pullback(np.ones((2, 3)).tolist())


def test_inputs_are_checked_as_a_call_checks_them(backend):
    module = Linear(4, 3).to(backend)
    with pytest.raises(TypeError, match="expects an array"):
        tinytx.vjp(module, [[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(tinytx.layers.BackendMismatchError, match="dtype float64"):
        tinytx.vjp(module, backend.asarray(np.ones((1, 4)), dtype="float64"))
    with pytest.raises(TypeError, match="expects a tinytx Module"):
        tinytx.vjp(lambda x: x, backend.asarray(np.ones((1, 4))))


def test_module_without_backward(backend):
    class Doubler(Module):
        def forward(self, x):
            return 2 * x

    with pytest.raises(NoBackwardError, match="Doubler has no backward pass"):
        tinytx.vjp(Doubler(backend), backend.asarray(np.ones(3), dtype="float32"))


def test_a_faulty_backward_is_named(backend):
    """A learner's module whose backward forgets a gradient is told which and where."""

    class Scale(Module):
        def __init__(self, backend):
            super().__init__(backend)
            self.add_param("weight", np.ones(()))

        def forward_and_save(self, x, y):
            return self.weight * x + y, {"x": x}

        def backward(self, grad_out, saved):
            return (grad_out * self.weight,), {"wieght": grad_out}

    x = backend.asarray(np.ones(2), dtype="float32")
    _, pullback = tinytx.vjp(Scale(backend), x, x)
    with pytest.raises(RuntimeError, match="returned 1 input gradients for 2 inputs"):
        pullback(x)

    Scale.backward = lambda self, grad_out, saved: ((grad_out, grad_out), {"wieght": grad_out})
    _, pullback = tinytx.vjp(Scale(backend), x, x)
    with pytest.raises(RuntimeError, match=r"missing \['weight'\], unknown \['wieght'\]"):
        pullback(x)


def test_attention_variant_without_backward(backend):
    from tinytx.plugins import AttentionError, register_attention, unregister_attention
    from tinytx.plugins.softmax import softmax_attention

    register_attention("no_grad_softmax", supports_mask=True, supports_causal=True)(
        softmax_attention
    )
    try:
        module = MultiHeadAttention(4, 2, attention="no_grad_softmax").to(backend)
        x = backend.asarray(np.ones((1, 2, 4)), dtype="float32")
        out, pullback = tinytx.vjp(module, x)
        with pytest.raises(AttentionError, match="'no_grad_softmax' has no backward"):
            pullback(backend.xp.ones_like(out))
    finally:
        unregister_attention("no_grad_softmax")


def test_loss_and_grads_bad_input(backend):
    model = small_gpt(backend)
    ids = backend.asarray(np.array([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"in \[0, 5\) or -100"):
        tinytx.loss_and_grads(model, ids, backend.asarray(np.array([[1, 5, 2]])))
    with pytest.raises(ValueError, match=r"in \[0, 5\) or -100"):
        tinytx.loss_and_grads(model, ids, backend.asarray(np.array([[1, -1, 2]])))
    with pytest.raises(ValueError, match=r"ids' shape \(1, 3\)"):
        tinytx.loss_and_grads(model, ids, backend.asarray(np.array([[1, 2]])))
    with pytest.raises(ValueError, match="integer token ids"):
        tinytx.loss_and_grads(model, ids, backend.asarray(np.ones((1, 3)), dtype="float32"))
    with pytest.raises(TypeError, match="expects a GPT"):
        tinytx.loss_and_grads(Linear(4, 3).to(backend), ids, ids)
