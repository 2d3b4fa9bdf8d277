"""tinytx against PyTorch: load torch's state dicts, feed the same inputs, match its outputs.

The numbers come from tests/fixtures/torch_reference.npz, written by
tests/fixtures/make_torch_fixtures.py with torch 2.13.0 (see that script for how to
regenerate it). These tests never import torch. Every case runs on every backend and
must agree within 1e-5 (float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tinytx
from tinytx import functional as F
from tinytx.layers import DecoderBlock, EncoderBlock, MultiHeadAttention, padding_mask

FIXTURE = Path(__file__).parent / "fixtures" / "torch_reference.npz"
ATOL = 1e-5  # float32


@pytest.fixture(scope="module")
def cases() -> dict[str, dict[str, np.ndarray]]:
    """The fixture as {case: {name: array}}; state dicts under "state" as {key: array}."""
    grouped: dict[str, dict] = {}
    with np.load(FIXTURE) as data:
        for full_key in data.files:
            case, name = full_key.split(".", 1)
            entry = grouped.setdefault(case, {"state": {}})
            if name.startswith("state."):
                entry["state"][name[len("state.") :]] = data[full_key]
            elif name == "config":
                entry["config"] = json.loads(str(data[full_key]))
            else:
                entry[name] = data[full_key]
    return grouped


def _close(backend: tinytx.Backend, got, want: np.ndarray, what: str) -> float:
    """Assert |got - want| <= ATOL everywhere; return the largest error."""
    got = backend.to_numpy(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch {want.shape}"
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}, expected float32"
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL} on {backend.name}"
    return err


def test_fixture_is_small_and_complete(cases) -> None:
    assert FIXTURE.stat().st_size < 1_000_000
    assert str(cases["meta"]["torch_version"]).startswith("2.13.0")
    expected = {
        "mha", "mha_padded", "mha_cross", "sdpa", "sdpa_causal", "sdpa_mask", "sdpa_scale",
        "enc_post_relu", "enc_post_gelu", "enc_pre_relu", "enc_pre_gelu",
        "enc_post_gelu_padded", "enc_pre_relu_padded", "dec_post_relu", "dec_pre_gelu",
    }  # fmt: skip
    assert expected <= set(cases)


# --- nn.MultiheadAttention -----------------------------------------------------------


@pytest.mark.parametrize("case", ["mha", "mha_padded", "mha_cross"])
def test_multihead_attention_matches_torch(backend, cases, case) -> None:
    c = cases[case]
    mha = MultiHeadAttention(**c["config"], backend=backend).load_state_dict(c["state"])
    x = backend.asarray(c["x"])
    context = backend.asarray(c["context"]) if "context" in c else None
    seq_k = c["weights"].shape[-1]
    mask = (
        padding_mask(list(map(int, c["lengths"])), seq_k, backend=backend)
        if "lengths" in c
        else None
    )
    out, weights = mha(x, context, mask=mask, return_weights=True)
    _close(backend, out, c["out"], f"{case} output")
    # torch's average_attn_weights=False gives the per-head weights, like tinytx's.
    _close(backend, weights, c["weights"], f"{case} per-head weights")
    # average_attn_weights=True is the mean over the heads.
    averaged = backend.xp.mean(weights, axis=1)  # (batch, seq_q, seq_k)
    _close(backend, averaged, c["avg_weights"], f"{case} averaged weights")


# --- F.scaled_dot_product_attention --------------------------------------------------


@pytest.mark.parametrize("case", ["sdpa", "sdpa_causal", "sdpa_mask", "sdpa_scale"])
def test_scaled_dot_product_attention_matches_torch(backend, cases, case) -> None:
    c = cases[case]
    q, k, v = (backend.asarray(c[name]) for name in ("q", "k", "v"))
    mask = backend.asarray(c["mask"]) if "mask" in c else None
    scale = c.get("config", {}).get("scale")
    out, _ = F.scaled_dot_product_attention(
        q, k, v, mask=mask, causal=case == "sdpa_causal", scale=scale
    )
    _close(backend, out, c["out"], f"{case} output")
    if case == "sdpa_mask":  # the fully masked query row: zeros in torch and in tinytx
        assert np.all(c["out"][1, :, 2, :] == 0)
        assert np.all(backend.to_numpy(out)[1, :, 2, :] == 0)


# --- nn.TransformerEncoderLayer / nn.TransformerDecoderLayer --------------------------

ENCODER_CASES = [
    "enc_post_relu", "enc_post_gelu", "enc_pre_relu", "enc_pre_gelu",
    "enc_post_gelu_padded", "enc_pre_relu_padded",
]  # fmt: skip


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_encoder_block_matches_torch(backend, cases, case) -> None:
    c = cases[case]
    block = EncoderBlock(**c["config"], backend=backend).load_state_dict(c["state"])
    seq = c["x"].shape[1]
    lengths = [int(n) for n in c.get("lengths", [seq] * c["x"].shape[0])]
    mask = padding_mask(lengths, seq, backend=backend) if "lengths" in c else None
    out = backend.to_numpy(block(backend.asarray(c["x"]), mask=mask))
    # torch's eval "fast path" may leave zeros or garbage at padded query positions, so
    # only the real tokens are compared (for the unpadded cases that is every token).
    for b, n in enumerate(lengths):
        _close(backend, backend.asarray(out[b, :n]), c["out"][b, :n], f"{case} sequence {b}")


@pytest.mark.parametrize("case", ["dec_post_relu", "dec_pre_gelu"])
def test_decoder_block_matches_torch(backend, cases, case) -> None:
    c = cases[case]
    block = DecoderBlock(**c["config"], backend=backend).load_state_dict(c["state"])
    memory_mask = None
    if "memory_lengths" in c:
        lengths = [int(n) for n in c["memory_lengths"]]
        memory_mask = padding_mask(lengths, c["memory"].shape[1], backend=backend)
    out = block(
        backend.asarray(c["x"]), backend.asarray(c["memory"]), memory_mask=memory_mask, causal=True
    )
    _close(backend, out, c["out"], f"{case} output")


def test_torch_state_dict_keys_are_tinytx_keys(cases) -> None:
    """The torch layers' keys are exactly tinytx's (so nothing is silently ignored)."""
    pairs = [
        ("mha", lambda cfg: MultiHeadAttention(**cfg)),
        ("enc_pre_gelu", lambda cfg: EncoderBlock(**cfg)),
        ("dec_post_relu", lambda cfg: DecoderBlock(**cfg)),
    ]
    for case, build in pairs:
        module = build(cases[case]["config"])
        ours = {k: v.shape for k, v in module.state_dict().items()}
        theirs = {k: v.shape for k, v in cases[case]["state"].items()}
        assert ours == theirs, case
