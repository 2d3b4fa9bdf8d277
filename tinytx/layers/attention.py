"""Multi-head attention (Vaswani et al. 2017, section 3.2.2).

    MultiHead(X, C) = Concat(head_1, ..., head_h) W_O^T + b_O
    head_i = Attention(X W_Q,i^T, C W_K,i^T, C W_V,i^T)

with C = X for self-attention. ``Attention`` is a registered variant (``softmax`` by
default, see :mod:`tinytx.plugins`). With ``n_kv_heads < n_heads`` the keys and values
have fewer heads, each shared by a group of query heads: grouped-query attention
(Ainslie et al. 2023); ``n_kv_heads=1`` is multi-query attention (Shazeer 2019).

The projections are packed as in ``torch.nn.MultiheadAttention``: ``in_proj_weight`` holds
W_Q, W_K, W_V stacked by rows, so its state dict loads unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tinytx import functional as F
from tinytx import init
from tinytx.backends import Backend
from tinytx.functional import array_namespace
from tinytx.layers.basic import Linear
from tinytx.layers.kv_cache import LayerKVCache
from tinytx.layers.module import Module
from tinytx.layers.positions import RotaryEmbedding
from tinytx.plugins import AttentionError, get_attention

Array = Any

__all__ = ["MultiHeadAttention", "merge_heads", "split_heads"]


def split_heads(x: Array, n_heads: int) -> Array:
    """(batch, seq, heads * d_head) -> (batch, heads, seq, d_head)."""
    xp = array_namespace(x)
    batch, seq, width = x.shape
    x = xp.reshape(x, (batch, seq, n_heads, width // n_heads))  # (batch, seq, heads, d_head)
    return xp.permute_dims(x, (0, 2, 1, 3))  # (batch, heads, seq, d_head)


def merge_heads(x: Array) -> Array:
    """(batch, heads, seq, d_head) -> (batch, seq, heads * d_head)."""
    xp = array_namespace(x)
    batch, heads, seq, d_head = x.shape
    x = xp.permute_dims(x, (0, 2, 1, 3))  # (batch, seq, heads, d_head)
    return xp.reshape(x, (batch, seq, heads * d_head))  # (batch, seq, d_model)


class MultiHeadAttention(Module):
    """Multi-head (and grouped-/multi-query) attention over a registered variant.

    Parameters (PyTorch's names): ``in_proj_weight`` ((n_heads + 2 n_kv_heads) d_head,
    d_model), ``in_proj_bias``, ``out_proj.weight`` (d_model, d_model), ``out_proj.bias``.
    ``rotary=True`` rotates queries and keys by position (RoPE) before attention.

    Called as ``mha(x, context=None, *, mask=None, causal=False, return_weights=False,
    cache=None)``: x: (batch, seq_q, d_model); context: (batch, seq_k, d_model), default x;
    mask: boolean, broadcastable to (batch, heads, seq_q, seq_k)
    -> (batch, seq_q, d_model), and the weights (batch, heads, seq_q, seq_k) when asked for.
    With a :class:`~tinytx.layers.kv_cache.LayerKVCache` (self-attention only), x holds the
    *new* positions: their keys and values are appended to the cache, the queries attend to
    every cached position (seq_k = cached + seq_q), and rotary starts at the cached length.
    ``context_kv`` (cross-attention only): the context's keys and values from
    :meth:`project_context`, reused instead of projecting the context again.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        bias: bool = True,
        attention: str = "softmax",
        attention_options: Mapping[str, Any] | None = None,
        rotary: bool = False,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.d_head = d_model // n_heads
        self.d_kv = n_kv_heads * self.d_head  # width of the keys (and of the values)
        self.attention = get_attention(attention)
        self.attention_options = self.attention.resolve_options(attention_options or {})
        self.rotary = (
            self.add_child("rotary", RotaryEmbedding(self.d_head, backend=self.backend))
            if rotary
            else None
        )

        gen = init.rng(seed)
        rows = d_model + 2 * self.d_kv
        self.add_param("in_proj_weight", init.xavier_uniform(gen, (rows, d_model)))
        self.in_proj_bias = self.add_param("in_proj_bias", init.zeros((rows,))) if bias else None
        self.out_proj = self.add_child(
            "out_proj", Linear(d_model, d_model, bias=bias, backend=self.backend, seed=gen)
        )
        if bias:
            self.out_proj.add_param("bias", init.zeros((d_model,)))

    def _project(self, x: Array, start: int, stop: int) -> Array:
        """x (..., d_model) @ rows start:stop of the packed projection -> (..., stop - start)."""
        weight = self.in_proj_weight[start:stop, :]  # (stop - start, d_model)
        bias = None if self.in_proj_bias is None else self.in_proj_bias[start:stop]
        return F.linear(x, weight, bias)

    def project_context(self, context: Array) -> tuple[Array, Array]:
        """Cross-attention's keys and values of ``context``, before the heads are split.

        A decoder generating token by token attends to the same encoder output at every
        step: it computes these once per input and passes them back as ``context_kv=``.
        context: (batch, seq_k, d_model) -> k, v: (batch, seq_k, d_kv) each.
        """
        d, d_kv = self.d_model, self.d_kv
        k_flat = self._project(context, d, d + d_kv)  # (batch, seq_k, d_kv)
        v_flat = self._project(context, d + d_kv, d + 2 * d_kv)  # (batch, seq_k, d_kv)
        return k_flat, v_flat

    def forward(
        self,
        x: Array,
        context: Array | None = None,
        *,
        mask: Array | None = None,
        causal: bool = False,
        return_weights: bool = False,
        cache: LayerKVCache | None = None,
        context_kv: tuple[Array, Array] | None = None,
    ) -> Array | tuple[Array, Array]:
        if cache is not None and context is not None:
            raise ValueError("a KV cache is for self-attention; do not pass context with it")
        context = x if context is None else context
        self._check_shapes(x, context)
        d, d_kv = self.d_model, self.d_kv
        if context is x:  # self-attention: one matrix product makes q, k and v together
            qkv = self._project(x, 0, d + 2 * d_kv)  # (batch, seq, d_model + 2 d_kv)
            q_flat, k_flat, v_flat = qkv[..., :d], qkv[..., d : d + d_kv], qkv[..., d + d_kv :]
        else:
            q_flat = self._project(x, 0, d)  # (batch, seq_q, d_model)
            if context_kv is None:
                context_kv = self.project_context(context)
            k_flat, v_flat = context_kv  # (batch, seq_k, d_kv) each
        q = split_heads(q_flat, self.n_heads)  # (batch, heads, seq_q, d_head)
        k = split_heads(k_flat, self.n_kv_heads)  # (batch, heads_kv, seq_k, d_head)
        v = split_heads(v_flat, self.n_kv_heads)  # (batch, heads_kv, seq_k, d_head)
        offset = 0 if cache is None else cache.length  # positions already cached
        if self.rotary is not None:
            q = self.rotary(q, offset)  # (batch, heads, seq_q, d_head)
            k = self.rotary(k, offset)  # (batch, heads_kv, seq_k, d_head)
        if cache is not None:  # keys/values of earlier positions + these: seq_k = offset + seq_q
            k, v = cache.append(k, v)  # (batch, heads_kv, seq_k, d_head) each
        k = F.repeat_kv(k, self.n_heads)  # (batch, heads, seq_k, d_head)
        v = F.repeat_kv(v, self.n_heads)  # (batch, heads, seq_k, d_head)
        options = {"return_weights": return_weights, **self.attention_options}
        out, weights = self.attention(q, k, v, mask=mask, causal=causal, **options)
        # out: (batch, heads, seq_q, d_head); weights: (batch, heads, seq_q, seq_k) or None
        out = self.out_proj(merge_heads(out))  # (batch, seq_q, d_model)
        if not return_weights:
            return out
        if weights is None:
            raise AttentionError(
                f"attention {self.attention.name!r} does not return weights; use a variant "
                "that does (e.g. 'softmax') to look at them"
            )
        return out, weights  # weights: (batch, heads, seq_q, seq_k)

    def _check_shapes(self, x: Array, context: Array) -> None:
        for name, value in (("x", x), ("context", context)):
            if value.ndim != 3 or value.shape[-1] != self.d_model:
                raise ValueError(
                    f"MultiHeadAttention expects {name} of shape (batch, seq, {self.d_model}), "
                    f"got {tuple(value.shape)}"
                )

    # --- learning --------------------------------------------------------------------

    def forward_and_save(
        self,
        x: Array,
        context: Array | None = None,
        *,
        mask: Array | None = None,
        causal: bool = False,
    ) -> tuple[Array, dict[str, Any]]:
        """The forward (no cache); saves x, context, the heads q, k, v (k, v before their
        grouped heads are repeated), the attention's output and weights, and out_proj's saved.

        With ``context=None`` (self-attention) q, k, v come from one packed product; with a
        context (even x itself) q comes from x and k, v from the context, so the backward
        gives each its own gradient.
        """
        self._check_shapes(x, x if context is None else context)
        d, d_kv = self.d_model, self.d_kv
        if context is None:  # self-attention
            qkv = self._project(x, 0, d + 2 * d_kv)  # (batch, seq, d_model + 2 d_kv)
            q_flat, k_flat, v_flat = qkv[..., :d], qkv[..., d : d + d_kv], qkv[..., d + d_kv :]
        else:
            q_flat = self._project(x, 0, d)  # (batch, seq_q, d_model)
            kv = self._project(context, d, d + 2 * d_kv)  # (batch, seq_k, 2 d_kv)
            k_flat, v_flat = kv[..., :d_kv], kv[..., d_kv:]  # (batch, seq_k, d_kv) each
        q = split_heads(q_flat, self.n_heads)  # (batch, heads, seq_q, d_head)
        k = split_heads(k_flat, self.n_kv_heads)  # (batch, heads_kv, seq_k, d_head)
        v = split_heads(v_flat, self.n_kv_heads)  # (batch, heads_kv, seq_k, d_head)
        rotary_saved = None
        if self.rotary is not None:
            q, rotary_saved = self.rotary.forward_and_save(q)  # (batch, heads, seq_q, d_head)
            k, _ = self.rotary.forward_and_save(k)  # (batch, heads_kv, seq_k, d_head)
        k_all = F.repeat_kv(k, self.n_heads)  # (batch, heads, seq_k, d_head)
        v_all = F.repeat_kv(v, self.n_heads)  # (batch, heads, seq_k, d_head)
        options = self.attention_options
        out, weights = self.attention(q, k_all, v_all, mask=mask, causal=causal, **options)
        # out: (batch, heads, seq_q, d_head); weights: (batch, heads, seq_q, seq_k) or None
        y, out_proj_saved = self.out_proj.forward_and_save(merge_heads(out))  # (b, seq_q, d)
        saved = {
            "x": x, "context": context, "q": q, "k": k, "v": v, "out": out,
            "weights": weights, "mask": mask, "causal": causal, "rotary": rotary_saved,
            "out_proj": out_proj_saved,
        }  # fmt: skip
        return y, saved

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """Back through out_proj, the attention variant, rotary, and the projections.

            d out          = split_heads(d merged),      d merged from out_proj's backward
            dq, dk, dv     = the variant's backward       (k, v repeated to all heads)
            dk, dv         = summed over each group of query heads (repeat_kv_backward)
            dq, dk         = rotated back (rotary only)
            d in_proj, dx  = linear_backward of [dq dk dv] (self) or of dq / [dk dv] (cross)

        grad_y: (batch, seq_q, d_model) -> ((dx, dcontext or None), {"in_proj_weight",
        "in_proj_bias", "out_proj.weight", "out_proj.bias"}).
        """
        xp = array_namespace(grad_y)
        q, k, v = saved["q"], saved["k"], saved["v"]
        (grad_merged,), out_proj_grads = self.out_proj.backward(grad_y, saved["out_proj"])
        grad_out = split_heads(grad_merged, self.n_heads)  # (batch, heads, seq_q, d_head)
        k_all = F.repeat_kv(k, self.n_heads)  # (batch, heads, seq_k, d_head)
        v_all = F.repeat_kv(v, self.n_heads)  # (batch, heads, seq_k, d_head)
        out, weights, options = saved["out"], saved["weights"], self.attention_options
        mask, causal = saved["mask"], saved["causal"]
        grad_q, grad_k, grad_v = self.attention.backward(
            grad_out, q, k_all, v_all, out, weights, mask=mask, causal=causal, **options
        )  # (batch, heads, seq_q, d_head), (batch, heads, seq_k, d_head) x 2
        grad_k = F.repeat_kv_backward(grad_k, self.n_kv_heads)  # (batch, heads_kv, seq_k, d_head)
        grad_v = F.repeat_kv_backward(grad_v, self.n_kv_heads)  # (batch, heads_kv, seq_k, d_head)
        if self.rotary is not None:
            (grad_q, _), _ = self.rotary.backward(grad_q, saved["rotary"])  # rotated back
            (grad_k, _), _ = self.rotary.backward(grad_k, saved["rotary"])
        grad_q = merge_heads(grad_q)  # (batch, seq_q, d_model)
        grad_kv = xp.concat([merge_heads(grad_k), merge_heads(grad_v)], axis=-1)  # (b, s_k, 2 d_kv)
        has_bias = self.in_proj_bias is not None
        if saved["context"] is None:  # self-attention: one packed product made q, k, v
            grad_qkv = xp.concat([grad_q, grad_kv], axis=-1)  # (batch, seq, d_model + 2 d_kv)
            grad_x, grad_weight, grad_bias = F.linear_backward(
                grad_qkv, saved["x"], self.in_proj_weight, bias=has_bias
            )  # (batch, seq, d_model), (rows, d_model), (rows,)
            grad_context = None
        else:  # q from x, k and v from the context: the packed rows' gradients concatenated
            d = self.d_model
            grad_x, grad_wq, grad_bq = F.linear_backward(
                grad_q, saved["x"], self.in_proj_weight[:d, :], bias=has_bias
            )  # (batch, seq_q, d_model), (d_model, d_model), (d_model,)
            grad_context, grad_wkv, grad_bkv = F.linear_backward(
                grad_kv, saved["context"], self.in_proj_weight[d:, :], bias=has_bias
            )  # (batch, seq_k, d_model), (2 d_kv, d_model), (2 d_kv,)
            grad_weight = xp.concat([grad_wq, grad_wkv], axis=0)  # (rows, d_model)
            grad_bias = xp.concat([grad_bq, grad_bkv], axis=0) if has_bias else None
        grads = {"in_proj_weight": grad_weight}
        if has_bias:
            grads["in_proj_bias"] = grad_bias
        grads.update(self.prefix_grads("out_proj", out_proj_grads))
        return (grad_x, grad_context), grads
