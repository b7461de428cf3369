"""Exact evaluation: every token of a split predicted exactly once, deterministically, reported as
loss, perplexity and bits per byte (comparable across tokenizers)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from microgpt_cli.config import EVAL_BATCH_SIZE, check_threads
from microgpt_cli.data import dataset
from microgpt_cli.data.tokenizer import Tokenizer, extends
from microgpt_cli.device import resolve_device, torch_threads
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.engine import inference_model
from microgpt_cli.io.checkpoint import load_checkpoint
from microgpt_cli.model.gpt import GPT


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per predicted token, in nats
    perplexity: float
    bits_per_byte: float  # total nats / ln 2 / UTF-8 bytes of the predicted tokens
    tokens: int  # tokens predicted
    seconds: float  # time spent scoring (loading excluded)
    skipped: int | None = None  # with skip_unknown: characters left out of the text (None: not asked)
    quantize: str | None = None  # the weights scored, where not the checkpoint's own (e.g. "int8")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@torch.inference_mode()
def split_loss(
    model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
    max_tokens: int = 0, token_bytes: np.ndarray | None = None,
    on_progress: Callable[[int], None] | None = None, shard: tuple[int, int] = (0, 1),
    deadline: float | None = None,
) -> tuple[float, int, int]:
    """Summed cross-entropy (nats), predicted token count and their byte count over `tokens`.

    The split is cut into consecutive windows of the model's context; token i+1 is predicted
    from the window holding token i, so tokens 1..N-1 are each scored once. `max_tokens` > 0
    scores only a prefix (a cheaper estimate during training). `shard=(rank, world)` scores
    every world-th window from the rank-th, so the sums over all ranks are the whole split's.
    `on_progress` gets the number of tokens scored so far after each batch. A batch that would end
    past `deadline` (a time.perf_counter value), by the last batch's time, is not started: the sums
    then cover a prefix."""
    was_training = model.training
    model.eval()
    context = model.config.context
    n = len(tokens) if max_tokens <= 0 else min(len(tokens), max_tokens + 1)
    targets = max(n - 1, 0)
    rank, world = shard
    starts = np.arange(0, targets, context)[rank::world]
    full, tail = starts[starts + context <= targets], starts[starts + context > targets]
    # Full windows go in batches; the one short tail window (if any) on its own.
    batches = [(full[i : i + batch_size], context) for i in range(0, len(full), batch_size)]
    batches += [(tail, targets - int(tail[0]))] if len(tail) else []
    sums: list[torch.Tensor] = []  # summed on the host once at the end: no device sync per batch
    count, nbytes = 0, 0
    for first, t in batches:
        batch_began = time.perf_counter()
        rows = tokens[first[:, None] + np.arange(t + 1)].astype(np.int64)  # (B, t + 1)
        chunk = torch.from_numpy(rows).to(device)
        logits = model(chunk[:, :-1])
        flat = logits.reshape(-1, logits.size(-1)).float()
        sums.append(F.cross_entropy(flat, chunk[:, 1:].reshape(-1), reduction="sum"))
        count += rows.shape[0] * t
        if token_bytes is not None:
            nbytes += int(token_bytes[rows[:, 1:]].sum())
        if on_progress is not None:
            on_progress(count)
        if _next_batch_misses(deadline, batch_began):
            break
    model.train(was_training)
    total = float(torch.stack(sums).cpu().double().sum()) if sums else 0.0
    return total, count, nbytes


def _next_batch_misses(deadline: float | None, batch_began: float) -> bool:
    """Whether another batch, taking as long as the one begun at `batch_began`, would end past
    `deadline` (a perf_counter time): an evaluation stops before the deadline, not one batch after."""
    if deadline is None:
        return False
    now = time.perf_counter()
    return now + (now - batch_began) > deadline


@torch.inference_mode()
def rows_loss(
    model: GPT, rows: dataset.ChatRows, batch_size: int, device: torch.device | str = "cpu",
    max_tokens: int = 0, token_bytes: np.ndarray | None = None,
    on_progress: Callable[[int], None] | None = None, shard: tuple[int, int] = (0, 1),
    deadline: float | None = None,
) -> tuple[float, int, int, int]:
    """The loss of a chat split as training sees it: summed cross-entropy over the trained targets
    of its packed rows (the assistant's tokens: the loss mask), their count and bytes, and the
    positions run through the model. `max_tokens` > 0 takes the first rows covering that many
    positions; `shard`, `on_progress` (positions so far) and `deadline` work as in split_loss."""
    was_training = model.training
    model.eval()
    context = rows.width - 1
    n = len(rows) if max_tokens <= 0 else min(len(rows), -(-max_tokens // context))
    rank, world = shard
    picked = np.arange(n)[rank::world]
    sums: list[torch.Tensor] = []
    count, nbytes, positions = 0, 0, 0
    for first in range(0, len(picked), batch_size):
        batch_began = time.perf_counter()
        inputs, targets = rows.get(picked[first : first + batch_size])
        logits = model(torch.from_numpy(inputs).to(device))
        flat = logits.reshape(-1, logits.size(-1)).float()
        sums.append(F.cross_entropy(flat, torch.from_numpy(targets).to(device).reshape(-1), reduction="sum"))
        trained = targets[targets != dataset.IGNORE]
        count += trained.size
        positions += targets.size
        if token_bytes is not None:
            nbytes += int(token_bytes[trained].sum())
        if on_progress is not None:
            on_progress(positions)
        if _next_batch_misses(deadline, batch_began):
            break
    model.train(was_training)
    total = float(torch.stack(sums).cpu().double().sum()) if sums else 0.0
    return total, count, nbytes, positions


def evaluate(
    checkpoint: str | Path = "out",
    data_dir: str | Path = "data",
    text: str | Path | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "auto",
    on_progress: Callable[[int, int], None] | None = None,
    skip_unknown: bool = False,
    quantize: str | None = None,
    threads: int | None = None,
) -> EvalResult:
    """Score a checkpoint on the whole validation split of `data_dir`, or on a UTF-8 text file
    (`text`, tokenized with the checkpoint's own tokenizer). Characters a char vocabulary lacks
    are an error naming where they are, or with `skip_unknown` are left out and counted in the
    result. `on_progress(done, total)` follows the predicted tokens. `quantize="int8"` scores
    the int8 weights `generate --quantize int8` samples with (CPU only), to measure their cost.
    `threads`: torch's CPU threads while scoring (default: torch's setting). Chat data (`prepare
    --chat`) is scored as training scores it: the assistant's tokens only, in whole conversations
    (rows_loss)."""
    if batch_size < 1:
        raise MicroGPTError(f"--batch-size must be at least 1, got {batch_size}")
    threads = check_threads(threads)
    resolved = resolve_device(device)
    skipped = None
    rows = None
    if text is not None:
        source = read_text(Path(text))  # before loading the model: a wrong path fails fast
        model, tokenizer = load_checkpoint(checkpoint, resolved, mapped=True)
        source, skipped = _known_text(source, tokenizer, Path(text), skip_unknown)
        tokens = tokenizer.encode_array(source)
    else:
        meta = dataset.read_meta(data_dir)
        dataset.data_tokenizer(meta)  # meta.json's vocabulary size agrees with its tokenizer
        model, tokenizer = load_checkpoint(checkpoint, resolved, mapped=True)
        if not extends(tokenizer.spec, meta["tokenizer"]):  # a chat model reads its base's data as its base does
            dataset.check_same_tokenizer(meta, tokenizer.spec, Path(data_dir), "the checkpoint",
                                         "prepare the data with the checkpoint's tokenizer or pass --text FILE")
        tokens = dataset.open_split(data_dir, "val", meta)
        if dataset.has_mask(meta):
            rows = dataset.ChatRows(tokens, dataset.open_mask(data_dir, "val"), tokenizer, model.config.context)
    if len(tokens) < 2:
        raise MicroGPTError("nothing to evaluate: the text has fewer than 2 tokens")
    quantize = None if quantize == "none" else quantize
    if quantize is not None:
        model = inference_model(model, quantize, in_place=True)
    total_targets = len(tokens) - 1 if rows is None else len(rows) * (rows.width - 1)
    progress = None if on_progress is None else lambda done: on_progress(done, total_targets)
    start = time.perf_counter()
    with torch_threads(threads):
        if rows is None:
            nats, count, nbytes = split_loss(model, tokens, batch_size, resolved,
                                             token_bytes=tokenizer.bytes_per_token(), on_progress=progress)
        else:
            nats, count, nbytes, _ = rows_loss(model, rows, batch_size, resolved,
                                               token_bytes=tokenizer.bytes_per_token(), on_progress=progress)
    if rows is not None and not count:
        raise MicroGPTError(f"nothing to evaluate: no conversation of {data_dir}'s val split fits the "
                            f"checkpoint's context of {model.config.context}")
    seconds = time.perf_counter() - start
    loss = nats / count
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    bits_per_byte = nats / math.log(2) / nbytes if nbytes else math.nan
    return EvalResult(loss, perplexity, bits_per_byte, count, seconds, skipped, quantize)


EVAL_EXTRA = "pip install 'microgpt[eval]' (in a checkout: pip install -e '.[eval]')"


def evaluate_tasks(
    checkpoint: str | Path = "out",
    tasks: Sequence[str] = (),
    include_path: str | Path | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "auto",
    quantize: str | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Score a checkpoint on lm-evaluation-harness tasks (its registry's, or YAML files under
    `include_path`): the harness's own results dict, whose "results" holds each task's metrics
    ("acc,none", "acc_stderr,none", ...). Needs the `eval` extra. `limit` caps the documents per
    task (a fraction below 1: that share of them); `on_progress(kind, done, total)` follows the
    harness's requests of each kind."""
    names = [name.strip() for name in tasks if name.strip()]
    if not names:
        raise MicroGPTError("--tasks needs at least one task name (comma-separated: hellaswag,arc_easy)")
    if batch_size < 1:
        raise MicroGPTError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and not (limit > 0 and math.isfinite(limit) and (limit < 1 or limit == int(limit))):
        raise MicroGPTError(f"--limit must be a whole number of documents or a fraction below 1, got {limit:g}")
    if num_fewshot is not None and num_fewshot < 0:
        raise MicroGPTError(f"--num-fewshot must not be negative, got {num_fewshot}")
    try:
        from microgpt_cli.infer import harness
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("microgpt_cli"):
            raise
        raise MicroGPTError(f"--tasks runs lm-evaluation-harness, which is not installed ({exc.name} is missing): "
                            f"{EVAL_EXTRA}") from None
    from microgpt_cli.infer.sampling import Sampler
    from microgpt_cli.io.checkpoint import resolve_path

    model, tokenizer = load_checkpoint(checkpoint, resolve_device(device), mapped=True)
    quantize = None if quantize == "none" else quantize
    sampler = Sampler(model, tokenizer, batch_size, quantize, in_place=True)  # converted as loaded: held once
    info = {"microgpt_checkpoint": str(resolve_path(checkpoint)), "model_num_parameters": sampler.engine.num_params,
            "tokenizer": tokenizer.name, "context": sampler.engine.config.context, "quantize": quantize or "none",
            "device": str(sampler.engine.device)}
    return harness.run_tasks(sampler, names, None if include_path is None else Path(include_path),
                             int(limit) if limit is not None and limit >= 1 else limit, num_fewshot, batch_size,
                             on_progress, info, log_samples)


def _known_text(text: str, tokenizer: Tokenizer, path: Path, skip_unknown: bool) -> tuple[str, int | None]:
    """`text` without the characters `tokenizer` cannot encode (only a char vocabulary lacks any)
    and how many were left out (None unless `skip_unknown`); without `skip_unknown` any such
    character is an error that says where the first one is and how many there are."""
    unknown = tokenizer.unknown_positions(text)
    if len(unknown) and not skip_unknown:
        at = int(unknown[0])
        line = text.count("\n", 0, at) + 1
        column = at - text.rfind("\n", 0, at)
        raise MicroGPTError(
            f"{path}: {len(unknown):,} character(s) are not in the checkpoint's {tokenizer.name} vocabulary, the first "
            f"{text[at]!r} (U+{ord(text[at]):04X}) at character {at:,} (line {line}, column {column}); pass "
            f"--skip-unknown to score the text without them"
        )
    if not skip_unknown:
        return text, None
    missing = {ord(text[i]): None for i in unknown}
    return text.translate(missing), len(unknown)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MicroGPTError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise MicroGPTError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise MicroGPTError(f"cannot read {path}: {exc.strerror}") from None
