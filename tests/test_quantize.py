"""Weight-only int8: the definition's rounding bound, and the fused kernels (numba when
installed, the tiled NumPy fallback always) against the definition."""

from __future__ import annotations

import numpy as np
import pytest

import tinytx
from tinytx.backends import int8_kernels
from tinytx.quantize import dequantize_int8, int8_linear, int8_weights, quantize_int8


def _weight(rows: int = 40, cols: int = 24, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[3] = 0  # an all-zero row: scale 1, Q 0
    return w


def test_quantize_rounds_each_weight_within_half_a_step(backend: tinytx.Backend) -> None:
    host = _weight()
    q, scale = quantize_int8(backend.asarray(host))
    q, scale = backend.to_numpy(q), backend.to_numpy(scale)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (40,)
    assert np.all(np.abs(q.astype(np.int32)) <= 127)
    # |W - s Q| <= s / 2, plus the float32 rounding of W / s and of s Q (a few eps |W|)
    eps = np.finfo(np.float32).eps
    error = np.abs(dequantize_int8(q, scale) - host)
    assert np.all(error <= scale[:, None] * (0.5 + 2 * eps) + 2 * eps * np.abs(host))
    assert np.all(q[3] == 0) and scale[3] == 1


def test_quantize_refuses_a_vector(backend: tinytx.Backend) -> None:
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_int8(backend.asarray(np.ones(4, dtype=np.float32)))


def _bound(x: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """|kernel - definition| for s * sum_i x_i Q_i: both sums of d_in float32 terms,
    each within d_in eps sum |x Q| of the exact one, then times s (one more rounding)."""
    eps = np.finfo(np.float32).eps
    magnitude = np.abs(x).astype(np.float64) @ np.abs(q.astype(np.float64)).T
    return 2 * (x.shape[-1] + 2) * eps * magnitude * scale


@pytest.mark.parametrize("kernel", ["numba", "numpy"])
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_kernels_equal_the_definition(numpy_backend, monkeypatch, kernel, rows) -> None:
    if kernel == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(int8_kernels, "_compile", lambda: None)
    monkeypatch.setattr(int8_kernels, "_TILE_BYTES", 256)  # several tiles even here
    q, scale = quantize_int8(_weight())
    x = np.random.default_rng(1).standard_normal((rows, 24)).astype(np.float32)
    bias = np.random.default_rng(2).standard_normal(40).astype(np.float32)
    reference = int8_linear(x, q, scale, bias)
    fused = int8_kernels.int8_matmul(x, q, scale, bias, threads=2)
    assert fused.shape == (rows, 40) and fused.dtype == np.float32
    assert np.all(np.abs(fused - reference) <= _bound(x, q, scale) + 4 * np.finfo(np.float32).eps)


def test_int8_weights_apply_inside_the_block_only(numpy_backend) -> None:
    """A small GPT: inside the block its products read the int8 copies (the logits change
    by the quantization error, not by more), after it the float32 weights again."""
    from tinytx.models.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_heads=2, n_layers=2)
    model = GPT(config, seed=0)
    ids = numpy_backend.asarray(np.array([[1, 2, 3, 4]]))
    before = numpy_backend.to_numpy(model(ids))
    quantized = int8_weights(model)
    with quantized:
        inside = numpy_backend.to_numpy(model(ids))
    after = numpy_backend.to_numpy(model(ids))
    assert np.array_equal(before, after)
    assert not np.array_equal(before, inside)
    assert np.max(np.abs(inside - before)) < 0.05 * np.max(np.abs(before))
    assert set(quantized.quantized) == {n for n, p in model.parameters().items() if p.ndim == 2}


def test_int8_weights_refuse_other_backends() -> None:
    from tinytx.models.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=10, context_length=8, d_model=8, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match="numpy backend"):
        int8_weights(GPT(config, seed=0, backend="strict"))


def test_every_product_with_a_weight_reads_int8_inside_the_block(numpy_backend, monkeypatch):
    """Linear layers, the tied head and the attention's packed in_proj rows (a view of a
    quantized weight) all take the int8 kernel inside the block."""
    from tinytx.backends import numpy_natives
    from tinytx.models.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_heads=2, n_layers=2)
    model = GPT(config, seed=0)
    calls = {"linear": 0, "int8": 0}
    linear, int8_matmul = numpy_natives.linear, int8_kernels.int8_matmul

    def counting_linear(*args, **kwargs):
        calls["linear"] += 1
        return linear(*args, **kwargs)

    def counting_int8(*args, **kwargs):
        calls["int8"] += 1
        return int8_matmul(*args, **kwargs)

    monkeypatch.setitem(numpy_backend.natives, "linear", counting_linear)
    monkeypatch.setattr(int8_kernels, "int8_matmul", counting_int8)
    with int8_weights(model):
        model(numpy_backend.asarray(np.array([[1, 2, 3]])))
    assert calls["linear"] > 0 and calls["int8"] == calls["linear"]
