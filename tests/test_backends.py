"""The backends: records, registry, availability reports, the scoped default."""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest
from array_api_compat import array_namespace

import tinytx
from tinytx import backends
from tinytx.backends import BackendUnavailable, get_backend, resolve_backend, use_backend
from tinytx.layers import Linear


def test_registry_names() -> None:
    assert backends.backend_names() == ["numpy", "cupy", "strict"]


def test_record_fields(backend) -> None:
    assert backend.name in backends.backend_names()
    assert get_backend(backend.name) is backend  # cached: one record per name
    assert get_backend(backend) is backend  # a Backend passes through
    assert callable(backend.asarray) and callable(backend.to_numpy)
    backend.synchronize()  # a no-op on the CPU, a real wait on the GPU; must not fail
    assert repr(backend).startswith(f"Backend({backend.name!r}")


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "bool"])
def test_asarray_round_trip(backend, dtype) -> None:
    host = (np.arange(12).reshape(3, 4) % 5).astype(dtype)
    x = backend.asarray(host)
    assert array_namespace(x) is backend.xp
    assert backend.owns(x)
    back = backend.to_numpy(x)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, host)


def test_asarray_casts_to_requested_dtype(backend) -> None:
    host = np.linspace(-1, 1, 7)  # float64
    x = backend.asarray(host, dtype="float32")
    assert x.dtype == backend.xp.float32
    np.testing.assert_array_equal(backend.to_numpy(x), host.astype(np.float32))


def test_owns_rejects_foreign_arrays(backend) -> None:
    others = [name for name in ("numpy", "strict") if name != backend.name]
    for name in others:
        foreign = get_backend(name).asarray(np.zeros(2))
        assert not backend.owns(foreign)
    assert not backend.owns([1.0, 2.0])  # not an array at all


def test_strict_lives_on_a_non_default_device() -> None:
    strict = get_backend("strict")
    assert strict.device == strict.xp.Device("device1")
    x = strict.asarray(np.ones(3))
    assert x.device == strict.device
    # The point of device1: a stray NumPy call on a strict array raises instead of working.
    with pytest.raises((TypeError, RuntimeError, ValueError)):
        np.exp(x)
    # and arrays on the default device are not the strict backend's.
    assert not strict.owns(strict.xp.asarray([1.0]))


def test_unknown_backend_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'jax'.*numpy, cupy, strict"):
        get_backend("jax")
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend(None)  # type: ignore[arg-type]


def test_available_backends_reports_every_backend() -> None:
    report = tinytx.available_backends()
    assert set(report) == {"numpy", "cupy", "strict"}
    assert report["numpy"].available and report["numpy"].device == "cpu"
    assert report["strict"].available and "device1" in report["strict"].device
    cupy = report["cupy"]
    if cupy.available:  # a machine with a GPU
        assert cupy.device and not cupy.reason
    else:
        assert cupy.reason.startswith("CuPy backend unavailable: ")
        assert "pip install" in cupy.reason  # says how to fix it
        with pytest.raises(BackendUnavailable, match="CuPy backend unavailable"):
            get_backend("cupy")


@pytest.fixture
def fresh_registry(monkeypatch):
    """Empty caches, so that the next get_backend builds the backend again."""
    monkeypatch.setattr(backends, "_CACHE", {})
    monkeypatch.setattr(backends, "_FAILURES", {})


def test_cupy_without_gpu_is_reported_not_raised_at_import(monkeypatch, fresh_registry) -> None:
    """`import cupy` succeeds on a machine without a GPU; the first use is what fails."""
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    report = backends.available_backends()["cupy"]
    assert not report.available
    assert report.reason.startswith("CuPy backend unavailable: no CUDA device is visible")
    with pytest.raises(BackendUnavailable, match="no CUDA device is visible"):
        get_backend("cupy")


def test_cupy_failing_at_first_allocation(monkeypatch, fresh_registry) -> None:
    def broken_zeros(*args, **kwargs):
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is too old")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(is_available=lambda: True)
    fake.zeros, fake.float32 = broken_zeros, "float32"
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendUnavailable, match="CuPy backend unavailable: cudaErrorInsufficient"):
        get_backend("cupy")


def test_cupy_not_installed(monkeypatch, fresh_registry) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    reason = backends.available_backends()["cupy"].reason
    assert reason.startswith("CuPy backend unavailable: cannot import cupy")


def test_use_backend_is_scoped(backend) -> None:
    before = tinytx.current_backend()
    with use_backend(backend.name) as chosen:
        assert chosen is backend
        assert tinytx.current_backend() is backend
        layer = Linear(3, 2)  # built on the scoped default
        with use_backend("numpy"):
            assert tinytx.current_backend().name == "numpy"
        assert tinytx.current_backend() is backend
    assert tinytx.current_backend() is before
    # the module keeps the backend it was built on: no hidden global is read later
    assert layer.backend is backend
    assert backend.owns(layer.weight)
    assert backend.owns(layer(backend.asarray(np.ones((1, 3)), dtype="float32")))


def test_use_backend_restores_after_an_error() -> None:
    before = tinytx.current_backend()
    with pytest.raises(RuntimeError), use_backend("strict"):
        raise RuntimeError("boom")
    assert tinytx.current_backend() is before


def test_use_backend_is_context_local() -> None:
    """Another thread does not see this thread's scoped default."""
    seen = {}
    with use_backend("strict"):
        thread = threading.Thread(target=lambda: seen.update(name=tinytx.current_backend().name))
        thread.start()
        thread.join()
    assert seen["name"] == "numpy"


def test_use_backend_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown backend"), use_backend("nope"):
        pass


def test_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv("TINYTX_BACKEND", "strict")
    assert tinytx.current_backend().name == "strict"
    assert Linear(2, 2).backend.name == "strict"
    with use_backend("numpy"):  # the scoped default wins over the environment
        assert tinytx.current_backend().name == "numpy"
    monkeypatch.setenv("TINYTX_BACKEND", "")
    assert tinytx.current_backend().name == "numpy"
    monkeypatch.delenv("TINYTX_BACKEND")
    assert tinytx.current_backend().name == "numpy"
    monkeypatch.setenv("TINYTX_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        tinytx.current_backend()


def test_resolve_backend(monkeypatch) -> None:
    monkeypatch.delenv("TINYTX_BACKEND", raising=False)
    assert resolve_backend(None).name == "numpy"
    assert resolve_backend("strict").name == "strict"
    strict = get_backend("strict")
    assert resolve_backend(strict) is strict


def test_native_functions() -> None:
    numpy = get_backend("numpy")
    assert backends.native_function(numpy.xp, "erf") is None  # numpy: ours is used
    assert backends.native_function(object(), "erf") is None  # unknown namespace
    report = tinytx.available_backends()["cupy"]
    if report.available:
        assert callable(backends.native_function(get_backend("cupy").xp, "erf"))


def test_public_names() -> None:
    for name in ("get_backend", "available_backends", "use_backend", "current_backend", "trace"):
        assert callable(getattr(tinytx, name))
    assert tinytx.Backend is backends.Backend
    assert isinstance(tinytx.__version__, str)
