"""The ``tinytx`` command line (click).

    tinytx [--backend numpy|cupy|strict] [--seed N] COMMAND ...

Installed as ``tinytx.cli`` (``tinytx/cli.py`` links here); ``python -m tinytx`` runs it too.
Every error a user can cause ends as a one-line message and a non-zero exit code: usage
errors exit 2 (click's), other errors exit 1. Set TINYTX_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import click

import tinytx
from tinytx.backends import BackendUnavailable, backend_names, get_backend


class CommandError(click.ClickException):
    """A user-facing error: printed as ``Error: <message>``, exit code 1."""


def _backend(ctx: click.Context) -> tinytx.Backend:
    """The backend chosen with --backend / $TINYTX_BACKEND, or a one-line error."""
    name = ctx.find_root().params.get("backend") or "numpy"
    try:
        return get_backend(name)
    except BackendUnavailable as err:
        raise CommandError(str(err)) from None


def _seed(ctx: click.Context) -> int:
    return ctx.find_root().params.get("seed") or 0


def _attention_name(name: str) -> str:
    """Check an attention variant name against the registry (usage error if unknown)."""
    from tinytx.plugins import UnknownAttentionError, get_attention

    try:
        return get_attention(name).name
    except UnknownAttentionError as err:
        raise click.BadParameter(str(err), param_hint="'--attention'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--backend",
    type=click.Choice(backend_names()),
    default="numpy",
    show_default=True,
    envvar="TINYTX_BACKEND",
    show_envvar=True,
    help="Where the arrays live and compute.",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for weights."
)
@click.version_option(tinytx.__version__, prog_name="tinytx")
def cli(backend: str, seed: int) -> None:
    """tinytx: a transformer you can read, on NumPy, CuPy or array-api-strict."""


# --- info and plugins --------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@cli.command()
def info() -> None:
    """Versions, backends (available or why not) and attention variants."""
    from tinytx.backends import available_backends
    from tinytx.plugins import available_attention

    click.echo(f"tinytx {tinytx.__version__} on Python {platform.python_version()}")
    for dist in ("numpy", "array-api-compat", "array-api-strict", "click", "cupy-cuda12x"):
        click.echo(f"  {dist:<17} {_version(dist)}")
    click.echo("backends:")
    for name, status in available_backends().items():
        state = f"available, device {status.device}" if status.available else status.reason
        click.echo(f"  {name:<7} {state}")
    click.echo("attention variants: " + ", ".join(available_attention()))


@cli.command()
def plugins() -> None:
    """List the registered attention variants, one line each."""
    from tinytx.plugins import available_attention

    for name, variant in available_attention().items():
        promises = ", ".join(variant.promises.names()) or "no promises"
        click.echo(f"{name:<16} {variant.description}  [{promises}]")
        if variant.paper:
            click.echo(f"{'':<16} paper: {variant.paper}")


# --- demo -----------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--layer",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Which layer's attention map to draw.",
)
@click.option(
    "--head",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Which head's attention map to draw.",
)
@click.option(
    "--attention",
    default="softmax",
    show_default=True,
    help="Attention variant (see `tinytx plugins`).",
)
@click.option(
    "--color/--no-color", default=None, help="Colour the heatmap (default: on a terminal)."
)
@click.pass_context
def demo(ctx: click.Context, layer: int, head: int, attention: str, color: bool | None) -> None:
    """Run a sentence through a small encoder: trace every layer, draw one head's attention."""
    from tinytx.demo import DEMO_SENTENCE, run_demo
    from tinytx.viz import heatmap

    attention = _attention_name(attention)
    backend = _backend(ctx)
    n_layers, n_heads = 2, 4
    if layer >= n_layers:
        raise click.BadParameter(
            f"{layer} is out of range: the demo encoder has layers 0..{n_layers - 1}",
            param_hint="'--layer'",
        )
    if head >= n_heads:
        raise click.BadParameter(
            f"{head} is out of range: the demo encoder has heads 0..{n_heads - 1}",
            param_hint="'--head'",
        )
    result = run_demo(
        backend=backend, seed=_seed(ctx), attention=attention, n_layers=n_layers, n_heads=n_heads
    )
    click.echo(f"sentence: {DEMO_SENTENCE}")
    click.echo(f"tokens:   {result.tokens}")
    click.echo(
        f"backend {backend.name} ({backend.device}), attention {attention!r}, seed {_seed(ctx)}"
    )
    click.echo("The weights are random (seeded): this shows the machinery, not anything learned.\n")
    click.echo(result.trace.table())
    click.echo()
    if result.weights is None:
        click.echo(f"attention {attention!r} returns no weights, so there is no map to draw.")
        return
    use_colour = sys.stdout.isatty() if color is None else color
    title = f"layer {layer}, head {head}: row = attending token, column = attended token"
    click.echo(
        heatmap(
            result.weights[layer][head],
            result.tokens,
            result.tokens,
            colour=use_colour,
            title=title,
        ),
        color=use_colour,
    )


# --- generate -------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    help="A Hugging Face GPT-2 folder: config.json, model.safetensors, tokenizer.json.",
)
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=40, show_default=True, help="How many.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Sample from the nucleus, 0 < p <= 1.")
@click.option(
    "--seed",
    "sampling_seed",
    type=click.IntRange(min=0),
    default=None,
    help="Seed of the sampling RNG (default: tinytx --seed).",
)
@click.option("--no-cache", is_flag=True, help="Recompute the whole sequence at every step.")
@click.option(
    "--stop/--no-stop",
    default=True,
    show_default=True,
    help="Stop at the model's end-of-text token (eos_token_id in config.json).",
)
@click.option(
    "--attention", default="softmax", show_default=True, help="Attention variant (see plugins)."
)
@click.pass_context
def generate(
    ctx: click.Context,
    model_path: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    sampling_seed: int | None,
    no_cache: bool,
    stop: bool,
    attention: str,
) -> None:
    """Continue PROMPT with a GPT-2 model, printing the tokens as they come."""
    import time

    from tinytx.generate import GenerationError, check_sampling, load_text_model
    from tinytx.pretrained import CheckpointError

    attention = _attention_name(attention)
    backend = _backend(ctx)
    seed = _seed(ctx) if sampling_seed is None else sampling_seed
    try:
        check_sampling(temperature, top_k, top_p)
        text_model = load_text_model(model_path, backend=backend, attention=attention)
        pieces = text_model.stream(
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token=text_model.eos_token_id if stop else None,
            use_cache=not no_cache,
        )
    except (GenerationError, CheckpointError) as err:
        raise CommandError(str(err)) from None
    start, tokens = time.perf_counter(), 0
    click.echo(prompt, nl=False)
    for piece in pieces:  # one piece of text per generated token
        click.echo(piece, nl=False)  # echo flushes: each piece shows as soon as it exists
        tokens += 1
    seconds = time.perf_counter() - start
    click.echo()
    cache = "off" if no_cache else "on"
    rate = tokens / max(seconds, 1e-9)
    click.echo(
        f"[{tokens} tokens in {seconds:.2f} s ({rate:.1f}/s), {backend.name}, cache {cache}]",
        err=True,
    )


# --- benchmarks (scripts in benchmarks/ call the same functions) -------------------------


@cli.group()
def bench() -> None:
    """Benchmarks: print a table, write JSON. Compare with the named peer as a ratio."""


# --- entry point ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Any:
    """Run the CLI; turn any error that escapes a command into one line and exit code 1."""
    try:
        return cli.main(args=argv, prog_name="tinytx", standalone_mode=True)
    except SystemExit:
        raise
    except Exception as err:  # an error we did not anticipate: still no traceback by default
        if os.environ.get("TINYTX_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        click.echo(
            f"Error: {type(err).__name__}: {message} (TINYTX_DEBUG=1 shows the traceback)", err=True
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
