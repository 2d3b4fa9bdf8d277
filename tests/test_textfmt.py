"""tinytx.textfmt and the tables that use it fit a width (the terminal's, or 100)."""

from __future__ import annotations

import numpy as np

from tinytx.demo import demo_text
from tinytx.textfmt import fit_table, natural_width, output_width, wrap


def test_output_width_reads_columns_and_defaults_to_100(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "123")
    assert output_width() == 123
    monkeypatch.setenv("COLUMNS", "10")
    assert output_width() == 40  # never narrower
    monkeypatch.delenv("COLUMNS")
    assert output_width() == 100  # tests run without a terminal


def test_wrap_keeps_long_words_whole() -> None:
    text = "see /a/very/long/path/that/cannot/break for details"
    lines = wrap(text, 20, indent="  ").splitlines()
    assert "/a/very/long/path/that/cannot/break" in lines[1] and lines[2].startswith("  ")


def test_fit_table_wraps_shape_lists_after_their_commas() -> None:
    header = ("layer", "output", "ms")
    rows = [("block", "(1, 16, 384), (1, 12, 16, 16), (1, 12, 16, 16)", "1.0")]
    assert natural_width([header, *rows]) > 40
    lines = fit_table(header, rows, 40, wrap_columns=(1,)).splitlines()
    assert max(map(len, lines)) <= 40
    assert "(1, 16, 384)," in lines[2] and lines[3].strip().startswith("(1, 12, 16, 16)")


def test_demo_fits_the_width_it_is_given(numpy_backend) -> None:
    for width in (80, 100, 200):  # 80: the classic terminal
        text = demo_text(backend=numpy_backend, weights="random", width=width)
        trace = text[text.index("layer ") : text.index("\n\n", text.index("layer "))]
        assert max(len(line) for line in trace.splitlines()) <= width
    assert np.all  # the demo's numbers are tested in test_viz and test_cli
