"""Test helper shared by the natives tests: run a function's readable definition."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tinytx import functional as F


def definition(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` from tinytx.functional with every native switched off, so it computes
    the array-API definition that the backend's natives are checked against."""
    saved = F._native
    F._native = lambda xp, name: None
    try:
        return fn(*args, **kwargs)
    finally:
        F._native = saved


@contextlib.contextmanager
def without_numba() -> Iterator[None]:
    """Inside: the natives run their NumPy code, numba's kernels switched off
    (TINYTX_NUMBA=0). The NumPy natives are the definition bit for bit; the numba kernels
    are checked within rounding in tests/test_numba_kernels.py."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TINYTX_NUMBA", "0")
        yield
