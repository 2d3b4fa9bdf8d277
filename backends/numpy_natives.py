"""Faster NumPy versions of the element-wise passes in :mod:`tinytx.functional`.

The readable array-API code in ``tinytx/functional.py`` is the definition; each function
here computes the same numbers, in the same order of operations, only faster:

- one output buffer, filled in place with ``out=`` (no temporary per step);
- rows in blocks small enough to stay in the CPU cache, so the max / subtract / exp / sum /
  divide passes of a softmax read the data from memory once, not five times;
- blocks spread over a small thread pool: NumPy releases the GIL inside its loops, so
  the element-wise work uses every core, as the matrix products (BLAS) already do.

The NumPy backend lists them in ``Backend.natives``; :func:`tinytx.functional._native`
is the one place that picks them. This is host-side code, so it imports NumPy.
Masking semantics are those of the definition: a row with nothing kept gives zeros.
A native returns ``NotImplemented`` for an input it does not cover (mixed dtypes, say);
the definition then computes it.
"""

from __future__ import annotations

import contextvars
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from tinytx.backends.matvec_kernels import few_rows_matmul, prepare_stack_step
from tinytx.backends.numba_kernels import softmax_numerator

__all__ = [
    "NATIVES",
    "adamw_update",
    "blockwise_attention",
    "blockwise_attention_backward",
    "embedding_backward",
    "gelu",
    "gelu_tanh",
    "get_num_threads",
    "layer_norm",
    "linear",
    "matmul",
    "relu",
    "scaled_dot_product_attention",
    "set_num_threads",
    "softmax",
]

_FALLBACK_L2_BYTES = 1 << 20  # when the OS does not say: 1 MiB, common on x86 and ARM cores


def _l2_cache_bytes() -> int:
    """One core's L2 cache in bytes, as the OS reports it (Linux sysfs, then sysconf),
    else ``_FALLBACK_L2_BYTES``. Read at import, so block sizes follow the processor."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            folder = os.path.join(base, index)
            with open(os.path.join(folder, "level"), encoding="ascii") as f:
                level = f.read().strip()
            with open(os.path.join(folder, "type"), encoding="ascii") as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(folder, "size"), encoding="ascii") as f:
                    size = f.read().strip()  # "1024K"
                units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (OSError, ValueError):
        pass
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        size = 0
    return size if size > 0 else _FALLBACK_L2_BYTES


# Sizes follow the processor's L2 cache, by rules rather than constants tuned on one
# machine (the rules give 1 << 16 and 1 << 19 on a 1 MiB L2, the sizes measured best on
# the 2-core EPYC where the natives were first written):
# - a block of rows takes a quarter of L2 (in float32 elements), so that the block, the
#   output it is written to and a scratch buffer stay in the core's cache together;
_L2_BYTES = _l2_cache_bytes()
_BLOCK_ELEMENTS = max(1 << 12, _L2_BYTES // 4 // 4)
# - the pool is used from four blocks on: a pool task costs tens of microseconds, about
#   what one block's passes take, so fewer blocks than that are faster on the caller.
_PARALLEL_MIN_ELEMENTS = 4 * _BLOCK_ELEMENTS

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_num_threads: int | None = None


def _default_threads() -> int:
    env = os.environ.get("TINYTX_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_this_thread = threading.local()  # .threads: the count for work running on this thread


def get_num_threads() -> int:
    """Threads used for the element-wise passes ($TINYTX_NUM_THREADS, else every core);
    1 inside :func:`_one_thread_here` (a part of a batch already running on its own thread).
    """
    global _num_threads
    here = getattr(_this_thread, "threads", None)
    if here is not None:
        return here
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for the element-wise passes from now on (1 = no pool)."""
    global _pool, _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive int, got {n!r}")
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n


@contextmanager
def _one_thread_here() -> Iterator[None]:
    """Inside, natives called from this thread run on it alone (no pool, no BLAS threads):
    for work that is itself one of several shares running side by side on the pool."""
    previous = getattr(_this_thread, "threads", None)
    _this_thread.threads = 1
    try:
        yield
    finally:
        _this_thread.threads = previous


def _forget_pool() -> None:
    """After fork() the pool's threads are gone in the child: start a fresh pool there."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(get_num_threads(), thread_name_prefix="tinytx")
        return _pool


def _row_blocks(x: np.ndarray) -> list[tuple[Any, ...]]:
    """Index tuples cutting x (..., rows, n) into blocks of about ``_BLOCK_ELEMENTS``.

    A block is some rows of one (rows, n) slab or, when a slab is smaller than that,
    several whole slabs side by side: (8, 12, 32, 32) is cut along its first axis, not
    into 96 tiny (32, 32) pieces (each piece costs a Python call per NumPy pass).
    """
    *outer, rows, n = x.shape
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))  # rows per block
    lead = (*outer, rows)  # the axes a block is cut from; n stays whole
    axis, inner = len(lead) - 1, 1  # cut along lead[axis]; keep lead[axis + 1:] whole
    while axis > 0 and inner * lead[axis] <= step:
        inner *= lead[axis]
        axis -= 1
    chunk = max(1, step // max(inner, 1))  # indices of lead[axis] per block
    return [
        (*index, slice(start, min(start + chunk, lead[axis])))
        for index in np.ndindex(*lead[:axis])
        for start in range(0, lead[axis], chunk)
    ]


def _for_each_block(work: Callable[[tuple[Any, ...]], None], x: np.ndarray) -> None:
    """Run ``work(block_index)`` over the row blocks of x, on the pool when x is large.

    Each thread gets one run of consecutive blocks (one task per thread, not per block:
    a pool task costs tens of microseconds, as much as the work on a small block).
    An array of one block or less (a decode step's rows) is one call, with no cutting.
    """
    if x.size <= _BLOCK_ELEMENTS:
        work((Ellipsis,))  # the whole array
        return
    blocks = _row_blocks(x)
    threads = min(get_num_threads(), len(blocks))
    if x.size < _PARALLEL_MIN_ELEMENTS or threads == 1:
        for block in blocks:
            work(block)
        return
    caller = contextvars.copy_context()  # np.errstate lives in a context variable

    def work_on_share(share: list[tuple[Any, ...]]) -> None:
        for block in share:
            work(block)

    def share_as_caller(share: list[tuple[Any, ...]]) -> None:
        caller.copy().run(work_on_share, share)

    size = -(-len(blocks) // threads)  # blocks per thread, rounded up
    shares = [blocks[start : start + size] for start in range(0, len(blocks), size)]
    _run_shares(share_as_caller, shares, caller_too=True)


class _Shares:
    """The shares of one split, each claimed by whichever thread is free next.

    The caller and the pool's threads all run :meth:`work_through`: claim the next share,
    run it, claim again, until none is left. A thread that wakes late finds the shares
    taken and returns at once, so the caller never waits for a thread that has not
    started: it runs the unclaimed shares itself, then waits only for shares already
    running. After an error, the shares not yet started are skipped (claimed but not
    run), and :meth:`wait` raises the first error once every running share is done.
    """

    def __init__(self, run: Callable[[Any], None], shares: Sequence[Any]) -> None:
        self._run, self._shares = run, shares
        self._lock = threading.Lock()
        self._claimed = 0  # shares handed out
        self._finished = 0  # shares run (or skipped after an error)
        self._all_finished = threading.Event()
        self._error: BaseException | None = None

    def _claim(self) -> int | None:
        with self._lock:
            if self._claimed == len(self._shares):
                return None
            self._claimed += 1
            return self._claimed - 1

    def work_through(self) -> None:
        while (index := self._claim()) is not None:
            try:
                if self._error is None:
                    self._run(self._shares[index])
            except BaseException as err:  # raised in the caller by wait()
                with self._lock:
                    self._error = self._error or err
            finally:
                with self._lock:
                    self._finished += 1
                    if self._finished == len(self._shares):
                        self._all_finished.set()

    def wait(self) -> None:
        """Return when every share has finished; raise the first share's error, if any."""
        self._all_finished.wait()
        if self._error is not None:
            raise self._error


def _run_shares(run: Callable[[Any], None], shares: Sequence[Any], *, caller_too: bool) -> None:
    """Run ``run(share)`` for every share, on the pool's threads and, when ``caller_too``,
    on the calling thread as well; a share's error is raised here once every share that
    started has finished.

    With ``caller_too``, the threads claim shares one at a time (:class:`_Shares`): the
    calling thread would only wait for the pool otherwise, so it works too (one thread
    fewer to wake per split, no core left to a waiting thread), and a pool thread that
    wakes late costs nothing, its shares taken by the caller. A wake-up usually takes
    tens of microseconds, but on the 2-vCPU EPYC VM one in ten of MiniLM's products found
    its pool thread 1.7 ms late or more, one in a hundred 30 ms (the caller's half took
    1.5-3 ms). Measured 2026-12-04 in one process, alternating with the old way (each
    thread handed its share in advance), paired medians of the time: attention
    (8, 8, 256, 64) 0.79 and 0.85 (40 calls each), the encoder block 0.93 and 0.96 (20),
    MiniLM's ``model.embed`` 0.97-1.01 (8-15), where products are split in two only.

    Every pool thread is asked to help (one per share after the caller's first), so with
    many shares one thread more than the pool's count works: a share's Python between
    its products holds the GIL, and the extra thread keeps every core busy meanwhile.
    Measured the same day, attention (8, 8, 256, 64) in 8 tiles, 6 alternating calls:
    9.3-14.1 ms with the caller and both pool threads, 15.6-20.9 ms with the caller and
    one (each tile then took 3.7 ms instead of 3.3).
    """
    if not shares:
        return
    if not caller_too:
        for _ in _executor().map(run, shares):  # re-raises a worker's exception here
            pass
        return
    if len(shares) == 1 or get_num_threads() == 1:
        for share in shares:
            run(share)
        return
    split = _Shares(run, shares)
    pool = _executor()
    for _ in range(min(len(shares) - 1, get_num_threads())):  # the pool's threads help
        pool.submit(split.work_through)
    split.work_through()
    split.wait()


def _as_rows(x: np.ndarray) -> np.ndarray:
    """A view of x with at least two axes (a 1-D array is one row)."""
    return x[None, :] if x.ndim == 1 else x


# --- the natives ---------------------------------------------------------------------


def _additive(mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The boolean mask as a bias to add: 0 where True (kept), -inf where False; same shape."""
    return np.where(mask, dtype.type(0), dtype.type(-np.inf))


def _softmax_block(
    o: np.ndarray,
    logits: np.ndarray | None,
    biases: Sequence[np.ndarray],
    normalize: bool = True,
) -> np.ndarray:
    """o = softmax(logits + sum(biases)) along the last axis, for one (..., r, n) block;
    returns the row totals (..., r, 1) the exponentials were divided by.

    ``normalize=False`` leaves o = exp(x - row max) undivided: the caller divides
    something smaller instead (attention divides W v, r x d_v numbers, not W's r x n).

    logits None: o holds the logits (in place). ``biases``: the masks as additive 0 / -inf
    arrays (see :func:`_additive`, broadcastable to the block), possibly none. Adding
    them is the definition's where(mask, x, -inf) for every finite x, and measured 5-9x
    faster than a masked copy (a pass over a broadcast boolean mask costs about 2 ns per
    element here). An infinite or NaN logit at a dropped place turns into NaN instead of
    -inf; a NaN row maximum shows it, and then the dropped places are set to -inf by a
    masked copy, so the result is the definition's in every case. The steps of the
    definition: a row with nothing kept gets max 0 and total 1, so zeros.
    """
    source = o if logits is None else logits
    if biases:
        with np.errstate(invalid="ignore"):  # inf + -inf: handled below
            np.add(source, biases[0], out=o)
            for bias in biases[1:]:
                np.add(o, bias, out=o)
        source = o
    row_max = np.max(source, axis=-1, keepdims=True)  # (..., r, 1)
    if biases and np.isnan(row_max).any():  # an inf or NaN logit met -inf
        if logits is not None:
            np.copyto(o, logits)  # (in place, kept entries are intact: x + 0 is x)
        for bias in biases:
            np.copyto(o, bias, where=np.isneginf(bias))  # where(mask, x, -inf)
        row_max = np.max(o, axis=-1, keepdims=True)
    if np.isposinf(row_max).any():  # the definition's limit: 0 at +inf, -inf elsewhere
        with np.errstate(invalid="ignore"):
            limit = np.where(source == np.inf, 0, source - np.inf)
        np.copyto(o, np.where(np.isposinf(row_max), limit, source))
        source, row_max = o, np.max(o, axis=-1, keepdims=True)
    row_max[~np.isfinite(row_max)] = 0  # an all -inf row has max -inf
    np.subtract(source, row_max, out=o)
    np.exp(o, out=o)  # exactly 0 where x was -inf
    total = np.sum(o, axis=-1, keepdims=True)  # (..., r, 1)
    total[total == 0] = 1  # all-masked row: 0 / 1 = 0 (a NaN row stays NaN)
    if normalize:
        np.divide(o, total, out=o)
    return total


def _softmax_rows(out: np.ndarray, x: np.ndarray, bias: np.ndarray | None) -> None:
    """out = softmax(x + bias) along the last axis; x may be out itself.

    out, x: (..., rows, n); bias: the mask as ``_additive(mask)`` in the same layout, or
    None. The steps of the definition, on one cache-sized block of rows at a time.
    """
    in_place = x is out

    def work(block: tuple[Any, ...]) -> None:
        biases = () if bias is None else (bias[block],)
        _softmax_block(out[block], None if in_place else x[block], biases)

    if out.size:
        _for_each_block(work, out)


def _bool(mask: np.ndarray | None) -> np.ndarray | None:
    """where() reads any nonzero mask value as True; so do we."""
    return mask if mask is None or mask.dtype == np.bool_ else mask.astype(np.bool_)


def softmax(x: np.ndarray, axis: int = -1, *, mask: np.ndarray | None = None) -> np.ndarray:
    """Same as :func:`tinytx.functional.softmax`; x (and mask) any shape -> broadcast shape."""
    mask = _bool(mask)
    shape = x.shape if mask is None else np.broadcast_shapes(x.shape, mask.shape)
    out = np.empty(shape, dtype=x.dtype)

    def rows(a: np.ndarray) -> np.ndarray:  # (..., rows, n) view, the softmax axis last
        return _as_rows(np.moveaxis(a, axis, -1))

    def broadcast_rows(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else rows(np.broadcast_to(a, shape))

    bias = None if mask is None else _additive(mask, out.dtype)  # mask's own shape
    _softmax_rows(rows(out), broadcast_rows(x), broadcast_rows(bias))
    return out


# --- BLAS threads ----------------------------------------------------------------------
#
# Two Python threads calling a multi-threaded OpenBLAS at once fight over its one set of
# worker threads: measured on a 2-core EPYC, 128 products (128, 64) @ (64, 2048) from two
# pool threads took 1.4-1.9 s with OpenBLAS at 2 threads against 75 ms at 1 thread. So
# work that calls BLAS from the pool holds BLAS to one thread meanwhile (the pool is the
# parallelism). The thread counts are read and set through threadpoolctl, which knows
# every BLAS NumPy may be built with (OpenBLAS, MKL, BLIS) and their symbol names.
#
# Two kinds of limit exist. A BLAS with a process-wide pool (OpenBLAS on pthreads, MKL,
# BLIS) is set once for the whole section: one count of the callers inside, under a
# lock, decides when the caller's setting is put back. A BLAS on OpenMP keeps a limit
# per calling thread, so each of the pool's workers sets its own, once (those threads
# are tinytx's and only ever run work that wants one BLAS thread).

_blas_libs: list[Any] | None = None  # threadpoolctl LibControllers of the loaded BLAS
_blas_lock = threading.Lock()
_blas_single_callers = 0
_blas_saved: list[int] = []
_worker_state = threading.local()  # .blas_pinned: this pool thread set its OpenMP BLAS


def _find_blas() -> list[Any]:
    """threadpoolctl's controllers for the BLAS libraries loaded in this process, [] when
    threadpoolctl finds none (or cannot run here)."""
    try:
        from threadpoolctl import ThreadpoolController

        return list(ThreadpoolController().select(user_api="blas").lib_controllers)
    except Exception:  # an unusual platform: behave as if BLAS's threads cannot be set
        return []


def _can_pin_blas() -> bool:
    """Whether :func:`_blas_single_threaded` can hold BLAS to one thread here."""
    global _blas_libs
    with _blas_lock:
        if _blas_libs is None:
            _blas_libs = _find_blas()
        return bool(_blas_libs)


def _per_thread(lib: Any) -> bool:
    return getattr(lib, "threading_layer", None) == "openmp"


def _set_blas_threads(lib: Any, n: int) -> None:
    """Set ``lib``'s thread count from any thread. threadpoolctl lets only the first
    thread that set OpenBLAS's (process-wide) count change it again, and silently ignores
    the others; tinytx sets it only inside its own locked section, so it takes the turn
    and gives it back, and a later ``threadpool_limits`` of the caller still works."""
    clear = getattr(type(lib), "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
    lib.set_num_threads(n)
    if clear is not None:
        clear(force=True)


def _blas_thread_counts() -> list[int | None]:
    """The current thread count of each BLAS library tinytx controls (for tests)."""
    _can_pin_blas()
    return [lib.num_threads for lib in _blas_libs or []]


@contextmanager
def _blas_single_threaded() -> Iterator[None]:
    """Hold process-wide BLAS pools to one thread inside, then give back the caller's count.
    (A per-thread OpenMP BLAS is limited by each pool worker instead: see
    :func:`_map_with_blas_on_pool`.)"""
    global _blas_single_callers, _blas_saved
    if not _can_pin_blas():
        yield
        return
    shared = [lib for lib in _blas_libs or [] if not _per_thread(lib)]
    with _blas_lock:
        if _blas_single_callers == 0:
            _blas_saved = [lib.num_threads for lib in shared]
            for lib in shared:
                _set_blas_threads(lib, 1)
        _blas_single_callers += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_single_callers -= 1
            if _blas_single_callers == 0:
                for lib, n in zip(shared, _blas_saved, strict=True):
                    _set_blas_threads(lib, n)


def _pin_this_worker() -> None:
    """In a pool thread: limit a per-thread (OpenMP) BLAS to one thread, once."""
    if getattr(_worker_state, "blas_pinned", False):
        return
    for lib in _blas_libs or []:
        if _per_thread(lib):
            lib.set_num_threads(1)
    _worker_state.blas_pinned = True


def _map_with_blas_on_pool(work: Callable[[Any], None], jobs: Sequence[Any]) -> None:
    """Run ``work(job)`` for every job on the pool, one task per job, with OpenBLAS held
    to one thread meanwhile (the pool is the parallelism); a worker's error is raised
    here. Each job runs in a copy of the caller's context (np.errstate lives there)."""
    caller = contextvars.copy_context()

    def work_as_caller(job: Any) -> None:
        if threading.current_thread() is not calling_thread:
            _pin_this_worker()
        caller.copy().run(work, job)

    # The calling thread takes the first job itself (see _run_shares) only where BLAS's
    # thread count is process-wide (held to one just below); a per-thread (OpenMP) BLAS
    # would run the caller's job on all of the caller's BLAS threads, beside the pool.
    calling_thread = threading.current_thread()
    caller_too = not any(_per_thread(lib) for lib in _blas_libs or [])
    with _blas_single_threaded():
        _run_shares(work_as_caller, jobs, caller_too=caller_too)


# --- a training step: the batch in parts, side by side --------------------------------------

# How many parts. A part is a whole forward and backward: its Python-level calls (some
# 20-40 per layer, tens of microseconds each) hold the GIL, so the parts' calls take
# turns and only their arithmetic runs side by side. With P parts, calls costing c per
# part and arithmetic W in all, a step takes about max(P c, W / P + c): least near
# P = sqrt(W / c). W grows with the positions (tokens), c does not. Measured on the 2-core
# EPYC with the nanogpt-cpu model (width 128, the narrowest preset): c = 7 ms (forward
# and backward of 4 positions), W = 77 ms for 768 positions, so W / c = positions / 70.
# Hence P = isqrt(positions // 64), and at most one part per thread and per sequence:
# 768 positions -> 3 parts, 256 -> 2, fewer -> the whole batch at once. (Split in two
# against whole there: 8 x 64 positions 27.7 vs 34.9 ms; 2 x 16 13.9 vs 6.2 ms, the
# calls dominating.) A wider model has more arithmetic per position: it only gains sooner.
_PART_MIN_POSITIONS = 64


def _cores_for(parts: int) -> list[int | None]:
    """One core for each of ``parts`` threads (the ones this process may use, in turn), or
    None for each where cores cannot be chosen (not on Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return [None] * parts
    usable = sorted(os.sched_getaffinity(0))
    return [usable[i % len(usable)] for i in range(parts)]


@contextmanager
def _on_core(core: int | None) -> Iterator[None]:
    """Inside, the calling thread runs on ``core`` only; its own cores are given back after."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def sum_over_batch_parts(
    work: Callable[[np.ndarray, np.ndarray], tuple[float, dict[str, np.ndarray]]],
    ids: np.ndarray,
    targets: np.ndarray,
) -> Any:
    """Same as ``work(ids, targets)`` where ``work``'s results add up over the batch's
    sequences (a loss's share and its gradients: see tinytx.backward's
    ``_loss_share_and_grads``): the batch is cut into one part of whole sequences per
    thread, each part computed on its own thread with the natives and BLAS held to that
    thread, and the parts' results added in part order (so every run adds the same way).

    This is data parallelism, as PyTorch's DistributedDataParallel does across
    processes: the threads share no work inside an operation, so no operation waits for
    another thread, and the whole forward and backward of a part (the small products,
    the element-wise passes, the attention of a few heads) runs side by side with the
    other part's. Splitting each operation between threads instead hands off and waits
    some 30 times per layer.

    ids, targets: integer (batch, seq) -> (the sum of the parts' numbers, {key: the sum of
    the parts' arrays}); NotImplemented (the caller computes the batch whole) with one
    thread, one sequence, or too few positions for two parts (see ``_PART_MIN_POSITIONS``).
    """
    batch = ids.shape[0]
    parts = min(get_num_threads(), batch, math.isqrt(ids.size // _PART_MIN_POSITIONS))
    if parts < 2 or not _can_pin_blas():
        return NotImplemented
    size = -(-batch // parts)  # sequences per part, rounded up
    shares = [slice(start, min(start + size, batch)) for start in range(0, batch, size)]
    results: list[Any] = [None] * len(shares)

    cores = _cores_for(len(shares))

    def part(index: int) -> None:
        with _one_thread_here(), _on_core(cores[index]):
            results[index] = work(ids[shares[index]], targets[shares[index]])

    _map_with_blas_on_pool(part, range(len(shares)))
    total, arrays = results[0]
    for number, more in results[1:]:  # in part order
        total += number
        arrays = {key: arrays[key] + more[key] for key in arrays}
    return total, arrays


# --- attention -------------------------------------------------------------------------

# A tile of scores is twice one core's L2 in bytes (2 MiB of float32 on a 1 MiB L2: 256
# query rows at seq_k 2048): it stays in L2 plus its share of L3 between its three steps.
# Half that measured slower on the 2-core EPYC: every product re-packs all of k (or v)
# for BLAS, so fewer, larger products count as much as the cache does.
_TILE_ELEMENTS = max(1 << 14, 2 * _L2_BYTES // 4)


def scaled_dot_product_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    keep_weights: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Same as :func:`tinytx.functional.scaled_dot_product_attention` (inputs already
    checked there): softmax(q k^T * scale) v, returning (output, weights), or
    (output, None) with ``keep_weights=False``.

    Small inputs, and one query per head (generating text), take
    :func:`_attention_whole`: three passes over the whole (batch, heads, seq_q, seq_k)
    weights. Large ones take :func:`_attention_tiled`, which does all three steps on one
    cache-sized tile of query rows at a time, spread over the thread pool; without
    ``keep_weights`` each tile's weights live in a buffer its thread reuses, so the
    (seq_q, seq_k) matrix is never stored (nor its pages touched).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    seq_q = q.shape[2]
    weight_elements = math.prod(q.shape[:3]) * k.shape[2]
    small = weight_elements == 0 or weight_elements < _PARALLEL_MIN_ELEMENTS or seq_q == 1
    if small or q.dtype not in (np.float32, np.float64):
        output, weights = _attention_whole(q, k, v, _bool(mask), causal, scale)
        return output, weights if keep_weights else None
    return _attention_tiled(q, k, v, _bool(mask), causal, scale, keep_weights=keep_weights)


def blockwise_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[np.ndarray, None]:
    """The numbers of :mod:`tinytx.plugins.blockwise` (exact softmax attention, no
    weights), computed as :func:`_attention_tiled` computes softmax attention: one
    cache-sized tile of query rows against all keys at a time, spread over the thread
    pool, each tile's scores in a buffer its thread reuses. The (seq_q x seq_k) matrix is
    never stored: the extra memory is one tile per thread, O(seq_k x rows), as in the
    plugin's online softmax over key blocks, which stays the definition (and what runs on
    the other backends). Inputs checked by the caller; k, v with q's number of heads or
    fewer (grouped-query).

    q: (batch, heads, seq_q, d); k, v: (batch, heads_kv, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), None.
    """
    if q.dtype not in (np.float32, np.float64) or 0 in q.shape or 0 in k.shape:
        return NotImplemented
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    output, _ = _attention_tiled(q, k, v, _bool(mask), causal, scale, keep_weights=False)
    return output, None


def blockwise_attention_backward(
    grad_out: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The numbers of :func:`tinytx.plugins.blockwise.blockwise_attention_backward`
    (FlashAttention's backward, the definition), computed as :func:`blockwise_attention`
    computes the forward: a tile of query rows against all the keys they see, so a tile's
    weights come from one softmax of its scores (no separate logsumexp pass):

        W     = softmax(q k^T * scale + mask biases)    (rows, n), a buffer of the thread
        dv   += W^T g,   dS = W * (g v^T - rowsum(g * o))   (dS in a second buffer)
        dq    = dS k * scale,   dk += dS^T q * scale

    One pool task per (batch, head): a head's dk and dv sum over all its query tiles, so
    one thread owns them. Memory beyond the gradients: two (rows x seq_k) tiles per
    thread, never (seq_q x seq_k). k, v have q's heads (the registry repeats grouped
    ones); inputs checked by the caller.

    grad_out, out: (batch, heads, seq_q, d_v); q: (batch, heads, seq_q, d);
    k, v: (batch, heads, seq_k, d / d_v) -> dq, dk, dv of q's, k's and v's shapes.
    """
    arrays = (grad_out, q, k, v, out)
    if (
        q.dtype not in (np.float32, np.float64)
        or any(a.dtype != q.dtype for a in arrays)
        or 0 in q.shape
        or 0 in k.shape
        or k.shape[1] != q.shape[1]
    ):
        return NotImplemented
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    batch, heads, seq_q, _ = q.shape
    seq_k, dtype = k.shape[2], q.dtype
    offset = seq_k - seq_q  # query i sits at key position i + offset (causal)
    bias = None  # the mask as 0 / -inf to add (see _softmax_block), a broadcast view
    if mask is not None:
        bias = np.broadcast_to(_additive(_bool(mask), dtype), (batch, heads, seq_q, seq_k))
    dq = np.empty_like(q)  # (batch, heads, seq_q, d), each row written by one tile
    dk = np.zeros_like(k)  # (batch, heads, seq_k, d), summed over the query tiles
    dv = np.zeros_like(v)  # (batch, heads, seq_k, d_v)
    rows = max(1, min(seq_q, _TILE_ELEMENTS // seq_k))  # query rows per tile
    scratch = threading.local()  # each thread's two tile buffers

    def head(job: tuple[int, int]) -> None:
        b, h = job
        if getattr(scratch, "w", None) is None:
            scratch.w = np.empty((rows, seq_k), dtype=dtype)
            scratch.ds = np.empty((rows, seq_k), dtype=dtype)
        q_h = q[b, h] * scale  # (seq_q, d)
        k_h, v_h, g_h, o_h = k[b, h], v[b, h], grad_out[b, h], out[b, h]
        for start in range(0, seq_q, rows):
            end = min(start + rows, seq_q)
            n = seq_k if not causal else max(0, min(seq_k, end + offset))  # keys seen
            if n == 0:  # no key for any row here: zero gradient
                dq[b, h, start:end] = 0
                continue
            w, ds = scratch.w[: end - start, :n], scratch.ds[: end - start, :n]  # (r, n)
            biases = [] if bias is None else [bias[b, h, start:end, :n]]  # (r, n)
            if causal:
                position = np.arange(start + offset, end + offset)  # (r,) each query's
                biases.append(_additive(np.arange(n) <= position[:, None], dtype))  # (r, n)
            np.matmul(q_h[start:end], k_h[:n].T, out=w)  # scores (r, n)
            _softmax_block(w, None, biases)  # W, in place
            g = g_h[start:end]  # (r, d_v)
            dv[b, h, :n] += w.T @ g  # (n, d_v)
            np.matmul(g, v_h[:n].T, out=ds)  # dW (r, n)
            ds -= np.sum(g * o_h[start:end], axis=-1, keepdims=True)  # dW - D
            ds *= w  # dS (r, n)
            np.matmul(ds, k_h[:n], out=dq[b, h, start:end])  # (r, d)
            dq[b, h, start:end] *= scale
            dk[b, h, :n] += ds.T @ q_h[start:end]  # (n, d); q_h holds the scale

    jobs = [(b, h) for b in range(batch) for h in range(heads)]
    if get_num_threads() == 1 or len(jobs) == 1 or not _can_pin_blas():
        for job in jobs:
            head(job)
    else:
        _map_with_blas_on_pool(head, jobs)
    return dq, dk, dv


def alibi_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    slopes: Sequence[float],
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The numbers of :mod:`tinytx.plugins.alibi` (its code is the definition):
    softmax(q k^T * scale - m_h |p_i - j|) v, computed as :func:`_attention_tiled`
    computes softmax attention, the distance penalty made one tile at a time and added
    with the mask's biases (the (heads, seq_q, seq_k) penalty is never stored).

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v); slopes: one per
    head -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    if q.dtype not in (np.float32, np.float64) or 0 in q.shape or 0 in k.shape:
        return NotImplemented
    if k.shape[1] != q.shape[1] or len(slopes) != q.shape[1]:
        return NotImplemented
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    head_slopes = np.asarray(slopes, dtype=q.dtype)  # (heads,)
    return _attention_tiled(q, k, v, _bool(mask), causal, scale, slopes=head_slopes)


def sigmoid_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The numbers of :mod:`tinytx.plugins.sigmoid` without a mask (its code is the
    definition): sigmoid(q k^T * scale - log seq_k) v, the same steps one cache-sized tile
    at a time on the pool, as :func:`_attention_tiled` computes softmax attention. A mask
    or causal=True is left to the definition (NotImplemented).

    q: (batch, heads, seq_q, d); k, v: (batch, heads, seq_k, d / d_v)
    -> (batch, heads, seq_q, d_v), weights (batch, heads, seq_q, seq_k).
    """
    if mask is not None or causal or q.dtype not in (np.float32, np.float64):
        return NotImplemented
    if 0 in q.shape or 0 in k.shape or k.shape[1] != q.shape[1]:
        return NotImplemented
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    shift = math.log(k.shape[2])  # the bias -log n, n = seq_k for every query
    return _attention_tiled(q, k, v, None, False, scale, sigmoid_shift=shift)


def _one_query_softmax(scores: np.ndarray) -> bool:
    """A decode step's softmax, in place: scores (batch, heads, 1, seq_k) -> weights.

    The definition's steps (row max, exp of the difference, divide by the sum) as five
    NumPy calls on the whole small array: a decode step runs this once per layer, where
    the blocked :func:`_softmax_rows` costs more in Python than in arithmetic. Returns
    False, leaving ``scores`` as they were, when a row holds an infinite or NaN score
    (the definition's limits are then :func:`_softmax_block`'s to take)."""
    row_max = np.max(scores, axis=-1, keepdims=True)  # (batch, heads, 1, 1)
    if not np.isfinite(row_max).all():  # +-inf or NaN in a row (a finite max is finite)
        return False
    np.subtract(scores, row_max, out=scores)
    np.exp(scores, out=scores)
    np.divide(scores, np.sum(scores, axis=-1, keepdims=True), out=scores)  # sum >= 1
    return True


def _attention_whole(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, causal: bool,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The definition's steps on whole arrays, with the softmax in place in the scores'
    buffer: one (batch, heads, seq_q, seq_k) array is made instead of two."""
    from tinytx.functional import causal_mask, repeat_kv

    heads, seq_q = q.shape[1:3]
    seq_k = k.shape[2]
    k = repeat_kv(k, heads)  # (batch, heads, seq_k, d)
    v = repeat_kv(v, heads)  # (batch, heads, seq_k, d_v)
    weights = np.matmul(q * scale, np.swapaxes(k, -1, -2))  # (batch, heads, seq_q, seq_k)
    if seq_q == 1 and mask is None and seq_k and _one_query_softmax(weights):
        return np.matmul(weights, v), weights  # (batch, heads, 1, d_v), weights
    if causal and seq_q > 1:  # one query (a decode step) sits last: it sees every key
        allowed = causal_mask(seq_q, seq_k, xp=np)  # (seq_q, seq_k)
        mask = allowed if mask is None else np.logical_and(mask, allowed)
    bias = None
    if mask is not None:  # (batch, heads, seq_q, seq_k), a view
        bias = np.broadcast_to(_additive(mask, weights.dtype), weights.shape)
    # float32 with numba: exp(s - max) and the row sums in one compiled pass, then divide
    total = softmax_numerator(weights, [] if bias is None else [bias])  # (..., seq_q, 1)
    if total is not None:
        np.divide(weights, total, out=weights)  # the weights
    else:
        _softmax_rows(weights, weights, bias)  # scores -> weights, in place
    return np.matmul(weights, v), weights  # (batch, heads, seq_q, d_v), weights


def _attention_tiled(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, causal: bool,
    scale: float, keep_weights: bool = True, slopes: np.ndarray | None = None,
    sigmoid_shift: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """Attention one tile at a time: a tile is one (batch, head) and a block of query
    rows, rows * seq_k about ``_TILE_ELEMENTS``, so that its slice of the weights stays
    in the core's cache from the scores product to the product with v:

        W[rows] = q[rows] k^T * scale          (BLAS, written straight into the weights)
        W[rows] = softmax(where(mask, W[rows], -inf))   (in place, while W[rows] is hot)
        out[rows] = W[rows] v                  (BLAS)

    The weights are written to memory once and read back from the cache, where the
    whole-array version writes them, reads them for the softmax and again for W v.
    (Measured on a 2-core EPYC at (1, 8, 2048, 64): on one thread that saves little, the
    passes are bound by arithmetic; the gain is on two, where whole-array products on
    two BLAS threads and softmax blocks on the pool kept handing work back and forth.)

    With causal=True, a tile's query rows see keys only up to the last row's position,
    so the keys after that are neither multiplied nor read: their weights are set to 0.

    Tiles are independent: they run on the thread pool, one tile per task, with BLAS
    held to one thread meanwhile (the pool is the parallelism); where BLAS's threads
    cannot be held (not OpenBLAS) or the pool has one thread, they run one after another
    here, each product on BLAS's own threads.

    When a whole head is smaller than a tile, a tile takes several heads, and when all
    heads are, several batch entries (stacked products; at (32, 12, 32, 32) this took
    the call from 6.5 to 1.9 ms: one tile per (batch, heads) was mostly Python calls).
    ``keep_weights=False`` (blockwise attention) computes each tile in a
    scratch buffer of its thread, reused from tile to tile, and returns (output, None):
    the (seq_q x seq_k) weights never exist, the extra memory is one tile per thread.
    Softmax's division then moves after the product, as in FlashAttention:
    out[rows] = (exp(S - max) v) / rowsum, a pass over r x d_v numbers instead of r x seq_k.
    Grouped-query heads are read in place (query head i uses key/value head
    i // (heads / heads_kv)), never repeated in memory.
    """
    batch, heads, seq_q, _ = q.shape
    heads_kv, seq_k, d_v = v.shape[1:]
    group = heads // heads_kv
    offset = seq_k - seq_q  # query i sits at key position i + offset (causal)
    weights = np.empty((batch, heads, seq_q, seq_k), dtype=q.dtype) if keep_weights else None
    output = np.empty((batch, heads, seq_q, d_v), dtype=q.dtype)
    bias = None  # the mask as 0 / -inf to add (see _softmax_block)
    if mask is not None:
        bias = np.broadcast_to(_additive(mask, q.dtype), (batch, heads, seq_q, seq_k))  # a view
    rows = max(1, min(seq_q, _TILE_ELEMENTS // seq_k))  # query rows per tile
    # Short sequences: several whole heads, even several batch entries, per tile, one
    # stacked product each, so that a tile is not a few microseconds of work behind a
    # Python call; but at least two tiles per thread when the batch allows it.
    per_tile, per_batch = 1, 1  # heads, batch entries per tile
    if rows == seq_q and group == 1:
        per_tile = max(1, min(heads, _TILE_ELEMENTS // (seq_q * seq_k)))
        # Fewer batch entries than threads: share the heads, so that the products run on
        # the pool at one BLAS thread each, never on BLAS's own threads (seq 256, batch 1,
        # loaded machine: medians 33 -> 3 ms; OpenBLAS's workers wait on busy cores).
        if batch < get_num_threads():
            per_tile = min(per_tile, -(-heads // get_num_threads()))
        if per_tile == heads:
            fits = max(1, _TILE_ELEMENTS // (heads * seq_q * seq_k))
            per_batch = min(fits, -(-batch // (2 * get_num_threads())))
    scratch = threading.local()  # keep_weights=False: each thread's tile buffer

    def scores_buffer(bs: slice, hs: slice, start: int, end: int, n: int) -> np.ndarray:
        """Where a tile's scores go: its slice of the weights (nb, g, r, seq_k), or the
        first nb g r n numbers of its thread's scratch as one C-contiguous (nb, g, r, n)
        array (a compiled kernel's loops then run over unit strides)."""
        if weights is not None:
            return weights[bs, hs, start:end]  # (nb, g, r, seq_k)
        if getattr(scratch, "buffer", None) is None:
            scratch.buffer = np.empty(per_batch * per_tile * rows * seq_k, dtype=q.dtype)
        shape = (bs.stop - bs.start, hs.stop - hs.start, end - start, n)
        return scratch.buffer[: math.prod(shape)].reshape(shape)  # (nb, g, r, n)

    def tile(job: tuple[int, int, int]) -> None:
        b, h, start = job
        bs = slice(b, min(b + per_batch, batch))  # the batch entries of this tile
        hs = slice(h, min(h + per_tile, heads))  # its query heads
        kv = slice(h // group, h // group + 1) if group > 1 else hs  # their key/value heads
        end = min(start + rows, seq_q)
        n = seq_k if not causal else max(0, min(seq_k, end + offset))  # keys seen
        w = scores_buffer(bs, hs, start, end, n)  # (nb, g, r, seq_k or n)
        o = output[bs, hs, start:end]  # (nb, g, r, d_v)
        w[..., n:] = 0  # after every row's position (causal): weight 0
        if n == 0:  # no key for any row here
            o[...] = 0
            return
        w = w[..., :n]  # (nb, g, r, n)
        biases = [] if bias is None else [bias[bs, hs, start:end, :n]]  # (nb, g, r, n)
        if causal:
            position = np.arange(start + offset, end + offset)  # (r,) each query's position
            allowed = np.arange(n) <= position[:, None]  # (r, n)
            biases.append(_additive(allowed, w.dtype))  # (r, n)
        if slopes is not None:  # ALiBi: -m_h |p_i - j|, made per tile, never (seq_q, seq_k)
            position = np.arange(start + offset, end + offset, dtype=w.dtype)  # (r,)
            distance = np.abs(position[:, None] - np.arange(n, dtype=w.dtype))  # (r, n)
            biases.append(-slopes[hs, None, None] * distance)  # (g, r, n)
        k_h = k[bs, kv, :n]  # (nb, g or 1, n, d)
        np.matmul(q[bs, hs, start:end] * scale, np.swapaxes(k_h, -1, -2), out=w)  # scores
        if sigmoid_shift is None and weights is None:  # softmax, weights not kept:
            total = softmax_numerator(w, biases)  # exp(s - max), (.., r, 1): compiled kernel
            if total is None:  # (numba missing or off, float64, an inf or NaN score)
                total = _softmax_block(w, None, biases, normalize=False)
            np.matmul(w, v[bs, kv, :n], out=o)  # (nb, g, r, d_v)
            np.divide(o, total, out=o)  # softmax(s) v, one pass over o instead of over w
            return
        if sigmoid_shift is None:
            _softmax_block(w, None, biases)  # (nb, g, r, n) weights, in place
        else:  # sigmoid attention, the plugin's steps: w = (1 + tanh((s - log n) / 2)) / 2
            np.subtract(w, sigmoid_shift, out=w)
            np.multiply(w, 0.5, out=w)
            np.tanh(w, out=w)
            np.multiply(w, 0.5, out=w)
            np.add(w, 0.5, out=w)
        np.matmul(w, v[bs, kv, :n], out=o)  # (nb, g, r, d_v)

    jobs = [
        (b, h, start)
        for b in range(0, batch, per_batch)
        for h in range(0, heads, per_tile)
        for start in range(0, seq_q, rows)
    ]
    if get_num_threads() == 1 or len(jobs) == 1 or not _can_pin_blas():
        for job in jobs:
            tile(job)
    else:
        _map_with_blas_on_pool(tile, jobs)
    return output, weights


def layer_norm(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Same as :func:`tinytx.functional.layer_norm`; x (..., d) -> (..., d). float32 with
    numba: the fused kernel of :mod:`tinytx.backends.numba_kernels`, within rounding."""
    from tinytx.backends import numba_kernels

    params = [p for p in (weight, bias) if p is not None]
    if any(p.dtype != x.dtype or p.shape != x.shape[-1:] for p in params):
        return NotImplemented  # mixed dtypes or unusual shapes: the definition handles them
    out = np.empty(x.shape, dtype=x.dtype)
    x_rows, out_rows = _as_rows(x), _as_rows(out)  # (..., rows, d)
    overflowed = []  # blocks whose sums or squares overflowed (or met NaN / inf)
    if numba_kernels.covers(x):  # float32 with numba: mean, var and output in one kernel
        w = np.ones(x.shape[-1:], dtype=x.dtype) if weight is None else weight  # (d,)
        b = np.zeros(x.shape[-1:], dtype=x.dtype) if bias is None else bias  # (d,)

        def fused(block: tuple[Any, ...]) -> None:
            if not numba_kernels.layer_norm(x_rows[block], w, b, eps, out_rows[block]):
                overflowed.append(block)

        if out.size:
            _for_each_block(fused, out_rows)
        return NotImplemented if overflowed else out

    def work(block: tuple[Any, ...]) -> None:
        o = out_rows[block]  # (..., r, d)
        xs = x_rows[block]  # (..., r, d)
        mean = np.mean(xs, axis=-1, keepdims=True)  # (..., r, 1)
        np.subtract(xs, mean, out=o)  # centred
        var = np.mean(o * o, axis=-1, keepdims=True)  # (..., r, 1)
        if not np.all(np.isfinite(var) & (var + eps > 0)):  # overflow, NaN, or 0 / 0
            overflowed.append(block)
        np.divide(o, np.sqrt(var + eps), out=o)
        if weight is not None:
            np.multiply(o, weight, out=o)
        if bias is not None:
            np.add(o, bias, out=o)

    if out.size:
        with np.errstate(over="ignore", invalid="ignore"):
            _for_each_block(work, out_rows)
    if overflowed:  # the definition scales such rows down first (exact for the others)
        return NotImplemented
    return out


def embedding_backward(grad_y: np.ndarray, ids: np.ndarray, num_embeddings: int) -> np.ndarray:
    """Same as :func:`tinytx.functional.embedding_backward`: row v of the result is the sum
    of the rows of grad_y whose id is v. Instead of a one-hot product (num_embeddings x n
    multiply-adds per column) the rows are sorted by id and each run of equal ids summed
    with ``np.add.reduceat`` (5-10x faster than ``np.add.at``).

    grad_y: (..., d); ids: integer (...) in [0, num_embeddings) -> (num_embeddings, d).
    """
    if grad_y.dtype.kind != "f":
        return NotImplemented
    d = grad_y.shape[-1]
    out = np.zeros((num_embeddings, d), dtype=grad_y.dtype)  # (V, d)
    flat_ids = ids.reshape(-1)  # (n,)
    if flat_ids.size == 0:
        return out
    order = np.argsort(flat_ids, kind="stable")  # (n,)  positions grouped by id
    sorted_ids = flat_ids[order]  # (n,)
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # (u,) run starts
    sums = np.add.reduceat(grad_y.reshape(-1, d)[order], starts, axis=0)  # (u, d)
    out[sorted_ids[starts]] = sums
    return out


def relu(x: np.ndarray) -> np.ndarray:
    """Same as :func:`tinytx.functional.relu`: max(x, 0) elementwise."""
    out = np.empty_like(x)
    x_rows, out_rows = _as_rows(x), _as_rows(out)
    zero = x.dtype.type(0)

    def work(block: tuple[Any, ...]) -> None:
        np.maximum(x_rows[block], zero, out=out_rows[block])

    if out.size:
        _for_each_block(work, out_rows)
    return out


# Weight-only int8 (tinytx.quantize.int8_weights): {id(float weight): (float weight, Q, s)}
# for the products inside a `with` block; linear then reads Q instead of the weight.
_int8_table: contextvars.ContextVar[dict[int, tuple[Any, Any, Any]] | None]
_int8_table = contextvars.ContextVar("tinytx_int8_weights", default=None)


@contextmanager
def use_int8_weights(table: dict[int, tuple[Any, Any, Any]]) -> Iterator[None]:
    """Inside: products with a weight in ``table`` use its int8 copy (scoped, context-local).

    BLAS is held to one thread meanwhile: the int8 kernel's own threads do the large
    products, and OpenBLAS workers left spinning after a threaded product (the attention's,
    say) would take the cores they need (measured: decode 3x slower without this)."""
    token = _int8_table.set({**(_int8_table.get() or {}), **table})
    try:
        with _blas_single_threaded():
            yield
    finally:
        _int8_table.reset(token)


def _int8_copy(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(Q, s) for ``weight`` inside ``use_int8_weights``: its own entry, or the rows of its
    base array's entry when it is a block of rows of a quantized weight (attention's
    packed in_proj_weight[start:stop]); None otherwise."""
    table = _int8_table.get()
    if not table:
        return None
    entry = table.get(id(weight))
    if entry is not None and entry[0] is weight:
        return entry[1], entry[2]
    base = weight.base
    entry = None if base is None else table.get(id(base))
    if entry is None or entry[0] is not base or base.ndim != 2 or weight.ndim != 2:
        return None
    if weight.strides != base.strides or weight.shape[1] != base.shape[1]:
        return None  # not whole rows
    start, partial = divmod(weight.ctypes.data - base.ctypes.data, base.strides[0])
    if partial or start < 0 or start + weight.shape[0] > base.shape[0]:
        return None
    rows = slice(start, start + weight.shape[0])
    return entry[1][rows], entry[2][rows]


# Products with at least this many rows per thread run on the pool (see linear). The
# rule: BLAS kernels work on panels of 4 to 32 rows (x86 AVX2/AVX-512 and ARM NEON/SVE
# micro-kernels alike); with fewer rows per thread a share is matrix-vector-like,
# bound by reading the weight, and splitting it gains nothing.
_POOL_ROWS_PER_THREAD = 32


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Same as :func:`tinytx.functional.linear` (x W^T + b), with the bias added in place.

    Many rows: the rows are split between the pool's threads, each multiplying its share
    on a single-threaded BLAS and adding the bias while the result is in cache. Left to
    itself, OpenBLAS's idle worker threads spin for a while (about 0.1 s) after every
    multi-threaded product, on the same cores where the pool's element-wise work and
    attention tiles come next. Measured on the 2-core EPYC, median of 6 alternating runs:
    the embed benchmark 4.48 -> 3.95 s, and the encoder block 148 -> 122 ms (10 runs).
    Few rows (a decode step's matrix-vector products) go to the compiled kernel of
    :mod:`tinytx.backends.matvec_kernels` where numba is installed (it reads the weights
    faster than OpenBLAS's matrix-vector kernel), else stay on OpenBLAS's own threads.

    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,) -> (..., d_out).
    """
    if (
        x.ndim < 1
        or weight.ndim != 2
        or x.dtype != weight.dtype
        or (bias is not None and bias.dtype != x.dtype)
    ):
        return NotImplemented
    n = math.prod(x.shape[:-1])
    rows = x.reshape(n, x.shape[-1])  # (n, d_in): one product, no loop
    threads = get_num_threads()
    quantized = _int8_copy(weight)  # inside tinytx.quantize.int8_weights
    if quantized is not None and x.dtype == np.float32:
        from tinytx.backends.int8_kernels import int8_matmul

        q, scale = quantized
        y = int8_matmul(rows, q, scale, bias, threads)  # (n, d_out), reads Q: 1 byte a weight
        return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., d_out)
    if threads == 1 or n < _POOL_ROWS_PER_THREAD * threads or not _can_pin_blas():
        y = few_rows_matmul(rows, weight, bias, threads)  # decoding: the compiled kernel
        if y is not None:  # (n, d_out), the bias added
            return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., d_out)
        if threads > 1 and _can_pin_blas() and weight.shape[0] >= threads * _POOL_ROWS_PER_THREAD:
            y = _split_outputs_on_pool(rows, weight, bias, threads)  # (n, d_out)
            return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., d_out)
        y = np.matmul(rows, weight.T)  # (n, d_out)
        if bias is not None and y.size:

            def add_bias(block: tuple[Any, ...]) -> None:
                np.add(y[block], bias, out=y[block])

            _for_each_block(add_bias, y)
        return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., d_out)

    y = np.empty((n, weight.shape[0]), dtype=x.dtype)  # (n, d_out)

    def product(share: slice) -> None:
        np.matmul(rows[share], weight.T, out=y[share])  # (r, d_out)
        if bias is not None:
            np.add(y[share], bias, out=y[share])

    size = -(-n // threads)  # rows per thread, rounded up
    _map_with_blas_on_pool(product, [slice(s, min(s + size, n)) for s in range(0, n, size)])
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., d_out)


def _split_outputs_on_pool(
    rows: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, threads: int
) -> np.ndarray:
    """rows W^T + b for too few rows to split (a prompt's): W's rows, the outputs, split
    between the pool's threads instead, each multiplying all the rows by its block of W
    on a single-threaded BLAS, so each thread reads only its part of W. OpenBLAS's own
    threads would do the same split, but then spin for about 0.1 s on the cores where
    decoding's threads come next: measured on the 2-core EPYC, the first three or four
    tokens after a 32-token prompt took 30-47 ms instead of 20 ms.

    rows: (n, d_in); weight: (d_out, d_in); bias: (d_out,) or None -> (n, d_out).
    """
    y = np.empty((rows.shape[0], weight.shape[0]), dtype=rows.dtype)  # (n, d_out)

    def product(outputs: slice) -> None:
        np.matmul(rows, weight[outputs].T, out=y[:, outputs])  # (n, outputs)
        if bias is not None:
            np.add(y[:, outputs], bias[outputs], out=y[:, outputs])

    size = -(-weight.shape[0] // threads)  # outputs per thread, rounded up
    shares = [slice(s, min(s + size, weight.shape[0])) for s in range(0, weight.shape[0], size)]
    _map_with_blas_on_pool(product, shares)
    return y


def decoder_stack(
    keys: list[np.ndarray],
    values: list[np.ndarray],
    blocks: list[tuple[Any, ...]],
    head: tuple[Any, ...] | None = None,
) -> Any:
    """New tokens, one at a time, through a stack of pre-norm decoder blocks, and the head
    if given (see :func:`tinytx.layers.blocks.prepare_one_token_steps`), each compiled as
    one function with one team of threads: :func:`tinytx.backends.matvec_kernels.
    prepare_stack_step`, the caches and weights checked and gathered once, here.
    keys[i], values[i]: block i's (heads_kv, max_len, d_head) buffers; blocks[i]: block
    i's norms, products, activation and scale; head: the final norm's weight, bias, eps
    and the output layer's weight, bias -> ``step(x, position)``: x (d,), written into the
    caches at ``position`` -> (y, n): n stages ran (the blocks, then the head; y: the
    logits (vocab,) if the head ran, else the last block's output (d,)), on tinytx's
    thread count. NotImplemented where the kernel does not apply, from ``step`` too
    (a full cache), and inside :func:`tinytx.quantize.int8_weights`.
    """
    if _int8_table.get() is not None:  # inside int8_weights: the products read int8 copies
        return NotImplemented
    prepared = prepare_stack_step(keys, values, blocks, head)
    if prepared is None:
        return NotImplemented

    def step(x: np.ndarray, position: int) -> Any:
        if _int8_table.get() is not None:  # int8_weights entered since
            return NotImplemented
        result = prepared(x, position, get_num_threads())
        return NotImplemented if result is None else result

    return step


# The rules for a matrix product (see matmul). Waking a thread, BLAS's or the pool's,
# costs some 10-50 microseconds; a core multiplies at 20-100 GFLOP/s (x86 AVX2 to
# AVX-512, ARM NEON). So a product below about a million multiply-adds per thread is done
# on one thread, the caller's, without waking any.
_THREADED_MIN_FLOPS_PER_THREAD = 1 << 21


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Same as ``xp.matmul(a, b)``: a (..., m, k) @ b (..., k, n) -> (..., m, n).

    Where the threads go, by rule (no per-machine constants):

    - small products (under ``_THREADED_MIN_FLOPS_PER_THREAD`` per thread): on the
      caller's thread with BLAS held to one thread, so no BLAS worker wakes up (and then
      spins idle for a while on a core the next pass needs);
    - one matrix b (2-D, a layer's weight) and many rows of a (``_POOL_ROWS_PER_THREAD``
      per thread or more): a's rows split between the pool's threads, as in :func:`linear`
      (the products of a training step's backward: dy W and dy^T x);
    - a stack of products (a.shape[:-2] == b.shape[:-2], at least one per thread): the
      stack split between the pool's threads, each multiplying its share on a
      single-threaded BLAS, as the attention tiles do;
    - otherwise one call, on BLAS's own threads.

    The products are BLAS's in every case, so the numbers are ``np.matmul``'s.
    """
    if a.ndim < 2 or b.ndim < 2 or a.dtype != b.dtype or a.dtype.kind not in "fc":
        return NotImplemented
    threads = get_num_threads()
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    stack_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    stack = math.prod(stack_shape)
    flops = 2 * stack * m * k * n
    if threads == 1 or not _can_pin_blas() or flops == 0:
        return np.matmul(a, b)
    if flops < threads * _THREADED_MIN_FLOPS_PER_THREAD:
        with _blas_single_threaded():
            return np.matmul(a, b)  # (..., m, n)
    rows = math.prod(a.shape[:-1])
    if b.ndim == 2 and rows >= _POOL_ROWS_PER_THREAD * threads:
        return _rows_on_pool(a, b, threads)  # (..., m, n)
    if a.shape[:-2] != b.shape[:-2] or stack < threads:
        return np.matmul(a, b)  # (..., m, n), on BLAS's threads
    a3 = a.reshape(stack, m, k)  # (stack, m, k), a view when a is contiguous
    b3 = b.reshape(stack, k, n)  # (stack, k, n)
    out = np.empty((stack, m, n), dtype=a.dtype)  # (stack, m, n)

    def product(share: slice) -> None:
        np.matmul(a3[share], b3[share], out=out[share])

    size = -(-stack // threads)  # products per thread, rounded up
    _map_with_blas_on_pool(product, [slice(s, min(s + size, stack)) for s in range(0, stack, size)])
    return out.reshape(*stack_shape, m, n)  # (..., m, n)


def _rows_on_pool(a: np.ndarray, b: np.ndarray, threads: int) -> np.ndarray:
    """a (..., m, k) @ b (k, n) -> (..., m, n): all of a's rows as one (rows, k) matrix,
    split between the pool's threads, each multiplying its share on a single-threaded BLAS.
    A transposed a (dy^T of a weight's gradient) is split without a copy."""
    k, n = b.shape
    flat = a.reshape(-1, k)  # (rows, k), a view when a's leading axes allow it
    out = np.empty((flat.shape[0], n), dtype=a.dtype)  # (rows, n)

    def product(share: slice) -> None:
        np.matmul(flat[share], b, out=out[share])  # (r, n)

    size = -(-flat.shape[0] // threads)  # rows per thread, rounded up
    shares = [slice(s, min(s + size, flat.shape[0])) for s in range(0, flat.shape[0], size)]
    _map_with_blas_on_pool(product, shares)
    return out.reshape(*a.shape[:-1], n)  # (..., m, n)


def _blockwise(kernel: Callable[..., None], *inputs: np.ndarray) -> np.ndarray:
    """out = kernel(*inputs) element-wise, one call per row block on the pool; the inputs
    have one shape. ``kernel(*input_blocks, out_block)`` fills a C-contiguous block."""
    out = np.empty(inputs[0].shape, dtype=inputs[0].dtype)  # C order: blocks are contiguous
    rows = [_as_rows(a) for a in inputs]
    out_rows = _as_rows(out)
    if out.size:
        _for_each_block(lambda block: kernel(*(a[block] for a in rows), out_rows[block]), out_rows)
    return out


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """Same as :func:`tinytx.functional.gelu` (exact form), bit for bit: the same erfc fit,
    the same operations in the same order, on cache-sized blocks with scratch buffers.
    float32 with numba: the fused kernel of :mod:`tinytx.backends.numba_kernels` instead
    (within rounding: it fuses multiply-adds and computes exp itself).

    x: any shape -> same shape. The tanh form is left to the definition (NotImplemented).
    """
    from tinytx.backends import numba_kernels
    from tinytx.functional import _ERFC_COEFFS

    if approximate != "none" or x.dtype.kind != "f":
        return NotImplemented
    if numba_kernels.covers(x):  # float32 with numba: one compiled pass per block
        return _blockwise(numba_kernels.gelu, x)
    out = np.empty_like(x)
    x_rows, out_rows = _as_rows(x), _as_rows(out)
    root_half = 1.0 / math.sqrt(2.0)

    def work(block: tuple[Any, ...]) -> None:
        xs, o = x_rows[block], out_rows[block]  # (..., r, n)
        size = np.abs(xs)  # |x|
        np.minimum(size, 1e4, out=size)  # capped as the definition: no inf * 0 at +-inf
        z = np.multiply(size, root_half)  # z = |x| / sqrt(2) >= 0
        t = np.multiply(z, 0.5)
        np.add(t, 1.0, out=t)
        np.divide(1.0, t, out=t)  # t = 1 / (1 + z/2)
        poly = np.full_like(z, _ERFC_COEFFS[-1])
        for c in reversed(_ERFC_COEFFS[:-1]):  # Horner: poly = c + t * poly
            np.multiply(t, poly, out=poly)
            np.add(poly, c, out=poly)
        np.multiply(z, z, out=z)  # z^2
        np.subtract(poly, z, out=poly)  # -z^2 + P(t)
        np.exp(poly, out=poly)
        np.multiply(t, poly, out=t)  # erfc(z) = 2 Phi(-|x|)
        np.multiply(size, 0.5, out=size)
        np.multiply(size, t, out=size)  # |x|/2 * erfc(z)
        np.maximum(xs, 0.0, out=o)
        np.subtract(o, size, out=o)  # max(x, 0) - |x|/2 * erfc(|x| / sqrt 2)

    if out.size:
        _for_each_block(work, out_rows)
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """:func:`tinytx.functional.gelu` with ``approximate="tanh"`` (GPT-2's), for float32
    with numba: the fused kernel of :mod:`tinytx.backends.numba_kernels`, within rounding
    (it computes x sigmoid(2u), the same number as x/2 (1 + tanh u)). Anything else is
    left to the definition (NotImplemented). x: any shape -> same shape."""
    from tinytx.backends import numba_kernels

    if not numba_kernels.covers(x):
        return NotImplemented
    return _blockwise(numba_kernels.gelu_tanh, x)


def adamw_update(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, **constants: Any
) -> Any:
    """:meth:`tinytx.optim.AdamW.step`'s update of one parameter, in place, with numba:
    one compiled pass with the same operations in the same order (bit for bit; the
    keyword constants are :func:`tinytx.backends.numba_kernels.adamw_update`'s).
    NotImplemented without numba or for arrays it does not take; the definition runs."""
    from tinytx.backends import numba_kernels

    if not numba_kernels.enabled():
        return NotImplemented
    return None if numba_kernels.adamw_update(p, g, m, v, **constants) else NotImplemented


NATIVES: dict[str, Callable[..., Any]] = {
    "softmax": softmax,
    "scaled_dot_product_attention": scaled_dot_product_attention,
    "blockwise_attention": blockwise_attention,
    "blockwise_attention_backward": blockwise_attention_backward,
    "layer_norm": layer_norm,
    "relu": relu,
    "linear": linear,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "adamw_update": adamw_update,
    "embedding_backward": embedding_backward,
    "sum_over_batch_parts": sum_over_batch_parts,
    "decoder_stack": decoder_stack,
    "matmul": matmul,
    "alibi_attention": alibi_attention,
    "sigmoid_attention": sigmoid_attention,
}
