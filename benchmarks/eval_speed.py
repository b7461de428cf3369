"""Benchmark task speed: `microgpt eval --tasks` against lm-evaluation-harness's own `hf` model on
the same model exported with `microgpt export --format hf`, same tasks, batch size and CPU threads.

The model is a random-init GPT-2-shaped one (6 layers x 384, 6 heads, context 256, GELU, GPT-2
vocabulary: 34M parameters); the tasks are local and offline, built from tinyshakespeare:
- `bench_mc` (multiple_choice, like hellaswag): three lines of a play as the context, which of
  four lines follows them (--items items, 4 continuations each);
- `bench_ppl` (loglikelihood_rolling, like wikitext): --docs passages of 2,000 characters, each
  longer than the context, so scored in windows.

Two measurements per task:
- command: the wall time of the whole command (`microgpt eval -c CKPT --tasks T --include-path D`
  against `lm_eval --model hf --model_args pretrained=EXPORT,dtype=float32 --tasks T --include_path
  D --device cpu`), start-up, imports and the harness's task indexing included;
- scoring: in one process, simple_evaluate's time with each model already loaded, with the same
  TaskManager, so only the work per request differs.
Both also print their scores, which must agree (tests/test_eval_tasks.py checks that per document).

Each measurement runs --repeat times, microgpt's and the harness's alternating, and the table
shows the fastest of each (the machine is shared: the load is printed before and after).

    .venv/bin/python benchmarks/eval_speed.py [--items 100] [--docs 12] [--batch-size 16] [--threads 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from microgpt_cli.config import ModelConfig
from microgpt_cli.data.dataprep import sample_path
from microgpt_cli.data.tokenizer import named
from microgpt_cli.io import checkpoint
from microgpt_cli.io.export import export
from microgpt_cli.model.gpt import GPT

TASKS = ("bench_mc", "bench_ppl")


def write_tasks(root: Path, items: int, docs: int) -> None:
    text = sample_path("tinyshakespeare").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if len(line.split()) >= 6]
    rows = []
    for i in range(items):
        at = 4 * i
        endings = [lines[at + 3]] + [lines[(at + 3 + 97 * k) % len(lines)] for k in range(1, 4)]
        endings = [" " + e for e in endings[i % 4 :] + endings[: i % 4]]
        rows.append({"context": " ".join(lines[at : at + 3]), "endings": endings, "label": (4 - i % 4) % 4})
    documents = [{"text": text[5000 * i : 5000 * i + 2000]} for i in range(docs)]
    for name, data in (("mc", rows), ("docs", documents)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        "task: bench_mc\n" + head.format(root / "mc.jsonl") + 'output_type: multiple_choice\n'
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n'
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "ppl.yaml").write_text(
        "task: bench_ppl\n" + head.format(root / "docs.jsonl") + 'output_type: loglikelihood_rolling\n'
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")


def command_seconds(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def scoring_seconds(model: Any, tasks_dir: Path, task: str, batch_size: int) -> tuple[float, dict[str, Any]]:
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    # The same for both models, and no part of scoring: the environment report runs subprocesses.
    lm_eval.evaluator.add_env_info = lambda results: None
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager, batch_size=batch_size,
                                      device="cpu")
    return time.perf_counter() - start, results["results"][task]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--docs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env["HF_DATASETS_CACHE"] = str(root / "cache")
        os.environ.update({k: env[k] for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")})
        (root / "tasks").mkdir()
        write_tasks(root / "tasks", args.items, args.docs)
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=50257, n_layer=6, n_head=6, n_embed=384, context=256, dropout=0.0,
                             activation="gelu")
        model = GPT(config).eval()
        checkpoint.save(root / "model.pt", checkpoint.Checkpoint.of(model, named("gpt2")))
        export(root / "model.pt", root / "export", "hf")
        print(f"model: {model.num_params() / 1e6:.1f}M parameters, context {config.context}; batch size "
              f"{args.batch_size}, {args.threads} CPU threads; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores; load: {os.getloadavg()[0]:.2f}", file=sys.stderr)

        from lm_eval.models.huggingface import HFLM

        from microgpt_cli.infer.harness import MicroGPTLM
        from microgpt_cli.infer.sampling import Sampler

        ours = MicroGPTLM(Sampler(model, named("gpt2"), args.batch_size), args.batch_size)
        theirs = HFLM(pretrained=str(root / "export"), dtype="float32", device="cpu", batch_size=args.batch_size)
        rows = []
        for task in TASKS:
            micro = [sys.executable, "-m", "microgpt_cli", "eval", "-c", str(root / "model.pt"), "--tasks", task,
                     "--include-path", str(root / "tasks"), "--batch-size", str(args.batch_size), "--device", "cpu",
                     "--json"]
            harness = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                       f"pretrained={root / 'export'},dtype=float32", "--tasks", task, "--include_path",
                       str(root / "tasks"), "--batch_size", str(args.batch_size), "--device", "cpu"]
            times: dict[str, list[float]] = {"ours command": [], "theirs command": [], "ours": [], "theirs": []}
            for _ in range(args.repeat):
                times["ours command"].append(command_seconds(micro, env))
                times["theirs command"].append(command_seconds(harness, env))
                seconds, ours_result = scoring_seconds(ours, root / "tasks", task, args.batch_size)
                times["ours"].append(seconds)
                seconds, theirs_result = scoring_seconds(theirs, root / "tasks", task, args.batch_size)
                times["theirs"].append(seconds)
            ours_command, theirs_command = min(times["ours command"]), min(times["theirs command"])
            ours_scoring, theirs_scoring = min(times["ours"]), min(times["theirs"])
            metric = "acc,none" if task == "bench_mc" else "bits_per_byte,none"
            print(f"{task}: {metric} microgpt {ours_result[metric]:.6f}, hf {theirs_result[metric]:.6f}",
                  file=sys.stderr)
            rows.append((task, "command", ours_command, theirs_command))
            rows.append((task, "scoring", ours_scoring, theirs_scoring))
    print(f"load after: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print("| task | measured | microgpt eval --tasks (s) | lm_eval --model hf (s) | microgpt speed-up |")
    print("|---|---|---:|---:|---:|")
    for task, what, mine, other in rows:
        print(f"| {task} | {what} | {mine:.1f} | {other:.1f} | {other / mine:.2f}x |")


if __name__ == "__main__":
    main()
