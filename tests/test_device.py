"""What the GPU measurements rest on, checked on any machine: the peak table, a measured peak and
the MFU arithmetic (tests/test_train.py covers the summary's warm-up-free tokens/s); and the
process memory settings (glibc's heap, the pages of mapped checkpoints)."""

from __future__ import annotations

import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microgpt_cli.config import PRESETS, ModelConfig, resolve
from microgpt_cli.device import (
    in_huge_pages,
    known_peak_flops,
    measured_peak_flops,
    model_flops_utilization,
    peak_flops,
    release_pages,
)
from microgpt_cli.model.gpt import GPT


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12), ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla T4", 65e12),
    ("Some Future GPU", None),
])
def test_known_gpus_have_their_datasheet_peak(name: str, peak: float | None) -> None:
    assert known_peak_flops(name) == peak


def test_an_unknown_device_gets_a_measured_peak() -> None:
    flops = measured_peak_flops(torch.device("cpu"), size=256, repeats=3)
    assert math.isfinite(flops) and 1e8 < flops < 1e15
    assert peak_flops(torch.device("cpu")) is None  # MFU is reported on CUDA only


def test_mfu_of_the_gpt2_preset_reproduces_the_figures_measured_on_an_h200() -> None:
    """The issue's H200 table: 452k tokens/s of --preset gpt2 was 'about 39%' of 989 TFLOP/s."""
    model_kwargs, _ = resolve("gpt2", {})
    with torch.device("meta"):  # the shape is all that counts: no memory for 124M weights
        model = GPT(ModelConfig(vocab_size=50257, **model_kwargs))
    assert model.config.padded_vocab == 50304 and PRESETS["gpt2"]["pad_vocab"] == 128
    flops = model.flops_per_token()
    assert 850e6 < flops < 870e6  # 6 x 124M (head included, positions not) + attention over 1024 positions
    assert model_flops_utilization(452e3, flops, 989e12) == pytest.approx(0.39, abs=0.01)
    assert model_flops_utilization(8 * 452e3, flops, 989e12, devices=8) == pytest.approx(0.39, abs=0.01)


_FAULTS_PER_STEP = """
import resource, sys, torch
from microgpt_cli.device import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
def step() -> None:  # a GPT-2-vocabulary step's logits and their gradient: 256 x 50,257 floats each
    logits = torch.ones(256, 50257)
    logits.mul_(2)
    del logits
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 30)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults() -> None:
    """What `train` and `eval` call: without it, each 51 MB buffer is mapped afresh and faults in
    page by page (~12,500 faults) every step; with it, a step reuses the last one's memory (the
    heap's small allocations between steps still make one step in ten or so take fresh pages)."""
    faults = {how: int(subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, how], capture_output=True, text=True,
                                      check=True).stdout) for how in ("default", "kept")}
    assert faults["default"] > 10_000 and faults["kept"] < faults["default"] / 3, faults


_HOLE_GIVEN_BACK = """
import torch
from microgpt_cli.device import keep_freed_memory, release_freed_memory
keep_freed_memory()
def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096
big = torch.ones(50_000_000)  # 200 MB from the heap
small = torch.ones(1000)  # above it: the freed buffer becomes a hole, not the heap's top
del big
before = rss()
release_freed_memory()
print(before - rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_memory_is_given_back_after_an_evaluation() -> None:
    """What training calls after each evaluation and its saves: without it, holes left between the
    small allocations of evaluations and saves made a run's memory grow by a buffer every few
    evaluations."""
    released = int(subprocess.run([sys.executable, "-c", _HOLE_GIVEN_BACK], capture_output=True, text=True,
                                  check=True).stdout)
    assert released > 150_000_000, released


def _rss_file() -> int:
    """This process's resident pages of mapped files, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(platform.system() != "Linux", reason="Linux's madvise and /proc")
def test_released_pages_of_a_mapped_file_come_back_unchanged_and_other_memory_is_left_alone(tmp_path: Path) -> None:
    """release_pages drops a file-mapped tensor's resident pages, whose values then read back
    from the file, but keeps the pages written since (dropping those would revert them to the
    file); on a tensor of ordinary memory it must do nothing (dropping those pages would zero
    them)."""
    values = torch.arange(8_000_000, dtype=torch.float32)  # 32 MB
    torch.save({"w": values}, tmp_path / "w.pt")
    mapped = torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)["w"]
    assert torch.equal(mapped, values)  # every page read in
    mapped[:1_000_000] += 1  # 4 MB written: this process's own copy of those pages, which must stay
    before = _rss_file()
    release_pages(mapped)
    assert before - _rss_file() > 20_000_000
    assert torch.equal(mapped[1_000_000:], values[1_000_000:])
    assert torch.equal(mapped[:1_000_000], values[:1_000_000] + 1)
    heap = values.clone()
    release_pages(heap)
    assert torch.equal(heap, values)


def _anon_huge_bytes(address: int) -> int:
    """The bytes of 2 MB pages in the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, _, high = head.partition("-")
            inside = int(low, 16) <= address < int(high, 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
                    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="needs Linux's transparent huge pages")
def test_weights_copied_into_huge_pages_keep_their_values() -> None:
    """What the one-sample fp32 layout reads its weights from: 2 MB pages (fewer TLB misses per
    step), the same values; a tensor under 2 MB gets a plain copy."""
    values = torch.randn(3_000_000)  # 12 MB
    copy = in_huge_pages(values)
    assert copy.data_ptr() != values.data_ptr() and torch.equal(copy, values)
    assert _anon_huge_bytes(copy.data_ptr()) >= 2 << 20
    small = torch.randn(1000)
    copy = in_huge_pages(small)
    assert copy.data_ptr() != small.data_ptr() and torch.equal(copy, small)
    transposed = values.view(1000, 3000).t()  # a weight of another layout comes out row-major
    assert in_huge_pages(transposed).is_contiguous() and in_huge_pages(transposed[:, :100]).is_contiguous()
    assert torch.equal(in_huge_pages(transposed), transposed)
