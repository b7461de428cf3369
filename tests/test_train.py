"""`microgpt train` end to end through the CLI on real data, plus the checkpoint guarantees."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from microgpt_cli import checkpoint, load_checkpoint
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.files import atomic_write

from clitools import assert_clean_error, microgpt

TINY = ["--n-layer", "1", "--n-embed", "32", "--n-head", "2", "--context", "32", "--batch-size", "8",
        "--log-interval", "5", "--eval-tokens", "3000"]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "microgpt_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def trained(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted reference run that several tests compare against."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    microgpt("train", "--data", str(char_data), "--out", str(out), *TINY, "--max-steps", "60", "--eval-interval", "20")
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_training_lowers_the_loss_and_writes_the_run(trained: Path) -> None:
    assert {"best.pt", "last.pt", "metrics.jsonl"} <= {p.name for p in trained.iterdir()}
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "train_loss", "lr", "tokens_per_sec", "elapsed"} <= set(rows[0])
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 4.17  # ln(65) = 4.17: better than uniform
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    best = torch.load(trained / "best.pt", weights_only=True)
    assert best["metrics"]["val_loss"] == min(r["val_loss"] for r in evals)
    assert best["model_config"]["n_embed"] == 32 and best["tokenizer"]["kind"] == "char"
    assert best["version"] == checkpoint.FORMAT_VERSION and "optimizer" not in best
    last = torch.load(trained / "last.pt", weights_only=True)
    # No RNG state: dropout is seeded from (seed, rank, step), so resuming needs none.
    assert last["step"] == 60 and {"optimizer", "elapsed", "best_val", "world_size"} <= set(last)


def test_load_checkpoint_returns_a_working_model_and_tokenizer(trained: Path) -> None:
    model, tokenizer = load_checkpoint(trained)
    ids = torch.tensor([tokenizer.encode("ROMEO:")])
    logits = model(ids)
    assert logits.shape == (1, 6, tokenizer.vocab_size) and not model.training
    assert tokenizer.decode(tokenizer.encode("ROMEO:")) == "ROMEO:"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_resume_is_exact(sig: int, trained: Path, char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(char_data), "--out", str(out), *TINY, "--max-steps", "60", "--eval-interval", "20"]
    proc = start(*args)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 6)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    stopped_at = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 0 < stopped_at < 60
    microgpt(*args, "--resume")
    reference, resumed = weights(trained / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_kill_9_leaves_a_checkpoint_that_resumes_exactly(trained: Path, char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(char_data), "--out", str(out), *TINY, "--max-steps", "60", "--eval-interval", "20"]
    proc = start(*args)
    # Kill as soon as the first checkpoint exists, most likely while the next one is being written.
    wait_for(lambda: (out / "last.pt").exists(), timeout=120)
    time.sleep(0.3)
    proc.kill()
    proc.communicate()
    assert torch.load(out / "last.pt", weights_only=True)["step"] in (20, 40, 60)
    microgpt(*args, "--resume")
    reference, resumed = weights(trained / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous")

    def half_write(f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, half_write)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"version": 1, "model": payload, "model_config": {}, "tokenizer": {}}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(MicroGPTError, match="not a safe microgpt checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(trained: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    data = (trained / "best.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MicroGPTError, match="truncated"):
        load_checkpoint(path)


def test_existing_run_is_not_overwritten_without_force(trained: Path, char_data: Path) -> None:
    before = (trained / "last.pt").read_bytes()
    result = microgpt("train", "--data", str(char_data), "--out", str(trained), *TINY, check=False)
    assert_clean_error(result, "--resume", "--force")
    assert (trained / "last.pt").read_bytes() == before


def test_non_finite_loss_stops_the_run_and_keeps_best(char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    microgpt("train", "--data", str(char_data), "--out", str(out), *TINY, "--max-steps", "10", "--eval-interval", "10")
    best = (out / "best.pt").read_bytes()
    result = microgpt("train", "--data", str(char_data), "--out", str(out), *TINY, "--force", "--lr", "1e30",
                      "--grad-clip", "0", "--warmup-steps", "0", "--max-steps", "40", "--eval-interval", "40", check=False)
    assert_clean_error(result, "diverged", "best.pt is kept", "lower --lr")
    assert (out / "best.pt").read_bytes() == best


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--n-embed", "30", "--n-head", "4"], ["divisible"]),
        (["--batch-size", "0"], ["--batch-size", "positive"]),
        (["--n-layer", "-1"], ["--n-layer", "positive"]),
        (["--lr", "0"], ["--lr"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--context", "200000"], ["--context", "validation split"]),
        (["--device", "cuda"], ["cuda", "not available"]),
        (["--device", "tpu"], ["--device"]),
        (["--preset", "huge"], ["--preset"]),
        (["--position", "alibi"], ["--position"]),
        (["--resume"], ["--resume", "last.pt"]),
    ],
)
def test_bad_options_are_one_clear_line(extra: list[str], fragments: list[str], char_data: Path, tmp_path: Path) -> None:
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = microgpt("train", "--data", str(char_data), "--out", str(tmp_path / "run"), *TINY, *extra, check=False)
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_and_incomplete_data_dirs(tmp_path: Path, char_data: Path) -> None:
    assert_clean_error(microgpt("train", "--data", str(tmp_path / "nope"), check=False), "does not exist", "prepare")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "meta.json").write_text((char_data / "meta.json").read_text())
    assert_clean_error(microgpt("train", "--data", str(partial), check=False), "incomplete", "train.bin")


def test_resume_refuses_other_data(trained: Path, shakespeare: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    microgpt("prepare", str(shakespeare), "--tokenizer", "bpe", "--vocab-size", "300", "--out", str(other))
    result = microgpt("train", "--data", str(other), "--out", str(trained), "--resume", check=False)
    assert_clean_error(result, "different data")


def test_non_integer_option_is_one_clear_line(char_data: Path) -> None:
    result = microgpt("train", "--data", str(char_data), "--max-steps", "many", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "--max-steps" in result.stderr
