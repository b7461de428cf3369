"""Quality per minute: the full-split validation loss each recipe reaches on character-level
tinyshakespeare, run through the real CLI (prepare, train, eval).

    python benchmarks/quality.py [--budget 120] [--recipes cpu,reference]

`reference` is the best-known minimal GPT trainer's documented CPU recipe (4 layers, 4 heads, 128
wide, context 64, batch 12, 2000 iterations, dropout 0, lr 1e-3) run with microgpt's trainer;
that trainer itself reports val loss 1.886 in about 120 s on this kind of machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from microgpt_cli.data.dataprep import sample_path

CORPUS = sample_path("tinyshakespeare")  # packaged with microgpt
REFERENCE = ["--n-layer", "4", "--n-head", "4", "--n-embed", "128", "--context", "64", "--batch-size", "12",
             "--dropout", "0", "--max-steps", "2000", "--lr", "1e-3", "--warmup-steps", "100", "--beta2", "0.99",
             "--activation", "gelu", "--eval-interval", "500"]


def microgpt(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "microgpt_cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr)
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of training for the presets")
    parser.add_argument("--recipes", default="cpu,reference", help="comma-separated: cpu, reference")
    args = parser.parse_args()
    table = Table(title=f"char-level tinyshakespeare, full-split val loss (budget {args.budget:g} s)")
    for col in ("recipe", "train seconds", "steps", "tokens/s", "val loss", "bits/byte"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        microgpt("prepare", str(CORPUS), "--tokenizer", "char", "--out", str(data))
        for recipe in args.recipes.split(","):
            out = Path(tmp) / recipe
            flags = REFERENCE if recipe == "reference" else ["--preset", recipe, "--time-budget", str(args.budget)]
            start = time.perf_counter()
            microgpt("train", "--data", str(data), "--out", str(out), *flags)
            wall = time.perf_counter() - start
            last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
            scores = json.loads(microgpt("eval", "--checkpoint", str(out / "last.pt"), "--data", str(data), "--json"))
            table.add_row(recipe, f"{last['elapsed']:.0f} (wall {wall:.0f})", str(last["step"]),
                          f"{last['step'] * _tokens_per_step(out) / last['elapsed']:,.0f}",
                          f"{scores['loss']:.4f}", f"{scores['bits_per_byte']:.3f}")
    Console().print(table)


def _tokens_per_step(run: Path) -> int:
    from microgpt_cli.io import checkpoint

    state = checkpoint.load(run / "last.pt")
    t = state.train_config
    return t["batch_size"] * t["grad_accum"] * state.model_config.context


if __name__ == "__main__":
    main()
