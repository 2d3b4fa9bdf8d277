"""The small layers: Linear, Embedding, LayerNorm, RMSNorm, FeedForward.

Names and layouts follow PyTorch (``weight`` is (out, in) in Linear), so a PyTorch
layer's ``state_dict()`` loads as it is.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

from tinytx import functional as F
from tinytx import init
from tinytx.backends import Backend
from tinytx.layers.module import Module

Array = Any

__all__ = ["ACTIVATIONS", "Embedding", "FeedForward", "LayerNorm", "Linear", "RMSNorm"]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Linear(Module):
    """y = x W^T + b.

    W: (d_out, d_in), b: (d_out,), drawn U(-1/sqrt(d_in), 1/sqrt(d_in)) as in PyTorch.
    x: (..., d_in) -> (..., d_out).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        bias: bool = True,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        self.d_in = _positive_int(d_in, "d_in")
        self.d_out = _positive_int(d_out, "d_out")
        gen = init.rng(seed)
        bound = 1.0 / math.sqrt(d_in)
        self.add_param("weight", init.uniform(gen, (d_out, d_in), bound))  # (d_out, d_in)
        self.bias = self.add_param("bias", init.uniform(gen, (d_out,), bound)) if bias else None

    def forward(self, x: Array) -> Array:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"Linear expects (..., {self.d_in}), got {tuple(x.shape)}")
        return F.linear(x, self.weight, self.bias)  # (..., d_out)


class Embedding(Module):
    """A lookup table: token id i -> row i of ``weight`` (num_embeddings, d), drawn N(0, 1).

    ids: integer array (...) -> (..., d).
    """

    def __init__(
        self,
        num_embeddings: int,
        d: int,
        *,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        self.num_embeddings = _positive_int(num_embeddings, "num_embeddings")
        self.d = _positive_int(d, "d")
        self.add_param("weight", init.normal(init.rng(seed), (num_embeddings, d)))  # (n, d)

    def forward(self, ids: Array) -> Array:
        xp = array_namespace(ids)
        if not xp.isdtype(ids.dtype, "integral"):
            raise TypeError(f"Embedding expects integer token ids, got dtype {ids.dtype}")
        if ids.size and (int(xp.min(ids)) < 0 or int(xp.max(ids)) >= self.num_embeddings):
            raise ValueError(
                f"token ids must lie in [0, {self.num_embeddings}), got values from "
                f"{int(xp.min(ids))} to {int(xp.max(ids))}"
            )
        flat = xp.reshape(ids, (-1,))  # (n,)
        rows = xp.take(self.weight, flat, axis=0)  # (n, d)
        return xp.reshape(rows, (*ids.shape, self.d))  # (..., d)

    def check_input(self, x: Array, what: str = "input") -> None:
        # ids are integers: only the backend must match, not the float dtype.
        if not self.backend.owns(x):
            super().check_input(x, what)


class LayerNorm(Module):
    """LayerNorm(x) = (x - mean) / sqrt(var + eps) * weight + bias over the last axis.

    weight starts at ones, bias at zeros. x: (..., d) -> (..., d).
    """

    def __init__(
        self,
        d: int,
        *,
        eps: float = 1e-5,
        bias: bool = True,
        backend: str | Backend | None = None,
    ) -> None:
        super().__init__(backend)
        self.d, self.eps = _positive_int(d, "d"), float(eps)
        self.add_param("weight", init.ones((d,)))  # (d,)
        self.bias = self.add_param("bias", init.zeros((d,))) if bias else None

    def forward(self, x: Array) -> Array:
        return F.layer_norm(x, self.weight, self.bias, self.eps)  # (..., d)


class RMSNorm(Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight over the last axis (weight: ones).

    x: (..., d) -> (..., d).
    """

    def __init__(self, d: int, *, eps: float = 1e-6, backend: str | Backend | None = None) -> None:
        super().__init__(backend)
        self.d, self.eps = _positive_int(d, "d"), float(eps)
        self.add_param("weight", init.ones((d,)))  # (d,)

    def forward(self, x: Array) -> Array:
        return F.rms_norm(x, self.weight, self.eps)  # (..., d)


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class FeedForward(Module):
    """The position-wise feed-forward network: FFN(x) = act(x W1^T + b1) W2^T + b2.

    Vaswani et al. 2017, eq. 2 (with ReLU); BERT and GPT-2 use GELU.
    Children ``linear1`` (d_model -> d_ff) and ``linear2`` (d_ff -> d_model), PyTorch's names.
    x: (..., d_model) -> (..., d_model).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "relu",
        bias: bool = True,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of: {', '.join(ACTIVATIONS)}"
            )
        self.activation = activation
        gen = init.rng(seed)
        self.linear1 = self.add_child(
            "linear1", Linear(d_model, d_ff, bias=bias, backend=self.backend, seed=gen)
        )
        self.linear2 = self.add_child(
            "linear2", Linear(d_ff, d_model, bias=bias, backend=self.backend, seed=gen)
        )

    def forward(self, x: Array) -> Array:
        hidden = ACTIVATIONS[self.activation](self.linear1(x))  # (..., d_ff)
        return self.linear2(hidden)  # (..., d_model)
