"""Seq2Seq: the paper's encoder–decoder as a whole model (Vaswani et al. 2017, figure 1).

    src_x  = E_src[src_ids] * sqrt(d_model) + PE[0 .. S-1]     embedded source
    tgt_x  = E_tgt[tgt_ids] * sqrt(d_model) + PE[0 .. T-1]     embedded target (BOS y_1 .. y_{T-1})
    h      = Transformer(src_x, tgt_x)                          (batch, T, d_model)
    logits = h E_tgt^T   (tied head; or h W^T)                  (batch, T, vocab)

Row t of the logits scores the target token y_{t+1}: the decoder reads BOS and the target
up to t (causal self-attention) and the whole source (cross-attention).

As in the paper (section 3.4), the embeddings are multiplied by sqrt(d_model) before the
sinusoidal positions (section 3.5) are added, and with ``share_embeddings`` one table
serves the source, the target and (with ``tie_head``) the output head. The tables are
drawn N(0, 1/d_model), so the scaled embeddings have unit variance, like the positions.

Decoding (:mod:`tinytx.translate`, host side) runs the encoder once per input, computes
the cross-attention keys and values once (:meth:`Seq2Seq.start_decoding`), and feeds the
decoder one new token per step with a key/value cache for its self-attention
(:meth:`Seq2Seq.decode_step`).

A trained model saves as a folder (:meth:`Seq2Seq.save`): config.json (``model_type``
``"tinytx-seq2seq"``), model.safetensors and tokenizer.json; :func:`load_seq2seq`, or
``tinytx.load_pretrained``, reads it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from tinytx import functional as F
from tinytx import init
from tinytx.backends import Backend, resolve_backend
from tinytx.layers.basic import Embedding, Linear
from tinytx.layers.kv_cache import KVCache
from tinytx.layers.module import Module, StateDictError
from tinytx.layers.positions import sinusoidal_table
from tinytx.layers.transformer import Lengths, Transformer, check_lengths

Array = Any

__all__ = [
    "MODEL_TYPE",
    "DecoderState",
    "Seq2Seq",
    "Seq2SeqConfig",
    "load_seq2seq",
    "seq2seq_loss",
    "seq2seq_loss_and_grads",
]

MODEL_TYPE = "tinytx-seq2seq"


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Seq2SeqConfig: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Seq2SeqConfig:
    """The shape of a Seq2Seq model.

    vocab_size (one vocabulary for source and target); d_model, n_heads,
    n_encoder_layers, n_decoder_layers, d_ff; max_source_len and max_target_len (the most
    positions a source, and a decoder input BOS y_1 .. y_{T-1}, may have); norm_first
    (False: the paper's post-norm); activation ``"relu"`` or ``"gelu"``;
    share_embeddings (one table for source and target tokens); tie_head (the output head
    is the target table); pad_id, bos_id, eos_id: the special tokens.
    """

    vocab_size: int
    d_model: int = 64
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 256
    max_source_len: int = 64
    max_target_len: int = 32
    norm_first: bool = False
    activation: str = "relu"
    share_embeddings: bool = True
    tie_head: bool = True
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
            "d_ff", "max_source_len", "max_target_len",
        ):  # fmt: skip
            _positive(getattr(self, name), name)
        if self.d_model % self.n_heads or self.d_model % 2:
            raise ValueError(
                f"Seq2SeqConfig: d_model ({self.d_model}) must be even and divisible by "
                f"n_heads ({self.n_heads})"
            )
        if self.activation not in ("relu", "gelu"):
            raise ValueError(
                f"Seq2SeqConfig: activation must be 'relu' or 'gelu', got {self.activation!r}"
            )
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Seq2SeqConfig: {name} must be an int, got {value!r}")
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"Seq2SeqConfig: {name} {value} is outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Seq2SeqConfig:
        """A config from config.json's fields (``model_type`` and unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class DecoderState:
    """What decoding one batch of inputs remembers between steps.

    memory: (batch, S, d_model), the encoder's output; memory_kv: per decoder layer the
    cross-attention's keys and values, projected once (batch, S, d_kv) each;
    src_lengths: the real source positions per row (or None); cache: the decoder's
    self-attention keys and values so far.
    """

    memory: Array
    memory_kv: list[tuple[Array, Array]]
    src_lengths: list[int] | None
    cache: KVCache

    def select(self, rows: list[int]) -> None:
        """Keep (and reorder, repeat) the given rows, in place: beam search's bookkeeping
        when a hypothesis is extended several times or dropped. rows: batch indices."""
        xp = array_namespace(self.memory)
        index = xp.asarray(rows, dtype=xp.int64, device=device_of(self.memory))  # (new_batch,)
        self.memory = xp.take(self.memory, index, axis=0)  # (new_batch, S, d_model)
        self.memory_kv = [
            (xp.take(k, index, axis=0), xp.take(v, index, axis=0)) for k, v in self.memory_kv
        ]  # each (new_batch, S, d_kv)
        if self.src_lengths is not None:
            self.src_lengths = [self.src_lengths[r] for r in rows]
        for layer in self.cache.layers:
            layer.key_buffer = xp.take(layer.key_buffer, index, axis=0)  # (new_b, h, T, d)
            layer.value_buffer = xp.take(layer.value_buffer, index, axis=0)


class Seq2Seq(Module):
    """An encoder–decoder transformer over token ids.

    Keys: ``source_embedding.weight`` (vocab, d_model), ``target_embedding.weight`` (only
    without ``share_embeddings``), ``transformer.*`` (:class:`~tinytx.layers.Transformer`,
    torch's ``nn.Transformer`` keys), ``head.weight`` (vocab, d_model; only without
    ``tie_head``).

    Called as ``model(src_ids, tgt_ids, *, src_lengths=None, tgt_lengths=None)``:
    src_ids int (batch, S), tgt_ids int (batch, T) (BOS then the target, padded) ->
    logits (batch, T, vocab). ``tokenizer`` is set by :func:`load_seq2seq` (or by hand)
    for the text-level functions of :mod:`tinytx.translate`.
    """

    def __init__(
        self,
        config: Seq2SeqConfig,
        *,
        backend: str | Backend | None = None,
        seed: init.Seed = 0,
    ) -> None:
        super().__init__(backend)
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config must be a Seq2SeqConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.tokenizer: Any = None
        gen = init.rng(seed)
        std = 1.0 / math.sqrt(cfg.d_model)  # scaled by sqrt(d_model): unit variance

        def table(name: str) -> Embedding:
            embedding = self.add_child(
                name, Embedding(cfg.vocab_size, cfg.d_model, backend=self.backend)
            )
            embedding.add_param("weight", init.normal(gen, (cfg.vocab_size, cfg.d_model), std))
            return embedding

        self.source_embedding = table("source_embedding")
        self.target_embedding = (
            self.source_embedding if cfg.share_embeddings else table("target_embedding")
        )
        self.transformer = self.add_child("transformer", Transformer(
            cfg.d_model, cfg.n_heads, cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.d_ff,
            norm_first=cfg.norm_first, activation=cfg.activation, backend=self.backend,
            seed=gen,
        ))  # fmt: skip
        self.head = None
        if not cfg.tie_head:
            self.head = self.add_child(
                "head",
                Linear(cfg.d_model, cfg.vocab_size, bias=False, backend=self.backend, seed=gen),
            )

    # --- checks ------------------------------------------------------------------------

    def check_ids(self, ids: Array, name: str, limit: int, limit_name: str) -> None:
        """A clear error unless ids is int (batch, seq) with 1 <= seq <= limit and every
        id in [0, vocab)."""
        xp = array_namespace(ids)
        if ids.ndim != 2 or not xp.isdtype(ids.dtype, "integral"):
            raise ValueError(
                f"Seq2Seq expects {name} as integer token ids of shape (batch, seq), got "
                f"dtype {ids.dtype} and shape {tuple(ids.shape)}"
            )
        seq = ids.shape[1]
        if seq == 0:
            raise ValueError(f"Seq2Seq: {name} is empty; it needs at least one token")
        if seq > limit:
            raise ValueError(
                f"Seq2Seq: {name} has {seq} positions but the model allows at most {limit} "
                f"({limit_name})"
            )
        vocab = self.config.vocab_size
        low, high = int(xp.min(ids)), int(xp.max(ids))
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"Seq2Seq: {name} holds token id {bad}, outside the vocabulary [0, {vocab})"
            )

    # --- pieces ------------------------------------------------------------------------

    def _positions(self, x: Array, offset: int = 0) -> Array:
        """x + PE[offset : offset + seq].  x: (batch, seq, d_model) -> same."""
        xp = array_namespace(x)
        table = sinusoidal_table(
            x.shape[1],
            self.config.d_model,
            xp=xp,
            device=device_of(x),
            dtype=x.dtype,
            offset=offset,
        )  # (seq, d_model)
        return x + table  # (batch, seq, d_model)

    def embed(self, ids: Array, table: Embedding, offset: int = 0) -> Array:
        """E[ids] * sqrt(d_model) + PE.  ids int (batch, seq) -> (batch, seq, d_model)."""
        scale = math.sqrt(self.config.d_model)
        return self._positions(table(ids) * scale, offset)  # (batch, seq, d_model)

    def logits(self, h: Array) -> Array:
        """The output head: h E_tgt^T (tied) or h W^T.  (..., d_model) -> (..., vocab)."""
        if self.head is not None:
            return self.head(h)  # (..., vocab)
        return F.linear(h, self.target_embedding.weight)  # (..., vocab)

    def encode(self, src_ids: Array, src_lengths: Lengths = None) -> Array:
        """The memory: src_ids int (batch, S) -> (batch, S, d_model)."""
        self.check_call((src_ids,), {})
        self.check_ids(src_ids, "source", self.config.max_source_len, "max_source_len")
        src = self.embed(src_ids, self.source_embedding)  # (batch, S, d_model)
        return self.transformer.encode(src, src_lengths=src_lengths)  # (batch, S, d_model)

    def forward(
        self,
        src_ids: Array,
        tgt_ids: Array,
        *,
        src_lengths: Lengths = None,
        tgt_lengths: Lengths = None,
    ) -> Array:
        self.check_ids(src_ids, "source", self.config.max_source_len, "max_source_len")
        self.check_ids(tgt_ids, "target", self.config.max_target_len, "max_target_len")
        src = self.embed(src_ids, self.source_embedding)  # (batch, S, d_model)
        tgt = self.embed(tgt_ids, self.target_embedding)  # (batch, T, d_model)
        h = self.transformer(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
        return self.logits(h)  # (batch, T, vocab)

    # --- decoding, one token at a time -------------------------------------------------

    def start_decoding(
        self, src_ids: Array, src_lengths: Lengths = None, max_len: int | None = None
    ) -> DecoderState:
        """Run the encoder once and project the cross-attention keys and values once.

        src_ids int (batch, S) -> a :class:`DecoderState` whose cache holds up to
        ``max_len`` (default ``max_target_len``) decoder positions.
        """
        cfg = self.config
        max_len = cfg.max_target_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if max_len > cfg.max_target_len:
            raise ValueError(
                f"max_len {max_len} exceeds the model's max_target_len {cfg.max_target_len}"
            )
        batch, seq = src_ids.shape[0], src_ids.shape[1] if src_ids.ndim == 2 else 0
        lengths = check_lengths(src_lengths, batch, seq, "src_lengths")
        memory = self.encode(src_ids, lengths)  # (batch, S, d_model)
        memory_kv = [
            layer.multihead_attn.project_context(memory)  # (batch, S, d_kv) each
            for layer in self.transformer.decoder.layers
        ]
        cache = self.transformer.new_cache(batch, max_len)
        return DecoderState(memory, memory_kv, lengths, cache)

    def decode_step(
        self, state: DecoderState, tokens: Array, *, return_weights: bool = False
    ) -> Array | tuple[Array, list[dict[str, Array]]]:
        """Feed one new token per row at the next position; return its logits.

        tokens int (batch,) -> logits (batch, vocab) for the token after it; with
        ``return_weights=True`` also each decoder layer's ``"self"`` (batch, heads, 1,
        position + 1) and ``"cross"`` (batch, heads, 1, S) weights.
        """
        xp = array_namespace(tokens)
        position = state.cache.length
        if position >= state.cache.max_len:
            raise ValueError(
                f"the decoder is full: it holds {state.cache.max_len} positions (max_len)"
            )
        ids = xp.reshape(tokens, (tokens.shape[0], 1))  # (batch, 1)
        self.check_ids(ids, "target", self.config.max_target_len, "max_target_len")
        x = self.embed(ids, self.target_embedding, offset=position)  # (batch, 1, d_model)
        h = self.transformer.decode(
            x,
            state.memory,
            src_lengths=state.src_lengths,
            cache=state.cache,
            memory_kv=state.memory_kv,
            return_weights=return_weights,
        )  # (batch, 1, d_model)
        weights = None
        if return_weights:
            h, weights = h
        logits = self.logits(h[:, 0, :])  # (batch, vocab)
        return (logits, weights) if return_weights else logits

    # --- learning ----------------------------------------------------------------------

    def forward_and_save(
        self,
        src_ids: Array,
        tgt_ids: Array,
        *,
        src_lengths: Lengths = None,
        tgt_lengths: Lengths = None,
    ) -> tuple[Array, dict[str, Any]]:
        """The forward, keeping what the backward needs (ids, the Transformer's saved
        state, the decoder's output for the head). -> logits (batch, T, vocab), saved."""
        cfg = self.config
        self.check_ids(src_ids, "source", cfg.max_source_len, "max_source_len")
        self.check_ids(tgt_ids, "target", cfg.max_target_len, "max_target_len")
        src = self.embed(src_ids, self.source_embedding)  # (batch, S, d_model)
        tgt = self.embed(tgt_ids, self.target_embedding)  # (batch, T, d_model)
        h, transformer_saved = self.transformer.forward_and_save(
            src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths
        )  # (batch, T, d_model)
        head_saved = None
        if self.head is not None:
            logits, head_saved = self.head.forward_and_save(h)  # (batch, T, vocab)
        else:
            logits = self.logits(h)  # (batch, T, vocab): h E_tgt^T
        saved = {
            "src_ids": src_ids, "tgt_ids": tgt_ids, "h": h, "head": head_saved,
            "transformer": transformer_saved,
        }  # fmt: skip
        return logits, saved

    def backward(self, grad_logits: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """Head, Transformer, then the two embeddings, in reverse.

            dh            = d logits E_tgt  (tied; W for a separate head),
            dE_tgt       += d logits^T h    (the tied head's use of the table)
            d src, d tgt  = the Transformer's backward
            dE[i]        += sqrt(d_model) * sum of d x over the positions holding token i
                            (positions are constants: their gradient goes nowhere)

        A table used several times (shared embeddings, tied head) gets the sum of every
        use's gradient. grad_logits: (batch, T, vocab) -> ((None, None), grads keyed like
        ``parameters()``); the ids get no gradient.
        """
        scale = math.sqrt(self.config.d_model)
        grads: dict[str, Array] = {}

        def add(key: str, grad: Array) -> None:
            grads[key] = grad if key not in grads else grads[key] + grad

        shared = self.config.share_embeddings
        target_key = "source_embedding.weight" if shared else "target_embedding.weight"
        if self.head is not None:
            (grad_h,), head_grads = self.head.backward(grad_logits, saved["head"])
            add("head.weight", head_grads["weight"])
        else:
            grad_h, grad_table, _ = F.linear_backward(
                grad_logits, saved["h"], self.target_embedding.weight, bias=False
            )  # (batch, T, d_model), (vocab, d_model)
            add(target_key, grad_table)
        (grad_src, grad_tgt), transformer_grads = self.transformer.backward(
            grad_h, saved["transformer"]
        )  # (batch, S, d_model), (batch, T, d_model)
        grads.update(self.prefix_grads("transformer", transformer_grads))
        vocab = self.config.vocab_size
        grad_src_table = F.embedding_backward(grad_src * scale, saved["src_ids"], vocab)  # (v, d)
        grad_tgt_table = F.embedding_backward(grad_tgt * scale, saved["tgt_ids"], vocab)  # (v, d)
        add("source_embedding.weight", grad_src_table)
        add(target_key, grad_tgt_table)
        return (None, None), grads

    # --- saving ------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | Path, *, backend: str | Backend | None = None) -> Seq2Seq:
        """The model saved in ``folder`` (with its tokenizer); a folder of another model
        type, or no model folder at all, is a CheckpointError saying so."""
        from tinytx.pretrained import read_config

        return load_seq2seq(folder, read_config(folder), backend)

    def save(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """Write ``folder``: config.json, model.safetensors and (given a ``tokenizers``
        Tokenizer, or the model's own) tokenizer.json. Returns the folder."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **asdict(self.config)}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(dict(self.state_dict()), str(folder / "model.safetensors"))
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is not None:
            tokenizer.save(str(folder / "tokenizer.json"))
        return folder


def seq2seq_loss(
    model: Seq2Seq,
    src_ids: Array,
    tgt_in: Array,
    tgt_out: Array,
    src_lengths: Lengths = None,
    tgt_lengths: Lengths = None,
) -> float:
    """The teacher-forced cross-entropy, mean over target tokens whose tgt_out != -100.

        loss = mean over (b, t) with tgt_out[b, t] != -100 of
               -log softmax(model(src_ids, tgt_in)[b, t])[tgt_out[b, t]]

    src_ids int (batch, S); tgt_in int (batch, T) (BOS y_1 .. y_n, padded); tgt_out int
    (batch, T) (y_1 .. y_n EOS, padded with -100) -> a Python float.
    """
    logits = model(src_ids, tgt_in, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    return float(F.cross_entropy(logits, tgt_out))  # logits: (batch, T, vocab)


def seq2seq_loss_and_grads(
    model: Seq2Seq,
    src_ids: Array,
    tgt_in: Array,
    tgt_out: Array,
    src_lengths: Lengths = None,
    tgt_lengths: Lengths = None,
) -> tuple[float, dict[str, Array]]:
    """:func:`seq2seq_loss` and its gradient for every parameter (keys and order of
    ``model.parameters()``): forward_and_save, cross_entropy_backward, model.backward."""
    xp = array_namespace(tgt_out)
    model.check_call((src_ids, tgt_in), {"tgt_out": tgt_out})
    logits, saved = model.forward_and_save(
        src_ids, tgt_in, src_lengths=src_lengths, tgt_lengths=tgt_lengths
    )  # (batch, T, vocab)
    loss = F.cross_entropy(logits, tgt_out)  # 0-d
    grad_logits = F.cross_entropy_backward(xp.ones_like(loss), logits, tgt_out)  # (b, T, vocab)
    _, grads = model.backward(grad_logits, saved)
    return float(loss), {key: grads[key] for key in model.parameters()}


def load_seq2seq(
    folder: str | Path,
    config: dict[str, Any],
    backend: str | Backend | None = None,
    attention: str = "softmax",
) -> Seq2Seq:
    """A Seq2Seq folder written by :meth:`Seq2Seq.save`, with its tokenizer when present.

    Called by :func:`tinytx.load_pretrained` for ``model_type == "tinytx-seq2seq"``; a
    folder of another model type is a CheckpointError naming both types.
    """
    from tinytx.pretrained import CheckpointError, read_safetensors

    folder = Path(folder)
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{folder} holds a model of type {config.get('model_type')!r}, not a "
            f"{MODEL_TYPE!r} encoder-decoder"
        )
    if attention != "softmax":
        raise CheckpointError("Seq2Seq computes with softmax attention only")
    try:
        cfg = Seq2SeqConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: {err}") from None
    model = Seq2Seq(cfg, backend=resolve_backend(backend))
    try:
        model.load_state_dict(read_safetensors(folder / "model.safetensors"))
    except StateDictError as err:
        raise CheckpointError(
            f"{folder / 'model.safetensors'} does not match its config.json: {err}"
        ) from None
    path = folder / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        model.tokenizer = Tokenizer.from_file(str(path))
    return model
