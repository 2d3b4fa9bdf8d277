"""Attention variants as plugins: the built-ins, registration rules, load_plugin,
entry-point discovery, the example package, and every variant inside the modules."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tinytx.layers import EncoderBlock, MultiHeadAttention, padding_mask
from tinytx.plugins import (
    BUILTIN_VARIANTS,
    AttentionError,
    PluginError,
    PluginWarning,
    UnknownAttentionError,
    available_attention,
    get_attention,
    load_plugin,
    register_attention,
    registry,
)

ROOT = Path(__file__).resolve().parents[1]
BROKEN = Path(__file__).resolve().parent / "broken_plugins"
EXAMPLE = ROOT / "examples" / "tinytx-relu-attention"


@pytest.fixture
def clean_registry():
    """Put the registry (and what the loaders remember) back as it was after the test."""
    stores = (registry._REGISTRY, registry._LOADED, registry._BROKEN)
    saved = [dict(store) for store in stores]
    modules = set(sys.modules)
    yield
    for store, copy in zip(stores, saved, strict=True):
        store.clear()
        store.update(copy)
    for name in set(sys.modules) - modules:
        if name.startswith(("tinytx_plugin_", "tinytx_test_ep_")):
            del sys.modules[name]


def _sdpa_source(name: str, **promises: bool) -> str:
    flags = ", ".join(f"{k}={v}" for k, v in promises.items())
    return textwrap.dedent(f"""
        from tinytx.functional import scaled_dot_product_attention
        from tinytx.plugins import register_attention

        @register_attention("{name}", {flags})
        def variant(q, k, v, *, mask=None, causal=False, scale=None):
            return scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)
    """)


# --- the built-ins ---------------------------------------------------------------------


def test_every_builtin_is_registered_with_description_paper_and_equation():
    registered = available_attention()
    assert set(BUILTIN_VARIANTS) <= set(registered)
    for name in BUILTIN_VARIANTS:
        variant = registered[name]
        assert variant.builtin and variant.description and variant.paper, name
        module = sys.modules[variant.fn.__module__]
        first_author = variant.paper.split()[0].rstrip(",")
        assert first_author in module.__doc__, f"{name}: the docstring should cite {first_author}"
        assert " = " in module.__doc__, f"{name}: the docstring should give the equation"


def test_plugin_modules_never_import_numpy_or_cupy():
    for path in (ROOT / "plugins").glob("*.py"):
        source = path.read_text()
        for banned in ("import numpy", "import cupy", "from numpy", "from cupy"):
            assert banned not in source, f"{path.name} contains {banned!r}"


def test_duplicate_names_are_rejected_unless_replacing(clean_registry):
    with pytest.raises(AttentionError, match="'softmax' is already registered"):

        @register_attention("softmax")
        def again(q, k, v, *, mask=None, causal=False, scale=None): ...

    @register_attention("softmax", replace=True, description="replaced")
    def replaced(q, k, v, *, mask=None, causal=False, scale=None): ...

    assert get_attention("softmax").description == "replaced"


def test_options_are_typed_and_validated_with_the_variant_named():
    window = get_attention("sliding_window")
    assert window.resolve_options({"window": 2}) == {"window": 2}
    with pytest.raises(AttentionError, match=r"'sliding_window'.*window=0 .*>= 1"):
        window.resolve_options({"window": 0})
    with pytest.raises(AttentionError, match="'sliding_window'.*'window' must be int, got str"):
        window.resolve_options({"window": "3"})
    with pytest.raises(AttentionError, match="'blockwise'.*'block_size' must be int, got bool"):
        get_attention("blockwise").resolve_options({"block_size": True})
    with pytest.raises(AttentionError, match="'alibi' has no option 'window'; its options: none"):
        get_attention("alibi").resolve_options({"window": 2})
    with pytest.raises(AttentionError, match="'cosine'.*'temperatur'.*its options: temperature"):
        get_attention("cosine").resolve_options({"temperatur": 2.0})


def test_unsupported_mask_or_causal_is_refused_loudly(backend, clean_registry):
    @register_attention("no_mask_no_causal")
    def plain(q, k, v, *, mask=None, causal=False, scale=None):
        return get_attention("softmax").fn(q, k, v, scale=scale)

    q = backend.asarray(np.ones((1, 1, 2, 2), dtype=np.float32))
    mask = backend.asarray(np.ones((1, 1, 1, 2), dtype=bool))
    variant = get_attention("no_mask_no_causal")
    with pytest.raises(AttentionError, match="'no_mask_no_causal' does not support a mask"):
        variant(q, q, q, mask=mask)
    with pytest.raises(AttentionError, match="'no_mask_no_causal' does not support causal=True"):
        variant(q, q, q, causal=True)
    out, _ = variant(q, q, q)  # without them it runs
    assert tuple(out.shape) == (1, 1, 2, 2)


def test_linear_refuses_a_general_mask_but_honours_key_padding(backend):
    rng = np.random.default_rng(0)
    q = backend.asarray(rng.standard_normal((1, 2, 3, 4)).astype(np.float32))
    general = backend.asarray(np.tril(np.ones((3, 3), dtype=bool)))
    with pytest.raises(AttentionError, match="'linear' supports key-padding masks only"):
        get_attention("linear")(q, q, q, mask=general)
    out, _ = get_attention("linear")(q, q, q, mask=padding_mask([2], 3, backend=backend))
    assert np.all(np.isfinite(backend.to_numpy(out)))


@pytest.mark.parametrize("name", BUILTIN_VARIANTS)
def test_a_key_mask_of_any_rank_means_the_same(backend, name):
    """A mask is anything broadcastable to (batch, heads, seq_q, seq_k): the 1-D key mask
    (seq_k,) must give what its 4-D form (1, 1, 1, seq_k) gives."""
    rng = np.random.default_rng(1)
    q = backend.asarray(rng.standard_normal((2, 2, 3, 4)).astype(np.float32))
    k, v = (backend.asarray(rng.standard_normal((2, 2, 5, 4)).astype(np.float32)) for _ in "kv")
    keep = np.array([True, False, True, True, False])
    variant = get_attention(name)
    outs = [
        backend.to_numpy(variant(q, k, v, mask=backend.asarray(m))[0])
        for m in (keep, keep[None, :], keep[None, None, None, :])
    ]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-6, atol=1e-6)


def test_a_variant_that_raises_is_reported_by_name(backend, clean_registry):
    @register_attention("divides_by_zero")
    def bad(q, k, v, *, mask=None, causal=False, scale=None):
        return 1 / 0

    q = backend.asarray(np.ones((1, 1, 2, 2), dtype=np.float32))
    with pytest.raises(AttentionError, match="'divides_by_zero' raised ZeroDivisionError"):
        get_attention("divides_by_zero")(q, q, q)
    assert get_attention("softmax")(q, q, q)[0] is not None  # the rest keeps working


def test_return_weights_false_gives_none_and_the_same_output(backend, clean_registry):
    """Inference asks for no weights: softmax is told (its function takes return_weights,
    so it never stores them); a plugin without that parameter still runs, its weights
    dropped. The output is the one computed with weights, up to rounding."""
    seen = {}

    @register_attention("plain")
    def plain(q, k, v, *, mask=None, causal=False, scale=None):
        seen["called"] = True
        return get_attention("softmax")(q, k, v, scale=scale)

    rng = np.random.default_rng(0)
    q, k, v = (backend.asarray(rng.standard_normal((2, 2, 5, 4))) for _ in range(3))
    for name in ("softmax", "plain"):
        variant = get_attention(name)
        out, weights = variant(q, k, v)
        out_nw, none = variant(q, k, v, return_weights=False)
        assert weights is not None and none is None
        np.testing.assert_allclose(backend.to_numpy(out_nw), backend.to_numpy(out),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
    assert get_attention("softmax")._takes_return_weights
    assert seen and not get_attention("plain")._takes_return_weights


# --- load_plugin -----------------------------------------------------------------------


def test_load_plugin_from_a_file(tmp_path, clean_registry):
    path = tmp_path / "my_attention.py"
    path.write_text(_sdpa_source("from_a_file", supports_mask=True))
    assert load_plugin(path) == ["from_a_file"]
    variant = get_attention("from_a_file")
    assert not variant.builtin and "my_attention.py" in variant.source
    assert load_plugin(str(path)) == ["from_a_file"]  # a second load is a no-op, no duplicate


def test_load_plugin_from_a_module_name(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "tinytx_plugin_mod_for_test.py").write_text(_sdpa_source("from_a_module"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugin("tinytx_plugin_mod_for_test") == ["from_a_module"]
    assert "tinytx_plugin_mod_for_test" in get_attention("from_a_module").source


def test_load_plugin_names_what_is_missing(clean_registry):
    with pytest.raises(
        PluginError, match=r"plugin 'nowhere/mine\.py' failed to load: no such file"
    ):
        load_plugin("nowhere/mine.py")
    with pytest.raises(PluginError, match="plugin 'no_such_module_xyz' failed to load: no module"):
        load_plugin("no_such_module_xyz")


def test_a_plugin_failing_at_import_is_named_and_leaves_the_registry_as_it_was(
    backend, clean_registry
):
    before = dict(available_attention())
    with pytest.raises(
        PluginError, match=r"fails_at_import\.py' failed to load: RuntimeError: .*broken on purpose"
    ):
        load_plugin(BROKEN / "fails_at_import.py")
    assert available_attention() == before  # its half-registered variant was rolled back
    q = backend.asarray(np.ones((1, 1, 2, 2), dtype=np.float32))
    assert tuple(get_attention("softmax")(q, q, q)[0].shape) == (1, 1, 2, 2)


def test_a_plugin_with_the_wrong_output_shape_is_named(backend, clean_registry):
    assert load_plugin(BROKEN / "wrong_shape.py") == ["broken_shape"]
    q = backend.asarray(np.ones((1, 1, 3, 2), dtype=np.float32))
    with pytest.raises(
        AttentionError,
        match=r"'broken_shape' \(plugin .*wrong_shape\.py'\) returned output of shape "
        r"\(1, 1, 2, 3\); expected \(1, 1, 3, 2\)",
    ):
        get_attention("broken_shape")(q, q, q)


def test_a_plugin_registering_a_builtin_name_fails_to_load(tmp_path, clean_registry):
    path = tmp_path / "clash.py"
    path.write_text(_sdpa_source("softmax"))
    with pytest.raises(PluginError, match="clash.py' failed to load: .*'softmax' is already"):
        load_plugin(path)
    assert get_attention("softmax").builtin


# --- entry-point discovery -------------------------------------------------------------


def _fake_distribution(site: Path, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution as importlib.metadata sees it: a .dist-info folder."""
    info = site / "tinytx_test_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tinytx-test-plugins\nVersion: 1.0\n"
    )
    lines = [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("[tinytx.attention]\n" + "\n".join(lines) + "\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def plugin_site(tmp_path, monkeypatch, clean_registry):
    """A site folder on sys.path with one good, one other, one broken and one empty plugin."""
    monkeypatch.delenv("TINYTX_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    _fake_distribution(
        tmp_path,
        {
            "ep_good": "tinytx_test_ep_good",
            "ep_other": "tinytx_test_ep_other",
            "ep_broken": "tinytx_test_ep_missing",
            "ep_empty": "tinytx_test_ep_empty",
        },
        {
            "tinytx_test_ep_good": _sdpa_source("ep_good", supports_mask=True),
            "tinytx_test_ep_other": _sdpa_source("ep_other"),
            "tinytx_test_ep_empty": "x = 1\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def test_entry_points_load_lazily_by_name(plugin_site):
    assert "tinytx_test_ep_good" not in sys.modules
    variant = get_attention("ep_good")
    assert variant.promises.supports_mask
    assert "entry point ep_good = tinytx_test_ep_good" in variant.source
    assert "tinytx-test-plugins 1.0" in variant.source
    assert "tinytx_test_ep_good" in sys.modules
    assert "tinytx_test_ep_other" not in sys.modules  # only the one asked for


def test_a_broken_entry_point_warns_and_is_skipped(plugin_site):
    with pytest.warns(PluginWarning) as caught:
        names = available_attention()
    messages = " | ".join(str(w.message) for w in caught)
    assert "ep_broken = tinytx_test_ep_missing failed to load: ModuleNotFoundError" in messages
    assert "registered no attention variant named 'ep_empty'" in messages
    assert {"ep_good", "ep_other", "softmax"} <= set(names)
    assert "ep_broken" not in names and "ep_empty" not in names
    with pytest.raises(UnknownAttentionError, match="'ep_broken'; its plugin failed to load"):
        get_attention("ep_broken")
    assert registry.broken_plugins().keys() == {"ep_broken", "ep_empty"}


def test_discovery_can_be_turned_off(plugin_site, monkeypatch):
    monkeypatch.setenv("TINYTX_DISABLE_PLUGIN_AUTOLOAD", "1")
    with pytest.raises(UnknownAttentionError, match="unknown attention variant 'ep_good'"):
        get_attention("ep_good")
    assert "ep_other" not in available_attention()
    assert "tinytx_test_ep_good" not in sys.modules


def test_the_example_package_is_found_through_its_entry_point_and_passes_the_kit(tmp_path):
    """pip-install examples/tinytx-relu-attention into a private folder (offline, no
    dependencies, no build isolation), then in a fresh interpreter ask for "relu"."""
    pytest.importorskip("setuptools", reason="building the example package needs setuptools")
    source, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, source)  # build the copy: the repository stays clean
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    pip += ["--no-build-isolation", "--no-cache-dir", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "--target", str(site), str(source)], capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr
    script = textwrap.dedent("""
        import json, sys
        import tinytx.plugins
        from tinytx.testing import check_attention
        lazy = "tinytx_relu_attention" not in sys.modules
        variant = tinytx.plugins.get_attention("relu")
        reports = {b: check_attention("relu", b, max_examples=8) for b in ("numpy", "strict")}
        print(json.dumps({
            "lazy": lazy,
            "source": variant.source,
            "status": {b: r.status() for b, r in reports.items()},
            "passed": all(r.passed for r in reports.values()),
        }))
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("TINYTX_DISABLE_PLUGIN_AUTOLOAD", None)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["lazy"], "the plugin was imported before anyone asked for it"
    assert (
        "tinytx-relu-attention 0.1.0, entry point relu = tinytx_relu_attention" in found["source"]
    )
    assert found["passed"], found["status"]
    for status in found["status"].values():
        assert status["causal_no_leak"] == "passed" and status["padding_invariance"] == "passed"
    disabled = subprocess.run(
        [sys.executable, "-c", "import tinytx.plugins as p; print(p.get_attention('relu'))"],
        capture_output=True,
        text=True,
        env={**env, "TINYTX_DISABLE_PLUGIN_AUTOLOAD": "1"},
        timeout=300,
    )
    assert disabled.returncode != 0 and "unknown attention variant 'relu'" in disabled.stderr


# --- every variant inside the modules: grouped-query attention, rotary, blocks ------------


def _host(backend, x) -> np.ndarray:
    return np.asarray(backend.to_numpy(x), dtype=np.float64)


@pytest.mark.parametrize("name", BUILTIN_VARIANTS)
def test_every_variant_runs_in_grouped_query_attention_with_rotary(backend, name):
    """n_kv_heads < n_heads and rotary positions stay in the module; the variant gets
    (batch, heads, seq, d_head) queries, keys and values and must not leak under causal."""
    rng = np.random.default_rng(1)
    mha = MultiHeadAttention(16, 4, n_kv_heads=2, rotary=True, attention=name, backend=backend)
    x_host = rng.standard_normal((2, 6, 16)).astype(np.float32)
    x = backend.asarray(x_host)
    out = _host(backend, mha(x, causal=True))
    assert out.shape == (2, 6, 16) and np.all(np.isfinite(out))
    changed = x_host.copy()
    changed[:, 3:] = rng.standard_normal(changed[:, 3:].shape)  # tokens after position 2
    out2 = _host(backend, mha(backend.asarray(changed), causal=True))
    np.testing.assert_allclose(out2[:, :3], out[:, :3], rtol=1e-4, atol=1e-5)
    if get_attention(name).promises.exact:
        reference = MultiHeadAttention(16, 4, n_kv_heads=2, rotary=True, backend=backend)
        np.testing.assert_allclose(out, _host(backend, reference(x, causal=True)), atol=1e-5)


@pytest.mark.parametrize("name", BUILTIN_VARIANTS)
def test_every_variant_runs_in_an_encoder_block_with_padding(backend, name):
    """A padded batch through a pre-norm block: the real tokens' outputs are those of
    the unpadded sequence (padding invariance through residuals, norms and FFN)."""
    rng = np.random.default_rng(2)
    block = EncoderBlock(
        16, 4, 32, norm_first=True, n_kv_heads=2, rotary=True, attention=name, backend=backend
    )
    x_host = rng.standard_normal((2, 5, 16)).astype(np.float32)
    mask = padding_mask([5, 3], 5, backend=backend)  # (2, 1, 1, 5)
    out = _host(backend, block(backend.asarray(x_host), mask=mask))
    assert out.shape == (2, 5, 16) and np.all(np.isfinite(out))
    alone = _host(backend, block(backend.asarray(x_host[1:, :3])))
    np.testing.assert_allclose(out[1:, :3], alone, rtol=1e-4, atol=1e-5)


def test_module_options_reach_the_variant(backend):
    mha = MultiHeadAttention(
        8, 2, attention="sliding_window", attention_options={"window": 1}, backend=backend
    )
    x = backend.asarray(np.random.default_rng(3).standard_normal((1, 4, 8)).astype(np.float32))
    _, weights = mha(x, return_weights=True)
    eye = np.broadcast_to(np.eye(4), (1, 2, 4, 4))
    np.testing.assert_allclose(_host(backend, weights), eye, atol=1e-6)  # window 1: itself
    with pytest.raises(AttentionError, match="'sliding_window': invalid window=0"):
        MultiHeadAttention(8, 2, attention="sliding_window", attention_options={"window": 0})


def test_the_demo_runs_every_builtin(backend):
    from tinytx.demo import run_demo

    for name in BUILTIN_VARIANTS:
        result = run_demo(backend=backend, attention=name, n_layers=1)
        assert np.all(np.isfinite(result.output)), name
        assert (result.weights is None) == (not get_attention(name).promises.returns_weights)


def test_tinytx_plugins_is_importable_on_its_own():
    code = "import tinytx.plugins as p; print(len(p.available_attention()))"
    env = {**os.environ, "TINYTX_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == len(BUILTIN_VARIANTS)
