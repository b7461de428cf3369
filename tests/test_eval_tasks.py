"""`microgpt eval --tasks` and the scoring API of `serve`, judged by lm-evaluation-harness itself.

One small GPT-2-tokenizer model (a random transformers GPT-2, `microgpt import`ed, dropout 0.1 in
its config) is scored on three local tasks (a 40-item multiple-choice task, a loglikelihood_rolling
task whose documents run past the 48-token context, a short generate_until task) three ways:
microgpt's own harness model, the harness's `local-completions` model against `microgpt serve`
(token-id and text prompts), and the harness's `hf` model on `microgpt export --format hf`. Every
document's numbers must agree. Offline: the tasks read local JSONL files."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

import microgpt_cli.infer
from microgpt_cli.data.tokenizer import train_bpe, train_char
from microgpt_cli.infer.engine import Engine
from microgpt_cli.infer.evaluation import evaluate_tasks
from microgpt_cli.infer.sampling import generate_text
from microgpt_cli.infer.scoring import Scorer
from microgpt_cli.io import checkpoint
from microgpt_cli.io.checkpoint import load_checkpoint
from microgpt_cli.io.export import export
from microgpt_cli.io.pretrained import import_model

from clitools import SHAKESPEARE, assert_one_error_line, hf_gpt2, microgpt, run_cli
from conftest import tiny_model
from test_serve import KEY, InProcess

TASKS = ["shakespeare_mc", "shakespeare_ppl", "shakespeare_gen"]
METRICS = {"acc": "mean", "acc_norm": "mean", "exact_match": "mean", "word_perplexity": "weighted_perplexity",
           "byte_perplexity": "weighted_perplexity", "bits_per_byte": "bits_per_byte"}


def task_yaml(name: str, data: Path, output_type: str, fields: str, metrics: list[str]) -> str:
    listed = "".join(f"  - metric: {m}\n    aggregation: {METRICS[m]}\n"
                     f"    higher_is_better: {m in ('acc', 'acc_norm', 'exact_match')}\n" for m in metrics)
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            f"output_type: {output_type}\n{fields}metric_list:\n{listed}")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three task YAMLs over JSONL files made from tinyshakespeare: which of four endings ends a line
    (40 items), the log-likelihood of 12 passages of 60 to 500 characters, and a few greedy continuations."""
    root = tmp_path_factory.mktemp("tasks")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if len(line.split()) >= 8][:200]
    items = []
    for i in range(40):
        words = lines[i].split()
        cut = len(words) // 2
        endings = [" " + " ".join(lines[(i + 7 * k) % len(lines)].split()[cut:]) for k in range(4)]
        endings[0], endings[i % 4] = endings[i % 4], endings[0]
        items.append({"context": " ".join(words[:cut]), "endings": endings, "label": i % 4})
    documents = [{"text": text[1000 * i : 1000 * i + 60 + 40 * i]} for i in range(12)]
    prompts = [{"q": line[:30], "a": line[30:40]} for line in lines[:4]]
    for name, rows in (("mc", items), ("docs", documents), ("gen", prompts)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (root / "mc.yaml").write_text(task_yaml(
        "shakespeare_mc", root / "mc.jsonl", "multiple_choice",
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n', ["acc", "acc_norm"]))
    (root / "ppl.yaml").write_text(task_yaml(
        "shakespeare_ppl", root / "docs.jsonl", "loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n',
        ["word_perplexity", "byte_perplexity", "bits_per_byte"]))
    (root / "gen.yaml").write_text(task_yaml(
        "shakespeare_gen", root / "gen.jsonl", "generate_until",
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n'
        '  do_sample: false\n', ["exact_match"]))
    return root


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """lm_eval, offline, its datasets cache in a temp dir. simple_evaluate's records of the process
    environment (torch's collect_env: seconds of subprocesses per run) and of the cwd's git commit
    are skipped here; they change nothing that is scored."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        patch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
        import lm_eval.evaluator

        patch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        patch.setattr(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
        yield lm_eval


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A `microgpt import` of a random GPT-2 (context 48, dropout 0.1) and its `export --format hf`."""
    root = tmp_path_factory.mktemp("model")
    checkpoint, _, _ = import_model(str(hf_gpt2(root / "hf")), root / "model.pt", False)
    return checkpoint, export(checkpoint, root / "export", "hf").path


@pytest.fixture(scope="module")
def server(model: tuple[Path, Path]) -> Iterator[InProcess]:
    """`microgpt serve`'s Service in a thread of this process, with a key."""
    served = InProcess(model[0], api_key=KEY, max_batch=8)
    yield served
    served.stop()


def evaluate(harness: Any, tasks: Path, model: str, args: dict[str, Any]) -> dict[str, Any]:
    """The harness's results for TASKS with one of its own model classes, through simple_evaluate
    (what its `lm_eval` command calls)."""
    manager = harness.tasks.TaskManager(include_path=str(tasks), include_defaults=False)
    return harness.simple_evaluate(model=model, model_args=args, tasks=TASKS, task_manager=manager, batch_size=8,
                                   device="cpu", log_samples=True)


def assert_same_scores(ours: dict[str, Any], theirs: dict[str, Any], label: str) -> None:
    for task in TASKS:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        other = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in other], (label, task)
        for a, b in zip(mine, other):
            for x, y in zip(a["resps"], b["resps"], strict=True):
                if task == "shakespeare_gen":
                    assert x == y, (label, a["doc_id"])
                elif task == "shakespeare_mc":
                    (lx, gx), (ly, gy) = x[0], y[0]
                    assert lx == pytest.approx(ly, abs=1e-4) and gx == gy, (label, a["doc_id"], x, y)
                else:
                    assert x[0] == pytest.approx(y[0], abs=1e-4), (label, a["doc_id"], x, y)
        for key, value in ours["results"][task].items():
            if "," in key and "stderr" not in key:
                assert theirs["results"][task][key] == pytest.approx(value, rel=1e-6), (label, task, key)


@pytest.fixture(scope="module")
def ours(harness: Any, tasks: Path, model: tuple[Path, Path]) -> dict[str, Any]:
    return evaluate_tasks(model[0], TASKS, tasks, device="cpu", log_samples=True)


def test_microgpt_scores_what_the_harness_hf_model_scores_on_the_export(
        harness: Any, tasks: Path, model: tuple[Path, Path], ours: dict[str, Any]) -> None:
    assert ours["results"]["shakespeare_mc"]["acc,none"] > 0  # not a degenerate run
    assert len(ours["samples"]["shakespeare_mc"]) == 40 and len(ours["samples"]["shakespeare_ppl"]) == 12
    hf = evaluate(harness, tasks, "hf", {"pretrained": str(model[1]), "dtype": "float32"})
    assert_same_scores(ours, hf, "hf")


@pytest.mark.parametrize("tokenized", [True, False])
def test_the_harness_scores_the_same_through_serve(harness: Any, tasks: Path, model: tuple[Path, Path],
                                                   server: InProcess, ours: dict[str, Any], tokenized: bool) -> None:
    """lm-evaluation-harness's `local-completions` model against `microgpt serve`, sending token ids
    or text, with the tokenizer files `microgpt export` writes."""
    api = evaluate(harness, tasks, "local-completions", {
        "model": "model", "base_url": server.url + "/v1/completions", "tokenizer": str(model[1]),
        "tokenizer_backend": "huggingface", "tokenized_requests": tokenized})
    assert_same_scores(ours, api, f"local-completions tokenized_requests={tokenized}")


def test_the_openai_client_gets_echo_and_logprobs_equal_to_the_engine(server: InProcess,
                                                                      model: tuple[Path, Path]) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    gpt, tokenizer = load_checkpoint(model[0], torch.device("cpu"))
    scorer = Scorer(Engine(gpt))
    prompt = "First Citizen: Before we proceed any further, hear me speak. " * 4
    ids = tokenizer.encode(prompt)
    assert len(ids) > gpt.config.context  # scored in windows
    scored = client.completions.create(model="model", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.logprobs is not None
    (expected,) = scorer.rolling([ids], prefix=None, top_k=3)
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([i]) for i in ids] and lp.token_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(expected.logprobs, abs=1e-5)
    assert lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    for top, alternatives, token, logprob in zip(lp.top_logprobs[1:], expected.top, lp.tokens[1:],
                                                 lp.token_logprobs[1:]):
        assert top == {**{tokenizer.decode([i]): pytest.approx(v, abs=1e-5) for i, v in alternatives},
                       token: logprob}

    # Token-id prompts, new tokens with their log-probabilities, greedy: each the likeliest.
    made = client.completions.create(model="model", prompt=[ids[:10], ids[:5]], max_tokens=6, temperature=0,
                                     echo=True, logprobs=2)
    for choice, n in zip(made.choices, (10, 5)):
        lp = choice.logprobs
        assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs
        assert choice.text == generate_text(gpt, tokenizer.decode(ids[:n]), 6, tokenizer, temperature=0)
        new = tokenizer.encode(choice.text)[n:]
        rescored = scorer.score([(ids[:n], new)], top_k=2)[0]
        assert lp.token_logprobs[n:] == pytest.approx(rescored.logprobs, abs=1e-5) and rescored.is_greedy
        assert all(v == max(top.values()) for v, top in zip(lp.token_logprobs[n:], lp.top_logprobs[n:]))

    chat = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content is not None and "".join(c.token for c in content).startswith(chat.choices[0].message.content or "")
    assert all(len(c.top_logprobs) == 2 and c.logprob == c.top_logprobs[0].logprob for c in content)

    # Streamed, the chunks carry the same text and log-probabilities, the echoed prompt's first.
    whole = client.completions.create(model="model", prompt=prompt[:40], max_tokens=8, temperature=0, echo=True,
                                      logprobs=1).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(model="model", prompt=prompt[:40], max_tokens=8,
                                                              temperature=0, echo=True, logprobs=1, stream=True)]
    assert chunks[0].text == prompt[:40] and "".join(c.text for c in chunks) == whole.text
    streamed = [lp for c in chunks if c.logprobs for lp in zip(c.logprobs.tokens or [], c.logprobs.token_logprobs or [],
                                                                c.logprobs.text_offset or [])]
    assert whole.logprobs is not None and streamed == list(zip(whole.logprobs.tokens or [],
                                                               whole.logprobs.token_logprobs or [],
                                                               whole.logprobs.text_offset or []))


def test_penalties_tokenize_and_unsupported_parameters(server: InProcess, model: tuple[Path, Path]) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    gpt, tokenizer = load_checkpoint(model[0], torch.device("cpu"))
    plain = client.completions.create(model="model", prompt="Speak", max_tokens=12, temperature=0).choices[0].text
    assert len(set(tokenizer.encode(plain))) < 12  # this random model repeats itself
    kept = client.completions.create(model="model", prompt="Speak", max_tokens=12, temperature=0, frequency_penalty=2,
                                     presence_penalty=1.5).choices[0].text
    assert len(set(tokenizer.encode(kept))) == 12
    assert "Speak" + kept == generate_text(gpt, "Speak", 12, tokenizer, temperature=0, frequency_penalty=2,
                                           presence_penalty=1.5)

    auth = {"Authorization": f"Bearer {KEY}"}
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Hellö<|endoftext|>", "return_token_strs": True},
                        headers=auth).json()
    ids = [*tokenizer.encode("Hellö"), 50256]  # special-token text is the token, as in vLLM
    assert tokens == {"count": len(ids), "max_model_len": 48, "tokens": ids,
                      "token_strs": ["Hell", "ö", "<|endoftext|>"]}
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=auth).json() == {
        "prompt": "Hellö<|endoftext|>"}
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    refused: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"best_of": 2}), ("/v1/completions", {"logit_bias": {"50": 10}}),
        ("/v1/completions", {"suffix": "end"}), ("/v1/completions", {"logprobs": 6}),
        ("/v1/completions", {"prompt": [50257]}), ("/v1/chat/completions", {"tools": [{"type": "function"}]}),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
        ("/v1/chat/completions", {"top_logprobs": 2}), ("/detokenize", {"tokens": [-1]})]
    for path, fields in refused:
        body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(server.url + path, json={**body, **fields} if path != "/detokenize" else fields,
                              headers=auth)
        assert response.status_code == 400, (path, fields, response.text)
        assert response.json()["error"]["param"] == next(iter(fields)), response.text


def test_the_eval_command_prints_the_harness_results(tasks: Path, model: tuple[Path, Path], ours: dict[str, Any],
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = microgpt("eval", "-c", model[0], "--tasks", ",".join(TASKS), "--include-path", tasks, "--json",
                      "--batch-size", "4", cwd=tmp_path, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                                             "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    printed = json.loads(result.stdout)
    for task in TASKS:
        for key, value in ours["results"][task].items():
            if "," in key:  # every metric and its stderr ("N/A" where the harness computes none)
                expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-6)
                assert printed["results"][task][key] == expected, (task, key)
    assert printed["config"]["model_num_parameters"] == load_checkpoint(model[0])[0].num_params()
    assert "Traceback" not in result.stderr

    code, out, err = run_cli(capsys, "eval", "-c", model[0], "--tasks", "shakespeare_mc", "--include-path", tasks,
                             "--limit", "4", "--num-fewshot", "1")
    assert code == 0, err
    assert "shakespeare_mc" in out and "acc_norm" in out and "stderr" in out
    n_shot = [line for line in out.splitlines() if "acc " in line or "│ acc" in line]
    assert n_shot, out


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["--tasks", "shakespeare_mc", "--text", "x.txt"], "leave out --text"),
    (["--tasks", "shakespeare_mc", "--limit", "-3"], "--limit"),
    (["--tasks", "shakespeare_mc", "--limit", "2.5"], "--limit"),
    (["--tasks", " , "], "at least one task"),
    (["--limit", "5"], "goes with --tasks"),
])
def test_bad_task_options_are_one_line(tasks: Path, model: tuple[Path, Path], harness: Any,
                                       capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, "eval", "-c", model[0], "--include-path", tasks, *args)
    assert_one_error_line(code, err, message)


def test_without_the_eval_extra_tasks_name_the_install_command(model: tuple[Path, Path],
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    monkeypatch.delitem(sys.modules, "microgpt_cli.infer.harness", raising=False)
    monkeypatch.delattr(microgpt_cli.infer, "harness", raising=False)
    code, _, err = run_cli(capsys, "eval", "-c", model[0], "--tasks", "hellaswag")
    assert_one_error_line(code, err, "pip install 'microgpt[eval]'", "pip install -e '.[eval]'")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizers_without_an_end_of_text_token_read_documents_after_a_newline(
        harness: Any, tasks: Path, tmp_path: Path, kind: str) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tokenizer = train_char([text]) if kind == "char" else train_bpe([text[:50_000]], 300)
    gpt = tiny_model(tokenizer.vocab_size, context=32)
    checkpoint.save(tmp_path / "model.pt", checkpoint.Checkpoint.of(gpt, tokenizer))
    results = evaluate_tasks(tmp_path / "model.pt", ["shakespeare_ppl", "shakespeare_mc"], tasks, limit=3,
                             device="cpu", log_samples=True)
    assert results["results"]["shakespeare_mc"]["alias"] == "shakespeare_mc"
    scorer = Scorer(Engine(gpt))
    newline = tokenizer.encode("\n")[0]
    for sample in results["samples"]["shakespeare_ppl"]:
        (expected,) = scorer.rolling([tokenizer.encode(sample["doc"]["text"])], prefix=newline)
        assert sample["resps"][0][0] == pytest.approx(expected.logprob, abs=1e-4)
