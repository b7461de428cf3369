"""Continuous batching: many concurrent requests decoded together through one engine.

A background thread owns the engine. Each step it admits waiting requests into free slots (one
slot per sample; a prompt is prefilled once and forked for its n samples), samples one token for
every active slot, hands each request its new text, and frees the slots of finished or cancelled
requests. So a request joins at the next step boundary instead of waiting for the batch in front
of it, and a client that goes away frees its slots at the next step.

Requests are id-level plus text: the batcher detokenizes (never splitting a UTF-8 character) and
applies stop strings, so a server only moves text. A request that asks for log-probabilities gets
each new token's, with its likeliest alternatives, beside the text. `call` runs other work that
needs the engine (scoring a prompt) on the same thread, between two steps.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from microgpt_cli.infer.engine import count_sampled, make_generators, sample_next
from microgpt_cli.infer.sampling import Detokenizer, Sampler
from microgpt_cli.infer.scoring import TokenLogprob, logprobs_of

log = logging.getLogger("microgpt.serve")


@dataclass(frozen=True)
class Piece:
    """New text of one sample of a request (`index`), or its end when `finish_reason` is set
    ("stop": a stop string, the end-of-text token or one of the request's stop ids; "length":
    max_tokens reached or the server is stopping; "error": decoding failed, which the server logs)."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0  # the sample's completion tokens so far
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens sampled since the last piece, if the request asked


@dataclass
class Request:
    """One prompt to continue `n` times; `deliver` gets Pieces from the batcher's thread."""

    ids: list[int]
    max_tokens: int
    n: int
    temperature: float
    top_k: int | None
    top_p: float
    stop: Sequence[str]
    seed: int | None
    deliver: Callable[[Piece], None]
    cancelled: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # report each new token's log-probability and this many likeliest alternatives
    stop_ids: frozenset[int] = frozenset()  # tokens that end a sample unseen (a chat template's end of turn)

    def end_unstarted(self) -> None:
        """End every sample of a request that never took a slot (finish_reason "length")."""
        for i in range(self.n):
            self.deliver(Piece(i, "", "length"))


@dataclass
class _Sample:
    request: Request
    index: int
    text: Detokenizer
    generator: torch.Generator
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet delivered


class Batcher:
    """Decodes the requests given to `submit` in batches of up to `sampler.engine.slots` samples."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.engine = sampler.engine
        self.slots: list[_Sample | None] = [None] * self.engine.slots
        self.logits = torch.zeros((self.engine.slots, sampler.vocab), device=self.engine.device)
        self.counts = torch.zeros_like(self.logits)  # tokens each slot has sampled, for the penalties
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self.eot = sampler.tokenizer.eot_id
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="microgpt-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        if request.n > self.engine.slots:
            raise ValueError(f"n={request.n} is more than the {self.engine.slots} slots")
        self.waiting.put(request)
        self._wake.set()

    def call(self, work: Callable[[], Any]) -> Future[Any]:
        """Run `work` on the batcher's thread between two steps; its result or exception in the future."""
        future: Future[Any] = Future()
        self.calls.put((work, future))
        self._wake.set()
        return future

    def request_stop(self) -> None:
        """End every request at the next step (finish_reason "length"), then stop the thread."""
        self._stopping.set()
        self._wake.set()

    def stop(self) -> None:
        """request_stop, and wait for the thread to end."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._run_calls()
                try:
                    self._admit()
                    if self.active == 0:  # idle: sleep until a request arrives
                        self._wake.wait(timeout=1.0)
                        self._wake.clear()
                        continue
                    self._step()
                except Exception:  # a bug, or out of memory: fail the batch, keep serving
                    log.exception("decoding failed; the requests in the batch get an error")
                    for slot, sample in enumerate(self.slots):
                        if sample is not None:
                            self._finish(slot, "error")
            for slot, sample in enumerate(self.slots):
                if sample is not None:
                    self._finish(slot, "length")
            while not self.waiting.empty():
                self.waiting.get().end_unstarted()
            while not self.calls.empty():
                self.calls.get()[1].cancel()

    def _run_calls(self) -> None:
        while not self.calls.empty():
            work, future = self.calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except Exception as exc:  # the caller sees it
                    future.set_exception(exc)

    def _admit(self) -> None:
        """Move waiting requests into free slots, first come first served."""
        while not self.waiting.empty():
            free = [slot for slot, sample in enumerate(self.slots) if sample is None]
            request = self.waiting.queue[0]
            if request.cancelled:
                self.waiting.get()
                continue
            if request.max_tokens == 0:
                self.waiting.get().end_unstarted()
                continue
            if len(free) < request.n:
                return
            self.waiting.get()
            slots = free[: request.n]
            try:
                self.logits[slots[0]] = self.engine.prefill(slots[0], request.ids)[: self.sampler.vocab]
                self.engine.fork(slots[0], slots[1:])
            except Exception:  # checkpoints are checked at load, so a bug: this request fails, not the batch
                log.exception("admitting a request failed; it gets an error")
                for slot in slots:
                    self.engine.release(slot)
                for i in range(request.n):
                    request.deliver(Piece(i, "", "error"))
                continue
            self.logits[slots[1:]] = self.logits[slots[0]].clone()
            self.counts[slots] = 0
            generators = make_generators(self.engine.device, request.seed, request.n)
            for i, slot in enumerate(slots):
                self.slots[slot] = _Sample(request, i, Detokenizer(self.sampler.tokenizer, request.stop), generators[i])

    def _step(self) -> None:
        active = [slot for slot, sample in enumerate(self.slots) if sample is not None]
        n = active[-1] + 1
        tokens = torch.zeros(n, dtype=torch.long, device=self.engine.device)
        # Rows that sample alike are sampled together; each keeps its own random stream.
        groups: dict[tuple[float, int | None, float, float, float], list[int]] = {}
        for slot in active:
            r = self.slots[slot].request  # type: ignore[union-attr]
            groups.setdefault((r.temperature, r.top_k, r.top_p, r.frequency_penalty, r.presence_penalty),
                              []).append(slot)
        for (temperature, top_k, top_p, frequency, presence), rows in groups.items():
            generators = [self.slots[row].generator for row in rows]  # type: ignore[union-attr]
            tokens[rows] = sample_next(self.logits[rows], temperature, top_k, top_p, generators, self.counts[rows],
                                       frequency, presence)
        count_sampled(self.counts[:n], tokens)
        reported = self._logprobs(active, tokens)
        new = tokens.tolist()
        for slot in active:
            self._deliver(slot, new[slot], reported.get(slot))
        for slot in range(n):
            if self.slots[slot] is None:
                self.engine.release(slot)
        self.logits[:n] = self.engine.step(tokens)[:, : self.sampler.vocab]

    def _logprobs(self, active: list[int], tokens: torch.Tensor) -> dict[int, TokenLogprob]:
        """The sampled tokens' log-probabilities under the model (before temperature and
        penalties), for the slots whose request asks for them."""
        rows = [slot for slot in active if self.slots[slot].request.logprobs is not None]  # type: ignore[union-attr]
        if not rows:
            return {}
        top_k = max(self.slots[slot].request.logprobs or 0 for slot in rows)  # type: ignore[union-attr]
        found = logprobs_of(self.logits[rows], tokens[rows], top_k)
        return {slot: found[i].keep(self.slots[slot].request.logprobs or 0)  # type: ignore[union-attr]
                for i, slot in enumerate(rows)}

    def _deliver(self, slot: int, token: int, logprob: TokenLogprob | None = None) -> None:
        sample = self.slots[slot]
        assert sample is not None
        if sample.request.cancelled:
            self._finish(slot, None)
            return
        if token == self.eot or token in sample.request.stop_ids:
            self._finish(slot, "stop")
            return
        sample.tokens += 1
        if logprob is not None:
            sample.logprobs.append(logprob)
        piece = sample.text.push(token)
        if piece:
            sample.request.deliver(Piece(sample.index, piece, tokens=sample.tokens,
                                         logprobs=self._take_logprobs(sample)))
        if sample.text.stopped:
            self._finish(slot, "stop")
        elif sample.tokens >= sample.request.max_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str | None) -> None:
        sample = self.slots[slot]
        assert sample is not None
        self.slots[slot] = None
        self.engine.release(slot)
        if reason is not None:  # the final piece carries text held back so far (none after a stop string)
            sample.request.deliver(Piece(sample.index, sample.text.finish(), reason, sample.tokens,
                                         self._take_logprobs(sample)))

    @staticmethod
    def _take_logprobs(sample: _Sample) -> tuple[TokenLogprob, ...]:
        taken = tuple(sample.logprobs)
        sample.logprobs.clear()
        return taken
