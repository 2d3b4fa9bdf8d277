"""BERT (Devlin et al. 2019) from tinytx's own layers, and its Hugging Face loader.

    h_0 = LayerNorm(E_word[ids] + E_pos[0..seq-1] + E_type[type_ids])      the embeddings
    h_l = EncoderBlock_l(h_{l-1}, mask)      post-norm, exact GELU            l = 1 .. L
        = norm2(a + FFN(a)),  a = norm1(h_{l-1} + SelfAttn(h_{l-1}, mask))

BERT normalises *after* each residual addition, as the original Transformer does: the
blocks are :class:`~tinytx.layers.EncoderBlock` with ``norm_first=False`` and
``activation="gelu"`` (the erf form, not the tanh approximation). The padding mask lets
every token attend to the real tokens of its own text only.

Sentence embeddings, as sentence-transformers computes them for all-MiniLM-L6-v2:

    e = m / ||m||,  m = sum_t mask_t h_L,t / sum_t mask_t        masked mean, then unit length

Weights come from a Hugging Face folder (config.json, model.safetensors, tokenizer.json);
:data:`LAYER_KEYS` is the one place where Hugging Face's names meet tinytx's. This file
computes only with the array API standard; NumPy stays in the host-side helpers it calls
(:mod:`tinytx.pretrained` reads the weights, :mod:`tinytx.tokenizer` makes the ids).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from tinytx import init
from tinytx.backends import Backend
from tinytx.layers import EncoderBlock, LayerNorm, Linear, mean_pool, padding_mask
from tinytx.layers.basic import Embedding
from tinytx.layers.module import Module
from tinytx.pretrained import CheckpointError, read_safetensors, weights_file
from tinytx.tokenizer import (
    DEFAULT_MAX_PADDING,
    Batch,
    Tokenizer,
    check_texts,
    length_batches,
)

Array = Any

__all__ = [
    "IGNORED_KEYS",
    "LAYER_KEYS",
    "BertConfig",
    "BertEmbeddings",
    "BertModel",
    "BertOutput",
    "Inspection",
    "from_hf_state_dict",
    "load_bert",
    "to_hf_state_dict",
]

# --- configuration ---------------------------------------------------------------------

# config.json's hidden_act -> the activation of tinytx's FeedForward.
ACTIVATIONS = {
    "gelu": "gelu",  # exact: x * Phi(x) with erf
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder, named as in Hugging Face's config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "config.json") -> BertConfig:
        """Read the sizes from a parsed config.json; a missing or bad value is a clear error."""
        if config.get("model_type", "bert") != "bert":
            raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not 'bert'")
        sizes = {}
        for name in _SIZES:
            value = config.get(name, 2 if name == "type_vocab_size" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{where}: {name} must be a positive int, got {value!r}")
            sizes[name] = value
        if sizes["hidden_size"] % sizes["num_attention_heads"]:
            raise CheckpointError(
                f"{where}: hidden_size {sizes['hidden_size']} is not divisible by "
                f"num_attention_heads {sizes['num_attention_heads']}"
            )
        eps = config.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise CheckpointError(f"{where}: layer_norm_eps must be a positive number, got {eps!r}")
        act = config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise CheckpointError(
                f"{where}: hidden_act {act!r} is not supported; expected one of "
                + ", ".join(ACTIVATIONS)
            )
        positions = config.get("position_embedding_type", "absolute")
        if positions != "absolute":
            raise CheckpointError(
                f"{where}: position_embedding_type {positions!r} is not supported (only 'absolute')"
            )
        return cls(**sizes, layer_norm_eps=float(eps), hidden_act=act)


# --- Hugging Face names <-> tinytx names -------------------------------------------------

# Per encoder layer: Hugging Face's "encoder.layer.{i}.<hf>" is tinytx's "layers.{i}.<ours>".
# The three attention projections are packed into one matrix, as in torch's
# nn.MultiheadAttention: rows 0..d-1 are the query's, then the key's, then the value's.
LAYER_KEYS: dict[str, str | tuple[str, str, str]] = {
    "self_attn.in_proj_weight": (
        "attention.self.query.weight",
        "attention.self.key.weight",
        "attention.self.value.weight",
    ),
    "self_attn.in_proj_bias": (
        "attention.self.query.bias",
        "attention.self.key.bias",
        "attention.self.value.bias",
    ),
    "self_attn.out_proj.weight": "attention.output.dense.weight",
    "self_attn.out_proj.bias": "attention.output.dense.bias",
    "norm1.weight": "attention.output.LayerNorm.weight",  # after attention + residual
    "norm1.bias": "attention.output.LayerNorm.bias",
    "linear1.weight": "intermediate.dense.weight",  # d_model -> d_ff, then GELU
    "linear1.bias": "intermediate.dense.bias",
    "linear2.weight": "output.dense.weight",  # d_ff -> d_model
    "linear2.bias": "output.dense.bias",
    "norm2.weight": "output.LayerNorm.weight",  # after feed-forward + residual
    "norm2.bias": "output.LayerNorm.bias",
}
# The embeddings ("embeddings.*") and the pooler ("pooler.dense.*") keep Hugging Face's names.
# Keys in the file that are not weights: HF's position_ids buffer (always 0, 1, 2, ...).
IGNORED_KEYS = ("embeddings.position_ids",)
_HF_LAYER, _OUR_LAYER = "encoder.layer.", "layers."


def from_hf_state_dict(state: Mapping[str, Array]) -> dict[str, Array]:
    """Hugging Face BertModel keys -> tinytx BertModel keys (q, k, v packed into in_proj)."""
    ours: dict[str, Array] = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith(_HF_LAYER)})
    for key, value in state.items():
        if not key.startswith(_HF_LAYER) and key not in IGNORED_KEYS:
            ours[key] = value
    for i in layers:
        hf, us = f"{_HF_LAYER}{i}.", f"{_OUR_LAYER}{i}."
        for our_key, hf_key in LAYER_KEYS.items():
            if isinstance(hf_key, tuple):
                parts = [state[hf + name] for name in hf_key]  # 3 x (d, ...) each
                xp = array_namespace(*parts)
                ours[us + our_key] = xp.concat(parts, axis=0)  # (3 d, ...)
            else:
                ours[us + our_key] = state[hf + hf_key]
    return ours


def to_hf_state_dict(state: Mapping[str, Array]) -> dict[str, Array]:
    """tinytx BertModel keys -> Hugging Face BertModel keys (in_proj split into q, k, v)."""
    hf: dict[str, Array] = {}
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith(_OUR_LAYER)})
    for key, value in state.items():
        if not key.startswith(_OUR_LAYER):
            hf[key] = value
    for i in layers:
        us, prefix = f"{_OUR_LAYER}{i}.", f"{_HF_LAYER}{i}."
        for our_key, hf_key in LAYER_KEYS.items():
            value = state[us + our_key]
            if isinstance(hf_key, tuple):
                third = value.shape[0] // 3  # query, key, value rows
                for j, name in enumerate(hf_key):
                    hf[prefix + name] = value[j * third : (j + 1) * third, ...]
            else:
                hf[prefix + hf_key] = value
    return hf


# --- the model -----------------------------------------------------------------------------


class BertEmbeddings(Module):
    """h_0 = LayerNorm(E_word[ids] + E_pos[0..seq-1] + E_type[type_ids]).

    Children (Hugging Face's names): ``word_embeddings``, ``position_embeddings``,
    ``token_type_embeddings``, ``LayerNorm``.
    ids: (batch, seq) ints, type_ids: (batch, seq) ints or None (all 0) -> (batch, seq, d).
    """

    def __init__(
        self, config: BertConfig, *, backend: str | Backend | None = None, seed: init.Seed = 0
    ) -> None:
        super().__init__(backend)
        gen, d, b = init.rng(seed), config.hidden_size, self.backend
        self.word_embeddings = self.add_child(
            "word_embeddings", Embedding(config.vocab_size, d, backend=b, seed=gen)
        )
        self.position_embeddings = self.add_child(
            "position_embeddings",
            Embedding(config.max_position_embeddings, d, backend=b, seed=gen),
        )
        self.token_type_embeddings = self.add_child(
            "token_type_embeddings", Embedding(config.type_vocab_size, d, backend=b, seed=gen)
        )
        self.LayerNorm = self.add_child(
            "LayerNorm", LayerNorm(d, eps=config.layer_norm_eps, backend=b)
        )

    def forward(self, ids: Array, type_ids: Array | None = None) -> Array:
        seq, max_len = ids.shape[-1], self.position_embeddings.num_embeddings
        if ids.ndim != 2 or seq > max_len:
            raise ValueError(
                f"BERT expects token ids of shape (batch, seq) with seq <= {max_len} "
                f"(its positions), got {tuple(ids.shape)}"
            )
        x = self.word_embeddings(ids)  # (batch, seq, d)
        x = x + self.position_embeddings.weight[:seq, :]  # (batch, seq, d) + (seq, d)
        if type_ids is None:
            x = x + self.token_type_embeddings.weight[0, :]  # every token in segment 0
        else:
            x = x + self.token_type_embeddings(type_ids)  # (batch, seq, d)
        return self.LayerNorm(x)  # (batch, seq, d)


class BertOutput(NamedTuple):
    """What :class:`BertModel` returns (a tuple, so traces see the shapes inside).

    last_hidden_state: (batch, seq, d); hidden_states: None, or the L + 1 arrays
    (batch, seq, d): the embeddings' output, then every layer's; attentions: None, or the
    L arrays (batch, heads, seq, seq): every layer's attention weights, one map per head.
    """

    last_hidden_state: Array
    hidden_states: list[Array] | None = None
    attentions: list[Array] | None = None


@dataclass
class Inspection:
    """One text seen through the model (host NumPy arrays): its word pieces, the hidden
    states (L + 1, seq, d) and the attention weights (L, heads, seq, seq)."""

    tokens: list[str]
    hidden_states: Any
    attentions: Any


class BertModel(Module):
    """A BERT encoder: embeddings, then ``num_hidden_layers`` post-norm EncoderBlocks.

    Keys: ``embeddings.*`` and ``pooler.dense.*`` as in Hugging Face, ``layers.{i}.*`` as
    in torch's nn.TransformerEncoderLayer (see :data:`LAYER_KEYS` for the translation).
    ``pooler=True`` adds BERT's [CLS] pooler, tanh(W h_[CLS] + b), which the loaded
    checkpoint may carry; sentence embeddings do not use it.

    Called as ``model(ids, *, type_ids=None, mask=None, return_hidden=False,
    return_weights=False)``: ids (batch, seq) ints; mask a padding mask (batch, 1, 1, seq),
    True on real tokens, or None when nothing is padded -> :class:`BertOutput`.
    ``tokenizer`` (set by :func:`load_bert`) turns texts into ids for :meth:`embed`.
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        attention: str = "softmax",
        pooler: bool = False,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        self.config = config
        self.tokenizer: Tokenizer | None = None
        gen = init.rng(seed)
        self.embeddings = self.add_child(
            "embeddings", BertEmbeddings(config, backend=self.backend, seed=gen)
        )
        self.layers = [
            self.add_child(
                f"layers.{i}",
                EncoderBlock(
                    config.hidden_size,
                    config.num_attention_heads,
                    config.intermediate_size,
                    activation=ACTIVATIONS[config.hidden_act],
                    norm_first=False,  # BERT is post-norm: LayerNorm(x + sublayer(x))
                    eps=config.layer_norm_eps,
                    attention=attention,
                    backend=self.backend,
                    seed=gen,
                ),
            )
            for i in range(config.num_hidden_layers)
        ]
        self.pooler = None
        if pooler:  # its keys are Hugging Face's: pooler.dense.weight, pooler.dense.bias
            d = config.hidden_size
            self.pooler = self.add_child(
                "pooler", Linear(d, d, backend=self.backend, seed=gen), prefix="pooler.dense."
            )

    # --- arrays in, arrays out -------------------------------------------------------------

    def forward(
        self,
        ids: Array,
        *,
        type_ids: Array | None = None,
        mask: Array | None = None,
        return_hidden: bool = False,
        return_weights: bool = False,
    ) -> BertOutput:
        x = self.embeddings(ids, type_ids)  # (batch, seq, d)
        hidden = [x] if return_hidden else None
        weights = [] if return_weights else None
        for layer in self.layers:
            x = layer(x, mask=mask, return_weights=return_weights)
            if return_weights:
                x, w = x
                weights.append(w)  # (batch, heads, seq, seq)
            if return_hidden:
                hidden.append(x)  # (batch, seq, d)
        return BertOutput(x, hidden, weights)

    def pool(self, last_hidden_state: Array) -> Array:
        """BERT's [CLS] pooler: tanh(W h_[CLS] + b). (batch, seq, d) -> (batch, d)."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (its checkpoint had no pooler.* weights)")
        xp = array_namespace(last_hidden_state)
        return xp.tanh(self.pooler(last_hidden_state[:, 0, :]))  # (batch, d)

    def sentence_embedding(self, ids: Array, *, mask: Array | None = None, **kw: Any) -> Array:
        """e = m / ||m||, m the mean of the last hidden states over the real tokens.

        ids: (batch, seq); mask: (batch, 1, 1, seq) or None -> (batch, d) unit vectors.
        """
        last = self(ids, mask=mask, **kw).last_hidden_state  # (batch, seq, d)
        xp = array_namespace(last)
        pooled = mean_pool(last, mask)  # (batch, d)
        norm = xp.sqrt(xp.sum(pooled * pooled, axis=-1, keepdims=True))  # (batch, 1)
        return pooled / xp.maximum(norm, xp.full_like(norm, 1e-12))  # (batch, d)

    # --- texts in, NumPy out ----------------------------------------------------------------

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: load it from a folder with tokenizer.json"
            )
        return self.tokenizer

    def _device_inputs(self, batch: Batch) -> tuple[Array, Array | None]:
        """Token ids on the model's backend, and the padding mask (None if nothing is padded)."""
        ids = self.backend.asarray(batch.ids)  # (batch, seq) int64
        seq = batch.ids.shape[1]
        if all(int(n) == seq for n in batch.lengths):
            return ids, None
        lengths = [int(n) for n in batch.lengths]
        return ids, padding_mask(lengths, seq, backend=self.backend)  # (batch, 1, 1, seq)

    def embed_batch(self, texts: Sequence[str]) -> Any:
        """Embed ``texts`` as one padded batch, in the order given -> NumPy (n, d)."""
        ids, mask = self._device_inputs(self._tokenizer()(texts, warn=True))
        return self.backend.to_numpy(self.sentence_embedding(ids, mask=mask))

    def embed(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        max_padding: float | None = DEFAULT_MAX_PADDING,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        """Sentence embeddings of ``texts``, as sentence-transformers computes them.

        Texts are sorted by token count and embedded at most ``batch_size`` at a time,
        each batch padded only to its longest text. A batch also ends where more than
        ``max_padding`` of its positions would be padding (:func:`length_batches`;
        ``None``: by count alone, as sentence-transformers does). The batches change the
        numbers only by rounding (padding is masked: 1.8e-7 at most on the benchmark's
        256 sentences), and the time. Measured 2026-12-04 on a 2-vCPU EPYC, 8 alternating
        runs of ``tinytx bench embed``'s sentences, against batches by count alone: a
        median 0.76 of the time with at most a tenth of padding, 0.79 with a twentieth
        (more, smaller batches), 0.85 with a fifth.

        The rows come back in the order given. ``progress(n)`` is called after each batch
        with its size. A text longer than the model reads is truncated, with a
        TruncationWarning.
        -> NumPy float32 (len(texts), hidden_size), unit rows.
        """
        texts = check_texts(texts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        tokenizer = self._tokenizer()
        encodings = tokenizer.encode(texts)  # unpadded; warns once for the whole list
        lengths = [len(encoding.ids) for encoding in encodings]
        batches = length_batches(lengths, batch_size, max_padding)  # longest first
        parts = []
        for batch in batches:
            ids, mask = self._device_inputs(tokenizer.pad([encodings[i] for i in batch]))
            parts.append(self.sentence_embedding(ids, mask=mask))  # (len(batch), d)
            if progress is not None:
                progress(len(batch))
        xp = self.backend.xp
        sorted_rows = xp.concat(parts, axis=0)  # (n, d), in the batches' order
        where = [0] * len(texts)  # where[i]: the row of text i in sorted_rows
        for row, i in enumerate(i for batch in batches for i in batch):
            where[i] = row
        rows = xp.take(sorted_rows, self.backend.asarray(where), axis=0)  # (n, d)
        return self.backend.to_numpy(rows)

    def inspect(self, text: str) -> Inspection:
        """One text's word pieces, every hidden state and every head's attention weights.

        -> Inspection(tokens, hidden_states (L + 1, seq, d), attentions (L, heads, seq, seq)),
        host NumPy arrays; the attention variant must return weights (softmax does).
        """
        batch = self._tokenizer()(check_texts([text]), warn=True)
        ids, _ = self._device_inputs(batch)
        out = self(ids, return_hidden=True, return_weights=True)
        xp = self.backend.xp
        hidden = xp.stack([h[0, ...] for h in out.hidden_states])  # (L + 1, seq, d)
        weights = xp.stack([w[0, ...] for w in out.attentions])  # (L, heads, seq, seq)
        to_host = self.backend.to_numpy
        return Inspection(batch.tokens[0], to_host(hidden), to_host(weights))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"BertModel(layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"heads={c.num_attention_heads}, backend={self.backend.name!r})"
        )


# --- loading a Hugging Face folder ---------------------------------------------------------


def _check_keys(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Any], where: str
) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped weight."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [
        f"{k}: expected {expected[k]}, got {tuple(found[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != expected[k]
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: " + ", ".join(missing))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: " + ", ".join(unexpected))
        if misshaped:
            parts.append(f"wrong shape {len(misshaped)}: " + "; ".join(misshaped))
        raise CheckpointError(
            f"{where} does not fit the BERT of its config.json: " + " | ".join(parts)
        )


def _max_length(folder: Path, config: BertConfig) -> int:
    """How many tokens a text may have: the model's positions, or sentence-transformers'
    ``max_seq_length`` when the folder has sentence_bert_config.json (256 for MiniLM)."""
    limit = config.max_position_embeddings
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None
        if isinstance(value, int) and not isinstance(value, bool) and value > 2:
            limit = min(limit, value)
    return limit


def load_bert(
    folder: str | Path,
    config: Mapping[str, Any],
    backend: Backend,
    attention: str = "softmax",
) -> BertModel:
    """A BERT-family Hugging Face folder -> :class:`BertModel` on ``backend``.

    Reads config.json's sizes, model.safetensors' weights (NumPy, no torch, no pickle) and,
    when present, tokenizer.json. Every weight of the file must fit the config: missing,
    unexpected or mis-shaped ones are listed together in one CheckpointError.
    Usually called through ``tinytx.load_pretrained(folder)``.
    """
    folder = Path(folder)
    cfg = BertConfig.from_dict(config, where=str(folder / "config.json"))
    weights_path = weights_file(folder, "AutoModel")  # never a pickled .bin
    tensors = read_safetensors(weights_path)
    for key in IGNORED_KEYS:
        tensors.pop(key, None)
    has_pooler = any(key.startswith("pooler.") for key in tensors)
    model = BertModel(cfg, attention=attention, pooler=has_pooler, backend=backend)
    expected = {k: tuple(v.shape) for k, v in to_hf_state_dict(model.parameters()).items()}
    _check_keys(expected, tensors, str(weights_path))
    model.load_state_dict(from_hf_state_dict(tensors))
    if (folder / "tokenizer.json").is_file():
        model.tokenizer = Tokenizer.from_folder(folder, max_length=_max_length(folder, cfg))
    return model
