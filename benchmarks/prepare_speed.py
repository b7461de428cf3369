"""`prepare` throughput against raw tiktoken, and its peak memory on a large input.

    python benchmarks/prepare_speed.py [--size-mb 100] [--tokenizer gpt2] [--skip-raw]

The text is tinyshakespeare repeated to --size-mb, written to a temp dir. "raw" is the time spent
inside `encode_ordinary_batch` alone (1 MB chunks, a few per call, results dropped), the ceiling
for any pipeline on this machine. `prepare` runs in a fresh process so that its peak RSS is its
own; the baseline RSS is that process after its imports (torch among them), before any work.
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

from rich.console import Console
from rich.table import Table

from microgpt_cli.data import tokenizer as tok_lib
from microgpt_cli.data.dataprep import sample_path

CORPUS = sample_path("tinyshakespeare")  # packaged with microgpt
CHUNK = 1 << 20

CHILD = """
import json, resource, sys, time
from microgpt_cli.data.dataprep import prepare

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

baseline = rss_mb()
started = time.perf_counter()
meta = prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], force=True)
print(json.dumps({"seconds": time.perf_counter() - started, "baseline_mb": baseline,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]}))
"""


def make_corpus(path: Path, size_mb: float) -> int:
    copy = CORPUS.read_bytes()
    copies = max(1, round(size_mb * 1e6 / len(copy)))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(copy)
    return copies * len(copy)


def raw_mb_per_s(path: Path, name: str, threads: int) -> float:
    """MB/s inside encode_ordinary_batch only, streaming the file so memory stays small."""
    encoding = tok_lib.named(name)._encoding
    assert encoding is not None, "the raw baseline needs a tiktoken tokenizer"
    busy = 0.0
    done = 0
    with open(path, "rb") as f:
        while batch := [chunk for chunk in (f.read(CHUNK) for _ in range(4 * threads)) if chunk]:
            texts = [chunk.decode("utf-8", "ignore") for chunk in batch]
            start = time.perf_counter()
            encoding.encode_ordinary_batch(texts, num_threads=threads)
            busy += time.perf_counter() - start
            done += sum(map(len, batch))
    return done / busy / 1e6


def prepare_run(path: Path, out: Path, name: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), name],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100, help="size of the generated corpus (default 100)")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2, char, bpe or a tiktoken name (default gpt2)")
    parser.add_argument("--skip-raw", action="store_true", help="only run prepare (e.g. for a 1000 MB RSS check)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the corpus (default: a temp dir)")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = make_corpus(corpus, args.size_mb)
        measure_raw = not args.skip_raw and args.tokenizer not in ("char", "bpe")
        before = raw_mb_per_s(corpus, args.tokenizer, threads) if measure_raw else None
        run = prepare_run(corpus, Path(tmp) / "data", args.tokenizer)
        # Measured on both sides of the prepare run, so a change in machine load shows as a spread.
        after = raw_mb_per_s(corpus, args.tokenizer, threads) if measure_raw else None
        raw = (before + after) / 2 if before and after else None

    speed = size / run["seconds"] / 1e6
    table = Table(title=f"prepare --tokenizer {args.tokenizer} on {size / 1e6:,.0f} MB ({threads} threads)")
    for column in ("raw (before, after)", "prepare", "ratio", "tokens", "RSS at start", "peak RSS"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{raw:.1f} MB/s ({before:.1f}, {after:.1f})" if raw else "-", f"{speed:.1f} MB/s",
        f"{speed / raw:.0%}" if raw else "-",
        f"{run['tokens']:,}", f"{run['baseline_mb']:,.0f} MB", f"{run['peak_mb']:,.0f} MB",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
