"""The one checkpoint format: a plain dict of tensors and primitives, written atomically and read
with `torch.load(weights_only=True)` so that loading never runs code from the file.

On disk (format version 1) every checkpoint holds `version`, `model` (weights), `model_config`,
`tokenizer` (its definition), `train_config`, `data` (what it was trained on), `metrics` (the
last measurements) and `init_from` (the checkpoint a fine-tune started from: path and sha256, or
empty); `last.pt` adds `optimizer`, `step`, `elapsed`, `best_val` and `world_size`,
everything `--resume` needs. `Checkpoint` and `TrainingState` are that layout as types: no other
module reads the keys.
"""

from __future__ import annotations

import math
import pickle
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from microgpt_cli.config import ModelConfig, TrainConfig
from microgpt_cli.data.dataset import META_FILE, data_tokenizer, read_meta
from microgpt_cli.data.tokenizer import Tokenizer, check_spec, from_spec, spec_vocab_size
from microgpt_cli.device import release_pages
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io.files import atomic_write
from microgpt_cli.model.gpt import GPT, count_params

FORMAT_VERSION = 1
RUN_FILES = ("best.pt", "last.pt")  # a run dir's checkpoints, in the order `resolve_path` prefers them
_REQUIRED = ("version", "model", "model_config", "tokenizer")
_TRAINING_KEYS = ("optimizer", "step", "elapsed", "best_val", "world_size")


@dataclass
class TrainingState:
    """What resuming needs beyond the weights (only last.pt has it)."""

    optimizers: list[dict[str, Any]]  # one state dict per optimizer, in build order
    step: int
    elapsed: float  # seconds of training so far, resumes included
    best_val: float  # the best validation loss so far (inf before the first evaluation)
    world_size: int  # processes the run last trained with


@dataclass
class Checkpoint:
    """A model with everything needed to use it (config, tokenizer) and where it came from."""

    model: dict[str, torch.Tensor]
    model_config: ModelConfig
    tokenizer: dict[str, Any]  # the tokenizer's spec (tokenizer.from_spec rebuilds it)
    train_config: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields; empty if not trained here
    data: dict[str, Any] = field(default_factory=dict)  # dataset.data_fingerprint of the training data
    metrics: dict[str, Any] = field(default_factory=dict)  # events.Metrics at the save
    init_from: dict[str, Any] = field(default_factory=dict)  # {"path", "sha256"} of the start weights, if any
    training: TrainingState | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, tokenizer: Tokenizer, train_config: TrainConfig | None = None,
           data: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
           training: TrainingState | None = None, init_from: dict[str, Any] | None = None) -> Checkpoint:
        """The checkpoint of a live model (its DDP/compile wrappers stripped, weights on the CPU)."""
        gpt = unwrap(model)
        assert isinstance(gpt, GPT)
        return cls(
            model={k: v.detach().cpu() for k, v in gpt.state_dict().items()},
            model_config=gpt.config, tokenizer=tokenizer.spec,
            train_config=asdict(train_config) if train_config is not None else {},
            data=data or {}, metrics=metrics or {}, init_from=init_from or {}, training=training,
        )

    # Facts for `info` and resuming, from the training state where there is one, else the metrics.
    @property
    def step(self) -> int | None:
        return self.training.step if self.training else self.metrics.get("step")

    @property
    def elapsed(self) -> float | None:
        return self.training.elapsed if self.training else self.metrics.get("elapsed")

    @property
    def val_loss(self) -> float | None:
        return self.metrics.get("val_loss")

    @property
    def val_tokens(self) -> int | None:
        """The validation tokens val_loss (and best_val) was measured on; see events.Metrics."""
        return self.metrics.get("val_tokens")

    @property
    def val_split_tokens(self) -> int | None:
        return self.metrics.get("val_split_tokens")

    @property
    def best_val(self) -> float | None:
        best = self.training.best_val if self.training else self.val_loss
        return None if best is None or math.isinf(best) else best

    @property
    def epoch(self) -> float | None:
        return self.metrics.get("epoch")

    @property
    def train_loss(self) -> float | None:
        return self.metrics.get("train_loss")

    @property
    def data_dir(self) -> str | None:
        return self.train_config.get("data")

    @property
    def input_hashes(self) -> list[str]:
        """sha256 of each input file the training data was prepared from."""
        return list(self.data.get("inputs", []))

    @property
    def num_params(self) -> int:
        """Parameters of the model (a tied head shares the embedding's)."""
        count = sum(t.numel() for t in self.model.values())
        if self.model_config.tie_weights and "head.weight" in self.model:
            count -= self.model["head.weight"].numel()  # one tensor stored under two names
        return count

    @property
    def train_settings(self) -> TrainConfig:
        return TrainConfig(**self.train_config)

    def tokenizer_object(self) -> Tokenizer:
        tokenizer = from_spec(self.tokenizer)
        self.check_vocab(tokenizer.vocab_size)
        return tokenizer

    def check_vocab(self, tokens: int | None) -> None:
        """Refuse a tokenizer with more ids than the model has rows: such ids would index past the
        embedding at the first prompt that holds one (every reader of the checkpoint checks here)."""
        if tokens is not None and tokens > self.model_config.vocab_size:
            raise MicroGPTError(f"its tokenizer has {tokens:,} tokens but its model only "
                                f"{self.model_config.vocab_size:,} (vocab_size): they do not belong together")

    def check_weights(self) -> None:
        """Refuse a config that does not make the stored weights' count, before building its model
        (the config of a damaged or hostile file may claim a huge one), and weights no trained
        model has: integer tensors, NaN or infinity (a model made of them samples garbage)."""
        expected = count_params(self.model_config)
        if expected != self.num_params:
            raise MicroGPTError(f"checkpoint weights do not match its model config: the config makes "
                                f"{expected:,} parameters, the weights hold {self.num_params:,}")
        check_tensors(self.model, "the checkpoint")

    def build_model(self) -> GPT:
        """The model rebuilt from the stored config, never from CLI flags. It holds the tensors of
        `model` themselves (no copy): whoever converts it in place drops this checkpoint first."""
        self.check_weights()
        try:
            model = GPT.from_weights(self.model_config, self.model)
        except (TypeError, RuntimeError) as exc:
            raise MicroGPTError(f"checkpoint weights do not match its model config: {exc}".splitlines()[0]) from exc
        return model

    def to_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": FORMAT_VERSION, "model": self.model, "model_config": asdict(self.model_config),
            "tokenizer": self.tokenizer, "train_config": self.train_config, "data": self.data, "metrics": self.metrics,
            "init_from": self.init_from,
        }
        if self.training is not None:
            t = self.training
            state.update(optimizer=t.optimizers, step=t.step, elapsed=t.elapsed, best_val=t.best_val,
                         world_size=t.world_size)
        return state

    @classmethod
    def from_dict(cls, state: object, path: Path) -> Checkpoint:
        """The checkpoint in a loaded file's dict, every field checked for its type: a damaged or
        foreign file is one clear error here, never a crash in whatever reads it later."""
        if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
            raise MicroGPTError(f"{path} is not a microgpt checkpoint (missing model, config or tokenizer)")
        version = state["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
            shown = version if isinstance(version, int) else type(version).__name__
            raise MicroGPTError(f"{path} has checkpoint format version {shown}; this microgpt reads version "
                                f"{FORMAT_VERSION}")
        try:
            for key in ("model_config", "tokenizer", "train_config", "data", "metrics", "init_from"):
                _check_plain(state.get(key, {}), key, dict)
            metrics = state.get("metrics", {}).values()
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics):
                raise ValueError("metrics must be numbers")
            init_from = state.get("init_from", {})
            all_strings = all(isinstance(v, str) for v in init_from.values())
            if init_from and (set(init_from) != {"path", "sha256"} or not all_strings):
                raise ValueError("init_from must hold the path and sha256 of a checkpoint")
            inputs = state.get("data", {}).get("inputs", [])
            if not isinstance(inputs, list) or not all(isinstance(i, (str, type(None))) for i in inputs):
                raise ValueError("data inputs must be a list of sha256 strings")
            if not isinstance(state["model"], dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
                raise ValueError("its weights are not all named tensors")
            model_config = ModelConfig(**state["model_config"])
            training = None
            if "optimizer" in state:
                training = TrainingState(list(state["optimizer"]), _number(state["step"], int),
                                         _number(state["elapsed"], float), _number(state["best_val"], float),
                                         _number(state["world_size"], int))
            checkpoint = cls(dict(state["model"]), model_config, dict(state["tokenizer"]),
                             dict(state.get("train_config", {})), dict(state.get("data", {})),
                             dict(state.get("metrics", {})), dict(state.get("init_from", {})), training)
            check_spec(checkpoint.tokenizer)
            checkpoint.check_vocab(spec_vocab_size(checkpoint.tokenizer))
            if checkpoint.train_config:
                TrainConfig(**checkpoint.train_config)
        except (TypeError, ValueError, KeyError, MicroGPTError) as exc:
            # The stored settings' field names (n_layer), not flags: the file is wrong, not the command.
            raise MicroGPTError(f"{path} is not a valid microgpt checkpoint: {exc}".splitlines()[0][:400]) from None
        return checkpoint


def check_tensors(weights: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights that are not floating point, or hold NaN or infinity, naming the first.
    Tensors just memory-mapped from a file (never written) are read and then let go (see
    release_pages), so that a check does not keep the whole file in memory."""
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            raise MicroGPTError(f"{source} holds {name} as {str(tensor.dtype).removeprefix('torch.')}; model weights "
                                f"must be floating point (fp32, fp16 or bf16)")
        if tensor.numel() and not _finite(tensor.detach()):
            raise MicroGPTError(f"{source} holds NaN or infinite values in {name}: these weights cannot be used")
        release_pages(tensor)


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, from the extremes (NaN propagates to both): isfinite() would
    make a temporary of the tensor's size. Types without aminmax (float8) take isfinite()."""
    try:
        return all(math.isfinite(float(x)) for x in torch.aminmax(tensor))
    except (RuntimeError, NotImplementedError):
        return bool(torch.isfinite(tensor).all())


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: object, name: str, kind: type = object) -> None:
    """Refuse anything but JSON-like values (strings, numbers, lists, dicts) where settings belong."""
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{name} has a key that is not a string")
            _check_plain(item, f"{name}.{key}")
    elif isinstance(value, list):
        for item in value:
            _check_plain(item, name)
    elif not isinstance(value, _PLAIN):
        raise ValueError(f"{name} holds a {type(value).__name__}, not a plain value")


def _number(value: object, kind: type[int] | type[float]) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"its training state holds {type(value).__name__} where a number belongs")
    return kind(value)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT inside DDP and torch.compile wrappers, so saved keys never carry prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save(path: str | Path, checkpoint: Checkpoint) -> None:
    atomic_write(Path(path), lambda f: torch.save(checkpoint.to_dict(), f))


def resolve_path(path: str | Path) -> Path:
    """A checkpoint file, or a run dir whose best.pt (else last.pt) is meant."""
    path = Path(path)
    if path.is_dir():
        for name in RUN_FILES:
            if (path / name).is_file():
                return path / name
        if (path / META_FILE).is_file():
            raise MicroGPTError(f"{path} is a data dir (from `microgpt prepare`), not a training run; pass a run dir "
                                f"or a .pt file from `microgpt train`")
        raise MicroGPTError(f"no checkpoint in {path} (expected best.pt or last.pt); train one with `microgpt train`")
    if not path.exists():
        raise MicroGPTError(f"checkpoint {path} does not exist; train one with `microgpt train` or pass --checkpoint")
    return path


def _check_integrity(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record; torch.load does not check them,
    so a file with flipped bytes would load and give a broken model. Check every record first."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        # NotImplementedError and RuntimeError: damaged header fields that claim a zip version,
        # compression or encryption zipfile does not do.
        raise MicroGPTError(f"{path} is not a readable checkpoint (truncated or corrupted?): {exc}") from None
    if bad is not None:
        raise MicroGPTError(f"{path} is corrupted: record {bad} fails its checksum; use another checkpoint "
                            f"(a run dir keeps best.pt and last.pt)")


def load(path: str | Path, map_location: str | torch.device = "cpu", mapped: bool = False) -> Checkpoint:
    """Read and check a checkpoint; a truncated, corrupted, foreign or malicious file is a clear error.

    `mapped`, for inference: the tensors are memory-mapped from the file (privately: nothing is
    ever written back) instead of read into memory, so that an engine that copies and converts
    the weights layer by layer, letting each one's pages go, never holds the model twice.
    Checkpoints are replaced by renaming a new file over them, never rewritten, so a mapping
    stays valid while a training run saves."""
    path = resolve_path(path)
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise MicroGPTError(f"{path} is not a microgpt checkpoint (not a torch.save file, or truncated)")
    _check_integrity(path)
    return Checkpoint.from_dict(load_weights_only(path, map_location, "microgpt checkpoint", mapped), path)


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a microgpt checkpoint, read cheaply (tensors memory-mapped, not loaded,
    nor checksummed): what a --force may replace."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # anything torch.load cannot read is not ours, whatever it is
        return False
    return isinstance(state, dict) and all(key in state for key in _REQUIRED)


def load_weights_only(path: Path, map_location: str | torch.device = "cpu", what: str = "checkpoint",
                      mapped: bool = False) -> Any:
    """torch.load(weights_only=True) of a file nobody vouches for: whatever is wrong with it is one
    MicroGPTError naming `what` it should have been. `mapped`: tensors memory-mapped (see load)."""
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mapped)
    except pickle.UnpicklingError:
        raise MicroGPTError(f"{path} is not a safe {what}: it asks to run code or load objects that weights_only "
                            "loading refuses") from None
    except Exception as exc:  # the restricted unpickler parses untrusted bytes, and junk that passes the
        # zip checksums fails inside it in many ways (struct.error, KeyError, IndexError, ...)
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise MicroGPTError(f"{path} is not a readable {what} (truncated or corrupted?): "
                            f"{type(exc).__name__}{': ' if detail else ''}{detail}") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    mapped: bool = False) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode, on `device`) and tokenizer of a checkpoint file or run dir;
    `mapped`: its weights memory-mapped from the file (see load), for inference."""
    checkpoint = load(path, mapped=mapped)
    model = checkpoint.build_model().to(device).eval()
    return model, checkpoint.tokenizer_object()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint file, a run dir or a data dir (e.g. to prepare new data for
    a model whose char or bpe vocabulary was learned from its own text)."""
    path = Path(path)
    if path.is_dir() and (path / META_FILE).is_file():
        return data_tokenizer(read_meta(path))
    return load(path).tokenizer_object()
