"""OpenAI's log-probability objects, built from the engine's numbers.

- Completions (the legacy format vLLM also returns): `tokens`, `token_logprobs`, `top_logprobs`
  and `text_offset`, one entry per token. With `echo` the prompt's tokens come first, its first
  token with `null`s (nothing precedes it to predict it from). Each `top_logprobs` entry maps the
  likeliest tokens' texts to their log-probabilities, and always holds the token itself too.
- Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`.

A token's text is its bytes as UTF-8; a token that holds only part of a character is written as
OpenAI writes one, "bytes:" and the escaped bytes ("bytes:\\xe6\\x97"), so that two such tokens
never share a key. `text_offset` counts characters of the returned text before each token (a token
that ends inside a character starts where that character does).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from microgpt_cli.data.tokenizer import Tokenizer
from microgpt_cli.infer.scoring import Scored, TokenLogprob

LOWEST = -9999.0  # what a log-probability of -inf is sent as (JSON has no infinity), as vLLM does


def token_text(tokenizer: Tokenizer, token: int) -> str:
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _number(logprob: float) -> float:
    return max(logprob, LOWEST)


def prompt_entries(ids: Sequence[int], scored: Scored) -> list[tuple[int, TokenLogprob | None]]:
    """The prompt's tokens for an echo: the first without a log-probability, then each scored one."""
    entries: list[tuple[int, TokenLogprob | None]] = [(ids[0], None)]
    for token, logprob, top in zip(ids[1:], scored.logprobs, scored.top, strict=True):
        entries.append((token, TokenLogprob(token, logprob, tuple(top))))
    return entries


class CompletionLogprobs:
    """The `logprobs` object of one completions choice, built piece by piece: `add` returns the
    part for the tokens given (a stream chunk's), and `whole` the object for all of them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.characters = 0
        self.all: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, entries: Sequence[tuple[int, TokenLogprob | None]]) -> dict[str, list[Any]]:
        part: dict[str, list[Any]] = {key: [] for key in self.all}
        for token, scored in entries:
            part["tokens"].append(token_text(self.tokenizer, token))
            part["text_offset"].append(self.characters)
            self.characters += len(self.utf8.decode(self.tokenizer.token_bytes(token)))
            if scored is None:
                part["token_logprobs"].append(None)
                part["top_logprobs"].append(None)
                continue
            part["token_logprobs"].append(_number(scored.logprob))
            top = {token_text(self.tokenizer, t): _number(lp) for t, lp in scored.top}
            top.setdefault(part["tokens"][-1], _number(scored.logprob))
            part["top_logprobs"].append(top)
        for key, values in part.items():
            self.all[key].extend(values)
        return part

    def whole(self) -> dict[str, list[Any]]:
        return self.all


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's `logprobs` object for the tokens given."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": _number(logprob),
                "bytes": list(tokenizer.token_bytes(token))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}
