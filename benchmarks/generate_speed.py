"""Decoding speed of the inference engine, batch 1 and 8, with time to first token.

Random-init models: the seed size (6 layers x 512, 8 heads, context 512, GPT-2 vocabulary, 45M
parameters) and, with `--shapes seed cpu`, the `--preset cpu` shape too (char vocabulary of 65);
a 16-token prompt, top-k 50 sampling at temperature 0.8, one host sync per step as `microgpt
generate` does to stream. Each batch size gets its own engine, as `generate --num-samples N`
does (the fp32 layout follows the batch). Rows: on CPU fp32 and int8 weights; on CUDA bf16 eager
and CUDA-graph-captured steps. "x alone" is the batch's wall time over the batch-1 time of the
same row kind: 8 samples for the price of that many single ones. With CUDA, the graph-captured
step's logits are also checked against an uncached bf16 forward, greedy, step by step.

    .venv/bin/python benchmarks/generate_speed.py [--device cpu|cuda] [--tokens 200] [--batches 1 8]
        [--shapes seed cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from microgpt_cli.config import ModelConfig, resolve
from microgpt_cli.infer.engine import Engine, make_generators, sample_next
from microgpt_cli.model.gpt import GPT


def decode(engine: Engine, prompt: list[int], batch: int, tokens: int) -> tuple[float, float]:
    """Seconds to the first sampled token and in all, for `batch` samples of `tokens` new tokens."""
    generators = make_generators(engine.device, 0, batch)
    start = time.perf_counter()
    logits = engine.prefill(0, prompt)
    engine.fork(0, range(1, batch))
    logits = logits.expand(batch, -1)
    first = 0.0
    for i in range(tokens):
        ids = sample_next(logits, 0.8, 50, 1.0, generators)
        if i + 1 < tokens:
            logits = engine.step(ids)
        ids.tolist()  # the host sync streaming needs
        if i == 0:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


def graph_matches_uncached(model: GPT, prompt: list[int], steps: int) -> tuple[float, float]:
    """Greedy decoding with the captured step against an uncached bf16 forward of the same
    sequence, step by step: the largest logit gap (in units of the logits' std) and the share of
    steps where both pick the same token."""
    engine = Engine(model, 1, graphs=True)
    reference = engine.model  # the engine's own bf16 copy, run without a cache
    seq = torch.tensor(prompt, device=engine.device)
    worst, same = 0.0, 0
    with torch.inference_mode():
        logits = engine.prefill(0, seq)[None]
        for _ in range(steps):
            uncached = reference(seq[None, -model.config.context :])[0, -1].float()
            worst = max(worst, float((logits[0] - uncached).abs().max() / uncached.std()))
            token = logits.argmax(-1)
            same += int(token.item() == uncached.argmax().item())
            seq = torch.cat((seq, token))
            logits = engine.step(token)
    return worst, same / steps


def model_of(shape: str, device: str) -> GPT:
    torch.manual_seed(0)
    if shape == "seed":
        config = ModelConfig(dropout=0.0)
    else:
        settings, _ = resolve("cpu", {})  # the preset's model settings
        config = ModelConfig(**{**settings, "vocab_size": 65, "dropout": 0.0})
    return GPT(config).eval().to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shapes", nargs="+", choices=["seed", "cpu"], default=["seed"])
    parser.add_argument("--threads", type=int, default=0, help="the engine's most CPU threads (0: torch's default)")
    args = parser.parse_args()
    kinds = [("fp32", dict(quantize=None)), ("int8", dict(quantize="int8"))] if args.device == "cpu" else \
        [("bf16 eager", dict(graphs=False)), ("bf16 CUDA graph", dict(graphs=True))]

    rows = []
    for shape in args.shapes:
        model = model_of(shape, args.device)
        prompt = torch.randint(0, model.config.vocab_size, (16,)).tolist()
        c = model.config
        print(f"{shape}: {c.n_layer} layers x {c.n_embed}, {c.n_head} heads, context {c.context}, vocab "
              f"{c.vocab_size}, {model.num_params() / 1e6:.1f}M params; prompt {len(prompt)} tokens, {args.tokens} "
              "new tokens per sample")
        for kind, options in kinds:
            alone = None
            for batch in args.batches:
                made = time.perf_counter()
                engine = Engine(model, batch, threads=args.threads or None, **options)  # type: ignore[arg-type]
                decode(engine, prompt, batch, 3)  # the one-time warm-up of this batch size (graph capture on CUDA)
                warmup = time.perf_counter() - made
                first, seconds = decode(engine, prompt, batch, args.tokens)
                alone = seconds if batch == 1 else alone
                rows.append((shape, kind, batch, batch * args.tokens / seconds, first, seconds,
                             seconds / alone if alone else float("nan"), warmup))
        if args.device == "cuda":
            gap, agree = graph_matches_uncached(model, prompt, 120)
            print(f"CUDA graph vs uncached bf16 forward, 120 greedy steps: largest logit gap {gap:.4f} of the logits' "
                  f"std, same token at {agree:.0%} of steps")

    if args.device == "cuda":
        print(f"machine: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        machine = platform.processor() or platform.machine()
        threads = args.threads or torch.get_num_threads()
        print(f"machine: {machine}, torch {torch.__version__}, up to {threads} threads; load average "
              f"{os.getloadavg()[0]:.1f}")
    print(f"{'model':<6} {'weights / step':<16} {'batch':>5} {'tokens/s':>9} {'first token':>12} {'seconds':>8} "
          f"{'x alone':>8} {'warm-up':>8}")
    for shape, kind, batch, rate, first, seconds, ratio, warmup in rows:
        print(f"{shape:<6} {kind:<16} {batch:>5} {rate:>9.1f} {first * 1000:>10.1f}ms {seconds:>8.2f} {ratio:>8.2f} "
              f"{warmup:>7.2f}s")


if __name__ == "__main__":
    main()
