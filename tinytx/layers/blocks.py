"""Transformer blocks: attention and a feed-forward network, each wrapped in a residual.

Post-norm (the paper, BERT; ``norm_first=False``): normalise *after* adding the residual,

    x = LayerNorm(x + Sublayer(x))                     (Vaswani et al. 2017, section 5.4)

Pre-norm (GPT-2 and most models since; ``norm_first=True``): normalise the sublayer's
*input* and leave the residual path untouched, which trains more stably when deep,

    x = x + Sublayer(LayerNorm(x))                     (Xiong et al. 2020)

The Annotated Transformer's code is pre-norm while the paper is post-norm; here it is a
flag. Parameter names follow ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tinytx import init
from tinytx.backends import Backend
from tinytx.layers.attention import MultiHeadAttention
from tinytx.layers.basic import FeedForward, LayerNorm, RMSNorm
from tinytx.layers.kv_cache import LayerKVCache
from tinytx.layers.module import Module

Array = Any

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "make_norm",
    "one_token_through_blocks",
    "prepare_one_token_steps",
    "residual_backward",
    "residual_forward_and_save",
]


def residual_forward_and_save(
    x: Array, norm: Module, sublayer: Module, norm_first: bool, *args: Any, **kwargs: Any
) -> tuple[Array, dict[str, Any]]:
    """One residual step, keeping what its backward needs.

    pre-norm:  y = x + sublayer(norm(x), *args, **kwargs)
    post-norm: y = norm(x + sublayer(x, *args, **kwargs))
    x: (batch, seq, d_model) -> (batch, seq, d_model), and the norm's and sublayer's saved.
    """
    if norm_first:
        h, norm_saved = norm.forward_and_save(x)  # (batch, seq, d_model)
        out, sublayer_saved = sublayer.forward_and_save(h, *args, **kwargs)
        return x + out, {"norm": norm_saved, "sublayer": sublayer_saved}
    out, sublayer_saved = sublayer.forward_and_save(x, *args, **kwargs)  # (batch, seq, d_model)
    y, norm_saved = norm.forward_and_save(x + out)  # (batch, seq, d_model)
    return y, {"norm": norm_saved, "sublayer": sublayer_saved}


def residual_backward(
    grad_y: Array, saved: dict[str, Any], norm: Module, sublayer: Module, norm_first: bool
) -> tuple[Array, tuple, dict[str, Array], dict[str, Array]]:
    """Backward of :func:`residual_forward_and_save`. The residual x + f(...) sends the
    gradient both ways: straight on to x and through f; the two add up at x.

    pre-norm:  dx = dy + norm^T(sublayer^T(dy))
    post-norm: dz = norm^T(dy);  dx = dz + sublayer^T(dz)
    (f^T: that module's backward). grad_y: (batch, seq, d_model) -> (dx, the sublayer's
    other input grads (e.g. d memory), the norm's param grads, the sublayer's param grads).
    """
    if norm_first:
        (grad_h, *grad_others), sublayer_grads = sublayer.backward(grad_y, saved["sublayer"])
        (grad_through_norm,), norm_grads = norm.backward(grad_h, saved["norm"])
        grad_x = grad_y + grad_through_norm  # (batch, seq, d_model)
    else:
        (grad_z,), norm_grads = norm.backward(grad_y, saved["norm"])  # z = x + sublayer(x)
        (grad_through_sublayer, *grad_others), sublayer_grads = sublayer.backward(
            grad_z, saved["sublayer"]
        )
        grad_x = grad_z + grad_through_sublayer  # (batch, seq, d_model)
    return grad_x, tuple(grad_others), norm_grads, sublayer_grads


def make_norm(kind: str, d_model: int, eps: float, backend: Backend) -> Module:
    """``"layer"`` -> LayerNorm, ``"rms"`` -> RMSNorm."""
    if kind == "layer":
        return LayerNorm(d_model, eps=eps, backend=backend)
    if kind == "rms":
        return RMSNorm(d_model, eps=eps, backend=backend)
    raise ValueError(f"unknown norm {kind!r}; expected 'layer' or 'rms'")


class EncoderBlock(Module):
    """Self-attention then feed-forward, each with a residual and a norm.

    post-norm: x = norm1(x + SelfAttn(x));  x = norm2(x + FFN(x))
    pre-norm:  x = x + SelfAttn(norm1(x));  x = x + FFN(norm2(x))

    Keys as in ``nn.TransformerEncoderLayer``: ``self_attn.*``, ``linear1.*``, ``linear2.*``,
    ``norm1.*``, ``norm2.*``.
    x: (batch, seq, d_model) -> (batch, seq, d_model); with ``return_weights=True`` also
    the attention weights (batch, heads, seq, seq).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        activation: str = "relu",
        norm_first: bool = False,
        eps: float = 1e-5,
        norm: str = "layer",
        n_kv_heads: int | None = None,
        rotary: bool = False,
        bias: bool = True,
        attention: str = "softmax",
        attention_options: Mapping[str, Any] | None = None,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        self.norm_first = bool(norm_first)
        gen = init.rng(seed)
        self.self_attn = self.add_child("self_attn", MultiHeadAttention(
            d_model, n_heads, n_kv_heads=n_kv_heads, bias=bias, attention=attention,
            attention_options=attention_options, rotary=rotary, backend=self.backend, seed=gen,
        ))  # fmt: skip
        # The feed-forward's keys sit at the block level (linear1.*, linear2.*), as in PyTorch.
        self.ff = self.add_child("ff", FeedForward(
            d_model, d_ff, activation=activation, bias=bias, backend=self.backend, seed=gen
        ), prefix="")  # fmt: skip
        self.norm1 = self.add_child("norm1", make_norm(norm, d_model, eps, self.backend))
        self.norm2 = self.add_child("norm2", make_norm(norm, d_model, eps, self.backend))

    def forward(
        self,
        x: Array,
        *,
        mask: Array | None = None,
        causal: bool = False,
        return_weights: bool = False,
    ) -> Array | tuple[Array, Array]:
        def self_attention(h: Array) -> Array:  # (batch, seq, d_model) -> same
            return self.self_attn(h, mask=mask, causal=causal, return_weights=return_weights)

        weights = None
        if self.norm_first:
            attended = self_attention(self.norm1(x))
            if return_weights:
                attended, weights = attended
            x = x + attended  # (batch, seq, d_model)
            x = x + self.ff(self.norm2(x))  # (batch, seq, d_model)
        else:
            attended = self_attention(x)
            if return_weights:
                attended, weights = attended
            x = self.norm1(x + attended)  # (batch, seq, d_model)
            x = self.norm2(x + self.ff(x))  # (batch, seq, d_model)
        return (x, weights) if return_weights else x

    def forward_and_save(
        self, x: Array, *, mask: Array | None = None, causal: bool = False
    ) -> tuple[Array, dict[str, Any]]:
        """The two residual steps; saves each one's (norm and sublayer) saved state."""
        x, attn_saved = residual_forward_and_save(
            x, self.norm1, self.self_attn, self.norm_first, mask=mask, causal=causal
        )  # (batch, seq, d_model)
        x, ff_saved = residual_forward_and_save(x, self.norm2, self.ff, self.norm_first)
        return x, {"attn": attn_saved, "ff": ff_saved}  # x: (batch, seq, d_model)

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """The feed-forward step's backward, then the attention step's (reverse order).

        grad_y: (batch, seq, d_model) -> ((dx,), grads keyed like ``parameters()``).
        """
        grad_x, _, norm2_grads, ff_grads = residual_backward(
            grad_y, saved["ff"], self.norm2, self.ff, self.norm_first
        )  # (batch, seq, d_model)
        grad_x, _, norm1_grads, attn_grads = residual_backward(
            grad_x, saved["attn"], self.norm1, self.self_attn, self.norm_first
        )  # (batch, seq, d_model)
        grads = self.prefix_grads("self_attn", attn_grads)
        grads.update(self.prefix_grads("ff", ff_grads))
        grads.update(self.prefix_grads("norm1", norm1_grads))
        grads.update(self.prefix_grads("norm2", norm2_grads))
        return (grad_x,), grads


class DecoderBlock(Module):
    """Causal self-attention, optional cross-attention to an encoder's output, feed-forward.

    post-norm: x = norm1(x + SelfAttn(x, causal));  x = norm2(x + CrossAttn(x, memory));
               x = norm3(x + FFN(x))
    pre-norm:  x = x + SelfAttn(norm1(x), causal);  x = x + CrossAttn(norm2(x), memory);
               x = x + FFN(norm3(x))

    With ``cross_attention=False`` (decoder-only models such as GPT) the middle step and
    its norm are absent and the feed-forward's norm is ``norm2``. Keys as in
    ``nn.TransformerDecoderLayer``: ``self_attn.*``, ``multihead_attn.*``, ``linear1.*``,
    ``linear2.*``, ``norm1.*``, ``norm2.*``, ``norm3.*``.

    Called as ``block(x, memory=None, *, mask=None, memory_mask=None, causal=True,
    return_weights=False, cache=None)``: x: (batch, seq, d_model); memory: (batch, seq_m,
    d_model) -> (batch, seq, d_model), with ``return_weights=True`` also a dict with the
    ``"self"`` (batch, heads, seq, seq) and ``"cross"`` (batch, heads, seq, seq_m) weights.
    ``cache`` (a :class:`~tinytx.layers.kv_cache.LayerKVCache`) goes to the self-attention:
    x then holds only the new positions (see :class:`MultiHeadAttention`). ``memory_kv``
    goes to the cross-attention: the memory's keys and values from its
    ``project_context``, computed once per input when decoding token by token.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        cross_attention: bool = True,
        activation: str = "relu",
        norm_first: bool = False,
        eps: float = 1e-5,
        norm: str = "layer",
        n_kv_heads: int | None = None,
        rotary: bool = False,
        bias: bool = True,
        attention: str = "softmax",
        attention_options: Mapping[str, Any] | None = None,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        self.norm_first = bool(norm_first)
        gen = init.rng(seed)

        def attention_layer() -> MultiHeadAttention:
            return MultiHeadAttention(
                d_model, n_heads, n_kv_heads=n_kv_heads, bias=bias, attention=attention,
                attention_options=attention_options, rotary=rotary, backend=self.backend,
                seed=gen,
            )  # fmt: skip

        self.self_attn = self.add_child("self_attn", attention_layer())
        self.multihead_attn = (
            self.add_child("multihead_attn", attention_layer()) if cross_attention else None
        )
        self.ff = self.add_child("ff", FeedForward(
            d_model, d_ff, activation=activation, bias=bias, backend=self.backend, seed=gen
        ), prefix="")  # fmt: skip
        n_norms = 3 if cross_attention else 2
        self.norms = [
            self.add_child(f"norm{i}", make_norm(norm, d_model, eps, self.backend))
            for i in range(1, n_norms + 1)
        ]

    def forward(
        self,
        x: Array,
        memory: Array | None = None,
        *,
        mask: Array | None = None,
        memory_mask: Array | None = None,
        causal: bool = True,
        return_weights: bool = False,
        cache: LayerKVCache | None = None,
        memory_kv: tuple[Array, Array] | None = None,
    ) -> Array | tuple[Array, dict[str, Array]]:
        self._check_memory(memory)
        if cache is not None and mask is None and not return_weights:
            y = self._one_token_at_once(x, cache)  # a fused native, where there is one
            if y is not None:
                return y  # (1, 1, d_model)
        weights: dict[str, Array] = {}

        def residual(x: Array, norm: Module, sublayer: Any) -> Array:
            if self.norm_first:
                return x + sublayer(norm(x))  # (batch, seq, d_model)
            return norm(x + sublayer(x))  # (batch, seq, d_model)

        def attend(name: str, layer: MultiHeadAttention, **kwargs: Any) -> Any:
            def sublayer(h: Array) -> Array:
                result = layer(h, return_weights=return_weights, **kwargs)
                if not return_weights:
                    return result
                out, weights[name] = result
                return out

            return sublayer

        self_attn = attend("self", self.self_attn, mask=mask, causal=causal, cache=cache)
        x = residual(x, self.norms[0], self_attn)  # (batch, seq, d_model)
        if self.multihead_attn is not None:
            cross = attend(
                "cross", self.multihead_attn, context=memory, mask=memory_mask,
                context_kv=memory_kv,
            )  # fmt: skip
            x = residual(x, self.norms[1], cross)  # (batch, seq, d_model)
        x = residual(x, self.norms[-1], self.ff)  # (batch, seq, d_model)
        return (x, weights) if return_weights else x

    def _one_token_at_once(self, x: Array, cache: LayerKVCache) -> Array | None:
        """The forward below for one new token (x: (1, 1, d_model)) of a pre-norm block
        with LayerNorms, biases, softmax attention and no rotary, computed by the backend's
        ``decoder_stack`` native as a stack of one block (numpy with numba: one
        compiled function), or None (the modules below run): the same arithmetic without
        some 100 Python calls per token, which matter when decoding reads every weight
        once per token. (A model runs all its blocks in one call: see
        :func:`one_token_through_blocks`.)
        """
        y, blocks_run = one_token_through_blocks([self], x, [cache])
        return y if blocks_run == 1 else None  # (1, 1, d_model)

    def _step_weights(self, cache: LayerKVCache) -> tuple[Any, ...] | None:
        """What a decode-step native needs besides x and the cache: (norm1, in_proj,
        out_proj, norm2, linear1, linear2, activation, scale), norms as (weight, bias,
        eps) and products as (weight, bias); or None where this block is not the kind the
        natives compute (see :meth:`_one_token_at_once`)."""
        attn, ff = self.self_attn, self.ff
        if not self.norm_first:
            return None
        if cache.key_buffer.shape[0] != 1:  # another batch: the modules raise the error
            return None
        norms_ok = all(type(n) is LayerNorm and n.bias is not None for n in self.norms)
        if not norms_ok or self.multihead_attn is not None or attn.rotary is not None:
            return None
        if attn.in_proj_bias is None or ff.linear1.bias is None or ff.linear2.bias is None:
            return None
        if attn.attention.name != "softmax" or set(attn.attention_options) - {"scale"}:
            return None
        scale = attn.attention_options.get("scale") or 1.0 / math.sqrt(attn.d_head)
        norm1, norm2 = self.norms
        return (
            (norm1.weight, norm1.bias, norm1.eps),
            (attn.in_proj_weight, attn.in_proj_bias),
            (attn.out_proj.weight, attn.out_proj.bias),
            (norm2.weight, norm2.bias, norm2.eps),
            (ff.linear1.weight, ff.linear1.bias),
            (ff.linear2.weight, ff.linear2.bias),
            ff.activation,
            scale,
        )

    def _check_memory(self, memory: Array | None) -> None:
        if (memory is None) != (self.multihead_attn is None):
            raise ValueError(
                "this DecoderBlock was built with cross_attention="
                f"{self.multihead_attn is not None}; pass memory if and only if it has "
                "cross-attention"
            )

    def forward_and_save(
        self,
        x: Array,
        memory: Array | None = None,
        *,
        mask: Array | None = None,
        memory_mask: Array | None = None,
        causal: bool = True,
    ) -> tuple[Array, dict[str, Any]]:
        """The residual steps (no cache); saves each one's saved state."""
        self._check_memory(memory)
        saved: dict[str, Any] = {}
        x, saved["self"] = residual_forward_and_save(
            x, self.norms[0], self.self_attn, self.norm_first, mask=mask, causal=causal
        )  # (batch, seq, d_model)
        if self.multihead_attn is not None:
            x, saved["cross"] = residual_forward_and_save(
                x, self.norms[1], self.multihead_attn, self.norm_first, memory, mask=memory_mask
            )  # (batch, seq, d_model): queries from x, keys and values from memory
        x, saved["ff"] = residual_forward_and_save(x, self.norms[-1], self.ff, self.norm_first)
        return x, saved  # x: (batch, seq, d_model)

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """Feed-forward, cross-attention, self-attention steps' backwards, in that order.
        The memory's gradient comes from the cross-attention's keys and values only.

        grad_y: (batch, seq, d_model) -> ((dx, dmemory or None), grads keyed like
        ``parameters()``); dmemory: (batch, seq_m, d_model).
        """
        n = len(self.norms)
        grad_x, _, norm_grads, ff_grads = residual_backward(
            grad_y, saved["ff"], self.norms[-1], self.ff, self.norm_first
        )  # (batch, seq, d_model)
        grads = self.prefix_grads("ff", ff_grads)
        grads.update(self.prefix_grads(f"norm{n}", norm_grads))
        grad_memory = None
        if self.multihead_attn is not None:
            grad_x, (grad_memory,), norm_grads, cross_grads = residual_backward(
                grad_x, saved["cross"], self.norms[1], self.multihead_attn, self.norm_first
            )  # (batch, seq, d_model), (batch, seq_m, d_model)
            grads.update(self.prefix_grads("multihead_attn", cross_grads))
            grads.update(self.prefix_grads("norm2", norm_grads))
        grad_x, _, norm_grads, self_grads = residual_backward(
            grad_x, saved["self"], self.norms[0], self.self_attn, self.norm_first
        )  # (batch, seq, d_model)
        grads.update(self.prefix_grads("self_attn", self_grads))
        grads.update(self.prefix_grads("norm1", norm_grads))
        return (grad_x, grad_memory), grads


def one_token_through_blocks(
    blocks: Sequence[DecoderBlock],
    x: Array,
    caches: Sequence[LayerKVCache],
    head: tuple[Any, ...] | None = None,
) -> tuple[Array, int]:
    """One new token through a stack of decoder blocks, and then the model's head, in one
    call of the backend's ``decoder_stack`` native, where every block is the kind
    :meth:`DecoderBlock._one_token_at_once` computes (numpy with numba: one compiled
    function, its threads working through all the blocks' products without returning
    to Python). The same arithmetic as calling the blocks in turn, within rounding.

    x: (1, 1, d_model); caches[i]: block i's cache; head: the final LayerNorm's weight,
    bias and eps and the output layer's weight (vocab, d_model) and bias or None, or
    None for no head -> (y, n): n stages ran, the blocks and then the head. y is the
    logits (1, 1, vocab) where the head ran, else the output of the first n blocks
    (1, 1, d_model), whose caches now hold this token. n = 0 (y is x) where the native
    does not apply; the caller runs the rest, block by block.
    """
    if not blocks or tuple(x.shape) != (1, 1, blocks[0].self_attn.d_model):
        return x, 0  # not one token: nothing to prepare
    one_token = prepare_one_token_steps(blocks, caches, head)
    return (x, 0) if one_token is None else one_token(x)


def prepare_one_token_steps(
    blocks: Sequence[DecoderBlock],
    caches: Sequence[LayerKVCache],
    head: tuple[Any, ...] | None = None,
) -> Callable[[Array], tuple[Array, int]] | None:
    """:func:`one_token_through_blocks` for token after token with the same blocks and
    caches, as generation runs: the native's arguments (every block's weights, the
    caches' buffers) are checked and gathered once, here, not at every token. Returns
    ``one_token(x)``: x (1, 1, d_model) -> (y, n) as :func:`one_token_through_blocks`;
    or None where the native does not apply. ``one_token`` reads the weights the blocks
    hold now: arrays changed in place show, new arrays put in their place do not.
    """
    native = blocks[0].backend.natives.get("decoder_stack") if blocks else None
    if native is None:
        return None
    weights = [block._step_weights(cache) for block, cache in zip(blocks, caches, strict=True)]
    if any(w is None for w in weights):
        return None
    keys = [cache.key_buffer[0, ...] for cache in caches]  # (heads_kv, max_len, d_head) each
    values = [cache.value_buffer[0, ...] for cache in caches]
    step = native(keys, values, weights, head)
    if step is NotImplemented:
        return None
    d_model = blocks[0].self_attn.d_model

    def one_token(x: Array) -> tuple[Array, int]:
        position = caches[0].length
        if tuple(x.shape) != (1, 1, d_model) or any(c.length != position for c in caches):
            return x, 0
        result = step(x[0, 0, :], position)
        if result is NotImplemented:
            return x, 0
        y, stages = result  # (vocab,) or (d_model,), stages run
        for cache in caches[:stages]:
            cache.length += 1  # the kernel wrote this position's keys and values
        return y[None, None, :], stages  # (1, 1, vocab) or (1, 1, d_model)

    return one_token
