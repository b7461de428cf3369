"""Fine-tuning from a checkpoint (`microgpt train --init-from`): its memory, and what `--preset finetune` gives.

    python benchmarks/finetune.py                  # both parts, about 30 minutes on 2 CPU cores
    python benchmarks/finetune.py --part memory    # about 2 minutes

memory: a randomly initialized GPT-2 124M (built with transformers and saved locally, so no network is
needed; the weights' values do not change the memory) is imported with `microgpt import` and fine-tuned
with `--preset finetune` at batch 4 x context 256 on tinyshakespeare for a few steps, evaluations and saves
included. Prints the peak resident memory of the `microgpt train` process.

preset: no pretrained GPT-2 is at hand offline, so a small GPT-2-shaped model (4 layers x 256, GPT-2
tokenizer) is pretrained here on other English text (the package descriptions of the installed Python
packages), then fine-tuned on tinyshakespeare for the preset's steps: with the preset as it is, with its
LR divided and multiplied by 3, and, for comparison, the same model trained from random weights for the
same steps. Prints the tinyshakespeare val loss at the start and the best one reached, and what the best
checkpoint still scores on the pretraining text (how much of the base it forgot).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "microgpt_cli" / "samples" / "tinyshakespeare.txt"
PROXY_SHAPE = ["--n-layer", "4", "--n-head", "4", "--n-embed", "256", "--context", "128", "--activation", "gelu",
               "--dropout", "0"]
FINETUNE_FLAGS = ["--context", "128", "--batch-size", "8"]


def microgpt(*args: object, cwd: Path) -> tuple[float, int]:
    """Run `microgpt ARGS` to completion; returns (seconds, peak RSS in bytes) of that process."""
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "microgpt_cli", *map(str, args)], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read() if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"microgpt {' '.join(map(str, args))} failed:\n{stderr[-2000:]}")
    return time.perf_counter() - began, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def eval_loss(checkpoint: Path, data: Path, cwd: Path) -> float:
    """`microgpt eval`'s loss of `checkpoint` on the whole validation split of `data`."""
    result = subprocess.run([sys.executable, "-m", "microgpt_cli", "eval", "--checkpoint", str(checkpoint), "--data",
                             str(data), "--json"], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"microgpt eval {checkpoint} failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout)["loss"])


def val_losses(run: Path) -> tuple[float, float]:
    """(first, best) val loss of a run's metrics.jsonl."""
    losses = [entry["val_loss"] for entry in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "val_loss" in entry]
    return losses[0], min(losses)


def memory(work: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(work / "gpt2-random")
    microgpt("import", work / "gpt2-random", "--out", work / "gpt2.pt", cwd=work)
    microgpt("prepare", "--sample", "tinyshakespeare", "--out", work / "data-gpt2", cwd=work)
    steps = 4
    seconds, peak = microgpt("train", "--init-from", work / "gpt2.pt", "--preset", "finetune", "--data",
                             work / "data-gpt2", "--out", work / "ft-124m", "--batch-size", 4, "--context", 256,
                             "--max-steps", steps, "--eval-tokens", 4096, "--eval-interval", 2, cwd=work)
    print("\n| model | batch x context | steps (3 evaluations, 4 saves) | seconds | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    print(f"| GPT-2 124M | 4 x 256 | {steps} | {seconds:.0f} | {peak / 2**30:.2f} GiB |")


def preset(work: Path, base_seconds: float) -> None:
    from microgpt_cli.config import FINETUNE_LR, PRESETS

    site = next(p for p in map(Path, sys.path) if p.name == "site-packages")
    base_text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace")
                            for p in sorted(site.glob("*.dist-info/METADATA")))
    (work / "base.txt").write_text(base_text, encoding="utf-8")
    microgpt("prepare", work / "base.txt", "--out", work / "data-base", cwd=work)
    microgpt("prepare", "--sample", "tinyshakespeare", "--out", work / "data-shakespeare", cwd=work)
    microgpt("train", "--data", work / "data-base", "--out", work / "base", *PROXY_SHAPE, "--lr", "1e-3",
             "--warmup-steps", 50, "--time-budget", base_seconds, "--eval-tokens", 16384, cwd=work)
    steps = PRESETS["finetune"]["max_steps"]
    print(f"\nbase: {len(base_text):,} chars of package descriptions, {base_seconds:g} s of pretraining; val loss "
          f"{eval_loss(work / 'base', work / 'data-base', work):.3f} on them\n")
    print(f"| run ({steps} steps, batch 8 x context 128) | LR | seconds | tinyshakespeare val loss at start | best "
          "| package descriptions' val loss after |")
    print("|---|---:|---:|---:|---:|---:|")
    runs = [("--preset finetune, LR / 3", FINETUNE_LR / 3), ("--preset finetune", FINETUNE_LR),
            ("--preset finetune, LR x 3", FINETUNE_LR * 3)]
    for name, lr in runs:
        out = work / f"ft-{lr:g}"
        seconds, _ = microgpt("train", "--init-from", work / "base", "--preset", "finetune", "--lr", lr, "--data",
                              work / "data-shakespeare", "--out", out, *FINETUNE_FLAGS, cwd=work)
        start, best = val_losses(out)
        print(f"| {name} | {lr:g} | {seconds:.0f} | {start:.3f} | {best:.3f} | "
              f"{eval_loss(out, work / 'data-base', work):.3f} |", flush=True)
    out = work / "scratch"
    seconds, _ = microgpt("train", "--data", work / "data-shakespeare", "--out", out, *PROXY_SHAPE, "--max-steps",
                          steps, "--lr", "1e-3", "--warmup-steps", 20, "--eval-interval", 50, "--eval-tokens",
                          PRESETS["finetune"]["eval_tokens"],
                          "--batch-size", 8, cwd=work)
    first, best = val_losses(out)
    print(f"| from random weights (AdamW) | 0.001 | {seconds:.0f} | ({first:.3f} at step 50) | {best:.3f} | "
          f"{eval_loss(out, work / 'data-base', work):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["memory", "preset", "all"], default="all")
    parser.add_argument("--base-seconds", type=float, default=480, help="pretraining time of the small base model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("memory", "all"):
            memory(Path(tmp))
        if args.part in ("preset", "all"):
            preset(Path(tmp), args.base_seconds)


if __name__ == "__main__":
    main()
