"""tinytx.optim: AdamW against a float64 transcription of torch.optim.AdamW, in-place
updates the model sees, weight-decay selection, save/load bit for bit, the schedule,
gradient clipping and bad input. Every array test runs on every backend."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tinytx.layers import Linear
from tinytx.optim import (
    AdamW,
    OptimizerStateError,
    clip_grad_norm,
    decay_matrices,
    lr_at,
)

EPS32 = float(np.finfo(np.float32).eps)
SHAPES = {"weight": (6, 5), "bias": (5,), "gain": (3,)}


def host_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def host_grads(steps: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Gradients over five orders of magnitude, some with changing sign (so m cancels)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        out.append(
            {
                k: (rng.normal(size=s) * 10.0 ** rng.uniform(-4, 1, size=s)).astype(np.float32)
                for k, s in SHAPES.items()
            }
        )
    return out


def on(backend, arrays: dict[str, np.ndarray]) -> dict:
    return {k: backend.asarray(v) for k, v in arrays.items()}


def reference_adamw(params, grads, *, lr, betas, eps, weight_decay, decayed):
    """torch.optim.AdamW's single-tensor update, written out in float64 (NumPy).

    Returns the final parameters and, per element, a bound on the float32 rounding error
    of an implementation of the same formula (see test_adamw_matches_reference)."""
    b1, b2 = betas
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    bound = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g32 in enumerate(grads, start=1):
        for k in p:
            g = g32[k].astype(np.float64)
            if k in decayed:
                p[k] = p[k] * (1 - lr * weight_decay)
            m[k] = m[k] + (1 - b1) * (g - m[k])
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            denom = np.sqrt(v_hat) + eps
            p[k] = p[k] - lr * m_hat / denom
            # Error model, float32 unit roundoff u = EPS32 / 2, per step:
            # - p (1 - lr wd) and p - update: two roundings of |p|: 2u |p|;
            # - the update lr m_hat / denom: a few roundings of itself (lerp, sqrt, /, +,
            #   *): 8u |update|;
            # - m's absolute error from earlier roundings, ~4u max|g_s|, divided by denom:
            #   max|g_s| <= sqrt(t v_hat) (v_hat holds every g_s^2 with weight ~1/t), so
            #   at most 4u lr sqrt(t) sqrt(v_hat) / denom <= 4u lr sqrt(t).
            # Earlier errors in p carry forward with factor (1 - lr wd) <= 1.
            update = lr * np.abs(m_hat) / denom
            bound[k] = bound[k] + EPS32 * (np.abs(p[k]) + 4 * update + 2 * lr * math.sqrt(t))
    return p, bound


@pytest.mark.parametrize("decay", [None, decay_matrices])
def test_adamw_matches_reference(backend, decay):
    params32, grads = host_params(), host_grads(6)
    hyper = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    params = on(backend, params32)
    opt = AdamW(params, **hyper, decay=decay)
    for g in grads:
        opt.step(on(backend, g))
    decayed = set(SHAPES) if decay is None else {"weight"}
    assert opt.decayed == decayed
    want, bound = reference_adamw(params32, grads, **hyper, decayed=decayed)
    for k in SHAPES:
        got = backend.to_numpy(params[k]).astype(np.float64)
        err = np.abs(got - want[k])
        assert np.all(err <= bound[k]), (k, float(np.max(err / bound[k])))
        # and the parameters really moved: far more than the tolerance
        assert np.all(np.abs(want[k] - params32[k]) > bound[k])


def test_step_updates_the_models_own_arrays(backend):
    layer = Linear(5, 3, backend=backend, seed=0)
    before = layer.state_dict()
    x = backend.asarray(np.ones((2, 5)), dtype="float32")
    out_before = backend.to_numpy(layer(x))
    opt = AdamW(layer.parameters(), lr=0.1)
    grads = {k: backend.xp.ones_like(p) for k, p in layer.parameters().items()}
    opt.step(grads)
    after = layer.state_dict()
    for k, p in layer.parameters().items():
        assert p is opt.params[k]  # the same array object: updated in place
        # first Adam step: m_hat/sqrt(v_hat) = 1, so each entry moves by lr (+ decay);
        # a few roundings of |p| and of the step lr
        want = before[k].astype(np.float64) * (1 - 0.1 * 0.01) - 0.1
        assert np.all(np.abs(after[k] - want) <= 4 * EPS32 * (np.abs(before[k]) + 0.1))
    assert not np.allclose(backend.to_numpy(layer(x)), out_before)


def test_decay_selects_parameters(backend):
    """Zero gradients leave Adam's update at 0/(0 + eps) = 0: only the decay moves p."""
    params32 = host_params()
    for decay, decayed in [
        (None, {"weight", "bias", "gain"}),
        (decay_matrices, {"weight"}),
        ({"bias"}, {"bias"}),
        ((), set()),
    ]:
        params = on(backend, params32)
        opt = AdamW(params, lr=0.5, weight_decay=0.2, decay=decay)
        opt.step({k: backend.xp.zeros_like(p) for k, p in params.items()})
        for k in SHAPES:
            got = backend.to_numpy(params[k])
            want = params32[k] * np.float32(1 - 0.5 * 0.2) if k in decayed else params32[k]
            np.testing.assert_array_equal(got, want)


def run_steps(opt: AdamW, backend, grads, lrs) -> None:
    for g, lr in zip(grads, lrs, strict=True):
        opt.lr = lr
        opt.step(on(backend, g))


@pytest.mark.parametrize("as_file", [False, True])
def test_save_load_resumes_bit_for_bit(backend, tmp_path, as_file):
    grads = host_grads(6)
    lrs = [lr_at(i, lr=1e-2, warmup=2, total=6, min_lr=1e-3) for i in range(6)]
    straight = on(backend, host_params())
    opt = AdamW(straight, lr=1e-2, weight_decay=0.1, decay=decay_matrices)
    run_steps(opt, backend, grads, lrs)

    first = on(backend, host_params())
    opt1 = AdamW(first, lr=1e-2, weight_decay=0.1, decay=decay_matrices)
    run_steps(opt1, backend, grads[:3], lrs[:3])
    path = tmp_path / ("opt.safetensors" if as_file else "ckpt")
    saved = opt1.save(path)
    assert saved.suffix == ".safetensors" and saved.is_file()
    config = json.loads(saved.with_suffix(".json").read_text())
    assert config["step"] == 3 and config["decay"] == ["weight"]

    resumed = {k: backend.asarray(backend.to_numpy(v)) for k, v in first.items()}
    opt2 = AdamW.load(path, resumed)
    assert opt2.t == 3 and opt2.lr == lrs[2] and opt2.decayed == {"weight"}
    run_steps(opt2, backend, grads[3:], lrs[3:])
    for k in SHAPES:
        np.testing.assert_array_equal(backend.to_numpy(resumed[k]), backend.to_numpy(straight[k]))


def test_state_dict_round_trip(backend):
    params = on(backend, host_params())
    opt = AdamW(params, lr=1e-3)
    opt.step(on(backend, host_grads(1)[0]))
    state = opt.state_dict()
    assert state["step"] == 1 and set(state["exp_avg"]) == set(SHAPES)
    other = AdamW(on(backend, host_params()), lr=0.5).load_state_dict(state)
    assert other.lr == 1e-3 and other.t == 1
    for k in SHAPES:
        np.testing.assert_array_equal(backend.to_numpy(other.exp_avg_sq[k]), state["exp_avg_sq"][k])


def test_load_rejects_a_state_of_other_parameters(backend, tmp_path):
    opt = AdamW(on(backend, host_params()))
    opt.save(tmp_path)
    other = {"weight": backend.asarray(np.zeros((6, 4), np.float32))}
    with pytest.raises(OptimizerStateError) as err:
        AdamW.load(tmp_path, other)
    message = str(err.value)
    assert "weight: expected (6, 4), got (6, 5)" in message and "unknown keys: bias" in message
    with pytest.raises(OptimizerStateError, match="does not exist"):
        AdamW.load(tmp_path / "nowhere", other)


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=-1e-3), "lr must be > 0"),
        (dict(lr=float("nan")), "lr must be finite"),
        (dict(betas=(1.0, 0.999)), r"beta1 must be in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), r"beta2 must be in \[0, 1\)"),
        (dict(betas=0.9), "betas must be a pair"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(decay={"nope"}), "decay names unknown parameters: nope"),
    ],
)
def test_bad_hyper_parameters(backend, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW(on(backend, host_params()), **kwargs)


def test_bad_params(backend):
    with pytest.raises(ValueError, match="non-empty dict"):
        AdamW({})
    weight = backend.asarray(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="hold the same array"):
        AdamW({"a": weight, "b": weight})
    with pytest.raises(TypeError, match="only floating-point"):
        AdamW({"ids": backend.asarray(np.arange(3), dtype="int64")})


def test_bad_grads(backend):
    params = on(backend, host_params())
    opt = AdamW(params)
    grads = on(backend, host_grads(1)[0])
    missing = {k: g for k, g in grads.items() if k != "bias"}
    with pytest.raises(ValueError, match="missing: bias"):
        opt.step(missing)
    with pytest.raises(ValueError, match="unknown keys: extra"):
        opt.step({**grads, "extra": grads["bias"]})
    wrong_shape = {**grads, "weight": backend.asarray(np.zeros((5, 6), np.float32))}
    with pytest.raises(ValueError, match=r"weight: expected \(6, 5\) float32, got \(5, 6\)"):
        opt.step(wrong_shape)
    wrong_dtype = {**grads, "gain": backend.asarray(np.zeros(3), dtype="float64")}
    with pytest.raises(ValueError, match=r"gain: expected \(3,\) float32, got \(3,\) float64"):
        opt.step(wrong_dtype)
    with pytest.raises(ValueError, match="lr must be > 0"):
        opt.lr = 0
    assert opt.t == 0  # nothing was applied
    np.testing.assert_array_equal(backend.to_numpy(params["weight"]), host_params()["weight"])


# --- schedule ---------------------------------------------------------------------------


def test_lr_at_values():
    kw = dict(lr=1.0, warmup=9, total=109, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)  # (0 + 1) / (9 + 1)
    assert lr_at(8, **kw) == pytest.approx(0.9)
    assert lr_at(9, **kw) == 1.0  # the peak, at the end of the warmup
    assert lr_at(59, **kw) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert lr_at(109, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == 0.1
    decay = [lr_at(i, **kw) for i in range(9, 120)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(3, lr=1e-3, warmup=0, total=0) == 0.0  # nothing to decay over


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's train.py get_lr, transcribed."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_lr_at_is_nanogpts_get_lr():
    for it in range(0, 2100, 7):
        want = nanogpt_get_lr(it, 1e-3, 100, 2000, 1e-4)
        assert lr_at(it, lr=1e-3, warmup=100, total=2000, min_lr=1e-4) == want


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step=-1), "step must be an int >= 0"),
        (dict(step=1.5), "step must be an int >= 0"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(min_lr=2.0), r"min_lr must be in \[0, lr"),
        (dict(warmup=-1), "warmup must be an int >= 0"),
    ],
)
def test_lr_at_bad_input(kwargs, message):
    args = dict(step=0, lr=1.0, warmup=1, total=10, min_lr=0.0) | kwargs
    with pytest.raises(ValueError, match=message):
        lr_at(args.pop("step"), **args)


# --- clipping ---------------------------------------------------------------------------


def test_clip_grad_norm(backend):
    def grads():
        return {
            "a": backend.asarray(np.array([3.0, 0.0], np.float32)),
            "b": backend.asarray(np.array([[4.0]], np.float32)),
        }

    small = grads()
    old_a = small["a"]
    assert clip_grad_norm(small, 1.0) == pytest.approx(5.0, rel=EPS32)
    coef = 1.0 / (5.0 + 1e-6)  # torch's 1e-6 in the coefficient
    np.testing.assert_allclose(backend.to_numpy(small["a"]), [3 * coef, 0.0], rtol=EPS32)
    np.testing.assert_allclose(backend.to_numpy(small["b"]), [[4 * coef]], rtol=EPS32)
    np.testing.assert_array_equal(backend.to_numpy(old_a), [3.0, 0.0])  # new arrays

    large = grads()
    assert clip_grad_norm(large, 10.0) == pytest.approx(5.0, rel=EPS32)
    np.testing.assert_array_equal(backend.to_numpy(large["b"]), [[4.0]])  # unchanged


def test_clip_grad_norm_bad_input(backend):
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_grad_norm({"a": backend.asarray(np.ones(2, np.float32))}, 0.0)
    with pytest.raises(ValueError, match="non-empty dict"):
        clip_grad_norm({}, 1.0)
    bad = {"a": backend.asarray(np.array([np.inf, 1.0], np.float32))}
    with pytest.raises(ValueError, match="total norm is inf"):
        clip_grad_norm(bad, 1.0, error_if_nonfinite=True)
