"""microgpt as a model of EleutherAI's lm-evaluation-harness. The harness brings the tasks, their
prompts, metrics and results dict; this adapter only turns its requests into the engine's scoring
and decoding calls.

- `loglikelihood` is TemplateLM's: it turns (context, continuation) text into ids as the harness's
  own `hf` model does (spaces at the end of the context move to the continuation; the pair is
  encoded whole and cut where the context's ids end), so both score the same tokens.
- `loglikelihood_rolling` scores every token of a document after the document-start token in the
  harness's windows (infer/scoring.py's default stride reproduces them).
- `generate_until` decodes greedily (or samples when a task asks) in batches, stopping at the
  task's `until` strings or the end-of-text token, as the `hf` model does.

lm_eval is an optional extra and takes seconds to import, so only `microgpt eval --tasks` imports
this module (through `evaluation.evaluate_tasks`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.tasks import TaskManager

from microgpt_cli.config import SamplingSettings
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.sampling import Sampler, prompt_ids
from microgpt_cli.infer.scoring import Scorer

Progress = Callable[[str, int, int], None]  # (request kind, done, total)
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}


class MicroGPTLM(TemplateLM):
    """A sampler's model and tokenizer as the harness sees a model."""

    def __init__(self, sampler: Sampler, batch_size: int, on_progress: Progress | None = None,
                 info: dict[str, Any] | None = None):
        super().__init__()
        self.sampler = sampler
        self.scorer = Scorer(sampler.engine, batch_size)
        self.on_progress = on_progress
        self.info = info or {}

    @property
    def eot_token_id(self) -> int:
        """The document start a continuation without context, or a rolling document, is read
        after: the end-of-text token where the vocabulary has one, else "\\n" (what `generate`
        starts an empty prompt from)."""
        return prompt_ids(self.sampler.tokenizer, "")[0]

    @property
    def max_length(self) -> int:
        return self.sampler.engine.context

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.sampler.tokenizer.encode(string)

    def _progress(self, kind: str) -> Callable[[int, int], None] | None:
        report = self.on_progress
        return None if report is None else lambda done, total: report(kind, done, total)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # microgpt shows its own progress

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        scored = self.scorer.score([(context, continuation) for _, context, continuation in requests],
                                   on_progress=self._progress("loglikelihood"))
        return [(s.logprob, s.is_greedy) for s in scored]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        documents = [self.tok_encode(request.args[0]) for request in requests]
        scored = self.scorer.rolling(documents, self.prefix_token_id,
                                     on_progress=self._progress("loglikelihood_rolling"))
        return [s.logprob for s in scored]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same generation settings decode together
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        texts = [""] * len(requests)
        slots, done = self.sampler.engine.slots, 0
        for rows in groups.values():
            settings, stops = self._generation(requests[rows[0]].args[1])
            for at in range(0, len(rows), slots):
                chunk = rows[at : at + slots]
                pieces: list[list[str]] = [[] for _ in chunk]
                for row, piece in self.sampler.batch([requests[i].args[0] for i in chunk], settings, stops, echo=False):
                    pieces[row].append(piece)
                for i, parts in zip(chunk, pieces, strict=True):
                    texts[i] = "".join(parts)
                done += len(chunk)
                if self.on_progress is not None:
                    self.on_progress("generate_until", done, len(requests))
        return texts

    def _generation(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingSettings, list[str]]:
        """A task's generation settings as microgpt's, and its stop strings."""
        unknown = sorted(set(gen_kwargs) - GENERATION_KEYS - {"max_new_tokens", "max_tokens", "max_completion_tokens"})
        if unknown:
            raise MicroGPTError(f"the task asks for generation settings microgpt does not have: {', '.join(unknown)}")
        kwargs = normalize_gen_kwargs(gen_kwargs)
        tokenizer = self.sampler.tokenizer
        stops = handle_stop_sequences(kwargs.get("until"), None if tokenizer.eot_id is None
                                      else tokenizer.decode([tokenizer.eot_id]))
        temperature = float(kwargs["temperature"]) if kwargs.get("do_sample") else 0.0
        top_k = kwargs.get("top_k")
        settings = SamplingSettings(length=int(kwargs["max_gen_toks"]), temperature=temperature,
                                    top_k=None if top_k is None else int(top_k),
                                    top_p=float(kwargs.get("top_p") or 1.0))
        return settings, [s for s in stops if s]

    def get_model_info(self) -> dict[str, Any]:
        return self.info


def run_tasks(sampler: Sampler, tasks: Sequence[str], include_path: Path | None = None, limit: float | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, on_progress: Progress | None = None,
              info: dict[str, Any] | None = None, log_samples: bool = False) -> dict[str, Any]:
    """The harness's results dict for `tasks` (names from its registry or YAML files under
    `include_path`) scored with `sampler`'s model."""
    manager = _task_manager(tasks, include_path)
    model = MicroGPTLM(sampler, batch_size, on_progress, info)
    # The harness logs every step at INFO; its warnings stay (through Python's last-resort handler).
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    results = simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=log_samples, batch_size=batch_size,
                              device=str(sampler.engine.device))
    if results is None:  # only under several processes, which microgpt never starts
        raise MicroGPTError("lm-evaluation-harness returned no results")
    return results


def _task_manager(tasks: Sequence[str], include_path: Path | None) -> TaskManager:
    """A TaskManager that knows `tasks`. Indexing the harness's ~14,000 registered tasks takes
    seconds, so tasks that are all found under `include_path` are loaded from there alone."""
    if include_path is not None:
        if not include_path.is_dir():
            raise MicroGPTError(f"--include-path {include_path} is not a directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        where = f" or under {include_path}" if include_path is not None else " (pass --include-path DIR for your own)"
        raise MicroGPTError(f"unknown task {', '.join(map(repr, unknown))}: not in lm-evaluation-harness's "
                            f"registry{where}")
    return manager
