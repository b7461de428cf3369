"""The `microgpt` command: parse options, call the library, render with Rich. No ML logic here.

Option defaults, help texts and choices come from the library's dataclasses (config.ModelConfig,
config.TrainConfig, config.SamplingSettings) and constants, never from literals written here."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
import typer.core
from rich.markup import escape
from typer._click.exceptions import NoArgsIsHelpError

from microgpt_cli import __version__, help_layout
from microgpt_cli.config import (
    EVAL_BATCH_SIZE,
    Activation,
    InvalidSetting,
    ModelConfig,
    Norm,
    OptimizerName,
    Position,
    PresetName,
    Quantize,
    SamplingSettings,
    TrainConfig,
    default_of,
    preset_help,
    setting_fields,
)
from microgpt_cli.data.dataprep import (
    DEFAULT_BPE_VOCAB_SIZE,
    DEFAULT_TOKENIZER,
    DEFAULT_VAL_FRACTION,
    ErrorMode,
    SampleName,
)
from microgpt_cli.errors import Interrupted, MicroGPTError, describe_os_error
from microgpt_cli.io.export import ExportFormat
from microgpt_cli.plot import X_AXES, XAxis
from microgpt_cli.progress import stderr
from microgpt_cli.serve.settings import ServeSettings

STARTED = time.perf_counter()  # a --time-budget counts from here: importing torch is part of the run

help_layout.install()


class _Group(typer.core.TyperGroup):
    """Every command runs inside this: a closed pipe and Ctrl-C reach `main` as themselves, before
    Click turns them into an exit status of 1 (EPIPE) or a silent 130 (KeyboardInterrupt)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise _PipeClosed from None
        except KeyboardInterrupt:
            raise Interrupted(f"{ctx.invoked_subcommand or 'microgpt'} was interrupted") from None


class _PipeClosed(Exception):
    """stdout's reader went away (`microgpt generate | head`): not an error, as for other Unix tools."""


app = typer.Typer(
    cls=_Group,
    name="microgpt",
    help="Train small GPT language models on your own text, evaluate them, and sample from them.\n\n"
    "microgpt prepare input.txt → microgpt train → microgpt eval → microgpt generate --prompt hello "
    "(or microgpt serve)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

# Environment variables for the paths and device that most commands share. Precedence, highest
# first: command-line flag, environment variable, --config file, --preset, built-in default.
DATA_ENV, OUT_ENV, DEVICE_ENV, THREADS_ENV = "MICROGPT_DATA", "MICROGPT_OUT", "MICROGPT_DEVICE", "MICROGPT_THREADS"
API_KEY_ENV = "MICROGPT_API_KEY"

CheckpointOpt = Annotated[
    Path, typer.Option("--checkpoint", "-c", envvar=OUT_ENV,
                       help="Checkpoint file, or a run dir (its best.pt is used).")
]
DeviceOpt = Annotated[str, typer.Option(
    envvar=DEVICE_ENV, help="Where to run: auto, cpu, cuda, cuda:N or mps (auto picks cuda, then mps, then cpu).")]
H = "Benchmark tasks (lm-evaluation-harness)"  # a help panel of eval
QuantizeOpt = Annotated[Quantize, typer.Option(
    help="Weights on CPU: none (fp32, exact) or int8 (PyTorch's dynamic int8 linear layers: faster on larger "
         "models, slightly less exact; see the README). CUDA decodes with bf16 weights.")]
DecodeThreadsOpt = Annotated[int, typer.Option(
    "--threads", envvar=THREADS_ENV, help="The most CPU threads a call uses: each prompt and decoding step runs "
    "with the number, up to this, measured fastest at the moment (fewer when the machine is busy; 0: one per "
    "core).")]
_TOML_TYPES: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,)}


def _option_keys(command: typer.core.TyperCommand) -> dict[str, typer.core.TyperOption]:
    """Config-file keys of a command's options: the option names with underscores (aliases too)."""
    keys = {}
    for param in command.params:
        if not isinstance(param, typer.core.TyperOption) or param.is_eager or param.name in (None, "config"):
            continue
        keys[param.name] = param
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = param
    return keys


def _apply_config_file(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Make the file's values this command's defaults (click's default_map), so that flags and
    environment variables still win over them and a --preset still loses to them."""
    if value is None:
        return None
    from microgpt_cli.config import read_toml

    keys = _option_keys(ctx.command)  # type: ignore[arg-type]
    defaults = {}
    for key, item in read_toml(value).items():
        if key not in keys:
            raise MicroGPTError(f"config file {value}: unknown key {key!r}; `microgpt {ctx.info_name}` takes "
                                f"{', '.join(sorted(str(p.name) for p in set(keys.values())))}")
        option = keys[key]
        annotation = option.type_descriptor.annotation
        wanted = _TOML_TYPES.get(annotation, (str,))
        if not isinstance(item, wanted) or isinstance(item, bool) != (wanted == (bool,)):
            kind = {int: "an integer", float: "a number", bool: "true or false"}.get(annotation, "a string")
            raise MicroGPTError(f"config file {value}: {key} must be {kind}, got {item!r}")
        defaults[str(option.name)] = [item] if option.multiple else item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", is_eager=True, callback=_apply_config_file, show_default=False,
    help="TOML file of option values (keys are option names with underscores: n_layer = 4); "
    "flags and environment variables win over it.")]


def _stronger(ctx: typer.Context, **values: object) -> Optional[str]:
    """Which of two exclusive options to use: the one given the strongest way (flag, then
    environment variable, then --config file); both given the same way is a user mistake."""
    order = ("DEFAULT_MAP", "ENVIRONMENT", "COMMANDLINE")
    sources = {name: ctx.get_parameter_source(name) for name, v in values.items() if v is not None}
    given = {name: order.index(source.name) for name, source in sources.items()
             if source is not None and source.name in order}
    if len(given) < 2:
        return next(iter(given), None)
    (first, rank1), (second, rank2) = sorted(given.items(), key=lambda kv: -kv[1])
    if rank1 == rank2:
        raise MicroGPTError(f"pass --{first.replace('_', '-')} or --{second.replace('_', '-')}, not both")
    return first


def _version(value: bool) -> None:
    if value:
        typer.echo(f"microgpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _field_option(cls: type, name: str, panel: Optional[str] = None, envvar: Optional[str] = None) -> Any:
    """The option of dataclass field `name`, with the field's flags and help (its default is
    config.default_of)."""
    f = setting_fields(cls)[name]
    flags = f.metadata["flags"] or ("--" + name.replace("_", "-"),)
    return typer.Option(*flags, *f.metadata["aliases"], help=f.metadata["help"], rich_help_panel=panel, envvar=envvar)


def _sampling(name: str) -> Any:
    return _field_option(SamplingSettings, name)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was given (flag, environment variable or --config file), not defaulted."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


# --- prepare ---------------------------------------------------------------------------------


@app.command()
def prepare(
    ctx: typer.Context,
    inputs: Annotated[Optional[list[str]], typer.Argument(
        metavar="INPUTS",
        help="Text files, directories (their non-hidden text files, recursively, sorted) or - for stdin; with "
             "--chat, JSONL files of conversations.", show_default=False)] = None,
    sample: Annotated[Optional[SampleName], typer.Option(
        help="A corpus packaged with microgpt (tinyshakespeare: 1.1 MB of Shakespeare's plays), instead of "
             "or besides INPUTS.", show_default=False)] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", envvar=DATA_ENV, help="Data dir to create: train.bin, val.bin and meta.json.")] = Path("data"),
    tokenizer: Annotated[str, typer.Option("--tokenizer", "-t", help=(
        "gpt2 (GPT-2 BPE, offline), char (one id per distinct character), bpe (a byte-level BPE of "
        "--vocab-size trained on this text) or a tiktoken encoding name such as cl100k_base."))] = DEFAULT_TOKENIZER,
    tokenizer_from: Annotated[Optional[Path], typer.Option(
        help="Use the tokenizer of this checkpoint, run dir or data dir instead of --tokenizer: the data then fits "
             "`train --init-from` that model, even where its char or bpe vocabulary came from other text.",
        show_default=False)] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help='Inputs are conversations (JSONL): one JSON object per line with a "messages" list of '
                       'role (system, user or assistant) and content, as in OpenAI\'s API. Adds the chat template\'s '
                       "tokens to the tokenizer and writes a loss mask (the assistant's tokens) beside the ids; "
                       "malformed lines are skipped and named.")] = False,
    vocab_size: Annotated[Optional[int], typer.Option(
        help=f"Vocabulary size to train for --tokenizer bpe, 257 to 200000 ({DEFAULT_BPE_VOCAB_SIZE} when not given).",
        show_default=False)] = None,
    val_fraction: Annotated[float, typer.Option(
        help="Fraction at the end of every input (cut at a line start) that goes to the validation split."
    )] = DEFAULT_VAL_FRACTION,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --out if it is a data dir (from prepare) or empty; the old one is deleted only once "
                        "the new one is in place. Anything else at --out is refused.")] = False,
    errors: Annotated[ErrorMode, typer.Option(
        help="Invalid UTF-8: strict stops with the file and byte offset, replace substitutes U+FFFD.")] = "strict",
    threads: Annotated[int, typer.Option(
        envvar=THREADS_ENV, help="Threads that tokenize at once (0: one per CPU).")] = 0,
) -> None:
    """Tokenize text into a data dir (train.bin, val.bin, meta.json) for `microgpt train`."""
    from rich.table import Table

    from microgpt_cli.data.dataprep import prepare as prepare_data
    from microgpt_cli.progress import Task

    chosen: Any = tokenizer
    if tokenizer_from is not None:
        if _given(ctx, "tokenizer"):
            raise MicroGPTError("pass --tokenizer or --tokenizer-from, not both")
        from microgpt_cli.io.checkpoint import load_tokenizer

        chosen = load_tokenizer(tokenizer_from)

    def skip(line: str) -> None:
        stderr.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)

    started = time.monotonic()
    try:
        with Task(f"prepare {out}", total=None, unit="bytes") as task:

            def set_total(total: int) -> None:
                task.total = total

            def progress(done: int) -> None:
                # Short runs finish silently; plain-log lines would be noise in a pipe.
                if task.live or time.monotonic() - started > 5:
                    task.update(done)

            meta = prepare_data(
                inputs or [], out, sample=sample, tokenizer=chosen, vocab_size=vocab_size, chat=chat,
                val_fraction=val_fraction, force=force, errors=errors, on_total=set_total, on_progress=progress,
                threads=threads, on_skip=skip,
            )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see main)
        kept = f"{out} is as it was" if out.exists() else f"{out} was not created"
        raise Interrupted(f"prepare was interrupted; nothing was written: {kept}") from None
    table = Table(title=f"prepared {escape(str(out))}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for split, counts in meta["splits"].items():
        table.add_row(f"{split} tokens", f"{counts['tokens']:,}  ({counts['bytes']:,} bytes)")
    spec = meta["tokenizer"]
    table.add_row("tokenizer", escape(spec.get("name", spec["kind"])))
    table.add_row("vocab size", f"{meta['vocab_size']:,} ({meta['dtype']})")
    table.add_row("chars per token", f"{meta['chars_per_token']:.2f}")
    if "chat" in meta:
        facts = meta["chat"]
        for split in facts["conversations"]:
            table.add_row(f"{split} conversations", f"{facts['conversations'][split]:,}  "
                                                    f"({facts['trained_tokens'][split]:,} trained tokens)")
        table.add_row("malformed lines skipped", f"{facts['skipped_lines']:,}")
    table.add_row("seconds", f"{meta['seconds']:.1f}")
    stderr.print(table)


# --- train -----------------------------------------------------------------------------------

M = "Model"  # help panels group the many train options
T = "Training"


def _model(name: str) -> Any:
    return _field_option(ModelConfig, name, panel=M)


def _train(name: str, envvar: Optional[str] = None) -> Any:
    return _field_option(TrainConfig, name, panel=T, envvar=envvar)


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, _train("data", envvar=DATA_ENV)] = Path(default_of(TrainConfig, "data")),
    out: Annotated[Path, _train("out", envvar=OUT_ENV)] = Path(default_of(TrainConfig, "out")),
    config: ConfigOpt = None,
    preset: Annotated[Optional[PresetName], typer.Option(
        show_default=False, rich_help_panel=T, metavar="NAME",  # the names and uses are in the help
        help=f"Named hyperparameter set; flags override it. {preset_help()}.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out where last.pt left it; options given now change it (stopping "
        "point, LR, evaluation...), except the model's shape, batch, seed and optimizer.", rich_help_panel=T)] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Start over even if --out already holds a run (its files are deleted first).",
        rich_help_panel=T)] = False,
    epochs: Annotated[float, _train("epochs")] = default_of(TrainConfig, "epochs"),
    max_steps: Annotated[int, _train("max_steps")] = default_of(TrainConfig, "max_steps"),
    time_budget: Annotated[float, _train("time_budget")] = default_of(TrainConfig, "time_budget"),
    batch_size: Annotated[int, _train("batch_size")] = default_of(TrainConfig, "batch_size"),
    grad_accum: Annotated[int, _train("grad_accum")] = default_of(TrainConfig, "grad_accum"),
    lr: Annotated[float, _train("lr")] = default_of(TrainConfig, "lr"),
    min_lr_ratio: Annotated[float, _train("min_lr_ratio")] = default_of(TrainConfig, "min_lr_ratio"),
    warmup_steps: Annotated[int, _train("warmup_steps")] = default_of(TrainConfig, "warmup_steps"),
    weight_decay: Annotated[float, _train("weight_decay")] = default_of(TrainConfig, "weight_decay"),
    grad_clip: Annotated[float, _train("grad_clip")] = default_of(TrainConfig, "grad_clip"),
    beta1: Annotated[float, _train("beta1")] = default_of(TrainConfig, "beta1"),
    beta2: Annotated[float, _train("beta2")] = default_of(TrainConfig, "beta2"),
    optimizer: Annotated[OptimizerName, _train("optimizer")] = default_of(TrainConfig, "optimizer"),
    muon_lr: Annotated[float, _train("muon_lr")] = default_of(TrainConfig, "muon_lr"),
    eval_interval: Annotated[int, _train("eval_interval")] = default_of(TrainConfig, "eval_interval"),
    eval_tokens: Annotated[int, _train("eval_tokens")] = default_of(TrainConfig, "eval_tokens"),
    log_interval: Annotated[int, _train("log_interval")] = default_of(TrainConfig, "log_interval"),
    seed: Annotated[int, _train("seed")] = default_of(TrainConfig, "seed"),
    device: Annotated[str, _train("device", envvar=DEVICE_ENV)] = default_of(TrainConfig, "device"),
    init_from: Annotated[str, _train("init_from")] = default_of(TrainConfig, "init_from"),
    compile: Annotated[bool, _train("compile")] = default_of(TrainConfig, "compile"),
    threads: Annotated[int, _train("threads", envvar=THREADS_ENV)] = default_of(TrainConfig, "threads"),
    n_layer: Annotated[int, _model("n_layer")] = default_of(ModelConfig, "n_layer"),
    n_head: Annotated[int, _model("n_head")] = default_of(ModelConfig, "n_head"),
    n_embed: Annotated[int, _model("n_embed")] = default_of(ModelConfig, "n_embed"),
    context: Annotated[int, _model("context")] = default_of(ModelConfig, "context"),
    dropout: Annotated[float, _model("dropout")] = default_of(ModelConfig, "dropout"),
    position: Annotated[Position, _model("position")] = default_of(ModelConfig, "position"),
    norm: Annotated[Norm, _model("norm")] = default_of(ModelConfig, "norm"),
    activation: Annotated[Activation, _model("activation")] = default_of(ModelConfig, "activation"),
    qk_norm: Annotated[bool, _model("qk_norm")] = default_of(ModelConfig, "qk_norm"),
    tie_weights: Annotated[bool, _model("tie_weights")] = default_of(ModelConfig, "tie_weights"),
    bias: Annotated[bool, _model("bias")] = default_of(ModelConfig, "bias"),
    pad_vocab: Annotated[int, _model("pad_vocab")] = default_of(ModelConfig, "pad_vocab"),
) -> None:
    """Train a GPT on a prepared data dir, keeping the best and the last checkpoint."""
    # The settings asked for by a flag, an environment variable or a --config file: they beat the
    # preset, and --resume applies just these to the saved run.
    options = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items()
               if k not in ("ctx", "preset", "resume", "force", "config") and _given(ctx, k)}
    from microgpt_cli.config import resolve
    from microgpt_cli.device import keep_freed_memory
    from microgpt_cli.progress import TrainDisplay
    from microgpt_cli.training.loop import train as run_training

    keep_freed_memory()
    model_kwargs, train_kwargs = resolve(preset, options)
    given = set(model_kwargs) | set(train_kwargs)
    with TrainDisplay() as display:
        run_training(ModelConfig(**model_kwargs), TrainConfig(**train_kwargs), resume=resume, force=force,
                     on_event=display.event, given=given, started=STARTED)


# --- eval ------------------------------------------------------------------------------------


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    checkpoint: CheckpointOpt = Path("out"),
    data: Annotated[
        Path, typer.Option(envvar=DATA_ENV, help="Prepared data dir whose whole validation split is scored.")
    ] = Path(default_of(TrainConfig, "data")),
    text: Annotated[
        Optional[Path],
        typer.Option(help="Score this UTF-8 text file instead, tokenized with the checkpoint's tokenizer."),
    ] = None,
    skip_unknown: Annotated[bool, typer.Option(
        "--skip-unknown", help="With --text: leave out characters the checkpoint's char vocabulary lacks (they are "
                               "counted in the result) instead of stopping.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help=(
        "Print one JSON object: loss, perplexity, bits_per_byte, tokens, seconds; with --tasks, the harness's "
        "own output, whose \"results\" holds each task's metrics."))] = False,
    batch_size: Annotated[
        int, typer.Option(help="Context windows scored at once (memory vs. speed).")] = EVAL_BATCH_SIZE,
    tasks: Annotated[Optional[str], typer.Option(
        help="Score lm-evaluation-harness tasks instead, comma-separated: its registry's (hellaswag,arc_easy; their "
             "datasets need the network or its cache) or your own YAML files under --include-path. Needs the eval "
             "extra.", rich_help_panel=H, show_default=False)] = None,
    include_path: Annotated[Optional[Path], typer.Option(
        help="With --tasks: a directory of your own task YAML files (the harness's format).", rich_help_panel=H,
        show_default=False)] = None,
    limit: Annotated[Optional[float], typer.Option(
        help="With --tasks: at most this many documents per task (a number below 1: that fraction of them).",
        rich_help_panel=H, show_default=False)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(
        help="With --tasks: solved examples put before each question (default: each task's own).",
        rich_help_panel=H, show_default=False)] = None,
    quantize: QuantizeOpt = "none",
    device: DeviceOpt = "auto",
    threads: Annotated[int, typer.Option(
        envvar=THREADS_ENV, help="CPU threads torch scores with (0: torch's default, one per core).")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Score a checkpoint on every token of the validation split (or a text file), exactly once; or on
    benchmark tasks through lm-evaluation-harness (--tasks)."""
    from microgpt_cli.device import keep_freed_memory

    keep_freed_memory()
    if tasks is not None:
        source = ctx.get_parameter_source("data")
        given = [name for name in ("text", "skip_unknown") if _given(ctx, name)]
        given += ["data"] if source is not None and source.name == "COMMANDLINE" else []
        if given:
            raise MicroGPTError(f"--tasks scores benchmark tasks, not a split or a text: leave out "
                                f"--{given[0].replace('_', '-')}")
        _eval_tasks(checkpoint, tasks, include_path, limit, num_fewshot, batch_size, quantize, device, json_output)
        return
    harness_only = [name for name in ("include_path", "limit", "num_fewshot") if _given(ctx, name)]
    if harness_only:
        raise MicroGPTError(f"--{harness_only[0].replace('_', '-')} goes with --tasks")
    if _stronger(ctx, data=data, text=text) != "text":
        text = None  # --data (given, or its default) wins
    from rich.console import Console

    from microgpt_cli.infer.evaluation import evaluate
    from microgpt_cli.progress import Task, eval_table

    started = time.monotonic()
    scored = [0, 0]  # tokens scored, of how many
    with Task("eval", total=None, unit="tokens") as task:
        # Short evals finish silently; a plain-log line would be noise in a pipe.
        def progress(done: int, total: int) -> None:
            scored[:] = done, total
            if task.live or time.monotonic() - started > 5:
                task.update(done, total=total)

        try:
            result = evaluate(checkpoint, data, text, batch_size, device, on_progress=progress,
                              skip_unknown=skip_unknown, quantize=quantize, threads=threads)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM
            where = f" after {scored[0]:,} of {scored[1]:,} tokens" if scored[1] else ""
            raise Interrupted(f"eval was interrupted{where}; nothing was written") from None
    if json_output:
        typer.echo(_json_text(result.to_dict()))
        return
    Console().print(eval_table(result, f"{checkpoint} on {text if text is not None else data / 'val.bin'}"))


def _eval_tasks(checkpoint: Path, tasks: str, include_path: Optional[Path], limit: Optional[float],
                num_fewshot: Optional[int], batch_size: int, quantize: str, device: str, json_output: bool) -> None:
    # The harness and the datasets library draw tqdm bars of their own; microgpt's display replaces them.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from rich.console import Console

    from microgpt_cli.infer.evaluation import evaluate_tasks
    from microgpt_cli.progress import Task, tasks_table

    started = time.monotonic()
    with Task(f"eval {tasks}", total=None, unit="tokens") as task:
        def progress(kind: str, done: int, total: int) -> None:  # tokens scored, or requests decoded
            task.unit = "requests" if kind == "generate_until" else "tokens"
            if task.live or time.monotonic() - started > 5:
                task.update(done, status=kind, total=total, force=done == total)

        results = evaluate_tasks(checkpoint, tasks.split(","), include_path, limit, num_fewshot, batch_size, device,
                                 quantize, on_progress=progress)
    results.pop("samples", None)
    if json_output:
        from lm_eval.utils import handle_non_serializable

        typer.echo(_json_text(results, default=handle_non_serializable))
        return
    Console().print(tasks_table(results, f"{checkpoint}: lm-evaluation-harness {results.get('lm_eval_version', '')}"))


# --- generate --------------------------------------------------------------------------------


@app.command()
def generate(
    ctx: typer.Context,
    checkpoint: CheckpointOpt = Path("out"),
    prompt: Annotated[
        Optional[str], typer.Option(help="Text to continue; empty starts from a document boundary.")
    ] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from this UTF-8 file.")] = None,
    length: Annotated[int, _sampling("length")] = default_of(SamplingSettings, "length"),
    temperature: Annotated[float, _sampling("temperature")] = default_of(SamplingSettings, "temperature"),
    top_k: Annotated[int, _sampling("top_k")] = default_of(SamplingSettings, "top_k"),
    top_p: Annotated[float, _sampling("top_p")] = default_of(SamplingSettings, "top_p"),
    seed: Annotated[int, _sampling("seed")] = default_of(SamplingSettings, "seed"),
    num_samples: Annotated[int, typer.Option(
        help="Samples to write, separated by a '---' line; decoded as one batch, sample i with seed + i.")] = 1,
    stop: Annotated[Optional[list[str]], _sampling("stop")] = default_of(SamplingSettings, "stop"),
    frequency_penalty: Annotated[float, _sampling("frequency_penalty")] = default_of(
        SamplingSettings, "frequency_penalty"),
    presence_penalty: Annotated[float, _sampling("presence_penalty")] = default_of(
        SamplingSettings, "presence_penalty"),
    quantize: QuantizeOpt = "none",
    device: DeviceOpt = "auto",
    threads: DecodeThreadsOpt = 0,
    config: ConfigOpt = None,
) -> None:
    """Continue a prompt with a trained model, streaming the text to stdout as it is sampled."""
    if _stronger(ctx, prompt=prompt, prompt_file=prompt_file) == "prompt_file":
        prompt = None
    else:
        prompt_file = None
    from microgpt_cli.infer.engine import MAX_SLOTS
    from microgpt_cli.infer.evaluation import read_text
    from microgpt_cli.infer.sampling import load_sampler
    from microgpt_cli.io.checkpoint import resolve_path

    if not 1 <= num_samples <= MAX_SLOTS:
        raise MicroGPTError(f"--num-samples must be between 1 and {MAX_SLOTS:,}, got {num_samples:,}")
    settings = SamplingSettings(length, temperature, top_k, top_p, tuple(stop) if stop else None, seed,
                                frequency_penalty, presence_penalty)
    start_text = read_text(prompt_file) if prompt_file is not None else prompt or ""
    sampler = load_sampler(checkpoint, device=device, slots=num_samples, quantize=quantize, threads=threads)
    batch = sampler.batch([start_text] * num_samples, settings)  # a bad prompt fails here, before any output
    stderr.print(
        f"[dim]{escape(str(resolve_path(checkpoint)))}: {sampler.engine.num_params / 1e6:.2f}M parameters, "
        f"{escape(sampler.tokenizer.name)} tokenizer, on {sampler.engine.device} ({sampler.engine.weights} weights)[/]",
        highlight=False, soft_wrap=True,
    )
    # The first sample streams as it is sampled; the others, decoded alongside, follow it.
    later: list[list[str]] = [[] for _ in range(num_samples)]
    try:
        for row, piece in batch:
            if row == 0:
                sys.stdout.write(piece)
                sys.stdout.flush()
            else:
                later[row].append(piece)
        for row in range(1, num_samples):
            sys.stdout.write("\n\n---\n\n" + "".join(later[row]))
        sys.stdout.write("\n")
        sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise Interrupted(f"generation interrupted after {batch.new_tokens:,} new tokens; "
                          "the text so far of the first sample is on stdout") from None
    rate = batch.new_tokens / batch.seconds if batch.seconds > 0 else 0.0
    samples = f" in {num_samples} samples" if num_samples > 1 else ""
    stderr.print(f"[dim]{batch.new_tokens} tokens{samples} in {batch.seconds:.2f}s ({rate:.1f} tokens/s; "
                 f"first after {batch.first_token_seconds:.2f}s)[/]", highlight=False)


# --- chat ------------------------------------------------------------------------------------


@app.command()
def chat(
    checkpoint: CheckpointOpt = Path("out"),
    system: Annotated[str, typer.Option(
        help="A system message that opens the conversation (/system TEXT changes it).", show_default=False)] = "",
    length: Annotated[int, typer.Option(
        help="The most new tokens per reply (a reply ends sooner at the model's end of turn)."
    )] = default_of(SamplingSettings, "length"),
    temperature: Annotated[float, _sampling("temperature")] = default_of(SamplingSettings, "temperature"),
    top_k: Annotated[int, _sampling("top_k")] = default_of(SamplingSettings, "top_k"),
    top_p: Annotated[float, _sampling("top_p")] = default_of(SamplingSettings, "top_p"),
    seed: Annotated[int, _sampling("seed")] = default_of(SamplingSettings, "seed"),
    frequency_penalty: Annotated[float, _sampling("frequency_penalty")] = default_of(
        SamplingSettings, "frequency_penalty"),
    presence_penalty: Annotated[float, _sampling("presence_penalty")] = default_of(
        SamplingSettings, "presence_penalty"),
    quantize: QuantizeOpt = "none",
    device: DeviceOpt = "auto",
    threads: DecodeThreadsOpt = 0,
    config: ConfigOpt = None,
) -> None:
    """Talk with a model fine-tuned on conversations: streamed replies, history within the context.
    With stdin not a terminal: one message per line in, one reply per line out."""
    from microgpt_cli.infer.chat import Conversation
    from microgpt_cli.infer.sampling import load_sampler
    from microgpt_cli.io.checkpoint import resolve_path
    from microgpt_cli.repl import run

    settings = SamplingSettings(length, temperature, top_k, top_p, None, seed, frequency_penalty, presence_penalty)
    sampler = load_sampler(checkpoint, device=device, quantize=quantize, threads=threads)
    template = sampler.tokenizer.chat_template
    stderr.print(
        f"[dim]{escape(str(resolve_path(checkpoint)))}: {sampler.engine.num_params / 1e6:.2f}M parameters, "
        f"{escape(sampler.tokenizer.name)} tokenizer, context {sampler.engine.context}, on {sampler.engine.device}"
        + (f", chat template {escape(template.name)}[/]" if template else "[/]"), highlight=False, soft_wrap=True)
    if template is None:
        stderr.print("[yellow]note:[/] this model has no chat template (it was not fine-tuned on conversations: "
                     "`microgpt prepare --chat`, then `train`); it continues a plain 'user: ... assistant:' "
                     "transcript as text", highlight=False, soft_wrap=True)

    def note(text: str) -> None:
        stderr.print(f"[dim]{escape(text)}[/]", highlight=False, soft_wrap=True)

    def warn(text: str) -> None:
        stderr.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)

    run(Conversation(sampler, settings, system), note, warn)


# --- import ----------------------------------------------------------------------------------


@app.command("import")
def import_command(
    source: Annotated[str, typer.Argument(
        metavar="SOURCE",
        help="A Hugging Face GPT-2 model dir, a Hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2; "
             "needs the network or the Hub cache) or a dir made by `microgpt export`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write.", show_default=False)],
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --out if it is a microgpt checkpoint; anything else at --out is refused.")] = False,
) -> None:
    """Import pretrained GPT-2 weights as a microgpt checkpoint, for info, eval, generate, serve and export."""
    from microgpt_cli.io.pretrained import import_model

    path, model, tokenizer = import_model(source, out, force)
    c = model.config
    stderr.print(f"wrote {escape(str(path))}: {model.num_params() / 1e6:.2f}M parameters ({c.n_layer} layers x "
                 f"{c.n_embed}, {c.n_head} heads, context {c.context}), {escape(tokenizer.name)} tokenizer",
                 highlight=False)


# --- serve -----------------------------------------------------------------------------------


def _serve(name: str, **extra: Any) -> Any:
    return _field_option(ServeSettings, name, **extra)


@app.command()
def serve(
    checkpoint: CheckpointOpt = Path("out"),
    host: Annotated[str, _serve("host")] = default_of(ServeSettings, "host"),
    port: Annotated[int, _serve("port")] = default_of(ServeSettings, "port"),
    api_key: Annotated[Optional[str], _serve("api_key", envvar=API_KEY_ENV)] = default_of(ServeSettings, "api_key"),
    allowed_hosts: Annotated[Optional[str], _serve("allowed_hosts")] = default_of(ServeSettings, "allowed_hosts"),
    max_batch: Annotated[int, _serve("max_batch")] = default_of(ServeSettings, "max_batch"),
    max_tokens_limit: Annotated[int, _serve("max_tokens_limit")] = default_of(ServeSettings, "max_tokens_limit"),
    max_connections: Annotated[int, _serve("max_connections")] = default_of(ServeSettings, "max_connections"),
    header_timeout: Annotated[float, _serve("header_timeout")] = default_of(ServeSettings, "header_timeout"),
    body_timeout: Annotated[float, _serve("body_timeout")] = default_of(ServeSettings, "body_timeout"),
    keep_alive_timeout: Annotated[int, _serve("keep_alive_timeout")] = default_of(ServeSettings,
                                                                                   "keep_alive_timeout"),
    max_body_bytes: Annotated[int, _serve("max_body_bytes")] = default_of(ServeSettings, "max_body_bytes"),
    quantize: QuantizeOpt = "none",
    device: DeviceOpt = "auto",
    threads: DecodeThreadsOpt = 0,
) -> None:
    """Serve a checkpoint over HTTP: an OpenAI-compatible API under /v1 and a web playground at /."""
    from microgpt_cli.serve.server import serve as run_server

    if api_key is None and API_KEY_ENV in os.environ:  # click reads an empty variable as unset: no key at all
        api_key = os.environ[API_KEY_ENV]
    settings = ServeSettings(host, port, api_key, allowed_hosts, max_batch, max_tokens_limit, max_connections,
                             header_timeout, body_timeout, keep_alive_timeout, max_body_bytes)

    def announce(line: str) -> None:
        stderr.print(escape(line), highlight=False, soft_wrap=True)

    run_server(checkpoint, settings, device, quantize, announce, threads)
    stderr.print("stopped", highlight=False)


# --- info, plot, export ----------------------------------------------------------------------


@app.command()
def info(
    path: Annotated[Path, typer.Argument(
        metavar="PATH",
        envvar=OUT_ENV, help="A checkpoint file, a run dir (from train) or a data dir (from prepare).")] = Path("out"),
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show what a checkpoint, run dir or data dir holds: model, tokenizer, data and training."""
    from rich.console import Console
    from rich.table import Table

    from microgpt_cli.info import describe

    facts = describe(path)
    if json_output:
        typer.echo(_json_text(facts))
        return
    table = Table(title=escape(f"{facts['kind']} {facts['path']}"), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in _info_rows(facts):
        table.add_row(label, escape(value))
    Console().print(table)


def _json_text(value: dict[str, Any], default: Optional[Callable[[Any], Any]] = None) -> str:
    """`value` as standard JSON: json.dumps would write NaN and infinities as the bare words NaN and
    Infinity, which JSON parsers refuse. They become null, and `null_because` says why for each
    (by its dotted key: "perplexity", "training.val_loss")."""
    import json
    import math

    why: dict[str, str] = {}

    def clean(item: Any, key: str) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            why[key] = "not a number (NaN)" if math.isnan(item) else f"{item} (JSON has no infinity)"
            return None
        if isinstance(item, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(item)]
        return item

    cleaned = clean(value, "")
    if why:
        cleaned["null_because"] = why
    return json.dumps(cleaned, allow_nan=False, default=default)


def _info_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    from microgpt_cli.progress import format_seconds
    from microgpt_cli.training.events import val_scope

    tok = facts["tokenizer"]
    if facts["kind"] == "data":
        rows = [("tokenizer", f"{tok['name']} ({tok['vocab_size']:,} tokens, stored as {facts['dtype']})")]
        rows += [(f"{split} split", f"{c['tokens']:,} tokens ({c['bytes']:,} bytes)")
                 for split, c in facts["splits"].items()]
        if facts["chat"]:
            chat = facts["chat"]
            rows += [("conversations", ", ".join(f"{n:,} {split}" for split, n in chat["conversations"].items())
                      + f" (chat template {tok['chat_template']}; {chat['skipped_lines']:,} malformed lines skipped)")]
        rows += [("input", f"{i['path']} ({i.get('bytes', 0):,} bytes, sha256 {str(i.get('sha256'))[:12]})")
                 for i in facts["inputs"]]
        return [*rows, ("prepared", facts["file"]["modified"])]
    m, t = facts["model"], facts["training"]
    shape = f"{m['n_layer']} layers x {m['n_embed']} wide, {m['n_head']} heads, context {m['context']}"
    options = f"{m['position']} positions, {m['norm']}, {m['activation']}" + (", qk-norm" if m["qk_norm"] else "")
    options += ("" if m["bias"] else ", no bias") + ("" if m["tie_weights"] else ", untied head")
    rows = [
        ("model", f"{m['params']:,} parameters ({m['params'] / 1e6:.2f}M)"),
        ("shape", shape),
        ("architecture", options),
        ("tokenizer", f"{tok['name']} ({tok['vocab_size']:,} tokens)"
                      + (f", chat template {tok['chat_template']}" if tok["chat_template"] else ", no chat template")),
        ("trained on", f"{facts['data']['dir'] or '-'} ({len(facts['data']['inputs_sha256'])} input files)"),
    ]
    if facts["init_from"]:
        start = facts["init_from"]
        rows.append(("started from", f"{start['path']} (sha256 {start['sha256'][:12]})"))

    def num(value: Optional[float], fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    scope = val_scope(t["val_tokens"], t["val_split_tokens"])
    scope = f" ({scope})" if scope else ""
    rows += [
        ("steps", num(t["step"], ",")),
        ("epochs", num(t["epoch"], ".2f")),
        ("train loss", num(t["train_loss"], ".4f")),
        ("val loss", num(t["val_loss"], ".4f") + scope),
        ("best val loss", num(t["best_val_loss"], ".4f") + scope),
        ("train time", "-" if t["elapsed"] is None else format_seconds(t["elapsed"])),
    ]
    files = facts["checkpoints"] if facts["kind"] == "run" else {Path(facts["path"]).name: facts["file"]}
    for name, f in files.items():
        step = f" (step {f['step']:,})" if f.get("step") is not None else ""
        rows.append((name, f"{f['bytes'] / 1e6:,.1f} MB, written {f['modified']}{step}"))
    return rows


@app.command()
def plot(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIRS", help="Run dirs (from train) to draw on one chart.",
                                   show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="File to write: .png, .svg or .pdf (the format follows the suffix).")] = Path("runs.png"),
    x: Annotated[XAxis, typer.Option(
        "--x", help=f"Horizontal axis: {', '.join(f'{k} ({v})' for k, v in X_AXES.items())}.")] = "step",
) -> None:
    """Draw the loss curves of one or more runs into a PNG, SVG or PDF: val loss solid, train loss faint."""
    from microgpt_cli.plot import save_runs_plot

    path = save_runs_plot(run_dirs, out, x)
    stderr.print(f"wrote {escape(str(path))}", highlight=False)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create.", show_default=False)],
    checkpoint: CheckpointOpt = Path("out"),
    format: Annotated[ExportFormat, typer.Option(
        "--format", "-f", help="hf: a transformers GPT-2 model dir (GPT2LMHeadModel.from_pretrained), for models "
        "with GPT-2's architecture; safetensors: the plain weights and config.json, for any model; auto: hf where "
        "it can be, else safetensors.")] = "auto",
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --out if it is a dir made by `microgpt export`; anything else at --out is refused."
    )] = False,
) -> None:
    """Export a checkpoint for other tools: Hugging Face transformers GPT-2, or plain safetensors."""
    from microgpt_cli.io.export import export as export_model

    done = export_model(checkpoint, out, format, force)
    note = f" ({done.note})" if done.note else ""
    stderr.print(f"exported {escape(str(checkpoint))} as {done.format} to {escape(str(done.path))}{escape(note)}",
                 highlight=False, soft_wrap=True)


def _exit_now(code: int, in_process: bool) -> NoReturn:
    """Exit after an interrupt, once the command has cleaned up.

    Not `sys.exit` for the command itself (a caller in-process still gets SystemExit): a Ctrl-C
    that lands while an extension runs Python code of its own (torch's import does) leaves
    CPython's "unhandled KeyboardInterrupt" flag set, and the interpreter then kills itself with
    SIGINT at exit instead of returning `code`."""
    if in_process:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user mistakes become one line on stderr and a non-zero exit, never a traceback."""
    import signal

    # SIGTERM (kill, a CI timeout) stops a command the way Ctrl-C does: temp files go, nothing is
    # left half-written. `train` and `serve` install their own handlers over this one.
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is handled below
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        code = app(argv, prog_name="microgpt", standalone_mode=False)
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one message for the whole job
            _error_line(exc.label, str(exc), "yellow")
        _exit_now(exc.exit_code, argv is not None)
    except InvalidSetting as exc:
        _error_line(exc.label, exc.with_flags())
        sys.exit(exc.exit_code)
    except MicroGPTError as exc:
        _error_line(exc.label, str(exc))
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError:  # a bare `microgpt`: the help was the answer
        sys.exit(0)
    except typer.TyperException as exc:  # bad option or value, caught by the parser
        # Typer checks values with pydantic, whose messages start "Value error, ": noise to a user.
        _error_line("error", f"{exc.format_message().replace('Value error, ', '')} (see --help)")
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        _error_line("stopped", "interrupted", "yellow")
        _exit_now(130, argv is not None)
    except _PipeClosed:  # e.g. `microgpt generate ... | head`
        # Python flushes stdout once more at exit, into the same closed pipe: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:  # a file or dir the user named cannot be read or written
        _error_line("error", describe_os_error(exc))
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 130:  # Click's answer to a Ctrl-C while it parsed the command line
        _error_line("stopped", "interrupted", "yellow")
        _exit_now(130, argv is not None)
    sys.exit(code if isinstance(code, int) else 0)


def _error_line(label: str, message: str, color: str = "red") -> None:
    # One line, whatever a message quotes (a file name or an option value may hold a line break).
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    stderr.print(f"[bold {color}]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)
