"""Every hyperparameter lives in one of these dataclasses, with its default, help text and choices:
the CLI builds its options from them, and presets, TOML files and checkpoints serialize them."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from microgpt_cli import __version__
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io.files import atomic_write

Position = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["relu", "relu2", "gelu"]
OptimizerName = Literal["adamw", "muon"]
Quantize = Literal["none", "int8"]  # weights for inference on CPU: fp32 as trained, or int8
DEVICE_PATTERN = re.compile(r"(auto|cpu|mps|cuda(:\d{1,3})?)")
# torch's CPU generator (mt19937) keeps the low 32 bits of a seed: larger seeds would silently give
# the same weights and text as smaller ones, so they are refused.
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024  # far above any CPU; OpenMP crashes when asked for ~100,000
# Upper bounds far past any real use, which keep every setting inside what torch, numpy and the
# schedule can represent: an lr of 1e308 overflows float32, n_layer 4e18 would build blocks forever.
MODEL_LIMITS = {"vocab_size": 2**32, "n_layer": 1024, "n_head": 1024, "n_embed": 65_536, "context": 2**20,
                "pad_vocab": 65_536}
TRAIN_LIMITS = {
    "epochs": 1e12, "max_steps": 10**15, "time_budget": 1e9, "batch_size": 2**20, "grad_accum": 2**20, "lr": 1e30,
    "muon_lr": 1e30, "weight_decay": 1e3, "grad_clip": 1e30, "warmup_steps": 10**15, "eval_interval": 10**15,
    "eval_tokens": 2**62, "log_interval": 10**15, "seed": MAX_SEED, "threads": MAX_THREADS,
}


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(threads: int | None) -> int | None:
    """A `--threads` value as the library takes it: None (or 0) for the default, else 1 to MAX_THREADS."""
    if threads is not None and not 0 <= threads <= MAX_THREADS:
        raise MicroGPTError(f"--threads must be between 0 and {MAX_THREADS}, got {threads}")
    return threads or None


class InvalidSetting(MicroGPTError):
    """A setting out of range. The message names dataclass fields (`n_embed`); `fields` lists
    them so that the CLI can show the matching flags (`--n-embed`) instead."""

    def __init__(self, message: str, *names: str):
        super().__init__(message)
        self.names = names

    def with_flags(self) -> str:
        """The message with every field name written as its command-line flag."""
        if not self.names:
            return str(self)
        pattern = r"\b(" + "|".join(map(re.escape, self.names)) + r")\b"
        return re.sub(pattern, lambda m: flag_name(m.group(1)), str(self))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting(default: Any, help: str, *flags: str, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field that is also a command-line option: its default and help are the CLI's,
    `flags` (if given) its option names. `aliases` are other names it accepts without showing them
    in --help: older names of the option, and the names nanoGPT and litgpt users type."""
    return field(default=default, metadata={"help": help, "flags": flags, "aliases": aliases})


def _require(ok: bool, message: str, *names: str) -> None:
    if not ok:
        raise InvalidSetting(message, *names)


def _validate(obj: object) -> None:
    """Checks every dataclass gets from its types: Literal choices, finite numbers, ints that
    are not bools."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):  # type: ignore[arg-type]
        value, hint = getattr(obj, f.name), hints[f.name]
        if type(None) in get_args(hint):  # X | None
            others = [arg for arg in get_args(hint) if arg is not type(None)]
            if value is None or len(others) > 1:  # several types: the class checks those itself
                continue
            hint = others[0]
        if get_origin(hint) is Literal:
            choices = get_args(hint)
            _require(isinstance(value, str) and value in choices,
                     f"{f.name} must be one of {', '.join(choices)}, got {_shown(value)}", f.name)
        elif hint is float:
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                     f"{f.name} must be a finite number, got {_shown(value)}", f.name)
        elif hint is int:
            _require(isinstance(value, int) and not isinstance(value, bool),
                     f"{f.name} must be an integer, got {_shown(value)}", f.name)
        elif hint is bool:
            _require(isinstance(value, bool), f"{f.name} must be true or false, got {_shown(value)}", f.name)
        elif hint is str:
            _require(isinstance(value, str), f"{f.name} must be a string, got {_shown(value)}", f.name)


def is_text(value: str) -> bool:
    """Whether a string is valid Unicode: command-line arguments that are not UTF-8 reach Python as
    lone surrogates, which no encoder (tokenizers, stdout) accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _positive(obj: object, *names: str) -> None:
    for name in names:
        _require(getattr(obj, name) > 0, f"{name} must be positive, got {getattr(obj, name)}", name)


def _not_negative(obj: object, *names: str) -> None:
    for name in names:
        _require(getattr(obj, name) >= 0, f"{name} must not be negative, got {getattr(obj, name)}", name)


def _at_most(obj: object, limits: Mapping[str, float]) -> None:
    for name, limit in limits.items():
        value = getattr(obj, name)
        _require(value <= limit, f"{name} must be at most {limit:,}, got {value:,}", name)


def seed_message(seed: int) -> str:
    return f"seed must be between 0 and {MAX_SEED:,} (torch's CPU generator keeps 32 bits), got {seed:,}"


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """One stop string or several as a tuple, each checked: not empty, valid text. The CLI's
    repeated --stop, the Python API and the server's `stop` all go through here."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for item in stops:
        if not isinstance(item, str):
            raise InvalidSetting(f"stop must be text or a list of texts, got {_shown(item)}", "stop")
        if not item:
            raise InvalidSetting("stop must not be empty", "stop")
        if not is_text(item):
            raise InvalidSetting("stop is not valid text (it holds bytes that are not UTF-8)", "stop")
    return stops


def _shown(value: object) -> str:
    """A value for a one-line message: its repr, or its type where the repr is long or multi-line."""
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else f"a {type(value).__name__}"


@dataclass
class ModelConfig:
    """The GPT architecture. Defaults are the product's specified model; the options after
    `dropout` change it and are off by default."""

    vocab_size: int = setting(50257, "Vocabulary size (set from the data dir).")
    n_layer: int = setting(6, "Transformer blocks.")
    n_head: int = setting(8, "Attention heads per block.", aliases=("--n-ma",))
    n_embed: int = setting(512, "Embedding width.", aliases=("--n-embd",))
    context: int = setting(512, "Context length in tokens.", aliases=("--text-size", "--block-size"))
    dropout: float = setting(0.1, "Dropout probability.")
    position: Position = setting("learned", "Positions: learned or rope (rotary).")
    norm: Norm = setting("layernorm", "Normalization: layernorm or rmsnorm.")
    activation: Activation = setting("relu", "Feed-forward activation: relu, relu2 (ReLU squared) or gelu.")
    qk_norm: bool = setting(False, "RMS-normalize queries and keys.", "--qk-norm/--no-qk-norm")
    tie_weights: bool = setting(True, "Share the token embedding with the output head.",
                                "--tie-weights/--untie-weights")
    bias: bool = setting(True, "Biases in linear layers and LayerNorm.", "--bias/--no-bias")
    pad_vocab: int = setting(1, "Round the embedding and head up to a multiple of this many rows: GPU matmuls run "
                                "faster on such sizes; the padded rows never get probability (1: no padding).")

    def __post_init__(self) -> None:
        _validate(self)
        _positive(self, "vocab_size", "n_layer", "n_head", "n_embed", "context", "pad_vocab")
        _at_most(self, MODEL_LIMITS)
        _require(self.n_embed % self.n_head == 0,
                 f"n_embed ({self.n_embed}) must be divisible by n_head ({self.n_head})", "n_embed", "n_head")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}", "dropout")
        if self.position == "rope":
            _require(self.head_size % 2 == 0, "position rope needs an even head size (n_embed / n_head)",
                     "position", "n_embed", "n_head")

    @property
    def head_size(self) -> int:
        return self.n_embed // self.n_head

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and head: vocab_size rounded up to a multiple of pad_vocab."""
        return -(-self.vocab_size // self.pad_vocab) * self.pad_vocab


@dataclass
class TrainConfig:
    """How to train: data, schedule, optimizer, evaluation cadence and where to write."""

    data: str = setting("data", "Prepared data dir.")
    out: str = setting("out", "Run dir for best.pt, last.pt, metrics.jsonl, config.toml.")
    init_from: str = setting(
        "", "Start from the weights of this checkpoint (a `microgpt import`, or a run's best.pt or last.pt) instead "
            "of random ones; its shape and tokenizer are kept, the optimizer and LR schedule start fresh.",
        "--init-from")
    epochs: float = setting(390, "Full passes over the training split.")
    max_steps: int = setting(0, "Stop after this many optimizer steps (0: no cap).")
    time_budget: float = setting(0, "Stop after this many seconds, the final evaluation and save included; "
                                      "warmup and LR decay follow it (0: no cap).")
    batch_size: int = setting(8, "Sequences per micro-batch.", aliases=("--batches",))
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    lr: float = setting(3e-3, "Peak learning rate.")
    min_lr_ratio: float = setting(0.1, "Final LR as a fraction of the peak.")
    warmup_steps: int = setting(100, "Linear warmup steps (under --time-budget, at most a tenth of it).")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices.")
    beta1: float = setting(0.9, "AdamW first-moment decay.")
    beta2: float = setting(0.95, "AdamW second-moment decay.")
    grad_clip: float = setting(1.0, "Clip the gradient norm (0: off).")
    optimizer: OptimizerName = setting("adamw", "adamw, or muon for the blocks' matrices (AdamW for the rest).")
    muon_lr: float = setting(0.02, "Learning rate of the Muon matrices.")
    eval_interval: int = setting(250, "Evaluate and save every N steps.")
    eval_tokens: int = setting(0, "Validation tokens per evaluation (0: the whole split, or what fits a tenth "
                                  "of --time-budget).")
    log_interval: int = setting(10, "Log the train loss every N steps.")
    seed: int = setting(1337, "Seed for init, dropout and data order.")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps.")
    compile: bool = setting(False, "Compile the model with torch.compile.", "--compile/--no-compile")
    threads: int = setting(0, "CPU threads for torch (0: torch's default).")

    def __post_init__(self) -> None:
        _validate(self)
        _positive(self, "epochs", "batch_size", "grad_accum", "eval_interval", "log_interval", "lr", "muon_lr")
        _not_negative(self, "max_steps", "time_budget", "warmup_steps", "eval_tokens", "weight_decay", "grad_clip")
        _require(0 <= self.seed <= MAX_SEED, seed_message(self.seed), "seed")
        _require(0 <= self.threads <= MAX_THREADS, f"threads must be between 0 and {MAX_THREADS}, got {self.threads}",
                 "threads")
        _at_most(self, TRAIN_LIMITS)
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
                 "min_lr_ratio")
        _require(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "beta1 and beta2 must be in [0, 1)",
                 "beta1", "beta2")
        _require(DEVICE_PATTERN.fullmatch(self.device) is not None,
                 f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}", "device")


EVAL_BATCH_SIZE = 8  # context windows scored at once by `microgpt eval`
MAX_LENGTH = 10**9  # tokens per sample: far beyond any use, well inside every integer type involved
MAX_PENALTY = 2.0  # frequency_penalty and presence_penalty lie in [-2, 2], as in OpenAI's API


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick tokens and when to stop; checked here once for the CLI and the Python API,
    whose defaults and help come from these fields."""

    length: int = setting(200, "New tokens per sample (fewer if --stop ends it).", aliases=("--max-new-tokens",))
    temperature: float = setting(0.8, "Randomness: 0 is greedy, 1 samples the model as is.")
    top_k: int | None = setting(50, "Sample from the K likeliest tokens only (K at least the vocabulary size: off).")
    top_p: float = setting(1.0, "Sample from the likeliest tokens covering probability P only (1: off).")
    # One string or several (a tuple once checked); the earliest match ends a sample.
    stop: str | Sequence[str] | None = setting(
        None, "End a sample where this text appears (the stop text is not printed); repeat it for several.")
    seed: int | None = setting(1337, "Random seed: the same seed gives the same text.")
    frequency_penalty: float = setting(0.0, "Lower a token's logit by this much for each time the sample already holds "
                                            "it (-2 to 2; negative favours repeats).")
    presence_penalty: float = setting(0.0, "Lower a token's logit by this much once the sample holds it at all "
                                           "(-2 to 2).")

    def __post_init__(self) -> None:
        _validate(self)
        if not 0 <= self.length <= MAX_LENGTH:
            raise InvalidSetting(f"length must be between 0 and {MAX_LENGTH:,}, got {self.length}", "length")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # also refuses NaN
            raise InvalidSetting(f"temperature must be 0 (greedy) or positive, got {self.temperature}", "temperature")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidSetting(f"top_k must be at least 1, got {self.top_k}", "top_k")
        if not 0 < self.top_p <= 1:
            raise InvalidSetting(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.stop is not None:
            object.__setattr__(self, "stop", stop_strings(self.stop) or None)  # frozen: set once, here
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidSetting(seed_message(self.seed), "seed")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise InvalidSetting(f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got "
                                     f"{getattr(self, name)}", name)


FINETUNE_LR = 3e-4
SFT_LR = 3e-4
# Named hyperparameter sets for `--preset`; flags given on the command line override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The best recipe found for 2 CPU cores and a ~1 MB character-level corpus (see README).
    # Measured at 120 s: Muon beat AdamW by ~0.12 in val loss per step; batch 24 beat 12 and 48;
    # context 64 beat 128 and width 128 beat 192 within that budget.
    "cpu": dict(
        n_layer=4, n_head=4, n_embed=128, context=64, dropout=0.0, batch_size=24,
        position="rope", norm="rmsnorm", activation="relu2", qk_norm=True, tie_weights=False,
        bias=False, lr=3e-3, warmup_steps=50, optimizer="muon", muon_lr=0.04, eval_interval=1000,
    ),
    # Fine-tuning a pretrained model (train --init-from): a peak LR below the pretraining one (half
    # GPT-2's) after a short warmup, a few hundred steps, and an evaluation every 50 so that best.pt
    # catches the point before the small corpus is overfitted. The model's shape comes from the
    # checkpoint. In benchmarks/finetune.py (see README) 1e-4 learned the new text too slowly (worse
    # than random weights in 300 steps) and 9e-4 forgot most of the pretraining; 3e-4 sits between.
    "finetune": dict(
        lr=FINETUNE_LR, warmup_steps=20, max_steps=300, eval_interval=50, eval_tokens=16_384, log_interval=10,
        min_lr_ratio=0.1, optimizer="adamw",
    ),
    # Supervised fine-tuning on conversations (`prepare --chat` data, train --init-from): a few epochs of
    # the masked loss, Muon for the blocks' matrices (in benchmarks/sft.py it learned the task in a
    # fraction of AdamW's steps) and AdamW at a fine-tuning LR for the rest, evaluating often so that
    # best.pt catches the point before the conversations are overfitted; the vocabulary padded to a
    # multiple of 64 rows, so that the chat template's tokens fit in GPT-2's 50,304 rows.
    "sft": dict(
        optimizer="muon", muon_lr=0.02, lr=SFT_LR, warmup_steps=20, epochs=3, eval_interval=50,
        eval_tokens=16_384, log_interval=10, min_lr_ratio=0.1, pad_vocab=64,
    ),
    # GPT-2 small (124M): 12 layers, 12 heads, 768 wide, context 1024, 128 sequences per step. The
    # vocabulary is padded to 50,304 rows (a multiple of 128) and micro-batches are 32 sequences:
    # both only change the speed on a GPU, not the loss per step.
    "gpt2": dict(
        n_layer=12, n_head=12, n_embed=768, context=1024, dropout=0.0, batch_size=32, grad_accum=4,
        activation="gelu", pad_vocab=128, lr=6e-4, warmup_steps=700, compile=True,
    ),
}

PresetName = Literal["cpu", "finetune", "sft", "gpt2"]
assert set(get_args(PresetName)) == set(PRESETS), "PresetName lists the presets"
PRESET_USES = {  # what each preset is for, as `train --help` says it
    "cpu": "for 2 CPU cores and ~1 MB of text", "finetune": "for --init-from",
    "sft": "for --init-from on conversations (prepare --chat)", "gpt2": "GPT-2 small, for a GPU",
}


def preset_help() -> str:
    return "; ".join(f"{name}: {PRESET_USES[name]}" if name in PRESET_USES else name for name in PRESETS)


MODEL_FIELDS = frozenset(f.name for f in fields(ModelConfig))
TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))
assert all(set(p) <= MODEL_FIELDS | TRAIN_FIELDS for p in PRESETS.values()), "a preset names an unknown setting"

# What a resumed run cannot change: the model's shape (its weights would not fit), and what decides
# the data order and the optimizer state. Everything else may change on --resume.
FIXED_ON_RESUME = ((MODEL_FIELDS - {"vocab_size", "dropout"})
                   | {"batch_size", "grad_accum", "seed", "optimizer", "init_from"})
# What a run started from a checkpoint (--init-from) may set: the rest of the shape is the checkpoint's.
SETTABLE_ON_INIT = {"vocab_size", "dropout", "context", "pad_vocab"}


def setting_fields(cls: type) -> dict[str, Field[Any]]:
    """The fields of a config dataclass by name, for the CLI and the TOML reader."""
    return {f.name: f for f in fields(cls)}


def default_of(cls: type, name: str) -> Any:
    default = setting_fields(cls)[name].default
    assert default is not MISSING
    return default


def resolve(preset: str | None, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a preset with explicitly given options (those not None) into model and train kwargs.
    The CLI passes --config file values among the options (as defaults of its flags), which is
    how a file beats a preset and loses to a flag. A run with init_from takes its model's shape
    from that checkpoint, so a preset's shape (all but its dropout and vocabulary padding) gives
    way there."""
    if preset is not None and preset not in PRESETS:
        raise InvalidSetting(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", "preset")
    merged = dict(PRESETS[preset]) if preset else {}
    if overrides.get("init_from"):
        merged = {k: v for k, v in merged.items() if k not in MODEL_FIELDS - {"dropout", "pad_vocab"}}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(merged) - MODEL_FIELDS - TRAIN_FIELDS
    assert not unknown, f"options with no config field: {unknown}"
    model_kwargs = {k: v for k, v in merged.items() if k in MODEL_FIELDS}
    train_kwargs = {k: v for k, v in merged.items() if k in TRAIN_FIELDS}
    return model_kwargs, train_kwargs


Change = tuple[Any, Any]


def resume_settings(saved_model: ModelConfig, saved_train: TrainConfig, model: ModelConfig, train: TrainConfig,
                    given: set[str]) -> tuple[ModelConfig, TrainConfig, dict[str, Change]]:
    """The settings of a resumed run: the saved ones, with the `given` settings of this call applied.
    Returns them and what changed ({name: (old, new)}); changing a FIXED_ON_RESUME setting is an error
    naming it. `out` and `data` come from this call (the data was checked to be the same)."""
    new = {**asdict(model), **asdict(train)}
    old = {**asdict(saved_model), **asdict(saved_train)}
    changed = {name: (old[name], new[name]) for name in sorted(given | {"data", "out"}) if old[name] != new[name]}
    fixed = sorted(set(changed) & FIXED_ON_RESUME)
    if fixed:
        listing = ", ".join(f"{name} (the run has {old[name]!r})" for name in fixed)
        raise InvalidSetting(f"cannot change {listing} on resume: the saved weights, optimizer and data order depend "
                             f"on them; start a new run with force or another out", *fixed, "force", "out")
    model_changes = {k: v[1] for k, v in changed.items() if k in MODEL_FIELDS}
    train_changes = {k: v[1] for k, v in changed.items() if k in TRAIN_FIELDS}
    changed.pop("out", None)
    return replace(saved_model, **model_changes), replace(saved_train, **train_changes), changed


def init_settings(saved: ModelConfig, model: ModelConfig, given: set[str]) -> ModelConfig:
    """The model settings of a run that starts from a checkpoint whose settings are `saved`: its
    shape, with the `given` dropout and a shorter context applied. A given shape setting that
    differs from the checkpoint's is an error naming it; so is a longer context, which learned
    positions (and a model trained on shorter sequences) do not cover."""
    clashes = sorted(name for name in given & MODEL_FIELDS - SETTABLE_ON_INIT
                     if getattr(model, name) != getattr(saved, name))
    if clashes:
        listing = ", ".join(f"{name} {getattr(model, name)!r} (the checkpoint has {getattr(saved, name)!r})"
                            for name in clashes)
        raise InvalidSetting(f"{listing}: a run started from init_from takes the model's shape from it; drop these "
                             f"settings", *clashes, "init_from")
    context = model.context if "context" in given else saved.context
    _require(context <= saved.context, f"context {context} is longer than init_from's {saved.context}; it may be "
             f"shortened, never lengthened", "context", "init_from")
    dropout = model.dropout if "dropout" in given else saved.dropout
    pad_vocab = model.pad_vocab if "pad_vocab" in given else saved.pad_vocab
    return replace(saved, context=context, dropout=dropout, pad_vocab=pad_vocab)


# --- TOML config files -----------------------------------------------------------------------

CONFIG_FILE = "config.toml"
TomlValue = str | int | float | bool


def read_toml(path: str | Path) -> dict[str, TomlValue]:
    """The flat `key = value` table of a --config file; nested tables and arrays are refused
    because every option is a single value."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MicroGPTError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MicroGPTError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MicroGPTError(f"config file {path} is not valid TOML: {exc}") from exc
    for key, value in table.items():
        if not isinstance(value, (str, int, float, bool)):
            raise MicroGPTError(
                f"config file {path}: {key} must be a single string, number or boolean, got {type(value).__name__}")
    return table


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's float repr (1e-05, inf, nan) is valid TOML too
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def to_toml(values: dict[str, TomlValue], header: str = "") -> str:
    """A flat table as TOML text, `header` lines first as comments."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def config_values(model_config: ModelConfig, train_config: TrainConfig) -> dict[str, TomlValue]:
    """Model and training settings as one flat table whose keys are `microgpt train` options, so
    the saved file works as `--config`. vocab_size is left out: the data dir decides it."""
    values = {k: v for k, v in asdict(model_config).items() if k != "vocab_size"}
    return {**values, **asdict(train_config)}


def save_config(out_dir: str | Path, model_config: ModelConfig, train_config: TrainConfig) -> Path:
    """Write the resolved settings of a run to OUT/config.toml (atomically); returns its path.
    `microgpt train --config OUT/config.toml --out NEW` repeats the run."""
    path = Path(out_dir) / CONFIG_FILE
    header = (f"microgpt {__version__} training settings; reuse with `microgpt train --config {path}`.\n"
              f"vocab_size = {model_config.vocab_size} comes from the data dir.")
    text = to_toml(config_values(model_config, train_config), header)
    # Not fsynced: a run writes it as it takes its dir over, right before its final evaluation when
    # a --time-budget ends it, and an fsync there waited 4 s behind another process's writes.
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), durable=False)
    return path
