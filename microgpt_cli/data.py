"""Data dirs: `prepare` turns any text into train.bin/val.bin/meta.json, and `Batches` reads
them back as training batches through a memmap, so no split is ever loaded whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microgpt_cli.errors import MicroGPTError

META_VERSION = 1
SPLITS = ("train", "val")


# --- prepare ---------------------------------------------------------------------------------


# --- reading a data dir ----------------------------------------------------------------------


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data dir, after checking that the dir is complete."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MicroGPTError(f"data dir {data_dir} does not exist; run `microgpt prepare INPUT --out {data_dir}` first")
    missing = [name for name in ("meta.json", "train.bin", "val.bin") if not (data_dir / name).is_file()]
    if missing:
        raise MicroGPTError(f"data dir {data_dir} is incomplete (missing {', '.join(missing)}); run `microgpt prepare` again")
    try:
        meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
        meta["tokenizer"]["kind"], meta["dtype"], meta["vocab_size"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MicroGPTError(f"{data_dir / 'meta.json'} is not a valid microgpt meta file: {exc}") from exc
    return meta


def open_split(data_dir: str | Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    """The token ids of one split as a read-only memmap."""
    path = Path(data_dir) / f"{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")


def data_fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies a dataset, stored in checkpoints to refuse resuming on different data."""
    return {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"],
            "inputs": [i.get("sha256") for i in meta.get("inputs", [])]}


# --- batches ---------------------------------------------------------------------------------


class Batches:
    """Training batches as epochs over non-overlapping windows of `context + 1` tokens.

    Each epoch shuffles the windows (and shifts them by a random offset) with a generator seeded
    by (seed, epoch), so micro-batch `i` is a pure function of `i`: resuming needs only the step,
    and each rank of a distributed run takes its own slice of every global batch."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.tokens = tokens
        self.context = context
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.windows = (len(tokens) - context) // context
        self.per_epoch = self.windows // (batch_size * world)
        if self.per_epoch < 1:
            raise MicroGPTError(
                f"the training split ({len(tokens):,} tokens) is too small for --context {context} "
                f"and a global batch of {batch_size * world} sequences; lower them or add text"
            )
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)
        self._offset = 0

    def _shuffle(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._offset = int(torch.randint(self.context, (1,), generator=g))
        self._order = torch.randperm(self.windows, generator=g)
        self._epoch = epoch

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index` (counted over the whole run): inputs and targets, each (B, T)."""
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._shuffle(epoch)
        first = (within * self.world + self.rank) * self.batch_size
        starts = self._order[first : first + self.batch_size].numpy() * self.context + self._offset
        rows = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.context + 1)].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]
