"""The terminal heatmap, word splitting and the demo's library function."""

from __future__ import annotations

import numpy as np
import pytest

from tinytx.demo import DEMO_SENTENCE, run_demo
from tinytx.viz import heatmap, split_words


def test_split_words_keeps_contractions_and_punctuation():
    assert split_words(DEMO_SENTENCE) == [
        "The", "animal", "didn't", "cross", "the", "street", "because", "it", "was", "too",
        "tired", ".",
    ]  # fmt: skip


def test_heatmap_shades_follow_the_weights():
    weights = np.array([[0.0, 1.0], [0.5, 0.5]])
    text = heatmap(weights, ["a", "bb"], ["x", "y"], colour=False)
    lines = text.splitlines()
    assert lines[0].strip() == "x  y"  # column labels
    assert lines[1] == " a     @ "  # 0 -> lightest, max -> heaviest
    assert lines[2] == "bb  +  + "
    assert "max 1.000" in lines[-1]


def test_heatmap_rejects_mismatched_labels():
    with pytest.raises(ValueError, match=r"\(2, 3\) matrix"):
        heatmap(np.zeros((2, 2)), ["a", "b"], ["x", "y", "z"])


def test_demo_weights_are_attention_rows(backend):
    result = run_demo(backend=backend, seed=1)
    assert len(result.weights) == 2
    for layer in result.weights:
        assert layer.shape == (4, 12, 12)
        np.testing.assert_allclose(layer.sum(axis=-1), 1.0, atol=1e-5)
        assert (layer >= 0).all()
    assert result.output.shape == (12, 64)
    assert np.isfinite(result.output).all()
    names = [row.name for row in result.trace.rows]
    assert "encoder.layers.0.self_attn" in names and "encoder.norm" not in names
