"""Load and attack on `microgpt serve`: what concurrent clients get, and what hostile ones cannot take.

Starts the server (a real `microgpt serve` process, default settings) on a free port of 127.0.0.1
with a `--preset cpu`-shaped model (random weights: speed does not depend on them;
tinyshakespeare's characters as vocabulary). All traffic stays on 127.0.0.1 and every loop is
bounded by a count or a deadline.

Load (the default): rounds of 1 and 16 concurrent clients, each streaming `--requests`
completions of `--tokens` tokens one after another (httpx with asyncio): aggregate tokens/s and
time to first token.

    .venv/bin/python benchmarks/serve_load.py [--clients 1 16] [--tokens 200] [--requests 2] [--max-batch 16]

`--attack`: 32 normal clients (half streaming, half not; a quarter of them vanish mid-request:
streams closed after a few tokens, non-streaming requests abandoned by a 0.5 s client timeout)
run twice, each time on a fresh server: once alone, once while attackers (raw sockets) keep 1,000
slow-loris connections open (headers a line a second, reconnecting when cut) and send 50
oversized or invalid bodies. Goals: the steady clients' p95 time to first token within 3x of the
quiet run, none of their requests failing, the vanished clients' slots freed, the server's peak
RSS within 1.5x, its log under 1 MB.

    .venv/bin/python benchmarks/serve_load.py --attack [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from microgpt_cli.config import ModelConfig, resolve
from microgpt_cli.data.tokenizer import train_char
from microgpt_cli.io import checkpoint
from microgpt_cli.model.gpt import GPT

CORPUS = Path(__file__).resolve().parents[1] / "microgpt_cli" / "samples" / "tinyshakespeare.txt"
REQUEST_SECONDS = 120.0
TINY = {"n_layer": 1, "n_head": 2, "n_embed": 32, "context": 64}


def model_checkpoint(path: Path, tiny: bool = False) -> ModelConfig:
    tokenizer = train_char([CORPUS.read_text(encoding="utf-8")])
    shape = TINY if tiny else resolve("cpu", {})[0]  # the preset's model settings
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**shape, "vocab_size": tokenizer.vocab_size, "dropout": 0.0})).eval()
    checkpoint.save(path, checkpoint.Checkpoint.of(model, tokenizer))
    return model.config


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def rss(self) -> int | None:
        """Resident bytes now (Linux), else None."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(found[1]) * 1024 if found else None


@contextlib.contextmanager
def running(path: Path, log: Path, *args: str) -> Iterator[Server]:
    """`microgpt serve` on a free port, logging to `log`, until the block ends."""
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "microgpt_cli", "serve", "-c", str(path), "--port", "0",
                                 "--device", "cpu", *args], stderr=sink, stdout=subprocess.DEVNULL,
                                env={k: v for k, v in os.environ.items() if k != "MICROGPT_API_KEY"})
        try:
            deadline = time.monotonic() + 120
            while not (found := re.search(r"playground: (http://[\d.]+:\d+)/", log.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            server = Server(proc, found[1], log)
            asyncio.run(warm_up(server.url, int(args[args.index("--max-batch") + 1]) if "--max-batch" in args else 1))
            yield server
        finally:
            proc.terminate()
            proc.wait(timeout=60)


async def warm_up(url: str, batch: int) -> None:
    """A burst of `batch` short requests: the first step at each batch size costs more."""
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(client.post(url + "/v1/completions", json={"prompt": "A", "max_tokens": 20}, timeout=60)
                               for _ in range(batch)))


# --- load ------------------------------------------------------------------------------------------


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


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")


async def round_of(url: str, clients: int, tokens: int, requests: int) -> dict:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(client, url, tokens, requests, c) for c in range(clients)))
        seconds = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    firsts = [r[0] for r in results if r[2]]
    return {
        "clients": clients, "requests": len(results), "failed": sum(not r[2] for r in results),
        "tokens": sum(r[1] for r in results), "seconds": seconds,
        "rate": sum(r[1] for r in results) / seconds,
        "p50": statistics.median(firsts) if firsts else float("nan"), "p95": p95(firsts),
    }


def load(args: argparse.Namespace, path: Path, log: Path) -> None:
    with running(path, log, "--max-batch", str(args.max_batch)) as server:
        url = server.url + "/v1/completions"
        rounds = [asyncio.run(round_of(url, c, args.tokens, args.requests)) for c in args.clients]
    print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'tokens/s':>9} {'x 1 client':>10} {'TTFT p50':>9} "
          f"{'TTFT p95':>9}")
    single = rounds[0]["rate"]
    for r in rounds:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['failed']:>6} {r['rate']:>9.1f} {r['rate'] / single:>9.1f}x "
              f"{r['p50'] * 1000:>7.0f}ms {r['p95'] * 1000:>7.0f}ms")


# --- attack ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    ttft: float | None  # streaming requests: seconds to the first text
    seconds: float
    ok: bool
    steady: bool  # a client that stays (the vanishing quarter does not count)


async def normal_client(client: httpx.AsyncClient, url: str, index: int, tokens: int, requests: int,
                        vanish: bool) -> list[Outcome]:
    """Requests one after another: streamed by even clients; a vanishing client leaves each request
    early (its stream closed after a few pieces; a 0.5 s timeout when not streaming)."""
    outcomes = []
    stream = index % 2 == 0
    for r in range(requests):
        body = {"prompt": "ROMEO:", "max_tokens": tokens, "temperature": 0.8, "seed": index * 100 + r, "stream": stream}
        start, first, ok = time.perf_counter(), None, False
        try:
            if stream:
                async with client.stream("POST", url, json=body, timeout=REQUEST_SECONDS) as response:
                    pieces = 0
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            ok = response.status_code == 200
                        elif line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                            first = first if first is not None else time.perf_counter() - start
                            pieces += 1
                            if vanish and pieces == 3:
                                break  # closing the stream closes the connection
            else:
                answer = await client.post(url, json=body, timeout=0.5 if vanish else REQUEST_SECONDS)
                ok = answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == tokens
        except httpx.TimeoutException:
            pass
        except httpx.HTTPError as exc:
            print(f"normal client {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
        outcomes.append(Outcome(first, time.perf_counter() - start, ok, not vanish))
    return outcomes


async def slow_loris(port: int, until: float, opened: list[int]) -> None:
    """One slow-loris connection after another until `until`: request headers a line a second,
    never finished; a new connection when the server cuts one."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        opened[0] += 1
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while time.monotonic() < until:
                with contextlib.suppress(asyncio.TimeoutError):
                    if not await asyncio.wait_for(reader.read(4096), timeout=1.0) or reader.at_eof():
                        break  # cut by the server (its 408, then end of file)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def bad_requests(count: int) -> list[dict]:
    """httpx keyword arguments of requests with oversized or invalid bodies."""

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the cap is seen while reading
        for _ in range(3):
            yield b"x" * 500_000

    kinds: list[dict[str, Any]] = [
        {"content": b"x" * (2 << 20), "headers": {"Content-Type": "application/json"}},  # over the 1 MiB cap
        {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        {"json": {"prompt": 5}}, {"json": {"prompt": "A", "max_tokens": -1}}, {"json": {"prompt": "A", "n": 10**6}},
        {"json": {"messages": "hello"}},
    ]
    requests = [kinds[i % len(kinds)] for i in range(count)]
    return [{**r, "content": chunked()} if i % 7 == 6 else r for i, r in enumerate(requests)]  # some chunked


async def send_bad(url: str, requests: list[dict], spread: float) -> list[int]:
    async with httpx.AsyncClient() as client:
        async def one(i: int, request: dict) -> int:
            await asyncio.sleep(spread * i / max(1, len(requests)))
            try:
                return (await client.post(url, timeout=60, **request)).status_code
            except httpx.HTTPError:
                return 0
        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))


async def watch_rss(server: Server, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], server.rss() or 0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.1)


async def attack_round(server: Server, args: argparse.Namespace, attack: bool) -> dict:
    url = server.url + "/v1/completions"
    port = int(server.url.rsplit(":", 1)[1])
    peak, opened, stop = [server.rss() or 0], [0], asyncio.Event()
    watcher = asyncio.create_task(watch_rss(server, peak, stop))
    loris: list[asyncio.Task] = []
    bad: asyncio.Task | None = None
    if attack:  # the attackers stop when the normal clients are done (or after 10 minutes)
        until = time.monotonic() + 600.0
        loris = [asyncio.create_task(slow_loris(port, until, opened)) for _ in range(args.loris)]
        await asyncio.sleep(2.0 if not args.tiny else 0.2)  # the connections pile up first
        bad = asyncio.create_task(send_bad(url, bad_requests(args.bad), spread=5.0 if not args.tiny else 0.2))
    vanishing = set(range(0, args.normal, 4))  # a quarter, in both rounds: the attack is what differs
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.normal)) as client:
        per_client = await asyncio.gather(*(normal_client(client, url, i, args.tokens, args.requests, i in vanishing)
                                            for i in range(args.normal)))
    statuses = await bad if bad is not None else []
    for task in loris:
        task.cancel()
    await asyncio.gather(*loris, return_exceptions=True)
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient() as client:
        active = (await client.get(server.url + "/health")).json()["active"]
    stop.set()
    await watcher
    steady = [o for outcomes in per_client for o in outcomes if o.steady]
    firsts = [o.ttft for o in steady if o.ok and o.ttft is not None]
    return {"run": "attack" if attack else "no attack", "requests": len(steady),
            "failed": sum(not o.ok for o in steady), "p50": statistics.median(firsts) if firsts else float("nan"),
            "p95": p95(firsts), "vanished": len(vanishing) * args.requests, "active_after": active,
            "loris": opened[0], "bad": sum(400 <= s < 500 for s in statuses), "bad_sent": len(statuses),
            "rss": peak[0], "log": server.log.stat().st_size}


def attack(args: argparse.Namespace, path: Path, tmp: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this process holds every slow-loris socket
    want = args.loris + args.normal + args.bad + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    rows = []
    if args.tiny:  # one server for both rounds: a quick check that the script runs
        with running(path, tmp / "serve.log", "--max-batch", str(args.max_batch)) as server:
            rows = [asyncio.run(attack_round(server, args, attacked)) for attacked in (False, True)]
    for attacked in () if args.tiny else (False, True):
        with running(path, tmp / f"serve-{attacked}.log", "--max-batch", str(args.max_batch)) as server:
            rows.append(asyncio.run(attack_round(server, args, attacked)))
    print("| run | steady requests | failed | TTFT p50 | TTFT p95 | vanished (slots busy after) | slow-loris "
          "connections | bad bodies (4xx) | server RSS peak | log |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['requests']} | {r['failed']} | {r['p50'] * 1000:,.0f} ms | "
              f"{r['p95'] * 1000:,.0f} ms | {r['vanished']} ({r['active_after']}) | {r['loris']:,} | "
              f"{r['bad']}/{r['bad_sent']} | {r['rss'] / 2**20:,.0f} MiB | {r['log'] / 1024:,.1f} KiB |")
    quiet, loud = rows
    goals = [("TTFT p95 within 3x", loud["p95"] / quiet["p95"], 3.0),
             ("RSS within 1.5x", loud["rss"] / max(1, quiet["rss"]), 1.5)]
    for name, ratio, limit in goals:
        print(f"{name}: {ratio:.2f}x {'met' if ratio <= limit else 'NOT met'}")
    print(f"no steady request failed: {'met' if loud['failed'] == 0 else 'NOT met'}; log under 1 MB: "
          f"{'met' if loud['log'] < 2**20 else 'NOT met'}; slots freed after vanished clients: "
          f"{'met' if loud['active_after'] == 0 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=None, help="max_tokens of each request (200; --tiny 8)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--attack", action="store_true", help="the attack benchmark (see the module doc)")
    parser.add_argument("--normal", type=int, default=None, help="--attack: normal clients (32; --tiny 4)")
    parser.add_argument("--loris", type=int, default=None, help="--attack: slow-loris connections (1000; --tiny 20)")
    parser.add_argument("--bad", type=int, default=None, help="--attack: bad bodies (50; --tiny 7)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few clients: checks the script runs")
    parser.add_argument("--logs", type=Path, default=None, help="copy the servers' logs into this dir")
    args = parser.parse_args()
    for name, full, tiny in (("tokens", 200, 8), ("normal", 32, 4), ("loris", 1000, 20), ("bad", 50, 7)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        model = model_checkpoint(path, args.tiny)
        print(f"model: {'tiny' if args.tiny else '--preset cpu'} shape ({model.n_layer} layers x {model.n_embed}, "
              f"context {model.context}), char vocabulary; {args.tokens} tokens per request, {args.requests} requests "
              f"per client, --max-batch {args.max_batch}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, load average {os.getloadavg()[0]:.1f} at the start")
        if args.attack:
            attack(args, path, Path(tmp))
        else:
            load(args, path, Path(tmp) / "serve.log")
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in Path(tmp).glob("*.log"):
                shutil.copy(log, args.logs / log.name)


if __name__ == "__main__":
    main()
