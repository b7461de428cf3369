"""Two-process training on CPU (gloo) through torchrun: ranks in step, resume, exact evaluation."""

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

from clitools import microgpt

TINY = ["--n-layer", "1", "--n-embed", "32", "--n-head", "2", "--context", "32", "--batch-size", "8",
        "--grad-accum", "2", "--log-interval", "5", "--dropout", "0"]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--standalone", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def ddp_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-process run, evaluated on the whole validation split."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun("-m", "microgpt_cli", "train", "--data", str(char_data), "--out", str(out), *TINY,
                      "--max-steps", "40", "--eval-interval", "20")
    assert result.returncode == 0, result.stderr
    return out


def test_ranks_stay_in_step(char_data: Path, tmp_path: Path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    result = torchrun(str(worker), str(char_data), str(tmp_path), "20")
    assert result.returncode == 0, result.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = weights(tmp_path / "last.pt")
    assert all(torch.equal(rank0[k], saved[k]) for k in saved)
    initial = torch.load(tmp_path / "last.pt", weights_only=True)
    assert initial["world_size"] == 2 and initial["step"] == 20


def test_only_rank_zero_writes_and_reports(ddp_run: Path) -> None:
    assert sorted(p.name for p in ddp_run.iterdir()) == ["best.pt", "config.toml", "last.pt", "loss.png", "metrics.jsonl"]
    steps = [json.loads(line)["step"] for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]  # one line per log, not one per rank


def test_distributed_val_loss_equals_single_process_eval(ddp_run: Path, char_data: Path) -> None:
    recorded = torch.load(ddp_run / "last.pt", weights_only=True)["metrics"]["val_loss"]
    single = json.loads(microgpt("eval", "--checkpoint", str(ddp_run / "last.pt"), "--data", str(char_data), "--json").stdout)
    assert single["loss"] == pytest.approx(recorded, abs=1e-5)


def test_training_matches_a_single_process_run(ddp_run: Path, char_data: Path, tmp_path: Path) -> None:
    """Same effective batch and schedule at any world size: without dropout, the two-process run
    follows the single-process one up to float summation order."""
    microgpt("train", "--data", str(char_data), "--out", str(tmp_path), *TINY, "--max-steps", "40", "--eval-interval", "20")
    single, ddp = weights(tmp_path / "last.pt"), weights(ddp_run / "last.pt")
    assert all(torch.allclose(single[k], ddp[k], atol=2e-4) for k in single)


def test_sigterm_then_resume_under_torchrun(ddp_run: Path, char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["-m", "microgpt_cli", "train", "--data", str(char_data), "--out", str(out), *TINY,
            "--max-steps", "40", "--eval-interval", "20"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert stderr.count("stopped: SIGTERM at step") == 1  # rank 0 speaks for the job
    assert "Traceback" not in stderr.split("SignalException")[0].rsplit("Traceback", 1)[0]  # only torchrun's own
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert 20 <= stopped["step"] < 40 and stopped["world_size"] == 2
    result = torchrun(*args, "--resume")
    assert result.returncode == 0, result.stderr
    reference, resumed = weights(ddp_run / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


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
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "microgpt_cli", "train", "--data", str(char_data), "--out", str(out), *TINY,
               "--max-steps", "100000", "--eval-interval", "20"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    rank1 = next(pid for pid in _children(proc.pid) if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(rank1, signal.SIGKILL)
    proc.communicate(timeout=120)  # raises TimeoutExpired if the survivors hang
    assert proc.returncode != 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] % 20 == 0


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
