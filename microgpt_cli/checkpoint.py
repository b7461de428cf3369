"""The one checkpoint format: a plain dict of tensors and primitives, written atomically and read
with `torch.load(weights_only=True)` so that loading never runs code from the file.

Every checkpoint holds `version`, `model` (weights), `model_config`, `tokenizer` (its definition),
`train_config`, `data` (what it was trained on) and `metrics`; `last.pt` adds `optimizer`,
`rng` and `step`, everything needed to resume.
"""

from __future__ import annotations

from dataclasses import asdict
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from microgpt_cli.config import ModelConfig
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.files import atomic_write
from microgpt_cli.model import GPT
from microgpt_cli.tokenizer import Tokenizer, from_spec

FORMAT_VERSION = 1
REQUIRED_KEYS = ("version", "model", "model_config", "tokenizer")


def save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda f: torch.save({"version": FORMAT_VERSION, **state}, f))


def model_state(
    model: torch.nn.Module, tokenizer: Tokenizer, train_config: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The part every checkpoint shares: weights, model config and tokenizer, plus provenance."""
    gpt = unwrap(model)
    return {
        "model": {k: v.detach().cpu() for k, v in gpt.state_dict().items()},
        "model_config": asdict(gpt.config),
        "tokenizer": tokenizer.spec,
        "train_config": train_config or {},
        "data": data or {},
        "metrics": metrics or {},
    }


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT inside DDP and torch.compile wrappers, so saved keys never carry prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def resolve_path(path: str | Path) -> Path:
    """A checkpoint file, or a run dir whose best.pt (else last.pt) is meant."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise MicroGPTError(f"no checkpoint in {path} (expected best.pt or last.pt); train one with `microgpt train`")
    if not path.exists():
        raise MicroGPTError(f"checkpoint {path} does not exist; train one with `microgpt train` or pass --checkpoint")
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; a truncated, foreign or malicious file is a clear error."""
    path = resolve_path(path)
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise MicroGPTError(f"{path} is not a microgpt checkpoint (not a torch.save file, or truncated)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MicroGPTError(
            f"{path} is not a safe microgpt checkpoint: it asks to run code or load objects "
            f"that weights_only loading refuses"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise MicroGPTError(f"{path} is not a readable checkpoint (truncated or corrupted?): {exc}".splitlines()[0]) from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise MicroGPTError(f"{path} is not a microgpt checkpoint (missing model, config or tokenizer)")
    if state["version"] != FORMAT_VERSION:
        raise MicroGPTError(
            f"{path} has checkpoint format version {state['version']}; this microgpt reads version {FORMAT_VERSION}"
        )
    return state


def build_model(state: dict[str, Any]) -> GPT:
    """Rebuild the model from the config stored in the checkpoint, never from CLI flags."""
    try:
        model = GPT(ModelConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError) as exc:
        raise MicroGPTError(f"checkpoint weights do not match its model config: {exc}".splitlines()[0]) from exc
    return model


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The model (in eval mode, on `device`) and tokenizer of a checkpoint file or run dir."""
    state = load(path)
    model = build_model(state).to(device).eval()
    return model, from_spec(state["tokenizer"])
