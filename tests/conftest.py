"""Fixtures shared by several test modules; keep this small."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from microgpt_cli.config import ModelConfig
from microgpt_cli.data.dataprep import prepare
from microgpt_cli.data.dataset import META_VERSION
from microgpt_cli.data.tokenizer import Tokenizer, train_char
from microgpt_cli.device import keep_freed_memory
from microgpt_cli.io import checkpoint
from microgpt_cli.model.gpt import GPT

from clitools import SHAKESPEARE, microgpt

keep_freed_memory()  # as `microgpt train` does: in-process training reuses its large buffers

# Multi-byte characters early on (bits per byte differ from nats per token); no ':' and no '€',
# which tests use as characters outside the vocabulary.
TINY_TEXT = (
    "Hello world. The quick brown fox jumps over the lazy dog.\n"
    "Hellö 日本! Grüße, naïve café, the price is 5 euros.\n"
    "Hi there, how are you? I am fine, thank you very much.\n"
) * 3


def tiny_model(vocab_size: int, **overrides: Any) -> GPT:
    """A small deterministic GPT (same seed, same weights) with a 16-token context."""
    config = dict(vocab_size=vocab_size, n_layer=2, n_head=2, n_embed=32, context=16, dropout=0.0)
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**config, **overrides})).eval()


def write_data_dir(path: Path, tokenizer: Tokenizer, train_text: str, val_text: str) -> Path:
    """A data dir in the format `microgpt prepare` writes, from texts given directly."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    splits = {}
    for split, text in (("train", train_text), ("val", val_text)):
        ids = np.asarray(tokenizer.encode(text), dtype=np.dtype(dtype).newbyteorder("<"))
        ids.tofile(path / f"{split}.bin")
        splits[split] = {"tokens": len(ids), "bytes": len(text.encode("utf-8"))}
    meta = {"version": META_VERSION, "tokenizer": tokenizer.spec, "vocab_size": tokenizer.vocab_size,
            "dtype": dtype, "splits": splits, "inputs": []}
    (path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """The tinyshakespeare corpus (1.1 MB of ASCII text) packaged with microgpt."""
    return SHAKESPEARE


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinyshakespeare prepared once by the real CLI with the char tokenizer (65 symbols)."""
    out = tmp_path_factory.mktemp("data") / "char"
    microgpt("prepare", "--sample", "tinyshakespeare", "--tokenizer", "char", "--out", out)
    return out


def _small_shakespeare(tmp_path_factory: pytest.TempPathFactory, tokenizer: str) -> Path:
    """The first fifth of tinyshakespeare prepared with `tokenizer`: full-split evaluations stay quick."""
    root = tmp_path_factory.mktemp("small")
    text = root / "shakespeare.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    prepare([text], root / "data", tokenizer=tokenizer)
    return root / "data"


@pytest.fixture(scope="session")
def small_char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _small_shakespeare(tmp_path_factory, "char")


@pytest.fixture(scope="session")
def small_gpt2_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In GPT-2 tokens: the tokenizer of a `microgpt import`."""
    return _small_shakespeare(tmp_path_factory, "gpt2")


@pytest.fixture
def char_tokenizer() -> Tokenizer:
    return train_char([TINY_TEXT])


@pytest.fixture
def data_dir(tmp_path: Path, char_tokenizer: Tokenizer) -> Path:
    """`tmp_path/data` (the default --data), whose val split is TINY_TEXT[:90]."""
    return write_data_dir(tmp_path / "data", char_tokenizer, TINY_TEXT, TINY_TEXT[:90])


@pytest.fixture
def make_checkpoint(tmp_path: Path, char_tokenizer: Tokenizer) -> Callable[..., Path]:
    """make_checkpoint(path="model.pt", **model_overrides): a tiny_model checkpoint under tmp_path."""

    def make(path: str = "model.pt", **overrides: Any) -> Path:
        target = tmp_path / path
        model = tiny_model(char_tokenizer.vocab_size, **overrides)
        checkpoint.save(target, checkpoint.Checkpoint.of(model, char_tokenizer))
        return target

    return make
