"""Multi-process training on torch.distributed, started by `torchrun`: one place that knows
about ranks, so the training loop reads the same for one process or many."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from microgpt_cli.errors import MicroGPTError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes checkpoints, metrics and the display."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The world torchrun describes in the environment (one process when not under torchrun)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise MicroGPTError(f"invalid torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from exc


def init(world: World, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes. A peer that dies
    makes collectives fail within the timeout instead of hanging forever."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=int(os.environ.get("MICROGPT_DIST_TIMEOUT", 300))))


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(world: World, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `values` over all processes (identity for one process)."""
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values
