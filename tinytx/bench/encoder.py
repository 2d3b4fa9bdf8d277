"""Benchmark: tinytx's encoder block and attention against PyTorch on the same inputs.

- ``encoder``: a post-norm :class:`~tinytx.layers.EncoderBlock` (d_model 512, 8 heads,
  d_ff 2048, ReLU) on (batch 8, seq 256) float32, against ``nn.TransformerEncoderLayer``
  (batch_first, dropout 0, eval, ``torch.inference_mode``) carrying the same weights.
- ``attn-8x256`` and ``attn-1x2048``: :func:`tinytx.functional.scaled_dot_product_attention`
  at (batch, heads, seq, d) = (8, 8, 256, 64) and (1, 8, 2048, 64), against
  ``torch.nn.functional.scaled_dot_product_attention``. Both return the output only
  (``return_weights=False``: torch's function has no weights to return).

Both sides get the same thread count, runs alternate, and the median of ``repeats`` runs
after warm-up is reported with the ratio tinytx / torch and the largest absolute
difference between the two outputs (a fast but wrong change shows up there). Without
torch, tinytx's figures are printed alone.

    python benchmarks/encoder.py [--backend numpy] [--threads N] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
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

__all__ = ["CASES", "main", "run"]


@dataclass(frozen=True)
class Case:
    """One comparison: what it times, its target ratio and the output tolerance."""

    name: str
    what: str
    target: float  # tinytx / torch time ratio to reach
    tolerance: float  # largest allowed |tinytx - torch| on the output
    build: Callable[[Any, Any], tuple[Callable[[], Any], Callable[[], Any] | None]]


def _encoder_case(backend: Any, torch: Any) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
    """(tinytx run, torch run) for the post-norm encoder block, same weights and input."""
    from tinytx.layers import EncoderBlock

    d_model, heads, d_ff, batch, seq = 512, 8, 2048, 8, 256
    block = EncoderBlock(d_model, heads, d_ff, activation="relu", norm_first=False,
                         backend=backend, seed=0)  # fmt: skip
    host_x = np.random.default_rng(1).standard_normal((batch, seq, d_model), dtype=np.float32)
    x = backend.asarray(host_x)

    def ours() -> Any:
        return block(x)

    if torch is None:
        return ours, None
    layer = torch.nn.TransformerEncoderLayer(
        d_model, heads, d_ff, dropout=0.0, activation="relu", batch_first=True, norm_first=False
    ).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in block.state_dict().items()}
    layer.load_state_dict(state)
    x_torch = torch.from_numpy(host_x)

    def theirs() -> Any:
        with torch.inference_mode():
            return layer(x_torch)

    return ours, theirs


def _attention_case(shape: tuple[int, int, int, int]) -> Callable[..., Any]:
    def build(backend: Any, torch: Any) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
        from tinytx.functional import scaled_dot_product_attention

        rng = np.random.default_rng(2)
        host = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
        q, k, v = (backend.asarray(a) for a in host)

        def ours() -> Any:
            return scaled_dot_product_attention(q, k, v, return_weights=False)[0]

        if torch is None:
            return ours, None
        q_t, k_t, v_t = (torch.from_numpy(a) for a in host)

        def theirs() -> Any:
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t)

        return ours, theirs

    return build


CASES = {
    case.name: case
    for case in (
        Case("encoder", "EncoderBlock post-norm 512/8/2048 relu, x (8, 256, 512)",
             1.0, 1e-4, _encoder_case),
        Case("attn-8x256", "scaled_dot_product_attention q,k,v (8, 8, 256, 64)",
             1.5, 1e-5, _attention_case((8, 8, 256, 64))),
        Case("attn-1x2048", "scaled_dot_product_attention q,k,v (1, 8, 2048, 64)",
             1.5, 1e-5, _attention_case((1, 8, 2048, 64))),
    )
}  # fmt: skip


def run(
    backend_name: str = "numpy",
    threads: int | None = None,
    repeats: int = 7,
    *,
    warmup: int = 2,
    pause: float = 0.2,
    cases: Sequence[str] | None = None,
    use_torch: bool = True,
) -> dict[str, Any]:
    """Time the chosen cases (all by default) and return the results as a dict.

    ``threads`` sets BLAS, tinytx's element-wise pool and torch to that many threads
    (None: their defaults). Each result row has the medians in milliseconds, the ratio
    tinytx / torch, whether the target is met, and the largest output difference.
    """
    import tinytx
    from tinytx.backends.host_memory import keep_freed_memory

    keep_freed_memory()  # as tinytx embed and train do; torch's side shares the process
    backend = tinytx.get_backend(backend_name)
    thread_report = set_threads(threads)
    torch = torch_or_none() if use_torch else None
    chosen = list(CASES) if cases is None else list(cases)
    unknown = [name for name in chosen if name not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; expected some of: {', '.join(CASES)}")

    rows = []
    for name in chosen:
        case = CASES[name]
        ours, theirs = case.build(backend, torch)
        row = time_against_torch(
            name, case.what, ours, theirs, repeats=repeats, warmup=warmup, pause=pause,
            sync=backend.synchronize,
        )  # fmt: skip
        if theirs is not None:
            diff = float(np.max(np.abs(backend.to_numpy(ours()) - theirs().numpy())))
            row.update(
                target=case.target,
                target_met=row["ratio"] <= case.target,
                max_abs_diff=diff,
                tolerance=case.tolerance,
                outputs_agree=diff <= case.tolerance,
            )
        rows.append(row)
    return {
        "benchmark": "encoder",
        "backend": backend.name,
        "threads": thread_report,
        "repeats": repeats,
        "warmup": warmup,
        "pause_s": pause,
        "torch": torch is not None,
        "machine": machine_info(),
        "results": rows,
    }


def format_results(result: dict[str, Any]) -> str:
    """The table printed by :func:`main`."""
    rows = with_verdicts(result["results"], "outputs_agree", "agree")
    columns = ["case", "tinytx_ms"]
    if result["torch"]:
        columns += ["torch_ms", "ratio", "target", "max_abs_diff", "agree"]
    machine = result["machine"]
    header = (
        f"backend {result['backend']}, threads {result['threads']}, median of "
        f"{result['repeats']} alternating runs after {result['warmup']} warm-up, "
        f"{result['pause_s']} s rest before each run\n" + describe_machine(machine)
    )
    return header + "\n" + format_table(rows, columns)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/encoder.py", description=__doc__.split("\n\n")[0]
    )
    add_timing_arguments(parser, threads=None, repeats=7, warmup=2, pause=0.2)
    parser.add_argument(
        "--case",
        action="append",
        choices=list(CASES),
        dest="cases",
        help="run only this case (repeatable; default all)",
    )
    parser.add_argument("--no-torch", action="store_true", help="time tinytx alone")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the table, optionally write JSON. Exit status 0, or 1 when
    an output disagrees with torch's (a wrong result is never a speed-up)."""
    args = _parser().parse_args(argv)
    import tinytx

    try:
        result = run(args.backend, args.threads, args.repeats, warmup=args.warmup,
                     pause=args.pause, cases=args.cases, use_torch=not args.no_torch)  # fmt: skip
    except (ValueError, tinytx.BackendUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(format_results(result), result, args.json)
    wrong = disagreeing_cases(result, "outputs_agree")
    if wrong:
        print(f"error: tinytx and torch disagree on {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0
