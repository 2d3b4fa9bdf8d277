"""The library functions behind the thin command line (issue 14): each command parses,
calls one of these and prints, so scripts and learners get the same results and messages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tinytx.bench.common import (
    add_timing_arguments,
    disagreeing_cases,
    report,
    time_against_torch,
    with_verdicts,
)
from tinytx.generate import TextRun, load_text_model, start_text_generation
from tinytx.plugins import AttentionError, get_attention
from tinytx.testing import ConformanceReport, PropertyResult
from tinytx.train import summary_line, train_model

GPT2_FOLDER = Path(__file__).parent / "fixtures" / "tiny_gpt2"


# --- check-plugin: options and verdict ------------------------------------------------------


def test_parse_options_types_the_values() -> None:
    window = get_attention("sliding_window")
    assert window.parse_options(["window=3"]) == {"window": 3}
    assert window.parse_options([]) == {}


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("window", "expected KEY=VALUE, got 'window'"),
        ("=3", "expected KEY=VALUE, got '=3'"),
        ("size=3", "attention 'sliding_window' has no option 'size'; its options: window"),
        ("window=wide", "option 'window' of 'sliding_window' must be int, got 'wide'"),
    ],
)
def test_parse_options_names_what_was_expected(pair: str, message: str) -> None:
    with pytest.raises(AttentionError) as caught:
        get_attention("sliding_window").parse_options([pair])
    assert str(caught.value) == message


def test_failure_line_counts_the_tested_properties() -> None:
    results = {
        "finite": PropertyResult("finite", "failed", "NaN"),
        "shape_dtype": PropertyResult("shape_dtype", "passed"),
        "mask": PropertyResult("mask", "skipped", "not promised"),
    }
    report_ = ConformanceReport("x", "numpy", results)
    assert report_.failure_line() == "attention 'x' failed 1 of 2 properties on numpy: finite"


# --- generate -------------------------------------------------------------------------------


def test_text_run_counts_the_pieces_and_says_so() -> None:
    run = TextRun(iter(["a", "b", ""]), "numpy", use_cache=False)
    assert "".join(run) == "ab" and run.tokens == 3
    assert run.summary().startswith("[3 tokens in ")
    assert run.summary().endswith(", numpy, cache off]")


def test_start_text_generation_gives_the_models_continuation(backend) -> None:
    notes: list[str] = []
    run = start_text_generation(
        GPT2_FOLDER, "hello", 5, backend=backend, stop=False, note=notes.append
    )
    text_model = load_text_model(GPT2_FOLDER, backend=backend)
    assert list(run) == list(text_model.stream("hello", 5))
    assert notes == []  # a folder was given: no note about the shipped model
    assert f", {backend.name}, cache on]" in run.summary()


# --- train and attention-map --cross ----------------------------------------------------------


def test_summary_line_of_a_gpt_run() -> None:
    metrics = {"steps": 3, "seconds": 1.25, "tokens_per_second": 12345.6, "train_loss": 2.5,
               "val_loss": 2.75}  # fmt: skip
    assert summary_line(metrics, "out") == (
        "3 steps in 1.2 s (12,346 tokens/s): train loss 2.5000, val loss 2.7500 nats/token; "
        "model in out"
    )


def test_train_model_runs_a_task_and_cross_attention_map_draws_it(tmp_path) -> None:
    from tinytx.models.seq2seq import Seq2Seq
    from tinytx.translate import cross_attention_map

    out = tmp_path / "dates"
    metrics = train_model(
        task="dates", out=out, steps=2, width=16, heads=2, layers=1, progress=False
    )
    assert summary_line(metrics, out).startswith("2 steps in ")
    assert "on 1000 held-out examples" in summary_line(metrics, out)
    model = Seq2Seq.load(out)
    drawn = cross_attention_map(model, "9/5/18", all_heads=True)
    assert drawn.text.count("row = output, column = source") == 2  # one map per head
    assert drawn.png is None and drawn.warnings == []
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        cross_attention_map(model, "9/5/18", layer=5)


# --- benchmarks ------------------------------------------------------------------------------


def test_report_prints_and_writes_json(tmp_path) -> None:
    lines: list[str] = []
    path = tmp_path / "result.json"
    report("table", {"results": []}, str(path), echo=lines.append)
    assert lines == ["table", f"wrote {path}"]
    assert json.loads(path.read_text()) == {"results": []}
    report("table", {}, None, echo=lines.append)
    assert lines[-1] == "table"


def test_disagreeing_cases() -> None:
    result = {"results": [{"case": "a", "ok": True}, {"case": "b", "ok": False}, {"case": "c"}]}
    assert disagreeing_cases(result, "ok") == ["b"]


def test_add_timing_arguments_defaults() -> None:
    parser = add_timing_arguments(argparse.ArgumentParser(), threads=2, repeats=7, warmup=None)
    args = parser.parse_args([])
    assert (args.backend, args.threads, args.repeats) == ("numpy", 2, 7)
    assert not hasattr(args, "warmup") and not hasattr(args, "pause")


def test_time_against_torch_rows() -> None:
    alone = time_against_torch("c", "w", lambda: None, None, repeats=1, warmup=0, pause=0.0,
                               sync=lambda: None)  # fmt: skip
    assert list(alone) == ["case", "what", "tinytx_ms", "tinytx_runs_ms"]
    both = time_against_torch("c", "w", lambda: None, lambda: None, repeats=2, warmup=0,
                              pause=0.0, sync=lambda: None)  # fmt: skip
    assert {"torch_ms", "torch_runs_ms", "ratio"} <= set(both)
    assert len(both["torch_runs_ms"]) == 2


def test_with_verdicts_words_the_targets() -> None:
    results = [
        {"case": "a", "ratio": 1.2, "target": 1.5, "target_met": True, "ok": True,
         "tolerance": 1e-5},
        {"case": "b", "ratio": 2.0, "target": 1.5, "target_met": False, "ok": False,
         "tolerance": 1e-5},
        {"case": "c"},
    ]  # fmt: skip
    rows = with_verdicts(results, "ok", "agree")
    assert [(r.get("target"), r.get("agree")) for r in rows] == [
        ("<= 1.5x met", "ok"), ("<= 1.5x MISSED", "WRONG (tol 1e-05)"), (None, None)
    ]  # fmt: skip
