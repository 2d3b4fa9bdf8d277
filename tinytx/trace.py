"""A trace of the forward pass: every module called, its input and output shapes, dtype, time.

>>> with trace(model) as t:
...     model(x)
>>> print(t.table())

Tracing is off unless a ``trace`` block is active; then every ``Module.__call__`` is
recorded (nested calls indented). Times are wall-clock and include the module's children;
the backend is synchronised around each call so that GPU times are real.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from array_api_compat import is_array_api_obj

__all__ = ["Trace", "TraceRow", "current_tracer", "trace"]


@dataclass
class TraceRow:
    """One module call: its path in the model, type, shapes, dtype and time."""

    name: str
    kind: str
    depth: int
    inputs: list[tuple[int, ...]]
    outputs: list[tuple[int, ...]]
    dtype: str
    seconds: float


def _shapes(value: Any) -> list[tuple[int, ...]]:
    """Shapes of the arrays in a value (an array, or a tuple / list holding arrays)."""
    if is_array_api_obj(value):
        return [tuple(value.shape)]
    if isinstance(value, (tuple, list)):
        return [shape for item in value for shape in _shapes(item)]
    return []


def _dtype(value: Any) -> str:
    if is_array_api_obj(value):
        return str(value.dtype).rsplit(".", 1)[-1]  # array_api_strict.float32 -> float32
    if isinstance(value, (tuple, list)) and value:
        return _dtype(value[0])
    return ""


@dataclass
class Trace:
    """The rows recorded inside a ``trace`` block, in call order."""

    names: dict[int, str] = field(default_factory=dict)  # id(module) -> path in the model
    rows: list[TraceRow] = field(default_factory=list)
    _depth: int = 0

    def record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``module.forward(*args, **kwargs)`` and record one row for it."""
        row = TraceRow(
            name=self.names.get(id(module), type(module).__name__),
            kind=type(module).__name__,
            depth=self._depth,
            inputs=_shapes(args),
            outputs=[],
            dtype="",
            seconds=0.0,
        )
        self.rows.append(row)
        module.backend.synchronize()
        start = time.perf_counter()
        self._depth += 1
        try:
            result = module.forward(*args, **kwargs)
        finally:
            self._depth -= 1
        module.backend.synchronize()
        row.seconds = time.perf_counter() - start
        row.outputs = _shapes(result)
        row.dtype = _dtype(result)
        return result

    def table(self, width: int | None = None) -> str:
        """The rows as an aligned text table, at most ``width`` columns wide where possible
        (default: the terminal's width, or 100; see :func:`tinytx.textfmt.output_width`).

        Repeated shapes are counted ("6 x (1, 12, 16, 16)"); when the table is too wide,
        each layer shows its own name under its parent's (the path's last part) and the
        shape lists wrap onto more lines."""
        from tinytx.textfmt import fit_table, natural_width, output_width

        width = output_width() if width is None else width

        def fmt(shapes: list[tuple[int, ...]]) -> str:
            runs: list[list[Any]] = []  # [shape, count] of consecutive equal shapes
            for shape in shapes:
                if runs and runs[-1][0] == shape:
                    runs[-1][1] += 1
                else:
                    runs.append([shape, 1])
            texts = ["(" + ", ".join(map(str, s)) + ")" for s, _ in runs]
            counted = [t if n == 1 else f"{n} x {t}" for t, (_, n) in zip(texts, runs, strict=True)]
            return ", ".join(counted) or "-"

        def body(short: bool) -> list[tuple[str, ...]]:
            return [
                (
                    "  " * r.depth
                    + (_own_name(r.name) if short and r.depth else r.name)
                    + ("" if r.name == r.kind else f" [{r.kind}]"),
                    fmt(r.inputs),
                    fmt(r.outputs),
                    r.dtype,
                    f"{r.seconds * 1e3:.3f}",
                )
                for r in self.rows
            ]

        header = ("layer", "input", "output", "dtype", "ms")
        rows = body(short=False)
        if natural_width([header, *rows]) > width:
            rows = body(short=True)
        return fit_table(header, rows, width, wrap_columns=(0, 1, 2))


def _own_name(path: str) -> str:
    """A layer's own part of its path: "bert.layers.0.ff" -> "ff", "bert.layers.0" ->
    "layers.0" (an index alone says too little)."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


_TRACER: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("tinytx_trace", default=None)


def current_tracer() -> Trace | None:
    """The active trace, or None (then modules run untraced)."""
    return _TRACER.get()


@contextlib.contextmanager
def trace(model: Any = None, name: str = "model") -> Iterator[Trace]:
    """Record every module call inside the block; ``model`` gives the rows their paths."""
    recorder = Trace()
    if model is not None:
        for path, module in model.named_modules():
            recorder.names[id(module)] = f"{name}.{path}" if path else name
    token = _TRACER.set(recorder)
    try:
        yield recorder
    finally:
        _TRACER.reset(token)
