"""Run under torchrun by test_distributed.py: the same calls `microgpt train` makes, after which
every rank writes its own final weights so that the test can check the ranks stayed in step, and
the dropout masks of its first steps so that the test can check they differ across ranks.

usage: torchrun --nproc_per_node=N tests/ddp_worker.py DATA OUT MAX_STEPS
"""

import sys
from pathlib import Path

import torch

from microgpt_cli.config import ModelConfig, TrainConfig
from microgpt_cli.training import distributed
from microgpt_cli.training.loop import build_run, run_loop

RECORDED_MICRO_BATCHES = 6  # 3 steps of 2 micro-batches


def record_masks(model: torch.nn.Module, masks: list[torch.Tensor]) -> None:
    """Keep the embedding dropout's masks of the first training micro-batches. The embeddings it drops are
    never exactly 0, so the zeros of its output are its mask."""

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module.training and len(masks) < RECORDED_MICRO_BATCHES:
            masks.append(output == 0)

    model.get_submodule("dropout").register_forward_hook(hook)


if __name__ == "__main__":
    data, out, max_steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    model_config = ModelConfig(n_layer=1, n_head=2, n_embed=32, context=32, dropout=0.1)
    train_config = TrainConfig(data=data, out=str(out), max_steps=max_steps, eval_interval=10, batch_size=8,
                               grad_accum=2, eval_tokens=3000)
    world = distributed.launched_world()
    run = build_run(model_config, train_config, resume=False, force=True, world=world)
    masks: list[torch.Tensor] = []
    record_masks(run.model, masks)
    distributed.init(world, run.device)
    run_loop(run)
    torch.save(run.model.state_dict(), out / f"rank{world.rank}.pt")
    torch.save(masks, out / f"rank{world.rank}_masks.pt")
    distributed.shutdown(world)
