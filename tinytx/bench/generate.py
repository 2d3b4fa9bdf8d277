"""Benchmark: GPT generation speed, with and without the KV cache, against transformers.

A GPT-2-small-shaped model (12 layers, 12 heads, width 768, vocabulary 50257, context
1024) with random weights, batch 1, float32, greedy decoding. For each context c (64 to
1024) the prompt holds c - 32 tokens and 32 tokens are generated, so the last one stands
at position c - 1:

- ``cached``: tinytx's ``generate`` with the cache: tokens/s over the whole call (prompt
  included, as transformers is timed) and the decode time per token after the prompt;
- ``no cache``: the same with ``use_cache=False`` (every step re-runs the whole sequence):
  time per token, over a few tokens only (it is slow);
- ``transformers``: ``GPT2LMHeadModel.generate`` (greedy, its own cache, 32 new tokens)
  carrying the same weights, with the same thread count, timed in alternation with
  tinytx's cached run. Both must produce the same tokens.

The physical limit, measured in the same run: a decode step reads every weight once, so
it cannot take less than (weight bytes per token) / (memory read bandwidth). The run
sums a 1 GiB float32 array (best of several) for the bandwidth and prints that ceiling
in tokens/s; tinytx's decode speed is reported as a fraction of it. The bandwidth is
measured again right before and right after each timed tinytx run (best of two sums, on
one thread and on all; the better side counts), and each run is set against its own
ceiling: on a shared machine whose memory speed drifts by a quarter from minute to
minute, a ceiling measured once at the start would compare a run with a different
machine. ``decode_vs_ceiling`` is the median of the runs' fractions. A probe of four
sums can catch a slow moment and put a run above its own ceiling, so
``decode_vs_best_ceiling`` sets every run against the best bandwidth seen anywhere in the
benchmark so far: a lower bound, printed beside it.

Targets: the cached per-token time grows at most linearly with the context; at 1024 the
cache is at least 10x faster than recomputing; at context 64, tinytx's decode tokens/s
reach at least 0.85 of the bandwidth ceiling (a peer's speed is no target: "2x
transformers" can lie above the ceiling). On a machine shared with other work the
absolute numbers move; trust the side-by-side ratios.

    python benchmarks/generate.py [--backend numpy] [--threads 2] [--contexts 64 1024 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tinytx.bench.common import (
    add_timing_arguments,
    describe_machine,
    format_table,
    machine_info,
    report,
    set_threads,
)

__all__ = ["CONTEXTS", "main", "run"]

CONTEXTS = (64, 128, 256, 512, 1024)
N_NEW = 32


def read_bandwidth(
    n_bytes: int = 1 << 30,
    repeats: int = 5,
    threads: int | None = None,
    data: np.ndarray | Sequence[np.ndarray] | None = None,
) -> float:
    """The machine's memory read bandwidth in bytes/s: the best of ``repeats`` sums of an
    ``n_bytes`` float32 array (1 GiB: far larger than any cache), the array split into
    one slice per thread (``threads``, default tinytx's pool size), each summed on its own
    thread, as the decode step's products read the weights. The sum is
    :func:`read_method`'s: compiled in vector lanes where numba runs, so that the adds keep
    up with the reads (NumPy's pairwise sum tops out near 25 GB/s a core even on data in
    cache, below what two cores can read). The best run is the closest to what the
    hardware can do; the others were slowed by other work. ``data``: the array to sum
    (1-D float32), instead of a new one of ``n_bytes`` (writing a fresh GiB takes longer
    than summing it); or a sequence of them, each split between the threads and summed
    in turn (as :func:`weight_arrays`: the bytes a decode step reads, where they lie)."""
    from concurrent.futures import ThreadPoolExecutor

    from tinytx.backends import matvec_kernels, numpy_natives

    threads = numpy_natives.get_num_threads() if threads is None else threads
    if data is None:
        data = np.ones(n_bytes // 4, dtype=np.float32)  # written once: every page is real
    arrays = [data] if isinstance(data, np.ndarray) else list(data)
    summed = matvec_kernels.lane_sum if matvec_kernels.kernel_available() else np.sum
    split = [np.array_split(a, threads) for a in arrays]  # split[i][t]: thread t's slice
    shares = [[parts[t] for parts in split] for t in range(threads)]  # thread t's slices

    def sum_all(slices: list[np.ndarray]) -> None:
        for part in slices:
            summed(part)

    summed(arrays[0][:16])  # compiled (or loaded from numba's cache) before the clock
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(sum_all, shares))
            best = min(best, time.perf_counter() - start)
    return sum(a.nbytes for a in arrays) / best


def settle_seconds(pause: float) -> float:
    """How long to wait after a decode run before probing the bandwidth around it: until
    the run's idle threads stop spinning on the cores the probe needs, and no longer (the
    memory's speed can change within a second, so the probe should stand close to the
    run). numba's OpenMP threads spin after their work: GNU's libgomp some 300,000 times
    (GOMP_SPINCOUNT: milliseconds; on the 2-vCPU EPYC, a probe 2 ms after a step read 0.94
    of its rate before it, 10 ms after, 0.99), Intel's 200 ms (KMP_BLOCKTIME). Without
    numba's OpenMP threads (no numba: the decode's threads are BLAS's, which may spin
    longer), under another threading layer, or an OpenMP it cannot name: ``pause``. Never
    more than ``pause``."""
    from tinytx.backends import numba_kernels

    if not numba_kernels.enabled():
        return pause
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return pause
    if layer != "omp":
        return pause
    spin = {"GNU": 0.05, "Intel": 0.25}.get(_openmp_vendor(), pause)
    return min(pause, spin)


def _openmp_vendor() -> str | None:
    """numba's OpenMP runtime: "GNU", "Intel", or None where it cannot say."""
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return None
    return getattr(omppool, "openmp_vendor", None)


def read_method() -> str:
    """How :func:`read_bandwidth` reads: the words the benchmark prints."""
    from tinytx.backends import matvec_kernels

    if matvec_kernels.kernel_available():
        return "a compiled sum in vector lanes"
    return "NumPy's sum (numba missing or off: it can understate the bandwidth)"


def _weights_read(model: Any) -> list[Any]:
    """The parameter arrays one decode step reads: every one once (a tied token
    embedding is read once, as the output matrix), except the position table, of which
    a step reads a single row."""
    seen, arrays = set(), []
    for name, array in model.parameters().items():
        if id(array) in seen or name.startswith("position_embedding"):
            continue
        seen.add(id(array))
        arrays.append(array)
    return arrays


def weight_arrays(model: Any) -> list[np.ndarray]:
    """The weights one decode step reads (see :func:`weight_bytes_per_token`), each
    flattened: views of a numpy-backend model's own arrays, no copy."""
    return [np.asarray(a).reshape(-1) for a in _weights_read(model)]


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter array once (a tied token
    embedding is read once, as the output matrix), except the position table, of which
    a step reads a single row. The KV cache (about 4.7 MB at context 64) is left out."""
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in _weights_read(model))


def _transformers_or_none() -> Any:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        return None
    return transformers


def build_models(backend: Any, use_transformers: bool = True) -> tuple[Any, Any]:
    """(tinytx GPT, transformers GPT2LMHeadModel or None) holding the same random weights."""
    from tinytx.models.gpt import GPT, GPTConfig, gpt2_config, gpt2_state_dict

    transformers = _transformers_or_none() if use_transformers else None
    if transformers is None:
        return GPT(GPTConfig(), backend=backend, seed=0), None
    import torch

    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    config = gpt2_config(theirs.config.to_dict())
    tensors = {name: t.detach().numpy() for name, t in theirs.state_dict().items()}
    ours = GPT(config, backend=backend, seed=0)
    ours.load_state_dict(gpt2_state_dict(tensors, config))
    return ours, theirs


def _time(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _tinytx_cached(model: Any, prompt: np.ndarray, n_new: int) -> tuple[float, float, Any]:
    """(seconds for the whole call, decode seconds per token after the first, tokens)."""
    from tinytx.generate import stream

    backend = model.backend
    stamps, tokens = [time.perf_counter()], []
    for step in stream(model, prompt, n_new):
        backend.synchronize()
        stamps.append(time.perf_counter())
        tokens.append(int(step.tokens[0]))
    decode = (stamps[-1] - stamps[1]) / max(n_new - 1, 1)
    return stamps[-1] - stamps[0], decode, tokens


def _tinytx_uncached(model: Any, prompt: np.ndarray, n_new: int) -> float:
    """Seconds per token when every step recomputes the whole sequence."""
    from tinytx.generate import stream

    stamps = [time.perf_counter()]
    for _ in stream(model, prompt, n_new, use_cache=False):
        model.backend.synchronize()
        stamps.append(time.perf_counter())
    return float(statistics.median(np.diff(stamps)))


def _transformers_generate(model: Any, prompt: np.ndarray, n_new: int) -> tuple[float, Any]:
    import torch

    ids = torch.from_numpy(prompt)
    with torch.inference_mode():
        seconds, out = _time(
            lambda: model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        )
    return seconds, out[0, prompt.shape[1] :].tolist()


def run(
    backend_name: str = "numpy",
    threads: int | None = 2,
    contexts: Sequence[int] = CONTEXTS,
    *,
    repeats: int = 3,
    uncached_tokens: int = 3,
    use_transformers: bool = True,
    int8: bool = False,
    pause: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time generation at each context; return the rows and the targets as a dict.

    ``threads``: BLAS, tinytx's element-wise pool and torch all get that many (None: their
    defaults). ``pause``: seconds of rest before each timed run, so that the thread pools
    of the side that ran before (BLAS and OpenMP threads spin a while after their work)
    are idle and do not steal the other side's cores. ``progress`` receives a line per
    context as it is measured.
    """
    import tinytx

    backend = tinytx.get_backend(backend_name)
    thread_report = set_threads(threads)
    ours, theirs = build_models(backend, use_transformers)
    bytes_per_token = weight_bytes_per_token(ours)
    quantized = None
    if int8:  # weight-only int8 (tinytx.quantize), timed in alternation with float32
        from tinytx.backends.int8_kernels import kernel_name
        from tinytx.quantize import int8_weights

        quantized = int8_weights(ours)
    # The best of one thread and all of them: what the memory system delivers, however
    # it is best reached on this machine.
    probe = np.ones(1 << 28, dtype=np.float32)  # 1 GiB, summed again before each run

    def bandwidth_now(repeats: int) -> float:
        return max(read_bandwidth(repeats=repeats, threads=1, data=probe),
                   read_bandwidth(repeats=repeats, data=probe))  # fmt: skip

    # The weights themselves, summed where they lie by the same compiled sum: what reading
    # a step's bytes costs apart from any arithmetic (the numpy backend only).
    weights = weight_arrays(ours) if backend.name == "numpy" else None

    def weights_read_now(repeats: int) -> float | None:
        return None if weights is None else read_bandwidth(repeats=repeats, data=weights)

    bandwidth = bandwidth_now(5)
    ceiling = bandwidth / bytes_per_token  # tokens/s if a step did nothing but read weights
    if progress is not None:
        progress(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, weights {bytes_per_token / 1e6:.0f} "
                 f"MB per token: ceiling {ceiling:.1f} tokens/s")  # fmt: skip
    rng = np.random.default_rng(0)
    rows = []
    for context in contexts:
        if not N_NEW < context <= ours.config.context_length:
            raise ValueError(f"contexts must lie in ({N_NEW}, {ours.config.context_length}]")
        prompt = rng.integers(0, ours.config.vocab_size, size=(1, context - N_NEW))
        _tinytx_cached(ours, prompt, 2)  # warm-up
        if theirs is not None:
            _transformers_generate(theirs, prompt, 2)
        if quantized is not None:
            with quantized:
                _tinytx_cached(ours, prompt, 2)  # warm-up (compiles the kernel once)
        totals, decodes, hf_totals = [], [], []
        q_totals, q_decodes = [], []
        bandwidths, fractions = [], []  # each run's own ceiling, and its share of it
        weight_reads = []  # the weights' own read around each run
        for _ in range(repeats):  # alternate: a burst of load elsewhere hits both
            time.sleep(pause)
            before, weights_before = bandwidth_now(2), weights_read_now(2)
            total, decode, tokens = _tinytx_cached(ours, prompt, N_NEW)
            time.sleep(settle_seconds(pause))  # the run's threads spin a while after it
            bandwidths.append(max(before, bandwidth_now(2)))  # the better of both sides
            if weights is not None:
                weight_reads.append(max(weights_before, weights_read_now(2)))
            totals.append(total)
            decodes.append(decode)
            fractions.append(bytes_per_token / bandwidths[-1] / decode)
            if theirs is not None:
                time.sleep(pause)
                hf_seconds, hf_tokens = _transformers_generate(theirs, prompt, N_NEW)
                hf_totals.append(hf_seconds)
            if quantized is not None:
                time.sleep(pause)
                with quantized:
                    total, decode, q_tokens = _tinytx_cached(ours, prompt, N_NEW)
                q_totals.append(total)
                q_decodes.append(decode)
        time.sleep(pause)
        short = prompt[:, : context - uncached_tokens]  # ends at the same position
        uncached = _tinytx_uncached(ours, short, uncached_tokens)
        row: dict[str, Any] = {
            "context": context,
            "prompt": prompt.shape[1],
            "cached_tok_s": N_NEW / statistics.median(totals),
            "cached_ms_per_token": statistics.median(decodes) * 1e3,
            "uncached_ms_per_token": uncached * 1e3,
        }
        row["cache_speedup"] = row["uncached_ms_per_token"] / row["cached_ms_per_token"]
        row["decode_tok_s"] = 1e3 / row["cached_ms_per_token"]
        row["run_bandwidth_gb_s"] = [b / 1e9 for b in bandwidths]
        row["run_vs_ceiling"] = fractions  # each run against the bandwidth around it
        row["run_ms_per_token"] = [d * 1e3 for d in decodes]
        row["decode_vs_ceiling"] = statistics.median(fractions)
        if weight_reads:  # each run against summing the weights around it
            row["run_weights_read_gb_s"] = [b / 1e9 for b in weight_reads]
            row["decode_vs_weights_read"] = statistics.median(
                bytes_per_token / b / d for b, d in zip(weight_reads, decodes, strict=True)
            )
        # a lower bound: every run against the best bandwidth seen anywhere so far (a probe
        # that caught a slow moment can set a run above its own ceiling, as measured here)
        best = max(bandwidth, *bandwidths)
        row["decode_vs_best_ceiling"] = statistics.median(
            f * b / best for f, b in zip(fractions, bandwidths, strict=True)
        )
        row["cached_vs_ceiling"] = row["cached_tok_s"] / ceiling
        if theirs is not None:
            row["transformers_tok_s"] = N_NEW / statistics.median(hf_totals)
            row["tinytx_over_transformers"] = row["cached_tok_s"] / row["transformers_tok_s"]
            row["same_tokens"] = sum(a == b for a, b in zip(tokens, hf_tokens, strict=True))
        if quantized is not None:
            row["int8_tok_s"] = N_NEW / statistics.median(q_totals)
            row["int8_decode_tok_s"] = 1e3 / (statistics.median(q_decodes) * 1e3)
            row["int8_same_tokens"] = sum(a == b for a, b in zip(tokens, q_tokens, strict=True))
            if theirs is not None:
                row["int8_over_transformers"] = row["int8_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
        if progress is not None:
            progress(", ".join(f"{k} {_short(v)}" for k, v in row.items()))
    return {
        "benchmark": "generate",
        "backend": backend.name,
        "threads": thread_report,
        "repeats": repeats,
        "pause_s": pause,
        "settle_s": settle_seconds(pause),
        "new_tokens": N_NEW,
        "transformers": None if theirs is None else _transformers_or_none().__version__,
        "machine": machine_info(),
        "int8_kernel": None if quantized is None else kernel_name(),
        "int8_weight_bytes": None if quantized is None else quantized.nbytes,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "read_method": read_method(),
        "weight_bytes_per_token": bytes_per_token,
        "ceiling_tok_s": ceiling,
        "results": rows,
        "targets": _targets(rows, int8=quantized is not None),
    }


def _targets(rows: list[dict[str, Any]], int8: bool = False) -> dict[str, Any]:
    """Each target with the measured value and whether it is met (None: not measured)."""
    by_context = {r["context"]: r for r in rows}
    growth = [
        (b["cached_ms_per_token"] / a["cached_ms_per_token"]) / (b["context"] / a["context"])
        for a, b in zip(rows, rows[1:], strict=False)
    ]
    targets: dict[str, Any] = {
        "cached time per token grows at most linearly (worst growth / context growth <= 1)": (
            max(growth) if growth else None
        ),
    }
    speedup = by_context.get(1024, {}).get("cache_speedup")
    targets["cache speed-up at 1024 >= 10x"] = speedup
    fraction = by_context.get(64, {}).get("decode_vs_ceiling")
    targets["decode tok/s at 64 >= 0.85 x the bandwidth ceiling"] = fraction
    met = {
        "cached time per token grows at most linearly (worst growth / context growth <= 1)": (
            None if not growth else max(growth) <= 1.0
        ),
        "cache speed-up at 1024 >= 10x": None if speedup is None else speedup >= 10,
        "decode tok/s at 64 >= 0.85 x the bandwidth ceiling": (
            None if fraction is None else fraction >= 0.85
        ),
    }
    if int8:
        name = "int8 tok/s at 64 >= 1.6x transformers' float32"
        ratio = by_context.get(64, {}).get("int8_over_transformers")
        targets[name], met[name] = ratio, None if ratio is None else ratio >= 1.6
    return {
        name: {
            "value": None if targets[name] is None else float(targets[name]),
            "met": None if met[name] is None else bool(met[name]),
        }
        for name in targets
    }


def format_results(result: dict[str, Any]) -> str:
    """The table and the targets, as printed by :func:`main`."""
    columns = ["context", "prompt", "cached_tok_s", "cached_ms_per_token", "decode_tok_s",
               "decode_vs_ceiling", "uncached_ms_per_token", "cache_speedup"]  # fmt: skip
    if result["transformers"]:
        columns += ["transformers_tok_s", "tinytx_over_transformers", "same_tokens"]
    if result.get("int8_kernel"):
        columns += ["int8_tok_s", "int8_decode_tok_s", "int8_same_tokens"]
        if result["transformers"]:
            columns.append("int8_over_transformers")
    machine = result["machine"]
    lines = [
        f"GPT-2 small shape, random weights, batch 1, float32, greedy, {result['new_tokens']} "
        f"new tokens; backend {result['backend']}, threads {result['threads']['requested']}, "
        f"median of {result['repeats']} alternating runs, "
        f"{result.get('pause_s', 0)} s rest before each, bandwidth probed "
        f"{result.get('settle_s', result.get('pause_s', 0))} s after",
        describe_machine(machine) + f", transformers {result['transformers'] or 'not installed'}",
        f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s (best sum of a 1 GiB float32 "
        f"array, {result.get('read_method', 'NumPy sum')}), weights read per token "
        f"{result['weight_bytes_per_token'] / 1e6:.0f} MB: "
        f"ceiling {result['ceiling_tok_s']:.1f} tokens/s (decode_tok_s = 1 / decode time "
        "per token after the first; cached_tok_s includes the prompt; decode_vs_ceiling: "
        "the median of the runs' fractions, each run against the better bandwidth measured "
        "just before and just after it)",
        *_per_run_lines(result["results"]),
        format_table(result["results"], columns),
        "targets:",
    ]
    for name, target in result["targets"].items():
        value = "-" if target["value"] is None else f"{target['value']:.3g}"
        state = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"  {name}: {value} ({state})")
    return "\n".join(lines)


def _short(value: Any) -> str:
    """A row's value for a progress line: floats (alone or in a list) to 4 digits."""
    if isinstance(value, list):
        return "[" + " ".join(_short(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _per_run_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per context: each run's fraction of the bandwidth around it (and its
    decode time per token, to tell a moving ceiling from a moving decode), the range of
    bandwidths seen, and the median against the best of them (a bound that sets a run
    made while the memory was slow against its fastest moment); then, where measured,
    how fast summing the weights themselves read, and decode's median share of that."""
    lines = []
    for row in rows:
        if "run_vs_ceiling" not in row:
            continue
        runs = zip(row["run_vs_ceiling"], row["run_bandwidth_gb_s"], row["run_ms_per_token"],
                   strict=True)  # fmt: skip
        lines.append(
            f"context {row['context']}: each run: "
            + ", ".join(f"{f:.2f} of {gb_s:.1f} GB/s ({ms:.1f} ms)" for f, gb_s, ms in runs)
            + f"; bandwidth around the runs {min(row['run_bandwidth_gb_s']):.1f}-"
            f"{max(row['run_bandwidth_gb_s']):.1f} GB/s, against the best seen "
            f"{row['decode_vs_best_ceiling']:.3f}"
        )
        if "run_weights_read_gb_s" in row:
            reads = row["run_weights_read_gb_s"]
            lines.append(
                f"context {row['context']}: summing the weights alone (the same compiled "
                f"sum, over the arrays a step reads, where they lie) read {min(reads):.1f}-"
                f"{max(reads):.1f} GB/s around the runs; decode reached a median "
                f"{row['decode_vs_weights_read']:.3f} of it"
            )
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/generate.py", description=__doc__.split("\n\n")[0]
    )
    add_timing_arguments(parser, threads=2, repeats=3, warmup=None, pause=0.5)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--no-transformers", action="store_true", help="time tinytx alone")
    parser.add_argument("--int8", action="store_true", help="also time weight-only int8")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the table and the targets; optionally write JSON."""
    args = _parser().parse_args(argv)
    import tinytx

    try:
        result = run(args.backend, args.threads, args.contexts, repeats=args.repeats,
                     use_transformers=not args.no_transformers, int8=args.int8, pause=args.pause,
                     progress=lambda line: print(line, file=sys.stderr))  # fmt: skip
    except (ValueError, tinytx.BackendUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(format_results(result), result, args.json)
    return 0
