"""Choosing the device and numeric settings once, for every stage."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import platform
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from microgpt_cli.config import DEVICE_PATTERN
from microgpt_cli.errors import MicroGPTError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is not there is an error."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise MicroGPTError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    base, _, index = name.partition(":")
    if not available[base]:
        raise MicroGPTError(f"--device {name} is not available on this machine; use --device cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise MicroGPTError(f"--device {name} is not available: this machine has {count} CUDA device(s)")
    return torch.device(name)


def keep_freed_memory() -> None:
    """Let glibc's malloc keep what a training step frees, for the next step to reuse.

    A step's large buffers (a GPT-2-vocabulary model's logits and their gradient are tens of MB)
    are over glibc's mmap threshold, so by default each is mapped, zeroed page by page and unmapped
    again on every step: with a GPT-2 tokenizer on a CPU that was half the step time, in the
    kernel. Taken from the heap and not trimmed, they are reused instead; training gives the free
    pages back after each evaluation (release_freed_memory). For the CLI's long commands only: a
    library call must not change its caller's allocator."""
    glibc = _glibc()
    if glibc is None:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    glibc.mallopt(m_mmap_max, 0)
    glibc.mallopt(m_trim_threshold, 2**31 - 1)


def release_freed_memory() -> None:
    """Give back the free pages inside glibc's heap, at a rare point: after an evaluation and its
    saves in training (the small allocations they make land between a step's big freed buffers
    that keep_freed_memory keeps, which then cannot be merged and reused: without this a run's
    memory grew by a buffer every few evaluations), and after an engine has converted a model
    (the conversion's temporaries). The next allocations fault their pages in once again."""
    glibc = _glibc()
    if glibc is not None:
        glibc.malloc_trim(0)


def release_pages(tensor: torch.Tensor) -> None:
    """Drop this process's resident pages of `tensor` that are pages of a file (a checkpoint
    loaded with `mapped=True`), for a tensor its owner is done with: a layer whose int8 or packed
    copy replaced it, a weight the load has checked. It keeps the peak memory of a load near the
    model's final size. The kernel's page map says which pages those are: a dropped one comes
    back from the file if read again, so no value changes, while this process's own memory (the
    heap, a page of a private mapping written since, which became a private copy) is left alone."""
    if _libc() is None or tensor.device.type != "cpu" or not tensor.numel():
        return
    if tensor.is_contiguous():
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    else:  # the whole storage it views
        start = tensor.untyped_storage().data_ptr()
        end = start + tensor.untyped_storage().nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages only: neighbours may share the rest
    if last <= first:
        return
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first // page * 8)
            entries = np.frombuffer(pagemap.read((last - first) // page * 8), dtype=np.uint64)
    except OSError:
        return
    # Bit 63: present; bit 61: a page of a file or of shared memory, which keeps its data when
    # this process lets it go (a written page of a private mapping is anonymous: bit 61 clear).
    clean = ((entries >> np.uint64(63)) & (entries >> np.uint64(61)) & np.uint64(1)).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], clean, [0]))))  # starts and ends of clean runs
    madv_dontneed = 4  # from Linux's mman.h
    for run_start, run_end in edges.reshape(-1, 2).tolist():
        _madvise(first + run_start * page, (run_end - run_start) * page, madv_dontneed)


def in_huge_pages(tensor: torch.Tensor, release: bool = False) -> torch.Tensor:
    """A copy of CPU `tensor`, in memory that Linux backs with 2 MB pages (transparent huge
    pages, asked for with madvise) where the system gives them and the tensor fills at least
    one; a plain copy otherwise. With `release` (the caller is done with `tensor`) its pages are
    let go as they are copied (release_pages), so that a mapped checkpoint's weight and its copy
    are not in memory whole at once.

    The copy is always contiguous. A decode step reads every weight once, and with 4 KB pages
    that is a TLB miss every 4 KB: on the development VM GPT-2's one-sample fp32 step took
    13-13.5 ms from huge pages against 15.5-16.5 from the checkpoint's own pages. Only the whole
    2 MB pages inside the tensor are asked for, so its last partial page costs no more than 4 KB
    of memory."""
    huge = 2 << 20
    nbytes = tensor.numel() * tensor.element_size()
    mapped = None
    if (_libc() is not None and tensor.device.type == "cpu" and nbytes >= huge and tensor.is_contiguous()
            and _transparent_huge_pages() != "never"):
        mapped = _anonymous(nbytes + huge)
    if mapped is None:
        copy = tensor.clone(memory_format=torch.contiguous_format)  # row-major, whatever the source's strides
        if release:
            release_pages(tensor)
        return copy
    region, address = mapped
    offset = -address % huge  # the first 2 MB boundary
    madv_hugepage = 14  # from Linux's mman.h
    _madvise(address + offset, nbytes // huge * huge, madv_hugepage)
    # frombuffer holds `region` for as long as the tensor lives.
    copy = torch.frombuffer(region, dtype=tensor.dtype, count=tensor.numel(), offset=offset)
    source, chunk = tensor.reshape(-1), huge * 4 // tensor.element_size()  # 8 MB at a time
    for start in range(0, source.numel(), chunk):
        part = source[start : start + chunk]
        copy[start : start + part.numel()] = part
        if release:
            release_pages(part)
    return copy.view(tensor.shape)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A CPU tensor of zeros in fresh anonymous memory, which the system backs with a page only
    when it is first written: sized for the worst case, it costs what is used. Huge pages are
    refused for it, where the system would give them unasked: a 2 MB page would make a few
    written bytes cost 2 MB. None where the system refuses the mapping (an address-space limit,
    strict overcommit)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not nbytes:
        return torch.zeros(shape, dtype=dtype)
    mapped = _anonymous(nbytes)
    if mapped is None:
        return None
    region, address = mapped
    madv_nohugepage = 15  # from Linux's mman.h
    _madvise(address, nbytes, madv_nohugepage)
    return torch.frombuffer(region, dtype=dtype).view(shape)  # frombuffer holds `region` while the tensor lives


def _anonymous(nbytes: int) -> tuple[mmap.mmap, int] | None:
    """`nbytes` of fresh private memory (zeros, each page given when first written) and its
    address; None where the system refuses the mapping."""
    try:
        region = (mmap.mmap(-1, nbytes) if platform.system() == "Windows"
                  else mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    except OSError:
        return None
    return region, ctypes.addressof(ctypes.c_char.from_buffer(region))


def _madvise(address: int, length: int, advice: int) -> None:
    """Linux's madvise on [address, address + length); nothing elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice)


@functools.cache
def _transparent_huge_pages() -> str:
    """The system's transparent huge page mode (always, madvise or never; never where unknown)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.partition("[")[2].partition("]")[0] or "never"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None) if platform.system() == "Linux" else None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc, whose malloc the heap functions tune."""
    return _libc() if platform.libc_ver()[0] == "glibc" else None


def file_mapped(tensors: Iterable[torch.Tensor]) -> set[int]:
    """The ids of the CPU `tensors` that lie in a private mapping of a file (a checkpoint loaded
    mapped), from one read of /proc/self/maps."""
    if _libc() is None:
        return set()
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if fields[1].endswith("p") and len(fields) == 6 and fields[5].startswith("/"):
            low, _, high = fields[0].partition("-")
            ranges.append((int(low, 16), int(high, 16)))
    return {id(t) for t in tensors if t.device.type == "cpu" and t.numel()
            and any(low <= t.data_ptr() < high for low, high in ranges)}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside the block (unchanged for None), restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA only: CPUs without bf16 matmul units run bf16 ~100x slower than fp32."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def ensure_fits(num_params: int, bytes_per_param: int, device: torch.device, purpose: str) -> None:
    """Refuse, in one line, a model whose tensors cannot fit in the device's free memory: allocating
    them would fail deep inside torch, or get the process killed by the kernel."""
    needed, free = num_params * bytes_per_param, free_memory(device)
    if free is not None and needed > free:
        raise MicroGPTError(
            f"a model of {num_params:,} parameters needs about {needed / 1e9:,.1f} GB to {purpose}, more than the "
            f"{free / 1e9:,.1f} GB free on {device}; use a smaller --n-layer, --n-embed or vocabulary")


@contextlib.contextmanager
def allocation_errors(what: str, advice: str) -> Iterator[None]:
    """Turn torch's out-of-memory errors inside the block into one clear line: out of memory for
    `what`, and the `advice`."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError, and the CPU allocator's plain RuntimeError
        if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):
            raise
        raise MicroGPTError(f"out of memory for {what}: {str(exc).splitlines()[0]}; {advice}") from None


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU. Matched in order
# against torch.cuda.get_device_name, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)


def known_peak_flops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU named `device_name`, if it is in PEAK_BF16_FLOPS."""
    return next((flops for name, flops in PEAK_BF16_FLOPS if name in device_name), None)


def measured_peak_flops(device: torch.device, size: int = 4096, repeats: int = 10) -> float:
    """FLOP/s of a large matmul in the dtype training computes in on `device` (bf16 on CUDA): the
    peak to divide by where the GPU is not in the table. Takes well under a second on a GPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: kernel selection, clocks
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - began)


def peak_flops(device: torch.device) -> tuple[float, str] | None:
    """The peak FLOP/s that MFU is measured against on a CUDA device, and where it comes from;
    None elsewhere (MFU is a GPU measure)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    known = known_peak_flops(name)
    if known is not None:
        return known, f"{name}, bf16 dense datasheet peak"
    return measured_peak_flops(device), f"{name}, measured bf16 matmul"


def model_flops_utilization(tokens_per_sec: float, flops_per_token: float, peak: float, devices: int = 1) -> float:
    """MFU: the FLOP/s a model's training needs at this token rate, over the peak of the devices."""
    return tokens_per_sec * flops_per_token / (peak * devices)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
