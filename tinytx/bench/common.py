"""Timing helpers shared by the benchmarks.

Fair comparisons on a busy machine: both sides run with the same number of threads, their
runs alternate (so a burst of load from elsewhere hits both), each side is warmed up first,
and the median of several runs is reported with the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Timing",
    "add_timing_arguments",
    "describe_machine",
    "disagreeing_cases",
    "format_table",
    "machine_info",
    "report",
    "set_threads",
    "time_against_torch",
    "time_alternating",
    "with_verdicts",
    "torch_or_none",
    "write_json",
]


def torch_or_none() -> Any:
    """The ``torch`` module, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def set_threads(threads: int | None) -> dict[str, Any]:
    """Use ``threads`` threads everywhere: BLAS (via threadpoolctl), tinytx's element-wise
    pool and torch. ``None`` keeps each library's default. Returns what was set where.
    """
    from tinytx.backends import numpy_natives

    report: dict[str, Any] = {"requested": threads}
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        numpy_natives.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            report["blas"] = "threadpoolctl not installed: BLAS keeps its own thread count"
        else:
            threadpool_limits(threads)  # stays in force for the rest of the process
        torch = torch_or_none()
        if torch is not None:
            torch.set_num_threads(threads)
    report["tinytx_elementwise"] = numpy_natives.get_num_threads()
    report["blas"] = report.get("blas") or _blas_threads()
    torch = torch_or_none()
    if torch is not None:
        report["torch"] = torch.get_num_threads()
    return report


def _blas_threads() -> Any:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    return {info["internal_api"]: info["num_threads"] for info in threadpool_info()}


@dataclass
class Timing:
    """Wall-clock seconds of each run of one contender."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_alternating(
    contenders: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    pause: float = 0.0,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Run each contender ``warmup`` times, then ``repeats`` rounds of one run each, in
    turn (a, b, a, b, ...; the order flips every round), timing every run.

    ``pause`` seconds of sleep before each timed run let the other side's idle worker
    threads stop spinning (OpenBLAS's keep the cores busy for ~0.1 s after a call), so
    that neither side is slowed down by the one timed before it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
        sync()
    timings = {name: Timing(name) for name in contenders}
    names = list(contenders)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            time.sleep(pause)
            start = time.perf_counter()
            contenders[name]()
            sync()
            timings[name].seconds.append(time.perf_counter() - start)
    return timings


def time_against_torch(
    case: str,
    what: str,
    ours: Callable[[], Any],
    theirs: Callable[[], Any] | None,
    *,
    repeats: int,
    warmup: int,
    pause: float,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """Time ``ours`` (tinytx) and ``theirs`` (torch; None: tinytx alone) with
    :func:`time_alternating`, and return a result row: ``case``, ``what``, ``tinytx_ms``
    and its runs and, with torch, ``torch_ms``, its runs and ``ratio`` = tinytx / torch
    (of the medians). The caller adds its target and agreement check."""
    contenders = {"tinytx": ours} if theirs is None else {"tinytx": ours, "torch": theirs}
    timings = time_alternating(contenders, repeats=repeats, warmup=warmup, pause=pause, sync=sync)
    row: dict[str, Any] = {
        "case": case,
        "what": what,
        "tinytx_ms": timings["tinytx"].median * 1e3,
        "tinytx_runs_ms": [t * 1e3 for t in timings["tinytx"].seconds],
    }
    if theirs is not None:
        row.update(
            torch_ms=timings["torch"].median * 1e3,
            torch_runs_ms=[t * 1e3 for t in timings["torch"].seconds],
            ratio=timings["tinytx"].median / timings["torch"].median,
        )
    return row


def with_verdicts(
    results: Sequence[Mapping[str, Any]], agree_key: str, column: str
) -> list[dict[str, Any]]:
    """Rows for :func:`format_table`: each result of :func:`time_against_torch` that has a
    torch side gets ``target`` in words (``<= 1.5x met`` or ``MISSED``) and, in ``column``,
    whether ``agree_key`` held (``ok`` or ``WRONG (tol 1e-05)``)."""
    rows = []
    for r in results:
        row = dict(r)
        if "ratio" in r:
            row["target"] = f"<= {r['target']}x " + ("met" if r["target_met"] else "MISSED")
            row[column] = "ok" if r[agree_key] else f"WRONG (tol {r['tolerance']:g})"
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table: one line per row, the given columns, numbers to 3 significant
    digits (floats) and ``-`` for a missing value."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    cells = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """The machine, for the record: processor (and its widest vector units), cores, the
    BLAS NumPy uses with its kernel and thread count (via threadpoolctl), tinytx's pool
    threads, library versions. :func:`describe_machine` makes it one line."""
    from tinytx.backends import host_memory, numpy_natives

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "vector_units": _vector_units(),
        "cpus": os.cpu_count(),
        "usable_cpus": usable,
        "l2_cache_bytes": numpy_natives._L2_BYTES,
        "tinytx_threads": numpy_natives.get_num_threads(),
        "numpy": np.__version__,
        "compiled_kernels": _compiled_kernels(),
        "malloc_keeps_freed_bytes": host_memory.kept_bytes(),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine while this ran
        info["load_average_1min"] = os.getloadavg()[0]
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})"
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        ]
        info["threadpools"] = [
            {key: i.get(key) for key in ("user_api", "internal_api", "version",
                                          "architecture", "threading_layer", "num_threads")}
            for i in threadpool_info()
        ]  # fmt: skip
    except ImportError:
        pass
    torch = torch_or_none()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def _compiled_kernels() -> str:
    """Whether tinytx's optional compiled kernels ran: 'numba X.Y' (``tinytx[fast]``
    installed, TINYTX_NUMBA not 0), else why not. They change the figures, so every
    benchmark says."""
    from tinytx.backends import numba_kernels

    if not numba_kernels.available():
        return "none (numba not installed: pip install 'tinytx[fast]')"
    if not numba_kernels.enabled():
        return "off (TINYTX_NUMBA=0)"
    return f"numba {numba_kernels._numba.__version__}"


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line: processor, cores, BLAS with kernel and threads, tinytx's threads."""
    units = info.get("vector_units") or []
    cpu = info["processor"] + (f" ({', '.join(units)})" if units else "")
    blas = [
        f"{p['internal_api']} {p.get('version')}, kernel {p.get('architecture')}, "
        f"{p.get('num_threads')} threads"
        for p in info.get("threadpools", [])
        if p.get("user_api") == "blas"
    ] or ["unknown (threadpoolctl finds none)"]
    parts = [
        f"machine: {cpu}, {info['cpus']} cpus ({info.get('usable_cpus', '?')} usable)",
        f"L2 {info.get('l2_cache_bytes', 0) // 1024} KiB",
        "BLAS " + "; ".join(blas),
        f"tinytx pool {info.get('tinytx_threads', '?')} threads",
        f"numpy {info['numpy']}",
        f"compiled kernels: {info.get('compiled_kernels', '?')}",
    ]
    kept = info.get("malloc_keeps_freed_bytes")
    if kept is not None:  # set by keep_freed_memory (training and its benchmarks)
        parts.append(f"malloc keeps up to {kept // 2**20} MiB freed")
    if "load_average_1min" in info:
        parts.append(f"load average {info['load_average_1min']:.1f} (other work)")
    if "torch" in info:
        parts.append(f"torch {info['torch']} ({info.get('torch_threads', '?')} threads)")
    return ", ".join(parts)


def _vector_units() -> list[str]:
    """The widest SIMD extensions the CPU reports (x86 flags or ARM features)."""
    wanted = ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma", "asimd", "sve", "sve2")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in wanted if name in flags]
    except OSError:
        pass
    return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def report(
    text: str, result: Mapping[str, Any], json_path: str | None, echo: Callable[[str], Any] = print
) -> None:
    """Print a benchmark's formatted ``text``; with ``json_path``, also write ``result``
    there as JSON and say so (what every benchmark's script and command do)."""
    echo(text)
    if json_path:
        write_json(json_path, result)
        echo(f"wrote {json_path}")


def disagreeing_cases(result: Mapping[str, Any], key: str) -> list[str]:
    """The cases of ``result["results"]`` whose ``key`` (``outputs_agree``, ``grads_agree``)
    is False: a wrong result is never a speed-up."""
    return [row["case"] for row in result["results"] if row.get(key) is False]


def add_timing_arguments(
    parser: argparse.ArgumentParser,
    *,
    threads: int | None,
    repeats: int,
    warmup: int | None,
    pause: float | None = None,
) -> argparse.ArgumentParser:
    """The arguments every benchmark script shares: --backend, --threads, --repeats,
    --warmup (unless None) and --pause (when given a default), with these defaults."""
    parser.add_argument("--backend", default="numpy", help="tinytx backend (default numpy)")
    threads_default = "library defaults" if threads is None else threads
    parser.add_argument(
        "--threads",
        type=int,
        default=threads,
        help=f"threads for BLAS, tinytx and torch (default {threads_default})",
    )
    parser.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed runs per side ({repeats})"
    )
    if warmup is not None:
        parser.add_argument(
            "--warmup", type=int, default=warmup, help=f"untimed runs first ({warmup})"
        )
    if pause is not None:
        parser.add_argument(
            "--pause", type=float, default=pause, help=f"seconds of rest before each run ({pause})"
        )
    return parser
