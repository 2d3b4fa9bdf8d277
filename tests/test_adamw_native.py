"""AdamW's compiled update (numba) gives the definition's numbers bit for bit.

:meth:`tinytx.optim.AdamW.step` asks the backend for a native ``adamw_update``; with numba
installed the NumPy backend has one: the step's element-wise operations in one compiled
pass, in the same order and dtype, with no fused multiply-add. IEEE arithmetic then
rounds every operation as NumPy does, so the parameters and both moments must be equal
to the last bit after several steps, with and without weight decay, in float32 and
float64 (and the torch-parity tests of tests/test_optim.py hold unchanged).
"""

from __future__ import annotations

import numpy as np
import pytest

import tinytx
from tinytx.optim import AdamW

pytest.importorskip("numba", reason="the compiled update needs numba (pip install 'tinytx[fast]')")


def run_steps(monkeypatch, numba_on: bool, dtype: str) -> AdamW:
    monkeypatch.setenv("TINYTX_NUMBA", "1" if numba_on else "0")
    backend = tinytx.get_backend("numpy")
    rng = np.random.default_rng(0)
    params = {
        "w": backend.asarray(rng.standard_normal((7, 5)), dtype=dtype),
        "b": backend.asarray(rng.standard_normal(5) * 1e-3, dtype=dtype),
        "e": backend.asarray(rng.standard_normal((3, 4)) * 50, dtype=dtype),
    }
    opt = AdamW(params, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                decay={"w", "e"})  # fmt: skip
    for step in range(5):
        grads = {
            k: backend.asarray(rng.standard_normal(p.shape) * 10.0**-step, dtype=dtype)
            for k, p in params.items()
        }
        grads["e"] = grads["e"].T.copy().T  # a non-contiguous gradient is taken too
        opt.step(grads)
    return opt


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_update_is_the_definition_bit_for_bit(monkeypatch, dtype) -> None:
    calls = []
    from tinytx.backends import numba_kernels

    original = numba_kernels.adamw_update
    monkeypatch.setattr(
        numba_kernels, "adamw_update", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    compiled = run_steps(monkeypatch, True, dtype)
    assert len(calls) == 15  # 3 parameters, 5 steps
    reference = run_steps(monkeypatch, False, dtype)
    assert len(calls) == 15  # numba off: the definition ran
    for key in compiled.params:
        np.testing.assert_array_equal(compiled.params[key], reference.params[key])
        np.testing.assert_array_equal(compiled.exp_avg[key], reference.exp_avg[key])
        np.testing.assert_array_equal(compiled.exp_avg_sq[key], reference.exp_avg_sq[key])


def test_arrays_it_does_not_take_go_to_the_definition() -> None:
    from tinytx.backends import numba_kernels

    p = np.zeros((4, 6), np.float32)[:, ::2]  # not contiguous: cannot be updated in place
    m, v, g = (np.zeros((4, 3), np.float32) for _ in range(3))
    args = dict(decay=False, decay_factor=1.0, beta1=0.9, beta2=0.999,
                bias_correction2_sqrt=1.0, eps=1e-8, step_size=1e-3)  # fmt: skip
    assert not numba_kernels.adamw_update(p, g, m, v, **args)
    assert not numba_kernels.adamw_update(np.zeros((4, 3)), g, m, v, **args)  # float64 p
