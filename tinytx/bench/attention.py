"""Every attention variant side by side: time and peak memory, seq 256 to 8192.

    python benchmarks/attention.py [--backend numpy] [--seq 256 --seq 8192] [--json out.json]
    tinytx bench attention ...

Shape (batch 1, 8 heads, seq, d 64), float32, self-attention, no mask. Each sequence
length times all variants in alternating rounds (``time_alternating``: warm-up, then one
run of each in turn, the order flipping every round) and reports medians, so a burst of
load from elsewhere hits every variant alike; compare them as ratios to ``softmax``.

Peak memory is the most memory allocated *during* one call beyond what was allocated
before it (the inputs). Method: on numpy and strict, ``tracemalloc`` (NumPy reports its
array buffers to it, so its peak is the peak of live arrays; array-api-strict wraps NumPy
arrays); on cupy, a CuPy memory hook that adds up the bytes taken from and returned to the
memory pool. It is measured in a separate run, so that tracing does not slow the timed
runs. The quadratic variants hold at least one (batch, heads, seq, seq) float32 matrix:
8 * 8192 * 8192 * 4 bytes = 2 GiB at seq 8192, a few of them at once (fine in 24 GiB).

Targets (issue 3): blockwise at seq 8192 under 2% of softmax's peak memory and at most
1.3x its time; linear's time at 8192 under 10x its time at 1024 (it grows linearly).
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
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
    time_alternating,
)

__all__ = ["DEFAULT_SEQS", "format_results", "main", "peak_memory", "run"]

DEFAULT_SEQS = (256, 512, 1024, 2048, 4096, 8192)
BATCH, HEADS, D_HEAD = 1, 8, 64
MIB = 2**20


def _cupy_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes taken from CuPy's memory pool during ``fn()`` (a memory hook)."""
    import cupy
    from cupy.cuda import memory_hook

    class PeakHook(memory_hook.MemoryHook):
        name = "tinytx_peak"

        def __init__(self) -> None:
            self.current = self.peak = 0

        def malloc_postprocess(self, **kw: Any) -> None:
            self.current += kw["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kw: Any) -> None:
            self.current -= kw["mem_size"]

    hook = PeakHook()
    with hook:
        fn()
        cupy.cuda.get_current_stream().synchronize()
    return hook.peak


def peak_memory(fn: Callable[[], Any], backend_name: str) -> tuple[int | None, str]:
    """(peak bytes allocated while ``fn()`` runs, beyond what was live before; method)."""
    if backend_name == "cupy":
        return _cupy_peak(fn), "cupy memory hook (bytes taken from the pool)"
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before, "tracemalloc (NumPy reports its array buffers to it)"


def _inputs(backend: Any, seq: int, seed: int = 0) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    shape = (BATCH, HEADS, seq, D_HEAD)
    return tuple(backend.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(3))


def run(
    backend: str = "numpy",
    *,
    seqs: Sequence[int] = DEFAULT_SEQS,
    variants: Sequence[str] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    pause: float = 0.1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every variant and measure its peak memory at each sequence length.

    Returns a JSON-ready dict: machine, settings, one row per (variant, seq) with the
    median seconds, all timings, peak MiB, and ratios to softmax at the same seq; and the
    issue's targets with whether they were met. ``pause`` seconds of rest before each
    timed run let the previous run's BLAS threads go idle (see ``time_alternating``).
    """
    import tinytx
    from tinytx.plugins import available_attention, get_attention

    chosen = tinytx.get_backend(backend)
    names = list(variants) if variants else list(available_attention())
    runnable = [get_attention(name) for name in names]
    thread_report = set_threads(threads)
    rows: list[dict[str, Any]] = []
    method = ""
    for seq in seqs:
        q, k, v = _inputs(chosen, seq)

        def call(variant: Any, q: Any = q, k: Any = k, v: Any = v) -> Callable[[], Any]:
            def once() -> Any:
                out, _ = variant(q, k, v)  # (batch, heads, seq, d_head)
                chosen.synchronize()
                return out

            return once

        contenders = {variant.name: call(variant) for variant in runnable}
        timings = time_alternating(
            contenders, repeats=repeats, warmup=warmup, pause=pause, sync=chosen.synchronize
        )
        for variant in runnable:
            peak, method = peak_memory(contenders[variant.name], chosen.name)
            rows.append({
                "variant": variant.name,
                "seq": seq,
                "median_s": timings[variant.name].median,
                "seconds": timings[variant.name].seconds,
                "peak_mib": None if peak is None else peak / MIB,
            })  # fmt: skip
            if progress:
                progress(f"seq {seq:>5}  {variant.name:<15} {timings[variant.name].median:8.4f} s")
    _add_ratios(rows)
    return {
        "benchmark": "attention variants",
        "backend": chosen.name,
        "device": str(chosen.device),
        "shape": {"batch": BATCH, "heads": HEADS, "d_head": D_HEAD, "dtype": "float32"},
        "repeats": repeats,
        "warmup": warmup,
        "pause_s": pause,
        "threads": thread_report,
        "memory_method": method,
        "machine": machine_info(),
        "results": rows,
        "targets": _targets(rows),
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """time_vs_softmax and memory_vs_softmax at the same seq (when softmax ran)."""
    ref = {r["seq"]: r for r in rows if r["variant"] == "softmax"}
    for r in rows:
        base = ref.get(r["seq"])
        r["time_vs_softmax"] = None if base is None else r["median_s"] / base["median_s"]
        if base is None or r["peak_mib"] is None or not base["peak_mib"]:
            r["memory_vs_softmax"] = None
        else:
            r["memory_vs_softmax"] = r["peak_mib"] / base["peak_mib"]


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three targets, measured or None when the run did not cover them."""
    at = {(r["variant"], r["seq"]): r for r in rows}
    blockwise = at.get(("blockwise", 8192))
    memory = None if blockwise is None else blockwise["memory_vs_softmax"]
    speed = None if blockwise is None else blockwise["time_vs_softmax"]
    lin_long, lin_short = at.get(("linear", 8192)), at.get(("linear", 1024))
    growth = None if not (lin_long and lin_short) else lin_long["median_s"] / lin_short["median_s"]
    targets = [
        ("blockwise peak memory / softmax's at seq 8192 < 0.02", memory, lambda x: x < 0.02),
        ("blockwise time / softmax's at seq 8192 <= 1.3", speed, lambda x: x <= 1.3),
        ("linear time at seq 8192 / at seq 1024 < 10 (8x the tokens)", growth, lambda x: x < 10),
    ]
    return [
        {"target": text, "value": value, "met": None if value is None else bool(ok(value))}
        for text, value, ok in targets
    ]


def format_results(result: dict[str, Any]) -> str:
    """The table (one row per variant and seq) and the targets."""
    shape = result["shape"]
    lines = [
        f"attention variants on {result['backend']} ({result['device']}): batch {shape['batch']}, "
        f"{shape['heads']} heads, d {shape['d_head']}, {shape['dtype']}; median of "
        f"{result['repeats']} alternating runs; peak memory by {result['memory_method']}",
        describe_machine(result["machine"]),
        "",
    ]
    columns = ["variant", "seq", "median_s", "time_vs_softmax", "peak_mib", "memory_vs_softmax"]
    rows = sorted(result["results"], key=lambda r: (r["variant"], r["seq"]))
    lines.append(format_table(rows, columns))
    lines.append("")
    for t in result["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.3g}"
        verdict = "" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target: {t['target']}: {value} {verdict}".rstrip())
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/attention.py",
        description="Time every attention variant and record its peak memory (seq 256..8192).",
    )
    add_timing_arguments(parser, threads=None, repeats=3, warmup=1, pause=0.1)
    parser.add_argument("--seq", type=int, action="append", help="a sequence length (repeatable)")
    parser.add_argument(
        "--variant", action="append", help="a variant name (repeatable; default all)"
    )
    parser.add_argument("--json", help="write the results as JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the table and the targets, optionally write JSON."""
    args = _parser().parse_args(argv)
    import tinytx
    from tinytx.plugins import AttentionError

    try:
        result = run(
            args.backend, seqs=args.seq or DEFAULT_SEQS, variants=args.variant,
            repeats=args.repeats, warmup=args.warmup, threads=args.threads, pause=args.pause,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )  # fmt: skip
    except (ValueError, AttentionError, tinytx.BackendUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(format_results(result), result, args.json)
    return 0
