"""Every hyperparameter lives in one of these dataclasses: the CLI, presets and checkpoints share them."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from microgpt_cli import __version__
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.files import atomic_write

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "relu2", "gelu")
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" is accepted too


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise MicroGPTError(message)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"--{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class ModelConfig:
    """The GPT architecture. Defaults are the product's specified model; the options after
    `dropout` change it and are off by default."""

    vocab_size: int = 50257
    n_layer: int = 6
    n_head: int = 8
    n_embed: int = 512
    context: int = 512
    dropout: float = 0.1
    position: str = "learned"
    norm: str = "layernorm"
    activation: str = "relu"
    qk_norm: bool = False
    tie_weights: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embed", "context"):
            _require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        _require(
            self.n_embed % self.n_head == 0,
            f"--n-embed ({self.n_embed}) must be divisible by --n-head ({self.n_head})",
        )
        _require(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        _choice("position", self.position, POSITIONS)
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        if self.position == "rope":
            _require((self.n_embed // self.n_head) % 2 == 0, "--position rope needs an even head size")

    @property
    def head_size(self) -> int:
        return self.n_embed // self.n_head


@dataclass
class TrainConfig:
    """How to train: data, schedule, optimizer, evaluation cadence and where to write."""

    data: str = "data"
    out: str = "out"
    epochs: float = 390
    max_steps: int = 0
    time_budget: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    eval_interval: int = 250
    eval_tokens: int = 0
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "eval_interval", "log_interval"):
            _require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "time_budget", "warmup_steps", "eval_tokens", "threads", "weight_decay", "grad_clip"):
            _require(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        _require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _require(self.muon_lr > 0, f"--muon-lr must be positive, got {self.muon_lr}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "--beta1 and --beta2 must be in [0, 1)")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _require(self.device.split(":")[0] in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")


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
    # GPT-2 small (124M): 12 layers, 12 heads, 768 wide, context 1024.
    "gpt2": dict(
        n_layer=12, n_head=12, n_embed=768, context=1024, dropout=0.0, batch_size=16,
        activation="gelu", lr=6e-4, warmup_steps=700, grad_accum=8, compile=True,
    ),
}

MODEL_FIELDS = frozenset(f.name for f in fields(ModelConfig))
TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))


def resolve(preset: str | None, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a preset with explicitly given options (those not None) into model and train kwargs.
    The CLI passes --config file values among the options (as defaults of its flags), which is
    how a file beats a preset and loses to a flag."""
    if preset is not None:
        _require(preset in PRESETS, f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    merged = dict(PRESETS.get(preset, {})) if preset else {}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(merged) - MODEL_FIELDS - TRAIN_FIELDS
    assert not unknown, f"options with no config field: {unknown}"
    model_kwargs = {k: v for k, v in merged.items() if k in MODEL_FIELDS}
    train_kwargs = {k: v for k, v in merged.items() if k in TRAIN_FIELDS}
    return model_kwargs, train_kwargs


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
        _require(isinstance(value, (str, int, float, bool)),
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
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path
