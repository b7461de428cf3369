"""Two-process training on CPU (gloo) through torchrun: ranks in step, resume, exact evaluation,
one voice for the job, and no traceback from any microgpt process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from microgpt_cli.training.loop import step_seed

from clitools import microgpt

TINY = ["--n-layer", "1", "--n-embed", "32", "--n-head", "2", "--context", "32", "--batch-size", "8",
        "--grad-accum", "2", "--log-interval", "5", "--dropout", "0"]
# torchrun's warning when a rank is still alive 30 s after its SIGTERM (it then sends SIGKILL)
RANK_HUNG = "Unable to shutdown process"


def torchrun_command(*args: str, nproc: int = 2, log_dir: Path | None = None) -> list[str]:
    """torchrun ARGS; with `log_dir`, each rank's stdout and stderr are also kept there (see rank_logs)."""
    logs = ["--log-dir", str(log_dir), "--tee", "3"] if log_dir else []
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *logs, *args]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300,
             log_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(torchrun_command(*args, nproc=nproc, log_dir=log_dir), capture_output=True, text=True,
                          timeout=timeout)


def start_torchrun(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(torchrun_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_logs(log_dir: Path, rank: int) -> str:
    """What one rank wrote to stdout and stderr, from torchrun's --log-dir."""
    (rank_dir,) = log_dir.glob(f"*/attempt_0/{rank}")
    return (rank_dir / "stdout.log").read_text() + (rank_dir / "stderr.log").read_text()


def tracebacks(stderr: str) -> list[list[str]]:
    """Every Python traceback in `stderr`: its lines, from `Traceback (most recent call last):` to the exception."""
    found: list[list[str]] = []
    current: list[str] | None = None
    for line in stderr.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            current = [line]
            found.append(current)
        elif current is not None:
            current.append(line)
            if line and not line[0].isspace():  # the exception's line is the first one not indented
                current = None
    return found


def assert_only_torchrun_traceback(stderr: str, exception: str) -> None:
    """torchrun reports a failed or signalled job by raising `exception` (torch.distributed.elastic's own) in
    itself: that traceback, and none from a microgpt process, chained or not."""
    blocks = tracebacks(stderr)
    assert len(blocks) == 1, stderr
    found = blocks[0]
    frames = [line.strip() for line in found if line.strip().startswith("File ")]
    assert frames and all("/torch/distributed/" in frame or "<frozen runpy>" in frame for frame in frames), stderr
    assert found[-1].startswith("torch.distributed.elastic.") and exception in found[-1], stderr
    assert "microgpt_cli" not in "\n".join(found) and "During handling of the above exception" not in stderr


def assert_no_rank_hung(stderr: str) -> None:
    """A rank stopped by an exception must exit, not hang until torchrun kills it 30 s later. It used to, about
    1 run in 5 after SIGTERM: the exception's traceback kept the DDP wrapper alive past the process group's
    destruction, and gloo's destructor deadlocked on the GIL at exit (training.loop.train now drops the wrapper
    first)."""
    assert RANK_HUNG not in stderr, stderr


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_for_file(proc: subprocess.Popen[str], path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ddp_job(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """An uninterrupted two-process run, evaluated on the whole validation split: its run dir, torchrun's
    --log-dir, and torchrun's stdout and stderr."""
    root = tmp_path_factory.mktemp("ddp")
    out, logs = root / "run", root / "logs"
    result = torchrun("-m", "microgpt_cli", "train", "--data", str(char_data), "--out", str(out), *TINY,
                      "--max-steps", "40", "--eval-interval", "20", log_dir=logs)
    assert result.returncode == 0, result.stderr
    return out, logs, result.stdout, result.stderr


@pytest.fixture(scope="module")
def ddp_run(ddp_job: tuple[Path, Path, str, str]) -> Path:
    return ddp_job[0]


# with --pad-vocab too: the padded rows (--preset gpt2's) must not upset DDP's gradient buckets or the resume
DROPOUT_RUN = [*TINY, "--dropout", "0.1", "--pad-vocab", "64", "--eval-tokens", "3000", "--max-steps", "40",
               "--eval-interval", "20"]


@pytest.fixture(scope="module")
def ddp_dropout_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-process run with dropout (each rank draws its own masks) and vocabulary padding."""
    out = tmp_path_factory.mktemp("ddp_dropout") / "run"
    result = torchrun("-m", "microgpt_cli", "train", "--data", str(char_data), "--out", str(out), *DROPOUT_RUN)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return out


def test_ranks_stay_in_step(char_data: Path, tmp_path: Path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    result = torchrun(str(worker), str(char_data), str(tmp_path), "20")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = weights(tmp_path / "last.pt")
    assert all(torch.equal(rank0[k], saved[k]) for k in saved)
    initial = torch.load(tmp_path / "last.pt", weights_only=True)
    assert initial["world_size"] == 2 and initial["step"] == 20
    # In step despite dropout 0.1 that differs across ranks: each rank draws its own masks (its own rows of the
    # batch), new ones at every micro-batch.
    masks0, masks1 = (torch.load(tmp_path / f"rank{r}_masks.pt", weights_only=True) for r in (0, 1))
    assert len(masks0) == len(masks1) == 6 and masks0[0].shape == masks1[0].shape == (4, 32, 32)
    assert all(0.05 < m.float().mean().item() < 0.15 for m in masks0 + masks1)  # dropout 0.1 at work
    assert all(not torch.equal(m0, m1) for m0, m1 in zip(masks0, masks1, strict=True))
    assert all(not torch.equal(masks0[i], masks0[j]) for i in range(6) for j in range(i))


def test_step_seeds_differ_across_ranks_and_steps_and_repeat_exactly() -> None:
    seeds = {(rank, step): step_seed(1337, rank, step) for rank in range(4) for step in range(50)}
    assert len(set(seeds.values())) == len(seeds)  # no two (rank, step) share dropout masks
    assert all(step_seed(1337, rank, step) == seed for (rank, step), seed in seeds.items())  # what resume relies on
    assert step_seed(1338, 0, 0) != seeds[0, 0]
    assert all(0 <= seed < 2**63 for seed in seeds.values())  # what torch.manual_seed takes


def test_only_rank_zero_writes_and_reports(ddp_run: Path) -> None:
    files = sorted(p.name for p in ddp_run.iterdir())
    assert files == ["best.pt", "config.toml", "last.pt", "loss.png", "metrics.jsonl"]
    steps = [json.loads(line)["step"] for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]  # one line per log, not one per rank


def test_only_rank_zero_prints(ddp_job: tuple[Path, Path, str, str]) -> None:
    _, logs, stdout, stderr = ddp_job
    assert stderr.count("starting ·") == 1 and stderr.count("training summary") == 1, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert rank_logs(logs, 1) == ""  # not a warning, not a progress line
    assert "starting ·" in rank_logs(logs, 0) and "training summary" in rank_logs(logs, 0)


def test_distributed_val_loss_equals_single_process_eval(ddp_run: Path, char_data: Path) -> None:
    recorded = torch.load(ddp_run / "last.pt", weights_only=True)["metrics"]["val_loss"]
    single = json.loads(
        microgpt("eval", "--checkpoint", str(ddp_run / "last.pt"), "--data", str(char_data), "--json").stdout)
    assert single["loss"] == pytest.approx(recorded, abs=1e-5)


def test_training_matches_a_single_process_run(ddp_run: Path, char_data: Path, tmp_path: Path) -> None:
    """Same effective batch and schedule at any world size: without dropout, the two-process run
    follows the single-process one up to float summation order."""
    microgpt("train", "--data", str(char_data), "--out", str(tmp_path), *TINY, "--max-steps", "40",
             "--eval-interval", "20")
    single, ddp = weights(tmp_path / "last.pt"), weights(ddp_run / "last.pt")
    assert all(torch.allclose(single[k], ddp[k], atol=2e-4) for k in single)


def test_sigterm_then_resume_under_torchrun(ddp_dropout_run: Path, char_data: Path, tmp_path: Path) -> None:
    """With dropout: the resumed ranks draw exactly the masks the uninterrupted ones drew."""
    out = tmp_path / "run"
    args = ["-m", "microgpt_cli", "train", "--data", str(char_data), "--out", str(out), *DROPOUT_RUN]
    proc = start_torchrun(*args)
    wait_for_file(proc, out / "last.pt")
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert stderr.count("stopped: SIGTERM at step") == 1  # rank 0 speaks for the job
    # torchrun re-raises the signal as its own SignalException; no microgpt process may print a traceback.
    assert_only_torchrun_traceback(stderr, "SignalException")
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert 20 <= stopped["step"] < 40 and stopped["world_size"] == 2
    assert stopped["model_config"]["pad_vocab"] == 64
    result = torchrun(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("resuming at step") == 1, result.stderr
    reference, resumed = weights(ddp_dropout_run / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert_no_rank_hung(stderr)


def test_resume_with_a_different_world_size(ddp_run: Path, char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    state = torch.load(ddp_run / "last.pt", weights_only=True)
    state["train_config"]["max_steps"] = 50
    torch.save(state, out / "last.pt")
    microgpt("train", "--data", str(char_data), "--out", str(out), "--resume")
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["step"] == 50 and resumed["world_size"] == 1


def test_a_dead_rank_does_not_hang_the_job(char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_torchrun("-m", "microgpt_cli", "train", "--data", str(char_data), "--out", str(out), *TINY,
                          "--max-steps", "100000", "--eval-interval", "20")
    wait_for_file(proc, out / "last.pt")
    rank1 = next(pid for pid in _children(proc.pid) if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(rank1, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)  # raises TimeoutExpired if the survivors hang
    assert proc.returncode != 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] % 20 == 0
    # torchrun reports the failed job as its own ChildFailedError; rank 0 says what happened in one line.
    assert_only_torchrun_traceback(stderr, "ChildFailedError")
    assert_no_rank_hung(stderr)  # a hung rank 0 never gets to say it
    assert stderr.count("error: a peer process failed or vanished") == 1, stderr
