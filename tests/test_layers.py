"""The modules: forward passes against NumPy references, state dicts, to(), masks, errors,
the trace, and seeded initialisation. Every array test runs on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tinytx
from tinytx import functional as F
from tinytx import init
from tinytx.layers import (
    BackendMismatchError,
    DecoderBlock,
    Embedding,
    Encoder,
    EncoderBlock,
    FeedForward,
    LayerNorm,
    LearnedPositions,
    Linear,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositions,
    StateDictError,
    causal_mask,
    mean_pool,
    padding_mask,
    sinusoidal_table,
)
from tinytx.plugins import (
    AttentionError,
    UnknownAttentionError,
    available_attention,
    register_attention,
    unregister_attention,
)

RNG = np.random.default_rng(7)


def put(backend, host, dtype="float32"):
    return backend.asarray(host, dtype=dtype)


def host(backend, x) -> np.ndarray:
    return backend.to_numpy(x)


def close(backend, got, want, tol=2e-5) -> None:
    np.testing.assert_allclose(host(backend, got), want, atol=tol, rtol=tol)


# --- NumPy references, written independently of tinytx ------------------------------


def np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def np_mha(sd, x, context=None, n_heads=2, n_kv_heads=None, mask=None, causal=False):
    """Multi-head attention from a tinytx/torch state dict, in float64, head by head."""
    context = x if context is None else context
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    d = x.shape[-1]
    dh = d // n_heads
    w, b = sd["in_proj_weight"].astype(np.float64), sd["in_proj_bias"].astype(np.float64)
    q = x @ w[:d].T + b[:d]
    k = context @ w[d : d + n_kv_heads * dh].T + b[d : d + n_kv_heads * dh]
    v = context @ w[d + n_kv_heads * dh :].T + b[d + n_kv_heads * dh :]
    batch, sq, sk = x.shape[0], x.shape[1], context.shape[1]
    out = np.zeros((batch, sq, d))
    weights = np.zeros((batch, n_heads, sq, sk))
    for h in range(n_heads):
        g = h // (n_heads // n_kv_heads)  # the key/value head serving query head h
        qh, kh, vh = (
            q[..., h * dh : (h + 1) * dh],
            k[..., g * dh : (g + 1) * dh],
            v[..., g * dh : (g + 1) * dh],
        )
        s = qh @ np.swapaxes(kh, -1, -2) / math.sqrt(dh)
        allowed = np.ones(s.shape, dtype=bool)
        if mask is not None:
            allowed &= np.broadcast_to(mask[:, 0], s.shape)
        if causal:
            allowed &= np.tril(np.ones((sq, sk), dtype=bool))
        s = np.where(allowed, s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        weights[:, h] = p
        out[..., h * dh : (h + 1) * dh] = p @ vh
    return out @ sd["out_proj.weight"].T + sd["out_proj.bias"], weights


# --- Linear, Embedding, norms, feed-forward ------------------------------------------


def test_linear(backend) -> None:
    layer = Linear(4, 3, backend=backend, seed=1)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias"} and sd["weight"].shape == (3, 4)
    bound = 1 / math.sqrt(4)
    assert np.all(np.abs(sd["weight"]) <= bound) and np.all(np.abs(sd["bias"]) <= bound)
    x = RNG.normal(size=(2, 5, 4))
    close(backend, layer(put(backend, x)), x @ sd["weight"].T + sd["bias"])
    no_bias = Linear(4, 3, bias=False, backend=backend)
    assert set(no_bias.state_dict()) == {"weight"}
    close(backend, no_bias(put(backend, x)), x @ no_bias.state_dict()["weight"].T)
    with pytest.raises(ValueError, match=r"Linear expects \(\.\.\., 4\), got \(2, 3\)"):
        layer(put(backend, np.ones((2, 3))))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_sizes_must_be_positive_ints(bad) -> None:
    with pytest.raises(ValueError, match="must be a positive int"):
        Linear(bad, 3)
    with pytest.raises(ValueError, match="must be a positive int"):
        Embedding(bad, 3)
    with pytest.raises(ValueError, match="must be a positive int"):
        MultiHeadAttention(8, bad)


def test_embedding(backend) -> None:
    emb = Embedding(10, 4, backend=backend, seed=3)
    table = emb.state_dict()["weight"]
    assert table.shape == (10, 4)
    ids = np.array([[0, 9, 3], [3, 3, 1]])
    out = emb(backend.asarray(ids))
    assert out.dtype == backend.xp.float32
    np.testing.assert_array_equal(host(backend, out), table[ids])


def test_embedding_rejects_bad_ids(backend) -> None:
    emb = Embedding(10, 4, backend=backend)
    with pytest.raises(
        ValueError, match=r"token ids must lie in \[0, 10\), got values from 2 to 10"
    ):
        emb(backend.asarray(np.array([2, 10])))
    with pytest.raises(ValueError, match=r"got values from -1 to 3"):
        emb(backend.asarray(np.array([[3, -1]])))
    with pytest.raises(TypeError, match="integer token ids"):
        emb(put(backend, np.array([1.0, 2.0])))
    other = "strict" if backend.name != "strict" else "numpy"
    with pytest.raises(BackendMismatchError, match=f"weights live on backend {backend.name!r}"):
        emb(tinytx.get_backend(other).asarray(np.array([1, 2])))


def test_layer_norm_and_rms_norm_modules(backend) -> None:
    x = RNG.normal(size=(2, 3, 6)) * 2 + 1
    ln = LayerNorm(6, eps=1e-3, backend=backend)
    sd = {"weight": RNG.normal(size=6), "bias": RNG.normal(size=6)}
    ln.load_state_dict(sd)
    close(backend, ln(put(backend, x)), np_layer_norm(x, sd["weight"], sd["bias"], 1e-3))
    assert set(LayerNorm(6, bias=False).state_dict()) == {"weight"}
    rms = RMSNorm(6, backend=backend)
    assert set(rms.state_dict()) == {"weight"}
    np.testing.assert_array_equal(rms.state_dict()["weight"], np.ones(6))
    want = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    close(backend, rms(put(backend, x)), want)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_feed_forward(backend, activation) -> None:
    ff = FeedForward(4, 8, activation=activation, backend=backend, seed=2)
    sd = ff.state_dict()
    assert set(sd) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    x = RNG.normal(size=(2, 3, 4))
    h = x @ sd["linear1.weight"].T + sd["linear1.bias"]
    c = math.sqrt(2 / math.pi)
    act = {
        "relu": np.maximum(h, 0),
        "gelu": 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2))),
        "gelu_tanh": 0.5 * h * (1 + np.tanh(c * (h + 0.044715 * h**3))),
    }[activation]
    close(backend, ff(put(backend, x)), act @ sd["linear2.weight"].T + sd["linear2.bias"])


def test_feed_forward_unknown_activation() -> None:
    with pytest.raises(ValueError, match="unknown activation 'swish'; expected one of: relu, gelu"):
        FeedForward(4, 8, activation="swish")


# --- positions -----------------------------------------------------------------------


def test_sinusoidal_table_is_the_papers(backend) -> None:
    xp, device = backend.xp, backend.device
    got = host(backend, sinusoidal_table(7, 6, xp=xp, device=device, dtype=xp.float64))
    pos, i = np.arange(7)[:, None], np.arange(3)[None, :]
    np.testing.assert_allclose(got[:, 0::2], np.sin(pos / 10000 ** (2 * i / 6)), atol=1e-12)
    np.testing.assert_allclose(got[:, 1::2], np.cos(pos / 10000 ** (2 * i / 6)), atol=1e-12)
    shifted = sinusoidal_table(3, 6, xp=xp, device=device, dtype=xp.float64, offset=4)
    np.testing.assert_allclose(host(backend, shifted), got[4:7], atol=1e-12)


def test_sinusoidal_positions(backend) -> None:
    pos = SinusoidalPositions(6, max_len=8, backend=backend)
    assert pos.state_dict() == {}
    x = RNG.normal(size=(2, 5, 6))
    table = host(
        backend,
        sinusoidal_table(5, 6, xp=backend.xp, device=backend.device, dtype=backend.xp.float32),
    )
    close(backend, pos(put(backend, x)), x + table)
    with pytest.raises(ValueError, match=r"positions 6\.\.10 exceed the maximum length 8"):
        pos(put(backend, x), offset=6)
    with pytest.raises(ValueError, match="even d_model"):
        SinusoidalPositions(5)


def test_learned_positions(backend) -> None:
    pos = LearnedPositions(8, 4, backend=backend, seed=5)
    table = pos.state_dict()["weight"]
    assert table.shape == (8, 4) and 0.005 < table.std() < 0.05  # N(0, 0.02^2)
    x = RNG.normal(size=(2, 3, 4))
    close(backend, pos(put(backend, x)), x + table[:3])
    close(backend, pos(put(backend, x), offset=5), x + table[5:8])
    with pytest.raises(ValueError, match="exceed the maximum length 8"):
        pos(put(backend, x), offset=6)


def test_rotary_embedding(backend) -> None:
    rope = RotaryEmbedding(4, backend=backend).to(dtype="float64")
    assert rope.state_dict() == {}
    x = RNG.normal(size=(1, 2, 5, 4))
    got = host(backend, rope(put(backend, x, "float64")))
    # the formula, written out: pairs (x_i, x_{i+2}) rotated by p * 10000^(-2i/4)
    p = np.arange(5)[:, None]
    theta = p * 10000.0 ** (-np.arange(2) / 2)
    cos, sin = np.cos(theta), np.sin(theta)
    want = np.concatenate(
        [x[..., :2] * cos - x[..., 2:] * sin, x[..., 2:] * cos + x[..., :2] * sin], -1
    )
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got[..., 0, :], x[..., 0, :])  # position 0: no rotation
    # a rotation keeps each pair's length
    np.testing.assert_allclose(
        got[..., :2] ** 2 + got[..., 2:] ** 2, x[..., :2] ** 2 + x[..., 2:] ** 2
    )
    with pytest.raises(ValueError, match="even head width"):
        RotaryEmbedding(3)
    with pytest.raises(ValueError, match="expects head width 4, got 6"):
        rope(put(backend, np.ones((1, 1, 2, 6)), "float64"))


def test_rotary_scores_depend_on_relative_position_only(backend) -> None:
    rope = RotaryEmbedding(8, backend=backend).to(dtype="float64")
    q, k = (RNG.normal(size=(1, 1, 1, 8)) for _ in range(2))

    def score(m: int, n: int) -> float:
        qm = host(backend, rope(put(backend, q, "float64"), offset=m))
        kn = host(backend, rope(put(backend, k, "float64"), offset=n))
        return float(np.sum(qm * kn))

    assert score(3, 1) == pytest.approx(score(7, 5), abs=1e-10)
    assert score(0, 4) == pytest.approx(score(10, 14), abs=1e-10)
    assert abs(score(3, 1) - score(1, 3)) > 1e-6  # but it does depend on m - n


# --- multi-head attention ------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_mha_keys_and_shapes(n_kv_heads) -> None:
    mha = MultiHeadAttention(8, 4, n_kv_heads=n_kv_heads)
    kv = 4 if n_kv_heads is None else n_kv_heads
    shapes = {k: v.shape for k, v in mha.state_dict().items()}
    assert shapes == {
        "in_proj_weight": (8 + 2 * kv * 2, 8),  # W_Q, W_K, W_V stacked, d_head = 2
        "in_proj_bias": (8 + 2 * kv * 2,),
        "out_proj.weight": (8, 8),
        "out_proj.bias": (8,),
    }
    assert set(MultiHeadAttention(8, 4, bias=False).state_dict()) == {
        "in_proj_weight",
        "out_proj.weight",
    }


@pytest.mark.parametrize("n_heads, n_kv_heads", [(2, None), (4, 2), (4, 1)])
def test_mha_matches_reference(backend, n_heads, n_kv_heads) -> None:
    """MHA, grouped-query (GQA) and multi-query (MQA) against a head-by-head loop."""
    mha = MultiHeadAttention(8, n_heads, n_kv_heads=n_kv_heads, backend=backend, seed=4)
    sd = {k: v + RNG.normal(size=v.shape) * 0.1 for k, v in mha.state_dict().items()}
    mha.load_state_dict(sd)  # random biases too
    x = RNG.normal(size=(2, 5, 8))
    out, w = mha(put(backend, x), causal=True, return_weights=True)
    want_out, want_w = np_mha(sd, x, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=True)
    close(backend, out, want_out)
    close(backend, w, want_w)
    assert tuple(w.shape) == (2, n_heads, 5, 5)
    # without return_weights: the output alone, the same numbers
    close(backend, mha(put(backend, x), causal=True), want_out)


def test_mha_cross_attention_with_padding(backend) -> None:
    mha = MultiHeadAttention(8, 2, backend=backend, seed=1)
    sd = mha.state_dict()
    x, ctx = RNG.normal(size=(2, 3, 8)), RNG.normal(size=(2, 6, 8))
    mask = padding_mask([6, 2], 6, backend=backend)
    out, w = mha(put(backend, x), put(backend, ctx), mask=mask, return_weights=True)
    want_out, want_w = np_mha(sd, x, ctx, mask=host(backend, mask))
    close(backend, out, want_out)
    close(backend, w, want_w)
    assert np.all(host(backend, w)[1, :, :, 2:] == 0)  # padded keys get exactly zero weight


def test_mha_rotary_has_no_parameters_but_changes_the_output(backend) -> None:
    plain = MultiHeadAttention(8, 2, backend=backend, seed=3)
    rotary = MultiHeadAttention(8, 2, rotary=True, backend=backend, seed=3)
    assert set(plain.state_dict()) == set(rotary.state_dict())
    x = put(backend, RNG.normal(size=(1, 4, 8)))
    assert np.max(np.abs(host(backend, plain(x)) - host(backend, rotary(x)))) > 1e-4


def test_mha_bad_configuration() -> None:
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by n_heads \(4\)"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        MultiHeadAttention(12, 4, n_kv_heads=3)


def test_mha_bad_input_shapes(backend) -> None:
    mha = MultiHeadAttention(8, 2, backend=backend)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, seq, 8\), got \(3, 8\)"):
        mha(put(backend, np.ones((3, 8))))
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, seq, 8\), got \(1, 3, 6\)"):
        mha(put(backend, np.ones((1, 3, 6))))
    with pytest.raises(ValueError, match=r"expects context of shape"):
        mha(put(backend, np.ones((1, 3, 8))), put(backend, np.ones((1, 3, 4))))
    with pytest.raises(ValueError, match="does not broadcast"):
        mha(put(backend, np.ones((1, 3, 8))), mask=padding_mask([2], 4, backend=backend))


def test_unknown_attention_lists_the_registered_ones() -> None:
    with pytest.raises(UnknownAttentionError) as info:
        MultiHeadAttention(8, 2, attention="flashy")
    message = str(info.value)
    assert "unknown attention variant 'flashy'" in message
    for name in available_attention():
        assert name in message
    assert "softmax" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(AttentionError, match="has no option 'window'"):
        MultiHeadAttention(8, 2, attention_options={"window": 3})


@pytest.fixture
def weightless_variant():
    """A variant that returns no weights and supports no mask (unregistered afterwards)."""

    @register_attention("test-weightless", normalized=True)
    def weightless(q, k, v, *, mask=None, causal=False, scale=None):
        out, _ = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out, None

    yield "test-weightless"
    unregister_attention("test-weightless")


def test_mha_refuses_what_its_variant_cannot_do(backend, weightless_variant) -> None:
    mha = MultiHeadAttention(8, 2, attention=weightless_variant, backend=backend)
    x = put(backend, RNG.normal(size=(1, 3, 8)))
    assert tuple(mha(x).shape) == (1, 3, 8)
    with pytest.raises(AttentionError, match="does not return weights"):
        mha(x, return_weights=True)
    with pytest.raises(AttentionError, match="does not support a mask"):
        mha(x, mask=padding_mask([2], 3, backend=backend))
    with pytest.raises(AttentionError, match="does not support causal=True"):
        mha(x, causal=True)


# --- blocks and the encoder ----------------------------------------------------------

TORCH_ENCODER_KEYS = {
    "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
    "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
    "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
}  # fmt: skip


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_block_formula(backend, norm_first) -> None:
    """post-norm: norm(x + f(x)); pre-norm: x + f(norm(x)), with the block's own children."""
    block = EncoderBlock(8, 2, 16, norm_first=norm_first, norm="rms", backend=backend, seed=2)
    assert set(block.state_dict()) == {
        k for k in TORCH_ENCODER_KEYS if not k.startswith(("norm1.b", "norm2.b"))
    }
    x = put(backend, RNG.normal(size=(2, 4, 8)))
    mask = padding_mask([4, 3], 4, backend=backend)
    attn = lambda h: block.self_attn(h, mask=mask)  # noqa: E731
    if norm_first:
        h = x + attn(block.norm1(x))
        want = h + block.ff(block.norm2(h))
    else:
        h = block.norm1(x + attn(x))
        want = block.norm2(h + block.ff(h))
    out, w = block(x, mask=mask, return_weights=True)
    close(backend, out, host(backend, want), tol=1e-6)
    close(backend, block(x, mask=mask), host(backend, want), tol=1e-6)
    assert tuple(w.shape) == (2, 2, 4, 4)


def test_encoder_block_keys_follow_torch() -> None:
    for norm_first in (False, True):
        assert set(EncoderBlock(8, 2, 16, norm_first=norm_first).state_dict()) == TORCH_ENCODER_KEYS


def test_decoder_block(backend) -> None:
    block = DecoderBlock(8, 2, 16, backend=backend, seed=1)
    keys = set(block.state_dict())
    assert {"multihead_attn.in_proj_weight", "norm3.weight", "norm3.bias"} <= keys
    x, memory = put(backend, RNG.normal(size=(2, 4, 8))), put(backend, RNG.normal(size=(2, 6, 8)))
    out, weights = block(x, memory, return_weights=True)
    assert tuple(out.shape) == (2, 4, 8)
    assert set(weights) == {"self", "cross"}
    assert tuple(weights["cross"].shape) == (2, 2, 4, 6)
    self_w = host(backend, weights["self"])  # causal by default: no weight on later tokens
    assert np.all(self_w[..., np.triu_indices(4, 1)[0], np.triu_indices(4, 1)[1]] == 0)
    close(backend, block(x, memory), host(backend, out), tol=1e-6)
    with pytest.raises(ValueError, match="pass memory if and only if"):
        block(x)
    decoder_only = DecoderBlock(8, 2, 16, cross_attention=False, backend=backend)
    assert not any(k.startswith(("multihead_attn", "norm3")) for k in decoder_only.state_dict())
    assert tuple(decoder_only(x).shape) == (2, 4, 8)
    with pytest.raises(ValueError, match="pass memory if and only if"):
        decoder_only(x, memory)


def test_unknown_norm() -> None:
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        EncoderBlock(8, 2, 16, norm="batch")


def test_encoder_is_its_blocks_in_order(backend) -> None:
    enc = Encoder(2, 8, 2, 16, positions="learned", norm_first=True, backend=backend, seed=9)
    keys = set(enc.state_dict())
    assert "positions.weight" in keys and "norm.weight" in keys
    assert {f"layers.{i}.{k}" for i in range(2) for k in TORCH_ENCODER_KEYS} <= keys
    x = put(backend, RNG.normal(size=(2, 5, 8)))
    mask = padding_mask([5, 2], 5, backend=backend)
    h = enc.positions(x)
    for layer in enc.layers:
        h = layer(h, mask=mask)
    out, weights = enc(x, mask=mask, return_weights=True)
    close(backend, out, host(backend, enc.norm(h)), tol=1e-6)
    assert len(weights) == 2 and tuple(weights[0].shape) == (2, 2, 5, 5)


def test_encoder_final_norm_and_options() -> None:
    assert not any(k.startswith("norm.") for k in Encoder(1, 8, 2, 16).state_dict())
    assert any(k.startswith("norm.") for k in Encoder(1, 8, 2, 16, final_norm=True).state_dict())
    assert not any(
        k.startswith("positions") for k in Encoder(1, 8, 2, 16, positions="rotary").state_dict()
    )
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        Encoder(0, 8, 2, 16)
    with pytest.raises(ValueError, match="unknown positions 'alibi'"):
        Encoder(1, 8, 2, 16, positions="alibi")
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        Encoder(1, 8, 2, 16, pooling="max")


def test_mean_pooling(backend) -> None:
    enc = Encoder(1, 8, 2, 16, pooling="mean", backend=backend)
    x = put(backend, RNG.normal(size=(3, 4, 8)))
    mask = padding_mask([4, 2, 1], 4, backend=backend)
    pooled = host(backend, enc(x, mask=mask))
    assert pooled.shape == (3, 8)
    tokens = host(backend, Encoder(1, 8, 2, 16, backend=backend)(x, mask=mask))  # same seed
    for b, n in enumerate([4, 2, 1]):
        np.testing.assert_allclose(pooled[b], tokens[b, :n].mean(0), atol=1e-5)
    h = put(backend, RNG.normal(size=(2, 3, 4)))
    close(backend, mean_pool(h), host(backend, h).mean(1), tol=1e-6)
    empty = host(backend, mean_pool(h, padding_mask([0, 3], 3, backend=backend)))
    assert np.all(empty[0] == 0) and np.all(np.isfinite(empty))
    with pytest.raises(ValueError, match=r"padding mask of shape \(batch, 1, 1, seq\)"):
        mean_pool(h, padding_mask([1, 3], 4, backend=backend))


# --- masks ---------------------------------------------------------------------------


def test_padding_mask(backend) -> None:
    mask = padding_mask([3, 1, 0], 4, backend=backend)
    assert mask.dtype == backend.xp.bool and backend.owns(mask)
    want = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)[:, None, None, :]
    np.testing.assert_array_equal(host(backend, mask), want)
    # lengths given as an array of the backend: the mask lands on that backend
    from_array = padding_mask(backend.asarray(np.array([3, 1, 0])), 4)
    assert backend.owns(from_array)
    np.testing.assert_array_equal(host(backend, from_array), want)
    with tinytx.use_backend(backend):  # default: the current backend
        assert backend.owns(padding_mask([1], 2))


@pytest.mark.parametrize(
    "lengths, seq_len, message",
    [
        ([3, 5], 4, r"every length must lie in \[0, seq_len=4\], got \[3, 5\]"),
        ([-1], 4, r"every length must lie in \[0, seq_len=4\]"),
        ([], 4, r"every length must lie in"),
        ([2.0], 4, r"lengths must be ints"),
        ([True], 4, r"lengths must be ints"),
        ([2], 0, r"seq_len must be a positive int"),
        ([2], 2.5, r"seq_len must be a positive int"),
    ],
)
def test_padding_mask_bad_lengths(backend, lengths, seq_len, message) -> None:
    with pytest.raises(ValueError, match=message):
        padding_mask(lengths, seq_len, backend=backend)


def test_padding_mask_bad_length_arrays(backend) -> None:
    with pytest.raises(ValueError, match="1-D integer array"):
        padding_mask(put(backend, np.array([2.0, 1.0])), 3)
    with pytest.raises(ValueError, match="1-D integer array"):
        padding_mask(backend.asarray(np.array([[2, 1]])), 3)
    with pytest.raises(ValueError, match="every length must lie in"):
        padding_mask(backend.asarray(np.array([4, 1])), 3)


def test_causal_mask_is_lower_triangular(backend) -> None:
    mask = host(backend, causal_mask(4, 4, xp=backend.xp, device=backend.device))
    np.testing.assert_array_equal(mask, np.tril(np.ones((4, 4), dtype=bool)))


# --- state dicts ---------------------------------------------------------------------


def test_state_dict_round_trip(backend) -> None:
    a = Encoder(2, 8, 2, 16, positions="learned", backend=backend, seed=0)
    b = Encoder(2, 8, 2, 16, positions="learned", backend=backend, seed=1)
    x = put(backend, RNG.normal(size=(1, 3, 8)))
    assert np.max(np.abs(host(backend, a(x)) - host(backend, b(x)))) > 1e-3
    sd = a.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sd.values())
    assert b.load_state_dict(sd) is b
    np.testing.assert_array_equal(host(backend, b(x)), host(backend, a(x)))
    # float64 host values are cast to the module's dtype
    b.load_state_dict({k: v.astype(np.float64) for k, v in sd.items()})
    assert all(v.dtype == np.float32 for v in b.state_dict().values())
    assert list(a.parameters()) == list(sd)
    assert a.num_parameters() == sum(v.size for v in sd.values())


def test_load_state_dict_reports_every_problem_at_once(backend) -> None:
    block = EncoderBlock(8, 2, 16, backend=backend)
    before = block.state_dict()
    bad = dict(before)
    del bad["norm1.weight"], bad["linear2.bias"]  # missing
    bad["self_attn.bias_k"] = np.zeros(8)  # unexpected
    bad["extra.weight"] = np.zeros(2)  # unexpected
    bad["linear1.weight"] = np.zeros((8, 16))  # transposed: wrong shape
    bad["self_attn.in_proj_bias"] = np.zeros(8)  # wrong shape
    with pytest.raises(StateDictError) as info:
        block.load_state_dict(bad)
    message = str(info.value)
    assert message.startswith("cannot load state dict into EncoderBlock")
    assert "missing keys: linear2.bias, norm1.weight" in message  # in the module's order
    assert "unexpected keys: self_attn.bias_k, extra.weight" in message
    assert "linear1.weight: expected (16, 8), got (8, 16)" in message
    assert "self_attn.in_proj_bias: expected (24,), got (8,)" in message
    assert isinstance(info.value, ValueError)
    # nothing was loaded: a failed load leaves the module as it was
    after = block.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_load_state_dict_needs_a_mapping() -> None:
    with pytest.raises(StateDictError, match="state must be a mapping"):
        Linear(2, 2).load_state_dict([("weight", np.zeros((2, 2)))])


def test_load_state_dict_accepts_nested_lists(backend) -> None:
    """Anything numpy.asarray accepts, as the docstring promises."""
    layer = Linear(2, 1, backend=backend)
    layer.load_state_dict({"weight": [[1.0, 2.0]], "bias": [0.5]})
    close(backend, layer(put(backend, np.array([[3.0, 4.0]]))), [[11.5]])
    with pytest.raises(StateDictError, match=r"weight: expected \(1, 2\), got \(2,\)"):
        layer.load_state_dict({"weight": [1.0, 2.0], "bias": [0.5]})


# --- backends, dtypes and to() -------------------------------------------------------


def _other(backend) -> tinytx.Backend:
    return tinytx.get_backend("strict" if backend.name != "strict" else "numpy")


def test_input_from_another_backend_is_refused(backend) -> None:
    block = EncoderBlock(8, 2, 16, backend=backend)
    foreign = _other(backend).asarray(RNG.normal(size=(1, 3, 8)), dtype="float32")
    with pytest.raises(BackendMismatchError) as info:
        block(foreign)
    message = str(info.value)
    assert f"weights live on backend {backend.name!r}" in message and ".to(" in message
    assert isinstance(info.value, TypeError)
    x = put(backend, RNG.normal(size=(1, 3, 8)))
    foreign_mask = padding_mask([2], 3, backend=_other(backend))
    with pytest.raises(BackendMismatchError, match="argument 'mask'"):
        block(x, mask=foreign_mask)


def test_input_dtype_must_match_the_weights(backend) -> None:
    layer = Linear(4, 2, backend=backend)
    with pytest.raises(BackendMismatchError, match="has dtype float64 but the weights are float32"):
        layer(put(backend, np.ones((1, 4)), "float64"))


def test_to_moves_every_parameter(backend) -> None:
    model = Encoder(2, 8, 2, 16, positions="learned", norm_first=True, backend="numpy", seed=4)
    x = RNG.normal(size=(2, 3, 8))
    expected = host(tinytx.get_backend("numpy"), model(put(tinytx.get_backend("numpy"), x)))
    before = model.state_dict()
    assert model.to(backend) is model
    assert all(m.backend is backend for _, m in model.named_modules())
    assert all(backend.owns(v) for v in model.parameters().values())
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # bit for bit
    close(backend, model(put(backend, x)), expected, tol=1e-5)
    if backend.name != "numpy":
        with pytest.raises(BackendMismatchError):
            model(put(tinytx.get_backend("numpy"), x))


def test_to_float64(backend) -> None:
    model = EncoderBlock(8, 2, 16, backend=backend, seed=3)
    x = RNG.normal(size=(1, 4, 8))
    out32 = host(backend, model(put(backend, x)))
    model.to(dtype="float64")
    assert all(m.dtype == "float64" for _, m in model.named_modules())
    assert all(v.dtype == np.float64 for v in model.state_dict().values())
    out64 = model(put(backend, x, "float64"))
    assert out64.dtype == backend.xp.float64
    close(backend, out64, out32, tol=1e-4)
    with pytest.raises(BackendMismatchError, match="has dtype float32 but the weights are float64"):
        model(put(backend, x))


# --- the trace -----------------------------------------------------------------------


def test_trace_records_every_module_call(backend) -> None:
    model = Encoder(1, 8, 2, 16, backend=backend)
    x = put(backend, RNG.normal(size=(2, 3, 8)))
    untraced = host(backend, model(x))
    assert tinytx.trace.__module__ == "tinytx.trace"
    with tinytx.trace(model) as t:
        traced = model(x)
    np.testing.assert_array_equal(host(backend, traced), untraced)
    names = [r.name for r in t.rows]
    assert names[0] == "model" and t.rows[0].kind == "Encoder" and t.rows[0].depth == 0
    for path in (
        "model.layers.0",
        "model.layers.0.self_attn",
        "model.layers.0.self_attn.out_proj",
        "model.layers.0.ff",
        "model.layers.0.ff.linear1",
        "model.layers.0.norm2",
    ):
        assert path in names
    row = t.rows[names.index("model.layers.0.ff.linear1")]
    assert row.kind == "Linear" and row.inputs == [(2, 3, 8)] and row.outputs == [(2, 3, 16)]
    assert row.dtype == "float32" and row.seconds >= 0
    assert row.depth == t.rows[names.index("model.layers.0.ff")].depth + 1
    table = t.table()
    assert table.splitlines()[0].split() == ["layer", "input", "output", "dtype", "ms"]
    assert "model.layers.0.self_attn" in table and "(2, 3, 16)" in table
    # outside the block nothing is recorded
    rows = len(t.rows)
    model(x)
    assert len(t.rows) == rows


def test_trace_without_a_model_uses_class_names(backend) -> None:
    layer = Linear(4, 2, backend=backend)
    with tinytx.trace() as t:
        layer(put(backend, np.ones((1, 4))))
    assert [r.name for r in t.rows] == ["Linear"]


# --- seeded initialisation (tinytx/init.py) ------------------------------------------


def test_same_seed_gives_bit_identical_weights_on_every_backend(backend) -> None:
    def build(on):
        return Encoder(2, 8, 2, 16, positions="learned", n_kv_heads=1, backend=on, seed=11)

    reference = build("numpy").state_dict()
    here = build(backend).state_dict()
    assert list(here) == list(reference)
    for key in reference:
        np.testing.assert_array_equal(here[key], reference[key], err_msg=key)
    other_seed = Encoder(2, 8, 2, 16, positions="learned", n_kv_heads=1, seed=12).state_dict()
    key = "layers.0.linear1.weight"
    assert not np.array_equal(reference[key], other_seed[key])


def test_init_helpers() -> None:
    gen = init.rng(5)
    assert init.rng(gen) is gen  # children share their parent's generator
    np.testing.assert_array_equal(init.rng(5).normal(size=3), init.rng(5).normal(size=3))
    w = init.xavier_uniform(init.rng(0), (30, 20))
    assert w.shape == (30, 20) and np.max(np.abs(w)) <= math.sqrt(6 / 50)
    assert np.max(np.abs(w)) > 0.9 * math.sqrt(6 / 50)
    u = init.uniform(init.rng(0), (1000,), 0.5)
    assert -0.5 <= u.min() and u.max() <= 0.5
    assert abs(init.normal(init.rng(0), (4000,), 2.0).std() - 2.0) < 0.1
    np.testing.assert_array_equal(init.zeros((2,)), [0, 0])
    np.testing.assert_array_equal(init.ones((2,)), [1, 1])
    for bad in (-1, True, 1.5, "0", None):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            init.rng(bad)


def test_module_repr_and_walk() -> None:
    block = EncoderBlock(8, 2, 16)
    assert repr(block) == "EncoderBlock(backend='numpy', dtype='float32')"
    paths = [p for p, _ in block.named_modules()]
    assert paths[:3] == ["", "self_attn", "self_attn.out_proj"]
    assert "ff.linear1" in paths


def test_state_dicts_never_alias_the_parameters(backend) -> None:
    """Editing a loaded or returned host array must not edit the module's weights."""
    from tinytx.layers import Linear

    layer = Linear(3, 2, backend=backend, seed=0)
    state = layer.state_dict()
    before = backend.to_numpy(layer.weight)
    state["weight"][...] = 99.0  # edit what state_dict() returned
    np.testing.assert_array_equal(backend.to_numpy(layer.weight), before)
    source = {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
    layer.load_state_dict(source)
    source["weight"][...] = -5.0  # edit what was loaded
    np.testing.assert_array_equal(backend.to_numpy(layer.weight), np.ones((2, 3)))


def test_a_python_list_is_a_clear_error(backend) -> None:
    from tinytx.layers import LayerNorm

    with pytest.raises(TypeError, match=r"expects an array, got a list; convert it with"):
        LayerNorm(2, backend=backend)([[1.0, 2.0]])
