"""GPT: the model, its GPT-2 loader against transformers, and the causal mask at model level.

The reference numbers come from tests/fixtures/tiny_gpt2* (written by
tests/fixtures/make_gpt2_fixtures.py with transformers and torch 2.13.0). These tests never
import torch or transformers. Every array test runs on every backend.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import tinytx
from tinytx.models import GPT, GPTConfig
from tinytx.models.gpt import conv1d_to_linear, gpt2_config, gpt2_state_dict
from tinytx.plugins import available_attention
from tinytx.pretrained import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_gpt2"
ATOL = 1e-5  # float32 logits against transformers


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "tiny_gpt2_reference.npz") as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def greedy_cases() -> dict:
    return json.loads((FIXTURES / "tiny_gpt2_greedy.json").read_text())


@pytest.fixture
def tiny(backend) -> GPT:
    return tinytx.load_pretrained(TINY, backend=backend)


def test_fixture_is_small_and_from_transformers(greedy_cases) -> None:
    size = sum(p.stat().st_size for p in TINY.iterdir())
    assert size < 1_000_000, f"tiny_gpt2/ holds {size} bytes"
    assert sorted(p.name for p in TINY.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json",
    ]  # fmt: skip
    assert greedy_cases["torch"].startswith("2.13.0")
    assert all(case["min_logit_gap"] > 1e-3 for case in greedy_cases["cases"])


# --- parity with transformers' GPT2LMHeadModel -------------------------------------------


@pytest.mark.parametrize("name", ["1", "9", "batch", "40"])
def test_logits_match_transformers(tiny, backend, reference, name) -> None:
    ids = reference[f"ids_{name}"]
    logits = backend.to_numpy(tiny(backend.asarray(ids, dtype="int64")))
    want = reference[f"logits_{name}"]
    assert logits.shape == want.shape and logits.dtype == np.float32
    error = float(np.max(np.abs(logits - want)))
    assert error <= ATOL, f"max abs error {error:.3g} on {backend.name}"


def test_logits_match_transformers_over_the_whole_context(tiny, backend, reference) -> None:
    ids = reference["ids_full"]  # (1, 128): every learned position is used
    assert ids.shape[1] == tiny.config.context_length
    logits = backend.to_numpy(tiny(backend.asarray(ids, dtype="int64")))[:, -4:]
    assert float(np.max(np.abs(logits - reference["logits_full_last4"]))) <= ATOL


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_tokens_match_transformers(tiny, greedy_cases, use_cache) -> None:
    for case in greedy_cases["cases"]:
        out = tiny.generate(case["ids"], greedy_cases["n_new"], use_cache=use_cache)
        assert out[len(case["ids"]) :].tolist() == case["new_tokens"], case["prompt"]


def test_tokenizer_round_trip(greedy_cases) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 1000
    for case in greedy_cases["cases"]:
        if case["prompt"] is not None:
            assert tokenizer.encode(case["prompt"]).ids == case["ids"]
            assert tokenizer.decode(case["ids"]) == case["prompt"]


# --- the loader ---------------------------------------------------------------------------


def test_conv1d_is_transposed_in_one_place() -> None:
    raw = load_file(str(TINY / "model.safetensors"))
    config = gpt2_config(json.loads((TINY / "config.json").read_text()))
    state = gpt2_state_dict(raw, config)
    c_attn = raw["transformer.h.1.attn.c_attn.weight"]  # (64, 192): x @ W, q|k|v columns
    in_proj = state["layers.1.self_attn.in_proj_weight"]  # (192, 64): q, k, v row blocks
    assert c_attn.shape == (64, 192) and in_proj.shape == (192, 64)
    np.testing.assert_array_equal(in_proj[64:128], c_attn[:, 64:128].T)  # the key rows
    np.testing.assert_array_equal(conv1d_to_linear(c_attn), in_proj)
    assert state["layers.0.linear1.weight"].shape == (256, 64)  # mlp.c_fc (64, 256)
    assert state["layers.0.linear2.weight"].shape == (64, 256)  # mlp.c_proj (256, 64)
    np.testing.assert_array_equal(
        state["layers.0.self_attn.in_proj_bias"], raw["transformer.h.0.attn.c_attn.bias"]
    )
    assert set(state) == set(GPT(config).state_dict())  # every key, nothing else


def test_model_keys() -> None:
    tied = GPT(GPTConfig(vocab_size=10, context_length=8, d_model=8, n_heads=2, n_layers=1))
    keys = set(tied.state_dict())
    assert {"token_embedding.weight", "position_embedding.weight", "norm.weight"} <= keys
    assert "head.weight" not in keys
    assert "layers.0.self_attn.in_proj_weight" in keys and "layers.0.norm2.bias" in keys
    untied = GPT(GPTConfig(10, 8, 8, 2, 1, tied_head=False, positions="rotary", norm="rms"))
    keys = set(untied.state_dict())
    assert "head.weight" in keys and "position_embedding.weight" not in keys
    assert "norm.bias" not in keys


def copy_tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "gpt2"
    shutil.copytree(TINY, folder)
    return folder


def test_untied_head_is_loaded(tmp_path, backend) -> None:
    folder = copy_tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / "model.safetensors"))
    head = np.random.default_rng(0).standard_normal((1000, 64)).astype(np.float32)
    tensors["lm_head.weight"] = head
    save_file(tensors, str(folder / "model.safetensors"))
    model = tinytx.load_pretrained(folder, backend=backend)
    np.testing.assert_array_equal(model.state_dict()["head.weight"], head)
    ids = np.array([[5, 6, 7]])
    logits = backend.to_numpy(model(backend.asarray(ids, dtype="int64")))
    x = model.position_embedding(model.token_embedding(backend.asarray(ids, dtype="int64")))
    for layer in model.layers:
        x = layer(x)
    hidden = backend.to_numpy(model.norm(x))  # (1, 3, 64)
    np.testing.assert_allclose(logits, hidden @ head.T, atol=1e-4)  # the separate head


def test_missing_and_unexpected_tensors_are_listed(tmp_path) -> None:
    folder = copy_tiny(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.rotary.inv_freq"] = np.zeros(4, dtype=np.float32)
    tensors["transformer.h.0.attn.bias"] = np.ones((1, 1, 4, 4), dtype=np.float32)  # a buffer
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        tinytx.load_pretrained(folder)
    message = str(info.value)
    assert "missing keys: layers.1.linear1.bias" in message
    assert "unexpected keys: transformer.h.0.attn.rotary.inv_freq" in message
    assert "transformer.h.0.attn.bias" not in message  # the mask buffer is skipped


def test_misshaped_tensor(tmp_path) -> None:
    folder = copy_tiny(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:100]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"position_embedding.weight: expected \(128, 64\)"):
        tinytx.load_pretrained(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation_function": "swish"}, "activation_function 'swish' is not supported"),
        ({"scale_attn_weights": False}, "changes the attention scale"),
        ({"scale_attn_by_inverse_layer_idx": True}, "changes the attention scale"),
        ({"n_head": 5}, r"d_model \(64\) must be divisible by n_heads \(5\)"),
        ({"n_embd": None}, "n_embd"),
    ],
)
def test_unsupported_configs(tmp_path, change, message) -> None:
    folder = copy_tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    if change.get("n_embd", 0) is None:
        del config["n_embd"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        tinytx.load_pretrained(folder)


def test_missing_weights_file(tmp_path) -> None:
    folder = copy_tiny(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors$"):
        tinytx.load_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")  # never unpickled: a hint instead
    with pytest.raises(CheckpointError, match="never loads pickled.*AutoModelForCausalLM"):
        tinytx.load_pretrained(folder)


def test_loaded_model_moves_between_backends(backend, reference) -> None:
    model = tinytx.load_pretrained(TINY).to(backend)
    logits = backend.to_numpy(model(backend.asarray(reference["ids_9"], dtype="int64")))
    assert float(np.max(np.abs(logits - reference["logits_9"]))) <= ATOL


# --- the model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(d_model=10, n_heads=4), r"d_model \(10\) must be divisible by n_heads \(4\)"),
        (dict(n_heads=4, n_kv_heads=3), r"multiple of n_kv_heads \(3\)"),
        (dict(norm="batch"), "norm must be 'layer' or 'rms'"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(positions="sinusoidal"), "positions must be one of learned, rotary, none"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
        (dict(context_length=True), "context_length must be a positive int"),
        (dict(d_model=12, n_heads=4, positions="rotary"), "rotary positions need an even"),
    ],
)
def test_bad_config(options, message) -> None:
    base = dict(vocab_size=10, context_length=8, d_model=16, n_heads=4, n_layers=1)
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**base, **options})


def test_default_config_is_gpt2_small() -> None:
    config = GPTConfig()
    assert (config.vocab_size, config.context_length, config.d_model) == (50257, 1024, 768)
    assert (config.n_heads, config.n_layers, config.ff_width, config.d_head) == (12, 12, 3072, 64)


def test_same_seed_same_logits_on_every_backend(backend, numpy_backend) -> None:
    config = GPTConfig(50, 16, 16, 4, 2, n_kv_heads=2, positions="rotary", norm="rms")
    ids = np.random.default_rng(0).integers(0, 50, (2, 9))
    here = GPT(config, backend=backend, seed=4)
    there = GPT(config, backend=numpy_backend, seed=4)
    a = backend.to_numpy(here(backend.asarray(ids, dtype="int64")))
    b = there(np.asarray(ids))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_weights_per_layer(backend) -> None:
    model = GPT(GPTConfig(20, 12, 8, 2, 3), backend=backend)
    ids = backend.asarray(np.arange(6)[None, :], dtype="int64")
    logits, weights = model(ids, return_weights=True)
    assert tuple(logits.shape) == (1, 6, 20) and len(weights) == 3
    w = backend.to_numpy(weights[2])  # (1, 2, 6, 6)
    assert w.shape == (1, 2, 6, 6)
    assert np.allclose(np.triu(w, k=1), 0.0)  # causal: nothing above the diagonal
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


CAUSAL_VARIANTS = sorted(
    name for name, variant in available_attention().items() if variant.promises.supports_causal
)


@settings(max_examples=6)
@given(
    attention=st.sampled_from(CAUSAL_VARIANTS),
    positions=st.sampled_from(["learned", "rotary", "none"]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_no_leak_through_the_causal_mask(backend, attention, positions, seed, data) -> None:
    """Changing the tokens after position t never changes the logits at positions <= t."""
    config = GPTConfig(40, 16, 16, 4, 2, n_kv_heads=2, positions=positions)
    model = GPT(config, attention=attention, backend=backend, seed=seed % 1000)
    seq = data.draw(st.integers(2, 16), label="seq")
    t = data.draw(st.integers(0, seq - 2), label="t")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40, (2, seq))
    changed = ids.copy()
    changed[:, t + 1 :] = rng.integers(0, 40, (2, seq - t - 1))
    a = backend.to_numpy(model(backend.asarray(ids, dtype="int64")))
    b = backend.to_numpy(model(backend.asarray(changed, dtype="int64")))
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=1e-5)
    if (changed[:, t + 1] != ids[:, t + 1]).any():  # the changed token's own logits do move
        assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-7)
