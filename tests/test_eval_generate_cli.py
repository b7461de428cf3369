"""`microgpt eval` and `microgpt generate` end to end: through the entry point in this process, and in
real subprocesses where a process matters (a closed pipe, the installed command)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from microgpt_cli.config import ModelConfig
from microgpt_cli.data.tokenizer import from_spec, train_char
from microgpt_cli.infer.evaluation import evaluate
from microgpt_cli.infer.sampling import generate_text
from microgpt_cli.io import checkpoint
from microgpt_cli.model.gpt import GPT

from clitools import SHAKESPEARE, assert_one_error_line, microgpt, run_cli
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


def test_generate_writes_only_the_text_to_stdout(make_checkpoint: Callable[..., Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = make_checkpoint(position="rope")
    code, out, err = run_cli(capsys, "generate", "-c", ckpt, "--prompt", "Hellö 日本", "--length", "40", "--seed", "3")
    assert code == 0, err
    assert out == generate_text(ckpt, "Hellö 日本", 40, seed=3, device="cpu") + "\n"
    assert "tokens/s" in err


def test_generate_samples_prompt_file_and_stop(make_checkpoint: Callable[..., Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = make_checkpoint()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt.txt").write_text("The quick", encoding="utf-8")
    code, out, err = run_cli(capsys, "generate", "-c", ckpt, "--prompt-file", "prompt.txt", "--num-samples", "3",
                             "--length", "30", "--temperature", "0")
    assert code == 0, err
    samples = out.removesuffix("\n").split("\n\n---\n\n")
    greedy = generate_text(ckpt, "The quick", 30, temperature=0, device="cpu")
    assert samples == [greedy] * 3

    code, out, err = run_cli(capsys, "generate", "-c", ckpt, "--prompt", "The quick", "--num-samples", "3",
                             "--length", "30", "--temperature", "1", "--seed", "7")
    samples = out.removesuffix("\n").split("\n\n---\n\n")
    # One batch, sample i drawn from seed + i: each is the sample that seed gives alone.
    assert samples == [generate_text(ckpt, "The quick", 30, temperature=1, seed=7 + i, device="cpu") for i in range(3)]
    assert "90 tokens in 3 samples" in err

    stop = greedy[12:14]
    code, out, err = run_cli(capsys, "generate", "-c", ckpt, "--prompt", "The quick", "--temperature", "0", "--stop",
                             stop)
    assert out == greedy[: greedy.index(stop, 9)] + "\n"


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


def test_prepare_train_eval_generate_on_shakespeare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # prepare and train through the entry point in this process, eval in a real one (the README's
    # Quickstart and Tutorial run all of them as processes, see test_readme.py).
    monkeypatch.chdir(tmp_path)
    steps: list[list[object]] = [
        ["prepare", SHAKESPEARE, "--out", "data", "--tokenizer", "char"],
        ["train", "--data", "data", "--out", "out", "--n-layer", "1", "--n-embed", "32", "--n-head", "2",
         "--context", "32", "--batch-size", "8", "--max-steps", "30", "--eval-interval", "30", "--warmup-steps", "5",
         "--device", "cpu"],
    ]
    for args in steps:
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
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
    code, out, err = run_cli(capsys, "generate", "--prompt", "ROMEO:", "--length", "50")
    assert code == 0, err
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 50 + 1


def strict_json(text: str) -> Any:
    """json.loads as other languages' parsers read JSON: the bare words NaN and Infinity are errors."""
    def refuse(word: str) -> None:
        raise ValueError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_is_valid_where_a_number_is_infinite(make_checkpoint: Callable[..., Path], data_dir: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model sure of wrong answers has a loss of thousands of nats: its perplexity overflows a
    float. `eval --json` writes null and says why; so does `info --json` for a non-finite metric."""
    state = checkpoint.load(make_checkpoint())
    state.model["norm.weight"] = state.model["norm.weight"] * 1e5  # logits 1e5 times larger
    state.metrics = {"step": 3, "val_loss": math.inf, "train_loss": math.nan}
    checkpoint.save(tmp_path / "sure.pt", state)
    code, out, err = run_cli(capsys, "eval", "-c", tmp_path / "sure.pt", "--data", data_dir, "--json")
    assert code == 0, err
    result = strict_json(out)
    assert result["loss"] > 700 and result["perplexity"] is None
    assert "infinity" in result["null_because"]["perplexity"]
    code, out, err = run_cli(capsys, "info", tmp_path / "sure.pt", "--json")
    assert code == 0, err
    facts = strict_json(out)
    assert facts["training"]["val_loss"] is None and facts["training"]["train_loss"] is None
    assert set(facts["null_because"]) == {"training.val_loss", "training.train_loss"}


def test_several_stops_end_a_sample_at_the_first_one(make_checkpoint: Callable[..., Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = make_checkpoint()
    sample = ["The", "--length", "60", "--seed", "5", "--temperature", "1"]
    text = generate_text(ckpt, "The", 60, temperature=1, seed=5, device="cpu")
    new = text[3:]
    sooner = new[10:12]
    later = next(new[i : i + 2] for i in range(30, 55) if new.index(new[i : i + 2]) > new.index(sooner))
    # The first --stop given appears later in the text: keeping only the last one, or only the
    # first, would end the sample elsewhere.
    for stops in ([later, sooner], [sooner, later]):
        code, out, err = run_cli(capsys, "generate", "-c", ckpt, "--prompt", *sample,
                                 *(arg for stop in stops for arg in ("--stop", stop)))
        assert code == 0 and out == "The" + new[: new.index(sooner)] + "\n", err
        assert generate_text(ckpt, "The", 60, temperature=1, seed=5, stop=stops, device="cpu") == out[:-1]
    config = tmp_path / "gen.toml"
    config.write_text(f"stop = {json.dumps(later)}\n")  # a --config file gives one
    code, out, err = run_cli(capsys, "generate", "-c", ckpt, "--prompt", *sample, "--config", config)
    assert code == 0 and out == "The" + new[: new.index(later)] + "\n", err


def test_seeds_are_used_whole_or_refused(make_checkpoint: Callable[..., Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """torch's CPU generator keeps 32 bits of a seed: seed 1 and seed 2**32 + 1 would give the same
    text. Seeds past 2**32 - 1 are refused, for generate and train alike."""
    ckpt = make_checkpoint()
    texts = [run_cli(capsys, "generate", "-c", ckpt, "--length", "20", "--seed", seed)[1] for seed in (1, 2**32 - 1)]
    assert texts[0] != texts[1]
    for command in (["generate", "-c", ckpt], ["train"]):
        code, _, err = run_cli(capsys, *command, "--seed", 2**32 + 1)
        assert_one_error_line(code, err, "--seed must be between 0 and 4,294,967,295", "4,294,967,297")


def test_generate_into_a_closed_pipe_exits_0(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """`microgpt generate | head -c 20`: the reader leaving is how a pipe ends, not an error (it
    exited 1 once). In a real process: the text arrives through a real pipe."""
    ckpt = make_checkpoint()
    proc = subprocess.Popen([sys.executable, "-m", "microgpt_cli", "generate", "-c", ckpt, "--length", "100000",
                             "--prompt", "Hello"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None
    start = proc.stdout.read(20).decode()
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"error" not in err, err
    assert start == generate_text(ckpt, "Hello", 15, device="cpu")[:20]  # stdout holds the text alone


def test_ctrl_c_during_eval_says_where_it_stopped(char_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """It used to end silently with status 130."""
    meta = json.loads((char_data / "meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embed=32, context=8))
    checkpoint.save(tmp_path / "m.pt", checkpoint.Checkpoint.of(model, from_spec(meta["tokenizer"])))
    # 13,943 windows of 8 tokens one at a time: scoring starts within 0.4 s and takes 10 s or more.
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code, out, err = run_cli(capsys, "eval", "-c", tmp_path / "m.pt", "--data", char_data, "--batch-size", "1")
    finally:
        timer.cancel()
    line = assert_one_error_line(code, err, "eval was interrupted after", "of 111,537 tokens; nothing was written")
    assert code == 130 and line.startswith("stopped:") and out == ""
