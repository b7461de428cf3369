"""Supervised fine-tuning on conversations (`prepare --chat`, `train --preset sft`): how the preset's
values were chosen, and what a base model gains from them.

    python benchmarks/sft.py            # about 25 minutes on 2 CPU cores
    python benchmarks/sft.py --quick    # a smaller run of every row (a few minutes), to check the script

No pretrained GPT-2 or chat dataset is at hand offline, so the base is a `--preset cpu` character model
(4 x 128, context 64) pretrained for 120 s on tinyshakespeare, and the conversations are generated: the
user asks to uppercase or reverse a word of 3 to 6 letters ("reverse fish"), the assistant answers with
the result alone ("hsif"). Each row fine-tunes the base on 6,000 of them with `--preset sft` as it is or
with one value changed, then scores 200 held-out words (never in the training set) through `microgpt chat`
(stdin mode, greedy): the share answered exactly, ending the turn there. The last column is the
tinyshakespeare val loss of the tuned model (the base's is in the first row): what the fine-tune forgot.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS = {"upper": str.upper, "reverse": lambda word: word[::-1]}


def microgpt(*args: object, cwd: Path, stdin: str | None = None) -> str:
    """Run `microgpt ARGS` to completion; its stdout."""
    result = subprocess.run([sys.executable, "-m", "microgpt_cli", *map(str, args)], cwd=cwd, input=stdin,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"microgpt {' '.join(map(str, args))} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def conversations(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, str, str]]:
    """(question, answer, word) triples over random words of 3 to 6 letters not in `exclude`."""
    rng = random.Random(seed)
    found: list[tuple[str, str, str]] = []
    while len(found) < n:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        op = rng.choice(sorted(OPS))
        if word not in exclude:
            found.append((f"{op} {word}", OPS[op](word), word))
    return found


def held_out_rate(run: Path, questions: list[tuple[str, str, str]], cwd: Path) -> float:
    """The share of questions answered exactly (each a new conversation, greedy)."""
    script = "".join(f"{question}\n/reset\n" for question, _, _ in questions)
    replies = microgpt("chat", "-c", run, "--temperature", 0, "--length", 16, stdin=script, cwd=cwd).splitlines()
    return sum(reply == answer for reply, (_, answer, _) in zip(replies, questions, strict=True)) / len(questions)


def eval_loss(run: Path, data: Path, cwd: Path) -> float:
    return float(json.loads(microgpt("eval", "-c", run, "--data", data, "--json", cwd=cwd))["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, to check the script end to end")
    args = parser.parse_args()
    pretrain, train_size, held_size = (20, 1000, 40) if args.quick else (120, 6000, 200)
    rows = [("`--preset sft`", []),
            ("`--preset sft --muon-lr 0.0067` (a third)", ["--muon-lr", "0.0067"]),
            ("`--preset sft --muon-lr 0.06` (3x)", ["--muon-lr", "0.06"]),
            ("`--preset sft --optimizer adamw` (AdamW for every weight)", ["--optimizer", "adamw"]),
            ("`--preset sft --optimizer adamw --lr 1e-3`", ["--optimizer", "adamw", "--lr", "1e-3"]),
            ("`--preset sft --epochs 1`", ["--epochs", "1"])]
    if args.quick:
        rows = [(name, [*flags, "--max-steps", "20"]) for name, flags in rows]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        microgpt("prepare", "--sample", "tinyshakespeare", "--tokenizer", "char", "--out", "text", cwd=cwd)
        microgpt("train", "--preset", "cpu", "--time-budget", pretrain, "--data", "text", "--out", "base", cwd=cwd)
        seen = conversations(train_size, seed=1)
        held = conversations(held_size, seed=2, exclude=frozenset(word for _, _, word in seen))
        lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                 for q, a, _ in seen]
        (cwd / "chats.jsonl").write_text("\n".join(lines) + "\n")
        microgpt("prepare", "chats.jsonl", "--chat", "--tokenizer-from", "base", "--out", "chats", cwd=cwd)
        base_loss = eval_loss(cwd / "base", cwd / "text", cwd)
        print("| run | steps | seconds | best val loss (answers) | held-out answers right | "
              "tinyshakespeare val loss after |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| the base model (no template: a plain transcript) | 0 | | | "
              f"{held_out_rate(cwd / 'base', held, cwd):.1%} | {base_loss:.3f} |", flush=True)
        for i, (name, flags) in enumerate(rows):
            out = cwd / f"run{i}"
            began = time.perf_counter()
            microgpt("train", "--init-from", "base", "--data", "chats", "--preset", "sft", *flags, "--out", out,
                     cwd=cwd)
            seconds = time.perf_counter() - began
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            best = min(m["val_loss"] for m in metrics if m.get("val_loss") is not None)
            print(f"| {name} | {metrics[-1]['step']:,} | {seconds:.0f} | {best:.3f} | "
                  f"{held_out_rate(out, held, cwd):.1%} | {eval_loss(out, cwd / 'text', cwd):.3f} |", flush=True)


if __name__ == "__main__":
    main()
