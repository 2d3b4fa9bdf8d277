"""The attention registry: name -> variant.

Every variant follows one contract (see ``../shared/design.md``)::

    fn(q, k, v, *, mask=None, causal=False, scale=None, **options) -> (output, weights | None)

    q: (batch, heads, seq_q, d); k, v: (batch, heads_kv or heads, seq_k, d / d_v)
    (the function itself always receives k, v with ``heads`` heads; see AttentionVariant)
    output: (batch, heads, seq_q, d_v); weights: (batch, heads, seq_q, seq_k) or None
    mask: boolean, True where attention is allowed, broadcastable to (batch, heads, seq_q, seq_k)

A variant may also register its backward (``register_attention(..., backward=fn)``),
the vector-Jacobian product of the same contract, so that models can learn through it::

    fn(grad_out, q, k, v, out, weights, *, mask, causal, scale, **options) -> (dq, dk, dv)

    grad_out, out: (batch, heads, seq_q, d_v); weights: what the forward returned (or None)
    dq: q's shape; dk, dv: (batch, heads, seq_k, d / d_v), with all ``heads``, as k, v came in

:meth:`AttentionVariant.backward` calls it (asking for one that was not registered is an
error naming the variant), and the kit checks it against finite differences.

A variant declares what it promises (:class:`Promises`); the conformance kit in
:mod:`tinytx.testing` holds it to exactly that. A variant that cannot honour ``mask`` or
``causal`` must refuse it: :class:`AttentionVariant` does so for it, loudly, when it does
not declare support, so a mask is never silently dropped.

Where variants come from:

- the built-ins register when :mod:`tinytx.plugins` is imported;
- third-party packages declare an entry point in the group ``tinytx.attention``
  (``my_variant = my_package.attention``): the entry point's name is the variant's name
  and loading it imports the module, whose ``@register_attention`` runs. They are loaded
  lazily, by name, the first time :func:`get_attention` is asked for a name it does not
  know (:func:`available_attention` loads them all). A broken one warns
  (:class:`PluginWarning`) and is skipped. ``TINYTX_DISABLE_PLUGIN_AUTOLOAD=1`` turns this
  discovery off;
- a learner's own file or module: :func:`load_plugin` (``tinytx --plugin PATH_OR_MODULE``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ENTRY_POINT_GROUP",
    "AttentionError",
    "AttentionVariant",
    "Option",
    "PluginError",
    "PluginWarning",
    "Promises",
    "UnknownAttentionError",
    "available_attention",
    "broken_plugins",
    "get_attention",
    "load_plugin",
    "register_attention",
    "unregister_attention",
]

ENTRY_POINT_GROUP = "tinytx.attention"


class AttentionError(ValueError):
    """A variant was misused or misbehaved; the message names the variant."""


class UnknownAttentionError(AttentionError, KeyError):
    """No variant of that name is registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


class PluginError(AttentionError):
    """A plugin (file, module or entry point) failed to load; the message names it."""


class PluginWarning(UserWarning):
    """A discovered third-party plugin was broken and has been skipped."""


@dataclass(frozen=True)
class Promises:
    """The invariants a variant promises. Each one the kit tests; none is assumed.

    normalized: weights are non-negative and every row sums to 1.
    permutation_equivariant: permuting the tokens (no mask, no positions) permutes the output.
    exact: equal to softmax attention within float tolerance.
    supports_mask: honours a boolean ``mask``; otherwise a mask is refused.
    supports_causal: honours ``causal=True``; otherwise it is refused.
    returns_weights: returns the (batch, heads, seq_q, seq_k) weights, not None.
    """

    normalized: bool = False
    permutation_equivariant: bool = False
    exact: bool = False
    supports_mask: bool = False
    supports_causal: bool = False
    returns_weights: bool = False

    def names(self) -> list[str]:
        """The names of the promised invariants, in declaration order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]


@dataclass(frozen=True)
class Option:
    """A typed option of a variant (``window``, ``block_size``...), validated on each call."""

    type: type
    default: Any
    help: str = ""
    check: Callable[[Any], bool] | None = None  # extra validity rule, e.g. ``lambda w: w > 0``
    rule: str = ""  # the rule in words, for the error message

    def validate(self, variant: str, name: str, value: Any) -> Any:
        """Return ``value`` if valid, else raise an error naming the variant and the option."""
        ok_type = isinstance(value, self.type) and not (
            self.type is int and isinstance(value, bool)
        )
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok_type = float(value), True
        if not ok_type:
            raise AttentionError(
                f"attention {variant!r}: option {name!r} must be {self.type.__name__}, "
                f"got {type(value).__name__} {value!r}"
            )
        if self.check is not None and not self.check(value):
            rule = f" ({self.rule})" if self.rule else ""
            raise AttentionError(f"attention {variant!r}: invalid {name}={value!r}{rule}")
        return value


@dataclass(frozen=True)
class AttentionVariant:
    """A registered attention function with its description, paper, promises and options.

    Calling it validates the inputs and the options, refuses a mask or causal flag the
    function cannot honour, repeats grouped key/value heads so that the function always
    sees as many as there are query heads, and checks the shape and dtype of what the
    function returns. :meth:`backward` does the same for the registered backward
    (``backward_fn``; None when the variant has none).
    """

    name: str
    fn: Callable[..., tuple[Any, Any]]
    description: str = ""
    paper: str = ""
    promises: Promises = field(default_factory=Promises)
    options: Mapping[str, Option] = field(default_factory=dict)
    source: str = ""  # "built-in", the plugin (file, module, entry point), or "module m"
    from_plugin: bool = False  # loaded by load_plugin or from an entry point
    backward_fn: Callable[..., tuple[Any, Any, Any]] | None = None  # register_attention(backward=)

    @property
    def builtin(self) -> bool:
        """True for the variants that ship with tinytx."""
        return self.source == "built-in"

    def _who(self) -> str:
        """How error messages name this variant: ``attention 'x'`` plus its plugin."""
        if not self.from_plugin:
            return f"attention {self.name!r}"
        return f"attention {self.name!r} (plugin {self.source})"

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in, unknown names and invalid values rejected."""
        if not isinstance(given, Mapping):
            raise AttentionError(
                f"{self._who()}: options must be a mapping of option name to value "
                f"(e.g. {{'window': 4}}), got {type(given).__name__}"
            )
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise AttentionError(
                f"{self._who()} has no option {', '.join(map(repr, unknown))}; its options: {known}"
            )
        resolved = {}
        for name, spec in self.options.items():
            value = given.get(name, spec.default)
            resolved[name] = spec.validate(self.name, name, value)
        return resolved

    def parse_options(self, pairs: Iterable[str]) -> dict[str, Any]:
        """``KEY=VALUE`` texts, as a command line gives them, -> typed option values.

        A bool option takes true/false/1/0 (any case); other types are built from the text
        (``int("2")``). A pair without ``=``, an unknown key or a text that is not of the
        option's type is an AttentionError naming it; the values' rules are checked when the
        variant is called (:meth:`resolve_options`).
        """
        parsed: dict[str, Any] = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            if not sep or not key:
                raise AttentionError(f"expected KEY=VALUE, got {pair!r}")
            spec = self.options.get(key)
            if spec is None:
                known = ", ".join(self.options) or "none"
                raise AttentionError(
                    f"attention {self.name!r} has no option {key!r}; its options: {known}"
                )
            try:
                if spec.type is bool:
                    if text.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(text)
                    parsed[key] = text.lower() in ("true", "1")
                else:
                    parsed[key] = spec.type(text)
            except ValueError:
                raise AttentionError(
                    f"option {key!r} of {self.name!r} must be {spec.type.__name__}, got {text!r}"
                ) from None
        return parsed

    def __call__(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        mask: Any = None,
        causal: bool = False,
        scale: float | None = None,
        return_weights: bool = True,
        **options: Any,
    ) -> tuple[Any, Any]:
        """Run the variant: q (batch, heads, seq_q, d); k, v (batch, heads_kv, seq_k, d / d_v)
        -> output (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k) or None.

        ``return_weights=False`` (inference, where only the output is used) gives None for
        the weights; a function with a ``return_weights`` parameter of its own is told, so
        that it need not store them (the built-in softmax never makes the seq_q x seq_k
        matrix then).
        """
        from tinytx.functional import check_attention_inputs, check_attention_scale, repeat_kv

        check_attention_inputs(q, k, v, mask)
        check_attention_scale(scale)
        self._refuse_unsupported(mask, causal)
        resolved = self.resolve_options(options)
        k = repeat_kv(k, q.shape[1])  # (batch, heads, seq_k, d): grouped heads shared out
        v = repeat_kv(v, q.shape[1])  # (batch, heads, seq_k, d_v)
        if not return_weights and self._takes_return_weights:
            resolved["return_weights"] = False
        try:
            result = self.fn(q, k, v, mask=mask, causal=causal, scale=scale, **resolved)
        except AttentionError:
            raise
        except Exception as err:
            raise AttentionError(f"{self._who()} raised {type(err).__name__}: {err}") from err
        output, weights = self._checked(result, q, v)
        return output, weights if return_weights else None

    @functools.cached_property
    def _takes_return_weights(self) -> bool:
        """Whether the function has a ``return_weights`` parameter (see :meth:`__call__`);
        looked up once per variant (a signature costs tens of microseconds, as much as a
        decode step's attention)."""
        try:
            return "return_weights" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # a builtin or C function without a signature
            return False

    def _refuse_unsupported(self, mask: Any, causal: bool) -> None:
        """Refuse, loudly, a mask or causal=True that the variant does not declare."""
        if mask is not None and not self.promises.supports_mask:
            raise AttentionError(
                f"{self._who()} does not support a mask; choose a variant that does "
                f"(e.g. 'softmax')"
            )
        if causal and not self.promises.supports_causal:
            raise AttentionError(
                f"{self._who()} does not support causal=True; choose a variant that "
                f"does (e.g. 'softmax')"
            )

    def _checked(self, result: Any, q: Any, v: Any) -> tuple[Any, Any]:
        """Check that the variant returned (output, weights) of the contract's shapes."""
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AttentionError(
                f"{self._who()} must return (output, weights or None), got {type(result).__name__}"
            )
        output, weights = result
        batch, heads, seq_q, _ = q.shape
        expected = (batch, heads, seq_q, v.shape[-1])
        if tuple(getattr(output, "shape", ())) != expected:
            got = tuple(getattr(output, "shape", ()))
            raise AttentionError(
                f"{self._who()} returned output of shape {got}; expected {expected} "
                "(batch, heads, seq_q, d_v)"
            )
        if output.dtype != q.dtype:
            raise AttentionError(
                f"{self._who()} returned dtype {output.dtype} for {q.dtype} inputs"
            )
        if weights is not None:
            w_expected = (batch, heads, seq_q, v.shape[2])
            if tuple(weights.shape) != w_expected:
                raise AttentionError(
                    f"{self._who()} returned weights of shape {tuple(weights.shape)}; "
                    f"expected {w_expected} (batch, heads, seq_q, seq_k)"
                )
            if weights.dtype != q.dtype:
                raise AttentionError(
                    f"{self._who()} returned weights of dtype {weights.dtype} for {q.dtype} inputs"
                )
        return output, weights

    @property
    def has_backward(self) -> bool:
        """True when the variant registered a backward (``register_attention(backward=fn)``)."""
        return self.backward_fn is not None

    def backward(
        self,
        grad_out: Any,
        q: Any,
        k: Any,
        v: Any,
        out: Any,
        weights: Any,
        *,
        mask: Any = None,
        causal: bool = False,
        scale: float | None = None,
        **options: Any,
    ) -> tuple[Any, Any, Any]:
        """The vector-Jacobian product of the forward: (dL/dq, dL/dk, dL/dv) from
        grad_out = dL/d(output), for the same q, k, v, mask, causal, scale and options.

        ``out`` and ``weights`` are what the forward returned for those inputs (None: the
        forward is run again here to get them). Validated as the forward is (shapes,
        options, a mask or causal flag the variant does not support is refused); the
        registered function sees k, v repeated to ``heads``, and the gradients of a
        shared key/value head (grouped-query) are summed over its group.

        grad_out, out: (batch, heads, seq_q, d_v); weights: (batch, heads, seq_q, seq_k)
        or None -> dq (batch, heads, seq_q, d), dk (batch, heads_kv, seq_k, d),
        dv (batch, heads_kv, seq_k, d_v): the shapes of q, k, v.
        """
        from tinytx.functional import check_attention_inputs, repeat_kv, repeat_kv_backward

        if self.backward_fn is None:
            with_one = [name for name, x in sorted(_REGISTRY.items()) if x.has_backward]
            raise AttentionError(
                f"{self._who()} has no backward; variants with one: {', '.join(with_one) or 'none'}"
            )
        check_attention_inputs(q, k, v, mask)
        self._refuse_unsupported(mask, causal)
        resolved = self.resolve_options(options)
        batch, heads, seq_q, _ = q.shape
        heads_kv, seq_k, d_v = v.shape[1], v.shape[2], v.shape[3]
        self._check_array("grad_out", grad_out, (batch, heads, seq_q, d_v), q.dtype)
        if out is None or (weights is None and self.promises.returns_weights):
            out, weights = self(q, k, v, mask=mask, causal=causal, scale=scale, **options)
        self._check_array("out", out, (batch, heads, seq_q, d_v), q.dtype)
        if weights is not None:
            self._check_array("weights", weights, (batch, heads, seq_q, seq_k), q.dtype)
        k_all = repeat_kv(k, heads)  # (batch, heads, seq_k, d): grouped heads shared out
        v_all = repeat_kv(v, heads)  # (batch, heads, seq_k, d_v)
        kwargs = {"mask": mask, "causal": causal, "scale": scale, **resolved}
        try:
            result = self.backward_fn(grad_out, q, k_all, v_all, out, weights, **kwargs)
        except AttentionError:
            raise
        except Exception as err:
            raise AttentionError(
                f"{self._who()}: its backward raised {type(err).__name__}: {err}"
            ) from err
        if not (isinstance(result, tuple) and len(result) == 3):
            raise AttentionError(
                f"{self._who()}: its backward must return (dq, dk, dv), got {type(result).__name__}"
            )
        for what, grad, like in zip(("dq", "dk", "dv"), result, (q, k_all, v_all), strict=True):
            self._check_array(f"backward's {what}", grad, tuple(like.shape), q.dtype)
        dq, dk, dv = result
        # grouped-query: a shared key/value head gets the sum of its query heads' gradients
        return dq, repeat_kv_backward(dk, heads_kv), repeat_kv_backward(dv, heads_kv)

    def _check_array(self, what: str, a: Any, shape: tuple[int, ...], dtype: Any) -> None:
        """An error naming the variant unless ``a`` is an array of ``shape`` and ``dtype``."""
        got = tuple(getattr(a, "shape", ()))
        if got != shape or not hasattr(a, "dtype"):
            kind = f"shape {got}" if hasattr(a, "shape") else type(a).__name__
            raise AttentionError(f"{self._who()}: {what} has {kind}; expected shape {shape}")
        if a.dtype != dtype:
            raise AttentionError(
                f"{self._who()}: {what} has dtype {a.dtype}; expected {dtype} (q's dtype)"
            )


_REGISTRY: dict[str, AttentionVariant] = {}
# The plugin being loaded right now (a file, module or entry point), so that the variants
# it registers remember where they came from; None while the built-ins register.
_LOADING: contextvars.ContextVar[str | None] = contextvars.ContextVar("_LOADING", default=None)


def register_attention(
    name: str,
    *,
    description: str = "",
    paper: str = "",
    normalized: bool = False,
    permutation_equivariant: bool = False,
    exact: bool = False,
    supports_mask: bool = False,
    supports_causal: bool = False,
    returns_weights: bool = False,
    options: Mapping[str, Option] | None = None,
    replace: bool = False,
    backward: Callable[..., tuple[Any, Any, Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register an attention function under ``name``.

    Promise only what the function does: the conformance kit tests every promise, and
    holds a variant that promises nothing to the properties any attention must have.

    >>> @register_attention("mine", description="softmax with a temperature",
    ...                     normalized=True, supports_mask=True, supports_causal=True,
    ...                     options={"temperature": Option(float, 1.0)})
    ... def mine(q, k, v, *, mask=None, causal=False, scale=None, temperature=1.0): ...

    A second registration of the same name is an error unless ``replace=True``.

    ``backward``: the variant's vector-Jacobian product, so that gradients can flow
    through it (without one, :meth:`AttentionVariant.backward` is an error naming it)::

        backward(grad_out, q, k, v, out, weights, *, mask, causal, scale, **options)
            -> (dq, dk, dv)

    It gets what the forward got (k, v with all heads) plus grad_out = dL/d(output) and
    the forward's ``out`` and ``weights``, and returns arrays of q's, k's and v's shapes.
    The kit checks it against finite differences.
    """
    if not isinstance(name, str) or not name.strip():
        raise AttentionError(f"an attention variant needs a non-empty name, got {name!r}")
    promises = Promises(
        normalized=normalized,
        permutation_equivariant=permutation_equivariant,
        exact=exact,
        supports_mask=supports_mask,
        supports_causal=supports_causal,
        returns_weights=returns_weights,
    )
    if backward is not None and not callable(backward):
        raise AttentionError(f"attention {name!r}: backward={backward!r} is not callable")
    for opt_name, spec in (options or {}).items():
        if not isinstance(spec, Option):
            raise AttentionError(
                f"attention {name!r}: option {opt_name!r} must be declared as Option(type, "
                f"default), got {spec!r}"
            )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise AttentionError(f"attention {name!r}: {fn!r} is not callable")
        if name in _REGISTRY and not replace:
            raise AttentionError(
                f"attention {name!r} is already registered (by {_REGISTRY[name].fn.__module__}); "
                "pass replace=True to replace it"
            )
        doc = (fn.__doc__ or "").strip().splitlines()
        source = _LOADING.get()
        from_plugin = source is not None
        if source is None:
            module = getattr(fn, "__module__", "") or ""
            source = "built-in" if module.startswith("tinytx.plugins.") else f"module {module}"
        _REGISTRY[name] = AttentionVariant(
            name=name,
            fn=fn,
            description=description or (doc[0] if doc else ""),
            paper=paper,
            promises=promises,
            options=dict(options or {}),
            source=source,
            from_plugin=from_plugin,
            backward_fn=backward,
        )
        return fn

    return decorate


def unregister_attention(name: str) -> None:
    """Remove a variant (tests and notebooks use this to clean up)."""
    _REGISTRY.pop(name, None)


def get_attention(name: str | AttentionVariant) -> AttentionVariant:
    """The variant registered as ``name``; an unknown name lists the registered ones.

    A name nobody registered yet may belong to an installed plugin package: its entry
    point (group ``tinytx.attention``) is loaded now, and only that one.
    """
    if isinstance(name, AttentionVariant):
        return name
    variant = _REGISTRY.get(name)
    if variant is None and isinstance(name, str):
        for entry_point in _entry_points():
            if entry_point.name == name:
                _load_entry_point(entry_point)
        variant = _REGISTRY.get(name)
    if variant is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        broken = _BROKEN.get(name)
        why = f"its plugin failed to load ({broken}); " if broken else ""
        raise UnknownAttentionError(
            f"unknown attention variant {name!r}; {why}registered variants: {known}"
        )
    return variant


def available_attention() -> dict[str, AttentionVariant]:
    """Every registered variant by name, in name order (discovered plugins loaded first)."""
    for entry_point in _entry_points():
        if entry_point.name not in _REGISTRY:
            _load_entry_point(entry_point)
    return dict(sorted(_REGISTRY.items()))


# --- loading plugins ------------------------------------------------------------------

_LOADED: dict[str, list[str]] = {}  # plugin key -> the variant names it registered
_BROKEN: dict[str, str] = {}  # entry-point name -> why it was skipped


def registered_names() -> list[str]:
    """Names registered so far (built-ins, loaded plugins), in name order; unlike
    :func:`available_attention` this imports no installed plugin."""
    return sorted(_REGISTRY)


def installed_plugins() -> dict[str, str]:
    """The installed plugin packages' variant names -> where they come from ("dist version,
    module:attr"), read from their entry-point metadata alone: nothing is imported. A
    variant's code runs only when it is used (:func:`get_attention`) or listed in full
    (:func:`available_attention`). Empty when TINYTX_DISABLE_PLUGIN_AUTOLOAD is set."""
    found = {}
    for entry_point in _entry_points():
        dist = getattr(entry_point, "dist", None)
        origin = f"{dist.name} {dist.version}, " if dist is not None else ""
        found[entry_point.name] = f"{origin}{entry_point.value}"
    return dict(sorted(found.items()))


def broken_plugins() -> dict[str, str]:
    """Discovered entry points that failed to load and were skipped: name -> reason."""
    return dict(_BROKEN)


def _load_guarded(label: str, do_import: Callable[[], Any]) -> list[str]:
    """Run ``do_import`` with ``label`` as the source of what it registers.

    On any failure the registry is restored to what it was (a half-loaded plugin leaves
    nothing behind) and a :class:`PluginError` naming the plugin is raised.
    Returns the names the plugin registered.
    """
    before = dict(_REGISTRY)
    token = _LOADING.set(label)
    try:
        do_import()
    except BaseException as err:
        _REGISTRY.clear()
        _REGISTRY.update(before)
        if isinstance(err, KeyboardInterrupt):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise PluginError(
            f"plugin {label} failed to load: {type(err).__name__}: {message}"
        ) from err
    finally:
        _LOADING.reset(token)
    return sorted(n for n in _REGISTRY if _REGISTRY[n] is not before.get(n))


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec or Path(spec).is_dir()


def load_plugin(path_or_module: str | os.PathLike[str]) -> list[str]:
    """Load a plugin: a Python file (``my_attention.py``), a folder holding an
    ``__init__.py``, or an importable module (``my_package.attention``).

    Importing it runs its ``@register_attention`` decorators. Returns the names of the
    variants it registered. Loading the same plugin twice does nothing the second time.
    Anything that goes wrong (missing file, an exception at import, a duplicate name)
    raises :class:`PluginError` naming the plugin, and the registry is left as it was.
    """
    if not isinstance(path_or_module, (str, os.PathLike)):
        raise PluginError(
            f"plugin: expected a file path or module name (str or path), got "
            f"{type(path_or_module).__name__} {path_or_module!r}"
        )
    spec = os.fspath(path_or_module)
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"plugin: expected a file path or module name, got {spec!r}")
    if _looks_like_path(spec):
        path = Path(spec).expanduser().resolve()
        key = str(path)
        if key in _LOADED:
            return list(_LOADED[key])
        if path.is_dir():
            path = path / "__init__.py"
        if not path.is_file():
            raise PluginError(f"plugin {spec!r} failed to load: no such file {str(path)!r}")
        names = _load_guarded(repr(spec), lambda: _import_file(path))
    else:
        key = spec
        if key in _LOADED:
            return list(_LOADED[key])
        if importlib.util.find_spec(spec.split(".")[0]) is None:
            raise PluginError(f"plugin {spec!r} failed to load: no module named {spec!r}")
        names = _load_guarded(repr(spec), lambda: importlib.import_module(spec))
    _LOADED[key] = names
    return list(names)


def _import_file(path: Path) -> None:
    """Import the Python file at ``path`` as a module of its own."""
    stem = path.parent.name if path.name == "__init__.py" else path.stem
    module_name = f"tinytx_plugin_{stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise


def _autoload_disabled() -> bool:
    return os.environ.get("TINYTX_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0")


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of group ``tinytx.attention`` (none when disabled)."""
    if _autoload_disabled():
        return []
    try:
        return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as err:  # a corrupt installed distribution must not break tinytx
        warnings.warn(
            f"tinytx: cannot list attention plugins ({type(err).__name__}: {err})",
            PluginWarning,
            stacklevel=3,
        )
        return []


def _load_entry_point(entry_point: importlib.metadata.EntryPoint) -> None:
    """Load one discovered plugin; a broken one warns and is skipped (remembered as such)."""
    name = entry_point.name
    if name in _BROKEN or entry_point.value in _LOADED:
        return
    dist = getattr(entry_point, "dist", None)
    origin = f"{dist.name} {dist.version}, " if dist is not None else ""
    label = f"{origin}entry point {name} = {entry_point.value}"
    try:
        names = _load_guarded(label, entry_point.load)
        if name not in _REGISTRY:
            raise PluginError(
                f"plugin {label} loaded but registered no attention variant named {name!r} "
                f"(it registered: {', '.join(names) or 'nothing'})"
            )
    except PluginError as err:
        _BROKEN[name] = str(err)
        warnings.warn(f"tinytx: skipping {err}", PluginWarning, stacklevel=4)
        return
    _LOADED[entry_point.value] = names
