"""Benchmark: a training step of the nanogpt-cpu preset, tinytx against PyTorch eager.

- :func:`run` (``tinytx bench train``): milliseconds per training step (forward, backward,
  gradient clipping, AdamW) of the same GPT (4 layers, 4 heads, width 128, context 64,
  batch 12, vocabulary 85) in tinytx and in a nanoGPT-style PyTorch module carrying the
  same weights, on the same batch and the same threads; runs alternate, medians and their
  ratio tinytx / torch. Peak memory of each: how much the resident set of a fresh
  process grows (Linux's VmHWM) over creating the optimizer and three training steps.
- :func:`lockstep` (``benchmarks/train_vs_torch.py``): both trained side by side from the
  same initial weights on the same batches for the preset's 2000 steps, evaluated on the
  same fixed batches; tinytx's final validation loss should be within 0.03 of torch's.

The PyTorch model is nanoGPT's ``model.py`` in miniature (LayerNorm with bias, exact GELU,
tied head, ``scaled_dot_product_attention(is_causal=True)``), with torch's AdamW
(decay on the 2-D weights only, as nanoGPT's configure_optimizers) and
``clip_grad_norm_``. torch is imported only here, never by the package's other modules.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinytx.bench.common import (
    describe_machine,
    format_table,
    machine_info,
    report,
    set_threads,
    time_alternating,
    torch_or_none,
)

__all__ = [
    "build",
    "format_results",
    "lockstep",
    "lockstep_main",
    "main",
    "memory_child",
    "plot_lockstep",
    "run",
    "torch_gpt",
]

TARGET = 1.0  # tinytx / torch time per step


# --- the two models -------------------------------------------------------------------------


def torch_gpt(model: Any) -> Any:
    """A PyTorch module computing the same function as tinytx GPT ``model``, same weights.

    ``forward(ids, targets) -> loss`` (mean cross-entropy). nanoGPT's model, in miniature.
    """
    import torch
    from torch import nn
    from torch.nn import functional as tf

    cfg = model.config
    gelu = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = cfg.d_model
            self.norm1, self.norm2 = nn.LayerNorm(d, eps=cfg.eps), nn.LayerNorm(d, eps=cfg.eps)
            self.in_proj = nn.Linear(d, 3 * d)
            self.out_proj = nn.Linear(d, d)
            self.linear1, self.linear2 = nn.Linear(d, cfg.ff_width), nn.Linear(cfg.ff_width, d)
            self.act = gelu[cfg.activation]

        def forward(self, x: Any) -> Any:
            b, s, d = x.shape
            h = cfg.n_heads
            qkv = self.in_proj(self.norm1(x)).view(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
            a = tf.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
            x = x + self.out_proj(a.transpose(1, 2).reshape(b, s, d))
            return x + self.linear2(self.act(self.linear1(self.norm2(x))))

    class TorchGPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layers))
            self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)

        def forward(self, ids: Any, targets: Any) -> Any:
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.norm(x) @ self.wte.weight.T  # the tied head
            return tf.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    net = TorchGPT()
    state = model.state_dict()
    ours = {
        "wte.weight": "token_embedding.weight",
        "wpe.weight": "position_embedding.weight",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    layer = {"norm1": "norm1", "norm2": "norm2", "linear1": "linear1", "linear2": "linear2",
             "out_proj": "self_attn.out_proj"}  # fmt: skip
    for name in net.state_dict():
        if name.startswith("blocks."):
            _, i, module, what = name.split(".")
            if module == "in_proj":
                ours[name] = f"layers.{i}.self_attn.in_proj_{what}"
            else:
                ours[name] = f"layers.{i}.{layer[module]}.{what}"
    net.load_state_dict({k: torch.from_numpy(np.array(state[v])) for k, v in ours.items()})
    return net


def build(backend: Any, seed: int = 0, vocab_size: int = 85) -> tuple[Any, Any, Any]:
    """(settings, tinytx GPT with nanoGPT's initialisation, torch twin) for nanogpt-cpu."""
    from tinytx.models.gpt import GPT, GPTConfig
    from tinytx.train import PRESETS, nanogpt_init

    s = PRESETS["nanogpt-cpu"]
    config = GPTConfig(
        vocab_size=vocab_size, context_length=s.context, d_model=s.width, n_heads=s.heads,
        n_layers=s.layers, activation=s.activation,
    )  # fmt: skip
    model = GPT(config, backend=backend, seed=seed)
    nanogpt_init(model, seed)
    return s, model, torch_gpt(model)


def _optimizers(settings: Any, model: Any, net: Any) -> tuple[Any, Any]:
    """tinytx's and torch's AdamW with the preset's settings, decay on 2-D weights only."""
    import torch

    from tinytx.optim import AdamW

    params = model.parameters()
    ours = AdamW(
        params, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
        weight_decay=settings.weight_decay, decay={k for k, p in params.items() if p.ndim >= 2},
    )  # fmt: skip
    decay = [p for p in net.parameters() if p.dim() >= 2]
    other = [p for p in net.parameters() if p.dim() < 2]
    theirs = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay},
         {"params": other, "weight_decay": 0.0}],
        lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
        foreach=False,
    )  # fmt: skip
    return ours, theirs


def _steppers(
    settings: Any, model: Any, net: Any, backend: Any, optimizers: tuple[Any, Any] | None = None
) -> tuple[Callable[[np.ndarray, np.ndarray, float], float], Callable[..., float]]:
    """(tinytx_step, torch_step): each (ids, targets, lr) -> loss, one whole training step."""
    import torch

    from tinytx.backward import loss_and_grads
    from tinytx.optim import clip_grad_norm

    ours, theirs = optimizers or _optimizers(settings, model, net)

    def tinytx_step(ids: np.ndarray, targets: np.ndarray, lr: float) -> float:
        loss, grads = loss_and_grads(
            model, backend.asarray(ids, dtype="int64"), backend.asarray(targets, dtype="int64")
        )
        clip_grad_norm(grads, settings.grad_clip)
        ours.lr = lr
        ours.step(grads)
        return loss

    def torch_step(ids: np.ndarray, targets: np.ndarray, lr: float) -> float:
        loss = net(torch.from_numpy(ids), torch.from_numpy(targets))
        theirs.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), settings.grad_clip)
        for group in theirs.param_groups:
            group["lr"] = lr
        theirs.step()
        return loss.item()

    return tinytx_step, torch_step


# --- memory -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_child(side: str, backend_name: str = "numpy", steps: int = 3) -> int:
    """Peak growth of this process's resident set (bytes) over the optimizer's creation and
    ``steps`` training steps of ``side`` ("tinytx" or "torch"): activations, gradients and
    optimizer state (the weights and one forward's lazily loaded code come before). Linux
    only (VmHWM); run it in a fresh process."""
    from tinytx.backends import get_backend
    from tinytx.backends.host_memory import keep_freed_memory

    keep_freed_memory()  # as in the timed runs (and tinytx train)
    backend = get_backend(backend_name)
    settings, model, net = build(backend)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(12, 65))
    # One forward first, outside the window: code loaded on first use (numba's compiled
    # kernels and llvmlite, about 100 MB; torch's kernels) is not the step's memory.
    if side == "tinytx":
        model(backend.asarray(ids[:, :-1], dtype="int64"))
    else:
        import torch

        with torch.no_grad():
            net(torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:]))
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
    tinytx_step, torch_step = _steppers(settings, model, net, backend)
    step = tinytx_step if side == "tinytx" else torch_step
    for _ in range(steps):
        step(ids[:, :-1], ids[:, 1:], 1e-4)
    return (_status_kib("VmHWM") - before) * 1024


def _peak_memory(side: str, backend_name: str, threads: int | None) -> int | None:
    """:func:`memory_child` in a fresh Python process (None where it cannot run)."""
    import os
    import subprocess

    code = (
        "from tinytx.bench.train import memory_child; "
        f"print(memory_child({side!r}, {backend_name!r}))"
    )
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), TINYTX_NUM_THREADS=str(threads))
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
        )
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


# --- tinytx bench train -----------------------------------------------------------------------


def run(
    backend_name: str = "numpy",
    *,
    threads: int | None = 2,
    repeats: int = 7,
    warmup: int = 3,
    steps_per_run: int = 5,
    torch: bool = True,
) -> dict[str, Any]:
    """Time ``steps_per_run`` training steps per run, alternating tinytx and torch."""
    from tinytx.backends import get_backend
    from tinytx.backends.host_memory import keep_freed_memory
    from tinytx.data import random_windows

    backend = get_backend(backend_name)
    threads_report = set_threads(threads)
    keep_freed_memory()  # as tinytx train does; torch's side shares the process
    if not torch or torch_or_none() is None:
        raise RuntimeError("tinytx bench train compares with PyTorch: pip install torch")
    settings, model, net = build(backend)
    tinytx_step, torch_step = _steppers(settings, model, net, backend)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=100_000)
    batches = [random_windows(ids, settings.batch_size, settings.context, rng) for _ in range(8)]

    def many(step: Callable[..., float]) -> Callable[[], None]:
        def go() -> None:
            for i in range(steps_per_run):
                step(*batches[i % len(batches)], 1e-4)

        return go

    contenders = {"tinytx": many(tinytx_step), "torch": many(torch_step)}
    timings = time_alternating(
        contenders, repeats=repeats, warmup=warmup, pause=0.1, sync=backend.synchronize
    )
    memory = {name: _peak_memory(name, backend.name, threads) for name in contenders}
    rows = []
    for name, timing in timings.items():
        ms = 1000 * timing.median / steps_per_run
        peak = memory[name]
        rows.append({"impl": name, "ms_per_step": ms, "peak_mib": None if peak is None
                     else peak / 2**20})  # fmt: skip
    ratio = rows[0]["ms_per_step"] / rows[1]["ms_per_step"]
    return {
        "benchmark": "train step, nanogpt-cpu (forward, backward, clip, AdamW)",
        "shape": {
            "layers": 4,
            "heads": 4,
            "width": 128,
            "context": 64,
            "batch": 12,
            "vocab": model.config.vocab_size,
        },  # fmt: skip
        "backend": backend.name,
        "threads": threads_report,
        "repeats": repeats,
        "steps_per_run": steps_per_run,
        "rows": rows,
        "ratio": ratio,
        "target": TARGET,
        "met": ratio <= TARGET,
        "memory_method": "peak resident-set growth over the optimizer's creation and 3 steps, "
        "each in a fresh process (Linux VmHWM)",
        "machine": machine_info(),
        "seconds": {n: t.seconds for n, t in timings.items()},
    }


def format_results(result: dict[str, Any]) -> str:
    """The table ``tinytx bench train`` prints."""
    head = (
        f"{result['benchmark']}; {result['backend']}, threads {result['threads']['requested']}, "
        f"median of {result['repeats']} alternating runs of {result['steps_per_run']} steps"
    )
    verdict = "met" if result["met"] else "missed"
    return (
        f"{head}\n{describe_machine(result['machine'])}\n"
        f"{format_table(result['rows'], ['impl', 'ms_per_step', 'peak_mib'])}\n"
        f"tinytx / torch = {result['ratio']:.2f} (target <= {result['target']}: {verdict}); "
        f"peak memory: {result['memory_method']}"
    )


# --- benchmarks/train_vs_torch.py ------------------------------------------------------------


def lockstep(
    *,
    data: str = "shakespeare",
    steps: int | None = None,
    out: str | Path = "train_vs_torch",
    threads: int | None = None,
    backend_name: str = "numpy",
    resume: bool = False,
    echo: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, Any]:
    """Train tinytx and torch side by side on the same batches; write ``out/result.json``.

    Same corpus, tokenizer, initial weights (nanoGPT's initialisation), batches (one host
    RNG, each batch fed to both), learning-rate schedule and evaluation batches. Every
    ``eval_every`` steps both are evaluated and ``out/result.json`` is rewritten, so a
    long run shows its progress (and its result so far) while it goes.
    """
    import torch

    from tinytx.backends import get_backend
    from tinytx.data import char_tokenizer, encode, load_corpus
    from tinytx.optim import lr_at
    from tinytx.train import LanguageModelTask

    backend = get_backend(backend_name)
    set_threads(threads)
    train_text, val_text = load_corpus(data)
    tokenizer = char_tokenizer([train_text, val_text])
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
    settings, model, net = build(backend, vocab_size=tokenizer.get_vocab_size())
    steps = steps or settings.steps
    task = LanguageModelTask(
        train_ids, val_ids, tokenizer, batch_size=settings.batch_size, context=settings.context,
        backend=backend, eval_batches=settings.eval_batches, seed=settings.seed,
    )  # fmt: skip
    optimizers = _optimizers(settings, model, net)
    out = Path(out)
    rng = np.random.default_rng(settings.seed)
    result = None
    if resume:
        result, optimizers = _resume_lockstep(out, model, net, optimizers, rng)
    tinytx_step, torch_step = _steppers(settings, model, net, backend, optimizers)

    def evaluate() -> dict[str, float]:
        ours = task.evaluate(model)
        with torch.no_grad():
            theirs = {
                f"{split}_loss": float(np.mean([
                    float(net(torch.from_numpy(x), torch.from_numpy(y))) for x, y in batches
                ]))
                for split, batches in task.eval_sets.items()
            }  # fmt: skip
        return {"tinytx_" + k: v for k, v in ours.items()} | {
            "torch_" + k: v for k, v in theirs.items()
        }

    from dataclasses import asdict

    from tinytx.data import random_windows

    out.mkdir(parents=True, exist_ok=True)
    if result is None:
        result = {"steps": steps, "settings": asdict(settings), "step": 0,
                  "losses": {"tinytx": [], "torch": []}, "evals": [{"step": 0, **evaluate()}],
                  "seconds": {"tinytx": 0.0, "torch": 0.0}, "machine": machine_info(),
                  "threads": threads}  # fmt: skip
        echo(f"step 0: {_eval_line(result['evals'][-1])}")
    else:
        echo(f"resumed at step {result['step']}")
    for step in range(result["step"], steps):
        lr = lr_at(step, lr=settings.lr, warmup=settings.warmup, total=steps,
                   min_lr=settings.min_lr)  # fmt: skip
        ids, targets = random_windows(train_ids, settings.batch_size, settings.context, rng)
        for name, fn in (("tinytx", tinytx_step), ("torch", torch_step)):
            t0 = time.perf_counter()
            result["losses"][name].append(fn(ids, targets, lr))
            result["seconds"][name] += time.perf_counter() - t0
        if (step + 1) % settings.eval_every == 0 or step + 1 == steps:
            result["evals"].append({"step": step + 1, **evaluate()})
            last = result["evals"][-1]
            result["val_loss_difference"] = last["tinytx_val_loss"] - last["torch_val_loss"]
            result["within_0.03"] = abs(result["val_loss_difference"]) <= 0.03
            result["step"] = step + 1
            _save_lockstep(out, model, net, optimizers, rng, result)
            ms = {k: 1000 * v / (step + 1) for k, v in result["seconds"].items()}
            echo(f"step {step + 1}: {_eval_line(last)}; ms/step tinytx {ms['tinytx']:.1f}, "
                 f"torch {ms['torch']:.1f}")  # fmt: skip
    return result


def _save_lockstep(
    out: Path, model: Any, net: Any, optimizers: tuple[Any, Any], rng: Any, result: dict
) -> None:
    """Both models and optimizers (safetensors + JSON), the RNG state and the log so far."""
    from safetensors.numpy import save_file

    ours, theirs = optimizers
    save_file({k: np.ascontiguousarray(v) for k, v in model.state_dict().items()},
              str(out / "tinytx.safetensors"))  # fmt: skip
    ours.save(out / "tinytx_optimizer")
    tensors = {f"model.{k}": v.detach().numpy() for k, v in net.state_dict().items()}
    state = theirs.state_dict()
    for index, moments in state["state"].items():
        for name, value in moments.items():
            tensors[f"optim.{index}.{name}"] = value.detach().numpy().reshape(value.shape)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(out / "torch.safetensors"))  # fmt: skip
    result["torch_param_groups"] = state["param_groups"]
    result["rng_state"] = rng.bit_generator.state
    (out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")


def _resume_lockstep(
    out: Path, model: Any, net: Any, optimizers: tuple[Any, Any], rng: Any
) -> tuple[dict[str, Any], tuple[Any, Any]]:
    """Restore what :func:`_save_lockstep` wrote: (the log so far, the optimizers)."""
    import torch
    from safetensors.numpy import load_file

    from tinytx.optim import AdamW

    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    model.load_state_dict(load_file(str(out / "tinytx.safetensors")))
    ours = AdamW.load(out / "tinytx_optimizer", model.parameters())
    tensors = load_file(str(out / "torch.safetensors"))
    net.load_state_dict({k[6:]: torch.from_numpy(v) for k, v in tensors.items()
                         if k.startswith("model.")})  # fmt: skip
    moments: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".")
            moments.setdefault(int(index), {})[name] = torch.from_numpy(value)
    theirs = optimizers[1]
    theirs.load_state_dict({"state": moments, "param_groups": result["torch_param_groups"]})
    rng.bit_generator.state = result["rng_state"]
    return result, (ours, theirs)  # ours anew: loading replaced the model's arrays


def plot_lockstep(result_json: str | Path, png: str | Path) -> None:
    """Draw a :func:`lockstep` run (its result.json): both training curves (means of 50
    steps) and both validation losses at each evaluation."""
    from tinytx.plot import _pyplot

    result = json.loads(Path(result_json).read_text(encoding="utf-8"))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"tinytx": "tab:blue", "torch": "tab:orange"}
    for name, losses in result["losses"].items():
        width = 50
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        steps = np.arange(width, len(losses) + 1)
        ax.plot(steps, smooth, color=colours[name], alpha=0.6, label=f"{name} train (mean of 50)")
        evals = [(e["step"], e[f"{name}_val_loss"]) for e in result["evals"]]
        xs, ys = zip(*evals, strict=True)
        marker = "o--" if name == "tinytx" else "x:"
        ax.plot(xs, ys, marker, color=colours[name], markersize=5, label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title(
        "nanogpt-cpu on Shakespeare: tinytx and PyTorch, same weights and batches", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _eval_line(e: dict[str, float]) -> str:
    return (
        f"val loss tinytx {e['tinytx_val_loss']:.4f} torch {e['torch_val_loss']:.4f} "
        f"(train {e['tinytx_train_loss']:.4f} / {e['torch_train_loss']:.4f})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/train.py``: the table of :func:`run` (``tinytx bench train``)."""
    parser = argparse.ArgumentParser(description="nanogpt-cpu training step, tinytx vs torch")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="Write every number here.")
    args = parser.parse_args(argv)
    result = run(args.backend, threads=args.threads, repeats=args.repeats)
    report(format_results(result), result, args.json)
    return 0


def lockstep_main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/train_vs_torch.py``: see :func:`lockstep`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--steps", type=int, default=None, help="Default: the preset's 2000.")
    parser.add_argument("--out", default="train_vs_torch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--resume", action="store_true", help="Continue OUT's checkpoint.")
    args = parser.parse_args(argv)
    result = lockstep(
        data=args.data, steps=args.steps, out=args.out, threads=args.threads,
        backend_name=args.backend, resume=args.resume,
    )  # fmt: skip
    last = result["evals"][-1]
    diff = result["val_loss_difference"]
    print(
        f"after {result['steps']} steps: val loss tinytx {last['tinytx_val_loss']:.4f}, torch "
        f"{last['torch_val_loss']:.4f}, difference {diff:+.4f} "
        f"({'within' if abs(diff) <= 0.03 else 'NOT within'} 0.03)"
    )
    return 0 if math.isfinite(diff) and abs(diff) <= 0.03 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
