"""Gradient descent: AdamW, a learning-rate schedule and gradient clipping.

Training is three small steps after the backward pass (see :func:`tinytx.loss_and_grads`)::

    loss, grads = tinytx.loss_and_grads(model, ids, targets)
    clip_grad_norm(grads, 1.0)                                  # optional
    opt.lr = lr_at(step, lr=1e-3, warmup=100, total=2000)       # optional
    opt.step(grads)                       # the model's own arrays change, in place

:class:`AdamW` is ``torch.optim.AdamW``'s update (Loshchilov & Hutter 2019) with the
operations in the order of PyTorch's single-tensor implementation, so float32 results
agree with PyTorch to rounding (not bit for bit: PyTorch's CPU kernels fuse the multiply-adds
of ``lerp_`` and ``addcmul_``, which plain array code rounds twice). For each parameter p
with gradient g, at step t = 1, 2, ...::

    p   = p (1 - lr wd)                       decoupled weight decay (not through g)
    m   = m + (1 - b1) (g - m)                first moment   (torch: m.lerp_(g, 1 - b1))
    v   = b2 v + (1 - b2) g g                 second moment
    p   = p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The optimizer state is the moments m, v (one array per parameter, on the parameters'
backend) and t. ``save`` writes the moments as safetensors and t with the
hyper-parameters as JSON (never pickle), so a resumed run equals an uninterrupted one bit
for bit.

This is host-side code over device arrays: the arithmetic goes through the parameters'
array namespace, so it runs on NumPy, CuPy and array-api-strict alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from tinytx.backends import (
    Backend,
    BackendUnavailable,
    backend_names,
    get_backend,
    native_function,
)

Array = Any
DecayRule = Callable[[str, Array], bool] | Collection[str] | None

__all__ = [
    "AdamW",
    "OptimizerStateError",
    "clip_grad_norm",
    "decay_matrices",
    "lr_at",
]

STATE_FILE = "optimizer.safetensors"
CONFIG_FILE = "optimizer.json"
_FORMAT = "tinytx.optim.AdamW/1"


class OptimizerStateError(ValueError):
    """A saved optimizer state that does not fit the parameters (all problems listed)."""


def decay_matrices(name: str, param: Array) -> bool:
    """nanoGPT's rule: decay weight matrices and embeddings (2-D or more), not biases or
    norm gains (1-D). Pass it as ``AdamW(..., decay=decay_matrices)``."""
    return param.ndim >= 2


# --- checks ----------------------------------------------------------------------------


def _number(value: Any, name: str) -> float:
    """``value`` as a finite float, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> tuple:
    """Validated (lr, (beta1, beta2), eps, weight_decay); each bad value names its range."""
    lr = _number(lr, "lr")
    if lr <= 0:
        raise ValueError(f"AdamW: lr must be > 0, got {lr!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (_number(b, "betas") for b in betas)
    for i, beta in enumerate((beta1, beta2), start=1):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AdamW: beta{i} must be in [0, 1), got {beta!r}")
    eps = _number(eps, "eps")
    if eps <= 0:
        raise ValueError(f"AdamW: eps must be > 0, got {eps!r}")
    weight_decay = _number(weight_decay, "weight_decay")
    if weight_decay < 0:
        raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay!r}")
    return lr, (beta1, beta2), eps, weight_decay


def _backend_of(x: Array) -> Backend:
    """The registered backend that owns array ``x``."""
    for name in backend_names():
        try:
            backend = get_backend(name)
        except BackendUnavailable:
            continue
        if backend.owns(x):
            return backend
    raise TypeError(f"AdamW: a parameter is a {type(x).__name__}, not an array of any backend")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # array_api_strict.float32 -> float32


# --- the optimizer ---------------------------------------------------------------------


class AdamW:
    """``torch.optim.AdamW``: Adam with decoupled weight decay, over a dict of arrays.

    params: the model's parameters, ``model.parameters()`` (key -> array, floating
    point, all on one backend); ``step`` overwrites these very arrays (``p[...] = ...``),
    so the model sees the new values without reloading anything.
    lr, betas, eps, weight_decay: as in PyTorch (lr may be changed between steps:
    ``opt.lr = lr_at(...)``).
    decay: which parameters get weight decay: None (every one, as PyTorch), a collection
    of keys, or a predicate ``decay(key, array) -> bool`` such as :func:`decay_matrices`.
    """

    def __init__(
        self,
        params: Mapping[str, Array],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        decay: DecayRule = None,
    ) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = _check_hyper(
            lr, betas, eps, weight_decay
        )
        if not isinstance(params, Mapping) or not params:
            raise ValueError(
                "AdamW: params must be a non-empty dict of key -> array, such as "
                f"model.parameters(); got {type(params).__name__}"
            )
        self.params = dict(params)
        first = next(iter(self.params.values()))
        self.backend = _backend_of(first)
        xp = self.backend.xp
        for key, p in self.params.items():
            if not self.backend.owns(p):
                raise TypeError(
                    f"AdamW: parameter {key!r} is not on backend {self.backend.name!r} "
                    "like the others; move the model with .to(...)"
                )
            if not xp.isdtype(p.dtype, "real floating"):
                raise TypeError(
                    f"AdamW: parameter {key!r} has dtype {_dtype_name(p.dtype)}; "
                    "only floating-point arrays can be trained"
                )
        shared = len({id(p) for p in self.params.values()}) < len(self.params)
        if shared:
            raise ValueError(
                "AdamW: two keys of params hold the same array; it would be updated twice "
                "per step (a tied weight is one parameter: give it one key)"
            )
        self.decayed = self._decayed_keys(decay)
        self.t = 0  # steps taken
        self.exp_avg = {k: xp.zeros_like(p) for k, p in self.params.items()}  # m, like p
        self.exp_avg_sq = {k: xp.zeros_like(p) for k, p in self.params.items()}  # v, like p

    def _decayed_keys(self, decay: DecayRule) -> frozenset[str]:
        """The keys that get weight decay, from ``decay`` (None, keys or a predicate)."""
        if decay is None:
            return frozenset(self.params)
        if callable(decay):
            return frozenset(k for k, p in self.params.items() if decay(k, p))
        if isinstance(decay, str) or not isinstance(decay, Iterable):
            raise TypeError(
                "AdamW: decay must be None, a collection of parameter keys or a predicate "
                f"(key, array) -> bool; got {decay!r}"
            )
        keys = frozenset(decay)
        unknown = sorted(keys - set(self.params))
        if unknown:
            raise ValueError(f"AdamW: decay names unknown parameters: {', '.join(unknown)}")
        return keys

    @property
    def lr(self) -> float:
        """The learning rate of the next step (set it from a schedule between steps)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        value = _number(value, "lr")
        if value <= 0:
            raise ValueError(f"AdamW: lr must be > 0, got {value!r}")
        self._lr = value

    # --- a step --------------------------------------------------------------------

    def check_grads(self, grads: Mapping[str, Array]) -> None:
        """Raise one ValueError listing every missing, unknown or mis-shaped gradient."""
        if not isinstance(grads, Mapping):
            raise TypeError(f"AdamW.step: grads must be a dict key -> array, got {type(grads)}")
        missing = [k for k in self.params if k not in grads]
        unknown = [k for k in grads if k not in self.params]
        wrong = []
        for key, p in self.params.items():
            g = grads.get(key)
            if g is None:
                continue
            if not self.backend.owns(g):
                wrong.append(f"{key}: not an array of backend {self.backend.name!r}")
            elif tuple(g.shape) != tuple(p.shape) or g.dtype != p.dtype:
                wrong.append(
                    f"{key}: expected {tuple(p.shape)} {_dtype_name(p.dtype)}, "
                    f"got {tuple(g.shape)} {_dtype_name(g.dtype)}"
                )
        if missing or unknown or wrong:
            lines = ["AdamW.step: the gradients do not match the parameters:"]
            if missing:
                lines.append("  missing: " + ", ".join(missing))
            if unknown:
                lines.append("  unknown keys: " + ", ".join(unknown))
            if wrong:
                lines.append("  wrong: " + "; ".join(wrong))
            raise ValueError("\n".join(lines))

    def step(self, grads: Mapping[str, Array]) -> None:
        """One AdamW update of every parameter, in place; ``grads`` has exactly the keys
        of ``params``, each with its parameter's shape and dtype."""
        self.check_grads(grads)
        xp = self.backend.xp
        self.t += 1
        beta1, beta2 = self.betas
        lr, eps = self.lr, self.eps
        # Python floats (double), as PyTorch computes them.
        step_size = lr / (1 - beta1**self.t)  # lr / bias correction of m
        bias_correction2_sqrt = (1 - beta2**self.t) ** 0.5  # sqrt(bias correction of v)
        native = native_function(xp, "adamw_update")  # the same numbers in one pass
        for key, p in self.params.items():
            g = grads[key]  # like p
            m, v = self.exp_avg[key], self.exp_avg_sq[key]  # like p
            decay = key in self.decayed and self.weight_decay != 0
            if native is not None and native(
                p, g, m, v, decay=decay, decay_factor=1 - lr * self.weight_decay,
                beta1=beta1, beta2=beta2, bias_correction2_sqrt=bias_correction2_sqrt,
                eps=eps, step_size=step_size,
            ) is not NotImplemented:  # fmt: skip
                continue
            if decay:
                p[...] = p * (1 - lr * self.weight_decay)  # like p: p (1 - lr wd)
            m[...] = m + (1 - beta1) * (g - m)  # like p: torch's m.lerp_(g, 1 - b1)
            v[...] = v * beta2 + (1 - beta2) * g * g  # like p
            denom = xp.sqrt(v) / bias_correction2_sqrt + eps  # like p
            p[...] = p + (-step_size) * m / denom  # like p: torch's p.addcdiv_(m, denom, -s)

    # --- state ---------------------------------------------------------------------

    def hyper_parameters(self) -> dict[str, Any]:
        """lr, betas, eps, weight_decay, step and the decayed keys, as JSON-ready values."""
        return {
            "format": _FORMAT,
            "step": self.t,
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "decay": sorted(self.decayed),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on: :meth:`hyper_parameters` plus the moments
        as host NumPy arrays, ``exp_avg`` and ``exp_avg_sq`` (key -> array)."""
        state = self.hyper_parameters()
        state["exp_avg"] = {k: self.backend.to_numpy(m) for k, m in self.exp_avg.items()}
        state["exp_avg_sq"] = {k: self.backend.to_numpy(v) for k, v in self.exp_avg_sq.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> AdamW:
        """Restore a :meth:`state_dict` (hyper-parameters, step and moments). The moment
        keys and shapes must match the parameters; all problems are listed together."""
        if not isinstance(state, Mapping):
            raise OptimizerStateError(f"optimizer state must be a dict, got {type(state)}")
        absent = [
            name
            for name in ("step", "lr", "betas", "eps", "weight_decay", "exp_avg", "exp_avg_sq")
            if name not in state
        ]
        if absent:
            raise OptimizerStateError("optimizer state lacks: " + ", ".join(absent))
        problems = []
        for which in ("exp_avg", "exp_avg_sq"):
            moments = state[which]
            missing = [k for k in self.params if k not in moments]
            unknown = [k for k in moments if k not in self.params]
            if missing:
                problems.append(f"{which} missing: " + ", ".join(missing))
            if unknown:
                problems.append(f"{which} has unknown keys: " + ", ".join(unknown))
            for key, p in self.params.items():
                if key in moments and tuple(np.shape(moments[key])) != tuple(p.shape):
                    problems.append(
                        f"{which}.{key}: expected {tuple(p.shape)}, "
                        f"got {tuple(np.shape(moments[key]))}"
                    )
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            problems.append(f"step must be an int >= 0, got {step!r}")
        if problems:
            raise OptimizerStateError("cannot load optimizer state:\n  " + "\n  ".join(problems))
        self.lr, self.betas, self.eps, self.weight_decay = _check_hyper(
            state["lr"], state["betas"], state["eps"], state["weight_decay"]
        )
        if "decay" in state:
            self.decayed = self._decayed_keys(list(state["decay"]))
        self.t = int(step)
        for key, p in self.params.items():
            dtype = _dtype_name(p.dtype)
            self.exp_avg[key] = self.backend.asarray(state["exp_avg"][key], dtype=dtype)
            self.exp_avg_sq[key] = self.backend.asarray(state["exp_avg_sq"][key], dtype=dtype)
        return self

    def save(self, path: str | Path) -> Path:
        """Write the state: moments as safetensors, step and hyper-parameters as JSON.

        ``path`` is a folder (it gets ``optimizer.safetensors`` and ``optimizer.json``) or
        a file name ending in ``.safetensors`` (the JSON goes beside it, same stem).
        Returns the safetensors file's path.
        """
        from safetensors.numpy import save_file

        tensors_path, config_path = _state_paths(path, creating=True)
        state = self.state_dict()
        tensors = {}
        for which in ("exp_avg", "exp_avg_sq"):
            for key, value in state.pop(which).items():
                tensors[f"{which}.{key}"] = np.ascontiguousarray(value)
        save_file(tensors, str(tensors_path))
        config_path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        return tensors_path

    @classmethod
    def load(cls, path: str | Path, params: Mapping[str, Array]) -> AdamW:
        """An optimizer over ``params`` with the state :meth:`save` wrote at ``path``."""
        from safetensors.numpy import load_file

        tensors_path, config_path = _state_paths(path, creating=False)
        try:
            state = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise OptimizerStateError(f"cannot read {config_path}: {err}") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise OptimizerStateError(f"{config_path} is not a tinytx AdamW state ({_FORMAT})")
        tensors = load_file(str(tensors_path))
        for which in ("exp_avg", "exp_avg_sq"):
            prefix = which + "."
            state[which] = {
                k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)
            }
        opt = cls(params, state["lr"], tuple(state["betas"]), state["eps"], state["weight_decay"])
        return opt.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"AdamW(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
            f"weight_decay={self.weight_decay}, step={self.t}, params={len(self.params)})"
        )


def _state_paths(path: str | Path, *, creating: bool) -> tuple[Path, Path]:
    """(safetensors file, JSON file) for a folder or a ``.safetensors`` file name."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors_path, config_path = path, path.with_suffix(".json")
    else:
        tensors_path, config_path = path / STATE_FILE, path / CONFIG_FILE
    if creating:
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
    else:
        for p in (tensors_path, config_path):
            if not p.is_file():
                raise OptimizerStateError(f"no optimizer state at {path}: {p} does not exist")
    return tensors_path, config_path


# --- schedule and clipping -------------------------------------------------------------


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The learning rate for iteration ``step`` (0-based: the value used by the
    ``step + 1``-th optimizer update), nanoGPT's ``get_lr``:

        step < warmup:            lr (step + 1) / (warmup + 1)          linear warmup
        warmup <= step <= total:  min_lr + (lr - min_lr) (1 + cos(pi r)) / 2,
                                  r = (step - warmup) / (total - warmup)  cosine decay
        step > total:             min_lr

    (With ``total <= warmup`` there is nothing to decay: min_lr after the warmup.)
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"lr_at: step must be an int >= 0, got {step!r}")
    for name, value in (("warmup", warmup), ("total", total)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"lr_at: {name} must be an int >= 0, got {value!r}")
    lr, min_lr = _number(lr, "lr"), _number(min_lr, "min_lr")
    if lr <= 0:
        raise ValueError(f"lr_at: lr must be > 0, got {lr!r}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"lr_at: min_lr must be in [0, lr={lr!r}], got {min_lr!r}")
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > total or total <= warmup:
        return min_lr
    ratio = (step - warmup) / (total - warmup)  # 0 .. 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 .. 0
    return min_lr + coeff * (lr - min_lr)


def clip_grad_norm(
    grads: dict[str, Array], max_norm: float, *, error_if_nonfinite: bool = False
) -> float:
    """Scale all gradients together so that their global 2-norm is at most ``max_norm``;
    return the norm before clipping (``torch.nn.utils.clip_grad_norm_``):

        total = || (||g_1||, ||g_2||, ...) ||        the norm of all entries together
        g_i   = g_i min(1, max_norm / (total + 1e-6))

    The dict is updated in place with new arrays (the old arrays are left untouched).
    A non-finite total leaves NaN/inf gradients, as PyTorch does, unless
    ``error_if_nonfinite`` asks for a ValueError instead.
    """
    max_norm = _number(max_norm, "max_norm")
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    if not isinstance(grads, dict) or not grads:
        raise ValueError("clip_grad_norm: grads must be a non-empty dict key -> array")
    xp = array_namespace(*grads.values())
    norms = [xp.linalg.vector_norm(g) for g in grads.values()]  # each 0-d
    total = xp.linalg.vector_norm(xp.stack(norms))  # 0-d
    total_norm = float(total)
    if error_if_nonfinite and not math.isfinite(total_norm):
        raise ValueError(
            f"clip_grad_norm: the gradients' total norm is {total_norm}; "
            "a NaN or inf gradient cannot be clipped"
        )
    coef = min(max_norm / (total_norm + 1e-6), 1.0)
    for key, g in grads.items():
        grads[key] = g * coef  # like g
    return total_norm
