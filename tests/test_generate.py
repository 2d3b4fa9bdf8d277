"""Generation: the KV cache changes the cost, never the numbers; sampling is seeded and
honours temperature, top-k and top-p; bad arguments give clear errors.

Every test that builds a model runs on every backend (the ``backend`` fixture).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytx
from tinytx.generate import GenerationError, check_sampling, generate, sample_next, stream
from tinytx.layers.kv_cache import KVCache, LayerKVCache, format_bytes
from tinytx.models import GPT, GPTConfig
from tinytx.plugins import available_attention

SEEDS = st.integers(0, 2**32 - 1)
# The logits of one position computed two ways (alone with the cache, or within the
# whole sequence) differ by float32 rounding only.
ATOL, RTOL = 2e-5, 1e-4


@st.composite
def configs(draw) -> GPTConfig:
    """A small random GPTConfig: every norm, activation, position kind, GQA, head tying."""
    n_heads = draw(st.sampled_from([1, 2, 4]))
    return GPTConfig(
        vocab_size=draw(st.integers(3, 40)),
        context_length=draw(st.integers(4, 20)),
        d_model=n_heads * draw(st.sampled_from([2, 4])),
        n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0])),
        n_layers=draw(st.integers(1, 2)),
        d_ff=draw(st.sampled_from([None, 6])),
        norm=draw(st.sampled_from(["layer", "rms"])),
        activation=draw(st.sampled_from(["gelu_tanh", "gelu", "relu"])),
        positions=draw(st.sampled_from(["learned", "rotary", "none"])),
        tied_head=draw(st.booleans()),
        bias=draw(st.booleans()),
    )


def small_model(backend, attention="softmax", **overrides) -> GPT:
    options = dict(vocab_size=30, context_length=24, d_model=16, n_heads=4, n_kv_heads=2)
    options.update(overrides)
    return GPT(GPTConfig(n_layers=2, **options), attention=attention, backend=backend, seed=3)


def prompt_for(config: GPTConfig, seed: int, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=(batch, length))


# --- the cache never changes the numbers ------------------------------------------------


@settings(max_examples=12)
@given(config=configs(), seed=SEEDS, data=st.data())
def test_cached_logits_equal_full_recomputation_at_every_step(backend, config, seed, data):
    """Every step's logits (computed from one new token and the cache) equal the logits of
    the same position when the whole final sequence is run at once, without a cache."""
    model = GPT(config, backend=backend, seed=seed % 1000)
    length = data.draw(st.integers(1, config.context_length - 1), label="prompt length")
    new = data.draw(st.integers(1, config.context_length - length), label="new tokens")
    batch = data.draw(st.integers(1, 2), label="batch")
    ids = prompt_for(config, seed, batch, length)
    steps = list(stream(model, ids, new, temperature=1.0, seed=seed, use_cache=True))
    assert [s.position for s in steps] == list(range(length, length + new))
    tokens = np.concatenate([ids, *[s.tokens[:, None] for s in steps]], axis=1)
    full = backend.to_numpy(model(backend.asarray(tokens, dtype="int64")))  # (b, seq, vocab)
    for step in steps:
        np.testing.assert_allclose(
            step.logits, full[:, step.position - 1, :], atol=ATOL, rtol=RTOL,
            err_msg=f"position {step.position}",
        )  # fmt: skip
    uncached = list(stream(model, ids, new, temperature=1.0, seed=seed, use_cache=False))
    assert [s.tokens.tolist() for s in uncached] == [s.tokens.tolist() for s in steps]


@pytest.mark.parametrize("positions", ["learned", "rotary", "none"])
def test_a_chunk_after_a_cached_prefix_sees_exactly_its_past(backend, positions):
    """Prefill in two chunks (3 then 5 tokens): the second chunk's queries are the last
    positions of the keys, so its logits equal those of the whole sequence at once."""
    model = small_model(backend, positions=positions)
    ids = backend.asarray(prompt_for(model.config, 9, 2, 8), dtype="int64")
    full = backend.to_numpy(model(ids))  # (2, 8, 30)
    cache = model.new_cache(2, 8)
    first = backend.to_numpy(model(ids[:, :3], cache=cache))  # (2, 3, 30)
    second = backend.to_numpy(model(ids[:, 3:], cache=cache))  # (2, 5, 30)
    np.testing.assert_allclose(first, full[:, :3], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(second, full[:, 3:], atol=ATOL, rtol=RTOL)
    assert cache.length == 8


CAUSAL_VARIANTS = sorted(
    name for name, variant in available_attention().items() if variant.promises.supports_causal
)


@pytest.mark.parametrize("attention", CAUSAL_VARIANTS)
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_every_causal_variant_works_with_and_without_the_cache(backend, attention, positions):
    model = small_model(backend, attention, positions=positions)
    ids = prompt_for(model.config, 1, 2, 7)
    cached = list(stream(model, ids, 9, temperature=1.0, seed=5, use_cache=True))
    uncached = list(stream(model, ids, 9, temperature=1.0, seed=5, use_cache=False))
    for a, b in zip(cached, uncached, strict=True):
        np.testing.assert_allclose(a.logits, b.logits, atol=ATOL, rtol=RTOL)
        assert a.tokens.tolist() == b.tokens.tolist()
    assert len({s.logits.tobytes() for s in cached}) == len(cached)  # the logits do move


def test_greedy_is_the_same_with_and_without_the_cache(backend):
    model = small_model(backend)
    ids = prompt_for(model.config, 2, 3, 5)
    with_cache = generate(model, ids, 12)
    without = generate(model, ids, 12, use_cache=False)
    np.testing.assert_array_equal(with_cache, without)
    assert with_cache.shape == (3, 17)
    np.testing.assert_array_equal(with_cache[:, :5], ids)


# --- the cache as an object a learner can inspect ---------------------------------------


def test_kv_cache_shapes_and_memory(backend):
    model = small_model(backend, positions="rotary")  # 4 heads, 2 kv heads, d_head 4
    cache = model.new_cache(batch=2, max_len=10)
    assert isinstance(cache, KVCache) and len(cache) == 2 and cache.length == 0
    assert cache.nbytes == 2 * 2 * (2 * 2 * 10 * 4) * 4  # layers * (k, v) * elements * 4 B
    ids = backend.asarray(prompt_for(model.config, 0, 2, 6), dtype="int64")
    model(ids, cache=cache)
    assert cache.length == 6
    layer = cache[0]
    assert isinstance(layer, LayerKVCache)
    assert tuple(layer.keys.shape) == tuple(layer.values.shape) == (2, 2, 6, 4)
    assert tuple(layer.key_buffer.shape) == (2, 2, 10, 4)  # allocated once, for max_len
    model(ids[:, :1], cache=cache)
    assert cache.length == 7 and tuple(cache[1].keys.shape) == (2, 2, 7, 4)
    text = cache.describe()
    assert "7 of 10 positions" in text and "(2, 2, 7, 4)" in text
    assert "total: 2.5 KiB allocated for 10 positions" in text  # 2560 bytes
    assert format_bytes(75_497_472) == "72.0 MiB" and format_bytes(512) == "512 B"
    assert "KVCache(layers=2, length=7/10" in repr(cache)


def test_cached_keys_are_the_layers_keys(backend):
    """What the cache holds is exactly the keys and values the layer computes."""
    model = small_model(backend, positions="none", n_kv_heads=4)
    ids = backend.asarray(prompt_for(model.config, 4, 1, 5), dtype="int64")
    cache = model.new_cache(1, 8)
    model(ids, cache=cache)
    x = model.token_embedding(ids)  # (1, 5, 16): layer 0's input (no positions)
    attn = model.layers[0].self_attn
    h = model.layers[0].norms[0](x)
    k = attn._project(h, 16, 32)  # (1, 5, 16), the key rows of in_proj_weight
    keys = backend.to_numpy(cache[0].keys)  # (1, 4, 5, 4)
    expected = backend.to_numpy(k).reshape(1, 5, 4, 4).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(keys, expected, atol=1e-6)


def test_kv_cache_refuses_overflow_and_wrong_shapes(backend):
    layer = LayerKVCache(1, 2, 4, 3, backend=backend)
    k = backend.asarray(np.ones((1, 2, 2, 4)), dtype="float32")
    layer.append(k, k)
    with pytest.raises(ValueError, match="KV cache is full: it holds 3 positions, 2 are filled"):
        layer.append(k, k)
    bad = backend.asarray(np.ones((1, 3, 1, 4)), dtype="float32")
    with pytest.raises(ValueError, match=r"\(batch, heads_kv, d_head\) = \(1, 2, 4\)"):
        layer.append(bad, bad)
    model = small_model(backend)
    with pytest.raises(ValueError, match="exceeds the model's context length 24"):
        model.new_cache(1, 25)
    other = KVCache(3, 1, 2, 4, 8, backend=backend)
    ids = backend.asarray(np.zeros((1, 2)), dtype="int64")
    with pytest.raises(ValueError, match="KVCache with 2 layers"):
        model(ids, cache=other)


# --- sampling ----------------------------------------------------------------------------


@settings(max_examples=10)
@given(seed=SEEDS, temperature=st.floats(0.5, 2.0), top_k=st.sampled_from([None, 5]))
def test_same_seed_same_tokens_on_every_backend(backend, numpy_backend, seed, temperature, top_k):
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=0.9, seed=seed)
    here = small_model(backend)
    reference = small_model(numpy_backend)
    ids = prompt_for(here.config, seed, 2, 4)
    np.testing.assert_array_equal(
        generate(here, ids, 10, **kwargs), generate(reference, ids, 10, **kwargs)
    )


def test_different_seeds_sample_differently(backend):
    model = small_model(backend)
    ids = prompt_for(model.config, 0, 1, 3)
    runs = {tuple(generate(model, ids, 12, temperature=2.0, seed=s)[0]) for s in range(4)}
    assert len(runs) > 1


@settings(max_examples=10)
@given(seed=SEEDS, temperature=st.floats(0.1, 5.0), top_p=st.sampled_from([None, 0.5, 1.0]))
def test_top_k_1_is_greedy(backend, seed, temperature, top_p):
    model = small_model(backend)
    ids = prompt_for(model.config, seed, 2, 3)
    greedy = generate(model, ids, 8)
    sampled = generate(model, ids, 8, temperature=temperature, top_k=1, top_p=top_p, seed=seed)
    np.testing.assert_array_equal(sampled, greedy)


def nucleus_floor(logits: np.ndarray, temperature: float, top_p: float) -> float:
    """The smallest probability inside the top-p nucleus of one row, computed from scratch:
    sort the softmax probabilities descending and take them until their sum reaches p
    (give or take 1e-9: where the sum lands on p exactly, rounding decides)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p = np.sort(p / p.sum())[::-1]
    total = 0.0
    for value in p:
        total += value
        if total >= top_p + 1e-9:
            return float(value)
    return float(p[-1])


@settings(max_examples=10)
@given(seed=SEEDS, temperature=st.floats(0.3, 3.0), top_p=st.floats(0.05, 1.0))
def test_top_p_samples_only_from_the_nucleus(backend, seed, temperature, top_p):
    model = small_model(backend)
    ids = prompt_for(model.config, seed, 2, 3)
    for step in stream(model, ids, 10, temperature=temperature, top_p=top_p, seed=seed):
        for row, token in enumerate(step.tokens):
            z = step.logits[row].astype(np.float64) / temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            floor = nucleus_floor(step.logits[row], temperature, top_p)
            assert p[token] >= floor * (1 - 1e-9), (
                f"token {token} (p={p[token]:.4g}) lies outside the top-p={top_p:.3g} nucleus"
            )


@settings(max_examples=10)
@given(seed=SEEDS, top_k=st.integers(1, 6))
def test_top_k_samples_only_from_the_k_best(backend, seed, top_k):
    model = small_model(backend)
    ids = prompt_for(model.config, seed, 2, 3)
    for step in stream(model, ids, 8, temperature=3.0, top_k=top_k, seed=seed):
        for row, token in enumerate(step.tokens):
            kth_best = np.sort(step.logits[row])[::-1][top_k - 1]
            assert step.logits[row][token] >= kth_best


def test_sampling_follows_the_softmax_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = [int(sample_next(logits, rng, temperature=1.0)[0]) for _ in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # temperature 0.5 squares the probabilities (then renormalises); top_p=0.75 keeps 2 tokens
    draws = [int(sample_next(logits, rng, temperature=0.5)[0]) for _ in range(4000)]
    want = np.array([0.25, 0.09, 0.0225, 0.0025])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, want / want.sum(), atol=0.03)
    draws = {int(sample_next(logits, rng, temperature=1.0, top_p=0.75)[0]) for _ in range(500)}
    assert draws == {0, 1}


def test_greedy_ties_pick_the_lowest_id_and_never_draw():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    tokens = sample_next(np.array([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]]), rng)
    assert tokens.tolist() == [1, 0]
    assert rng.bit_generator.state == state


def test_stop_token_ends_each_sequence(backend):
    model = small_model(backend)
    ids = prompt_for(model.config, 7, 2, 3)
    free = generate(model, ids, 10)
    stop = int(free[0, 5])  # a token the first sequence produces greedily
    out = generate(model, ids, 10, stop_token=stop)
    first = int(np.argmax(out[0, 3:] == stop)) + 3
    np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first:] == stop).all()
    if (out[1, 3:] == stop).any():
        assert out.shape[1] <= free.shape[1]
    else:
        assert out.shape == free.shape  # the second sequence never stopped: full length


# --- input and output kinds ---------------------------------------------------------------


def test_result_kinds(backend):
    model = small_model(backend)
    one = generate(model, [1, 2, 3], 4)
    assert isinstance(one, np.ndarray) and one.shape == (7,) and one[:3].tolist() == [1, 2, 3]
    on_backend = model.generate(backend.asarray(np.array([[1, 2, 3]]), dtype="int64"), 4)
    assert backend.owns(on_backend) and tuple(on_backend.shape) == (1, 7)
    np.testing.assert_array_equal(backend.to_numpy(on_backend)[0], one)
    np.testing.assert_array_equal(generate(model, [[1, 2, 3]], 0), [[1, 2, 3]])
    flat = generate(model, backend.asarray(np.array([1, 2, 3]), dtype="int64"), 2)
    assert backend.owns(flat) and tuple(flat.shape) == (5,)  # the rank it came with


def test_last_only_is_the_last_row(backend):
    model = small_model(backend)
    ids = backend.asarray(prompt_for(model.config, 0, 2, 6), dtype="int64")
    full = backend.to_numpy(model(ids))
    last = backend.to_numpy(model(ids, last_only=True))
    assert last.shape == (2, 1, 30)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, kwargs, message",
    [
        ([], {}, "the prompt is empty"),
        ([[]], {}, "the prompt is empty"),
        ([1, 30], {}, r"token ids must lie in \[0, 30\) .* from 1 to 30"),
        ([-1, 2], {}, r"token ids must lie in \[0, 30\)"),
        ([1.5, 2.0], {}, "token ids must be integers"),
        ([[[1]]], {}, r"shape \(seq,\) or \(batch, seq\)"),
        ([[1, 2], [3]], {}, "rows of one length"),
        (list(range(25)), {}, "the prompt has 25 tokens but the model reads at most 24"),
        ([1] * 20, {"max_new_tokens": 5}, "ask for at most 4 new tokens"),
        ([1], {"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
        ([1], {"temperature": -0.5}, "temperature must be >= 0"),
        ([1], {"temperature": float("nan")}, "temperature must be >= 0"),
        ([1], {"top_k": 0}, "top_k must be an int >= 1"),
        ([1], {"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ([1], {"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ([1], {"top_p": -0.1}, r"top_p must lie in \(0, 1\]"),
        ([1], {"stop_token": 30}, r"stop_token must be a token id in \[0, 30\)"),
    ],
)
def test_bad_generation_arguments(backend, ids, kwargs, message):
    model = small_model(backend)
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(GenerationError, match=message):
        generate(model, ids, **kwargs)


def test_check_sampling_accepts_the_boundaries():
    check_sampling(0.0, 1, 1.0)
    check_sampling(2, None, None)
    with pytest.raises(GenerationError):
        check_sampling(True, None, None)


def test_model_refuses_bad_ids(backend):
    model = small_model(backend)
    with pytest.raises(ValueError, match="at least one token"):
        model(backend.asarray(np.zeros((1, 0)), dtype="int64"))
    with pytest.raises(ValueError, match=r"integer token ids of shape \(batch, seq\)"):
        model(backend.asarray(np.zeros((3,)), dtype="int64"))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 30\)"):
        model(backend.asarray(np.array([[3, 31]]), dtype="int64"))
    with pytest.raises(ValueError, match="exceed the model's context length of 24"):
        model(backend.asarray(np.zeros((1, 25)), dtype="int64"))
    cache = model.new_cache(1)
    model(backend.asarray(np.zeros((1, 20)), dtype="int64"), cache=cache)
    with pytest.raises(ValueError, match="20 cached \\+ 5 new tokens exceed"):
        model(backend.asarray(np.zeros((1, 5)), dtype="int64"), cache=cache)


def test_backend_mismatch_is_reported(backend):
    if backend.name == "numpy":
        pytest.skip("needs a backend other than numpy")
    model = small_model(backend)
    with pytest.raises(tinytx.layers.BackendMismatchError):
        model(np.zeros((1, 2), dtype=np.int64))


@pytest.mark.parametrize(
    ("row", "allowed"),
    [
        ([0.5, -3.0, 1e30], True),  # every logit finite: the one-pass check
        ([0.5, -np.inf, 2.0], True),  # a banned token (-inf) beside finite ones
        ([0.5, np.nan, 2.0], False),
        ([0.5, np.inf, 2.0], False),
        ([-np.inf, -np.inf, -np.inf], False),  # no token can be chosen
    ],
)
def test_logits_are_checked_before_a_token_is_chosen(row, allowed) -> None:
    from tinytx.generate import NonFiniteLogitsError, _check_logits

    logits = np.array([[1.0, 2.0, 3.0], row], dtype=np.float32)  # (batch, vocab)
    if allowed:
        _check_logits(None, logits, step=1, position=5)
    else:
        with pytest.raises(NonFiniteLogitsError, match="step 1 \\(position 5\\)"):
            _check_logits(None, logits, step=1, position=5)


def test_prepared_one_token_steps_exist_exactly_where_the_native_does(backend) -> None:
    """GPT.one_token_steps gives generation a prepared step only where the backend has
    the fused decode native (numpy with numba); elsewhere None, and generation calls
    the model at every token. Either way, one sequence's cached steps (the prepared
    path, where there is one) match recomputing the whole sequence every step."""
    from tinytx.backends import numba_kernels

    model = small_model(backend)
    prepared = model.one_token_steps(model.new_cache(1, 8))
    has_native = "decoder_stack" in backend.natives and numba_kernels.enabled()
    assert (prepared is not None) == has_native
    ids = prompt_for(model.config, 4, 1, 3)
    cached = list(stream(model, ids, 6, temperature=1.0, seed=2))
    uncached = list(stream(model, ids, 6, temperature=1.0, seed=2, use_cache=False))
    for a, b in zip(cached, uncached, strict=True):
        np.testing.assert_allclose(a.logits, b.logits, atol=ATOL, rtol=RTOL)
        assert a.tokens.tolist() == b.tokens.tolist()
