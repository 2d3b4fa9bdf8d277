"""Training: presets, one generic loop, and ``train_gpt`` (what ``tinytx train`` calls).

Host-side code. One step of the loop, for any task (a GPT on text here, an
encoder-decoder elsewhere)::

    lr_t          = lr_at(t)                               warmup, then cosine decay
    batch         = task.batch(rng)                        seeded on the host
    loss, grads   = task.loss_and_grads(model, batch)      forward + hand-written backward
    grads         = clip_grad_norm(grads, grad_clip)       ||g|| <= grad_clip
    params       <- AdamW(params, grads, lr_t)             in place

A task is any object with ``batch(rng) -> batch``, ``loss_and_grads(model, batch) ->
(loss, grads)``, ``evaluate(model) -> {name: float}``, ``save(model, folder)`` and
``tokens_per_batch`` (for tokens per second). :func:`run` owns the rest, once: the
progress bar, evaluation every ``eval_every`` steps, DIR/metrics.json, DIR/loss.png,
checkpoints (model + optimizer + step + RNG state in safetensors and JSON, no pickle),
resuming, Ctrl-C, and stopping at a NaN or infinite loss.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "PRESETS",
    "LanguageModelTask",
    "Task",
    "TrainError",
    "TrainSettings",
    "TrainingDiverged",
    "nanogpt_init",
    "run",
    "settings_for",
    "summary_line",
    "train_gpt",
    "train_model",
]

CHECKPOINT = "checkpoint"  # DIR/checkpoint/: what --resume reads


class TrainError(ValueError):
    """Settings or folders that training cannot use; the message says what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient's norm) became NaN or infinite; training stopped."""


# --- settings and presets -------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run (saved in the checkpoint, so --resume knows)."""

    data: str = "shakespeare"
    layers: int = 4
    heads: int = 4
    width: int = 128
    context: int = 64
    batch_size: int = 12
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 20
    seed: int = 0
    attention: str = "softmax"
    activation: str = "gelu"


# nanoGPT's documented CPU example (README, "I only have a macbook"):
#   python train.py config/train_shakespeare_char.py --device=cpu --compile=False
#     --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
#     --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
# gives layers, heads, width, context, batch_size, steps (= lr_decay_iters), eval_batches
# (eval_iters) and no dropout (tinytx has none). From config/train_shakespeare_char.py:
# lr = 1e-3 (learning_rate), min_lr = 1e-4, beta2 = 0.99, warmup = 100 (warmup_iters),
# eval_every = 250 (eval_interval). From train.py's defaults: beta1 = 0.9,
# weight_decay = 0.1 on the 2-D weights only (configure_optimizers), grad_clip = 1.0, and
# AdamW's eps = 1e-8 (torch's default). activation: nn.GELU() in nanoGPT's MLP, exact.
# One difference: nanoGPT's CPU run has bias=False; GPT-2's format (which DIR is) has
# biases, so tinytx's model keeps them.
PRESETS: dict[str, TrainSettings] = {
    "nanogpt-cpu": TrainSettings(),
    # Seconds, not minutes: for trying the command and for the README's short twin.
    "tiny": TrainSettings(
        layers=2,
        heads=2,
        width=32,
        context=32,
        batch_size=8,
        steps=60,
        lr=3e-3,
        min_lr=3e-4,
        warmup=5,
        eval_every=20,
        eval_batches=4,
    ),  # fmt: skip
    # The model shipped in tinytx/default_model (issue 12). nanogpt-cpu reaches only 2.11
    # nats/char on the held-out plays; a wider, deeper model that sees 2.7x more tokens per
    # step does better. 6 x 192 (2.7M parameters, 10.8 MB as float32) is the largest shape
    # whose 3000 steps fit in about 90 minutes on 2 shared CPU cores with --threads 1
    # (measured 2 s/step under a load of 8, 1055 tokens/s; wider 4 x 256 was slower per
    # token). lr 2e-3: a small model tolerates twice nanoGPT's 1e-3, which shortens the run.
    "shakespeare-default": TrainSettings(
        layers=6,
        heads=6,
        width=192,
        context=128,
        batch_size=16,
        steps=3000,
        lr=2e-3,
        min_lr=2e-4,
        warmup=100,
        eval_every=200,
        eval_batches=10,
    ),  # fmt: skip
}

# Each setting's check: value -> None when valid, else what was expected.
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "layers": lambda v: None if _is_int(v) and v >= 1 else "an int >= 1",
    "heads": lambda v: None if _is_int(v) and v >= 1 else "an int >= 1",
    "width": lambda v: None if _is_int(v) and v >= 1 else "an int >= 1",
    "context": lambda v: None if _is_int(v) and v >= 1 else "an int >= 1",
    "batch_size": lambda v: None if _is_int(v) and v >= 1 else "an int >= 1",
    "steps": lambda v: None if _is_int(v) and v >= 1 else "an int >= 1",
    "lr": lambda v: None if _is_number(v) and v > 0 else "a number > 0",
    "min_lr": lambda v: None if _is_number(v) and v > 0 else "a number > 0",
    "warmup": lambda v: None if _is_int(v) and v >= 0 else "an int >= 0",
    "beta1": lambda v: None if _is_number(v) and 0 <= v < 1 else "a number in [0, 1)",
    "beta2": lambda v: None if _is_number(v) and 0 <= v < 1 else "a number in [0, 1)",
    "eps": lambda v: None if _is_number(v) and v > 0 else "a number > 0",
    "weight_decay": lambda v: None if _is_number(v) and v >= 0 else "a number >= 0",
    "grad_clip": lambda v: None if _is_number(v) and v >= 0 else "a number >= 0 (0 = off)",
    "eval_every": lambda v: None if _is_int(v) and v >= 1 else "an int >= 1",
    "eval_batches": lambda v: None if _is_int(v) and v >= 1 else "an int >= 1",
    "seed": lambda v: None if _is_int(v) and v >= 0 else "an int >= 0",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def settings_for(preset: str, **overrides: Any) -> TrainSettings:
    """The preset's settings with ``overrides`` (None values are ignored), checked.

    Raises :class:`TrainError` for an unknown preset or setting, or a value out of range
    (lr <= 0, steps < 1, ...), naming what was expected.
    """
    if preset not in PRESETS:
        raise TrainError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    known = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TrainError(f"unknown training settings {unknown}; known: {', '.join(sorted(known))}")
    settings = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    check_settings(settings)
    return settings


def check_settings(settings: TrainSettings) -> None:
    """Raise :class:`TrainError` naming the first setting out of its range."""
    for name, check in _CHECKS.items():
        expected = check(getattr(settings, name))
        if expected is not None:
            raise TrainError(f"{name} must be {expected}, got {getattr(settings, name)!r}")
    if settings.width % settings.heads:
        raise TrainError(f"width ({settings.width}) must be divisible by heads ({settings.heads})")
    if settings.min_lr > settings.lr:
        raise TrainError(f"min_lr ({settings.min_lr}) must not exceed lr ({settings.lr})")


# --- the task protocol and the language-model task ------------------------------------------


class Task(Protocol):
    """What :func:`run` trains: batches, a loss with gradients, evaluation, saving."""

    tokens_per_batch: int

    def batch(self, rng: np.random.Generator) -> Any: ...

    def loss_and_grads(self, model: Any, batch: Any) -> tuple[float, dict[str, Any]]: ...

    def evaluate(self, model: Any) -> dict[str, float]: ...

    def save(self, model: Any, folder: Path) -> None: ...


class LanguageModelTask:
    """Next-token prediction on a stream of token ids, for a :class:`~tinytx.models.GPT`.

    train_ids, val_ids: (n,) int64 host arrays; batches of ``batch_size`` random windows
    of ``context`` tokens (:func:`tinytx.data.random_windows`) go to ``backend``.
    Evaluation uses ``eval_batches`` fixed batches of each split, drawn once from
    ``seed``, so successive evaluations (and two runs) measure the same text.
    """

    def __init__(
        self,
        train_ids: np.ndarray,
        val_ids: np.ndarray,
        tokenizer: Any,
        *,
        batch_size: int,
        context: int,
        backend: Any,
        eval_batches: int = 20,
        seed: int = 0,
    ) -> None:
        from tinytx.backends import resolve_backend
        from tinytx.data import random_windows

        self.train_ids, self.val_ids, self.tokenizer = train_ids, val_ids, tokenizer
        self.batch_size, self.context = batch_size, context
        self.backend = resolve_backend(backend)
        self.tokens_per_batch = batch_size * context
        eval_rng = np.random.default_rng([seed, 1])  # its own stream: not the training one
        self.eval_sets = {
            split: [random_windows(ids, batch_size, context, eval_rng) for _ in range(eval_batches)]
            for split, ids in (("train", train_ids), ("val", val_ids))
        }

    def batch(self, rng: np.random.Generator) -> tuple[Any, Any]:
        """(ids, targets) on the backend, each (batch_size, context) int64."""
        from tinytx.data import random_windows

        ids, targets = random_windows(self.train_ids, self.batch_size, self.context, rng)
        return self._to_backend(ids), self._to_backend(targets)

    def _to_backend(self, host: np.ndarray) -> Any:
        return self.backend.asarray(host, dtype="int64")

    def loss_and_grads(self, model: Any, batch: tuple[Any, Any]) -> tuple[float, dict[str, Any]]:
        """:func:`tinytx.loss_and_grads` of the batch: mean cross-entropy, in nats per token."""
        from tinytx.backward import loss_and_grads

        return loss_and_grads(model, *batch)

    def evaluate(self, model: Any) -> dict[str, float]:
        """Mean loss over the fixed batches: {"train_loss": ..., "val_loss": ...} (nats)."""
        from tinytx import functional as F

        result = {}
        for split, batches in self.eval_sets.items():
            losses = []
            for ids, targets in batches:
                logits = model(self._to_backend(ids))  # (batch, context, vocab)
                loss = F.cross_entropy(logits, self._to_backend(targets))  # 0-d
                losses.append(float(self.backend.to_numpy(loss)))
            result[f"{split}_loss"] = float(np.mean(losses))
        return result

    def save(self, model: Any, folder: Path) -> None:
        """``folder`` as a Hugging Face GPT-2 folder: config.json, model.safetensors and
        tokenizer.json. A model trained with another attention variant than softmax
        records it as ``tinytx_attention`` in config.json: load it with that variant
        (``--attention``); transformers would compute softmax attention with its weights."""
        from tinytx.models.gpt import save_gpt2

        save_gpt2(model, folder)
        self.tokenizer.save(str(Path(folder) / "tokenizer.json"))
        variant = model.attention.name
        if variant != "softmax":  # GPT-2's format cannot say it; load with attention=variant
            path = Path(folder) / "config.json"
            config = json.loads(path.read_text(encoding="utf-8"))
            config["tinytx_attention"] = variant
            path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --- initialisation -------------------------------------------------------------------------


def nanogpt_init(model: Any, seed: int) -> None:
    """Re-draw a GPT's weights as nanoGPT (and GPT-2) does, on the host, in place.

    Every 2-D weight (embeddings, projections) ~ N(0, 0.02^2), except the projections that
    end a residual branch (attention's out_proj, the feed-forward's linear2):
    N(0, (0.02 / sqrt(2 n_layers))^2); biases 0; LayerNorm weights 1.
    """
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    state = {}
    for key, value in model.state_dict().items():  # host arrays, in parameter order
        if value.ndim == 2:
            std = residual_std if key.endswith(("out_proj.weight", "linear2.weight")) else 0.02
            state[key] = rng.normal(0.0, std, size=value.shape)
        elif "norm" in key and key.endswith(".weight"):
            state[key] = np.ones(value.shape)
        else:
            state[key] = np.zeros(value.shape)
    model.load_state_dict(state)


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class _Progress:
    """What a run has done so far (saved in the checkpoint's trainer.json)."""

    step: int = 0
    seconds: float = 0.0  # wall time of the whole run (all sessions)
    train_seconds: float = 0.0  # time in training steps only (for tokens per second)
    losses: list[float] = field(default_factory=list)  # training loss of each step
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", *_loss}


def _set_threads(threads: int | None) -> None:
    """Use ``threads`` threads for BLAS (via threadpoolctl, when installed) and tinytx's
    element-wise pool."""
    if threads is None:
        return
    if threads < 1:
        raise TrainError(f"threads must be >= 1, got {threads}")
    from tinytx.backends import numpy_natives

    numpy_natives.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)


@contextmanager
def _ctrl_c_at_step_end() -> Iterator[dict[str, bool]]:
    """While active, Ctrl-C sets ``flag["stop"]`` instead of raising, so the loop stops at the
    end of the step it is in, with the model and optimizer consistent. A second Ctrl-C
    raises KeyboardInterrupt at once. (Outside the main thread: no handler.)"""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run(
    model: Any,
    task: Task,
    settings: TrainSettings,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` for ``settings.steps`` steps; write ``out``; return metrics.

    ``out`` receives, at every evaluation and at the end: the task's saved model
    (``task.save``), ``metrics.json`` and ``checkpoint/`` (model.safetensors with the
    model's own keys, optimizer.safetensors + optimizer.json, trainer.json with the step,
    the RNG's state, the settings and the loss history); at the end also ``loss.png``.
    ``resume=True`` continues from ``out/checkpoint`` (the model's weights are replaced
    by the checkpoint's) and gives, on the same backend, the same numbers as a run that
    was never interrupted.

    Ctrl-C (or a KeyboardInterrupt raised by the task) stops at a step boundary, saves
    a checkpoint and returns the metrics with ``"interrupted": True``. A NaN or infinite
    loss or gradient norm raises :class:`TrainingDiverged` naming the step, leaving the
    last checkpoint as it was.

    On Linux with glibc, training first lets malloc keep up to 256 MiB of freed memory,
    so that each step reuses the pages the previous one freed instead of faulting in new
    ones (see :mod:`tinytx.backends.host_memory`; process-wide).
    """
    from tinytx.backends.host_memory import keep_freed_memory
    from tinytx.optim import AdamW, clip_grad_norm, lr_at

    keep_freed_memory()

    out = Path(out)
    echo = echo or (lambda message: print(message, file=sys.stderr))
    state = _Progress()
    rng = np.random.default_rng(settings.seed)
    if resume:
        state, rng_state = _load_checkpoint(model, out / CHECKPOINT)
        rng.bit_generator.state = rng_state
    params = model.parameters()  # after loading: the arrays the optimizer updates in place
    decay = {name for name, p in params.items() if p.ndim >= 2}  # nanoGPT: 2-D weights only
    optimizer = AdamW(
        params, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
        weight_decay=settings.weight_decay, decay=decay,
    )  # fmt: skip
    if resume:
        optimizer = AdamW.load(out / CHECKPOINT / "optimizer", params)
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        state.evals.append({"step": 0, **task.evaluate(model)})
    started = time.perf_counter() - state.seconds
    interrupted = False
    bar = _progress_bar(settings.steps, state.step, progress)
    running = state.losses[-1] if state.losses else None
    with _ctrl_c_at_step_end() as ctrl_c, bar:
        while state.step < settings.steps:
            step = state.step
            lr = lr_at(
                step, lr=settings.lr, warmup=settings.warmup, total=settings.steps,
                min_lr=settings.min_lr,
            )  # fmt: skip
            rng_before = rng.bit_generator.state
            t0 = time.perf_counter()
            try:
                batch = task.batch(rng)
                loss, grads = task.loss_and_grads(model, batch)
            except KeyboardInterrupt:  # nothing was updated yet: stop at the last step
                rng.bit_generator.state = rng_before
                interrupted = True
                break
            if not math.isfinite(loss):
                raise TrainingDiverged(_diverged(out, step, f"the loss is {loss}"))
            if settings.grad_clip > 0:
                norm = _clip(clip_grad_norm, grads, settings.grad_clip)
                if not math.isfinite(norm):
                    raise TrainingDiverged(_diverged(out, step, f"the gradient norm is {norm}"))
            optimizer.lr = lr
            optimizer.step(grads)
            state.train_seconds += time.perf_counter() - t0
            state.losses.append(loss)
            state.step = step + 1
            running = loss if running is None else 0.9 * running + 0.1 * loss
            bar.show(state.step, running, _tokens_per_second(task, state))
            last = state.step == settings.steps
            if state.step % settings.eval_every == 0 or last:
                state.evals.append({"step": state.step, **task.evaluate(model)})
                state.seconds = time.perf_counter() - started
                if not last:  # the last step's outputs are written once, below
                    _save_all(model, task, optimizer, settings, state, rng, out, finished=False)
            if ctrl_c["stop"]:
                interrupted = True
                break
    state.seconds = time.perf_counter() - started
    metrics = _save_all(
        model, task, optimizer, settings, state, rng, out, finished=not interrupted, plot=True,
        echo=echo,
    )  # fmt: skip
    if interrupted:
        metrics["interrupted"] = True
        echo(
            f"interrupted at step {state.step}; checkpoint saved in {out / CHECKPOINT}: "
            f"continue with `tinytx train --resume {out}`"
        )
    return metrics


def _clip(clip_grad_norm: Callable[..., Any], grads: dict[str, Any], max_norm: float) -> float:
    """Clip ``grads`` in place to global norm ``max_norm``; the norm before clipping."""
    result = clip_grad_norm(grads, max_norm)
    if isinstance(result, tuple):  # (new grads, norm)
        new, result = result
        grads.update(new)
    return float(result)


def _diverged(out: Path, step: int, what: str) -> str:
    checkpoint = out / CHECKPOINT
    kept = (
        f"the last good checkpoint in {checkpoint} is left as it was"
        if checkpoint.is_dir()
        else "no checkpoint was saved yet"
    )
    return f"training stopped at step {step}: {what}; {kept}. Try a lower --lr."


def _tokens_per_second(task: Task, state: _Progress) -> float:
    steps = len(state.losses)
    return task.tokens_per_batch * steps / max(state.train_seconds, 1e-9)


class _Bar:
    """click's progress bar with the running loss and tokens/s (or nothing when off)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        self.text = ""
        if enabled and sys.stderr.isatty():  # a bar needs a terminal; logs get nothing
            import click

            self.bar = click.progressbar(
                length=total, label="training", file=sys.stderr, show_pos=True,
                item_show_func=lambda _: self.text,
            )  # fmt: skip
            self.start = start

    def __enter__(self) -> _Bar:
        if self.bar is not None:
            self.bar.__enter__()
            self.bar.update(self.start)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def show(self, step: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is not None:
            self.text = f"loss {loss:.3f}  {tokens_per_second:,.0f} tok/s"
            self.bar.update(1)


def _progress_bar(total: int, start: int, enabled: bool) -> _Bar:
    return _Bar(total, start, enabled)


# --- checkpoints and outputs ----------------------------------------------------------------


def _save_all(
    model: Any,
    task: Task,
    optimizer: Any,
    settings: TrainSettings,
    state: _Progress,
    rng: np.random.Generator,
    out: Path,
    *,
    finished: bool,
    plot: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the checkpoint, the task's folder and metrics.json (and loss.png if ``plot``)."""
    _save_checkpoint(model, optimizer, settings, state, rng, out / CHECKPOINT)
    task.save(model, out)
    metrics = _metrics(task, settings, state, model, finished)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if plot:
        note = plot_losses(state, out / "loss.png")
        if note and echo:
            echo(note)
    return metrics


def _metrics(
    task: Task, settings: TrainSettings, state: _Progress, model: Any, finished: bool
) -> dict[str, Any]:
    last = state.evals[-1] if state.evals else {}
    return {
        "val_loss": last.get("val_loss"),
        "train_loss": last.get("train_loss", state.losses[-1] if state.losses else None),
        "steps": state.step,
        "seconds": round(state.seconds, 3),
        "tokens_per_second": round(_tokens_per_second(task, state), 1),
        "loss_unit": "nats per token",
        "finished": finished,
        "backend": getattr(getattr(model, "backend", None), "name", None),
        "parameters": model.num_parameters() if hasattr(model, "num_parameters") else None,
        "settings": asdict(settings),
        "evals": state.evals,
    }


def _save_checkpoint(
    model: Any,
    optimizer: Any,
    settings: TrainSettings,
    state: _Progress,
    rng: np.random.Generator,
    folder: Path,
) -> None:
    """Write the checkpoint into a fresh folder, then swap it in: a crash while writing
    leaves the previous checkpoint whole."""
    from safetensors.numpy import save_file

    fresh = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    weights = {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    save_file(weights, str(fresh / "model.safetensors"))
    optimizer.save(fresh / "optimizer")
    trainer = {
        "step": state.step,
        "seconds": state.seconds,
        "train_seconds": state.train_seconds,
        "rng_state": rng.bit_generator.state,
        "settings": asdict(settings),
        "losses": state.losses,
        "evals": state.evals,
    }
    (fresh / "trainer.json").write_text(json.dumps(trainer) + "\n", encoding="utf-8")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(fresh, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's trainer.json (step, settings, ...) or a clear TrainError."""
    path = Path(folder) / CHECKPOINT / "trainer.json"
    if not path.is_file():
        raise TrainError(f"{folder} has no checkpoint to resume from ({path} is missing)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"cannot read {path}: {err}") from None


def _load_checkpoint(model: Any, folder: Path) -> tuple[_Progress, dict[str, Any]]:
    from tinytx.pretrained import read_safetensors

    trainer = read_trainer_state(folder.parent)
    model.load_state_dict(read_safetensors(folder / "model.safetensors"))
    state = _Progress(
        step=trainer["step"], seconds=trainer["seconds"], train_seconds=trainer["train_seconds"],
        losses=list(trainer["losses"]), evals=list(trainer["evals"]),
    )  # fmt: skip
    return state, trainer["rng_state"]


def plot_losses(state: _Progress, path: Path) -> str | None:
    """Draw the training loss of every step and the evaluations to ``path`` (PNG).

    Returns None, or a note saying why there is no picture (matplotlib not installed).
    """
    from tinytx.plot import PlotUnavailable, _pyplot

    try:
        plt = _pyplot()
    except PlotUnavailable as err:
        return f"no loss.png: {err}"
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(state.losses) + 1)
    ax.plot(steps, state.losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (step)")
    if len(state.losses) >= 20:
        width = max(len(state.losses) // 50, 5)
        smooth = np.convolve(state.losses, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1 :], smooth, color="tab:blue", label=f"train (mean of {width})")
    for key, color in (("train_loss", "tab:green"), ("val_loss", "tab:red")):
        points = [(e["step"], e[key]) for e in state.evals if key in e]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", color=color, markersize=3, label=f"{key.split('_')[0]} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# --- train_gpt: what `tinytx train` calls ---------------------------------------------------


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise TrainError(
                f"--out {out} already exists; pass --resume {out} to continue its training, "
                "or --force to overwrite it"
            )
        for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json",
                     "loss.png"):  # fmt: skip
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)


def _check_attention(model: Any) -> None:
    variant = model.attention
    if not getattr(variant, "has_backward", False):
        raise TrainError(
            f"attention {variant.name!r} has no backward, so it cannot be trained; "
            "choose a variant with one (tinytx plugins lists them)"
        )


def train_gpt(
    *,
    data: str | None = None,
    preset: str = "nanogpt-cpu",
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    backend: Any = None,
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a character-level GPT on ``data`` and write ``out`` (what ``tinytx train`` does).

    data: ``"shakespeare"`` or a UTF-8 text file (:func:`tinytx.data.load_corpus`);
    preset: a name in :data:`PRESETS`; overrides: settings of :class:`TrainSettings`
    (``steps``, ``lr``, ``context``, ...; None = the preset's). With ``resume=DIR`` the
    settings come from DIR's checkpoint (only ``steps`` and ``eval_every`` may change) and
    DIR is written again. Returns the metrics (see :func:`run`).

    Bad input raises :class:`TrainError` (or :class:`tinytx.data.CorpusError`), one line.
    """
    from tinytx.backends import resolve_backend
    from tinytx.data import CorpusError, char_tokenizer, encode, load_corpus
    from tinytx.models.gpt import GPT, GPTConfig

    backend = resolve_backend(backend)
    _set_threads(threads)
    if resume is not None:
        folder = Path(resume)
        if out is not None and Path(out) != folder:
            raise TrainError("--resume DIR writes DIR again; leave out --out (or give the same)")
        trainer = read_trainer_state(folder)
        saved = TrainSettings(**trainer["settings"])
        changed = {k: v for k, v in overrides.items() if v is not None and k not in ("steps",
                   "eval_every")}  # fmt: skip
        if data is not None and data != saved.data:
            changed["data"] = data
        if "context" in changed and changed["context"] > saved.context:
            raise TrainError(
                f"context {changed['context']} is longer than the model allows: it was built "
                f"for {saved.context} positions"
            )
        if changed:
            raise TrainError(
                f"--resume continues with the checkpoint's settings; it cannot change "
                f"{', '.join(sorted(changed))} (only --steps and --eval-every)"
            )
        settings = replace(saved, **{k: overrides[k] for k in ("steps", "eval_every")
                                      if overrides.get(k) is not None})  # fmt: skip
        check_settings(settings)
        if settings.steps <= trainer["step"]:
            raise TrainError(
                f"{folder} has already trained {trainer['step']} of {settings.steps} steps; "
                "pass a larger --steps to continue"
            )
        out = folder
    else:
        if out is None:
            raise TrainError("give --out DIR (where the trained model goes) or --resume DIR")
        settings = settings_for(preset, data=data or "shakespeare", **overrides)
        out = Path(out)
        _prepare_out(out, force)

    train_text, val_text = load_corpus(settings.data)
    if resume is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(out) / "tokenizer.json"))
    else:
        tokenizer = char_tokenizer([train_text, val_text])
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
    need = settings.context + 1
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < need:
            raise CorpusError(
                f"corpus {settings.data!r} is shorter than one batch: its {split} split has "
                f"{len(ids)} tokens, a window of --context {settings.context} needs {need}"
            )
    config = GPTConfig(
        vocab_size=tokenizer.get_vocab_size(), context_length=settings.context,
        d_model=settings.width, n_heads=settings.heads, n_layers=settings.layers,
        activation=settings.activation,
    )  # fmt: skip
    try:
        model = GPT(config, attention=settings.attention, backend=backend, seed=settings.seed)
    except (KeyError, ValueError) as err:
        raise TrainError(str(err).strip("'\"")) from None
    _check_attention(model)
    if resume is None:
        nanogpt_init(model, settings.seed)
    task = LanguageModelTask(
        train_ids, val_ids, tokenizer, batch_size=settings.batch_size, context=settings.context,
        backend=backend, eval_batches=settings.eval_batches, seed=settings.seed,
    )  # fmt: skip
    return run(model, task, settings, out, resume=resume is not None, progress=progress, echo=echo)


def train_model(
    *, task: str | None = None, preset: str = "nanogpt-cpu", **options: Any
) -> dict[str, Any]:
    """What ``tinytx train`` runs: :func:`train_gpt` with ``preset``, or with ``task``
    (``"dates"``, ``"reverse"``) :func:`tinytx.tasks.train_seq2seq`, which has its own
    presets (``preset`` is the GPT's and is not used). ``options`` go to either. Returns
    the metrics; see :func:`summary_line`.
    """
    if task is None:
        return train_gpt(preset=preset, **options)
    from tinytx.tasks import train_seq2seq

    return train_seq2seq(task=task, **options)


def summary_line(metrics: dict[str, Any], out: str | Path) -> str:
    """One line on a finished run of :func:`train_model` that wrote the folder ``out``:
    steps, time and the losses (a GPT: tokens per second and train loss; a seq2seq task:
    exact match on the held-out examples)."""
    if "exact_match" in metrics:
        return (
            f"{metrics['steps']} steps in {metrics['seconds']:.1f} s: exact match "
            f"{metrics['exact_match']:.3f} on 1000 held-out examples, val loss "
            f"{metrics['val_loss']:.4f} nats/token; model in {out}"
        )
    return (
        f"{metrics['steps']} steps in {metrics['seconds']:.1f} s "
        f"({metrics['tokens_per_second']:,.0f} tokens/s): train loss {metrics['train_loss']:.4f}, "
        f"val loss {metrics['val_loss']:.4f} nats/token; model in {out}"
    )
