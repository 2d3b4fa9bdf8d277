"""Text -> token ids for pretrained models, with the ``tokenizers`` library.

Host-side code. A Hugging Face model folder ships ``tokenizer.json``: the normaliser
(lower-casing, accent stripping), the pre-tokeniser, the WordPiece vocabulary and the
template that adds ``[CLS]`` and ``[SEP]``. We use it as it is, with two changes:

- **No fixed padding.** all-MiniLM-L6-v2's file pads every text to 128 tokens. We pad
  each batch only to its longest text, and return the lengths, from which the model
  builds the attention mask (True on real tokens). Padding that the mask and the mean
  pooling do not know about would silently change every embedding.
- **Truncation at the model's limit, with a warning.** The shipped file truncates at
  128 tokens without a word. We truncate at ``max_length`` (the model's positions, or
  sentence-transformers' ``max_seq_length`` when the folder has one: 256 for MiniLM) and
  emit a :class:`TruncationWarning` naming the texts that were cut. The kept tokens are
  the first ``max_length - 2`` word pieces, then ``[SEP]``, as sentence-transformers does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinytx.pretrained import CheckpointError

__all__ = ["DEFAULT_MAX_PADDING", "Batch", "Tokenizer", "TruncationWarning", "length_batches"]


class TruncationWarning(UserWarning):
    """A text had more tokens than the model reads; its tail was cut off."""


@dataclass
class Batch:
    """A padded batch of token ids (host NumPy arrays).

    ids: (batch, seq) int64, padded with ``pad_id`` after each text's ``lengths[b]`` tokens;
    type_ids: (batch, seq) int64 (segment ids: all 0 for single texts);
    lengths: (batch,) int64, the number of real tokens of each text;
    tokens: the word pieces of each text, unpadded;
    truncated: the indices (in this batch) of the texts that were cut at ``max_length``.
    """

    ids: np.ndarray
    type_ids: np.ndarray
    lengths: np.ndarray
    tokens: list[list[str]]
    truncated: list[int]


def check_texts(texts: Sequence[str]) -> list[str]:
    """A non-empty list of strings, or a clear error (a bare string is one text, not chars)."""
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got a single string; wrap it: [text]")
    texts = list(texts)
    if not texts:
        raise ValueError("expected at least one text, got an empty list")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, expected str")
    return texts


DEFAULT_MAX_PADDING = 0.1  # length_batches: at most a tenth of a batch's positions padding


def length_batches(
    lengths: Sequence[int], batch_size: int, max_padding: float | None = DEFAULT_MAX_PADDING
) -> list[list[int]]:
    """Group texts into batches by token count, for padding each batch to its longest.

    The texts are taken longest first (ties in the order given). A batch takes the next
    text unless it holds ``batch_size`` texts already, or padding every text to the
    batch's longest (its first) would make more than ``max_padding`` of its positions
    padding. ``max_padding=None`` cuts by count alone, as sentence-transformers does.

    Every position of a batch costs the same in the token-wise layers (the projections,
    the feed-forward), padding or not. Sorting alone still leaves 12-28% of each batch
    padding: in ``tinytx bench embed``'s 256 sentences (6 to 220 tokens), 16,096
    positions in 8 batches hold 12,483 tokens (the longest batch: 5,093 in 7,040); with
    at most a tenth of padding, 16 batches hold them in 13,795 positions. A batch costs
    a few milliseconds beyond its positions, so cutting further gains less than it costs
    (measured: see ``BertModel.embed``).

    lengths: (n,) token counts -> batches of indices into ``lengths``, longest first.

    >>> length_batches([3, 10, 9, 2], batch_size=4)
    [[1, 2], [0], [3]]
    >>> length_batches([3, 10, 9, 2], batch_size=4, max_padding=None)
    [[1, 2, 0, 3]]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    share = isinstance(max_padding, (int, float)) and not isinstance(max_padding, bool)
    if max_padding is not None and not (share and 0.0 <= max_padding < 1.0):
        raise ValueError(f"max_padding must be in [0, 1) or None, got {max_padding!r}")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))  # longest first
    batches: list[list[int]] = []
    batch: list[int] = []
    tokens = 0  # real tokens in ``batch``
    for i in order:
        n = int(lengths[i])
        full = len(batch) == batch_size
        if batch and max_padding is not None:
            positions = (len(batch) + 1) * int(lengths[batch[0]])  # padded to the longest
            full = full or tokens + n < (1.0 - max_padding) * positions
        if full:
            batches.append(batch)
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        batches.append(batch)
    return batches


class Tokenizer:
    """A folder's ``tokenizer.json``, padding per batch and truncating with a warning.

    >>> tok = Tokenizer.from_folder(folder, max_length=256)
    >>> batch = tok(["Hello!", "A longer text."])   # Batch(ids (2, seq), lengths (2,), ...)
    """

    def __init__(self, path: str | Path, *, max_length: int) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} not found: this model folder has no tokenizer")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception on bad JSON
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot read tokenizer {path}: {reason}") from None
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3, got {max_length!r}")
        self.path, self.max_length = path, max_length
        padding = self._tok.padding or {}
        self.pad_id = int(padding.get("pad_id", self._tok.token_to_id("[PAD]") or 0))
        self._tok.no_padding()  # we pad per batch ourselves, see the module docstring
        self._tok.enable_truncation(max_length)  # counts [CLS] and [SEP]; the rest overflows

    @classmethod
    def from_folder(cls, folder: str | Path, *, max_length: int) -> Tokenizer:
        """The tokenizer of a Hugging Face model folder (its ``tokenizer.json``)."""
        return cls(Path(folder) / "tokenizer.json", max_length=max_length)

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of one text, with its special tokens ([CLS] ... [SEP])."""
        return self(check_texts([text]), warn=False).tokens[0]

    def encode(self, texts: Sequence[str], *, warn: bool = True) -> list[Any]:
        """Tokenize ``texts`` without padding -> one ``tokenizers.Encoding`` per text
        (``.ids``, ``.type_ids``, ``.tokens``).

        A text longer than ``max_length`` tokens keeps its first ``max_length`` (with
        [CLS] and [SEP]); a :class:`TruncationWarning` says which (unless ``warn=False``).
        """
        texts = check_texts(texts)
        encodings = self._tok.encode_batch(texts)
        truncated = [b for b, enc in enumerate(encodings) if enc.overflowing]
        if truncated and warn:
            shown = ", ".join(repr(_preview(texts[b])) for b in truncated[:3])
            more = f" and {len(truncated) - 3} more" if len(truncated) > 3 else ""
            warnings.warn(
                f"{len(truncated)} text(s) longer than the model's {self.max_length} tokens "
                f"were truncated to their first {self.max_length} tokens: {shown}{more}",
                TruncationWarning,
                stacklevel=3,
            )
        return encodings

    def pad(self, encodings: Sequence[Any]) -> Batch:
        """Encodings from :meth:`encode` -> one :class:`Batch` padded to its longest text."""
        lengths = np.asarray([len(e.ids) for e in encodings], dtype=np.int64)  # (batch,)
        seq = int(lengths.max())
        ids = np.full((len(encodings), seq), self.pad_id, dtype=np.int64)  # (batch, seq)
        type_ids = np.zeros((len(encodings), seq), dtype=np.int64)  # (batch, seq)
        for b, enc in enumerate(encodings):
            ids[b, : lengths[b]] = enc.ids
            type_ids[b, : lengths[b]] = enc.type_ids
        truncated = [b for b, enc in enumerate(encodings) if enc.overflowing]
        tokens = [list(enc.tokens) for enc in encodings]
        return Batch(ids, type_ids, lengths, tokens, truncated)

    def __call__(self, texts: Sequence[str], *, warn: bool = True) -> Batch:
        """Tokenize ``texts`` into one batch padded to its longest text (see :meth:`encode`)."""
        return self.pad(self.encode(texts, warn=warn))


def _preview(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
