"""tinytx.layers.Transformer against torch.nn.Transformer, and the encoder–decoder's invariants.

Parity numbers come from tests/fixtures/transformer_reference.npz, written by
tests/fixtures/make_seq2seq_fixtures.py with torch 2.13.0 (these tests never import
torch): five random configurations (layer counts, pre- and post-norm, ReLU and GELU,
padded sources and targets), their outputs, and autograd's gradients of
L = sum(out * cotangent) for the inputs and every parameter.

The properties run in float64, where rounding is ~1e-16 per operation; two computations
of the same function by different routes (other shapes, so other summation orders in
BLAS) then agree to ~1e-13 for these small models, so 1e-10 is a rounding bound with
room to spare, and any real leak (a masked position that counts) is O(1e-2) or more.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinytx
from tinytx.layers import Transformer

FIXTURE = Path(__file__).parent / "fixtures" / "transformer_reference.npz"
OUT_ATOL = 1e-5  # float32 outputs, as the other torch parity tests
GRAD_RTOL = 1e-4  # gradients: max |error| relative to the largest |gradient| of the tensor
F64_TOL = 1e-10  # float64: see the module docstring


@pytest.fixture(scope="module")
def cases() -> dict[str, dict]:
    """{case: {"config", "state", "grad", and the named arrays}} from the fixture."""
    grouped: dict[str, dict] = {}
    with np.load(FIXTURE) as data:
        for full_key in data.files:
            case, name = full_key.split(".", 1)
            entry = grouped.setdefault(case, {"state": {}, "grad": {}})
            if name.startswith(("state.", "grad.")):
                kind, key = name.split(".", 1)
                entry[kind][key] = data[full_key]
            elif name == "config":
                entry["config"] = json.loads(str(data[full_key]))
            else:
                entry[name] = data[full_key]
    grouped.pop("meta")
    return grouped


CASE_NAMES = [
    "post_relu_1x1",
    "pre_gelu_2x1_padded",
    "post_gelu_1x2_padded",
    "pre_relu_2x2_padded",
    "post_relu_3x2_tgt_padded",
]


def _lengths(case: dict, name: str) -> list[int] | None:
    return [int(n) for n in case[name]] if name in case else None


def _model(backend: tinytx.Backend, case: dict) -> Transformer:
    return Transformer(**case["config"], backend=backend).load_state_dict(case["state"])


def test_fixture_is_small_and_complete(cases) -> None:
    assert FIXTURE.stat().st_size < 500_000
    assert set(cases) == set(CASE_NAMES)
    configs = [c["config"] for c in cases.values()]
    assert {c["norm_first"] for c in configs} == {False, True}
    assert {c["activation"] for c in configs} == {"relu", "gelu"}
    assert any("src_lengths" in c for c in cases.values())
    assert any("tgt_lengths" in c for c in cases.values())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_state_dict_keys_are_torchs(cases, name) -> None:
    """Exactly nn.Transformer's keys, final norms included, in a loadable layout."""
    model = Transformer(**cases[name]["config"])
    assert list(model.parameters()) == list(cases[name]["state"])
    assert "encoder.norm.weight" in cases[name]["state"]
    assert "decoder.norm.weight" in cases[name]["state"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_output_matches_torch(backend, cases, name) -> None:
    case = cases[name]
    model = _model(backend, case)
    out = model(
        backend.asarray(case["src"]),
        backend.asarray(case["tgt"]),
        src_lengths=_lengths(case, "src_lengths"),
        tgt_lengths=_lengths(case, "tgt_lengths"),
    )
    got = backend.to_numpy(out)
    assert got.shape == case["out"].shape and got.dtype == np.float32
    err = float(np.max(np.abs(got.astype(np.float64) - case["out"])))
    assert err <= OUT_ATOL, f"{name}: max abs error {err:.3g} on {backend.name}"


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gradients_match_torch(backend, cases, name) -> None:
    case = cases[name]
    model = _model(backend, case)
    out, pullback = tinytx.vjp(
        model,
        backend.asarray(case["src"]),
        backend.asarray(case["tgt"]),
        src_lengths=_lengths(case, "src_lengths"),
        tgt_lengths=_lengths(case, "tgt_lengths"),
    )
    assert float(np.max(np.abs(backend.to_numpy(out) - case["out"]))) <= OUT_ATOL
    (grad_src, grad_tgt), grads = pullback(backend.asarray(case["cotangent"]))
    assert list(grads) == list(case["grad"])
    errors = {
        "src": _relative_error(backend.to_numpy(grad_src), case["grad_src"]),
        "tgt": _relative_error(backend.to_numpy(grad_tgt), case["grad_tgt"]),
    }
    for key, grad in grads.items():
        errors[key] = _relative_error(backend.to_numpy(grad), case["grad"][key])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, f"{name}: {worst} off by {errors[worst]:.3g} relative"


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"src_lengths": [3, -1]}, r"src_lengths must lie in \[0, 4\].*-1"),
        ({"src_lengths": [3, 5]}, r"src_lengths must lie in \[0, 4\].*5"),
        ({"tgt_lengths": [4, 3]}, r"tgt_lengths must lie in \[0, 3\].*4"),
        ({"src_lengths": [3]}, r"src_lengths needs one length per sequence \(2\), got 1"),
        ({"tgt_lengths": [1.5, 2]}, r"tgt_lengths must be ints"),
    ],
)
def test_bad_lengths_are_clear_errors(backend, kwargs, message) -> None:
    model = Transformer(8, 2, 1, 1, 16, backend=backend)
    src = backend.asarray(np.zeros((2, 4, 8)), dtype="float32")
    tgt = backend.asarray(np.zeros((2, 3, 8)), dtype="float32")
    with pytest.raises(ValueError, match=message):
        model(src, tgt, **kwargs)


def test_bad_shapes_are_clear_errors(backend) -> None:
    model = Transformer(8, 2, 1, 1, 16, backend=backend)
    src = backend.asarray(np.zeros((2, 4, 8)), dtype="float32")
    with pytest.raises(ValueError, match=r"tgt of shape \(batch, seq >= 1, 8\), got \(2, 3, 6\)"):
        model(src, backend.asarray(np.zeros((2, 3, 6)), dtype="float32"))
    with pytest.raises(ValueError, match="same number of sequences, got 2 and 1"):
        model(src, backend.asarray(np.zeros((1, 3, 8)), dtype="float32"))


# --- properties (float64) ----------------------------------------------------------------


@st.composite
def transformers(draw: st.DrawFn) -> dict:
    """A small random Transformer configuration and input sizes."""
    n_heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "config": {
            "d_model": 4 * n_heads * draw(st.integers(1, 2)),
            "n_heads": n_heads,
            "n_encoder_layers": draw(st.integers(1, 2)),
            "n_decoder_layers": draw(st.integers(1, 2)),
            "d_ff": draw(st.sampled_from([8, 16])),
            "norm_first": draw(st.booleans()),
            "activation": draw(st.sampled_from(["relu", "gelu"])),
        },
        "seed": draw(st.integers(0, 2**16)),
        "batch": draw(st.integers(1, 3)),
        "src": draw(st.integers(1, 6)),
        "tgt": draw(st.integers(2, 6)),
    }


def _float64_model(backend: tinytx.Backend, spec: dict) -> Transformer:
    return Transformer(**spec["config"], backend=backend, seed=spec["seed"]).to(dtype="float64")


def _random(backend: tinytx.Backend, rng: np.random.Generator, *shape: int):
    return backend.asarray(rng.normal(size=shape), dtype="float64")


@given(spec=transformers(), cut=st.integers(0, 4))
def test_decoder_never_sees_future_targets(backend, spec, cut) -> None:
    """Changing target positions after t leaves the outputs at 0..t exactly as they were."""
    model = _float64_model(backend, spec)
    rng = np.random.default_rng(spec["seed"])
    d, (b, s, t) = spec["config"]["d_model"], (spec["batch"], spec["src"], spec["tgt"])
    cut = min(cut, t - 2)  # keep positions 0..cut, change cut+1 .. t-1
    src, tgt = rng.normal(size=(b, s, d)), rng.normal(size=(b, t, d))
    changed = tgt.copy()
    changed[:, cut + 1 :, :] = rng.normal(size=(b, t - cut - 1, d))
    xp_src = backend.asarray(src, dtype="float64")
    before = backend.to_numpy(model(xp_src, backend.asarray(tgt, dtype="float64")))
    after = backend.to_numpy(model(xp_src, backend.asarray(changed, dtype="float64")))
    np.testing.assert_allclose(after[:, : cut + 1], before[:, : cut + 1], rtol=0, atol=F64_TOL)
    assert np.max(np.abs(after[:, cut + 1 :] - before[:, cut + 1 :])) > 1e-6  # they do change


@given(spec=transformers(), extra=st.integers(1, 3), data=st.data())
def test_padding_the_source_changes_nothing(backend, spec, extra, data) -> None:
    """Each row of a padded batch (any values in the padding, masked by src_lengths) gives
    the output of that row alone, unpadded."""
    model = _float64_model(backend, spec)
    rng = np.random.default_rng(spec["seed"])
    d, b, t = spec["config"]["d_model"], spec["batch"], spec["tgt"]
    lengths = data.draw(st.lists(st.integers(1, spec["src"]), min_size=b, max_size=b))
    seq = max(lengths) + extra
    src = rng.normal(size=(b, seq, d)) * 3.0  # the padding holds large garbage
    tgt = rng.normal(size=(b, t, d))
    padded = model(
        backend.asarray(src, dtype="float64"),
        backend.asarray(tgt, dtype="float64"),
        src_lengths=lengths,
    )
    padded = backend.to_numpy(padded)
    for row, n in enumerate(lengths):
        alone = model(
            backend.asarray(src[row : row + 1, :n], dtype="float64"),
            backend.asarray(tgt[row : row + 1], dtype="float64"),
        )
        np.testing.assert_allclose(
            padded[row : row + 1], backend.to_numpy(alone), rtol=0, atol=F64_TOL
        )


@given(spec=transformers(), data=st.data())
def test_padding_the_target_changes_nothing_at_real_positions(backend, spec, data) -> None:
    model = _float64_model(backend, spec)
    rng = np.random.default_rng(spec["seed"])
    d, b, s, t = spec["config"]["d_model"], spec["batch"], spec["src"], spec["tgt"]
    lengths = data.draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
    src, tgt = rng.normal(size=(b, s, d)), rng.normal(size=(b, t, d))
    padded = backend.to_numpy(
        model(
            backend.asarray(src, dtype="float64"),
            backend.asarray(tgt, dtype="float64"),
            tgt_lengths=lengths,
        )
    )
    assert np.all(np.isfinite(padded))
    for row, n in enumerate(lengths):
        alone = model(
            backend.asarray(src[row : row + 1], dtype="float64"),
            backend.asarray(tgt[row : row + 1, :n], dtype="float64"),
        )
        np.testing.assert_allclose(
            padded[row : row + 1, :n], backend.to_numpy(alone), rtol=0, atol=F64_TOL
        )


@given(spec=transformers())
def test_cached_decoding_equals_full_recomputation(backend, spec) -> None:
    """Feeding the target one position at a time through the KV cache, with the memory's
    cross-attention keys and values projected once, gives the full pass's outputs."""
    model = _float64_model(backend, spec)
    rng = np.random.default_rng(spec["seed"])
    d, b, s, t = spec["config"]["d_model"], spec["batch"], spec["src"], spec["tgt"]
    src = _random(backend, rng, b, s, d)
    tgt = rng.normal(size=(b, t, d))
    full = backend.to_numpy(model(src, backend.asarray(tgt, dtype="float64")))
    memory = model.encode(src)
    memory_kv = [layer.multihead_attn.project_context(memory) for layer in model.decoder.layers]
    cache = model.new_cache(b, t)
    for position in range(t):
        step = model.decode(
            backend.asarray(tgt[:, position : position + 1], dtype="float64"),
            memory,
            cache=cache,
            memory_kv=memory_kv,
        )
        np.testing.assert_allclose(
            backend.to_numpy(step)[:, 0], full[:, position], rtol=0, atol=F64_TOL
        )
