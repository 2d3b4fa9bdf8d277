"""Decoding's compiled kernels: a product for a few rows against a layer's weight (the
matrix-vector step), and one token's step through a whole stack of pre-norm blocks and
the head, built on the same dot products.

    y[r, o] = sum_i x[r, i] W[o, i] + b[o]     x (rows, d_in), W (d_out, d_in), rows small

Generating text multiplies one row per sequence by every weight matrix, so a decode step
is bound by reading the weights from memory (see the README's "Why decoding is
bandwidth-bound"). OpenBLAS's matrix-vector kernel reads float32 weights at about 24 GB/s
on two cores of the EPYC where this was written, while summing an array reads at 33-35
GB/s there. This kernel reads each row of W once, as one contiguous stream, and keeps
the few rows of x in cache: measured there, the weights of GPT-2 small read at 31 GB/s on
two threads (27 on one).

- numba (optional, ``pip install 'tinytx[fast]'``): one compiled loop, output rows
  shared between numba's threads (as many as tinytx's pool). LLVM may reorder the sum
  into vector lanes (as BLAS does), so results differ from the definition's ``x @ W.T``
  by rounding only.
- Without numba, or with ``TINYTX_NUMBA=0``, :func:`few_rows_matmul` and
  :func:`stack_step` return None and the caller uses BLAS, or the blocks' modules.

:func:`tinytx.functional.linear` is the definition; tests/test_natives.py checks the
linear native (which calls :func:`few_rows_matmul`) against it, tests/test_decode_step.py
the stack step against the blocks' modules.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from tinytx.backends import numba_kernels

__all__ = [
    "ACTIVATION_CODES",
    "MAX_ROWS",
    "few_rows_matmul",
    "kernel_available",
    "lane_sum",
    "prepare_stack_step",
    "stack_step",
]

# The kernel keeps every row of x next to one row of W: it is for matrix-vector-like
# products. The rule: up to 8 rows, the rows' partial sums and one 16-float vector of W
# fit in the 32 vector registers of AVX-512 (16 of AVX2, NEON); beyond that BLAS's
# blocked kernels, which reuse W from cache across many rows, are the better tool.
MAX_ROWS = 8

_kernels: dict[str, Any] = {}  # by name: compiled by _compile on first use
_compile_lock = threading.Lock()  # one thread compiles; others wait for it

# Sums reordered into vector lanes and fused multiply-adds ("reassoc", "contract": as BLAS
# does), but IEEE NaN and inf (no "nnan"/"ninf" assumptions) and NumPy's division (x / 0
# is inf, not an error): a NaN weight gives NaN logits, which generation reports.
_FASTMATH = {"contract", "reassoc"}
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2}  # the stack's activations; -1: none


def _compile() -> dict[str, Any]:
    """The numba kernels, compiled on first use (cached on disk). Call only when
    :func:`tinytx.backends.numba_kernels.enabled` (numba imported)."""
    with _compile_lock:
        if not _kernels:
            _kernels.update(_build(numba_kernels._numba))
    return _kernels


def _atomics(numba: Any) -> tuple[Any, Any, Any]:
    """Three atomic operations on an int64 array element, as numba intrinsics (LLVM's
    atomic instructions): load (acquire), fetch-and-add (acquire-release), and
    compare-and-swap. The whole-stack step's threads share the work through them."""
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    def pointer(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        return cgutils.get_item_pointer(context, builder, array_type, array, [args[1]])

    @intrinsic
    def load(typingctx: Any, counters: Any, index: Any) -> Any:
        """counters[index], read atomically; what was written before a matching add is
        visible after it."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.load_atomic(pointer(context, builder, signature, args), "acquire", 8)

        return types.int64(counters, types.intp), codegen

    @intrinsic
    def add(typingctx: Any, counters: Any, index: Any, value: Any) -> Any:
        """counters[index] += value, atomically."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            target = pointer(context, builder, signature, args)
            return builder.atomic_rmw("add", target, args[2], "acq_rel")

        return types.int64(counters, types.intp, types.int64), codegen

    @intrinsic
    def swap(typingctx: Any, counters: Any, index: Any, expected: Any, new: Any) -> Any:
        """counters[index] = new if it still holds expected, atomically; whether it did."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            target = pointer(context, builder, signature, args)
            pair = builder.cmpxchg(target, args[2], args[3], "acq_rel", "acquire")
            return builder.extract_value(pair, 1)

        return types.boolean(counters, types.intp, types.int64, types.int64), codegen

    return load, add, swap


# --- the kernels, as plain Python; compiled by _build on first use ------------------------

# Set by _build: numba's prange, numba_kernels' compiled helpers, the atomic operations.
prange = range
_layer_norm: Any = None
_exp: Any = None
_gelu: Any = None
_gelu_tanh: Any = None
_load: Any = None
_add: Any = None
_swap: Any = None
_LINE = 8  # int64 counters per 64-byte cache line (the stack's, per phase)


def one_output(x: Any, w: Any, o: int, bias: Any) -> Any:  # pragma: no cover
    """x . W[o] + b[o]: one output of a product. x: (d_in,); w: (d_out, d_in); bias:
    (d_out,) or (0,) for none. Row o of W is read once, as one contiguous stream, the
    sum in vector lanes."""
    total = x.dtype.type(0.0)  # in x's dtype (a float64 0.0 would promote the sum)
    for i in range(x.shape[0]):
        total += x[i] * w[o, i]
    return total + bias[o] if bias.shape[0] > 0 else total


def sum_in_lanes(a: Any) -> Any:  # pragma: no cover
    """sum_i a[i] in vector lanes, a 1-D: one contiguous stream of reads, and adds that
    keep up with it (NumPy's pairwise sum does not: about 25 GB/s a core, on data
    already in cache, on the EPYC where this was written)."""
    running = a.dtype.type(0.0)
    for i in range(a.shape[0]):
        running += a[i]
    return running


def activated(a: Any, activation: int) -> Any:  # pragma: no cover
    """act(a): activation an ACTIVATION_CODES value, or -1 for none."""
    if activation == 0:
        return max(a, np.float32(0.0))  # float32 stays float32, float64 float64
    if activation == 1:
        return _gelu(a)
    if activation == 2:
        return _gelu_tanh(a)
    return a


def product(x: Any, w: Any, bias: Any, out: Any) -> None:  # pragma: no cover
    """out = x W^T + b. x: (rows, d_in); w: (d_out, d_in); bias: (d_out,) or (0,) for
    none; out: (rows, d_out). Output rows of W are shared between threads; each row of
    W is read once, for every row of x while it is in cache."""
    for o in prange(w.shape[0]):
        for r in range(x.shape[0]):
            out[r, o] = one_output(x[r], w, o, bias)


def attend_head(
    qkv: Any, keys: Any, values: Any, position: int, head: int, scale: float, out: Any
) -> None:  # pragma: no cover  fmt: skip
    """out[head's columns] = softmax(q K[:, :p+1]^T scale) V[:, :p+1] for one head, the
    positions before p from the cache and p's own key and value from qkv.
    qkv: (d + 2 d_kv,); keys, values: (heads_kv, max_len, d_head); out: (d,)."""
    heads_kv, _, d_head = keys.shape
    d = out.shape[0]
    d_kv = heads_kv * d_head
    g = head // (d // d_head // heads_kv)  # its key/value head
    q = qkv[head * d_head : (head + 1) * d_head]  # (d_head,)
    k_new = qkv[d + g * d_head : d + (g + 1) * d_head]  # (d_head,)
    v_new = qkv[d + d_kv + g * d_head : d + d_kv + (g + 1) * d_head]  # (d_head,)
    scores = np.empty(position + 1, dtype=out.dtype)  # (seq_k,)
    top = out.dtype.type(-np.inf)  # float32 throughout: exp is float32's
    for t in range(position + 1):
        k = keys[g, t] if t < position else k_new  # (d_head,)
        total = out.dtype.type(0.0)
        for j in range(d_head):
            total += q[j] * k[j]
        scores[t] = total * scale
        top = max(top, scores[t])
    norm = out.dtype.type(0.0)
    for t in range(position + 1):
        shifted = scores[t] - top  # exp turns NaN into a number: NaN kept here
        scores[t] = _exp(shifted) if shifted == shifted else shifted
        norm += scores[t]
    mixed = np.zeros(d_head, dtype=out.dtype)  # sum_t p_t v_t, one cached row at a time
    for t in range(position + 1):
        v = values[g, t] if t < position else v_new  # (d_head,)
        for j in range(d_head):
            mixed[j] += scores[t] * v[j]
    for j in range(d_head):
        out[head * d_head + j] = mixed[j] / norm


def write_cache(qkv: Any, keys: Any, values: Any, position: int, g: int) -> None:
    """Key/value head g of the new position (from qkv (d + 2 d_kv,)) into the cache."""
    heads_kv, _, d_head = keys.shape
    d = qkv.shape[0] - 2 * heads_kv * d_head
    for j in range(d_head):
        keys[g, position, j] = qkv[d + g * d_head + j]
        values[g, position, j] = qkv[d + (heads_kv + g) * d_head + j]


# The stack's threads share each phase (a product, or the heads) through a pair of
# counters on their own cache line: rows taken so far, rows done so far.


def take(team: Any, phase: int, n: int, least: int) -> Any:  # pragma: no cover
    """The calling thread's next rows [start, stop) of a phase's n: a share of what is
    left (guided: big shares while much is left, then smaller, at least ``least``
    rows), or (n, n) once every row is taken. team: (counters, threads, least bytes)."""
    counters, threads = team[0], team[1]
    while True:
        start = _load(counters, phase * _LINE)
        if start >= n:
            return n, n
        stop = min(n, start + max(least, (n - start) // (2 * threads)))
        if _swap(counters, phase * _LINE, start, stop):
            return start, stop


def done(team: Any, phase: int, rows: int) -> None:  # pragma: no cover
    """Says that the calling thread has written ``rows`` more rows of the phase."""
    _add(team[0], phase * _LINE + 1, rows)


def wait(team: Any, phase: int, n: int) -> None:  # pragma: no cover
    """Until all n rows of the phase are done, by whichever threads took them. A
    thread waits only for rows another thread has taken and is computing, so no
    wait lasts forever, even where the threads run one after another."""
    while _load(team[0], phase * _LINE + 1) < n:
        pass


def share_of_product(
    x: Any,
    w: Any,
    bias: Any,
    activation: int,
    residual: Any,
    out: Any,
    team: Any,
    phase: int,
) -> None:  # pragma: no cover  fmt: skip
    """out = act(x W^T + b) + residual, 1-D (residual (0,) for none), the calling
    thread's share: rows taken until none is left, then a wait for the others'."""
    n = w.shape[0]
    least = max(1, team[2] // (w.shape[1] * w.itemsize))  # rows of at least team[2] bytes
    while True:
        start, stop = take(team, phase, n, least)
        if start == n:
            break
        for o in range(start, stop):
            out[o] = one_output(x, w, o, bias)
        if activation >= 0:  # a loop of its own, in vector lanes: the GELU's exps
            for o in range(start, stop):
                out[o] = activated(out[o], activation)
        if residual.shape[0] > 0:
            for o in range(start, stop):
                out[o] += residual[o]
        done(team, phase, stop - start)
    wait(team, phase, n)


def share_of_heads(
    qkv: Any,
    keys: Any,
    values: Any,
    position: int,
    scale: float,
    out: Any,
    team: Any,
    phase: int,
) -> None:  # pragma: no cover  fmt: skip
    """Every head's :func:`attend_head`, the calling thread's share of the heads (the
    first head of each key/value group writes that group's new key and value into
    the cache; the others read them from qkv), then a wait for the others'."""
    heads = out.shape[0] // keys.shape[2]
    group = heads // keys.shape[0]  # query heads per key/value head
    while True:
        start, stop = take(team, phase, heads, 1)
        if start == heads:
            break
        for head in range(start, stop):
            if head % group == 0:
                write_cache(qkv, keys, values, position, head // group)
            attend_head(qkv, keys, values, position, head, scale, out)
        done(team, phase, stop - start)
    wait(team, phase, heads)


def stack(
    x: Any,
    keys: Any,
    values: Any,
    position: int,
    n1w: Any,
    n1b: Any,
    eps1: Any,
    w_in: Any,
    b_in: Any,
    w_out: Any,
    b_out: Any,
    n2w: Any,
    n2b: Any,
    eps2: Any,
    w_1: Any,
    b_1: Any,
    w_2: Any,
    b_2: Any,
    activation: Any,
    scale: Any,
    final_w: Any,
    final_b: Any,
    final_eps: float,
    head_w: Any,
    head_b: Any,
    threads: int,
    least_bytes: int,
    out: Any,
    logits: Any,
) -> int:  # pragma: no cover  fmt: skip
    """See :func:`stack_step`. x, out: (d,); the others: one entry per block
    (activation, scale, eps1, eps2: (blocks,) arrays); then the head, if head_w has
    rows: logits = W_head LN_f(y) + b_head, into logits (vocab,). ``threads`` shares
    of the work, one per thread of numba's team. Returns how many stages ran, the
    blocks and then the head (out: the last block's output): fewer than all where a
    LayerNorm row must go to the definition (every thread computes the LayerNorm
    itself, on the same numbers, and decides alike)."""
    blocks, d = len(keys), x.shape[0]
    # every intermediate has its own row, written once: no thread overwrites what a
    # slower one may still be reading
    xs = np.empty((blocks + 1, d), dtype=x.dtype)  # each block's input, then output
    xs[0] = x
    qkv = np.empty((blocks, w_in[0].shape[0]), dtype=x.dtype)  # (blocks, d + 2 d_kv)
    attended = np.empty((blocks, d), dtype=x.dtype)  # the heads side by side
    x1 = np.empty((blocks, d), dtype=x.dtype)  # after attention's residual
    hidden = np.empty((blocks, w_1[0].shape[0]), dtype=x.dtype)  # (blocks, d_ff)
    team = (np.zeros((5 * blocks + 1) * _LINE, dtype=np.int64), threads, least_bytes)
    reached = np.empty(threads, dtype=np.int64)
    none = np.empty(0, dtype=x.dtype)  # no bias, no residual
    for thread in prange(threads):
        h = np.empty((1, d), dtype=x.dtype)  # this thread's LayerNorm output
        i = 0  # the block
        while i < blocks:
            phase = 5 * i  # its five: W_in, the heads, W_out, W_1, W_2
            # x1 = x + W_out attend(q, K, V) + b_out, with q, k, v = W_in LN1(x) + b_in
            if _layer_norm(xs[i : i + 1], n1w[i], n1b[i], eps1[i], h) != 0:
                break
            share_of_product(h[0], w_in[i], b_in[i], -1, none, qkv[i], team, phase)
            share_of_heads(qkv[i], keys[i], values[i], position, scale[i], attended[i],
                           team, phase + 1)  # fmt: skip
            share_of_product(attended[i], w_out[i], b_out[i], -1, xs[i], x1[i], team,
                             phase + 2)  # fmt: skip
            # y = x1 + W_2 act(W_1 LN2(x1) + b_1) + b_2
            if _layer_norm(x1[i : i + 1], n2w[i], n2b[i], eps2[i], h) != 0:
                break
            share_of_product(h[0], w_1[i], b_1[i], activation[i], none, hidden[i], team,
                             phase + 3)  # fmt: skip
            share_of_product(hidden[i], w_2[i], b_2[i], -1, x1[i], xs[i + 1], team,
                             phase + 4)  # fmt: skip
            i += 1
        if i == blocks and head_w.shape[0] > 0:  # logits = W_head LN_f(y) + b_head
            if _layer_norm(xs[blocks : blocks + 1], final_w, final_b, final_eps, h) == 0:
                share_of_product(h[0], head_w, head_b, -1, none, logits, team, 5 * blocks)
                i += 1
        reached[thread] = i
    stages = reached.min()
    out[:] = xs[min(stages, blocks)]
    return stages


def _build(numba: Any) -> dict[str, Any]:
    """Compile the kernels below (cached on disk): the helpers and the atomic operations
    become this module's globals in place, as in :mod:`tinytx.backends.numba_kernels`
    (numba's disk cache keys a function by its code and its closure, not its globals; a
    closure over compiled functions would be compiled again in every process)."""
    parallel = numba.njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
    serial = numba.njit(fastmath=_FASTMATH, error_model="numpy", cache=True)
    names = globals()
    # numba_kernels' compiled LayerNorm and one-number helpers (exp, GELU)
    names["_layer_norm"] = numba_kernels._kernel("layer_norm")
    names["_exp"], names["_gelu"] = numba_kernels._exp, numba_kernels._gelu_one
    names["_gelu_tanh"] = numba_kernels._gelu_tanh_one
    names["_load"], names["_add"], names["_swap"] = _atomics(numba)
    names["prange"] = numba.prange
    for name in (
        "one_output",
        "activated",
        "attend_head",
        "write_cache",
        "take",
        "done",
        "wait",
        "share_of_product",
        "share_of_heads",
    ):
        names[name] = serial(names[name])
    for name in ("product", "stack"):
        names[name] = parallel(names[name])
    # the bandwidth probe's sum, run on the caller's threads: without the GIL
    unlocked = numba.njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
    names["sum_in_lanes"] = unlocked(sum_in_lanes)
    return {"product": product, "stack": stack, "sum_in_lanes": names["sum_in_lanes"]}


def kernel_available() -> bool:
    """Whether :func:`few_rows_matmul` runs here (numba installed, TINYTX_NUMBA not 0)."""
    return numba_kernels.enabled()


def lane_sum(a: np.ndarray) -> float | None:
    """sum(a) in vector lanes, compiled, for a 1-D C-contiguous float32 or float64 array;
    None where the kernel does not run (numba missing or off). Runs without the GIL, so
    threads can sum slices side by side. The bandwidth probe of ``tinytx bench generate``
    (a read that the adds keep up with); within rounding of ``np.sum``.

    a: (n,) -> a float.
    """
    if a.ndim != 1 or a.dtype not in (np.float32, np.float64) or not a.flags.c_contiguous:
        raise ValueError(
            f"lane_sum needs a 1-D contiguous float32/float64 array, not {a.dtype} {a.shape}"
        )
    if not numba_kernels.enabled():
        return None
    return float(_compile()["sum_in_lanes"](a))


_threads = threading.local()  # .count: numba's thread count last set on this thread


def _set_threads(threads: int) -> None:
    """numba's thread count for this calling thread, set only when it changes."""
    import numba

    count = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if getattr(_threads, "count", None) != count:
        numba.set_num_threads(count)
        _threads.count = count


def few_rows_matmul(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, threads: int
) -> np.ndarray | None:
    """x W^T + b with the compiled kernel, or None where it does not apply (numba missing
    or turned off, more than ``MAX_ROWS`` rows, mixed or non-float32/64 dtypes, a weight
    that is not C-contiguous).

    x: (rows, d_in); weight: (d_out, d_in); bias: (d_out,) or None -> (rows, d_out).
    ``threads``: numba's thread count for this call.
    """
    rows = x.shape[0]
    if rows == 0 or rows > MAX_ROWS or x.dtype != weight.dtype:
        return None
    if x.dtype not in (np.float32, np.float64) or not weight.flags.c_contiguous:
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.shape != weight.shape[:1]):
        return None
    if not numba_kernels.enabled():
        return None
    product = _compile()["product"]
    _set_threads(threads)
    out = np.empty((rows, weight.shape[0]), dtype=x.dtype)  # (rows, d_out)
    bias = np.empty(0, dtype=x.dtype) if bias is None else bias  # (0,): no bias
    product(np.ascontiguousarray(x), weight, bias, out)
    return out


# Each take of a product's rows (see stack) reads at least this many bytes of
# weights: some microseconds of reading on any core, against the 0.1-0.3 microseconds
# an atomic operation on a shared cache line takes.
_LEAST_BYTES_PER_TAKE = 1 << 16


def stack_step(
    x: np.ndarray,
    keys: list[np.ndarray],
    values: list[np.ndarray],
    position: int,
    blocks: list[tuple[Any, ...]],
    threads: int,
    head: tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, int] | None:
    """One new token through a stack of pre-norm decoder blocks, and then through the
    model's head if ``head`` is given, all in one compiled call with one team of threads:

        h = LN1(x);  q, k, v = W_in h + b_in;  K[:, p], V[:, p] = k, v   (into the cache)
        x1 = x + W_out softmax(q K[:, :p+1]^T * scale) V[:, :p+1] + b_out   (per head)
        y  = x1 + W_2 act(W_1 LN2(x1) + b_1) + b_2     (each block in turn)
        logits = W_head LN_f(y) + b_head

    what :class:`tinytx.layers.DecoderBlock` computes for one token with a KV cache, in
    its order, within rounding (sums in vector lanes, fused multiply-adds, and exp as
    :mod:`tinytx.backends.numba_kernels` computes it, within 1.5 ulp), without
    returning to Python between the blocks, and without ending the threads' work after
    every product (a block's modules make some 100 Python calls per token). The
    threads take a product's output rows as they come (guided: big shares first, smaller
    ones as the rows run out) and each waits only for rows another thread has taken, so
    a product's slowest thread does not hold up the next product's whole team (see the
    README's "Why decoding is bandwidth-bound").

    x: (d,); keys[i], values[i]: block i's (heads_kv, max_len, d_head) cache buffers,
    written at ``position``; blocks[i]: block i's (norm1, in_proj, out_proj, norm2,
    linear1, linear2, activation, scale): norms as (weight (d,), bias (d,), eps), products
    as (W, b) with W (d + 2 d_kv, d), (d, d), (d_ff, d), (d, d_ff), activation "relu",
    "gelu" or "gelu_tanh", scale the attention's; head: the
    final LayerNorm's weight (d,), bias (d,) and eps, and the output layer's weight
    (vocab, d) and bias (vocab,) or None -> (y, n): n stages ran, the blocks and then the
    head. y is the logits (vocab,) where the head ran; else the output of the first n
    blocks (d,): fewer than all where a LayerNorm row must go to the definition, and the
    caller's modules take over from there. None where the kernel does not apply (numba
    missing or off, not all float32, an array not C-contiguous, a full cache, blocks
    whose arrays differ in kind).

    The same as ``prepare_stack_step(keys, values, blocks, head)(x, position, threads)``.
    """
    step = prepare_stack_step(keys, values, blocks, head)
    return None if step is None else step(x, position, threads)


def prepare_stack_step(
    keys: list[np.ndarray],
    values: list[np.ndarray],
    blocks: list[tuple[Any, ...]],
    head: tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray | None] | None = None,
) -> Callable[[np.ndarray, int, int], tuple[np.ndarray, int] | None] | None:
    """:func:`stack_step` in two parts, for generating many tokens with the same weights
    and cache: what stays the same from token to token (the caches, the weights, the
    head; arguments as in :func:`stack_step`) is checked and gathered here, once; the
    function returned, ``step(x, position, threads)``, takes one token's x (d,) and
    position and runs the kernel -> (y, n) as :func:`stack_step`, or None (x not a
    C-contiguous float32 (d,), a full cache). Checking and gathering some 150 arrays
    costs about 0.2 ms a token on caches that the weights' stream has just flushed:
    more than 1% of a step that reads GPT-2 small's 0.5 GB.

    The step reads the arrays given here: changes made in place show, new arrays put in
    their place do not. None where the kernel does not apply (as for :func:`stack_step`).
    """
    if not blocks or not numba_kernels.enabled():
        return None
    if any(block[6] not in ACTIVATION_CODES for block in blocks):
        return None
    columns = list(zip(*(_flat(block) for block in blocks), strict=True))  # per argument
    none = np.empty(0, dtype=np.float32)
    d = columns[0][0].shape[0]  # norm1's weight: (d,)
    if head is None:  # (0,)-sized stand-ins: the kernel skips the head
        head = (none, none, 1.0, np.empty((0, d), dtype=np.float32), none)
    final_w, final_b, final_eps, head_w, head_b = head
    head_b = none if head_b is None else head_b
    arrays = [*keys, *values, *(a for column in columns for a in column)]
    if any(a.dtype != np.float32 or not a.flags.c_contiguous for a in arrays):
        return None
    if any(a.dtype != np.float32 or not a.flags.c_contiguous for a in head[:2] + head[3:4]):
        return None
    if head_b.dtype != np.float32 or head_w.ndim != 2 or head_w.shape[1] != d:
        return None
    if not all(k.flags.writeable and v.flags.writeable for k, v in zip(keys, values, strict=True)):
        return None
    if len({k.shape for k in keys}) != 1:
        return None
    if any(len({(a.ndim, a.flags.writeable) for a in column}) != 1 for column in columns):
        return None  # the kernel takes each argument's blocks as one tuple of one type
    stack = _compile()["stack"]
    max_len = keys[0].shape[1]
    norm1_eps = np.array([float(block[0][2]) for block in blocks])  # (blocks,)
    norm2_eps = np.array([float(block[3][2]) for block in blocks])
    activation = np.array([ACTIVATION_CODES[block[6]] for block in blocks])
    scale = np.array([block[7] for block in blocks], dtype=np.float32)
    n1w, n1b, w_in, b_in, w_out, b_out, n2w, n2b, w_1, b_1, w_2, b_2 = map(tuple, columns)
    keys, values = tuple(keys), tuple(values)
    final_eps = float(final_eps)

    def step(x: np.ndarray, position: int, threads: int) -> tuple[np.ndarray, int] | None:
        if x.dtype != np.float32 or x.shape != (d,) or not x.flags.c_contiguous:
            return None
        if not 0 <= position < max_len:
            return None
        _set_threads(threads)
        out = np.empty_like(x)  # (d,)
        logits = np.empty(head_w.shape[0], dtype=x.dtype)  # (vocab,), or (0,) without a head
        stages = stack(
            x, keys, values, position, n1w, n1b, norm1_eps, w_in, b_in, w_out, b_out, n2w,
            n2b, norm2_eps, w_1, b_1, w_2, b_2, activation, scale, final_w, final_b,
            final_eps, head_w, head_b, _threads.count, _LEAST_BYTES_PER_TAKE, out, logits,
        )  # fmt: skip
        return (logits if stages > len(blocks) else out), int(stages)

    return step


def _flat(block: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    """A block's twelve arrays in the kernel's order: norm1's weight and bias, in_proj's,
    out_proj's, norm2's, linear1's, linear2's."""
    norm1, in_proj, out_proj, norm2, linear1, linear2 = block[:6]
    return (*norm1[:2], *in_proj, *out_proj, *norm2[:2], *linear1, *linear2)
