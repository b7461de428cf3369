"""Training throughput: microgpt's training loop against a plain PyTorch implementation of the
same model and batch, with model FLOPs utilization against this machine's measured fp32 peak.

    python benchmarks/train_speed.py [--steps 300] [--preset cpu]

The plain baseline is what a careful user writes by hand: nn.Linear/LayerNorm blocks, SDPA,
torch.optim.AdamW with default settings, `loss.item()` every step, random batches from a tensor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from microgpt_cli.config import ModelConfig, TrainConfig, resolve
from microgpt_cli.data.dataprep import prepare, sample_path
from microgpt_cli.model.gpt import GPT
from microgpt_cli.training.events import Event, Logged
from microgpt_cli.training.loop import train

CORPUS = sample_path("tinyshakespeare")  # packaged with microgpt
# The reference CPU recipe for character-level tinyshakespeare: 4 layers, 4 heads, 128 wide,
# context 64, batch 12, dropout 0.
REFERENCE = dict(n_layer=4, n_head=4, n_embed=128, context=64, dropout=0.0, batch_size=12)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s: the ceiling MFU is quoted against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


class PlainBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, layers: int, context: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[PlainBlock(width, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def plain_tokens_per_sec(tokens: torch.Tensor, cfg: dict, vocab: int, steps: int) -> float:
    torch.manual_seed(0)
    model = PlainGPT(vocab, cfg["n_embed"], cfg["n_head"], cfg["n_layer"], cfg["context"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b, t = cfg["batch_size"], cfg["context"]

    def step() -> None:
        ix = torch.randint(len(tokens) - t - 1, (b,))
        x = torch.stack([tokens[i : i + t] for i in ix])
        y = torch.stack([tokens[i + 1 : i + t + 1] for i in ix])
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * b * t / (time.perf_counter() - start)


def microgpt_tokens_per_sec(data: Path, out: Path, overrides: dict, steps: int,
                            preset: str | None) -> tuple[float, GPT, int]:
    """Median tokens/s of microgpt's own loop (after warm-up), the model and its tokens per step."""
    model_kwargs, train_kwargs = resolve(preset, {**overrides, "max_steps": steps + 10, "eval_interval": 10**9,
                                                  "eval_tokens": 1000, "log_interval": 10, "warmup_steps": 0})
    rates: list[float] = []

    def record(event: Event) -> None:
        if isinstance(event, Logged) and event.metrics.tokens_per_sec is not None:
            rates.append(event.metrics.tokens_per_sec)

    train(ModelConfig(**model_kwargs), TrainConfig(data=str(data), out=str(out), **train_kwargs), force=True,
          on_event=record)
    model = GPT(ModelConfig(**{**model_kwargs, "vocab_size": 65}))
    return float(np.median(rates[1:])), model, train_kwargs["batch_size"] * model.config.context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best is reported (2 cores are noisy)")
    args = parser.parse_args()
    peak = matmul_peak()
    table = Table(title=f"training throughput, {torch.get_num_threads()} threads, fp32 peak {peak / 1e9:.0f} GFLOP/s")
    for col in ("implementation", "model", "tokens/s", "steps/s", "MFU"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        vocab = prepare([CORPUS], data, tokenizer="char")["vocab_size"]
        tokens = torch.from_numpy(np.fromfile(data / "train.bin", dtype="<u2").astype(np.int64))
        runs = [("reference model", REFERENCE, None), ("--preset cpu", {}, "cpu")]
        for label, overrides, preset in runs:
            rate, plain = 0.0, 0.0
            for _ in range(args.repeats):  # interleaved, so a noisy moment hits both alike
                measured, model, tokens_per_step = microgpt_tokens_per_sec(
                    data, Path(tmp) / "run", overrides, args.steps, preset)
                rate = max(rate, measured)
                if preset is None:
                    plain = max(plain, plain_tokens_per_sec(tokens, REFERENCE, vocab, args.steps))
            cfg = model.config
            shape = f"{cfg.n_layer}x{cfg.n_embed}, ctx {cfg.context}"
            if preset is None:
                table.add_row("plain PyTorch", shape, f"{plain:,.0f}", f"{plain / tokens_per_step:.1f}",
                              f"{plain * model.flops_per_token() / peak:.1%}")
            table.add_row(f"microgpt {label}", shape, f"{rate:,.0f}", f"{rate / tokens_per_step:.1f}",
                          f"{rate * model.flops_per_token() / peak:.1%}")
    Console().print(table)


if __name__ == "__main__":
    main()
