"""tinytx bench backward: the library function and the CLI run (tinytx alone, tiny sizes:
no timings are checked) and report what they promise; bad input is one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tinytx.bench.backward import format_results, run
from tinytx.cli import cli


def test_run_attention_memory_and_gpt_without_torch():
    result = run("numpy", None, 1, warmup=0, pause=0.0, cases=["gpt", "attention"], seq=32,
                 use_torch=False)  # fmt: skip
    assert result["benchmark"] == "backward" and result["torch"] is False
    (gpt,) = result["results"]
    assert gpt["case"] == "gpt" and gpt["tinytx_ms"] > 0 and "ratio" not in gpt
    rows = {r["variant"]: r for r in result["attention_memory"]["rows"]}
    assert set(rows) == {"softmax", "blockwise"}
    assert rows["softmax"]["peak_mib"] > 0 and rows["softmax"]["memory_vs_softmax"] == 1.0
    # blockwise either has a backward (then it is measured) or says it has none
    assert "peak_mib" in rows["blockwise"] or "no backward" in rows["blockwise"]["note"]
    text = format_results(result)
    assert "gpt" in text and "softmax" in text and "seq 32" in text


def test_run_rejects_unknown_cases():
    with pytest.raises(ValueError, match="unknown case"):
        run("numpy", None, 1, cases=["nope"], use_torch=False)


def test_cli_bench_backward_writes_json(tmp_path):
    out = tmp_path / "backward.json"
    args = ["bench", "backward", "--case", "attention", "--seq", "16", "--repeats", "1",
            "--warmup", "0", "--pause", "0", "--no-torch", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "attention forward + backward" in result.output
    data = json.loads(out.read_text())
    assert data["attention_memory"]["shape"]["seq"] == 16 and data["results"] == []


def test_cli_bench_backward_bad_case():
    result = CliRunner().invoke(cli, ["bench", "backward", "--case", "nope"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'nope' is not one of" in result.output
