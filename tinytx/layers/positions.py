"""Positional encodings: attention alone cannot tell token order (it is permutation-
equivariant), so position is added to the tokens or rotated into the queries and keys.

- :class:`SinusoidalPositions`: fixed sines and cosines added to x (Vaswani et al. 2017, 3.5).
- :class:`LearnedPositions`: a trained table added to x (BERT, GPT-2).
- :class:`RotaryEmbedding`: rotates each (q, k) pair of features by a position-dependent
  angle, so q . k depends on the relative position only (Su et al. 2021, RoFormer).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx import init
from tinytx.backends import Backend
from tinytx.layers.module import Module

Array = Any

__all__ = ["LearnedPositions", "RotaryEmbedding", "SinusoidalPositions", "sinusoidal_table"]


def _check_room(seq: int, offset: int, max_len: int | None) -> None:
    if max_len is not None and offset + seq > max_len:
        raise ValueError(
            f"positions {offset}..{offset + seq - 1} exceed the maximum length {max_len}"
        )


def sinusoidal_table(
    seq: int, d: int, *, xp: Any, device: Any, dtype: Any, offset: int = 0
) -> Array:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    -> (seq, d) for positions offset .. offset + seq - 1; d must be even.
    """
    half = d // 2
    pos = xp.arange(offset, offset + seq, dtype=dtype, device=device)  # (seq,)
    i = xp.arange(half, dtype=dtype, device=device)  # (d/2,)
    inv_freq = xp.exp(i * (-2.0 * math.log(10000.0) / d))  # (d/2,)  10000^(-2i/d)
    angles = pos[:, None] * inv_freq[None, :]  # (seq, d/2)
    pairs = xp.stack([xp.sin(angles), xp.cos(angles)], axis=-1)  # (seq, d/2, 2)
    return xp.reshape(pairs, (seq, d))  # (seq, d)  sin, cos interleaved


class SinusoidalPositions(Module):
    """x + PE[offset : offset + seq], the fixed encoding of the original Transformer.

    No parameters. x: (batch, seq, d_model) -> (batch, seq, d_model).
    """

    def __init__(
        self, d_model: int, *, max_len: int | None = None, backend: str | Backend | None = None
    ) -> None:
        super().__init__(backend)
        if d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
        self.d_model, self.max_len = d_model, max_len

    def forward(self, x: Array, offset: int = 0) -> Array:
        xp = array_namespace(x)
        seq = x.shape[-2]
        _check_room(seq, offset, self.max_len)
        table = sinusoidal_table(
            seq, self.d_model, xp=xp, device=device_of(x), dtype=x.dtype, offset=offset
        )  # (seq, d_model)
        return x + table  # (batch, seq, d_model)

    def forward_and_save(self, x: Array, offset: int = 0) -> tuple[Array, dict[str, Any]]:
        """x + PE; saves nothing (the table is a constant)."""
        return self.forward(x, offset), {}

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """Adding a constant passes the gradient through: dx = dy; ``offset`` gets None."""
        return (grad_y, None), {}


class LearnedPositions(Module):
    """x + weight[offset : offset + seq], a learned table (max_len, d_model) drawn N(0, 0.02^2).

    x: (batch, seq, d_model) -> (batch, seq, d_model).
    """

    def __init__(
        self,
        max_len: int,
        d_model: int,
        *,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        self.max_len, self.d_model = max_len, d_model
        self.add_param("weight", init.normal(init.rng(seed), (max_len, d_model), 0.02))

    def forward(self, x: Array, offset: int = 0) -> Array:
        seq = x.shape[-2]
        _check_room(seq, offset, self.max_len)
        return x + self.weight[offset : offset + seq, :]  # (batch, seq, d_model)

    def forward_and_save(self, x: Array, offset: int = 0) -> tuple[Array, dict[str, Any]]:
        """x + weight[offset : offset + seq]; saves the offset."""
        return self.forward(x, offset), {"offset": offset}

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """dx = dy;  dweight[offset + t] = sum over the batch of dy[:, t]; other rows get 0.

        grad_y: (batch, seq, d_model) -> ((dx, None), {"weight": (max_len, d_model)}).
        """
        xp = array_namespace(grad_y)
        offset, seq = saved["offset"], grad_y.shape[-2]
        rows = xp.sum(xp.reshape(grad_y, (-1, seq, self.d_model)), axis=0)  # (seq, d_model)
        grad_weight = xp.zeros_like(self.weight)  # (max_len, d_model)
        grad_weight[offset : offset + seq, :] = rows
        return (grad_y, None), {"weight": grad_weight}


class RotaryEmbedding(Module):
    """Rotary position embedding (RoPE, Su et al. 2021), applied to queries and keys.

    Feature pairs (x_i, x_{i + d/2}) of the token at position p are rotated by the angle
    p * theta_i, theta_i = base^(-2i/d) (the "rotate half" layout of GPT-NeoX and LLaMA):

        x'_i       = x_i cos(p theta_i) - x_{i+d/2} sin(p theta_i)
        x'_{i+d/2} = x_{i+d/2} cos(p theta_i) + x_i sin(p theta_i)

    Then q'_m . k'_n depends only on m - n. No parameters.
    x: (batch, heads, seq, d_head) -> same shape; ``offset`` is the first position.
    """

    def __init__(
        self, d_head: int, *, base: float = 10000.0, backend: str | Backend | None = None
    ) -> None:
        super().__init__(backend)
        if d_head % 2:
            raise ValueError(f"rotary embedding needs an even head width, got {d_head}")
        self.d_head, self.base = d_head, float(base)

    def forward(self, x: Array, offset: int = 0) -> Array:
        return self._rotate(x, offset, sign=1.0)  # (batch, heads, seq, d_head)

    def forward_and_save(self, x: Array, offset: int = 0) -> tuple[Array, dict[str, Any]]:
        """The rotation; saves the offset (a rotation needs nothing else to be undone)."""
        return self._rotate(x, offset, sign=1.0), {"offset": offset}

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """A rotation R is orthogonal, so its vector-Jacobian product is R^T = R^-1: rotate
        the gradient back by -p theta_i.  grad_y: (batch, heads, seq, d_head) -> ((dx, None), {}).
        """
        return (self._rotate(grad_y, saved["offset"], sign=-1.0), None), {}

    def _rotate(self, x: Array, offset: int, sign: float) -> Array:
        """Rotate the pairs by sign * p * theta_i (sign -1 undoes the rotation)."""
        xp = array_namespace(x)
        seq, d = x.shape[-2], x.shape[-1]
        if d != self.d_head:
            raise ValueError(f"RotaryEmbedding expects head width {self.d_head}, got {d}")
        half = d // 2
        device = device_of(x)
        pos = xp.arange(offset, offset + seq, dtype=x.dtype, device=device)  # (seq,)
        i = xp.arange(half, dtype=x.dtype, device=device)  # (d/2,)
        theta = xp.exp(i * (-2.0 * math.log(self.base) / d))  # (d/2,)
        angles = pos[:, None] * theta[None, :]  # (seq, d/2)
        cos, sin = xp.cos(angles), sign * xp.sin(angles)  # (seq, d/2) each
        x1, x2 = x[..., :half], x[..., half:]  # (batch, heads, seq, d/2) each
        rotated = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        return xp.concat(rotated, axis=-1)  # (batch, heads, seq, d_head)
