"""The training loop. It reports through an `on_event(kind, info)` callback and never prints:
the CLI decides how a person or a log file sees it.

Events: "start" (run facts), "log" (every --log-interval steps), "eval" (every --eval-interval
steps and at the end), "end" (summary)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from microgpt_cli import checkpoint
from microgpt_cli.config import ModelConfig, TrainConfig
from microgpt_cli.data import Batches, data_fingerprint, open_split, read_meta
from microgpt_cli.device import autocast, resolve_device
from microgpt_cli.errors import Interrupted, MicroGPTError
from microgpt_cli.evaluate import split_loss
from microgpt_cli.model import GPT
from microgpt_cli.optim import build_optimizers, lr_factor
from microgpt_cli.tokenizer import from_spec

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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the checkpoint we resume from: those steps are about to be redone."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    checkpoint.atomic_write(path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))


def train(
    model_config: ModelConfig | None, cfg: TrainConfig, resume: bool = False, force: bool = False,
    on_event: EventFn = lambda kind, info: None,
) -> dict[str, Any]:
    """Train a model on `cfg.data`, writing best.pt, last.pt and metrics.jsonl into `cfg.out`.

    With `resume`, continue the run in `cfg.out` exactly where last.pt left it (its model and
    training settings win over the arguments). Returns the run summary."""
    out = Path(cfg.out)
    meta = read_meta(cfg.data)
    tokenizer = from_spec(meta["tokenizer"])
    fingerprint = data_fingerprint(meta)
    saved: dict[str, Any] | None = None
    if resume:
        if not (out / "last.pt").is_file():
            raise MicroGPTError(f"cannot --resume: {out / 'last.pt'} does not exist; start a run without --resume")
        saved = checkpoint.load(out / "last.pt")
        if saved.get("data") != fingerprint:
            raise MicroGPTError(
                f"cannot --resume: {out / 'last.pt'} was trained on different data or with another tokenizer than {cfg.data}"
            )
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
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    batches = Batches(train_tokens, model_config.context, cfg.batch_size, cfg.seed)
    steps_per_epoch = batches.per_epoch / cfg.grad_accum
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    optimizers = build_optimizers(model, cfg, device)
    step, elapsed, best_val = 0, 0.0, math.inf
    if saved is not None:
        model.load_state_dict(saved["model"])
        for opt, state in zip(optimizers, saved["optimizer"]):
            opt.load_state_dict(state)
        step, elapsed, best_val = saved["step"], saved["elapsed"], saved["best_val"]
        _set_rng_state(saved["rng"], device)
        _trim_metrics(out / "metrics.jsonl", step)
    runner = torch.compile(model) if cfg.compile else model
    token_bytes = tokenizer.bytes_per_token()
    train_dict = asdict(cfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_config.context

    out.mkdir(parents=True, exist_ok=True)
    metrics_file = (out / "metrics.jsonl").open("a" if resume else "w")

    def record(entry: dict[str, Any]) -> None:
        metrics_file.write(json.dumps(entry) + "\n")
        metrics_file.flush()

    def evaluate() -> float:
        loss_sum, count, _ = split_loss(model, val_tokens, cfg.batch_size, device, cfg.eval_tokens, token_bytes)
        return loss_sum / count

    def save(name: str, metrics: dict[str, Any], resumable: bool) -> None:
        state = checkpoint.model_state(model, tokenizer, train_dict, fingerprint, metrics)
        if resumable:
            state.update(
                optimizer=[opt.state_dict() for opt in optimizers], rng=_rng_state(device),
                step=step, elapsed=elapsed, best_val=best_val, world_size=1,
            )
        checkpoint.save(out / name, state)

    on_event("start", {
        "device": str(device), "params": model.num_params(), "total_steps": total_steps, "step": step,
        "steps_per_epoch": steps_per_epoch, "tokens_per_step": tokens_per_step, "train_tokens": len(train_tokens),
        "val_tokens": len(val_tokens), "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
        "model_config": asdict(model_config), "train_config": train_dict, "resumed": saved is not None,
    })
    model.train()
    loss_sum = torch.zeros((), device=device)
    losses_since_log = 0
    # The time budget counts wall time, evaluations included; tokens/s counts training steps only.
    clock_start, elapsed_before = time.perf_counter(), elapsed
    window_start, window_steps = clock_start, 0
    last: dict[str, Any] = {}
    with stop_requests() as stop:
        while step < total_steps and not (cfg.time_budget and elapsed >= cfg.time_budget):
            factor = lr_factor(step, total_steps, cfg, elapsed)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
            for micro in range(cfg.grad_accum):
                x, y = batches.get(step * cfg.grad_accum + micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device):
                    loss = runner(x, y) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            losses_since_log += 1
            window_steps += 1
            elapsed = elapsed_before + time.perf_counter() - clock_start
            done = step >= total_steps or bool(cfg.time_budget and elapsed >= cfg.time_budget)
            evaluating = done or step % cfg.eval_interval == 0
            if step % cfg.log_interval == 0 or evaluating or stop:
                train_loss = loss_sum.item() / losses_since_log
                if not math.isfinite(train_loss):
                    metrics_file.close()
                    kept = f" {out / 'best.pt'} (val loss {best_val:.4f}) is kept;" if math.isfinite(best_val) else ""
                    raise MicroGPTError(f"training diverged: loss is {train_loss} at step {step};{kept} try a lower --lr")
                now = time.perf_counter()
                last = {
                    "step": step, "epoch": step / steps_per_epoch, "train_loss": train_loss,
                    "lr": cfg.lr * factor, "tokens_per_sec": window_steps * tokens_per_step / (now - window_start),
                    "elapsed": elapsed,
                }
                loss_sum.zero_()
                losses_since_log = 0
                window_start, window_steps = now, 0
                if not evaluating:
                    record(last)
                    on_event("log", {**last, "total_steps": total_steps})
            if evaluating:
                last["val_loss"] = evaluate()
                improved = last["val_loss"] < best_val
                best_val = min(best_val, last["val_loss"])
                record(last)
                if improved:
                    save("best.pt", last, resumable=False)
                save("last.pt", last, resumable=True)
                on_event("eval", {**last, "best_val": best_val, "improved": improved, "total_steps": total_steps})
                window_start = time.perf_counter()
                elapsed = elapsed_before + window_start - clock_start
            elif stop:
                save("last.pt", last, resumable=True)
            if stop and not done:
                metrics_file.close()
                raise Interrupted(
                    f"stopped by {signal.Signals(stop[0]).name} at step {step}/{total_steps}; "
                    f"{out / 'last.pt'} is saved: continue with `microgpt train --resume --out {out} --data {cfg.data}`"
                )
    metrics_file.close()
    summary = {
        "steps": step, "total_steps": total_steps, "epochs": step / steps_per_epoch, "best_val_loss": best_val,
        "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"), "elapsed": elapsed,
        "tokens_per_sec": step * tokens_per_step / elapsed if elapsed else 0.0,
        "best": str(out / "best.pt"), "last": str(out / "last.pt"), "params": model.num_params(),
    }
    on_event("end", summary)
    return summary
