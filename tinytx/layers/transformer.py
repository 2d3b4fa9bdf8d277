"""``Transformer``: the paper's encoder–decoder stack (Vaswani et al. 2017, figure 1).

    memory = norm_e(EncoderBlock_N( ... EncoderBlock_1(src)))          the encoder
    out    = norm_d(DecoderBlock_M( ... DecoderBlock_1(tgt, memory)))  the decoder

Each encoder block lets every source position attend to every (real) source position.
Each decoder block lets target position t attend to target positions 0..t (causal
self-attention: the decoder never sees the future it must predict), then to the whole
memory (cross-attention: "where in the source is the information for this output?"),
then runs its feed-forward network.

This is ``torch.nn.Transformer`` with ``batch_first=True``: the same keys
(``encoder.layers.{i}.*``, ``encoder.norm.*``, ``decoder.layers.{i}.*`` with
``multihead_attn.*`` for cross-attention, ``decoder.norm.*``), so its state dict loads
as it is. Like torch's, it always ends both stacks with a LayerNorm, also when the blocks
are post-norm (``norm_first=False``, the paper's arrangement, where that final norm is a
second normalisation of an already normalised output).

Padding: ``src_lengths[b]`` real source positions are followed by padding, which no
encoder query and no cross-attention query may attend to; ``tgt_lengths[b]`` does the
same for the keys of the decoder's self-attention. The outputs at padded positions are
computed (they attend to real positions) but mean nothing; a loss should ignore them.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

from tinytx import init
from tinytx.backends import Backend
from tinytx.layers.blocks import DecoderBlock, make_norm
from tinytx.layers.encoder import Encoder
from tinytx.layers.kv_cache import KVCache
from tinytx.layers.masks import padding_mask
from tinytx.layers.module import Module

Array = Any
Lengths = Sequence[int] | Array | None

__all__ = ["Transformer", "TransformerDecoder", "check_lengths"]


def check_lengths(lengths: Lengths, batch: int, seq: int, name: str) -> list[int] | None:
    """``lengths`` as a list of ints in [0, seq], one per sequence, or a one-line ValueError.

    lengths: (batch,) ints (a list or an integer array), or None (no padding).
    """
    if lengths is None:
        return None
    if is_array_api_obj(lengths):
        xp = array_namespace(lengths)
        if lengths.ndim != 1 or not xp.isdtype(lengths.dtype, "integral"):
            raise ValueError(
                f"{name} must be 1-D (batch,) integers, got dtype {lengths.dtype} and shape "
                f"{tuple(lengths.shape)}"
            )
        values = [int(n) for n in lengths]
    else:
        values = list(lengths)
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in values):
            raise ValueError(f"{name} must be ints, got {values!r}")
        values = [int(n) for n in values]
    if len(values) != batch:
        raise ValueError(f"{name} needs one length per sequence ({batch}), got {len(values)}")
    bad = [n for n in values if n < 0 or n > seq]
    if bad:
        raise ValueError(
            f"{name} must lie in [0, {seq}] (the padded sequence length), got {bad[0]}"
        )
    return values


class TransformerDecoder(Module):
    """A stack of :class:`DecoderBlock` with cross-attention, then a final norm.

    Keys as in ``nn.TransformerDecoder``: ``layers.{i}.*`` and ``norm.*``.

    Called as ``decoder(x, memory, *, mask=None, memory_mask=None, cache=None,
    return_weights=False)``: x: (batch, T, d_model) (with a cache: only the new
    positions); memory: (batch, S, d_model); mask: boolean, broadcastable to
    (batch, heads, T, cached + T), combined with the causal mask; memory_mask:
    broadcastable to (batch, heads, T, S) -> (batch, T, d_model), and with
    ``return_weights=True`` also one dict per layer with ``"self"`` and ``"cross"`` weights.
    ``memory_kv``: per layer, the cross-attention's keys and values of the memory from
    ``layers[i].multihead_attn.project_context(memory)``, computed once when decoding
    token by token.
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        norm_first: bool = False,
        activation: str = "relu",
        eps: float = 1e-5,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        gen = init.rng(seed)
        self.layers = [
            self.add_child(
                f"layers.{i}",
                DecoderBlock(
                    d_model,
                    n_heads,
                    d_ff,
                    cross_attention=True,
                    activation=activation,
                    norm_first=norm_first,
                    eps=eps,
                    backend=self.backend,
                    seed=gen,
                ),
            )  # fmt: skip
            for i in range(n_layers)
        ]
        self.norm = self.add_child("norm", make_norm("layer", d_model, eps, self.backend))

    def forward(
        self,
        x: Array,
        memory: Array,
        *,
        mask: Array | None = None,
        memory_mask: Array | None = None,
        cache: KVCache | None = None,
        memory_kv: Sequence[tuple[Array, Array]] | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, list[dict[str, Array]]]:
        all_weights = []
        for i, layer in enumerate(self.layers):
            x = layer(
                x, memory, mask=mask, memory_mask=memory_mask, causal=True,
                cache=None if cache is None else cache[i],
                memory_kv=None if memory_kv is None else memory_kv[i],
                return_weights=return_weights,
            )  # fmt: skip
            if return_weights:
                x, weights = x
                all_weights.append(weights)  # {"self": (b, h, T, T), "cross": (b, h, T, S)}
        x = self.norm(x)  # (batch, T, d_model)
        return (x, all_weights) if return_weights else x

    def forward_and_save(
        self,
        x: Array,
        memory: Array,
        *,
        mask: Array | None = None,
        memory_mask: Array | None = None,
    ) -> tuple[Array, dict[str, Any]]:
        """The forward (no cache); saves every block's and the final norm's saved state."""
        blocks_saved = []
        for layer in self.layers:
            x, saved = layer.forward_and_save(
                x, memory, mask=mask, memory_mask=memory_mask, causal=True
            )  # (batch, T, d_model)
            blocks_saved.append(saved)
        x, norm_saved = self.norm.forward_and_save(x)  # (batch, T, d_model)
        return x, {"blocks": blocks_saved, "norm": norm_saved}

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """The final norm's backward, then each block's in reverse order. Every block reads
        the same memory, so the memory's gradient is the sum of the blocks' (the chain rule
        adds up every path from the memory to the loss):

            d memory = sum over blocks l of d memory_l

        grad_y: (batch, T, d_model) -> ((dx (batch, T, d_model), dmemory (batch, S,
        d_model)), grads keyed like ``parameters()``).
        """
        (grad_x,), norm_grads = self.norm.backward(grad_y, saved["norm"])  # (batch, T, d)
        grads = self.prefix_grads("norm", norm_grads)
        grad_memory = None
        for i in reversed(range(len(self.layers))):
            (grad_x, grad_memory_i), block_grads = self.layers[i].backward(
                grad_x, saved["blocks"][i]
            )  # (batch, T, d_model), (batch, S, d_model)
            grad_memory = grad_memory_i if grad_memory is None else grad_memory + grad_memory_i
            grads.update(self.prefix_grads(f"layers.{i}", block_grads))
        return (grad_x, grad_memory), grads


class Transformer(Module):
    """The encoder–decoder of "Attention Is All You Need", ``torch.nn.Transformer``'s twin.

    src (batch, S, d_model), tgt (batch, T, d_model), both already embedded (tokens and
    positions) -> (batch, T, d_model): row t is what the decoder knows when it predicts
    target token t + 1 from tgt[:, :t+1] and the whole source.

    ``norm_first=False`` is the paper's post-norm, ``True`` pre-norm (see
    :mod:`tinytx.layers.blocks`); ``activation`` is the feed-forward's, ``"relu"`` (the
    paper's) or ``"gelu"``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_encoder_layers: int,
        n_decoder_layers: int,
        d_ff: int,
        *,
        norm_first: bool = False,
        activation: str = "relu",
        eps: float = 1e-5,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        gen = init.rng(seed)
        self.d_model, self.n_heads = d_model, n_heads
        # nn.Transformer ends its encoder with a LayerNorm whatever norm_first says.
        self.encoder = self.add_child("encoder", Encoder(
            n_encoder_layers, d_model, n_heads, d_ff, activation=activation,
            norm_first=norm_first, final_norm=True, eps=eps, backend=self.backend, seed=gen,
        ))  # fmt: skip
        self.decoder = self.add_child("decoder", TransformerDecoder(
            n_decoder_layers, d_model, n_heads, d_ff, norm_first=norm_first,
            activation=activation, eps=eps, backend=self.backend, seed=gen,
        ))  # fmt: skip

    # --- masks -----------------------------------------------------------------------

    def _embedded(self, x: Array, name: str) -> None:
        if x.ndim != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(
                f"Transformer expects {name} of shape (batch, seq >= 1, {self.d_model}), "
                f"got {tuple(x.shape)}"
            )

    def source_mask(self, src_lengths: Lengths, batch: int, seq: int) -> Array | None:
        """The keys a query may read in the source: (batch, 1, 1, S) boolean, or None."""
        values = check_lengths(src_lengths, batch, seq, "src_lengths")
        return None if values is None else padding_mask(values, seq, backend=self.backend)

    def target_mask(self, tgt_lengths: Lengths, batch: int, seq: int) -> Array | None:
        """The target keys a query may read, padding only (the decoder adds the causal
        mask): (batch, 1, 1, T) boolean, or None."""
        values = check_lengths(tgt_lengths, batch, seq, "tgt_lengths")
        return None if values is None else padding_mask(values, seq, backend=self.backend)

    @staticmethod
    def _same_batch(src: Array, tgt: Array) -> None:
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"src and tgt must hold the same number of sequences, got {src.shape[0]} "
                f"and {tgt.shape[0]}"
            )

    # --- the two halves ----------------------------------------------------------------

    def encode(
        self, src: Array, *, src_lengths: Lengths = None, return_weights: bool = False
    ) -> Array | tuple[Array, list[Array]]:
        """The memory: src (batch, S, d_model) -> (batch, S, d_model); with
        ``return_weights=True`` also each layer's self-attention (batch, heads, S, S)."""
        self._embedded(src, "src")
        mask = self.source_mask(src_lengths, src.shape[0], src.shape[1])  # (b, 1, 1, S)
        return self.encoder(src, mask=mask, return_weights=return_weights)

    def decode(
        self,
        tgt: Array,
        memory: Array,
        *,
        src_lengths: Lengths = None,
        tgt_lengths: Lengths = None,
        cache: KVCache | None = None,
        memory_kv: Sequence[tuple[Array, Array]] | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, list[dict[str, Array]]]:
        """tgt (batch, T, d_model), memory (batch, S, d_model) -> (batch, T, d_model).

        With a ``cache`` (from :meth:`new_cache`), tgt holds only the new positions and
        the earlier ones' keys and values come from the cache; ``tgt_lengths`` then counts
        every position so far. ``memory_kv``: the cross-attention keys and values (see
        :class:`TransformerDecoder`). ``return_weights=True`` also gives each layer's ``"self"``
        (batch, heads, T, cached + T) and ``"cross"`` (batch, heads, T, S) weights.
        """
        self._embedded(tgt, "tgt")
        self._embedded(memory, "memory")
        if memory.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"tgt and memory must hold the same number of sequences, got {tgt.shape[0]} "
                f"and {memory.shape[0]}"
            )
        batch, seen = tgt.shape[0], tgt.shape[1] + (0 if cache is None else cache.length)
        memory_mask = self.source_mask(src_lengths, batch, memory.shape[1])  # (b, 1, 1, S)
        mask = self.target_mask(tgt_lengths, batch, seen)  # (b, 1, 1, cached + T)
        return self.decoder(
            tgt, memory, mask=mask, memory_mask=memory_mask, cache=cache, memory_kv=memory_kv,
            return_weights=return_weights,
        )  # fmt: skip

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty key/value cache for the decoder's self-attention: ``batch`` sequences
        of up to ``max_len`` target positions, on this module's backend and dtype."""
        return KVCache(
            len(self.decoder.layers), batch, self.n_heads, self.d_model // self.n_heads,
            max_len, backend=self.backend, dtype=self.dtype,
        )  # fmt: skip

    def forward(
        self,
        src: Array,
        tgt: Array,
        *,
        src_lengths: Lengths = None,
        tgt_lengths: Lengths = None,
    ) -> Array:
        self._same_batch(src, tgt)
        memory = self.encode(src, src_lengths=src_lengths)  # (batch, S, d_model)
        return self.decode(tgt, memory, src_lengths=src_lengths, tgt_lengths=tgt_lengths)

    # --- learning ----------------------------------------------------------------------

    def forward_and_save(
        self,
        src: Array,
        tgt: Array,
        *,
        src_lengths: Lengths = None,
        tgt_lengths: Lengths = None,
    ) -> tuple[Array, dict[str, Any]]:
        """The forward, keeping what the backward needs: the encoder's and the decoder's
        saved states. src (batch, S, d_model), tgt (batch, T, d_model) -> (batch, T, d_model)."""
        self._embedded(src, "src")
        self._embedded(tgt, "tgt")
        self._same_batch(src, tgt)
        batch = src.shape[0]
        memory_mask = self.source_mask(src_lengths, batch, src.shape[1])  # (b, 1, 1, S)
        mask = self.target_mask(tgt_lengths, batch, tgt.shape[1])  # (b, 1, 1, T)
        memory, encoder_saved = self.encoder.forward_and_save(src, mask=memory_mask)  # (b, S, d)
        out, decoder_saved = self.decoder.forward_and_save(
            tgt, memory, mask=mask, memory_mask=memory_mask
        )  # (batch, T, d_model)
        return out, {"encoder": encoder_saved, "decoder": decoder_saved}

    def backward(self, grad_y: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """The decoder's backward gives d tgt and d memory; the encoder's turns d memory
        into d src (the memory is the encoder's output: the only path from src to the loss).

        grad_y: (batch, T, d_model) -> ((dsrc (batch, S, d_model), dtgt (batch, T,
        d_model)), grads keyed like ``parameters()``).
        """
        (grad_tgt, grad_memory), decoder_grads = self.decoder.backward(grad_y, saved["decoder"])
        (grad_src, *_), encoder_grads = self.encoder.backward(grad_memory, saved["encoder"])
        grads = self.prefix_grads("encoder", encoder_grads)
        grads.update(self.prefix_grads("decoder", decoder_grads))
        return (grad_src, grad_tgt), grads
