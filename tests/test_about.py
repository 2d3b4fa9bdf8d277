"""tinytx.about: what `tinytx info` and `tinytx plugins` print, and when plugin code runs."""

from __future__ import annotations

import sys

import pytest

import tinytx
from tinytx.about import info_text, plugins_text
from tinytx.plugins import BUILTIN_VARIANTS, installed_plugins, registered_names, registry


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """An installed plugin package whose import would record itself (and then fail)."""
    info = tmp_path / "tinytx_about_probe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tinytx-about-probe\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text("[tinytx.attention]\nprobe = tinytx_about_probe\n")
    (tmp_path / "tinytx_about_probe.py").write_text(
        "import sys\nsys.modules['tinytx_about_probe_ran'] = True\nraise RuntimeError('imported')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TINYTX_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield "probe"
    sys.modules.pop("tinytx_about_probe_ran", None)
    registry._BROKEN.pop("probe", None)  # forget it: other tests list the plugins too


def test_info_lists_installed_plugins_without_importing_them(installed_plugin) -> None:
    assert installed_plugins()[installed_plugin] == "tinytx-about-probe 1.0, tinytx_about_probe"
    text = info_text()
    assert "probe (tinytx-about-probe 1.0, tinytx_about_probe)" in text
    assert "tinytx_about_probe_ran" not in sys.modules  # listed from metadata alone
    assert installed_plugin not in registered_names()


def test_plugins_imports_them_and_shows_a_broken_one_as_skipped(installed_plugin) -> None:
    with pytest.warns(tinytx.plugins.PluginWarning, match="imported"):
        text = plugins_text()
    assert "tinytx_about_probe_ran" in sys.modules
    assert any(line.startswith("probe ") and "SKIPPED" in line for line in text.splitlines())


def test_info_and_plugins_name_every_builtin() -> None:
    info, listing = info_text(), plugins_text()
    for name in BUILTIN_VARIANTS:
        assert name in info
        assert any(line.startswith(f"{name} ") for line in listing.splitlines())
    assert f"tinytx {tinytx.__version__}" in info


def test_autoload_off_lists_no_installed_plugin(installed_plugin, monkeypatch) -> None:
    monkeypatch.setenv("TINYTX_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert installed_plugins() == {}
    assert "probe" not in info_text()
