"""The `microgpt` command: parse options, call the library, render with Rich. No ML logic here."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from microgpt_cli import __version__
from microgpt_cli.errors import Interrupted, MicroGPTError
from microgpt_cli.progress import stderr

app = typer.Typer(
    name="microgpt",
    help="Train small GPT language models on your own text, evaluate them, and sample from them.\n\n"
    "microgpt prepare input.txt → microgpt train → microgpt eval → microgpt generate --prompt hello",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

# Environment variables for the paths and device that most commands share. Precedence, highest
# first: command-line flag, environment variable, --config file, --preset, built-in default.
DATA_ENV, OUT_ENV, DEVICE_ENV = "MICROGPT_DATA", "MICROGPT_OUT", "MICROGPT_DEVICE"

CheckpointOpt = Annotated[
    Path, typer.Option("--checkpoint", "-c", envvar=OUT_ENV,
                       help="Checkpoint file, or a run dir (its best.pt is used).")
]
DeviceOpt = Annotated[str, typer.Option(
    envvar=DEVICE_ENV, help="Where to run: auto, cpu, cuda or mps (auto picks cuda, then mps, then cpu).")]
_TOML_TYPES: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,)}


def _option_keys(command: typer.core.TyperCommand) -> dict[str, typer.core.TyperOption]:
    """Config-file keys of a command's options: the option names with underscores (aliases too)."""
    keys = {}
    for param in command.params:
        if not isinstance(param, typer.core.TyperOption) or param.is_eager or param.name == "config":
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

    keys = _option_keys(ctx.command)
    defaults = {}
    for key, item in read_toml(value).items():
        if key not in keys:
            raise MicroGPTError(f"config file {value}: unknown key {key!r}; `microgpt {ctx.info_name}` takes "
                                f"{', '.join(sorted(p.name for p in set(keys.values())))}")
        option = keys[key]
        wanted = _TOML_TYPES.get(option.type_descriptor.annotation, (str,))
        if not isinstance(item, wanted) or isinstance(item, bool) != (wanted == (bool,)):
            kind = {int: "an integer", float: "a number", bool: "true or false"}.get(option.type_descriptor.annotation, "a string")
            raise MicroGPTError(f"config file {value}: {key} must be {kind}, got {item!r}")
        defaults[option.name] = item
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
    given = {name: order.index(ctx.get_parameter_source(name).name) for name, v in values.items() if v is not None}
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


# --- prepare ---------------------------------------------------------------------------------


class DecodeErrors(str, Enum):
    strict = "strict"
    replace = "replace"


@app.command()
def prepare(
    inputs: Annotated[list[str], typer.Argument(
        help="Text files, directories (their non-hidden text files, recursively, sorted) or - for stdin.",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", envvar=DATA_ENV, help="Data dir to create: train.bin, val.bin and meta.json.")] = Path("data"),
    tokenizer: Annotated[str, typer.Option("--tokenizer", "-t", help=(
        "gpt2 (GPT-2 BPE, offline), char (one id per distinct character), bpe (a byte-level BPE of "
        "--vocab-size trained on this text) or a tiktoken encoding name such as cl100k_base."))] = "gpt2",
    vocab_size: Annotated[Optional[int], typer.Option(
        help="Vocabulary size to train for --tokenizer bpe, 257 to 200000 (4096 when not given).",
        show_default=False)] = None,
    val_fraction: Annotated[float, typer.Option(
        help="Fraction at the end of every input (cut at a line start) that goes to the validation split.")] = 0.1,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --out if it exists; the old dir is deleted only once the new one is in place.")] = False,
    errors: Annotated[DecodeErrors, typer.Option(
        help="Invalid UTF-8: strict stops with the file and byte offset, replace substitutes U+FFFD.")] = DecodeErrors.strict,
) -> None:
    """Tokenize text into a data dir (train.bin, val.bin, meta.json) for `microgpt train`."""
    import signal
    import time

    from rich.table import Table

    from microgpt_cli.data import prepare as prepare_data
    from microgpt_cli.progress import Task

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that `kill` cleans up the temp dir like Ctrl-C does

    previous = signal.signal(signal.SIGTERM, interrupt)
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
                inputs, out, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                force=force, errors=errors.value, on_total=set_total, on_progress=progress,
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    table = Table(title=f"prepared {escape(str(out))}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for split, counts in meta["splits"].items():
        table.add_row(f"{split} tokens", f"{counts['tokens']:,}  ({counts['bytes']:,} bytes)")
    spec = meta["tokenizer"]
    table.add_row("tokenizer", escape(spec.get("name", spec["kind"])))
    table.add_row("vocab size", f"{meta['vocab_size']:,} ({meta['dtype']})")
    table.add_row("chars per token", f"{meta['chars_per_token']:.2f}")
    table.add_row("seconds", f"{meta['seconds']:.1f}")
    stderr.print(table)


# --- train -----------------------------------------------------------------------------------

M = "Model"  # help panels group the many train options
T = "Training"


def _opt(*names: str, help: str, default: object = None, panel: str = T, envvar: Optional[str] = None) -> typer.models.OptionInfo:
    """An option whose absence is None (so a --config file or --preset can fill it), showing its real default."""
    return typer.Option(*names, help=help, show_default=str(default) if default is not None else False,
                        rich_help_panel=panel, envvar=envvar)


@app.command()
def train(
    data: Annotated[Optional[Path], _opt("--data", help="Prepared data dir.", default="data", envvar=DATA_ENV)] = None,
    out: Annotated[Optional[Path], _opt("--out", help="Run dir for best.pt, last.pt, metrics.jsonl, config.toml.", default="out", envvar=OUT_ENV)] = None,
    config: ConfigOpt = None,
    preset: Annotated[Optional[str], _opt("--preset", help="Named hyperparameter set (cpu, gpt2); flags override it.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly where last.pt left it.", rich_help_panel=T)] = False,
    force: Annotated[bool, typer.Option(help="Start over even if --out already holds a run.", rich_help_panel=T)] = False,
    epochs: Annotated[Optional[float], _opt("--epochs", help="Full passes over the training split.", default=390)] = None,
    max_steps: Annotated[Optional[int], _opt("--max-steps", help="Stop after this many optimizer steps (0: no cap).", default=0)] = None,
    time_budget: Annotated[Optional[float], _opt("--time-budget", help="Stop after this many seconds; the LR schedule ends there (0: no cap).", default=0)] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "--batches", help="Sequences per micro-batch.", default=8)] = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", help="Micro-batches per optimizer step.", default=1)] = None,
    lr: Annotated[Optional[float], _opt("--lr", help="Peak learning rate.", default=3e-3)] = None,
    min_lr_ratio: Annotated[Optional[float], _opt("--min-lr-ratio", help="Final LR as a fraction of the peak.", default=0.1)] = None,
    warmup_steps: Annotated[Optional[int], _opt("--warmup-steps", help="Linear warmup steps.", default=100)] = None,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", help="AdamW weight decay on matrices.", default=0.1)] = None,
    grad_clip: Annotated[Optional[float], _opt("--grad-clip", help="Clip the gradient norm (0: off).", default=1.0)] = None,
    beta1: Annotated[Optional[float], _opt("--beta1", help="AdamW first-moment decay.", default=0.9)] = None,
    beta2: Annotated[Optional[float], _opt("--beta2", help="AdamW second-moment decay.", default=0.95)] = None,
    optimizer: Annotated[Optional[str], _opt("--optimizer", help="adamw, or muon for the blocks' matrices (AdamW for the rest).", default="adamw")] = None,
    muon_lr: Annotated[Optional[float], _opt("--muon-lr", help="Learning rate of the Muon matrices.", default=0.02)] = None,
    eval_interval: Annotated[Optional[int], _opt("--eval-interval", help="Evaluate and save every N steps.", default=250)] = None,
    eval_tokens: Annotated[Optional[int], _opt("--eval-tokens", help="Validation tokens per evaluation (0: the whole split).", default=0)] = None,
    log_interval: Annotated[Optional[int], _opt("--log-interval", help="Log the train loss every N steps.", default=10)] = None,
    seed: Annotated[Optional[int], _opt("--seed", help="Seed for init, dropout and data order.", default=1337)] = None,
    device: Annotated[Optional[str], _opt("--device", help="auto, cpu, cuda or mps.", default="auto", envvar=DEVICE_ENV)] = None,
    compile: Annotated[Optional[bool], _opt("--compile/--no-compile", help="Compile the model with torch.compile.", default=False)] = None,
    threads: Annotated[Optional[int], _opt("--threads", help="CPU threads for torch (0: torch's default).", default=0)] = None,
    n_layer: Annotated[Optional[int], _opt("--n-layer", help="Transformer blocks.", default=6, panel=M)] = None,
    n_head: Annotated[Optional[int], _opt("--n-head", "--n-ma", help="Attention heads per block.", default=8, panel=M)] = None,
    n_embed: Annotated[Optional[int], _opt("--n-embed", help="Embedding width.", default=512, panel=M)] = None,
    context: Annotated[Optional[int], _opt("--context", "--text-size", help="Context length in tokens.", default=512, panel=M)] = None,
    dropout: Annotated[Optional[float], _opt("--dropout", help="Dropout probability.", default=0.1, panel=M)] = None,
    position: Annotated[Optional[str], _opt("--position", help="Positions: learned or rope (rotary).", default="learned", panel=M)] = None,
    norm: Annotated[Optional[str], _opt("--norm", help="layernorm or rmsnorm.", default="layernorm", panel=M)] = None,
    activation: Annotated[Optional[str], _opt("--activation", help="Feed-forward activation: relu, relu2 (ReLU squared) or gelu.", default="relu", panel=M)] = None,
    qk_norm: Annotated[Optional[bool], _opt("--qk-norm/--no-qk-norm", help="RMS-normalize queries and keys.", default=False, panel=M)] = None,
    tie_weights: Annotated[Optional[bool], _opt("--tie-weights/--untie-weights", help="Share the token embedding with the output head.", default=True, panel=M)] = None,
    bias: Annotated[Optional[bool], _opt("--bias/--no-bias", help="Biases in linear layers and LayerNorm.", default=True, panel=M)] = None,
) -> None:
    """Train a GPT on a prepared data dir, keeping the best and the last checkpoint."""
    options = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items()
               if k not in ("preset", "resume", "force", "config")}
    from microgpt_cli.config import ModelConfig, TrainConfig, resolve
    from microgpt_cli.progress import TrainDisplay
    from microgpt_cli.train import train as run_training

    model_kwargs, train_kwargs = resolve(preset, options)
    model_config = ModelConfig(**model_kwargs)
    train_config = TrainConfig(**train_kwargs)
    with TrainDisplay() as display:

        def on_event(kind: str, info: dict) -> None:
            if kind == "start":  # the settings in force (on --resume, the saved run's)
                _show_settings(info["model_config"], info["train_config"])
            display.event(kind, info)

        summary = run_training(model_config, train_config, resume=resume, force=force, on_event=on_event)
    display.summary(summary)


def _show_settings(model_config: dict, train_config: dict) -> None:
    from microgpt_cli.config import CONFIG_FILE

    line = " ".join(f"{k}={v}" for k, v in {**model_config, **train_config}.items())
    stderr.print(f"[dim]settings (saved in {escape(str(Path(train_config['out']) / CONFIG_FILE))}): {escape(line)}[/]",
                 highlight=False, soft_wrap=True)


# --- eval ------------------------------------------------------------------------------------


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    checkpoint: CheckpointOpt = Path("out"),
    data: Annotated[
        Optional[Path], typer.Option(envvar=DATA_ENV, help="Prepared data dir whose whole validation split is scored.",
                                     show_default="data")
    ] = None,
    text: Annotated[
        Optional[Path], typer.Option(help="Score this UTF-8 text file instead, tokenized with the checkpoint's tokenizer.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: loss, perplexity, bits_per_byte, tokens, seconds.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Context windows scored at once (memory vs. speed).")] = 8,
    device: DeviceOpt = "auto",
    config: ConfigOpt = None,
) -> None:
    """Score a checkpoint on every token of the validation split (or a text file), exactly once."""
    if _stronger(ctx, data=data, text=text) == "text":
        data = None
    else:
        text = None
    data = data or Path("data")
    import json
    import time

    from rich.console import Console
    from rich.table import Table

    from microgpt_cli.evaluate import evaluate
    from microgpt_cli.progress import Task

    started = time.monotonic()
    with Task("eval", total=None, unit="tokens") as task:
        # Short evals finish silently; a plain-log line would be noise in a pipe.
        def progress(done: int, total: int) -> None:
            if task.live or time.monotonic() - started > 5:
                task.update(done, total=total)

        result = evaluate(checkpoint, data, text, batch_size, device, on_progress=progress)
    if json_output:
        typer.echo(json.dumps(result.to_dict()))
        return
    table = Table(title=escape(f"{checkpoint} on {text if text is not None else data / 'val.bin'}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("bits per byte", f"{result.bits_per_byte:.4f}")
    table.add_row("tokens", f"{result.tokens:,}")
    table.add_row("seconds", f"{result.seconds:.2f}")
    Console().print(table)


# --- generate --------------------------------------------------------------------------------


@app.command()
def generate(
    ctx: typer.Context,
    checkpoint: CheckpointOpt = Path("out"),
    prompt: Annotated[
        Optional[str], typer.Option(help="Text to continue; empty starts from a document boundary.")
    ] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from this UTF-8 file.")] = None,
    length: Annotated[int, typer.Option(help="New tokens per sample (fewer if --stop ends it).")] = 200,
    temperature: Annotated[float, typer.Option(help="Randomness: 0 is greedy, 1 samples the model as is.")] = 0.8,
    top_k: Annotated[
        int, typer.Option(help="Sample from the K likeliest tokens only (K at least the vocabulary size: off).")
    ] = 50,
    top_p: Annotated[
        float, typer.Option(help="Sample from the likeliest tokens covering probability P only (1: off).")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same text.")] = 1337,
    num_samples: Annotated[int, typer.Option(help="Samples to write, separated by a '---' line.")] = 1,
    stop: Annotated[
        Optional[str], typer.Option(help="End a sample where this text appears (the stop text is not printed).")
    ] = None,
    device: DeviceOpt = "auto",
    config: ConfigOpt = None,
) -> None:
    """Continue a prompt with a trained model, streaming the text to stdout as it is sampled."""
    if _stronger(ctx, prompt=prompt, prompt_file=prompt_file) == "prompt_file":
        prompt = None
    else:
        prompt_file = None
    if num_samples < 1:
        raise MicroGPTError(f"--num-samples must be at least 1, got {num_samples}")
    from microgpt_cli.checkpoint import resolve_path
    from microgpt_cli.evaluate import read_text
    from microgpt_cli.sampling import SamplingSettings, TextStream, decoding_model, load_model, make_generator, prompt_ids

    settings = SamplingSettings(length, temperature, top_k, top_p, stop)
    start_text = read_text(prompt_file) if prompt_file is not None else prompt or ""
    model, tokenizer = load_model(checkpoint, None, device)
    prompt_ids(tokenizer, start_text)  # a prompt the tokenizer cannot encode fails before any output
    weights = model.tok_emb.weight
    stderr.print(
        f"[dim]{escape(str(resolve_path(checkpoint)))}: {model.num_params() / 1e6:.2f}M parameters, "
        f"{tokenizer.name} tokenizer, on {weights.device}[/]", highlight=False, soft_wrap=True,
    )
    generator = make_generator(weights.device, seed)  # one stream: the whole batch of samples is reproducible
    model = decoding_model(model)
    for i in range(num_samples):
        stream = TextStream(model, tokenizer, start_text, settings, generator)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n" if i + 1 == num_samples else "\n\n---\n\n")
        sys.stdout.flush()
        rate = stream.new_tokens / stream.seconds if stream.seconds > 0 else 0.0
        stderr.print(f"[dim]{stream.new_tokens} tokens in {stream.seconds:.2f}s ({rate:.1f} tokens/s)[/]", highlight=False)


# --- info, plot, export ----------------------------------------------------------------------


@app.command()
def info(
    path: Annotated[Path, typer.Argument(
        envvar=OUT_ENV, help="A checkpoint file, a run dir (from train) or a data dir (from prepare).")] = Path("out"),
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show what a checkpoint, run dir or data dir holds: model, tokenizer, data and training."""
    import json

    from rich.console import Console
    from rich.table import Table

    from microgpt_cli.info import describe

    facts = describe(path)
    if json_output:
        typer.echo(json.dumps(facts))
        return
    table = Table(title=escape(f"{facts['kind']} {facts['path']}"), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in _info_rows(facts):
        table.add_row(label, escape(value))
    Console().print(table)


def _info_rows(facts: dict) -> list[tuple[str, str]]:
    from microgpt_cli.progress import format_seconds

    tok = facts["tokenizer"]
    if facts["kind"] == "data":
        rows = [("tokenizer", f"{tok['name']} ({tok['vocab_size']:,} tokens, stored as {facts['dtype']})")]
        rows += [(f"{split} split", f"{c['tokens']:,} tokens ({c['bytes']:,} bytes)") for split, c in facts["splits"].items()]
        rows += [("input", f"{i['path']} ({i.get('bytes', 0):,} bytes, sha256 {str(i.get('sha256'))[:12]})") for i in facts["inputs"]]
        return rows + [("prepared", facts["file"]["modified"])]
    m, t = facts["model"], facts["training"]
    shape = f"{m['n_layer']} layers x {m['n_embed']} wide, {m['n_head']} heads, context {m['context']}"
    options = f"{m['position']} positions, {m['norm']}, {m['activation']}" + (", qk-norm" if m["qk_norm"] else "")
    options += ("" if m["bias"] else ", no bias") + ("" if m["tie_weights"] else ", untied head")
    rows = [
        ("model", f"{m['params']:,} parameters ({m['params'] / 1e6:.2f}M)"),
        ("shape", shape),
        ("architecture", options),
        ("tokenizer", f"{tok['name']} ({tok['vocab_size']:,} tokens)"),
        ("trained on", f"{facts['data']['dir'] or '?'} ({len(facts['data']['inputs_sha256'])} input files)"),
    ]
    num = lambda value, fmt: "-" if value is None else format(value, fmt)  # noqa: E731
    rows += [
        ("steps", num(t["step"], ",")),
        ("epochs", num(t["epoch"], ".2f")),
        ("train loss", num(t["train_loss"], ".4f")),
        ("val loss", num(t["val_loss"], ".4f")),
        ("best val loss", num(t["best_val_loss"], ".4f")),
        ("train time", "-" if t["elapsed"] is None else format_seconds(t["elapsed"])),
    ]
    files = facts["checkpoints"] if facts["kind"] == "run" else {Path(facts["path"]).name: facts["file"]}
    for name, f in files.items():
        step = f" (step {f['step']:,})" if f.get("step") is not None else ""
        rows.append((name, f"{f['bytes'] / 1e6:,.1f} MB, written {f['modified']}{step}"))
    return rows


class XAxis(str, Enum):
    step = "step"
    tokens = "tokens"
    time = "time"


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run dirs (from train) to draw on one chart.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("runs.png"),
    x: Annotated[XAxis, typer.Option("--x", help="Horizontal axis: optimizer steps, tokens seen or seconds.")] = XAxis.step,
) -> None:
    """Draw the loss curves of one or more runs into a PNG: val loss solid, train loss faint."""
    from microgpt_cli.plot import save_runs_plot

    path = save_runs_plot(run_dirs, out, x.value)
    stderr.print(f"wrote {escape(str(path))}", highlight=False)


class ExportFormat(str, Enum):
    hf = "hf"
    safetensors = "safetensors"


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create.", show_default=False)],
    checkpoint: CheckpointOpt = Path("out"),
    format: Annotated[ExportFormat, typer.Option(
        "--format", "-f", help="hf: a transformers GPT-2 model dir (GPT2LMHeadModel.from_pretrained); "
        "safetensors: the plain weights and config.json.")] = ExportFormat.hf,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists and is not empty.")] = False,
) -> None:
    """Export a checkpoint for other tools: Hugging Face transformers GPT-2, or plain safetensors."""
    from microgpt_cli.export import export as export_model

    path = export_model(checkpoint, out, format.value, force)
    stderr.print(f"exported {escape(str(checkpoint))} as {format.value} to {escape(str(path))}", highlight=False)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user mistakes become one line on stderr and a non-zero exit, never a traceback."""
    try:
        code = app(argv, prog_name="microgpt", standalone_mode=False)
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one message for the whole job
            stderr.print(f"[bold yellow]{exc.label}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except MicroGPTError as exc:
        stderr.print(f"[bold red]{exc.label}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # bad option or value, caught by the parser
        stderr.print(f"[bold red]error:[/] {escape(exc.format_message())} (see --help)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        stderr.print("[bold red]interrupted[/]")
        sys.exit(130)
    except BrokenPipeError:  # e.g. `microgpt generate ... | head`
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)
