"""The attention registry: name -> variant.

Every variant follows one contract (see ``../shared/design.md``)::

    fn(q, k, v, *, mask=None, causal=False, scale=None, **options) -> (output, weights | None)

    q: (batch, heads, seq_q, d); k, v: (batch, heads_kv or heads, seq_k, d / d_v)
    output: (batch, heads, seq_q, d_v); weights: (batch, heads, seq_q, seq_k) or None
    mask: boolean, True where attention is allowed, broadcastable to (batch, heads, seq_q, seq_k)

A variant declares what it promises (:class:`Promises`); the conformance kit in
:mod:`tinytx.testing` holds it to exactly that. A variant that cannot honour ``mask`` or
``causal`` must refuse it: :class:`AttentionVariant` does so for it, loudly, when it does
not declare support, so a mask is never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AttentionError",
    "AttentionVariant",
    "Option",
    "Promises",
    "UnknownAttentionError",
    "available_attention",
    "get_attention",
    "register_attention",
    "unregister_attention",
]


class AttentionError(ValueError):
    """A variant was misused or misbehaved; the message names the variant."""


class UnknownAttentionError(AttentionError, KeyError):
    """No variant of that name is registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


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

    Calling it validates the options, refuses a mask or causal flag it cannot honour, and
    checks the shape and dtype of what the function returns.
    """

    name: str
    fn: Callable[..., tuple[Any, Any]]
    description: str = ""
    paper: str = ""
    promises: Promises = field(default_factory=Promises)
    options: Mapping[str, Option] = field(default_factory=dict)

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in, unknown names and invalid values rejected."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise AttentionError(
                f"attention {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options: {known}"
            )
        resolved = {}
        for name, spec in self.options.items():
            value = given.get(name, spec.default)
            resolved[name] = spec.validate(self.name, name, value)
        return resolved

    def __call__(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        mask: Any = None,
        causal: bool = False,
        scale: float | None = None,
        **options: Any,
    ) -> tuple[Any, Any]:
        from tinytx.functional import check_attention_inputs

        check_attention_inputs(q, k, v, mask)
        if mask is not None and not self.promises.supports_mask:
            raise AttentionError(
                f"attention {self.name!r} does not support a mask; choose a variant that does "
                f"(e.g. 'softmax')"
            )
        if causal and not self.promises.supports_causal:
            raise AttentionError(
                f"attention {self.name!r} does not support causal=True; choose a variant that "
                f"does (e.g. 'softmax')"
            )
        resolved = self.resolve_options(options)
        try:
            result = self.fn(q, k, v, mask=mask, causal=causal, scale=scale, **resolved)
        except AttentionError:
            raise
        except Exception as err:
            raise AttentionError(
                f"attention {self.name!r} raised {type(err).__name__}: {err}"
            ) from err
        return self._checked(result, q, v)

    def _checked(self, result: Any, q: Any, v: Any) -> tuple[Any, Any]:
        """Check that the variant returned (output, weights) of the contract's shapes."""
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AttentionError(
                f"attention {self.name!r} must return (output, weights or None), "
                f"got {type(result).__name__}"
            )
        output, weights = result
        batch, heads, seq_q, _ = q.shape
        expected = (batch, heads, seq_q, v.shape[-1])
        if tuple(getattr(output, "shape", ())) != expected:
            got = tuple(getattr(output, "shape", ()))
            raise AttentionError(
                f"attention {self.name!r} returned output of shape {got}; expected {expected} "
                "(batch, heads, seq_q, d_v)"
            )
        if output.dtype != q.dtype:
            raise AttentionError(
                f"attention {self.name!r} returned dtype {output.dtype} for {q.dtype} inputs"
            )
        if weights is not None:
            w_expected = (batch, heads, seq_q, v.shape[2])
            if tuple(weights.shape) != w_expected:
                raise AttentionError(
                    f"attention {self.name!r} returned weights of shape {tuple(weights.shape)}; "
                    f"expected {w_expected} (batch, heads, seq_q, seq_k)"
                )
        return output, weights


_REGISTRY: dict[str, AttentionVariant] = {}


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
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register an attention function under ``name``.

    Promise only what the function does: the conformance kit tests every promise, and
    holds a variant that promises nothing to the properties any attention must have.

    >>> @register_attention("mine", description="softmax with a temperature",
    ...                     normalized=True, supports_mask=True, supports_causal=True,
    ...                     options={"temperature": Option(float, 1.0)})
    ... def mine(q, k, v, *, mask=None, causal=False, scale=None, temperature=1.0): ...

    A second registration of the same name is an error unless ``replace=True``.
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
        _REGISTRY[name] = AttentionVariant(
            name=name,
            fn=fn,
            description=description or (doc[0] if doc else ""),
            paper=paper,
            promises=promises,
            options=dict(options or {}),
        )
        return fn

    return decorate


def unregister_attention(name: str) -> None:
    """Remove a variant (tests and notebooks use this to clean up)."""
    _REGISTRY.pop(name, None)


def get_attention(name: str | AttentionVariant) -> AttentionVariant:
    """The variant registered as ``name``; an unknown name lists the registered ones."""
    if isinstance(name, AttentionVariant):
        return name
    variant = _REGISTRY.get(name)
    if variant is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownAttentionError(
            f"unknown attention variant {name!r}; registered variants: {known}"
        )
    return variant


def available_attention() -> dict[str, AttentionVariant]:
    """Every registered variant by name, in name order."""
    return dict(sorted(_REGISTRY.items()))
