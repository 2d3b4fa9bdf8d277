"""The paper's model from the command line: train --task, translate, attention-map --cross.

One tiny model is trained for two steps once per module (the outputs are nonsense; these
tests check the plumbing and the messages, not the accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinytx.cli import cli

GPT2_FOLDER = Path(__file__).parent / "fixtures" / "tiny_gpt2"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seq2seq") / "dates"
    result = invoke(
        "train", "--task", "dates", "--out", str(out), "--steps", "2", "--width", "16",
        "--heads", "2", "--layers", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "exact match" in result.output and "on 1000 held-out examples" in result.output
    return out


def test_train_task_writes_a_model_folder(trained) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["task"] == "dates" and metrics["steps"] == 2
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert json.loads((trained / "config.json").read_text())["model_type"] == "tinytx-seq2seq"


def test_translate_prints_one_line_per_input(trained) -> None:
    result = invoke("translate", str(trained), "saturday 9 may 2018", "9/5/18", "--beam", "2")
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 2


def test_cross_attention_map_draws_output_rows_and_source_columns(trained, tmp_path) -> None:
    png = tmp_path / "cross.png"
    result = invoke(
        "attention-map", "--cross", "--model", str(trained), "9 may 2018", "--no-color",
        "-o", str(png),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "decoder layer 0, mean of 2 heads: row = output, column = source" in result.output
    assert png.stat().st_size > 1000 and f"wrote {png}" in result.output
    every = invoke("attention-map", "--cross", "--model", str(trained), "9/5/18", "--all-heads")
    assert every.exit_code == 0 and every.output.count("row = output") == 2


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["translate", "{model}", "9 mai 2018é"], 1, "'é' is not in the model's vocabulary"),
        (["translate", "{model}", "9" * 41], 1, "has 41 characters; the model reads at most 40"),
        (["translate", "{model}", "9/5/18", "--beam", "0"], 2, "0 is not in the range x>=1"),
        (["translate", str(GPT2_FOLDER), "9/5/18"], 1, "type 'gpt2', not a 'tinytx-seq2seq'"),
        (["attention-map", "--cross", "9/5/18"], 2, "--cross needs --model DIR"),
        (["attention-map", "--cross", "--model", "{model}", "9/5/18", "--layer", "3"], 1,
         "layer 3 is out of range: the decoder has layers 0..0"),
        (["train", "--task", "sums", "--out", "{tmp}/x"], 1, "unknown task 'sums'; known tasks"),
        (["train", "--task", "dates", "--data", "shakespeare", "--out", "{tmp}/y"], 1,
         "--data: for GPT training only"),
        (["train", "--task", "dates", "--out", "{model}"], 1, "already exists"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(trained, tmp_path, args, code, message) -> None:
    args = [a.replace("{model}", str(trained)).replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
