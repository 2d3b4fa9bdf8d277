"""Host-side parameter initialisation: seeded NumPy random numbers, drawn on the CPU.

Weights are drawn here, in float64 on the host, then cast and moved with
``backend.asarray``: the same seed gives bit-identical weights on every backend. Layer
code calls these helpers and never imports NumPy itself.

A composite module passes one ``Generator`` down to its children, which draw from it in
construction order; so ``seed`` may be an int or a generator everywhere.
"""

from __future__ import annotations

import math

import numpy as np

Seed = int | np.random.Generator

__all__ = ["Seed", "normal", "ones", "rng", "uniform", "xavier_uniform", "zeros"]


def rng(seed: Seed) -> np.random.Generator:
    """A generator from an int seed; a generator is passed through (children share it)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def uniform(gen: np.random.Generator, shape: tuple[int, ...], bound: float) -> np.ndarray:
    """U(-bound, bound) of the given shape (float64, host)."""
    return gen.uniform(-bound, bound, size=shape)


def xavier_uniform(gen: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Glorot & Bengio 2010: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); shape (out, in)."""
    fan_out, fan_in = shape
    return uniform(gen, shape, math.sqrt(6.0 / (fan_in + fan_out)))


def normal(gen: np.random.Generator, shape: tuple[int, ...], std: float = 1.0) -> np.ndarray:
    """N(0, std^2) of the given shape (float64, host)."""
    return gen.normal(0.0, std, size=shape)


def zeros(shape: tuple[int, ...]) -> np.ndarray:
    """Zeros of the given shape (host)."""
    return np.zeros(shape)


def ones(shape: tuple[int, ...]) -> np.ndarray:
    """Ones of the given shape (host)."""
    return np.ones(shape)
