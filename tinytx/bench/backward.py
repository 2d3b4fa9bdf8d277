"""Benchmark: forward + backward, tinytx's hand-written passes against PyTorch autograd.

- ``encoder``: a post-norm :class:`~tinytx.layers.EncoderBlock` (d_model 512, 8 heads,
  d_ff 2048, ReLU) on x (8, 256, 512) float32: ``tinytx.vjp`` and its pullback (the
  input's and every parameter's gradient) against ``nn.TransformerEncoderLayer``
  (batch_first, dropout 0, training mode) with the same weights: forward, then
  ``out.backward(cotangent)`` with x requiring a gradient.
- ``gpt``: nanoGPT's CPU example shape (4 layers, 4 heads, width 128, context 64,
  batch 12, vocabulary 65; GPT-2's layout: biases, tied head, GELU-tanh): tinytx's
  ``loss_and_grads`` against transformers' ``GPT2LMHeadModel`` with the same weights,
  cross-entropy of its logits, ``loss.backward()``. No optimizer step (``tinytx bench
  train`` times whole training steps).
- ``attention``: peak memory of one forward + backward of the ``softmax`` and
  ``blockwise`` attention variants alone at (batch 1, 8 heads, seq, d 64), seq 4096 by
  default: ``variant(q, k, v)`` then ``variant.backward(...)``. softmax keeps the
  (seq, seq) weights for its backward; blockwise's FlashAttention-style backward
  recomputes score tiles instead. Peak memory is measured as in ``tinytx bench
  attention`` (tracemalloc on numpy/strict, a memory hook on cupy), one run per variant,
  whose time is shown too (indicative only).

Both sides get the same thread count, runs alternate (a burst of load from elsewhere hits
both), each side is warmed up, and the median of ``repeats`` runs is reported with the
ratio tinytx / torch. Each comparison also reports the largest relative difference
between the two sides' gradients (||g_tinytx - g_torch|| / ||g_torch||, worst parameter):
a fast but wrong change shows up there. Target (issue 10): at most 1.0x torch for both.

    python benchmarks/backward.py [--backend numpy] [--threads 2] [--json out.json]
    tinytx bench backward ...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinytx.bench.common import (
    add_timing_arguments,
    describe_machine,
    disagreeing_cases,
    format_table,
    machine_info,
    report,
    set_threads,
    time_against_torch,
    torch_or_none,
    with_verdicts,
)

__all__ = ["CASES", "attention_memory", "format_results", "main", "run"]

MIB = 2**20
TARGET = 1.0  # tinytx / torch time
GRAD_TOLERANCE = 1e-3  # relative gradient difference that flags a wrong result
NANOGPT_CPU = dict(n_layers=4, n_heads=4, d_model=128, context=64, batch=12, vocab=65)

# (run once: the timed forward+backward, grads: {name: host array} from a run)
Side = tuple[Callable[[], Any], Callable[[], dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Case:
    """One comparison: what it times and how to build both sides."""

    name: str
    what: str
    build: Callable[[Any, Any], tuple[Side, Side | None]]


def _encoder_case(backend: Any, torch: Any) -> tuple[Side, Side | None]:
    """Forward + backward of a post-norm encoder block, same weights, input, cotangent."""
    import tinytx
    from tinytx.layers import EncoderBlock

    d_model, heads, d_ff, batch, seq = 512, 8, 2048, 8, 256
    block = EncoderBlock(d_model, heads, d_ff, activation="relu", norm_first=False,
                         backend=backend, seed=0)  # fmt: skip
    rng = np.random.default_rng(1)
    host_x = rng.standard_normal((batch, seq, d_model), dtype=np.float32)
    host_dy = rng.standard_normal((batch, seq, d_model), dtype=np.float32)
    x, dy = backend.asarray(host_x), backend.asarray(host_dy)

    def ours() -> Any:
        _, pullback = tinytx.vjp(block, x)  # forward, saving what backward needs
        return pullback(dy)  # ((dx,), {key: d param})

    def our_grads() -> dict[str, np.ndarray]:
        (dx,), grads = ours()
        return {"x": backend.to_numpy(dx), **{k: backend.to_numpy(g) for k, g in grads.items()}}

    if torch is None:
        return (ours, our_grads), None
    layer = torch.nn.TransformerEncoderLayer(
        d_model, heads, d_ff, dropout=0.0, activation="relu", batch_first=True, norm_first=False
    ).train()
    layer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in block.state_dict().items()})
    x_t, dy_t = torch.from_numpy(host_x).requires_grad_(True), torch.from_numpy(host_dy)

    def theirs() -> Any:
        layer.zero_grad(set_to_none=True)
        x_t.grad = None
        layer(x_t).backward(dy_t)

    def their_grads() -> dict[str, np.ndarray]:
        theirs()
        grads = {k: p.grad.numpy().copy() for k, p in layer.named_parameters()}
        return {"x": x_t.grad.numpy().copy(), **grads}

    return (ours, our_grads), (theirs, their_grads)


def _gpt_case(backend: Any, torch: Any) -> tuple[Side, Side | None]:
    """loss_and_grads of a nanoGPT-CPU-shaped GPT against GPT2LMHeadModel + backward()."""
    import tinytx
    from tinytx.models.gpt import GPT, GPTConfig, gpt2_config, gpt2_state_dict

    s = NANOGPT_CPU
    rng = np.random.default_rng(3)
    host_ids = rng.integers(0, s["vocab"], size=(s["batch"], s["context"] + 1))
    host_x, host_y = host_ids[:, :-1], host_ids[:, 1:]  # targets: the next tokens
    config = GPTConfig(vocab_size=s["vocab"], context_length=s["context"], d_model=s["d_model"],
                       n_heads=s["n_heads"], n_layers=s["n_layers"])  # fmt: skip
    transformers = None
    if torch is not None:
        try:
            import transformers
        except ImportError:
            transformers = None
    theirs_model = None
    if transformers is not None:
        torch.manual_seed(0)
        hf_config = transformers.GPT2Config(
            vocab_size=s["vocab"], n_positions=s["context"], n_embd=s["d_model"],
            n_layer=s["n_layers"], n_head=s["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        theirs_model = transformers.GPT2LMHeadModel(hf_config).train()
        config = gpt2_config(theirs_model.config.to_dict())
    model = GPT(config, backend=backend, seed=0)
    if theirs_model is not None:
        tensors = {k: t.detach().numpy() for k, t in theirs_model.state_dict().items()}
        model.load_state_dict(gpt2_state_dict(tensors, config))
    ids = backend.asarray(host_x, dtype="int64")
    targets = backend.asarray(host_y, dtype="int64")

    def ours() -> Any:
        return tinytx.loss_and_grads(model, ids, targets)

    def our_grads() -> dict[str, np.ndarray]:
        _, grads = ours()
        return {k: backend.to_numpy(g) for k, g in grads.items()}

    if theirs_model is None:
        return (ours, our_grads), None
    ids_t, targets_t = torch.from_numpy(host_x), torch.from_numpy(host_y)

    def theirs() -> Any:
        theirs_model.zero_grad(set_to_none=True)
        logits = theirs_model(ids_t).logits  # (batch, seq, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets_t.flatten())
        loss.backward()

    def their_grads() -> dict[str, np.ndarray]:
        theirs()
        hf = {k: p.grad.numpy().copy() for k, p in theirs_model.named_parameters()}
        return gpt2_state_dict(hf, config)  # tinytx's names, Conv1D weights transposed

    return (ours, our_grads), (theirs, their_grads)


CASES = {
    case.name: case
    for case in (
        Case("encoder", "EncoderBlock post-norm 512/8/2048 relu, x (8, 256, 512): vjp + pullback",
             _encoder_case),
        Case("gpt", "GPT 4 layers/4 heads/width 128, ids (12, 64), vocab 65: loss_and_grads",
             _gpt_case),
    )
}  # fmt: skip
CASE_NAMES = (*CASES, "attention")


def _worst_relative_difference(ours: dict, theirs: dict) -> float:
    """max over gradients of ||ours - theirs|| / ||theirs|| (keys must match)."""
    if set(ours) != set(theirs):
        raise ValueError(f"gradient names differ: {sorted(set(ours) ^ set(theirs))}")
    worst = 0.0
    for key, want in theirs.items():
        want64 = want.astype(np.float64)
        scale = float(np.linalg.norm(want64)) or 1.0
        worst = max(worst, float(np.linalg.norm(ours[key] - want64)) / scale)
    return worst


def attention_memory(
    backend: Any, seq: int, *, variants: Sequence[str] = ("softmax", "blockwise")
) -> dict[str, Any]:
    """Peak memory of one forward + backward of each attention variant at
    (1, 8, seq, 64) float32, and the time of that run (indicative only: a single run,
    under tracemalloc). A variant without a backward gets a row saying so."""
    from tinytx.bench.attention import BATCH, D_HEAD, HEADS, peak_memory
    from tinytx.plugins import get_attention

    rng = np.random.default_rng(4)
    shape = (BATCH, HEADS, seq, D_HEAD)
    q, k, v, dout = (backend.asarray(rng.standard_normal(shape, dtype=np.float32))
                     for _ in range(4))  # fmt: skip
    rows, method = [], ""
    for name in variants:
        variant = get_attention(name)
        if not getattr(variant, "has_backward", False):
            rows.append({"variant": name, "seq": seq, "note": "no backward registered (yet)"})
            continue

        def once(variant: Any = variant) -> Any:
            out, weights = variant(q, k, v)  # (1, 8, seq, 64), (1, 8, seq, seq) or None
            grads = variant.backward(dout, q, k, v, out, weights)  # dq, dk, dv
            backend.synchronize()
            return grads

        start = time.perf_counter()
        peak, method = peak_memory(once, backend.name)
        seconds = time.perf_counter() - start
        rows.append({"variant": name, "seq": seq, "run_ms": seconds * 1e3,
                     "peak_mib": None if peak is None else peak / MIB})  # fmt: skip
    base = next((r for r in rows if r["variant"] == "softmax" and "peak_mib" in r), None)
    for row in rows:
        if base is not None and row.get("peak_mib") is not None and base["peak_mib"]:
            row["memory_vs_softmax"] = row["peak_mib"] / base["peak_mib"]
    return {
        "shape": {"batch": BATCH, "heads": HEADS, "seq": seq, "d_head": D_HEAD},
        "memory_method": method,
        "rows": rows,
    }


def run(
    backend_name: str = "numpy",
    threads: int | None = 2,
    repeats: int = 7,
    *,
    warmup: int = 2,
    pause: float = 0.2,
    cases: Sequence[str] | None = None,
    seq: int = 4096,
    use_torch: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time the chosen cases (default: encoder, gpt, attention) and return a JSON-ready dict.

    ``threads`` sets BLAS, tinytx's element-wise pool and torch to that many threads
    (None: their defaults). ``seq``: the attention memory comparison's sequence length.
    Each timing row has the medians in milliseconds, all runs, the ratio tinytx / torch,
    the target, and the worst relative gradient difference between the two sides.
    """
    import tinytx
    from tinytx.backends.host_memory import keep_freed_memory

    keep_freed_memory()  # as tinytx train does; torch's side shares the process
    backend = tinytx.get_backend(backend_name)
    chosen = list(CASE_NAMES) if not cases else list(cases)
    unknown = [name for name in chosen if name not in CASE_NAMES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; expected some of: {', '.join(CASE_NAMES)}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be a positive int, got {seq!r}")
    thread_report = set_threads(threads)
    torch = torch_or_none() if use_torch else None
    rows = []
    for name in (n for n in chosen if n in CASES):
        case = CASES[name]
        (ours, our_grads), theirs = case.build(backend, torch)
        row = time_against_torch(
            name, case.what, ours, None if theirs is None else theirs[0], repeats=repeats,
            warmup=warmup, pause=pause, sync=backend.synchronize,
        )  # fmt: skip
        if theirs is not None:
            diff = _worst_relative_difference(our_grads(), theirs[1]())
            row.update(
                target=TARGET,
                target_met=row["ratio"] <= TARGET,
                grad_rel_diff=diff,
                tolerance=GRAD_TOLERANCE,
                grads_agree=diff <= GRAD_TOLERANCE,
            )
        rows.append(row)
        if progress:
            progress(f"{name}: tinytx {row['tinytx_ms']:.1f} ms, torch {row.get('torch_ms')}")
    memory = None
    if "attention" in chosen:
        memory = attention_memory(backend, seq)
    return {
        "benchmark": "backward",
        "backend": backend.name,
        "threads": thread_report,
        "repeats": repeats,
        "warmup": warmup,
        "pause_s": pause,
        "torch": torch is not None,
        "machine": machine_info(),
        "results": rows,
        "attention_memory": memory,
    }


def format_results(result: dict[str, Any]) -> str:
    """The timing table and the attention memory table, as printed by :func:`main`."""
    machine = result["machine"]
    lines = [
        f"forward + backward on {result['backend']}, threads {result['threads']}, median of "
        f"{result['repeats']} alternating runs after {result['warmup']} warm-up, "
        f"{result['pause_s']} s rest before each run",
        describe_machine(machine),
    ]
    if result["results"]:
        rows = with_verdicts(result["results"], "grads_agree", "grads")
        columns = ["case", "tinytx_ms"]
        if result["torch"]:
            columns += ["torch_ms", "ratio", "target", "grad_rel_diff", "grads"]
        lines += ["", format_table(rows, columns)]
        lines += [f"  {r['case']}: {r['what']}" for r in result["results"]]
    memory = result.get("attention_memory")
    if memory:
        shape = memory["shape"]
        lines += [
            "",
            f"attention forward + backward alone, (batch {shape['batch']}, {shape['heads']} "
            f"heads, seq {shape['seq']}, d {shape['d_head']}) float32; peak memory by "
            f"{memory['memory_method'] or '-'}; run_ms: that one run's time, indicative only",
        ]
        columns = ["variant", "run_ms", "peak_mib", "memory_vs_softmax"]
        lines.append(format_table(memory["rows"], columns))
        lines += [f"  {r['variant']}: {r['note']}" for r in memory["rows"] if "note" in r]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/backward.py", description=__doc__.split("\n\n")[0]
    )
    add_timing_arguments(parser, threads=2, repeats=7, warmup=2, pause=0.2)
    parser.add_argument(
        "--case",
        action="append",
        choices=list(CASE_NAMES),
        dest="cases",
        help="run only this case (repeatable; default all)",
    )
    parser.add_argument(
        "--seq",
        type=int,
        default=4096,
        help="sequence length of the attention memory comparison (4096)",
    )
    parser.add_argument("--no-torch", action="store_true", help="time tinytx alone")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the tables, optionally write JSON. Exit status 0, 1 when
    the gradients disagree with torch's (a wrong result is never a speed-up), 2 on bad
    input."""
    args = _parser().parse_args(argv)
    import tinytx

    try:
        result = run(args.backend, args.threads, args.repeats, warmup=args.warmup,
                     pause=args.pause, cases=args.cases, seq=args.seq,
                     use_torch=not args.no_torch,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    except (ValueError, tinytx.BackendUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(format_results(result), result, args.json)
    wrong = disagreeing_cases(result, "grads_agree")
    if wrong:
        print(f"error: tinytx's and torch's gradients disagree on {', '.join(wrong)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
