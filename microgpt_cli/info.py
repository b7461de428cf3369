"""What a checkpoint, a run dir or a data dir holds, as plain dicts (JSON-safe) for `microgpt info`."""

from __future__ import annotations

import datetime
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from microgpt_cli.data.dataset import META_FILE, SPLITS, data_tokenizer, open_split, read_meta
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io import checkpoint
from microgpt_cli.io.checkpoint import RUN_FILES


def describe(path: str | Path) -> dict[str, Any]:
    """Describe a checkpoint file, a run dir or a data dir; anything else is a clear error."""
    path = Path(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; this is some other file
            raise MicroGPTError(f"{path} is not a checkpoint; pass a .pt file, a run dir or a data dir")
        return describe_checkpoint(path)
    if path.is_dir():
        if (path / META_FILE).is_file():
            return describe_data(path)
        if any((path / name).is_file() for name in RUN_FILES):
            return describe_run(path)
        raise MicroGPTError(
            f"{path} is neither a run dir (best.pt, last.pt) nor a data dir ({META_FILE}); "
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
    spec = state.tokenizer
    return {
        "kind": "checkpoint",
        "path": str(path),
        "file": _file_facts(path),
        "model": {**asdict(state.model_config), "params": state.num_params},
        "tokenizer": {"kind": spec["kind"], "name": spec.get("name", spec["kind"]),
                      "vocab_size": state.model_config.vocab_size, "chat_template": _template_name(spec)},
        "data": {"dir": state.data_dir, "inputs_sha256": state.input_hashes},
        "init_from": state.init_from or None,
        "training": {
            "step": state.step,
            "epoch": state.epoch,
            "train_loss": state.train_loss,
            "val_loss": state.val_loss,
            "best_val_loss": state.best_val,
            # What the val losses were measured on: under a time budget or --eval-tokens, a part of
            # the split, and `microgpt eval` (the whole split) gives another number.
            "val_tokens": state.val_tokens,
            "val_split_tokens": state.val_split_tokens,
            "elapsed": state.elapsed,
            "resumable": state.training is not None,
            "world_size": state.training.world_size if state.training else None,
        },
        "train_config": state.train_config,
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


def _template_name(spec: dict[str, Any]) -> str | None:
    """The chat template a tokenizer carries (a model or data made for chat), or None."""
    template = spec.get("chat_template")
    return template["name"] if template else None


def describe_data(path: str | Path) -> dict[str, Any]:
    """A data dir, after the checks training makes: meta.json against the token files, the
    tokenizer against the vocabulary size, every id inside the vocabulary."""
    path = Path(path)
    meta = read_meta(path)
    data_tokenizer(meta)
    for split in SPLITS:
        open_split(path, split, meta)
    spec = meta["tokenizer"]
    return {
        "kind": "data",
        "path": str(path),
        "tokenizer": {"kind": spec["kind"], "name": spec.get("name", spec["kind"]), "vocab_size": meta["vocab_size"],
                      "chat_template": _template_name(spec)},
        "dtype": meta["dtype"],
        "splits": meta["splits"],
        "chat": meta.get("chat"),
        "inputs": meta.get("inputs", []),
        "file": _file_facts(path / META_FILE),
    }
