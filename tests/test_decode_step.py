"""The fused decode step of a pre-norm block (the numpy backend's ``decoder_block_step``,
backends/matvec_kernels.py's ``block_step``) against the block's modules.

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


@contextlib.contextmanager
def spying() -> Iterator[list[bool]]:
    """Inside: whether each call of the kernel's wrapper ran the fused step (True) or
    declined (False), in order."""
    seen: list[bool] = []
    original = matvec_kernels.block_step

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out is not None)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tinytx.backends.numpy_natives.block_step", spy)
        yield seen


@pytest.fixture
def calls() -> Iterator[list[bool]]:
    with spying() as seen:
        yield seen


def generate(model: GPT, ids: np.ndarray, prompt: int, fused: bool) -> tuple[np.ndarray, list]:
    """Logits of positions prompt-1 .. end, token by token after the prompt, and the
    caches' keys and values; with the fused step or with the modules only."""
    backend = model.backend
    saved = backend.natives.pop("decoder_block_step") if not fused else None
    try:
        cache = model.new_cache(1)
        logits = [model(backend.asarray(ids[:, :prompt]), cache=cache)[:, -1]]
        for t in range(prompt, ids.shape[1]):
            logits.append(model(backend.asarray(ids[:, t : t + 1]), cache=cache)[:, -1])
        kv = [(np.asarray(layer.keys), np.asarray(layer.values)) for layer in cache.layers]
        return np.concatenate([np.asarray(a) for a in logits]), kv
    finally:
        if saved is not None:
            backend.natives["decoder_block_step"] = saved


@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(
    seed=st.integers(0, 2**32 - 1),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 2)]),
    activation=st.sampled_from(["gelu_tanh", "gelu", "relu"]),
    prompt=st.integers(1, 4),
)
def test_the_fused_step_rounds_like_the_modules(numpy_backend, seed, heads, activation,
                                                prompt) -> None:  # fmt: skip
    n_heads, n_kv_heads = heads
    config = GPTConfig(
        vocab_size=11, context_length=12, d_model=16, n_heads=n_heads, n_kv_heads=n_kv_heads,
        n_layers=2, activation=activation,
    )  # fmt: skip
    model = GPT(config, seed=seed % 1000).to(numpy_backend)
    ids = np.random.default_rng(seed).integers(0, 11, (1, 9))
    with spying() as calls:
        fused, fused_kv = generate(model, ids, prompt, fused=True)
    assert calls and all(calls)  # every new token went through the fused step
    modules, modules_kv = generate(model, ids, prompt, fused=False)
    reference, reference_kv = generate(model.to(numpy_backend, dtype="float64"), ids, prompt, True)

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
def test_other_blocks_and_inputs_go_to_the_modules(numpy_backend, calls, change) -> None:
    """Not of the fused kind: the modules run, and the numbers are theirs bit for bit."""
    kwargs = {k: v for k, v in change.items() if k in ("positions", "norm", "bias")}
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1, **kwargs)
    model = GPT(config, attention=change.get("attention", "softmax"), seed=3)
    model = model.to(numpy_backend, dtype=change.get("dtype", "float32"))
    batch = change.get("batch", 1)
    ids = np.random.default_rng(0).integers(0, 11, (batch, 4))
    steps = []
    for fused in (True, False):
        backend = model.backend
        saved = None if fused else backend.natives.pop("decoder_block_step")
        try:
            cache = model.new_cache(batch)
            model(backend.asarray(ids[:, :2]), cache=cache)
            steps.append(np.asarray(model(backend.asarray(ids[:, 2:3]), cache=cache)))
        finally:
            if saved is not None:
                backend.natives["decoder_block_step"] = saved
    assert not any(calls)
    np.testing.assert_array_equal(steps[0], steps[1])


def test_a_full_cache_is_the_modules_error(numpy_backend, calls) -> None:
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    cache = model.new_cache(1, max_len=3)
    model(numpy_backend.asarray(np.array([[1, 2]])), cache=cache)
    model(numpy_backend.asarray(np.array([[3]])), cache=cache)  # fused: position 2 of 3
    assert calls == [True] and cache.length == 3
    with pytest.raises(ValueError, match="(KV cache is full|context)"):
        model(numpy_backend.asarray(np.array([[4]])), cache=cache)


def test_numba_off_runs_the_modules(numpy_backend, calls, monkeypatch) -> None:
    monkeypatch.setenv("TINYTX_NUMBA", "0")
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    cache = model.new_cache(1)
    model(numpy_backend.asarray(np.array([[1, 2]])), cache=cache)
    model(numpy_backend.asarray(np.array([[3]])), cache=cache)
    assert calls == [False] and cache.length == 3
    assert isinstance(tinytx.get_backend("numpy").natives["decoder_block_step"], object)


def test_a_nan_weight_gives_nan_as_the_modules_do(numpy_backend, calls) -> None:
    """IEEE arithmetic in the compiled step: NaN flows through (no error, no silent
    number) to the second LayerNorm, whose NaN row goes to the definition, as every
    LayerNorm kernel's does: the step declines and the modules (writing the cache's
    position again) give NaN, which generation reports."""
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    weight = model.parameters()["layers.0.norm1.weight"]
    weight[3] = float("nan")
    ids = np.array([[1, 2, 3]])
    fused, _ = generate(model, ids, 2, fused=True)
    modules, _ = generate(model, ids, 2, fused=False)
    assert calls == [False]  # declined at the second LayerNorm
    assert np.isnan(fused).all() and np.isnan(modules).all()


def test_int8_weights_go_to_the_modules(numpy_backend, calls) -> None:
    """Inside int8_weights the products read the int8 copies: the fused step (which reads
    the float32 weights) stands aside, so quantized decoding stays quantized."""
    from tinytx.quantize import int8_weights

    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    ids = np.array([[1, 2, 3]])
    with int8_weights(model):
        quantized, _ = generate(model, ids, 2, fused=True)
    assert calls == []  # the native declined before the kernel
    full, _ = generate(model, ids, 2, fused=True)
    assert np.max(np.abs(quantized - full)) > 0  # the int8 copies were read


def test_a_nan_key_in_the_cache_gives_nan(numpy_backend, calls) -> None:
    """A NaN score (here from a NaN cached key; the values stay finite) reaches the
    attention's output as NaN, as in the modules' softmax (the compiled exp, which turns
    NaN into a number, is never asked for one); the second LayerNorm's NaN row then
    sends the step to the modules, which give NaN too. Were the NaN lost, the step
    would return finite numbers."""
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_heads=2, n_layers=1)
    model = GPT(config, seed=0).to(numpy_backend)
    outs = []
    for fused in (True, False):
        saved = None if fused else numpy_backend.natives.pop("decoder_block_step")
        try:
            cache = model.new_cache(1)
            model(numpy_backend.asarray(np.array([[1, 2]])), cache=cache)
            cache.layers[0].key_buffer[0, 0, 0, 0] = float("nan")  # head 0, position 0
            outs.append(np.asarray(model(numpy_backend.asarray(np.array([[3]])), cache=cache)))
        finally:
            if saved is not None:
                numpy_backend.natives["decoder_block_step"] = saved
    assert calls == [False]  # declined at the second LayerNorm
    assert np.isnan(outs[0]).all() and np.isnan(outs[1]).all()
