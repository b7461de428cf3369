"""The GPU benchmark only measures something on a GPU, which CI does not have: its --tiny mode runs every
row of it on the CPU here, so the script a GPU session runs once has already run end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The benchmark's markdown table as {run: [tokens/s, MFU, peak memory]}."""
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


def test_gpu_train_benchmark_runs_every_row_on_cpu(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), "--tiny", "--levers",
                             "--nproc", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert list(rows) == [
        "microgpt --preset gpt2", "plain PyTorch GPT-2 (this file)", "microgpt --preset gpt2 --no-bias",
        "microgpt --preset gpt2, SDPA flash_attention only", "microgpt --preset gpt2, SDPA cudnn_attention only",
        "microgpt --preset gpt2, SDPA efficient_attention only",
        "microgpt --preset gpt2, torchrun 2 processes (per process)"]
    measured = {run: float(cells[0].replace(",", "")) for run, cells in rows.items() if cells[0] != "n/a"}
    # every row trains on the CPU but those of CUDA-only attention backends, which say why they have no figure
    cuda_only = {"microgpt --preset gpt2, SDPA cudnn_attention only",
                 "microgpt --preset gpt2, SDPA efficient_attention only"}
    assert set(rows) - set(measured) == cuda_only
    assert all(f"{run}: " in result.stderr for run in cuda_only)
    assert all(rate > 0 for rate in measured.values())
    # without CUDA there is no peak to compare with and no GPU memory to report
    assert all(cells[1:] == ["n/a", "n/a"] for cells in rows.values())
    assert re.search(r"microgpt / plain: \d+\.\d\dx", result.stdout)


def test_serve_attack_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """`serve_load.py --attack --tiny`: the script the README's attack table comes from still runs, with
    every attacker at work (slow loris, bad bodies, vanishing clients) and its goals reported."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--attack", "--tiny",
                             "--logs", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert list(rows) == ["no attack", "attack"]
    assert rows["attack"][1] == "0" and rows["attack"][5] == "20" and rows["attack"][6] == "7/7", rows
    assert "no steady request failed: met" in result.stdout
    assert "slots freed after vanished clients: met" in result.stdout
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and len(re.findall(r"POST /v1/completions 4(00|13) ", log)) == 7
