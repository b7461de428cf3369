"""Exact evaluation against a hand computation, on tiny checkpoints and data dirs."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from microgpt_cli.cli import main
from microgpt_cli.data.dataset import open_split, read_meta
from microgpt_cli.data.tokenizer import Tokenizer, named, train_bpe, train_char
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.evaluation import EvalResult, evaluate, split_loss
from microgpt_cli.io import checkpoint
from microgpt_cli.io.checkpoint import load_checkpoint
from microgpt_cli.progress import eval_table

from conftest import TINY_TEXT, tiny_model, write_data_dir


def hand_nll(model: torch.nn.Module, tokens: list[int], context: int) -> list[float]:
    """-log p(token i) for i = 1..N-1, each predicted from the non-overlapping context window holding i-1."""
    nll = []
    with torch.no_grad():
        for i in range(1, len(tokens)):
            start = (i - 1) // context * context
            logits = model(torch.tensor([tokens[start:i]]))[0, -1]
            nll.append(-torch.log_softmax(logits.double(), dim=-1)[tokens[i]].item())
    return nll


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_evaluate_matches_a_hand_computation(
    batch_size: int, make_checkpoint: Callable[..., Path], data_dir: Path, char_tokenizer: Tokenizer
) -> None:
    path = make_checkpoint()
    model, _ = load_checkpoint(path)
    val = open_split(data_dir, "val", read_meta(data_dir)).tolist()
    nll = hand_nll(model, val, model.config.context)
    nbytes = sum(len(char_tokenizer.decode([t]).encode("utf-8")) for t in val[1:])
    assert nbytes > len(val) - 1  # the text has multi-byte characters, so bytes and tokens differ

    result = evaluate(path, data_dir, batch_size=batch_size, device="cpu")
    assert result.tokens == len(val) - 1 == len(nll)
    assert result.loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(sum(nll) / math.log(2) / nbytes, rel=1e-5)
    assert result.seconds >= 0
    assert set(result.to_dict()) == {"loss", "perplexity", "bits_per_byte", "tokens", "seconds"}


def test_split_loss_prefix_and_batching_agree(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size, position="rope")
    tokens = np.asarray(char_tokenizer.encode(TINY_TEXT), dtype=np.uint16)
    nll = hand_nll(model, tokens.tolist(), model.config.context)
    widths = char_tokenizer.bytes_per_token()
    total, count, nbytes = split_loss(model, tokens, 3, "cpu", token_bytes=widths)
    assert count == len(tokens) - 1 and nbytes == len(TINY_TEXT.encode("utf-8")) - len(TINY_TEXT[0].encode("utf-8"))
    assert total == pytest.approx(sum(nll), rel=1e-5)
    shards = [split_loss(model, tokens, 2, "cpu", token_bytes=widths, shard=(rank, 3)) for rank in range(3)]
    assert sum(c for _, c, _ in shards) == count and sum(b for _, _, b in shards) == nbytes
    assert sum(t for t, _, _ in shards) == pytest.approx(total, rel=1e-6)
    seen: list[int] = []
    total, count, nbytes = split_loss(model, tokens, 2, "cpu", max_tokens=40, on_progress=seen.append)
    assert count == 40 and nbytes == 0 and total == pytest.approx(sum(nll[:40]), rel=1e-5)
    assert seen == [32, 40]  # two full windows of 16, then the 8-token tail


def test_text_file_scores_like_a_data_dir(make_checkpoint: Callable[..., Path], data_dir: Path, tmp_path: Path) -> None:
    path = make_checkpoint()
    text = tmp_path / "val.txt"
    text.write_text(TINY_TEXT[:90], encoding="utf-8")
    from_dir, from_text = evaluate(path, data_dir, device="cpu"), evaluate(path, text=text, device="cpu")
    assert (from_text.loss, from_text.tokens, from_text.bits_per_byte) == (
        from_dir.loss, from_dir.tokens, from_dir.bits_per_byte)


def test_evaluation_is_deterministic_and_leaves_training_mode_alone(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size).train()
    tokens = np.asarray(char_tokenizer.encode(TINY_TEXT), dtype=np.uint16)
    assert split_loss(model, tokens, 4) == split_loss(model, tokens, 4)
    assert model.training


def test_refuses_data_from_another_tokenizer(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    other = write_data_dir(tmp_path / "other", train_char([TINY_TEXT + "€"]), TINY_TEXT, TINY_TEXT)
    with pytest.raises(MicroGPTError, match=r"prepared with tokenizer char .* different char vocabulary"):
        evaluate(make_checkpoint(), other, device="cpu")


@pytest.mark.parametrize(
    "text, message",
    [("missing.txt", "does not exist"), ("latin1.txt", "not UTF-8"), ("short.txt", "fewer than 2 tokens")],
)
def test_bad_text_files_are_clear_errors(text: str, message: str, make_checkpoint: Callable[..., Path],
                                         tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("Grüße".encode("latin-1"))
    (tmp_path / "short.txt").write_text("H", encoding="utf-8")
    with pytest.raises(MicroGPTError, match=message):
        evaluate(make_checkpoint(), text=tmp_path / text, device="cpu")


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_bits_per_byte_with_multi_byte_tokens(kind: str, tmp_path: Path) -> None:
    """Bits per byte is comparable across tokenizers only if it divides by the bytes of the text the
    tokens stand for, not by their count: here each token holds several bytes."""
    tokenizer = named("gpt2") if kind == "gpt2" else train_bpe([TINY_TEXT], 400)  # runs out of merges at 361
    data = write_data_dir(tmp_path / "data", tokenizer, TINY_TEXT, TINY_TEXT)
    model = tiny_model(tokenizer.vocab_size)
    checkpoint.save(tmp_path / "m.pt", checkpoint.Checkpoint.of(model, tokenizer))
    val = tokenizer.encode(TINY_TEXT)
    first = tokenizer.decode(val[:1])
    assert first.isascii() and TINY_TEXT.startswith(first)  # so the predicted text is the rest, byte for byte
    predicted_bytes = len(TINY_TEXT.encode("utf-8")) - len(first)
    assert predicted_bytes > 2 * (len(val) - 1)
    nll = hand_nll(model, val, model.config.context)

    result = evaluate(tmp_path / "m.pt", data, device="cpu")
    assert result.tokens == len(val) - 1 == len(nll)
    assert result.loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(sum(nll) / math.log(2) / predicted_bytes, rel=1e-5)


# --- the table `microgpt eval` prints ----------------------------------------------------------

ROWS = {"loss (nats/token)": "loss", "perplexity": "perplexity", "bits per byte": "bits_per_byte",
        "tokens": "tokens", "seconds": "seconds", "characters skipped": "skipped"}


def table_rows(text: str) -> dict[str, str]:
    """{metric: value} from a rendered eval table (the rows between its box-drawing borders)."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]]
        if len(cells) == 2 and cells[0] in ROWS:
            rows[cells[0]] = cells[1]
    return rows


def render(result: EvalResult) -> str:
    console = Console(record=True, width=120, file=io.StringIO())  # recorded, not shown
    console.print(eval_table(result, "model.pt on data/val.bin"))
    return console.export_text()


@pytest.mark.parametrize("skipped", [None, 0, 4321])
def test_eval_table_shows_every_field_in_its_own_row(skipped: int | None) -> None:
    # Values far apart, so that a row showing another field's value cannot pass.
    result = EvalResult(loss=1.2345, perplexity=3.437, bits_per_byte=0.5678, tokens=98765, seconds=12.5,
                        skipped=skipped)
    text = render(result)
    assert "model.pt on data/val.bin" in text
    rows = table_rows(text)
    expected = {name: field for name, field in ROWS.items() if getattr(result, field) is not None}
    assert set(rows) == set(expected)
    for name, field in expected.items():
        assert float(rows[name].replace(",", "")) == pytest.approx(getattr(result, field), abs=5e-4), name


def test_eval_command_table_agrees_with_its_json(make_checkpoint: Callable[..., Path], data_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The real CLI in this process (no interpreter start-up): the printed table and --json, one result."""
    path = make_checkpoint()

    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "-c", str(path), "--data", str(data_dir), "--device", "cpu", *args])
        out, err = capsys.readouterr()
        assert exit_info.value.code == 0, err
        return out

    numbers = json.loads(run("--json"))
    rows = table_rows(run())
    assert set(rows) == set(ROWS) - {"characters skipped"}
    for name, field in ROWS.items():
        if field not in ("seconds", "skipped"):  # seconds differ from run to run
            assert float(rows[name].replace(",", "")) == pytest.approx(numbers[field], abs=5e-4), name
