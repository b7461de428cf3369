"""Text generation: a KV-cache decoding engine, temperature / top-k / top-p sampling, and text
streamed as tokens arrive without ever splitting a UTF-8 character.

Choices (the CLI documents the same):
- Defaults: length 200, temperature 0.8, top-k 50, top-p 1.0 (off), seed 1337. Temperature 0 is
  greedy; a top-k at least the vocabulary size, or None in Python, turns top-k off.
- Output is the prompt followed by exactly `length` new tokens, unless a stop string appears in
  the new text first: the sample then ends just before it (the stop string is not output).
- An empty prompt starts from <|endoftext|> for GPT-2/tiktoken vocabularies (their document
  separator) and from "\\n" for char/bpe ones; a char vocabulary without "\\n" needs a prompt.
- Past the context window the cache slides: see `Decoder`.
"""

from __future__ import annotations

import codecs
import copy
import time
from collections.abc import Iterator
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt_cli.config import ModelConfig, SamplingSettings, is_text
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.model import GPT
from microgpt_cli.tokenizer import Tokenizer

GPT2_END_OF_TEXT = 50256
GREEDY_BELOW = 1e-30  # temperatures under this sample as 0 does: float32 cannot divide by much less


_DEFAULTS = SamplingSettings()
DEFAULT_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_K = _DEFAULTS.length, _DEFAULTS.temperature, _DEFAULTS.top_k
DEFAULT_TOP_P, DEFAULT_SEED = _DEFAULTS.top_p, _DEFAULTS.seed


class KVCache:
    """Keys and values of every layer for the tokens seen so far (implements model.KVCache).

    Preallocated at the full context so a decoding step copies one position per layer instead
    of growing tensors; `pos` is how many positions are filled, advanced by `Decoder`."""

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.context, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(2)
        self.keys[layer, :, :, self.pos : end] = k
        self.values[layer, :, :, self.pos : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # (B, nh, end, hs)


class RowMajorLinear(nn.Module):
    """nn.Linear for decoding on CPU, with its weight stored transposed and contiguous: a single
    token's matrix-vector product then runs as a row-major GEMM, about 2x faster than the BLAS
    matrix-vector kernel nn.Linear reaches (measured on the GPT-2-vocabulary head: 7 vs 15 ms)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = linear.weight.detach().t().contiguous()  # (in, out)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def decoding_model(model: GPT) -> GPT:
    """The model to decode with: on CPU an inference copy whose linear layers are RowMajorLinear;
    elsewhere (or when given such a copy) the model itself. The copy computes the same function, up
    to float summation order; converting once before several samples saves a copy per sample."""
    if model.tok_emb.weight.device.type != "cpu" or not any(isinstance(m, nn.Linear) for m in model.modules()):
        return model  # not on CPU, or converted already
    fast = copy.deepcopy(model).eval()
    for module in list(fast.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, RowMajorLinear(child))
    return fast


class Decoder:
    """Runs a model over a growing sequence with a KV cache: each new token costs one token.

    Positions never go past the context the model was trained on. When the cache is full, the
    newest `context // 2` tokens (the new one included) are kept and re-prefilled from position
    0, as the start of a fresh window. That costs a prefill of context/2 tokens once every
    context/2 steps (under one extra token per step, amortized), while the model always keeps at
    least half a window of history. Recomputing a full window each step would match a cropped
    uncached model exactly but costs `context` tokens per step."""

    def __init__(self, model: GPT, batch_size: int = 1):
        self.model = decoding_model(model)
        self.context = model.config.context
        self.keep = max(1, self.context // 2)
        weight = model.tok_emb.weight
        self.cache = KVCache(model.config, batch_size, weight.device, weight.dtype)
        # The tokens the cache holds, to re-prefill from when it slides.
        self.tokens = torch.zeros((batch_size, self.context), dtype=torch.long, device=weight.device)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start over from `ids` (B, T), of which the last `context` are kept; next-token logits (B, vocab)."""
        self.cache.pos = 0
        return self._forward(ids[:, -self.context :])

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B, 1); next-token logits (B, vocab)."""
        if self.cache.pos == self.context:
            kept = self.tokens[:, self.context - self.keep + 1 :]
            return self.prefill(torch.cat((kept, token), dim=1))
        return self._forward(token)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        start = self.cache.pos
        logits = self.model(ids, cache=self.cache)
        self.tokens[:, start : start + ids.size(1)] = ids
        self.cache.pos = start + ids.size(1)
        return logits[:, -1]


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, vocab)."""
    if temperature < GREEDY_BELOW:  # 0, or so small that it is greedy in all but float32 overflow
        return logits.argmax(dim=-1, keepdim=True)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others
    # to -inf (greedy in the limit) instead of overflowing every logit to inf and softmax to NaN.
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the likelier ones before it already cover top_p; the likeliest always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[:, 0] = False  # even where top_p rounds to 0 in float32
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)


class Detokenizer:
    """Token ids in, text pieces out: bytes are decoded incrementally so a character split across
    tokens comes out whole, and text that could be the start of the stop string is held back
    until it is known not to be."""

    def __init__(self, tokenizer: Tokenizer, stop: str | None = None):
        self.tokenizer = tokenizer
        self.stop = stop
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
        if not self.stop:
            self._pending = ""
            return pending
        at = pending.find(self.stop)
        if at >= 0:
            self.stopped, self._pending = True, ""
            return pending[:at]
        longest = min(len(self.stop) - 1, len(pending))
        hold = next((n for n in range(longest, 0, -1) if pending.endswith(self.stop[:n])), 0)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids generation starts from; an empty prompt starts from a document boundary."""
    if not is_text(text):
        raise MicroGPTError("the prompt is not valid text (it holds bytes that are not UTF-8); pass UTF-8 text")
    if text:
        return tokenizer.encode(text)
    if tokenizer.kind == "gpt2":
        return [GPT2_END_OF_TEXT]
    if tokenizer.kind == "tiktoken":
        return [tiktoken.get_encoding(tokenizer.name).eot_token]
    try:
        return tokenizer.encode("\n")
    except MicroGPTError:
        raise MicroGPTError("this char tokenizer has no newline to start an empty prompt from; pass --prompt") from None


class TextStream:
    """An iterator of text pieces: the prompt, then the new text as it is sampled. After it is
    exhausted, `new_ids`, `new_tokens` and `seconds` say what was generated and how fast."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, prompt: str, settings: SamplingSettings,
                 generator: torch.Generator | None):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.settings = settings
        self.generator = generator
        self.ids = prompt_ids(tokenizer, prompt)  # encode now, so a bad prompt fails before any output
        self.new_ids: list[int] = []
        self.seconds = 0.0
        self._pieces = self._run()

    @property
    def new_tokens(self) -> int:
        return len(self.new_ids)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        if self.prompt:
            yield self.prompt
        if self.settings.length == 0:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._sample()
        finally:
            self.model.train(was_training)

    def _sample(self) -> Iterator[str]:
        s = self.settings
        # A model whose vocabulary is padded past the tokenizer's must not pick ids that decode to nothing.
        vocab = min(self.model.config.vocab_size, self.tokenizer.vocab_size)
        text = Detokenizer(self.tokenizer, s.stop)
        decoder = Decoder(self.model)
        device = decoder.tokens.device
        start = time.perf_counter()
        try:
            # inference_mode is entered per call, never across a yield, so the caller's code between
            # pieces does not run with autograd off.
            with torch.inference_mode():
                logits = decoder.prefill(torch.tensor([self.ids], dtype=torch.long, device=device))
            for i in range(s.length):
                with torch.inference_mode():
                    token = sample_next(logits[:, :vocab], s.temperature, s.top_k, s.top_p, self.generator)
                    if i + 1 < s.length:
                        logits = decoder.step(token)  # queued before the sync below, which it does not need
                self.new_ids.append(int(token))  # the one host sync per token, needed to stream anyway
                piece = text.push(self.new_ids[-1])
                if piece:
                    yield piece
                if text.stopped:
                    return
            tail = text.finish()
            if tail:
                yield tail
        finally:
            self.seconds = time.perf_counter() - start


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The one random stream of a generation: the same seed gives the same text."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def load_model(model: GPT | str | Path, tokenizer: Tokenizer | None, device: str = "auto") -> tuple[GPT, Tokenizer]:
    """A GPT with its tokenizer, or a checkpoint file / run dir, which brings its own."""
    if isinstance(model, GPT):
        if tokenizer is None:
            raise MicroGPTError("pass tokenizer= along with a GPT model, or pass a checkpoint path instead")
        return model, tokenizer
    if tokenizer is not None:
        raise MicroGPTError("a checkpoint brings its own tokenizer; pass tokenizer= only with a GPT model")
    from microgpt_cli.checkpoint import load_checkpoint
    from microgpt_cli.device import resolve_device

    return load_checkpoint(model, resolve_device(device))


def stream_text(
    model: GPT | str | Path,
    start_text: str = "",
    length: int = DEFAULT_LENGTH,
    tokenizer: Tokenizer | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = DEFAULT_SEED,
    stop: str | None = None,
    device: str = "auto",
) -> TextStream:
    """Text pieces of one sample as they are produced: `start_text`, then up to `length` new tokens.

    `model` is a GPT (then `tokenizer` is required) or a checkpoint file / run dir (loaded on
    `device`). Options are checked and the prompt encoded before this returns."""
    settings = SamplingSettings(length, temperature, top_k, top_p, stop, seed)
    gpt, tok = load_model(model, tokenizer, device)
    return TextStream(gpt, tok, start_text, settings, make_generator(gpt.tok_emb.weight.device, seed))


def generate_text(
    model: GPT | str | Path,
    start_text: str = "",
    length: int = DEFAULT_LENGTH,
    tokenizer: Tokenizer | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = DEFAULT_SEED,
    stop: str | None = None,
    device: str = "auto",
) -> str:
    """`start_text` and its continuation as one string; see `stream_text`."""
    return "".join(stream_text(model, start_text, length, tokenizer, temperature, top_k, top_p, seed, stop, device))
