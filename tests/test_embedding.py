"""tinytx.embedding: the library behind embed, similarity and attention-map (tiny BERT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bert_helpers import write_tiny_bert

from tinytx.embedding import (
    OptionError,
    attention_map,
    embed_texts,
    embeddings_json,
    embeddings_table,
    load_encoder,
    row_index,
    shorten,
    similarity_json,
    similarity_table,
)
from tinytx.pretrained import CheckpointError

TEXTS = ["a man eats", "a man eats food", "the girl sings"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_encoder(str(write_tiny_bert(tmp_path_factory.mktemp("bert") / "m")))


def test_vectors_are_unit_length_and_tables_show_them(model) -> None:
    vectors, messages = embed_texts(model, TEXTS, batch_size=2)
    assert vectors.shape[0] == 3 and messages == []
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    table = embeddings_table(TEXTS, vectors, dims=3).splitlines()
    assert table[0].split()[:5] == ["#", "text", "d0", "d1", "d2"] and len(table) == 4
    payload = json.loads(embeddings_json(TEXTS, vectors, "tiny", "numpy"))
    assert payload["dim"] == vectors.shape[1] and payload["embeddings"][2]["text"] == TEXTS[2]
    matrix = np.array(json.loads(similarity_json(TEXTS, vectors))["similarity"])
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    assert similarity_table(TEXTS, vectors).splitlines()[0] == "[1] a man eats"


def test_embedding_texts_lets_malloc_keep_freed_memory(model, monkeypatch) -> None:
    """Like training, embedding many batches keeps the freed pages (process-wide)."""
    from tinytx.backends import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    embed_texts(model, TEXTS, batch_size=2)
    assert calls == [1]


def test_attention_map_draws_and_lists_a_row(model) -> None:
    drawn = attention_map(model, "a man eats", layer=0, head=1, row="a")
    assert "layer 0, head 1" in drawn.text and "row of 'a'" in drawn.text
    assert drawn.png is None and drawn.warnings == []
    every = attention_map(model, "a man eats", all_heads=True)
    assert every.text.count("layer 0, head") == model.config.num_attention_heads


@pytest.mark.parametrize(
    ("options", "option"), [({"layer": 9}, "layer"), ({"head": 9}, "head"), ({"row": "zz"}, "row")]
)
def test_attention_map_names_the_option_out_of_range(model, options, option) -> None:
    with pytest.raises(OptionError) as info:
        attention_map(model, "a man eats", **options)
    assert info.value.option == option


def test_row_index_and_shorten() -> None:
    tokens = ["[CLS]", "it", "was", "[SEP]"]
    assert row_index(tokens, "it") == 1 and row_index(tokens, "2") == 2
    assert row_index(tokens, "IT") == 1
    assert shorten("a  b\nc", 10) == "a b c" and shorten("abcdefgh", 5) == "abcd…"


def test_load_encoder_refuses_a_gpt(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="is not a BERT-family encoder"):
        load_encoder(str(Path(__file__).parent / "fixtures" / "tiny_gpt2"))
