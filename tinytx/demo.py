"""The demo behind ``tinytx demo``: a small encoder reads one sentence, traced layer by layer.

Host-side code. The weights are random (seeded): the attention maps show the machinery
at work, not anything learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tinytx.backends import Backend, resolve_backend
from tinytx.layers import Embedding, Encoder
from tinytx.trace import Trace, trace
from tinytx.viz import split_words

__all__ = ["DEMO_SENTENCE", "DemoResult", "run_demo", "run_pretrained_demo"]

DEMO_SENTENCE = "The animal didn't cross the street because it was too tired."


@dataclass
class DemoResult:
    """What the demo computed: the tokens, the trace and every layer's attention weights."""

    tokens: list[str]
    trace: Trace
    weights: list[np.ndarray] | None  # one (heads, seq, seq) array per layer, or None
    output: np.ndarray  # (seq, d_model)


def run_demo(
    sentence: str = DEMO_SENTENCE,
    *,
    backend: str | Backend | None = None,
    seed: int = 0,
    attention: str = "softmax",
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
) -> DemoResult:
    """Embed the words of ``sentence`` (one id per distinct word), add sinusoidal positions,
    run a post-norm encoder and record the trace and attention weights."""
    backend = resolve_backend(backend)
    tokens = split_words(sentence)
    if not tokens:
        raise ValueError("the demo sentence has no words")
    vocab = {word: i for i, word in enumerate(dict.fromkeys(w.lower() for w in tokens))}
    ids_host = np.asarray([[vocab[w.lower()] for w in tokens]], dtype=np.int64)  # (1, seq)

    gen = np.random.default_rng(seed)
    embed = Embedding(len(vocab), d_model, backend=backend, seed=gen)
    encoder = Encoder(
        n_layers, d_model, n_heads, 4 * d_model, positions="sinusoidal",
        attention=attention, backend=backend, seed=gen,
    )  # fmt: skip
    ids = backend.xp.asarray(ids_host, device=backend.device)  # (1, seq)
    wants_weights = encoder.layers[0].self_attn.attention.promises.returns_weights
    with trace(encoder, name="encoder") as recorder:
        x = embed(ids)  # (1, seq, d_model)
        result: Any = encoder(x, return_weights=wants_weights)
    out, weights = result if wants_weights else (result, None)
    host_weights = None
    if weights is not None:
        host_weights = [backend.to_numpy(w)[0] for w in weights]  # (heads, seq, seq) each
    return DemoResult(tokens, recorder, host_weights, backend.to_numpy(out)[0])


def run_pretrained_demo(
    folder: Any,
    sentence: str = DEMO_SENTENCE,
    *,
    backend: str | Backend | None = None,
    attention: str = "softmax",
) -> DemoResult:
    """Run ``sentence`` through a real BERT-family checkpoint (a Hugging Face folder, e.g.
    the installed all-MiniLM-L6-v2) and record the trace and every head's attention."""
    from tinytx.pretrained import load_pretrained

    model = load_pretrained(folder, backend=backend, attention=attention)
    batch = model.tokenizer([sentence])  # word pieces with [CLS] ... [SEP]
    ids = model.backend.asarray(batch.ids)  # (1, seq)
    wants_weights = model.layers[0].self_attn.attention.promises.returns_weights
    with trace(model, name="bert") as recorder:
        out = model(ids, return_weights=wants_weights)
    host_weights = None
    if wants_weights:
        host_weights = [model.backend.to_numpy(w)[0] for w in out.attentions]  # (h, seq, seq)
    hidden = model.backend.to_numpy(out.last_hidden_state)[0]  # (seq, d)
    return DemoResult(batch.tokens[0], recorder, host_weights, hidden)
