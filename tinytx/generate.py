"""Text generation with a GPT: one token at a time, with a key/value cache.

Host-side code: the model computes on its backend; choosing the next token happens here,
on the host, with NumPy, so that a seed gives the same tokens on every backend.

One generation step (see the README's "How generation works" for real shapes):

1. **Prefill.** The prompt's s tokens go through the model once. Every layer writes
   their keys and values into its :class:`~tinytx.layers.kv_cache.LayerKVCache`
   (positions 0 .. s-1); only the last position's logits are kept.
2. **Choose.** From those logits (batch, vocab): greedy takes the argmax; sampling
   divides by the temperature, keeps the top-k and/or the top-p nucleus, and draws from
   the softmax with a seeded ``numpy.random.Generator``.
3. **Decode.** The chosen token alone, (batch, 1), goes through the model at position s.
   Each layer computes one query, key and value, appends the key and value to its cache
   and attends over all s + 1 cached positions. Back to 2, until ``max_new_tokens``
   tokens are generated (or every sequence produced ``stop_token``).

Without the cache (``use_cache=False``) step 3 runs the whole sequence again: the same
logits, at a cost that grows with the length.
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "GenerationError",
    "NonFiniteLogitsError",
    "Step",
    "TextModel",
    "TextRun",
    "check_sampling",
    "generate",
    "load_text_model",
    "sample_next",
    "start_text_generation",
    "stream",
    "stream_text",
]


class GenerationError(ValueError):
    """Arguments that generation cannot use; the message says what was expected."""


@dataclass
class Step:
    """One generated token per sequence.

    position: where the new tokens stand in the sequence (the prompt holds 0 .. s-1);
    tokens: (batch,) int64, the chosen tokens;
    logits: (batch, vocab) float32, the scores they were chosen from (host arrays).
    """

    position: int
    tokens: np.ndarray
    logits: np.ndarray


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise GenerationError unless temperature >= 0, top_k >= 1 and 0 < top_p <= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise GenerationError(f"temperature must be a number >= 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
    ):
        raise GenerationError(f"top_k must be an int >= 1 (or None), got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0
    ):
        raise GenerationError(f"top_p must lie in (0, 1] (or be None), got {top_p!r}")


def sample_next(
    logits: np.ndarray,
    rng: np.random.Generator,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """Choose the next token of each sequence from its logits (host arrays).

    temperature 0: greedy, argmax (the lowest id among equal scores; no random draw).
    Otherwise, for each row:  z = logits / temperature;  keep the ``top_k`` highest z;
    p = softmax(z) over the kept tokens;  keep the smallest set of most likely tokens
    whose probability reaches ``top_p`` (the nucleus; Holtzman et al. 2019);  renormalise
    and draw one token with one uniform number from ``rng``.
    logits: (batch, vocab) -> tokens (batch,) int64.
    """
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)  # (batch,)
    tokens = np.empty(logits.shape[0], dtype=np.int64)
    for row, scores in enumerate(logits):
        z = scores.astype(np.float64) / temperature  # (vocab,) on the host, in float64
        order = np.argsort(-z, kind="stable")  # (vocab,) token ids, most likely first
        if top_k is not None:
            order = order[:top_k]  # (k,)
        kept = z[order]  # (n,)
        p = np.exp(kept - kept[0])  # (n,) softmax numerators, the largest is exp(0) = 1
        p /= p.sum()
        if top_p is not None and top_p < 1.0:
            # The smallest prefix whose probability reaches top_p: up to the first index
            # where the running sum is >= top_p (all of them if rounding never gets there).
            n = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, len(p))
            order, p = order[:n], p[:n] / p[:n].sum()
        cdf = np.cumsum(p)  # (n,)
        pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        tokens[row] = order[min(pick, len(order) - 1)]
    return tokens  # (batch,)


def _prompt_to_host(model: Any, ids: Any) -> tuple[np.ndarray, tuple[bool, int]]:
    """The prompt as a host (batch, seq) int64 array, and how to give the result back:
    (on the model's backend?, the rank the ids came with)."""
    on_backend = model.backend.owns(ids)
    try:
        host = np.asarray(model.backend.to_numpy(ids) if on_backend else ids)
    except (TypeError, ValueError):
        raise GenerationError(
            "token ids must be a (seq,) or (batch, seq) array of ints, with rows of one length"
        ) from None
    if host.size == 0:
        raise GenerationError("the prompt is empty: give at least one token")
    if not np.issubdtype(host.dtype, np.integer):
        raise GenerationError(f"token ids must be integers, got dtype {host.dtype}")
    if host.ndim not in (1, 2):
        raise GenerationError(
            f"token ids must have shape (seq,) or (batch, seq), got {tuple(host.shape)}"
        )
    return np.atleast_2d(host).astype(np.int64), (on_backend, host.ndim)


def _check_prompt(model: Any, host: np.ndarray, max_new_tokens: int, stop_token: Any) -> None:
    config = model.config
    vocab, context = config.vocab_size, config.context_length
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= vocab:
        raise GenerationError(
            f"token ids must lie in [0, {vocab}) (the model's vocabulary), got ids from "
            f"{low} to {high}"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise GenerationError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    seq = host.shape[1]
    if seq > context:
        raise GenerationError(
            f"the prompt has {seq} tokens but the model reads at most {context} "
            "(its context length); shorten the prompt"
        )
    if seq + max_new_tokens > context:
        raise GenerationError(
            f"the prompt ({seq} tokens) plus {max_new_tokens} new tokens exceed the model's "
            f"context length of {context}; ask for at most {context - seq} new tokens"
        )
    if stop_token is not None and (
        isinstance(stop_token, bool)
        or not isinstance(stop_token, (int, np.integer))
        or not 0 <= stop_token < vocab
    ):
        raise GenerationError(f"stop_token must be a token id in [0, {vocab}), got {stop_token!r}")


def stream(
    model: Any,
    ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_token: int | None = None,
    use_cache: bool = True,
) -> Iterator[Step]:
    """Generate token by token: an iterator of :class:`Step`, one as soon as each token is
    chosen. Arguments as in :func:`generate`; they are all checked here, before any step.

    With the cache, a model that has prepared one-token steps (``GPT.one_token_steps``,
    where a fused native applies) gathers its weights once, at the first step: a weight
    changed in place during the stream shows at the next token, a parameter replaced by
    a new array (``load_state_dict``, ``to``) does not, until a new stream.
    """
    check_sampling(temperature, top_k, top_p)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise GenerationError(f"seed must be an int >= 0, got {seed!r}")
    host, _ = _prompt_to_host(model, ids)
    _check_prompt(model, host, max_new_tokens, stop_token)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    return _steps(model, host, max_new_tokens, sampling, seed, stop_token, use_cache)


class NonFiniteLogitsError(GenerationError):
    """The model computed NaN or +inf logits (or a row with no finite logit) from a valid
    prompt: its weights or its attention variant are broken. No token is chosen from them."""


def _check_logits(model: Any, logits: np.ndarray, step: int, position: int) -> None:
    """Raise NonFiniteLogitsError unless every logit is finite or -inf (a token that can never
    be chosen) and every row has a finite one. logits: (batch, vocab), host.

    A token is never chosen from NaN: argmax and sampling would return an arbitrary id and
    the text would look normal. -inf alone is allowed (banned tokens)."""
    if np.isfinite(logits).all():  # the usual case, in one pass over the logits
        return
    nan, pos_inf = np.isnan(logits), np.isposinf(logits)
    no_choice = ~np.any(np.isfinite(logits), axis=-1)  # (batch,)
    if not (nan.any() or pos_inf.any() or no_choice.any()):
        return
    attention = getattr(getattr(model, "attention", None), "name", None)
    suspects = f"its weights or its attention variant {attention!r}" if attention else "its weights"
    raise NonFiniteLogitsError(
        f"the model computed non-finite logits at step {step} (position {position}): "
        f"{int(nan.sum())} NaN and {int(pos_inf.sum())} +inf of {logits.size}; the prompt "
        f"is valid, so {suspects} are broken (no token was chosen)"
    )


def _steps(
    model: Any,
    prompt: np.ndarray,
    max_new_tokens: int,
    sampling: dict[str, Any],
    seed: int,
    stop_token: int | None,
    use_cache: bool,
) -> Iterator[Step]:
    """The generation loop (arguments already checked). prompt: (batch, seq) host ids."""
    rng = np.random.default_rng(seed)
    backend = model.backend
    batch, seq = prompt.shape
    cache = model.new_cache(batch, seq + max_new_tokens) if use_cache and max_new_tokens else None
    tokens = prompt  # (batch, seq + generated so far), host
    model_input = prompt  # what the model reads next: the prompt, then one token (cache)
    finished = np.zeros(batch, dtype=bool)
    # after the prompt, one token at a time: the model's prepared steps, if it has them
    # (the same numbers as calling it, without re-checking its weights at every token)
    prepared = getattr(model, "one_token_steps", None)
    logits_for = prepared(cache) if prepared is not None and cache is not None else None
    for position in range(seq, seq + max_new_tokens):
        if cache is None:
            model_input = tokens  # no cache: the whole sequence, every step
        ids = backend.asarray(model_input, dtype="int64")
        if logits_for is not None and position > seq:  # (batch, 1, vocab)
            logits = logits_for(ids)
        else:
            logits = model(ids, cache=cache, last_only=True)  # (batch, 1, vocab)
        last = np.asarray(backend.to_numpy(logits))[:, 0, :]  # (batch, vocab)
        _check_logits(model, last, position - seq + 1, position)
        chosen = sample_next(last, rng, **sampling)  # (batch,)
        if stop_token is not None:
            chosen = np.where(finished, stop_token, chosen)  # finished rows repeat the stop
            finished |= chosen == stop_token
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)  # (batch, position + 1)
        model_input = chosen[:, None]  # (batch, 1)
        yield Step(position, chosen, last)
        if stop_token is not None and finished.all():
            return


def stream_text(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, **options: Any
) -> Iterator[str]:
    """Continue ``prompt`` and yield the new text piece by piece, as the tokens come.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (anything with ``encode(text).ids`` and
    ``decode(ids)``); ``options`` as in :func:`generate`, checked before the first piece.
    One piece per generated token; a byte-level token may hold part of a character, whose
    text is held back (an empty piece) until the character is complete.
    """
    ids = tokenizer.encode(prompt).ids
    steps = stream(model, [ids], max_new_tokens, **options)
    return _text_pieces(tokenizer, steps)


def _text_pieces(tokenizer: Any, steps: Iterator[Step]) -> Iterator[str]:
    new: list[int] = []
    shown = ""
    for step in steps:
        new.append(int(step.tokens[0]))
        text = tokenizer.decode(new)
        if text.endswith("\ufffd") or len(text) <= len(shown):  # a partial character
            yield ""  # (or an invisible token such as end-of-text): nothing to show yet
            continue
        yield text[len(shown) :]
        shown = text


@dataclass
class TextModel:
    """A GPT and its tokenizer from one Hugging Face folder (see :func:`load_text_model`)."""

    model: Any
    tokenizer: Any  # tokenizers.Tokenizer
    eos_token_id: int | None  # the end-of-text token of config.json, if it has one

    def stream(self, prompt: str, max_new_tokens: int, **options: Any) -> Iterator[str]:
        """:func:`stream_text` with this model and tokenizer."""
        return stream_text(self.model, self.tokenizer, prompt, max_new_tokens, **options)


def load_text_model(path: Any, *, backend: Any = None, attention: str = "softmax") -> TextModel:
    """Load a GPT-2 folder (config.json, model.safetensors, tokenizer.json) for generation.

    Raises :class:`~tinytx.pretrained.CheckpointError` for a folder that is not one.
    """
    from pathlib import Path

    from tinytx.pretrained import CheckpointError, load_pretrained, read_config

    # This module never imports tinytx.models (GPT.generate imports it): no import circle.
    folder = Path(path)
    config = read_config(folder)
    if config.get("model_type") != "gpt2":
        raise CheckpointError(
            f"{folder} holds a {config.get('model_type')!r} model; generation needs a GPT "
            "(model_type 'gpt2')"
        )
    model = load_pretrained(folder, backend=backend, attention=attention)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json: cannot turn text into tokens")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # tokenizers raises its own Exception subclass
        raise CheckpointError(f"cannot read {tokenizer_file}: {err}") from None
    eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, int) and 0 <= eos < model.config.vocab_size else None
    return TextModel(model, tokenizer, eos)


class TextRun:
    """A generation under way: iterate for the pieces of text (one per generated token),
    then :meth:`summary` for the count, time and rate.

    Created by :func:`start_text_generation`, which has already run the prefill and the
    first step, where most failures show, so a caller can report them before printing.
    """

    def __init__(self, pieces: Iterator[str], backend_name: str, use_cache: bool) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self._first = list(itertools.islice(pieces, 1))  # the prefill and the first step
        self._pieces = pieces
        self._backend_name = backend_name
        self._use_cache = use_cache
        self.seconds = 0.0

    def __iter__(self) -> Iterator[str]:
        for piece in itertools.chain(self._first, self._pieces):
            yield piece
            self.tokens += 1
        self.seconds = time.perf_counter() - self.start

    def summary(self) -> str:
        """``[N tokens in S s (R/s), backend, cache on|off]``, after the pieces are consumed."""
        cache = "on" if self._use_cache else "off"
        rate = self.tokens / max(self.seconds, 1e-9)
        return (
            f"[{self.tokens} tokens in {self.seconds:.2f} s ({rate:.1f}/s), "
            f"{self._backend_name}, cache {cache}]"
        )


def start_text_generation(
    model_path: Any,
    prompt: str,
    max_new_tokens: int,
    *,
    backend: Any,
    attention: str = "softmax",
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: bool = True,
    use_cache: bool = True,
    note: Callable[[str], None] | None = None,
) -> TextRun:
    """What ``tinytx generate`` runs: check the sampling options, load the GPT-2 folder
    ``model_path`` (None: tinytx's shipped model, said through ``note``), and start
    continuing ``prompt`` (stopping at the model's end-of-text token when ``stop``).

    temperature None: greedy (0), except with the shipped model, whose greedy text soon
    loops ("the streets of the streets"): there it samples at
    :data:`tinytx.shipped.SHIPPED_SAMPLING` (0.8, and top-k 40 unless given), said in the note.

    Raises GenerationError for bad options or a failing first step, CheckpointError for a
    folder that is not a GPT-2 one, AttentionError when the variant fails.
    """
    message = None
    if model_path is None:
        from tinytx.shipped import SHIPPED_NOTE, SHIPPED_SAMPLING

        message = SHIPPED_NOTE
        if temperature is None:
            temperature, default_top_k = SHIPPED_SAMPLING
            top_k = default_top_k if top_k is None else top_k
            message += f"; temperature {temperature}, top-k {top_k}"
    temperature = 0.0 if temperature is None else temperature
    check_sampling(temperature, top_k, top_p)
    if model_path is None:
        from tinytx.shipped import load_default_text_model

        text_model = load_default_text_model(backend=backend, attention=attention)
        if note is not None:
            note(message)
    else:
        text_model = load_text_model(model_path, backend=backend, attention=attention)
    pieces = text_model.stream(
        prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        stop_token=text_model.eos_token_id if stop else None, use_cache=use_cache,
    )  # fmt: skip
    return TextRun(pieces, text_model.model.backend.name, use_cache)


def generate(
    model: Any,
    ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_token: int | None = None,
    use_cache: bool = True,
) -> Any:
    """``ids`` with up to ``max_new_tokens`` generated tokens appended.

    ids: (batch, seq) or (seq,) int token ids: a host array or list (the result is a NumPy
    int64 array of the same rank) or an array on the model's backend (the result is one
    too). temperature 0 is greedy decoding; temperature > 0 samples, optionally from the
    ``top_k`` most likely tokens and/or the ``top_p`` nucleus (see :func:`sample_next`),
    with ``numpy.random.default_rng(seed)``: the same seed gives the same tokens on every
    backend. ``stop_token``: a sequence that produces it is finished (later positions
    repeat it); generation ends when every sequence is. ``use_cache=False`` recomputes
    the whole sequence at every step (same tokens, slower). The prompt plus the new tokens
    must fit in the model's context.
    """
    host, (on_backend, ndim) = _prompt_to_host(model, ids)
    steps = stream(
        model, host, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, stop_token=stop_token, use_cache=use_cache,
    )  # fmt: skip
    new = [step.tokens[:, None] for step in steps]  # each (batch, 1)
    result = np.concatenate([host, *new], axis=1)  # (batch, seq + generated)
    if ndim == 1:
        result = result[0]  # (seq + generated,), as the prompt came
    return model.backend.asarray(result, dtype="int64") if on_backend else result
