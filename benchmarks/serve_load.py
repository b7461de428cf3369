"""Load on `microgpt serve`: aggregate tokens/s and time to first token for concurrent streaming clients.

Starts the server on a free port of 127.0.0.1 with a `--preset cpu`-shaped model (random weights:
speed does not depend on them; tinyshakespeare's characters as vocabulary), then runs rounds of
1 and 16 concurrent clients, each streaming `--requests` completions of `--tokens` tokens one after
another (httpx with asyncio). Every request is bounded in tokens and time; traffic stays on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py [--clients 1 16] [--tokens 200] [--requests 2] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from microgpt_cli.config import ModelConfig, resolve
from microgpt_cli.data.tokenizer import train_char
from microgpt_cli.io import checkpoint
from microgpt_cli.model.gpt import GPT

CORPUS = Path(__file__).resolve().parents[1] / "microgpt_cli" / "samples" / "tinyshakespeare.txt"
REQUEST_SECONDS = 120.0


def cpu_preset_checkpoint(path: Path) -> ModelConfig:
    tokenizer = train_char([CORPUS.read_text(encoding="utf-8")])
    shape, _ = resolve("cpu", {})  # the preset's model settings
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**shape, "vocab_size": tokenizer.vocab_size})).eval()
    checkpoint.save(path, checkpoint.Checkpoint.of(model, tokenizer))
    return model.config


async def one_client(client: httpx.AsyncClient, url: str, tokens: int, requests: int, seed: int) -> list[tuple]:
    """(seconds to first token, completion tokens, ok) per request, streamed one after another."""
    results = []
    for r in range(requests):
        body = {"prompt": "ROMEO:", "max_tokens": tokens, "temperature": 0.8, "seed": seed * 100 + r, "stream": True,
                "stream_options": {"include_usage": True}}
        start, first, count, ok = time.perf_counter(), None, 0, False
        try:
            async with client.stream("POST", url, json=body, timeout=REQUEST_SECONDS) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        ok = response.status_code == 200
                        break
                    event = json.loads(line[6:])
                    if first is None and event.get("choices") and event["choices"][0]["text"]:
                        first = time.perf_counter() - start
                    if event.get("usage"):
                        count = event["usage"]["completion_tokens"]
        except httpx.HTTPError:
            ok = False
        results.append((first if first is not None else float("nan"), count, ok))
    return results


async def round_of(url: str, clients: int, tokens: int, requests: int) -> dict:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(client, url, tokens, requests, c) for c in range(clients)))
        seconds = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    firsts = sorted(r[0] for r in results if r[2])
    return {
        "clients": clients, "requests": len(results), "failed": sum(not r[2] for r in results),
        "tokens": sum(r[1] for r in results), "seconds": seconds,
        "rate": sum(r[1] for r in results) / seconds,
        "p50": statistics.median(firsts) if firsts else float("nan"),
        "p95": firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))] if firsts else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens of each request")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        path = Path(tmp) / "cpu.pt"
        model = cpu_preset_checkpoint(path)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        server = subprocess.Popen([sys.executable, "-m", "microgpt_cli", "serve", "-c", str(path), "--port", str(port),
                                   "--device", "cpu", "--max-batch", str(args.max_batch)],
                                  stderr=subprocess.PIPE, text=True,
                                  env={k: v for k, v in os.environ.items() if k != "MICROGPT_API_KEY"})
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.communicate()[1][-2000:]}")
                time.sleep(0.2)
            url = f"http://127.0.0.1:{port}/v1/completions"
            asyncio.run(round_of(url, 1, 20, 1))  # warm-up
            rounds = [asyncio.run(round_of(url, c, args.tokens, args.requests)) for c in args.clients]
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"model: --preset cpu shape ({model.n_layer} layers x {model.n_embed}, context {model.context}), char "
          f"vocabulary; {args.tokens} tokens per request, {args.requests} requests per client, "
          f"--max-batch {args.max_batch}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'tokens/s':>9} {'x 1 client':>10} {'TTFT p50':>9} "
          f"{'TTFT p95':>9}")
    single = rounds[0]["rate"]
    for r in rounds:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['failed']:>6} {r['rate']:>9.1f} {r['rate'] / single:>9.1f}x "
              f"{r['p50'] * 1000:>7.0f}ms {r['p95'] * 1000:>7.0f}ms")


if __name__ == "__main__":
    main()
