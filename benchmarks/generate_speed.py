"""Generation speed: KV-cache decoding vs. recomputing the whole (cropped) context every token.

Random-init model at the default size (6 layers x 512, 8 heads, context 512, GPT-2 vocabulary);
greedy decoding from a 16-token prompt. Two uncached baselines recompute the whole (cropped)
sequence every token: through the model's API, which returns logits at every position, and in
its best case, with the output head run on the last position only.

    .venv/bin/python benchmarks/generate_speed.py [--tokens 500] [--prompt 16] [--threads 0] [--skip-api]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn as nn

from microgpt_cli.config import ModelConfig
from microgpt_cli.model import GPT
from microgpt_cli.sampling import Decoder


class LastPosition(nn.Module):
    """Wraps the output head so that only the last position's logits are computed."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, -1:])


def cached(model: GPT, prompt: torch.Tensor, tokens: int) -> list[int]:
    decoder = Decoder(model)
    out = []
    logits = decoder.prefill(prompt)
    for _ in range(tokens):
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
        logits = decoder.step(token)
    return out


def uncached(model: GPT, prompt: torch.Tensor, tokens: int) -> list[int]:
    seq, out = prompt, []
    for _ in range(tokens):
        token = model(seq[:, -model.config.context :])[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
        seq = torch.cat((seq, token), dim=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-api", action="store_true", help="skip the slowest baseline (all-position logits)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(ModelConfig(dropout=0.0)).eval()  # fp32: CPUs without bf16 units run bf16 far slower
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt))

    rows = []
    runs = [("cached (KV cache)", cached, False), ("uncached, last-position head", uncached, True),
            ("uncached, model API", uncached, False)]
    with torch.inference_mode():
        cached(model, prompt, 4)  # warm up allocators and kernels
        for name, run, last_only in runs[: 2 if args.skip_api else 3]:
            head = model.head
            model.head = LastPosition(head) if last_only else head  # type: ignore[assignment]
            start = time.perf_counter()
            out = run(model, prompt, args.tokens)
            rows.append((name, time.perf_counter() - start, out))
            model.head = head
    c = model.config
    print(f"model: {c.n_layer} layers x {c.n_embed}, {c.n_head} heads, context {c.context}, vocab {c.vocab_size}, "
          f"{model.num_params() / 1e6:.1f}M params; prompt {args.prompt} tokens, {args.tokens} new tokens, greedy")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':<30} {'seconds':>8} {'tokens/s':>9}")
    for name, seconds, _ in rows:
        print(f"{name:<30} {seconds:>8.2f} {args.tokens / seconds:>9.1f}")
    # Up to the point where the cache first slides, all see the same tokens and must agree.
    same = args.tokens if args.prompt + args.tokens <= c.context else c.context - args.prompt + 1
    for name, seconds, out in rows[1:]:
        identical = out[:same] == rows[0][2][:same]
        print(f"speedup over {name}: {seconds / rows[0][1]:.1f}x (first {same} tokens identical: {identical})")


if __name__ == "__main__":
    main()
