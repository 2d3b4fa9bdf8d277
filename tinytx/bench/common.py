"""Timing helpers shared by the benchmarks.

Fair comparisons on a busy machine: both sides run with the same number of threads, their
runs alternate (so a burst of load from elsewhere hits both), each side is warmed up first,
and the median of several runs is reported with the ratio of the medians.
"""

from __future__ import annotations

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
    "format_table",
    "machine_info",
    "set_threads",
    "time_alternating",
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
    """CPU, core count, library versions and the BLAS in use, for the record."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})"
            for i in threadpool_info()
        ]
    except ImportError:
        pass
    torch = torch_or_none()
    if torch is not None:
        info["torch"] = torch.__version__
    return info


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
