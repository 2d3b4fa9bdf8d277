"""Backends: where arrays live and which array namespace computes on them.

A backend is a small record (:class:`Backend`), not a class hierarchy:

- ``name``: ``"numpy"``, ``"cupy"`` or ``"strict"``;
- ``xp``: the array-API namespace (``array_api_compat.numpy``, ``array_api_compat.cupy``
  or ``array_api_strict``);
- ``device``: where new arrays are made;
- ``asarray(host_array, dtype=None)``: host (NumPy) array -> array on this backend (a copy);
- ``to_numpy(x)``: array on this backend -> host NumPy array (a copy);
- ``synchronize()``: wait for queued device work (a no-op on the CPU);
- ``natives``: the backend's own faster versions of the few functions the array API
  standard lacks (``erf``...), looked up by :func:`tinytx.functional` in one place.

Layer code never sees this module: it takes ``xp`` from its input arrays. This module is
host-side code, so it may import NumPy (and, lazily, CuPy).

Choosing a backend: :func:`get_backend` by name; :func:`use_backend` sets a scoped default
(a ``ContextVar``, usable as a context manager); otherwise the ``TINYTX_BACKEND``
environment variable; otherwise ``"numpy"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import array_namespace as compat_namespace

__all__ = [
    "array_namespace",
    "dtype_is",
    "Backend",
    "BackendMismatchError",
    "BackendStatus",
    "BackendUnavailable",
    "available_backends",
    "backend_names",
    "current_backend",
    "get_backend",
    "native_function",
    "resolve_backend",
    "use_backend",
]


_namespace_by_type: dict[type, Any] = {}


def array_namespace(*arrays: Any) -> Any:
    """``array_api_compat.array_namespace(*arrays)``, remembered by array type.

    The namespace of an array follows from its type alone (``numpy.ndarray`` -> the
    compat NumPy namespace, ``array_api_strict.Array`` -> array_api_strict, ...), so the
    answer for arrays of one type is looked up once; array_api_compat's checks cost some
    microseconds per call, and a decode step asks hundreds of times. Arrays of mixed
    types (and ``None`` entries, which are skipped) go to array_api_compat every time;
    a TypeError from it (not arrays, or arrays of two libraries) is raised unchanged.
    """
    kinds = {type(a) for a in arrays if a is not None}
    if len(kinds) != 1:
        return compat_namespace(*arrays)
    (kind,) = kinds
    xp = _namespace_by_type.get(kind)
    if xp is None:
        xp = compat_namespace(*arrays)  # raises TypeError for what is not an array
        _namespace_by_type[kind] = xp
    return xp


@functools.lru_cache(maxsize=256)
def dtype_is(xp: Any, dtype: Any, kind: str) -> bool:
    """``xp.isdtype(dtype, kind)``, remembered (dtypes are few; the check is on every call
    of every module)."""
    return bool(xp.isdtype(dtype, kind))


class BackendUnavailable(RuntimeError):
    """A backend that exists but cannot run here (CuPy without a GPU, a missing package)."""


class BackendMismatchError(TypeError):
    """Arrays of different backends in one call, or an input on another backend (or of
    another dtype) than a module's weights."""


@dataclass(frozen=True)
class Backend:
    """Where arrays live and the array namespace that computes on them."""

    name: str
    xp: Any
    device: Any
    asarray: Callable[..., Any]
    to_numpy: Callable[[Any], np.ndarray]
    synchronize: Callable[[], None] = lambda: None
    natives: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def owns(self, x: Any) -> bool:
        """True when array ``x`` belongs to this backend (same namespace and device)."""
        from array_api_compat import device as device_of

        try:
            xp = array_namespace(x)
        except TypeError:
            return False
        if xp is not self.xp:
            return False
        return self.name != "strict" or device_of(x) == self.device

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device!r})"


@dataclass(frozen=True)
class BackendStatus:
    """What :func:`available_backends` reports for one backend."""

    available: bool
    reason: str = ""
    device: str = ""


# --- the three backends --------------------------------------------------------------


def _host(x: Any, dtype: Any = None) -> np.ndarray:
    """Any host array-like -> a new C-contiguous NumPy array (with ``dtype`` when given).

    Always a copy, so an array handed to a backend never aliases the caller's."""
    return np.array(x, dtype=dtype, order="C", copy=True)


def _make_numpy() -> Backend:
    import array_api_compat.numpy as xp

    from tinytx.backends.numpy_backward_natives import BACKWARD_NATIVES
    from tinytx.backends.numpy_natives import NATIVES

    def asarray(host: Any, dtype: Any = None) -> np.ndarray:
        return _host(host, dtype)

    def to_numpy(x: Any) -> np.ndarray:
        return np.array(x, copy=True)  # a copy: editing it never edits a parameter

    natives = {**NATIVES, **BACKWARD_NATIVES}
    return Backend("numpy", xp, "cpu", asarray, to_numpy, natives=natives)


def _make_strict() -> Backend:
    try:
        import array_api_strict as xp
    except ImportError as err:
        raise BackendUnavailable(
            f"strict backend unavailable: cannot import array_api_strict ({err}); install it "
            "with `pip install array-api-strict` (or `pip install -e '.[test]'`), or choose "
            "`--backend numpy`"
        ) from None

    # Not the default device: there a stray ``np.exp(x)`` silently works; here it raises.
    device = xp.Device("device1")

    def asarray(host: Any, dtype: Any = None) -> Any:
        host = _host(host, dtype)
        return xp.asarray(host, device=device)

    def to_numpy(x: Any) -> np.ndarray:
        # array-api-strict refuses __array__ on a non-CPU device; move it first.
        return np.asarray(xp.asarray(x, device=xp.Device("CPU_DEVICE"), copy=True))

    return Backend("strict", xp, device, asarray, to_numpy)


_CUPY_HELP = (
    "on a machine with an NVIDIA GPU install `pip install 'tinytx[cupy]'` (CUDA 13 driver, "
    "cupy-cuda13x) or `pip install 'tinytx[cupy-cuda12]'` (CUDA 12 driver, cupy-cuda12x), "
    "or choose `--backend numpy`"
)


def _make_cupy() -> Backend:
    try:
        import cupy
    except Exception as err:  # ImportError, or a broken CUDA install raising at import
        raise BackendUnavailable(
            f"CuPy backend unavailable: cannot import cupy ({err}); {_CUPY_HELP}"
        ) from None
    try:
        # `import cupy` succeeds without a GPU; the first real use is what fails.
        if not cupy.cuda.is_available():
            raise RuntimeError("no CUDA device is visible")
        probe = cupy.zeros(1, dtype=cupy.float32) + 1
        cupy.cuda.Device().synchronize()
        del probe
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendUnavailable(f"CuPy backend unavailable: {reason}; {_CUPY_HELP}") from None

    import array_api_compat.cupy as xp
    import cupyx.scipy.special as special

    def asarray(host: Any, dtype: Any = None) -> Any:
        return cupy.asarray(_host(host, dtype))

    def to_numpy(x: Any) -> np.ndarray:
        return cupy.asnumpy(x)

    def synchronize() -> None:
        cupy.cuda.get_current_stream().synchronize()

    device = cupy.cuda.Device()
    return Backend("cupy", xp, device, asarray, to_numpy, synchronize, natives={"erf": special.erf})


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "numpy": _make_numpy,
    "cupy": _make_cupy,
    "strict": _make_strict,
}
_CACHE: dict[str, Backend] = {}
_FAILURES: dict[str, str] = {}


def backend_names() -> list[str]:
    """Names of the registered backends, available here or not."""
    return list(_FACTORIES)


def get_backend(name: str | Backend) -> Backend:
    """Return the backend called ``name`` (a :class:`Backend` is returned as it is).

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailable`, with the
    reason and how to fix it, for a backend that cannot run on this machine.
    """
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name not in _FACTORIES:
        known = ", ".join(_FACTORIES)
        raise ValueError(f"unknown backend {name!r}; expected one of: {known}")
    if name in _CACHE:
        return _CACHE[name]
    if name in _FAILURES:
        raise BackendUnavailable(_FAILURES[name])
    try:
        backend = _FACTORIES[name]()
    except BackendUnavailable as err:
        _FAILURES[name] = str(err)
        raise
    except ImportError as err:
        message = f"{name} backend unavailable: {err}"
        _FAILURES[name] = message
        raise BackendUnavailable(message) from None
    _CACHE[name] = backend
    return backend


def native_function(xp: Any, name: str) -> Callable[..., Any] | None:
    """The native version of function ``name`` offered by the backend whose namespace is
    ``xp`` (e.g. CuPy's ``erf``), or None. :mod:`tinytx.functional` asks here, and only here.
    """
    for backend in _CACHE.values():
        if backend.xp is xp:
            return backend.natives.get(name)
    return None


def available_backends() -> dict[str, BackendStatus]:
    """Every registered backend -> whether it runs here, why not, and its device."""
    report = {}
    for name in _FACTORIES:
        try:
            backend = get_backend(name)
        except BackendUnavailable as err:
            report[name] = BackendStatus(False, str(err))
        else:
            report[name] = BackendStatus(True, "", str(backend.device))
    return report


_DEFAULT: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "tinytx_backend", default=None
)


def current_backend() -> Backend:
    """The backend in force: :func:`use_backend`'s, else ``$TINYTX_BACKEND``, else numpy."""
    scoped = _DEFAULT.get()
    if scoped is not None:
        return scoped
    return get_backend(os.environ.get("TINYTX_BACKEND") or "numpy")


def resolve_backend(backend: str | Backend | None) -> Backend:
    """``None`` -> the current default; a name -> that backend; a Backend -> itself."""
    return current_backend() if backend is None else get_backend(backend)


@contextlib.contextmanager
def use_backend(name: str | Backend) -> Iterator[Backend]:
    """Make ``name`` the default backend inside a ``with`` block (context-local).

    >>> with use_backend("strict"):
    ...     layer = Linear(4, 4)        # built on array-api-strict
    """
    backend = get_backend(name)
    token = _DEFAULT.set(backend)
    try:
        yield backend
    finally:
        _DEFAULT.reset(token)
