"""The CLI's plugin commands: --plugin, plugins, check-plugin, demo --attention and
bench attention. Errors are one line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinytx.cli import cli
from tinytx.plugins import BUILTIN_VARIANTS, registry

BROKEN = Path(__file__).resolve().parent / "broken_plugins"

MY_ATTENTION = textwrap.dedent('''
    """softmax with a temperature: a learner's plugin."""
    from tinytx.functional import scaled_dot_product_attention
    from tinytx.plugins import Option, register_attention

    @register_attention(
        "hot_softmax",
        description="softmax attention with a temperature",
        paper="none: an exercise",
        normalized=True, permutation_equivariant=True, supports_mask=True,
        supports_causal=True, returns_weights=True,
        options={"temperature": Option(float, 2.0, "divides the scores", lambda t: t > 0)},
    )
    def hot_softmax(q, k, v, *, mask=None, causal=False, scale=None, temperature=2.0):
        scale = (q.shape[-1] ** -0.5 if scale is None else scale) / temperature
        return scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)
''')


@pytest.fixture(autouse=True)
def clean_registry():
    stores = (registry._REGISTRY, registry._LOADED, registry._BROKEN)
    saved = [dict(store) for store in stores]
    yield
    for store, copy in zip(stores, saved, strict=True):
        store.clear()
        store.update(copy)


@pytest.fixture
def my_plugin(tmp_path) -> str:
    path = tmp_path / "my_attention.py"
    path.write_text(MY_ATTENTION)
    return str(path)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def test_plugins_shows_description_paper_promises_and_options():
    result = invoke("plugins")
    assert result.exit_code == 0
    out = result.output
    for name in BUILTIN_VARIANTS:
        assert any(line.startswith(f"{name} ") for line in out.splitlines()), name
    assert "paper: Katharopoulos et al. 2020" in out
    assert "option: window=4 (int)" in out and "option: block_size=256 (int)" in out
    sigmoid = next(line for line in out.splitlines() if line.startswith("sigmoid "))
    assert "normalized" not in sigmoid and "permutation_equivariant" in sigmoid


def test_a_plugin_file_is_listed_checked_and_demoed(my_plugin):
    listed = invoke("--plugin", my_plugin, "plugins")
    assert listed.exit_code == 0
    assert "hot_softmax" in listed.output and f"from: '{my_plugin}'" in listed.output
    checked = invoke("--plugin", my_plugin, "check-plugin", "hot_softmax", "--max-examples", "5")
    assert checked.exit_code == 0, checked.output
    assert "causal_no_leak            passed" in checked.output
    assert "exact_softmax             skipped  not promised" in checked.output
    demo = invoke("--plugin", my_plugin, "demo", "--attention", "hot_softmax", "--no-color")
    assert demo.exit_code == 0, demo.output
    assert "attention 'hot_softmax'" in demo.output
    assert re.search(r"^layer \d+, head \d+", demo.output, re.M), demo.output


def test_plugin_option_is_repeatable_and_accepts_modules(tmp_path, my_plugin, monkeypatch):
    (tmp_path / "tinytx_plugin_second.py").write_text(
        MY_ATTENTION.replace('"hot_softmax"', '"second"')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("--plugin", my_plugin, "--plugin", "tinytx_plugin_second", "plugins")
    assert result.exit_code == 0
    assert "hot_softmax" in result.output and "second" in result.output


@pytest.mark.parametrize("name", BUILTIN_VARIANTS)
def test_demo_works_with_every_builtin(name):
    result = invoke("demo", "--attention", name, "--weights", "random", "--no-color")
    assert result.exit_code == 0, result.output
    assert f"attention {name!r}" in result.output
    assert "self_attn [MultiHeadAttention]" in result.output  # the trace
    heatmap = re.search(r"^layer \d+, head \d+", result.output, re.M)
    if name in ("blockwise", "linear"):
        assert "returns no weights, so there is no map to draw" in result.output
        assert not heatmap
    else:
        assert heatmap, result.output


def test_check_plugin_options(my_plugin):
    ok = invoke("check-plugin", "sliding_window", "-o", "window=2", "--max-examples", "3")
    assert ok.exit_code == 0 and "attention 'sliding_window' (window=2) on numpy" in ok.output
    unknown = invoke("check-plugin", "sliding_window", "-o", "size=2")
    assert unknown.exit_code == 2 and "has no option 'size'; its options: window" in unknown.output
    bad_type = invoke("check-plugin", "sliding_window", "-o", "window=two")
    assert bad_type.exit_code == 2 and "must be int, got 'two'" in bad_type.output
    invalid = invoke("check-plugin", "sliding_window", "-o", "window=0")
    assert invalid.exit_code == 1
    assert "invalid window=0" in _one_error_line(invalid)
    malformed = invoke("check-plugin", "softmax", "-o", "window")
    assert malformed.exit_code == 2 and "expected KEY=VALUE" in malformed.output


def test_check_plugin_runs_on_the_chosen_backend():
    result = invoke("--backend", "strict", "check-plugin", "linear", "--max-examples", "3")
    assert result.exit_code == 0, result.output
    assert "attention 'linear' (chunk=64) on strict" in result.output
    assert "refuses (seq_q x seq_k) masks" in result.output


def test_check_plugin_fails_the_plugin_ignoring_causal_with_a_counterexample():
    result = invoke(
        "--plugin", str(BROKEN / "ignores_causal.py"), "check-plugin", "broken_causal",
        "--max-examples", "8",
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.splitlines()
    failed = next(line for line in lines if line.startswith("causal_no_leak"))
    assert "failed" in failed and "causal=True, yet changing the tokens" in failed
    assert any("counter-example: AttentionCase(" in line for line in lines)
    assert "'broken_causal' failed" in _one_error_line(result)
    assert "causal_no_leak" in _one_error_line(result)


def test_check_plugin_fails_the_wrong_shape_plugin_naming_it():
    result = invoke(
        "--plugin", str(BROKEN / "wrong_shape.py"), "check-plugin", "broken_shape",
        "--max-examples", "3",
    )  # fmt: skip
    assert result.exit_code == 1
    # the property's row, with the lines its note wraps onto (fitted to 100 columns)
    rows = re.split(r"\n(?=\S)", result.output)
    shape = " ".join(next(row for row in rows if row.startswith("shape_dtype")).split())
    assert "failed" in shape and "wrong_shape.py" in shape and "returned output of shape" in shape


def test_a_plugin_failing_at_import_is_a_one_line_error():
    result = invoke("--plugin", str(BROKEN / "fails_at_import.py"), "plugins")
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "fails_at_import.py' failed to load: RuntimeError" in line
    assert "softmax" not in result.output  # the command did not run
    after = invoke("plugins")  # and nothing was left behind
    assert after.exit_code == 0 and "broken_import" not in after.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--plugin", "no/such/file.py", "plugins"], 1, "no such file"),
        (["--plugin", "no_such_module_xyz", "plugins"], 1, "no module named 'no_such_module_xyz'"),
        (["check-plugin", "nope"], 2, "unknown attention variant 'nope'"),
        (["demo", "--attention", "nope"], 2, "unknown attention variant 'nope'"),
        (["bench", "attention", "--variant", "nope"], 2, "unknown attention variant 'nope'"),
    ],
)
def test_errors_are_one_line(args, code, message):
    result = invoke(*args)
    assert result.exit_code == code
    assert message in _one_error_line(result)


def test_bench_attention_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "attention.json"
    result = invoke(
        "bench", "attention", "--seq", "16", "--seq", "32", "--variant", "softmax",
        "--variant", "blockwise", "--variant", "linear", "--repeats", "1", "--warmup", "0",
        "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "time_vs_softmax" in result.output and "peak_mib" in result.output
    assert "tracemalloc" in result.output
    data = json.loads(out.read_text())
    rows = {(r["variant"], r["seq"]): r for r in data["results"]}
    assert set(rows) == {(v, s) for v in ("softmax", "blockwise", "linear") for s in (16, 32)}
    assert rows[("softmax", 32)]["time_vs_softmax"] == 1.0
    assert all(r["peak_mib"] > 0 for r in rows.values())
    assert [t["met"] for t in data["targets"]] == [None, None, None]  # seq 8192 not run


def test_a_broken_installed_plugin_is_a_one_line_warning_and_skipped(tmp_path, monkeypatch):
    info = tmp_path / "tinytx_cli_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinytx-cli-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[tinytx.attention]\nghost = tinytx_cli_no_such_module\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TINYTX_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    result = invoke("plugins")
    assert result.exit_code == 0
    warning = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and "entry point ghost = tinytx_cli_no_such_module" in warning[0]
    assert "Traceback" not in result.output and "softmax" in result.output
    assert any(
        line.startswith("ghost ") and "SKIPPED" in line for line in result.output.splitlines()
    )
