"""A catalogue of bad and extreme inputs, across the command line and the API.

Each row states the exact outcome:
- CLI: the exit status (2: a usage error, click's; 1: anything else) and the words of its
  one ``Error:`` line, never a traceback; an exit-1 error is the only line printed;
- API: the exception type and its message, which names what was expected;
- extreme but valid input: the documented result, never NaN.
New features add their rows here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from bert_helpers import TINY_CONFIG, write_tiny_bert
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import tinytx
from tinytx import functional as F
from tinytx.backends import BackendMismatchError
from tinytx.cli import cli
from tinytx.generate import GenerationError, NonFiniteLogitsError
from tinytx.layers import (
    Embedding,
    LayerNorm,
    Linear,
    MultiHeadAttention,
    StateDictError,
    padding_mask,
)
from tinytx.models import GPT, GPTConfig
from tinytx.plugins import AttentionError, PluginError, UnknownAttentionError, load_plugin
from tinytx.pretrained import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
TINY_GPT2 = FIXTURES / "tiny_gpt2"
BROKEN = Path(__file__).parent / "broken_plugins"

NAN_PLUGIN = """
from array_api_compat import array_namespace
from tinytx.plugins import register_attention


@register_attention("nan_attention", description="returns NaN", supports_mask=True,
                    supports_causal=True)
def nan_attention(q, k, v, *, mask=None, causal=False, scale=None):
    xp = array_namespace(q)
    return v * xp.nan, None
"""


# --- folders: every way a checkpoint can be broken --------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Name -> a folder (or file) made from the tiny GPT-2 and a tiny BERT."""
    root = tmp_path_factory.mktemp("bad_inputs")

    def gpt2_copy(name: str) -> Path:
        return Path(shutil.copytree(TINY_GPT2, root / name))

    made: dict[str, Path] = {"bert": write_tiny_bert(root / "bert")}
    made["no_tokenizer"] = gpt2_copy("no_tokenizer")
    (made["no_tokenizer"] / "tokenizer.json").unlink()
    made["truncated"] = gpt2_copy("truncated")
    weights = made["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    made["pickle_only"] = gpt2_copy("pickle_only")
    (made["pickle_only"] / "model.safetensors").unlink()
    (made["pickle_only"] / "pytorch_model.bin").write_bytes(b"not unpickled")
    made["config_not_json"] = gpt2_copy("config_not_json")
    (made["config_not_json"] / "config.json").write_text("{ not json")
    made["llama"] = gpt2_copy("llama")
    config = json.loads((made["llama"] / "config.json").read_text())
    (made["llama"] / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    made["missing_key"] = gpt2_copy("missing_key")
    tensors = load_file(made["missing_key"] / "model.safetensors")
    dropped = next(k for k in tensors if k.endswith("ln_f.weight"))
    save_file(
        {k: v for k, v in tensors.items() if k != dropped},
        made["missing_key"] / "model.safetensors",
    )
    made["nan_row"] = gpt2_copy("nan_row")
    tensors = load_file(made["nan_row"] / "model.safetensors")
    embedding = next(k for k in tensors if k.endswith("wte.weight"))
    tensors[embedding] = tensors[embedding].copy()
    tensors[embedding][:] = np.nan  # every token's embedding row is NaN
    save_file(tensors, made["nan_row"] / "model.safetensors")
    made["bert_no_tokenizer"] = write_tiny_bert(root / "bert_no_tokenizer", tokenizer=False)
    made["latin1"] = root / "latin1.txt"
    made["latin1"].write_bytes("caf\xe9\n".encode("latin-1"))
    made["nan_plugin"] = root / "nan_plugin.py"
    made["nan_plugin"].write_text(NAN_PLUGIN)
    return {name: str(path) for name, path in made.items()}


def run(args: list[str]):
    return CliRunner().invoke(cli, args)


# --- the command line ---------------------------------------------------------------------------

GEN = ["generate", "--model", str(TINY_GPT2)]

# (arguments with {folder} placeholders, exit status, words of the Error line)
CLI_CASES = [
    (["--backend", "tpu", "info"], 2, "'tpu' is not one of"),
    (["--seed", "-1", "info"], 2, "-1 is not in the range x>=0"),
    (["--seed", "abc", "info"], 2, "'abc' is not a valid integer"),
    (["frobnicate"], 2, "No such command 'frobnicate'"),
    (["demo", "--weights", "random", "--layer", "7"], 2, "the demo encoder has layers 0..1"),
    (["demo", "--weights", "random", "--head", "9"], 2, "the demo encoder has heads 0..3"),
    (["demo", "--attention", "nope"], 2, "unknown attention variant 'nope'"),
    (["demo", "--weights", "bogus"], 2, "'bogus' is not one of 'auto', 'pretrained'"),
    (["--plugin", "/no/such/plugin.py", "info"], 1, "no such file"),
    (["--plugin", str(BROKEN / "fails_at_import.py"), "info"], 1, "failed to load"),
    (["--plugin", "", "info"], 1, "expected a file path or module name"),
    (["--plugin", "no_such_module_xyz", "info"], 1, "no module named 'no_such_module_xyz'"),
    (["check-plugin", "nope"], 2, "unknown attention variant 'nope'"),
    (["check-plugin", "sliding_window", "-o", "window=x"], 2, "must be int, got 'x'"),
    (["check-plugin", "sliding_window", "-o", "nosuch=1"], 2, "has no option 'nosuch'"),
    (["check-plugin", "sliding_window", "-o", "window"], 2, "expected KEY=VALUE"),
    (["check-plugin", "sliding_window", "-o", "window=0"], 1, "invalid window=0"),
    (["check-plugin", "softmax", "--max-examples", "0"], 2, "0 is not in the range x>=1"),
    ([*GEN, "hi", "--max-new-tokens", "-1"], 1, "max_new_tokens must be >= 0, got -1"),
    ([*GEN, "hi", "--max-new-tokens", "100000"], 1, "exceed the model's context length of 128"),
    ([*GEN, "hi", "--temperature", "-1"], 1, "temperature must be >= 0 (0 = greedy)"),
    ([*GEN, "hi", "--temperature", "nan"], 1, "temperature must be >= 0 (0 = greedy), got nan"),
    ([*GEN, "hi", "--temperature", "inf"], 1, "temperature must be >= 0 (0 = greedy), got inf"),
    ([*GEN, "hi", "--top-k", "0"], 1, "top_k must be an int >= 1"),
    ([*GEN, "hi", "--top-p", "0"], 1, "top_p must lie in (0, 1]"),
    ([*GEN, "hi", "--top-p", "1.5"], 1, "top_p must lie in (0, 1]"),
    ([*GEN, ""], 1, "the prompt is empty: give at least one token"),
    ([*GEN, "hi", "--attention", "nope"], 2, "unknown attention variant 'nope'"),
    (["generate", "--model", str(TINY_GPT2)], 2, "Missing argument 'PROMPT'"),
    (["generate", "--model", "/no/such/folder", "hi"], 1, "is not a folder"),
    (["generate", "--model", "{bert}", "hi"], 1, "generation needs a GPT"),
    (["generate", "--model", "{no_tokenizer}", "hi"], 1, "has no tokenizer.json"),
    (["generate", "--model", "{truncated}", "hi"], 1, "corrupted or truncated safetensors"),
    (["generate", "--model", "{pickle_only}", "hi"], 1, "never loads pickled .bin files"),
    (["generate", "--model", "{config_not_json}", "hi"], 1, "cannot read"),
    (["generate", "--model", "{llama}", "hi"], 1, "holds a 'llama' model; generation needs a GPT"),
    (["generate", "--model", "{missing_key}", "hi"], 1, "missing keys: norm.weight"),
    (["generate", "--model", "{nan_row}", "hi"], 1, "non-finite logits at step 1 (position 1)"),
    (
        ["--plugin", "{nan_plugin}", *GEN, "hi", "--attention", "nan_attention"],
        1,
        "attention variant 'nan_attention' are broken",
    ),
    (
        [
            "--plugin",
            "{nan_plugin}",
            "demo",
            "--weights",
            "random",
            "--attention",
            "nan_attention",
        ],
        1,
        "the encoder's output is not finite (NaN or inf) at 12 of 12 positions",
    ),  # fmt: skip
    (["embed", "--model", "{bert}"], 2, "give at least one TEXT"),
    (["embed", "--model", "{bert}", "-f", "{latin1}"], 2, "latin1.txt is not UTF-8 text"),
    (["embed", "--model", "{bert}", "-f", "/no/such/file"], 2, "No such file or directory"),
    (["embed", "--model", "/no/such/folder", "hi"], 1, "is not a folder"),
    (["embed", "--model", str(TINY_GPT2), "hi"], 1, "is not a BERT-family encoder"),
    (["embed", "--model", "{bert_no_tokenizer}", "hi"], 1, "has no tokenizer.json"),
    (["embed", "--model", "{bert}", "--batch-size", "0", "hi"], 2, "0 is not in the range x>=1"),
    (["embed", "--model", "{bert}", "--dims", "0", "hi"], 2, "0 is not in the range x>=1"),
    (["similarity", "--model", "{bert}"], 2, "give at least one TEXT"),
    (["attention-map", "hi", "--model", "{bert}", "--layer", "99"], 2, "the model has layers"),
    (["attention-map", "hi", "--model", "{bert}", "--head", "99"], 2, "the model has heads"),
    (["attention-map", "hi there", "--model", "{bert}", "--row", "zzz"], 2, "neither a token"),
    (["attention-map", "--model", "{bert}"], 2, "Missing argument 'TEXT'"),
    (["bench", "attention", "--seq", "0"], 2, "0 is not in the range x>=1"),
    (["bench", "attention", "--variant", "nope"], 2, "unknown attention variant 'nope'"),
    (["bench", "generate", "--context", "8"], 2, "8 is not in the range 33<=x<=1024"),
]


@pytest.mark.parametrize(("args", "status", "words"), CLI_CASES, ids=lambda v: None)
def test_cli_rejects_bad_input_in_one_line(folders, args, status, words) -> None:
    args = [a.format(**folders) if "{" in a else a for a in args]
    result = run(args)
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    if status == 1:  # nothing else printed: no prompt, no half trace
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines == errors, result.output


def test_cli_strict_backend_missing_names_the_install_command(monkeypatch) -> None:
    from tinytx import backends

    monkeypatch.setitem(sys.modules, "array_api_strict", None)
    monkeypatch.delitem(backends._CACHE, "strict", raising=False)
    monkeypatch.delitem(backends._FAILURES, "strict", raising=False)
    result = run(["--backend", "strict", "demo", "--weights", "random"])
    backends._FAILURES.pop("strict", None)  # forget it: other tests use the strict backend
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: strict backend unavailable")
    assert "pip install array-api-strict" in result.output


def test_cli_cupy_without_a_gpu_is_one_line() -> None:
    if tinytx.available_backends()["cupy"].available:
        pytest.skip("a GPU is present here")
    result = run(["--backend", "cupy", "demo"])
    assert result.exit_code == 1 and "CuPy backend unavailable" in result.output
    assert len(result.output.strip().splitlines()) == 1


# --- the API -------------------------------------------------------------------------------------


def f32(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def tiny_gpt() -> GPT:
    config = GPTConfig(vocab_size=20, context_length=8, n_layers=1, d_model=8, n_heads=2)
    return GPT(config, seed=0)


def strict_array(host: np.ndarray):
    return tinytx.get_backend("strict").asarray(host)


q4 = f32(1, 2, 3, 4)

# (call, exception type, regular expression its message matches)
API_CASES = [
    (lambda: F.softmax([1.0, 2.0]), BackendMismatchError, "expected arrays of one backend"),
    (lambda: F.linear(f32(2, 3), strict_array(f32(4, 3))), BackendMismatchError, "one backend"),
    (lambda: F.softmax(np.arange(3)), TypeError, "softmax input must be a real floating"),
    (lambda: F.gelu(f32(3), approximate="fast"), ValueError, "approximate must be 'none' or"),
    (lambda: F.layer_norm(np.ones(3, dtype=bool)), TypeError, "layer_norm input must be"),
    (lambda: F.scaled_dot_product_attention(f32(2, 3, 4), q4, q4), ValueError, "must be 4-D"),
    (
        lambda: F.scaled_dot_product_attention(q4, q4, q4.astype(np.float64)),
        TypeError,
        "share one floating dtype",
    ),
    (
        lambda: F.scaled_dot_product_attention(q4, q4, q4, mask=np.ones((3, 3), np.int8)),
        TypeError,
        "mask must be boolean",
    ),
    (
        lambda: F.scaled_dot_product_attention(q4, q4, q4, mask=np.ones((2, 2), bool)),
        ValueError,
        "does not broadcast",
    ),
    (lambda: F.scaled_dot_product_attention(q4, q4, q4, scale=0.0), ValueError, "finite number"),
    (lambda: F.scaled_dot_product_attention(q4, q4, q4, scale=-2), ValueError, "finite number"),
    (lambda: F.scaled_dot_product_attention(q4, q4, q4, scale=np.nan), ValueError, "> 0"),
    (lambda: F.scaled_dot_product_attention(q4, q4, q4, scale="1"), TypeError, "a number > 0"),
    (lambda: Linear(4, 4, seed=0)(np.ones((2, 4), np.int64)), TypeError, "integer array"),
    (lambda: LayerNorm(4)(np.ones((2, 4), np.int32)), TypeError, "integer array \\(int32\\)"),
    (lambda: Linear(4, 4, seed=0)([[1.0] * 4]), TypeError, "expects an array, got a list"),
    (lambda: Linear(4, 4, seed=0)(np.ones((2, 4))), BackendMismatchError, "dtype float64"),
    (lambda: Linear(4, 4, seed=0)(strict_array(f32(2, 4))), BackendMismatchError, "'numpy'"),
    (lambda: Linear(0, 4), ValueError, "d_in must be a positive int, got 0"),
    (lambda: MultiHeadAttention(8, 3), ValueError, "must be divisible by n_heads"),
    (lambda: Linear(4, 4, seed=-1), ValueError, "seed must be a non-negative int"),
    (lambda: Linear(4, 4, seed="a"), ValueError, "seed must be a non-negative int"),
    (lambda: MultiHeadAttention(8, 2, attention="nope"), UnknownAttentionError, "registered"),
    (
        lambda: MultiHeadAttention(
            8, 2, attention="sliding_window", attention_options={"window": "x"}
        ),
        AttentionError,
        "option 'window' must be int",
    ),  # fmt: skip
    (
        lambda: MultiHeadAttention(8, 2, attention="sliding_window", attention_options=[1]),
        AttentionError,
        "options must be a mapping",
    ),
    (lambda: load_plugin(123), PluginError, "expected a file path or module name"),
    (lambda: load_plugin(None), PluginError, "expected a file path or module name"),
    (lambda: load_plugin("/no/such/plugin.py"), PluginError, "no such file"),
    (lambda: tinytx.get_backend("tpu"), ValueError, "unknown backend 'tpu'"),
    (lambda: Embedding(5, 4, seed=0)(np.array([[7]])), ValueError, "5"),
    (lambda: tiny_gpt().generate([], 2), GenerationError, "the prompt is empty"),
    (lambda: tiny_gpt().generate([1, 99], 2), GenerationError, "must lie in \\[0, 20\\)"),
    (lambda: tiny_gpt().generate([1.5, 2.0], 2), GenerationError, "must be integers"),
    (lambda: tiny_gpt().generate([1, 2], 2, seed=-1), GenerationError, "seed must be an int"),
    (lambda: tiny_gpt().generate([1, 2], 2, seed="x"), GenerationError, "seed must be an int"),
    (lambda: tiny_gpt().generate([1, 2], 2, top_p=2.0), GenerationError, "top_p must lie"),
    (lambda: tiny_gpt().generate([1, 2], 2, top_k=0), GenerationError, "top_k must be an int"),
    (lambda: tiny_gpt().generate([1, 2], 20), GenerationError, "context length of 8"),
    (lambda: tiny_gpt().generate([[[1]]], 2), GenerationError, "shape \\(seq,\\) or"),
    (lambda: tiny_gpt().generate([1, 2], -1), GenerationError, "max_new_tokens must be >= 0"),
    (lambda: tinytx.load_pretrained("/no/such/folder"), CheckpointError, "is not a folder"),
    (
        lambda: Linear(4, 4, seed=0).load_state_dict({"weight": np.ones((4, 4))}),
        StateDictError,
        "bias",
    ),
    (
        lambda: F.cross_entropy(f32(2, 5), np.array([1, 7])),
        ValueError,
        "target",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), API_CASES, ids=lambda v: None)
def test_api_rejects_bad_input_with_a_named_error(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def test_non_finite_logits_stop_generation(folders) -> None:
    model = tinytx.load_pretrained(folders["nan_row"])
    with pytest.raises(NonFiniteLogitsError, match=r"step 1 \(position 2\).*its weights"):
        model.generate([1, 2], 3)


# --- extreme but valid input: documented results, never NaN -----------------------------


def softmax_rows():
    x = np.array([[-np.inf] * 3, [1e4, -1e4, 0.0], [np.inf, 1.0, np.inf]], np.float32)
    return F.softmax(x)


FINITE_CASES = [
    ("softmax: an all -inf row gives zeros", softmax_rows, lambda y: np.all(y[0] == 0)),
    ("softmax: logits of +-1e4", softmax_rows, lambda y: np.array_equal(y[1], [1, 0, 0])),
    ("softmax: +inf logits share", softmax_rows, lambda y: np.array_equal(y[2], [0.5, 0, 0.5])),
    (
        "gelu at +-inf, both forms",
        lambda: [F.gelu(np.array([np.inf, -np.inf], np.float32), a) for a in ("none", "tanh")],
        lambda ys: all(np.array_equal(y, [np.inf, 0.0]) for y in ys),
    ),
    (
        "layer_norm where squares overflow",
        lambda: F.layer_norm(np.array([[3e38, -3e38, 1e38]], np.float32)),
        lambda y: np.all(np.isfinite(y)) and abs(float(y.mean())) < 1e-6,
    ),
    (
        "rms_norm near the largest float",
        lambda: F.rms_norm(np.full((1, 4), 3.4e38, np.float32)),
        lambda y: np.allclose(y, 1.0, rtol=1e-6),
    ),
    (
        "attention: a query that may attend to nothing gives zeros",
        lambda: F.scaled_dot_product_attention(q4, q4, q4, mask=np.zeros((3, 3), bool)),
        lambda r: np.all(r[0] == 0) and np.all(r[1] == 0),
    ),
    (
        "attention over one key returns its value",
        lambda: F.scaled_dot_product_attention(q4[:, :, :1], q4[:, :, :1], q4[:, :, :1]),
        lambda r: np.array_equal(r[0], q4[:, :, :1]),
    ),
    (
        "generate 0 new tokens returns the prompt",
        lambda: tiny_gpt().generate([3, 4], 0),
        lambda ids: ids.tolist() == [3, 4],
    ),
    (
        "generate from a one-token prompt up to the context",
        lambda: tiny_gpt().generate([3], 7),
        lambda ids: ids.shape == (8,) and ids.dtype == np.int64,
    ),
    (
        "padding_mask of a zero-length sequence masks it all",
        lambda: padding_mask([0, 2], 2),
        lambda m: not np.any(m[0]) and np.all(m[1]),
    ),
]


@pytest.mark.parametrize(("what", "call", "holds"), FINITE_CASES, ids=[c[0] for c in FINITE_CASES])
def test_extreme_input_gives_the_documented_result(what, call, holds) -> None:
    result = call()
    arrays = result if isinstance(result, (tuple, list)) else [result]
    assert not any(np.any(np.isnan(np.asarray(a, dtype=np.float64))) for a in arrays), what
    assert holds(result), what


def test_the_catalogue_has_at_least_60_rows() -> None:
    assert len(CLI_CASES) + len(API_CASES) + len(FINITE_CASES) >= 60
    assert TINY_CONFIG  # the tiny BERT of bert_helpers backs the embed rows
