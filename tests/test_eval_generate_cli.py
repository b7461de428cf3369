"""`microgpt eval` and `microgpt generate` end to end, through a real subprocess."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from microgpt_cli.data.tokenizer import train_char
from microgpt_cli.infer.evaluation import evaluate
from microgpt_cli.infer.sampling import generate_text
from microgpt_cli.io import checkpoint
from microgpt_cli.model.gpt import GPT

from clitools import SHAKESPEARE, microgpt, run_cli
from conftest import TINY_TEXT, write_data_dir


def test_eval_json_is_one_object_with_the_documented_keys(
    make_checkpoint: Callable[..., Path], data_dir: Path, tmp_path: Path
) -> None:
    ckpt = make_checkpoint()
    run = microgpt("eval", "-c", ckpt, "--data", data_dir, "--json", "--batch-size", "2", cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) == {"loss", "perplexity", "bits_per_byte", "tokens", "seconds"}
    expected = evaluate(ckpt, data_dir, device="cpu")
    assert result["tokens"] == expected.tokens
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)


def test_eval_table_and_default_paths(make_checkpoint: Callable[..., Path], data_dir: Path, tmp_path: Path) -> None:
    make_checkpoint("out/best.pt")  # the defaults: --checkpoint out, --data data
    run = microgpt("eval", cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    assert "perplexity" in run.stdout and "bits per byte" in run.stdout
    assert "Traceback" not in run.stderr


def test_generate_writes_only_the_text_to_stdout(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = make_checkpoint(position="rope")
    run = microgpt("generate", "-c", ckpt, "--prompt", "Hellö 日本", "--length", "40", "--seed", "3", cwd=tmp_path,
                   check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout == generate_text(ckpt, "Hellö 日本", 40, seed=3, device="cpu") + "\n"
    assert "tokens/s" in run.stderr


def test_generate_samples_prompt_file_and_stop(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = make_checkpoint()
    (tmp_path / "prompt.txt").write_text("The quick", encoding="utf-8")
    run = microgpt("generate", "-c", ckpt, "--prompt-file", "prompt.txt", "--num-samples", "3", "--length", "30",
                   "--temperature", "0", cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    samples = run.stdout.removesuffix("\n").split("\n\n---\n\n")
    greedy = generate_text(ckpt, "The quick", 30, temperature=0, device="cpu")
    assert samples == [greedy] * 3

    run = microgpt("generate", "-c", ckpt, "--prompt", "The quick", "--num-samples", "3", "--length", "30",
                   "--temperature", "1", "--seed", "7", cwd=tmp_path, check=False)
    samples = run.stdout.removesuffix("\n").split("\n\n---\n\n")
    # One batch, sample i drawn from seed + i: each is the sample that seed gives alone.
    assert samples == [generate_text(ckpt, "The quick", 30, temperature=1, seed=7 + i, device="cpu") for i in range(3)]
    assert "90 tokens in 3 samples" in run.stderr

    stop = greedy[12:14]
    run = microgpt("generate", "-c", ckpt, "--prompt", "The quick", "--temperature", "0", "--stop", stop,
                   cwd=tmp_path, check=False)
    assert run.stdout == greedy[: greedy.index(stop, 9)] + "\n"


def test_bad_input_is_one_clear_line(make_checkpoint: Callable[..., Path], data_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = make_checkpoint()
    (tmp_path / "truncated.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    other = write_data_dir(tmp_path / "other", train_char([TINY_TEXT + "€"]), TINY_TEXT, TINY_TEXT)
    (tmp_path / "p.txt").write_text("hi", encoding="utf-8")
    cases: dict[str, tuple[list[Any], str]] = {
        "negative temperature": (["generate", "-c", ckpt, "--temperature", "-0.5"], "--temperature"),
        "top-k 0": (["generate", "-c", ckpt, "--top-k", "0"], "--top-k"),
        "top-p 0": (["generate", "-c", ckpt, "--top-p", "0"], "--top-p"),
        "top-p above 1": (["generate", "-c", ckpt, "--top-p", "1.5"], "--top-p"),
        "negative length": (["generate", "-c", ckpt, "--length", "-1"], "--length"),
        "no samples": (["generate", "-c", ckpt, "--num-samples", "0"], "--num-samples"),
        "too many samples": (["generate", "-c", ckpt, "--num-samples", "1025"], "--num-samples"),
        "unknown quantize": (["generate", "-c", ckpt, "--quantize", "int4"], "--quantize"),
        "unknown eval quantize": (["eval", "-c", ckpt, "--data", data_dir, "--quantize", "fp8"], "--quantize"),
        "two prompts": (["generate", "-c", ckpt, "--prompt", "a", "--prompt-file", "p.txt"], "not both"),
        "missing checkpoint": (["generate", "-c", "nope.pt"], "does not exist"),
        "truncated checkpoint": (["generate", "-c", "truncated.pt"], "truncated"),
        "foreign checkpoint": (["eval", "-c", "foreign.pt", "--data", data_dir], "not a microgpt checkpoint"),
        "unknown character": (["generate", "-c", ckpt, "--prompt", "Hi €"], "'€' (U+20AC)"),
        "missing text file": (["eval", "-c", ckpt, "--text", "nope.txt"], "nope.txt does not exist"),
        "missing data dir": (["eval", "-c", ckpt, "--data", "nope"], "does not exist"),
        "tokenizer mismatch": (["eval", "-c", ckpt, "--data", other], "different char vocabulary"),
    }
    # Two cases in real processes, which run the installed entry point; the rest in this process through
    # the same entry point (a process each would spend ~2 s importing torch).
    in_process = dict(cases)
    with ThreadPoolExecutor(2) as pool:
        real = {name: in_process.pop(name) for name in ("truncated checkpoint", "tokenizer mismatch")}
        runs = dict(zip(real, pool.map(lambda c: microgpt(*c[0], cwd=tmp_path, check=False), real.values())))
    outcomes = {name: (run.returncode, run.stdout, run.stderr) for name, run in runs.items()}
    monkeypatch.chdir(tmp_path)
    outcomes.update({name: run_cli(capsys, *args) for name, (args, _) in in_process.items()})
    for name, (code, out, err) in outcomes.items():
        lines = err.strip().splitlines()
        assert code != 0 and out == "", name
        assert len(lines) == 1 and lines[0].startswith("error:") and cases[name][1] in lines[0], (name, err)


def test_prepare_train_eval_generate_on_shakespeare(tmp_path: Path) -> None:
    steps: list[list[object]] = [
        ["prepare", SHAKESPEARE, "--out", "data", "--tokenizer", "char"],
        ["train", "--data", "data", "--out", "out", "--n-layer", "1", "--n-embed", "32", "--n-head", "2",
         "--context", "32", "--batch-size", "8", "--max-steps", "30", "--eval-interval", "30", "--warmup-steps", "5",
         "--device", "cpu"],
    ]
    for args in steps:
        run = microgpt(*args, cwd=tmp_path, check=False)
        assert run.returncode == 0, run.stderr
    run = microgpt("eval", "--json", cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["tokens"] > 100_000 and 0 < result["bits_per_byte"] < 8
    # The same model before training, evaluated the same way: 30 steps must have taught it a lot.
    trained = checkpoint.load(tmp_path / "out")
    torch.manual_seed(1337)
    untrained = tmp_path / "untrained.pt"
    checkpoint.save(untrained, checkpoint.Checkpoint.of(GPT(trained.model_config), trained.tokenizer_object()))
    before = evaluate(untrained, tmp_path / "data", device="cpu").bits_per_byte
    assert before > 0.95 * math.log2(65)  # an untrained model is close to uniform over 65 symbols
    assert result["bits_per_byte"] < before - 1.0 and result["bits_per_byte"] < 0.85 * math.log2(65)
    run = microgpt("generate", "--prompt", "ROMEO:", "--length", "50", cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ROMEO:") and len(run.stdout) == len("ROMEO:") + 50 + 1
