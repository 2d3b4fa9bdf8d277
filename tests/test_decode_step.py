"""The fused decode step (the numpy backend's ``decoder_stack``,
backends/matvec_kernels.py's ``stack_step``: every block and the head in one compiled
call, its threads sharing each product's rows) against the blocks' modules, reached
both ways: a model's whole stack at once, and a block on its own (a stack of one).

Generating token by token, a block of the supported kind (LayerNorm, biases, softmax
attention, no rotary) runs as one compiled function instead of its modules. Its logits
and the keys and values it writes into the cache are checked against the modules' own,
both measured against the same model in float64: the fused step's rounding error may be
at most a few times the modules' own float32 rounding error. Blocks of other kinds, and
inputs it does not take, go to the modules, whose numbers are then the same bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytx
from tinytx.backends import matvec_kernels, numba_kernels
from tinytx.models.gpt import GPT, GPTConfig

EPS32 = float(np.finfo(np.float32).eps)

pytestmark = pytest.mark.skipif(not numba_kernels.available(), reason="needs numba")


@pytest.fixture(params=["stack", "block"], scope="module")
def kind(request) -> str:
    """The route under test: a model's whole stack in one call ("stack"), or each block
    on its own, a stack of one ("block": ``DecoderBlock._one_token_at_once``)."""
    return request.param


@contextlib.contextmanager
def spying() -> Iterator[list[bool]]:
    """Inside: whether each token given to the kernel's wrapper ran every stage it was
    given (True: its blocks, and the head if any) or was declined (False), in order; a
    preparation that declines counts as one False."""
    seen: list[bool] = []
    original = matvec_kernels.prepare_stack_step

    def spy(keys, values, blocks, head=None):
        step = original(keys, values, blocks, head)
        if step is None:
            seen.append(False)
            return None

        def spied(x, position, threads):
            out = step(x, position, threads)
            seen.append(out is not None and out[1] == len(blocks) + (head is not None))
            return out

        return spied

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tinytx.backends.numpy_natives.prepare_stack_step", spy)
        yield seen


@pytest.fixture
def calls() -> Iterator[list[bool]]:
    with spying() as seen:
        yield seen


@contextlib.contextmanager
def only(backend, kind: str | None) -> Iterator[None]:
    """Inside: the fused step runs by the ``kind`` route only (None: not at all, so the
    modules run)."""
    with pytest.MonkeyPatch.context() as patch:
        if kind is None:
            patch.delitem(backend.natives, "decoder_stack")
        elif kind == "block":  # the model does not run its stack at once: block by block
            patch.setattr("tinytx.models.gpt.one_token_through_blocks",
                          lambda blocks, x, caches, head=None: (x, 0))  # fmt: skip
        yield


def generate(
    model: GPT, ids: np.ndarray, prompt: int, fused: str | None
) -> tuple[np.ndarray, list]:
    """Logits of positions prompt-1 .. end, token by token after the prompt, and the
    caches' keys and values; with the fused step by the ``fused`` route ("stack" or
    "block") or with the modules only (None)."""
    backend = model.backend
    with only(backend, fused):
        cache = model.new_cache(1)
        logits = [model(backend.asarray(ids[:, :prompt]), cache=cache)[:, -1]]
        for t in range(prompt, ids.shape[1]):
            logits.append(model(backend.asarray(ids[:, t : t + 1]), cache=cache)[:, -1])
        kv = [(np.asarray(layer.keys), np.asarray(layer.values)) for layer in cache.layers]
        return np.concatenate([np.asarray(a) for a in logits]), kv


@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(
    seed=st.integers(0, 2**32 - 1),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 2)]),
    activation=st.sampled_from(["gelu_tanh", "gelu", "relu"]),
    prompt=st.integers(1, 4),
)
def test_the_fused_step_rounds_like_the_modules(numpy_backend, kind, seed, heads, activation,
                                                prompt) -> None:  # fmt: skip
    n_heads, n_kv_heads = heads
    config = GPTConfig(
        vocab_size=11, context_length=12, d_model=16, n_heads=n_heads, n_kv_heads=n_kv_heads,
        n_layers=2, activation=activation,
    )  # fmt: skip
    model = GPT(config, seed=seed % 1000).to(numpy_backend)
    ids = np.random.default_rng(seed).integers(0, 11, (1, 9))
    with spying() as calls:
        fused, fused_kv = generate(model, ids, prompt, fused=kind)
    assert calls and all(calls)  # every new token went through the fused step
    modules, modules_kv = generate(model, ids, prompt, fused=None)
    reference, reference_kv = generate(model.to(numpy_backend, dtype="float64"), ids, prompt, kind)

    def check(ours: np.ndarray, theirs: np.ndarray, exact: np.ndarray) -> None:
        own_error = np.max(np.abs(theirs - exact))  # the modules' float32 rounding
        floor = 8 * EPS32 * np.max(np.abs(exact))  # where the modules happen to be exact
        assert np.max(np.abs(ours - exact)) <= 4 * own_error + floor

    check(fused, modules, reference)
    for (k, v), (k_mod, v_mod), (k_ref, v_ref) in zip(
        fused_kv, modules_kv, reference_kv, strict=True
    ):
        check(k, k_mod, k_ref)
        check(v, v_mod, v_ref)


@pytest.mark.parametrize(
    "change",
    [
        {"positions": "rotary"},
        {"norm": "rms"},
        {"bias": False},
        {"attention": "cosine"},
        {"dtype": "float64"},
        {"batch": 2},
    ],
)
def test_other_blocks_and_inputs_go_to_the_modules(numpy_backend, kind, calls, change) -> None:
    """Not of the fused kind: the modules run, and the numbers are theirs bit for bit."""
    kwargs = {k: v for k, v in change.items() if k in ("positions", "norm", "bias")}
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1, **kwargs)
    model = GPT(config, attention=change.get("attention", "softmax"), seed=3)
    model = model.to(numpy_backend, dtype=change.get("dtype", "float32"))
    batch = change.get("batch", 1)
    ids = np.random.default_rng(0).integers(0, 11, (batch, 4))
    steps = []
    for fused in (kind, None):
        with only(model.backend, fused):
            cache = model.new_cache(batch)
            model(model.backend.asarray(ids[:, :2]), cache=cache)
            steps.append(np.asarray(model(model.backend.asarray(ids[:, 2:3]), cache=cache)))
    assert not any(calls)
    np.testing.assert_array_equal(steps[0], steps[1])


def test_a_full_cache_is_the_modules_error(numpy_backend, kind, calls) -> None:
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    with only(numpy_backend, kind):
        cache = model.new_cache(1, max_len=3)
        model(numpy_backend.asarray(np.array([[1, 2]])), cache=cache)
        model(numpy_backend.asarray(np.array([[3]])), cache=cache)  # fused: position 2 of 3
        assert calls == [True] and cache.length == 3
        with pytest.raises(ValueError, match="(KV cache is full|context)"):
            model(numpy_backend.asarray(np.array([[4]])), cache=cache)


def test_numba_off_runs_the_modules(numpy_backend, kind, calls, monkeypatch) -> None:
    monkeypatch.setenv("TINYTX_NUMBA", "0")
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    with only(numpy_backend, kind):
        cache = model.new_cache(1)
        model(numpy_backend.asarray(np.array([[1, 2]])), cache=cache)
        model(numpy_backend.asarray(np.array([[3]])), cache=cache)
    assert calls and not any(calls) and cache.length == 3  # asked, and declined
    assert "decoder_stack" in tinytx.get_backend("numpy").natives


def test_a_nan_weight_gives_nan_as_the_modules_do(numpy_backend, kind, calls) -> None:
    """IEEE arithmetic in the compiled step: NaN flows through (no error, no silent
    number) to the second LayerNorm, whose NaN row goes to the definition, as every
    LayerNorm kernel's does: the step declines and the modules (writing the cache's
    position again) give NaN, which generation reports."""
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    weight = model.parameters()["layers.0.norm1.weight"]
    weight[3] = float("nan")
    ids = np.array([[1, 2, 3]])
    fused, _ = generate(model, ids, 2, fused=kind)
    modules, _ = generate(model, ids, 2, fused=None)
    assert calls and not any(calls)  # declined at the second LayerNorm (stack, then block)
    assert np.isnan(fused).all() and np.isnan(modules).all()


def test_int8_weights_go_to_the_modules(numpy_backend, kind, calls) -> None:
    """Inside int8_weights the products read the int8 copies: the fused step (which reads
    the float32 weights) stands aside, so quantized decoding stays quantized."""
    from tinytx.quantize import int8_weights

    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    ids = np.array([[1, 2, 3]])
    with int8_weights(model):
        quantized, _ = generate(model, ids, 2, fused=kind)
    assert calls == []  # the native declined before the kernel
    full, _ = generate(model, ids, 2, fused=kind)
    assert np.max(np.abs(quantized - full)) > 0  # the int8 copies were read


def test_a_nan_key_in_the_cache_gives_nan(numpy_backend, kind, calls) -> None:
    """A NaN score (here from a NaN cached key; the values stay finite) reaches the
    attention's output as NaN, as in the modules' softmax (the compiled exp, which turns
    NaN into a number, is never asked for one); the second LayerNorm's NaN row then
    sends the step to the modules, which give NaN too. Were the NaN lost, the step
    would return finite numbers."""
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    outs = []
    for fused in (kind, None):
        with only(numpy_backend, fused):
            cache = model.new_cache(1)
            model(numpy_backend.asarray(np.array([[1, 2]])), cache=cache)
            cache.layers[0].key_buffer[0, 0, 0, 0] = float("nan")  # head 0, position 0
            outs.append(np.asarray(model(numpy_backend.asarray(np.array([[3]])), cache=cache)))
    assert calls and not any(calls)  # declined at the second LayerNorm (stack, then block)
    assert np.isnan(outs[0]).all() and np.isnan(outs[1]).all()


def _blocks_and_caches(model: GPT, position: int, rng: np.random.Generator) -> tuple:
    """The model's blocks' step weights, and caches holding ``position`` random keys and
    values (float32, as numpy arrays)."""
    x = model.backend.asarray(rng.standard_normal((1, 1, model.config.d_model), dtype=np.float32))
    cache = model.new_cache(1)
    weights, keys, values = [], [], []
    for block, layer in zip(model.layers, cache.layers, strict=True):
        layer.key_buffer[...] = rng.standard_normal(layer.key_buffer.shape, dtype=np.float32)
        layer.value_buffer[...] = rng.standard_normal(layer.value_buffer.shape, dtype=np.float32)
        weights.append(block._step_weights(layer))
        keys.append(layer.key_buffer[0])
        values.append(layer.value_buffer[0])
    return np.asarray(x[0, 0]), weights, keys, values


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("least_bytes", [4, 1 << 16])
def test_the_stack_gives_the_same_numbers_however_the_rows_are_shared(
    numpy_backend, monkeypatch, threads, least_bytes
) -> None:
    """Each output is computed whole by one thread, with the same compiled code, so the
    stack's numbers and the keys and values it writes are the same bit for bit whether
    one thread or two share the rows, one row per take or many. (How they round against
    the modules is the test above.)"""
    config = GPTConfig(vocab_size=11, context_length=16, d_model=32, n_heads=4, n_kv_heads=2,
                       n_layers=3, d_ff=96)  # fmt: skip
    model = GPT(config, seed=1).to(numpy_backend)
    x, weights, keys, values = _blocks_and_caches(model, 5, np.random.default_rng(7))
    runs = []
    for least, count in ((1 << 16, 1), (least_bytes, threads)):
        monkeypatch.setattr(matvec_kernels, "_LEAST_BYTES_PER_TAKE", least)
        k, v = [a.copy() for a in keys], [a.copy() for a in values]
        y, done = matvec_kernels.stack_step(x, k, v, 5, weights, count)
        assert done == 3
        runs.append([y, *k, *v])
    for ours, theirs in zip(*runs, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(keys[0][:, 5], runs[0][1][:, 5])  # position 5 was written


def test_more_shares_than_threads_still_finish(numpy_backend, monkeypatch) -> None:
    """A thread waits only for rows another thread has taken, so the stack finishes
    even when its shares run one after another on one thread (as a threading layer may
    run them): here three shares on a team of one."""
    import numba

    config = GPTConfig(vocab_size=11, context_length=16, d_model=32, n_heads=4, n_layers=2,
                       d_ff=64)  # fmt: skip
    model = GPT(config, seed=2).to(numpy_backend)
    x, weights, keys, values = _blocks_and_caches(model, 3, np.random.default_rng(0))
    copies = [k.copy() for k in keys], [v.copy() for v in values]
    expected, _ = matvec_kernels.stack_step(x, *copies, 3, weights, 1)

    def three_shares_one_thread(threads: int) -> None:
        numba.set_num_threads(1)
        matvec_kernels._threads.count = 3  # what the kernel is told: three shares

    before = numba.get_num_threads()
    monkeypatch.setattr(matvec_kernels, "_set_threads", three_shares_one_thread)
    try:
        y, done = matvec_kernels.stack_step(x, keys, values, 3, weights, 3)
    finally:
        numba.set_num_threads(before)
        matvec_kernels._threads.count = None  # the next call sets numba's count again
    assert done == 2
    np.testing.assert_array_equal(y, expected)


def test_a_stack_that_stops_midway_hands_over_to_the_modules(numpy_backend) -> None:
    """Where a LayerNorm row must go to the definition (here block 1's second one: a huge
    attention bias overflows its variance in float32), the stack returns after block 0
    and block 1's modules carry on (writing block 1's keys and values again): the
    logits round like the modules', and every cache holds every token."""
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=3)
    model = GPT(config, seed=4).to(numpy_backend)
    bias = model.parameters()["layers.1.self_attn.out_proj.bias"]
    bias[0::2], bias[1::2] = 1e30, -1e30  # variance 1e60
    ids = np.random.default_rng(3).integers(0, 11, (1, 5))
    seen: list[int] = []
    original = matvec_kernels.prepare_stack_step

    def spy(*args, **kwargs):
        step = original(*args, **kwargs)

        def spied(*step_args):
            out = step(*step_args)
            seen.append(None if out is None else out[1])
            return out

        return spied

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tinytx.backends.numpy_natives.prepare_stack_step", spy)
        fused, fused_kv = generate(model, ids, 2, fused="stack")
    # per token: block 0 by the stack; blocks 1 and 2 alone decline too (their LayerNorms
    # overflow), so their modules run
    assert seen == [1, 0, 0] * 3
    modules, modules_kv = generate(model, ids, 2, fused=None)
    exact, _ = generate(model.to(numpy_backend, dtype="float64"), ids, 2, fused=None)
    assert np.isfinite(fused).all()
    own_error = np.max(np.abs(modules - exact))
    assert np.max(np.abs(fused - exact)) <= 4 * own_error + 8 * EPS32 * np.max(np.abs(exact))
    for ours, theirs in zip(fused_kv, modules_kv, strict=True):
        assert ours[0].shape == theirs[0].shape  # every layer holds all five positions


def _small_model(backend, seed: int = 0) -> GPT:
    config = GPTConfig(vocab_size=11, context_length=12, d_model=16, n_heads=2, n_layers=2)
    return GPT(config, seed=seed).to(backend)


def test_generation_prepares_the_step_once_with_the_models_numbers(numpy_backend) -> None:
    """The generation loop gathers the fused step's arguments once (GPT.one_token_steps),
    not at every token, and its tokens and logits are the model's own, bit for bit: the
    same kernel on the same numbers."""
    from tinytx.backends import numpy_natives
    from tinytx.generate import stream

    model = _small_model(numpy_backend)
    runs = []
    for gather_once in (True, False):
        prepared = []
        with spying() as calls, pytest.MonkeyPatch.context() as patch:
            spy = numpy_natives.prepare_stack_step

            def counting(*args, spy=spy, prepared=prepared, **kwargs):
                prepared.append(1)
                return spy(*args, **kwargs)

            patch.setattr(numpy_natives, "prepare_stack_step", counting)
            if not gather_once:  # the model called at every token, as before
                patch.setattr(GPT, "one_token_steps", lambda self, cache: None)
            steps = list(stream(model, [[1, 2, 3]], 6, temperature=0.8, seed=5))
        assert calls == [True] * 5  # every token after the prompt went through the kernel
        runs.append((steps, len(prepared)))
    (once, n_once), (every, n_every) = runs
    assert n_once == 1 and n_every == 5
    for ours, theirs in zip(once, every, strict=True):
        np.testing.assert_array_equal(ours.tokens, theirs.tokens)
        np.testing.assert_array_equal(ours.logits, theirs.logits)


def test_one_token_steps_leave_other_inputs_to_the_model(numpy_backend) -> None:
    """Anything but one valid token id goes to the model: its numbers, or its error."""
    model = _small_model(numpy_backend)
    ids = numpy_backend.asarray(np.array([[1, 2]]))
    cache, theirs = model.new_cache(1, max_len=4), model.new_cache(1, max_len=4)
    logits_for = model.one_token_steps(cache)
    assert logits_for is not None
    ours = np.asarray(logits_for(ids))  # two tokens at once: the model's own path
    np.testing.assert_array_equal(ours, np.asarray(model(ids, cache=theirs, last_only=True)))
    for bad, error in (([[11]], "token ids must lie"), ([[-1]], "token ids must lie")):
        with pytest.raises(ValueError, match=error):
            logits_for(numpy_backend.asarray(np.array(bad)))
    with pytest.raises(ValueError, match="integer token ids"):
        logits_for(numpy_backend.asarray(np.array([[1.0]], dtype=np.float32)))
    logits_for(numpy_backend.asarray(np.array([[3]])))
    logits_for(numpy_backend.asarray(np.array([[4]])))  # position 3 of 4: the last
    assert cache.length == 4
    with pytest.raises(ValueError, match="(KV cache is full|context)"):
        logits_for(numpy_backend.asarray(np.array([[5]])))


def test_one_token_steps_see_weights_changed_in_place(numpy_backend) -> None:
    """The prepared step reads the model's arrays: a change made in place shows at the
    next token, as it does when the model is called."""
    model = _small_model(numpy_backend, seed=1)
    ours_cache, their_cache = model.new_cache(1), model.new_cache(1)
    logits_for = model.one_token_steps(ours_cache)
    prompt = numpy_backend.asarray(np.array([[1, 2]]))
    model(prompt, cache=ours_cache)
    model(prompt, cache=their_cache)
    weight = model.parameters()["layers.1.linear1.weight"]
    for token in (3, 4):
        ids = numpy_backend.asarray(np.array([[token]]))
        ours = np.asarray(logits_for(ids))
        theirs = np.asarray(model(ids, cache=their_cache, last_only=True))
        np.testing.assert_array_equal(ours, theirs)
        weight *= 2  # in place
    assert ours_cache.length == their_cache.length == 4


def test_one_token_steps_are_none_where_no_native_applies(numpy_backend) -> None:
    model = _small_model(numpy_backend)
    assert model.one_token_steps(model.new_cache(2)) is None  # a batch of two
    assert model.to(numpy_backend, dtype="float64").one_token_steps(model.new_cache(1)) is None
    with only(numpy_backend, None):
        assert _small_model(numpy_backend).one_token_steps(model.new_cache(1)) is None


def test_int8_weights_entered_after_preparing_go_to_the_modules(numpy_backend) -> None:
    """A step prepared outside int8_weights stands aside inside it, token by token."""
    from tinytx.quantize import int8_weights

    model = _small_model(numpy_backend)
    ours_cache, their_cache = model.new_cache(1), model.new_cache(1)
    logits_for = model.one_token_steps(ours_cache)
    ids = numpy_backend.asarray(np.array([[1]]))
    with spying() as calls, int8_weights(model):
        ours = np.asarray(logits_for(ids))
        theirs = np.asarray(model(ids, cache=their_cache, last_only=True))
    assert calls == []  # declined before the kernel
    np.testing.assert_array_equal(ours, theirs)
