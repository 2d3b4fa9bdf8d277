"""The GPT shipped inside tinytx, and the attention of causal models for learners.

Host-side code. ``tinytx/default_model/`` is package data: a character-level GPT of
Shakespeare's plays trained by ``tinytx train --preset shakespeare-default`` (its
README.md is the model card), so ``tinytx generate "ROMEO:"``, ``tinytx attention-map``
and ``tinytx demo`` have a real, trained model with nothing else installed and no
download. Its weights are checked against ``model.safetensors.sha256`` on every load
(:func:`tinytx.pretrained.verify_weights`).

- :func:`load_default_text_model`: the shipped GPT and its tokenizer, ready to generate.
- :class:`CausalInspector`: a GPT seen the way :func:`tinytx.embedding.attention_map`
  reads a BERT model (``config.num_hidden_layers``, ``inspect(text)``), so one function
  draws both. A causal model's map is lower-triangular: token i attends to 0..i only.
- :func:`load_attention_model`: what ``tinytx attention-map`` draws: a BERT-family or
  GPT-2 folder, or with no folder MiniLM when installed, else the shipped GPT.
- :func:`run_gpt_demo`: ``tinytx demo`` on the shipped GPT (when MiniLM is not installed).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinytx.backends import Backend
from tinytx.pretrained import CheckpointError, default_model_path, read_config

__all__ = [
    "DEMO_LINE",
    "GPT_DEMO_HEAD",
    "SHIPPED_NOTE",
    "SHIPPED_SAMPLING",
    "CausalInspector",
    "LayerCounts",
    "default_model_path",
    "generation_speed",
    "load_attention_model",
    "load_default_text_model",
    "run_gpt_demo",
    "token_label",
]

# A held-out line (Hamlet is a validation play: the model never trained on it).
DEMO_LINE = "To be, or not to be: that is"

# The head `tinytx demo` draws by default on the shipped GPT: (layer, head). Layer 0, head 5
# puts 0.95 of its weight on the previous character (measured on the first lines of Hamlet).
GPT_DEMO_HEAD = (0, 5)

SHIPPED_NOTE = "using tinytx's shipped model (a Shakespeare GPT); --model DIR for another"
# tinytx generate's sampling with the shipped model when --temperature is not given:
# (temperature, top_k). Greedy decoding of a small character model soon repeats a phrase.
SHIPPED_SAMPLING = (0.8, 40)


def load_default_text_model(
    *, backend: str | Backend | None = None, attention: str = "softmax"
) -> Any:
    """The shipped GPT with its tokenizer (a :class:`tinytx.generate.TextModel`), weights
    checked against their SHA-256. CheckpointError when the install lacks the folder or its
    weights were altered."""
    from tinytx.generate import load_text_model

    return load_text_model(default_model_path(), backend=backend, attention=attention)


@dataclass(frozen=True)
class LayerCounts:
    """The two counts :func:`tinytx.embedding.attention_map` reads, in BERT's names."""

    num_hidden_layers: int
    num_attention_heads: int


@dataclass
class CausalInspection:
    """One text seen through a GPT (host NumPy): its tokens as printable labels and every
    head's attention weights (layers, heads, seq, seq), zero above the diagonal."""

    tokens: list[str]
    hidden_states: Any  # None: a GPT inspection records attention only
    attentions: np.ndarray


def token_label(piece: str) -> str:
    """A token's text as a visible label: space -> '␣', newline -> '⏎', tab -> '⇥'."""
    return piece.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


class CausalInspector:
    """A GPT and its tokenizer, seen as :func:`tinytx.embedding.attention_map` sees a model:
    ``config.num_hidden_layers``, ``config.num_attention_heads`` and ``inspect(text)``."""

    def __init__(self, text_model: Any, name: str) -> None:
        self.text_model = text_model
        self.name = name
        cfg = text_model.model.config
        self.config = LayerCounts(cfg.n_layers, cfg.n_heads)

    @property
    def backend(self) -> Backend:
        return self.text_model.model.backend

    def inspect(self, text: str) -> CausalInspection:
        """Every head's attention over ``text``'s tokens.

        A text longer than the model's context keeps its last ``context_length`` tokens,
        with a :class:`tinytx.tokenizer.TruncationWarning`. ValueError for an empty text.
        -> CausalInspection(tokens, None, attentions (layers, heads, seq, seq) host float).
        """
        from tinytx.tokenizer import TruncationWarning

        model, tokenizer = self.text_model.model, self.text_model.tokenizer
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError("the text is empty: there is no token to draw")
        limit = model.config.context_length
        if len(ids) > limit:
            warnings.warn(
                f"the text has {len(ids)} tokens; {self.name} reads {limit}: keeping the last "
                f"{limit}",
                TruncationWarning,
                stacklevel=2,
            )
            ids = ids[-limit:]
        device_ids = self.backend.asarray(np.asarray([ids], dtype=np.int64))  # (1, seq)
        _, weights = model(device_ids, return_weights=True)  # [(1, heads, seq, seq)] * L
        to_host = self.backend.to_numpy
        attentions = np.stack([to_host(w)[0] for w in weights])  # (L, heads, seq, seq)
        tokens = [token_label(tokenizer.decode([i])) for i in ids]
        return CausalInspection(tokens, None, attentions)

    def __repr__(self) -> str:
        c = self.config
        counts = f"layers={c.num_hidden_layers}, heads={c.num_attention_heads}"
        return f"CausalInspector({self.name}, {counts})"


def load_attention_model(
    folder: str | Path | None,
    *,
    backend: str | Backend | None = None,
    attention: str = "softmax",
) -> tuple[Any, str | None]:
    """The model ``tinytx attention-map`` draws, and a note for stderr (or None).

    folder: a BERT-family folder (-> BertModel) or a GPT-2 folder with a tokenizer (->
    :class:`CausalInspector`). None: the installed all-MiniLM-L6-v2 when present, else the
    shipped GPT (and the note says so). CheckpointError for anything else.
    """
    from tinytx.embedding import load_encoder
    from tinytx.pretrained import encoder_installed

    if folder is None:
        if encoder_installed():
            return load_encoder(None, backend=backend, attention=attention), None
        text_model = load_default_text_model(backend=backend, attention=attention)
        note = f"all-MiniLM-L6-v2 is not installed: {SHIPPED_NOTE}"
        return CausalInspector(text_model, "the shipped model"), note
    if read_config(folder).get("model_type") == "gpt2":
        from tinytx.generate import load_text_model

        text_model = load_text_model(folder, backend=backend, attention=attention)
        return CausalInspector(text_model, str(folder)), None
    return load_encoder(str(folder), backend=backend, attention=attention), None


def run_gpt_demo(
    text: str = DEMO_LINE, *, backend: str | Backend | None = None, attention: str = "softmax"
) -> Any:
    """``text`` through the shipped GPT, traced layer by layer, with every head's attention.

    -> :class:`tinytx.demo.DemoResult` (tokens as labels, the trace, one (heads, seq, seq)
    array per layer or None when the variant returns no weights, and the logits
    (seq, vocab) as ``output``).
    """
    from tinytx.demo import DemoResult
    from tinytx.trace import trace

    text_model = load_default_text_model(backend=backend, attention=attention)
    model, tokenizer = text_model.model, text_model.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise CheckpointError("the demo text is empty")
    device_ids = model.backend.asarray(np.asarray([ids], dtype=np.int64))  # (1, seq)
    wants_weights = model.attention.promises.returns_weights
    with trace(model, name="gpt") as recorder:
        result = model(device_ids, return_weights=wants_weights)
    logits, weights = result if wants_weights else (result, None)
    host_weights = None
    if weights is not None:
        host_weights = [model.backend.to_numpy(w)[0] for w in weights]  # (heads, seq, seq)
    tokens = [token_label(tokenizer.decode([i])) for i in ids]
    return DemoResult(tokens, recorder, host_weights, model.backend.to_numpy(logits)[0])


def generation_speed(
    text_model: Any | None = None,
    *,
    prompt: str = "ROMEO:",
    new_tokens: int = 120,
    repeats: int = 3,
    backend: str | Backend | None = None,
) -> dict[str, float]:
    """Tokens per second of greedy generation, with and without the KV cache.

    text_model: a :class:`tinytx.generate.TextModel` (default: the shipped GPT on
    ``backend``). Each mode generates ``new_tokens`` tokens after ``prompt`` ``repeats``
    times; the best (shortest) run counts, as timeit does, so other work on the machine
    inflates it least. -> {"cached": tokens/s, "uncached": tokens/s, "new_tokens": n}.
    """
    import time

    text_model = load_default_text_model(backend=backend) if text_model is None else text_model
    result: dict[str, float] = {"new_tokens": new_tokens}
    for name, use_cache in (("cached", True), ("uncached", False)):
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            pieces = list(text_model.stream(prompt, new_tokens, use_cache=use_cache))
            text_model.model.backend.synchronize()
            best = min(best, time.perf_counter() - start)
        result[name] = len(pieces) / best
    return result
