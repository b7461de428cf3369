"""Choosing the device and numeric settings once, for every stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
def allocation_errors(num_params: int) -> Iterator[None]:
    """Turn torch's out-of-memory errors inside the block into one clear line."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError, and the CPU allocator's plain RuntimeError
        if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):
            raise
        raise MicroGPTError(f"out of memory for a model of {num_params:,} parameters: {str(exc).splitlines()[0]}; "
                            f"use a smaller model or batch") from None
