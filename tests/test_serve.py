"""`microgpt serve` driven by clients no one here wrote: the official openai package, httpx and raw
sockets for malformed and hostile requests, and headless Chromium through selenium for the
playground. The servers run in threads of this process (a real socket, uvicorn and batcher, without
a torch import each); a subprocess where signals and the startup lines matter.

The model has GPT-2's tokenizer, so that tokens are not characters, and ends its text (the
end-of-text token) right after a "." (see `eot_after_full_stop`)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from microgpt_cli.data.tokenizer import Tokenizer, from_spec
from microgpt_cli.infer.sampling import Sampler, generate_text
from microgpt_cli.io import checkpoint
from microgpt_cli.model.gpt import GPT
from microgpt_cli.serve.batcher import Batcher, Piece, Request
from microgpt_cli.serve.connections import LOGGERS, setup_logging
from microgpt_cli.serve.gate import OPEN_PATHS
from microgpt_cli.serve.server import Server, Service, build_app, model_info
from microgpt_cli.serve.settings import ServeSettings

from clitools import assert_one_error_line, json_junk, run_cli
from conftest import tiny_model

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
BIG = 10**6  # max tokens of requests that must outlive any wait in a test


def eot_after_full_stop(model: GPT, tokenizer: Tokenizer) -> None:
    """Make a random model end its text right after a "." and at no other time: the "." embedding
    points along a direction d that only the end-of-text row (and, weaker, the "." row) of the
    untied head reads, and the final norm's bias pushes both rows far down everywhere else."""
    dot, eot = tokenizer.encode(".")[0], tokenizer.eot_id
    assert eot is not None
    with torch.no_grad():
        d = torch.randn(model.config.n_embed, generator=torch.Generator().manual_seed(1))
        d = (d - d.mean()) / (d - d.mean()).norm()  # a direction LayerNorm keeps
        model.tok_emb.weight[dot] = 20 * d
        model.norm.bias.copy_(-4 * d)  # type: ignore[operator]
        model.head.weight[eot] = 4 * d
        model.head.weight[dot] = 3 * d


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return from_spec({"kind": "gpt2"})


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, gpt2: Tokenizer) -> Path:
    """A tiny random model with GPT-2's tokenizer in a run dir called "run"."""
    path = tmp_path_factory.mktemp("serve") / "run" / "best.pt"
    path.parent.mkdir()
    model = tiny_model(gpt2.vocab_size, context=64, tie_weights=False)
    eot_after_full_stop(model, gpt2)
    checkpoint.save(path, checkpoint.Checkpoint.of(model, gpt2, metrics={"step": 7, "val_loss": 3.25}))
    return path


class Log(io.StringIO):
    """The log every in-process server of this module writes (setup_logging is per process)."""

    def mark(self) -> int:
        return len(self.getvalue())

    def since(self, mark: int) -> str:
        return self.getvalue()[mark:]


@pytest.fixture(scope="module")
def log() -> Iterator[Log]:
    loggers = [logging.getLogger(name) for name in LOGGERS]
    before = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    stream = Log()
    setup_logging(stream)
    yield stream
    for logger, (handlers, level, propagate) in zip(loggers, before):  # as other modules' tests expect them
        logger.handlers, logger.level, logger.propagate = handlers, level, propagate


class InProcess:
    """A Service running in a thread: its URL, port and app."""

    def __init__(self, ckpt: Path, **options: Any):
        self.service = Service(ckpt, ServeSettings(port=0, **options), device="cpu")
        self.url, self.port = self.service.url, self.service.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.service.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()

    def active(self) -> int:
        return int(httpx.get(self.url + "/health").json()["active"])

    def wait_idle(self, seconds: float = 5.0) -> float:
        """Wait until no slot decodes; the seconds it took."""
        start = time.monotonic()
        while self.active():
            assert time.monotonic() - start < seconds, "slots still busy"
            time.sleep(0.05)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def server(model_file: Path, log: Log) -> Iterator[InProcess]:
    """With a key, a small --max-tokens-limit (the fuzz test's requests stay short)."""
    served = InProcess(model_file, api_key=KEY, max_batch=4, max_tokens_limit=64)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def long_server(model_file: Path, log: Log) -> Iterator[InProcess]:
    """With a key, and requests that can run for minutes."""
    served = InProcess(model_file, api_key=KEY, max_batch=4, max_tokens_limit=BIG)
    yield served
    served.stop()


@pytest.fixture
def client(server: InProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completions_with_the_openai_client(client: openai.OpenAI, model_file: Path, gpt2: Tokenizer) -> None:
    result = client.completions.create(model="run", prompt="ROMEO:", max_tokens=20, temperature=0)
    choice = result.choices[0]
    # The server samples what the library does: greedy text equals generate_text's.
    assert choice.text == generate_text(model_file, "ROMEO:", 20, temperature=0, device="cpu")[len("ROMEO:"):]
    assert choice.finish_reason == "length" and result.object == "text_completion"
    assert result.usage is not None and result.usage.completion_tokens == 20 != len(choice.text)  # tokens, not chars
    assert result.usage.prompt_tokens == len(gpt2.encode("ROMEO:")) == 3 and result.usage.total_tokens == 23

    several = client.completions.create(model="run", prompt=["ROMEO:", "JULIET:"], max_tokens=8, n=2,
                                        temperature=1.0, seed=5)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="run", prompt=["ROMEO:", "JULIET:"], max_tokens=8, n=2,
                                      temperature=1.0, seed=5)
    assert [c.text for c in several.choices] == [c.text for c in again.choices]  # the seed decides
    assert several.choices[0].text != several.choices[1].text  # sample i draws from seed + i

    long_prompt = "ROMEO " * 70  # over 140 tokens, the context is 64
    ids = gpt2.encode(long_prompt)
    kept = gpt2.decode(ids[-64:])
    assert gpt2.encode(kept) == ids[-64:]
    truncated = client.completions.create(model="run", prompt=long_prompt, max_tokens=5, temperature=0)
    assert truncated.model_extra["prompt_truncated_to"] == 64  # type: ignore[index]
    assert truncated.usage is not None and truncated.usage.prompt_tokens == len(ids) > 140
    assert truncated.choices[0].text == generate_text(model_file, kept, 5, temperature=0, device="cpu")[len(kept):]
    assert "prompt_truncated_to" not in (result.model_extra or {})

    stop = choice.text[5:8]
    stopped = client.completions.create(model="run", prompt="ROMEO:", max_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert stopped.choices[0].text == choice.text[: choice.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_streaming_completions_and_chat(client: openai.OpenAI, gpt2: Tokenizer) -> None:
    whole = client.completions.create(model="run", prompt="Hark", max_tokens=30, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="run", prompt="Hark", max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 5  # really streamed, piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30

    chat = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Who art thou?"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.prompt_tokens == len(gpt2.encode("user: Who art thou?\nassistant:"))
    streamed = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Who art thou?"}],
                                              max_tokens=12, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in streamed]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content


def test_the_end_of_text_token_finishes_a_sample_with_stop(client: openai.OpenAI) -> None:
    """The model writes the end-of-text token after a "."; it ends the sample and is not text."""
    for prompt in ("Hello.", "Hello"):
        result = client.completions.create(model="run", prompt=prompt, max_tokens=10, temperature=0, n=2)
        for choice in result.choices:
            assert (choice.finish_reason, choice.text == "") == (("stop", True) if prompt == "Hello." else
                                                                 ("length", False))
        assert result.usage is not None and result.usage.completion_tokens == (0 if prompt == "Hello." else 20)
    chunks = list(client.completions.create(model="run", prompt="Hello.", max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices] == [("", "stop")]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0


def test_models_health_favicon_and_head(client: openai.OpenAI, server: InProcess, model_file: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["run"]
    facts = models[0].model_extra["microgpt"]  # type: ignore[index]
    assert facts["step"] == 7 and facts["val_loss"] == 3.25 and facts["context"] == 64
    assert facts["tokenizer"] == "gpt2" and facts["checkpoint"] == str(model_file) and facts["chat_template"] is False
    assert client.models.retrieve("run").id == "run"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    icon = httpx.get(server.url + "/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml" and b"<svg" in icon.content
    for path, headers in (("/", {}), ("/health", {}), ("/v1/models", AUTH)):
        head, get = httpx.head(server.url + path, headers=headers), httpx.get(server.url + path, headers=headers)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-length"] == get.headers["content-length"], path


def test_every_route_but_the_open_ones_wants_the_key_before_anything_else(server: InProcess) -> None:
    """Every route the app has (a new one included) refuses a missing, wrong, prefix, extended or empty
    key with 401, before it reads the body: invalid JSON from a stranger is 401, not 400."""
    routes = [(method, route.path) for route in server.service.app.app.routes  # type: ignore[attr-defined]
              for method in sorted(getattr(route, "methods", None) or {"GET"}) if method != "HEAD"]
    guarded = [(method, re.sub(r"\{[^}]+\}", "run", path)) for method, path in routes if path not in OPEN_PATHS]
    assert {path for _, path in guarded} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics",
                                              "/v1/models/run"}
    assert {path for _, path in routes} >= OPEN_PATHS  # nothing open that the app does not serve
    wrong = ["", "Bearer", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}", f"Bearer x{KEY}",
             f"Bearer {KEY[:1]}"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for method, path in [*guarded, ("GET", "/v1/no-such-route")]:
            for header in wrong:
                response = http.request(method, path, content=b"{not json", headers={
                    "Content-Type": "application/json", **({"Authorization": header} if header else {})})
                assert response.status_code == 401, (method, path, header, response.text)
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
            right = http.request(method, path, content=b"{not json", headers={
                "Content-Type": "application/json", "Authorization": f"bearer {KEY}"})  # the scheme is any case
            assert right.status_code in (200, 400, 404), (method, path, right.text)
        for path in OPEN_PATHS:
            assert http.get(path).status_code == 200, path


def test_bad_requests_get_openai_error_objects(server: InProcess, log: Log) -> None:
    url = server.url + "/v1/completions"
    mark = log.mark()

    def chunked_over_the_cap() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * 300_000  # no Content-Length: the cap is only seen while reading
        yield b'"}'

    cases: list[tuple[dict[str, Any], int, str | None]] = [
        (dict(content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}), 400, None),
        (dict(json={"prompt": 5}, headers=AUTH), 400, "prompt"),
        (dict(json={"prompt": "hi", "max_tokens": "5"}, headers=AUTH), 400, "max_tokens"),
        (dict(json={"prompt": "hi", "temperature": -1}, headers=AUTH), 400, "temperature"),
        (dict(json={"prompt": "hi", "top_p": 0}, headers=AUTH), 400, "top_p"),
        (dict(json={"prompt": "hi", "max_tokens": 65}, headers=AUTH), 400, "max_tokens"),
        (dict(json={"prompt": "hi", "n": 5}, headers=AUTH), 400, "n"),
        (dict(json={"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, headers=AUTH), 400, "stop"),
        (dict(json={"prompt": ["hi"] * 65}, headers=AUTH), 400, "prompt"),
        (dict(json={"prompt": "hi"}), 401, None),
        (dict(json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"}), 401, None),
        (dict(content=b"x" * (2 << 20), headers={**AUTH, "Content-Type": "application/json"}), 413, None),
        (dict(content=chunked_over_the_cap(), headers={**AUTH, "Content-Type": "application/json"}), 413, None),
    ]
    for request, status, param in cases:
        response = httpx.post(url, timeout=30, **request)
        assert response.status_code == status, (request.get("json"), response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, error
    assert httpx.get(server.url + "/v1/nothing", headers=AUTH).json()["error"]["type"] == "not_found_error"
    bad_chat = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, headers=AUTH)
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "messages"
    lines = log.since(mark).splitlines()
    assert len(lines) == len(cases) + 2 and "Traceback" not in log.since(mark)  # one line per refusal
    assert sum(" 413 " in line for line in lines) == 2


JUNK = json_junk()
TEXT = st.text(string.ascii_letters + " ,.;:!?'\n€é", max_size=20)


# Each field: (valid values, odd ones: out of range, wrong type, junk).
Field = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]
SAMPLING: dict[str, Field] = {
    "model": (st.text(max_size=10), JUNK),
    "max_tokens": (st.integers(0, 40), st.sampled_from([-1, 64, 65, 2**63, 10**30]) | JUNK),
    "max_completion_tokens": (st.integers(0, 40), st.just(-1) | JUNK),
    "temperature": (st.floats(0, 2), st.sampled_from([-1.0, 101.0, float("nan"), float("inf"), 1e-300]) | JUNK),
    "top_p": (st.floats(0.01, 1), st.sampled_from([0.0, 1.5, float("nan"), 1e-300]) | JUNK),
    "top_k": (st.integers(1, 100), st.sampled_from([0, -1, 2**63, 10**30]) | JUNK),
    "n": (st.integers(1, 4), st.sampled_from([-1, 0, 5, 6]) | JUNK),
    "stop": (TEXT | st.lists(TEXT, max_size=4), st.lists(TEXT, min_size=5, max_size=6) | JUNK),
    "seed": (st.integers(0, 2**32 - 1), st.sampled_from([-1, 2**32, 2**64]) | JUNK),  # 32 bits: see config.MAX_SEED
    "stream": (st.booleans(), JUNK),
    "stream_options": (st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}), JUNK),
    "frequency_penalty": (st.floats(-2, 2), st.sampled_from([-2.5, 3.0, float("nan")]) | JUNK),
    "presence_penalty": (st.floats(-2, 2), st.sampled_from([-2.5, 3.0, float("inf")]) | JUNK),
    "echo": (st.booleans(), JUNK),  # completions only; chat ignores it
    "logprobs": (st.integers(0, 5) | st.booleans(), st.sampled_from([-1, 6, 2**63]) | JUNK),  # chat's is a bool
    "top_logprobs": (st.integers(0, 20), st.sampled_from([-1, 21]) | JUNK),
    "best_of": (st.just(1), st.integers(2, 5) | JUNK),
}
IDS = st.lists(st.integers(0, 50256), min_size=1, max_size=8)  # GPT-2 token ids
ROLES = st.sampled_from(["system", "user", "assistant", "developer", "tool"])
MESSAGES = (st.lists(st.fixed_dictionaries({"role": ROLES, "content": TEXT}), min_size=1, max_size=3),
            st.lists(st.fixed_dictionaries({}, optional={"role": ROLES | st.just("robot") | JUNK,
                                                         "content": TEXT | st.text(max_size=20) | JUNK}), max_size=3)
            | JUNK)
ENDPOINTS: dict[str, dict[str, Field]] = {
    "/v1/completions": {"prompt": (TEXT | st.lists(TEXT, max_size=3) | IDS | st.lists(IDS, min_size=1, max_size=3),
                                   st.text(max_size=20) | st.lists(st.sampled_from([-1, 50257, 2**40])) | JUNK)},
    "/v1/chat/completions": {"messages": MESSAGES},
}


@st.composite
def api_requests(draw: st.DrawFn) -> tuple[str, Any]:
    """An endpoint and a JSON body: a valid one, one with a few odd fields among valid ones (so that
    each check is reached), or something else entirely."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    fields = {**SAMPLING, **ENDPOINTS[path]}
    body: Any = draw(st.fixed_dictionaries({k: valid for k, (valid, _) in ENDPOINTS[path].items()},
                                           optional={k: valid for k, (valid, _) in SAMPLING.items()}))
    kind = draw(st.sampled_from(["valid", "odd fields", "odd fields", "odd body"]))
    if kind == "odd fields":
        for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True)):
            body[name] = draw(fields[name][1])
        for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=1)):
            del body[name]
    elif kind == "odd body":
        body = draw(JUNK)
    return path, body


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=api_requests())
def test_fuzzed_requests_get_a_completion_or_an_error_object(server: InProcess, log: Log,
                                                             request: tuple[str, Any]) -> None:
    """Whatever a client sends: a 200 with a well-formed completion (or event stream), or a 4xx with an
    OpenAI error object; never a 5xx, a hang or a traceback in the log."""
    path, body = request
    content = json.dumps(body).encode()  # NaN and Infinity as Python's json writes them: what a sloppy client sends
    headers = {**AUTH, "Content-Type": "application/json"}
    mark = log.mark()
    with httpx.stream("POST", server.url + path, content=content, headers=headers, timeout=60) as response:
        raw = response.read().decode()
    note(f"{response.status_code}: {raw[:500]}")
    assert "Traceback" not in log.since(mark)
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return
    if raw.startswith("data: "):
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks and all("choices" in chunk for chunk in chunks)  # no error event
    else:
        answer = json.loads(raw)
        assert answer["choices"] and answer["usage"]["completion_tokens"] >= 0


def stream_events(server: InProcess, body: dict, events: list, stop_after: int | None = None) -> None:
    """POST a streaming completion and collect its data events (closing early after `stop_after`)."""
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if stop_after is not None and len(events) >= stop_after:
                    return


def streamed_text(events: list[str]) -> str:
    return "".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]" and json.loads(e)["choices"])


def test_concurrent_requests_keep_their_own_top_k(server: InProcess) -> None:
    """Two requests decoded in one batch at one temperature but different top-k: each samples with its own
    (top_k 1 is greedy, top_k off is not), whichever slot it holds."""
    body = {"prompt": "ROMEO:", "max_tokens": 64}
    greedy = httpx.post(server.url + "/v1/completions", json={**body, "temperature": 0}, headers=AUTH).json()
    other = {"prompt": "JULIET:", "max_tokens": 8, "temperature": 1.0, "seed": 3}
    other_greedy = httpx.post(server.url + "/v1/completions", json={**other, "temperature": 0}, headers=AUTH).json()
    events: list[str] = []
    first = threading.Thread(target=stream_events, args=(server, {**body, "temperature": 1.0, "top_k": 1}, events))
    first.start()
    while len(events) < 2:
        time.sleep(0.005)
    joined = httpx.post(server.url + "/v1/completions", json=other, headers=AUTH).json()
    assert len(events) < 60  # the second request ran while the first still decoded
    first.join(60)
    assert streamed_text(events) == greedy["choices"][0]["text"]
    assert joined["choices"][0]["text"] != other_greedy["choices"][0]["text"]


def test_a_new_request_joins_the_running_batch(long_server: InProcess) -> None:
    long: list[str] = []
    worker = threading.Thread(target=stream_events, args=(long_server, {"prompt": "A", "max_tokens": 300}, long))
    worker.start()
    while len(long) < 3:
        time.sleep(0.01)
    short: list[str] = []
    stream_events(long_server, {"prompt": "B", "max_tokens": 5}, short)
    assert short[-1] == "[DONE]"
    # The short request joined the running batch and finished while the long one still streamed.
    assert worker.is_alive() and long[-1] != "[DONE]"
    worker.join(timeout=60)
    assert long[-1] == "[DONE]"


def metric(server: InProcess, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_clients_that_leave_free_their_slots_at_once(long_server: InProcess, log: Log) -> None:
    """Streaming or not, a request whose client goes away stops at the next step (these would decode
    for minutes), and its log line counts the tokens it really made."""
    mark = log.mark()
    cancelled = metric(long_server, "microgpt_requests_cancelled_total")
    left: list[str] = []
    stream_events(long_server, {"prompt": "C", "max_tokens": BIG, "n": 2}, left, stop_after=8)
    assert long_server.wait_idle() < 5
    with pytest.raises(httpx.TimeoutException):  # 2 prompts x 2 samples: every slot
        httpx.post(long_server.url + "/v1/completions", json={"prompt": ["D", "E"], "n": 2, "max_tokens": BIG},
                   headers=AUTH, timeout=1.0)
    assert long_server.wait_idle() < 5
    assert metric(long_server, "microgpt_requests_cancelled_total") == cancelled + 2
    quick = httpx.post(long_server.url + "/v1/completions", json={"prompt": "F", "max_tokens": 2}, headers=AUTH,
                       timeout=10)
    assert quick.json()["usage"]["completion_tokens"] == 2
    gone = [line for line in log.since(mark).splitlines() if "(client left)" in line]
    assert len(gone) == 2 and " 200 " in gone[0] and " 499 " in gone[1], gone
    assert all(int(re.findall(r"completion=(\d+)", line)[0]) >= 8 for line in gone), gone  # not 0


def test_slow_idle_and_surplus_connections_are_cut_with_one_log_line(model_file: Path, log: Log) -> None:
    """Slow loris (headers a byte at a time), a body that stalls, and more connections than the cap:
    the first two are cut at their deadlines (1 s here, however the bytes trickle) with 408, the
    surplus gets 503 at once, and each kind of event logs one line however often it happens."""
    served = InProcess(model_file, api_key=KEY, max_connections=8, header_timeout=1.0, body_timeout=1.0)
    try:
        mark = log.mark()
        address = ("127.0.0.1", served.port)
        start = time.monotonic()
        loris = [socket.create_connection(address) for _ in range(3)]
        for sock in loris:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        stalled = socket.create_connection(address)
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " +
                        KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        for _ in range(4):  # a byte every 0.2 s: a timeout per read would never fire
            time.sleep(0.2)
            for sock in loris:
                sock.sendall(b"X")
        answers = []
        for sock in [*loris, stalled]:
            sock.settimeout(5)
            answers.append(b"".join(iter(lambda s=sock: s.recv(4096), b"")))  # type: ignore[misc]
            sock.close()
        assert time.monotonic() - start < 1.7  # a deadline, not 1 s after the last byte
        assert all(a.startswith(b"HTTP/1.1 408 ") and b'"error"' in a for a in answers), answers

        idle = [socket.create_connection(address) for _ in range(8)]  # the cap
        time.sleep(0.2)
        for _ in range(3):
            refused = httpx.get(served.url + "/health")
            assert refused.status_code == 503 and "connections open" in refused.json()["error"]["message"]
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(served.url + "/health").status_code == 200
        assert metric(served, "microgpt_connections_closed_total", reason="header_timeout") == 3
        assert metric(served, "microgpt_connections_closed_total", reason="body_timeout") == 1
        assert metric(served, "microgpt_connections_closed_total", reason="over_capacity") == 3
        lines = log.since(mark).splitlines()
        assert sum("headers did not arrive" in line for line in lines) == 1  # 3 events, one line
        assert sum("body did not arrive" in line for line in lines) == 1
        assert sum("refused a connection" in line for line in lines) == 1, lines
        assert "Traceback" not in log.since(mark)
    finally:
        served.stop()


def test_metrics_in_the_prometheus_format(server: InProcess) -> None:
    assert httpx.get(server.url + "/metrics").status_code == 401
    before = {name: metric(server, name) for name in ("microgpt_prompt_tokens_total",
                                                      "microgpt_generation_tokens_total",
                                                      "microgpt_time_to_first_token_seconds_count")}
    ok = metric(server, "microgpt_requests_total", route="/v1/completions", status="200")
    usage = httpx.post(server.url + "/v1/completions", json={"prompt": ["ROMEO:", "Hark"], "max_tokens": 7},
                       headers=AUTH).json()["usage"]
    response = httpx.get(server.url + "/metrics", headers=AUTH)
    assert response.headers["content-type"].startswith("text/plain; version=")  # the Prometheus text format
    assert metric(server, "microgpt_requests_total", route="/v1/completions", status="200") == ok + 1
    assert metric(server, "microgpt_prompt_tokens_total") == before["microgpt_prompt_tokens_total"] + \
        usage["prompt_tokens"]
    assert metric(server, "microgpt_generation_tokens_total") == before["microgpt_generation_tokens_total"] + 14
    assert metric(server, "microgpt_time_to_first_token_seconds_count") == \
        before["microgpt_time_to_first_token_seconds_count"] + 1
    assert metric(server, "microgpt_requests_total", route="/metrics", status="401") >= 1
    families = {f.name for f in text_string_to_metric_families(response.text)}
    assert families >= {"microgpt_request_latency_seconds", "microgpt_requests_waiting", "microgpt_slots_active",
                        "microgpt_requests_cancelled", "microgpt_connections_closed"}


@pytest.mark.parametrize(("options", "allowed", "refused"), [
    ({}, ["127.0.0.1", "localhost", "[::1]"], ["evil.example", "127.0.0.1.evil.example", ""]),
    ({"allowed_hosts": "llm.example, 10.0.0.5"}, ["llm.example", "LLM.example", "10.0.0.5"], ["localhost"]),
    ({"allowed_hosts": "*"}, ["evil.example", "localhost"], []),
    ({"host": "0.0.0.0"}, ["evil.example", "10.1.2.3"], []),
])
def test_the_host_header_is_checked_against_dns_rebinding(model_file: Path, gpt2: Tokenizer, options: dict[str, str],
                                                          allowed: list[str], refused: list[str]) -> None:
    """A keyless server on loopback answers only to loopback names by default: a web page whose
    name an attacker re-points at 127.0.0.1 cannot read it through a victim's browser."""
    state = checkpoint.load(model_file)
    sampler = Sampler(state.build_model(), gpt2, 1)
    app = build_app(Server(sampler, model_info(model_file, sampler, {}), ServeSettings(**options)))  # type: ignore[arg-type]
    with TestClient(app) as http:  # the app in this thread, no socket
        for host in allowed:
            assert http.get("/v1/models", headers={"Host": f"{host}:8000"}).status_code == 200, host
        for host in refused:
            response = http.get("/v1/models", headers={"Host": host})
            assert response.status_code == 400 and response.json()["error"]["code"] == "host_not_allowed", host


def test_a_request_whose_admission_fails_gets_an_error_alone(model_file: Path, gpt2: Tokenizer, log: Log) -> None:
    """Checkpoints are checked at load, so this takes ids past the vocabulary given to the batcher
    directly: that request ends with "error", the one decoding beside it is untouched."""
    state = checkpoint.load(model_file)
    batcher = Batcher(Sampler(state.build_model(), gpt2, 4))
    pieces: dict[str, list[Piece]] = {"good": [], "bad": []}
    done = threading.Event()

    def request(name: str, ids: list[int], n: int) -> Request:
        def deliver(piece: Piece) -> None:
            pieces[name].append(piece)
            if name == "good" and piece.finish_reason:
                done.set()
        return Request(ids, 40, n, 0.0, None, 1.0, [], 0, deliver)

    batcher.start()
    try:
        batcher.submit(request("good", gpt2.encode("ROMEO:"), 1))
        batcher.submit(request("bad", [gpt2.vocab_size + 7], 2))
        assert done.wait(30)
    finally:
        batcher.stop()
    assert [(p.index, p.finish_reason) for p in pieces["bad"]] == [(0, "error"), (1, "error")]
    assert pieces["good"][-1].finish_reason == "length" and pieces["good"][-1].tokens == 40
    assert batcher.active == 0 and "admitting a request failed" in log.getvalue()


@pytest.mark.parametrize(("args", "env", "fragment"), [
    (["--max-batch", "0"], {}, "--max-batch"),
    (["--port", "70000"], {}, "--port"),
    (["--quantize", "int3"], {}, "--quantize"),
    (["-c", "nope.pt"], {}, "does not exist"),
    ([], {"MICROGPT_API_KEY": ""}, "--api-key (or MICROGPT_API_KEY) must be non-empty"),
    (["--api-key", " key"], {}, "--api-key"),
    (["--api-key", "clé"], {}, "printable ASCII"),
    (["--api-key", "a key"], {}, "without spaces"),
    (["--allowed-hosts", "a,,b"], {}, "--allowed-hosts"),
    (["--header-timeout", "0"], {}, "--header-timeout"),
    (["--max-connections", "0"], {}, "--max-connections"),
])
def test_bad_serve_options_are_one_line(args: list[str], env: dict[str, str], fragment: str, model_file: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "serve", "-c", model_file, "--port", "0", "--device", "cpu", *args)
    assert_one_error_line(code, err, fragment)


def test_a_second_server_on_a_taken_port_says_so_in_one_line(model_file: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:  # the winner of the race: listening (bound alone, SO_REUSEADDR would share it)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli(capsys, "serve", "-c", model_file, "--port", str(taken.getsockname()[1]),
                               "--device", "cpu")
        assert_one_error_line(code, err, "in use")


def test_an_open_host_without_a_key_warns(model_file: Path) -> None:
    service = Service(model_file, ServeSettings(host="0.0.0.0", port=0), device="cpu")
    service.socket.close()
    assert any("without --api-key" in line for line in service.warnings)


def test_sigterm_ends_streams_and_exits_0_and_port_0_is_announced(model_file: Path) -> None:
    """A real process: signals, and the startup lines with the port the system picked."""
    proc = subprocess.Popen([sys.executable, "-m", "microgpt_cli", "serve", "-c", str(model_file), "--port", "0",
                             "--device", "cpu", "--max-tokens-limit", str(BIG)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "MICROGPT_API_KEY"})
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("playground:"):
            break
    found = re.search(r"playground: http://127\.0\.0\.1:(\d+)/", lines[-1])
    assert found and int(found[1]) != 0, lines
    url = f"http://127.0.0.1:{found[1]}"
    events: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "A", "max_tokens": BIG, "stream": True},
                          timeout=60) as response:
            events.extend(line[6:] for line in response.iter_lines() if line.startswith("data: "))

    worker = threading.Thread(target=stream)
    worker.start()
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health").json()["active"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 0 and "Traceback" not in err, err
    assert time.monotonic() - start < 5  # no request was left waiting for the graceful-shutdown timeout
    worker.join(timeout=30)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert "POST /v1/completions 200" in err and "stopped" in err


def test_the_playground_in_a_real_browser(long_server: InProcess, log: Log) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    mark = log.mark()
    driver = webdriver.Chrome(service=ChromeService("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_window_size(1280, 900)
        driver.get(long_server.url + "/")
        wait = WebDriverWait(driver, 30)
        element = driver.find_element

        def no_sideways_scroll() -> None:  # the document is as wide as the viewport (less a vertical scrollbar)
            page = driver.execute_script("const e = document.documentElement; return [e.scrollWidth, e.clientWidth, "
                                         "window.innerWidth]")
            assert page[0] == page[1] and page[2] - 20 <= page[1] <= page[2], page

        key = element(By.ID, "key")
        key.send_keys("wrong-key")
        driver.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        wait.until(lambda d: "API key" in d.find_element(By.ID, "key-error").text)
        assert element(By.ID, "key-error").value_of_css_property("color") in ("rgba(176, 0, 32, 1)",
                                                                              "rgba(255, 107, 129, 1)")
        key.clear()
        key.send_keys(KEY)
        driver.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        wait.until(lambda d: "val loss 3.2500" in d.find_element(By.ID, "facts").text)
        assert element(By.ID, "key-error").text == ""
        assert driver.execute_script("return sessionStorage.length") == 0  # not kept unless asked
        element(By.ID, "remember").click()
        assert driver.execute_script("return Object.values(sessionStorage)") == [KEY]

        prompt = element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("KING:" + "x" * 600)  # one long word: it must wrap, not widen the page
        max_tokens = element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("12")
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        assert re.search(r"12 tokens · [\d.]+ tokens/s · first token \d+ ms", element(By.ID, "status").text)
        for width in (390, 1280):
            driver.set_window_size(width, 900)
            no_sideways_scroll()

        max_tokens.clear()
        max_tokens.send_keys("200000")
        element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_element(By.ID, "generated").text) > 20)  # text streams in
        element(By.ID, "stop").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "stopped")
        assert element(By.ID, "generate").is_enabled()

        element(By.ID, "tab-chat").click()
        assert "not instruction-tuned" in element(By.ID, "chat-note").text
        max_tokens.clear()
        max_tokens.send_keys("8")
        element(By.ID, "chat-input").send_keys("Who art thou?")
        element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        turns = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#chat-log .turn")]
        assert turns[0] == "user: Who art thou?" and turns[1].startswith("assistant:") and len(turns) == 2
        for width in (390, 1280):
            driver.set_window_size(width, 900)
            no_sideways_scroll()
    finally:
        driver.quit()
    assert "favicon" not in log.since(mark)  # no 404 for the icon
