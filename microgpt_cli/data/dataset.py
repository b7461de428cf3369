"""Reading a prepared data dir: meta.json checked against its token files, the splits as memmaps
(so no split is ever loaded whole) and training batches. train, eval and info use only this
side; `dataprep.py` writes data dirs.

A chat data dir (`prepare --chat`) also has a loss mask per split, and is batched differently:
whole conversations packed into rows (ChatRows), never a window that starts mid-conversation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from microgpt_cli.data.chat import ChatFormat, pieces
from microgpt_cli.data.tokenizer import Tokenizer, check_spec, from_spec
from microgpt_cli.errors import MicroGPTError

META_FILE = "meta.json"
MASK_FILE = "{split}.mask.bin"  # chat data: one uint8 per id, 1 where the id is a trained target
META_VERSION = 1
SPLITS = ("train", "val")
# Token file dtypes and the largest vocabulary each can hold.
DTYPES = {"uint16": 1 << 16, "uint32": 1 << 32}
_ID_CHECK_CHUNK = 1 << 24  # ids scanned at once when checking a split: bounded memory on huge splits


def _corrupt(data_dir: Path, problem: str) -> MicroGPTError:
    return MicroGPTError(f"data dir {data_dir} is corrupted: {problem}; run `microgpt prepare` again")


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data dir, after checking that it is complete and that meta.json
    agrees with the token files (types, dtype, vocabulary size, token counts)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MicroGPTError(f"data dir {data_dir} does not exist; run `microgpt prepare INPUT --out {data_dir}` first")
    missing = [name for name in (META_FILE, "train.bin", "val.bin") if not (data_dir / name).is_file()]
    if len(missing) == 3 and any(data_dir.glob("*.pt")):
        raise MicroGPTError(f"{data_dir} holds checkpoints, not prepared data (a `microgpt train` run dir?); "
                            f"pass the data dir that `microgpt prepare` made")
    if missing:
        raise MicroGPTError(
            f"data dir {data_dir} is incomplete (missing {', '.join(missing)}); run `microgpt prepare` again")
    try:
        meta = json.loads((data_dir / META_FILE).read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise _corrupt(data_dir, f"{META_FILE} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _corrupt(data_dir, f"{META_FILE} is not a JSON object")
    if meta.get("version") != META_VERSION:
        raise _corrupt(data_dir, f"{META_FILE} has version {meta.get('version')!r}, this microgpt reads {META_VERSION}")
    try:
        check_spec(meta.get("tokenizer"))
    except MicroGPTError as exc:
        raise _corrupt(data_dir, f"{META_FILE} has no valid tokenizer definition ({exc})") from None
    dtype, vocab_size = meta.get("dtype"), meta.get("vocab_size")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(data_dir, f"{META_FILE} has dtype {dtype!r}, not one of {', '.join(DTYPES)}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 1 <= vocab_size <= DTYPES[dtype]:
        raise _corrupt(data_dir, f"{META_FILE} has vocab_size {vocab_size!r}, not a count that {dtype} ids can hold")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(s), dict) for s in SPLITS):
        raise _corrupt(data_dir, f"{META_FILE} does not describe the train and val splits")
    itemsize = np.dtype(dtype).itemsize
    for split in SPLITS:
        size = (data_dir / f"{split}.bin").stat().st_size
        if size % itemsize:
            raise _corrupt(data_dir, f"{split}.bin has {size:,} bytes, not a whole number of {dtype} ids")
        tokens, text_bytes = splits[split].get("tokens"), splits[split].get("bytes")
        if tokens != size // itemsize or isinstance(tokens, bool):
            said = repr(tokens)[:40]
            raise _corrupt(data_dir, f"{split}.bin holds {size // itemsize:,} ids but {META_FILE} says {said}")
        if not _count(text_bytes):
            raise _corrupt(data_dir, f"{META_FILE} gives no byte count for the {split} split")
    if "chat" in meta:
        _check_chat(data_dir, meta)
    inputs = meta.get("inputs", [])
    if not isinstance(inputs, list) or not all(
            isinstance(i, dict) and isinstance(i.get("path"), str) and isinstance(i.get("sha256"), str)
            and _count(i.get("bytes")) for i in inputs):
        raise _corrupt(data_dir, f"{META_FILE} lists its inputs in a form this microgpt does not know")
    return meta


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_chat(data_dir: Path, meta: dict[str, Any]) -> None:
    chat = meta["chat"]
    if not isinstance(chat, dict) or "chat_template" not in meta["tokenizer"] or not all(
            isinstance(chat.get(key), dict) and all(_count(chat[key].get(s)) for s in SPLITS)
            for key in ("conversations", "trained_tokens")):
        raise _corrupt(data_dir, f"{META_FILE} describes its conversations in a form this microgpt does not know")
    for split in SPLITS:
        path = data_dir / MASK_FILE.format(split=split)
        if not path.is_file():
            raise MicroGPTError(f"data dir {data_dir} is incomplete (missing {path.name}); run `microgpt prepare` "
                                f"again")
        if path.stat().st_size != meta["splits"][split]["tokens"]:
            raise _corrupt(data_dir, f"{path.name} has {path.stat().st_size:,} bytes but {split}.bin holds "
                                     f"{meta['splits'][split]['tokens']:,} ids")


def has_mask(meta: dict[str, Any]) -> bool:
    """Whether a data dir holds conversations with a loss mask (`prepare --chat`)."""
    return "chat" in meta


def open_mask(data_dir: str | Path, split: str) -> np.ndarray:
    """The loss mask of a chat data dir's split, as a read-only memmap (1: a trained target)."""
    path = Path(data_dir) / MASK_FILE.format(split=split)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def data_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer that made a data dir, checked against the vocabulary size meta.json records."""
    tokenizer = from_spec(meta["tokenizer"])
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise MicroGPTError(f"the data's meta.json says vocab_size {meta['vocab_size']} but its tokenizer has "
                            f"{tokenizer.vocab_size} tokens: the data dir is corrupted; run `microgpt prepare` again")
    return tokenizer


def open_split(data_dir: str | Path, split: str, meta: dict[str, Any], check_ids: bool = True) -> np.ndarray:
    """The token ids of one split as a read-only memmap; with `check_ids`, every id is checked to
    be inside the vocabulary first (an id past it would index out of the embedding)."""
    path = Path(data_dir) / f"{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=meta["dtype"])
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
    if check_ids:
        for start in range(0, len(tokens), _ID_CHECK_CHUNK):
            chunk = tokens[start : start + _ID_CHECK_CHUNK]
            top = int(chunk.max())
            if top >= meta["vocab_size"]:
                at = start + int(np.argmax(chunk >= meta["vocab_size"]))
                raise _corrupt(Path(data_dir), f"{split}.bin has token id {top} at position {at:,}, outside the "
                                               f"vocabulary of {meta['vocab_size']}")
    return tokens


def check_same_tokenizer(meta: dict[str, Any], spec: dict[str, Any], data_dir: Path, whose: str, fix: str) -> None:
    """Token ids only mean something under the tokenizer that made them: refuse data made by any
    other than `spec`, the tokenizer of `whose` (a checkpoint)."""
    if meta["tokenizer"] == spec:
        return
    theirs = meta["tokenizer"].get("name", meta["tokenizer"].get("kind"))
    ours = spec.get("name", spec.get("kind"))
    if ours == theirs:
        ours = f"a different {theirs} vocabulary"
    raise MicroGPTError(f"{data_dir} was prepared with tokenizer {theirs} (vocab {meta['vocab_size']}) but {whose} "
                        f"uses {ours}; {fix}")


def data_fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies a dataset, stored in checkpoints to refuse resuming on different data."""
    return {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"],
            "inputs": [i.get("sha256") for i in meta.get("inputs", [])]}


class Batches:
    """Training batches as epochs over non-overlapping windows of `context + 1` tokens.

    Each epoch shuffles the windows (and shifts them by a random offset) with a generator seeded
    by (seed, epoch), so micro-batch `i` is a pure function of `i`: resuming needs only the step.
    `batch_size` is global: each of `world` processes takes its own equal slice of every
    micro-batch, so the data and the effective batch are the same for any world size."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise MicroGPTError(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
        self.tokens = tokens
        self.context = context
        self.batch_size = batch_size
        self.seed = seed
        self.local = batch_size // world
        self.first_row = rank * self.local
        self.windows = (len(tokens) - context) // context
        self.per_epoch = self.windows // batch_size
        if self.per_epoch < 1:
            raise MicroGPTError(
                f"the training split ({len(tokens):,} tokens) is too small for --context {context} "
                f"and --batch-size {batch_size}; lower them or add text"
            )
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._offset = 0

    def _shuffle(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        self._offset = int(rng.integers(self.context))
        self._order = rng.permutation(self.windows)
        self._epoch = epoch

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of micro-batch `index` (counted over the whole run): inputs and
        targets, each (batch_size / world, context)."""
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._shuffle(epoch)
        first = within * self.batch_size + self.first_row
        starts = self._order[first : first + self.local] * self.context + self._offset
        rows = self.tokens[starts[:, None] + np.arange(self.context + 1)].astype(np.int64)
        return rows[:, :-1], rows[:, 1:]


IGNORE = -100  # a target that F.cross_entropy leaves out (its default ignore_index)


class ChatRows:
    """The conversations of a chat split packed into rows of `context + 1` tokens.

    Each conversation is cut at exchange boundaries into pieces that fit (chat.pieces); every
    piece starts with the chat start token and holds a trained assistant turn. Pieces are packed
    into rows in data order, whole, and a row's rest is padding that is never trained on, so no
    row starts mid-conversation and every row has a trained target. `dropped` counts the
    exchanges left out because they alone are longer than the context."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, tokenizer: Tokenizer, context: int):
        chat = ChatFormat(tokenizer)
        self.tokens, self.mask, self.width = tokens, mask, context + 1
        self.start, self.pad = chat.start, chat.end
        starts = np.flatnonzero(tokens == chat.start)
        role_of = {i: role for role, i in chat.role_ids.items()}
        turn_starts = np.flatnonzero(np.isin(tokens, list(role_of)))
        ends = np.append(starts[1:], len(tokens))
        spans: list[tuple[int, int]] = []  # (begin, end) ids of each piece, without its start token
        self.dropped = 0
        for begin, end in zip(starts.tolist(), ends.tolist(), strict=True):
            turns = turn_starts[np.searchsorted(turn_starts, begin) : np.searchsorted(turn_starts, end)].tolist()
            bounds = [*turns, end]
            lengths = [b - a for a, b in itertools.pairwise(bounds)]
            cut, dropped = pieces([role_of[int(tokens[t])] for t in turns], lengths, self.width - 1)
            spans += [(bounds[piece.start], bounds[piece.stop]) for piece in cut]
            self.dropped += dropped
        self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        self.conversations = len(starts)
        # Rows are runs of consecutive pieces: row r holds pieces first[r] .. first[r + 1] - 1.
        sizes = (self.spans[:, 1] - self.spans[:, 0] + 1).tolist()
        first, used = [0], 0
        for i, size in enumerate(sizes):
            if used + size > self.width:
                first.append(i)
                used = 0
            used += size
        self.first = np.asarray([*first, len(sizes)] if sizes else [0], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.first) - 1

    def get(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets (len(rows), context) of these rows; untrained targets are IGNORE."""
        ids = np.full((len(rows), self.width), self.pad, dtype=np.int64)
        trained = np.zeros((len(rows), self.width), dtype=bool)
        for out, row in enumerate(rows.tolist()):
            at = 0
            for begin, end in self.spans[self.first[row] : self.first[row + 1]].tolist():
                ids[out, at] = self.start
                ids[out, at + 1 : at + 1 + end - begin] = self.tokens[begin:end]
                trained[out, at + 1 : at + 1 + end - begin] = self.mask[begin:end].astype(bool)
                at += 1 + end - begin
        return ids[:, :-1], np.where(trained[:, 1:], ids[:, 1:], IGNORE)


class ChatBatches(Batches):
    """Batches of a chat split: epochs over its packed rows (ChatRows) in an order shuffled by
    (seed, epoch), with the same contract as Batches (micro-batch `i` is a pure function of `i`;
    each process takes its slice of the global batch)."""

    def __init__(self, rows: ChatRows, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise MicroGPTError(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
        self.rows = rows
        self.tokens = rows.tokens
        self.context = rows.width - 1
        self.batch_size = batch_size
        self.seed = seed
        self.local = batch_size // world
        self.first_row = rank * self.local
        self.windows = len(rows)
        self.per_epoch = self.windows // batch_size
        if self.per_epoch < 1:
            raise MicroGPTError(
                f"the training split packs into {len(rows):,} rows of --context {self.context}, fewer than "
                f"--batch-size {batch_size}; lower --batch-size or add conversations")
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _shuffle(self, epoch: int) -> None:
        self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
        self._epoch = epoch

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._shuffle(epoch)
        first = within * self.batch_size + self.first_row
        return self.rows.get(self._order[first : first + self.local])
