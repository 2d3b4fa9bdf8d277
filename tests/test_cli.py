"""The core CLI: info, plugins, demo, and how errors come out (one line, no traceback)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

import tinytx
from tinytx.cli import cli, main


@pytest.fixture(autouse=True)
def random_demo_weights(monkeypatch):
    """These tests are about the random-weight demo; with all-MiniLM-L6-v2 installed,
    `tinytx demo` would use the real model (tests/test_cli_bert.py covers that)."""
    monkeypatch.setenv("TINYTX_DEMO_WEIGHTS", "random")


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert tinytx.__version__ in result.output


def test_info_lists_backends_and_variants():
    result = invoke("info")
    assert result.exit_code == 0
    for name in ("numpy", "strict", "cupy"):
        assert re.search(rf"^  {name}\s", result.output, re.M), result.output
    assert "softmax" in result.output


def test_plugins_lists_softmax_with_its_promises():
    result = invoke("plugins")
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if line.startswith("softmax"))
    assert "normalized" in line and "supports_causal" in line


@pytest.mark.parametrize("name", ["numpy", "strict"])
def test_demo_prints_trace_and_heatmap(name):
    result = invoke("--backend", name, "demo", "--layer", "1", "--head", "3", "--no-color")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "random" in out  # says plainly that the weights are random
    assert "  layers.1 [EncoderBlock]" in out  # own names under their parents: 100 columns
    assert "    self_attn [MultiHeadAttention]" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "(1, 12, 64)" in out  # the trace shows shapes
    assert "float32" in out
    assert "layer 1, head 3" in out
    # one heatmap row per token, labelled with the token
    rows = [line for line in out.splitlines() if line.strip().startswith(("animal ", "tired "))]
    assert len(rows) == 2
    assert "\x1b[" not in out  # --no-color


def test_demo_colour_when_asked():
    result = invoke("demo", "--color")
    assert result.exit_code == 0
    assert "\x1b[48;5;" in result.output


def test_demo_same_seed_same_map_on_every_backend():
    maps = [
        invoke("--backend", b, "--seed", "3", "demo", "--no-color").output
        for b in ("numpy", "strict")
    ]
    heat = [m[m.index("layer 0, head 0") :] for m in maps]
    assert heat[0] == heat[1]
    other = invoke("--seed", "4", "demo", "--no-color").output
    assert other[other.index("layer 0, head 0") :] != heat[0]


def test_env_var_selects_backend():
    result = invoke("demo", "--no-color", env={"TINYTX_BACKEND": "strict"})
    assert result.exit_code == 0
    assert "backend strict" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--layer", "7"], "layers 0..1"),
        (["demo", "--head", "9"], "heads 0..3"),
        (["demo", "--attention", "nope"], "registered variants: "),
        (["--backend", "tpu", "info"], "'tpu' is not one of"),
        (["--seed", "-1", "demo"], "--seed"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2_with_one_message(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cupy_without_gpu_is_one_line_and_exit_1():
    status = tinytx.available_backends()["cupy"]
    if status.available:
        pytest.skip("a GPU is present here")
    result = CliRunner().invoke(cli, ["--backend", "cupy", "demo"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("Error: CuPy backend unavailable: ")
    assert "pip install" in lines[0]


def test_unexpected_error_is_one_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("tinytx.demo.run_demo", broken)
    monkeypatch.delenv("TINYTX_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == "Error: RuntimeError: boom (TINYTX_DEBUG=1 shows the traceback)"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "tinytx", "--version"], capture_output=True, text=True, check=True
    )
    assert tinytx.__version__ in result.stdout
