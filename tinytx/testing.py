"""The conformance kit: test any attention variant, yours included.

    from tinytx.testing import check_attention
    report = check_attention("my_variant", backend="numpy")
    print(report.table())            # property, result, counter-example
    report.assert_passed()           # in a test: fails with the table

:func:`check_attention` runs each property below with hypothesis on random small inputs.
A property that fails is reported with hypothesis's shrunk counter-example, an
:class:`AttentionCase` whose ``repr`` rebuilds the failing inputs (they come from a seed).

Properties every variant is held to (they depend on no promise):
    shape_dtype           output (batch, heads, seq_q, d_v) in the inputs' dtype; weights
                          (batch, heads, seq_q, seq_k) or None (never None if promised)
    finite_at_1e4         outputs (and weights) stay finite for logits of order +-1e4
    batch_independence    changing one sequence of the batch changes no other's output
    head_independence     changing one head's q, k, v changes no other head's output
    backend_agreement     the same inputs give the same outputs on every available backend
Held to whatever the variant declares, as soon as it *accepts* the argument:
    causal_no_leak        with causal=True, changing tokens after position t changes no
                          output (and no weight) at positions <= t
    padding_invariance    a sequence padded at the end under a key-padding mask gives its
                          real tokens the outputs it gives unpadded; with no real token, zeros
A variant that refuses ``causal=True`` or a mask loudly (raises) is skipped there: that
is the honest answer. One that accepts them is tested, whatever it declared.
Promised properties (skipped when not promised):
    normalized            weights >= 0 and every row sums to 1 (0 for a fully masked row);
                          checked on the returned weights and, with V = identity, on the
                          weights the output was really made with
    permutation_equivariance  permuting queries permutes the output rows; permuting the
                          keys and values together changes nothing (no mask, no positions)
    exact_softmax         equal to softmax attention (tinytx.functional) within tolerance
The backward, when the variant registered one (else skipped: "no backward"):
    backward              in float64, <dL/dx, u> against central differences
                          (L(x + h u) - L(x - h u)) / 2h for random directions u of q, k
                          and v, L = sum(G * output) with a random cotangent G: relative
                          error at most 1e-6 (beyond the rounding error of L, which the
                          kit bounds); with the masks, causal flag and grouped-query
                          heads the variant accepts; exact variants also give softmax
                          attention's gradients, in float64 and float32

Host-side code: it draws inputs with NumPy and moves them with ``backend.asarray``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - the test extra is missing
    raise ImportError(
        "tinytx.testing needs hypothesis: pip install 'tinytx[test]' (or pip install hypothesis)"
    ) from err

from tinytx.backends import Backend, available_backends, get_backend
from tinytx.plugins.registry import (
    AttentionError,
    AttentionVariant,
    Promises,
    get_attention,
)

__all__ = [
    "PROPERTIES",
    "AttentionCase",
    "AttentionShape",
    "ConformanceReport",
    "PropertyResult",
    "attention_cases",
    "check_attention",
    "masks",
    "qkv",
    "shapes",
]

PROPERTIES = (
    "shape_dtype",
    "finite_at_1e4",
    "batch_independence",
    "head_independence",
    "normalized",
    "permutation_equivariance",
    "causal_no_leak",
    "padding_invariance",
    "exact_softmax",
    "backend_agreement",
    "backward",
)

# --- inputs: shapes, cases, strategies --------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one attention call: q (batch, heads, seq_q, d), k (batch, heads_kv,
    seq_k, d), v (batch, heads_kv, seq_k, d_v)."""

    batch: int = 1
    heads: int = 1
    seq_q: int = 1
    seq_k: int = 1
    d: int = 1
    d_v: int = 1
    heads_kv: int = 0  # 0: as many as heads

    @property
    def kv_heads(self) -> int:
        return self.heads_kv or self.heads


def shapes(
    *,
    max_batch: int = 3,
    max_heads: int = 3,
    max_seq: int = 7,
    max_d: int = 4,
    min_batch: int = 1,
    min_heads: int = 1,
    min_seq: int = 1,
    self_attention: bool = False,
    queries_within_keys: bool = False,
    grouped: bool = True,
) -> st.SearchStrategy[AttentionShape]:
    """Strategy for :class:`AttentionShape`. ``self_attention``: seq_q == seq_k;
    ``queries_within_keys``: seq_q <= seq_k (the queries are the last seq_q positions,
    so each has a position among the keys); ``grouped``: heads_kv may be any divisor of
    heads (grouped-query attention)."""

    @st.composite
    def build(draw: Callable[..., Any]) -> AttentionShape:
        heads = draw(st.integers(min_heads, max_heads))
        seq_k = draw(st.integers(min_seq, max_seq))
        top = seq_k if queries_within_keys else max_seq
        seq_q = seq_k if self_attention else draw(st.integers(min(min_seq, top), top))
        divisors = [h for h in range(1, heads + 1) if heads % h == 0]
        heads_kv = draw(st.sampled_from(divisors)) if grouped else heads
        return AttentionShape(
            batch=draw(st.integers(min_batch, max_batch)),
            heads=heads,
            seq_q=seq_q,
            seq_k=seq_k,
            d=draw(st.integers(1, max_d)),
            d_v=draw(st.integers(1, max_d)),
            heads_kv=0 if heads_kv == heads else heads_kv,
        )

    return build()


@dataclass(frozen=True)
class AttentionCase:
    """One set of attention inputs, rebuilt exactly from its fields (the arrays come from
    ``seed``), so a counter-example's ``repr`` is enough to reproduce it.

    mask: None; "padding" (key padding from ``lengths``: (batch, 1, 1, seq_k)); or
    "random" (a random (batch, 1, seq_q, seq_k) mask, about 30% of entries masked).
    magnitude multiplies q: 1e4 makes logits of order 1e4. ``extra`` holds what a
    property drew besides (the position t, the perturbed head...).
    """

    shape: AttentionShape
    dtype: str = "float32"
    seed: int = 0
    magnitude: float = 1.0
    causal: bool = False
    mask: str | None = None
    lengths: tuple[int, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def host(self) -> dict[str, np.ndarray | None]:
        """The inputs as NumPy arrays: q, k, v and mask (None when there is none)."""
        s = self.shape
        rng = np.random.default_rng(self.seed)
        q = rng.standard_normal((s.batch, s.heads, s.seq_q, s.d)) * self.magnitude
        k = rng.standard_normal((s.batch, s.kv_heads, s.seq_k, s.d))
        v = rng.standard_normal((s.batch, s.kv_heads, s.seq_k, s.d_v))
        mask = None
        if self.mask == "padding":
            lengths = np.asarray(self.lengths, dtype=np.int64)  # (batch,)
            mask = (np.arange(s.seq_k)[None, :] < lengths[:, None])[:, None, None, :]
        elif self.mask == "random":
            mask = rng.random((s.batch, 1, s.seq_q, s.seq_k)) > 0.3
        dtype = np.dtype(self.dtype)
        return {"q": q.astype(dtype), "k": k.astype(dtype), "v": v.astype(dtype), "mask": mask}

    def on(self, backend: str | Backend) -> tuple[Any, Any, Any, Any]:
        """(q, k, v, mask) on ``backend``."""
        return _to_backend(get_backend(backend), self.host())

    def __repr__(self) -> str:
        s = self.shape
        parts = [
            f"shape=AttentionShape(batch={s.batch}, heads={s.heads}, seq_q={s.seq_q}, "
            f"seq_k={s.seq_k}, d={s.d}, d_v={s.d_v}, heads_kv={s.heads_kv})",
            f"dtype={self.dtype!r}",
            f"seed={self.seed}",
        ]
        if self.magnitude != 1.0:
            parts.append(f"magnitude={self.magnitude:g}")
        if self.causal:
            parts.append("causal=True")
        if self.mask is not None:
            parts.append(f"mask={self.mask!r}")
        if self.lengths is not None:
            parts.append(f"lengths={self.lengths}")
        if self.extra:
            parts.append(f"extra={dict(self.extra)}")
        return f"AttentionCase({', '.join(parts)})"


def _to_backend(backend: Backend, host: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    q, k, v = (backend.asarray(host[n]) for n in ("q", "k", "v"))
    mask = host.get("mask")
    return q, k, v, None if mask is None else backend.asarray(np.asarray(mask, dtype=bool))


def attention_cases(
    *,
    shape: st.SearchStrategy[AttentionShape] | None = None,
    dtypes: Sequence[str] = ("float32", "float64"),
    causal: bool | None = False,
    mask: Sequence[str | None] = (None,),
    magnitudes: Sequence[float] = (1.0,),
) -> st.SearchStrategy[AttentionCase]:
    """Strategy for :class:`AttentionCase`. ``causal``: True, False, or None for either;
    ``mask``: the mask kinds to draw from (None, "padding", "random")."""

    @st.composite
    def build(draw: Callable[..., Any]) -> AttentionCase:
        s = draw(shape if shape is not None else shapes())
        kind = draw(st.sampled_from(list(mask)))
        lengths = None
        if kind == "padding":
            lengths = tuple(
                draw(st.lists(st.integers(0, s.seq_k), min_size=s.batch, max_size=s.batch))
            )
        return AttentionCase(
            shape=s,
            dtype=draw(st.sampled_from(list(dtypes))),
            seed=draw(st.integers(0, 2**16)),
            magnitude=draw(st.sampled_from(list(magnitudes))),
            causal=draw(st.booleans()) if causal is None else causal,
            mask=kind,
            lengths=lengths,
        )

    return build()


def qkv(
    shape: AttentionShape | st.SearchStrategy[AttentionShape] | None = None,
    *,
    backend: str | Backend = "numpy",
    dtype: str = "float32",
) -> st.SearchStrategy[tuple[Any, Any, Any]]:
    """Strategy for (q, k, v) arrays on ``backend`` (standard normal values)."""
    shape_st = shape if isinstance(shape, st.SearchStrategy) else st.just(shape or AttentionShape())
    chosen = get_backend(backend)

    def make(s: AttentionShape, seed: int) -> tuple[Any, Any, Any]:
        q, k, v, _ = _to_backend(chosen, AttentionCase(s, dtype=dtype, seed=seed).host())
        return q, k, v

    return st.builds(make, shape_st, st.integers(0, 2**16))


def masks(
    shape: AttentionShape | st.SearchStrategy[AttentionShape] | None = None,
    *,
    backend: str | Backend = "numpy",
    kind: str = "random",
) -> st.SearchStrategy[Any]:
    """Strategy for boolean masks on ``backend`` (True = attend): ``kind="padding"``
    gives (batch, 1, 1, seq_k) key-padding masks, ``"random"`` (batch, 1, seq_q, seq_k)."""
    if kind not in ("padding", "random"):
        raise ValueError(f"masks: kind must be 'padding' or 'random', got {kind!r}")
    shape_st = shape if isinstance(shape, st.SearchStrategy) else st.just(shape or AttentionShape())
    chosen = get_backend(backend)
    cases = attention_cases(shape=shape_st, dtypes=("float32",), mask=(kind,))
    return cases.map(lambda case: _to_backend(chosen, case.host())[3])


# --- the variant under test -------------------------------------------------------------


@dataclass
class _Subject:
    """What the kit calls: a registered variant (with its options) or a plain function."""

    variant: AttentionVariant
    options: dict[str, Any]
    raw: bool  # a plain function: called directly, so nothing refuses on its behalf

    @property
    def promises(self) -> Promises:
        return self.variant.promises

    def backward(
        self, grad_out: Any, q: Any, k: Any, v: Any, out: Any, weights: Any, mask: Any, causal: bool
    ) -> tuple[Any, Any, Any]:
        """The variant's registered backward: (dq, dk, dv) of q's, k's and v's shapes."""
        return self.variant.backward(
            grad_out, q, k, v, out, weights, mask=mask, causal=causal, **self.options
        )

    def __call__(self, q: Any, k: Any, v: Any, mask: Any = None, causal: bool = False) -> Any:
        if not self.raw:
            return self.variant(q, k, v, mask=mask, causal=causal, **self.options)
        from tinytx.functional import check_attention_inputs, repeat_kv

        check_attention_inputs(q, k, v, mask)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (b, h, seq_k, d or d_v)
        kwargs = {"mask": mask, "causal": causal, **self.options}
        try:
            result = self.variant.fn(q, k, v, **kwargs)
        except AttentionError:
            raise
        except Exception as err:
            raise AttentionError(
                f"attention {self.variant.name!r} raised {type(err).__name__}: {err}"
            ) from err
        return self.variant._checked(result, q, v)


def _subject(
    name_or_fn: str | AttentionVariant | Callable[..., Any],
    options: Mapping[str, Any] | None,
    promises: Promises | None,
) -> _Subject:
    if isinstance(name_or_fn, (str, AttentionVariant)):
        if promises is not None:
            raise ValueError("check_attention: promises= is for a plain function only")
        variant = get_attention(name_or_fn)
        return _Subject(variant, variant.resolve_options(options or {}), raw=False)
    if not callable(name_or_fn):
        raise TypeError(
            f"check_attention: expected a name, a variant or a function, got {name_or_fn!r}"
        )
    name = getattr(name_or_fn, "__name__", type(name_or_fn).__name__)
    variant = AttentionVariant(name, name_or_fn, promises=promises or Promises(), source="function")
    return _Subject(variant, dict(options or {}), raw=True)


# --- comparisons ------------------------------------------------------------------------


def _tolerance(dtype: Any) -> tuple[float, float]:
    """(rtol, atol) for comparing two computations of the same numbers."""
    return (1e-4, 2e-5) if np.dtype(dtype) == np.float32 else (1e-9, 1e-11)


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    rtol, atol = _tolerance(want.dtype)
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    bad = ~np.isclose(got64, want64, rtol=rtol, atol=atol)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        gaps = np.abs(got64 - want64)  # NaN where either side is NaN
        diff = float(np.max(gaps[~np.isnan(gaps)])) if not np.all(np.isnan(gaps)) else math.nan
        raise AssertionError(
            f"{what}: max |difference| {diff:.3g} (tolerance {atol:g} + {rtol:g} x |value|); "
            f"first at index {where}: {got64[where]:.6g} vs {want64[where]:.6g}"
        )


def _allowed_host(case: AttentionCase, host: Mapping[str, Any]) -> np.ndarray:
    """(batch, heads, seq_q, seq_k) boolean: which keys each query may attend to."""
    s = case.shape
    allowed = np.ones((s.batch, s.heads, s.seq_q, s.seq_k), dtype=bool)
    if host["mask"] is not None:
        allowed &= host["mask"]
    if case.causal:
        allowed &= np.tril(np.ones((s.seq_q, s.seq_k), dtype=bool), k=s.seq_k - s.seq_q)
    return allowed


# --- the properties ---------------------------------------------------------------------
# Each takes (subject, backend, case), raises AssertionError (or the variant's error) when
# the property does not hold, and has a strategy builder that knows which of mask and
# causal the subject accepts.


def _run(subject: _Subject, backend: Backend, host: Mapping[str, Any], causal: bool) -> Any:
    q, k, v, mask = _to_backend(backend, host)
    out, weights = subject(q, k, v, mask=mask, causal=causal)
    return backend.to_numpy(out), None if weights is None else backend.to_numpy(weights)


def _prop_shape_dtype(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
    q, k, v, mask = case.on(backend)
    out, weights = subject(q, k, v, mask=mask, causal=case.causal)
    s = case.shape
    if tuple(out.shape) != (s.batch, s.heads, s.seq_q, s.d_v):
        raise AssertionError(
            f"output shape {tuple(out.shape)}; expected {(s.batch, s.heads, s.seq_q, s.d_v)}"
        )
    if out.dtype != q.dtype:
        raise AssertionError(f"output dtype {out.dtype} for {q.dtype} inputs")
    if weights is None and subject.promises.returns_weights:
        raise AssertionError("promises returns_weights but returned None")
    if weights is not None and tuple(weights.shape) != (s.batch, s.heads, s.seq_q, s.seq_k):
        raise AssertionError(f"weights shape {tuple(weights.shape)}")


def _prop_finite(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
    out, weights = _run(subject, backend, case.host(), case.causal)
    for what, a in (("output", out), ("weights", weights)):
        if a is not None and not np.all(np.isfinite(a)):
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            raise AssertionError(f"{what} not finite at index {where}: {a[where]}")


def _prop_independence(axis: int) -> Callable[[_Subject, Backend, AttentionCase], None]:
    what = "batch element" if axis == 0 else "head"

    def check(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
        host = case.host()
        changed = case.extra["changed"]
        other = dict(host)
        rng = np.random.default_rng(case.seed + 1)
        for name in ("q", "k", "v"):
            a = host[name].copy()
            index = (changed,) if axis == 0 else (slice(None), changed)
            a[index] = rng.standard_normal(a[index].shape).astype(a.dtype)
            other[name] = a
        out, w = _run(subject, backend, host, case.causal)
        out2, w2 = _run(subject, backend, other, case.causal)
        keep = [i for i in range(out.shape[axis]) if i != changed]
        take = (lambda a: a[keep]) if axis == 0 else (lambda a: a[:, keep])
        _assert_close(
            take(out2), take(out), f"changing {what} {changed} changed the output of another {what}"
        )
        if w is not None and w2 is not None:
            _assert_close(
                take(w2), take(w), f"changing {what} {changed} changed another {what}'s weights"
            )

    return check


def _extract_weights(subject: _Subject, backend: Backend, case: AttentionCase, host: dict) -> Any:
    """The weights the output is made with: the output for V = identity (d_v = seq_k)."""
    s = case.shape
    eye = np.broadcast_to(
        np.eye(s.seq_k, dtype=host["q"].dtype), (s.batch, s.kv_heads, s.seq_k, s.seq_k)
    )
    out, _ = _run(subject, backend, {**host, "v": np.ascontiguousarray(eye)}, case.causal)
    return out  # (batch, heads, seq_q, seq_k)


def _check_rows(w: np.ndarray, allowed: np.ndarray, free: np.ndarray, what: str) -> None:
    """w >= 0, 0 on masked keys, rows summing to 1 (0 when fully masked); a row marked
    in ``free`` (a padding query) may also be left empty by the variant's own rules."""
    rtol, atol = _tolerance(w.dtype)
    if np.any(w < -atol):
        where = tuple(int(i) for i in np.argwhere(w < -atol)[0])
        raise AssertionError(f"{what}: negative weight {w[where]:.3g} at index {where}")
    if np.any(np.abs(np.where(allowed, 0.0, w)) > atol):
        where = tuple(int(i) for i in np.argwhere(np.abs(np.where(allowed, 0.0, w)) > atol)[0])
        raise AssertionError(f"{what}: weight {w[where]:.3g} on a masked key at index {where}")
    sums = np.sum(w.astype(np.float64), axis=-1)  # (batch, heads, seq_q)
    want = np.any(allowed, axis=-1).astype(np.float64)  # 1, or 0 for a fully masked row
    want = np.where(free & (np.abs(sums) <= atol), 0.0, want)  # an empty padding row is fine
    _assert_close(
        sums.astype(w.dtype),
        want.astype(w.dtype),
        f"{what}: row sums (expected 1, 0 if fully masked)",
    )


def _padding_queries(case: AttentionCase) -> np.ndarray:
    """(batch, 1, seq_q) boolean: queries at padding positions (position >= length).
    A variant with rules of its own (a window) may leave their rows empty."""
    s = case.shape
    positions = np.arange(s.seq_k - s.seq_q, s.seq_k)  # (seq_q,) the queries' positions
    if case.lengths is None:
        return np.zeros((s.batch, 1, s.seq_q), dtype=bool)
    lengths = np.asarray(case.lengths)[:, None, None]  # (batch, 1, 1)
    return positions[None, None, :] >= lengths  # (batch, 1, seq_q)


def _prop_normalized(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
    host = case.host()
    allowed = _allowed_host(case, host)
    free = _padding_queries(case)
    _, weights = _run(subject, backend, host, case.causal)
    if weights is not None:
        _check_rows(weights, allowed, free, "returned weights")
    used = _extract_weights(subject, backend, case, host)
    _check_rows(used, allowed, free, "weights used (output for V = I)")


def _prop_permutation(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
    host = case.host()
    rng = np.random.default_rng(case.seed + 1)
    p_q = rng.permutation(case.shape.seq_q)  # a new order of the queries
    p_k = rng.permutation(case.shape.seq_k)  # and of the keys (with their values)
    permuted = {
        "q": host["q"][:, :, p_q],
        "k": host["k"][:, :, p_k],
        "v": host["v"][:, :, p_k],
        "mask": None,
    }
    out, w = _run(subject, backend, host, False)
    out2, w2 = _run(subject, backend, permuted, False)
    _assert_close(
        out2, out[:, :, p_q], "permuting queries and keys did not permute the output the same way"
    )
    if w is not None and w2 is not None:
        _assert_close(w2, w[:, :, p_q][..., p_k], "the weights were not permuted the same way")


def _prop_causal(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
    host = case.host()
    t = case.extra["t"]
    rng = np.random.default_rng(case.seed + 1)
    future = {**host}
    for name in ("q", "k", "v"):
        a = host[name].copy()
        a[:, :, t + 1 :] = 3.0 * rng.standard_normal(a[:, :, t + 1 :].shape).astype(a.dtype)
        future[name] = a
    out, w = _run(subject, backend, host, True)
    out2, _ = _run(subject, backend, future, True)
    leak = f"causal=True, yet changing the tokens after position {t} changed an output at <= {t}"
    _assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], leak)
    if w is not None:
        later = np.triu(np.ones(w.shape[-2:], dtype=bool), k=1)  # key j after query i
        leaked = np.abs(np.where(later, w, 0.0)) > _tolerance(w.dtype)[1]
        if np.any(leaked):
            where = tuple(int(x) for x in np.argwhere(leaked)[0])
            raise AssertionError(
                f"causal=True, yet query {where[2]} gives weight {w[where]:.3g} to the later "
                f"key {where[3]} (index {where})"
            )


def _prop_padding(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
    host = case.host()  # q, k, v of seq tokens; mask keeps the first lengths[b] keys
    padded_out, _ = _run(subject, backend, host, case.causal)
    for b, n in enumerate(case.lengths or ()):
        if n == 0:
            if not np.all(padded_out[b] == 0):
                raise AssertionError(
                    f"sequence {b} has no real token (every key masked), yet its output is not 0: "
                    f"{padded_out[b].ravel()[:4]}..."
                )
            continue
        alone = {name: host[name][b : b + 1, :, :n] for name in ("q", "k", "v")}
        alone_out, _ = _run(subject, backend, {**alone, "mask": None}, case.causal)
        _assert_close(
            padded_out[b : b + 1, :, :n],
            alone_out,
            f"sequence {b} ({n} real tokens) padded to {case.shape.seq_k} under the mask gives "
            "other outputs for its real tokens than unpadded",
        )


def _prop_exact(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
    from tinytx.functional import scaled_dot_product_attention

    q, k, v, mask = case.on(backend)
    out, weights = subject(q, k, v, mask=mask, causal=case.causal)
    ref_out, ref_w = scaled_dot_product_attention(q, k, v, mask=mask, causal=case.causal)
    _assert_close(
        backend.to_numpy(out), backend.to_numpy(ref_out), "output differs from softmax attention"
    )
    if weights is not None:
        _assert_close(
            backend.to_numpy(weights), backend.to_numpy(ref_w), "weights differ from softmax"
        )


def _prop_backends(subject: _Subject, backend: Backend, case: AttentionCase) -> None:
    host = case.host()
    out, w = _run(subject, backend, host, case.causal)
    for other in _other_backends(backend):
        out2, w2 = _run(subject, other, host, case.causal)
        _assert_close(out, out2, f"output on {backend.name} differs from {other.name}")
        if w is not None and w2 is not None:
            _assert_close(w, w2, f"weights on {backend.name} differ from {other.name}")


# The backward's check. Inputs are of order 1; central differences with steps h and h/2
# combined (Richardson: (4 D(h/2) - D(h)) / 3) leave a truncation error of order h^4
# times a fifth derivative, small even where one is large (cosine attention of a short
# query: 1/|q|^5); the rounding error of L divided by h stays ~1e-11 relative.
_FD_STEP = 1e-5
_FD_RTOL = 1e-6


def _loss(out: np.ndarray, grad_out: np.ndarray) -> float:
    """L = sum(G * output), summed exactly (math.fsum): its only rounding is the forward's."""
    return math.fsum((grad_out * out).ravel().tolist())


def _prop_backward(subject: _Subject, backend: Backend, case: AttentionCase) -> float:
    """The backward against central differences of L = sum(G * output) in float64, one
    random direction per input; returns the worst relative error. Exact variants must
    also give softmax attention's gradients (float64 and float32)."""
    host = case.host()  # float64
    q, k, v, mask = _to_backend(backend, host)
    out, weights = subject(q, k, v, mask=mask, causal=case.causal)
    rng = np.random.default_rng(case.seed + 2)
    g = rng.standard_normal(tuple(out.shape))  # (batch, heads, seq_q, d_v) the cotangent G
    grads = subject.backward(backend.asarray(g), q, k, v, out, weights, mask, case.causal)
    s = case.shape
    # Rounding bound of L: each output is made with dot products of d and seq_k terms and
    # a few element-wise steps, each at most eps relative, so |error of L| <= n eps sum|G o|.
    steps = 2 * (s.d + s.seq_k) + 16
    size_of_loss = float(np.sum(np.abs(g * backend.to_numpy(out))))
    # That error divided by h, in D(h) and D(h/2), enters the extrapolation (4 D(h/2) - D(h)) / 3
    # at most (4 * 2 + 1) / 3 = 3 times.
    noise = 3 * steps * np.finfo(np.float64).eps * size_of_loss / _FD_STEP
    worst = 0.0
    for name, grad in zip(("q", "k", "v"), grads, strict=True):
        u = rng.standard_normal(host[name].shape)  # the direction

        def difference(h: float, name: str = name, u: np.ndarray = u) -> float:
            """(L(x + h u) - L(x - h u)) / 2h, x the input ``name``."""
            plus = {**host, name: host[name] + h * u}
            minus = {**host, name: host[name] - h * u}
            out_plus, _ = _run(subject, backend, plus, case.causal)
            out_minus, _ = _run(subject, backend, minus, case.causal)
            return (_loss(out_plus, g) - _loss(out_minus, g)) / (2 * h)

        numeric = (4 * difference(_FD_STEP / 2) - difference(_FD_STEP)) / 3
        analytic = float(np.sum(backend.to_numpy(grad) * u))
        error = abs(numeric - analytic)
        size = max(abs(numeric), abs(analytic))
        if error > _FD_RTOL * size + noise:
            relative = error / max(size, noise)
            raise AssertionError(  # short: the counter-example tells the rest
                f"d{name} != central differences: relative error {relative:.0e}"
            )
        if size > noise:  # a derivative below the rounding noise is 0 within rounding
            worst = max(worst, error / size)
    if subject.promises.exact:
        for dtype in ("float64", "float32"):
            _compare_with_softmax(subject, backend, dataclasses.replace(case, dtype=dtype), g)
    return worst


def _compare_with_softmax(
    subject: _Subject, backend: Backend, case: AttentionCase, g: np.ndarray
) -> None:
    """An exact variant's gradients equal softmax attention's within rounding."""
    from tinytx.functional import (
        scaled_dot_product_attention,
        scaled_dot_product_attention_backward,
    )

    q, k, v, mask = case.on(backend)
    grad_out = backend.asarray(g.astype(case.dtype))  # (batch, heads, seq_q, d_v)
    out, weights = subject(q, k, v, mask=mask, causal=case.causal)
    mine = subject.backward(grad_out, q, k, v, out, weights, mask, case.causal)
    _, ref_weights = scaled_dot_product_attention(q, k, v, mask=mask, causal=case.causal)
    ref = scaled_dot_product_attention_backward(grad_out, q, k, v, ref_weights)
    for name, got, want in zip(("dq", "dk", "dv"), mine, ref, strict=True):
        _assert_close(
            backend.to_numpy(got),
            backend.to_numpy(want),
            f"{name} ({case.dtype}) differs from softmax attention's",
        )


def _other_backends(backend: Backend) -> list[Backend]:
    return [
        get_backend(name)
        for name, status in available_backends().items()
        if status.available and name != backend.name
    ]


# --- which strategy each property draws from -------------------------------------------


@dataclass(frozen=True)
class _Accepts:
    """What the subject takes (declared, or found by trying), and a note on each."""

    mask: bool  # a key-padding mask (batch, 1, 1, seq_k)
    general_mask: bool  # any mask (batch, 1, seq_q, seq_k)
    causal: bool
    notes: dict[str, str]

    def mask_kinds(self, *kinds: str | None) -> tuple[str | None, ...]:
        """The mask kinds among ``kinds`` that the subject takes."""
        takes = {None: True, "padding": self.mask, "random": self.general_mask}
        return tuple(kind for kind in kinds if takes[kind])

    def causal_flag(self) -> bool | None:
        return None if self.causal else False


def _refusal(subject: _Subject, backend: Backend, case: AttentionCase) -> str:
    """'' when the subject takes the case's mask / causal flag, else its error message."""
    q, k, v, mask = case.on(backend)
    try:
        subject(q, k, v, mask=mask, causal=case.causal)
    except Exception as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ""


def _probe(subject: _Subject, backend: Backend) -> _Accepts:
    """Try tiny calls with a mask and with causal=True. Refusing loudly is allowed;
    accepting means being tested on it, whatever the variant declared."""
    shape = AttentionShape(1, 1, 2, 2, 2, 2)
    padding = AttentionCase(shape, mask="padding", lengths=(2,))
    general = AttentionCase(shape, mask="random")
    causal = AttentionCase(shape, causal=True)
    declared = subject.promises
    notes: dict[str, str] = {}
    takes = {}
    for what, case, arg, promised in (
        ("mask", padding, "a mask", declared.supports_mask),
        ("causal", causal, "causal=True", declared.supports_causal),
    ):
        refused = _refusal(subject, backend, case)
        takes[what] = promised or not refused
        if refused and not promised:
            notes[what] = f"refuses {arg}: {refused}"
        elif not refused and not promised:
            notes[what] = f"accepts {arg} without declaring it, so it is held to it"
    # Some variants honour key-padding masks only (linear attention) and refuse the rest.
    general_refused = _refusal(subject, backend, general) if takes["mask"] else "no masks"
    if takes["mask"] and general_refused:
        notes["general_mask"] = f"refuses (seq_q x seq_k) masks: {general_refused}"
    return _Accepts(takes["mask"], takes["mask"] and not general_refused, takes["causal"], notes)


def _with_extra(
    cases: st.SearchStrategy[AttentionCase], key: str, bound: Callable[[AttentionCase], int]
) -> Any:
    """Add ``extra[key]``, an integer in [0, bound(case)], to each drawn case."""

    @st.composite
    def build(draw: Callable[..., Any]) -> AttentionCase:
        case = draw(cases)
        value = draw(st.integers(0, bound(case)))
        return dataclasses.replace(case, extra={**case.extra, key: value})

    return build()


def _plan(
    subject: _Subject, backend: Backend, max_seq: int
) -> tuple[dict[str, tuple[Any, Any] | str], dict[str, str]]:
    """property -> (check, strategy), or the reason it is skipped; and a note for the
    properties a variant was held to without declaring them."""
    acc = _probe(subject, backend)
    promises = subject.promises
    any_mask = acc.mask_kinds(None, "padding", "random")
    plan: dict[str, tuple[Any, Any] | str] = {}
    plan["shape_dtype"] = (
        _prop_shape_dtype,
        attention_cases(shape=shapes(max_seq=max_seq), causal=acc.causal_flag(), mask=any_mask),
    )
    plan["finite_at_1e4"] = (
        _prop_finite,
        attention_cases(
            shape=shapes(max_seq=max_seq),
            causal=acc.causal_flag(),
            mask=any_mask,
            magnitudes=(1e4,),
        ),
    )
    plan["batch_independence"] = (
        _prop_independence(0),
        _with_extra(
            attention_cases(shape=shapes(min_batch=2, max_seq=max_seq), causal=acc.causal_flag()),
            "changed",
            lambda c: c.shape.batch - 1,
        ),
    )
    plan["head_independence"] = (
        _prop_independence(1),
        _with_extra(
            attention_cases(
                shape=shapes(min_heads=2, max_seq=max_seq, grouped=False),
                causal=acc.causal_flag(),
            ),
            "changed",
            lambda c: c.shape.heads - 1,
        ),
    )
    if promises.normalized:
        plan["normalized"] = (
            _prop_normalized,
            attention_cases(
                shape=shapes(max_seq=max_seq, queries_within_keys=True),
                causal=acc.causal_flag(),
                mask=acc.mask_kinds(None, "padding"),
                magnitudes=(1.0, 1e4),
            ),
        )
    else:
        plan["normalized"] = "not promised"
    if promises.permutation_equivariant:
        plan["permutation_equivariance"] = (
            _prop_permutation,
            attention_cases(shape=shapes(max_seq=max_seq)),
        )
    else:
        plan["permutation_equivariance"] = "not promised"
    if acc.causal:
        self_shapes = shapes(max_seq=max_seq, min_seq=2, self_attention=True)
        plan["causal_no_leak"] = (
            _prop_causal,
            _with_extra(
                attention_cases(
                    shape=self_shapes, causal=True, mask=acc.mask_kinds(None, "padding")
                ),
                "t",
                lambda c: c.shape.seq_q - 2,
            ),
        )
    else:
        plan["causal_no_leak"] = acc.notes["causal"]
    if acc.mask:
        plan["padding_invariance"] = (
            _prop_padding,
            attention_cases(
                shape=shapes(max_seq=max_seq, self_attention=True),
                causal=acc.causal_flag(),
                mask=("padding",),
            ),
        )
    else:
        plan["padding_invariance"] = acc.notes["mask"]
    if promises.exact:
        plan["exact_softmax"] = (
            _prop_exact,
            attention_cases(shape=shapes(max_seq=max_seq), causal=acc.causal_flag(), mask=any_mask),
        )
    else:
        plan["exact_softmax"] = "not promised"
    if _other_backends(backend):
        plan["backend_agreement"] = (
            _prop_backends,
            attention_cases(shape=shapes(max_seq=max_seq), causal=acc.causal_flag(), mask=any_mask),
        )
    else:
        plan["backend_agreement"] = "no other backend available"
    if subject.variant.has_backward:
        plan["backward"] = (
            _prop_backward,
            attention_cases(
                shape=shapes(max_seq=max_seq),
                dtypes=("float64",),
                causal=acc.causal_flag(),
                mask=any_mask,
            ),
        )
    else:
        plan["backward"] = "no backward"
    mask_notes = (acc.notes.get("mask", ""), acc.notes.get("general_mask", ""))
    notes = {
        "causal_no_leak": acc.notes.get("causal", ""),
        "padding_invariance": "; ".join(note for note in mask_notes if note),
    }
    return plan, notes


# --- the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class PropertyResult:
    """The outcome of one property: status "passed", "failed" or "skipped"; for a failure
    the message and hypothesis's shrunk counter-example; for a skip, why."""

    name: str
    status: str
    detail: str = ""
    counterexample: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class ConformanceReport:
    """What :func:`check_attention` found: property -> :class:`PropertyResult`."""

    variant: str
    backend: str
    results: dict[str, PropertyResult]
    options: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> PropertyResult:
        return self.results[name]

    def status(self) -> dict[str, str]:
        """property -> "passed" / "failed" / "skipped"."""
        return {name: r.status for name, r in self.results.items()}

    @property
    def passed(self) -> bool:
        """True when no property failed (skipped ones do not count against it)."""
        return not self.failed

    @property
    def failed(self) -> list[str]:
        return [name for name, r in self.results.items() if r.status == "failed"]

    @property
    def skipped(self) -> list[str]:
        return [name for name, r in self.results.items() if r.status == "skipped"]

    def rows(self) -> list[tuple[str, str, str]]:
        """(property, result, counter-example or note) for each property."""
        rows = []
        for name, r in self.results.items():
            if r.status == "failed":
                note = f"{r.detail}  counter-example: {r.counterexample}".strip()
            else:
                note = r.detail
            rows.append((name, r.status, note))
        return rows

    def table(self, width: int | None = None) -> str:
        """A plain-text table: property, result, counter-example (or why skipped); long
        notes wrap under their column to fit ``width`` (default: the terminal's, or 100)."""
        from tinytx.textfmt import output_width, wrap

        total = output_width() if width is None else width
        settings_ = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        head = f"attention {self.variant!r}" + (f" ({settings_})" if settings_ else "")
        head += f" on {self.backend}"
        width = max(len("property"), *(len(n) for n in self.results))
        indent = " " * (width + 11)  # where the note column starts
        lines = [wrap(head, total), f"{'property':<{width}}  {'result':<7}  counter-example / note"]
        lines.append("-" * len(lines[-1]))
        for name, r in self.results.items():
            lines.append(wrap(f"{name:<{width}}  {r.status:<7}  {r.detail}", total, indent))
            if r.counterexample:
                note = f"{indent}counter-example: {r.counterexample}"
                lines.append(wrap(note, total, indent))
        summary = "passed" if self.passed else f"FAILED: {', '.join(self.failed)}"
        tested = len(self.results) - len(self.skipped)
        lines.append(f"{tested} tested, {len(self.skipped)} skipped: {summary}")
        return "\n".join(lines)

    def failure_line(self) -> str:
        """One line on a failed check: ``attention 'x' failed 2 of 9 properties on numpy:
        finite, normalized`` (what ``tinytx check-plugin`` ends with)."""
        tested = len(self.results) - len(self.skipped)
        return (
            f"attention {self.variant!r} failed {len(self.failed)} of {tested} properties on "
            f"{self.backend}: " + ", ".join(self.failed)
        )

    def assert_passed(self) -> None:
        """Raise AssertionError with the table when a property failed (for use in tests)."""
        if not self.passed:
            raise AssertionError("\n" + self.table())

    def __str__(self) -> str:
        return self.table()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _run_property(
    check: Callable[[_Subject, Backend, AttentionCase], None],
    strategy: st.SearchStrategy[AttentionCase],
    subject: _Subject,
    backend: Backend,
    config: settings,
) -> tuple[str, str, float | None]:
    """Run one property under hypothesis: ("", "", worst) when it holds, else (message,
    shrunk case, None). ``worst``: the largest number a check returned (the backward's
    relative error), None when it returns nothing."""
    failing: list[tuple[AttentionCase, BaseException]] = []
    measured: list[float] = []

    @config
    @given(case=strategy)
    def prop(case: AttentionCase) -> None:
        try:
            value = check(subject, backend, case)
        except Exception as err:
            failing.append((case, err))
            raise
        if isinstance(value, float):
            measured.append(value)

    try:
        prop()
    except Exception as err:
        if failing:  # hypothesis replays the shrunk example last
            case, cause = failing[-1]
            return _first_line(cause), repr(case), None
        return _first_line(err), "", None
    return "", "", max(measured) if measured else None


def check_attention(
    name_or_fn: str | AttentionVariant | Callable[..., Any],
    backend: str | Backend = "numpy",
    *,
    options: Mapping[str, Any] | None = None,
    promises: Promises | None = None,
    properties: Iterable[str] | None = None,
    max_examples: int | None = None,
    max_seq: int = 6,
) -> ConformanceReport:
    """Run the conformance kit on a variant and return a :class:`ConformanceReport`.

    name_or_fn: a registered name, an :class:`AttentionVariant`, or a plain function
    following the contract (then ``promises`` says what it promises; nothing by default,
    and a plain function that accepts a mask or causal=True is held to them).
    options: the variant's options (e.g. ``{"window": 2}``), validated first.
    properties: a subset of :data:`PROPERTIES` (default: all).
    max_examples: hypothesis examples per property (default: the active profile's).
    """
    chosen = get_backend(backend)
    subject = _subject(name_or_fn, options, promises)
    wanted = list(PROPERTIES if properties is None else properties)
    unknown = sorted(set(wanted) - set(PROPERTIES))
    if unknown:
        raise ValueError(
            f"check_attention: unknown properties {unknown}; known: {', '.join(PROPERTIES)}"
        )
    plan, notes = _plan(subject, chosen, max_seq)
    config = settings(
        max_examples=max_examples or settings.default.max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        report_multiple_bugs=False,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    results = {}
    for name in wanted:
        step = plan[name]
        if isinstance(step, str):
            results[name] = PropertyResult(name, "skipped", step)
            continue
        message, counterexample, worst = _run_property(step[0], step[1], subject, chosen, config)
        note = notes.get(name, "")
        if name == "backward" and worst is not None:
            also = "; matches softmax's" if subject.promises.exact else ""
            note = f"rel. error <= {worst:.0e} vs central differences{also}"
        if message:
            results[name] = PropertyResult(name, "failed", message, counterexample)
        else:
            results[name] = PropertyResult(name, "passed", note)
    return ConformanceReport(subject.variant.name, chosen.name, results, dict(subject.options))
