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

    def table(self) -> str:
        """The rows as an aligned text table."""

        def fmt(shapes: list[tuple[int, ...]]) -> str:
            return ", ".join("(" + ", ".join(map(str, s)) + ")" for s in shapes) or "-"

        header = ("layer", "input", "output", "dtype", "ms")
        body = [
            (
                "  " * r.depth + (r.name if r.name == r.kind else f"{r.name} [{r.kind}]"),
                fmt(r.inputs),
                fmt(r.outputs),
                r.dtype,
                f"{r.seconds * 1e3:.3f}",
            )
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def row(cells: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        lines = [row(header), row(tuple("-" * w for w in widths))]
        lines.extend(row(cells) for cells in body)
        return "\n".join(lines)


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
