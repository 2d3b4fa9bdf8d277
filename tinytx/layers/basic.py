"""The small layers: Linear, Embedding, LayerNorm, RMSNorm, FeedForward.

Names and layouts follow PyTorch (``weight`` is (out, in) in Linear), so a PyTorch
layer's ``state_dict()`` loads as it is.

Each layer's ``backward`` sits under its forward (see :mod:`tinytx.layers.module` for the
``forward_and_save`` / ``backward`` pair); the arithmetic is in :mod:`tinytx.functional`.
"""

from __future__ import annotations

import math
from typing import Any

from tinytx import functional as F
from tinytx import init
from tinytx.backends import Backend
from tinytx.layers.module import Module

Array = Any

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_BACKWARDS",
    "Embedding",
    "FeedForward",
    "LayerNorm",
    "Linear",
    "RMSNorm",
]


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

    def forward_and_save(self, x: Array) -> tuple[Array, dict[str, Array]]:
        """y = x W^T + b; saves x."""
        return self.forward(x), {"x": x}

    def backward(self, grad_y: Array, saved: dict[str, Array]) -> tuple[tuple, dict[str, Array]]:
        """dx = dy W,  dW = sum over positions of dy^T x,  db = sum over positions of dy.

        grad_y: (..., d_out) -> ((dx (..., d_in),), {"weight": (d_out, d_in), "bias": (d_out,)}).
        """
        has_bias = self.bias is not None
        grad_x, grad_weight, grad_bias = F.linear_backward(
            grad_y, saved["x"], self.weight, bias=has_bias
        )  # (..., d_in), (d_out, d_in), (d_out,) | None
        grads = {"weight": grad_weight}
        if has_bias:
            grads["bias"] = grad_bias
        return (grad_x,), grads


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
        return F.embedding(self.weight, ids)  # (..., d); checks the ids

    def check_input(self, x: Array, what: str = "input") -> None:
        # ids are integers: only the backend must match, not the float dtype.
        if not self.backend.owns(x):
            super().check_input(x, what)

    def forward_and_save(self, ids: Array) -> tuple[Array, dict[str, Array]]:
        """The lookup; saves the ids."""
        return self.forward(ids), {"ids": ids}

    def backward(self, grad_y: Array, saved: dict[str, Array]) -> tuple[tuple, dict[str, Array]]:
        """dweight[i] = sum of grad_y over the positions whose id is i (rows of repeated
        ids add up; ids that do not occur get zero). The ids get no gradient (None).

        grad_y: (..., d) -> ((None,), {"weight": (num_embeddings, d)}).
        """
        grad_weight = F.embedding_backward(grad_y, saved["ids"], self.num_embeddings)  # (n, d)
        return (None,), {"weight": grad_weight}


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

    def forward_and_save(self, x: Array) -> tuple[Array, dict[str, Array]]:
        """LayerNorm(x); saves x (the backward recomputes the mean and variance)."""
        return self.forward(x), {"x": x}

    def backward(self, grad_y: Array, saved: dict[str, Array]) -> tuple[tuple, dict[str, Array]]:
        """With x_hat = (x - mean) / sigma and g = grad_y * weight:
        dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma,
        dweight = sum over positions of grad_y * x_hat, dbias = sum over positions of grad_y.

        grad_y: (..., d) -> ((dx (..., d),), {"weight": (d,), "bias": (d,)}).
        """
        grad_x, grad_weight, grad_bias = F.layer_norm_backward(
            grad_y, saved["x"], self.weight, self.eps
        )  # (..., d), (d,), (d,)
        grads = {"weight": grad_weight}
        if self.bias is not None:
            grads["bias"] = grad_bias
        return (grad_x,), grads


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

    def forward_and_save(self, x: Array) -> tuple[Array, dict[str, Array]]:
        """RMSNorm(x); saves x."""
        return self.forward(x), {"x": x}

    def backward(self, grad_y: Array, saved: dict[str, Array]) -> tuple[tuple, dict[str, Array]]:
        """With r = sqrt(mean(x^2) + eps), x_hat = x / r and g = grad_y * weight:
        dx = (g - x_hat * mean(g * x_hat)) / r,  dweight = sum over positions of grad_y * x_hat.

        grad_y: (..., d) -> ((dx (..., d),), {"weight": (d,)}).
        """
        grad_x, grad_weight = F.rms_norm_backward(grad_y, saved["x"], self.weight, self.eps)
        return (grad_x,), {"weight": grad_weight}  # (..., d), (d,)


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

# name -> backward(grad_y, x) -> grad_x, the activation's derivative times grad_y.
ACTIVATION_BACKWARDS = {
    "relu": F.relu_backward,
    "gelu": F.gelu_backward,
    "gelu_tanh": lambda grad_y, x: F.gelu_backward(grad_y, x, approximate="tanh"),
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

    def forward_and_save(self, x: Array) -> tuple[Array, dict[str, Any]]:
        """FFN(x); saves the pre-activation and both linears' saved states."""
        pre, linear1_saved = self.linear1.forward_and_save(x)  # (..., d_ff)
        hidden = ACTIVATIONS[self.activation](pre)  # (..., d_ff)
        y, linear2_saved = self.linear2.forward_and_save(hidden)  # (..., d_model)
        return y, {"linear1": linear1_saved, "pre": pre, "linear2": linear2_saved}

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """linear2, the activation (d pre = act'(pre) * d hidden), linear1, in reverse.

        grad_y: (..., d_model) -> ((dx (..., d_model),), {"linear1.*", "linear2.*"}).
        """
        (grad_hidden,), linear2_grads = self.linear2.backward(grad_y, saved["linear2"])
        grad_pre = ACTIVATION_BACKWARDS[self.activation](grad_hidden, saved["pre"])  # (..., d_ff)
        (grad_x,), linear1_grads = self.linear1.backward(grad_pre, saved["linear1"])
        grads = self.prefix_grads("linear1", linear1_grads)
        grads.update(self.prefix_grads("linear2", linear2_grads))
        return (grad_x,), grads  # grad_x: (..., d_model)
