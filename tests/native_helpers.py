"""Test helpers shared by the natives tests: run a function's readable definition, and
the rounding bound of a linear layer's products."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
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


def linear_bound(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """|native - definition| bound for y = x W^T + b: 2 (d_in + 1) eps (|x| |W|^T + |b|)."""
    eps = np.finfo(x.dtype).eps
    magnitude = np.abs(x).astype(np.float64) @ np.abs(weight).T.astype(np.float64)
    if bias is not None:
        magnitude = magnitude + np.abs(bias)
    return 2 * (x.shape[-1] + 1) * eps * magnitude
