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

__all__ = [
    "DEMO_SENTENCE",
    "DemoError",
    "DemoResult",
    "demo_text",
    "run_demo",
    "run_pretrained_demo",
]

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


class DemoError(ValueError):
    """A demo that cannot run as asked; ``option`` names the option at fault (``layer``,
    ``head``), or is None when nothing the caller chose is wrong."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def _check_choice(what: str, value: int, count: int, model: str) -> None:
    if not 0 <= value < count:
        raise DemoError(f"{value} is out of range: {model} has {what}s 0..{count - 1}", what)


def _check_finite(result: DemoResult, attention: str) -> None:
    """A forward pass that computed NaN or inf is said so, never drawn as if normal."""
    bad = ~np.isfinite(result.output)  # (seq, d_model)
    if bad.any():
        rows = int(bad.any(axis=-1).sum())
        raise DemoError(
            f"the encoder's output is not finite (NaN or inf) at {rows} of "
            f"{result.output.shape[0]} positions: attention {attention!r} or the weights "
            "computed non-finite numbers from a valid sentence"
        )


def demo_text(
    *,
    backend: str | Backend | None = None,
    seed: int = 0,
    attention: str = "softmax",
    weights: str = "auto",
    layer: int | None = None,
    head: int | None = None,
    colour: bool = False,
    width: int | None = None,
) -> str:
    """Everything ``tinytx demo`` prints: the sentence, its tokens, the trace of every
    layer and one head's attention map, fitted to ``width`` columns (default: the
    terminal's, or 100).

    weights: "pretrained" (the installed all-MiniLM-L6-v2; default layer 3, head 1, the
    head linking "it" to "animal"), "gpt" (the GPT shipped with tinytx, on a line of
    Hamlet), "random" (a seeded two-layer encoder; default layer 0, head 0) or "auto"
    (pretrained when installed, else gpt). Raises :class:`DemoError` for a layer
    or head out of range and for an output that is not finite;
    :class:`~tinytx.pretrained.CheckpointError` when the pretrained model is missing.
    """
    from tinytx.pretrained import (
        default_encoder_folder,
        default_model_path,
        encoder_installed,
        read_config,
    )
    from tinytx.textfmt import output_width, wrap
    from tinytx.viz import heatmap

    backend = resolve_backend(backend)
    width = output_width() if width is None else width
    sentence = DEMO_SENTENCE
    if weights == "pretrained" or (weights == "auto" and encoder_installed()):
        folder = default_encoder_folder()
        config = read_config(folder)
        layer, head = 3 if layer is None else layer, 1 if head is None else head
        _check_choice("layer", layer, config["num_hidden_layers"], "all-MiniLM-L6-v2")
        _check_choice("head", head, config["num_attention_heads"], "all-MiniLM-L6-v2")
        result = run_pretrained_demo(folder, backend=backend, attention=attention)
        about = [
            f"backend {backend.name} ({backend.device}), attention {attention!r}",
            "Real weights: sentence-transformers/all-MiniLM-L6-v2 (6 layers, 12 heads, "
            f"384 wide) from {folder}",
        ]
    elif weights == "gpt" or weights == "auto":
        # Without MiniLM, the GPT shipped in the package: real learned attention (causal, so
        # the map is lower-triangular), not a random encoder's (see README, "tinytx demo").
        from tinytx.shipped import DEMO_LINE, GPT_DEMO_HEAD, run_gpt_demo

        folder = default_model_path()
        config = read_config(folder)
        layer = GPT_DEMO_HEAD[0] if layer is None else layer
        head = GPT_DEMO_HEAD[1] if head is None else head
        _check_choice("layer", layer, config["n_layer"], "the shipped GPT")
        _check_choice("head", head, config["n_head"], "the shipped GPT")
        result = run_gpt_demo(backend=backend, attention=attention)
        sentence = DEMO_LINE
        about = [
            f"backend {backend.name} ({backend.device}), attention {attention!r}",
            f"Real weights: tinytx's shipped GPT ({config['n_layer']} layers, {config['n_head']} "
            f"heads, {config['n_embd']} wide), trained on Shakespeare by tinytx itself; one "
            "token per character. A causal model: each row sees only the tokens before it.",
        ]
    elif weights == "random":
        n_layers, n_heads = 2, 4
        layer, head = layer or 0, head or 0
        _check_choice("layer", layer, n_layers, "the demo encoder")
        _check_choice("head", head, n_heads, "the demo encoder")
        result = run_demo(
            backend=backend, seed=seed, attention=attention, n_layers=n_layers, n_heads=n_heads
        )
        about = [
            f"backend {backend.name} ({backend.device}), attention {attention!r}, seed {seed}",
            "The weights are random (seeded): this shows the machinery, not anything learned.",
        ]
    else:
        choices = "'auto', 'pretrained', 'gpt' or 'random'"
        raise DemoError(f"weights must be {choices}, got {weights!r}")
    _check_finite(result, attention)
    lines = [
        wrap(f"sentence: {sentence}", width, indent=" " * 10),
        wrap(f"tokens:   {result.tokens}", width, indent=" " * 10),
        *(wrap(line, width) for line in about),
        "",
        result.trace.table(width),
        "",
    ]
    if result.weights is None:
        lines.append(f"attention {attention!r} returns no weights, so there is no map to draw.")
        return "\n".join(lines)
    title = f"layer {layer}, head {head}: row = attending token, column = attended token"
    weights_of_head = result.weights[layer][head]  # (seq, seq)
    lines.append(heatmap(weights_of_head, result.tokens, result.tokens, colour=colour, title=title))
    return "\n".join(lines)
