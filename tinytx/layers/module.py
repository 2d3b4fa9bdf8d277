"""``Module``: what every layer shares: its backend, its parameters, its children.

A module is a small object around a pure forward function. It keeps

- ``backend``: where its parameters live (see :mod:`tinytx.backends`);
- parameters: arrays on that backend, stored as plain attributes (``self.weight``) and
  named in ``state_dict()`` by their path, PyTorch style (``layers.0.self_attn.in_proj_weight``);
- children: sub-modules, whose parameters appear under ``<child name>.``.

There is no autograd: a forward pass is plain array code. Calling a module checks that
its inputs live on the module's backend and match its dtype, then runs ``forward``.

Learning (backward passes, written by hand, llm.c style). A module that can be trained
also has

- ``out, saved = module.forward_and_save(*inputs, **kwargs)``: the forward, plus
  ``saved``, a plain dict of the arrays (and the children's saved dicts) its backward
  needs. Nothing is stored on the module, so one module can run many forwards at once;
- ``input_grads, param_grads = module.backward(grad_out, saved)``: the vector-Jacobian
  product. ``input_grads`` is a tuple with one entry per positional parameter of
  ``forward`` (None for integer inputs such as token ids, and for optional inputs left
  out); ``param_grads`` a dict with exactly the keys of ``parameters()``.

A composite module calls its children's ``forward_and_save`` in order and their
``backward`` in reverse, and names the children's gradients with :meth:`Module.prefix_grads`.
:func:`tinytx.vjp` wraps the pair in JAX's convention.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from array_api_compat import is_array_api_obj

from tinytx.backends import Backend, BackendMismatchError, dtype_is, resolve_backend
from tinytx.trace import current_tracer

Array = Any

__all__ = ["BackendMismatchError", "Module", "NoBackwardError", "StateDictError"]


class StateDictError(ValueError):
    """``load_state_dict`` got missing, unexpected or mis-shaped keys (all listed)."""


class NoBackwardError(NotImplementedError):
    """Gradients were asked of a module that has no backward pass."""


@functools.cache
def _id_positions(cls: type) -> frozenset[int]:
    """Which positional inputs of ``cls.forward`` are integer token ids: those whose
    parameter name ends in "ids" (``ids``, ``src_ids``...). Every other positional array
    input must be floating point."""
    parameters = list(inspect.signature(cls.forward).parameters)[1:]  # after self
    return frozenset(i for i, name in enumerate(parameters) if name.endswith("ids"))


class Module:
    """Base class of every layer: parameters, children, state dicts, ``to(backend)``."""

    def __init__(self, backend: str | Backend | None = None, dtype: str = "float32") -> None:
        self.backend = resolve_backend(backend)
        self.dtype = dtype
        self._param_names: list[str] = []
        self._children: dict[str, tuple[str, Module]] = {}  # name -> (key prefix, module)

    # --- building ------------------------------------------------------------------

    def add_param(self, name: str, host_value: Any) -> Array:
        """Store a host (NumPy) array as parameter ``name``, on this module's backend."""
        value = self.backend.asarray(host_value, dtype=self.dtype)
        setattr(self, name, value)
        if name not in self._param_names:
            self._param_names.append(name)
        return value

    def add_child(self, name: str, module: Module, *, prefix: str | None = None) -> Module:
        """Register ``module`` as a child; its keys get ``prefix`` (default ``name + '.'``).

        ``prefix=""`` merges the child's keys into this module's, e.g. so that a block's
        feed-forward keys read ``linear1.weight`` as in ``nn.TransformerEncoderLayer``.
        """
        self._children[name] = (f"{name}." if prefix is None else prefix, module)
        return module

    # --- walking -------------------------------------------------------------------

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(path, module) for this module and every descendant, depth first."""
        yield prefix.rstrip("."), self
        for name, (_, child) in self._children.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def _parameter_slots(self, prefix: str = "") -> Iterator[tuple[str, Module, str]]:
        """(state-dict key, owning module, attribute name) for every parameter."""
        for name in self._param_names:
            yield prefix + name, self, name
        for child_prefix, child in self._children.values():
            yield from child._parameter_slots(prefix + child_prefix)

    def parameters(self) -> dict[str, Array]:
        """Every parameter by state-dict key, on the module's backend (no copy)."""
        return {key: getattr(owner, attr) for key, owner, attr in self._parameter_slots()}

    def num_parameters(self) -> int:
        """How many numbers the parameters hold."""
        total = 0
        for value in self.parameters().values():
            count = 1
            for n in value.shape:
                count *= n
            total += count
        return total

    # --- state dicts ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every parameter as a host NumPy array, keyed like PyTorch's state_dict."""
        return {
            key: self.backend.to_numpy(getattr(owner, attr))
            for key, owner, attr in self._parameter_slots()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> Module:
        """Load host arrays (NumPy, or anything ``numpy.asarray`` accepts) by key.

        Every key must be present with the right shape and no other key may appear; all
        problems are reported together in one :class:`StateDictError`. Values are cast to
        the module's dtype. Returns the module.
        """
        if not isinstance(state, Mapping):
            raise StateDictError(f"state must be a mapping of key -> array, got {type(state)}")
        slots = {key: (owner, attr) for key, owner, attr in self._parameter_slots()}
        missing = [key for key in slots if key not in state]
        unexpected = [key for key in state if key not in slots]
        misshaped = []
        for key, (owner, attr) in slots.items():
            if key in state:
                want = tuple(getattr(owner, attr).shape)
                got = getattr(state[key], "shape", None)
                if got is None:  # a nested list: the shape numpy.asarray gives it
                    got = owner.backend.asarray(state[key]).shape
                got = tuple(got)
                if got != want:
                    misshaped.append(f"{key}: expected {want}, got {got}")
        if missing or unexpected or misshaped:
            lines = [f"cannot load state dict into {type(self).__name__}:"]
            if missing:
                lines.append("  missing keys: " + ", ".join(missing))
            if unexpected:
                lines.append("  unexpected keys: " + ", ".join(unexpected))
            if misshaped:
                lines.append("  wrong shapes: " + "; ".join(misshaped))
            raise StateDictError("\n".join(lines))
        for key, (owner, attr) in slots.items():
            setattr(owner, attr, owner.backend.asarray(state[key], dtype=owner.dtype))
        return self

    def to(self, backend: str | Backend | None = None, dtype: str | None = None) -> Module:
        """Move every parameter to ``backend`` and/or cast it to ``dtype``, in place.

        Goes through the host, so the numbers are the same on every backend.
        Returns the module, so ``model = Encoder(...).to("strict")`` reads naturally.
        """
        target = self.backend if backend is None else resolve_backend(backend)
        for _, module in self.named_modules():
            new_dtype = dtype or module.dtype
            for name in module._param_names:
                host = module.backend.to_numpy(getattr(module, name))
                setattr(module, name, target.asarray(host, dtype=new_dtype))
            module.backend, module.dtype = target, new_dtype
        return self

    # --- calling -------------------------------------------------------------------

    def check_input(self, x: Array, what: str = "input") -> None:
        """Raise :class:`BackendMismatchError` unless ``x`` lives on this module's backend
        and, if it is floating point, has the module's dtype."""
        if not self.backend.owns(x):
            raise BackendMismatchError(
                f"{type(self).__name__}: the {what} is a {type(x).__module__}."
                f"{type(x).__name__}, but the weights live on backend {self.backend.name!r}; "
                f"convert it with get_backend({self.backend.name!r}).asarray(...) or move the "
                "module with .to(...)"
            )
        xp = self.backend.xp
        if dtype_is(xp, x.dtype, "real floating") and x.dtype != getattr(xp, self.dtype):
            got = str(x.dtype).rsplit(".", 1)[-1]  # array_api_strict.float64 -> float64
            raise BackendMismatchError(
                f"{type(self).__name__}: the {what} has dtype {got} but the weights are "
                f"{self.dtype}; cast the input, or the module with .to(dtype={got!r})"
            )

    def check_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """The checks every call makes: the first input is an array, and every array
        argument lives on this module's backend with its dtype (see :meth:`check_input`)."""
        if args and isinstance(args[0], (list, tuple, int, float)):
            raise TypeError(
                f"{type(self).__name__} expects an array, got a {type(args[0]).__name__}; "
                f"convert it with get_backend({self.backend.name!r}).asarray(...)"
            )
        id_positions = _id_positions(type(self))
        for i, arg in enumerate(args):
            if is_array_api_obj(arg):
                self.check_input(arg)
                if i not in id_positions and dtype_is(self.backend.xp, arg.dtype, "integral"):
                    got = str(arg.dtype).rsplit(".", 1)[-1]
                    raise TypeError(
                        f"{type(self).__name__}: input {i} is an integer array ({got}), but "
                        f"{type(self).__name__} computes on {self.dtype} numbers; integer "
                        "token ids go into an Embedding (or a model), other numbers need "
                        f"xp.astype(x, xp.{self.dtype})"
                    )
        for name, arg in kwargs.items():
            if is_array_api_obj(arg):
                self.check_input(arg, what=f"argument {name!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.check_call(args, kwargs)
        tracer = current_tracer()
        if tracer is None:
            return self.forward(*args, **kwargs)
        return tracer.record(self, args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- learning --------------------------------------------------------------------

    def forward_and_save(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """``forward``, plus what ``backward`` needs: ``(out, saved)``.

        Modules with a backward pass override this; the base class has none.
        """
        raise NoBackwardError(
            f"{type(self).__name__} has no backward pass (no forward_and_save/backward); "
            "gradients exist for the layers in tinytx.layers and for GPT"
        )

    def backward(self, grad_out: Array, saved: dict[str, Any]) -> tuple[tuple, dict[str, Array]]:
        """The vector-Jacobian product: ``(input_grads, param_grads)`` for cotangent
        ``grad_out`` (the shape of the output) and the ``saved`` of ``forward_and_save``."""
        raise NoBackwardError(f"{type(self).__name__} has no backward pass")

    def prefix_grads(self, child: str, grads: Mapping[str, Array]) -> dict[str, Array]:
        """A child's parameter gradients under this module's keys for it.

        ``self.prefix_grads("out_proj", {"weight": g})`` -> ``{"out_proj.weight": g}``
        (the prefix registered by :meth:`add_child`, so ``prefix=""`` children keep theirs).
        """
        prefix = self._children[child][0]
        return {prefix + key: grad for key, grad in grads.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend.name!r}, dtype={self.dtype!r})"
