"""The training loop. It reports through an `on_event(kind, info)` callback and never prints:
the CLI decides how a person or a log file sees it.

Events (main process only): "start" (run facts), "log" (every --log-interval steps), "eval"
(every --eval-interval steps and at the end), "end" (summary).

Under `torchrun` every process runs this same code: each takes its slice of every batch, DDP
averages the gradients, evaluation is split across processes and summed, and only the main
process writes files or events."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from microgpt_cli import checkpoint, distributed
from microgpt_cli.config import ModelConfig, TrainConfig, save_config
from microgpt_cli.data import Batches, data_fingerprint, open_split, read_meta
from microgpt_cli.device import autocast, resolve_device
from microgpt_cli.errors import Interrupted, MicroGPTError
from microgpt_cli.files import atomic_write
from microgpt_cli.evaluate import split_loss
from microgpt_cli.model import GPT
from microgpt_cli.optim import build_optimizers, lr_factor
from microgpt_cli.plot import save_loss_plot
from microgpt_cli.tokenizer import Tokenizer, from_spec

EventFn = Callable[[str, dict[str, Any]], None]


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step, so that it can finish the
    step and save a resumable checkpoint instead of dying mid-write."""
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Everything the loop needs, built and checked before the first step."""

    cfg: TrainConfig
    model_config: ModelConfig
    out: Path
    world: distributed.World
    device: torch.device
    tokenizer: Tokenizer
    fingerprint: dict[str, Any]
    model: GPT
    optimizers: list[torch.optim.Optimizer]
    batches: Batches
    val_tokens: Any
    total_steps: int
    steps_per_epoch: float
    step: int = 0
    elapsed: float = 0.0
    best_val: float = math.inf
    resumed: bool = False

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.model_config.context


def _load_resume_state(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    if not (out / "last.pt").is_file():
        raise MicroGPTError(f"cannot --resume: {out / 'last.pt'} does not exist; start a run without --resume")
    saved = checkpoint.load(out / "last.pt")
    if "optimizer" not in saved:
        raise MicroGPTError(f"cannot --resume: {out / 'last.pt'} holds no training state")
    if saved.get("data") != fingerprint:
        raise MicroGPTError(f"cannot --resume: {out / 'last.pt'} was trained on different data or with another tokenizer")
    return saved


def _device_for(world: distributed.World, name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def build_run(model_config: ModelConfig | None, cfg: TrainConfig, resume: bool, force: bool,
              world: distributed.World) -> Run:
    """Check the data and options, build or restore the model and optimizers. With `resume`, the
    saved model and training settings win over the arguments (only data, out and device stay)."""
    out = Path(cfg.out)
    meta = read_meta(cfg.data)
    fingerprint = data_fingerprint(meta)
    saved = _load_resume_state(out, fingerprint) if resume else None
    if saved is not None:
        model_config = ModelConfig(**saved["model_config"])
        cfg = TrainConfig(**{**saved["train_config"], "data": cfg.data, "out": cfg.out, "device": cfg.device})
    elif (out / "last.pt").exists() and not force:
        raise MicroGPTError(f"{out} already holds a run; continue it with --resume, or pass --force to start over")
    model_config = model_config or ModelConfig()
    model_config.vocab_size = meta["vocab_size"]

    train_tokens = open_split(cfg.data, "train", meta)
    val_tokens = open_split(cfg.data, "val", meta)
    if len(val_tokens) <= model_config.context:
        raise MicroGPTError(
            f"--context {model_config.context} is longer than the validation split allows "
            f"({len(val_tokens)} tokens); use a smaller --context or a larger --val-fraction in prepare"
        )
    batches = Batches(train_tokens, model_config.context, cfg.batch_size, cfg.seed, world.rank, world.size)
    device = _device_for(world, cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    steps_per_epoch = batches.per_epoch / cfg.grad_accum
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    optimizers = build_optimizers(model, cfg, device)
    run = Run(cfg, model_config, out, world, device, from_spec(meta["tokenizer"]), fingerprint, model,
              optimizers, batches, val_tokens, total_steps, steps_per_epoch)
    if saved is not None:
        model.load_state_dict(saved["model"])
        for opt, state in zip(optimizers, saved["optimizer"]):
            opt.load_state_dict(state)
        run.step, run.elapsed, run.best_val, run.resumed = saved["step"], saved["elapsed"], saved["best_val"], True
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    return run


class RunFiles:
    """metrics.jsonl and the checkpoints of a run; inert on every process but the main one."""

    def __init__(self, run: Run):
        self.run = run
        self.active = run.world.main
        self.metrics_path = run.out / "metrics.jsonl"
        if self.active:
            run.out.mkdir(parents=True, exist_ok=True)
            if run.resumed:
                self._trim_metrics(run.step)
            else:
                self.metrics_path.unlink(missing_ok=True)
            save_config(run.out, run.model_config, run.cfg)

    def _trim_metrics(self, last_step: int) -> None:
        """Drop metric lines past the checkpoint we resume from: those steps are about to be redone."""
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
            atomic_write(self.metrics_path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))

    def record(self, entry: dict[str, Any]) -> None:
        if self.active:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def plot(self) -> None:
        """Redraw loss.png; a plot that cannot be written is not worth stopping a run for."""
        if self.active:
            try:
                save_loss_plot(self.run.out)
            except OSError:
                pass

    def save(self, name: str, metrics: dict[str, Any], resumable: bool) -> None:
        if not self.active:
            return
        run = self.run
        state = checkpoint.model_state(run.model, run.tokenizer, asdict(run.cfg), run.fingerprint, metrics)
        if resumable:
            rng = {"torch": torch.get_rng_state()}
            if run.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(run.device)
            state.update(optimizer=[opt.state_dict() for opt in run.optimizers], rng=rng, step=run.step,
                         elapsed=run.elapsed, best_val=run.best_val, world_size=run.world.size)
        checkpoint.save(run.out / name, state)


def evaluate_val(run: Run) -> float:
    """Validation loss over the split (or its --eval-tokens prefix); each process scores its
    share of the windows and the sums are combined, so the value is the single-process one."""
    loss_sum, count, _ = split_loss(run.model, run.val_tokens, run.cfg.batch_size, run.device, run.cfg.eval_tokens,
                                    shard=(run.world.rank, run.world.size))
    totals = distributed.sum_across(run.world, torch.tensor([loss_sum, count], dtype=torch.float64, device=run.device))
    return float(totals[0] / totals[1])


def train(
    model_config: ModelConfig | None, cfg: TrainConfig, resume: bool = False, force: bool = False,
    on_event: EventFn = lambda kind, info: None,
) -> dict[str, Any]:
    """Train a model on `cfg.data`, writing best.pt, last.pt and metrics.jsonl into `cfg.out`.

    With `resume`, continue the run in `cfg.out` exactly where last.pt left it. Returns the run
    summary. Raises MicroGPTError for bad input or divergence, Interrupted on Ctrl-C/SIGTERM."""
    world = distributed.launched_world()
    run = build_run(model_config, cfg, resume, force, world)
    distributed.init(world, run.device)
    try:
        return run_loop(run, on_event if world.main else lambda kind, info: None)
    except RuntimeError as exc:
        if not world.distributed:
            raise
        raise MicroGPTError(f"a peer process failed or vanished ({str(exc).splitlines()[0]}); "
                            f"{run.out / 'last.pt'} from the last save is intact: restart with --resume") from exc
    finally:
        distributed.shutdown(world)


def run_loop(run: Run, on_event: EventFn = lambda kind, info: None) -> dict[str, Any]:
    cfg, model, world = run.cfg, run.model, run.world
    runner: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if world.distributed:
        runner = DistributedDataParallel(runner, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    files = RunFiles(run)
    on_event("start", {
        "device": str(run.device), "world_size": world.size, "params": model.num_params(),
        "total_steps": run.total_steps, "step": run.step, "steps_per_epoch": run.steps_per_epoch,
        "tokens_per_step": run.tokens_per_step, "train_tokens": len(run.batches.tokens),
        "val_tokens": len(run.val_tokens), "tokenizer": run.tokenizer.name, "vocab_size": run.tokenizer.vocab_size,
        "model_config": asdict(run.model_config), "train_config": asdict(cfg), "resumed": run.resumed,
    })
    model.train()
    loss_sum = torch.zeros((), device=run.device)
    losses_since_log = 0
    # The time budget counts wall time, evaluations included; tokens/s counts training only.
    clock_start, elapsed_before = time.perf_counter(), run.elapsed
    window_start, window_steps = clock_start, 0
    last: dict[str, Any] = {}
    with stop_requests() as signals:
        while run.step < run.total_steps and not (cfg.time_budget and run.elapsed >= cfg.time_budget):
            factor = lr_factor(run.step, run.total_steps, cfg, run.elapsed)
            for opt in run.optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
            for micro in range(cfg.grad_accum):
                x, y = run.batches.get(run.step * cfg.grad_accum + micro)
                x, y = torch.from_numpy(x).to(run.device), torch.from_numpy(y).to(run.device)
                # Only the last micro-batch of a step needs the gradient all-reduce.
                sync = micro == cfg.grad_accum - 1 or not world.distributed
                with autocast(run.device), (nullcontext() if sync else runner.no_sync()):
                    loss = runner(x, y) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in run.optimizers:
                opt.step()
            for opt in run.optimizers:
                opt.zero_grad(set_to_none=True)
            run.step += 1
            losses_since_log += 1
            window_steps += 1
            run.elapsed = elapsed_before + time.perf_counter() - clock_start
            done = run.step >= run.total_steps or bool(cfg.time_budget and run.elapsed >= cfg.time_budget)
            evaluating = done or run.step % cfg.eval_interval == 0
            # One process sees a signal alone; the others learn of it at the next log step.
            logging = run.step % cfg.log_interval == 0 or evaluating or (bool(signals) and not world.distributed)
            stop = bool(signals) and not world.distributed
            if logging:
                reduced = distributed.sum_across(world, torch.stack([loss_sum, torch.tensor(float(bool(signals)), device=run.device)]))
                train_loss = reduced[0].item() / (losses_since_log * world.size)
                stop = bool(reduced[1].item())
                if not math.isfinite(train_loss):
                    kept = f" {run.out / 'best.pt'} is kept;" if (run.out / "best.pt").exists() and world.main else ""
                    raise MicroGPTError(f"training diverged: loss is {train_loss} at step {run.step};{kept} try a lower --lr")
                now = time.perf_counter()
                last = {
                    "step": run.step, "epoch": run.step / run.steps_per_epoch, "tokens": run.step * run.tokens_per_step,
                    "train_loss": train_loss,
                    "lr": cfg.lr * factor, "tokens_per_sec": window_steps * run.tokens_per_step / (now - window_start),
                    "elapsed": run.elapsed,
                }
                loss_sum.zero_()
                losses_since_log = 0
                window_start, window_steps = now, 0
                if not evaluating:
                    files.record(last)
                    on_event("log", {**last, "total_steps": _expected_steps(run)})
            if evaluating:
                last["val_loss"] = evaluate_val(run)
                improved = last["val_loss"] < run.best_val
                run.best_val = min(run.best_val, last["val_loss"])
                files.record(last)
                files.plot()
                if improved:
                    files.save("best.pt", last, resumable=False)
                files.save("last.pt", last, resumable=True)
                on_event("eval", {**last, "best_val": run.best_val, "improved": improved, "total_steps": _expected_steps(run)})
                window_start = time.perf_counter()
                run.elapsed = elapsed_before + window_start - clock_start
            elif stop:
                files.save("last.pt", last, resumable=True)
            if stop and not done:
                name = signal.Signals(signals[0]).name if signals else "a signal to another process"
                raise Interrupted(
                    f"stopped by {name} at step {run.step}/{run.total_steps}; {run.out / 'last.pt'} is saved: "
                    f"continue with `microgpt train --resume --out {run.out} --data {cfg.data}`"
                )
    summary = {
        "steps": run.step, "total_steps": run.total_steps, "epochs": run.step / run.steps_per_epoch,
        "best_val_loss": run.best_val, "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
        "elapsed": run.elapsed, "tokens_per_sec": run.step * run.tokens_per_step / run.elapsed if run.elapsed else 0.0,
        "best": str(run.out / "best.pt"), "last": str(run.out / "last.pt"), "params": model.num_params(),
    }
    on_event("end", summary)
    return summary


def _expected_steps(run: Run) -> int:
    """Total steps for the display: under a time budget, where the budget will end the run."""
    if run.cfg.time_budget and run.elapsed > 0:
        return min(run.total_steps, max(run.step, round(run.step * run.cfg.time_budget / run.elapsed)))
    return run.total_steps
