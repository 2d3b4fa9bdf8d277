"""Decoding a Seq2Seq model: greedy, beam search, text in and text out, cross-attention.

Host-side code: the model computes on its backend; choosing tokens happens here, with
NumPy in float64, so the same model gives the same output on every backend.

Every decoder runs the encoder once per input and projects the cross-attention's keys and
values once (``model.start_decoding``); then it feeds one token per step at the next
position (``model.decode_step``), whose self-attention reads the earlier positions from a
key/value cache. A hypothesis's score is the log-probability of its tokens and, when it
ended, of [EOS]:

    score(y) = sum over t of log p(y_t | y_<t, source)

- **Greedy** takes the most likely token at every step.
- **Beam search** keeps the ``beam_width`` best-scoring prefixes at every step, and puts
  a hypothesis aside when it ends with [EOS] among those best; it stops when no kept
  prefix can still beat the best ended one (scores only fall as tokens are added). With
  width 1 it is greedy.
  A wider beam usually scores higher, but can end *below* greedy: a prefix that scores
  well early may continue badly, after it pushed greedy's path out of the beam. So the
  greedy sequence is also a candidate (``keep_greedy=True``): the result never scores
  below greedy's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CrossAttention",
    "Hypothesis",
    "beam_search",
    "cross_attention",
    "cross_attention_map",
    "greedy_decode",
    "score_sequences",
    "translate",
]


@dataclass
class Hypothesis:
    """One decoded output: token ids (no [BOS], no [EOS]); its score (float64, the sum of
    the log-probabilities of its tokens and, if finished, of [EOS]); finished: it ended
    with [EOS] (False when it ran out of positions)."""

    tokens: list[int]
    score: float
    finished: bool


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64.  (..., vocab) -> (..., vocab)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _next_log_p(model: Any, logits: Any) -> np.ndarray:
    """The log-probabilities of the next token, with [PAD] and [BOS] made impossible (-inf):
    a decoder may end with [EOS] but never emit those. (batch, vocab) -> (batch, vocab)."""
    log_p = _log_softmax(model.backend.to_numpy(logits))  # (batch, vocab)
    log_p[:, [model.config.pad_id, model.config.bos_id]] = -np.inf
    return log_p


def _as_ids(model: Any, src_ids: Any) -> Any:
    """Host ids (or a list of lists) -> int64 on the model's backend."""
    backend = model.backend
    if backend.owns(src_ids):
        return src_ids
    return backend.asarray(np.asarray(src_ids, dtype=np.int64))


def _check_max_len(model: Any, max_len: int | None) -> int:
    limit = model.config.max_target_len
    if max_len is None:
        return limit
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= limit:
        raise ValueError(
            f"max_len must be an int in [1, {limit}] (max_target_len), not {max_len!r}"
        )
    return max_len


def greedy_decode(
    model: Any,
    src_ids: Any,
    src_lengths: Sequence[int] | None = None,
    *,
    max_len: int | None = None,
) -> list[Hypothesis]:
    """The most likely token at every step, for a batch of inputs at once.

    src_ids: int (batch, S), host or on the model's backend; src_lengths: real tokens per
    row (None: no padding); max_len: at most this many decoder steps (default and
    maximum: ``max_target_len``) -> one :class:`Hypothesis` per input.
    """
    max_len = _check_max_len(model, max_len)
    ids = _as_ids(model, src_ids)  # (batch, S)
    state = model.start_decoding(ids, src_lengths, max_len)
    return _greedy_steps(model, state, ids.shape[0], max_len)


def _greedy_steps(model: Any, state: Any, batch: int, max_len: int) -> list[Hypothesis]:
    """Greedy decoding from a fresh DecoderState of ``batch`` rows."""
    cfg = model.config
    tokens = np.full(batch, cfg.bos_id, dtype=np.int64)  # (batch,) the last token fed
    out: list[list[int]] = [[] for _ in range(batch)]
    scores = np.zeros(batch)  # (batch,) float64
    finished = np.zeros(batch, dtype=bool)  # (batch,)
    for _ in range(max_len):
        logits = model.decode_step(state, model.backend.asarray(tokens))  # (batch, vocab)
        log_p = _next_log_p(model, logits)  # (batch, vocab)
        choice = log_p.argmax(axis=-1)  # (batch,)
        for b in np.flatnonzero(~finished):
            scores[b] += log_p[b, choice[b]]
            if choice[b] == cfg.eos_id:
                finished[b] = True
            else:
                out[b].append(int(choice[b]))
        if finished.all():
            break
        tokens = np.where(finished, cfg.eos_id, choice)  # ended rows idle on [EOS]
    return [Hypothesis(out[b], float(scores[b]), bool(finished[b])) for b in range(batch)]


def _beam_one(model: Any, state: Any, width: int, max_len: int) -> Hypothesis:
    """Beam search from a fresh DecoderState of one input: the best :class:`Hypothesis`."""
    cfg = model.config
    alive: list[tuple[list[int], float]] = [([], 0.0)]  # prefixes and their scores
    last = np.array([cfg.bos_id], dtype=np.int64)  # (n_alive,) each prefix's last token
    ended: list[Hypothesis] = []
    for _ in range(max_len):
        logits = model.decode_step(state, model.backend.asarray(last))  # (n_alive, vocab)
        log_p = _next_log_p(model, logits)  # (n_alive, vocab)
        totals = np.array([score for _, score in alive])[:, None] + log_p  # (n_alive, vocab)
        order = np.argsort(-totals, axis=None, kind="stable")[: 2 * width]  # best first
        rows, kept = [], []
        for rank, flat in enumerate(order):
            row, token = divmod(int(flat), totals.shape[1])
            prefix, total = alive[row][0], float(totals[row, token])
            if token == cfg.eos_id:
                if rank < width:  # an ending counts only among the width best (as fairseq)
                    ended.append(Hypothesis(prefix, total, True))
            elif len(kept) < width:
                rows.append(row)
                kept.append((prefix + [token], total))
        best_ended = max((h.score for h in ended), default=-np.inf)
        if not kept or kept[0][1] <= best_ended:
            break  # every kept prefix already scores below an ended hypothesis
        alive = kept
        state.select(rows)
        last = np.array([prefix[-1] for prefix, _ in alive], dtype=np.int64)
    else:  # out of positions: the kept prefixes compete unfinished
        ended.extend(Hypothesis(prefix, score, False) for prefix, score in alive)
    return max(ended, key=lambda h: h.score)


def beam_search(
    model: Any,
    src_ids: Any,
    src_lengths: Sequence[int] | None = None,
    *,
    beam_width: int = 4,
    max_len: int | None = None,
    keep_greedy: bool = True,
) -> list[Hypothesis]:
    """The best hypothesis of a beam of ``beam_width`` for each input (see the module
    docstring). src_ids: int (batch, S); src_lengths as for :func:`greedy_decode`.

    ``keep_greedy``: the greedy sequence competes too, so the result never scores below
    greedy's. Each input is searched on its own (its beam is the batch); its encoder runs
    once, and the greedy candidate reuses the memory and cross-attention keys/values.
    """
    from tinytx.layers.transformer import check_lengths
    from tinytx.models.seq2seq import DecoderState

    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
    max_len = _check_max_len(model, max_len)
    ids = _as_ids(model, src_ids)  # (batch, S)
    batch = ids.shape[0]

    lengths = check_lengths(src_lengths, batch, ids.shape[1], "src_lengths")
    results = []
    for b in range(batch):
        row_lengths = None if lengths is None else [lengths[b]]
        state = model.start_decoding(ids[b : b + 1, ...], row_lengths, max_len)  # encodes
        # greedy reads the same memory and cross-attention keys/values, with its own cache
        greedy_state = DecoderState(
            state.memory,
            state.memory_kv,
            state.src_lengths,
            model.transformer.new_cache(1, max_len),
        )
        best = _beam_one(model, state, beam_width, max_len)
        if keep_greedy and beam_width > 1:
            (greedy,) = _greedy_steps(model, greedy_state, 1, max_len)
            best = greedy if greedy.score > best.score else best
        results.append(best)
    return results


def score_sequences(
    model: Any,
    src_ids: Any,
    outputs: Sequence[Sequence[int]],
    src_lengths: Sequence[int] | None = None,
    *,
    finished: Sequence[bool] | None = None,
) -> np.ndarray:
    """The score of given outputs by one teacher-forced forward pass (no cache):
    sum of log p(y_t | y_<t, source), plus log p([EOS] | y) where ``finished[b]``
    (default: all finished).

    src_ids int (batch, S); outputs: one token list per input (no [BOS]/[EOS]) ->
    (batch,) float64. A check on the decoders: a hypothesis's score must equal this.
    """
    cfg = model.config
    ids = _as_ids(model, src_ids)
    finished = [True] * len(outputs) if finished is None else list(finished)
    steps = [len(y) + int(done) for y, done in zip(outputs, finished, strict=True)]
    tgt_in = np.full((len(outputs), max(steps)), cfg.pad_id, dtype=np.int64)  # (batch, T)
    for b, y in enumerate(outputs):
        row = [cfg.bos_id, *y][: steps[b]]
        tgt_in[b, : len(row)] = row
    logits = model(ids, model.backend.asarray(tgt_in), src_lengths=src_lengths)  # (b, T, v)
    log_p = _log_softmax(model.backend.to_numpy(logits))  # (batch, T, vocab)
    scores = np.zeros(len(outputs))
    for b, y in enumerate(outputs):
        wanted = [*y, cfg.eos_id] if finished[b] else list(y)
        scores[b] = sum(log_p[b, t, token] for t, token in enumerate(wanted))
    return scores


def translate(model: Any, texts: Sequence[str], *, beam_width: int = 1) -> list[str]:
    """Texts in, texts out, with the model's tokenizer (a folder loaded with
    ``load_pretrained`` has one). beam_width 1 is greedy."""
    from tinytx.tasks import encode_texts

    tokenizer = _tokenizer(model)
    ids, lengths = encode_texts(tokenizer, texts, model.config.max_source_len)
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
    if beam_width == 1:
        hypotheses = greedy_decode(model, ids, lengths)
    else:
        hypotheses = beam_search(model, ids, lengths, beam_width=beam_width)
    return [tokenizer.decode(h.tokens) for h in hypotheses]


def _tokenizer(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "this model has no tokenizer; load a saved folder (load_pretrained) or set "
            "model.tokenizer"
        )
    return tokenizer


@dataclass
class CrossAttention:
    """Where each output character looked in the source.

    source: the source's characters (a space shown as "␣"); output: the produced
    characters, then "[EOS]" when the output ended; weights: (layers, heads,
    len(output), len(source)) float64, row t the cross-attention of the decoder step
    that produced output[t].
    """

    source: list[str]
    output: list[str]
    weights: np.ndarray

    def select(
        self, layer: int | None = None, head: int | None = None, *, all_heads: bool = False
    ) -> tuple[np.ndarray, str]:
        """The weights to draw and their name.

        layer: default the last (the one closest to the output, usually the clearest
        alignment); head: one head, default the mean over heads; all_heads: every head
        -> (len(output), len(source)), or (heads, len(output), len(source)) with
        ``all_heads``. A layer or head out of range is a ValueError naming the range.
        """
        n_layers, n_heads = self.weights.shape[0], self.weights.shape[1]
        layer = n_layers - 1 if layer is None else layer
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"layer {layer} is out of range: the decoder has layers 0..{n_layers - 1}"
            )
        if head is not None and not 0 <= head < n_heads:
            raise ValueError(f"head {head} is out of range: the model has heads 0..{n_heads - 1}")
        name = f"decoder layer {layer}"
        if all_heads:
            return self.weights[layer], f"{name}, every head"  # (heads, T, S)
        if head is None:
            return self.weights[layer].mean(axis=0), f"{name}, mean of {n_heads} heads"
        return self.weights[layer, head], f"{name}, head {head}"  # (T, S)


def cross_attention(model: Any, text: str) -> CrossAttention:
    """Greedy-decode ``text`` and record every decoder layer's cross-attention at every step."""
    from tinytx.tasks import encode_texts

    cfg = model.config
    tokenizer = _tokenizer(model)
    ids, lengths = encode_texts(tokenizer, [text], cfg.max_source_len)
    state = model.start_decoding(model.backend.asarray(ids), lengths)
    token, output, rows = cfg.bos_id, [], []
    for _ in range(cfg.max_target_len):
        logits, weights = model.decode_step(
            state, model.backend.asarray(np.array([token], dtype=np.int64)), return_weights=True
        )  # (1, vocab); per layer {"cross": (1, heads, 1, S)}
        cross = np.stack([model.backend.to_numpy(w["cross"])[0, :, 0, :] for w in weights])
        rows.append(cross.astype(np.float64))  # (layers, heads, S)
        token = int(np.argmax(model.backend.to_numpy(logits)[0]))
        if token == cfg.eos_id:
            output.append("[EOS]")
            break
        output.append(tokenizer.id_to_token(token))
    source = [tokenizer.id_to_token(int(i)).replace(" ", "␣") for i in ids[0]]
    return CrossAttention(source, output, np.stack(rows, axis=2))  # (layers, heads, T, S)


def cross_attention_map(
    model: Any,
    text: str,
    *,
    layer: int | None = None,
    head: int | None = None,
    all_heads: bool = False,
    colour: bool = False,
    output: str | None = None,
) -> Any:
    """What ``tinytx attention-map --cross`` draws: where each output character looked in
    ``text``, as terminal heatmaps (row = output, column = source) of the weights that
    :meth:`CrossAttention.select` picks; with ``output``, also a labelled PNG.

    Returns a :class:`tinytx.embedding.AttentionMap`. ValueError for a layer or head out
    of range; PlotUnavailable without matplotlib; OSError when the PNG cannot be written.
    """
    from tinytx.embedding import AttentionMap, shorten
    from tinytx.viz import heatmap

    seen = cross_attention(model, text)
    weights, name = seen.select(layer, head, all_heads=all_heads)
    grids = weights if all_heads else weights[None]  # (heads shown, output, source)
    parts = []
    for h, grid in enumerate(grids):
        title = f"{name}{f' ({h})' if all_heads else ''}: row = output, column = source"
        parts += [heatmap(grid, seen.output, seen.source, colour=colour, title=title), ""]
    result = AttentionMap("\n".join(parts))
    if output:
        from tinytx.plot import save_attention_png

        titles = [f"head {h}" for h in range(len(grids))] if all_heads else None
        title = f"cross-attention, {name}: {shorten(text, 50)}"
        png = save_attention_png(
            weights, seen.source, output, row_tokens=seen.output, head_titles=titles, title=title
        )
        result.png = str(png)
    return result
