"""Seq2Seq, its decoders and its tasks: gradients, decoding, save/load, bad input, seeds.

Models here are tiny (width 8-16, one or two layers) so that every test takes well under
a second; training runs only a few dozen steps.
"""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinytx
from tinytx.models.seq2seq import Seq2Seq, Seq2SeqConfig, seq2seq_loss_and_grads
from tinytx.pretrained import CheckpointError
from tinytx.tasks import (
    TASKS,
    Seq2SeqTask,
    TaskError,
    date_example,
    encode_texts,
    examples,
    seq2seq_tokenizer,
)
from tinytx.translate import beam_search, greedy_decode, score_sequences, translate

VOCAB = 12


def _config(**overrides) -> Seq2SeqConfig:
    settings = dict(
        vocab_size=VOCAB, d_model=8, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
        d_ff=16, max_source_len=8, max_target_len=6,
    )  # fmt: skip
    settings.update(overrides)
    return Seq2SeqConfig(**settings)


def _ids(backend: tinytx.Backend, rows: list[list[int]]):
    return backend.asarray(np.asarray(rows, dtype=np.int64))


# --- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # shared source/target table, tied head (the paper's 3.4)
        {"share_embeddings": False, "tie_head": True},
        {"share_embeddings": False, "tie_head": False, "norm_first": True},
        {"share_embeddings": True, "tie_head": False, "activation": "gelu"},
    ],
)
def test_loss_gradients_match_finite_differences(backend, overrides) -> None:
    """dL/dθ along a random direction u equals (L(θ + h u) - L(θ - h u)) / 2h in float64.

    Central differences err by O(h^2 L''') ~ 1e-12 at h = 1e-5 and by rounding
    ~eps L / h ~ 1e-11; 1e-6 relative leaves room and catches any missing term (a tied
    table's forgotten use changes the product by O(1))."""
    model = Seq2Seq(_config(**overrides), backend=backend, seed=3).to(dtype="float64")
    src = _ids(backend, [[4, 5, 6, 7, 0], [8, 9, 10, 0, 0]])
    tgt_in = _ids(backend, [[1, 4, 4, 5], [1, 11, 0, 0]])
    tgt_out = _ids(backend, [[4, 4, 5, 2], [11, 2, -100, -100]])
    lengths = ([4, 3], [4, 2])
    loss, grads = seq2seq_loss_and_grads(model, src, tgt_in, tgt_out, *lengths)
    assert list(grads) == list(model.parameters())
    rng = np.random.default_rng(0)
    params = model.parameters()
    direction = {k: rng.normal(size=tuple(p.shape)) for k, p in params.items()}
    predicted = sum(float(np.sum(backend.to_numpy(grads[k]) * direction[k])) for k in params)
    originals = {k: backend.to_numpy(p).copy() for k, p in params.items()}
    h = 1e-5

    def loss_at(sign: float) -> float:
        model.load_state_dict({k: originals[k] + sign * h * direction[k] for k in params})
        return seq2seq_loss_and_grads(model, src, tgt_in, tgt_out, *lengths)[0]

    measured = (loss_at(1.0) - loss_at(-1.0)) / (2 * h)
    assert abs(predicted - measured) <= 1e-6 * max(abs(measured), 1.0)


def test_a_few_training_steps_reduce_the_loss(backend) -> None:
    from tinytx.optim import AdamW

    task = Seq2SeqTask("reverse", batch_size=16, eval_size=10, backend=backend)
    config = task.model_config(d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                               d_ff=32)  # fmt: skip
    model = Seq2Seq(config, backend=backend)
    optimizer = AdamW(model.parameters(), lr=1e-2)
    batch = task.batch(np.random.default_rng(0))
    losses = [task.loss(model, batch)]
    for _ in range(20):
        _, grads = task.loss_and_grads(model, batch)
        optimizer.step(grads)
        losses.append(task.loss(model, batch))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))  # falls at every step
    assert losses[-1] < 0.8 * losses[0]


# --- decoding ----------------------------------------------------------------------------


def _trained_looking(backend: tinytx.Backend, seed: int) -> Seq2Seq:
    """A random model with larger logits, so that greedy and beam search disagree often."""
    model = Seq2Seq(_config(tie_head=False), backend=backend, seed=seed)
    state = model.state_dict()
    state["head.weight"] = state["head.weight"] * 6.0
    return model.load_state_dict(state)


@given(seed=st.integers(0, 2**16), width=st.integers(2, 3))
def test_beam_search_scores_at_least_greedy(backend, seed, width) -> None:
    """Per input, the beam's best scores >= greedy's, both as the decoders scored them and
    rescored by one teacher-forced pass (float32 logits: ~1e-6 per token apart)."""
    model = _trained_looking(backend, seed)
    src = np.random.default_rng(seed).integers(3, VOCAB, size=(1, 5))
    beams = beam_search(model, src, beam_width=width, max_len=5)
    for row, beam in enumerate(beams):
        (greedy,) = greedy_decode(model, src[row : row + 1], max_len=5)
        assert beam.score >= greedy.score
        rescored = score_sequences(
            model, np.stack([src[row], src[row]]), [beam.tokens, greedy.tokens],
            finished=[beam.finished, greedy.finished],
        )  # fmt: skip
        steps = max(len(beam.tokens), len(greedy.tokens)) + 1
        assert rescored[0] >= rescored[1] - 1e-5 * steps


@given(seed=st.integers(0, 2**16))
def test_beam_width_one_is_greedy(backend, seed) -> None:
    model = _trained_looking(backend, seed)
    src = np.random.default_rng(seed).integers(3, VOCAB, size=(1, 5))
    (greedy,) = greedy_decode(model, src, max_len=5)
    (beam,) = beam_search(model, src, beam_width=1, max_len=5, keep_greedy=False)
    assert beam.tokens == greedy.tokens and beam.finished == greedy.finished
    assert beam.score == pytest.approx(greedy.score, abs=1e-9)


@given(seed=st.integers(0, 2**16), width=st.integers(1, 3))
def test_decoded_scores_equal_a_full_forward_pass(backend, seed, width) -> None:
    """The cached, step-by-step decoders score their output as one teacher-forced pass
    does (float32 logits: equal to ~1e-6 per token)."""
    model = _trained_looking(backend, seed)
    src = np.random.default_rng(seed).integers(3, VOCAB, size=(2, 6))
    lengths = [6, 3]
    for hypotheses in (
        greedy_decode(model, src, lengths, max_len=5),
        beam_search(model, src, lengths, beam_width=width, max_len=5, keep_greedy=False),
    ):
        scores = score_sequences(
            model, src, [h.tokens for h in hypotheses], lengths,
            finished=[h.finished for h in hypotheses],
        )  # fmt: skip
        steps = max(len(h.tokens) + 1 for h in hypotheses)
        np.testing.assert_allclose([h.score for h in hypotheses], scores, rtol=0, atol=1e-5 * steps)


def test_the_encoder_and_cross_projections_run_once_per_input(backend) -> None:
    """Greedy decodes a batch with one encoder pass; beam search (greedy candidate
    included) encodes each input once; each decoder layer projects the memory's
    cross-attention keys and values once per encoder pass, not once per step."""
    model = Seq2Seq(_config(n_decoder_layers=2), backend=backend)
    calls = {"encode": 0, "project": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    model.transformer.encode = counting("encode", model.transformer.encode)
    for layer in model.transformer.decoder.layers:
        attention = layer.multihead_attn
        attention.project_context = counting("project", attention.project_context)
    src = np.random.default_rng(0).integers(3, VOCAB, size=(3, 5))
    greedy_decode(model, src)
    assert calls == {"encode": 1, "project": 2}
    beam_search(model, src, beam_width=3)
    assert calls == {"encode": 1 + 3, "project": 2 + 3 * 2}


def test_greedy_batches_equal_single_inputs(backend) -> None:
    model = _trained_looking(backend, 7)
    src = np.random.default_rng(1).integers(3, VOCAB, size=(3, 6))
    lengths = [6, 2, 4]
    together = greedy_decode(model, src, lengths)
    for row, n in enumerate(lengths):
        (alone,) = greedy_decode(model, src[row : row + 1, :n])
        assert alone.tokens == together[row].tokens


# --- bad input ---------------------------------------------------------------------------


def test_bad_ids_and_lengths_are_clear_errors(backend) -> None:
    model = Seq2Seq(_config(), backend=backend)
    ok = _ids(backend, [[4, 5, 6]])
    with pytest.raises(ValueError, match=r"source has 9 positions .* at most 8 \(max_source_len"):
        model(_ids(backend, [[4] * 9]), ok)
    with pytest.raises(ValueError, match=r"target has 7 positions .* at most 6 \(max_target_len"):
        model(ok, _ids(backend, [[1] * 7]))
    with pytest.raises(ValueError, match=r"token id 12, outside the vocabulary \[0, 12\)"):
        model(_ids(backend, [[4, 12]]), ok)
    with pytest.raises(ValueError, match=r"token id -1, outside the vocabulary"):
        model(ok, _ids(backend, [[1, -1]]))
    with pytest.raises(ValueError, match=r"src_lengths must lie in \[0, 3\].*4"):
        model(ok, ok, src_lengths=[4])
    with pytest.raises(ValueError, match=r"tgt_lengths must lie in \[0, 3\].*-2"):
        model(ok, ok, tgt_lengths=[-2])
    with pytest.raises(ValueError, match=r"src_lengths must lie in \[0, 3\]"):
        greedy_decode(model, [[4, 5, 6]], [5])


@pytest.mark.parametrize("width", [0, -1, 1.5, True])
def test_beam_width_below_one_is_a_clear_error(backend, width) -> None:
    model = Seq2Seq(_config(), backend=backend)
    with pytest.raises(ValueError, match="beam_width must be an int >= 1"):
        beam_search(model, [[4, 5]], beam_width=width)


def test_bad_text_is_a_clear_error() -> None:
    tokenizer = seq2seq_tokenizer("abc ")
    with pytest.raises(TaskError, match=r"'é' is not in the model's vocabulary"):
        encode_texts(tokenizer, ["ab é"], 10)
    with pytest.raises(TaskError, match=r"'\[EOS\]' is not in the model's vocabulary"):
        encode_texts(tokenizer, ["a[EOS]"], 10)
    with pytest.raises(TaskError, match="has 5 characters; the model reads at most 4"):
        encode_texts(tokenizer, ["abcab"], 4)
    with pytest.raises(TaskError, match="non-empty string"):
        encode_texts(tokenizer, [""], 4)


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="d_model .* divisible by n_heads"):
        _config(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="eos_id 12 is outside the vocabulary"):
        _config(eos_id=12)


# --- saving and loading -----------------------------------------------------------------


def test_save_load_round_trip(backend, tmp_path) -> None:
    task = Seq2SeqTask("reverse", batch_size=4, eval_size=4, backend=backend)
    config = task.model_config(d_model=8, n_heads=2, n_encoder_layers=1, n_decoder_layers=2,
                               d_ff=16, share_embeddings=False, tie_head=False)  # fmt: skip
    model = Seq2Seq(config, backend=backend, seed=5)
    task.save(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "tinytx-seq2seq"
    loaded = tinytx.load_pretrained(tmp_path / "m", backend=backend)
    assert isinstance(loaded, Seq2Seq) and loaded.config == config
    batch = task.batch(np.random.default_rng(0))
    src, tgt = backend.asarray(batch.src_ids), backend.asarray(batch.tgt_in)
    np.testing.assert_array_equal(
        backend.to_numpy(loaded(src, tgt, src_lengths=batch.src_lengths)),
        backend.to_numpy(model(src, tgt, src_lengths=batch.src_lengths)),
    )
    assert translate(loaded, ["abc"]) == translate(Seq2Seq.load(tmp_path / "m"), ["abc"])


def test_loading_another_model_type_is_a_clear_error(tmp_path) -> None:
    from pathlib import Path

    gpt2 = Path(__file__).parent / "fixtures" / "tiny_gpt2"
    with pytest.raises(CheckpointError, match="type 'gpt2', not a 'tinytx-seq2seq'"):
        Seq2Seq.load(gpt2)
    with pytest.raises(CheckpointError, match="has no config.json"):
        Seq2Seq.load(tmp_path)


def test_translate_needs_a_tokenizer(backend) -> None:
    with pytest.raises(ValueError, match="no tokenizer"):
        translate(Seq2Seq(_config(), backend=backend), ["abc"])


# --- tasks -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic(name) -> None:
    assert examples(name, 50, seed=1) == examples(name, 50, seed=1)
    assert examples(name, 50, seed=1) != examples(name, 50, seed=2)
    first, second = (Seq2SeqTask(name, batch_size=8, eval_size=20, seed=4) for _ in range(2))
    a, b = first.batch(np.random.default_rng(9)), second.batch(np.random.default_rng(9))
    np.testing.assert_array_equal(a.src_ids, b.src_ids)
    np.testing.assert_array_equal(a.tgt_out, b.tgt_out)


def test_dates_are_right_and_varied() -> None:
    rng = np.random.default_rng(0)
    pairs = [date_example(rng) for _ in range(2000)]
    for written, iso in pairs:
        day = datetime.date.fromisoformat(iso)  # a real date in ISO 8601
        assert datetime.date(1950, 1, 1) <= day <= datetime.date(2049, 12, 31)
        assert str(day.day) in written or f"{day.day:02d}" in written
    assert len({written for written, _ in pairs}) > 1900
    assert any(w == "saturday 9 may 2015" or w.count("/") == 2 for w, _ in pairs)


def test_held_out_sources_are_never_trained_on() -> None:
    task = Seq2SeqTask("reverse", batch_size=64, eval_size=1000, seed=0)
    held_out = {source for source, _ in task.eval_pairs}
    rng = np.random.default_rng(0)
    for _ in range(5):
        batch = task.batch(rng)
        for row, n in zip(batch.src_ids, batch.src_lengths, strict=True):
            assert task.tokenizer.decode(row[:n].tolist()) not in held_out


def test_batches_pad_and_shift_the_target() -> None:
    task = Seq2SeqTask("reverse", batch_size=2, eval_size=2)
    batch = task.make_batch([("abc", "cba"), ("abcde", "edcba")])
    assert batch.src_lengths == [3, 5] and batch.tgt_lengths == [4, 6]
    assert batch.tgt_in[0, 0] == 1 and batch.tgt_in[0, 4] == 0  # [BOS] first, [PAD] after
    assert list(batch.tgt_out[0, 3:]) == [2, -100, -100]  # [EOS], then ignored
    assert task.tokenizer.decode(batch.tgt_in[1, 1:].tolist()) == "edcba"
