"""Weight-only int8 quantization: fewer bytes read per generated token.

Why it speeds up decoding: generating one token multiplies one vector by every weight
matrix of the model, so each weight is read from memory once and used for one
multiply-add. The processor waits on memory, not on arithmetic: the step cannot take
less than (bytes of weights) / (memory bandwidth). Storing each weight in 1 byte instead
of 4 reads 4x fewer bytes, at the price of rounding every weight to one of 255 levels.

Per output channel (row o of W, d_out x d_in), symmetric:

    s_o = max_i |W[o, i]| / 127            the row's scale (float32)
    Q[o, i] = round(W[o, i] / s_o)         int8 in [-127, 127]
    W[o, i] ~ s_o Q[o, i]                  error at most s_o / 2 per weight

and the product, with the scale applied after the sum (it is the same for a whole row):

    y[..., o] = s_o * sum_i x[..., i] Q[o, i] + b[o]

:func:`int8_linear` is that definition in array-API code (it converts Q to float
first, so it reads more, not less). On NumPy a fused kernel does the work: it reads Q in
tiles, converts each tile to float in registers and multiplies at once, so only the
int8 bytes cross the memory bus. It is compiled by numba (``pip install 'tinytx[int8]'``);
without numba the NumPy backend uses a tiled NumPy version, correct but slower than the
float32 product (NumPy has no int8 matrix product).

Use it for a block of code; the model's float32 weights are left as they are, and the
int8 copies are used only inside the ``with`` (NumPy backend):

    >>> with int8_weights(model):                          # doctest: +SKIP
    ...     for step in stream(model, prompt, 32): ...
"""

from __future__ import annotations

import contextlib
from typing import Any

from array_api_compat import array_namespace

__all__ = ["Int8Weights", "dequantize_int8", "int8_linear", "int8_weights", "quantize_int8"]

Array = Any
LEVELS = 127  # int8 values used: -127..127 (symmetric, so -x quantizes to -Q(x))


def quantize_int8(weight: Array) -> tuple[Array, Array]:
    """Per-row symmetric int8: W (d_out, d_in) float -> (Q int8 (d_out, d_in), s (d_out,)).

    s_o = max_i |W[o, i]| / 127 (1 for an all-zero row), Q = round(W / s), so that
    |W - s Q| <= s / 2 elementwise.
    """
    xp = array_namespace(weight)
    if weight.ndim != 2:
        raise ValueError(f"quantize_int8 expects a 2-D weight, got shape {tuple(weight.shape)}")
    largest = xp.max(xp.abs(weight), axis=1)  # (d_out,)
    scale = xp.where(largest > 0, largest / LEVELS, 1.0)  # (d_out,)
    scale = xp.astype(scale, weight.dtype)  # (d_out,)
    levels = xp.round(weight / scale[:, None])  # (d_out, d_in) in [-127, 127]
    return xp.astype(xp.clip(levels, -LEVELS, LEVELS), xp.int8), scale


def dequantize_int8(q: Array, scale: Array) -> Array:
    """W' = s Q: the float weight the int8 one stands for.  (d_out, d_in), (d_out,) -> float."""
    xp = array_namespace(q, scale)
    return xp.astype(q, scale.dtype) * scale[:, None]  # (d_out, d_in)


def int8_linear(x: Array, q: Array, scale: Array, bias: Array | None = None) -> Array:
    """y = s * (x Q^T) + b, the definition the fused kernels are checked against.

    x: (..., d_in) float; Q: (d_out, d_in) int8; s, b: (d_out,) -> (..., d_out).
    """
    xp = array_namespace(x, q, scale)
    y = xp.matmul(x, xp.matrix_transpose(xp.astype(q, x.dtype)))  # (..., d_out)
    y = y * scale  # (..., d_out): each column's scale, after the sum
    return y if bias is None else y + bias


def _two_d_weights(model: Any) -> dict[str, Array]:
    """The model's weight matrices: the 2-D parameters (biases and norms are 1-D)."""
    return {name: p for name, p in model.parameters().items() if p.ndim == 2}


class Int8Weights:
    """The int8 copies (:func:`quantize_int8`) of a model's weight matrices (its 2-D
    parameters: linear layers, attention projections, a tied output head), made once.
    Inside ``with`` it, every product with one of those weights reads its int8 copy
    through the NumPy backend's fused kernel; the float32 weights are untouched and used
    again after the block (and the embedding lookup reads float32 rows: a few KB a token).
    The same object can be entered again and again. NumPy backend only.

    ``quantized``: {name: (Q, s)}; ``nbytes``: the bytes of Q and s together.
    """

    def __init__(self, model: Any) -> None:
        backend = getattr(model, "backend", None)
        if backend is None or backend.name != "numpy":
            name = getattr(backend, "name", "unknown")
            raise ValueError(f"int8 weights need a model on the numpy backend, got {name!r}")
        weights = _two_d_weights(model)
        self.quantized = {name: quantize_int8(w) for name, w in weights.items()}
        self.nbytes = sum(q.nbytes + s.nbytes for q, s in self.quantized.values())
        self._table = {id(weights[n]): (weights[n], q, s) for n, (q, s) in self.quantized.items()}
        self._scopes: list[contextlib.AbstractContextManager[None]] = []

    def __enter__(self) -> Int8Weights:
        from tinytx.backends import numpy_natives

        scope = numpy_natives.use_int8_weights(self._table)
        scope.__enter__()
        self._scopes.append(scope)
        return self

    def __exit__(self, *exc: object) -> None:
        self._scopes.pop().__exit__(*exc)


def int8_weights(model: Any) -> Int8Weights:
    """Weight-only int8 for ``model`` (see :class:`Int8Weights`): ``with int8_weights(m): ...``.

    Raises ValueError for a model that is not on the numpy backend.
    """
    return Int8Weights(model)
