"""`microgpt train` end to end through the CLI on real data, plus the checkpoint guarantees."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from microgpt_cli import load_checkpoint
from microgpt_cli.config import ModelConfig, TrainConfig
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io import checkpoint
from microgpt_cli.io.files import atomic_write
from microgpt_cli.training import loop as training
from microgpt_cli.training.optim import lr_factor

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
    # Kill once the first checkpoint exists and metrics.jsonl has gone past it, most likely while
    # the next log line or checkpoint is being written.
    wait_for(lambda: (out / "last.pt").exists() and max(logged_steps(out), default=0) > 20, timeout=120)
    proc.kill()
    proc.communicate()
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert saved in (20, 40, 60) and max(logged_steps(out)) > saved
    microgpt(*args, "--resume")
    reference, resumed = weights(trained / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    # The lines logged past last.pt were dropped on resume: those steps were trained again.
    steps = logged_steps(out)
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 60


def logged_steps(out: Path) -> list[int]:
    """The steps of metrics.jsonl's lines, a line being written (cut short) left out."""
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            continue
    return steps


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
    marker: Path  # set on the instance: what the payload would create

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
                      "--grad-clip", "0", "--warmup-steps", "0", "--max-steps", "40", "--eval-interval", "40",
                      check=False)
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
def test_bad_options_are_one_clear_line(extra: list[str], fragments: list[str], char_data: Path,
                                        tmp_path: Path) -> None:
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


# --- --time-budget ---------------------------------------------------------------------------

BUDGET = 8.0  # seconds: a busy 2-core machine spends up to ~5.4 s of it starting up (torch and dynamo imports)
# The budget counts from the CLI's import (cli.STARTED), so the interpreter's start before it (~0.2 s) and its exit
# after the summary (~0.3-0.8 s, torch's teardown) fall outside it. Measured overruns of the process's wall time on
# 2 CPU cores shared with other work: 0.3-1.2 s for one run, 1.8-2.3 s for three at once. 3 s leaves room for that;
# what it catches is a run that overshoots by seconds (a budget counted from after start-up, a final evaluation of
# the whole split that the budget forgot).
OUTSIDE_BUDGET = 3.0
PEAK_LR = 3e-3


@dataclass(frozen=True)
class BudgetRun:
    out: Path
    wall: float  # seconds the `microgpt train` process ran, start-up and exit included
    stderr: str
    rows: list[dict[str, Any]]  # metrics.jsonl


def budget_run(data: Path, out: Path, *extra: str) -> BudgetRun:
    """A run that only the budget can end (390 epochs), with a warmup far longer than it, logging every step.
    --eval-tokens 0: the budget sizes the evaluation (the whole split, or what fits a tenth of it)."""
    began = time.monotonic()
    result = microgpt("train", "--data", data, "--out", out, *TINY, "--log-interval", "1", "--eval-interval", "100000",
                      "--eval-tokens", "0", "--time-budget", BUDGET, "--warmup-steps", "100000", "--lr", PEAK_LR,
                      *extra)
    wall = time.monotonic() - began
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return BudgetRun(out, wall, result.stderr, rows)


@pytest.fixture(scope="module")
def the_budget_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> BudgetRun:
    return budget_run(char_data, tmp_path_factory.mktemp("budget") / "run")


def test_time_budget_ends_the_run_in_time_with_a_final_evaluation(the_budget_run: BudgetRun) -> None:
    run, rows = the_budget_run, the_budget_run.rows
    assert run.wall < BUDGET + OUTSIDE_BUDGET, f"{run.wall:.1f} s for a {BUDGET} s budget"
    assert rows and all(row["elapsed"] <= BUDGET for row in rows)
    # Ended by the budget, far short of 390 epochs, and said so.
    assert "ended by time budget" in run.stderr and rows[-1]["epoch"] < 1
    last = torch.load(run.out / "last.pt", weights_only=True)
    assert last["step"] == rows[-1]["step"] and last["elapsed"] <= BUDGET
    # The final evaluation happened and was saved.
    assert "val_loss" in rows[-1] and last["metrics"]["val_loss"] == rows[-1]["val_loss"]
    assert (run.out / "best.pt").is_file()
    assert len([row for row in rows if "val_loss" in row]) == 1  # --eval-interval 100000: only the final one


def test_time_budget_warms_up_and_decays_within_it(the_budget_run: BudgetRun) -> None:
    """--warmup-steps 100000 alone would keep the LR under (step + 1) / 100000 of the peak all run long;
    under the budget, warmup ends within a tenth of the training time, at the peak, and the cosine decay over
    the rest ends near its floor (0.1 x the peak) when training stops. Start-up is not part of the schedule."""
    rows = the_budget_run.rows
    assert rows, "the budget left no time to train"
    assert rows[-1]["step"] < 10_000  # so a warmup by steps could not have reached 10 % of the peak
    highest = max(row["lr"] for row in rows)
    # Each logged LR is a step's: the first step after the warmup's end starts at most one step
    # interval past it, where the cosine (over the other nine tenths) has fallen at most this far.
    # On a quiet machine that is 0.975 x the peak; on a busy one a step can take a good part of the
    # schedule, and the highest LR logged is lower by as much (0.86 was seen, main as well).
    times = [row["elapsed"] for row in rows]
    interval = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    span = max(times[-1] - times[0], interval, 1e-9)  # training time covered, at most the schedule's
    floor = min(0.975, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, interval / (0.9 * span)))))
    assert floor * PEAK_LR <= highest <= PEAK_LR * (1 + 1e-9), (
        f"LR peaked at {highest / PEAK_LR:.3f} of --lr (floor {floor:.3f}); the first step ended "
        f"{rows[0]['elapsed']:.1f} s into the budget, steps {interval:.2f} s apart at most")
    assert rows[-1]["lr"] < 0.3 * PEAK_LR


def test_lr_warmup_ends_by_time_under_a_budget() -> None:
    cfg = TrainConfig(warmup_steps=100_000, min_lr_ratio=0.1, time_budget=100)
    total = 10**6

    def decayed(progress: float) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    assert lr_factor(5, total, cfg, elapsed=0.0) == pytest.approx(6 / 100_000)  # by steps, while time is short
    assert lr_factor(5, total, cfg, elapsed=5.0) == pytest.approx(0.5)  # 5 s of the 10 s warmup (a tenth)
    assert lr_factor(5, total, cfg, elapsed=9.99) == pytest.approx(0.999)
    assert lr_factor(5, total, cfg, elapsed=10.0) == pytest.approx(1.0)  # warmup over at the peak: no jump
    assert lr_factor(5, total, cfg, elapsed=55.0) == pytest.approx(decayed(0.5))  # decaying over the other 90 s
    assert lr_factor(5, total, cfg, elapsed=100.0) == pytest.approx(0.1)
    # `budget` (the share left to training) is what the schedule spans, warmup included.
    assert lr_factor(5, total, cfg, elapsed=2.5, budget=50) == pytest.approx(0.5)
    assert lr_factor(5, total, cfg, elapsed=5.0, budget=50) == pytest.approx(1.0)
    assert lr_factor(5, total, cfg, elapsed=27.5, budget=50) == pytest.approx(decayed(0.5))
    # No budget: time plays no part.
    assert lr_factor(5, total, replace(cfg, time_budget=0), elapsed=50.0, budget=50) == pytest.approx(6 / 100_000)
    assert all(0 < lr_factor(5, total, cfg, elapsed=t / 10) <= 1 for t in range(1001))


# --- --grad-accum ----------------------------------------------------------------------------


def train_in_process(data: Path, out: Path, batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
    """The final weights of a 10-step run without dropout, trained by the library in this process."""
    model = ModelConfig(n_layer=1, n_head=2, n_embed=32, context=32, dropout=0.0)
    cfg = TrainConfig(data=str(data), out=str(out), batch_size=batch_size, grad_accum=grad_accum, max_steps=10,
                      eval_interval=10, eval_tokens=1000, log_interval=5)
    assert training.train(model, cfg).steps == 10
    return weights(out / "last.pt")


def test_grad_accum_trains_like_the_whole_batch(char_data: Path, tmp_path: Path) -> None:
    """Micro-batches 2i and 2i+1 of batch 4 are the halves of micro-batch i of batch 8 (dataset.Batches) and
    each micro-batch's loss is divided by --grad-accum: the same gradients, summed in another order."""
    whole = train_in_process(char_data, tmp_path / "whole", batch_size=8, grad_accum=1)
    accumulated = train_in_process(char_data, tmp_path / "accumulated", batch_size=4, grad_accum=2)
    smaller = train_in_process(char_data, tmp_path / "smaller", batch_size=4, grad_accum=1)
    assert all(torch.allclose(whole[k], accumulated[k], atol=1e-5) for k in whole)
    # Teeth: half the effective batch trains to visibly other weights.
    assert max((whole[k] - smaller[k]).abs().max().item() for k in whole) > 1e-3


def test_the_summarys_tokens_per_sec_leaves_the_warm_up_out(small_char_data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from microgpt_cli.progress import TrainDisplay
    from microgpt_cli.training.events import Evaluated, Logged, RunEnded

    model = ModelConfig(n_layer=1, n_embed=32, n_head=2, context=32)
    logged: list[Logged | Evaluated] = []  # every log window's metrics, the last one's come with its evaluation

    def run(out: str, steps: int) -> RunEnded:
        cfg = TrainConfig(data=str(small_char_data), out=str(tmp_path / out), max_steps=steps, log_interval=3,
                          eval_interval=10**6, eval_tokens=500)
        with TrainDisplay() as display:
            def both(event: Any) -> None:
                display.event(event)
                if isinstance(event, (Logged, Evaluated)):
                    logged.append(event)
            return training.train(model, cfg, on_event=both)

    summary = run("long", 12)
    # Log windows of 3 steps: the first (start-up, first step) is left out, the other three count.
    assert summary.timed_steps == 9 and summary.warmup_excluded and summary.mfu is None
    rates = [e.metrics.tokens_per_sec for e in logged[1:] if e.metrics.tokens_per_sec is not None]
    harmonic = len(rates) / sum(1 / r for r in rates)  # equal steps per window: tokens/s over their total time
    assert summary.tokens_per_sec == pytest.approx(harmonic, rel=0.05)
    assert all(e.metrics.mfu is None for e in logged)  # on CUDA only
    assert "tokens/s (9 steps, after warm-up)" in capsys.readouterr().err
    short = run("short", 2)  # one window, cut short by the end: all there is, and the summary says so
    assert short.timed_steps == 2 and not short.warmup_excluded
    assert "tokens/s (2 steps, warm-up included)" in capsys.readouterr().err


# --- the first hour: what a new user meets -----------------------------------------------------


def test_a_run_shorter_than_its_warmup_warms_up_over_a_tenth_of_it(small_char_data: Path, tmp_path: Path) -> None:
    """--max-steps 30 with the default 100 warm-up steps used to end at 0.3x the peak LR, silently."""
    cfg = TrainConfig(data=str(small_char_data), out=str(tmp_path / "run"), max_steps=30, batch_size=2)
    run = training.build_run(ModelConfig(n_layer=1, n_head=2, n_embed=16, context=8), cfg, resume=False, force=False,
                             world=training.distributed.World())
    assert run.cfg.warmup_steps == 3 and "--warmup-steps 100 is longer than this run of 30 steps" in run.warnings[0]
    assert "0.30x the peak LR" in run.warnings[0]
    assert max(lr_factor(step, run.total_steps, run.cfg) for step in range(30)) == pytest.approx(1.0)
    long = training.build_run(None, replace(cfg, max_steps=300), resume=False, force=False,
                              world=training.distributed.World())
    assert long.cfg.warmup_steps == 100 and long.warnings == []


def test_preflight_estimate_and_partial_val_split_are_reported(small_char_data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """After a few timed steps the run says how long it will take; a val loss measured on part of the
    split says so in every place that shows it: the events, metrics.jsonl, the checkpoints, `info`."""
    from microgpt_cli.training.events import Evaluated, Planned, RunStarted

    from clitools import run_cli

    events: list[Any] = []
    cfg = TrainConfig(data=str(small_char_data), out=str(tmp_path / "run"), max_steps=12, eval_interval=6,
                      eval_tokens=500, log_interval=3)
    model = ModelConfig(n_layer=1, n_head=2, n_embed=16, context=16)
    summary = training.train(model, cfg, on_event=events.append)
    plans = [e for e in events if isinstance(e, Planned)]
    assert len(plans) == 1 and plans[0].step == 6 and plans[0].steps == 6 and plans[0].seconds_per_step > 0
    # Six steps to go and two evaluations (with saves): more than the steps alone.
    assert plans[0].seconds > 6 * plans[0].seconds_per_step and plans[0].device == "cpu"
    started = next(e for e in events if isinstance(e, RunStarted))
    assert started.train_config.warmup_steps == 1 and "--warmup-steps 100" in started.warnings[0]
    split = json.loads((small_char_data / "meta.json").read_text())["splits"]["val"]["tokens"] - 1
    evaluated = [e.metrics for e in events if isinstance(e, Evaluated)]
    assert [(m.val_tokens, m.val_split_tokens) for m in evaluated] == [(500, split)] * 2
    assert (summary.val_tokens, summary.val_split_tokens) == (500, split)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["val_tokens"], r["val_split_tokens"]) for r in rows if "val_loss" in r] == [(500, split)] * 2
    code, out, err = run_cli(capsys, "info", tmp_path / "run")
    assert code == 0, err
    scope = f"on {100 * 500 / split:.0f}% of the val split: 500 of {split:,} tokens"
    assert f"val loss      │ {summary.val_loss:.4f} ({scope})" in out, out


def test_a_presets_learning_rates_reach_the_optimizers(small_char_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The optimizers' groups, as saved in last.pt, train at the preset's LRs (gpt2: lr 6e-4, cpu:
    Muon at 0.04), not at the defaults (3e-3, 0.02); a flag still beats the preset."""
    from microgpt_cli.config import PRESETS

    from clitools import run_cli

    tiny = ["--n-layer", "1", "--n-embed", "16", "--n-head", "2", "--context", "8", "--batch-size", "2",
            "--max-steps", "1", "--eval-tokens", "20", "--data", small_char_data, "--device", "cpu"]
    for preset, extra, expected in (("gpt2", ["--no-compile", "--pad-vocab", "1"], [PRESETS["gpt2"]["lr"]] * 2),
                                    ("cpu", [], [PRESETS["cpu"]["lr"]] * 2 + [PRESETS["cpu"]["muon_lr"]]),
                                    ("cpu", ["--muon-lr", "0.01"], [PRESETS["cpu"]["lr"]] * 2 + [0.01])):
        out = tmp_path / f"{preset}{len(extra)}"
        code, _, err = run_cli(capsys, "train", "--preset", preset, *tiny, *extra, "--out", out)
        assert code == 0, err
        training_state = checkpoint.load(out / "last.pt").training
        assert training_state is not None
        groups = [g for opt in training_state.optimizers for g in opt["param_groups"]]
        assert [g["base_lr"] for g in groups] == pytest.approx(expected), preset


def test_training_into_its_own_data_dir_is_refused(small_char_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clitools import assert_one_error_line, run_cli

    code, _, err = run_cli(capsys, "train", "--data", small_char_data, "--out", small_char_data / ".." / "data")
    assert_one_error_line(code, err, "is the data dir itself")
    assert sorted(p.name for p in small_char_data.iterdir()) == ["meta.json", "train.bin", "val.bin"]
