"""What a checkpoint, a run dir or a data dir holds, as plain dicts (JSON-safe) for `microgpt info`."""

from __future__ import annotations

import datetime
import zipfile
from pathlib import Path
from typing import Any

from microgpt_cli import checkpoint
from microgpt_cli.data import read_meta
from microgpt_cli.errors import MicroGPTError

RUN_FILES = ("best.pt", "last.pt")


def describe(path: str | Path) -> dict[str, Any]:
    """Describe a checkpoint file, a run dir or a data dir; anything else is a clear error."""
    path = Path(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; this is some other file
            raise MicroGPTError(f"{path} is not a checkpoint; pass a .pt file, a run dir or a data dir")
        return describe_checkpoint(path)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return describe_data(path)
        if any((path / name).is_file() for name in RUN_FILES):
            return describe_run(path)
        raise MicroGPTError(
            f"{path} is neither a run dir (best.pt, last.pt) nor a data dir (meta.json); "
            f"pass a checkpoint file, a `microgpt train --out` dir or a `microgpt prepare --out` dir"
        )
    raise MicroGPTError(f"{path} does not exist")


def _file_facts(path: Path) -> dict[str, Any]:
    stat = path.stat()
    modified = datetime.datetime.fromtimestamp(stat.st_mtime).astimezone()
    return {"bytes": stat.st_size, "modified": modified.isoformat(timespec="seconds")}


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state = checkpoint.load(path)
    model_config = state["model_config"]
    weights = state["model"]
    params = sum(t.numel() for t in weights.values())
    if model_config.get("tie_weights") and "head.weight" in weights:
        params -= weights["head.weight"].numel()  # one tensor stored under two names
    metrics, train_config, data = state.get("metrics") or {}, state.get("train_config") or {}, state.get("data") or {}
    spec = state["tokenizer"]
    return {
        "kind": "checkpoint",
        "path": str(path),
        "file": _file_facts(path),
        "model": {**model_config, "params": params},
        "tokenizer": {"kind": spec["kind"], "name": spec.get("name", spec["kind"]),
                      "vocab_size": model_config["vocab_size"]},
        "data": {"dir": train_config.get("data"), "inputs_sha256": data.get("inputs", [])},
        "training": {
            "step": state.get("step", metrics.get("step")),
            "epoch": metrics.get("epoch"),
            "train_loss": metrics.get("train_loss"),
            "val_loss": metrics.get("val_loss"),
            "best_val_loss": state.get("best_val", metrics.get("val_loss")),
            "elapsed": state.get("elapsed", metrics.get("elapsed")),
            "resumable": "optimizer" in state,
            "world_size": state.get("world_size"),
        },
        "train_config": train_config,
    }


def describe_run(path: str | Path) -> dict[str, Any]:
    """A run dir: the model and training facts of its newest checkpoint (last.pt covers the whole
    run), plus where best.pt was taken."""
    path = Path(path)
    present = [path / name for name in RUN_FILES if (path / name).is_file()]
    info = describe_checkpoint(present[-1])
    info["kind"] = "run"
    info["path"] = str(path)
    info["checkpoints"] = {}
    for file in present:
        described = info if file == present[-1] else describe_checkpoint(file)
        info["checkpoints"][file.name] = {**described["file"], "step": described["training"]["step"],
                                          "val_loss": described["training"]["val_loss"]}
    del info["file"]
    return info


def describe_data(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta = read_meta(path)
    spec = meta["tokenizer"]
    return {
        "kind": "data",
        "path": str(path),
        "tokenizer": {"kind": spec["kind"], "name": spec.get("name", spec["kind"]), "vocab_size": meta["vocab_size"]},
        "dtype": meta["dtype"],
        "splits": meta["splits"],
        "inputs": meta.get("inputs", []),
        "file": _file_facts(path / "meta.json"),
    }
