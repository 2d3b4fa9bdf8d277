"""``Encoder``: a stack of encoder blocks, with positions, a final norm and pooling.

    h_0 = x + positions                    (sinusoidal or learned; rotary acts inside attention)
    h_l = EncoderBlock_l(h_{l-1})          l = 1 .. n_layers
    out = norm(h_L)                        (pre-norm stacks need it; post-norm ones do not)
    pooled = sum_t m_t h_t / sum_t m_t     (mean over the real tokens, m = padding mask)

Keys as in ``nn.TransformerEncoder``: ``layers.{i}.*`` and ``norm.*``, plus ``positions.weight``
for learned positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from array_api_compat import array_namespace

from tinytx import init
from tinytx.backends import Backend
from tinytx.layers.blocks import EncoderBlock, make_norm
from tinytx.layers.module import Module
from tinytx.layers.positions import LearnedPositions, SinusoidalPositions

Array = Any

__all__ = ["Encoder", "mean_pool", "mean_pool_backward"]

POSITIONS = (None, "sinusoidal", "learned", "rotary")


def mean_pool(hidden: Array, mask: Array | None = None) -> Array:
    """Mean of the token vectors, counting only real tokens.

    hidden: (batch, seq, d); mask: a padding mask (batch, 1, 1, seq) from ``padding_mask``
    (or None: every token counts) -> (batch, d). A sequence with no real token gives zeros.
    """
    xp = array_namespace(hidden)
    if mask is None:
        return xp.mean(hidden, axis=1)  # (batch, d)
    batch, seq = hidden.shape[0], hidden.shape[1]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != seq:
        raise ValueError(
            "mean pooling needs a padding mask of shape (batch, 1, 1, seq) as made by "
            f"padding_mask(); got {tuple(mask.shape)}"
        )
    keep = xp.astype(mask[:, 0, 0, :], hidden.dtype)  # (batch or 1, seq)
    keep = xp.broadcast_to(keep, (batch, seq))[:, :, None]  # (batch, seq, 1)
    total = xp.sum(hidden * keep, axis=1)  # (batch, d)
    count = xp.sum(keep, axis=1)  # (batch, 1)
    return total / xp.maximum(count, xp.ones_like(count))  # (batch, d)


def mean_pool_backward(grad_pooled: Array, seq: int, mask: Array | None = None) -> Array:
    """Gradient of :func:`mean_pool`: each real token gets an equal share of the gradient.

    pooled = sum_t m_t h_t / n with n = max(sum_t m_t, 1), so dh_t = m_t / n * dpooled:
    padded tokens get exactly zero, and so does every token of a sequence with none real.
    grad_pooled: (batch, d); seq: the hidden states' length; mask as for mean_pool
    -> grad_hidden (batch, seq, d).
    """
    xp = array_namespace(grad_pooled)
    batch, d = grad_pooled.shape
    if mask is None:
        share = grad_pooled[:, None, :] * (1.0 / seq)  # (batch, 1, d)
        return xp.broadcast_to(share, (batch, seq, d))  # (batch, seq, d)
    keep = xp.astype(mask[:, 0, 0, :], grad_pooled.dtype)  # (batch or 1, seq)
    keep = xp.broadcast_to(keep, (batch, seq))[:, :, None]  # (batch, seq, 1)
    count = xp.sum(keep, axis=1)  # (batch, 1)
    per_token = grad_pooled / xp.maximum(count, xp.ones_like(count))  # (batch, d)  dpooled / n
    return keep * per_token[:, None, :]  # (batch, seq, d)


class Encoder(Module):
    """A stack of ``n_layers`` :class:`EncoderBlock`.

    positions: None (the stack is then permutation-equivariant), ``"sinusoidal"``,
    ``"learned"`` (table of ``max_len`` rows) or ``"rotary"``. ``final_norm`` defaults to
    ``norm_first`` (pre-norm stacks end with a norm, post-norm ones already did).
    ``pooling="mean"`` returns one vector per sequence.

    Called as ``encoder(x, *, mask=None, causal=False, return_weights=False)``:
    x: (batch, seq, d_model) -> (batch, seq, d_model), or (batch, d_model) when pooled;
    with ``return_weights=True`` also a list with each layer's (batch, heads, seq, seq).
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        activation: str = "relu",
        norm_first: bool = False,
        final_norm: bool | None = None,
        eps: float = 1e-5,
        norm: str = "layer",
        positions: str | None = None,
        max_len: int = 512,
        pooling: str | None = None,
        n_kv_heads: int | None = None,
        bias: bool = True,
        attention: str = "softmax",
        attention_options: Mapping[str, Any] | None = None,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; expected one of {POSITIONS}")
        if pooling not in (None, "mean"):
            raise ValueError(f"unknown pooling {pooling!r}; expected None or 'mean'")
        self.pooling = pooling
        gen = init.rng(seed)
        self.positions: Module | None = None
        if positions == "sinusoidal":
            self.positions = self.add_child(
                "positions", SinusoidalPositions(d_model, max_len=max_len, backend=self.backend)
            )
        elif positions == "learned":
            self.positions = self.add_child(
                "positions", LearnedPositions(max_len, d_model, backend=self.backend, seed=gen)
            )
        self.layers = [
            self.add_child(
                f"layers.{i}",
                EncoderBlock(
                    d_model,
                    n_heads,
                    d_ff,
                    activation=activation,
                    norm_first=norm_first,
                    eps=eps,
                    norm=norm,
                    n_kv_heads=n_kv_heads,
                    rotary=positions == "rotary",
                    bias=bias,
                    attention=attention,
                    attention_options=attention_options,
                    backend=self.backend,
                    seed=gen,
                ),
            )  # fmt: skip
            for i in range(n_layers)
        ]
        use_final_norm = norm_first if final_norm is None else final_norm
        self.norm = (
            self.add_child("norm", make_norm(norm, d_model, eps, self.backend))
            if use_final_norm
            else None
        )

    def forward(
        self,
        x: Array,
        *,
        mask: Array | None = None,
        causal: bool = False,
        return_weights: bool = False,
    ) -> Array | tuple[Array, list[Array]]:
        if self.positions is not None:
            x = self.positions(x)  # (batch, seq, d_model)
        all_weights = []
        for layer in self.layers:
            x = layer(x, mask=mask, causal=causal, return_weights=return_weights)
            if return_weights:
                x, weights = x
                all_weights.append(weights)  # (batch, heads, seq, seq)
        if self.norm is not None:
            x = self.norm(x)  # (batch, seq, d_model)
        if self.pooling == "mean":
            x = mean_pool(x, mask)  # (batch, d_model)
        return (x, all_weights) if return_weights else x

    def forward_and_save(
        self, x: Array, *, mask: Array | None = None, causal: bool = False
    ) -> tuple[Array, dict[str, Any]]:
        """Positions, the blocks, the final norm and pooling; saves each one's saved state."""
        saved: dict[str, Any] = {"layers": [], "mask": mask, "seq": x.shape[1]}
        if self.positions is not None:
            x, saved["positions"] = self.positions.forward_and_save(x)  # (batch, seq, d_model)
        for layer in self.layers:
            x, layer_saved = layer.forward_and_save(x, mask=mask, causal=causal)  # (b, s, d)
            saved["layers"].append(layer_saved)
        if self.norm is not None:
            x, saved["norm"] = self.norm.forward_and_save(x)  # (batch, seq, d_model)
        if self.pooling == "mean":
            x = mean_pool(x, mask)  # (batch, d_model)
        return x, saved

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """Pooling, final norm, the blocks from last to first, positions (reverse order).

        grad_y: (batch, seq, d_model), or (batch, d_model) when pooled
        -> ((dx (batch, seq, d_model),), grads keyed like ``parameters()``).
        """
        grads: dict[str, Array] = {}
        grad_x = grad_y
        if self.pooling == "mean":
            grad_x = mean_pool_backward(grad_y, saved["seq"], saved["mask"])  # (b, s, d)
        if self.norm is not None:
            (grad_x,), norm_grads = self.norm.backward(grad_x, saved["norm"])  # (b, s, d)
            grads.update(self.prefix_grads("norm", norm_grads))
        for i in reversed(range(len(self.layers))):
            (grad_x,), layer_grads = self.layers[i].backward(grad_x, saved["layers"][i])
            grads.update(self.prefix_grads(f"layers.{i}", layer_grads))  # grad_x: (b, s, d)
        if self.positions is not None:
            (grad_x, _), position_grads = self.positions.backward(grad_x, saved["positions"])
            grads.update(self.prefix_grads("positions", position_grads))
        return (grad_x,), grads  # grad_x: (batch, seq, d_model)
