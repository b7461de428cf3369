"""microgpt against CTranslate2 and transformers on CPU: tokens/s, time to first token and peak RSS.

The model is GPT-2 124M (12 x 768, context 1024) with random weights from transformers'
`GPT2Config()` (seed 0), imported with `microgpt import` and converted with
`ct2-transformers-converter` (float32, and int8 with `--quantization int8`); all three engines run
the very same weights. Every measurement runs in a fresh process that imports only its own engine,
so peak RSS is that engine's alone; the engines take turns, round after round, so that a change in
the machine's load hits them all. Each process loads its model, warms up with one short
generation, then samples `--tokens` new tokens (top-k 50, temperature 0.8) for `--batch` copies of
a 16-token prompt, with `--threads` threads. Tokens/s is new tokens over the seconds from the start
of the call to the last token (what `microgpt generate` reports), time to first token is from that
start to the first sampled token, and "above import" is the peak RSS less the process's RSS right
after importing its engine (torch alone is about 220 MB; CTranslate2 about 30 MB).

- microgpt: `load_sampler` (the `generate` path) on the checkpoint, `quantize="int8"` for int8.
- CTranslate2: `Generator.generate_batch` in-process, `intra_threads=--threads`, one replica.
- transformers: `GPT2LMHeadModel.generate`; int8 is `torch.ao.quantization.quantize_dynamic` of its
  linear layers (GPT-2's `Conv1D` layers become `nn.Linear` first), the closest CPU int8 it has.

`--load N [N ...]` repeats every round under N busy background processes (one pure-Python loop
each), e.g. `--load 0 2` measures idle and busy (as many as cores) in one run. Before timing, the
engines' greedy tokens are compared (32 tokens, fp32): they must be the same.

    pip install torch==2.13.0 -e ".[bench]"
    python benchmarks/cpu_peers.py --load 0 2                      # the README table, about 10 minutes
    python benchmarks/cpu_peers.py --engines microgpt ctranslate2 --dtypes int8 --batches 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENGINES = ("microgpt", "ctranslate2", "transformers")
PROMPT_TEXT = "The old lighthouse keeper climbed the stairs every evening, counting each step as the waves"
PROMPT_TOKENS = 16
GREEDY_TOKENS = 32
WORKER_SECONDS = 900


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- the model, built once --------------------------------------------------------------------


def build_models(workdir: Path) -> dict[str, Path]:
    """GPT-2 124M with random weights, as a microgpt checkpoint, a transformers dir and CTranslate2 dirs."""
    paths = {"random": workdir / "hf-random", "checkpoint": workdir / "gpt2.pt", "hf": workdir / "hf",
             "ct2-fp32": workdir / "ct2-fp32", "ct2-int8": workdir / "ct2-int8"}
    if all(p.exists() for p in paths.values()):
        return paths
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"building GPT-2 124M with random weights in {workdir} (once)", file=sys.stderr, flush=True)
    code = ("import torch; from transformers import GPT2Config, GPT2LMHeadModel; torch.manual_seed(0); "
            f"GPT2LMHeadModel(GPT2Config()).save_pretrained({str(paths['random'])!r})")
    bin_dir = Path(sys.executable).parent
    steps = [
        [sys.executable, "-c", code],
        [str(bin_dir / "microgpt"), "import", str(paths["random"]), "--out", str(paths["checkpoint"]), "--force"],
        # The export holds the same weights plus GPT-2's tokenizer files, which the converter needs.
        [str(bin_dir / "microgpt"), "export", "-c", str(paths["checkpoint"]), "--format", "hf", "--out",
         str(paths["hf"]), "--force"],
        [str(bin_dir / "ct2-transformers-converter"), "--model", str(paths["hf"]), "--output_dir",
         str(paths["ct2-fp32"]), "--force"],
        [str(bin_dir / "ct2-transformers-converter"), "--model", str(paths["hf"]), "--output_dir",
         str(paths["ct2-int8"]), "--quantization", "int8", "--force"],
    ]
    for command in steps:
        subprocess.run(command, check=True, capture_output=True)
    return paths


# --- one measurement, in its own process ------------------------------------------------------


def prompt_ids() -> list[int]:
    from microgpt_cli.data.tokenizer import named

    return named("gpt2").encode(PROMPT_TEXT)[:PROMPT_TOKENS]


def run_microgpt(paths: dict[str, str], dtype: str, batch: int, tokens: int, threads: int,
                 greedy: bool) -> dict[str, Any]:
    from microgpt_cli.config import SamplingSettings
    from microgpt_cli.data.tokenizer import named
    from microgpt_cli.infer.sampling import load_sampler

    base = peak_rss_mib()
    ids = prompt_ids()
    text = named("gpt2").decode(ids)
    sampler = load_sampler(paths["checkpoint"], device="cpu", slots=batch,
                           quantize="int8" if dtype == "int8" else None, threads=threads)
    assert sampler.tokenizer.encode(text) == ids

    def sample(length: int, temperature: float) -> Any:
        stream = sampler.batch([text] * batch, SamplingSettings(length=length, temperature=temperature, top_k=50))
        for _ in stream:
            pass
        return stream

    if greedy:
        return {"greedy": sample(GREEDY_TOKENS, 0.0).new_ids[0]}
    sample(8, 0.8)  # warm-up
    stream = sample(tokens, 0.8)
    return {"tokens": stream.new_tokens, "seconds": stream.seconds, "first": stream.first_token_seconds,
            "base_rss": base}


def run_ctranslate2(paths: dict[str, str], dtype: str, batch: int, tokens: int, threads: int,
                    greedy: bool) -> dict[str, Any]:
    import ctranslate2

    base = peak_rss_mib()
    model_dir = paths[f"ct2-{dtype}"]
    generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="int8" if dtype == "int8" else "float32",
                                      intra_threads=threads, inter_threads=1)
    vocabulary = json.loads((Path(model_dir) / "vocabulary.json").read_text(encoding="utf-8"))
    start_tokens = [vocabulary[i] for i in json.loads(paths["prompt"])]

    def sample(length: int, temperature: float) -> tuple[float, float, list[int]]:
        first: list[float] = []
        began = time.perf_counter()

        def on_token(step: Any) -> bool:
            if not first:
                first.append(time.perf_counter() - began)
            return False

        results = generator.generate_batch(
            [start_tokens] * batch, max_length=length, min_length=length, include_prompt_in_result=False,
            sampling_topk=1 if temperature == 0 else 50, sampling_temperature=temperature or 1.0, callback=on_token)
        seconds = time.perf_counter() - began
        assert all(len(r.sequences_ids[0]) == length for r in results)
        return seconds, first[0], results[0].sequences_ids[0]

    if greedy:
        return {"greedy": sample(GREEDY_TOKENS, 0.0)[2]}
    sample(8, 0.8)
    seconds, first, _ = sample(tokens, 0.8)
    return {"tokens": batch * tokens, "seconds": seconds, "first": first, "base_rss": base}


def run_transformers(paths: dict[str, str], dtype: str, batch: int, tokens: int, threads: int,
                     greedy: bool) -> dict[str, Any]:
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.generation.streamers import BaseStreamer

    base = peak_rss_mib()
    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(paths["hf"]).eval()
    if dtype == "int8":
        import warnings

        from transformers.pytorch_utils import Conv1D

        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, Conv1D):  # GPT-2's (in, out) layers, which quantize_dynamic skips
                    linear = torch.nn.Linear(child.weight.size(0), child.nf)
                    linear.weight.data, linear.bias.data = child.weight.data.t().contiguous(), child.bias.data
                    setattr(module, name, linear)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    ids = torch.tensor([json.loads(paths["prompt"])] * batch)

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.at = 0, 0.0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def sample(length: int, temperature: float) -> tuple[float, float, list[int]]:
        streamer = FirstToken()
        options = {"do_sample": False} if temperature == 0 else {"do_sample": True, "top_k": 50,
                                                                  "temperature": temperature}
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=length, min_new_tokens=length, pad_token_id=50256,
                                 streamer=streamer if batch == 1 else None, **options)
        seconds = time.perf_counter() - began
        return seconds, (streamer.at - began) if streamer.at else float("nan"), out[0, ids.size(1):].tolist()

    if greedy:
        return {"greedy": sample(GREEDY_TOKENS, 0.0)[2]}
    sample(8, 0.8)
    seconds, first, _ = sample(tokens, 0.8)
    return {"tokens": batch * tokens, "seconds": seconds, "first": first, "base_rss": base}


def worker(args: argparse.Namespace) -> None:
    paths = json.loads(args.worker_paths)
    run = {"microgpt": run_microgpt, "ctranslate2": run_ctranslate2, "transformers": run_transformers}[args.worker]
    result = run(paths, args.dtype, args.batch, args.tokens, args.threads, args.greedy)
    result["peak_rss"] = peak_rss_mib()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = cpu.ru_utime + cpu.ru_stime
    print(json.dumps(result))


def measure(engine: str, paths: dict[str, Path], prompt: list[int], dtype: str, batch: int, args: argparse.Namespace,
            greedy: bool = False) -> dict[str, Any]:
    serial = {k: str(v) for k, v in paths.items()} | {"prompt": json.dumps(prompt)}
    command = [sys.executable, __file__, "--worker", engine, "--worker-paths", json.dumps(serial), "--dtype", dtype,
               "--batch", str(batch), "--tokens", str(args.tokens), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROGPT_", "OMP_", "CT2_"))}
    began = time.perf_counter()
    result = subprocess.run(command + (["--greedy"] if greedy else []), capture_output=True, text=True, env=env,
                            timeout=WORKER_SECONDS)
    if result.returncode != 0:
        raise SystemExit(f"{engine} {dtype} batch {batch} failed:\n{result.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - began
    return out


# --- busy background processes ----------------------------------------------------------------


class BusyLoad:
    """N processes that each keep one core busy (a pure-Python loop), for as long as the block runs."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> BusyLoad:
        # Each loop ends by itself if this process dies without cleaning up.
        loop = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


# --- the table --------------------------------------------------------------------------------


def summarize(results: dict[tuple[int, str, int, str], list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print("| load | weights | batch | engine | tokens/s (median, range) | first token | peak RSS | above import "
          "| vs CTranslate2 (tokens/s, first token, RSS) |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---|")
    for load in args.load:
        for dtype in args.dtypes:
            for batch in args.batches:
                peer = results.get((load, dtype, batch, "ctranslate2"))
                for engine in args.engines:
                    runs = results[(load, dtype, batch, engine)]
                    rates = [r["tokens"] / r["seconds"] for r in runs]
                    first = statistics.median(r["first"] for r in runs)
                    rss = max(r["peak_rss"] for r in runs)
                    above = max(r["peak_rss"] - r["base_rss"] for r in runs)
                    versus = ""
                    if peer is not None and engine != "ctranslate2":
                        # Ratios of the same round, so that both engines saw the same moment of the machine.
                        ratio = statistics.median((r["tokens"] / r["seconds"]) / (p["tokens"] / p["seconds"])
                                                  for r, p in zip(runs, peer, strict=True))
                        first_ratio = first / statistics.median(p["first"] for p in peer)
                        rss_ratio = rss / max(p["peak_rss"] for p in peer)
                        versus = f"**{ratio:.2f}x**, {first_ratio:.2f}x, {rss_ratio:.2f}x"
                    print(f"| {load} | {dtype} | {batch} | {engine} | {statistics.median(rates):,.1f} "
                          f"({min(rates):,.1f}–{max(rates):,.1f}) | {first * 1000:,.0f} ms | {rss:,.0f} MiB "
                          f"| {above:,.0f} MiB | {versus} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--load", nargs="+", type=int, default=[0],
                        help="busy background processes; several values measure each condition")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads for every engine")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "microgpt-cpu-peers",
                        help="where the models are built, once")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-paths", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--greedy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    paths = build_models(args.workdir)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    prompt = prompt_ids()
    greedy = {engine: measure(engine, paths, prompt, "fp32", 1, args, greedy=True)["greedy"] for engine in args.engines}
    same = all(tokens == greedy[args.engines[0]] for tokens in greedy.values())
    print(f"greedy tokens (fp32, {GREEDY_TOKENS}): {'the same for ' + ', '.join(args.engines) if same else greedy}",
          file=sys.stderr, flush=True)
    if not same:
        raise SystemExit("the engines disagree on the greedy tokens: they do not run the same model")

    results: dict[tuple[int, str, int, str], list[dict[str, Any]]] = {}
    started = time.perf_counter()
    for round_ in range(args.rounds):
        for load in args.load:
            with BusyLoad(load):
                for dtype in args.dtypes:
                    for batch in args.batches:
                        for engine in args.engines:
                            r = measure(engine, paths, prompt, dtype, batch, args)
                            results.setdefault((load, dtype, batch, engine), []).append(r)
                            print(f"round {round_ + 1}/{args.rounds}, load {load}: {engine} {dtype} batch {batch}: "
                                  f"{r['tokens'] / r['seconds']:,.1f} tokens/s, first token {r['first'] * 1000:,.0f} "
                                  f"ms, peak RSS {r['peak_rss']:,.0f} MiB", file=sys.stderr, flush=True)
    load_now = os.getloadavg()
    print(f"GPT-2 124M (random weights), prompt {PROMPT_TOKENS} tokens, {args.tokens} new tokens per sample, top-k 50, "
          f"temperature 0.8, {args.threads} threads; {args.rounds} interleaved rounds in "
          f"{time.perf_counter() - started:,.0f} s; load average at the end {load_now[0]:.1f}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}")
    summarize(results, args)


if __name__ == "__main__":
    main()
