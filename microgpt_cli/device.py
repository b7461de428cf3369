"""Choosing the device and numeric settings once, for every stage."""

from __future__ import annotations

import contextlib

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
