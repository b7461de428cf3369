"""Scoring beside decoding: token ids in, log-probabilities out, on the engine's model.

What benchmarks ask of a language model (lm-evaluation-harness's `loglikelihood` and
`loglikelihood_rolling`, the OpenAI API's `echo` + `logprobs`) is the probability of given
tokens, not new ones. Every request here is a token sequence and the first position to score;
each scored token gets its log-probability, whether it is the greedy choice, and optionally the
k likeliest tokens at its position.

- Windows. The model sees at most `context` tokens. Scored positions are covered by windows that
  each predict up to `stride` positions (the context by default) from as much of the preceding
  text as fits: a window predicting positions [a, e) reads tokens [e - 1 - context, e - 1). So a
  continuation after a long context is read with the context's last tokens (what the harness's
  `hf` model does), and a long document is scored once per token, each later window starting
  where the last ended and its final window reaching back a full context. With the default
  stride these are exactly lm-evaluation-harness's rolling windows, so numbers compare with
  what it reports for other models; a smaller stride gives every token more context.
- Shared prefixes. Windows that read the same tokens up to their first scored one (the four
  answers of a multiple-choice question after its one context) are packed into one row: the
  prefix once, then each window's own tokens, which see the prefix and their own earlier tokens
  only and take the positions they would have alone (an attention mask and position ids, through
  the model's cache interface). The prefix is read once instead of once per answer.
- Batches. Rows are sorted by length and run `batch_size` at a time, padded at the end only: a
  causal model never lets a token see the ones after it, so the padding changes no result. The
  head runs only at the scored positions (an answer is a few tokens of a long prompt), in chunks
  that bound the memory of the vocabulary-wide logits.
- Numbers. The model is the engine's inference copy (eval mode, so no dropout; transposed fp32
  or int8 weights on CPU, bf16 on CUDA); log-probabilities are computed in float32 and summed in
  float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from microgpt_cli.config import EVAL_BATCH_SIZE
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.engine import Engine

LOGITS_ELEMENTS = 1 << 24  # float32 logits held at once by the head (64 MB): bounds memory for big vocabularies


@dataclass(frozen=True)
class Scored:
    """The scored tokens of one request, in order."""

    logprobs: list[float]  # each token's log-probability in nats
    greedy: list[bool]  # whether each token is the likeliest one at its position (argmax)
    top: list[list[tuple[int, float]]]  # per token, the top_k likeliest (id, log-probability), likeliest first

    @property
    def logprob(self) -> float:
        """The summed log-probability of the scored tokens."""
        return math.fsum(self.logprobs)

    @property
    def is_greedy(self) -> bool:
        """Whether greedy decoding produces exactly these tokens."""
        return all(self.greedy)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, and the likeliest tokens at its position (id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]

    def keep(self, k: int) -> TokenLogprob:
        """The same with only the k likeliest alternatives."""
        return replace(self, top=self.top[:k])


def logprob_columns(logits: torch.Tensor, tokens: torch.Tensor,
                    top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits (n, vocab) and the tokens (n,) that came next: their log-probabilities (n,),
    whether each was the argmax (n,), and the top_k likeliest ids and log-probabilities (n, k)."""
    # Row-major first (a tied head's logits come transposed): reductions along a row are several
    # times faster. cross_entropy is one fused log-softmax pass, 4x faster than torch.logsumexp on
    # CPU for a GPT-2-sized vocabulary; the normalizer then follows from the token's own logit.
    # Every log-probability is then logit - normalizer, one formula, so that a token among the
    # top_k has exactly the same value in both places.
    logits = logits.float().contiguous()
    chosen = logits.gather(-1, tokens[:, None])
    norm = chosen + F.cross_entropy(logits, tokens, reduction="none")[:, None]
    impossible = ~torch.isfinite(norm[:, 0])  # a token at -inf: the normalizer cannot come from it
    if bool(impossible.any()):
        norm[impossible] = torch.logsumexp(logits[impossible], dim=-1, keepdim=True)
    greedy = logits.argmax(dim=-1) == tokens
    top_values, top_ids = logits.topk(min(top_k, logits.size(-1)), dim=-1)
    return (chosen - norm)[:, 0], greedy, top_ids, top_values - norm


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top_k: int) -> list[TokenLogprob]:
    """Each row's TokenLogprob for logits (n, vocab) and the tokens (n,) that came next."""
    logprobs, _, top_ids, top_values = (t.tolist() for t in logprob_columns(logits, tokens, top_k))
    return [TokenLogprob(token, logprob, tuple(zip(ids, values, strict=True)))
            for token, logprob, ids, values in zip(tokens.tolist(), logprobs, top_ids, top_values, strict=True)]


@dataclass(frozen=True)
class _Window:
    request: int
    ids: list[int]  # the tokens the model reads
    scored: int  # the last `scored` positions predict the tokens after them
    targets: list[int]


@dataclass
class _Row:
    """One sequence the model reads: one window, or several packed after their shared prefix."""

    ids: list[int]
    positions: list[int]  # each token's position: a packed window's tokens continue the prefix's
    segments: list[int]  # 0 for the shared prefix, i for the tokens of the i-th window (from 1)
    members: list[tuple[int, list[int]]]  # (window index, the columns that predict its targets)

    @classmethod
    def of(cls, index: int, window: _Window) -> _Row:
        prefix = len(window.ids) - window.scored + 1
        row = cls(window.ids[:prefix], list(range(prefix)), [0] * prefix, [])
        row.add(index, window)
        return row

    def add(self, index: int, window: _Window) -> None:
        """Add a window with this row's prefix: its tokens after the prefix go at the end."""
        prefix = len(window.ids) - window.scored + 1
        own = window.ids[prefix:]
        start = len(self.ids)
        self.ids += own
        self.positions += range(prefix, prefix + len(own))
        self.segments += [len(self.members) + 1] * len(own)
        self.members.append((index, [prefix - 1, *range(start, start + len(own))]))


class _PackedLayout:
    """Positions and the attention mask of a batch of rows, for GPT.hidden's cache argument
    (model.KVCache): a token sees the earlier tokens of its own segment and the shared prefix."""

    def __init__(self, positions: torch.Tensor, segments: torch.Tensor):
        self.positions = positions  # (B, T)
        order = torch.arange(segments.size(1), device=segments.device)
        causal = order[:, None] >= order[None, :]
        visible = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
        self.mask: torch.Tensor | None = (causal & visible)[:, None]  # (B, 1, T, T); padding sees itself

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v  # nothing is cached


class Scorer:
    """Scores token sequences with an engine's model, `batch_size` windows at a time."""

    def __init__(self, engine: Engine, batch_size: int = EVAL_BATCH_SIZE):
        if batch_size < 1:
            raise MicroGPTError(f"the batch size must be at least 1, got {batch_size}")
        self.model = engine.model
        self.device = engine.device
        self.context = engine.context
        self.batch_size = batch_size

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], top_k: int = 0,
              on_progress: Callable[[int, int], None] | None = None) -> list[Scored]:
        """Each continuation's tokens given its context: `requests` are (context ids, continuation
        ids) pairs, the context at least one token (a document start, say)."""
        if any(not context for context, _ in requests):
            raise MicroGPTError("a scored continuation needs at least one token of context before it")
        sequences = [(list(context) + list(continuation), len(context)) for context, continuation in requests]
        return self.score_tokens(sequences, top_k, on_progress=on_progress)

    def rolling(self, documents: Sequence[Sequence[int]], prefix: int | None, top_k: int = 0,
                stride: int | None = None, on_progress: Callable[[int, int], None] | None = None) -> list[Scored]:
        """Every token of each document, after `prefix` (a document-start token); without a
        prefix the first token is only read, and the others are scored."""
        start = [] if prefix is None else [prefix]
        sequences = [(start + list(document), 1) for document in documents]
        return self.score_tokens(sequences, top_k, stride, on_progress)

    def score_tokens(self, sequences: Sequence[tuple[Sequence[int], int]], top_k: int = 0, stride: int | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> list[Scored]:
        """The tokens from position `first` on of each (ids, first) pair, `first` >= 1, each read
        with as much of what precedes it as the windows allow (see the module doc)."""
        stride = self.context if stride is None else stride
        if not 1 <= stride <= self.context:
            raise MicroGPTError(f"the stride must be between 1 and the context ({self.context}), got {stride}")
        if top_k < 0:
            raise MicroGPTError(f"top_k must not be negative, got {top_k}")
        windows = [window for r, (ids, first) in enumerate(sequences)
                   for window in self._windows(r, list(ids), first, stride)]  # each request's in position order
        rows = self._pack(windows)
        rows.sort(key=lambda row: -len(row.ids))
        outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        total, done = sum(w.scored for w in windows), 0
        for at in range(0, len(rows), self.batch_size):
            batch = rows[at : at + self.batch_size]
            outputs.update(self._run(batch, windows, top_k))
            done += sum(windows[i].scored for row in batch for i, _ in row.members)
            if on_progress is not None:
                on_progress(done, total)
        results: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in sequences]
        for i, window in enumerate(windows):
            results[window.request].append(outputs[i])
        return [self._collect(parts) for parts in results]

    def _pack(self, windows: list[_Window]) -> list[_Row]:
        """Rows of the windows, those with the same prefix packed together up to a context's length."""
        open_rows: dict[tuple[int, ...], _Row] = {}
        rows = []
        for i, window in enumerate(windows):
            prefix = tuple(window.ids[: len(window.ids) - window.scored + 1])
            row = open_rows.get(prefix)
            if row is not None and len(row.ids) + window.scored - 1 <= self.context:
                row.add(i, window)
                continue
            open_rows[prefix] = _Row.of(i, window)
            rows.append(open_rows[prefix])
        return rows

    def _windows(self, request: int, ids: list[int], first: int, stride: int) -> list[_Window]:
        if not 1 <= first <= len(ids):
            raise MicroGPTError(f"the first scored position must be between 1 and {len(ids)}, got {first}")
        windows = []
        for a in range(first, len(ids), stride):
            e = min(a + stride, len(ids))
            windows.append(_Window(request, ids[max(0, e - 1 - self.context) : e - 1], e - a, ids[a:e]))
        return windows

    @torch.inference_mode()
    def _run(self, batch: list[_Row], windows: list[_Window], top_k: int) -> dict[int, tuple[torch.Tensor, ...]]:
        """(log-probabilities, greedy flags, top ids, top log-probabilities) of the scored positions
        of each window in the batch's rows, by window index."""
        length = max(len(row.ids) for row in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        positions = torch.zeros_like(ids)
        segments = torch.full_like(ids, -1)
        for r, row in enumerate(batch):
            ids[r, : len(row.ids)] = torch.tensor(row.ids)
            positions[r, : len(row.ids)] = torch.tensor(row.positions)
            segments[r, : len(row.ids)] = torch.tensor(row.segments)
        layout = None
        if any(len(row.members) > 1 for row in batch):
            layout = _PackedLayout(positions.to(self.device), segments.to(self.device))
        hidden = self.model.hidden(ids.to(self.device), cache=layout)  # (B, T, C)
        members = [(r, index, columns) for r, row in enumerate(batch) for index, columns in row.members]
        rows = torch.tensor([r for r, _, columns in members for _ in columns], device=self.device)
        columns = torch.tensor([c for _, _, cs in members for c in cs], device=self.device)
        targets = torch.tensor([t for _, index, _ in members for t in windows[index].targets], device=self.device)
        scored = hidden[rows, columns]  # (N, C)
        step = max(1, LOGITS_ELEMENTS // self.model.config.vocab_size)
        parts = []
        for at in range(0, scored.size(0), step):
            parts.append(logprob_columns(self.model.logits(scored[at : at + step]), targets[at : at + step], top_k))
        flat = [torch.cat(column).cpu() for column in zip(*parts, strict=True)]
        out, at = {}, 0
        for _, index, cs in members:
            out[index] = tuple(t[at : at + len(cs)] for t in flat)
            at += len(cs)
        return out

    @staticmethod
    def _collect(parts: list[tuple[torch.Tensor, ...]]) -> Scored:
        if not parts:  # nothing to score: an empty document
            return Scored([], [], [])
        logprobs, greedy, top_ids, top_values = (torch.cat(column) for column in zip(*parts, strict=True))
        top = [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)]
        return Scored(logprobs.tolist(), greedy.tolist(), top)
