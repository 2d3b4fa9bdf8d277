"""Shared test set-up: the backend fixture and the hypothesis profiles.

Every test that touches arrays takes the ``backend`` fixture and so runs once per
backend: numpy; strict (array-api-strict on its non-default device "device1", where a
stray NumPy call raises instead of silently working); cupy when a GPU is present
(skipped otherwise, with the reason).

Hypothesis profiles: ``ci`` (bounded examples, no deadline; chosen when $CI is set) and
``dev`` (more examples). Pick one with HYPOTHESIS_PROFILE=name.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import tinytx
from tinytx.backends import BackendUnavailable, backend_names

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(params=backend_names(), scope="session")
def backend(request: pytest.FixtureRequest) -> tinytx.Backend:
    """Each registered backend in turn; an unavailable one is skipped with its reason."""
    try:
        return tinytx.get_backend(request.param)
    except BackendUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def numpy_backend() -> tinytx.Backend:
    """The host backend, for comparisons against a reference."""
    return tinytx.get_backend("numpy")
