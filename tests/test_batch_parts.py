"""A batch computed in parts side by side: the numpy backend's ``sum_over_batch_parts``,
through which ``tinytx.loss_and_grads`` runs one part of the batch per thread.

Two checks. The native's mechanics, bit for bit: its result is the serial sum, in part
order, of the parts' shares computed one after another. The shares' arithmetic, within
rounding: the parts' loss and gradients equal the whole batch's, whatever positions the
targets ignore (each part's share is weighted by its kept positions).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytx
from tinytx.backends import numpy_natives
from tinytx.backward import _loss_share_and_grads
from tinytx.models.gpt import GPT, GPTConfig

EPS64 = float(np.finfo(np.float64).eps)
CONFIG = GPTConfig(vocab_size=7, context_length=8, d_model=8, n_heads=2, n_layers=2)


@pytest.fixture(autouse=True)
def two_threads_any_size(monkeypatch: pytest.MonkeyPatch):
    """Two threads, and parts of any size: the small inputs below are split."""
    monkeypatch.setattr(numpy_natives, "_PART_MIN_POSITIONS", 1)
    before = numpy_natives.get_num_threads()
    numpy_natives.set_num_threads(2)
    yield
    numpy_natives.set_num_threads(before)


def model_and_batch(backend, dtype: str, seed: int, batch: int, seq: int, ignored: float):
    rng = np.random.default_rng(seed)
    model = GPT(CONFIG, seed=seed).to(backend, dtype=dtype)
    ids = rng.integers(0, CONFIG.vocab_size, (batch, seq))
    targets = np.where(rng.random((batch, seq)) < ignored, -100, rng.integers(0, 7, (batch, seq)))
    return model, backend.asarray(ids), backend.asarray(targets)


def kept(targets: np.ndarray) -> int:
    return int(np.sum(np.asarray(targets) != -100))


def test_numpy_backend_lists_it(numpy_backend) -> None:
    assert numpy_backend.natives["sum_over_batch_parts"] is numpy_natives.sum_over_batch_parts


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_parts_add_up_as_computed_one_after_another(numpy_backend, dtype) -> None:
    """Bit for bit: each part is the same computation on one thread, added in part order."""
    model, ids, targets = model_and_batch(numpy_backend, dtype, 3, batch=5, seq=6, ignored=0.3)
    n = kept(targets)
    work = lambda i, t: _loss_share_and_grads(model, i, t, kept=n)  # noqa: E731
    loss, grads = numpy_natives.sum_over_batch_parts(work, ids, targets)

    serial_loss, serial = 0.0, None
    with numpy_natives._blas_single_threaded():
        for part in (slice(0, 3), slice(3, 5)):  # 5 sequences on 2 threads: 3 + 2
            with numpy_natives._one_thread_here():
                share, part_grads = work(ids[part], targets[part])
            serial_loss += share
            serial = part_grads if serial is None else {
                key: serial[key] + part_grads[key] for key in serial
            }  # fmt: skip
    assert loss == serial_loss
    assert list(grads) == list(serial)
    for key in grads:
        np.testing.assert_array_equal(grads[key], serial[key], err_msg=key)


@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(2, 6),
    seq=st.integers(1, 8),
    ignored=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
)
def test_loss_and_grads_in_parts_equal_the_whole_batch(numpy_backend, seed, batch, seq, ignored):
    """In float64. The split changes only the order in which the positions' terms are added
    over the batch: two orders of a sum of n terms differ by at most 2 n eps times the sum
    of the terms' sizes. Each sequence's own gradient stands in for its terms' sizes, with
    a factor 2 to spare, normwise (the largest such sum in the tensor): within a sequence
    the terms of one entry can cancel, and the entries of a weight's gradient are sums
    over the same rows. A part weighted wrongly (say by its sequences, not its kept
    positions) is off by a fraction of the gradient itself."""
    model, ids, targets = model_and_batch(numpy_backend, "float64", seed, batch, seq, ignored)
    n = kept(targets)
    loss, grads = tinytx.loss_and_grads(model, ids, targets)  # in parts (two threads)
    whole_loss, whole = _loss_share_and_grads(model, ids, targets, kept=n)  # one piece

    positions = batch * seq
    assert abs(loss - whole_loss) <= 4 * positions * EPS64 * whole_loss  # CE terms are >= 0
    sizes = {key: np.zeros(value.shape) for key, value in whole.items()}
    for b in range(batch):  # the sum over sequences of |a sequence's gradient|
        _, alone = _loss_share_and_grads(model, ids[b : b + 1], targets[b : b + 1], kept=n)
        for key in sizes:
            sizes[key] += np.abs(alone[key])
    for key in whole:
        bound = 4 * positions * EPS64 * np.max(sizes[key], initial=0.0)
        assert np.max(np.abs(grads[key] - whole[key]), initial=0.0) <= bound, key


def test_declined_where_a_split_does_not_pay(numpy_backend, monkeypatch) -> None:
    model, ids, targets = model_and_batch(numpy_backend, "float64", 1, batch=4, seq=8, ignored=0)
    work = lambda i, t: _loss_share_and_grads(model, i, t, kept=32)  # noqa: E731
    single = numpy_natives.sum_over_batch_parts(work, ids[:1], targets[:1])
    assert single is NotImplemented  # one sequence
    monkeypatch.setattr(numpy_natives, "_PART_MIN_POSITIONS", 9)  # isqrt(32 // 9) = 1 part
    assert numpy_natives.sum_over_batch_parts(work, ids, targets) is NotImplemented
    monkeypatch.setattr(numpy_natives, "_PART_MIN_POSITIONS", 8)  # isqrt(32 // 8) = 2 parts
    assert numpy_natives.sum_over_batch_parts(work, ids, targets) is not NotImplemented
    numpy_natives.set_num_threads(1)
    assert numpy_natives.sum_over_batch_parts(work, ids, targets) is NotImplemented


def test_an_error_in_a_part_is_raised_to_the_caller(numpy_backend) -> None:
    ids = numpy_backend.asarray(np.zeros((4, 3), dtype=np.int64))

    def work(i, t):
        if i.shape[0] and int(np.asarray(t)[0, 0]) == 1:  # the second part only
            raise ValueError("part two failed")
        return 0.0, {}

    targets = numpy_backend.asarray(np.array([[0] * 3] * 2 + [[1] * 3] * 2))
    with pytest.raises(ValueError, match="part two failed"):
        numpy_natives.sum_over_batch_parts(work, ids, targets)


def test_parts_run_on_their_own_cores_and_give_them_back(numpy_backend) -> None:
    """Each part's thread is held to one core while it runs (so the operating system
    cannot stack both on one), one thread per core; afterwards every thread has its own
    cores back. Inside a part the natives see one thread."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    seen = []

    def work(i, t):
        cores = os.sched_getaffinity(0) if usable is not None else None
        seen.append((cores, numpy_natives.get_num_threads()))
        return 1.0, {"g": np.ones(2)}

    ids = numpy_backend.asarray(np.zeros((4, 3), dtype=np.int64))
    total, arrays = numpy_natives.sum_over_batch_parts(work, ids, ids)
    assert total == 2.0
    np.testing.assert_array_equal(arrays["g"], [2.0, 2.0])
    assert [threads for _, threads in seen] == [1, 1]
    if usable is not None:
        assert sorted(next(iter(cores)) for cores, _ in seen) == sorted(
            usable[i % len(usable)] for i in range(2)
        )
        assert all(len(cores) == 1 for cores, _ in seen)
        assert sorted(os.sched_getaffinity(0)) == usable
    assert numpy_natives.get_num_threads() == 2
