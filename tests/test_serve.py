"""`microgpt serve` in a real process, driven by clients no one here wrote: the official openai
package, httpx for malformed requests, and headless Chromium through selenium for the playground."""

from __future__ import annotations

import json
import os
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
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from microgpt_cli.data.tokenizer import train_char
from microgpt_cli.infer.sampling import generate_text
from microgpt_cli.io import checkpoint

from clitools import SHAKESPEARE, json_junk
from conftest import tiny_model

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `microgpt serve` process on a free port of 127.0.0.1."""

    def __init__(self, ckpt: Path, *args: str, key: str | None = KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MICROGPT_API_KEY": key} if key else {
            k: v for k, v in os.environ.items() if k != "MICROGPT_API_KEY"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "microgpt_cli", "serve", "-c", str(ckpt), "--port", str(self.port),
             "--device", "cpu", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        # The log is read as it comes: a full pipe would block the server's next log line, and with it
        # every request (the fuzz test sends hundreds).
        self.log: list[str] = []
        assert self.proc.stderr is not None
        self.reader = threading.Thread(target=self.log.extend, args=(self.proc.stderr,), daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                self.reader.join(5)
                pytest.fail("".join(self.log))
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        """Signal the server and wait for it: its exit status and everything it logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)
        return self.proc.returncode, "".join(self.log)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny char model of tinyshakespeare's characters (random weights: fast and deterministic)."""
    tokenizer = train_char([SHAKESPEARE.read_text(encoding="utf-8")])
    path = tmp_path_factory.mktemp("serve") / "run" / "best.pt"
    path.parent.mkdir()
    model = tiny_model(tokenizer.vocab_size, context=64)
    checkpoint.save(path, checkpoint.Checkpoint.of(model, tokenizer, metrics={"step": 7, "val_loss": 3.25}))
    return path


@pytest.fixture(scope="module")
def server(model_file: Path) -> Iterator[Served]:
    served = Served(model_file, "--max-batch", "4", "--max-tokens-limit", "500")
    yield served
    code, err = served.stop()
    assert code == 0 and "Traceback" not in err, err  # client errors are one log line each, never a traceback
    assert "POST /v1/completions 400" in err and "POST /v1/completions 401" in err


@pytest.fixture
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completions_with_the_openai_client(client: openai.OpenAI, model_file: Path) -> None:
    result = client.completions.create(model="run", prompt="ROMEO:", max_tokens=20, temperature=0)
    choice = result.choices[0]
    # The server samples what the library does: greedy text equals generate_text's.
    assert choice.text == generate_text(model_file, "ROMEO:", 20, temperature=0, device="cpu")[len("ROMEO:"):]
    assert choice.finish_reason == "length" and result.object == "text_completion"
    assert result.usage is not None and (result.usage.prompt_tokens, result.usage.completion_tokens) == (6, 20)
    assert result.usage.total_tokens == 26

    several = client.completions.create(model="run", prompt=["ROMEO:", "JULIET:"], max_tokens=8, n=2,
                                        temperature=1.0, seed=5)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="run", prompt=["ROMEO:", "JULIET:"], max_tokens=8, n=2,
                                      temperature=1.0, seed=5)
    assert [c.text for c in several.choices] == [c.text for c in again.choices]  # the seed decides
    assert several.choices[0].text != several.choices[1].text  # sample i draws from seed + i

    long_prompt = "ROMEO: " * 20  # 140 characters, the context is 64
    truncated = client.completions.create(model="run", prompt=long_prompt, max_tokens=5, temperature=0)
    assert truncated.model_extra["prompt_truncated_to"] == 64  # type: ignore[index]
    assert truncated.choices[0].text == generate_text(model_file, long_prompt[-64:], 5, temperature=0,
                                                      device="cpu")[64:]
    assert "prompt_truncated_to" not in (result.model_extra or {})

    stop = choice.text[5:7]
    stopped = client.completions.create(model="run", prompt="ROMEO:", max_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert stopped.choices[0].text == choice.text[: choice.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_streaming_completions_and_chat(client: openai.OpenAI) -> None:
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
    assert chat.usage is not None and chat.usage.prompt_tokens == len("user: Who art thou?\nassistant:")
    streamed = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Who art thou?"}],
                                              max_tokens=12, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in streamed]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content


def test_model_list_and_health(client: openai.OpenAI, server: Served, model_file: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["run"]
    facts = models[0].model_extra["microgpt"]  # type: ignore[index]
    assert facts["step"] == 7 and facts["val_loss"] == 3.25 and facts["context"] == 64
    assert facts["tokenizer"] == "char" and facts["checkpoint"] == str(model_file)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed


def test_bad_requests_get_openai_error_objects(server: Served) -> None:
    url = server.url + "/v1/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        (dict(content=b"{not json", headers={**auth, "Content-Type": "application/json"}), 400, None),
        (dict(json={"prompt": 5}, headers=auth), 400, "prompt"),
        (dict(json={"prompt": "hi", "max_tokens": "5"}, headers=auth), 400, "max_tokens"),
        (dict(json={"prompt": "hi", "temperature": -1}, headers=auth), 400, "temperature"),
        (dict(json={"prompt": "hi", "top_p": 0}, headers=auth), 400, "top_p"),
        (dict(json={"prompt": "hi", "max_tokens": 501}, headers=auth), 400, "max_tokens"),
        (dict(json={"prompt": "hi", "n": 5}, headers=auth), 400, "n"),
        (dict(json={"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, headers=auth), 400, "stop"),
        (dict(json={"prompt": "hi €"}, headers=auth), 400, "prompt"),
        (dict(json={"prompt": "hi"}), 401, None),
        (dict(json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"}), 401, None),
        (dict(content=b"x" * (2 << 20), headers={**auth, "Content-Type": "application/json"}), 413, None),
    ]
    for request, status, param in cases:
        response = httpx.post(url, timeout=30, **request)
        assert response.status_code == status, (request.get("json"), response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, error
    assert httpx.get(server.url + "/v1/nothing", headers=auth).json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    bad_chat = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, headers=auth)
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "messages"


JUNK = json_junk()
TEXT = st.text(string.ascii_letters + " ,.;:!?'\n", max_size=20)  # characters the test model knows


# Each field: (valid values, odd ones: out of range, wrong type, junk).
Field = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]
SAMPLING: dict[str, Field] = {
    "model": (st.text(max_size=10), JUNK),
    "max_tokens": (st.integers(0, 40), st.sampled_from([-1, 500, 501, 2**63, 10**30]) | JUNK),
    "max_completion_tokens": (st.integers(0, 40), st.just(-1) | JUNK),
    "temperature": (st.floats(0, 2), st.sampled_from([-1.0, 101.0, float("nan"), float("inf"), 1e-300]) | JUNK),
    "top_p": (st.floats(0.01, 1), st.sampled_from([0.0, 1.5, float("nan"), 1e-300]) | JUNK),
    "top_k": (st.integers(1, 100), st.sampled_from([0, -1, 2**63, 10**30]) | JUNK),
    "n": (st.integers(1, 4), st.sampled_from([-1, 0, 5, 6]) | JUNK),
    "stop": (TEXT | st.lists(TEXT, max_size=4), st.lists(TEXT, min_size=5, max_size=6) | JUNK),
    "seed": (st.integers(0, 2**32), st.sampled_from([-1, 2**64]) | JUNK),
    "stream": (st.booleans(), JUNK),
    "stream_options": (st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}), JUNK),
}
ROLES = st.sampled_from(["system", "user", "assistant", "developer", "tool"])
MESSAGES = (st.lists(st.fixed_dictionaries({"role": ROLES, "content": TEXT}), min_size=1, max_size=3),
            st.lists(st.fixed_dictionaries({}, optional={"role": ROLES | st.just("robot") | JUNK,
                                                         "content": TEXT | st.text(max_size=20) | JUNK}), max_size=3)
            | JUNK)
ENDPOINTS: dict[str, dict[str, Field]] = {
    "/v1/completions": {"prompt": (TEXT | st.lists(TEXT, max_size=3), st.text(max_size=20) | JUNK)},
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
def test_fuzzed_requests_get_a_completion_or_an_error_object(server: Served, request: tuple[str, Any]) -> None:
    """Whatever a client sends: a 200 with a well-formed completion (or event stream), or a 4xx with an
    OpenAI error object; never a 5xx, a hang or a traceback in the log (the server fixture checks that)."""
    path, body = request
    content = json.dumps(body).encode()  # NaN and Infinity as Python's json writes them: what a sloppy client sends
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.stream("POST", server.url + path, content=content, headers=headers, timeout=60) as response:
        raw = response.read().decode()
    note(f"{response.status_code}: {raw[:500]}")
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return
    if raw.startswith("data: "):
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks and all("choices" in chunk or "error" in chunk for chunk in chunks)
    else:
        answer = json.loads(raw)
        assert answer["choices"] and answer["usage"]["completion_tokens"] >= 0


def stream_events(server: Served, body: dict, events: list, stop_after: int | None = None) -> None:
    """POST a streaming completion and collect its data events (closing early after `stop_after`)."""
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic(), line[6:]))
                if stop_after is not None and len(events) >= stop_after:
                    return


def test_a_new_request_joins_the_running_batch_and_a_client_that_leaves_frees_its_slot(server: Served) -> None:
    long: list = []
    worker = threading.Thread(target=stream_events, args=(server, {"prompt": "A", "max_tokens": 500}, long))
    worker.start()
    while len(long) < 3:
        time.sleep(0.01)
    short: list = []
    stream_events(server, {"prompt": "B", "max_tokens": 5}, short)
    assert short[-1][1] == "[DONE]"
    # The short request joined the running batch and finished while the long one still streamed.
    assert worker.is_alive() and long[-1][1] != "[DONE]"
    worker.join(timeout=60)
    assert long[-1][1] == "[DONE]"

    left: list = []
    stream_events(server, {"prompt": "C", "max_tokens": 500}, left, stop_after=3)
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["active"] != 0:
        assert time.monotonic() < deadline, "the slot of a client that left was not freed"
        time.sleep(0.05)


def test_sigterm_ends_streams_and_exits_0(model_file: Path) -> None:
    served = Served(model_file, key=None)
    events: list = []
    worker = threading.Thread(target=stream_events, args=(served, {"prompt": "A", "max_tokens": 500}, events))
    worker.start()
    while len(events) < 3:
        time.sleep(0.01)
    code, err = served.stop(signal.SIGTERM)
    worker.join(timeout=30)
    assert code == 0 and "Traceback" not in err, err
    assert events[-1][1] == "[DONE]" and json.loads(events[-2][1])["choices"][0]["finish_reason"] == "length"
    assert "POST /v1/completions 200" in err and "playground: http://127.0.0.1:" in err


def test_bad_serve_options_are_one_line(model_file: Path) -> None:
    from clitools import microgpt

    for args, message in [(["--max-batch", "0"], "--max-batch"), (["--port", "70000"], "--port"),
                          (["--quantize", "int3"], "--quantize"), (["-c", "nope.pt"], "does not exist")]:
        run = microgpt("serve", "-c", model_file, *args, "--device", "cpu", check=False)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = microgpt("serve", "-c", model_file, "--port", str(taken.getsockname()[1]), "--device", "cpu",
                       check=False)
        assert run.returncode == 1 and "in use" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_open_host_without_a_key_warns(model_file: Path) -> None:
    served = Served(model_file, "--host", "0.0.0.0", key=None)
    served.url = f"http://127.0.0.1:{served.port}"
    code, err = served.stop()
    assert code == 0 and "without --api-key" in err


def test_the_playground_in_a_real_browser(model_file: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    # A sample far longer than the test takes, so that Stop always lands while text still streams.
    server = Served(model_file, "--max-tokens-limit", "1000000")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30)
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        wait.until(lambda d: "val loss 3.2500" in d.find_element(By.ID, "facts").text)
        assert "context 64" in driver.find_element(By.ID, "facts").text
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("KING:")
        max_tokens = driver.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("200000")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_element(By.ID, "generated").text) > 20)  # text streams in
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "stopped")
        shown = driver.find_element(By.ID, "generated").text
        assert 20 < len(shown) < 200000 and driver.find_element(By.ID, "generate").is_enabled()
    finally:
        driver.quit()
        server.stop()
