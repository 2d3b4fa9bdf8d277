"""Sequence-to-sequence tasks that need cross-attention, generated with a seed.

Host-side code (NumPy on the host; the model computes on its backend).

- ``dates``: a date written the way people write it, in one of many formats
  ("saturday 9 may 2018", "9/5/18", "May 9th, 2018", "09.05.2018", ...) -> the same
  date in ISO 8601 ("2018-05-09"). The classic exercise for learning attention: each
  output digit must find the words of the source that hold it, wherever the format put
  them. Numeric formats are day-first (9/5/18 is the 9th of May); two-digit years mean
  1950..2049.
- ``reverse``: a string of lowercase letters -> the same string backwards; its
  cross-attention is the anti-diagonal.

:class:`Seq2SeqTask` is what the training loop (:mod:`tinytx.train`) drives: ``batch(rng)``
draws a padded batch, ``loss_and_grads(model, batch)`` is the teacher-forced cross-entropy
and its gradients, ``evaluate(model)`` the exact match of greedy decoding on 1000 held-out
examples (never trained on), ``save(model, folder)`` writes the model folder.
"""

from __future__ import annotations

import calendar
import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinytx.backends import Backend, resolve_backend

__all__ = [
    "SPECIAL_TOKENS",
    "TASKS",
    "Seq2SeqBatch",
    "Seq2SeqTask",
    "TaskError",
    "date_example",
    "encode_texts",
    "examples",
    "get_task",
    "reverse_example",
    "seq2seq_tokenizer",
    "train_seq2seq",
]

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


class TaskError(ValueError):
    """An unknown task, or text the task's tokenizer cannot read; the message says why."""


# --- dates -------------------------------------------------------------------------------

FIRST_DAY = datetime.date(1950, 1, 1)
LAST_DAY = datetime.date(2049, 12, 31)
MONTHS = [calendar.month_name[m].lower() for m in range(1, 13)]  # january .. december
WEEKDAYS = [calendar.day_name[d].lower() for d in range(7)]  # monday .. sunday


def _ordinal(day: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 22 -> '22nd'."""
    if 10 <= day % 100 <= 20:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


def _month_short(m: int) -> str:
    name = MONTHS[m - 1]
    return "sept" if name == "september" else name[:3]


# Each format: a date -> how a person might write it. Day-first whenever all numeric.
_DATE_FORMATS: list[Callable[[datetime.date], str]] = [
    lambda d: f"{WEEKDAYS[d.weekday()]} {d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day}/{d.month}/{d.year % 100:02d}",
    lambda d: f"{MONTHS[d.month - 1].title()} {_ordinal(d.day)}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()].title()}, {MONTHS[d.month - 1].title()} {d.day}, {d.year}",
    lambda d: f"{_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day:02d}-{d.month:02d}-{d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day} {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()][:3]} {d.day} {_month_short(d.month)} {d.year % 100:02d}",
    lambda d: f"{d.day} {MONTHS[d.month - 1].upper()} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1].title()}, {d.year}",
    lambda d: f"{d.day}.{d.month}.{d.year}",
    lambda d: f"{_month_short(d.month).title()} {d.day}, {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()][:3]}, {d.day} {_month_short(d.month)} {d.year}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
]


def date_example(rng: np.random.Generator) -> tuple[str, str]:
    """One (human-written date, ISO 8601 date) pair, e.g. ("9 may 2018", "2018-05-09")."""
    span = (LAST_DAY - FIRST_DAY).days
    day = FIRST_DAY + datetime.timedelta(days=int(rng.integers(0, span + 1)))
    written = _DATE_FORMATS[int(rng.integers(0, len(_DATE_FORMATS)))](day)
    return written, day.isoformat()


# --- reverse -----------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reverse_example(rng: np.random.Generator) -> tuple[str, str]:
    """One (letters, letters reversed) pair of 3..16 lowercase letters."""
    n = int(rng.integers(3, 17))
    text = "".join(LETTERS[int(i)] for i in rng.integers(0, len(LETTERS), size=n))
    return text, text[::-1]


@dataclass(frozen=True)
class TaskSpec:
    """A task's generator, the characters it uses and the positions it needs."""

    name: str
    make: Callable[[np.random.Generator], tuple[str, str]]
    alphabet: str
    max_source_len: int
    max_target_len: int  # decoder positions: BOS + the longest target (EOS is predicted)


_DATE_ALPHABET = " ,-./0123456789" + LETTERS + "".join(sorted({c.upper() for c in LETTERS}))
TASKS: dict[str, TaskSpec] = {
    "dates": TaskSpec("dates", date_example, _DATE_ALPHABET, 40, 11),
    "reverse": TaskSpec("reverse", reverse_example, LETTERS, 16, 17),
}


def get_task(name: str) -> TaskSpec:
    """The task called ``name`` or a TaskError listing the known ones."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def examples(name: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (source, target) pairs of task ``name``, the same for the same seed."""
    spec = get_task(name)
    rng = np.random.default_rng(seed)
    return [spec.make(rng) for _ in range(n)]


# --- tokens ------------------------------------------------------------------------------


def seq2seq_tokenizer(alphabet: str) -> Any:
    """A character-level ``tokenizers.Tokenizer``: [PAD] 0, [BOS] 1, [EOS] 2, [UNK] 3,
    then each character of ``alphabet`` in order. One character, one token; the ``Fuse``
    decoder joins them back without spaces. Save it with ``.save("tokenizer.json")``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_len: int, *, what: str = "source"
) -> tuple[np.ndarray, list[int]]:
    """Texts -> (ids (batch, longest) int64 padded with [PAD], lengths), host side.

    A character the tokenizer does not know, a special token typed as text, an empty
    text or one longer than ``max_len`` characters is a TaskError naming it.
    """
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got a single string; wrap it: [text]")
    special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    rows = []
    for text in texts:
        if not isinstance(text, str) or not text:
            raise TaskError(f"each {what} must be a non-empty string, got {text!r}")
        encoding = tokenizer.encode(text)
        for token_id, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id in special:
                raise TaskError(
                    f"{what} {text!r}: {text[start:stop]!r} is not in the model's vocabulary"
                )
        if len(encoding.ids) > max_len:
            raise TaskError(
                f"{what} {text!r} has {len(encoding.ids)} characters; the model reads at "
                f"most {max_len}"
            )
        rows.append(encoding.ids)
    lengths = [len(r) for r in rows]
    ids = np.zeros((len(rows), max(lengths)), dtype=np.int64)  # (batch, longest), [PAD] = 0
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
    return ids, lengths


# --- the task the training loop drives ---------------------------------------------------


@dataclass
class Seq2SeqBatch:
    """A teacher-forcing batch, host arrays.

    src_ids (batch, S) int64 padded with [PAD]; src_lengths (batch,);
    tgt_in (batch, T): [BOS] y_1 .. y_n padded with [PAD]; tgt_lengths (batch,) = n + 1;
    tgt_out (batch, T): y_1 .. y_n [EOS] padded with -100 (ignored by the loss).
    """

    src_ids: np.ndarray
    src_lengths: list[int]
    tgt_in: np.ndarray
    tgt_out: np.ndarray
    tgt_lengths: list[int]

    @property
    def n_tokens(self) -> int:
        """Target tokens the loss counts (EOS included)."""
        return int(sum(self.tgt_lengths))


class Seq2SeqTask:
    """A generated task as the training loop sees it.

    ``Seq2SeqTask("dates", batch_size=64, seed=0)``: training pairs are drawn fresh for
    every batch; the 1000 evaluation pairs (``eval_size``) come from a separate seed and
    any training pair whose source is among them is drawn again, so evaluation is on
    inputs never trained on.
    """

    def __init__(
        self,
        name: str,
        *,
        batch_size: int = 64,
        seed: int = 0,
        eval_size: int = 1000,
        backend: str | Backend | None = None,
    ) -> None:
        self.spec = get_task(name)
        self.name = name
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TaskError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size, self.backend = batch_size, resolve_backend(backend)
        self.tokens_per_batch = batch_size * self.spec.max_target_len  # about: targets + EOS
        self.tokenizer = seq2seq_tokenizer(self.spec.alphabet)
        self.eval_pairs = examples(name, eval_size, seed=10_000 + seed)
        self._held_out = {source for source, _ in self.eval_pairs}

    @property
    def vocab_size(self) -> int:
        """Special tokens plus the task's characters."""
        return self.tokenizer.get_vocab_size()

    def model_config(self, **overrides: Any) -> Any:
        """A :class:`~tinytx.models.seq2seq.Seq2SeqConfig` sized for this task."""
        from tinytx.models.seq2seq import Seq2SeqConfig

        settings = dict(
            vocab_size=self.vocab_size,
            max_source_len=self.spec.max_source_len,
            max_target_len=self.spec.max_target_len,
        )
        settings.update(overrides)
        return Seq2SeqConfig(**settings)

    def make_batch(self, pairs: Sequence[tuple[str, str]]) -> Seq2SeqBatch:
        """(source, target) pairs -> a padded :class:`Seq2SeqBatch`."""
        src_ids, src_lengths = encode_texts(
            self.tokenizer, [s for s, _ in pairs], self.spec.max_source_len
        )
        tgt_ids, tgt_lengths = encode_texts(
            self.tokenizer, [t for _, t in pairs], self.spec.max_target_len - 1, what="target"
        )
        batch, longest = tgt_ids.shape
        tgt_in = np.zeros((batch, longest + 1), dtype=np.int64)  # (batch, T) [PAD] = 0
        tgt_out = np.full((batch, longest + 1), -100, dtype=np.int64)  # (batch, T)
        for b, n in enumerate(tgt_lengths):
            tgt_in[b, 0] = SPECIAL_TOKENS.index(BOS)
            tgt_in[b, 1 : n + 1] = tgt_ids[b, :n]
            tgt_out[b, :n] = tgt_ids[b, :n]
            tgt_out[b, n] = SPECIAL_TOKENS.index(EOS)
        return Seq2SeqBatch(src_ids, src_lengths, tgt_in, tgt_out, [n + 1 for n in tgt_lengths])

    def batch(self, rng: np.random.Generator) -> Seq2SeqBatch:
        """``batch_size`` fresh training pairs, none of whose sources is held out."""
        pairs: list[tuple[str, str]] = []
        while len(pairs) < self.batch_size:
            pair = self.spec.make(rng)
            if pair[0] not in self._held_out:
                pairs.append(pair)
        return self.make_batch(pairs)

    def loss_and_grads(self, model: Any, batch: Seq2SeqBatch) -> tuple[float, dict[str, Any]]:
        """Mean cross-entropy over the target tokens (padding ignored) and its gradients,
        keyed like ``model.parameters()``."""
        from tinytx.models.seq2seq import seq2seq_loss_and_grads

        return seq2seq_loss_and_grads(model, *self._on_backend(batch))

    def loss(self, model: Any, batch: Seq2SeqBatch) -> float:
        """The mean cross-entropy alone (no gradients)."""
        from tinytx.models.seq2seq import seq2seq_loss

        return seq2seq_loss(model, *self._on_backend(batch))

    def _on_backend(self, batch: Seq2SeqBatch) -> tuple[Any, ...]:
        asarray = self.backend.asarray
        return (
            asarray(batch.src_ids),
            asarray(batch.tgt_in),
            asarray(batch.tgt_out),
            batch.src_lengths,
            batch.tgt_lengths,
        )

    def evaluate(self, model: Any, *, batch_size: int = 250) -> dict[str, float]:
        """Greedy decoding of the held-out pairs: ``exact_match`` (the fraction whose whole
        output equals the target) and ``val_loss`` (teacher-forced cross-entropy)."""
        from tinytx.translate import greedy_decode

        correct, total_loss = 0, 0.0
        for start in range(0, len(self.eval_pairs), batch_size):
            pairs = self.eval_pairs[start : start + batch_size]
            batch = self.make_batch(pairs)
            total_loss += self.loss(model, batch) * len(pairs)
            hypotheses = greedy_decode(model, batch.src_ids, batch.src_lengths)
            for (_, target), hypothesis in zip(pairs, hypotheses, strict=True):
                correct += self.tokenizer.decode(hypothesis.tokens) == target
        n = len(self.eval_pairs)
        return {"exact_match": correct / n, "val_loss": total_loss / n}

    def save(self, model: Any, folder: str | Path) -> Path:
        """Write the model folder with this task's tokenizer (see ``Seq2Seq.save``)."""
        return model.save(folder, self.tokenizer)


# --- training: the generic loop of tinytx.train with a task's presets ---------------------

# Per task: the model and optimisation that reach the task's target within minutes on
# two CPU cores. layers = encoder layers = decoder layers; width = d_model; d_ff = 4 width.
SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    "dates": dict(
        layers=2, heads=4, width=64, batch_size=64, steps=1200, lr=2e-3, min_lr=1e-4,
        warmup=100, weight_decay=0.01, beta2=0.98, eval_every=200,
    ),
    "reverse": dict(
        layers=2, heads=4, width=64, batch_size=64, steps=2000, lr=2e-3, min_lr=1e-4,
        warmup=100, weight_decay=0.01, beta2=0.98, eval_every=250,
    ),
}  # fmt: skip


def train_seq2seq(
    *,
    task: str = "dates",
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    backend: str | Backend | None = None,
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a :class:`~tinytx.models.seq2seq.Seq2Seq` on a generated task; write ``out``.

    The loop is :func:`tinytx.train.run` (progress bar, evaluation, metrics.json,
    loss.png, checkpoints, Ctrl-C and ``resume``). overrides: settings of
    :class:`tinytx.train.TrainSettings` (``steps``, ``lr``, ``layers``, ``width``, ...;
    None = the task's preset). ``out`` gets a Seq2Seq folder (config.json,
    model.safetensors, tokenizer.json) and metrics.json with ``exact_match`` on the 1000
    held-out examples. Bad settings raise :class:`tinytx.train.TrainError`.
    """
    import json
    from dataclasses import replace

    from tinytx import train as loop
    from tinytx.models.seq2seq import Seq2Seq

    spec = get_task(task)
    not_here = [name for name in ("data", "context", "attention") if overrides.get(name)]
    if not_here:
        raise loop.TrainError(
            "a task trains a seq2seq model on generated examples; "
            f"{', '.join('--' + name for name in not_here)}: for GPT training only "
            "(tinytx train without --task)"
        )
    overrides = {k: v for k, v in overrides.items() if k not in ("data", "context", "attention")}
    backend = resolve_backend(backend)
    loop._set_threads(threads)
    if resume is not None:
        folder = Path(resume)
        trainer = loop.read_trainer_state(folder)
        settings = loop.TrainSettings(**trainer["settings"])
        if settings.data != f"task:{task}":
            raise loop.TrainError(f"{folder} was trained on {settings.data!r}, not task:{task}")
        settings = replace(settings, **{k: overrides[k] for k in ("steps", "eval_every")
                                        if overrides.get(k) is not None})  # fmt: skip
        loop.check_settings(settings)
        if settings.steps <= trainer["step"]:
            raise loop.TrainError(
                f"{folder} has already trained {trainer['step']} of {settings.steps} steps; "
                "pass a larger --steps to continue"
            )
        out = folder
    else:
        if out is None:
            raise loop.TrainError("give --out DIR (where the trained model goes) or --resume DIR")
        preset = {**SEQ2SEQ_PRESETS[spec.name], "data": f"task:{spec.name}", "activation": "relu"}
        preset.update({k: v for k, v in overrides.items() if v is not None})
        settings = loop.settings_for("nanogpt-cpu", **preset)
        out = Path(out)
        loop._prepare_out(out, force)
    if settings.attention != "softmax":
        raise loop.TrainError("the Seq2Seq model computes with softmax attention only")
    data = Seq2SeqTask(spec.name, batch_size=settings.batch_size, seed=settings.seed,
                       backend=backend)  # fmt: skip
    config = data.model_config(
        d_model=settings.width, n_heads=settings.heads, n_encoder_layers=settings.layers,
        n_decoder_layers=settings.layers, d_ff=4 * settings.width,
        activation=settings.activation,
    )  # fmt: skip
    model = Seq2Seq(config, backend=backend, seed=settings.seed)
    metrics = loop.run(
        model, data, settings, out, resume=resume is not None, progress=progress, echo=echo
    )
    last = metrics["evals"][-1] if metrics.get("evals") else {}
    metrics = {"task": spec.name, "exact_match": last.get("exact_match"), **metrics}
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
    return metrics
