"""Text generation on top of the engine: prompts in, text out, streamed as tokens arrive without
ever splitting a UTF-8 character, with stop strings. `Sampler` is the one object that
`microgpt generate`, the Python API and the server sample through.

Choices (the CLI documents the same):
- Defaults: length 200, temperature 0.8, top-k 50, top-p 1.0 (off), seed 1337. Temperature 0 is
  greedy; a top-k at least the vocabulary size, or None in Python, turns top-k off.
- Output is the prompt followed by exactly `length` new tokens, unless a stop string appears in
  the new text first: the sample then ends just before it (the stop string is not output).
- Several samples are decoded as one batch. Sample i draws its randomness from seed + i, so it is
  the same text whether decoded alone (with that seed) or in a batch.
- `frequency_penalty` and `presence_penalty` (0: off) lower the logits of tokens the sample has
  already produced, as OpenAI's API defines them (the prompt's tokens do not count).
- An empty prompt starts from the end-of-text token where the vocabulary has one (GPT-2 and
  tiktoken: their document separator) and from "\n" for char/bpe ones; a char vocabulary without
  "\n" needs a prompt.
- Past the context window the cache slides: see `engine.Engine`.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import torch

from microgpt_cli.config import SamplingSettings, check_threads, is_text, stop_strings
from microgpt_cli.data.tokenizer import Tokenizer
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.engine import Engine, count_sampled, make_generators, sample_next
from microgpt_cli.model.gpt import GPT

_DEFAULTS = SamplingSettings()
DEFAULT_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_K = _DEFAULTS.length, _DEFAULTS.temperature, _DEFAULTS.top_k
DEFAULT_TOP_P, DEFAULT_SEED = _DEFAULTS.top_p, _DEFAULTS.seed


class Detokenizer:
    """Token ids in, text pieces out: bytes are decoded incrementally so a character split across
    tokens comes out whole, and text that could be the start of a stop string is held back until
    it is known not to be. `stop` is one string or several (the earliest match ends the text)."""

    def __init__(self, tokenizer: Tokenizer, stop: str | Sequence[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in ([stop] if isinstance(stop, str) else stop or ()) if s)
        self.stopped = False
        # "replace" only fires for bytes that can never become valid UTF-8 (or, at finish(), an
        # incomplete tail); an incomplete character is buffered until its other bytes arrive.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def push(self, token: int) -> str:
        return self._emit(self._utf8.decode(self.tokenizer.token_bytes(token)))

    def finish(self) -> str:
        text = self._emit(self._utf8.decode(b"", final=True))
        text, self._pending = text + self._pending, ""
        return text

    def _emit(self, text: str) -> str:
        if self.stopped:
            return ""
        pending = self._pending + text
        if not self.stops:
            self._pending = ""
            return pending
        found = [at for at in (pending.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.stopped, self._pending = True, ""
            return pending[: min(found)]
        hold = max(self._partial(pending, stop) for stop in self.stops)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """The length of the longest end of `text` that starts `stop`."""
        return next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])), 0)


def prompt_ids(tokenizer: Tokenizer, text: str, special: bool = False) -> list[int]:
    """The ids generation starts from; an empty prompt starts from a document boundary. With
    `special`, special-token strings in the text are those tokens (see Tokenizer.encode_special)."""
    if not is_text(text):
        raise MicroGPTError("the prompt is not valid text (it holds bytes that are not UTF-8); pass UTF-8 text")
    if text:
        return tokenizer.encode_special(text) if special else tokenizer.encode(text)
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n")
    except MicroGPTError:
        raise MicroGPTError("this char tokenizer has no newline to start an empty prompt from; pass --prompt") from None


class Sampler:
    """A model and its tokenizer, ready to sample text in batches of up to `slots` samples.

    Build one and sample from it many times: the engine's model (its weights laid out for
    decoding: oneDNN-packed, int8 or bf16) and its cache are made once. `in_place` and `threads`:
    see Engine."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, slots: int = 1, quantize: str | None = None, *,
                 in_place: bool = False, threads: int | None = None):
        self.engine = Engine(model, slots, quantize, in_place=in_place, threads=threads)
        self.tokenizer = tokenizer
        # A model whose vocabulary is padded past the tokenizer's must not pick ids that decode to nothing.
        self.vocab = min(model.config.vocab_size, tokenizer.vocab_size)

    def batch(self, prompts: Sequence[str | Sequence[int]], settings: SamplingSettings, stops: Sequence[str] = (),
              echo: bool = True, stop_ids: Collection[int] = ()) -> BatchStream:
        """One sample per prompt, decoded together; see BatchStream."""
        return BatchStream(self, prompts, settings, stops, echo, stop_ids)

    def stream(self, prompt: str | Sequence[int], settings: SamplingSettings, stops: Sequence[str] = (),
               stop_ids: Collection[int] = ()) -> TextStream:
        """One sample of `prompt`, as text pieces; see TextStream."""
        return TextStream(self.batch([prompt], settings, stops, stop_ids=stop_ids))


class BatchStream:
    """Samples of several prompts decoded as one batch: iterates (row, text piece) pairs, first
    each text prompt (unless not `echo`; a prompt given as token ids, a rendered chat, never is),
    then the new text of every row as it is sampled. A row ends at `settings.stop` or any of
    `stops`, or at a token of `stop_ids` (a chat template's end of turn), which is neither output
    nor counted. After it is exhausted, `new_ids`, `stopped` (whether each row ended at a stop
    rather than at the length), `seconds` and `first_token_seconds` say what was generated and
    how fast.

    Prompts and settings are checked before any decoding, so a bad one fails before any output."""

    def __init__(self, sampler: Sampler, prompts: Sequence[str | Sequence[int]], settings: SamplingSettings,
                 stops: Sequence[str] = (), echo: bool = True, stop_ids: Collection[int] = ()):
        if not 1 <= len(prompts) <= sampler.engine.slots:
            raise MicroGPTError(f"this sampler decodes 1 to {sampler.engine.slots} prompts at once, got {len(prompts)}")
        self.sampler = sampler
        self.prompts = [p if isinstance(p, str) else "" for p in prompts]
        self.settings = settings
        self.stops = [*stop_strings(settings.stop), *stops]
        self.echo = echo
        self.stop_ids = frozenset(stop_ids)
        self.ids = [prompt_ids(sampler.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
        if not all(self.ids):
            raise MicroGPTError("a prompt of token ids must not be empty")
        self.new_ids: list[list[int]] = [[] for _ in self.prompts]
        self.stopped = [False] * len(self.prompts)
        self.seconds = 0.0  # from the start of the prefill to the last token
        self.first_token_seconds = 0.0
        self._events = self._run()

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.new_ids))

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._events)

    def _run(self) -> Iterator[tuple[int, str]]:
        for row, prompt in enumerate(self.prompts):
            if prompt and self.echo:
                yield row, prompt
        if self.settings.length > 0:
            yield from self._sample()

    def _prefill(self) -> torch.Tensor:
        """Next-token logits (n, vocab) of every prompt; a prompt repeated is prefilled once."""
        engine, rows = self.sampler.engine, list[torch.Tensor]()
        for row, ids in enumerate(self.ids):
            first = self.ids.index(ids)
            if first < row:
                engine.fork(first, [row])
                rows.append(rows[first])
            else:
                rows.append(engine.prefill(row, ids))
        return torch.stack(rows)

    def _sample(self) -> Iterator[tuple[int, str]]:
        s, engine, n = self.settings, self.sampler.engine, len(self.prompts)
        texts = [Detokenizer(self.sampler.tokenizer, self.stops) for _ in range(n)]
        generators = make_generators(engine.device, s.seed, n)
        penalized = bool(s.frequency_penalty or s.presence_penalty)
        counts = torch.zeros((n, self.sampler.vocab), device=engine.device) if penalized else None
        # A GPU computes the next step while the host reads and streams these tokens; on a CPU the
        # step would only delay them, so it runs after they are out.
        overlap = engine.device.type != "cpu"
        start = time.perf_counter()
        try:
            # inference_mode is entered per call, never across a yield, so the caller's code between
            # pieces does not run with autograd off.
            with torch.inference_mode():
                logits = self._prefill()
            for i in range(s.length):
                with torch.inference_mode():
                    tokens = sample_next(logits[:, : self.sampler.vocab], s.temperature, s.top_k, s.top_p, generators,
                                         counts, s.frequency_penalty, s.presence_penalty)
                    if counts is not None:
                        count_sampled(counts, tokens)
                    if overlap and i + 1 < s.length:
                        logits = engine.step(tokens)  # queued before the sync below, which it does not need
                new = tokens.tolist()  # the one host sync per step, needed to stream anyway
                if i == 0:
                    self.first_token_seconds = time.perf_counter() - start
                for row, text in enumerate(texts):
                    if text.stopped:
                        continue  # a finished row rides along until the batch ends
                    if new[row] in self.stop_ids:
                        piece = text.finish()
                        text.stopped = True
                    else:
                        self.new_ids[row].append(new[row])
                        piece = text.push(new[row])
                    if piece:
                        yield row, piece
                if all(text.stopped for text in texts):
                    return
                if not overlap and i + 1 < s.length:
                    with torch.inference_mode():
                        logits = engine.step(tokens)
            for row, text in enumerate(texts):
                tail = text.finish()
                if tail:
                    yield row, tail
        finally:
            self.seconds = time.perf_counter() - start
            self.stopped = [text.stopped for text in texts]


class TextStream:
    """The text pieces of one sample: the prompt, then the new text as it is sampled. After it is
    exhausted, `new_ids`, `new_tokens`, `seconds` and `first_token_seconds` say what was generated."""

    def __init__(self, batch: BatchStream):
        self.batch = batch

    @property
    def new_ids(self) -> list[int]:
        return self.batch.new_ids[0]

    @property
    def new_tokens(self) -> int:
        return len(self.new_ids)

    @property
    def seconds(self) -> float:
        return self.batch.seconds

    @property
    def first_token_seconds(self) -> float:
        return self.batch.first_token_seconds

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self.batch)[1]


def load_model(model: GPT | str | Path, tokenizer: Tokenizer | None, device: str = "auto") -> tuple[GPT, Tokenizer]:
    """A GPT with its tokenizer, or a checkpoint file / run dir, which brings its own."""
    if isinstance(model, GPT):
        if tokenizer is None:
            raise MicroGPTError("pass tokenizer= along with a GPT model, or pass a checkpoint path instead")
        return model, tokenizer
    if tokenizer is not None:
        raise MicroGPTError("a checkpoint brings its own tokenizer; pass tokenizer= only with a GPT model")
    from microgpt_cli.device import resolve_device
    from microgpt_cli.io.checkpoint import load_checkpoint

    return load_checkpoint(model, resolve_device(device), mapped=True)


def load_sampler(model: GPT | str | Path, tokenizer: Tokenizer | None = None, device: str = "auto",
                 slots: int = 1, quantize: str | None = None, threads: int | None = None) -> Sampler:
    """A Sampler for a GPT (then `tokenizer` is required; the GPT is left as it is) or a
    checkpoint file / run dir (loaded on `device`), decoding up to `slots` samples at once;
    `quantize="int8"` on CPU; `threads`, the most CPU threads a call uses (default: torch's)."""
    check_threads(threads)  # before loading: a bad setting fails fast
    gpt, tok = load_model(model, tokenizer, device)
    return Sampler(gpt, tok, slots, quantize, in_place=not isinstance(model, GPT), threads=threads)


def stream_text(
    model: GPT | str | Path,
    start_text: str = "",
    length: int = DEFAULT_LENGTH,
    tokenizer: Tokenizer | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = DEFAULT_SEED,
    stop: str | Sequence[str] | None = None,
    device: str = "auto",
    quantize: str | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    threads: int | None = None,
) -> TextStream:
    """Text pieces of one sample as they are produced: `start_text`, then up to `length` new tokens.

    `model` is a GPT (then `tokenizer` is required) or a checkpoint file / run dir (loaded on
    `device`). `threads` is the most CPU threads a call uses (default: torch's). Options are
    checked and the prompt encoded before this returns."""
    settings = SamplingSettings(length, temperature, top_k, top_p, stop, seed, frequency_penalty, presence_penalty)
    return load_sampler(model, tokenizer, device, 1, quantize, threads).stream(start_text, settings)


def generate_text(
    model: GPT | str | Path,
    start_text: str = "",
    length: int = DEFAULT_LENGTH,
    tokenizer: Tokenizer | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = DEFAULT_SEED,
    stop: str | Sequence[str] | None = None,
    device: str = "auto",
    quantize: str | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    threads: int | None = None,
) -> str:
    """`start_text` and its continuation as one string; see `stream_text`."""
    return "".join(stream_text(model, start_text, length, tokenizer, temperature, top_k, top_p, seed, stop,
                               device, quantize, frequency_penalty, presence_penalty, threads))


def generate_texts(
    model: GPT | str | Path,
    prompts: Sequence[str],
    length: int = DEFAULT_LENGTH,
    tokenizer: Tokenizer | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = DEFAULT_SEED,
    stop: str | Sequence[str] | None = None,
    device: str = "auto",
    quantize: str | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    threads: int | None = None,
) -> list[str]:
    """One sample per prompt, decoded as one batch: `generate_texts(model, ["hello"] * 8)` gives
    8 samples of "hello". Sample i draws from seed + i (see the module doc)."""
    settings = SamplingSettings(length, temperature, top_k, top_p, stop, seed, frequency_penalty, presence_penalty)
    pieces: list[list[str]] = [[] for _ in prompts]
    sampler = load_sampler(model, tokenizer, device, max(1, len(prompts)), quantize, threads)
    for row, piece in sampler.batch(prompts, settings):
        pieces[row].append(piece)
    return ["".join(p) for p in pieces]
