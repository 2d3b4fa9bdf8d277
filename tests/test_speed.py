"""The speed paths compute the definitions' numbers: sliding-window attention in bands,
and the run-time rules the NumPy natives size themselves by."""

from __future__ import annotations

import numpy as np
import pytest

import tinytx
from tinytx import functional as F
from tinytx.backends import numpy_natives
from tinytx.plugins.sliding_window import _banded, band_mask, rows_per_block


def _inputs(backend: tinytx.Backend, seq_q: int, seq_k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal((2, 3, s, 8), dtype=np.float32) for s in (seq_q, seq_k, seq_k)]
    return host, [backend.asarray(h) for h in host]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("seq_q", "seq_k", "window"), [(300, 300, 4), (70, 200, 9), (1, 150, 3)])
@pytest.mark.parametrize("mask_kind", [None, "keys", "full"])
def test_banded_sliding_window_equals_masked_definition(
    backend, causal, seq_q, seq_k, window, mask_kind
) -> None:
    """Blocks of queries against the keys in their band give the full masked softmax's
    output and weights: the left-out keys have weight exactly 0, only sums reorder."""
    (q, k, v), (qb, kb, vb) = _inputs(backend, seq_q, seq_k)
    rng = np.random.default_rng(1)
    mask = None
    if mask_kind == "keys":
        mask = rng.random((seq_k,)) < 0.7
    elif mask_kind == "full":
        mask = rng.random((2, 1, seq_q, seq_k)) < 0.7
    allowed = band_mask(seq_q, seq_k, window, causal, xp=np, device=None)
    allowed = allowed if mask is None else np.logical_and(mask, allowed)
    with tinytx.use_backend("numpy"):
        ref_out, ref_w = F.scaled_dot_product_attention(q, k, v, mask=allowed)
    mask_b = None if mask is None else backend.asarray(mask)
    out, weights = _banded(qb, kb, vb, mask_b, causal, None, window)
    out, weights = backend.to_numpy(out), backend.to_numpy(weights)
    # Weights in [0, 1] from scores of |q||k| ~ d: each within a few eps of the same
    # softmax (the row sums differ only in order); out = W v adds seq_k eps |W||v|.
    eps = np.finfo(np.float32).eps
    scores = np.abs(q) @ np.abs(np.swapaxes(k, -1, -2)) / np.sqrt(8)
    w_bound = 4 * (8 + seq_k) * eps * (1 + scores.max(axis=-1, keepdims=True)) * ref_w + 1e-30
    assert np.all(np.abs(weights - ref_w) <= w_bound)
    out_bound = np.abs(w_bound) @ np.abs(v) + 2 * seq_k * eps * (np.abs(ref_w) @ np.abs(v))
    assert np.all(np.abs(out - ref_out) <= out_bound)
    assert np.all(weights[~np.broadcast_to(allowed, weights.shape)] == 0)


def test_rows_per_block_rule() -> None:
    assert rows_per_block(1) == 64 and rows_per_block(64) == 256


def test_block_sizes_follow_the_l2_cache() -> None:
    """The natives' sizes come from the L2 size by rule: a quarter of L2 per block."""
    l2 = numpy_natives._l2_cache_bytes()
    assert l2 > 0
    assert numpy_natives._BLOCK_ELEMENTS == max(1 << 12, numpy_natives._L2_BYTES // 16)
    assert numpy_natives._PARALLEL_MIN_ELEMENTS == 4 * numpy_natives._BLOCK_ELEMENTS


def test_read_bandwidth_is_a_positive_rate() -> None:
    from tinytx.bench.generate import read_bandwidth

    assert read_bandwidth(n_bytes=1 << 20, repeats=2, threads=2) > 0


def test_weight_bytes_per_token_counts_a_tied_embedding_once() -> None:
    """GPT-2's shape, small: every parameter once, the position table left out."""
    from tinytx.bench.generate import weight_bytes_per_token
    from tinytx.models.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=50, context_length=16, d_model=8, n_heads=2, n_layers=2)
    model = GPT(config, seed=0)
    params = model.parameters()
    expected = sum(a.size * 4 for name, a in params.items() if not name.startswith("position"))
    assert weight_bytes_per_token(model) == expected


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("seq_q", "seq_k"), [(7, 7), (5, 9), (40, 300)])
@pytest.mark.parametrize("tile", [8, None])
def test_alibi_native_equals_the_plugin_definition(
    numpy_backend, monkeypatch, causal, seq_q, seq_k, tile
) -> None:
    """The NumPy native (penalty made per tile, tiles on the pool) against the plugin's
    own array-API code with the native switched off, with and without a mask."""
    from tinytx.plugins import get_attention

    if tile is not None:
        monkeypatch.setattr(numpy_natives, "_TILE_ELEMENTS", tile)
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 3, s, 8), dtype=np.float32) for s in (seq_q, seq_k, seq_k))
    mask = rng.random((2, 1, seq_q, seq_k)) < 0.8
    alibi = get_attention("alibi")
    out, weights = alibi(q, k, v, mask=mask, causal=causal)
    monkeypatch.delitem(numpy_backend.natives, "alibi_attention")
    ref_out, ref_w = alibi(q, k, v, mask=mask, causal=causal)
    # scores within (d + 2) eps (|q||k| scale + |bias|), so weights within 2 of that
    # relative (softmax's condition), and out = W v adds seq_k eps |W||v|.
    eps = np.finfo(np.float32).eps
    scores = np.abs(q) @ np.abs(np.swapaxes(k, -1, -2)) / np.sqrt(8) + seq_k  # |bias| <= seq_k
    w_bound = 4 * (8 + 2) * eps * scores.max(axis=-1, keepdims=True) * ref_w + seq_k * eps * ref_w
    assert np.all(np.abs(weights - ref_w) <= w_bound + 1e-30)
    out_bound = w_bound @ np.abs(v) + 2 * seq_k * eps * (ref_w @ np.abs(v))
    assert np.all(np.abs(out - ref_out) <= out_bound + 1e-30)


@pytest.mark.parametrize(("seq_q", "seq_k"), [(7, 7), (5, 9), (40, 300)])
@pytest.mark.parametrize("tile", [8, None])
def test_sigmoid_native_equals_the_plugin_definition(
    numpy_backend, monkeypatch, seq_q, seq_k, tile
) -> None:
    """The NumPy native (no mask: tiles on the pool) against the plugin's array-API code
    with the native switched off; a mask or causal=True is left to the definition."""
    from tinytx.plugins import get_attention

    if tile is not None:
        monkeypatch.setattr(numpy_natives, "_TILE_ELEMENTS", tile)
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 3, s, 8), dtype=np.float32) for s in (seq_q, seq_k, seq_k))
    assert numpy_natives.sigmoid_attention(q, k, v, causal=True) is NotImplemented
    sigmoid = get_attention("sigmoid")
    out, weights = sigmoid(q, k, v)
    monkeypatch.delitem(numpy_backend.natives, "sigmoid_attention")
    ref_out, ref_w = sigmoid(q, k, v)
    # The same operations in the same order on each weight; only BLAS's sums may group
    # differently: scores within (d + 1) eps |q||k| scale, sigmoid' <= 1/4, then W v.
    eps = np.finfo(np.float32).eps
    scores = np.abs(q) @ np.abs(np.swapaxes(k, -1, -2)) / np.sqrt(8)
    w_bound = (8 + 1) * eps * scores / 4 + 4 * eps * ref_w
    assert np.all(np.abs(weights - ref_w) <= w_bound)
    out_bound = w_bound @ np.abs(v) + 2 * seq_k * eps * (ref_w @ np.abs(v))
    assert np.all(np.abs(out - ref_out) <= out_bound)


def test_bench_generate_passes_int8_through(monkeypatch) -> None:
    """The CLI is a thin face: `tinytx bench generate --int8` asks run() for int8 timings."""
    from click.testing import CliRunner

    import tinytx.bench.generate as bench_generate
    from tinytx.cli import cli

    asked = {}

    def fake_run(backend, threads, contexts, **kwargs):
        asked.update(kwargs, contexts=tuple(contexts))
        return {"fake": True}

    monkeypatch.setattr(bench_generate, "run", fake_run)
    monkeypatch.setattr(bench_generate, "format_results", lambda result: "table")
    result = CliRunner().invoke(cli, ["bench", "generate", "--context", "64", "--int8"])
    assert result.exit_code == 0, result.output
    assert asked["int8"] is True and asked["contexts"] == (64,)


def test_bench_generate_prints_each_run_against_its_own_ceiling() -> None:
    """The printed report: how the bandwidth was read, each run's fraction of the
    bandwidth around it, the range seen, and the target judged on the runs' median."""
    from tinytx.bench.common import machine_info
    from tinytx.bench.generate import _targets, format_results

    row = {
        "context": 64, "prompt": 32, "cached_tok_s": 50.0, "cached_ms_per_token": 16.0,
        "decode_tok_s": 62.5, "uncached_ms_per_token": 100.0, "cache_speedup": 6.25,
        "run_bandwidth_gb_s": [33.0, 48.0, 34.0], "run_vs_ceiling": [0.9, 0.6, 0.87],
        "run_ms_per_token": [16.7, 17.2, 16.7],
        "decode_vs_ceiling": 0.87, "decode_vs_best_ceiling": 0.6,
        "run_weights_read_gb_s": [30.0, 31.0, 29.5], "decode_vs_weights_read": 0.998,
    }  # fmt: skip
    result = {
        "backend": "numpy", "threads": {"requested": 2}, "repeats": 3, "pause_s": 0.5,
        "settle_s": 0.05,
        "new_tokens": 32, "transformers": None, "machine": machine_info(),
        "read_bandwidth_gb_s": 33.0, "read_method": "a compiled sum in vector lanes",
        "weight_bytes_per_token": 495_000_000, "ceiling_tok_s": 66.7, "results": [row],
        "targets": _targets([row]),
    }  # fmt: skip
    text = format_results(result)
    assert "array, a compiled sum in vector lanes)" in text
    assert "0.5 s rest before each, bandwidth probed 0.05 s after" in text
    assert "each run: 0.90 of 33.0 GB/s (16.7 ms), 0.60 of 48.0 GB/s (17.2 ms), 0.87" in text
    assert "around the runs 33.0-48.0 GB/s, against the best seen 0.600" in text
    assert "summing the weights alone (the same compiled sum, over the arrays a step " in text
    assert "read 29.5-31.0 GB/s around the runs; decode reached a median 0.998 of it" in text
    assert "decode tok/s at 64 >= 0.85 x the bandwidth ceiling: 0.87 (met)" in text


def test_the_probe_after_a_run_waits_only_for_the_threads_to_settle(monkeypatch) -> None:
    """After a run, the bandwidth is probed once the run's idle threads stop spinning:
    GNU OpenMP's spin (milliseconds) gets 0.05 s, Intel's (200 ms) 0.25 s; BLAS's
    threads, or an unknown layer, the full pause; never more than the pause."""
    from tinytx.backends import numba_kernels
    from tinytx.bench.generate import settle_seconds

    if not numba_kernels.available():
        assert settle_seconds(0.5) == 0.5
        return
    import numba

    from tinytx.bench import generate

    monkeypatch.setattr(numba, "threading_layer", lambda: "omp")
    monkeypatch.setattr(generate, "_openmp_vendor", lambda: "GNU")
    assert settle_seconds(0.5) == 0.05 and settle_seconds(0.01) == 0.01
    monkeypatch.setattr(generate, "_openmp_vendor", lambda: "Intel")
    assert settle_seconds(0.5) == 0.25
    monkeypatch.setattr(generate, "_openmp_vendor", lambda: None)
    assert settle_seconds(0.5) == 0.5
    monkeypatch.setattr(numba, "threading_layer", lambda: "tbb")
    assert settle_seconds(0.5) == 0.5
    monkeypatch.setenv("TINYTX_NUMBA", "0")
    assert settle_seconds(0.5) == 0.5
