"""GPT: a decoder-only language model (Radford et al. 2018, 2019), built from tinytx.layers.

    h_0    = E[ids] + P[0 .. seq-1]            token embedding + learned positions
    h_l    = DecoderBlock_l(h_{l-1})           l = 1 .. n_layers, pre-norm, causal:
             a = h + SelfAttn(LN_1(h))         (each position sees itself and earlier ones)
             h = a + FFN(LN_2(a))
    logits = LN_f(h_L) E^T                     final norm, output head (tied to E by default)

``model(ids)`` maps int token ids (batch, seq) to logits (batch, seq, vocab): row t holds
the scores of the token that follows ids[:, :t+1]. With ``cache=`` (a
:class:`~tinytx.layers.kv_cache.KVCache`) the ids are only the *new* tokens, and each layer
reads the earlier positions' keys and values from the cache (see :mod:`tinytx.generate`).

:func:`load_gpt2` reads Hugging Face GPT-2 folders (config.json + model.safetensors); GPT-2's
Conv1D layout is transposed in one place, :func:`conv1d_to_linear`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from array_api_compat import array_namespace

from tinytx import functional as F
from tinytx import init
from tinytx.backends import Backend, resolve_backend
from tinytx.layers.basic import ACTIVATIONS, Embedding, LayerNorm, Linear
from tinytx.layers.blocks import (
    DecoderBlock,
    make_norm,
    one_token_through_blocks,
    prepare_one_token_steps,
)
from tinytx.layers.kv_cache import KVCache
from tinytx.layers.module import Module, StateDictError
from tinytx.layers.positions import LearnedPositions

Array = Any

__all__ = [
    "GPT",
    "GPTConfig",
    "conv1d_to_linear",
    "gpt2_config",
    "gpt2_config_dict",
    "gpt2_state_dict",
    "gpt2_tensors",
    "load_gpt2",
    "save_gpt2",
]

POSITIONS = ("learned", "rotary", "none")


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT. The defaults are GPT-2 small (124M parameters).

    vocab_size, context_length (the most positions a sequence may have), d_model, n_heads,
    n_layers; n_kv_heads (None = n_heads; fewer = grouped-query attention); d_ff (None =
    4 d_model); norm ``"layer"`` or ``"rms"``; activation ``"gelu_tanh"`` (GPT-2's),
    ``"gelu"`` or ``"relu"``; positions ``"learned"`` (GPT-2), ``"rotary"`` or ``"none"``;
    tied_head: the output head reuses the token embedding (logits = h E^T); bias: biases in
    the projections; eps: the norms' epsilon.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    n_kv_heads: int | None = None
    d_ff: int | None = None
    norm: str = "layer"
    activation: str = "gelu_tanh"
    positions: str = "learned"
    tied_head: bool = True
    bias: bool = True
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_heads", "n_layers"):
            _positive(getattr(self, name), name)
        if self.n_kv_heads is not None:
            _positive(self.n_kv_heads, "n_kv_heads")
        if self.d_ff is not None:
            _positive(self.d_ff, "d_ff")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GPTConfig: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"GPTConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.kv_heads})"
            )
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"GPTConfig: norm must be 'layer' or 'rms', got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig: activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(
                f"GPTConfig: positions must be one of {', '.join(POSITIONS)}, "
                f"got {self.positions!r}"
            )
        if self.positions == "rotary" and self.d_head % 2:
            raise ValueError(
                f"GPTConfig: rotary positions need an even head width, not {self.d_head}"
            )

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when that is None."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def ff_width(self) -> int:
        """Width of the feed-forward's hidden layer: ``d_ff``, or 4 d_model."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff


class GPT(Module):
    """A decoder-only transformer language model.

    Keys: ``token_embedding.weight`` (vocab, d_model), ``position_embedding.weight``
    (context, d_model) with learned positions, ``layers.{i}.*`` (a
    :class:`~tinytx.layers.DecoderBlock` without cross-attention: ``self_attn.*``,
    ``linear1.*``, ``linear2.*``, ``norm1.*``, ``norm2.*``), ``norm.*`` (the final norm) and
    ``head.weight`` (vocab, d_model) when the head is not tied to the embedding.

    Called as ``model(ids, *, cache=None, last_only=False, return_weights=False)``:
    ids: int (batch, seq) -> logits (batch, seq, vocab), or (batch, 1, vocab) for the last
    position only; with ``return_weights=True`` also each layer's attention weights
    (batch, heads, seq, cached + seq).
    """

    def __init__(
        self,
        config: GPTConfig | None = None,
        *,
        attention: str = "softmax",
        attention_options: Mapping[str, Any] | None = None,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        self.config = cfg = GPTConfig() if config is None else config
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(cfg).__name__}")
        gen = init.rng(seed)
        self.token_embedding = self.add_child(
            "token_embedding", Embedding(cfg.vocab_size, cfg.d_model, backend=self.backend)
        )
        # GPT-2 draws its embeddings N(0, 0.02^2), not N(0, 1): with a tied head, large
        # embeddings would make the random model's logits huge.
        self.token_embedding.add_param(
            "weight", init.normal(gen, (cfg.vocab_size, cfg.d_model), 0.02)
        )
        self.position_embedding = None
        if cfg.positions == "learned":
            self.position_embedding = self.add_child(
                "position_embedding",
                LearnedPositions(cfg.context_length, cfg.d_model, backend=self.backend, seed=gen),
            )
        self.layers = [
            self.add_child(
                f"layers.{i}",
                DecoderBlock(
                    cfg.d_model,
                    cfg.n_heads,
                    cfg.ff_width,
                    cross_attention=False,
                    activation=cfg.activation,
                    norm_first=True,
                    eps=cfg.eps,
                    norm=cfg.norm,
                    n_kv_heads=cfg.kv_heads,
                    rotary=cfg.positions == "rotary",
                    bias=cfg.bias,
                    attention=attention,
                    attention_options=attention_options,
                    backend=self.backend,
                    seed=gen,
                ),
            )  # fmt: skip
            for i in range(cfg.n_layers)
        ]
        self.norm = self.add_child("norm", make_norm(cfg.norm, cfg.d_model, cfg.eps, self.backend))
        self.head = None
        if not cfg.tied_head:
            self.head = self.add_child(
                "head",
                Linear(cfg.d_model, cfg.vocab_size, bias=False, backend=self.backend, seed=gen),
            )

    @property
    def attention(self) -> Any:
        """The registered attention variant every layer computes with."""
        return self.layers[0].self_attn.attention

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions
        (default: the context length), on this model's backend and dtype."""
        cfg = self.config
        max_len = cfg.context_length if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if max_len > cfg.context_length:
            raise ValueError(
                f"max_len {max_len} exceeds the model's context length {cfg.context_length}"
            )
        return KVCache(
            cfg.n_layers, batch, cfg.kv_heads, cfg.d_head, max_len,
            backend=self.backend, dtype=self.dtype,
        )  # fmt: skip

    def _check_ids(self, ids: Array, cache: KVCache | None) -> int:
        """Raise a clear error for ids the model cannot read; return the cached length."""
        xp = array_namespace(ids)
        if ids.ndim != 2 or not xp.isdtype(ids.dtype, "integral"):
            raise ValueError(
                f"GPT expects integer token ids of shape (batch, seq), got dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}"
            )
        if ids.shape[1] == 0:
            raise ValueError("GPT needs at least one token per sequence; got an empty sequence")
        offset = 0
        if cache is not None:
            if not isinstance(cache, KVCache) or len(cache) != len(self.layers):
                raise ValueError(
                    f"cache must be a KVCache with {len(self.layers)} layers (see new_cache)"
                )
            offset = cache.length
        limit = self.config.context_length
        if offset + ids.shape[1] > limit:
            raise ValueError(
                f"sequence too long: {offset} cached + {ids.shape[1]} new tokens exceed the "
                f"model's context length of {limit} positions"
            )
        return offset

    def forward(
        self,
        ids: Array,
        *,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_weights: bool = False,
    ) -> Array | tuple[Array, list[Array]]:
        offset = self._check_ids(ids, cache)
        x = self._embed(ids, offset)  # (batch, seq, d_model)
        first = 0  # blocks already run
        if cache is not None and not return_weights:  # one new token: a fused native, if any
            caches = [cache[i] for i in range(len(self.layers))]
            x, first = one_token_through_blocks(self.layers, x, caches, self._head_weights())
            if first > len(self.layers):
                return x  # (1, 1, vocab): the native ran the head too
        return self._blocks_and_head(x, first, cache, last_only, return_weights)

    def _embed(self, ids: Array, offset: int) -> Array:
        """Token embeddings plus positions offset, offset + 1, ... (batch, seq) ->
        (batch, seq, d_model)."""
        x = self.token_embedding(ids)  # (batch, seq, d_model)
        if self.position_embedding is not None:
            x = self.position_embedding(x, offset)  # (batch, seq, d_model), positions offset..
        return x

    def _blocks_and_head(
        self, x: Array, first: int, cache: KVCache | None, last_only: bool, return_weights: bool
    ) -> Array | tuple[Array, list[Array]]:
        """The rest of :meth:`forward` from block ``first`` on: the blocks, the final norm
        and the head. x: (batch, seq, d_model) -> logits (batch, seq or 1, vocab)."""
        all_weights = []
        for i, layer in enumerate(self.layers):
            if i < first:
                continue
            layer_cache = None if cache is None else cache[i]
            x = layer(x, causal=True, cache=layer_cache, return_weights=return_weights)
            if return_weights:
                x, weights = x
                all_weights.append(weights["self"])  # (batch, heads, seq, offset + seq)
        if last_only:
            x = x[:, -1:, :]  # (batch, 1, d_model): generation needs only the next token
        x = self.norm(x)  # (batch, seq, d_model)
        logits = self.head(x) if self.head is not None else self._tied_head(x)  # (b, seq, vocab)
        return (logits, all_weights) if return_weights else logits

    def one_token_steps(self, cache: KVCache) -> Callable[[Array], Array] | None:
        """For generating with ``cache``, one token at a time: a function ``logits_for(ids)``,
        ids (1, 1) -> logits (1, 1, vocab), that computes what
        ``self(ids, cache=cache, last_only=True)`` does, with the same arithmetic, and
        fills the cache alike; or None where no fused native applies (other backends,
        other blocks, a batch of more than one), and then the model is called instead.

        The fused native's arguments (some 150 weight arrays, the cache's buffers) are
        checked and gathered once, here, instead of at every token, as well as the
        modules' own call checks: on GPT-2 small the Python between two steps went from
        about 0.6 ms to 0.3 ms, on caches that reading 0.5 GB of weights has just
        flushed (see the README's "Why decoding is bandwidth-bound"). ``logits_for``
        reads the weights the model holds now: arrays changed in place show, new arrays
        put in their place (``load_state_dict``, ``to``) do not; call this again after
        those.
        """
        caches = [cache[i] for i in range(len(self.layers))]
        one_token = prepare_one_token_steps(self.layers, caches, self._head_weights())
        if one_token is None:
            return None
        xp, table = self.backend.xp, self.token_embedding.weight  # (vocab, d_model)
        vocab, d_model = table.shape
        positions = self.position_embedding  # LearnedPositions or None (rotary)
        rows = None if positions is None else positions.weight  # (context, d_model)
        limit = min(cache.max_len, self.config.context_length)  # positions it can take

        def logits_for(ids: Array) -> Array:  # (1, 1) -> (1, 1, vocab)
            position = cache.length
            if tuple(ids.shape) != (1, 1) or ids.dtype != xp.int64 or position >= limit:
                return self(ids, cache=cache, last_only=True)  # the model's checks, errors
            token = int(ids[0, 0])
            if not 0 <= token < vocab:
                return self(ids, cache=cache, last_only=True)  # raises the model's error
            # what _embed computes, without its checks (done above) and module calls
            x = table[token : token + 1, :]  # (1, d_model)
            if rows is not None:
                x = x + rows[position : position + 1, :]  # (1, d_model)
            x, first = one_token(xp.reshape(x, (1, 1, d_model)))
            if first > len(self.layers):
                return x  # (1, 1, vocab): the native ran the head too
            return self._blocks_and_head(x, first, cache, last_only=True, return_weights=False)

        return logits_for

    def _head_weights(self) -> tuple[Any, ...] | None:
        """The final LayerNorm's weight, bias and eps and the output layer's weight and
        bias, for a decode-step native that runs the head too; None for another norm."""
        norm = self.norm
        if type(norm) is not LayerNorm or norm.bias is None:
            return None
        if self.head is None:
            return norm.weight, norm.bias, norm.eps, self.token_embedding.weight, None
        return norm.weight, norm.bias, norm.eps, self.head.weight, self.head.bias

    def _tied_head(self, x: Array) -> Array:
        """logits = x E^T, the token embedding read backwards.  (..., d) -> (..., vocab)."""
        return F.linear(x, self.token_embedding.weight)  # (..., vocab)

    # --- learning --------------------------------------------------------------------

    def forward_and_save(self, ids: Array) -> tuple[Array, dict[str, Any]]:
        """``model(ids)`` (no cache, every position); saves each layer's saved state.

        ids: int (batch, seq) -> logits (batch, seq, vocab), saved.
        """
        self._check_ids(ids, None)
        saved: dict[str, Any] = {"layers": []}
        x, saved["token_embedding"] = self.token_embedding.forward_and_save(ids)  # (b, s, d)
        if self.position_embedding is not None:
            x, saved["positions"] = self.position_embedding.forward_and_save(x)  # (b, s, d)
        for layer in self.layers:
            x, layer_saved = layer.forward_and_save(x, causal=True)  # (batch, seq, d_model)
            saved["layers"].append(layer_saved)
        x, saved["norm"] = self.norm.forward_and_save(x)  # (batch, seq, d_model)
        if self.head is not None:
            logits, saved["head"] = self.head.forward_and_save(x)  # (batch, seq, vocab)
        else:
            logits, saved["head_input"] = self._tied_head(x), x  # (batch, seq, vocab)
        return logits, saved

    def backward(self, grad_logits: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """Head, final norm, the layers from last to first, positions, token embedding.

        With a tied head E is used twice, logits = LN_f(h_L) E^T and h_0 = E[ids] + P, so
        its gradient is the sum of both uses: dE = dlogits^T LN_f(h_L) + scatter-add of dh_0.
        grad_logits: (batch, seq, vocab) -> ((None,), grads keyed like ``parameters()``).
        """
        grads: dict[str, Array] = {}
        if self.head is not None:
            (grad_x,), head_grads = self.head.backward(grad_logits, saved["head"])
            grads.update(self.prefix_grads("head", head_grads))
        else:  # logits = x E^T: a linear layer without bias whose weight is E
            grad_x, grad_head_weight, _ = F.linear_backward(
                grad_logits, saved["head_input"], self.token_embedding.weight, bias=False
            )  # (batch, seq, d_model), (vocab, d_model)
        (grad_x,), norm_grads = self.norm.backward(grad_x, saved["norm"])  # (b, s, d)
        grads.update(self.prefix_grads("norm", norm_grads))
        for i in reversed(range(len(self.layers))):
            (grad_x, _), layer_grads = self.layers[i].backward(grad_x, saved["layers"][i])
            grads.update(self.prefix_grads(f"layers.{i}", layer_grads))  # grad_x: (b, s, d)
        if self.position_embedding is not None:
            (grad_x, _), position_grads = self.position_embedding.backward(
                grad_x, saved["positions"]
            )  # (batch, seq, d_model)
            grads.update(self.prefix_grads("position_embedding", position_grads))
        _, embedding_grads = self.token_embedding.backward(grad_x, saved["token_embedding"])
        if self.head is None:  # the tied head's share of dE
            embedding_grads["weight"] = embedding_grads["weight"] + grad_head_weight
        grads.update(self.prefix_grads("token_embedding", embedding_grads))
        return (None,), grads

    def generate(self, ids: Any, max_new_tokens: int, **options: Any) -> Any:
        """``ids`` with ``max_new_tokens`` generated tokens appended; see
        :func:`tinytx.generate.generate` for the options (temperature, top_k, top_p, seed,
        stop_token, use_cache)."""
        from tinytx.generate import generate

        return generate(self, ids, max_new_tokens, **options)


# --- GPT-2 checkpoints (Hugging Face format) ------------------------------------------------


def conv1d_to_linear(weight: Any) -> Any:
    """GPT-2's Conv1D weight -> a Linear weight: THE one place where GPT-2 is transposed.

    GPT-2 (and Hugging Face's port) computes its projections with ``Conv1D``,
    y = x W + b with W of shape (d_in, d_out), where ``nn.Linear`` and tinytx's
    :class:`~tinytx.layers.Linear` compute y = x W^T + b with W of shape (d_out, d_in).
    So each Conv1D weight is transposed once, on the host, while loading.
    c_attn's W (d_model, 3 d_model) packs the query, key and value columns; its
    transpose (3 d_model, d_model) stacks them by rows: exactly ``in_proj_weight``.
    """
    return weight.T  # (d_in, d_out) -> (d_out, d_in)


# GPT-2 key (after "h.{i}.", or at the top) -> (tinytx key, stored as Conv1D?)
_GPT2_LAYER_KEYS = {
    "ln_1.weight": ("norm1.weight", False),
    "ln_1.bias": ("norm1.bias", False),
    "attn.c_attn.weight": ("self_attn.in_proj_weight", True),
    "attn.c_attn.bias": ("self_attn.in_proj_bias", False),
    "attn.c_proj.weight": ("self_attn.out_proj.weight", True),
    "attn.c_proj.bias": ("self_attn.out_proj.bias", False),
    "ln_2.weight": ("norm2.weight", False),
    "ln_2.bias": ("norm2.bias", False),
    "mlp.c_fc.weight": ("linear1.weight", True),
    "mlp.c_fc.bias": ("linear1.bias", False),
    "mlp.c_proj.weight": ("linear2.weight", True),
    "mlp.c_proj.bias": ("linear2.bias", False),
}
_GPT2_TOP_KEYS = {
    "wte.weight": "token_embedding.weight",
    "wpe.weight": "position_embedding.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
    "lm_head.weight": "head.weight",
}
# The causal-mask buffers that older GPT-2 checkpoints store: not parameters.
_GPT2_BUFFERS = re.compile(r"h\.\d+\.attn\.(masked_)?bias")
_GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def gpt2_config(hf: Mapping[str, Any]) -> GPTConfig:
    """A Hugging Face GPT-2 config.json (as a dict) -> GPTConfig; unsupported settings raise."""
    from tinytx.pretrained import CheckpointError

    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GPT2_ACTIVATIONS:
        raise CheckpointError(
            f"GPT-2 activation_function {activation!r} is not supported; "
            f"tinytx reads: {', '.join(_GPT2_ACTIVATIONS)}"
        )
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise CheckpointError(
            "this GPT-2 config changes the attention scale (scale_attn_weights=false or "
            "scale_attn_by_inverse_layer_idx=true); tinytx uses 1/sqrt(d_head) only"
        )
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            context_length=hf["n_positions"],
            d_model=hf["n_embd"],
            n_heads=hf["n_head"],
            n_layers=hf["n_layer"],
            d_ff=hf.get("n_inner"),
            activation=_GPT2_ACTIVATIONS[activation],
            tied_head=bool(hf.get("tie_word_embeddings", True)),
            eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as err:
        raise CheckpointError(f"GPT-2 config.json lacks {err.args[0]!r}") from None
    except ValueError as err:
        raise CheckpointError(f"GPT-2 config.json: {err}") from None


def gpt2_state_dict(tensors: Mapping[str, Any], config: GPTConfig) -> dict[str, Any]:
    """GPT-2's tensors (Hugging Face names, host arrays) -> a state dict for :class:`GPT`.

    Renames by the tables above, transposes the Conv1D weights (:func:`conv1d_to_linear`),
    drops the causal-mask buffers and, for a tied head, ``lm_head.weight`` (a copy of
    ``wte``). Names that are neither GPT-2's nor buffers are kept as they are, so
    ``GPT.load_state_dict`` lists them as unexpected.
    """
    state = {}
    for name, value in tensors.items():
        key = name.removeprefix("transformer.")
        if _GPT2_BUFFERS.fullmatch(key) or (key == "lm_head.weight" and config.tied_head):
            continue
        match = re.fullmatch(r"h\.(\d+)\.(.+)", key)
        if match and match.group(2) in _GPT2_LAYER_KEYS:
            ours, is_conv1d = _GPT2_LAYER_KEYS[match.group(2)]
            state[f"layers.{match.group(1)}.{ours}"] = (
                conv1d_to_linear(value) if is_conv1d else value
            )
        else:
            state[_GPT2_TOP_KEYS.get(key, name)] = value
    return state


def gpt2_tensors(state: Mapping[str, Any], config: GPTConfig) -> dict[str, Any]:
    """The inverse of :func:`gpt2_state_dict`: a :class:`GPT` state dict (host arrays) ->
    GPT-2's tensors with Hugging Face's names (``transformer.h.0.attn.c_attn.weight``...).

    Linear weights are transposed back to Conv1D's (d_in, d_out); a tied head writes no
    ``lm_head.weight`` (Hugging Face ties it to ``wte`` on load). Raises ValueError for a
    configuration GPT-2's format cannot hold (see :func:`gpt2_config_dict`).
    """
    gpt2_config_dict(config)  # refuses what GPT-2 cannot express
    ours_to_gpt2 = {ours: (key, conv) for key, (ours, conv) in _GPT2_LAYER_KEYS.items()}
    top = {ours: key for key, ours in _GPT2_TOP_KEYS.items()}
    tensors = {}
    for name, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if match and match.group(2) in ours_to_gpt2:
            key, is_conv1d = ours_to_gpt2[match.group(2)]
            key = f"transformer.h.{match.group(1)}.{key}"
            value = conv1d_to_linear(value) if is_conv1d else value  # a transpose both ways
        elif name in top:
            key = top[name] if name == "head.weight" else f"transformer.{top[name]}"
        else:
            raise ValueError(f"GPT key {name!r} has no GPT-2 name")
        tensors[key] = value
    return tensors


def gpt2_config_dict(config: GPTConfig) -> dict[str, Any]:
    """A GPTConfig -> Hugging Face GPT-2's config.json (a dict); :func:`gpt2_config` reads it.

    GPT-2's format has learned positions, LayerNorm, biases and as many key/value heads as
    query heads; a configuration without them raises ValueError naming the setting.
    """
    unsupported = {
        "positions": (config.positions, "learned"),
        "norm": (config.norm, "layer"),
        "bias": (config.bias, True),
        "n_kv_heads": (config.kv_heads, config.n_heads),
    }
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise ValueError(
                f"GPT-2's format needs {name}={needed!r}; this model has {name}={value!r}"
            )
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[config.activation]
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.d_model,
        "n_head": config.n_heads,
        "n_layer": config.n_layers,
        "n_inner": config.ff_width,
        "activation_function": activation,
        "layer_norm_epsilon": config.eps,
        "tie_word_embeddings": config.tied_head,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def save_gpt2(model: GPT, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face GPT-2 folder: config.json and model.safetensors
    (float32). :func:`load_gpt2` and transformers' ``GPT2LMHeadModel`` both read it."""
    import json

    from tinytx.pretrained import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = gpt2_config_dict(model.config)
    tensors = gpt2_tensors(model.state_dict(), model.config)
    write_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_gpt2(
    folder: str | Path,
    config: Mapping[str, Any],
    backend: str | Backend | None = None,
    attention: str = "softmax",
) -> GPT:
    """A GPT holding the weights of a Hugging Face GPT-2 folder (config.json, model.safetensors).

    Called by :func:`tinytx.load_pretrained` for ``model_type == "gpt2"``. Missing,
    unexpected or mis-shaped tensors raise one CheckpointError listing them all.
    """
    from tinytx.pretrained import CheckpointError, read_safetensors, weights_file

    folder = Path(folder)
    cfg = gpt2_config(config)
    tensors = read_safetensors(weights_file(folder, "AutoModelForCausalLM"))  # never pickle
    model = GPT(cfg, attention=attention, backend=resolve_backend(backend))
    try:
        model.load_state_dict(gpt2_state_dict(tensors, cfg))
    except StateDictError as err:
        raise CheckpointError(
            f"{folder / 'model.safetensors'} is not a GPT-2 checkpoint "
            f"matching its config.json: {err}"
        ) from None
    return model
